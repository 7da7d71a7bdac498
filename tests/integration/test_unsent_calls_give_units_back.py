"""A call the gateway never sent upstream gives back the per-minute units its tenant's
limits took for it, kept in memory or in Redis; one any attempt of which was sent keeps
them: a Summarize's own request, a call its deadline ends while it waits at its
upstream's own limit, and a call that shared another's upstream call (single flight).

What is left is read through the limiter itself (`assert_bucket_full`), as in
`test_drain_gives_units_back`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import GatewayConfig
from service.errors import QuotaExceeded
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream
from tests.fake_upstream import Status
from tests.integration.tenancy_helpers import as_tenant, rpc_error
from tests.integration.test_drain_gives_units_back import (
    REQUESTS_PER_MINUTE,
    SHORT_DOCUMENT,
    assert_bucket_full,
    held_upstream,
    limited_config,
    stored_level,
    waiting_at_the_upstream,
)
from tests.integration.test_resilience import error_details
from tests.integration.test_shutdown_cut_off import assert_shutting_down, collect
from tests.integration.test_summarize import default_respond
from tests.scripted_upstream import GatedUpstream, ScriptedUpstream, user_text

RATE = {"requests_per_minute": REQUESTS_PER_MINUTE}


async def assert_one_request_spent(gateway: RunningGateway, redis_url: str | None) -> None:
    """team-a's requests_per_minute bucket holds one request less than its capacity
    (and what it refilled since)."""
    if redis_url is not None:
        level = await stored_level(redis_url, "rpm")
        assert REQUESTS_PER_MINUTE - 1 <= level < REQUESTS_PER_MINUTE - 0.5
        return
    limiter = gateway.server.tenant_limiter
    assert isinstance(limiter, MemoryTenantLimiter)
    limits = gateway.server.config.tenants["team-a"]
    limiter.take("team-a", limits, tokens=0, requests=REQUESTS_PER_MINUTE - 1)
    with pytest.raises(QuotaExceeded, match="requests_per_minute"):
        limiter.take("team-a", limits, tokens=0, requests=1)


async def test_a_summary_the_drain_refuses_before_any_part_is_sent_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize takes one of its three requests a minute as it is admitted; its
    one part waits for the upstream's one slot (team-b's call holds it) as the drain
    begins: nothing of it was sent, it ends SHUTTING_DOWN, and its request goes back.
    Before, only its part's turn gave back what it took; the Summarize's own request stayed
    spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        gateway = await start_gateway(limited_config(fake.base_url, RATE, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        call = gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT),
            metadata=as_tenant("team-a"),
            timeout=30,
        )
        refused = asyncio.ensure_future(rpc_error(call))
        await waiting_at_the_upstream(gateway)
        gateway.server.pipeline.begin_stopping()
        fake.gate.set()
        assert_shutting_down(await refused)
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_bucket_full(gateway, "rpm", REQUESTS_PER_MINUTE, redis_url)


async def test_a_summary_whose_part_was_sent_keeps_its_request(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize, whose one part the upstream refuses (HTTP 400), was sent: it
    fails, and its request stays spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=lambda _: Status(400)) as fake:
        gateway = await start_gateway(limited_config(fake.base_url, RATE, redis_url=redis_url))
        call = gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT),
            metadata=as_tenant("team-a"),
            timeout=30,
        )
        refused = await rpc_error(call)
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused
        assert len(fake.requests) == 1
        await assert_one_request_spent(gateway, redis_url)


def a_second_per_attempt(config: GatewayConfig) -> GatewayConfig:
    """`config` with a second as the least time an upstream attempt may start with."""
    resilience = dataclasses.replace(config.resilience, min_attempt_s=1.0)
    return dataclasses.replace(config, resilience=resilience)


async def test_an_item_its_deadline_ends_at_its_upstreams_limit_gives_its_units_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's batch item takes its turn (one of its tenant's requests a minute) and
    waits for the upstream's one slot (team-b's call holds it), in line again after each
    wait, until its deadline leaves too little for an attempt: it fails
    DEADLINE_EXCEEDED, never sent, and its request goes back. Before, the pool's
    DeadlineExceeded did not say that nothing was sent, and the request stayed spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = limited_config(fake.base_url, RATE, redis_url=redis_url)
        gateway = await start_gateway(a_second_per_attempt(config))
        held = await held_upstream(gateway, fake)
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat("q0"))])
        call = gateway.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=3)
        item = await anext(aiter(call))
        assert item.result.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], item
        call.cancel()
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_bucket_full(gateway, "rpm", REQUESTS_PER_MINUTE, redis_url)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_plain_call_its_deadline_ends_at_its_upstreams_slot_gives_its_units_back(
    start_gateway: Any, limits_redis_url: str | None, mode: str
) -> None:
    """team-a's Complete (CompleteStream) waits for the upstream's one slot (team-b's call
    holds it; `max_limit_wait_s` is longer than its deadline) until its deadline leaves
    too little for an attempt: it fails DEADLINE_EXCEEDED, naming the slot it waited for,
    never sent, and its request goes back. Before, it was RESOURCE_EXHAUSTED
    (`UPSTREAM_LIMIT`), as though the limit had refused it, where a batch item's wait so
    ended is DEADLINE_EXCEEDED."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = limited_config(fake.base_url, RATE, redis_url=redis_url)
        gateway = await start_gateway(a_second_per_attempt(config))
        held = await held_upstream(gateway, fake)
        metadata = as_tenant("team-a")
        if mode == "unary":
            call = gateway.stub.Complete(chat("q0"), metadata=metadata, timeout=3)
        else:
            stream = gateway.stub.CompleteStream(chat_stream("q0"), metadata=metadata, timeout=3)
            call = collect(stream)
        waiting = asyncio.ensure_future(rpc_error(call))
        await waiting_at_the_upstream(gateway)
        error = await waiting
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert error_details(error)[1] == "DEADLINE_EXCEEDED"
        assert "'up0'" in (error.details() or "")
        assert "concurrency limit" in (error.details() or "")
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_bucket_full(gateway, "rpm", REQUESTS_PER_MINUTE, redis_url)


