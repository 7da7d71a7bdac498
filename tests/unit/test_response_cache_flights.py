"""The response cache's own bookkeeping for shared calls (service.cache.response_cache)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from service.cache import CacheStore, ResponseCache
from service.cache.response_cache import MAX_CACHED_DELTAS
from service.clock import Deadline
from service.config import CacheConfig
from service.domain import (
    FOLDED_EVERY,
    ChatRequest,
    Completion,
    Delta,
    FinishReason,
    GenerationParams,
    Message,
    Role,
    Usage,
)


async def _never_called() -> Completion:
    raise AssertionError("the flight's task never ran, so nothing was fetched")


async def test_a_flight_cancelled_before_its_task_ran_leaves_no_storage_plan() -> None:
    """A shared call cancelled before its task's first step drops its storage plan too.

    The plan (whether and how long to store the answer) is the cache's own state, one per
    flight; a flight that never ran must not leave it behind.
    """
    settings = CacheConfig()
    cache = ResponseCache(settings, store=CacheStore(settings))
    request = ChatRequest(
        model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(temperature=0.0)
    )
    call = asyncio.create_task(
        cache.complete(request, fetch=_never_called, deadline=Deadline.after(None))
    )
    await asyncio.sleep(0)  # the call has joined its flight, whose task has not run yet
    assert len(cache._plans) == 1
    await cache.aclose()  # cancels the flight's task before its first step
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, timeout=2.0)
    assert cache._plans == {}
    assert cache.in_flight == 0


class _GatedStore(CacheStore):
    """The memory store, whose writes wait for `writes` and whose reads, once `reads` is
    cleared, look before they wait for it: a read that misses an answer stored while it
    was on its way back, as a Redis GET sent just before a SET lands."""

    def __init__(self, settings: CacheConfig) -> None:
        super().__init__(settings)
        self.writes = asyncio.Event()
        self.reads = asyncio.Event()
        self.reads.set()
        self.reads_held = 0

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if not self.reads.is_set():
            self.reads_held += 1
            await self.reads.wait()
        return value

    async def set(self, key: str, value: bytes, *, ttl_s: int, replacing: bool = False) -> bool:
        await self.writes.wait()
        return await super().set(key, value, ttl_s=ttl_s, replacing=replacing)


async def test_a_read_that_missed_the_answer_its_shared_call_stored_meanwhile_reads_again() -> None:
    """A call whose read of the store began while an identical call's answer was being
    stored, and missed it, reads again once that call has ended: it is answered from the
    cache. Before, it became a new shared call of its own and paid the upstream again."""
    settings = CacheConfig()
    store = _GatedStore(settings)
    cache = ResponseCache(settings, store=store)
    request = ChatRequest(
        model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(temperature=0.0)
    )
    fetched = 0

    async def fetch() -> Completion:
        nonlocal fetched
        fetched += 1
        return Completion("id", "m", "hello", FinishReason.STOP, Usage(3, 1), 0.02, "up0")

    deadline = Deadline.after(None)
    first = await cache.complete(request, fetch=fetch, deadline=deadline)
    assert cache.in_flight == 1  # answered; its shared call is storing the answer
    store.reads.clear()
    second = asyncio.create_task(cache.complete(request, fetch=fetch, deadline=deadline))
    async with asyncio.timeout(5):
        while not store.reads_held:  # its read looked and found nothing yet
            await asyncio.sleep(0)
    store.writes.set()
    async with asyncio.timeout(5):
        while cache.in_flight:  # stored: the shared call has ended
            await asyncio.sleep(0)
    store.reads.set()
    answer = await asyncio.wait_for(second, timeout=5)
    assert (first.is_cache_hit, fetched) == (False, 1)
    assert (answer.content, answer.is_cache_hit, answer.saved_cost_usd) == ("hello", True, 0.02)
    await cache.aclose()


async def test_a_long_streams_cached_copy_keeps_its_first_deltas_as_they_came() -> None:
    """A stream of more than `MAX_CACHED_DELTAS` deltas is stored with its first
    `MAX_CACHED_DELTAS` as they came and those after joined `FOLDED_EVERY` at a time, as
    the README says a hit replays it. Before, the fold at the limit joined the last
    `FOLDED_EVERY` of those first ones too."""
    settings = CacheConfig()
    cache = ResponseCache(settings, store=CacheStore(settings))
    request = ChatRequest(
        model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(temperature=0.0)
    )
    pieces = MAX_CACHED_DELTAS + FOLDED_EVERY + 3

    async def fetch() -> AsyncGenerator[Delta | Completion, None]:
        for _ in range(pieces):
            yield Delta("a")
        yield Completion("id", "m", "a" * pieces, FinishReason.STOP, Usage(3, pieces), 0.0, "up0")

    deadline = Deadline.after(None)
    streamed = [event async for event in cache.stream(request, fetch=fetch, deadline=deadline)]
    async with asyncio.timeout(5):
        while cache.in_flight:  # stored: the shared call has ended
            await asyncio.sleep(0)
    replayed = [event async for event in cache.stream(request, fetch=fetch, deadline=deadline)]
    assert "".join(event.content for event in streamed[:-1]) == "a" * pieces
    sizes = [len(event.content) for event in replayed if isinstance(event, Delta)]
    assert sizes == [1] * MAX_CACHED_DELTAS + [FOLDED_EVERY] + [1] * 3
    await cache.aclose()
