"""The local model's one slot, shared by the worker processes of `serve --workers N`.

llama-cpp-python's server generates one answer at a time, and each worker's limiter lets
one call at a time go to it (`max_concurrency: 1`): N workers sent it up to N at once. It
queued them itself, first come first served, their wait counted as the model's time
(against its 300 s timeout) rather than as `queued`, and a cancelled one was not let go
while it waited there. So a call to it also takes the machine's turn: an exclusive
`flock` on a file the supervisor made (`LocalModelState.turns_path`), which the kernel lets
go when its holder dies, so a worker killed mid-call never keeps it.

A waiting worker asks again every `_POLL_S`; one that just gave the turn up waits that long
before taking it again, so that a worker whose own line is long hands it on to the others
rather than keeping it. Turns between workers are not first come first served: a worker
that has waited is only likelier to be next.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path

from service.clock import SYSTEM_CLOCK, Clock
from service.errors import ShuttingDown
from service.limits import LimitExceeded, UpstreamLimiter

_POLL_S = 0.01
_CONCURRENCY = "concurrency"


class MachineTurns:
    """One process's hold on the turn every process of the machine takes, one at a time."""

    def __init__(self, path: Path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._clock = clock
        self._given_at = -math.inf
        self.is_held = False

    def try_take(self) -> bool:
        """Take the turn if no process holds it, unless this one gave it up a moment ago."""
        if self._clock.now() - self._given_at < _POLL_S:
            return False  # the others' turn first
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.is_held = True
        return True

    def give(self) -> None:
        """Let the turn go, if held."""
        if self.is_held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.is_held = False
            self._given_at = self._clock.now()

    def close(self) -> None:
        """Let the turn go and close the file."""
        self.give()
        os.close(self._fd)


class MachineTurnLimiter(UpstreamLimiter):
    """An `UpstreamLimiter` whose calls also take the machine's turn (`MachineTurns`) once
    this process's own line lets them start; the wait counts as queued, within the call's
    `max_wait_s`."""

    def __init__(
        self, upstream: str, turns: MachineTurns, *, max_concurrency: int, clock: Clock
    ) -> None:
        super().__init__(upstream, max_concurrency=max_concurrency, clock=clock)
        self._turns = turns

    async def acquire(self, *, tokens: int, max_wait_s: float, tenant: str = "") -> float:
        """As `UpstreamLimiter.acquire`, then the machine's turn; `LimitExceeded` when that
        does not come within what is left of `max_wait_s`."""
        waited = await super().acquire(tokens=tokens, max_wait_s=max_wait_s, tenant=tenant)
        if self._turns.try_take():
            return waited
        started = self._clock.now()
        try:
            while not self._turns.try_take():
                if self.is_stopping:
                    raise ShuttingDown()
                if waited + self._clock.now() - started >= max_wait_s:
                    refusal = LimitExceeded(
                        self.upstream, wait_s=_POLL_S, what=_CONCURRENCY, is_replica_local=True
                    )
                    # Waited in line all its time: a deadline that bounded it ends the call.
                    refusal.is_waited_out = True
                    raise refusal
                await self._clock.sleep(_POLL_S)
        except BaseException:
            self.give_back(tokens)  # never sent: its slot and units go back
            raise
        return waited + self._clock.now() - started

    def release(self) -> None:
        """One call ended: the machine's turn goes, then this process's slot."""
        self._turns.give()
        super().release()


__all__ = ["MachineTurnLimiter", "MachineTurns"]
