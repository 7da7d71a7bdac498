"""Unit tests for field-by-field request validation (service.validation)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.config import RequestDefaults
from service.domain import (
    CachePolicy,
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    ToolCall,
)
from service.errors import FieldViolation, InvalidRequest
from service.ledger import OVERFLOW_LABELS
from service.validation import (
    RESERVED_LABEL_PREFIX,
    chat_request_violations,
    validate_chat_request,
)

LIMITS = RequestDefaults()
BASE = ChatRequest(model="deepseek-v4", messages=(Message(Role.USER, "Hello"),))


def with_params(**params: Any) -> ChatRequest:
    """The valid base request with generation `params` set."""
    return dataclasses.replace(BASE, params=GenerationParams(**params))


def with_messages(*contents: str) -> ChatRequest:
    """The valid base request with one user message per content."""
    return dataclasses.replace(BASE, messages=tuple(Message(Role.USER, c) for c in contents))


def fields_of(request: ChatRequest, limits: RequestDefaults = LIMITS) -> list[str]:
    """The field paths of every violation of `request`."""
    return [v.field for v in chat_request_violations(request, limits)]


def test_valid_request_has_no_violations() -> None:
    """A plain request with one message is valid."""
    assert chat_request_violations(BASE, LIMITS) == []
    validate_chat_request(BASE, LIMITS)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(dataclasses.replace(BASE, model=""), "model", id="model-empty"),
        pytest.param(dataclasses.replace(BASE, model="m" * 257), "model", id="model-too-long"),
        pytest.param(dataclasses.replace(BASE, model="gpt\x00-4"), "model", id="model-nul"),
        pytest.param(dataclasses.replace(BASE, model="gpt\n4"), "model", id="model-newline"),
        pytest.param(dataclasses.replace(BASE, model="gpt\t4"), "model", id="model-tab"),
        pytest.param(dataclasses.replace(BASE, messages=()), "messages", id="no-messages"),
        pytest.param(with_messages(""), "messages[0].content", id="content-empty"),
        pytest.param(
            with_messages("\u200b\u2060\ufeff "), "messages[0].content", id="content-invisible"
        ),
        pytest.param(with_messages("ok", " \n\t "), "messages[1].content", id="content-blank"),
        pytest.param(with_messages("a\x07b"), "messages[0].content", id="content-bell"),
        pytest.param(with_messages("a\x1bb"), "messages[0].content", id="content-escape"),
        pytest.param(with_messages("a\x7fb"), "messages[0].content", id="content-del"),
        pytest.param(with_messages("a\x85b"), "messages[0].content", id="content-c1"),
        pytest.param(
            dataclasses.replace(BASE, messages=(Message(Role.SYSTEM, "a\x1bb"),)),
            "messages[0].content",
            id="system-content-escape",
        ),
        pytest.param(with_params(temperature=-0.01), "params.temperature", id="temp-low"),
        pytest.param(with_params(temperature=2.01), "params.temperature", id="temp-high"),
        pytest.param(with_params(temperature=float("nan")), "params.temperature", id="temp-nan"),
        pytest.param(with_params(temperature=float("inf")), "params.temperature", id="temp-inf"),
        pytest.param(with_params(top_p=0.0), "params.top_p", id="top-p-zero"),
        pytest.param(with_params(top_p=1.0001), "params.top_p", id="top-p-high"),
        pytest.param(with_params(top_p=-1.0), "params.top_p", id="top-p-negative"),
        pytest.param(
            with_params(presence_penalty=-2.5), "params.presence_penalty", id="presence-low"
        ),
        pytest.param(
            with_params(presence_penalty=2.5), "params.presence_penalty", id="presence-high"
        ),
        pytest.param(
            with_params(frequency_penalty=-2.01), "params.frequency_penalty", id="frequency-low"
        ),
        pytest.param(
            with_params(frequency_penalty=float("-inf")),
            "params.frequency_penalty",
            id="frequency-inf",
        ),
        pytest.param(with_params(max_tokens=0), "params.max_tokens", id="max-tokens-zero"),
        pytest.param(with_params(max_tokens=-5), "params.max_tokens", id="max-tokens-negative"),
        pytest.param(
            with_params(max_tokens=1_000_001), "params.max_tokens", id="max-tokens-over-cap"
        ),
        pytest.param(with_params(stop=("a", "b", "c", "d", "e")), "params.stop", id="stop-many"),
        pytest.param(with_params(stop=("ok", "")), "params.stop[1]", id="stop-empty"),
        pytest.param(with_params(stop=("x" * 257,)), "params.stop[0]", id="stop-too-long"),
        pytest.param(
            dataclasses.replace(BASE, labels={"bad key": "v"}), "labels['bad key']", id="label-key"
        ),
        pytest.param(dataclasses.replace(BASE, labels={"": "v"}), "labels['']", id="label-empty"),
        pytest.param(
            dataclasses.replace(BASE, labels={"team\n": "v"}),
            "labels['team\\n']",
            id="label-key-trailing-newline",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"k" * 65: "v"}),
            f"labels[{'k' * 64!r}]",
            id="label-key-too-long-cut-in-path",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"llm_gateway.overflow": "true"}),
            "labels['llm_gateway.overflow']",
            id="label-key-reserved",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"team": "x" * 257}),
            "labels['team']",
            id="label-value-too-long",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"team": "a\x00b"}),
            "labels['team']",
            id="label-value-control",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"team": "a\nb"}),
            "labels['team']",
            id="label-value-newline",
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={f"k{i}": "v" for i in range(33)}),
            "labels",
            id="labels-too-many",
        ),
        pytest.param(
            dataclasses.replace(BASE, idempotency_key="k" * 257),
            "idempotency_key",
            id="idempotency-too-long",
        ),
        pytest.param(
            dataclasses.replace(BASE, idempotency_key="abc\ndef"),
            "idempotency_key",
            id="idempotency-unprintable",
        ),
        pytest.param(
            dataclasses.replace(BASE, cache=CachePolicy(ttl_s=0)),
            "cache.ttl_seconds",
            id="ttl-zero",
        ),
    ],
)
def test_each_rule_names_its_field(request_: ChatRequest, field: str) -> None:
    """Each invalid field gives exactly one violation, at that field's path."""
    assert fields_of(request_) == [field]


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(dataclasses.replace(BASE, model="m" * 256), id="model-at-limit"),
        pytest.param(dataclasses.replace(BASE, model="org/model:v1.2"), id="model-punctuation"),
        pytest.param(with_messages("tab\tnew\nline\r\n"), id="content-whitespace-controls"),
        pytest.param(with_messages("Xin chào 世界 🌏"), id="content-unicode"),
        pytest.param(with_messages("\u200bhi\u2060"), id="content-visible-among-invisible"),
        # What the caller did not write comes back as it came (a model's answer, a tool's
        # output in a shell's colours).
        pytest.param(
            dataclasses.replace(
                BASE,
                messages=(
                    Message(Role.USER, "hi"),
                    Message(Role.ASSISTANT, "page\x0cbreak \x85"),
                    Message(Role.USER, "and?"),
                ),
            ),
            id="assistant-content-controls",
        ),
        pytest.param(with_params(temperature=0.0), id="temp-zero"),
        pytest.param(with_params(temperature=2.0), id="temp-max"),
        pytest.param(with_params(top_p=1e-9), id="top-p-tiny"),
        pytest.param(with_params(top_p=1.0), id="top-p-one"),
        pytest.param(with_params(presence_penalty=-2.0, frequency_penalty=2.0), id="penalty-ends"),
        pytest.param(with_params(max_tokens=1), id="max-tokens-one"),
        pytest.param(with_params(max_tokens=1_000_000), id="max-tokens-cap"),
        pytest.param(with_params(seed=-1), id="seed-any"),
        pytest.param(with_params(stop=("a", "b", "c", "d")), id="stop-at-limit"),
        pytest.param(with_params(stop=("x" * 256,)), id="stop-length-at-limit"),
        pytest.param(
            dataclasses.replace(BASE, labels={"team/a.b-c_d": "x" * 256}), id="label-at-limit"
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={f"k{i}": "v" for i in range(32)}), id="labels-32"
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"team": "Xin chào 世界"}), id="label-value-unicode"
        ),
        pytest.param(dataclasses.replace(BASE, idempotency_key="k" * 256), id="idempotency-256"),
        pytest.param(
            dataclasses.replace(BASE, cache=CachePolicy(ttl_s=30 * 24 * 3600)), id="ttl-max"
        ),
        pytest.param(dataclasses.replace(BASE, cache=CachePolicy(ttl_s=1)), id="ttl-one"),
    ],
)
def test_boundary_values_are_valid(request_: ChatRequest) -> None:
    """Values at the edge of each allowed range are accepted."""
    assert fields_of(request_) == []


