"""Tool calling's pure parts: the OpenAI JSON both ways, assembly, keys, entries, estimates."""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest

from service.cache.entry import CachedAnswer, EntryDecodeError
from service.cache.keys import canonical_request
from service.context_window import fit_messages
from service.domain import (
    ChatRequest,
    Completion,
    Delta,
    FinishReason,
    Message,
    Role,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    TruncationMode,
    Usage,
    assemble_tool_calls,
)
from service.errors import ContextWindowExceeded
from service.tokens import estimate_output_tokens, estimate_prompt_tokens
from service.upstream.openai_json import (
    MalformedReply,
    StreamParser,
    is_json_or_cut,
    parse_completion,
    request_body,
)

CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
BASE = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))


def _event(tool_calls: object) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": tool_calls}}]})


def test_stream_pieces_are_numbered_by_first_appearance_with_id_and_name_once() -> None:
    """Upstream indexes 5 and 2 become 0 and 1; a repeated id and name are sent once."""
    parser = StreamParser()
    first = parser.parse(
        _event([{"index": 5, "id": "a", "function": {"name": "f", "arguments": '{"x'}}])
    )
    second = parser.parse(_event([{"index": 2, "id": "b", "function": {"name": "g"}}]))
    third = parser.parse(
        _event([{"index": 5, "id": "a", "function": {"name": "f", "arguments": '": 1}'}}])
    )
    pieces = [p for chunk in (first, second, third) if chunk for p in chunk.tool_calls]
    assert pieces == [
        ToolCallDelta(0, "a", "f", '{"x'),
        ToolCallDelta(1, "b", "g", ""),
        ToolCallDelta(0, arguments='": 1}'),
    ]
    assert assemble_tool_calls(pieces) == (ToolCall("a", "f", '{"x": 1}'), ToolCall("b", "g", ""))


@pytest.mark.parametrize(
    "tool_calls",
    [
        {"index": 0},
        ["x"],
        [{"index": -1, "id": "a", "function": {"name": "f"}}],
        [{"index": 0, "id": "a", "function": {"name": "f", "arguments": {}}}],
        [{"index": 0, "id": "a", "function": "f"}],
    ],
    ids=["not-list", "not-object", "negative-index", "arguments-object", "function-string"],
)
def test_malformed_stream_pieces_are_malformed_replies(tool_calls: object) -> None:
    """A tool-call piece that cannot be assembled is a malformed reply."""
    with pytest.raises(MalformedReply):
        StreamParser().parse(_event(tool_calls))


def _finished(parser: StreamParser, *events: object) -> list[ToolCallDelta]:
    """The pieces of `events` (each a delta's tool calls), then a finish event; `end()`
    is called, so a call left without its id or name raises."""
    chunks = [parser.parse(_event(tool_calls)) for tool_calls in events]
    parser.parse(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    end = parser.end()
    assert end.finish_reason is FinishReason.TOOL_CALLS
    return [p for chunk in chunks if chunk for p in chunk.tool_calls]


@pytest.mark.parametrize(
    "events",
    [
        # vmlx: the id and type first, then the name, then the arguments.
        [
            [{"index": 0, "id": "a", "type": "function"}],
            [{"index": 0, "function": {"name": "f"}}],
            [{"index": 0, "function": {"arguments": '{"x": 1}'}}],
        ],
        # Arguments before the name, the name repeated after.
        [
            [{"index": 0, "id": "a", "function": {"arguments": '{"x'}}],
            [{"index": 0, "function": {"name": "f", "arguments": '": 1'}}],
            [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "}"}}],
        ],
        # The name first and the id later, without an index (Gemini sends none).
        [
            [{"function": {"name": "f", "arguments": ""}}],
            [{"id": "a", "function": {"arguments": '{"x": 1}'}}],
        ],
    ],
    ids=["id-then-name", "arguments-before-name", "id-after-name"],
)
def test_a_calls_id_and_name_may_come_in_later_pieces(events: list[object]) -> None:
    """A call's first piece out has its id and name, with the arguments held until they
    came; later arguments follow as pieces of their own."""
    pieces = _finished(StreamParser(), *events)
    assert pieces[0].id == "a"
    assert pieces[0].name == "f"
    assert all((p.index, p.id, p.name) == (0, "", "") for p in pieces[1:])
    assert assemble_tool_calls(pieces) == (ToolCall("a", "f", '{"x": 1}'),)


