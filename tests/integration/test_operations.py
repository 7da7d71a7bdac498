"""Operating the server: health, reflection, graceful shutdown, config errors, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import pytest_asyncio
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from service.hosts import ListenError
from service.local_model import LocalModelUnavailable
from service.server import GatewayServer
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream, Reply
from tests.host_addresses import link_local_address
from tests.integration.gateway_process import listening_port
from tests.integration.helpers import error_info
from tests.integration.test_resilience import settle
from tests.ports import refusing_port
from tests.redis_server import RedisServer
from tests.secret_capture import record_emitted, register_secret

REPO = Path(__file__).resolve().parents[2]


async def test_health_reports_serving_for_server_and_service(gateway):
    """The standard health service answers SERVING for "" and the gateway service."""
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "llmgateway.v1.CompletionService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_of_an_unknown_service_is_not_found_naming_those_it_knows(gateway):
    """A Check of a service the gateway reports nothing for is NOT_FOUND (the health
    protocol's answer) with a message naming it and the services it knows, and ErrorInfo
    `SERVICE_UNKNOWN`. Before, it was a bare NOT_FOUND: no message, no details."""
    health = health_pb2_grpc.HealthStub(gateway.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="llmgateway.v1.Gateway"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        "health reports no service 'llmgateway.v1.Gateway'; it reports '' (the server), "
        "'llmgateway.v1.CompletionService'"
    )
    info = error_info(caught.value)
    assert info.reason == "SERVICE_UNKNOWN"
    assert dict(info.metadata) == {
        "service": "llmgateway.v1.Gateway",
        "known_services": ",llmgateway.v1.CompletionService",
    }


def _calls_awaited_per_registered_method() -> int:
    """The tasks grpc.aio's accept loop holds for the next call of a method registered on
    its fast path: one each, and each one set up again for every call it accepts."""
    return sum(
        getattr(task.get_coro(), "__qualname__", "") == "AioServer._request_registered_call"
        for task in asyncio.all_tasks()
    )


async def test_only_complete_and_its_stream_are_on_grpcs_registered_method_path(gateway, upstream):
    """Each method on grpc's registered-method path costs every accepted call a pending
    task to wait on: only Complete and CompleteStream are there, and every other method,
    health's and reflection's too, is still answered through the generic handler."""
    assert _calls_awaited_per_registered_method() == 2
    assert (await gateway.stub.Complete(chat())).content == "Hello from fake"
    async for _ in gateway.stub.CompleteStream(chat_stream()):
        pass
    assert FAKE_MODEL in [
        m.name for m in (await gateway.stub.ListModels(pb.ListModelsRequest())).models
    ]
    assert (await gateway.stub.GetUsage(pb.GetUsageRequest())).total.requests == 2
    health = health_pb2_grpc.HealthStub(gateway.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    services, content = await asyncio.to_thread(_call_through_reflection, gateway.server.address)
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert content == "Hello from fake"
    assert _calls_awaited_per_registered_method() == 2


async def _stop_with_a_call_in_flight(gateway, fake: FakeUpstream) -> None:
    """Stop `gateway` (a 30 s grace) while a call to `fake`, a slow upstream, is in
    flight; the call is answered whole and the stop ends long before the grace."""
    call = asyncio.ensure_future(gateway.stub.Complete(chat()))
    while not fake.requests:
        await asyncio.sleep(0.01)
    async with asyncio.timeout(10):  # a hang guard, far inside the grace
        await gateway.server.stop(grace_s=30)
    assert (await call).content == "Hello from fake"


async def test_stopping_ends_health_watches_once_the_last_call_is_done(start_gateway):
    """A health Watch stream (one per connection for clients balancing with health checks)
    does not hold the server for the whole grace: the call in flight finishes, the watch
    hears NOT_SERVING and is ended, and stop() returns long before the 30 s grace."""
    async with FakeUpstream(default=Reply(delay_s=0.5)) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        health = health_pb2_grpc.HealthStub(gateway.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await _stop_with_a_call_in_flight(gateway, fake)
        statuses = []
        async with asyncio.timeout(10):
            while (update := await watch.read()) is not grpc.aio.EOF:
                statuses.append(update.status)
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert await watch.code() == grpc.StatusCode.OK


async def _unread_health_watch(port: int) -> asyncio.StreamWriter:
    """A health Watch over raw HTTP/2 whose stream's flow-control window is 0: the
    server can write it no status, as to a caller that reads nothing. Returned once its
    response has begun (the first status waiting on the window)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Watch"),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    connection.send_headers(1, headers)
    body = health_pb2.HealthCheckRequest(service="").SerializeToString()
    connection.send_data(1, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    writer.write(connection.data_to_send())
    events: list[h2.events.Event] = []
    async with asyncio.timeout(10):
        while not any(isinstance(e, h2.events.ResponseReceived) for e in events):
            events += connection.receive_data(await reader.read(65536))
            writer.write(connection.data_to_send())
    return writer


async def test_a_health_watch_that_reads_nothing_does_not_hold_the_stop(start_gateway):
    """grpc's health servicer wrote a Watch's status holding the lock that setting a
    status takes: one Watch whose caller read nothing held the stop at its first step
    (NOT_SERVING) for as long as that caller stayed connected, the server serving on,
    SERVING, through SIGTERM."""
    async with FakeUpstream() as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        unread = await _unread_health_watch(gateway.server.port)
        try:
            stopping = asyncio.ensure_future(gateway.server.stop(grace_s=1))
            assert await settle(stopping.done, timeout_s=30)
            await stopping
        finally:
            unread.close()


async def test_stopping_ends_reflection_streams_once_the_last_call_is_done(start_gateway):
    """A reflection stream (a tool's session, such as evans', holds one open) did not end
    with the gateway's last call, as health Watch streams do: stop() waited out the whole
    grace for it, and the stream then ended UNAVAILABLE rather than OK."""
    async with FakeUpstream(default=Reply(delay_s=0.5)) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        session = reflection_pb2_grpc.ServerReflectionStub(gateway.channel).ServerReflectionInfo()
        await session.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = (await session.read()).list_services_response.service
        assert "llmgateway.v1.CompletionService" in [s.name for s in listed]
        await _stop_with_a_call_in_flight(gateway, fake)
        assert await session.read() is grpc.aio.EOF
        assert await session.code() == grpc.StatusCode.OK


def _call_through_reflection(address: str) -> tuple[list[str], str]:
    """List services and call Complete using only descriptors fetched by reflection."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("llmgateway.v1.CompletionService")
        method = service.methods_by_name["Complete"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class(model=FAKE_MODEL)
        message = request.messages.add()
        message.role = 2  # ROLE_USER, known to this caller only through reflection
        message.content = "hi"
        call = channel.unary_unary(
            "/llmgateway.v1.CompletionService/Complete",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        return services, call(request, timeout=10).content


async def test_reflection_lists_and_calls_service_without_proto_files(gateway):
    """A client with no .proto files discovers and calls Complete through reflection."""
    services, content = await asyncio.to_thread(_call_through_reflection, gateway.server.address)
    assert "llmgateway.v1.CompletionService" in services
    assert "grpc.health.v1.Health" in services
    assert content == "Hello from fake"


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("llmgateway.v1.CompletionService.Complete", "llmgateway/v1/gateway.proto"),
        ("grpc.health.v1.Health.Watch", "grpc_health/v1/health.proto"),
    ],
)
async def test_reflection_finds_the_file_of_a_method(gateway, symbol, file):
    """`grpcurl describe llmgateway.v1.CompletionService.Complete` asks for the file
    containing the method, as the reflection protocol allows: grpc-python's servicer
    answered NOT_FOUND (its descriptor pool finds no method by name), grpc/grpc#34743."""
    session = reflection_pb2_grpc.ServerReflectionStub(gateway.channel).ServerReflectionInfo()
    for asked in (symbol, symbol + "Nope"):
        await session.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=asked))
    found, unknown = await session.read(), await session.read()
    await session.done_writing()
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(proto).name
        for proto in found.file_descriptor_response.file_descriptor_proto
    ]
    assert file in names
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _write_config(tmp_path: Path, base_url: str, **server: object) -> Path:
    config = gateway_config_data(base_url, server={"grace_period_s": 5, **server})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _spawn(
    *args: str, env: Mapping[str, str] = os.environ, own_group: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
        start_new_session=own_group,
    )


