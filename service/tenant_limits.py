"""Per-tenant quotas: requests and tokens per minute, and calls in flight.

Checked before any upstream work. Rates are token buckets that hold one minute's worth
and refill continuously, so a tenant may burst up to its per-minute limit and then
proceeds at the limit's rate. A refusal says which limit and when a retry can pass.

`MemoryTenantLimiter` keeps the buckets in this process (one replica); `RedisTenantLimiter`
keeps them in Redis, updated atomically by one Lua script, so that every replica shares
them. Tokens counted are the prompt's estimate plus the `max_tokens` reserved for output.

A plain call holds a slot for its whole call (`admit`, refused at once at the cap); each
upstream call of a batch or a summary takes one as it starts (`take_turn`), and waits for
one given back (`await_slot`) rather than being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.clock import SYSTEM_CLOCK, Clock
from service.config import TenantConfig
from service.errors import QuotaExceeded
from service.late_release import LateReleases
from service.lease_renewals import LEASE_TTL_S, LeaseRenewals
from service.redis_errors import refused_for_good
from service.store_cooldown import StoreCooldown

log = logging.getLogger("llm_gateway.tenant_limits")

_WINDOW_S = 60.0
# How often a batch's or a summary's call waiting for its tenant's slot asks Redis again
# (one script), for a slot given back by another replica or a lease that lapsed; a slot
# given back by this replica wakes it at once.
SLOT_POLL_S = 0.25


class CallSlot:
    """One call's slot of its tenant's concurrent calls, held from `admit` until the end
    of its body, or given back earlier (`give_back`): once either way."""

    __slots__ = ("_release", "call_off")

    def __init__(
        self,
        release: Callable[[], Awaitable[None]] | None = None,
        *,
        call_off: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._release = release
        # For an admission whose reply never came (the limit store timed out): gives back
        # what it took, if it ran, and nothing if not, in place of `give_back_rate`'s
        # units (`RedisTenantLimiter`); None when what it took is known.
        self.call_off = call_off

    async def give_back(self) -> None:
        """Give the slot back, if still held (a stalled stream's, once its upstream is
        let go: its call lasts on until its caller reads or leaves)."""
        release, self._release = self._release, None
        if release is not None:
            await release()


# Holds nothing: for a call that takes no slot.
NO_SLOT = CallSlot()
# Holds nothing, and took none of the tenant's units: a call admitted while the limit store
# was left alone (its cool-down), which has nothing to give back if it is never sent.
NOTHING_TAKEN = CallSlot()


class TenantLimiter(Protocol):
    """Admits one call of a tenant or refuses it with `QuotaExceeded`."""

    def admit(
        self, tenant: str, limits: TenantConfig, *, tokens: int, requests: int = 1
    ) -> contextlib.AbstractAsyncContextManager[CallSlot]:
        """Hold one concurrent-call slot for the body, or until the `CallSlot` handed out
        is given back; take `requests` and `tokens` now."""
        ...

    async def take_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """Take `requests` and `tokens` from the tenant's per-minute buckets, holding no
        call slot (a batch's item as it starts); or refuse and take nothing. What it
        took is handed out, for `give_back_rate`: `NO_SLOT`, or `NOTHING_TAKEN` where it
        took none (nothing asked, the limit store left alone).

        `leave_share` of each bucket's capacity is left to the tenant's other calls: a
        take needs that much in the bucket beyond its own cost (never more than the
        whole capacity), and its refusal's wait is until the bucket holds it.
        """
        ...

    async def take_turn(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """`take_rate`, and one concurrent-call slot (under a `max_concurrent_calls`) for
        one upstream call of a batch or a summary, held until the `CallSlot` is given
        back; or refuse (`is_over_call_cap` when the slots are all held) and take nothing.
        The `CallSlot` says what it took, as `take_rate`'s does.
        """
        ...

    @property
    def slots_given_back(self) -> int:
        """A count of the slots this process gave back, every tenant's: read before a
        take, for `await_slot`'s `since`."""
        ...

    async def await_slot(
        self, tenant: str, *, timeout_s: float | None, since: int | None = None
    ) -> None:
        """Return once one of `tenant`'s slots may be free again (given back in this
        process; in Redis, also after a short poll interval, for other replicas' and
        lapsed leases), or after `timeout_s` (None: no limit); at once if one was given
        back after `since` (`slots_given_back` as the refused take began)."""
        ...

    async def give_back_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        taken: CallSlot = NO_SLOT,
    ) -> None:
        """Return `requests` and `tokens` that `admit`, `take_rate` or `take_turn` took
        for a call never sent to the tenant's per-minute buckets, never past a full
        bucket; none where what it handed out (`taken`) says it took none, and where its
        reply never came only what it took, if anything (`CallSlot.call_off`)."""
        ...


