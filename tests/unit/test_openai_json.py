"""Unit tests for the OpenAI chat-completions JSON adapter (service.upstream.openai_json)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from service.domain import (
    ChatRequest,
    FinishReason,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    Usage,
)
from service.upstream.openai_json import (
    ContextCounts,
    MalformedReply,
    Missing,
    StreamParser,
    body_without_stream_options,
    context_counts,
    error_status,
    finish_reason,
    is_json_or_cut,
    parse_completion,
    request_body,
    says_context_exceeded,
    says_out_of_credit,
    unary_body,
    usage,
    what_is_missing,
)
from service.upstream.types import StreamEnd, TextChunk, UpstreamReply

_PARAM_KEYS = {
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
}


def body_of(params: GenerationParams | None = None, *, stream: bool = False) -> Any:
    """The decoded JSON body for a two-message request with `params`."""
    request = ChatRequest(
        model="caller-name",
        messages=(Message(Role.SYSTEM, "be brief"), Message(Role.USER, "hi")),
        params=params or GenerationParams(),
    )
    return json.loads(request_body(request, upstream_model="upstream-name", stream=stream))


def test_request_body_minimal() -> None:
    """With no params set the body has only the upstream's model name and the messages."""
    assert body_of() == {
        "model": "upstream-name",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
    }


@pytest.mark.parametrize(
    ("params", "key", "value"),
    [
        (GenerationParams(temperature=0.7), "temperature", 0.7),
        (GenerationParams(temperature=0.0), "temperature", 0.0),
        (GenerationParams(top_p=0.9), "top_p", 0.9),
        (GenerationParams(top_p=0.0), "top_p", 0.0),
        (GenerationParams(max_tokens=64), "max_tokens", 64),
        (GenerationParams(max_tokens=0), "max_tokens", 0),
        (GenerationParams(stop=("END",)), "stop", ["END"]),
        (GenerationParams(stop=("a", "b")), "stop", ["a", "b"]),
        (GenerationParams(seed=42), "seed", 42),
        (GenerationParams(seed=0), "seed", 0),
        (GenerationParams(presence_penalty=-1.5), "presence_penalty", -1.5),
        (GenerationParams(presence_penalty=0.0), "presence_penalty", 0.0),
        (GenerationParams(frequency_penalty=1.25), "frequency_penalty", 1.25),
        (GenerationParams(frequency_penalty=0.0), "frequency_penalty", 0.0),
    ],
)
def test_request_body_sends_each_set_param_alone(
    params: GenerationParams, key: str, value: object
) -> None:
    """A set parameter is sent with its exact value (zero included) and no other is sent."""
    body = body_of(params)
    assert body[key] == value
    assert type(body[key]) is type(value)
    assert _PARAM_KEYS & set(body) == {key}


def test_request_body_sends_every_param() -> None:
    """With every parameter set, each one is in the body with its value."""
    params = GenerationParams(
        temperature=1.0,
        top_p=0.5,
        max_tokens=10,
        stop=("x",),
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
    )
    body = body_of(params)
    assert {k: body[k] for k in _PARAM_KEYS} == {
        "temperature": 1.0,
        "top_p": 0.5,
        "max_tokens": 10,
        "stop": ["x"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_request_body_stream_flag(stream: bool) -> None:
    """A stream asks for `stream` and usage in the last chunk; a unary call asks for neither."""
    body = body_of(stream=stream)
    if stream:
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    else:
        assert "stream" not in body
        assert "stream_options" not in body


def test_a_streamed_body_made_unary_is_the_unary_body() -> None:
    """`unary_body` of a stream's body is, byte for byte, the body the same request unary
    is sent with (how a stream refused without a word is asked again)."""
    request = ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(temperature=0.3, max_tokens=10, stop=("x",)),
    )
    streamed = request_body(request, upstream_model="u", stream=True, extra={"x_org": 1})
    unary = request_body(request, upstream_model="u", stream=False, extra={"x_org": 1})
    assert unary_body(streamed) == unary


def test_a_streamed_body_asked_again_keeps_a_schema_byte_for_byte() -> None:
    """A stream's body made unary, or without its `stream_options`, keeps a tool's
    parameters and an answer's schema as written: integers past 64 bits stay integers."""
    schema = '{"type": "object", "properties": {"n": {"maximum": 123456789012345678901234567890}}}'
    request = ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema=schema)
        ),
        tools=(Tool("count", parameters=schema),),
    )
    streamed = request_body(request, upstream_model="u", stream=True)
    for body in (unary_body(streamed), body_without_stream_options(streamed)):
        assert body.count(schema.encode()) == 2
    assert orjson.loads(body_without_stream_options(streamed))["stream"] is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("content_filter", FinishReason.CONTENT_FILTER),
        ("tool_calls", FinishReason.TOOL_CALLS),
        ("function_call", FinishReason.TOOL_CALLS),
        ("eos", FinishReason.STOP),
        ("eos_token", FinishReason.STOP),
        ("stop_sequence", FinishReason.STOP),
        ("end_turn", FinishReason.STOP),
        ("max_tokens", FinishReason.LENGTH),
        ("model_length", FinishReason.LENGTH),
        ("tool_use", FinishReason.TOOL_CALLS),
        ("something_new", FinishReason.UNKNOWN),
        # Gemini's, through a proxy that passes them on: read without case.
        ("STOP", FinishReason.STOP),
        ("MAX_TOKENS", FinishReason.LENGTH),
        ("SAFETY", FinishReason.CONTENT_FILTER),
        ("RECITATION", FinishReason.CONTENT_FILTER),
        ("PROHIBITED_CONTENT", FinishReason.CONTENT_FILTER),
        ("Length", FinishReason.LENGTH),
        ("OTHER", FinishReason.UNKNOWN),
        (7, FinishReason.UNKNOWN),
        (["stop"], FinishReason.UNKNOWN),
        ({"reason": "error"}, FinishReason.UNKNOWN),
        (None, None),
        ("", None),
    ],
)
def test_finish_reason_mapping(raw: object, expected: FinishReason | None) -> None:
    """Each upstream spelling maps to one finish reason; anything else is UNKNOWN."""
    assert finish_reason(raw) is expected


def completion_json(**overrides: Any) -> bytes:
    """A unary chat-completion answer, with top-level keys replaced by `overrides`."""
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "deepseek-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    data.update(overrides)
    return json.dumps(data).encode()


def test_parse_completion_good() -> None:
    """A well-formed answer yields its id, model, content, finish reason and usage."""
    assert parse_completion(completion_json()) == UpstreamReply(
        id="chatcmpl-1",
        model="deepseek-chat",
        content="Hello!",
        finish_reason=FinishReason.STOP,
        usage=Usage(input_tokens=12, output_tokens=3),
    )


def test_parse_completion_cached_tokens() -> None:
    """`prompt_tokens_details.cached_tokens` becomes the cached input count."""
    raw = completion_json(
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 80},
        }
    )
    assert parse_completion(raw).usage == Usage(
        input_tokens=100, output_tokens=5, cached_input_tokens=80
    )


