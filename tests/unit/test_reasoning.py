"""Reasoning output's pure parts: the OpenAI JSON, one read's chunk, entries, estimates."""

from __future__ import annotations

import json

import orjson
import pytest

from service.cache.entry import CachedAnswer, EntryDecodeError
from service.domain import Completion, Delta, FinishReason, ToolCall, ToolCallDelta, Usage
from service.tokens import estimate_output_tokens, estimate_text_tokens
from service.upstream.client import _output_of_events
from service.upstream.openai_json import MalformedReply, StreamParser, parse_completion, usage
from service.upstream.types import TextChunk

THOUGHT = "The user asks for 2 + 2. That is 4."


def _completion_json(message: dict[str, object], **usage_fields: object) -> bytes:
    return json.dumps(
        {
            "id": "c1",
            "model": "deepseek-reasoner",
            "choices": [{"message": {"role": "assistant", **message}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 30, **usage_fields},
        }
    ).encode()


def _event(**delta: object) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta}]})


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"content": "4", "reasoning_content": THOUGHT}, THOUGHT),
        ({"content": "4", "reasoning": THOUGHT}, THOUGHT),
        ({"content": "4", "reasoning_content": THOUGHT, "reasoning": "other"}, THOUGHT),
        ({"content": "4", "reasoning_content": None, "reasoning": THOUGHT}, THOUGHT),
        ({"content": "4", "reasoning_content": None}, ""),
        ({"content": "4"}, ""),
    ],
    ids=["deepseek", "openrouter", "both", "null-then-other", "null", "absent"],
)
def test_unary_reasoning_is_read_in_either_spelling(
    message: dict[str, object], expected: str
) -> None:
    """`reasoning_content` (DeepSeek, vLLM, llama.cpp), else `reasoning` (OpenRouter, newer
    vLLM); null or absent is none; the content stays the answer alone."""
    reply = parse_completion(_completion_json(message))
    assert (reply.reasoning, reply.content) == (expected, "4")


@pytest.mark.parametrize("value", [5, ["a"], {"text": "a"}, True], ids=str)
@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
def test_reasoning_that_is_not_a_string_is_malformed(value: object, spelling: str) -> None:
    """Unary and streamed, like content that is not a string."""
    with pytest.raises(MalformedReply, match="reasoning is not a string"):
        parse_completion(_completion_json({"content": "4", spelling: value}))
    with pytest.raises(MalformedReply, match="reasoning is not a string"):
        StreamParser().parse(_event(**{spelling: value}))


def test_stream_reasoning_pieces_are_output_before_the_text() -> None:
    """A delta with only reasoning (content null, as DeepSeek sends it) is a chunk."""
    parser = StreamParser()
    chunks = [
        parser.parse(_event(role="assistant", content="")),
        parser.parse(_event(content=None, reasoning_content="Think")),
        parser.parse(_event(reasoning="ing.")),
        parser.parse(_event(content="4", reasoning_content=None)),
    ]
    assert chunks == [
        None,
        TextChunk("", (), "Think"),
        TextChunk("", (), "ing."),
        TextChunk("4"),
    ]


def test_events_of_one_read_are_one_chunk_with_their_reasoning_and_text() -> None:
    """Reasoning, text and tool-call pieces of one read join into one chunk; the first
    output of a stream goes on alone."""
    call = {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}
    events = [
        _event(reasoning_content="one "),
        _event(reasoning_content="two"),
        _event(content="Answer."),
        _event(tool_calls=[call]),
    ]
    parser = StreamParser()
    first, parsed, error = _output_of_events(events, parser, stop_at_output=True)
    assert (first, parsed, error) == (TextChunk("", (), "one "), 1, None)
    rest, parsed, error = _output_of_events(events[1:], parser, stop_at_output=False)
    assert (rest, parsed, error) == (
        TextChunk("Answer.", (ToolCallDelta(0, "a", "f", "{}"),), "two"),
        3,
        None,
    )


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ({"reasoning_tokens": 25}, 25),
        ({"reasoning_tokens": 30}, 30),
        ({"reasoning_tokens": 0}, 0),
        ({"reasoning_tokens": 31}, 0),
        ({"reasoning_tokens": -1}, 0),
        ({"reasoning_tokens": "25"}, 0),
        ({"reasoning_tokens": 2.5}, 0),
        ({"reasoning_tokens": True}, 0),
        ({"reasoning_tokens": None}, 0),
        ({}, 0),
        (None, 0),
        ("25", 0),
    ],
    ids=[
        "some",
        "all",
        "zero",
        "more-than-the-output",
        "negative",
        "string",
        "fraction",
        "bool",
        "null",
        "absent",
        "details-null",
        "details-string",
    ],
)
def test_reasoning_tokens_are_taken_only_when_they_can_be_part_of_the_output(
    details: object, expected: int
) -> None:
    """A sane count (0 to completion_tokens) is kept; any other is ignored, and the rest
    of the usage stands (not estimated)."""
    parsed = usage(
        {"prompt_tokens": 10, "completion_tokens": 30, "completion_tokens_details": details}
    )
    assert parsed == Usage(input_tokens=10, output_tokens=30, reasoning_tokens=expected)


