"""`llm-gateway complete "prompt"`: print an answer; usage, cost and latency on stderr."""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

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
from llmgateway.v1 import gateway_pb2 as pb


def register(subparsers: Any) -> None:
    """Add the `complete` subcommand."""
    from gateway_client.cli import INT32, UINT32, int_in, timeout_seconds

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
    parser.add_argument("--max-tokens", type=int_in(INT32), help="upper bound on generated tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    parser.add_argument(
        "--reasoning-effort",
        choices=REASONING_EFFORTS,
        help="how much a reasoning model thinks (default: the upstream's)",
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
    """Standard input as text, bytes that are not UTF-8 replaced (as a file argument is
    read): strict decoding would end the command with a traceback. A byte order mark
    opening it is no text, as in a file argument.

    Raises:
        OSError: standard input is closed (`<&-`), or cannot be read.
    """
    source = stdin_bytes()
    with ctrl_c_interrupts():
        data = source.read()
    return data.decode("utf-8-sig", errors="replace")


def usage_line(meta: pb.CompletionMetadata, elapsed_s: float) -> str:
    """One line of usage, cost and latency for stderr."""
    usage = meta.usage
    estimated = " (estimated)" if usage.estimated else ""
    cached = " cache hit" if meta.cache_hit else ""
    return (
        f"[{meta.model or '?'} via {meta.upstream or '?'}{cached}] "
        f"tokens in={usage.input_tokens} out={usage.output_tokens}{estimated} "
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
    async with GatewayClient(args.address, **connection(args), timeout_s=args.timeout) as client:
        try:
            if args.stream:
                stream = client.stream(request)
                async for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    has_written = True
                sys.stdout.write("\n")
                meta = stream.final
            else:
                answer = await client.complete(request)
                print(answer.content)
                meta = answer.metadata
        except grpc.aio.AioRpcError as error:
            if has_written:
                # End the cut answer's line, as a whole one's: on a terminal the status
                # ran on from its last word ("a bUNAVAILABLE: ...").
                print(flush=True)
            print(error_details(error).describe(), file=sys.stderr)
            return 1
    if meta is not None:
        print(usage_line(meta, time.monotonic() - started), file=sys.stderr)
    return 0
