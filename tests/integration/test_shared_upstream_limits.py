"""An upstream's per-minute rate shared by every gateway on one Redis (`shared_limits`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from llmgateway.v1 import gateway_pb2 as pb
from service.clock import SYSTEM_CLOCK
from service.config import ConfigError, UpstreamConfig, parse_config
from service.errors import RETRY_ELSEWHERE_TRAILER
from service.lean_redis import LeanRedis
from service.limits import LimitExceeded, UpstreamLimiter
from service.shared_limits import SharedLimits, SharedRate, SharedUpstreamLimiter, bucket_keys
from service.store_cooldown import StoreCooldown
from tests.conftest import FAKE_MODEL, RunningGateway, chat, gateway_config_data
from tests.fake_upstream import FakeUpstream
from tests.integration.helpers import error_info
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

_PREFIX = "llm_gateway:"  # auth.redis_key_prefix's default


def _config(upstream: FakeUpstream, redis_url: str, *, max_wait_s: float, **limits: Any) -> Any:
    """One upstream (`up0`) with `limits` shared through `redis_url`; no retries, so a
    call refused by the limit is refused, not tried again."""
    data = gateway_config_data(
        upstream.base_url,
        auth={"redis_url": redis_url},
        resilience={"max_limit_wait_s": max_wait_s, "attempts": 1},
    )
    data["upstreams"][0].update(limits, shared_limits=True)
    return parse_config(data, source="<test>", environ={})


async def _calls(gateways: list[RunningGateway], count: int, **fields: Any) -> list[str]:
    """`count` calls, in turn on each gateway: "ok", the ErrorInfo reason of a
    RESOURCE_EXHAUSTED, or any other error as it is."""
    outcomes = []
    for i in range(count):
        try:
            await gateways[i % len(gateways)].stub.Complete(chat(f"call {i}", **fields), timeout=20)
        except grpc.aio.AioRpcError as exc:
            reason = error_info(exc).reason
            outcomes.append(
                reason if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else str(exc)
            )
        else:
            outcomes.append("ok")
    return outcomes


async def test_two_gateways_share_one_requests_per_minute(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """At 4 a minute (a request per 15 s: none comes back during the test), the two
    gateways together send the upstream 4 calls, not 4 each, and refuse the rest."""
    config = _config(upstream, redis_server.url, max_wait_s=0, requests_per_minute=4)
    gateways = [await start_gateway(config), await start_gateway(config)]
    outcomes = await _calls(gateways, 10)
    assert outcomes.count("ok") == 4
    assert outcomes.count("UPSTREAM_LIMIT") == 6
    assert len(upstream.requests) == 4
    # Both took their share from the one bucket: the refusals are not one gateway's.
    assert "ok" in outcomes[0::2]
    assert "ok" in outcomes[1::2]


async def test_two_gateways_share_one_tokens_per_minute(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """A call of about 40 tokens (its prompt and max_tokens) against 100 a minute: two
    fit the shared bucket, whichever gateway takes them, and a third does not (it would
    need 17 s more of refill)."""
    config = _config(upstream, redis_server.url, max_wait_s=0, tokens_per_minute=100)
    gateways = [await start_gateway(config), await start_gateway(config)]
    outcomes = await _calls(gateways, 6, params=pb.GenerationParams(max_tokens=35))
    assert outcomes.count("ok") == 2
    assert outcomes.count("UPSTREAM_LIMIT") == 4
    assert len(upstream.requests) == 2


async def test_a_waiting_call_starts_when_the_shared_bucket_refills(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """The shared bucket is empty (set so in Redis): a gateway that may not wait refuses
    the call at once, and one that may wait 8 s starts its call as the bucket refills
    (a request every 3 s at 20 a minute)."""
    client = Redis.from_url(redis_server.url)
    seconds, micros = await client.time()
    await client.hset(
        bucket_keys(_PREFIX, "up0")[0], mapping={"level": 0, "at": seconds + micros / 1e6}
    )
    await client.aclose()
    patient = await start_gateway(
        _config(upstream, redis_server.url, max_wait_s=8, requests_per_minute=20)
    )
    hasty = await start_gateway(
        _config(upstream, redis_server.url, max_wait_s=0, requests_per_minute=20)
    )
    assert await _calls([hasty], 1) == ["UPSTREAM_LIMIT"]
    assert await _calls([patient], 1) == ["ok"]
    assert len(upstream.requests) == 1


async def test_redis_down_falls_open_to_the_local_rate_and_says_so_once(
    upstream: FakeUpstream,
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
    refused_port: int,
) -> None:
    """With nothing listening at auth.redis_url, the upstream's own per-process bucket
    applies at the full configured rate (2 a minute: 2 calls go, the rest are refused),
    and the fallback is logged once, not once a call."""
    nobody = f"redis://127.0.0.1:{refused_port}/0"
    gateway = await start_gateway(_config(upstream, nobody, max_wait_s=0, requests_per_minute=2))
    with caplog.at_level(logging.INFO, logger="llm_gateway"):
        outcomes = await _calls([gateway], 5)
    assert outcomes == ["ok", "ok", "UPSTREAM_LIMIT", "UPSTREAM_LIMIT", "UPSTREAM_LIMIT"]
    fallbacks = _logged(caplog, "upstream_limits.shared_unavailable")
    assert len(fallbacks) == 1
    assert getattr(fallbacks[0], "upstream", None) == "up0"


async def _second_call_refused(gateway: RunningGateway) -> grpc.aio.AioRpcError:
    """The refusal of a call after one that spent the upstream's rate of 1 a minute."""
    await gateway.stub.Complete(chat("first"), timeout=20)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat("second"), timeout=20)
    assert error_info(caught.value).reason == "UPSTREAM_LIMIT"
    return caught.value


