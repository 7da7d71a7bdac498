"""Byte storage behind the cache: in memory (bounded) or on Redis, never failing a request.

Every operation is bounded by `operation_timeout_s`. A failure or timeout is logged,
counted in `CacheStats.errors`, and reported as a miss (read) or a skipped write, so a
slow or stopped Redis costs at most that timeout and never fails the caller. After a
failure the store is left alone for `error_cooldown_s` (counted in `unavailable`), so a
hung Redis does not add its timeout to every request while it is down. Past it one
operation tries Redis while the others go on skipping it, until that one is answered (the
store is back) or fails (left alone again): a hung Redis costs one call its timeout each
cool-down, not every call in flight at its end.

A write Redis refuses with a reply (out of memory under `noeviction`, a read-only replica
mid-failover, an ACL without SET) is no outage: Redis still answers reads, and only writes
are skipped for `error_cooldown_s`. Turning the whole store off would have every miss's
refused write hide the stored answers for the cool-down, and a full Redis serve no hits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiocache import RedisCache
from aiocache.serializers import NullSerializer
from cachetools import TLRUCache
from redis.asyncio.connection import parse_url
from redis.exceptions import ResponseError

from service.cache.stats import CacheStats
from service.clock import SYSTEM_CLOCK, Clock
from service.config import CacheConfig, redis_password
from service.lean_redis import LeanRedis
from service.redis_errors import refuses_access, replacing_closed_connections

__all__ = ["CacheStore"]

log = logging.getLogger("llm_gateway.cache")


class BoundedMemoryCache:
    """The memory backend: each entry until its TTL, the least recently used dropped first
    once they hold more than `max_bytes` (aiocache's memory backend has no bound, so a
    busy gateway, or one tenant asking long TTLs, could fill the process)."""

    def __init__(self, max_bytes: int, *, timer: Callable[[], float] = time.monotonic) -> None:
        self._entries: TLRUCache[str, tuple[bytes, float]] = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _key, entry, now: now + entry[1],
            timer=timer,
            getsizeof=lambda entry: max(1, len(entry[0])),
        )

    @property
    def size_bytes(self) -> int:
        """The bytes the entries hold now."""
        return int(self._entries.currsize)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        # A copy of exactly its length: orjson's bytes keep the buffer it wrote into, about
        # 12 bytes a character of its input: a short answer counted as 500 bytes held 8 KiB.
        self._entries[key] = (bytes(memoryview(value)), ttl)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def close(self) -> None:
        self._entries.clear()


# Set by the backend below (credentials are refused in the URL), never by the URL's query.
_SET_HERE = frozenset(
    {"host", "port", "db", "username", "password", "connection_class", "decode_responses"}
    | {"socket_timeout", "socket_connect_timeout", "max_connections"}
)


def _url_options(url: str) -> tuple[int, dict[str, Any]]:
    """The db and the connection options redis-py reads from `url`, and so auth and the
    ledger given the same URL: a `db` query parameter over the path, a rediss:// URL's
    `ssl_ca_certs` or `ssl_cert_reqs`."""
    options: dict[str, Any] = dict(parse_url(url))
    db = int(options.get("db", 0))
    return db, {name: value for name, value in options.items() if name not in _SET_HERE}


def _backend(config: CacheConfig, environ: Mapping[str, str]) -> Any:
    if config.backend == "memory":
        return BoundedMemoryCache(config.memory_max_bytes)
    # encoding=None: values are bytes in and bytes out.
    serializer = NullSerializer(encoding=None)
    # Our own asyncio.timeout bounds each call; aiocache's would only duplicate it.
    parts = urlsplit(config.redis_url)
    db, url_options = _url_options(config.redis_url)
    password = redis_password(config.redis_password_env, environ)
    return RedisCache(
        serializer=serializer,
        timeout=None,
        endpoint=parts.hostname,
        port=parts.port or 6379,
        db=db,
        password=password,
        ssl=parts.scheme == "rediss",
        create_connection_timeout=config.operation_timeout_s,
        connection_pool_kwargs={
            **url_options,
            "socket_timeout": config.operation_timeout_s,
            **replacing_closed_connections(),
        },
    )


# `_cooling_until` while the store answers: no cool-down to wait out.
_ANSWERING = float("-inf")


class CacheStore:
    """Get and set encoded entries by key with a TTL; errors become misses.

    Owns its aiocache client: `aclose()` (or `async with`) closes the Redis pool.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        stats: CacheStats | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._clock = clock
        self._cooling_until = _ANSWERING
        # Past a write Redis refused: writes skip the store until then, reads go on.
        self._writes_refused_until = _ANSWERING
        self._is_refusing_access = False  # said `store.auth_refused`, not answered since
        self.stats = stats if stats is not None else CacheStats()
        self._cache = _backend(config, os.environ if environ is None else environ)
        # The read every cacheable call makes, without redis-py's (and aiocache's)
        # per-command cost: as the ledger's and the limiter's per-call commands.
        self._reads = None if config.backend == "memory" else LeanRedis.beside(self._cache.client)
        # An in-process dict cannot hang: only a networked backend needs a deadline.
        self._timeout_s = None if config.backend == "memory" else config.operation_timeout_s

    @property
    def backend(self) -> str:
        """`memory` or `redis`."""
        return self._config.backend

    def _is_cooling_down(self) -> bool:
        if self._cooling_until == _ANSWERING:
            return False
        now = self._clock.now()
        if now < self._cooling_until:
            self.stats.unavailable += 1
            return True
        # Past it: this operation tries the store, and the others skip it meanwhile, for
        # as long as it may take too (a timeout longer than the cool-down: one at a time).
        self._cooling_until = now + self._config.error_cooldown_s + (self._timeout_s or 0.0)
        return False

    def _are_writes_refused(self) -> bool:
        if self._writes_refused_until == _ANSWERING:
            return False
        if self._clock.now() < self._writes_refused_until:
            self.stats.unavailable += 1
            return True
        return False

    def _answered(self) -> None:
        """The store answered: it is back, for every operation."""
        self._cooling_until = _ANSWERING
        self._is_refusing_access = False

    def _failed(self, operation: str, exc: Exception, *, is_write_refused: bool = False) -> None:
        """Count and log a failed operation, and leave the store alone for the cool-down:
        every operation, or with `is_write_refused` (Redis answered, refusing a write) the
        writes alone."""
        self.stats.errors += 1
        until = self._clock.now() + self._config.error_cooldown_s
        if is_write_refused:
            # Not `_answered()`: a refusal of access is said once until a write lands.
            self._writes_refused_until = until
            self._cooling_until = _ANSWERING
        else:
            self._cooling_until = until
        if refuses_access(exc):
            # An operator's mistake (a password rotated under the gateway, an ACL too
            # narrow) that will not pass: said loudly, once until Redis answers again.
            if not self._is_refusing_access:
                self._is_refusing_access = True
                log.error(
                    "store.auth_refused",
                    extra={"store": "cache", "error": type(exc).__name__, "reply": str(exc)},
                )
            return
        # The exception type only: a Redis error message may echo the URL or key.
        log.warning(
            "cache.error",
            extra={
                "operation": operation,
                "backend": self._config.backend,
                "error": type(exc).__name__,
            },
        )

    async def get(self, key: str) -> bytes | None:
        """The bytes stored under `key` (empty when it holds another kind of value), or
        None when absent or the store failed."""
        if self._is_cooling_down():
            return None
        try:
            if self._reads is None:
                value = await self._cache.get(key)
            else:
                async with asyncio.timeout(self._timeout_s):
                    value = await self._reads.execute_command("GET", key)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                self._failed("get", exc)
                return None
            # A hash or a list under the key is an unreadable entry, which the fresh
            # answer's SET replaces, not a failing store to leave alone for a while.
            self._answered()
            return b""
        except Exception as exc:  # any store failure degrades to a miss
            self._failed("get", exc)
            return None
        if self._cooling_until != _ANSWERING:
            self._answered()
        if value is None:
            return None
        data = bytes(value)
        self.stats.bytes_read += len(data)
        return data

    async def set(self, key: str, value: bytes, *, ttl_s: int, replacing: bool = False) -> bool:
        """Store `value` for `ttl_s` seconds; False when too large or the store failed.
        With `replacing`, a value not stored removes the entry it was to replace."""
        if len(value) > self._config.max_entry_bytes:
            self.stats.skipped += 1
            if replacing:
                await self.delete(key)
            return False
        if self._is_cooling_down():
            return False
        if self._are_writes_refused():
            if replacing:
                await self._delete(key)  # Redis, refusing writes, still takes a DEL
            return False
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._cache.set(key, value, ttl=ttl_s)
        except Exception as exc:  # a lost write only costs a later miss
            is_refused = isinstance(exc, ResponseError)
            self._failed("set", exc, is_write_refused=is_refused)
            if replacing and is_refused:
                # Redis answered, so it is up: refusing the SET (out of memory) it still
                # takes the DEL.
                await self._delete(key)
            return False
        self._writes_refused_until = _ANSWERING
        self._answered()
        self.stats.stores += 1
        self.stats.bytes_written += len(value)
        return True

    async def delete(self, key: str) -> None:
        """Remove `key`'s entry, if any; a failure is counted and logged, not raised."""
        if self._is_cooling_down():
            return
        await self._delete(key)

    async def _delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._cache.delete(key)
        except Exception as exc:  # the entry then lives out its TTL
            self._failed("delete", exc)
        else:
            self._answered()

    async def aclose(self) -> None:
        """Close the backend's connections."""
        try:
            if self._reads is not None:
                await self._reads.aclose()
                # aiocache's close() calls redis-py's deprecated close(); aclose() is current.
                await self._cache.client.aclose()
            else:
                await self._cache.close()
        except Exception as exc:  # closing a broken connection must not fail shutdown
            self._failed("close", exc)

    async def __aenter__(self) -> CacheStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