async def _refused_start(*args: str, env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Run `llm-gateway ARGS`, expected to refuse to start: its exit code and stderr. One
    that starts instead (its input ignored) is killed after 30 s, and fails the test (a
    guard only: a refusal on a busy machine, by the workers' supervisor, took over 10 s)."""
    process = await _spawn(*args, env=env)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:  # it started: what it was given was ignored
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def _run_cli(address: str, *args: str) -> tuple[int, str, str]:
    """Run `llm-gateway complete ARGS` against `address`: exit code, stdout, stderr."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "complete", *args,
        "--model", FAKE_MODEL, "--address", address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await asyncio.wait_for(cli.communicate(), timeout=30)
    assert cli.returncode is not None
    return cli.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture
async def gateway_process(
    upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m service serve` as a child process, and the address it printed."""
    process = await _spawn("serve", "--config", str(_write_config(tmp_path, upstream.base_url)))
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    address = line.decode().strip().rsplit(" ", 1)[-1]
    assert address.startswith("127.0.0.1:"), line
    yield process, address
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _completes_across(stop: Callable[[], None], upstream, address: str) -> None:
    """A slow call in flight as `stop()` runs is answered whole."""
    upstream.script(Reply(content="slow but whole", delay_s=1.0))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Complete(chat(), timeout=20))
        while not upstream.requests:
            await asyncio.sleep(0.01)
        stop()
        response = await in_flight
    assert response.content == "slow but whole"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_stop_signal_finishes_in_flight_call_then_exits_cleanly(
    gateway_process, upstream, sig
):
    """On SIGTERM or SIGHUP (a closed terminal) an in-flight call completes, new calls are
    refused, and the process exits 0.

    Before, SIGHUP killed the process at once: the call cut, status -1 (129 in a shell)."""
    process, address = gateway_process
    await _completes_across(lambda: process.send_signal(sig), upstream, address)
    assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=2)
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


