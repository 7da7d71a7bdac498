"""Pool hooks and cache counters reach the metrics, read through an in-memory reader."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.telemetry.metrics import BREAKER_STATES
from tests.conftest import chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream, Reply, Status
from tests.telemetry_support import attributes_of, captured_telemetry

FAST_RESILIENCE = {"attempts": 3, "backoff_base_s": 0.01, "backoff_cap_s": 0.05}
DETERMINISTIC = pb.GenerationParams(temperature=0.0)
UPSTREAM = "llm_gateway__upstream"
KIND = "llm_gateway__retry__kind"


async def test_a_retried_call_counts_a_retry_and_each_attempt_for_its_upstream(start_gateway):
    """500 then 200: one retry and two attempts (one failed) on up0; nothing for others."""
    captured = captured_telemetry()
    async with FakeUpstream(models=("fake-model",)) as fake:
        fake.script(Status(500), Reply())
        config = gateway_config(fake.base_url, resilience=FAST_RESILIENCE)
        gw = await start_gateway(config, telemetry=captured.telemetry)
        response = await gw.stub.Complete(chat())
    assert response.metadata.attempts == 2
    assert captured.total("llm_gateway.retries", **{UPSTREAM: "up0", KIND: "retry"}) == 1
    assert captured.total("llm_gateway.retries", **{UPSTREAM: "up1"}) == 0
    assert captured.total("llm_gateway.retries", **{KIND: "failover"}) == 0
    attempts = {
        p.attributes["llm_gateway.outcome"]: p.value
        for p in captured.points("llm_gateway.upstream.attempts")
    }
    assert attempts == {"failure": 1, "success": 1}
    # The retry shows on the RPC span as an event with its wait.
    rpc = captured.span("llmgateway.v1.CompletionService/Complete")
    [event] = [e for e in rpc.events if e.name == "llm_gateway.retry"]
    assert event.attributes is not None
    assert 0 <= event.attributes["llm_gateway.retry.wait_ms"] <= 1000
    assert event.attributes["llm_gateway.retry.kind"] == "retry"


async def test_a_failover_counts_as_one_apart_from_retries(start_gateway):
    """up0 answers 500, so the call fails over to up1: `llm_gateway.retries` counts it
    against up0 with kind `failover`, and the span's retry event says so, so dashboards
    tell an upstream retried from one abandoned. Before, both were plain retries."""
    captured = captured_telemetry()
    async with (
        FakeUpstream(models=("fake-model",), default=Status(500)) as failing,
        FakeUpstream(models=("fake-model",)) as working,
    ):
        config = gateway_config(
            failing.base_url, working.base_url, resilience={**FAST_RESILIENCE, "attempts": 2}
        )
        gw = await start_gateway(config, telemetry=captured.telemetry)
        response = await gw.stub.Complete(chat())
    assert response.metadata.attempts == 2
    assert captured.total("llm_gateway.retries", **{UPSTREAM: "up0", KIND: "failover"}) == 1
    assert captured.total("llm_gateway.retries", **{KIND: "retry"}) == 0
    rpc = captured.span("llmgateway.v1.CompletionService/Complete")
    [event] = [e for e in rpc.events if e.name == "llm_gateway.retry"]
    assert event.attributes is not None
    assert event.attributes["llm_gateway.retry.kind"] == "failover"


async def _breaker_gauge(
    start_gateway: Any, fake: FakeUpstream, *, failures: int, cool_down_s: float
) -> tuple[Any, Callable[[], float]]:
    """A gateway in front of `fake` whose breaker opens after `failures` calls in a row
    fail (one attempt each), and a reading of up0's breaker state gauge."""
    captured = captured_telemetry()
    resilience = {
        **FAST_RESILIENCE,
        "attempts": 1,
        "breaker_consecutive_failures": failures,
        "breaker_cool_down_s": cool_down_s,
    }
    config = gateway_config(fake.base_url, resilience=resilience)
    gw = await start_gateway(config, telemetry=captured.telemetry)

    def state() -> float:
        return captured.total("llm_gateway.upstream.breaker.state", **{UPSTREAM: "up0"})

    return gw, state


