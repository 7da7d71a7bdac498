"""A hung Redis costs one call its timeout, not every call: it is left alone for a while.

A real redis-server is frozen (SIGSTOP): connections stay open and nothing answers, as
with a partition that drops packets or a stuck primary. Before, every call waited out the
operation timeout for each Redis operation on its path (its tenant slot, its budget
reservation, its usage row, the slot's release), for as long as Redis hung. Now the first
operation that times out starts a cool-down: the calls after it do at once what they do
when Redis fails, and their writes wait in the background queue until Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.auth import RedisKeyStore, generate_key, hash_key, redis_keys_hash
from service.config import parse_config
from service.errors import UpstreamUnavailable
from service.lean_redis import LeanRedis
from service.ledger import period_key
from service.store_cooldown import StoreCooldown
from tests.conftest import chat, gateway_config_data
from tests.fake_clock import FakeClock
from tests.fake_upstream import FakeUpstream
from tests.integration.tenancy_helpers import as_tenant, bearer, rpc_error, secure_config
from tests.integration.test_cache import eventually
from tests.redis_server import RedisServer
from tests.secret_capture import register_secret
from tests.telemetry_support import Captured, captured_telemetry

pytestmark = pytest.mark.redis
# Each Redis operation's timeout; a call that waits on a hung Redis takes at least this.
# The default: a call that skips Redis has that long, and a busy CI machine room, to end.
TIMEOUT_S = 0.5
CALLS = 5
# The fake's reply (7 prompt and 3 completion tokens) at the test catalog's prices.
CALL_COST_USD = (7 * 0.14 + 3 * 0.42) / 1e6


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    """How long `call` took, in seconds."""
    started = time.monotonic()
    await call()
    return time.monotonic() - started


def hung_redis_config(fake: FakeUpstream, redis_server: RedisServer, prefix: str) -> Any:
    """team-a's slot (one at a time), its budget and its usage all in `redis_server`."""
    return secure_config(
        fake.base_url,
        auth={
            "redis_url": redis_server.url,
            "redis_key_prefix": prefix,
            "redis_timeout_s": TIMEOUT_S,
        },
        tenants={"team-a": {"max_concurrent_calls": 1}, "team-b": {}},
        ledger={
            "redis_url": redis_server.url,
            "key_prefix": f"{prefix}usage",
            "operation_timeout_s": TIMEOUT_S,
        },
        budgets={"team-a": {"usd": 1.0, "period": "day"}},
    )


def writes_waiting(captured: Captured, store: str | None = None) -> float:
    """Usage rows and releases not yet in Redis (`llm_gateway.store.writes_waiting`)."""
    attributes = {} if store is None else {"llm_gateway__store": store}
    return captured.total("llm_gateway.store.writes_waiting", **attributes)