def test_parse_completion_reads_deepseeks_cache_hit_count() -> None:
    """DeepSeek reports its cached input as `prompt_cache_hit_tokens` (and the rest as
    `prompt_cache_miss_tokens`): read as the cached count, priced at the cached price.
    Before, without OpenAI's `prompt_tokens_details`, it was read as none: every input
    token priced in full, at ten times DeepSeek's cache-hit price."""
    raw = completion_json(
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        }
    )
    assert parse_completion(raw).usage == Usage(
        input_tokens=100, output_tokens=5, cached_input_tokens=64
    )


@pytest.mark.parametrize(
    "details",
    [{}, {"cached_tokens": None}, {"cached_tokens": 0, "text_tokens": 0}],
    ids=["empty", "null", "zero"],
)
def test_deepseeks_cache_hit_count_is_read_beside_details_without_one(
    details: dict[str, object],
) -> None:
    """Resellers relaying DeepSeek re-encode its usage with OpenAI's
    `prompt_tokens_details` (empty, null or zero counts) beside DeepSeek's own
    `prompt_cache_hit_tokens`: the hit count is still the cached count. Before, any
    details object hid it, and every input token was priced in full."""
    raw = completion_json(
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_tokens_details": details,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        }
    )
    assert parse_completion(raw).usage == Usage(
        input_tokens=100, output_tokens=5, cached_input_tokens=64
    )


@pytest.mark.parametrize("usage_value", [None, "n/a", 3])
def test_parse_completion_without_usage(usage_value: object) -> None:
    """An answer without a usage object parses with usage None (to be estimated later)."""
    data = json.loads(completion_json())
    if usage_value is None:
        del data["usage"]
    else:
        data["usage"] = usage_value
    assert parse_completion(json.dumps(data).encode()).usage is None


def test_parse_completion_null_content_is_empty() -> None:
    """A null message content (e.g. a tool call) parses as empty text."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    choice = {"message": message, "finish_reason": "tool_calls"}
    reply = parse_completion(completion_json(choices=[choice]))
    assert (reply.content, reply.finish_reason) == ("", FinishReason.TOOL_CALLS)


def test_parse_completion_missing_id_and_model() -> None:
    """Missing id and model come back as empty strings, not 'None'."""
    data = json.loads(completion_json())
    del data["id"], data["model"]
    reply = parse_completion(json.dumps(data).encode())
    assert (reply.id, reply.model) == ("", "")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param(completion_json(choices=[]), "no choices", id="empty-choices"),
        pytest.param(completion_json(choices=None), "no choices", id="null-choices"),
        pytest.param(completion_json(choices="x"), "no choices", id="choices-not-list"),
        pytest.param(
            completion_json(choices=["x"]), "not a list of objects", id="choice-not-object"
        ),
        pytest.param(
            completion_json(choices=[{"message": {"content": "hi"}}]),
            "no finish reason",
            id="missing-finish-reason",
        ),
        pytest.param(
            completion_json(choices=[{"message": {"content": "hi"}, "finish_reason": None}]),
            "no finish reason",
            id="null-finish-reason",
        ),
        pytest.param(
            completion_json(choices=[{"message": {"content": 5}, "finish_reason": "stop"}]),
            "not a string",
            id="content-number",
        ),
        pytest.param(
            completion_json(
                choices=[{"message": {"content": [{"type": "text"}]}, "finish_reason": "stop"}]
            ),
            "not a string",
            id="content-list",
        ),
        pytest.param(
            completion_json(choices=[{"message": {"content": "cut"}, "finish_reason": "error"}]),
            "reported an error",
            id="finish-reason-error",
        ),
        pytest.param(
            completion_json(
                choices=[
                    {"message": {"content": "cut"}, "finish_reason": "insufficient_system_resource"}
                ]
            ),
            "reported an error",
            id="finish-reason-deepseek-insufficient-resource",
        ),
        pytest.param(
            completion_json(choices=[{"message": {"content": "cut"}, "finish_reason": "abort"}]),
            "reported an error",
            id="finish-reason-vllm-abort",
        ),
        *(
            pytest.param(
                completion_json(
                    choices=[
                        {"message": {"content": "x", "tool_calls": calls}, "finish_reason": "stop"}
                    ]
                ),
                "tool_calls is not a list",
                id=f"tool-calls-{name}",
            )
            for name, calls in (("empty-string", ""), ("false", False), ("empty-object", {}))
        ),
        *(
            pytest.param(
                completion_json(
                    choices=[
                        {"index": index, "message": {"content": "hi"}, "finish_reason": "stop"}
                    ]
                ),
                "a choice has a bad index",
                id=f"sole-choice-index-{name}",
            )
            for name, index in (("string", "0"), ("negative", -1), ("true", True))
        ),
        pytest.param(b"not json", "not valid JSON", id="not-json"),
        pytest.param(b"[1, 2]", "not a JSON object", id="json-array"),
        pytest.param(b"", "not valid JSON", id="empty"),
    ],
)
def test_parse_completion_malformed(raw: bytes, problem: str) -> None:
    """Each malformed answer raises `MalformedReply` saying what is wrong."""
    with pytest.raises(MalformedReply, match=problem):
        parse_completion(raw)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"prompt_tokens": 1, "completion_tokens": 2}, Usage(1, 2, 0)),
        ({}, None),
        ({"prompt_tokens": None, "completion_tokens": None}, None),
        ({"prompt_tokens": 9, "completion_tokens": 0, "prompt_tokens_details": None}, Usage(9)),
        (
            {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {}},
            Usage(9, 2, 0),
        ),
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
            Usage(9, 2, 4),
        ),
        (None, None),
        ([], None),
    ],
)
def test_usage_parsing(data: object, expected: Usage | None) -> None:
    """Usage objects parse their counts; an object with no count at all, or a
    non-object, is no usage (the gateway then estimates it)."""
    assert usage(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"completion_tokens": 2}, Usage(0, 2, 0, is_estimated=True)),
        ({"prompt_tokens": 9, "completion_tokens": None}, Usage(9, 0, 0, is_estimated=True)),
        (
            {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 40}},
            Usage(9, 0, 9, is_estimated=True),
        ),
        ({"completion_tokens": 2, "prompt_cache_hit_tokens": 4}, Usage(0, 2, 4, is_estimated=True)),
        ({"prompt_tokens": 9, "total_tokens": "12"}, Usage(9, 0, 0, is_estimated=True)),
        ({"prompt_tokens": 9, "total_tokens": 5}, Usage(9, 0, 0, is_estimated=True)),
        ({"prompt_tokens": 9, "total_tokens": 12}, Usage(9, 3, 0)),
        ({"completion_tokens": 3, "total_tokens": 12.0}, Usage(9, 3, 0)),
    ],
)
def test_usage_missing_one_count_is_partial_unless_the_total_gives_it(
    data: object, expected: Usage
) -> None:
    """One count left out is flagged, its 0 for the pipeline to estimate, not to bill;
    `total_tokens` less the other count gives it where the total holds that count."""
    assert usage(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        {"prompt_tokens": "many"},
        {"prompt_tokens": 1.5e400},
        {"prompt_tokens": -1},
        {"completion_tokens": 2**32 + 1},
        {"prompt_tokens": 2**53, "completion_tokens": 1},  # it would overflow Redis's sums
    ],
)
def test_usage_counts_no_real_call_has_are_no_usage(data: object) -> None:
    """Not a bill of billions, nor a failed answer (retried, so billed twice): no usage,
    which the gateway then estimates."""
    assert usage(data) is None


def test_an_answer_with_unbelievable_usage_stands_without_it() -> None:
    """Unary and streamed: the text is relayed; the usage is left to the estimate."""
    reply = parse_completion(completion_json(usage={"prompt_tokens": -3}))
    assert (reply.content, reply.usage) == ("Hello!", None)
    parser = StreamParser()
    parser.parse(chunk("ok"))
    parser.parse(json.dumps({"choices": [], "usage": {"prompt_tokens": "x"}}))
    assert parser.usage is None


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish: str | None = None,
    chunk_id: str = "c1",
    model: str = "m1",
) -> str:
    """One streamed chat-completion chunk as SSE data."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return json.dumps(
        {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def usage_chunk(prompt: int, completion: int, cached: int | None = None) -> str:
    """The final usage-only chunk a stream sends with `include_usage`."""
    data: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        data["prompt_tokens_details"] = {"cached_tokens": cached}
    return json.dumps({"id": "c1", "model": "m1", "choices": [], "usage": data})


def test_stream_parser_full_stream() -> None:
    """Role, content, finish, usage and [DONE] chunks parse to the text and the end."""
    parser = StreamParser()
    events = [
        parser.parse(chunk(role="assistant", content="")),
        parser.parse(chunk("Hel")),
        parser.parse(chunk("lo")),
        parser.parse(chunk(finish="stop")),
        parser.parse(usage_chunk(10, 2, cached=4)),
    ]
    assert events == [None, TextChunk("Hel"), TextChunk("lo"), None, None]
    assert not parser.is_done
    assert parser.parse("[DONE]") is None
    assert parser.is_done
    assert parser.end() == StreamEnd(
        id="c1",
        model="m1",
        finish_reason=FinishReason.STOP,
        usage=Usage(input_tokens=10, output_tokens=2, cached_input_tokens=4),
    )


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([(1234, 567), (1300, 600)], Usage(input_tokens=1300, output_tokens=600)),
        ([(1234, 567), (0, 0)], Usage(input_tokens=1234, output_tokens=567)),
        ([(1234, 567), (1300, 0)], Usage(input_tokens=1300, output_tokens=567)),
        ([(0, 0), (1234, 567)], Usage(input_tokens=1234, output_tokens=567)),
        ([(1234, 0), (1234, 0)], Usage(input_tokens=1234, output_tokens=0)),
        ([(1234, 0), (0, 0)], Usage(input_tokens=1234, output_tokens=0, is_estimated=True)),
    ],
    ids=["count-up", "all-zero", "zero-output", "zero-first", "no-output", "zero-prompt"],
)
def test_stream_parser_later_usage_counts_of_zero_leave_the_earlier(
    counts: list[tuple[int, int]], expected: Usage
) -> None:
    """A later usage event replaces the earlier one, but its counts of 0 where the earlier
    had counts leave those (a count never goes down); a 0 both report stands."""
    parser = StreamParser()
    parser.parse(chunk(finish="stop"))
    for prompt, completion in counts:
        parser.parse(usage_chunk(prompt, completion))
    assert parser.end().usage == expected


