"""Two amounts recorded in one call (an upstream call's input and output tokens) count
exactly as two records do, in the gateway's histograms and through the SDK's."""

from __future__ import annotations

import itertools

from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from service.telemetry.histograms import MOST_ATTRIBUTE_SETS, AttributeSet, HistogramExport
from service.telemetry.metrics import DURATION_BUCKETS_S, OVERHEAD_BUCKETS_S, Instruments
from tests.unit.test_telemetry_histograms import AMOUNTS, BOUNDS, RESOURCE, points

INPUT = AttributeSet({"gen_ai.token.type": "input", "gen_ai.request.model": "m"})
OUTPUT = AttributeSet({"gen_ai.token.type": "output", "gen_ai.request.model": "m"})


def two_histograms() -> tuple[InMemoryMetricReader, HistogramExport]:
    """A reader collecting the histograms the returned export creates."""
    reader = InMemoryMetricReader()
    MeterProvider([reader], resource=RESOURCE)
    export = HistogramExport(InstrumentationScope("llm_gateway"), RESOURCE)
    export.install(reader)
    return reader, export


def test_a_pair_counts_as_two_records_with_dropped_amounts_and_overflow():
    """Every pair of amounts (those the SDK drops too) under two sets, then past the
    limit on attribute sets: the same points as recorded one at a time."""
    pair_reader, pair_export = two_histograms()
    paired = pair_export.create("t", unit="{token}", description="", bounds=BOUNDS)
    one_reader, one_export = two_histograms()
    single = one_export.create("t", unit="{token}", description="", bounds=BOUNDS)
    for first, second in itertools.product(AMOUNTS, repeat=2):
        paired.record_pair(first, INPUT, second, OUTPUT)
        single.record(first, INPUT)
        single.record(second, OUTPUT)
    for model in range(MOST_ATTRIBUTE_SETS + 3):
        first_set = AttributeSet({"gen_ai.response.model": f"m{model}", "type": "input"})
        second_set = AttributeSet({"gen_ai.response.model": f"m{model}", "type": "output"})
        paired.record_pair(1.0, first_set, 2.0, second_set)
        single.record(1.0, first_set)
        single.record(2.0, second_set)
    got = points(pair_reader.get_metrics_data(), "t")
    expected = points(one_reader.get_metrics_data(), "t")
    assert got.keys() == expected.keys()
    assert frozenset({("otel.metric.overflow", True)}) in got
    for key, (_, _, point) in got.items():
        want = expected[key][2]
        assert (point.count, point.sum, point.min, point.max) == (
            want.count,
            want.sum,
            want.min,
            want.max,
        )
        assert tuple(point.bucket_counts) == tuple(want.bucket_counts)


def test_the_sdks_histogram_takes_a_pair_as_two_records():
    """Where the SDK's histograms are used (a reader wanting delta points, exemplars),
    `record_tokens` records both amounts into its token histogram."""
    reader = InMemoryMetricReader()
    meter = MeterProvider([reader], resource=RESOURCE).get_meter("llm_gateway")
    instruments = Instruments(meter, in_flight=lambda: 0)
    instruments.record_tokens(3, INPUT, 5, OUTPUT)
    got = points(reader.get_metrics_data(), "gen_ai.client.token.usage")
    assert {key: point.sum for key, (_, _, point) in got.items()} == {
        INPUT.key: 3,
        OUTPUT.key: 5,
    }


BY_STATUS = AttributeSet({"rpc.method": "Complete", "rpc.grpc.status_code": 0})
BY_METHOD = AttributeSet({"rpc.method": "Complete"})


def test_a_pair_into_two_histograms_counts_as_a_record_in_each():
    """An RPC's duration and overhead, recorded in one call (`record_rpc`) into the two
    histograms one export made: the points two separate records give, each amount in
    its own histogram (those the SDK drops dropped)."""
    pair_reader, pair_export = two_histograms()
    instruments = Instruments(NoOpMeter("x"), in_flight=lambda: 0, histograms=pair_export)
    one_reader, one_export = two_histograms()
    duration = one_export.create(
        "llm_gateway.rpc.duration", unit="s", description="", bounds=DURATION_BUCKETS_S
    )
    overhead = one_export.create(
        "llm_gateway.overhead.duration", unit="s", description="", bounds=OVERHEAD_BUCKETS_S
    )
    for first, second in itertools.product(AMOUNTS, repeat=2):
        instruments.record_rpc(first, BY_STATUS, second, BY_METHOD)
        duration.record(first, BY_STATUS)
        overhead.record(second, BY_METHOD)
    for name in ("llm_gateway.rpc.duration", "llm_gateway.overhead.duration"):
        got = points(pair_reader.get_metrics_data(), name)
        expected = points(one_reader.get_metrics_data(), name)
        assert got.keys() == expected.keys()
        for key, (_, _, point) in got.items():
            want = expected[key][2]
            assert (point.count, point.sum, point.min, point.max) == (
                want.count,
                want.sum,
                want.min,
                want.max,
            )
            assert tuple(point.bucket_counts) == tuple(want.bucket_counts)


def test_the_sdks_histograms_take_an_rpcs_pair_as_a_record_in_each():
    """Where the SDK's histograms are used, `record_rpc` records the duration into one
    and the overhead into the other."""
    reader = InMemoryMetricReader()
    meter = MeterProvider([reader], resource=RESOURCE).get_meter("llm_gateway")
    Instruments(meter, in_flight=lambda: 0).record_rpc(0.25, BY_STATUS, 0.125, BY_METHOD)
    data = reader.get_metrics_data()
    duration = points(data, "llm_gateway.rpc.duration")
    overhead = points(data, "llm_gateway.overhead.duration")
    assert {key: point.sum for key, (_, _, point) in duration.items()} == {BY_STATUS.key: 0.25}
    assert {key: point.sum for key, (_, _, point) in overhead.items()} == {BY_METHOD.key: 0.125}
