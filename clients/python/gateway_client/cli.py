"""`llm-gateway`: run the gateway, or call it from a shell.

Each subcommand lives in `gateway_client/commands/` and registers itself with
`register(subparsers)`; its handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Callable, Sequence

from gateway_client.client import MAX_TIMEOUT_S
from gateway_client.commands import (
    batch,
    check_options,
    complete,
    keys,
    models,
    serve,
    summarize,
    usage,
)
from service import early_signals
from service.command_line import exit_status, null_closed_descriptors, null_closed_stderr

# Each registers without importing the gateway (`serve`, `check` and `keys` import it as
# they run): every `complete` or `models` would pay for it, most of its start.
SUBCOMMANDS = [serve, complete, models, batch, summarize, check_options, usage, keys]
# What `llm-gateway --help` says: the docstring's first line, not its notes for developers.
DESCRIPTION = "run the gateway, or call it from a shell ('llm-gateway COMMAND --help' for each)"


INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
# What every gateway refuses outside (`service.validation`): a usage error here, exit 2,
# rather than a call failed INVALID_ARGUMENT, exit 1, as though it might pass again.
MAX_TOKENS = (1, INT32[1])
TEMPERATURE = (0.0, 2.0)


def int_in(bounds: tuple[int, int]) -> Callable[[str], int]:
    """An argparse type: an integer the request's protobuf field can carry."""
    low, high = bounds

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is outside {low}..{high}")
        return number

    return parse


def float_in(bounds: tuple[float, float]) -> Callable[[str], float]:
    """An argparse type: a number from `bounds`' low to its high, both included."""
    low, high = bounds

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not low <= number <= high:  # nan fails both
            raise argparse.ArgumentTypeError(f"{value} is outside {low:g}..{high:g}")
        return number

    return parse


def timeout_seconds(value: str) -> float:
    """An argparse type: a call's timeout, a number of seconds above 0 and at most
    `MAX_TIMEOUT_S` (a usage error, exit 2, rather than a call that ends at once)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= MAX_TIMEOUT_S:  # nan fails both
        raise argparse.ArgumentTypeError(f"{value} is not above 0 and at most {MAX_TIMEOUT_S:g}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script."""
    # /dev/null on a descriptor the command was started without (`<&-`): else the event
    # loop's own file takes its number, and libuv aborts (SIGABRT) closing it at the end,
    # after the command's clear "standard input is closed". `sys.stdin` stays None.
    null_closed_descriptors()
    null_closed_stderr()
    escape_what_output_cannot_encode()
    write_output_by_line()
    parser = argparse.ArgumentParser(prog="llm-gateway", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    try:
        args = parser.parse_args(argv)
        if args.command != "serve":
            # A Ctrl-C held since the console script's first line (the imports take most
            # of a second) is raised here: a traceback, before.
            early_signals.release()  # held by the console script for `serve` alone
    except KeyboardInterrupt:
        return 130
    if sys.stdout is None and _prints_results(args):
        # `>&-`: Python sets up no stdout, and print() writes nowhere. An answer paid for
        # was lost with exit 0, a stream or `batch -o -` ended in a traceback.
        print(
            f"llm-gateway {args.command}: cannot write: standard output is closed", file=sys.stderr
        )
        return 1
    try:
        result = args.handler(args)
    except KeyboardInterrupt:  # a Ctrl-C as `keys` imports the gateway's modules, or runs
        return 130
    if asyncio.iscoroutine(result):
        try:
            result = asyncio.run(result)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # The reader of stdout left (`| head`): the call is stopped by now.
            _discard_stdout()
            return 141  # 128 + SIGPIPE: what a shell reports for a process SIGPIPE ended
        except OSError as exc:  # a full disk under stdout (or a batch's output): no traceback
            _discard_unwritten_stdout()
            print(f"llm-gateway {args.command}: cannot write: {exc.strerror}", file=sys.stderr)
            return 1
    return int(result)


def escape_what_output_cannot_encode() -> None:
    """Write a character stdout's (or stderr's) encoding lacks as a backslash escape (`é`
    as `\\xe9` under `PYTHONIOENCODING=ascii`, or `LC_ALL=C` without UTF-8 mode).

    Python's stdout is strict (`surrogateescape` in the C locale): an answer such an
    encoding could not hold ended the command in a UnicodeEncodeError traceback, after
    the call was paid for. Python's stderr escapes already, bar the one that
    `null_closed_stderr` opens.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def write_output_by_line() -> None:
    """Flush stdout at each line break wherever it goes, as on a terminal.

    Block-buffered (a pipe, a file), a command's output was written only as Python exited:
    a reader gone (`| head -0`) or a full disk then failed there, "Exception ignored ...
    BrokenPipeError" and status 120 instead of the command's one line and status 141 or
    1; and with stderr in the same file (`2>&1 | tee log`) the usage line came before the
    answer it describes.
    """
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def _prints_results(args: argparse.Namespace) -> bool:
    """Whether the command's result is what it writes to standard output (`check`'s is
    its exit status; `keys` sees to its own, as `python -m service keys` runs it too)."""
    if args.command == "batch":
        return bool(args.output == batch.STDOUT)
    return args.command in ("complete", "models", "usage", "summarize")


def _discard_stdout() -> None:
    """Send stdout to /dev/null: Python would flush it again at exit, and fail there too."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _discard_unwritten_stdout() -> None:
    """`_discard_stdout` when stdout still holds what it could not write."""
    try:
        sys.stdout.flush()
    except OSError:
        _discard_stdout()


if __name__ == "__main__":
    sys.exit(exit_status(main()))
