"""Tracer and meter providers, with exporters chosen by the standard `OTEL_*` variables.

`OTEL_TRACES_EXPORTER` and `OTEL_METRICS_EXPORTER` take a comma list of `otlp`,
`console`, `prometheus` (metrics only) or `none`; both default to `none`, so nothing
leaves the process unless the operator asks. The OTLP protocol comes from
`OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`
(`grpc`, the default, or `http/protobuf`); endpoints, headers, timeouts and batching
(`OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`) are read by the
OpenTelemetry exporters themselves, once a timeout and a compression are checked here.
Spans leave through a `BatchSpanProcessor`, whose background thread does every export,
so a slow or unreachable collector never delays a call: it costs dropped spans and a
few log lines (`outages`), nothing more.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, ExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from service.config import ServerConfig, TelemetryConfig, listens_overlap
from service.hosts import listen_host_problem
from service.otel_context import unknown_context
from service.telemetry.histograms import HistogramExport, suits
from service.telemetry.lean_tracer import LeanTracer
from service.telemetry.otlp_tls import grpc_client_credentials, tls_file_problem
from service.telemetry.outages import (
    ExportWatch,
    WatchedMetricExporter,
    WatchedSpanExporter,
    exporter_secrets,
    install_exporter_log_filter,
    install_url_log_filter,
)
from service.telemetry.pairs import header_problem, resource_attribute_problem
from service.telemetry.propagation import default_propagator
from service.telemetry.sdk_import import span_limit_problem

log = logging.getLogger("llm_gateway.telemetry")

_GRPC = "grpc"
# Where the Prometheus endpoint listens when OTEL_METRICS_EXPORTER names it without a port.
DEFAULT_PROMETHEUS_PORT = 9464
_HTTP = "http/protobuf"


class TelemetrySetupError(Exception):
    """An `OTEL_*` variable names an exporter or protocol this gateway cannot build."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class MetricsListenError(OSError):
    """The Prometheus endpoint cannot listen on its address (taken, not this host's)."""


class MetricsHostError(MetricsListenError):
    """`prometheus_host` is none this machine can listen on (`listen_host_problem`). The
    config's fault, where a taken port is the machine's."""


def check_prometheus_host(config: TelemetryConfig, port: int) -> None:
    """Raise `MetricsHostError` when the endpoint cannot listen on `prometheus_host`,
    said as a listen on `port` (the start's, and `llm-gateway check`'s)."""
    problem = listen_host_problem(config.prometheus_host)
    if problem is not None:
        raise MetricsHostError(
            f"cannot listen on {config.prometheus_host}:{port} for Prometheus metrics: {problem}"
        )


def prometheus_port_problem(
    server: ServerConfig, host: str, port: int, *, endpoint: str = "the Prometheus endpoint"
) -> str | None:
    """Why `endpoint` cannot listen on `host:port` when `server.listen` or
    `server.health_listen` listens on that port at a shared address; else None. The
    endpoint opens first and takes the port, and the gateway's own listen then failed as
    if another program held the address (`check` said ok)."""
    for key, listen in (
        ("server.listen", server.listen),
        ("server.health_listen", server.health_listen),
    ):
        if listen is not None and listens_overlap(f"{host}:{port}", listen):
            return (
                f"{endpoint} would listen on {host}:{port}, the port {key} "
                f"{listen} listens on: give it another port"
            )
    return None


def prometheus_endpoint_port(config: TelemetryConfig, environ: Mapping[str, str]) -> int | None:
    """The port a start opens the Prometheus endpoint on (0: a free one); None for none."""
    if is_off(config, environ):
        return None
    if config.prometheus_port is not None:
        return config.prometheus_port
    return DEFAULT_PROMETHEUS_PORT if names_prometheus(environ) else None


def _names(environ: Mapping[str, str], key: str) -> list[str]:
    raw = environ.get(key, "none")
    return [n.strip().lower() for n in raw.split(",") if n.strip() and n.strip() != "none"]


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if variable not in environ:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, _GRPC).strip()
    if protocol not in (_GRPC, _HTTP):
        raise TelemetrySetupError(
            variable, f"OTLP protocol {protocol!r} is not one of grpc, http/protobuf"
        )
    return protocol


