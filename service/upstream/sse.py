"""An incremental Server-Sent Events decoder.

Follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
for what a chat-completion stream needs: a leading byte order mark skipped, LF, CRLF and CR
line ends (also split across reads), comment lines (keep-alives), several `data:` lines
joined by newlines, and events split across or packed into reads. `id:` and `retry:`
fields are ignored, and so is `event:` but for `error`: the OpenAI protocol does not use
them. As the spec says, an event with a `data` field dispatches even when its data is
empty (`data:` alone), and one without (only comments, `event:` or `id:`) does not.

An upstream's error is an event too: an `event: error` event, and llama.cpp's server
(its builds through 2025) writes one as an `error:` field (`error: {"code":400,...}`),
which the spec would ignore. Each comes out as an error object, `{"error": <its data>}`,
unless its data is one already, as a stream's `data: {"error": ...}` event is: the error
it names, not a stream that ended without a finish reason (retried, and billed, as one).
"""

from __future__ import annotations

import orjson

_BOM = b"\xef\xbb\xbf"
_ERROR_EVENT = b"event: error"
# An error event whose data says nothing (`data:` alone, `{}`, `null`, llama.cpp's
# `error: null`): still an error, but one that says nothing a caller could be told it
# said. An `event: error` with no `data` field at all is no event: the spec dispatches
# none, as for any other event without data.
_NO_MESSAGE = '{"error":{"message":""}}'


def _data_value(line: bytes) -> bytes | None:
    """The value of a `data` field line, or None for any other line."""
    if line == b"data":  # a field name without a colon has an empty value
        return b""
    if not line.startswith(b"data:"):
        return None
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


def _error_value(line: bytes) -> bytes | None:
    """The value of llama.cpp's `error` field line, or None for any other line."""
    if not line.startswith(b"error:"):
        return None
    value = line[6:]
    return value[1:] if value.startswith(b" ") else value


def _as_error_object(data: str) -> str:
    """An error event's data as an error object: as it is when it is one already."""
    try:
        error = orjson.loads(data)
    except orjson.JSONDecodeError:
        error = data.strip()  # a message alone, as `{"error": "..."}` has
    if isinstance(error, dict) and error.get("error"):
        return data
    return orjson.dumps({"error": error}).decode() if error else _NO_MESSAGE


class SSEDecoder:
    """Feed it raw bytes as they arrive; it returns each completed event's data."""

    __slots__ = (
        "_data",
        "_data_bytes",
        "_is_error",
        "_is_started",
        "_line",
        "_line_bytes",
        "_skip_lf",
    )

    def __init__(self) -> None:
        # The unfinished last line, in the pieces it arrived in: joined once, when it ends,
        # since joining it at every read would copy a long line again and again.
        self._line: list[bytes] = []
        self._line_bytes = 0
        self._data: list[str] = []
        # The size of `_data` joined: each line's value and the line end after it, so
        # that an event of empty `data:` lines grows too.
        self._data_bytes = 0
        self._is_error = False  # the event being read is an error (`event: error`, `error:`)
        self._skip_lf = False
        self._is_started = False  # whether the stream's first bytes (and any BOM) are past

    def feed(self, chunk: bytes) -> list[str]:
        """Decode `chunk` and return the data of every event it completed."""
        if not chunk:
            return []
        # A CR ends its line at once (holding it back would stall a CR-only stream's
        # last event); if it was the first half of a CRLF split across reads, the LF
        # that starts this read is not another line end.
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = chunk.endswith(b"\r")
        if self._is_started and b"\n" not in chunk and b"\r" not in chunk:
            if chunk:
                self._line.append(chunk)
                self._line_bytes += len(chunk)
            return []
        buffer = b"".join((*self._line, chunk)) if self._line else chunk
        self._line.clear()
        self._line_bytes = 0
        if not self._is_started:
            # The spec skips one BOM at the start of the stream; a server that sends one
            # would otherwise hide the first line, and with it the first event's text.
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._keep_line(buffer)  # maybe the BOM's first bytes: wait for the rest
                return []
            self._is_started = True
            buffer = buffer.removeprefix(_BOM)
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._keep_line(lines.pop())
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    data = "\n".join(self._data)
                    events.append(_as_error_object(data) if self._is_error else data)
                    self._data = []
                    self._data_bytes = 0
                self._is_error = False  # the spec's event type lasts one event
            elif (value := _data_value(line)) is not None:
                self._data.append(value.decode("utf-8", errors="replace"))
                self._data_bytes += len(value) + 1
            elif line.startswith(b"e"):  # rare: an `event:` or `error:` field
                self._take_error_field(line)
        return events

    def _take_error_field(self, line: bytes) -> None:
        """Mark the event an error for `event: error`; take llama.cpp's `error:` field's
        value as the data of an error event."""
        if line.rstrip() in (_ERROR_EVENT, b"event:error"):
            self._is_error = True
        elif (value := _error_value(line)) is not None:
            self._is_error = True
            self._data.append(value.decode("utf-8", errors="replace"))
            self._data_bytes += len(value) + 1

    def _keep_line(self, line: bytes) -> None:
        if line:
            self._line.append(line)
            self._line_bytes += len(line)

    def data_at_end(self) -> str | None:
        """The data of the event the body's end left without its blank line, if any.

        The spec discards that event ("the end of the stream is not enough to trigger the
        dispatch of the last event"); a caller may still trust it when the body ended
        cleanly (not reset) and its data is whole by itself, like OpenAI's `[DONE]`. A
        last line without its line end counts here: the clean end is its end.
        """
        data = list(self._data)
        if (value := _data_value(b"".join(self._line))) is not None:
            data.append(value.decode("utf-8", errors="replace"))
        return "\n".join(data) if data else None

    @property
    def has_pending(self) -> bool:
        """Whether an event was started but not finished: a cut stream, if at the end."""
        return bool(self._data) or bool(b"".join(self._line).strip())

    @property
    def pending_bytes(self) -> int:
        """The size of the event still being read (its data lines and the partial line)."""
        return self._line_bytes + self._data_bytes
