"""Single-flight: one call per key, shared results and errors, safe cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from service.cache import SingleFlight
from service.domain import FOLDED_EVERY, Delta
from service.errors import ShuttingDown


class Upstream:
    """A call that counts its starts and waits for the test to release it."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, publish: Callable[[str], None]) -> str:
        self.calls += 1
        try:
            publish("a")
            await self.release.wait()
            publish("b")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return "answer"


async def test_fifty_waiters_share_one_call() -> None:
    """Fifty concurrent joins of one key start exactly one call and all get its result."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    joined = [flights.join("k", upstream) for _ in range(50)]
    waiters = [asyncio.create_task(flights.wait(flight)) for flight, _ in joined]
    await asyncio.sleep(0)
    upstream.release.set()
    assert await asyncio.gather(*waiters) == ["answer"] * 50
    assert upstream.calls == 1
    assert [started for _, started in joined].count(True) == 1
    await flights.aclose()


async def test_every_waiter_gets_the_same_error() -> None:
    """A failed call raises its error in every waiter, and is not kept for later calls."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    upstream.error = ValueError("boom")
    waiters = [asyncio.create_task(flights.wait(flights.join("k", upstream)[0])) for _ in range(5)]
    await asyncio.sleep(0)
    upstream.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(r is results[0] and isinstance(r, ValueError) for r in results)
    assert len(flights) == 0
    assert flights.join("k", upstream)[1] is True
    await flights.aclose()


async def test_cancelling_one_waiter_leaves_the_call_running() -> None:
    """Cancelling the first waiter does not cancel the call the others wait for."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    flight, _ = flights.join("k", upstream)
    first = asyncio.create_task(flights.wait(flight))
    second = asyncio.create_task(flights.wait(flight))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    upstream.release.set()
    assert await second == "answer"
    assert (upstream.calls, upstream.cancelled) == (1, 0)
    await flights.aclose()


async def test_last_waiter_leaving_cancels_the_call() -> None:
    """When every waiter has gone, the call nobody wants is cancelled."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    flight, _ = flights.join("k", upstream)
    waiters = [asyncio.create_task(flights.wait(flight)) for _ in range(3)]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert flight.task is not None
    await asyncio.gather(flight.task, return_exceptions=True)
    assert upstream.cancelled == 1
    assert len(flights) == 0


async def test_each_waiter_and_follower_gets_its_own_copy_of_a_gateway_error() -> None:
    """A call's `GatewayError` reaches every waiter and stream follower as an object of
    its own, with its fields: one setting `is_unsent` on its copy changes no other's."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    upstream.error = ShuttingDown(is_unsent=True)
    flight, _ = flights.join("k", upstream)

    async def follow() -> None:
        async for _ in flights.follow(flight):
            pass

    waiters = [asyncio.create_task(flights.wait(flight)) for _ in range(2)]
    waiters.append(asyncio.create_task(follow()))
    await asyncio.sleep(0)
    upstream.release.set()
    errors = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(e, ShuttingDown) and e.is_unsent for e in errors)
    assert len({id(e) for e in errors}) == 3
    first = errors[0]
    assert isinstance(first, ShuttingDown)
    first.is_unsent = False
    assert [getattr(e, "is_unsent", None) for e in errors] == [False, True, True]
    assert all(str(e) == str(upstream.error) for e in errors)
    await flights.aclose()


async def test_followers_see_every_delta_then_the_result() -> None:
    """A follower that joins late still gets the deltas published before it joined."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    flight, _ = flights.join("k", upstream)

    async def collect() -> list[str]:
        return [item async for item in flights.follow(flight)]

    early = asyncio.create_task(collect())
    await asyncio.sleep(0.01)
    late = asyncio.create_task(collect())
    await asyncio.sleep(0)
    upstream.release.set()
    assert await early == ["a", "b", "answer"]
    assert await late == ["a", "b", "answer"]
    await flights.aclose()