def test_stream_parser_role_chunk_yields_nothing() -> None:
    """A role-only first chunk yields no text but records the id and model."""
    parser = StreamParser()
    assert parser.parse(chunk(role="assistant", chunk_id="abc", model="gpt")) is None
    assert (parser.id, parser.model) == ("abc", "gpt")


def test_stream_parser_keeps_first_id() -> None:
    """The id and model come from the first chunk, even when later ones differ."""
    parser = StreamParser()
    parser.parse(chunk("a", chunk_id="first", model="m-first"))
    parser.parse(chunk("b", chunk_id="second", model="m-second"))
    assert (parser.id, parser.model) == ("first", "m-first")


def test_stream_parser_content_and_finish_in_one_chunk() -> None:
    """A chunk with both text and a finish reason yields the text and records the reason."""
    parser = StreamParser()
    assert parser.parse(chunk("end.", finish="length")) == TextChunk("end.")
    assert parser.end().finish_reason is FinishReason.LENGTH


def test_stream_parser_usage_chunk_with_empty_choices() -> None:
    """A usage chunk with empty choices sets the usage and yields nothing."""
    parser = StreamParser()
    parser.parse(chunk(finish="stop"))
    assert parser.parse(usage_chunk(7, 3)) is None
    assert parser.usage == Usage(input_tokens=7, output_tokens=3)


def test_stream_parser_without_usage() -> None:
    """A stream that never reports usage ends with usage None."""
    parser = StreamParser()
    parser.parse(chunk("x", finish="stop"))
    assert parser.end().usage is None


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("stop", "stop"), ("length", "length"), ("content_filter", "content_filter"),
     ("tool_calls", "stop")],
)  # fmt: skip
def test_stream_parser_finish_reasons(reason: str, expected: str) -> None:
    """The stream's finish reason is the last one an upstream chunk gave (but "tool_calls"
    with no call streamed, which is a text answer's STOP)."""
    parser = StreamParser()
    parser.parse(chunk("x"))
    parser.parse(chunk(finish=reason))
    assert parser.end().finish_reason is FinishReason(expected)


def test_stream_parser_end_without_finish_reason() -> None:
    """A stream that never said why it finished is malformed."""
    parser = StreamParser()
    parser.parse(chunk("partial"))
    with pytest.raises(MalformedReply, match="without a finish reason"):
        parser.end()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(
            json.dumps({"error": {"message": "overloaded", "type": "server_error"}}),
            "error mid-stream",
            id="error-object",
        ),
        pytest.param(
            json.dumps({"error": "boom", "choices": []}), "error mid-stream", id="error-no-choices"
        ),
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param("[1]", "not a JSON object", id="array"),
        pytest.param('"text"', "not a JSON object", id="string"),
        pytest.param(json.dumps({"choices": "x"}), "not a list of objects", id="choices-string"),
        pytest.param(json.dumps({"choices": [1]}), "not a list of objects", id="choice-number"),
        pytest.param(
            json.dumps({"choices": [{"delta": {"content": 5}}]}), "not a string", id="content-int"
        ),
    ],
)
def test_stream_parser_malformed(data: str, problem: str) -> None:
    """A malformed or error event mid-stream raises `MalformedReply` saying what is wrong."""
    parser = StreamParser()
    parser.parse(chunk("ok so far"))
    with pytest.raises(MalformedReply, match=problem):
        parser.parse(data)


