"""Reasoning output through the real server, against a real-socket upstream that thinks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import grpc
import orjson
import pytest

from gateway_client import GatewayClient
from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.tokens import estimate_text_tokens
from tests.conftest import (
    FAKE_MODEL,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config,
    gateway_config_data,
)
from tests.fake_upstream import Reply, Status, ToolCallReply, split_even
from tests.integration.helpers import error_info, field_violations
from tests.integration.test_cache import settled
from tests.integration.test_upstream_http import read_request, replying, serving
from tests.integration.test_upstream_sse import _HEAD, DONE, USAGE, SSEUpstream, chunk
from tests.scripted_upstream import ScriptedUpstream, system_text

ONE_ATTEMPT: dict[str, object] = {"resilience": {"attempts": 1}}
CACHED = pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT)
THOUGHT = "The user wants the capital of France. That is Paris; answer in one word."
# A DeepSeek thinking-mode answer: reasoning first, then the answer, its reasoning tokens
# part of the completion tokens.
THINKING = Reply(content="Paris.", reasoning=THOUGHT, completion_tokens=30, reasoning_tokens=25)
REASONING_KEYS = {"reasoning_content", "reasoning"}


async def _collect(stub: Any, request: pb.CompleteStreamRequest) -> list[pb.CompleteStreamResponse]:
    return [event async for event in stub.CompleteStream(request)]


def _deltas(events: list[pb.CompleteStreamResponse]) -> list[pb.Delta]:
    return [e.delta for e in events if e.HasField("delta")]


def _reasoning(events: list[pb.CompleteStreamResponse]) -> str:
    return "".join(d.reasoning for d in _deltas(events))


def _text(events: list[pb.CompleteStreamResponse]) -> str:
    return "".join(d.content for d in _deltas(events))


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
async def test_unary_relays_reasoning_apart_from_the_answer(stub, upstream, spelling):
    """DeepSeek's `reasoning_content` and OpenRouter's `reasoning` come back as
    `reasoning`, the answer alone as `content`, and the reported reasoning tokens as
    `usage.reasoning_tokens` (part of the output tokens)."""
    upstream.script(dataclasses.replace(THINKING, reasoning_field=spelling))
    response = await stub.Complete(chat("Capital of France?"))
    assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    usage = response.metadata.usage
    assert (usage.output_tokens, usage.reasoning_tokens, usage.estimated) == (30, 25, False)
    assert response.metadata.finish_reason == pb.FINISH_REASON_STOP


async def test_the_next_turn_sends_reasoning_back_only_when_the_caller_does(stub, upstream):
    """The gateway adds no reasoning of its own to a request: an assistant turn sent back
    with content alone goes upstream as role and content only (DeepSeek ignores earlier
    reasoning where no tool was called)."""
    upstream.script(THINKING, Reply(content="About 2.1 million."))
    first = await stub.Complete(chat("Capital of France?"))
    assert first.reasoning == THOUGHT
    second = await stub.Complete(
        pb.CompleteRequest(
            model=FAKE_MODEL,
            messages=[
                pb.Message(role=pb.ROLE_USER, content="Capital of France?"),
                pb.Message(role=pb.ROLE_ASSISTANT, content=first.content),
                pb.Message(role=pb.ROLE_USER, content="Its population?"),
            ],
        )
    )
    assert second.reasoning == ""
    for request in upstream.requests:
        assert not REASONING_KEYS & set(request.body)
        for message in request.body["messages"]:
            assert set(message) == {"role", "content"}
    assert upstream.requests[1].body["messages"][1] == {"role": "assistant", "content": "Paris."}


async def test_a_thinking_tool_loop_sends_the_reasoning_back(stub, upstream):
    """DeepSeek's thinking mode answers 400 unless each assistant message with tool calls
    comes back with its `reasoning_content`: an assistant turn's `reasoning` is sent as
    that, beside its tool calls, in every later request."""
    weather = pb.Tool(name="get_weather", parameters='{"type": "object"}')
    call = ToolCallReply("call_1", "get_weather", '{"city": "Paris"}')
    upstream.script(
        Reply(content="", reasoning=THOUGHT, tool_calls=(call,), finish_reason="tool_calls"),
        Reply(content="Sunny in Paris."),
    )
    question = pb.Message(role=pb.ROLE_USER, content="Weather in Paris?")
    first = await stub.Complete(
        pb.CompleteRequest(model=FAKE_MODEL, messages=[question], tools=[weather])
    )
    assert (first.reasoning, [c.id for c in first.tool_calls]) == (THOUGHT, ["call_1"])
    turn = pb.Message(
        role=pb.ROLE_ASSISTANT, tool_calls=first.tool_calls, reasoning=first.reasoning
    )
    result = pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny")
    second = await stub.Complete(
        pb.CompleteRequest(model=FAKE_MODEL, messages=[question, turn, result], tools=[weather])
    )
    assert second.content == "Sunny in Paris."
    sent = upstream.requests[-1].body["messages"][1]
    assert sent["reasoning_content"] == THOUGHT
    assert [c["id"] for c in sent["tool_calls"]] == ["call_1"]
    assert "reasoning" not in sent


async def test_a_turn_that_spent_its_max_tokens_thinking_can_be_sent_back(stub, upstream):
    """An answer whose max_tokens went on reasoning has empty content: sent back as the
    next turn's history with its reasoning, it is accepted, and goes upstream with both."""
    upstream.script(
        Reply(content="", reasoning=THOUGHT, finish_reason="length"), Reply(content="Paris.")
    )
    question = pb.Message(role=pb.ROLE_USER, content="Capital of France?")
    first = await stub.Complete(pb.CompleteRequest(model=FAKE_MODEL, messages=[question]))
    assert (first.content, first.metadata.finish_reason) == ("", pb.FINISH_REASON_LENGTH)
    turn = pb.Message(role=pb.ROLE_ASSISTANT, content=first.content, reasoning=first.reasoning)
    go_on = pb.Message(role=pb.ROLE_USER, content="Answer in one word.")
    second = await stub.Complete(
        pb.CompleteRequest(model=FAKE_MODEL, messages=[question, turn, go_on])
    )
    assert second.content == "Paris."
    sent = upstream.requests[-1].body["messages"][1]
    assert sent == {"role": "assistant", "content": "", "reasoning_content": THOUGHT}