def is_over_call_cap(refusal: QuotaExceeded) -> bool:
    """Whether `refusal` is for the tenant's `max_concurrent_calls` (not for a rate)."""
    return refusal.subject.endswith(":max_concurrent_calls")


def _refusal(
    tenant: str, which: str, limit: int, retry_after_s: float | None, *, leave_share: float = 0.0
) -> QuotaExceeded:
    # A paced batch's item is refused while units remain, for the share it leaves to the
    # tenant's other calls: the message says so, or "over its limit" reads as a miscount.
    kept = f" ({leave_share:.0%} of it kept for the tenant's other calls)" if leave_share else ""
    return QuotaExceeded(
        f"tenant {tenant!r} is over its {which} limit of {limit}{kept}",
        subject=f"tenant:{tenant}:{which}",
        retry_after_s=retry_after_s,
    )


def _too_large(tenant: str, limits: TenantConfig, *, tokens: int, requests: int) -> None:
    """Refuse, with no retry hint, a call larger than a whole minute's allowance."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    refusal = None
    if rpm and requests > rpm:
        refusal = QuotaExceeded(
            f"a call of {requests} requests can never fit tenant {tenant!r}'s "
            f"requests_per_minute of {rpm}",
            subject=f"tenant:{tenant}:requests_per_minute",
            retry_after_s=None,
        )
    elif tpm and tokens > tpm:
        refusal = QuotaExceeded(
            f"a call of about {tokens} tokens can never fit tenant {tenant!r}'s "
            f"tokens_per_minute of {tpm}",
            subject=f"tenant:{tenant}:tokens_per_minute",
            retry_after_s=None,
        )
    if refusal is not None:
        # Pushback -1: a retry policy that retries RESOURCE_EXHAUSTED would otherwise
        # send the same call again, to the same refusal, until its attempts run out.
        refusal.is_retry_futile = True
        raise refusal


@dataclass(slots=True)
class _Bucket:
    level: float
    updated_at: float

    def refill(self, now: float, capacity: int) -> None:
        self.level = min(capacity, self.level + (now - self.updated_at) * capacity / _WINDOW_S)
        self.updated_at = now

    def wait_s(self, cost: float, capacity: int, *, leave_share: float = 0.0) -> float:
        need = min(capacity, cost + leave_share * capacity)
        return 0.0 if self.level >= need else (need - self.level) * _WINDOW_S / capacity

    def give_back(self, amount: float, capacity: int) -> None:
        self.level = min(capacity, self.level + amount)


class _FreedSlots:
    """Wakes whoever waits for a tenant's slot (`await_slot`) when this process gives one
    of that tenant's slots back."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Slots given back (every tenant's), and per tenant the count at its last one: a
        # slot given back after a take was refused and before its caller waits (the
        # refusal's reply and the caller's wake-up are loop turns apart) wakes no one, and
        # would leave the caller waiting for a slot already free (`wait`'s `since`).
        self.count = 0
        self._last: dict[str, int] = {}

    def given_back(self, tenant: str) -> None:
        """One of `tenant`'s slots was given back: wake its waiters."""
        self.count += 1
        self._last[tenant] = self.count
        for waiter in self._waiters.pop(tenant, ()):
            if not waiter.done():
                waiter.set_result(None)

    def waiting(self, tenant: str) -> int:
        """How many wait for one of `tenant`'s slots."""
        return len(self._waiters.get(tenant, ()))

    async def wait(self, tenant: str, *, timeout_s: float | None, since: int | None = None) -> None:
        """Return once one of `tenant`'s slots is given back, or after `timeout_s`; at
        once if one was given back after `since` (a `count`)."""
        if since is not None and self._last.get(tenant, 0) > since:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(tenant, [])
        waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        finally:
            if waiter in waiters:  # not woken: nothing left behind for a tenant gone quiet
                waiters.remove(waiter)
                if not waiters and self._waiters.get(tenant) is waiters:
                    del self._waiters[tenant]


