"""Cache-hit throughput and latency against a trivial grpc.aio server, in one run.

python -m bench.cache_hits [--requests N] [--concurrency C]

Each server runs in its own process (so the load generator does not share its core):
a grpc.aio server that returns a constant CompleteResponse (the ceiling for Python gRPC
here), the gateway answering every request from its in-memory cache, and the gateway on
Redis when `redis-server` is installed. Printed: requests/s at concurrency C, p50/p99
latency, and each one's ratio to the ceiling (throughput, and p50 latency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.harness import child_server
from bench.servers import gateway_config_data, run_as_the_gateway_runs
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

MODEL = "bench-model"
CONTENT = "The quick brown fox jumps over the lazy dog. " * 8
REPO = Path(__file__).resolve().parents[1]


def _request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="What does the fox do?")],
        params=pb.GenerationParams(temperature=0.0),
    )


# ---- the servers (child processes) -------------------------------------------------


class TrivialServicer(pb_grpc.CompletionServiceServicer):
    """Returns one constant response: no parsing of the request, no work."""

    def __init__(self) -> None:
        self._response = pb.CompleteResponse(
            content=CONTENT,
            metadata=pb.CompletionMetadata(id="x", model=MODEL, cache_hit=True),
        )

    async def Complete(self, request: Any, context: Any) -> pb.CompleteResponse:
        return self._response


async def _serve_trivial() -> None:
    server = grpc.aio.server()
    pb_grpc.add_CompletionServiceServicer_to_server(TrivialServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _serve_gateway(redis_url: str) -> None:
    from service.config import parse_config
    from service.server import GatewayServer
    from tests.fake_upstream import FakeUpstream, Reply

    cache: dict[str, Any] = {"backend": "memory"}
    if redis_url:
        cache = {"backend": "redis", "redis_url": redis_url}
    async with FakeUpstream(models=(MODEL,), default=Reply(content=CONTENT)) as upstream:
        config = parse_config(
            gateway_config_data(upstream.base_url, cache=cache), source="<bench>", environ={}
        )
        async with GatewayServer(config) as server:
            print(f"ready {server.address}", flush=True)
            await asyncio.Event().wait()


def _serve(kind: str, redis_url: str) -> None:
    run_as_the_gateway_runs(_serve_trivial() if kind == "trivial" else _serve_gateway(redis_url))


# ---- the load generator -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """Throughput and latency of one server."""

    name: str
    per_second: float
    p50_ms: float
    p99_ms: float
    hits: int
    errors: int


async def _measure(name: str, address: str, *, requests: int, concurrency: int) -> Figures:
    request = _request()
    latencies: list[float] = []
    hits = errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        for _ in range(50):  # warm-up; the first gateway call fills the cache
            await stub.Complete(request)
        remaining = requests

        async def worker() -> None:
            nonlocal remaining, hits, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    reply = await stub.Complete(request)
                    hits += reply.metadata.cache_hit
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return Figures(
        name=name,
        per_second=requests / seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        hits=hits,
        errors=errors,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _redis() -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        yield ""
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(200):
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait()


def _median_of(rounds: list[Figures]) -> Figures:
    return Figures(
        name=rounds[0].name,
        per_second=statistics.median(r.per_second for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds),
        hits=sum(r.hits for r in rounds),
        errors=sum(r.errors for r in rounds),
    )


async def _run(
    requests: int, concurrency: int, rounds: int, redis_url: str
) -> tuple[list[Figures], list[Figures]]:
    servers = [("trivial grpc.aio (ceiling)", "trivial", "")]
    servers.append(("gateway, memory cache hit", "gateway", ""))
    if redis_url:
        servers.append(("gateway, Redis cache hit", "gateway", redis_url))
    loaded: list[list[Figures]] = [[] for _ in servers]
    single: list[list[Figures]] = [[] for _ in servers]
    async with contextlib.AsyncExitStack() as stack:
        addresses = [
            await stack.enter_async_context(child_server("serve", k, u, module="bench.cache_hits"))
            for _, k, u in servers
        ]
        # Interleave the servers round by round so background load hits them alike.
        for _ in range(rounds):
            for i, (name, _, _) in enumerate(servers):
                loaded[i].append(
                    await _measure(name, addresses[i], requests=requests, concurrency=concurrency)
                )
                single[i].append(
                    await _measure(name, addresses[i], requests=requests // 10, concurrency=1)
                )
    return [_median_of(r) for r in loaded], [_median_of(r) for r in single]


def _print(title: str, rows: list[Figures]) -> None:
    ceiling = rows[0]
    print(f"\n{title}")
    print(
        f"{'':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'hits':>7} {'errors':>6} "
        f"{'thr ratio':>9} {'p50 ratio':>9}"
    )
    for row in rows:
        print(
            f"{row.name:28} {row.per_second:9.0f} {row.p50_ms:8.3f} {row.p99_ms:8.3f} "
            f"{row.hits:7d} {row.errors:6d} {row.per_second / ceiling.per_second:9.2f} "
            f"{row.p50_ms / ceiling.p50_ms:9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Measure and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.cache_hits")
    parser.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_N", "20000")))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with _redis() as redis_url:
        loaded, single = asyncio.run(_run(args.requests, args.concurrency, args.rounds, redis_url))
    where = f"{os.cpu_count()} CPUs, median of {args.rounds} interleaved rounds"
    _print(
        f"Cache hits: {args.requests} unary requests at concurrency {args.concurrency} ({where})",
        loaded,
    )
    _print(f"Cache hits one at a time: {args.requests // 10} requests ({where})", single)
    if not redis_url:
        print("(redis-server not installed: Redis row skipped)")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        _serve(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    else:
        main()
