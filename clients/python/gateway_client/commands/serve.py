"""`llm-gateway serve`: run the gateway (the same as `python -m service serve`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    from service.main import add_serve_arguments, serve_command

    parser: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the gateway")
    add_serve_arguments(parser)
    parser.set_defaults(handler=serve_command)
