"""Processes the benchmarks measure, each printing `ready HOST:PORT` when it listens.

python -m bench.servers lean-mock        # a minimal upstream answering at once, canned bytes
python -m bench.servers mock             # the fault-injecting fake upstream, answering at once
python -m bench.servers trivial          # a grpc.aio server that does nothing (the ceiling);
                                         # BENCH_EVENT_GAP_MS paces its stream messages
python -m bench.servers gateway URL      # the gateway in front of the upstream at URL
python -m bench.servers gateway-telemetry URL  # the same, every span and metric recorded
python -m bench.servers gateway-metered URL  # the same, its callers' tenant with limits
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

import grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.rpc_boundary import pending_call_options

MODEL = "bench-model"
STREAM_CHUNKS = int(os.environ.get("BENCH_STREAM_CHUNKS", "200"))


def run_as_the_gateway_runs(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on the event loop the gateway's `run` serves on (uvloop's when
    installed): every server of the bench, the trivial one too, on the same loop."""
    from service.server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


async def _wait_forever() -> None:
    await asyncio.Event().wait()


async def run_lean_mock() -> None:
    """The lean upstream with canned answers; streams of STREAM_CHUNKS chunks.

    BENCH_EVENT_GAP_MS paces a stream's events (0, the default: all at once).
    """
    from bench.lean_upstream import Answers, serve

    gap_s = float(os.environ.get("BENCH_EVENT_GAP_MS", "0")) / 1000
    first_gap_s = float(os.environ.get("BENCH_FIRST_EVENT_GAP_MS", "0")) / 1000
    answers = Answers(
        MODEL,
        " ".join(["tok"] * STREAM_CHUNKS),
        STREAM_CHUNKS,
        event_gap_s=gap_s,
        first_event_gap_s=first_gap_s,
    )
    server = await serve(answers)
    port = server.sockets[0].getsockname()[1]
    print(f"ready http://127.0.0.1:{port}/v1", flush=True)
    await _wait_forever()


async def run_mock() -> None:
    """The fake upstream with instant answers; streams of STREAM_CHUNKS chunks."""
    from tests.fake_upstream import FakeUpstream, Reply

    if os.environ.get("BENCH_SLOW_STREAM"):
        # Streams that stay open for seconds, for holding many at once.
        reply = Reply(content="a b c d e f g h", chunks=8, chunk_delay_s=1.0)
    else:
        reply = Reply(content=" ".join(["tok"] * STREAM_CHUNKS), chunks=STREAM_CHUNKS)
    async with FakeUpstream(models=(MODEL,), default=reply) as up:
        up.requests = _Discard()  # type: ignore[assignment]
        print(f"ready {up.base_url}", flush=True)
        await _wait_forever()


class _Discard(list[Any]):
    """A request log that keeps nothing, so a long benchmark does not grow memory."""

    def append(self, item: Any) -> None:
        """Drop the item."""


class TrivialServicer(pb_grpc.CompletionServiceServicer):
    """Answers without doing anything: the ceiling for a Python gRPC service here."""

    def __init__(self) -> None:
        content = " ".join(["tok"] * STREAM_CHUNKS)
        self._response = pb.CompleteResponse(
            content=content, metadata=pb.CompletionMetadata(id="x", model=MODEL)
        )
        self._delta = pb.CompleteStreamResponse(delta=pb.Delta(content="tok "))
        self._final = pb.CompleteStreamResponse(final=pb.CompletionMetadata(id="x", model=MODEL))

    async def Complete(self, request: Any, context: Any) -> pb.CompleteResponse:
        return self._response

    async def CompleteStream(self, request: Any, context: Any) -> Any:
        gap_s = float(os.environ.get("BENCH_EVENT_GAP_MS", "0")) / 1000
        first_gap_s = float(os.environ.get("BENCH_FIRST_EVENT_GAP_MS", "0")) / 1000
        for index in range(STREAM_CHUNKS):
            yield self._delta
            if gap_s:  # paced as the lean mock paces its events
                await asyncio.sleep(gap_s)
            elif first_gap_s and index == 0:
                await asyncio.sleep(first_gap_s)
        yield self._final


async def run_trivial() -> None:
    """The trivial grpc.aio server."""
    # The gateway's pending-call limits, so that both hold the same number of streams.
    server = grpc.aio.server(options=pending_call_options(100_000, 0))
    pb_grpc.add_CompletionServiceServicer_to_server(TrivialServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def gateway_config_data(
    upstream_url: str, *, listen: str = "127.0.0.1:0", **sections: dict[str, Any]
) -> dict[str, Any]:
    """The config every benchmark's gateway runs: one mock upstream serving MODEL.

    The gateway's own limits are lifted, so a benchmark measures the gateway rather than
    its admission or the pool's concurrency cap; `sections` are merged over this.
    """
    data: dict[str, Any] = {
        "server": {"listen": listen, "max_in_flight_calls": 100_000},
        "upstreams": [
            {
                "name": "mock",
                "base_url": upstream_url,
                "models": [MODEL],
                "max_connections": 10_000,
                "max_concurrency": 10_000,
            }
        ],
        "models": {
            MODEL: {
                "context_window": 32768,
                "input_usd_per_million": 0.14,
                "output_usd_per_million": 0.42,
            }
        },
        "local_model": {"enabled": "never"},
    }
    for name, section in sections.items():
        data[name] = {**data.get(name, {}), **section}
    return data


# Limits on the tenant every caller is without auth, too high to refuse anything: each
# call takes the caller gate's full path (check, estimate, limiter) as a production
# tenant's does.
METERED_TENANTS = {
    "default": {"requests_per_minute": 100_000_000, "tokens_per_minute": 2_000_000_000}
}


async def run_gateway(
    upstream_url: str, *, with_telemetry: bool = False, metered: bool = False
) -> None:
    """The gateway with one upstream serving MODEL; `with_telemetry`: all of it recorded;
    `metered`: its callers' tenant has limits."""
    from service.config import parse_config
    from service.server import GatewayServer

    sections = {"tenants": METERED_TENANTS} if metered else {}
    config = parse_config(gateway_config_data(upstream_url, **sections), source="<bench>")
    telemetry = _discarding_telemetry() if with_telemetry else None  # None: as configured
    async with GatewayServer(config, telemetry=telemetry) as server:
        print(f"ready {server.address}", flush=True)
        await _wait_forever()


def _discarding_telemetry() -> Any:
    """Spans through a batch processor and every metric aggregated; the exporter drops."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from bench.telemetry_overhead import DiscardingExporter
    from service.config import TelemetryConfig
    from service.telemetry import Telemetry

    return Telemetry.from_config(
        TelemetryConfig(),
        environ={},
        span_processors=[BatchSpanProcessor(DiscardingExporter())],
        metric_readers=[InMemoryMetricReader()],
    )


def main() -> None:
    """Run the server named on the command line."""
    kind = sys.argv[1]
    if kind == "mock":
        run_as_the_gateway_runs(run_mock())
    elif kind == "lean-mock":
        run_as_the_gateway_runs(run_lean_mock())
    elif kind == "trivial":
        run_as_the_gateway_runs(run_trivial())
    elif kind == "gateway":
        run_as_the_gateway_runs(run_gateway(sys.argv[2]))
    elif kind == "gateway-metered":
        run_as_the_gateway_runs(run_gateway(sys.argv[2], metered=True))
    elif kind == "gateway-telemetry":
        run_as_the_gateway_runs(run_gateway(sys.argv[2], with_telemetry=True))
    else:
        raise SystemExit(f"unknown server {kind!r}")


if __name__ == "__main__":
    main()
