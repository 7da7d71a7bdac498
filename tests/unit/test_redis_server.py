"""The tests' throwaway redis-server: a port taken before it binds does not fail a test."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import tests.redis_server
import tests.redis_support
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def taken_then_free_ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The port probes of both helpers return, first, a port another process bound after
    the probe (as another xdist worker's server may), then free ones: the taken port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = int(holder.getsockname()[1])
        for module in (tests.redis_server, tests.redis_support):
            probes = iter([taken])
            free_port = module._free_port
            monkeypatch.setattr(
                module, "_free_port", lambda p=probes, f=free_port: next(p, None) or f()
            )
        yield taken


async def test_a_server_whose_port_was_taken_before_it_bound_starts_on_another(
    taken_then_free_ports: int,
) -> None:
    """Before, the server exited at start (address in use) and the test failed with
    "redis-server exited at start"."""
    server = RedisServer()
    try:
        await server.start()
        assert server.is_running
        assert server.port != taken_then_free_ports
    finally:
        await server.stop()


def test_the_module_servers_port_taken_before_it_bound_is_replaced(
    taken_then_free_ports: int,
) -> None:
    """The same for `redis_url`, the module-scoped server."""
    fixture = tests.redis_support.redis_url.__wrapped__()  # type: ignore[attr-defined]
    url = next(fixture)
    try:
        assert url.startswith("redis://127.0.0.1:")
        assert f":{taken_then_free_ports}/" not in url
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))):
            pass
    finally:
        fixture.close()
