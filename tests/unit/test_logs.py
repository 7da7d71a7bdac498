"""The log setup: grpc's ERROR for the deadline race (or a write to a call that ended)
becomes one INFO event."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from grpc._cython import cygrpc

from service.errors import DeadlineExceeded, UpstreamUnavailable
from service.grpc_core_logs import GRPC_VERBOSITY, quiet_grpc_core
from service.logs import (
    CALLER_HEADER_LOGGERS,
    GRPC_AIO_LOGGER,
    CallerHeaderFilter,
    DeadlineRaceFilter,
    EventFormatter,
    configure_logging,
)

METHOD = "/llmgateway.v1.CompletionService/Complete"


def batch_error_while_handling(cause: Exception) -> cygrpc.ExecuteBatchError:
    """grpc's error from sending a status, raised while the servicer's error was handled."""
    try:
        try:
            raise cause
        except Exception:
            raise cygrpc.ExecuteBatchError('Failed "execute_batch"')  # noqa: B904 - as grpc
    except cygrpc.ExecuteBatchError as error:
        return error


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def grpc_log() -> Iterator[tuple[logging.Logger, Capture]]:
    """grpc.aio's logger with the filter and a capturing handler, restored afterwards."""
    logger, root = logging.getLogger(GRPC_AIO_LOGGER), logging.getLogger()
    capture, race, level = Capture(), DeadlineRaceFilter(), root.level
    logger.addHandler(capture)
    logger.addFilter(race)
    root.setLevel(logging.INFO)
    try:
        yield logger, capture
    finally:
        logger.removeHandler(capture)
        logger.removeFilter(race)
        root.setLevel(level)


def log_as_grpc_does(logger: logging.Logger, error: BaseException) -> None:
    logger.error(
        "ExecuteBatchError raised in core by servicer method [%s]",
        METHOD,
        exc_info=(type(error), error, error.__traceback__),
    )


def test_the_deadline_race_is_one_info_event_without_traceback(grpc_log) -> None:
    """Sending DEADLINE_EXCEEDED as grpc's own deadline ended the call is no error."""
    logger, capture = grpc_log
    log_as_grpc_does(
        logger, batch_error_while_handling(DeadlineExceeded("the caller's deadline passed"))
    )
    [record] = capture.records
    assert (record.levelname, record.getMessage()) == ("INFO", "rpc.deadline_race")
    assert record.exc_info is None
    assert record.method == METHOD


def test_a_write_to_a_call_that_ended_is_one_info_event_without_traceback(grpc_log) -> None:
    """grpc's own write of a stream message, failed as its caller cancelled, is no error."""
    logger, capture = grpc_log
    send = "(<grpc._cython.cygrpc.SendMessageOperation object at 0x7efd81c3b330>,)"
    log_as_grpc_does(logger, cygrpc.ExecuteBatchError(f'Failed "execute_batch": {send}'))
    [record] = capture.records
    assert (record.levelname, record.getMessage()) == ("INFO", "rpc.call_ended_while_writing")
    assert record.exc_info is None
    assert record.method == METHOD


def test_any_other_failed_status_stays_an_error(grpc_log) -> None:
    """A batch that failed while ending a call for another reason is still an ERROR."""
    logger, capture = grpc_log
    log_as_grpc_does(
        logger, batch_error_while_handling(UpstreamUnavailable("up0 is down", upstream="up0"))
    )
    log_as_grpc_does(logger, ValueError("a servicer bug"))
    assert [r.levelname for r in capture.records] == ["ERROR", "ERROR"]
    assert all(r.exc_info for r in capture.records)


def test_the_rewritten_event_is_dropped_below_the_configured_level(grpc_log) -> None:
    """With --log-level WARNING the INFO event is not written at all."""
    logger, capture = grpc_log
    logging.getLogger().setLevel(logging.WARNING)
    log_as_grpc_does(logger, batch_error_while_handling(DeadlineExceeded("passed")))
    assert capture.records == []


def test_configure_logging_installs_the_filters_once() -> None:
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    propagation = [logging.getLogger(name) for name in CALLER_HEADER_LOGGERS]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        configure_logging("INFO")
        assert sum(isinstance(f, DeadlineRaceFilter) for f in logger.filters) == 1
        for each in propagation:
            assert sum(isinstance(f, CallerHeaderFilter) for f in each.filters) == 1
    finally:
        for found in [f for f in logger.filters if isinstance(f, DeadlineRaceFilter)]:
            logger.removeFilter(found)
        for each in propagation:
            for found in [f for f in each.filters if isinstance(f, CallerHeaderFilter)]:
                each.removeFilter(found)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_propagators_warning_of_a_caller_header_is_a_debug_event_without_its_text(
    level: int,
) -> None:
    """Dropped below DEBUG; at DEBUG, `rpc.trace_header_ignored` naming the header only."""
    logger, root = logging.getLogger("opentelemetry.baggage.propagation"), logging.getLogger()
    capture, ignored, previous = Capture(), CallerHeaderFilter(), root.level
    logger.addHandler(capture)
    logger.addFilter(ignored)
    root.setLevel(level)
    try:
        logger.warning("Invalid baggage entry: `%s`", "=caller-text")
    finally:
        logger.removeHandler(capture)
        logger.removeFilter(ignored)
        root.setLevel(previous)
    lines = [(r.levelname, r.getMessage(), r.__dict__.get("header")) for r in capture.records]
    shown = [("DEBUG", "rpc.trace_header_ignored", "baggage")]
    assert lines == (shown if level == logging.DEBUG else [])


def test_the_extras_stay_on_the_event_line_ahead_of_a_traceback() -> None:
    """An event logged with its exception: `event key=value` on one line, the traceback
    after it. Before, the extras came after the traceback, off the event's line."""
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "x.failed", (), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.__dict__["error"] = "RuntimeError: boom"
    first, *rest = EventFormatter("%(levelname)s %(message)s").format(record).splitlines()
    assert first == "ERROR x.failed error=RuntimeError: boom"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: boom"


@pytest.mark.parametrize(
    ("writer", "suffix"), [(1, " worker=1"), ("supervisor", " worker=supervisor")]
)
def test_each_line_of_several_processes_names_its_writer_on_the_event_line(writer, suffix) -> None:
    """With `serve --workers N` every line ends with the worker's index (or `supervisor`),
    after the extras and ahead of a traceback. Before, the N workers' lines were identical."""
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "x.failed", (), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.__dict__["port"] = 50051
    formatter = EventFormatter("%(levelname)s %(message)s", writer=writer)
    first, *rest = formatter.format(record).splitlines()
    assert first == f"ERROR x.failed port=50051{suffix}"
    assert rest[0] == "Traceback (most recent call last):"


def test_a_single_process_names_no_writer() -> None:
    """One process (no --workers N): no `worker=` field, there is nothing to tell apart."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "server.started", (), None)
    assert EventFormatter("%(message)s").format(record) == "server.started"


@pytest.mark.parametrize(("given", "expected"), [(None, "ERROR"), ("DEBUG", "DEBUG")])
def test_grpc_core_is_kept_to_its_errors_unless_the_operator_says(monkeypatch, given, expected):
    """The entry points set GRPC_VERBOSITY to ERROR, keeping an operator's own value."""
    if given is None:
        monkeypatch.delenv(GRPC_VERBOSITY, raising=False)
    else:
        monkeypatch.setenv(GRPC_VERBOSITY, given)
    quiet_grpc_core()
    assert os.environ[GRPC_VERBOSITY] == expected
