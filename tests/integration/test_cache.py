"""The response cache end to end: real gateway, fake upstream, memory and real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import orjson
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.cache import ResponseCache
from service.cache.entry import _ENTRY_VERSION
from service.config import MAX_TTL_S, parse_config
from tests.conftest import (
    FAKE_MODEL,
    RunningGateway,
    chat,
    chat_stream,
    gateway_config,
    gateway_config_data,
)
from tests.counting_relay import CountingRelay
from tests.fake_upstream import CutStream, EndWithoutDone, FakeUpstream, Reply, Status
from tests.integration.test_resilience import error_details
from tests.redis_server import RedisServer
from tests.scripted_upstream import ScriptedUpstream, user_text
from tests.telemetry_support import attributes_of, captured_telemetry

pytestmark = pytest.mark.timeout(60)

DETERMINISTIC = pb.GenerationParams(temperature=0.0)
# Fake upstream price: 7 input and 3 output tokens at 0.14 / 0.42 USD per million.
REPLY_COST_USD = (7 * 0.14 + 3 * 0.42) / 1_000_000


@pytest.fixture
async def cached(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    cache_section: dict[str, Any],
) -> RunningGateway:
    """A gateway with the cache on, in front of one fake upstream."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache=cache_section)
    )
    return gateway


def cache_of(gateway: RunningGateway) -> ResponseCache:
    """The gateway's response cache."""
    assert gateway.server.pipeline is not None
    cache = gateway.server.pipeline.cache
    assert cache is not None
    return cache


async def eventually(condition: Callable[[], Any], *, timeout_s: float = 10.0) -> None:
    """Poll `condition` (sync or async) until it is true, or fail after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.005)


async def settled(gateway: RunningGateway) -> None:
    """Wait until no shared call is still storing its answer."""
    await eventually(lambda: cache_of(gateway).in_flight == 0)


def ask(content: str = "Say hi", **fields: Any) -> pb.CompleteRequest:
    """A deterministic (cacheable by default) request."""
    fields.setdefault("params", DETERMINISTIC)
    return chat(content, **fields)


async def test_second_identical_request_is_a_free_hit(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A repeated request is served from the cache: no upstream call, cost 0, cost saved."""
    first = await cached.stub.Complete(ask())
    await settled(cached)
    second = await cached.stub.Complete(ask())
    assert len(upstream.requests) == 1
    assert not first.metadata.cache_hit
    assert first.metadata.cost_usd == pytest.approx(REPLY_COST_USD)
    assert second.metadata.cache_hit
    assert second.content == first.content
    assert second.metadata.cost_usd == 0.0
    assert second.metadata.saved_cost_usd == pytest.approx(REPLY_COST_USD)
    assert (second.metadata.id, second.metadata.usage) == (first.metadata.id, first.metadata.usage)
    assert second.metadata.attempts == 0
    stats = cache_of(cached).stats
    assert (stats.hits, stats.misses, stats.stores, stats.errors) == (1, 1, 1, 0)
    assert stats.bytes_read == stats.bytes_written > 0


