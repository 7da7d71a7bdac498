"""Shared fixtures: a fault-injecting upstream, the real gateway on loopback, its stub."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service import tokens
from service.config import GatewayConfig, parse_config
from service.server import GatewayServer
from tests.fake_upstream import FakeUpstream
from tests.ports import refusing_port
from tests.redis_server import limits_redis_url, redis_server  # noqa: F401  (fixtures)
from tests.secret_capture import (  # noqa: F401  (the secret grep's fixture and hooks)
    capture_emitted_logs,
    every_logger_at_debug,
    pytest_collection_modifyitems,
    pytest_sessionfinish,
    pytest_testnodedown,
)
from tests.xdist_recovery import make_scheduler

FAKE_MODEL = "fake-model"

# The machine's proxy is not the tests': with it, an upstream a test names by a host other
# than loopback would be tunnelled through the CI's proxy (or refused, for one the gateway
# cannot use). Gone before any gateway starts, for this process and those it spawns; the
# proxy tests set their own.
for _variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_variable, None)


def _share_compiled_modules() -> None:
    """Where PYTHONDONTWRITEBYTECODE is set (some CI images), every gateway, worker and CLI
    process the tests start compiled the project's ~120 modules again (0.2-0.3 s of CPU
    each, hundreds of processes): they write their bytecode to one temporary folder
    instead, left out of the source tree as the variable asks. xdist's workers inherit it."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or "PYTHONPYCACHEPREFIX" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="llm-gateway-tests-pyc-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    del os.environ["PYTHONDONTWRITEBYTECODE"]


_share_compiled_modules()


def fake_model_window(tokens: int) -> dict[str, Any]:
    """The `models` section giving the fake model a context window of `tokens`."""
    return {
        FAKE_MODEL: {
            "context_window": tokens,
            "input_usd_per_million": 0.14,
            "output_usd_per_million": 0.42,
        }
    }


def gateway_config(*base_urls: str, **sections: Any) -> GatewayConfig:
    """A config with one upstream per URL (named up0, up1, ...) serving `fake-model`."""
    return parse_config(gateway_config_data(*base_urls, **sections), source="<test>", environ={})


def gateway_config_data(*base_urls: str, **sections: Any) -> dict[str, Any]:
    """The data of `gateway_config` (as a YAML file would hold it); `sections` merged in."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "grace_period_s": 2},
        "upstreams": [
            {"name": f"up{i}", "base_url": url, "models": [FAKE_MODEL], "timeout_s": 10}
            for i, url in enumerate(base_urls)
        ],
        "models": fake_model_window(4096),
        "local_model": {"enabled": "never"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def chat(content: str = "Say hi", *, model: str = FAKE_MODEL, **fields: Any) -> pb.CompleteRequest:
    """A one-message CompleteRequest."""
    return pb.CompleteRequest(
        model=model, messages=[pb.Message(role=pb.ROLE_USER, content=content)], **fields
    )


def chat_stream(content: str = "Say hi", **fields: Any) -> pb.CompleteStreamRequest:
    """A one-message CompleteStreamRequest."""
    return pb.CompleteStreamRequest(
        model=fields.pop("model", FAKE_MODEL),
        messages=[pb.Message(role=pb.ROLE_USER, content=content)],
        **fields,
    )


@pytest.fixture(autouse=True)
def _stop_signals_restored() -> Iterator[None]:
    """This process's handlers of the stop signals, put back after each test: a `serve`
    run in-process ends by ignoring them (`early_signals.ignore`, as its process exits),
    and every gateway a later test spawned then inherited SIGHUP ignored, as under `nohup`
    (its SIGHUP test hung), and this process SIGINT ignored."""
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in stop_signals}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A fault-injecting OpenAI-compatible upstream on loopback."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        yield fake


@dataclasses.dataclass
class RunningGateway:
    """A gateway on loopback and a stub connected to it."""

    server: GatewayServer
    channel: grpc.aio.Channel
    stub: pb_grpc.CompletionServiceStub


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def cache_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The cache config section for each backend; Redis is a real redis-server."""
    if request.param == "memory":
        return {"backend": "memory"}
    redis = request.getfixturevalue("redis_server")
    return {"backend": "redis", "redis_url": redis.url, "operation_timeout_s": 1.0}


@pytest_asyncio.fixture
async def start_gateway() -> AsyncIterator[Callable[[GatewayConfig], Any]]:
    """A factory that starts gateways; at teardown each channel is closed and each gateway
    stopped, the last started first, all of them even when one's close fails, and a
    gateway whose channel could not be made too."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(config: GatewayConfig, **options: Any) -> RunningGateway:
            server = GatewayServer(config, **options)
            await server.__aenter__()  # a failed start closes what it opened itself
            stack.push_async_callback(server.stop, grace_s=0)
            channel = grpc.aio.insecure_channel(server.address)
            stack.push_async_callback(channel.close)
            return RunningGateway(server, channel, pb_grpc.CompletionServiceStub(channel))

        yield start


@pytest_asyncio.fixture
async def gateway(
    upstream: FakeUpstream, start_gateway: Callable[[GatewayConfig], Any]
) -> RunningGateway:
    """The gateway in front of one fake upstream."""
    result: RunningGateway = await start_gateway(gateway_config(upstream.base_url))
    return result


@pytest.fixture
def estimator_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each text the token estimator (`service.tokens._estimate`) reads
    from now on: how far into a long text an estimate went."""
    lengths: list[int] = []
    estimate = tokens._estimate

    def counting(text: str) -> int:
        lengths.append(len(text))
        return estimate(text)

    monkeypatch.setattr(tokens, "_estimate", counting)
    return lengths


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the test (`refusing_port`)."""
    with refusing_port() as port:
        yield port


@pytest.fixture
def stub(gateway: RunningGateway) -> pb_grpc.CompletionServiceStub:
    """A stub for the gateway in front of one fake upstream."""
    return gateway.stub


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` whose crashed worker costs one failed test, not a hung run."""
    return make_scheduler(config, log)