@pytest.mark.parametrize("data", ["", "\n", " "])
def test_stream_parser_skips_an_event_without_data(data: str) -> None:
    """An event whose data is empty (`data:` alone) carries no chunk; the stream goes on."""
    parser = StreamParser()
    assert parser.parse(data) is None
    assert parser.parse(chunk("x", finish="stop")) == TextChunk("x")
    assert not parser.is_done


@pytest.mark.parametrize(
    ("data_at_end", "is_done"),
    [
        pytest.param("[DONE]", True, id="done"),
        pytest.param(None, False, id="nothing-left-open"),
        pytest.param("[DO", False, id="partial-done"),
        pytest.param("[DONE]x", False, id="more-than-done"),
        pytest.param(chunk("x") + "\n[DONE]", False, id="chunk-then-done"),
    ],
)
def test_stream_parser_end_of_body(data_at_end: str | None, is_done: bool) -> None:
    """A clean end of body ends the stream only when the event it left open is `[DONE]`."""
    parser = StreamParser()
    parser.parse(chunk("x", finish="stop"))
    parser.end_of_body(data_at_end)
    assert parser.is_done is is_done


def test_stream_parser_chunk_without_delta() -> None:
    """A choice without a delta yields nothing rather than failing."""
    parser = StreamParser()
    assert parser.parse(json.dumps({"choices": [{"index": 0}]})) is None


def indexed_event(*choices: tuple[int | None, str]) -> str:
    """A stream event with a choice for each (index, text) pair; a "." text finishes it."""
    return json.dumps(
        {
            "choices": [
                {"index": i, "delta": {"content": t}, "finish_reason": "stop" if t == "." else None}
                for i, t in choices
            ]
        }
    )


def indexed_answer(*choices: tuple[int | None, str]) -> bytes:
    """A unary answer with a choice for each (index, text) pair; an empty text is a choice
    that carries nothing (no finish reason either)."""
    return completion_json(
        choices=[
            {"index": i, "message": {"content": t}, "finish_reason": "stop" if t else None}
            for i, t in choices
        ]
    )


# Each stream's events as (index, text) choices, and the answer's text (None: malformed).
_INDEXED_STREAMS = [
    pytest.param([[(0, "a")], [(0, ".")]], "a.", id="index-0"),
    pytest.param([[(None, "a")], [(None, ".")]], "a.", id="no-index"),
    pytest.param([[(1, "a")], [(1, ".")]], "a.", id="only-index-1"),
    pytest.param([[(3, "a")], [(3, ".")]], "a.", id="only-index-3"),
    pytest.param([[(0, "a")], [(1, "x")], [(1, "y"), (0, ".")]], "a.", id="0-then-another"),
    pytest.param([[(1, "x"), (0, "a")], [(0, ".")]], "a.", id="another-listed-first"),
    pytest.param([[(1, "a")], [(2, "x")], [(1, ".")]], None, id="1-then-2"),
    pytest.param([[(1, "a"), (2, "x")], [(1, ".")]], None, id="1-and-2-together"),
    pytest.param([[(1, "a")], [(0, "x")], [(1, ".")]], None, id="1-then-0"),
    pytest.param([[(1, "")], [(0, "a")], [(0, ".")]], "a.", id="1s-role-then-0"),
    # A choice that carries nothing (an empty role event here) names no index.
    pytest.param([[(1, "")], [(2, "a")], [(2, ".")]], "a.", id="1s-role-then-2"),
    pytest.param([[(1, "a")], [(1, ".")], [(0, "")]], "a.", id="1-then-empty-0"),
    pytest.param([[(1, "a")], [(0, "")], [(1, ".")]], "a.", id="1-empty-0-then-1"),
    pytest.param([[(0, "")], [(1, "a")], [(1, ".")]], "a.", id="empty-0-then-1"),
    pytest.param([[(1, "a"), (0, "")], [(1, ".")]], "a.", id="1-beside-empty-0"),
    pytest.param([[(0, ""), (1, "a"), (2, "x")], [(1, ".")]], None, id="empty-0-1-and-2"),
    pytest.param([[(1, "a")], [(0, "")], [(2, "x")], [(1, ".")]], None, id="1-empty-0-then-2"),
]


@pytest.mark.parametrize(("events", "text"), _INDEXED_STREAMS)
def test_stream_parser_relays_the_choice_a_unary_answer_would(
    events: list[list[tuple[int | None, str]]], text: str | None
) -> None:
    """Index 0's choice, or, in a stream naming only one other index, that one's; a stream
    naming two others (or 0 after some of another's answer) is malformed, never a splice
    of both."""
    parser = StreamParser()

    def relayed() -> str:
        chunks = [parser.parse(indexed_event(*choices)) for choices in events]
        parser.end()
        return "".join(c.content for c in chunks if c is not None)

    if text is None:
        with pytest.raises(MalformedReply, match="choices at"):
            relayed()
    else:
        assert relayed() == text


def test_stream_parser_takes_index_0_after_another_finished_with_nothing_relayed() -> None:
    """Another completion's first event, a role and a finish with no text, relays nothing:
    index 0's answer, coming next, is the stream's (with its own finish), as a unary
    answer's would be. Before, the bare finish held index 0 out and failed the stream."""
    parser = StreamParser()
    bare = {"index": 1, "delta": {"role": "assistant"}, "finish_reason": "length"}
    assert parser.parse(json.dumps({"choices": [bare]})) is None
    chunks = [parser.parse(indexed_event(*choices)) for choices in [[(0, "a")], [(0, ".")]]]
    parser.end()
    assert "".join(c.content for c in chunks if c is not None) == "a."
    assert parser.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    ("choices", "text"),
    [
        pytest.param([(0, "a")], "a", id="index-0"),
        pytest.param([(1, "a")], "a", id="only-index-1"),
        pytest.param([(1, "x"), (0, "a")], "a", id="another-listed-first"),
        pytest.param([(1, "a"), (2, "x")], None, id="1-and-2"),
        pytest.param([(0, ""), (1, "a")], "a", id="empty-0-then-1"),
        pytest.param([(1, "a"), (0, "")], "a", id="1-then-empty-0"),
        pytest.param([(0, ""), (1, "a"), (2, "x")], None, id="empty-0-1-and-2"),
    ],
)
def test_parse_completion_takes_the_choice_a_stream_would(
    choices: list[tuple[int | None, str]], text: str | None
) -> None:
    """Index 0's choice, else the only one; several, none at 0, are malformed."""
    if text is None:
        with pytest.raises(MalformedReply, match="choices at indexes 1, 2 and none at 0"):
            parse_completion(indexed_answer(*choices))
    else:
        assert parse_completion(indexed_answer(*choices)).content == text


def test_parse_completion_with_only_empty_choices_has_no_finish_reason() -> None:
    """Choices that carry nothing are no answer: malformed, as one without a finish is."""
    with pytest.raises(MalformedReply, match="no finish reason"):
        parse_completion(indexed_answer((0, ""), (1, "")))


