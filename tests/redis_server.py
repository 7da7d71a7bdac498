"""A throwaway redis-server on 127.0.0.1 for tests: started, paused, stopped at will."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

__all__ = ["RedisServer", "redis_server"]

_START_TIMEOUT_S = 10.0
_START_ATTEMPTS = 3
_PING_TIMEOUT_S = 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One `redis-server` subprocess without persistence, on a free loopback port."""

    def __init__(self, *, password: str | None = None, unix_socket: bool = False) -> None:
        """`unix_socket`: listen on a socket file too (`socket_url`), beside the port."""
        self.password = password
        self._is_on_socket = unix_socket
        self.port = _free_port()
        self._dir = tempfile.mkdtemp(prefix="llmgw-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """`unix:///PATH?db=0`, with `unix_socket`."""
        return f"unix://{self._dir}/redis.sock?db=0"

    @property
    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the server and wait until it answers PING. Its port, free when probed, may
        be bound by another test process (xdist) before the server binds it: the server
        then exits at once, and starts again on another port."""
        for _ in range(_START_ATTEMPTS - 1):
            if await self._started():
                return
            self.port = _free_port()
        if not await self._started():
            raise RuntimeError("redis-server exited at start")

    async def _started(self) -> bool:
        """Spawn the server: whether it answers PING (False: it exited first)."""
        self._spawn()
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not await self._answers_ping():
                if not self.is_running:
                    return False
                await asyncio.sleep(0.02)
        return True

    def _spawn(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self._process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                *(["--requirepass", self.password] if self.password else []),
                *(["--unixsocket", f"{self._dir}/redis.sock"] if self._is_on_socket else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def _answers_ping(self) -> bool:
        # Bounded: a listener that is not this server (see `start`) answers nothing.
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S):
                return await self._ping()
        except TimeoutError:
            return False

    async def _ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            if self.password:
                writer.write(f"AUTH {self.password}\r\n".encode())
                await writer.drain()
                if not (await reader.readline()).startswith(b"+OK"):
                    return False
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await reader.readline()).startswith(b"+PONG")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    async def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 5)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest_asyncio.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A fresh redis-server on loopback, stopped at teardown."""
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limits_redis_url(request: pytest.FixtureRequest) -> str | None:
    """Where the tenants' limits are kept: a real redis-server's URL, or None (memory)."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url
