"""A real-socket fake of an OpenAI chat-completions upstream that can inject faults."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NoReturn, TypeAlias, assert_never

from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "Behaviour",
    "CutStream",
    "EndWithoutDone",
    "FakeUpstream",
    "Hang",
    "MalformedSSE",
    "RecordedRequest",
    "Reply",
    "Reset",
    "Status",
    "ToolCallReply",
]

_SPLIT_PAUSE_S = 0.002
_FLUSH_PAUSE_S = 0.02
_SHUTDOWN_TIMEOUT_S = 0.5

_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout_error", "timeout"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One chat-completions request as the fake upstream received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float


@dataclass(frozen=True, slots=True)
class ToolCallReply:
    """One tool call a Reply makes; `arguments` is sent as written."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful completion, streamed as SSE when the request asks for it.

    With `tool_calls`, an empty `content` is sent as null; a stream sends each call's id
    and name first, then its arguments in `tool_call_pieces` pieces (each call in turn,
    or round robin with `interleave_tool_calls`), at the upstream indexes
    `tool_call_index_base` on (or at `tool_call_indexes`, one a call: Ollama sends 0 for
    every call). `raw_tool_calls` is sent as is instead (the message's
    `tool_calls`, or one delta's); a stream sends `raw_tool_call_deltas` instead of the
    calls' pieces, each as one delta's `tool_calls`. `cut_after_events` resets the
    connection after that many events of a stream (the role event included), and
    `cut_before_done` once every event but `[DONE]` went out (its usage included).

    `reasoning` is sent as the message's `reasoning_field` (DeepSeek's `reasoning_content`,
    or OpenRouter's `reasoning`), and streamed in `reasoning_pieces` pieces before the
    content; `raw_reasoning` is sent as is instead (the message's, or one delta's).
    `reasoning_tokens`, when set, is sent as is in `usage.completion_tokens_details`.
    `raw_usages` are sent as is instead of the counts' usage object: a stream sends each
    in a usage-only chunk of its own, in order, and a unary answer the last.

    `raw_message` is sent as is as a unary answer's `message`, and `raw_deltas` as a
    stream's deltas after its role event (each in an event of its own), in place of
    everything the fields above would send there.
    """

    content: str = "Hello from fake"
    finish_reason: str | None = "stop"
    prompt_tokens: int = 7
    completion_tokens: int = 3
    cached_tokens: int = 0
    include_usage: bool = True
    model: str | None = None
    completion_id: str | None = None  # the answer's `id`, else a fresh one
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunks: int = 3
    chunk_delay_s: float = 0.0
    crlf: bool = False
    keepalive_comments: bool = False
    split_events: bool = False
    coalesce: bool = False
    # Answer one JSON completion even when the request asks for a stream, as some
    # OpenAI-compatible servers do.
    ignore_stream: bool = False
    tool_calls: tuple[ToolCallReply, ...] = ()
    tool_call_pieces: int = 3
    interleave_tool_calls: bool = False
    tool_call_index_base: int = 0
    tool_call_indexes: tuple[int, ...] = ()
    raw_tool_calls: Any = None
    raw_tool_call_deltas: tuple[Any, ...] = ()
    cut_after_events: int | None = None
    cut_before_done: bool = False
    reasoning: str = ""
    reasoning_field: str = "reasoning_content"
    reasoning_pieces: int = 3
    raw_reasoning: Any = None
    reasoning_tokens: Any = None
    raw_usages: tuple[Any, ...] = ()
    # OpenAI's `refusal`: sent with `content: null` (unary), or as `refusal` deltas in
    # `chunks` pieces in place of the content's (stream).
    refusal: str = ""
    # The index the answer's choice is numbered with (some proxies number from 1).
    choice_index: int = 0
    raw_message: Any = None
    raw_deltas: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Status:
    """A bare HTTP status answer, with an OpenAI-style error body unless one is given."""

    code: int
    body: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body_delay_s: float = 0.0  # the status and headers at once, the body this much later


@dataclass(frozen=True, slots=True)
class Hang:
    """Accept the request and never answer until the client goes away.

    `after` is what goes out before the hang: nothing (`request`), an event stream's
    status and headers (`headers`), or those, a role-only chunk and a keep-alive comment
    (`role_chunk`), as a provider's overloaded queue or a wedged vLLM sends.
    """

    after: Literal["request", "headers", "role_chunk"] = "request"


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset the TCP connection before any response header is sent, `delay_s` after the
    request arrived."""

    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CutStream:
    """Stream one word per chunk, then reset the connection after `after_chunks` of them."""

    after_chunks: int
    content: str = "a b c d e f"


@dataclass(frozen=True, slots=True)
class EndWithoutDone:
    """Stream `after_chunks` word chunks, then end the response cleanly with no finish or [DONE]."""

    after_chunks: int
    content: str = "a b c d e f"


@dataclass(frozen=True, slots=True)
class MalformedSSE:
    """Stream word chunks with one bad `data:` event after `after_chunks` of them."""

    after_chunks: int = 1
    payload: str = "{not json"
    content: str = "a b c d e f"
    coalesce: bool = False  # every event in one write, so the client reads them together


Behaviour: TypeAlias = Reply | Status | Hang | Reset | CutStream | EndWithoutDone | MalformedSSE


@dataclass(frozen=True, slots=True)
class _Framing:
    """How SSE events are laid out on the wire."""

    crlf: bool = False
    keepalive_comments: bool = False
    split_events: bool = False
    coalesce: bool = False
    chunk_delay_s: float = 0.0


class _ServerAborted(Exception):
    """Raised after the fake deliberately aborted its own connection."""


def error_body(message: str, code: int) -> dict[str, Any]:
    """Build an OpenAI-style error object for an HTTP status."""
    kind, err_code = _ERROR_KINDS.get(
        code, ("server_error" if code >= 500 else "invalid_request_error", str(code))
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": err_code}}


def split_even(content: str, parts: int) -> list[str]:
    """Split text into at most `parts` non-empty pieces whose lengths differ by at most one."""
    n = min(max(parts, 1), len(content))
    if n == 0:
        return []
    size, extra = divmod(len(content), n)
    pieces: list[str] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(content[start:end])
        start = end
    return pieces


def split_words(content: str) -> list[str]:
    """Split text into words, each after the first keeping its leading space."""
    words = content.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words) if w or i == 0]


