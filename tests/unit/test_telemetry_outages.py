"""A collector outage costs the operator a line as it starts, one a minute while it lasts
and one as it ends, not the exporters' line for each retry and each lost batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from service.telemetry.outages import (
    COMPLAINT_CHARS,
    EXPORTER_LOGGERS,
    ExportWatch,
    WatchedMetricExporter,
    WatchedSpanExporter,
    exporter_secrets,
    install_exporter_log_filter,
    quotable_complaint,
)
from tests.fake_clock import FakeClock

GRPC_LOGGER, HTTP_TRACES_LOGGER, _ = EXPORTER_LOGGERS


class FlakyExporter(SpanExporter):
    """Fails (logging as the OTLP gRPC exporter does: a retry, then giving up) while
    `is_down`, else succeeds."""

    def __init__(self, logger: str = GRPC_LOGGER) -> None:
        self.is_down = True
        self.logger = logging.getLogger(logger)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.is_down:
            return SpanExportResult.SUCCESS
        self.logger.warning("Transient error %s encountered, retrying", "UNAVAILABLE")
        self.logger.error("Failed to export traces to %s", "127.0.0.1:9")
        return SpanExportResult.FAILURE


@pytest.fixture
def watched(caplog):
    """A flaky exporter behind a watch on a fake clock, the filter installed, INFO captured."""
    install_exporter_log_filter()
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    flaky = FlakyExporter()
    return flaky, WatchedSpanExporter(flaky, ExportWatch("traces", clock=clock.now)), clock


def events(caplog) -> list[tuple[str, str]]:
    return [(r.name, r.getMessage()) for r in caplog.records]


def test_an_outage_is_one_line_as_it_starts_however_many_exports_fail(watched, caplog):
    """Ten failed exports within a minute: one ERROR naming the signal and the exporter's
    first complaint; none of the exporters' own retries and failures."""
    _flaky, exporter, clock = watched
    for _ in range(10):
        assert exporter.export([]) is SpanExportResult.FAILURE
        clock.advance(5)
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == ("ERROR", "telemetry.export_failed")
    assert record.signal == "traces"
    assert record.error == "Transient error UNAVAILABLE encountered, retrying"


def test_a_lasting_outage_is_recalled_once_a_minute_with_the_count(watched, caplog):
    """While exports keep failing, one WARNING a minute says how many have failed."""
    _flaky, exporter, clock = watched
    for _ in range(25):  # 25 exports, 10 s apart: 4 minutes
        exporter.export([])
        clock.advance(10)
    failing = [r for r in caplog.records if r.getMessage() == "telemetry.export_still_failing"]
    assert [r.failed_exports for r in failing] == [7, 13, 19, 25]
    assert len(caplog.records) == 1 + 4


def test_the_first_export_that_succeeds_again_logs_the_recovery_once(watched, caplog):
    """The outage's end is one INFO line with the exports lost; then nothing, and a later
    outage is logged as a new one."""
    flaky, exporter, _clock = watched
    for _ in range(3):
        exporter.export([])
    flaky.is_down = False
    for _ in range(3):
        assert exporter.export([]) is SpanExportResult.SUCCESS
    flaky.is_down = True
    exporter.export([])
    assert [r.getMessage() for r in caplog.records] == [
        "telemetry.export_failed",
        "telemetry.export_recovered",
        "telemetry.export_failed",
    ]
    assert caplog.records[1].failed_exports == 3
    assert caplog.records[1].levelname == "INFO"


def test_exports_that_succeed_log_nothing(watched, caplog):
    """A healthy collector: no line at all."""
    flaky, exporter, _ = watched
    flaky.is_down = False
    for _ in range(5):
        exporter.export([])
    assert caplog.records == []


def test_exporter_lines_outside_an_export_are_left_as_they_are(watched, caplog):
    """What an exporter logs outside a watched export (a call after shutdown) still shows."""
    logging.getLogger(HTTP_TRACES_LOGGER).warning("Exporter already shutdown, ignoring call")
    assert events(caplog) == [(HTTP_TRACES_LOGGER, "Exporter already shutdown, ignoring call")]


def test_each_signal_has_its_own_outage_on_a_shared_logger(caplog):
    """Traces failing and metrics fine on gRPC's one logger: one failure line, for traces;
    the metrics' successes are no recovery."""
    install_exporter_log_filter()
    caplog.set_level(logging.INFO)
    traces = WatchedSpanExporter(FlakyExporter(), ExportWatch("traces"))

    class Healthy:
        _preferred_temporality = None
        _preferred_aggregation = None

        def export(self, metrics_data, timeout_millis=10_000, **kwargs):
            return MetricExportResult.SUCCESS

    metrics = WatchedMetricExporter(Healthy(), ExportWatch("metrics"))  # type: ignore[arg-type]
    for _ in range(3):
        traces.export([])
        assert metrics.export(None) is MetricExportResult.SUCCESS  # type: ignore[arg-type]
    assert [(r.getMessage(), r.signal) for r in caplog.records] == [
        ("telemetry.export_failed", "traces")
    ]


def test_a_complaint_is_one_bounded_line_without_the_export_headers():
    """The headers' values are redacted as written and as sent, and a token alone; a short
    value not beside its header's name is left (a status's digits with it); a long
    complaint is cut, its start kept."""
    environ = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok-0123456789,x-n=401",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "api-key = metrics-key-abcdef ",
    }
    secrets = exporter_secrets(environ)
    complaint = (
        "code: 401, reason: Bearer%20tok-0123456789 / Bearer tok-0123456789 /\n"
        "tok-0123456789 / metrics-key-abcdef"
    )
    assert quotable_complaint(complaint, secrets) == (
        "code: 401, reason: [redacted] / [redacted] / [redacted] / [redacted]"
    )
    long = quotable_complaint("code: 503 " + "x" * 1000, secrets)
    assert long.startswith("code: 503 ")
    assert len(long) == COMPLAINT_CHARS


_SHORT_HEADERS = {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=Zq7k2x,x-debug=1,x-on=on"}


@pytest.mark.parametrize(
    ("complaint", "quoted"),
    [
        # gRPC: the details quote the metadata as a dict.
        (
            "details: {'x-api-key': 'Zq7k2x', 'x-debug': '1'}",
            "details: {'x-api-key': '[redacted]', 'x-debug': '[redacted]'}",
        ),
        # HTTP: a reason phrase of `Name: value` pairs, the name in any case.
        (
            "code: 401, reason: X-Api-Key: Zq7k2x; X-Debug: 1",
            "code: 401, reason: X-Api-Key: [redacted]; X-Debug: [redacted]",
        ),
        ("x-api-key=Zq7k2x&x-debug=1", "x-api-key=[redacted]&x-debug=[redacted]"),
        ('no such key "Zq7k2x"', 'no such key "[redacted]"'),
        # Elsewhere a short value is a word of the text: statuses and ports keep their digits.
        (
            "127.0.0.1:4317 code: 401, turned on, Zq7k2x1",
            "127.0.0.1:4317 code: 401, turned on, Zq7k2x1",
        ),
        ("x-api-key: Zq7k2xy", "x-api-key: Zq7k2xy"),  # another value than the header's
    ],
)
def test_a_short_header_value_is_redacted_where_it_stands_as_the_headers(complaint, quoted):
    """A header value under 8 characters is redacted where it stands as its header's
    value (`name: value`, `name=value`, `'name': 'value'`) or quoted whole, and nowhere
    else: a value `1` or `on` takes no digit or word of the rest of the complaint."""
    assert quotable_complaint(complaint, exporter_secrets(_SHORT_HEADERS)) == quoted
