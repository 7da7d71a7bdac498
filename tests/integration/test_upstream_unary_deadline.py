"""A unary exchange's deadline (`UpstreamClient.complete`'s `timeout_s`) against raw socket
servers, on both event loops: what ends the exchange, what the caller is told, and that
nothing of it is left behind.

The deadline wins whatever else its loop turn brought: an answer, or its connection's
failure, read in the same turn as the deadline passed is a timeout, as it was when an
`asyncio.timeout` cancelled the exchange (a cancel overrides the wake-up it lands on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
import uvloop

from service.errors import UpstreamTimeout, UpstreamUnavailable
from service.upstream import http
from service.upstream.client import UpstreamClient
from service.upstream.types import UpstreamCall
from tests.conftest import FAKE_MODEL, gateway_config
from tests.integration.test_cache import eventually
from tests.integration.test_upstream_http import Handler, RawServer, read_request, serving

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
# Real time is unavoidable for a deadline; the waits are ratios of this unit.
UNIT_S = 0.2
CALL = UpstreamCall(
    upstream_model=FAKE_MODEL,
    body=orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
)
ANSWER_BODY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "model": FAKE_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(ANSWER_BODY),
    ANSWER_BODY,
)

Case = Callable[[Callable[[Handler], Awaitable[RawServer]]], Awaitable[None]]


def run_on(loop: str, case: Case) -> None:
    """Run `case` with a factory of raw servers on `loop`."""

    async def run() -> None:
        async with serving() as start:
            await case(start)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(run())


def client_for(raw: RawServer, *, timeout_s: float = 10.0) -> UpstreamClient:
    """A client of `raw` as the gateway's upstream `up0`, with `timeout_s`."""
    upstream = gateway_config(raw.url).upstreams[0]
    return UpstreamClient(dataclasses.replace(upstream, timeout_s=timeout_s))


