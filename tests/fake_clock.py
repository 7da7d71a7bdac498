"""A monotonic clock for tests: it moves only when told to, and `sleep` moves it at once."""

from __future__ import annotations


class FakeClock:
    """`service.clock.Clock` with time in `t` (seconds) and every sleep kept in `slept`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        """The fake monotonic time."""
        return self.t

    async def sleep(self, seconds: float) -> None:
        """Advance the fake time by `seconds` without waiting."""
        self.slept.append(seconds)
        self.t += seconds

    def advance(self, seconds: float) -> None:
        """Move the fake time forward."""
        self.t += seconds
