"""`serve --workers N` as an operator meets it: a busy port, signals while starting, failures,
a worker that dies while serving."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.server import LOCAL_MODEL_HEALTH
from tests.conftest import FAKE_MODEL, chat, gateway_config_data
from tests.fake_upstream import FakeUpstream, Hang
from tests.host_addresses import link_local_address
from tests.integration.gateway_process import is_running
from tests.integration.helpers import error_info, retry_delay_s
from tests.integration.pki import make_pki
from tests.integration.test_local_model_restart import MODEL, _squatting, stand_in_local_model
from tests.ports import refusing_port
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
_HANG_GUARD_S = 60.0
# A dead worker's replacement started after 0.1 s (1 s otherwise), where a test waits for it.
_SHORT_BACK_OFF = {"_RESTART_DELAY_S": 0.1}


def _write_config(
    tmp_path: Path, base_url: str = "http://127.0.0.1:1/v1", **sections: object
) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config_data(base_url, **sections)))
    return path


def _entry(constants: dict[str, float], setup: str = "") -> list[str]:
    """`python -m service` as its arguments, or a program that runs it with some of
    service.workers' constants (its timings) set first, in the supervisor, and `setup`
    (code that may replace its functions) run after them."""
    if not constants and not setup:
        return ["-m", "service"]
    assigned = "".join(f"workers.{name} = {value!r}\n" for name, value in constants.items())
    return [
        "-c",
        "import sys; from service import early_signals; early_signals.hold()\n"
        f"from service import workers\n{assigned}{setup}"
        "from service.main import main; sys.exit(main())",
    ]


@contextlib.asynccontextmanager
async def _serve(
    *args: str,
    own_group: bool = False,
    log_level: str = "WARNING",
    constants: dict[str, float] | None = None,
    setup: str = "",
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *_entry(constants or {}, setup), "serve", *args, "--log-level", log_level,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        start_new_session=own_group,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        # Read to the end: the workers and multiprocessing's resource tracker hold the pipes
        # a moment after the supervisor exits, and a pipe left open outlives the test's loop.
        async with asyncio.timeout(_HANG_GUARD_S):
            await process.communicate()


class _Log:
    """The stderr of the supervisor and its workers, read as it comes."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._grown = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            async for line in stream:
                self.lines.append(line.decode())
                self._grown.set()
        finally:
            self._grown.set()

    def events(self, event: str) -> list[str]:
        """The lines logging `event`, in order."""
        pattern = re.compile(rf" {re.escape(event)}( |$)")
        return [line for line in self.lines if pattern.search(line)]

    async def nth(self, event: str, n: int = 1) -> str:
        """The `n`th line logging `event`, once logged."""
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(found := self.events(event)) < n:
                assert not self.reader.done(), f"no {event} #{n} in:\n{''.join(self.lines)}"
                self._grown.clear()
                await self._grown.wait()
        return found[n - 1]


@contextlib.asynccontextmanager
async def _serve_logged(
    *args: str, constants: dict[str, float] | None = None, setup: str = "", log_level: str = "INFO"
) -> AsyncIterator[tuple[asyncio.subprocess.Process, _Log]]:
    """`_serve` at `log_level`, its stderr read meanwhile (INFO lines would fill the pipe)."""
    async with _serve(*args, log_level=log_level, constants=constants, setup=setup) as process:
        assert process.stderr is not None
        log = _Log(process.stderr)
        try:
            yield process, log
        finally:
            if process.returncode is None:
                process.kill()
            # Before `_serve` reads the rest: one reader at a time.
            async with asyncio.timeout(_HANG_GUARD_S):
                await log.reader


async def _listening(process: asyncio.subprocess.Process) -> str:
    """The address from the supervisor's `llm-gateway listening on ADDR (N workers)`."""
    assert process.stdout is not None
    async with asyncio.timeout(120):
        line = (await process.stdout.readline()).decode()
    assert line.startswith("llm-gateway listening on "), line
    return line.split()[3]


