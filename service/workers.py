"""Several gateway processes on one port (SO_REUSEPORT), so one machine uses every core.

The parent reserves the port, starts the local model once (if it is used) and tells each
worker its state (address and key while it answers, or that it is down) at the worker's
start and at each change, through a pipe of its own; the workers route to it as an
ordinary upstream, as one process does. It then supervises the workers: SIGTERM, SIGINT
or SIGHUP is forwarded to each (as SIGTERM), which drains its own calls within the grace
period. A worker that dies once the gateway serves is started again in its place while
the others go on serving (see _RESTART_DELAY_S), as is one that hangs (_HUNG_AFTER_S);
one that fails during the first start stops the gateway, since that is a bad config or
a broken install, which restarting cannot mend (the supervisor prints the line saying
why, once however many workers fail alike). State kept in memory (cache, usage ledger,
limits) is per worker unless Redis is configured (`serve` warns of it at start:
`workers.state_per_worker`).

Each worker has its own metrics, so each serves its own Prometheus endpoint: worker `i`
(from 0) listens on `telemetry.prometheus_port + i` (9464 + i when only
`OTEL_METRICS_EXPORTER=prometheus` asks for one). Port 0 gives each worker a free port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import errno
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from service import early_signals
from service.announce import announce
from service.config import ConfigError, GatewayConfig, host_and_port
from service.cpus import usable_cpus
from service.hosts import ListenError
from service.local_model import LocalModelServer, LocalModelState
from service.logs import SaidByWorker0, SaidOnceAtStart
from service.machine_turns import TurnsFile
from service.telemetry.setup import (
    DEFAULT_PROMETHEUS_PORT,
    is_off,
    names_prometheus,
    prometheus_port_problem,
)

T = TypeVar("T")

log = logging.getLogger("llm_gateway.workers")

_WORKER_START_TIMEOUT_S = 120.0
# A replacement that has not listened within this is killed and counted as a death. As
# long as a first start may take: it starts under the same conditions, and one killed
# while merely slow (a loaded machine) would only be started again, slow again.
_RESTART_START_TIMEOUT_S = _WORKER_START_TIMEOUT_S
# A worker stopped before it listened (a stop, its start timed out) gets SIGTERM, then
# SIGKILL this long after: a start stuck in a system call (a file on a stuck mount) never
# acts on SIGTERM, and it has no calls to drain.
_UNREADY_KILL_AFTER_S = 5.0
# A worker that listened gets SIGKILL this long past its grace period after SIGTERM if it
# has not exited: its drain takes the grace, then its telemetry's flush (an OTLP export's
# own 30 s at most). One that hangs (a loop blocked for good, SIGSTOP) kept the
# supervisor, and the port, for ever, where only an orchestrator would kill it.
_DRAIN_KILL_MARGIN_S = 60.0
# A worker that listens tells its supervisor it is alive every _HEARTBEAT_S, from its event
# loop; one silent for _HUNG_AFTER_S while serving (a loop blocked for good, SIGSTOP) is
# killed and started again as any death. Else the kernel goes on handing it its share of
# the new connections, whose callers wait for ever, and a health probe lands on it too
# rarely (1 in N) for an orchestrator to see it fail three times in a row.
_HEARTBEAT_S = 1.0
_HUNG_AFTER_S = 30.0

# A worker that dies while the gateway serves is started again after 1 s, 2 s, 4 s, 8 s
# for its 1st to 4th death within _CRASH_LOOP_WINDOW_S: at once would spin on a worker
# that dies as it starts, while the others serve meanwhile. Deaths older than the window
# are forgotten, so a worker that lived a minute is restarted after 1 s again.
_RESTART_DELAY_S = 1.0
# Its 5th death within the window stops the gateway (exit 1): a worker that keeps dying
# (a file it needs gone, memory it cannot get) is for the orchestrator to see and report,
# not for the supervisor to retry forever. The test of it waits out 1+2+4+8 s. Deaths of
# replacements that never listened are not forgotten: starts that time out are minutes
# apart, and a worker that can no longer start would otherwise be retried for ever.
_CRASH_LOOP_DEATHS = 5
_CRASH_LOOP_WINDOW_S = 60.0

_SPAWN = multiprocessing.get_context("spawn")


def worker_count(config: GatewayConfig) -> tuple[int, str]:
    """How many worker processes to run, and why.

    `server.workers` when set (0: one per core). Unset, one per core as long as nothing
    that must agree across processes would be kept in each (`state_kept_per_worker`);
    otherwise one process, so that a default setup never answers with a fraction of its
    usage or lets a tenant, or the gateway at a provider, through N times its limit.
    """
    cores = usable_cpus()
    requested = config.server.workers
    if requested is not None:
        # Named as the operator set it: `--workers` or the config's key.
        source = config.flags.get("server.workers", "server.workers")
        return (requested or cores), source if requested else "one per core"
    kept_apart = state_kept_per_worker(config)
    if kept_apart:
        return 1, kept_apart[0]
    return cores, "one per core: shared state is in Redis"


def state_kept_per_worker(config: GatewayConfig) -> list[str]:
    """What each of several worker processes would keep in its own memory though it must
    agree across them, each with what shares it: the usage ledger (GetUsage, budgets),
    tenant limits, an upstream's per-minute rates. Empty when all of it is in Redis.

    The response cache may be per process: it only hits less.
    """
    kept = []
    if not config.ledger.redis_url:
        kept.append("the usage ledger is in memory (set ledger.redis_url to share it)")
    if not config.auth.redis_url and any(t.has_rate_limits for t in config.tenants.values()):
        kept.append("tenant limits are in memory (set auth.redis_url to share them)")
    kept.extend(
        f"upstream {u.name!r}'s rates are per process (set its shared_limits: true)"
        for u in config.upstreams
        if (u.requests_per_minute or u.tokens_per_minute) and not u.shared_limits
    )
    return kept


def _set_by(config: GatewayConfig) -> str:
    """` (--workers)` when the command line set the worker count, else nothing."""
    flag = config.flags.get("server.workers")
    return f" ({flag})" if flag else ""


def worker_configs(
    config: GatewayConfig, count: int, *, environ: Mapping[str, str] | None = None
) -> list[GatewayConfig]:
    """One config per worker: the same but for each one's Prometheus port (base + index).

    Raises:
        ConfigError: the last worker's port would be past 65535, or a worker's would be
            the port `server.listen` or `server.health_listen` listens on.
    """
    env = os.environ if environ is None else environ
    telemetry = config.telemetry
    if is_off(telemetry, env):  # no worker opens an endpoint: no port to give or check
        return [config] * count
    base = telemetry.prometheus_port
    if base is None and names_prometheus(env):
        base = DEFAULT_PROMETHEUS_PORT
    if base is None or base == 0:
        return [config] * count
    if base + count - 1 > 65535:
        raise config.error(
            "telemetry.prometheus_port",
            f"{count} workers{_set_by(config)} need ports {base}..{base + count - 1}; the "
            "last is past 65535",
        )
    for index in range(count):
        endpoint = "the Prometheus endpoint"
        if count > 1:
            endpoint = f"worker {index}'s Prometheus endpoint (prometheus_port + {index})"
        host = telemetry.prometheus_host
        problem = prometheus_port_problem(config.server, host, base + index, endpoint=endpoint)
        if problem is not None:
            raise config.error("telemetry.prometheus_port", problem)
    return [
        dataclasses.replace(
            config, telemetry=dataclasses.replace(telemetry, prometheus_port=base + index)
        )
        for index in range(count)
    ]


def _reserve_address(listen: str) -> tuple[socket.socket, str]:
    """A socket holding `listen`'s port for the workers, and `listen` with that port
    (the one chosen when `listen` asks for port 0). Its host was judged before
    (`check_listen_hosts`): what fails here is the port."""
    try:
        sock, port = _bind_shared(listen)
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    return sock, f"{listen.rpartition(':')[0]}:{port}"


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _bind_shared(listen: str) -> tuple[socket.socket, int]:
    host, port = host_and_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # As resolved rather than (host, port): an IPv6 link-local host's zone (`%eth0`) is
    # a field of its own, and a bind to the text alone fails "Invalid argument".
    address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    # With SO_REUSEPORT the bind below would join a port that another process of this
    # user already listens on the same way (another gateway's workers), and the kernel
    # would split the callers between the two: first make sure the port is free.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = (address[0], int(probe.getsockname()[1]), *address[2:])
    try:
        sock = _bound_port_holder(family, address, reuse_address=False)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # Connections the last gateway on this port closed (a drain) linger in TIME_WAIT
        # for a minute; those of one that did not share it (one process) refuse a bind
        # without SO_REUSEADDR, as grpc binds, meanwhile.
        sock = _bound_port_holder(family, address, reuse_address=True)
    return sock, int(sock.getsockname()[1])


def _bound_port_holder(
    family: socket.AddressFamily, address: tuple[Any, ...], *, reuse_address: bool
) -> socket.socket:
    """A socket bound to `address` that the workers' sockets may join (SO_REUSEPORT) and
    no other may, though it never listens: with SO_REUSEADDR left set, any bind with it
    (grpc's, another supervisor's check above) would pass while no worker listens (as they
    start, or are all dead), and a second gateway would take or share the port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        # Once bound, it passes no later bind that lacks SO_REUSEPORT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError:
        sock.close()
        raise
    return sock


