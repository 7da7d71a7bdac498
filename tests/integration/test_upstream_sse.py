"""Real providers' SSE quirks, byte for byte from a raw socket upstream, through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc
import orjson
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream, Status
from tests.integration.test_resilience import error_details
from tests.integration.test_upstream_http import read_request, serving, settled
from tests.secret_capture import PROVIDER_KEY

DETERMINISTIC = pb.GenerationParams(temperature=0.0)
# Retries without waiting long for them.
FAST_RETRIES = {"attempts": 3, "backoff_base_s": 0.01, "backoff_cap_s": 0.05}


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice], **extra})


USAGE = event(
    {
        "id": "c1",
        "model": FAKE_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
)
DONE = b"data: [DONE]\n\n"


# How a body is framed: the chunked encoding, a Content-Length, or neither (the body ends
# at the close, or is cut by a reset); the last two end the connection after one answer.
Framing = Literal["chunked", "length", "close", "reset"]
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


class SSEUpstream:
    """Answers every request with `body` in one write, chunked on a keep-alive connection
    unless `framing` says otherwise.

    With `end_when`, the chunked encoding's last chunk waits for that event (cleared for the
    next request): a server that writes it separately, after the caller is done.
    """

    def __init__(
        self,
        body: bytes,
        *,
        end_when: asyncio.Event | None = None,
        framing: Framing = "chunked",
    ) -> None:
        self.body = body
        self.end_when = end_when
        self.framing = framing
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        # Open connections' handlers: closed and awaited on exit, not cancelled with the loop.
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                if self.framing == "chunked":
                    await self._answer_chunked(writer)
                elif self.framing == "length":
                    body = b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body)
                    writer.write(_HEAD + body)
                    await writer.drain()
                else:
                    await self._answer_until_close(writer)
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            del self._handlers[task]

    async def _answer_chunked(self, writer: asyncio.StreamWriter) -> None:
        answer = _HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        answer += b"%x\r\n%s\r\n" % (len(self.body), self.body)
        if self.end_when is not None:
            writer.write(answer)
            await writer.drain()
            await self.end_when.wait()
            self.end_when.clear()
            answer = b""
        writer.write(answer + b"0\r\n\r\n")
        await writer.drain()

    async def _answer_until_close(self, writer: asyncio.StreamWriter) -> None:
        """A body without a length, ended by the close (`_serve`'s) or cut by a reset."""
        writer.write(_HEAD + b"\r\n" + self.body)
        await writer.drain()
        if self.framing == "reset":
            await asyncio.sleep(0.05)  # let the gateway read the body before the reset
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # SO_LINGER 0: the close sends a reset

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        handlers = list(self._handlers.items())
        for _, writer in handlers:
            writer.close()  # a handler waiting for the next request reads the end and returns
        await asyncio.gather(*(task for task, _ in handlers), return_exceptions=True)


async def relay(
    gateway: Any, request: pb.CompleteStreamRequest
) -> tuple[str, pb.CompleteStreamResponse | None, grpc.aio.AioRpcError | None]:
    """The text a stream relayed, its final message, and its error."""
    items: list[pb.CompleteStreamResponse] = []
    error = None
    try:
        async for item in gateway.stub.CompleteStream(request, timeout=5):
            items.append(item)
    except grpc.aio.AioRpcError as exc:
        error = exc
    text = "".join(i.delta.content for i in items if i.WhichOneof("event") == "delta")
    final = items[-1] if items and items[-1].WhichOneof("event") == "final" else None
    return text, final, error


async def relayed_cleanly(
    start_gateway: Callable[..., Any], body: bytes, text: str, *, framing: Framing = "chunked"
) -> pb.CompletionMetadata:
    """`body` streamed through a gateway: the caller got `text` and a clean stop; its final."""
    async with SSEUpstream(body, framing=framing) as url:
        gateway = await start_gateway(gateway_config(url))
        relayed, final, error = await relay(gateway, chat_stream("hi"))
    assert error is None
    assert relayed == text
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    return final.final


async def test_a_byte_order_mark_before_the_first_event_loses_no_text(
    start_gateway: Callable[..., Any],
) -> None:
    """A UTF-8 BOM opening the stream is skipped (as the SSE spec says), not the first event."""
    body = b"\xef\xbb\xbf" + chunk("Hel") + chunk("lo", "stop") + USAGE + DONE
    await relayed_cleanly(start_gateway, body, "Hello")


# OpenRouter's mid-stream failure: HTTP 200 long since sent, so the error comes as an event
# with a top-level `error` and the choice finished with "error".
OPENROUTER_ERROR = chunk(
    "", "error", error={"code": 502, "message": "Provider disconnected unexpectedly"}
)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(OPENROUTER_ERROR, id="error-object-and-finish-error"),
        pytest.param(chunk("", "error"), id="finish-error"),
        pytest.param(
            chunk("", "insufficient_system_resource"), id="deepseek-insufficient-resource"
        ),
        pytest.param(chunk("", "abort"), id="vllm-abort"),
    ],
)
async def test_an_upstream_error_after_the_first_token_is_an_interrupted_stream(
    start_gateway: Callable[..., Any], failure: bytes
) -> None:
    """An error reported in a chunk that still has choices fails the stream; it is no stop.

    Taken for a clean finish, the caller would get a cut answer as complete, and the
    cache would store it and replay it to everyone after.
    """
    body = chunk("Hel") + failure + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url, cache={"backend": "memory"}))
        request = chat_stream("hi", params=DETERMINISTIC)
        text, final, error = await relay(gateway, request)
        assert gateway.server.pipeline.cache.stats.stores == 0
    assert text == "Hel"
    assert final is None
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)[1] == "STREAM_INTERRUPTED"