async def test_a_hit_waits_on_no_limit_though_its_answer_did(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A hit, unary or replayed as a stream, reports `queued_ms` 0, as it does
    `upstream_ms`: the answer it replays waited in its upstream's limiter, the hit did
    not."""
    paused = {
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "300ms",
    }
    upstream.script(Reply(headers=paused))
    await cached.stub.Complete(ask("Warm up"))  # its answer pauses the upstream
    miss = (await cached.stub.Complete(ask())).metadata
    await settled(cached)
    hit = (await cached.stub.Complete(ask())).metadata
    stream = cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC))
    replay = [event async for event in stream][-1].final
    assert len(upstream.requests) == 2
    assert (miss.cache_hit, hit.cache_hit, replay.cache_hit) == (False, True, True)
    assert miss.timings.queued_ms > miss.timings.upstream_ms  # the pause held it
    assert hit.timings.queued_ms == replay.timings.queued_ms == 0.0


def _variant(name: str) -> pb.CompleteRequest:
    base = ask()
    match name:
        case "model":
            base.model = "other-model"
        case "role":
            base.messages[0].role = pb.ROLE_SYSTEM
        case "content":
            base.messages[0].content = "Say hello"
        case "extra message":
            base.messages.add(role=pb.ROLE_ASSISTANT, content="hi")
        case "temperature unset":
            base.params.ClearField("temperature")
            base.cache.mode = pb.CACHE_MODE_DEFAULT
        case "top_p":
            base.params.top_p = 0.5
        case "max_tokens":
            base.params.max_tokens = 5
        case "stop":
            base.params.stop.append("\n")
        case "seed zero":
            base.params.seed = 0
        case "presence_penalty zero":
            base.params.presence_penalty = 0.0
        case "frequency_penalty":
            base.params.frequency_penalty = 0.5
        case "json mode":
            base.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
        case "json schema":
            base.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
            base.params.response_format.json_schema = '{"type": "object"}'
    return base


VARIANTS = [
    "model",
    "role",
    "content",
    "extra message",
    "temperature unset",
    "top_p",
    "max_tokens",
    "stop",
    "seed zero",
    "presence_penalty zero",
    "frequency_penalty",
    "json mode",
    "json schema",
]


@pytest.mark.parametrize("field", VARIANTS)
async def test_changing_one_field_misses(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer, field: str
) -> None:
    """Changing any one output-relevant field is a miss; the original still hits (Redis)."""
    upstream.models.append("other-model")
    config = gateway_config(
        upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url}
    )
    config.upstreams[0].models["other-model"] = "other-model"  # type: ignore[index]
    gateway: RunningGateway = await start_gateway(config)
    await gateway.stub.Complete(ask())
    await settled(gateway)
    changed = await gateway.stub.Complete(_variant(field))
    await settled(gateway)
    again = await gateway.stub.Complete(ask())
    assert not changed.metadata.cache_hit
    assert again.metadata.cache_hit
    assert len(upstream.requests) == 2


def _text_format(request: pb.CompleteRequest) -> pb.CompleteRequest:
    request.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_TEXT
    return request


@pytest.mark.parametrize("text_first", [True, False], ids=["text first", "unset first"])
async def test_a_text_format_shares_the_unset_formats_entry(
    cached: RunningGateway, upstream: FakeUpstream, text_first: bool
) -> None:
    """An explicit text format asks for what an unset one does: the second of the two is
    a hit, in either order. The first still sends its format as the caller set it."""
    requests = [_text_format(ask()), ask()]
    if not text_first:
        requests.reverse()
    first = await cached.stub.Complete(requests[0])
    await settled(cached)
    second = await cached.stub.Complete(requests[1])
    assert (first.metadata.cache_hit, second.metadata.cache_hit) == (False, True)
    [sent] = [request.body.get("response_format") for request in upstream.requests]
    assert sent == ({"type": "text"} if text_first else None)


def _schema_format(name: str) -> pb.CompleteRequest:
    request = ask("Answer in JSON")
    request.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    request.params.response_format.json_schema = '{"type": "object"}'
    request.params.response_format.schema_name = name
    return request


async def test_a_schema_named_response_shares_the_unnamed_schemas_entry(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """An unnamed schema is sent named "response": one so named is the same request, a
    hit, and a schema of another name is not."""
    upstream.default = Reply(content='{"a": 1}')
    replies = []
    for name in ("", "response", "answer"):
        replies.append(await cached.stub.Complete(_schema_format(name)))
        await settled(cached)
    assert [r.metadata.cache_hit for r in replies] == [False, True, False]
    names = [r.body["response_format"]["json_schema"]["name"] for r in upstream.requests]
    assert names == ["response", "answer"]


async def test_tenants_never_share_entries(cached: RunningGateway, upstream: FakeUpstream) -> None:
    """The same request from two tenants is two misses; each tenant then hits its own entry."""
    from service.clock import Deadline
    from service.domain import ChatRequest, GenerationParams, Message, Role

    pipeline = cached.server.pipeline
    assert pipeline is not None

    def request(tenant: str) -> ChatRequest:
        return ChatRequest(
            model=FAKE_MODEL,
            messages=(Message(Role.USER, "Say hi"),),
            params=GenerationParams(temperature=0.0),
            tenant=tenant,
        )

    upstream.script(Reply(content="for a"), Reply(content="for b"))
    a1 = await pipeline.complete(request("a"), deadline=Deadline.after(10))
    await settled(cached)
    b1 = await pipeline.complete(request("b"), deadline=Deadline.after(10))
    await settled(cached)
    a2 = await pipeline.complete(request("a"), deadline=Deadline.after(10))
    b2 = await pipeline.complete(request("b"), deadline=Deadline.after(10))
    assert (a1.content, b1.content) == ("for a", "for b")
    assert (a1.is_cache_hit, b1.is_cache_hit) == (False, False)
    assert (a2.content, a2.is_cache_hit) == ("for a", True)
    assert (b2.content, b2.is_cache_hit) == ("for b", True)
    assert len(upstream.requests) == 2


async def test_ttl_expiry(cached: RunningGateway, upstream: FakeUpstream) -> None:
    """An entry with a 1 s TTL override hits at once and is gone a little later."""
    request = ask(cache=pb.CachePolicy(ttl_seconds=1))
    await cached.stub.Complete(request)
    await settled(cached)
    assert (await cached.stub.Complete(request)).metadata.cache_hit
    no_store = pb.CachePolicy(mode=pb.CACHE_MODE_NO_STORE)

    async def expired() -> bool:
        return not (await cached.stub.Complete(ask(cache=no_store))).metadata.cache_hit

    await eventually(expired)
    assert len(upstream.requests) >= 2


async def test_the_longest_ttl_the_config_takes_is_one_redis_stores(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], cache_section: dict[str, Any]
) -> None:
    """A request asking the most `ttl_seconds` can, under the longest `max_ttl_s` the config
    takes, is stored and hit, on Redis too (a TTL past what Redis takes failed every write)."""
    longest = {"default_ttl_s": MAX_TTL_S, "max_ttl_s": MAX_TTL_S}
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={**cache_section, **longest})
    )
    for content, policy in [("Say hi", None), ("Say hello", pb.CachePolicy(ttl_seconds=2**32 - 1))]:
        await gateway.stub.Complete(ask(content, cache=policy))
        await settled(gateway)
        assert (await gateway.stub.Complete(ask(content, cache=policy))).metadata.cache_hit
    stats = cache_of(gateway).stats
    assert (stats.stores, stats.errors) == (2, 0)


async def test_bypass_neither_reads_nor_writes(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """BYPASS calls upstream even with an entry present, and stores nothing."""
    await cached.stub.Complete(ask())
    await settled(cached)
    bypass = pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)
    first = await cached.stub.Complete(ask(cache=bypass))
    await cached.stub.Complete(ask("new prompt", cache=bypass))
    await settled(cached)
    fresh = await cached.stub.Complete(ask("new prompt"))
    assert not first.metadata.cache_hit
    assert not fresh.metadata.cache_hit
    assert len(upstream.requests) == 4


async def test_refresh_replaces_the_entry(cached: RunningGateway, upstream: FakeUpstream) -> None:
    """REFRESH skips the read, calls upstream and stores the new answer for later reads."""
    upstream.script(Reply(content="old"), Reply(content="new"))
    await cached.stub.Complete(ask())
    await settled(cached)
    refreshed = await cached.stub.Complete(ask(cache=pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH)))
    await settled(cached)
    later = await cached.stub.Complete(ask())
    assert (refreshed.content, refreshed.metadata.cache_hit) == ("new", False)
    assert (later.content, later.metadata.cache_hit) == ("new", True)
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_refresh_whose_answer_cannot_be_stored_removes_the_old_entry(
    cached: RunningGateway, upstream: FakeUpstream, mode: str
) -> None:
    """A REFRESH asks that the entry not be served again: when its fresh answer cannot
    be stored (a content filter's finish), the old entry goes, rather than answering
    every later call as before."""
    upstream.script(
        Reply(content="old"), Reply(content="", finish_reason="content_filter"), Reply()
    )
    await cached.stub.Complete(ask())
    await settled(cached)
    refresh = pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH)
    if mode == "unary":
        refreshed = await cached.stub.Complete(ask(cache=refresh))
        assert refreshed.metadata.finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    else:
        request = chat_stream(params=DETERMINISTIC, cache=refresh)
        events = [e async for e in cached.stub.CompleteStream(request)]
        assert events[-1].final.finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    await settled(cached)
    later = await cached.stub.Complete(ask())
    assert (later.content, later.metadata.cache_hit) == ("Hello from fake", False)
    assert len(upstream.requests) == 3


async def test_no_store_reads_but_never_writes(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """NO_STORE answers are not stored, yet NO_STORE is served an existing entry."""
    no_store = pb.CachePolicy(mode=pb.CACHE_MODE_NO_STORE)
    await cached.stub.Complete(ask("one", cache=no_store))
    await settled(cached)
    second = await cached.stub.Complete(ask("one"))
    await settled(cached)
    third = await cached.stub.Complete(ask("one", cache=no_store))
    assert not second.metadata.cache_hit
    assert third.metadata.cache_hit
    assert len(upstream.requests) == 2


async def test_sampled_requests_are_not_cached_by_default(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Without temperature 0 or a seed nothing is cached unless the caller asks for it."""
    await cached.stub.Complete(chat())
    await settled(cached)
    repeat = await cached.stub.Complete(chat())
    opted_in = chat(cache=pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT))
    await cached.stub.Complete(opted_in)
    await settled(cached)
    opted_in_again = await cached.stub.Complete(opted_in)
    assert not repeat.metadata.cache_hit
    assert opted_in_again.metadata.cache_hit
    assert len(upstream.requests) == 3


@pytest.mark.parametrize("seed", [0xFFFFFFFF, 0x1FFFFFFFF])
async def test_a_seed_llama_cpp_reads_as_random_is_not_cached_by_default(
    cached: RunningGateway, upstream: FakeUpstream, seed: int
) -> None:
    """llama.cpp keeps a seed's low 32 bits and reads all ones (its -1) as "pick one at
    random": a request with such a seed is sampled, not cached by default; an ordinary
    seed's still is.

    Before, any seed of 0 or more was deterministic: a random answer was stored and
    served to every caller asking with the same seed."""
    random_seed = chat("random", params=pb.GenerationParams(seed=seed))
    fixed_seed = chat("fixed", params=pb.GenerationParams(seed=seed - 1))
    hits = []
    for request in (random_seed, random_seed, fixed_seed, fixed_seed):
        hits.append((await cached.stub.Complete(request)).metadata.cache_hit)
        await settled(cached)
    assert hits == [False, False, False, True]
    assert len(upstream.requests) == 3


async def test_a_ttl_alone_does_not_opt_a_sampled_request_in(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """`ttl_seconds` says how long an answer that is stored stays, not whether it is: a
    sampled request setting only a TTL is not cached (README "Per request"), one that also
    sets `CACHE_MODE_DEFAULT` is, and a deterministic one is with the TTL alone."""
    ttl_only = pb.CachePolicy(ttl_seconds=600)
    opted_in = pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT, ttl_seconds=600)
    outcomes = {}
    for name, request in [
        ("sampled, ttl only", chat("sampled", cache=ttl_only)),
        ("sampled, ttl and mode", chat("opted in", cache=opted_in)),
        ("deterministic, ttl only", ask("deterministic", cache=ttl_only)),
    ]:
        await cached.stub.Complete(request)
        await settled(cached)
        outcomes[name] = (await cached.stub.Complete(request)).metadata.cache_hit
    assert outcomes == {
        "sampled, ttl only": False,
        "sampled, ttl and mode": True,
        "deterministic, ttl only": True,
    }
    assert len(upstream.requests) == 4


@pytest.mark.parametrize(
    "behaviour",
    # 400: an error no retry policy retries, so the upstream sees exactly one call for it.
    # Tool calls are answers like text, and cached (test_tool_calls.py).
    [Status(400), Reply(finish_reason="content_filter")],
    ids=["error", "content_filter"],
)
async def test_errors_and_odd_finishes_are_not_cached(
    cached: RunningGateway, upstream: FakeUpstream, behaviour: Any
) -> None:
    """An error or a finish other than stop, length or tool calls is never stored."""
    upstream.script(behaviour)
    if isinstance(behaviour, Status):
        with pytest.raises(grpc.aio.AioRpcError, match="INVALID_ARGUMENT"):
            await cached.stub.Complete(ask())
    else:
        first = await cached.stub.Complete(ask())
        assert first.metadata.finish_reason != pb.FINISH_REASON_STOP
    await settled(cached)
    after = await cached.stub.Complete(ask())
    assert not after.metadata.cache_hit
    assert len(upstream.requests) == 2
    await settled(cached)  # the good answer's write may still be on its way to Redis
    assert cache_of(cached).stats.stores == 1


@pytest.mark.parametrize(
    "content", ["", " \n\n", "\u200b\u2060 "], ids=["none", "whitespace", "invisible"]
)
@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_empty_answer_is_relayed_but_not_cached(
    cached: RunningGateway, upstream: FakeUpstream, is_stream: bool, content: str
) -> None:
    """An answer with no text (or whitespace or invisible characters alone, which the
    gateway refuses as an empty turn when it is sent back), reasoning or tool call,
    finished `stop` (a provider's null message), reaches its caller but is not stored:
    the next call asks again."""
    upstream.script(Reply(content=content, chunks=2), Reply(content="again"))
    request = chat_stream("empty?", params=DETERMINISTIC) if is_stream else ask("empty?")
    if is_stream:
        events = [e async for e in cached.stub.CompleteStream(request)]
        first = events[-1].final
        assert "".join(e.delta.content for e in events[:-1]) == content
    else:
        response = await cached.stub.Complete(request)
        first = response.metadata
        assert response.content == content
    assert first.finish_reason == pb.FINISH_REASON_STOP
    await settled(cached)
    after = await cached.stub.Complete(ask("empty?"))
    assert (after.content, after.metadata.cache_hit) == ("again", False)
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_unknown_finish_reason_is_relayed_as_stop_but_not_cached(
    cached: RunningGateway, upstream: FakeUpstream, is_stream: bool
) -> None:
    """A finish reason the gateway does not know reaches the caller as STOP, unstored."""
    upstream.script(Reply(finish_reason="foo"))

    async def finish_and_hit() -> tuple[int, bool]:
        if is_stream:
            final = (await _stream(cached))[-1].final
            return final.finish_reason, final.cache_hit
        response = await cached.stub.Complete(ask())
        return response.metadata.finish_reason, response.metadata.cache_hit

    assert await finish_and_hit() == (pb.FINISH_REASON_STOP, False)
    await settled(cached)
    assert await finish_and_hit() == (pb.FINISH_REASON_STOP, False)
    assert len(upstream.requests) == 2
    await settled(cached)  # the second (known) answer's write may still be on its way
    assert cache_of(cached).stats.stores == 1


@pytest.mark.parametrize(
    "behaviour", [CutStream(after_chunks=2), EndWithoutDone(after_chunks=2)], ids=["cut", "eof"]
)
async def test_truncated_streams_are_not_cached(
    cached: RunningGateway, upstream: FakeUpstream, behaviour: Any
) -> None:
    """A stream that breaks off is an error for the caller and leaves no entry."""
    upstream.script(behaviour)
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC))]
    await settled(cached)
    items = [e async for e in cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC))]
    assert not items[-1].final.cache_hit
    assert len(upstream.requests) == 2


