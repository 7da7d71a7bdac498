"""`ResponseCache.recall`: the answer a store read returned, reused for one second."""

from __future__ import annotations

import asyncio
import dataclasses

from service.cache import CacheStore, ResponseCache
from service.cache.entry import CachedAnswer
from service.cache.response_cache import RECENT_READ_S
from service.clock import Deadline
from service.config import CacheConfig
from service.domain import (
    CacheMode,
    CachePolicy,
    ChatRequest,
    Completion,
    FinishReason,
    GenerationParams,
    Message,
    Role,
    Usage,
)
from tests.fake_clock import FakeClock

REQUEST = ChatRequest(
    model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(temperature=0.0)
)
ANSWER = Completion(
    id="c-1",
    model="m",
    content="hello",
    finish_reason=FinishReason.STOP,
    usage=Usage(input_tokens=3, output_tokens=1),
    cost_usd=2e-6,
    upstream="up0",
)


async def _fetch() -> Completion:
    return ANSWER


async def _cache_with_a_read(clock: FakeClock) -> tuple[ResponseCache, str]:
    """A cache holding ANSWER for REQUEST, read once (a hit) at the clock's time."""
    config = CacheConfig()
    cache = ResponseCache(config, store=CacheStore(config, clock=clock), clock=clock)
    for _ in range(2):  # a miss that stores, then a hit that reads
        await cache.complete(REQUEST, fetch=_fetch, deadline=Deadline.after(None))
    return cache, cache.key_for(REQUEST)


async def test_a_recent_read_is_recalled_as_a_free_hit() -> None:
    """Within the second: the stored answer as a hit, nothing charged, the cost saved."""
    clock = FakeClock()
    cache, key = await _cache_with_a_read(clock)
    clock.t += RECENT_READ_S
    recalled = cache.recall(key)
    assert recalled is not None
    assert (recalled.content, recalled.id, recalled.is_cache_hit) == ("hello", "c-1", True)
    assert (recalled.cost_usd, recalled.saved_cost_usd, recalled.attempts) == (0.0, 2e-6, 0)
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)
    await cache.aclose()


async def test_a_read_older_than_a_second_is_not_recalled() -> None:
    """Past the second the caller must read the store again; nothing is counted."""
    clock = FakeClock()
    cache, key = await _cache_with_a_read(clock)
    clock.t += RECENT_READ_S + 0.001
    assert cache.recall(key) is None
    clock.t -= 1.0  # forgotten, not merely too old: even an earlier time finds nothing
    assert cache.recall(key) is None
    assert cache.stats.hits == 1
    await cache.aclose()


async def test_a_key_never_read_is_not_recalled() -> None:
    """A miss that stored an answer has read nothing: there is nothing to recall."""
    clock = FakeClock()
    config = CacheConfig()
    cache = ResponseCache(config, store=CacheStore(config, clock=clock), clock=clock)
    await cache.complete(REQUEST, fetch=_fetch, deadline=Deadline.after(None))
    assert cache.recall(cache.key_for(REQUEST)) is None
    await cache.aclose()


async def test_a_read_that_finds_nothing_ends_the_recall() -> None:
    """An entry gone from the store (expired, evicted) is not recalled for the rest of
    its second: the read that found it missing forgets it."""
    clock = FakeClock()
    cache, key = await _cache_with_a_read(clock)
    await cache.store._cache.delete(key)  # as the store's TTL would
    assert await cache._read(key) is None
    assert cache.recall(key) is None
    await cache.aclose()


class _SlowReadStore(CacheStore):
    """A memory store whose reads return what they found only once `release` is set."""

    def __init__(self, config: CacheConfig, clock: FakeClock) -> None:
        super().__init__(config, clock=clock)
        self.release = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        data = await super().get(key)
        await self.release.wait()
        return data


async def test_a_read_that_overlaps_a_write_is_not_remembered() -> None:
    """Bytes read before a write landed must not be recalled after it."""
    clock = FakeClock()
    config = CacheConfig()
    store = _SlowReadStore(config, clock)
    cache = ResponseCache(config, store=store, clock=clock)
    key = cache.key_for(REQUEST)
    await store.set(key, CachedAnswer.of_unary(ANSWER).encode(), ttl_s=60)
    read = asyncio.create_task(cache._read(key))
    await asyncio.sleep(0)  # the read has the old bytes and waits
    newer = dataclasses.replace(ANSWER, id="c-2", content="newer")
    refresh = dataclasses.replace(REQUEST, cache=CachePolicy(mode=CacheMode.REFRESH))

    async def fetch_newer() -> Completion:
        return newer

    # The refresh stores its answer while the read still holds the old bytes.
    await cache.complete(refresh, fetch=fetch_newer, deadline=Deadline.after(None))
    store.release.set()
    old = await read
    assert old is not None
    assert old.completion.id == "c-1"  # the read did return the bytes from before the write
    assert cache.recall(key) is None
    await cache.aclose()
