"""A finished stream's upstream connection serves the next call, however its end arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, chat_stream, gateway_config
from tests.integration.test_upstream_http import read_request, settled


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


EVENTS = sse(
    {"id": "c1", "model": FAKE_MODEL, "choices": [{"index": 0, "delta": {"content": "hi"}}]},
    {
        "id": "c1",
        "model": FAKE_MODEL,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    },
)


class LateEndUpstream:
    """Streams every event and `[DONE]` in one chunk, and the chunked body's end only when
    told to: as a server that writes its last chunk separately, after the caller is done."""

    def __init__(self) -> None:
        self.connections = 0
        self.send_end = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
                writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n%s\r\n" % (len(EVENTS), EVENTS))
                await writer.drain()
                await self.send_end.wait()
                self.send_end.clear()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_stream_whose_last_chunk_comes_late_leaves_its_connection_reusable(
    start_gateway: Callable[..., Any],
) -> None:
    """Three streams, each answered before the upstream ends its body: one connection."""
    upstream = LateEndUpstream()
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url))
        client = gateway.server.pipeline.pool.clients[0]
        for _ in range(3):
            replies = [r async for r in gateway.stub.CompleteStream(chat_stream("hi"))]
            assert "".join(r.delta.content for r in replies) == "hi"
            assert replies[-1].WhichOneof("event") == "final"
            assert replies[-1].final.finish_reason == pb.FINISH_REASON_STOP
            upstream.send_end.set()  # only now, after the caller has its answer
            await settled(lambda: client.checked_out_connections == 0)
        assert upstream.connections == 1
        assert client.open_connections == 1