class FakeUpstream:
    """An aiohttp server on 127.0.0.1 that plays scripted OpenAI behaviours."""

    def __init__(
        self,
        *,
        models: Sequence[str] = ("fake-model",),
        api_key: str | None = None,
        default: Behaviour | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Configure the fake; the server starts on `start()` or `async with`.
        `ssl_context`: serve HTTPS with it (`base_url` stays `http://`: build your own)."""
        self._ssl_context = ssl_context
        self.port: int = 0
        self.requests: list[RecordedRequest] = []
        self.disconnects: int = 0
        self.default: Behaviour = default if default is not None else Reply()
        # None: the list is `"data": null`, as servers written in Go send an empty one.
        self.models: list[str] | None = list(models)
        self.models_status = 200  # another: /models answers it, with an error body
        self.api_key: str | None = api_key
        self._queue: deque[Behaviour] = deque()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._disconnect_event = asyncio.Event()
        self._disconnects_awaited = 0
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. `http://127.0.0.1:PORT/v1`."""
        if self._runner is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, one per request, before `default` applies."""
        self._queue.extend(behaviours)

    def open_connections(self) -> int:
        """Count TCP connections to the server that are currently open."""
        if self._runner is None or self._runner.server is None:
            return 0
        return sum(1 for h in self._runner.server.connections if h.transport is not None)

    async def wait_for_disconnect(self, timeout_s: float = 5.0) -> None:
        """Wait for a disconnect not consumed by an earlier call, else raise TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while self.disconnects <= self._disconnects_awaited:
                self._disconnect_event.clear()
                await self._disconnect_event.wait()
        self._disconnects_awaited += 1

    async def start(self) -> None:
        """Bind to an ephemeral port on 127.0.0.1 and start serving."""
        # aiohttp refuses bodies over 1 MiB (413); providers take prompts of megabytes.
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._ssl_context)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Drop every open connection and stop the server without waiting on handlers."""
        runner = self._runner
        if runner is None:
            return
        self._closing = True
        if runner.server is not None:
            for handler in runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        await runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.close()

    def _note_disconnect(self) -> None:
        """Count one client disconnect and wake waiters."""
        self.disconnects += 1
        self._disconnect_event.set()

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """Return a 401 response when an API key is configured and not presented."""
        if self.api_key is None:
            return None
        if request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _json(error_body("Incorrect API key provided.", 401), 401, {})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """Serve the model list."""
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        if self.models_status != 200:
            status = self.models_status
            return _json(error_body(f"HTTP {status}", status), status, {})
        listed = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
            for m in self.models or ()
        ]
        data = None if self.models is None else listed
        return _json({"object": "list", "data": data}, 200, {})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """Record the request and play the next behaviour."""
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = None
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        self.requests.append(
            RecordedRequest(
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                received_at=time.monotonic(),
            )
        )
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        if not isinstance(parsed, dict):
            return _json(error_body("Request body is not a JSON object.", 400), 400, {})
        behaviour = self._queue.popleft() if self._queue else self.default
        try:
            return await self._play(request, body, behaviour)
        except _ServerAborted:
            raise asyncio.CancelledError from None
        except (asyncio.CancelledError, ConnectionError):
            if not self._closing:
                self._note_disconnect()
            raise asyncio.CancelledError from None

    async def _play(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        """Produce the response for one behaviour."""
        model = str(body.get("model") or "fake-model")
        usage_requested = bool((body.get("stream_options") or {}).get("include_usage"))
        match behaviour:
            case Reply():
                if behaviour.delay_s > 0:
                    await asyncio.sleep(behaviour.delay_s)
                model = behaviour.model or model
                if body.get("stream") is True and not behaviour.ignore_stream:
                    return await self._stream_reply(request, behaviour, model, usage_requested)
                return _json(self._completion(behaviour, model), 200, behaviour.headers)
            case Status():
                if behaviour.delay_s > 0:
                    await asyncio.sleep(behaviour.delay_s)
                if behaviour.body_delay_s > 0:
                    return await self._slow_status(request, behaviour)
                return self._status(behaviour)
            case Hang():
                if behaviour.after != "request":
                    resp = await self._open_sse(request, {})  # sends the headers at once
                    if behaviour.after == "role_chunk":
                        role = self._chunk(self._new_id(), model, {"role": "assistant"})
                        await _send(resp, [role], _Framing())
                        await resp.write(_comment(_Framing()))
                await _wait_forever()
            case Reset():
                if behaviour.delay_s > 0:
                    await asyncio.sleep(behaviour.delay_s)
                _abort(request)
            case CutStream():
                await self._partial_stream(
                    request, model, behaviour.content, behaviour.after_chunks
                )
                await asyncio.sleep(_FLUSH_PAUSE_S)
                _abort(request)
            case EndWithoutDone():
                resp = await self._partial_stream(
                    request, model, behaviour.content, behaviour.after_chunks
                )
                await resp.write_eof()
                return resp
            case MalformedSSE():
                resp = await self._open_sse(request, {})
                cid = self._new_id()
                pieces = split_words(behaviour.content)
                k = behaviour.after_chunks
                events = [self._chunk(cid, model, {"role": "assistant"})]
                events += [self._chunk(cid, model, {"content": p}) for p in pieces[:k]]
                events.append(behaviour.payload)
                events += [self._chunk(cid, model, {"content": p}) for p in pieces[k:]]
                events.append(self._chunk(cid, model, {}, "stop"))
                if usage_requested:
                    events.append(self._usage_chunk(cid, model, _usage(Reply())))
                events.append("[DONE]")
                await _send(resp, events, _Framing(coalesce=behaviour.coalesce))
                await resp.write_eof()
                return resp
        assert_never(behaviour)

    def _new_id(self) -> str:
        """Return a fresh completion id."""
        return f"chatcmpl-fake-{next(self._ids)}"

    def _completion(self, reply: Reply, model: str) -> dict[str, Any]:
        """Build a non-streaming `chat.completion` object."""
        out: dict[str, Any] = {
            "id": self._new_id() if reply.completion_id is None else reply.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": reply.choice_index,
                    "message": _message(reply),
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.include_usage:
            out["usage"] = reply.raw_usages[-1] if reply.raw_usages else _usage(reply)
        return out

    @staticmethod
    def _chunk(
        cid: str,
        model: str,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        *,
        index: int = 0,
    ) -> str:
        """Serialise one `chat.completion.chunk` with a single choice, at `index`."""
        return json.dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    @staticmethod
    def _usage_chunk(cid: str, model: str, usage: Any) -> str:
        """Serialise a trailing usage-only chunk."""
        return json.dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )

    async def _open_sse(
        self, request: web.Request, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """Send the headers of an SSE response."""
        merged = CIMultiDict({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        merged.update(headers)
        resp = web.StreamResponse(headers=merged)
        await resp.prepare(request)
        return resp

    async def _partial_stream(
        self, request: web.Request, model: str, content: str, after_chunks: int
    ) -> web.StreamResponse:
        """Open an SSE response and send the role chunk plus `after_chunks` word chunks."""
        resp = await self._open_sse(request, {})
        cid = self._new_id()
        events = [self._chunk(cid, model, {"role": "assistant"})]
        events += [
            self._chunk(cid, model, {"content": piece})
            for piece in split_words(content)[:after_chunks]
        ]
        await _send(resp, events, _Framing())
        return resp

    async def _stream_reply(
        self, request: web.Request, reply: Reply, model: str, usage_requested: bool
    ) -> web.StreamResponse:
        """Stream a Reply as SSE chunks ending in [DONE]."""
        resp = await self._open_sse(request, reply.headers)
        cid = self._new_id() if reply.completion_id is None else reply.completion_id
        chunk = functools.partial(self._chunk, cid, model, index=reply.choice_index)
        events = [chunk({"role": "assistant"})]
        if reply.raw_deltas:
            events += [chunk(delta) for delta in reply.raw_deltas]
        else:
            events += [chunk(delta) for delta in _reasoning_deltas(reply)]
            events += [
                chunk({"content": piece})
                for piece in split_even("" if reply.refusal else reply.content, reply.chunks)
            ]
            events += [
                chunk({"content": None, "refusal": piece})
                for piece in split_even(reply.refusal, reply.chunks)
            ]
            events += [chunk(delta) for delta in _tool_call_deltas(reply)]
        if reply.cut_after_events is not None:
            await _send(resp, events[: reply.cut_after_events], _Framing())
            await asyncio.sleep(_FLUSH_PAUSE_S)
            _abort(request)
        if reply.finish_reason is not None:
            events.append(chunk({}, reply.finish_reason))
        if reply.include_usage and usage_requested:
            usages = reply.raw_usages or (_usage(reply),)
            events += [self._usage_chunk(cid, model, counts) for counts in usages]
        if reply.cut_before_done:
            await _send(resp, events, _Framing())
            await asyncio.sleep(_FLUSH_PAUSE_S)
            _abort(request)
        events.append("[DONE]")
        framing = _Framing(
            crlf=reply.crlf,
            keepalive_comments=reply.keepalive_comments,
            split_events=reply.split_events,
            coalesce=reply.coalesce,
            chunk_delay_s=reply.chunk_delay_s,
        )
        await _send(resp, events, framing)
        await resp.write_eof()
        return resp

    @staticmethod
    async def _slow_status(request: web.Request, status: Status) -> web.StreamResponse:
        """Send a Status behaviour's status and headers, and its body `body_delay_s` later."""
        headers = CIMultiDict({"Content-Type": "application/json"})
        headers.update(status.headers)
        resp = web.StreamResponse(status=status.code, headers=headers)
        await resp.prepare(request)
        await resp.write(b" ")  # JSON may start with a space: the status goes out now
        await asyncio.sleep(status.body_delay_s)
        body = status.body or json.dumps(error_body(f"Fake status {status.code}.", status.code))
        await resp.write(body.encode())
        await resp.write_eof()
        return resp

    @staticmethod
    def _status(status: Status) -> web.Response:
        """Build the response for a Status behaviour."""
        if status.body is None:
            return _json(
                error_body(f"Fake upstream status {status.code}.", status.code),
                status.code,
                status.headers,
            )
        merged = CIMultiDict({"Content-Type": "application/json"})
        merged.update(status.headers)
        return web.Response(status=status.code, text=status.body, headers=merged)


