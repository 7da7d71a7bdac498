"""Leaving a Redis that does not answer alone for a while, so it does not slow every call.

A hung Redis (a partition dropping packets, a stuck primary, a long fork) answers
nothing, so each operation on it waits out its whole timeout before failing, and a call
makes several: its key lookup, tenant slot and budget reservation, then its usage row and
the releases. After an operation times out or cannot connect, the store is left alone
for `COOLDOWN_S`: its users do at once what they do when it fails (admit, fail open or
closed), and writes that are retried anyway go straight to their `LateReleases` queue.
Past the cool-down one operation is let through to try Redis, while the others go on
skipping it until that one is answered or `COOLDOWN_S` has passed again; the first
operation Redis answers, a retried write's included, ends the cool-down. An error reply
(`READONLY`, a script error) is an answer: Redis is up, and is tried as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis.exceptions import ResponseError

from service.clock import SYSTEM_CLOCK, Clock
from service.redis_errors import is_unanswered

log = logging.getLogger("llm_gateway.store")

# As the response cache's default `error_cooldown_s`: a second of skipped Redis after it
# is back (budgets and tenant limits open, Redis keys refused) at most.
COOLDOWN_S = 1.0


class StoreCooldown:
    """Whether to try one Redis now (`store` names it in the logs)."""

    def __init__(self, store: str, *, cooldown_s: float = COOLDOWN_S, clock: Clock = SYSTEM_CLOCK):
        self._store = store
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._until: float | None = None  # None: Redis answers
        self.skipped = 0  # operations not tried, this cool-down
        self._on_end: list[Callable[[], None]] = []

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a cool-down ends: what waits for Redis can go now."""
        self._on_end.append(callback)

    @property
    def is_cooling_down(self) -> bool:
        """Whether Redis last failed to answer."""
        return self._until is not None

    def skips(self) -> bool:
        """Whether to leave Redis alone now. Past the cool-down the caller is let through
        to try it, and the cool-down runs again for the others meanwhile."""
        if self._until is None:
            return False
        now = self._clock.now()
        if now >= self._until:
            self._until = now + self._cooldown_s
            return False
        self.skipped += 1
        return True

    def failed(self, exc: BaseException) -> None:
        """An operation failed with `exc`: a cool-down starts (or runs again) if Redis
        did not answer; an error reply shows it is up."""
        if not is_unanswered(exc):
            if isinstance(exc, ResponseError):
                self.answered()
            return
        if self._until is None:
            self.skipped = 0
            log.warning(
                "store.cooldown_started",
                extra={
                    "store": self._store,
                    "error": type(exc).__name__,
                    "cooldown_s": self._cooldown_s,
                },
            )
        self._until = self._clock.now() + self._cooldown_s

    def answered(self) -> None:
        """Redis answered an operation: the cool-down, if any, is over."""
        if self._until is not None:
            self._until = None
            log.info("store.cooldown_ended", extra={"store": self._store, "skipped": self.skipped})
            for callback in self._on_end:
                callback()