# prctl(2): the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _stop_with(supervisor: int, sig: signal.Signals) -> None:
    """Have the kernel send this worker `sig` when the supervisor dies, even by SIGKILL.

    Otherwise a supervisor killed outright (not through its process group, as Kubernetes
    and systemd do) leaves its workers serving the port with nobody to stop them. Linux
    only; elsewhere the call is skipped.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != supervisor:  # it died before the kernel was asked
        os.kill(os.getpid(), sig)


def _listening(
    supervisor: int, ready: Connection, beats: Connection, said_once: SaidOnceAtStart
) -> None:
    said_once.remove()
    # SIGCONT, not SIGTERM: a worker stopped (SIGSTOP) acts on no signal but SIGKILL and
    # SIGCONT, and with a pending SIGTERM it kept the port for ever. Continued, it sees its
    # supervisor gone and drains its calls, as on SIGTERM.
    asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, _drain_if_orphaned, supervisor)
    _stop_with(supervisor, signal.SIGCONT)
    ready.send(os.getpid())
    os.set_blocking(beats.fileno(), False)  # a supervisor that stops reading blocks no loop
    _beat(beats)


def _drain_if_orphaned(supervisor: int) -> None:
    """SIGTERM to this worker (its drain) once its supervisor is gone; a SIGCONT that
    merely resumes it (after a SIGSTOP) leaves it serving."""
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def _beat(beats: Connection) -> None:
    """Tell the supervisor this worker's loop runs, now and every _HEARTBEAT_S."""
    with contextlib.suppress(OSError):  # a full pipe (a beat is enough), a supervisor gone
        os.write(beats.fileno(), b".")
    asyncio.get_running_loop().call_later(_HEARTBEAT_S, _beat, beats)


