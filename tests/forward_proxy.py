"""A real HTTP forward proxy on loopback for tests: CONNECT tunnels and requests in
absolute form (`POST http://host:port/path HTTP/1.1`), over real sockets.

It records each request's method, target and `Host` and `Proxy-Authorization` headers,
then tunnels bytes both ways (CONNECT) or forwards the request in origin form, without
its `Proxy-Authorization`, and relays the answer (absolute form), or is told to refuse
with a status, drop the connection, hang, or answer garbage. Like squid by default, it
can refuse CONNECT to ports other than `connect_ports` with 403. `hosts` maps names to
where the proxy really connects (`upstream.test` to a fake upstream's loopback port):
such a name resolves nowhere else, so a call that reached the upstream by it went
through the proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["ForwardProxy", "ProxyRequest"]

Mode = Literal["tunnel", "refuse", "drop", "hang", "garbage"]


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """One request the proxy received: a CONNECT, or one in absolute form."""

    target: str  # as the request line named it: `host:port`, or `http://host:port/path`
    host_header: str | None
    proxy_authorization: str | None
    method: str = "CONNECT"


@dataclass
class ForwardProxy:
    """A CONNECT proxy on 127.0.0.1; `async with ForwardProxy(...) as proxy:`.

    `mode`: `tunnel` (the default: tunnel or forward), `refuse` with `status`, `drop`
    (close without a word), `hang` (read the request, never answer) or `garbage` (answer
    what is not HTTP). It can be changed between calls. `interim`: heads (1xx) a tunnel's
    200 follows; `established`: that 200's head (and whatever else the proxy sends with
    it). `connect_ports`: the ports CONNECT may name (None: any), others refused with 403
    as squid's `http_access deny CONNECT !SSL_ports` does; `cut_after`: how many bytes of
    a forwarded answer are relayed before the proxy closes the connection (None: all).
    `refusal_headers`: header lines its own refusals carry (`X-Squid-Error: ...\r\n`);
    `relay_headers`: those it adds to each answer it forwards (`Via: ...\r\n`).
    """

    hosts: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    mode: Mode = "tunnel"
    status: int = 407
    interim: bytes = b""
    established: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    connect_ports: Collection[int] | None = None
    cut_after: int | None = None
    refusal_headers: bytes = b""
    relay_headers: bytes = b""
    requests: list[ProxyRequest] = field(default_factory=list)
    connections: int = 0
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
        """Serve one client connection: a CONNECT ends it in a tunnel; requests in
        absolute form are forwarded one after another while both ends keep it alive."""
        self.connections += 1
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            headers: dict[str, str] = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            method, target, _ = request_line.split(" ", 2)
            self.requests.append(
                ProxyRequest(
                    target, headers.get("host"), headers.get("proxy-authorization"), method
                )
            )
            if self.mode == "refuse" and method != "CONNECT":
                # An error page framed by its length: the connection lives on, as squid's.
                await reader.readexactly(int(headers.get("content-length", "0")))
                await _refuse(writer, self.status, self.refusal_headers)
                continue
            if not await self._answered_in_mode(writer):
                return
            if method == "CONNECT":
                await self._tunnel(target, writer, reader)
                return
            if not await self._forward(method, target, header_lines, headers, reader, writer):
                return

    async def _answered_in_mode(self, writer: asyncio.StreamWriter) -> bool:
        """Do what `mode` says other than `tunnel`; False when the request is done with."""
        if self.mode == "drop":
            return False
        if self.mode == "hang":
            await self._stopping.wait()
            return False
        if self.mode == "garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
            return False
        if self.mode == "refuse":
            await _refuse(writer, self.status, self.refusal_headers)
            return False
        return True

    async def _forward(  # noqa: PLR0917
        self,
        method: str,
        target: str,
        header_lines: list[str],
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Forward a request in absolute form to its origin, in origin form, without the
        proxy's own headers, and relay the answer; whether the client's connection may
        carry another request."""
        url = urlsplit(target)
        assert url.scheme == "http", target  # an https origin's requests come by CONNECT
        assert headers.get("host") == url.netloc, (headers.get("host"), target)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        host = (url.hostname or "").strip("[]")
        address = self.hosts.get(host, (host, url.port or 80))
        try:
            up_reader, up_writer = await asyncio.open_connection(*address)
        except OSError:
            await _refuse(writer, 502, self.refusal_headers)
            return False
        self._writers.add(up_writer)
        try:
            hop_by_hop = ("proxy-authorization:", "proxy-connection:", "connection:")
            kept = [h for h in header_lines if h and not h.lower().startswith(hop_by_hop)]
            path = url.path + (f"?{url.query}" if url.query else "")
            request = "".join(f"{line}\r\n" for line in [f"{method} {path} HTTP/1.1", *kept])
            up_writer.write(f"{request}Connection: close\r\n\r\n".encode("latin-1") + body)
            lines = (await up_reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            # The origin's `Connection: close` is its own hop's: the client's may live on.
            kept_lines = [x for x in lines if x and not x.lower().startswith(b"connection:")]
            length = next(
                (int(x[15:]) for x in lines if x.lower().startswith(b"content-length:")), None
            )
            is_framed = length is not None or any(
                x.lower().startswith(b"transfer-encoding:") for x in lines
            )
            # Relayed till its length, or else till the origin closes (asked to, above).
            head = b"".join(line + b"\r\n" for line in kept_lines) + self.relay_headers + b"\r\n"
            await _relay(head, up_reader, writer, length=length, cut=self.cut_after)
            return is_framed and self.cut_after is None
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()

    async def _tunnel(
        self, target: str, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> None:
        """Answer CONNECT: refused for a port not in `connect_ports`, else a tunnel."""
        host, _, port = target.rpartition(":")
        if self.connect_ports is not None and int(port) not in self.connect_ports:
            await _refuse(writer, 403, self.refusal_headers)
            return
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


async def _refuse(writer: asyncio.StreamWriter, status: int, headers: bytes = b"") -> None:
    """Answer with `status` and a short page, as a proxy refusing does; `headers`: more
    header lines."""
    body = b"<html>refused</html>"
    extra = headers + {
        407: b'Proxy-Authenticate: Basic realm="test"\r\n',
        101: b"Upgrade: h2c\r\nConnection: Upgrade\r\n",
    }.get(status, b"")
    writer.write(
        b"HTTP/1.1 %d Refused\r\n%sContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body)
    )
    await writer.drain()


async def _relay(
    head: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    length: int | None,
    cut: int | None,
) -> None:
    """Write `head`, then `length` bytes from `reader` (None: all till its end); cut
    (the connection aborted) after `cut` bytes in all."""
    data = head + (await reader.readexactly(length) if length is not None else b"")
    while data:
        if cut is not None and len(data) >= cut:
            writer.write(data[:cut])
            await writer.drain()
            writer.transport.abort()
            return
        writer.write(data)
        await writer.drain()
        if cut is not None:
            cut -= len(data)
        data = await reader.read(65536) if length is None else b""


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
