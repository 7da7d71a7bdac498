"""`llm-gateway check`: validate the config and every upstream's key, all at once.

First the config errors `serve` would find only as it starts (a listen host this
machine cannot listen on, the listen policy, the keys file, the `OTEL_*` exporters and
their OTLP timeout and compression, a TLS pair grpc cannot serve, the workers'
Prometheus ports past 65535, a Redis refusing the credentials, a local model file that
is no GGUF llama.cpp could load). Then calls
`GET {base_url}/models` on each enabled upstream (concurrently) and prints a table:
upstream, reachable, key valid, models listed, latency. Exits 2 on a config error, 1
when any enabled upstream is unreachable, refuses its key or account, or answers with
another error, or when the gateway would serve the local model and it is not installed
or its model file lacks the `chat_template.NAME` asked for, else 0: a server that has no
`/models` (404, 405) passes, its key unknown. Upstreams whose key variable is unset are
listed as skipped. Keys are never printed. Several workers (`--workers N`,
`server.workers`) that would each keep state in memory that must agree across them are
warned of, as `serve` warns, and so is a keys file its group or every user may write,
and a Redis that gives no answer (down, unreachable, hung past 1 s): an outage the
gateway starts and runs through, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from service.command_line import default_config, file_path

# Registered apart from `commands.check`, which imports much of the gateway (config, Redis,
# telemetry, the upstream client, the local model): `complete` and `models` would pay that
# import, most of their start, for a command they do not run.


def register(subparsers: Any) -> None:
    """Add the `check` subcommand."""
    from gateway_client.cli import timeout_seconds  # cli imports this module

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check", help="validate the config and every upstream's key", description=__doc__
    )
    parser.add_argument(
        "--config",
        type=file_path,
        default=default_config(),
        help="YAML config file (default: $LLM_GATEWAY_CONFIG or config/gateway.yaml)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="the worker processes `serve --workers N` would run (default: as serve decides)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=10.0,
        help="seconds per upstream (default: %(default)s)",
    )
    parser.set_defaults(handler=check_command)


async def check_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway check`, its modules imported in the command's event loop: a
    Ctrl-C during the import is status 130 and no traceback, as when it was held."""
    from gateway_client.commands import check

    await asyncio.sleep(0)  # a Ctrl-C during the import ends the command here, before any check
    return await check.check_command(args)