def test_violation_description_says_what_is_wrong() -> None:
    """A range violation states the allowed range and the value received."""
    (violation,) = chat_request_violations(with_params(temperature=3.0), LIMITS)
    assert violation == FieldViolation("params.temperature", "must be in [0, 2], got 3.0")
    (violation,) = chat_request_violations(with_params(top_p=0.0), LIMITS)
    assert violation.description == "must be in (0, 1], got 0.0"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"maximum": 1e400}', "not read as JSON: number is infinity"),
        ('{"type": "object"', "not read as JSON: unexpected end of data"),
        ('["type", "object"]', "got a JSON array"),
        ("null", "got a JSON null"),
    ],
)
def test_a_schema_that_is_no_json_object_says_why(text: str, reason: str) -> None:
    """A tool's parameters or a response schema the gateway cannot send says what is
    wrong with it: `1e400` is valid JSON, but no number a parser keeps."""
    tool = dataclasses.replace(BASE, tools=(Tool("f", parameters=text),))
    (violation,) = chat_request_violations(tool, LIMITS)
    assert violation.field == "tools[0].parameters"
    assert reason in violation.description
    schema = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema=text, schema_name="s")
    (violation,) = chat_request_violations(with_params(response_format=schema), LIMITS)
    assert violation.field == "params.response_format.json_schema"
    assert reason in violation.description