# What a worker sends its supervisor once a stop reaches it, before it drains.
_DRAINING = "draining"


@dataclasses.dataclass(frozen=True)
class _StartFailed:
    """What a worker whose start failed sends its supervisor: the line saying why
    (`start_failure`), for the supervisor to print. Printed by each worker, the N workers
    of one config printed the same line N times, which reads as N problems."""

    line: str


def _draining(ready: Connection) -> None:
    with contextlib.suppress(OSError):  # a supervisor gone: nobody to tell
        ready.send(_DRAINING)


def _worker_main(
    config: GatewayConfig,
    log_level: str,
    ready: Connection,
    supervisor: int,
    local_model: tuple[LocalModelState, Connection] | None = None,
    *,
    index: int,
    beats: Connection,
) -> None:
    from service.command_line import null_closed_descriptors
    from service.logs import configure_logging
    from service.server import run

    null_closed_descriptors()  # multiprocessing's start may leave 0 or 1 closed here too
    # SIGKILL until it listens: a start stuck in a system call never acts on SIGTERM, and
    # has no calls to drain.
    _stop_with(supervisor, signal.SIGKILL)
    configure_logging(log_level, writer=index)
    said_once = SaidOnceAtStart(index)
    if index:
        SaidByWorker0()
    states = None if local_model is None else _local_model_states(*local_model)
    try:
        run(
            config,
            on_ready=lambda _address: _listening(supervisor, ready, beats, said_once),
            on_stopping=lambda: _draining(ready),
            local_model_states=states,
            worker=index,
        )
    except (ConfigError, ListenError) as exc:  # e.g. the keys file, its Prometheus port
        sys.exit(_report_start_failure(exc, ready))


def _report_start_failure(exc: ConfigError | ListenError, ready: Connection) -> int:
    """Send the supervisor the line saying why this worker could not start (printed here
    when the supervisor is gone); the exit status, 2 for the config."""
    from service.server import start_failure

    line, status = start_failure(exc)
    try:
        ready.send(_StartFailed(line))
    except OSError:
        print(line, file=sys.stderr, flush=True)
    return status


