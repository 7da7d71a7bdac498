"""A TCP relay on loopback that counts the bytes callers send through it: how many times
a client sent a request (a retry policy resending one the gateway cannot take); it can
hold the server's replies back, the requests still going through (a command the server
ran, whose reply its client has not had yet), and counts the connections callers closed."""

from __future__ import annotations

import asyncio

__all__ = ["CountingRelay"]


class CountingRelay:
    """A TCP relay on loopback to `target` (`HOST:PORT`) that counts the bytes callers send
    through it: how many times a request went out. `sent_bytes`: what they sent;
    `replying`, cleared, holds the server's replies until it is set again; `closed`: the
    connections callers closed (or reset)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.sent = 0
        self.sent_bytes = bytearray()
        self.closed = 0
        self.replying = asyncio.Event()
        self.replying.set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        their_reader, their_writer = await asyncio.open_connection(*self._target)
        await asyncio.gather(
            self._pipe(reader, their_writer, counted=True),
            self._pipe(their_reader, writer, counted=False),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, counted: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if counted:
                    self.sent += len(data)
                    self.sent_bytes += data
                else:
                    await self.replying.wait()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if counted:
                self.closed += 1
