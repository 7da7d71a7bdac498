"""The per-call counters kept in `Tally` export what synchronous SDK counters would."""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics.export import AggregationTemporality, Sum

from service.telemetry.metrics import Tally
from tests.telemetry_support import captured_telemetry


def test_tallied_counters_export_monotonic_cumulative_sums_per_attribute_set():
    """requests and attempts are monotonic cumulative Sums, one point per attribute set."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    for _ in range(3):
        telemetry.record_attempt("up1", is_success=True)
    telemetry.record_attempt("up1", is_success=False)
    telemetry.record_attempt("up2", is_success=True)
    data = captured.reader.get_metrics_data()
    assert data is not None
    [attempts] = [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "llm_gateway.upstream.attempts"
    ]
    assert isinstance(attempts.data, Sum)
    assert attempts.data.is_monotonic
    assert attempts.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    points = {
        (p.attributes["llm_gateway.upstream"], p.attributes["llm_gateway.outcome"]): p.value
        for p in attempts.data.data_points
    }
    assert points == {("up1", "success"): 3, ("up1", "failure"): 1, ("up2", "success"): 1}
    telemetry.record_attempt("up1", is_success=True)
    assert captured.total("llm_gateway.upstream.attempts", llm_gateway__outcome="success") == 5


def test_tally_observed_from_another_thread_while_adding_loses_nothing():
    """A reader thread observing while the loop thread adds never breaks or drops a count."""
    tally = Tally(("key",))
    stop = threading.Event()
    observed: list[int] = []

    def read() -> None:
        while not stop.is_set():
            observed.append(len(list(tally.observe(None))))  # type: ignore[arg-type]

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for index in range(20_000):
            tally.add(1, f"k{index % 500}")
    finally:
        stop.set()
        reader.join()
    totals = {o.attributes["key"]: o.value for o in tally.observe(None)}  # type: ignore[arg-type,index]
    assert len(totals) == 500
    assert sum(totals.values()) == 20_000
    assert observed  # the reader did run alongside