async def _local_model_states(
    first: LocalModelState, updates: Connection
) -> AsyncIterator[LocalModelState]:
    """`first` (the local model's state as the worker started), then each state the
    supervisor sends, read as they come; they end once the supervisor is gone (the kernel
    then stops the worker too)."""
    yield first
    while True:
        await _readable(updates.fileno())
        try:
            state = updates.recv()
        except (EOFError, OSError):
            return
        yield state


class _LocalModelPipe:
    """The supervisor's end of the pipe telling one worker the local model's state.

    Never blocks the supervisor: a state waits until the pipe can take it, and a worker
    that does not read meanwhile (stopped, or stuck in its start) is sent only the latest.
    A state is far under PIPE_BUF, so a pipe that can be written takes it whole at once.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._latest: LocalModelState | None = None

    def send(self, state: LocalModelState) -> None:
        """Send `state` as soon as the pipe takes it, in place of any still waiting."""
        if self._connection.closed:  # its worker has exited
            return
        if self._latest is None:
            asyncio.get_running_loop().add_writer(self._connection.fileno(), self._flush)
        self._latest = state

    def _flush(self) -> None:
        asyncio.get_running_loop().remove_writer(self._connection.fileno())
        state, self._latest = self._latest, None
        with contextlib.suppress(OSError):  # a worker gone: its replacement is told at start
            self._connection.send(state)

    def close(self) -> None:
        """Close the pipe, dropping a state still waiting."""
        if self._latest is not None:
            asyncio.get_running_loop().remove_writer(self._connection.fileno())
            self._latest = None
        self._connection.close()


async def _tell_workers(workers: list[_Worker], state: LocalModelState) -> None:
    """Send the local model's new `state` to every worker running; one started later is
    given the state of then at its start."""
    for worker in workers:
        if worker.run is not None and worker.run.local_model is not None:
            worker.run.local_model.send(state)


@contextlib.contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGHUP blocked in this thread meanwhile, and so in a process started
    meanwhile.

    A terminal sends them to the whole process group: a worker still importing the gateway
    would end with KeyboardInterrupt or be killed by SIGHUP (a status the supervisor takes
    for a failure). Blocked, they wait for the worker's own handler (`serve` unblocks
    them), and the supervisor's SIGTERM stops the worker meanwhile.
    """
    # Started with the first worker otherwise, unblocking them (not restoring the mask).
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, early_signals.GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def _readable(fd: int) -> None:
    """Return once `fd` can be read (or is at its end) without blocking."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)


async def _started(run: _Run) -> bool:
    """Whether `run`'s worker said it listens (False: it died, or said why its start
    failed: `run.start_failure`); `run.listened` says so too."""
    await _readable(run.ready.fileno())
    with contextlib.suppress(EOFError):
        _note(run, run.ready.recv())
    return run.listened


def _note(run: _Run, message: object) -> None:
    """Keep on `run` what its worker said: that it listens (its pid), that a stop reached
    it (_DRAINING), or why its start failed (_StartFailed)."""
    if isinstance(message, _StartFailed):
        run.start_failure = message.line
    elif message == _DRAINING:
        run.said_draining = True
    else:
        run.listened = True


def _note_the_rest(run: _Run) -> None:
    """`_note` what `run`'s worker (exited) said and was not read yet."""
    with contextlib.suppress(EOFError, OSError):
        while run.ready.poll():
            _note(run, run.ready.recv())


def _say_start_failures(runs: Iterable[_Run], said: set[str]) -> None:
    """Print each line of `runs` saying why a start failed that `said` lacks, adding it
    there: the workers of one config fail alike, and one line is one problem."""
    for run in runs:
        line = run.start_failure
        if line is not None and line not in said:
            said.add(line)
            print(line, file=sys.stderr, flush=True)


async def _exited(worker: BaseProcess) -> None:
    """Return once `worker` has exited (its sentinel is readable then), reaped."""
    await _readable(worker.sentinel)
    worker.join()


async def _unless_stopped(start: Awaitable[T], stopping: asyncio.Event) -> T | None:
    """What `start` gives, or None, with `start` cancelled, when `stopping` is set first."""
    task = asyncio.ensure_future(start)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


