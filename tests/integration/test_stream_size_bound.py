"""A stream's output is bounded as a unary answer is: an upstream that streams on and on
(a model looping with no max_tokens, a proxy's bug) is cut off at the bound, never held
in the gateway's memory to its end.

The bound (`service.upstream.client._MAX_ANSWER_SIZE`, 16 MiB) is made 64 Ki characters
here, so that passing it takes about 70 events of 1,000 characters rather than 17 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.tokens import estimate_output_tokens
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream, gateway_config
from tests.integration.test_resilience import error_details
from tests.integration.test_upstream_http import read_request
from tests.integration.test_upstream_sse import DONE, USAGE, SSEUpstream, chunk, event

BOUND = 64 * 1024
TEXT = "word " * 200  # one event's text: 1,000 characters
# 32 times the bound, then a finish: a gateway without the bound relays all of it,
# cleanly; with it, far more than the bound is still to be written when it closes.
EVENTS = 32 * BOUND // len(TEXT)
# A window the estimate of what was relayed stays within: its tokens are counted, not capped.
MODELS = {
    FAKE_MODEL: {
        "context_window": 1_000_000,
        "input_usd_per_million": 0.27,
        "output_usd_per_million": 1.10,
    }
}
DETERMINISTIC = pb.GenerationParams(temperature=0.0)
_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def small_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway in this process bounds answers at `BOUND`."""
    monkeypatch.setattr("service.upstream.client._MAX_ANSWER_SIZE", BOUND)


class RunawayUpstream:
    """A raw upstream whose first request gets a stream that runs past the bound (its
    first event, then, once `go` is set, `EVENTS` more and a finish); every later one a
    short answer, "fresh". Counts the streams whose connection the gateway closed before
    their end (the server reads its EOF, or a reset, while still writing)."""

    def __init__(self, *, first: bytes | None = None) -> None:
        """`first`: the first stream's whole body, in place of the runaway stream."""
        self.first = first
        self.go = asyncio.Event()
        self.go.set()
        self.requests = 0
        self.closed_early = 0
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # awaited on exit

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        await read_request(reader)
        self.requests += 1
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        if self.requests > 1 or self.first is not None:
            body = chunk("fresh", "stop") + USAGE + DONE
            if self.requests == 1 and self.first is not None:
                body = self.first
            writer.write(head + body)
            await writer.drain()
            writer.close()
            return
        # b"" at the gateway's close, or a reset: either ends the connection from its end.
        closed = asyncio.ensure_future(reader.read())
        is_finished = False
        try:
            writer.write(head + chunk(TEXT))
            await writer.drain()
            await self.go.wait()
            for _ in range(EVENTS):
                if closed.done():
                    break
                writer.write(chunk(TEXT))
                await writer.drain()
                await asyncio.sleep(0)  # the gateway, on this loop, reads as it comes
            else:
                writer.write(chunk(None, "stop") + USAGE + DONE)
                await writer.drain()
                is_finished = True
        except ConnectionError:
            pass
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(1):
                await closed
        if closed.done() and not is_finished:
            self.closed_early += 1
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        async with asyncio.timeout(_TIMEOUT_S):
            await asyncio.gather(*self._handlers)


async def read_stream(
    gateway: RunningGateway, *, content: str = "Say hi"
) -> tuple[str, grpc.aio.AioRpcError | None]:
    """The text a deterministic stream relayed, and the error it ended with."""
    text = ""
    try:
        request = chat_stream(content, params=DETERMINISTIC)
        async for item in gateway.stub.CompleteStream(request, timeout=_TIMEOUT_S):
            text += item.delta.content
    except grpc.aio.AioRpcError as exc:
        return text, exc
    return text, None


def assert_cut_at_the_bound(text: str, error: grpc.aio.AioRpcError | None) -> dict[str, str]:
    """The stream relayed some text within the bound, then ended as one cut after text
    does, saying the bound; its ErrorInfo metadata."""
    assert error is not None, f"a stream of {len(text)} characters ended cleanly"
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert f"longer than {BOUND} characters" in (error.details() or "")
    metadata, reason, _ = error_details(error)
    assert reason == "STREAM_INTERRUPTED"
    assert 0 < len(text) <= BOUND
    assert int(metadata["deltas_sent"]) > 0
    assert metadata["chars_sent"] == str(len(text))
    return metadata


async def recorded(gateway: RunningGateway, *, requests: int) -> pb.UsageRow:
    """The ledger's total once it counts `requests` calls."""
    async with asyncio.timeout(_TIMEOUT_S):
        while (await gateway.stub.GetUsage(pb.GetUsageRequest())).total.requests < requests:
            await asyncio.sleep(0.02)
    return (await gateway.stub.GetUsage(pb.GetUsageRequest())).total


async def test_a_stream_past_the_bound_is_cut_charged_for_its_text_and_never_cached(
    start_gateway: Callable[..., Any],
) -> None:
    """The caller gets the text up to the bound and STREAM_INTERRUPTED naming it; the
    upstream's connection is closed; the ledger records the text relayed; the same
    request then goes to the upstream again."""
    upstream = RunawayUpstream()
    async with upstream as url:
        config = gateway_config(url, models=MODELS, cache={"backend": "memory"})
        gateway = await start_gateway(config)
        text, error = await read_stream(gateway)
        assert_cut_at_the_bound(text, error)
        total = await recorded(gateway, requests=1)
        assert total.usage.estimated
        assert total.usage.output_tokens == estimate_output_tokens(text)
        again, error = await read_stream(gateway)
    assert error is None
    assert again == "fresh"
    assert upstream.requests == 2
    assert upstream.closed_early == 1