async def test_while_redis_hangs_only_the_first_call_waits_for_it(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """Five calls of team-a while Redis is frozen all succeed, and only the first takes
    the timeout; once Redis wakes, each call's usage row lands exactly once and the
    budget and team-a's one slot are free again."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with FakeUpstream() as fake:
        captured = captured_telemetry()
        config = hung_redis_config(fake, redis_server, prefix)
        gateway = await start_gateway(config, telemetry=captured.telemetry)

        async def call() -> None:
            reply = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=10)
            assert reply.content

        await call()  # connected while Redis answers
        redis_server.pause()
        try:
            took = [await timed(call) for _ in range(CALLS)]
            waiting = [writes_waiting(captured, store) for store in ("ledger", "tenant_limits")]
        finally:
            redis_server.resume()
        assert took[0] >= TIMEOUT_S
        assert [t for t in took[1:] if t >= TIMEOUT_S] == [], took
        # Every row waits, and the first call's budget release behind its row, and its
        # slot's release. The others took no slot and held no budget in Redis.
        assert waiting == [CALLS + 1, 1]

        await eventually(lambda: writes_waiting(captured) == 0)
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
        assert usage.total.requests == CALLS + 1
        assert usage.total.cost_usd == pytest.approx((CALLS + 1) * CALL_COST_USD, abs=1e-12)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            day = period_key("day", time.time())
            assert await client.zcard(f"{prefix}usage:leases:team-a:{day}") == 0
            assert await client.zcard(f"{prefix}tenant:{{team-a}}:inflight") == 0
        finally:
            await client.aclose()
        await call()  # its one slot is free


async def test_while_redis_hangs_a_known_key_works_and_an_unknown_one_is_refused_at_once(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """While Redis is frozen, a key Redis named lately keeps its tenant (its caller goes
    on through the outage), and one it never named gets a retryable UNAVAILABLE, never
    admitted as someone else; only the first lookup waits for Redis. Once Redis wakes
    the new key works too.

    Before, every caller whose key is kept in Redis was refused while it hung.
    """
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    known, new = generate_key(), generate_key()
    await _store_keys(redis_server, prefix, {known: "team-b", new: "team-b"})
    async with FakeUpstream() as fake:
        gateway = await start_gateway(hung_redis_config(fake, redis_server, prefix))

        async def call(key: str) -> pb.CompleteResponse:
            return await gateway.stub.Complete(chat(), metadata=bearer(key), timeout=10)

        assert (await call(known)).content

        async def refused() -> None:
            error = await rpc_error(call(new))
            assert error.code() == grpc.StatusCode.UNAVAILABLE

        redis_server.pause()
        try:
            took = [await timed(refused) for _ in range(CALLS)]
            for _ in range(CALLS):
                assert (await call(known)).content
        finally:
            redis_server.resume()
        assert took[0] >= TIMEOUT_S
        assert [t for t in took[1:] if t >= TIMEOUT_S] == [], took
        await eventually(lambda: _answers(lambda: call(new)))


async def test_a_key_removed_from_redis_is_not_let_in_while_redis_hangs(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """A key removed from Redis is refused at the next call, and forgotten: it is not
    let in on its old tenant when Redis then hangs."""
    async with _gateway_with_a_redis_key(redis_server, start_gateway) as (keyed, _):
        async with _redis_client(redis_server) as client:
            await client.hdel(redis_keys_hash(keyed.prefix), hash_key(keyed.key))
        assert (await rpc_error(keyed.call())).code() == grpc.StatusCode.UNAUTHENTICATED
        redis_server.pause()
        try:
            error = await rpc_error(keyed.call())
        finally:
            redis_server.resume()
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_known_key_answers_for_redis_only_as_long_as_known_key_s(
    redis_server: RedisServer,
) -> None:
    """The tenant Redis gave a key stands in for Redis for `known_key_s` after that
    answer, and no longer: then the key is refused until Redis answers again."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    key = generate_key()
    await _store_keys(redis_server, prefix, {key: "team-b"})
    clock = FakeClock()
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=TIMEOUT_S)
    store = RedisKeyStore(
        client,
        prefix=prefix,
        cooldown=StoreCooldown("auth", clock=clock),
        known_key_s=60,
        clock=clock,
    )
    try:
        assert await store.tenant_for(hash_key(key)) == "team-b"
        redis_server.pause()
        try:
            assert await store.tenant_for(hash_key(key)) == "team-b"  # Redis timed out: known
            clock.advance(59)
            assert await store.tenant_for(hash_key(key)) == "team-b"  # still known
            clock.advance(1)
            with pytest.raises(UpstreamUnavailable):
                await store.tenant_for(hash_key(key))
        finally:
            redis_server.resume()
    finally:
        await client.aclose()


async def _store_keys(redis_server: RedisServer, prefix: str, tenants: dict[str, str]) -> None:
    async with _redis_client(redis_server) as client:
        for key, tenant in tenants.items():
            await client.hset(redis_keys_hash(prefix), hash_key(key), tenant)


@contextlib.asynccontextmanager
async def _redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass(frozen=True)
class _KeyedGateway:
    """A gateway whose one caller key, team-b's, is kept only in Redis under `prefix`."""

    gateway: Any
    prefix: str
    key: str

    async def call(self) -> pb.CompleteResponse:
        return await self.gateway.stub.Complete(chat(), metadata=bearer(self.key), timeout=10)


