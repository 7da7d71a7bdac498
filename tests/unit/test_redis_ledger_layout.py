"""The Redis ledger's keys: all of them expire, and one tenant's query reads only its own rows."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from service.config import LedgerConfig
from service.ledger import RedisLedger, UsageFilter, period_end_s, period_key, total_of
from tests.old_ledger_layout import record_in_old_layout
from tests.redis_support import redis_url  # noqa: F401 - fixture
from tests.unit.test_ledger import NOON, WallClock, entry

pytestmark = pytest.mark.redis
_prefixes = itertools.count()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    """A plain Redis client on the test's redis-server."""
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


def ledger_on(url: str, clock: WallClock, prefix: str) -> RedisLedger:
    return RedisLedger(LedgerConfig(redis_url=url, key_prefix=prefix), wall_clock=clock)


async def test_every_key_the_ledger_writes_expires(
    redis_url: str,  # noqa: F811
    client: aioredis.Redis,
) -> None:
    """Rows, row ids, bucket lists, spend, reservations and record numbers all have a
    TTL, and so, once this release records, does the old layout's dims hash: labels
    with a new value in every call cost Redis memory for the retention only."""
    prefix = f"ttl{next(_prefixes)}"
    await record_in_old_layout(
        client, prefix, at_s=NOON, tenant="acme", model="m", upstream="up0",
        labels={"run": "old"}, counters={"requests": 1},
    )  # fmt: skip
    ledger = ledger_on(redis_url, WallClock(NOON), prefix)
    try:
        for run in range(5):
            await ledger.record(entry(tenant="acme:x", labels={"run": str(run)}))
        await ledger.record(entry(tenant="zeta"))
        held = await ledger.reserve("acme", "day", cost_usd=0.01, limit_usd=1.0)
        assert held.is_granted
    finally:
        await ledger.aclose()
    ttls = {key: await client.ttl(key) async for key in client.scan_iter(match=f"{prefix}:*")}
    assert f"{prefix}:dims" in ttls
    assert f"{prefix}:buckets" in ttls
    assert {key for key, ttl in ttls.items() if ttl < 0} == set()
    retention_s = LedgerConfig().retention_days * 86400
    assert ttls[f"{prefix}:dims"] <= retention_s + 86400
    assert max(ttls.values()) <= retention_s + 86400


async def test_spend_outlives_a_short_retention_until_its_period_ends(
    redis_url: str,  # noqa: F811
    client: aioredis.Redis,
) -> None:
    """With `retention_days: 1`, a monthly budget still counts what the tenant spent at
    the start of the month after a day without calls (as the memory ledger does): the
    month's spend expires no sooner than the month ends. Before, it expired with the
    rows, and a tenant idle for a day had its whole month's budget again."""
    prefix = f"spend{next(_prefixes)}"
    config = LedgerConfig(redis_url=redis_url, key_prefix=prefix, retention_days=1)
    ledger = RedisLedger(config, wall_clock=WallClock(NOON))
    try:
        await ledger.record(entry(tenant="acme", cost=0.5))
    finally:
        await ledger.aclose()
    for period in ("day", "month"):
        ttl = await client.ttl(f"{prefix}:spend:acme:{period_key(period, NOON)}")
        assert ttl >= period_end_s(period, NOON) - NOON, period
        assert ttl <= period_end_s(period, NOON) - NOON + 86400 + 1, period


async def test_a_tenant_query_reads_none_of_another_tenants_rows(
    redis_url: str,  # noqa: F811
    client: aioredis.Redis,
) -> None:
    """zeta has forty label sets, acme two: acme's query names none of zeta's rows in
    any command Redis runs for it (seen with MONITOR), so its cost is acme's alone."""
    prefix = f"reads{next(_prefixes)}"
    ledger = ledger_on(redis_url, WallClock(NOON), prefix)

    async def row_ids() -> set[str]:
        keys = client.scan_iter(match=f"{prefix}:row:*")
        return {key.rsplit(":", 1)[1] async for key in keys}

    try:
        for team in ("a", "b"):
            await ledger.record(entry(tenant="acme", labels={"team": team}))
        acme_rows = await row_ids()
        for request in range(40):
            await ledger.record(entry(tenant="zeta", labels={"request": str(request)}))
        zeta_rows = await row_ids() - acme_rows
        assert len(zeta_rows) == 40

        async def query_acme() -> None:
            rows = await ledger.query(UsageFilter(tenant="acme"))
            assert [r.labels for r in rows] == [{"team": "a"}, {"team": "b"}]

        commands = await commands_run(client, query_acme, prefix)
        everyone = await ledger.query(UsageFilter())
    finally:
        await ledger.aclose()
    assert any(f"{prefix}:row:" in command for command in commands)  # MONITOR saw the reads
    assert [c for c in commands if any(row_id in c for row_id in zeta_rows)] == []
    assert total_of(everyone).requests == 42


async def commands_run(
    client: aioredis.Redis, action: Callable[[], Awaitable[None]], prefix: str
) -> list[str]:
    """The commands naming `prefix` that Redis ran while `action` ran."""
    end = f"end-of-action-{uuid.uuid4().hex}"
    commands: list[str] = []
    async with client.monitor() as monitor:
        await action()
        await client.echo(end)  # Redis runs commands in order: all of the action's came first
        while end not in (command := (await monitor.next_command())["command"]):
            if prefix in command:
                commands.append(command)
    return commands
