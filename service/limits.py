"""Per-upstream limits: concurrency, requests and tokens per minute, learned slow-downs.

Each upstream has one `UpstreamLimiter`. Before an attempt the pool asks it for a slot;
the limiter waits (never longer than the caller can afford) for a free connection slot,
for its request and token buckets to refill, and for any pause the upstream asked for.
The buckets are this process's own, unless the upstream has `shared_limits`: then they
are kept in Redis for every process (`service.shared_limits`). It also learns from the
upstream: `X-RateLimit-Remaining` running low spaces requests out over what is left of
the window, zero pauses until `X-RateLimit-Reset`, and a 429's `Retry-After` pauses for
that long, so the gateway slows down before the provider starts refusing.

A call that cannot start at once, for the rate or for a slot, queues by tenant, and the
calls take turns: each start goes to the next tenant in turn with a call waiting, its
oldest call (first come first served within a tenant). A tenant with hundreds of calls
queued (a big batch) then delays another tenant's call by about one start, not by its
whole queue. One dispatcher hands the starts out (`_dispatch`): it starts the
call whose turn it is as soon as the limits allow, and runs when a slot frees, when a
waiter leaves, and on one timer armed for when the rate lets that call start. Only that
call is looked at: a call that needs more tokens than the bucket holds waits for them
and nobody skips it, so big calls are not starved by small ones (a call larger than the
bucket waits for a full bucket and overdraws it). A pause or learned spacing that comes
while calls wait holds them all, as the dispatcher reads the limits afresh each time.

Once the server stops (`begin_stopping`) nobody waits: the calls in line are refused with
`ShuttingDown`, unsent, and so is any call that would wait from then on, while one that
can start at once still does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from service.clock import SYSTEM_CLOCK, Clock
from service.errors import ShuttingDown, UpstreamRateLimited
from service.upstream.types import RateLimitHints

DEFAULT_MAX_CONCURRENCY = 50
LOW_REMAINING_FRACTION = 0.1  # below this share of the limit left, space requests out
MAX_PAUSE_S = 60.0  # seconds: the longest an upstream's hint may pause us


class LimitExceeded(UpstreamRateLimited):
    """The gateway's own limit for an upstream would make the caller wait too long.

    `is_replica_local`: the limit is this process's alone (its `max_concurrency`, or a
    per-minute rate kept in memory), so another replica may have room; a pause or learned
    pace the upstream asked for, or a rate shared through Redis, is the same everywhere.

    `is_waited_out`: the call waited in line all the time it was given and had not
    started, rather than being refused, at once or as its turn came, for a wait the limit
    reckoned longer than that time.
    """

    reason = "UPSTREAM_LIMIT"

    def __init__(
        self, upstream: str, *, wait_s: float, what: str, is_replica_local: bool = False
    ) -> None:
        super().__init__(
            f"upstream {upstream!r} is at its {what} limit",
            upstream=upstream,
            retry_after_s=wait_s,
        )
        self.what = what
        self.is_replica_local = is_replica_local
        self.is_waited_out = False


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
        return self.peek_wait_s(amount, now)

    def peek_wait_s(self, amount: float, now: float) -> float:
        """`wait_s`, changing nothing."""
        refilled = self.level + max(0.0, now - self.updated_at) * self.per_minute / 60.0
        missing = min(amount, self.per_minute) - min(self.per_minute, refilled)
        return 0.0 if missing <= 0 else missing * 60.0 / self.per_minute

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` units (the level may go negative for oversize requests)."""
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Return `amount` units spent for a call that was never sent."""
        self.level = min(self.per_minute, self.level + amount)


class RateBucket(Protocol):
    """What the limiter asks of a rate bucket: a `TokenBucket`, or one shared through
    Redis (`service.shared_limits`)."""

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are available (0.0: now)."""
        ...

    def peek_wait_s(self, amount: float, now: float) -> float:
        """`wait_s` by what this process holds, changing nothing (no fetch asked for)."""
        ...

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` units."""
        ...

    def give_back(self, amount: float) -> None:
        """Return `amount` units spent for a call that was never sent."""
        ...


def _bucket_wait_s(bucket: RateBucket, amount: float, now: float, is_peek: bool) -> float:
    return bucket.peek_wait_s(amount, now) if is_peek else bucket.wait_s(amount, now)


# The limits a call waits for, as `LimitExceeded.what` names them: these three are the
# gateway's own, the pause and learned rate are the upstream's.
_CONCURRENCY = "concurrency"
_REQUESTS_PER_MINUTE = "requests-per-minute"
_TOKENS_PER_MINUTE = "tokens-per-minute"
_RATES = (_REQUESTS_PER_MINUTE, _TOKENS_PER_MINUTE)

# What `wait_s` finds with nothing to wait for, as its list of waits would give it.
_NO_WAIT = (0.0, "upstream-requested pause")


# eq=False: a waiter leaving is found in its queue by identity, not by a Python call
# comparing the fields of each one passed over (thousands queued leave in any order).
@dataclass(slots=True, eq=False)
class _Waiter:
    """A call queued to start: resolved when it starts, or with its refusal."""

    future: asyncio.Future[None]
    tokens: int
    deadline: float  # on the limiter's clock: refused rather than started after it
    # Set as it starts: the start before its own and its own, for the learned rate to go
    # back to if the call never goes on.
    previous_start: float = float("-inf")
    started_at: float = float("-inf")


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
        self._requests: RateBucket | None = (
            TokenBucket.full(requests_per_minute, now) if requests_per_minute else None
        )
        self._tokens: RateBucket | None = (
            TokenBucket.full(tokens_per_minute, now) if tokens_per_minute else None
        )
        self.in_flight = 0
        # Waiters by tenant, the tenants in turn order. An OrderedDict, not a dict: a dict
        # whose first keys were deleted scans past their holes to find its first, and
        # thousands of tenants served in turn made each start slower than the last.
        self._waiters: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._timer: asyncio.Task[None] | None = None
        self._timer_due = 0.0
        self._is_dispatch_due = False
        self.paused_until = 0.0  # monotonic
        self.spacing_s = 0.0  # seconds between starts while the upstream runs low
        self._spacing_until = 0.0
        self._last_start = float("-inf")
        self.is_stopping = False

    def wait_s(self, tokens: int, *, is_peek: bool = False) -> tuple[float, str]:
        """Seconds before a call of `tokens` may start by rate, and which limit says so;
        `is_peek`: by what this process holds, changing nothing (`RateBucket.peek_wait_s`)."""
        now = self._clock.now()
        if (
            self._requests is None
            and self._tokens is None
            and self.spacing_s <= 0
            and self.paused_until <= now
        ):
            return _NO_WAIT  # the usual upstream: no per-minute limits, pause or spacing
        waits = [(max(0.0, self.paused_until - now), "upstream-requested pause")]
        if self.spacing_s > 0 and now < self._spacing_until:
            # The learned rate ends with its window: no wait outlasts that.
            next_start = min(self._last_start + self.spacing_s, self._spacing_until)
            waits.append((max(0.0, next_start - now), "learned rate"))
        if self._requests is not None:
            waits.append((_bucket_wait_s(self._requests, 1, now, is_peek), _REQUESTS_PER_MINUTE))
        if self._tokens is not None:
            waits.append((_bucket_wait_s(self._tokens, tokens, now, is_peek), _TOKENS_PER_MINUTE))
        return max(waits)

    def starts_now(self, tokens: int) -> bool:
        """Whether a call of `tokens` would start at once: nobody in line, a free slot,
        its units at hand and no pause. Changes nothing, so a pool may ask of each route."""
        if self._waiters or self.in_flight >= self.max_concurrency:
            return False
        return self.wait_s(tokens, is_peek=True)[0] <= 0

    def expected_wait_s(self, tokens: int) -> float:
        """At least how long a call of `tokens` would wait here (0.0: for a slot only, or
        not at all), as `starts_now` reads it: changing nothing."""
        return self._wait_in_line(tokens, is_peek=True)[0]

    @property
    def queued(self) -> int:
        """Calls waiting to start, for a slot or for the rate."""
        return sum(len(waiters) for waiters in self._waiters.values())

    async def acquire(self, *, tokens: int, max_wait_s: float, tenant: str = "") -> float:
        """Wait for a slot for one call of about `tokens` tokens, or raise `LimitExceeded`;
        the seconds it waited (0.0: none).

        Never waits longer than `max_wait_s`: past it the caller is told at once. A call
        that cannot start at once takes its `tenant`'s turn (module docstring).
        """
        if not self._waiters and self.in_flight < self.max_concurrency:
            now = self._clock.now()
            if (
                self._requests is None
                and self._tokens is None
                and self.spacing_s <= 0
                and self.paused_until <= now
            ):
                # The usual upstream (no per-minute limits, pause or spacing): `wait_s` and
                # `_start` written out, on one reading of the clock (every call comes here).
                self.in_flight += 1
                self._last_start = now
                return 0.0
            wait, what = self.wait_s(tokens)
            if wait <= 0:
                self._start(tokens)
                return 0.0
        else:
            wait, what = self._wait_in_line(tokens)
        if wait > max_wait_s or max_wait_s <= 0:
            raise self._refusal(max(0.1, wait), what)
        if self.is_stopping:
            raise ShuttingDown()
        started = self._clock.now()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), tokens, started + max_wait_s)
        self._waiters.setdefault(tenant, deque()).append(waiter)
        self._dispatch()  # first in line: arm the timer for when the rate allows it
        granted = waiter.future
        try:
            try:
                # Not `wait_for`: in Python 3.11 it returns a result that lands as the call
                # is cancelled, swallowing the cancellation, and the call would go on.
                async with asyncio.timeout(max_wait_s):
                    await asyncio.shield(granted)
            except TimeoutError:
                if not granted.done() and not self._is_timed(waiter):
                    wait, what = self._wait_in_line(tokens)
                    self._withdraw(tenant, waiter)
                    refusal = self._refusal(max(0.1, wait), what)
                    refusal.is_waited_out = True
                    raise refusal from None
                # Its turn is due by its deadline (the timer and this timeout fire about
                # together): the dispatcher's verdict, start or refusal, stands.
                await asyncio.shield(granted)
        except BaseException:
            if not granted.done():
                self._withdraw(tenant, waiter)
            elif not granted.cancelled() and granted.exception() is None:
                self._unstart(waiter)
            raise
        granted.result()  # the dispatcher's refusal, when the call's turn came too late
        if self.is_stopping:  # started as the server began stopping, before it ran on
            self._unstart(waiter)
            raise ShuttingDown()
        return self._clock.now() - started

    def begin_stopping(self) -> None:
        """The server is stopping: the calls waiting to start are refused with
        `ShuttingDown`, having taken nothing, and so is any call that would wait from now
        on; one that can start at once still does.

        Nothing of theirs was sent, and another replica may take them at once: waiting on
        here (for minutes, at the local model's one slot) they would be sent into the
        drain, or cut at the grace's end.
        """
        self.is_stopping = True
        waiters = [waiter for queue in self._waiters.values() for waiter in queue]
        self._waiters.clear()
        for waiter in waiters:
            waiter.future.set_exception(ShuttingDown())
        self._dispatch()  # nobody left to wake: its timer is cancelled

    @property
    def is_rate_shared(self) -> bool:
        """Whether the per-minute buckets are every replica's (in Redis), not this process's."""
        return False

    def _refusal(self, wait_s: float, what: str) -> LimitExceeded:
        """The refusal of a call that `what` would hold `wait_s`, replica-local when only
        this process's own slots or buckets hold it."""
        is_own = what == _CONCURRENCY or (what in _RATES and not self.is_rate_shared)
        return LimitExceeded(self.upstream, wait_s=wait_s, what=what, is_replica_local=is_own)

    def _start(self, tokens: int) -> None:
        self.in_flight += 1
        now = self._clock.now()
        self._last_start = now
        if self._requests is not None:
            self._requests.take(1, now)
        if self._tokens is not None:
            self._tokens.take(tokens, now)

    def _unstart(self, waiter: _Waiter) -> None:
        """A call started for a waiter that had gone: give its units and slot back."""
        if self._last_start == waiter.started_at:  # no call started after it
            self._last_start = waiter.previous_start
        self.give_back(waiter.tokens)

    def give_back(self, tokens: int) -> None:
        """A call that `acquire` started but that will not be sent (of `tokens`): its
        bucket units and its slot go back, as if it had never started."""
        if self._requests is not None:
            self._requests.give_back(1)
        if self._tokens is not None:
            self._tokens.give_back(tokens)
        self.release()

    def _wait_in_line(self, tokens: int, *, is_peek: bool = False) -> tuple[float, str]:
        """At least how long a call of `tokens` queued now waits (0.0: for a slot only),
        and the limit that holds it: its own rate wait, or the first in line's."""
        wait = self.wait_s(tokens, is_peek=is_peek)
        if self._waiters and self.in_flight < self.max_concurrency:
            first = next(iter(self._waiters.values()))[0]
            wait = max(wait, self.wait_s(first.tokens, is_peek=is_peek), key=lambda w: w[0])
        return wait if wait[0] > 0 else (0.0, _CONCURRENCY)

    def _is_timed(self, waiter: _Waiter) -> bool:
        """Whether the dispatcher's timer will start or refuse `waiter` by its deadline:
        it is first in line with a free slot, so the timer is armed for its start."""
        if not self._waiters or self.in_flight >= self.max_concurrency:
            return False
        return (
            self._timer is not None
            and self._timer_due <= waiter.deadline
            and next(iter(self._waiters.values()))[0] is waiter
        )

    def _withdraw(self, tenant: str, waiter: _Waiter) -> None:
        """A waiter gave up (timed out, cancelled): it leaves, and its turn passes on."""
        waiter.future.cancel()
        queue = self._waiters.get(tenant)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiters[tenant]
        self._dispatch()

    def _dispatch(self) -> None:
        """Start the calls whose turn it is while the limits allow; when the rate holds
        the next one, arm the timer for when it may start."""
        self._is_dispatch_due = False
        while self._waiters:
            if self.in_flight >= self.max_concurrency:
                break  # a release dispatches again
            tenant, queue = next(iter(self._waiters.items()))
            waiter = queue[0]
            wait, what = self.wait_s(waiter.tokens)
            if wait > 0 and self._clock.now() + wait <= waiter.deadline:
                self._arm_timer(wait)
                return
            queue.popleft()
            if wait > 0:
                # Its turn comes too late for it: refused, and its tenant keeps the turn.
                if not queue:
                    del self._waiters[tenant]
                waiter.future.set_exception(self._refusal(wait, what))
                continue
            if queue:  # the tenant served goes to the back of the turn order
                self._waiters.move_to_end(tenant)
            else:
                del self._waiters[tenant]
            waiter.previous_start = self._last_start
            self._start(waiter.tokens)
            waiter.started_at = self._last_start
            waiter.future.set_result(None)
        if self._timer is not None and not self._waiters:
            self._timer.cancel()  # nobody left to wake
            self._timer = None

    def _arm_timer(self, wait: float) -> None:
        due = self._clock.now() + wait
        if self._timer is not None:
            if self._timer_due <= due:
                return  # it wakes first, and the dispatcher re-arms it
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().create_task(self._wake_after(wait))

    async def _wake_after(self, wait: float) -> None:
        await self._clock.sleep(wait)
        self._timer = None
        self._dispatch()

    def release(self) -> None:
        """One call ended: its slot goes to the next call in turn."""
        self.in_flight -= 1
        if self._waiters and not self._is_dispatch_due:
            # Soon, not now: the caller may still be reading the limits the call's answer
            # set (a 429's pause, rate-limit headers), which the next start must honour.
            self._is_dispatch_due = True
            asyncio.get_running_loop().call_soon(self._dispatch)

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
    "RateBucket",
    "TokenBucket",
    "UpstreamLimiter",
]
