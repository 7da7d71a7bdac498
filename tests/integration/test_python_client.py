"""The Python client library (clients/python/gateway_client) against the real gateway."""

from __future__ import annotations

import asyncio
import time

from gateway_client import GatewayClient
from tests.conftest import FAKE_MODEL, RunningGateway
from tests.fake_upstream import FakeUpstream, Reply


async def test_leaving_a_stream_early_closes_the_upstream_request(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Breaking out of a stream cancels the call, so the provider stops generating at once.

    The stream object stays referenced (as when a caller means to read `.final`) and the
    client stays open: nothing but the client itself can end the call.
    """
    upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=0.25))
    async with GatewayClient(gateway.server.address) as client:
        started = time.monotonic()
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        async for text in stream:
            assert text
            break
        await upstream.wait_for_disconnect(timeout_s=2.0)
        # The upstream would have streamed for about 5 s; it saw the close long before.
        assert time.monotonic() - started < 20 * 0.25
        assert stream.final is None
        async with asyncio.timeout(5):
            while gateway.server.admission.in_flight:
                await asyncio.sleep(0.01)
