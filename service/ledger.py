"""The usage ledger: requests, tokens and cost by tenant, model, upstream and labels.

Usage is summed into time buckets (`ledger.bucket_s`, an hour by default), so a
`GetUsage` time window is as fine as one bucket. Cost is kept as integer pico-dollars
(the precision `pricing.cost_usd` rounds to), so sums are exact whatever the order of
additions, in Redis past a 64-bit integer too (`_WIDE_LUA`). Spend per tenant per UTC
day and month is kept apart for budget checks, which then cost one lookup, together
with what calls still in flight have reserved
(`reserve`/`release`): a budget check and its reservation are one atomic step, in the
process for `MemoryLedger` and in Redis, for every replica, for `RedisLedger`.

`MemoryLedger` lives in the process; `RedisLedger` is shared by every replica:

    {prefix}:row:{bucket}:{row_id}   hash: requests, input_tokens, ..., cache_hits,
                                     cost_pico and cost_usd_millions, saved_pico and
                                     saved_usd_millions (HINCRBY), and
                                     `dims`: JSON of tenant, model, upstream, labels
    {prefix}:rows:{bucket}:{tenant}  set of the tenant's row ids seen in that bucket
    {prefix}:tenants:{bucket}        set of the tenants seen in that bucket
    {prefix}:buckets                 sorted set of bucket starts (score = start)
    {prefix}:spend:{tenant}:{period} integer pico-dollars (INCRBY) below $1M, and
    {prefix}:spend_usd_millions:{tenant}:{period}  its whole millions of USD (`_WIDE_LUA`)
    {prefix}:reserved:{tenant}:{period}  pico-dollars held by calls in flight, and
    {prefix}:reserved_usd_millions:{tenant}:{period}  their whole millions
    {prefix}:leases:{tenant}:{period}    sorted set "{id}:{pico}" -> when it lapses
    {prefix}:released:{id}           a released lease a renewal sent before must not put back
    {prefix}:applied:{replica}       sorted set: a replica's record numbers (`_RecordNumbers`)

A tenant name is the last part of its keys but for budget keys, whose period is a fixed
form (`day:YYYY-MM-DD`, `month:YYYY-MM`), so a name holding `:` cannot pass for another.
A query for one tenant reads only that tenant's row ids and rows; one for every tenant
reads each bucket's tenants first.

Every key expires: usage and spend `retention_days` after their last write (a period's
spend no sooner than its period ends, for its budget), record
numbers after `2 * RECORD_RETRY_S`; the reservation keys expire `RESERVATION_TTL_S`
after the tenant's last reservation or renewal, and each lease lapses that long after it
was taken or last renewed (`LeaseRenewals`, while its call runs), so a replica that
crashed mid-call holds a budget for a minute at most.

Releases before this layout kept every bucket's row ids in one `{prefix}:bucket:{bucket}`
set and the dimensions in one `{prefix}:dims` hash that never expired. Queries still read
those rows until they expire, and the first record of this release gives `{prefix}:dims`
the retention (and a day, for the old replicas of a rolling upgrade) as its TTL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import heapq
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from service.config import LedgerConfig, redis_password
from service.domain import Usage
from service.errors import UpstreamUnavailable
from service.late_release import LateReleases
from service.lean_redis import LeanRedis
from service.lease_renewals import LEASE_TTL_S, LeaseRenewals
from service.memo import BoundedMemo
from service.redis_errors import refused_for_good, replacing_closed_connections
from service.store_cooldown import COOLDOWN_S, StoreCooldown
from service.validation import OVERFLOW_LABELS

log = logging.getLogger("llm_gateway.ledger")
T = TypeVar("T")

PICO = 10**12
# The unit of a sum's high counter (`_WIDE_LUA`): $1,000,000 in pico-dollars.
MILLION_USD_PICO = 10**18
# A reservation stops counting this long after it was last renewed (every third of it,
# while its call runs): a replica that crashed mid-call holds its tenants' budgets no longer.
RESERVATION_TTL_S = LEASE_TTL_S
# A usage row Redis did not take is retried for this long, then given up (and logged).
RECORD_RETRY_S = 3600
# The old layout's dims hash outlives retention by this much after the first record of
# this release: old replicas of a rolling upgrade still add rows (and dims) meanwhile.
_OLD_DIMS_GRACE_S = 86400
# Row names remembered (a pair for each tenant, model, upstream and label set in use).
_ROW_NAMES = 1024
# A row's counts, then its pico-dollar amounts, each with its whole millions of USD
# beside it once the amount reaches them (`_WIDE_LUA`), in the order the record script
# takes them.
_COUNTS = (
    "requests",
    "estimated_requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cache_hits",
)
_AMOUNTS = {"cost_pico": "cost_usd_millions", "saved_pico": "saved_usd_millions"}
_FIELDS = (*_COUNTS, *_AMOUNTS)

WallClock = Callable[[], float]
# A tenant's budget keys for one period, in the order `_SWEEP_LUA` takes them.
_BUDGET_KINDS = ("spend", "spend_usd_millions", "reserved", "reserved_usd_millions", "leases")
# The budget periods whose spend each recorded call adds to.
_PERIODS = ("day", "month")


def to_pico(usd: float) -> int:
    """USD as integer pico-dollars."""
    return round(usd * PICO)


def period_key(period: str, at_s: float) -> str:
    """The UTC calendar period (`day` or `month`) that `at_s` falls in, e.g. `day:2026-11-28`."""
    return _period_key_of_minute(period, int(at_s // 60))


@functools.lru_cache(maxsize=64)
def _period_key_of_minute(period: str, minute: int) -> str:
    # Formatting dates on every call shows in profiles; a minute never spans two days.
    when = dt.datetime.fromtimestamp(minute * 60, dt.UTC)
    return f"day:{when:%Y-%m-%d}" if period == "day" else f"month:{when:%Y-%m}"


@functools.lru_cache(maxsize=64)
def _spend_periods_of_minute(minute: int) -> tuple[str, ...]:
    """`period_key` of each of `_PERIODS` for the minute: every recorded call adds its
    spend to each, and a remembered answer costs no Python call."""
    return tuple(_period_key_of_minute(period, minute) for period in _PERIODS)


def period_end_s(period: str, at_s: float) -> float:
    """When the UTC period containing `at_s` ends (epoch seconds)."""
    when = dt.datetime.fromtimestamp(at_s, dt.UTC)
    start = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return (start + dt.timedelta(days=1)).timestamp()
    first = start.replace(day=1)
    following = (first.replace(year=first.year + 1, month=1) if first.month == 12
                 else first.replace(month=first.month + 1))  # fmt: skip
    return following.timestamp()


def period_key_end_s(key: str) -> float:
    """When the period named `key` (`day:2026-11-28`, `month:2026-11`) ends (epoch seconds)."""
    period, _, date = key.partition(":")
    start = dt.datetime.strptime(date, "%Y-%m-%d" if period == "day" else "%Y-%m")
    return period_end_s(period, start.replace(tzinfo=dt.UTC).timestamp())


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One finished call as the ledger records it, or one attempt the gateway abandoned.

    An abandoned attempt the upstream most likely billed (`is_request=False`) adds its
    tokens and cost, and counts among `estimated_requests` (its figures are estimates),
    but not among `requests`: those stay the number of calls.
    """

    tenant: str
    model: str
    upstream: str
    labels: Mapping[str, str]
    usage: Usage
    cost_usd: float
    is_request: bool = True
    # When the call's budget admitted it (`Reservation.at_s`): its cost is spent in that
    # moment's UTC day and month, which its reservation held it against, even when it
    # ends in the next. None (no reservation): when it is recorded.
    admitted_s: float | None = None
    # A call answered from the cache (`cost_usd` 0), and what it would have cost.
    is_cache_hit: bool = False
    saved_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which rows to return; None or empty matches everything. Times are epoch seconds."""

    tenant: str | None = None
    model: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    start_s: float | None = None
    end_s: float | None = None


@dataclass(slots=True)
class UsageRow:
    """Summed usage of one tenant, model, upstream and label set."""

    tenant: str
    model: str
    upstream: str
    labels: Mapping[str, str]
    requests: int = 0
    # Calls whose usage the gateway estimated (the upstream reported none, or the stream
    # was cut before it could), and lost attempts: their tokens and cost are estimates.
    estimated_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    # Of `output_tokens`, those a reasoning model spent thinking (rows written before
    # they were kept apart count none).
    reasoning_tokens: int = 0
    # Of `requests`, those answered from the cache (at no cost), and what they saved:
    # each one's `saved_cost_usd` (rows written before count none).
    cache_hits: int = 0
    cost_pico: int = 0
    saved_pico: int = 0

    @property
    def cost_usd(self) -> float:
        """The summed cost in USD."""
        return self.cost_pico / PICO

    @property
    def saved_cost_usd(self) -> float:
        """What the row's cache hits saved, in USD."""
        return self.saved_pico / PICO

    def add(self, other: Mapping[str, int]) -> None:
        """Add counters (every one of `_FIELDS`, by name) to this row."""
        # Indexed, not `.get`: this runs on every call a memory ledger records.
        self.requests += other["requests"]
        self.estimated_requests += other["estimated_requests"]
        self.input_tokens += other["input_tokens"]
        self.output_tokens += other["output_tokens"]
        self.cached_input_tokens += other["cached_input_tokens"]
        self.reasoning_tokens += other["reasoning_tokens"]
        self.cache_hits += other["cache_hits"]
        self.cost_pico += other["cost_pico"]
        self.saved_pico += other["saved_pico"]

    def add_entry(self, entry: UsageEntry) -> int:
        """Add one recorded call's counters to this row (the Redis ledger's
        `_entry_counters` reads them from here); its cost in pico-dollars (0: a cache hit
        or a free model)."""
        # Field by field, `to_pico` written out: a memory ledger runs this for every call,
        # where a dict of counters and `add` cost three frames.
        usage = entry.usage
        cost_pico = round(entry.cost_usd * PICO) if entry.cost_usd else 0
        self.requests += entry.is_request
        self.estimated_requests += usage.is_estimated
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cached_input_tokens += usage.cached_input_tokens
        self.reasoning_tokens += usage.reasoning_tokens
        self.cost_pico += cost_pico
        if entry.is_cache_hit:
            self.cache_hits += 1
            self.saved_pico += round(entry.saved_cost_usd * PICO)
        return cost_pico

    def counters(self) -> dict[str, int]:
        """The counters by field name."""
        return {name: getattr(self, name) for name in _FIELDS}

    def dims(self) -> Dims:
        """The row's dimensions: the key rows are sorted by (`Ledger.query`)."""
        return _dims(self.tenant, self.model, self.upstream, self.labels)


