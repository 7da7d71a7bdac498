"""The gateway's metric instruments: GenAI semantic conventions plus `llm_gateway.*`.

Names and units follow https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-metrics/
so that stock GenAI dashboards work; gateway-only figures live under `llm_gateway.`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.util.types import AttributeValue

from service.telemetry.histograms import AttributeSet, CumulativeHistogram, HistogramExport
from service.telemetry.tracing import (
    CACHE_DIRECTION,
    CACHE_RESULT,
    GEN_AI_REQUEST_MODEL,
    OUTCOME,
    RPC_GRPC_STATUS_CODE,
    RPC_METHOD,
    STORE,
    TENANT,
    UPSTREAM,
)

# Bucket boundaries the GenAI conventions advise, in seconds and tokens.
DURATION_BUCKETS_S = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

# Circuit breaker states as the `llm_gateway.upstream.breaker.state` gauge reports them.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Tally:
    """Running sums per attribute set, reported by an observable counter when collected.

    It exports exactly what a synchronous counter would (a monotonic, cumulative sum per
    attribute set) at a fraction of the cost on the request path: the SDK's `Counter.add`
    builds a `Measurement`, validates and hashes its attributes and takes a lock on every
    call (about 8 µs here), while adding to a dict costs well under one. Meant for
    counters bumped on every call; the attribute values must be few (methods, status
    codes, upstreams, tenants and configured models), as they are for any counter.
    """

    def __init__(self, attribute_names: Sequence[str]) -> None:
        self._names = tuple(attribute_names)
        self._sums: dict[tuple[AttributeValue, ...], float] = {}
        # The metric reader calls `observe` from its own thread.
        self._lock = threading.Lock()

    def add(self, amount: float, *values: AttributeValue) -> None:
        """Add `amount` for the attribute values given in `attribute_names` order."""
        with self._lock:
            # Indexed, not `get`: a call fewer; only an attribute set's first add misses.
            try:
                self._sums[values] += amount
            except KeyError:
                self._sums[values] = amount

    def observe(self, _: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        """Every sum so far, with its attributes."""
        with self._lock:
            sums = list(self._sums.items())
        return [
            metrics.Observation(total, dict(zip(self._names, values, strict=True)))
            for values, total in sums
        ]


@dataclass(frozen=True, slots=True)
class StoreWrites:
    """A shared store's late writes: waiting now, and given up so far."""

    waiting: int
    abandoned: int


class HistogramInstrument(Protocol):
    """What the gateway records into: the SDK's histogram or a `CumulativeHistogram`."""

    def record(
        self, amount: float, attributes: Mapping[str, AttributeValue] | None = None
    ) -> None: ...


def _pair_recorder(
    histogram: HistogramInstrument, second_histogram: HistogramInstrument | None = None
) -> Callable[[float, AttributeSet, float, AttributeSet], None]:
    """What records two amounts into `histogram` (an upstream call's input and output
    tokens), or the second into `second_histogram` (an RPC's duration and overhead): the
    gateway's own histograms do it in one call, under the one lock they share."""
    second = histogram if second_histogram is None else second_histogram
    if (
        isinstance(histogram, CumulativeHistogram)
        and isinstance(second, CumulativeHistogram)
        and histogram.lock is second.lock
    ):
        if second is histogram:
            return histogram.record_pair
        return functools.partial(histogram.record_pair, second_histogram=second)

    def record_pair(
        first: float,
        first_attributes: AttributeSet,
        second_amount: float,
        second_attributes: AttributeSet,
    ) -> None:
        histogram.record(first, first_attributes)
        second.record(second_amount, second_attributes)

    return record_pair


