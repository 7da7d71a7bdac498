"""The "listening on" line a started gateway writes to standard output."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("llm_gateway.server")


def announce(line: str) -> None:
    """Write `line` to standard output for whoever started the gateway.

    One whose reader is gone (`serve | head -0`, a supervisor that closed its pipe) loses
    the line, and the gateway serves on: the line is for people and scripts, never needed
    to serve. Standard output then goes to /dev/null, as Python would fail its last flush
    at exit on the same pipe.
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        log.warning("server.stdout_closed", extra={"line": line})