class MemoryTenantLimiter:
    """Token buckets and in-flight counts per tenant, in this process."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}
        self._freed = _FreedSlots()

    def in_flight(self, tenant: str) -> int:
        """Calls of `tenant` admitted and not finished."""
        return self._in_flight.get(tenant, 0)

    def awaiting_slot(self, tenant: str) -> int:
        """Calls of `tenant` waiting for one of its slots (`await_slot`)."""
        return self._freed.waiting(tenant)

    def _bucket(self, table: dict[str, _Bucket], tenant: str, capacity: int) -> _Bucket:
        now = self._clock.now()
        bucket = table.get(tenant)
        if bucket is None:
            bucket = table[tenant] = _Bucket(float(capacity), now)
        bucket.refill(now, capacity)
        return bucket

    def take(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> None:
        """Take `requests` and `tokens` from the tenant's buckets, or refuse and take
        nothing; `leave_share` as in `TenantLimiter.take_rate`."""
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        _too_large(tenant, limits, tokens=tokens, requests=requests)
        # A bucket nothing is taken from is not asked: a Summarize's call takes no request.
        requests_bucket = self._bucket(self._requests, tenant, rpm) if rpm and requests else None
        tokens_bucket = self._bucket(self._tokens, tenant, tpm) if tpm and tokens else None
        # Refused by the limit that holds the call longest: told the shorter wait, a paced
        # item slept through it only to be refused then (or to sleep again).
        refusal: tuple[float, str, int] = (0.0, "", 0)
        if requests_bucket is not None:
            wait = requests_bucket.wait_s(requests, rpm, leave_share=leave_share)
            refusal = max(refusal, (wait, "requests_per_minute", rpm), key=lambda r: r[0])
        if tokens_bucket is not None:
            wait = tokens_bucket.wait_s(tokens, tpm, leave_share=leave_share)
            refusal = max(refusal, (wait, "tokens_per_minute", tpm), key=lambda r: r[0])
        if refusal[0] > 0:
            wait, which, limit = refusal
            raise _refusal(tenant, which, limit, wait, leave_share=leave_share)
        if requests_bucket is not None:
            requests_bucket.level -= requests
        if tokens_bucket is not None:
            tokens_bucket.level -= tokens

    async def take_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """`take`, for callers of the `TenantLimiter` protocol."""
        self.take(tenant, limits, tokens=tokens, requests=requests, leave_share=leave_share)
        return NO_SLOT

    @contextlib.asynccontextmanager
    async def admit(
        self, tenant: str, limits: TenantConfig, *, tokens: int, requests: int = 1
    ) -> AsyncIterator[CallSlot]:
        """Hold one concurrent-call slot for the body, or until the `CallSlot` handed out
        is given back; take `requests` and `tokens` now."""
        slot = self._take_slot(tenant, limits, tokens=tokens, requests=requests)
        try:
            yield slot
        finally:
            await slot.give_back()

    def _take_slot(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """Take `requests` and `tokens` (`take`) and one more call of `tenant` in flight,
        until the slot handed out is given back; or refuse and take nothing."""
        cap = limits.max_concurrent_calls
        if cap and self._in_flight.get(tenant, 0) >= cap:
            # As in Redis, before the cap's: a call no minute can hold is told not to
            # retry, not to retry in a second (to the same refusal, or the cap again, until
            # its attempts run out). `take` refuses it when under the cap.
            _too_large(tenant, limits, tokens=tokens, requests=requests)
            raise _refusal(tenant, "max_concurrent_calls", cap, 1.0)
        self.take(tenant, limits, tokens=tokens, requests=requests, leave_share=leave_share)
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1

        async def release() -> None:
            self._in_flight[tenant] -= 1
            self._freed.given_back(tenant)

        return CallSlot(release)

    async def take_turn(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """See `TenantLimiter.take_turn`: as `admit` takes its slot."""
        return self._take_slot(
            tenant, limits, tokens=tokens, requests=requests, leave_share=leave_share
        )

    @property
    def slots_given_back(self) -> int:
        """See `TenantLimiter.slots_given_back`."""
        return self._freed.count

    async def await_slot(
        self, tenant: str, *, timeout_s: float | None, since: int | None = None
    ) -> None:
        """See `TenantLimiter.await_slot`: here, only this process holds slots."""
        await self._freed.wait(tenant, timeout_s=timeout_s, since=since)

    async def give_back_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        taken: CallSlot = NO_SLOT,
    ) -> None:
        """See `TenantLimiter.give_back_rate`."""
        if taken is NOTHING_TAKEN:
            return
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm and requests:
            self._bucket(self._requests, tenant, rpm).give_back(requests, rpm)
        if tpm and tokens:
            self._bucket(self._tokens, tenant, tpm).give_back(tokens, tpm)


# KEYS: requests bucket, tokens bucket, in-flight sorted set, the lease's released marker,
# its taken record. ARGV: rpm, tpm, requests, tokens, max concurrent, lease id ('': none),
# lease ttl (s), the share of each bucket to leave to other calls (`take_rate`'s
# `leave_share`). Returns {0, ""} when admitted, else {1 rpm | 2 tpm | 3 concurrency,
# wait_s as string}: of rpm and tpm, the one that holds the call longer. A lease marked
# `off` (`_CALL_OFF_LUA` ran first) takes nothing; one marked released takes no lease.
# Admitted with a lease id and no cap, it records that it took its units (no lease in the
# in-flight set shows it) for 10 s, for a call-off that comes as its caller is cancelled.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local nreq, ntok = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, ttl = tonumber(ARGV[5]), tonumber(ARGV[7])
local leave = tonumber(ARGV[8])
local lease, mark = ARGV[6], false
if lease ~= '' then
  mark = redis.call('GET', KEYS[4])
  if mark == 'off' then return {0, ''} end
end
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local lvl, at = tonumber(v[1]), tonumber(v[2])
  -- Missing, or unreadable (not numbers, a level below 0 no take leaves): full, and
  -- rewritten by the take, rather than refusing or falling open for as long as it stays.
  if lvl == nil or at == nil or not (lvl >= 0) then return cap end
  return math.min(cap, lvl + math.max(0, now - at) * cap / 60)
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {3, '1'} end
end
local rl, tl, which, wait = 0, 0, 0, 0
if rpm > 0 then
  rl = level(KEYS[1], rpm)
  local need = math.min(rpm, nreq + leave * rpm)
  if rl < need then which, wait = 1, (need - rl) * 60 / rpm end
end
if tpm > 0 then
  tl = level(KEYS[2], tpm)
  local need = math.min(tpm, ntok + leave * tpm)
  if tl < need and (need - tl) * 60 / tpm > wait then which, wait = 2, (need - tl) * 60 / tpm end
end
if which > 0 then return {which, tostring(wait)} end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(rl - nreq), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(tl - ntok), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
if maxc > 0 then
  if not mark then
    redis.call('ZADD', KEYS[3], now + ttl, lease)
    -- Never shortened: a replica of an older release (a rolling upgrade) may hold longer
    -- leases.
    if redis.call('TTL', KEYS[3]) < ttl then redis.call('EXPIRE', KEYS[3], ttl) end
  end
elseif lease ~= '' then
  redis.call('SET', KEYS[5], '1', 'EX', 10)
end
return {0, ''}
"""