class Instruments:
    """Every instrument, created once per meter.

    Histograms come from `histograms` when given (the gateway's own aggregation, see
    `service.telemetry.histograms`), else from `meter`.
    """

    def __init__(
        self,
        meter: metrics.Meter,
        *,
        in_flight: Callable[[], int],
        cache_counters: Callable[[], Mapping[str, int]] = dict,
        store_writes: Callable[[], Mapping[str, StoreWrites]] = dict,
        histograms: HistogramExport | None = None,
    ) -> None:
        def histogram(
            name: str, *, unit: str, description: str, bounds: Sequence[float]
        ) -> HistogramInstrument:
            if histograms is not None:
                return histograms.create(name, unit=unit, description=description, bounds=bounds)
            return meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=bounds
            )

        self.operation_duration = histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of one upstream GenAI operation (one attempt)",
            bounds=DURATION_BUCKETS_S,
        )
        self.token_usage = histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per upstream operation",
            bounds=TOKEN_BUCKETS,
        )
        self.record_tokens = _pair_recorder(self.token_usage)
        self.time_to_first_chunk = histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time from the upstream request to its first streamed chunk",
            bounds=DURATION_BUCKETS_S,
        )
        # Counters bumped on every call are tallied in plain dicts (see `Tally`).
        self.requests = Tally((RPC_METHOD, RPC_GRPC_STATUS_CODE))
        meter.create_observable_counter(
            "llm_gateway.requests",
            callbacks=[self.requests.observe],
            unit="{request}",
            description="RPCs finished, by method and gRPC status code",
        )
        # A batch's items, each its own outcome: its RPC ends OK whatever they ended with.
        self.batch_items = Tally((RPC_GRPC_STATUS_CODE, GEN_AI_REQUEST_MODEL, TENANT))
        meter.create_observable_counter(
            "llm_gateway.batch.items",
            callbacks=[self.batch_items.observe],
            unit="{item}",
            description="CompleteBatch items finished, by gRPC status code, model and tenant",
        )
        self.rpc_duration = histogram(
            "llm_gateway.rpc.duration",
            unit="s",
            description="Whole RPC duration as the gateway saw it",
            bounds=DURATION_BUCKETS_S,
        )
        self.overhead = histogram(
            "llm_gateway.overhead.duration",
            unit="s",
            description="Time of an RPC not spent waiting on an upstream",
            bounds=OVERHEAD_BUCKETS_S,
        )
        # An RPC's end records both: `record_rpc(duration, by_status, overhead, by_method)`.
        self.record_rpc = _pair_recorder(self.rpc_duration, self.overhead)

        # Observed at collection time: nothing is recorded on the request path.
        def observe_in_flight(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return (metrics.Observation(in_flight()),)

        self.in_flight = meter.create_observable_up_down_counter(
            "llm_gateway.rpc.in_flight",
            callbacks=[observe_in_flight],
            unit="{call}",
            description="RPCs in progress",
        )
        # "{USD}": an annotation, not a UCUM unit, so Prometheus names it
        # llm_gateway_cost_usd_total rather than appending a unit suffix.
        self.cost = Tally((TENANT, GEN_AI_REQUEST_MODEL))
        meter.create_observable_counter(
            "llm_gateway.cost.usd",
            callbacks=[self.cost.observe],
            unit="{USD}",
            description="USD charged, by tenant and model",
        )
        self.cache_hits = Tally((GEN_AI_REQUEST_MODEL,))
        meter.create_observable_counter(
            "llm_gateway.cache.hits",
            callbacks=[self.cache_hits.observe],
            unit="{hit}",
            description="Answers served from the cache",
        )
        self.retries = meter.create_counter(
            "llm_gateway.retries", unit="{retry}", description="Upstream attempts retried"
        )
        self.upstream_errors = meter.create_counter(
            "llm_gateway.upstream.errors",
            unit="{error}",
            description="Failed upstream attempts, by upstream and error.type",
        )
        # "{state}", not "1": an OpenTelemetry Collector's Prometheus exporter names a
        # gauge of unit "1" ..._ratio, and the dashboard queries this name as it is.
        self.breaker_state = meter.create_gauge(
            "llm_gateway.upstream.breaker.state",
            unit="{state}",
            description=(
                "Circuit breaker state per upstream, and per model there "
                "(llm_gateway.upstream.model): 0 closed, 1 half-open, 2 open"
            ),
        )
        self.attempts = Tally((UPSTREAM, OUTCOME))
        meter.create_observable_counter(
            "llm_gateway.upstream.attempts",
            callbacks=[self.attempts.observe],
            unit="{attempt}",
            description="Upstream attempts, by upstream and outcome (success, failure, or "
            "cancelled: cut by the caller)",
        )

        # Writes a shared store (Redis) did not take when they were made, read at
        # collection time: an operator alerts on these, as GetUsage misses such rows.
        def observe_writes(
            figure: Callable[[StoreWrites], int],
        ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
            def callback(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                return [
                    metrics.Observation(figure(writes), {STORE: store})
                    for store, writes in store_writes().items()
                ]

            return callback

        self.store_writes_waiting = meter.create_observable_up_down_counter(
            "llm_gateway.store.writes_waiting",
            callbacks=[observe_writes(lambda writes: writes.waiting)],
            unit="{write}",
            description="Writes (usage rows, lease releases) waiting for a shared store to take",
        )
        self.store_writes_abandoned = meter.create_observable_counter(
            "llm_gateway.store.writes_abandoned",
            callbacks=[observe_writes(lambda writes: writes.abandoned)],
            unit="{write}",
            description="Writes given up: refused for good, expired, crowded out or at shutdown",
        )

        # The response cache's own counters (`CacheStats`), read at collection time.
        def observe(
            *pairs: tuple[str, dict[str, str]],
        ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
            def callback(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                counters = cache_counters()
                return [
                    metrics.Observation(counters[name], labels)
                    for name, labels in pairs
                    if name in counters
                ]

            return callback

        self.cache_lookups = meter.create_observable_counter(
            "llm_gateway.cache.lookups",
            callbacks=[
                observe(
                    ("hits", {CACHE_RESULT: "hit"}),
                    ("misses", {CACHE_RESULT: "miss"}),
                    ("coalesced", {CACHE_RESULT: "coalesced"}),
                )
            ],
            unit="{lookup}",
            description="Cache lookups by result: hit, miss, or coalesced onto an identical call",
        )
        self.cache_errors = meter.create_observable_counter(
            "llm_gateway.cache.errors",
            callbacks=[observe(("errors", {}))],
            unit="{error}",
            description="Cache store operations that failed or timed out",
        )
        self.cache_io = meter.create_observable_counter(
            "llm_gateway.cache.io",
            callbacks=[
                observe(
                    ("bytes_read", {CACHE_DIRECTION: "read"}),
                    ("bytes_written", {CACHE_DIRECTION: "written"}),
                )
            ],
            unit="By",
            description="Encoded cache entry bytes read from and written to the store",
        )