def _entry_counters(entry: UsageEntry) -> dict[str, int]:
    """What one recorded call adds to its row, by field name (the Redis ledger's script
    takes them so): `UsageRow.add_entry`'s, the one place that says it."""
    row = UsageRow(entry.tenant, entry.model, entry.upstream, entry.labels)
    row.add_entry(entry)
    return row.counters()


Dims = tuple[str, str, str, tuple[tuple[str, str], ...]]


def _dims(tenant: str, model: str, upstream: str, labels: Mapping[str, str]) -> Dims:
    # Most calls carry no labels: no `items()` and `sorted` for them (every call recorded).
    return tenant, model, upstream, tuple(sorted(labels.items())) if labels else ()


def _parse_dims(raw: str) -> Dims:
    """The dimensions a row's `dims` JSON names; ValueError if it names none."""
    try:
        tenant, model, upstream, labels = json.loads(raw)
        pairs = dict(labels)
    except (TypeError, ValueError) as exc:
        raise ValueError("not [tenant, model, upstream, labels]") from exc
    if not all(isinstance(v, str) for v in (tenant, model, upstream, *pairs, *pairs.values())):
        raise ValueError("not [tenant, model, upstream, labels] of strings")
    return _dims(tenant, model, upstream, pairs)


def _read_row(
    reply: Mapping[str, str] | Exception, old_dims: Dims | None
) -> tuple[Dims, dict[str, int]] | str | None:
    """A usage row's dimensions and counters from its HGETALL `reply` (`old_dims`: what
    the old layout keeps for it); None when it expired; what is wrong with it when it is
    corrupt (written by hand or a bad migration), to be skipped rather than fail every
    query that reaches it."""
    if isinstance(reply, Exception):
        return "not a hash"
    counters = dict(reply)
    raw_dims = counters.pop("dims", None)
    if not counters:
        return None
    if old_dims is not None:
        dims = old_dims
    elif raw_dims is None:
        return "no dims"
    else:
        try:
            dims = _parse_dims(raw_dims)
        except ValueError:
            return "dims are not [tenant, model, upstream, labels]"
    try:
        # A row from before a counter was kept counts none of it.
        values = {name: int(counters.get(name, 0)) for name in _FIELDS}
        for amount, millions in _AMOUNTS.items():
            values[amount] += int(counters.get(millions, 0)) * MILLION_USD_PICO
        return dims, values
    except ValueError:
        return "a counter is not an integer"


def _row_corrupt(key: str, problem: str) -> None:
    log.warning("ledger.row_corrupt", extra={"key": key, "problem": problem})


def _matches(dims: Dims, query: UsageFilter) -> bool:
    tenant, model, _, labels = dims
    if query.tenant and tenant != query.tenant:
        return False
    if query.model and model != query.model:
        return False
    have = dict(labels)
    return all(have.get(k) == v for k, v in query.labels.items())


def total_of(rows: list[UsageRow]) -> UsageRow:
    """The sum of `rows` as one row with empty dimensions."""
    total = UsageRow(tenant="", model="", upstream="", labels={})
    for row in rows:
        total.add(row.counters())
    return total


