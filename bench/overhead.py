"""The gateway's own cost per call, as ratios within one run.

Three configurations, each in its own process, driven from this one:
- direct:  the mock upstream called over HTTP (the unavoidable upstream hop);
- trivial: a grpc.aio server that does nothing (the ceiling for Python gRPC here);
- gateway: the gateway in front of the mock upstream.
Run: `python -m bench.overhead` (BENCH_SCALE=0.2 for a quick look).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import grpc
import orjson

from bench.harness import Figures, child_server, measure, print_table, write_json
from bench.servers import MODEL, STREAM_CHUNKS
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
UNARY_C1 = max(50, int(1000 * SCALE))
UNARY_C64 = max(200, int(5000 * SCALE))
STREAMS = max(20, int(200 * SCALE))

MESSAGES = [pb.Message(role=pb.ROLE_USER, content="Say hi")]
UNARY = pb.CompleteRequest(model=MODEL, messages=MESSAGES)
STREAM = pb.CompleteStreamRequest(model=MODEL, messages=MESSAGES)
BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}]})
STREAM_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)


async def _grpc_figures(name: str, address: str) -> dict[str, Figures]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)

        async def unary() -> None:
            await stub.Complete(UNARY)

        async def stream() -> None:
            async for _ in stub.CompleteStream(STREAM):
                pass

        return {
            "unary_c1": await measure(f"{name} unary c=1", unary, requests=UNARY_C1, concurrency=1),
            "unary_c64": await measure(
                f"{name} unary c=64", unary, requests=UNARY_C64, concurrency=64
            ),
            "stream_c16": await measure(
                f"{name} stream c=16", stream, requests=STREAMS, concurrency=16
            ),
        }


async def _direct_figures(base_url: str) -> dict[str, Figures]:
    url = base_url + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def unary() -> None:
            async with session.post(url, data=BODY, headers=headers) as response:
                orjson.loads(await response.read())

        async def stream() -> None:
            async with session.post(url, data=STREAM_BODY, headers=headers) as response:
                async for _ in response.content.iter_chunked(65536):
                    pass

        return {
            "unary_c1": await measure("direct unary c=1", unary, requests=UNARY_C1, concurrency=1),
            "unary_c64": await measure(
                "direct unary c=64", unary, requests=UNARY_C64, concurrency=64
            ),
            "stream_c16": await measure(
                "direct stream c=16", stream, requests=STREAMS, concurrency=16
            ),
        }


async def run() -> dict[str, Any]:
    """Measure all three and print the table; returns the figures."""
    async with child_server("mock") as upstream_url:
        direct = await _direct_figures(upstream_url)
        async with child_server("trivial") as trivial_address:
            trivial = await _grpc_figures("trivial", trivial_address)
        async with child_server("gateway", upstream_url) as gateway_address:
            gateway = await _grpc_figures("gateway", gateway_address)
    added_ms = gateway["unary_c1"].p50_ms - direct["unary_c1"].p50_ms - trivial["unary_c1"].p50_ms
    stream_ratio = gateway["stream_c16"].per_second / trivial["stream_c16"].per_second
    summary = {
        "gateway_added_p50_ms_c1": round(added_ms, 3),
        "unary_c64_vs_trivial": round(
            gateway["unary_c64"].per_second / trivial["unary_c64"].per_second, 3
        ),
        "stream_chunks_per_s_vs_trivial": round(stream_ratio, 3),
        "stream_chunks": STREAM_CHUNKS,
    }
    for key in ("unary_c1", "unary_c64", "stream_c16"):
        print_table(key, [trivial[key], direct[key], gateway[key]], baseline=trivial[key])
    print(
        f"\ngateway's own p50 cost at c=1: {added_ms:+.3f} ms "
        f"(gateway p50 - direct HTTP p50 - trivial gRPC p50)"
    )
    print(f"unary c=64 throughput vs trivial server: {summary['unary_c64_vs_trivial']:.2f}")
    print(
        f"streamed chunks/s vs trivial server ({STREAM_CHUNKS}-chunk streams): {stream_ratio:.2f}"
    )
    result = {"summary": summary, "direct": direct, "trivial": trivial, "gateway": gateway}
    print(f"written {write_json('overhead', result)}")
    return result


def main() -> None:
    """Entry point."""
    asyncio.run(run())


if __name__ == "__main__":
    main()
