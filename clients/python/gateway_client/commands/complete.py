"""`llm-gateway complete "prompt"`: print an answer; usage, cost and latency on stderr
(and with `--show-reasoning`, a reasoning model's reasoning before them)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

import grpc

from gateway_client.client import (
    CACHE_MODES,
    DEFAULT_TIMEOUT_S,
    REASONING_EFFORTS,
    GatewayClient,
    build_request,
)
from gateway_client.commands.usage import parse_label
from gateway_client.connection import (
    DEFAULT_MODEL,
    add_connection_arguments,
    connection,
    text_argument,
)
from gateway_client.enums import enum_name
from gateway_client.errors import error_details
from gateway_client.text_input import text_lines
from llmgateway.v1 import gateway_pb2 as pb


def register(subparsers: Any) -> None:
    """Add the `complete` subcommand."""
    from gateway_client.cli import (
        MAX_TOKENS,
        TEMPERATURE,
        UINT32,
        float_in,
        int_in,
        timeout_seconds,
    )

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "complete", help="ask for one completion and print it"
    )
    parser.add_argument(
        "prompt", type=text_argument, help="the user message ('-' reads standard input)"
    )
    parser.add_argument(
        "--model",
        type=text_argument,
        default=DEFAULT_MODEL,
        help="model name (default: %(default)s)",
    )
    parser.add_argument("--system", type=text_argument, help="a system message to put first")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument(
        "--max-tokens", type=int_in(MAX_TOKENS), help="upper bound on generated tokens"
    )
    parser.add_argument(
        "--temperature", type=float_in(TEMPERATURE), help="sampling temperature, 0 to 2"
    )
    parser.add_argument(
        "--reasoning-effort",
        choices=REASONING_EFFORTS,
        help="how much a reasoning model thinks (default: the upstream's)",
    )
    parser.add_argument(
        "--show-reasoning",
        action="store_true",
        help="print a reasoning model's reasoning on stderr, before the answer",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait (default: %(default)s)",
    )
    parser.add_argument(
        "--cache",
        choices=CACHE_MODES,
        help="bypass, refresh or no_store the gateway's cache (default: the gateway's)",
    )
    parser.add_argument(
        "--cache-ttl-s",
        type=int_in(UINT32),
        help="seconds the answer stays cached (default: the gateway's)",
    )
    parser.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="cost label (repeatable)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(handler=complete_command)


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt within, as outside asyncio: asyncio.run's own SIGINT
    handler only asks the event loop to cancel the command, and a read of standard input
    blocks that loop, so the first Ctrl-C at a terminal was lost."""
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored (`nohup`, `&` in a script): it stays so
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stdin_bytes() -> BinaryIO:
    """Standard input's bytes, to read.

    Raises:
        OSError: standard input is closed (`<&-`): Python sets none up.
    """
    if sys.stdin is None:
        raise OSError(errno.EBADF, "standard input is closed")
    return sys.stdin.buffer


def stdin_text() -> str:
    """Standard input as text, as a file argument is read (`text_lines`): in the encoding
    its byte order mark names (a Windows tool's UTF-16), else UTF-8, bytes that do not
    decode replaced, line breaks as `\n`, so that the same text piped or named as a file
    is the same request (one cache key).

    Raises:
        OSError: standard input is closed (`<&-`), or cannot be read.
    """
    source = stdin_bytes()
    with ctrl_c_interrupts(), text_lines(source) as text:
        return text.read()


# SGR dim and back to normal intensity: each reasoning piece is wrapped on its own, so
# that a Ctrl-C between two pieces cannot leave the terminal dim.
_DIM, _NORMAL = "\x1b[2m", "\x1b[22m"