@dataclass(frozen=True, slots=True)
class Reservation:
    """A call's expected cost held against its tenant's period spend, or the refusal to.

    `spent_pico` and `reserved_pico` are what the check saw: the period's recorded spend
    and what other calls in flight held, this one not included. `was_sent` is False for
    one granted without asking Redis (in a cool-down): nothing is held, or to release.
    """

    tenant: str
    period_key: str  # the period it was taken in: released there even once it is over
    at_s: float  # when it was taken (the ledger's clock): its call is spent in that period
    cost_pico: int
    is_granted: bool
    spent_pico: int = 0
    reserved_pico: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    was_sent: bool = True

    def fits_without_calls_in_flight(self, limit_usd: float) -> bool:
        """Whether this refused call would fit but for what calls in flight hold: then it
        was refused for now, until they end, not until the period resets."""
        return _fits(
            spent=self.spent_pico, reserved=0, cost=self.cost_pico, limit=to_pico(limit_usd)
        )

    def fits_an_unspent_period(self, limit_usd: float) -> bool:
        """Whether this refused call would fit a period with nothing spent or held: if
        not, it can never pass, whatever it waits for."""
        return _fits(spent=0, reserved=0, cost=self.cost_pico, limit=to_pico(limit_usd))


def _fits(*, spent: int, reserved: int, cost: int, limit: int) -> bool:
    committed = spent + reserved
    return committed < limit and committed + cost <= limit


class Ledger(Protocol):
    """Where finished calls are summed."""

    async def record(self, entry: UsageEntry) -> None:
        """Add one finished call."""
        ...

    async def query(self, query: UsageFilter) -> list[UsageRow]:
        """Rows matching `query`, summed over its time window, sorted by dimensions."""
        ...

    async def spent_usd(self, tenant: str, period: str) -> float:
        """What `tenant` has spent in the current UTC `period` (day or month)."""
        ...

    async def reserve(
        self, tenant: str, period: str, *, cost_usd: float, limit_usd: float
    ) -> Reservation:
        """Hold `cost_usd` for a call about to be made if spent + reserved + it fit the limit.

        Refused (nothing held) when what `tenant` has spent in the current `period` plus
        what its calls in flight hold reaches `limit_usd`, or would pass it with this cost.
        """
        ...

    async def reserved_usd(self, tenant: str, period: str) -> float:
        """What `tenant`'s calls in flight hold in the current `period`."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Stop holding `reservation` (once; again, or a refused one, changes nothing)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class _Buckets:
    """Bucket arithmetic shared by both ledgers."""

    def __init__(self, config: LedgerConfig, wall_clock: WallClock) -> None:
        self.config = config
        self.now = wall_clock

    def start(self, at_s: float) -> int:
        return int(at_s // self.config.bucket_s) * self.config.bucket_s

    def window(self, query: UsageFilter) -> tuple[float, float]:
        low = float("-inf") if query.start_s is None else self.start(query.start_s)
        high = float("inf") if query.end_s is None else query.end_s
        return low, high


class _CappedTenants:
    """Says once per tenant and bucket that the tenant reached `max_rows_per_tenant`."""

    def __init__(self, max_rows: int) -> None:
        self._max_rows = max_rows
        self._bucket: int | None = None
        self._tenants: set[str] = set()

    def add(self, tenant: str, bucket: int) -> None:
        if self._bucket is not None and bucket < self._bucket:
            return  # a row retried late into an older bucket: said then, if at all
        if bucket != self._bucket:
            self._bucket, self._tenants = bucket, set()
        if tenant not in self._tenants:
            self._tenants.add(tenant)
            log.warning(
                "ledger.rows_capped",
                extra={"tenant": tenant, "bucket": bucket, "max_rows_per_tenant": self._max_rows},
            )


class MemoryLedger:
    """The ledger of one process."""

    def __init__(self, config: LedgerConfig | None = None, *, wall_clock: WallClock = time.time):
        self._buckets = _Buckets(config or LedgerConfig(), wall_clock)
        self._rows: dict[tuple[int, Dims], UsageRow] = {}
        # When each row's last call was recorded: it is kept `retention_days` from then,
        # as Redis keeps a row's key (its TTL set anew by each call).
        self._last_call_s: dict[tuple[int, Dims], float] = {}
        self._spend: dict[tuple[str, str], int] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        self._held: dict[str, Reservation] = {}
        self._retention_s = self._buckets.config.retention_days * 86400
        self._bucket_s = self._buckets.config.bucket_s
        self._current_bucket: int | None = None
        self._max_rows = self._buckets.config.max_rows_per_tenant
        self._rows_started: dict[tuple[int, str], int] = {}  # by bucket and tenant
        self._capped = _CappedTenants(self._max_rows)

    def _prune(self, now: float) -> None:
        """Drop rows past retention and spend of finished periods (once per new bucket)."""
        oldest = now - self._retention_s
        self._last_call_s = {k: at for k, at in self._last_call_s.items() if at > oldest}
        self._rows = {k: r for k, r in self._rows.items() if k in self._last_call_s}
        # A bucket's count of rows started lasts as long as any row of it may.
        ended = oldest - self._buckets.config.bucket_s
        self._rows_started = {k: n for k, n in self._rows_started.items() if k[0] > ended}
        current = {period_key("day", now), period_key("month", now)}
        self._spend = {k: v for k, v in self._spend.items() if k[1] in current}

    async def record(self, entry: UsageEntry) -> None:
        """Add one finished call."""
        now = self._buckets.now()
        admitted = now if entry.admitted_s is None else entry.admitted_s
        bucket = int(now // self._bucket_s) * self._bucket_s  # `_Buckets.start` written out
        if bucket != self._current_bucket:
            self._current_bucket = bucket
            self._prune(now)
        labels = entry.labels
        # `_dims` written out (a frame on every call); `_row_key` only for a row not made yet.
        dims = (
            entry.tenant, entry.model, entry.upstream,
            tuple(sorted(labels.items())) if labels else (),
        )  # fmt: skip
        key = (bucket, dims)
        if key not in self._rows:
            key = self._row_key(bucket, entry)
        cost_pico = self._rows[key].add_entry(entry)
        self._last_call_s[key] = now
        if not cost_pico:
            return  # a cache hit or a free model: no spend to add
        for spent_in in _spend_periods_of_minute(int(admitted // 60)):
            spend_key = (entry.tenant, spent_in)
            self._spend[spend_key] = self._spend.get(spend_key, 0) + cost_pico

    def _row_key(self, bucket: int, entry: UsageEntry) -> tuple[int, Dims]:
        """The key of the row `entry` adds to (made if new): its own, or past the tenant's
        cap the overflow row."""
        dims = _dims(entry.tenant, entry.model, entry.upstream, entry.labels)
        if (bucket, dims) in self._rows:
            return bucket, dims
        started = (bucket, entry.tenant)
        if self._rows_started.get(started, 0) >= self._max_rows:
            self._capped.add(entry.tenant, bucket)
            dims = _dims(entry.tenant, entry.model, entry.upstream, OVERFLOW_LABELS)
            if (bucket, dims) in self._rows:
                return bucket, dims
        else:
            self._rows_started[started] = self._rows_started.get(started, 0) + 1
        self._rows[bucket, dims] = UsageRow(
            tenant=entry.tenant, model=entry.model, upstream=entry.upstream,
            labels=dict(dims[3]),
        )  # fmt: skip
        return bucket, dims

    async def query(self, query: UsageFilter) -> list[UsageRow]:
        """Rows matching `query`, summed over its time window."""
        low, high = self._buckets.window(query)
        # Rows past retention are dropped only when a call starts a new bucket: an idle
        # gateway still holds them, but must not show them (Redis has expired its own).
        oldest = self._buckets.now() - self._retention_s
        merged: dict[Dims, UsageRow] = {}
        for key, row in self._rows.items():
            bucket, dims = key
            if not (low <= bucket < high) or self._last_call_s[key] <= oldest:
                continue
            if not _matches(dims, query):
                continue
            target = merged.get(dims)
            if target is None:
                target = merged[dims] = UsageRow(
                    tenant=row.tenant, model=row.model, upstream=row.upstream,
                    labels=dict(row.labels),
                )  # fmt: skip
            target.add(row.counters())
        return [merged[d] for d in sorted(merged)]

    async def spent_usd(self, tenant: str, period: str) -> float:
        """What `tenant` has spent in the current UTC `period`."""
        return self._spend.get((tenant, period_key(period, self._buckets.now())), 0) / PICO

    async def reserve(
        self, tenant: str, period: str, *, cost_usd: float, limit_usd: float
    ) -> Reservation:
        """Hold `cost_usd` if it fits; no await, so atomic within the process."""
        now = self._buckets.now()
        key = (tenant, period_key(period, now))
        spent, reserved = self._spend.get(key, 0), self._reserved.get(key, 0)
        cost = to_pico(cost_usd)
        is_granted = _fits(spent=spent, reserved=reserved, cost=cost, limit=to_pico(limit_usd))
        reservation = Reservation(
            tenant=tenant, period_key=key[1], at_s=now, cost_pico=cost, is_granted=is_granted,
            spent_pico=spent, reserved_pico=reserved,
        )  # fmt: skip
        if is_granted:
            self._held[reservation.id] = reservation
            self._reserved[key] = reserved + cost
        return reservation

    async def reserved_usd(self, tenant: str, period: str) -> float:
        """What `tenant`'s calls in flight hold in the current `period`."""
        return self._reserved.get((tenant, period_key(period, self._buckets.now())), 0) / PICO

    async def release(self, reservation: Reservation) -> None:
        """Stop holding `reservation` (idempotent)."""
        if self._held.pop(reservation.id, None) is None:
            return
        key = (reservation.tenant, reservation.period_key)
        # A $0 reservation (free input, no output reserved) holds no total: the others'
        # releases may have dropped it already.
        left = self._reserved.get(key, 0) - reservation.cost_pico
        if left:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)

    async def aclose(self) -> None:
        """Nothing to release."""


