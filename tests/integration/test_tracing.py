"""Spans and metrics of the gateway, caught in memory, for success, stream and failure."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import time
import urllib.parse
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.logs import GRPC_AIO_LOGGER, DeadlineRaceFilter
from service.upstream import client as client_module
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream, Hang, Reply, Status, ToolCallReply
from tests.forward_proxy import ForwardProxy
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.telemetry_support import Captured, attributes_of, captured_telemetry

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
UNARY_SPAN = "llmgateway.v1.CompletionService/Complete"
STREAM_SPAN = "llmgateway.v1.CompletionService/CompleteStream"
ATTEMPT_SPAN = f"chat {FAKE_MODEL}"
DURATION = "gen_ai.client.operation.duration"
# The test catalog: 0.14 USD per million input tokens, 0.42 per million output.
FAKE_REPLY_COST = (7 * 0.14 + 3 * 0.42) / 1e6


@pytest.fixture
def captured() -> Captured:
    """Telemetry exporting to memory."""
    return captured_telemetry()


@pytest.fixture
async def traced(upstream, start_gateway, captured):
    """A gateway (one attempt per call) whose telemetry is caught in memory."""
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    return await start_gateway(config, telemetry=captured.telemetry)


async def test_unary_span_tree_continues_the_callers_trace(traced, captured):
    """A SERVER span in the caller's trace, a CLIENT child per attempt, GenAI attributes."""
    params = pb.GenerationParams(temperature=0.5, top_p=0.9, max_tokens=64)
    await traced.stub.Complete(chat(params=params), metadata=(("traceparent", TRACEPARENT),))
    server, client = captured.span(UNARY_SPAN), captured.span(ATTEMPT_SPAN)
    assert server.kind is SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == CALLER_TRACE_ID
    assert format(server.parent.span_id, "016x") == CALLER_SPAN_ID
    assert client.kind is SpanKind.CLIENT
    assert client.context.trace_id == server.context.trace_id
    assert client.parent.span_id == server.context.span_id
    attrs = attributes_of(client)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "up0"
    assert attrs["gen_ai.request.model"] == FAKE_MODEL
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert attrs["gen_ai.request.max_tokens"] == 64
    assert attrs["gen_ai.response.id"].startswith("chatcmpl-")
    assert attrs["gen_ai.response.model"] == FAKE_MODEL
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == 7
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["llm_gateway.upstream"] == "up0"
    assert attrs["llm_gateway.attempt"] == 1
    assert attrs["llm_gateway.cost.usd"] == pytest.approx(FAKE_REPLY_COST, abs=1e-12)
    assert attrs["llm_gateway.usage.reasoning_tokens"] == 0
    assert "error.type" not in attrs
    assert "llm_gateway.request.reasoning_effort" not in attrs
    rpc = attributes_of(server)
    assert rpc["rpc.system"] == "grpc"
    assert rpc["rpc.method"] == "Complete"
    assert rpc["rpc.grpc.status_code"] == 0
    assert rpc["llm_gateway.cost.usd"] == pytest.approx(FAKE_REPLY_COST, abs=1e-12)
    assert rpc["gen_ai.usage.input_tokens"] == 7
    assert rpc["llm_gateway.cache.hit"] is False
    assert rpc["llm_gateway.attempts"] == 1
    assert rpc["llm_gateway.tenant"] == "default"
    assert server.status.status_code is StatusCode.UNSET


async def test_traceparent_reaches_the_upstream_with_the_callers_trace_id(
    traced, captured, upstream
):
    """The upstream request carries traceparent: the caller's trace id, the attempt as parent."""
    await traced.stub.Complete(chat(), metadata=(("traceparent", TRACEPARENT),))
    sent = upstream.requests[0].headers["traceparent"]
    version, trace_id, parent_id, flags = sent.split("-")
    client = captured.span(ATTEMPT_SPAN)
    assert (version, trace_id, flags) == ("00", CALLER_TRACE_ID, "01")
    assert parent_id == format(client.context.span_id, "016x")


async def test_a_caller_that_did_not_sample_gets_no_spans_and_its_decision_passes_on(
    traced, captured, upstream
):
    """A caller's unsampled trace (flags 00) is followed, as the default sampler follows
    its parent: nothing is recorded or exported, and the upstream gets the same trace,
    still unsampled, with tracestate kept."""
    unsampled = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-00"
    metadata = (("traceparent", unsampled), ("tracestate", "vendor=opaque"))
    await traced.stub.Complete(chat(), metadata=metadata)
    [e async for e in traced.stub.CompleteStream(chat_stream(), metadata=metadata)]
    assert captured.spans() == []
    for request in upstream.requests:
        version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", CALLER_TRACE_ID, "00")
        assert parent_id != CALLER_SPAN_ID  # the gateway's own (unrecorded) attempt span
        assert request.headers["tracestate"] == "vendor=opaque"


