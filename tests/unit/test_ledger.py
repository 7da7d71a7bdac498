"""The usage ledger, in memory and in a real Redis, and budgets on top of it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools

import pytest
import redis.asyncio as aioredis

from service.budgets import Budgets, HeldByCallsInFlight
from service.config import BudgetConfig, ConfigError, LedgerConfig, ModelConfig, parse_config
from service.domain import ChatRequest, GenerationParams, Message, Role, Usage
from service.errors import QuotaExceeded
from service.ledger import (
    PICO,
    MemoryLedger,
    RedisLedger,
    UsageEntry,
    UsageFilter,
    UsageRow,
    _entry_counters,
    _RecordNumbers,
    period_end_s,
    period_key,
    period_key_end_s,
    to_pico,
    total_of,
)
from service.pricing import PriceList
from service.tokens import estimate_prompt_tokens
from tests.redis_support import redis_url  # noqa: F401 - fixture

NOON = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC).timestamp()
_prefixes = itertools.count()


class WallClock:
    """Settable epoch time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(tenant="acme", model="m", upstream="up0", labels=None, cost=0.001, **usage):
    """A ledger entry with a few tokens."""
    return UsageEntry(
        tenant=tenant,
        model=model,
        upstream=upstream,
        labels=labels or {},
        usage=Usage(
            input_tokens=usage.get("input_tokens", 10),
            output_tokens=usage.get("output_tokens", 5),
            cached_input_tokens=usage.get("cached_input_tokens", 0),
            reasoning_tokens=usage.get("reasoning_tokens", 0),
        ),
        cost_usd=cost,
    )


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_ledger(request):
    """A factory of ledgers of both kinds on a settable clock (Redis keys isolated per ledger)."""
    made = []

    def make(clock: WallClock, **config):
        if request.param == "memory":
            ledger = MemoryLedger(LedgerConfig(**config), wall_clock=clock)
        else:
            url = request.getfixturevalue("redis_url")
            ledger = RedisLedger(
                LedgerConfig(redis_url=url, key_prefix=f"t{next(_prefixes)}", **config),
                wall_clock=clock,
            )
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        await ledger.aclose()


async def test_rows_are_summed_by_tenant_model_upstream_and_labels(make_ledger):
    """Entries with the same dimensions add up; different ones get their own rows."""
    ledger = make_ledger(WallClock(NOON))
    await ledger.record(entry(labels={"team": "a"}, cost=0.1, input_tokens=100))
    await ledger.record(
        entry(labels={"team": "a"}, cost=0.2, cached_input_tokens=4, reasoning_tokens=3)
    )
    await ledger.record(entry(labels={"team": "b"}, cost=0.5))
    await ledger.record(entry(tenant="zeta", model="other", cost=0.25))
    rows = await ledger.query(UsageFilter())
    assert [(r.tenant, r.model, dict(r.labels), r.requests) for r in rows] == [
        ("acme", "m", {"team": "a"}, 2),
        ("acme", "m", {"team": "b"}, 1),
        ("zeta", "other", {}, 1),
    ]
    assert rows[0].input_tokens == 110
    assert rows[0].cached_input_tokens == 4
    assert rows[0].reasoning_tokens == 3
    assert total_of(rows).reasoning_tokens == 3
    assert rows[0].cost_usd == 0.3  # exact: summed as integer pico-dollars
    assert total_of(rows).cost_usd == 1.05
    assert total_of(rows).requests == 4


def test_a_memory_rows_own_sum_of_an_entry_is_the_counters_redis_adds() -> None:
    """`UsageRow.add_entry` (the memory ledger's, written out) adds what `_entry_counters`
    gives the Redis ledger, for every kind of entry, and returns its cost."""
    estimated = dataclasses.replace(entry().usage, is_estimated=True)
    entries = [
        entry(cost=0.25, input_tokens=7, cached_input_tokens=2, reasoning_tokens=3),
        entry(cost=0.0),  # a free model
        dataclasses.replace(entry(cost=0.0), is_cache_hit=True, saved_cost_usd=0.125),
        dataclasses.replace(entry(cost=0.5), is_request=False, usage=estimated),
    ]
    for one in entries:
        summed, added = UsageRow("t", "m", "u", {}), UsageRow("t", "m", "u", {})
        cost_pico = summed.add_entry(one)
        added.add(_entry_counters(one))
        assert summed == added
        assert cost_pico == _entry_counters(one)["cost_pico"]
        assert all(type(v) is int for v in summed.counters().values())


