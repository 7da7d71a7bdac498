"""Unary calls to an upstream with `stream_unary_calls` (the local model's) go as streams.

llama-cpp-python's server looks for a gone client only before a unary completion starts
and between a stream's chunks: a cancelled unary call would keep it generating. Through
the gateway's gRPC API, against a real HTTP upstream, such calls answer exactly as unary
ones do, and a cancel closes the stream while it still streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from aiohttp import web

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.tokens import PER_MESSAGE_OVERHEAD, PER_REQUEST_OVERHEAD, estimate_text_tokens
from tests.conftest import (
    FAKE_MODEL,
    RunningGateway,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config_data,
)
from tests.fake_upstream import (
    Behaviour,
    CutStream,
    FakeUpstream,
    Hang,
    Reply,
    Status,
    ToolCallReply,
    split_words,
)
from tests.integration.helpers import field_violations
from tests.integration.test_cache import settled
from tests.integration.test_resilience import error_details
from tests.scripted_upstream import ScriptedUpstream, user_text
from tests.telemetry_support import captured_telemetry

pytestmark = pytest.mark.timeout(60)

# llama-cpp-python's 400 for a prompt over its context window.
_CONTEXT_ERROR = (
    '{"error": {"message": "Requested tokens (40) exceed context window of 20", '
    '"type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}'
)
_SLOW_ANSWER = Reply(content="one two three four five six seven eight", chunks=8, chunk_delay_s=0.5)


class LlamaLikeUpstream(ScriptedUpstream):
    """Generates a unary answer to its end whether its client stays or not, as
    llama-cpp-python's server does; a stream it stops when its client leaves.

    A unary answer takes as long as the same answer streamed (its chunks' delays). A prompt
    longer than `window_chars` is over its context window: refused unary with a 400 that
    says so, and streamed with a 200 and no event at all.
    """

    window_chars: int | None = None

    async def _play(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        if self.window_chars is not None and len(user_text(body)) > self.window_chars:
            if body.get("stream") is True:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await response.write_eof()
                return response
            return await super()._play(request, body, Status(400, body=_CONTEXT_ERROR))
        if body.get("stream") is True or not isinstance(behaviour, Reply):
            return await super()._play(request, body, behaviour)
        generating = behaviour.chunks * behaviour.chunk_delay_s
        unary = dataclasses.replace(behaviour, delay_s=behaviour.delay_s + generating)
        return await asyncio.shield(asyncio.ensure_future(super()._play(request, body, unary)))


def _config(base_url: str, *, is_streamed: bool, **sections: Any) -> Any:
    data = gateway_config_data(base_url, **sections)
    data["upstreams"][0]["stream_unary_calls"] = is_streamed
    return parse_config(data, source="<test>", environ={})


def _answer(response: pb.CompleteResponse) -> tuple[Any, ...]:
    """What a unary answer says, but for its id and timings."""
    meta = response.metadata
    return (
        response.content,
        response.reasoning,
        [(c.id, c.name, c.arguments) for c in response.tool_calls],
        meta.finish_reason,
        meta.usage.input_tokens,
        meta.usage.output_tokens,
        meta.usage.estimated,
        meta.cost_usd,
        meta.upstream,
        meta.attempts,
    )


@pytest.mark.parametrize(
    "reply",
    [
        Reply(content="Hello there, sea", chunks=4),
        Reply(content="no usage reported", include_usage=False),
        Reply(content="", finish_reason="tool_calls", tool_calls=(
            ToolCallReply("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCallReply("call_2", "get_time", '{"zone": "CET"}'),
        )),
        Reply(content="The answer is 4.", reasoning="2 and 2 make 4", finish_reason="length"),
    ],
    ids=["text", "no-usage", "tool-calls", "reasoning"],
)  # fmt: skip
async def test_a_streamed_unary_call_answers_as_the_same_call_unary(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], reply: Reply
) -> None:
    """A unary call sent as a stream answers what the same upstream answers it unary:
    text, reasoning, tool calls, finish reason, and usage (estimated when unreported)."""
    upstream.default = reply
    unary: RunningGateway = await start_gateway(_config(upstream.base_url, is_streamed=False))
    streamed: RunningGateway = await start_gateway(_config(upstream.base_url, is_streamed=True))
    request = chat("What is 2 + 2?", params=pb.GenerationParams(temperature=0.7))
    expected = await unary.stub.Complete(request)
    answered = await streamed.stub.Complete(request)
    assert [r.body.get("stream", False) for r in upstream.requests] == [False, True]
    assert _answer(answered) == _answer(expected)


async def test_cancelling_a_streamed_unary_call_stops_the_upstream_mid_stream(
    start_gateway: Callable[..., Any],
) -> None:
    """A unary call cancelled while an upstream that finishes unary answers regardless is
    generating closes its stream: the upstream sees the disconnect before its answer ends."""
    async with LlamaLikeUpstream(models=("fake-model",), default=_SLOW_ANSWER) as upstream:
        gateway: RunningGateway = await start_gateway(_config(upstream.base_url, is_streamed=True))
        call = gateway.stub.Complete(chat(params=pb.GenerationParams(temperature=0.7)))
        await upstream.wait_until(lambda: upstream.in_flight == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await upstream.wait_for_disconnect()
        await upstream.wait_until(lambda: upstream.in_flight == 0)
        assert upstream.finished == 0  # stopped mid-generation, never answered whole


async def test_a_streamed_unary_call_past_its_deadline_stops_the_upstream(
    start_gateway: Callable[..., Any],
) -> None:
    """The caller's deadline bounds the whole streamed unary call, as a unary one's: it
    ends DEADLINE_EXCEEDED and the upstream's generation stops there."""
    async with LlamaLikeUpstream(models=("fake-model",), default=_SLOW_ANSWER) as upstream:
        gateway: RunningGateway = await start_gateway(_config(upstream.base_url, is_streamed=True))
        request = chat(params=pb.GenerationParams(temperature=0.7))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request, timeout=1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await upstream.wait_for_disconnect()
        await upstream.wait_until(lambda: upstream.in_flight == 0)
        assert upstream.finished == 0
        assert len(upstream.requests) == 1


async def test_a_streamed_unary_call_cut_mid_stream_is_retried(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """A stream that breaks mid-way had answered the caller nothing yet: it is retried as
    a failed unary call is, and the caller gets the whole answer of the next attempt."""
    upstream.script(CutStream(after_chunks=2))
    upstream.default = Reply(content="a whole answer", chunks=3)
    gateway: RunningGateway = await start_gateway(_config(upstream.base_url, is_streamed=True))
    response = await gateway.stub.Complete(chat(params=pb.GenerationParams(temperature=0.7)))
    assert response.content == "a whole answer"
    assert response.metadata.attempts == 2
    assert [r.body.get("stream") for r in upstream.requests] == [True, True]


async def test_a_streamed_unary_answer_is_cached_and_served_as_a_unary_answer(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    cache_section: dict[str, Any],
) -> None:
    """A unary answer fetched as a stream is stored once complete, served to the same call
    again as a hit, and replayed to a stream, with no second upstream call."""
    upstream.default = Reply(content="cached words here", chunks=3)
    gateway: RunningGateway = await start_gateway(
        _config(upstream.base_url, is_streamed=True, cache=cache_section)
    )
    params = pb.GenerationParams(temperature=0.0)
    first = await gateway.stub.Complete(chat(params=params))
    await settled(gateway)
    second = await gateway.stub.Complete(chat(params=params))
    replayed = [event async for event in gateway.stub.CompleteStream(chat_stream(params=params))]
    assert [r.body.get("stream") for r in upstream.requests] == [True]
    assert not first.metadata.cache_hit
    assert second.metadata.cache_hit
    assert second.content == first.content == "cached words here"
    assert second.metadata.usage == first.metadata.usage
    final = replayed[-1].final
    assert final.cache_hit
    assert "".join(e.delta.content for e in replayed if e.HasField("delta")) == first.content


async def test_a_prompt_refused_by_an_empty_stream_is_asked_again_unary_which_says_why(
    start_gateway: Callable[..., Any],
) -> None:
    """llama-cpp-python ends a stream whose prompt is over its context window with no
    event; a unary call's stream so refused is asked again unary, and fails as a unary
    call did: CONTEXT_WINDOW_EXCEEDED, its upstream's own count, in one attempt."""
    async with LlamaLikeUpstream(models=("fake-model",)) as upstream:
        upstream.window_chars = 20
        data = gateway_config_data(upstream.base_url)
        data["upstreams"][0] |= {"stream_unary_calls": True, "empty_stream_is_refusal": True}
        gateway: RunningGateway = await start_gateway(
            parse_config(data, source="<test>", environ={})
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat("far too long a prompt for this model's window"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        metadata, reason, _ = error_details(caught.value)
        assert (reason, metadata["attempts"]) == ("CONTEXT_WINDOW_EXCEEDED", "1")
        assert [r.body.get("stream", False) for r in upstream.requests] == [True, False]
        answered = await gateway.stub.Complete(chat("short"))
    assert answered.content == "Hello from fake"


_WORDS = "alpha beta gamma delta epsilon zeta"
_SENT = "".join(split_words(_WORDS)[:3])  # what is streamed before the cut
# The gateway's estimates of `chat()`'s prompt and of the text streamed.
_CHARGED = (
    PER_REQUEST_OVERHEAD + PER_MESSAGE_OVERHEAD + estimate_text_tokens("Say hi"),
    estimate_text_tokens(_SENT),
)


class StallingUpstream(ScriptedUpstream):
    """Streams the first three words of its answer, then nothing more until its client
    leaves: a model that stalls mid-answer."""

    async def _play(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        await self._partial_stream(request, FAKE_MODEL, _WORDS, after_chunks=3)
        return await super()._play(request, body, Hang())


async def _charged(gateway: RunningGateway) -> pb.UsageRow:
    """The ledger's total once it has recorded a charge."""
    async with asyncio.timeout(5):
        while not (total := (await gateway.stub.GetUsage(pb.GetUsageRequest())).total).cost_usd:
            await asyncio.sleep(0.02)
    return total


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
async def test_a_streamed_unary_call_its_caller_leaves_after_text_is_charged_that_text(
    start_gateway: Callable[..., Any], leave: str
) -> None:
    """A unary call read as a stream that its caller cancels, or whose deadline passes,
    once the upstream streamed some text is charged its prompt and that text, estimated,
    as a stream cut so is: in the ledger and on `gen_ai.client.token.usage` alike.

    Before, it was charged its prompt alone, as a unary call whose text never came."""
    captured = captured_telemetry()
    async with StallingUpstream(models=(FAKE_MODEL,)) as upstream:
        gateway: RunningGateway = await start_gateway(
            _config(upstream.base_url, is_streamed=True), telemetry=captured.telemetry
        )
        call = gateway.stub.Complete(chat(), timeout=1 if leave == "deadline" else None)
        if leave == "cancel":
            await upstream.wait_until(lambda: upstream.in_flight == 1)
            await asyncio.sleep(0.2)  # the gateway reads what was streamed
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await upstream.wait_for_disconnect()
        total = await _charged(gateway)
    assert (total.usage.input_tokens, total.usage.output_tokens) == _CHARGED
    assert (total.requests, total.estimated_requests, total.usage.estimated) == (1, 1, True)
    assert captured.tokens() == {("input", True): _CHARGED[0], ("output", True): _CHARGED[1]}


async def test_a_streamed_unary_attempt_the_upstream_cuts_after_text_is_charged_that_text(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """An attempt whose stream the upstream resets after some text is charged its prompt
    and that text, estimated, as the same stream cut in a `CompleteStream` is (a lost
    attempt rather than a request: its caller had nothing yet, and it could be retried),
    in the ledger and on `gen_ai.client.token.usage` alike.

    Before, it was charged its prompt alone."""
    captured = captured_telemetry()
    config = _config(upstream.base_url, is_streamed=True, resilience={"attempts": 1})
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(*[CutStream(after_chunks=3, content=_WORDS)] * 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(labels={"call": "unary"}))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    lost = await _charged(gateway)
    expected_tokens = {("input", True): _CHARGED[0], ("output", True): _CHARGED[1]}
    assert captured.tokens() == expected_tokens
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in gateway.stub.CompleteStream(chat_stream(labels={"call": "stream"}))]
    rows = {
        row.labels["call"]: row for row in (await gateway.stub.GetUsage(pb.GetUsageRequest())).rows
    }
    cut = rows["stream"]
    assert (lost.usage.input_tokens, lost.usage.output_tokens) == _CHARGED
    assert (cut.usage.input_tokens, cut.usage.output_tokens) == _CHARGED
    assert (lost.requests, lost.estimated_requests, lost.usage.estimated) == (0, 1, True)
    assert lost.cost_usd == cut.cost_usd
    assert captured.tokens() == {key: 2 * tokens for key, tokens in expected_tokens.items()}


async def test_a_stream_refused_by_an_empty_stream_is_asked_again_unary_and_taught_from(
    start_gateway: Callable[..., Any],
) -> None:
    """A caller's stream that llama-cpp-python ends with no event (a prompt over its
    context window) is asked again unary, as a unary call's is, and fails as one:
    INVALID_ARGUMENT, CONTEXT_WINDOW_EXCEEDED with a `BadRequest` on `messages`, in one
    attempt. The refusal teaches the gateway's calibration, so the same prompt is then
    refused before it is sent; however many come, the upstream's breaker stays closed.

    Before, such a stream was UPSTREAM_REJECTED_REQUEST, no `BadRequest`, and taught
    nothing: every stream of it was sent and refused again, and a streamed conversation
    under TRUNCATION_MODE_KEEP_RECENT was never fitted, where the same call unary was."""
    async with LlamaLikeUpstream(models=("fake-model",)) as upstream:
        upstream.window_chars = 20
        data = gateway_config_data(upstream.base_url, models=fake_model_window(256))
        data["upstreams"][0] |= {"stream_unary_calls": True, "empty_stream_is_refusal": True}
        gateway: RunningGateway = await start_gateway(
            parse_config(data, source="<test>", environ={})
        )
        too_long = chat_stream(" ".join(["word"] * 60))
        for _ in range(11):  # past breaker_consecutive_failures (10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _event in gateway.stub.CompleteStream(too_long):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(caught.value)[1] == "CONTEXT_WINDOW_EXCEEDED"
            assert "messages" in field_violations(caught.value)
        assert [r.body.get("stream", False) for r in upstream.requests] == [True, False]
        events = [e async for e in gateway.stub.CompleteStream(chat_stream("short"))]
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == "Hello from fake"
