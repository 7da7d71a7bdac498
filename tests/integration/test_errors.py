"""Every failure is a gRPC status with google.rpc details, and never leaks a secret."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from service.errors import RETRY_PUSHBACK_TRAILER
from service.upstream import relay
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import (
    CutStream,
    EndWithoutDone,
    FakeUpstream,
    MalformedSSE,
    Reply,
    Reset,
    Status,
)
from tests.integration.helpers import error_info, field_violations, retry_delay_s, rich_status
from tests.integration.tenancy_helpers import rpc_error, stream_error
from tests.secret_capture import PROVIDER_KEY

# Single attempt, so each fault shows as itself rather than after retries.
ONE_ATTEMPT: dict[str, object] = {"resilience": {"attempts": 1}}


def _request(**fields: object) -> pb.CompleteRequest:
    fields.setdefault("model", FAKE_MODEL)
    fields.setdefault("messages", [pb.Message(role=pb.ROLE_USER, content="hi")])
    return pb.CompleteRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [pb.Message(role=pb.ROLE_UNSPECIFIED, content="x")]}, "messages[0].role"),
        ({"messages": [pb.Message(role=7, content="x")]}, "messages[0].role"),
        ({"messages": [pb.Message(role=pb.ROLE_USER, content="  ")]}, "messages[0].content"),
        ({"messages": [pb.Message(role=pb.ROLE_USER, content="a\x00b")]}, "messages[0].content"),
        ({"params": pb.GenerationParams(temperature=2.5)}, "params.temperature"),
        ({"params": pb.GenerationParams(temperature=-0.1)}, "params.temperature"),
        ({"params": pb.GenerationParams(top_p=0.0)}, "params.top_p"),
        ({"params": pb.GenerationParams(top_p=1.5)}, "params.top_p"),
        ({"params": pb.GenerationParams(max_tokens=0)}, "params.max_tokens"),
        ({"params": pb.GenerationParams(presence_penalty=3)}, "params.presence_penalty"),
        ({"params": pb.GenerationParams(frequency_penalty=-3)}, "params.frequency_penalty"),
        ({"params": pb.GenerationParams(stop=[""])}, "params.stop[0]"),
        ({"params": pb.GenerationParams(stop=["a", "b", "c", "d", "e"])}, "params.stop"),
        ({"labels": {"bad key!": "v"}}, "labels['bad key!']"),
        ({"labels": {"llm_gateway.overflow": "true"}}, "labels['llm_gateway.overflow']"),
        ({"model": ""}, "model"),
    ],
)
async def test_each_invalid_field_is_named_in_bad_request(stub, upstream, request_fields, field):
    """An invalid field gives INVALID_ARGUMENT naming it, and nothing reaches the upstream."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(_request(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "messages",
    [
        [pb.Message(role=pb.ROLE_UNSPECIFIED, content="x", tool_call_id="call_1")],
        [pb.Message(role=pb.ROLE_UNSPECIFIED, content="")],
        [pb.Message(role=9, content="a\x00b")],  # type: ignore[arg-type]
        [
            pb.Message(
                role=9,  # type: ignore[arg-type]
                tool_calls=[pb.ToolCall(id="call_1", name="f", arguments="{}")],
                reasoning="why",
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="21"),
        ],
    ],
    ids=["tool-call-id", "empty", "control-characters", "tool-calls-answered"],
)
async def test_a_message_of_unknown_role_is_told_its_role_alone(stub, upstream, messages):
    """A message whose role is unset or unknown gets one violation, on its role, naming
    the roles it may have: none of the rules of a role it was never given (before, it was
    held to ROLE_USER's: "tool_call_id: only on ROLE_TOOL messages"), and a tool's answer
    to a call it carries is not refused as answering none."""
    request = _request(messages=[pb.Message(role=pb.ROLE_USER, content="hi"), *messages])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {
        "messages[1].role": "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
    }
    assert upstream.requests == []


