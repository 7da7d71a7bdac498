"""`server.max_connection_age_s` reaches gRPC: old connections get GOAWAY, calls go on."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.server import connection_age_options
from tests.conftest import chat, gateway_config
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    stand_in_local_model,
)

pytestmark = pytest.mark.timeout(60)


async def test_a_connection_past_its_age_is_closed_and_the_next_call_reconnects(
    upstream, start_gateway
):
    """After a 0.2 s age the server sends GOAWAY (the channel leaves READY); calls still work."""
    config = gateway_config(
        upstream.base_url,
        server={"max_connection_age_s": 0.2, "max_connection_age_grace_s": 1.0},
    )
    gw = await start_gateway(config)
    async with grpc.aio.insecure_channel(gw.server.address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        assert (await stub.Complete(chat())).content == "Hello from fake"
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        # Polls for the GOAWAY (a bound, not a speed assertion): the channel drops to IDLE.
        async with asyncio.timeout(20):
            while channel.get_state() is grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        assert (await stub.Complete(chat())).content == "Hello from fake"
    assert len(upstream.requests) == 2


async def test_a_client_pinging_every_second_keeps_its_silent_calls(start_gateway):
    """A unary call sends nothing until it ends, nor a health Watch while health holds:
    grpc's own ping limit (one per 5 minutes without data) ended the connection after
    three keepalive pings, the calls with it (UNAVAILABLE "Too many pings"), for any
    client keeping alive more often; on `server.health_listen` too."""
    keepalive = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    # Long enough for five pings: grpc's default ends the connection at the fourth.
    async with FakeUpstream(default=Reply(delay_s=6)) as slow:
        config = gateway_config(slow.base_url, server={"health_listen": "127.0.0.1:0"})
        gw = await start_gateway(config)
        async with (
            grpc.aio.insecure_channel(gw.server.address, options=keepalive) as channel,
            grpc.aio.insecure_channel(gw.server.health_address, options=keepalive) as probe,
        ):
            watch = health_pb2_grpc.HealthStub(probe).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            response = await pb_grpc.CompletionServiceStub(channel).Complete(chat())
            assert not watch.done()
            watch.cancel()
    assert response.content == "Hello from fake"
    assert len(slow.requests) == 1


def test_the_grace_defaults_to_the_longest_call_with_its_retries_or_five_minutes():
    """Default age 300 s; grace: every attempt at the longest upstream timeout, plus the
    longest Retry-After between attempts and the longest slot wait before each (a call
    failing over waits again at the next upstream's limits), at least 300 s."""
    base = gateway_config("http://127.0.0.1:1", resilience={"attempts": 1})
    base = dataclasses.replace(
        base, upstreams=(dataclasses.replace(base.upstreams[0], timeout_s=10.0),)
    )
    assert dict(connection_age_options(base)) == {
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 300_000,
    }
    # The defaults: 3 attempts of 120 s, up to 60 s of Retry-After between them, and up
    # to 5 s waiting for an upstream slot before each.
    retrying = gateway_config(
        "http://127.0.0.1:1",
        resilience={"attempts": 3, "max_retry_after_s": 60.0, "max_limit_wait_s": 5.0},
    )
    slow = dataclasses.replace(
        retrying,
        upstreams=(
            dataclasses.replace(retrying.upstreams[0], timeout_s=120.0),
            dataclasses.replace(retrying.upstreams[0], name="slower", timeout_s=200.0),
        ),
    )
    grace_ms = dict(connection_age_options(slow))["grpc.max_connection_age_grace_ms"]
    assert grace_ms == (3 * (200 + 5) + 2 * 60) * 1000
    configured = gateway_config(
        "http://127.0.0.1:1",
        server={"max_connection_age_s": 60, "max_connection_age_grace_s": 5},
    )
    assert dict(connection_age_options(configured)) == {
        "grpc.max_connection_age_ms": 60_000,
        "grpc.max_connection_age_grace_ms": 5_000,
    }


async def test_an_age_past_what_grpc_can_hold_still_starts(upstream, start_gateway):
    """A month (to all but turn recycling off) is past gRPC's 32-bit milliseconds: not a crash."""
    month_s = 30 * 86400
    config = gateway_config(
        upstream.base_url,
        server={"max_connection_age_s": month_s, "max_connection_age_grace_s": month_s},
    )
    gw = await start_gateway(config)
    async with grpc.aio.insecure_channel(gw.server.address) as channel:
        assert (await pb_grpc.CompletionServiceStub(channel).Complete(chat())).content


async def test_the_grace_counts_the_local_models_timeout_as_workers_do(
    tmp_path, monkeypatch, start_gateway
):
    """In one process the local model is no upstream of the config: its 300 s timeout must
    still bound the grace, as it does with --workers (whose config lists it)."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    options: list[tuple[str, int]] = []
    make_server = grpc.aio.server

    def recording_server(**kwargs):
        options.extend(kwargs["options"])
        return make_server(**kwargs)

    monkeypatch.setattr(grpc.aio, "server", recording_server)
    config = gateway_config(
        resilience={"attempts": 3, "max_retry_after_s": 60.0, "max_limit_wait_s": 5.0},
        local_model={"enabled": "always", "model": MODEL, "model_path": str(model)},
    )
    gw = await start_gateway(config)
    assert gw.server.local_model is not None
    local = gw.server.local_model.upstream_config()
    # Its own limit wait (as long as its timeout: it takes one call at a time), not the 5 s.
    assert local.max_limit_wait_s == local.timeout_s
    assert dict(options)["grpc.max_connection_age_grace_ms"] == round(
        (3 * (local.timeout_s + local.max_limit_wait_s) + 2 * 60) * 1000
    )
