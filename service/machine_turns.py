"""The local model's one slot, shared by the worker processes of `serve --workers N`.

llama-cpp-python's server generates one answer at a time, and each worker's limiter lets
one call at a time go to it (`max_concurrency: 1`): N workers sent it up to N at once. It
queued them itself, first come first served, their wait counted as the model's time
(against its 300 s timeout) rather than as `queued`, and a cancelled one was not let go
while it waited there. So a call to it also takes the machine's turn: an exclusive lock on
a file the supervisor made (`TurnsFile`), which the kernel lets go when its holder dies, so
a worker killed mid-call never keeps it.

A waiting worker asks again every `_POLL_S`; one that just gave the turn up waits that long
before taking it again, so that a worker whose own line is long hands it on to the others
rather than keeping it. Turns between workers are not first come first served: a worker
that has waited is only likelier to be next.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import tempfile
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen
from typing import Any

from service.clock import SYSTEM_CLOCK, Clock
from service.errors import ShuttingDown
from service.limits import LimitExceeded, UpstreamLimiter

_POLL_S = 0.01
_CONCURRENCY = "concurrency"


class TurnsFile:
    """The open file whose lock the workers take turns by.

    The supervisor makes it and removes its name at once: a name in the temporary directory
    could be cleaned away under a long-running gateway (systemd-tmpfiles, tmpreaper), and a
    worker started after that in a dead one's place could not open it (a new file of that
    name would be a lock the other workers do not take); nor is one left behind by a
    supervisor killed outright. Each worker is given the open file as it is spawned (its
    descriptor passed to it: `__reduce__`), so all of them share it: they lock it with POSIX
    record locks, held per process, where a `flock`, held per open file, would let every
    worker take it at once.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> TurnsFile:
        """A new empty file, the supervisor's user's alone, with no name."""
        fd, name = tempfile.mkstemp(prefix="llm-gateway-local-turns-")
        os.unlink(name)
        return cls(fd)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if get_spawning_popen() is None:
            # Sent down a pipe it would open a descriptor in the worker at each message.
            raise TypeError("a TurnsFile goes to a worker only in its spawn arguments")
        return _received, (reduction.DupFd(self.fd),)

    def close(self) -> None:
        """Close this process's descriptor of it."""
        os.close(self.fd)


def _received(duplicate: Any) -> TurnsFile:
    """The `TurnsFile` a spawned worker was given: its descriptor, not passed on further."""
    fd = duplicate.detach()
    os.set_inheritable(fd, False)
    return TurnsFile(fd)


class MachineTurns:
    """One process's hold on the turn every process of the machine takes, one at a time."""

    def __init__(self, turns: TurnsFile, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._fd = turns.fd
        self._clock = clock
        self._given_at = -math.inf
        self.is_held = False

    def try_take(self) -> bool:
        """Take the turn if no process holds it, unless this one gave it up a moment ago."""
        if self._clock.now() - self._given_at < _POLL_S:
            return False  # the others' turn first
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):  # another process holds it
                return False
            raise
        self.is_held = True
        return True

    def give(self) -> None:
        """Let the turn go, if held."""
        if self.is_held:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            self.is_held = False
            self._given_at = self._clock.now()

    def close(self) -> None:
        """Let the turn go and close the file (this process's descriptor of it)."""
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


__all__ = ["MachineTurnLimiter", "MachineTurns", "TurnsFile"]