@pytest.mark.parametrize(
    ("content", "reasoning"),
    [(" ", ""), (" ", " \n\n"), ("\u200b", "\u2060 \u200b"), ("", "\ufeff")],
    ids=["blank", "blank-reasoning", "invisible", "invisible-reasoning"],
)
async def test_an_assistant_turn_with_neither_text_nor_reasoning_is_refused(
    stub, upstream, content, reasoning
):
    """Without tool calls or reasoning, an empty assistant turn is still refused; reasoning
    of whitespace or invisible characters alone is none, as such text is.

    Before, a turn of blank text and blank reasoning was sent upstream, and one of
    invisible characters still was."""
    messages = [
        pb.Message(role=pb.ROLE_USER, content="Capital of France?"),
        pb.Message(role=pb.ROLE_ASSISTANT, content=content, reasoning=reasoning),
        pb.Message(role=pb.ROLE_USER, content="Answer in one word."),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(model=FAKE_MODEL, messages=messages))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"messages[1].content": "must not be empty"}
    assert upstream.requests == []


async def test_reasoning_is_sent_back_in_each_upstreams_reasoning_field(upstream, start_gateway):
    """OpenRouter and newer vLLM read reasoning sent back as `reasoning`, DeepSeek as
    `reasoning_content`: an upstream set to `reasoning_field: reasoning` gets an assistant
    turn's reasoning in that field, unary and streamed, and an upstream left at the
    default gets it as `reasoning_content`; neither gets the other field.

    Before, every upstream got `reasoning_content`."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["reasoning_field"] = "reasoning"
    data["upstreams"].append(
        {"name": "deepseek", "base_url": upstream.base_url, "models": {"ds-model": FAKE_MODEL}}
    )
    data["models"]["ds-model"] = data["models"][FAKE_MODEL]
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    weather = pb.Tool(name="get_weather", parameters='{"type": "object"}')
    call = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    messages = [
        pb.Message(role=pb.ROLE_USER, content="Weather in Paris?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call], reasoning=THOUGHT),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny"),
    ]
    for model in (FAKE_MODEL, "ds-model"):
        await gateway.stub.Complete(
            pb.CompleteRequest(model=model, messages=messages, tools=[weather])
        )
    await _collect(
        gateway.stub,
        pb.CompleteStreamRequest(model=FAKE_MODEL, messages=messages, tools=[weather]),
    )
    unary, deepseek, streamed = (request.body["messages"][1] for request in upstream.requests)
    for sent in (unary, streamed):
        assert sent["reasoning"] == THOUGHT
        assert "reasoning_content" not in sent
    assert deepseek["reasoning_content"] == THOUGHT
    assert "reasoning" not in deepseek


@pytest.mark.parametrize("role", [pb.ROLE_USER, pb.ROLE_SYSTEM, pb.ROLE_TOOL])
async def test_reasoning_only_on_assistant_messages(stub, upstream, role):
    """Reasoning sent back on any but an assistant message is refused, naming the field."""
    messages = [
        pb.Message(role=pb.ROLE_USER, content="hi"),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[pb.ToolCall(id="call_1", name="f", arguments="{}")],
        ),
        pb.Message(role=role, content="x", reasoning="thinking", tool_call_id="call_1")
        if role == pb.ROLE_TOOL
        else pb.Message(role=role, content="x", reasoning="thinking"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(model=FAKE_MODEL, messages=messages))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[2].reasoning" in field_violations(caught.value)
    assert upstream.requests == []


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
async def test_stream_relays_reasoning_pieces_before_the_text(stub, upstream, spelling):
    """Reasoning pieces go out as they arrive, each event split across TCP writes, all
    before the first text; they assemble, in order, into the reasoning; the first piece
    sets the time to first token; the final carries the reasoning tokens."""
    delay_s = 0.2
    upstream.script(
        dataclasses.replace(
            THINKING,
            reasoning_field=spelling,
            reasoning_pieces=3,
            chunks=2,
            split_events=True,
            chunk_delay_s=delay_s,
        )
    )
    events = await _collect(stub, chat_stream())
    deltas = _deltas(events)
    with_reasoning = [i for i, d in enumerate(deltas) if d.reasoning]
    with_text = [i for i, d in enumerate(deltas) if d.content]
    assert len(with_reasoning) == 3, "pieces are relayed as they arrive, not gathered"
    assert max(with_reasoning) < min(with_text)
    assert (_reasoning(events), _text(events)) == (THOUGHT, "Paris.")
    final = events[-1].final
    # The first reasoning piece comes one delay in, the first text four delays in.
    assert 0 < final.timings.time_to_first_token_ms < 2.5 * delay_s * 1000
    assert (final.usage.output_tokens, final.usage.reasoning_tokens) == (30, 25)


async def test_stream_sends_reasoning_and_text_of_one_read_as_one_delta(stub, upstream):
    """Events written in one piece: the first output alone, then the rest of the read,
    reasoning and text together, as one delta."""
    upstream.script(
        Reply(content="aabb", chunks=2, reasoning="r1r2r3", reasoning_pieces=3, coalesce=True)
    )
    deltas = _deltas(await _collect(stub, chat_stream()))
    assert [(d.reasoning, d.content) for d in deltas] == [("r1", ""), ("r2r3", "aabb")]


async def test_a_stream_answered_with_one_json_completion_relays_its_reasoning(stub, upstream):
    """A server that ignores `stream: true`: its reasoning and text go out as one delta."""
    upstream.script(dataclasses.replace(THINKING, ignore_stream=True))
    deltas = _deltas(await _collect(stub, chat_stream()))
    assert [(d.reasoning, d.content) for d in deltas] == [(THOUGHT, "Paris.")]


async def test_a_max_tokens_spent_on_reasoning_shows_why_the_answer_is_empty(stub, upstream):
    """Finish LENGTH with no text: the reasoning that used up max_tokens is there, unary and
    streamed."""
    spent = Reply(content="", reasoning=THOUGHT, finish_reason="length", reasoning_tokens=3)
    upstream.script(spent, spent)
    response = await stub.Complete(chat(params=pb.GenerationParams(max_tokens=3)))
    assert (response.content, response.reasoning) == ("", THOUGHT)
    assert response.metadata.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.metadata.usage.reasoning_tokens == 3
    events = await _collect(stub, chat_stream(params=pb.GenerationParams(max_tokens=3)))
    assert (_text(events), _reasoning(events)) == ("", THOUGHT)
    assert events[-1].final.finish_reason == pb.FINISH_REASON_LENGTH


async def test_stream_cut_after_reasoning_only_is_not_retried(upstream, start_gateway):
    """Reasoning that reached the caller is output: a cut after it is STREAM_INTERRUPTED,
    never retried, and recorded once with the reasoning sent as its estimated output."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.script(
        dataclasses.replace(THINKING, reasoning_pieces=4, cut_after_events=3, chunk_delay_s=0.01)
    )
    received: list[pb.CompleteStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(chat_stream()):
            received.append(event)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "STREAM_INTERRUPTED"
    sent = _reasoning(received)
    assert sent == "".join(split_even(THOUGHT, 4)[:2])  # the role event, then two pieces
    assert _text(received) == ""
    assert int(info.metadata["chars_sent"]) == len(sent)
    assert len(upstream.requests) == 1
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.requests, total.estimated_requests) == (1, 1)
    assert total.usage.output_tokens == estimate_text_tokens(sent)