@contextlib.asynccontextmanager
async def _gateway_with_a_redis_key(
    redis_server: RedisServer, start_gateway: Any
) -> AsyncIterator[tuple[_KeyedGateway, FakeUpstream]]:
    """The gateway and its upstream, once a call with the key has been answered."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    key = generate_key()
    await _store_keys(redis_server, prefix, {key: "team-b"})
    async with FakeUpstream() as fake:
        gateway = await start_gateway(hung_redis_config(fake, redis_server, prefix))
        keyed = _KeyedGateway(gateway, prefix, key)
        assert (await keyed.call()).content
        yield keyed, fake


async def _answers(call: Callable[[], Awaitable[pb.CompleteResponse]]) -> bool:
    try:
        return bool((await call()).content)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


async def test_a_known_key_is_not_let_in_when_redis_answers_its_lookup_with_an_error(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """A key Redis named lately stands in for Redis only while Redis does not answer. Once
    Redis refuses the gateway its lookups (here `NOPERM`: an operator took HGET from the
    gateway's user), Redis is up and cannot vouch for the key: the caller gets a
    retryable UNAVAILABLE, as every caller of a Redis key does, not its old tenant.

    Before, any failed lookup fell back on the key's last tenant, an error reply too.
    """
    async with _gateway_with_a_redis_key(redis_server, start_gateway) as (keyed, fake):
        async with _redis_client(redis_server) as client:
            await client.acl_setuser("default", enabled=True, commands=["-hget"])
        error = await rpc_error(keyed.call())
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) == 1


async def test_connections_redis_closed_are_replaced_without_a_cool_down(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    """Redis closing the gateway's idle connections (its `timeout`, a proxy's, a restart
    or failover) is no outage: each is replaced as it is taken from the pool, so a key
    Redis never named before still gets in, and team-a's one slot and its budget are
    still held in Redis, not failed open.

    Before, redis-py handed out each closed connection as it was, its command failed
    with "Connection closed by server", and that started a cool-down: the new key got
    UNAVAILABLE, and every closed connection in the pool could start another.
    """
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    known, new = generate_key(), generate_key()
    await _store_keys(redis_server, prefix, {known: "team-a", new: "team-a"})
    async with FakeUpstream() as fake:
        captured = captured_telemetry()
        config = hung_redis_config(fake, redis_server, prefix)
        gateway = await start_gateway(config, telemetry=captured.telemetry)

        async def call(key: str) -> pb.CompleteResponse:
            return await gateway.stub.Complete(chat(), metadata=bearer(key), timeout=10)

        assert (await call(known)).content
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await client.client_kill_filter(_type="normal", skipme=True) >= 2
            for _ in range(3):
                assert (await call(new)).content
            day = period_key("day", time.time())
            reservations = await client.zcard(f"{prefix}usage:leases:team-a:{day}")
        finally:
            await client.aclose()
        assert reservations == 0  # each released as its call ended
        assert writes_waiting(captured) == 0  # nothing waited for a Redis in a cool-down
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(new))
        assert usage.total.requests == 4


async def _connections_received(client: aioredis.Redis) -> int:
    """How many connections Redis has accepted since it started."""
    return int((await client.info("stats"))["total_connections_received"])


async def test_calls_queued_for_a_connection_to_a_hung_redis_open_no_more_of_them(
    redis_server: RedisServer, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More calls at once than the lean client has connections (here 2), as Redis hangs:
    the calls past the cap wait for a connection at most the operation timeout, then do
    what they do without Redis (team-a's rate falls open), as the calls holding them do.

    Before, each queued call was handed the place of a connection dropped on its
    timeout, opened a new connection to the hung Redis and waited out a timeout of its
    own, past the cool-down its users had started: the calls went through in waves of
    the cap, 12 calls meeting 12 connection timeouts one after the other.
    """
    beside = LeanRedis.beside.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        LeanRedis, "beside", classmethod(lambda cls, client: beside(cls, client, max_connections=2))
    )
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    async with FakeUpstream() as fake, _redis_client(redis_server) as client:
        # Keys in the config, no budget, no slot: only the rate's script goes to Redis.
        config = secure_config(
            fake.base_url,
            auth={"redis_url": redis_server.url, "redis_key_prefix": prefix},
            tenants={"team-a": {"requests_per_minute": 1000}},
        )
        gateway = await start_gateway(config)

        async def call() -> None:
            reply = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=30)
            assert reply.content

        await call()  # connected while Redis answers
        before = await _connections_received(client)
        redis_server.pause()
        try:
            await asyncio.gather(*(call() for _ in range(12)))
        finally:
            redis_server.resume()
        # The two connections' commands time out, and the calls queued behind them with
        # them; at most those two calls are handed a place, since their wait outlasts the
        # first ones' sending. The client's own connection here is one more.
        assert await _connections_received(client) - before <= 2 * 2 + 1


# The password the gateway is given, and the one Redis is rotated to under it.
_PASSWORD = register_secret("before-rotation-0123456789")
_ROTATED = register_secret("after-rotation-9876543210")


