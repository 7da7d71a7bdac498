"""Startup of the gateway's caller security: the listen policy and the caller gate.

Refuses a listen host this machine cannot listen on, and to serve without caller
authentication on an address other machines can reach (unless forced), and assembles
the `CallerGate` from the config: key stores (config, keys file, Redis) and tenant
limits (in memory, or Redis shared by replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from service.auth import (
    Authenticator,
    FileKeyStore,
    KeyStore,
    RedisKeyStore,
    local_key_stores,
    redis_connection_options,
    serves_anonymous_callers,
)
from service.caller_gate import CallerGate
from service.config import ConfigError, GatewayConfig, host_and_port
from service.hosts import listen_host_problem
from service.lean_redis import LeanRedis
from service.redis_errors import replacing_closed_connections
from service.store_cooldown import StoreCooldown
from service.tenant_limits import MemoryTenantLimiter, RedisTenantLimiter, TenantLimiter

log = logging.getLogger("llm_gateway.security")


class InsecureListen(ConfigError):
    """The config would serve unauthenticated callers on a non-loopback address.

    A config error, so `serve` (and each worker) reports it in one line and exits 2.
    """


def is_caller_auth_on(config: GatewayConfig) -> bool:
    """Whether every call must prove who it is (bearer key or client certificate)."""
    tls = config.server.tls
    return config.auth.mode == "keys" or (tls.require_client_cert and tls.tenant_from_cert_subject)


def check_listen_hosts(config: GatewayConfig) -> None:
    """Raise the `ConfigError` a bind would end with for a host of `server.listen` or
    `server.health_listen` this machine cannot listen on (`listen_host_problem`): the
    config's fault, naming its key, where a taken port is the machine's. Before the
    listen policy, which would call `127.1` public and ask for caller auth."""
    for key, listen in (
        ("server.listen", config.server.listen),
        ("server.health_listen", config.server.health_listen),
    ):
        if listen is None:
            continue
        problem = listen_host_problem(host_and_port(listen)[0])
        if problem is not None:
            raise config.error(key, f"cannot listen on {listen}: {problem}")


def check_caller_security(config: GatewayConfig, *, log_warning: bool = True) -> None:
    """Raise `InsecureListen` when auth is off on a public address and that is not forced,
    and a `ConfigError` when `auth.mode: keys` has nowhere to find a key; log what
    `public_listen_warning` says (`log_warning=False`: `check` prints it in its words)."""
    _check_keys_have_a_source(config)
    forced = (
        config.auth.allow_auth_off_on_public_listen or config.server.allow_insecure_public_listen
    )
    if not (config.server.is_loopback or is_caller_auth_on(config) or forced):
        raise config.error(
            "server.listen",
            f"refusing to listen on {config.server.listen} with auth.mode: off (callers "
            "need no key); have callers prove who they are with auth.mode: keys "
            "(over server.tls), or with mTLS (server.tls.client_ca_file, "
            "require_client_cert: true and tenant_from_cert_subject: true), or set "
            "auth.allow_auth_off_on_public_listen: true to force it",
            kind=InsecureListen,
        )
    warning = public_listen_warning(config)
    if warning is not None and log_warning:
        log.warning(warning[0], extra={"listen": config.server.listen})


def public_listen_warning(config: GatewayConfig) -> tuple[str, str] | None:
    """The event and sentence of what a start is warned of on a non-loopback address
    the listen policy lets it serve: keys without TLS (fine behind a proxy or mesh that
    terminates TLS; otherwise keys cross the network in clear text), or auth off forced."""
    if config.server.is_loopback:
        return None
    listen = config.server.listen
    if not is_caller_auth_on(config):
        return (
            "security.auth_off_on_public_listen",
            f"server.listen {listen} serves every caller with no key (auth.mode: off, "
            "forced): anyone who reaches the port is served",
        )
    if config.server.tls.is_enabled:
        return None
    return (
        "security.keys_without_tls",
        f"server.listen {listen} takes caller keys without server.tls: they cross the "
        "network in clear text unless a proxy or mesh in front terminates TLS",
    )


def _check_keys_have_a_source(config: GatewayConfig) -> None:
    """`auth.mode: keys` with no key listed, no keys file, no Redis and no certificate
    tenants would refuse every call UNAUTHENTICATED: a config mistake, said at start."""
    auth, tls = config.auth, config.server.tls
    if auth.mode != "keys" or auth.keys or auth.keys_file or auth.redis_url:
        return
    if tls.tenant_from_cert_subject:
        return  # callers prove who they are by their certificates
    raise config.error(
        "auth.mode",
        "keys, but no key can be found: every call would be refused UNAUTHENTICATED; "
        "set auth.keys_file (and create keys with `llm-gateway keys create`), auth.keys "
        "or auth.redis_url, or name callers by their client certificates "
        "(server.tls.tenant_from_cert_subject: true, with client_ca_file)",
    )


def check_start_config(config: GatewayConfig) -> None:
    """Raise the `ConfigError` a start with `config` would end with: a listen host,
    the listen policy, or a keys file that cannot be read or parsed (`llm-gateway check`
    asks, and prints `public_listen_warning` itself)."""
    check_listen_hosts(config)
    check_caller_security(config, log_warning=False)
    _local_key_stores(config)


def _local_key_stores(config: GatewayConfig, *, serves_anonymous: bool = False) -> list[KeyStore]:
    try:
        return local_key_stores(config.auth, serves_anonymous=serves_anonymous)
    except (OSError, ValueError) as exc:
        raise config.error("auth.keys_file", str(exc)) from None


def _redis_client(config: GatewayConfig) -> Any:
    import redis.asyncio

    options = redis_connection_options(config.auth, os.environ)
    return redis.asyncio.Redis.from_url(
        config.auth.redis_url or "", **options, **replacing_closed_connections()
    )


@dataclass(frozen=True, slots=True)
class AuthRedis:
    """The Redis of `auth.redis_url`: its client, the lean client beside it for the
    per-call scripts, and their one cool-down."""

    client: Any
    lean: LeanRedis
    cooldown: StoreCooldown


def open_auth_redis(config: GatewayConfig, stack: contextlib.AsyncExitStack) -> AuthRedis | None:
    """The clients of `auth.redis_url` (None without it), closed by `stack`."""
    if not config.auth.redis_url:
        return None
    client = _redis_client(config)
    stack.push_async_callback(client.aclose)
    lean = LeanRedis.beside(client)
    stack.push_async_callback(lean.aclose)
    # One cool-down for the one client: a Redis that does not answer the key lookup will
    # not answer the tenant limits (or the upstreams' shared rates) either.
    return AuthRedis(client, lean, StoreCooldown("auth"))


async def build_caller_gate(
    config: GatewayConfig, stack: contextlib.AsyncExitStack, redis: AuthRedis | None
) -> CallerGate:
    """The gate for `config`, its keys and tenant limits in `redis` (`open_auth_redis`:
    the clients of `auth.redis_url`, None without it); what it opens is closed by `stack`."""
    auth = config.auth
    tls = config.server.tls
    serves_anonymous = serves_anonymous_callers(
        auth,
        tenant_from_cert_subject=tls.tenant_from_cert_subject,
        requires_client_cert=tls.require_client_cert,
    )
    stores = _local_key_stores(config, serves_anonymous=serves_anonymous)
    for store in stores:
        if isinstance(store, FileKeyStore):
            watching = asyncio.get_running_loop().create_task(store.watch(), name="keys-file")
            stack.push_async_callback(_cancelled, watching)
    limiter: TenantLimiter = MemoryTenantLimiter()
    if redis is not None:
        stores.append(
            RedisKeyStore(
                redis.client,
                prefix=auth.redis_key_prefix,
                cooldown=redis.cooldown,
                warns_of_default_tenant=serves_anonymous,
            )
        )
        redis_limiter = RedisTenantLimiter(
            redis.client, prefix=auth.redis_key_prefix, cooldown=redis.cooldown, commands=redis.lean
        )
        stack.push_async_callback(redis_limiter.aclose)  # unwound before client.aclose
        limiter = redis_limiter
    authenticator = Authenticator(
        auth,
        config.tenants,
        stores,
        tenant_from_cert_subject=tls.tenant_from_cert_subject,
        requires_client_cert=tls.require_client_cert,
    )
    stack.push_async_callback(authenticator.aclose)
    return CallerGate(
        authenticator, limiter, batch_leave_share=config.batch.rate_left_to_other_calls
    )


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