@pytest.mark.parametrize(
    ("sampler", "is_recorded"),
    [("always_off", False), ("traceidratio", True), ("parentbased_traceidratio", True)],
)
async def test_the_configured_sampler_decides_through_the_server(
    upstream, start_gateway, monkeypatch, sampler, is_recorded
):
    """OTEL_TRACES_SAMPLER is the SDK's, as before: off records nothing and tells the
    upstream so; a ratio sampler (here keeping every trace) records the whole tree."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    captured = captured_telemetry()
    gw = await start_gateway(gateway_config(upstream.base_url), telemetry=captured.telemetry)
    await gw.stub.Complete(chat())
    names = sorted(span.name for span in captured.spans())
    assert names == (sorted([UNARY_SPAN, ATTEMPT_SPAN]) if is_recorded else [])
    flags = int(upstream.requests[0].headers["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 0x01 == int(is_recorded)  # sampled
    assert flags & 0x02  # a root trace's id is random (W3C Trace Context level 2), as the SDK says


@pytest.mark.parametrize("forward_baggage", [False, True])
async def test_without_a_trace_exporter_the_callers_context_passes_through(
    upstream, start_gateway, forward_baggage
):
    """Telemetry off: the caller's traceparent reaches the upstream unchanged; its
    baggage, which may carry internal values, only with `telemetry.forward_baggage`."""
    config = gateway_config(upstream.base_url, telemetry={"forward_baggage": forward_baggage})
    gateway = await start_gateway(config)
    metadata = (("traceparent", TRACEPARENT), ("baggage", "user.id=u-1234,team=search"))
    await gateway.stub.Complete(chat(), metadata=metadata)
    events = [e async for e in gateway.stub.CompleteStream(chat_stream(), metadata=metadata)]
    assert events[-1].HasField("final")
    await gateway.stub.Complete(chat("no trace context"))
    with_context, without = upstream.requests[:2], upstream.requests[2]
    for request in with_context:
        assert request.headers["traceparent"] == TRACEPARENT  # no gateway span in between
        sent = request.headers.get("baggage")
        assert sent == ("user.id=u-1234,team=search" if forward_baggage else None)
    assert "traceparent" not in without.headers
    assert "baggage" not in without.headers


async def test_a_recording_gateway_keeps_the_callers_baggage_from_upstreams(traced, upstream):
    """With spans recorded the upstream gets the gateway's own traceparent, and still no
    baggage unless the operator forwards it."""
    metadata = (("traceparent", TRACEPARENT), ("baggage", "user.id=u-1234"))
    await traced.stub.Complete(chat(), metadata=metadata)
    headers = upstream.requests[0].headers
    assert CALLER_TRACE_ID in headers["traceparent"]
    assert "baggage" not in headers


async def test_a_call_without_trace_context_starts_a_new_trace(traced, captured, upstream):
    """Without traceparent the RPC span is a root, and the upstream still gets a traceparent."""
    await traced.stub.Complete(chat())
    server = captured.span(UNARY_SPAN)
    assert server.parent is None
    assert format(server.context.trace_id, "032x") in upstream.requests[0].headers["traceparent"]


async def test_stream_spans_carry_time_to_first_token_and_usage(traced, captured, upstream):
    """A streamed call gets the same tree, with time to first token and usage on the attempt."""
    upstream.script(Reply(chunks=3, chunk_delay_s=0.01))
    items = [e async for e in traced.stub.CompleteStream(chat_stream())]
    client = attributes_of(captured.span(ATTEMPT_SPAN))
    server = attributes_of(captured.span(STREAM_SPAN))
    assert client["llm_gateway.time_to_first_token_ms"] > 0
    assert client["gen_ai.usage.output_tokens"] == 3
    assert client["gen_ai.response.finish_reasons"] == ("stop",)
    assert server["llm_gateway.cost.usd"] == pytest.approx(items[-1].final.cost_usd, abs=1e-12)
    assert server["llm_gateway.usage.estimated"] is False
    assert captured.total("gen_ai.client.operation.time_to_first_chunk") > 0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_queued_calls_span_says_the_time_to_first_token_its_response_does(
    upstream, start_gateway, captured, stream
):
    """A call queued for admission counts its time to first token from its arrival, on
    its RPC span as in its response, and its span's `llm_gateway.queued_ms` is its
    response's `queued_ms`, the wait in line.

    Before, the response counted its wait in line and the span did not: a call that
    waited 400 ms for admission had 793 ms in its response and 402 ms on its span."""
    config = gateway_config(
        upstream.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 1}
    )
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.default = Reply(delay_s=0.3)
    held = asyncio.ensure_future(gateway.stub.Complete(chat()))
    for _ in range(1000):  # up to 10 s for the held call to reach the upstream
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    if stream:
        timings = [e async for e in gateway.stub.CompleteStream(chat_stream())][-1].final.timings
        span = await captured.ended(STREAM_SPAN)
    else:
        timings = (await gateway.stub.Complete(chat())).metadata.timings
    await held
    if not stream:
        async with asyncio.timeout(5):  # the queued call's span ends just after its answer
            while len(unary := [s for s in captured.spans() if s.name == UNARY_SPAN]) < 2:
                await asyncio.sleep(0.005)
        span = max(unary, key=lambda s: s.end_time or 0)
    spans_first_token_ms = attributes_of(span)["llm_gateway.time_to_first_token_ms"]
    assert spans_first_token_ms == pytest.approx(timings.time_to_first_token_ms)
    assert timings.queued_ms > 0
    assert attributes_of(span)["llm_gateway.queued_ms"] == pytest.approx(timings.queued_ms)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_an_attempt_whose_usage_left_out_a_count_records_no_zero_for_it(
    traced, captured, upstream, stream
):
    """Usage with the prompt's count and no output's: the attempt's span carries the
    1,234 input tokens and nothing for the output, and no cost, while the call's answer,
    RPC span and token metric have the output estimated and priced.

    Before, the attempt said 0 output tokens and the cost of the input alone, less than
    the call's, and the token histogram counted an answer of 0 tokens."""
    upstream.script(Reply(content="one two three four", raw_usages=({"prompt_tokens": 1234},)))
    if stream:
        items = [e async for e in traced.stub.CompleteStream(chat_stream())]
        answer, rpc_span = items[-1].final, STREAM_SPAN
    else:
        answer, rpc_span = (await traced.stub.Complete(chat())).metadata, UNARY_SPAN
    attempt = attributes_of(captured.span(ATTEMPT_SPAN))
    assert attempt["gen_ai.usage.input_tokens"] == 1234
    assert "gen_ai.usage.output_tokens" not in attempt
    assert "llm_gateway.cost.usd" not in attempt
    rpc = attributes_of(await captured.ended(rpc_span))
    assert answer.usage.output_tokens > 0
    assert rpc["gen_ai.usage.output_tokens"] == answer.usage.output_tokens
    assert rpc["llm_gateway.cost.usd"] == answer.cost_usd
    assert captured.tokens() == {
        ("input", True): 1234,
        ("output", True): answer.usage.output_tokens,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_the_token_metric_counts_estimated_usage_flagged_as_such(
    traced, captured, upstream, stream
):
    """A call whose upstream reported no usage is on `gen_ai.client.token.usage` with its
    estimated counts, flagged `llm_gateway.usage.estimated: true`, beside a reported one
    flagged false: the metric sums to what the responses and `GetUsage` bill.

    Before, estimated calls were missing from it, and a sum of it under-counted."""
    upstream.script(Reply(), Reply(content="one two three four", include_usage=False))
    answers = [await answered(traced, stream) for _ in range(2)]
    reported, estimated = (answer.usage for answer in answers)
    assert (reported.estimated, estimated.estimated) == (False, True)
    assert captured.tokens() == {
        ("input", False): reported.input_tokens,
        ("output", False): reported.output_tokens,
        ("input", True): estimated.input_tokens,
        ("output", True): estimated.output_tokens,
    }
    total = (await traced.stub.GetUsage(pb.GetUsageRequest())).total
    assert total.usage.input_tokens == reported.input_tokens + estimated.input_tokens
    assert total.usage.output_tokens == reported.output_tokens + estimated.output_tokens
    for point in captured.points("gen_ai.client.token.usage"):
        assert point.attributes["gen_ai.provider.name"] == "up0"
        assert "error.type" not in point.attributes


async def answered(gateway, stream: bool) -> pb.CallMetadata:
    """One call's final metadata, unary or streamed."""
    if stream:
        return [e async for e in gateway.stub.CompleteStream(chat_stream())][-1].final
    return (await gateway.stub.Complete(chat())).metadata


async def test_upstream_failure_marks_both_spans_and_counts_the_error(traced, captured, upstream):
    """A 500 gives the attempt error.type 500, the RPC UNAVAILABLE, and an upstream error count."""
    upstream.script(Status(500))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await traced.stub.Complete(chat())
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    client, server = captured.span(ATTEMPT_SPAN), await captured.ended(UNARY_SPAN)
    assert client.status.status_code is StatusCode.ERROR
    assert attributes_of(client)["error.type"] == "500"
    assert server.status.status_code is StatusCode.ERROR
    assert attributes_of(server)["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert attributes_of(server)["error.type"] == "UPSTREAM_UNAVAILABLE"
    assert captured.total("llm_gateway.upstream.errors", llm_gateway__upstream="up0") == 1
    assert captured.total("gen_ai.client.operation.duration", error__type="500") > 0, (
        "the failed attempt's duration is recorded with its error.type"
    )


async def test_each_route_and_answer_model_has_its_own_attempt_points(
    upstream, start_gateway, captured
):
    """Two upstreams of one model: the first fails and the call fails over to the second,
    which answers as another model; the next call fails there and is answered by the
    first. Each attempt's duration and tokens are recorded under its own upstream and
    its answer's model (none for a failure, whose `error.type` is its duration's alone)."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as second:
        config = gateway_config(
            upstream.base_url, second.base_url, resilience={"attempts": 2}, cache={"enabled": False}
        )
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        upstream.script(Status(500), Reply())
        second.script(Reply(model="snapshot-b"), Status(503))
        await gateway.stub.Complete(chat())
        await gateway.stub.Complete(chat())
        other = urllib.parse.urlsplit(second.base_url).port

    def by_route(name: str) -> dict[tuple[Any, ...], tuple[int, float]]:
        return {
            (
                p.attributes["server.port"],
                p.attributes.get("gen_ai.response.model"),
                p.attributes.get("error.type"),
                p.attributes.get("gen_ai.token.type"),
            ): (p.count, p.sum)
            for p in captured.points(name)
        }

    first = urllib.parse.urlsplit(upstream.base_url).port
    assert {key: count for key, (count, _) in by_route(DURATION).items()} == {
        (first, None, "500", None): 1,
        (other, "snapshot-b", None, None): 1,
        (other, None, "503", None): 1,
        (first, FAKE_MODEL, None, None): 1,
    }
    assert len(upstream.requests) == len(second.requests) == 2
    assert by_route("gen_ai.client.token.usage") == {
        (port, model, None, kind): (1, tokens)
        for port, model in ((other, "snapshot-b"), (first, FAKE_MODEL))
        for kind, tokens in (("input", 7), ("output", 3))
    }


async def test_retry_through_the_pool_gives_one_client_span_per_attempt(
    upstream, start_gateway, captured
):
    """A 500 then success: two CLIENT spans under one SERVER span, numbered, with the wait."""
    config = gateway_config(upstream.base_url, resilience={"attempts": 3, "backoff_base_s": 0.05})
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Status(500), Reply())
    response = await gateway.stub.Complete(chat())
    assert response.metadata.attempts == 2
    server = captured.span(UNARY_SPAN)
    attempts = sorted(
        (s for s in captured.spans() if s.kind is SpanKind.CLIENT),
        key=lambda s: attributes_of(s)["llm_gateway.attempt"],
    )
    assert [attributes_of(s)["llm_gateway.attempt"] for s in attempts] == [1, 2]
    assert all(
        s.parent is not None and s.parent.span_id == server.context.span_id for s in attempts
    )
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attributes_of(attempts[0])["error.type"] == "500"
    assert attempts[1].status.status_code is not StatusCode.ERROR
    assert "llm_gateway.retry.wait_ms" in attributes_of(attempts[1])
    assert attributes_of(attempts[1])["llm_gateway.retry.wait_ms"] >= 0
    traceparents = [r.headers["traceparent"] for r in upstream.requests]
    assert len(set(traceparents)) == 2, "each attempt is its own span in the trace"


async def test_a_batch_span_carries_the_usage_and_cost_of_all_its_items(traced, captured):
    """The CompleteBatch span totals its items, as the batch summary does.

    Before, each item's completion overwrote the RPC span's usage and cost, so the span
    showed one item's cost (and a Summarize span one part's) as the whole call's.
    """
    items = [pb.BatchItem(id=str(i), request=chat(f"question {i}")) for i in range(3)]
    events = [e async for e in traced.stub.CompleteBatch(pb.CompleteBatchRequest(items=items))]
    summary = events[-1].summary
    assert summary.succeeded == 3
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/CompleteBatch"))
    assert rpc["gen_ai.usage.input_tokens"] == summary.usage.input_tokens == 21
    assert rpc["gen_ai.usage.output_tokens"] == summary.usage.output_tokens == 9
    assert rpc["llm_gateway.cost.usd"] == pytest.approx(summary.cost_usd, abs=1e-12)
    assert rpc["llm_gateway.attempts"] == 3


async def test_a_batch_span_carries_its_items_queued_time_and_no_ones_first_token(
    traced, captured, upstream
):
    """A batch's span has as `llm_gateway.queued_ms` its items' queued times summed, each
    as its result reports it, and no `llm_gateway.time_to_first_token_ms`: each item's
    upstream call has its own attempt span.

    Before, both were the last item's: one item's wait for its turn and its first token,
    a figure of no call the dashboard could tell apart from the batch's."""
    upstream.script(*(Reply(delay_s=0.05) for _ in range(3)))
    items = [pb.BatchItem(id=str(i), request=chat(f"question {i}")) for i in range(3)]
    request = pb.CompleteBatchRequest(items=items, concurrency=1)  # each waits for the last
    events = [e async for e in traced.stub.CompleteBatch(request)]
    queued = sorted(e.result.response.metadata.timings.queued_ms for e in events[:-1])
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/CompleteBatch"))
    attempts = [attributes_of(s) for s in captured.spans() if s.kind is SpanKind.CLIENT]
    assert queued[0] < queued[1] < queued[2]
    assert rpc["llm_gateway.queued_ms"] == pytest.approx(sum(queued))
    assert "llm_gateway.time_to_first_token_ms" not in rpc
    assert len(attempts) == 3


async def test_a_batch_span_names_a_model_or_upstream_only_when_its_items_share_it(
    upstream, start_gateway, captured
):
    """A batch's span names the model (asked and answered) and the upstream only when all
    its items had the same, and is a cache hit only when each item was one.

    Before, each was the last item's: a batch over two models and two upstreams named one
    of each, and a batch of one hit and one miss was a hit or not by the order."""
    data = gateway_config_data(upstream.base_url, upstream.base_url)
    data["upstreams"][1]["models"] = ["other-model"]
    data["models"]["other-model"] = data["models"][FAKE_MODEL]
    gateway = await start_gateway(parse_config(data, source="<test>"), telemetry=captured.telemetry)
    cached = chat("cached", params=pb.GenerationParams(temperature=0))
    await gateway.stub.Complete(cached)
    batches = {
        "mixed": [chat("one"), chat("two", model="other-model")],
        "shared": [cached, chat("three")],
        "hits": [cached, cached],
    }
    spans = {}
    for name, requests in batches.items():
        items = [pb.BatchItem(id=str(i), request=r) for i, r in enumerate(requests)]
        request = pb.CompleteBatchRequest(items=items, concurrency=1)
        assert len([e async for e in gateway.stub.CompleteBatch(request)]) == 3
        spans[name] = attributes_of(
            await captured.ended("llmgateway.v1.CompletionService/CompleteBatch")
        )
        captured.exporter.clear()
    for key in ("gen_ai.request.model", "gen_ai.response.model", "llm_gateway.upstream"):
        assert key not in spans["mixed"]
    assert spans["shared"]["gen_ai.request.model"] == FAKE_MODEL
    assert spans["shared"]["llm_gateway.upstream"] == "up0"
    assert spans["shared"]["llm_gateway.cache.hit"] is False  # one hit, one miss
    assert spans["hits"]["llm_gateway.cache.hit"] is True
    assert spans["hits"]["llm_gateway.upstream"] == "up0"
    for name in batches:
        assert "llm_gateway.cache.coalesced" not in spans[name], name


async def test_a_batch_whose_items_shared_calls_in_flight_is_coalesced_not_a_hit(
    upstream, start_gateway, captured
):
    """A batch of two items, one identical to a call in flight (it shares that call) and
    one read from the cache: its span says `llm_gateway.cache.coalesced`, not
    `llm_gateway.cache.hit`: the RPC made no upstream call of its own, but was not
    answered from the cache alone."""
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    deterministic = pb.GenerationParams(temperature=0)
    stored, in_flight = chat("stored", params=deterministic), chat("slow", params=deterministic)
    await gateway.stub.Complete(stored)
    upstream.script(Reply(delay_s=0.5))
    first = asyncio.ensure_future(gateway.stub.Complete(in_flight))
    async with asyncio.timeout(10):
        while len(upstream.requests) < 2:
            await asyncio.sleep(0.005)
    items = [pb.BatchItem(id=str(i), request=r) for i, r in enumerate((in_flight, stored))]
    events = [e async for e in gateway.stub.CompleteBatch(pb.CompleteBatchRequest(items=items))]
    await first
    assert [e.result.response.metadata.cache_hit for e in events[:-1]] == [True, True]
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/CompleteBatch"))
    assert rpc["llm_gateway.cache.hit"] is False
    assert rpc["llm_gateway.cache.coalesced"] is True
    assert len(upstream.requests) == 2


async def test_a_batch_spans_cost_is_the_exact_sum_of_its_items(traced, captured, upstream):
    """Three items of $1,059.5037635 each (43 input tokens at $0.14 a million, 2,522,627,994
    output tokens at $0.42): the span says $3,178.5112905, as the summary and GetUsage do.

    Before, the span added each item's cost to the sum so far as floats, rounded to 12
    places, which at thousands of dollars drifts: 3178.511290500001."""
    big = Reply(prompt_tokens=43, completion_tokens=2_522_627_994)
    upstream.script(big, big, big)
    items = [pb.BatchItem(id=str(i), request=chat(f"question {i}")) for i in range(3)]
    events = [e async for e in traced.stub.CompleteBatch(pb.CompleteBatchRequest(items=items))]
    summary = events[-1].summary
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/CompleteBatch"))
    assert summary.cost_usd == 3178.5112905
    assert rpc["llm_gateway.cost.usd"] == summary.cost_usd


BATCH_SPAN = "llmgateway.v1.CompletionService/CompleteBatch"
BATCH_ITEMS = "llm_gateway.batch.items"


async def test_a_batchs_failed_items_are_counted_by_status_and_marked_on_its_span(
    traced, captured, upstream
):
    """A batch of one answered item, one for a model no upstream serves and one its
    upstream fails with a 500: `llm_gateway.batch.items` counts one of each status (the
    unknown model's name left out: a caller's names are unbounded), and the batch's span,
    OK as its RPC is, has an event for each failed item and says how many failed.

    Before, the RPC counted OK in `llm_gateway.requests` and its span marked nothing: the
    dashboard's error rate read 0% while most of a batch's items failed."""
    upstream.script(Reply(), Status(500))
    requests = [chat("answered"), chat("unknown", model="no-such-model"), chat("failed")]
    items = [pb.BatchItem(id=f"item-{i}", request=r) for i, r in enumerate(requests)]
    request = pb.CompleteBatchRequest(items=items, concurrency=1)
    events = [e async for e in traced.stub.CompleteBatch(request)]
    assert [e.result.error.code for e in events[:-1]] == [0, 5, 14]
    counted = {
        (p.attributes["rpc.grpc.status_code"], p.attributes["gen_ai.request.model"]): p.value
        for p in captured.points(BATCH_ITEMS)
        if p.attributes["llm_gateway.tenant"] == "default"
    }
    assert counted == {(0, FAKE_MODEL): 1, (5, ""): 1, (14, FAKE_MODEL): 1}
    span = await captured.ended(BATCH_SPAN)
    assert span.status.status_code is StatusCode.UNSET
    assert attributes_of(span)["llm_gateway.batch.failed_items"] == 2
    failed = [
        dict(e.attributes or {}) for e in span.events if e.name == "llm_gateway.batch.item_failed"
    ]
    assert failed == [
        {
            "llm_gateway.batch.item.index": 1,
            "llm_gateway.batch.item.id": "item-1",
            "rpc.grpc.status_code": 5,
            "error.type": "MODEL_NOT_FOUND",
            "gen_ai.request.model": "no-such-model",
        },
        {
            "llm_gateway.batch.item.index": 2,
            "llm_gateway.batch.item.id": "item-2",
            "rpc.grpc.status_code": 14,
            "error.type": "UPSTREAM_UNAVAILABLE",
            "gen_ai.request.model": FAKE_MODEL,
        },
    ]


async def test_spans_carry_the_reasoning_effort_and_reasoning_tokens(traced, captured, upstream):
    """The attempt's span names the effort asked for; both spans count the tokens spent
    thinking, and a batch's span adds them up over its items."""
    upstream.default = Reply(content="Paris.", completion_tokens=30, reasoning_tokens=25)
    params = pb.GenerationParams(reasoning_effort=pb.REASONING_EFFORT_HIGH)
    await traced.stub.Complete(chat(params=params))
    client = attributes_of(captured.span(ATTEMPT_SPAN))
    assert client["llm_gateway.request.reasoning_effort"] == "high"
    assert client["llm_gateway.usage.reasoning_tokens"] == 25
    assert attributes_of(captured.span(UNARY_SPAN))["llm_gateway.usage.reasoning_tokens"] == 25
    items = [pb.BatchItem(id=str(i), request=chat(f"question {i}")) for i in range(2)]
    events = [e async for e in traced.stub.CompleteBatch(pb.CompleteBatchRequest(items=items))]
    assert events[-1].summary.usage.reasoning_tokens == 50
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/CompleteBatch"))
    assert rpc["llm_gateway.usage.reasoning_tokens"] == 50


async def test_a_call_shed_as_overloaded_names_its_tenant(upstream, start_gateway, captured):
    """With caller keys on, the caller is known before the call asks for a slot: a call
    refused OVERLOADED carries its tenant on its span, as a served call does."""
    config = secure_config(upstream.base_url, server={"max_in_flight_calls": 1})
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Reply(delay_s=1.0))
    held = asyncio.ensure_future(gateway.stub.Complete(chat(), metadata=as_tenant("team-a")))
    for _ in range(1000):  # up to 10 s for the held call to reach the upstream
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as shed:
        await gateway.stub.Complete(chat(), metadata=as_tenant("team-b"))
    assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await held).content
    tenants = sorted(
        (attributes_of(span)["llm_gateway.tenant"], attributes_of(span)["rpc.grpc.status_code"])
        for span in captured.spans()
        if span.name == UNARY_SPAN
    )
    assert tenants == [("team-a", 0), ("team-b", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])]