async def _refusals(stub: pb_grpc.CompletionServiceStub, content: str) -> list[status_pb2.Status]:
    """How Complete, CompleteStream and a CompleteBatch item refuse a user message of
    `content`: each one's google.rpc.Status."""
    unary = await rpc_error(stub.Complete(chat(content)))
    stream = await stream_error(stub.CompleteStream(chat_stream(content)))
    item = pb.BatchItem(id="only", request=chat(content))
    events = [event async for event in stub.CompleteBatch(pb.CompleteBatchRequest(items=[item]))]
    return [rich_status(unary), rich_status(stream), events[0].result.error]


@pytest.mark.parametrize(
    "content",
    ["\u200b\u200b", "\u2060", "\ufeff \u200d\n", "\u00ad\ufe0f", "\U000e0041\u3164"],
    ids=[
        "zero-width-spaces",
        "word-joiner",
        "bom-joiner-blanks",
        "soft-hyphen-selector",
        "tag-filler",
    ],
)
async def test_a_message_of_invisible_characters_alone_is_refused_as_empty(stub, upstream, content):
    """A message of nothing a reader sees (Unicode's default ignorable characters, with or
    without blanks) is refused exactly as an empty one is, by Complete, CompleteStream and
    a batch item alike, as Summarize refuses such a document; nothing reaches the upstream.

    Before, it was sent upstream, paid for and answered as if it said something."""
    refusals = await _refusals(stub, content)
    assert refusals == await _refusals(stub, "")
    assert refusals[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert upstream.requests == []


async def test_invisible_text_beside_visible_text_or_where_none_is_needed_is_served(stub, upstream):
    """A zero-width character in visible text, a tool-call turn and a tool's answer of
    invisible characters alone (as they may be empty) are still served."""
    upstream.script(Reply(content="ok"), Reply(content="ok"))
    await stub.Complete(chat("\u200bhi\u2060"))
    call = pb.ToolCall(id="call_1", name="get_weather", arguments="{}")
    messages = [
        pb.Message(role=pb.ROLE_USER, content="Weather?"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="\u200b", tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="\u2060"),
    ]
    await stub.Complete(_request(messages=messages, tools=[pb.Tool(name="get_weather")]))
    assert len(upstream.requests) == 2


async def test_all_violations_are_reported_at_once(stub):
    """Several bad fields are all listed in one BadRequest."""
    request = _request(
        messages=[pb.Message(role=pb.ROLE_UNSPECIFIED, content="")],
        params=pb.GenerationParams(temperature=9, top_p=0),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request)
    violations = field_violations(caught.value)
    assert {"messages[0].role", "params.temperature", "params.top_p"} <= set(violations)


async def test_a_thousand_violations_still_fit_in_the_status(stub, upstream):
    """A request with a bad field in each of 1000 messages is INVALID_ARGUMENT naming the
    first 10, not a status too large for the client's trailer limit (RESOURCE_EXHAUSTED)."""
    request = _request(messages=[pb.Message(role=pb.ROLE_USER, content="a\x00")] * 1000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(caught.value)) == [f"messages[{i}].content" for i in range(10)]
    assert caught.value.details().endswith("messages[9].content and 990 more")
    assert upstream.requests == []


async def test_a_long_duplicate_batch_id_still_fits_in_the_status(stub, upstream):
    """A violation's description quoting a caller's 30,000-character id is cut short."""
    item = pb.BatchItem(id="x" * 30_000, request=_request())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.CompleteBatch(pb.CompleteBatchRequest(items=[item, item])):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].id" in field_violations(caught.value)
    assert upstream.requests == []


