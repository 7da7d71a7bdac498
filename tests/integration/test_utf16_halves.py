"""Characters cut into UTF-16 halves across a stream's events, byte for byte from a raw
socket upstream, through the gateway.

Relays that cut text by UTF-16 code units (JavaScript's strings: Node proxies) send an
emoji, U+1F600, as `"\\ud83d"` at the end of one event's text and `"\\ude00"` at the start
of the next. Each event's JSON holds a lone half; the gateway pairs them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config
from tests.integration.test_cache import settled
from tests.integration.test_resilience import error_details
from tests.integration.test_upstream_http import replying, serving
from tests.integration.test_upstream_sse import DONE, USAGE, SSEUpstream, chunk

EMOJI = "\U0001f600"
CACHED = pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT)
DETERMINISTIC = pb.GenerationParams(temperature=0.0)


def delta_event(delta: str) -> bytes:
    """An event whose delta's fields are `delta`, JSON as written (so `\\ud83d` stays an
    escape of a lone half, which no JSON encoder writes)."""
    return b'data: {"id":"c1","model":"%s","choices":[{"index":0,"delta":{%s}}]}\n\n' % (
        FAKE_MODEL.encode(),
        delta.encode(),
    )


def text_event(text: str, field: str = "content") -> bytes:
    """An event with `text` in `field`, escapes and all: `text_event(r"Hi \\ud83d")`."""
    return delta_event(f'"{field}":"{text}"')


# The emoji cut in two across events, as a UTF-16 relay sends "Hi 😀!".
CUT_EMOJI = text_event(r"Hi \ud83d") + text_event(r"\ude00!")
STOP = chunk(finish="stop") + USAGE + DONE


async def streamed(
    gateway: Any, request: pb.CompleteStreamRequest
) -> tuple[list[pb.Delta], pb.CompleteStreamResponse | None, grpc.aio.AioRpcError | None]:
    """The deltas a stream relayed, its final message and its error."""
    items: list[pb.CompleteStreamResponse] = []
    error = None
    try:
        async for item in gateway.stub.CompleteStream(request, timeout=5):
            items.append(item)
    except grpc.aio.AioRpcError as exc:
        error = exc
    deltas = [item.delta for item in items if item.HasField("delta")]
    final = items[-1] if items and items[-1].HasField("final") else None
    return deltas, final, error


@pytest.mark.parametrize("field", ["content", "reasoning_content", "reasoning"])
async def test_a_character_cut_into_halves_across_events_is_relayed_whole(
    start_gateway: Callable[..., Any], field: str
) -> None:
    """The halves of a character cut across two events go out as the one character, in
    the text or in the reasoning; the stream finishes cleanly.

    Before, the first half's event was no JSON to the gateway: the stream failed as a
    malformed answer, retried and failed over."""
    body = text_event(r"Hi \ud83d", field) + text_event(r"\ude00!", field) + STOP
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        deltas, final, error = await streamed(gateway, chat_stream())
    assert error is None
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    relayed = "".join(d.content if field == "content" else d.reasoning for d in deltas)
    assert relayed == f"Hi {EMOJI}!"


async def test_a_tool_calls_arguments_cut_into_halves_are_relayed_whole(
    start_gateway: Callable[..., Any],
) -> None:
    """A tool call's arguments cut inside a character, between two of its pieces, go out
    with the character whole."""
    call = '"tool_calls":[{"index":0,%s"function":{%s"arguments":"%s"}}]'
    body = (
        delta_event(call % ('"id":"call_1","type":"function",', '"name":"f",', r"{\"q\":\"\ud83d"))
        + delta_event(call % ("", "", r"\ude00\"}"))
        + chunk(finish="tool_calls")
        + USAGE
        + DONE
    )
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        deltas, final, error = await streamed(gateway, chat_stream())
    assert error is None
    assert final is not None
    arguments = "".join(piece.arguments for d in deltas for piece in d.tool_calls)
    assert arguments == f'{{"q":"{EMOJI}"}}'


@pytest.mark.parametrize(
    ("body", "text"),
    [
        pytest.param(text_event(r"Hi \ud83d"), "Hi \ufffd", id="first-half-at-the-end"),
        pytest.param(
            text_event(r"Hi \ud83d") + text_event("!"), "Hi \ufffd!", id="first-half-then-text"
        ),
        pytest.param(
            text_event(r"\ud83d") + text_event(r"\ud83d\ude00"),
            f"\ufffd{EMOJI}",
            id="first-half-then-a-whole-pair",
        ),
        pytest.param(text_event(r"\ude00 Hi"), "\ufffd Hi", id="second-half-alone"),
        pytest.param(text_event(r"a\ud83db"), "a\ufffdb", id="first-half-inside-the-text"),
    ],
)
async def test_a_half_that_pairs_with_none_is_a_replacement_character(
    start_gateway: Callable[..., Any], body: bytes, text: str
) -> None:
    """A half that no other half completes goes out as U+FFFD, as a broken UTF-8 sequence
    does: one held back for the next piece, once that piece or the stream's end comes."""
    async with SSEUpstream(body + STOP) as url:
        gateway = await start_gateway(gateway_config(url))
        deltas, final, error = await streamed(gateway, chat_stream())
    assert error is None
    assert final is not None
    assert "".join(d.content for d in deltas) == text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        pytest.param(CUT_EMOJI, f"Hi {EMOJI}!", id="paired"),
        pytest.param(text_event(r"Hi \ud83d"), "Hi ", id="first-half-held"),
    ],
)
async def test_a_stream_cut_after_halves_counts_the_characters_the_caller_got(
    start_gateway: Callable[..., Any], body: bytes, text: str
) -> None:
    """A stream cut after a character came in halves: `chars_sent` counts the character
    once, as the caller got it; a half still held back when the stream is cut is not
    relayed, as nothing of a cut stream's unfinished events is."""
    async with SSEUpstream(body + b"data: [DO", framing="close") as url:
        gateway = await start_gateway(gateway_config(url))
        deltas, final, error = await streamed(gateway, chat_stream())
    assert final is None
    assert error is not None
    metadata, reason, _ = error_details(error)
    assert "".join(d.content for d in deltas) == text
    assert (reason, metadata["chars_sent"]) == ("STREAM_INTERRUPTED", str(len(text)))


