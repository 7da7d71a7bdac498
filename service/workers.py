"""Several gateway processes on one port (SO_REUSEPORT), so one machine uses every core.

The parent reserves the port, starts the local model once (if it is used) and hands its
address to the workers as an ordinary upstream, then supervises the workers: SIGTERM or
SIGINT is forwarded to each, which drains its own calls within the grace period. State
kept in memory (cache, usage ledger, limits) is per worker unless Redis is configured.

Each worker has its own metrics, so each serves its own Prometheus endpoint: worker `i`
(from 0) listens on `telemetry.prometheus_port + i` (9464 + i when only
`OTEL_METRICS_EXPORTER=prometheus` asks for one). Port 0 gives each worker a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Iterator, Mapping
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from service import early_signals
from service.config import ConfigError, GatewayConfig, host_and_port
from service.cpus import usable_cpus
from service.local_model import LocalModelServer
from service.telemetry.setup import DEFAULT_PROMETHEUS_PORT, names_prometheus

T = TypeVar("T")

log = logging.getLogger("llm_gateway.workers")

_WORKER_START_TIMEOUT_S = 120.0


def worker_count(config: GatewayConfig) -> tuple[int, str]:
    """How many worker processes to run, and why.

    `server.workers` when set (0: one per core). Unset, one per core as long as nothing
    that must agree across processes would be kept in each: the usage ledger (GetUsage,
    budgets) and any tenant's rate limits must then be in Redis; otherwise one process,
    so that a default setup never answers with a fraction of its usage or lets a tenant
    through N times its limit. The response cache may be per process: it only hits less.
    """
    cores = usable_cpus()
    requested = config.server.workers
    if requested is not None:
        return (requested or cores), "server.workers" if requested else "one per core"
    if not config.ledger.redis_url:
        return 1, "the usage ledger is in memory (set ledger.redis_url to share it)"
    if not config.auth.redis_url and any(t.has_rate_limits for t in config.tenants.values()):
        return 1, "tenant limits are in memory (set auth.redis_url to share them)"
    return cores, "one per core: shared state is in Redis"


def worker_configs(
    config: GatewayConfig, count: int, *, environ: Mapping[str, str] | None = None
) -> list[GatewayConfig]:
    """One config per worker: the same but for each one's Prometheus port (base + index).

    Raises:
        ConfigError: the last worker's port would be past 65535.
    """
    env = os.environ if environ is None else environ
    telemetry = config.telemetry
    base = telemetry.prometheus_port
    if base is None and telemetry.enabled and names_prometheus(env):
        base = DEFAULT_PROMETHEUS_PORT
    if base is None or base == 0:
        return [config] * count
    if base + count - 1 > 65535:
        raise config.error(
            "telemetry.prometheus_port",
            f"{count} workers need ports {base}..{base + count - 1}; the last is past 65535",
        )
    return [
        dataclasses.replace(
            config, telemetry=dataclasses.replace(telemetry, prometheus_port=base + index)
        )
        for index in range(count)
    ]


def _reserve_address(listen: str) -> tuple[socket.socket, str]:
    """A socket holding `listen`'s port for the workers, and `listen` with that port
    (the one chosen when `listen` asks for port 0)."""
    try:
        sock, port = _bind_shared(listen)
    except OSError as exc:
        from service.server import ListenError  # here: the supervisor never serves itself

        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    return sock, f"{listen.rpartition(':')[0]}:{port}"


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _bind_shared(listen: str) -> tuple[socket.socket, int]:
    address = host_and_port(listen)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    # With SO_REUSEPORT the bind below would join a port that another process of this
    # user already listens on the same way (another gateway's workers), and the kernel
    # would split the callers between the two: first make sure the port is free.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = (address[0], int(probe.getsockname()[1]))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock, int(sock.getsockname()[1])


# prctl(2): the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _stop_with(supervisor: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies, even by SIGKILL.

    Otherwise a supervisor killed outright (not through its process group, as Kubernetes
    and systemd do) leaves its workers serving the port with nobody to stop them. Linux
    only; elsewhere the call is skipped.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(config: GatewayConfig, log_level: str, ready: Connection, supervisor: int) -> None:
    from service.logs import configure_logging
    from service.server import ListenError, report_start_failure, run

    _stop_with(supervisor)
    configure_logging(log_level)
    try:
        run(config, on_ready=lambda _address: ready.send(os.getpid()))
    except (ConfigError, ListenError) as exc:  # e.g. the keys file, its Prometheus port
        sys.exit(report_start_failure(exc))


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile, and so in a process started meanwhile.

    Ctrl-C in a terminal sends SIGINT to the whole process group: a worker still importing
    the gateway would end with KeyboardInterrupt (a traceback, and a status the supervisor
    takes for a failure). Blocked, it waits for the worker's own handler (`serve` unblocks
    it), and the supervisor's SIGTERM stops the worker meanwhile.
    """
    # Started with the first worker otherwise, unblocking SIGINT (not restoring the mask).
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
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


