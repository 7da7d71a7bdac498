"""Unit tests for the servicer's Protobuf ⇄ domain conversions (service.servicer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.domain import (
    CacheMode,
    Completion,
    FinishReason,
    GenerationParams,
    Message,
    Role,
    Timings,
    TruncationMode,
    Usage,
)
from service.errors import FieldViolation
from service.servicer import (
    chat_request_from_proto,
    metadata_to_proto,
    params_from_proto,
    response_to_proto,
)

REQUEST_TYPES = [pb.CompleteRequest, pb.CompleteStreamRequest]


def user(content: str = "hi") -> pb.Message:
    """A user message on the wire."""
    return pb.Message(role=pb.ROLE_USER, content=content)


def test_unset_params_stay_none() -> None:
    """An empty GenerationParams converts to all-None, not zeros."""
    assert params_from_proto(pb.GenerationParams()) == GenerationParams()


def test_zero_params_stay_zero() -> None:
    """Optional params explicitly set to 0 convert to 0, distinct from unset."""
    params = params_from_proto(
        pb.GenerationParams(
            temperature=0.0,
            top_p=0.0,
            max_tokens=0,
            seed=0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
    )
    assert params == GenerationParams(
        temperature=0.0,
        top_p=0.0,
        max_tokens=0,
        seed=0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
    )
    assert all(
        getattr(params, name) is not None for name in ("temperature", "top_p", "max_tokens", "seed")
    )


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (pb.GenerationParams(temperature=0.7), GenerationParams(temperature=0.7)),
        (pb.GenerationParams(top_p=0.5), GenerationParams(top_p=0.5)),
        (pb.GenerationParams(max_tokens=128), GenerationParams(max_tokens=128)),
        (pb.GenerationParams(stop=["a", "b"]), GenerationParams(stop=("a", "b"))),
        (pb.GenerationParams(seed=-7), GenerationParams(seed=-7)),
        (pb.GenerationParams(presence_penalty=-1.5), GenerationParams(presence_penalty=-1.5)),
        (pb.GenerationParams(frequency_penalty=1.5), GenerationParams(frequency_penalty=1.5)),
        (pb.GenerationParams(seed=2**62), GenerationParams(seed=2**62)),
    ],
)
def test_each_param_converts_alone(wire: pb.GenerationParams, expected: GenerationParams) -> None:
    """Each set parameter converts to its value and leaves the others unset."""
    assert params_from_proto(wire) == expected


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
def test_full_request_converts(request_type: Any) -> None:
    """Every field of a unary or stream request reaches the domain request."""
    wire = request_type(
        model="deepseek-v4",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.Message(role=pb.ROLE_USER, content="hi"),
            pb.Message(role=pb.ROLE_ASSISTANT, content="hello"),
        ],
        params=pb.GenerationParams(temperature=0.2, stop=["END"]),
        cache=pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH, ttl_seconds=600),
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT),
        labels={"team": "search", "feature": "summary"},
        idempotency_key="req-123",
    )
    request, violations = chat_request_from_proto(wire, tenant="acme")
    assert violations == []
    assert request.model == "deepseek-v4"
    assert request.messages == (
        Message(Role.SYSTEM, "be brief"),
        Message(Role.USER, "hi"),
        Message(Role.ASSISTANT, "hello"),
    )
    assert request.params == GenerationParams(temperature=0.2, stop=("END",))
    assert (request.cache.mode, request.cache.ttl_s) == (CacheMode.REFRESH, 600)
    assert request.truncation is TruncationMode.KEEP_RECENT
    assert dict(request.labels) == {"team": "search", "feature": "summary"}
    assert request.idempotency_key == "req-123"
    assert request.tenant == "acme"


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
def test_empty_request_converts_to_unset(request_type: Any) -> None:
    """An empty request converts to unset policies and no violations of its own."""
    request, violations = chat_request_from_proto(request_type(), tenant="default")
    assert violations == []
    assert (request.model, request.messages, request.params) == ("", (), GenerationParams())
    assert (request.cache.mode, request.cache.ttl_s) == (None, None)
    assert request.truncation is None
    assert dict(request.labels) == {}
    assert request.idempotency_key == ""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (pb.CACHE_MODE_UNSPECIFIED, None),
        (pb.CACHE_MODE_DEFAULT, CacheMode.DEFAULT),
        (pb.CACHE_MODE_BYPASS, CacheMode.BYPASS),
        (pb.CACHE_MODE_REFRESH, CacheMode.REFRESH),
        (pb.CACHE_MODE_NO_STORE, CacheMode.NO_STORE),
    ],
)
def test_cache_modes(mode: pb.CacheMode.ValueType, expected: CacheMode | None) -> None:
    """Each wire cache mode maps to its domain mode; unspecified means the default."""
    request, violations = chat_request_from_proto(
        pb.CompleteRequest(messages=[user()], cache=pb.CachePolicy(mode=mode)), tenant="t"
    )
    assert violations == []
    assert request.cache.mode is expected


def test_every_wire_cache_mode_is_mapped() -> None:
    """No CacheMode value in the contract is left without a mapping."""
    for value in pb.CacheMode.values():
        _, violations = chat_request_from_proto(
            pb.CompleteRequest(cache=pb.CachePolicy(mode=value)), tenant="t"
        )
        assert violations == [], pb.CacheMode.Name(value)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (pb.TRUNCATION_MODE_UNSPECIFIED, None),
        (pb.TRUNCATION_MODE_NONE, TruncationMode.NONE),
        (pb.TRUNCATION_MODE_KEEP_RECENT, TruncationMode.KEEP_RECENT),
    ],
)
def test_truncation_modes(
    mode: pb.TruncationMode.ValueType, expected: TruncationMode | None
) -> None:
    """Each wire truncation mode maps to its domain mode; unspecified means the default."""
    request, violations = chat_request_from_proto(
        pb.CompleteRequest(truncation=pb.TruncationPolicy(mode=mode)), tenant="t"
    )
    assert violations == []
    assert request.truncation is expected


@pytest.mark.parametrize(("ttl", "expected"), [(0, None), (1, 1), (3600, 3600)])
def test_cache_ttl_zero_is_unset(ttl: int, expected: int | None) -> None:
    """A TTL of 0 on the wire means "the configured default", not "expire at once"."""
    request, _ = chat_request_from_proto(
        pb.CompleteRequest(cache=pb.CachePolicy(ttl_seconds=ttl)), tenant="t"
    )
    assert request.cache.ttl_s == expected


@pytest.mark.parametrize(
    ("wire", "violation"),
    [
        pytest.param(
            pb.CompleteRequest(messages=[user(), pb.Message(content="x")]),
            FieldViolation(
                "messages[1].role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            ),
            id="role-unspecified",
        ),
        pytest.param(
            pb.CompleteRequest(messages=[pb.Message(role=42, content="x")]),  # type: ignore[arg-type]
            FieldViolation(
                "messages[0].role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            ),
            id="role-unknown-number",
        ),
        pytest.param(
            pb.CompleteRequest(cache=pb.CachePolicy(mode=99)),  # type: ignore[arg-type]
            FieldViolation("cache.mode", "unknown cache mode"),
            id="cache-mode-unknown",
        ),
        pytest.param(
            pb.CompleteRequest(truncation=pb.TruncationPolicy(mode=7)),  # type: ignore[arg-type]
            FieldViolation("truncation.mode", "unknown truncation mode"),
            id="truncation-mode-unknown",
        ),
    ],
)
def test_wire_only_violations(wire: pb.CompleteRequest, violation: FieldViolation) -> None:
    """Unknown enum values on the wire are violations naming the field path."""
    request, violations = chat_request_from_proto(wire, tenant="t")
    assert violations == [violation]
    assert len(request.messages) == len(wire.messages)


def test_several_wire_violations_at_once() -> None:
    """Every unknown role and mode is reported together, in field order."""
    wire = pb.CompleteRequest(
        messages=[pb.Message(content="a"), user(), pb.Message(role=9, content="c")],  # type: ignore[arg-type]
        cache=pb.CachePolicy(mode=50),  # type: ignore[arg-type]
        truncation=pb.TruncationPolicy(mode=50),  # type: ignore[arg-type]
    )
    _, violations = chat_request_from_proto(wire, tenant="t")
    assert [v.field for v in violations] == [
        "messages[0].role",
        "messages[2].role",
        "cache.mode",
        "truncation.mode",
    ]


COMPLETION = Completion(
    id="chatcmpl-42",
    model="deepseek-chat",
    content="Hello there",
    finish_reason=FinishReason.LENGTH,
    usage=Usage(
        input_tokens=120,
        output_tokens=34,
        cached_input_tokens=100,
        is_estimated=True,
        reasoning_tokens=20,
    ),
    cost_usd=0.000031_08,
    upstream="deepseek",
    attempts=3,
    timings=Timings(total_ms=812.5, upstream_ms=790.25, time_to_first_token_ms=150.125),
    saved_cost_usd=0.0012,
    is_cache_hit=True,
    dropped_messages=2,
    reasoning="The user greets; greet back.",
)

# How each Completion field reads back from CompletionMetadata; a new Completion field
# must be added here (and to metadata_to_proto) or the round-trip test fails.
READ_BACK: dict[str, Callable[[pb.CompletionMetadata], Any]] = {
    "id": lambda m: m.id,
    "model": lambda m: m.model,
    "finish_reason": lambda m: m.finish_reason,
    "usage": lambda m: Usage(
        input_tokens=m.usage.input_tokens,
        output_tokens=m.usage.output_tokens,
        cached_input_tokens=m.usage.cached_input_tokens,
        is_estimated=m.usage.estimated,
        reasoning_tokens=m.usage.reasoning_tokens,
    ),
    "cost_usd": lambda m: m.cost_usd,
    "upstream": lambda m: m.upstream,
    "attempts": lambda m: m.attempts,
    "timings": lambda m: Timings(
        total_ms=m.timings.total_ms,
        upstream_ms=m.timings.upstream_ms,
        time_to_first_token_ms=m.timings.time_to_first_token_ms,
    ),
    "saved_cost_usd": lambda m: m.saved_cost_usd,
    "is_cache_hit": lambda m: m.cache_hit,
    "dropped_messages": lambda m: m.dropped_messages,
}
WIRE_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}


def test_metadata_round_trips_every_completion_field() -> None:
    """Every Completion field but the answer (text, tool calls, reasoning) and
    `is_coalesced` survives metadata_to_proto and the wire: a call that shared another's
    is a hit to its caller, as `cache_hit` says; only telemetry tells it from the store's."""
    wire = pb.CompletionMetadata.FromString(metadata_to_proto(COMPLETION).SerializeToString())
    answer = {"content", "tool_calls", "reasoning"}
    fields = {f.name for f in dataclasses.fields(Completion)} - answer - {"is_coalesced"}
    assert set(READ_BACK) == fields, "update READ_BACK for new Completion fields"
    for name, read in READ_BACK.items():
        expected = getattr(COMPLETION, name)
        if name == "finish_reason":
            expected = WIRE_FINISH[expected]
        assert read(wire) == expected, name


