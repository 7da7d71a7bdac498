"""Single-flight: identical concurrent calls share one upstream call.

The first caller of a key starts a `Flight`: a task owned by `SingleFlight` that runs
the call and publishes its progress (stream deltas) and its result on a future. Every
caller of the same key, the first included, is a *follower* of that flight. A
follower that is cancelled only stops following; the shared call goes on for the
others. When the last follower leaves before the result, nobody wants the answer any
more, so the call is cancelled (which closes the upstream request; the pipeline records
what the provider bills for it all the same).
`aclose()` cancels and awaits every flight: no task outlives its owner.

A failed call's `GatewayError` reaches each follower as a copy of its own: a follower
that marks it (`is_unsent`, cleared by a batch item or Summarize part an earlier try of
which was sent) leaves the others' as the shared call left it. A follower cancelled
before the shared call sent anything (its first caller waiting at its upstream's limits)
has its cancel marked unsent (`mark_unsent`), as the pool marks a cancel in its own task:
it sent nothing of its own, and its tenant's per-minute units go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from service.domain import FOLDED_EVERY, Delta, joined_deltas
from service.errors import GatewayError, mark_unsent

__all__ = ["Flight", "SingleFlight"]

T = TypeVar("T")

# A call receives `publish` for its progress and returns its result.
Call = Callable[[Callable[[Delta], None]], Awaitable[T]]


class Flight(Generic[T]):
    """One shared call in progress: its published deltas so far and its result."""

    def __init__(self, key: str, sent_nothing: Callable[[], bool] | None = None) -> None:
        self.key = key
        # Whether nothing of the call was sent yet (None: not known, taken as sent).
        self.sent_nothing = sent_nothing
        self.deltas: list[Delta] = []
        # Each follower's next index in `deltas` (a one-item list), which `_fold` moves;
        # keyed by the list's identity: two followers at one index are equal lists, and
        # removing by equality took the other's, which then no fold moved.
        self.positions: dict[int, list[int]] = {}
        self._folded = 0  # `deltas` from this index on are as published
        self._unfolded = 0  # published since the last fold
        self.result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # Mark a failure as retrieved even when every follower has left: no
        # "exception was never retrieved" noise for a call nobody waits on.
        self.result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.followers = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def publish(self, delta: Delta) -> None:
        """Hand the next delta to every follower."""
        self.deltas.append(delta)
        self._unfolded += 1
        if self._unfolded == FOLDED_EVERY:
            self._fold()
        self._wake()

    def _fold(self) -> None:
        """Join the deltas published since the last fold, in runs between the positions
        of the followers reading them, so that what the flight holds stays about the size
        of its text (`FOLDED_EVERY`): a follower behind reads the rest in fewer, longer
        deltas, as a stream read after a pause does; one that joins later reads them so."""
        self._unfolded = 0
        start, end = self._folded, len(self.deltas)
        cuts = sorted({cell[0] for cell in self.positions.values() if start < cell[0] < end})
        runs: list[Delta] = []
        moved: dict[int, int] = {}
        at = start
        for cut in (*cuts, end):
            moved[at] = start + len(runs)
            runs.append(joined_deltas(self.deltas[at:cut]))
            at = cut
        moved[end] = start + len(runs)
        self.deltas[start:] = runs
        for cell in self.positions.values():
            if cell[0] > start:
                cell[0] = moved[cell[0]]
        self._folded = len(self.deltas)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until_changed(self) -> None:
        await self._changed.wait()

    def left(self, cancel: BaseException) -> None:
        """A follower is leaving, cancelled (`cancel`): marked unsent when nothing of the
        call was sent yet."""
        if self.sent_nothing is not None and self.sent_nothing():
            mark_unsent(cancel)


class SingleFlight(Generic[T]):
    """At most one call per key at a time; everyone asking meanwhile shares its result.

    `after` runs in the flight's own task once the result is out (e.g. to store it), so
    followers never wait for it, and an identical call arriving meanwhile still joins.
    """

    def __init__(self) -> None:
        self._flights: dict[str, Flight[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # also those forgotten, winding down
        self._is_closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def following(self) -> int:
        """Callers following a flight now."""
        return sum(flight.followers for flight in self._flights.values())

    def current(self, key: str) -> Flight[T] | None:
        """The flight for `key` now (calling, or storing its result: `after`), if any."""
        return self._flights.get(key)

    def join(
        self,
        key: str,
        call: Call[T],
        *,
        after: Callable[[T], Awaitable[None]] | None = None,
        on_end: Callable[[], None] | None = None,
        sent_nothing: Callable[[], bool] | None = None,
    ) -> tuple[Flight[T], bool]:
        """The flight for `key`, started with `call` if none is running: (flight, started).

        `on_end` (of a flight this join starts) runs once its task is done, however it
        ended: with a result, an error, or cancelled, even before it first ran.
        `sent_nothing` (of a flight this join starts) says whether nothing of `call` was
        sent yet, for a follower cancelled meanwhile (`Flight.left`).
        """
        if self._is_closed:
            raise RuntimeError("SingleFlight is closed")
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        # Not `Flight[T](key)`: calling the subscripted alias costs two Python calls more
        # (typing's cache of the alias, then its `__call__` setting `__orig_class__`).
        flight = Flight(key, sent_nothing)
        self._flights[key] = flight
        task = asyncio.get_running_loop().create_task(
            self._run(flight, call, after), name=f"single-flight {key[-12:]}"
        )
        flight.task = task
        self._tasks.add(task)

        def ended(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            # Cancelled before its first step, `_run` never ran its `finally`: end it here,
            # or the followers would wait forever.
            if not flight.result.done():
                flight.result.cancel()
                self._forget(flight)
                flight._wake()
            if on_end is not None:
                on_end()

        task.add_done_callback(ended)
        return flight, True

    async def _run(
        self, flight: Flight[T], call: Call[T], after: Callable[[T], Awaitable[None]] | None
    ) -> None:
        try:
            try:
                value = await call(flight.publish)
            except Exception as exc:
                # Removed before anyone can join: a failure is never shared with later calls.
                self._forget(flight)
                flight.result.set_exception(exc)
                return
            flight.result.set_result(value)
            flight._wake()
            if after is not None:
                await after(value)
        finally:
            # Cancelled (or worse) before a result: followers must not wait forever.
            if not flight.result.done():
                flight.result.cancel()
            self._forget(flight)
            flight._wake()

    def _forget(self, flight: Flight[T]) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    @contextlib.asynccontextmanager
    async def _following(self, flight: Flight[T]) -> AsyncIterator[None]:
        flight.followers += 1
        try:
            yield
        finally:
            flight.followers -= 1
            if flight.followers == 0 and not flight.result.done() and flight.task is not None:
                # Forgotten at once: a call arriving while it winds down starts afresh
                # instead of joining a flight that can only end cancelled.
                self._forget(flight)
                flight.task.cancel()

    async def wait(self, flight: Flight[T]) -> T:
        """The flight's result (or its error, this follower's own copy of a gateway error);
        cancelling this waiter leaves the call running."""
        async with self._following(flight):
            try:
                return await asyncio.shield(flight.result)
            except GatewayError as shared:
                own = copy.copy(shared)
            except asyncio.CancelledError as cancel:
                flight.left(cancel)
                raise
            raise own  # outside the handler: not chained to the error it copies

    async def follow(self, flight: Flight[T]) -> AsyncGenerator[Delta | T, None]:
        """Every delta the flight publishes (from the first), then its result."""
        async with self._following(flight):
            position = [0]  # the next delta's index, moved when the flight folds them
            flight.positions[id(position)] = position
            try:
                while True:
                    while position[0] < len(flight.deltas):
                        delta = flight.deltas[position[0]]
                        position[0] += 1
                        yield delta
                    if flight.result.done():
                        break
                    try:
                        await flight._until_changed()
                    except asyncio.CancelledError as cancel:
                        flight.left(cancel)
                        raise
            finally:
                del flight.positions[id(position)]
            try:
                result = flight.result.result()
            except GatewayError as shared:
                own = copy.copy(shared)
            else:
                yield result
                return
            raise own  # this follower's own copy, as `wait` raises

    async def aclose(self) -> None:
        """Cancel every flight still calling, and wait for their tasks to end; one that
        has its result is left to store it (`after`, which the store bounds): a stopping
        server closes moments after its last calls end, and a Summarize it stopped, retried
        on another replica, would pay again for each part whose store was cancelled."""
        self._is_closed = True
        tasks = list(self._tasks)
        storing = {flight.task for flight in self._flights.values() if flight.result.done()}
        for task in tasks:
            if task not in storing:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