async def _started(ready: Connection) -> bool:
    """Whether the worker at the other end of `ready` said it listens (False: it died)."""
    await _readable(ready.fileno())
    try:
        ready.recv()
    except EOFError:
        return False
    return True


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


async def _supervise(configs: list[GatewayConfig], log_level: str) -> int:
    config, count = configs[0], len(configs)
    # From the start: a SIGTERM while the workers start must stop them too, not kill this
    # process alone and leave them serving the port.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if early_signals.received():  # before these handlers, as the process started
        log.info("workers.stopped_while_starting")
        return 0
    reserved: list[socket.socket] = []
    async with contextlib.AsyncExitStack() as stack:
        # However this ends; closing twice is harmless.
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
        if config.wants_local_model:
            starting = stack.enter_async_context(
                LocalModelServer(config.local_model, withheld_env=config.secret_variables)
            )
            local = await _unless_stopped(starting, stopping)
            if local is None:  # it can take local_model.startup_timeout_s to answer
                log.info("workers.stopped_while_starting")
                return 0
            worker_config = dataclasses.replace(
                worker_config,
                upstreams=(*config.upstreams, local.upstream_config()),
                local_model=dataclasses.replace(config.local_model, enabled="never"),
            )
        context = multiprocessing.get_context("spawn")
        workers: list[BaseProcess] = []
        readies: list[Connection] = []
        for own in configs:
            ready, ready_sender = context.Pipe(duplex=False)
            worker: BaseProcess = context.Process(
                target=_worker_main,
                args=(
                    dataclasses.replace(worker_config, telemetry=own.telemetry),
                    log_level,
                    ready_sender,
                    os.getpid(),
                ),
            )
            with _sigint_blocked():
                worker.start()
            ready_sender.close()  # the worker's copy alone: its exit ends the pipe
            workers.append(worker)
            readies.append(ready)
        # Watched on the loop, not by a thread each: asyncio's thread pool is smaller than
        # a big machine's worker count, and the exits past its size went unwatched.
        exits = [asyncio.ensure_future(_exited(w)) for w in workers]
        any_exit = asyncio.ensure_future(asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED))
        stop = asyncio.ensure_future(stopping.wait())
        started = asyncio.ensure_future(asyncio.gather(*(_started(r) for r in readies)))
        phases: list[asyncio.Future[Any]] = [started, any_exit, stop]
        await asyncio.wait(
            phases,
            timeout=_WORKER_START_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        is_up = started.done() and all(started.result())
        if is_up:
            _close(reserved)
            health = "" if health_listen is None else f", health on {health_listen}"
            print(f"llm-gateway listening on {listen} ({count} workers){health}", flush=True)
        if started.done():
            # Serving until a worker exits or a stop; or, when a worker closed its pipe
            # without listening, until it has exited (with its own status).
            await asyncio.wait([any_exit, stop], return_when=asyncio.FIRST_COMPLETED)
        if not stopping.is_set():
            log.error("workers.exited_unexpectedly" if is_up else "workers.start_failed")
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)
        await asyncio.gather(*exits)
        for task in (started, stop, any_exit):
            task.cancel()
        # Awaited, not left to asyncio.run's shutdown: a gather whose workers had not said
        # they listen ends with a CancelledError that asyncio logs as never retrieved.
        await asyncio.gather(started, stop, any_exit, return_exceptions=True)
        _close(reserved)
    codes = [w.exitcode for w in workers]
    if stopping.is_set():  # a worker stopped before it could catch SIGTERM is stopped too
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
    return 2 if not is_up and 2 in codes else 1


def run_workers(config: GatewayConfig, *, count: int, log_level: str = "INFO") -> int:
    """Run `count` worker processes on the configured port until SIGTERM/SIGINT.

    Raises:
        ConfigError: the workers' Prometheus ports do not fit, or the listen policy
            refuses the address (said once by `serve`, not by every worker).
    """
    from service.security import check_listen_policy

    check_listen_policy(config)
    try:
        return asyncio.run(_supervise(worker_configs(config, count), log_level))
    finally:
        early_signals.ignore()
