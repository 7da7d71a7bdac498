"""A drain that refuses a batch item or a Summarize part it never sent gives back the
per-minute units the item's or the part's turn took of its tenant's limits, kept in
memory or in Redis; one that was sent keeps them.

Each test reads what is left through the limiter itself: in memory, by taking the whole
bucket (refused unless it is full); in Redis, by the bucket's stored level, which a take
lowers and a give-back raises to the full capacity.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.config import GatewayConfig
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import FAKE_MODEL, RunningGateway, chat, fake_model_window
from tests.counting_relay import CountingRelay
from tests.integration.tenancy_helpers import as_tenant, rpc_error, secure_config
from tests.integration.test_shutdown_cut_off import (
    assert_shutting_down,
    collect,
    one_upstream_slot,
)
from tests.integration.test_summarize import default_respond, document
from tests.redis_server import RedisServer
from tests.scripted_upstream import ScriptedUpstream

TOKENS_PER_MINUTE = 100_000
REQUESTS_PER_MINUTE = 3
# A document Summarize sends whole, in one call.
SHORT_DOCUMENT = document(2)
PREFIX = "t-drain:"


def limited_config(
    base_url: str,
    limits: dict[str, int],
    *,
    redis_url: str | None = None,
    team_b: dict[str, int] | None = None,
) -> GatewayConfig:
    """team-a under `limits` (team-b under `team_b`, else none), kept in Redis at
    `redis_url` (else in memory), and one upstream of one slot (`max_concurrency: 1`)."""
    auth: dict[str, Any] = {}
    if redis_url is not None:
        auth = {"redis_url": redis_url, "redis_key_prefix": PREFIX, "redis_timeout_s": 5}
    return one_upstream_slot(
        secure_config(
            base_url,
            tenants={"team-a": limits, "team-b": team_b or {}},
            auth=auth,
            models=fake_model_window(1024),
            batch={"rate_left_to_other_calls": 0},
            summarize={"concurrency": 3, "default_target_tokens": 64},
        )
    )


async def stored_level(redis_url: str, bucket: str) -> float:
    """team-a's `bucket` (`rpm`, `tpm`) level as Redis stores it (-1: none stored)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        level = await client.hget(f"{PREFIX}tenant:{{team-a}}:{bucket}", "level")
        return -1.0 if level is None else float(level)
    finally:
        await client.aclose()


async def leases_held(redis_url: str) -> int:
    """team-a's leases of its call slots in Redis."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int(await client.zcard(f"{PREFIX}tenant:{{team-a}}:inflight"))
    finally:
        await client.aclose()


async def assert_bucket_full(
    gateway: RunningGateway, bucket: str, capacity: int, redis_url: str | None
) -> None:
    """team-a's `bucket` holds its whole `capacity`: what was taken came back."""
    if redis_url is not None:
        assert await stored_level(redis_url, bucket) == capacity
        return
    limiter = gateway.server.tenant_limiter
    assert isinstance(limiter, MemoryTenantLimiter)
    limits = gateway.server.config.tenants["team-a"]
    if bucket == "tpm":
        limiter.take("team-a", limits, tokens=capacity, requests=0)
    else:
        limiter.take("team-a", limits, tokens=0, requests=capacity)


async def held_upstream(gateway: RunningGateway, fake: ScriptedUpstream) -> asyncio.Future[Any]:
    """A call of team-b holding the upstream's one slot (its gate closed)."""
    fake.gate.clear()
    held = asyncio.ensure_future(
        gateway.stub.Complete(chat(), metadata=as_tenant("team-b"), timeout=30)
    )
    await fake.wait_until(lambda: fake.in_flight == 1)
    return held


async def waiting_at_the_upstream(gateway: RunningGateway) -> None:
    """Return once a call waits for the upstream's one slot."""
    limiter = gateway.server.pipeline.pool.state("up0").limiter
    while limiter.queued < 1:
        await asyncio.sleep(0.01)


