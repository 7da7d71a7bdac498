"""The benchmarks' lean upstream speaks enough of the protocol for the gateway to relay it.

`make bench` measures the gateway in front of `bench/lean_upstream.py`; if it stopped
answering correctly the benchmark would time errors instead of calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bench.lean_upstream import Answers, serve
from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config

CONTENT = " ".join(f"w{i}" for i in range(40))


@pytest.fixture(
    params=[{}, {"event_gap_s": 0.002}, {"first_event_gap_s": 0.005}],
    ids=["burst", "paced", "first-event-alone"],
)
async def lean_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    server = await serve(Answers(FAKE_MODEL, CONTENT, chunks=20, **request.param))
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.close()
    await server.wait_closed()


async def test_unary_calls_through_the_gateway_get_the_canned_answer(lean_url, start_gateway):
    """Several unary calls on the kept-alive connection each get the whole answer."""
    gateway = await start_gateway(gateway_config(lean_url))
    for _ in range(3):
        response = await gateway.stub.Complete(chat("hi"))
        assert response.content == CONTENT
        assert (response.metadata.usage.input_tokens, response.metadata.usage.output_tokens) == (
            7,
            3,
        )
        assert response.metadata.finish_reason == pb.FINISH_REASON_STOP


async def test_streams_through_the_gateway_relay_every_word(lean_url, start_gateway):
    """A stream carries the whole text, then usage, and the connection serves the next."""
    gateway = await start_gateway(gateway_config(lean_url))
    for _ in range(2):
        events = [e async for e in gateway.stub.CompleteStream(chat_stream("hi"))]
        deltas = [e.delta.content for e in events if e.HasField("delta")]
        assert "".join(deltas) == CONTENT
        final = events[-1].final
        assert final.finish_reason == pb.FINISH_REASON_STOP
        assert final.usage.output_tokens == 3


async def relayed_deltas(start_gateway: Any, answers: Answers) -> list[str]:
    """The deltas of one stream relayed by a gateway in front of a lean upstream."""
    server = await serve(answers)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(gateway_config(url))
        events = [e async for e in gateway.stub.CompleteStream(chat_stream("hi"))]
        return [e.delta.content for e in events if e.HasField("delta")]
    finally:
        server.close()
        await server.wait_closed()


async def test_paced_events_reach_the_caller_one_message_each(start_gateway):
    """With a gap between events each arrives alone, so each is its own delta."""
    answers = Answers(FAKE_MODEL, CONTENT, chunks=20, event_gap_s=0.005)
    deltas = await relayed_deltas(start_gateway, answers)
    assert len(deltas) == 20
    assert "".join(deltas) == CONTENT


async def test_a_first_event_sent_alone_is_relayed_alone(start_gateway):
    """With the rest held back, the first word reaches the caller as a delta of its own."""
    answers = Answers(FAKE_MODEL, CONTENT, chunks=20, first_event_gap_s=0.05)
    deltas = await relayed_deltas(start_gateway, answers)
    assert deltas[0] == "w0 w1"
    assert "".join(deltas) == CONTENT
