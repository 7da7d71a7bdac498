"""Per-upstream limits: concurrency, requests and tokens per minute, learned slow-downs.

Each upstream has one `UpstreamLimiter`. Before an attempt the pool asks it for a slot;
the limiter waits (never longer than the caller can afford) for a free connection slot,
for its request and token buckets to refill, and for any pause the upstream asked for.
It also learns from the upstream: `X-RateLimit-Remaining` running low spaces requests
out over what is left of the window, zero pauses until `X-RateLimit-Reset`, and a 429's
`Retry-After` pauses for that long, so the gateway slows down before the provider
starts refusing.

Calls waiting for a concurrency slot queue by tenant and take turns: a slot that frees goes
to the next tenant in turn with a call waiting, first come first served within a tenant.
A tenant with hundreds of calls queued (a big batch) then delays another tenant's call by
at most one call's turn, not by its whole queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.clock import SYSTEM_CLOCK, Clock
from service.errors import UpstreamRateLimited
from service.upstream.types import RateLimitHints

DEFAULT_MAX_CONCURRENCY = 50
LOW_REMAINING_FRACTION = 0.1  # below this share of the limit left, space requests out
MAX_PAUSE_S = 60.0  # seconds: the longest an upstream's hint may pause us


class LimitExceeded(UpstreamRateLimited):
    """The gateway's own limit for an upstream would make the caller wait too long."""

    reason = "UPSTREAM_LIMIT"

    def __init__(self, upstream: str, *, wait_s: float, what: str) -> None:
        super().__init__(
            f"upstream {upstream!r} is at its {what} limit",
            upstream=upstream,
            retry_after_s=wait_s,
        )
        self.what = what


@dataclass(slots=True)
class TokenBucket:
    """`per_minute` units, refilled continuously; `capacity` is one minute's worth."""

    per_minute: float
    level: float
    updated_at: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> TokenBucket:
        """A bucket that starts full."""
        return cls(per_minute, per_minute, now)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated_at)
        self.level = min(self.per_minute, self.level + elapsed * self.per_minute / 60.0)
        self.updated_at = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are available (amount is capped at capacity)."""
        self._refill(now)
        missing = min(amount, self.per_minute) - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.per_minute

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` units (the level may go negative for oversize requests)."""
        self._refill(now)
        self.level -= amount


