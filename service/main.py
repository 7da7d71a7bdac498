"""Command line of the server: `serve --config PATH [--listen HOST:PORT]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from service import early_signals
from service.config import ConfigError, GatewayConfig, load_config
from service.logs import configure_logging
from service.workers import worker_count

DEFAULT_CONFIG = "config/gateway.yaml"


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
        default=os.environ.get("LLM_GATEWAY_CONFIG", DEFAULT_CONFIG),
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
        type=log_level,
        default=os.environ.get("LLM_GATEWAY_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: $LLM_GATEWAY_LOG_LEVEL or INFO)",
    )


def with_flags(
    config: GatewayConfig, *, listen: str | None = None, workers: int | None = None
) -> GatewayConfig:
    """`config` with `--listen` and `--workers` in place of its own.

    Raises:
        ValueError: a value the config file would be refused for.
    """
    server = config.server  # replace() validates like the file does
    if listen is not None:  # "" too (a script's unset variable): refused, not ignored
        server = dataclasses.replace(server, listen=listen)
        # The flag, not LLM_GATEWAY__SERVER__LISTEN, set it: errors must not name that.
        overrides = {k: v for k, v in config.overrides.items() if k != "server.listen"}
        config = dataclasses.replace(config, overrides=overrides)
    if workers is not None:
        server = dataclasses.replace(server, workers=workers)
    return dataclasses.replace(config, server=server)


def serve_command(args: argparse.Namespace) -> int:
    """Load the config and run the server; a config error exits 2 with file and key."""
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llm-gateway: config error: {exc}", file=sys.stderr)
        return 2
    try:
        config = with_flags(config, listen=args.listen, workers=args.workers)
    except ValueError as exc:
        print(f"llm-gateway: config error: --listen/--workers: {exc}", file=sys.stderr)
        return 2
    server = config.server
    count, why = worker_count(config)
    logging.getLogger("llm_gateway.workers").info(
        "server.workers", extra={"workers": count, "why": why}
    )
    config = dataclasses.replace(config, server=dataclasses.replace(server, workers=count))
    from service.local_model import LocalModelUnavailable
    from service.server import ListenError, report_start_failure, run

    try:
        if count > 1:
            from service.workers import run_workers

            return run_workers(config, count=count, log_level=args.log_level)
        run(config)
    # Found only at start: a malformed auth.keys_file, a taken port, llama.cpp failing.
    except (ConfigError, ListenError, LocalModelUnavailable) as exc:
        return report_start_failure(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m service serve ...`."""
    parser = argparse.ArgumentParser(prog="python -m service")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run the gateway"))
    keys = commands.add_parser("keys", help="issue caller keys: keys create --tenant T")
    keys.add_argument("keys_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "keys":
        early_signals.release()  # held for `serve` alone
        from service.keys_cli import keys_command

        return keys_command(args.keys_args)
    return serve_command(args)