# OpenRouter's failure before any output: its 200 and its keep-alive comments went out
# while a provider was still being tried, so the error the provider gave comes as an event.
PROCESSING = b": OPENROUTER PROCESSING\n\n"
RATE_LIMITED_EVENT = event({"error": {"code": 429, "message": "Rate limit exceeded"}})
TOO_LONG_EVENT = event(
    {"error": {"code": 400, "message": "This model's maximum context length is 8192 tokens"}}
)
# llama.cpp's server (builds through 2025) writes its error as an `error:` field, which the
# SSE spec would ignore, and a prompt over its context window is one.
LLAMA_CPP_TOO_LONG = (
    b'error: {"code":400,"message":"the request exceeds the available context size. try '
    b'increasing the context size or enable context shift","type":"invalid_request_error"}\n\n'
)
# An `event: error` event whose data is the error object itself, with no `error` around it.
RATE_LIMITED_ERROR_EVENT = b"event: error\n" + event({"code": 429, "message": "Slow down"})


@pytest.mark.parametrize(
    "case",
    [
        (RATE_LIMITED_EVENT, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 3),
        (TOO_LONG_EVENT, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED", 1),
        (LLAMA_CPP_TOO_LONG, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED", 1),
        (
            RATE_LIMITED_ERROR_EVENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            3,
        ),
    ],
    ids=["rate-limited", "context-exceeded", "llama-cpp-error-field", "bare-error-event"],
)
async def test_an_error_event_before_any_output_is_the_error_it_names(
    start_gateway: Callable[..., Any], case: tuple[bytes, grpc.StatusCode, str, int]
) -> None:
    """A stream whose first event is an error object, in place of the answer, fails as a
    200 whose body is that error does: a rate limit is retried as one, a prompt over the
    window is the caller's to shorten; neither is billed nor counts against the
    upstream's health (not a malformed answer, retried, charged and failing its breaker).
    Each case: the event, then the status, the ErrorInfo reason and the attempts."""
    failure, code, reason, attempts = case
    upstream = SSEUpstream(PROCESSING + failure + DONE)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
    assert (text, final) == ("", None)
    assert error is not None
    assert error.code() is code
    assert error_details(error)[1] == reason
    assert upstream.requests == attempts
    assert (usage.total.requests, usage.total.cost_usd, len(usage.rows)) == (0, 0.0, 0)
    health = {status.health for model in models.models for status in model.upstreams}
    assert health == {pb.UPSTREAM_HEALTH_HEALTHY}


async def test_a_null_error_field_is_no_error(start_gateway: Callable[..., Any]) -> None:
    """`"error": null` beside the usage says there was none: the stream ends cleanly."""
    usage = event(
        {
            "id": "c1",
            "model": FAKE_MODEL,
            "choices": [],
            "error": None,
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    )
    final = await relayed_cleanly(
        start_gateway, chunk("Hel") + chunk("lo", "stop") + usage + DONE, "Hello"
    )
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)
    assert not final.usage.estimated


async def test_a_stream_whose_last_chunk_comes_late_leaves_its_connection_reusable(
    start_gateway: Callable[..., Any],
) -> None:
    """Three streams, each answered before the upstream ends its body: one connection.

    The gateway stops reading at `[DONE]`; a server that writes the chunked encoding's
    last chunk separately has it arrive after that, and the connection was then closed
    instead of reused (a new TLS handshake for the next call to a real provider).
    """
    end = asyncio.Event()
    upstream = SSEUpstream(chunk("hi") + chunk(None, "stop") + USAGE + DONE, end_when=end)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        client = gateway.server.pipeline.pool.clients[0]
        for _ in range(3):
            text, final, error = await relay(gateway, chat_stream("hi"))
            assert (text, error) == ("hi", None)
            assert final is not None
            assert final.final.finish_reason == pb.FINISH_REASON_STOP
            end.set()  # only now, after the caller has its answer
            await settled(lambda: client.checked_out_connections == 0)
        assert upstream.connections == 1
        assert client.open_connections == 1


@pytest.mark.parametrize(
    "empty",
    [
        pytest.param(b"data:\n\n", id="data-colon-alone"),
        pytest.param(b"data: \n\n", id="data-colon-space"),
        pytest.param(b"data:\ndata:\n\n", id="two-empty-data-lines"),
        pytest.param(b"event: ping\nid: 7\n: keep-alive\ndata:\n\n", id="with-other-fields"),
    ],
)
async def test_an_event_with_empty_data_is_skipped(
    start_gateway: Callable[..., Any], empty: bytes
) -> None:
    """An event whose data is empty carries no chunk: skipped, before and amid the text.

    The SSE spec dispatches it (with empty data); taken for a chunk it is no JSON, and the
    stream failed after its first text.
    """
    body = empty + chunk("Hel") + empty + chunk("lo", "stop") + empty + USAGE + DONE
    final = await relayed_cleanly(start_gateway, body, "Hello")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)


def named(content: str | None, finish: str | None = None, **names: str) -> bytes:
    """A chunk that names its `id` and `model` only as `names` say."""
    delta = {} if content is None else {"content": content}
    return event({**names, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


UNNAMED_USAGE = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            named(None, id="c1") + named("Hello", "stop", id="c1", model="real-7b") + DONE,
            id="role-chunk-without-model",
        ),
        pytest.param(
            named("Hel", id="", model="real-7b")
            + named("lo", "stop", id="", model="real-7b")
            + UNNAMED_USAGE
            + DONE,
            id="no-id-and-a-usage-chunk-without-model",
        ),
        pytest.param(
            named("Hel", id="c\x1b[2J", model="real-7b")
            + named("lo", "stop", id="c\x1b[2J")
            + DONE,
            id="unprintable-id-and-a-chunk-without-model",
        ),
    ],
)
async def test_a_streams_model_is_the_one_its_events_named(
    start_gateway: Callable[..., Any], body: bytes
) -> None:
    """A stream's model is the first its events name, wherever that is: the caller (and
    the cache, and the spans) were told the model the gateway asked for when the event
    that gave the id named none, or a later one without an id named none."""
    final = await relayed_cleanly(start_gateway, body, "Hello")
    assert final.model == "real-7b"


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
@pytest.mark.parametrize(
    "done", [b"data: [DONE]", b"data: [DONE]\n", b"data: [DONE]\r\n"], ids=repr
)
async def test_a_body_that_ends_cleanly_after_a_whole_done_line_has_finished(
    start_gateway: Callable[..., Any], framing: Framing, done: bytes
) -> None:
    """`[DONE]` without its blank line, then the body's clean end: the upstream finished.

    The stream failed as cut, after its text, though the upstream had said it was done.
    """
    body = chunk("Hel") + chunk("lo", "stop") + USAGE + done
    final = await relayed_cleanly(start_gateway, body, "Hello", framing=framing)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)
    assert not final.usage.estimated


