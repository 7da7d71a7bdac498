"""What a proxy in front of the replicas sees of a refusal, spoken to over raw HTTP/2.

Envoy (deploy/envoy) retries a call on another replica only when the answer's headers
carry `llm-gateway-retry-elsewhere`: it can read a gRPC status only from a trailers-only
answer (one HEADERS frame that ends the stream), never from trailers after a response.
"""

from __future__ import annotations

import asyncio
import socket

import h2.config
import h2.connection
import h2.events
import pytest

from service.errors import RETRY_ELSEWHERE_TRAILER
from tests.conftest import chat, gateway_config
from tests.fake_upstream import FakeUpstream, Hang, Status
from tests.integration.test_resilience import settle

COMPLETE = "/llmgateway.v1.CompletionService/Complete"


def _answer_frames(port: int, body: bytes) -> list[h2.events.Event]:
    """POST one gRPC message to `Complete` as a proxy would; the stream's events."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", COMPLETE),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    connection.send_headers(1, headers)
    connection.send_data(1, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    events: list[h2.events.Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connection.data_to_send())
        while not any(isinstance(e, h2.events.StreamEnded) for e in events):
            data = sock.recv(65536)
            if not data:
                break
            events += [e for e in connection.receive_data(data) if getattr(e, "stream_id", 1) == 1]
            sock.sendall(connection.data_to_send())
    return events


def _headers(event: h2.events.ResponseReceived) -> dict[str, str]:
    return {bytes(k).decode(): bytes(v).decode() for k, v in event.headers}


async def test_a_shed_call_tells_a_proxy_to_retry_elsewhere_in_a_trailers_only_answer(
    start_gateway,
):
    """The replica is full: the refusal is one HEADERS frame ending the stream, with the
    gRPC status and the retry-elsewhere mark among its headers."""
    async with FakeUpstream(default=Hang()) as fake:
        config = gateway_config(
            fake.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 0}
        )
        gateway = await start_gateway(config)
        held = asyncio.ensure_future(gateway.stub.Complete(chat()))
        assert await settle(lambda: len(fake.requests) == 1)
        body = chat().SerializeToString()
        events = await asyncio.to_thread(_answer_frames, gateway.server.port, body)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert response.stream_ended is not None  # trailers-only: no DATA, no later trailers
    later = (h2.events.DataReceived, h2.events.TrailersReceived)
    assert not [e for e in events if isinstance(e, later)]
    headers = _headers(response)
    assert headers["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
    assert headers[RETRY_ELSEWHERE_TRAILER] == "true"


async def test_an_upstream_failure_is_not_marked_for_a_proxy_to_retry(start_gateway):
    """After the gateway's own retries and failover, a proxy's retry would only multiply
    the upstream's calls: the refusal reaches it unmarked."""
    async with FakeUpstream(default=Status(503)) as fake:
        config = gateway_config(fake.base_url, resilience={"attempts": 1})
        gateway = await start_gateway(config)
        body = chat().SerializeToString()
        events = await asyncio.to_thread(_answer_frames, gateway.server.port, body)
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert response.stream_ended is not None
    headers = _headers(response)
    assert headers["grpc-status"] == "14"  # UNAVAILABLE
    assert RETRY_ELSEWHERE_TRAILER not in headers
    assert len(fake.requests) == 1
