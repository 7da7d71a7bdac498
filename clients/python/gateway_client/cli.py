"""`llm-gateway`: run the gateway, or call it from a shell.

Each subcommand lives in `gateway_client/commands/` and registers itself with
`register(subparsers)`; its handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from gateway_client.client import authorization_metadata
from gateway_client.commands import batch, check, complete, models, serve, summarize, usage

SUBCOMMANDS = [serve, complete, models, batch, summarize, check, usage]


INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)


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


def caller_key(value: str) -> str:
    """--api-key: a key gRPC can send, checked before any call."""
    try:
        authorization_metadata(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--address and --api-key, shared by every command that calls the gateway."""
    parser.add_argument(
        "--address",
        default=os.environ.get("LLM_GATEWAY_ADDRESS", "127.0.0.1:50051"),
        help="gateway HOST:PORT (default: $LLM_GATEWAY_ADDRESS or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLM_GATEWAY_API_KEY"),
        type=caller_key,
        help="caller key (default: $LLM_GATEWAY_API_KEY)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script."""
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    args = parser.parse_args(argv)
    result = args.handler(args)
    if asyncio.iscoroutine(result):
        try:
            result = asyncio.run(result)
        except KeyboardInterrupt:
            return 130
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