async def test_caller_errors_do_not_mark_the_server_span_as_failed(traced, captured):
    """An invalid request ends INVALID_ARGUMENT on the span without an ERROR status."""
    with pytest.raises(grpc.aio.AioRpcError):
        await traced.stub.Complete(chat(model=""))
    server = await captured.ended(UNARY_SPAN)
    assert attributes_of(server)["rpc.grpc.status_code"] == 3
    assert server.status.status_code is StatusCode.UNSET
    assert not [s for s in captured.spans() if s.kind is SpanKind.CLIENT]


async def test_prompt_and_completion_text_are_not_recorded_by_default(traced, captured):
    """Without content capture no span attribute holds the prompt or the completion."""
    await traced.stub.Complete(chat("a secret prompt"))
    for span in captured.spans():
        values = json.dumps({k: str(v) for k, v in attributes_of(span).items()})
        assert "a secret prompt" not in values
        assert "Hello from fake" not in values


async def test_content_capture_records_messages_when_enabled(upstream, start_gateway):
    """With capture_content the attempt span carries input and output messages."""
    captured = captured_telemetry(capture_content=True)
    gw = await start_gateway(gateway_config(upstream.base_url), telemetry=captured.telemetry)
    await gw.stub.Complete(chat("the prompt"))
    [stream_final] = [
        e async for e in gw.stub.CompleteStream(chat_stream("streamed prompt")) if e.final.id
    ]
    unary, streamed = [s for s in captured.spans() if s.kind is SpanKind.CLIENT]
    inputs = json.loads(attributes_of(unary)["gen_ai.input.messages"])
    assert inputs == [{"role": "user", "parts": [{"type": "text", "content": "the prompt"}]}]
    outputs = json.loads(attributes_of(unary)["gen_ai.output.messages"])
    assert outputs[0]["parts"][0]["content"] == "Hello from fake"
    streamed_out = json.loads(attributes_of(streamed)["gen_ai.output.messages"])
    assert streamed_out[0]["parts"][0]["content"] == "Hello from fake"
    assert stream_final.final.usage.output_tokens == 3


