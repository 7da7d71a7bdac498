"""Calls still running as shutdown's grace runs out end UNAVAILABLE with `SHUTTING_DOWN`.

Left to grpc they would be cancelled at the end of the grace and reach the caller as a
bare UNAVAILABLE ("Cancelling all calls", no details); the gateway ends them itself just
before, with `ErrorInfo` `SHUTTING_DOWN` and a zero `RetryInfo` (retry at once,
elsewhere), closes their upstream requests, and records them as such. A call that
already has its answer is left to finish with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.auth import generate_key, hash_key, redis_keys_hash
from service.config import GatewayConfig
from service.errors import RETRY_ELSEWHERE_TRAILER
from service.ledger import UsageFilter
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import (
    FAKE_MODEL,
    RunningGateway,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config,
)
from tests.fake_upstream import FakeUpstream, Hang, Reply, Status
from tests.integration.tenancy_helpers import as_tenant, bearer, secure_config
from tests.integration.test_resilience import error_details
from tests.integration.test_stream_charges import PRICED_MODELS
from tests.integration.test_summarize import CONCURRENCY as SUMMARY_CONCURRENCY
from tests.integration.test_summarize import WINDOW as SUMMARY_WINDOW
from tests.integration.test_summarize import config as summarize_config
from tests.integration.test_summarize import default_respond, document, is_part
from tests.redis_server import RedisServer
from tests.scripted_upstream import GatedUpstream, ScriptedUpstream, user_text
from tests.telemetry_support import attributes_of, captured_telemetry

GRACE_S = 1.0
# A grace no drain should come near: a stop that ends long before it drained.
LONG_GRACE_S = 30.0
T = TypeVar("T")
# Six words, one a second: still streaming when a 1 s grace ends.
SLOW_STREAM = Reply(content="one two three four five six", chunks=6, chunk_delay_s=1.0)


def assert_shutting_down(error: grpc.aio.AioRpcError) -> None:
    """UNAVAILABLE with ErrorInfo SHUTTING_DOWN and a RetryInfo of zero."""
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    _, reason, retry_s = error_details(error)
    assert reason == "SHUTTING_DOWN"
    assert retry_s == 0.0
    assert "shutting down" in (error.details() or "")
    assert dict(error.trailing_metadata())[RETRY_ELSEWHERE_TRAILER] == "true"


async def stop(gateway: RunningGateway) -> float:
    """Stop the gateway with a 1 s grace; how long the stop took."""
    started = time.monotonic()
    async with asyncio.timeout(10):  # a hang guard, far past the grace
        await gateway.server.stop(grace_s=GRACE_S)
    return time.monotonic() - started


async def test_a_unary_call_outliving_the_grace_is_cut_off_with_details(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The caller gets SHUTTING_DOWN before the grace ends; the upstream request is closed."""
    upstream.script(Hang())
    gateway = await start_gateway(gateway_config(upstream.base_url))
    call = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=10))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    took_s = await stop(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert_shutting_down(caught.value)
    await upstream.wait_for_disconnect()
    # Cut, not at once; the upper bound only guards against a stop waiting on the hung
    # upstream request, which would take its timeout_s (10 s).
    assert GRACE_S / 2 <= took_s < GRACE_S + 5.0


async def test_a_call_cut_off_is_recorded_as_shutting_down_not_cancelled(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Its span and the request counter carry UNAVAILABLE and SHUTTING_DOWN, what the
    caller got, rather than a cancellation."""
    captured = captured_telemetry()
    upstream.script(Hang())
    gateway = await start_gateway(gateway_config(upstream.base_url), telemetry=captured.telemetry)
    call = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=10))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    await stop(gateway)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    server = attributes_of(captured.span("llmgateway.v1.CompletionService/Complete"))
    assert (server["rpc.grpc.status_code"], server["error.type"]) == (unavailable, "SHUTTING_DOWN")
    assert captured.total("llm_gateway.requests", rpc__grpc__status_code=unavailable) == 1
    assert captured.total("llm_gateway.requests", rpc__grpc__status_code=1) == 0
    assert captured.total("llm_gateway.rpc.in_flight") == 0


async def test_a_stream_outliving_the_grace_keeps_its_text_and_is_charged(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The deltas sent stand, the stream ends SHUTTING_DOWN, and the text sent is charged."""
    upstream.script(SLOW_STREAM)
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    call = gateway.stub.CompleteStream(chat_stream(), timeout=10)
    text = (await call.read()).delta.content
    assert text
    stopping = asyncio.ensure_future(stop(gateway))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while (item := await call.read()) is not grpc.aio.EOF:
            text += item.delta.content
    assert_shutting_down(caught.value)
    assert SLOW_STREAM.content.startswith(text)
    assert len(text) < len(SLOW_STREAM.content)
    await stopping
    await upstream.wait_for_disconnect()
    (row,) = await gateway.server.pipeline.ledger.query(UsageFilter())
    assert (row.requests, row.estimated_requests) == (1, 1)
    assert row.input_tokens > 0
    assert row.output_tokens > 0
    expected_usd = (row.input_tokens * 0.27 + row.output_tokens * 1.10) / 1e6  # PRICED_MODELS
    assert row.cost_usd == pytest.approx(expected_usd, abs=1e-12)


async def test_queued_calls_are_cut_off_too(start_gateway: Any) -> None:
    """A call queued for a slot as the drain begins gets the same answer (at once, see
    `test_a_draining_gateway_refuses_the_calls_queued_for_a_slot_at_once`)."""
    async with FakeUpstream(default=Hang()) as fake:
        config = gateway_config(
            fake.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 1}
        )
        gateway = await start_gateway(config)
        calls = [asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=10)) for _ in "ab"]
        while not (fake.requests and gateway.server.admission.queued):
            await asyncio.sleep(0.01)
        await stop(gateway)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert_shutting_down(caught.value)
        assert len(fake.requests) == 1  # the queued call never reached the upstream
        assert (gateway.server.admission.in_flight, gateway.server.admission.queued) == (0, 0)


