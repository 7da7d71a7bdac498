"""What a call its caller cuts before the answer records in the usage ledger.

Once the upstream has the whole request it bills the prompt, answer or not: a call the
caller cancels (or its deadline cuts) after that is recorded once, for its tenant, with
the prompt's estimate as input and no output. A call cut before its request went out
(waiting for the upstream's limiter or a connection) records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.domain import Message, Role
from service.tokens import estimate_prompt_tokens
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream, Hang, Reply, Status
from tests.integration.helpers import rich_status
from tests.integration.pki import make_pki
from tests.integration.test_cache import eventually
from tests.integration.test_resilience import checked_out_connections, dataclass_replace_upstream
from tests.integration.test_stream_charges import PRICED_MODELS, recorded
from tests.integration.test_upstream_http import read_request
from tests.scripted_upstream import ScriptedUpstream

_TIMEOUT_S = 10.0


def prompt_tokens(content: str = "Say hi") -> int:
    """The gateway's estimate of a one-message prompt."""
    return estimate_prompt_tokens((Message(Role.USER, content),))


def assert_prompt_charge(total: pb.UsageRow) -> None:
    """One call: its prompt's estimate priced as input, no output, marked estimated."""
    assert total.requests == 1
    assert total.usage.input_tokens == prompt_tokens() > 0
    assert total.usage.output_tokens == 0
    assert total.usage.estimated
    assert total.cost_usd > 0
    assert total.cost_usd == pytest.approx(total.usage.input_tokens * 0.27 / 1e6, abs=1e-12)


async def until_sent(upstream: FakeUpstream, requests: int = 1) -> None:
    """Wait until the upstream has received `requests` requests."""
    async with asyncio.timeout(_TIMEOUT_S):
        while len(upstream.requests) < requests:
            await asyncio.sleep(0.01)


async def nothing_recorded(gateway: RunningGateway) -> None:
    await asyncio.sleep(0.3)  # a record would land by now
    assert (await gateway.stub.GetUsage(pb.GetUsageRequest())).total.requests == 0


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
async def test_a_unary_call_cut_while_the_upstream_generates_is_charged_its_prompt(
    upstream: FakeUpstream, start_gateway: Any, leave: str
) -> None:
    """Cancelled, or past its deadline, with the upstream still working: one estimated row."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    upstream.script(Hang())
    if leave == "cancel":
        call = gateway.stub.Complete(chat(), timeout=10)
        await until_sent(upstream)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat(), timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_prompt_charge(await recorded(gateway, requests=1))


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
async def test_a_stream_cut_before_its_first_text_is_charged_its_prompt(
    upstream: FakeUpstream, start_gateway: Any, leave: str
) -> None:
    """No text reached the caller, but the upstream had the prompt: one estimated row."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    upstream.script(Hang())
    call = gateway.stub.CompleteStream(chat_stream(), timeout=0.5 if leave == "deadline" else 10)
    if leave == "cancel":
        await until_sent(upstream)
        call.cancel()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_prompt_charge(await recorded(gateway, requests=1))


