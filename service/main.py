"""Command line of the server: `serve --config PATH [--listen HOST:PORT]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from service import early_signals
from service.command_line import add_serve_arguments, null_closed_descriptors, null_closed_stderr
from service.config import COMMAND_LINE, ConfigError, GatewayConfig, load_config
from service.logs import SUPERVISOR, configure_logging


def with_flags(
    config: GatewayConfig, *, listen: str | None = None, workers: int | None = None
) -> GatewayConfig:
    """`config` with `--listen` and `--workers` in place of its own; a later error in
    either key names the flag, not the file or a variable.

    Raises:
        ConfigError: a value the config file would be refused for, naming the flag.
    """
    if listen is not None:  # "" too (a script's unset variable): refused, not ignored
        config = _with_flag(config, "--listen", "listen", listen)
    if workers is not None:
        config = _with_flag(config, "--workers", "workers", workers)
    return config


def _with_flag(config: GatewayConfig, flag: str, name: str, value: Any) -> GatewayConfig:
    """`config` with the flag `flag`'s `value` as `server.<name>`."""
    try:
        server = dataclasses.replace(config.server, **{name: value})  # validated as in a file
    except ValueError as exc:
        raise ConfigError(COMMAND_LINE, flag, str(exc)) from None
    key = f"server.{name}"
    # The flag, not an LLM_GATEWAY__SERVER__... variable, set it: errors must not name that.
    overrides = {k: v for k, v in config.overrides.items() if k != key}
    return dataclasses.replace(
        config, server=server, overrides=overrides, flags={**config.flags, key: flag}
    )


def serve_command(args: argparse.Namespace) -> int:
    """Load the config and run the server; a config error exits 2 with file and key."""
    null_closed_descriptors()
    configure_logging(args.log_level)
    try:
        config = with_flags(load_config(args.config), listen=args.listen, workers=args.workers)
    except ConfigError as exc:
        print(f"llm-gateway: config error: {exc}", file=sys.stderr)
        return 2
    # Only now: a config error is told without loading the workers' supervisor, the local
    # model and telemetry (a third of a second's CPU).
    from service.workers import worker_count

    server = config.server
    count, why = worker_count(config)
    if count > 1:  # this process supervises the workers, whose lines name their index
        configure_logging(args.log_level, writer=SUPERVISOR)
    _log_worker_count(config, count, why)
    _warn_of_unknown_context(config)
    _warn_of_writable_keys_file(config)
    config = dataclasses.replace(config, server=dataclasses.replace(server, workers=count))
    from service.hosts import ListenError
    from service.local_model import LocalModelUnavailable, refuse_a_bad_model_file
    from service.server import report_start_failure, run

    try:
        if config.wants_local_model:  # at once, not once llama.cpp failed on it
            refuse_a_bad_model_file(config)
        if count > 1:
            from service.workers import run_workers

            return run_workers(config, count=count, log_level=args.log_level)
        run(config)
    # Found only at start: a malformed auth.keys_file or model file, a taken port, llama.cpp
    # failing.
    except (ConfigError, ListenError, LocalModelUnavailable) as exc:
        return report_start_failure(exc)
    return 0


def _log_worker_count(config: GatewayConfig, count: int, why: str) -> None:
    """`server.workers` says how many processes serve and why; `workers.state_per_worker`
    (a warning, once, from the supervisor) what several would each keep apart that must
    agree across them. Only a count the operator set runs several then (`worker_count`):
    each worker would let a tenant spend its whole budget, and through its whole rate."""
    from service.workers import state_kept_per_worker

    log = logging.getLogger("llm_gateway.workers")
    log.info("server.workers", extra={"workers": count, "why": why})
    kept_apart = state_kept_per_worker(config) if count > 1 else []
    if kept_apart:
        state = "; ".join(kept_apart)
        log.warning("workers.state_per_worker", extra={"workers": count, "state": state})


def _warn_of_unknown_context(config: GatewayConfig) -> None:
    """`telemetry.unknown_context` (a warning, once, from the supervisor) for an
    `OTEL_PYTHON_CONTEXT` no installed package provides, which OpenTelemetry replaced by
    its default, with its traceback hidden (`service.otel_context`)."""
    from service.otel_context import CONTEXT, DEFAULT_CONTEXT
    from service.telemetry.setup import unknown_runtime_context

    name = unknown_runtime_context(config.telemetry, os.environ)
    if name is not None:
        logging.getLogger("llm_gateway.telemetry").warning(
            "telemetry.unknown_context",
            extra={"variable": CONTEXT, "context": name, "used": DEFAULT_CONTEXT},
        )


def _warn_of_writable_keys_file(config: GatewayConfig) -> None:
    """`auth.keys_file_writable` (a warning, once, from the supervisor) for a keys file
    its group or every user may write: any of them can add a key, for any tenant."""
    from service.auth import keys_file_writable_warning

    if config.auth.keys_file:
        problem = keys_file_writable_warning(Path(config.auth.keys_file).expanduser())
        if problem is not None:
            logging.getLogger("llm_gateway.auth").warning(
                "auth.keys_file_writable", extra={"problem": problem}
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m service serve ...`."""
    null_closed_stderr()
    parser = argparse.ArgumentParser(prog="python -m service")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run the gateway"))
    keys = commands.add_parser("keys", help="issue caller keys: keys create --tenant T")
    keys.add_argument(
        "keys_args",
        nargs=argparse.REMAINDER,
        metavar="create --tenant T [--config PATH]",
        help="issue a new caller key for tenant T ('python -m service keys create --help')",
    )
    args = parser.parse_args(argv)
    if args.command == "keys":
        return _keys(args.keys_args)
    return serve_command(args)


def _keys(argv: list[str]) -> int:
    """`python -m service keys ARGV`; status 130 on a Ctrl-C, as it starts too (held until
    now, then raised) or as its modules are imported: no traceback."""
    try:
        early_signals.release()  # held for `serve` alone
        from service.keys_cli import keys_command

        return keys_command(argv)
    except KeyboardInterrupt:
        return 130
