"""A call its caller cancels once admitted, before any of it was sent upstream (waiting
for its upstream's one slot), gives back the per-minute units its admission took of its
tenant's limits, kept in memory or in Redis, as a call refused there does; one cancelled
after its request reached the upstream keeps them (the upstream may bill it).

team-a's first call holds the upstream's one slot (`max_concurrency: 1`) and its second
waits for it; both are cancelled, and team-a's three requests a minute then hold two: the
sent call's request spent, the waiting call's given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.errors import QuotaExceeded
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream
from tests.forward_proxy import ForwardProxy
from tests.integration.tenancy_helpers import as_tenant
from tests.integration.test_drain_gives_units_back import (
    REQUESTS_PER_MINUTE,
    SHORT_DOCUMENT,
    assert_bucket_full,
    held_upstream,
    leases_held,
    limited_config,
    stored_level,
    waiting_at_the_upstream,
)
from tests.integration.test_shutdown_cut_off import collect
from tests.integration.test_summarize import default_respond
from tests.scripted_upstream import ScriptedUpstream


def started_call(
    gateway: RunningGateway, mode: str, text: str, **fields: Any
) -> tuple[Any, asyncio.Future[Any]]:
    """team-a's Complete (`unary`) or CompleteStream (`stream`, read) of `text` (and
    `fields`), started, and its end as the caller sees it."""
    metadata = as_tenant("team-a")
    if mode == "unary":
        call = gateway.stub.Complete(chat(text, **fields), metadata=metadata, timeout=30)
        return call, asyncio.ensure_future(call)
    call = gateway.stub.CompleteStream(chat_stream(text, **fields), metadata=metadata, timeout=30)
    return call, asyncio.ensure_future(collect(call))


async def cancelled(call: Any, ending: asyncio.Future[Any]) -> None:
    """Cancel a started call and wait for the caller's side to end."""
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await ending


async def settled(gateway: RunningGateway) -> None:
    """Return once every call ended, its give-back awaited."""
    while not gateway.server.admission.is_idle:
        await asyncio.sleep(0.01)


async def calls_in_flight(gateway: RunningGateway, calls: int) -> None:
    """Return once `calls` calls run, those cancelled ended, their give-back awaited."""
    while gateway.server.admission.in_flight != calls:
        await asyncio.sleep(0.01)


async def assert_requests_left(gateway: RunningGateway, left: int, redis_url: str | None) -> None:
    """team-a's requests bucket holds `left` of its requests (and what refilled since),
    and, in Redis, no lease."""
    if redis_url is not None:
        level = await stored_level(redis_url, "rpm")
        assert left <= level < left + 0.5, level
        assert await leases_held(redis_url) == 0
        return
    limiter = gateway.server.tenant_limiter
    assert isinstance(limiter, MemoryTenantLimiter)
    limits = gateway.server.config.tenants["team-a"]
    with pytest.raises(QuotaExceeded):
        limiter.take("team-a", limits, tokens=0, requests=left + 1)
    limiter.take("team-a", limits, tokens=0, requests=left)


