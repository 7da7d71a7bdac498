"""In-process telemetry for tests: an in-memory span exporter and metric reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.config import TelemetryConfig
from service.telemetry import Telemetry


@dataclass
class Captured:
    """A telemetry object wired to in-memory sinks, and readers of what they caught."""

    telemetry: Telemetry
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        """Every finished span so far."""
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        """The one finished span called `name`."""
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

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

    def total(self, metric: str, **attributes: Any) -> float:
        """Sum (counters) or sum of values (histograms) of points matching `attributes`."""
        value = 0.0
        for point in self.points(metric):
            if all(point.attributes.get(k.replace("__", ".")) == v for k, v in attributes.items()):
                value += point.sum if hasattr(point, "sum") else point.value
        return value


def captured_telemetry(*, capture_content: bool = False) -> Captured:
    """Telemetry exporting synchronously to memory (no OTEL_* variables consulted)."""
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
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
