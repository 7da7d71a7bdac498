"""The local model's one slot, shared by the worker processes of `serve --workers N`.

llama-cpp-python's server generates one answer at a time, and each worker's limiter lets
one call at a time go to it (`max_concurrency: 1`): N workers sent it up to N at once. It
queued them itself, first come first served, their wait counted as the model's time
(against its 300 s timeout) rather than as `queued`, and a cancelled one was not let go
while it waited there. So a call to it also takes the machine's turn: an exclusive lock on
a file the supervisor made (`TurnsFile`), which the kernel lets go when its holder dies, so
a worker killed mid-call never keeps it.

A worker waits in line for it without asking again and again: a thread of its own
(`_wait_in_line`) blocks in the kernel on the lock, which wakes it as the turn is let go,
by a call's end or its holder's death. Each process that waits first takes a second lock,
the line's (`_LINE`): the one holding it is next, alone waiting on the turn itself, so a
worker that just gave the turn up and calls again waits behind it (in line, for the line's
lock, as others may); with nobody else waiting, its next call takes the turn at once. Turns
between workers are not first come first served past that: the kernel does not say which
of several waiting for the line gets it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import os
import tempfile
import threading
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen
from typing import Any

from service.clock import Clock
from service.errors import ShuttingDown
from service.limits import LimitExceeded, UpstreamLimiter

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


# The byte ranges of the `TurnsFile` locked: the turn, and the line for it (its holder next).
_TURN = 0
_LINE = 1
_BUSY = (errno.EACCES, errno.EAGAIN)


class MachineTurns:
    """One process's hold on the turn every process of the machine takes, one at a time.

    Its calls wait for it one at a time (`take`): the first in line through a thread of its
    own blocked in the kernel (`_wait_in_line`), which a cancelled call cannot stop; the turn
    it gets goes to the next call waiting, or is let go when none is left.
    """

    def __init__(self, turns: TurnsFile) -> None:
        self._fd = turns.fd
        self.is_held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # From the thread's start until the loop has what it brought (`_came`).
        self._is_in_line = False
        # The file is closed by `close` or, while the thread uses it, by the thread, which
        # must not lock a descriptor reused for another file meanwhile.
        self._guard = threading.Lock()
        self._is_file_in_use = False
        self._is_closed = False

    def try_take(self) -> bool:
        """Take the turn if no process holds it or is next in line for it."""
        if self.is_held or self._is_in_line or self._is_closed:
            return False
        if not _locked(self._fd, _LINE):
            return False
        try:
            self.is_held = _locked(self._fd, _TURN)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LINE)
        return self.is_held

    async def take(self) -> None:
        """Wait in line for the turn `try_take` refused, however long (a caller bounds it
        with a timeout). Cancelled, nothing is held: a turn that came meanwhile goes on to
        the next call, or is let go.

        Raises:
            ShuttingDown: the server stopped while it waited (`refuse_waiters`).
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._join_the_line()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give()  # handed to it as it was cancelled
            elif not waiter.done():
                waiter.cancel()  # passed over when the turn comes
            raise

    def refuse_waiters(self, error: BaseException) -> None:
        """End every call waiting for the turn with `error` (the server stops)."""
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def give(self) -> None:
        """Let the turn go, if held; to the line, if a call of this process waits."""
        if self.is_held:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _TURN)
            self.is_held = False
            if any(not waiter.done() for waiter in self._waiters):
                self._join_the_line()

    def close(self) -> None:
        """Let the turn go and close the file (this process's descriptor of it); the
        thread waiting in line, if any, closes it once the kernel lets it out."""
        if self._is_closed:
            return
        self.refuse_waiters(ShuttingDown())
        self.give()
        with self._guard:
            self._is_closed = True
            if self._is_file_in_use:
                return
        os.close(self._fd)

    def _join_the_line(self) -> None:
        """Start the thread that waits in line for the turn, unless it already does or a
        call of this process holds the turn (`give` starts it then): the kernel would give
        this process the turn it holds."""
        if self._is_in_line or self.is_held or self._is_closed:
            return
        self._is_in_line = self._is_file_in_use = True
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._wait_in_line, args=(loop,), name="machine-turn", daemon=True
        ).start()

    def _wait_in_line(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: the line's lock, then the turn's (both blocking), then the line
        let go for the next process; the turn handed to the loop (`_came`)."""
        error: OSError | None = None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _LINE)
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _TURN)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LINE)
        except OSError as exc:
            error = exc
        with self._guard:
            self._is_file_in_use = False
            if self._is_closed:
                os.close(self._fd)  # the turn taken, if it came, goes with it
                return
            try:
                loop.call_soon_threadsafe(self._came, error)
            except RuntimeError:  # its loop closed: nobody to hand it to
                if error is None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _TURN)

    def _came(self, error: OSError | None) -> None:
        """The turn came (or the wait failed): to the first call still waiting, else let
        go."""
        self._is_in_line = False
        if self._is_closed:
            return  # the file closed: its locks went with it
        if error is not None:
            self.refuse_waiters(error)
            return
        self.is_held = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.give()


def _locked(fd: int, start: int) -> bool:
    """Whether the byte at `start` of `fd`'s file is now this process's, without waiting."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, start)
    except OSError as exc:
        if exc.errno in _BUSY:  # another process holds it
            return False
        raise
    return True


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
            if self.is_stopping:
                raise ShuttingDown()
            try:
                async with asyncio.timeout(max(0.0, max_wait_s - waited)):
                    await self._turns.take()
            except TimeoutError:
                refusal = LimitExceeded(
                    self.upstream, wait_s=0.1, what=_CONCURRENCY, is_replica_local=True
                )
                # Waited in line all its time: a deadline that bounded it ends the call.
                refusal.is_waited_out = True
                raise refusal from None
        except BaseException:
            self.give_back(tokens)  # never sent: its slot and units go back
            raise
        return waited + self._clock.now() - started

    def begin_stopping(self) -> None:
        """As `UpstreamLimiter.begin_stopping`, the calls waiting for the turn too."""
        super().begin_stopping()
        self._turns.refuse_waiters(ShuttingDown())

    def release(self) -> None:
        """One call ended: the machine's turn goes, then this process's slot."""
        self._turns.give()
        super().release()


__all__ = ["MachineTurnLimiter", "MachineTurns", "TurnsFile"]
