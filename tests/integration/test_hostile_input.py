"""Hostile input through the real server: limits, bad bytes, and a property-based barrage."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import service.servicer
import service.summarize
import service.validation
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import GatewayConfig
from service.server import MAX_METADATA_BYTES, GatewayServer
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream
from tests.integration.tenancy_helpers import (
    as_tenant,
    detail,
    rpc_error,
    secure_config,
    stream_error,
)
from tests.secret_capture import CALLER_KEY_A, record_emitted

LIMITS = {
    "max_messages": 8,
    "max_labels": 4,
    "max_label_length": 32,
    "max_stop_sequences": 3,
    "max_stop_length": 16,
    "max_prompt_tokens": 300,
    "max_request_bytes": 8192,
}
_CALL_TIMEOUT_S = 15.0


def _raw_complete(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        "/llmgateway.v1.CompletionService/Complete",
        request_serializer=lambda data: data,
        response_deserializer=pb.CompleteResponse.FromString,
    )


def _message(content: str, role: int = pb.ROLE_USER) -> pb.Message:
    return pb.Message(role=role, content=content)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"messages": [_message("hi")] * 9}, "messages"),
        ({"labels": {f"k{i}": "v" for i in range(5)}}, "labels"),
        ({"labels": {"team": "v" * 33}}, "labels['team']"),
        ({"labels": {"bad key!": "v"}}, "labels['bad key!']"),
        ({"labels": {"team": "a\x00b"}}, "labels['team']"),
        ({"params": pb.GenerationParams(stop=["x"] * 4)}, "params.stop"),
        ({"params": pb.GenerationParams(stop=["s" * 17])}, "params.stop[0]"),
        ({"params": pb.GenerationParams(stop=["\x1b[2J"])}, "params.stop[0]"),
        ({"params": pb.GenerationParams(stop=[""])}, "params.stop[0]"),
        ({"messages": [_message("clear \x1b[2J screen")]}, "messages[0].content"),
        ({"messages": [_message("nul \x00")]}, "messages[0].content"),
        ({"messages": [_message("hello " * 250)]}, "messages"),
        ({"messages": [_message("é" * 4100)]}, "messages"),
        # 4 tokens a wide letter beyond the BMP (its UTF-8 bytes) and 1 for the run: 561 in 140.
        ({"messages": [_message("\U00020000" * 140)]}, "messages"),
        # 4 tokens an emoji (its UTF-8 bytes) and 1 for the run: 388 tokens in 95.
        ({"messages": [_message("\U0001f600" * 95)]}, "messages"),
        ({"model": "fake\x07model"}, "model"),
        ({"model": "m" * 300}, "model"),
        ({"idempotency_key": "k\x00"}, "idempotency_key"),
    ],
    ids=[
        "too-many-messages", "too-many-labels", "label-too-long", "label-key", "label-control",
        "too-many-stops", "stop-too-long", "stop-control", "stop-empty", "content-escape",
        "content-nul", "over-token-limit", "over-byte-limit", "over-token-limit-astral",
        "over-token-limit-emoji",
        "model-control", "model-long", "idempotency-control",
    ],
)  # fmt: skip
async def test_each_limit_is_an_invalid_argument_naming_the_field(
    upstream, start_gateway, request_fields, field
):
    """Every limit breach is INVALID_ARGUMENT with a BadRequest naming the field; no upstream."""
    gw = await start_gateway(gateway_config(upstream.base_url, defaults=LIMITS))
    base = {"model": FAKE_MODEL, "messages": [_message("hi")]}
    error = await rpc_error(gw.stub.Complete(pb.CompleteRequest(**{**base, **request_fields})))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in detail(error, error_details_pb2.BadRequest).field_violations]
    assert field in fields
    assert upstream.requests == []


async def test_a_refused_stop_sequence_is_told_the_rule_a_line_break_passes(upstream, gateway):
    """A stop sequence may hold a line break (the commonest stop, "\n"), as the README's
    request limits say; one with an escape is refused, and its violation says so.

    Before, it said the sequence must be "printable characters": a line break is not one,
    so a caller told so dropped the "\n" stops it needed."""
    params = pb.GenerationParams(stop=["\n", "\x1b[0m"])
    error = await rpc_error(gateway.stub.Complete(chat(params=params)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.field == "params.stop[1]"
    assert violation.description == (
        "must be 1 to 256 characters, no control characters but tab, CR and LF"
    )
    assert upstream.requests == []
    await gateway.stub.Complete(chat(params=pb.GenerationParams(stop=["\n"])))
    assert upstream.requests[0].body["stop"] == ["\n"]


async def test_a_schema_name_counts_toward_the_prompt_token_limit(upstream, start_gateway):
    """A JSON Schema answer format's name is prompt too: a request whose estimate is over
    `max_prompt_tokens` only with it (64 digits, a token each) is refused, not sent on."""
    gw = await start_gateway(gateway_config(upstream.base_url, defaults={"max_prompt_tokens": 50}))
    answer_format = pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="{}", schema_name="0" * 64
    )
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[_message("\U0001f600")],
        params=pb.GenerationParams(response_format=answer_format),
    )
    error = await rpc_error(gw.stub.Complete(request))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in detail(error, error_details_pb2.BadRequest).field_violations]
    assert fields == ["messages"]
    assert upstream.requests == []


async def test_tool_calls_sent_back_count_whole_toward_the_prompt_token_limit(
    upstream, start_gateway
):
    """Each sent-back tool call costs its template's tokens besides its id and name: 90
    calls named and numbered by one emoji each come to about 1,270 tokens, over a
    `max_prompt_tokens` of 1,000, and are refused, not sent on.

    Before, the quick bound that decides whether the estimate is worth making left that
    overhead out, put the request under the limit, and the upstream got it."""
    gw = await start_gateway(
        gateway_config(upstream.base_url, defaults={"max_prompt_tokens": 1000})
    )
    calls = [pb.ToolCall(id="\U0001f600", name="\U0001f600") for _ in range(90)]
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[_message("hi"), pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls)],
    )
    error = await rpc_error(gw.stub.Complete(request))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.field == "messages"
    assert "over the limit of 1000 tokens" in violation.description
    assert upstream.requests == []


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x03\xff\xfe\xfd", b"\x12\x04\x12\x02\xc3\x28", b"\x0a\x05hello\x12", b"\xff" * 8],
    ids=["model-bad-utf8", "content-bad-utf8", "truncated", "garbage"],
)
async def test_undecodable_bytes_are_invalid_argument_not_unknown(upstream, gateway, payload):
    """Bytes that do not parse (bad UTF-8, corrupt wire format) get INVALID_ARGUMENT."""
    error = await rpc_error(_raw_complete(gateway.channel)(payload))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert detail(error, error_details_pb2.BadRequest).field_violations[0].field == "request"
    assert "DecodeError" not in (error.details() or "")
    assert upstream.requests == []


@pytest.mark.parametrize(("field", "entry"), [("messages", b"\x12\x00"), ("tools", b"\x42\x00")])
async def test_far_too_many_messages_or_tools_are_refused_by_their_count_at_once(
    upstream, gateway, field, entry
):
    """A million and a half empty messages, or tools (3 MB, under the receive limit), are
    refused on their count at once, the rest never read.

    Before, each was converted (and each message's unset role refused) first: seconds
    on the event loop, every other call on the gateway stalled meanwhile."""
    payload = b"\x0a\x0a" + FAKE_MODEL.encode() + entry * 1_500_000
    error = await rpc_error(_raw_complete(gateway.channel)(payload, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert violations[0].field == field  # the count first: before, each message's role
    assert violations[0].description.endswith("got 1500000")
    assert upstream.requests == []


def _varint(value: int) -> bytes:
    """`value` as a protobuf varint (a length before a nested message)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_far_too_many_tool_calls_sent_back_are_refused_by_their_count_at_once(
    upstream, gateway
):
    """An assistant message sending back a million and a half empty tool calls (3 MB) is
    refused on that message's `tool_calls` by their count, the rest never converted.

    Before, there was no limit: each call was converted and checked (about 12 s on the
    event loop, every other call stalled), and the status named each call's empty id."""
    assistant = b"\x08\x03" + b"\x1a\x00" * 1_500_000  # ROLE_ASSISTANT, empty tool_calls
    payload = b"\x0a\x0a" + FAKE_MODEL.encode() + b"\x12" + _varint(len(assistant)) + assistant
    error = await rpc_error(_raw_complete(gateway.channel)(payload, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert (violations[0].field, violations[0].description) == (
        "messages[0].tool_calls",
        "at most 1024 tool calls, got 1500000",
    )
    assert upstream.requests == []


async def test_a_metered_batch_item_refused_by_its_counts_is_not_estimated(
    upstream, start_gateway, monkeypatch
):
    """A metered tenant's batch item refused on the wire (more messages than
    `max_messages`) is not estimated for its tenant's tokens_per_minute: it makes no call.

    Before, every item was estimated whole first: an item of a million and a half empty
    messages (3 MB) held the event loop for about a second, every other call stalled,
    for an item refused anyway."""
    estimated: list[int] = []
    estimate = service.servicer.completion_tokens

    def noting(request: Any) -> int:
        estimated.append(len(request.messages))
        return estimate(request)

    monkeypatch.setattr(service.servicer, "completion_tokens", noting)
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"tokens_per_minute": 1_000_000}},
        defaults=LIMITS,
    )
    gw = await start_gateway(config)
    too_many = pb.CompleteRequest(model=FAKE_MODEL, messages=[_message("hi")] * 9)
    items = [pb.BatchItem(id="over", request=too_many), pb.BatchItem(id="ok", request=chat())]
    batch = pb.CompleteBatchRequest(items=items)
    events = [e async for e in gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"))]
    results = {e.result.id: e.result for e in events if e.HasField("result")}
    assert results["over"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results["ok"].HasField("response")
    assert estimated == [1]  # the item that ran; none for the refused one
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("rpc", ["Complete", "CompleteStream", "CompleteBatch"])
@pytest.mark.parametrize(
    ("fields", "violation"),
    [
        ({"messages": [_message("hello " * 100)] * 9}, ("messages", "at most 8 messages, got 9")),
        (
            {"tools": [pb.Tool(name=f"tool_{number}") for number in range(129)]},
            ("tools", "at most 128 tools, got 129"),
        ),
    ],
    ids=["messages", "tools"],
)
async def test_a_request_over_a_count_is_refused_by_it_not_by_an_estimate_of_a_part(
    upstream, start_gateway, rpc, fields, violation
):
    """A request of more messages (or tools) than allowed is refused by their count
    alone: only as many as allowed are converted, and they are not estimated.

    Before, the ones converted were estimated against `max_prompt_tokens` as though
    they were the request: a second violation on `messages`, "about 1635 tokens", gave
    a count of part of the prompt as the request's (and the README says a request over
    `max_messages` is not estimated)."""
    gw = await start_gateway(gateway_config(upstream.base_url, defaults=LIMITS))
    wire = {"model": FAKE_MODEL, "messages": [_message("hi")], **fields}
    if rpc == "Complete":
        error = await rpc_error(gw.stub.Complete(pb.CompleteRequest(**wire)))
        status = (error.code().value[0], detail(error, error_details_pb2.BadRequest))
    elif rpc == "CompleteStream":
        error = await stream_error(gw.stub.CompleteStream(pb.CompleteStreamRequest(**wire)))
        status = (error.code().value[0], detail(error, error_details_pb2.BadRequest))
    else:
        item = pb.BatchItem(id="over", request=pb.CompleteRequest(**wire))
        batch = pb.CompleteBatchRequest(items=[item])
        events = [e async for e in gw.stub.CompleteBatch(batch)]
        (error_status,) = [e.result.error for e in events if e.HasField("result")]
        bad_request = error_details_pb2.BadRequest()
        assert error_status.details[0].Unpack(bad_request)
        status = (error_status.code, bad_request)
    code, bad_request = status
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [(v.field, v.description) for v in bad_request.field_violations] == [violation]
    assert upstream.requests == []


def _label_entries(count: int, *, field: int = 6) -> bytes:
    """`count` labels (a CompleteRequest's field 6, else `field`) with distinct keys and
    empty values, as on the wire."""
    tag = bytes([field << 3 | 2])
    entries = []
    for index in range(count):
        key = format(index, "x").encode()
        entry = b"\x0a" + _varint(len(key)) + key
        entries.append(tag + _varint(len(entry)) + entry)
    return b"".join(entries)


def _stop_sequences(count: int) -> bytes:
    """`params` (field 3) holding `count` empty stop sequences, as on the wire."""
    params = b"\x22\x00" * count
    return b"\x1a" + _varint(len(params)) + params


@pytest.mark.parametrize(
    ("extra", "field", "description"),
    [
        (_label_entries(400_000), "labels", "at most 32 labels, got 400000"),
        (_stop_sequences(1_500_000), "params.stop", "at most 4 stop sequences, got 1500000"),
    ],
    ids=["labels", "stop"],
)
async def test_far_too_many_labels_or_stop_sequences_are_refused_by_their_count_at_once(
    upstream, gateway, extra, field, description
):
    """400,000 labels or a million and a half stop sequences (3-4 MB, under the receive
    limit) are refused on their count, the rest never converted.

    Before, every label was copied into a dict and every stop sequence into a tuple (and
    the labels read again by their check): about 0.6 s on the event loop for the labels,
    every other call on the gateway stalled meanwhile, for a request refused anyway."""
    message = b"\x12\x04\x08\x02\x12\x00"  # one user message, empty content
    payload = b"\x0a" + _varint(len(FAKE_MODEL)) + FAKE_MODEL.encode() + message + extra
    error = await rpc_error(_raw_complete(gateway.channel)(payload, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [(v.field, v.description) for v in violations if v.field == field] == [
        (field, description)
    ]
    assert upstream.requests == []


async def test_a_usage_filter_of_far_too_many_labels_is_refused_by_its_count(gateway):
    """A GetUsage filter of 400,000 labels (3 MB, under the receive limit) is
    INVALID_ARGUMENT on `labels` by its count: no row carries more labels than any
    config lets a call carry (256).

    Before, a filter was held to no count: every entry was checked and matched against
    the rows (about 0.9 s of the event loop, every other call stalled), for an OK with
    no rows, read as "no usage"."""
    get_usage = gateway.channel.unary_unary(
        "/llmgateway.v1.CompletionService/GetUsage",
        request_serializer=lambda data: data,
        response_deserializer=pb.GetUsageResponse.FromString,
    )
    payload = _label_entries(400_000, field=3)
    error = await rpc_error(get_usage(payload, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [(v.field, v.description) for v in violations] == [
        ("labels", "at most 256 labels, got 400000")
    ]


@pytest.mark.parametrize("rpc", ["Complete", "CompleteStream", "CompleteBatch"])
@pytest.mark.parametrize(
    ("fields", "over"),
    [
        ({"messages": [_message("word " * 8_000)]}, "messages"),
        (
            {
                "messages": [_message("hi")],
                "params": pb.GenerationParams(
                    response_format=pb.ResponseFormat(
                        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                        json_schema='{"description": "%s"}' % ("word " * 8_000),
                    )
                ),
            },
            "params.response_format.json_schema",
        ),
    ],
    ids=["prompt", "schema"],
)
async def test_a_request_over_its_byte_limit_is_refused_by_it_before_any_estimate(
    upstream, start_gateway, estimator_reads, *, rpc, fields, over
):
    """A metered tenant's request whose text (40,000 bytes) is over `max_request_bytes`
    is refused by that limit alone, its tokens never estimated: not for the request's
    `max_prompt_tokens`, nor, as a batch item, for its tenant's tokens_per_minute.

    Before, it was estimated whole as well (a quarter second of the event loop for a
    4 MiB prompt, every other call stalled), and refused on both limits."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"tokens_per_minute": 1_000_000}},
        defaults=LIMITS,
    )
    gw = await start_gateway(config)
    request = pb.CompleteRequest(model=FAKE_MODEL, **fields)
    metadata = as_tenant("team-a")
    if rpc == "CompleteBatch":
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="over", request=request)])
        events = [e async for e in gw.stub.CompleteBatch(batch, metadata=metadata)]
        status = status_pb2.Status()
        status.CopyFrom(events[0].result.error)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        violations = bad_request.field_violations
    else:
        if rpc == "CompleteStream":
            stream = pb.CompleteStreamRequest(model=FAKE_MODEL, **fields)
            error = await stream_error(gw.stub.CompleteStream(stream, metadata=metadata))
        else:
            error = await rpc_error(gw.stub.Complete(request, metadata=metadata))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == [over]
    assert violations[0].description.startswith(f"at most {LIMITS['max_request_bytes']} bytes")
    assert estimator_reads == []
    assert upstream.requests == []


def _labels_checked(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    """How many labels each call of `module`'s `label_violations` is given, from now on."""
    checked: list[int] = []
    check_labels = module.label_violations

    def noting(labels: Any, *args: Any, **kwargs: Any) -> Any:
        checked.append(len(labels))
        return check_labels(labels, *args, **kwargs)

    monkeypatch.setattr(module, "label_violations", noting)
    return checked


@pytest.mark.parametrize("rpc", ["Complete", "CompleteStream", "CompleteBatch"])
async def test_a_completion_over_its_label_limit_converts_only_the_labels_allowed(
    upstream, start_gateway, monkeypatch, rpc
):
    """A request's labels past `max_labels` are counted on the wire and never converted:
    the check sees as many as the limit allows. (Its violation's text cannot tell: the
    check of converted labels says the same count.)"""
    checked = _labels_checked(monkeypatch, service.validation)
    gw = await start_gateway(gateway_config(upstream.base_url, defaults=LIMITS))
    labels = {f"k{i}": "v" for i in range(40)}
    if rpc == "CompleteBatch":
        item = pb.BatchItem(id="a", request=chat(labels=labels))
        events = [e async for e in gw.stub.CompleteBatch(pb.CompleteBatchRequest(items=[item]))]
        assert events[0].result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    elif rpc == "CompleteStream":
        error = await stream_error(gw.stub.CompleteStream(chat_stream(labels=labels)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    else:
        error = await rpc_error(gw.stub.Complete(chat(labels=labels)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert checked == [LIMITS["max_labels"]]
    assert upstream.requests == []


async def test_a_summarize_over_its_label_limit_is_refused_by_the_count(
    upstream, start_gateway, monkeypatch
):
    """Summarize's labels are counted on the wire as Complete's are: one violation saying
    how many came, and only as many as the limit allows converted and checked."""
    checked = _labels_checked(monkeypatch, service.summarize)
    gw = await start_gateway(gateway_config(upstream.base_url, defaults=LIMITS))
    labels = {f"k{i}": "v" for i in range(40)}
    request = pb.SummarizeRequest(model=FAKE_MODEL, document="A short text.", labels=labels)
    error = await rpc_error(gw.stub.Summarize(request))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [(v.field, v.description) for v in violations if v.field.startswith("labels")] == [
        ("labels", "at most 4 labels, got 40")
    ]
    assert checked == [LIMITS["max_labels"]]
    assert upstream.requests == []


def _invisible_key(number: int) -> str:
    """A label key of 64 Unicode tag characters (invisible), one of many told apart."""
    return chr(0xE0020 + number) * 64


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, labels: stub.Complete(chat(labels=labels)),
        lambda stub, labels: stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document="A short text.", labels=labels)
        ),
        lambda stub, labels: stub.GetUsage(pb.GetUsageRequest(labels=labels)),
    ],
    ids=["Complete", "Summarize", "GetUsage"],
)
async def test_ten_bad_label_keys_of_invisible_characters_fit_in_the_trailers(
    upstream, gateway, call
):
    """Ten label keys of 64 invisible characters each are INVALID_ARGUMENT with a
    BadRequest naming ten `labels[...]` fields, each key escaped to ASCII and clipped.

    Before, each key was named by its `repr`, 64 escapes of 10 characters: the status
    message and its details came to 20 KB of trailers, past the 16 KiB any gRPC client
    takes, and the caller got RESOURCE_EXHAUSTED "received metadata size exceeds hard
    limit" with no details in place of its bad request."""
    labels = {_invisible_key(number): "v" for number in range(10)}
    error = await rpc_error(call(gateway.stub, labels))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert len(violations) == 10
    for violation in violations:
        assert violation.field.startswith("labels['\\U000e00")
        assert violation.field.endswith("...]")
        assert violation.field.isascii()
    assert upstream.requests == []


async def test_messages_over_the_grpc_receive_limit_are_refused_by_grpc(upstream, start_gateway):
    """A message over server.max_receive_message_bytes never reaches the gateway's code."""
    gw = await start_gateway(
        gateway_config(upstream.base_url, server={"max_receive_message_bytes": 65536})
    )
    error = await rpc_error(gw.stub.Complete(chat("x" * 70_000)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await gw.stub.Complete(chat("small"))).content == "Hello from fake"
    assert len(upstream.requests) == 1


async def test_metadata_under_the_limit_is_taken_every_time_and_over_it_refused(upstream, gateway):
    """Metadata past gRPC's soft limit (8 KiB) and under its hard one was refused at
    random: a proxy's added headers failed some calls and not others. Taken up to
    `MAX_METADATA_BYTES` (each entry's name and value and 32 bytes), refused past it."""
    under = (("x-proxy-added", "a" * (MAX_METADATA_BYTES - 1024)),)
    for _ in range(10):  # at random, about 8 in 10 of these were refused
        response = await gateway.stub.Complete(chat(), metadata=under)
        assert response.content == "Hello from fake"
    over = (("x-proxy-added", "a" * MAX_METADATA_BYTES),)
    for _ in range(3):
        error = await rpc_error(gateway.stub.Complete(chat(), metadata=over))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(upstream.requests) == 10


@contextlib.contextmanager
def _gateway_thread(make_config: Callable[[str], GatewayConfig]) -> Iterator[str]:
    """A gateway and fake upstream on their own event loop thread; yields its address."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            fake = await stack.enter_async_context(FakeUpstream(models=(FAKE_MODEL,)))
            server = await stack.enter_async_context(GatewayServer(make_config(fake.base_url)))
            state["address"] = server.address
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the gateway did not start"
    try:
        yield state["address"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


@pytest.fixture(scope="module")
def live_gateway() -> Iterator[str]:
    """A gateway with tight request limits, for synchronous (hypothesis) clients."""
    with _gateway_thread(lambda url: gateway_config(url, defaults=LIMITS)) as address:
        yield address


@pytest.fixture(scope="module")
def live_keyed_gateway() -> Iterator[str]:
    """A gateway requiring caller keys, for synchronous (hypothesis) clients."""
    with _gateway_thread(secure_config) as address:
        yield address


_ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_number = st.floats(allow_nan=True, allow_infinity=True)
_word = st.from_regex(r"[A-Za-z][A-Za-z ,.!?]{0,60}", fullmatch=True)
_label_key = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)

# An ordinary request, field by field ...
_VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(FAKE_MODEL),
    "messages": st.lists(
        st.builds(pb.Message, role=st.sampled_from([1, 2, 3]), content=_word),
        min_size=1,
        max_size=4,
    ),
    "temperature": st.none() | st.floats(0, 2),
    "top_p": st.none() | st.floats(0.01, 1),
    "max_tokens": st.none() | st.integers(1, 64),
    "stop": st.lists(st.from_regex(r"[A-Z]{1,8}", fullmatch=True), max_size=3),
    "seed": st.none() | st.integers(0, 2**31),
    "cache": st.builds(pb.CachePolicy, mode=st.integers(0, 4), ttl_seconds=st.integers(0, 3600)),
    "truncation": st.builds(pb.TruncationPolicy, mode=st.integers(0, 2)),
    "labels": st.dictionaries(_label_key, _word, max_size=4),
    "idempotency_key": st.just("") | _label_key,
}
# ... and what an attacker or a broken client may send instead.
_HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["", "no-such-model", "m" * 300]) | _text,
    "messages": st.lists(
        st.builds(
            pb.Message,
            role=st.integers(-(2**31), 2**31 - 1),
            content=_text | st.text(max_size=3000) | st.sampled_from(["", " \t", "\x00"]),
        ),
        max_size=12,
    ),
    "temperature": _number,
    "top_p": _number,
    "max_tokens": st.integers(-(2**31), 2**31 - 1),
    "stop": st.lists(_text, max_size=6),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "cache": st.builds(
        pb.CachePolicy,
        mode=st.integers(-(2**31), 2**31 - 1),
        ttl_seconds=st.integers(0, 2**32 - 1),
    ),
    "truncation": st.builds(pb.TruncationPolicy, mode=st.integers(-(2**31), 2**31 - 1)),
    "labels": st.dictionaries(_text, _text, max_size=8),
    "idempotency_key": _text,
}
_PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed")


@st.composite
def _requests(draw: st.DrawFn) -> pb.CompleteRequest:
    """An ordinary request with zero or more fields replaced by hostile values."""
    hostile = draw(st.sets(st.sampled_from(sorted(_HOSTILE)), max_size=4))
    fields = {
        name: draw(_HOSTILE[name] if name in hostile else _VALID[name]) for name in sorted(_VALID)
    }
    params = {name: fields.pop(name) for name in _PARAMS}
    stop = params.pop("stop")
    return pb.CompleteRequest(
        params=pb.GenerationParams(stop=stop, **{k: v for k, v in params.items() if v is not None}),
        **fields,
    )


def _check_outcome(call: Any, kind: str) -> None:
    """The call succeeded, or failed with an allowed code and google.rpc details."""
    try:
        call()
        event(f"{kind}: OK")
    except grpc.RpcError as error:
        event(f"{kind}: {error.code().name}")
        record_emitted(error.code(), error.details(), error.trailing_metadata())
        assert error.code() in _ALLOWED, f"{error.code()}: {error.details()}"  # noqa: PT017
        raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        assert raw, "an error without google.rpc.Status details"
        assert status_pb2.Status.FromString(raw).details


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=_requests(), is_stream=st.booleans(), raw=st.binary(max_size=64))
def test_generated_requests_get_success_or_invalid_argument_with_details(
    live_gateway, request, is_stream, raw
):
    """Any request is answered OK, INVALID_ARGUMENT or NOT_FOUND, with details; never worse."""
    with grpc.insecure_channel(live_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        if is_stream:
            stream_request = pb.CompleteStreamRequest.FromString(request.SerializeToString())
            _check_outcome(
                lambda: list(stub.CompleteStream(stream_request, timeout=_CALL_TIMEOUT_S)),
                "request",
            )
        else:
            _check_outcome(lambda: stub.Complete(request, timeout=_CALL_TIMEOUT_S), "request")
        raw_call = channel.unary_unary(
            "/llmgateway.v1.CompletionService/Complete",
            request_serializer=lambda data: data,
            response_deserializer=pb.CompleteResponse.FromString,
        )
        _check_outcome(lambda: raw_call(raw, timeout=_CALL_TIMEOUT_S), "raw bytes")
        # The server is still whole: a plain request still succeeds.
        assert stub.Complete(chat("still there?"), timeout=_CALL_TIMEOUT_S).content


_metadata_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@settings(max_examples=60, deadline=None, database=None)
@given(
    value=st.sampled_from([f"Bearer {CALLER_KEY_A}", "Bearer ", "bearer x"])
    | _metadata_value
    | _metadata_value.map(lambda v: f"Bearer {v}"),
    name=st.sampled_from(["authorization", "Authorization", "x-api-key"]),
)
def test_generated_credentials_get_success_or_unauthenticated(live_keyed_gateway, name, value):
    """Any authorization metadata is served (only the real key) or UNAUTHENTICATED, with details."""
    with grpc.insecure_channel(live_keyed_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        code, trailers = grpc.StatusCode.OK, {}
        try:
            stub.Complete(chat(), metadata=((name.lower(), value),), timeout=_CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            record_emitted(error.code(), error.details(), error.trailing_metadata())
            code, trailers = error.code(), dict(error.trailing_metadata() or ())
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
    assert code is grpc.StatusCode.OK or trailers.get("grpc-status-details-bin")
    is_the_key = (
        name.lower() == "authorization"
        and value.lower().startswith("bearer ")
        and (value[7:].strip() == CALLER_KEY_A)
    )
    assert (code is grpc.StatusCode.OK) == is_the_key