async def hang_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes
) -> None:
    """Read one request, write `reply`, then wait until the client goes away."""
    await read_request(reader)
    writer.write(reply)
    await reader.read()  # the client's close


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "reply",
    [b"", b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"id":'],
    ids=["no-head", "body-stalls"],
)
def test_an_answer_not_in_by_the_deadline_is_a_timeout_and_its_connection_goes(
    loop: str, reply: bytes
) -> None:
    """A head that never comes, or a body that stalls: `UpstreamTimeout` ("timed out", the
    message a caller sees), the request counted as sent, and the connection closed."""

    async def case(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
        raw = await serve(lambda reader, writer: hang_after(reader, writer, reply))
        sent: list[bool] = []
        async with client_for(raw, timeout_s=UNIT_S) as client:
            with pytest.raises(UpstreamTimeout) as caught:
                await client.complete(CALL, timeout_s=10, on_sent=lambda: sent.append(True))
            assert str(caught.value) == "upstream 'up0' timed out"
            assert isinstance(caught.value.__cause__, TimeoutError)
            assert sent == [True]
            assert client.open_connections == 0

    run_on(loop, case)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_callers_shorter_timeout_bounds_the_exchange(loop: str) -> None:
    """`timeout_s` shorter than the upstream's own ends the exchange at the caller's."""

    async def case(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
        raw = await serve(lambda reader, writer: hang_after(reader, writer, b""))
        async with client_for(raw, timeout_s=60) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await client.complete(CALL, timeout_s=UNIT_S)
            assert time.monotonic() - started >= UNIT_S * 0.9  # at its deadline, not before

    run_on(loop, case)


def write_then_hold_the_loop(reply: bytes, *, past: Callable[[], float], reset: bool) -> Handler:
    """A handler that reads one request, writes `reply` (then resets the connection, with
    `reset`), and holds its loop until the deadline `past()` returns has passed, so that
    the client reads what came in the same loop turn as its deadline passes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        if reset:
            writer.transport.abort()
        hold_the_loop_until(past())
        await reader.read()

    return handler


def hold_the_loop_until(moment: float) -> None:
    """Block the running loop, on purpose, until `time.monotonic()` passes `moment`: the
    loop's next turn then finds both the reply and the deadline's timer due."""
    while time.monotonic() <= moment:
        time.sleep(0.001)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("reply", "reset"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Le", True),
        (ANSWER, False),
    ],
    ids=["not-http", "reset-mid-head", "whole-answer"],
)
def test_what_arrives_in_the_deadlines_loop_turn_is_a_timeout(
    loop: str, reply: bytes, reset: bool
) -> None:
    """A connection failing (an answer that is not HTTP, a reset) or a whole answer read in
    the loop turn in which the deadline passes: `UpstreamTimeout` on either loop, never
    the failure's `UpstreamUnavailable` on one loop and a timeout on the other."""
    deadline: list[float] = []

    async def case(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
        handler = write_then_hold_the_loop(reply, past=lambda: deadline[0] + 0.005, reset=reset)
        raw = await serve(handler)
        async with client_for(raw, timeout_s=UNIT_S) as client:
            deadline.append(time.monotonic() + UNIT_S)
            with pytest.raises(UpstreamTimeout):
                await client.complete(CALL, timeout_s=10)
            # A whole answer leaves its connection reusable, as before; a failed one not.
            assert client.open_connections == (1 if reply == ANSWER else 0)

    run_on(loop, case)


async def responses_alive() -> int:
    """The pool's responses still held by anything, after a loop turn (the task's step
    holds what its last await raised until the next) and a collection."""
    await asyncio.sleep(0)
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is http.Response)


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_of_an_exchange_outlives_it(loop: str) -> None:
    """After answers, a refusal, an answer that is not HTTP, a stall cut by its deadline
    and a cancelled call, with a deadline far off for all but the stall, no response is
    left held (by a timer of its deadline, say), and the answered connection is idle."""

    async def answer_then_fail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (ANSWER, ANSWER, b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}"):
            await read_request(reader)
            writer.write(reply)
        await read_request(reader)
        writer.write(b"NOT HTTP\r\n\r\n")
        await reader.read()

    async def case(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
        raw = await serve(answer_then_fail)
        hung = await serve(lambda reader, writer: hang_after(reader, writer, b""))
        async with client_for(raw, timeout_s=600) as client, client_for(hung) as stalled:
            for _ in range(2):
                assert (await client.complete(CALL, timeout_s=600)).content == "hello"
            assert client.open_connections == 1
            assert await responses_alive() == 0
            with pytest.raises(UpstreamUnavailable):
                await client.complete(CALL, timeout_s=600)  # the 500
            with pytest.raises(UpstreamUnavailable):
                await client.complete(CALL, timeout_s=600)  # not HTTP
            with pytest.raises(UpstreamTimeout):
                await stalled.complete(CALL, timeout_s=UNIT_S)
            cancelled = asyncio.ensure_future(stalled.complete(CALL, timeout_s=600))
            await eventually(lambda: stalled.checked_out_connections > 0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            del cancelled  # its exception's frames hold what they held
            assert await responses_alive() == 0

    run_on(loop, case)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_call_waiting_for_a_connection_past_its_deadline_times_out_and_leaves_its_place(
    loop: str,
) -> None:
    """With the one connection busy, a call that waits for it past its deadline:
    `UpstreamTimeout`, nothing sent; the connection, once free, serves the next call."""

    async def case(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
        answer = asyncio.Event()

        async def answer_when_told(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await read_request(reader)
            await answer.wait()
            writer.write(ANSWER)
            while True:
                await read_request(reader)
                writer.write(ANSWER)

        raw = await serve(answer_when_told)
        upstream = gateway_config(raw.url).upstreams[0]
        one = dataclasses.replace(upstream, max_connections=1, max_concurrency=1)
        async with UpstreamClient(one) as client:
            first = asyncio.ensure_future(client.complete(CALL, timeout_s=600))
            await eventually(lambda: client.checked_out_connections > 0)
            sent: list[bool] = []
            with pytest.raises(UpstreamTimeout) as caught:
                await client.complete(CALL, timeout_s=UNIT_S, on_sent=lambda: sent.append(True))
            assert str(caught.value) == "upstream 'up0' timed out"
            assert sent == []
            answer.set()
            assert (await first).content == "hello"
            assert (await client.complete(CALL, timeout_s=600)).content == "hello"
            assert raw.connections == 1

    run_on(loop, case)
