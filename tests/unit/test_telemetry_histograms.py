"""The gateway's histograms against the SDK's: the same points reach the same readers."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from service.config import TelemetryConfig
from service.telemetry import Telemetry
from service.telemetry.histograms import (
    MOST_ATTRIBUTE_SETS,
    AttributeSet,
    HistogramExport,
    suits,
)

RESOURCE = Resource.create({"service.name": "llm-gateway-test"})
BOUNDS = (0.01, 0.1, 1.0, 10.0)
# On the bounds, between them, past the last, zero, and amounts the SDK drops.
AMOUNTS = (0.0, 0.01, 0.05, 0.1, 1.0, 3.0, 10.0, 11.0, 1e9, -1.0, math.inf, math.nan)
ATTRIBUTE_SETS: tuple[dict[str, Any], ...] = (
    {"gen_ai.request.model": "m", "server.address": "a"},
    {"server.address": "a", "gen_ai.request.model": "m"},  # the same set, other order
    {"gen_ai.request.model": "m", "server.address": "b", "attempt": 2},
    {},
)


def points(data: MetricsData | None, name: str) -> dict[frozenset[Any], Any]:
    """`name`'s points by attribute set, with the metric they came in."""
    found: dict[frozenset[Any], Any] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[frozenset(point.attributes.items())] = (scope, metric, point)
    return found


@pytest.mark.parametrize("prepared", ["no", "all", "every other"])
def test_the_points_are_those_the_sdks_cumulative_histogram_exports(prepared: str):
    """Attributes given as a dict or as an `AttributeSet` (its key built once) count in
    the same point, as the SDK counts them."""
    sdk_reader = InMemoryMetricReader()
    sdk_meter = MeterProvider([sdk_reader], resource=RESOURCE).get_meter("llm_gateway")
    sdk_histogram = sdk_meter.create_histogram(
        "d", unit="s", description="a duration", explicit_bucket_boundaries_advisory=BOUNDS
    )
    reader = InMemoryMetricReader()
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    ours = export.create("d", unit="s", description="a duration", bounds=BOUNDS)
    for attributes in ATTRIBUTE_SETS:
        for position, amount in enumerate(AMOUNTS):
            given: Mapping[str, Any] = attributes
            if prepared == "all" or (prepared == "every other" and position % 2):
                given = AttributeSet(attributes)
            sdk_histogram.record(amount, given)
            ours.record(amount, given)
    expected = points(sdk_reader.get_metrics_data(), "d")
    collected = reader.get_metrics_data()
    got = points(collected, "d")
    assert got.keys() == expected.keys()
    assert len(got) == 3
    for key, (scope, metric, point) in got.items():
        sdk_scope, sdk_metric, sdk_point = expected[key]
        assert scope.scope == sdk_scope.scope
        assert (metric.name, metric.unit, metric.description) == ("d", "s", "a duration")
        assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
        assert metric.data.aggregation_temporality is sdk_metric.data.aggregation_temporality
        assert (point.count, point.sum, point.min, point.max) == (
            sdk_point.count,
            sdk_point.sum,
            sdk_point.min,
            sdk_point.max,
        )
        assert tuple(point.bucket_counts) == tuple(sdk_point.bucket_counts)
        assert tuple(point.explicit_bounds) == tuple(sdk_point.explicit_bounds)
        assert point.start_time_unix_nano <= point.time_unix_nano
    assert collected is not None
    assert collected.resource_metrics[0].resource == RESOURCE
    assert encode_metrics(collected).resource_metrics  # what an OTLP exporter sends


def test_they_join_the_gateways_scope_next_to_the_sdks_instruments():
    reader = InMemoryMetricReader()
    meter = MeterProvider([reader], resource=RESOURCE).get_meter("llm_gateway")
    meter.create_counter("c").add(1)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    export.create("d", unit="s", description="", bounds=BOUNDS).record(0.5)
    data = reader.get_metrics_data()
    assert data is not None
    [resource] = data.resource_metrics
    [scope] = resource.scope_metrics
    assert scope.scope.name == "llm_gateway"
    assert sorted(metric.name for metric in scope.metrics) == ["c", "d"]


def test_nothing_is_added_before_the_first_record():
    reader = InMemoryMetricReader()
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    export.create("d", unit="s", description="", bounds=BOUNDS)
    assert reader.get_metrics_data() is None


def test_records_from_many_threads_during_collections_are_all_counted():
    reader = InMemoryMetricReader()
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    histogram = export.create("d", unit="s", description="", bounds=BOUNDS)

    def record() -> None:
        for i in range(5000):
            histogram.record(i / 1000, {"k": i % 3})

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        reader.get_metrics_data()
    for thread in threads:
        thread.join()
    found = points(reader.get_metrics_data(), "d")
    assert sum(point.count for _, _, point in found.values()) == 20_000
    assert sum(sum(point.bucket_counts) for _, _, point in found.values()) == 20_000


