"""A caller that stops reading a stream, without cancelling it or giving a deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from tests.conftest import chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.tenancy_helpers import as_tenant, detail, rpc_error, secure_config
from tests.integration.test_resilience import checked_out_connections, settle
from tests.redis_server import RedisServer

# Far more than gRPC's flow-control windows and the sockets' buffers hold between them.
_LONG = Reply(content="x" * (8 * 1024 * 1024), chunks=4096)


async def test_a_caller_that_stops_reading_lets_go_of_the_upstream_then_hears_why(
    start_gateway,
):
    """The caller reads one message and then nothing for longer than
    `server.stalled_stream_timeout_s`: the gateway closes the upstream request (it held
    its connection for as long as the caller did not read: for ever) and charges it as a
    cut stream, once. Reading on, the caller gets what was already on its way, then
    DEADLINE_EXCEEDED with reason CALLER_STALLED, not the rest of the answer."""
    async with FakeUpstream(default=_LONG) as upstream:
        gateway = await start_gateway(
            gateway_config(upstream.base_url, server={"stalled_stream_timeout_s": 0.5})
        )
        call = gateway.stub.CompleteStream(chat_stream("long"))
        received = len((await call.read()).delta.content)
        assert await settle(lambda: checked_out_connections(gateway) == 1)
        assert await settle(lambda: checked_out_connections(gateway) == 0, timeout_s=30)
        with pytest.raises(grpc.aio.AioRpcError) as stalled:
            while (message := await call.read()) is not grpc.aio.EOF:
                received += len(message.delta.content)
        assert stalled.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_details(stalled.value).reason == "CALLER_STALLED"
        assert 0 < received < len(_LONG.content)
        assert await settle(lambda: gateway.server.admission.is_idle)
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        assert (usage.total.requests, usage.total.estimated_requests) == (1, 1)
        assert len(upstream.requests) == 1


# A caller's stream window of about 1 KiB (gRPC's lookahead, not grown by BDP probes): a
# delta of this many characters fills it so far that the final message waits.
_SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
_FILLS_THE_WINDOW = 975


def _logged(caplog: pytest.LogCaptureFixture, event: str) -> bool:
    return any(record.msg == event for record in caplog.records)


async def test_a_caller_stalled_at_the_final_message_gets_the_answer_whole(start_gateway, caplog):
    """The caller takes nothing until its stream's last write, the final message, waited
    past `stalled_stream_timeout_s`: reading on, it gets the delta and the final, and the
    call ends OK, not DEADLINE_EXCEEDED (CALLER_STALLED) after a whole answer, which
    failed it as far as its client could tell."""
    reply = Reply(content="x" * _FILLS_THE_WINDOW, chunks=1)
    async with FakeUpstream(default=reply) as upstream:
        gateway = await start_gateway(
            gateway_config(upstream.base_url, server={"stalled_stream_timeout_s": 0.3})
        )
        async with grpc.aio.insecure_channel(gateway.server.address, options=_SMALL_WINDOW) as ch:
            call = pb_grpc.CompletionServiceStub(ch).CompleteStream(chat_stream("long"))
            assert await settle(lambda: _logged(caplog, "rpc.caller_stalled"), timeout_s=30)
            assert await settle(lambda: gateway.server.admission.is_idle)
            events = [message.WhichOneof("event") async for message in call]
            assert await call.code() is grpc.StatusCode.OK
    assert events == ["delta", "final"]
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert (usage.total.requests, usage.total.estimated_requests) == (1, 0)


async def test_a_stalled_stream_gives_its_server_slot_to_other_callers(start_gateway):
    """Once its upstream is let go, a stalled stream holds no slot of the server's
    `max_in_flight_calls`: one tenant's callers that stop reading cannot refuse every
    other caller for as long as they stay connected."""
    async with FakeUpstream(default=_LONG) as upstream:
        server = {"stalled_stream_timeout_s": 0.5, "max_in_flight_calls": 1}
        gateway = await start_gateway(gateway_config(upstream.base_url, server=server))
        call = gateway.stub.CompleteStream(chat_stream("long"))
        await call.read()
        assert await settle(lambda: checked_out_connections(gateway) == 1)
        assert await settle(lambda: checked_out_connections(gateway) == 0, timeout_s=30)
        upstream.script(Reply(content="served"))
        answer = await gateway.stub.Complete(chat("short"))
        assert answer.content == "served"
        with pytest.raises(grpc.aio.AioRpcError) as stalled:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert error_details(stalled.value).reason == "CALLER_STALLED"
        assert await settle(lambda: gateway.server.admission.is_idle)
        assert gateway.server.admission.in_flight == 0


async def _refused_while_one_runs(gateway: Any, upstream: FakeUpstream) -> None:
    """team-a's one call slot is free: a call takes it (its upstream answers a while
    after it arrives), and a second call meanwhile is refused for that slot."""
    upstream.script(Reply(content="served", delay_s=2.0))
    arrived = len(upstream.requests)
    running = asyncio.ensure_future(gateway.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert await settle(lambda: running.done() or len(upstream.requests) > arrived, timeout_s=10)
    if running.done():
        await running  # refused: its error says why
    refused = await rpc_error(gateway.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    subject = detail(refused, error_details_pb2.QuotaFailure).violations[0].subject
    assert subject == "tenant:team-a:max_concurrent_calls"
    assert (await running).content == "served"


async def _a_stalled_stream_gives_back_its_tenants_slot(
    start_gateway: Any, upstream: FakeUpstream, **auth: Any
) -> None:
    """team-a may hold one call at a time; its one stream stalls. Once its upstream is
    let go, team-a's calls run again, one at a time; and the stalled call's end, as its
    caller reads on, gives nothing back a second time."""
    config = secure_config(
        upstream.base_url,
        auth=auth,
        tenants={"team-a": {"max_concurrent_calls": 1}},
        server={"stalled_stream_timeout_s": 0.5},
    )
    gateway = await start_gateway(config)
    stalled = gateway.stub.CompleteStream(chat_stream("long"), metadata=as_tenant("team-a"))
    await stalled.read()
    assert await settle(lambda: checked_out_connections(gateway) == 1)
    assert await settle(lambda: checked_out_connections(gateway) == 0, timeout_s=30)
    await _refused_while_one_runs(gateway, upstream)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await stalled.read() is not grpc.aio.EOF:
            pass
    assert error_details(ended.value).reason == "CALLER_STALLED"
    assert await settle(lambda: gateway.server.admission.is_idle)
    await _refused_while_one_runs(gateway, upstream)


async def test_a_stalled_stream_gives_back_its_tenants_call_slot(start_gateway):
    """A tenant whose callers stop reading is not refused its own new calls
    (`max_concurrent_calls`, counted in this process) for as long as they stay."""
    async with FakeUpstream(default=_LONG) as upstream:
        await _a_stalled_stream_gives_back_its_tenants_slot(start_gateway, upstream)


@pytest.mark.redis
async def test_a_stalled_stream_gives_back_its_tenants_lease_in_redis(
    start_gateway, redis_server: RedisServer
):
    """The same with the tenant's limits in Redis: the stalled call's lease is released
    when its upstream is let go, and no lease is left once every call ended."""
    async with FakeUpstream(default=_LONG) as upstream:
        await _a_stalled_stream_gives_back_its_tenants_slot(
            start_gateway, upstream, redis_url=redis_server.url, redis_key_prefix="t-stall:"
        )
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.zcard("t-stall:tenant:{team-a}:inflight") == 0
    finally:
        await client.aclose()


async def test_a_stalled_callers_deadline_closes_the_upstream_and_frees_its_slots(
    start_gateway,
):
    """The caller reads one message and then nothing until its deadline passes (long
    before `stalled_stream_timeout_s`): gRPC ends the call with DEADLINE_EXCEEDED while
    its next message waits on flow control. The upstream request is closed then, and the
    call's server slot given back, not whenever the garbage collector gets to the
    abandoned messages (under load, minutes; at shutdown, never)."""
    async with FakeUpstream(default=_LONG) as upstream:
        gateway = await start_gateway(
            gateway_config(upstream.base_url, server={"stalled_stream_timeout_s": 600})
        )
        call = gateway.stub.CompleteStream(chat_stream("long"), timeout=1.5)
        await call.read()
        assert await settle(lambda: checked_out_connections(gateway) == 1)
        assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await settle(lambda: checked_out_connections(gateway) == 0)
        assert await settle(lambda: gateway.server.admission.is_idle)
        assert await settle(lambda: upstream.open_connections() == 0)
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        assert (usage.total.requests, usage.total.estimated_requests) == (1, 1)


class _Vanishing:
    """A TCP relay to the gateway for one caller, until `vanish()`: then it reads and
    forwards nothing more and closes nothing, as a caller whose host crashed or whose
    network path dropped, which sends no FIN or RST."""

    def __init__(self, gateway_address: str) -> None:
        self._port = int(gateway_address.rpartition(":")[2])
        self._has_vanished = False
        self._pipes: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    def vanish(self) -> None:
        self._has_vanished = True
        for pipe in self._pipes:
            pipe.cancel()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, to_writer]
        if not self._has_vanished:
            self._pipes += [
                asyncio.create_task(self._pipe(reader, to_writer)),
                asyncio.create_task(self._pipe(to_reader, writer)),
            ]

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        self.vanish()
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


async def test_a_caller_that_vanishes_without_closing_its_connection_is_cut(start_gateway):
    """A caller's connection goes silent mid-stream, with no FIN or RST: the gateway's
    keepalive pings go unanswered, it closes the connection, and the call is cut as if
    cancelled: the upstream request closed before its answer ends, and charged as cut
    (estimated: the answer's reported usage never came), rather than generated and
    billed to its end for no one."""
    slow = Reply(content=" ".join(["word"] * 600), chunks=600, chunk_delay_s=0.05)
    async with FakeUpstream(default=slow) as upstream:
        data = gateway_config_data(
            upstream.base_url, server={"keepalive_time_s": 0.5, "keepalive_timeout_s": 0.5}
        )
        data["upstreams"][0]["timeout_s"] = 60  # past the answer: only the caller can cut it
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        vanishing = _Vanishing(gateway.server.address)
        async with vanishing as address:
            channel = grpc.aio.insecure_channel(address)
            call = pb_grpc.CompletionServiceStub(channel).CompleteStream(chat_stream("long"))
            assert (await call.read()).delta.content
            vanishing.vanish()
            await upstream.wait_for_disconnect(timeout_s=20)
            call.cancel()
            await channel.close(grace=0)
        assert await settle(lambda: gateway.server.admission.is_idle)
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        assert (usage.total.requests, usage.total.estimated_requests) == (1, 1)