async def test_a_tenants_rows_past_its_cap_in_a_bucket_are_summed_in_one_overflow_row(
    make_ledger, caplog
):
    """Labels with a new value on every call start at most `max_rows_per_tenant` rows a
    bucket; the calls past it add up in one overflow row, counted whole, said once in
    the log. Rows the tenant has keep counting, other tenants and the next bucket start
    afresh.

    Before, every label set was a row for the whole retention: a request id as a label
    grew the ledger (the process, or Redis) by a row a call.
    """
    clock = WallClock(NOON)
    ledger = make_ledger(clock, max_rows_per_tenant=3)
    for request in range(6):
        await ledger.record(entry(labels={"request": str(request)}, cost=0.25))
    await ledger.record(entry(labels={"request": "0"}))
    await ledger.record(entry(tenant="zeta", labels={"request": "9"}))
    rows = await ledger.query(UsageFilter(tenant="acme"))
    assert {tuple(r.labels.items()): r.requests for r in rows} == {
        (("llm_gateway.overflow", "true"),): 3,
        (("request", "0"),): 2,
        (("request", "1"),): 1,
        (("request", "2"),): 1,
    }
    assert total_of(rows).cost_usd == 6 * 0.25 + 0.001
    assert [dict(r.labels) for r in await ledger.query(UsageFilter(tenant="zeta"))] == [
        {"request": "9"}
    ]
    capped = [r for r in caplog.records if r.getMessage() == "ledger.rows_capped"]
    assert [(r.tenant, r.max_rows_per_tenant) for r in capped] == [("acme", 3)]
    clock.now += 3600  # the next bucket
    await ledger.record(entry(labels={"request": "7"}))
    window = UsageFilter(tenant="acme", start_s=clock.now)
    assert [dict(r.labels) for r in await ledger.query(window)] == [{"request": "7"}]


@pytest.mark.parametrize(
    ("query", "expected_requests"),
    [
        (UsageFilter(tenant="acme"), 3),
        (UsageFilter(tenant="nobody"), 0),
        (UsageFilter(model="other"), 1),
        (UsageFilter(labels={"team": "a"}), 2),
        (UsageFilter(labels={"team": "a", "env": "prod"}), 1),
        (UsageFilter(tenant="acme", labels={"env": "dev"}), 0),
    ],
)
async def test_filters_select_rows(make_ledger, query, expected_requests):
    """Tenant, model and label filters (rows carrying every label given) select the rows."""
    ledger = make_ledger(WallClock(NOON))
    await ledger.record(entry(labels={"team": "a"}))
    await ledger.record(entry(labels={"team": "a", "env": "prod"}))
    await ledger.record(entry(labels={"team": "b"}))
    await ledger.record(entry(tenant="zeta", model="other"))
    rows = await ledger.query(query)
    assert total_of(rows).requests == expected_requests


async def test_time_window_selects_buckets(make_ledger):
    """start/end select whole buckets: usage two hours ago is outside the last hour."""
    clock = WallClock(NOON - 7200)
    ledger = make_ledger(clock)
    await ledger.record(entry(cost=1.0))
    clock.now = NOON
    await ledger.record(entry(cost=2.0))
    recent = await ledger.query(UsageFilter(start_s=NOON - 3600))
    older = await ledger.query(UsageFilter(end_s=NOON - 3600))
    everything = await ledger.query(UsageFilter())
    assert total_of(recent).cost_usd == 2.0
    assert total_of(older).cost_usd == 1.0
    assert total_of(everything).cost_usd == 3.0


