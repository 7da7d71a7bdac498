"""Assembling and running the gRPC server: upstreams, pipeline, servicer, health."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from llmgateway.v1 import gateway_pb2
from service import early_signals
from service.announce import announce
from service.cache import CacheStore, ResponseCache
from service.config import (
    ConfigError,
    GatewayConfig,
    ServerConfig,
    TlsConfig,
    UpstreamConfig,
    host_and_port,
)
from service.errors import ServiceUnknown
from service.hosts import ListenError, bind_failure
from service.ledger import RedisLedger, WallClock, open_ledger
from service.local_model import UPSTREAM_NAME as LOCAL_UPSTREAM
from service.local_model import LocalModelServer, LocalModelState, LocalModelUnavailable
from service.machine_turns import MachineTurns
from service.pipeline import Pipeline
from service.pool import UpstreamPool
from service.pricing import PriceList
from service.redis_access import check_redis_access, warn_of_no_answer
from service.rpc_boundary import (
    Admission,
    GenericOnly,
    StalledStreams,
    abort_with,
    add_service,
    guard_servicer,
    pending_call_options,
)
from service.security import (
    AuthRedis,
    build_caller_gate,
    check_caller_security,
    check_listen_hosts,
    open_auth_redis,
)
from service.servicer import CompletionServicer, is_last_message
from service.shared_limits import SharedLimits
from service.telemetry import Telemetry, TelemetrySetupError, activate
from service.telemetry.setup import (
    MetricsHostError,
    MetricsListenError,
    prometheus_endpoint_port,
    prometheus_port_problem,
)
from service.telemetry.subscribers import observe_cache, observe_store_writes, subscribe_pool
from service.tenant_limits import RedisTenantLimiter, TenantLimiter
from service.upstream.client import UpstreamClient
from service.upstream.relay import secrets_of

log = logging.getLogger("llm_gateway.server")

# How often a stopping server looks whether its last gateway call has finished.
_DRAIN_POLL_S = 0.02
# How long before the end of the shutdown grace the calls still running are cut off.
_CUT_OFF_MARGIN_S = 0.5
# Client keepalive pings taken on a connection sending nothing (a unary call waiting for
# its upstream, an idle channel, a quiet health Watch): grpc's own default is one per 5
# minutes, and the third ping sooner ends the connection, its calls included, with GOAWAY
# `too_many_pings`, so a client keeping alive every 10 s (gRPC-Go's and Java's shortest)
# lost any call that ran past about 40 s. Half a second: below grpc's own clients' floor of
# one a second, with room for a ping that arrives late and the next on time.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
]
# The most request metadata (headers) a call may carry, as gRPC counts it: each entry's
# name and value plus 32 bytes, the pseudo-headers included. gRPC's own soft limit is half
# its hard one, and between the two it refuses calls at random, RESOURCE_EXHAUSTED growing
# likelier with the size: a caller whose proxy adds 8 KiB of headers (a certificate chain,
# a large token, trace baggage) failed about one call in ten, and a retry policy hid it.
# The same limit for both: taken up to it, refused past it, every time.
MAX_METADATA_BYTES = 16 * 1024
_METADATA_OPTIONS = [
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
]
NO_UPSTREAM_FIX = (
    "no upstream serves any model: set an upstream's api_key_env variable, or "
    "local_model.enabled to auto or always"
)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["CompletionService"]
SERVICE_NAME = SERVICE.full_name
RPC_METHODS = [m.name for m in SERVICE.methods]
# The methods on grpc's registered-method path: the ones that carry the calls. Every
# method registered there costs every call accepted (`GenericOnly`), so the others, and
# the health and reflection services, are found through the generic handler.
REGISTERED_METHODS = ("Complete", "CompleteStream")
# The health service name that follows the local model's llama.cpp server alone.
LOCAL_MODEL_HEALTH = "llm_gateway.local_model"


class GatewayServer:
    """The whole gateway in one object; `async with GatewayServer(config) as server:`.

    Owns every resource it creates (upstream pools, the local model, the gRPC server)
    and closes them in reverse order.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        telemetry: Telemetry | None = None,
        wall_clock: WallClock = time.time,
        local_model_states: AsyncIterator[LocalModelState] | None = None,
        worker: int | None = None,
    ) -> None:
        """`wall_clock`: epoch time for the ledger and budgets (a test's, to cross a
        period's end). `local_model_states`: the local model another process runs (a
        `--workers` worker's supervisor), its state now and then each change; this server
        then runs none of its own. `worker`: its index among `--workers N`, which its
        telemetry's resource names."""
        self.config = config
        self.telemetry = telemetry
        self._worker = worker
        self._wall_clock = wall_clock
        self.port = 0
        self.health = EndableHealth()
        self.admission = Admission(
            max_in_flight=config.server.max_in_flight_calls,
            retry_after_s=config.server.overload_retry_after_s,
            max_queued=config.server.max_queued_calls,
        )
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0  # of `server.health_listen`, once bound
        self._is_health_started = False
        self.pipeline: Pipeline | None = None
        # Where the tenants' rate limits and concurrent calls are counted, once started.
        self.tenant_limiter: TenantLimiter | None = None
        self.local_model: LocalModelServer | None = None
        self._local_model_states = local_model_states
        # The local model's latest state (None: there is none), which its calls follow.
        self._local_model_state: LocalModelState | None = None
        # One change routed at a time: a retarget awaits, and a later state must win.
        self._local_model_routing = asyncio.Lock()
        self._only_local_model = False

    async def __aenter__(self) -> GatewayServer:
        try:
            await self.start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _upstream_configs(self) -> list[UpstreamConfig]:
        configs = list(self.config.enabled_upstreams)
        self._local_model_state = await self._start_local_model()
        if self._local_model_state is not None:
            self._only_local_model = not configs
            configs.append(self._local_model_state.upstream)
        for upstream in self.config.upstreams:
            if upstream not in configs and upstream.api_key_env:
                log.info(
                    "upstream.disabled",
                    extra={"upstream": upstream.name, "missing_env": upstream.api_key_env},
                )
            elif upstream.sends_key_in_clear:
                # Legitimate inside a cluster's own network, so said, not refused.
                log.warning("upstream.key_over_plain_http", extra={"upstream": upstream.name})
        if not configs:
            # It starts (its keys may come with the next rollout), but every call would be
            # NOT_FOUND: said at start, with what mends it.
            log.warning("gateway.no_upstream", extra={"fix": NO_UPSTREAM_FIX})
        return configs

    async def _start_local_model(self) -> LocalModelState | None:
        """The local model's state as this server starts: the one it runs, or the one its
        supervisor runs (the first of `local_model_states`); None without one."""
        if self._local_model_states is not None:
            return await anext(self._local_model_states, None)
        if not self.config.wants_local_model:
            return None
        self.local_model = await self._stack.enter_async_context(
            LocalModelServer(
                self.config.local_model,
                on_availability=self.follow_local_model,
                withheld_env=self.config.secret_variables,
            )
        )
        return self.local_model.state()

    def _local_model_turns(self) -> dict[str, MachineTurns]:
        """The turn the local model's calls take with the other workers of the machine,
        when its supervisor runs it for several (`service.machine_turns`)."""
        state = self._local_model_state
        if state is None or state.turns is None:
            return {}
        turns = MachineTurns(state.turns)
        self._stack.callback(turns.close)
        return {LOCAL_UPSTREAM: turns}

    async def start(self) -> None:
        """Build everything and start listening."""
        check_listen_hosts(self.config)  # before the policy, which would call 127.1 public
        check_caller_security(self.config)
        # Before the local model's minutes; a Redis with no answer is said, not refused.
        warn_of_no_answer(await check_redis_access(self.config))
        auth_redis = open_auth_redis(self.config, self._stack)
        gate = await build_caller_gate(self.config, self._stack, auth_redis)
        self.tenant_limiter = gate.limiter
        prices = PriceList(self.config.models)
        await self._start_telemetry(prices)
        ledger = open_ledger(self.config.ledger, wall_clock=self._wall_clock)
        self._stack.push_async_callback(ledger.aclose)
        if self.config.wants_local_model:  # its start can take minutes: say it first
            for listen in (self.config.server.listen, self.config.server.health_listen):
                refuse_taken(listen)
        upstreams = await self._upstream_configs()
        # A refusal one upstream relays shows no upstream's secret, its own or another's.
        secrets = [s for c in upstreams for s in secrets_of(c)]
        clients = [
            await self._stack.enter_async_context(UpstreamClient(c, redacted=secrets))
            for c in upstreams
        ]
        cache = await self._stack.enter_async_context(
            ResponseCache(
                self.config.cache,
                store=CacheStore(self.config.cache),
                default_mode=self.config.defaults.cache_mode,
            )
        )
        pool = UpstreamPool(
            clients,
            settings=self.config.resilience,
            shared_limits=self._shared_limits(auth_redis),
            machine_turns=self._local_model_turns(),
        )
        _warn_of_unpriced_models(pool, prices)
        assert self.telemetry is not None  # installed by _start_telemetry
        subscribe_pool(
            self.telemetry,
            pool.hooks,
            upstreams=[c.name for c in clients],
            upstream_models=[
                (c.name, model) for c in clients for model in pool.state(c.name).model_breakers
            ],
        )
        self._stack.callback(observe_cache(self.telemetry, cache.stats.as_dict))
        late_writes = {
            name: store.late_releases
            for name, store in (("ledger", ledger), ("tenant_limits", gate.limiter))
            if isinstance(store, RedisLedger | RedisTenantLimiter)
        }
        self._stack.callback(observe_store_writes(self.telemetry, late_writes))
        self.pipeline = Pipeline(
            self.config,
            pool,
            prices,
            ledger=ledger,
            wall_clock=self._wall_clock,
            cache=cache,
            on_answered=self.admission.answered,
        )
        if self._local_model_state is not None:  # it may have changed while the pool was built
            await self._route_local_model()
        self._follow_supervisors_local_model()
        servicer = CompletionServicer(self.pipeline)
        stalls = None
        if self.config.server.stalled_stream_timeout_s:
            stalls = StalledStreams(
                self.config.server.stalled_stream_timeout_s, is_last=is_last_message
            )
            self._stack.push_async_callback(stalls.aclose)
        # A gate that would admit everyone as the unlimited default tenant is skipped.
        guard_servicer(
            servicer,
            RPC_METHODS,
            self.admission,
            None if gate.checks_nothing else gate,
            check=servicer.check,
            stalls=stalls,
        )
        server = grpc.aio.server(
            options=[
                *pending_call_options(self.admission.max_in_flight, self.admission.max_queued),
                ("grpc.max_receive_message_length", self.config.server.max_receive_message_bytes),
                self._reuse_port_option,
                *_KEEPALIVE_OPTIONS,
                *_METADATA_OPTIONS,
                *caller_keepalive_options(self.config.server),
                *connection_age_options(self.config, upstreams),
            ],
        )
        try:
            await self._listen_on(server, servicer)
        except BaseException:
            await let_go_unstarted(server)
            raise
        await server.start()
        self._server = server
        await self._set_health()
        if self._health_server is not None:  # probes get an answer once there is one to give
            await self._health_server.start()
            self._is_health_started = True
        log.info(
            "server.started", extra={"port": self.port, "upstreams": [c.name for c in clients]}
        )

    async def _listen_on(self, server: grpc.aio.Server, servicer: CompletionServicer) -> None:
        """Add the services to `server` and bind its port (and the health port's server)."""
        add_service(server, servicer, SERVICE, registered=REGISTERED_METHODS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, GenericOnly(server))
        reflected = [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            EndableReflection(reflected, ended=self.health.ended), GenericOnly(server)
        )
        listen = self.config.server.listen
        # The health port first: a grpc server lets its port go only once started, and the
        # gateway's, bound before a failure here, would stay taken for the process's life.
        self._bind_health_server(self.config.server.health_listen)
        try:
            self.port = _bind(listen, lambda: _add_port(server, self.config.server))
        except ListenError:
            if self.config.server.tls.is_enabled and await refuses_tls(self.config.server):
                raise self.config.error("server.tls.cert_file", TLS_REFUSED) from None
            raise

    def _shared_limits(self, redis: AuthRedis | None) -> SharedLimits | None:
        """The shared rates of the upstreams with `shared_limits` (None: none has it);
        their reserves are given back as the server stops, before the client closes."""
        if redis is None or not any(u.shared_limits for u in self.config.upstreams):
            return None
        shared = SharedLimits(
            redis.lean, prefix=self.config.auth.redis_key_prefix, cooldown=redis.cooldown
        )
        self._stack.push_async_callback(shared.aclose)
        return shared

    @property
    def _reuse_port_option(self) -> tuple[str, int]:
        """Whether grpc lets other processes listen on this server's ports: the workers
        of `--workers N` share them."""
        return ("grpc.so_reuseport", 0 if self.config.server.workers in (None, 1) else 1)

    def _bind_health_server(self, listen: str | None) -> None:
        """A server bound to `listen` for the health service alone, in plaintext (stopped
        with the rest, its bind failed or not); none without `listen`."""
        if listen is None:
            return
        server = grpc.aio.server(
            options=[self._reuse_port_option, *_KEEPALIVE_OPTIONS, *_METADATA_OPTIONS]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._health_server = server
        self._stack.push_async_callback(self._stop_health_server)
        self.health_port = _bind(listen, lambda: int(server.add_insecure_port(listen)))

    async def _stop_health_server(self) -> None:
        if self._health_server is None:
            return
        if self._is_health_started:
            await self._health_server.stop(0)
        else:  # the start failed after making it
            await self.health.enter_graceful_shutdown()  # NOT_SERVING meanwhile
            await let_go_unstarted(self._health_server)
        self._health_server = None

    async def _set_health(self) -> None:
        """SERVING, unless the local model is down and it is the only upstream.

        `llm_gateway.local_model` follows the local model alone, whatever else is configured.
        """
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        local = self._local_model_state
        local_is_up = local is None or local.is_up
        overall = serving if local_is_up or not self._only_local_model else not_serving
        await self.health.set("", overall)
        await self.health.set(SERVICE_NAME, overall)
        if local is not None:
            await self.health.set(LOCAL_MODEL_HEALTH, serving if local_is_up else not_serving)

    async def follow_local_model(self, state: LocalModelState) -> None:
        """Send the local model's calls where `state` says, and none while it is down;
        health and ListModels follow it. Called with each change by the local model this
        server runs, or by the `--workers` supervisor's messages to a worker."""
        self._local_model_state = state
        if self.pipeline is not None:  # before, start() routes the latest state itself
            await self._route_local_model()
        if self._server is not None:  # before start() ends, it sets health itself
            await self._set_health()

    async def _route_local_model(self) -> None:
        assert self.pipeline is not None
        pool = self.pipeline.pool
        async with self._local_model_routing:
            state = self._local_model_state  # the latest, should another have come meanwhile
            assert state is not None
            local, client = state.upstream, pool.state(LOCAL_UPSTREAM).client
            target = (client.config.base_url, client.config.api_key)
            if state.is_up and (local.base_url, local.api_key) != target:
                # A restart, on a port and with a key of its own: before any call.
                await client.retarget(base_url=local.base_url, api_key=local.api_key)
            pool.set_down(LOCAL_UPSTREAM, is_down=not state.is_up, retry_at=state.retry_at)
            if state.is_up:
                # Calls refused while it was down opened its breaker: without this, health
                # says SERVING again while every call is refused until the cool-down ends.
                pool.state(LOCAL_UPSTREAM).reset_breakers("local model restarted")

    def _follow_supervisors_local_model(self) -> None:
        """Apply each state the supervisor sends from now on, until the server closes."""
        if self._local_model_states is None:
            return
        task = asyncio.create_task(self._follow(self._local_model_states), name="local-model")
        self._stack.push_async_callback(_cancelled, task)

    async def _follow(self, states: AsyncIterator[LocalModelState]) -> None:
        async for state in states:
            try:
                await self.follow_local_model(state)
            except Exception:  # the next state must still be followed
                log.exception("local_model.follow_failed")

    async def _start_telemetry(self, prices: PriceList) -> None:
        """Install this server's telemetry; restored and flushed when the server closes."""
        if self.telemetry is None:
            self._check_prometheus_port()
            try:
                self.telemetry = Telemetry.from_config(
                    self.config.telemetry, prices=prices, worker=self._worker
                )
            except TelemetrySetupError as exc:
                raise ConfigError("environment", exc.variable, exc.problem) from None
            except MetricsHostError as exc:
                raise self.config.error("telemetry.prometheus_host", str(exc)) from None
            except MetricsListenError as exc:
                raise ListenError(str(exc)) from exc
        else:
            self.telemetry.prices = prices
        previous = activate(self.telemetry)
        self._stack.push_async_callback(self.telemetry.aclose)
        self._stack.callback(activate, previous)

    def _check_prometheus_port(self) -> None:
        """Refuse a Prometheus endpoint on the gateway's own listen port (`check` and the
        supervisor of workers refuse it by `worker_configs`)."""
        telemetry = self.config.telemetry
        port = prometheus_endpoint_port(telemetry, os.environ)
        if port is None:
            return
        problem = prometheus_port_problem(self.config.server, telemetry.prometheus_host, port)
        if problem is not None:
            raise self.config.error("telemetry.prometheus_port", problem)

    @property
    def address(self) -> str:
        """`host:port` actually bound (the port resolved when configured as 0)."""
        host = self.config.server.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    @property
    def health_address(self) -> str | None:
        """`host:port` of `server.health_listen` actually bound; None without one."""
        if self.config.server.health_listen is None:
            return None
        return f"{self.config.server.health_listen.rpartition(':')[0]}:{self.health_port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, stop accepting, let in-flight calls finish, close all."""
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        if self._server is not None:
            if self.pipeline is not None:
                self.pipeline.begin_stopping()
            self.admission.begin_stopping()
            await self.health.enter_graceful_shutdown()
            stopping = asyncio.ensure_future(self._server.stop(grace))
            # grpc waits out the grace for every open call, health Watch streams too (a
            # client balancing with health checks holds one per connection): once no
            # gateway call is left they are ended, so the stop need not idle to the grace.
            # Calls still running just before grpc would cut them are ended here instead,
            # with a status that tells the caller to retry elsewhere (`ShuttingDown`).
            margin = min(_CUT_OFF_MARGIN_S, grace / 2)
            await self._drained_within(grace - margin)
            if cut := self.admission.cut_off():
                log.warning("server.calls_cut_off", extra={"calls": cut, "grace_s": grace})
            # The rest of the grace: for the calls just cut, and for those their callers
            # left (not cut) still ending, before the stores they end with close. Halfway
            # through, a cut call still recording its charge (a hung store) is told its
            # status, which grpc would otherwise replace with a bare UNAVAILABLE.
            if not self.admission.is_idle:
                await self._drained_within(margin / 2)
            if not self.admission.is_idle:
                self.admission.tell_cut_off()
                await self._drained_within(margin / 2)
            self.health.end_watches()
            await stopping
            await self.admission.told()
            self._server = None
            log.info("server.stopped")
        await self._stack.aclose()

    async def _drained_within(self, seconds: float) -> None:
        """`_drained`, or `seconds`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._drained()

    async def _drained(self) -> None:
        """Return once no gateway call has been arriving, running or queued for a poll
        interval."""
        idle_polls = 0
        while idle_polls < 2:  # twice: a call grpc had just handed over is counted by then
            await asyncio.sleep(_DRAIN_POLL_S)
            idle_polls = idle_polls + 1 if self.admission.is_idle else 0


async def _cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _warn_of_unpriced_models(pool: UpstreamPool, prices: PriceList) -> None:
    """Say which served models have no price: their calls cost $0 and no budget sees them.

    The local model is free by design; a provider's model without one is most likely a
    name missing from (or misspelt in) `models:`.
    """
    for model, routes in sorted(pool.models.items()):
        paid = [r.client.name for r in routes if r.client.name != LOCAL_UPSTREAM]
        if paid and prices.price(model) is None:
            log.warning("pricing.model_without_price", extra={"model": model, "upstreams": paid})


def caller_keepalive_options(server: ServerConfig) -> list[tuple[str, int]]:
    """Ping each caller's connection after `keepalive_time_s` without a frame from it,
    and close it, cutting its calls, when no answer comes within `keepalive_timeout_s`.

    A caller that vanishes without closing its connection (its host crashed, a network
    path or NAT entry dropped) sends no RST: without pings its calls would run on, each
    upstream request generating and billing to its end, as though still read. grpc's
    server default is one ping in two hours. grpc takes the ping's answer as late only
    past `grpc.http2.ping_timeout_ms` (a minute by default), so that is set too.
    """
    timeout_ms = _grpc_ms(server.keepalive_timeout_s)
    return [
        ("grpc.keepalive_time_ms", _grpc_ms(server.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]


def connection_age_options(
    config: GatewayConfig, upstreams: Sequence[UpstreamConfig] | None = None
) -> list[tuple[str, int]]:
    """GOAWAY after `max_connection_age_s`, so DNS-balancing clients find new replicas.

    The grace defaults to the longest one call can take with no deadline of its own
    (at least 300 s): every attempt at the longest upstream timeout, with the longest
    Retry-After honoured between them and the longest wait for an upstream slot, so a
    call that started just before the GOAWAY is not cut short while it retries.
    `upstreams`: those served (default: the config's), the local model among them.
    """
    server = config.server
    grace_s = server.max_connection_age_grace_s
    if grace_s is None:
        grace_s = max(300.0, longest_call_s(config, upstreams))
    return [
        ("grpc.max_connection_age_ms", _grpc_ms(server.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _grpc_ms(grace_s)),
    ]


def longest_call_s(
    config: GatewayConfig, upstreams: Sequence[UpstreamConfig] | None = None
) -> float:
    """How long one call with no deadline can take through every attempt and its waits."""
    resilience = config.resilience
    served = config.upstreams if upstreams is None else upstreams
    # Each attempt may first wait out its upstream's limits: failing over, a call waits
    # again at the next upstream's.
    attempt_s = max(
        (u.timeout_s + u.limit_wait_s(resilience.max_limit_wait_s) for u in served),
        default=resilience.max_limit_wait_s,
    )
    attempts_s = resilience.attempts * attempt_s
    return attempts_s + (resilience.attempts - 1) * resilience.max_retry_after_s


# gRPC channel arguments are C ints: a longer time (past 24.8 days) would fail the start.
_GRPC_MAX_MS = 2**31 - 1


def _grpc_ms(seconds: float) -> int:
    return round(min(seconds * 1000, _GRPC_MAX_MS))


class EndableHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped
    """The standard health service (Check and Watch, statuses set by the server), whose
    Watch streams can be ended (they never end on their own).

    Not grpc_health's own servicer: it writes each status to a Watch stream holding the
    lock that setting a status takes, so one Watch whose caller read nothing (its flow-
    control window at 0) held every `set` until that caller left, and with it the stop
    (NOT_SERVING is its first step): the server served on, SERVING, through SIGTERM. A
    status set here is only published; each Watch writes it in its own time.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Event()  # set, and replaced, by each change
        self._is_shutting_down = False
        self.ended = asyncio.Event()  # set by `end_watches`

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """The service's status; NOT_FOUND, naming the services it knows, for another."""
        status = self._statuses.get(request.service)
        if status is None:
            unknown = ServiceUnknown(request.service, known=sorted(self._statuses))
            await abort_with(context, unknown, "Check")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Write the service's status, then each that differs from the last written, until
        `end_watches`. A write in progress is not cut short: grpc would log the status
        sent over it as an error, and the call lasts till its caller reads on or leaves
        (or the stop's grace ends) either way."""
        written = None
        while not self.ended.is_set():
            changed = self._changed  # before the write: a change during it is not missed
            status = self._statuses.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != written:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                written = status
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Set `service`'s status (ignored once shutting down: it stays NOT_SERVING)."""
        if not self._is_shutting_down:
            self._statuses[service] = status
            self._publish()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        self._is_shutting_down = True
        for service in self._statuses:
            self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._publish()

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def end_watches(self) -> None:
        """End every Watch stream, open or to come, and every reflection stream
        (`EndableReflection`), with OK: the server is going away."""
        self.ended.set()
        self._publish()  # the Watch streams waiting for a change see it


class EndableReflection(ReflectionServicer):  # type: ignore[misc]  # grpc_reflection is untyped
    """grpc's reflection service, whose streams end once `ended` is set: a tool's session
    may hold one open, and the server's stop would wait its whole grace for it. It also
    finds the file of a service's method (`MethodFindingPool`)."""

    def __init__(self, service_names: list[str], *, ended: asyncio.Event) -> None:
        super().__init__(service_names, pool=MethodFindingPool(descriptor_pool.Default()))
        self._ended = ended

    async def ServerReflectionInfo(
        self,
        requests: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(_until(self._ended, requests), context):
            yield response


class MethodFindingPool:
    """A descriptor pool whose `FindFileContainingSymbol` also finds a service's method
    (`pkg.Service.Method`), as the reflection protocol asks and `grpcurl describe` of a
    method needs: protobuf's own pool finds no method by name (grpc/grpc#34743)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        """The file declaring `symbol`, a method's too; KeyError when none does."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                pass
            else:
                if method in service.methods_by_name:
                    return service.file
            raise


_Item = TypeVar("_Item")


async def _until(ended: asyncio.Event, items: AsyncIterable[_Item]) -> AsyncIterator[_Item]:
    """`items` until they end or `ended` is set, whichever comes first."""
    iterator = aiter(items)
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(ended.wait())]
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            waits.append(following)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            waits.remove(following)
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        for waiting in waits:  # the caller's next request, should it come, is not read
            await _cancelled(waiting)


def report_start_failure(exc: ConfigError | ListenError | LocalModelUnavailable) -> int:
    """Say on stderr, in one line, why `serve` could not start; return the exit status
    the README documents: 2 for the config, else 1."""
    line, status = start_failure(exc)
    print(line, file=sys.stderr, flush=True)
    return status


def start_failure(exc: ConfigError | ListenError | LocalModelUnavailable) -> tuple[str, int]:
    """The line saying why `serve` (or one of its workers) could not start, and the exit
    status the README documents: 2 for the config, else 1."""
    if isinstance(exc, ConfigError):
        line, status = f"config error: {exc}", 2
    elif isinstance(exc, LocalModelUnavailable):  # not installed, or llama.cpp failed
        line, status = f"local model: {exc}", 1
    else:
        line, status = str(exc), 1
    return f"llm-gateway: {line}", status


def _bind(listen: str, add_port: Callable[[], int]) -> int:
    """The port `add_port` bound for `listen`, or `ListenError`. Its host was judged as
    the start began (`check_listen_hosts`): grpc's own failure prints its own error line
    first and says only "Failed to bind to address"."""
    try:
        port = add_port()
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {listen}: the address is taken or not local") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {listen}")
    return port


def refuse_taken(listen: str | None) -> None:
    """Raise `ListenError`, as the bind would, when something listens on `listen`'s port
    at every address grpc would try: it listens on those it can (`localhost` on [::1]
    alone when 127.0.0.1 is taken; a wildcard on 0.0.0.0 when [::] is).

    Only a taken port: any other failure (an address not this host's) is left to the bind.
    """
    if listen is None or listen.endswith(":0"):
        return
    host, port = host_and_port(listen)
    addresses: list[tuple[socket.AddressFamily, tuple[Any, ...]]]
    if host in ("0.0.0.0", "::"):  # grpc's wildcard: [::] for both stacks, else 0.0.0.0
        addresses = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("", port))]
    elif host == "localhost":  # both loopbacks to grpc's resolver, whatever /etc/hosts says
        addresses = [(socket.AF_INET6, ("::1", port)), (socket.AF_INET, ("127.0.0.1", port))]
    else:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return
        addresses = [(family, address) for family, _, _, _, address in found]
    failures = [bind_failure(family, address) for family, address in addresses]
    if errno.EADDRINUSE in failures and None not in failures:
        raise ListenError(f"cannot listen on {listen}: the address is taken")