async def test_a_callers_bad_trace_headers_are_not_written_to_the_log(gateway_process):
    """A caller's `baggage` and `tracestate` the propagators cannot take are ignored with
    no WARNING and none of their text in the log (at DEBUG, `rpc.trace_header_ignored`).

    Before, OpenTelemetry warned of each entry it dropped, quoting it: one call's 180 bad
    baggage entries wrote 180 lines of the caller's text, before its key was checked."""
    process, address = gateway_process
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    metadata = (
        ("traceparent", traceparent),
        ("tracestate", "caller-text-in-tracestate"),
        ("baggage", ",".join(["=caller-text-in-baggage"] * 180)),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        assert (await stub.Complete(chat(), metadata=metadata)).content == "Hello from fake"
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    stderr = (await asyncio.wait_for(process.stderr.read(), timeout=20)).decode()
    assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    assert "caller-text-in" not in stderr
    assert " WARNING opentelemetry." not in stderr


async def test_cli_complete_prints_answer_and_usage(gateway_process):
    """`llm-gateway complete` prints the answer on stdout and usage and cost on stderr."""
    _, address = gateway_process
    code, out, err = await _run_cli(address, "Say hi")
    assert code == 0, err
    assert out.strip() == "Hello from fake"
    assert "tokens in=7 out=3" in err
    assert "cost=$0.000002" in err


async def test_cli_sends_the_reasoning_effort_it_is_given(upstream, gateway):
    """`--reasoning-effort max` reaches the upstream; a name it does not know is refused
    by the command line before any call."""
    code, _, err = await _run_cli(gateway.server.address, "hi", "--reasoning-effort", "max")
    assert code == 0, err
    code, _, err = await _run_cli(gateway.server.address, "hi", "--reasoning-effort", "huge")
    assert code == 2
    assert "invalid choice: 'huge'" in err
    assert [request.body.get("reasoning_effort") for request in upstream.requests] == ["max"]


async def test_cli_stream_prints_deltas(gateway_process):
    """`llm-gateway complete --stream` prints the streamed text."""
    _, address = gateway_process
    code, out, err = await _run_cli(address, "Say hi", "--stream")
    assert code == 0, err
    assert out.strip() == "Hello from fake"
    assert "FINISH_REASON_STOP" in err


async def test_cli_reports_errors_with_details(gateway_process):
    """A failed call exits 1 and prints the status with its field violations (a
    max_tokens past the gateway's cap, which the CLI leaves the gateway to refuse: a
    temperature out of range is the CLI's own usage error now)."""
    _, address = gateway_process
    code, _, err = await _run_cli(address, "hi", "--max-tokens", "2000000")
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "params.max_tokens" in err


async def test_cli_error_shows_the_reason_and_its_metadata(upstream, gateway):
    """The ErrorInfo reason and metadata a script would branch on are printed too."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "complete", "hi", "--stream",
        "--model", "nope", "--address", gateway.server.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    _, err = await asyncio.wait_for(cli.communicate(), timeout=30)
    assert cli.returncode == 1
    assert err.decode().splitlines() == [
        "NOT_FOUND: model 'nope' is not served by any configured upstream",
        "  reason MODEL_NOT_FOUND: model=nope",
    ]


async def test_cli_refuses_a_label_without_a_value(upstream, gateway):
    """`--label team` (no `=`) is a usage error, not a call whose cost goes unlabelled."""
    code, _, err = await _run_cli(gateway.server.address, "hi", "--label", "team")
    assert code == 2
    assert err.splitlines()[-1].endswith("argument --label: 'team' is not KEY=VALUE")
    assert upstream.requests == []


@pytest.mark.parametrize("source", ["--api-key", "LLM_GATEWAY_API_KEY"])
async def test_cli_refuses_a_caller_key_grpc_cannot_send(upstream, gateway, source):
    """A key with a stray carriage return is a one-line usage error that never echoes it."""
    key = "llmgw_do-not-print-me\r"
    args = ["--api-key", key] if source == "--api-key" else []
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "complete", "Say hi", *args,
        "--model", FAKE_MODEL, "--address", gateway.server.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={**os.environ, "LLM_GATEWAY_API_KEY": key} if not args else None,
    )  # fmt: skip
    _, err = await asyncio.wait_for(cli.communicate(), timeout=30)
    text = err.decode()
    assert cli.returncode == 2
    # The variable, when it gave the key: the user never typed --api-key.
    named = "argument --api-key" if args else "environment variable LLM_GATEWAY_API_KEY"
    assert f"{named}: the caller key has characters" in text.splitlines()[-1]
    assert "Traceback" not in text
    assert "do-not-print-me" not in text
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("server: [not, a, mapping]", "server: must be a mapping"),
        ("server:\n  listen: nowhere", "server: listen must be HOST:PORT"),
        ("upstreams:\n  - name: x\n    base_url: ftp://h\n    models: [m]", "upstreams[0]"),
        ("servr: {}", "servr: unknown key"),
        ("server: {listen: [", "not valid YAML"),
        # Past gRPC's C int: the start died with an OverflowError traceback and status 1.
        (
            "server: {max_receive_message_bytes: 2147483648}",
            "server: max_receive_message_bytes must be 1024..2147483647",
        ),
        (
            "server: {max_in_flight_calls: 2000000000}",
            "server: max_in_flight_calls + max_queued_calls must be <= 1073741823",
        ),
        # An integer past a float's range: the load died with an OverflowError traceback.
        (f"server: {{grace_period_s: {'9' * 400}}}", "server.grace_period_s: must be a number"),
        # grpc read these as other addresses (`[::0.1.0.0]:443`, no port) and the start
        # failed with status 1, blaming a taken port.
        (
            "server: {listen: '::1:50051'}\nlocal_model: {enabled: never}",
            "server: listen's IPv6 host goes in brackets, as in [::1]:50051",
        ),
        (
            "server: {listen: '127.0.0.1:\uff15\uff10'}\nlocal_model: {enabled: never}",
            "server: listen must be HOST:PORT",
        ),
        # One tenant to the gateway, two keys to YAML: the last entry silently won.
        (
            "server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n"
            "tenants:\n  4711: {allowed_models: [m]}\n  '4711': {}",
            "tenants.4711: duplicate key (written once as a number, once as text)",
        ),
        # Nested past Python's recursion limit: the load died with a RecursionError traceback.
        ("tenants: " + "[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
        # Past what orjson writes: the gateway started, and every call failed INTERNAL.
        (
            "local_model: {enabled: never}\nupstreams: [{name: u, base_url: 'http://h/v1', "
            f"models: [m], extra_body: {{x: {'[' * 300}{']' * 300}}}}}]",
            "upstreams[0].extra_body: must nest at most 200 lists and mappings",
        ),
        # An alias inside its own anchor: the load died with a RecursionError traceback.
        (
            "local_model: {enabled: never}\nupstreams: [{name: u, base_url: 'http://h/v1', "
            "models: [m], extra_body: {x: &loop [1, *loop]}}]",
            "upstreams[0].extra_body: must not hold itself (a YAML alias inside its own anchor)",
        ),
        # Aliases of aliases, ten lines read as 10^10 values: the load hung, eating memory,
        # with SIGTERM held (`early_signals`).
        (
            "local_model: {enabled: never}\nupstreams: [{name: u, base_url: 'http://h/v1', "
            "models: [m], extra_body: {l0: &l0 [x, x, x, x, x, x, x, x, x, x], "
            + ", ".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10))
            + "}}]",
            "upstreams[0].extra_body: must hold at most 100000 values in all",
        ),
    ],
)
async def test_config_error_names_file_and_key_and_exits_nonzero(tmp_path, content, expected):
    """A bad config exits 2 with the file, the key and the problem on stderr."""
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    process = await _spawn("serve", "--config", str(path))
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:  # a load that hangs holds SIGTERM: killed
            process.kill()
            await process.wait()
    assert process.returncode == 2
    assert str(path) in stderr.decode()
    assert expected in stderr.decode()


@pytest.mark.parametrize(
    ("content", "encoding"),
    [
        (b"server:\n  listen: 127.0.0.1:0\n# caf\xe9 team\n", "UTF-8"),
        # A UTF-16 file with half a surrogate pair on line 3 (cut by a careless edit).
        ("server:\n  listen: 127.0.0.1:0\n# ".encode("utf-16") + b"\x3d\xd8\n\x00", "UTF-16"),
    ],
    ids=["latin1-in-utf8", "lone-surrogate-in-utf16"],
)
@pytest.mark.parametrize("command", [("serve",), ("keys", "create", "--tenant", "search")])
async def test_a_config_file_that_is_not_utf8_is_a_config_error(
    tmp_path, command, content, encoding
):
    """A config whose comment an editor saved as Latin-1 (or a UTF-16 one holding what
    is not UTF-16) exits 2 naming the file and the line, like any other config error.
    Before, `serve` died with a UnicodeDecodeError traceback and status 1, and `keys`
    printed the codec's message without the file."""
    path = tmp_path / "gateway.yaml"
    path.write_bytes(content)
    process = await _spawn(*command, "--config", str(path))
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    text = stderr.decode()
    assert process.returncode == 2
    assert text.splitlines()[-1].endswith(
        f"{path}: (top level): not {encoding} text: line 3 has a byte that is not {encoding}"
    )
    assert "Traceback" not in text


async def test_a_config_file_saved_as_utf16_serves(upstream, tmp_path):
    """A config saved by Notepad as "Unicode" (UTF-16 LE after a byte order mark), a
    comment in it not ASCII: `serve` reads it and answers. Before, it exited 2, the file
    refused as not UTF-8 text."""
    path = _write_config(tmp_path, upstream.base_url)
    path.write_bytes(f"# équipe «search»\n{path.read_text()}".encode("utf-16"))
    process = await _spawn("serve", "--config", str(path))
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert line.startswith("llm-gateway listening on "), line
        async with grpc.aio.insecure_channel(line.split()[3]) as channel:
            response = await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=10)
        assert response.content == "Hello from fake"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("variable", ["LLM_GATEWAY_SERVER__LISTEN", "LLM_GATEWAY_AUTH__MODE"])
