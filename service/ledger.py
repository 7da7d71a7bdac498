"""The usage ledger: requests, tokens and cost by tenant, model, upstream and labels.

Usage is summed into time buckets (`ledger.bucket_s`, an hour by default), so a
`GetUsage` time window is as fine as one bucket. Cost is kept as integer pico-dollars
(the precision `pricing.cost_usd` rounds to), so sums are exact whatever the order of
additions. Spend per tenant per UTC day and month is kept apart for budget checks,
which then cost one lookup.

`MemoryLedger` lives in the process; `RedisLedger` is shared by every replica:

    {prefix}:row:{bucket}:{row_id}   hash: requests, input_tokens, ... (HINCRBY)
    {prefix}:bucket:{bucket}         set of the row ids seen in that bucket
    {prefix}:buckets                 sorted set of bucket starts (score = start)
    {prefix}:dims                    hash row_id -> JSON of tenant, model, upstream, labels
    {prefix}:spend:{tenant}:{period} integer pico-dollars (INCRBY)

Every key but `dims` expires after `retention_days`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from service.config import LedgerConfig
from service.domain import Usage
from service.errors import UpstreamUnavailable

log = logging.getLogger("llm_gateway.ledger")

PICO = 10**12
_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_pico")

WallClock = Callable[[], float]


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


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One finished call as the ledger records it."""

    tenant: str
    model: str
    upstream: str
    labels: Mapping[str, str]
    usage: Usage
    cost_usd: float


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
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_pico: int = 0

    @property
    def cost_usd(self) -> float:
        """The summed cost in USD."""
        return self.cost_pico / PICO

    def add(self, other: Mapping[str, int]) -> None:
        """Add counters (by field name) to this row."""
        self.requests += other.get("requests", 0)
        self.input_tokens += other.get("input_tokens", 0)
        self.output_tokens += other.get("output_tokens", 0)
        self.cached_input_tokens += other.get("cached_input_tokens", 0)
        self.cost_pico += other.get("cost_pico", 0)

    def counters(self) -> dict[str, int]:
        """The counters by field name."""
        return {name: getattr(self, name) for name in _FIELDS}


def _entry_counters(entry: UsageEntry) -> dict[str, int]:
    return {
        "requests": 1,
        "input_tokens": entry.usage.input_tokens,
        "output_tokens": entry.usage.output_tokens,
        "cached_input_tokens": entry.usage.cached_input_tokens,
        "cost_pico": to_pico(entry.cost_usd),
    }


Dims = tuple[str, str, str, tuple[tuple[str, str], ...]]


def _dims(tenant: str, model: str, upstream: str, labels: Mapping[str, str]) -> Dims:
    return tenant, model, upstream, tuple(sorted(labels.items()))


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


class MemoryLedger:
    """The ledger of one process."""

    def __init__(self, config: LedgerConfig | None = None, *, wall_clock: WallClock = time.time):
        self._buckets = _Buckets(config or LedgerConfig(), wall_clock)
        self._rows: dict[tuple[int, Dims], UsageRow] = {}
        self._spend: dict[tuple[str, str], int] = {}
        self._retention_s = self._buckets.config.retention_days * 86400
        self._current_bucket: int | None = None

    def _prune(self, now: float) -> None:
        """Drop rows past retention and spend of finished periods (once per new bucket)."""
        oldest = now - self._retention_s
        self._rows = {k: r for k, r in self._rows.items() if k[0] >= oldest}
        current = {period_key("day", now), period_key("month", now)}
        self._spend = {k: v for k, v in self._spend.items() if k[1] in current}

    async def record(self, entry: UsageEntry) -> None:
        """Add one finished call."""
        now = self._buckets.now()
        bucket = self._buckets.start(now)
        if bucket != self._current_bucket:
            self._current_bucket = bucket
            self._prune(now)
        dims = _dims(entry.tenant, entry.model, entry.upstream, entry.labels)
        key = (bucket, dims)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = UsageRow(
                tenant=entry.tenant, model=entry.model, upstream=entry.upstream,
                labels=dict(dims[3]),
            )  # fmt: skip
        counters = _entry_counters(entry)
        row.add(counters)
        for period in ("day", "month"):
            spend_key = (entry.tenant, period_key(period, now))
            self._spend[spend_key] = self._spend.get(spend_key, 0) + counters["cost_pico"]

    async def query(self, query: UsageFilter) -> list[UsageRow]:
        """Rows matching `query`, summed over its time window."""
        low, high = self._buckets.window(query)
        merged: dict[Dims, UsageRow] = {}
        for (bucket, dims), row in self._rows.items():
            if not (low <= bucket < high) or not _matches(dims, query):
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

    async def aclose(self) -> None:
        """Nothing to release."""


