"""A monotonic clock for tests: it moves only when told to, and `sleep` moves it at once."""

from __future__ import annotations

import asyncio


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


class SteppedClock(FakeClock):
    """A `FakeClock` whose sleeps end only when the test moves time past them, so calls
    that wait stay waiting until the test says time has passed."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake time reaches now + `seconds`."""
        self.slept.append(seconds)
        woken = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, woken))
        await woken

    def advance(self, seconds: float) -> None:
        """Move the fake time forward and wake the sleeps it ends."""
        self.t += seconds
        for until, woken in self._sleepers:
            if until <= self.t and not woken.done():
                woken.set_result(None)
        self._sleepers = [(u, w) for u, w in self._sleepers if not w.done()]