async def test_a_call_cut_before_its_request_was_sent_records_nothing(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Queued behind a call holding the upstream's only slot (and only connection): the
    queued call never reached the upstream, and is not charged."""
    config = gateway_config(upstream.base_url, models=PRICED_MODELS)
    one_at_a_time = dataclass_replace_upstream(config, max_concurrency=1, max_connections=1)
    gateway = await start_gateway(one_at_a_time)
    upstream.script(Hang(), Hang())
    first = gateway.stub.Complete(chat(), timeout=10)
    await until_sent(upstream)
    queued = gateway.stub.Complete(chat("queued"), timeout=10)
    await asyncio.sleep(0.3)  # well into its wait for the slot
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await nothing_recorded(gateway)
    first.cancel()  # the call that was sent is charged, and only it
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_prompt_charge(await recorded(gateway, requests=1))
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_cut_while_an_error_status_is_read_records_nothing(
    upstream: FakeUpstream, start_gateway: Any, mode: str
) -> None:
    """The upstream refused the call with a 503 whose body stalls, and the caller cancels
    meanwhile: a refusal is not billed, so nothing is recorded (before, the cut after the
    request was sent charged its prompt)."""
    gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    upstream.script(Status(503, body_delay_s=5.0))
    if mode == "unary":
        call: Any = gateway.stub.Complete(chat(), timeout=10)
    else:
        call = gateway.stub.CompleteStream(chat_stream(), timeout=10)
        reading = asyncio.ensure_future(call.read())
    await until_sent(upstream)
    await asyncio.sleep(0.3)  # the status is in, its body still to come
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await (call if mode == "unary" else reading)
    await nothing_recorded(gateway)


async def test_a_shared_unary_call_every_caller_leaves_is_charged_once(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Two callers share one upstream call and both cancel: it is recorded once."""
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"})
    gateway = await start_gateway(config)
    upstream.script(Hang())
    request = chat(params=pb.GenerationParams(temperature=0.0))
    calls = [gateway.stub.Complete(request, timeout=10) for _ in range(2)]
    await until_sent(upstream)
    async with asyncio.timeout(_TIMEOUT_S):
        while gateway.server.pipeline.cache.following < 2:
            await asyncio.sleep(0.01)
    for call in calls:
        call.cancel()
    await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
    assert_prompt_charge(await recorded(gateway, requests=1))
    assert len(upstream.requests) == 1


async def test_a_shared_unary_call_its_first_caller_leaves_is_charged_once_as_answered(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The caller that started the shared call leaves; the call goes on for the other and
    answers: its cost is recorded once, as the upstream reported it, and no estimate.

    Both callers get a row (the follower's at no cost, as a cache hit's)."""
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"})
    gateway = await start_gateway(config)
    upstream.script(Reply(delay_s=1.0, prompt_tokens=11, completion_tokens=5))
    request = chat(params=pb.GenerationParams(temperature=0.0))
    first = gateway.stub.Complete(request, timeout=10)
    await until_sent(upstream)
    second = gateway.stub.Complete(request, timeout=10)
    async with asyncio.timeout(_TIMEOUT_S):
        while gateway.server.pipeline.cache.following < 2:
            await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).content == "Hello from fake"
    total = await recorded(gateway, requests=2)
    assert total.requests == 2
    assert (total.usage.input_tokens, total.usage.output_tokens) == (2 * 11, 2 * 5)
    assert not total.usage.estimated
    assert total.cost_usd == pytest.approx((11 * 0.27 + 5 * 1.10) / 1e6, abs=1e-12)
    assert upstream.disconnects == 0


async def test_a_cut_call_counts_against_its_tenants_budget(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """With room for one and a half prompts, a call cut after it was sent leaves room for
    none: its prompt is spent, so cancelling calls cannot get past a budget."""
    prompt_usd = prompt_tokens() * 0.27 / 1e6  # no max_tokens: the prompt is all it reserves
    budgets = {"default": {"usd": 1.5 * prompt_usd, "period": "day"}}
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, budgets=budgets)
    gateway = await start_gateway(config)
    upstream.script(Hang())
    call = gateway.stub.Complete(chat(), timeout=10)
    await until_sent(upstream)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert_prompt_charge(await recorded(gateway, requests=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_status(caught.value).message.startswith("tenant 'default' has spent")
    assert len(upstream.requests) == 1


async def test_a_stream_asked_again_without_stream_options_and_cut_is_charged_its_prompt(
    start_gateway: Any,
) -> None:
    """An upstream refuses `stream_options` (a 400), the stream is asked again without
    them, and the caller cuts it while the upstream works on it: one estimated row, as
    for any stream cut once sent.

    Before, the refusal's status stood for the request asked again: the call counted as
    refused, which bills nothing, and no row was recorded for the prompt it had."""
    refusal = '{"error": {"message": "Unrecognized request argument supplied: stream_options"}}'

    def respond(body: dict[str, Any]) -> Status | Hang:
        return Status(400, body=refusal) if "stream_options" in body else Hang()

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
        call = gateway.stub.CompleteStream(chat_stream(), timeout=10)
        await until_sent(upstream, requests=2)
        call.cancel()
        await upstream.wait_for_disconnect(timeout_s=_TIMEOUT_S)
        assert_prompt_charge(await recorded(gateway, requests=1))


# A prompt whose request body (about 2.8 MB: each `"` is sent escaped) is as long as the
# request limits let one be (2 MiB of text, a million estimated tokens).
_LONG_PROMPT = '"' * 700_000 + "word " * 278_000


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def slow_reading_upstream(
    handler: Handler, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """An upstream on loopback (over TLS with `tls`) whose kernel takes far less of a
    request than a long prompt (a small window and segment size), running `handler` per
    connection; its base URL. On exit its handlers are cancelled and their connections
    dropped, even one whose handler still waits."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            # At once: a TLS close waits for the gateway's close_notify, which may come
            # after this test's loop is gone (an unclosed transport).
            writer.transport.abort()

    async with contextlib.AsyncExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        server = await asyncio.start_server(serve, sock=listener, ssl=tls)
        stack.push_async_callback(_stop_serving, server, handlers)
        scheme = "http" if tls is None else "https"
        yield f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/v1"


async def _stop_serving(server: asyncio.Server, handlers: set[asyncio.Task[None]]) -> None:
    server.close()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


def upstream_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1, whose CA the gateway trusts."""
    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # the trust store, as OpenSSL reads it
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


@pytest.mark.parametrize("reads", [False, True], ids=["unread", "read"])
async def test_a_call_cut_while_its_prompt_is_written_over_tls_records_only_once_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Any, reads: bool
) -> None:
    """Over TLS, a caller cancels a call with a long prompt while the upstream reads none
    of it past its start: most of it still waits in the gateway's buffers, so it was not
    sent and records nothing, as over plain HTTP; one the upstream read whole records its
    prompt.

    Before, the TLS transport's buffer was asked alone, which leaves out the TCP buffer
    under it that TLS hands its records to: every long prompt counted as sent."""
    started, read = asyncio.Event(), asyncio.Event()

    async def read_then_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the request line: the request is being written
        started.set()
        if reads:
            await read_request(reader)
            read.set()
        await asyncio.sleep(30)

    tls = upstream_tls(tmp_path, monkeypatch)
    async with slow_reading_upstream(read_then_hang, tls=tls) as url:
        models = {FAKE_MODEL: {**PRICED_MODELS[FAKE_MODEL], "context_window": 2_000_000}}
        gateway = await start_gateway(gateway_config(url, models=models))
        call = gateway.stub.Complete(chat(_LONG_PROMPT), timeout=_TIMEOUT_S)
        await asyncio.wait_for((read if reads else started).wait(), _TIMEOUT_S)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        if reads:
            assert (await recorded(gateway, requests=1)).usage.input_tokens > 900_000
        else:
            await nothing_recorded(gateway)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_rest_of_a_cut_calls_prompt_never_reaches_the_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Any, scheme: str
) -> None:
    """A call cut while most of its long prompt still waits in the gateway's buffers (it
    records nothing): its connection is dropped with them, so the upstream, reading on,
    never gets the whole request it would bill.

    Before, the connection was closed gracefully: the gateway went on writing the cut
    call's prompt to the upstream as it read, and held the socket open until then (over
    TLS past the test's end: an unclosed socket)."""
    started, cut = asyncio.Event(), asyncio.Event()
    received: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def read_after_the_cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readline()  # the request line: the request is being written
        started.set()
        await cut.wait()
        length, body = 0, 0
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while chunk := await reader.read(1 << 16):
                body += len(chunk)
        finally:
            received.set_result((length, body))

    tls = upstream_tls(tmp_path, monkeypatch) if scheme == "https" else None
    async with slow_reading_upstream(read_after_the_cut, tls=tls) as url:
        models = {FAKE_MODEL: {**PRICED_MODELS[FAKE_MODEL], "context_window": 2_000_000}}
        gateway = await start_gateway(gateway_config(url, models=models))
        call = gateway.stub.Complete(chat(_LONG_PROMPT), timeout=_TIMEOUT_S)
        await asyncio.wait_for(started.wait(), _TIMEOUT_S)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The gateway let the call's connection go.
        await eventually(lambda: checked_out_connections(gateway) == 0, timeout_s=_TIMEOUT_S)
        cut.set()
        length, body = await asyncio.wait_for(received, _TIMEOUT_S)
        assert length > 2_000_000
        assert body < length
        await nothing_recorded(gateway)
