"""Two gateway processes behind one Redis: one cache, one tenant rate limit, one usage ledger."""

from __future__ import annotations

import asyncio
import copy
import secrets
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from llmgateway.v1 import gateway_pb2 as pb
from service.auth import hash_key
from service.config import parse_config
from tests.conftest import FAKE_MODEL, chat, gateway_config_data
from tests.fake_upstream import Behaviour, FakeUpstream, Hang
from tests.integration.gateway_process import gateway_process, started_gateway_process
from tests.integration.helpers import retry_delay_s
from tests.integration.tenancy_helpers import TENANT_KEYS, as_tenant
from tests.integration.test_budget_reservations import budget_for, capped, outcome
from tests.redis_server import RedisServer
from tests.redis_support import short_leases_setup, use_short_leases
from tests.scripted_upstream import ScriptedUpstream, user_text
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
    upstream: FakeUpstream,
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
    every_logger_at_debug: None,
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


# The lease TTL of the replica killed below: its calls' leases lapse this long after their
# last renewal (every third of it) instead of a minute.
_KILLED_LEASE_TTL_S = 2


async def test_a_replica_killed_mid_call_frees_its_tenant_slot_and_budget_within_the_ttl(
    redis_server: RedisServer, start_gateway: Any, tmp_path: Path
) -> None:
    """A replica holds team-a's one concurrent-call slot and most of team-b's budget, its
    upstream hanging, past their leases' TTL (shortened here): the other replica refuses
    both tenants, telling them to retry in a second. Once the first is SIGKILLed (OOM kill,
    node lost) mid-call, its leases lapse, renewed no more, and the other admits both.

    Before, leases lapsed 15 minutes after they were taken, whatever became of their
    replica: both tenants were refused, with a 1 s RetryInfo, for 15 minutes (and a
    budget reservation stopped counting after its TTL while its call still ran)."""

    def hang_the_doomed_replicas(body: dict[str, Any]) -> Behaviour | None:
        return Hang() if user_text(body) == "call a" else None

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=hang_the_doomed_replicas) as held:
        data = gateway_config_data(
            held.base_url,
            server={"grace_period_s": 1},
            auth={
                "mode": "keys",
                "keys": [{"sha256": hash_key(k), "tenant": t} for t, k in TENANT_KEYS.items()],
                "redis_url": redis_server.url,
            },
            ledger={"redis_url": redis_server.url},
            tenants={"team-a": {"max_concurrent_calls": 1}, "team-b": {}},
            budgets={"team-b": budget_for(1.5)},
        )
        # A copy: parse_config adds the config's source to the data it is given.
        survivor = await start_gateway(parse_config(copy.deepcopy(data), source="<test>"))
        setup = short_leases_setup(_KILLED_LEASE_TTL_S)
        async with started_gateway_process(data, tmp_path, setup=setup) as doomed:
            calls = [
                doomed.stub.Complete(capped("call a"), metadata=as_tenant(tenant))
                for tenant in ("team-a", "team-b")
            ]
            await held.wait_until(lambda: held.in_flight == 2)
            await asyncio.sleep(1.5 * _KILLED_LEASE_TTL_S)  # renewed every third of the TTL
            for tenant, held_by_the_call in (
                ("team-a", "max_concurrent_calls"),
                ("team-b", "reserved"),
            ):
                refused = await outcome(
                    survivor.stub.Complete(capped("call b"), metadata=as_tenant(tenant))
                )
                assert isinstance(refused, grpc.aio.AioRpcError), refused
                assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert held_by_the_call in (refused.details() or "")
                assert retry_delay_s(refused) == 1.0
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()
            for call in calls:
                assert (await outcome(call)).code() is grpc.StatusCode.UNAVAILABLE
        for tenant in ("team-a", "team-b"):
            answer = await _admitted_again(survivor.stub, tenant)
            assert answer.content


async def _admitted_again(stub: Any, tenant: str) -> pb.CompleteResponse:
    """`tenant`'s call, retried every second (as its RetryInfo says) until it passes."""
    async with asyncio.timeout(10 * _KILLED_LEASE_TTL_S):
        while True:
            answer = await outcome(stub.Complete(capped("call c"), metadata=as_tenant(tenant)))
            if not isinstance(answer, grpc.aio.AioRpcError):
                return answer
            assert answer.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, answer
            await asyncio.sleep(retry_delay_s(answer) or 1.0)


