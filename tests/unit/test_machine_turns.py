"""`MachineTurnLimiter`: calls of several processes (here: limiters on files opened apart,
as each worker opens it) take the machine's one turn, one at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.clock import SYSTEM_CLOCK
from service.limits import LimitExceeded
from service.machine_turns import MachineTurnLimiter, MachineTurns


def _limiters(path: Path, count: int) -> list[MachineTurnLimiter]:
    path.touch()
    return [
        MachineTurnLimiter("local", MachineTurns(path), max_concurrency=1, clock=SYSTEM_CLOCK)
        for _ in range(count)
    ]


async def test_a_call_waits_for_the_turn_another_process_holds(tmp_path: Path) -> None:
    """A second worker's call starts only once the first one's call has ended."""
    first, second = _limiters(tmp_path / "turns", 2)
    await first.acquire(tokens=1, max_wait_s=5)
    waiting = asyncio.ensure_future(second.acquire(tokens=1, max_wait_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.release()
    await waiting
    assert (first.in_flight, second.in_flight) == (0, 1)


async def test_the_turn_goes_to_the_other_process_first(tmp_path: Path) -> None:
    """A worker that gives the turn up while another waits does not take it back first,
    however long its own line."""
    first, second = _limiters(tmp_path / "turns", 2)
    await first.acquire(tokens=1, max_wait_s=5)
    waiting = asyncio.ensure_future(second.acquire(tokens=1, max_wait_s=5))
    await asyncio.sleep(0.05)
    first.release()
    again = asyncio.ensure_future(first.acquire(tokens=1, max_wait_s=5))
    done, _ = await asyncio.wait([waiting, again], return_when=asyncio.FIRST_COMPLETED)
    assert done == {waiting}
    second.release()
    await again


async def test_a_turn_that_does_not_come_in_time_is_refused_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    """Past `max_wait_s`, `LimitExceeded` (replica-local), its process's slot given back."""
    first, second = _limiters(tmp_path / "turns", 2)
    await first.acquire(tokens=1, max_wait_s=5)
    with pytest.raises(LimitExceeded) as refused:
        await second.acquire(tokens=1, max_wait_s=0.05)
    assert refused.value.is_replica_local
    assert refused.value.is_waited_out  # the pool's DEADLINE_EXCEEDED when a deadline bound it
    assert second.in_flight == 0
