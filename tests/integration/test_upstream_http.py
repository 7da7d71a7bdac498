"""The upstream HTTP/1.1 pool against raw socket servers: framing, reuse, faults, limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import logging
import socket
import ssl
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import orjson
import pytest
import uvloop

from llmgateway.v1 import gateway_pb2 as pb
from service.upstream import http
from service.upstream.http import BodyTooLarge, ConnectFailed, HttpError, HttpPool, _head
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config
from tests.integration.helpers import error_info
from tests.integration.pki import make_pki

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (bodies are sent with Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def replying(*replies: bytes, linger_s: float = 0.0) -> Handler:
    """A handler that reads one request, writes `replies`, then waits `linger_s` and closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for reply in replies:
            writer.write(reply)
        await writer.drain()
        await asyncio.sleep(linger_s)

    return handler


class RawServer:
    """A TCP server on loopback running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    """A factory of raw servers, each closed on exit."""
    started: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        raw = RawServer(handler)
        raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
        started.append(raw)
        return raw

    try:
        yield start
    finally:
        for raw in started:
            assert raw.server is not None
            raw.server.close()
            await raw.server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    async with serving() as start:
        yield start


def pool_for(raw: RawServer, **options: float) -> HttpPool:
    return HttpPool(
        raw.url,
        max_connections=int(options.get("max_connections", 10)),
        connect_timeout_s=2.0,
        keepalive_s=options.get("keepalive_s", 30.0),
    )


async def answer_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: echo each request's body back with Content-Length."""
    while True:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


async def test_sequential_requests_reuse_one_connection(serve):
    """A response read to the end leaves its connection for the next request."""
    raw = await serve(answer_forever)
    pool = pool_for(raw)
    for n in range(3):
        async with await pool.request("POST", "/echo", {}, b"hello %d" % n) as response:
            assert response.status == 200
            assert await response.read() == b"hello %d" % n
    assert raw.connections == 1
    assert (pool.open_connections, pool.checked_out) == (1, 0)
    await pool.aclose()


async def test_the_request_line_carries_the_base_path_host_and_length(serve):
    """`/v1` from the base URL prefixes the path; Host and Content-Length are sent."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    raw = await serve(record)
    pool = pool_for(raw)
    async with await pool.request("POST", "/chat/completions", {"X-Test": "1"}, b"{}") as r:
        assert r.status == 204
        assert await r.read() == b""
    head = seen[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    port = raw.url.split(":")[2].split("/")[0]
    assert f"Host: 127.0.0.1:{port}\r\n" in head
    assert "Content-Length: 2\r\n" in head
    assert "X-Test: 1\r\n" in head
    await pool.aclose()


async def test_the_pools_headers_lead_and_a_request_header_of_their_name_replaces_one(serve):
    """Headers given to the pool go first on every request, then the request's own; a
    request header named as one of the pool's is sent once, with its value, in its place."""
    heads: list[list[str]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head.decode().split("\r\n")[2:-2])  # the lines after Host
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    raw = await serve(record)
    pool = HttpPool(
        raw.url,
        max_connections=1,
        connect_timeout_s=2.0,
        headers={"Accept": "application/json", "User-Agent": "gateway"},
    )
    for own in ({"X-Own": "1"}, {"User-Agent": "caller", "X-Own": "2"}, {}):
        async with await pool.request("POST", "/chat/completions", own, b"{}") as response:
            assert response.status == 204
    assert heads == [
        ["Accept: application/json", "User-Agent: gateway", "X-Own: 1", "Content-Length: 2"],
        ["Accept: application/json", "User-Agent: caller", "X-Own: 2", "Content-Length: 2"],
        ["Accept: application/json", "User-Agent: gateway", "Content-Length: 2"],
    ]
    await pool.aclose()


async def test_a_pool_header_with_a_line_break_refuses_every_request():
    """A pool's header is checked as a request's is: each request that would carry it is
    refused, none sent."""
    pool = HttpPool(
        "http://127.0.0.1:1/v1",
        max_connections=1,
        connect_timeout_s=2.0,
        headers={"Authorization": "Bearer key\r\nInjected: yes"},
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="line break"):
            await pool.request("POST", "/chat/completions", {"X-Own": "1"}, b"{}")
    await pool.aclose()


async def test_a_query_in_the_base_url_is_sent_after_the_path(serve):
    """`?api-version=...` in the base URL (as Azure OpenAI needs) follows every path."""
    lines: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        lines.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    raw = await serve(record)
    pool = HttpPool(raw.url + "?api-version=2024-06-01", max_connections=1, connect_timeout_s=2)
    async with await pool.request("POST", "/chat/completions", {}, b"{}") as response:
        assert response.status == 204
    assert lines == [b"POST /v1/chat/completions?api-version=2024-06-01 HTTP/1.1"]
    await pool.aclose()


async def test_a_chunked_body_arrives_piece_by_piece_and_whole(serve):
    """Chunked transfer encoding is decoded; each read hands over what arrived."""

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    raw = await serve(chunked)
    pool = pool_for(raw)
    response = await pool.request("POST", "/", {}, b"")
    pieces = []
    while (piece := await response.next_chunk()) is not None:
        pieces.append(piece)
    response.release()
    assert pieces == [b"hello", b" world"]
    assert pool.open_connections == 1  # complete and keep-alive: back in the pool
    await pool.aclose()


