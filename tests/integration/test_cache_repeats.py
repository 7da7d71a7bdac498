"""A caller repeating the very same request: served from what the last read found.

`Pipeline.repeat` finds the request by its tenant and bytes, and `ResponseCache.recall`
the answer a store read returned in the last second. These tests run the real gateway
and tell that path from a full one by the store's `bytes_read`, which only a store read
moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.cache import ResponseCache, response_cache
from service.pipeline import REPEATABLE_MAX_BYTES
from tests.conftest import FAKE_MODEL, RunningGateway, chat, fake_model_window, gateway_config
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.tenancy_helpers import as_tenant, rpc_error, secure_config
from tests.redis_server import RedisServer
from tests.telemetry_support import attributes_of, captured_telemetry

pytestmark = pytest.mark.timeout(60)

DETERMINISTIC = pb.GenerationParams(temperature=0.0)
REPLY_COST_USD = (7 * 0.14 + 3 * 0.42) / 1_000_000  # the fake's 7 + 3 tokens


def ask(content: str = "Say hi", **fields: Any) -> pb.CompleteRequest:
    """A deterministic (cacheable by default) request."""
    fields.setdefault("params", DETERMINISTIC)
    return chat(content, **fields)


def cache_of(gateway: RunningGateway) -> ResponseCache:
    """The gateway's response cache."""
    assert gateway.server.pipeline is not None
    cache = gateway.server.pipeline.cache
    assert cache is not None
    return cache


@pytest.fixture
async def cached(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> RunningGateway:
    """A gateway with the in-process memory cache, in front of one fake upstream. A read
    stays recent for an hour, not a second: on a loaded machine two calls can be further
    apart than that, and the repeat would read the store (test_cache_recall times it)."""
    monkeypatch.setattr(response_cache, "RECENT_READ_S", 3600.0)
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "memory"})
    )
    return gateway


async def test_a_repeated_request_is_a_hit_without_reading_the_store(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """The third identical call is served, priced and recorded as a hit, with no read."""
    first = await cached.stub.Complete(ask())
    second = await cached.stub.Complete(ask())
    stats = cache_of(cached).stats
    read_after_second = stats.bytes_read
    third = await cached.stub.Complete(ask())

    assert (second.metadata.cache_hit, third.metadata.cache_hit) == (True, True)
    assert third.content == first.content
    assert (third.metadata.id, third.metadata.usage) == (first.metadata.id, first.metadata.usage)
    assert third.metadata.cost_usd == 0.0
    assert third.metadata.saved_cost_usd == pytest.approx(REPLY_COST_USD)
    assert third.metadata.attempts == 0
    assert (stats.hits, stats.misses) == (2, 1)
    assert stats.bytes_read == read_after_second > 0  # the third call read nothing
    assert len(upstream.requests) == 1
    usage = await cached.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == 3
    assert usage.total.cost_usd == pytest.approx(REPLY_COST_USD)


async def test_the_same_labels_in_another_order_are_the_same_repeat(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Labels are a map, whose order on the wire means nothing: the same labels sent in
    another order are the same request, repeated without a store read."""
    keys = [f"key-{n}" for n in range(16)]
    head = ask().SerializeToString()

    def in_order(order: list[str]) -> bytes:  # map entries concatenated in this order
        return head + b"".join(ask(labels={k: "value"}).SerializeToString() for k in order)

    forward, backward = in_order(keys), in_order(keys[::-1])
    assert forward != backward  # a key of the bytes alone would not know the second
    raw = cached.channel.unary_unary(
        "/llmgateway.v1.CompletionService/Complete",
        request_serializer=lambda data: data,
        response_deserializer=pb.CompleteResponse.FromString,
    )
    await raw(forward)
    await raw(forward)  # a store read: now recent
    stats = cache_of(cached).stats
    read_before = stats.bytes_read
    again = await raw(backward)
    assert again.metadata.cache_hit
    assert stats.bytes_read == read_before
    assert len(upstream.requests) == 1


async def test_a_repeat_after_a_refresh_gets_the_new_answer(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """A write forgets the recent read at once: no repeat serves the replaced answer."""
    upstream.script(Reply(content="old"), Reply(content="new"))
    await cached.stub.Complete(ask())
    assert (await cached.stub.Complete(ask())).content == "old"  # a read: now recent
    refreshed = await cached.stub.Complete(ask(cache=pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH)))
    later = [await cached.stub.Complete(ask()) for _ in range(2)]
    assert refreshed.content == "new"
    assert [(r.content, r.metadata.cache_hit) for r in later] == [("new", True)] * 2
    assert len(upstream.requests) == 2


async def test_a_repeat_of_a_truncated_request_reports_its_dropped_messages(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """A hit says how many messages its own request dropped, not the stored answer's."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url, cache={"backend": "memory"}, models=fake_model_window(256)
        )
    )
    keep_recent = pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT)
    short = ask(truncation=keep_recent)
    long = ask("old question " * 100, truncation=keep_recent)
    long.messages.add(role=pb.ROLE_USER, content="Say hi")  # fitted: the short request
    stored = await gateway.stub.Complete(short)
    answers = [await gateway.stub.Complete(long) for _ in range(3)]
    assert (stored.metadata.cache_hit, stored.metadata.dropped_messages) == (False, 0)
    assert [(a.metadata.cache_hit, a.metadata.dropped_messages) for a in answers] == [(True, 1)] * 3
    assert len(upstream.requests) == 1