async def test_every_caller_of_a_shared_stream_past_the_bound_gets_the_same_end(
    start_gateway: Callable[..., Any],
) -> None:
    """Two callers following one upstream stream both get its text and the same
    STREAM_INTERRUPTED; it is charged once."""
    upstream = RunawayUpstream()
    upstream.go.clear()
    async with upstream as url:
        config = gateway_config(url, models=MODELS, cache={"backend": "memory"})
        gateway = await start_gateway(config)
        reads = [asyncio.ensure_future(read_stream(gateway)) for _ in range(2)]
        async with asyncio.timeout(_TIMEOUT_S):
            while gateway.server.pipeline.cache.following < 2:
                await asyncio.sleep(0.01)
        upstream.go.set()
        (first, first_error), (second, second_error) = await asyncio.gather(*reads)
        assert first == second
        assert assert_cut_at_the_bound(first, first_error) == assert_cut_at_the_bound(
            second, second_error
        )
        total = await recorded(gateway, requests=1)
    assert total.requests == 1
    assert total.usage.output_tokens == estimate_output_tokens(first)
    assert upstream.requests == 1
    assert upstream.closed_early == 1


async def test_a_streamed_unary_answer_past_the_bound_is_a_malformed_answer(
    start_gateway: Callable[..., Any],
) -> None:
    """A unary call sent as a stream (`stream_unary_calls`) is bounded as a unary answer
    is: malformed past it, its connection closed, and retried (here, "fresh")."""
    upstream = RunawayUpstream()
    async with upstream as url:
        config = gateway_config(url, models=MODELS)
        streamed = dataclasses.replace(config.upstreams[0], stream_unary_calls=True)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(streamed,)))
        response = await gateway.stub.Complete(chat(params=DETERMINISTIC), timeout=_TIMEOUT_S)
    assert response.content == "fresh"
    assert response.metadata.attempts == 2
    assert upstream.requests == 2
    assert upstream.closed_early == 1


def tool_call_piece(**piece: str) -> bytes:
    """An event with one piece of the tool call at index 0."""
    function = {key: value for key, value in piece.items() if key != "id"}
    call = {"index": 0, "function": function, **({"id": piece["id"]} if "id" in piece else {})}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})


async def test_a_first_chunk_past_the_bound_is_a_malformed_answer_and_retried(
    start_gateway: Callable[..., Any],
) -> None:
    """Nothing was relayed yet, so it is retried like any malformed answer: here a tool
    call's arguments held until its id and name came (as vmlx sends them), each event
    within the bound and all of them past it, which go out as one chunk."""
    arguments = "a" * (BOUND // 2)
    held = tool_call_piece(arguments=arguments) * 3
    body = held + tool_call_piece(id="call_1", name="f") + chunk(None, "tool_calls") + DONE
    upstream = RunawayUpstream(first=body)
    async with upstream as url:
        gateway = await start_gateway(gateway_config(url, models=MODELS))
        text, error = await read_stream(gateway)
    assert error is None
    assert text == "fresh"
    assert upstream.requests == 2


def nameless_call_piece(index: int, arguments: str) -> bytes:
    """An event with arguments of the tool call at `index`, which has no id nor name yet."""
    call = {"index": index, "function": {"arguments": arguments}}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})


async def test_arguments_held_for_calls_at_many_indexes_are_bounded_all_together(
    start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream holding arguments for calls never named, each at an index of its own
    and each within the bound, is cut off once they pass it all together: a malformed
    answer, not one whose arguments the gateway holds till the caller's deadline (without
    limit, however many calls)."""
    monkeypatch.setattr("service.upstream.openai_json._MAX_HELD_CHARS", BOUND)
    arguments = "a" * (BOUND // 2)
    held = b"".join(nameless_call_piece(index, arguments) for index in range(3))
    never = asyncio.Event()
    upstream = SSEUpstream(held, end_when=never)
    async with upstream as url:
        config = gateway_config(url, models=MODELS, resilience={"attempts": 1})
        gateway = await start_gateway(config)
        text, error = await read_stream(gateway)
        never.set()
    assert text == ""
    assert error is not None
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "arguments ran long before their ids and names" in (error.details() or "")


def named_call_piece(index: int) -> bytes:
    """An event opening the tool call at `index` with an id and a name of 256 characters,
    the most either may have, and no arguments."""
    call = {"index": index, "id": f"{index:0256d}", "function": {"name": "f" * 256}}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return event({"id": "c1", "model": FAKE_MODEL, "choices": [choice]})


async def test_tool_calls_ids_and_names_count_in_the_bound(
    start_gateway: Callable[..., Any],
) -> None:
    """A stream of calls with long ids and names and no arguments, each held to the
    stream's end as text is, is cut at the bound as text is, `chars_sent` counting the ids
    and names relayed. Before, only arguments counted: it was relayed whole."""
    calls = 2 * BOUND // 512  # within the bound on the number of calls (1,024)
    pieces = b"".join(named_call_piece(index) for index in range(calls))
    upstream = RunawayUpstream(first=pieces + chunk(None, "tool_calls") + USAGE + DONE)
    async with upstream as url:
        config = gateway_config(url, models=MODELS, resilience={"attempts": 1})
        gateway = await start_gateway(config)
        relayed: list[pb.ToolCallDelta] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            request = chat_stream(params=DETERMINISTIC)
            async for item in gateway.stub.CompleteStream(request, timeout=_TIMEOUT_S):
                relayed.extend(item.delta.tool_calls)
    error = caught.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert f"longer than {BOUND} characters" in (error.details() or "")
    metadata, reason, _ = error_details(error)
    assert reason == "STREAM_INTERRUPTED"
    sent = sum(len(piece.id) + len(piece.name) for piece in relayed)
    assert 0 < sent <= BOUND
    assert metadata["chars_sent"] == str(sent)
    assert upstream.requests == 1
