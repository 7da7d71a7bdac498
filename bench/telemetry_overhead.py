"""Throughput of the gateway with telemetry on against off, as a ratio.

    python -m bench.telemetry_overhead [--seconds 3] [--concurrency 32] [--rounds 3]

Both gateways run in this process in front of the same loopback fake upstream, and
are driven by the same closed-loop callers, alternating off/on each round so that
machine noise hits both alike. "On" means what an operator gets with exporters
configured: a span per RPC and per attempt through a `BatchSpanProcessor`, and every
metric instrument aggregated; the exporter itself discards, so the figure is the
gateway's own cost, not a collector's. Callers and upstream share the loop with the
gateway, so the ratio understates the cost per gateway CPU second a little.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import TelemetryConfig, parse_config
from service.server import GatewayServer
from service.telemetry import Telemetry
from tests.fake_upstream import FakeUpstream

MODEL = "bench-model"


class DiscardingExporter(SpanExporter):
    """Accepts every batch and drops it, counting spans."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _config(base_url: str) -> object:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "grace_period_s": 1},
            "upstreams": [{"name": "mock", "base_url": base_url, "models": [MODEL]}],
            "models": {
                MODEL: {
                    "context_window": 8192,
                    "input_usd_per_million": 0.27,
                    "output_usd_per_million": 1.10,
                }
            },
            "local_model": {"enabled": "never"},
        },
        source="<bench>",
        environ={},
    )


@dataclass(frozen=True, slots=True)
class Round:
    """One measured round: wall-clock throughput and process CPU per call."""

    calls_per_s: float
    cpu_us_per_call: float


async def _drive(address: str, *, seconds: float, concurrency: int, stream: bool) -> Round:
    """Closed-loop callers for `seconds`; throughput and CPU (all threads) per call."""
    request = pb.CompleteRequest(
        model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Say hi")]
    )
    stream_request = pb.CompleteStreamRequest()
    stream_request.ParseFromString(request.SerializeToString())
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        await stub.Complete(request)  # warm the connection
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                if stream:
                    async for _ in stub.CompleteStream(stream_request):
                        pass
                else:
                    await stub.Complete(request)
                done += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(caller())
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Round(done / elapsed, cpu / done * 1e6)


async def _run_once(
    upstream: FakeUpstream, telemetry: Telemetry, args: argparse.Namespace
) -> Round:
    config = _config(upstream.base_url)
    async with GatewayServer(config, telemetry=telemetry) as server:  # type: ignore[arg-type]
        return await _drive(
            server.address,
            seconds=args.seconds,
            concurrency=args.concurrency,
            stream=args.stream,
        )


def _telemetry_on() -> tuple[Telemetry, DiscardingExporter]:
    exporter = DiscardingExporter()
    telemetry = Telemetry.from_config(
        TelemetryConfig(),
        environ={},
        span_processors=[BatchSpanProcessor(exporter)],
        metric_readers=[InMemoryMetricReader()],
    )
    return telemetry, exporter


async def main(args: argparse.Namespace) -> None:
    """Alternate off/on rounds and print throughputs and their ratio."""
    off: list[Round] = []
    on: list[Round] = []
    spans = 0
    async with FakeUpstream(models=(MODEL,)) as upstream:
        for _ in range(args.rounds):
            off.append(await _run_once(upstream, Telemetry.disabled(), args))
            telemetry, exporter = _telemetry_on()
            on.append(await _run_once(upstream, telemetry, args))
            spans += exporter.spans
    off_rps = statistics.median(r.calls_per_s for r in off)
    on_rps = statistics.median(r.calls_per_s for r in on)
    off_cpu = statistics.median(r.cpu_us_per_call for r in off)
    on_cpu = statistics.median(r.cpu_us_per_call for r in on)
    kind = "CompleteStream" if args.stream else "Complete"
    print(f"telemetry overhead: {kind}, {args.concurrency} callers, {args.rounds}x{args.seconds}s")
    for name, rounds, rps, cpu in (("off", off, off_rps, off_cpu), ("on", on, on_rps, on_cpu)):
        each = ", ".join(f"{r.calls_per_s:.0f}" for r in rounds)
        print(f"  {name:3}: {rps:8.1f} calls/s (rounds: {each}); {cpu:7.0f} CPU us/call")
    print(f"  spans exported while on: {spans}")
    print(f"  throughput ratio on/off (wall clock):        {on_rps / off_rps:.3f}")
    # CPU per call is far less sensitive to other load on the machine than wall time;
    # off/on CPU per call is the throughput ratio of a CPU-bound gateway.
    print(f"  throughput ratio on/off (CPU per call):      {off_cpu / on_cpu:.3f}")
    print(f"  telemetry CPU per call: {on_cpu - off_cpu:.0f} us")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry_overhead")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each round")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop callers")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs (median reported)")
    parser.add_argument("--stream", action="store_true", help="CompleteStream instead of Complete")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