TLS_REFUSED = (
    "grpc cannot serve TLS with this certificate and key (a key type or curve its TLS "
    "does not take, such as DSA or secp256k1; RSA and P-256 keys work)"
)


async def refuses_tls(config: ServerConfig) -> bool:
    """Whether grpc refuses `config`'s certificate and key themselves: a scratch loopback
    port takes plaintext but not TLS with them. (A failed listen says only "Failed to
    bind", and the start would blame the address.)"""
    scratch = dataclasses.replace(config, listen="127.0.0.1:0")
    ports = []
    for attempt in (scratch, dataclasses.replace(scratch, tls=TlsConfig())):
        server = grpc.aio.server()
        try:
            ports.append(_add_port(server, attempt))
        except RuntimeError:
            ports.append(0)
        await let_go_unstarted(server)
    return ports[0] == 0 and ports[1] != 0


async def let_go_unstarted(server: grpc.aio.Server) -> None:
    """Start and stop a grpc server that will not serve. It lets its ports go only once
    started, and one collected unstarted logs its dying self at DEBUG ("__dealloc__ called
    on running server"): a record kept past that (pytest's capture, a queueing handler)
    frees it a second time later, a segfault (a CI run lost a test process to it)."""
    await server.start()
    await server.stop(0)


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Listen in plaintext, or with TLS (and client certificates) when configured."""
    tls = config.tls
    if tls.cert_file is None or tls.key_file is None:
        return int(server.add_insecure_port(config.listen))
    with open(tls.cert_file, "rb") as cert, open(tls.key_file, "rb") as key:
        pair = (key.read(), cert.read())
    client_ca = None
    if tls.client_ca_file is not None:
        with open(tls.client_ca_file, "rb") as ca:
            client_ca = ca.read()
    credentials = grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=tls.require_client_cert
    )
    return int(server.add_secure_port(config.listen, credentials))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the gateway: uvloop's when uvloop is installed, else asyncio's.

    A loop, not a process-wide policy: a program running the gateway in-process keeps
    its own loops (and asyncio deprecates the policies from Python 3.14).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(
    config: GatewayConfig,
    *,
    on_ready: Callable[[str], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
    local_model_states: AsyncIterator[LocalModelState] | None = None,
    worker: int | None = None,
) -> None:
    """Run the gateway until SIGTERM, SIGINT or SIGHUP, then shut down gracefully.

    `on_ready` gets the bound address once the server listens (default: print it);
    `on_stopping` is called once a stop reaches the listening server, before its drain;
    `local_model_states` and `worker`: as `GatewayServer` takes them.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    started = False
    this = asyncio.current_task()

    def on_signal() -> None:
        # While starting (a local model can take local_model.startup_timeout_s to answer)
        # the start is cancelled, and GatewayServer closes what it had opened.
        if not started and not stopping.is_set() and this is not None:
            this.cancel()
        stopping.set()

    for sig in early_signals.stop_signals():
        loop.add_signal_handler(sig, on_signal)
    if early_signals.received():  # before these handlers, as the process started
        log.info("server.stopped_while_starting")
        return
    # A worker starts with SIGINT and SIGHUP blocked (`service.workers`): one sent
    # meanwhile comes now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, early_signals.GROUP_SIGNALS)
    try:
        async with GatewayServer(
            config, local_model_states=local_model_states, worker=worker
        ) as server:
            started = True
            if on_ready is None:
                health = (
                    "" if server.health_address is None else f", health on {server.health_address}"
                )
                announce(f"llm-gateway listening on {server.address}{health}")
            else:
                on_ready(server.address)
            await stopping.wait()
            if on_stopping is not None:
                on_stopping()
            log.info("server.stopping", extra={"grace_s": config.server.grace_period_s})
    except asyncio.CancelledError:
        if started or not stopping.is_set() or this is None:
            raise
        this.uncancel()
        log.info("server.stopped_while_starting")


def run(
    config: GatewayConfig,
    *,
    on_ready: Callable[[str], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
    local_model_states: AsyncIterator[LocalModelState] | None = None,
    worker: int | None = None,
) -> None:
    """Blocking entry point for one process (`worker`: its index among `--workers N`)."""
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(
                serve(
                    config,
                    on_ready=on_ready,
                    on_stopping=on_stopping,
                    local_model_states=local_model_states,
                    worker=worker,
                )
            )
    finally:
        early_signals.ignore()
