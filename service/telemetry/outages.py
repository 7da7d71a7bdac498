"""A collector outage in a few log lines, not one for each retry and each lost batch.

The OTLP exporters log a WARNING for each retry and an ERROR for each batch they give up:
with the collector down, about 30 lines in 20 s, for as long as it is down. The gateway
wraps each OTLP exporter in a watch of its signal (`WatchedSpanExporter`,
`WatchedMetricExporter`), which logs instead, from the exports' own results:

- `telemetry.export_failed` (ERROR) as an export fails after one that succeeded (or the
  first), with the exporter's first complaint about it as `error`;
- `telemetry.export_still_failing` (WARNING) at most once every REPEAT_AFTER_S while
  exports keep failing, with `failed_exports` so far;
- `telemetry.export_recovered` (INFO) as one succeeds again, with `failed_exports` in all.

What the exporters log during a watched export (WARNING and above) is dropped by the
filter `install_exporter_log_filter` puts on their loggers; what they log at any other
time (a misconfiguration at start, a call after shutdown) is left as it is.

The complaint quotes the collector (a gRPC status's details, an HTTP reason phrase), and
a collector or a proxy in front of it may quote the request's headers there: the value
of each OTLP exporter header (`OTEL_EXPORTER_OTLP_HEADERS`, a signal's own), and each
query value and password of an endpoint (quoted with the URL the HTTP exporter could not
reach), is redacted from it (`ExporterSecrets`), and it is cut to one line of at most
COMPLAINT_CHARS, its status first.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from service.episodes import FailureEpisode

log = logging.getLogger("llm_gateway.telemetry")

# The loggers the OTLP exporters (opentelemetry-exporter-otlp 1.45) report retries and
# failed exports on: gRPC's is shared by traces and metrics; over HTTP each has its own.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)


# The loggers urllib3, under the HTTP exporters' `requests`, names a request's URL on,
# query and all: each request (DEBUG), a redirect or a retry, and an answer's malformed
# headers (WARNING).
URL_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.util.retry",
)

Signal = Literal["traces", "metrics"]

# The variables the OTLP exporters read their headers from.
HEADER_VARIABLES = (
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
)
# And their endpoints, whose query (`?api_key=...`) and password the HTTP exporter's
# complaint about a connection it could not make quotes with the URL.
ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)

# The most of an exporter's complaint `telemetry.export_failed` quotes: the exporter's
# words and the status come first, what the collector said after them.
COMPLAINT_CHARS = 300

# Header values (and words of them) this long are redacted wherever they stand; shorter
# ones only where they stand as their header's value or quoted (`ExporterSecrets`).
_SHORTEST_REDACTED = 8
REDACTED = "[redacted]"
# What may close a short value quoted as its header's: a quote, a space, or the next
# entry of a list, a dict or a query string.
_VALUE_END = r"(?=[\s'\",;&)}\]]|$)"


@dataclass(frozen=True, slots=True)
class ExporterSecrets:
    """The OTLP exporters' header values (and endpoints' query values and passwords), as
    a complaint must not quote them.

    A value of `_SHORTEST_REDACTED` characters or more (or a word that long of one: the
    token of `Bearer <token>`) is redacted wherever it stands: no word of a complaint
    shares it by chance. A shorter one (an API key of six characters) is redacted where
    it stands as its header's value, `name: value`, `name=value` or `'name': 'value'`
    (the name in any case), and where it stands quoted whole, `'value'` or `"value"`:
    anywhere, a value `1` or `on` would take every "1" (a status's, a port's) with it.
    """

    anywhere: tuple[str, ...] = ()  # longest first: one holding another goes whole
    short: tuple[re.Pattern[str], ...] = ()

    def redacted(self, text: str) -> str:
        """`text` with every header value replaced by `[redacted]`."""
        for secret in self.anywhere:
            text = text.replace(secret, REDACTED)
        for pattern in self.short:
            text = pattern.sub(_HEAD_REDACTED, text)
        return text


# What each pattern of `ExporterSecrets.short` matches, as it is replaced: its `head` kept.
_HEAD_REDACTED = r"\g<head>" + REDACTED


def _short_value_patterns(name: str, value: str) -> tuple[re.Pattern[str], ...]:
    """Where `value` (shorter than `_SHORTEST_REDACTED`) stands as header `name`'s
    value, and where it stands quoted whole; the part before it is the group `head`."""
    escaped = re.escape(value)
    as_its_value = rf"(?P<head>(?<![\w-])(?i:{re.escape(name)})['\"]?\s*[:=]\s*['\"]?)"
    return (
        re.compile(rf"{as_its_value}{escaped}{_VALUE_END}"),
        re.compile(rf"(?P<head>['\"]){escaped}(?=(?P=head))"),
    )


def exporter_secrets(environ: Mapping[str, str]) -> ExporterSecrets:
    """The values of the OTLP exporters' headers as written (URL-encoded) and as sent,
    and each word of them (the token of `Bearer <token>`); and their endpoints' query
    values and passwords, as written and as sent."""
    anywhere: set[str] = set()
    short: set[tuple[str, str]] = set()
    for name, written in _configured_values(environ):
        sent = urllib.parse.unquote(written).strip()
        for value in (written, sent, *sent.split()):
            if len(value) >= _SHORTEST_REDACTED:
                anywhere.add(value)
            elif value and name:
                short.add((name, value))
    return ExporterSecrets(
        anywhere=tuple(sorted(anywhere, key=len, reverse=True)),
        short=tuple(p for n, v in sorted(short) for p in _short_value_patterns(n, v)),
    )


def _configured_values(environ: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """Each header's name and value as written, and each endpoint query parameter's and
    password's (named `password`), URL-encoded as written; and the `authorization` the
    HTTP exporter sends for an endpoint's user and password (`_basic_credentials`)."""
    for variable in HEADER_VARIABLES:
        for entry in environ.get(variable, "").split(","):
            written_name, _, written = entry.partition("=")
            yield urllib.parse.unquote(written_name).strip(), written.strip()
    for variable in ENDPOINT_VARIABLES:
        parts = urllib.parse.urlsplit(environ.get(variable, "").strip())
        for parameter in parts.query.split("&"):
            written_name, _, written = parameter.partition("=")
            yield urllib.parse.unquote_plus(written_name), written
        user_info, at, _ = parts.netloc.rpartition("@")
        if at:
            yield "password", user_info.partition(":")[2]
            yield "authorization", _basic_credentials(user_info)


