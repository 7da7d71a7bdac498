"""Tool calling through the real server, against a real-socket upstream that calls tools."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import grpc
import pytest

from gateway_client import GatewayClient
from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.domain import ToolCall
from service.tokens import estimate_output_tokens
from tests.conftest import (
    FAKE_MODEL,
    chat,
    fake_model_window,
    gateway_config,
    gateway_config_data,
)
from tests.fake_upstream import FakeUpstream, Reply, Status, ToolCallReply
from tests.integration.helpers import error_info, field_violations, retry_delay_s
from tests.scripted_upstream import ScriptedUpstream

ONE_ATTEMPT: dict[str, object] = {"resilience": {"attempts": 1}}
CACHED = pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT)
# Integers past a double's precision: they must reach the upstream as written.
WEATHER_SCHEMA = (
    '{"type": "object", "properties": {"city": {"type": "string"}, '
    '"days": {"type": "integer", "maximum": 12345678901234567890}}, "required": ["city"]}'
)
WEATHER = pb.Tool(name="get_weather", description="Weather by city", parameters=WEATHER_SCHEMA)
CLOCK = pb.Tool(name="get-time")  # no description, no parameters
WEATHER_CALL = ToolCallReply("call_1", "get_weather", '{"city": "Paris",  "days": 3}')
# Not valid JSON: models write such arguments, and callers must see them as written.
CLOCK_CALL = ToolCallReply("call_2", "get-time", '{"tz": "Europe/Par')
TOOL_REPLY = Reply(content="", finish_reason="tool_calls", tool_calls=(WEATHER_CALL,))
# vmlx's shape: the id (and type) first, arguments before the name, the name on its own.
LATE_NAME_REPLY = Reply(
    content="",
    finish_reason="tool_calls",
    tool_calls=(WEATHER_CALL,),
    raw_tool_call_deltas=(
        [{"index": 0, "id": "call_1", "type": "function"}],
        [{"index": 0, "function": {"arguments": '{"city": "Paris",'}}],
        [{"index": 0, "function": {"name": "get_weather"}}],
        [{"index": 0, "function": {"arguments": '  "days": 3}'}}],
    ),
    chunk_delay_s=0.01,
)


def _request(
    *messages: pb.Message, stream: bool = False, **fields: Any
) -> pb.CompleteRequest | pb.CompleteStreamRequest:
    messages = messages or (pb.Message(role=pb.ROLE_USER, content="Weather in Paris?"),)
    fields.setdefault("tools", [WEATHER, CLOCK])
    kind = pb.CompleteStreamRequest if stream else pb.CompleteRequest
    return kind(model=FAKE_MODEL, messages=messages, **fields)


def _calls(calls: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.name, c.arguments) for c in calls]


def _assembled(events: list[pb.CompleteStreamResponse]) -> list[tuple[str, str, str]]:
    """The tool calls of a stream's deltas, assembled as an agent framework does."""
    calls: dict[int, list[str]] = {}
    for event in events:
        for piece in event.delta.tool_calls:
            if piece.index not in calls:
                assert piece.id, "a call's first piece has its id and name"
                assert piece.name
                calls[piece.index] = [piece.id, piece.name, ""]
            else:
                assert (piece.id, piece.name) == ("", "")
            calls[piece.index][2] += piece.arguments
    return [(i, n, a) for i, n, a in (calls[k] for k in sorted(calls))]


async def _collect(stub: Any, request: pb.CompleteStreamRequest) -> list[pb.CompleteStreamResponse]:
    return [event async for event in stub.CompleteStream(request)]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        (None, None),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO), "auto"),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), "none"),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), "required"),
        (
            pb.ToolChoice(function_name="get_weather"),
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
    ids=["unset", "auto", "none", "required", "function"],
)
async def test_unary_tool_call_round_trip(stub, upstream, choice, sent):
    """Tools and the tool choice reach the upstream as OpenAI expects, and the answer's
    tool calls come back with their id, name and arguments exactly as written."""
    upstream.script(TOOL_REPLY)
    fields = {} if choice is None else {"tool_choice": choice}
    response = await stub.Complete(_request(**fields))
    body = upstream.requests[-1].body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": json.loads(WEATHER_SCHEMA),
            },
        },
        {
            "type": "function",
            "function": {"name": "get-time", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert body["tools"][0]["function"]["parameters"]["properties"]["days"]["maximum"] == (
        12345678901234567890
    )
    assert body.get("tool_choice") == sent
    assert ("tool_choice" in body) is (sent is not None)
    assert body["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert _calls(response.tool_calls) == [
        ("call_1", "get_weather", '{"city": "Paris",  "days": 3}')
    ]
    assert response.content == ""
    assert response.metadata.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_second_turn_sends_the_tool_calls_and_results_back(stub, upstream):
    """An assistant turn with tool calls (content null) and the tool results, each with
    the id of the call it answers, reach the upstream in OpenAI's shape."""
    upstream.script(Reply(content="Sunny, 21 C."))
    response = await stub.Complete(
        _request(
            pb.Message(role=pb.ROLE_USER, content="Weather and time in Paris?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[
                    pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}'),
                    pb.ToolCall(id="call_2", name="get-time", arguments="{}"),
                ],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content='{"temp_c": 21}'),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_2", content="12:00"),
        )
    )
    assert response.content == "Sunny, 21 C."
    assert upstream.requests[-1].body["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get-time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_2"},
    ]


async def test_a_tool_name_the_model_invented_can_be_answered(stub, upstream):
    """A model may call a name outside the rule for declared tools ("python.run", never
    declared): the gateway relays the call, and the next turn, which answers it, is taken
    and sent on as it was."""
    upstream.script(
        Reply(content="", tool_calls=(ToolCallReply("call_x", "python.run", '{"code": "1"}'),)),
        Reply(content="There is no such tool."),
    )
    question = pb.Message(role=pb.ROLE_USER, content="Compute 1+1")
    first = await stub.Complete(_request(question))
    assert [(c.id, c.name) for c in first.tool_calls] == [("call_x", "python.run")]
    answer = pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_x", content="unknown tool")
    turn = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=first.tool_calls)
    final = await stub.Complete(_request(question, turn, answer))
    assert final.content == "There is no such tool."
    sent = upstream.requests[-1].body["messages"][1]["tool_calls"][0]
    assert sent["function"]["name"] == "python.run"


