"""`llm-gateway keys create --tenant T`: issue a caller key (as `python -m service keys`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `keys` subcommand: its own arguments are `service.keys_cli`'s."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keys", help="issue caller keys: keys create --tenant T"
    )
    # What `keys --help` says (argparse passes no leading --help on to keys_cli's parser).
    parser.add_argument(
        "keys_args",
        nargs=argparse.REMAINDER,
        metavar="create --tenant T [--config PATH]",
        help="issue a new caller key for tenant T ('llm-gateway keys create --help')",
    )
    parser.set_defaults(handler=keys_command)


def keys_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway keys ...`."""
    from service.keys_cli import keys_command as run_keys

    return run_keys(args.keys_args, prog="llm-gateway keys")