def _message(reply: Reply) -> dict[str, Any]:
    """The `message` of a unary Reply."""
    if reply.raw_message is not None:
        return dict(reply.raw_message)
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.refusal:
        message.update(content=None, refusal=reply.refusal)
    if reply.raw_reasoning is not None:
        message[reply.reasoning_field] = reply.raw_reasoning
    elif reply.reasoning:
        message[reply.reasoning_field] = reply.reasoning
    if reply.raw_tool_calls is not None:
        message["tool_calls"] = reply.raw_tool_calls
    elif reply.tool_calls:
        message["content"] = reply.content or None
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return message


def _reasoning_deltas(reply: Reply) -> list[dict[str, Any]]:
    """The `delta`s that stream a Reply's reasoning, before its content."""
    if reply.raw_reasoning is not None:
        return [{reply.reasoning_field: reply.raw_reasoning}]
    return [
        {"content": None, reply.reasoning_field: piece}
        for piece in split_even(reply.reasoning, reply.reasoning_pieces)
    ]


def _tool_call_deltas(reply: Reply) -> list[dict[str, Any]]:
    """The `delta`s that stream a Reply's tool calls, in OpenAI's shape."""
    if reply.raw_tool_calls is not None:
        return [{"tool_calls": reply.raw_tool_calls}]
    if reply.raw_tool_call_deltas:
        return [{"tool_calls": pieces} for pieces in reply.raw_tool_call_deltas]
    indexes = reply.tool_call_indexes or [
        reply.tool_call_index_base + i for i in range(len(reply.tool_calls))
    ]
    heads = [
        {
            "index": indexes[i],
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        for i, call in enumerate(reply.tool_calls)
    ]
    pieces = [
        [
            {"index": indexes[i], "function": {"arguments": piece}}
            for piece in split_even(call.arguments, reply.tool_call_pieces)
        ]
        for i, call in enumerate(reply.tool_calls)
    ]
    if reply.interleave_tool_calls:
        order = [heads] + [
            [p[k] for p in pieces if k < len(p)]
            for k in range(max((len(p) for p in pieces), default=0))
        ]
        return [{"tool_calls": [item]} for group in order for item in group]
    return [
        {"tool_calls": [item]}
        for head, rest in zip(heads, pieces, strict=True)
        for item in (head, *rest)
    ]


def _json(obj: Any, status: int, headers: Mapping[str, str]) -> web.Response:
    """Build a JSON response whose headers may override the content type."""
    merged = CIMultiDict({"Content-Type": "application/json"})
    merged.update(headers)
    return web.Response(status=status, text=json.dumps(obj), headers=merged)


def _usage(reply: Reply) -> dict[str, Any]:
    """Build the OpenAI usage object for a Reply."""
    usage: dict[str, Any] = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }
    if reply.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
    return usage