async def test_a_refusal_by_the_shared_rate_does_not_say_retry_elsewhere(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """Every replica spends the one bucket in Redis: another would refuse the call too,
    so the refusal carries no `llm-gateway-retry-elsewhere`."""
    config = _config(upstream, redis_server.url, max_wait_s=0, requests_per_minute=1)
    refusal = await _second_call_refused(await start_gateway(config))
    assert RETRY_ELSEWHERE_TRAILER not in dict(refusal.trailing_metadata())


async def test_a_refusal_by_the_local_rate_redis_fell_open_to_says_retry_elsewhere(
    upstream: FakeUpstream, start_gateway: Any, refused_port: int
) -> None:
    """With Redis away the rate is this process's own bucket again, which another replica
    holds apart: the refusal says `llm-gateway-retry-elsewhere: true`, as without
    `shared_limits`."""
    nobody = f"redis://127.0.0.1:{refused_port}/0"
    config = _config(upstream, nobody, max_wait_s=0, requests_per_minute=1)
    refusal = await _second_call_refused(await start_gateway(config))
    assert dict(refusal.trailing_metadata())[RETRY_ELSEWHERE_TRAILER] == "true"


async def test_the_reserve_left_is_given_back_on_stop(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """After a call the gateway holds a chunk of tokens it took ahead (a second of the
    rate); stopping gives it back to the shared bucket."""
    config = _config(upstream, redis_server.url, max_wait_s=0, tokens_per_minute=6000)
    gateway = await start_gateway(config)
    assert await _calls([gateway], 1, params=pb.GenerationParams(max_tokens=3000)) == ["ok"]
    assert gateway.server.pipeline is not None
    rate: SharedRate = gateway.server.pipeline.pool.state("up0").limiter.rate  # type: ignore[attr-defined]
    while rate.is_fetching:  # the chunk taken ahead, as the reserve ran low
        await asyncio.sleep(0.01)
    assert rate.tokens is not None
    reserve = rate.tokens.reserve
    assert reserve > 0
    client = Redis.from_url(redis_server.url)
    key = bucket_keys(_PREFIX, "up0")[1]
    before = await client.hgetall(key)
    await gateway.server.stop(grace_s=0)
    after = await client.hgetall(key)
    await client.aclose()
    refilled = (float(after[b"at"]) - float(before[b"at"])) * 6000 / 60
    given_back = float(after[b"level"]) - float(before[b"level"]) - refilled
    assert given_back == pytest.approx(reserve, abs=0.1)


def test_shared_limits_need_auth_redis_url_and_a_rate() -> None:
    """Refused at load: without Redis there is nothing to share them in, and without a
    per-minute limit nothing to share."""
    data = gateway_config_data("http://127.0.0.1:1/v1")
    data["upstreams"][0].update(requests_per_minute=60, shared_limits=True)
    with pytest.raises(ConfigError) as no_redis:
        parse_config(data, source="<test>", environ={})
    assert "upstreams[0].shared_limits" in str(no_redis.value)
    assert "auth.redis_url" in str(no_redis.value)
    data = gateway_config_data("http://127.0.0.1:1/v1", auth={"redis_url": "redis://r:6379/0"})
    data["upstreams"][0].update(shared_limits=True)
    with pytest.raises(ConfigError) as no_rate:
        parse_config(data, source="<test>", environ={})
    assert "requests_per_minute" in str(no_rate.value)


async def test_a_hung_redis_falls_open_and_sharing_resumes_once_it_answers(
    upstream: FakeUpstream,
    redis_server: RedisServer,
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stopped mid-run (answers nothing): the call is served from the local bucket
    after one timeout. Once Redis answers again the refiller's retry finds it, says so,
    and the next call takes its request from the shared bucket again."""
    client = Redis.from_url(redis_server.url)
    key = bucket_keys(_PREFIX, "up0")[0]
    seconds, micros = await client.time()  # a third full: no refill reaches the top
    await client.hset(key, mapping={"level": 10, "at": seconds + micros / 1e6})
    config = _config(upstream, redis_server.url, max_wait_s=0, requests_per_minute=30)
    gateway = await start_gateway(config)
    with caplog.at_level(logging.INFO, logger="llm_gateway"):
        redis_server.pause()
        try:
            assert await _calls([gateway], 2) == ["ok", "ok"]
        finally:
            redis_server.resume()
        async with asyncio.timeout(20):
            while not _logged(caplog, "upstream_limits.shared_restored"):
                await asyncio.sleep(0.05)
        before = await client.hgetall(key)
        assert await _calls([gateway], 1) == ["ok"]
    after = await client.hgetall(key)
    await client.aclose()
    assert len(_logged(caplog, "upstream_limits.shared_unavailable")) == 1
    # The retry took a second's worth ahead (half a request at 30 a minute): the call took
    # the other half of its request from Redis, past what refilled meanwhile.
    refilled = (float(after[b"at"]) - float(before[b"at"])) * 30 / 60
    taken = float(before[b"level"]) + refilled - float(after[b"level"])
    assert taken == pytest.approx(0.5, abs=0.01)


def _logged(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def _shared_limiter(
    lean: LeanRedis, prefix: str, **rates: int
) -> tuple[SharedLimits, UpstreamLimiter]:
    """The shared limits under `prefix` and the limiter of one upstream (`up0`) with
    `rates` shared through them, with no gateway around it."""
    shared = SharedLimits(lean, prefix=prefix, cooldown=StoreCooldown("auth"))
    config = UpstreamConfig(
        name="up0", base_url="http://127.0.0.1:1/v1", models={"m": "m"}, shared_limits=True, **rates
    )
    return shared, shared.limiter(config, SYSTEM_CLOCK)


async def test_a_burst_starts_what_the_shared_bucket_holds_not_nothing(
    redis_server: RedisServer,
) -> None:
    """The shared bucket holds 90 of its 100 tokens a minute: of 4 calls of 40 tokens
    asking at once, by a process that may not wait, the 2 the bucket holds start (as a
    local bucket's would), not none because the 4 together need more than it holds.

    Before, the one fetch for the 4 asked for all 160 or nothing, and got nothing."""
    client = Redis.from_url(redis_server.url)
    key = bucket_keys("burst:", "up0")[1]
    seconds, micros = await client.time()
    await client.hset(key, mapping={"level": 90, "at": seconds + micros / 1e6})
    lean = LeanRedis.beside(client)
    shared, limiter = _shared_limiter(lean, "burst:", tokens_per_minute=100)
    try:
        outcomes = await asyncio.gather(
            *(limiter.acquire(tokens=40, max_wait_s=0) for _ in range(4)), return_exceptions=True
        )
    finally:
        await shared.aclose()
        await lean.aclose()
        await client.aclose()
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 2
    assert sum(isinstance(o, LimitExceeded) for o in outcomes) == 2


async def test_a_call_after_the_shared_rate_closed_is_answered_not_left_waiting(
    redis_server: RedisServer,
) -> None:
    """A call that reaches the limiter after its shared rate closed (a flight still winding
    down as the server stops) goes on at the process's own rate, as when Redis does not
    answer.

    Before, it waited for a fetch that a closed rate never makes: for ever."""
    client = Redis.from_url(redis_server.url)
    lean = LeanRedis.beside(client)
    shared, limiter = _shared_limiter(lean, "closed:", requests_per_minute=60)
    try:
        await shared.aclose()
        async with asyncio.timeout(5):
            assert await limiter.acquire(tokens=1, max_wait_s=1) == 0.0
    finally:
        await lean.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    "corrupt",
    [{"level": "-1e308", "at": "0"}, {"level": "5", "at": "soon"}, {"level": "5"}],
    ids=["level-out-of-range", "time-not-a-number", "time-missing"],
)
async def test_a_bucket_hash_the_script_cannot_read_counts_as_full_and_is_rewritten(
    upstream: FakeUpstream,
    redis_server: RedisServer,
    start_gateway: Any,
    corrupt: dict[str, str],
) -> None:
    """A requests bucket left unreadable in Redis (written by hand or by another tool)
    reads as a missing one, full: the call goes, from the shared bucket, which is
    written afresh.

    Before, an impossible level refused every call for ever (each call renewed the key's
    expiry), and an unreadable time fell open to the per-process rate for ever."""
    client = Redis.from_url(redis_server.url)
    key = bucket_keys(_PREFIX, "up0")[0]
    await client.hset(key, mapping=corrupt)
    gateway = await start_gateway(
        _config(upstream, redis_server.url, max_wait_s=0, requests_per_minute=60)
    )
    assert await _calls([gateway], 1) == ["ok"]
    assert gateway.server.pipeline is not None
    rate: SharedRate = gateway.server.pipeline.pool.state("up0").limiter.rate  # type: ignore[attr-defined]
    assert not rate.is_failing_open
    after = await client.hgetall(key)
    await client.aclose()
    assert 0 <= float(after[b"level"]) <= 60
    assert float(after[b"at"]) > 0


async def test_a_reserve_given_back_to_an_unreadable_bucket_is_dropped_not_an_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopping process whose bucket hash was left unreadable meanwhile (its time gone)
    gives nothing back to it: the take script reads it as full. Before, the give-back
    script failed on it, logged as `upstream_limits.reserve_kept` as if Redis had not
    answered."""
    client = Redis.from_url(redis_server.url)
    lean = LeanRedis.beside(client)
    shared, limiter = _shared_limiter(lean, "unreadable:", tokens_per_minute=6000)
    key = bucket_keys("unreadable:", "up0")[1]
    try:
        await limiter.acquire(tokens=3000, max_wait_s=0)
        assert isinstance(limiter, SharedUpstreamLimiter)
        while limiter.rate.is_fetching:  # the chunk taken ahead, as the reserve ran low
            await asyncio.sleep(0.01)
        assert limiter.rate.tokens is not None
        assert limiter.rate.tokens.reserve > 0
        await client.hdel(key, "at")
        with caplog.at_level(logging.INFO, logger="llm_gateway"):
            await shared.aclose()
        assert _logged(caplog, "upstream_limits.reserve_kept") == []
        assert await client.hget(key, "at") is None  # left for the take script to rewrite
    finally:
        await lean.aclose()
        await client.aclose()


async def test_a_call_asking_while_a_fetch_hangs_falls_open_with_it(
    redis_server: RedisServer,
) -> None:
    """Redis hangs while a fetch is on its way: a call that asked meanwhile (for the next
    fetch) goes on at the process's own rate when that fetch fails, as the call it
    joined does, not after the refiller's retry of Redis (an hour here).

    Before, it waited for that retry's fetch: a cool-down and a second timeout more."""
    client = Redis.from_url(redis_server.url, socket_timeout=0.5)
    lean = LeanRedis.beside(client)
    rate = SharedRate(
        "up0",
        requests_per_minute=30,  # half a request a second: no chunk taken ahead
        tokens_per_minute=None,
        commands=lean,
        prefix="hung:",
        cooldown=StoreCooldown("auth"),
        retry_s=3600,
    )
    limiter = SharedUpstreamLimiter("up0", rate, max_concurrency=10, clock=SYSTEM_CLOCK)
    try:
        await limiter.acquire(tokens=1, max_wait_s=0)  # connected, the script loaded
        redis_server.pause()
        first = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=0))
        while not rate._is_taking:  # its script on its way: the next call asks for the next
            await asyncio.sleep(0)
        second = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=0))
        async with asyncio.timeout(10):
            assert await asyncio.gather(first, second) == [0.0, 0.0]
        assert rate.is_failing_open
    finally:
        redis_server.resume()
        await rate.aclose()
        await lean.aclose()
        await client.aclose()