async def test_fifty_identical_requests_make_one_upstream_call(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Fifty concurrent identical requests: the upstream sees exactly one, all get the answer."""
    upstream.script(Reply(content="shared", delay_s=0.5))
    replies = await asyncio.gather(*(cached.stub.Complete(ask()) for _ in range(50)))
    assert len(upstream.requests) == 1
    assert {r.content for r in replies} == {"shared"}
    assert sum(not r.metadata.cache_hit for r in replies) == 1
    assert sum(r.metadata.cost_usd for r in replies) == pytest.approx(REPLY_COST_USD)
    assert cache_of(cached).stats.coalesced == 49


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_caller_following_anothers_upstream_call_counts_the_wait_as_upstream(
    cached: RunningGateway, upstream: FakeUpstream, is_stream: bool
) -> None:
    """A follower waits on the first caller's 300 ms upstream call: its timings say so
    (`upstream_ms`), and its `llm-gateway-overhead-ms` trailer leaves that wait out, as
    the first caller's does, instead of reporting it as the gateway's own time."""
    upstream.script(Reply(content="shared", delay_s=0.3))

    async def call() -> tuple[pb.CompletionMetadata, float]:
        if is_stream:
            stream = cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC))
            metadata = [e async for e in stream][-1].final
            trailers = await stream.trailing_metadata()
        else:
            unary = cached.stub.Complete(ask())
            metadata = (await unary).metadata
            trailers = await unary.trailing_metadata()
        return metadata, float(dict(trailers)["llm-gateway-overhead-ms"])

    results = await asyncio.gather(call(), call())
    assert len(upstream.requests) == 1
    [(follower, overhead)] = [(m, o) for m, o in results if m.cache_hit]
    assert follower.timings.upstream_ms >= 250
    assert follower.timings.total_ms >= 300
    assert overhead < 0.5 * follower.timings.total_ms


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_follower_counts_its_leaders_wait_in_the_limiter_as_queued(
    start_gateway: Callable[..., Any], is_stream: bool
) -> None:
    """A follower that joins while its leader waits in the upstream's limiter (its
    `max_concurrency` of 1 held by another call) splits its wait as the leader's timings
    split the call: the limiter's part is its `queued_ms`, its `upstream_ms` no more than
    the leader's; its span says the same, and its overhead trailer leaves both out.

    Before, its whole wait was `upstream_ms` and its `queued_ms` 0: behind a leader queued
    314 ms and upstream 201 ms, a follower reported 512 ms upstream."""

    def respond(body: dict[str, Any]) -> Reply | None:
        return Reply(content="shared", delay_s=0.1) if user_text(body) == "shared" else None

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        data = gateway_config_data(upstream.base_url, cache={"backend": "memory"})
        data["upstreams"][0].update(max_concurrency=1, max_connections=1)
        captured = captured_telemetry()
        gateway = await start_gateway(
            parse_config(data, source="<test>", environ={}), telemetry=captured.telemetry
        )
        cache = cache_of(gateway)

        async def call() -> tuple[pb.CompletionMetadata, float]:
            if is_stream:
                stream = gateway.stub.CompleteStream(chat_stream("shared", params=DETERMINISTIC))
                metadata = [e async for e in stream][-1].final
                trailers = await stream.trailing_metadata()
            else:
                unary = gateway.stub.Complete(ask("shared"))
                metadata = (await unary).metadata
                trailers = await unary.trailing_metadata()
            return metadata, float(dict(trailers)["llm-gateway-overhead-ms"])

        upstream.gate.clear()  # the other call holds the upstream's one slot
        holder = asyncio.ensure_future(gateway.stub.Complete(chat("hold the upstream")))
        await upstream.wait_until(lambda: upstream.in_flight == 1)
        leading = asyncio.ensure_future(call())
        await eventually(lambda: cache.following == 1)
        following = asyncio.ensure_future(call())
        await eventually(lambda: cache.following == 2)
        await asyncio.sleep(0.1)  # both wait, the leader in the limiter
        upstream.gate.set()
        await holder
        (leader, _), (follower, overhead) = await leading, await following
        rpc_span = "llmgateway.v1.CompletionService/" + (
            "CompleteStream" if is_stream else "Complete"
        )

        def follower_span() -> dict[str, Any] | None:
            for span in captured.spans():
                attributes = attributes_of(span)
                if span.name == rpc_span and attributes.get("llm_gateway.cache.coalesced"):
                    return attributes
            return None

        await eventually(lambda: follower_span() is not None)
    assert (leader.cache_hit, follower.cache_hit) == (False, True)
    assert len(upstream.requests) == 2
    timings = follower.timings
    assert 0 < timings.queued_ms <= leader.timings.queued_ms
    assert timings.upstream_ms <= leader.timings.upstream_ms
    assert timings.upstream_ms + timings.queued_ms <= timings.total_ms
    assert follower_span()["llm_gateway.queued_ms"] == pytest.approx(timings.queued_ms)
    assert overhead == pytest.approx(
        timings.total_ms - timings.upstream_ms - timings.queued_ms, abs=50
    )


async def test_identical_requests_share_the_same_error(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """When the shared call fails, every waiter gets the same status, from one call."""
    upstream.script(Status(400, delay_s=0.3))
    results = await asyncio.gather(
        *(cached.stub.Complete(ask()) for _ in range(10)), return_exceptions=True
    )
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    assert len([r for r in results if isinstance(r, grpc.aio.AioRpcError)]) == 10
    assert len(upstream.requests) == 1


async def test_cancelling_one_waiter_does_not_cancel_the_others(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """The first caller cancelling leaves the shared upstream call running for the rest."""
    upstream.script(Reply(content="survives", delay_s=0.5))
    first = cached.stub.Complete(ask())
    await eventually(lambda: upstream.requests)
    others = [asyncio.ensure_future(cached.stub.Complete(ask())) for _ in range(3)]
    await eventually(lambda: cache_of(cached).following == 4)
    first.cancel()
    replies = await asyncio.gather(*others)
    assert [r.content for r in replies] == ["survives"] * 3
    assert len(upstream.requests) == 1
    assert upstream.disconnects == 0


async def test_all_waiters_cancelling_closes_the_upstream_call(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """When every caller has gone, the shared upstream request is closed."""
    upstream.script(Reply(delay_s=30))
    calls = [cached.stub.Complete(ask()) for _ in range(3)]
    await eventually(lambda: upstream.requests)
    # All three following the call: one cancelled before its handler started (a busy
    # machine) would still run as a follower that nobody can cancel any more.
    await eventually(lambda: cache_of(cached).following == 3)
    for call in calls:
        call.cancel()
    await upstream.wait_for_disconnect(timeout_s=10)
    await settled(cached)
    assert len(upstream.requests) == 1


async def _stream(
    gateway: RunningGateway, content: str = "Say hi", **fields: Any
) -> list[pb.CompleteStreamResponse]:
    fields.setdefault("params", DETERMINISTIC)
    return [e async for e in gateway.stub.CompleteStream(chat_stream(content, **fields))]


async def test_stream_replays_delta_by_delta(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A cached stream replays the same deltas in the same pieces, then the final message."""
    upstream.script(Reply(content="one two three four five", chunks=5, chunk_delay_s=0.02))
    live = await _stream(cached)
    await settled(cached)
    replay = await _stream(cached)
    live_deltas = [e.delta.content for e in live if e.HasField("delta")]
    replay_deltas = [e.delta.content for e in replay if e.HasField("delta")]
    assert len(live_deltas) == 5
    assert replay_deltas == live_deltas
    final, again = live[-1].final, replay[-1].final
    assert (final.cache_hit, again.cache_hit) == (False, True)
    assert (again.id, again.usage) == (final.id, final.usage)
    assert again.finish_reason == final.finish_reason == pb.FINISH_REASON_STOP
    assert again.saved_cost_usd == pytest.approx(final.cost_usd)
    assert again.cost_usd == 0.0
    assert len(upstream.requests) == 1