async def test_spend_is_per_utc_day_and_month(make_ledger):
    """Daily spend resets at midnight UTC; monthly spend keeps counting until the 1st."""
    clock = WallClock(NOON)
    ledger = make_ledger(clock)
    await ledger.record(entry(cost=0.4))
    clock.now = NOON + 86400
    await ledger.record(entry(cost=0.1))
    assert await ledger.spent_usd("acme", "day") == 0.1
    assert await ledger.spent_usd("acme", "month") == 0.5
    assert await ledger.spent_usd("other", "month") == 0.0
    clock.now = dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC).timestamp()
    assert await ledger.spent_usd("acme", "month") == 0.0


@pytest.mark.parametrize(
    ("period", "at", "key", "end"),
    [
        ("day", dt.datetime(2026, 11, 28, 23, 59), "day:2026-11-28", dt.datetime(2026, 11, 29)),
        ("month", dt.datetime(2026, 11, 28, 12), "month:2026-11", dt.datetime(2026, 12, 1)),
        ("month", dt.datetime(2026, 12, 31, 23), "month:2026-12", dt.datetime(2027, 1, 1)),
    ],
)
def test_periods_are_utc_calendar_periods(period, at, key, end):
    """Period keys and ends follow the UTC calendar, across a year's end too."""
    at_s = at.replace(tzinfo=dt.UTC).timestamp()
    assert period_key(period, at_s) == key
    assert period_end_s(period, at_s) == end.replace(tzinfo=dt.UTC).timestamp()


PRICES = PriceList(
    {"m": ModelConfig(context_window=4096, input_usd_per_million=1.0, output_usd_per_million=2.0)}
)


def request_of(tenant: str) -> ChatRequest:
    """A small request for model m."""
    return ChatRequest(model="m", messages=(Message(Role.USER, "hello"),), tenant=tenant)


async def check(budgets: Budgets, request: ChatRequest) -> None:
    """`budgets.reserve` with the prompt estimated as `Pipeline.prepare` does, then released."""
    reservation = await budgets.reserve(
        request, prompt_tokens=estimate_prompt_tokens(request.messages)
    )
    if reservation is not None:
        await budgets.release(reservation)


async def test_budget_refuses_once_spent_until_the_period_resets():
    """A tenant at its daily limit is refused with RetryInfo until midnight UTC; others pass."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(wall_clock=clock)
    budgets = Budgets(
        {"acme": BudgetConfig(usd=0.01, period="day")},
        ledger=ledger,
        prices=PRICES,
        wall_clock=clock,
    )
    await check(budgets, request_of("acme"))
    await ledger.record(entry(cost=0.01))
    with pytest.raises(QuotaExceeded) as refused:
        await check(budgets, request_of("acme"))
    assert refused.value.subject == "tenant:acme"
    assert refused.value.retry_after_s == 12 * 3600
    await check(budgets, request_of("zeta"))  # no budget of its own and no "*"
    clock.now = NOON + 86400
    await check(budgets, request_of("acme"))


async def test_a_refusal_read_past_midnight_says_retry_now_not_in_a_day():
    """The refusal's RetryInfo is the end of the period the ledger refused in: when
    midnight passes between the ledger's check and the refusal, the new day's budget has
    room, and the caller is not told to wait until the next midnight."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(wall_clock=clock)
    budgets_clock = WallClock(NOON)
    budgets = Budgets(
        {"acme": BudgetConfig(usd=0.01, period="day")},
        ledger=ledger,
        prices=PRICES,
        wall_clock=budgets_clock,
    )
    await ledger.record(entry(cost=0.01))
    midnight = dt.datetime(2026, 11, 29, tzinfo=dt.UTC).timestamp()
    clock.now, budgets_clock.now = midnight - 0.5, midnight + 0.5
    with pytest.raises(QuotaExceeded) as refused:
        await check(budgets, request_of("acme"))
    assert refused.value.retry_after_s == 0.0