async def test_stream_validation_fails_before_any_event(stub, upstream):
    """A bad streamed request fails with INVALID_ARGUMENT and no upstream call."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.CompleteStream(chat_stream(params=pb.GenerationParams(max_tokens=0))):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert upstream.requests == []


async def _refusal(
    stub: pb_grpc.CompletionServiceStub, rpc: str, *, is_valid: bool
) -> status_pb2.Status:
    """The google.rpc.Status `rpc` refuses a request for a model no upstream serves with
    (for a batch, its one item's), the request otherwise valid or not: a temperature of
    5, or for Summarize a target of 5 tokens."""
    model = "no-such-model"
    if rpc == "Summarize":
        summary = pb.SummarizeRequest(
            model=model, document="text", target_tokens=0 if is_valid else 5
        )
        return rich_status(await rpc_error(stub.Summarize(summary)))
    params = pb.GenerationParams() if is_valid else pb.GenerationParams(temperature=5)
    if rpc == "CompleteStream":
        stream = stub.CompleteStream(chat_stream(model=model, params=params))
        return rich_status(await stream_error(stream))
    request = chat(model=model, params=params)
    if rpc == "Complete":
        return rich_status(await rpc_error(stub.Complete(request)))
    batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="only", request=request)])
    events = [event async for event in stub.CompleteBatch(batch)]
    return events[0].result.error


def _violated_fields(status: status_pb2.Status) -> set[str]:
    found = error_details_pb2.BadRequest()
    assert any(detail.Unpack(found) for detail in status.details), status
    return {violation.field for violation in found.field_violations}


@pytest.mark.parametrize("rpc", ["Complete", "CompleteStream", "CompleteBatch", "Summarize"])
async def test_an_invalid_field_is_told_before_an_unknown_model(stub, upstream, rpc):
    """A request with an invalid field for a model no upstream serves is INVALID_ARGUMENT
    naming the field, in every RPC alike; the same request with valid fields is NOT_FOUND.
    The caller mends its own request before it looks for another model.

    Before, Summarize answered NOT_FOUND, and the others INVALID_ARGUMENT."""
    invalid = await _refusal(stub, rpc, is_valid=False)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    field = "target_tokens" if rpc == "Summarize" else "params.temperature"
    assert _violated_fields(invalid) == {field}
    unknown = await _refusal(stub, rpc, is_valid=True)
    assert unknown.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert upstream.requests == []


async def test_unknown_model_is_not_found_with_error_info(stub, upstream):
    """A model no upstream serves is NOT_FOUND with an ErrorInfo naming it."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="no-such-model"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.metadata["model"] == "no-such-model"
    assert upstream.requests == []


async def test_prompt_over_context_window_is_rejected_with_estimate(stub, upstream):
    """A prompt over the window with truncation off is INVALID_ARGUMENT with the numbers."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat("word " * 20_000))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert int(info.metadata["limit_tokens"]) == 4096
    assert int(info.metadata["estimated_tokens"]) > 4096
    assert "messages" in field_violations(caught.value)
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("behaviour", "code", "reason"),
    [
        (Status(503), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (Status(500), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (
            Status(429, headers={"Retry-After": "7"}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
        ),
        (Status(401), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_AUTH"),
        (Status(400), grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (Reset(), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    ],
    ids=["503", "500", "429", "401", "400", "reset"],
)
async def test_upstream_failures_map_to_status_with_details(
    upstream, start_gateway, behaviour, code, reason
):
    """Each upstream failure maps to its documented code with an ErrorInfo naming the upstream."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(behaviour)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason
    assert info.metadata["upstream"] == "up0"
    assert "127.0.0.1" not in caught.value.details()
    assert str(upstream.port) not in caught.value.details()


async def test_upstream_429_retry_after_becomes_retry_info(upstream, start_gateway):
    """The upstream's Retry-After reaches the caller as RetryInfo."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(429, headers={"Retry-After": "7"}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert retry_delay_s(caught.value) == pytest.approx(7, abs=0.01)


async def test_an_absurd_retry_after_still_maps_to_resource_exhausted(upstream, start_gateway):
    """A Retry-After beyond what a Duration holds is no crash into UNKNOWN: the caller is
    told `max_retry_after_s` (60 s by default), the longest the gateway itself waits."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(429, headers={"Retry-After": "1e20"}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "UPSTREAM_RATE_LIMITED"
    assert retry_delay_s(caught.value) == 60
    assert dict(caught.value.trailing_metadata())[RETRY_PUSHBACK_TRAILER] == "60000"


async def test_a_retry_after_date_out_of_range_is_ignored_and_the_call_retried(
    upstream, start_gateway
):
    """A 503 whose Retry-After is a date with a number no date holds is a 503 like any
    other (the wait unreadable, so ignored): retried, never UNKNOWN."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    date = "Thu, 01 Jan 2026 00:00:" + "9" * 20 + " GMT"
    upstream.script(Status(503, headers={"Retry-After": date}), Reply(content="second"))
    response = await gateway.stub.Complete(chat())
    assert response.content == "second"
    assert response.metadata.attempts == 2


async def test_an_unavailable_upstream_whose_breaker_opened_says_when_to_retry(
    upstream, start_gateway
):
    """No Retry-After, breaker opened by the failure: RetryInfo is its cool-down."""
    resilience = {"attempts": 1, "breaker_consecutive_failures": 1, "breaker_cool_down_s": 30}
    gateway = await start_gateway(gateway_config(upstream.base_url, resilience=resilience))
    upstream.script(Status(503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert retry_delay_s(caught.value) == pytest.approx(30, abs=2)


@pytest.mark.parametrize(
    "behaviour",
    [CutStream(after_chunks=2), EndWithoutDone(after_chunks=2), MalformedSSE(after_chunks=1)],
    ids=["cut", "no-done", "malformed"],
)
async def test_broken_stream_after_deltas_is_unavailable_never_ok(
    upstream, start_gateway, behaviour
):
    """A cut, unterminated or malformed stream ends UNAVAILABLE, never a silent OK."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(behaviour)
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.stub.CompleteStream(chat_stream()):
            assert not event.HasField("final"), "a broken stream must not end with a final event"
            received.append(event.delta.content)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(received) >= 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_redirect_is_unavailable_saying_so_and_fails_over(
    upstream, start_gateway, is_stream
):
    """A 301 (`http://` moved to `https://`, say) is not followed, for the key would go
    with it: UNAVAILABLE with its status and what mends it, not a malformed answer, and
    the call fails over to the next upstream."""
    redirect = Status(301, body="<html>moved</html>", headers={"Location": "https://x.test/v1"})
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(redirect)
    call = gateway.stub.CompleteStream(chat_stream()) if is_stream else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if call is not None:
            [event async for event in call]
        else:
            await gateway.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert (info.reason, info.metadata["http_status"]) == ("UPSTREAM_UNAVAILABLE", "301")
    assert "redirect" in (caught.value.details() or "")
    async with FakeUpstream(models=(FAKE_MODEL,)) as second:
        both = await start_gateway(gateway_config(upstream.base_url, second.base_url))
        upstream.script(redirect, redirect, redirect)
        answered = await both.stub.Complete(chat())
        assert answered.metadata.upstream == "up1"


# Errors sent in place of an answer, with a 200: OpenRouter's (its `code` the status it
# stands for), and an OpenAI-shaped one a reseller relays.
OPENROUTER_RATE_LIMITED = '{"error": {"code": 429, "message": "Rate limit exceeded"}}'
RELAYED_TOO_LONG = (
    '{"error": {"message": "This model\'s maximum context length is 8192 tokens.", '
    '"type": "invalid_request_error", "code": "context_length_exceeded"}}'
)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "case",
    [
        (OPENROUTER_RATE_LIMITED, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 3),
        (RELAYED_TOO_LONG, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED", 1),
    ],
    ids=["rate-limited", "context-exceeded"],
)
async def test_an_error_sent_with_a_success_status_is_the_error_it_names(
    upstream, start_gateway, case, is_stream
):
    """A 200 whose body is an error says what failed as an error status would: a rate
    limit is retried as one, a prompt over the window is the caller's to shorten (not
    retried as a malformed answer). Each case: the body, then the status, the ErrorInfo
    reason and the attempts the caller gets."""
    body, code, reason, attempts = case
    gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.default = Status(200, body=body)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if is_stream:
            [_ async for _ in gateway.stub.CompleteStream(chat_stream())]
        else:
            await gateway.stub.Complete(chat())
    assert caught.value.code() is code
    assert error_info(caught.value).reason == reason
    assert len(upstream.requests) == attempts


async def test_malformed_body_is_unavailable_without_details_leak(upstream, start_gateway):
    """A non-JSON 200 body is a malformed answer (UNAVAILABLE), never a stack trace."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(200, body="<html>oops</html>"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in caught.value.details()
    assert "oops" not in caught.value.details()


@pytest.mark.parametrize("cached", [-1, 10**20, "many"], ids=["negative", "over-int64", "text"])
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_cached_count_no_call_can_have_leaves_the_reported_counts(
    upstream, start_gateway, cached, is_stream
):
    """A cached-input count that is no count (a detail of the input) is dropped, as a bad
    reasoning count is: the input and output stand as reported, the input priced whole
    (never below the bill), not the whole usage thrown away for an estimate."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Reply(prompt_tokens=1234, completion_tokens=10, cached_tokens=cached))
    if is_stream:
        metadata = [e async for e in gateway.stub.CompleteStream(chat_stream())][-1].final
    else:
        metadata = (await gateway.stub.Complete(chat())).metadata
    usage = metadata.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) == (1234, 10, 0)
    assert not usage.estimated


