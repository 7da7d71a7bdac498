"""In-process telemetry for tests: an in-memory span exporter and metric reader.

Both also copy what they catch into the secret grep's capture (`tests/secret_capture.py`):
every span as it ends, and every collection of metric data points, including a last
one when the reader shuts down and one for each reader still open when the grep runs
(`record_open_readers`). So a key that reached a span or metric attribute fails the grep.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.config import TelemetryConfig
from service.telemetry import Telemetry
from tests.secret_capture import record_emitted


class RecordingSpanExporter(InMemorySpanExporter):
    """Keeps finished spans in memory and copies each into the secret grep's capture.

    Every batch is also encoded as an OTLP exporter encodes it, so a span no collector
    could receive (an attribute value of a type OTLP lacks) fails the test that made it.
    """

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans)
        record_emitted(*(span.to_json(indent=None) for span in spans))
        return super().export(spans)


_OPEN_READERS: list[RecordingMetricReader] = []


class RecordingMetricReader(InMemoryMetricReader):
    """An in-memory metric reader that copies every collection into the capture."""

    def __init__(self) -> None:
        super().__init__()
        _OPEN_READERS.append(self)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        encode_metrics(metrics_data)  # as an OTLP exporter would: it must encode
        record_emitted(metrics_data.to_json(indent=None))
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Collect once more, so points measured after the test's last read are grepped."""
        with contextlib.suppress(ValueError):
            _OPEN_READERS.remove(self)
        self.collect(timeout_millis=timeout_millis)
        super().shutdown(timeout_millis, **kwargs)


def record_open_readers() -> int:
    """Collect every reader not shut down yet into the capture; returns how many."""
    readers = list(_OPEN_READERS)
    for reader in readers:
        reader.collect()
    return len(readers)


@dataclass
class Captured:
    """A telemetry object wired to in-memory sinks, and readers of what they caught."""

    telemetry: Telemetry
    exporter: RecordingSpanExporter
    reader: RecordingMetricReader

    def spans(self) -> list[ReadableSpan]:
        """Every finished span so far."""
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        """The one finished span called `name`."""
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    async def ended(self, name: str, *, timeout_s: float = 5.0) -> ReadableSpan:
        """The one span called `name`, once it has ended.

        A call that fails reaches the caller when its status is sent, which can be just
        before the server's span ends: wait for it rather than race it.
        """
        async with asyncio.timeout(timeout_s):
            while not any(s.name == name for s in self.spans()):
                await asyncio.sleep(0.005)
        return self.span(name)

    def points(self, metric: str) -> list[Any]:
        """The data points of `metric` collected now."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found

    def tokens(self) -> dict[tuple[str, bool], int]:
        """`gen_ai.client.token.usage` summed by token type and `llm_gateway.usage.estimated`."""
        sums: dict[tuple[str, bool], int] = {}
        for point in self.points("gen_ai.client.token.usage"):
            attributes = point.attributes
            key = (attributes["gen_ai.token.type"], attributes["llm_gateway.usage.estimated"])
            sums[key] = sums.get(key, 0) + int(point.sum)
        return sums

    def total(self, metric: str, **attributes: Any) -> float:
        """Sum (counters) or sum of values (histograms) of points matching `attributes`."""
        value = 0.0
        for point in self.points(metric):
            if all(point.attributes.get(k.replace("__", ".")) == v for k, v in attributes.items()):
                value += point.sum if hasattr(point, "sum") else point.value
        return value


def captured_telemetry(*, capture_content: bool = False) -> Captured:
    """Telemetry exporting synchronously to memory (no OTEL_* variables consulted)."""
    exporter = RecordingSpanExporter()
    reader = RecordingMetricReader()
    telemetry = Telemetry.from_config(
        TelemetryConfig(capture_content=capture_content),
        environ={},
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[reader],
    )
    return Captured(telemetry, exporter, reader)


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    """A span's attributes as a plain dict."""
    return dict(span.attributes or {})