def test_a_shared_rate_used_on_a_new_event_loop_keeps_its_refiller() -> None:
    """A rate whose loop ended (a server's, a test's) and used on another: its refiller
    starts there and stays, waiting for the next fetch.

    Before, its wake-up event stayed bound to the first loop: the new refiller died
    with a RuntimeError after each fetch, logged as an exception never retrieved."""
    server = RedisServer()
    lean = LeanRedis(host="127.0.0.1", port=server.port, socket_timeout=0.5)
    rate = SharedRate(
        "up0",
        requests_per_minute=30,
        tokens_per_minute=None,
        commands=lean,
        prefix="loops:",
        cooldown=StoreCooldown("auth"),
    )
    limiter = SharedUpstreamLimiter("up0", rate, max_concurrency=10, clock=SYSTEM_CLOCK)

    async def one_call() -> None:
        await limiter.acquire(tokens=1, max_wait_s=0)
        limiter.release()
        while rate.is_fetching:
            await asyncio.sleep(0.01)
        assert rate._refiller is not None
        assert not rate._refiller.done()

    async def close() -> None:
        await rate.aclose()
        await lean.aclose()

    asyncio.run(server.start())
    try:
        asyncio.run(one_call())
        asyncio.run(one_call())
    finally:
        asyncio.run(close())
        asyncio.run(server.stop())


