"""The response cache's own bookkeeping for shared calls (service.cache.response_cache)."""

from __future__ import annotations

import asyncio

import pytest

from service.cache import CacheStore, ResponseCache
from service.clock import Deadline
from service.config import CacheConfig
from service.domain import ChatRequest, Completion, GenerationParams, Message, Role


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