async def test_a_repeat_is_prepared_again_once_the_models_calibration_moves(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """The window was fitted with the model's calibration: a new one means a full call."""
    await cached.stub.Complete(ask())
    await cached.stub.Complete(ask())
    stats = cache_of(cached).stats
    read_before = stats.bytes_read
    pipeline = cached.server.pipeline
    assert pipeline is not None
    for _ in range(3):  # the calibration's minimum samples, each 3x the estimate
        pipeline.calibration.observe(
            FAKE_MODEL, "default", estimated_tokens=100, reported_tokens=300
        )
    assert pipeline.calibration.factor(FAKE_MODEL, "default") != 1.0
    again = await cached.stub.Complete(ask())
    assert again.metadata.cache_hit
    assert stats.bytes_read > read_before  # prepared and looked up again: a store read
    assert len(upstream.requests) == 1


async def test_a_request_too_long_to_remember_still_hits_through_the_store(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """Requests over 16 KiB are not remembered by their bytes; every hit reads the store."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(
            upstream.base_url, cache={"backend": "memory"}, models=fake_model_window(65_536)
        )
    )
    request = ask("lorem ipsum " * 1_500)
    assert request.ByteSize() > REPEATABLE_MAX_BYTES
    await gateway.stub.Complete(request)
    await gateway.stub.Complete(request)
    stats = cache_of(gateway).stats
    read_before = stats.bytes_read
    third = await gateway.stub.Complete(request)
    assert third.metadata.cache_hit
    assert stats.bytes_read > read_before
    assert len(upstream.requests) == 1


async def test_a_long_answer_is_read_from_the_store_on_every_hit(
    cached: RunningGateway, upstream: FakeUpstream
) -> None:
    """Answers over 16 KiB are not kept from one read to the next: no second copy."""
    upstream.script(Reply(content="word " * 4_000))
    reads = []
    for _ in range(4):
        answer = await cached.stub.Complete(ask())
        reads.append(cache_of(cached).stats.bytes_read)
    assert answer.content == "word " * 4_000
    assert reads[0] == 0  # the miss read nothing
    assert reads[1] < reads[2] < reads[3]
    assert len(upstream.requests) == 1


async def test_with_redis_every_hit_reads_redis(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """Replicas share Redis: no replica serves an answer from its own last read."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    reads = []
    for _ in range(4):
        assert (await gateway.stub.Complete(ask())).content == "Hello from fake"
        reads.append(cache_of(gateway).stats.bytes_read)
    assert reads[0] == 0  # the miss read nothing
    assert reads[1] < reads[2] < reads[3]
    assert len(upstream.requests) == 1


async def test_tenants_never_share_a_repeat(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """The same bytes from another tenant are that tenant's own request: a miss first."""
    gateway: RunningGateway = await start_gateway(
        secure_config(upstream.base_url, cache={"backend": "memory"})
    )
    upstream.script(Reply(content="for a"), Reply(content="for b"))
    for_a = [await gateway.stub.Complete(ask(), metadata=as_tenant("team-a")) for _ in range(3)]
    for_b = [await gateway.stub.Complete(ask(), metadata=as_tenant("team-b")) for _ in range(3)]
    assert [(r.content, r.metadata.cache_hit) for r in for_a] == [
        ("for a", False),
        ("for a", True),
        ("for a", True),
    ]
    assert [(r.content, r.metadata.cache_hit) for r in for_b] == [
        ("for b", False),
        ("for b", True),
        ("for b", True),
    ]
    assert len(upstream.requests) == 2


async def test_a_tenant_not_allowed_the_model_is_refused_however_hot_the_request(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """Model access is the caller gate's, before any repeat is looked up."""
    gateway: RunningGateway = await start_gateway(
        secure_config(
            upstream.base_url,
            cache={"backend": "memory"},
            tenants={"team-a": {}, "team-b": {"allowed_models": ["another-model"]}},
        )
    )
    for _ in range(3):
        await gateway.stub.Complete(ask(), metadata=as_tenant("team-a"))
    error = await rpc_error(gateway.stub.Complete(ask(), metadata=as_tenant("team-b")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(upstream.requests) == 1


async def test_a_repeat_hit_is_traced_and_counted_as_any_hit(
    upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    """The RPC span says cache hit at no cost, and the cache-hit counter counts it."""
    captured = captured_telemetry()
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "memory"}),
        telemetry=captured.telemetry,
    )
    for _ in range(3):
        await gateway.stub.Complete(ask())
    assert cache_of(gateway).stats.hits == 2
    spans = [s for s in captured.spans() if s.name == "llmgateway.v1.CompletionService/Complete"]
    assert len(spans) == 3
    repeat = attributes_of(spans[-1])
    assert repeat["llm_gateway.cache.hit"] is True
    assert repeat["llm_gateway.cost.usd"] == 0.0
    assert repeat["llm_gateway.tenant"] == "default"
    assert repeat["gen_ai.usage.input_tokens"] == 7
    assert captured.total("llm_gateway.cache.hits") == 2
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("cache", "takes_repeats"),
    [
        ({"backend": "memory"}, True),
        ({"backend": "memory", "enabled": False}, False),
        ({"backend": "redis"}, False),
    ],
)
async def test_requests_are_keyed_for_repeats_only_where_a_repeat_can_answer(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    cache: dict[str, Any],
    takes_repeats: bool,
) -> None:
    """With Redis or the cache off no call pays for keying a request it cannot repeat."""
    if cache["backend"] == "redis":
        cache = {**cache, "redis_url": redis_server.url}
    gateway: RunningGateway = await start_gateway(gateway_config(upstream.base_url, cache=cache))
    pipeline = gateway.server.pipeline
    assert pipeline is not None
    assert pipeline.takes_repeats is takes_repeats
    answers = [await gateway.stub.Complete(ask()) for _ in range(3)]
    assert [a.content for a in answers] == ["Hello from fake"] * 3
    assert len(upstream.requests) == (1 if cache.get("enabled", True) else 3)