async def test_an_override_variable_misnamed_is_a_config_error(upstream, tmp_path, variable):
    """An override one underscore short exits 2 naming the variable. Before, it was
    ignored without a word and the gateway served the file's address."""
    config = _write_config(tmp_path, upstream.base_url)
    env = {**os.environ, variable: "x"}
    code, stderr = await _refused_start("serve", "--config", str(config), env=env)
    assert code == 2
    assert stderr.splitlines()[-1] == (
        f"llm-gateway: config error: {variable}: (top level): "
        "not an override: those start with LLM_GATEWAY__"
    )


# A key that is a valid variable name all the same (Stripe's `sk_live_...`).
_KEY_LIKE_NAME = register_secret("sk_live_51HPASTEDKEYforSERVE0e8c6a4b2d9f")


async def test_serve_never_logs_a_key_pasted_as_a_valid_variable_name(upstream, tmp_path):
    """A key written as `api_key_env` that is a valid variable name all the same (16 or
    more letters and digits in a row, mixed) stops `serve` with a config error that holds
    no word of it.

    Before, the gateway started with the upstream disabled, and its `upstream.disabled`
    line gave the key as `missing_env`.
    """
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["api_key_env"] = _KEY_LIKE_NAME
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    code, stderr = await _refused_start("serve", "--config", str(path))
    record_emitted(stderr)
    assert code == 2
    assert f"{path}: upstreams[0]: api_key_env must name an environment variable" in stderr
    assert "PASTEDKEY" not in stderr


@pytest.mark.parametrize("source", ["--log-level", "LLM_GATEWAY_LOG_LEVEL"])
async def test_an_unknown_log_level_is_a_usage_error(upstream, tmp_path, source):
    """`--log-level LOUD` (or the variable) exits 2 with one line naming the flag (or the
    variable) and the levels, before anything starts. Before, the variable's value was
    blamed on `--log-level`, an option the user never typed."""
    config = _write_config(tmp_path, upstream.base_url)
    if source == "--log-level":
        process = await _spawn("serve", "--config", str(config), "--log-level", "LOUD")
    else:
        process = await _spawn("serve", "--config", str(config), env={**os.environ, source: "LOUD"})
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    text = stderr.decode()
    assert process.returncode == 2
    named = "argument --log-level" if source == "--log-level" else f"environment variable {source}"
    assert text.splitlines()[-1].endswith(
        f"{named}: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )
    assert "Traceback" not in text


async def test_an_empty_listen_flag_is_a_config_error(upstream, tmp_path):
    """`--listen ""` (a script's unset variable) exits 2. Before, it was ignored without a
    word and the gateway served the file's address."""
    config = _write_config(tmp_path, upstream.base_url)
    code, stderr = await _refused_start("serve", "--config", str(config), "--listen", "")
    assert code == 2
    assert stderr.splitlines()[-1] == (
        "llm-gateway: config error: command line: --listen: listen must be HOST:PORT"
    )


@pytest.mark.parametrize(
    ("section", "value", "state"),
    [
        pytest.param("cache", None, "not set", id="cache-variable-unset"),
        pytest.param("auth", "", "empty", id="auth-variable-empty"),
    ],
)
async def test_a_named_redis_password_variable_without_a_password_exits_2(
    tmp_path: Path, section: str, value: str | None, state: str
) -> None:
    """`redis_password_env` naming an unset or empty variable stops the start with status 2.

    The message names the key and the variable; a password set for the other section is
    never printed. Before, the gateway connected to Redis without a password.
    """
    secret = "not-printed-0123456789"
    redis_url = "redis://127.0.0.1:6379/0"
    sections = {
        "cache": {"backend": "redis", "redis_url": redis_url},
        "auth": {"redis_url": redis_url},
    }
    other = "auth" if section == "cache" else "cache"
    data = gateway_config_data("http://127.0.0.1:9/v1")
    data[section] = {**sections[section], "redis_password_env": "GW_TEST_REDIS_PW_MISSING"}
    data[other] = {**sections[other], "redis_password_env": "GW_TEST_REDIS_PW_SET"}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "GW_TEST_REDIS_PW_MISSING"}
    env["GW_TEST_REDIS_PW_SET"] = secret
    if value is not None:
        env["GW_TEST_REDIS_PW_MISSING"] = value
    process = await _spawn("serve", "--config", str(path), env=env)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    message = stderr.decode()
    assert process.returncode == 2
    assert f"{path}: {section}.redis_password_env: " in message
    assert f"the environment variable GW_TEST_REDIS_PW_MISSING is {state}" in message
    assert secret not in message


# The password the tests' own redis-server asks for, and the wrong one they give it.
_REDIS_PASSWORD = "right-0123456789"
_WRONG_PASSWORD = "wrong-9876543210"


def _redis_config(tmp_path: Path, section: str, redis_url: str, password_env: str | None) -> Path:
    """A config with `section`'s Redis at `redis_url`, its password in `password_env`."""
    settings: dict[str, Any] = {"redis_url": redis_url}
    if password_env is not None:
        settings["redis_password_env"] = password_env
    if section == "cache":
        settings["backend"] = "redis"
    data = gateway_config_data("http://127.0.0.1:9/v1", **{section: settings})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.redis
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("section", "password", "problem"),
    [
        pytest.param(
            "ledger",
            _WRONG_PASSWORD,
            "Redis refused the password in GW_TEST_REDIS_PW (Redis said: invalid "
            "username-password pair or user is disabled.); set it to the password Redis "
            "expects",
            id="ledger-wrong-password",
        ),
        pytest.param(
            "auth", None, "Redis asks for a password and none is configured", id="auth-none"
        ),
        pytest.param(
            "cache",
            _WRONG_PASSWORD,
            "Redis refused the password in GW_TEST_REDIS_PW",
            id="cache-wrong-password",
        ),
    ],
)
async def test_a_redis_refusing_the_password_stops_the_start_with_status_2(
    tmp_path: Path, section: str, password: str | None, problem: str, workers: str
) -> None:
    """A Redis that refuses the gateway's password (or asks for one it was not given)
    stops `serve` with status 2 and one config error naming the key and what Redis said,
    never a password: from one process, or once from the workers' supervisor.

    Before, the gateway started without a word; budgets and tenant limits failed open,
    usage rows were lost and the cache never stored, as if Redis were briefly down.
    """
    redis = RedisServer(password=_REDIS_PASSWORD)
    await redis.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
        if password is not None:
            env["GW_TEST_REDIS_PW"] = password
        path = _redis_config(
            tmp_path, section, redis.url, None if password is None else "GW_TEST_REDIS_PW"
        )
        code, stderr = await _refused_start(
            "serve", "--config", str(path), "--workers", workers, env=env
        )
    finally:
        await redis.stop()
    assert code == 2
    assert f"llm-gateway: config error: {path}: {section}.redis_password_env: {problem}" in stderr
    assert stderr.count("config error") == 1
    assert _WRONG_PASSWORD not in stderr
    assert _REDIS_PASSWORD not in stderr
    assert "Traceback" not in stderr