async def test_unary_and_stream_serve_each_other(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A cached unary answer serves a stream, and a cached stream serves a unary call."""
    upstream.script(Reply(content="from unary"), Reply(content="from a stream", chunks=3))
    await cached.stub.Complete(ask("u"))
    await settled(cached)
    streamed = await _stream(cached, "u")
    await _stream(cached, "s")
    await settled(cached)
    unary = await cached.stub.Complete(ask("s"))
    assert "".join(e.delta.content for e in streamed[:-1]) == "from unary"
    assert streamed[-1].final.cache_hit
    assert (unary.content, unary.metadata.cache_hit) == ("from a stream", True)
    assert len(upstream.requests) == 2


async def test_concurrent_identical_streams_share_one_live_call(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Identical streams at once: one upstream stream, every caller gets every delta."""
    upstream.script(Reply(content="a b c d", chunks=4, chunk_delay_s=0.1))
    results = await asyncio.gather(*(_stream(cached) for _ in range(5)))
    for items in results:
        assert [e.delta.content for e in items[:-1]] == ["a ", "b ", "c ", "d"]
    assert sorted(items[-1].final.cache_hit for items in results) == [False] + [True] * 4
    assert len(upstream.requests) == 1


async def test_redis_stopped_mid_test_degrades_to_upstream(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """With Redis gone, requests are still answered from upstream and errors are counted."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={
                "backend": "redis",
                "redis_url": redis_server.url,
                "operation_timeout_s": 0.5,
                "error_cooldown_s": 0,
            },
        )
    )
    await gateway.stub.Complete(ask())
    await settled(gateway)
    assert (await gateway.stub.Complete(ask())).metadata.cache_hit
    await redis_server.stop()
    after = await gateway.stub.Complete(ask())
    streamed = await _stream(gateway)
    await settled(gateway)
    assert (after.content, after.metadata.cache_hit) == ("Hello from fake", False)
    assert not streamed[-1].final.cache_hit
    assert len(upstream.requests) == 3
    assert cache_of(gateway).stats.errors >= 2


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_call_cancelled_while_redis_reads_counts_as_one_miss(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    is_stream: bool,
) -> None:
    """A call cancelled while its cache read waits on a stopped Redis counts as one
    lookup, a miss (no answer came from the cache), so that hits, misses and coalesced
    still add up to the lookups. Before, it counted under none of them."""
    captured = captured_telemetry()
    relay = CountingRelay(f"127.0.0.1:{redis_server.port}")
    async with relay as address:
        cache = {"backend": "redis", "redis_url": f"redis://{address}/0", "operation_timeout_s": 60}
        gateway: RunningGateway = await start_gateway(
            gateway_config(upstream.base_url, cache=cache), telemetry=captured.telemetry
        )
        redis_server.pause()
        try:
            if is_stream:
                call: Any = gateway.stub.CompleteStream(chat_stream("Say hi", params=DETERMINISTIC))
                pending = asyncio.ensure_future(call.read())
            else:
                call = gateway.stub.Complete(ask())
                pending = asyncio.ensure_future(call)
            await eventually(lambda: b"GET" in relay.sent_bytes)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            stats = cache_of(gateway).stats
            await eventually(lambda: stats.hits + stats.misses + stats.coalesced == 1)
        finally:
            redis_server.resume()
        assert (stats.hits, stats.misses, stats.coalesced) == (0, 1, 0)
        assert captured.total("llm_gateway.cache.lookups") == 1
        assert upstream.requests == []


async def _cache_one_answer_and_rewrite_it(
    gateway: RunningGateway, redis_server: RedisServer, change: Callable[[dict[str, Any]], None]
) -> None:
    """Cache one answer in Redis, then `change` its stored entry in place (as JSON)."""
    await gateway.stub.Complete(ask())
    await settled(gateway)
    await _rewrite_the_entry(redis_server, change)


async def _rewrite_the_entry(
    redis_server: RedisServer, change: Callable[[dict[str, Any]], None]
) -> None:
    """`change` the one entry stored in Redis in place (as JSON)."""
    client = aioredis.from_url(redis_server.url)
    try:
        [key] = await client.keys("*")
        entry = orjson.loads(await client.get(key))
        change(entry)
        await client.set(key, orjson.dumps(entry))
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "corrupt",
    [
        {"content": 5},
        {"cost_usd": "0.1"},
        {"usage": {"input_tokens": "7"}},
        {"id": None},
        {"usage": {"input_tokens": 2**64 - 1}},
    ],
    ids=["content", "cost", "usage", "id", "usage-past-int64"],
)
async def test_a_corrupt_redis_entry_is_a_miss_not_an_error(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    corrupt: dict[str, Any],
) -> None:
    """An entry that parses as JSON but holds a field of the wrong type is answered from
    upstream (and overwritten), never INTERNAL."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    await _cache_one_answer_and_rewrite_it(gateway, redis_server, lambda e: e["c"].update(corrupt))
    reply = await gateway.stub.Complete(ask())
    await settled(gateway)
    again = await gateway.stub.Complete(ask())
    assert (reply.content, reply.metadata.cache_hit) == ("Hello from fake", False)
    assert (again.content, again.metadata.cache_hit) == ("Hello from fake", True)
    assert len(upstream.requests) == 2
    assert cache_of(gateway).stats.errors == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_older_releases_invisible_answer_is_a_miss(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    is_stream: bool,
) -> None:
    """An entry of invisible characters alone, which releases before this one stored (and
    old replicas of a rolling upgrade still store), is answered from upstream, as this
    release never stores such an answer: served, it was refused as an empty turn when sent
    back, for the entry's whole TTL. The fresh answer replaces it."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    await _cache_one_answer_and_rewrite_it(
        gateway, redis_server, lambda entry: entry.update(d=["\u200b\u2060"])
    )
    if is_stream:
        final = (await _stream(gateway))[-1].final
        assert not final.cache_hit
    else:
        reply = await gateway.stub.Complete(ask())
        assert (reply.content, reply.metadata.cache_hit) == ("Hello from fake", False)
    await settled(gateway)
    again = await gateway.stub.Complete(ask())
    assert (again.content, again.metadata.cache_hit) == ("Hello from fake", True)
    assert len(upstream.requests) == 2
    assert cache_of(gateway).stats.errors == 0


def _as_a_newer_gateway_writes(version: int) -> Callable[[dict[str, Any]], None]:
    """An entry's change into one of a format this gateway does not know, at `version`."""

    def change(entry: dict[str, Any]) -> None:
        entry.update(v=version, d=None, future=["a field this gateway has never seen"])

    return change


@pytest.mark.parametrize("version", [_ENTRY_VERSION + 1, 99])
async def test_a_newer_gateways_entry_is_a_quiet_miss_during_a_rolling_upgrade(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    version: int,
) -> None:
    """An entry of a newer version than this gateway writes (a newer replica's, mid-rollout)
    is answered from upstream, as a miss: no cache error counted or exported, no warning,
    and one INFO line for the process however often it is read. Before, every read was
    a `cache.bad_entry` warning and a cache error."""
    captured = captured_telemetry()
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url}
        ),
        telemetry=captured.telemetry,
    )
    await _cache_one_answer_and_rewrite_it(
        gateway, redis_server, _as_a_newer_gateway_writes(version)
    )
    with caplog.at_level(logging.DEBUG, logger="llm_gateway.cache"):
        for _ in range(2):
            reply = await gateway.stub.Complete(ask())
            await settled(gateway)
            await _rewrite_the_entry(redis_server, _as_a_newer_gateway_writes(version))
    assert (reply.content, reply.metadata.cache_hit) == ("Hello from fake", False)
    assert len(upstream.requests) == 3
    stats = cache_of(gateway).stats
    assert (stats.hits, stats.misses, stats.errors) == (0, 3, 0)
    assert captured.total("llm_gateway.cache.errors") == 0
    assert captured.total("llm_gateway.cache.lookups", llm_gateway__cache__result="miss") == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    said = [
        (r.levelno, r.message, r.__dict__["entry_version"])
        for r in caplog.records
        if r.name == "llm_gateway.cache"
    ]
    assert said == [
        (logging.INFO, "cache.newer_entries_skipped", version),
        (logging.DEBUG, "cache.newer_entry_skipped", version),
    ]