class RedisLedger:
    """The ledger shared by every replica through Redis."""

    def __init__(self, config: LedgerConfig, *, wall_clock: WallClock = time.time) -> None:
        import redis.asyncio as aioredis

        if not config.redis_url:
            raise ValueError("RedisLedger needs ledger.redis_url")
        self._buckets = _Buckets(config, wall_clock)
        self._prefix = config.key_prefix
        self._ttl_s = config.retention_days * 86400
        self._redis: Any = aioredis.Redis.from_url(
            config.redis_url,
            decode_responses=True,
            socket_timeout=config.operation_timeout_s,
            socket_connect_timeout=config.operation_timeout_s,
        )

    @staticmethod
    def _row_id(dims: Dims) -> str:
        encoded = json.dumps(dims, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()[:24]

    async def record(self, entry: UsageEntry) -> None:
        """Add one finished call in one round trip."""
        now = self._buckets.now()
        bucket = self._buckets.start(now)
        dims = _dims(entry.tenant, entry.model, entry.upstream, entry.labels)
        row_id = self._row_id(dims)
        row_key = f"{self._prefix}:row:{bucket}:{row_id}"
        bucket_key = f"{self._prefix}:bucket:{bucket}"
        buckets_key = f"{self._prefix}:buckets"
        counters = _entry_counters(entry)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hsetnx(f"{self._prefix}:dims", row_id, json.dumps(dims))
        for name, value in counters.items():
            pipe.hincrby(row_key, name, value)
        pipe.expire(row_key, self._ttl_s)
        pipe.sadd(bucket_key, row_id)
        pipe.expire(bucket_key, self._ttl_s)
        pipe.zadd(buckets_key, {str(bucket): bucket})
        pipe.zremrangebyscore(buckets_key, "-inf", f"({now - self._ttl_s}")
        for period in ("day", "month"):
            spend_key = f"{self._prefix}:spend:{entry.tenant}:{period_key(period, now)}"
            pipe.incrby(spend_key, counters["cost_pico"])
            pipe.expire(spend_key, self._ttl_s)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # Losing a ledger line must not fail a call that the upstream already served.
            log.warning("ledger.record_failed", extra={"error": type(exc).__name__})

    async def query(self, query: UsageFilter) -> list[UsageRow]:
        """Rows matching `query`, summed over its time window.

        Raises:
            UpstreamUnavailable: Redis cannot be reached (the caller may retry).
        """
        try:
            return await self._query(query)
        except (RedisError, OSError) as exc:
            log.warning("ledger.query_failed", extra={"error": type(exc).__name__})
            raise UpstreamUnavailable(
                "the usage ledger is unavailable", upstream="usage-ledger"
            ) from None

    async def _query(self, query: UsageFilter) -> list[UsageRow]:
        low, high = self._buckets.window(query)
        low_arg = "-inf" if low == float("-inf") else str(int(low))
        high_arg = "+inf" if high == float("inf") else f"({high}"
        buckets = await self._redis.zrangebyscore(f"{self._prefix}:buckets", low_arg, high_arg)
        if not buckets:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.smembers(f"{self._prefix}:bucket:{bucket}")
        members: list[set[str]] = await pipe.execute()
        row_ids = sorted({r for ids in members for r in ids})
        if not row_ids:
            return []
        raw_dims = await self._redis.hmget(f"{self._prefix}:dims", row_ids)
        dims_of: dict[str, Dims] = {}
        for row_id, raw in zip(row_ids, raw_dims, strict=True):
            if raw is None:
                continue
            tenant, model, upstream, labels = json.loads(raw)
            dims = _dims(tenant, model, upstream, dict(labels))
            if _matches(dims, query):
                dims_of[row_id] = dims
        keys = [
            (row_id, f"{self._prefix}:row:{bucket}:{row_id}")
            for bucket, ids in zip(buckets, members, strict=True)
            for row_id in ids
            if row_id in dims_of
        ]
        pipe = self._redis.pipeline(transaction=False)
        for _, key in keys:
            pipe.hgetall(key)
        values: list[dict[str, str]] = await pipe.execute()
        merged: dict[Dims, UsageRow] = {}
        for (row_id, _), counters in zip(keys, values, strict=True):
            dims = dims_of[row_id]
            target = merged.get(dims)
            if target is None:
                target = merged[dims] = UsageRow(
                    tenant=dims[0], model=dims[1], upstream=dims[2], labels=dict(dims[3])
                )
            target.add({k: int(v) for k, v in counters.items()})
        return [merged[d] for d in sorted(merged)]

    async def spent_usd(self, tenant: str, period: str) -> float:
        """What `tenant` has spent in the current UTC `period` (0 while Redis is down).

        Budgets fail open: an unreachable ledger must not refuse every call.
        """
        key = f"{self._prefix}:spend:{tenant}:{period_key(period, self._buckets.now())}"
        try:
            raw = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            log.warning("ledger.spend_unavailable", extra={"error": type(exc).__name__})
            return 0.0
        return int(raw or 0) / PICO

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def open_ledger(config: LedgerConfig, *, wall_clock: WallClock = time.time) -> Ledger:
    """The ledger `config` asks for: Redis when `redis_url` is set, else in memory."""
    if config.redis_url:
        return RedisLedger(config, wall_clock=wall_clock)
    return MemoryLedger(config, wall_clock=wall_clock)
