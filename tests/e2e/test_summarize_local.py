"""Summarize on the real local model (llama.cpp serving Gemma 3 270M).

Needs the `local` extra (`make setup`); deselect with `-m 'not local_model'`. Uses the
session's `local_gateway` (tests/e2e/conftest.py) when there is one, else starts its own
gateway with `local_model.enabled: always`. The model is a small base model, so the test
asserts the shape of the answer and its usage, never the text.
"""

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from service.domain import Message, Role
from service.server import GatewayServer
from service.summarize import document_prompt
from service.tokens import estimate_prompt_tokens

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.xdist_group("local_model"),
    pytest.mark.timeout(600),
]

LOCAL_MODEL = "gemma-3-270m"
TARGET_TOKENS = 64
DOCUMENT = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "Supporters said the lanes would make cycling safer and reduce traffic. Shop owners "
    "worried that removing parking spaces would hurt their business.\n\n"
    "After two hours of debate, the council voted five to two to build the lanes, and "
    "promised to add a parking garage near the market by next summer."
)


@pytest_asyncio.fixture
async def summarize_gateway(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The address of a gateway serving the local model."""
    try:
        shared = request.getfixturevalue("local_gateway")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield str(shared)
        return
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "grace_period_s": 1},
            "local_model": {"enabled": "always", "context_window": 2048, "threads": 1},
            "models": {
                LOCAL_MODEL: {
                    "context_window": 2048,
                    "input_usd_per_million": 0.0,
                    "output_usd_per_million": 0.0,
                }
            },
        },
        source="<e2e>",
        environ={},
    )
    async with GatewayServer(config) as server:
        yield server.address


async def test_summarize_short_document_on_local_model(summarize_gateway):
    """The real model summarises a short document in one call; its usage is estimated, as
    llama.cpp reports none for the stream the call went as."""
    async with grpc.aio.insecure_channel(summarize_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        response = await stub.Summarize(
            pb.SummarizeRequest(model=LOCAL_MODEL, document=DOCUMENT, target_tokens=TARGET_TOKENS),
            timeout=300,
        )
    assert (response.chunks, response.levels, response.upstream_calls) == (1, 1, 1)
    assert 1 <= response.usage.output_tokens <= TARGET_TOKENS
    assert response.usage.estimated
    # llama.cpp counted none: the input is the gateway's estimate of the prompt it sent.
    sent = [
        Message(Role.SYSTEM, document_prompt(target_tokens=TARGET_TOKENS, instructions="")),
        Message(Role.USER, DOCUMENT),
    ]
    assert 0 < response.usage.input_tokens <= estimate_prompt_tokens(sent)