@dataclasses.dataclass
class _Run:
    """One process of a worker, its ready pipe, and the watch on its exit."""

    process: BaseProcess
    ready: Connection
    exited: asyncio.Future[None]
    listened: bool = False
    # Killed with SIGKILL by the supervisor, as one that never listened may be.
    killed: bool = False
    # Killed with SIGKILL by the supervisor past its grace period and margin, draining.
    drain_killed: bool = False
    # Where the local model's changes are sent, when the supervisor runs one.
    local_model: _LocalModelPipe | None = None
    # The worker's heartbeats (`_beat`), and when the last was read (loop time).
    beats: Connection | None = None
    last_beat: float = 0.0
    # Whether it said a stop reached it (`_DRAINING`), read once it has exited.
    said_draining: bool = False
    # The line saying why its start failed, as it sent it (`_StartFailed`).
    start_failure: str | None = None

    def close_local_model(self) -> None:
        """Close the pipe telling the worker (exited) the local model's state."""
        if self.local_model is not None:
            self.local_model.close()


@dataclasses.dataclass
class _Worker:
    """One of the N workers: its config, and its process now (None while a replacement
    waits out its back-off)."""

    index: int
    config: GatewayConfig
    run: _Run | None = None
    # When it died, within the last _CRASH_LOOP_WINDOW_S: sets the back-off.
    deaths: collections.deque[float] = dataclasses.field(default_factory=collections.deque)


@dataclasses.dataclass(frozen=True, slots=True)
class _LocalModel:
    """The local model the supervisor runs, and the file its workers take turns by."""

    server: LocalModelServer
    turns: TurnsFile

    def state_at_spawn(self) -> LocalModelState:
        """Its state now, with the turns file: what a worker is spawned with (the states
        sent later carry none: `TurnsFile` goes to a worker only as it is spawned)."""
        return dataclasses.replace(self.server.state(), turns=self.turns)


def _start(worker: _Worker, log_level: str, local_model: _LocalModel | None) -> _Run:
    """A process of `worker` started with its config and index (and `local_model`'s state
    now, then a pipe for its changes), its exit watched on the loop.

    Watched on the loop, not by a thread each: asyncio's thread pool is smaller than a big
    machine's worker count, and the exits past its size went unwatched.
    """
    ready, ready_sender = _SPAWN.Pipe(duplex=False)
    args: tuple[object, ...] = (worker.config, log_level, ready_sender, os.getpid())
    updates = sender = None
    if local_model is not None:
        # In the arguments, not on the command line: they carry the local model's key.
        updates, sender = _SPAWN.Pipe(duplex=False)
        args = (*args, (local_model.state_at_spawn(), updates))
    beats, beats_sender = _SPAWN.Pipe(duplex=False)
    process: BaseProcess = _SPAWN.Process(
        target=_worker_main, args=args, kwargs={"index": worker.index, "beats": beats_sender}
    )
    with _group_signals_blocked():
        process.start()
    ready_sender.close()  # the worker's copy alone: its exit ends the pipe
    beats_sender.close()
    os.set_blocking(beats.fileno(), False)
    run = _Run(process, ready, asyncio.ensure_future(_exited(process)), beats=beats)
    if updates is not None and sender is not None:
        updates.close()
        run.local_model = _LocalModelPipe(sender)
    return run


async def _stop(run: _Run, *, grace_s: float) -> None:
    """SIGTERM to `run`'s worker and wait for its exit (it drains its calls first, within
    `grace_s`); one that has not listened gets SIGKILL if it has not exited
    _UNREADY_KILL_AFTER_S later, one that has, _DRAIN_KILL_MARGIN_S past `grace_s`."""
    pid = run.process.pid
    assert pid is not None  # started
    drained_by = asyncio.get_running_loop().time() + grace_s + _DRAIN_KILL_MARGIN_S
    if run.process.exitcode is None:  # its status read (reaped) first: no pid reused
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_UNREADY_KILL_AFTER_S):
            await asyncio.shield(run.exited)
    # A ready message unread yet (a stop as the first start ends) counts as listened.
    listened = run.listened or run.ready.poll()
    if not listened and not run.exited.done() and run.process.exitcode is None:
        os.kill(pid, signal.SIGKILL)
        run.killed = True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(drained_by):
            await asyncio.shield(run.exited)
    if not run.exited.done() and run.process.exitcode is None:
        os.kill(pid, signal.SIGKILL)
        run.drain_killed = True
    await asyncio.shield(run.exited)


