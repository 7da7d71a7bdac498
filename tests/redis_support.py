"""A real redis-server on loopback for tests (`redis-server --port N --save ''`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from service.ledger import RedisLedger
from service.tenant_limits import RedisTenantLimiter

_START_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    """Whether a Redis answers PING on `port`: a listener that is not one (another test
    process's server, on a port taken before the redis-server bound it) does not."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(7).startswith(b"+PONG")
    except OSError:  # refused, or no answer within the timeout
        return False


def _wait_until_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("redis-server exited at startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start listening")


def _wait_until_answering(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """`_wait_until_listening`, for a plain-text server: until it answers PING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("redis-server exited at startup")
        if _answers_ping(port):
            return
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start answering")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The URL of a throwaway redis-server (no persistence) stopped after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; run `make redis-server`")
    # Its port, free when probed, may be bound by another test process (xdist) before
    # the server binds it: the server then exits at once, and starts on another port.
    for attempt in range(_START_ATTEMPTS):
        port = _free_port()
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_answering(port, process, timeout_s=10.0)
            break
        except RuntimeError:
            if process.poll() is None or attempt == _START_ATTEMPTS - 1:
                process.kill()
                process.wait(timeout=10)
                raise
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def use_short_leases(monkeypatch: pytest.MonkeyPatch, ttl_s: int) -> None:
    """Gateways started in this process from now on take tenant slots and budget
    reservations in Redis that lapse `ttl_s` after their last renewal (not a minute): the
    default of the constructors' TTL argument, which the gateway leaves unset."""
    monkeypatch.setitem(RedisTenantLimiter.__init__.__kwdefaults__, "lease_ttl_s", ttl_s)
    monkeypatch.setitem(RedisLedger.__init__.__kwdefaults__, "reservation_ttl_s", ttl_s)


def short_leases_setup(ttl_s: int) -> str:
    """`use_short_leases` as code a gateway process runs before it starts
    (`started_gateway_process`'s `setup`)."""
    return (
        "from service.ledger import RedisLedger\n"
        "from service.tenant_limits import RedisTenantLimiter\n"
        f"RedisTenantLimiter.__init__.__kwdefaults__['lease_ttl_s'] = {ttl_s}\n"
        f"RedisLedger.__init__.__kwdefaults__['reservation_ttl_s'] = {ttl_s}"
    )
