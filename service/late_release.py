"""Releases a shared store refused, retried in the background until they land.

A lease in Redis (a tenant's in-flight slot, a budget reservation) that a call could not
give back when it ended keeps counting until it expires, up to a minute later
(`lease_renewals.LEASE_TTL_S`): a Redis failover of a few seconds at the wrong moment
would hold a tenant at its `max_concurrent_calls` (or its budget) for that long. Each
release that fails is kept here and retried, oldest first, with capped exponential
backoff while the store stays unreachable, until it succeeds or its lease has expired
anyway. One task does the retrying, however many releases wait; at most `max_pending`
wait (past that the oldest is left to expire), so an outage under full load cannot grow
memory without bound. Releases must be idempotent: a release that timed out may still
have happened. A write that is not idempotent by nature (the usage ledger's rows) is
made so by its store, and says through `on_give_up` when it is abandoned. A release the
store refuses for what it is (`refused_for_good`), rather than for being unavailable, is
given up at once: sent again it would fail again, and hold back every release queued
behind it. With a `StoreCooldown`, a release made while the store is left alone (it just
failed to answer) is queued untried, and each try tells the cool-down whether the store
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.store_cooldown import StoreCooldown

log = logging.getLogger("llm_gateway.late_release")

Release = Callable[[], Awaitable[object]]


def _never(_: Exception) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class _Pending:
    release: Release
    expires_at: float  # the event loop's clock
    on_give_up: Callable[[], None] | None


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A failed try of what waits, and whether to log it (`StoreCooldown.failed`)."""

    error: Exception
    is_logged: bool


