"""The caller's deadline bounds the upstream call, and cancelling closes it at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import chat, chat_stream
from tests.fake_upstream import Hang, Reply

# Real time is unavoidable here; the waits are ratios of this unit.
UNIT_S = 0.5
# How long an upstream request may stay open after its call ended: a gateway that left it
# open would hold it to the upstream's timeout_s (10 s), or a stream to its end.
HUNG_UP_WITHIN_S = 6.0


async def test_deadline_ends_unary_call_and_closes_upstream_request(stub, upstream):
    """A hanging upstream gives DEADLINE_EXCEEDED at the caller's deadline, and is hung up on."""
    upstream.script(Hang())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=UNIT_S)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await upstream.wait_for_disconnect(timeout_s=HUNG_UP_WITHIN_S)
    assert upstream.disconnects == 1


async def test_deadline_ends_stream_mid_way_and_closes_upstream(stub, upstream):
    """A slow stream past the caller's deadline ends DEADLINE_EXCEEDED and is hung up on."""
    upstream.script(Reply(content="a b c d e f g h", chunks=8, chunk_delay_s=UNIT_S))
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.CompleteStream(chat_stream(), timeout=2.5 * UNIT_S):
            received += 1
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= received < 8
    await upstream.wait_for_disconnect(timeout_s=HUNG_UP_WITHIN_S)


async def test_cancelled_unary_call_closes_upstream_request(stub, upstream):
    """Cancelling a unary call drops the upstream request at once."""
    upstream.script(Hang())
    call = stub.Complete(chat())
    while not upstream.requests:
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await upstream.wait_for_disconnect(timeout_s=HUNG_UP_WITHIN_S)
    assert upstream.disconnects == 1


async def test_cancelled_stream_closes_upstream_request(stub, upstream):
    """Leaving a stream after the first delta drops the upstream connection at once."""
    upstream.script(Reply(content="a b c d e f g h", chunks=8, chunk_delay_s=UNIT_S / 4))
    call = stub.CompleteStream(chat_stream())
    first = await call.read()
    assert first.delta.content
    call.cancel()
    await upstream.wait_for_disconnect(timeout_s=HUNG_UP_WITHIN_S)
    assert upstream.disconnects == 1


async def test_gateway_keeps_serving_after_cancellations(stub, upstream, gateway):
    """After cancelled and timed-out calls the gateway still answers and holds no stale slot."""
    upstream.script(Hang(), Hang())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Complete(chat(), timeout=UNIT_S / 2)
    call = stub.Complete(chat())
    while len(upstream.requests) < 2:
        await asyncio.sleep(0.01)
    call.cancel()
    response = await stub.Complete(chat())
    assert response.content == "Hello from fake"
    for _ in range(100):
        if gateway.server.admission.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert gateway.server.admission.in_flight == 0
