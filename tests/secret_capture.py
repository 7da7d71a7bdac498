"""Everything the gateway emits during a test session, kept for the secret grep.

A logging handler installed at session start writes every log record (message, extras
and traceback) to one file per test process; tests add the gRPC error messages, details
and trailers they receive with `record_emitted`. When a process's tests are done it greps
its file for every key in `SECRETS` (and those added with `register_secret`); the run
fails if any process found one. Under pytest-xdist each worker greps its own file and
hands what it found to the controller, which reports and fails the run.
`tests/test_zz_secret_grep.py` exercises every path a key takes and checks the capture.
The gateway's loggers are captured from DEBUG up; a test that carries a secret asks for
`every_logger_at_debug` to have every library's DEBUG lines captured too.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Distinctive fake keys: a hit in the grep can only mean a leak.
PROVIDER_KEY = "sk-FAKEPROVIDER-9d7c3b1e5a2f4c6e8b0d"
CALLER_KEY_A = "llmgw_FAKECALLER-team-a-4f1e9b7c2d5a8e3f"
CALLER_KEY_B = "llmgw_FAKECALLER-team-b-6a2c8e4f0b3d7a1c"
SECRETS: list[str] = [PROVIDER_KEY, CALLER_KEY_A, CALLER_KEY_B]

_fd, _path = tempfile.mkstemp(prefix="llm-gateway-emitted-", suffix=".log")
os.close(_fd)
EMITTED_PATH = Path(_path)


def register_secret(secret: str) -> str:
    """Add a key made during the run (e.g. by `keys create`) to those grepped for."""
    SECRETS.append(secret)
    return secret


def record_emitted(*texts: object) -> None:
    """Append what a caller received (error details, trailers, responses) to the file."""
    with EMITTED_PATH.open("a", encoding="utf-8", errors="backslashreplace") as file:
        for text in texts:
            file.write(f"{text!s}\n")


class _EverythingFormatter(logging.Formatter):
    """The message, every extra attribute and the traceback of a record."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name} {record.levelname} {record.getMessage()} {record.__dict__!r}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def leaked_secrets(emitted: str) -> list[str]:
    """The keys (shown by their first 8 characters) any 16 characters of which are in
    `emitted`: that also catches near-miss keys tests sent on purpose (a character
    dropped or added)."""
    return sorted(
        {
            secret[:8] + "…"
            for secret in SECRETS
            for start in range(max(1, len(secret) - 15))
            if secret[start : start + 16] in emitted
        }
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the secret grep after every other test."""
    items.sort(key=lambda item: "test_zz_secret_grep" in item.nodeid)


def _keeping_capture(
    configure: Callable[..., None], handler: logging.Handler
) -> Callable[..., None]:
    """`configure_logging`, then the capture's handler put back beside the one it sets."""

    def configure_keeping_capture(*args: Any, **kwargs: Any) -> None:
        configure(*args, **kwargs)
        logging.getLogger().addHandler(handler)

    return configure_keeping_capture


@pytest.fixture(scope="session", autouse=True)
def capture_emitted_logs() -> Iterator[Path]:
    """Write every record of the gateway's loggers (DEBUG and up) to `EMITTED_PATH`.

    `serve` run in the test process (`main(["serve", ...])`) sets the root logger's
    handlers to its own alone: the capture's handler is put back each time, else the
    grep saw nothing the process logged from then on."""
    import service.logs
    import service.main

    handler = logging.FileHandler(EMITTED_PATH, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_EverythingFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    gateway = logging.getLogger("llm_gateway")
    previous = gateway.level
    gateway.setLevel(logging.DEBUG)
    root.addHandler(handler)
    configure = service.logs.configure_logging
    service.logs.configure_logging = service.main.configure_logging = _keeping_capture(
        configure, handler
    )
    try:
        yield EMITTED_PATH
    finally:
        service.logs.configure_logging = service.main.configure_logging = configure
        root.removeHandler(handler)
        handler.close()
        gateway.setLevel(previous)


@pytest.fixture
def every_logger_at_debug() -> Iterator[None]:
    """The root logger at DEBUG for this test, so that the capture holds every library's
    DEBUG lines (urllib3's, redis's, grpc's, OpenTelemetry's), as `serve --log-level
    DEBUG` writes them: a library that starts logging a header or a URL with a password
    fails the grep. Only for the tests that carry secrets, to keep the capture small."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.setLevel(previous)


_WORKER_LEAKS = pytest.StashKey[list[str]]()


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown and its log records
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Grep this process's capture; fail the run (or tell the controller) on a leak."""
    leaked = leaked_secrets(EMITTED_PATH.read_text(encoding="utf-8", errors="replace"))
    EMITTED_PATH.unlink(missing_ok=True)
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["leaked_secrets"] = leaked
        return
    leaked = sorted({*leaked, *session.config.stash.get(_WORKER_LEAKS, [])})
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"SECRET GREP FAILED: keys found in emitted output: {leaked}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker finished: keep what its grep found for the controller's report."""
    found = list(getattr(node, "workeroutput", {}).get("leaked_secrets", []))
    node.config.stash[_WORKER_LEAKS] = [*node.config.stash.get(_WORKER_LEAKS, []), *found]