@pytest.mark.parametrize(
    ("key", "end"),
    [
        ("day:2026-11-28", dt.datetime(2026, 11, 29)),
        ("day:2026-12-31", dt.datetime(2027, 1, 1)),
        ("month:2026-11", dt.datetime(2026, 12, 1)),
        ("month:2026-12", dt.datetime(2027, 1, 1)),
    ],
)
def test_a_period_key_names_its_end(key, end):
    """The end of the UTC period a key names, across a year's end too."""
    assert period_key_end_s(key) == end.replace(tzinfo=dt.UTC).timestamp()


async def test_budget_counts_the_prompt_of_the_call_about_to_be_made():
    """A call whose prompt alone would pass the limit is refused before it is sent."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(wall_clock=clock)
    budgets = Budgets(
        {"*": BudgetConfig(usd=0.0001)}, ledger=ledger, prices=PRICES, wall_clock=clock
    )
    await check(budgets, request_of("anyone"))  # "hello": a few tokens, far under 100
    big = ChatRequest(model="m", messages=(Message(Role.USER, "word " * 4000),), tenant="anyone")
    with pytest.raises(QuotaExceeded, match="monthly budget"):
        await check(budgets, big)


async def test_budget_reserves_max_tokens_as_output_and_says_what_calls_in_flight_hold():
    """With max_tokens set the output it allows is reserved, and refusals count it."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(wall_clock=clock)
    budgets = Budgets(
        {"acme": BudgetConfig(usd=0.005, period="day")},
        ledger=ledger,
        prices=PRICES,
        wall_clock=clock,
    )
    capped = dataclasses.replace(request_of("acme"), params=GenerationParams(max_tokens=1000))
    prompt_tokens = estimate_prompt_tokens(capped.messages)
    expected = (prompt_tokens * 1.0 + 1000 * 2.0) / 1e6
    assert budgets.expected_cost_usd(capped, prompt_tokens=prompt_tokens) == expected
    held = [await budgets.reserve(capped, prompt_tokens=prompt_tokens) for _ in range(2)]
    assert await ledger.reserved_usd("acme", "day") == pytest.approx(2 * expected, abs=1e-12)
    with pytest.raises(QuotaExceeded, match=r"reserved \$0\.004\d+ for calls in flight") as refused:
        await budgets.reserve(capped, prompt_tokens=prompt_tokens)
    assert refused.value.subject == "tenant:acme"
    await check(budgets, request_of("acme"))  # no max_tokens: only its prompt is reserved
    for reservation in held:
        assert reservation is not None
        await budgets.release(reservation)
    assert await ledger.reserved_usd("acme", "day") == 0.0


