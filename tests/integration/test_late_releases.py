"""Leases Redis refused to release are given back once it takes writes, not 15 minutes later.

A call that ends while Redis refuses writes cannot give back its tenant slot or its
budget reservation then. Here a real redis-server is demoted mid-call to a replica of a
master that does not exist (`REPLICAOF`), as the node a gateway talks to is during a
failover: it keeps its data but answers every write `READONLY`. Before, the lease held
the tenant until it expired, 15 minutes later; now the release is retried in the
background and lands once the server is promoted back (`REPLICAOF NO ONE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.config import BudgetConfig
from tests.conftest import FAKE_MODEL, chat, gateway_config
from tests.fake_upstream import FakeUpstream, Hang, Reply
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.integration.test_budget_reservations import (
    MAX_TOKENS,
    assert_budget_refused,
    budget_for,
    capped,
    outcome,
)
from tests.integration.test_cache import eventually
from tests.redis_server import RedisServer
from tests.scripted_upstream import ScriptedUpstream
from tests.telemetry_support import captured_telemetry

pytestmark = pytest.mark.redis
_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def read_only(client: Any) -> AsyncIterator[None]:
    """The server refuses writes (a replica of an unreachable master) inside the block."""
    await client.execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        yield
    finally:
        await client.execute_command("REPLICAOF", "NO", "ONE")


async def test_a_tenant_slot_redis_refused_to_release_is_given_back_once_it_takes_writes(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """team-a may run one call at a time; its call ends while Redis refuses writes; once
    Redis takes writes again the slot is free, and team-a's next call is admitted."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with FakeUpstream(default=Reply(delay_s=0.3)) as fake:
        config = one_slot_config(fake.base_url, redis_server, prefix)
        gateway = await start_gateway(config)
        client = aioredis.Redis.from_url(redis_server.url)
        in_flight = f"{prefix}tenant:{{team-a}}:inflight"
        try:
            call = asyncio.ensure_future(
                gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=_TIMEOUT_S)
            )
            await eventually(lambda: fake.requests)
            assert await client.zcard(in_flight) == 1
            async with read_only(client):
                assert (await call).content == "Hello from fake"  # served; its release refused
                await asyncio.sleep(0.3)
                assert await client.zcard(in_flight) == 1
            await eventually(lambda: _zcard_is(client, in_flight, 0))
            second = await gateway.stub.Complete(
                chat(), metadata=as_tenant("team-a"), timeout=_TIMEOUT_S
            )
            assert second.content == "Hello from fake"
        finally:
            await client.aclose()


def one_slot_config(base_url: str, redis_server: RedisServer, prefix: str) -> Any:
    """team-a may run one call at a time, its slots kept in `redis_server` under `prefix`."""
    return secure_config(
        base_url,
        auth={"redis_url": redis_server.url, "redis_key_prefix": prefix, "redis_timeout_s": 0.2},
        tenants={"team-a": {"max_concurrent_calls": 1}, "team-b": {}},
    )


async def _zcard_is(client: Any, key: str, count: int) -> bool:
    return int(await client.zcard(key)) == count


async def budgeted_gateway(
    redis_server: RedisServer, held: ScriptedUpstream, start_gateway: Any, *, timeout_s: float
) -> Any:
    """A gateway whose budget has room for 1.5 calls, its ledger in `redis_server`."""
    ledger = {
        "redis_url": redis_server.url,
        "key_prefix": uuid.uuid4().hex,
        "operation_timeout_s": timeout_s,
    }
    config = gateway_config(
        held.base_url,
        ledger=ledger,
        budgets={"default": budget_for(1.5)},
        resilience={"attempts": 1},
    )
    return await start_gateway(config)