@pytest.mark.redis
async def test_a_disabled_redis_cache_starts_without_its_password(tmp_path: Path) -> None:
    """`cache.enabled: false` beside `backend: redis` connects to no Redis: `serve` starts
    and `check` passes with its password variable unset, before a Redis that wants one.

    Before, both exited 2: first on the unset variable, and without that check on the
    start's PING of the cache's Redis, refused for want of the password.
    """
    redis = RedisServer(password=_REDIS_PASSWORD)
    await redis.start()
    try:
        data = gateway_config_data(
            "http://127.0.0.1:9/v1",
            cache={
                "enabled": False,
                "backend": "redis",
                "redis_url": redis.url,
                "redis_password_env": "GW_TEST_UNSET_REDIS_PW",
            },
        )
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        line, _ = await _first_line_then_sigterm(path)
        code, stderr = await _refused_check(path)
    finally:
        await redis.stop()
    assert line.startswith("llm-gateway listening on 127.0.0.1:")
    assert "config error" not in stderr
    assert code == 1  # the upstream at port 9 fails its probe: the config itself passed


@pytest.mark.redis
@pytest.mark.parametrize(
    ("password", "problem"),
    [
        pytest.param(_WRONG_PASSWORD, "Redis refused the password in GW_TEST_REDIS_PW", id="wrong"),
        pytest.param(None, "Redis asks for a password and none is configured", id="none"),
    ],
)
async def test_a_redis_on_a_unix_socket_refusing_the_password_stops_the_start(
    tmp_path: Path, password: str | None, problem: str
) -> None:
    """`auth.redis_url: unix:///PATH` refusing the password stops `serve` as over TCP.

    Before, the gateway started: redis-py raises a refusal on a unix socket as a plain
    ConnectionError from it, which the check took for an outage.
    """
    redis = RedisServer(password=_REDIS_PASSWORD, unix_socket=True)
    await redis.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
        password_env = None if password is None else "GW_TEST_REDIS_PW"
        if password is not None:
            env["GW_TEST_REDIS_PW"] = password
        path = _redis_config(tmp_path, "auth", redis.socket_url, password_env)
        code, stderr = await _refused_start("serve", "--config", str(path), env=env)
    finally:
        await redis.stop()
    assert code == 2
    assert f"llm-gateway: config error: {path}: auth.redis_password_env: {problem}" in stderr
    assert _WRONG_PASSWORD not in stderr
    assert _REDIS_PASSWORD not in stderr