async def test_content_capture_records_tool_calls_and_results(upstream, start_gateway):
    """An agent's turn in captured content: the assistant's earlier call and the tool's
    result as input parts, and the model's new calls as output parts, unary and streamed
    (the streamed pieces put back together), arguments as JSON."""
    captured = captured_telemetry(capture_content=True)
    gw = await start_gateway(gateway_config(upstream.base_url), telemetry=captured.telemetry)
    calls = (
        ToolCallReply("call_1", "get_weather", '{"city": "Paris"}'),
        ToolCallReply("call_2", "get_time", "not json"),
    )
    answer = Reply(content="", tool_calls=calls, finish_reason="tool_calls")
    upstream.script(answer, answer)
    turn = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[
            pb.Message(role=pb.ROLE_USER, content="Weather in Paris?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="c0", name="lookup", arguments='{"q": 1}')],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="c0", content="found"),
        ],
        tools=[pb.Tool(name="get_weather"), pb.Tool(name="get_time"), pb.Tool(name="lookup")],
    )
    await gw.stub.Complete(turn)
    streamed_turn = pb.CompleteStreamRequest()
    streamed_turn.ParseFromString(turn.SerializeToString())
    [e async for e in gw.stub.CompleteStream(streamed_turn)]
    unary, streamed = [s for s in captured.spans() if s.kind is SpanKind.CLIENT]
    inputs = json.loads(attributes_of(unary)["gen_ai.input.messages"])
    assert inputs[1] == {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": "c0", "name": "lookup", "arguments": {"q": 1}}],
    }
    assert inputs[2] == {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": "c0", "response": "found"}],
    }
    expected = [
        {
            "type": "tool_call",
            "id": "call_1",
            "name": "get_weather",
            "arguments": {"city": "Paris"},
        },
        {"type": "tool_call", "id": "call_2", "name": "get_time", "arguments": "not json"},
    ]
    for span in (unary, streamed):
        [output] = json.loads(attributes_of(span)["gen_ai.output.messages"])
        assert output["parts"] == expected
        assert output["finish_reason"] == "tool_calls"


