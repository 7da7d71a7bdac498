"""Tests for the fake OpenAI upstream used by the gateway's integration tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_upstream import (
    Behaviour,
    CutStream,
    EndWithoutDone,
    FakeUpstream,
    Hang,
    MalformedSSE,
    Reply,
    Reset,
    Status,
)

pytestmark = pytest.mark.asyncio

CHAT = "/chat/completions"


def chat_body(stream: bool = False, include_usage: bool | None = None) -> dict[str, Any]:
    """Build a minimal chat-completions request body."""
    body: dict[str, Any] = {
        "model": "req-model",
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        body["stream"] = True
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def parse_sse(raw: bytes) -> list[str]:
    """Return the `data:` payloads of an SSE byte stream, ignoring comments."""
    text = raw.decode().replace("\r\n", "\n")
    payloads: list[str] = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
    return payloads


def content_of(payloads: list[str]) -> str:
    """Concatenate the content deltas of parsed chunk payloads."""
    out = ""
    for p in payloads:
        if p == "[DONE]":
            continue
        for choice in json.loads(p)["choices"]:
            out += choice["delta"].get("content", "")
    return out


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll a condition that has no event to await until it holds or the timeout expires."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    """Yield a started fake upstream."""
    async with FakeUpstream() as fake:
        yield fake


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """Yield a plain aiohttp client session."""
    async with aiohttp.ClientSession() as s:
        yield s


async def test_unary_reply_shape_and_usage(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A non-streaming request gets a chat.completion with usage and echoed model."""
    up.script(Reply(content="hey", prompt_tokens=11, completion_tokens=2, cached_tokens=4))
    async with session.post(
        up.base_url + CHAT, json=chat_body(), headers={"X-Trace": "t1"}
    ) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "req-model"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 2,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert len(up.requests) == 1
    rec = up.requests[0]
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["x-trace"] == "t1"
    assert rec.body["messages"][0]["content"] == "hi"
    assert rec.received_at <= time.monotonic()


async def test_unary_reply_without_usage_and_model_override(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """Usage is omitted when disabled and a fixed model overrides the echo."""
    up.script(Reply(include_usage=False, model="other", headers={"X-Up": "1"}))
    async with session.post(up.base_url + CHAT, json=chat_body()) as resp:
        data = await resp.json()
        assert resp.headers["X-Up"] == "1"
    assert "usage" not in data
    assert data["model"] == "other"


@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_stream_events_and_usage_only_when_requested(
    up: FakeUpstream, session: aiohttp.ClientSession, include_usage: bool | None
) -> None:
    """A streamed reply yields role, content, finish and [DONE], with usage only on request."""
    up.script(Reply(content="Hello world!", chunks=3, finish_reason="length"))
    async with session.post(
        up.base_url + CHAT, json=chat_body(stream=True, include_usage=include_usage)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        payloads = parse_sse(await resp.read())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert deltas == ["Hell", "o wo", "rld!"]
    finish = chunks[4]["choices"][0]
    assert finish["delta"] == {}
    assert finish["finish_reason"] == "length"
    if include_usage:
        assert len(chunks) == 6
        assert chunks[5]["choices"] == []
        assert chunks[5]["usage"]["total_tokens"] == 10
    else:
        assert len(chunks) == 5
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(content="same text here", crlf=True),
        Reply(content="same text here", keepalive_comments=True),
        Reply(content="same text here", split_events=True),
        Reply(content="same text here", coalesce=True),
        Reply(content="same text here", crlf=True, keepalive_comments=True, split_events=True),
    ],
)
async def test_stream_framing_variants_deliver_same_content(
    up: FakeUpstream, session: aiohttp.ClientSession, reply: Reply
) -> None:
    """Framing quirks change the bytes on the wire but not the decoded content."""
    up.script(reply)
    async with session.post(
        up.base_url + CHAT, json=chat_body(stream=True, include_usage=True)
    ) as resp:
        raw = await resp.read()
    payloads = parse_sse(raw)
    assert content_of(payloads) == "same text here"
    assert payloads[-1] == "[DONE]"
    assert (b"\r\n\r\n" in raw) == reply.crlf
    assert (b": keep-alive" in raw) == reply.keepalive_comments


