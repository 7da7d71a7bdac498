"""The local model's server is supervised: restarted when it dies, stopped on shutdown."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.server import GatewayServer
from tests.e2e.conftest import LOCAL_MODEL
from tests.integration.gateway_process import is_running

pytestmark = pytest.mark.local_model


async def test_killed_local_server_is_restarted_and_stopped_on_shutdown(start_gateway):
    """Killing llama.cpp's server brings a new one up on the same port; stop() ends it."""
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": {"enabled": "always"}},
        environ={},
    )
    gateway = await start_gateway(config)
    server: GatewayServer = gateway.server
    assert server.local_model is not None
    first_pid = server.local_model.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    for _ in range(600):
        if server.local_model.restarts == 1 and server.local_model.pid not in (None, first_pid):
            break
        await asyncio.sleep(0.1)
    assert server.local_model.restarts == 1
    request = pb.CompleteRequest(
        model=LOCAL_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="Hello")],
        params=pb.GenerationParams(max_tokens=4),
    )
    for _ in range(100):  # the new process may still be loading the model
        try:
            response = await gateway.stub.Complete(request, timeout=60)
            break
        except Exception:
            await asyncio.sleep(0.2)
    assert response.metadata.upstream == "local"
    second_pid = server.local_model.pid
    assert second_pid is not None
    await server.stop(grace_s=0)
    for _ in range(100):
        if not is_running(second_pid):
            break
        await asyncio.sleep(0.05)
    assert not is_running(second_pid)