@pytest.mark.parametrize("interleave", [False, True], ids=["in-turn", "interleaved"])
async def test_stream_relays_tool_call_pieces_assembled_by_index(stub, upstream, interleave):
    """Parallel calls streamed in pieces over many events, each split across TCP writes
    and at upstream indexes from 1, arrive as pieces numbered from 0 that assemble, by
    index, into the calls as written; a stream with no text still ends with its final."""
    upstream.script(
        Reply(
            content="",
            finish_reason="tool_calls",
            tool_calls=(WEATHER_CALL, CLOCK_CALL),
            tool_call_pieces=4,
            interleave_tool_calls=interleave,
            tool_call_index_base=1,
            split_events=True,
            chunk_delay_s=0.01,
        )
    )
    events = await _collect(stub, _request(stream=True))
    pieces = [p for e in events for p in e.delta.tool_calls]
    assert len(pieces) > 2, "pieces are relayed as they arrive, not gathered"
    assert {p.index for p in pieces} == {0, 1}
    assert _assembled(events) == [
        ("call_1", "get_weather", WEATHER_CALL.arguments),
        ("call_2", "get-time", CLOCK_CALL.arguments),
    ]
    assert all(e.delta.content == "" for e in events if e.HasField("delta"))
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert final.timings.time_to_first_token_ms > 0
    assert upstream.requests[-1].body["stream"] is True


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_answer_with_tool_calls_finished_stop_is_finished_tool_calls(
    stub, upstream, is_stream
):
    """OpenAI and vLLM finish a call forced by `tool_choice` with "stop" (older Ollama
    streams any call so): an answer that calls tools still says TOOL_CALLS, which an
    agent loop waits for."""
    upstream.script(Reply(content="", finish_reason="stop", tool_calls=(WEATHER_CALL,)))
    choice = pb.ToolChoice(function_name="get_weather")
    if is_stream:
        events = await _collect(stub, _request(stream=True, tool_choice=choice))
        calls, reason = _assembled(events), events[-1].final.finish_reason
    else:
        response = await stub.Complete(_request(tool_choice=choice))
        calls, reason = _calls(response.tool_calls), response.metadata.finish_reason
    assert calls == [("call_1", "get_weather", WEATHER_CALL.arguments)]
    assert reason == pb.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_answer_with_tool_calls_and_an_unknown_finish_reason_is_finished_tool_calls(
    stub, upstream, is_stream
):
    """A finish reason the gateway does not know reaches callers as STOP, but an answer
    that calls tools still says TOOL_CALLS, whatever the upstream said: an agent loop
    would otherwise take the calls for a final answer."""
    upstream.script(
        Reply(content="", finish_reason="function_call_requested", tool_calls=(WEATHER_CALL,))
    )
    if is_stream:
        events = await _collect(stub, _request(stream=True))
        calls, reason = _assembled(events), events[-1].final.finish_reason
    else:
        response = await stub.Complete(_request())
        calls, reason = _calls(response.tool_calls), response.metadata.finish_reason
    assert calls == [("call_1", "get_weather", WEATHER_CALL.arguments)]
    assert reason == pb.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_answer_finished_tool_calls_without_any_call_is_finished_stop(
    stub, upstream, is_stream
):
    """vLLM finishes "tool_calls" when its parser failed to read the model's calls, which
    it leaves as text: the caller gets that text finished STOP, not a tool-call answer
    with no calls (an agent loop would wait for calls that are not there)."""
    upstream.script(Reply(content='<tool_call>{"name": "get_weather"', finish_reason="tool_calls"))
    if is_stream:
        events = await _collect(stub, _request(stream=True))
        text = "".join(e.delta.content for e in events if e.HasField("delta"))
        reason = events[-1].final.finish_reason
    else:
        response = await stub.Complete(_request())
        text, reason = response.content, response.metadata.finish_reason
    assert text.startswith("<tool_call>")
    assert reason == pb.FINISH_REASON_STOP


