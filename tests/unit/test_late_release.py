"""`LateReleases`: failed releases retried in the background until they land."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from service.late_release import LateReleases

_TIMEOUT_S = 5.0


class Store:
    """A store that refuses the first `failures` releases, and records what it took."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts: list[str] = []
        self.released: list[str] = []

    def release(self, name: str) -> Callable[[], Awaitable[None]]:
        async def attempt() -> None:
            self.attempts.append(name)
            if self.failures:
                self.failures -= 1
                raise ConnectionError("store unreachable")
            self.released.append(name)

        return attempt


async def drained(late: LateReleases) -> None:
    async with asyncio.timeout(_TIMEOUT_S):
        while late.pending:
            await asyncio.sleep(0.005)


def fast(**options: float) -> LateReleases:
    return LateReleases("test", **{"lease_ttl_s": 60.0, "first_delay_s": 0.01, **options})


async def test_a_release_is_retried_until_the_store_takes_it() -> None:
    """Refused twice more after the caller's own try: retried, with backoff, until it lands."""
    store = Store(failures=2)
    late = fast(max_delay_s=0.05)
    late.retry(store.release("a"))
    await drained(late)
    assert store.attempts == ["a", "a", "a"]
    assert store.released == ["a"]
    assert late.released == 1


async def test_waiting_releases_go_oldest_first_through_one_worker() -> None:
    """While the store is down one retry at a time probes it; once up, all land in order."""
    store = Store(failures=1)
    late = fast()
    for name in "abc":
        late.retry(store.release(name))
    assert late.pending == 3
    await drained(late)
    assert store.attempts == ["a", "a", "b", "c"]  # only the oldest probed the dead store
    assert store.released == ["a", "b", "c"]


async def test_a_release_whose_lease_has_expired_is_not_tried() -> None:
    """Past the lease's TTL the store has dropped it already: nothing is sent."""
    store = Store()
    late = fast(lease_ttl_s=0.0)
    late.retry(store.release("a"))
    await drained(late)
    assert store.attempts == []
    assert late.released == 0


async def test_past_max_pending_the_oldest_is_left_to_expire() -> None:
    """An outage under load cannot grow the backlog without bound."""
    store = Store()
    late = fast(max_pending=2)
    for name in "abc":
        late.retry(store.release(name))
    assert (late.pending, late.dropped) == (2, 1)
    await drained(late)
    assert store.released == ["b", "c"]


async def test_aclose_stops_retrying_and_abandons_the_rest() -> None:
    """Closing (the server stops) cancels the worker; no release runs after it."""
    store = Store(failures=1_000)
    late = fast()
    late.retry(store.release("a"))
    await asyncio.sleep(0.05)
    await late.aclose()
    attempts = len(store.attempts)
    assert attempts >= 1
    assert late.pending == 0
    await asyncio.sleep(0.05)
    assert len(store.attempts) == attempts


async def test_a_release_failing_after_aclose_is_given_up_at_once() -> None:
    """A call still cleaning up as its stores close (the server has stopped) starts no
    worker that would outlive them: its release is abandoned on the spot, and says so."""
    store = Store(failures=1_000)
    late = fast()
    await late.aclose()
    given_up: list[str] = []
    late.retry(store.release("a"), on_give_up=lambda: given_up.append("a"))
    assert given_up == ["a"]
    assert late.pending == 0
    await asyncio.sleep(0.05)
    assert store.attempts == []


async def test_a_new_failure_after_the_backlog_drained_starts_a_new_worker() -> None:
    """The worker ends once nothing waits, and the next failure starts another."""
    store = Store()
    late = fast()
    late.retry(store.release("a"))
    await drained(late)
    late.retry(store.release("b"))
    await drained(late)
    assert store.released == ["a", "b"]


async def test_backoff_doubles_up_to_its_cap(caplog: pytest.LogCaptureFixture) -> None:
    """However long the store stays down, the next probe is at most max_delay_s away."""
    store = Store(failures=5)
    late = fast(max_delay_s=0.04)
    with caplog.at_level(logging.WARNING, logger="llm_gateway.late_release"):
        late.retry(store.release("a"))
        await drained(late)
    waits = [r.retry_in_s for r in caplog.records if r.message == "late_release.store_unavailable"]
    assert waits == [0.02, 0.04, 0.04, 0.04, 0.04]
    assert store.released == ["a"]


async def test_a_release_given_up_says_so() -> None:
    """Expired, crowded out or closed: `on_give_up` is called, once, for each."""
    store = Store(failures=1_000)
    late = fast(max_pending=2)
    given_up: list[str] = []

    def retry(name: str, **options: float) -> None:
        late.retry(store.release(name), on_give_up=lambda: given_up.append(name), **options)

    retry("expired", expires_after_s=0.0)
    retry("a")
    await asyncio.sleep(0.05)  # the worker skips the expired one; "a" keeps failing
    assert given_up == ["expired"]
    retry("b")
    retry("c")  # past max_pending: crowds out the oldest, "a"
    assert given_up == ["expired", "a"]
    await late.aclose()
    assert given_up == ["expired", "a", "b", "c"]
    assert "expired" not in store.attempts


async def test_a_store_that_answers_again_is_retried_at_once_not_after_the_backoff() -> None:
    """A write the store takes directly (it is back) wakes the retries: what waits lands
    now, not when a backoff of up to 30 s runs out."""
    store = Store()
    late = fast(first_delay_s=30.0)
    late.retry(store.release("a"))
    await asyncio.sleep(0.02)
    assert store.attempts == []  # still backing off
    late.store_answered()
    async with asyncio.timeout(1.0):
        while late.pending:
            await asyncio.sleep(0.005)
    assert store.released == ["a"]
    await late.aclose()