async def test_a_body_without_length_ends_when_the_server_closes(serve):
    """No Content-Length and not chunked: read until close, and do not reuse."""

    raw = await serve(replying(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"))
    pool = pool_for(raw)
    async with await pool.request("GET", "/", {}) as response:
        assert await response.read() == b"all of it"
    assert pool.open_connections == 0
    await pool.aclose()


async def test_a_body_cut_short_is_an_error_not_a_short_answer(serve):
    """Content-Length promises more than arrives before the close: HttpError."""

    raw = await serve(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"))
    pool = pool_for(raw)
    response = await pool.request("POST", "/", {}, b"x")
    with pytest.raises(HttpError, match="mid-response"):
        await response.read()
    response.release()
    assert pool.open_connections == 0
    await pool.aclose()


async def test_a_body_without_length_cut_by_a_reset_is_an_error(serve):
    """Read until close: only a clean close ends the body; a reset cuts it short."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # SO_LINGER 0: the close sends a reset

    raw = await serve(reset)
    pool = pool_for(raw)
    response = await pool.request("POST", "/", {}, b"x")
    with pytest.raises(HttpError, match="mid-response"):
        await response.read()
    response.release()
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_garbage_instead_of_http_is_an_error(serve):
    """A reply that is not HTTP fails the request instead of hanging it."""

    raw = await serve(replying(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", linger_s=1.0))
    pool = pool_for(raw)
    with pytest.raises(HttpError, match="malformed"):
        await pool.request("POST", "/", {}, b"x")
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_a_second_response_after_the_end_does_not_overwrite_the_first(serve):
    """Bytes after a response's end are no part of it: it keeps its status and body."""

    raw = await serve(
        replying(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 500 Oops\r\nX-Late: 1\r\nContent-Length: 4\r\n\r\nlate",
            linger_s=0.5,
        )
    )
    pool = pool_for(raw)
    async with await pool.request("POST", "/", {}, b"x") as response:
        assert await response.read() == b"ok"
        assert response.status == 200
        assert "x-late" not in response.headers
    assert pool.open_connections == 0  # unasked-for bytes: not reused
    await pool.aclose()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(serve):
    """After the server drops an idle keep-alive connection the next request opens another."""

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await asyncio.sleep(0.05)  # then close, as a provider's idle timeout would

    raw = await serve(once_then_close)
    pool = pool_for(raw)
    for body in (b"first", b"second"):
        async with await pool.request("POST", "/", {}, body) as response:
            assert await response.read() == body
        await asyncio.sleep(0.2)
    assert raw.connections == 2
    await pool.aclose()


async def test_a_connection_whose_close_was_read_is_not_reused(serve):
    """Once the server's FIN is read the connection is not handed out, though asyncio calls
    `connection_lost` only on a later turn of the loop: a request picking a connection
    in that turn got "closed mid-response" instead of a fresh connection.

    Runs on asyncio's loop only: the turn is made to happen by the order of readiness,
    which uvloop's deferred writes do not keep.
    """
    signal: list[asyncio.StreamWriter] = []
    go = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        signal.append(writer)
        await asyncio.sleep(1)

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if body == b"first":
                await go.wait()
                signal[0].write(b"!")  # the byte the client waits for, then at once the FIN:
                writer.get_extra_info("socket").shutdown(socket.SHUT_WR)  # read in one turn
                await asyncio.sleep(0.5)
                return

    raw = await serve(once_then_close)
    side = await serve(hold)
    side_reader, side_writer = await asyncio.open_connection(*side.server.sockets[0].getsockname())
    pool = pool_for(raw)
    async with await pool.request("POST", "/", {}, b"first") as response:
        assert await response.read() == b"first"
    while not signal:
        await asyncio.sleep(0.01)
    go.set()
    await side_reader.readexactly(1)  # woken in the turn that reads the FIN, before its close
    async with await pool.request("POST", "/", {}, b"second") as response:
        assert await response.read() == b"second"
    assert raw.connections == 2
    side_writer.close()
    await pool.aclose()


async def settled(condition: Callable[[], bool]) -> None:
    """Wait (at most 2 s) until `condition()` holds."""
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.005)


def chunked_then(end: asyncio.Event, *, after_end: bytes = b"0\r\n\r\n") -> Handler:
    """Keep-alive: each request gets one chunk at once and `after_end` once `end` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await end.wait()
            writer.write(after_end)
            await writer.drain()
            end.clear()

    return handler


async def test_a_body_released_before_its_end_is_reused_once_the_end_arrives(serve):
    """`release_at_end`: the connection waits for its last chunk, then serves the next call."""
    end = asyncio.Event()
    raw = await serve(chunked_then(end))
    pool = pool_for(raw, max_connections=1)
    for _ in range(3):
        response = await pool.request("POST", "/", {}, b"")
        assert await response.next_chunk() == b"hello"
        response.release_at_end(within_s=30)
        assert pool.checked_out == 1  # still its slot: the end has not arrived
        end.set()
        await settled(lambda: pool.checked_out == 0)
    assert raw.connections == 1
    await pool.aclose()


async def test_a_body_whose_end_never_comes_is_closed_after_the_grace(serve):
    """No end within the grace: the connection is closed, its slot freed, the next is new."""
    end = asyncio.Event()  # never set
    raw = await serve(chunked_then(end))
    pool = pool_for(raw, max_connections=1)
    response = await pool.request("POST", "/", {}, b"")
    assert await response.next_chunk() == b"hello"
    response.release_at_end(within_s=0.05)
    await settled(lambda: pool.checked_out == 0)
    assert pool.open_connections == 0
    async with await pool.request("POST", "/", {}, b"") as second:
        assert await second.next_chunk() == b"hello"
    assert raw.connections == 2
    await pool.aclose()


async def test_more_body_after_release_at_end_is_bounded_and_closes(serve):
    """A server that keeps sending after the caller was done is cut off, never buffered."""
    end = asyncio.Event()
    flood = b"".join(b"4000\r\n" + b"x" * 0x4000 + b"\r\n" for _ in range(8))  # 128 KiB
    raw = await serve(chunked_then(end, after_end=flood))
    pool = pool_for(raw, max_connections=1)
    response = await pool.request("POST", "/", {}, b"")
    assert await response.next_chunk() == b"hello"
    response.release_at_end(within_s=30)
    end.set()
    await settled(lambda: pool.checked_out == 0)
    assert pool.open_connections == 0
    await pool.aclose()


async def test_connections_older_than_keepalive_are_not_reused(serve):
    """An idle connection past `keepalive_s` is closed and replaced."""
    raw = await serve(answer_forever)
    pool = pool_for(raw, keepalive_s=0.05)
    for body in (b"a", b"b"):
        async with await pool.request("POST", "/", {}, body) as response:
            await response.read()
        await asyncio.sleep(0.1)
    assert raw.connections == 2
    await pool.aclose()


async def test_idle_connections_past_keepalive_are_closed_without_another_request(serve):
    """A pool left quiet closes its idle connections once they pass `keepalive_s`."""
    open_now = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        try:
            await answer_forever(reader, writer)
        finally:
            open_now -= 1

    raw = await serve(counted)
    pool = pool_for(raw, keepalive_s=0.1)
    responses = await asyncio.gather(*(pool.request("POST", "/", {}, b"x") for _ in range(3)))
    for response in responses:
        await response.read()
        response.release()
    assert (pool.open_connections, open_now) == (3, 3)
    await asyncio.sleep(0.4)  # nothing asks the pool for a connection meanwhile
    assert (pool.open_connections, open_now) == (0, 0)
    await pool.aclose()


async def test_max_connections_queues_requests_beyond_it(serve):
    """With one connection allowed, concurrent requests take turns on it."""
    active = 0
    most = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, most
        while True:
            await read_request(reader)
            active += 1
            most = max(most, active)
            await asyncio.sleep(0.05)
            active -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    raw = await serve(slow)
    pool = pool_for(raw, max_connections=1)

    async def one() -> bytes:
        async with await pool.request("POST", "/", {}, b"x") as response:
            return await response.read()

    assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    assert (raw.connections, most) == (1, 1)
    await pool.aclose()


@pytest.mark.parametrize(
    "order",
    [
        "cancelled, then the connection freed",
        "cancelled, the connection freed before the request ran",
        "the connection freed, then the request cancelled before it ran",
    ],
)
async def test_a_request_cancelled_while_waiting_for_a_connection_hands_it_on(serve, order):
    """With one connection allowed, a request cancelled while it waits in line never keeps
    the connection: however the cancel and the hand-over meet, the next request gets it."""
    raw = await serve(answer_forever)
    pool = pool_for(raw, max_connections=1)
    first = await pool.request("POST", "/", {}, b"a")
    assert await first.read() == b"a"
    second = asyncio.create_task(pool.request("POST", "/", {}, b"b"))
    third = asyncio.create_task(pool.request("POST", "/", {}, b"c"))
    await asyncio.sleep(0)  # both wait in line for the one connection
    if order == "cancelled, then the connection freed":
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        first.release()
    elif order == "cancelled, the connection freed before the request ran":
        second.cancel()
        first.release()
    else:
        first.release()
        second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    async with asyncio.timeout(10):  # not a measure: a lost connection would wait for ever
        async with await third as response:
            assert await response.read() == b"c"
    assert pool.checked_out == 0
    await pool.aclose()


@pytest.mark.parametrize("is_whole", [False, True], ids=["read_at_once", "read_once_whole"])
async def test_a_body_past_the_readers_limit_is_refused(serve, is_whole):
    """`read(max_bytes=...)` refuses a longer body and takes one of exactly that length,
    whether it is called at once or once the body is whole (read without waiting)."""
    raw = await serve(answer_forever)
    pool = pool_for(raw, max_connections=1)
    for sent, max_bytes in ((b"x" * 100, 99), (b"y" * 100, 100)):
        response = await pool.request("POST", "/", {}, sent)
        async with asyncio.timeout(10):  # not a measure: a bound on a wait for the body
            while is_whole and not response.is_complete:
                await asyncio.sleep(0.01)
        if len(sent) > max_bytes:
            with pytest.raises(BodyTooLarge, match="larger than 99 bytes"):
                await response.read(max_bytes=max_bytes)
        else:
            assert await response.read(max_bytes=max_bytes) == sent
        response.release()
    await pool.aclose()


async def test_a_large_body_read_late_is_paused_then_delivered_whole(serve):
    """Past the high-water mark reading pauses; reading the body resumes it to the end."""
    size = 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)
        await writer.drain()
        await asyncio.sleep(2)

    raw = await serve(big)
    pool = pool_for(raw)
    response = await pool.request("POST", "/", {}, b"x")
    await asyncio.sleep(0.2)  # let it pile up unread
    async with asyncio.timeout(5):
        body = await response.read()
    response.release()
    assert len(body) == size
    await pool.aclose()


async def test_a_body_in_tiny_chunks_read_late_is_paused_within_its_bound(serve):
    """The high-water mark bounds the memory an unread body holds, not only its bytes.

    A chunked body in two-byte chunks is one `bytes` object per two bytes (about 43 bytes
    each, with its list entry): counted by their bytes alone, the 256 KiB mark paused
    reading only once some 5.5 MB of them piled up, for each call whose caller stopped
    reading. Measured as what lies in memory allocated by `http.py`.
    """
    size = 600 * 1024
    written = 0

    async def tiny(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"2\r\nzz\r\n" * 4096
        while written < size:
            writer.write(piece)
            await writer.drain()
            written += 2 * 4096
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    raw = await serve(tiny)
    pool = pool_for(raw)
    tracemalloc.start()
    try:
        response = await pool.request("POST", "/", {}, b"x")
        await asyncio.sleep(0.5)  # let it pile up unread
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*/service/upstream/http.py")]
        )
    finally:
        tracemalloc.stop()
    assert sum(stat.size for stat in held.statistics("filename")) < 2 * 1024 * 1024
    async with asyncio.timeout(10):
        body = await response.read()
    response.release()
    assert body == b"z" * size
    await pool.aclose()


async def test_a_connection_paused_on_a_whole_unread_body_is_reused_unpaused(serve):
    """A body that arrived whole but paused reading, released unread: the next request works.

    The last read pushed the unread body past the high-water mark (reading paused) and
    ended it; the connection is reusable, but only once reading resumes.
    """
    size = 256 * 1024 + 100  # past the high-water mark only with its last read

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)
            await writer.drain()

    raw = await serve(big)
    pool = pool_for(raw, max_connections=1)
    response = await pool.request("POST", "/", {}, b"x")
    async with asyncio.timeout(1):
        while not response.is_complete:
            await asyncio.sleep(0.01)
    response.release()  # whole, so reusable, though nobody read it
    async with asyncio.timeout(1), await pool.request("POST", "/", {}, b"x") as again:
        assert len(await again.read()) == size
    assert raw.connections == 1
    await pool.aclose()


async def test_a_request_cut_once_written_whole_was_sent(serve):
    """Cut while waiting for the answer, after the server read every byte: `on_sent`."""
    read = asyncio.Event()

    async def read_and_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        read.set()
        await asyncio.sleep(30)

    raw = await serve(read_and_hang)
    pool = pool_for(raw)
    sent: list[bool] = []
    request = asyncio.ensure_future(
        pool.request("POST", "/x", {}, b"prompt", on_sent=lambda: sent.append(True))
    )
    await asyncio.wait_for(read.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert sent == [True]
    await pool.aclose()


async def test_a_request_cut_while_still_being_written_was_not_sent(serve):
    """A server that reads nothing leaves most of a long body in the gateway's buffer: cut
    then, the request was not sent, and the socket is closed."""
    started = asyncio.Event()

    async def read_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started.set()
        await asyncio.sleep(30)

    raw = await serve(read_nothing)
    pool = pool_for(raw)
    sent: list[bool] = []
    body = b"x" * (64 * 1024 * 1024)  # far past loopback's socket buffers
    request = asyncio.ensure_future(
        pool.request("POST", "/x", {}, body, on_sent=lambda: sent.append(True))
    )
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert sent == []
    assert pool.open_connections == 0
    await pool.aclose()


async def test_the_rest_of_a_request_cut_while_being_written_never_reaches_the_server(serve):
    """Cut while most of a long body waits in the gateway's buffer, the connection is
    dropped with it: the server, reading on, never gets the whole request.

    Before, the connection was closed gracefully, and its transport went on writing the
    body nobody waited for (holding the socket) until the server had read it all."""
    started, done = asyncio.Event(), asyncio.Event()
    cut = asyncio.Event()
    received: list[int] = []

    async def read_after_the_cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        started.set()
        try:
            await cut.wait()
            _, body = await read_request(reader)
            received.append(len(body))
        finally:
            done.set()

    raw = await serve(read_after_the_cut)
    pool = pool_for(raw)
    body = b"x" * (64 * 1024 * 1024)  # far past loopback's socket buffers
    request = asyncio.ensure_future(pool.request("POST", "/x", {}, body))
    await asyncio.wait_for(started.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    cut.set()
    await asyncio.wait_for(done.wait(), 5)
    assert received == []
    await pool.aclose()


async def test_a_refused_connection_is_connect_failed():
    """Nothing listening: ConnectFailed, and the slot is given back."""
    pool = HttpPool("http://127.0.0.1:1/v1", max_connections=1, connect_timeout_s=2.0)
    for _ in range(2):  # a leaked slot would make the second wait forever
        with pytest.raises(ConnectFailed):
            async with asyncio.timeout(3):
                await pool.request("GET", "/models", {})
    await pool.aclose()


@pytest.mark.parametrize(
    "headers",
    [{"X-Evil": "a\r\nInjected: yes"}, {"X-Evil": "a\nb"}, {"Bad\r\nName": "v"}, {"A:B": "v"}],
)
def test_a_line_break_in_a_header_is_refused(headers):
    """No header can smuggle a second header or a second request."""
    with pytest.raises(ValueError, match="line break"):
        _head("POST", "/", "h", headers, 0)


async def test_headers_are_case_insensitive_and_repeated_ones_joined(serve):
    """Header names are read lowercase; a repeated header's values are joined."""

    raw = await serve(
        replying(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: 0\r\n\r\n",
            linger_s=0.5,
        )
    )
    pool = pool_for(raw)
    async with await pool.request("POST", "/", {}, b"x") as response:
        assert response.status == 429
        assert response.headers["retry-after"] == "3"
        assert response.headers["x-a"] == "1, 2"
    await pool.aclose()


async def test_a_header_that_never_ends_is_refused_not_buffered(serve):
    """A header line longer than the limit fails the request at once, ended or not.

    httptools hands a header over only once it is whole, so a limit checked on whole
    headers alone let an upstream send one endless header into memory until the deadline.
    """

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (256 * 1024))
        await writer.drain()
        await asyncio.sleep(1.5)

    raw = await serve(endless)
    pool = pool_for(raw)
    with pytest.raises(HttpError, match="too large"):
        async with asyncio.timeout(1):
            await pool.request("POST", "/", {}, b"x")
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_a_head_of_many_headers_past_the_limit_says_so(serve):
    """Headers past the limit in one read are refused as too large, as one endless header
    is: the reason the log gives, not httptools' `on_header_field callback error`."""
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))

    async def many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: 0\r\n\r\n" % lines)
        await writer.drain()
        await asyncio.sleep(1.5)

    raw = await serve(many)
    pool = pool_for(raw)
    with pytest.raises(HttpError, match="response headers too large"):
        await pool.request("POST", "/", {}, b"x")
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_header_names_are_read_alike_and_those_kept_for_reuse_stay_bounded(serve):
    """Each header name is keyed in lower case (a repeated one's values joined), the same
    the first time and once kept for the next answer; an upstream sending ever new names
    does not grow what is kept for them past its bound."""
    answers = 0

    async def new_names(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        while True:
            await read_request(reader)
            answers += 1
            made_up = b"".join(b"X-Made-Up-%d-%d: v\r\n" % (answers, i) for i in range(300))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Twice: a\r\n"
                b"x-twice: b\r\n%sContent-Length : 2\r\n\r\nok" % made_up
            )
            await writer.drain()

    raw = await serve(new_names)
    pool = pool_for(raw)
    for answer in range(1, 4):
        async with await pool.request("POST", "/", {}, b"x") as response:
            assert await response.read() == b"ok"
            assert response.headers["content-type"] == "text/plain"
            assert response.headers["x-twice"] == "a, b"
            assert response.headers["content-length"] == "2"
            assert response.headers[f"x-made-up-{answer}-299"] == "v"
            assert len(response.headers) == 303
    assert len(http._header_keys) <= http._MAX_HEADER_KEYS
    await pool.aclose()