async def _stop_every(workers: Sequence[_Worker], grace_s: float) -> None:
    """`_stop` each worker still running (a replacement included)."""
    runs = [w.run for w in workers if w.run is not None and not w.run.exited.done()]
    await asyncio.gather(*(_stop(run, grace_s=grace_s) for run in runs))


def _ended_cleanly(run: _Run) -> bool:
    """Whether `run`'s worker (exited) ended as a stop ends one: its drain done (status
    0), SIGTERM before it could catch it, or the supervisor's SIGKILL before it listened."""
    return run.killed or run.process.exitcode in (0, -signal.SIGTERM)


def _how_it_ended(index: int, run: _Run) -> dict[str, object]:
    """Worker `index`'s process `run`, ended, as its log lines say it: `index`, `pid`, and
    `exit_code=N`, or `signal=SIGKILL` for a process a signal ended."""
    said: dict[str, object] = {"index": index, "pid": run.process.pid}
    exitcode = run.process.exitcode
    if exitcode is None or exitcode >= 0:
        return {**said, "exit_code": exitcode}
    try:
        return {**said, "signal": signal.Signals(-exitcode).name}
    except ValueError:  # one the enum does not name (a real-time signal)
        return {**said, "signal": -exitcode}


def _why_the_start_failed(runs: list[_Run]) -> dict[str, object]:
    """What `workers.start_failed` says of the first start's `runs` (one per worker, in
    order): the first that exited (`index`, `pid`, and `exit_code` or `signal`), else
    those that had not listened in time (`not_listening`, `timeout_s`).

    A worker killed as it starts (the OOM killer, as every worker imports at once) prints
    nothing of its own: without this the status 1 would be all there is to go on.
    """
    for index, run in enumerate(runs):
        if run.exited.done():
            return _how_it_ended(index, run)
    late = [index for index, run in enumerate(runs) if not run.listened]
    return {"not_listening": late, "timeout_s": _WORKER_START_TIMEOUT_S}


def _a_crash_loop(worker: _Worker, now: float, *, forget: bool) -> bool:
    """Count a death of `worker` at `now` (forgetting those older than the window if
    `forget`); whether it makes a crash loop, logged `workers.crash_loop`."""
    worker.deaths.append(now)
    while forget and worker.deaths[0] <= now - _CRASH_LOOP_WINDOW_S:
        worker.deaths.popleft()
    if len(worker.deaths) < _CRASH_LOOP_DEATHS:
        return False
    deaths = {"deaths": len(worker.deaths), "window_s": _CRASH_LOOP_WINDOW_S}
    log.error("workers.crash_loop", extra={"index": worker.index, **deaths})
    return True


async def _keep(
    worker: _Worker, run: _Run, log_level: str, local_model: _LocalModel | None
) -> None:
    """Start `worker` again each time it dies, after a back-off; return once it dies
    _CRASH_LOOP_DEATHS times within _CRASH_LOOP_WINDOW_S (a crash loop).

    Cancelled (a stop) during the back-off, it starts no replacement; one already started
    is in `worker.run`, for the caller to stop as any worker.
    """
    loop = asyncio.get_running_loop()
    while True:
        await _exited_or_hung(worker.index, run)
        worker.run = None
        _note_the_rest(run)
        _say_start_failures([run], set())  # a replacement's: each time, as each is a death
        run.ready.close()
        if run.beats is not None:
            run.beats.close()
        run.close_local_model()
        log.warning("workers.worker_died", extra=_how_it_ended(worker.index, run))
        run.process.close()  # its sentinel's descriptor, which each restart would leak
        forget = run.listened
        while True:  # until a replacement is started
            if _a_crash_loop(worker, loop.time(), forget=forget):
                return
            await asyncio.sleep(_RESTART_DELAY_S * 2 ** (len(worker.deaths) - 1))
            try:
                run = worker.run = _start(worker, log_level, local_model)
                break
            except Exception as exc:  # no process (EAGAIN, ENOMEM), or a bug
                # A death like any: retried after the back-off, a crash loop if it lasts,
                # while the other workers serve. Not forgotten: it never listened.
                log.exception(
                    "workers.restart_failed",
                    extra={"index": worker.index, "error": f"{type(exc).__name__}: {exc}"},
                )
                forget = False
        log.info("workers.worker_restarted", extra={"index": worker.index, "pid": run.process.pid})
        try:
            async with asyncio.timeout(_RESTART_START_TIMEOUT_S):
                await _started(run)
        except TimeoutError:  # it would run the gateway a worker short for ever
            timeout = {"timeout_s": _RESTART_START_TIMEOUT_S}
            log.error(
                "workers.start_timed_out",
                extra={"index": worker.index, "pid": run.process.pid, **timeout},
            )
            await _stop(run, grace_s=worker.config.server.grace_period_s)