async def test_stream_of_parallel_calls_all_at_index_0_relays_each_call(stub, upstream):
    """Ollama streams every parallel call at index 0, each with its own id: a new id at an
    index already used is the next call, not a malformed answer (its unary answer is fine)."""
    upstream.script(
        Reply(
            content="",
            finish_reason="tool_calls",
            tool_calls=(WEATHER_CALL, CLOCK_CALL),
            tool_call_indexes=(0, 0),
        )
    )
    events = await _collect(stub, _request(stream=True))
    assert _assembled(events) == [
        ("call_1", "get_weather", WEATHER_CALL.arguments),
        ("call_2", "get-time", CLOCK_CALL.arguments),
    ]
    assert events[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert len(upstream.requests) == 1


async def test_stream_cut_after_a_tool_call_piece_is_not_retried(upstream, start_gateway):
    """A stream cut once a tool-call piece reached the caller is not retried (it would
    repeat the call): STREAM_INTERRUPTED, one upstream request, recorded once as a cut call
    with estimated output."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.script(
        Reply(content="", tool_calls=(WEATHER_CALL,), cut_after_events=3, chunk_delay_s=0.01)
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(_request(stream=True)):
            received.append(event)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "STREAM_INTERRUPTED"
    assert any(e.delta.tool_calls for e in received)
    # Characters of the calls' ids, names and arguments.
    sent = sum(len(p.id + p.name + p.arguments) for e in received for p in e.delta.tool_calls)
    assert sent > len("call_1get_weather")
    assert int(error_info(caught.value).metadata["chars_sent"]) == sent
    assert len(upstream.requests) == 1
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.requests, total.estimated_requests) == (1, 1)
    assert total.usage.output_tokens > 0


async def test_stream_call_named_in_a_later_piece_is_relayed_whole(upstream, start_gateway):
    """A call whose name comes after its id and some arguments is an answer, not a
    malformed one: its first piece out has the id and name, once; the answer is cached
    with the whole call, for a replayed stream and a unary hit alike."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(LATE_NAME_REPLY)
    expected = [("call_1", "get_weather", WEATHER_CALL.arguments)]
    live = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    assert _assembled(live) == expected
    assert len([p for e in live for p in e.delta.tool_calls]) == 2, "later arguments stream"
    assert live[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert not live[-1].final.cache_hit
    replayed = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    assert replayed[-1].final.cache_hit
    assert [(p.index, p.id, p.name, p.arguments) for e in replayed for p in e.delta.tool_calls] == [
        (0, *expected[0])
    ]
    unary = await gateway.stub.Complete(_request(cache=CACHED))
    assert unary.metadata.cache_hit
    assert _calls(unary.tool_calls) == expected
    assert len(upstream.requests) == 1


async def test_coalesced_followers_get_a_call_named_in_a_later_piece(upstream, start_gateway):
    """Callers sharing one upstream stream whose call is named late all get the call:
    streaming followers with its id and name on its first piece, a unary one whole."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(dataclasses.replace(LATE_NAME_REPLY, delay_s=0.3))
    request = _request(stream=True, cache=CACHED)
    leader = asyncio.ensure_future(_collect(gateway.stub, request))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(_collect(gateway.stub, request))
    unary = asyncio.ensure_future(gateway.stub.Complete(_request(cache=CACHED)))
    expected = [("call_1", "get_weather", WEATHER_CALL.arguments)]
    for events in await asyncio.gather(leader, follower):
        assert _assembled(events) == expected
    response = await unary
    assert _calls(response.tool_calls) == expected
    assert response.metadata.cache_hit
    assert len(upstream.requests) == 1


async def test_python_client_assembles_a_call_named_in_a_later_piece(gateway, upstream):
    """`CompletionStream.tool_calls` has the call's id and name when the upstream sent
    them in different pieces."""
    upstream.script(LATE_NAME_REPLY)
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Weather in Paris?", model=FAKE_MODEL, tools=[WEATHER])
        assert [text async for text in stream] == []
    assert _calls(stream.tool_calls) == [("call_1", "get_weather", WEATHER_CALL.arguments)]


async def test_unary_cache_hit_has_the_same_tool_calls(upstream, start_gateway):
    """The same tool-call request twice: the second is a cache hit with identical calls."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(
        Reply(content="", finish_reason="tool_calls", tool_calls=(WEATHER_CALL, CLOCK_CALL))
    )
    first = await gateway.stub.Complete(_request(cache=CACHED))
    second = await gateway.stub.Complete(_request(cache=CACHED))
    assert second.metadata.cache_hit
    assert not first.metadata.cache_hit
    assert (
        _calls(second.tool_calls)
        == _calls(first.tool_calls)
        == [
            ("call_1", "get_weather", WEATHER_CALL.arguments),
            ("call_2", "get-time", CLOCK_CALL.arguments),
        ]
    )
    assert second.metadata.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert len(upstream.requests) == 1


async def test_stream_cache_replay_sends_each_tool_call_whole(upstream, start_gateway):
    """A cached tool-call stream replays its text, then each call as one piece with
    everything."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(
        Reply(
            content="Let me check.",
            finish_reason="tool_calls",
            tool_calls=(WEATHER_CALL, CLOCK_CALL),
            tool_call_pieces=3,
        )
    )
    live = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    replayed = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    assert replayed[-1].final.cache_hit
    assert not live[-1].final.cache_hit
    assert len(upstream.requests) == 1
    pieces = [p for e in replayed for p in e.delta.tool_calls]
    assert [(p.index, p.id, p.name, p.arguments) for p in pieces] == [
        (0, "call_1", "get_weather", WEATHER_CALL.arguments),
        (1, "call_2", "get-time", CLOCK_CALL.arguments),
    ]
    assert _assembled(replayed) == _assembled(live)
    assert "".join(e.delta.content for e in replayed) == "Let me check."


async def test_requests_differing_only_in_tools_or_tool_choice_never_share_an_answer(
    upstream, start_gateway
):
    """Each variant of the tools and the tool choice is its own cache entry."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.default = TOOL_REPLY
    variants = [
        _request(cache=CACHED, tools=[]),
        _request(cache=CACHED),
        _request(cache=CACHED, tools=[WEATHER]),
        _request(cache=CACHED, tools=[WEATHER, pb.Tool(name="get-time", description="Now")]),
        _request(cache=CACHED, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        _request(cache=CACHED, tool_choice=pb.ToolChoice(function_name="get-time")),
    ]
    for request in variants:
        response = await gateway.stub.Complete(request)
        assert not response.metadata.cache_hit
    assert len(upstream.requests) == len(variants)


async def test_coalesced_followers_get_the_tool_calls(upstream, start_gateway):
    """Identical concurrent calls share one upstream stream: streaming followers get the
    pieces live, a unary follower the whole calls, all as cache hits."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(
        Reply(
            content="",
            finish_reason="tool_calls",
            tool_calls=(WEATHER_CALL, CLOCK_CALL),
            delay_s=0.3,
            chunk_delay_s=0.02,
        )
    )
    request = _request(stream=True, cache=CACHED)
    leader = asyncio.ensure_future(_collect(gateway.stub, request))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    followers = [asyncio.ensure_future(_collect(gateway.stub, request)) for _ in range(2)]
    unary = asyncio.ensure_future(gateway.stub.Complete(_request(cache=CACHED)))
    streams = await asyncio.gather(leader, *followers)
    expected = [
        ("call_1", "get_weather", WEATHER_CALL.arguments),
        ("call_2", "get-time", CLOCK_CALL.arguments),
    ]
    for events in streams:
        assert _assembled(events) == expected
        assert events[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [events[-1].final.cache_hit for events in streams] == [False, True, True]
    response = await unary
    assert _calls(response.tool_calls) == expected
    assert response.metadata.cache_hit
    assert len(upstream.requests) == 1


async def test_truncation_drops_a_tool_call_turn_as_one_unit(upstream, start_gateway):
    """KEEP_RECENT never keeps a tool result whose assistant tool call it dropped: the
    assistant message and its results go together."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    huge_arguments = json.dumps({"text": "lorem ipsum dolor sit amet " * 500})
    request = _request(
        pb.Message(role=pb.ROLE_SYSTEM, content="You are terse."),
        pb.Message(role=pb.ROLE_USER, content="Summarise this."),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[pb.ToolCall(id="call_9", name="summarise", arguments=huge_arguments)],
        ),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_9", content="ok"),
        pb.Message(role=pb.ROLE_USER, content="And now?"),
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT),
    )
    response = await gateway.stub.Complete(request)
    assert response.metadata.dropped_messages == 3
    assert upstream.requests[-1].body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "And now?"},
    ]
    assert len(upstream.requests[-1].body["tools"]) == 2  # tools always stay


def _assistant_call(call_id: str = "call_1", name: str = "get_weather") -> pb.Message:
    return pb.Message(
        role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id=call_id, name=name, arguments="{}")]
    )