# Pico-dollar sums past 2^63 (about $9.2 million: one row in a bucket, one tenant's spend
# in a period, what its calls in flight hold) are kept in two integer counters: the low
# one in pico-dollars, below 10^18 once carried, and the high one in whole 10^18s ($1
# million each), created only once a sum reaches it. Below $1 million the low counter is
# all there is, as the releases before wrote it. Lua numbers are doubles, so amounts
# travel as decimal strings, split by their digits, and are compared as whole dollars
# and pico-dollars below 10^12, exact up to 2^53 dollars (past any budget).
_WIDE_LUA = """
local E18 = '000000000000000000'
-- `amount` (decimal digits, any length) as Redis integers: its whole 10^18s and the rest.
local function split(amount)
  if #amount <= 18 then return '0', amount end
  local low = string.gsub(string.sub(amount, -18), '^0+(%d)', '%1')
  return string.sub(amount, 1, -19), low
end
local function strings(low, high)
  return {low = low, high = high,
          read = function(key) return redis.call('GET', key) end,
          incr = function(key, by) return redis.call('INCRBY', key, by) end}
end
local function fields(hash, low, high)
  return {low = low, high = high,
          read = function(field) return redis.call('HGET', hash, field) end,
          incr = function(field, by) return redis.call('HINCRBY', hash, field, by) end}
end
-- Keeps the low counter in [0, 10^18) while the high one can give: an older release's
-- may hold up to 2^63 - 1, and a subtraction may take it below 0.
local function carry(c)
  local low = c.read(c.low)
  if not low then return end
  if #low == 19 and string.sub(low, 1, 1) ~= '-' then
    local millions = string.sub(low, 1, 1)
    c.incr(c.low, '-' .. millions .. E18)
    c.incr(c.high, millions)
  elseif string.sub(low, 1, 1) == '-' and tonumber(c.read(c.high) or '0') > 0 then
    c.incr(c.low, '1' .. E18)
    c.incr(c.high, -1)
  end
end
-- Adds (`sign` '') or subtracts (`sign` '-') `amount` pico-dollars.
local function add(c, amount, sign)
  carry(c)
  local high, low = split(amount)
  if low ~= '0' then c.incr(c.low, sign .. low) end
  if high ~= '0' then c.incr(c.high, sign .. high) end
  carry(c)
end
-- An amount (low and high counters' values, or digits and '0') as exact doubles: whole
-- dollars, and pico-dollars of the same sign below 10^12.
local function dollars(low, high)
  local sign = 1
  if string.sub(low, 1, 1) == '-' then sign, low = -1, string.sub(low, 2) end
  local whole = #low > 12 and tonumber(string.sub(low, 1, -13)) or 0
  return sign * whole + tonumber(high) * 1000000, sign * tonumber(string.sub(low, -12))
end
-- Whether `d` dollars and `p` pico-dollars (|p| < 5 * 10^12) are more than nothing.
local function positive(d, p)
  if d >= 5 or d <= -5 then return d > 0 end
  return d * 1000000000000 + p > 0
end
"""
# KEYS: spend, spend's millions, reserved, reserved's millions, leases of one tenant and
# period. Forgets leases that lapsed (their replica never released them), then reads
# both totals. Leases expire on Redis's clock, as tenant leases do: on each replica's
# own, one whose clock ran a TTL ahead would sweep every other replica's calls in
# flight at once.
_SWEEP_LUA = (
    _WIDE_LUA
    + """
-- Never shortened: a replica of an older release (a rolling upgrade) may hold longer leases.
local function keep_for(key, ttl)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserved = strings(KEYS[3], KEYS[4])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
if #lapsed > 0 then
  for _, lease in ipairs(lapsed) do add(reserved, string.match(lease, ':(%d+)$'), '-') end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
end
local spent = {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0'}
local held = {redis.call('GET', KEYS[3]) or '0', redis.call('GET', KEYS[4]) or '0'}
"""
)
# ARGV: cost, limit (pico-dollar digits), lease ("{id}:{cost}"), ttl (s). Returns
# {granted 0|1, spent, spent's millions, reserved, reserved's millions}.
_RESERVE = """
local sd, sp = dollars(spent[1], spent[2])
local rd, rp = dollars(held[1], held[2])
local cd, cp = dollars(ARGV[1], '0')
local ld, lp = dollars(ARGV[2], '0')
local answer = {0, spent[1], spent[2], held[1], held[2]}
-- Refused when spent + reserved >= limit, or spent + reserved + cost > limit.
if not positive(ld - sd - rd, lp - sp - rp) or positive(sd + rd + cd - ld, sp + rp + cp - lp)
then return answer end
add(reserved, ARGV[1], '')
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), ARGV[3])
for k = 3, 5 do keep_for(KEYS[k], tonumber(ARGV[4])) end
answer[1] = 1
return answer
"""
_RESERVE_LUA = _SWEEP_LUA + _RESERVE
# One finished call, applied at most once however often it is sent: each replica numbers
# its records, and Redis keeps the numbers it applied (KEYS[7]) from the lowest one the
# replica has not yet seen confirmed (ARGV[7]) up; anything lower is never sent again.
# The number is written first: Redis does not undo a script's writes when a later
# command in it fails (a key of the wrong type), and a record sent again must not add
# the writes before that failure a second time. (A "not now" refusal, READONLY or OOM,
# stops a script at its first write, before anything is applied.) The spend comes next,
# so that a bucket's index of rows written as another type (by hand or a bad migration)
# loses the call's row, not its budget's spend.
# KEYS: row, the tenant's row ids in the bucket, the bucket's tenants, buckets, day spend,
# month spend, applied numbers, the old layout's dims hash, the overflow row, day and
# month spend's millions.
# ARGV: row id, dims JSON, row TTL, bucket, drop buckets before, record number, lowest
# unconfirmed number, applied numbers' TTL, tenant, old dims' TTL, overflow row id, its
# dims JSON, max rows per tenant, the counters in _FIELDS order (the cost and the saving
# in pico-dollar digits), then the day and month spend's TTLs.
# A row that is not a hash of integers (written by hand or a bad migration), or that has
# a count too near 2^63 to take one more call's, is left as it is, but the rest is
# applied: HINCRBY on it would stop the script before the spend.
# Returns 0 (applied before), 1 (applied) or 2 (applied to the overflow row); 3 or 4 for
# 1 or 2 with that row left alone.
_RECORD_LUA = (
    _WIDE_LUA
    + """
if redis.call('ZSCORE', KEYS[7], ARGV[6]) then return 0 end
redis.call('ZADD', KEYS[7], ARGV[6], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. ARGV[7])
redis.call('EXPIRE', KEYS[7], ARGV[8])
local counts = {COUNTS}
for k = 5, 6 do
  add(strings(KEYS[k], KEYS[k + 5]), ARGV[14 + #counts], '')
  redis.call('EXPIRE', KEYS[k], ARGV[11 + #counts + k])
  redis.call('EXPIRE', KEYS[k + 5], ARGV[11 + #counts + k])
end
local row, row_id, dims, applied = KEYS[1], ARGV[1], ARGV[2], 1
if redis.call('SISMEMBER', KEYS[2], row_id) == 0
    and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[13]) then
  row, row_id, dims, applied = KEYS[9], ARGV[11], ARGV[12], 2
end
-- As Redis reads an integer (no leading zero, no minus zero), at most `most`.
local function integer(value, most)
  if value == '0' then return true end
  local digits = string.match(value, '^%-?([1-9]%d*)$')
  return digits ~= nil and (#digits < #most or (#digits == #most and digits <= most))
end
local kind = redis.call('TYPE', row).ok
local sound = kind == 'none' or kind == 'hash'
if kind == 'hash' then
  -- A count takes at most 2^32 a call (the most tokens an upstream may report).
  for _, value in ipairs(redis.call('HMGET', row, unpack(counts))) do
    if value and not integer(value, '9223372032559808511') then sound = false end
  end
  for _, amount in ipairs(redis.call('HMGET', row, 'cost_pico', 'saved_pico')) do
    if amount and not integer(amount, '9223372036854775807') then sound = false end
  end
end
if sound then
  redis.call('HSETNX', row, 'dims', dims)
  for i, name in ipairs(counts) do redis.call('HINCRBY', row, name, ARGV[13 + i]) end
  add(fields(row, 'cost_pico', 'cost_usd_millions'), ARGV[14 + #counts], '')
  local saved = ARGV[15 + #counts]
  if saved ~= '0' then add(fields(row, 'saved_pico', 'saved_usd_millions'), saved, '') end
  redis.call('EXPIRE', row, ARGV[3])
else
  applied = applied + 2
end
redis.call('SADD', KEYS[2], row_id)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[9])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if redis.call('TTL', KEYS[8]) == -1 then redis.call('EXPIRE', KEYS[8], ARGV[10]) end
return applied
""".replace("COUNTS", ", ".join(f"'{name}'" for name in _COUNTS))
)
_APPLIED_TO_OVERFLOW = 2
_ROW_LEFT_ALONE = "not a hash of integers, or a count near 2^63: the call's usage left out"
_ROW_LEFT_CORRUPT = 2  # added to the above when the row was corrupt
_RESERVED_LUA = _SWEEP_LUA + "return held"
# KEYS: reserved, its millions, leases, and the lease's released marker if a renewal was
# sent for it. ARGV: lease, cost, ttl (s). A lease already released or lapsed is not
# subtracted twice; once no lease is left the total is dropped, so it cannot drift.
_RELEASE_LUA = (
    _WIDE_LUA
    + """
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then add(strings(KEYS[1], KEYS[2]), ARGV[2], '-') end
if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
if KEYS[4] then redis.call('SET', KEYS[4], 1, 'EX', ARGV[3]) end
return 0
"""
)
# Every reservation of a round. KEYS: for each, its reserved total and its millions,
# leases and released marker. ARGV: ttl (s), then each one's lease and cost. Moves each
# lease to lapse a whole ttl from now, putting it back (and its cost in the total) if it
# lapsed: its call still runs. Not once marked released, as this may run after that.
_RENEW_LUA = (
    _WIDE_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 0, #KEYS / 4 - 1 do
  local reserved, millions, leases = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3]
  if redis.call('EXISTS', KEYS[4 * i + 4]) == 0 then
    if redis.call('ZADD', leases, now + ttl, ARGV[2 * i + 2]) == 1 then
      add(strings(reserved, millions), ARGV[2 * i + 3], '')
    end
    for _, key in ipairs({reserved, millions, leases}) do
      if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
    end
  end