@pytest.mark.parametrize("version", [0, -1, str(_ENTRY_VERSION), None])
async def test_an_entry_of_a_version_no_gateway_writes_now_stays_a_warning(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    version: object,
) -> None:
    """An older version no longer read, or a version that is no version number, is not a
    rollout's: it is logged `cache.bad_entry` and counted as a cache error (and a miss)."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    await _cache_one_answer_and_rewrite_it(gateway, redis_server, lambda e: e.update(v=version))
    with caplog.at_level(logging.DEBUG, logger="llm_gateway.cache"):
        reply = await gateway.stub.Complete(ask())
    assert (reply.content, reply.metadata.cache_hit) == ("Hello from fake", False)
    assert len(upstream.requests) == 2
    assert cache_of(gateway).stats.errors == 1
    said = [(r.levelno, r.message) for r in caplog.records if r.name == "llm_gateway.cache"]
    assert said == [(logging.WARNING, "cache.bad_entry")]


@pytest.mark.parametrize("deltas", [[5], "Hello", {"Hello": 1}], ids=["number", "text", "map"])
async def test_stored_deltas_of_the_wrong_type_are_a_miss_not_a_replay(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    deltas: Any,
) -> None:
    """An entry whose deltas are not a list of strings is unreadable: a stream is answered
    from upstream, never replayed as the characters or keys of whatever is there."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    await _cache_one_answer_and_rewrite_it(gateway, redis_server, lambda e: e.update(d=deltas))
    streamed = await _stream(gateway)
    await settled(gateway)
    assert "".join(e.delta.content for e in streamed[:-1]) == "Hello from fake"
    assert not streamed[-1].final.cache_hit
    assert len(upstream.requests) == 2
    assert cache_of(gateway).stats.errors == 1


