"""CPU per call of the telemetry one unary call makes, with no server, client or upstream.

    python -m bench.telemetry_calls [--calls 5000] [--rounds 7]

Runs, in a loop, exactly the telemetry calls of one successful unary cache miss: the
RPC's SERVER span with its tenant, one upstream attempt's CLIENT span with its
`traceparent` injection and response attributes, the attempt's outcome, its tokens and
the call's usage and cost. "off" is `Telemetry.disabled()` (no-op tracer and meter); "on" records
everything, spans through a `BatchSpanProcessor` to an exporter that drops them and every
metric aggregated, as `bench.telemetry_overhead` does. Nothing else runs, so the figure is
stable on a busy machine where end-to-end throughput is not: it is the measure for
changes to `service.telemetry`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from bench.telemetry_overhead import DiscardingExporter
from service.config import TelemetryConfig
from service.domain import (
    ChatRequest,
    Completion,
    FinishReason,
    GenerationParams,
    Message,
    Role,
    Timings,
    Usage,
)
from service.telemetry import Telemetry

REQUEST = ChatRequest(
    model="bench-model",
    messages=(Message(Role.USER, "Say hi"),),
    params=GenerationParams(),
    tenant="default",
)
COMPLETION = Completion(
    id="chatcmpl-1",
    model="bench-model",
    content="Hello",
    finish_reason=FinishReason.STOP,
    usage=Usage(input_tokens=3, output_tokens=5),
    cost_usd=6.3e-6,
    upstream="mock",
    timings=Timings(total_ms=1.0, upstream_ms=0.5, time_to_first_token_ms=0.5),
)
METADATA = (("user-agent", "grpc-python-asyncio/1.70"),)


def one_call(telemetry: Telemetry) -> None:
    """The telemetry calls of one unary cache miss, in the order the gateway makes them."""
    with telemetry.rpc(
        service="llmgateway.v1.CompletionService", method="Complete", metadata=METADATA
    ) as scope:
        scope.set_tenant("default")
        headers: dict[str, str] = {}
        with telemetry.upstream_attempt(
            REQUEST,
            upstream="mock",
            base_url="http://127.0.0.1:8080/v1",
            upstream_model="bench-model",
            attempt=1,
            headers=headers,
        ) as attempt:
            attempt.finish(
                response_id=COMPLETION.id,
                response_model=COMPLETION.model,
                finish_reason="stop",
                usage=COMPLETION.usage,
            )
        telemetry.record_attempt("mock", is_success=True)
        telemetry.record_token_usage(attempt, COMPLETION.usage)
        telemetry.record_completion(REQUEST, COMPLETION)


def cpu_us_per_call(telemetry: Telemetry, *, calls: int, rounds: int) -> float:
    """Median over `rounds` of process CPU per call, after a warm-up."""
    for _ in range(calls // 5):
        one_call(telemetry)
    per_round = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            one_call(telemetry)
        per_round.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(per_round)


def main(args: argparse.Namespace) -> None:
    """Print CPU per call with telemetry off and on."""
    off = cpu_us_per_call(Telemetry.disabled(), calls=args.calls, rounds=args.rounds)
    on_telemetry = Telemetry.from_config(
        TelemetryConfig(),
        environ={},
        span_processors=[BatchSpanProcessor(DiscardingExporter())],
        metric_readers=[InMemoryMetricReader()],
    )
    on = cpu_us_per_call(on_telemetry, calls=args.calls, rounds=args.rounds)
    on_telemetry.providers.shutdown()
    print(f"telemetry calls of one unary call, median of {args.rounds}x{args.calls}:")
    print(f"  off: {off:6.1f} CPU us/call")
    print(f"  on : {on:6.1f} CPU us/call")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry_calls")
    parser.add_argument("--calls", type=int, default=5000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median reported)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
