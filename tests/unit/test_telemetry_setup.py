"""Exporter selection from OTEL_* variables, and the hooks other modules call."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import service.telemetry
from service.config import TelemetryConfig
from service.telemetry import Telemetry, TelemetrySetupError, activate, active
from service.telemetry.outages import WatchedSpanExporter
from service.telemetry.setup import (
    build_providers,
    metric_readers,
    service_resource,
    span_exporters,
)
from tests.telemetry_support import captured_telemetry


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, [ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, [GrpcSpanExporter]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            [HttpSpanExporter],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp,console",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            [GrpcSpanExporter, ConsoleSpanExporter],
        ),
    ],
)
def test_span_exporters_follow_otel_traces_exporter(environ, expected):
    """Each OTEL_TRACES_EXPORTER value builds its exporter; the default exports nothing."""
    exporters = span_exporters(environ)
    built = [e.exporter if isinstance(e, WatchedSpanExporter) else e for e in exporters]
    assert [type(e) for e in built] == expected
    # Each OTLP exporter is watched: its failures logged as a few lines (test_telemetry_outages).
    assert [isinstance(e, WatchedSpanExporter) for e in exporters] == [
        t is not ConsoleSpanExporter for t in expected
    ]
    for exporter in exporters:
        exporter.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    ],
)
def test_unknown_exporters_are_refused_at_startup(environ):
    """An exporter or protocol this gateway cannot build is a startup error, not a silent drop."""
    with pytest.raises(TelemetrySetupError):
        span_exporters(environ)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, grpc.Compression.NoCompression),
        ("none", grpc.Compression.NoCompression),
        (" GZIP ", grpc.Compression.Gzip),
        ("deflate", grpc.Compression.Deflate),
    ],
)
def test_otlp_grpc_exporters_take_every_compression(value, expected, monkeypatch):
    """`none` and `deflate` build the gRPC exporters as `gzip` does. Before, the exporter
    raised on anything but `gzip`, and the start failed with its traceback."""
    environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"}
    if value is not None:
        environ["OTEL_EXPORTER_OTLP_COMPRESSION"] = value
    for name, setting in environ.items():
        monkeypatch.setenv(name, setting)  # the exporters read the process's environment
    (span_exporter,) = span_exporters(environ)
    readers, _ = metric_readers(environ)
    try:
        assert span_exporter.exporter._compression is expected
        assert [r._exporter.exporter._compression for r in readers] == [expected]
    finally:
        span_exporter.shutdown()
        for reader in readers:
            reader.shutdown()


def test_metric_readers_follow_otel_metrics_exporter():
    """console and otlp become periodic readers; prometheus is flagged for the endpoint."""
    readers, wants_prometheus = metric_readers({"OTEL_METRICS_EXPORTER": "console,prometheus"})
    assert [type(r) for r in readers] == [PeriodicExportingMetricReader]
    assert wants_prometheus
    for reader in readers:
        reader.shutdown()
    assert metric_readers({}) == ([], False)


def test_nothing_configured_means_no_op_providers():
    """With no exporter and nothing injected, the no-op tracer and meter are used."""
    providers = build_providers(TelemetryConfig(), environ={})
    assert isinstance(providers.tracer, trace.NoOpTracer)
    assert not providers.is_recording


@pytest.mark.parametrize(
    ("config", "environ"),
    [
        (TelemetryConfig(enabled=False), {"OTEL_TRACES_EXPORTER": "console"}),
        (TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}),
    ],
)
def test_disabled_telemetry_ignores_exporters(config, environ):
    """enabled: false or OTEL_SDK_DISABLED turns everything off whatever else is set."""
    assert not build_providers(config, environ=environ).is_recording


class _Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "llm-gateway"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"}, "llm-gateway"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=ml,service.name=billing%20gw"}, "billing gw"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=first,team=ml,service.name=last"}, "last"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=first, service.name = "}, "llm-gateway"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing", "OTEL_SERVICE_NAME": "edge"},
            "edge",
        ),
    ],
)
def test_the_environments_service_name_wins_over_the_configs(monkeypatch, environ, expected):
    """As in the SDK: OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES' last service.name,
    else the config's `telemetry.service_name`."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)  # the SDK's resource detector reads os.environ too
    providers = build_providers(
        TelemetryConfig(), environ=environ, span_processors=[SimpleSpanProcessor(_Drop())]
    )
    assert providers.tracer_provider is not None
    assert providers.tracer_provider.resource.attributes["service.name"] == expected
    providers.shutdown()


@pytest.mark.parametrize(
    ("worker", "expected"),
    [(None, ("pod-a", None)), (0, ("pod-a-worker-0", 0)), (3, ("pod-a-worker-3", 3))],
)
def test_a_workers_resource_names_it_beside_the_operators_instance_id(
    monkeypatch, worker, expected
):
    """Under an operator's `service.instance.id`, a worker of `--workers N` exports as
    `<id>-worker-<index>` with `llm_gateway.worker`; a single process keeps the id as it
    is. The operator's other attributes stay."""
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pod-a,team=ml"}
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", environ["OTEL_RESOURCE_ATTRIBUTES"])
    resource = service_resource(TelemetryConfig(), environ, worker=worker)
    attributes = resource.attributes
    assert (attributes["service.instance.id"], attributes.get("llm_gateway.worker")) == expected
    assert (attributes["service.name"], attributes["team"]) == ("llm-gateway", "ml")


def test_hooks_reach_the_active_telemetry():
    """record_retry, record_cache_hit, record_upstream_error and set_breaker_state are counted."""
    captured = captured_telemetry()
    previous = activate(captured.telemetry)
    try:
        assert active() is captured.telemetry
        service.telemetry.record_retry("up1", wait_s=0.25)
        service.telemetry.record_retry("up1")
        service.telemetry.record_cache_hit(model="m")
        service.telemetry.record_upstream_error("up1", "503")
        service.telemetry.set_breaker_state("up1", "open")
    finally:
        activate(previous)
    assert captured.total("llm_gateway.retries", llm_gateway__upstream="up1") == 2
    assert captured.total("llm_gateway.cache.hits") == 1
    assert captured.total("llm_gateway.upstream.errors", error__type="503") == 1
    assert captured.total("llm_gateway.upstream.breaker.state", llm_gateway__upstream="up1") == 2


def test_hooks_are_harmless_without_telemetry():
    """With the default no-op telemetry the hooks do nothing and raise nothing."""
    previous = activate(Telemetry.disabled())
    try:
        service.telemetry.record_retry("up0", wait_s=1.0)
        service.telemetry.set_breaker_state("up0", "half_open")
        assert not active().providers.is_recording
    finally:
        activate(previous)


def test_public_surface():
    """The telemetry package exports exactly the hook interface, all importable."""
    assert sorted(service.telemetry.__all__) == [
        "AttemptSpan",
        "OVERHEAD_TRAILER",
        "RpcScope",
        "Telemetry",
        "TelemetrySetupError",
        "activate",
        "active",
        "add_rpc_queued_ms",
        "mark_multi_call_rpc",
        "ms_since_rpc_start",
        "record_cache_hit",
        "record_retry",
        "record_upstream_error",
        "rpc_queued_ms",
        "set_breaker_state",
    ]
    assert all(hasattr(service.telemetry, name) for name in service.telemetry.__all__)