async def test_a_shared_upstream_takes_its_turns_beside_one_with_its_own_rate(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    """Two upstreams of equal weight serve the model, the first with a shared rate far
    from its limit: calls one after another go to both in turn.

    Before, the shared one, whose reserve is empty until it is asked for a call, was
    never judged able to start one while the other was free: every call went to the
    other, whatever the weights, and the shared one's reserve was never filled."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as other:
        data = gateway_config_data(
            upstream.base_url, other.base_url, auth={"redis_url": redis_server.url}
        )
        data["upstreams"][0].update(requests_per_minute=600, shared_limits=True)
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        assert await _calls([gateway], 6) == ["ok"] * 6
        assert (len(upstream.requests), len(other.requests)) == (3, 3)


async def test_a_fetch_that_outlasts_a_calls_wait_leaves_it_none_to_wait_in_line(
    redis_server: RedisServer,
) -> None:
    """A call whose units Redis must send (its reserve empty) while the upstream's one slot
    is taken waits for that fetch; Redis answers only after the call's whole wait (0.5 s)
    has passed. It is then refused at once, its wait spent (`is_waited_out`: a pool whose
    caller's deadline bounded the wait ends it DEADLINE_EXCEEDED), not put in line for as
    long again. Before, it then waited its whole bound more, past its caller's deadline,
    and took the slot freed meanwhile."""
    client = Redis.from_url(redis_server.url, socket_timeout=10)
    lean = LeanRedis.beside(client)
    rate = SharedRate(
        "up0",
        requests_per_minute=30,
        tokens_per_minute=None,
        commands=lean,
        prefix="spent:",
        cooldown=StoreCooldown("auth"),
    )
    limiter = SharedUpstreamLimiter("up0", rate, max_concurrency=1, clock=SYSTEM_CLOCK)
    try:
        await limiter.acquire(tokens=1, max_wait_s=0)  # it holds the one slot
        redis_server.pause()
        waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=0.5))
        while not rate._is_taking:  # its fetch on its way
            await asyncio.sleep(0)
        await asyncio.sleep(1.0)  # Redis still away past the call's wait
        redis_server.resume()
        async with asyncio.timeout(10):
            while not waiting.done() and limiter.queued == 0:
                await asyncio.sleep(0)
        limiter.release()  # the slot frees: a call still in line would take it
        with pytest.raises(LimitExceeded) as refused:
            await waiting
        assert refused.value.is_waited_out
        assert limiter.in_flight == 0
    finally:
        redis_server.resume()
        await rate.aclose()
        await lean.aclose()
        await client.aclose()
