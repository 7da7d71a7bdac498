"""gRPC core's own log lines, kept to its errors unless the operator asks for more.

gRPC's C core writes to stderr itself, past Python's logging and `--log-level`, and at
INFO by default: a line for each failed TLS handshake (a plaintext client, a client
certificate from another CA). So whoever can reach a TLS port could fill the log a line
a connection, without a key. gRPC reads `GRPC_VERBOSITY` once, as it is imported: the
entry points call `quiet_grpc_core` before anything imports it. Standard library only.
"""

from __future__ import annotations

import os

# The variable gRPC core reads its log level from (DEBUG, INFO, ERROR or NONE).
GRPC_VERBOSITY = "GRPC_VERBOSITY"


def quiet_grpc_core() -> None:
    """Have gRPC core log only its errors, unless `GRPC_VERBOSITY` is set already; the
    `--workers` processes inherit it."""
    os.environ.setdefault(GRPC_VERBOSITY, "ERROR")


__all__ = ["GRPC_VERBOSITY", "quiet_grpc_core"]