class LateReleases:
    """Retries failed releases of one store (`store` names it in the logs)."""

    def __init__(
        self,
        store: str,
        *,
        lease_ttl_s: float,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_pending: int = 10_000,
        refused_for_good: Callable[[Exception], bool] = _never,
        cooldown: StoreCooldown | None = None,
    ) -> None:
        self._store = store
        self._cooldown = cooldown
        if cooldown is not None:
            # Another user of the same Redis may be the first to see it answer again.
            cooldown.on_end(self._wake_pending)
        self._refused_for_good = refused_for_good
        self._lease_ttl_s = lease_ttl_s
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._pending: deque[_Pending] = deque()
        self._sending: _Pending | None = None  # the oldest, while a try of it is awaited
        self._max_pending = max_pending
        self._worker: asyncio.Task[None] | None = None
        self._is_closed = False
        self._wake = asyncio.Event()
        self._is_backing_off = False  # the last try of what waits failed
        self.released = 0
        self.dropped = 0
        self.abandoned = 0  # every write given up, however: expired, crowded out, refused

    @property
    def pending(self) -> int:
        """Releases still waiting for the store."""
        return len(self._pending)

    def retry(
        self,
        release: Release,
        *,
        expires_after_s: float | None = None,
        on_give_up: Callable[[], None] | None = None,
        was_refused: bool = True,
    ) -> None:
        """Keep retrying `release` (which just failed) until it succeeds or, after
        `expires_after_s` (the lease's TTL by default), is no use any more; `on_give_up`
        is called if it is abandoned instead (expired, crowded out or closed).

        `was_refused` False: the store did not refuse it, its caller was cancelled while
        it was sent (a call cut at its deadline), or it waits behind such a write: tried
        at once, not after the backoff, unless the store is failing meanwhile.
        """
        loop = asyncio.get_running_loop()
        if self._is_closed:  # a call still ending as the store closed: no worker outlives it
            log.warning("late_release.abandoned", extra={"store": self._store, "releases": 1})
            self._give_up(on_give_up)
            return
        if len(self._pending) >= self._max_pending:
            # The oldest: it expires in the store on its own. Not one being sent: that may
            # still land, and would then be reported given up when it was not.
            at = 1 if self._sending is not None and self._pending[0] is self._sending else 0
            if at < len(self._pending):
                crowded_out = self._pending[at]
                del self._pending[at]
                self._give_up(crowded_out.on_give_up)
                self.dropped += 1
        ttl_s = self._lease_ttl_s if expires_after_s is None else expires_after_s
        self._pending.append(_Pending(release, loop.time() + ttl_s, on_give_up))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._retry_pending())
        if not (was_refused or self._is_store_failing()):
            self._wake_pending()

    def _is_store_failing(self) -> bool:
        """Whether the last try failed (the worker backs off) or the store is left alone."""
        cooling_down = self._cooldown is not None and self._cooldown.is_cooling_down
        return self._is_backing_off or cooling_down

    async def release_now(self, release: Release) -> None:
        """Run `release` now; if the store refuses it, or the caller is cancelled while
        it runs (it may not have reached the store), retry it in the background. In a
        cool-down it is queued without a try."""
        if self._cooldown is not None and self._cooldown.skips():
            self.retry(release)
            return
        try:
            await release()
        except Exception as exc:
            is_logged = self._answered(exc)
            if self._refused_for_good(exc):
                if is_logged:
                    self._log_refusal(exc)
                self._give_up(None)
                return
            if is_logged:
                log.warning(
                    "late_release.deferred",
                    extra={"store": self._store, "error": type(exc).__name__},
                )
            self.retry(release)
        except BaseException:
            self.retry(release, was_refused=False)
            raise
        else:
            self.store_answered()

    def abandon(self, on_give_up: Callable[[], None]) -> None:
        """Give up a write that failed for good before it ever waited here, counted with
        the others abandoned: `on_give_up` is called at once."""
        self._give_up(on_give_up)

    def store_answered(self) -> None:
        """The store just took a write: its cool-down is over, and what waits is retried
        now, not after the backoff."""
        self._answered(None)
        self._wake_pending()

    def _wake_pending(self) -> None:
        if self._pending:
            self._wake.set()

    async def _retry_pending(self) -> None:
        delay = self._first_delay_s
        while self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            refusal = await self._release_in_order()
            self._is_backing_off = refusal is not None
            if refusal is None:
                delay = self._first_delay_s
                continue
            delay = min(delay * 2, self._max_delay_s)
            if not refusal.is_logged:
                continue
            log.warning(
                "late_release.store_unavailable",
                extra={
                    "store": self._store,
                    "pending": len(self._pending),
                    "error": type(refusal.error).__name__,
                    "retry_in_s": delay,
                },
            )

    async def _release_in_order(self) -> _Refusal | None:
        """Send what waits, oldest first, until the store refuses one (returned)."""
        loop = asyncio.get_running_loop()
        released = 0
        refusal = None
        while self._pending:
            item = self._pending[0]
            if loop.time() < item.expires_at:
                self._sending = item
                try:
                    await item.release()
                except Exception as exc:
                    is_logged = self._answered(exc)
                    if not self._refused_for_good(exc):
                        refusal = _Refusal(exc, is_logged=is_logged)
                        break
                    if is_logged:
                        self._log_refusal(exc)
                    self._give_up(item.on_give_up)
                else:
                    self._answered(None)
                    released += 1
                    self.released += 1
                finally:
                    self._sending = None
            else:
                self._give_up(item.on_give_up)
            if self._pending and self._pending[0] is item:  # not dropped meanwhile
                self._pending.popleft()
        if released:
            log.info("late_release.released", extra={"store": self._store, "releases": released})
        return refusal

    async def aclose(self, *, flush_s: float = 1.0) -> None:
        """Stop retrying, after one last try (at most `flush_s`) for what waits; what is
        left then, and any release that fails from now on, expires in the store."""
        self._is_closed = True
        # One of an earlier loop ended with it (and could not be awaited on this one).
        if self._worker is not None and self._worker.get_loop() is asyncio.get_running_loop():
            self._worker.cancel()
            # wait, not `await` under suppress(CancelledError): that would also swallow a
            # cancellation of aclose itself.
            await asyncio.wait([self._worker])
        if self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_s):
                    await self._release_in_order()
        if self._pending:
            log.warning(
                "late_release.abandoned", extra={"store": self._store, "releases": self.pending}
            )
            for item in self._pending:
                self._give_up(item.on_give_up)
            self._pending.clear()

    def _answered(self, exc: Exception | None) -> bool:
        """Tell the cool-down, if any, how the store answered a try (`exc`: it failed);
        whether to log the failure (`StoreCooldown.failed`)."""
        if self._cooldown is None:
            return True
        if exc is None:
            self._cooldown.answered()
            return True
        return self._cooldown.failed(exc)

    def _log_refusal(self, exc: Exception) -> None:
        log.error("late_release.refused", extra={"store": self._store, "error": str(exc)})

    def _give_up(self, on_give_up: Callable[[], None] | None) -> None:
        self.abandoned += 1
        if on_give_up is not None:
            on_give_up()
