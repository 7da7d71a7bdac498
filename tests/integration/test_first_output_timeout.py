"""`upstreams[].first_output_timeout_s`: an upstream that takes a streamed request and
never answers fails over before the caller's deadline, through the real server and
fault-injecting upstreams on loopback.

Each call's deadline is far past what its attempts need: a hung attempt ends first only
when the bound ends it (without the bound every such call ends DEADLINE_EXCEEDED).
Outcomes are asserted, never times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, Literal

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import GatewayConfig
from tests.conftest import RunningGateway, chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream, Hang, Reply
from tests.integration.test_resilience import (
    FAST_RESILIENCE,
    checked_out_connections,
    error_details,
    settle,
)
from tests.integration.test_upstream_http import read_request
from tests.integration.test_upstream_sse import _HEAD, DONE, USAGE, chunk

FIRST_OUTPUT_S = 0.5
# Far past the attempts of any call here: only the bound can end a hung attempt first.
DEADLINE_S = 10.0
# The upstreams' own `timeout_s`, as long as a long answer needs (the default): past the
# deadline, so that it ends no hung attempt either.
LONG_TIMEOUT_S = 120.0

HangAfter = Literal["request", "headers", "role_chunk"]


def bounded(
    config: GatewayConfig, first_output_s: float = FIRST_OUTPUT_S, **fields: Any
) -> GatewayConfig:
    """`config` with every upstream's `first_output_timeout_s` set, its `timeout_s` long
    (`LONG_TIMEOUT_S`), and `fields`."""
    upstreams = tuple(
        dataclasses.replace(
            u, first_output_timeout_s=first_output_s, **{"timeout_s": LONG_TIMEOUT_S, **fields}
        )
        for u in config.upstreams
    )
    return dataclasses.replace(config, upstreams=upstreams)


async def streamed(gateway: RunningGateway) -> tuple[str, pb.CompletionMetadata]:
    """One CompleteStream call's text and final metadata."""
    text = ""
    async for message in gateway.stub.CompleteStream(chat_stream(), timeout=DEADLINE_S):
        if message.HasField("final"):
            return text, message.final
        text += message.delta.content
    raise AssertionError("stream ended without a final message")


@pytest.mark.parametrize("after", ["request", "headers", "role_chunk"])
async def test_a_stream_to_a_hung_upstream_fails_over_to_the_next(after: HangAfter, start_gateway):
    """An upstream that sends nothing, only its headers, or a role-only chunk and a
    keep-alive comment, then hangs, is given up at its first-output bound: the stream is
    answered by the next upstream, the hung connection is closed, and the timeout counts
    against the hung upstream's breaker."""
    async with FakeUpstream(default=Hang(after=after)) as hung, FakeUpstream() as healthy:
        resilience = {**FAST_RESILIENCE, "breaker_consecutive_failures": 1}
        config = gateway_config(hung.base_url, healthy.base_url, resilience=resilience)
        gateway = await start_gateway(bounded(config))
        text, final = await streamed(gateway)
        assert (text, final.upstream, final.attempts) == ("Hello from fake", "up1", 2)
        await hung.wait_for_disconnect()  # closed, not kept for another call
        counters = gateway.server.pipeline.pool.counters
        assert (counters.failovers, dict(counters.upstream_errors)) == (
            1,
            {"UPSTREAM_TIMEOUT": 1},
        )
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        health = {u.name: u.health for u in models.models[0].upstreams}
        assert health == {"up0": pb.UPSTREAM_HEALTH_UNHEALTHY, "up1": pb.UPSTREAM_HEALTH_HEALTHY}
        assert await settle(lambda: checked_out_connections(gateway) == 0)
        assert (len(hung.requests), len(healthy.requests)) == (1, 1)


async def test_a_unary_call_sent_as_a_stream_fails_over_from_a_hung_upstream(start_gateway):
    """A unary call to an upstream that takes its calls as streams (`stream_unary_calls`,
    as the local model does) is bounded alike: the next upstream answers it."""
    async with FakeUpstream(default=Hang(after="role_chunk")) as hung, FakeUpstream() as healthy:
        config = gateway_config(hung.base_url, healthy.base_url, resilience=FAST_RESILIENCE)
        gateway = await start_gateway(bounded(config, stream_unary_calls=True))
        response = await gateway.stub.Complete(chat(), timeout=DEADLINE_S)
        assert (response.content, response.metadata.upstream) == ("Hello from fake", "up1")
        assert response.metadata.attempts == 2
        await hung.wait_for_disconnect()