@pytest.mark.parametrize(
    "reply",
    [Reply(prompt_tokens=10**20), Reply(completion_tokens=-5)],
    ids=["over-int64", "negative-output"],
)
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_impossible_usage_counts_are_estimated_not_billed(
    upstream, start_gateway, reply, is_stream
):
    """Token counts no upstream can mean are neither billed (a credit, or billions) nor
    a failed answer (retried, so billed twice): the answer is served once, its usage
    estimated and flagged."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(reply)
    if is_stream:
        events = [e async for e in gateway.stub.CompleteStream(chat_stream())]
        metadata = events[-1].final
    else:
        metadata = (await gateway.stub.Complete(chat())).metadata
    assert metadata.usage.estimated
    assert 0 < metadata.usage.input_tokens < 1000
    assert 0 < metadata.cost_usd < 0.001
    assert len(upstream.requests) == 1


# How providers say why they refuse a request (400): OpenAI's error object, vLLM's bare
# one (before 0.10) and llama.cpp's, whose `code` is the status, a number.
OPENAI_REFUSAL = json.dumps(
    {
        "error": {
            "message": "Invalid 'tools[0].function.name': string does not match pattern.",
            "type": "invalid_request_error",
            "param": "tools[0].function.name",
            "code": "invalid_value",
        }
    }
)
VLLM_REFUSAL = json.dumps(
    {
        "object": "error",
        "message": "temperature must be non-negative, got -1.0.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
)
LLAMA_CPP_REFUSAL = json.dumps(
    {
        "error": {
            "code": 400,
            "message": "Unsupported param: logprobs",
            "type": "invalid_request_error",
        }
    }
)
MODEL_NOT_FOUND = json.dumps(
    {
        "error": {
            "message": "The model `fake-model` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
)


@pytest.mark.parametrize(
    ("body", "message", "metadata"),
    [
        (
            OPENAI_REFUSAL,
            "Invalid 'tools[0].function.name': string does not match pattern.",
            {"upstream_param": "tools[0].function.name", "upstream_code": "invalid_value"},
        ),
        (VLLM_REFUSAL, "temperature must be non-negative, got -1.0.", {}),
        (LLAMA_CPP_REFUSAL, "Unsupported param: logprobs", {}),
    ],
    ids=["openai", "vllm", "llama.cpp"],
)
async def test_an_upstreams_refusal_says_why(upstream, start_gateway, body, message, metadata):
    """A 400 relays the upstream's own message after the gateway's sentence, and in the
    ErrorInfo with its `param` and `code` when they are strings: the caller can mend its
    request. It used to say only `rejected the request (HTTP 400)`."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(400, body=body))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == f"upstream 'up0' rejected the request (HTTP 400): {message}"
    info = error_info(refused)
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    relayed = {k: v for k, v in info.metadata.items() if k.startswith("upstream_")}
    assert relayed == {"upstream_message": message, **metadata}


