"""Load through the gateway against an upstream that fails 30% of the time.

Run: `python -m bench.load_failures [--calls 600] [--concurrency 32] [--failure-rate 0.3]`.
Everything runs on loopback in one process: a fault-injecting fake upstream, the real
gateway, and a gRPC client. Prints, for unary and streaming calls, the success rate,
p50/p99 latency, and retry amplification (upstream requests ÷ caller requests), which
the retry budget keeps near 1 + ratio however badly the upstream fails.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import grpc

from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.breaker import BreakerState
from service.server import GatewayServer
from tests.conftest import chat, chat_stream, gateway_config
from tests.fake_upstream import Behaviour, FakeUpstream, Reply, Reset, Status


@dataclass(frozen=True, slots=True)
class Result:
    """The figures of one scenario."""

    name: str
    calls: int
    succeeded: int
    upstream_requests: int
    latencies_s: list[float]
    wall_s: float
    retries: int
    breaker_opened: int

    def report(self) -> str:
        """One line per figure."""
        ordered = sorted(self.latencies_s)
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{self.name}: calls={self.calls} success_rate={self.succeeded / self.calls:.3f} "
            f"p50_ms={p50 * 1000:.1f} p99_ms={p99 * 1000:.1f} "
            f"retry_amplification={self.upstream_requests / self.calls:.3f} "
            f"retries={self.retries} breaker_opened={self.breaker_opened} "
            f"calls_per_s={self.calls / self.wall_s:.0f}"
        )


def failing_script(count: int, failure_rate: float, rng: random.Random) -> list[Behaviour]:
    """`count` upstream behaviours, each a failure (503, 500 or reset) with `failure_rate`."""
    failures: list[Behaviour] = [Status(503), Status(500), Reset()]
    return [rng.choice(failures) if rng.random() < failure_rate else Reply() for _ in range(count)]


async def run_scenario(
    name: str,
    *,
    is_stream: bool,
    calls: int,
    concurrency: int,
    failure_rate: float,
    seed: int,
    budget_ratio: float = 0.2,
) -> Result:
    """Start an upstream and a gateway, drive `calls` calls, and measure them."""
    rng = random.Random(seed)
    async with FakeUpstream() as upstream:
        # Enough scripted behaviours for every attempt, retries included.
        upstream.script(*failing_script(calls * 4, failure_rate, rng))
        config = gateway_config(
            upstream.base_url,
            server={"max_in_flight_calls": concurrency * 2},
            resilience={
                "backoff_base_s": 0.02,
                "backoff_cap_s": 0.2,
                "breaker_cool_down_s": 0.5,
                "retry_budget_ratio": budget_ratio,
            },
        )
        async with GatewayServer(config) as server:
            channel = grpc.aio.insecure_channel(server.address)
            stub = pb_grpc.CompletionServiceStub(channel)
            latencies: list[float] = []
            succeeded = 0
            gate = asyncio.Semaphore(concurrency)

            async def one(index: int) -> None:
                nonlocal succeeded
                async with gate:
                    started = time.perf_counter()
                    try:
                        if is_stream:
                            async for _ in stub.CompleteStream(chat_stream(f"n{index}")):
                                pass
                        else:
                            await stub.Complete(chat(f"n{index}"))
                        succeeded += 1
                    except grpc.aio.AioRpcError:
                        pass
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for index in range(calls):
                    group.create_task(one(index))
            wall = time.perf_counter() - started
            await channel.close()
            assert server.pipeline is not None
            counters = server.pipeline.pool.counters
            opened = sum(1 for c in counters.breaker_changes if c.new is BreakerState.OPEN)
        return Result(
            name,
            calls,
            succeeded,
            len(upstream.requests),
            latencies,
            wall,
            retries=counters.retries,
            breaker_opened=opened,
        )


async def main(argv: list[str] | None = None) -> None:
    """Run the unary and streaming scenarios and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.load_failures")
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    calls = max(1, min(args.calls, 20_000))  # bounded, whatever is asked
    print(
        f"load_failures: upstream failure rate {args.failure_rate:.0%}, "
        f"{calls} calls per scenario, concurrency {args.concurrency}, loopback"
    )
    scenarios = [
        ("unary", False, 0.2),
        ("stream", True, 0.2),
        ("unary, budget ratio 1.0 (for comparison)", False, 1.0),
    ]
    for name, is_stream, budget_ratio in scenarios:
        result = await run_scenario(
            name,
            is_stream=is_stream,
            budget_ratio=budget_ratio,
            calls=calls,
            concurrency=args.concurrency,
            failure_rate=args.failure_rate,
            seed=args.seed,
        )
        print(result.report(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