@pytest.mark.parametrize(
    "done",
    [b"data: [DONE] \n\n", b"data:  [DONE]\n\n", b"data: [DONE]\t"],
    ids=["trailing-space", "two-spaces", "at-the-end-with-a-tab"],
)
async def test_a_done_line_with_blanks_around_it_ends_the_stream_cleanly(
    start_gateway: Callable[..., Any], done: bytes
) -> None:
    """`[DONE]` with a blank beside it (as JSON events may have) ends the stream: the
    whole answer, finished and its usage reported, is no interrupted stream."""
    body = chunk("Hel") + chunk("lo", "stop") + USAGE + done
    final = await relayed_cleanly(start_gateway, body, "Hello", framing="close")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)


@pytest.mark.parametrize(
    ("done", "framing", "said"),
    [
        pytest.param(
            b"data: [DO",
            "chunked",
            "sent a malformed answer: the stream was cut in the middle of an event;",
            id="partial-done-then-clean-end",
        ),
        pytest.param(
            b"data: [DO",
            "close",
            "sent a malformed answer: the stream was cut in the middle of an event;",
            id="partial-done-then-close",
        ),
        pytest.param(b"data: [DONE]\n", "reset", "dropped the connection;", id="done-then-reset"),
    ],
)
async def test_a_body_cut_before_its_finish_reason_is_an_interrupted_stream(
    start_gateway: Callable[..., Any], done: bytes, framing: Framing, said: str
) -> None:
    """A partial `[DONE]` at the body's end, or a whole one before a reset, with no finish
    reason before it: a cut stream, its usage reported or not, that says how it was cut
    (the partial one said "the stream ended without a finish reason", as if whole)."""
    upstream = SSEUpstream(chunk("Hel") + chunk("lo") + USAGE + done, framing=framing)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert text == "Hello"
    assert final is None
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)[1] == "STREAM_INTERRUPTED"
    assert (error.details() or "").startswith(f"upstream 'up0' {said}")
    assert upstream.requests == 1


# What follows a finish reason before the body's end, and how it ends: each leaves only
# the usage or `[DONE]` unread.
AFTER_THE_FINISH = [
    pytest.param(b"", "reset", False, id="reset"),
    pytest.param(USAGE, "reset", True, id="usage-then-reset"),
    pytest.param(USAGE[: len(USAGE) // 2], "reset", False, id="half-a-usage-then-reset"),
    pytest.param(USAGE + b"data: [DONE]\n", "reset", True, id="done-then-reset"),
    pytest.param(USAGE + b"data: [DO", "chunked", True, id="partial-done-then-clean-end"),
    pytest.param(USAGE + b"data: [DO", "close", True, id="partial-done-then-close"),
]


@pytest.mark.parametrize(("after", "framing", "has_usage"), AFTER_THE_FINISH)
async def test_a_stream_cut_after_its_finish_reason_ends_as_finished(
    start_gateway: Callable[..., Any], after: bytes, framing: Framing, has_usage: bool
) -> None:
    """A stream reset (SO_LINGER 0), or ended in the middle of an event, once its text and
    finish reason came ends as finished, as one that stalls there does: its caller has the
    whole answer, and failing it STREAM_INTERRUPTED would have it ask (and pay) again. Its
    usage is the one reported, else estimated."""
    upstream = SSEUpstream(chunk("Hel") + chunk("lo", "stop") + after, framing=framing)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert error is None
    assert text == "Hello"
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    assert final.final.usage.estimated is not has_usage
    if has_usage:
        assert (final.final.usage.input_tokens, final.final.usage.output_tokens) == (3, 2)
    assert (usage.total.requests, upstream.requests) == (1, 1)


async def test_a_unary_call_read_as_a_stream_reset_after_its_finish_reason_is_answered(
    start_gateway: Callable[..., Any],
) -> None:
    """The same reset, from an upstream that takes unary calls as streams
    (`stream_unary_calls`), answers the call: not a cut stream, which was retried (the
    whole answer generated, and billed, again) and failed UNAVAILABLE once every attempt
    was reset."""
    upstream = SSEUpstream(chunk("Hello", "stop") + USAGE, framing="reset")
    async with upstream as url:
        config = gateway_config(url, resilience=FAST_RETRIES)
        streamed = dataclasses.replace(config.upstreams[0], stream_unary_calls=True)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(streamed,)))
        answer = await gateway.stub.Complete(chat("hi"), timeout=8)
    assert answer.content == "Hello"
    assert answer.metadata.finish_reason == pb.FINISH_REASON_STOP
    assert (answer.metadata.usage.input_tokens, answer.metadata.usage.output_tokens) == (3, 2)
    assert (answer.metadata.attempts, upstream.requests) == (1, 1)