async def test_a_model_the_upstream_does_not_have_says_so(upstream, start_gateway):
    """A 404 for a model the upstream does not serve relays its message and code."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(404, body=MODEL_NOT_FOUND))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().endswith(
        "(HTTP 404): The model `fake-model` does not exist or you do not have access to it."
    )
    info = error_info(refused)
    assert (info.metadata["http_status"], info.metadata["upstream_code"]) == (
        "404",
        "model_not_found",
    )


async def test_a_streams_refusal_says_why(upstream, start_gateway):
    """A stream the upstream refuses before its first event relays the same as a unary call."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(422, body=OPENAI_REFUSAL))
    refused = await stream_error(gateway.stub.CompleteStream(chat_stream()))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == (
        "upstream 'up0' rejected the request (HTTP 422): "
        "Invalid 'tools[0].function.name': string does not match pattern."
    )
    assert error_info(refused).metadata["upstream_param"] == "tools[0].function.name"


def _extra_forbidden(field: str, value: object) -> dict[str, object]:
    """A pydantic validation error refusing `field`, quoting the value refused."""
    return {
        "type": "extra_forbidden",
        "loc": ["body", field],
        "msg": "Extra inputs are not permitted",
        "input": value,
    }


# Mistral's API's 422, its message an object; and a FastAPI server's bare one, each error's
# `input` quoting the request (the caller's prompt, a key).
MISTRAL_422 = json.dumps(
    {
        "object": "error",
        "message": {"detail": [_extra_forbidden("seed", f"SECRET-PROMPT {PROVIDER_KEY}")]},
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
)
FASTAPI_422 = json.dumps(
    {
        "detail": [
            {
                "type": "string_type",
                "loc": ["body", "messages", 0, "content"],
                "msg": "Input should be a valid string",
                "input": "SECRET-PROMPT",
            },
            *(_extra_forbidden(f"field_{i}", "SECRET-PROMPT") for i in range(4)),
        ]
    }
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (MISTRAL_422, "body.seed: Extra inputs are not permitted (extra_forbidden)"),
        (
            FASTAPI_422,
            "body.messages.0.content: Input should be a valid string (string_type); "
            "body.field_0: Extra inputs are not permitted (extra_forbidden); "
            "body.field_1: Extra inputs are not permitted (extra_forbidden); and 2 more",
        ),
    ],
    ids=["mistral", "fastapi"],
)
async def test_a_validation_refusal_says_which_fields_and_why(
    upstream, start_gateway, body, message
):
    """A 422 of pydantic's validation errors (Mistral's API, its message an object; a
    FastAPI server's bare `detail`) relays each error's field and why, the first three,
    never the value it refused (the caller's prompt, a key), unary and streamed alike.

    Before, it relayed nothing: the caller heard only `rejected the request (HTTP 422)`."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(422, body=body))
    unary = await rpc_error(gateway.stub.Complete(chat()))
    upstream.script(Status(422, body=body))
    streamed = await stream_error(gateway.stub.CompleteStream(chat_stream()))
    for refused in (unary, streamed):
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.details() == f"upstream 'up0' rejected the request (HTTP 422): {message}"
        info = error_info(refused)
        assert info.reason == "UPSTREAM_REJECTED_REQUEST"
        relayed = {k: v for k, v in info.metadata.items() if k.startswith("upstream_")}
        assert relayed == {"upstream_message": message}
        assert "SECRET-PROMPT" not in str(rich_status(refused))


def _body_saying(message: str) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}})


@pytest.mark.parametrize(
    "status",
    [
        Status(401, body=_body_saying("Incorrect API key provided: sk-proj-****1234. CANARY")),
        Status(402, body=_body_saying("Insufficient Balance on account acct-42 CANARY")),
        Status(403, body=_body_saying("Project proj_abc does not have access CANARY")),
        Status(429, body=_body_saying("Rate limit reached for org-xyz CANARY")),
        Status(500, body=_body_saying("Internal error at db-7 CANARY")),
    ],
    ids=["401", "402", "403-key", "429", "500"],
)
async def test_a_refusal_of_the_gateways_key_account_or_health_relays_nothing(
    upstream, start_gateway, status
):
    """A 401/402/403/429/5xx body is the operator's (it can quote the gateway's key or the
    account's state): none of it reaches the caller, who gets the gateway's sentence."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(status)
    refused = await rpc_error(gateway.stub.Complete(chat()))
    assert "CANARY" not in refused.details()
    assert "sk-proj" not in refused.details()
    info = error_info(refused)
    assert info.reason != "UPSTREAM_REJECTED_REQUEST"
    assert not [key for key in info.metadata if key.startswith("upstream_")]