async def test_metrics_follow_the_genai_conventions(traced, captured):
    """Duration, token usage, requests by status, cost and in-flight are recorded per call."""
    response = await traced.stub.Complete(chat())
    duration = captured.points("gen_ai.client.operation.duration")
    assert [p.count for p in duration] == [1]
    assert duration[0].attributes["gen_ai.operation.name"] == "chat"
    assert duration[0].attributes["gen_ai.provider.name"] == "up0"
    assert duration[0].attributes["server.address"] == "127.0.0.1"
    assert captured.total("gen_ai.client.token.usage", gen_ai__token__type="input") == 7
    assert captured.total("gen_ai.client.token.usage", gen_ai__token__type="output") == 3
    assert captured.total("llm_gateway.requests", rpc__grpc__status_code=0) == 1
    assert captured.total("llm_gateway.cost.usd", llm_gateway__tenant="default") == pytest.approx(
        response.metadata.cost_usd, abs=1e-12
    )
    assert captured.total("llm_gateway.overhead.duration") > 0


# The bucket boundaries the GenAI metric conventions advise (gen-ai-metrics.md).
GENAI_DURATION_BOUNDS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GENAI_TOKEN_BOUNDS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip


async def test_genai_histograms_have_the_bucket_bounds_the_conventions_advise(traced, captured):
    """Token usage, operation duration and time to first chunk are bucketed as the GenAI
    conventions advise, so stock GenAI dashboards read them as they read any client's.

    Before, token usage stopped at 16777216: its last advised bound, 67108864, was missing.
    """
    _ = [e async for e in traced.stub.CompleteStream(chat_stream())]
    [tokens, *_] = captured.points("gen_ai.client.token.usage")
    assert tuple(tokens.explicit_bounds) == GENAI_TOKEN_BOUNDS
    for name in ("gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk"):
        [point] = captured.points(name)
        assert tuple(point.explicit_bounds) == GENAI_DURATION_BOUNDS, name


async def test_genai_metrics_name_the_upstreams_port(traced, captured, upstream):
    """`server.port` is conditionally required on the GenAI client metrics whenever
    `server.address` is set: two upstreams on one host must not share a series.

    Before, only the span had it; every metric point lacked it.
    """
    _ = [e async for e in traced.stub.CompleteStream(chat_stream())]
    port = urllib.parse.urlsplit(upstream.base_url).port
    for name in (
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
    ):
        points = captured.points(name)
        assert points, name
        for point in points:
            assert point.attributes["server.address"] == "127.0.0.1", name
            assert point.attributes["server.port"] == port, name


@pytest.mark.parametrize(
    ("host", "provider"),
    [
        ("my-resource.openai.azure.com", "azure.ai.openai"),
        ("generativelanguage.googleapis.com", "gcp.gemini"),
        ("api.perplexity.ai", "perplexity"),
    ],
)
async def test_a_well_known_providers_host_names_it_as_the_genai_conventions_do(
    upstream, start_gateway, captured, host, provider
):
    """An upstream at a provider the GenAI conventions list is named by their value of
    `gen_ai.provider.name`, on the span and the metrics, whatever the upstream is called.

    Before, Azure OpenAI (each resource its own host), Gemini and Perplexity were named
    by the upstream's configured name (`azure-east`): one provider under as many names as
    it had upstreams, and none a stock GenAI dashboard knows.
    """
    async with ForwardProxy(hosts={host: ("127.0.0.1", upstream.port)}) as proxy:
        data = gateway_config_data(f"http://{host}:{upstream.port}/v1")
        data["upstreams"][0].update(name="azure-east", proxy_url=proxy.url)
        gateway = await start_gateway(
            parse_config(data, source="<test>", environ={}), telemetry=captured.telemetry
        )
        await gateway.stub.Complete(chat())
    assert attributes_of(captured.span(ATTEMPT_SPAN))["gen_ai.provider.name"] == provider
    [point] = captured.points("gen_ai.client.operation.duration")
    assert point.attributes["gen_ai.provider.name"] == provider


async def test_a_failed_stream_attempt_records_no_time_to_first_chunk(traced, captured, upstream):
    """A stream its upstream cut after its first chunks: the attempt's duration says the
    error, and neither `gen_ai.client.operation.time_to_first_chunk` nor the attempt's
    span has a time to first chunk (the GenAI conventions give that metric no
    `error.type`: a failed attempt's point could not be told from an answer's). The next
    stream, answered, has both, and they agree.

    Before, the failed attempt recorded its first chunk as an answered one does."""
    upstream.script(Reply(chunks=4, chunk_delay_s=0.05, cut_after_events=3), Reply(chunks=3))
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in traced.stub.CompleteStream(chat_stream())]
    failed = attributes_of(await captured.ended(ATTEMPT_SPAN))
    assert failed["error.type"]
    assert "llm_gateway.time_to_first_token_ms" not in failed
    [duration] = captured.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == failed["error.type"]
    assert captured.points("gen_ai.client.operation.time_to_first_chunk") == []
    captured.exporter.clear()
    _ = [e async for e in traced.stub.CompleteStream(chat_stream("again"))]
    answered = attributes_of(await captured.ended(ATTEMPT_SPAN))
    [first_chunk] = captured.points("gen_ai.client.operation.time_to_first_chunk")
    assert first_chunk.count == 1
    assert "error.type" not in first_chunk.attributes
    assert answered["llm_gateway.time_to_first_token_ms"] == pytest.approx(first_chunk.sum * 1000)


async def test_a_stream_cancelled_after_its_first_chunk_records_no_time_to_first_chunk(
    traced, captured, upstream
):
    """A stream its caller cancels after its first delta ends its attempt as `cancelled`
    (its duration says so): like a failed attempt, it records no time to first chunk."""
    upstream.script(Reply(chunks=20, chunk_delay_s=0.05))
    call = traced.stub.CompleteStream(chat_stream())
    await call.read()
    call.cancel()
    attempt = attributes_of(await captured.ended(ATTEMPT_SPAN))
    assert attempt["error.type"] == "cancelled"
    assert "llm_gateway.time_to_first_token_ms" not in attempt
    assert captured.points("gen_ai.client.operation.time_to_first_chunk") == []