async def test_a_lone_hung_upstream_ends_unavailable_upstream_timeout(start_gateway):
    """With no other upstream, every attempt times out at the bound, each retried after
    its backoff, and the call ends as a timeout does: UNAVAILABLE, UPSTREAM_TIMEOUT, the
    upstream and attempts named, and the message saying which bound it was."""
    async with FakeUpstream(default=Hang(after="headers")) as hung:
        gateway = await start_gateway(
            bounded(gateway_config(hung.base_url, resilience=FAST_RESILIENCE))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gateway.stub.CompleteStream(chat_stream(), timeout=DEADLINE_S):
                pass
        assert len(hung.requests) == 3
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    metadata, reason, retry_s = error_details(caught.value)
    assert (reason, metadata["upstream"], metadata["attempts"]) == ("UPSTREAM_TIMEOUT", "up0", "3")
    assert retry_s is not None
    assert "no output within its first_output_timeout_s (0.5 s)" in caught.value.details()


async def test_the_bound_never_outlasts_the_upstreams_timeout(start_gateway):
    """A first-output bound longer than the upstream's `timeout_s` does not lengthen it:
    the attempt still ends at `timeout_s`, as any timeout."""
    async with FakeUpstream(default=Hang(after="headers")) as hung:
        config = gateway_config(hung.base_url, resilience={**FAST_RESILIENCE, "attempts": 1})
        gateway = await start_gateway(bounded(config, 60.0, timeout_s=FIRST_OUTPUT_S))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gateway.stub.CompleteStream(chat_stream(), timeout=DEADLINE_S):
                pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    _, reason, _ = error_details(caught.value)
    assert reason == "UPSTREAM_TIMEOUT"
    assert "first_output_timeout_s" not in caught.value.details()


async def test_a_stream_whose_first_output_came_in_time_is_not_cut_by_it(start_gateway):
    """Once the first text came within the bound, later chunks may each take longer than
    it: only `stream_idle_timeout_s` and `timeout_s` bound the stream from there."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n" + chunk("Hel"))  # the body ends at the close
        with contextlib.suppress(ConnectionError):
            for piece in ("lo", " there"):
                await asyncio.sleep(2 * FIRST_OUTPUT_S)
                writer.write(chunk(piece))
                await writer.drain()
            writer.write(chunk(finish="stop") + USAGE + DONE)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = await start_gateway(bounded(gateway_config(url, resilience=FAST_RESILIENCE)))
        text, final = await streamed(gateway)
    assert (text, final.attempts, final.finish_reason) == ("Hello there", 1, pb.FINISH_REASON_STOP)


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param(["<th"], id="open-tags-beginning"),
        pytest.param(["\n", "\n"], id="whitespace-before-the-tag"),
        pytest.param(["<think>", "\n"], id="open-tag-and-whitespace"),
    ],
)
async def test_text_the_think_tags_hold_back_is_no_first_output(pieces, start_gateway):
    """With `think_tags`, an upstream that sends only what the gateway holds back (a tag's
    beginning, whitespace before it, an open tag and no thought yet), then hangs, has sent
    no output: the next upstream answers at the first-output bound.

    Before, the held text counted as the first output: the attempt hung until the caller's
    deadline, which ended the call DEADLINE_EXCEEDED."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(_HEAD + b"\r\n" + b"".join(chunk(piece) for piece in pieces))
        await writer.drain()
        await reader.read()  # until the gateway closes the connection
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server, FakeUpstream() as healthy:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        config = gateway_config(url, healthy.base_url, resilience=FAST_RESILIENCE)
        gateway = await start_gateway(bounded(config, think_tags="true"))
        text, final = await streamed(gateway)
    assert (text, final.upstream, final.attempts) == ("Hello from fake", "up1", 2)


async def test_a_plain_unary_call_is_not_bounded_by_it(start_gateway):
    """A unary call to a plain upstream gets its answer whole, when it is ready: the bound
    does not apply, and an answer slower than it is answered, not retried."""
    async with FakeUpstream() as slow:
        slow.script(Reply(delay_s=2 * FIRST_OUTPUT_S))
        gateway = await start_gateway(
            bounded(gateway_config(slow.base_url, resilience=FAST_RESILIENCE))
        )
        response = await gateway.stub.Complete(chat(), timeout=DEADLINE_S)
        assert (response.content, response.metadata.attempts) == ("Hello from fake", 1)
        assert len(slow.requests) == 1
