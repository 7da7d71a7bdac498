"""The llama.cpp server runs without the gateway's secrets in its environment, answers
the gateway's key alone, and runs on the threads the config gives it.

llama.cpp's server is stood in for by the small OpenAI-compatible server of
test_local_model_restart, started by the real gateway; its environment is read from /proc.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from tests.conftest import chat, gateway_config_data
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    stand_in_local_model,
)
from tests.secret_capture import record_emitted, register_secret

SECRETS = {
    "PROVIDER_KEY_T": "sk-provider-CANARY",
    "CACHE_REDIS_PASSWORD_T": "cache-CANARY",
    "LLM_GATEWAY_API_KEY": "llmgw_caller-CANARY",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer otlp-CANARY",
    # The one Redis URL that may carry its password (nothing listens there: the ledger
    # connects only to record a call).
    "LLM_GATEWAY__LEDGER__REDIS_URL": "redis://:ledger-CANARY@127.0.0.1:1/0",
    # Proxies' URLs carry their passwords (the fake upstream, on loopback, takes none).
    "HTTPS_PROXY": "http://alice:proxy-CANARY@127.0.0.1:1",
    "http_proxy": "http://bob:proxy-CANARY@127.0.0.1:1",
    "ALL_PROXY": "http://carol:proxy-CANARY@127.0.0.1:1",
}


def _environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().split("=", 1) for item in raw.split(b"\0") if item)
    return dict(pairs)


async def _gateway_with_stand_in(
    tmp_path, monkeypatch, upstream, start_gateway, **local: object
) -> tuple[Any, int]:
    """A gateway running the stand-in llama.cpp as its local model (`local` beside the
    model settings), and the stand-in's pid."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    settings = {"enabled": "always", "model": MODEL, "model_path": str(model), **local}
    data = gateway_config_data(upstream.base_url, local_model=settings)
    gw = await start_gateway(parse_config(data, source="<test>", environ={}))
    assert gw.server.local_model is not None
    pid = gw.server.local_model.pid
    assert pid is not None
    return gw, pid


async def test_the_local_model_server_gets_no_secret_of_the_gateway(
    tmp_path, monkeypatch, upstream, start_gateway
):
    """Provider keys and Redis passwords the config names (in a `ledger.redis_url` set
    from the environment too), the CLI's caller key, the OpenTelemetry exporter's
    headers and the proxy variables are withheld from llama.cpp's server, which needs
    none of them; the rest of the environment (PATH, ...) reaches it.

    Before, the server inherited the gateway's whole environment, every key with it; and
    then, still the override carrying the ledger's Redis URL, password and all; and then
    still `HTTPS_PROXY` and the like, with the proxy's password in their URL."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    data = gateway_config_data(
        upstream.base_url,
        local_model={"enabled": "always", "model": MODEL, "model_path": str(model)},
        cache={"redis_password_env": "CACHE_REDIS_PASSWORD_T"},
    )
    data["upstreams"][0]["api_key_env"] = "PROVIDER_KEY_T"
    gw = await start_gateway(parse_config(data, source="<test>", environ=dict(os.environ)))
    assert gw.server.local_model is not None
    pid = gw.server.local_model.pid
    assert pid is not None
    seen = _environment_of(pid)
    assert sorted(set(SECRETS) & set(seen)) == []
    assert not any("CANARY" in value for value in seen.values())
    assert seen["PATH"] == os.environ["PATH"]


async def test_the_local_model_server_gets_none_of_the_variables_that_override_its_options(
    tmp_path, monkeypatch, upstream, start_gateway
):
    """llama-cpp-python's server reads `HOST`, `PORT` and `CONFIG_FILE`, and its settings
    `api_key`, `ssl_keyfile` and `ssl_certfile` in any case, over the command line the
    gateway gives it: none reaches it (tests/e2e/test_local_supervision.py shows why)."""
    overriding = {
        "HOST": "0.0.0.0",
        "PORT": "8080",
        "CONFIG_FILE": "/etc/app.yaml",
        "API_KEY": "k",
        "ssl_keyfile": "/k.pem",
        "SSL_CERTFILE": "/c.pem",
    }
    for name, value in overriding.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOSTNAME", "kept")
    _, pid = await _gateway_with_stand_in(tmp_path, monkeypatch, upstream, start_gateway)
    seen = _environment_of(pid)
    # API_KEY holds the gateway's own key for it (the next test), never the environment's.
    assert sorted(set(overriding) & set(seen)) == ["API_KEY"]
    assert seen["API_KEY"] != overriding["API_KEY"]
    assert seen["HOSTNAME"] == "kept"


async def test_the_local_model_server_gets_no_variable_named_after_one_of_its_settings(
    tmp_path, monkeypatch, upstream, start_gateway
):
    """llama-cpp-python's server reads each of its settings (`Settings`, pydantic settings)
    from the variable of that name, in any case, where the command line leaves it unset:
    none reaches it, whatever its case. The rest of the environment does.

    Before, only `api_key`, `ssl_keyfile` and `ssl_certfile` were withheld: a `SEED` set
    for something else changed the local model's answers, and a `VOCAB_ONLY=true` or
    `EMBEDDING=true` answered every completion HTTP 500 while health said SERVING."""
    settings = pytest.importorskip("llama_cpp.server.settings")
    names = sorted(settings.Settings.model_fields)
    assert {"seed", "vocab_only", "cache", "root_path"} <= set(names)
    # Upper, lower and mixed case: pydantic reads them all.
    spelled = {name: (name.upper(), name, name.title())[i % 3] for i, name in enumerate(names)}
    for variable in spelled.values():
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "kept")
    _, pid = await _gateway_with_stand_in(tmp_path, monkeypatch, upstream, start_gateway)
    seen = _environment_of(pid)
    # API_KEY holds the gateway's own key for it, never the environment's.
    assert [variable for variable in spelled.values() if variable in seen] == ["API_KEY"]
    assert seen["API_KEY"] != "1"
    assert seen["LLAMA_CPP_LIB_PATH"] == "kept"


async def _status_of(port: int, path: str, headers: dict[str, str]) -> int:
    """The status the server on loopback `port` answers a request to `path` with."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    async with aiohttp.ClientSession() as session:
        method = "POST" if path.endswith("completions") else "GET"
        url = f"http://127.0.0.1:{port}{path}"
        async with session.request(method, url, json=body, headers=headers) as response:
            return response.status