@pytest.mark.parametrize(
    ("field", "count"),
    [("input_tokens", 2**63 - 1), ("input_tokens", -1_000_000), ("reasoning_tokens", 2**40)],
)
async def test_an_entry_whose_usage_no_call_has_is_a_miss_not_recorded(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    field: str,
    count: int,
) -> None:
    """An entry whose token count no call has (negative, or past any real call) is
    unreadable: a hit records its usage, and such a count made the tenant's usage rows
    negative, or past int64, where GetUsage failed with INTERNAL."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    await _cache_one_answer_and_rewrite_it(
        gateway, redis_server, lambda e: e["c"]["usage"].update({field: count})
    )
    replies = [await gateway.stub.Complete(ask()) for _ in range(2)]
    await settled(gateway)
    usage = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert [r.metadata.cache_hit for r in replies] == [False, True]
    assert (usage.requests, usage.usage.input_tokens, usage.usage.reasoning_tokens) == (3, 21, 0)
    assert len(upstream.requests) == 2
    assert cache_of(gateway).stats.errors == 1


async def test_a_foreign_kind_of_value_under_a_key_is_a_miss_not_a_failing_store(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """A hash where an entry should be is an unreadable entry: answered from upstream and
    replaced, while the store stays in use for every other request (no cool-down)."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={"backend": "redis", "redis_url": redis_server.url, "error_cooldown_s": 60},
        )
    )
    await gateway.stub.Complete(ask())
    await settled(gateway)
    client = aioredis.from_url(redis_server.url)
    try:
        [key] = await client.keys("*")
        await client.delete(key)
        await client.hset(key, "field", "value")
        replies = []
        for content in ("Say hi", "Say hi", "Say bye", "Say bye"):
            replies.append(await gateway.stub.Complete(ask(content)))
            await settled(gateway)
    finally:
        await client.aclose()
    assert [r.metadata.cache_hit for r in replies] == [False, True, False, True]
    assert len(upstream.requests) == 3
    assert cache_of(gateway).stats.errors == 1
    assert cache_of(gateway).stats.unavailable == 0


async def test_slow_redis_times_out_then_is_left_alone_for_a_while(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """A frozen Redis costs one timeout, then is skipped while it cools down."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={
                "backend": "redis",
                "redis_url": redis_server.url,
                "operation_timeout_s": 0.2,
                "error_cooldown_s": 60,
            },
        )
    )
    await gateway.stub.Complete(ask("warm up the connection"))
    await settled(gateway)
    stats = cache_of(gateway).stats
    redis_server.pause()
    try:
        replies = [await gateway.stub.Complete(ask(), timeout=10) for _ in range(3)]
        await settled(gateway)
    finally:
        redis_server.resume()
    assert [(r.content, r.metadata.cache_hit) for r in replies] == [("Hello from fake", False)] * 3
    # Only the first read waited for the timeout; the rest skipped the frozen store.
    assert stats.errors == 1
    assert stats.unavailable == 5
    assert len(upstream.requests) == 4


async def test_a_cancelled_lone_stream_closes_the_upstream_stream(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A cacheable stream whose only caller goes away closes the upstream request."""
    upstream.script(Reply(content="a b c d e f g h", chunks=8, chunk_delay_s=0.5))
    call = cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC))
    first = await call.read()
    call.cancel()
    await upstream.wait_for_disconnect(timeout_s=10)
    await settled(cached)
    assert first.delta.content == "a "
    assert cache_of(cached).stats.stores == 0


