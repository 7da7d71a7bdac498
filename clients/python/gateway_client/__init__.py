"""Async Python client for llm-gateway.

async with GatewayClient("127.0.0.1:50051") as client:
    answer = await client.complete("Say hi", model="deepseek-v4")
    print(answer.content, answer.metadata.cost_usd)
    stream = client.stream("Tell a story", model="deepseek-v4")
    async for text in stream:
        print(text, end="")
    print(stream.final.usage.output_tokens)
"""

from gateway_client.client import CompletionStream, GatewayClient, build_request, tls_credentials
from gateway_client.errors import ErrorDetails, error_details, status_details

__all__ = [
    "CompletionStream",
    "ErrorDetails",
    "GatewayClient",
    "build_request",
    "error_details",
    "status_details",
    "tls_credentials",
]
