"""Injected time: a monotonic clock with sleep, and the caller's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Monotonic time and sleep, injected so tests never patch `asyncio.sleep`."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`."""
        ...


class SystemClock:
    """The real clock."""

    # `time.monotonic` itself, not a method calling it: read several times a call, and a
    # builtin costs no Python frame.
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on the event loop."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


def covered_s(intervals: Iterable[tuple[float, float]]) -> float:
    """The time `intervals` ((start, end) on one clock) cover together, each moment
    once: a batch's or a summary's calls wait on their upstreams at the same time."""
    if isinstance(intervals, list) and len(intervals) == 1:  # a call's one wait, usually
        only: tuple[float, float] = intervals[0]
        return only[1] - only[0]
    total = 0.0
    reached = float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the caller stops waiting (`expires_at` on `clock`, None: never)."""

    expires_at: float | None
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def after(cls, seconds: float | None, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        """A deadline `seconds` from now (None: no deadline)."""
        return cls(None if seconds is None else clock.now() + seconds, clock)

    def remaining_s(self) -> float | None:
        """Seconds left (may be negative), or None without a deadline."""
        if self.expires_at is None:
            return None
        return self.expires_at - self.clock.now()

    def bound(self, timeout_s: float) -> float:
        """`timeout_s` cut to the time left."""
        if self.expires_at is None:
            return timeout_s
        return min(timeout_s, self.expires_at - self.clock.now())

    @property
    def has_expired(self) -> bool:
        """Whether the caller has stopped waiting."""
        left = self.remaining_s()
        return left is not None and left <= 0
