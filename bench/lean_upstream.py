"""A minimal OpenAI-compatible upstream for throughput benchmarks: canned answers, little CPU.

The benchmarks measure the gateway on a 2-core machine where the upstream shares its
cores. `tests/fake_upstream.py` (aiohttp, every fault, a JSON document built per chunk)
spends about 190 µs of CPU per request and 0.8 ms building a 200-chunk stream before its
first chunk: a third of a core taken from the gateway under load, which a real
provider, running elsewhere, never takes. This server answers from bytes prepared at
start: HTTP/1.1 keep-alive on an asyncio protocol, a JSON completion, or an SSE stream
written one event per write. Unpaced, the writes go out back to back and the gateway
reads the stream in a few reads (a burst, which it relays in a few messages); with
`event_gap_s` each event waits that long after the one before, as a provider's tokens
do, so each arrives on its own. No faults, no recording: the fault-injecting fake stays
the upstream of every test.
"""

from __future__ import annotations

import asyncio
from typing import cast

import orjson

_HEAD_END = b"\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024


def _unary_body(model: str, content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-lean",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    )


def _chunk(model: str, delta: dict[str, str], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-lean",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return _sse(orjson.dumps(event))


def _sse(data: bytes) -> bytes:
    """One SSE event as one HTTP chunk (chunked transfer encoding)."""
    payload = b"data: " + data + b"\n\n"
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class Answers:
    """The bytes of every answer, built once."""

    def __init__(
        self,
        model: str,
        content: str,
        chunks: int,
        *,
        event_gap_s: float = 0,
        first_event_gap_s: float = 0,
    ) -> None:
        self.event_gap_s = event_gap_s
        self.first_event_gap_s = first_event_gap_s
        body = _unary_body(model, content)
        self.unary = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        words = content.split(" ")
        per_chunk = max(1, len(words) // max(1, chunks))
        starts = range(0, len(words), per_chunk)
        pieces = [(" " if i else "") + " ".join(words[i : i + per_chunk]) for i in starts]
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        self.stream = [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunk(model, {"role": "assistant"}),
            *(_chunk(model, {"content": piece}) for piece in pieces),
            _chunk(model, {}, "stop"),
            _sse(orjson.dumps({"id": "chatcmpl-lean", "choices": [], "usage": usage})),
            _sse(b"[DONE]") + b"0\r\n\r\n",
        ]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: reads requests, writes the canned answer to each."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._buffer = b""
        self._transport: asyncio.WriteTransport | None = None
        self._paced: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (request := self._next_request()) is not None:
            self._answer(request)

    def _next_request(self) -> bytes | None:
        """The body of the next whole request in the buffer, taken out of it."""
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES and self._transport is not None:
                self._transport.close()
            return None
        length = 0
        for line in self._buffer[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        start = end + len(_HEAD_END)
        if len(self._buffer) < start + length:
            return None
        body = self._buffer[start : start + length]
        self._buffer = self._buffer[start + length :]
        return body

    def _answer(self, body: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            wants_stream = orjson.loads(body).get("stream") is True
        except (orjson.JSONDecodeError, AttributeError):
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        if not wants_stream:
            transport.write(self._answers.unary)
        elif self._answers.event_gap_s > 0:
            self._paced = asyncio.get_running_loop().create_task(self._write_paced(transport))
        elif self._answers.first_event_gap_s > 0:
            # The head, the role and the first text now; the rest at once after the gap.
            stream = self._answers.stream
            transport.writelines(stream[:2])
            self._later = asyncio.get_running_loop().call_later(
                self._answers.first_event_gap_s, transport.writelines, stream[2:]
            )
        else:
            for event in self._answers.stream:
                transport.write(event)

    async def _write_paced(self, transport: asyncio.WriteTransport) -> None:
        for index, event in enumerate(self._answers.stream):
            if index:
                await asyncio.sleep(self._answers.event_gap_s)
            if transport.is_closing():
                return
            transport.write(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._paced is not None:
            self._paced.cancel()
        if self._later is not None:
            self._later.cancel()


async def serve(answers: Answers, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Listen on `host:port` (0: any free port) and answer every request from `answers`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(answers), host, port)
