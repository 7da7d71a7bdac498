"""What the command lines (`python -m service`, `llm-gateway`) need before they know their
command: `serve`'s options and the standard descriptors a process was started without.

Standard library only: `llm-gateway` registers every command with these for each run,
`complete` and `models` too, and imports the gateway itself (config, Redis, telemetry,
the local model) only for the command that runs it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from service.option_variables import naming_variable, variable_default

DEFAULT_CONFIG = "config/gateway.yaml"
# A command's status after a Ctrl-C it caught to stop cleanly (128 + SIGINT).
INTERRUPTED = 130


def default_config() -> str:
    """The file `$LLM_GATEWAY_CONFIG` names, else `DEFAULT_CONFIG`: an empty variable (a
    script's unset one passed on) is unset, as for `make run` and the CLI's variables."""
    return os.environ.get("LLM_GATEWAY_CONFIG") or DEFAULT_CONFIG


def file_path(value: str) -> str:
    """A file's path (--config, `summarize FILE`, `batch INPUT -o OUTPUT`): an empty one
    would be read as the current directory ("cannot read : Is a directory")."""
    if not value:
        raise argparse.ArgumentTypeError("names no file")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    """--log-level: a level name logging knows, in any case."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options."""
    parser.add_argument(
        "--config",
        type=file_path,
        default=default_config(),
        help="YAML config file (default: $LLM_GATEWAY_CONFIG or config/gateway.yaml)",
    )
    parser.add_argument("--listen", help="HOST:PORT to listen on, overriding the config")
    parser.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port (SO_REUSEPORT); 0: one per core "
        "(default: server.workers, else one per core when state is shared in Redis)",
    )
    parser.add_argument(
        "--log-level",
        type=naming_variable(log_level),
        default=variable_default("LLM_GATEWAY_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: $LLM_GATEWAY_LOG_LEVEL or INFO)",
    )


def null_closed_descriptors() -> None:
    """Open /dev/null on each standard descriptor (0, 1, 2) the process was started
    without (`>&-`). Else a file the server opens takes that number, and the event loop,
    which never closes one of 0-2, aborts the process (SIGABRT, status 134) as it closes
    it at the end of a clean stop."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def null_closed_stderr() -> None:
    """Send standard error to /dev/null when it is closed (`2>&-`): Python then sets up no
    `sys.stderr`, and `print(..., file=sys.stderr)` writes to stdout, into the answer, the
    key printed or `batch -o -`'s results."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (kept open)


def exit_status(status: int) -> int:
    """`status`, for an entry point to exit with; but after a Ctrl-C (`INTERRUPTED`) the
    process ends by SIGINT itself, as Python does for a KeyboardInterrupt it is left with.

    A shell running a script (`for f in *; do llm-gateway summarize "$f"; done`) stops it
    at a Ctrl-C only when the command it waited for died of SIGINT: one that exits 130 is
    taken to have handled it, and the loop went on to its next call, each one paid for.
    The shell's `$?` is 130 either way.
    """
    if status != INTERRUPTED:
        return status
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()  # the signal ends the process before Python would flush
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    return status  # SIGINT blocked (a parent's signal mask): the status alone
