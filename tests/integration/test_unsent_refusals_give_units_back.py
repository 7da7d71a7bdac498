"""A plain Complete or CompleteStream that the upstream pool refuses before any attempt
of it was begun (every upstream at its own limits past `max_limit_wait_s`, every breaker
open, the drain) gives back the request and tokens it took of its tenant's per-minute limits, kept
in memory or in Redis; one whose attempt was sent keeps them.

What is left is read as `test_drain_gives_units_back` reads it: in memory, by taking the
whole bucket (refused unless it is full); in Redis, by the bucket's stored level.
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
from tests.integration.tenancy_helpers import as_tenant, rpc_error, stream_error
from tests.integration.test_drain_gives_units_back import (
    SHORT_DOCUMENT,
    assert_bucket_full,
    held_upstream,
    limited_config,
    stored_level,
)
from tests.integration.test_shutdown_cut_off import assert_shutting_down
from tests.scripted_upstream import ScriptedUpstream

REQUESTS_PER_MINUTE = 2
TOKENS_PER_MINUTE = 1000
LIMITS = {"requests_per_minute": REQUESTS_PER_MINUTE, "tokens_per_minute": TOKENS_PER_MINUTE}
# One attempt a call, and the first failure opens the breaker for the whole test.
OPENS_AT_ONCE = {"attempts": 1, "breaker_consecutive_failures": 1, "breaker_cool_down_s": 600}


def refusing_config(
    base_url: str, redis_url: str | None, *, resilience: dict[str, Any]
) -> GatewayConfig:
    """team-a under `LIMITS`, team-b under none, one upstream of one slot, `resilience`."""
    config = limited_config(base_url, LIMITS, redis_url=redis_url)
    return dataclasses.replace(
        config, resilience=dataclasses.replace(config.resilience, **resilience)
    )


async def assert_minute_whole(gateway: RunningGateway, redis_url: str | None) -> None:
    """team-a's requests and tokens of the minute are all there: nothing kept them."""
    await assert_bucket_full(gateway, "rpm", REQUESTS_PER_MINUTE, redis_url)
    await assert_bucket_full(gateway, "tpm", TOKENS_PER_MINUTE, redis_url)


async def refused_plain_calls(gateway: RunningGateway) -> list[grpc.aio.AioRpcError]:
    """team-a's Complete, then its CompleteStream, each refused."""
    team_a = as_tenant("team-a")
    return [
        await rpc_error(gateway.stub.Complete(chat("one"), metadata=team_a, timeout=30)),
        await stream_error(gateway.stub.CompleteStream(chat_stream("two"), metadata=team_a)),
    ]


async def refused_plain_calls_at_once(gateway: RunningGateway) -> list[grpc.aio.AioRpcError]:
    """team-a's Complete and CompleteStream, made together, each refused."""
    team_a = as_tenant("team-a")
    return list(
        await asyncio.gather(
            rpc_error(gateway.stub.Complete(chat("one"), metadata=team_a, timeout=30)),
            stream_error(gateway.stub.CompleteStream(chat_stream("two"), metadata=team_a)),
        )
    )


async def test_plain_calls_refused_at_the_upstreams_limit_give_their_units_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-b's call holds the upstream's one slot, and team-a's Complete and
    CompleteStream, waiting for it no longer than `max_limit_wait_s` (0), are refused
    UPSTREAM_LIMIT unsent: the request and tokens each took of team-a's minute go back.
    Before, they stayed spent, and team-a's next calls were refused for
    requests_per_minute though nothing had been sent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = refusing_config(fake.base_url, redis_url, resilience={"max_limit_wait_s": 0.0})
        gateway = await start_gateway(config)
        held = await held_upstream(gateway, fake)
        for refused in await refused_plain_calls(gateway):
            assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at its concurrency limit" in (refused.details() or "")
        fake.gate.set()
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_minute_whole(gateway, redis_url)


async def test_plain_calls_refused_with_every_breaker_open_give_their_units_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-b's call fails (a 503) and opens the upstream's breaker: team-a's Complete
    and CompleteStream are refused UNAVAILABLE before any attempt, and the request and
    tokens each took of team-a's minute go back."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = refusing_config(fake.base_url, redis_url, resilience=OPENS_AT_ONCE)
        gateway = await start_gateway(config)
        await opened_breaker(gateway, fake)
        for refused in await refused_plain_calls(gateway):
            assert refused.code() is grpc.StatusCode.UNAVAILABLE
            assert "circuit open" in (refused.details() or "")
        assert len(fake.requests) == 1  # team-b's alone
        await assert_minute_whole(gateway, redis_url)