@pytest.mark.parametrize(
    ("completion", "reasoning", "total", "expected"),
    [
        (198, 405, 623, Usage(20, 603, reasoning_tokens=405)),
        (500, 100, 620, Usage(20, 600, reasoning_tokens=100)),
        (500, 100, 520, Usage(20, 500, reasoning_tokens=100)),
        (500, 100, None, Usage(20, 500, reasoning_tokens=100)),
        (198, 405, 624, Usage(20, 198)),
        (198, 405, "623", Usage(20, 198)),
        (None, 60, 81, Usage(20, 61, reasoning_tokens=60)),
    ],
    ids=[
        "more-than-the-completion",
        "fewer",
        "within-the-completion",
        "no-total",
        "total-says-otherwise",
        "total-string",
        "completion-from-the-total",
    ],
)
def test_reasoning_the_total_puts_outside_the_completion_is_output(
    completion: object, reasoning: int, total: object, expected: Usage
) -> None:
    """Reasoning counted apart from `completion_tokens` (the total is the prompt, the
    completion and the reasoning) is added to the output; else the completion holds it."""
    data = {
        "prompt_tokens": 20,
        "completion_tokens": completion,
        "total_tokens": total,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    assert usage(data) == expected


def test_usage_sums_add_reasoning_tokens() -> None:
    """Batch and summary totals add the reasoning tokens like the others."""
    total = Usage(1, 10, reasoning_tokens=4) + Usage(2, 20, reasoning_tokens=5)
    assert total == Usage(3, 30, reasoning_tokens=9)


def test_output_estimate_counts_reasoning() -> None:
    """An answer's reasoning is billed output: with no usage reported, it is estimated."""
    assert estimate_output_tokens("4", (), THOUGHT) == (
        estimate_text_tokens("4") + estimate_text_tokens(THOUGHT)
    )


def _answer(**fields: object) -> Completion:
    values: dict[str, object] = {
        "id": "c1",
        "model": "m",
        "content": "Paris.",
        "finish_reason": FinishReason.STOP,
        "usage": Usage(12, 40),
        "cost_usd": 0.0001,
        "upstream": "up0",
    }
    return Completion(**{**values, **fields})  # type: ignore[arg-type]


def test_entries_keep_reasoning_and_replay_it_first_whole() -> None:
    """An entry round-trips its reasoning and reasoning tokens; a replay sends the
    reasoning as one delta, then the text deltas, then the tool calls."""
    completion = _answer(
        usage=Usage(12, 40, reasoning_tokens=30),
        reasoning=THOUGHT,
        tool_calls=(ToolCall("call_1", "f", "{}"),),
    )
    answer = CachedAnswer(completion, ("Par", "is."))
    decoded = CachedAnswer.decode(answer.encode())
    assert decoded == answer
    assert decoded.replay() == [
        Delta("", reasoning=THOUGHT),
        Delta("Par"),
        Delta("is."),
        Delta("", (ToolCallDelta(0, "call_1", "f", "{}"),)),
    ]
    hit = decoded.served_from_cache(total_ms=1.0, first_token_ms=1.0)
    assert (hit.reasoning, hit.usage.reasoning_tokens) == (THOUGHT, 30)
    assert CachedAnswer.of_unary(completion).replay()[:2] == [
        Delta("", reasoning=THOUGHT),
        Delta("Paris."),
    ]


# Exactly what the gateway wrote before reasoning was relayed (entry version 2).
VERSION_2_ENTRY = (
    b'{"v":2,"c":{"id":"chatcmpl-1","model":"deepseek-chat","content":"Paris.",'
    b'"finish_reason":"stop","usage":{"input_tokens":12,"output_tokens":40,'
    b'"cached_input_tokens":0,"is_estimated":false},"cost_usd":0.0001,"upstream":"up0",'
    b'"attempts":1,"timings":{"total_ms":0.0,"upstream_ms":0.0,"time_to_first_token_ms":0.0},'
    b'"saved_cost_usd":0.0,"is_cache_hit":false,"dropped_messages":0,'
    b'"tool_calls":[{"id":"call_1","name":"f","arguments":"{}"}]},"d":["Par","is."]}'
)


def test_version_2_entries_still_decode_without_reasoning() -> None:
    """An entry the previous gateway wrote decodes, with no reasoning, and replays as it
    did; a reasoning of the wrong type is refused."""
    decoded = CachedAnswer.decode(VERSION_2_ENTRY)
    assert decoded.completion.reasoning == ""
    assert decoded.completion.usage == Usage(12, 40)
    assert decoded.completion.tool_calls == (ToolCall("call_1", "f", "{}"),)
    assert [d.content for d in decoded.replay()] == ["Par", "is.", ""]
    current = orjson.loads(CachedAnswer(_answer(reasoning=THOUGHT), ("x",)).encode())
    assert current["v"] == 5
    current["c"]["reasoning"] = 5
    with pytest.raises(EntryDecodeError):
        CachedAnswer.decode(orjson.dumps(current))


def test_reasoning_sent_back_changes_the_key_and_the_estimate() -> None:
    """An assistant turn's reasoning goes upstream, so it is part of the cache key and of
    the prompt estimate; a turn without it keeps the key it had."""
    from service.cache.keys import canonical_request
    from service.domain import ChatRequest, Message, Role
    from service.tokens import estimate_prompt_tokens

    def request(reasoning: str) -> ChatRequest:
        messages = (
            Message(Role.USER, "hi"),
            Message(Role.ASSISTANT, "hello", reasoning=reasoning),
            Message(Role.USER, "and?"),
        )
        return ChatRequest(model="m", messages=messages)

    plain, thought = request(""), request("the user greets me " * 20)
    assert canonical_request(plain) == orjson.dumps(
        [1, "default", "m", [["user", "hi"], ["assistant", "hello"], ["user", "and?"]],
         [None, None, None, [], None, None, None]]
    )  # fmt: skip
    assert canonical_request(thought) != canonical_request(plain)
    assert estimate_prompt_tokens(thought.messages) > estimate_prompt_tokens(plain.messages) + 20