class _RepliesHeld(MemoryLedger):
    """A memory ledger whose budget checks answer only while `replies` is set, as Redis's
    answer reaches the replica some time after its script ran."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.replies = asyncio.Event()
        self.replies.set()
        self.checked = asyncio.Event()

    async def reserve(self, *args, **kwargs):
        reservation = await super().reserve(*args, **kwargs)
        self.checked.set()
        await self.replies.wait()
        return reservation


async def test_a_call_held_by_calls_in_flight_waits_for_a_release_of_its_tenants():
    """A call refused for what its tenant's calls in flight hold (`released`) waits until
    one of them is released, not for another tenant's release; and not at all when one
    was released while the refusal was on its way back, after the check counted it."""
    clock = WallClock(NOON)
    ledger = _RepliesHeld(wall_clock=clock)
    budgets = Budgets(
        {"*": BudgetConfig(usd=0.005, period="day")}, ledger=ledger, prices=PRICES, wall_clock=clock
    )
    acme, zeta = (
        dataclasses.replace(request_of(tenant), params=GenerationParams(max_tokens=1000))
        for tenant in ("acme", "zeta")
    )
    tokens = estimate_prompt_tokens(acme.messages)
    held = [await budgets.reserve(acme, prompt_tokens=tokens) for _ in range(2)]
    other = await budgets.reserve(zeta, prompt_tokens=tokens)
    assert None not in (*held, other)
    with pytest.raises(HeldByCallsInFlight) as refused:
        await budgets.reserve(acme, prompt_tokens=tokens)
    waiting = asyncio.ensure_future(budgets.released("acme", since=refused.value.releases_seen))
    await budgets.release(other)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    await budgets.release(held.pop())
    await asyncio.wait_for(waiting, 10)

    held.append(await budgets.reserve(acme, prompt_tokens=tokens))
    ledger.replies.clear()
    ledger.checked.clear()
    checking = asyncio.ensure_future(budgets.reserve(acme, prompt_tokens=tokens))
    await ledger.checked.wait()  # refused: both held as it checked
    await budgets.release(held.pop())
    ledger.replies.set()
    with pytest.raises(HeldByCallsInFlight) as refused:
        await checking
    # No release comes from now on: a wait for one would never end.
    await asyncio.wait_for(budgets.released("acme", since=refused.value.releases_seen), 10)


async def test_a_budget_may_reserve_output_for_calls_without_max_tokens():
    """`reserve_output_tokens` is reserved as output for a call that sets no max_tokens, so
    such calls in flight count against the budget; a call's own max_tokens still wins."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(wall_clock=clock)
    budgets = Budgets(
        {"acme": BudgetConfig(usd=0.005, period="day", reserve_output_tokens=1000)},
        ledger=ledger,
        prices=PRICES,
        wall_clock=clock,
    )
    open_ended = request_of("acme")
    prompt_tokens = estimate_prompt_tokens(open_ended.messages)
    expected = (prompt_tokens * 1.0 + 1000 * 2.0) / 1e6
    held = [await budgets.reserve(open_ended, prompt_tokens=prompt_tokens) for _ in range(2)]
    assert await ledger.reserved_usd("acme", "day") == pytest.approx(2 * expected, abs=1e-12)
    with pytest.raises(QuotaExceeded, match="daily budget"):
        await budgets.reserve(open_ended, prompt_tokens=prompt_tokens)
    small = dataclasses.replace(open_ended, params=GenerationParams(max_tokens=10))
    await check(budgets, small)  # its own max_tokens, not the budget's reserve
    for reservation in held:
        assert reservation is not None
        await budgets.release(reservation)
    with pytest.raises(ConfigError, match="reserve_output_tokens must be >= 0"):
        parse_config({"budgets": {"acme": {"usd": 1, "reserve_output_tokens": -1}}}, environ={})