async def test_interim_answers_that_never_end_are_refused_not_buffered(serve):
    """Endless `100 Continue` heads, each whole, are heads past the same limit: the bytes
    kept until the final head (for a repeated `Content-Length`) grew without bound."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        while True:  # until the client closes: the write then fails
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 1024)
            await writer.drain()

    raw = await serve(endless)
    pool = pool_for(raw)
    with pytest.raises(HttpError, match="too large"):
        async with asyncio.timeout(5):
            await pool.request("POST", "/", {}, b"x")
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_a_trailer_that_never_ends_is_refused_not_buffered(serve):
    """The same limit holds for a chunked body's trailer, which is parsed like headers."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        writer.write(b"0\r\nX-Trailer: " + b"a" * (256 * 1024))
        await writer.drain()
        await asyncio.sleep(1.5)

    raw = await serve(endless)
    pool = pool_for(raw)
    response = await pool.request("POST", "/", {}, b"x")
    with pytest.raises(HttpError, match="too large"):
        async with asyncio.timeout(1):
            await response.read()
    response.release()
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


async def test_an_informational_response_is_skipped_for_the_real_one(serve):
    """A 103 Early Hints before the answer is not taken for the answer."""

    raw = await serve(
        replying(
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
            linger_s=0.5,
        )
    )
    pool = pool_for(raw)
    async with await pool.request("POST", "/", {}, b"x") as response:
        assert response.status == 200
        assert "link" not in response.headers
        assert await response.read() == b"real"
    await pool.aclose()