async def test_stream_idle_timeout_runs_from_the_last_reasoning_piece(upstream, start_gateway):
    """Once reasoning flows, `stream_idle_timeout_s` bounds the wait for the next piece:
    a stream silent past it after reasoning is cut with STREAM_INTERRUPTED."""
    upstream.script(dataclasses.replace(THINKING, reasoning_pieces=3, chunk_delay_s=0.6))
    config = gateway_config(upstream.base_url)
    slow = dataclasses.replace(config.upstreams[0], stream_idle_timeout_s=0.2)
    gateway = await start_gateway(dataclasses.replace(config, upstreams=(slow,)))
    received: list[pb.CompleteStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(chat_stream()):
            received.append(event)
    assert error_info(caught.value).reason == "STREAM_INTERRUPTED"
    assert [(d.reasoning, d.content) for d in _deltas(received)] == [
        (split_even(THOUGHT, 3)[0], "")
    ]
    await upstream.wait_for_disconnect(timeout_s=5)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
async def test_reasoning_that_is_not_a_string_is_a_malformed_answer(
    upstream, start_gateway, is_stream, spelling
):
    """A non-string reasoning is a malformed answer, like non-string content: retried
    before any output, and UNAVAILABLE naming the upstream in the end."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    bad = Reply(content="Paris.", raw_reasoning={"text": "hmm"}, reasoning_field=spelling)
    upstream.script(bad, THINKING)
    if is_stream:
        events = await _collect(gateway.stub, chat_stream())
        assert (_reasoning(events), _text(events)) == (THOUGHT, "Paris.")
    else:
        response = await gateway.stub.Complete(chat())
        assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    assert len(upstream.requests) == 2
    upstream.script(bad)
    one_try = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if is_stream:
            await _collect(one_try.stub, chat_stream())
        else:
            await one_try.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed" in caught.value.details()
    assert error_info(caught.value).metadata["upstream"] == "up0"


@pytest.mark.parametrize("count", [31, -1, "25", 2.5, None], ids=str)
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_bad_reasoning_token_count_is_ignored_and_the_answer_stands(
    stub, upstream, count, is_stream
):
    """A count that cannot be part of the output (more than it, negative, not an integer,
    null) is ignored: the answer, its reasoning and the rest of its usage stand, not
    estimated, from one upstream request."""
    upstream.script(dataclasses.replace(THINKING, reasoning_tokens=count))
    if is_stream:
        events = await _collect(stub, chat_stream())
        reasoning, content, usage = _reasoning(events), _text(events), events[-1].final.usage
    else:
        response = await stub.Complete(chat())
        reasoning, content, usage = response.reasoning, response.content, response.metadata.usage
    assert (reasoning, content) == (THOUGHT, "Paris.")
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (7, 30, 0)
    assert not usage.estimated
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_reasoning_token_count_written_as_a_whole_float_is_kept(stub, upstream, is_stream):
    """`reasoning_tokens: 25.0` is 25, as `completion_tokens: 30.0` is 30: JSON has one
    kind of number, and some servers write every count with a fraction.

    Before, the other counts took 25.0 as 25 but the reasoning count was dropped to 0."""
    whole_floats = dataclasses.replace(THINKING, completion_tokens=30.0, reasoning_tokens=25.0)
    upstream.script(whole_floats)
    if is_stream:
        usage = (await _collect(stub, chat_stream()))[-1].final.usage
    else:
        usage = (await stub.Complete(chat())).metadata.usage
    assert (usage.output_tokens, usage.reasoning_tokens, usage.estimated) == (30, 25, False)


@pytest.mark.parametrize("completion", [5, 30], ids=["fewer-than-the-reasoning", "more"])
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_reasoning_left_out_of_the_completion_count_is_billed_as_output(
    stub, upstream, is_stream, completion
):
    """A relay of Gemini that counts the reasoning apart from `completion_tokens`, its
    `total_tokens` holding both, has its answer's output counted and billed as both, as
    the provider bills it, not as the completion count alone.

    Before, the output was the completion alone (a fraction of the bill) and the reasoning
    count, more than it, was dropped."""
    counts = {
        "prompt_tokens": 7,
        "completion_tokens": completion,
        "total_tokens": 7 + completion + 25,
        "completion_tokens_details": {"reasoning_tokens": 25},
    }
    upstream.script(dataclasses.replace(THINKING, raw_usages=(counts,)))
    if is_stream:
        meta = (await _collect(stub, chat_stream()))[-1].final
    else:
        meta = (await stub.Complete(chat())).metadata
    usage = meta.usage
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (
        7,
        completion + 25,
        25,
    )
    assert not usage.estimated
    assert meta.cost_usd == pytest.approx((7 * 0.14 + (completion + 25) * 0.42) / 1e6)


async def test_unreported_usage_is_estimated_with_the_reasoning(stub, upstream):
    """With no usage reported, the output estimate counts the reasoning, which the
    provider bills as output; reasoning tokens are then 0 (none reported)."""
    upstream.script(dataclasses.replace(THINKING, include_usage=False))
    response = await stub.Complete(chat())
    usage = response.metadata.usage
    assert usage.estimated
    assert usage.output_tokens == estimate_text_tokens("Paris.") + estimate_text_tokens(THOUGHT)
    assert usage.reasoning_tokens == 0


async def test_unary_cache_hit_returns_the_same_reasoning(upstream, start_gateway):
    """The same request twice: the second is a cache hit with the same reasoning and
    reasoning tokens."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(THINKING)
    first = await gateway.stub.Complete(chat(cache=CACHED))
    second = await gateway.stub.Complete(chat(cache=CACHED))
    assert (first.metadata.cache_hit, second.metadata.cache_hit) == (False, True)
    assert second.reasoning == first.reasoning == THOUGHT
    assert second.content == "Paris."
    assert second.metadata.usage.reasoning_tokens == 25
    assert len(upstream.requests) == 1


async def test_stream_cache_replay_sends_the_reasoning_first_whole(
    upstream, start_gateway, cache_section
):
    """A cached stream replays its reasoning as one delta, then its text as it streamed
    live; a unary hit of the same answer has it too (memory and Redis)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache_section))
    upstream.script(dataclasses.replace(THINKING, reasoning_pieces=4, chunks=2))
    live = await _collect(gateway.stub, chat_stream(cache=CACHED))
    # Until its answer is stored, the call is a flight a new caller joins, getting the
    # pieces as they streamed (README: "live, or the whole reasoning"): wait for the store.
    await settled(gateway)
    replayed = await _collect(gateway.stub, chat_stream(cache=CACHED))
    assert (live[-1].final.cache_hit, replayed[-1].final.cache_hit) == (False, True)
    assert len(upstream.requests) == 1
    deltas = _deltas(replayed)
    assert (deltas[0].reasoning, deltas[0].content) == (THOUGHT, "")
    assert [d.content for d in deltas[1:]] == [d.content for d in _deltas(live) if d.content]
    assert all(not d.reasoning for d in deltas[1:])
    assert replayed[-1].final.usage.reasoning_tokens == 25
    hit = await gateway.stub.Complete(chat(cache=CACHED))
    assert (hit.metadata.cache_hit, hit.reasoning, hit.content) == (True, THOUGHT, "Paris.")


async def test_coalesced_followers_get_the_reasoning(upstream, start_gateway):
    """Identical concurrent calls share one upstream stream: streaming followers get the
    reasoning pieces live, a unary follower the whole reasoning, all as cache hits."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(dataclasses.replace(THINKING, delay_s=0.3, chunk_delay_s=0.02))
    request = chat_stream(cache=CACHED)
    leader = asyncio.ensure_future(_collect(gateway.stub, request))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    followers = [asyncio.ensure_future(_collect(gateway.stub, request)) for _ in range(2)]
    unary = asyncio.ensure_future(gateway.stub.Complete(chat(cache=CACHED)))
    streams = await asyncio.gather(leader, *followers)
    for events in streams:
        assert (_reasoning(events), _text(events)) == (THOUGHT, "Paris.")
        assert len([d for d in _deltas(events) if d.reasoning]) == 3  # live, in pieces
    assert [events[-1].final.cache_hit for events in streams] == [False, True, True]
    response = await unary
    assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    assert response.metadata.cache_hit
    assert len(upstream.requests) == 1


async def test_a_batch_item_carries_its_reasoning(stub, upstream):
    """A CompleteBatch result carries the reasoning, and the summary the reasoning tokens."""
    upstream.default = THINKING
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=name, request=chat(name)) for name in ("a", "b")]
    )
    events = [event async for event in stub.CompleteBatch(batch)]
    results = [e.result for e in events if e.HasField("result")]
    assert [(r.response.reasoning, r.response.content) for r in results] == [
        (THOUGHT, "Paris.")
    ] * 2
    assert events[-1].summary.usage.reasoning_tokens == 50


