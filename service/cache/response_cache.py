"""The response cache policy: which requests are cached, lookup, single-flight, storing.

`ResponseCache.complete` and `ResponseCache.stream` wrap the pipeline's upstream call
(`fetch`). In order:

1. The effective mode: the request's own, else the configured default when the request
   is cacheable by default, else BYPASS. BYPASS calls upstream and stores nothing.
2. Modes that read look the key up; a hit is served without any upstream call, with
   `cost_usd` 0 and the original cost as `saved_cost_usd`. A stream replays the reasoning
   whole, the stored deltas one by one, then each tool call whole, then the final message.
3. On a miss the request joins the single flight for its key: the first caller starts
   the upstream call, later identical callers share it and are reported as cache hits
   (they cost nothing upstream), marked `is_coalesced` for telemetry, which counts them
   apart from the store's hits. Streams follow the flight's deltas live, from the first.
4. A finished answer is stored (when any of the flight's callers may write) only if it
   finished with stop, length or tool calls; errors and broken streams are never stored.

REFRESH skips the read and the flight: it always makes its own upstream call and stores
the answer. Single-flight is per process; across replicas Redis shares finished answers.

With the in-process memory store, `recall` serves a hit for a key whose answer a store
read returned less than a second ago, without reading the store again: the pipeline's
path for a caller repeating the same request. A write, or a read that finds the key
gone, forgets it at once; an entry can outlive its TTL by up to that second. With Redis
every hit reads Redis, so that replicas never serve an answer another replica replaced.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from service.cache.entry import (
    REMEMBERED_MAX_BYTES,
    CachedAnswer,
    EntryDecodeError,
    NewerEntryError,
    decode_entry,
)
from service.cache.keys import cache_key
from service.cache.single_flight import Flight, SingleFlight
from service.cache.stats import CacheStats
from service.cache.store import CacheStore
from service.clock import SYSTEM_CLOCK, Clock, Deadline
from service.config import CacheConfig
from service.domain import FOLDED_EVERY, CacheMode, ChatRequest, Completion, Delta
from service.errors import DeadlineExceeded, StreamInterrupted, UpstreamError
from service.memo import BoundedMemo

__all__ = ["ResponseCache", "is_deterministic"]

log = logging.getLogger("llm_gateway.cache")

_MS = 1000.0
# The most deltas a stream's cached copy keeps as they came: past it, those that came
# since are joined every `FOLDED_EVERY` (`_folded_tail`), so that millions of
# one-character pieces are not held as as many strings. A hit replays an answer streamed
# in fewer as it came.
MAX_CACHED_DELTAS = 4096
# The first fold joins the `FOLDED_EVERY` that came after those, not the last of them.
_FIRST_FOLD_AT = MAX_CACHED_DELTAS + FOLDED_EVERY
# How long, and for how many keys, `recall` reuses an answer a store read returned.
RECENT_READ_S = 1.0
_RECENT_READS = 256

Fetch = Callable[[], Awaitable[Completion]]
FetchStream = Callable[[], AsyncGenerator[Delta | Completion, None]]


def _ran_out_of_its_leaders_time(exc: BaseException) -> bool:
    """Whether a shared call failed because its first caller's deadline ended it, or cut
    its retries short: a follower with a later deadline may still get an answer."""
    if isinstance(exc, DeadlineExceeded):
        return True
    return isinstance(exc, UpstreamError) and exc.is_cut_short_by_deadline


def is_deterministic(request: ChatRequest) -> bool:
    """Whether the request asks for a reproducible answer: temperature 0 or a seed.

    A negative seed asks for none: llama.cpp reads -1 as "pick a random seed". Nor does
    one whose low 32 bits are all ones (4294967295, 8589934591): llama.cpp keeps only
    those, so it reads it as -1. Whatever the model's upstreams, as a call may fail over
    to one that is llama.cpp.
    """
    params = request.params
    seed = params.seed
    return params.temperature == 0 or (
        seed is not None and seed >= 0 and seed & 0xFFFFFFFF != 0xFFFFFFFF
    )


@dataclass(slots=True)
class _Lookup:
    """One caller's read that found nothing, counted once as the flight it ended on: a
    miss if it called upstream itself, else coalesced. A follower whose shared call
    failed and that tried again counts as its last try alone, so that ratios add up."""

    stats: CacheStats
    is_leader: bool | None = None  # None: no flight joined yet

    def end(self) -> None:
        """Count it (once; later calls change nothing)."""
        if self.is_leader is None:
            return
        if self.is_leader:
            self.stats.misses += 1
        else:
            self.stats.coalesced += 1
        self.is_leader = None


@dataclass(slots=True)
class _StorePlan:
    """Whether (and for how long) a flight's answer is stored; any writer turns it on."""

    ttl_s: int
    is_wanted: bool


