"""CompleteBatch throughput against a mock upstream with a fixed latency.

    python -m bench.batch_throughput [--items 1000] [--concurrency 50] [--latency-ms 20]

The mock upstream (tests/fake_upstream.py) runs in its own process and answers every
request after a fixed delay. With `concurrency` items in flight, the best a batch can do
is `latency * items / concurrency` seconds; the figure printed is how close the gateway
gets to that (1.0 would be no overhead at all). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection

import grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from service.server import GatewayServer

MODEL = "bench-model"


def _serve_upstream(latency_s: float, conn: Connection) -> None:
    """Child process: run the mock upstream until the parent says stop."""
    from tests.fake_upstream import FakeUpstream, Reply

    async def main() -> None:
        async with FakeUpstream(models=(MODEL,), default=Reply(delay_s=latency_s)) as fake:
            conn.send(fake.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


async def run_batch(port: int, *, items: int, concurrency: int) -> tuple[float, int, int]:
    """One batch through a gateway in this process: (seconds, succeeded, failed)."""
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "grace_period_s": 1},
            "upstreams": [
                {
                    "name": "mock",
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "models": [MODEL],
                    "max_connections": max(100, concurrency),
                }
            ],
            "models": {
                MODEL: {
                    "context_window": 8192,
                    "input_usd_per_million": 0.14,
                    "output_usd_per_million": 0.42,
                }
            },
            "local_model": {"enabled": "never"},
            "batch": {"max_items": items, "max_concurrency": concurrency},
        },
        source="<bench>",
        environ={},
    )
    request = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(
                id=f"item-{i}",
                request=pb.CompleteRequest(
                    model=MODEL,
                    messages=[pb.Message(role=pb.ROLE_USER, content=f"Question number {i}?")],
                ),
            )
            for i in range(items)
        ],
        concurrency=concurrency,
    )
    async with GatewayServer(config) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            # Warm up connections and code paths first, outside the timing.
            warm = pb.CompleteBatchRequest(
                items=request.items[:concurrency], concurrency=concurrency
            )
            async for _ in stub.CompleteBatch(warm):
                pass
            started = time.perf_counter()
            summary = pb.BatchSummary()
            async for event in stub.CompleteBatch(request):
                if event.HasField("summary"):
                    summary = event.summary
            elapsed = time.perf_counter() - started
        await server.stop(grace_s=0)
    return elapsed, summary.succeeded, summary.failed


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the figures (`argv` None: the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args(argv or [])
    latency_s = args.latency_ms / 1000
    parent, child = multiprocessing.Pipe()
    upstream = multiprocessing.get_context("spawn").Process(
        target=_serve_upstream, args=(latency_s, child), daemon=True
    )
    upstream.start()
    try:
        port = parent.recv()
        elapsed, succeeded, failed = asyncio.run(
            run_batch(port, items=args.items, concurrency=args.concurrency)
        )
    finally:
        parent.send("stop")
        upstream.join(timeout=5)
    ideal_s = latency_s * args.items / args.concurrency
    print(
        f"batch of {args.items} items at concurrency {args.concurrency}, "
        f"upstream latency {args.latency_ms:g} ms"
    )
    print(f"  succeeded {succeeded}, failed {failed}")
    print(f"  gateway : {elapsed:.3f} s  {args.items / elapsed:8.1f} items/s")
    print(f"  ideal   : {ideal_s:.3f} s  {args.items / ideal_s:8.1f} items/s")
    print(f"  ratio   : {ideal_s / elapsed:.2f} of ideal throughput")


if __name__ == "__main__":
    main(sys.argv[1:])
