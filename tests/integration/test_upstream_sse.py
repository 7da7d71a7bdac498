"""Real providers' SSE quirks, byte for byte from a raw socket upstream, through the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import orjson
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, chat_stream, gateway_config
from tests.integration.test_resilience import error_details
from tests.integration.test_upstream_http import read_request

DETERMINISTIC = pb.GenerationParams(temperature=0.0)


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice], **extra})


USAGE = event(
    {
        "id": "c1",
        "model": FAKE_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
)
DONE = b"data: [DONE]\n\n"


class SSEUpstream:
    """Answers every request on a keep-alive connection with `body`, chunked, in one write."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body)
                )
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


async def relay(
    gateway: Any, request: pb.CompleteStreamRequest
) -> tuple[str, pb.CompleteStreamResponse | None, grpc.aio.AioRpcError | None]:
    """The text a stream relayed, its final message, and its error."""
    items: list[pb.CompleteStreamResponse] = []
    error = None
    try:
        async for item in gateway.stub.CompleteStream(request, timeout=5):
            items.append(item)
    except grpc.aio.AioRpcError as exc:
        error = exc
    text = "".join(i.delta.content for i in items if i.WhichOneof("event") == "delta")
    final = items[-1] if items and items[-1].WhichOneof("event") == "final" else None
    return text, final, error


async def test_a_byte_order_mark_before_the_first_event_loses_no_text(
    start_gateway: Callable[..., Any],
) -> None:
    """A UTF-8 BOM opening the stream is skipped (as the SSE spec says), not the first event."""
    body = b"\xef\xbb\xbf" + chunk("Hel") + chunk("lo", "stop") + USAGE + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert error is None
    assert text == "Hello"
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP


# OpenRouter's mid-stream failure: HTTP 200 long since sent, so the error comes as an event
# with a top-level `error` and the choice finished with "error".
OPENROUTER_ERROR = chunk(
    "", "error", error={"code": 502, "message": "Provider disconnected unexpectedly"}
)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(OPENROUTER_ERROR, id="error-object-and-finish-error"),
        pytest.param(chunk("", "error"), id="finish-error"),
        pytest.param(
            chunk("", "insufficient_system_resource"), id="deepseek-insufficient-resource"
        ),
        pytest.param(chunk("", "abort"), id="vllm-abort"),
    ],
)
async def test_an_upstream_error_after_the_first_token_is_an_interrupted_stream(
    start_gateway: Callable[..., Any], failure: bytes
) -> None:
    """An error reported in a chunk that still has choices fails the stream; it is no stop.

    Taken for a clean finish, the caller would get a cut answer as complete, and the
    cache would store it and replay it to everyone after.
    """
    body = chunk("Hel") + failure + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url, cache={"backend": "memory"}))
        request = chat_stream("hi", params=DETERMINISTIC)
        text, final, error = await relay(gateway, request)
        assert gateway.server.pipeline.cache.stats.stores == 0
    assert text == "Hel"
    assert final is None
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)[1] == "STREAM_INTERRUPTED"


async def test_a_null_error_field_is_no_error(start_gateway: Callable[..., Any]) -> None:
    """`"error": null` beside the usage says there was none: the stream ends cleanly."""
    usage = event(
        {
            "id": "c1",
            "model": FAKE_MODEL,
            "choices": [],
            "error": None,
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    )
    body = chunk("Hel") + chunk("lo", "stop") + usage + DONE
    async with SSEUpstream(body) as url:
        gateway = await start_gateway(gateway_config(url))
        text, final, error = await relay(gateway, chat_stream("hi"))
    assert error is None
    assert text == "Hello"
    assert final is not None
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.final.usage.input_tokens, final.final.usage.output_tokens) == (3, 2)
    assert not final.final.usage.estimated
