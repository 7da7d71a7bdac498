"""The byte store: sizes, counters, and a failing backend that only costs misses."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from service.cache import CacheStore
from service.cache.store import BoundedMemoryCache
from service.config import CacheConfig
from tests.fake_clock import FakeClock
from tests.redis_server import RedisServer


async def test_memory_round_trip_and_byte_counters() -> None:
    """What is set is got back byte for byte, and the bytes are counted both ways."""
    async with CacheStore(CacheConfig()) as store:
        assert await store.get("k") is None
        assert await store.set("k", b"\x00value\xff", ttl_s=60)
        assert await store.get("k") == b"\x00value\xff"
        stats = store.stats
        assert (stats.stores, stats.bytes_written, stats.bytes_read) == (1, 7, 7)


async def test_entries_over_the_size_limit_are_skipped() -> None:
    """An entry larger than max_entry_bytes is not stored, and counted as skipped."""
    async with CacheStore(CacheConfig(max_entry_bytes=1024)) as store:
        assert not await store.set("k", b"x" * 1025, ttl_s=60)
        assert await store.get("k") is None
        assert (store.stats.skipped, store.stats.stores) == (1, 0)


async def test_unreachable_redis_degrades_and_cools_down(refused_port: int) -> None:
    """Refused connections are misses; the store is then skipped until the cooldown ends."""
    clock = FakeClock()
    config = CacheConfig(
        backend="redis",
        redis_url=f"redis://127.0.0.1:{refused_port}/0",
        operation_timeout_s=2.0,
        error_cooldown_s=5.0,
    )
    async with CacheStore(config, clock=clock) as store:
        assert await store.get("k") is None
        assert store.stats.errors == 1
        assert await store.get("k") is None
        assert not await store.set("k", b"v", ttl_s=60)
        assert (store.stats.errors, store.stats.unavailable) == (1, 2)
        clock.t += 5.0
        assert await store.get("k") is None
        assert (store.stats.errors, store.stats.unavailable) == (2, 2)


async def test_past_the_cool_down_one_operation_tries_a_hung_redis_while_the_rest_skip_it() -> None:
    """A Redis that stops answering (paused) costs one operation its timeout each
    cool-down, not every operation in flight as the cool-down ends; once that one is
    answered, every operation uses the store again.

    Before, each operation past the cool-down tried the hung Redis and waited out its
    timeout: five at once, five timeouts."""
    clock = FakeClock()
    server = RedisServer()
    await server.start()
    config = CacheConfig(
        backend="redis",
        redis_url=f"redis://127.0.0.1:{server.port}/0",
        operation_timeout_s=0.2,
        error_cooldown_s=5.0,
    )
    try:
        async with CacheStore(config, clock=clock) as store:
            assert await store.set("k", b"v", ttl_s=60)
            server.pause()
            assert await store.get("k") is None  # its timeout: the cool-down starts
            assert (store.stats.errors, store.stats.unavailable) == (1, 0)
            clock.t += 5.0
            tries = [store.get("k") for _ in range(5)]
            assert await asyncio.gather(*tries) == [None] * 5
            assert (store.stats.errors, store.stats.unavailable) == (2, 4)
            server.resume()
            clock.t += 5.0
            tries = [store.get("k") for _ in range(3)]
            assert await asyncio.gather(*tries) == [b"v", None, None]  # one tried it
            assert (store.stats.errors, store.stats.unavailable) == (2, 6)
            assert await store.get("k") == b"v"  # answered: back for every operation
            assert await store.set("k", b"w", ttl_s=60)
            assert (store.stats.errors, store.stats.unavailable) == (2, 6)
    finally:
        await server.stop()


async def test_a_write_redis_refuses_skips_writes_alone_until_the_cool_down_ends() -> None:
    """Redis out of memory refuses a SET but answers reads: reads go on, writes skip the
    store for the cool-down, and past it one write is tried again (and lands).

    Before, the refused SET turned the whole store off, reads included."""
    clock = FakeClock()
    server = RedisServer()
    await server.start()
    config = CacheConfig(
        backend="redis", redis_url=server.url, operation_timeout_s=1.0, error_cooldown_s=5.0
    )
    client = aioredis.from_url(server.url)
    try:
        async with CacheStore(config, clock=clock) as store:
            assert await store.set("k", b"v", ttl_s=60)
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", "1")
            assert not await store.set("other", b"w", ttl_s=60)
            assert await store.get("k") == b"v"
            assert not await store.set("other", b"w", ttl_s=60)  # skipped, not sent
            assert (store.stats.errors, store.stats.unavailable) == (1, 1)
            await client.config_set("maxmemory", "0")
            clock.t += 5.0
            assert await store.set("other", b"w", ttl_s=60)
            assert await store.set("third", b"x", ttl_s=60)
            assert (store.stats.errors, store.stats.unavailable) == (1, 1)
    finally:
        await client.aclose()
        await server.stop()


async def test_password_comes_from_the_environment() -> None:
    """The Redis password is read from the named variable, never from the URL."""
    config = CacheConfig(
        backend="redis", redis_url="redis://127.0.0.1:1/0", redis_password_env="TEST_REDIS_PW"
    )
    store = CacheStore(config, environ={"TEST_REDIS_PW": "s3cret"})
    assert store._cache.password == "s3cret"
    await store.aclose()


async def test_a_redis_store_reads_what_it_wrote_with_the_password_and_db_configured() -> None:
    """Reads go through the lean client, writes through aiocache: both connect with the
    configured password to the URL's db, so a value written is read back, bytes intact,
    and is in that db alone."""
    server = RedisServer(password="cache-pw")
    await server.start()
    try:
        config = CacheConfig(
            backend="redis",
            redis_url=f"redis://127.0.0.1:{server.port}/2",
            redis_password_env="TEST_CACHE_PW",
        )
        async with CacheStore(config, environ={"TEST_CACHE_PW": "cache-pw"}) as store:
            assert await store.get("k") is None
            assert await store.set("k", b"\x00value\xff", ttl_s=60)
            assert await store.get("k") == b"\x00value\xff"
            assert (store.stats.errors, store.stats.bytes_read) == (0, 7)
        db0 = aioredis.Redis.from_url(server.url, password="cache-pw")
        db2 = aioredis.Redis.from_url(config.redis_url, password="cache-pw")
        assert await db0.get("k") is None
        assert await db2.get("k") == b"\x00value\xff"
        await db0.aclose()
        await db2.aclose()
    finally:
        await server.stop()


async def test_a_db_named_by_the_urls_query_is_the_one_the_cache_uses() -> None:
    """`?db=N` (which the config takes, and redis-py, so auth and the ledger, reads over
    the path) picks the cache's db too: one URL for all three keeps them in one db."""
    server = RedisServer()
    await server.start()
    try:
        config = CacheConfig(backend="redis", redis_url=f"redis://127.0.0.1:{server.port}?db=2")
        async with CacheStore(config) as store:
            assert await store.set("k", b"value", ttl_s=60)
            assert await store.get("k") == b"value"
        db0 = aioredis.Redis.from_url(server.url)
        db2 = aioredis.Redis.from_url(config.redis_url)
        assert await db0.get("k") is None
        assert await db2.get("k") == b"value"
        await db0.aclose()
        await db2.aclose()
    finally:
        await server.stop()