@pytest.mark.redis
async def test_check_says_a_redis_refuses_the_password_as_serve_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-gateway check` exits 2 on a Redis refusing the password, in serve's words.

    Before, it passed the config: only `serve`'s cool-down warnings hinted at it later.
    """
    from gateway_client.commands import check

    redis = RedisServer(password=_REDIS_PASSWORD)
    await redis.start()
    monkeypatch.setenv("GW_TEST_REDIS_PW", _WRONG_PASSWORD)
    path = _redis_config(tmp_path, "ledger", redis.url, "GW_TEST_REDIS_PW")
    parser = argparse.ArgumentParser()
    check.register(parser.add_subparsers())
    try:
        code = await check.check_command(parser.parse_args(["check", "--config", str(path)]))
    finally:
        await redis.stop()
    captured = capsys.readouterr()
    assert code == 2
    assert (
        f"llm-gateway: config error: {path}: ledger.redis_password_env: Redis refused the "
        "password in GW_TEST_REDIS_PW"
    ) in captured.err
    assert _WRONG_PASSWORD not in captured.out + captured.err


@pytest.mark.redis
@pytest.mark.parametrize("command", ["serve 1", "serve 2", "check"])
@pytest.mark.parametrize("section", ["cache", "auth", "ledger"])
async def test_a_redis_database_past_its_databases_stops_the_start_with_status_2(
    tmp_path: Path, section: str, command: str
) -> None:
    """A database the URL selects that Redis refuses (99 of its 16) stops `serve` (one
    process, or the workers' supervisor once) and `check` with one config error on the
    URL's key, as a refused password does.

    Before, the gateway started and `check` said ok, while every command failed: each
    usage row was lost (`ledger.record_lost`), budgets and tenant limits were open.
    """
    redis = RedisServer()
    await redis.start()
    try:
        path = _redis_config(tmp_path, section, f"{redis.url.rpartition('/')[0]}/99", None)
        name, _, workers = command.partition(" ")
        args = ("--workers", workers) if workers else ()
        if name == "check":
            code, stderr = await _refused_check(path)
        else:
            code, stderr = await _refused_start("serve", "--config", str(path), *args)
    finally:
        await redis.stop()
    assert code == 2
    assert (
        f"llm-gateway: config error: {path}: {section}.redis_url: Redis refused the database "
        "the URL selects (Redis said: DB index is out of range)"
    ) in stderr
    assert stderr.count("config error") == 1
    assert "Traceback" not in stderr


async def _refused_check(path: Path) -> tuple[int, str]:
    """`llm-gateway check --config PATH`, expected to refuse the config: its exit code and
    stderr."""
    code, _, stderr = await _checked(path)
    return code, stderr


async def _checked(path: Path) -> tuple[int, str, str]:
    """`llm-gateway check --config PATH`: its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "check", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# A password in a Redis URL (the ledger's may carry one), never to be printed.
_URL_PASSWORD = "in-url-0123456789"


async def test_check_warns_of_a_redis_that_does_not_answer_without_its_password(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A Redis refusing connections (down) is one warning line from `check`, naming the
    keys that use it, its address without the password and what failed; the config still
    passes and `check` exits 0, as for its other warnings: Redis may come up later.

    Before, `check` said nothing of it: the first sign was the calls' failing stores.
    """
    with refusing_port() as port:
        url = f"redis://127.0.0.1:{port}/0"
        path = _redis_sections_config(
            tmp_path,
            upstream.base_url,
            url,
            ledger_url=f"redis://gw:{_URL_PASSWORD}@127.0.0.1:{port}/0",
        )
        code, stdout, stderr = await _checked(path)
    assert code == 0, stderr
    assert f"config {path}: ok" in stdout
    [warning] = [line for line in stderr.splitlines() if "does not answer" in line]
    assert warning.startswith(
        f"warning: cache.redis_url, auth.redis_url, ledger.redis_url: Redis at {url} does not "
        f"answer (Error 111 connecting to 127.0.0.1:{port}."
    )
    assert warning.endswith(
        "); serve starts anyway and runs through it as through an outage (budgets and tenant "
        "limits fail open, the cache is skipped) until it answers"
    )
    assert _URL_PASSWORD not in stdout + stderr


@contextlib.asynccontextmanager
async def _redis_url_served_by(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A Redis URL whose connections `handler` serves, on loopback, for the block."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _hung_redis() -> AsyncIterator[str]:
    """The URL of a Redis that takes connections and never answers (a partition's)."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client leaves
        writer.close()

    async with _redis_url_served_by(never_answer) as url:
        yield url


async def test_check_waits_for_a_hung_redis_at_most_a_second(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A Redis that takes the connection and never answers is warned of after at most
    1 s, whatever its section's timeout (30 s here): a start is not held for it."""
    async with _hung_redis() as url:
        data = gateway_config_data(
            upstream.base_url, ledger={"redis_url": url, "operation_timeout_s": 30}
        )
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        code, _, stderr = await _checked(path)
    assert code == 0, stderr
    assert (
        f"warning: ledger.redis_url: Redis at {url} does not answer (no answer within 1 s)"
        in stderr
    )


@pytest.mark.redis
async def test_check_says_nothing_of_a_redis_that_answers(
    upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A Redis that answers the PING gets no warning from `check`."""
    path = _redis_sections_config(tmp_path, upstream.base_url, redis_server.url)
    code, stdout, stderr = await _checked(path)
    assert code == 0, stderr
    assert f"config {path}: ok" in stdout
    assert "warning" not in stderr


def _redis_sections_config(
    tmp_path: Path, base_url: str, url: str, *, ledger_url: str | None = None
) -> Path:
    """A config whose cache, auth and ledger all use the Redis at `url` (the ledger's at
    `ledger_url`, when given: one with credentials)."""
    data = gateway_config_data(
        base_url,
        cache={"backend": "redis", "redis_url": url},
        auth={"redis_url": url},
        ledger={"redis_url": ledger_url or url},
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# What Redis in protected mode (its default setting, with no password for its default
# user) writes to each connection from a host other than its own as it accepts it,
# before closing it: a real one cannot be made to on loopback.
_PROTECTED_MODE_REPLY = (
    b"-DENIED Redis is running in protected mode because protected mode is enabled and no "
    b"password is set for the default user. In this mode connections are only accepted "
    b"from the loopback interface. If you want to connect from external computers to Redis "
    b"you may adopt one of the following solutions: ...\r\n"
)


@contextlib.asynccontextmanager
async def _redis_in_protected_mode() -> AsyncIterator[str]:
    """The URL of a Redis refusing every connection as protected mode does."""

    async def deny(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_PROTECTED_MODE_REPLY)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async with _redis_url_served_by(deny) as url:
        yield url


@pytest.mark.parametrize("command", ["serve 1", "serve 2", "check"])
@pytest.mark.parametrize("section", ["cache", "auth", "ledger"])
async def test_a_redis_in_protected_mode_stops_the_start_with_status_2(
    tmp_path: Path, section: str, command: str
) -> None:
    """A Redis that refuses the gateway's connections in protected mode (DENIED: no
    password for its default user, and the gateway on another host) stops `serve` and
    `check` with one config error on the URL's key, as a password it asks for does.

    Before, the gateway started and `check` said ok, while every command failed: each
    usage row was lost (`ledger.record_lost`), budgets and tenant limits were open.
    """
    async with _redis_in_protected_mode() as url:
        path = _redis_config(tmp_path, section, url, None)
        name, _, workers = command.partition(" ")
        args = ("--workers", workers) if workers else ()
        if name == "check":
            code, stderr = await _refused_check(path)
        else:
            code, stderr = await _refused_start("serve", "--config", str(path), *args)
    assert code == 2
    assert (
        f"llm-gateway: config error: {path}: {section}.redis_url: Redis refuses connections "
        "from other hosts in protected mode (Redis said: DENIED Redis is running in protected "
        "mode because protected mode is enabled and no password is set for the default user.)"
        "; give its default user a password"
    ) in stderr
    assert stderr.count("config error") == 1
    assert "Traceback" not in stderr


@pytest.mark.redis
async def test_a_redis_user_refused_only_ping_starts(tmp_path: Path) -> None:
    """A least-privilege ACL user with every command the gateway sends but PING: its
    credentials were taken, so the gateway starts. Before, the start check's PING got
    NOPERM and `serve` exited 2, refusing a user that would have worked."""
    import redis.asyncio

    server = RedisServer(password=_REDIS_PASSWORD)
    await server.start()
    try:
        admin = redis.asyncio.Redis.from_url(server.url, password=_REDIS_PASSWORD)
        await admin.execute_command("ACL", "SETUSER", "gw", "on", ">gwpass", "~*", "&*", "+@all")
        await admin.execute_command("ACL", "SETUSER", "gw", "-ping")
        await admin.aclose()
        url = f"redis://gw:gwpass@127.0.0.1:{server.port}/0"
        path = tmp_path / "gateway.yaml"
        path.write_text(
            yaml.safe_dump(gateway_config_data("http://127.0.0.1:9/v1", ledger={"redis_url": url}))
        )
        line, _ = await _first_line_then_sigterm(path)
    finally:
        await server.stop()
    assert line.startswith("llm-gateway listening on 127.0.0.1:")


async def test_a_redis_that_does_not_answer_at_start_is_an_outage_started_through(
    tmp_path: Path,
) -> None:
    """Every Redis at a closed port: the gateway starts and serves as it would through
    an outage (fail open, as documented), its start check taking it for none."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
        data = gateway_config_data(
            "http://127.0.0.1:9/v1",
            cache={"backend": "redis", "redis_url": url},
            auth={"redis_url": url},
            ledger={"redis_url": url},
        )
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        line, returncode = await _first_line_then_sigterm(path)
    assert line.startswith("llm-gateway listening on 127.0.0.1:")
    assert returncode == 0


def _without_descriptors(*fds: int) -> tuple[str, ...]:
    """The start of a command line that runs the rest with `fds` closed, as `>&-` does.

    A shell rather than a `preexec_fn`: that runs Python in the forked child of this
    threaded test process, where a library's fork handler can abort it before the exec
    (status -6, the gateway never started)."""
    closing = " ".join(f"{fd}>&-" for fd in fds)
    return ("sh", "-c", f'exec "$@" {closing}', "sh")


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("closed", [(1,), (0, 1, 2)], ids=["stdout", "all"])
async def test_a_gateway_started_without_standard_output_stops_with_status_0(
    upstream: FakeUpstream, tmp_path: Path, closed: tuple[int, ...], workers: str
) -> None:
    """`serve >&-` (a daemonizing script's): it serves, and SIGTERM ends it with 0.

    Before, one process took a descriptor the server opened for fd 1, and at the end of
    a clean drain the event loop aborted the process as it closed it: `uv__close:
    Assertion 'fd > STDERR_FILENO' failed`, SIGABRT, status 134 (and a core dump).
    """
    path = _write_config(tmp_path, upstream.base_url, listen="127.0.0.1:0")
    process = await asyncio.create_subprocess_exec(
        *_without_descriptors(*closed),
        sys.executable, "-m", "service", "serve", "--config", str(path), "--workers", workers,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    await _answers_then_stops(process, await _listening_port(process))
    assert process.returncode == 0


async def _listening_port(process: asyncio.subprocess.Process) -> int:
    """The port the gateway `process` serves on; killed if it never does."""
    try:
        return await listening_port(process)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise


async def _answers_then_stops(process: asyncio.subprocess.Process, port: int) -> bytes:
    """One call answered by the gateway `process` serves on `port`, then SIGTERM; what
    it wrote on stderr (nothing unless piped) once it exited."""
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            reply = await stub.Complete(chat(), wait_for_ready=True, timeout=30)
        assert reply.content == "Hello from fake"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    return stderr or b""


async def _first_line_then_sigterm(path: Path) -> tuple[str, int | None]:
    """`serve --workers 1` on the config at `path`: its first line on stdout, and its exit
    status once SIGTERM stopped it."""
    process = await _spawn("serve", "--config", str(path), "--workers", "1")
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=30)
    return line.decode(), process.returncode


async def test_workers_share_one_port_and_drain_on_sigterm(upstream, tmp_path):
    """`serve --workers 2` answers on one port from two processes, and on one health port
    (`server.health_listen`, port 0 chosen once for all), and exits 0 on SIGTERM."""
    path = _write_config(tmp_path, upstream.base_url, health_listen="127.0.0.1:0")
    process = await _spawn("serve", "--config", str(path), "--workers", "2")
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert "(2 workers), health on 127.0.0.1:" in line
        address = line.split(" on ", 1)[1].split(" ", 1)[0]
        health_address = line.rsplit(" on ", 1)[1].strip()
        for _ in range(6):  # each worker answers on the one health port
            async with grpc.aio.insecure_channel(health_address) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) >= 2
        for _ in range(6):  # fresh channels land on either worker; every one must answer
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.CompletionServiceStub(channel)
                response = await stub.Complete(chat(), timeout=10)
            assert response.content == "Hello from fake"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_workers_drain_when_the_terminal_closes(upstream, tmp_path):
    """SIGHUP to the whole process group (its terminal closed), `--workers 2`: the call in
    flight completes and the supervisor exits 0.

    Before, SIGHUP killed the supervisor and every worker at once: the call cut."""
    path = _write_config(tmp_path, upstream.base_url)
    process = await _spawn("serve", "--config", str(path), "--workers", "2", own_group=True)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        address = line.split(" on ", 1)[1].split(" ", 1)[0]
        await _completes_across(lambda: os.killpg(process.pid, signal.SIGHUP), upstream, address)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_sighup_ignored_at_start_stays_ignored(upstream, tmp_path):
    """Started with SIGHUP ignored (`nohup llm-gateway serve`), the gateway goes on serving
    after a SIGHUP, as `nohup` asks, and SIGTERM still stops it with status 0."""
    path = _write_config(tmp_path, upstream.base_url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
        "-m", "service", "serve", "--config", str(path), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        address = line.split(" on ", 1)[1].split(" ", 1)[0]
        os.killpg(process.pid, signal.SIGHUP)
        for _ in range(4):  # fresh channels land on either worker; each still answers
            async with grpc.aio.insecure_channel(address) as channel:
                response = await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=10)
            assert response.content == "Hello from fake"
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


@pytest.mark.parametrize("taken", ["listen", "health_listen"])
async def test_a_taken_port_is_refused_before_the_local_model_starts(upstream, monkeypatch, taken):
    """With the local model to run, a port something else listens on is refused first:
    llama.cpp's start (minutes on a fresh machine) is not waited out to learn it.

    Before, the port was bound only once the local model had started.
    """
    started: list[object] = []

    class LocalModel:
        def __init__(self, *args: object, **options: object) -> None:
            started.append(args)

        async def __aenter__(self) -> LocalModel:
            raise AssertionError("the local model was started")

        async def __aexit__(self, *exc_info: object) -> None:
            pass

    monkeypatch.setattr("service.server.LocalModelServer", LocalModel)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = f"127.0.0.1:{holder.getsockname()[1]}"
        config = gateway_config(
            upstream.base_url,
            server={"listen": "127.0.0.1:0", taken: held},
            local_model={"enabled": "always"},
        )
        with pytest.raises(ListenError, match=f"cannot listen on {held}: the address is taken"):
            async with GatewayServer(config):
                pass
    assert started == []


def _ephemeral_ports_start() -> int:
    """The lowest port the kernel hands out for port 0 and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


_EPHEMERAL_PORTS_START = max(20_000, _ephemeral_ports_start())


def _held_port(family: socket.AddressFamily, host: str) -> socket.socket:
    """A socket listening on `host` at a port free on the other loopback address too.

    The port is below the kernel's ephemeral range: the other address must stay free
    until the gateway binds it, and a port from that range (port 0's) may meanwhile
    become another test process's listener or the local end of its connection (a bind
    of 0.0.0.0 failed "Address already in use" in a full run)."""
    while True:
        holder = socket.socket(family, socket.SOCK_STREAM)
        try:
            holder.bind((host, random.randrange(10_000, _EPHEMERAL_PORTS_START)))
        except OSError:
            holder.close()
            continue
        port = holder.getsockname()[1]
        other = (socket.AF_INET6, "::1") if family == socket.AF_INET else (socket.AF_INET, "")
        with socket.socket(other[0], socket.SOCK_STREAM) as probe:
            try:
                probe.bind((other[1], port))
            except OSError:
                holder.close()
                continue
        holder.listen()
        return holder


@pytest.mark.parametrize(
    ("family", "held", "listen"),
    [
        # grpc listens on [::1] alone, the other address of localhost
        (socket.AF_INET, "127.0.0.1", "localhost"),
        # grpc's wildcard falls back to 0.0.0.0 when [::] (both stacks) is refused
        (socket.AF_INET6, "::1", "[::]"),
    ],
)
async def test_the_port_check_before_the_local_model_refuses_only_what_the_bind_would(
    upstream, monkeypatch, family, held, listen
):
    """The check before the local model's start refuses no address the bind accepts.

    Before, it tried one address of the host and refused `localhost:P` with 127.0.0.1:P
    taken (or `[::]:P` with [::1]:P taken), which starts without the local model.
    """
    try:
        socket.socket(socket.AF_INET6).close()
        holder = _held_port(family, held)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    started: list[object] = []

    class LocalModel:
        def __init__(self, *args: object, **options: object) -> None:
            pass

        async def __aenter__(self) -> LocalModel:
            started.append(self)
            raise LocalModelUnavailable("the local model's start, reached")

        async def __aexit__(self, *exc_info: object) -> None:
            pass

    monkeypatch.setattr("service.server.LocalModelServer", LocalModel)
    with holder:
        sections: dict[str, Any] = {
            "server": {"listen": f"{listen}:{holder.getsockname()[1]}"},
            "auth": {"allow_auth_off_on_public_listen": True},  # [::] is public
        }
        async with GatewayServer(gateway_config(upstream.base_url, **sections)):
            pass  # the bind accepts it
        config = gateway_config(upstream.base_url, **sections, local_model={"enabled": "always"})
        with pytest.raises(LocalModelUnavailable, match="reached"):
            async with GatewayServer(config):
                pass
    assert len(started) == 1


async def test_a_gateway_with_no_upstream_says_so_at_start(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every upstream disabled for want of its key, and no local model: the gateway starts
    (the keys may come later) but warns once, saying what mends it; calls are NOT_FOUND."""
    data = gateway_config_data("http://127.0.0.1:9")
    data["upstreams"][0]["api_key_env"] = "UNSET_PROVIDER_KEY"
    config = parse_config(data, source="<test>", environ={})
    with caplog.at_level("WARNING", logger="llm_gateway"):
        gateway = await start_gateway(config)
    said = [r for r in caplog.records if r.getMessage() == "gateway.no_upstream"]
    assert len(said) == 1
    assert "api_key_env" in said[0].fix
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat())
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_gateway_with_an_upstream_says_nothing_of_none(
    start_gateway: Any, upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning is for a gateway that can serve nothing only."""
    with caplog.at_level("WARNING", logger="llm_gateway"):
        await start_gateway(gateway_config(upstream.base_url))
    assert "gateway.no_upstream" not in [r.getMessage() for r in caplog.records]


# The C library (Python's probe, curl, ping) reads each as 127.0.0.1; grpc reads none.
_SHORTHANDS = {"listen": "127.1", "health_listen": "0x7f.1", "prometheus_host": "2130706433"}
_SHORTHAND = "is IPv4 shorthand, which grpc and the C library read differently: write"


def _config_listening_on(tmp_path: Path, base_url: str, key: str, host: str) -> Path:
    """A config whose `key` (`listen`, `health_listen` or `prometheus_host`) names `host`,
    at port 0, the other listens on 127.0.0.1."""
    server: dict[str, Any] = {"listen": "127.0.0.1:0", "allow_insecure_public_listen": True}
    telemetry: dict[str, Any] = {}
    if key == "prometheus_host":
        telemetry = {"prometheus_port": 0, "prometheus_host": host}
    else:
        server[key] = f"{host}:0"
    path = tmp_path / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(gateway_config_data(base_url, server=server, telemetry=telemetry))
    )
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("key", list(_SHORTHANDS))
async def test_a_listen_host_in_ipv4_shorthand_exits_2_naming_the_key(
    upstream, tmp_path, key, workers
):
    """`127.1`, `0x7f.1` or `2130706433` as a listen host exits 2, one line naming the
    key and the address to write, from one process or the workers' supervisor.

    Before, Python's probe read them as 127.0.0.1 and passed them, and grpc's resolver
    did not: `serve` exited 1 with grpc's own error line and "the address is taken or not
    local" (the workers: each one's), naming no key.
    """
    host = _SHORTHANDS[key]
    path = _config_listening_on(tmp_path, upstream.base_url, key, host)
    code, stderr = await _refused_start("serve", "--config", str(path), "--workers", workers)
    named = f"telemetry.{key}" if key == "prometheus_host" else f"server.{key}"
    purpose = " for Prometheus metrics" if key == "prometheus_host" else ""
    assert code == 2
    assert (
        f"llm-gateway: config error: {path}: {named}: cannot listen on {host}:0{purpose}: "
        f"{host} {_SHORTHAND} 127.0.0.1\n"
    ) in stderr
    assert "Traceback" not in stderr
    assert "Failed to add port" not in stderr  # grpc's own line


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_link_local_listen_host_without_its_zone_exits_2_naming_it(
    upstream, tmp_path, workers
):
    """This machine's link-local address without its zone (`%eth0`) exits 2 naming the
    key and the zone to add.

    Before, the probe passed it and grpc's bind failed "Invalid argument": exit 1, with
    grpc's own error line (the workers: the supervisor's bind, "Invalid argument").
    """
    found = link_local_address()
    if found is None:
        pytest.skip("no IPv6 link-local address here")
    address, interface = found
    path = _config_listening_on(tmp_path, upstream.base_url, "listen", f"[{address}]")
    code, stderr = await _refused_start("serve", "--config", str(path), "--workers", workers)
    assert code == 2
    assert (
        f"llm-gateway: config error: {path}: server.listen: cannot listen on [{address}]:0: "
        f"{address} is link-local, on {interface}: add its zone: [{address}%{interface}]\n"
    ) in stderr
    assert "Failed to add port" not in stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost", "0.0.0.0"])
async def test_a_host_of_this_machine_serves_on_every_listen_key(upstream, tmp_path, host):
    """The gRPC port, the health port and the Prometheus endpoint all on `host`: the
    gateway starts, answers on both ports and exits 0 on SIGTERM (`0.0.0.0` with auth off
    allowed)."""
    if host == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    server = {
        "listen": f"{host}:0",
        "health_listen": f"{host}:0",
        "allow_insecure_public_listen": True,
    }
    telemetry = {"prometheus_port": 0, "prometheus_host": host.strip("[]")}
    path = tmp_path / "gateway.yaml"
    data = gateway_config_data(upstream.base_url, server=server, telemetry=telemetry)
    path.write_text(yaml.safe_dump(data))
    process = await _spawn("serve", "--config", str(path), "--workers", "1")
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert f", health on {host}:" in line
        address = line.split(" on ", 1)[1].split(",", 1)[0]
        async with grpc.aio.insecure_channel(address) as channel:
            response = await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=10)
        assert response.content == "Hello from fake"
        async with grpc.aio.insecure_channel(line.rsplit(" on ", 1)[1].strip()) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_gateway_whose_output_pipe_has_no_reader_serves_and_stops_with_status_0(
    upstream: FakeUpstream, tmp_path: Path, workers: str
) -> None:
    """`serve | head -0`: the pipe's reader gone before the "listening on" line. The line
    is lost; the gateway serves and SIGTERM ends it with 0, nothing on stderr but logs.

    Before, the line's BrokenPipeError stopped the server at once, with a traceback."""
    path = _write_config(tmp_path, upstream.base_url, listen="127.0.0.1:0")
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader: a write to the pipe fails EPIPE
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "serve", "--config", str(path), "--workers", workers,
            stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
    finally:
        os.close(write_end)
    stderr = await _answers_then_stops(process, await _listening_port(process))
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    assert b"BrokenPipeError" not in stderr