async def test_a_calls_tenant_slot_and_budget_reservation_lapse_a_minute_after_renewal(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """The leases a call holds in Redis (its tenant slot, its budget reservation) lapse at
    most a minute after they were taken or last renewed, on Redis's clock: that is how
    long a replica killed mid-call holds its tenants' slots and budgets.

    Before, both lapsed 15 minutes after they were taken."""

    def hang(body: dict[str, Any]) -> Behaviour:
        return Hang()

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=hang) as held:
        data = gateway_config_data(
            held.base_url,
            auth={
                "mode": "keys",
                "keys": [{"sha256": hash_key(TENANT_KEYS["team-a"]), "tenant": "team-a"}],
                "redis_url": redis_server.url,
            },
            ledger={"redis_url": redis_server.url},
            tenants={"team-a": {"max_concurrent_calls": 1}},
            budgets={"team-a": budget_for(1.5)},
        )
        gateway = await start_gateway(parse_config(data, source="<test>"))
        call = gateway.stub.Complete(capped("call a"), metadata=as_tenant("team-a"))
        await held.wait_until(lambda: held.in_flight == 1)
        client = Redis.from_url(redis_server.url)
        try:
            seconds, micros = await client.time()
            lapse_at = [
                score
                for key in await client.keys("*")
                if await client.type(key) == b"zset"
                for _, score in await client.zrange(key, 0, -1, withscores=True)
            ]
        finally:
            await client.aclose()
        call.cancel()
    assert len(lapse_at) == 2  # the tenant slot and the budget reservation
    assert all(0 < at - (seconds + micros / 1e6) <= 60 for at in lapse_at), lapse_at


# The lease TTL of the test below, shortened from a minute as above.
_RENEWED_LEASE_TTL_S = 2


async def test_one_tenants_unreadable_slot_set_leaves_the_others_leases_renewed(
    redis_server: RedisServer, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """team-b's set of calls in flight written over by hand (a string) fails its own
    admission open, and its lease is renewed beside team-a's: team-a's lease is still
    renewed, so past its TTL another replica refuses team-a a second call at its cap of 1.

    Before, the renewal round failed as a whole on team-b's key (WRONGTYPE): every lease
    of the replica lapsed while its call ran, and the other replica admitted past the cap."""
    use_short_leases(monkeypatch, _RENEWED_LEASE_TTL_S)

    def hang(body: dict[str, Any]) -> Behaviour | None:
        return Hang() if user_text(body) == "held" else None

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=hang) as held:
        data = gateway_config_data(
            held.base_url,
            auth={
                "mode": "keys",
                "keys": [{"sha256": hash_key(k), "tenant": t} for t, k in TENANT_KEYS.items()],
                "redis_url": redis_server.url,
            },
            tenants={"team-a": {"max_concurrent_calls": 1}, "team-b": {"max_concurrent_calls": 5}},
        )
        one = await start_gateway(parse_config(copy.deepcopy(data), source="<test>"))
        other = await start_gateway(parse_config(data, source="<test>"))
        client = Redis.from_url(redis_server.url)
        try:
            await client.set("llm_gateway:tenant:{team-b}:inflight", "written by hand")
        finally:
            await client.aclose()
        # team-b's lease first: the round's script met its key before team-a's.
        calls = [one.stub.Complete(chat("held"), metadata=as_tenant("team-b"))]
        await held.wait_until(lambda: held.in_flight == 1)
        calls.append(one.stub.Complete(chat("held"), metadata=as_tenant("team-a")))
        await held.wait_until(lambda: held.in_flight == 2)
        await asyncio.sleep(2.5 * _RENEWED_LEASE_TTL_S)  # renewed every third of the TTL
        refused = await outcome(other.stub.Complete(chat("second"), metadata=as_tenant("team-a")))
        for call in calls:
            call.cancel()
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_calls" in (refused.details() or "")