async def test_memory_ledger_forgets_usage_past_retention():
    """Rows older than retention_days are dropped when a new bucket starts."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(LedgerConfig(retention_days=1), wall_clock=clock)
    await ledger.record(entry(cost=1.0))
    clock.now = NOON + 2 * 86400
    await ledger.record(entry(cost=2.0))
    assert total_of(await ledger.query(UsageFilter())).cost_usd == 2.0


async def test_memory_ledger_shows_no_usage_past_retention_when_no_call_came_since():
    """A query retention_days after the last call finds nothing, as Redis's expired keys
    do: the rows are past retention whether or not a call came since to drop them.

    Before, they were dropped only when a call started a new bucket, so an idle gateway
    showed usage of any age."""
    clock = WallClock(NOON)
    ledger = MemoryLedger(LedgerConfig(retention_days=1), wall_clock=clock)
    await ledger.record(entry(cost=1.0))
    clock.now = NOON + 2 * 86400
    assert await ledger.query(UsageFilter()) == []


@pytest.mark.redis
async def test_an_unreachable_redis_ledger_neither_fails_calls_nor_blocks_budgets():
    """Redis down: recording logs and returns, spend reads 0, a call that fits alone passes."""
    dead = LedgerConfig(redis_url="redis://127.0.0.1:1/0")
    ledger = RedisLedger(dead, wall_clock=WallClock(NOON))
    try:
        await ledger.record(entry())
        assert await ledger.spent_usd("acme", "day") == 0.0
        reservation = await ledger.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
        assert reservation.is_granted
        await ledger.release(reservation)
        assert not (await ledger.reserve("acme", "day", cost_usd=5.0, limit_usd=1.0)).is_granted
    finally:
        await ledger.aclose()


async def test_reservations_count_against_the_limit_until_released(make_ledger):
    """Spent + reserved + cost must fit the limit; a release frees its cost exactly once."""
    ledger = make_ledger(WallClock(NOON))
    await ledger.record(entry(cost=0.25))
    first = await ledger.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
    refused = await ledger.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
    exact = await ledger.reserve("acme", "day", cost_usd=0.25, limit_usd=1.0)
    assert (first.is_granted, refused.is_granted, exact.is_granted) == (True, False, True)
    assert (refused.spent_pico, refused.reserved_pico) == (PICO // 4, PICO // 2)
    assert await ledger.reserved_usd("acme", "day") == 0.75
    assert not (await ledger.reserve("acme", "day", cost_usd=0.0, limit_usd=1.0)).is_granted
    await ledger.release(first)
    await ledger.release(first)
    await ledger.release(refused)
    assert await ledger.reserved_usd("acme", "day") == 0.25
    assert (await ledger.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)).is_granted


async def test_concurrent_reservations_grant_only_what_fits(make_ledger):
    """Ten calls checked at once against room for three: exactly three are granted."""
    ledger = make_ledger(WallClock(NOON))
    tries = await asyncio.gather(
        *(ledger.reserve("acme", "month", cost_usd=0.1, limit_usd=0.35) for _ in range(10))
    )
    assert sum(r.is_granted for r in tries) == 3
    assert await ledger.reserved_usd("acme", "month") == 0.3


async def test_reservations_are_per_tenant_and_period(make_ledger):
    """One tenant's reservations never limit another; a new day starts with none held."""
    clock = WallClock(NOON)
    ledger = make_ledger(clock)
    yesterday = await ledger.reserve("acme", "day", cost_usd=1.0, limit_usd=1.0)
    assert (await ledger.reserve("zeta", "day", cost_usd=1.0, limit_usd=1.0)).is_granted
    assert await ledger.reserved_usd("acme", "month") == 0.0
    clock.now = NOON + 86400
    assert await ledger.reserved_usd("acme", "day") == 0.0
    today = await ledger.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
    await ledger.release(yesterday)  # released in its own day, not from today's
    assert today.is_granted
    assert await ledger.reserved_usd("acme", "day") == 0.5


@pytest.mark.redis
async def test_redis_reservations_are_shared_and_lapse_when_never_released(redis_url):  # noqa: F811
    """Replicas on one Redis see each other's reservations; one whose replica stopped
    without releasing it (it crashed, and renews it no more) lapses (after its TTL on
    Redis's clock: a second here)."""
    clock = WallClock(NOON)
    config = LedgerConfig(redis_url=redis_url, key_prefix=f"t{next(_prefixes)}")
    first, second = (
        RedisLedger(config, wall_clock=clock, reservation_ttl_s=1),
        RedisLedger(config, wall_clock=clock, reservation_ttl_s=1),
    )
    try:
        crashed = await first.reserve("acme", "day", cost_usd=0.75, limit_usd=1.0)
        await first.aclose()
        refused = await second.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
        assert crashed.is_granted
        assert not refused.is_granted
        assert refused.reserved_pico == to_pico(0.75)
        async with asyncio.timeout(10):
            while await second.reserved_usd("acme", "day"):
                await asyncio.sleep(0.05)
        later = await second.reserve("acme", "day", cost_usd=0.5, limit_usd=1.0)
        await second.release(crashed)  # lapsed already: must not free the later one's cost
        assert later.is_granted
        assert await second.reserved_usd("acme", "day") == 0.5
    finally:
        await second.aclose()