async def _stop_cleanly(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the supervisor; it exits 0 within the hang guard."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(_HANG_GUARD_S):
        assert await process.wait() == 0


def _pid(line: str) -> int:
    return int(re.findall(r" pid=(\d+)", line)[0])


async def _calls(address: str, count: int) -> None:
    """`count` calls, each on a connection of its own (so the kernel picks a worker for
    each), each of which must succeed."""
    for _ in range(count):
        # A pool of its own: channels to one address otherwise share one connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            reply = await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=10)
        assert reply.content == "Hello from fake"


async def _calls_answered(port: int) -> float | None:
    """Complete calls the worker whose Prometheus endpoint is `port` answered; None when
    nothing listens there (that worker is dead)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as reply,
        ):
            text = await reply.text()
    except aiohttp.ClientConnectorError:
        return None
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("llm_gateway_requests_total") and 'rpc_method="Complete"' in line
    )


def _killed_if_running(pids: Iterable[int]) -> list[int]:
    """Those of `pids` still running, each killed (SIGKILL): none is left behind, whatever
    the test finds."""
    alive = [pid for pid in pids if is_running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def _worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children that are gateway workers (not the resource tracker)."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    pids = []
    for pid in path.read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


async def test_sigterm_while_workers_start_stops_them_all(tmp_path):
    """SIGTERM before the workers are ready: the supervisor stops and leaves no worker behind.

    Before, the supervisor only handled SIGTERM once every worker was ready; until then the
    default action killed it at once and the workers, orphaned, kept serving the port.
    """
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", "2") as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(workers := _worker_pids(process.pid)) < 2:
                await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
        alive = _killed_if_running(workers)
        assert alive == []
        assert code == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
async def test_ctrl_c_or_a_closed_terminal_while_workers_start_is_a_clean_stop(tmp_path, sig):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the workers too, as
    they start, and its closing SIGHUP: a clean stop (status 0, no traceback) as with
    SIGTERM to the supervisor.

    Before, a worker still importing the gateway got KeyboardInterrupt: a traceback on
    stderr and an exit by SIGINT, which the supervisor took for a failure (status 1); and
    SIGHUP killed the supervisor and the workers outright (a worker still importing, with
    SIGHUP not held back, died of it: `workers.worker_died`).
    """
    path = _write_config(tmp_path)
    async with _serve("--config", str(path), "--workers", "2", own_group=True) as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(workers := _worker_pids(process.pid)) < 2:
                await asyncio.sleep(0.01)
        os.killpg(process.pid, sig)
        async with asyncio.timeout(_HANG_GUARD_S):
            _, err = await process.communicate()
        alive = _killed_if_running(workers)
    assert alive == []
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"workers.worker_died" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_config_error_found_at_start_exits_2_at_once(tmp_path, workers):
    """A keys file the server refuses at start: status 2 and one line, as the README
    promises for config errors, with one process and with workers.

    Before, one process gave a traceback and status 1; with workers the supervisor waited
    up to 120 s for workers that had already died, then failed with a traceback while
    still joining them.
    """
    keys = tmp_path / "keys"
    keys.write_text("not-a-digest tenant\n")
    path = _write_config(tmp_path, auth={"mode": "keys", "keys_file": str(keys)})
    async with _serve("--config", str(path), "--workers", workers) as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            out, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert b"listening" not in out
    assert f"config error: {path}: auth.keys_file".encode() in err
    assert b"Traceback" not in err


async def test_a_config_error_every_worker_finds_is_printed_once(tmp_path):
    """A keys file each of 2 workers refuses as it starts: one line saying why, status 2.

    Before, each worker printed the line itself: 2 identical lines, read as 2 problems.
    """
    keys = tmp_path / "keys"
    keys.write_text("not-a-digest tenant\n")
    path = _write_config(tmp_path, auth={"mode": "keys", "keys_file": str(keys)})
    async with _serve("--config", str(path), "--workers", "2") as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            _, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    lines = [line for line in err.decode().splitlines() if "config error" in line]
    assert lines == [
        f"llm-gateway: config error: {path}: auth.keys_file: {keys}:1: "
        + ("sha256 must be 64 lowercase hex digits (the key's hash, never the key)")
    ]


@pytest.mark.parametrize("set_by", ["flag", "config"])
async def test_workers_set_with_state_in_memory_are_warned_of_once(tmp_path, set_by):
    """`--workers 2` (or `server.workers: 2`) with the ledger and an upstream's rate in
    memory: one `workers.state_per_worker` warning, from the supervisor, naming both.

    Before, nothing said that each worker then holds its own usage and limits (a tenant
    through at twice its budget, GetUsage answering half).
    """
    upstream = {"name": "up0", "base_url": "http://127.0.0.1:1/v1", "models": [FAKE_MODEL]}
    upstreams = [{**upstream, "requests_per_minute": 600}]
    server = {"workers": 2} if set_by == "config" else {}
    path = _write_config(tmp_path, upstreams=upstreams, server=server)
    flag = ("--workers", "2") if set_by == "flag" else ()
    async with _serve_logged("--config", str(path), *flag) as (process, log):
        await _listening(process)
        await _stop_cleanly(process)
    [warning] = log.events("workers.state_per_worker")
    assert " WARNING " in warning
    assert warning.rstrip().endswith("worker=supervisor")
    assert "workers=2 " in warning
    assert "ledger.redis_url" in warning
    assert "upstream 'up0''s rates are per process" in warning


_A_DIGEST = "1" * 64


def _keys_in_clear(tmp_path: Path) -> dict[str, object]:
    """Caller keys on every address without TLS; an upstream's key over plain http to
    another host, for a model without a price."""
    upstream = {
        "name": "up0",
        "base_url": "http://10.255.255.1:1/v1",  # never called: the gateway only starts
        "models": ["unpriced-model"],
        "api_key_env": "WORKERS_TEST_KEY",
    }
    return {
        "server": {"listen": "0.0.0.0:0"},
        "auth": {"mode": "keys", "keys": [{"sha256": _A_DIGEST, "tenant": "t1"}]},
        "upstreams": [upstream],
    }


def _auth_off_forced(tmp_path: Path) -> dict[str, object]:
    """Auth off forced on every address, keys naming tenant `default` (in the config and
    in the keys file), and no upstream enabled."""
    keys = tmp_path / "keys"
    keys.write_text(f"{'2' * 64} default\n")
    auth = {
        "mode": "off",
        "allow_auth_off_on_public_listen": True,
        "keys": [{"sha256": _A_DIGEST, "tenant": "default"}],
        "keys_file": str(keys),
    }
    upstream = {
        "name": "up0",
        "base_url": "http://127.0.0.1:1/v1",
        "models": [FAKE_MODEL],
        "api_key_env": "WORKERS_TEST_UNSET",
    }
    return {"server": {"listen": "0.0.0.0:0"}, "auth": auth, "upstreams": [upstream]}


@pytest.mark.parametrize(
    ("sections", "warnings"),
    [
        (
            _keys_in_clear,
            [
                "security.keys_without_tls",
                "upstream.key_over_plain_http upstream=up0",
                "pricing.model_without_price model=unpriced-model",
            ],
        ),
        (
            _auth_off_forced,
            [
                "security.auth_off_on_public_listen",
                "auth.default_tenant_key entry=auth.keys[0]",
                "auth.default_tenant_key entry={tmp_path}/keys:1",
                "gateway.no_upstream",
            ],
        ),
    ],
)
async def test_each_start_warning_is_said_once_by_the_gateway(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sections: Callable[[Path], dict[str, object]],
    warnings: list[str],
) -> None:
    """With `--workers 2`, each warning of the config found at start is one line: the
    listen policy's from the supervisor, the rest from worker 0.

    Before, the supervisor and each worker said the listen policy's, and each worker the
    others: 3 and 2 lines of one problem, read as several."""
    monkeypatch.setenv("WORKERS_TEST_KEY", "sk-test")
    monkeypatch.delenv("WORKERS_TEST_UNSET", raising=False)
    path = _write_config(tmp_path, **sections(tmp_path))
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        await _listening(process)
        await _stop_cleanly(process)
    said = {}
    for warning in warnings:
        event, _, detail = warning.format(tmp_path=tmp_path).partition(" ")
        said[warning] = [line for line in log.events(event) if detail in line]
    assert {w: len(lines) for w, lines in said.items()} == dict.fromkeys(warnings, 1), said
    writers = [lines[0].rstrip().rpartition(" ")[2] for lines in said.values()]
    assert writers == ["worker=supervisor"] + ["worker=0"] * (len(warnings) - 1)


# A password in the ledger's Redis URL, never to be logged.
_URL_PASSWORD = "in-url-0123456789"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_redis_that_does_not_answer_at_start_is_warned_of_once(
    tmp_path: Path, workers: str
) -> None:
    """A Redis refusing connections as the gateway starts: it starts (an outage, run
    through) and logs one `redis.no_answer_at_start` warning naming the Redis without its
    password, the keys using it and the error; with `--workers 2`, from the supervisor.

    Before, nothing was said until the first call's stores failed and cooled down.
    """
    with refusing_port() as port:
        url = f"redis://127.0.0.1:{port}/0"
        path = _write_config(
            tmp_path,
            cache={"backend": "redis", "redis_url": url},
            auth={"redis_url": url},
            ledger={"redis_url": f"redis://gw:{_URL_PASSWORD}@127.0.0.1:{port}/0"},
        )
        async with _serve_logged("--config", str(path), "--workers", workers) as (process, log):
            await _listening(process)
            await _stop_cleanly(process)
    [warning] = log.events("redis.no_answer_at_start")
    assert " WARNING " in warning
    assert (
        f" redis={url} keys=cache.redis_url, auth.redis_url, ledger.redis_url "
        f"error=Error 111 connecting to 127.0.0.1:{port}."
    ) in warning
    if workers == "2":
        assert warning.rstrip().endswith("worker=supervisor")
    assert _URL_PASSWORD not in "".join(log.lines)


@pytest.mark.redis
async def test_a_redis_that_answers_at_start_is_not_warned_of(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """No `redis.no_answer_at_start` for a Redis that answers the start's PING."""
    url = redis_server.url
    path = _write_config(
        tmp_path,
        cache={"backend": "redis", "redis_url": url},
        auth={"redis_url": url},
        ledger={"redis_url": url},
    )
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        await _listening(process)
        await _stop_cleanly(process)
    assert log.events("server.workers")  # the log was read
    assert log.events("redis.no_answer_at_start") == []


async def test_a_keys_file_turned_unusable_is_said_by_worker_0_alone(tmp_path: Path) -> None:
    """With `--workers 2`, a keys file made malformed while serving is said by worker 0,
    every check, whichever worker the calls reach (worker 1 says it at DEBUG).

    Before, each worker that a call reached said it at every check, and none said it
    while no call came."""
    keys = tmp_path / "keys"
    keys.write_text(f"{hashlib.sha256(b'sk-worker-test').hexdigest()} t1\n")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0.1}
    key = [("authorization", "Bearer sk-worker-test")]
    path = _write_config(tmp_path, auth=auth)
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        address = await _listening(process)
        keys.write_text("not a key line\n")
        # Calls till the third line, each on a connection of its own (the kernel picks a
        # worker for each): by worker 0's third check, worker 1 has checked the file too.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with asyncio.timeout(_HANG_GUARD_S):
            while len(log.events("auth.keys_file_unusable")) < 3:
                async with grpc.aio.insecure_channel(address, options=options) as channel:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        stub = pb_grpc.CompletionServiceStub(channel)
                        await stub.Complete(chat(), metadata=key, timeout=10)
        await _stop_cleanly(process)
    said = log.events("auth.keys_file_unusable")
    assert {line.split()[2] for line in said} == {"WARNING"}, said
    assert {line.rstrip().rpartition(" ")[2] for line in said} == {"worker=0"}, said


async def test_a_keys_file_loosened_while_serving_is_said_by_worker_0_alone(
    tmp_path: Path,
) -> None:
    """With `--workers 2`, a keys file made writable by every user while serving is
    warned of once, by worker 0 (worker 1, which finds it too, says it at DEBUG).

    Before, only the supervisor's check as the gateway started said it."""
    keys = tmp_path / "keys"
    keys.write_text(f"{hashlib.sha256(b'sk-worker-test').hexdigest()} t1\n")
    keys.chmod(0o600)
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0.1}
    path = _write_config(tmp_path, auth=auth)
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, log_level="DEBUG") as (process, log):
        await _listening(process)
        keys.chmod(0o666)
        await log.nth("auth.keys_file_writable", 2)  # each worker checks it between calls
        await _stop_cleanly(process)
    said = sorted(
        (line.split()[2], line.rstrip().rpartition(" ")[2])
        for line in log.events("auth.keys_file_writable")
    )
    assert said == [("DEBUG", "worker=1"), ("WARNING", "worker=0")]


