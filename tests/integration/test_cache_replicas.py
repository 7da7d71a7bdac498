"""Two gateway processes sharing one Redis answer each other's requests from the cache."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import yaml

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.domain import ChatRequest, GenerationParams, Message, Role
from tests.conftest import FAKE_MODEL, RunningGateway, chat, gateway_config
from tests.fake_upstream import FakeUpstream
from tests.integration.test_cache import cache_of, eventually, settled
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

_STARTUP_TIMEOUT_S = 30.0
_LISTENING = "llm-gateway listening on "


def _config_data(upstream: FakeUpstream, redis: RedisServer) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "grace_period_s": 1},
        "upstreams": [
            {"name": "up0", "base_url": upstream.base_url, "models": [FAKE_MODEL], "timeout_s": 10}
        ],
        "models": {
            FAKE_MODEL: {
                "context_window": 4096,
                "input_usd_per_million": 0.14,
                "output_usd_per_million": 0.42,
            }
        },
        "local_model": {"enabled": "never"},
        "cache": {"backend": "redis", "redis_url": redis.url},
    }


@pytest_asyncio.fixture
async def replica(
    upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    """A second gateway as its own process (`python -m service serve`) on the same Redis."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_config_data(upstream, redis_server)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(_STARTUP_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(_LISTENING), f"replica did not start: {line!r}"
        async with grpc.aio.insecure_channel(line[len(_LISTENING) :].strip()) as channel:
            yield pb_grpc.CompletionServiceStub(channel)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


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