async def test_after_hook_runs_once_and_joiners_meanwhile_share_the_result() -> None:
    """The after hook runs in the flight; a join while it runs gets the finished result."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    upstream.release.set()
    storing = asyncio.Event()
    stored: list[str] = []
    proceed = asyncio.Event()

    async def after(value: str) -> None:
        storing.set()
        await proceed.wait()
        stored.append(value)

    flight, _ = flights.join("k", upstream, after=after)
    assert await flights.wait(flight) == "answer"
    await storing.wait()
    again, started = flights.join("k", upstream, after=after)
    assert (again is flight, started) == (True, False)
    assert await flights.wait(again) == "answer"
    proceed.set()
    assert flight.task is not None
    await flight.task
    assert (stored, upstream.calls, len(flights)) == (["answer"], 1, 0)


async def test_aclose_cancels_running_calls() -> None:
    """Closing cancels and awaits every flight: no task outlives the owner."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    flight, _ = flights.join("k", upstream)
    await asyncio.sleep(0)
    await flights.aclose()
    assert flight.task is not None
    assert flight.task.done()
    assert upstream.cancelled == 1
    with pytest.raises(RuntimeError):
        flights.join("k", upstream)


async def test_a_join_after_the_last_waiter_left_starts_a_fresh_call() -> None:
    """A call arriving while an abandoned flight is still winding down gets its own answer."""
    flights: SingleFlight[str] = SingleFlight()
    closing = asyncio.Event()

    async def slow_to_close(publish: Callable[[str], None]) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await closing.wait()  # e.g. aiohttp closing the upstream response
            raise
        return "never"

    flight, _ = flights.join("k", slow_to_close)
    waiter = asyncio.create_task(flights.wait(flight))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    upstream = Upstream()
    upstream.release.set()
    again, started = flights.join("k", upstream)
    assert (again is not flight, started) == (True, True)
    assert await flights.wait(again) == "answer"
    await flights.aclose()  # also ends the forgotten flight still winding down
    assert flight.task is not None
    assert flight.task.done()
    assert not closing.is_set()


async def test_a_flight_cancelled_before_its_task_ran_does_not_leave_waiters_hanging() -> None:
    """Closed before its task took its first step, a flight still ends for its waiter."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    flight, _ = flights.join("k", upstream)
    waiter = asyncio.create_task(flights.wait(flight))
    await flights.aclose()  # the flight's task is cancelled before it ever ran
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, timeout=2.0)
    assert upstream.calls == 0
    assert len(flights) == 0


@pytest.mark.parametrize("outcome", ["result", "error", "cancelled-before-running"])
async def test_on_end_runs_once_however_the_flight_ends(outcome: str) -> None:
    """`on_end` runs exactly once after the flight's task is done, whatever its end."""
    flights: SingleFlight[str] = SingleFlight()
    upstream = Upstream()
    upstream.release.set()
    if outcome == "error":
        upstream.error = ValueError("boom")
    ended: list[str] = []
    flight, _ = flights.join("k", upstream, on_end=lambda: ended.append("k"))
    assert flight.task is not None
    if outcome == "cancelled-before-running":
        flight.task.cancel()
    else:
        await asyncio.gather(flights.wait(flight), return_exceptions=True)
    # Wakes after the flight's own done callbacks (registered first) have run.
    await asyncio.gather(flight.task, return_exceptions=True)
    assert ended == ["k"]
    assert upstream.calls == (0 if outcome == "cancelled-before-running" else 1)
    await flights.aclose()


async def test_a_follower_leaving_beside_another_at_its_place_keeps_the_others_place() -> None:
    """Two followers at one delta, one leaves: the other still reads every delta once,
    in order, after the flight folds what it holds (`FOLDED_EVERY`). Removed by equality,
    the leaver took the other's place marker, which the fold then left behind: the other
    lost every delta after it and ended with a ValueError."""
    flights: SingleFlight[str] = SingleFlight()
    published = asyncio.Event()
    release = asyncio.Event()
    texts = [str(at % 10) for at in range(FOLDED_EVERY + 10)]

    async def call(publish: Callable[[Delta], None]) -> str:
        for text in texts[:10]:
            publish(Delta(text))
        published.set()
        await release.wait()
        for text in texts[10:]:
            publish(Delta(text))
        return "answer"

    flight, _ = flights.join("k", call)  # type: ignore[arg-type]
    stays = flights.follow(flight)  # following first: the first of the equal places
    leaves = flights.follow(flight)
    await published.wait()
    read = [(await anext(stays)) for _ in range(10)]
    for _ in range(10):
        await anext(leaves)
    await leaves.aclose()
    release.set()
    read += [item async for item in stays]

    assert read[-1] == "answer"
    assert "".join(delta.content for delta in read[:-1]) == "".join(texts)
    await flights.aclose()
