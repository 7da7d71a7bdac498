"""`llm-gateway check`'s work: what it checks and its exit statuses are said in
`check_options`, which registers the command (its docstring is `check --help`) without
importing this module and the gateway modules it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway_client.commands import check_options
from service.auth import keys_file_writable_warning
from service.config import ConfigError, GatewayConfig, UpstreamConfig, load_config
from service.errors import UpstreamError
from service.hosts import ListenError
from service.local_model import refuse_a_bad_model_file, start_problem
from service.main import with_flags
from service.otel_context import CONTEXT, DEFAULT_CONTEXT
from service.redis_access import RedisNoAnswer, check_redis_access
from service.security import check_start_config, public_listen_warning
from service.server import NO_UPSTREAM_FIX, TLS_REFUSED, refuse_taken, refuses_tls
from service.telemetry import TelemetrySetupError
from service.telemetry.setup import (
    MetricsHostError,
    check_environment,
    check_prometheus_host,
    prometheus_endpoint_port,
    unknown_runtime_context,
)
from service.upstream.client import probe_models
from service.upstream.http import HttpError, ProxyRefused
from service.upstream.proxy import choose_proxy
from service.workers import state_kept_per_worker, worker_configs, worker_count

# Where this module is imported anyway (tests, a program running `check_command`).
register = check_options.register


@dataclass(frozen=True, slots=True)
class UpstreamCheck:
    """What probing one upstream found."""

    upstream: str
    is_reachable: bool
    key: str  # "valid", "invalid", "none needed", "unknown", "not set ($VAR)"
    models: str
    latency_ms: float | None
    problem: str = ""

    @property
    def is_ok(self) -> bool:
        """Whether calls to this upstream can work (skipped upstreams are ok)."""
        return self.problem == ""


async def check_upstream(config: UpstreamConfig, *, timeout_s: float) -> UpstreamCheck:
    """Probe one upstream's `/models` with its key."""
    started = time.monotonic()
    try:
        status, listed = await probe_models(config, timeout_s=timeout_s)
    except UpstreamError as exc:
        return UpstreamCheck(config.name, False, "unknown", "-", None, _problem(exc))
    latency_ms = (time.monotonic() - started) * 1000
    if status in (401, 403):
        return UpstreamCheck(
            config.name, True, "invalid", "-", latency_ms, f"key rejected (HTTP {status})"
        )
    if status == 402:
        return UpstreamCheck(
            config.name, True, "unknown", "-", latency_ms, "account out of credit (HTTP 402)"
        )
    if status in (404, 405):  # a server without the list: it answered, nothing is wrong
        return UpstreamCheck(config.name, True, "unknown", f"no list (HTTP {status})", latency_ms)
    if status != 200:
        return UpstreamCheck(config.name, True, "unknown", "-", latency_ms, f"HTTP {status}")
    key = "valid" if config.api_key else "none needed"
    missing = sorted(set(config.models.values()) - set(listed))
    models = str(len(listed)) + (f" (not listed: {', '.join(missing)})" if missing else "")
    return UpstreamCheck(config.name, True, key, models, latency_ms)


def _problem(exc: UpstreamError) -> str:
    """`exc`'s message and, for a connection that failed below HTTP, what failed there.

    A caller is told only that the upstream could not be reached or dropped the
    connection; the operator running `check` needs to tell a certificate not trusted from
    a name that does not resolve, a port that refuses or a server that does not speak
    HTTP/1.1. Those texts (the connect's, the TLS library's, llhttp's, a proxy's address)
    hold no key. A proxy's refusal is said already, with its status.
    """
    cause = exc.__cause__
    if isinstance(cause, HttpError) and not isinstance(cause, ProxyRefused):
        return f"{exc.message}: {cause}"
    return exc.message


async def check_all(config: GatewayConfig, *, timeout_s: float) -> list[UpstreamCheck]:
    """Probe every enabled upstream at once; list the disabled ones as skipped."""
    enabled = config.enabled_upstreams
    probed = await asyncio.gather(*(check_upstream(u, timeout_s=timeout_s) for u in enabled))
    by_name = {check.upstream: check for check in probed}
    return [
        by_name.get(u.name)
        or UpstreamCheck(u.name, False, f"not set (${u.api_key_env})", "-", None)
        for u in config.upstreams
    ]


def _check_prometheus_host(config: GatewayConfig) -> None:
    """The config error a start would end with for `telemetry.prometheus_host`, should
    the start open the endpoint."""
    port = prometheus_endpoint_port(config.telemetry, os.environ)
    if port is None:
        return
    try:
        check_prometheus_host(config.telemetry, port)
    except MetricsHostError as exc:
        raise config.error("telemetry.prometheus_host", str(exc)) from None


def _warn_of_state_per_worker(config: GatewayConfig, workers: int) -> None:
    """Say on stderr what `workers` processes (more than one) would each keep apart, as
    `serve` warns `workers.state_per_worker`: not an error, a count the operator chose."""
    kept_apart = state_kept_per_worker(config) if workers > 1 else []
    if kept_apart:
        print(
            f"warning: {workers} workers keep state per worker: {'; '.join(kept_apart)}",
            file=sys.stderr,
        )