async def test_plain_calls_the_drain_refuses_unsent_give_their_units_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Complete and CompleteStream wait for the upstream's one slot, which
    team-b's call holds, as the drain begins: each ends SHUTTING_DOWN unsent, and the
    request and tokens each took of team-a's minute go back, as a batch item's do. Before,
    only its budget's refusal gave a plain call's units back."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        gateway = await start_gateway(refusing_config(fake.base_url, redis_url, resilience={}))
        held = await held_upstream(gateway, fake)
        refusing = asyncio.ensure_future(refused_plain_calls_at_once(gateway))
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        while limiter.queued < 2:
            await asyncio.sleep(0.01)
        gateway.server.pipeline.begin_stopping()  # what stop() does first
        fake.gate.set()
        for refused in await refusing:
            assert_shutting_down(refused)
        assert (await held).content
        assert len(fake.requests) == 1  # team-b's alone
        await assert_minute_whole(gateway, redis_url)


async def opened_breaker(gateway: RunningGateway, fake: ScriptedUpstream) -> None:
    """team-b's call fails (a 503), and opens the upstream's breaker for the test."""
    fake.script(Status(503))
    failed = await rpc_error(gateway.stub.Complete(chat(), metadata=as_tenant("team-b")))
    assert failed.code() is grpc.StatusCode.UNAVAILABLE


async def test_batch_items_refused_with_every_breaker_open_give_their_turns_units_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """A batch's two items, each taking its turn of team-a's limits as it starts, are
    refused UNAVAILABLE before any attempt (the breaker open): each fails alone and
    gives back the request and tokens its turn took. Before, the pool's refusal could not
    say nothing was sent, and they stayed spent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = refusing_config(fake.base_url, redis_url, resilience=OPENS_AT_ONCE)
        gateway = await start_gateway(config)
        await opened_breaker(gateway, fake)
        items = [pb.BatchItem(id=f"q{i}", request=chat(f"question {i}")) for i in range(2)]
        batch = pb.CompleteBatchRequest(items=items, concurrency=1)
        call = gateway.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=30)
        results = [e.result async for e in call if e.HasField("result")]
        assert [r.error.code for r in results] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 2
        assert len(fake.requests) == 1  # team-b's alone
        await assert_minute_whole(gateway, redis_url)


async def test_a_summary_refused_with_every_breaker_open_gives_its_parts_tokens_back(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize, sent whole in one call, takes its part's tokens of team-a's
    tokens_per_minute as the part starts, and is refused before any attempt (the breaker
    open): the call fails UNAVAILABLE and the tokens go back."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = refusing_config(fake.base_url, redis_url, resilience=OPENS_AT_ONCE)
        gateway = await start_gateway(config)
        await opened_breaker(gateway, fake)
        summary = pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT)
        call = gateway.stub.Summarize(summary, metadata=as_tenant("team-a"), timeout=30)
        refused = await rpc_error(call)
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert "circuit open" in (refused.details() or "")
        assert len(fake.requests) == 1
        await assert_bucket_full(gateway, "tpm", TOKENS_PER_MINUTE, redis_url)


async def test_a_plain_call_whose_attempt_was_sent_keeps_its_units(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Complete is sent and fails (a 503): the upstream had it, and its request
    stays spent, though the breaker it opened refuses team-a's next call unsent."""
    redis_url = limits_redis_url
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        config = refusing_config(fake.base_url, redis_url, resilience=OPENS_AT_ONCE)
        gateway = await start_gateway(config)
        fake.script(Status(503))
        team_a = as_tenant("team-a")
        for _ in range(2):  # sent and failed; then refused, the breaker open
            failed = await rpc_error(gateway.stub.Complete(chat(), metadata=team_a))
            assert failed.code() is grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) == 1
        if redis_url is not None:
            # The refused call's request back, the sent one's spent (and what refilled
            # since, a fraction of one).
            assert 1 <= await stored_level(redis_url, "rpm") < REQUESTS_PER_MINUTE
            return
        limiter = gateway.server.tenant_limiter
        assert isinstance(limiter, MemoryTenantLimiter)
        limits = gateway.server.config.tenants["team-a"]
        limiter.take("team-a", limits, tokens=0, requests=1)  # the refused call's, back
        with pytest.raises(QuotaExceeded):
            limiter.take("team-a", limits, tokens=0, requests=1)  # the sent call's, spent