async def test_only_the_first_choice_is_relayed_when_an_event_carries_others(
    start_gateway: Callable[..., Any],
) -> None:
    """A choice with another index (a second completion the gateway never asked for) is
    not spliced into the answer's text, nor does its finish end the answer."""
    other = {"index": 1, "delta": {"content": "ZZ"}, "finish_reason": "length"}
    second_only = event({"id": "c1", "model": FAKE_MODEL, "choices": [other]})
    both = event(
        {
            "id": "c1",
            "model": FAKE_MODEL,
            "choices": [other, {"index": 0, "delta": {"content": "l"}, "finish_reason": None}],
        }
    )
    body = chunk("He") + second_only + both + chunk("lo", "stop") + USAGE + DONE
    await relayed_cleanly(start_gateway, body, "Hello")


def at(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    """An event with one choice, at `index`."""
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})


@pytest.mark.parametrize(
    "empty",
    [
        pytest.param({}, id="empty-delta"),
        pytest.param({"content": ""}, id="no-text"),
        pytest.param({"content": []}, id="no-parts"),
    ],
)
async def test_an_empty_index_0_chunk_after_an_answer_numbered_1_is_no_second_choice(
    start_gateway: Callable[..., Any], empty: dict[str, Any]
) -> None:
    """A stream answered at index 1, then a chunk at index 0 carrying nothing (some proxies
    send one): the answer is relayed whole, with its finish and usage. Before, the empty
    chunk counted as a second choice and the stream failed as malformed after its text;
    and an empty list of content parts (Mistral's form) still did."""
    answer = at(1, {"role": "assistant"}) + at(1, {"content": "Hel"}) + at(1, {"content": "lo"})
    body = answer + at(1, {}, "stop") + at(0, empty) + USAGE + DONE
    final = await relayed_cleanly(start_gateway, body, "Hello")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)


@pytest.mark.parametrize(
    "between", [pytest.param(b"", id="alone"), pytest.param(at(0, {}), id="empty-0-between")]
)
async def test_a_stream_naming_two_choices_none_at_0_fails_saying_so(
    start_gateway: Callable[..., Any], between: bytes
) -> None:
    """Chunks of choices 1 and 2 and none at 0: which is the answer is unknown, so the
    stream fails as a malformed answer does, naming the indexes, rather than splicing them;
    an empty chunk at index 0 between them changes nothing."""
    second = at(2, {"content": "ZZ"})
    body = at(1, {"content": "He"}) + between + second + at(1, {"content": "llo"}, "stop")
    body += USAGE + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert (text, final) == ("He", None)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "answer, at index 1, was followed by choices at 2" in (error.details() or "")