class UpstreamLimiter:
    """Concurrency, rate and learned limits of one upstream."""

    def __init__(
        self,
        upstream: str,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.upstream = upstream
        self.max_concurrency = max_concurrency
        self._clock = clock
        now = clock.now()
        self._requests = TokenBucket.full(requests_per_minute, now) if requests_per_minute else None
        self._tokens = TokenBucket.full(tokens_per_minute, now) if tokens_per_minute else None
        self.in_flight = 0
        # Waiters by tenant, the tenants in turn order (dicts keep insertion order).
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self.paused_until = 0.0  # monotonic
        self.spacing_s = 0.0  # seconds between starts while the upstream runs low
        self._spacing_until = 0.0
        self._last_start = float("-inf")

    def wait_s(self, tokens: int) -> tuple[float, str]:
        """Seconds before a call of `tokens` may start by rate, and which limit says so."""
        now = self._clock.now()
        waits = [(max(0.0, self.paused_until - now), "upstream-requested pause")]
        if self.spacing_s > 0 and now < self._spacing_until:
            # The learned rate ends with its window: no wait outlasts that.
            next_start = min(self._last_start + self.spacing_s, self._spacing_until)
            waits.append((max(0.0, next_start - now), "learned rate"))
        if self._requests is not None:
            waits.append((self._requests.wait_s(1, now), "requests-per-minute"))
        if self._tokens is not None:
            waits.append((self._tokens.wait_s(tokens, now), "tokens-per-minute"))
        return max(waits)

    @property
    def queued(self) -> int:
        """Calls waiting for a concurrency slot."""
        return sum(len(waiters) for waiters in self._waiters.values())

    async def acquire(self, *, tokens: int, max_wait_s: float, tenant: str = "") -> float:
        """Wait for a slot for one call of about `tokens` tokens, or raise `LimitExceeded`;
        the seconds it waited (0.0: none).

        Never waits longer than `max_wait_s`: past it the caller is told at once. A call
        that queues for a concurrency slot takes its `tenant`'s turn (module docstring).
        """
        started = self._clock.now()
        has_waited = False
        while True:
            wait, what = self.wait_s(tokens)
            if wait <= 0:
                break
            if wait > max_wait_s - (self._clock.now() - started):
                raise LimitExceeded(self.upstream, wait_s=wait, what=what)
            await self._clock.sleep(wait)
            has_waited = True
        if self.in_flight >= self.max_concurrency or self._waiters:
            left = max_wait_s - (self._clock.now() - started)
            if left <= 0:
                raise LimitExceeded(self.upstream, wait_s=0.1, what="concurrency")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiters.setdefault(tenant, deque())
            queue.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), left)
            except TimeoutError:
                if waiter.done():  # the slot was handed over just as we gave up
                    self.release()
                else:
                    waiter.cancel()
                raise LimitExceeded(self.upstream, wait_s=0.1, what="concurrency") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.release()
                else:
                    waiter.cancel()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
                if not queue and self._waiters.get(tenant) is queue:
                    del self._waiters[tenant]
            if self.wait_s(tokens)[0] > 0:
                # While this call queued, a 429 paused the upstream or the calls ahead of
                # it spent the buckets: give the slot back and wait for the rate again.
                self.release()
                await self.acquire(
                    tokens=tokens,
                    max_wait_s=max_wait_s - (self._clock.now() - started),
                    tenant=tenant,
                )
                return self._clock.now() - started
            has_waited = True
        else:
            self.in_flight += 1
        now = self._clock.now()
        self._last_start = now
        if self._requests is not None:
            self._requests.take(1, now)
        if self._tokens is not None:
            self._tokens.take(tokens, now)
        return now - started if has_waited else 0.0

    def release(self) -> None:
        """One call ended: hand its slot to the next tenant in turn with a call waiting."""
        for tenant, queue in list(self._waiters.items()):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    # The tenant served goes to the back of the turn order.
                    del self._waiters[tenant]
                    if queue:
                        self._waiters[tenant] = queue
                    waiter.set_result(None)  # the slot passes on; in_flight is unchanged
                    return
            del self._waiters[tenant]
        self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def slot(
        self, *, tokens: int, max_wait_s: float, tenant: str = ""
    ) -> AsyncIterator[None]:
        """`acquire` … `release` around one call."""
        await self.acquire(tokens=tokens, max_wait_s=max_wait_s, tenant=tenant)
        try:
            yield
        finally:
            self.release()

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds` (at most `MAX_PAUSE_S`), e.g. after a 429."""
        until = self._clock.now() + min(max(0.0, seconds), MAX_PAUSE_S)
        self.paused_until = max(self.paused_until, until)

    def learn(self, hints: RateLimitHints, *, now_epoch_s: float) -> None:
        """Adapt to the upstream's `X-RateLimit-*` headers from its last answer."""
        if hints.remaining is None:
            return
        reset_in = hints.seconds_to_reset(now_epoch_s)
        if hints.remaining <= 0:
            self.pause(reset_in if reset_in is not None else 1.0)
            return
        is_low = hints.limit is not None and hints.remaining < hints.limit * LOW_REMAINING_FRACTION
        if is_low and reset_in:
            # Spread what is left of the window over the time left in it.
            self.spacing_s = reset_in / hints.remaining
            self._spacing_until = self._clock.now() + min(reset_in, MAX_PAUSE_S)
        else:
            self.spacing_s = 0.0


__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "LimitExceeded",
    "TokenBucket",
    "UpstreamLimiter",
]
