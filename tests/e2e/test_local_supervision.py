"""The local model's server is supervised: restarted when it dies, stopped on shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import gateway_pb2 as pb
from service.config import LocalModelConfig, parse_config
from service.local_model import LocalModelServer, LocalModelUnavailable
from service.server import LOCAL_MODEL_HEALTH, GatewayServer
from tests.e2e.conftest import LOCAL_MODEL, REPO
from tests.gguf_files import STAND_IN_MODEL
from tests.integration.gateway_process import is_running

pytestmark = [pytest.mark.local_model, pytest.mark.xdist_group("local_model")]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_killed_local_server_is_restarted_and_stopped_on_shutdown(start_gateway):
    """Killing llama.cpp's server brings a new one up (on a new port); stop() ends it.

    Meanwhile health says NOT_SERVING: it is the gateway's only upstream.
    """
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": {"enabled": "always"}},
        environ={},
    )
    gateway = await start_gateway(config)
    server: GatewayServer = gateway.server
    assert server.local_model is not None
    first_pid = server.local_model.pid
    assert first_pid is not None
    health = health_pb2_grpc.HealthStub(gateway.channel)
    watches = {
        name: health.Watch(health_pb2.HealthCheckRequest(service=name))
        for name in ("", LOCAL_MODEL_HEALTH)
    }
    seen: dict[str, list[int]] = {name: [] for name in watches}

    async def follow(name: str) -> None:
        async for reply in watches[name]:
            seen[name].append(reply.status)

    followers = [asyncio.ensure_future(follow(name)) for name in watches]
    for _ in range(100):  # each watch's first answer, before the kill: else it may be the down
        if all(seen.values()):
            break
        await asyncio.sleep(0.05)
    assert seen == {name: [SERVING] for name in watches}
    os.kill(first_pid, signal.SIGKILL)
    for _ in range(600):
        if server.local_model.restarts == 1 and server.local_model.pid not in (None, first_pid):
            break
        await asyncio.sleep(0.1)
    assert server.local_model.restarts == 1
    request = pb.CompleteRequest(
        model=LOCAL_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="Hello")],
        params=pb.GenerationParams(max_tokens=4),
    )
    for _ in range(100):  # the new process may still be loading the model
        try:
            response = await gateway.stub.Complete(request, timeout=60)
            break
        except Exception:
            await asyncio.sleep(0.2)
    assert response.metadata.upstream == "local"
    for _ in range(100):
        if all(len(statuses) >= 3 for statuses in seen.values()):
            break
        await asyncio.sleep(0.05)
    for follower in followers:
        follower.cancel()
    up_down_up = [SERVING, NOT_SERVING, SERVING]
    assert seen == {"": up_down_up, LOCAL_MODEL_HEALTH: up_down_up}
    second_pid = server.local_model.pid
    assert second_pid is not None
    await server.stop(grace_s=0)
    for _ in range(100):
        if not is_running(second_pid):
            break
        await asyncio.sleep(0.05)
    assert not is_running(second_pid)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {
        address
        for address, state in ((row[1], row[3]) for row in rows)
        if state == "0A" and int(address.split(":")[1], 16) == port
    }


async def test_the_environment_cannot_move_or_open_the_local_server(
    start_gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HOST`, `PORT`, `CONFIG_FILE` and `API_KEY` in the gateway's environment (set by
    many images and platforms) do not reach llama.cpp's server: it listens on loopback, on
    the port the gateway chose, with the gateway's options, and answers calls.

    Before, llama-cpp-python's server read them over its command line: `HOST=0.0.0.0`
    opened the model to the network with no caller key; `PORT`, `API_KEY` or a
    `CONFIG_FILE` failed the start once `startup_timeout_s` had passed."""
    monkeypatch.setenv("HOST", "0.0.0.0")
    local = {"enabled": "always", "startup_timeout_s": 30}
    config = parse_config({"server": {"listen": "127.0.0.1:0"}, "local_model": local}, environ={})
    gateway = await start_gateway(config)
    assert _listening_addresses(gateway.server.local_model.port) == {
        f"0100007F:{gateway.server.local_model.port:04X}"
    }
    overriding = {"PORT": "1", "CONFIG_FILE": "/nonexistent.yaml", "API_KEY": "k"}
    # Any of its settings: this one, read, fails every completion with HTTP 500.
    overriding["VOCAB_ONLY"] = "true"
    for name, value in overriding.items():
        monkeypatch.setenv(name, value)
    os.kill(gateway.server.local_model.pid, signal.SIGKILL)  # restarted with them set
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with asyncio.timeout(60):
        while gateway.server.local_model.restarts == 0 or (
            (await health.Check(check)).status != SERVING
        ):
            await asyncio.sleep(0.05)
    request = pb.CompleteRequest(
        model=LOCAL_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="Hi")],
        params=pb.GenerationParams(max_tokens=2),
    )
    assert (await gateway.stub.Complete(request, timeout=60)).metadata.upstream == "local"


def test_a_model_file_llama_cpp_cannot_load_exits_1_with_its_reason(tmp_path: Path) -> None:
    """A corrupt GGUF: one line naming llama.cpp's own reason, exit 1, no traceback."""
    model = tmp_path / "corrupt.gguf"
    model.write_bytes(STAND_IN_MODEL)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1:0"},
                "local_model": {"enabled": "always", "model_path": str(model)},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(config)],
        check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-gateway: local model: llama.cpp server exited during start-up")
    assert f"Failed to load model from file: {model}" in last


async def test_nothing_in_the_gateways_working_directory_runs_in_the_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules in the directory the gateway runs in are not imported by llama.cpp's
    server: it fails to load a corrupt model file, with llama.cpp's own reason.

    Before, both of its Pythons put that directory first on their path: a `ctypes.py` or
    `uvicorn.py` there (any file named as a module they import) ran in the server, under
    `llm-gateway serve` too, whose own Python leaves that directory off its path."""
    model = tmp_path / "corrupt.gguf"
    model.write_bytes(STAND_IN_MODEL)
    here = tmp_path / "cwd"
    here.mkdir()
    for module in ("ctypes", "uvicorn"):
        (here / f"{module}.py").write_text(
            f"open({str(tmp_path / module)!r}, 'w').close()\n"
            f"raise ImportError('{module} from the working directory')\n"
        )
    monkeypatch.chdir(here)
    config = LocalModelConfig(model_path=str(model), startup_timeout_s=60)
    with pytest.raises(LocalModelUnavailable) as failed:
        async with LocalModelServer(config):
            pass
    assert f"Failed to load model from file: {model}" in str(failed.value)
    assert not (tmp_path / "ctypes").exists()
    assert not (tmp_path / "uvicorn").exists()


def test_gateway_killed_outright_takes_the_local_server_with_it(tmp_path: Path) -> None:
    """SIGKILL of the gateway (OOM killer, kill -9): the llama.cpp server does not outlive it."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": {"enabled": "always"}})
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    children: list[int] = []
    try:
        assert gateway.stdout is not None
        assert gateway.stdout.readline().startswith("llm-gateway listening on")
        children = _children(gateway.pid)
        assert len(children) == 1
        gateway.kill()
        gateway.wait()
        for _ in range(100):
            if not is_running(children[0]):
                break
            time.sleep(0.05)
        assert not is_running(children[0])
    finally:
        gateway.kill()
        gateway.wait()
        for pid in children:  # the bug this guards against: do not leave it behind
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]