async def test_summaries_never_include_reasoning(start_gateway):
    """Summarize uses only the answers' text: no reasoning reaches the combining call or
    the summary; its usage counts the reasoning tokens. (A part whose max_tokens all went
    on reasoning, with no text, fails the call: test_summarize.py.)"""
    thinking = "SECRET-THOUGHT"

    def respond(body: dict[str, Any]) -> Reply:
        if system_text(body).startswith("You summarise one part"):
            return Reply(content="part", reasoning=thinking, reasoning_tokens=2)
        return Reply(content="FINAL", reasoning=thinking, reasoning_tokens=2)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        gateway = await start_gateway(
            gateway_config(
                fake.base_url,
                models=fake_model_window(1024),
            )
        )
        document = "\n\n".join(
            " ".join(f"Paragraph p{p} sentence s{s} says something." for s in range(5))
            for p in range(40)
        )
        response = await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        )
        combines = [
            r.body
            for r in fake.requests
            if system_text(r.body).startswith("You are given summaries")
        ]
    assert response.summary == "FINAL"
    assert response.chunks > 1
    assert combines, "the parts were combined"
    for sent in fake.requests:
        assert thinking not in str(sent.body)
    assert response.usage.reasoning_tokens == 2 * response.upstream_calls


async def test_python_client_gathers_the_streamed_reasoning(gateway, upstream):
    """`GatewayClient.stream` still yields only the text; `stream.reasoning` holds the
    reasoning, assembled from its pieces."""
    upstream.script(THINKING)
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Capital of France?", model=FAKE_MODEL)
        texts = [text async for text in stream]
    assert "".join(texts) == "Paris."
    assert stream.reasoning == THOUGHT
    assert stream.final is not None
    assert stream.final.usage.reasoning_tokens == 25


async def test_an_upstream_extra_body_turns_thinking_off_for_its_model(upstream, start_gateway):
    """Two upstream entries for one provider: the one whose `extra_body` turns DeepSeek's
    thinking off serves its own model name with that switch in every request, unary and
    streamed; the other's requests carry nothing extra."""
    data = gateway_config_data(upstream.base_url)
    fast = {
        "name": "up0-fast",
        "base_url": upstream.base_url,
        "models": {"fast-model": FAKE_MODEL},
        "extra_body": {"thinking": {"type": "disabled"}},
    }
    data["upstreams"].append(fast)
    data["models"]["fast-model"] = data["models"][FAKE_MODEL]
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    await gateway.stub.Complete(chat("hi", model="fast-model"))
    await _collect(gateway.stub, chat_stream("hi", model="fast-model"))
    await gateway.stub.Complete(chat("hi"))
    fast_unary, fast_stream, plain = (request.body for request in upstream.requests)
    for body in (fast_unary, fast_stream):
        assert body["thinking"] == {"type": "disabled"}
        assert body["model"] == FAKE_MODEL
    assert fast_stream["stream"] is True
    assert "thinking" not in plain


