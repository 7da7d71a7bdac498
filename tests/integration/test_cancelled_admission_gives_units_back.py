"""A plain call (Complete, CompleteStream), or a Summarize (its own request), whose
caller cancels while its tenant's admission script is on its way to Redis gives back the
per-minute units the script took, and its lease under a `max_concurrent_calls`: whether
Redis ran the script before the cancel (its reply held back by a relay) or only after it
(Redis frozen with the script in its input, run as it wakes, before or after the
give-back). One whose script Redis never ran (paused for writes: the command of a client
that left meanwhile is dropped) gives back nothing it never took.

team-a's first call spends one of its three requests a minute, so that what is left shows
a give-back too many as well as one too few.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.store_cooldown import COOLDOWN_S
from service.tenant_limits import RedisTenantLimiter
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream
from tests.counting_relay import CountingRelay
from tests.integration.tenancy_helpers import as_tenant, rpc_error, stream_error
from tests.integration.test_drain_gives_units_back import (
    REQUESTS_PER_MINUTE,
    SHORT_DOCUMENT,
    held_upstream,
    leases_held,
    limited_config,
    stored_level,
    waiting_at_the_upstream,
)
from tests.integration.test_shutdown_cut_off import assert_shutting_down
from tests.integration.test_summarize import default_respond
from tests.redis_server import RedisServer
from tests.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.redis
# Each Redis command's timeout where Redis hangs.
TIMEOUT_S = 0.5


@contextlib.asynccontextmanager
async def relayed_gateway(
    redis_server: RedisServer, start_gateway: Any, max_concurrent_calls: int
) -> AsyncIterator[tuple[RunningGateway, CountingRelay]]:
    """A gateway keeping team-a's limits (three requests a minute, and
    `max_concurrent_calls`) in `redis_server` through a relay, once team-a's first call
    spent one request (and had Redis load the admission script)."""
    relay = CountingRelay(f"127.0.0.1:{redis_server.port}")
    relayed = await relay.__aenter__()
    try:
        async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
            limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
            if max_concurrent_calls:
                limits["max_concurrent_calls"] = max_concurrent_calls
            config = limited_config(fake.base_url, limits, redis_url=f"redis://{relayed}/0")
            gateway = await start_gateway(config)
            first = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=30)
            assert first.content
            yield gateway, relay
            assert len(fake.requests) == 1  # the first call's alone
    finally:
        await relay.__aexit__(None, None, None)


def plain_call(gateway: RunningGateway, mode: str) -> Any:
    """team-a's Complete (`unary`), CompleteStream (`stream`) or Summarize (`summary`),
    started."""
    metadata = as_tenant("team-a")
    if mode == "unary":
        return gateway.stub.Complete(chat("q"), metadata=metadata, timeout=30)
    if mode == "summary":
        summary = pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT)
        return gateway.stub.Summarize(summary, metadata=metadata, timeout=30)
    return gateway.stub.CompleteStream(chat_stream("q"), metadata=metadata, timeout=30)


async def cancel_in_admission(gateway: RunningGateway, relay: CountingRelay, mode: str) -> None:
    """Start team-a's call, and cancel it once its admission script went out to Redis;
    return once the gateway let go of the script's reply (it closes that connection)."""
    before, closed = len(relay.sent_bytes), relay.closed
    call = plain_call(gateway, mode)
    while b"{team-a}" not in relay.sent_bytes[before:]:
        await asyncio.sleep(0.01)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call if mode != "stream" else [m async for m in call]
    while relay.closed == closed:
        await asyncio.sleep(0.01)


async def settled(gateway: RunningGateway) -> None:
    """Return once the cancelled call ended, its give-back awaited."""
    while not gateway.server.admission.is_idle:
        await asyncio.sleep(0.01)


async def assert_one_request_spent(redis_url: str) -> None:
    """team-a's bucket holds its first call's request less (and what it refilled since),
    and no lease."""
    level = await stored_level(redis_url, "rpm")
    assert REQUESTS_PER_MINUTE - 1 <= level < REQUESTS_PER_MINUTE - 0.5, level
    assert await leases_held(redis_url) == 0


@pytest.mark.parametrize(
    ("mode", "max_concurrent_calls"),
    [
        ("unary", 0),
        ("unary", 2),
        ("stream", 0),
        ("stream", 2),
        ("summary", 0),
        ("summary", 2),
    ],
)
async def test_a_call_cancelled_after_its_script_ran_gives_back_what_it_took(
    redis_server: RedisServer, start_gateway: Any, mode: str, max_concurrent_calls: int
) -> None:
    """Redis runs team-a's admission script, its reply is held back, and the caller
    cancels: the request the script took goes back. Before, only the lease went back, and
    a Summarize's request stayed spent."""
    async with relayed_gateway(redis_server, start_gateway, max_concurrent_calls) as (
        gateway,
        relay,
    ):
        relay.replying.clear()
        await cancel_in_admission(gateway, relay, mode)
        relay.replying.set()
        await settled(gateway)
    await assert_one_request_spent(redis_server.url)


@pytest.mark.parametrize(
    ("mode", "max_concurrent_calls"), [("unary", 0), ("unary", 2), ("summary", 0)]
)
async def test_a_call_cancelled_before_its_script_ran_gives_back_what_it_then_took(
    redis_server: RedisServer, start_gateway: Any, mode: str, max_concurrent_calls: int
) -> None:
    """Redis is frozen while team-a's admission script waits in its input, and the caller
    cancels: as Redis wakes, the script runs and the give-back too, in either order, and
    team-a's bucket ends with its first call's request alone spent. Before, the script
    took the request for good."""
    async with relayed_gateway(redis_server, start_gateway, max_concurrent_calls) as (
        gateway,
        relay,
    ):
        redis_server.pause()
        try:
            await cancel_in_admission(gateway, relay, mode)
        finally:
            redis_server.resume()
        await settled(gateway)
    await assert_one_request_spent(redis_server.url)


