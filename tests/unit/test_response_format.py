"""JSON mode and structured outputs: validation, the upstream body and the cache key."""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest

from service.cache import cache_key
from service.cache.keys import canonical_request
from service.config import RequestDefaults
from service.context_window import fit_messages
from service.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    TruncationMode,
)
from service.errors import ContextWindowExceeded
from service.tokens import estimate_prompt_tokens
from service.upstream.openai_json import request_body
from service.validation import chat_request_violations

SCHEMA = '{"type":"object","properties":{"age":{"type":"integer","maximum":150}}}'
BASE = ChatRequest(
    model="m",
    messages=(Message(Role.USER, "Answer in JSON"),),
    params=GenerationParams(temperature=0.0),
)


def with_format(response_format: ResponseFormat | None) -> ChatRequest:
    """The base request with `response_format`."""
    return dataclasses.replace(
        BASE, params=dataclasses.replace(BASE.params, response_format=response_format)
    )


def schema_format(**fields: object) -> ResponseFormat:
    """A JSON_SCHEMA format with `SCHEMA`, changed by `fields`."""
    values: dict[str, object] = {"type": ResponseFormatType.JSON_SCHEMA, "json_schema": SCHEMA}
    values.update(fields)
    return ResponseFormat(**values)  # type: ignore[arg-type]


def body_of(request: ChatRequest) -> bytes:
    return request_body(request, upstream_model="up", stream=False)


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (ResponseFormat(ResponseFormatType.TEXT), {"type": "text"}),
        (ResponseFormat(ResponseFormatType.JSON_OBJECT), {"type": "json_object"}),
        (
            schema_format(),
            {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA}},
        ),
        (
            schema_format(schema_name="person", is_strict=True),
            {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
            },
        ),
    ],
)
def test_body_carries_the_response_format(
    response_format: ResponseFormat, expected: dict[str, object]
) -> None:
    """Each format is sent as OpenAI spells it; a schema goes as JSON, not as a string."""
    body = json.loads(body_of(with_format(response_format)))
    schema = expected.get("json_schema")
    if isinstance(schema, dict):
        schema["schema"] = json.loads(SCHEMA)
    assert body["response_format"] == expected


def test_body_sends_the_schema_as_the_caller_wrote_it() -> None:
    """The schema's bytes reach the upstream unchanged: key order, integers, spacing."""
    written = '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}'
    body = body_of(with_format(schema_format(json_schema=written)))
    assert b'"schema":' + written.encode() in body


def test_body_without_a_format_has_none() -> None:
    """An unset format is not sent."""
    assert "response_format" not in orjson.loads(body_of(BASE))


@pytest.mark.parametrize(
    ("response_format", "fields"),
    [
        (schema_format(json_schema=""), ["params.response_format.json_schema"]),
        (schema_format(json_schema="[1, 2]"), ["params.response_format.json_schema"]),
        (schema_format(json_schema='"object"'), ["params.response_format.json_schema"]),
        (schema_format(json_schema="{'type': 'object'}"), ["params.response_format.json_schema"]),
        (schema_format(json_schema='{"a": 1'), ["params.response_format.json_schema"]),
        (schema_format(schema_name="has space"), ["params.response_format.schema_name"]),
        (schema_format(schema_name="n" * 65), ["params.response_format.schema_name"]),
        (
            ResponseFormat(ResponseFormatType.JSON_OBJECT, json_schema=SCHEMA),
            ["params.response_format.json_schema"],
        ),
        (
            ResponseFormat(ResponseFormatType.TEXT, schema_name="x", is_strict=True),
            ["params.response_format.schema_name", "params.response_format.strict"],
        ),
    ],
)
def test_each_bad_format_is_named(response_format: ResponseFormat, fields: list[str]) -> None:
    """A schema must be a JSON object and belongs, with its name and `strict`, to
    JSON_SCHEMA alone."""
    violations = chat_request_violations(with_format(response_format), RequestDefaults())
    assert [v.field for v in violations] == fields


def test_a_schema_over_the_request_size_is_refused() -> None:
    """A schema is bounded like the messages' text."""
    limits = RequestDefaults(max_request_bytes=1024)
    big = json.dumps({"description": "x" * 1024})
    violations = chat_request_violations(with_format(schema_format(json_schema=big)), limits)
    assert [v.field for v in violations] == ["params.response_format.json_schema"]
    assert "at most 1024 bytes" in violations[0].description


@pytest.mark.parametrize(
    "response_format",
    [
        ResponseFormat(ResponseFormatType.TEXT),
        ResponseFormat(ResponseFormatType.JSON_OBJECT),
        schema_format(),
        schema_format(schema_name="Person_v2-1", is_strict=True),
    ],
)
def test_good_formats_are_valid(response_format: ResponseFormat) -> None:
    """Every well-formed format passes validation."""
    assert chat_request_violations(with_format(response_format), RequestDefaults()) == []


