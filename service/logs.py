"""Log setup: event-style messages with their structured extras as `key=value`."""

from __future__ import annotations

import logging

_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class EventFormatter(logging.Formatter):
    """`time level logger event key=value ...`: the extras a call passed, in order."""

    def format(self, record: logging.LogRecord) -> str:
        """Format the record and append its extras."""
        line = super().format(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
        )
        return f"{line} {extras}" if extras else line


def configure_logging(level: str = "INFO") -> None:
    """Send the gateway's logs to stderr with the event formatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(EventFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