@pytest.mark.parametrize("max_concurrent_calls", [0, 2])
async def test_a_call_whose_script_never_ran_gives_back_nothing(
    redis_server: RedisServer, start_gateway: Any, max_concurrent_calls: int
) -> None:
    """Redis is paused for writes while team-a's admission script waits, and the caller
    cancels: Redis drops the script of the connection that left, and the give-back puts
    back nothing (a give-back of what the call asked for would refill the first call's
    request too)."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with relayed_gateway(redis_server, start_gateway, max_concurrent_calls) as (
            gateway,
            relay,
        ):
            await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
            try:
                await cancel_in_admission(gateway, relay, "unary")
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
            await settled(gateway)
    finally:
        await admin.aclose()
    await assert_one_request_spent(redis_server.url)


def refused_call(gateway: RunningGateway, mode: str) -> asyncio.Future[grpc.aio.AioRpcError]:
    """team-a's Complete (`unary`), CompleteBatch of one item (`batch`) or Summarize
    (`summary`), started, and the error it is to end with."""
    if mode == "batch":
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat("q0"))])
        call = gateway.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=30)
        return asyncio.ensure_future(stream_error(call))
    return asyncio.ensure_future(rpc_error(plain_call(gateway, mode)))


@pytest.mark.parametrize("mode", ["unary", "batch", "summary"])
async def test_a_call_admitted_in_the_cool_down_and_refused_unsent_gives_back_nothing(
    redis_server: RedisServer, start_gateway: Any, mode: str
) -> None:
    """Redis hangs: team-b's admission times out and starts the tenant limits' cool-down,
    and team-a's call (a plain call; a batch's item as its turn comes; a Summarize, its
    request), admitted in it, takes nothing from Redis; it waits for the upstream's one
    slot (team-b's call holds it) until the drain refuses it unsent, Redis answering
    again. It gives back nothing. Before, it gave back the request it never took, and
    team-a's first call's request with it (a batch's item and a Summarize until now)."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        config = limited_config(fake.base_url, limits, redis_url=redis_server.url, team_b=limits)
        config = dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, redis_timeout_s=TIMEOUT_S)
        )
        gateway = await start_gateway(config)
        first = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=30)
        assert first.content
        redis_server.pause()
        try:
            held = await held_upstream(gateway, fake)  # team-b's, admitted as Redis hangs
            refused = refused_call(gateway, mode)
            await waiting_at_the_upstream(gateway)
        finally:
            redis_server.resume()
        limiter = gateway.server.tenant_limiter
        assert isinstance(limiter, RedisTenantLimiter)
        assert limiter.cooldown.skipped == 1  # team-a's admission: left Redis alone
        await asyncio.sleep(COOLDOWN_S)  # the give-back then tries Redis, which answers
        gateway.server.pipeline.begin_stopping()
        assert_shutting_down(await refused)
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 2  # the first call's and team-b's
    await assert_one_request_spent(redis_server.url)


@pytest.mark.parametrize(
    ("mode", "max_concurrent_calls", "is_run"),
    [
        ("unary", 0, False),
        ("unary", 2, False),
        ("batch", 0, False),
        ("summary", 0, False),
        ("unary", 0, True),
        ("unary", 2, True),
    ],
)
async def test_a_call_whose_admission_timed_out_and_refused_unsent_gives_back_what_it_took(
    redis_server: RedisServer,
    start_gateway: Any,
    mode: str,
    max_concurrent_calls: int,
    is_run: bool,
) -> None:
    """team-a's admission script waits in Redis (paused for writes; or frozen, `is_run`)
    past its timeout, and the call goes on, admitted, to wait for the upstream's one slot
    (team-b's call holds it) until the drain refuses it unsent, Redis answering again. A
    script Redis dropped (its client left) took nothing, and nothing is given back; one
    Redis ran as it woke took the request, which goes back. Before, the request was given
    back whether or not the script had run: with team-a's first call's request, when it
    had not."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
            limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
            if max_concurrent_calls:
                limits["max_concurrent_calls"] = max_concurrent_calls
            config = limited_config(fake.base_url, limits, redis_url=redis_server.url)
            config = dataclasses.replace(
                config, auth=dataclasses.replace(config.auth, redis_timeout_s=TIMEOUT_S)
            )
            gateway = await start_gateway(config)
            first = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=30)
            assert first.content
            held = await held_upstream(gateway, fake)  # team-b's: unlimited, no script
            if is_run:
                redis_server.pause()
            else:
                await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
            try:
                refused = refused_call(gateway, mode)
                await waiting_at_the_upstream(gateway)  # admitted once its reply timed out
            finally:
                if is_run:
                    redis_server.resume()
                else:
                    await admin.execute_command("CLIENT", "UNPAUSE")
            await asyncio.sleep(COOLDOWN_S)  # the give-back then tries Redis, which answers
            gateway.server.pipeline.begin_stopping()
            assert_shutting_down(await refused)
            fake.gate.set()
            assert (await held).content
            await settled(gateway)
            assert len(fake.requests) == 2  # the first call's and team-b's
    finally:
        await admin.aclose()
    await assert_one_request_spent(redis_server.url)