@pytest.mark.parametrize("mode", ["unary", "stream"])
@pytest.mark.parametrize("max_concurrent_calls", [0, 2])
async def test_a_call_cancelled_before_it_was_sent_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None, mode: str, max_concurrent_calls: int
) -> None:
    """team-a's second call waits for the upstream's slot, which its first call holds
    upstream, and both are cancelled: the second's request goes back, the first's stays
    spent. Before, a cancel was no refusal unsent, and both stayed spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        if max_concurrent_calls:
            limits["max_concurrent_calls"] = max_concurrent_calls
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        fake.gate.clear()
        sent = started_call(gateway, mode, "sent")
        await fake.wait_until(lambda: fake.in_flight == 1)
        waiting = started_call(gateway, mode, "waiting")
        await waiting_at_the_upstream(gateway)
        await cancelled(*waiting)
        await cancelled(*sent)
        await settled(gateway)
        await fake.wait_until(lambda: fake.in_flight == 0)
        assert len(fake.requests) == 1  # the first call's alone
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE - 1, redis_url)


# Answers the cache keeps, so that identical calls share one upstream call (single flight).
DETERMINISTIC = pb.GenerationParams(temperature=0.0)


async def following(gateway: RunningGateway, callers: int) -> None:
    """Return once `callers` follow shared upstream calls (the cache's single flight): a
    caller cancelled has left once its server side saw the cancel."""
    cache = gateway.server.pipeline.cache
    assert cache is not None
    while cache.following != callers:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_sharing_an_unsent_call_gives_its_request_back_as_it_leaves(
    start_gateway: Any, limits_redis_url: str | None, mode: str
) -> None:
    """team-a's first call waits for the upstream's one slot (team-b's call holds it), and
    an identical second call shares it (single flight); the second is cancelled before the
    shared call was sent, which then is: the second's request goes back, the first's stays
    spent. Before, the cancel reached the second call's task, where nothing said the call
    it shared was unsent, and both stayed spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        first = started_call(gateway, mode, "shared", params=DETERMINISTIC)
        await waiting_at_the_upstream(gateway)
        second = started_call(gateway, mode, "shared", params=DETERMINISTIC)
        await following(gateway, 2)
        await cancelled(*second)
        await following(gateway, 1)
        fake.gate.set()
        assert await first[1]
        assert (await held).content
        await settled(gateway)
        assert len(fake.requests) == 2  # team-b's and the shared call
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE - 1, redis_url)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_lone_cached_call_cancelled_before_it_was_sent_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None, mode: str
) -> None:
    """A call the cache would keep runs its upstream call in a task of its own (single
    flight): cancelled as it waits for the upstream's slot, it gives its request back as
    a call the cache passes by does."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        waiting = started_call(gateway, mode, "alone", params=DETERMINISTIC)
        await waiting_at_the_upstream(gateway)
        await cancelled(*waiting)
        await following(gateway, 0)
        fake.gate.set()
        assert (await held).content
        await settled(gateway)
        assert len(fake.requests) == 1  # team-b's alone
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE, redis_url)


def started_batch_or_summary(gateway: RunningGateway, kind: str) -> tuple[Any, asyncio.Future[Any]]:
    """team-a's CompleteBatch of one item (`batch`), or Summarize of a document sent whole
    in one call (`summary`), started, and its end as the caller sees it."""
    metadata = as_tenant("team-a")
    if kind == "batch":
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat("q0"))])
        call = gateway.stub.CompleteBatch(batch, metadata=metadata, timeout=30)
        return call, asyncio.ensure_future(collect(call))
    summary = pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT)
    call = gateway.stub.Summarize(summary, metadata=metadata, timeout=30)
    return call, asyncio.ensure_future(call)


# What an item's turn takes (one request), and a part's (its tokens): slow to refill,
# so that what was not given back shows.
TURN_TAKES = {
    "batch": ("rpm", {"requests_per_minute": REQUESTS_PER_MINUTE}),
    "summary": ("tpm", {"tokens_per_minute": 1_000}),
}


@pytest.mark.parametrize("kind", ["batch", "summary"])
async def test_an_item_or_part_cancelled_before_it_was_sent_gives_its_turn_back(
    start_gateway: Any, limits_redis_url: str | None, kind: str
) -> None:
    """team-a's batch item (Summarize part) takes its turn, a request (its tokens) of its
    tenant's per-minute limits, and waits for the upstream's one slot, which team-b's call
    holds, as its caller cancels the call: nothing of it was sent, and what its turn took
    goes back. Before, only a refusal (a `GatewayError`) said so, and a cancel kept it."""
    redis_url = limits_redis_url
    bucket, limits = TURN_TAKES[kind]
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        waiting = started_batch_or_summary(gateway, kind)
        await waiting_at_the_upstream(gateway)
        await cancelled(*waiting)
        await calls_in_flight(gateway, 1)  # team-b's
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        (capacity,) = limits.values()
        await assert_bucket_full(gateway, bucket, capacity, redis_url)


async def test_a_summary_cancelled_before_any_of_its_calls_was_sent_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize takes one of its three requests a minute as it is admitted, and
    its one part waits for the upstream's one slot (team-b's call holds it) as its caller
    cancels it: none of its calls was sent, and its request goes back. Before, only a
    refusal said so, and a cancelled Summarize kept its request."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        waiting = started_batch_or_summary(gateway, "summary")
        await waiting_at_the_upstream(gateway)
        await cancelled(*waiting)
        await calls_in_flight(gateway, 1)  # team-b's
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE, redis_url)


async def test_a_summary_cancelled_once_a_call_of_it_was_sent_keeps_its_request(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize is cancelled while the upstream holds its one part's answer
    back: that call was sent, and the Summarize's request stays spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        fake.gate.clear()
        sent = started_batch_or_summary(gateway, "summary")
        await fake.wait_until(lambda: fake.in_flight == 1)
        await cancelled(*sent)
        await settled(gateway)
        fake.gate.set()
        assert len(fake.requests) == 1
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE - 1, redis_url)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_cancelled_while_it_connects_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None, mode: str
) -> None:
    """team-a's call begins its attempt on an https upstream behind a proxy that never
    answers its CONNECT, and is cancelled as it waits for the tunnel: no byte of its
    request was written, and its request goes back. Before, an attempt begun kept the
    units, whether or not anything of it was sent."""
    redis_url = limits_redis_url
    async with (
        ScriptedUpstream(models=(FAKE_MODEL,)) as fake,
        ForwardProxy(hosts={"upstream.test": ("127.0.0.1", fake.port)}, mode="hang") as proxy,
    ):
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        config = limited_config(fake.base_url, limits, redis_url=redis_url)
        (only,) = config.upstreams
        behind_proxy = dataclasses.replace(
            only, base_url=f"https://upstream.test:{fake.port}/v1", proxy_url=proxy.url
        )
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(behind_proxy,)))
        connecting = started_call(gateway, mode, "connecting")
        while not proxy.requests:  # its CONNECT, never answered
            await asyncio.sleep(0.01)
        await cancelled(*connecting)
        await calls_in_flight(gateway, 0)
        assert not fake.requests
        await assert_requests_left(gateway, REQUESTS_PER_MINUTE, redis_url)