def test_calls_are_numbered_in_the_order_they_began() -> None:
    """A call named after a later one began is numbered after it, so that the pieces'
    indexes go up from 0 as they arrive."""
    pieces = _finished(
        StreamParser(),
        [{"index": 0, "id": "a", "function": {"arguments": "{}"}}],
        [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "[]"}}],
        [{"index": 0, "function": {"name": "f"}}],
    )
    assert pieces == [ToolCallDelta(0, "b", "g", "[]"), ToolCallDelta(1, "a", "f", "{}")]


@pytest.mark.parametrize(
    "events",
    [
        [[{"index": 0, "id": "a", "function": {"arguments": "{}"}}]],
        [[{"index": 0, "function": {"name": "f", "arguments": "{}"}}]],
        [[{"function": {"arguments": "{}"}}]],
        [
            [{"index": 0, "id": "a", "function": {"name": "f"}}],
            [{"index": 1, "id": "b", "function": {"arguments": "{}"}}],
        ],
    ],
    ids=["no-name", "no-id", "no-index-no-call", "second-call-no-name"],
)
def test_a_call_that_never_gets_its_id_or_name_is_malformed(events: list[object]) -> None:
    """By the end of the stream every call has an id and a name, as a unary answer's."""
    with pytest.raises(MalformedReply):
        _finished(StreamParser(), *events)


def test_pieces_without_an_index_are_calls_in_turn() -> None:
    """Gemini sends each call whole and without an index: each new id is the next call,
    and a piece without an id continues the call before it."""
    parser = StreamParser()
    first = parser.parse(_event([{"id": "a", "function": {"name": "f", "arguments": "{}"}}]))
    second = parser.parse(
        _event(
            [
                {"id": "b", "function": {"name": "g", "arguments": '{"x":'}},
                {"function": {"arguments": " 1}"}},
            ]
        )
    )
    assert first is not None
    assert second is not None
    pieces = (*first.tool_calls, *second.tool_calls)
    assert assemble_tool_calls(pieces) == (ToolCall("a", "f", "{}"), ToolCall("b", "g", '{"x": 1}'))


def test_arguments_held_for_a_nameless_call_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arguments waiting for their call's name are held only up to a bound: a broken
    upstream cannot make the gateway hold a stream's worth."""
    monkeypatch.setattr("service.upstream.openai_json._MAX_HELD_CHARS", 8)
    parser = StreamParser()
    parser.parse(_event([{"index": 0, "id": "a", "function": {"arguments": "1234"}}]))
    with pytest.raises(MalformedReply):
        parser.parse(_event([{"index": 0, "function": {"arguments": "56789"}}]))


# Calls with short names and no arguments, by the upstream's index (`MAX_TOOL_CALLS_PER_MESSAGE`).
OPENED_CALLS = {
    "new-index": lambda i: {"index": i, "id": f"c{i}", "function": {"name": "f"}},
    "index-0": lambda i: {"index": 0, "id": f"c{i}", "function": {"name": "f"}},  # Ollama
    "never-named": lambda i: {"index": i, "id": f"c{i}"},
}


@pytest.mark.parametrize("shape", list(OPENED_CALLS))
def test_a_stream_opening_more_calls_than_the_bound_is_malformed(shape: str) -> None:
    """The 1,025th call a stream opens, begun or not, is malformed: each is held to the
    stream's end, and none counts against the bound on characters."""
    parser = StreamParser()
    opened = OPENED_CALLS[shape]
    for index in range(1024):
        parser.parse(_event([opened(index)]))
    with pytest.raises(MalformedReply, match="more than 1024 tool calls"):
        parser.parse(_event([opened(1024)]))


def test_a_unary_answer_making_more_calls_than_the_bound_is_malformed() -> None:
    """1,024 calls are an answer; 1,025 a malformed one."""
    calls = [{"id": f"c{i}", "function": {"name": "f"}} for i in range(1025)]

    def answer(calls: list[dict[str, object]]) -> bytes:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return orjson.dumps({"choices": [{"message": message, "finish_reason": "tool_calls"}]})

    assert len(parse_completion(answer(calls[:1024])).tool_calls) == 1024
    with pytest.raises(MalformedReply, match="more than 1024 tool calls"):
        parse_completion(answer(calls))