@pytest.mark.redis
async def test_a_reservation_redis_lost_is_put_back_while_its_call_runs(redis_url):  # noqa: F811
    """Redis lost a live call's reservation (restarted empty, or unreachable past its TTL):
    the next renewal puts it back, its cost with it, so the budget counts the call again
    until it is released."""
    config = LedgerConfig(redis_url=redis_url, key_prefix=f"t{next(_prefixes)}")
    ledger = RedisLedger(config, wall_clock=WallClock(NOON), reservation_ttl_s=1)
    client = aioredis.Redis.from_url(redis_url)
    try:
        held = await ledger.reserve("acme", "day", cost_usd=0.75, limit_usd=1.0)
        await client.delete(*await client.keys(f"{config.key_prefix}:*"))
        assert await ledger.reserved_usd("acme", "day") == 0
        async with asyncio.timeout(10):  # the next round, a third of the TTL from the last
            while await ledger.reserved_usd("acme", "day") != 0.75:
                await asyncio.sleep(0.05)
        await ledger.release(held)
        assert await ledger.reserved_usd("acme", "day") == 0
    finally:
        await ledger.aclose()
        await client.aclose()


@pytest.mark.redis
async def test_a_renewal_redis_runs_after_its_reservation_was_released_does_not_put_it_back(
    redis_url,  # noqa: F811
):
    """A renewal puts back a reservation that lapsed; one that Redis runs only after the
    call released it (it timed out, or sat in a stalled server's input) must not, or the
    budget would count the call for a TTL after it ended: a reservation a renewal was sent
    for is marked released as it is released."""
    config = LedgerConfig(redis_url=redis_url, key_prefix=f"t{next(_prefixes)}")
    ledger = RedisLedger(config, wall_clock=WallClock(NOON), reservation_ttl_s=1)
    try:
        held = await ledger.reserve("acme", "day", cost_usd=0.75, limit_usd=1.0)
        await asyncio.sleep(0.5)  # past a renewal round (every third of the TTL)
        await ledger.release(held)
        await ledger._renew_reservations([held])  # that round's renewal, run only now
        assert await ledger.reserved_usd("acme", "day") == 0
    finally:
        await ledger.aclose()


@pytest.mark.redis
async def test_a_hold_cancelled_as_it_closes_still_releases_every_reservation(
    redis_url,  # noqa: F811
):
    """A caller cancelled while its hold released what it kept (a batch's items, a
    Summarize's parts) left the rest unreleased: renewed while the replica runs, they
    would hold the tenant's budget for good. The releases run to their end."""
    config = LedgerConfig(redis_url=redis_url, key_prefix=f"t{next(_prefixes)}")
    ledger = RedisLedger(config, wall_clock=WallClock(NOON), reservation_ttl_s=1)
    budgets = Budgets(
        {"acme": BudgetConfig(usd=1.0, period="day")},
        ledger=ledger,
        prices=PRICES,
        wall_clock=WallClock(NOON),
    )
    try:
        hold = budgets.holding()
        for _ in range(3):
            async with hold.reserving(request_of("acme"), prompt_tokens=1000):
                pass
        assert await ledger.reserved_usd("acme", "day") > 0
        closing = asyncio.create_task(hold.close())
        await asyncio.sleep(0)  # into the first release's round trip
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        async with asyncio.timeout(10):  # past the TTL, renewed or not
            while await ledger.reserved_usd("acme", "day"):
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a lease still held would be renewed, and counted, by now
        assert await ledger.reserved_usd("acme", "day") == 0
    finally:
        await ledger.aclose()


def test_record_numbers_track_the_lowest_unconfirmed_whatever_the_order() -> None:
    """Redis forgets the numbers below the lowest unconfirmed one, so that number must
    not move past a record still in flight, however the others are confirmed."""
    numbers = _RecordNumbers("applied")
    first, second, third = numbers.take(), numbers.take(), numbers.take()
    assert numbers.lowest_unconfirmed() == first
    numbers.confirm(second)
    assert numbers.lowest_unconfirmed() == first
    numbers.confirm(first)
    assert numbers.lowest_unconfirmed() == third
    numbers.confirm(third)
    assert numbers.lowest_unconfirmed() == numbers.take() == third + 1
