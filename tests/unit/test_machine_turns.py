"""`MachineTurnLimiter`: calls of several processes take the machine's one turn, one at a
time. The other process is a worker spawned as the supervisor spawns them: given the same
open `TurnsFile`, which has no name."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import multiprocessing
import os
import pickle
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from service.clock import SYSTEM_CLOCK
from service.errors import ShuttingDown
from service.limits import LimitExceeded
from service.machine_turns import _LINE, MachineTurnLimiter, MachineTurns, TurnsFile, _locked

_SPAWN = multiprocessing.get_context("spawn")


def _other_worker(turns: TurnsFile, orders: Connection) -> None:
    """Another worker of the machine: takes the turn (waiting in line for it, as a worker
    does) or gives it, as told, and says when it has."""
    asyncio.run(_other_workers_orders(MachineTurns(turns), orders))


async def _other_workers_orders(held: MachineTurns, orders: Connection) -> None:
    while (order := await asyncio.to_thread(orders.recv)) != "stop":
        if order == "take" and not held.try_take():
            orders.send("waiting")
            await held.take()
        elif order == "give":
            held.give()
        orders.send(order)


@contextlib.contextmanager
def _another_worker(turns: TurnsFile) -> Iterator[Connection]:
    """A process spawned with `turns`, as a worker is; the pipe taking its orders."""
    orders, theirs = _SPAWN.Pipe()
    process = _SPAWN.Process(target=_other_worker, args=(turns, theirs))
    process.start()
    theirs.close()
    try:
        yield orders
    finally:
        orders.send("stop")
        process.join(10)


async def _reply(orders: Connection) -> object:
    """What the other worker says next (None if nothing within 10 s)."""
    return await asyncio.to_thread(lambda: orders.recv() if orders.poll(10) else None)


async def _told(orders: Connection, order: str) -> None:
    orders.send(order)
    assert await _reply(orders) == order


@pytest.fixture
def turns() -> Iterator[TurnsFile]:
    made = TurnsFile.create()
    yield made
    made.close()


@pytest.fixture
def limiter(turns: TurnsFile) -> Iterator[MachineTurnLimiter]:
    """A worker's limiter for the local model, on a descriptor of its own of `turns`."""
    held = MachineTurns(TurnsFile(os.dup(turns.fd)))
    yield MachineTurnLimiter("local", held, max_concurrency=1, clock=SYSTEM_CLOCK)
    held.close()


async def _in_line(turns: TurnsFile) -> None:
    """Until another process is next in line for the turn (holds its file's byte 1)."""
    while _locked(turns.fd, _LINE):
        fcntl.lockf(turns.fd, fcntl.LOCK_UN, 1, _LINE)
        await asyncio.sleep(0.01)


def _thread_in_line() -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == "machine-turn"), None)


async def _out_of_line() -> None:
    """Until this process's thread waiting in line for the turn has ended."""
    thread = _thread_in_line()
    if thread is not None:
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()


async def test_a_call_waits_for_the_turn_another_process_holds(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """A worker's call starts only once another worker's call has ended, though both
    share one open file (a lock held per open file, as `flock`'s, would let both in)."""
    with _another_worker(turns) as other:
        await _told(other, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await _told(other, "give")
        await waiting
    assert limiter.in_flight == 1


async def test_the_turn_goes_to_the_other_process_first(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """A worker that gives the turn up while another waits does not take it back first,
    however long its own line."""
    with _another_worker(turns) as other:
        await limiter.acquire(tokens=1, max_wait_s=5)
        other.send("take")
        assert await _reply(other) == "waiting"
        await _in_line(turns)
        limiter.release()
        again = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        assert await _reply(other) == "take"
        assert not again.done()
        await _told(other, "give")
        await again


async def test_a_turn_that_does_not_come_in_time_is_refused_and_frees_the_slot(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """Past `max_wait_s`, `LimitExceeded` (replica-local), its process's slot given back."""
    with _another_worker(turns) as other:
        await _told(other, "take")
        with pytest.raises(LimitExceeded) as refused:
            await limiter.acquire(tokens=1, max_wait_s=0.05)
    assert refused.value.is_replica_local
    assert refused.value.is_waited_out  # the pool's DEADLINE_EXCEEDED when a deadline bound it
    assert limiter.in_flight == 0


def test_a_turns_file_goes_to_a_worker_only_as_it_is_spawned(turns: TurnsFile) -> None:
    """Sent down a pipe (a state the supervisor sends later), it would open a descriptor
    in the worker at each message: refused, not leaked."""
    with pytest.raises(TypeError):
        pickle.dumps(turns)


async def test_a_worker_alone_takes_the_turn_again_as_it_gives_it(
    limiter: MachineTurnLimiter,
) -> None:
    """With no other worker waiting, a worker's next call has the turn at once.

    Before, a worker that had just given the turn up was refused it for 10 ms, so each of
    its calls after its own waited that long (20 calls in line: 270 ms of `queued`)."""
    await limiter.acquire(tokens=1, max_wait_s=5)
    limiter.release()
    assert limiter._turns.try_take()


async def test_a_waiting_call_has_the_turn_as_it_is_given_without_asking_again(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """A call waiting for the turn asks for it once, then waits in line until the kernel
    lets it in: no asking every 10 ms, which delayed each hand-over by up to that much."""
    asked: list[bool] = []
    try_take = limiter._turns.try_take

    def asking() -> bool:
        asked.append(try_take())
        return asked[-1]

    limiter._turns.try_take = asking  # type: ignore[method-assign]
    with _another_worker(turns) as other:
        await _told(other, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        await _in_line_here(limiter)
        await asyncio.sleep(0.1)  # time enough for several asks, were it asking
        await _told(other, "give")
        await waiting
    assert asked == [False]


async def _in_line_here(limiter: MachineTurnLimiter) -> None:
    while not limiter._turns._is_in_line:
        await asyncio.sleep(0.01)


async def test_a_call_cancelled_while_in_line_leaves_the_turn_to_the_others(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """A call cancelled while its thread waits in line: its slot back at once, and the
    turn, when the kernel hands it over, let go for the other worker."""
    with _another_worker(turns) as other:
        await _told(other, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        await _in_line_here(limiter)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert limiter.in_flight == 0
        await _told(other, "give")
        await _out_of_line()
        await _told(other, "take")  # let go by this process, not kept
    assert not limiter._turns.is_held


async def test_a_turn_whose_holder_died_goes_to_the_call_in_line(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """The kernel lets a dead worker's turn go, and wakes the call waiting in line."""
    orders, theirs = _SPAWN.Pipe()
    process = _SPAWN.Process(target=_other_worker, args=(turns, theirs))
    process.start()
    theirs.close()
    try:
        await _told(orders, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=10))
        await _in_line_here(limiter)
        process.kill()
        await waiting
    finally:
        process.join(10)
    assert limiter._turns.is_held


async def test_a_stop_with_a_call_in_line_refuses_it_and_leaves_no_thread(
    turns: TurnsFile, limiter: MachineTurnLimiter
) -> None:
    """The server stops while a call waits in line: `ShuttingDown` at once, its slot back;
    the file closed meanwhile, the thread ends as the other worker gives the turn, with
    no turn kept."""
    with _another_worker(turns) as other:
        await _told(other, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        await _in_line_here(limiter)
        limiter.begin_stopping()
        with pytest.raises(ShuttingDown):
            await waiting
        assert limiter.in_flight == 0
        limiter._turns.close()
        await _told(other, "give")
        await _out_of_line()
        await _told(other, "take")