def index_0_after_index_1(choice: dict[str, Any]) -> list[str]:
    """A stream answered at index 1, with `choice` (at index 0) after its text."""
    return [indexed_event((1, "a")), json.dumps({"choices": [choice]}), indexed_event((1, "."))]


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param({"index": 0, "delta": {}}, id="empty-delta"),
        pytest.param({"index": 0, "delta": {"content": ""}}, id="empty-content"),
        pytest.param({"index": 0, "delta": {"content": None}}, id="null-content"),
        pytest.param({"index": 0, "delta": {"role": "assistant"}}, id="role-only"),
        pytest.param({"index": 0, "delta": {"tool_calls": []}}, id="no-tool-calls"),
        pytest.param(
            {"index": 0, "delta": {"refusal": None, "reasoning_content": "", "reasoning": None}},
            id="no-refusal-nor-reasoning",
        ),
        pytest.param({"index": 0, "delta": None, "finish_reason": None}, id="null-delta"),
        pytest.param({"index": 0, "finish_reason": ""}, id="no-delta"),
    ],
)
def test_stream_parser_ignores_an_index_0_choice_that_carries_nothing(
    choice: dict[str, Any],
) -> None:
    """An empty index-0 choice after an answer at index 1 (some proxies send one) is no
    second choice: the answer is relayed whole. Before, it failed the stream."""
    parser = StreamParser()
    chunks = [parser.parse(data) for data in index_0_after_index_1(choice)]
    parser.end()
    assert "".join(c.content for c in chunks if c is not None) == "a."
    assert parser.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param({"index": 0, "delta": {}, "finish_reason": "stop"}, id="finish"),
        pytest.param({"index": 0, "delta": {"refusal": "no"}}, id="refusal"),
        pytest.param({"index": 0, "delta": {"reasoning_content": "hm"}}, id="reasoning"),
        pytest.param({"index": 0, "delta": {"reasoning": "hm"}}, id="openrouter-reasoning"),
        pytest.param(
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t"}]}}, id="tool-call"
        ),
        pytest.param({"index": 0, "delta": {"content": 0}}, id="content-not-a-string"),
    ],
)
def test_stream_parser_fails_on_an_index_0_choice_that_carries_something(
    choice: dict[str, Any],
) -> None:
    """An index-0 choice with a finish, a refusal, reasoning, a tool call (or a field not
    of its type) after some of index 1's answer is a second choice: malformed, not spliced."""
    parser = StreamParser()
    with pytest.raises(MalformedReply, match="followed by choices at 0"):
        for data in index_0_after_index_1(choice):
            parser.parse(data)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # OpenAI: the code says it.
        ({"error": {"message": "...", "code": "context_length_exceeded"}}, True),
        # vLLM and DeepSeek: the message does.
        (
            {
                "object": "error",
                "error": {
                    "message": "This model's maximum context length is 4096 tokens. However,"
                    " you requested 5000 tokens (4900 in the messages, 100 in the completion).",
                    "type": "BadRequestError",
                },
            },
            True,
        ),
        # llama.cpp: its type and message.
        (
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                }
            },
            True,
        ),
        ({"error": {"message": "temperature must be at most 2", "code": "invalid_value"}}, False),
        ({"error": "prompt over the context window"}, True),  # some send the message alone
        ({"detail": "maximum context length"}, False),
        ([], False),
        # Gemini's OpenAI endpoint: the error in a list.
        ([{"error": {"code": 400, "message": "The input token count (9) exceeds ..."}}], True),
        ([{"error": {"code": 400, "message": "temperature"}}, {}], False),
        ({"error": {"message": "prompt is too long: 9 tokens > 8 maximum"}}, True),  # Anthropic
        (
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "input length and `max_tokens` exceed context limit: 9 + 8 > 16, "
                    "decrease input length or `max_tokens` and try again",
                },
            },
            True,
        ),
        # Moonshot's (Kimi's): neither code nor type says it, the message does.
        (
            {
                "error": {
                    "message": "Invalid request: Your request exceeded model token limit: "
                    "262144 (requested: 300000)",
                    "type": "invalid_request_error",
                }
            },
            True,
        ),
    ],
)
def test_says_context_exceeded(body: Any, expected: bool) -> None:
    assert says_context_exceeded(json.dumps(body).encode()) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # llama-cpp-python's server (the local model), as its real server writes it.
        (
            {
                "error": {
                    "message": "This model's maximum context length is 512 tokens. However, you "
                    "requested 818 tokens (810 in the messages, 8 in the completion). Please "
                    "reduce the length of the messages or completion.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            (512, 810),
        ),
        # vLLM before 0.10: its error object bare.
        (
            {
                "object": "error",
                "message": "This model's maximum context length is 1024 tokens. However, you "
                "requested 1100 tokens (1000 in the messages, 100 in the completion).",
            },
            (1024, 1000),
        ),
        # OpenAI's other wording: its first count is the whole prompt, functions included.
        (
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens. However, "
                    "your messages resulted in 8367 tokens (8000 in the messages, 367 in the "
                    "functions). Please reduce the length of the messages or functions.",
                    "code": "context_length_exceeded",
                }
            },
            (8192, 8367),
        ),
        # OpenAI's first wording with tools: the prompt is the messages and the functions.
        (
            {
                "error": {
                    "message": "This model's maximum context length is 16385 tokens. However, "
                    "you requested 16610 tokens (14138 in the messages, 226 in the functions, "
                    "and 2246 in the completion). Please reduce the length of the messages, "
                    "functions, or completion.",
                    "code": "context_length_exceeded",
                }
            },
            (16385, 14364),
        ),
        # OpenRouter's: its estimate of the text and of the tools, the prompt both.
        (
            {
                "error": {
                    "message": "This endpoint's maximum context length is 256000 tokens. "
                    "However, you requested about 424983 tokens (358454 of text input, 56529 "
                    "of tool input, 10000 in the output). Please reduce the length of either "
                    'one, or use the "middle-out" transform to compress your prompt '
                    "automatically.",
                    "code": 400,
                }
            },
            (256000, 414983),
        ),
        (
            {
                "error": {
                    "message": "This endpoint's maximum context length is 131072 tokens. "
                    "However, you requested about 139521 tokens (138021 of text input, 1500 "
                    "in the output).",
                    "code": 400,
                }
            },
            (131072, 138021),
        ),
        # Mistral's, with the draft tokens some of its servers add and without.
        (
            {
                "object": "error",
                "message": "Prompt contains 40000 tokens and 0 draft tokens, too large for "
                "model with 32768 maximum context length",
                "type": "invalid_request_error",
                "code": 3051,
            },
            (32768, 40000),
        ),
        (
            {
                "error": {
                    "message": "Prompt contains 300000 tokens, too large for model with "
                    "131072 maximum context length"
                }
            },
            (131072, 300000),
        ),
        # vLLM since 0.10: a prompt over the window, and a max_tokens too large for it.
        (
            {
                "error": {
                    "message": "This model's maximum context length is 2048 tokens. However, "
                    "your request has 3000 input tokens. Please reduce the length of the "
                    "input messages.",
                    "type": "BadRequestError",
                    "code": 400,
                }
            },
            (2048, 3000),
        ),
        (
            {
                "error": {
                    "message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. "
                    "This model's maximum context length is 4096 tokens and your request has "
                    "2778 input tokens (8000 > 4096 - 2778). None",
                    "type": "BadRequestError",
                    "code": 400,
                }
            },
            (4096, 2778),
        ),
        # llama.cpp's own server: the counts beside its message.
        (
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 1100,
                    "n_ctx": 1024,
                }
            },
            (1024, 1100),
        ),
        # Gemini's OpenAI endpoint, its error in a list: the prompt's count, then its limit.
        (
            [
                {
                    "error": {
                        "code": 400,
                        "message": "The input token count (1048577) exceeds the maximum "
                        "number of tokens allowed (1048576).",
                        "status": "INVALID_ARGUMENT",
                    }
                }
            ],
            (1048576, 1048577, True),
        ),
        # Anthropic's: the prompt alone over the window, and with its max_tokens (the
        # backticks left out, as some relays write it).
        (
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 210000 tokens > 200000 maximum",
                },
            },
            (200000, 210000),
        ),
        (
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "input length and `max_tokens` exceed context limit: 198000 + "
                    "8192 > 200000, decrease input length or `max_tokens` and try again",
                },
            },
            (200000, 198000),
        ),
        (
            {"error": "input length and max_tokens exceed context limit: 90402 + 116650 > 204648"},
            (204648, 90402),
        ),
        # TGI's (its 422 sends the message alone): the window first, then the prompt's
        # count; over its `--max-input-tokens`, that limit and the count.
        (
            {
                "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be "
                "<= 2048. Given: 3474 `inputs` tokens and 60 `max_new_tokens`",
                "error_type": "validation",
            },
            (2048, 3474),
        ),
        (
            {"error": "`inputs` tokens + `max_new_tokens`  must be <= 1512. Given: 603 `inputs "},
            (1512, 603),
        ),
        (
            {
                "error": "Input validation error: `inputs` must have less than 2048 tokens. "
                "Given: 2222",
                "error_type": "validation",
            },
            (2048, 2222, True),
        ),
        # Moonshot's (Kimi's): its window, and its count of the prompt and the max_tokens
        # together (a fourth True).
        (
            {
                "error": {
                    "message": "Invalid request: Your request exceeded model token limit: "
                    "262144 (requested: 300000)",
                    "type": "invalid_request_error",
                }
            },
            (262144, 300000, False, True),
        ),
        # The window alone, or no count at all: nothing to go by.
        ({"error": {"message": "This model's maximum context length is 8192 tokens"}}, None),
        ({"error": {"message": "Your request exceeded model token limit: 8192"}}, None),
        ({"error": {"message": "prompt is too long: 9 tokens"}}, None),
        ({"error": {"message": "...", "code": "context_length_exceeded"}}, None),
        ({"error": "prompt over the context window"}, None),
    ],
)
def test_context_counts(body: Any, expected: tuple[int, ...] | None) -> None:
    """The window (or, a third True, the limit on the prompt alone) and prompt count (or,
    a fourth True, the prompt's and the answer's together) a refusal states, where it
    states both."""
    counts = context_counts(json.dumps(body).encode())
    assert counts == (None if expected is None else ContextCounts(*expected))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # OpenAI's account with no quota left: its code and its type say so.
        (
            {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
            True,
        ),
        ({"error": {"message": "...", "type": "insufficient_quota", "code": None}}, True),
        # A rate limit proper: wait and retry.
        ({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}, False),
        ({"error": "insufficient_quota"}, False),  # no object to name a code
        ([], False),
    ],
)
def test_says_out_of_credit(body: Any, expected: bool) -> None:
    assert says_out_of_credit(json.dumps(body).encode()) is expected