async def test_the_local_model_server_answers_the_gateway_alone(
    tmp_path, monkeypatch, upstream, start_gateway, caplog
):
    """llama.cpp's server takes a key of its own, new at each start, from its environment:
    calls through the gateway are answered; a request to its port without that key, from
    any other process on the machine, is refused (401). The key is in none of its command
    line, the gateway's logs, or ListModels.

    Before, the server took no key: any local user could call the model on its port, with
    no tenant, limits or accounting."""
    caplog.set_level(logging.DEBUG)
    gw, pid = await _gateway_with_stand_in(tmp_path, monkeypatch, upstream, start_gateway)
    port = gw.server.local_model.port
    key = register_secret(_environment_of(pid)["API_KEY"])
    assert len(key) >= 32
    reply = await gw.stub.Complete(chat(model=MODEL), timeout=5)
    assert (reply.content, reply.metadata.upstream) == ("hi", "local")
    listed = await gw.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    record_emitted(reply, listed)
    for path in ("/v1/chat/completions", "/v1/models"):
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": key}):
            assert await _status_of(port, path, headers) == 401, (path, headers)
    assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert key not in str(listed)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__!r}" for r in caplog.records)
    assert "local_model.ready" in logged
    assert key not in logged


def _options_of(pid: int) -> dict[str, str]:
    """The `--name value` pairs of the process's command line."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return {word: value for word, value in itertools.pairwise(words) if word[:2] == "--"}


async def test_the_local_model_server_processes_prompts_on_the_configured_threads(
    tmp_path, monkeypatch, upstream, start_gateway
):
    """`local_model.threads` bounds all of llama.cpp's work: generating (`--n_threads`)
    and reading the prompt (`--n_threads_batch`).

    Before, only the first was set: llama.cpp read every prompt on as many threads as the
    node has cores, whatever the setting, the gateway's CPU affinity or its container's
    CPU quota (which then throttled them)."""
    _, pid = await _gateway_with_stand_in(tmp_path, monkeypatch, upstream, start_gateway, threads=1)
    options = _options_of(pid)
    assert (options["--n_threads"], options.get("--n_threads_batch")) == ("1", "1")