def assert_failed_before_any_text(
    text: str, final: pb.CompleteStreamResponse | None, error: grpc.aio.AioRpcError | None
) -> None:
    """The stream sent nothing and failed as an upstream's malformed answer does."""
    assert (text, final) == ("", None)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)[1] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize(
    "content", [pytest.param(v, id=repr(v)) for v in (0, False, {}, [0], [{"type": "text"}])]
)
async def test_delta_content_that_is_no_string_is_a_malformed_stream(
    start_gateway: Callable[..., Any], content: Any
) -> None:
    """Content that is neither a string (or null) nor a list of typed parts (Mistral's),
    or a text part without its text, is malformed, as in a unary answer, even when it is
    falsy: dropped as no text, the answer was served as if whole."""
    bad = event(
        {
            "id": "c1",
            "model": FAKE_MODEL,
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
    )
    body = bad + chunk("Hello", "stop") + USAGE + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert_failed_before_any_text(text, final, error)


async def test_a_stream_event_over_16_mib_is_malformed_even_when_one_read_completes_it(
    start_gateway: Callable[..., Any],
) -> None:
    """An event past 16 MiB whose last bytes arrive in the read that completes it.

    The size was checked only on an event still unfinished after a read, so one that
    stayed within 16 MiB until its last read was parsed and relayed whole.
    """
    limit = 16 * 1024 * 1024
    framing = len(chunk("")) - len(b"data: \n\n")  # the event's data but its text
    big = chunk("x" * (limit + 200 - framing))  # data 200 bytes over the limit
    body = big + chunk(None, "stop") + USAGE + DONE
    tail = len(body) - len(big) + 1000  # with the event's last bytes, in a later read

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n" + body[:-tail])
        await writer.drain()
        await asyncio.sleep(0.3)  # the gateway reads all of it before the rest comes
        writer.write(body[-tail:])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(gateway_config(url, resilience={"attempts": 1}))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert_failed_before_any_text(text, final, error)


async def test_an_unfinished_event_of_empty_data_lines_is_bounded_too(
    start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `data:` line of an event adds a line to its data, empty or not.

    Its size was counted without them, so an event of empty `data:` lines that never ended
    counted 0 bytes however long it grew: the gateway read it (a list entry a line) until
    the caller's deadline, never ending it at the limit on one event's size. The limit is
    made 64 KiB here so that passing it takes 600 KB, not 100 MB.
    """
    limit = 64 * 1024
    monkeypatch.setattr("service.upstream.client._MAX_ANSWER_SIZE", limit)
    finished = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n" + chunk("Hel") + b"data:\n" * (2 * limit))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await finished.wait()  # never the blank line that would end the event
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(gateway_config(url))
        deltas: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in gateway.stub.CompleteStream(chat_stream("hi"), timeout=5):
                deltas.append(message.delta.content)
        finished.set()
    assert deltas == ["Hel"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)[1] == "STREAM_INTERRUPTED"


async def test_keep_alive_comments_do_not_hold_off_the_idle_timeout(
    start_gateway: Callable[..., Any],
) -> None:
    """Once text flows, `stream_idle_timeout_s` waits for the next output, not the next
    read: a provider that stalls but keeps its connection alive with SSE comments (as
    OpenRouter's `: OPENROUTER PROCESSING`) is a stalled stream, ended as interrupted,
    not one the caller waits out until its deadline."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n" + chunk("Hel"))
        try:
            for _ in range(300):  # 30 s of comments, never more text
                await asyncio.sleep(0.1)
                writer.write(b": OPENROUTER PROCESSING\n\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:  # cancelled too, as the test's loop ends before a write saw the close
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        config = gateway_config(url)
        idle = dataclasses.replace(config.upstreams[0], stream_idle_timeout_s=0.5)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(idle,)))
        deltas: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in gateway.stub.CompleteStream(chat_stream("hi"), timeout=8):
                if message.HasField("delta"):
                    deltas.append(message.delta.content)
    assert deltas == ["Hel"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)[1] == "STREAM_INTERRUPTED"


@pytest.mark.parametrize(
    "usage_sent", [USAGE, USAGE + USAGE[: len(USAGE) // 2]], ids=["whole", "then-half-of-one"]
)
async def test_a_stream_that_stalls_after_its_finish_reason_ends_as_finished(
    start_gateway: Callable[..., Any], usage_sent: bytes
) -> None:
    """An upstream that sent the whole answer, its finish reason and its usage, and then
    never `[DONE]` nor its body's end, ends at `stream_idle_timeout_s` as finished, with
    the usage it reported: not interrupted, which would have its caller ask (and pay)
    again for an answer it has. So does one that stalls in the middle of an event after
    it (a second usage event, cut by the stall): that event is left unread."""
    never = asyncio.Event()
    async with SSEUpstream(chunk("Hello", "stop") + usage_sent, end_when=never) as url:
        config = gateway_config(url)
        idle = dataclasses.replace(config.upstreams[0], stream_idle_timeout_s=0.5)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(idle,)))
        text, final, error = await relay(gateway, chat_stream("hi"))
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        never.set()
    assert error is None
    assert text == "Hello"
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    reported = (final.final.usage.input_tokens, final.final.usage.output_tokens)
    assert reported == (3, 2)
    assert not final.final.usage.estimated
    assert (usage.total.requests, usage.total.usage.output_tokens) == (1, 2)


async def test_a_unary_call_read_as_a_stream_that_stalls_after_its_finish_reason_is_answered(
    start_gateway: Callable[..., Any],
) -> None:
    """The same stall, from an upstream that takes unary calls as streams
    (`stream_unary_calls`), ends at its `timeout_s` as finished too: not a timeout, which
    was retried (each attempt generating, and billed, the whole answer again) and then
    failed UNAVAILABLE."""
    never = asyncio.Event()
    upstream = SSEUpstream(chunk("Hello", "stop") + USAGE, end_when=never)
    async with upstream as url:
        config = gateway_config(url, resilience=FAST_RETRIES)
        streamed = dataclasses.replace(config.upstreams[0], stream_unary_calls=True, timeout_s=0.5)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(streamed,)))
        try:
            answer = await gateway.stub.Complete(chat("hi"), timeout=8)
            usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        finally:
            never.set()
    assert answer.content == "Hello"
    assert answer.metadata.finish_reason == pb.FINISH_REASON_STOP
    assert (answer.metadata.usage.input_tokens, answer.metadata.usage.output_tokens) == (3, 2)
    assert (answer.metadata.attempts, upstream.requests) == (1, 1)
    assert (usage.total.requests, usage.total.usage.output_tokens) == (1, 2)