def test_several_violations_reported_at_once_in_field_order() -> None:
    """Every invalid field is reported in one pass, in field order."""
    request = ChatRequest(
        model="",
        messages=(Message(Role.USER, "ok"), Message(Role.ASSISTANT, "")),
        params=GenerationParams(temperature=5.0, top_p=0.0, max_tokens=0, stop=("",)),
        cache=CachePolicy(ttl_s=0),
        labels={"bad key": "v"},
        idempotency_key="\x00",
    )
    assert fields_of(request) == [
        "model",
        "messages[1].content",
        "params.temperature",
        "params.top_p",
        "params.max_tokens",
        "params.stop[0]",
        "labels['bad key']",
        "idempotency_key",
        "cache.ttl_seconds",
    ]


def test_a_ttl_past_any_cap_is_valid_and_left_to_the_cache_to_cap() -> None:
    """`max_ttl_s` caps a request's TTL, and it may be configured past 30 days: a TTL
    longer than the cap is not an error (it was, past a fixed 30 days, whatever the cap)."""
    for ttl_s in (90 * 24 * 3600, 2**32 - 1):
        assert fields_of(dataclasses.replace(BASE, cache=CachePolicy(ttl_s=ttl_s))) == []


def test_validate_raises_with_prior_violations_first() -> None:
    """`validate_chat_request` raises one InvalidRequest with prior and found violations."""
    prior = [FieldViolation("messages[0].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")]
    with pytest.raises(InvalidRequest) as caught:
        validate_chat_request(with_params(temperature=-1.0), LIMITS, prior=prior)
    assert [v.field for v in caught.value.violations] == ["messages[0].role", "params.temperature"]
    assert caught.value.message == "invalid request: messages[0].role, params.temperature"


def test_validate_raises_on_prior_alone() -> None:
    """Prior (wire-level) violations fail an otherwise valid request."""
    prior = [FieldViolation("cache.mode", "unknown cache mode")]
    with pytest.raises(InvalidRequest):
        validate_chat_request(BASE, LIMITS, prior=prior)