_WHICH = {1: "requests_per_minute", 2: "tokens_per_minute", 3: "max_concurrent_calls"}

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm, requests, tokens (0: that bucket is
# not asked). Puts back units taken for a call never sent, refilled as the admission reads
# them and never past a full bucket; a bucket missing or unreadable already reads as full.
_GIVE_BACK_FUNCTION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function give_back(key, cap, amount)
  if cap <= 0 or amount <= 0 then return end
  local v = redis.call('HMGET', key, 'level', 'at')
  local lvl, at = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or at == nil or not (lvl >= 0) then return end
  local level = math.min(cap, lvl + math.max(0, now - at) * cap / 60 + amount)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', key, 120)
end
"""
_GIVE_BACK_LUA = (
    _GIVE_BACK_FUNCTION
    + """
give_back(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[3]))
give_back(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[4]))
return 0
"""
)

# Calls off an admission whose reply its caller, cancelled, never had: it may have run, or
# may still sit in Redis's input and run later. Marks the lease `off`, so that the
# admission takes nothing if it runs after; if it ran, gives back what it took: its lease,
# and its units (as `_GIVE_BACK_LUA`), known by the lease in the in-flight set or, without
# a cap, its taken record. Once: a retry of a call-off whose reply was lost finds the mark.
# KEYS: as the admission's. ARGV: rpm, tpm, requests, tokens (0: not asked), lease id, the
# mark's ttl (s). Returns 1 if the admission had run, else 0.
_CALL_OFF_LUA = (
    _GIVE_BACK_FUNCTION
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('SET', KEYS[4], 'off', 'EX', tonumber(ARGV[6]))
if redis.call('ZREM', KEYS[3], ARGV[5]) + redis.call('DEL', KEYS[5]) == 0 then return 0 end
give_back(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[3]))
give_back(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[4]))
return 1
"""
)