@pytest.mark.parametrize(("status", "expected"), [(400, True), (422, True), (404, False)])
def test_a_refusal_as_too_long_comes_as_a_400_or_tgis_422(status: int, expected: bool) -> None:
    body = b'{"error": "`inputs` tokens + `max_new_tokens` must be <= 4096", "error_type": "x"}'
    assert says_context_exceeded(body, status) is expected


def test_a_422_says_too_long_only_in_tgis_words() -> None:
    """422 is TGI's status for any invalid input: a message that merely names the context
    length there is some other field's refusal, not the prompt over the window."""
    body = b'{"error": {"message": "context length field must be an integer"}}'
    assert says_context_exceeded(body, 400)
    assert not says_context_exceeded(body, 422)
    assert not says_context_exceeded(b'{"error": {"code": "context_length_exceeded"}}', 422)


MODEL, PATH = Missing.MODEL, Missing.PATH


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # OpenAI's (and Groq's) 404 for a model the key cannot reach.
        (
            404,
            {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}},
            MODEL,
        ),
        # vLLM's bare error object; Azure's deployment unknown; Ollama's; Anthropic's.
        (404, {"object": "error", "message": "The model `x` does not exist.", "code": 404}, MODEL),
        (404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment"}}, MODEL),
        (404, {"error": {"message": 'model "x" not found, try pulling it first'}}, MODEL),
        (404, {"error": {"type": "not_found_error", "message": "model: claude-x"}}, MODEL),
        # A path the server does not route: llama.cpp's, OpenAI's, Azure's, FastAPI's.
        (
            404,
            {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}},
            PATH,
        ),
        (404, {"error": {"message": "Invalid URL (POST /v1/chat/completion)", "code": None}}, PATH),
        (404, {"error": {"code": "404", "message": "Resource not found"}}, PATH),
        (404, {"detail": "Not Found"}, PATH),
        # A 400 saying so: its code, DeepSeek's, Ollama's, Mistral's, OpenRouter's words.
        (400, {"error": {"message": "no access", "code": "model_not_found"}}, MODEL),
        (400, {"error": {"message": "Model Not Exist", "type": "invalid_request_error"}}, MODEL),
        (400, {"error": "model 'llama3' not found, try pulling it first"}, MODEL),
        (400, {"object": "error", "message": "Invalid model: mistral-x", "code": "1500"}, MODEL),
        (400, {"error": {"message": "x/y is not a valid model ID", "code": 400}}, MODEL),
        # A 400 about the request fails the same on every upstream.
        (
            400,
            {"error": {"message": "Invalid 'temperature': above 2", "param": "temperature"}},
            None,
        ),
        (400, {"error": {"message": "This model's maximum context length is 8192 tokens"}}, None),
        (422, {"error": {"message": "The model `x` does not exist"}}, None),
    ],
)
def test_what_is_missing(status: int, body: Any, expected: Missing | None) -> None:
    assert what_is_missing(json.dumps(body).encode(), status) is expected