async def test_aclose_tries_once_more_before_giving_up() -> None:
    """A store that is back as the gateway stops still gets what waited for it."""
    store = Store()
    late = fast(first_delay_s=30.0)
    given_up: list[str] = []
    late.retry(store.release("a"), on_give_up=lambda: given_up.append("a"))
    await late.aclose()
    assert store.released == ["a"]
    assert given_up == []


async def test_aclose_gives_up_at_the_first_refusal_within_its_bound() -> None:
    """A store still down as the gateway stops: one try, then everything is given up."""
    store = Store(failures=1_000)
    late = fast(first_delay_s=30.0)
    given_up: list[str] = []
    for name in "ab":
        late.retry(store.release(name), on_give_up=lambda name=name: given_up.append(name))
    await late.aclose()
    assert store.attempts == ["a"]
    assert given_up == ["a", "b"]


class RefusedForGood(Exception):
    """What a store answers to a write it will never take (a key of the wrong type)."""


def refuses_for_good(exc: Exception) -> bool:
    return isinstance(exc, RefusedForGood)


async def test_a_release_refused_for_good_is_given_up_without_holding_back_the_rest() -> None:
    """Oldest first, but a release the store will never take is dropped (and said so)
    rather than retried in front of the others until it expires."""
    taken: list[str] = []
    given_up: list[str] = []

    async def poisoned() -> None:
        raise RefusedForGood("WRONGTYPE")

    def take(name: str) -> Callable[[], Awaitable[None]]:
        async def attempt() -> None:
            taken.append(name)

        return attempt

    late = LateReleases(
        "test", lease_ttl_s=60.0, first_delay_s=0.01, refused_for_good=refuses_for_good
    )
    late.retry(poisoned, on_give_up=lambda: given_up.append("poisoned"))
    late.retry(take("b"))
    late.retry(take("c"))
    await drained(late)
    assert taken == ["b", "c"]
    assert given_up == ["poisoned"]
    assert late.released == 2


async def test_release_now_does_not_retry_a_release_refused_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tried once, refused for good: logged as an error, nothing left waiting."""

    async def poisoned() -> None:
        raise RefusedForGood("WRONGTYPE Operation against a key holding the wrong kind")

    late = LateReleases("test", lease_ttl_s=60.0, refused_for_good=refuses_for_good)
    with caplog.at_level(logging.ERROR, logger="llm_gateway.late_release"):
        await late.release_now(poisoned)
    assert late.pending == 0
    (record,) = [r for r in caplog.records if r.message == "late_release.refused"]
    assert "WRONGTYPE" in record.__dict__["error"]


async def test_without_a_refusal_test_every_failure_may_pass() -> None:
    """The default: any failure is retried (a store whose errors are all transient)."""
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RefusedForGood("looks permanent, but no test says so")

    late = fast(max_delay_s=0.02)
    await late.release_now(flaky)
    await drained(late)
    assert len(attempts) == 3
    assert late.released == 1


async def test_every_write_given_up_is_counted_as_abandoned() -> None:
    """Refused for good (queued or not), expired, crowded out, or left at close: the
    count an operator's metric reads."""
    late = LateReleases("test", lease_ttl_s=60.0, max_pending=1, refused_for_good=refuses_for_good)

    async def poisoned() -> None:
        raise RefusedForGood("WRONGTYPE")

    async def unreachable() -> None:
        raise ConnectionError("store unreachable")

    await late.release_now(poisoned)  # refused for good, never queued
    late.abandon(lambda: None)  # given up by its store before it was queued
    late.retry(unreachable)
    late.retry(unreachable)  # crowds the first out
    late.retry(unreachable, expires_after_s=0.0)  # crowds the second out, then expires
    await late.aclose(flush_s=0.1)
    assert late.abandoned == 5
    assert late.pending == 0


async def test_a_release_landing_as_it_is_crowded_out_is_not_given_up() -> None:
    """The oldest release is being sent when a new one arrives past `max_pending`: it may
    land, and then it was not given up (a usage row reported lost that landed would be
    added again by hand). Another one waiting makes the room instead, or none does."""
    store = Store()
    sending, landing = asyncio.Event(), asyncio.Event()

    async def held_release() -> None:
        sending.set()
        await landing.wait()
        store.released.append("a")

    late = fast(max_pending=1)
    given_up: list[str] = []
    late.retry(held_release, on_give_up=lambda: given_up.append("a"))
    async with asyncio.timeout(_TIMEOUT_S):
        await sending.wait()
    late.retry(store.release("b"), on_give_up=lambda: given_up.append("b"))
    landing.set()
    await drained(late)
    assert store.released == ["a", "b"]
    assert given_up == []
    assert (late.released, late.abandoned) == (2, 0)


async def test_a_release_cut_by_its_callers_cancel_is_sent_again_at_once() -> None:
    """A release its caller's cancel cut on its way (the store did not refuse it) is tried
    again at once, not after the backoff (an hour here)."""
    store = Store()
    late = fast(first_delay_s=3600.0)
    late.retry(store.release("a"), was_refused=False)
    await drained(late)
    assert store.released == ["a"]


async def test_a_release_cut_while_the_store_fails_waits_out_the_backoff() -> None:
    """A cut release tried at once and refused: the worker backs off (an hour here), and
    the next cut one does not hurry it, the store failing."""
    store = Store(failures=1)
    late = fast(first_delay_s=3600.0)
    late.retry(store.release("a"), was_refused=False)
    async with asyncio.timeout(_TIMEOUT_S):
        while store.attempts != ["a"]:
            await asyncio.sleep(0.005)
    late.retry(store.release("b"), was_refused=False)
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.attempts == ["a"]
    await late.aclose()
    assert store.released == ["a", "b"]  # its last try, as it closes