async def test_the_memory_store_drops_the_least_recently_used_past_its_bound() -> None:
    """Entries of 2,000 bytes in a 5,000-byte store: the one least recently used goes
    first, then the next; what is held never passes the bound."""
    config = CacheConfig(max_entry_bytes=2000, memory_max_bytes=5000)
    async with CacheStore(config) as store:
        for key in ("a", "b"):
            assert await store.set(key, b"x" * 2000, ttl_s=60)
        assert await store.get("a") == b"x" * 2000  # "a" is now the most recently used
        assert await store.set("c", b"y" * 2000, ttl_s=60)  # drops "b"
        assert [await store.get(k) is not None for k in "abc"] == [True, False, True]
        assert await store.set("d", b"z" * 2000, ttl_s=60)  # drops "a", read before "c"
        assert [await store.get(k) is not None for k in "acd"] == [False, True, True]


async def test_memory_entries_expire_at_their_own_ttl() -> None:
    """Each entry lives its own TTL, measured on the store's clock."""
    now = [0.0]
    memory = BoundedMemoryCache(1000, timer=lambda: now[0])
    await memory.set("short", b"1", ttl=10)
    await memory.set("long", b"2", ttl=100)
    now[0] = 50.0
    assert (await memory.get("short"), await memory.get("long")) == (None, b"2")
    assert memory.size_bytes == 1
    now[0] = 100.0
    assert await memory.get("long") is None


def test_a_memory_bound_smaller_than_one_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="memory_max_bytes"):
        CacheConfig(max_entry_bytes=4096, memory_max_bytes=2048)
