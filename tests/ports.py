"""Loopback ports for tests that need one refusing connections."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A TCP port on loopback that refuses connections while the block runs: bound, never
    listening, so that no other process takes it (one probed free and let go may be bound
    by another test process meanwhile, and answer). A grpc server may still listen on it,
    a collector coming up where one was down: it sets SO_REUSEPORT, as this socket does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
