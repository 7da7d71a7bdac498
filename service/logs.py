"""Log setup: event-style messages with their structured extras as `key=value`."""

from __future__ import annotations

import logging
from typing import Final, Literal

from service.errors import DeadlineExceeded

# The logger grpc.aio's server reports servicer failures on.
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"

_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


# The `worker=` of the lines `serve --workers N`'s supervisor writes itself.
SUPERVISOR: Final = "supervisor"

# Which process of `serve --workers N` writes: a worker's index (from 0), or SUPERVISOR.
Writer = int | Literal["supervisor"]


class EventFormatter(logging.Formatter):
    """`time level logger event key=value ...`: the extras a call passed, in order, then
    `worker=W` when the process is one of `serve --workers N`'s (`writer`)."""

    def __init__(self, fmt: str, *, writer: Writer | None = None) -> None:
        super().__init__(fmt)
        # Made once, at the process's start: each line only appends it.
        self._writer = "" if writer is None else f" worker={writer}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line with its extras, ahead of any traceback: on the event's line,
        where a reader (or a search for `event key=value`) finds them."""
        line = super().formatMessage(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
        )
        return (f"{line} {extras}" if extras else line) + self._writer


class DeadlineRaceFilter(logging.Filter):
    """grpc's ERROR for a DEADLINE_EXCEEDED sent as grpc's own deadline ended the call,
    logged instead as the INFO event `rpc.deadline_race`; and for a stream's message
    grpc could not write because its call had ended, as `rpc.call_ended_while_writing`.

    The gateway ends a call whose deadline passed with DEADLINE_EXCEEDED. When grpc's
    deadline timer ends the same call at the same moment, sending that status fails and
    grpc logs the failure at ERROR, traceback and all (about once in a few thousand
    calls under load). The caller gets DEADLINE_EXCEEDED either way: nothing failed.
    Likewise when a caller cancels (or its deadline passes) while grpc waits to write a
    stream's next message to it: the write fails, and the caller has what it asked for.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record when it is one of those races; let every record through."""
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or type(error).__name__ != "ExecuteBatchError":
            return True
        handling = error.__context__ if error else None
        if isinstance(handling, DeadlineExceeded):
            event = "rpc.deadline_race"
        elif handling is None and "SendMessageOperation" in str(error):
            event = "rpc.call_ended_while_writing"  # grpc's own write, no servicer error
        else:
            return True
        method = record.getMessage().rpartition("[")[2].rstrip("]")
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = event, ()
        record.exc_info, record.exc_text = None, None
        record.method = method
        # Let through only as far as an INFO record would have been.
        return logging.getLogger().isEnabledFor(logging.INFO)


# OpenTelemetry's loggers that warn of a caller's `traceparent`, `tracestate` or `baggage`
# header they cannot take, by the header each reads.
CALLER_HEADER_LOGGERS: Final = {
    "opentelemetry.baggage.propagation": "baggage",
    "opentelemetry.trace.propagation.tracecontext": "traceparent",
    "opentelemetry.trace.span": "tracestate",
}


class CallerHeaderFilter(logging.Filter):
    """OpenTelemetry's WARNING for a caller's trace header it ignores (or part of one), as
    the DEBUG event `rpc.trace_header_ignored` naming the header, not its text.

    The propagators read these headers on every call, before its key is checked, and warn
    of each entry they drop, quoting it: one call's `baggage` of 180 bad entries wrote 180
    WARNING lines of the caller's text, so whoever reached the port could flood the log a
    call at a time. The header is the caller's to mend, and the call is served without it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a WARNING of the propagators; let every record through."""
        header = CALLER_HEADER_LOGGERS.get(record.name)
        if header is None or record.levelno != logging.WARNING:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "rpc.trace_header_ignored", ()
        record.header = header
        # Let through only as far as a DEBUG record would have been.
        return logging.getLogger().isEnabledFor(logging.DEBUG)


# The start-up warnings `serve --workers N` says once for the gateway, not once a process:
# the supervisor says its listen policy's and the Redis servers' that give no answer
# itself, before any worker starts...
SAID_BY_THE_SUPERVISOR: Final = frozenset(
    {
        "security.keys_without_tls",
        "security.auth_off_on_public_listen",
        "redis.no_answer_at_start",
    }
)
# ...and worker 0 these, which only a worker finds as it starts: its upstreams (keys over
# plain http, none at all), their models' prices, key entries naming tenant `default`.
SAID_BY_WORKER_0: Final = frozenset(
    {
        "upstream.key_over_plain_http",
        "gateway.no_upstream",
        "pricing.model_without_price",
        "auth.default_tenant_key",
    }
)


# ...and, while serving, worker 0 alone these at WARNING (DEBUG in the others): each
# worker finds the same file as the others, and worker 0 checks it between calls too
# (`FileKeyStore.watch`), so it finds a problem there whichever worker serves the calls.
SAID_BY_WORKER_0_WHILE_SERVING: Final = frozenset(
    {"auth.keys_file_unusable", "auth.keys_file_writable"}
)


class SaidByWorker0(logging.Filter):
    """In every worker of `serve --workers N` but worker 0, for its whole life: the
    warnings worker 0 says for the gateway (`SAID_BY_WORKER_0_WHILE_SERVING`) as DEBUG.
    With 4 workers a keys file turned unusable was said 4 times a check, read as 4
    problems."""

    def __init__(self) -> None:
        super().__init__()
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """Let every record through but those warnings, DEBUG now."""
        msg = record.msg
        if not (
            record.levelno == logging.WARNING
            and type(msg) is str
            and msg in SAID_BY_WORKER_0_WHILE_SERVING
        ):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # Let through only as far as a DEBUG record would have been.
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class SaidOnceAtStart(logging.Filter):
    """In worker `index` of `serve --workers N`, until it listens (`remove`): drops the
    start-up warnings another process says for the whole gateway (`SAID_BY_THE_SUPERVISOR`,
    and but in worker 0 `SAID_BY_WORKER_0`). Each worker finds the same ones in the same
    config: with 2 workers a warning was said 3 times, read as 3 problems. Past its start a
    worker says all its own (a Redis key naming `default` that a call of its own found)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._dropped = SAID_BY_THE_SUPERVISOR | (SAID_BY_WORKER_0 if index else frozenset())
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """Let every record through but those warnings."""
        msg = record.msg
        return not (record.levelno == logging.WARNING and type(msg) is str and msg in self._dropped)

    def remove(self) -> None:
        """Let every record through from now on: the worker has started."""
        for handler in self._handlers:
            handler.removeFilter(self)


def configure_logging(level: str = "INFO", *, writer: Writer | None = None) -> None:
    """Send the gateway's logs to stderr with the event formatter; with several processes
    (`serve --workers N`), each line names its `writer`: a worker's index, or SUPERVISOR."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        EventFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", writer=writer)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    grpc_aio = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, DeadlineRaceFilter) for f in grpc_aio.filters):
        grpc_aio.addFilter(DeadlineRaceFilter())
    for name in CALLER_HEADER_LOGGERS:
        propagation = logging.getLogger(name)
        if not any(isinstance(f, CallerHeaderFilter) for f in propagation.filters):
            propagation.addFilter(CallerHeaderFilter())
