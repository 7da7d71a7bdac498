"""The gateway as a child process (`python -m service serve`), for tests of replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

_STARTUP_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_LISTENING = "llm-gateway listening on "


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    """A gateway serving in a child process, and a stub to it."""

    stub: pb_grpc.CompletionServiceStub
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def gateway_process(
    config: Mapping[str, Any], directory: Path
) -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    """`config` written as YAML under `directory`, served by one child process; a stub to it."""
    async with started_gateway_process(config, directory) as gateway:
        yield gateway.stub


def _entry(setup: str) -> list[str]:
    """`python -m service` as its arguments, or a program that runs `setup` (code that may
    replace the service's names, as a test's monkeypatch would) and then it."""
    if not setup:
        return ["-m", "service"]
    return [
        "-c",
        "import sys; from service import early_signals; early_signals.hold()\n"
        f"{setup}\nfrom service.main import main; sys.exit(main())",
    ]


@contextlib.asynccontextmanager
async def started_gateway_process(
    config: Mapping[str, Any], directory: Path, *, setup: str = ""
) -> AsyncIterator[GatewayProcess]:
    """`gateway_process`, with its process (a test may kill it), `setup` run first in it.

    `--workers 1`: with its state in Redis the gateway would otherwise run one process per
    core, and these tests are about separate replicas. SIGTERM on exit, SIGKILL if it hangs.
    """
    path = directory / f"gateway-{os.urandom(4).hex()}.yaml"
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, *_entry(setup), "serve", "--config", str(path),
        "--workers", "1", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(_STARTUP_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(_LISTENING), f"gateway process did not start: {line!r}"
        async with grpc.aio.insecure_channel(line[len(_LISTENING) :].strip()) as channel:
            yield GatewayProcess(pb_grpc.CompletionServiceStub(channel), process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def listening_port(process: asyncio.subprocess.Process) -> int:
    """The port `process`, or a process it started (a worker), listens on, read
    from Linux's /proc: for a gateway given `listen: 127.0.0.1:0` that cannot print its
    "listening on" line (its stdout closed). A port probed free and handed to it instead
    may be bound by another test process first."""
    async with asyncio.timeout(_STARTUP_TIMEOUT_S * 2):
        while not (ports := _listening_ports(_process_tree(process.pid))):
            assert process.returncode is None, f"the gateway exited with {process.returncode}"
            await asyncio.sleep(0.05)
    (port,) = ports
    return port


def _process_tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    tree, index = [pid], 0
    while index < len(tree):
        with contextlib.suppress(OSError):  # gone meanwhile
            path = Path(f"/proc/{tree[index]}/task/{tree[index]}/children")
            tree += map(int, path.read_text().split())
        index += 1
    return tree


def _listening_ports(pids: list[int]) -> set[int]:
    """The ports of the TCP sockets processes `pids` listen on (grpc's for 127.0.0.1 is
    an IPv6 one, on the address mapped from it, where the kernel has IPv6)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    inodes.add(os.readlink(fd))
    ports = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        with contextlib.suppress(FileNotFoundError):  # no IPv6
            for fields in map(str.split, table.read_text().splitlines()[1:]):
                if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # 0A: listening
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def is_running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie (an orphan's exit is reaped by whoever
    adopted it, if anyone, so a dead process may linger as one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