async def test_time_to_first_chunk_names_the_response_model(traced, captured, upstream):
    """`gen_ai.client.operation.time_to_first_chunk` carries `gen_ai.response.model`, as
    the README lists it for the GenAI metrics and the duration beside it has it.

    Before, it was recorded at the first chunk, before the stream said its model: no
    series of it had the attribute, so it could not be grouped by the model that answered.
    """
    upstream.script(Reply(model="fake-model-0613"))
    _ = [e async for e in traced.stub.CompleteStream(chat_stream())]
    [first_chunk] = captured.points("gen_ai.client.operation.time_to_first_chunk")
    [duration] = captured.points("gen_ai.client.operation.duration")
    assert first_chunk.attributes["gen_ai.response.model"] == "fake-model-0613"
    assert dict(first_chunk.attributes) == dict(duration.attributes)


# Every metric that names a model, and whether an upstream attempt records it.
MODEL_METRICS = {
    "gen_ai.client.operation.duration": True,
    "gen_ai.client.token.usage": True,
    "gen_ai.client.operation.time_to_first_chunk": True,
    "llm_gateway.cost.usd": False,
    "llm_gateway.cache.hits": False,
}


async def test_every_metric_names_a_mapped_model_as_its_caller_did(
    upstream, start_gateway, captured
):
    """With `fake-model` sent to its upstream as `provider-model-v1`, every metric says
    `gen_ai.request.model: fake-model`; an attempt's also say the name sent,
    `llm_gateway.upstream.model`, and the one that answered, `gen_ai.response.model`.

    Before, tokens, durations and time to first chunk said `provider-model-v1` where cost
    and cache hits said `fake-model`: the dashboard's panels named one call two ways."""
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    aliased = dataclasses.replace(config.upstreams[0], models={FAKE_MODEL: "provider-model-v1"})
    gateway = await start_gateway(
        dataclasses.replace(config, upstreams=(aliased,)), telemetry=captured.telemetry
    )
    upstream.script(*[Reply(model="provider-model-v1-0613")] * 2)
    deterministic = chat(params=pb.GenerationParams(temperature=0.0))
    await gateway.stub.Complete(deterministic)
    async with asyncio.timeout(5):
        while gateway.server.pipeline.cache.in_flight:
            await asyncio.sleep(0.005)
    assert (await gateway.stub.Complete(deterministic)).metadata.cache_hit
    _ = [e async for e in gateway.stub.CompleteStream(chat_stream())]
    for name, is_attempts in MODEL_METRICS.items():
        points = captured.points(name)
        assert points, name
        for point in points:
            attributes = dict(point.attributes)
            assert attributes["gen_ai.request.model"] == FAKE_MODEL, (name, attributes)
            if is_attempts:
                assert attributes["llm_gateway.upstream.model"] == "provider-model-v1", name
                assert attributes["gen_ai.response.model"] == "provider-model-v1-0613", name
            else:
                assert "llm_gateway.upstream.model" not in attributes, name
    attempts = [s for s in captured.spans() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in attempts] == [f"chat {FAKE_MODEL}"] * 2
    for span in attempts:
        assert attributes_of(span)["gen_ai.request.model"] == FAKE_MODEL
        assert attributes_of(span)["llm_gateway.upstream.model"] == "provider-model-v1"


async def test_every_response_carries_the_overhead_trailer(gateway, upstream):
    """Unary, stream and failed calls all end with llm-gateway-overhead-ms, within the total."""
    call = gateway.stub.Complete(chat())
    response = await call
    overhead = float(dict(await call.trailing_metadata())["llm-gateway-overhead-ms"])
    assert 0 <= overhead <= response.metadata.timings.total_ms + 5
    stream = gateway.stub.CompleteStream(chat_stream())
    _ = [e async for e in stream]
    assert float(dict(await stream.trailing_metadata())["llm-gateway-overhead-ms"]) >= 0
    upstream.script(Status(400))  # not retried: the call fails at once
    failing = gateway.stub.Complete(chat())
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await failing
    assert float(dict(failure.value.trailing_metadata())["llm-gateway-overhead-ms"]) >= 0


async def test_overhead_excludes_time_spent_waiting_on_the_upstream(gateway, upstream):
    """An upstream that takes 300 ms leaves the overhead figure far below the total."""
    upstream.script(Reply(delay_s=0.3))
    call = gateway.stub.Complete(chat())
    response = await call
    overhead = float(dict(await call.trailing_metadata())["llm-gateway-overhead-ms"])
    assert response.metadata.timings.total_ms >= 300
    assert overhead < 0.5 * response.metadata.timings.total_ms


async def test_overhead_counts_the_gateways_own_reading_of_the_answer(
    gateway, upstream, monkeypatch
):
    """Parsing the upstream's answer is the gateway's work, not a wait on the upstream:
    it counts in the overhead trailer and stays out of `upstream_ms`. Before, the whole
    attempt, its request's encoding and its answer's parsing with it, counted as upstream
    time, so the trailer understated what the gateway added."""
    parse = client_module.parse_completion

    def parse_slowly(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)  # on the event loop, as parsing a long answer is
        return parse(*args, **kwargs)

    monkeypatch.setattr(client_module, "parse_completion", parse_slowly)
    call = gateway.stub.Complete(chat())
    response = await call
    overhead = float(dict(await call.trailing_metadata())["llm-gateway-overhead-ms"])
    timings = response.metadata.timings
    assert overhead >= 200
    assert timings.upstream_ms <= timings.total_ms - 200


async def test_a_retrys_wait_on_the_upstream_is_not_the_gateways_overhead(gateway, upstream):
    """The wait an upstream's Retry-After imposes before the retry is time spent on the
    upstream's account: it counts in `upstream_ms`, not in the overhead trailer. Before,
    a one-second wait read as a second of the gateway's own overhead."""
    upstream.script(Status(503, headers={"Retry-After": "1"}), Reply())
    call = gateway.stub.Complete(chat())
    response = await call
    overhead = float(dict(await call.trailing_metadata())["llm-gateway-overhead-ms"])
    assert response.metadata.attempts == 2
    assert response.metadata.timings.upstream_ms >= 1000
    assert overhead < 500


async def test_a_wait_for_the_upstreams_concurrency_slot_is_not_the_gateways_overhead(
    upstream, start_gateway
):
    """A call queued in the gateway's limiter for an upstream's `max_concurrency` waits on
    that upstream's account, as a retry's backoff does: not in the overhead trailer. It is
    the gateway's queue all the same: in `queued_ms`, not `upstream_ms`. Before, the second
    call's wait for the first's slot read as the gateway's own overhead, and then as
    upstream time, as though the upstream had been slow."""
    config = gateway_config_data(upstream.base_url)
    config["upstreams"][0]["max_concurrency"] = 1
    gateway = await start_gateway(parse_config(config, source="<test>", environ={}))
    upstream.script(Reply(delay_s=0.6), Reply())
    first = asyncio.ensure_future(gateway.stub.Complete(chat()))
    async with asyncio.timeout(10):
        while not upstream.requests:
            await asyncio.sleep(0.01)
    second = gateway.stub.Complete(chat("Say hi again"))
    response = await second
    await first
    overhead = float(dict(await second.trailing_metadata())["llm-gateway-overhead-ms"])
    assert len(upstream.requests) == 2
    timings = response.metadata.timings
    assert timings.total_ms >= 300  # it waited for the first call's slot
    assert timings.queued_ms >= 300
    assert timings.upstream_ms < timings.queued_ms  # its own upstream call answered at once
    assert timings.total_ms >= timings.queued_ms + timings.upstream_ms
    assert overhead < 0.5 * timings.total_ms


