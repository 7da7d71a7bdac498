"""`serve --workers N` as an operator meets it: a busy port, signals while starting, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import gateway_config_data

REPO = Path(__file__).resolve().parents[2]
_HANG_GUARD_S = 30.0


def _write_config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config_data("http://127.0.0.1:1/v1", **sections)))
    return path


@contextlib.asynccontextmanager
async def _serve(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", *args, "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children that are gateway workers (not the resource tracker)."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    pids = []
    for pid in path.read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_another_gateway_serves_is_refused(tmp_path, workers):
    """Workers bind with SO_REUSEPORT; that must not let a second gateway join a busy port.

    Before, `serve --workers 2` on a port that another `--workers` gateway (same user)
    served started as if all was well, and the kernel split the callers between the two.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = _write_config(tmp_path, server={"listen": f"127.0.0.1:{port}"})
    async with _serve("--config", str(path), "--workers", "2") as first:
        assert first.stdout is not None
        async with asyncio.timeout(_HANG_GUARD_S):
            line = await first.stdout.readline()
        assert b"listening" in line
        async with _serve("--config", str(path), "--workers", workers) as second:
            assert second.stdout is not None
            async with asyncio.timeout(_HANG_GUARD_S):
                line = await second.stdout.readline()  # b"" once it exits
            assert b"listening" not in line
            async with asyncio.timeout(_HANG_GUARD_S):
                assert await second.wait() != 0
        first.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            assert await first.wait() == 0
