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
from tests.integration.gateway_process import is_running

REPO = Path(__file__).resolve().parents[2]
_HANG_GUARD_S = 30.0


def _write_config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config_data("http://127.0.0.1:1/v1", **sections)))
    return path


@contextlib.asynccontextmanager
async def _serve(*args: str, own_group: bool = False) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", *args, "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        start_new_session=own_group,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        # Read to the end: the workers and multiprocessing's resource tracker hold the pipes
        # a moment after the supervisor exits, and a pipe left open outlives the test's loop.
        async with asyncio.timeout(_HANG_GUARD_S):
            await process.communicate()


def _worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children that are gateway workers (not the resource tracker)."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    pids = []
    for pid in path.read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


async def test_sigterm_while_workers_start_stops_them_all(tmp_path):
    """SIGTERM before the workers are ready: the supervisor stops and leaves no worker behind.

    Before, the supervisor only handled SIGTERM once every worker was ready; until then the
    default action killed it at once and the workers, orphaned, kept serving the port.
    """
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", "2") as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(workers := _worker_pids(process.pid)) < 2:
                await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
        alive = [pid for pid in workers if is_running(pid)]
        for pid in alive:  # do not leave them running whatever the outcome
            os.kill(pid, signal.SIGKILL)
        assert alive == []
        assert code == 0


async def test_ctrl_c_while_workers_start_is_a_clean_stop(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the workers too, as
    they start: a clean stop (status 0, no traceback) as with SIGTERM to the supervisor.

    Before, a worker still importing the gateway got KeyboardInterrupt: a traceback on
    stderr and an exit by SIGINT, which the supervisor took for a failure (status 1).
    """
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", "2", own_group=True) as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(workers := _worker_pids(process.pid)) < 2:
                await asyncio.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        async with asyncio.timeout(_HANG_GUARD_S):
            _, err = await process.communicate()
        alive = [pid for pid in workers if is_running(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert alive == []
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_config_error_found_at_start_exits_2_at_once(tmp_path, workers):
    """A keys file the server refuses at start: status 2 and one line, as the README
    promises for config errors, with one process and with workers.

    Before, one process gave a traceback and status 1; with workers the supervisor waited
    up to 120 s for workers that had already died, then failed with a traceback while
    still joining them.
    """
    keys = tmp_path / "keys"
    keys.write_text("not-a-digest tenant\n")
    path = _write_config(tmp_path, auth={"mode": "keys", "keys_file": str(keys)})
    async with _serve("--config", str(path), "--workers", workers) as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            out, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert b"listening" not in out
    assert f"config error: {path}: auth.keys_file".encode() in err
    assert b"Traceback" not in err


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
                _, err = await second.communicate()
            assert second.returncode == 1
            # One line saying why, not a traceback.
            assert f"llm-gateway: cannot listen on 127.0.0.1:{port}".encode() in err
            assert b"Traceback" not in err
        first.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            assert await first.wait() == 0


async def test_workers_stop_when_the_supervisor_is_killed_outright(tmp_path):
    """SIGKILL to the supervisor alone (not its process group): the workers stop too.

    The kernel sends each worker SIGTERM when its parent dies; before, they went on
    serving the port with nobody left to stop them.
    """
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", "2") as process:
        assert process.stdout is not None
        async with asyncio.timeout(_HANG_GUARD_S):
            assert b"listening on" in await process.stdout.readline()
        workers = _worker_pids(process.pid)
        assert len(workers) == 2
        process.kill()  # not waited for: its pipes stay open while any worker lives
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                while alive := [pid for pid in workers if is_running(pid)]:
                    await asyncio.sleep(0.05)
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert alive == []


# asyncio.to_thread's default pool: min(32, cores + 4) threads.
_DEFAULT_POOL_THREADS = min(32, (os.cpu_count() or 1) + 4)


@pytest.mark.timeout(180)
async def test_a_worker_dying_while_serving_stops_the_rest_however_many_there_are(tmp_path):
    """Any worker killed while serving, the last one started included: the supervisor
    stops the others and exits 1.

    Before, it waited for each worker's exit on a thread of asyncio's default pool: past
    that pool's size (32 on a machine of 28 cores or more) the last workers' exits were
    never watched, and one of them dying went unnoticed while the gateway ran short.
    """
    count = _DEFAULT_POOL_THREADS + 1
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", str(count)) as process:
        assert process.stdout is not None
        async with asyncio.timeout(120):
            assert b"listening on" in await process.stdout.readline()
        workers = sorted(_worker_pids(process.pid))  # in the order they were started
        assert len(workers) == count
        os.kill(workers[-1], signal.SIGKILL)
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = [pid for pid in workers if is_running(pid)]
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
        assert (code, alive) == (1, [])