async def test_a_wait_for_a_concurrency_slot_that_runs_out_is_not_the_gateways_overhead(
    start_gateway,
):
    """A call that queues for an upstream's `max_concurrency` slot until its
    `max_limit_wait_s` runs out, and then fails over, waited on that upstream's account
    all the same: the wait counts in `queued_ms`, not in the overhead trailer. Before,
    only a wait that ended with the slot counted; one that ended in failover read as the
    gateway's own overhead. Both upstreams' one slot is taken (a free one would be
    chosen at once), up1's for less time: the call queues for up0's by weight, its wait
    runs out, and up1's slot, free by then, serves it."""
    async with FakeUpstream() as busy, FakeUpstream() as spare:
        config = gateway_config_data(
            busy.base_url, spare.base_url, resilience={"max_limit_wait_s": 0.5}
        )
        config["upstreams"][0].update(max_concurrency=1, weight=100)
        config["upstreams"][1].update(max_concurrency=1, weight=1)
        gateway = await start_gateway(parse_config(config, source="<test>", environ={}))
        busy.script(Reply(delay_s=1.5))
        spare.script(Reply(delay_s=0.7))
        first = asyncio.ensure_future(gateway.stub.Complete(chat()))
        async with asyncio.timeout(10):
            while not busy.requests:
                await asyncio.sleep(0.01)
        held = asyncio.ensure_future(gateway.stub.Complete(chat("Hold up1")))  # up1: free
        async with asyncio.timeout(10):
            while not spare.requests:
                await asyncio.sleep(0.01)
        second = gateway.stub.Complete(chat("Say hi again"))  # up0 by weight: both taken
        response = await second
        await first
        await held
    overhead = float(dict(await second.trailing_metadata())["llm-gateway-overhead-ms"])
    assert response.metadata.upstream == "up1"
    assert (len(busy.requests), len(spare.requests)) == (1, 2)
    timings = response.metadata.timings
    assert timings.total_ms >= 400  # it queued for up0's slot
    assert timings.queued_ms >= 400
    assert timings.total_ms >= timings.queued_ms + timings.upstream_ms
    assert overhead < 0.5 * timings.total_ms


async def test_in_flight_counts_calls_in_progress(traced, captured, upstream):
    """llm_gateway.rpc.in_flight is 1 while a call waits on a slow upstream, 0 after."""
    upstream.script(Reply(delay_s=0.5))
    call = asyncio.ensure_future(traced.stub.Complete(chat()))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    assert captured.total("llm_gateway.rpc.in_flight") == 1
    await call
    assert captured.total("llm_gateway.rpc.in_flight") == 0


@pytest.mark.parametrize("cut_by", ["cancel", "deadline"])
async def test_an_attempt_its_caller_cut_counts_as_cancelled_not_failed(
    traced, captured, upstream, cut_by
):
    """`llm_gateway.upstream.attempts` by outcome: an attempt its caller cancelled or
    whose deadline passed is `cancelled`, not a `failure` of the upstream (a dashboard
    of failures by upstream would blame the provider for its callers' deadlines)."""
    upstream.script(Hang())
    if cut_by == "cancel":
        call = traced.stub.Complete(chat())
        async with asyncio.timeout(10):
            while not upstream.requests:
                await asyncio.sleep(0.01)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    else:
        with pytest.raises(grpc.aio.AioRpcError):
            await traced.stub.Complete(chat(), timeout=0.4)
    await captured.ended(UNARY_SPAN)
    attempts = "llm_gateway.upstream.attempts"
    assert captured.total(attempts, llm_gateway__outcome="cancelled") == 1
    assert captured.total(attempts, llm_gateway__outcome="failure") == 0


async def test_a_cancelled_stream_ends_both_spans_as_cancelled(traced, captured, upstream):
    """When the caller cancels mid-stream the attempt and RPC spans still end, marked cancelled."""
    upstream.script(Reply(chunks=5, chunk_delay_s=0.3))
    call = traced.stub.CompleteStream(chat_stream())
    async for _ in call:
        call.cancel()
        break
    async with asyncio.timeout(10):
        while len(captured.spans()) < 2:
            await asyncio.sleep(0.01)
    client, server = captured.span(ATTEMPT_SPAN), captured.span(STREAM_SPAN)
    assert attributes_of(client)["error.type"] == "cancelled"
    assert attributes_of(server)["error.type"] == "cancelled"
    assert attributes_of(server)["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert captured.total("llm_gateway.rpc.in_flight") == 0


async def test_a_stream_past_its_deadline_is_recorded_as_deadline_exceeded(
    traced, captured, upstream
):
    """A stream whose deadline passes after its first deltas: the span and
    llm_gateway.requests say DEADLINE_EXCEEDED, as the caller got, not CANCELLED.

    Before, grpc's cancellation of the handler at the deadline was recorded as the
    caller's cancel: such calls were missing from the error rate.
    """
    upstream.script(Reply(chunks=10, chunk_delay_s=0.1))
    call = traced.stub.CompleteStream(chat_stream(), timeout=0.35)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        _ = [e async for e in call]
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    server = await captured.ended(STREAM_SPAN)
    assert_recorded_as_deadline_exceeded(server, captured)
    assert attributes_of(server)["gen_ai.usage.output_tokens"] > 0, "its text is still charged"


async def test_a_cut_calls_span_says_the_first_token_it_had_or_none(traced, captured, upstream):
    """A call cut after the upstream had it is still charged on its RPC span, and that
    span's `llm_gateway.time_to_first_token_ms` is the one its caller saw: a stream cut
    after its first deltas had one, a unary call cut by its deadline had none.

    Before, both spans said 0.0 ms, the fastest first token a dashboard of spans would
    ever see, for calls that were slower than any other or never had one."""
    upstream.script(Reply(chunks=4, chunk_delay_s=0.05, cut_after_events=3))
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in traced.stub.CompleteStream(chat_stream())]
    stream = attributes_of(await captured.ended(STREAM_SPAN))
    assert stream["gen_ai.usage.output_tokens"] > 0, "its text is charged"
    assert stream["llm_gateway.time_to_first_token_ms"] > 0
    upstream.script(Hang())
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await traced.stub.Complete(chat(), timeout=0.4)
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    unary = attributes_of(await captured.ended(UNARY_SPAN))
    assert unary["gen_ai.usage.input_tokens"] > 0, "its prompt is charged"
    assert "llm_gateway.time_to_first_token_ms" not in unary


async def test_a_cut_calls_span_names_no_response_model_its_upstream_never_said(
    upstream, start_gateway, captured
):
    """`gen_ai.response.model` is the model an answer says answered: a call cut before
    its answer (a unary call at its deadline, a stream cut after some text) has none on
    its RPC span, while an answered call's says the provider's name.

    Before, a cut call's span said the caller's name (`fake-model`), which no upstream
    ever answered as: every timed-out call showed up as answered by the mapped-away name.
    """
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    aliased = dataclasses.replace(config.upstreams[0], models={FAKE_MODEL: "provider-model-v1"})
    gateway = await start_gateway(
        dataclasses.replace(config, upstreams=(aliased,)), telemetry=captured.telemetry
    )
    upstream.script(Reply(model="provider-model-v1-0613"))
    await gateway.stub.Complete(chat())
    answered = attributes_of(await captured.ended(UNARY_SPAN))
    assert answered["gen_ai.response.model"] == "provider-model-v1-0613"
    captured.exporter.clear()
    upstream.script(Hang())
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(chat("cut"), timeout=0.4)
    unary = attributes_of(await captured.ended(UNARY_SPAN))
    assert unary["gen_ai.usage.input_tokens"] > 0, "its prompt is charged"
    assert "gen_ai.response.model" not in unary
    upstream.script(Reply(model="provider-model-v1-0613", chunks=4, cut_after_events=3))
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in gateway.stub.CompleteStream(chat_stream("cut too"))]
    stream = attributes_of(await captured.ended(STREAM_SPAN))
    assert stream["gen_ai.usage.output_tokens"] > 0, "its text is charged"
    assert "gen_ai.response.model" not in stream