async def test_a_unary_call_sent_as_a_stream_gets_the_character_whole(
    start_gateway: Callable[..., Any],
) -> None:
    """A unary call read from a stream (`stream_unary_calls`, as the local model's) is
    answered with the character its halves make."""
    async with SSEUpstream(CUT_EMOJI + STOP) as url:
        config = gateway_config(url)
        streaming = dataclasses.replace(config.upstreams[0], stream_unary_calls=True)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(streaming,)))
        response = await gateway.stub.Complete(chat(), timeout=5)
    assert response.content == f"Hi {EMOJI}!"


async def test_a_lone_half_in_a_unary_answer_is_a_replacement_character(
    start_gateway: Callable[..., Any],
) -> None:
    """A whole JSON answer with a lone half in its text is answered, the half U+FFFD.

    Before, the answer was taken for some other server's page (`no OpenAI chat
    completion`) and failed over."""
    answer = (
        b'{"id":"c1","model":"%s","choices":[{"index":0,"finish_reason":"stop",'
        b'"message":{"role":"assistant","content":"Hi \\ud83d!"}}]}' % FAKE_MODEL.encode()
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    async with serving() as serve:
        raw = await serve(replying(head % len(answer) + answer))
        gateway = await start_gateway(gateway_config(raw.url))
        response = await gateway.stub.Complete(chat(), timeout=5)
    assert response.content == "Hi \ufffd!"


async def test_a_cached_stream_replays_the_character_whole(
    start_gateway: Callable[..., Any], cache_section: dict[str, Any]
) -> None:
    """The cache stores the stream as relayed, its halves paired: a replayed stream and a
    unary hit give the character whole (memory and Redis)."""
    upstream = SSEUpstream(CUT_EMOJI + STOP)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url, cache=cache_section))
        request = chat_stream(cache=CACHED, params=DETERMINISTIC)
        live, _, error = await streamed(gateway, request)
        assert error is None
        await settled(gateway)
        replayed, final, _ = await streamed(gateway, request)
        hit = await gateway.stub.Complete(chat(cache=CACHED, params=DETERMINISTIC))
    assert final is not None
    assert (final.final.cache_hit, hit.metadata.cache_hit) == (True, True)
    for deltas in (live, replayed):
        assert "".join(d.content for d in deltas) == f"Hi {EMOJI}!"
    assert hit.content == f"Hi {EMOJI}!"
    assert upstream.requests == 1


# JSON nested deeper than the standard library's parser (and the pairing after it) recurse.
DEEP = b"[" * 3000 + b"]" * 3000


async def test_a_deeply_nested_stream_event_with_a_half_is_a_malformed_answer(
    start_gateway: Callable[..., Any],
) -> None:
    """An event holding a lone half and JSON nested 3000 deep fails as a malformed answer
    (UNAVAILABLE, retried), as the same event without the half does: orjson refuses it,
    and so, here, does the parser that reads halves.

    Before, that parser's RecursionError failed the call INTERNAL, with no details and no
    retry."""
    event = text_event(r"a\ud83d")[: -len(b"]}\n\n")] + b'],"x":%s}\n\n' % DEEP
    upstream = SSEUpstream(event + STOP)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        deltas, final, error = await streamed(gateway, chat_stream())
    assert (deltas, final) == ([], None)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed answer: not valid JSON" in (error.details() or "")
    assert upstream.requests > 1
