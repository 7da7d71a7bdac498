"""Usage rows in a Redis ledger count every served call exactly once, through Redis faults.

A row Redis refuses (here a real redis-server demoted to a replica, answering every write
`READONLY`, as mid-failover) is retried in the background until Redis takes it; a row
whose reply never came (the server frozen with SIGSTOP after the row was sent) is sent
again, and Redis recognises it by the replica's record number instead of counting it
twice. Before, both were lost: `GetUsage` and the budgets' spend missed those calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.auth import DEFAULT_TENANT
from service.ledger import period_key
from tests.conftest import RunningGateway, chat, gateway_config
from tests.fake_upstream import FakeUpstream
from tests.integration.test_cache import eventually
from tests.integration.test_late_releases import read_only
from tests.redis_server import RedisServer
from tests.telemetry_support import captured_telemetry

pytestmark = pytest.mark.redis
# The fake's reply (7 prompt and 3 completion tokens) at the test catalog's prices.
CALL_COST_USD = (7 * 0.14 + 3 * 0.42) / 1e6


async def ledger_gateway(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> tuple[RunningGateway, str]:
    """A gateway whose ledger is in `redis_server` under a prefix of its own."""
    prefix = uuid.uuid4().hex
    ledger = {"redis_url": redis_server.url, "key_prefix": prefix, "operation_timeout_s": 0.2}
    gateway = await start_gateway(gateway_config(upstream.base_url, ledger=ledger))
    return gateway, prefix


async def total(gateway: RunningGateway) -> pb.UsageRow:
    """The ledger's total over every tenant, read from Redis."""
    return (await gateway.stub.GetUsage(pb.GetUsageRequest(tenant="*"))).total


async def settled(gateway: RunningGateway) -> None:
    """Wait until no row waits to be sent again, then a little longer."""
    ledger = gateway.server.pipeline.ledger
    await eventually(lambda: ledger.late_releases.pending == 0)
    await asyncio.sleep(0.3)


async def test_calls_served_while_redis_refuses_writes_are_counted_once_it_takes_them(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Three calls while Redis answers READONLY: served, and counted once it is promoted."""
    gateway, _ = await ledger_gateway(redis_server, upstream, start_gateway)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with read_only(client):
            for _ in range(3):
                assert (await gateway.stub.Complete(chat(), timeout=10)).content
            assert gateway.server.pipeline.ledger.late_releases.pending == 3
    finally:
        await client.aclose()
    await settled(gateway)
    row = await total(gateway)
    assert row.requests == 3
    assert (row.usage.input_tokens, row.usage.output_tokens) == (21, 9)
    assert row.cost_usd == pytest.approx(3 * CALL_COST_USD, abs=1e-12)


async def test_a_row_whose_reply_was_lost_is_not_counted_twice(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Redis freezes with the row sent; the send times out, Redis wakes and applies it,
    and the retry that follows is recognised: one call, one request in the ledger."""
    gateway, _ = await ledger_gateway(redis_server, upstream, start_gateway)
    assert (await gateway.stub.Complete(chat(), timeout=10)).content  # connected while up
    redis_server.pause()
    try:
        assert (await gateway.stub.Complete(chat(), timeout=10)).content
        assert gateway.server.pipeline.ledger.late_releases.pending == 1
    finally:
        redis_server.resume()  # the frozen send runs now, before the retry
    await settled(gateway)
    row = await total(gateway)
    assert row.requests == 2
    assert row.cost_usd == pytest.approx(2 * CALL_COST_USD, abs=1e-12)


async def test_redis_forgets_the_record_numbers_of_confirmed_rows(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """What makes a row recognisable costs Redis one number per row in flight, not one
    per call ever made: after twenty calls one at a time, one number is kept."""
    gateway, prefix = await ledger_gateway(redis_server, upstream, start_gateway)
    for _ in range(20):
        assert (await gateway.stub.Complete(chat(), timeout=10)).content
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        (key,) = [k async for k in client.scan_iter(match=f"{prefix}:applied:*")]
        assert await client.zcard(key) == 1
        assert 0 < await client.ttl(key) <= 2 * 3600
    finally:
        await client.aclose()
    assert (await total(gateway)).requests == 20


async def test_a_row_redis_refuses_for_good_is_given_up_at_once_not_sent_again(
    redis_server: RedisServer,
    upstream: FakeUpstream,
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tenant's month spend key holds a list (another program's key, say), so the
    row's script fails half way with WRONGTYPE, after adding the call's day spend. Sent
    again it would fail again, for an hour, adding the day spend each time and holding
    back the rows queued behind it; instead it is given up at once, the day spend stays
    added once, and the log says what was lost (the row, which comes after the spend),
    for an operator to add by hand."""
    gateway, prefix = await ledger_gateway(redis_server, upstream, start_gateway)
    now = time.time()
    day, month = period_key("day", now), period_key("month", now)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.rpush(f"{prefix}:spend:{DEFAULT_TENANT}:{month}", "not a number")
        with caplog.at_level(logging.WARNING, logger="llm_gateway.ledger"):
            assert (await gateway.stub.Complete(chat(), timeout=10)).content
        assert gateway.server.pipeline.ledger.late_releases.pending == 0
        await asyncio.sleep(1.0)  # a retry would have come after 0.5 s
        spent_pico = await client.get(f"{prefix}:spend:{DEFAULT_TENANT}:{day}")
        assert int(spent_pico) == round(CALL_COST_USD * 1e12)
        assert (await total(gateway)).requests == 0
        assert await client.lrange(f"{prefix}:spend:{DEFAULT_TENANT}:{month}", 0, -1) == [
            b"not a number"
        ]
    finally:
        await client.aclose()
    (failed,) = [r for r in caplog.records if r.message == "ledger.record_failed"]
    assert "WRONGTYPE" in failed.__dict__["error"]
    (lost,) = [r for r in caplog.records if r.message == "ledger.record_lost"]
    assert lost.__dict__["tenant"] == DEFAULT_TENANT
    assert lost.__dict__["cost_usd"] == pytest.approx(CALL_COST_USD, abs=1e-12)


async def test_rows_waiting_for_redis_and_rows_given_up_are_metrics(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """An operator alerts on rows Redis has not taken yet and on rows given up (which
    `GetUsage` and the budgets miss) from the metrics, by store, not from the logs."""
    captured = captured_telemetry()
    prefix = uuid.uuid4().hex
    ledger = {"redis_url": redis_server.url, "key_prefix": prefix, "operation_timeout_s": 0.2}
    config = gateway_config(upstream.base_url, ledger=ledger)
    gateway = await start_gateway(config, telemetry=captured.telemetry)

    def writes(metric: str) -> float:
        return captured.total(f"llm_gateway.store.{metric}", llm_gateway__store="ledger")

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with read_only(client):
            for _ in range(2):
                assert (await gateway.stub.Complete(chat(), timeout=10)).content
            assert writes("writes_waiting") == 2
        await settled(gateway)
        assert (writes("writes_waiting"), writes("writes_abandoned")) == (0, 0)
        spend = f"{prefix}:spend:{DEFAULT_TENANT}:{period_key('day', time.time())}"
        await client.delete(spend)
        await client.rpush(spend, "not a number")
        assert (await gateway.stub.Complete(chat(), timeout=10)).content
        assert (writes("writes_waiting"), writes("writes_abandoned")) == (0, 1)
    finally:
        await client.aclose()
