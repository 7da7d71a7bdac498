"""An incremental Server-Sent Events decoder.

Follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
for what a chat-completion stream needs: LF, CRLF and CR line ends (also split across
reads), comment lines (keep-alives), several `data:` lines joined by newlines, and events
split across or packed into reads. `event:`, `id:` and `retry:` fields are ignored: the
OpenAI protocol does not use them.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it raw bytes as they arrive; it returns each completed event's data."""

    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Decode `chunk` and return the data of every event it completed."""
        buffer = self._buffer + chunk
        # A CR at the end may be the first half of a CRLF split across reads.
        held = b""
        if buffer.endswith(b"\r"):
            buffer, held = buffer[:-1], b"\r"
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._buffer = lines.pop() + held
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))
        return events

    @property
    def has_pending(self) -> bool:
        """Whether an event was started but not finished: a cut stream, if at the end."""
        return bool(self._data) or bool(self._buffer.strip())