_COMPLETION = orjson.dumps(
    {
        "id": "c1",
        "model": FAKE_MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
)
_JSON_TYPE = b"Content-Type: application/json"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\n%s\nContent-Length: %d\n\n" % (_JSON_TYPE, len(_COMPLETION)),
        b"HTTP/1.1 200 OK\r\n%s\r\nX-Note: folded\r\n on\r\nContent-Length: %d\r\n\r\n"
        % (_JSON_TYPE, len(_COMPLETION)),
        b"HTTP/1.1 200 OK\r\n%s\r\nTransfer-Encoding: chunked\r\n\r\n%x ;x=1\r\n"
        % (_JSON_TYPE, len(_COMPLETION)),
    ],
    ids=["bare-lf", "folded-header", "blank-before-chunk-extension"],
)
async def test_what_rfc_9112_has_a_client_accept_is_an_answer(serve, start_gateway, head):
    """Bare LF line ends, a folded header and blanks before a chunk extension are read
    as the answer they frame, once, not refused as a dropped connection and sent again."""
    tail = b"\r\n0\r\n\r\n" if b"chunked" in head else b""
    raw = await serve(replying(head + _COMPLETION + tail, linger_s=0.5))
    gateway = await start_gateway(gateway_config(raw.url))

    reply = await gateway.stub.Complete(chat(), timeout=10)

    assert (reply.content, reply.metadata.attempts, raw.connections) == ("hi", 1, 1)


