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


def is_running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie (an orphan's exit is reaped by whoever
    adopted it, if anyone, so a dead process may linger as one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