async def test_a_call_its_deadline_ends_once_it_was_sent_keeps_its_units(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Complete is sent, and its deadline ends it while the upstream holds the
    answer back: it is told DEADLINE_EXCEEDED, and its request stays spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        gateway = await start_gateway(limited_config(fake.base_url, RATE, redis_url=redis_url))
        fake.gate.clear()
        call = gateway.stub.Complete(chat("q0"), metadata=as_tenant("team-a"), timeout=2)
        error = await rpc_error(call)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error
        fake.gate.set()
        assert len(fake.requests) == 1
        await assert_one_request_spent(gateway, redis_url)


async def test_summaries_sharing_a_call_each_give_back_by_their_own_tries(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's first Summarize sends its one part, which fails (HTTP 500), and its
    retry waits for the upstream's one slot (team-b's call took it); an identical second
    Summarize shares that retry (single flight). The drain refuses the shared call
    unsent: the first Summarize, one of whose tries was sent, keeps its request, and the
    second, nothing of which was sent, gives its own back. Before, both got the one
    error object, whose `is_unsent` the first cleared for its own sent try, so that the
    second kept its request too."""
    redis_url = limits_redis_url
    parts: list[str] = []

    def first_part_fails(body: dict[str, Any]) -> Status | None:
        if user_text(body) != SHORT_DOCUMENT:
            return None
        parts.append(user_text(body))
        return Status(500) if len(parts) == 1 else None

    async with GatedUpstream(models=(FAKE_MODEL,), respond=first_part_fails) as fake:
        config = limited_config(fake.base_url, RATE, redis_url=redis_url)
        config = dataclasses.replace(
            config,
            resilience=dataclasses.replace(config.resilience, attempts=1),
            summarize=dataclasses.replace(config.summarize, chunk_attempts=2),
        )
        gateway = await start_gateway(config)
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        summary = pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT)
        first = asyncio.ensure_future(
            rpc_error(gateway.stub.Summarize(summary, metadata=as_tenant("team-a"), timeout=30))
        )
        await fake.wait_until(lambda: fake.in_flight == 1)  # its part's first try, held
        held = asyncio.ensure_future(
            gateway.stub.Complete(chat("b"), metadata=as_tenant("team-b"), timeout=30)
        )
        await waiting_at_the_upstream(gateway)
        fake.release(SHORT_DOCUMENT)  # the first try fails; team-b's call takes the slot
        await fake.wait_until(lambda: len(fake.requests) == 2)
        while limiter.queued < 1:  # the first Summarize's retry, waiting for the slot
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(
            rpc_error(gateway.stub.Summarize(summary, metadata=as_tenant("team-a"), timeout=30))
        )
        cache = gateway.server.pipeline.cache
        assert cache is not None
        while cache.following < 2:
            await asyncio.sleep(0.01)
        gateway.server.pipeline.begin_stopping()
        assert_shutting_down(await first)
        assert_shutting_down(await second)
        fake.release("b")
        assert (await held).content
        assert len(fake.requests) == 2  # the first try and team-b's call
        await assert_one_request_spent(gateway, redis_url)
