"""`MachineTurnLimiter`: calls of several processes take the machine's one turn, one at a
time. The other process is a worker spawned as the supervisor spawns them: given the same
open `TurnsFile`, which has no name."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from service.clock import SYSTEM_CLOCK
from service.limits import LimitExceeded
from service.machine_turns import MachineTurnLimiter, MachineTurns, TurnsFile

_SPAWN = multiprocessing.get_context("spawn")


def _other_worker(turns: TurnsFile, orders: Connection) -> None:
    """Another worker of the machine: takes the turn (asking again until it comes, as a
    worker does) or gives it, as told, and says when it has."""
    held = MachineTurns(turns)
    while (order := orders.recv()) != "stop":
        if order == "take" and not held.try_take():
            orders.send("waiting")
            while not held.try_take():
                time.sleep(0.005)
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


def _limiter(turns: TurnsFile) -> MachineTurnLimiter:
    return MachineTurnLimiter("local", MachineTurns(turns), max_concurrency=1, clock=SYSTEM_CLOCK)


async def test_a_call_waits_for_the_turn_another_process_holds(turns: TurnsFile) -> None:
    """A worker's call starts only once another worker's call has ended, though both
    share one open file (a lock held per open file, as `flock`'s, would let both in)."""
    limiter = _limiter(turns)
    with _another_worker(turns) as other:
        await _told(other, "take")
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await _told(other, "give")
        await waiting
    assert limiter.in_flight == 1


async def test_the_turn_goes_to_the_other_process_first(turns: TurnsFile) -> None:
    """A worker that gives the turn up while another waits does not take it back first,
    however long its own line."""
    limiter = _limiter(turns)
    with _another_worker(turns) as other:
        await limiter.acquire(tokens=1, max_wait_s=5)
        other.send("take")
        assert await _reply(other) == "waiting"
        limiter.release()
        again = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5))
        assert await _reply(other) == "take"
        assert not again.done()
        await _told(other, "give")
        await again


async def test_a_turn_that_does_not_come_in_time_is_refused_and_frees_the_slot(
    turns: TurnsFile,
) -> None:
    """Past `max_wait_s`, `LimitExceeded` (replica-local), its process's slot given back."""
    limiter = _limiter(turns)
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
