"""Per-upstream rates shared by every process and replica, through Redis (opt-in).

A provider's `requests_per_minute` and `tokens_per_minute` are per account, so an
upstream with `shared_limits: true` keeps its two buckets in the Redis of
`auth.redis_url` (level and time, refilled at the configured rate, one minute's worth at
most), not in each process. No call waits on Redis for its start: each process spends
from a small local reserve of units taken from the shared bucket, and one refiller task
per upstream takes the next chunk with one Lua script when the reserve runs low or a call
needs more than it holds: what the calls asking need, at least a second of the rate when
that is a unit or more, never more than the bucket holds. The first call to find the
reserve short waits for that one round trip (calls arriving meanwhile share it).

When Redis's bucket is short, its answer (the level left) tells how long until it holds
what a call needs: the limiter waits that long, or refuses at once against
`max_limit_wait_s` and the deadline, as for its own buckets, and asks again then. A call
that is already waiting in line then takes what the bucket has, short of its need, so
that a big call gathers its units rather than being outrun by other processes' small ones.

Everything else stays per process (`service.limits`): turn-taking by tenant, the
timer, `max_concurrency`, pauses and learned spacing. While Redis does not answer (down,
hung, or refusing the script) the buckets fall open to this process's own, at the full
configured rate, as tenant limits fall open; logged once, and back to shared as soon as
the refiller's retry, once a cool-down, is answered. Units left in the reserve when the
server stops are given back to the shared bucket (best effort: a process that dies
keeps them, which only slows the others for a while).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from service.clock import SYSTEM_CLOCK, Clock
from service.config import UpstreamConfig
from service.limits import LimitExceeded, TokenBucket, UpstreamLimiter
from service.store_cooldown import COOLDOWN_S, StoreCooldown

log = logging.getLogger("llm_gateway.upstream_limits")

# A bucket idle for a minute is full again, as a missing key reads: the key may go then.
_KEY_TTL_S = 120
# The limiter's wait estimate while a fetch is on its way: the refiller dispatches as it
# lands, so this is only how soon the timer checks again.
_FETCH_WAIT_S = 0.05
# The longest a stopping server spends giving its reserve back.
_GIVE_BACK_TIMEOUT_S = 1.0

# KEYS: the requests bucket, the tokens bucket. ARGV: for each bucket its rate per minute
# (0: no such bucket), the units wanted and the units needed (the smallest call asking's
# share: what a grant must hold for any of them to start); then 1 to grant what there is
# short of the need (else nothing is taken unless every bucket has its need), and the
# keys' TTL. Returns for each bucket the units granted and the level left, as strings.
_TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local partial, ttl = ARGV[7] == '1', tonumber(ARGV[8])
local levels, short = {}, false
for i = 1, 2 do
  local rate, need = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i])
  if rate > 0 then
    local v = redis.call('HMGET', KEYS[i], 'level', 'at')
    local lvl, at = tonumber(v[1]), tonumber(v[2])
    -- Missing, or unreadable (not numbers, a level out of range): full, and rewritten.
    if lvl == nil or at == nil or not (lvl >= 0 and lvl <= rate) then
      lvl = rate
    else
      lvl = math.min(rate, lvl + math.max(0, now - at) * rate / 60)
    end
    levels[i] = lvl
    if lvl < math.min(need, rate) then short = true end
  end
end
local out = {}
for i = 1, 2 do
  local rate, want = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local granted, lvl = 0, 0
  if rate > 0 then
    lvl = levels[i]
    if partial or not short then granted = math.max(0, math.min(want, lvl)) end
    lvl = lvl - granted
    redis.call('HSET', KEYS[i], 'level', tostring(lvl), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  out[2 * i - 1], out[2 * i] = tostring(granted), tostring(lvl)
end
return out
"""

# KEYS: the requests bucket, the tokens bucket. ARGV: for each bucket its rate per minute
# and the units given back; then the keys' TTL. A bucket whose key is gone, or that the
# take script cannot read, is full (as that script reads it): nothing is given back to it.
_GIVE_BACK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, 2 do
  local rate, units = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if rate > 0 and units > 0 then
    local v = redis.call('HMGET', KEYS[i], 'level', 'at')
    local lvl, at = tonumber(v[1]), tonumber(v[2])
    if lvl ~= nil and at ~= nil and lvl >= 0 and lvl <= rate then
      lvl = lvl + math.max(0, now - at) * rate / 60
      lvl = math.min(rate, lvl + units)
      redis.call('HSET', KEYS[i], 'level', tostring(lvl), 'at', tostring(now))
      redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5]))
    end
  end
