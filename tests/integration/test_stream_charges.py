"""What a stream that ends before its final message records in the usage ledger.

The upstream bills every token it generated, whether or not the stream reached its end:
a stream cut after some text (by the upstream, the caller or the caller's deadline) is
recorded once, for its caller's tenant, priced from estimated tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.domain import Message, Role
from service.tokens import estimate_prompt_tokens
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream, gateway_config
from tests.fake_upstream import CutStream, FakeUpstream, Reply
from tests.integration.test_resilience import error_details
from tests.telemetry_support import captured_telemetry

PRICED_MODELS = {
    FAKE_MODEL: {
        "context_window": 8192,
        "input_usd_per_million": 0.27,
        "output_usd_per_million": 1.10,
    }
}
# Six words, one a second: a caller that leaves after the first has left mid-stream.
SLOW = Reply(content="one two three four five six", chunks=6, chunk_delay_s=1.0)
_TIMEOUT_S = 10.0


async def recorded(gateway: RunningGateway, *, requests: int) -> pb.UsageRow:
    """The ledger's total once it counts `requests` calls, after a pause for any more."""
    async with asyncio.timeout(_TIMEOUT_S):
        while (await gateway.stub.GetUsage(pb.GetUsageRequest())).total.requests < requests:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # a second record for the same call would land by now
    return (await gateway.stub.GetUsage(pb.GetUsageRequest())).total


# A prompt long enough (32 estimated tokens or more) for answers to calibrate with.
CALIBRATED = "Please summarise these notes on the gateway's rollout to every team. " * 3
CALIBRATING = {"call": "calibrating"}  # the labels of the answers that calibrate
CUT = {"call": "cut"}  # the labels of the call under test
WHOLE = {"call": "whole"}  # the labels of a call answered whole, to compare with


def plain_estimate(content: str = CALIBRATED) -> int:
    """The gateway's estimate of a one-message prompt, before any calibration."""
    return estimate_prompt_tokens((Message(Role.USER, content),))


async def calibrate(
    gateway: RunningGateway, upstream: FakeUpstream, *, ratio: float, output_tokens: int = 3
) -> int:
    """Teach the default tenant's calibration for the model that `upstream` counts
    `ratio` times the estimate of `CALIBRATED`: three answers (labelled `CALIBRATING`)
    report so. Returns the prompt tokens they reported."""
    reported = round(ratio * plain_estimate())
    upstream.script(*[Reply(prompt_tokens=reported, completion_tokens=output_tokens)] * 3)
    for _ in range(3):
        await gateway.stub.Complete(chat(CALIBRATED, labels=CALIBRATING), timeout=_TIMEOUT_S)
    return reported


def calibrated_estimate(gateway: RunningGateway, content: str = CALIBRATED) -> int:
    """The estimate of `content` times the default tenant's calibration factor for the
    model now, rounded up as the context-window check rounds it."""
    factor = gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default")
    assert factor > 1.3  # calibrated: what the upstream counts, and the margin
    return math.ceil(plain_estimate(content) * factor)


async def labelled(gateway: RunningGateway, labels: dict[str, str]) -> pb.UsageRow:
    """The ledger's total of the calls carrying `labels`."""
    return (await gateway.stub.GetUsage(pb.GetUsageRequest(labels=labels))).total


def assert_estimated_charge(total: pb.UsageRow) -> None:
    """One call, its prompt and some output priced at the model's prices."""
    assert total.requests == 1
    assert total.usage.input_tokens > 0
    assert total.usage.output_tokens > 0
    expected = (total.usage.input_tokens * 0.27 + total.usage.output_tokens * 1.10) / 1e6
    assert total.cost_usd == pytest.approx(expected, abs=1e-12)


async def test_a_stream_the_upstream_cuts_after_text_is_charged_for_it(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The caller gets STREAM_INTERRUPTED; the ledger records the prompt and the text sent."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    upstream.script(CutStream(after_chunks=3))
    text = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in gateway.stub.CompleteStream(chat_stream(), timeout=5):
            text += item.delta.content
    assert text
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)[1] == "STREAM_INTERRUPTED"
    assert_estimated_charge(await recorded(gateway, requests=1))


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
async def test_a_stream_its_caller_leaves_after_text_is_charged_for_it(
    upstream: FakeUpstream, start_gateway: Any, leave: str
) -> None:
    """Cancelled, or past its deadline, after the first delta: charged once, estimated."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    upstream.script(SLOW)
    call = gateway.stub.CompleteStream(chat_stream(), timeout=1.5 if leave == "deadline" else 10)
    first = await call.read()
    assert first.delta.content
    if leave == "cancel":
        call.cancel()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await call.read()
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_estimated_charge(await recorded(gateway, requests=1))


async def test_a_shared_stream_every_caller_leaves_is_charged_once(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Two callers follow one upstream stream and both cancel: one call is recorded."""
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"})
    gateway = await start_gateway(config)
    upstream.script(SLOW)
    request = chat_stream(params=pb.GenerationParams(temperature=0.0))
    calls = [gateway.stub.CompleteStream(request, timeout=10) for _ in range(2)]
    for call in calls:
        assert (await call.read()).delta.content
    assert gateway.server.pipeline.cache.following == 2
    for call in calls:
        call.cancel()
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_estimated_charge(await recorded(gateway, requests=1))
    assert len(upstream.requests) == 1