async def test_status_429_with_retry_after(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A Status behaviour returns its code, headers and an OpenAI-style error body."""
    up.script(Status(429, headers={"Retry-After": "2"}), Status(502, body="upstream down"))
    async with session.post(up.base_url + CHAT, json=chat_body()) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        err = (await resp.json())["error"]
    assert err["code"] == "rate_limit_exceeded"
    assert err["type"] == "requests"
    assert err["message"]
    async with session.post(up.base_url + CHAT, json=chat_body()) as resp:
        assert resp.status == 502
        assert await resp.text() == "upstream down"


@pytest.mark.parametrize("behaviour", [Hang(), Reply(delay_s=5.0), Status(500, delay_s=5.0)])
async def test_client_timeout_while_waiting_counts_disconnect(
    up: FakeUpstream, session: aiohttp.ClientSession, behaviour: Behaviour
) -> None:
    """A client that gives up before any response header is counted as a disconnect."""
    up.script(behaviour)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            up.base_url + CHAT,
            json=chat_body(),
            timeout=aiohttp.ClientTimeout(total=0.2),
        ) as resp:
            await resp.read()
    await up.wait_for_disconnect(timeout_s=2.0)
    assert up.disconnects == 1
    with pytest.raises(TimeoutError):
        await up.wait_for_disconnect(timeout_s=0.05)


async def test_client_leaving_slow_stream_counts_disconnect(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A client closing a slow stream mid-way is counted as exactly one disconnect."""
    up.script(Reply(content="abcdefghij", chunks=10, chunk_delay_s=0.05))
    async with session.post(up.base_url + CHAT, json=chat_body(stream=True)) as resp:
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        resp.close()
    await up.wait_for_disconnect(timeout_s=2.0)
    await asyncio.sleep(0.1)
    assert up.disconnects == 1


async def test_reset_gives_connection_error(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A Reset behaviour surfaces as a client connection error with no response."""
    up.script(Reset())
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(up.base_url + CHAT, json=chat_body()) as resp:
            await resp.read()
    assert len(up.requests) == 1
    assert up.disconnects == 0


async def test_cut_stream_errors_after_k_chunks(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A CutStream delivers k content chunks and then breaks the connection."""
    up.script(CutStream(after_chunks=2))
    received = bytearray()

    async def consume() -> None:
        async with session.post(up.base_url + CHAT, json=chat_body(stream=True)) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received.extend(data)

    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await consume()
    payloads = parse_sse(bytes(received))
    assert "[DONE]" not in payloads
    assert content_of(payloads) == "a b"
    assert all(json.loads(p)["choices"][0]["finish_reason"] is None for p in payloads)
    assert up.disconnects == 0


async def test_end_without_done(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    """An EndWithoutDone stream ends cleanly with neither a finish reason nor [DONE]."""
    up.script(EndWithoutDone(after_chunks=3))
    async with session.post(up.base_url + CHAT, json=chat_body(stream=True)) as resp:
        payloads = parse_sse(await resp.read())
    assert "[DONE]" not in payloads
    assert content_of(payloads) == "a b c"
    assert all(json.loads(p)["choices"][0]["finish_reason"] is None for p in payloads)


async def test_malformed_sse(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    """A MalformedSSE stream injects one bad payload and otherwise completes normally."""
    up.script(MalformedSSE(after_chunks=1))
    async with session.post(up.base_url + CHAT, json=chat_body(stream=True)) as resp:
        payloads = parse_sse(await resp.read())
    assert payloads[2] == "{not json"
    good = [p for p in payloads if p != "{not json"]
    assert content_of(good) == "a b c d e f"
    assert payloads[-1] == "[DONE]"


async def test_api_key_enforced(session: aiohttp.ClientSession) -> None:
    """With an API key set, both endpoints answer 401 unless the bearer token matches."""
    async with FakeUpstream(api_key="sk-good") as up:
        for method, path in (("POST", CHAT), ("GET", "/models")):
            for auth in (None, "Bearer sk-bad"):
                headers = {"Authorization": auth} if auth else {}
                async with session.request(
                    method, up.base_url + path, json=chat_body(), headers=headers
                ) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with session.post(
            up.base_url + CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-good"}
        ) as resp:
            assert resp.status == 200
        assert len(up.requests) == 3


async def test_models_endpoint(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    """GET /v1/models lists the configured models in OpenAI's shape."""
    async with session.get(up.base_url + "/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "fake-model"
    up.models = ["m1", "m2"]
    async with session.get(up.base_url + "/models") as resp:
        data = await resp.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["m1", "m2"]
    assert up.requests == []


async def test_open_connections_drop_to_zero(up: FakeUpstream) -> None:
    """Pooled keep-alive connections are counted and vanish once the client session closes."""
    assert up.open_connections() == 0
    async with aiohttp.ClientSession() as s:

        async def fetch(stream: bool) -> None:
            async with s.post(up.base_url + CHAT, json=chat_body(stream=stream)) as resp:
                await resp.read()

        await asyncio.gather(fetch(False), fetch(True))
        assert up.open_connections() == 2
        await fetch(False)
        assert 1 <= up.open_connections() <= 2
    await eventually(lambda: up.open_connections() == 0)
    assert up.open_connections() == 0


async def test_script_fifo_then_default(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    """Scripted behaviours are used once each in order, then the default applies."""
    up.script(Status(500), Reply(content="second"))
    up.script(Status(503))
    up.default = Reply(content="dflt")
    seen: list[tuple[int, str]] = []
    for _ in range(5):
        async with session.post(up.base_url + CHAT, json=chat_body()) as resp:
            text = await resp.text()
            content = json.loads(text)["choices"][0]["message"]["content"] if resp.ok else ""
            seen.append((resp.status, content))
    assert seen == [(500, ""), (200, "second"), (503, ""), (200, "dflt"), (200, "dflt")]
    assert len(up.requests) == 5


async def test_shutdown_with_hanging_request_is_fast(session: aiohttp.ClientSession) -> None:
    """Leaving the context manager with a request still hanging returns promptly."""
    up = FakeUpstream(default=Hang())
    await up.start()
    task = asyncio.create_task(session.post(up.base_url + CHAT, json=chat_body()))
    await eventually(lambda: bool(up.requests))
    # A guard against a hang only: the fake waits 0.5 s at most for its handlers, where
    # aiohttp's default is 60 s and a handler left running would hang it for good.
    async with asyncio.timeout(10):
        await up.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await task
    assert up.disconnects == 0