async def test_a_provider_stream_ended_before_any_event_is_a_malformed_answer(
    start_gateway: Callable[..., Any],
) -> None:
    """Without `empty_stream_is_refusal` (a provider's default), a stream with no event
    failed the upstream: retried, and UNAVAILABLE when every attempt fails."""
    async with SSEUpstream(b"") as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert_failed_before_any_text(text, final, error)


# Azure OpenAI's answer, before API version 2024-09-01-preview, to a field it does not know.
UNKNOWN_STREAM_OPTIONS = orjson.dumps(
    {
        "error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
)


def azure_2024_06(
    bodies: list[bytes],
    *,
    refused_together: int = 1,
    refusal: tuple[bytes, bytes] = (b"400 Bad Request", UNKNOWN_STREAM_OPTIONS),
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An upstream answering "Hello" to each stream, but 400 to one with `stream_options`,
    as Azure OpenAI before 2024-09-01-preview does (or `refusal`, a status and its body);
    each request's body added to `bodies`. The first `refused_together` refusals wait until
    all of them have come."""
    refusals: list[bytes] = []
    all_come = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, raw = await read_request(reader)
            bodies.append(raw)
            status, media, answer = (
                b"200 OK",
                b"text/event-stream",
                chunk("Hel") + chunk("lo", "stop") + DONE,
            )
            if "stream_options" in orjson.loads(raw):
                refusals.append(raw)
                if len(refusals) >= refused_together:
                    all_come.set()
                await all_come.wait()
                status, media, answer = (refusal[0], b"application/json", refusal[1])
            head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            writer.write(head % (status, media, len(answer)) + answer)
            await writer.drain()

    return serve


def mistral_refusal(*loc: str) -> tuple[bytes, bytes]:
    """Mistral's API's refusal of a field at `loc` its validation forbids: a 422, the
    field's place in `loc`, the message an object."""
    forbidden = {"type": "extra_forbidden", "loc": ["body", *loc], "msg": "Extra inputs"}
    message = {"detail": [forbidden]}
    error = {"object": "error", "message": message, "type": "invalid_request_error"}
    return b"422 Unprocessable Entity", orjson.dumps({**error, "param": None, "code": None})


@pytest.mark.parametrize(
    "refusal",
    [
        (b"400 Bad Request", UNKNOWN_STREAM_OPTIONS),
        mistral_refusal("stream_options"),
        mistral_refusal("stream_options", "include_usage"),
    ],
    ids=["azure-400", "mistral-422", "mistral-422-include-usage"],
)
async def test_an_upstream_that_refuses_stream_options_streams_without_them(
    start_gateway: Callable[..., Any], refusal: tuple[bytes, bytes]
) -> None:
    """An upstream that refuses `stream_options` (which asks for the stream's usage) is
    asked again at once without it, and not sent it again: the streams are served.

    Before, every stream failed INVALID_ARGUMENT, the caller told its request was bad for
    a field the gateway adds, while unary calls to the same upstream were served: Azure's
    400 at first, and Mistral's 422 (its message an object) until now."""
    bodies: list[bytes] = []
    async with serving() as serve:
        raw = await serve(azure_2024_06(bodies, refusal=refusal))
        gateway = await start_gateway(gateway_config(raw.url))
        for _ in range(2):
            text, final, error = await relay(gateway, chat_stream("hi"))
            assert (text, error) == ("Hello", None)
            assert final is not None
            assert final.final.usage.estimated  # none reported without stream_options
    assert [b"stream_options" in body for body in bodies] == [True, False, False]


async def test_streams_refused_stream_options_together_log_it_once(
    start_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Streams sent together to an upstream that refuses `stream_options`, each refused
    before any is taken without them: `upstream.stream_options_refused` is logged once.

    Before, each stream asked again logged it: three lines for three streams."""
    bodies: list[bytes] = []
    async with serving() as serve:
        raw = await serve(azure_2024_06(bodies, refused_together=3))
        gateway = await start_gateway(gateway_config(raw.url))
        with caplog.at_level(logging.WARNING, logger="llm_gateway.upstream"):
            relayed = await asyncio.gather(
                *(relay(gateway, chat_stream(f"hi {i}")) for i in range(3))
            )
    assert [(text, error) for text, _, error in relayed] == [("Hello", None)] * 3
    logged = [r for r in caplog.records if r.getMessage() == "upstream.stream_options_refused"]
    assert len(logged) == 1


async def test_streams_asked_again_without_stream_options_keep_the_schemas_as_written(
    start_gateway: Callable[..., Any],
) -> None:
    """A tool's parameters and an answer's JSON schema reach an upstream that refused
    `stream_options` as the caller wrote them, in the stream asked again and every later
    one: an integer past 64 bits stays that integer.

    Before, those bodies were decoded and encoded again, and such an integer was sent as
    a float (123456789012345678901234567890 as 1.2345678901234568e+29)."""
    schema = '{"type": "object", "properties": {"n": {"maximum": 123456789012345678901234567890}}}'
    request = chat_stream(
        "hi",
        tools=[pb.Tool(name="count", parameters=schema)],
        params=pb.GenerationParams(
            response_format=pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema
            )
        ),
    )
    bodies: list[bytes] = []
    async with serving() as serve:
        raw = await serve(azure_2024_06(bodies))
        gateway = await start_gateway(gateway_config(raw.url))
        for _ in range(2):
            text, _, error = await relay(gateway, request)
            assert (text, error) == ("Hello", None)
    assert len(bodies) == 3
    assert [body.count(schema.encode()) for body in bodies] == [2, 2, 2]


def vllm_echoing(
    bodies: list[bytes],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An upstream that takes `stream_options` and streams "Hello" (with its usage when
    they ask for it), but
    answers a request whose user text is "bad" 400 with a message quoting the request
    whole, as vLLM's validation errors do (its `input`), `stream_options` and all."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, raw = await read_request(reader)
            bodies.append(raw)
            body = orjson.loads(raw)
            usage = USAGE if "stream_options" in body else b""
            status, media, answer = (
                b"200 OK",
                b"text/event-stream",
                chunk("Hel") + chunk("lo", "stop") + usage + DONE,
            )
            if body["messages"][-1]["content"] == "bad":
                error = {"message": f"Value error, bad [input={body!r}]", "type": "BadRequestError"}
                status, media, answer = (
                    b"400 Bad Request",
                    b"application/json",
                    orjson.dumps({"object": "error", **error, "param": None, "code": 400}),
                )
            head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            writer.write(head % (status, media, len(answer)) + answer)
            await writer.drain()

    return serve


async def test_a_refusal_quoting_stream_options_keeps_them_for_later_streams(
    start_gateway: Callable[..., Any],
) -> None:
    """A 400 for another cause whose message quotes the request, `stream_options` in it,
    leaves later streams asking for their usage: the upstream took the field all along.

    Before, that one caller's bad request made the gateway drop `stream_options` for every
    later stream to the upstream, for the life of the process: every caller's usage was
    estimated and billed by the estimate, never by the upstream's counts."""
    bodies: list[bytes] = []
    async with serving() as serve:
        raw = await serve(vllm_echoing(bodies))
        gateway = await start_gateway(gateway_config(raw.url))
        _, _, error = await relay(gateway, chat_stream("bad"))
        assert error is not None
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert (text, error) == ("Hello", None)
    assert final is not None
    assert not final.final.usage.estimated
    assert (final.final.usage.input_tokens, final.final.usage.output_tokens) == (3, 2)
    assert b"stream_options" in bodies[-1]


# What providers send when a generation fails after its text began: OpenAI's and DeepSeek's
# `error` object, vLLM's (its `code` a number), an `event: error` event whose data is the
# error itself, and llama.cpp's `error:` field (its builds through 2025).
OPENAI_MID_STREAM = event(
    {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
)
VLLM_MID_STREAM = event(
    {"error": {"object": "error", "message": "Engine loop has died", "code": 500}}
)
ERROR_EVENT_MID_STREAM = b"event: error\n" + event({"message": "Upstream idle timeout"})
LLAMA_CPP_MID_STREAM = (
    b'error: {"code":500,"message":"slot was released mid-generation","type":"server_error"}\n\n'
)


async def interrupted_by(
    start_gateway: Callable[..., Any], failure: bytes, **config_sections: Any
) -> tuple[grpc.aio.AioRpcError, SSEUpstream]:
    """The error of a stream that sent "Hel" and then `failure`, and its upstream."""
    upstream = SSEUpstream(chunk("Hel") + failure + DONE)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url, **config_sections))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert (text, final) == ("Hel", None)
    assert error is not None
    return error, upstream


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (OPENAI_MID_STREAM, "The server had an error while processing your request."),
        (VLLM_MID_STREAM, "Engine loop has died"),
        (ERROR_EVENT_MID_STREAM, "Upstream idle timeout"),
        (LLAMA_CPP_MID_STREAM, "slot was released mid-generation"),
    ],
    ids=["openai", "vllm", "error-event", "llama-cpp-error-field"],
)
async def test_an_error_reported_after_text_says_what_the_upstream_said(
    start_gateway: Callable[..., Any], failure: bytes, said: str
) -> None:
    """An upstream's own error after its first text ends the stream with its message (in
    the status and as `upstream_message`), still saying how far the stream got: not the
    gateway's "malformed answer", which told the caller nothing of what failed."""
    error, upstream = await interrupted_by(start_gateway, failure)
    metadata, reason, _ = error_details(error)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason == "STREAM_INTERRUPTED"
    assert (error.details() or "").startswith(
        f"upstream 'up0' reported an error mid-stream: {said}; the stream was cut after 1 deltas"
    )
    assert metadata["upstream_message"] == said
    assert (metadata["deltas_sent"], metadata["chars_sent"]) == ("1", "3")
    assert upstream.requests == 1