async def test_an_opening_breaker_shows_in_the_breaker_state_gauge(start_gateway):
    """The gauge reads closed at start and open after the breaker trips on failures."""
    async with FakeUpstream(models=("fake-model",), default=Status(500)) as fake:
        gw, state = await _breaker_gauge(start_gateway, fake, failures=2, cool_down_s=30)
        assert state() == BREAKER_STATES["closed"]
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await gw.stub.Complete(chat())
        assert state() == BREAKER_STATES["open"]


async def test_a_breaker_reads_half_open_once_its_cool_down_passes_with_no_call(start_gateway):
    """An upstream whose breaker opened and then got no call: the gauge reads half-open
    once the cool-down has passed, as a probe would be let through. Before, it read open
    until the next call or ListModels read the breaker: an idle upstream looked down on
    a dashboard long after it could be tried."""
    async with FakeUpstream(models=("fake-model",), default=Status(500)) as fake:
        gw, state = await _breaker_gauge(start_gateway, fake, failures=1, cool_down_s=0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Complete(chat())
        assert state() == BREAKER_STATES["open"]
        async with asyncio.timeout(10):
            while state() != BREAKER_STATES["half_open"]:
                await asyncio.sleep(0.05)
        assert len(fake.requests) == 1  # no call read it


async def test_cache_hits_misses_coalesced_and_bytes_are_exported(upstream, start_gateway):
    """A miss, a hit and requests joining an in-flight call appear in the cache metrics."""
    captured = captured_telemetry()
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gw = await start_gateway(config, telemetry=captured.telemetry)
    await gw.stub.Complete(chat("first", params=DETERMINISTIC))
    cache = gw.server.pipeline.cache
    async with asyncio.timeout(10):
        while cache.in_flight:
            await asyncio.sleep(0.005)
    hit = await gw.stub.Complete(chat("first", params=DETERMINISTIC))
    assert hit.metadata.cache_hit
    upstream.script(Reply(content="slow", delay_s=0.3))
    await asyncio.gather(
        *(gw.stub.Complete(chat("second", params=DETERMINISTIC)) for _ in range(4))
    )

    def lookups(result: str) -> float:
        return captured.total("llm_gateway.cache.lookups", llm_gateway__cache__result=result)

    stats = cache.stats
    assert lookups("hit") == stats.hits >= 1
    assert lookups("miss") == stats.misses >= 2
    assert lookups("coalesced") == stats.coalesced >= 1
    assert captured.total("llm_gateway.cache.errors") == stats.errors == 0
    written = captured.total("llm_gateway.cache.io", llm_gateway__cache__direction="written")
    assert written == stats.bytes_written > 0
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_each_cache_lookup_counts_under_one_result(upstream, start_gateway, is_stream):
    """Four identical calls at once, then one more: one miss, three coalesced, one hit.

    The dashboard's hit ratio is (hit + coalesced) / all lookups: a follower counted as a
    miss as well would put four identical calls at 3/7, not 3/4.
    """
    captured = captured_telemetry()
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gw = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Reply(content="slow", delay_s=0.3))

    async def call() -> None:
        if is_stream:
            request = chat_stream("same", params=DETERMINISTIC)
            _ = [event async for event in gw.stub.CompleteStream(request)]
        else:
            await gw.stub.Complete(chat("same", params=DETERMINISTIC))

    await asyncio.gather(*(call() for _ in range(4)))
    cache = gw.server.pipeline.cache
    async with asyncio.timeout(10):
        while cache.in_flight:
            await asyncio.sleep(0.005)
    await call()

    def lookups(result: str) -> float:
        return captured.total("llm_gateway.cache.lookups", llm_gateway__cache__result=result)

    assert [lookups(r) for r in ("hit", "miss", "coalesced")] == [1, 1, 3]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_follower_that_calls_on_its_own_after_its_leader_failed_counts_once(
    upstream, start_gateway, is_stream
):
    """A caller joins an identical call whose caller's deadline then ends it, and makes
    its own upstream call: two lookups, two misses. It counted as coalesced and then as
    a miss too, three lookups for two callers, the coalesced one never served."""
    captured = captured_telemetry()
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gw = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Reply(content="too late", delay_s=3.0), Reply(content="own"))
    hasty = asyncio.ensure_future(gw.stub.Complete(chat("same", params=DETERMINISTIC), timeout=0.5))
    cache = gw.server.pipeline.cache
    async with asyncio.timeout(10):
        while not upstream.requests:
            await asyncio.sleep(0.005)
    if is_stream:
        request = chat_stream("same", params=DETERMINISTIC)
        events = [event async for event in gw.stub.CompleteStream(request, timeout=20)]
        assert events[-1].final.cache_hit is False
    else:
        patient = await gw.stub.Complete(chat("same", params=DETERMINISTIC), timeout=20)
        assert (patient.content, patient.metadata.cache_hit) == ("own", False)
    with pytest.raises(grpc.aio.AioRpcError, match="DEADLINE_EXCEEDED"):
        await hasty
    assert len(upstream.requests) == 2

    def lookups(result: str) -> float:
        return captured.total("llm_gateway.cache.lookups", llm_gateway__cache__result=result)

    assert [lookups(r) for r in ("hit", "miss", "coalesced")] == [0, 2, 0]
    assert (cache.stats.misses, cache.stats.coalesced) == (2, 0)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_followers_are_coalesced_on_their_spans_and_not_counted_as_cache_hits(
    upstream, start_gateway, is_stream
):
    """Four identical calls at once, then one more: the three that shared the first's
    upstream call are hits to their callers (they paid nothing), but their spans say
    `llm_gateway.cache.coalesced`, not `llm_gateway.cache.hit`, and `llm_gateway.cache.hits`
    counts only the answer read from the cache, as the lookups' `hit` does.

    Before, each follower's span said hit and the hits metric counted four where the
    lookups counted one hit: a hit rate no cache had."""
    captured = captured_telemetry()
    config = gateway_config(upstream.base_url, cache={"backend": "memory"})
    gw = await start_gateway(config, telemetry=captured.telemetry)
    upstream.script(Reply(content="slow", delay_s=0.3))

    async def call() -> bool:
        if is_stream:
            request = chat_stream("same", params=DETERMINISTIC)
            return [event async for event in gw.stub.CompleteStream(request)][-1].final.cache_hit
        return (await gw.stub.Complete(chat("same", params=DETERMINISTIC))).metadata.cache_hit

    shared = await asyncio.gather(*(call() for _ in range(4)))
    cache = gw.server.pipeline.cache
    async with asyncio.timeout(10):
        while cache.in_flight:
            await asyncio.sleep(0.005)
    assert await call()  # read from the cache
    method = "CompleteStream" if is_stream else "Complete"
    async with asyncio.timeout(5):  # each RPC's span ends just after its answer
        while len(spans := [s for s in captured.spans() if s.name.endswith(f"/{method}")]) < 5:
            await asyncio.sleep(0.005)
    outcomes = sorted(
        (attrs["llm_gateway.cache.hit"], attrs.get("llm_gateway.cache.coalesced", False))
        for attrs in map(attributes_of, spans)
    )

    def lookups(result: str) -> float:
        return captured.total("llm_gateway.cache.lookups", llm_gateway__cache__result=result)

    assert sorted(shared) == [False, True, True, True]  # as the README says to callers
    assert outcomes == [(False, False), (False, True), (False, True), (False, True), (True, False)]
    assert captured.total("llm_gateway.cache.hits", gen_ai__request__model="fake-model") == 1
    assert captured.total("llm_gateway.cache.hits") == lookups("hit") == 1
    assert lookups("coalesced") == 3
    assert len(upstream.requests) == 1
