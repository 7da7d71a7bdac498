"""Two gateway processes behind one Redis: one cache, one tenant rate limit, one usage ledger."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from llmgateway.v1 import gateway_pb2 as pb
from service.auth import hash_key
from service.config import parse_config
from tests.conftest import chat, gateway_config_data
from tests.fake_upstream import FakeUpstream
from tests.integration.gateway_process import gateway_process
from tests.redis_server import RedisServer
from tests.secret_capture import register_secret

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

_TENANT = "team-replicas"
_RPM = 3


def _config(upstream: FakeUpstream, redis: RedisServer, key: str) -> dict[str, Any]:
    """Everything shared lives in the one Redis: cache, ledger, caller keys' limits."""
    return gateway_config_data(
        upstream.base_url,
        server={"grace_period_s": 1},
        cache={"backend": "redis", "redis_url": redis.url},
        ledger={"redis_url": redis.url},
        auth={
            "mode": "keys",
            "keys": [{"sha256": hash_key(key), "tenant": _TENANT}],
            "redis_url": redis.url,
        },
        tenants={_TENANT: {"requests_per_minute": _RPM}},
    )


async def _cache_entries(redis: RedisServer) -> int:
    """How many cache entries the shared Redis holds (the cache's keys start "llmgw")."""
    client = Redis.from_url(redis.url)
    try:
        return len(await client.keys("llmgw*"))
    finally:
        await client.aclose()


async def test_two_processes_share_cache_rate_limit_and_ledger(
    upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A call on one process is a cache hit, a spent request and a ledger row on the other."""
    key = "replica-test-" + secrets.token_hex(16)
    metadata = (("authorization", f"Bearer {key}"),)
    config = _config(upstream, redis_server, key)
    question = chat("asked on one, answered by both", params=pb.GenerationParams(temperature=0.0))
    async with (
        gateway_process(config, tmp_path) as one,
        gateway_process(config, tmp_path) as two,
    ):
        first = await one.Complete(question, metadata=metadata)  # request 1 of _RPM
        async with asyncio.timeout(10):  # the cache is written just after the answer
            while not await _cache_entries(redis_server):
                await asyncio.sleep(0.02)
        shared = await two.Complete(question, metadata=metadata)  # request 2
        await one.Complete(chat("a second question"), metadata=metadata)  # request 3
        # `two` has admitted one call itself: only the shared per-minute count refuses this.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await two.Complete(chat("one too many"), metadata=metadata)
        usage_one = await one.GetUsage(pb.GetUsageRequest(), metadata=metadata)
        usage_two = await two.GetUsage(pb.GetUsageRequest(), metadata=metadata)

    assert not first.metadata.cache_hit
    assert shared.metadata.cache_hit
    assert (shared.content, shared.metadata.id) == (first.content, first.metadata.id)
    assert len(upstream.requests) == 2  # the hit never reached the upstream
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests_per_minute" in (refused.value.details() or "")
    assert usage_one.total.requests == usage_two.total.requests == _RPM
    assert usage_one.total.cost_usd == pytest.approx(usage_two.total.cost_usd)
    assert usage_one.total.cost_usd > 0


async def test_cache_ledger_and_keys_share_one_password_protected_redis(
    upstream: FakeUpstream, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One credential-free URL and one password variable serve all three Redis users, as
    the Kubernetes manifests pass them: a hit, the usage and the caller key all work."""
    password = register_secret("redis-pw-" + secrets.token_hex(8))  # never to be logged
    monkeypatch.setenv("GW_TEST_REDIS_PASSWORD", password)
    redis = RedisServer(password=password)
    await redis.start()
    try:
        key = "pw-test-" + secrets.token_hex(16)
        shared = {"redis_url": redis.url, "redis_password_env": "GW_TEST_REDIS_PASSWORD"}
        data = gateway_config_data(
            upstream.base_url,
            cache={"backend": "redis", **shared},
            ledger=shared,
            auth={"mode": "keys", **shared},
        )
        client = Redis.from_url(redis.url, password=password)
        await client.hset("llm_gateway:keys", hash_key(key), _TENANT)
        gateway = await start_gateway(parse_config(data, source="<test>"))
        metadata = (("authorization", f"Bearer {key}"),)
        question = chat("asked twice", params=pb.GenerationParams(temperature=0.0))
        first = await gateway.stub.Complete(question, metadata=metadata)
        async with asyncio.timeout(10):  # the cache is written just after the answer
            while not await client.keys("llmgw*"):
                await asyncio.sleep(0.02)
        second = await gateway.stub.Complete(question, metadata=metadata)
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=metadata)
        assert await client.keys("llm-gateway:usage*")
        await client.aclose()
    finally:
        await redis.stop()
    assert (first.metadata.cache_hit, second.metadata.cache_hit) == (False, True)
    assert usage.total.requests == 2
    assert len(upstream.requests) == 1