async def refused_by_the_drain_behind_a_held_call(
    gateway: RunningGateway,
    fake: ScriptedUpstream,
    mode: str,
    *,
    is_waiting: Callable[[], bool],
) -> grpc.aio.AioRpcError:
    """A first call held upstream (`fake.gate` cleared), a second (`mode`: unary or
    stream) behind it until `is_waiting`, then the drain: the second's refusal, asserted
    to come while the first still held its place, the first then answered in the grace."""
    first = asyncio.ensure_future(gateway.stub.Complete(chat("first"), timeout=30))
    await fake.wait_until(lambda: fake.in_flight == 1)
    if mode == "unary":
        waiting = gateway.stub.Complete(chat("second"), timeout=30)
    else:
        waiting = collect(gateway.stub.CompleteStream(chat_stream("second"), timeout=30))
    second = asyncio.ensure_future(waiting)
    while not is_waiting():
        await asyncio.sleep(0.01)
    stop = await stopping(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):  # a hang guard, far short of the grace and the wait
            await second
    assert fake.in_flight == 1  # refused while the slot was still held
    fake.gate.set()
    assert (await first).content == "Hello from fake"
    await stop
    return caught.value


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_draining_gateway_refuses_the_calls_queued_for_a_slot_at_once(
    start_gateway: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """A call queued for the server's one slot (`max_in_flight_calls: 1`,
    `max_queued_calls: 1`) as the drain begins is refused at once, SHUTTING_DOWN with the
    retry-elsewhere trailer, while the call holding the slot is still upstream: that call
    then finishes in the grace, and only it is sent. Before, the queued call waited on,
    to be handed the slot as the first ended and sent into the drain, or cut at the
    grace's end, although it had not started and another replica could take it."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.gate.clear()  # the first call holds the slot upstream
        config = gateway_config(
            fake.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 1}
        )
        gateway = await start_gateway(config)
        admission = gateway.server.admission
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            refusal = await refused_by_the_drain_behind_a_held_call(
                gateway, fake, mode, is_waiting=lambda: admission.queued >= 1
            )
        assert_shutting_down(refusal)
        assert len(fake.requests) == 1
        assert (admission.in_flight, admission.queued) == (0, 0)
        assert not calls_cut_off(caplog)


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_still_authenticating_is_cut_off_too(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any, mode: str
) -> None:
    """A call whose key is still being looked up (in a Redis that has stalled) as the
    grace runs out holds no slot yet: it is ended SHUTTING_DOWN with the rest, rather
    than left out of the drain and cancelled bare by grpc at the end of the grace."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    key = generate_key()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.hset(redis_keys_hash(prefix), hash_key(key), "team-a")
    finally:
        await client.aclose()
    auth = {"redis_url": redis_server.url, "redis_key_prefix": prefix, "redis_timeout_s": 5}
    gateway = await start_gateway(secure_config(upstream.base_url, auth=auth))
    redis_server.pause()
    try:
        if mode == "unary":
            call = gateway.stub.Complete(chat(), metadata=bearer(key), timeout=10)
        else:
            call = collect(gateway.stub.CompleteStream(chat_stream(), metadata=bearer(key)))
        reply = asyncio.ensure_future(call)
        await asyncio.sleep(0.2)  # its key's lookup waits on Redis
        assert not reply.done()
        await stop(gateway)
    finally:
        redis_server.resume()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reply
    assert_shutting_down(caught.value)
    assert upstream.requests == []


async def test_calls_done_within_the_grace_are_not_cut_off(start_gateway: Any) -> None:
    """A call that finishes inside the grace is answered in full, as before."""
    async with FakeUpstream(default=Reply(delay_s=0.2)) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        call = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=10))
        while not fake.requests:
            await asyncio.sleep(0.01)
        await stop(gateway)
        assert (await call).content == "Hello from fake"
        assert gateway.server.admission.cut_off() == 0


async def test_a_caller_that_cancels_during_the_grace_is_not_reported_as_cut_off(
    start_gateway: Any,
) -> None:
    """Only the calls the gateway itself ends are SHUTTING_DOWN: a caller's own
    cancellation during the grace stays a cancellation."""
    async with FakeUpstream(default=Hang()) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        call = gateway.stub.Complete(chat(), timeout=10)
        while not fake.requests:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(gateway.server.stop(grace_s=LONG_GRACE_S))
        await asyncio.sleep(0.1)
        call.cancel()
        await fake.wait_for_disconnect()
        # Drained once the cancelled call has ended: nothing left to cut, the stop ends
        # then. A call still counted after its caller left would hold it to the cut-off,
        # 29.5 s away, and be cut there.
        async with asyncio.timeout(LONG_GRACE_S / 2):
            await stopping
        assert gateway.server.admission.is_idle
        assert call.cancelled()