def test_every_format_has_its_own_cache_key() -> None:
    """Unset, JSON mode, and schemas differing in text, name or `strict` never share an
    answer."""
    variants = [
        None,
        ResponseFormat(ResponseFormatType.JSON_OBJECT),
        schema_format(),
        schema_format(json_schema='{"type":"object"}'),
        schema_format(schema_name="person"),
        schema_format(is_strict=True),
    ]
    keys = {cache_key(with_format(variant), prefix="p") for variant in variants}
    assert len(keys) == len(variants)


def test_a_text_format_shares_the_unset_formats_key() -> None:
    """Text asks for what an unset format does: one entry serves both, with or without an
    effort."""
    text = with_format(ResponseFormat(ResponseFormatType.TEXT))
    for effort in (None, ReasoningEffort.HIGH):
        pair = [
            dataclasses.replace(
                request, params=dataclasses.replace(request.params, reasoning_effort=effort)
            )
            for request in (text, BASE)
        ]
        assert canonical_request(pair[0]) == canonical_request(pair[1])


def test_every_reasoning_effort_has_its_own_cache_key() -> None:
    """Unset and each effort, alone and with a format, never share an answer."""
    variants = [None, *ReasoningEffort]
    keys = {
        cache_key(
            dataclasses.replace(
                request,
                params=dataclasses.replace(request.params, reasoning_effort=effort),
            ),
            prefix="p",
        )
        for effort in variants
        for request in (BASE, with_format(ResponseFormat(ResponseFormatType.JSON_OBJECT)))
    }
    assert len(keys) == 2 * len(variants)


def test_keys_of_requests_without_a_format_are_unchanged() -> None:
    """Adding the format left every other request's key as before, so a shared cache keeps
    its entries across the upgrade."""
    assert canonical_request(BASE) == orjson.dumps(
        [1, "default", "m", [["user", "Answer in JSON"]], [0.0, None, None, [], None, None, None]]
    )


BIG_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "x " * 20} for i in range(60)
        },
    }
)


def test_a_schema_counts_in_the_prompt_estimate_and_json_mode_does_not() -> None:
    """Providers put the schema in the prompt: the estimate (and so the context window,
    budgets and limits) counts it as it counts tool definitions."""
    plain = estimate_prompt_tokens(BASE.messages)
    schema = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema=BIG_SCHEMA)
    assert estimate_prompt_tokens(BASE.messages, (), schema) > plain + 1000
    json_mode = ResponseFormat(ResponseFormatType.JSON_OBJECT)
    assert estimate_prompt_tokens(BASE.messages, (), json_mode) == plain


def test_a_schema_that_does_not_fit_the_window_is_refused_and_always_kept() -> None:
    """The schema is part of the prompt's fixed cost: over the window it is refused
    with the messages' estimate, and under KEEP_RECENT old turns go, never the schema."""
    schema = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema=BIG_SCHEMA)
    messages = (
        Message(Role.USER, "old " * 300),
        Message(Role.ASSISTANT, "old answer " * 100),
        Message(Role.USER, "Answer in JSON"),
    )
    window = 3500  # the schema alone is about 3,000 tokens, the messages 620
    fits = fit_messages(messages, context_window=window, max_tokens=None, mode=TruncationMode.NONE)
    assert fits.dropped == 0
    with pytest.raises(ContextWindowExceeded):
        fit_messages(
            messages,
            response_format=schema,
            context_window=window,
            max_tokens=None,
            mode=TruncationMode.NONE,
        )
    kept = fit_messages(
        messages,
        response_format=schema,
        context_window=window,
        max_tokens=None,
        mode=TruncationMode.KEEP_RECENT,
    )
    assert kept.messages == messages[2:]
    assert kept.prompt_tokens > estimate_prompt_tokens(messages[2:]) + 1000


def test_a_schema_counts_in_a_tenants_token_demand() -> None:
    """A tenant's tokens-per-minute demand counts the schema, as the estimate does."""
    from llmgateway.v1 import gateway_pb2 as pb
    from service.caller_gate import demand_of

    plain = pb.CompleteRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
    with_schema = pb.CompleteRequest()
    with_schema.CopyFrom(plain)
    with_schema.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    with_schema.params.response_format.json_schema = BIG_SCHEMA
    json_mode = pb.CompleteRequest()
    json_mode.CopyFrom(plain)
    json_mode.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    assert demand_of(with_schema).tokens > demand_of(plain).tokens + 1000
    assert demand_of(json_mode).tokens == demand_of(plain).tokens
