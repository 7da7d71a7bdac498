"""The Python client library (clients/python/gateway_client) against the real gateway."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway_client import (
    ErrorDetails,
    GatewayClient,
    build_request,
    cli,
    error_details,
    status_details,
)
from gateway_client.client import MAX_TIMEOUT_S, is_loopback_address
from gateway_client.commands import complete
from gateway_client.errors import RETRY_ELSEWHERE_TRAILER
from llmgateway.v1 import gateway_pb2 as pb
from service import rpc_boundary
from service.errors import to_rpc_status
from service.pool import upstream_idempotency_key
from tests.conftest import (
    FAKE_MODEL,
    RunningGateway,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config,
)
from tests.counting_relay import CountingRelay
from tests.fake_upstream import CutStream, FakeUpstream, Hang, Reply, Status
from tests.integration.helpers import GARBLED_DETAILS, garbled_details_server, rich_status

REPO = Path(__file__).resolve().parents[2]
_QUOTA_FAILURE_URL = "type.googleapis.com/google.rpc.QuotaFailure"
StartGateway = Callable[..., Any]
# A hang guard, not a timing: a wait for the upstream to reach a state.
WAIT_S = 30.0


# Targets gRPC reads as HOST:PORT (the dns: scheme in any case, with or without slashes,
# escapes decoded), or as a list of them; before, all but the first went to the proxy.
LOOPBACK_FORMS = [
    "{host}:{port}",
    "dns:{host}:{port}",
    "DNS:///{host}:{port}",
    "dns:///{host}%3A{port}",
    "ipv4:{host}:{port},{host}:{port}",
]


async def test_channel_options_spread_calls_over_every_address_with_round_robin(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`channel_options` reach the channel: with `round_robin`, a target resolving to two
    gateways (as a headless Service does) sends calls to both. Before, the client took no
    channel options, and gRPC's default (pick_first) sent every call to one."""
    gateways = [await start_gateway(gateway_config(upstream.base_url)) for _ in range(2)]
    ports = [gateway.server.port for gateway in gateways]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    options = [("grpc.lb_policy_name", "round_robin")]
    async with GatewayClient(target, timeout_s=10, channel_options=options) as client:
        for index in range(6):
            await client.complete(f"Say hi {index}", model=FAKE_MODEL)
    served = []
    for gateway in gateways:
        usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
        served.append(sum(row.requests for row in usage.rows))
    assert sum(served) == 6
    assert all(served), served


async def test_a_channel_option_replaces_the_clients_own(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A channel option the client sets itself (here the largest answer it takes) is
    replaced by the caller's: the answer is refused as larger than the caller allowed."""
    upstream.script(Reply(content="word " * 200))
    options = [("grpc.max_receive_message_length", 100)]
    async with GatewayClient(gateway.server.address, channel_options=options) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete("Say hi", model=FAKE_MODEL)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("form", LOOPBACK_FORMS)
@pytest.mark.parametrize("variable", ["http_proxy", "https_proxy"])
async def test_a_gateway_on_loopback_is_called_past_the_machines_proxy(
    upstream: FakeUpstream,
    gateway: RunningGateway,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    form: str,
) -> None:
    """gRPC reads the proxy variables itself; a gateway on this machine is called directly,
    not through a proxy (here one that answers nothing) that cannot reach its loopback,
    whichever way its address is written."""
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    host, _, port = gateway.server.address.rpartition(":")
    async with GatewayClient(form.format(host=host, port=port), timeout_s=10) as client:
        answer = await client.complete("Say hi", model=FAKE_MODEL)
    assert answer.content == "Hello from fake"


# Both clients tell these apart alike (test_node_client.py runs the Node client on them).
LOOPBACK_ADDRESSES = [
    ("127.0.0.1:50051", True),
    ("localhost:50051", True),
    ("LOCALHOST", True),
    ("[::1]:50051", True),
    ("dns:///localhost:50051", True),
    ("[::ffff:127.0.0.1]:50051", True),
    ("llm-gateway:50051", False),
    ("10.0.0.5:50051", False),
    ("127.corp.example:50051", False),
    ("[0:0:0:0:0:0:0:1]:50051", True),
    ("[::ffff:7f00:1]:50051", True),
    ("[::2]:50051", False),
    ("[::ffff:10.0.0.1]:50051", False),
    ("dns:127.0.0.1:50051", True),
    ("dns://10.0.0.53/localhost:50051", True),
    ("dns:llm-gateway:50051", False),
    ("dns://127.0.0.1/llm-gateway:50051", False),
    # A list is this machine when each of its addresses is (before, no list was, and an
    # `ipv6:` list was whenever its first address was).
    ("ipv4:127.0.0.1:50051", True),
    ("ipv4:127.0.0.1:50051,127.0.0.2:50052", True),
    ("IPv4:127.0.0.1:50051,127.0.0.1:50052", True),
    ("ipv4:127.0.0.1:50051,10.0.0.5:50051", False),
    ("ipv6:[::1]:50051,[::ffff:127.0.0.1]:50052", True),
    ("ipv6:[::1]:50051,[::2]:50051", False),
]


@pytest.mark.parametrize(("address", "is_loopback"), LOOPBACK_ADDRESSES)
def test_loopback_gateway_addresses_are_told_apart(address: str, is_loopback: bool) -> None:
    """Only an address naming this machine skips the proxy; a name merely starting like
    one may resolve anywhere."""
    assert is_loopback_address(address) is is_loopback


@pytest.mark.parametrize(
    "form",
    [
        "{host}:{port}",
        "dns:///{host}:{port}",
        "dns:{host}:{port}",
        # Read by gRPC as a URI, each of these too called PORT - 65536.
        "{host}:{port} ",
        "{host}:{port}?x",
        "dns:///{host}:{port}#x",
        "DNS:///{host}:{port}",
        "dns:///{host}%3A{port}",
        # Address lists: gRPC refused these only as each call failed UNKNOWN.
        "ipv4:{host}:{port}",
        "ipv4:{host}:1,{host}:{port}",
    ],
)
async def test_a_port_past_65535_is_refused_not_wrapped_onto_another_port(
    gateway: RunningGateway, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """gRPC takes a port past 65535 modulo 65536: before, `PORT + 65536` called whatever
    listened on PORT (here this gateway), caller key and all. Now the client refuses it
    when made (ValueError), and the CLI as a usage error (exit 2), before any call."""
    host, _, port = gateway.server.address.rpartition(":")
    wrapped = form.format(host=host, port=int(port) + 65536)
    with pytest.raises(ValueError, match=r"the port must be 1\.\.65535, in digits alone"):
        GatewayClient(wrapped, api_key="llmgw_not_for_that_port")
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["models", "--address", wrapped])
    assert usage_error.value.code == 2
    assert "the port must be 1..65535, in digits alone" in capsys.readouterr().err


def test_an_address_that_is_not_utf8_is_refused_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An address whose bytes are not UTF-8 (`--address $'\\xff:50051'`, a Latin-1
    `$LLM_GATEWAY_ADDRESS`), which Python holds as lone surrogates, is refused when the
    client is made (ValueError) and by the CLI as a usage error naming it (exit 2). Before,
    gRPC's encoding of the target ended the command in a UnicodeEncodeError traceback."""
    address = b"h\xe9st:50051".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        GatewayClient(address)
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["models", "--address", address])
    assert usage_error.value.code == 2
    assert "argument --address: " in capsys.readouterr().err
    monkeypatch.setenv("LLM_GATEWAY_ADDRESS", address)
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["models"])
    assert usage_error.value.code == 2
    assert "environment variable LLM_GATEWAY_ADDRESS: " in capsys.readouterr().err