async def test_a_keys_file_whose_read_hangs_keeps_no_gateway_from_exiting(
    tmp_path: Path,
) -> None:
    """A keys file whose read never returns (a hung network mount; a FIFO no one writes
    stands in for it) leaves its check's thread stuck: SIGTERM still stops the gateway,
    which exits 0, and keyed calls meanwhile are answered from the keys read last.

    Before, the check ran in the loop's default executor, which the process waits for as
    it exits: it logged `server.stopped` and ran on, and the keyed call waited for the
    check till its deadline."""
    keys = tmp_path / "keys"
    keys.write_text(f"{hashlib.sha256(b'sk-worker-test').hexdigest()} t1\n")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0.1}
    path = _write_config(tmp_path, auth=auth)
    async with _serve("--config", str(path)) as process:
        address = await _listening(process)
        keys.unlink()
        os.mkfifo(keys)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.CompletionServiceStub(channel)
                key = [("authorization", "Bearer sk-worker-test")]
                error = await _rpc_error(stub.Complete(chat(), metadata=key, timeout=30))
            # Past the keys' check: its upstream (port 1) refuses the connection.
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            await _stop_cleanly(process)
        finally:
            with contextlib.suppress(OSError):  # ENXIO: no reader left
                os.close(os.open(keys, os.O_WRONLY | os.O_NONBLOCK))


async def _rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _signalled_at_start(sig: signal.Signals) -> str:
    """Code for the supervisor: worker 0's first process gets `sig` as soon as it is
    started, before it can listen."""
    return (
        "import os, signal\n"
        "start = workers._start\n"
        "def signalled(worker, *args, **kwargs):\n"
        "    run = start(worker, *args, **kwargs)\n"
        f"    if worker.index == 0: os.kill(run.process.pid, {int(sig)})\n"
        "    return run\n"
        "workers._start = signalled\n"
    )


async def test_a_worker_killed_before_it_listens_is_named_in_the_start_failure(tmp_path):
    """A worker killed during the first start (the OOM killer, as every worker imports at
    once): status 1, and `workers.start_failed` says which worker died and how.

    Before, the line said nothing more, and a killed worker prints nothing of its own.
    """
    setup = _signalled_at_start(signal.SIGKILL)
    args = ("--config", str(_write_config(tmp_path)), "--workers", "2")
    async with _serve_logged(*args, setup=setup) as (process, log):
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
        failed = await log.nth("workers.start_failed")
    assert code == 1
    assert " index=0 " in failed
    assert "signal=SIGKILL" in failed


async def test_a_worker_that_never_listens_is_named_in_the_start_failure(tmp_path):
    """A worker that has not listened when the first start's time is up: status 1, and
    `workers.start_failed` names it among those that had not listened."""
    setup = _signalled_at_start(signal.SIGSTOP)  # stopped: it never listens
    constants = {"_WORKER_START_TIMEOUT_S": 2.0, "_UNREADY_KILL_AFTER_S": 0.1}
    args = ("--config", str(_write_config(tmp_path)), "--workers", "2")
    async with _serve_logged(*args, constants=constants, setup=setup) as (process, log):
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
        failed = await log.nth("workers.start_failed")
    assert code == 1
    assert re.search(r" not_listening=\[0(, 1)?\] timeout_s=2.0", failed), failed


async def test_each_line_names_the_worker_or_the_supervisor_that_wrote_it(tmp_path):
    """`serve --workers 2`: each worker's lines end `worker=0` or `worker=1`, the
    supervisor's `worker=supervisor`.

    Before, the two workers' `server.started port=...` lines were identical, and no line
    said which process wrote it.
    """
    path = _write_config(tmp_path)
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        await _listening(process)
        await log.nth("server.started", 2)
        await _stop_cleanly(process)
    started = sorted(line.rsplit(" ", 1)[1] for line in log.events("server.started"))
    assert started == ["worker=0\n", "worker=1\n"]
    assert log.events("server.workers")[0].endswith(" worker=supervisor\n")
    lines = [line for line in log.lines if line[:1].isdigit()]  # not a traceback's
    assert all(len(re.findall(r" worker=(?:\d+|supervisor)$", line)) == 1 for line in lines)


async def test_prometheus_ports_past_65535_are_no_error_with_telemetry_off(tmp_path):
    """`telemetry.enabled: false` opens no Prometheus endpoint, so a `prometheus_port` whose
    range for the workers would pass 65535 is no reason to refuse: `serve --workers 2`
    serves, as one process does. Before, it exited 2 over ports it would never open."""
    async with FakeUpstream() as fake:
        path = _write_config(
            tmp_path, fake.base_url, telemetry={"enabled": False, "prometheus_port": 65535}
        )
        async with _serve("--config", str(path), "--workers", "2") as process:
            await _calls(await _listening(process), 2)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def _second_gateway_refused(config: Path, workers: str) -> tuple[int | None, bytes]:
    """A second gateway started on `config` (a port another gateway holds) with
    `workers`: asserted never to say it listens; its exit status and stderr."""
    async with _serve("--config", str(config), "--workers", workers) as second:
        assert second.stdout is not None
        async with asyncio.timeout(_HANG_GUARD_S):
            line = await second.stdout.readline()  # b"" once it exits
        assert b"listening" not in line
        async with asyncio.timeout(_HANG_GUARD_S):
            _, err = await second.communicate()
    return second.returncode, err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_another_gateway_serves_is_refused(tmp_path, workers):
    """Workers bind with SO_REUSEPORT; that must not let a second gateway join a busy port.

    Before, `serve --workers 2` on a port that another `--workers` gateway (same user)
    served started as if all was well, and the kernel split the callers between the two.
    """
    # The first listens on a port of its own choosing (one probed free and let go could be
    # bound by another test process before it); the second is given that port.
    first_config = _write_config(tmp_path)
    async with _serve("--config", str(first_config), "--workers", "2") as first:
        port = int((await _listening(first)).rsplit(":", 1)[1])
        (tmp_path / "second").mkdir()
        path = _write_config(tmp_path / "second", server={"listen": f"127.0.0.1:{port}"})
        returncode, err = await _second_gateway_refused(path, workers)
        assert returncode == 1
        # One line saying why, not a traceback.
        assert f"llm-gateway: cannot listen on 127.0.0.1:{port}".encode() in err
        assert b"Traceback" not in err
        first.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            assert await first.wait() == 0