class ResponseCache:
    """Caches completions per tenant and request, shares identical in-flight calls.

    Owns its store and its flights: `aclose()` cancels flights and closes the store.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        store: CacheStore,
        default_mode: CacheMode = CacheMode.DEFAULT,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._store = store
        self._default_mode = default_mode
        self._clock = clock
        self._flights: SingleFlight[CachedAnswer] = SingleFlight()
        self._plans: dict[str, _StorePlan] = {}
        self._recent: BoundedMemo[str, tuple[CachedAnswer, float]] = BoundedMemo(_RECENT_READS)
        self._recalls = config.enabled and store.backend == "memory"
        self._writes = 0  # writes begun, so that a read overlapping one is not remembered
        self._has_skipped_newer = False  # logged at INFO once: a rollout is under way

    @property
    def stats(self) -> CacheStats:
        """Counters: hits, misses, coalesced, errors, stores, skipped, bytes."""
        return self._store.stats

    @property
    def store(self) -> CacheStore:
        """The byte store behind the cache."""
        return self._store

    @property
    def in_flight(self) -> int:
        """Shared upstream calls running now."""
        return len(self._flights)

    @property
    def following(self) -> int:
        """Callers waiting on a shared upstream call now, its first caller included."""
        return self._flights.following

    def mode_for(self, request: ChatRequest) -> CacheMode:
        """The cache mode this request gets."""
        if not self._config.enabled:
            return CacheMode.BYPASS
        if request.cache.mode is not None:
            return request.cache.mode
        cacheable = self._config.cacheable_by_default
        if cacheable == "all" or (cacheable == "deterministic" and is_deterministic(request)):
            return self._default_mode
        return CacheMode.BYPASS

    def ttl_for(self, request: ChatRequest) -> int:
        """Seconds an answer to `request` stays cached: its override, capped, or the default."""
        return min(request.cache.ttl_s or self._config.default_ttl_s, self._config.max_ttl_s)

    def key_for(self, request: ChatRequest) -> str:
        """The store key of `request`."""
        return cache_key(request, prefix=self._config.key_prefix)

    async def _read(self, key: str) -> CachedAnswer | None:
        writes_before = self._writes
        storing = self._flights.current(key)
        data = await self._store.get(key)
        if data is None and storing is not None and self._flights.current(key) is None:
            # The shared call of this key ended during the read, its answer stored perhaps
            # after the read looked: read again, or this call would pay the upstream for an
            # answer the cache has (and a follower that came a moment sooner got free).
            data = await self._store.get(key)
        if data is None:
            self._recent.pop(key)  # gone from the store (expired): gone for `recall` too
            return None
        try:
            answer = decode_entry(data)
        except NewerEntryError as exc:
            self._recent.pop(key)
            self._skip_newer(exc.version)
            return None
        except EntryDecodeError as exc:
            self.stats.errors += 1
            self._recent.pop(key)
            log.warning("cache.bad_entry", extra={"error": str(exc)})
            return None
        if answer is None:
            # An older release's entry that this one would not store (text of invisible
            # characters alone, refused as empty when sent back): a miss, its fresh
            # answer stored over it if it may be.
            self._recent.pop(key)
            return None
        self.stats.hits += 1
        # Not if a write began while the store was read: the bytes may predate it.
        # Only entries `decode_entry` remembers too: the same object, not a second copy.
        if self._recalls and len(data) <= REMEMBERED_MAX_BYTES and self._writes == writes_before:
            self._recent.put(key, (answer, self._clock.now()))
        return answer

    def _skip_newer(self, version: int) -> None:
        """Note a newer gateway's entry, read as a miss. A rolling upgrade has every old
        replica read these for its whole duration: not an error, nor a warning on each
        read, but said once, so that the dip in hits it causes has an explanation."""
        extra = {"entry_version": version}
        if self._has_skipped_newer:
            log.debug("cache.newer_entry_skipped", extra=extra)
            return
        self._has_skipped_newer = True
        log.info("cache.newer_entries_skipped", extra=extra)

    @property
    def recalls(self) -> bool:
        """Whether `recall` can ever serve a hit (the memory backend, the cache enabled)."""
        return self._recalls

    def recall(self, key: str) -> Completion | None:
        """A hit for `key` from the answer a store read returned in the last second.

        None when there is none that recent, or the store is Redis: the caller then goes
        through `complete`, whose read (when it hits) makes the answer recent again.
        """
        started = self._clock.now()
        recent = self._recent.get(key)
        if recent is None:
            return None
        answer, read_at = recent
        if started - read_at > RECENT_READ_S:
            self._recent.pop(key)
            return None
        # `stats` and `_elapsed_ms` written out: a frame each on every recalled hit.
        self._store.stats.hits += 1
        elapsed = (self._clock.now() - started) * _MS
        return answer.served_from_cache(total_ms=elapsed, first_token_ms=elapsed)

    async def _write(
        self, key: str, answer: CachedAnswer, ttl_s: int, *, replaces: bool = False
    ) -> None:
        """Store `answer`; with `replaces` (a REFRESH), an answer that cannot be stored
        (its finish reason, its size) removes the entry it was to replace, which the
        caller asked not to be served again."""
        self._writes += 1
        self._recent.pop(key)  # whatever the store holds next, a recall must not predate it
        if not answer.is_cacheable:
            self.stats.skipped += 1
            if replaces:
                await self._store.delete(key)
        else:
            await self._store.set(key, answer.encode(), ttl_s=ttl_s, replacing=replaces)

    def _join(
        self,
        key: str,
        request: ChatRequest,
        mode: CacheMode,
        call: Callable[[Callable[[Delta], None]], Awaitable[CachedAnswer]],
        sent_nothing: Callable[[], bool] | None,
    ) -> tuple[Flight[CachedAnswer], bool]:
        own_plan = _StorePlan(self.ttl_for(request), mode.writes)

        async def store(answer: CachedAnswer) -> None:
            plan = self._plans.pop(key, None)
            if plan is not None and plan.is_wanted:
                await self._write(key, answer, plan.ttl_s)

        def drop_plan() -> None:
            # Only its own: an abandoned flight may wind down after a new one started.
            if self._plans.get(key) is own_plan:
                del self._plans[key]

        flight, is_leader = self._flights.join(
            key, call, after=store, on_end=drop_plan, sent_nothing=sent_nothing
        )
        if is_leader:
            self._plans[key] = own_plan
        else:
            plan = self._plans.get(key)
            if plan is not None and mode.writes and not plan.is_wanted:
                plan.ttl_s, plan.is_wanted = self.ttl_for(request), True
        return flight, is_leader

    def _elapsed_ms(self, started: float) -> float:
        return (self._clock.now() - started) * _MS

    async def complete(
        self,
        request: ChatRequest,
        *,
        fetch: Fetch,
        deadline: Deadline,
        key: str | None = None,
        sent_nothing: Callable[[], bool] | None = None,
    ) -> Completion:
        """The answer to `request`: from the cache, a shared call, or `fetch()`.

        `key`, when given, is `key_for(request)` already derived by the caller.
        `sent_nothing` says whether nothing of `fetch`'s call was sent yet: a caller
        cancelled as it shares that call is told so (`SingleFlight.wait`).
        """
        mode = self.mode_for(request)
        if mode is CacheMode.BYPASS:
            return await fetch()
        started = self._clock.now()
        if key is None:
            key = self.key_for(request)
        if not mode.reads:
            completion = await fetch()
            await self._write(
                key,
                CachedAnswer.of_unary(completion),
                self.ttl_for(request),
                replaces=True,  # REFRESH: BYPASS, the other mode that does not read, left above
            )
            return completion
        try:
            cached = await self._read(key)
        except BaseException:
            # Cancelled while the store read (a slow Redis, a short deadline): no answer
            # came from the cache, and its lookup must count under some result, or the
            # results would not add up to the lookups. A try costs nothing till it catches.
            self.stats.misses += 1
            raise
        if cached is not None:
            elapsed = self._elapsed_ms(started)
            return cached.served_from_cache(total_ms=elapsed, first_token_ms=elapsed)

        async def call(publish: Callable[[Delta], None]) -> CachedAnswer:
            return CachedAnswer.of_unary(await fetch())

        # A follower whose flight ran out of its leader's (shorter) deadline tries again,
        # for as long as its own deadline allows: each failed flight had its own leader.
        # So does one whose leader was a stream cut after sending text: that cannot be
        # retried for the stream's caller, but this caller received none of it.
        lookup = _Lookup(self.stats)
        try:
            while True:
                flight, is_leader = self._join(key, request, mode, call, sent_nothing)
                lookup.is_leader = is_leader
                joined = self._clock.now()
                try:
                    answer = await self._flights.wait(flight)
                except (DeadlineExceeded, UpstreamError) as exc:
                    is_mendable = _ran_out_of_its_leaders_time(exc) or isinstance(
                        exc, StreamInterrupted
                    )
                    if is_leader or deadline.has_expired or not is_mendable:
                        raise
                    continue
                break
        finally:
            lookup.end()
        if is_leader:
            return answer.completion
        elapsed = self._elapsed_ms(started)
        return answer.served_from_cache(
            total_ms=elapsed, first_token_ms=elapsed, waited_ms=self._elapsed_ms(joined)
        )

    async def stream(
        self,
        request: ChatRequest,
        *,
        fetch: FetchStream,
        deadline: Deadline,
        sent_nothing: Callable[[], bool] | None = None,
    ) -> AsyncGenerator[Delta | Completion, None]:
        """The streamed answer to `request`: replayed, shared live, or from `fetch()`;
        `sent_nothing` as for `complete`."""
        mode = self.mode_for(request)
        if mode is CacheMode.BYPASS:
            async with contextlib.aclosing(fetch()) as events:
                async for event in events:
                    yield event
            return
        started = self._clock.now()
        key = self.key_for(request)
        if not mode.reads:
            async with contextlib.aclosing(self._refresh_stream(key, request, fetch)) as events:
                async for event in events:
                    yield event
            return
        try:
            cached = await self._read(key)
        except BaseException:
            self.stats.misses += 1  # as in `complete`
            raise
        if cached is not None:
            first_token_ms: float | None = None
            for delta in cached.replay():
                yield delta
                if first_token_ms is None:
                    first_token_ms = self._elapsed_ms(started)
            elapsed = self._elapsed_ms(started)
            yield cached.served_from_cache(
                total_ms=elapsed,
                first_token_ms=elapsed if first_token_ms is None else first_token_ms,
            )
            return

        async def call(publish: Callable[[Delta], None]) -> CachedAnswer:
            deltas: list[str] = []
            held, fold_at = 0, _FIRST_FOLD_AT  # deltas since the last fold; when to fold
            completion: Completion | None = None
            async with contextlib.aclosing(fetch()) as events:
                async for event in events:
                    if isinstance(event, Completion):
                        completion = event
                    else:
                        if event.content:  # reasoning or tool calls only: in the completion
                            deltas.append(event.content)
                            held += 1
                            if held == fold_at:
                                _folded_tail(deltas)
                                held, fold_at = 0, FOLDED_EVERY
                        publish(event)
            if completion is None:  # the pipeline ends every stream with a Completion
                raise RuntimeError("stream ended without its completion")
            return CachedAnswer(completion, tuple(deltas))

        lookup = _Lookup(self.stats)
        while True:  # retried as in `complete`
            flight, is_leader = self._join(key, request, mode, call, sent_nothing)
            lookup.is_leader = is_leader
            joined = self._clock.now()
            sent = 0
            first_token_ms = None
            answer: CachedAnswer | None = None
            try:
                async with contextlib.aclosing(self._flights.follow(flight)) as items:
                    async for item in items:
                        if isinstance(item, CachedAnswer):
                            answer = item
                            break
                        yield item
                        sent += 1
                        if first_token_ms is None:
                            first_token_ms = self._elapsed_ms(started)
            except (DeadlineExceeded, UpstreamError) as exc:
                is_mendable = _ran_out_of_its_leaders_time(exc)
                if is_leader or sent or deadline.has_expired or not is_mendable:
                    lookup.end()
                    raise
                continue
            except BaseException:  # cancelled, or closed while yielding a delta
                lookup.end()
                raise
            lookup.end()
            if answer is None:  # follow() always ends with the result or raises
                raise RuntimeError("flight ended without its answer")
            # A unary flight publishes no deltas: its answer replays whole.
            for delta in answer.replay() if sent == 0 else ():
                yield delta
                if first_token_ms is None:
                    first_token_ms = self._elapsed_ms(started)
            if is_leader:
                yield answer.completion
            else:
                elapsed = self._elapsed_ms(started)
                yield answer.served_from_cache(
                    total_ms=elapsed,
                    first_token_ms=elapsed if first_token_ms is None else first_token_ms,
                    waited_ms=self._elapsed_ms(joined),
                )
            return

    async def _refresh_stream(
        self, key: str, request: ChatRequest, fetch: FetchStream
    ) -> AsyncGenerator[Delta | Completion, None]:
        deltas: list[str] = []
        held, fold_at = 0, _FIRST_FOLD_AT  # deltas since the last fold; when to fold
        async with contextlib.aclosing(fetch()) as events:
            async for event in events:
                if isinstance(event, Completion):
                    await self._write(
                        key,
                        CachedAnswer(event, tuple(deltas)),
                        self.ttl_for(request),
                        replaces=True,
                    )
                elif event.content:
                    deltas.append(event.content)
                    held += 1
                    if held == fold_at:
                        _folded_tail(deltas)
                        held, fold_at = 0, FOLDED_EVERY
                yield event

    async def aclose(self) -> None:
        """Cancel shared calls still running, then close the store."""
        await self._flights.aclose()
        await self._store.aclose()

    async def __aenter__(self) -> ResponseCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _folded_tail(deltas: list[str]) -> None:
    """The last `FOLDED_EVERY` of `deltas` joined into one, in place: the same text in
    fewer strings, none of an earlier fold's copied again."""
    deltas[-FOLDED_EVERY:] = ["".join(deltas[-FOLDED_EVERY:])]
