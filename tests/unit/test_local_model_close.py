"""Closing the local model's supervisor (service.local_model), without starting llama.cpp."""

from __future__ import annotations

import asyncio

import pytest

from service.config import LocalModelConfig
from service.local_model import LocalModelServer


async def test_cancelling_aclose_while_the_supervisor_winds_down_cancels_aclose() -> None:
    """aclose() cancelled while it waits for its supervisor task ends cancelled, not normally."""
    server = LocalModelServer(LocalModelConfig())
    winding_down = asyncio.Event()

    async def supervisor() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.Event().wait()  # slow to wind down, until cancelled again
            raise

    server._watchdog = asyncio.create_task(supervisor())
    await asyncio.sleep(0)
    closing = asyncio.create_task(server.aclose())
    await asyncio.wait_for(winding_down.wait(), timeout=10)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, timeout=10)