def test_metadata_of_defaults() -> None:
    """A completion with default counters converts to the proto's zero values."""
    completion = Completion(
        id="",
        model="m",
        content="",
        finish_reason=FinishReason.STOP,
        usage=Usage(),
        cost_usd=0.0,
        upstream="up0",
    )
    meta = metadata_to_proto(completion)
    assert (meta.attempts, meta.cache_hit, meta.dropped_messages) == (1, False, 0)
    assert meta.usage.estimated is False
    assert meta.saved_cost_usd == 0.0


@pytest.mark.parametrize(("reason", "wire"), sorted(WIRE_FINISH.items()))
def test_finish_reasons_map(reason: FinishReason, wire: int) -> None:
    """Each domain finish reason maps to its wire enum, never UNSPECIFIED."""
    completion = dataclasses.replace(COMPLETION, finish_reason=reason)
    assert metadata_to_proto(completion).finish_reason == wire
    assert wire != pb.FINISH_REASON_UNSPECIFIED


def test_response_carries_content_and_metadata() -> None:
    """A unary response has the completion's text, its reasoning and its metadata."""
    response = response_to_proto(COMPLETION)
    assert response.content == "Hello there"
    assert response.reasoning == "The user greets; greet back."
    assert response.metadata == metadata_to_proto(COMPLETION)