# The compressions the OTLP exporters take. The gRPC ones read only `gzip` themselves and
# raise on anything else, `none` and an empty variable included: they are given it.
_COMPRESSIONS = {
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
    "none": grpc.Compression.NoCompression,
}


def _otlp_setting(environ: Mapping[str, str], signal: str, name: str) -> tuple[str, str] | None:
    """The variable that sets the OTLP exporters' `name` (TIMEOUT, COMPRESSION) for
    `signal`, and its value: the signal's own, else the general one, as the exporters
    read them; None when neither is set."""
    for variable in (f"OTEL_EXPORTER_OTLP_{signal}_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        if variable in environ:
            return variable, environ[variable]
    return None


def _otlp_compression(environ: Mapping[str, str], signal: str) -> grpc.Compression:
    """The compression the OTLP exporter of `signal` is to use; raises
    `TelemetrySetupError` for one no exporter takes."""
    setting = _otlp_setting(environ, signal, "COMPRESSION")
    if setting is None:
        return grpc.Compression.NoCompression
    variable, value = setting
    compression = _COMPRESSIONS.get(value.strip().lower())
    if compression is None:
        raise TelemetrySetupError(
            variable, f"OTLP compression {value!r} is not one of gzip, deflate, none"
        )
    return compression


def _check_otlp_timeout(environ: Mapping[str, str], signal: str) -> None:
    """Raise `TelemetrySetupError` for an OTLP timeout that is no number of seconds above
    0: the gRPC exporters raise on one at start, the HTTP ones put 10 s in its place."""
    setting = _otlp_setting(environ, signal, "TIMEOUT")
    if setting is None:
        return
    variable, value = setting
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise TelemetrySetupError(
            variable, f"OTLP timeout {value!r} is not a number of seconds above 0"
        )


# The exporters each signal's `OTEL_<SIGNAL>_EXPORTER` may name.
_EXPORTERS = {"TRACES": ("console", "otlp"), "METRICS": ("console", "prometheus", "otlp")}

# The span batch's settings the SDK's `BatchSpanProcessor` refuses at or below 0, and
# its defaults (a value that is no whole number it logs, and takes the default for).
_BSP_QUEUE = "OTEL_BSP_MAX_QUEUE_SIZE"
_BSP_BATCH = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
_BSP_DEFAULTS = {_BSP_QUEUE: 2048, "OTEL_BSP_SCHEDULE_DELAY": 5000, _BSP_BATCH: 512}
# The span limits the SDK's `SpanLimits` reads: a whole number from 0, or empty (none).
_SPAN_LIMITS = (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
)


def _check_span_settings(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for an `OTEL_BSP_*` or span limit the SDK raises its
    ValueError for as the tracer is built: `serve` ended in a traceback (status 1) while
    `check` said ok. `OTEL_BSP_MAX_QUEUE_SIZE=256` alone is one: below the default batch."""
    sizes: dict[str, int] = {}
    for variable, default in _BSP_DEFAULTS.items():
        try:
            sizes[variable] = int(environ.get(variable, default))
        except ValueError:
            sizes[variable] = default
        if sizes[variable] <= 0:
            raise TelemetrySetupError(variable, f"{environ[variable]!r} is not a number above 0")
    if sizes[_BSP_BATCH] > sizes[_BSP_QUEUE]:
        variable = _BSP_BATCH if _BSP_BATCH in environ else _BSP_QUEUE
        raise TelemetrySetupError(
            variable,
            f"a span export batch of {sizes[_BSP_BATCH]} ({_BSP_BATCH}) cannot exceed the "
            f"queue of {sizes[_BSP_QUEUE]} ({_BSP_QUEUE})",
        )
    for variable in _SPAN_LIMITS:
        problem = span_limit_problem(environ.get(variable, ""))
        if problem is not None:
            raise TelemetrySetupError(variable, problem)


# The samplers the SDK's tracer provider takes by `OTEL_TRACES_SAMPLER` (in any case), and
# those of them that read a ratio from `OTEL_TRACES_SAMPLER_ARG` (1.0 when it is unset or
# empty). For any other name, or a ratio that is no number from 0 to 1, it logs a warning
# and samples every trace (opentelemetry-sdk 1.45).
_SAMPLER = "OTEL_TRACES_SAMPLER"
_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
_SAMPLERS = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "parentbased_traceidratio",
)
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")


def _check_sampler(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for a sampler name, or a ratio sampler's ratio, the SDK
    would put `parentbased_always_on` or 1.0 in the place of. An empty name is unset."""
    name = environ.get(_SAMPLER, "").lower()
    if name and name not in _SAMPLERS:
        raise TelemetrySetupError(
            _SAMPLER, f"{environ[_SAMPLER]!r} is not one of {', '.join(_SAMPLERS)}"
        )
    ratio = environ.get(_SAMPLER_ARG, "")
    if name not in _RATIO_SAMPLERS or not ratio.strip():
        return
    try:
        is_ratio = 0 <= float(ratio) <= 1
    except ValueError:
        is_ratio = False
    if not is_ratio:
        raise TelemetrySetupError(_SAMPLER_ARG, f"{ratio!r} is not a sampling ratio from 0 to 1")


def _provides(group: str, name: str) -> bool:
    """Whether an installed package provides `name` in the entry point `group`, where the
    SDK and its exporters look a component named by a variable up."""
    return bool(entry_points(group=group, name=name))


# The resource detectors the SDK runs as the resource is built, by entry point name (`*`:
# every one installed); it logs one no package provides as an error, with a traceback,
# and goes on without it and the attributes it was asked for.
_RESOURCE_DETECTORS = "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS"


def _check_resource_detectors(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for a resource detector no installed package provides."""
    for name in environ.get(_RESOURCE_DETECTORS, "").split(","):
        if name.strip() not in ("", "*") and not _provides(
            "opentelemetry_resource_detector", name.strip()
        ):
            raise TelemetrySetupError(
                _RESOURCE_DETECTORS,
                f"no installed package provides the resource detector {name.strip()!r}",
            )


# The meter provider OpenTelemetry's API builds, as its global one, the first time an SDK
# part asks for one (the tracer and span processor, the OTLP exporters, for their own
# metrics): by entry point name, raising StopIteration for one no package provides.
_METER_PROVIDER = "OTEL_PYTHON_METER_PROVIDER"


def _check_meter_provider(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for an `OTEL_PYTHON_METER_PROVIDER` no installed
    package provides: `serve` ended in a traceback (status 1) while `check` said ok."""
    name = environ.get(_METER_PROVIDER)
    if name is not None and not _provides("opentelemetry_meter_provider", name):
        raise TelemetrySetupError(
            _METER_PROVIDER, f"no installed package provides the meter provider {name!r}"
        )


# Read by each periodic metric reader (console and OTLP metrics), in milliseconds; one
# that is no number the SDK logs and takes its default for. An interval at or below 0 it
# raises its ValueError for; a timeout at or below 0 it takes, and then every collection
# times out on the gateway's gauges' callbacks: no metric ever left, and each interval
# logged a traceback.
_METRIC_READER_MILLIS = ("OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT")


def _check_metric_reader_millis(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for a periodic metric reader's interval or timeout that
    is a number of milliseconds at or below 0."""
    for variable in _METRIC_READER_MILLIS:
        try:
            millis = float(environ.get(variable, "nan"))
        except ValueError:
            continue
        if millis <= 0:
            raise TelemetrySetupError(
                variable, f"{environ[variable]!r} is not a number of milliseconds above 0"
            )


# The exemplar filters the SDK's `MeterProvider` takes by name, spelled exactly so.
_EXEMPLAR_FILTER = "OTEL_METRICS_EXEMPLAR_FILTER"
_EXEMPLAR_FILTERS = ("always_on", "always_off", "trace_based")


def _exemplar_filter(environ: Mapping[str, str]) -> ExemplarFilter | None:
    """The exemplar filter for the meter provider: None, for the SDK's own choice by
    `OTEL_METRICS_EXEMPLAR_FILTER`, when that is set; else always off, as exemplars cost
    a reservoir offer on every measurement. Raises `TelemetrySetupError` for a name the
    SDK raises its ValueError for as the provider is built."""
    name = environ.get(_EXEMPLAR_FILTER)
    if not name:
        return AlwaysOffExemplarFilter()
    if name not in _EXEMPLAR_FILTERS:
        raise TelemetrySetupError(
            _EXEMPLAR_FILTER, f"{name!r} is not one of {', '.join(_EXEMPLAR_FILTERS)}"
        )
    return None


# The status codes the gRPC OTLP exporters retry an export on: a comma list of
# `grpc.StatusCode` names in any case; a name that is none raises KeyError as one is built.
_RETRYABLE_CODES = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES"


def _check_retryable_codes(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for a name in the gRPC exporters' retryable codes that
    is no gRPC status code."""
    for code in environ.get(_RETRYABLE_CODES, "").split(","):
        if code.strip() and code.strip().upper() not in grpc.StatusCode.__members__:
            raise TelemetrySetupError(
                _RETRYABLE_CODES, f"{code.strip()!r} is not a gRPC status code name"
            )


def _check_credential_providers(environ: Mapping[str, str], signal: str, protocol: str) -> None:
    """Raise `TelemetrySetupError` for a credential provider the OTLP exporter of `signal`
    and `protocol` is told to load that no installed package provides: the exporter
    raises its RuntimeError for one as it is built (gRPC's when the endpoint is not
    insecure; such a name is refused here either way)."""
    kind = "GRPC" if protocol == _GRPC else "HTTP"
    for variable in (
        f"OTEL_PYTHON_EXPORTER_OTLP_{kind}_CREDENTIAL_PROVIDER",
        f"OTEL_PYTHON_EXPORTER_OTLP_{kind}_{signal}_CREDENTIAL_PROVIDER",
    ):
        name = environ.get(variable)
        if name and not _provides("opentelemetry_otlp_credential_provider", name):
            raise TelemetrySetupError(
                variable, f"no installed package provides the credential provider {name!r}"
            )


def _check_otlp_headers(environ: Mapping[str, str], signal: str) -> None:
    """Raise `TelemetrySetupError` for headers the OTLP exporter of `signal` would drop:
    it reads the signal's own variable, else (unset or empty) the general one."""
    own = f"OTEL_EXPORTER_OTLP_{signal}_HEADERS"
    variable = own if environ.get(own) else "OTEL_EXPORTER_OTLP_HEADERS"
    problem = header_problem(environ.get(variable, ""))
    if problem is not None:
        raise TelemetrySetupError(variable, problem)


def _check_otlp_endpoint(environ: Mapping[str, str], signal: str, protocol: str) -> None:
    """Raise `TelemetrySetupError` for an OTLP endpoint no export could reach, said without
    its text (it may hold a password): a port that is no number 0..65535 (the HTTP
    exporter logged "Failed to parse: URL" for each batch), or, over gRPC, a user or
    password, which gRPC reads as part of the host name: every export failed, and each
    outage was logged with the endpoint, password and all. The exporters read the
    signal's own variable, else (unset or empty) the general one."""
    own = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    variable = own if environ.get(own) else "OTEL_EXPORTER_OTLP_ENDPOINT"
    parts = urllib.parse.urlsplit(environ.get(variable, ""))
    try:
        parts.port  # noqa: B018  (raises ValueError when not a number 0..65535)
    except ValueError:
        raise TelemetrySetupError(
            variable, "the OTLP endpoint's port is no number 0..65535 (its text is not shown)"
        ) from None
    if protocol == _GRPC and "@" in parts.netloc:
        raise TelemetrySetupError(
            variable,
            "the OTLP endpoint carries a user or password (its text is not shown), which the "
            "gRPC exporter cannot send: put credentials in OTEL_EXPORTER_OTLP_HEADERS "
            "(authorization=Basic%20...)",
        )


_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"


def _check_resource_attributes(environ: Mapping[str, str]) -> None:
    """Raise `TelemetrySetupError` for resource attributes the SDK would drop."""
    problem = resource_attribute_problem(environ.get(_RESOURCE_ATTRIBUTES, ""))
    if problem is not None:
        raise TelemetrySetupError(_RESOURCE_ATTRIBUTES, problem)


def _check_otlp(environ: Mapping[str, str], signal: str) -> None:
    """Raise `TelemetrySetupError` for what the OTLP exporter of `signal` reads and
    cannot use: a protocol, compression, timeout, retryable code, credential provider or
    TLS file (`otlp_tls`), headers, or an endpoint."""
    protocol = _protocol(environ, signal)
    _otlp_compression(environ, signal)
    _check_otlp_timeout(environ, signal)
    _check_otlp_headers(environ, signal)
    _check_otlp_endpoint(environ, signal, protocol)
    if protocol == _GRPC:
        _check_retryable_codes(environ)
    _check_credential_providers(environ, signal, protocol)
    tls_problem = tls_file_problem(environ, signal, grpc=protocol == _GRPC)
    if tls_problem is not None:
        raise TelemetrySetupError(*tls_problem)
    _check_meter_provider(environ)


def _exporter_names(environ: Mapping[str, str], signal: str) -> list[str]:
    """The exporters `OTEL_<signal>_EXPORTER` names; raises `TelemetrySetupError` for one
    unknown, or for a variable that exporter, its span processor or metric reader reads
    and cannot use, before any exporter is built."""
    variable = f"OTEL_{signal}_EXPORTER"
    names = _names(environ, variable)
    if signal == "TRACES" and names:
        _check_span_settings(environ)
        _check_sampler(environ)
        _check_meter_provider(environ)
    for name in names:
        if name not in _EXPORTERS[signal]:
            raise TelemetrySetupError(variable, f"unknown exporter {name!r}")
        if signal == "METRICS" and name != "prometheus":
            _check_metric_reader_millis(environ)
        if name == "otlp":
            _check_otlp(environ, signal)
    return names


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters `OTEL_TRACES_EXPORTER` asks for."""
    exporters: list[SpanExporter] = []
    for name in _exporter_names(environ, "TRACES"):
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp" and _protocol(environ, "TRACES") == _GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            exporter = GrpcSpanExporter(
                credentials=grpc_client_credentials(environ, "TRACES"),
                compression=_otlp_compression(environ, "TRACES"),
            )
            exporters.append(_watched_spans(exporter, environ))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            exporters.append(_watched_spans(HttpSpanExporter(), environ))
    return exporters


def _watched_spans(exporter: SpanExporter, environ: Mapping[str, str]) -> SpanExporter:
    """An OTLP span exporter whose failures the gateway logs, as a few lines (`outages`),
    never quoting its headers."""
    secrets = exporter_secrets(environ)
    install_exporter_log_filter()
    install_url_log_filter(secrets)
    return WatchedSpanExporter(exporter, ExportWatch("traces", secrets=secrets))


def _watched_metrics(exporter: MetricExporter, environ: Mapping[str, str]) -> MetricReader:
    """A periodic reader for an OTLP metric exporter whose failures the gateway logs."""
    secrets = exporter_secrets(environ)
    install_exporter_log_filter()
    install_url_log_filter(secrets)
    watch = ExportWatch("metrics", secrets=secrets)
    return PeriodicExportingMetricReader(WatchedMetricExporter(exporter, watch))


def check_environment(config: TelemetryConfig, environ: Mapping[str, str]) -> None:
    """Raise the `TelemetrySetupError` a start with `config` and `environ` would end with
    (an unknown exporter, OTLP protocol or propagator, a setting the SDK refuses),
    building nothing (`llm-gateway check` asks). With telemetry off, a start reads no
    exporter, so none is an error."""
    if is_off(config, environ):
        return
    _check_resource_detectors(environ)
    exports_spans = bool(_exporter_names(environ, "TRACES"))
    exports_metrics = (
        bool(_exporter_names(environ, "METRICS")) or config.prometheus_port is not None
    )
    if exports_metrics:
        _exemplar_filter(environ)  # read as the meter provider is built
    if exports_spans or exports_metrics:
        _check_resource_attributes(environ)  # read as the resource of either is built
    trace_propagator(config, environ)


_PROPAGATORS = "OTEL_PROPAGATORS"


def trace_propagator(config: TelemetryConfig, environ: Mapping[str, str]) -> TextMapPropagator:
    """The propagator that reads a caller's trace context and writes an upstream's:
    OpenTelemetry's global one, built from `OTEL_PROPAGATORS` (or set by an application).

    OpenTelemetry builds it as `opentelemetry.propagate` is first imported, and raises
    there for a name no installed package provides (a typo; `b3` or `jaeger`, which come
    in packages of their own): imported with the gateway, every command ended in that
    traceback. Here it is a `TelemetrySetupError` naming the variable; with telemetry off
    ("whatever OTEL_* says") the default propagators (W3C trace context and baggage) are
    used instead.
    """
    try:
        from opentelemetry import propagate
    except Exception as exc:  # ValueError for a name it cannot find; a package's own error
        if is_off(config, environ):
            return default_propagator()
        raise TelemetrySetupError(_PROPAGATORS, str(exc)) from None
    return propagate.get_global_textmap()


def is_off(config: TelemetryConfig, environ: Mapping[str, str]) -> bool:
    """Whether the config or `OTEL_SDK_DISABLED` turns all telemetry off."""
    return not config.enabled or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def unknown_runtime_context(config: TelemetryConfig, environ: Mapping[str, str]) -> str | None:
    """The `OTEL_PYTHON_CONTEXT` name no installed package provides, with telemetry on,
    that `serve` and `check` warn of: OpenTelemetry uses its default in its place
    (`service.otel_context`). None otherwise."""
    return None if is_off(config, environ) else unknown_context(environ)


def names_prometheus(environ: Mapping[str, str]) -> bool:
    """Whether `OTEL_METRICS_EXPORTER` asks for the Prometheus endpoint."""
    return "prometheus" in _names(environ, "OTEL_METRICS_EXPORTER")


def metric_readers(environ: Mapping[str, str]) -> tuple[list[MetricReader], bool]:
    """The periodic readers `OTEL_METRICS_EXPORTER` asks for, and whether it names prometheus."""
    readers: list[MetricReader] = []
    wants_prometheus = False
    for name in _exporter_names(environ, "METRICS"):
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "prometheus":
            wants_prometheus = True
        elif name == "otlp" and _protocol(environ, "METRICS") == _GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            exporter = GrpcMetricExporter(
                credentials=grpc_client_credentials(environ, "METRICS"),
                compression=_otlp_compression(environ, "METRICS"),
            )
            readers.append(_watched_metrics(exporter, environ))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            readers.append(_watched_metrics(HttpMetricExporter(), environ))
    return readers, wants_prometheus


def _service_name_from(environ: Mapping[str, str]) -> str | None:
    """The service name the environment gives, as the SDK reads it: `OTEL_SERVICE_NAME`,
    else the last `service.name` in `OTEL_RESOURCE_ATTRIBUTES` (the SDK's detector fills a
    dict, so a repeated key's last value wins). It wins over the config's, which
    `Resource.create` would otherwise put over the environment's."""
    if name := environ.get("OTEL_SERVICE_NAME", "").strip():
        return name
    last_value = ""
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, is_pair, value = pair.partition("=")
        if is_pair and key.strip() == "service.name":
            last_value = value.strip()
    return urllib.parse.unquote(last_value) if last_value else None


WORKER = "llm_gateway.worker"
_INSTANCE_ID = "service.instance.id"


def service_resource(
    config: TelemetryConfig, environ: Mapping[str, str], *, worker: int | None = None
) -> Resource:
    """The resource spans and metrics are exported under: the SDK's (the environment's
    `OTEL_RESOURCE_ATTRIBUTES`, its detectors) with the service's name, and for a worker
    of `--workers N` its index, as `llm_gateway.worker` and at the end of
    `service.instance.id` (`<id>-worker-<index>`).

    The workers of one machine share its environment: under an operator's id (a pod's
    name) they exported as one instance, and a collector took their cumulative series
    for one, each worker's counts resetting the other's.
    """
    resource = Resource.create({"service.name": _service_name_from(environ) or config.service_name})
    if worker is None:
        return resource
    attributes: dict[str, str | int] = {WORKER: worker}
    instance = resource.attributes.get(_INSTANCE_ID)
    if instance:  # the operator's, or the SDK's random one (unique already, suffixed alike)
        attributes[_INSTANCE_ID] = f"{instance}-worker-{worker}"
    return resource.merge(Resource(attributes))


@dataclass(slots=True)
class Providers:
    """The tracer and meter one gateway uses, and what must be shut down with it."""

    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    # The gateway's own histograms when every reader takes them (see `histograms`).
    histograms: HistogramExport | None = None
    prometheus_port: int | None = None
    _prometheus_server: Any = field(default=None, repr=False)

    @property
    def records_spans(self) -> bool:
        """Whether spans go anywhere (else the tracer is a no-op)."""
        return self.tracer_provider is not None

    @property
    def records_metrics(self) -> bool:
        """Whether metrics go anywhere (else every instrument is a no-op)."""
        return self.meter_provider is not None

    @property
    def is_recording(self) -> bool:
        """Whether spans or metrics go anywhere at all."""
        return self.records_spans or self.records_metrics

    def force_flush(self, timeout_ms: int = 5000) -> None:
        """Export what is buffered now (blocking: call from a thread or at shutdown)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_ms)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop exporters and the Prometheus endpoint (blocking)."""
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
            self._prometheus_server = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


_SCOPE = "llm_gateway"


def build_providers(
    config: TelemetryConfig,
    *,
    environ: Mapping[str, str] | None = None,
    span_processors: Sequence[SpanProcessor] = (),
    extra_metric_readers: Sequence[MetricReader] = (),
    worker: int | None = None,
) -> Providers:
    """Providers for `config` and the environment; tests add in-memory processors/readers.
    `worker`: the process's index among `--workers N` (see `service_resource`).

    With no exporter configured and nothing injected, the no-op tracer and meter are
    used, so telemetry that goes nowhere costs next to nothing.
    """
    env = os.environ if environ is None else environ
    if is_off(config, env):
        return Providers(trace.NoOpTracer(), metrics.NoOpMeter(_SCOPE))
    _check_resource_detectors(env)
    processors: list[SpanProcessor] = [BatchSpanProcessor(e) for e in span_exporters(env)]
    processors.extend(span_processors)
    readers, wants_prometheus = metric_readers(env)
    readers.extend(extra_metric_readers)
    prometheus_server = None
    prometheus_port = config.prometheus_port
    wants_prometheus = wants_prometheus or prometheus_port is not None
    # Refused before the Prometheus endpoint opens, which nothing would then close.
    exemplar_filter = _exemplar_filter(env) if readers or wants_prometheus else None
    if processors or readers or wants_prometheus:
        _check_resource_attributes(env)
    resource = service_resource(config, env, worker=worker)
    if wants_prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        port = prometheus_port if prometheus_port is not None else DEFAULT_PROMETHEUS_PORT
        check_prometheus_host(config, port)
        try:
            prometheus_server, _ = start_http_server(
                port, addr=config.prometheus_host, registry=registry
            )
        except OSError as exc:
            raise MetricsListenError(
                f"cannot listen on {config.prometheus_host}:{port} for Prometheus metrics: "
                f"{exc.strerror or exc}"
            ) from exc
        prometheus_port = int(prometheus_server.server_port)
        log.info(
            "telemetry.prometheus_listening",
            extra={"host": config.prometheus_host, "port": prometheus_port},
        )
    providers = Providers(trace.NoOpTracer(), metrics.NoOpMeter(_SCOPE))
    if processors:
        # Shut down by `Telemetry.aclose`, within its bound; an exit hook would wait longer.
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        providers.tracer_provider = tracer_provider
        providers.tracer = LeanTracer(tracer_provider, processors, scope_name=_SCOPE)
    if readers:
        meter_provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            exemplar_filter=exemplar_filter,
            shutdown_on_exit=False,
        )
        providers.meter_provider = meter_provider
        providers.meter = meter_provider.get_meter(_SCOPE)
        if exemplar_filter is not None and all(suits(reader) for reader in readers):
            providers.histograms = HistogramExport(InstrumentationScope(_SCOPE), resource)
            for reader in readers:
                providers.histograms.install(reader)
    providers.prometheus_port = prometheus_port
    providers._prometheus_server = prometheus_server
    return providers