@dataclasses.dataclass(slots=True)
class ReasoningOnStderr:
    """A reasoning model's reasoning, written to `stream` (stderr: stdout stays the answer
    alone, for pipes) as it arrives, and closed by a blank line before whatever follows.

    Dim on a terminal (unless `$NO_COLOR` is set): reasoning has blank lines of its own,
    so one more does not tell it apart from the answer there; in a file it is left as it
    came, with no prefix or escapes to strip.
    """

    stream: TextIO
    is_dim: bool = False
    is_open: bool = False
    ends_line: bool = True

    @classmethod
    def on(cls, stream: TextIO) -> ReasoningOnStderr:
        """The reasoning to write to `stream`, dim when it is a terminal."""
        return cls(stream, is_dim=stream.isatty() and not os.environ.get("NO_COLOR"))

    def write(self, piece: str) -> None:
        """Write the next piece of reasoning."""
        if not piece:
            return
        self.stream.write(f"{_DIM}{piece}{_NORMAL}" if self.is_dim else piece)
        self.stream.flush()
        self.is_open = True
        self.ends_line = piece.endswith("\n")

    def close(self) -> None:
        """End the reasoning's line, then leave a blank one; nothing if none was written."""
        if self.is_open:
            self.stream.write("\n" if self.ends_line else "\n\n")
            self.stream.flush()
            self.is_open = False


def printable(text: str) -> str:
    """`text` with each character that is not printable (a control character: a terminal
    escape sequence's ESC, a NUL) written as its backslash escape, as `repr` writes it."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def usage_line(
    meta: pb.CompletionMetadata, elapsed_s: float, *, shows_reasoning: bool = False
) -> str:
    """One line of usage, cost and latency for stderr; with `shows_reasoning`, the part of
    the output tokens that went on reasoning too."""
    usage = meta.usage
    reasoning = f" reasoning={usage.reasoning_tokens}" if shows_reasoning else ""
    estimated = " (estimated)" if usage.estimated else ""
    cached = " cache hit" if meta.cache_hit else ""
    return (
        # The model is the upstream's word, which an older gateway relayed as it came.
        f"[{printable(meta.model) or '?'} via {printable(meta.upstream) or '?'}{cached}] "
        f"tokens in={usage.input_tokens} out={usage.output_tokens}{reasoning}{estimated} "
        f"cost=${meta.cost_usd:.6f} attempts={meta.attempts} "
        f"ttft={meta.timings.time_to_first_token_ms:.0f}ms "
        f"queued={meta.timings.queued_ms:.0f}ms total={elapsed_s * 1000:.0f}ms "
        f"finish={enum_name(pb.FinishReason, meta.finish_reason)}"
    )


async def complete_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway complete`."""
    try:
        prompt = stdin_text() if args.prompt == "-" else args.prompt
    except OSError as exc:
        print(f"llm-gateway complete: cannot read -: {exc.strerror}", file=sys.stderr)
        return 1
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.reasoning_effort is not None:
        params["reasoning_effort"] = args.reasoning_effort
    labels = dict(args.label)
    request = build_request(
        prompt,
        model=args.model,
        system=args.system,
        labels=labels,
        cache=args.cache,
        cache_ttl_s=args.cache_ttl_s,
        **params,
    )
    started = time.monotonic()
    has_written = False
    reasoning = ReasoningOnStderr.on(sys.stderr)
    async with GatewayClient(args.address, **connection(args), timeout_s=args.timeout) as client:
        try:
            if args.stream:
                stream = client.stream(
                    request, on_reasoning=reasoning.write if args.show_reasoning else None
                )
                async for text in stream:
                    reasoning.close()
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    has_written = True
                reasoning.close()
                sys.stdout.write("\n")
                meta = stream.final
            else:
                answer = await client.complete(request)
                if args.show_reasoning:
                    reasoning.write(answer.reasoning)
                    reasoning.close()
                print(answer.content)
                meta = answer.metadata
        except grpc.aio.AioRpcError as error:
            reasoning.close()
            if has_written:
                # End the cut answer's line, as a whole one's: on a terminal the status
                # ran on from its last word ("a bUNAVAILABLE: ...").
                print(flush=True)
            print(error_details(error).describe(), file=sys.stderr)
            return 1
    if meta is not None:
        elapsed_s = time.monotonic() - started
        line = usage_line(meta, elapsed_s, shows_reasoning=args.show_reasoning)
        print(line, file=sys.stderr)
    return 0
