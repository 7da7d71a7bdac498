"""What the gateway holds of a stream is about the size of its text, however many pieces
it came in: an upstream streaming one character an event, each in its own read, would
otherwise have it hold an object of about 100 bytes for each (up to the 16 MiB bound on
a stream's characters, some 1.6 GB), in every place a stream is held whole till its end
(the pipeline's relayed output, a unary call read as a stream, a shared call's deltas,
the cache's copy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

from llmgateway.v1 import gateway_pb2 as pb
from service.domain import Delta
from service.upstream.types import TextChunk
from tests.conftest import chat, chat_stream, gateway_config
from tests.integration.test_upstream_http import read_request
from tests.integration.test_upstream_sse import DONE, USAGE, chunk

PIECES = 1024  # four times `service.domain.FOLDED_EVERY`
# Pieces held as they came, at most: those since the last fold, in each place that holds
# them, far fewer than the pieces (each place held all of them, 2 or 3 times `PIECES`).
HELD_AT_MOST = PIECES // 2
DETERMINISTIC = pb.GenerationParams(temperature=0.0)
_TIMEOUT_S = 10.0


class OneCharacterUpstream:
    """A raw upstream that streams `PIECES` events of one character each, one a read
    (the gateway, on this loop, reads each before the next is written), then holds its
    finish until `finish` is set."""

    def __init__(self) -> None:
        self.sent_all = asyncio.Event()
        self.finish = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Connection: close\r\n\r\n")
        for _ in range(PIECES):
            writer.write(chunk("a"))
            await writer.drain()
            await asyncio.sleep(0.001)  # a read each: pieces, not a burst joined as one
        self.sent_all.set()
        await self.finish.wait()
        writer.write(chunk(None, "stop") + USAGE + DONE)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()


def held_pieces() -> int:
    """The stream pieces alive in this process (the gateway's, as it runs here)."""
    return sum(type(thing) in (TextChunk, Delta) for thing in gc.get_objects())


async def held_once_sent(upstream: OneCharacterUpstream) -> int:
    """`held_pieces` once the upstream has sent every piece (its finish held back), then
    the finish let go."""
    async with asyncio.timeout(_TIMEOUT_S):
        await upstream.sent_all.wait()
    await asyncio.sleep(0.05)  # the last pieces read
    held = held_pieces()
    upstream.finish.set()
    return held


async def test_a_cached_stream_of_one_character_pieces_holds_its_text_not_its_pieces(
    start_gateway: Callable[..., Any],
) -> None:
    """A stream of one-character pieces, shared and cached, holds about its text while it
    streams; the caller gets every character, and a cache hit replays the same text."""
    upstream = OneCharacterUpstream()
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url, cache={"backend": "memory"}))
        request = chat_stream(params=DETERMINISTIC)

        async def read() -> tuple[str, int]:
            stream = gateway.stub.CompleteStream(request, timeout=_TIMEOUT_S)
            items = [item async for item in stream]
            return "".join(item.delta.content for item in items), len(items)

        reading = asyncio.ensure_future(read())
        held = await held_once_sent(upstream)
        text, _ = await reading
        replayed, _ = await read()
    assert held <= HELD_AT_MOST
    assert text == replayed == "a" * PIECES


async def test_a_unary_call_read_as_a_stream_of_one_character_pieces_holds_its_text(
    start_gateway: Callable[..., Any],
) -> None:
    """A unary call sent as a stream (`stream_unary_calls`) holds about its text while it
    streams, and answers every character."""
    upstream = OneCharacterUpstream()
    async with upstream as url:
        config = gateway_config(url)
        streamed = dataclasses.replace(config.upstreams[0], stream_unary_calls=True)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(streamed,)))
        answering = asyncio.ensure_future(gateway.stub.Complete(chat(), timeout=_TIMEOUT_S))
        held = await held_once_sent(upstream)
        response = await answering
    assert held <= HELD_AT_MOST
    assert response.content == "a" * PIECES