def test_a_404_that_is_not_json_says_its_path_is_missing() -> None:
    """A wrong base_url's page (a proxy's, Ollama's text) names no model; an empty 404
    says nothing (its body may not have come in time)."""
    assert what_is_missing(b"<html>404 Not Found</html>", 404) is PATH
    assert what_is_missing(b"404 page not found", 404) is PATH
    assert what_is_missing(b"", 404) is None


@pytest.mark.parametrize("body", [b"", b"<html>Bad Request</html>", b"\xff\xfe"])
def test_a_body_that_is_not_json_says_nothing(body: bytes) -> None:
    assert not says_context_exceeded(body)
    assert not says_out_of_credit(body)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"error": {"code": 429, "message": "slow down"}}', 429),
        (b'{"error": {"code": "503", "message": "overloaded"}}', 503),
        (b'{"error": {"code": 200, "message": "odd"}}', 502),
        (b'{"error": {"type": "invalid_request_error", "message": "bad"}}', 400),
        (b'{"error": {"code": "invalid_api_key"}}', 401),
        (b'{"error": {"code": "context_length_exceeded"}}', 400),
        (b'{"error": "maximum context length is 8192 tokens"}', 400),
        (b'{"error": "something broke"}', 502),
        (b'{"object": "error", "message": "bare vLLM", "code": 500}', 500),
        (b'{"error": {"message": "The server had an error", "type": "server_error"}}', 502),
        (b'{"error": null}', None),
        (b'{"choices": []}', None),
        (b"not json", None),
    ],
)
def test_error_status_reads_an_error_sent_in_place_of_an_answer(
    body: bytes, status: int | None
) -> None:
    """The status an error body stands for: its code when that is one, else what its
    code or type names, else 502; None when the body holds no error."""
    assert error_status(body) == status


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "chatcmpl-1", "choices": []}', True),
        (b'{"id": "chatcmpl-1", "choices": [{"ind', True),
        (b'{"id": "chatcmpl-1", "choices": [{"index": 0, ', True),
        ('{"choices": [{"message": {"content": "你好'.encode()[:-1], True),
        (b"", True),
        (b"{not json", False),
        (b"<html>login</html>", False),
        (b"  <!DOCTYPE html>", False),
        (b'{"id": "chatcmpl-1"} and then some', False),
    ],
    ids=[
        "json",
        "cut-in-a-key",
        "cut-after-a-comma",
        "cut-in-a-character",
        "empty",
        "not-json",
        "html",
        "html-after-spaces",
        "json-then-text",
    ],
)
def test_is_json_or_cut(body: bytes, expected: bool) -> None:
    """JSON, or JSON that only ends too soon (even within a UTF-8 character), is what a
    provider sent; anything that goes wrong before its end is some other server's."""
    assert is_json_or_cut(body) is expected


EMOJI = "\U0001f600"


def delta_event(delta: dict[str, Any]) -> str:
    """A streamed chunk with `delta`, as SSE data; json writes a lone half as its escape."""
    return json.dumps({"id": "c1", "model": "m1", "choices": [{"index": 0, "delta": delta}]})


def call_piece(arguments: str, *, call_id: str = "", name: str = "") -> dict[str, Any]:
    """A delta of one tool-call piece at index 0."""
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {
        "tool_calls": [{"index": 0, **({"id": call_id} if call_id else {}), "function": function}]
    }


def relayed(events: list[str]) -> tuple[str, str, str]:
    """The text, reasoning and tool-call arguments a stream of `events` relays, with what
    its end releases."""
    parser = StreamParser()
    chunks = [chunk for chunk in map(parser.parse, events) if chunk is not None]
    if (last := parser.lone_halves()) is not None:
        chunks.append(last)
    return (
        "".join(chunk.content for chunk in chunks),
        "".join(chunk.reasoning for chunk in chunks),
        "".join(piece.arguments for chunk in chunks for piece in chunk.tool_calls),
    )


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([chunk("a\ud83d"), chunk("\ude00b")], (f"a{EMOJI}b", "", ""), id="text"),
        pytest.param([chunk("a\ud83d"), chunk("b")], ("a\ufffdb", "", ""), id="then-text"),
        pytest.param([chunk("a\ud83d"), chunk(finish="stop")], ("a\ufffd", "", ""), id="at-end"),
        pytest.param([chunk("\ude00a")], ("\ufffda", "", ""), id="second-half-alone"),
        pytest.param([chunk("a\ud83d\ud83db")], ("a\ufffd\ufffdb", "", ""), id="inside"),
        pytest.param(
            [chunk("\ud83d"), chunk(f"{EMOJI}")], (f"\ufffd{EMOJI}", "", ""), id="then-a-pair"
        ),
        pytest.param(
            [delta_event({"reasoning_content": "a\ud83d"}), delta_event({"reasoning": "\ude00"})],
            ("", f"a{EMOJI}", ""),
            id="reasoning",
        ),
        pytest.param(
            [delta_event({"content": "a\ud83d", "refusal": "\ude00"})],
            (f"a{EMOJI}", "", ""),
            id="text-and-refusal",
        ),
        pytest.param(
            [
                delta_event(call_piece('{"q":"\ud83d', call_id="call_1", name="f")),
                delta_event(call_piece('\ude00"}')),
            ],
            ("", "", f'{{"q":"{EMOJI}"}}'),
            id="arguments",
        ),
        pytest.param(
            [
                delta_event(call_piece('{"q":"\ud83d')),
                delta_event(call_piece('\ude00"}', call_id="call_1", name="f")),
            ],
            ("", "", f'{{"q":"{EMOJI}"}}'),
            id="arguments-held-till-the-name",
        ),
        pytest.param(
            [
                delta_event(call_piece("\ud83d", call_id="call_1", name="f")),
                delta_event(call_piece("{}", call_id="call_2", name="g")),
            ],
            ("", "", "\ufffd{}"),
            id="arguments-of-a-call-that-ended",
        ),
        pytest.param(
            [
                delta_event({"content": [{"type": "text", "text": "a\ud83d"}]}),
                delta_event({"content": "\ude00b"}),
            ],
            (f"a{EMOJI}b", "", ""),
            id="text-part-then-text",
        ),
        pytest.param(
            [delta_event({"content": [{"text": "a\ud83d"}, {"text": "\ude00b"}]})],
            (f"a{EMOJI}b", "", ""),
            id="where-two-parts-meet",
        ),
        pytest.param(
            [
                delta_event({"content": [{"type": "thinking", "thinking": [{"text": "a\ud83d"}]}]}),
                delta_event({"content": [{"type": "thinking", "thinking": "\ude00"}]}),
            ],
            ("", f"a{EMOJI}", ""),
            id="thinking-parts",
        ),
    ],
)
def test_stream_parser_pairs_utf16_halves_across_events(
    events: list[str], expected: tuple[str, str, str]
) -> None:
    """A character cut into its UTF-16 halves across events, in any text field, comes out
    whole; a half that no other half completes comes out as U+FFFD."""
    assert relayed(events) == expected