def assert_recorded_as_deadline_exceeded(server: ReadableSpan, captured: Captured) -> None:
    """The RPC span and `llm_gateway.requests` say DEADLINE_EXCEEDED, as the caller was
    told, never CANCELLED (1)."""
    deadline_exceeded = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert attributes_of(server)["rpc.grpc.status_code"] == deadline_exceeded
    assert attributes_of(server)["error.type"] == "DEADLINE_EXCEEDED"
    assert server.status.status_code is StatusCode.ERROR
    assert captured.total("llm_gateway.requests", rpc__grpc__status_code=deadline_exceeded) == 1
    assert captured.total("llm_gateway.requests", rpc__grpc__status_code=1) == 0


async def test_a_caller_leaving_a_stream_the_gateway_is_writing_logs_no_error(
    traced, captured, upstream, caplog
):
    """A caller that stops reading a long stream and cancels it, while the gateway waits
    to write the next delta: both spans end as cancelled, and nothing is logged as an ERROR.

    Before, grpc logged its failed write at ERROR with a traceback, and OpenTelemetry
    logged "Failed to detach context" at ERROR: the stream's generator is closed after
    grpc's handler ended, in another context than the RPC began in.
    """
    logging.getLogger(GRPC_AIO_LOGGER).addFilter(race_filter := DeadlineRaceFilter())
    try:
        upstream.script(Reply(content="x" * 40_000_000, chunks=800))
        call = traced.stub.CompleteStream(chat_stream(), metadata=(("traceparent", TRACEPARENT),))
        await call.read()
        await asyncio.sleep(1.0)  # until gRPC's flow control holds the gateway's writes
        call.cancel()
        server = await captured.ended(STREAM_SPAN)
        await asyncio.sleep(0.5)
        gc.collect()
        await asyncio.sleep(0.1)
    finally:
        logging.getLogger(GRPC_AIO_LOGGER).removeFilter(race_filter)
    assert attributes_of(server)["error.type"] == "cancelled"
    assert attributes_of(captured.span(ATTEMPT_SPAN))["error.type"] == "cancelled"
    assert captured.total("llm_gateway.rpc.in_flight") == 0
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize("cut_by", ["caller's deadline", "upstream's timeout_s"])
async def test_an_attempt_the_callers_deadline_cut_is_no_upstream_error(
    upstream, start_gateway, captured, cut_by
):
    """`llm_gateway.upstream.errors` counts what upstreams did wrong: an attempt still
    running when its caller's deadline passed is not one (an operator alerting on it
    would be paged for callers' tight deadlines), one past the upstream's own
    `timeout_s` is.

    Before, both counted as UPSTREAM_TIMEOUT errors of the upstream.
    """
    timeout_s, deadline_s = (5.0, 0.3) if cut_by == "caller's deadline" else (0.3, 5.0)
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    config = dataclasses.replace(
        config, upstreams=(dataclasses.replace(config.upstreams[0], timeout_s=timeout_s),)
    )
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Hang())
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(chat(), timeout=deadline_s)
    await captured.ended(UNARY_SPAN)
    errors = captured.total("llm_gateway.upstream.errors", llm_gateway__upstream="up0")
    assert errors == (0 if cut_by == "caller's deadline" else 1)


@pytest.mark.parametrize("cut_by", ["caller's deadline", "upstream's timeout_s"])
async def test_an_attempt_the_callers_deadline_cut_is_cancelled_not_an_upstream_timeout(
    upstream, start_gateway, captured, cut_by
):
    """The attempt span's and its duration's `error.type` say `cancelled` for an attempt
    its caller's deadline cut, as for one its caller cancelled, and as
    `llm_gateway.upstream.attempts` counts it; one past the upstream's own `timeout_s`
    is its `UpstreamTimeout`.

    Before, both said `UpstreamTimeout`: a GenAI dashboard of failed operations by
    `error.type` blamed the provider for its callers' tight deadlines.
    """
    timeout_s, deadline_s = (5.0, 0.3) if cut_by == "caller's deadline" else (0.3, 5.0)
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    config = dataclasses.replace(
        config, upstreams=(dataclasses.replace(config.upstreams[0], timeout_s=timeout_s),)
    )
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Hang())
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(chat(), timeout=deadline_s)
    await captured.ended(UNARY_SPAN)
    expected = "cancelled" if cut_by == "caller's deadline" else "UpstreamTimeout"
    attempt = captured.span(ATTEMPT_SPAN)
    assert attributes_of(attempt)["error.type"] == expected
    assert attempt.status.description == expected
    [duration] = captured.points(DURATION)
    assert duration.attributes["error.type"] == expected


@pytest.mark.parametrize(
    "depth",
    [
        pytest.param(1500, id="past-the-parser"),
        pytest.param(990, id="near-the-recursion-limit-the-encoder-may-hit"),
    ],
)
async def test_content_capture_keeps_deeply_nested_tool_arguments_as_text(
    upstream, start_gateway, depth
):
    """Tool-call arguments nested past what Python's JSON parser or encoder recurses
    into (a caller's earlier turn, or the model's answer) are captured as the text they
    are: capturing them must not fail the call with INTERNAL."""
    captured = captured_telemetry(capture_content=True)
    gw = await start_gateway(gateway_config(upstream.base_url), telemetry=captured.telemetry)
    nested = "[" * depth + "]" * depth
    answer = Reply(
        content="", tool_calls=(ToolCallReply("call_1", "f", nested),), finish_reason="tool_calls"
    )
    upstream.script(answer)
    turn = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[
            pb.Message(role=pb.ROLE_USER, content="Go on"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="c0", name="f", arguments=nested)],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="c0", content="done"),
        ],
        tools=[pb.Tool(name="f")],
    )
    response = await gw.stub.Complete(turn)
    assert response.tool_calls[0].arguments == nested
    [attempt] = [s for s in captured.spans() if s.kind is SpanKind.CLIENT]
    inputs = json.loads(attributes_of(attempt)["gen_ai.input.messages"])
    assert inputs[1]["parts"][0]["arguments"] == nested
    [output] = json.loads(attributes_of(attempt)["gen_ai.output.messages"])
    assert output["parts"][0]["arguments"] == nested


async def test_a_stream_past_its_deadline_while_the_gateway_writes_is_deadline_exceeded(
    traced, captured, upstream
):
    """A caller that stops reading a long stream until its deadline passes, while the
    gateway waits to write the next delta: the span and llm_gateway.requests say
    DEADLINE_EXCEEDED, as the caller is told, not CANCELLED.

    Before, grpc cancelled its own write at the deadline and closed the stream's
    generator later (GeneratorExit, not CancelledError): recorded as the caller's cancel.
    """
    upstream.script(Reply(content="x" * 40_000_000, chunks=800))
    # The fake builds all 40 MB of events before its first (0.25 s of CPU): a loaded
    # machine took 1.5-2.5 s to the first delta, past a 1.5 s deadline.
    call = traced.stub.CompleteStream(chat_stream(), timeout=5)
    await call.read()  # then reads nothing more: gRPC's flow control holds the writes
    assert (await call.code()) is grpc.StatusCode.DEADLINE_EXCEEDED
    server = await captured.ended(STREAM_SPAN)
    assert_recorded_as_deadline_exceeded(server, captured)
