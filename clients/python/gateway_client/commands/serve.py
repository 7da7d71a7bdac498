"""`llm-gateway serve`: run the gateway (the same as `python -m service serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from service.command_line import add_serve_arguments


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the gateway")
    add_serve_arguments(parser)
    parser.set_defaults(handler=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway serve`: the gateway's modules are imported here, not as the CLI
    registers its commands, which every `complete` and `models` run would pay for."""
    from service.main import serve_command as run_serve

    return run_serve(args)