async def test_a_follower_outliving_the_first_callers_deadline_tries_again(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """The shared call runs under the first caller's deadline; a later caller retries alone."""
    upstream.script(Reply(content="too late", delay_s=2.0), Reply(content="on time"))
    hasty = asyncio.ensure_future(cached.stub.Complete(ask(), timeout=0.5))
    await eventually(lambda: upstream.requests)
    patient = await cached.stub.Complete(ask(), timeout=20)
    with pytest.raises(grpc.aio.AioRpcError, match="DEADLINE_EXCEEDED"):
        await hasty
    assert patient.content == "on time"
    # Each lookup counts once, as its own upstream call: the patient one no longer coalesced.
    assert (cache_of(cached).stats.misses, cache_of(cached).stats.coalesced) == (2, 0)
    assert len(upstream.requests) == 2


async def test_a_follower_outliving_two_shorter_deadlines_still_gets_its_answer(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """The patient caller follows the first call, then the second hasty caller's retry;
    when that one hits its deadline too, the patient caller tries again rather than fail."""
    upstream.script(
        Reply(content="too late", delay_s=3.0),
        Reply(content="too late", delay_s=3.0),
        Reply(content="on time"),
    )
    first = asyncio.ensure_future(cached.stub.Complete(ask(), timeout=0.5))
    await eventually(lambda: upstream.requests)
    second = asyncio.ensure_future(cached.stub.Complete(ask(), timeout=1.5))
    await eventually(lambda: cache_of(cached).following == 2)
    patient = await cached.stub.Complete(ask(), timeout=20)
    for hasty in (first, second):
        with pytest.raises(grpc.aio.AioRpcError, match="DEADLINE_EXCEEDED"):
            await hasty
    assert patient.content == "on time"
    assert len(upstream.requests) == 3


async def test_a_shared_stream_outlives_its_first_callers_deadline(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Once text flows a shared stream is bounded by its callers, not by the first one's
    deadline: the hasty caller ends at its deadline, the patient one gets the whole answer."""
    upstream.script(Reply(content="a b c d e f", chunks=6, chunk_delay_s=0.15))
    hasty_call = cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC), timeout=0.4)
    hasty = asyncio.ensure_future(_read_all(hasty_call))
    await eventually(lambda: upstream.requests)
    patient = await _stream(cached)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hasty
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "".join(e.delta.content for e in patient) == "a b c d e f"
    assert patient[-1].final.finish_reason == pb.FINISH_REASON_STOP
    await settled(cached)
    assert len(upstream.requests) == 1
    assert cache_of(cached).stats.stores == 1


async def _read_all(call: Any) -> list[pb.CompleteStreamResponse]:
    return [e async for e in call]


async def test_a_shared_stream_stalling_after_its_first_callers_deadline_is_the_upstreams_failure(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """A stall after the text, once the first caller's deadline has passed, is the upstream's
    fault: the patient follower gets UNAVAILABLE `STREAM_INTERRUPTED`, not DEADLINE_EXCEEDED
    long before its own deadline; and as for a stream with one caller, the upstream's
    breaker opens, ListModels shows it unhealthy, and its metrics count an error."""
    captured = captured_telemetry()
    stalling = {
        "name": "up0",
        "base_url": upstream.base_url,
        "models": [FAKE_MODEL],
        "stream_idle_timeout_s": 0.6,
    }
    gateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={"backend": "memory"},
            upstreams=[stalling],
            resilience={"breaker_consecutive_failures": 1},
        ),
        telemetry=captured.telemetry,
    )
    # The first word at 1 s, the next 1 s later: past the idle timeout.
    upstream.script(Reply(content="a b", chunks=2, chunk_delay_s=1.0))
    request = chat_stream(params=DETERMINISTIC)
    hasty = asyncio.ensure_future(_read_all(gateway.stub.CompleteStream(request, timeout=1.3)))
    await eventually(lambda: upstream.requests)
    patient = gateway.stub.CompleteStream(request, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in patient:
            assert event.delta.content == "a "
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)[1] == "STREAM_INTERRUPTED"
    with pytest.raises(grpc.aio.AioRpcError) as hasty_caught:
        await hasty
    assert hasty_caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cache_of(gateway).stats.coalesced == 1
    models = await gateway.stub.ListModels(pb.ListModelsRequest())
    assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_UNHEALTHY
    assert captured.total("llm_gateway.upstream.errors", llm_gateway__upstream="up0") == 1
    attempts = "llm_gateway.upstream.attempts"
    assert captured.total(attempts, llm_gateway__outcome="failure") == 1


async def test_the_memory_cache_keeps_what_fits_its_bound_and_drops_the_oldest(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """Three answers of about 2 KB in a 5 KB memory cache: the first asked is dropped to
    make room for the third, and is fetched again; the last two are still hits. The
    process never holds more than the bound, however many distinct requests come."""
    cache = {"backend": "memory", "max_entry_bytes": 4096, "memory_max_bytes": 5000}
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache))
    upstream.script(*(Reply(content=f"answer {i} " + "x" * 1900) for i in range(4)))
    for question in ("q1", "q2", "q3"):
        assert not (await gateway.stub.Complete(ask(question))).metadata.cache_hit
        await settled(gateway)
    stats = cache_of(gateway).stats
    assert stats.stores == 3
    assert 2 * stats.bytes_written / 3 <= 5000 < stats.bytes_written  # two fit, not three
    assert (await gateway.stub.Complete(ask("q3"))).metadata.cache_hit
    assert (await gateway.stub.Complete(ask("q2"))).metadata.cache_hit
    assert not (await gateway.stub.Complete(ask("q1"))).metadata.cache_hit
    assert len(upstream.requests) == 4
    store = cache_of(gateway).store
    assert 0 < store._cache.size_bytes <= 5000


async def test_the_memory_cache_holds_about_the_bytes_it_counts_against_its_bound(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """Short answers in the memory cache take about the memory `memory_max_bytes` counts
    them as: each entry held its encoder's whole buffer (8 KiB for a 500-byte answer), so
    a cache full to its 256 MiB bound held several GiB."""
    gateway = await start_gateway(gateway_config(upstream.base_url, cache={"backend": "memory"}))
    entries = cache_of(gateway).store._cache
    tracemalloc.start()
    try:
        for question in range(20):
            await gateway.stub.Complete(ask(f"question {question}"))
        await settled(gateway)
        counted = entries.size_bytes
        held_with_entries = tracemalloc.get_traced_memory()[0]
        await entries.close()  # drops every entry
        held = held_with_entries - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert counted > 20 * 300
    assert held < 2 * counted  # the values, and each entry's few small objects


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_an_answer_shorter_than_max_entry_bytes_is_stored(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    cache_section: dict[str, Any],
    is_stream: bool,
) -> None:
    """An answer of 3,000 characters under a `max_entry_bytes` of 4,096 is stored and
    served again, unary or streamed: its text is stored once, not whole and as deltas."""
    cache = {**cache_section, "max_entry_bytes": 4096}
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache))
    text = "word " * 600
    upstream.script(Reply(content=text, chunks=30))

    async def answer() -> tuple[str, bool]:
        if is_stream:
            events = await _stream(gateway)
            return "".join(e.delta.content for e in events[:-1]), events[-1].final.cache_hit
        response = await gateway.stub.Complete(ask())
        return response.content, response.metadata.cache_hit

    assert await answer() == (text, False)
    await settled(gateway)
    assert await answer() == (text, True)
    assert len(upstream.requests) == 1
    assert cache_of(gateway).stats.bytes_written < 4096


async def test_a_unary_follower_of_a_cut_stream_gets_its_own_answer(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """A unary call that joined a streaming call's flight received none of its text: when
    that stream is cut (STREAM_INTERRUPTED for the streaming caller, who got some), the
    unary caller makes its own call instead of failing with it."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "memory"})
    )
    upstream.script(
        Reply(content="one two three four", chunks=4, delay_s=0.3, chunk_delay_s=0.05,
              cut_after_events=3),
        Reply(content="whole answer"),
    )  # fmt: skip
    params = pb.GenerationParams(temperature=0.0)

    async def leader() -> list[pb.CompleteStreamResponse]:
        return [event async for event in gateway.stub.CompleteStream(chat_stream(params=params))]

    streaming = asyncio.ensure_future(leader())
    while not upstream.requests:
        await asyncio.sleep(0.01)
    unary = asyncio.ensure_future(gateway.stub.Complete(chat(params=params)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await streaming
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    response = await unary
    assert response.content == "whole answer"
    assert not response.metadata.cache_hit
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_follower_whose_leaders_deadline_cut_the_retries_short_tries_again(
    cached: RunningGateway, upstream: FakeUpstream, mode: str
) -> None:
    """The shared call's first attempt fails with a 503 whose Retry-After the first
    caller's deadline cannot wait out, so that caller gets the 503 at once. The patient
    follower's deadline can: it tries again, rather than take an error its own call
    would not have ended with."""
    upstream.script(Status(503, headers={"Retry-After": "1"}, delay_s=0.3), Reply())
    hasty = asyncio.ensure_future(cached.stub.Complete(ask(), timeout=1.0))
    await eventually(lambda: upstream.requests)
    if mode == "unary":
        patient = asyncio.ensure_future(cached.stub.Complete(ask(), timeout=20))
    else:
        call = cached.stub.CompleteStream(chat_stream(params=DETERMINISTIC), timeout=20)
        patient = asyncio.ensure_future(_read_all(call))
    await eventually(lambda: cache_of(cached).following == 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hasty
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    answer = await patient
    content = answer.content if mode == "unary" else "".join(e.delta.content for e in answer)
    assert content == "Hello from fake"
    assert len(upstream.requests) == 2


async def test_a_follower_waits_for_the_upstream_slot_its_leaders_deadline_could_not(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """With the upstream's one slot busy, the first caller's deadline ends its wait for it
    (DEADLINE_EXCEEDED, naming the limit it waited at); the follower's deadline allows the
    wait, which it makes on its own rather than share the first caller's end."""
    upstream.script(Reply(content="slow", delay_s=3.0), Reply(content="shared"))
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gateway: RunningGateway = await start_gateway(
        dataclasses.replace(
            config,
            upstreams=tuple(dataclasses.replace(u, max_concurrency=1) for u in config.upstreams),
        )
    )
    busy = asyncio.ensure_future(gateway.stub.Complete(chat("Hold the slot"), timeout=20))
    await eventually(lambda: upstream.requests)
    hasty = asyncio.ensure_future(gateway.stub.Complete(ask(), timeout=1.5))
    patient = asyncio.ensure_future(gateway.stub.Complete(ask(), timeout=20))
    await eventually(lambda: cache_of(gateway).following == 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hasty
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "concurrency limit" in (caught.value.details() or "")
    assert (await patient).content == "shared"
    assert (await busy).content == "slow"
    assert len(upstream.requests) == 2


async def test_a_refresh_redis_refuses_to_store_for_want_of_memory_removes_the_old_entry(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """A REFRESH asks that the entry not be served again. Redis out of memory (`maxmemory`
    reached under `noeviction`) refuses the fresh answer's SET but still takes a DEL, so
    the old entry goes rather than answering every later call for the rest of its TTL.

    Before, the refused SET started the store's cool-down, which then skipped the very
    DEL meant to remove the old entry."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={"backend": "redis", "redis_url": redis_server.url, "error_cooldown_s": 0.2},
        )
    )
    upstream.script(Reply(content="old"), Reply(content="new"), Reply(content="newest"))
    await gateway.stub.Complete(ask())
    await settled(gateway)
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")  # every write that adds memory is refused
        try:
            refresh = pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH)
            refreshed = await gateway.stub.Complete(ask(cache=refresh))
            await settled(gateway)
        finally:
            await client.config_set("maxmemory", "0")
        await asyncio.sleep(0.3)  # past the cool-down
        later = await gateway.stub.Complete(ask())
    finally:
        await client.aclose()
    assert refreshed.content == "new"
    assert (later.content, later.metadata.cache_hit) == ("newest", False)
    assert cache_of(gateway).stats.errors == 1


async def test_a_redis_refusing_writes_for_want_of_memory_still_serves_its_entries(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """Redis out of memory under `noeviction` refuses a miss's SET but answers reads: the
    entries it holds are still served, and only writes wait out the cool-down (one SET
    refused, not one per miss).

    Before, the refused SET turned the whole store off for `error_cooldown_s`: with misses
    coming steadily, a full Redis served no hits at all."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            cache={"backend": "redis", "redis_url": redis_server.url, "error_cooldown_s": 60},
        )
    )
    await gateway.stub.Complete(ask("Stored before Redis filled up"))
    await settled(gateway)
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")  # every write that adds memory is refused
        try:
            for prompt in ("A first miss", "Stored before Redis filled up", "A second miss"):
                await gateway.stub.Complete(ask(prompt))
                await settled(gateway)
            hit = await gateway.stub.Complete(ask("Stored before Redis filled up"))
        finally:
            await client.config_set("maxmemory", "0")
    finally:
        await client.aclose()
    assert hit.metadata.cache_hit
    assert len(upstream.requests) == 3
    stats = cache_of(gateway).stats
    assert (stats.errors, stats.unavailable, stats.hits) == (1, 1, 2)