def _parts_answer(message: dict[str, Any]) -> bytes:
    return completion_json(choices=[{"index": 0, "message": message, "finish_reason": "stop"}])


def _thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(
            {"content": [_thinking("hmm"), {"type": "text", "text": "Paris."}]},
            ("Paris.", "hmm"),
            id="magistral",
        ),
        pytest.param(
            {"content": [{"thinking": [{"text": "hmm"}]}, {"text": "Paris."}]},
            ("Paris.", "hmm"),
            id="parts-without-their-type",
        ),
        pytest.param(
            {"content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "P"}]},
            ("P", "hmm"),
            id="thinking-as-text",
        ),
        pytest.param(
            {
                "content": [
                    {"type": "thinking", "thinking": [{"type": "reference"}, {"text": "hmm"}]},
                    {"type": "reference", "reference_ids": [1]},
                    {"type": "text", "text": "Paris."},
                ]
            },
            ("Paris.", "hmm"),
            id="references-skipped",
        ),
        pytest.param(
            {"reasoning_content": "so ", "content": [_thinking("hmm"), {"text": "P"}]},
            ("P", "so hmm"),
            id="after-a-reasoning-field",
        ),
        pytest.param({"content": []}, ("", ""), id="no-parts"),
    ],
)
def test_parse_completion_reads_content_parts(
    message: dict[str, Any], expected: tuple[str, str]
) -> None:
    """Content given as a list of typed parts (Mistral's) is its text parts' text, the
    thinking parts' text its reasoning; other parts are skipped."""
    reply = parse_completion(_parts_answer({"role": "assistant", **message}))
    assert (reply.content, reply.reasoning) == expected


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param([5], "a content part is not an object", id="part-not-object"),
        pytest.param([{"type": "text", "text": 5}], "text is not a string", id="text-number"),
        pytest.param(
            [{"type": "thinking", "thinking": 5}], "not a list of parts", id="thinking-number"
        ),
        pytest.param(
            [{"type": "image_url", "image_url": {}}, {"type": "reference"}],
            "no text or thinking part, only: image_url, reference",
            id="nothing-readable",
        ),
    ],
)
def test_parse_completion_refuses_unreadable_content_parts(content: Any, problem: str) -> None:
    """Parts that are not objects, or text that is not a string, are malformed; and so is
    an answer of parts none of which can be read."""
    with pytest.raises(MalformedReply, match=problem):
        parse_completion(_parts_answer({"role": "assistant", "content": content}))


def test_an_answer_of_unreadable_parts_and_a_tool_call_stands() -> None:
    """An image part beside a tool call skips the image: the call is the answer."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    image = {"type": "image_url", "image_url": {}}
    reply = parse_completion(_parts_answer({"content": [image], "tool_calls": [call]}))
    assert ([c.name for c in reply.tool_calls], reply.content) == (["f"], "")


def test_a_stream_of_unreadable_parts_alone_is_malformed_at_its_end() -> None:
    """A stream whose content parts all were skipped relayed nothing: its end is malformed,
    where a part skipped beside text is not."""
    image = {"type": "image_url", "image_url": {}}
    parser = StreamParser()
    assert parser.parse(delta_event({"content": [image]})) is None
    parser.parse(chunk(finish="stop"))
    with pytest.raises(MalformedReply, match="only: image_url"):
        parser.end()
    parser = StreamParser()
    parser.parse(delta_event({"content": [image]}))
    assert parser.parse(delta_event({"content": [{"text": "Hi"}]})) == TextChunk("Hi")
    parser.parse(chunk(finish="stop"))
    assert parser.end().finish_reason is FinishReason.STOP


def test_a_legacy_function_call_is_one_tool_call_with_an_id() -> None:
    """`message.function_call` is one tool call, given an id, finished as tool calls."""
    message = {"content": None, "function_call": {"name": "f", "arguments": '{"a": 1}'}}
    body = completion_json(
        choices=[{"index": 0, "message": message, "finish_reason": "function_call"}]
    )
    reply = parse_completion(body)
    (call,) = reply.tool_calls
    assert (call.name, call.arguments, call.id[:5], len(call.id)) == ("f", '{"a": 1}', "call_", 29)
    assert reply.finish_reason is FinishReason.TOOL_CALLS
    assert parse_completion(body).tool_calls[0].id != call.id, "each answer's call its own id"


def test_a_streamed_legacy_function_call_named_late_is_held_until_named() -> None:
    """`delta.function_call` pieces are one call's: arguments before the name are held and
    go out with it, the id the gateway's, and the stream ends as a tool-call answer."""
    parser = StreamParser()
    assert parser.parse(delta_event({"function_call": {"arguments": '{"a"'}})) is None
    first = parser.parse(delta_event({"function_call": {"name": "f", "arguments": ": 1"}}))
    later = parser.parse(delta_event({"function_call": {"arguments": "}"}}))
    assert first is not None
    assert later is not None
    ((head,), (tail,)) = first.tool_calls, later.tool_calls
    assert (head.index, head.name, head.arguments, head.id[:5]) == (0, "f", '{"a": 1', "call_")
    assert (tail.index, tail.id, tail.arguments) == (0, "", "}")
    parser.parse(chunk(finish="function_call"))
    assert parser.end().finish_reason is FinishReason.TOOL_CALLS


def test_a_streamed_function_call_without_a_name_is_malformed_at_the_end() -> None:
    """A legacy call that never got its name fails as a tool call without one does."""
    parser = StreamParser()
    parser.parse(delta_event({"function_call": {"arguments": "{}"}}))
    parser.parse(chunk(finish="function_call"))
    with pytest.raises(MalformedReply, match="no function name"):
        parser.end()


def test_stream_parser_holds_nothing_back_from_events_without_halves() -> None:
    """Text of events without a lone half passes as it came, the emoji whole."""
    parser = StreamParser()
    assert parser.parse(chunk(f"a{EMOJI}")) == TextChunk(f"a{EMOJI}")
    assert parser.lone_halves() is None


def test_parse_completion_makes_each_lone_half_a_replacement_character() -> None:
    """A unary answer with lone halves in its fields is read, each half U+FFFD."""
    message = {"role": "assistant", "content": "a\ud83db", "reasoning_content": "\ude00"}
    body = completion_json(
        model="m\ud83d",
        choices=[{"index": 0, "message": message, "finish_reason": "stop"}],
    )
    reply = parse_completion(body)
    assert (reply.content, reply.reasoning, reply.model) == ("a\ufffdb", "\ufffd", "m\ufffd")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"x": "\\ud83d", "y": NaN}', id="nan"),
        pytest.param(b'{"x": "\\ud83d"', id="cut"),
        pytest.param(b'{"x": "\xff\\ud83d"}', id="not-utf-8"),
    ],
)
def test_parse_completion_with_a_lone_half_is_still_refused_when_no_json(body: bytes) -> None:
    """The slower parser that takes lone halves takes nothing else orjson refuses."""
    with pytest.raises(MalformedReply, match="not valid JSON"):
        parse_completion(body)