# More text than gRPC's flow-control windows and socket buffers hold: a caller that reads
# none of it holds the gateway's relay back long after the upstream has finished. (Within
# the 16 Mi characters a stream may relay.)
LONG = Reply(content="x" * 16_000_000, chunks=8_000, prompt_tokens=11, completion_tokens=5000)


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
async def test_a_shared_stream_its_caller_leaves_after_the_upstream_finished_is_charged(
    start_gateway: Any, leave: str
) -> None:
    """The upstream finished (and billed) while the caller still read: charged once, as reported.

    The shared call runs in the cache's own task and finishes while the caller is still
    relaying its deltas; the caller leaving before its final message recorded nothing.
    """
    async with FakeUpstream(default=LONG) as upstream:
        config = gateway_config(
            upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"}
        )
        gateway = await start_gateway(config)
        request = chat_stream(params=pb.GenerationParams(temperature=0.0))
        call = gateway.stub.CompleteStream(request, timeout=3 if leave == "deadline" else 20)
        assert (await call.read()).delta.content
        cache = gateway.server.pipeline.cache
        async with asyncio.timeout(_TIMEOUT_S):
            while cache.in_flight:  # the upstream stream is read to its end
                await asyncio.sleep(0.02)
        if leave == "cancel":
            call.cancel()
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while True:
                    await asyncio.sleep(1)  # a caller too slow for its own deadline
                    await call.read()
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        total = await recorded(gateway, requests=1)
    assert total.requests == 1
    assert (total.usage.input_tokens, total.usage.output_tokens) == (11, 5000)
    assert not total.usage.estimated
    assert total.cost_usd == pytest.approx((11 * 0.27 + 5000 * 1.10) / 1e6, abs=1e-12)


async def cut_after_text(gateway: RunningGateway, upstream: FakeUpstream, leave: str) -> None:
    """A stream of `CALIBRATED` (labelled `CUT`) cut after its first text: by the
    upstream, or by its caller cancelling."""
    if leave == "upstream":
        upstream.script(CutStream(after_chunks=2))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gateway.stub.CompleteStream(
                chat_stream(CALIBRATED, labels=CUT), timeout=_TIMEOUT_S
            ):
                pass
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        return
    upstream.script(SLOW)
    call = gateway.stub.CompleteStream(chat_stream(CALIBRATED, labels=CUT), timeout=_TIMEOUT_S)
    assert (await call.read()).delta.content
    call.cancel()
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)


@pytest.mark.parametrize("leave", ["upstream", "cancel"])
async def test_a_cut_stream_is_charged_its_prompt_as_its_tenants_calibration_counts_it(
    upstream: FakeUpstream, start_gateway: Any, leave: str
) -> None:
    """The tenant's answers report 1.3 times the estimated prompt tokens: a stream of it
    cut after text is charged its prompt's estimate times the calibration, not below
    what the provider counts, in GetUsage and the cost metric (before, the plain
    estimate: about 77 % of the provider's bill)."""
    captured = captured_telemetry()
    config = gateway_config(upstream.base_url, models=PRICED_MODELS)
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    reported = await calibrate(gateway, upstream, ratio=1.3)
    billed = calibrated_estimate(gateway)
    await cut_after_text(gateway, upstream, leave)
    await recorded(gateway, requests=4)
    row = await labelled(gateway, CUT)
    assert (row.requests, row.estimated_requests) == (1, 1)
    assert row.usage.input_tokens == billed >= reported
    assert row.usage.estimated
    assert_estimated_charge(row)
    calibrating_usd = 3 * (reported * 0.27 + 3 * 1.10) / 1e6
    cost = captured.total("llm_gateway.cost.usd", llm_gateway__tenant="default")
    assert cost == pytest.approx(calibrating_usd + row.cost_usd, abs=1e-12)


async def test_a_cut_stream_of_a_tenant_counted_low_is_charged_the_plain_estimate(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The tenant's answers report 0.7 times the estimated prompt tokens: a stream of it
    cut after text is charged the plain estimate, never less (the estimate errs high,
    and this prompt may be one the estimator counts low)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    await calibrate(gateway, upstream, ratio=0.7)
    assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") < 1
    await cut_after_text(gateway, upstream, "upstream")
    await recorded(gateway, requests=4)
    row = await labelled(gateway, CUT)
    assert row.usage.input_tokens == plain_estimate()
    assert row.usage.estimated
    assert_estimated_charge(row)


# A price for cached input: a cut stream billed without its reported counts pays it full.
CACHE_PRICED_MODELS = {
    FAKE_MODEL: {**PRICED_MODELS[FAKE_MODEL], "cached_input_usd_per_million": 0.07}
}
# An answer whose usage reports most of its prompt read from the provider's cache.
CACHED_PROMPT = Reply(content="one two three", prompt_tokens=1000, cached_tokens=800)
CACHED_PROMPT_USD = (200 * 0.27 + 800 * 0.07 + 3 * 1.10) / 1e6


async def test_a_stream_cut_after_its_usage_is_charged_that_usage(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The upstream resets a stream after its usage event, before its finish reason (a
    reset after it ends the stream as finished): the call is charged the usage reported,
    cached input at its price, as the same answer whole is (before, the prompt's estimate
    at the full input price, and the text's estimate)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=CACHE_PRICED_MODELS))
    cut = dataclasses.replace(CACHED_PROMPT, cut_before_done=True, finish_reason=None)
    upstream.script(CACHED_PROMPT, cut)
    await gateway.stub.Complete(chat(labels=WHOLE), timeout=_TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in gateway.stub.CompleteStream(chat_stream(labels=CUT), timeout=_TIMEOUT_S):
            pass
    assert error_details(caught.value)[1] == "STREAM_INTERRUPTED"
    whole, cut = await labelled(gateway, WHOLE), await labelled(gateway, CUT)
    assert (cut.requests, cut.estimated_requests) == (1, 0)
    assert cut.usage == whole.usage
    assert (cut.usage.input_tokens, cut.usage.cached_input_tokens) == (1000, 800)
    assert cut.cost_usd == whole.cost_usd == pytest.approx(CACHED_PROMPT_USD, abs=1e-12)