async def test_an_upstream_taking_max_completion_tokens_gets_the_callers_max_tokens_there(
    upstream, start_gateway
):
    """OpenAI's reasoning models refuse `max_tokens`: an upstream configured with
    `max_tokens_field: max_completion_tokens` gets the caller's limit in that field, unary
    and streamed, while the caller still sets `params.max_tokens`."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["max_tokens_field"] = "max_completion_tokens"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    limited = chat("hi", params=pb.GenerationParams(max_tokens=77))
    await gateway.stub.Complete(limited)
    streamed = pb.CompleteStreamRequest()
    streamed.ParseFromString(limited.SerializeToString())
    await _collect(gateway.stub, streamed)
    for request in upstream.requests:
        assert request.body["max_completion_tokens"] == 77
        assert "max_tokens" not in request.body


def _with_effort(effort: int, content: str = "hi") -> pb.CompleteRequest:
    return chat(content, params=pb.GenerationParams(reasoning_effort=effort), cache=CACHED)


async def test_reasoning_effort_is_sent_and_replaces_an_upstreams_default(upstream, start_gateway):
    """A request's effort reaches the upstream as `reasoning_effort`, unary and streamed,
    in place of the default its `extra_body` sets; a request without one gets the default,
    and an upstream without a default gets no field at all."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["extra_body"] = {"reasoning_effort": "high"}
    data["upstreams"].append(
        {"name": "plain", "base_url": upstream.base_url, "models": {"plain-model": FAKE_MODEL}}
    )
    data["models"]["plain-model"] = data["models"][FAKE_MODEL]
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    low = chat("hi", params=pb.GenerationParams(reasoning_effort=pb.REASONING_EFFORT_LOW))
    await gateway.stub.Complete(low)
    streamed = pb.CompleteStreamRequest()
    streamed.ParseFromString(low.SerializeToString())
    await _collect(gateway.stub, streamed)
    await gateway.stub.Complete(chat("hi"))
    await gateway.stub.Complete(chat("hi", model="plain-model"))
    unary, stream, default, plain = (request.body for request in upstream.requests)
    assert (unary["reasoning_effort"], stream["reasoning_effort"]) == ("low", "low")
    assert stream["stream"] is True
    assert default["reasoning_effort"] == "high"
    assert "reasoning_effort" not in plain