async def test_a_rate_limit_reported_after_text_is_resource_exhausted_and_not_retried(
    start_gateway: Callable[..., Any],
) -> None:
    """A 429 reported mid-stream (OpenRouter's provider limit) is the rate limit the error
    table says, RESOURCE_EXHAUSTED, its text not relayed (a rate limit's names the account's
    organisation and tier); after text it is still an interrupted stream: not retried, and
    saying how far it got."""
    limited = event({"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min"}})
    error, upstream = await interrupted_by(start_gateway, limited)
    metadata, reason, _ = error_details(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason == "STREAM_INTERRUPTED"
    assert "upstream_message" not in metadata
    assert "free-models-per-min" not in (error.details() or "")
    assert (metadata["deltas_sent"], metadata["chars_sent"]) == ("1", "3")
    assert upstream.requests == 1


async def test_an_error_reported_after_text_is_relayed_with_secrets_redacted(
    start_gateway: Callable[..., Any],
) -> None:
    """A mid-stream error's message is made safe as a refusal's is: the upstream's key,
    a bearer token and an `sk-` key quoted in it each relay as `[redacted]`."""
    key = "mid-stream-upstream-key-5e1d"
    message = f"proxy error: key {key}, header Bearer eyJhbGciOiJIUzI1NiJ9.abc1, {PROVIDER_KEY}"
    failure = event({"error": {"message": message, "type": "server_error"}})
    upstream = SSEUpstream(chunk("Hel") + failure + DONE)
    async with upstream as url:
        data = gateway_config_data(url)
        data["upstreams"][0] |= {"api_key_env": "KEY_0"}
        gateway = await start_gateway(parse_config(data, source="<test>", environ={"KEY_0": key}))
        _, _, error = await relay(gateway, chat_stream("hi"))
    assert error is not None
    relayed = error_details(error)[0]["upstream_message"]
    assert relayed == "proxy error: key [redacted], header [redacted], [redacted]"
    assert key not in (error.details() or "")
    assert PROVIDER_KEY not in (error.details() or "")


async def test_an_account_error_reported_after_text_relays_nothing(
    start_gateway: Callable[..., Any],
) -> None:
    """A mid-stream error about the gateway's key or account (OpenAI's
    `insufficient_quota`) is the operator's, as its 429 or 401 body is: the caller gets the
    gateway's sentence and how far the stream got, none of the upstream's text."""
    out_of_credit = event(
        {
            "error": {
                "message": "You exceeded your current quota for org-abc CANARY",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
        }
    )
    error, _ = await interrupted_by(start_gateway, out_of_credit)
    metadata, reason, _ = error_details(error)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason == "STREAM_INTERRUPTED"
    assert (error.details() or "").startswith(
        "upstream 'up0' reported an error mid-stream; the stream was cut after 1 deltas"
    )
    assert "CANARY" not in (error.details() or "")
    assert not [key for key in metadata if key.startswith("upstream_")]


def error_body(error: dict[str, Any], *, indent: bool = False) -> str:
    """A JSON error object, as a body in place of a stream (pretty-printed with `indent`)."""
    return orjson.dumps({"error": error}, option=orjson.OPT_INDENT_2 if indent else 0).decode()


@pytest.mark.parametrize(
    "case",
    [
        (
            error_body({"code": 429, "message": "Rate limit exceeded"}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            3,
        ),
        (
            error_body({"message": "maximum context length is 8192 tokens", "code": 400}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONTEXT_WINDOW_EXCEEDED",
            1,
        ),
        (
            error_body({"message": "Incorrect API key provided", "code": "invalid_api_key"}),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_AUTH",
            1,
        ),
        (
            error_body({"code": 400, "message": "temperature too high"}, indent=True) + "\n",
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPSTREAM_REJECTED_REQUEST",
            1,
        ),
    ],
    ids=["rate-limited", "context-exceeded", "key-rejected", "pretty-printed-rejected"],
)
async def test_a_json_error_sent_as_an_event_stream_is_the_error_it_names(
    start_gateway: Callable[..., Any], case: tuple[str, grpc.StatusCode, str, int]
) -> None:
    """A 200 `text/event-stream` answer whose body is a bare JSON error object, no SSE
    lines (as some proxies and providers send), fails as the same JSON in a non-2xx body
    does: a rate limit is retried as one, a key rejected fails over, a request refused is
    the caller's to mend; none is billed nor counts against the upstream's health (not a
    malformed stream, retried, charged and failing its breaker). Each case: the body,
    then the status, the ErrorInfo reason and the attempts."""
    body, code, reason, attempts = case
    as_stream = Status(200, body=body, headers={"Content-Type": "text/event-stream"})
    async with FakeUpstream(default=as_stream) as upstream:
        gateway = await start_gateway(gateway_config(upstream.base_url, resilience=FAST_RETRIES))
        text, final, error = await relay(gateway, chat_stream("hi"))
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
    assert (text, final) == ("", None)
    assert error is not None
    assert (error.code(), error_details(error)[1]) == (code, reason)
    assert len(upstream.requests) == attempts
    assert (usage.total.requests, usage.total.cost_usd, len(usage.rows)) == (0, 0.0, 0)
    if reason != "UPSTREAM_AUTH":  # a rejected key opens the breaker: the operator's to mend
        health = {status.health for model in models.models for status in model.upstreams}
        assert health == {pb.UPSTREAM_HEALTH_HEALTHY}


@pytest.mark.parametrize(
    "failure",
    [b"event: error\ndata:\n\n", b"event: error\ndata: {}\n\n", b"error: null\n\n"],
    ids=["empty-data", "empty-object", "llama-cpp-null"],
)
async def test_an_error_event_that_says_nothing_relays_nothing(
    start_gateway: Callable[..., Any], failure: bytes
) -> None:
    """An error event with no message, after text, ends the stream with the gateway's
    sentence alone: no `upstream_message` the upstream never said (the gateway's own
    placeholder, "the upstream sent an error event without a message", was relayed as it)."""
    error, _ = await interrupted_by(start_gateway, failure)
    metadata, reason, _ = error_details(error)
    assert (error.code(), reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
    assert (error.details() or "").startswith(
        "upstream 'up0' reported an error mid-stream; the stream was cut after 1 deltas"
    )
    assert "upstream_message" not in metadata
