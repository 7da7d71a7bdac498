"""Two gateway processes behind one Redis: one cache, one tenant rate limit, one usage ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from redis.asyncio import Redis

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.auth import hash_key
from tests.conftest import FAKE_MODEL, chat
from tests.fake_upstream import FakeUpstream
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

_STARTUP_TIMEOUT_S = 30.0
_LISTENING = "llm-gateway listening on "
_TENANT = "team-replicas"
_RPM = 3


def _config(upstream: FakeUpstream, redis: RedisServer, key: str) -> dict[str, Any]:
    """Everything shared lives in the one Redis: cache, ledger, caller keys' limits."""
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
        "ledger": {"redis_url": redis.url},
        "auth": {
            "mode": "keys",
            "keys": [{"sha256": hash_key(key), "tenant": _TENANT}],
            "redis_url": redis.url,
        },
        "tenants": {_TENANT: {"requests_per_minute": _RPM}},
    }


@contextlib.asynccontextmanager
async def _gateway_process(config: Path) -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    """`python -m service serve --config CONFIG` as one child process; a stub to it.

    `--workers 1`: with its state in Redis the gateway would otherwise run one process
    per core, and this test is about separate replicas.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(config),
        "--workers", "1", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(_STARTUP_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(_LISTENING), f"gateway process did not start: {line!r}"
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


async def _cache_entries(redis: RedisServer) -> int:
    """How many cache entries the shared Redis holds (the cache's keys start "llmgw")."""
    client = Redis.from_url(redis.url)
    try:
        return len(await client.keys("llmgw*"))
    finally:
        await client.aclose()


async def test_two_processes_share_cache_rate_limit_and_ledger(
    upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A call on one process is a cache hit, a spent request and a ledger row on the other."""
    key = "replica-test-" + secrets.token_hex(16)
    metadata = (("authorization", f"Bearer {key}"),)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_config(upstream, redis_server, key)), encoding="utf-8")
    question = chat("asked on one, answered by both", params=pb.GenerationParams(temperature=0.0))
    async with _gateway_process(config) as one, _gateway_process(config) as two:
        first = await one.Complete(question, metadata=metadata)  # request 1 of _RPM
        async with asyncio.timeout(10):  # the cache is written just after the answer
            while not await _cache_entries(redis_server):
                await asyncio.sleep(0.02)
        shared = await two.Complete(question, metadata=metadata)  # request 2
        await one.Complete(chat("a second question"), metadata=metadata)  # request 3
        # `two` has admitted one call itself: only the shared per-minute count refuses this.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await two.Complete(chat("one too many"), metadata=metadata)
        usage_one = await one.GetUsage(pb.GetUsageRequest(), metadata=metadata)
        usage_two = await two.GetUsage(pb.GetUsageRequest(), metadata=metadata)

    assert not first.metadata.cache_hit
    assert shared.metadata.cache_hit
    assert (shared.content, shared.metadata.id) == (first.content, first.metadata.id)
    assert len(upstream.requests) == 2  # the hit never reached the upstream
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests_per_minute" in (refused.value.details() or "")
    assert usage_one.total.requests == usage_two.total.requests == _RPM
    assert usage_one.total.cost_usd == pytest.approx(usage_two.total.cost_usd)
    assert usage_one.total.cost_usd > 0