async def test_each_reasoning_effort_has_its_own_cache_entry(upstream, start_gateway):
    """Answers at one effort are never served for another, nor for none."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    efforts = [pb.REASONING_EFFORT_UNSPECIFIED, pb.REASONING_EFFORT_LOW, pb.REASONING_EFFORT_MAX]
    for effort in efforts:
        reply = await gateway.stub.Complete(_with_effort(effort))
        assert not reply.metadata.cache_hit
    again = await gateway.stub.Complete(_with_effort(pb.REASONING_EFFORT_LOW))
    assert again.metadata.cache_hit
    sent = [request.body.get("reasoning_effort") for request in upstream.requests]
    assert sent == [None, "low", "max"]


async def test_an_unknown_reasoning_effort_is_refused_before_any_upstream_call(stub, upstream):
    """A value outside the enum (a newer client's) is INVALID_ARGUMENT on the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(_with_effort(99))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"params.reasoning_effort": "unknown reasoning effort"}
    assert upstream.requests == []


async def test_an_upstream_refusing_an_effort_is_invalid_argument_tried_once(stub, upstream):
    """A provider that does not take a value answers 400: the caller learns so at once,
    with no retry (the same request would be refused again)."""
    upstream.script(Status(400))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(_with_effort(pb.REASONING_EFFORT_MINIMAL))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [request.body["reasoning_effort"] for request in upstream.requests] == ["minimal"]


async def test_python_client_takes_the_effort_by_name(gateway, upstream):
    """`reasoning_effort="max"` in the Python client; an unknown name fails before a call."""
    async with GatewayClient(gateway.server.address) as client:
        await client.complete("hi", model=FAKE_MODEL, reasoning_effort="max")
        with pytest.raises(ValueError, match="reasoning effort must be one of"):
            await client.complete("hi", model=FAKE_MODEL, reasoning_effort="extreme")
    assert [request.body["reasoning_effort"] for request in upstream.requests] == ["max"]


async def test_get_usage_keeps_reasoning_tokens_apart(stub, upstream):
    """What thinking cost shows in the usage ledger: a row's reasoning tokens, within its
    output tokens, summed over unary and streamed calls."""
    upstream.script(THINKING, THINKING)
    await stub.Complete(chat("Capital of France?"))
    await _collect(stub, chat_stream("Capital of Italy?"))
    usage = await stub.GetUsage(pb.GetUsageRequest())
    [row] = usage.rows
    assert (row.requests, row.usage.output_tokens, row.usage.reasoning_tokens) == (2, 60, 50)
    assert usage.total.usage.reasoning_tokens == 50


# A reasoning model served without a reasoning parser (vLLM without `--reasoning-parser`,
# llama.cpp without `--reasoning-format`) writes its thinking into the answer's text.
TAGGED = f"<think>{THOUGHT}</think>\n\nParis."


def _think_tags_config(base_url: str, *, think_tags: bool | str = True, **sections: Any) -> Any:
    """A gateway config whose one upstream has `think_tags` set as given."""
    data = gateway_config_data(base_url, **sections)
    data["upstreams"][0]["think_tags"] = think_tags
    return parse_config(data, source="<test>", environ={})


# How the answer reaches the gateway: unary, streamed, a stream answered with one JSON
# completion, and a unary call sent as a stream (`stream_unary_calls`).
HOW = ["unary", "stream", "stream-answered-unary", "unary-sent-as-stream"]


async def _answer(
    upstream: Any, start_gateway: Any, how: str, reply: Reply, *, think_tags: bool | str = True
) -> tuple[str, str, pb.CompletionMetadata]:
    """`reply` through a gateway whose upstream has `think_tags`: reasoning, text, metadata."""
    config = _think_tags_config(upstream.base_url, think_tags=think_tags)
    if how == "unary-sent-as-stream":
        streamed = dataclasses.replace(config.upstreams[0], stream_unary_calls=True)
        config = dataclasses.replace(config, upstreams=(streamed,))
    gateway = await start_gateway(config)
    upstream.script(dataclasses.replace(reply, ignore_stream=how == "stream-answered-unary"))
    if how.startswith("stream"):
        events = await _collect(gateway.stub, chat_stream())
        return _reasoning(events), _text(events), events[-1].final
    response = await gateway.stub.Complete(chat())
    return response.reasoning, response.content, response.metadata


@pytest.mark.parametrize("how", HOW)
async def test_a_leading_think_block_is_relayed_as_reasoning(upstream, start_gateway, how):
    """With `think_tags`, the block opening the answer's text is its reasoning and the text
    after it, its leading newlines trimmed, the answer; the usage stands as reported, its
    reasoning tokens none (the upstream counted none apart).

    Before, the caller got `<think>...</think>` in the answer's text."""
    reply = Reply(content=TAGGED, completion_tokens=30, chunks=5)
    reasoning, content, meta = await _answer(upstream, start_gateway, how, reply)
    assert (reasoning, content) == (THOUGHT, "Paris.")
    assert meta.finish_reason == pb.FINISH_REASON_STOP
    usage = meta.usage
    assert (usage.output_tokens, usage.reasoning_tokens, usage.estimated) == (30, 0, False)


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_a_think_block_follows_the_reasoning_a_server_sent_in_its_field(
    upstream, start_gateway, how
):
    """A server that sends `reasoning_content` and a block in the text too: the block's
    reasoning is appended to the field's."""
    reply = Reply(content="<think>second</think>Paris.", reasoning="first. ")
    reasoning, content, _ = await _answer(upstream, start_gateway, how, reply)
    assert (reasoning, content) == ("first. second", "Paris.")


@pytest.mark.parametrize(
    ("think_tags", "text"),
    [(True, "<think>hmm</think>\n\nParis."), ("forced_open", "hmm</think>\n\nParis.")],
    ids=["true", "forced_open"],
)
async def test_think_tags_cut_across_chunks_are_still_tags(
    upstream, start_gateway, think_tags, text
):
    """One event a character (each tag cut across many events and reads): the reasoning
    comes in pieces before the text, and no piece of a tag reaches the caller; so with
    `forced_open`, the block the template opened ending at its close tag."""
    gateway = await start_gateway(_think_tags_config(upstream.base_url, think_tags=think_tags))
    upstream.script(Reply(content=text, chunks=len(text), chunk_delay_s=0.002))
    deltas = _deltas(await _collect(gateway.stub, chat_stream()))
    assert "".join(d.reasoning for d in deltas) == "hmm"
    assert "".join(d.content for d in deltas) == "Paris."
    with_reasoning = [i for i, d in enumerate(deltas) if d.reasoning]
    assert len(with_reasoning) > 1, "reasoning is relayed as it arrives"
    assert max(with_reasoning) < min(i for i, d in enumerate(deltas) if d.content)
    assert not any("<" in d.content or "<" in d.reasoning for d in deltas)


async def test_reasoning_goes_out_as_it_arrives_while_only_a_cut_tag_is_held(start_gateway):
    """A raw socket upstream writes each piece only once the caller got the last output:
    tags cut across reads (`<th` + `ink>`, `</thi` + `nk>`) are held until whole, and the
    reasoning before a close tag's beginning is relayed before the rest of it comes."""
    writes: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n")  # the body ends at the close
        with contextlib.suppress(ConnectionError):
            while (piece := await writes.get()) is not None:
                writer.write(piece)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(_think_tags_config(url))
        call = gateway.stub.CompleteStream(chat_stream(), timeout=10)

        async def relayed(*pieces: str) -> tuple[str, str]:
            """Write each piece in a read of its own; the next message the caller gets."""
            for piece in pieces[:-1]:
                await writes.put(chunk(piece))
                await asyncio.sleep(0.05)  # read alone: it brings no output to wait for
            await writes.put(chunk(pieces[-1]))
            async with asyncio.timeout(5):  # held back, it never comes: the upstream waits
                message = await call.read()
            return message.delta.reasoning, message.delta.content

        assert await relayed("<th", "ink>hm") == ("hm", "")
        assert await relayed("m</thi") == ("m", "")
        assert await relayed("nk>\n", "\nPar") == ("", "Par")
        assert await relayed("is.") == ("", "is.")
        await writes.put(chunk(finish="stop") + USAGE + DONE)
        await writes.put(None)
        final = await call.read()
    assert final.final.finish_reason == pb.FINISH_REASON_STOP


async def test_think_tags_in_any_case_are_tags_in_a_stream(start_gateway):
    """`<THINK>` and `</Think>`, as some relays upper-case the model's tags, split a stream
    as the lower-case tags do, each cut across events.

    Before, they were the answer's text."""
    pieces = [chunk(piece) for piece in ("<TH", "INK>hm</Th", "ink>Paris.")]
    async with SSEUpstream(b"".join(pieces) + chunk(finish="stop") + USAGE + DONE) as url:
        gateway = await start_gateway(_think_tags_config(url))
        events = await _collect(gateway.stub, chat_stream())
    assert (_reasoning(events), _text(events)) == ("hm", "Paris.")


async def test_think_tags_in_any_case_are_tags_in_a_unary_answer(start_gateway):
    """A unary answer opening with `<Think>` has its block split off as with `<think>`."""
    message = {"role": "assistant", "content": "<Think>hm</THINK>Paris."}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    answer = orjson.dumps({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    async with serving() as serve:
        raw = await serve(replying(head % len(answer) + answer))
        gateway = await start_gateway(_think_tags_config(raw.url))
        response = await gateway.stub.Complete(chat())
    assert (response.reasoning, response.content) == ("hm", "Paris.")


@pytest.mark.parametrize("how", HOW)
async def test_a_blank_think_block_is_no_reasoning(upstream, start_gateway, how):
    """Qwen3 with thinking off opens every answer with an empty block, `<think>` and
    `</think>` around blank lines: no reasoning, and the whitespace around a block's
    thought is none of it either. Before, the caller got reasoning "\n\n", sent back on
    the next turn."""
    reply = Reply(content="<think>\n\n</think>\n\nParis.", chunks=3)
    reasoning, content, _ = await _answer(upstream, start_gateway, how, reply)
    assert (reasoning, content) == ("", "Paris.")


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_an_unclosed_think_block_is_all_reasoning(upstream, start_gateway, how):
    """An answer cut by max_tokens before its close tag: all of it is reasoning (the tag's
    cut beginning too), the answer empty, finished LENGTH."""
    reply = Reply(content="<think>hmm, the capital is</thi", finish_reason="length")
    reasoning, content, meta = await _answer(upstream, start_gateway, how, reply)
    assert (reasoning, content) == ("hmm, the capital is</thi", "")
    assert meta.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("how", ["unary", "stream"])
@pytest.mark.parametrize(
    "text",
    ["Paris.", "Paris. <think>not reasoning</think>", "<th"],
    ids=["no-tag", "tag-not-at-the-start", "only-the-tags-beginning"],
)
async def test_text_not_opening_with_a_think_block_is_the_answer(
    upstream, start_gateway, how, text
):
    """With `think_tags`, only a leading block is reasoning: other text, a block later on,
    and text that only begins like the tag are the answer, as sent."""
    reasoning, content, _ = await _answer(upstream, start_gateway, how, Reply(content=text))
    assert (reasoning, content) == ("", text)


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_without_think_tags_a_think_block_is_text(upstream, start_gateway, how):
    """`think_tags: false` (the default) relays such a block as the answer's text, as some
    models write these tags as text."""
    reply = Reply(content=TAGGED)
    reasoning, content, _ = await _answer(upstream, start_gateway, how, reply, think_tags=False)
    assert (reasoning, content) == ("", TAGGED)


# DeepSeek R1 (since 0528) and QwQ: the chat template opens the block, so the answer
# starts inside it and writes only the close tag.
FORCED_OPEN = f"{THOUGHT}</think>\n\nParis."


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("think_tags", "split"),
    [("forced_open", (THOUGHT, "Paris.")), (True, ("", FORCED_OPEN))],
    ids=["forced_open", "true"],
)
async def test_a_block_the_template_opened_is_reasoning_with_forced_open(
    upstream, start_gateway, how, think_tags, split
):
    """`think_tags: forced_open` relays everything before the first close tag as the
    reasoning and the rest as the answer; `true` waits for an open tag that never comes,
    so the whole text, close tag and all, is the answer."""
    reply = Reply(content=FORCED_OPEN, completion_tokens=30, chunks=5)
    got = await _answer(upstream, start_gateway, how, reply, think_tags=think_tags)
    assert got[:2] == split
    assert got[2].finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("first", ["unary", "stream"])
async def test_a_cache_hit_replays_the_split_answer(upstream, start_gateway, cache_section, first):
    """The cache stores the answer split: a unary hit and a replayed stream give the
    reasoning apart, the text without the block (memory and Redis)."""
    gateway = await start_gateway(_think_tags_config(upstream.base_url, cache=cache_section))
    upstream.script(Reply(content=TAGGED, chunks=5))
    if first == "stream":
        await _collect(gateway.stub, chat_stream(cache=CACHED))
        await settled(gateway)
    else:
        await gateway.stub.Complete(chat(cache=CACHED))
    hit = await gateway.stub.Complete(chat(cache=CACHED))
    assert (hit.metadata.cache_hit, hit.reasoning, hit.content) == (True, THOUGHT, "Paris.")
    replayed = await _collect(gateway.stub, chat_stream(cache=CACHED))
    assert replayed[-1].final.cache_hit
    assert (_reasoning(replayed), _text(replayed)) == (THOUGHT, "Paris.")
    assert len(upstream.requests) == 1


async def test_python_client_shows_the_think_block_as_reasoning(upstream, start_gateway):
    """`complete` answers with the reasoning apart; `stream` yields only the answer's text,
    with the reasoning in `stream.reasoning`."""
    gateway = await start_gateway(_think_tags_config(upstream.base_url))
    upstream.script(Reply(content=TAGGED), Reply(content=TAGGED, chunks=5))
    async with GatewayClient(gateway.server.address) as client:
        response = await client.complete("Capital of France?", model=FAKE_MODEL)
        stream = client.stream("Capital of France?", model=FAKE_MODEL)
        texts = [text async for text in stream]
    assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    assert ("".join(texts), stream.reasoning) == ("Paris.", THOUGHT)


async def test_a_stream_cut_in_its_close_tag_counts_only_what_the_caller_got(
    upstream, start_gateway
):
    """A think block's stream cut in its close tag: `chars_sent` counts the reasoning the
    caller got, not the open tag nor the close tag's beginning, which never reached it.

    Before, it counted the upstream's text as sent (84 for the 72 relayed)."""
    gateway = await start_gateway(_think_tags_config(upstream.base_url))
    # The 7th of 8 pieces ends `...word.</thi`: the stream is cut there.
    upstream.script(Reply(content=TAGGED, chunks=8, cut_after_events=8, chunk_delay_s=0.01))
    received: list[pb.CompleteStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(chat_stream()):
            received.append(event)
    info = error_info(caught.value)
    assert info.reason == "STREAM_INTERRUPTED"
    assert (_reasoning(received), _text(received)) == (THOUGHT, "")
    assert info.metadata["chars_sent"] == str(len(THOUGHT))


# Mistral's reasoning models (Magistral; mistral-medium with `reasoning_effort`), byte for
# byte as its chat API writes them (https://docs.mistral.ai/capabilities/reasoning/): the
# message's content a list of typed parts, the thinking a list of text parts of its own.
def _thinking_part(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


MISTRAL_MESSAGE = {
    "role": "assistant",
    "content": [_thinking_part(THOUGHT), {"type": "text", "text": "Paris."}],
    "tool_calls": None,
    "prefix": False,
}
MISTRAL = Reply(raw_message=MISTRAL_MESSAGE, completion_tokens=30)
# Streamed: a list with a thinking part per event while it thinks, the event that ends the
# thinking with the first text part beside it, then the text as plain strings.
MISTRAL_DELTAS = (
    {"content": [_thinking_part(THOUGHT[:20])]},
    {"content": [_thinking_part(THOUGHT[20:50])]},
    {"content": [_thinking_part(THOUGHT[50:]), {"type": "text", "text": "Par"}]},
    {"content": "is"},
    {"content": "."},
)
MISTRAL_STREAM = dataclasses.replace(MISTRAL, raw_deltas=MISTRAL_DELTAS, chunk_delay_s=0.02)


async def _mistral_answer(stub: Any, *, is_stream: bool, **fields: Any) -> tuple[str, str, Any]:
    """The reasoning, the text and the metadata of one call, unary or streamed."""
    if is_stream:
        events = await _collect(stub, chat_stream(**fields))
        return _reasoning(events), _text(events), events[-1].final
    response = await stub.Complete(chat(**fields))
    return response.reasoning, response.content, response.metadata


async def test_mistral_content_parts_are_the_answer_and_its_thinking_the_reasoning(stub, upstream):
    """A Magistral answer, its content a list of a thinking part and a text part, comes back
    as `reasoning` and `content`, as DeepSeek's `reasoning_content` does.

    Before, it failed UNAVAILABLE: "message content is not a string"."""
    upstream.script(MISTRAL)
    response = await stub.Complete(chat("Capital of France?"))
    assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    assert response.metadata.finish_reason == pb.FINISH_REASON_STOP
    assert (response.metadata.usage.output_tokens, response.metadata.usage.estimated) == (30, False)
    assert len(upstream.requests) == 1


async def test_a_mistral_stream_relays_each_thinking_piece_as_reasoning_as_it_arrives(
    stub, upstream
):
    """A Magistral stream's thinking parts go out as `reasoning` pieces, one event's each,
    before the text, which follows as its parts and then its plain strings arrive."""
    upstream.script(MISTRAL_STREAM)
    events = await _collect(stub, chat_stream("Capital of France?"))
    deltas = _deltas(events)
    assert (_reasoning(events), _text(events)) == (THOUGHT, "Paris.")
    assert len([d for d in deltas if d.reasoning]) > 1, "relayed in pieces"
    assert (deltas[0].reasoning, deltas[0].content) == (THOUGHT[:20], "")
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_content_parts_of_other_types_are_skipped(stub, upstream, is_stream):
    """Parts that are neither text nor thinking (a reference, an image) are skipped: the
    answer is what can be read, the text parts' text in order."""
    reference = {"type": "reference", "reference_ids": [1, 2]}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    parts = [_thinking_part(THOUGHT), {"type": "text", "text": "Par"}, reference, image]
    parts.append({"text": "is."})  # a text part may leave its type out
    upstream.script(
        Reply(
            raw_message={"role": "assistant", "content": parts},
            raw_deltas=({"content": parts[:3]}, {"content": parts[3:]}),
        )
    )
    reasoning, text, _ = await _mistral_answer(stub, is_stream=is_stream)
    assert (reasoning, text) == (THOUGHT, "Paris.")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_content_of_unreadable_parts_alone_is_a_malformed_answer(
    upstream, start_gateway, is_stream
):
    """An answer whose parts are all of types the gateway cannot relay (an image alone) is
    a malformed answer, not an empty one: retried before any output, and UNAVAILABLE
    naming the upstream and the parts in the end."""
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    bad = Reply(
        raw_message={"role": "assistant", "content": image}, raw_deltas=({"content": image},)
    )
    gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.script(bad, MISTRAL_STREAM if is_stream else MISTRAL)
    assert (await _mistral_answer(gateway.stub, is_stream=is_stream))[:2] == (THOUGHT, "Paris.")
    assert len(upstream.requests) == 2
    upstream.script(bad)
    one_try = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _mistral_answer(one_try.stub, is_stream=is_stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no text or thinking part, only: image_url" in caught.value.details()
    assert error_info(caught.value).metadata["upstream"] == "up0"


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_mistral_thinking_counts_in_the_output_estimate(stub, upstream, is_stream):
    """With no usage reported, the output estimate counts the thinking parts as reasoning,
    which the provider bills as output."""
    upstream.script(dataclasses.replace(MISTRAL_STREAM, include_usage=False))
    _, _, meta = await _mistral_answer(stub, is_stream=is_stream)
    assert meta.usage.estimated
    assert meta.usage.output_tokens == estimate_text_tokens("Paris.") + estimate_text_tokens(
        THOUGHT
    )


async def test_a_cached_mistral_answer_keeps_its_reasoning(upstream, start_gateway, cache_section):
    """A Magistral stream is stored split: a replay sends the reasoning whole first, then
    the text, and a unary hit has both (memory and Redis)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache_section))
    upstream.script(MISTRAL_STREAM)
    live = await _collect(gateway.stub, chat_stream(cache=CACHED))
    await settled(gateway)
    replayed = await _collect(gateway.stub, chat_stream(cache=CACHED))
    assert (live[-1].final.cache_hit, replayed[-1].final.cache_hit) == (False, True)
    deltas = _deltas(replayed)
    assert (deltas[0].reasoning, deltas[0].content) == (THOUGHT, "")
    assert _text(replayed) == "Paris."
    hit = await gateway.stub.Complete(chat(cache=CACHED))
    assert (hit.metadata.cache_hit, hit.reasoning, hit.content) == (True, THOUGHT, "Paris.")
    assert len(upstream.requests) == 1


async def test_followers_of_a_mistral_stream_get_its_reasoning(upstream, start_gateway):
    """Identical concurrent calls share one Magistral stream: a streaming follower gets the
    reasoning and the text, a unary one both whole."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(dataclasses.replace(MISTRAL_STREAM, delay_s=0.3))
    request = chat_stream(cache=CACHED)
    leader = asyncio.ensure_future(_collect(gateway.stub, request))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(_collect(gateway.stub, request))
    unary = asyncio.ensure_future(gateway.stub.Complete(chat(cache=CACHED)))
    for events in await asyncio.gather(leader, follower):
        assert (_reasoning(events), _text(events)) == (THOUGHT, "Paris.")
    response = await unary
    assert (response.reasoning, response.content) == (THOUGHT, "Paris.")
    assert response.metadata.cache_hit
    assert len(upstream.requests) == 1