def _port_closed_by_its_server() -> int:
    """A free loopback port with a connection in TIME_WAIT on it, as a gateway that
    drained leaves for a minute: its server side (bound as grpc binds) closed first."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            accepted.close()
            client.recv(1)  # the server's close has arrived: the client's goes second
        return int(listener.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_the_last_gateway_just_closed_is_served(tmp_path, workers):
    """A restart on the port of a gateway that has just drained (its connections closed
    by the server, in TIME_WAIT for a minute) serves with workers as with one process.

    Before, the supervisor reserved the port without SO_REUSEADDR, which grpc binds with:
    `serve --workers 2` exited 1, "Address already in use", for a minute after a drain.
    """
    port = _port_closed_by_its_server()
    async with FakeUpstream() as fake:
        path = _write_config(tmp_path, fake.base_url, server={"listen": f"127.0.0.1:{port}"})
        async with _serve("--config", str(path), "--workers", workers) as process:
            await _calls(await _listening(process), 2)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_port_of_a_gateway_whose_workers_are_all_dead_is_refused(tmp_path, workers):
    """While every worker is dead (its replacement stuck in its start), the supervisor
    still holds the port: a second gateway there, one process or workers, exits 1.

    Before, the supervisor held it by a socket bound with SO_REUSEADDR and not listening,
    which any other bind with SO_REUSEADDR passes (grpc's, a supervisor's check that the
    port is free): the second gateway served the port, as it did while the first's workers
    started (the local model's minutes), and a second supervisor's workers then shared it
    with the first's, the kernel splitting the callers between the two gateways.
    """
    path, cert = _tls_config_that_will_hang(tmp_path)
    # The stuck replacements' SIGKILL at the end; they are started at once.
    constants = {"_UNREADY_KILL_AFTER_S": 0.1, **_SHORT_BACK_OFF}
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=constants) as (first, log):
        address = await _listening(first)
        _hang_the_next_start(cert)
        for pid in _worker_pids(first.pid):
            os.kill(pid, signal.SIGKILL)
        replacements = [_pid(await log.nth("workers.worker_restarted", n)) for n in (1, 2)]
        try:
            (tmp_path / "second").mkdir()
            other = _write_config(tmp_path / "second", server={"listen": address})
            # Started as the replacements import the gateway, which none of them gets past
            # (its certificate is read before it binds): they never listen.
            async with asyncio.TaskGroup() as group:
                second = group.create_task(_second_gateway_refused(other, workers))
                for pid in replacements:
                    group.create_task(_stuck_in_open(pid))
            second_returncode, err = second.result()
            first.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await first.wait()
        finally:
            alive = _killed_if_running(replacements)
    assert (second_returncode, code, alive) == (1, 0, [])
    assert f"llm-gateway: cannot listen on {address}".encode() in err


def _link_local_host() -> str | None:
    """An IPv6 link-local address of this machine with its zone (`fe80::1%eth0`), if any."""
    found = link_local_address()
    return None if found is None else f"{found[0]}%{found[1]}"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_link_local_host_with_its_zone_is_served(tmp_path, workers):
    """`server.listen: "[fe80::...%eth0]:PORT"` serves with workers as with one process.

    Before, the supervisor bound the host's text, whose zone a bind does not read: it
    exited 1 with "Invalid argument" where one process served.
    """
    host = _link_local_host()
    if host is None:
        pytest.skip("no IPv6 link-local address here")
    async with FakeUpstream() as fake:
        server = {"listen": f"[{host}]:0", "allow_insecure_public_listen": True}
        path = _write_config(tmp_path, fake.base_url, server=server)
        async with _serve("--config", str(path), "--workers", workers) as process:
            await _calls(await _listening(process), 2)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def test_workers_stop_when_the_supervisor_is_killed_outright(tmp_path):
    """SIGKILL to the supervisor alone (not its process group): the workers drain and
    stop too, one stopped (SIGSTOP) at the time included.

    The kernel signals each worker when its parent dies; before, they went on serving the
    port with nobody left to stop them. A stopped worker acted on that SIGTERM never, and
    kept the port: the kernel now sends SIGCONT, which resumes it, and it drains.
    """
    path = _write_config(tmp_path)
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        await _listening(process)
        workers = _worker_pids(process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGSTOP)
        process.kill()  # not waited for: its pipes stay open while any worker lives
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                while alive := [pid for pid in workers if is_running(pid)]:
                    await asyncio.sleep(0.05)
        finally:
            _killed_if_running(workers)
        assert alive == []
        await log.nth("server.stopped", 2)  # each drained, none killed


async def test_an_error_of_the_supervisors_own_stops_its_workers_and_it_exits(tmp_path):
    """An error in the supervisor once its workers listen (here its "listening on" line
    raising): the workers are stopped, and it exits with the error.

    Before, it exited waiting on them (multiprocessing joins its children at exit), its
    stop signals ignored: the workers served on and the process hung until SIGKILL."""
    path = _write_config(tmp_path, server={"grace_period_s": 1})
    setup = (
        "def _failing(line):\n"
        "    raise RuntimeError('the supervisor failed')\n"
        "workers.announce = _failing\n"
    )
    async with _serve("--config", str(path), "--workers", "2", setup=setup) as process:
        async with asyncio.timeout(_HANG_GUARD_S):
            _, stderr = await process.communicate()
    assert process.returncode not in (0, None)
    assert b"the supervisor failed" in stderr


# Code for the supervisor: its loop's default pool (asyncio.to_thread's, min(32, cores + 4)
# threads otherwise) has one thread, which a test's few workers outnumber.
_DEFAULT_POOL_THREADS = 1
_ONE_THREAD_DEFAULT_POOL = (
    "import asyncio, concurrent.futures\n"
    "supervise = workers._supervise\n"
    "async def one_thread(*args, **kwargs):\n"
    "    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)\n"
    "    asyncio.get_running_loop().set_default_executor(pool)\n"
    "    return await supervise(*args, **kwargs)\n"
    "workers._supervise = one_thread\n"
)


@pytest.mark.timeout(180)
async def test_any_worker_killed_while_serving_is_restarted_however_many_there_are(tmp_path):
    """Any worker killed while serving, the last one started included: the supervisor
    sees the death and starts a replacement.

    Before, it waited for each worker's exit on a thread of asyncio's default pool: past
    that pool's size (32 on a machine of 28 cores or more) the last workers' exits were
    never watched, and one of them dying went unnoticed while the gateway ran short.
    """
    # Past the supervisor's default pool, shrunk to one thread: one worker per thread of
    # the real pool (7 on 2 cores) took 15 s to start on a loaded machine.
    count = _DEFAULT_POOL_THREADS + 1
    path = _write_config(tmp_path)
    args = ("--config", str(path), "--workers", str(count))
    setup = _ONE_THREAD_DEFAULT_POOL
    async with _serve_logged(*args, constants=_SHORT_BACK_OFF, setup=setup) as (process, log):
        await _listening(process)
        workers = sorted(_worker_pids(process.pid))  # in the order they were started
        assert len(workers) == count
        os.kill(workers[-1], signal.SIGKILL)
        replacements = []
        try:
            assert _pid(await log.nth("workers.worker_died")) == workers[-1]
            replacements.append(_pid(await log.nth("workers.worker_restarted")))
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running((*workers, *replacements))
        assert (code, alive) == (0, [])


async def test_a_worker_killed_while_serving_is_restarted_while_the_others_serve(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """kill -9 of one worker of two: the other goes on answering, the supervisor starts a
    replacement in its place that answers too, and SIGTERM still stops all with status 0.

    Before, the supervisor stopped the other worker and exited 1: one crashed process
    took the whole gateway down until its orchestrator restarted it.
    """
    # Port 0: each worker's Prometheus endpoint on a port of its own, which it logs.
    path = _write_config(tmp_path, upstream.base_url, telemetry={"prometheus_port": 0})
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=_SHORT_BACK_OFF) as (process, log):
        address = await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        await _calls(address, 5)
        os.kill(victim, signal.SIGKILL)
        died = await log.nth("workers.worker_died")
        assert (_pid(died), "signal=SIGKILL" in died) == (victim, True)
        await _calls(address, 5)  # the survivor alone, or the replacement too by now
        replacement = _pid(await log.nth("workers.worker_restarted"))
        # Logged as it is forked: until its exec, its command line is still the supervisor's.
        async with asyncio.timeout(_HANG_GUARD_S):
            while sorted(_worker_pids(process.pid)) != sorted([survivor, replacement]):
                await asyncio.sleep(0.01)
        await log.nth("server.started", 3)  # the replacement listens
        ports = [
            int(re.findall(r" port=(\d+)", line)[0])
            for line in log.events("telemetry.prometheus_listening")
        ]
        before = {port: n for port in ports if (n := await _calls_answered(port)) is not None}
        assert len(before) == 2  # the survivor's and the replacement's; the victim's is gone
        assert before[ports[-1]] == 0  # the replacement's, started last
        for _ in range(20):  # the kernel picks either worker for each new connection
            await _calls(address, 5)
            after = {port: await _calls_answered(port) for port in before}
            if all((after[port] or 0) > n for port, n in before.items()):
                break
        assert all((after[port] or 0) > n for port, n in before.items()), (before, after)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
    alive = _killed_if_running((survivor, replacement))
    assert (code, alive) == (0, [])
    assert not log.events("workers.crash_loop")


async def _kill_each_replacement(log: _Log, victim: int, deaths: int) -> list[int]:
    """Kill `victim`, then each replacement as soon as it is started, `deaths` in all;
    the pids killed."""
    killed = [victim]
    os.kill(victim, signal.SIGKILL)
    for n in range(1, deaths):
        replacement = _pid(await log.nth("workers.worker_restarted", n))
        os.kill(replacement, signal.SIGKILL)
        killed.append(replacement)
    await log.nth("workers.worker_died", deaths)
    return killed


async def test_a_worker_hung_while_serving_is_killed_and_restarted(tmp_path):
    """A worker that stops answering while serving (SIGSTOP here, a loop blocked for good
    alike) is killed once silent past the limit and started again; then every call is
    answered.

    Before, the supervisor never noticed: the kernel went on handing the stopped worker
    its share of the new connections, and their calls waited for ever.
    """
    # 30 s otherwise; the supervisor looks every 0.1 s, not every 1 s (the workers still
    # beat every 1 s), and the replacement starts after 0.1 s.
    constants = {"_HUNG_AFTER_S": 3.0, "_HEARTBEAT_S": 0.1, **_SHORT_BACK_OFF}
    async with FakeUpstream() as fake:
        path = _write_config(tmp_path, fake.base_url)
        args = ("--config", str(path), "--workers", "2")
        async with _serve_logged(*args, constants=constants) as (process, log):
            address = await _listening(process)
            victim, survivor = sorted(_worker_pids(process.pid))
            os.kill(victim, signal.SIGSTOP)
            try:
                hung = await log.nth("workers.worker_hung")
                died = await log.nth("workers.worker_died")
                replacement = _pid(await log.nth("workers.worker_restarted"))
                await log.nth("server.started", 3)
                await _calls(address, 4)
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(_HANG_GUARD_S):
                    code = await process.wait()
            finally:
                alive = _killed_if_running((victim, survivor))
    assert (code, alive) == (0, [])
    assert " index=0 " in hung
    assert _pid(hung) == victim
    assert _pid(died) == victim
    assert "signal=SIGKILL" in died
    assert replacement not in (victim, survivor)


@pytest.mark.timeout(120)
async def test_a_worker_that_keeps_dying_stops_the_gateway(tmp_path):
    """A worker killed again each time it is restarted: at its 5th death within a minute
    the supervisor stops the others and exits 1 (`workers.crash_loop`), for the
    orchestrator to see, rather than restart it forever."""
    path = _write_config(tmp_path)
    # The back-off shortened (15 s in all otherwise): the deaths count the same.
    constants = {"_RESTART_DELAY_S": 0.01}
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=constants) as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        killed = await _kill_each_replacement(log, victim, 5)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
    alive = _killed_if_running((survivor,))
    assert (code, alive) == (1, [])
    [crash_loop] = log.events("workers.crash_loop")
    assert "deaths=5" in crash_loop
    assert [_pid(line) for line in log.events("workers.worker_died")] == killed
    assert len(log.events("workers.worker_restarted")) == 4  # none after the 5th death


async def test_sigterm_while_a_replacement_waits_stops_without_starting_it(tmp_path):
    """SIGTERM while a dead worker's replacement waits out its back-off: status 0, the
    other worker stopped, and no replacement started."""
    path = _write_config(tmp_path)
    # A back-off the SIGTERM surely comes in, and which the test never waits out (before,
    # it waited out 1 s and 2 s to reach the 4 s after a 3rd death).
    constants = {"_RESTART_DELAY_S": 20.0}
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=constants) as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        await _kill_each_replacement(log, victim, 1)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
    alive = _killed_if_running((survivor,))
    assert (code, alive) == (0, [])
    assert log.events("workers.worker_restarted") == []


async def test_sigterm_as_a_replacement_starts_stops_it_too(tmp_path):
    """SIGTERM just after the supervisor started a replacement (it is most likely still
    importing the gateway): it is stopped with the other worker, status 0."""
    path = _write_config(tmp_path)
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=_SHORT_BACK_OFF) as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        os.kill(victim, signal.SIGKILL)
        replacement = _pid(await log.nth("workers.worker_restarted"))
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_HANG_GUARD_S):
            code = await process.wait()
    alive = _killed_if_running((survivor, replacement))
    assert (code, alive) == (0, [])


def _tls_config_that_will_hang(tmp_path: Path) -> tuple[Path, Path]:
    """A config serving TLS, and its certificate file: a worker reads that file as it
    starts, and blocks there (a signal does not end the wait) once the test has made it
    a FIFO nothing writes to, as on a stuck network mount."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    return _write_config(tmp_path, server={"tls": tls}), pki.server_cert


def _hang_the_next_start(cert: Path) -> None:
    cert.unlink()
    os.mkfifo(cert)


async def _stuck_in_open(pid: int) -> None:
    """Once `pid` waits in its open of the FIFO for a writer (a SIGTERM then is ignored)."""
    wchan = Path(f"/proc/{pid}/wchan")
    async with asyncio.timeout(_HANG_GUARD_S):
        while wchan.read_text() != "wait_for_partner":
            await asyncio.sleep(0.05)


async def _a_replacement_stuck_in_its_start(
    process: asyncio.subprocess.Process, log: _Log, cert: Path
) -> tuple[int, int]:
    """Once `process` (two workers) listens: one worker killed, its replacement stuck in
    its start (`_hang_the_next_start`); the other worker's pid and the replacement's."""
    await _listening(process)
    victim, survivor = sorted(_worker_pids(process.pid))
    _hang_the_next_start(cert)
    os.kill(victim, signal.SIGKILL)
    replacement = _pid(await log.nth("workers.worker_restarted"))
    await _stuck_in_open(replacement)
    return survivor, replacement


async def test_sigterm_while_a_replacement_hangs_in_its_start_stops_it_too(tmp_path):
    """SIGTERM while a replacement is stuck in its start, deaf to SIGTERM: it is killed and
    the supervisor exits 0, with no process left.

    Before, the supervisor waited for its exit for ever.
    """
    path, cert = _tls_config_that_will_hang(tmp_path)
    args = ("--config", str(path), "--workers", "2")
    # The wait before SIGKILL shortened (5 s otherwise): it is what the test waits out.
    constants = {"_UNREADY_KILL_AFTER_S": 0.1, **_SHORT_BACK_OFF}
    async with _serve_logged(*args, constants=constants) as (process, log):
        survivor, replacement = await _a_replacement_stuck_in_its_start(process, log, cert)
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running((survivor, replacement))
    assert (code, alive) == (0, [])
    assert not log.events("server.started")[2:]  # the replacement never listened


def _stopped_replacements() -> str:
    """Code for the supervisor: every start after the first two is stopped (SIGSTOP) as
    soon as it is started: it never listens, and acts on no SIGTERM, as a start stuck in
    a system call (a file on a stuck mount)."""
    return (
        "import itertools, os, signal\n"
        "starts, start = itertools.count(), workers._start\n"
        "def stopped(*args, **kwargs):\n"
        "    run = start(*args, **kwargs)\n"
        f"    if next(starts) >= 2: os.kill(run.process.pid, {int(signal.SIGSTOP)})\n"
        "    return run\n"
        "workers._start = stopped\n"
    )


@pytest.mark.timeout(120)
async def test_a_replacement_that_hangs_in_its_start_is_killed_and_counted_as_a_death(
    tmp_path: Path,
) -> None:
    """A replacement that never listens is killed once the start timeout passes, and that
    is a death: one that hangs every time ends in the crash loop (status 1).

    Before, the supervisor waited for it for ever, the gateway one worker short.
    """
    path = _write_config(tmp_path)
    # Its timings shortened: the start timeout is minutes, the back-off 15 s in all. Each
    # replacement hangs (SIGSTOP) as soon as it is started, so the timeout need not leave
    # it time to reach a hang of its own: one still importing the gateway would take the
    # SIGTERM it is sent first, and this test is about the kill. Stopped, it acts on no
    # SIGTERM however long the wait before SIGKILL.
    constants = {
        # Time enough for the test to stop the replacement, on a loaded machine, before
        # its start times out.
        "_RESTART_START_TIMEOUT_S": 1.0,
        "_UNREADY_KILL_AFTER_S": 0.1,
        "_RESTART_DELAY_S": 0.1,
        "_CRASH_LOOP_DEATHS": 3,
    }
    args = ("--config", str(path), "--workers", "2")
    setup = _stopped_replacements()
    async with _serve_logged(*args, constants=constants, setup=setup) as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        os.kill(victim, signal.SIGKILL)
        try:
            await log.nth("workers.crash_loop")
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:  # a replacement stuck in its start ignores the SIGTERM it gets otherwise
            restarted = [_pid(line) for line in log.events("workers.worker_restarted")]
            alive = _killed_if_running((survivor, *restarted))
    assert (code, alive) == (1, [])
    timed_out = log.events("workers.start_timed_out")
    assert [_pid(line) for line in timed_out] == restarted
    assert len(restarted) == 2
    assert all("timeout_s=1.0" in line for line in timed_out)
    died = log.events("workers.worker_died")
    assert [_pid(line) for line in died] == [victim, *restarted]
    # Deaf to SIGTERM in its start: SIGKILL ends it.
    assert all("signal=SIGKILL" in line for line in died)


async def test_a_replacement_stuck_in_its_start_stops_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL to the supervisor while a replacement is stuck in its start: it ends too.

    Before, the kernel sent it SIGTERM, which a start stuck in a system call never acts
    on: it stayed, orphaned, holding its Prometheus port.
    """
    path, cert = _tls_config_that_will_hang(tmp_path)
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=_SHORT_BACK_OFF) as (process, log):
        survivor, replacement = await _a_replacement_stuck_in_its_start(process, log, cert)
        process.kill()
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                while alive := [pid for pid in (survivor, replacement) if is_running(pid)]:
                    await asyncio.sleep(0.05)
        finally:
            for pid in (survivor, replacement):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert alive == []


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(_HANG_GUARD_S):
        while not condition():
            await asyncio.sleep(0.01)


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (SIGSTOP), so none can take a signal."""
    states = []
    for path in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            states.append(path.read_text().rpartition(")")[2].split()[0])
    return all(state == "T" for state in states)


def _pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` was sent to `pid` and waits (a stopped process acts on none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, mask = line.partition(":")
        if name in ("SigPnd", "ShdPnd") and int(mask, 16) & (1 << (sig - 1)):
            return True
    return False


@pytest.mark.parametrize("order", ["stop_seen_first", "sent_together"])
async def test_a_worker_that_dies_as_a_stop_arrives_leaves_the_stop_clean(tmp_path, order):
    """A worker killed just as SIGTERM reaches the supervisor: status 0, its death logged,
    no replacement left, whichever of the two the supervisor sees first.

    Before, the dead worker's status (SIGKILL) was taken for a failed stop: status 1.
    """
    path = _write_config(tmp_path)
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        try:
            if order == "stop_seen_first":
                # Stopped, it dies only once the supervisor's SIGTERM waits for it.
                os.kill(victim, signal.SIGSTOP)
                await _until(lambda: _stopped(victim))
                process.send_signal(signal.SIGTERM)
                await _until(lambda: _pending(victim, signal.SIGTERM))
                os.kill(victim, signal.SIGKILL)
            else:
                os.kill(victim, signal.SIGKILL)
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            restarted = [_pid(line) for line in log.events("workers.worker_restarted")]
            alive = _killed_if_running((victim, survivor, *restarted))
    assert (code, alive) == (0, [])
    died = log.events("workers.worker_died")
    assert [(_pid(line), "signal=SIGKILL" in line) for line in died] == [(victim, True)]


async def test_a_worker_killed_while_it_drains_fails_the_stop(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A worker killed while it drains a call after SIGTERM: the stop did not end as asked
    (its callers lost their calls), status 1, as before; only a death before the stop
    reached the worker leaves the status 0. The supervisor says which worker and how.

    Before, the status 1 came with no line saying why: a drain cut by the OOM killer
    looked like a clean stop in the log."""
    upstream.script(Hang())
    server = {"grace_period_s": 120.0}
    path = _write_config(tmp_path, upstream.base_url, server=server)
    async with _serve_logged("--config", str(path), "--workers", "2") as (process, log):
        address = await _listening(process)
        workers = _worker_pids(process.pid)
        call = asyncio.ensure_future(_calls(address, 1))
        try:
            async with asyncio.timeout(_HANG_GUARD_S):
                while not upstream.requests:
                    await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            await log.nth("server.stopping", 2)  # both said it; the one with the call drains
            killed = _killed_if_running(workers)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            _killed_if_running(workers)
    assert killed != []
    assert code == 1
    failed = log.events("workers.drain_failed")  # the idle one may have been killed too
    assert failed != []
    assert all(_pid(line) in killed and "signal=SIGKILL" in line for line in failed)


async def test_a_worker_hung_while_it_drains_is_killed_past_its_grace(tmp_path: Path) -> None:
    """A worker that listened and then hangs (SIGSTOP here; a loop blocked for good)
    does not exit on SIGTERM: the supervisor kills it its margin past the grace period,
    logs `workers.drain_killed` naming it, and exits 1, a stop that did not end as asked.

    Before, the supervisor waited for it for ever, holding the port."""
    server = {"grace_period_s": 0.5}
    path = _write_config(tmp_path, server=server)
    # And the wait for one that has not listened (5 s otherwise), which `_stop` waits out
    # first: the SIGKILL comes no sooner. The margin leaves the other worker, which drains
    # at once, the time a loaded CI machine takes to exit (past 0.5 s there, it was killed
    # too).
    constants = {"_DRAIN_KILL_MARGIN_S": 2.5, "_UNREADY_KILL_AFTER_S": 0.1}
    async with _serve_logged("--config", str(path), "--workers", "2", constants=constants) as (
        process,
        log,
    ):
        await _listening(process)
        workers = _worker_pids(process.pid)
        hung = workers[0]
        try:
            os.kill(hung, signal.SIGSTOP)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            _killed_if_running(workers)
    assert code == 1
    killed = log.events("workers.drain_killed")
    assert len(killed) == 1
    assert _pid(killed[0]) == hung
    assert "signal=SIGKILL" in killed[0]
    assert " after_s=3.0" in killed[0]


def _failing_replacements(error: str) -> str:
    """Code for the supervisor: every start after the first two raises `error`."""
    return (
        "import itertools\n"
        "starts, start = itertools.count(), workers._start\n"
        "def failing(*args, **kwargs):\n"
        f"    if next(starts) >= 2: raise {error}\n"
        "    return start(*args, **kwargs)\n"
        "workers._start = failing\n"
    )


@pytest.mark.timeout(120)
async def test_a_replacement_that_cannot_be_started_is_logged_and_counted_as_a_death(tmp_path):
    """A replacement whose start fails with an error other than the system's refusal (a
    bug): `workers.restart_failed` names the error each time, each is a death, and the
    crash loop stops the gateway (status 1) with the other worker stopped.

    Before, the supervisor exited 1 at the first failure with no line saying why.
    """
    path = _write_config(tmp_path)
    constants = {"_RESTART_DELAY_S": 0.01}  # the back-off 0.15 s in all, not 15 s
    setup = _failing_replacements("RuntimeError('no replacement today')")
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, constants=constants, setup=setup) as (process, log):
        await _listening(process)
        victim, survivor = sorted(_worker_pids(process.pid))
        os.kill(victim, signal.SIGKILL)
        try:
            crash_loop = await log.nth("workers.crash_loop")
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running((victim, survivor))
    assert (code, alive) == (1, [])
    assert "deaths=5" in crash_loop
    failed = log.events("workers.restart_failed")
    assert len(failed) == 4
    assert all("error=RuntimeError: no replacement today" in line for line in failed)
    assert log.events("workers.worker_restarted") == []


# Run first by the stand-in llama.cpp: each start records its pid, port and key, then waits
# while the file `held` exists, so the test says when a restart may answer.
_RECORDED_AND_HELD = """
import time
with open({starts!r}, "a") as starts:
    starts.write(f"{{os.getpid()}} {{port}} {{key}}\\n")
while os.path.exists({held!r}):
    time.sleep(0.02)
"""


@dataclasses.dataclass(frozen=True)
class _LocalModelStart:
    pid: int
    port: int
    key: str


class _HeldLocalModel:
    """The stand-in llama.cpp for `serve --workers N`: its starts, and a hold on the next."""

    def __init__(self, tmp_path: Path) -> None:
        self.model, stand_in = stand_in_local_model(tmp_path)
        self._starts, self._held = tmp_path / "starts", tmp_path / "held"
        serve = "http.server.ThreadingHTTPServer"
        recorded = _RECORDED_AND_HELD.format(starts=str(self._starts), held=str(self._held))
        stand_in.write_text(stand_in.read_text().replace(serve, recorded + serve, 1))
        # Code for the supervisor: its local model runs the stand-in as llama.cpp's Python.
        self.setup = (
            "import functools\n"
            "workers.LocalModelServer = functools.partial("
            f"workers.LocalModelServer, python={str(stand_in)!r})\n"
        )

    @property
    def starts(self) -> list[_LocalModelStart]:
        """Its starts so far, in order."""
        if not self._starts.exists():
            return []
        lines = self._starts.read_text().splitlines()
        return [_LocalModelStart(int(p), int(port), k) for p, port, k in map(str.split, lines)]

    def hold(self) -> None:
        """Hold its next start: the local model stays down until `release`."""
        self._held.touch()

    def release(self) -> None:
        self._held.unlink()

    def config(self, tmp_path: Path, *, restart_backoff_s: float = 0.1) -> Path:
        """A config serving it alone, with a Prometheus endpoint per worker (which tells
        the workers apart)."""
        local = {
            "enabled": "always",
            "model_path": str(self.model),
            "restart_backoff_s": restart_backoff_s,
        }
        data = {
            "server": {"listen": "127.0.0.1:0"},
            "local_model": local,
            "telemetry": {"prometheus_port": 0},
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


def _local_call() -> pb.CompleteRequest:
    return pb.CompleteRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hi")])


async def _local_model_seen_by(channel: grpc.aio.Channel, expected: int) -> tuple[object, ...]:
    """On `channel`'s one connection (one worker), once its `llm_gateway.local_model`
    health is `expected`: what a call to the local model gets (its code, and its content
    and upstream when answered) and the health ListModels shows for it."""
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    while (await health.Check(check, timeout=10)).status != expected:
        await asyncio.sleep(0.02)
    stub = pb_grpc.CompletionServiceStub(channel)
    try:
        reply = await stub.Complete(_local_call(), timeout=10)
        answer: tuple[object, ...] = (grpc.StatusCode.OK, reply.content, reply.metadata.upstream)
    except grpc.aio.AioRpcError as exc:
        answer = (exc.code(),)
    models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    [served] = [m for m in models.models if m.name == MODEL]
    return (*answer, [u.health for u in served.upstreams])


async def _what_each_worker_says(
    address: str,
    metrics_ports: list[int],
    expected: int,
    seen_by: Callable[[grpc.aio.Channel, int], Awaitable[tuple[object, ...]]] | None = None,
) -> dict[int, tuple[object, ...]]:
    """`seen_by` (`_local_model_seen_by`) on new connections until each worker (by its
    Prometheus port) has answered one: the last answer of each."""
    seen_by = seen_by or _local_model_seen_by
    answers: dict[int, tuple[object, ...]] = {}
    async with asyncio.timeout(_HANG_GUARD_S):
        while answers.keys() != set(metrics_ports):
            before = {port: await _calls_answered(port) or 0 for port in metrics_ports}
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                answer = await seen_by(channel, expected)
            # The worker whose count of calls grew, once it has counted this one.
            while not (grown := [p for p, n in before.items() if await _calls_answered(p) != n]):
                await asyncio.sleep(0.01)
            [port] = grown
            answers[port] = answer
    return answers


async def _metrics_ports(log: _Log, workers: int) -> list[int]:
    """The Prometheus ports of the first `workers` workers to listen, in order."""
    await log.nth("telemetry.prometheus_listening", workers)
    lines = log.events("telemetry.prometheus_listening")
    return [int(re.findall(r" port=(\d+)", line)[0]) for line in lines]


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_every_worker_follows_the_local_models_restart_on_a_new_port_and_key(
    tmp_path: Path,
) -> None:
    """With `--workers 2`, llama.cpp killed: while it is down every worker's health says
    NOT_SERVING, ListModels UNHEALTHY, and its calls are UNAVAILABLE without being sent (a
    process that takes the dead server's port gets nothing); once the restart answers, on
    a new port with a new key, every worker sends its calls there.

    Before, the workers were given the local model's address once, at their start: the
    restart kept its port and key, the workers' health never named the local model, and
    their calls went to its port while it was down, to whatever listened there."""
    local = _HeldLocalModel(tmp_path)
    path = local.config(tmp_path)
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, setup=local.setup) as (process, log):
        try:
            address = await _listening(process)
            ports = await _metrics_ports(log, 2)
            [first] = local.starts
            local.hold()
            os.kill(first.pid, signal.SIGKILL)
            async with _squatting(first.port) as seen:
                down = await _what_each_worker_says(address, ports, _NOT_SERVING)
                local.release()
                up = await _what_each_worker_says(address, ports, _SERVING)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running(start.pid for start in local.starts)
    unhealthy, healthy = [pb.UPSTREAM_HEALTH_UNHEALTHY], [pb.UPSTREAM_HEALTH_HEALTHY]
    assert down == dict.fromkeys(ports, (grpc.StatusCode.UNAVAILABLE, unhealthy))
    assert up == dict.fromkeys(ports, (grpc.StatusCode.OK, "hi", "local", healthy))
    [_, second] = local.starts
    assert second.port != first.port
    assert second.key != first.key
    assert seen == []
    assert (code, alive) == (0, [])


async def _refusal_seen_by(channel: grpc.aio.Channel, expected: int) -> tuple[object, ...]:
    """On `channel`'s one connection (one worker), once its `llm_gateway.local_model`
    health is `expected`: how a call to the local model is refused (its code, the
    upstream its ErrorInfo says is restarting, its RetryInfo delay in whole minutes)."""
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
    while (await health.Check(check, timeout=10)).status != expected:
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.CompletionServiceStub(channel).Complete(_local_call(), timeout=10)
    refusal = caught.value
    restarting = error_info(refusal).metadata.get("restarting")
    return refusal.code(), restarting, round((retry_delay_s(refusal) or 0) / 60)


async def test_every_worker_tells_a_refused_call_when_the_local_models_restart_is_due(
    tmp_path: Path,
) -> None:
    """With `--workers 2` and llama.cpp down for a 10-minute back-off, each worker refuses
    its calls with the RetryInfo of that restart and says the local model is restarting:
    the supervisor sends the due time with the down state.

    Before, each worker said 0.5 s (`resilience.backoff_base_s`)."""
    local = _HeldLocalModel(tmp_path)
    path = local.config(tmp_path, restart_backoff_s=600)
    args = ("--config", str(path), "--workers", "2")
    async with _serve_logged(*args, setup=local.setup) as (process, log):
        try:
            address = await _listening(process)
            ports = await _metrics_ports(log, 2)
            [first] = local.starts
            os.kill(first.pid, signal.SIGKILL)
            down = await _what_each_worker_says(address, ports, _NOT_SERVING, _refusal_seen_by)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running(start.pid for start in local.starts)
    assert down == dict.fromkeys(ports, (grpc.StatusCode.UNAVAILABLE, "local", 10))
    assert (code, alive) == (0, [])


@pytest.mark.parametrize("order", ["model_dies_first", "worker_restarts_first"])
async def test_a_replacement_worker_follows_the_local_model_from_its_start(
    tmp_path: Path, order: str
) -> None:
    """A worker started in a dead one's place is told the local model's state: down when
    the model died before (at its start), or as it starts; then back up on its new port,
    as the other worker is.

    Before, a replacement was given the address the model had at the gateway's start."""
    local = _HeldLocalModel(tmp_path)
    path = local.config(tmp_path)
    args = ("--config", str(path), "--workers", "2")
    constants = {"_RESTART_DELAY_S": 0.1}
    async with _serve_logged(*args, constants=constants, setup=local.setup) as (process, log):
        workers: list[int] = []
        try:
            address = await _listening(process)
            await _metrics_ports(log, 2)
            workers = sorted(_worker_pids(process.pid))
            [first] = local.starts
            local.hold()
            if order == "model_dies_first":
                os.kill(first.pid, signal.SIGKILL)
                await log.nth("local_model.exited")
                os.kill(workers[0], signal.SIGKILL)
            else:
                os.kill(workers[0], signal.SIGKILL)
                await log.nth("workers.worker_restarted")
                os.kill(first.pid, signal.SIGKILL)
            await log.nth("workers.worker_died")
            ports = await _metrics_ports(log, 3)
            serving = [p for p in ports[:2] if await _calls_answered(p) is not None]
            ports = [*serving, ports[2]]  # the survivor's, the replacement's
            down = await _what_each_worker_says(address, ports, _NOT_SERVING)
            local.release()
            up = await _what_each_worker_says(address, ports, _SERVING)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            started = [start.pid for start in local.starts]
            restarted = [_pid(line) for line in log.events("workers.worker_restarted")]
            alive = _killed_if_running((*started, *workers, *restarted))
    unhealthy, healthy = [pb.UPSTREAM_HEALTH_UNHEALTHY], [pb.UPSTREAM_HEALTH_HEALTHY]
    assert len(ports) == 2
    assert down == dict.fromkeys(ports, (grpc.StatusCode.UNAVAILABLE, unhealthy))
    assert up == dict.fromkeys(ports, (grpc.StatusCode.OK, "hi", "local", healthy))
    assert (code, alive) == (0, [])


async def test_the_workers_send_the_local_model_one_call_at_a_time_between_them(
    tmp_path: Path,
) -> None:
    """With `--workers 2`, calls to the local model reach llama.cpp one at a time across
    both workers: the others wait their turn in the gateway, and all are answered.

    Before, each worker sent it one call at a time of its own: two at once, the second
    queued in llama.cpp, its wait counted as the model's time."""
    local = _HeldLocalModel(tmp_path)
    overlapped = _marking_overlaps(tmp_path)
    args = ("--config", str(local.config(tmp_path)), "--workers", "2")
    async with _serve_logged(*args, setup=local.setup) as (process, log):
        try:
            address = await _listening(process)
            ports = await _metrics_ports(log, 2)
            replies = await _at_once(address, 12)
            answered = [await _calls_answered(port) for port in ports]
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            alive = _killed_if_running(start.pid for start in local.starts)
    assert [r.content for r in replies] == ["hi"] * 12
    assert all(answered), answered  # both workers had calls (12 connections, kernel-spread)
    assert not overlapped.exists()
    assert (code, alive) == (0, [])


def _marking_overlaps(tmp_path: Path) -> Path:
    """Make `_HeldLocalModel`'s stand-in take 0.2 s an answer and write the file returned
    should it ever be answering two calls at once."""
    overlapped = tmp_path / "overlapped"
    stand_in = tmp_path / "python"
    script = stand_in.read_text().replace("class OpenAI", "busy = []\nclass OpenAI", 1)
    answering = (
        "        busy.append(1)\n"
        f"        if len(busy) > 1: open({str(overlapped)!r}, 'w').close()\n"
        "        time.sleep(0.2)\n        busy.pop()\n"
    )
    stand_in.write_text(script.replace("        time.sleep(0.0)\n", answering, 1))
    return overlapped


async def _at_once(address: str, count: int) -> list[pb.CompleteResponse]:
    """`count` calls to the local model at once, each on a connection of its own (so the
    kernel spreads them over the workers)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    try:
        calls = (
            pb_grpc.CompletionServiceStub(c).Complete(_local_call(), timeout=_HANG_GUARD_S)
            for c in channels
        )
        return list(await asyncio.gather(*calls))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def test_a_replacement_worker_takes_turns_with_the_others_once_tmp_was_cleaned(
    tmp_path: Path,
) -> None:
    """A worker started in a dead one's place, after a cleaner of /tmp (systemd-tmpfiles,
    tmpreaper) removed the files there, serves the local model and takes turns calling it
    with the other worker, one call at a time between them.

    Before, each worker opened a file by its name in the temporary directory to take its
    turns: the replacement found none, failed its start and was restarted until the
    gateway stopped as a crash loop (and a new file of that name would have been a lock
    that the other workers did not take)."""
    local = _HeldLocalModel(tmp_path)
    overlapped = _marking_overlaps(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    setup = f"{local.setup}import tempfile\ntempfile.tempdir = {str(tmp)!r}\n"
    args = ("--config", str(local.config(tmp_path)), "--workers", "2")
    async with _serve_logged(*args, constants=_SHORT_BACK_OFF, setup=setup) as (process, log):
        workers: list[int] = []
        try:
            address = await _listening(process)
            await _metrics_ports(log, 2)
            workers = sorted(_worker_pids(process.pid))
            for cleaned in tmp.iterdir():
                cleaned.unlink()
            os.kill(workers[0], signal.SIGKILL)
            await log.nth("workers.worker_restarted")
            ports = await _metrics_ports(log, 3)
            serving = [p for p in ports if await _calls_answered(p) is not None]
            replies = await _at_once(address, 12)
            answered = [await _calls_answered(port) for port in serving]
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(_HANG_GUARD_S):
                code = await process.wait()
        finally:
            started = [start.pid for start in local.starts]
            restarted = [_pid(line) for line in log.events("workers.worker_restarted")]
            alive = _killed_if_running((*started, *workers, *restarted))
    assert len(serving) == 2
    assert [r.content for r in replies] == ["hi"] * 12
    assert all(answered), answered  # the replacement had calls too
    assert not overlapped.exists()
    assert not list(tmp.iterdir())
    assert (code, alive) == (0, [])