OTHER_UPSTREAM_KEY = "other-upstream-key-3c1f9a7e"
PROXY_PASSWORD = "proxy-password-8b2d4e6f"


async def test_a_refusal_quoting_a_secret_relays_it_redacted(upstream, start_gateway):
    """A 400 whose message quotes the upstream's key, another upstream's, a proxy
    credential, a bearer token or an `sk-` key relays each as `[redacted]`."""
    data = gateway_config_data(upstream.base_url, "http://127.0.0.1:9/v1", **ONE_ATTEMPT)
    data["upstreams"][0] |= {"api_key_env": "KEY_0", "proxy_authorization_env": "PROXY_0"}
    data["upstreams"][1] |= {"api_key_env": "KEY_1", "models": ["other-model"]}
    environ = {
        "KEY_0": PROVIDER_KEY,
        "KEY_1": OTHER_UPSTREAM_KEY,
        "PROXY_0": f"gateway:{PROXY_PASSWORD}",
    }
    gateway = await start_gateway(parse_config(data, source="<test>", environ=environ))
    message = (
        f"key {PROVIDER_KEY} and {OTHER_UPSTREAM_KEY}, proxy {PROXY_PASSWORD}, "
        "header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc, masked sk-proj-****1234"
    )
    upstream.script(Status(400, body=_body_saying(message)))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    relayed = error_info(refused).metadata["upstream_message"]
    assert relayed == (
        "key [redacted] and [redacted], proxy [redacted], "
        "header Authorization: [redacted], masked [redacted]"
    )
    assert refused.details().endswith(relayed)
    assert upstream.requests[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_a_refusal_quoting_part_of_a_key_relays_that_part_redacted(upstream, start_gateway):
    """A 400 quoting the upstream's key cut short, or without its first characters (16
    characters of it in a row or more), relays that part as `[redacted]`: a key not shaped
    `sk-...` is otherwise known only whole."""
    key = "AZ3f9c1e7b5d2a8c4e6f0b9d3a7c1e5f"  # an Azure-style key: no `sk-` to match
    data = gateway_config_data(upstream.base_url, **ONE_ATTEMPT)
    data["upstreams"][0] |= {"api_key_env": "KEY_0"}
    gateway = await start_gateway(parse_config(data, source="<test>", environ={"KEY_0": key}))
    message = f"header value '{key[:24]}...' is invalid; token {key[2:]}; name AZ3f9c1e ok"
    upstream.script(Status(400, body=_body_saying(message)))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    relayed = error_info(refused).metadata["upstream_message"]
    assert relayed == "header value '[redacted]...' is invalid; token [redacted]; name AZ3f9c1e ok"
    assert key[8:24] not in refused.details()
    assert upstream.requests[0].headers["authorization"] == f"Bearer {key}"


async def test_a_huge_message_is_relayed_cut_and_without_control_characters(
    upstream, start_gateway
):
    """A 1 MB message is cut to its first 500 characters (the status must fit a trailer);
    its control characters (a forged log line, terminal escapes) become spaces."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    message = "bad\n\x1b[31mvalue\t\x00 " + "x" * 1_000_000
    upstream.script(Status(400, body=_body_saying(message)))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    relayed = error_info(refused).metadata["upstream_message"]
    assert len(relayed) == 500
    assert relayed.startswith("bad [31mvalue xxx")
    assert relayed.endswith("x...")
    assert refused.details().endswith(relayed)


async def test_a_16_mib_message_is_scrubbed_only_as_far_as_is_relayed(
    upstream, start_gateway, monkeypatch
):
    """Of a refusal's 16 MiB message, only what the relayed 500 bytes and a key straddling
    their cut can come from is scrubbed: the whole was, a second of the event loop's time
    for each such refusal, every other call waiting."""
    scrubbed_lengths: list[int] = []
    controls = relay._CONTROLS

    class CountingControls:
        def sub(self, replacement: str, text: str) -> str:
            scrubbed_lengths.append(len(text))
            return controls.sub(replacement, text)

    monkeypatch.setattr(relay, "_CONTROLS", CountingControls())
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    message = "bad value " * (1_600_000)
    upstream.script(Status(400, body=_body_saying(message)))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    relayed = error_info(refused).metadata["upstream_message"]
    assert relayed == message[:497] + "..."
    assert max(scrubbed_lengths) < 100_000


async def test_a_long_message_of_wide_characters_fits_a_default_clients_trailers(
    upstream, start_gateway
):
    """A message in Chinese (three bytes a character) or emoji is cut to 500 bytes of
    UTF-8, not 500 characters: it goes out three times in the trailers, percent-encoded in
    one, and 500 characters made over 8 KiB, which a client with gRPC's default metadata
    limit (Java's; C-core's at random) refused as RESOURCE_EXHAUSTED, losing the status."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    message = "请求参数无效" * 100
    body = json.dumps({"error": {"message": message, "param": "参数" * 50, "code": "无效" * 50}})
    limit = [("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192)]
    async with grpc.aio.insecure_channel(gateway.server.address, options=limit) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        upstream.script(Status(400, body=body))
        unary = await rpc_error(stub.Complete(chat()))
        upstream.script(Status(400, body=body))
        streamed = await stream_error(stub.CompleteStream(chat_stream()))
    for refused in (unary, streamed):
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        relayed = error_info(refused).metadata["upstream_message"]
        assert len(relayed.encode()) <= 500
        assert relayed.endswith("...")
        assert message.startswith(relayed.removesuffix("..."))


@pytest.mark.parametrize(
    "body",
    ["<html><body><h1>400 Bad Request</h1>nginx</body></html>", '{"detail": "no"}', ""],
    ids=["html", "no-error", "empty"],
)
async def test_a_refusal_that_says_nothing_readable_relays_nothing(upstream, start_gateway, body):
    """A 400 whose body is no OpenAI error (a proxy's HTML page) relays nothing: the
    caller gets the gateway's sentence alone, as before."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **ONE_ATTEMPT))
    upstream.script(Status(400, body=body))
    refused = await rpc_error(gateway.stub.Complete(chat()))
    assert refused.details() == "upstream 'up0' rejected the request (HTTP 400)"
    assert not [key for key in error_info(refused).metadata if key.startswith("upstream_")]


async def _serving_one_head(head: bytes, body: bytes) -> asyncio.Server:
    """A server that answers each request with `head` and `body`: a head no aiohttp
    server would send (control characters in a header's value)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", request_head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("status", "body"),
    [(b"200 OK", b"<html>Sign in</html>"), (b"404 Not Found", b'{"error": "no route"}')],
    ids=["login-page", "unrouted-path"],
)
async def test_an_answers_content_type_is_told_without_its_control_characters(
    start_gateway, status, body
):
    """A server that is no OpenAI upstream (a captive portal, a proxy's page), its
    Content-Type holding an escape sequence and a NUL: the status and its ErrorInfo name
    the media type with those as spaces, as a relayed message's.

    Before, they reached the caller as sent: the escape sequence its terminal, the NUL
    its log."""
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\x1b[2J\x00x\r\n"
    server = await _serving_one_head(head, body)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(gateway_config(url, **ONE_ATTEMPT))
        refused = await rpc_error(gateway.stub.Complete(chat()))
    assert refused.code() is grpc.StatusCode.UNAVAILABLE
    shown = error_info(refused).metadata["content_type"]
    assert shown == "text/html [2j x"
    assert "\x1b" not in refused.details()
    assert "\x00" not in refused.details()