async def test_a_reservation_redis_refused_to_release_is_given_back_once_it_takes_writes(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """The budget has room for one call in flight; that call ends while Redis refuses
    writes; once Redis takes them its reservation is gone and the next call passes."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as held:
        gateway = await budgeted_gateway(redis_server, held, start_gateway, timeout_s=0.2)
        reservations = gateway.server.pipeline.ledger
        held.gate.clear()
        call = asyncio.ensure_future(gateway.stub.Complete(capped("call a"), timeout=_TIMEOUT_S))
        await eventually(lambda: held.requests)
        assert await reservations.reserved_usd("default", "day") > 0
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            async with read_only(client):
                held.gate.set()
                assert (await call).content  # served; its release refused
                await asyncio.sleep(0.3)
                assert await reservations.reserved_usd("default", "day") > 0
        finally:
            await client.aclose()
        await eventually(lambda: _nothing_reserved(reservations))
        assert (await gateway.stub.Complete(capped("call b"), timeout=_TIMEOUT_S)).content


async def _nothing_reserved(ledger: Any, tenant: str = "default") -> bool:
    return float(await ledger.reserved_usd(tenant, "day")) == 0.0


async def test_a_reservation_is_not_released_before_its_usage_row_lands(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """Redis refuses writes (`READONLY`, mid-failover) as the call ends: its usage row
    waits to be sent again, and Redis takes writes again before its reservation's release.
    The budget, room for 1.5 calls, must go on counting the call (reserved until its row
    lands), so the next call, which the first one's spend leaves no room for, is refused:
    before, the release landed at once and the next call passed on a budget that held
    neither the first call's spend nor its reservation. (A row that times out instead
    starts a cool-down, in which the next call's budget check fails open, not refused.)"""
    every_token = Reply(completion_tokens=MAX_TOKENS)  # it costs what it reserved
    async with ScriptedUpstream(models=(FAKE_MODEL,), default=every_token) as held:
        gateway = await budgeted_gateway(redis_server, held, start_gateway, timeout_s=0.3)
        held.gate.clear()
        call = asyncio.ensure_future(gateway.stub.Complete(capped("call a"), timeout=_TIMEOUT_S))
        await eventually(lambda: held.requests)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            async with read_only(client):
                held.gate.set()
                assert (await call).content  # served; its row is to be sent again
            second = await outcome(gateway.stub.Complete(capped("call a"), timeout=_TIMEOUT_S))
        finally:
            await client.aclose()
        assert_budget_refused(second)
        reservations = gateway.server.pipeline.ledger
        await eventually(lambda: reservations.late_releases.pending == 0)  # row, then release
        assert await reservations.reserved_usd("default", "day") == 0
        spent_usd = (7 * 0.14 + MAX_TOKENS * 0.42) / 1e6  # the first call's row, once
        assert await reservations.spent_usd("default", "day") == pytest.approx(spent_usd)


async def test_an_unconfirmed_slot_redis_refuses_for_want_of_replicas_is_given_back_later(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """team-a's admission times out while Redis pauses writes, and its lease is taken
    once the pause ends; as the call ends Redis refuses writes for want of replicas
    (`NOREPLICAS`, which passes). Its release, sent as one transaction (it also marks the
    lease released), was taken for a refusal for good and given up: the slot stayed held
    for 15 minutes. It is retried, and lands once Redis takes writes again."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as held:
        config = one_slot_config(held.base_url, redis_server, prefix)
        captured = captured_telemetry()
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        client = aioredis.Redis.from_url(redis_server.url)
        in_flight = f"{prefix}tenant:{{team-a}}:inflight"
        try:
            assert (await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
            held.gate.clear()
            redis_server.pause()
            try:
                call = asyncio.ensure_future(
                    gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=_TIMEOUT_S)
                )
                await eventually(lambda: held.requests[1:])  # admitted, the lease unconfirmed
            finally:
                redis_server.resume()
            await eventually(lambda: _zcard_is(client, in_flight, 1))  # taken as Redis woke
            await client.config_set("min-replicas-to-write", 1)
            held.gate.set()
            assert (await call).content  # served; its release refused for now
            await asyncio.sleep(0.3)
            assert await client.zcard(in_flight) == 1
            await client.config_set("min-replicas-to-write", 0)
            await eventually(lambda: _zcard_is(client, in_flight, 0))
            second = await gateway.stub.Complete(
                chat(), metadata=as_tenant("team-a"), timeout=_TIMEOUT_S
            )
            assert second.content
        finally:
            await client.config_set("min-replicas-to-write", 0)
            await client.aclose()
        abandoned = "llm_gateway.store.writes_abandoned"
        assert captured.total(abandoned, llm_gateway__store="tenant_limits") == 0


@contextlib.asynccontextmanager
async def out_of_memory(client: Any) -> AsyncIterator[None]:
    """The server refuses writes (OOM, under `noeviction`) inside the block."""
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        await client.config_set("maxmemory", 0)


@pytest.mark.parametrize("refusing", [read_only, out_of_memory], ids=["readonly", "oom"])
async def test_redis_error_replies_are_logged_once_an_episode_not_once_a_call(
    redis_server: RedisServer, start_gateway: Any, caplog: Any, monkeypatch: Any, refusing: Any
) -> None:
    """While Redis answers writes with errors, calls go on as before (served, their
    limits and budget failing open), and each store logs the first error reply with its
    error (and the operation that met it), then a reminder with a count at most every
    `ERROR_REPORT_S`, then a line once Redis answers again. Before, every call logged
    each operation that failed: 5 calls, 10 lines and more."""
    monkeypatch.setattr("service.store_cooldown.ERROR_REPORT_S", 1.0)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with FakeUpstream() as fake:
        config = secure_config(
            fake.base_url,
            auth={"redis_url": redis_server.url, "redis_key_prefix": prefix},
            tenants={"team-a": {"max_concurrent_calls": 1}},
            ledger={"redis_url": redis_server.url, "key_prefix": f"{prefix}usage"},
            budgets={"team-a": {"usd": 1.0, "period": "day"}},
        )
        gateway = await start_gateway(config)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            assert (await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
            with caplog.at_level(logging.INFO, logger="llm_gateway"):
                async with refusing(client):
                    for _ in range(5):
                        reply = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))
                        assert reply.content
                    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
                    stores = {
                        r.__dict__["store"] for r in warned if r.message == "store.error_replies"
                    }
                    assert stores  # the ledger's, and the tenant limits' too for READONLY
                    # Each store's first error reply, and the operation that met it.
                    lines = [r.message for r in warned if r.message != "store.error_replies"]
                    assert len(lines) == len(set(lines)) == len(stores), lines
                    assert all(r.__dict__["error"] for r in warned)
                    await asyncio.sleep(1.0)
                    await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))
                    (reminder, *_) = [
                        r for r in caplog.records if r.message == "store.error_replies_continuing"
                    ]
                    assert reminder.__dict__["error_replies"] > 5
                await asyncio.sleep(1.0)  # none for ERROR_REPORT_S
                assert (await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
                await eventually(
                    lambda: (
                        stores
                        <= {
                            r.__dict__["store"]
                            for r in caplog.records
                            if r.message == "store.error_replies_ended"
                        }
                    )
                )
        finally:
            await client.aclose()


async def test_calls_cut_at_their_deadline_record_and_release_at_once_not_after_a_backoff(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """A unary call whose deadline passes while its upstream hangs is cancelled twice: by
    the gateway's own deadline, then by grpc's as it records its prompt's cost. Its usage
    row and its reservation's release, cut on their way to Redis though Redis answers,
    are sent again at once: its budget does not count it twice (spent and reserved) for
    a backoff (0.5 s; here an hour, so the test sees it), nor its tenant's slot stay held.

    Before, each went to the background queue as a write Redis had refused, waiting out
    the backoff, and every deadline passed so showed as Redis writes waiting."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with FakeUpstream(models=(FAKE_MODEL,), default=Hang()) as fake:
        config = one_slot_config(fake.base_url, redis_server, prefix)
        ledger = {"redis_url": redis_server.url, "key_prefix": uuid.uuid4().hex}
        config = dataclasses.replace(
            config,
            ledger=gateway_config(fake.base_url, ledger=ledger).ledger,
            budgets={"team-a": BudgetConfig(usd=1.0, period="day")},
        )
        gateway = await start_gateway(config)
        usage = gateway.server.pipeline.ledger
        usage.late_releases._first_delay_s = 3600.0
        for _ in range(3):  # the second cancel comes as the record is on its way, most often
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=0.3)
            assert cut.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: _nothing_reserved(usage, "team-a"))
        rows = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
        assert rows.total.requests == 3
        assert rows.total.cost_usd == pytest.approx(await usage.spent_usd("team-a", "day"))
        fake.default = Reply()
        answer = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=5)
        assert answer.content == "Hello from fake"  # its one slot was given back