def _basic_credentials(user_info: str) -> str:
    """The `authorization` value the HTTP exporter's `requests` sends for an endpoint's
    `user:password@` (its user and password unquoted, in base64), which a collector
    quoting the request's headers quotes: the password, decoded in a moment."""
    user, _, password = (urllib.parse.unquote(part) for part in user_info.partition(":"))
    pair = f"{user}:{password}"
    try:
        raw = pair.encode("latin-1")  # as `requests` encodes it
    except UnicodeEncodeError:
        raw = pair.encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


NO_EXPORTER_SECRETS = ExporterSecrets()


def quotable_complaint(complaint: str, secrets: ExporterSecrets) -> str:
    """`complaint` on one line, without any of `secrets`, cut to COMPLAINT_CHARS."""
    line = secrets.redacted(" ".join(complaint.split()))
    if len(line) > COMPLAINT_CHARS:
        line = line[: COMPLAINT_CHARS - 1] + "…"
    return line


@dataclass(slots=True)
class _Export:
    """One watched export running on a thread: the first complaint its exporter logged."""

    first_complaint: str | None = None


# The watched export this thread runs now, if any. Exporters log from the thread that
# exports (a processor's or reader's own, or a flush's caller), so a record logged on a
# thread during one is that export's, whichever signal shares the logger.
_running = threading.local()