def test_a_reader_wanting_delta_histograms_gets_the_sdks():
    delta = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    assert not suits(delta)
    assert suits(InMemoryMetricReader())
    telemetry = Telemetry.from_config(TelemetryConfig(), environ={}, metric_readers=[delta])
    assert telemetry.providers.histograms is None
    telemetry.instruments.rpc_duration.record(0.2, {"rpc.method": "Complete"})
    [(_, metric, point)] = points(delta.get_metrics_data(), "llm_gateway.rpc.duration").values()
    assert metric.data.aggregation_temporality is AggregationTemporality.DELTA
    assert point.count == 1
    telemetry.providers.shutdown()


def test_an_sdk_whose_internals_moved_keeps_its_own_histograms(monkeypatch):
    """Should an SDK release move the internals `suits` and `install` read, the SDK's own
    histograms are used: slower, but every point is still exported."""
    from opentelemetry.sdk.metrics._internal import instrument

    monkeypatch.delattr(instrument, "_Histogram")
    reader = InMemoryMetricReader()
    assert not suits(reader)
    telemetry = Telemetry.from_config(TelemetryConfig(), environ={}, metric_readers=[reader])
    assert telemetry.providers.histograms is None
    telemetry.instruments.overhead.record(0.003, {"rpc.method": "Complete"})
    [(_, metric, point)] = points(
        reader.get_metrics_data(), "llm_gateway.overhead.duration"
    ).values()
    assert (metric.unit, point.count, point.sum) == ("s", 1, 0.003)
    telemetry.providers.shutdown()


def test_exemplars_asked_for_keep_the_sdks_histograms():
    telemetry = Telemetry.from_config(
        TelemetryConfig(),
        environ={"OTEL_METRICS_EXEMPLAR_FILTER": "always_on"},
        metric_readers=[InMemoryMetricReader()],
    )
    assert telemetry.providers.histograms is None
    telemetry.providers.shutdown()


def test_by_default_the_gateway_records_its_own():
    reader = InMemoryMetricReader()
    telemetry = Telemetry.from_config(TelemetryConfig(), environ={}, metric_readers=[reader])
    assert telemetry.providers.histograms is not None
    telemetry.instruments.overhead.record(0.003, {"rpc.method": "Complete"})
    [(_, metric, point)] = points(
        reader.get_metrics_data(), "llm_gateway.overhead.duration"
    ).values()
    assert (metric.unit, point.count, point.sum) == ("s", 1, 0.003)
    assert point.explicit_bounds[0] == 0.0005
    telemetry.providers.shutdown()


def test_attribute_sets_past_the_limit_go_to_one_overflow_point_as_in_the_sdk():
    """A label an upstream controls cannot grow a histogram forever: past 2,000 attribute
    sets, new ones are counted in one `otel.metric.overflow` point, as the SDK counts them."""
    sdk_reader = InMemoryMetricReader()
    sdk_meter = MeterProvider([sdk_reader], resource=RESOURCE).get_meter("llm_gateway")
    sdk_histogram = sdk_meter.create_histogram(
        "d", unit="s", explicit_bucket_boundaries_advisory=BOUNDS
    )
    reader = InMemoryMetricReader()
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    ours = export.create("d", unit="s", description="", bounds=BOUNDS)
    for model in range(MOST_ATTRIBUTE_SETS + 5):
        for histogram in (ours, sdk_histogram):
            histogram.record(0.5, {"gen_ai.response.model": f"m{model}"})
    ours.record(0.5, {"gen_ai.response.model": "m0"})  # a set it has still counts alone
    sdk_histogram.record(0.5, {"gen_ai.response.model": "m0"})
    got = points(reader.get_metrics_data(), "d")
    expected = points(sdk_reader.get_metrics_data(), "d")
    assert len(got) == MOST_ATTRIBUTE_SETS + 1
    assert got.keys() == expected.keys()
    overflow = frozenset({("otel.metric.overflow", True)})
    assert got[overflow][2].count == expected[overflow][2].count == 5
    assert got[frozenset({("gen_ai.response.model", "m0")})][2].count == 2


def test_a_prometheus_scrape_reads_the_same_as_with_the_sdks_histograms():
    """The Prometheus endpoint (`telemetry.prometheus_port`) serves the gateway's
    histograms exactly as it served the SDK's: the same bucket, sum and count lines."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    def scrape(record: Any, registry: CollectorRegistry) -> list[str]:
        record()
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if line.startswith("d_seconds"))

    sdk_registry = CollectorRegistry()
    sdk_meter = MeterProvider(
        [PrometheusMetricReader(registry=sdk_registry)], resource=RESOURCE
    ).get_meter("llm_gateway")
    sdk_histogram = sdk_meter.create_histogram(
        "d", unit="s", description="a duration", explicit_bucket_boundaries_advisory=BOUNDS
    )
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    ours = export.create("d", unit="s", description="a duration", bounds=BOUNDS)

    def record_into(histogram: Any) -> Any:
        def record() -> None:
            for attributes in ATTRIBUTE_SETS:
                for amount in AMOUNTS:
                    histogram.record(amount, attributes)

        return record

    expected = scrape(record_into(sdk_histogram), sdk_registry)
    assert any("_bucket" in line for line in expected)
    assert scrape(record_into(ours), registry) == expected
