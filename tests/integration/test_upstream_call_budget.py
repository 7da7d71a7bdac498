"""The Python calls one unary upstream exchange makes: the deterministic proxy of its CPU.

A cache miss's wall-clock figures in `make bench` swing more between runs on a shared
machine than a few µs more a call; the number of Python calls (functions and builtins)
`UpstreamClient.complete` makes for one answer is exact. It is counted here as the gateway
serves (uvloop, the client warm, its connection kept alive), against the benchmarks'
lean upstream in a thread of its own, so that only the gateway's side of the exchange is
counted: building the request's head, the pool's slot and connection, the deadline's
timer, the answer parsed by llhttp, read and released, and the completion parsed. A
change that needs more says so in bench/README.md ("What each optimisation bought") and
raises the budget with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import orjson
import pytest
import uvloop

from bench.lean_upstream import Answers, serve
from service.upstream.client import UpstreamClient
from service.upstream.types import UpstreamCall
from tests.call_counting import start_counting_calls
from tests.conftest import FAKE_MODEL, gateway_config

# Measured with CPython 3.11 and uvloop 0.21: 83 while an `asyncio.timeout` bounded the
# exchange, 73 with the pool's one deadline timer, 71 without `_post`'s frame (bench/README.md).
EXCHANGE_BUDGET = 71

CALL = UpstreamCall(
    upstream_model=FAKE_MODEL,
    body=orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
)


@pytest.fixture
def lean_upstream() -> Iterator[str]:
    """The lean upstream's base URL, served by its own loop in its own thread."""
    loop = asyncio.new_event_loop()
    listening = threading.Event()
    servers: list[asyncio.Server] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        servers.append(loop.run_until_complete(serve(Answers(FAKE_MODEL, "hello", chunks=1))))
        listening.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="lean-upstream", daemon=True)
    thread.start()
    listening.wait()
    port = servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        servers[0].close()
        loop.run_until_complete(servers[0].wait_closed())
        loop.close()


async def exchange_calls(client: UpstreamClient) -> int:
    """The calls in this thread of one `complete`, once warm (its connection open and kept
    alive, its caches filled)."""
    for _ in range(3):
        await client.complete(CALL, timeout_s=10)
    stop_counting = start_counting_calls()
    try:
        reply = await client.complete(CALL, timeout_s=10)
    finally:
        calls = stop_counting()
    assert reply.content == "hello"
    return calls


def test_one_unary_exchange_stays_within_its_python_call_budget(lean_upstream: str) -> None:
    """A warm unary exchange, request to parsed answer, makes at most `EXCHANGE_BUDGET`
    Python calls."""

    async def counted() -> int:
        async with UpstreamClient(gateway_config(lean_upstream).upstreams[0]) as client:
            return await exchange_calls(client)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(counted()) <= EXCHANGE_BUDGET
