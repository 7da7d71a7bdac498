"""Closing the local model's supervisor (service.local_model), without starting llama.cpp."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from service.config import LocalModelConfig
from service.local_model import LocalModelServer
from tests.gguf_files import STAND_IN_MODEL

ROOT = Path(__file__).resolve().parents[2]


NEVER_READY = "#!/bin/sh\nexec sleep 120\n"  # takes llama.cpp's arguments, never listens


def stand_in_for_llama_cpp(tmp_path: Path, script: str) -> tuple[Path, Path]:
    """A model file llama.cpp never reads, and `script` as the Python the supervisor runs."""
    model = tmp_path / "model.gguf"
    model.write_bytes(STAND_IN_MODEL)
    python = tmp_path / "python"
    python.write_text(script)
    python.chmod(0o755)
    return model, python


async def test_cancelling_aclose_while_the_supervisor_winds_down_cancels_aclose() -> None:
    """aclose() cancelled while it waits for its supervisor task ends cancelled, not normally."""
    server = LocalModelServer(LocalModelConfig())
    winding_down = asyncio.Event()

    async def supervisor() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.Event().wait()  # slow to wind down, until cancelled again
            raise

    server._watchdog = asyncio.create_task(supervisor())
    await asyncio.sleep(0)
    closing = asyncio.create_task(server.aclose())
    await asyncio.wait_for(winding_down.wait(), timeout=10)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, timeout=10)


async def test_a_start_cancelled_while_waiting_for_the_server_stops_the_process(
    tmp_path: Path,
) -> None:
    """Cancelled during start-up (e.g. SIGTERM), the half-started server process is stopped."""
    model, never_ready = stand_in_for_llama_cpp(tmp_path, NEVER_READY)
    server = LocalModelServer(
        LocalModelConfig(model_path=str(model), startup_timeout_s=60), python=str(never_ready)
    )
    starting = asyncio.create_task(server.start())
    async with asyncio.timeout(10):
        while server.pid is None:
            await asyncio.sleep(0.01)
    pid = server.pid
    try:
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        async with asyncio.timeout(10):
            while _is_running(pid):
                await asyncio.sleep(0.01)
    finally:
        if _is_running(pid):  # the bug this guards against: do not leave it behind
            os.kill(pid, signal.SIGKILL)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its exit status is left to collect.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_while_the_local_model_starts_stops_the_gateway_at_once(
    tmp_path: Path, workers: str
) -> None:
    """SIGTERM during the local model's start-up ends `serve` then, not at the start timeout.

    With --workers the supervisor starts the local model before any worker.
    """
    model, never_ready = stand_in_for_llama_cpp(tmp_path, NEVER_READY)
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model), "startup_timeout_s": 60}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    # The supervisor runs `sys.executable` as llama.cpp's Python: this one never answers.
    driver = (
        f"import sys; sys.executable = {str(never_ready)!r}\n"
        "from service.main import main\n"
        f"args = ['serve', '--config', {str(config)!r}, '--workers', {workers!r}]\n"
        "raise SystemExit(main(args))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    gateway = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=ROOT, env=env, stderr=subprocess.DEVNULL
    )
    children: list[int] = []
    try:
        for _ in range(200):
            children = _children(gateway.pid)
            if children:
                break
            time.sleep(0.05)
        assert children, "the local model's process did not start"
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=15) == 0
        for pid in children:
            assert not _is_running(pid)
    finally:
        gateway.kill()
        gateway.wait()
        for pid in children:
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


_ONCE_THEN_CRASH = """#!{python}
# A stand-in for llama.cpp's Python: each run notes when it started; the first answers
# /v1/models on --port for a moment (to its key alone, as llama.cpp's does) and exits,
# every later one exits at once, as a server that cannot start again.
import http.server, os, pathlib, sys, threading, time
runs = pathlib.Path({runs!r})
first = not runs.exists()
with runs.open("a") as log:
    log.write(f"{{time.time()}}\\n")
if not first:
    sys.exit(1)
port = int(sys.argv[sys.argv.index("--port") + 1])
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        is_ours = self.headers.get("Authorization") == "Bearer " + os.environ["API_KEY"]
        body = b'{{"data": []}}' if is_ours else b'{{"detail": "Invalid API key"}}'
        self.send_response(200 if is_ours else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Models)
threading.Timer(0.5, server.shutdown).start()
server.serve_forever()
"""


async def test_a_child_that_cannot_start_again_is_retried_ever_less_often(
    tmp_path: Path,
) -> None:
    """Exits in a row back off, doubling: not a restart every `restart_backoff_s` forever."""
    runs = tmp_path / "runs"
    script = _ONCE_THEN_CRASH.format(python=sys.executable, runs=str(runs))
    model, stand_in = stand_in_for_llama_cpp(tmp_path, script)
    config = LocalModelConfig(model_path=str(model), restart_backoff_s=0.2)
    async with LocalModelServer(config, python=str(stand_in)) as server:
        async with asyncio.timeout(20):
            while server.restarts < 5:
                await asyncio.sleep(0.05)
    started = [float(line) for line in runs.read_text().split()]
    # Each failed start takes about 0.5 s to notice, then waits 0.2, 0.4, 0.8 s...; with a
    # fixed backoff every gap between failed starts would be the same.
    gaps = [b - a for a, b in itertools.pairwise(started[1:])]
    assert len(gaps) >= 3
    assert gaps[-1] >= gaps[0] + 0.5
