"""Unit tests for the caller's deadline on an injected clock (service.clock)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from service.clock import SYSTEM_CLOCK, Clock, Deadline, SystemClock, covered_s
from tests.fake_clock import FakeClock


def test_fake_clock_satisfies_protocol() -> None:
    """The fake clock is a `Clock`, so Deadline accepts it without patching anything."""
    clock: Clock = FakeClock()
    assert Deadline.after(1.0, clock).clock is clock


def test_no_deadline() -> None:
    """Without a deadline nothing expires, nothing remains, and timeouts are unchanged."""
    clock = FakeClock()
    deadline = Deadline.after(None, clock)
    assert deadline.expires_at is None
    assert deadline.remaining_s() is None
    clock.advance(1e9)
    assert not deadline.has_expired
    assert deadline.bound(30.0) == 30.0


def test_after_is_relative_to_clock_now() -> None:
    """`Deadline.after(s)` expires `s` seconds after the clock's current time."""
    clock = FakeClock(start=500.0)
    assert Deadline.after(2.5, clock).expires_at == 502.5


@pytest.mark.parametrize(
    ("elapsed", "remaining", "expired"),
    [
        (0.0, 10.0, False),
        (4.0, 6.0, False),
        (9.999, 0.001, False),
        (10.0, 0.0, True),
        (12.5, -2.5, True),
    ],
)
def test_remaining_and_expiry(elapsed: float, remaining: float, expired: bool) -> None:
    """Time left shrinks as the clock moves, goes negative past it, and expires at zero."""
    clock = FakeClock()
    deadline = Deadline.after(10.0, clock)
    clock.advance(elapsed)
    assert deadline.remaining_s() == pytest.approx(remaining)
    assert deadline.has_expired is expired


@pytest.mark.parametrize(
    ("elapsed", "timeout_s", "bounded"),
    [
        (0.0, 30.0, 10.0),
        (0.0, 5.0, 5.0),
        (7.0, 30.0, 3.0),
        (7.0, 2.0, 2.0),
        (10.0, 30.0, 0.0),
        (11.0, 30.0, -1.0),
    ],
)
def test_bound_cuts_timeout_to_time_left(elapsed: float, timeout_s: float, bounded: float) -> None:
    """`bound` gives each attempt the smaller of its timeout and the time left."""
    clock = FakeClock()
    deadline = Deadline.after(10.0, clock)
    clock.advance(elapsed)
    assert deadline.bound(timeout_s) == pytest.approx(bounded)


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_zero_or_negative_deadline_is_expired_at_once(seconds: float) -> None:
    """A deadline with no time left is expired before the clock moves."""
    deadline = Deadline.after(seconds, FakeClock())
    assert deadline.has_expired
    assert deadline.bound(5.0) <= 0


async def test_sleep_on_fake_clock_moves_the_deadline() -> None:
    """Sleeping on the injected clock uses up the deadline without real waiting."""
    clock = FakeClock()
    deadline = Deadline.after(3.0, clock)
    await clock.sleep(2.0)
    assert deadline.remaining_s() == pytest.approx(1.0)
    await clock.sleep(1.0)
    assert deadline.has_expired
    assert clock.slept == [2.0, 1.0]


def test_deadline_is_frozen() -> None:
    """A Deadline is an immutable value; `replace` derives a new one."""
    deadline = Deadline.after(5.0, FakeClock())
    with pytest.raises(dataclasses.FrozenInstanceError):
        deadline.expires_at = 0.0  # type: ignore[misc]
    later = dataclasses.replace(deadline, expires_at=(deadline.expires_at or 0) + 5)
    assert later.remaining_s() == pytest.approx(10.0)


def test_default_clock_is_the_system_clock() -> None:
    """Without a clock, a deadline runs on the shared monotonic system clock."""
    deadline = Deadline.after(60.0)
    assert deadline.clock is SYSTEM_CLOCK
    left = deadline.remaining_s()
    assert left is not None
    assert 0 < left <= 60.0
    assert not deadline.has_expired


async def test_system_clock_is_monotonic_and_sleeps() -> None:
    """The system clock never goes backwards and its sleep yields to the loop."""
    clock = SystemClock()
    before = clock.now()
    await asyncio.wait_for(clock.sleep(0), timeout=5)
    assert clock.now() >= before


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "iterator"])
def test_one_wait_covers_its_own_length(as_list: bool) -> None:
    """A call's one upstream wait (a list of one, read without sorting) covers its length,
    as the same wait given any other way does."""
    waits = [(2.0, 5.5)]
    assert covered_s(waits if as_list else iter(waits)) == 3.5