_GZIPPED = gzip.compress(_COMPLETION)


def _answering_each(answer: bytes) -> Handler:
    """Keep-alive: every request on a connection answered with `answer`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip,\r\n chunked",
        b"Transfer-Encoding: gzip\r\n\t,chunked",
        b"Transfer-Encoding: chunked\r\n ",
        b"Content-Encoding: gzip\r\nContent-Length: %d,\r\n %d" % (len(_GZIPPED), len(_GZIPPED)),
        b"Content-Length: %d\r\n " % len(_COMPLETION),
    ],
    ids=[
        "coding-then-chunked",
        "fold-before-comma",
        "blank-fold",
        "length-repeated",
        "length-blank-fold",
    ],
)
async def test_a_folded_framing_header_frames_the_answer_as_unfolded(serve, start_gateway, framing):
    """A framing header folded over two lines (RFC 9112 §5.2 obs-fold) is read as its
    value with the fold a space, as every other header is: `gzip,<fold> chunked` frames a
    chunked body, answered once and the connection kept. llhttp framed such a
    `Transfer-Encoding` as not ending in chunked, where the value the gateway read did: the
    body, chunk sizes and all, was refused as no gzip, or waited on until the deadline for
    a close a keep-alive server never sends; a folded repeated length was refused, and so
    was a length with a blank line folded onto it, as malformed (and sent again)."""
    chunked = b"chunked" in framing
    body = _GZIPPED if b"gzip" in framing else _COMPLETION
    if chunked:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = b"HTTP/1.1 200 OK\r\n%s\r\n%s\r\n\r\n" % (_JSON_TYPE, framing)
    raw = await serve(_answering_each(head + body))
    gateway = await start_gateway(gateway_config(raw.url))

    for _ in range(2):
        reply = await gateway.stub.Complete(chat(), timeout=10)
        assert (reply.content, reply.metadata.attempts) == ("hi", 1)
    assert raw.connections == 1


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length : %d" % (len(_COMPLETION) + 100), b"Transfer-Encoding : chunked"],
    ids=["length", "chunked"],
)
async def test_a_body_cut_short_of_a_header_with_a_blank_before_its_colon_is_no_answer(
    serve, start_gateway, framing
):
    """llhttp reads `Content-Length : N` (and `Transfer-Encoding : chunked`) as the
    framing: a body cut short of it by the close is a dropped connection, as without the
    blank, not an answer served whole."""
    body = (
        b"%x\r\n%s\r\n" % (len(_COMPLETION), _COMPLETION) if b"chunked" in framing else _COMPLETION
    )
    head = b"HTTP/1.1 200 OK\r\n%s\r\n%s\r\n\r\n" % (_JSON_TYPE, framing)
    raw = await serve(replying(head + body))
    gateway = await start_gateway(gateway_config(raw.url))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "dropped the connection" in caught.value.details()


def _lengths_answering(*heads: bytes) -> Handler:
    """Keep-alive: each request answered `b"N bytes"` under the next of `heads`, where
    `{n}` is the body's length; a head is written in two, split at its `|`, so that the
    client reads its second length's value apart from its name."""
    answers = iter(heads)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            head = next(answers)
            body = b"%d bytes" % len(head)
            before, _, after = head.replace(b"{n}", b"%d" % len(body)).partition(b"|")
            writer.write(before)
            await writer.drain()
            await asyncio.sleep(0.02)  # two reads for the client, not one
            writer.write(after + body)
            await writer.drain()

    return handler


_ONE_LENGTH_TWICE = [
    b"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-A: b\r\nContent-Length:| {n}\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: {n},| {n}\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nCONTENT-LENGTH :|{n} \r\n\r\n",
    b"HTTP/1.1 200 OK\ncontent-length: {n},{n}\ncontent-length: {n}\n|\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Length: |{n}\r\n\r\n",
]