class _ExporterLogFilter(logging.Filter):
    """Drops the WARNING and ERROR records an exporter logs during a watched export,
    keeping the first one's message for the watch."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a complaint logged during a watched export on this thread."""
        export: _Export | None = getattr(_running, "export", None)
        if export is None or record.levelno < logging.WARNING:
            return True
        if export.first_complaint is None:
            export.first_complaint = record.getMessage()
        return False


def install_exporter_log_filter() -> None:
    """Put the filter on each exporter logger, once."""
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExporterLogFilter) for f in logger.filters):
            # Ahead of the SDK's own DuplicateFilter, which drops a message repeated within
            # 20 s (the other signal's, over gRPC) before a later filter would see it.
            logger.filters.insert(0, _ExporterLogFilter())


class _RedactingFilter(logging.Filter):
    """Rewrites a record whose message quotes one of `secrets` with them redacted."""

    def __init__(self, secrets: ExporterSecrets) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        """Let every record through, its message without the secrets."""
        message = record.getMessage()
        redacted = self.secrets.redacted(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def install_url_log_filter(secrets: ExporterSecrets) -> None:
    """Have urllib3's lines that name a URL (`URL_LOGGERS`) quote none of `secrets`: at
    `--log-level DEBUG` it logged each export's request line, an endpoint's
    `?api_key=...` with it. Replaces the filter an earlier setup put there."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _RedactingFilter)]:
            logger.removeFilter(old)
        if secrets.anywhere or secrets.short:
            logger.addFilter(_RedactingFilter(secrets))


@dataclass(slots=True)
class ExportWatch:
    """Whether one signal's exports fail, and the lines that say so when that changes."""

    signal: Signal
    clock: Callable[[], float] = time.monotonic
    # What a complaint must not quote: `exporter_secrets`.
    secrets: ExporterSecrets = NO_EXPORTER_SECRETS
    _episode: FailureEpisode = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._episode = FailureEpisode(
            log,
            "telemetry.export_failed",
            "telemetry.export_still_failing",
            "telemetry.export_recovered",
            count_key="failed_exports",
            now=self.clock,
        )

    @contextlib.contextmanager
    def exporting(self) -> Iterator[_Export]:
        """Mark this thread as running one of this signal's exports meanwhile."""
        previous = getattr(_running, "export", None)
        _running.export = export = _Export()
        try:
            yield export
        finally:
            _running.export = previous

    def ended(self, *, is_success: bool, complaint: str | None) -> None:
        """Count an export's result, logging an outage's start, reminders and end."""
        with self._lock:  # exports run on each signal's own thread, and on flushes'
            if is_success:
                self._episode.succeeded({"signal": self.signal})
            else:
                error = quotable_complaint(complaint, self.secrets) if complaint else None
                error = error or "the exporter said nothing"
                self._episode.failed({"signal": self.signal, "error": error})


class WatchedSpanExporter(SpanExporter):
    """`exporter` (kept as `.exporter`), its failures logged by `watch` alone."""

    def __init__(self, exporter: SpanExporter, watch: ExportWatch) -> None:
        self.exporter = exporter
        self._watch = watch

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export `spans` with the wrapped exporter and count the result."""
        with self._watch.exporting() as export:
            result = self.exporter.export(spans)
        self._watch.ended(
            is_success=result is SpanExportResult.SUCCESS, complaint=export.first_complaint
        )
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the wrapped exporter."""
        return self.exporter.force_flush(timeout_millis)


class WatchedMetricExporter(MetricExporter):
    """`exporter` (kept as `.exporter`), its failures logged by `watch` alone (its reader
    ignores the results)."""

    def __init__(self, exporter: MetricExporter, watch: ExportWatch) -> None:
        # The reader reads the exporter's preferences from these; the SDK keeps them private.
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self.exporter = exporter
        self._watch = watch

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export `metrics_data` with the wrapped exporter and count the result."""
        with self._watch.exporting() as export:
            result = self.exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self._watch.ended(
            is_success=result is MetricExportResult.SUCCESS, complaint=export.first_complaint
        )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the wrapped exporter."""
        return self.exporter.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the wrapped exporter down."""
        self.exporter.shutdown(timeout_millis, **kwargs)