@pytest.mark.redis
async def test_a_caller_cancelled_call_still_cleaning_up_is_not_cut_off(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """A stream whose caller left is still charging its deltas (to a Redis ledger that
    has stalled) as the grace runs out: the gateway lets it finish, and it stays a
    cancellation rather than being cancelled again and counted as SHUTTING_DOWN."""
    captured = captured_telemetry()
    upstream.script(SLOW_STREAM)
    ledger = {
        "redis_url": redis_server.url,
        "key_prefix": uuid.uuid4().hex,
        "operation_timeout_s": 3,  # still waiting on Redis when the grace runs out
    }
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=ledger)
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    call = gateway.stub.CompleteStream(chat_stream(), timeout=10)
    assert (await call.read()).delta.content
    redis_server.pause()  # the charge for the deltas waits on Redis
    try:
        call.cancel()
        await asyncio.sleep(0.1)
        assert gateway.server.admission.in_flight == 1
        await stop(gateway)
    finally:
        redis_server.resume()
    server = attributes_of(captured.span("llmgateway.v1.CompletionService/CompleteStream"))
    assert server["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert server.get("error.type") != "SHUTTING_DOWN"
    assert gateway.server.admission.cut_off() == 0


@pytest.mark.redis
async def test_a_call_still_cleaning_up_has_the_whole_grace_before_the_ledger_closes(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Nothing is left to cut, but a call whose caller left is still charging its deltas
    to a stalled Redis: the stop waits for it to the end of the grace, as for any call,
    rather than closing the ledger under it; Redis wakes within the grace and the
    charge lands."""
    upstream.script(SLOW_STREAM)
    prefix = uuid.uuid4().hex
    ledger = {"redis_url": redis_server.url, "key_prefix": prefix, "operation_timeout_s": 3}
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=ledger)
    gateway = await start_gateway(config)
    call = gateway.stub.CompleteStream(chat_stream(), timeout=10)
    assert (await call.read()).delta.content
    redis_server.pause()
    try:
        call.cancel()
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(stop(gateway))
        await asyncio.sleep(GRACE_S * 0.7)  # past the cut, within the grace
    finally:
        redis_server.resume()
    await stopping
    assert await rows_recorded(redis_server, prefix) == ["1"]


async def test_batch_items_in_flight_are_cut_off_with_the_call(start_gateway: Any) -> None:
    """CompleteBatch goes through the same boundary: the call ends SHUTTING_DOWN."""
    async with FakeUpstream(default=Hang()) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(request=chat()) for _ in range(2)])
        call = gateway.stub.CompleteBatch(batch, timeout=10)
        reader = asyncio.ensure_future(call.read())
        while len(fake.requests) < 2:
            await asyncio.sleep(0.01)
        await stop(gateway)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reader
        assert_shutting_down(caught.value)
        for _ in range(2):
            await fake.wait_for_disconnect()


async def stopping(gateway: RunningGateway) -> asyncio.Future[None]:
    """Begin stopping the gateway, with a grace long enough that nothing is cut; the
    stop, once the drain has begun."""
    stop = asyncio.ensure_future(gateway.server.stop(grace_s=30))
    while not gateway.server.pipeline.is_stopping:
        await asyncio.sleep(0.01)
    return stop


async def test_a_draining_batch_delivers_its_items_in_flight_and_starts_no_more(
    start_gateway: Any,
) -> None:
    """Once the drain begins a batch starts no new item: the two running finish and are
    delivered, then the call ends SHUTTING_DOWN in place of its summary, for its caller
    to run the other four elsewhere. Before, it went on starting items that the end of
    the grace would cut, paid for and never delivered."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.gate.clear()  # the first two items are held upstream
        gateway = await start_gateway(gateway_config(fake.base_url))
        items = [pb.BatchItem(id=f"q{i}", request=chat(f"question {i}")) for i in range(6)]
        call = gateway.stub.CompleteBatch(
            pb.CompleteBatchRequest(items=items, concurrency=2), timeout=30
        )
        await fake.wait_until(lambda: fake.in_flight == 2)
        stop = await stopping(gateway)
        fake.gate.set()
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in call:
                received.append(message)
        assert_shutting_down(caught.value)
        assert sorted(m.result.id for m in received) == ["q0", "q1"]
        assert all(m.result.response.content == "Hello from fake" for m in received)
        assert len(fake.requests) == 2
        await stop


async def test_a_draining_summary_starts_no_more_parts(start_gateway: Any) -> None:
    """The same for Summarize: the parts running finish (and are cached), no other part
    or the combining call starts, and the call ends SHUTTING_DOWN."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        fake.gate.clear()
        gateway = await start_gateway(summarize_config(fake.base_url))
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
        call = asyncio.ensure_future(gateway.stub.Summarize(request, timeout=30))
        await fake.wait_until(lambda: fake.in_flight == SUMMARY_CONCURRENCY)
        stop = await stopping(gateway)
        fake.gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert_shutting_down(caught.value)
        assert (len(fake.requests), fake.finished) == (SUMMARY_CONCURRENCY, SUMMARY_CONCURRENCY)
        await stop


def calls_cut_off(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The stop's `server.calls_cut_off` records: calls it had to end at the grace's end."""
    return [r for r in caplog.records if r.getMessage() == "server.calls_cut_off"]


async def refused_in_its_back_off(
    gateway: RunningGateway,
    call: asyncio.Future[Any],
    caplog: pytest.LogCaptureFixture,
    *,
    failed_attempts: int = 1,
) -> grpc.aio.AioRpcError:
    """Begin `gateway`'s drain once `failed_attempts` attempts of `call` failed (the last
    a 503: it waits out its back-off), and assert the call ends at once SHUTTING_DOWN
    naming that failure, the grace cutting nothing; its error."""
    pool = gateway.server.pipeline.pool
    while pool.counters.attempts < failed_attempts:  # they failed: it is in its back-off
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
        stop = await stopping(gateway)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):  # a hang guard, far short of its back-off
                await call
        await stop
    assert_shutting_down(caught.value)
    assert "its last attempt failed: " in (caught.value.details() or "")
    assert "503" in (caught.value.details() or "")
    assert not calls_cut_off(caplog)
    return caught.value


async def test_a_draining_batch_gives_up_an_item_waiting_for_its_tenants_rate(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An item waiting for its turn under its tenant's requests_per_minute as the drain
    begins starts no more than one not begun: the call ends SHUTTING_DOWN once the item
    running is delivered, and the grace cuts nothing. Before, the wait went on (6 s here,
    up to a minute): the call was held open until the turn came, taking the tenant's rate
    for a call never made, or, as here, until the end of the grace cut it."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.gate.clear()  # the first item is held upstream; the second waits for the rate
        config = secure_config(fake.base_url, tenants={"team-a": {"requests_per_minute": 2}})
        gateway = await start_gateway(config)
        items = [pb.BatchItem(id=f"q{i}", request=chat(f"question {i}")) for i in range(3)]
        call = gateway.stub.CompleteBatch(
            pb.CompleteBatchRequest(items=items, concurrency=2),
            metadata=as_tenant("team-a"),
            timeout=30,
        )
        await fake.wait_until(lambda: fake.in_flight == 1)
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            stop = asyncio.ensure_future(gateway.server.stop(grace_s=2))
            fake.gate.set()
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for message in call:
                    received.append(message)
            await stop
        assert_shutting_down(caught.value)
        assert [m.result.id for m in received] == ["q0"]
        assert len(fake.requests) == 1
        assert not calls_cut_off(caplog)


async def test_a_draining_summary_gives_up_parts_waiting_for_their_tenants_rate(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for Summarize parts waiting for their tenant's tokens_per_minute: the call
    ends SHUTTING_DOWN once the part running is done, not when the grace cuts it."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        fake.gate.clear()
        config = secure_config(
            fake.base_url,
            tenants={"team-a": {"tokens_per_minute": 1500}},
            models=fake_model_window(1024),
            summarize={"concurrency": 3, "default_target_tokens": 64},
        )
        gateway = await start_gateway(config)
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(30))
        call = asyncio.ensure_future(
            gateway.stub.Summarize(request, metadata=as_tenant("team-a"), timeout=30)
        )
        await fake.wait_until(lambda: fake.in_flight == 1)
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            stop = asyncio.ensure_future(gateway.server.stop(grace_s=2))
            fake.gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            await stop
        assert_shutting_down(caught.value)
        assert (len(fake.requests), fake.finished) == (1, 1)
        assert not calls_cut_off(caplog)


async def test_a_batch_item_whose_turn_comes_as_the_drain_begins_gives_its_rate_back(
    start_gateway: Any,
) -> None:
    """An item waiting for its tenant's one call slot (`max_concurrent_calls: 1`) is
    handed it in the very step the drain begins: it is not sent, the call ends
    SHUTTING_DOWN, and the request it took of the tenant's requests_per_minute goes back
    with the slot. Before, the slot went back but the request stayed spent, for a call
    never made."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = secure_config(
            fake.base_url,
            tenants={"team-a": {"requests_per_minute": 3, "max_concurrent_calls": 1}},
        )
        gateway = await start_gateway(config)
        limiter = gateway.server.tenant_limiter
        assert isinstance(limiter, MemoryTenantLimiter)
        limits = config.tenants["team-a"]
        # The tenant's one slot, and one of its three requests, held here.
        held = await limiter.take_turn("team-a", limits, tokens=0)
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat())])
        call = gateway.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=30)
        received = asyncio.ensure_future(collect(call))
        while limiter.awaiting_slot("team-a") < 1:
            await asyncio.sleep(0.01)
        await held.give_back()  # the item's turn comes (it runs next) ...
        gateway.server.pipeline.begin_stopping()  # ... as the drain begins: what stop() does
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await received
        assert_shutting_down(caught.value)
        assert not fake.requests
        assert limiter.in_flight("team-a") == 0
        # Two of the three requests are left: the item's came back.
        limiter.take("team-a", limits, tokens=0, requests=2)


async def test_a_batch_item_the_drain_ends_as_it_waits_for_a_restart_names_both(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch's one item is sent, and up0 dies under it (down until its restart, due in
    30 s) before its 500 comes: the item waits for the restart to try again, and the drain
    ends that wait. The item counts as not started (no result), and the call ends
    SHUTTING_DOWN naming the restart it waited for and its attempt's failure, as a
    Summarize part's or a plain call's does. Before, the refusal was bare."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), default=Status(500)) as fake:
        fake.gate.clear()
        gateway = await start_gateway(gateway_config(fake.base_url))
        pool = gateway.server.pipeline.pool
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat())])
        call = asyncio.ensure_future(collect(gateway.stub.CompleteBatch(batch, timeout=60)))
        await fake.wait_until(lambda: fake.in_flight == 1)
        pool.set_down("up0", is_down=True, retry_at=time.monotonic() + 30)
        fake.gate.set()  # its 500: the item now waits for the restart
        while pool.counters.attempts < 1:
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            stop = await stopping(gateway)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(10):  # a hang guard, far short of the restart
                    await call
            await stop
    assert_shutting_down(caught.value)
    details = caught.value.details() or ""
    assert "restart of up0" in details, details
    assert "500" in details, details
    assert len(fake.requests) == 1
    assert not calls_cut_off(caplog)


async def test_a_batch_item_the_drain_ends_at_a_limit_after_a_failed_try_names_it(
    start_gateway: Any,
) -> None:
    """A batch's item is sent and fails (HTTP 500) as up0 dies under it; once the restart
    answers, its next try waits for up0's one slot, which team-b's plain call holds, as
    the drain begins. The call ends SHUTTING_DOWN naming the earlier try's failure,
    `(after up0: HTTP 500)`, as a Summarize does for its part's tries. Before, the pool's
    refusal knew only of the try it ended, which had no failure to name."""
    tries: list[str] = []

    def first_try_fails(body: dict[str, Any]) -> Status | None:
        if user_text(body) != "q0":
            return None
        tries.append("q0")
        return Status(500) if len(tries) == 1 else None

    async with GatedUpstream(models=(FAKE_MODEL,), respond=first_try_fails) as fake:
        gateway = await start_gateway(one_upstream_slot(gateway_config(fake.base_url)))
        pool = gateway.server.pipeline.pool
        limiter = pool.state("up0").limiter
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat("q0"))])
        call = asyncio.ensure_future(collect(gateway.stub.CompleteBatch(batch, timeout=60)))
        await fake.wait_until(lambda: fake.in_flight == 1)
        pool.set_down("up0", is_down=True, retry_at=time.monotonic() + 2.0)
        fake.release("q0")  # its 500: the item waits for the restart
        while pool.counters.attempts < 1:
            await asyncio.sleep(0.01)
        pool.set_down("up0", is_down=False)  # the restart answers
        held = asyncio.ensure_future(gateway.stub.Complete(chat("b"), timeout=60))
        await fake.wait_until(lambda: fake.in_flight == 1)
        while limiter.queued < 1:  # the item's next try, waiting for the slot
            await asyncio.sleep(0.01)
        stop = await stopping(gateway)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):  # a hang guard
                await call
        fake.release("b")
        assert (await held).content
        await stop
    assert_shutting_down(caught.value)
    assert (caught.value.details() or "").endswith(" (after up0: HTTP 500)")
    assert tries == ["q0"]


def one_upstream_slot(config: GatewayConfig) -> GatewayConfig:
    """`config` with its upstream's `max_concurrency` at 1."""
    (only,) = config.upstreams
    return dataclasses.replace(config, upstreams=(dataclasses.replace(only, max_concurrency=1),))


async def test_a_draining_batch_sends_no_item_waiting_at_its_upstreams_limit(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Items 2 and 3 wait for the upstream's one slot (`max_concurrency: 1`) as the drain
    begins: they stop waiting, take nothing and count as not started, so the upstream sees
    one request and the call ends SHUTTING_DOWN once item 1 is delivered. Before, each
    was sent in turn as the slot freed, into the drain, to be cut at the grace's end and
    paid for."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.gate.clear()  # the first item holds the slot upstream
        gateway = await start_gateway(one_upstream_slot(gateway_config(fake.base_url)))
        items = [pb.BatchItem(id=f"q{i}", request=chat(f"question {i}")) for i in range(3)]
        call = gateway.stub.CompleteBatch(
            pb.CompleteBatchRequest(items=items, concurrency=3), timeout=30
        )
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        await fake.wait_until(lambda: fake.in_flight == 1)
        while limiter.queued < 2:
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            stop = await stopping(gateway)
            fake.gate.set()
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for message in call:
                    received.append(message)
            await stop
        assert_shutting_down(caught.value)
        assert [m.result.id for m in received] == ["q0"]
        assert len(fake.requests) == 1
        assert (limiter.queued, limiter.in_flight) == (0, 0)
        assert not calls_cut_off(caplog)


async def test_a_draining_summary_sends_no_part_waiting_at_its_upstreams_limit(
    start_gateway: Any,
) -> None:
    """The same for Summarize: the part holding the upstream's one slot finishes, the two
    waiting for it are not sent, and the call ends SHUTTING_DOWN."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        fake.gate.clear()
        gateway = await start_gateway(one_upstream_slot(summarize_config(fake.base_url)))
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
        call = asyncio.ensure_future(gateway.stub.Summarize(request, timeout=30))
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        await fake.wait_until(lambda: fake.in_flight == 1)
        while limiter.queued < SUMMARY_CONCURRENCY - 1:
            await asyncio.sleep(0.01)
        stop = await stopping(gateway)
        fake.gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert_shutting_down(caught.value)
        assert (len(fake.requests), fake.finished) == (1, 1)
        await stop


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_draining_gateway_refuses_a_plain_call_waiting_at_its_upstreams_limit(
    start_gateway: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """A Complete or CompleteStream waiting for the upstream's one slot (`max_concurrency:
    1`, waits of up to a minute, as the local model's) as the drain begins is refused at
    once, SHUTTING_DOWN with the retry-elsewhere trailer, while the call holding the slot
    is still upstream: that call then finishes in the grace, and only it is sent and
    recorded. Before, the second waited on into the drain, to be sent once the slot freed
    or cut at the grace's end, although another replica could have answered it."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.gate.clear()  # the first call holds the slot upstream
        config = one_upstream_slot(gateway_config(fake.base_url))
        (only,) = config.upstreams
        config = dataclasses.replace(
            config, upstreams=(dataclasses.replace(only, max_limit_wait_s=60.0),)
        )
        gateway = await start_gateway(config)
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            refusal = await refused_by_the_drain_behind_a_held_call(
                gateway, fake, mode, is_waiting=lambda: limiter.queued >= 1
            )
        assert_shutting_down(refusal)
        assert len(fake.requests) == 1
        assert (limiter.queued, limiter.in_flight) == (0, 0)
        (row,) = await gateway.server.pipeline.ledger.query(UsageFilter())
        assert row.requests == 1  # the refused call, never sent, is not recorded
        assert not calls_cut_off(caplog)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_the_drain_ends_at_a_limit_after_one_failed_attempt_names_it(
    start_gateway: Any, mode: str
) -> None:
    """A call whose one attempt failed (up0's 500) and that waits, failed over, for up1's
    one slot (`max_concurrency: 1`) as the drain begins ends SHUTTING_DOWN naming that
    failure, `(after up0: HTTP 500)`, as one the drain ends after several names each.
    Before, it named nothing: the limiter's refusal knew of no attempt, and the status
    listed them only from two on."""
    async with (
        FakeUpstream(default=Status(500)) as failing,
        ScriptedUpstream(models=(FAKE_MODEL,)) as fake,
    ):
        fake.gate.clear()  # the first call holds up1's slot upstream
        config = gateway_config(failing.base_url, fake.base_url)
        first, second = config.upstreams
        second = dataclasses.replace(second, max_concurrency=1, max_limit_wait_s=60.0)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(first, second)))
        limiter = gateway.server.pipeline.pool.state("up1").limiter
        refusal = await refused_by_the_drain_behind_a_held_call(
            gateway, fake, mode, is_waiting=lambda: limiter.queued >= 1
        )
    assert_shutting_down(refusal)
    assert (refusal.details() or "").endswith(" (after up0: HTTP 500)")
    assert len(failing.requests) == 2  # each call's first attempt
    assert len(fake.requests) == 1


# A failure whose retry waits 20 s: far past a hang guard, within the call's deadline.
FAILED_FOR_20_S = Status(503, headers={"Retry-After": "20"})


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_draining_gateway_ends_a_plain_call_waiting_to_retry(
    upstream: FakeUpstream, start_gateway: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """A Complete or CompleteStream whose first attempt failed (a 503 asking for 20 s)
    and that waits out its retry's back-off as the drain begins ends at once,
    SHUTTING_DOWN with the retry-elsewhere trailer and the upstream's failure in its
    message; the retry is never sent. Before, it slept on into the drain, to be sent then
    or cut at the grace's end, although another replica could take it at once."""
    upstream.script(FAILED_FOR_20_S, Reply(content="retried"))
    gateway = await start_gateway(gateway_config(upstream.base_url))
    if mode == "unary":
        call = gateway.stub.Complete(chat(), timeout=60)
    else:
        call = collect(gateway.stub.CompleteStream(chat_stream(), timeout=60))
    await refused_in_its_back_off(gateway, asyncio.ensure_future(call), caplog)
    assert len(upstream.requests) == 1
    assert gateway.server.pipeline.pool.counters.retries == 0


def assert_names_each_attempt(error: grpc.aio.AioRpcError, attempts: str) -> None:
    """`error`'s message ends with `attempts`, each attempt's failure, and its ErrorInfo
    metadata `attempt_errors` holds them."""
    assert (error.details() or "").endswith(f" (attempts: {attempts})")
    assert error_details(error)[0]["attempt_errors"] == attempts


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_the_drain_ends_in_its_back_off_names_each_attempts_failure(
    upstream: FakeUpstream, start_gateway: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """A call whose attempts failed with a 500, then a 503 asking for 20 s, and that waits
    out its back-off as the drain begins ends SHUTTING_DOWN naming both failures, as any
    error after several attempts does. Before, it named the last one alone."""
    upstream.script(Status(500), FAILED_FOR_20_S, Reply(content="retried"))
    gateway = await start_gateway(gateway_config(upstream.base_url))
    if mode == "unary":
        call = gateway.stub.Complete(chat(), timeout=60)
    else:
        call = collect(gateway.stub.CompleteStream(chat_stream(), timeout=60))
    future = asyncio.ensure_future(call)
    error = await refused_in_its_back_off(gateway, future, caplog, failed_attempts=2)
    assert_names_each_attempt(error, "up0: HTTP 500; up0: HTTP 503")
    assert len(upstream.requests) == 2


async def test_a_plain_call_failing_in_the_drain_ends_rather_than_backing_off(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A call upstream as the drain begins, whose attempt then fails (a 503 asking for
    20 s), ends at once SHUTTING_DOWN rather than waiting out its retry's back-off in the
    drain; nothing more is sent, and the grace cuts nothing. Before, it slept until the
    grace's end cut it."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.script(FAILED_FOR_20_S, Reply(content="retried"))
        fake.gate.clear()  # the attempt is held upstream until the drain has begun
        gateway = await start_gateway(gateway_config(fake.base_url))
        call = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=60))
        await fake.wait_until(lambda: fake.in_flight == 1)
        with caplog.at_level(logging.WARNING, logger="llm_gateway.server"):
            stop = asyncio.ensure_future(gateway.server.stop(grace_s=2))
            while not gateway.server.pipeline.is_stopping:
                await asyncio.sleep(0.01)
            fake.gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            await stop
        assert_shutting_down(caught.value)
        assert len(fake.requests) == 1
        assert not calls_cut_off(caplog)


async def test_a_draining_summary_ends_a_part_waiting_out_its_back_off(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Summarize part whose try failed (a 503, with one try of the pool's own) and that
    waits out its 20 s back-off (`summarize.retry_backoff_s`) as the drain begins ends
    the call at once, SHUTTING_DOWN with the retry-elsewhere trailer and the failure in
    its message; the next try is never sent, and the grace cuts nothing. Before, it slept
    its whole back-off into the drain first."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.script(Status(503))
        config = summarize_config(fake.base_url, upstream_attempts=1, retry_backoff_s=20.0)
        gateway = await start_gateway(config)
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(3))
        call = asyncio.ensure_future(gateway.stub.Summarize(request, timeout=60))
        await refused_in_its_back_off(gateway, call, caplog)
        assert len(fake.requests) == 1


async def test_a_summary_the_drain_ends_in_a_parts_back_off_names_each_attempts_failure(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Summarize part whose try failed after two attempts (a 500, then a 503) and that
    waits out its back-off as the drain begins ends the call SHUTTING_DOWN naming both
    failures. Before, it named the last one alone."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        fake.script(Status(500), Status(503))
        config = summarize_config(fake.base_url, upstream_attempts=2, retry_backoff_s=20.0)
        gateway = await start_gateway(config)
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(3))
        call = asyncio.ensure_future(gateway.stub.Summarize(request, timeout=60))
        error = await refused_in_its_back_off(gateway, call, caplog, failed_attempts=2)
        assert_names_each_attempt(error, "up0: HTTP 500; up0: HTTP 503")
        assert len(fake.requests) == 2


async def test_a_summary_the_drain_ends_at_a_limit_after_a_failed_try_names_it(
    start_gateway: Any,
) -> None:
    """A Summarize part whose first try failed (up1's 503, one attempt of the pool's own,
    its Retry-After pausing up1) and whose retry waits for up0's one slot
    (`max_concurrency: 1`), held by a plain call, as the drain begins ends the call
    SHUTTING_DOWN naming that failure, `(after up1: HTTP 503)`. Before, it named nothing:
    the limiter's refusal knew only the retry's attempts, none, and the part's earlier
    tries' failures were dropped."""
    async with (
        ScriptedUpstream(models=(FAKE_MODEL,)) as fake,
        FakeUpstream(default=FAILED_FOR_20_S) as failing,
    ):
        fake.gate.clear()  # the plain call holds up0's slot upstream
        config = summarize_config(fake.base_url, upstream_attempts=1)
        held, failed = gateway_config(fake.base_url, failing.base_url).upstreams
        held = dataclasses.replace(held, max_concurrency=1, max_limit_wait_s=60.0)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(held, failed)))
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        first = asyncio.ensure_future(gateway.stub.Complete(chat("first"), timeout=30))
        await fake.wait_until(lambda: fake.in_flight == 1)
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(3))
        call = asyncio.ensure_future(gateway.stub.Summarize(request, timeout=60))
        while limiter.queued < 1:  # its first try failed on up1: its retry waits for up0
            await asyncio.sleep(0.01)
        stop = await stopping(gateway)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):  # a hang guard, far short of the grace and wait
                await call
        assert fake.in_flight == 1  # refused while the slot was still held
        fake.gate.set()
        assert (await first).content == "Hello from fake"
        await stop
    assert_shutting_down(caught.value)
    assert (caught.value.details() or "").endswith(" (after up1: HTTP 503)")
    assert len(failing.requests) == 1
    assert len(fake.requests) == 1


@contextlib.asynccontextmanager
async def slow_link(port: int, delay_s: float) -> AsyncIterator[int]:
    """A TCP proxy to `port` on loopback that holds each chunk sent to it `delay_s`, as a
    distant server's round trip would; its port."""

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await source.read(65536):
                await asyncio.sleep(delay)
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, server_writer, delay_s), pipe(server_reader, writer, 0))

    proxy = await asyncio.start_server(link, "127.0.0.1", 0)
    try:
        yield proxy.sockets[0].getsockname()[1]
    finally:
        proxy.close()


@pytest.mark.redis
async def test_parts_done_as_a_summary_drains_are_cached_for_its_retry_elsewhere(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """The parts running when the drain begins finish and are stored in the shared cache,
    even a tenth of a second away: the Summarize retried on another replica pays only for
    the others. Before, the stop closed the cache moments after the call ended,
    cancelling their stores, and the retry paid for every part again."""
    prefix = uuid.uuid4().hex
    async with (
        ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake,
        slow_link(redis_server.port, delay_s=0.1) as slow_port,
    ):

        def cached_on(port: int) -> GatewayConfig:
            """Summarize's test config, its cache in the shared Redis reached at `port`."""
            url = f"redis://127.0.0.1:{port}"
            return gateway_config(
                fake.base_url,
                models=fake_model_window(SUMMARY_WINDOW),
                summarize={"concurrency": SUMMARY_CONCURRENCY, "default_target_tokens": 64},
                cache={
                    "backend": "redis",
                    "redis_url": url,
                    "key_prefix": prefix,
                    "operation_timeout_s": 5,
                },
            )

        draining = await start_gateway(cached_on(slow_port))
        other = await start_gateway(cached_on(redis_server.port))
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
        fake.gate.clear()
        call = asyncio.ensure_future(draining.stub.Summarize(request, timeout=30))
        await fake.wait_until(lambda: fake.in_flight == SUMMARY_CONCURRENCY)
        stop = await stopping(draining)
        fake.gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert_shutting_down(caught.value)
        await stop
        asked_before = len(fake.requests)
        summary = await other.stub.Summarize(request, timeout=30)
        parts_asked = [r for r in fake.requests[asked_before:] if is_part(r.body)]
        assert len(parts_asked) == summary.chunks - SUMMARY_CONCURRENCY


def stalled_redis_ledger(redis_server: RedisServer) -> dict[str, Any]:
    """A Redis ledger that waits longer than the grace for a frozen server."""
    return {"redis_url": redis_server.url, "key_prefix": uuid.uuid4().hex, "operation_timeout_s": 3}


async def rows_recorded(redis_server: RedisServer, prefix: str) -> list[str]:
    """The `requests` count of every usage row under `prefix`."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        rows = [k async for k in client.scan_iter(match=f"{prefix}:row:*")]
        return [await client.hget(row, "requests") for row in rows]
    finally:
        await client.aclose()


async def answered_across_the_cut(
    gateway: RunningGateway,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    answer: Coroutine[Any, Any, T],
) -> T:
    """Freeze Redis, start `answer` (a call) and let the upstream answer it, so that it
    waits on the ledger; stop the gateway, and wake Redis past the cut, within the grace.
    What the call returned, once the stop is done."""
    redis_server.pause()
    try:
        call = asyncio.ensure_future(answer)
        while not upstream.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # answered: recording waits on Redis
        assert not call.done()
        stopping = asyncio.ensure_future(stop(gateway))
        await asyncio.sleep(GRACE_S * 0.7)  # past the cut, within the grace
        assert gateway.server.admission.cut_off() == 0
    finally:
        redis_server.resume()
    result = await call
    await stopping
    return result


@pytest.mark.redis
async def test_a_unary_call_answered_before_the_cut_gets_its_answer(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The upstream answered, but the call is still recording its usage (to a Redis
    that has stalled) as the grace runs out: cut off, its caller would retry elsewhere a
    call already served and paid for. It is left to finish, gets its answer once Redis
    wakes within the grace, and is recorded once."""
    upstream.script(Reply(content="served once"))
    ledger = stalled_redis_ledger(redis_server)
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=ledger)
    gateway = await start_gateway(config)

    async def complete() -> pb.CompleteResponse:
        return await gateway.stub.Complete(chat(), timeout=10)

    reply = await answered_across_the_cut(gateway, redis_server, upstream, complete())
    assert reply.content == "served once"
    assert await rows_recorded(redis_server, ledger["key_prefix"]) == ["1"]


@pytest.mark.redis
async def test_a_stream_finished_upstream_before_the_cut_gets_its_last_message(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The same for a stream whose upstream has ended: its caller gets the closing
    message with the usage, not SHUTTING_DOWN after the text."""
    upstream.script(Reply(content="one two three"))
    ledger = stalled_redis_ledger(redis_server)
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=ledger)
    gateway = await start_gateway(config)

    async def stream() -> list[Any]:  # made once Redis is frozen: gRPC starts it at once
        return await collect(gateway.stub.CompleteStream(chat_stream(), timeout=10))

    received = await answered_across_the_cut(gateway, redis_server, upstream, stream())
    assert "".join(item.delta.content for item in received) == "one two three"
    assert received[-1].WhichOneof("event") == "final"
    assert received[-1].final.usage.output_tokens > 0
    assert await rows_recorded(redis_server, ledger["key_prefix"]) == ["1"]


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_cut_off_while_a_hung_ledger_records_it_is_told_shutting_down(
    redis_server: RedisServer, start_gateway: Any, mode: str
) -> None:
    """A call cut off as the grace runs out records what it was billed before it ends,
    and a frozen Redis ledger holds that for its operation timeout, past the grace: the
    caller is told SHUTTING_DOWN all the same, not grpc's bare UNAVAILABLE ("Cancelling
    all calls", no details, no trailer) at the grace's end."""
    behaviour = Hang() if mode == "unary" else SLOW_STREAM
    async with FakeUpstream(default=behaviour) as fake:
        ledger = stalled_redis_ledger(redis_server)
        config = gateway_config(fake.base_url, models=PRICED_MODELS, ledger=ledger)
        gateway = await start_gateway(config)
        if mode == "unary":
            call = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=10))
        else:
            call = asyncio.ensure_future(collect(gateway.stub.CompleteStream(chat_stream())))
        while not fake.requests:
            await asyncio.sleep(0.01)
        redis_server.pause()
        try:
            await stop(gateway)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
        finally:
            redis_server.resume()
        assert_shutting_down(caught.value)


async def collect(call: Any) -> list[Any]:
    """Every message of a stream call, to its end."""
    return [item async for item in call]