# Every lease of a round. KEYS: for each lease, its in-flight sorted set and its released
# marker. ARGV: lease ttl (s), then each lease's id. Moves each lease to expire a whole
# ttl from now (on Redis's clock, as the admission script does), putting it back if it
# lapsed (Redis unreachable past its ttl, or restarted empty): its call still runs. Not
# once marked released, as this may run after that. A set of another type (written by
# hand) fails its own lease alone (pcall): an error would end the script, and with it
# the renewal of every other tenant's leases in the round, which would then lapse.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    local added = redis.pcall('ZADD', KEYS[i], now + ttl, ARGV[(i + 1) / 2 + 1])
    if type(added) == 'number' and redis.call('TTL', KEYS[i]) < ttl then
      redis.call('EXPIRE', KEYS[i], ttl)
    end
  end
end
return 0
"""

# A held lease: its id and its keys (`RedisTenantLimiter._keys`).
_Lease = tuple[str, list[str]]


class RedisTenantLimiter:
    """The same buckets and in-flight counts, in Redis, shared by every replica.

    If Redis cannot be reached the call is admitted and a warning logged: an outage of
    the limit store should not take the whole gateway down with it. A lease Redis does
    not take back when its call ends is given back later (`LateReleases`), so a short
    outage does not hold a tenant's slot until the lease lapses. While `cooldown`
    (shared with the other users of the same Redis client) leaves Redis alone, calls are
    admitted at once, and take no lease to give back. Each call's lease is renewed while
    it runs (`LeaseRenewals`: one task and one script a round for all of them), so a long
    call keeps its slot to its end, and a dead replica's leases lapse
    within their TTL (`LEASE_TTL_S`, a minute).
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str,
        cooldown: StoreCooldown | None = None,
        lease_ttl_s: int = LEASE_TTL_S,
        slot_poll_s: float = SLOT_POLL_S,
        commands: Any = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._slot_poll_s = slot_poll_s
        self._freed = _FreedSlots()
        # The per-call scripts and release go through `commands` (a `LeanRedis` beside
        # `redis`, without redis-py's per-command cost) when given.
        self._commands = redis if commands is None else commands
        self._script = self._commands.register_script(_ADMIT_LUA)
        self._renew = self._commands.register_script(_RENEW_LUA)
        self._give_back_units = self._commands.register_script(_GIVE_BACK_LUA)
        self._call_off_admission = self._commands.register_script(_CALL_OFF_LUA)
        self._lease_ttl_s = lease_ttl_s
        self.cooldown = cooldown if cooldown is not None else StoreCooldown("tenant_limits")
        self.late_releases = LateReleases(
            "tenant_limits",
            lease_ttl_s=lease_ttl_s,
            refused_for_good=refused_for_good,
            cooldown=self.cooldown,
        )
        self._renewals: LeaseRenewals[_Lease] = LeaseRenewals(
            "tenant_limits",
            ttl_s=lease_ttl_s,
            renew=self._renew_leases,
            cooldown=self.cooldown,
            on_answered=self.late_releases.store_answered,
        )

    async def aclose(self) -> None:
        """Stop renewing leases and retrying releases (before the Redis client closes)."""
        await self._renewals.aclose()
        await self.late_releases.aclose()

    async def _give_back(self, keys: list[str], lease: str, *, may_come_back: bool) -> None:
        """Release the call's lease, now or, if Redis does not take it, in the background.

        A lease a command already sent may still put back after this (`may_come_back`: an
        admission script whose reply never came, a renewal) is marked released as well.
        """
        if may_come_back:
            await self.late_releases.release_now(lambda: self._release_for_good(keys, lease))
        else:
            await self.late_releases.release_now(
                lambda: self._commands.execute_command("ZREM", keys[2], lease)
            )

    async def _call_off(self, keys: list[str], lease: str, units: list[int]) -> None:
        """Call off the admission of `lease` whose reply never came (`_CALL_OFF_LUA`):
        what it took comes back, now or, if Redis does not answer, in the background; its
        `units`: rpm, tpm, requests and tokens, as the admission was asked."""
        args = [*units, lease, self._lease_ttl_s]
        await self.late_releases.release_now(lambda: self._call_off_admission(keys=keys, args=args))

    def _keys(self, tenant: str, lease: str) -> list[str]:
        base = f"{self._prefix}tenant:{{{tenant}}}:"
        return [
            base + "rpm",
            base + "tpm",
            base + "inflight",
            base + "released:" + lease,
            base + "taken:" + lease,
        ]

    async def _release_for_good(self, keys: list[str], lease: str) -> None:
        """Give back a lease that a command sent before may still put back.

        A script Redis did not answer (the admission, a renewal) may still sit in a stalled
        server's input and run after this: the marker stops it from taking the lease
        then, for the lease's TTL.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys[2], lease)
            # Not over a call-off's `off` mark, after which the admission takes nothing.
            pipe.set(keys[3], 1, ex=self._lease_ttl_s, nx=True)
            await pipe.execute()

    def _store_failed(self, exc: Exception) -> None:
        """The limit store did not answer: the call is admitted; say so once per call."""
        if self.cooldown.failed(exc):
            log.warning("tenant_limits.store_unavailable", extra={"error": type(exc).__name__})

    @staticmethod
    def _refuse(
        tenant: str, limits: TenantConfig, which: int, wait: Any, leave_share: float
    ) -> None:
        """Raise the refusal the admission script answered, if it refused."""
        if which:
            limit = {
                1: limits.requests_per_minute,
                2: limits.tokens_per_minute,
                3: limits.max_concurrent_calls,
            }[which]
            share = leave_share if which != 3 else 0.0  # no share of the call cap is kept
            raise _refusal(tenant, _WHICH[which], limit, float(wait), leave_share=share)

    async def take_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """Take `requests` and `tokens` from the tenant's per-minute buckets, holding no
        call slot (the script takes no lease without a concurrency cap); or refuse.
        `leave_share` and what is handed out as in `TenantLimiter.take_rate`."""
        # A bucket nothing is taken from is not asked (0: no such limit): a Summarize's
        # calls take no request.
        rpm = limits.requests_per_minute if requests else 0
        tpm = limits.tokens_per_minute if tokens else 0
        if not (rpm or tpm):
            return NOTHING_TAKEN
        # With a lease id, as a plain call's admission: cancelled awaiting the script's
        # reply (a Summarize's own request), it is called off rather than kept.
        return await self._take_lease(
            tenant,
            limits,
            rpm=rpm,
            tpm=tpm,
            tokens=tokens,
            requests=requests,
            cap=0,
            leave_share=leave_share,
        )

    @contextlib.asynccontextmanager
    async def admit(
        self, tenant: str, limits: TenantConfig, *, tokens: int, requests: int = 1
    ) -> AsyncIterator[CallSlot]:
        """Hold one concurrent-call slot for the body, or until the `CallSlot` handed out
        is given back; take `requests` and `tokens` now."""
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if not (rpm or tpm or limits.max_concurrent_calls):
            yield NO_SLOT
            return
        slot = await self._take_lease(
            tenant,
            limits,
            rpm=rpm,
            tpm=tpm,
            tokens=tokens,
            requests=requests,
            cap=limits.max_concurrent_calls,
        )
        try:
            yield slot
        finally:
            await slot.give_back()

    async def take_turn(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """See `TenantLimiter.take_turn`: one script, as a call's admission, and the
        lease's release as the upstream call ends."""
        if not limits.max_concurrent_calls:
            return await self.take_rate(
                tenant, limits, tokens=tokens, requests=requests, leave_share=leave_share
            )
        # As `take_rate`: a bucket nothing is taken from is not asked.
        rpm = limits.requests_per_minute if requests else 0
        tpm = limits.tokens_per_minute if tokens else 0
        return await self._take_lease(
            tenant,
            limits,
            rpm=rpm,
            tpm=tpm,
            tokens=tokens,
            requests=requests,
            cap=limits.max_concurrent_calls,
            leave_share=leave_share,
        )

    @property
    def slots_given_back(self) -> int:
        """See `TenantLimiter.slots_given_back`: this replica's."""
        return self._freed.count

    async def await_slot(
        self, tenant: str, *, timeout_s: float | None, since: int | None = None
    ) -> None:
        """See `TenantLimiter.await_slot`: a slot given back here wakes the waiter at once;
        one given back by another replica, or a lapsed lease, is seen by the next poll."""
        poll_s = self._slot_poll_s if timeout_s is None else min(timeout_s, self._slot_poll_s)
        await self._freed.wait(tenant, timeout_s=poll_s, since=since)

    async def give_back_rate(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        tokens: int,
        requests: int = 1,
        taken: CallSlot = NO_SLOT,
    ) -> None:
        """See `TenantLimiter.give_back_rate`: one script. While Redis does not answer,
        or the cool-down leaves it alone, the units stay spent (they refill within the
        minute), except those of an admission whose reply never came: it is called off,
        now or once Redis answers, and gives back what Redis recorded it took (without a
        cap, that record lasts 10 s: after it, the units stay spent)."""
        rpm = limits.requests_per_minute if requests else 0
        tpm = limits.tokens_per_minute if tokens else 0
        if not (rpm or tpm) or taken is NOTHING_TAKEN:
            return
        if taken.call_off is not None:
            await taken.call_off()
            return
        if self.cooldown.skips():
            return
        try:
            await self._give_back_units(
                keys=self._keys(tenant, "")[:2], args=[rpm, tpm, requests, tokens]
            )
        except Exception as exc:
            self._store_failed(exc)
            return
        self.late_releases.store_answered()

    async def _take_lease(
        self,
        tenant: str,
        limits: TenantConfig,
        *,
        rpm: int,
        tpm: int,
        tokens: int,
        requests: int,
        cap: int,
        leave_share: float = 0.0,
    ) -> CallSlot:
        """Take `requests` and `tokens` (from the buckets of `rpm` and `tpm`, 0: not
        asked) and a lease under `cap` (the tenant's `max_concurrent_calls`; 0: no lease),
        in one script; the lease is held (and renewed) until the `CallSlot` handed out is
        given back."""
        _too_large(tenant, limits, tokens=tokens, requests=requests)
        if self.cooldown.skips():
            return NOTHING_TAKEN
        lease = uuid.uuid4().hex
        keys = self._keys(tenant, lease)
        is_confirmed = True  # the admission script's reply came
        try:
            which, wait = await self._script(
                keys=keys,
                args=[rpm, tpm, requests, tokens, cap, lease, self._lease_ttl_s, leave_share],
            )
        except Exception as exc:  # the limit store is down: admit
            self._store_failed(exc)
            which, wait = 0, b""
            # A reply that timed out may follow a script that ran and took a lease, or
            # precede one that will: give it back at the end rather than hold the
            # tenant's slot until it expires.
            is_confirmed = False
        except BaseException:
            # Cancelled awaiting the reply: the script may have taken units and a lease, or
            # may run later; only Redis knows which, so it is called off there.
            await self._call_off(keys, lease, [rpm, tpm, requests, tokens])
            raise
        else:
            self.late_releases.store_answered()
        self._refuse(tenant, limits, int(which), wait, leave_share)
        call_off = None
        if not is_confirmed:  # its reply lost, what it took is Redis's to say
            call_off = functools.partial(self._call_off, keys, lease, [rpm, tpm, requests, tokens])
        if not cap:
            return NO_SLOT if call_off is None else CallSlot(call_off=call_off)
        self._renewals.hold(lease, (lease, keys))

        async def release() -> None:
            # A renewal Redis runs after a plain ZREM would put the lease back: once one
            # was sent, the lease is marked released too.
            is_renewed = self._renewals.let_go(lease)
            await self._give_back(keys, lease, may_come_back=not is_confirmed or is_renewed)
            self._freed.given_back(tenant)

        return CallSlot(release, call_off=call_off)

    async def _renew_leases(self, leases: list[_Lease]) -> None:
        """Renew `leases` in one script (`_RENEW_LUA`)."""
        keys = [key for _, lease_keys in leases for key in (lease_keys[2], lease_keys[3])]
        await self._renew(keys=keys, args=[self._lease_ttl_s, *(lease for lease, _ in leases)])