async def _exited_or_hung(index: int, run: _Run) -> None:
    """Return once `run`'s worker has exited; one that listened and has sent no heartbeat
    for _HUNG_AFTER_S is killed first (SIGKILL: a stopped process acts on no other),
    logged `workers.worker_hung`."""
    loop = asyncio.get_running_loop()
    beats = run.beats
    if beats is None or not run.listened:  # it never serves: no heartbeat to wait for
        # Shielded: the watch goes on when a stop cancels this task, for the caller to await.
        await asyncio.shield(run.exited)
        return
    pid = run.process.pid
    assert pid is not None  # started
    run.last_beat = loop.time()
    loop.add_reader(beats.fileno(), _read_beats, run)
    try:
        while not run.exited.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_HEARTBEAT_S):
                    await asyncio.shield(run.exited)
            silent_s = loop.time() - run.last_beat
            if not run.exited.done() and silent_s > _HUNG_AFTER_S:
                hung = {"index": index, "pid": pid, "silent_s": round(silent_s, 1)}
                log.error("workers.worker_hung", extra=hung)
                os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still its own
                await asyncio.shield(run.exited)
    finally:
        loop.remove_reader(beats.fileno())


def _read_beats(run: _Run) -> None:
    """Take the heartbeats `run`'s worker sent (its pipe readable), noting when."""
    assert run.beats is not None
    try:
        if not os.read(run.beats.fileno(), 4096):  # the worker has exited
            asyncio.get_running_loop().remove_reader(run.beats.fileno())
            return
    except BlockingIOError:
        return
    run.last_beat = asyncio.get_running_loop().time()