async def test_a_summary_refused_unsent_at_its_upstreams_limit_gives_its_tokens_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize, sent whole in one call, takes its turn (its tokens of the
    tenant's tokens_per_minute) and then waits for the upstream's one slot, which team-b's
    call holds, as the drain begins: it is refused SHUTTING_DOWN, unsent, and its tokens
    go back. Before, the pool's refusal could not say nothing was sent, and they stayed
    spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        limits = {"tokens_per_minute": TOKENS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        call = gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT),
            metadata=as_tenant("team-a"),
            timeout=30,
        )
        refused = asyncio.ensure_future(rpc_error(call))
        await waiting_at_the_upstream(gateway)
        gateway.server.pipeline.begin_stopping()  # what stop() does first
        fake.gate.set()
        assert_shutting_down(await refused)
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_bucket_full(gateway, "tpm", TOKENS_PER_MINUTE, redis_url)


async def test_a_batch_item_refused_unsent_at_its_upstreams_limit_gives_its_request_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """The same for a batch's item: its turn took one of team-a's three requests a
    minute, it waited for the upstream's slot as the drain began, and it gives the request
    back as the call ends SHUTTING_DOWN."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        limits = {"requests_per_minute": REQUESTS_PER_MINUTE}
        gateway = await start_gateway(limited_config(fake.base_url, limits, redis_url=redis_url))
        held = await held_upstream(gateway, fake)
        batch = pb.CompleteBatchRequest(items=[pb.BatchItem(id="q0", request=chat("q0"))])
        call = gateway.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=30)
        received = asyncio.ensure_future(collect(call))
        await waiting_at_the_upstream(gateway)
        gateway.server.pipeline.begin_stopping()
        fake.gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await received
        assert_shutting_down(caught.value)
        assert (await held).content
        assert len(fake.requests) == 1
        await assert_bucket_full(gateway, "rpm", REQUESTS_PER_MINUTE, redis_url)


@pytest.mark.redis
@pytest.mark.parametrize("max_concurrent_calls", [0, 2])
async def test_a_part_whose_admission_the_drain_cuts_off_gives_back_what_redis_took(
    redis_server: RedisServer, start_gateway: Any, max_concurrent_calls: int
) -> None:
    """team-a's Summarize part has its admission script run by Redis, and the drain
    begins before its reply is in (held back here by a relay): the part is not sent, the
    call ends SHUTTING_DOWN, and the tokens the script took go back (and its lease, under
    a max_concurrent_calls). Before, the drain cancelled the wait for the reply, the
    script's take was never known, and the tokens stayed spent."""
    relay = CountingRelay(f"127.0.0.1:{redis_server.port}")
    relayed = await relay.__aenter__()
    try:
        async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
            limits = {"tokens_per_minute": TOKENS_PER_MINUTE}
            if max_concurrent_calls:
                limits["max_concurrent_calls"] = max_concurrent_calls
            config = limited_config(
                fake.base_url, limits, redis_url=f"redis://{relayed}/0", team_b=limits
            )
            gateway = await start_gateway(config)
            summary = pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT)
            # team-b's summary has Redis load the admission script: once replies are held,
            # its NOSCRIPT would be too, and no script would run.
            await gateway.stub.Summarize(summary, metadata=as_tenant("team-b"), timeout=30)
            relay.replying.clear()
            before = len(relay.sent_bytes)
            call = gateway.stub.Summarize(summary, metadata=as_tenant("team-a"), timeout=30)
            refused = asyncio.ensure_future(rpc_error(call))
            while b"{team-a}" not in relay.sent_bytes[before:]:
                await asyncio.sleep(0.01)
            gateway.server.pipeline.begin_stopping()
            # The drain's cancel reaches the part, in this loop's next steps, before any
            # reply released now could.
            for _ in range(3):
                await asyncio.sleep(0)
            relay.replying.set()
            assert_shutting_down(await refused)
            assert len(fake.requests) == 1  # team-b's alone
    finally:
        await relay.__aexit__(None, None, None)
    url = redis_server.url
    assert await stored_level(url, "tpm") == TOKENS_PER_MINUTE
    assert await leases_held(url) == 0