def _answer(*, call_id: str, name: str, arguments: str = "", completion_id: str = "c1") -> bytes:
    """A unary answer making one call, JSON-escaped as Python's json writes it."""
    call = {"id": call_id, "function": {"name": name, "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    choice = {"message": message, "finish_reason": "tool_calls"}
    return json.dumps({"id": completion_id, "choices": [choice]}).encode()


# Printable, though outside OpenAI's rule for declared tools: dots, other scripts, an emoji.
SLOPPY_NAME = "python.run_météo-天気\U0001f600\ufffd"


@pytest.mark.parametrize(
    "char", ["\x00", "\t", "\n", "\x1f", "\x7f", "\x85", "\x9f", "\u200b", "\u202e", "\ud800"]
)
@pytest.mark.parametrize("field", ["id", "name"])
def test_a_call_id_or_name_that_is_not_printable_is_malformed(char: str, field: str) -> None:
    """C0, DEL and C1 control characters, format characters (a zero-width space, a
    direction override) and lone UTF-16 halves in a call's id or name are malformed, as a
    caller may not send them back, in a unary answer and a stream alike; the printable
    rest is taken."""
    call = ToolCall("call_é1", SLOPPY_NAME, "")
    assert parse_completion(_answer(call_id=call.id, name=call.name)).tool_calls == (call,)
    call_id, name = (call.id + char, call.name) if field == "id" else (call.id, call.name + char)
    with pytest.raises(MalformedReply, match="not printable"):
        parse_completion(_answer(call_id=call_id, name=name))
    piece = {"index": 0, "id": call_id, "function": {"name": name}}
    with pytest.raises(MalformedReply, match="not printable"):
        StreamParser().parse(_event([piece]))


def test_a_lone_half_is_refused_only_in_a_calls_id_or_name() -> None:
    """The completion's own id, and a call's arguments, have a lone half made U+FFFD, as
    before; only a call's id and name keep it, to be refused."""
    reply = parse_completion(
        _answer(call_id="call_1", name="f", arguments="\udc00", completion_id="c\ud800")
    )
    assert (reply.id, reply.tool_calls) == ("c\ufffd", (ToolCall("call_1", "f", "\ufffd"),))
    with pytest.raises(MalformedReply):
        parse_completion(_answer(call_id="call_\ud800", name="f", completion_id="c\ud800"))


def test_json_with_an_escaped_lone_half_is_json() -> None:
    """A body orjson refuses for a lone half (which JSON allows) is JSON, or JSON cut
    short, and so a provider's answer (billed), not some other server's page."""
    body = _answer(call_id="call_\ud800", name="f")
    assert is_json_or_cut(body)
    assert is_json_or_cut(body[:-3])
    assert not is_json_or_cut(b"<html>\\ud800</html>")


def test_arguments_held_for_nameless_calls_are_bounded_all_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound counts the arguments held for every call not yet named, at whatever
    index: calls at many indexes, each within it, made the gateway hold as many times as
    much. What a call's first piece sent on is held no more."""
    monkeypatch.setattr("service.upstream.openai_json._MAX_HELD_CHARS", 8)
    parser = StreamParser()
    parser.parse(_event([{"index": 0, "function": {"arguments": "1234"}}]))
    parser.parse(_event([{"index": 0, "id": "a", "function": {"name": "f"}}]))
    parser.parse(_event([{"index": 1, "function": {"arguments": "56789"}}]))
    with pytest.raises(MalformedReply):
        parser.parse(_event([{"index": 2, "function": {"arguments": "0000"}}]))


def test_a_piece_changing_its_calls_id_is_malformed() -> None:
    """A new id at a known index begins the next call (Ollama's parallel calls), which
    needs its name: a piece that only changes the id is refused, never merged."""
    with pytest.raises(MalformedReply):
        _finished(
            StreamParser(),
            [{"index": 0, "id": "a", "function": {"name": "f"}}],
            [{"index": 0, "id": "b", "function": {"arguments": "{}"}}],
        )


def test_a_call_whose_index_is_taken_before_it_is_named_is_malformed() -> None:
    """A call still waiting for its name when a new id takes its index can never get it."""
    parser = StreamParser()
    parser.parse(_event([{"index": 0, "id": "a", "function": {"arguments": "{}"}}]))
    with pytest.raises(MalformedReply):
        parser.parse(_event([{"index": 0, "id": "b", "function": {"name": "g"}}]))


def test_unary_tool_calls_parse_with_null_content() -> None:
    """`message.tool_calls` parse as written; null content is empty text."""
    message = {
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
        ],
    }
    raw = json.dumps({"choices": [{"message": message, "finish_reason": "tool_calls"}]})
    parsed = parse_completion(raw.encode())
    assert (parsed.content, parsed.finish_reason, parsed.tool_calls) == (
        "",
        FinishReason.TOOL_CALLS,
        (ToolCall("call_1", "f", "{bad"),),
    )


def test_request_body_embeds_parameters_as_json_and_defaults_empty_ones() -> None:
    """Parameters go as JSON exactly as the caller wrote them (big integers intact); a
    tool without parameters gets an empty object schema; no description, none sent."""
    schema = '{"type": "object", "properties": {"n": {"maximum": 123456789012345678901}}}'
    request = dataclasses.replace(
        BASE,
        tools=(Tool("a", "does a", schema), Tool("b")),
        tool_choice=ToolChoice(function_name="b"),
    )
    body = request_body(request, upstream_model="m", stream=False)
    assert b"123456789012345678901" in body
    data = json.loads(body)
    assert data["tools"] == [
        {
            "type": "function",
            "function": {"name": "a", "description": "does a", "parameters": json.loads(schema)},
        },
        {
            "type": "function",
            "function": {"name": "b", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert data["tool_choice"] == {"type": "function", "function": {"name": "b"}}


def test_plain_requests_keep_their_cache_keys() -> None:
    """A request without tool fields keys exactly as before tool calling existed."""
    assert canonical_request(BASE) == orjson.dumps(
        [1, "default", "m", [["user", "hi"]], [None, None, None, [], None, None, None]]
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"tools": (Tool("f"),)},
        {"tools": (Tool("f", "d"),)},
        {"tools": (Tool("f", "", '{"type": "object"}'),)},
        {"tools": (Tool("g"),)},
        {"tools": (Tool("f"),), "tool_choice": ToolChoice(ToolChoiceMode.NONE)},
        {"tools": (Tool("f"),), "tool_choice": ToolChoice(function_name="f")},
        {"messages": (Message(Role.USER, "hi"), Message(Role.ASSISTANT, "", (CALL,)))},
        {
            "messages": (
                Message(Role.USER, "hi"),
                Message(Role.ASSISTANT, "", (dataclasses.replace(CALL, arguments="{}"),)),
            )
        },
        {"messages": (Message(Role.TOOL, "hi", tool_call_id="call_1"),)},
        {"messages": (Message(Role.TOOL, "hi", tool_call_id="call_2"),)},
    ],
)
def test_every_tool_field_changes_the_key(changed: dict[str, object]) -> None:
    """Requests that differ only in a tool field never share a key."""
    keys = {canonical_request(BASE)}
    variant = dataclasses.replace(BASE, **changed)  # type: ignore[arg-type]
    assert canonical_request(variant) not in keys
    assert canonical_request(dataclasses.replace(variant, tools=(Tool("f"), Tool("h")))) != (
        canonical_request(variant)
    )


def _completion(**fields: object) -> Completion:
    return Completion("i", "m", "", FinishReason.TOOL_CALLS, Usage(1, 2), 0.02, "up", **fields)  # type: ignore[arg-type]


def test_entries_keep_tool_calls_and_replay_each_whole() -> None:
    """An entry round-trips its tool calls; a replay sends text, then each call whole."""
    answer = CachedAnswer(_completion(tool_calls=(CALL,)), ("Checking.",))
    decoded = CachedAnswer.decode(answer.encode())
    assert decoded == answer
    assert decoded.replay() == [
        Delta("Checking."),
        Delta("", (ToolCallDelta(0, "call_1", "get_weather", '{"city": "Paris"}'),)),
    ]


def test_version_1_entries_still_decode_without_tool_calls() -> None:
    """Entries written before tool calls existed decode, with none."""
    encoded = orjson.loads(CachedAnswer(_completion(), ("x",)).encode())
    del encoded["c"]["tool_calls"]
    encoded["v"] = 1
    decoded = CachedAnswer.decode(orjson.dumps(encoded))
    assert decoded.completion.tool_calls == ()
    encoded["v"] = 6  # a version no code has written yet
    with pytest.raises(EntryDecodeError):
        CachedAnswer.decode(orjson.dumps(encoded))


def test_estimates_count_tools_and_tool_calls() -> None:
    """Tool definitions count in the prompt, tool calls in the prompt and the output."""
    messages = (Message(Role.USER, "hi"),)
    tools = (Tool("get_weather", "Weather by city", '{"type": "object"}'),)
    assert estimate_prompt_tokens(messages, tools) > estimate_prompt_tokens(messages) + 5
    with_call = (*messages, Message(Role.ASSISTANT, "", (CALL,)))
    assert estimate_prompt_tokens(with_call) > estimate_prompt_tokens(
        (*messages, Message(Role.ASSISTANT, ""))
    )
    assert estimate_output_tokens("", (CALL,)) > estimate_output_tokens("")


def test_keep_recent_drops_a_tool_call_turn_whole_and_keeps_the_tools() -> None:
    """A turn whose assistant call does not fit is dropped with its results, even when a
    result alone would fit; tool definitions always count."""
    big = ToolCall("c1", "f", "x " * 2000)
    messages = (
        Message(Role.SYSTEM, "sys"),
        Message(Role.USER, "old"),
        Message(Role.ASSISTANT, "", (big,)),
        Message(Role.TOOL, "ok", tool_call_id="c1"),
        Message(Role.USER, "new"),
    )
    fitted = fit_messages(
        messages, context_window=1000, max_tokens=None, mode=TruncationMode.KEEP_RECENT
    )
    assert [m.content for m in fitted.messages] == ["sys", "new"]
    tools = (Tool("t", "d" * 10, '{"type": "object"}'),)
    with_tools = fit_messages(
        messages,
        tools=tools,
        context_window=1000,
        max_tokens=None,
        mode=TruncationMode.KEEP_RECENT,
    )
    assert with_tools.prompt_tokens > fitted.prompt_tokens


def test_keep_recent_keeps_the_turn_in_progress() -> None:
    """The tool calls and results after the last user message are the turn the model is
    in: they stay, and older turns go first."""
    messages = (
        Message(Role.SYSTEM, "sys"),
        Message(Role.USER, "old " * 300),
        Message(Role.ASSISTANT, "old answer " * 100),
        Message(Role.USER, "weather in Paris?"),
        Message(Role.ASSISTANT, "", (ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
        Message(Role.TOOL, "sunny, 21 C " * 40, tool_call_id="c1"),
    )
    fitted = fit_messages(
        messages, context_window=700, max_tokens=None, mode=TruncationMode.KEEP_RECENT
    )
    assert fitted.messages == (messages[0], *messages[3:])
    assert fitted.dropped == 2


def test_keep_recent_refuses_a_turn_in_progress_too_big_to_keep() -> None:
    """A turn in progress that cannot fit is refused, not cut."""
    messages = (
        Message(Role.USER, "weather?"),
        Message(Role.ASSISTANT, "", (ToolCall("c1", "get_weather", "{}"),)),
        Message(Role.TOOL, "sunny " * 2000, tool_call_id="c1"),
    )
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_messages(
            messages, context_window=1000, max_tokens=None, mode=TruncationMode.KEEP_RECENT
        )
    description = caught.value.violations[0].description
    assert "the last turn alone" in description
    assert "KEEP_RECENT" not in description  # it was already on


def test_tenant_token_demand_counts_tool_calls_and_tools() -> None:
    """A tenant's tokens-per-minute demand counts the arguments of the tool calls sent
    back and the tool definitions, as the prompt estimate does."""
    from llmgateway.v1 import gateway_pb2 as pb
    from service.caller_gate import demand_of

    plain = pb.CompleteRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
    call = pb.ToolCall(id="c1", name="search", arguments=json.dumps({"q": "word " * 200}))
    with_call = pb.CompleteRequest()
    with_call.CopyFrom(plain)
    with_call.messages.add(role=pb.ROLE_ASSISTANT, tool_calls=[call])
    with_tools = pb.CompleteRequest()
    with_tools.CopyFrom(plain)
    with_tools.tools.add(name="search", parameters='{"type": "object"}')
    base = demand_of(plain).tokens
    assert demand_of(with_call).tokens > base + 200
    assert demand_of(with_tools).tokens > base