async def _keep_serving(
    workers: list[_Worker],
    log_level: str,
    stopping: asyncio.Event,
    local_model: _LocalModel | None,
) -> None:
    """Restart the workers that die until a stop, or until one of them crash-loops."""
    keepers = [
        asyncio.ensure_future(_keep(w, w.run, log_level, local_model))
        for w in workers
        if w.run is not None
    ]
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([*keepers, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*keepers, stop):
            task.cancel()
        await asyncio.gather(*keepers, stop, return_exceptions=True)


async def _supervise(configs: list[GatewayConfig], log_level: str) -> int:
    config, count = configs[0], len(configs)
    # From the start: a SIGTERM while the workers start must stop them too, not kill this
    # process alone and leave them serving the port.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in early_signals.stop_signals():
        loop.add_signal_handler(sig, stopping.set)
    if early_signals.received():  # before these handlers, as the process started
        log.info("workers.stopped_while_starting")
        return 0
    reserved: list[socket.socket] = []
    async with contextlib.AsyncExitStack() as stack:
        # Held until the supervisor stops, not only while the workers start: should every
        # worker be dead at once, the port stays the gateway's for their replacements.
        stack.callback(_close, reserved)
        sock, listen = _reserve_address(config.server.listen)
        reserved.append(sock)
        health_listen = None
        if config.server.health_listen is not None:
            sock, health_listen = _reserve_address(config.server.health_listen)
            reserved.append(sock)
        server = dataclasses.replace(
            config.server, listen=listen, health_listen=health_listen, workers=count
        )
        worker_config = dataclasses.replace(config, server=server)
        workers = [
            _Worker(index, dataclasses.replace(worker_config, telemetry=own.telemetry))
            for index, own in enumerate(configs)
        ]
        local = None
        if config.wants_local_model:
            # Where the workers take turns calling it (`service.machine_turns`).
            turns = TurnsFile.create()
            stack.callback(turns.close)
            starting = stack.enter_async_context(
                LocalModelServer(
                    config.local_model,
                    on_availability=functools.partial(_tell_workers, workers),
                    withheld_env=config.secret_variables,
                )
            )
            running = await _unless_stopped(starting, stopping)
            if running is None:  # it can take local_model.startup_timeout_s to answer
                log.info("workers.stopped_while_starting")
                return 0
            local = _LocalModel(running, turns)
            # It runs here, and the workers follow it (`_tell_workers`): none runs its own.
            not_theirs = dataclasses.replace(config.local_model, enabled="never")
            for worker in workers:
                worker.config = dataclasses.replace(worker.config, local_model=not_theirs)
        # However this ends, no worker outlives it: an error of the supervisor's own would
        # leave it waiting on them as it exits (multiprocessing joins its children), its
        # stop signals ignored. Each one stopped already is passed over.
        stack.push_async_callback(_stop_every, workers, config.server.grace_period_s)
        runs = []
        for worker in workers:
            worker.run = _start(worker, log_level, local)
            runs.append(worker.run)
        any_exit = asyncio.ensure_future(
            asyncio.wait([r.exited for r in runs], return_when=asyncio.FIRST_COMPLETED)
        )
        stop = asyncio.ensure_future(stopping.wait())
        started = asyncio.ensure_future(asyncio.gather(*(_started(r) for r in runs)))
        phases: list[asyncio.Future[Any]] = [started, any_exit, stop]
        await asyncio.wait(
            phases,
            timeout=_WORKER_START_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        is_up = started.done() and all(started.result())
        crashed = False
        if is_up:
            health = "" if health_listen is None else f", health on {health_listen}"
            announce(f"llm-gateway listening on {listen} ({count} workers){health}")
            await _keep_serving(workers, log_level, stopping, local)
            crashed = not stopping.is_set()
        elif started.done():
            # A worker closed its pipe without listening: wait for its exit (its status).
            await asyncio.wait([any_exit, stop], return_when=asyncio.FIRST_COMPLETED)
        said: set[str] = set()
        _say_start_failures(runs, said)
        if not stopping.is_set() and not is_up:
            log.error("workers.start_failed", extra=_why_the_start_failed(runs))
        # Those running now, a replacement still starting included; none is started after.
        stopped = {w.index: w.run for w in workers if w.run is not None}
        runs = list(stopped.values())
        grace_s = config.server.grace_period_s
        await _stop_every(workers, grace_s)
        for run in runs:
            run.close_local_model()
            _note_the_rest(run)
        _say_start_failures(runs, said)  # of the workers stopped before they were read
        # A worker that ended badly before the stop reached it (killed or crashed as the
        # stop came, whichever the supervisor saw first) is a death, not a failed stop;
        # one that ended badly while it drained is a failed stop.
        unclean = {i: r for i, r in stopped.items() if not _ended_cleanly(r)}
        failed_drains = [i for i, r in unclean.items() if r.drain_killed or r.said_draining]
        for index, run in unclean.items():
            ended = _how_it_ended(index, run)
            if run.drain_killed:
                hung = {"after_s": grace_s + _DRAIN_KILL_MARGIN_S}
                log.error("workers.drain_killed", extra={**ended, **hung})
            elif index in failed_drains:
                # The status 1 alone would leave the operator to guess which worker, and how.
                log.error("workers.drain_failed", extra=ended)
            elif is_up or stopping.is_set():
                log.warning("workers.worker_died", extra=ended)
        for task in (started, stop, any_exit):
            task.cancel()
        # Awaited, not left to asyncio.run's shutdown: a gather whose workers had not said
        # they listen ends with a CancelledError that asyncio logs as never retrieved.
        await asyncio.gather(started, stop, any_exit, return_exceptions=True)
    codes = [r.process.exitcode for r in runs]
    if crashed:
        return 1
    if stopping.is_set():
        return 1 if failed_drains else 0
    return 2 if not is_up and 2 in codes else 1


def run_workers(config: GatewayConfig, *, count: int, log_level: str = "INFO") -> int:
    """Run `count` worker processes on the configured port until SIGTERM/SIGINT/SIGHUP.

    Raises:
        ConfigError: the workers' Prometheus ports do not fit, a listen host is none
            this machine can listen on, the listen policy refuses the address, or a
            Redis refuses the credentials (said once by `serve`, not by every worker, as is
            a Redis giving no answer: `redis.no_answer_at_start`, a warning).
    """
    from service.redis_access import check_redis_access, warn_of_no_answer
    from service.security import check_caller_security, check_listen_hosts

    check_listen_hosts(config)  # said once by the supervisor, which binds them first
    check_caller_security(config)
    # And a Redis refusing the credentials; one that gives no answer is said once, here.
    warn_of_no_answer(asyncio.run(check_redis_access(config)))
    try:
        return asyncio.run(_supervise(worker_configs(config, count), log_level))
    finally:
        early_signals.ignore()
