"""Two gateway processes sharing one Redis answer each other's requests from the cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.domain import ChatRequest, GenerationParams, Message, Role
from tests.conftest import FAKE_MODEL, RunningGateway, chat, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream
from tests.integration.gateway_process import gateway_process
from tests.integration.test_cache import cache_of, eventually, settled
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def replica(
    upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    """A second gateway as its own process (`python -m service serve`) on the same Redis."""
    config = gateway_config_data(
        upstream.base_url,
        server={"grace_period_s": 1},
        cache={"backend": "redis", "redis_url": redis_server.url},
    )
    async with gateway_process(config, tmp_path) as stub:
        yield stub


def _ask(content: str) -> pb.CompleteRequest:
    return chat(content, params=pb.GenerationParams(temperature=0.0))


async def test_an_answer_from_one_replica_is_a_hit_on_the_other(
    upstream: FakeUpstream,
    redis_server: RedisServer,
    start_gateway: Callable[..., Any],
    replica: pb_grpc.CompletionServiceStub,
) -> None:
    """Each process serves, from the shared Redis, what the other fetched upstream."""
    local: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    first = await local.stub.Complete(_ask("asked here first"))
    await settled(local)
    shared = await replica.Complete(_ask("asked here first"))
    assert not first.metadata.cache_hit
    assert (shared.metadata.cache_hit, shared.content) == (True, first.content)
    assert shared.metadata.id == first.metadata.id
    assert len(upstream.requests) == 1

    there = await replica.Complete(_ask("asked there first"))
    key = cache_of(local).key_for(
        ChatRequest(
            model=FAKE_MODEL,
            messages=(Message(Role.USER, "asked there first"),),
            params=GenerationParams(temperature=0.0),
        )
    )
    store = cache_of(local).store

    async def stored() -> bool:
        return await store.get(key) is not None

    await eventually(stored)
    back = await local.stub.Complete(_ask("asked there first"))
    assert not there.metadata.cache_hit
    assert (back.metadata.cache_hit, back.metadata.id) == (True, there.metadata.id)
    assert len(upstream.requests) == 2


async def test_connections_redis_closed_still_serve_the_cache(
    upstream: FakeUpstream, redis_server: RedisServer, start_gateway: Callable[..., Any]
) -> None:
    """Redis closing the cache's idle connections (its `timeout`, a proxy's, a restart)
    costs no hit: each closed connection is replaced as it is taken from the pool.

    Before, redis-py handed the closed connection out, the read failed with "Connection
    closed by server", and the cache left Redis alone for its error cool-down: the
    request went upstream again, and so did every other for that second.
    """
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    first = await gateway.stub.Complete(_ask("asked before the restart"))
    await settled(gateway)
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        await admin.aclose()
    again = await gateway.stub.Complete(_ask("asked before the restart"))
    assert (again.metadata.cache_hit, again.metadata.id) == (True, first.metadata.id)
    assert len(upstream.requests) == 1
    assert cache_of(gateway).store.stats.unavailable == 0
