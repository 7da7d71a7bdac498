"""A real HTTP forward proxy on loopback for tests: CONNECT tunnels over real sockets.

It records each CONNECT's target and `Proxy-Authorization` header, then tunnels bytes
both ways, or is told to refuse with a status, drop the connection, hang, or answer
garbage. `hosts` maps names to where the proxy really connects (`upstream.test` to a
fake upstream's loopback port): such a name resolves nowhere else, so a call that
reached the upstream by it went through the tunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

__all__ = ["ConnectRecord", "ForwardProxy"]

Mode = Literal["tunnel", "refuse", "drop", "hang", "garbage"]


@dataclass(frozen=True, slots=True)
class ConnectRecord:
    """One CONNECT the proxy received."""

    target: str  # as the request line named it: `host:port`
    host_header: str | None
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    """A CONNECT proxy on 127.0.0.1; `async with ForwardProxy(...) as proxy:`.

    `mode`: `tunnel` (the default), `refuse` with `status`, `drop` (close without a
    word), `hang` (read the CONNECT, never answer) or `garbage` (answer what is not
    HTTP). It can be changed between calls. `interim`: heads (1xx) a tunnel's 200 follows;
    `established`: that 200's head (and whatever else the proxy sends with it).
    """

    hosts: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    mode: Mode = "tunnel"
    status: int = 407
    interim: bytes = b""
    established: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    requests: list[ConnectRecord] = field(default_factory=list)
    port: int = 0
    tunnels_open: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets(self) -> list[str]:
        """Each CONNECT's target, in order."""
        return [r.target for r in self.requests]

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._stopping.set()  # hanging handlers return
        for writer in list(self._writers):
            writer.transport.abort()  # tunnels end on the reset
        if self._tasks:
            _, left = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in left:
                task.cancel()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        method, target, _ = request_line.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.requests.append(
            ConnectRecord(target, headers.get("host"), headers.get("proxy-authorization"))
        )
        if self.mode == "drop":
            return
        if self.mode == "hang":
            await self._stopping.wait()
            return
        if self.mode == "garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
            return
        if self.mode == "refuse":
            body = b"<html>refused</html>"
            extra = {
                407: b'Proxy-Authenticate: Basic realm="test"\r\n',
                101: b"Upgrade: h2c\r\nConnection: Upgrade\r\n",
            }.get(self.status, b"")
            writer.write(
                b"HTTP/1.1 %d Refused\r\n%sContent-Length: %d\r\n\r\n%s"
                % (self.status, extra, len(body), body)
            )
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        address = self.hosts.get(host.strip("[]"), (host.strip("[]"), int(port)))
        try:
            up_reader, up_writer = await asyncio.open_connection(*address)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        self._writers.add(up_writer)
        if self.interim:
            writer.write(self.interim)
            await writer.drain()
        writer.write(self.established)
        await writer.drain()
        self.tunnels_open += 1
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, up_writer))
                group.create_task(_pipe(up_reader, writer))
        finally:
            self.tunnels_open -= 1
            self._writers.discard(up_writer)
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the reader's end, then end the writer's side (half-close)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