async def test_leaving_a_stream_early_closes_the_upstream_request(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Breaking out of a stream cancels the call, so the provider stops generating at once.

    The stream object stays referenced (as when a caller means to read `.final`) and the
    client stays open: nothing but the client itself can end the call.
    """
    upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=3.0))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        async for text in stream:
            assert text
            break
        # The upstream would have streamed for a minute: a disconnect is counted only when
        # its client leaves before the end, and this one comes well within that.
        await upstream.wait_for_disconnect(timeout_s=30.0)
        assert stream.final is None
        async with asyncio.timeout(5):
            while gateway.server.admission.in_flight:
                await asyncio.sleep(0.01)


@pytest.mark.parametrize("is_held", [False, True], ids=["in-loop", "held-in-a-variable"])
async def test_leaving_a_batch_early_closes_its_upstream_requests(
    upstream: FakeUpstream, gateway: RunningGateway, is_held: bool
) -> None:
    """Breaking out of complete_batch cancels the call and the items still in flight, also
    with its results held in a variable while the loop breaks (as a stream may be)."""
    upstream.script(Reply(content="fast"), Reply(content="slow", delay_s=60))
    items = [
        pb.BatchItem(id=str(i), request=build_request("x", model=FAKE_MODEL)) for i in range(2)
    ]
    async with GatewayClient(gateway.server.address) as client:
        held = client.complete_batch(items, concurrency=2) if is_held else None
        async for event in held or client.complete_batch(items, concurrency=2):
            assert event.result.response.content == "fast"
            break
        # Counted only for a request its client leaves before the answer, due in a minute.
        await upstream.wait_for_disconnect(timeout_s=30.0)
        async with asyncio.timeout(5):
            while gateway.server.admission.in_flight:
                await asyncio.sleep(0.01)


async def test_a_stream_read_on_by_a_loop_after_a_peeked_first_text_is_not_cut(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A first text read with `anext(aiter(stream))`, then the rest with `async for`: the
    peeking reader, collected once dropped, does not cancel the call the loop reads on.
    Before, its close cancelled the call and the loop ended with a CancelledError in a
    task nobody had cancelled."""
    upstream.script(Reply(content="word " * 10, chunks=10))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        first = await anext(aiter(stream))
        rest = [text async for text in stream]
    assert first + "".join(rest) == "word " * 10
    assert stream.final is not None
    assert upstream.disconnects == 0


async def test_a_batch_read_on_by_a_loop_after_a_peeked_first_event_is_not_cut(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """As for a stream: the reader that took the batch's first event does not cancel the
    call once collected, and the loop gets every other result and the summary."""
    upstream.script(Reply(content="a"), Reply(content="b"), Reply(content="c"))
    items = [
        pb.BatchItem(id=str(i), request=build_request(f"x{i}", model=FAKE_MODEL)) for i in range(3)
    ]
    async with GatewayClient(gateway.server.address) as client:
        results = client.complete_batch(items, concurrency=1)
        first = await anext(aiter(results))
        rest = [event async for event in results]
    events = [first, *rest]
    assert [event.WhichOneof("event") for event in events] == ["result"] * 3 + ["summary"]
    assert sorted(event.result.response.content for event in events[:3]) == ["a", "b", "c"]


READ_ALREADY = "was read to its end already: its events are read once"


async def test_a_stream_read_to_its_end_then_looped_over_again_says_so(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A second `async for` over a stream read to its end raises a RuntimeError saying it
    was read already, as the Node client throws. Before, it yielded nothing: a caller that
    read a stream twice got an empty answer without a word."""
    upstream.script(Reply(content="word " * 3, chunks=3))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        texts = [text async for text in stream]
        with pytest.raises(RuntimeError, match=f"CompletionStream {READ_ALREADY}"):
            async for _ in stream:
                pass
    assert "".join(texts) == "word " * 3
    assert stream.final is not None


async def test_a_batch_read_to_its_end_then_looped_over_again_says_so(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """As for a stream: a batch's results read to their end, then looped over again,
    raise a RuntimeError rather than yield nothing."""
    upstream.script(Reply(content="a"))
    items = [pb.BatchItem(id="0", request=build_request("x", model=FAKE_MODEL))]
    async with GatewayClient(gateway.server.address) as client:
        results = client.complete_batch(items)
        events = [event async for event in results]
        with pytest.raises(RuntimeError, match=f"BatchResults {READ_ALREADY}"):
            async for _ in results:
                pass
    assert [event.WhichOneof("event") for event in events] == ["result", "summary"]


@pytest.mark.parametrize("kind", ["stream", "batch"])
async def test_a_failed_stream_or_batch_looped_over_again_raises_its_failure_again(
    upstream: FakeUpstream, start_gateway: StartGateway, kind: str
) -> None:
    """A stream (or batch) whose call failed raises that failure from a later loop too, as
    the Node client does. Before, the later loop ended at once as though the call had
    answered nothing."""
    gateway = await start_gateway(gateway_config(upstream.base_url, batch={"max_items": 1}))
    async with GatewayClient(gateway.server.address) as client:
        if kind == "stream":
            events: Any = client.stream("Say hi", model="no-such-model")
        else:
            item = pb.BatchItem(request=build_request("x", model=FAKE_MODEL))
            events = client.complete_batch([item, item])  # refused whole: over max_items
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in events:
                    pass
            expected = (
                grpc.StatusCode.NOT_FOUND if kind == "stream" else grpc.StatusCode.INVALID_ARGUMENT
            )
            assert raised.value.code() == expected


LEFT_BEFORE_ITS_END = "call was cancelled when a loop over it was left before its end"


def script_a_lasting_call(upstream: FakeUpstream, kind: str) -> None:
    """Script the upstream for `lasting_call`: a stream's events 3 s apart, or a batch's
    second item answered after a minute (its first at once)."""
    if kind == "stream":
        upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=3.0))
    else:
        upstream.script(Reply(content="fast"), Reply(content="slow", delay_s=60))


def lasting_call(client: GatewayClient, kind: str) -> Any:
    """A stream, or a batch of two items, whose call lasts (`script_a_lasting_call`)."""
    if kind == "stream":
        return client.stream("Tell a story", model=FAKE_MODEL)
    items = [
        pb.BatchItem(id=str(i), request=build_request("x", model=FAKE_MODEL)) for i in range(2)
    ]
    return client.complete_batch(items, concurrency=2)


async def two_loops_failing_cancelled(events: Any) -> list[str]:
    """Loop over `events` twice, each loop failing CANCELLED: their details."""
    failures = []
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in events:
                pass
        assert raised.value.code() == grpc.StatusCode.CANCELLED
        failures.append(raised.value.details() or "")
    return failures


@pytest.mark.parametrize("how", ["break", "peek"])
@pytest.mark.parametrize("kind", ["stream", "batch"])
async def test_a_stream_or_batch_left_early_then_looped_over_again_fails_cancelled(
    upstream: FakeUpstream, gateway: RunningGateway, kind: str, how: str
) -> None:
    """A loop left before the end (a break, or a first event peeked with
    `anext(aiter(...))` and no loop reading on at once) cancels the call: a later loop fails
    CANCELLED, an `AioRpcError` as any failed call, and so does the one after it. Before,
    the next loop raised a bare `asyncio.CancelledError` (ending the caller's task as
    though someone had cancelled it), and the loop after that yielded nothing, as though
    the call had answered nothing."""
    script_a_lasting_call(upstream, kind)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        async with GatewayClient(gateway.server.address, timeout_s=WAIT_S) as client:
            events = lasting_call(client, kind)
            if how == "peek":
                await anext(aiter(events))
            else:
                async for _ in events:
                    break
            # The left reader is closed in a turn of the loop to come, cancelling the call.
            await upstream.wait_for_disconnect(timeout_s=WAIT_S)
            for details in await two_loops_failing_cancelled(events):
                assert LEFT_BEFORE_ITS_END in details
        del events
        gc.collect()
        await asyncio.sleep(0)  # a turn for whatever the collection scheduled
    finally:
        loop.set_exception_handler(None)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    assert unhandled == []


@pytest.mark.parametrize("kind", ["stream", "batch"])
async def test_a_loop_cut_by_its_tasks_cancellation_then_looped_over_again_fails_cancelled(
    upstream: FakeUpstream, gateway: RunningGateway, kind: str
) -> None:
    """A loop whose task is cancelled as it waits for the next event (an `asyncio.timeout`
    around it, a TaskGroup's failed sibling) cuts the call: that task is cancelled, and a
    later loop fails CANCELLED, as after a `break`. Before, the later loop yielded nothing
    without a word, as though the call had answered nothing, and the one after it said
    the events were read to their end."""
    script_a_lasting_call(upstream, kind)
    async with GatewayClient(gateway.server.address, timeout_s=WAIT_S) as client:
        events = lasting_call(client, kind)
        first_came = asyncio.Event()

        async def read() -> None:
            async for _ in events:
                first_came.set()  # then it waits for the next event, where the cancel lands

        reading = asyncio.create_task(read())
        await first_came.wait()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await upstream.wait_for_disconnect(timeout_s=WAIT_S)
        for details in await two_loops_failing_cancelled(events):
            assert "call was cancelled" in details
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


@pytest.mark.parametrize("how", ["unread", "peek"])
@pytest.mark.parametrize("kind", ["stream", "batch"])
async def test_a_stream_or_batch_of_an_ended_event_loop_fails_cancelled_in_a_later_one(
    upstream: FakeUpstream, gateway: RunningGateway, kind: str, how: str
) -> None:
    """A stream (or batch) made in one `asyncio.run`, unread or its first event peeked,
    then looped over in the next: the first loop's end cancelled its call, and each later
    loop fails CANCELLED. Before, the first raised a bare `asyncio.CancelledError`, or
    yielded nothing without a word, and the loops after it nothing."""
    script_a_lasting_call(upstream, kind)

    def in_one_thread() -> list[str]:
        client = GatewayClient(gateway.server.address, timeout_s=WAIT_S)

        async def begin() -> Any:
            events = lasting_call(client, kind)
            if how == "peek":
                await anext(aiter(events))
            return events

        async def read_on(events: Any) -> list[str]:
            failures = await two_loops_failing_cancelled(events)
            await client.close()
            return failures

        return asyncio.run(read_on(asyncio.run(begin())))

    for details in await asyncio.to_thread(in_one_thread):
        assert "call was cancelled" in details


async def test_cancelling_a_stream_inside_its_loop_ends_the_loop(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`stream.cancel()`, the README's alternative to leaving the loop, ends the loop: the
    caller's task is not cancelled (an `asyncio.CancelledError` out of `async for` would
    end it, or its TaskGroup, as though someone had cancelled it)."""
    upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=0.1))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        texts = []
        async for text in stream:
            texts.append(text)
            if len(texts) == 2:
                stream.cancel()
        await upstream.wait_for_disconnect(timeout_s=2.0)
    assert len(texts) == 2
    assert stream.final is None
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_cancelling_a_stream_whose_answer_arrived_unread_yields_none_of_it(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A slow reader's `stream.cancel()` once the gateway has sent the whole answer ends
    the loop without the texts still unread, nor `final`, as the Node client's loop
    yields none of them after a cancel (and throws CANCELLED)."""
    upstream.script(Reply(content="word " * 20, chunks=20))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        texts = []
        async for text in stream:
            texts.append(text)
            if len(texts) == 1:
                async with asyncio.timeout(5):
                    while gateway.server.admission.in_flight:
                        await asyncio.sleep(0.01)
                stream.cancel()
    assert len(texts) == 1
    assert stream.final is None


async def test_a_stream_still_ends_when_its_task_is_cancelled(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Cancelling the consumer's task still cancels it (and the call)."""
    upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=0.25))
    async with GatewayClient(gateway.server.address) as client:
        stream = client.stream("Tell a story", model=FAKE_MODEL)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await upstream.wait_for_disconnect(timeout_s=2.0)


async def test_a_call_cut_by_closing_the_client_fails_cancelled_not_its_task(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Closing the client cancels the calls still in flight: each fails CANCELLED, an
    `AioRpcError` as any failed call, in tasks nobody cancelled. Before, gRPC's
    `asyncio.CancelledError` came out of `complete`, the stream's and the batch's loops,
    and ended each caller's task as though it had been cancelled. A call whose own task
    was cancelled stays a cancellation (an `asyncio.timeout` around it reads it so)."""
    upstream.script(Hang(), Hang(), Hang(), Hang())
    client = GatewayClient(gateway.server.address)
    item = pb.BatchItem(id="q1", request=build_request("Say hi", model=FAKE_MODEL))

    async def read_stream() -> None:
        async for _ in client.stream("Say hi", model=FAKE_MODEL):
            pass

    async def read_batch() -> None:
        async for _ in client.complete_batch([item]):
            pass

    calls = [client.complete("Say hi", model=FAKE_MODEL), read_stream(), read_batch()]
    tasks = [asyncio.create_task(call) for call in calls]
    cancelled = asyncio.create_task(client.complete("Say hi", model=FAKE_MODEL))
    async with asyncio.timeout(WAIT_S):
        while len(upstream.requests) < len(tasks) + 1:
            await asyncio.sleep(0.01)
    cancelled.cancel()
    await client.close()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    for task in tasks:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await task
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert "closed" in (caught.value.details() or "")
        assert not task.cancelled()


async def test_a_client_made_outside_any_event_loop_serves_each_loop_it_is_called_in(
    gateway: RunningGateway,
) -> None:
    """A client made where no loop runs (a module's global), then called in one
    `asyncio.run` after another. Before, its channel belonged to a loop that never ran, and
    every call failed "attached to a different loop"; a client made in a loop failed
    "Event loop is closed" in the next `asyncio.run`."""

    def outside_any_loop() -> list[str]:
        client = GatewayClient(gateway.server.address, timeout_s=WAIT_S)

        async def ask() -> str:
            return (await client.complete("Say hi", model=FAKE_MODEL)).content

        answers = [asyncio.run(ask()), asyncio.run(ask())]
        asyncio.run(client.close())
        return answers

    assert await asyncio.to_thread(outside_any_loop) == ["Hello from fake"] * 2


@pytest.mark.parametrize("made", ["in-the-first-loop", "outside-any-loop"])
async def test_a_client_serves_a_new_loop_after_its_first_was_stopped_and_left_unclosed(
    gateway: RunningGateway, made: str
) -> None:
    """A loop run with `run_until_complete` is left stopped, not closed: the `asyncio.run`
    after it (and the one after that) gets a channel of its own, and the first loop,
    run again, gets one back. Before, a channel whose loop was not closed was taken for
    one serving a loop that still ran in another thread: every later call failed "make a
    GatewayClient in each event loop", in the one thread."""

    def in_one_thread() -> list[str]:
        first_loop = asyncio.new_event_loop()
        try:

            async def make() -> GatewayClient:
                return GatewayClient(gateway.server.address, timeout_s=WAIT_S)

            client = (
                first_loop.run_until_complete(make())
                if made == "in-the-first-loop"
                else GatewayClient(gateway.server.address, timeout_s=WAIT_S)
            )

            async def ask() -> str:
                return (await client.complete("Say hi", model=FAKE_MODEL)).content

            answers = [first_loop.run_until_complete(ask())]
            assert not first_loop.is_running()
            assert not first_loop.is_closed()
            answers += [asyncio.run(ask()), asyncio.run(ask())]
            answers.append(first_loop.run_until_complete(ask()))
            first_loop.run_until_complete(client.close())
            return answers
        finally:
            first_loop.close()

    assert await asyncio.to_thread(in_one_thread) == ["Hello from fake"] * 4


async def test_a_client_called_from_a_second_running_loop_says_to_make_one_per_loop(
    gateway: RunningGateway,
) -> None:
    """A channel serves the loop it was made in: a call from another loop still running
    (another thread's) is refused with what to do, and the client serves its own loop on."""
    async with GatewayClient(gateway.server.address, timeout_s=WAIT_S) as client:

        def in_another_loop() -> None:
            with pytest.raises(RuntimeError, match="make a GatewayClient in each event loop"):
                asyncio.run(client.complete("Say hi", model=FAKE_MODEL))

        await asyncio.to_thread(in_another_loop)
        answer = await client.complete("Say hi", model=FAKE_MODEL)
    assert answer.content == "Hello from fake"


async def test_a_stream_read_by_a_second_task_at_once_is_refused_and_the_first_reads_on(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A second task's loop over a stream another task is reading is refused, alone. Before,
    grpc.aio refused it ("asynchronous generator is already running"), its leaving
    cancelled the call, and the first task's loop ended in a bare `CancelledError`."""
    upstream.script(Reply(content="one two three four five", chunks=5, chunk_delay_s=0.1))
    first_text = asyncio.Event()
    async with GatewayClient(gateway.server.address, timeout_s=WAIT_S) as client:
        stream = client.stream("Say hi", model=FAKE_MODEL)

        async def read() -> list[str]:
            texts = []
            async for text in stream:
                texts.append(text)
                first_text.set()
            return texts

        reading = asyncio.create_task(read())
        await first_text.wait()
        with pytest.raises(RuntimeError, match="being read by another loop"):
            async for _ in stream:
                pass
        texts = await reading
    assert "".join(texts) == "one two three four five"
    assert stream.final is not None


# Over gRPC's default 4 MiB message, within the 16 MiB the gateway takes from an upstream.
LONG_ANSWER = "word " * (1024 * 1024 + 7)


async def test_an_answer_over_grpcs_default_message_limit_reaches_the_client(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A unary answer is one message: a channel with gRPC's default receive limit is
    refused it (RESOURCE_EXHAUSTED, after the upstream was paid), the client's is not."""
    upstream.script(Reply(content=LONG_ANSWER), Reply(content=LONG_ANSWER))
    request = build_request("Say it all", model=FAKE_MODEL, temperature=0.7)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(request)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with GatewayClient(gateway.server.address) as client:
        response = await client.complete(request)
    assert response.content == LONG_ANSWER
    assert len(upstream.requests) == 2


async def test_a_stop_string_is_one_stop_sequence(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`stop="END"`, as the OpenAI API takes it, reaches the upstream as one sequence, not
    as "E", "N" and "D" (which would cut the answer at its first E)."""
    async with GatewayClient(gateway.server.address) as client:
        await client.complete("Say hi", model=FAKE_MODEL, stop="END")
        await client.complete("Say hi", model=FAKE_MODEL, stop=["a", "b"])
    assert [r.body["stop"] for r in upstream.requests] == [["END"], ["a", "b"]]


async def test_a_calls_own_timeout_replaces_the_clients(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`timeout_s` on a call is its deadline, unary and streamed, in place of the
    client's; `timeout_s=None` is none, past a client deadline the answer outlasts."""
    upstream.script(*[Reply(delay_s=1.0)] * 3)
    async with GatewayClient(gateway.server.address, timeout_s=0.5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await client.complete("Say hi", model=FAKE_MODEL, timeout_s=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in client.stream("Say hi", model=FAKE_MODEL, timeout_s=0.2):
                pass
        answer = await client.complete("Say hi", model=FAKE_MODEL, timeout_s=None)
    assert unary.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert streamed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert answer.content == "Hello from fake"
    assert "timeout_s" not in upstream.requests[-1].body


@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), 1e10])
async def test_a_timeout_grpc_cannot_keep_is_refused_before_any_call(
    upstream: FakeUpstream, gateway: RunningGateway, timeout_s: float
) -> None:
    """A deadline past what gRPC's clock holds (infinity, meant as none) or nan failed the
    call at once with DEADLINE_EXCEEDED, as though the gateway were slow: it is a
    ValueError before any call, for the client and for each kind of call, which a long
    deadline within the limit still answers."""
    with pytest.raises(ValueError, match="or None for no deadline"):
        GatewayClient(gateway.server.address, timeout_s=timeout_s)
    async with GatewayClient(gateway.server.address) as client:
        with pytest.raises(ValueError, match="or None for no deadline"):
            await client.complete("Say hi", model=FAKE_MODEL, timeout_s=timeout_s)
        with pytest.raises(ValueError, match="or None for no deadline"):
            client.stream("Say hi", model=FAKE_MODEL, timeout_s=timeout_s)
        with pytest.raises(ValueError, match="or None for no deadline"):
            await client.list_models(timeout_s=timeout_s)
        answer = await client.complete("Say hi", model=FAKE_MODEL, timeout_s=MAX_TIMEOUT_S)
    assert answer.content == "Hello from fake"
    assert len(upstream.requests) == 1


async def test_usage_reads_aware_times_in_any_zone_and_refuses_naive_ones(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`usage(since=..., until=...)` takes an aware datetime in any zone as the moment it
    names; a naive one (`datetime.now()`), which protobuf read as UTC and so shifted the
    window by the machine's UTC offset, is a ValueError naming the fix."""
    east = datetime.timezone(datetime.timedelta(hours=5))
    async with GatewayClient(gateway.server.address, timeout_s=10) as client:
        await client.complete("Say hi", model=FAKE_MODEL)
        an_hour_ago = datetime.datetime.now(east) - datetime.timedelta(hours=1)
        window = {"since": an_hour_ago, "until": an_hour_ago + datetime.timedelta(hours=2)}
        assert (await client.usage(**window)).total.requests == 1
        for bound in ("since", "until"):
            naive = {**window, bound: window[bound].replace(tzinfo=None)}
            with pytest.raises(ValueError, match=rf"^{bound} has no time zone: .*timezone\.utc"):
                await client.usage(**naive)


def test_a_turn_with_an_unknown_role_names_the_roles() -> None:
    """A misspelt role is a ValueError listing the roles, as a misspelt cache mode is."""
    with pytest.raises(ValueError, match="role must be one of system, user, assistant, tool"):
        build_request([("developer", "Be brief")], model=FAKE_MODEL)


PAIR = "expected (role, content) or a Message, got"
ROLES = "a turn's role must be one of system, user, assistant, tool"
# (prompt, options, the error raised, how its message begins)
MALFORMED_CALLS: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    (["just a string"], {}, TypeError, f"prompt[0]: {PAIR} str"),
    ([("user", "hi"), ("user",)], {}, TypeError, f"prompt[1]: {PAIR} a tuple of length 1"),
    ([{"role": "user", "content": "hi"}], {}, TypeError, f"prompt[0]: {PAIR} dict"),
    ([("user", 5)], {}, TypeError, "prompt[0]: the content must be a str, got int"),
    ([("developer", "hi")], {}, ValueError, f"prompt[0]: {ROLES}, got 'developer'"),
    ("hi", {"system": 5}, TypeError, "system: the content must be a str, got int"),
    (None, {}, TypeError, "prompt: expected a str, a sequence of turns or a CompleteRequest"),
    ("hi", {"max_tokens": "5"}, TypeError, "max_tokens: expected an int, got str"),
    ("hi", {"temperature": "0.5"}, TypeError, "temperature: expected a float, got str"),
    # Protobuf takes a bool as a number for floats (True: 1.0) and enums.
    ("hi", {"temperature": True}, TypeError, "temperature: expected a float, got bool"),
    ("hi", {"reasoning_effort": False}, TypeError, "reasoning_effort: expected a name or a"),
    ("hi", {"stop": [1]}, TypeError, "stop: expected a str or a list of str, got list"),
    ("hi", {"max_tokens": 2**40}, ValueError, "max_tokens: Value out of range: 1099511627776"),
    ("hi", {"max_token": 5}, TypeError, "unexpected keyword argument 'max_token' (generation"),
    ("hi", {"model": 5}, TypeError, "model: expected a str, got int"),
    ("hi", {"labels": {"team": 5}}, TypeError, "labels['team']: expected a str, got int"),
    ("hi", {"labels": {5: "x"}}, TypeError, "labels[5]: the key must be a str, got int"),
]


@pytest.mark.parametrize("case", MALFORMED_CALLS)
async def test_a_malformed_turn_or_parameter_is_named_before_any_call(
    upstream: FakeUpstream,
    gateway: RunningGateway,
    case: tuple[Any, dict[str, Any], type[Exception], str],
) -> None:
    """A turn that is no (role, content) pair nor a Message, or a parameter, model or label
    of the wrong type, is a TypeError (a ValueError for a value out of range) naming the
    argument, the turn's index or the label and what it takes, before any call, unary and
    streamed. Before, a string was unpacked as a pair (role 'j'), a 1-tuple raised
    IndexError, a dict KeyError, and `max_tokens="5"`, `model=5` or a label of 5 a
    TypeError from protobuf naming neither."""
    prompt, options, error, message = case
    options = {"model": FAKE_MODEL, **options}
    async with GatewayClient(gateway.server.address) as client:
        with pytest.raises(error) as unary:
            await client.complete(prompt, **options)
        with pytest.raises(error) as streamed:
            client.stream(prompt, **options)
    assert str(unary.value).startswith(message)
    assert str(streamed.value) == str(unary.value)
    assert upstream.requests == []


async def test_options_beside_a_ready_request_are_refused_not_dropped(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`complete(request, max_tokens=5)` with a ready CompleteRequest raises TypeError
    before any call, unary and streamed; before, the option was silently left out."""
    request = pb.CompleteRequest(model=FAKE_MODEL)
    request.messages.add(role=pb.ROLE_USER, content="Say hi")
    async with GatewayClient(gateway.server.address) as client:
        with pytest.raises(TypeError, match="max_tokens"):
            await client.complete(request, max_tokens=5)
        with pytest.raises(TypeError, match="model"):
            client.stream(request, model="other")
        assert (await client.complete(request)).content == "Hello from fake"
    assert len(upstream.requests) == 1


async def test_complete_and_stream_take_either_request_message(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`stream` takes a ready CompleteStreamRequest, the message its RPC takes, and
    `complete` and `stream` each take the other's too (the same fields), as Node's
    `complete` and `completeStream` do; options beside either are refused alike. Before,
    `stream(pb.CompleteStreamRequest(...))` (and `complete` of one) raised "TypeError:
    build_request() missing 1 required keyword-only argument: 'model'"."""
    turn = pb.Message(role=pb.ROLE_USER, content="Say hi")
    params = pb.GenerationParams(max_tokens=12)
    requests = [
        pb.CompleteStreamRequest(model=FAKE_MODEL, messages=[turn], params=params),
        pb.CompleteRequest(model=FAKE_MODEL, messages=[turn], params=params),
    ]
    async with GatewayClient(gateway.server.address) as client:
        for request in requests:
            assert "".join([text async for text in client.stream(request)]) == "Hello from fake"
            assert (await client.complete(request)).content == "Hello from fake"
            kind = type(request).__name__
            with pytest.raises(TypeError, match=f"max_tokens go into the {kind} itself"):
                client.stream(request, max_tokens=5)
            with pytest.raises(TypeError, match=f"max_tokens go into the {kind} itself"):
                await client.complete(request, max_tokens=5)
    assert [r.body["max_tokens"] for r in upstream.requests] == [12] * 4
    assert [r.body.get("stream", False) for r in upstream.requests] == [True, False] * 2


@pytest.fixture(scope="module")
def installed_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gateway_client as a wheel installs it: built like deploy/Dockerfile, then unpacked."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("service", "generated"):
        shutil.copytree(REPO / name, source / name)
    shutil.copytree(REPO / "clients", source / "clients", ignore=shutil.ignore_patterns("node"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist"), str(source)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    (wheel,) = (root / "dist").glob("llm_gateway-*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


INSTALLED_CLIENT_CALL = """
import asyncio, sys, time
import gateway_client
from gateway_client import GatewayClient, build_request, error_details
from llmgateway.v1 import gateway_pb2 as pb

assert gateway_client.__file__.startswith(sys.argv[2]), gateway_client.__file__

async def main():
    async with GatewayClient(sys.argv[1], timeout_s=15) as client:
        started = time.monotonic()
        answer = await client.complete("Say hi", model=sys.argv[3])
        print(answer.content, time.monotonic() - started)

asyncio.run(main())
"""


async def test_installed_client_waits_out_the_overload_pushback(
    installed_client: Path,
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Installed from the wheel, GatewayClient still installs the shipped retry policy.

    An overloaded gateway refuses with RESOURCE_EXHAUSTED and a pushback; the client's
    channel waits it out and succeeds once the slot frees up. The slot is held by a
    stream that lasts a minute until the gateway has shed the client's call, then
    cancelled: a slot held for a set time was free again, on a busy machine, before the
    client's Python had started, and so was one held by flow control alone (the stream's
    whole answer fit in the transport's buffers).
    """
    pushback_s = 0.5
    gateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            server={"max_in_flight_calls": 1, "overload_retry_after_s": pushback_s},
        )
    )
    upstream.script(Reply(content="x " * 600, chunks=600, chunk_delay_s=0.1))
    hold = gateway.stub.CompleteStream(chat_stream("hold the slot"))
    assert (await hold.read()).WhichOneof("event") == "delta"
    caplog.set_level(logging.DEBUG, logger="llm_gateway.rpc")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INSTALLED_CLIENT_CALL,
        gateway.server.address, str(installed_client), FAKE_MODEL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(installed_client)}, cwd=installed_client,
    )  # fmt: skip
    answered = asyncio.ensure_future(process.communicate())
    async with asyncio.timeout(30):
        while not any(getattr(r, "reason", None) == "OVERLOADED" for r in caplog.records):
            assert not answered.done(), "the client was answered without being shed"
            await asyncio.sleep(0.01)
    hold.cancel()  # the slot frees as the gateway ends the stream
    out, err = await asyncio.wait_for(answered, timeout=30)
    assert process.returncode == 0, err.decode()
    content, elapsed_s = out.decode().rsplit(" ", 1)
    assert content == "Hello from fake"
    assert float(elapsed_s) >= pushback_s


TYPED_USE = """
from gateway_client import GatewayClient
from llmgateway.v1 import gateway_pb2 as pb


async def ask(client: GatewayClient) -> pb.CompleteResponse:
    return await client.complete("Say hi", model="m")
"""


def test_installed_client_is_type_checked_by_its_users_mypy(
    installed_client: Path, tmp_path: Path
) -> None:
    """Installed from the wheel, the client and its messages carry their types (PEP 561's
    `py.typed`): before, mypy skipped both as untyped (`import-untyped` under `--strict`),
    and every answer was `Any`."""
    script = tmp_path / "use.py"
    script.write_text(TYPED_USE)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(installed_client)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout


async def test_a_long_prompt_still_waits_out_the_overload_pushback(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A prompt of 400 kB (100k tokens, well within a long-context model's window) is
    retried after the overload pushback as a short one is. Before, it was refused at the
    first RESOURCE_EXHAUSTED: gRPC retries only a call whose request fits its retry
    buffer, 256 KiB unless the channel says otherwise."""
    gateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            server={"max_in_flight_calls": 1, "overload_retry_after_s": 0.3},
            models=fake_model_window(1_000_000),
        )
    )
    upstream.script(Reply(content="hold the slot", chunks=2, chunk_delay_s=0.3))
    hold = gateway.stub.CompleteStream(chat_stream("hold the slot"))
    assert (await hold.read()).WhichOneof("event") == "delta"
    async with GatewayClient(gateway.server.address, timeout_s=15) as client:
        answer = await client.complete("word " * 80_000, model=FAKE_MODEL)
    while await hold.read() is not grpc.aio.EOF:
        pass
    assert answer.content == "Hello from fake"
    assert len(upstream.requests) == 2


async def test_a_request_past_the_gateways_message_limit_is_sent_once(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A prompt past the gateway's `server.max_receive_message_bytes` (4 MiB), which gRPC
    refuses RESOURCE_EXHAUSTED with no pushback, goes out once and fails at once. Before,
    the retry policy sent it five times: a 5 MiB prompt uploaded 25 MiB, over seconds of
    backoff, for the same refusal."""
    size = 5 * 1024 * 1024
    relay = CountingRelay(gateway.server.address)
    async with relay as address, GatewayClient(address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.complete("x" * size, model=FAKE_MODEL)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert relay.sent < 2 * size
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        pytest.param(
            Status(503, headers={"Retry-After": "60"}),
            "UPSTREAM_UNAVAILABLE",
            id="503-retry-after-past-the-deadline",
        ),
        pytest.param(Status(401), "UPSTREAM_AUTH", id="upstream-rejects-the-gateways-key"),
    ],
)
async def test_an_upstream_failure_no_retry_can_mend_is_not_retried_by_the_caller(
    upstream: FakeUpstream, start_gateway: StartGateway, refusal: Status, reason: str
) -> None:
    """UNAVAILABLE after the gateway's own retries, when the upstream's wait outlasts the
    deadline or its key is refused, reaches the caller at once: the shipped retry policy
    would otherwise send the call through the gateway up to four more times (here it
    would have succeeded against the provider's wish, as the fake answers again)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, resilience={"attempts": 1}))
    upstream.script(refusal)
    async with GatewayClient(gateway.server.address, timeout_s=20.0) as client:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi", model=FAKE_MODEL)
        elapsed_s = time.monotonic() - started
    details = error_details(refused.value)
    assert (details.code, details.reason) == ("UNAVAILABLE", reason)
    assert elapsed_s < 10  # not the policy's retries nor the 60 s wait: far past any load
    assert len(upstream.requests) == 1


async def test_a_summary_whose_upstream_rejects_the_gateways_key_is_not_retried_by_the_caller(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A Summarize part failing on a rejected upstream key ends the call with
    SUMMARIZE_PART_FAILED: as for Complete's UPSTREAM_AUTH, only an operator can mend
    it, so neither the summary's own part retries (`chunk_attempts`, 3 here) nor the
    shipped retry policy run it again (which then finds the upstream set aside and says
    only that none is available)."""
    config = gateway_config(
        upstream.base_url, resilience={"attempts": 1}, summarize={"chunk_attempts": 3}
    )
    gateway = await start_gateway(config)
    upstream.script(Status(401))
    async with GatewayClient(gateway.server.address, timeout_s=3.0) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.summarize("A short document to summarise.", model=FAKE_MODEL)
    details = error_details(refused.value)
    assert (details.code, details.reason) == ("UNAVAILABLE", "SUMMARIZE_PART_FAILED")
    # The first call's own cause, not a retry's "no upstream is available".
    assert "rejected the gateway's key" in details.message
    assert len(upstream.requests) == 1


async def test_the_caller_retries_an_unavailable_upstream_after_the_wait_it_asked_for(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A 503 whose Retry-After fits in the deadline: the client's retry waits that long,
    not its own 0.2 s backoff, and the retried call succeeds."""
    gateway = await start_gateway(gateway_config(upstream.base_url, resilience={"attempts": 1}))
    upstream.script(Status(503, headers={"Retry-After": "1"}))
    async with GatewayClient(gateway.server.address, timeout_s=10.0) as client:
        started = time.monotonic()
        answer = await client.complete("Say hi", model=FAKE_MODEL)
        elapsed_s = time.monotonic() - started
    assert answer.content == "Hello from fake"
    assert elapsed_s >= 1.0
    assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    ("sections", "refusal", "reason"),
    [
        pytest.param(
            # The first call costs more than this: the budget is spent until tomorrow.
            {"budgets": {"default": {"usd": 0.000002, "period": "day"}}},
            Reply(),  # never asked for
            "QUOTA_EXCEEDED",
            id="budget-spent-until-tomorrow",
        ),
        pytest.param(
            {"resilience": {"attempts": 1}},
            Status(429, headers={"Retry-After": "60"}),
            "UPSTREAM_RATE_LIMITED",
            id="upstream-429-retry-after-60s",
        ),
    ],
)
async def test_a_refusal_the_deadline_cannot_wait_out_arrives_at_once(
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    sections: dict[str, Any],
    refusal: Reply | Status,
    reason: str,
) -> None:
    """A RESOURCE_EXHAUSTED whose wait outlasts the call's deadline reaches the caller
    at once, with its details, rather than the retry policy sitting out the pushback
    until a bare DEADLINE_EXCEEDED."""
    gateway = await start_gateway(gateway_config(upstream.base_url, **sections))
    upstream.script(Reply(), refusal)
    deadline_s = 20.0  # short of every refusal's wait; half of it is past any load
    async with GatewayClient(gateway.server.address, timeout_s=deadline_s) as client:
        await client.complete("Say hi", model=FAKE_MODEL)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi again", model=FAKE_MODEL)
        elapsed_s = time.monotonic() - started
    details = error_details(refused.value)
    assert (details.code, details.reason) == ("RESOURCE_EXHAUSTED", reason)
    assert details.retry_after_s is not None
    assert details.retry_after_s > deadline_s
    assert elapsed_s < deadline_s / 2
    # The second call reached the upstream only when the upstream refused it, and once.
    assert len(upstream.requests) == (2 if isinstance(refusal, Status) else 1)


async def stores_settled(gateway: RunningGateway) -> None:
    """Wait until the gateway's cache holds what the last call stored."""
    assert gateway.server.pipeline is not None
    cache = gateway.server.pipeline.cache
    assert cache is not None
    async with asyncio.timeout(5):
        while cache.in_flight:
            await asyncio.sleep(0.005)


async def test_the_cache_policy_is_set_by_name_or_as_given(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`cache="bypass"` goes upstream despite a stored answer, unary and streamed;
    `cache="default"` caches a sampled request, which by default is not; a
    `pb.CachePolicy` is taken as given, and an unknown name is a ValueError before any
    call."""
    async with GatewayClient(gateway.server.address) as client:
        await client.complete("Say hi", model=FAKE_MODEL, temperature=0)
        await stores_settled(gateway)
        bypassed = await client.complete("Say hi", model=FAKE_MODEL, temperature=0, cache="bypass")
        stream = client.stream("Say hi", model=FAKE_MODEL, temperature=0, cache="bypass")
        assert "".join([text async for text in stream]) == "Hello from fake"
        policy = pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)
        given = await client.complete("Say hi", model=FAKE_MODEL, temperature=0, cache=policy)
        assert len(upstream.requests) == 4
        assert not bypassed.metadata.cache_hit
        assert stream.final is not None
        assert not stream.final.cache_hit
        assert not given.metadata.cache_hit

        await client.complete("Sampled", model=FAKE_MODEL, cache="default")
        await stores_settled(gateway)
        again = await client.complete("Sampled", model=FAKE_MODEL, cache="default")
        assert again.metadata.cache_hit
        assert len(upstream.requests) == 5

        with pytest.raises(ValueError, match="bypass"):
            await client.complete("Say hi", model=FAKE_MODEL, cache="skip")
    assert len(upstream.requests) == 5


async def test_a_cache_ttl_shortens_how_long_the_answer_is_served(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`cache_ttl_s=1`: the answer is a hit at once and gone a little later (the default
    TTL is an hour)."""
    async with GatewayClient(gateway.server.address) as client:
        await client.complete("Say hi", model=FAKE_MODEL, temperature=0, cache_ttl_s=1)
        await stores_settled(gateway)
        hit = await client.complete("Say hi", model=FAKE_MODEL, temperature=0)
        assert hit.metadata.cache_hit
        async with asyncio.timeout(10):
            while True:
                read = await client.complete(
                    "Say hi", model=FAKE_MODEL, temperature=0, cache="no_store"
                )
                if not read.metadata.cache_hit:
                    break
                await asyncio.sleep(0.05)
    assert len(upstream.requests) == 2


async def test_truncation_by_name_drops_the_oldest_turns(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`truncation="keep_recent"` sends the system message and the newest turns that fit
    a small window; `truncation="none"` refuses, even where the gateway's default is
    keep_recent."""
    window = {"context_window": 1024, "input_usd_per_million": 0.1, "output_usd_per_million": 0.1}
    gateway = await start_gateway(
        gateway_config(
            upstream.base_url,
            models={FAKE_MODEL: window},
            defaults={"truncation": "keep_recent"},
        )
    )
    turns: list[tuple[str, str]] = [("system", "Be terse.")]
    turns += [
        ("user" if i % 2 == 0 else "assistant", f"turn{i} " + "word " * 100) for i in range(15)
    ]
    async with GatewayClient(gateway.server.address) as client:
        answer = await client.complete(
            turns, model=FAKE_MODEL, max_tokens=100, truncation="keep_recent"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete(turns, model=FAKE_MODEL, max_tokens=100, truncation="none")
        with pytest.raises(ValueError, match="keep_recent"):
            await client.complete(turns, model=FAKE_MODEL, truncation="drop_oldest")
    sent = upstream.requests[0].body["messages"]
    assert sent[0] == {"role": "system", "content": "Be terse."}
    assert sent[-1]["content"].startswith("turn14 ")
    assert answer.metadata.dropped_messages == 16 - len(sent) > 0
    assert error_details(refused.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream.requests) == 1


async def test_the_idempotency_key_goes_with_every_upstream_attempt(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`idempotency_key` reaches the upstream, scoped to the tenant, on the first attempt
    and on the gateway's retry of it, unary and streamed, and with a batch item built by
    `build_request`."""
    upstream.script(Status(500), Reply(), Status(500), Reply(), Reply())
    async with GatewayClient(gateway.server.address) as client:
        await client.complete("Say hi", model=FAKE_MODEL, idempotency_key="order-7")
        stream = client.stream("Say hi", model=FAKE_MODEL, idempotency_key="order-8")
        assert "".join([text async for text in stream]) == "Hello from fake"
        item = pb.BatchItem(
            id="a", request=build_request("Say hi", model=FAKE_MODEL, idempotency_key="order-9")
        )
        results = [event async for event in client.complete_batch([item])]
        assert results[0].result.response.content == "Hello from fake"
    sent = [r.headers.get("idempotency-key") for r in upstream.requests]
    assert sent == [
        upstream_idempotency_key("default", key)
        for key in ("order-7", "order-7", "order-8", "order-8", "order-9")
    ]


async def test_status_details_reads_a_batch_items_error(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A failed batch item's error is a `google.rpc.Status`, not a failed call:
    `status_details` reads it as `error_details` reads a call's, its code's name, its
    reason and domain, and its field violations. Before, a caller unpacked it by hand."""
    upstream.script(Status(500), Status(500), Status(500))
    async with GatewayClient(gateway.server.address) as client:
        bad = build_request("Say hi", model=FAKE_MODEL)
        bad.params.temperature = 5.0
        items = [
            pb.BatchItem(id="bad", request=bad),
            pb.BatchItem(id="failing", request=build_request("Say hi", model=FAKE_MODEL)),
        ]
        results = {
            event.result.id: event.result
            async for event in client.complete_batch(items, concurrency=1)
            if event.HasField("result")
        }
    invalid = status_details(results["bad"].error)
    assert invalid.code == "INVALID_ARGUMENT"
    assert [name for name, _ in invalid.field_violations] == ["params.temperature"]
    failed = status_details(results["failing"].error)
    assert (failed.code, failed.domain) == ("UNAVAILABLE", "llmgateway.v1")
    assert failed.reason == "UPSTREAM_UNAVAILABLE"


async def test_the_complete_command_takes_a_cache_mode_and_ttl(
    upstream: FakeUpstream, gateway: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-gateway complete --cache bypass` asks the upstream again for an answer the
    cache holds; `--cache-ttl-s` bounds how long the one it stores is served."""
    parser = argparse.ArgumentParser()
    complete.register(parser.add_subparsers())
    base = ["complete", "Say hi", "--model", FAKE_MODEL, "--temperature", "0"]
    base += ["--address", gateway.server.address]

    async def run(*options: str) -> str:
        assert await complete.complete_command(parser.parse_args([*base, *options])) == 0
        return capsys.readouterr().err

    assert "cache hit" not in await run("--cache-ttl-s", "1")
    await stores_settled(gateway)
    assert "cache hit" not in await run("--cache", "bypass")
    assert "cache hit" in await run()
    assert len(upstream.requests) == 2
    async with asyncio.timeout(10):
        while "cache hit" in await run("--cache", "no_store"):
            await asyncio.sleep(0.05)
    assert len(upstream.requests) == 3
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--cache", "skip"])


async def test_a_long_retry_delay_is_described_in_plain_seconds(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A budget spent until midnight UTC, hours away, is described (as `llm-gateway
    complete` prints it) with the `RetryInfo` delay to the millisecond, in plain seconds.
    Before, `.3g` printed three digits in scientific notation: `retry after 5.46e+03s`."""
    budgets = {"*": {"usd": 0.000003, "period": "day"}}
    gateway = await start_gateway(gateway_config(upstream.base_url, budgets=budgets))
    async with GatewayClient(gateway.server.address) as client:
        # The first call fits; what it spent leaves too little for a second, until the
        # period resets (a call over the whole budget would be told it can never fit).
        await client.complete("Say hi", model=FAKE_MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi", model=FAKE_MODEL)
    details = error_details(refused.value)
    assert details.reason == "QUOTA_EXCEEDED"
    assert details.retry_after_s is not None
    (line,) = [line for line in details.describe().splitlines() if "retry after" in line]
    assert "e+" not in line
    seconds = float(line.removeprefix("  retry after ").removesuffix("s"))
    assert seconds == pytest.approx(details.retry_after_s, abs=0.001)
    assert len(upstream.requests) == 1


async def test_error_details_tell_the_domain_and_whether_another_replica_may_take_it(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`error_details` gives ErrorInfo's domain, which the README says to match with the
    reason, and the `llm-gateway-retry-elsewhere` trailer of a refusal this replica alone
    makes (overloaded), not of one every replica would make (an unknown model), as the
    Node client's `GatewayCallError` does. Before, both were left out: a caller had to
    decode the trailers itself to tell them."""
    config = gateway_config(
        upstream.base_url, server={"max_in_flight_calls": 1, "overload_retry_after_s": 0.05}
    )
    gateway = await start_gateway(config)
    async with GatewayClient(gateway.server.address, timeout_s=10) as client:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.complete("Say hi", model="no-such-model")
        upstream.script(Hang())
        hold = gateway.stub.Complete(chat("hold the slot"))
        try:
            async with asyncio.timeout(10):
                while not upstream.requests:
                    await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as overloaded:
                await client.complete("Say hi", model=FAKE_MODEL)
        finally:
            hold.cancel()
    details = error_details(overloaded.value)
    assert (details.domain, details.reason) == ("llmgateway.v1", "OVERLOADED")
    assert details.retry_elsewhere
    details = error_details(unknown.value)
    assert (details.domain, details.reason) == ("llmgateway.v1", "MODEL_NOT_FOUND")
    assert not details.retry_elsewhere


async def test_a_details_trailer_that_is_no_status_leaves_the_calls_code_and_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A call failed with a `grpc-status-details-bin` trailer that does not decode (a
    proxy's garbage) gives `error_details` with its code and message and no details, from
    `complete` and a stream, and `llm-gateway complete` prints them, as the Node client
    does. Before, protobuf's DecodeError escaped from `error_details`, and the command
    ended in its traceback."""
    parser = argparse.ArgumentParser()
    complete.register(parser.add_subparsers())
    async with garbled_details_server() as address, GatewayClient(address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await client.complete("Say hi", model=FAKE_MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in client.stream("Say hi", model=FAKE_MODEL):
                pass
        argv = ["complete", "Say hi", "--model", FAKE_MODEL, "--address", address]
        assert await complete.complete_command(parser.parse_args(argv)) == 1
    for error in (unary.value, streamed.value):
        assert error_details(error) == ErrorDetails(code="INVALID_ARGUMENT", message="refused")
    assert capsys.readouterr().err == "INVALID_ARGUMENT: refused\n"


# A details trailer `error_details` cannot read: one that is no `google.rpc.Status`, and
# one of another code than the call's (as when its deadline passed as the gateway sent it).
UNREAD_DETAILS = [
    GARBLED_DETAILS,
    status_pb2.Status(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0]).SerializeToString(),
]


@pytest.mark.parametrize("details", UNREAD_DETAILS, ids=["garbled", "other-code"])
async def test_the_retry_elsewhere_trailer_is_read_beside_details_that_are_not(
    details: bytes,
) -> None:
    """A call failed with `llm-gateway-retry-elsewhere: true` beside a details trailer
    `error_details` cannot read gives `retry_elsewhere`, as the Node client's
    `retryElsewhere`, read from the trailers alone, does. Before, it was read only with
    details that decoded: a caller was told to wait for this replica instead."""
    trailers = ((RETRY_ELSEWHERE_TRAILER, "true"),)
    async with (
        garbled_details_server(details, trailers) as address,
        GatewayClient(address) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi", model=FAKE_MODEL)
    expected = ErrorDetails(code="INVALID_ARGUMENT", message="refused", retry_elsewhere=True)
    assert error_details(refused.value) == expected


async def test_details_whose_message_a_proxy_rewrote_are_still_read() -> None:
    """A call failed with a details trailer of its own code but another message than the
    call's (a proxy on the way rewrote the message) gives the trailer's RetryInfo and
    ErrorInfo, with the call's own message, from `complete` and a stream, as the Node
    client, which checks the code alone, does. Before, grpc_status refused the trailer
    (ValueError) and the details were dropped: a caller lost the wait it was asked for."""
    info, retry = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="llmgateway.v1"))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=7)))
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="the gateway's own words, which the proxy replaced",
        details=[info, retry],
    )
    async with (
        garbled_details_server(status.SerializeToString()) as address,
        GatewayClient(address) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await client.complete("Say hi", model=FAKE_MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in client.stream("Say hi", model=FAKE_MODEL):
                pass
    expected = ErrorDetails(
        code="INVALID_ARGUMENT",
        message="refused",
        reason="RATE_LIMITED",
        domain="llmgateway.v1",
        retry_after_s=7.0,
    )
    for error in (unary.value, streamed.value):
        assert error.details() == "refused"
        assert error_details(error) == expected


async def test_a_detail_that_does_not_decode_is_left_out_and_the_others_kept() -> None:
    """A `google.rpc.Status` one of whose details does not decode as the type its URL
    names (a BadRequest of garbled bytes) gives the other details, from `error_details`
    and from `status_details` (a batch item's error), and that one's type URL in
    `unknown_type_urls`. Before, the DecodeError of that one escaped, and the whole error
    went undescribed."""
    garbled = any_pb2.Any(
        type_url="type.googleapis.com/google.rpc.BadRequest", value=GARBLED_DETAILS
    )
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="REFUSED", domain="example.com"))
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="refused", details=[garbled, info]
    )
    async with (
        garbled_details_server(status.SerializeToString()) as address,
        GatewayClient(address) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi", model=FAKE_MODEL)
    expected = ErrorDetails(
        code="INVALID_ARGUMENT",
        message="refused",
        reason="REFUSED",
        domain="example.com",
        unknown_type_urls=("type.googleapis.com/google.rpc.BadRequest",),
    )
    assert error_details(refused.value) == expected
    assert status_details(status) == expected


async def test_a_detail_of_a_type_the_client_does_not_know_is_kept_by_its_type_url(
    upstream: FakeUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's error carrying a detail this client does not decode (a newer gateway's
    `LocalizedMessage`) and one whose bytes are not its type's: `error_details` and
    `status_details` give their type URLs in `unknown_type_urls`, in order, beside the
    details they know, and `describe` names them, as the Node client's `unknownTypeUrls`
    does. Before, both were dropped without a word."""

    def with_unknown_details(exc: BaseException) -> status_pb2.Status:
        status = to_rpc_status(exc)
        localized = any_pb2.Any()
        localized.Pack(error_details_pb2.LocalizedMessage(locale="fr-FR", message="inconnu"))
        garbled = any_pb2.Any(type_url=_QUOTA_FAILURE_URL, value=GARBLED_DETAILS)
        status.details.extend([localized, garbled])
        return status

    monkeypatch.setattr(rpc_boundary, "to_rpc_status", with_unknown_details)
    gateway = await start_gateway(gateway_config(upstream.base_url))
    async with GatewayClient(gateway.server.address, timeout_s=10) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete("Say hi", model="no-such-model")
    unknown = ("type.googleapis.com/google.rpc.LocalizedMessage", _QUOTA_FAILURE_URL)
    details = error_details(refused.value)
    assert (details.code, details.reason, details.unknown_type_urls) == (
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
        unknown,
    )
    assert status_details(rich_status(refused.value)).unknown_type_urls == unknown
    assert details.describe().splitlines()[-2:] == [f"  undecoded detail {url}" for url in unknown]


async def test_a_stream_cut_after_text_ends_its_line_before_the_error(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`complete --stream` cut after some text ends that text's line on stdout, as a whole
    answer's is, so that on a terminal the status starts a line of its own. Before, it
    ran on from the last word: `a bUNAVAILABLE: upstream 'up0' dropped the connection`."""
    upstream.script(CutStream(after_chunks=2))
    argv = ["complete", "Say hi", "--stream", "--model", FAKE_MODEL]
    command = [sys.executable, "-m", "gateway_client.cli", *argv]
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, "LLM_GATEWAY_ADDRESS": gateway.server.address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 1
    assert out.decode() == "a b\n"
    assert err.decode().startswith("UNAVAILABLE: ")


def stdin_of(data: bytes, errors: str) -> io.TextIOWrapper:
    """Standard input holding `data`, decoded as Python decodes it in a UTF-8 locale
    ("strict") or in the C locale ("surrogateescape")."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
async def test_the_complete_command_reads_a_prompt_that_is_not_utf8_from_stdin(
    upstream: FakeUpstream,
    gateway: RunningGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    errors: str,
) -> None:
    """`complete -` takes standard input as `summarize FILE` and `batch` take their files:
    bytes that are not UTF-8 become U+FFFD. Before, it ended with a UnicodeDecodeError
    traceback (or, in the C locale, a UnicodeEncodeError building the request)."""
    monkeypatch.setattr(sys, "stdin", stdin_of(b"Caf\xe9 ol\xe9", errors))
    parser = argparse.ArgumentParser()
    complete.register(parser.add_subparsers())
    argv = ["complete", "-", "--model", FAKE_MODEL, "--address", gateway.server.address]
    assert await complete.complete_command(parser.parse_args(argv)) == 0
    assert capsys.readouterr().out == "Hello from fake\n"
    assert upstream.requests[0].body["messages"][-1]["content"] == "Caf\ufffd ol\ufffd"


async def test_the_complete_command_reads_windows_line_ends_from_stdin_as_newlines(
    upstream: FakeUpstream,
    gateway: RunningGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`complete -` sends a piped prompt's CRLF (or lone CR) line ends as `\\n`, as a file
    is read, so the same text is the same request (one cache key) however it came.
    Before, each `\\r` went upstream."""
    monkeypatch.setattr(sys, "stdin", stdin_of(b"Line one\r\nLine two\rEnd\r\n", "strict"))
    parser = argparse.ArgumentParser()
    complete.register(parser.add_subparsers())
    argv = ["complete", "-", "--model", FAKE_MODEL, "--address", gateway.server.address]
    assert await complete.complete_command(parser.parse_args(argv)) == 0
    assert capsys.readouterr().out == "Hello from fake\n"
    assert upstream.requests[0].body["messages"][-1]["content"] == "Line one\nLine two\nEnd\n"


async def test_the_complete_command_takes_arguments_that_are_not_utf8(
    upstream: FakeUpstream, gateway: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prompt, system message or label given as an argument in Latin-1 (which Python
    holds as lone surrogates) is sent with U+FFFD in place, as standard input is.
    Before, building the request ended the command with a UnicodeEncodeError traceback."""
    latin1 = b"Caf\xe9".decode("utf-8", "surrogateescape")  # as Python reads argv
    parser = argparse.ArgumentParser()
    complete.register(parser.add_subparsers())
    argv = ["complete", latin1, "--system", latin1, "--label", f"team={latin1}"]
    argv += ["--model", FAKE_MODEL, "--address", gateway.server.address]
    assert await complete.complete_command(parser.parse_args(argv)) == 0
    assert capsys.readouterr().out == "Hello from fake\n"
    messages = upstream.requests[0].body["messages"]
    assert [m["content"] for m in messages] == ["Caf\ufffd", "Caf\ufffd"]


async def test_a_streamed_answer_piped_into_a_reader_that_leaves_ends_quietly(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`llm-gateway complete --stream ... | head -c 5`: when the reader of stdout goes
    away, the command stops the call (the gateway closes the upstream request) and exits
    141, as a process SIGPIPE ends, with no traceback. Before, it died of an uncaught
    BrokenPipeError, printing its traceback."""
    upstream.script(Reply(content="word " * 40, chunks=40, chunk_delay_s=0.1))
    command = [sys.executable, "-m", "gateway_client.cli", "complete", "Say hi", "--stream"]
    command += ["--address", gateway.server.address, "--model", FAKE_MODEL]
    reader, writer = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=writer, stderr=asyncio.subprocess.PIPE
        )
    finally:
        os.close(writer)
    try:
        assert await asyncio.to_thread(os.read, reader, 4) == b"word"
    finally:
        os.close(reader)  # the reader leaves, as `head` does
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b"Traceback" not in stderr
    assert process.returncode == 141
    await upstream.wait_for_disconnect(timeout_s=10)


@pytest.mark.parametrize(
    "arguments",
    [
        ["complete", "Say hi"],
        ["complete", "Say hi", "--stream"],
        ["batch", "-", "-o", "-"],
        ["models"],
        ["usage"],
    ],
    ids=["complete", "stream", "batch", "models", "usage"],
)
async def test_a_closed_stdout_is_one_line_and_exit_1_before_any_call(
    upstream: FakeUpstream, gateway: RunningGateway, arguments: list[str]
) -> None:
    """`llm-gateway complete ... >&-`: one line saying standard output is closed, exit
    status 1, and no call. Before, Python set up no stdout and print() wrote nowhere: a
    unary answer, paid for, was lost with exit 0 (`models` and `usage` alike), and a
    stream or `batch -o -` ended in a traceback after its call."""
    command = [sys.executable, "-m", "gateway_client.cli", *arguments]
    command += ["--address", gateway.server.address]
    if arguments[0] in ("complete", "batch"):
        command += ["--model", FAKE_MODEL]
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$@" >&-', "sh", *command,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    item = json.dumps({"id": "q1", "prompt": "Say hi"}) + "\n"
    _, stderr = await asyncio.wait_for(process.communicate(item.encode()), timeout=30)
    assert stderr.decode().splitlines() == [
        f"llm-gateway {arguments[0]}: cannot write: standard output is closed"
    ]
    assert process.returncode == 1
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["complete", "Say hi"], "Hello from fake\n"),
        (["complete", "Say hi", "--stream"], "Hello from fake\n"),
        (["batch", "-", "-o", "-", "--no-progress"], '{"id": "q1", "line": 1, "content": "Hello'),
    ],
    ids=["complete", "stream", "batch"],
)
async def test_a_closed_stderr_leaves_stdout_the_result_alone(
    upstream: FakeUpstream, gateway: RunningGateway, arguments: list[str], expected: str
) -> None:
    """`answer=$(llm-gateway complete ... 2>&-)`: stdout holds the answer alone, exit 0.
    Before, Python set up no stderr and print(file=sys.stderr) wrote to stdout: the usage
    line joined the answer, and `batch -o -` died on its progress bar, exit 1, no result."""
    command = [sys.executable, "-m", "gateway_client.cli", *arguments]
    command += ["--address", gateway.server.address, "--model", FAKE_MODEL]
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$@" 2>&-', "sh", *command,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    item = json.dumps({"id": "q1", "prompt": "Say hi"}) + "\n"
    stdout, _ = await asyncio.wait_for(process.communicate(item.encode()), timeout=30)
    assert process.returncode == 0
    if arguments[0] == "batch":
        assert stdout.decode().startswith(expected)
        assert stdout.decode().count("\n") == 1
    else:
        assert stdout.decode() == expected


def block_buffered_environ() -> dict[str, str]:
    """The environment, less `PYTHONUNBUFFERED` (set on some CI machines): a user's
    shell has none, and Python buffers a stdout that is no terminal in blocks."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


# Each command that prints its result on stdout, `llm-gateway` and its arguments but the
# address (`summarize` reads the file `doc.txt` in its working directory).
PRINTING_COMMANDS = {
    "complete": ["complete", "Say hi", "--model", FAKE_MODEL],
    "stream": ["complete", "Say hi", "--stream", "--model", FAKE_MODEL],
    "summarize": ["summarize", "doc.txt", "--model", FAKE_MODEL],
    "models": ["models"],
    "usage": ["usage"],
}


async def run_printing_command(
    gateway: RunningGateway, tmp_path: Path, name: str, *, stdout: int, stderr: int
) -> tuple[int, bytes, bytes]:
    """`PRINTING_COMMANDS[name]` run on `gateway` as a user's shell runs it (stdout
    block-buffered), its stdout and stderr given: its status, and what it wrote to the
    pipes asked for."""
    (tmp_path / "doc.txt").write_text("A short document.\n")
    command = [sys.executable, "-m", "gateway_client.cli", *PRINTING_COMMANDS[name]]
    command += ["--address", gateway.server.address]
    process = await asyncio.create_subprocess_exec(
        *command, env=block_buffered_environ(), cwd=tmp_path, stdout=stdout, stderr=stderr
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out or b"", err or b""


@pytest.mark.parametrize("name", PRINTING_COMMANDS)
async def test_an_answer_stdout_cannot_take_is_one_line_and_exit_1(
    upstream: FakeUpstream, gateway: RunningGateway, tmp_path: Path, name: str
) -> None:
    """`llm-gateway complete ... > file` on a full disk: one line saying so, exit status 1.
    Before, the command died of an uncaught OSError, printing its traceback; later, with
    stdout buffered in blocks (no `PYTHONUNBUFFERED`), a unary answer, `models`, `usage`
    and `summarize` failed only at Python's exit: "Exception ignored", status 120."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        status, _, err = await run_printing_command(
            gateway, tmp_path, name, stdout=full, stderr=subprocess.PIPE
        )
    finally:
        os.close(full)
    command = PRINTING_COMMANDS[name][0]
    assert err.decode().splitlines()[-1:] == [
        f"llm-gateway {command}: cannot write: No space left on device"
    ]
    assert "Exception ignored" not in err.decode()
    assert status == 1


@pytest.mark.parametrize("name", PRINTING_COMMANDS)
async def test_a_result_whose_reader_has_left_is_status_141(
    upstream: FakeUpstream, gateway: RunningGateway, tmp_path: Path, name: str
) -> None:
    """`llm-gateway models | head -0` (a reader gone before the result is written): status
    141, as a process SIGPIPE ends, and nothing on stderr. Before, with stdout buffered in
    blocks, every command but a stream wrote its result only at Python's exit, where the
    broken pipe was "Exception ignored ... BrokenPipeError", status 120."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        status, _, err = await run_printing_command(
            gateway, tmp_path, name, stdout=writer, stderr=subprocess.PIPE
        )
    finally:
        os.close(writer)
    assert (status, err.decode()) == (141, "")


@pytest.mark.parametrize("name", ["complete", "stream", "summarize"])
async def test_the_answer_comes_before_its_usage_line_in_one_log(
    upstream: FakeUpstream, gateway: RunningGateway, tmp_path: Path, name: str
) -> None:
    """`llm-gateway complete ... 2>&1 | tee log`: the answer's line, then the usage line
    describing it. Before, stdout buffered in blocks was written at Python's exit: the
    usage line came first (a unary answer, a summary), or ran on from a stream's last
    word, whose line break followed it."""
    status, out, _ = await run_printing_command(
        gateway, tmp_path, name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert status == 0
    answer, usage = out.decode().splitlines()
    assert answer == "Hello from fake"
    assert usage.startswith("[fake-model")


async def run_cli(
    gateway: RunningGateway, *arguments: str, env: dict[str, str] | None = None, **streams: Any
) -> tuple[int, str, str]:
    """`llm-gateway ARGUMENTS --address GATEWAY --model fake-model` run as its own process,
    `env` added to its environment: its exit status, stdout and stderr (as UTF-8; what a
    pipe other than stdout and stderr was given instead is read as empty)."""
    command = [sys.executable, "-m", "gateway_client.cli", *arguments]
    command += ["--address", gateway.server.address, "--model", FAKE_MODEL]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
    process = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE, **pipes
    )
    item = json.dumps({"id": "q1", "prompt": "Say hi"}) + "\n"
    out, err = await asyncio.wait_for(process.communicate(item.encode()), timeout=30)
    assert process.returncode is not None
    return process.returncode, (out or b"").decode(), (err or b"").decode()


REASONING_REPLY = Reply(content="Paris.", reasoning="hmm, France", reasoning_tokens=2)
USAGE_WITH_REASONING = "[fake-model via up0] tokens in=7 out=3 reasoning=2 cost=$"


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["unary", "stream"])
async def test_show_reasoning_writes_the_reasoning_to_stderr_before_the_answer(
    upstream: FakeUpstream, gateway: RunningGateway, stream: list[str]
) -> None:
    """`complete --show-reasoning`: the reasoning, then a blank line, on stderr; stdout the
    answer alone; the usage line counts the reasoning tokens. Before, the reasoning and
    its count were shown nowhere."""
    upstream.script(REASONING_REPLY)
    status, out, err = await run_cli(gateway, "complete", "Say hi", "--show-reasoning", *stream)
    assert (status, out) == (0, "Paris.\n")
    reasoning, blank, usage, end = err.split("\n")
    assert (reasoning, blank, end) == ("hmm, France", "", "")
    assert usage.startswith(USAGE_WITH_REASONING)


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["unary", "stream"])
async def test_without_show_reasoning_the_reasoning_stays_unshown(
    upstream: FakeUpstream, gateway: RunningGateway, stream: list[str]
) -> None:
    """Without `--show-reasoning`, a reasoning model's answer prints as any other's: the
    answer, and one usage line with no reasoning count."""
    upstream.script(REASONING_REPLY)
    status, out, err = await run_cli(gateway, "complete", "Say hi", *stream)
    assert (status, out) == (0, "Paris.\n")
    (usage,) = err.splitlines()
    assert usage.startswith("[fake-model via up0] tokens in=7 out=3 cost=$")


async def test_a_stream_cut_after_its_reasoning_shows_the_reasoning_then_the_error(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`complete --stream --show-reasoning` writes each piece of reasoning as it arrives:
    a stream cut after its reasoning, before any text, shows that reasoning, a blank line,
    then the error, with nothing on stdout."""
    upstream.script(replace(REASONING_REPLY, cut_after_events=4))  # role, 3 reasoning pieces
    argv = ["complete", "Say hi", "--stream", "--show-reasoning"]
    status, out, err = await run_cli(gateway, *argv)
    assert (status, out) == (1, "")
    assert err.startswith("hmm, France\n\nUNAVAILABLE: ")


@pytest.mark.parametrize(
    ("no_color", "reasoning"),
    [("", "\x1b[2mhmm, France\x1b[22m\r\n\r\n"), ("1", "hmm, France\r\n\r\n")],
    ids=["dim", "NO_COLOR"],
)
async def test_reasoning_shown_on_a_terminal_is_dim(
    upstream: FakeUpstream, gateway: RunningGateway, no_color: str, reasoning: str
) -> None:
    """On a terminal the reasoning is dim (each piece on its own, so that a Ctrl-C cannot
    leave the terminal dim), unless `$NO_COLOR` is set; the answer is not."""
    upstream.script(REASONING_REPLY)
    terminal, stderr = os.openpty()
    try:
        argv = ["complete", "Say hi", "--stream", "--show-reasoning"]
        status, out, _ = await run_cli(gateway, *argv, env={"NO_COLOR": no_color}, stderr=stderr)
    finally:
        os.close(stderr)
    try:
        written = os.read(terminal, 4096).decode()
    finally:
        os.close(terminal)
    assert (status, out) == (0, "Paris.\n")
    # The gateway may relay the three pieces as fewer: each one sent is wrapped on its own.
    assert written.replace("\x1b[22m\x1b[2m", "").startswith(reasoning)
    assert written.count("\x1b") == (0 if no_color else 2 * written.count("\x1b[2m"))
    assert USAGE_WITH_REASONING in written


async def test_the_complete_timeout_is_the_calls_deadline(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`complete --timeout 0.5` against an upstream that never answers ends in
    DEADLINE_EXCEEDED, exit 1. Before, the option was refused (exit 2), and a call had
    the client's fixed 300 s however long a reasoning model would stream."""
    upstream.script(Hang())
    status, out, err = await run_cli(gateway, "complete", "Say hi", "--timeout", "0.5")
    assert (status, out) == (1, "")
    assert err.startswith("DEADLINE_EXCEEDED: ")


NON_ASCII_ANSWER = "Caf\u00e9 \u2014 ol\u00e9"


@pytest.mark.parametrize(
    ("arguments", "env"),
    [
        (["complete", "Say hi"], {"PYTHONIOENCODING": "ascii"}),
        (["complete", "Say hi", "--stream"], {"PYTHONIOENCODING": "ascii"}),
        (["complete", "Say hi"], {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}),
    ],
    ids=["ascii", "ascii-stream", "C-locale"],
)
async def test_an_answer_stdouts_encoding_lacks_is_written_escaped(
    upstream: FakeUpstream, gateway: RunningGateway, arguments: list[str], env: dict[str, str]
) -> None:
    """A stdout that cannot encode the answer (`PYTHONIOENCODING=ascii`, the C locale
    without UTF-8 mode) gets the characters it lacks as backslash escapes, exit 0. Before,
    the command ended in a UnicodeEncodeError traceback after the call was paid for."""
    upstream.script(Reply(content=NON_ASCII_ANSWER))
    status, out, err = await run_cli(gateway, *arguments, env=env)
    assert (status, out) == (0, "Caf\\xe9 \\u2014 ol\\xe9\n")
    assert err.startswith("[fake-model via up0] ")


async def test_batch_results_on_an_ascii_stdout_are_json_still(
    upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`batch -o -` on a stdout that cannot encode the answer writes JSON's own escapes
    (`\\u00e9`), not Python's (`\\xe9`, which no JSON reader takes)."""
    upstream.script(Reply(content=NON_ASCII_ANSWER))
    argv = ["batch", "-", "-o", "-", "--no-progress"]
    status, out, _ = await run_cli(gateway, *argv, env={"PYTHONIOENCODING": "ascii"})
    assert status == 0
    assert json.loads(out)["content"] == NON_ASCII_ANSWER