TIGHT = RequestDefaults(
    max_messages=2,
    max_stop_sequences=1,
    max_labels=1,
    max_label_length=3,
    max_request_bytes=16,
)


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        pytest.param(with_messages("a", "b"), [], id="messages-at-limit"),
        pytest.param(with_messages("a", "b", "c"), ["messages"], id="messages-over-limit"),
        pytest.param(with_params(stop=("a",)), [], id="stop-at-limit"),
        pytest.param(with_params(stop=("a", "b")), ["params.stop"], id="stop-over-limit"),
        pytest.param(dataclasses.replace(BASE, labels={"a": "xyz"}), [], id="label-at-limit"),
        pytest.param(
            dataclasses.replace(BASE, labels={"a": "v", "b": "v"}), ["labels"], id="labels-over"
        ),
        pytest.param(
            dataclasses.replace(BASE, labels={"a": "wxyz"}), ["labels['a']"], id="label-long"
        ),
        pytest.param(with_messages("x" * 16), [], id="bytes-at-limit"),
        pytest.param(with_messages("x" * 17), ["messages"], id="bytes-over-limit"),
        pytest.param(with_messages("x" * 8, "y" * 9), ["messages"], id="bytes-summed"),
        pytest.param(with_messages("é" * 8), [], id="utf8-bytes-at-limit"),
        pytest.param(with_messages("é" * 9), ["messages"], id="utf8-bytes-over"),
        pytest.param(with_messages("世" * 6), ["messages"], id="cjk-bytes-over"),
    ],
)
def test_limits_come_from_request_defaults(request_: ChatRequest, fields: list[str]) -> None:
    """Message, stop, label and size limits are the configured `RequestDefaults`."""
    assert fields_of(request_, TIGHT) == fields


def test_only_first_messages_are_checked_past_the_limit() -> None:
    """Past `max_messages`, one count violation is reported, not one per extra message."""
    request = with_messages("a", "b", "", "", "")
    assert fields_of(request, TIGHT) == ["messages"]


@pytest.mark.parametrize(("calls", "refused"), [(1024, False), (1025, True)])
def test_a_message_sends_back_at_most_1024_tool_calls(calls: int, refused: bool) -> None:
    """An assistant turn's tool calls are limited as an answer's are: 1,024 pass (every
    answer can be sent back), 1,025 are refused on that message's `tool_calls`, by their
    count, not one by one."""
    turn = Message(
        Role.ASSISTANT,
        "",
        tuple(ToolCall(f"call_{i}", "lookup", "{}") for i in range(calls)),
    )
    answers = tuple(Message(Role.TOOL, "ok", tool_call_id=f"call_{i}") for i in range(calls))
    request = dataclasses.replace(BASE, messages=(BASE.messages[0], turn, *answers))
    roomy = dataclasses.replace(LIMITS, max_messages=2 + calls)  # each call's answer
    found = [(v.field, v.description) for v in chat_request_violations(request, roomy)]
    if refused:
        assert found[0] == ("messages[1].tool_calls", "at most 1024 tool calls, got 1025")
    else:
        assert found == []


def test_a_turns_bad_tool_call_ids_past_the_first_eight_calls_are_one_violation() -> None:
    """The first 8 calls' bad ids and names are each named; the rest of the turn's are
    counted in one violation on its `tool_calls`. Before, every one was a violation:
    1,000 turns of 128 empty calls (261 KB on the wire) built 256,000 of them, 0.6 s of
    the event loop, of which the caller is shown ten."""
    turn = Message(Role.ASSISTANT, "", tuple(ToolCall("", "", "{}") for _ in range(20)))
    request = dataclasses.replace(BASE, messages=(BASE.messages[0], turn))
    found = [(v.field, v.description) for v in chat_request_violations(request, LIMITS)]
    named = [f"messages[1].tool_calls[{i}].{part}" for i in range(8) for part in ("id", "name")]
    assert [field for field, _ in found[:16]] == named
    assert found[16:] == [
        (
            "messages[1].tool_calls",
            "24 more ids and names (from tool_calls[8]) must be 1 to 256 printable characters",
        )
    ]


def test_the_ledgers_overflow_label_is_reserved() -> None:
    """A caller cannot label its own calls as the ledger labels its overflow rows."""
    assert all(key.startswith(RESERVED_LABEL_PREFIX) for key in OVERFLOW_LABELS)