end
return 0
"""


def bucket_keys(prefix: str, upstream: str) -> tuple[str, str]:
    """The Redis hashes of an upstream's requests and tokens buckets."""
    base = f"{prefix}upstream:{{{upstream}}}:"
    return base + "rpm", base + "tpm"


class SharedBucket:
    """One of an upstream's buckets kept in Redis (a `RateBucket`): calls spend from the
    local `reserve` its `SharedRate` fills, or from `local` while Redis does not answer."""

    def __init__(self, rate: SharedRate, per_minute: int, now: float) -> None:
        self._rate = rate
        self.per_minute = per_minute
        self.reserve = 0.0  # units taken from Redis, not spent yet (below 0: overdrawn)
        self.local = TokenBucket.full(per_minute, now)
        self.chunk = per_minute / 60.0  # a second of the rate: the least taken at once
        self.asked = 0.0  # units asked for by calls about to start, since the last fetch
        self.front = 0.0  # units the call first in line needs
        # The smallest of those calls: a grant that holds it starts one of them at least,
        # though not all (a burst gets what the bucket has, as from a local bucket).
        self.least = math.inf
        # Redis's level after the last fetch, and when it came (inf: not asked yet).
        self.level = math.inf
        self.level_at = 0.0

    def missing(self, amount: float) -> float:
        """Units the reserve lacks for a call of `amount` (capped as the bucket's own)."""
        return min(amount, self.per_minute) - self.reserve

    def estimate_s(self, missing: float, now: float) -> float:
        """Seconds until Redis's bucket holds `missing` units more, by its last answer
        (0 or less: it may hold them now)."""
        short = min(missing, self.per_minute) - self.level
        return short * 60.0 / self.per_minute - (now - self.level_at)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are available: at once from the reserve, else as
        Redis's last answer says, asking the refiller for them when it may have them."""
        if self._rate.is_failing_open:
            return self.local.wait_s(amount, now)
        missing = self.missing(amount)
        if missing <= 0:
            return 0.0
        wait = self.estimate_s(missing, now)
        if wait > 0:
            return wait
        self.front = max(self.front, amount)
        self.least = min(self.least, amount)
        self._rate.fetch()
        return _FETCH_WAIT_S

    def peek_wait_s(self, amount: float, now: float) -> float:
        """`wait_s` by the reserve and Redis's last answer, asking no fetch. A reserve short
        of `amount` that Redis may fill (or was never asked to) waits no more than the one
        fetch `SharedRate.ready` makes: counted as none, or an upstream not used yet, whose
        reserve is empty, would be passed over for ever while another is free."""
        if self._rate.is_failing_open:
            return self.local.peek_wait_s(amount, now)
        missing = self.missing(amount)
        if missing <= 0:
            return 0.0
        return max(self.estimate_s(missing, now), 0.0)

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` units (a call larger than the bucket overdraws the reserve)."""
        if self._rate.is_failing_open:
            self.local.take(amount, now)
            return
        self.reserve -= amount
        if self.chunk >= 1 and self.reserve < self.chunk / 2:
            # Running low: the next chunk comes before a call has to wait for it. Not
            # below a unit a second, where it would only strand a fraction of a call.
            self._rate.fetch()

    def give_back(self, amount: float) -> None:
        """Return `amount` units spent for a call that was never sent."""
        if self._rate.is_failing_open:
            self.local.give_back(amount)
        else:
            self.reserve += amount


class SharedRate:
    """One upstream's shared buckets and the refiller task that keeps their reserves."""

    def __init__(
        self,
        upstream: str,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        commands: Any,
        prefix: str,
        cooldown: StoreCooldown,
        clock: Clock = SYSTEM_CLOCK,
        retry_s: float = COOLDOWN_S,
    ) -> None:
        self.upstream = upstream
        self._clock = clock
        now = clock.now()
        rpm, tpm = requests_per_minute, tokens_per_minute
        self.requests = SharedBucket(self, rpm, now) if rpm else None
        self.tokens = SharedBucket(self, tpm, now) if tpm else None
        self.keys = bucket_keys(prefix, upstream)
        self._take = commands.register_script(_TAKE_LUA)
        self._give_back = commands.register_script(_GIVE_BACK_LUA)
        self._cooldown = cooldown
        self._retry_s = retry_s
        # Called after each fetch: the limiter's dispatcher starts the calls it let in.
        self.on_refill: Callable[[], None] = lambda: None
        self.is_failing_open = False
        self._was_short = False  # the last fetch did not meet the need
        self._wake = asyncio.Event()
        self._refiller: asyncio.Task[None] | None = None
        self._fetched: asyncio.Future[None] | None = None  # resolved as the next fetch ends
        self._is_taking = False  # a fetch's script is on its way
        self._is_closed = False

    @property
    def is_fetching(self) -> bool:
        """Whether a fetch is asked for or on its way."""
        return self._wake.is_set() or self._fetched is not None or self._is_taking

    def _amounts(self, tokens: int) -> list[tuple[SharedBucket, float]]:
        pairs = ((self.requests, 1.0), (self.tokens, float(tokens)))
        return [(bucket, amount) for bucket, amount in pairs if bucket is not None]

    async def ready(self, tokens: int) -> float:
        """Before a call of `tokens`: when the reserves lack its units and Redis may have
        them, wait for one fetch (shared with the calls asking meanwhile); when Redis is
        short, return at once, for the limiter to wait or refuse by its estimate. The
        seconds it waited (0.0: none)."""
        if self.is_failing_open:
            return 0.0
        now = self._clock.now()
        is_lacking = False
        for bucket, amount in self._amounts(tokens):
            missing = bucket.missing(amount)
            if missing > 0:
                if bucket.estimate_s(missing, now) > 0:
                    return 0.0
                is_lacking = True
        if not is_lacking:
            return 0.0
        for bucket, amount in self._amounts(tokens):
            bucket.asked += amount
            bucket.least = min(bucket.least, amount)
        loop = asyncio.get_running_loop()
        if self._fetched is None or self._fetched.get_loop() is not loop:
            self._fetched = loop.create_future()
        fetched = self._fetched
        self.fetch()
        await asyncio.shield(fetched)
        return self._clock.now() - now

    def fetch(self) -> None:
        """Have the refiller take a chunk (it starts on the running loop, once)."""
        if self._is_closed:
            return
        loop = asyncio.get_running_loop()
        refiller = self._refiller
        if refiller is None or refiller.done() or refiller.get_loop() is not loop:
            # Its event too: one waited on is bound to that loop, and the rate may have
            # outlived it (a test's, a server's), so the new task would die on its wait.
            self._wake = asyncio.Event()
            self._refiller = loop.create_task(self._refill())
        self._wake.set()

    async def _refill(self) -> None:
        while True:
            if self.is_failing_open:
                await self._clock.sleep(self._retry_s)  # then try Redis again
            else:
                await self._wake.wait()
            self._wake.clear()
            await self._fetch_once()

    async def _fetch_once(self) -> None:
        fetched, self._fetched = self._fetched, None
        self._is_taking = True
        try:
            await self._take_chunk()
        finally:
            self._is_taking = False
            _resolve(fetched)

    async def _take_chunk(self) -> None:
        buckets = (self.requests, self.tokens)
        is_waited_for = any(b is not None and b.front > 0 for b in buckets)
        args: list[float] = []
        needs: list[float] = []
        for bucket in buckets:
            if bucket is None:
                args += [0, 0, 0]
                needs.append(0.0)
                continue
            wanted = max(0.0, bucket.asked + bucket.front - bucket.reserve)
            need = wanted  # no call asking: an overdrawn reserve's debt, all at once
            if bucket.least < math.inf:
                need = max(0.0, min(bucket.least, bucket.per_minute) - bucket.reserve)
            is_low = bucket.chunk >= 1 and bucket.reserve < bucket.chunk / 2
            # Failing open, a chunk is asked for all the same: the try of Redis.
            wants = wanted > 0 or is_low or self.is_failing_open
            args += [bucket.per_minute, max(wanted, bucket.chunk) if wants else 0, need]
            needs.append(need)
            bucket.asked = bucket.front = 0.0  # asked again by calls still short
            bucket.least = math.inf
        if not any(args[1::3]):
            return  # met by an earlier fetch since it was asked for
        if self._cooldown.skips():  # Redis just failed to answer another of its users
            self._fail_open("cooling down")
            return
        partial = self._was_short and is_waited_for
        try:
            reply = await self._take(keys=self.keys, args=[*args, int(partial), _KEY_TTL_S])
        except Exception as exc:  # Redis down, hung or refusing: this process's buckets
            self._cooldown.failed(exc)
            self._fail_open(type(exc).__name__)
            return
        self._cooldown.answered()
        now = self._clock.now()
        self._was_short = False
        for i, bucket in enumerate(buckets):
            if bucket is None:
                continue
            granted, level = float(reply[2 * i]), float(reply[2 * i + 1])
            bucket.reserve += granted
            bucket.level, bucket.level_at = level, now
            self._was_short |= granted < needs[i]
        if self.is_failing_open:
            self.is_failing_open = False
            log.info("upstream_limits.shared_restored", extra={"upstream": self.upstream})
        self.on_refill()

    def _fail_open(self, error: str) -> None:
        if self.is_failing_open:
            return
        self.is_failing_open = True
        log.warning(
            "upstream_limits.shared_unavailable",
            extra={"upstream": self.upstream, "error": error, "fallback": "per-process"},
        )
        # The calls that asked while this fetch was on its way wait for the next, which
        # comes only with the retry of Redis: they go on now, as the ones it was for.
        waiting, self._fetched = self._fetched, None
        _resolve(waiting)
        self.on_refill()  # the calls waiting for a fetch go on at this process's rate

    async def aclose(self) -> None:
        """Stop the refiller and give the reserve back (before the Redis client closes)."""
        self._is_closed = True
        # Calls still coming (a flight winding down) go on at this process's own rate:
        # no fetch comes for them now.
        self.is_failing_open = True
        refiller, self._refiller = self._refiller, None
        # One of an earlier loop ended with it (and could not be awaited on this one).
        if refiller is not None and refiller.get_loop() is asyncio.get_running_loop():
            refiller.cancel()
            await asyncio.gather(refiller, return_exceptions=True)
        waiting, self._fetched = self._fetched, None
        _resolve(waiting)
        buckets = (self.requests, self.tokens)
        units = [max(0.0, b.reserve) if b is not None else 0.0 for b in buckets]
        if not any(units):
            return
        args = [
            self.requests.per_minute if self.requests else 0,
            units[0],
            self.tokens.per_minute if self.tokens else 0,
            units[1],
            _KEY_TTL_S,
        ]
        try:
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT_S):
                await self._give_back(keys=self.keys, args=args)
        except Exception as exc:  # best effort: the bucket refills anyway
            log.info(
                "upstream_limits.reserve_kept",
                extra={"upstream": self.upstream, "error": type(exc).__name__},
            )
            return
        for bucket in buckets:
            if bucket is not None:
                bucket.reserve = min(bucket.reserve, 0.0)


def _resolve(fetched: asyncio.Future[None] | None) -> None:
    """End the wait of the calls waiting for `fetched`. One of an ended loop is left: its
    calls ended with that loop, and resolving it would schedule their wake-up there."""
    loop = asyncio.get_running_loop()
    if fetched is not None and not fetched.done() and fetched.get_loop() is loop:
        fetched.set_result(None)


class SharedUpstreamLimiter(UpstreamLimiter):
    """An `UpstreamLimiter` whose rate buckets are `rate`'s, shared through Redis."""

    def __init__(
        self, upstream: str, rate: SharedRate, *, max_concurrency: int, clock: Clock
    ) -> None:
        super().__init__(upstream, max_concurrency=max_concurrency, clock=clock)
        self.rate = rate
        self._requests = rate.requests
        self._tokens = rate.tokens
        rate.on_refill = self._dispatch

    @property
    def is_rate_shared(self) -> bool:
        """Shared, unless fallen open to this process's own buckets while Redis is away."""
        return not self.rate.is_failing_open

    async def acquire(self, *, tokens: int, max_wait_s: float, tenant: str = "") -> float:
        """As `UpstreamLimiter.acquire`, once the reserves hold the call's units or Redis
        has said when they will: the wait for Redis's answer is part of `max_wait_s` (a
        caller's deadline bounds it), and one that spent it all is waited out."""
        fetching_s = await self.rate.ready(tokens)
        if not fetching_s:
            return await super().acquire(tokens=tokens, max_wait_s=max_wait_s, tenant=tenant)
        left_s = max_wait_s - fetching_s
        try:
            return await super().acquire(tokens=tokens, max_wait_s=left_s, tenant=tenant)
        except LimitExceeded as refusal:
            if left_s <= 0 < max_wait_s:  # refused for the time the fetch took
                refusal.is_waited_out = True
            raise


class SharedLimits:
    """The shared rates of the upstreams with `shared_limits`, in one Redis."""

    def __init__(self, commands: Any, *, prefix: str, cooldown: StoreCooldown) -> None:
        self._commands = commands
        self._prefix = prefix
        self._cooldown = cooldown
        self._rates: list[SharedRate] = []

    def limiter(self, config: UpstreamConfig, clock: Clock) -> UpstreamLimiter:
        """The limiter of the upstream `config`, its buckets shared."""
        rate = SharedRate(
            config.name,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
            commands=self._commands,
            prefix=self._prefix,
            cooldown=self._cooldown,
            clock=clock,
        )
        self._rates.append(rate)
        return SharedUpstreamLimiter(
            config.name, rate, max_concurrency=config.max_concurrency, clock=clock
        )

    async def aclose(self) -> None:
        """Stop every refiller and give the reserves back."""
        await asyncio.gather(*(rate.aclose() for rate in self._rates))