USER = pb.Message(role=pb.ROLE_USER, content="hi")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": [pb.Tool(name="bad name")]}, "tools[0].name"),
        ({"tools": [pb.Tool(name="")]}, "tools[0].name"),
        ({"tools": [pb.Tool(name="x" * 65)]}, "tools[0].name"),
        ({"tools": [WEATHER, pb.Tool(name="get_weather")]}, "tools[1].name"),
        ({"tools": [pb.Tool(name="t", parameters="[1, 2]")]}, "tools[0].parameters"),
        ({"tools": [pb.Tool(name="t", parameters="{not json")]}, "tools[0].parameters"),
        ({"tools": [pb.Tool(name=f"t{i}") for i in range(129)]}, "tools"),
        ({"tool_choice": pb.ToolChoice(function_name="nope")}, "tool_choice.function_name"),
        (
            {
                "tool_choice": pb.ToolChoice(
                    mode=pb.TOOL_CHOICE_MODE_AUTO, function_name="get_weather"
                )
            },
            "tool_choice.mode",
        ),
        ({"tools": [], "tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)}, "tool_choice"),
        ({"tool_choice": pb.ToolChoice(mode=7)}, "tool_choice.mode"),
        (
            {
                "messages": [
                    USER,
                    pb.Message(
                        role=pb.ROLE_USER, content="x", tool_calls=_assistant_call().tool_calls
                    ),
                ]
            },
            "messages[1].tool_calls",
        ),
        ({"messages": [USER, _assistant_call(call_id="")]}, "messages[1].tool_calls[0].id"),
        ({"messages": [USER, _assistant_call(name="")]}, "messages[1].tool_calls[0].name"),
        ({"messages": [USER, _assistant_call(name="a\nb")]}, "messages[1].tool_calls[0].name"),
        (
            {"messages": [USER, pb.Message(role=pb.ROLE_TOOL, content="r")]},
            "messages[1].tool_call_id",
        ),
        (
            {
                "messages": [
                    USER,
                    _assistant_call(),
                    pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_7", content="r"),
                ]
            },
            "messages[2].tool_call_id",
        ),
        (
            {
                "messages": [
                    pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="r"),
                    _assistant_call(),
                ]
            },
            "messages[0].tool_call_id",
        ),
        (
            {"messages": [pb.Message(role=pb.ROLE_USER, tool_call_id="call_1", content="r")]},
            "messages[0].tool_call_id",
        ),
        ({"messages": [USER, pb.Message(role=pb.ROLE_ASSISTANT)]}, "messages[1].content"),
    ],
    ids=[
        "name-charset",
        "name-empty",
        "name-too-long",
        "name-duplicate",
        "parameters-not-object",
        "parameters-not-json",
        "too-many-tools",
        "choice-undeclared",
        "choice-mode-and-function",
        "choice-without-tools",
        "choice-unknown-mode",
        "tool-calls-not-assistant",
        "tool-call-id-empty",
        "tool-call-name-empty",
        "tool-call-name-control",
        "tool-message-without-id",
        "tool-message-unknown-id",
        "tool-message-before-its-call",
        "tool-call-id-not-tool-role",
        "assistant-without-content-or-calls",
    ],
)
async def test_each_tool_rule_is_a_named_field_violation(stub, upstream, fields, field):
    """Each tool rule gives INVALID_ARGUMENT with a BadRequest naming the field path, and
    nothing reaches the upstream."""
    fields = dict(fields)
    messages = fields.pop("messages", ())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(_request(*messages, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert upstream.requests == []


async def test_a_models_answer_and_a_tools_output_come_back_with_control_characters(stub, upstream):
    """An agent loop sends back what it did not write: a model's answer with a form feed
    (the gateway relayed it so) and a shell tool's output in ANSI colours. Both go on as
    they came; the caller's own text is still held to the rule."""
    upstream.script(Reply(content="Page one\x0cpage two"), Reply(content="Done."))
    question = pb.Message(role=pb.ROLE_USER, content="Run the tests")
    first = await stub.Complete(_request(question))
    assert first.content == "Page one\x0cpage two"
    colours = "\x1b[32m12 passed\x1b[0m in 0.4s"
    final = await stub.Complete(
        _request(
            question,
            pb.Message(role=pb.ROLE_ASSISTANT, content=first.content),
            _assistant_call(),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content=colours),
        )
    )
    assert final.content == "Done."
    sent = upstream.requests[-1].body["messages"]
    assert sent[1]["content"] == "Page one\x0cpage two"
    assert sent[3]["content"] == colours
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(_request(pb.Message(role=pb.ROLE_USER, content=colours)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(upstream.requests) == 2


async def test_an_assistant_tool_call_turn_may_have_no_text(stub, upstream):
    """Empty content is valid on an assistant message with tool calls."""
    await stub.Complete(
        _request(
            USER,
            _assistant_call(),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="r"),
        )
    )
    assert len(upstream.requests) == 1


async def test_a_tool_may_return_no_text(stub, upstream):
    """A tool result may be empty (a function that returns nothing): it is sent as such."""
    await stub.Complete(
        _request(
            USER,
            _assistant_call(),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content=""),
        )
    )
    sent = upstream.requests[-1].body["messages"][-1]
    assert sent == {"role": "tool", "content": "", "tool_call_id": "call_1"}


MALFORMED_TOOL_CALLS = {
    "not-a-list": {"id": "call_1"},
    "no-function": [{"id": "call_1", "type": "function"}],
    "no-name": [{"id": "call_1", "index": 0, "function": {"arguments": "{}"}}],
    "no-id": [{"index": 0, "function": {"name": "get_weather", "arguments": "{}"}}],
    "arguments-object": [{"id": "call_1", "index": 0, "function": {"name": "f", "arguments": {}}}],
    # Past what a caller may send back (256 characters); one of megabytes made a stream's
    # message larger than the 4 MiB a caller's client takes.
    "id-too-long": [{"id": "c" * 257, "index": 0, "function": {"name": "f", "arguments": "{}"}}],
    "name-too-long": [{"id": "call_1", "index": 0, "function": {"name": "f" * 257}}],
    "name-of-megabytes": [{"id": "call_1", "index": 0, "function": {"name": "f" * (5 << 20)}}],
}


@pytest.mark.parametrize("shape", list(MALFORMED_TOOL_CALLS))
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_malformed_tool_calls_fail_as_other_malformed_replies(
    upstream, start_gateway, shape, is_stream
):
    """A malformed tool-call shape is a malformed answer: UNAVAILABLE naming the upstream,
    as a body that is not JSON is, and failed over (here: retried) before any output."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    bad = Reply(content="", finish_reason="tool_calls", raw_tool_calls=MALFORMED_TOOL_CALLS[shape])
    upstream.script(bad, TOOL_REPLY)
    if is_stream:
        events = await _collect(gateway.stub, _request(stream=True))
        assert _assembled(events) == [("call_1", "get_weather", WEATHER_CALL.arguments)]
    else:
        response = await gateway.stub.Complete(_request())
        assert _calls(response.tool_calls) == [("call_1", "get_weather", WEATHER_CALL.arguments)]
    assert len(upstream.requests) == 2
    upstream.script(bad)
    one_try = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    await _fails_as_a_malformed_answer_of_up0(one_try.stub, is_stream=is_stream)


async def _fails_as_a_malformed_answer_of_up0(stub: Any, *, is_stream: bool) -> None:
    """The call (the test's `_request`, streamed or not) fails UNAVAILABLE, as a
    malformed answer of upstream up0."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if is_stream:
            await _collect(stub, _request(stream=True))
        else:
            await stub.Complete(_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed" in caught.value.details()
    assert error_info(caught.value).metadata["upstream"] == "up0"


# The most tool calls one answer may make (the README's bound).
MAX_CALLS = 1024


def _many_calls(count: int) -> list[dict[str, Any]]:
    """`count` tool calls with short names and no arguments, each at an index of its own:
    what a broken upstream can send on and on, within every bound on characters."""
    return [
        {"index": i, "id": f"c{i}", "type": "function", "function": {"name": "f"}}
        for i in range(count)
    ]


def _making_calls(count: int, *, one_event_a_call: bool = False) -> Reply:
    """An answer making `count` such calls; streamed in one event, or one event a call."""
    calls = _many_calls(count)
    if one_event_a_call:
        deltas = tuple([call] for call in calls)
        return Reply(content="", finish_reason="tool_calls", raw_tool_call_deltas=deltas)
    return Reply(content="", finish_reason="tool_calls", raw_tool_calls=calls)


@pytest.mark.parametrize("mode", ["unary", "streamed-unary", "stream"])
async def test_an_answer_making_more_tool_calls_than_the_bound_is_malformed(
    upstream, start_gateway, mode
):
    """1,025 tool calls in one answer (a JSON body, a stream read whole for a unary call,
    or one stream event) are a malformed answer: retried before any output, not cached,
    charged as a lost attempt (a JSON body's with the usage it reported, as the provider
    bills it); 1,024 are an answer. Before, any number was held and relayed."""
    data = gateway_config_data(upstream.base_url, cache={"backend": "memory"})
    data["upstreams"][0]["stream_unary_calls"] = mode == "streamed-unary"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    upstream.script(_making_calls(MAX_CALLS + 1), _making_calls(MAX_CALLS))
    if mode == "stream":
        events = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
        calls, metadata = _assembled(events), events[-1].final
    else:
        response = await gateway.stub.Complete(_request(cache=CACHED))
        calls, metadata = _calls(response.tool_calls), response.metadata
    assert len(calls) == MAX_CALLS
    assert metadata.attempts == 2
    assert len(upstream.requests) == 2
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    if mode == "unary":  # the lost attempt's usage too, as its body reported it
        assert (total.requests, total.estimated_requests) == (1, 0)
        assert total.usage.output_tokens == 3 + 3
    else:  # the lost attempt's prompt, estimated: its stream reported no usage
        assert (total.requests, total.estimated_requests) == (1, 1)
        assert total.usage.output_tokens == 3  # the answer's, as reported
    data["resilience"] = {"attempts": 1}
    one_try = await start_gateway(parse_config(data, source="<test>", environ={}))
    for _ in range(2):  # never cached: each call asks the upstream
        upstream.script(_making_calls(MAX_CALLS + 1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if mode == "stream":
                await _collect(one_try.stub, _request(stream=True, cache=CACHED))
            else:
                await one_try.stub.Complete(_request(cache=CACHED))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "malformed answer: the answer makes more than 1024 tool calls" in (
            caught.value.details() or ""
        )
        assert error_info(caught.value).metadata["upstream"] == "up0"
    assert len(upstream.requests) == 4


async def test_a_stream_opening_more_tool_calls_than_the_bound_is_cut_and_charged_for_them(
    upstream, start_gateway
):
    """A stream that opens a new call in each event is cut at the 1,025th: the caller has
    the 1,024 relayed, then STREAM_INTERRUPTED naming the bound; the cut stream is charged
    for the calls relayed and never cached. Before, it went on without limit."""
    # A window past the estimate of what was relayed, which caps it.
    models = fake_model_window(100_000)
    config = gateway_config(
        upstream.base_url, cache={"backend": "memory"}, models=models, **ONE_ATTEMPT
    )
    gateway = await start_gateway(config)
    upstream.script(_making_calls(MAX_CALLS + 1, one_event_a_call=True))
    received: list[pb.CompleteStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(_request(stream=True, cache=CACHED)):
            received.append(event)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the answer makes more than 1024 tool calls" in (caught.value.details() or "")
    info = error_info(caught.value)
    assert info.reason == "STREAM_INTERRUPTED"
    relayed = _assembled(received)
    assert relayed == [(f"c{i}", "f", "") for i in range(MAX_CALLS)]
    assert int(info.metadata["chars_sent"]) == sum(len(i) + len(n) for i, n, _ in relayed)
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.requests, total.estimated_requests) == (1, 1)
    assert total.usage.output_tokens == estimate_output_tokens(
        "", [ToolCall(*call) for call in relayed]
    )
    upstream.script(_making_calls(1))
    again = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    assert _assembled(again) == [("c0", "f", "")]
    assert len(upstream.requests) == 2


# Ids and names a broken upstream may send, which would reach the caller, its logs and
# the cache, and which the caller may not send back: control characters (C0, DEL, C1),
# format characters, lone UTF-16 halves (JSON escapes them as `\ud800`; protobuf cannot
# encode one).
UNPRINTABLE_CALLS = {
    "nul-in-id": ("call_\x00", "get_weather"),
    "c1-in-id": ("call_\x85", "get_weather"),
    "lone-surrogate-in-id": ("call_\ud800", "get_weather"),
    "line-break-in-name": ("call_1", "get_weather\nrm"),
    "escape-in-name": ("call_1", "get_weather\x1b[31m"),
    "del-in-name": ("call_1", "get_weather\x7f"),
    "zero-width-space-in-name": ("call_1", "get\u200bweather"),
    "lone-surrogate-in-name": ("call_1", "get_\udc00weather"),
}


@pytest.mark.parametrize("shape", list(UNPRINTABLE_CALLS))
@pytest.mark.parametrize("mode", ["unary", "streamed-unary", "stream"])
async def test_a_tool_calls_id_or_name_that_is_not_printable_is_malformed(
    upstream, start_gateway, mode, shape
):
    """A tool call whose id or function name is not printable (a control or format
    character, a lone UTF-16 half) is a malformed answer: UNAVAILABLE naming the upstream,
    never cached (the same call asks again), charged as a lost attempt: with no output,
    or with the usage a JSON body reported (as the provider bills it). Before, it was
    relayed, cached and billed (a lone half as U+FFFD, an id the upstream never sent),
    and the caller's next turn, sending it back, was refused."""
    call_id, name = UNPRINTABLE_CALLS[shape]
    what = "id" if shape.endswith("-id") else "function name"
    data = gateway_config_data(upstream.base_url, cache={"backend": "memory"}, **ONE_ATTEMPT)
    data["upstreams"][0]["stream_unary_calls"] = mode == "streamed-unary"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    bad = [{"index": 0, "id": call_id, "type": "function", "function": {"name": name}}]
    for _ in range(2):
        upstream.script(Reply(content="", finish_reason="tool_calls", raw_tool_calls=bad))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if mode == "stream":
                await _collect(gateway.stub, _request(stream=True, cache=CACHED))
            else:
                await gateway.stub.Complete(_request(cache=CACHED))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == (
            f"upstream 'up0' sent a malformed answer: a tool call's {what} has a character "
            "that is not printable (a control or format character, or a lone UTF-16 surrogate)"
        )
        assert error_info(caught.value).metadata["upstream"] == "up0"
    assert len(upstream.requests) == 2
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    if mode == "unary":  # as each body reported it
        assert (total.requests, total.estimated_requests) == (0, 0)
        assert (total.usage.input_tokens, total.usage.output_tokens) == (2 * 7, 2 * 3)
    else:
        assert (total.requests, total.estimated_requests) == (0, 2)
        assert total.usage.output_tokens == 0


# Names outside OpenAI's rule for declared tools, with dots, letters of other scripts, a
# space or an emoji (a pair of UTF-16 halves in JSON): an upstream's, and printable.
SLOPPY_NAMES = ("python.run", "météo_du_jour", "天気", "get weather", "f\U0001f600")


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_sloppy_but_printable_tool_names_are_relayed_and_only_a_control_character_refused(
    upstream, start_gateway, is_stream
):
    """Calls with sloppy names, and ids in other scripts, are an upstream's answer:
    relayed as written. The same answer with a tab in one name is malformed."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    calls = [(f"call_é{i}", name, "") for i, name in enumerate(SLOPPY_NAMES)]
    for names in (SLOPPY_NAMES, (*SLOPPY_NAMES[:-1], SLOPPY_NAMES[-1] + "\t")):
        raw = [
            {"index": i, "id": f"call_é{i}", "type": "function", "function": {"name": name}}
            for i, name in enumerate(names)
        ]
        upstream.script(Reply(content="", finish_reason="tool_calls", raw_tool_calls=raw))
        if names is not SLOPPY_NAMES:
            await _fails_as_a_malformed_answer_of_up0(gateway.stub, is_stream=is_stream)
        elif is_stream:
            assert _assembled(await _collect(gateway.stub, _request(stream=True))) == calls
        else:
            assert _calls((await gateway.stub.Complete(_request())).tool_calls) == calls


async def test_batch_item_with_tools_carries_its_tool_calls(stub, upstream):
    """A CompleteBatch item sends its tools and its result carries the tool calls."""
    upstream.script(TOOL_REPLY)
    batch = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(
                id="a",
                request=_request(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
            )
        ]
    )
    events = [event async for event in stub.CompleteBatch(batch)]
    results = [e.result for e in events if e.HasField("result")]
    assert _calls(results[0].response.tool_calls) == [
        ("call_1", "get_weather", WEATHER_CALL.arguments)
    ]
    body = upstream.requests[-1].body
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get-time"]
    assert body["tool_choice"] == "required"


async def test_python_client_sends_tools_and_assembles_streamed_calls(gateway, upstream):
    """`GatewayClient` sends tools and tool turns, and a stream's `tool_calls` holds the
    calls assembled from their pieces."""
    upstream.script(TOOL_REPLY, Reply(content="Sunny."))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream(
            "Weather in Paris?",
            model=FAKE_MODEL,
            tools=[WEATHER],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        )
        assert [text async for text in stream] == []
        assert _calls(stream.tool_calls) == [("call_1", "get_weather", WEATHER_CALL.arguments)]
        answer = await client.complete(
            [
                ("user", "Weather in Paris?"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=stream.tool_calls),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="21 C"),
            ],
            model=FAKE_MODEL,
            tools=[WEATHER],
        )
    assert answer.content == "Sunny."
    assert upstream.requests[0].body["tool_choice"] == "required"
    assert upstream.requests[1].body["messages"][2] == {
        "role": "tool",
        "content": "21 C",
        "tool_call_id": "call_1",
    }


async def test_python_client_tool_calls_taken_before_the_loop_are_whole_after_it(gateway, upstream):
    """`CompletionStream.tool_calls` read before the stream is read is the list the calls
    are assembled in: once the stream has ended, each holds all its arguments.

    Before, the pieces were joined only as `tool_calls` was read again: a list (or a call)
    kept from earlier had its arguments empty, or cut where it was last read."""
    upstream.script(TOOL_REPLY)
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Weather in Paris?", model=FAKE_MODEL, tools=[WEATHER])
        calls = stream.tool_calls
        assert [text async for text in stream] == []
    assert _calls(calls) == [("call_1", "get_weather", WEATHER_CALL.arguments)]


# -- upstreams that take no tools (`takes_tools: false`) ------------------------------

TOOL_RESULT_TURNS = (
    pb.Message(role=pb.ROLE_USER, content="Weather in Paris?"),
    pb.Message(
        role=pb.ROLE_ASSISTANT,
        tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
    ),
    pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content='{"temp_c": 21}'),
)


def _toolless_first(*base_urls: str) -> Any:
    """A config whose first upstream (up0) takes no tools, the others (up1, ...) do."""
    data = gateway_config_data(*base_urls)
    data["upstreams"][0]["takes_tools"] = False
    return parse_config(data, source="<test>", environ={})


@pytest.fixture
async def second_upstream() -> Any:
    """Another fake upstream serving the fake model."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        yield fake


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_call_using_tools_goes_only_to_an_upstream_that_takes_them(
    upstream, second_upstream, start_gateway, is_stream
):
    """Declared tools, or tool calls and results sent back without tools, reach only the
    upstream that takes tools, call after call; the one that takes none gets nothing."""
    gateway = await start_gateway(_toolless_first(upstream.base_url, second_upstream.base_url))
    requests = [
        _request(stream=is_stream),
        _request(stream=is_stream),
        _request(*TOOL_RESULT_TURNS, stream=is_stream, tools=[]),
    ]
    for request in requests:
        if is_stream:
            events = await _collect(gateway.stub, request)
            assert events[-1].final.upstream == "up1"
        else:
            assert (await gateway.stub.Complete(request)).metadata.upstream == "up1"
    assert upstream.requests == []
    assert len(second_upstream.requests) == 3
    assert "tools" in second_upstream.requests[0].body
    assert second_upstream.requests[2].body["messages"][2]["role"] == "tool"


async def test_a_call_without_tools_still_goes_to_either_upstream(
    upstream, second_upstream, start_gateway
):
    """Calls without tools take turns between both upstreams, as before, the one that
    takes no tools included, and a call with tools between them leaves that one's turn."""
    gateway = await start_gateway(_toolless_first(upstream.base_url, second_upstream.base_url))
    served = [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(2)]
    await gateway.stub.Complete(_request())
    served += [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(2)]
    assert sorted(served) == ["up0", "up0", "up1", "up1"]
    assert len(upstream.requests) == 2
    assert all("tools" not in r.body for r in upstream.requests)


async def test_a_call_failing_on_the_upstream_with_tools_names_the_one_without(
    upstream, second_upstream, start_gateway
):
    """When the only upstream taking tools fails, the call is UNAVAILABLE from it (not
    sent to the other), and the message says why the other was left out."""
    data = gateway_config_data(upstream.base_url, second_upstream.base_url, **ONE_ATTEMPT)
    data["upstreams"][0]["takes_tools"] = False
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    second_upstream.script(Status(500))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).metadata["upstream"] == "up1"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request(), "tools"),
        (_request(stream=True), "tools"),
        # No tools declared: a tool call and its result sent back use them all the same.
        (_request(*TOOL_RESULT_TURNS, tools=[]), "messages[1].tool_calls"),
    ],
    ids=["tools", "stream", "tool-result"],
)
async def test_a_model_whose_upstreams_take_no_tools_refuses_a_call_using_them(
    upstream, start_gateway, request_, field
):
    """INVALID_ARGUMENT, a BadRequest on the first field using tools naming the model, an
    ErrorInfo TOOLS_UNSUPPORTED; never UNAVAILABLE, and the upstream is sent nothing."""
    gateway = await start_gateway(_toolless_first(upstream.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(request_, pb.CompleteStreamRequest):
            await _collect(gateway.stub, request_)
        else:
            await gateway.stub.Complete(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no tools" in caught.value.details()
    violations = field_violations(caught.value)
    assert list(violations) == [field]
    assert f"model {FAKE_MODEL!r} takes no tools" in violations[field]
    info = error_info(caught.value)
    assert (info.reason, dict(info.metadata)) == ("TOOLS_UNSUPPORTED", {"model": FAKE_MODEL})
    assert upstream.requests == []
    # The same model answers a call without tools.
    assert (await gateway.stub.Complete(chat())).metadata.upstream == "up0"


async def test_a_batch_item_using_tools_fails_alone_on_a_model_taking_none(upstream, start_gateway):
    """The item with tools fails with the same error; the item without them is answered."""
    gateway = await start_gateway(_toolless_first(upstream.base_url))
    batch = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(id="tools", request=_request()),
            pb.BatchItem(id="plain", request=chat()),
        ]
    )
    events = [event async for event in gateway.stub.CompleteBatch(batch)]
    by_id = {e.result.id: e.result for e in events if e.HasField("result")}
    refused = by_id["tools"].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "takes no tools" in refused.message
    assert by_id["plain"].HasField("response")
    assert len(upstream.requests) == 1
    assert "tools" not in upstream.requests[0].body


async def test_a_call_whose_tools_upstream_is_cooling_down_names_both_reasons(
    upstream, second_upstream, start_gateway
):
    """With the only upstream taking tools behind an open breaker, a tools call is
    UNAVAILABLE naming it and why, beside the one that takes none; RetryInfo is that
    breaker's cool-down, and neither upstream is sent the call."""
    resilience = {"attempts": 1, "breaker_consecutive_failures": 1, "breaker_cool_down_s": 30}
    data = gateway_config_data(upstream.base_url, second_upstream.base_url, resilience=resilience)
    data["upstreams"][0]["takes_tools"] = False
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    second_upstream.script(Status(500))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(_request())
    sent = len(second_upstream.requests)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "up0 (takes no tools)" in caught.value.details()
    assert "up1 (circuit open for this model)" in caught.value.details()
    assert error_info(caught.value).metadata["upstream"] == "up1"
    assert 20 < retry_delay_s(caught.value) <= 30
    assert (upstream.requests, len(second_upstream.requests)) == ([], sent)


# OpenAI's legacy functions API, which some servers and proxies still answer in: one call
# as the message's `function_call`, with no id, finished "function_call".
LEGACY_CALL = {"name": "get_weather", "arguments": WEATHER_CALL.arguments}
LEGACY_REPLY = Reply(
    finish_reason="function_call",
    raw_message={"role": "assistant", "content": None, "function_call": LEGACY_CALL},
    raw_deltas=(
        {"content": None, "function_call": {"name": "get_weather", "arguments": ""}},
        {"function_call": {"arguments": '{"city": "Paris",'}},
        {"function_call": {"arguments": '  "days": 3}'}},
    ),
    chunk_delay_s=0.01,
)


def _legacy_call(calls: Any) -> str:
    """The id of the one call relayed for a legacy function call, checked to be it."""
    ((call_id, name, arguments),) = calls
    assert (name, arguments) == ("get_weather", WEATHER_CALL.arguments)
    assert (call_id[:5], len(call_id)) == ("call_", 29), call_id
    return str(call_id)


async def test_a_legacy_function_call_is_one_tool_call_with_an_id(stub, upstream):
    """A `function_call` answer comes back as one tool call, finished TOOL_CALLS, with an id
    the gateway gave it, which the next turn sends back as any call's.

    Before, it came back as an empty STOP answer: the call was dropped."""
    upstream.script(LEGACY_REPLY, Reply(content="Sunny."))
    question = pb.Message(role=pb.ROLE_USER, content="Weather in Paris?")
    first = await stub.Complete(_request(question))
    call_id = _legacy_call(_calls(first.tool_calls))
    assert first.metadata.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    turn = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=first.tool_calls)
    result = pb.Message(role=pb.ROLE_TOOL, tool_call_id=call_id, content='{"temp_c": 21}')
    second = await stub.Complete(_request(question, turn, result))
    assert second.content == "Sunny."
    sent = upstream.requests[-1].body["messages"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == [call_id]
    assert sent[2]["tool_call_id"] == call_id


async def test_a_streamed_legacy_function_call_is_relayed_as_tool_call_pieces(stub, upstream):
    """`delta.function_call` pieces go out as one call's pieces, its first with the index 0,
    an id and the name, the rest its arguments; the stream finishes TOOL_CALLS."""
    upstream.script(LEGACY_REPLY)
    events = await _collect(stub, _request(stream=True))
    _legacy_call(_assembled(events))
    assert len([e for e in events if e.delta.tool_calls]) > 1, "relayed in pieces"
    assert events[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_legacy_function_call_counts_in_the_output_estimate(stub, upstream, is_stream):
    """With no usage reported, the output estimate counts the call, as it counts tool calls.

    Before, the answer had 0 output tokens."""
    upstream.script(dataclasses.replace(LEGACY_REPLY, include_usage=False))
    if is_stream:
        events = await _collect(stub, _request(stream=True))
        calls, usage = _assembled(events), events[-1].final.usage
    else:
        response = await stub.Complete(_request())
        calls, usage = _calls(response.tool_calls), response.metadata.usage
    call_id = _legacy_call(calls)
    assert usage.estimated
    assert usage.output_tokens == estimate_output_tokens(
        "", [ToolCall(call_id, "get_weather", WEATHER_CALL.arguments)]
    )


async def test_a_cached_legacy_function_call_keeps_its_id(upstream, start_gateway):
    """A cache hit, unary or replayed as a stream, has the call with the id it first got."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(LEGACY_REPLY)
    first = await gateway.stub.Complete(_request(cache=CACHED))
    hit = await gateway.stub.Complete(_request(cache=CACHED))
    replayed = await _collect(gateway.stub, _request(stream=True, cache=CACHED))
    assert (first.metadata.cache_hit, hit.metadata.cache_hit) == (False, True)
    assert replayed[-1].final.cache_hit
    call_id = _legacy_call(_calls(first.tool_calls))
    assert _calls(hit.tool_calls) == _assembled(replayed) == _calls(first.tool_calls)
    assert hit.tool_calls[0].id == call_id
    assert len(upstream.requests) == 1


async def test_followers_of_a_legacy_function_call_get_the_same_call(upstream, start_gateway):
    """Identical concurrent calls sharing one upstream stream get one call, with one id."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    upstream.script(dataclasses.replace(LEGACY_REPLY, delay_s=0.3))
    request = _request(stream=True, cache=CACHED)
    leader = asyncio.ensure_future(_collect(gateway.stub, request))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(_collect(gateway.stub, request))
    unary = asyncio.ensure_future(gateway.stub.Complete(_request(cache=CACHED)))
    streams = await asyncio.gather(leader, follower)
    call_id = _legacy_call(_assembled(streams[0]))
    assert _assembled(streams[1]) == _assembled(streams[0])
    response = await unary
    assert response.metadata.cache_hit
    assert response.tool_calls[0].id == call_id
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_function_call_beside_tool_calls_is_not_a_second_call(stub, upstream, is_stream):
    """A proxy that repeats the first tool call as `function_call` has one call relayed,
    the tool call with its own id."""
    call = {
        "id": "call_1",
        "index": 0,
        "type": "function",
        "function": {"name": "get_weather", "arguments": WEATHER_CALL.arguments},
    }
    both = {"content": None, "tool_calls": [call], "function_call": LEGACY_CALL}
    upstream.script(
        Reply(
            finish_reason="tool_calls",
            raw_message={"role": "assistant", **both},
            raw_deltas=(both,),
        )
    )
    if is_stream:
        calls = _assembled(await _collect(stub, _request(stream=True)))
    else:
        calls = _calls((await stub.Complete(_request())).tool_calls)
    assert calls == [("call_1", "get_weather", WEATHER_CALL.arguments)]


MALFORMED_FUNCTION_CALLS = {
    "not-an-object": "get_weather",
    "no-name": {"arguments": "{}"},
    "arguments-object": {"name": "get_weather", "arguments": {}},
    "name-too-long": {"name": "f" * 257, "arguments": "{}"},
    "escape-in-name": {"name": "get_weather\x1b[2J", "arguments": "{}"},
    "lone-surrogate-in-name": {"name": "get_weather\ud800", "arguments": "{}"},
}


@pytest.mark.parametrize("shape", list(MALFORMED_FUNCTION_CALLS))
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_malformed_function_call_fails_as_other_malformed_replies(
    upstream, start_gateway, shape, is_stream
):
    """A `function_call` that is not an object, has no name or arguments that are not a
    string is a malformed answer: UNAVAILABLE naming the upstream in the end."""
    bad_call = MALFORMED_FUNCTION_CALLS[shape]
    upstream.script(
        Reply(
            finish_reason="function_call",
            raw_message={"role": "assistant", "content": None, "function_call": bad_call},
            raw_deltas=({"function_call": bad_call},),
        )
    )
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    await _fails_as_a_malformed_answer_of_up0(gateway.stub, is_stream=is_stream)


# OpenAI's refusal of `parallel_tool_calls` in a request that declares no tools.
PARALLEL_WITHOUT_TOOLS = (
    '{"error": {"message": "Invalid value for \'parallel_tool_calls\': \'parallel_tool_calls\' '
    'is only allowed when \'tools\' are specified.", "type": "invalid_request_error", '
    '"param": "parallel_tool_calls", "code": null}}'
)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_parallel_tool_calls_of_extra_body_goes_only_with_tools(start_gateway, is_stream):
    """An upstream whose `extra_body` turns parallel tool calls off gets the switch with
    the calls that declare tools, and not with the others, which OpenAI refuses with it.
    Before, every call without tools (and every Summarize part) to such an upstream
    failed INVALID_ARGUMENT."""

    def respond(body: dict[str, Any]) -> Status | None:
        if "parallel_tool_calls" in body and "tools" not in body:
            return Status(400, body=PARALLEL_WITHOUT_TOOLS)
        return None

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        data = gateway_config_data(fake.base_url, **ONE_ATTEMPT)
        data["upstreams"][0]["extra_body"] = {"parallel_tool_calls": False, "user": "gw"}
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        for request in (chat("Say hi"), chat("Weather?", tools=[WEATHER])):
            if is_stream:
                # The same fields under the same numbers.
                stream = pb.CompleteStreamRequest.FromString(request.SerializeToString())
                await _collect(gateway.stub, stream)
            else:
                await gateway.stub.Complete(request)
        plain, with_tools = (r.body for r in fake.requests)
    assert (plain.get("parallel_tool_calls"), plain["user"]) == (None, "gw")
    assert (with_tools["parallel_tool_calls"], with_tools["user"]) == (False, "gw")
