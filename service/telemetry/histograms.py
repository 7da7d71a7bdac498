"""Explicit-bucket histograms aggregated by the gateway and exported by the SDK's readers.

Why by hand: the SDK's `Histogram.record` builds a `Measurement`, cleans, sorts and
hashes its attributes and takes two locks, about 10 µs of CPU a record, and a call makes
five. Here a record is one dict lookup and a few additions under one lock. Each reader
then gets, with the rest of its collection, the points the SDK's own cumulative
aggregation would have given it: per attribute set the count, sum, min, max and bucket
counts since the first record, the bounds being the instrument's advisory ones.

Only cumulative points are built: when a reader wants delta histograms
(`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta`) or exemplars are asked for
(`OTEL_METRICS_EXEMPLAR_FILTER`), `setup` uses the SDK's histograms instead.

The readers are reached through `MetricReader._set_collect_callback`, the hook the
`MeterProvider` itself uses to hand each reader its collection; the SDK has no public
way to add points to a collection. The tests export through real readers, so a change
there fails them; and should an SDK release move those internals, `suits` finds them
missing and `setup` keeps the SDK's histograms: slower, never lost.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import DefaultAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import AttributeValue

_NO_ATTRIBUTES: frozenset[tuple[str, AttributeValue]] = frozenset()
# As the SDK: past this many attribute sets a histogram counts new ones in one overflow
# point, so a label an upstream controls (the model it answers as) cannot grow it forever.
MOST_ATTRIBUTE_SETS = 2000
_OVERFLOW_KEY: frozenset[tuple[str, AttributeValue]] = frozenset({("otel.metric.overflow", True)})


class AttributeSet(dict[str, AttributeValue]):
    """Attributes a call records often, with the key `CumulativeHistogram.record` would
    build from them built once: a dict, so the SDK's histograms take it as well.

    Not to be changed once made (the key would no longer match)."""

    __slots__ = ("key",)

    def __init__(self, attributes: Mapping[str, AttributeValue]) -> None:
        super().__init__(attributes)
        self.key = frozenset(self.items())


@dataclass(slots=True)
class _Point:
    """One attribute set's running figures."""

    start_time_unix_nano: int
    bucket_counts: list[int]
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf


class CumulativeHistogram:
    """A histogram instrument: `record` as the SDK's, points built when collected."""

    def __init__(
        self,
        name: str,
        *,
        unit: str,
        description: str,
        bounds: Sequence[float],
        lock: threading.Lock | None = None,
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = tuple(bounds)
        self._points: dict[frozenset[tuple[str, AttributeValue]], _Point] = {}
        # Collections run on the readers' threads. One histogram's `record_pair` records
        # into another under it when they share it (`HistogramExport.create`).
        self.lock = lock if lock is not None else threading.Lock()

    def record(self, amount: float, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        """Count `amount` for `attributes`; negative or non-finite amounts are dropped,
        as the SDK drops them."""
        if not 0 <= amount < math.inf:
            return
        if type(attributes) is AttributeSet:
            key = attributes.key
        else:
            key = frozenset(attributes.items()) if attributes else _NO_ATTRIBUTES
        with self.lock:
            # Indexed, not `get`: a call fewer a record; only an attribute set's first
            # record misses.
            try:
                point = self._points[key]
            except KeyError:
                point = self._new_point(key)
            point.count += 1
            point.sum += amount
            # Compared, not `min()`/`max()`: two calls fewer a record, ten a call.
            if amount < point.min:  # noqa: PLR1730
                point.min = amount
            if amount > point.max:  # noqa: PLR1730
                point.max = amount
            point.bucket_counts[bisect_left(self.bounds, amount)] += 1

    def record_pair(
        self,
        first: float,
        first_attributes: AttributeSet,
        second: float,
        second_attributes: AttributeSet,
        second_histogram: CumulativeHistogram | None = None,
    ) -> None:
        """`record(first, first_attributes)` then `record(second, second_attributes)`, in
        one call and under one lock: an upstream call's input and output tokens. Into
        `second_histogram`, when given, the second: one that shares this one's `lock`
        (an RPC's duration and overhead)."""
        other = self if second_histogram is None else second_histogram
        with self.lock:
            for histogram, amount, key in (
                (self, first, first_attributes.key),
                (other, second, second_attributes.key),
            ):
                if not 0 <= amount < math.inf:
                    continue
                try:
                    point = histogram._points[key]
                except KeyError:
                    point = histogram._new_point(key)
                point.count += 1
                point.sum += amount
                if amount < point.min:  # noqa: PLR1730
                    point.min = amount
                if amount > point.max:  # noqa: PLR1730
                    point.max = amount
                point.bucket_counts[bisect_left(histogram.bounds, amount)] += 1

    def _new_point(self, key: frozenset[tuple[str, AttributeValue]]) -> _Point:
        """The point of an attribute set recorded for the first time (with the lock held),
        or past `MOST_ATTRIBUTE_SETS` the overflow point."""
        if len(self._points) >= MOST_ATTRIBUTE_SETS:
            key = _OVERFLOW_KEY
            point = self._points.get(key)
            if point is not None:
                return point
        point = _Point(time_ns(), [0] * (len(self.bounds) + 1))
        self._points[key] = point
        return point

    def metric(self, now_unix_nano: int) -> Metric | None:
        """Every attribute set's point as of now, or None before the first record."""
        with self.lock:
            points = [
                HistogramDataPoint(
                    attributes=dict(key),
                    start_time_unix_nano=point.start_time_unix_nano,
                    time_unix_nano=now_unix_nano,
                    count=point.count,
                    sum=point.sum,
                    bucket_counts=tuple(point.bucket_counts),
                    explicit_bounds=self.bounds,
                    min=point.min,
                    max=point.max,
                    exemplars=[],
                )
                for key, point in self._points.items()
            ]
        if not points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class HistogramExport:
    """The gateway's histograms, added to every collection of the readers it is installed on."""

    def __init__(self, scope: InstrumentationScope, resource: Resource) -> None:
        self.scope = scope
        self.resource = resource
        self._histograms: list[CumulativeHistogram] = []
        # One lock for all of them: a call's records on two histograms take it once
        # (`CumulativeHistogram.record_pair`), and only collections contend for it.
        self._lock = threading.Lock()

    def create(
        self, name: str, *, unit: str, description: str, bounds: Sequence[float]
    ) -> CumulativeHistogram:
        """A new histogram, exported from now on."""
        histogram = CumulativeHistogram(
            name, unit=unit, description=description, bounds=bounds, lock=self._lock
        )
        self._histograms.append(histogram)
        return histogram

    def install(self, reader: MetricReader) -> None:
        """Make `reader`'s collections carry these histograms (after the `MeterProvider`
        has registered it)."""
        collect: Callable[..., MetricsData | None] = reader._collect  # type: ignore[assignment]

        def collect_with_histograms(
            metric_reader: MetricReader, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricsData | None:
            collected = collect(metric_reader, timeout_millis=timeout_millis, **kwargs)
            return self.added_to(collected)

        reader._set_collect_callback(collect_with_histograms)  # type: ignore[arg-type]

    def added_to(self, collected: MetricsData | None) -> MetricsData | None:
        """`collected` with this gateway's histogram points in its scope."""
        now = time_ns()
        metrics = [m for m in (h.metric(now) for h in self._histograms) if m is not None]
        if not metrics:
            return collected
        own = ScopeMetrics(
            scope=self.scope, metrics=metrics, schema_url=self.scope.schema_url or ""
        )
        if collected is None or not collected.resource_metrics:
            resource = ResourceMetrics(
                resource=self.resource, scope_metrics=[own], schema_url=self.resource.schema_url
            )
            return MetricsData(resource_metrics=[resource])
        # One provider, one resource: the first (and only) one gets the points.
        first, *others = collected.resource_metrics
        scopes = list(first.scope_metrics)
        for position, scope in enumerate(scopes):
            if scope.scope.name == self.scope.name:
                scopes[position] = ScopeMetrics(
                    scope=scope.scope,
                    metrics=[*scope.metrics, *metrics],
                    schema_url=scope.schema_url,
                )
                break
        else:
            scopes.append(own)
        first = ResourceMetrics(
            resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url
        )
        return MetricsData(resource_metrics=[first, *others])


def suits(reader: MetricReader) -> bool:
    """Whether `reader` takes histograms as these are built (cumulative, explicit buckets)
    and has the collection hook `HistogramExport.install` uses.

    Read from the reader's private tables, as the SDK's own storage reads them: its
    preferences (`preferred_temporality`, `preferred_aggregation`) are not kept publicly.
    An SDK whose internals moved does not suit: its own histograms are used instead.
    """
    try:
        from opentelemetry.sdk.metrics._internal.instrument import _Histogram

        temporality = reader._instrument_class_temporality[_Histogram]
        aggregation = reader._instrument_class_aggregation[_Histogram]
        hook = reader._set_collect_callback
    except (ImportError, AttributeError, KeyError):
        return False
    return (
        callable(hook)
        and hasattr(reader, "_collect")
        and temporality is AggregationTemporality.CUMULATIVE
        and isinstance(aggregation, DefaultAggregation)
    )