async def test_a_password_rotated_under_the_gateway_is_one_error_per_store_and_calls_go_on(
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    every_logger_at_debug: None,
) -> None:
    """Redis's password rotated under a running gateway (its connections dropped, as a
    restart or an idle timeout drops them): many calls later, each store (the cache, the
    caller keys and tenant limits, the ledger) has said `store.auth_refused` once, at
    ERROR, without a password; every call is answered, past a spent budget (it fails
    open, as in an outage), and the refusals are counted (`llm_gateway.cache.errors`,
    the ledger's rows in `llm_gateway.store.writes_waiting`).

    Before, it read as a brief outage: one `store.cooldown_started` WARNING per store.
    """
    monkeypatch.setenv("GW_TEST_REDIS_PW", _PASSWORD)
    redis = RedisServer(password=_PASSWORD)
    await redis.start()
    admin = aioredis.Redis.from_url(redis.url, password=_PASSWORD)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    shared = {"redis_url": redis.url, "redis_password_env": "GW_TEST_REDIS_PW"}
    try:
        async with FakeUpstream() as fake:
            data = gateway_config_data(
                fake.base_url,
                cache={"backend": "redis", "key_prefix": f"{prefix}cache", **shared},
                auth={"redis_key_prefix": prefix, **shared},
                ledger={"key_prefix": f"{prefix}usage", **shared},
                tenants={"*": {"requests_per_minute": 1000}},
                budgets={"default": {"usd": 0.01, "period": "day"}},
            )
            captured = captured_telemetry()
            config = parse_config(data, source="<test>")
            gateway = await start_gateway(config, telemetry=captured.telemetry)
            question = chat(params=pb.GenerationParams(temperature=0.0))  # cacheable
            # The day's budget already spent: refused while Redis answers.
            day = period_key("day", time.time())
            await admin.set(f"{prefix}usage:spend:default:{day}", 10**10)  # $0.01
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gateway.stub.Complete(question, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            await admin.config_set("requirepass", _ROTATED)
            await admin.client_kill_filter(_type="normal", skipme=True)
            replies = [await gateway.stub.Complete(question, timeout=10) for _ in range(CALLS)]
            cache_errors = captured.total("llm_gateway.cache.errors")
            rows_waiting = writes_waiting(captured, "ledger")
    finally:
        await admin.aclose()
        await redis.stop()
    assert all(reply.content for reply in replies)
    refusals = [r for r in caplog.records if r.getMessage() == "store.auth_refused"]
    assert sorted(getattr(r, "store", "") for r in refusals) == ["auth", "cache", "ledger"]
    assert {r.levelno for r in refusals} == {logging.ERROR}
    assert _PASSWORD not in caplog.text
    assert _ROTATED not in caplog.text
    assert not [r for r in caplog.records if r.getMessage() == "store.cooldown_started"]
    assert cache_errors >= 1
    assert rows_waiting >= CALLS  # every usage row, kept to retry


async def test_a_password_required_under_a_gateway_that_sends_none_loses_no_usage_row(
    redis_server: RedisServer, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis given a password while a gateway that has none runs: Redis refuses a long
    command from a connection that has not authenticated (a script's, over 10 arguments)
    with a protocol error, not NOAUTH. It is a refusal of the credentials, as NOAUTH is:
    `store.auth_refused` per store, every call answered, and each usage row kept to
    retry, landing once when Redis takes no password again.

    Before, the lean client raised it as an error reply Redis would give again: each row
    was given up at once (`ledger.record_lost`).
    """
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with FakeUpstream() as fake:
            captured = captured_telemetry()
            config = hung_redis_config(fake, redis_server, prefix)
            gateway = await start_gateway(config, telemetry=captured.telemetry)

            async def call() -> None:
                reply = await gateway.stub.Complete(
                    chat(), metadata=as_tenant("team-a"), timeout=10
                )
                assert reply.content

            await call()  # connected while Redis takes no password
            await admin.config_set("requirepass", _PASSWORD)
            await admin.client_kill_filter(_type="normal", skipme=True)
            for _ in range(CALLS):
                await call()
            rows_waiting = writes_waiting(captured, "ledger")
            await admin.execute_command("AUTH", _PASSWORD)
            await admin.config_set("requirepass", "")
            await eventually(lambda: writes_waiting(captured) == 0)
            usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
    finally:
        await admin.aclose()
    assert not [r for r in caplog.records if r.getMessage() == "ledger.record_lost"]
    refusals = [r for r in caplog.records if r.getMessage() == "store.auth_refused"]
    assert sorted(getattr(r, "store", "") for r in refusals) == ["auth", "ledger"]
    assert rows_waiting >= CALLS
    assert usage.total.requests == CALLS + 1