@pytest.mark.parametrize(
    "head", _ONE_LENGTH_TWICE, ids=["two-lines", "a-list", "cases", "bare-lf", "interim"]
)
async def test_one_content_length_sent_twice_frames_the_body(serve, head):
    """The same `Content-Length` in two lines or as a list (RFC 9110 §8.6) is that length:
    the body is read whole and the connection reused for the next answer, framed right."""
    raw = await serve(_lengths_answering(head, head))
    pool = pool_for(raw)
    body = b"%d bytes" % len(head)
    for _ in range(2):
        async with await pool.request("POST", "/", {}, b"x") as response:
            assert response.status == 200
            assert response.headers["content-length"] == str(len(body))
            assert await response.read() == body
    assert (raw.connections, pool.open_connections) == (1, 1)
    await pool.aclose()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Length:| 1{n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: {n},| 1{n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: {n}, \r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0{n}, {n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -{n}, -{n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 1{n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: {n}\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: {n}\r\n"
        b"Content-Length: |{n}\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: {n}\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-A: bb\r\nContent-Length: {n}, 1{n}\r\n\r\n",
    ],
    ids=[
        "two-lines",
        "a-list",
        "an-empty-one",
        "leading-zero",
        "negative",
        "chunked",
        "beside-identity",
        "repeated-beside-identity",
        "interim",
    ],
)
async def test_content_lengths_that_differ_stay_refused(serve, head):
    """Lengths that differ (a smuggling risk), a list with an empty or a signed value,
    beside `Transfer-Encoding` too, are refused as malformed, as before; and so is a
    length beside a `Transfer-Encoding` that does not end in chunked, which would be read
    until a close that a server framing its answer by the length delays."""
    raw = await serve(_lengths_answering(head))
    pool = pool_for(raw)
    with pytest.raises(HttpError, match=r"malformed HTTP response: .*(Content-Length|Transfer)"):
        await pool.request("POST", "/", {}, b"x")
    assert (pool.open_connections, pool.checked_out) == (0, 0)
    await pool.aclose()


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 3", b"Content-Length: 3\r\nContent-Length: 3"],
    ids=["once", "twice"],
)
async def test_a_length_beside_transfer_encoding_yields_to_it_and_ends_the_connection(
    serve, lengths
):
    """`Transfer-Encoding: chunked` frames an answer that also has a `Content-Length`
    (RFC 9112 §6.3), rather than the answer being refused, and each attempt's billed
    answer with it; the connection is not reused, as the server framed its answer two
    ways: the next request goes on a new one, and its answer is read right."""
    first = b"HTTP/1.1 200 OK\r\n%s\r\nTransfer-Encoding: chunked\r\n\r\n" % lengths

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(first + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await writer.drain()

    raw = await serve(handler)
    pool = pool_for(raw)
    bodies = []
    for _ in range(2):
        async with await pool.request("POST", "/", {}, b"x") as response:
            bodies.append(await response.read())
    assert (bodies, raw.connections) == ([b"hello world", b"hello world"], 2)
    await pool.aclose()


@pytest.mark.parametrize(
    ("lengths", "attempts"),
    [
        (b"Content-Length: %(n)d\r\nContent-Length: %(n)d", 1),
        (b"Content-Length: %(n)d, %(n)d", 1),
        (b"Content-Length: %(n)d\r\nContent-Length: %(more)d", 0),
        (b"Content-Length: %(n)d, %(more)d", 0),
    ],
    ids=["same-twice", "same-listed", "differing-twice", "differing-listed"],
)
async def test_a_length_sent_twice_is_one_answer_and_lengths_that_differ_no_answer(
    serve, start_gateway, lengths, attempts
):
    """Through the gateway: one length repeated answers the call at its first attempt
    rather than three refused and billed attempts; lengths that differ are refused as an
    answer other than HTTP/1.1, retried, then UNAVAILABLE."""
    framing = lengths % {b"n": len(_COMPLETION), b"more": len(_COMPLETION) + 1}
    head = b"HTTP/1.1 200 OK\r\n%s\r\n%s\r\n\r\n" % (_JSON_TYPE, framing)
    raw = await serve(replying(head + _COMPLETION, linger_s=0.5))
    gateway = await start_gateway(gateway_config(raw.url))

    if attempts:
        reply = await gateway.stub.Complete(chat(), timeout=10)
        assert (reply.content, reply.metadata.attempts, raw.connections) == ("hi", 1, 1)
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "something other than HTTP/1.1" in caught.value.details()
    assert raw.connections == 3


def _deflated(data: bytes, wbits: int) -> bytes:
    """`data` compressed by zlib with `wbits` (31: gzip, 15: zlib-wrapped, -15: raw)."""
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


def _encoded_answer(coding: bytes, body: bytes, *, status: bytes = b"200 OK") -> bytes:
    """A whole answer with `Content-Encoding: coding` and `body` (compressed already)."""
    return b"HTTP/1.1 %s\r\n%s\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        _JSON_TYPE,
        coding,
        len(body),
        body,
    )


@pytest.mark.parametrize(
    ("coding", "wbits"),
    [(b"gzip", 31), (b"x-gzip", 31), (b"deflate", 15), (b"deflate", -15), (b"GZIP, identity", 31)],
    ids=["gzip", "x-gzip", "deflate-zlib-wrapped", "deflate-raw", "gzip-then-identity"],
)
async def test_a_compressed_answer_is_decoded(serve, start_gateway, coding, wbits):
    """A server that compresses though asked for identity is answered once, decoded: not
    refused as no chat completion."""
    answer = _encoded_answer(coding, _deflated(_COMPLETION, wbits))
    raw = await serve(replying(answer, linger_s=0.5))
    gateway = await start_gateway(gateway_config(raw.url))

    reply = await gateway.stub.Complete(chat(), timeout=10)

    assert (reply.content, reply.metadata.attempts, raw.connections) == ("hi", 1, 1)


def _transfer_coded_answer(transfer: bytes, body: bytes, *, content: bytes = b"") -> bytes:
    """A whole answer with `Transfer-Encoding: transfer` and `body` (coded already but
    for `chunked`, applied here in one chunk when `transfer` ends in it); `content`: a
    `Content-Encoding` line's value, if any."""
    if transfer.rpartition(b",")[2].strip().lower() == b"chunked":
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    coding = b"Content-Encoding: %s\r\n" % content if content else b""
    head = b"HTTP/1.1 200 OK\r\n%s\r\n%sTransfer-Encoding: %s\r\n\r\n" % (
        _JSON_TYPE,
        coding,
        transfer,
    )
    return head + body


@pytest.mark.parametrize(
    ("transfer", "body", "content"),
    [
        (b"gzip, chunked", _deflated(_COMPLETION, 31), b""),
        (b"Deflate , Chunked", _deflated(_COMPLETION, 15), b""),
        (b"x-gzip, identity, chunked", _deflated(_COMPLETION, 31), b""),
        (b"gzip", _deflated(_COMPLETION, 31), b""),
        (b"gzip, chunked", _deflated(_deflated(_COMPLETION, -15), 31), b"deflate"),
    ],
    ids=["gzip-chunked", "deflate-chunked", "x-gzip-identity-chunked", "gzip-to-close", "both"],
)
async def test_a_transfer_coded_answer_is_decoded(serve, start_gateway, transfer, body, content):
    """A coding before `chunked` in `Transfer-Encoding` (RFC 9112 §6.1), or alone on a
    body read until the close, is decoded as a content coding is, and a content coding
    under it after it: answered once, not passed on still coded and refused as malformed."""
    raw = await serve(replying(_transfer_coded_answer(transfer, body, content=content)))
    gateway = await start_gateway(gateway_config(raw.url))

    reply = await gateway.stub.Complete(chat(), timeout=10)

    assert (reply.content, reply.metadata.attempts, raw.connections) == ("hi", 1, 1)


@pytest.mark.parametrize(
    ("transfer", "named"),
    [
        (b"br, chunked", "transfer coding 'br'"),
        (b"xchunked", "transfer coding 'xchunked'"),
        (b"gzip, gzip, chunked", "transfer coding 'gzip, gzip'"),
        (b"chunked, gzip", "Transfer-Encoding 'chunked, gzip' holds chunked other than once"),
        (b"chunked, chunked", "Transfer-Encoding 'chunked, chunked' holds chunked other than"),
    ],
    ids=["br", "not-chunked", "gzip-twice", "chunked-first", "chunked-twice"],
)
async def test_a_transfer_coding_the_gateway_cannot_decode_is_named(
    serve, start_gateway, transfer, named
):
    """A transfer coding other than gzip or deflate, or `chunked` other than once and
    last, fails the attempt as a malformed answer whose message names it: not passed on
    still coded, nor read to the close and reported as a dropped connection."""
    answer = _transfer_coded_answer(transfer, _deflated(_COMPLETION, 31))
    raw = await serve(replying(answer, linger_s=0.5))
    gateway = await start_gateway(gateway_config(raw.url, resilience={"attempts": 1}))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    assert "sent a malformed answer: the answer" in caught.value.details()
    assert named in caught.value.details()


async def test_a_transfer_coded_body_leaves_its_connection_for_the_next(serve):
    """A `gzip, chunked` body read whole ends at its last chunk: its connection carries
    the next request, and the next body, in no coding, is handed over as it came."""
    answers = iter(
        [
            _transfer_coded_answer(b"gzip, chunked", _deflated(b"first", 31)),
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
        ]
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()

    raw = await serve(handler)
    pool = pool_for(raw)
    bodies = []
    for _ in range(2):
        async with await pool.request("POST", "/", {}, b"x") as response:
            bodies.append(await response.read())
    assert (bodies, raw.connections) == ([b"first", b"second"], 1)
    await pool.aclose()


def _sse_event(data: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def test_a_compressed_stream_is_relayed_as_it_arrives(serve, start_gateway):
    """A gzip stream's events are decoded as their bytes come: the first delta reaches
    the caller before the server sends the rest of the compressed body."""
    first_relayed = asyncio.Event()
    compressor = zlib.compressobj(wbits=31)

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def delta(text: str) -> bytes:
        choice = {"index": 0, "delta": {"content": text}}
        event = {"id": "c1", "model": FAKE_MODEL, "choices": [choice]}
        return compressor.compress(_sse_event(event)) + compressor.flush(zlib.Z_SYNC_FLUSH)

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        first = delta("hel")
        for i in range(0, len(first), 5):  # over several reads: a header, then pieces
            writer.write(chunk(first[i : i + 5]))
            await writer.drain()
            await asyncio.sleep(0.01)
        await first_relayed.wait()
        end = {
            "id": "c1",
            "model": FAKE_MODEL,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }
        rest = delta("lo") + compressor.compress(_sse_event(end) + b"data: [DONE]\n\n")
        writer.write(chunk(rest + compressor.flush()) + b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    raw = await serve(dribble)
    gateway = await start_gateway(gateway_config(raw.url))

    texts = []
    async with asyncio.timeout(10):  # not a measure: a delta held back would wait for ever
        async for message in gateway.stub.CompleteStream(chat_stream()):
            if message.HasField("delta"):
                texts.append(message.delta.content)
                first_relayed.set()
            else:
                final = message.final
    assert (texts, final.finish_reason, final.attempts) == (["hel", "lo"], pb.FINISH_REASON_STOP, 1)


def _gzip_bomb(decoded_mib: int) -> bytes:
    """A gzip body of about `decoded_mib` MiB of spaces in about 1/1000 of that: one
    compressed MiB repeated (each flushed whole, so every copy decodes alone); no trailer,
    as nobody should read that far."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    mib = b" " * (1024 * 1024)
    first = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (decoded_mib - 1)


async def test_a_decompression_bomb_is_refused_at_the_answer_limit(serve, start_gateway):
    """A small gzip answer that decodes to a GiB fails at the 16 MiB any answer may take,
    without the gateway holding its decoded bytes: as malformed, as an answer too large
    is, not as a dropped connection and not by running out of memory."""
    raw = await serve(replying(_encoded_answer(b"gzip", _gzip_bomb(1024)), linger_s=1.0))
    gateway = await start_gateway(
        gateway_config(raw.url, resilience={"attempts": 1}),
    )

    tracemalloc.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat(), timeout=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed answer: the answer is larger than 16777216 bytes" in caught.value.details()
    assert peak < 64 * 1024 * 1024  # the limit, its join and a piece: far from the GiB


async def test_a_stream_decoding_to_much_more_lets_other_calls_run(serve, start_gateway):
    """A gzip stream whose small body decodes to 64 MiB of blank lines (no output, no
    event) lets the gateway answer another call while it is decoded: the other call is
    answered before the stream's last delta, not held until the stream's bytes are done."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)

    def event(text: str, **fields: object) -> bytes:
        choice = {"index": 0, "delta": {"content": text}, **fields}
        return _sse_event({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})

    blanks = b"\n" * (1024 * 1024)
    body = b"".join(
        [
            compressor.compress(event("hi")) + compressor.flush(zlib.Z_SYNC_FLUSH),
            *(compressor.compress(blanks) for _ in range(64)),
            compressor.compress(event("end", finish_reason="stop") + b"data: [DONE]\n\n"),
            compressor.flush(),
        ]
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, request = await read_request(reader)
        if b"blank lines" in request:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\n%s\r\nContent-Length: %d\r\n\r\n%s"
                % (_JSON_TYPE, len(_COMPLETION), _COMPLETION)
            )
        await writer.drain()

    raw = await serve(answer)
    config = gateway_config(raw.url)
    # Decoding takes seconds, more on a loaded CI machine: past the tests' usual 10 s
    # upstream timeout there, which would cut the stream, not what this test is about.
    upstream = dataclasses.replace(config.upstreams[0], timeout_s=120.0)
    gateway = await start_gateway(dataclasses.replace(config, upstreams=(upstream,)))

    other: asyncio.Future[pb.CompleteResponse] | None = None
    texts = []
    async for message in gateway.stub.CompleteStream(chat_stream("blank lines"), timeout=120):
        if message.HasField("delta"):
            texts.append(message.delta.content)
            if other is None:  # the stream's first text: its blank lines are next
                other = asyncio.ensure_future(gateway.stub.Complete(chat("other"), timeout=120))
            else:
                answered_first = other.done()
    assert other is not None
    assert (texts, answered_first, (await other).content) == (["hi", "end"], True, "hi")


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"gzip, br"])
async def test_a_coding_the_gateway_cannot_decode_is_named(serve, start_gateway, coding):
    """`br`, `zstd` or any coding but gzip and deflate fails the attempt as a malformed
    answer (sent again, as one is) whose message names the coding: the operator's to mend."""
    raw = await serve(replying(_encoded_answer(coding, b"\x1b\x03\x00garbage"), linger_s=0.5))
    gateway = await start_gateway(gateway_config(raw.url, resilience={"attempts": 1}))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    assert f"sent a malformed answer: the answer came in content coding '{coding.decode()}'" in (
        caught.value.details()
    )


async def test_a_refusal_in_a_coding_the_gateway_cannot_decode_keeps_its_status(
    serve, start_gateway
):
    """A 401 whose body is in `br` is still a rejected key: its status says so."""
    raw = await serve(replying(_encoded_answer(b"br", b"\x1b\x03", status=b"401 Unauthorized")))
    gateway = await start_gateway(gateway_config(raw.url))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)

    assert error_info(caught.value).reason == "UPSTREAM_AUTH"


async def _https_server(tmp_path: Path) -> tuple[asyncio.Server, Path]:
    """An HTTPS echo server with a certificate for 127.0.0.1, and the CA that signed it."""
    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server = await asyncio.start_server(answer_forever, "127.0.0.1", 0, ssl=context)
    return server, pki.ca


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers as an HTTP/2-only server does: a SETTINGS frame, not HTTP/1.1."""
    await read_request(reader)
    writer.write(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")
    await writer.drain()
    await asyncio.sleep(0.5)


@pytest.mark.parametrize(
    ("kind", "event", "cause", "told"),
    [
        (
            "untrusted",
            "upstream.connect_failed",
            "CERTIFICATE_VERIFY_FAILED",
            "refused or could not be reached",
        ),
        ("unresolved", "upstream.connect_failed", "cannot connect: [Errno", "could not be reached"),
        ("not-http", "upstream.exchange_failed", "malformed HTTP response", "other than HTTP/1.1"),
    ],
)
async def test_what_failed_below_http_is_logged_for_the_operator(  # noqa: PLR0917
    serve, start_gateway, tmp_path, caplog, kind, event, cause, told
):
    """A certificate not trusted, a name that does not resolve and an answer that is not
    HTTP/1.1 are logged with their cause (the TLS library's, the resolver's, llhttp's
    words), once for a run of attempts failing alike, not once an attempt; the caller is
    told that the upstream failed, never why below HTTP."""
    if kind == "untrusted":
        server, _ = await _https_server(tmp_path)  # its CA trusted by nobody
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    elif kind == "unresolved":
        url = "http://no-such-host.invalid/v1"  # RFC 6761: never resolves
    else:
        url = (await serve(_not_http)).url
    gateway = await start_gateway(gateway_config(url))

    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        errors = []
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway.stub.Complete(chat(), timeout=10)
            errors.append(caught.value)
    if kind == "untrusted":
        server.close()

    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "UPSTREAM_UNAVAILABLE"
        assert told in error.details()
        assert cause not in error.details()
    assert int(error_info(errors[0]).metadata["attempts"]) > 1
    said = [r for r in caplog.records if r.name.startswith("llm_gateway.upstream")]
    assert [(r.getMessage(), r.upstream) for r in said] == [(event, "up0")]
    assert cause in said[0].cause


async def https_call(tmp_path: Path, trust: pytest.MonkeyPatch | None) -> None:
    """Calls to an HTTPS echo server whose CA `trust` puts in the trust store (or not)."""
    server, ca = await _https_server(tmp_path)
    trusted = trust is not None
    if trust is not None:
        trust.setenv("SSL_CERT_FILE", str(ca))  # the default trust store, as OpenSSL reads it
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(f"https://127.0.0.1:{port}/v1", max_connections=2, connect_timeout_s=5)
    try:
        if not trusted:
            with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.request("POST", "/", {}, b"secret")
            return
        for body in (b"over", b"tls"):
            async with await pool.request("POST", "/", {}, body) as response:
                assert await response.read() == body
        assert pool.open_connections == 1
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()


async def test_https_upstreams_are_verified_against_the_trusted_cas(tmp_path, monkeypatch):
    """TLS with certificate and host checks: trusted, it works and reuses the connection."""
    await https_call(tmp_path, monkeypatch)


async def test_an_https_upstream_with_an_untrusted_certificate_is_refused(tmp_path):
    """A certificate no trusted CA signed fails the connect, nothing is sent."""
    await https_call(tmp_path, None)


async def test_a_fully_qualified_name_with_its_trailing_dot_is_verified_without_it(
    tmp_path, monkeypatch
):
    """`https://localhost.:PORT` (the absolute form Kubernetes users write to skip the
    resolver's search domains) is checked against the certificate's `localhost`: with
    the dot sent as SNI and matched, every call failed "Hostname mismatch"."""
    resolve = socket.getaddrinfo

    def without_search_domains(host: object, *args: object, **kwargs: object) -> object:
        name = host.rstrip(".") if isinstance(host, str) else host  # as DNS reads the dot
        return resolve(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", without_search_domains)
    server, ca = await _https_server(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(f"https://localhost.:{port}/v1", max_connections=2, connect_timeout_s=5)
    try:
        async with await pool.request("POST", "/", {}, b"fqdn") as response:
            assert await response.read() == b"fqdn"
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()


# The suite's other tests run on asyncio's own loop; the gateway runs on uvloop, whose
# transports differ (no happy_eyeballs_delay, its own TLS and flow control): the pool's
# framing, reuse, back-pressure, faults and TLS cases run there too.
ON_UVLOOP = [
    test_sequential_requests_reuse_one_connection,
    test_a_chunked_body_arrives_piece_by_piece_and_whole,
    test_a_body_without_length_ends_when_the_server_closes,
    test_a_body_cut_short_is_an_error_not_a_short_answer,
    test_a_body_without_length_cut_by_a_reset_is_an_error,
    test_garbage_instead_of_http_is_an_error,
    test_a_second_response_after_the_end_does_not_overwrite_the_first,
    test_a_connection_the_server_closed_while_idle_is_not_reused,
    test_idle_connections_past_keepalive_are_closed_without_another_request,
    test_max_connections_queues_requests_beyond_it,
    test_a_large_body_read_late_is_paused_then_delivered_whole,
    test_a_body_in_tiny_chunks_read_late_is_paused_within_its_bound,
    test_a_connection_paused_on_a_whole_unread_body_is_reused_unpaused,
    test_an_informational_response_is_skipped_for_the_real_one,
    test_a_header_that_never_ends_is_refused_not_buffered,
    test_header_names_are_read_alike_and_those_kept_for_reuse_stay_bounded,
    test_interim_answers_that_never_end_are_refused_not_buffered,
    test_a_trailer_that_never_ends_is_refused_not_buffered,
    test_a_body_released_before_its_end_is_reused_once_the_end_arrives,
    test_a_body_whose_end_never_comes_is_closed_after_the_grace,
    test_more_body_after_release_at_end_is_bounded_and_closes,
    test_a_request_cut_once_written_whole_was_sent,
    test_a_request_cut_while_still_being_written_was_not_sent,
    test_the_rest_of_a_request_cut_while_being_written_never_reaches_the_server,
]


@pytest.mark.parametrize("case", ON_UVLOOP, ids=lambda case: case.__name__[5:])
def test_on_uvloop(case: Callable[..., Awaitable[None]]) -> None:
    """The same cases with the loop the gateway serves on."""

    async def run() -> None:
        async with serving() as start:
            await case(start)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_https_on_uvloop(trusted: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS through uvloop's own implementation."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(https_call(tmp_path, monkeypatch if trusted else None))
