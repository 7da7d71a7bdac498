"""Everything the gateway emits during a test session, kept for the secret grep.

A logging handler installed at session start writes every log record (message, extras
and traceback) to one file; tests add the gRPC error messages, details and trailers
they receive with `record_emitted`. `tests/test_zz_secret_grep.py`, run last, asserts
that no key in `SECRETS` (and none added with `register_secret`) appears in that file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the secret grep after every other test."""
    items.sort(key=lambda item: "test_zz_secret_grep" in item.nodeid)


@pytest.fixture(scope="session", autouse=True)
def capture_emitted_logs() -> Iterator[Path]:
    """Write every record of the gateway's loggers (DEBUG and up) to `EMITTED_PATH`."""
    handler = logging.FileHandler(EMITTED_PATH, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_EverythingFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    gateway = logging.getLogger("llm_gateway")
    previous = gateway.level
    gateway.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield EMITTED_PATH
    finally:
        root.removeHandler(handler)
        handler.close()
        gateway.setLevel(previous)
        EMITTED_PATH.unlink(missing_ok=True)