def _warn_of_public_listen(config: GatewayConfig) -> None:
    """Say on stderr what `serve` warns of its listen address (keys without TLS, auth off
    forced on a public address), in words, not the bare event name a log line without a
    handler left on stderr."""
    warning = public_listen_warning(config)
    if warning is not None:
        print(f"warning: {warning[1]} ({warning[0]})", file=sys.stderr)


def _warn_of_taken_ports(config: GatewayConfig) -> None:
    """Say on stderr which of the addresses `serve` listens on another process holds now,
    where it would exit 1: a warning only, as `check` may well run beside the gateway
    itself (a pod's shell)."""
    for key, listen in (
        ("server.listen", config.server.listen),
        ("server.health_listen", config.server.health_listen),
    ):
        try:
            refuse_taken(listen)
        except ListenError:
            print(
                f"warning: {key} {listen} is in use now: serve would exit 1 until it is "
                "free (a gateway already running there?)",
                file=sys.stderr,
            )


def _warn_of_unknown_context(config: GatewayConfig) -> None:
    """Say on stderr that OpenTelemetry uses its default runtime context for an
    `OTEL_PYTHON_CONTEXT` no installed package provides, as `serve` warns
    `telemetry.unknown_context`: not an error, the SDK's own fallback."""
    name = unknown_runtime_context(config.telemetry, os.environ)
    if name is not None:
        print(
            f"warning: {CONTEXT}: no installed package provides the runtime context "
            f"{name!r}: OpenTelemetry uses {DEFAULT_CONTEXT}",
            file=sys.stderr,
        )


def _warn_of_writable_keys_file(config: GatewayConfig) -> None:
    """Say on stderr that the keys file's group or every user may write it, as `serve`
    warns `auth.keys_file_writable`: any of them can add a key, for any tenant."""
    if config.auth.keys_file:
        problem = keys_file_writable_warning(Path(config.auth.keys_file).expanduser())
        if problem is not None:
            print(f"warning: {problem} (auth.keys_file_writable)", file=sys.stderr)


def _warn_of_no_answer(no_answers: list[RedisNoAnswer]) -> None:
    """Say on stderr which Redis gave no answer, as `serve` warns
    `redis.no_answer_at_start`: a warning, not a failure, as Redis may come up later and
    the gateway runs through an outage."""
    for no_answer in no_answers:
        print(f"warning: {no_answer.warning()}", file=sys.stderr)


def format_checks(checks: list[UpstreamCheck]) -> str:
    """The checks as an aligned text table."""
    rows = [("UPSTREAM", "REACHABLE", "KEY", "MODELS", "LATENCY", "PROBLEM")]
    for check in checks:
        skipped = check.key.startswith("not set")
        rows.append(
            (
                check.upstream,
                "skipped" if skipped else ("yes" if check.is_reachable else "no"),
                check.key,
                check.models,
                "-" if check.latency_ms is None else f"{check.latency_ms:.0f}ms",
                check.problem,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def check_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway check`."""
    try:
        config = load_config(args.config)
        config = with_flags(config, workers=args.workers)
        check_start_config(config)  # what `serve` would refuse only once it starts
        workers, _ = worker_count(config)
        worker_configs(config, workers)  # each one's Prometheus port
        try:
            check_environment(config.telemetry, os.environ)
        except TelemetrySetupError as exc:
            raise ConfigError("environment", exc.variable, exc.problem) from None
        _check_prometheus_host(config)
        for upstream in config.enabled_upstreams:  # an HTTPS_PROXY serve would refuse
            choose_proxy(upstream, os.environ)
        if config.server.tls.is_enabled and await refuses_tls(config.server):
            raise config.error("server.tls.cert_file", TLS_REFUSED)
        no_answers = await check_redis_access(config)
        if config.wants_local_model:
            refuse_a_bad_model_file(config)
    except ConfigError as exc:
        print(f"llm-gateway: config error: {exc}", file=sys.stderr)
        return 2
    print(f"config {config.source}: ok")
    _warn_of_public_listen(config)
    _warn_of_state_per_worker(config, workers)
    _warn_of_taken_ports(config)
    _warn_of_unknown_context(config)
    _warn_of_writable_keys_file(config)
    _warn_of_no_answer(no_answers)
    # What `serve` would exit 1 on, where this said the local model would serve.
    problem = start_problem(config.local_model) if config.wants_local_model else None
    if problem is not None:
        print(f"local model: {problem}", file=sys.stderr)
        return 1
    if not config.enabled_upstreams and not config.wants_local_model:
        # As `serve` warns `gateway.no_upstream`: it starts so (keys may come with the next
        # rollout), but answers every call NOT_FOUND.
        print(f"warning: {NO_UPSTREAM_FIX}", file=sys.stderr)
    if not config.upstreams:
        local = ": the gateway will serve the local model" if config.wants_local_model else ""
        print(f"no upstreams configured{local}")
        return 0
    checks = await check_all(config, timeout_s=args.timeout)
    print(format_checks(checks))
    if not config.enabled_upstreams and config.local_model.enabled != "never":
        print("no provider key set: the gateway will serve the local model")
    failures = [c for c in checks if not c.is_ok]
    if failures:
        print(f"{len(failures)} upstream(s) failed the check", file=sys.stderr)
        return 1
    return 0
