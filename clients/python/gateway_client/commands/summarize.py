"""`llm-gateway summarize FILE`: summarise a document of any length."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

from gateway_client.client import REASONING_EFFORTS, GatewayClient
from gateway_client.commands.complete import stdin_text
from gateway_client.connection import (
    DEFAULT_MODEL,
    add_connection_arguments,
    connection,
    text_argument,
)
from gateway_client.errors import error_details
from gateway_client.text_input import file_text
from llmgateway.v1 import gateway_pb2 as pb
from service.command_line import file_path


def register(subparsers: Any) -> None:
    """Add the `summarize` subcommand."""
    from gateway_client.cli import UINT32, int_in, timeout_seconds

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "summarize", help="summarise a document longer than the context window"
    )
    parser.add_argument(
        "file", type=file_path, help="text file to summarise ('-' reads standard input)"
    )
    parser.add_argument(
        "--model",
        type=text_argument,
        default=DEFAULT_MODEL,
        help="model name (default: %(default)s)",
    )
    parser.add_argument(
        "--target-tokens",
        type=int_in(UINT32),
        default=0,
        help="summary length (default: the gateway's)",
    )
    parser.add_argument(
        "--instructions", type=text_argument, default="", help="tone, focus or language"
    )
    parser.add_argument(
        "--reasoning-effort",
        choices=REASONING_EFFORTS,
        help="how much a reasoning model thinks in each call (default: the upstream's)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=600.0,
        help="seconds to wait (default: %(default)s)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(handler=summarize_command)


async def summarize_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway summarize`."""
    try:
        document = (
            stdin_text()
            if args.file == "-"
            else await asyncio.to_thread(file_text, Path(args.file))
        )
    except OSError as exc:
        print(f"llm-gateway summarize: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    async with GatewayClient(args.address, **connection(args), timeout_s=args.timeout) as client:
        try:
            response = await client.summarize(
                document,
                model=args.model,
                target_tokens=args.target_tokens,
                instructions=args.instructions,
                reasoning_effort=args.reasoning_effort,
            )
        except grpc.aio.AioRpcError as error:
            print(error_details(error).describe(), file=sys.stderr)
            return 1
    print(response.summary)
    usage = response.usage
    print(
        f"[{args.model}] chunks={response.chunks} levels={response.levels} "
        f"calls={response.upstream_calls} tokens in={usage.input_tokens} "
        f"out={usage.output_tokens} cost=${response.cost_usd:.6f} "
        f"queued={response.timings.queued_ms:.0f}ms total={response.timings.total_ms:.0f}ms",
        file=sys.stderr,
    )
    if warning := cut_warning(response):
        print(f"llm-gateway summarize: warning: {warning}", file=sys.stderr)
    return 0


def cut_warning(response: pb.SummarizeResponse) -> str | None:
    """What a length limit cut off the summary, in one line (None: nothing).

    The gateway answers such a summary OK, its text still useful; a script reading stdout
    would not know that it may end mid-sentence, or miss a part's end.
    """
    parts = response.parts_cut
    were = f"{parts} part summar{'y was' if parts == 1 else 'ies were'} cut off"
    if response.finish_reason == pb.FINISH_REASON_LENGTH:
        cut = "the summary was cut off by its length limit (finish LENGTH)"
        if parts:
            cut += f", and {were} before combining"
    elif parts:
        cut = f"{were} by the length limit before combining"
    else:
        return None
    return f"{cut}; raise --target-tokens for a whole summary"