def _frame(payload: str, framing: _Framing) -> bytes:
    """Encode one `data:` event."""
    nl = "\r\n" if framing.crlf else "\n"
    return f"data: {payload}{nl}{nl}".encode()


def _comment(framing: _Framing) -> bytes:
    """Encode one keep-alive comment."""
    nl = "\r\n" if framing.crlf else "\n"
    return f": keep-alive{nl}{nl}".encode()


async def _send(resp: web.StreamResponse, events: Sequence[str], framing: _Framing) -> None:
    """Write SSE events with the requested framing quirks."""
    frames: list[bytes] = []
    for i, payload in enumerate(events):
        if i > 0 and framing.keepalive_comments:
            frames.append(_comment(framing))
        frames.append(_frame(payload, framing))
    if framing.coalesce:
        await resp.write(b"".join(frames))
        return
    for i, frame in enumerate(frames):
        if i > 0 and framing.chunk_delay_s > 0 and not frame.startswith(b":"):
            await asyncio.sleep(framing.chunk_delay_s)
        if framing.split_events and len(frame) > 4:
            for part in (frame[:3], frame[3:-1], frame[-1:]):
                await resp.write(part)
                await asyncio.sleep(_SPLIT_PAUSE_S)
        else:
            await resp.write(frame)


async def _wait_forever() -> NoReturn:
    """Block until the surrounding task is cancelled."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("a never-resolved future resolved")


def _abort(request: web.Request) -> NoReturn:
    """Reset the connection with an RST and stop handling the request."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _ServerAborted