end
return 0
"""
)


def _wide_pico(low: str | None = None, high: str | None = None) -> int:
    """A sum of pico-dollars from its low counter and its high one (`_WIDE_LUA`)."""
    return int(low or 0) + int(high or 0) * MILLION_USD_PICO


class _RecordNumbers:
    """This replica's record numbers: the next one, and which are not yet confirmed.

    Redis keeps every number it applied from `lowest_unconfirmed()` up (under `key`), so
    a record sent again is recognised; numbers below it were confirmed and are never
    sent again, so Redis forgets them and the set stays as small as the records in flight.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._next = 1
        self._unconfirmed: list[int] = []  # a heap; confirmed numbers leave it lazily
        self._confirmed: set[int] = set()

    def take(self) -> int:
        number = self._next
        self._next += 1
        heapq.heappush(self._unconfirmed, number)
        return number

    def confirm(self, number: int) -> None:
        self._confirmed.add(number)
        while self._unconfirmed and self._unconfirmed[0] in self._confirmed:
            self._confirmed.discard(heapq.heappop(self._unconfirmed))

    def lowest_unconfirmed(self) -> int:
        return self._unconfirmed[0] if self._unconfirmed else self._next


class RedisLedger:
    """The ledger shared by every replica through Redis."""

    def __init__(
        self,
        config: LedgerConfig,
        *,
        wall_clock: WallClock = time.time,
        environ: Mapping[str, str] | None = None,
        reservation_ttl_s: int = RESERVATION_TTL_S,
    ) -> None:
        import redis.asyncio as aioredis

        if not config.redis_url:
            raise ValueError("RedisLedger needs ledger.redis_url")
        # A password in the URL, if any, is used as well: redis-py prefers the URL's.
        password = redis_password(
            config.redis_password_env, os.environ if environ is None else environ
        )
        self._buckets = _Buckets(config, wall_clock)
        self._prefix = config.key_prefix
        self._ttl_s = config.retention_days * 86400
        # Counted on Redis's clock, not `wall_clock`: a test lapses leases with a short one.
        self._reservation_ttl_s = reservation_ttl_s
        self._redis: Any = aioredis.Redis.from_url(
            config.redis_url,
            password=password,
            decode_responses=True,
            socket_timeout=config.operation_timeout_s,
            socket_connect_timeout=config.operation_timeout_s,
            **replacing_closed_connections(),
        )
        # The scripts every call runs, without redis-py's per-command cost.
        self._lean = LeanRedis.beside(self._redis)
        self._reserve_script = self._lean.register_script(_RESERVE_LUA)
        self._reserved_script = self._lean.register_script(_RESERVED_LUA)
        self._release_script = self._lean.register_script(_RELEASE_LUA)
        self._renew_script = self._lean.register_script(_RENEW_LUA)
        self._record_script = self._lean.register_script(_RECORD_LUA)
        # Redis left alone for a while after it fails to answer (`StoreCooldown`).
        self.cooldown = StoreCooldown("ledger")
        # Failed reservation releases and usage rows, retried in the order they failed.
        self.late_releases = LateReleases(
            "ledger",
            lease_ttl_s=reservation_ttl_s,
            refused_for_good=refused_for_good,
            cooldown=self.cooldown,
        )
        self._renewals: LeaseRenewals[Reservation] = LeaseRenewals(
            "ledger",
            ttl_s=reservation_ttl_s,
            renew=self._renew_reservations,
            cooldown=self.cooldown,
            on_answered=self.late_releases.store_answered,
        )
        self._old_dims_key = f"{self._prefix}:dims"
        self._max_rows = config.max_rows_per_tenant
        self._capped = _CappedTenants(self._max_rows)
        self._records = _RecordNumbers(f"{self._prefix}:applied:{uuid.uuid4().hex}")
        # Every call of one tenant, model, upstream and label set writes the same row.
        self._row_names: BoundedMemo[Dims, tuple[str, str]] = BoundedMemo(_ROW_NAMES)
        # Per tenant, the numbers of its usage rows waiting in `late_releases`.
        self._rows_waiting: dict[str, set[int]] = {}

    def _row_key(self, bucket: int | str, row_id: str) -> str:
        return f"{self._prefix}:row:{bucket}:{row_id}"

    def _oldest_bucket(self, now: float) -> float:
        """The start of the oldest bucket a row may still be kept in at `now`: one whose
        last call came at its end, `retention_days` ago. Older buckets leave the index of
        buckets; a newer one's rows go as their keys expire, each `retention_days` after
        its last call."""
        return now - self._ttl_s - self._buckets.config.bucket_s

    def _tenant_rows_key(self, bucket: int | str, tenant: str) -> str:
        return f"{self._prefix}:rows:{bucket}:{tenant}"

    def _tenants_key(self, bucket: int | str) -> str:
        return f"{self._prefix}:tenants:{bucket}"

    def _old_rows_key(self, bucket: int | str) -> str:
        """The old layout's set of every tenant's row ids in `bucket`."""
        return f"{self._prefix}:bucket:{bucket}"

    @staticmethod
    def _row_id(dims: Dims) -> str:
        encoded = json.dumps(dims, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()[:24]

    def _row_name(self, dims: Dims) -> tuple[str, str]:
        """The row's id and its dims JSON, as the record script takes them."""
        name = self._row_names.get(dims)
        if name is None:
            name = (self._row_id(dims), json.dumps(dims))
            self._row_names.put(dims, name)
        return name

    async def record(self, entry: UsageEntry) -> None:
        """Add one finished call in one round trip, exactly once.

        If Redis does not take it (unreachable, or `READONLY` mid-failover) the call is
        not failed for it: the row is retried in the background for `RECORD_RETRY_S`,
        and a send that timed out but landed is not counted again. In a cool-down it
        waits there untried.
        """
        now = self._buckets.now()
        bucket = self._buckets.start(now)
        dims = _dims(entry.tenant, entry.model, entry.upstream, entry.labels)
        row_id, dims_json = self._row_name(dims)
        overflow_dims = _dims(entry.tenant, entry.model, entry.upstream, OVERFLOW_LABELS)
        overflow_id, overflow_json = self._row_name(overflow_dims)
        admitted = now if entry.admitted_s is None else entry.admitted_s
        spends = [
            self._spend_keys(entry.tenant, spent_in)
            for spent_in in _spend_periods_of_minute(int(admitted // 60))
        ]
        overflow_row = self._row_key(bucket, overflow_id)
        keys = [
            self._row_key(bucket, row_id),
            self._tenant_rows_key(bucket, entry.tenant),
            self._tenants_key(bucket),
            f"{self._prefix}:buckets",
            *(low for low, _ in spends),
            self._records.key,
            self._old_dims_key,
            overflow_row,
            *(high for _, high in spends),
        ]
        number = self._records.take()
        counters = _entry_counters(entry)
        args: list[str | int | float] = [
            row_id, dims_json, self._ttl_s, bucket, self._oldest_bucket(now), number,
            0, 2 * RECORD_RETRY_S, entry.tenant, self._ttl_s + _OLD_DIMS_GRACE_S,
            overflow_id, overflow_json, self._max_rows,
            *(counters[name] for name in _FIELDS),
            # A budget counts its period's spend to the period's end, however short the
            # retention: a month's spend must not expire after a few days without calls.
            *(max(self._ttl_s, math.ceil(period_end_s(p, admitted) - now)) for p in _PERIODS),
        ]  # fmt: skip

        async def record_now() -> None:
            args[6] = self._records.lowest_unconfirmed()
            applied = await self._record_script(keys=keys, args=args)
            self._records.confirm(number)
            if applied > _APPLIED_TO_OVERFLOW:
                applied -= _ROW_LEFT_CORRUPT
                row = keys[0] if applied != _APPLIED_TO_OVERFLOW else overflow_row
                _row_corrupt(row, _ROW_LEFT_ALONE)
                # Its spend was counted; its row is a write given up, logged with what an
                # operator needs to add the call by hand.
                self.late_releases.abandon(
                    lambda: log.error("ledger.record_lost", extra=self._lost(entry))
                )
            if applied == _APPLIED_TO_OVERFLOW:
                self._capped.add(entry.tenant, bucket)

        async def record_late() -> None:
            await record_now()
            self._row_settled(entry.tenant, number)

        def give_up() -> None:
            self._records.confirm(number)  # never sent again
            self._row_settled(entry.tenant, number)
            # What an operator needs to add the call by hand, if it did not land.
            log.error("ledger.record_lost", extra=self._lost(entry))

        def retry_late(*, was_refused: bool = True) -> None:
            self._rows_waiting.setdefault(entry.tenant, set()).add(number)
            self.late_releases.retry(
                record_late,
                expires_after_s=RECORD_RETRY_S,
                on_give_up=give_up,
                was_refused=was_refused,
            )

        if self.cooldown.skips():
            retry_late()
            return
        try:
            await record_now()
        except (RedisError, OSError) as exc:
            # A call the upstream already served is not failed for its ledger line.
            if self.cooldown.failed(exc):
                log.warning("ledger.record_failed", extra={"error": str(exc) or type(exc).__name__})
            if refused_for_good(exc):
                self.late_releases.abandon(give_up)  # sent again it would fail again
            else:
                retry_late()
        except BaseException:  # cancelled while recording: it may not have reached Redis
            retry_late(was_refused=False)
            raise
        else:
            self.late_releases.store_answered()

    @staticmethod
    def _lost(entry: UsageEntry) -> dict[str, object]:
        return {
            "tenant": entry.tenant,
            "model": entry.model,
            "cost_usd": entry.cost_usd,
            "cache_hit": entry.is_cache_hit,
            "saved_cost_usd": entry.saved_cost_usd,
        }

    def _row_settled(self, tenant: str, number: int) -> None:
        """Row `number` of `tenant` landed or was given up (either, or both, may say so)."""
        waiting = self._rows_waiting.get(tenant)
        if waiting is not None:
            waiting.discard(number)
            if not waiting:
                del self._rows_waiting[tenant]

    async def query(self, query: UsageFilter) -> list[UsageRow]:
        """Rows matching `query`, summed over its time window.

        Raises:
            UpstreamUnavailable: Redis cannot be reached, or is in a cool-down (the caller
                may retry).
        """
        rows = await self._read(lambda: self._query(query), failure="ledger.query_failed")
        if rows is None:
            raise UpstreamUnavailable(
                "the usage ledger is unavailable", upstream="usage-ledger", retry_after_s=COOLDOWN_S
            )
        return rows

    async def _read(self, read: Callable[[], Awaitable[T]], *, failure: str) -> T | None:
        """What `read` returns, or None while Redis is in a cool-down or when it does not
        take the read (logged as `failure`): each caller then does what it does without
        Redis."""
        if self.cooldown.skips():
            return None
        try:
            value = await read()
        except (RedisError, OSError) as exc:
            if self.cooldown.failed(exc):
                log.warning(failure, extra={"error": type(exc).__name__})
            return None
        self.cooldown.answered()
        return value

    async def _query(self, query: UsageFilter) -> list[UsageRow]:
        low, high = self._buckets.window(query)
        low_arg = "-inf" if low == float("-inf") else str(int(low))
        high_arg = "+inf" if high == float("inf") else f"({high}"
        buckets = await self._redis.zrangebyscore(f"{self._prefix}:buckets", low_arg, high_arg)
        if not buckets:
            return []
        if query.tenant:
            tenants_of: list[list[str]] = [[query.tenant]] * len(buckets)
        else:
            pipe = self._redis.pipeline(transaction=False)
            for bucket in buckets:
                pipe.smembers(self._tenants_key(bucket))
            tenants_of = [sorted(tenants) for tenants in await pipe.execute()]
        pipe = self._redis.pipeline(transaction=False)
        for bucket, tenants in zip(buckets, tenants_of, strict=True):
            for tenant in tenants:
                pipe.smembers(self._tenant_rows_key(bucket, tenant))
            pipe.smembers(self._old_rows_key(bucket))
        replies = iter(await pipe.execute())
        rows: list[tuple[str, str]] = []  # (bucket, row id)
        old_rows: list[tuple[str, str]] = []  # rows in the old layout only
        for bucket, tenants in zip(buckets, tenants_of, strict=True):
            ids: set[str] = set().union(*(next(replies) for _ in tenants))
            rows += [(bucket, row_id) for row_id in sorted(ids)]
            old_rows += [(bucket, row_id) for row_id in sorted(next(replies) - ids)]
        old_dims = await self._old_dims(old_rows, query)
        rows.extend(old_dims)
        pipe = self._redis.pipeline(transaction=False)
        for bucket, row_id in rows:
            pipe.hgetall(self._row_key(bucket, row_id))
        # A row of the wrong type fails alone: its error is its reply.
        values: list[dict[str, str] | Exception] = await pipe.execute(raise_on_error=False)
        merged: dict[Dims, UsageRow] = {}
        for (bucket, row_id), reply in zip(rows, values, strict=True):
            if isinstance(reply, Exception) and not refused_for_good(reply):
                raise reply  # Redis could not answer it now: the query fails as a whole
            read = _read_row(reply, old_dims.get((bucket, row_id)))
            if isinstance(read, str):
                _row_corrupt(self._row_key(bucket, row_id), read)
                continue
            if read is None or not _matches(read[0], query):
                continue  # expired since its id was read, or another's
            dims, counters = read
            target = merged.get(dims)
            if target is None:
                target = merged[dims] = UsageRow(
                    tenant=dims[0], model=dims[1], upstream=dims[2], labels=dict(dims[3])
                )
            target.add(counters)
        return [merged[d] for d in sorted(merged)]

    async def _old_dims(
        self, rows: list[tuple[str, str]], query: UsageFilter
    ) -> dict[tuple[str, str], Dims]:
        """The dimensions of the old layout's `rows` that match `query`, by row.

        The old layout kept no rows by tenant: until its rows expire, a query for one
        tenant reads the dimensions of every tenant's, but only its own rows.
        """
        if not rows:
            return {}
        row_ids = sorted({row_id for _, row_id in rows})
        raw_dims = await self._redis.hmget(self._old_dims_key, row_ids)
        dims_of: dict[str, Dims] = {}
        for row_id, raw in zip(row_ids, raw_dims, strict=True):
            if raw is None:
                continue
            try:
                dims = _parse_dims(raw)
            except ValueError:
                _row_corrupt(f"{self._old_dims_key} {row_id}", "dims are not [tenant, model, ...]")
                continue
            if _matches(dims, query):
                dims_of[row_id] = dims
        return {(b, row_id): dims_of[row_id] for b, row_id in rows if row_id in dims_of}

    async def spent_usd(self, tenant: str, period: str) -> float:
        """What `tenant` has spent in the current UTC `period` (0 while Redis is down).

        Budgets fail open: an unreachable ledger must not refuse every call.
        """
        keys = self._spend_keys(tenant, period_key(period, self._buckets.now()))
        raw = await self._read(lambda: self._redis.mget(keys), failure="ledger.spend_unavailable")
        return _wide_pico(*(raw or [])) / PICO  # None: Redis unavailable

    def _spend_keys(self, tenant: str, period_key: str) -> tuple[str, str]:
        """A tenant's spend in a period: pico-dollars, and whole millions of USD."""
        low = self._budget_key("spend", tenant, period_key)
        return low, self._budget_key("spend_usd_millions", tenant, period_key)

    def _budget_keys(self, tenant: str, period_key: str) -> list[str]:
        """Spend, its millions, reserved, its millions, leases (`_SWEEP_LUA`'s KEYS)."""
        return [self._budget_key(kind, tenant, period_key) for kind in _BUDGET_KINDS]

    def _budget_key(self, kind: str, tenant: str, period_key: str) -> str:
        return f"{self._prefix}:{kind}:{tenant}:{period_key}"

    async def reserve(
        self, tenant: str, period: str, *, cost_usd: float, limit_usd: float
    ) -> Reservation:
        """Check and hold in one script, so replicas see each other's reservations.

        While Redis is down (or in a cool-down) budgets fail open: granted, with nothing
        held, if the cost alone fits the limit.
        """
        now = self._buckets.now()
        key = period_key(period, now)
        cost, limit = to_pico(cost_usd), to_pico(limit_usd)
        lease = Reservation(
            tenant=tenant, period_key=key, at_s=now, cost_pico=cost, is_granted=True
        )
        fits_alone = _fits(spent=0, reserved=0, cost=cost, limit=limit)
        if self.cooldown.skips():
            return replace(lease, is_granted=fits_alone, was_sent=False)
        try:
            is_granted, *spent_and_reserved = await self._reserve_script(
                keys=self._budget_keys(tenant, key),
                args=[cost, limit, self._lease(lease), self._reservation_ttl_s],
            )
        except (RedisError, OSError) as exc:
            if self.cooldown.failed(exc):
                log.warning("ledger.reserve_unavailable", extra={"error": type(exc).__name__})
            return replace(lease, is_granted=fits_alone)
        except BaseException:
            # Cancelled awaiting the reply: the script may have held it; give it back now.
            with contextlib.suppress(Exception):
                await self.release(lease)
            raise
        self.late_releases.store_answered()
        spent, reserved = _wide_pico(*spent_and_reserved[:2]), _wide_pico(*spent_and_reserved[2:])
        reservation = replace(
            lease, is_granted=bool(is_granted), spent_pico=spent, reserved_pico=reserved
        )
        if reservation.is_granted:
            # Renewed while its call runs: held longer than the TTL, it still counts.
            self._renewals.hold(reservation.id, reservation)
        return reservation

    async def reserved_usd(self, tenant: str, period: str) -> float:
        """What `tenant`'s calls in flight hold in the current `period` (0 while Redis is down)."""
        now = self._buckets.now()
        keys = self._budget_keys(tenant, period_key(period, now))
        raw = await self._read(
            lambda: self._reserved_script(keys=keys), failure="ledger.spend_unavailable"
        )
        return _wide_pico(*(raw or [])) / PICO

    async def release(self, reservation: Reservation) -> None:
        """Stop holding `reservation` (idempotent). If Redis does not take the release
        now (or is in a cool-down), it is retried in the background until it does or the
        lease lapses."""
        if not (reservation.is_granted and reservation.was_sent):
            return
        _, _, *keys = self._budget_keys(reservation.tenant, reservation.period_key)
        # A renewal Redis runs after the release would put the lease back: once one was
        # sent, the lease is marked released too.
        if self._renewals.let_go(reservation.id):
            keys.append(self._released_key(reservation))

        async def release_now() -> None:
            await self._release_script(
                keys=keys,
                args=[self._lease(reservation), reservation.cost_pico, self._reservation_ttl_s],
            )

        if reservation.tenant in self._rows_waiting:
            # The call's usage row (or an earlier one of the tenant's) is still to land:
            # released after it, so the budget counts the call all along, reserved or spent.
            self.late_releases.retry(release_now, was_refused=False)
            return
        await self.late_releases.release_now(release_now)

    @staticmethod
    def _lease(reservation: Reservation) -> str:
        return f"{reservation.id}:{reservation.cost_pico}"

    def _released_key(self, reservation: Reservation) -> str:
        return f"{self._prefix}:released:{reservation.id}"

    async def _renew_reservations(self, reservations: list[Reservation]) -> None:
        """Renew `reservations` in one script (`_RENEW_LUA`)."""
        keys: list[str] = []
        args: list[str | int] = [self._reservation_ttl_s]
        for reservation in reservations:
            _, _, *reserved_and_leases = self._budget_keys(
                reservation.tenant, reservation.period_key
            )
            keys += [*reserved_and_leases, self._released_key(reservation)]
            args += [self._lease(reservation), reservation.cost_pico]
        await self._renew_script(keys=keys, args=args)

    async def aclose(self) -> None:
        """Stop renewing reservations and retrying releases, and close the connection pools."""
        await self._renewals.aclose()
        await self.late_releases.aclose()
        await self._lean.aclose()
        await self._redis.aclose()


def open_ledger(config: LedgerConfig, *, wall_clock: WallClock = time.time) -> Ledger:
    """The ledger `config` asks for: Redis when `redis_url` is set, else in memory."""
    if config.redis_url:
        return RedisLedger(config, wall_clock=wall_clock)
    return MemoryLedger(config, wall_clock=wall_clock)
