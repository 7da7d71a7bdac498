"""Assembling and running the gRPC server: upstreams, pipeline, servicer, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from llmgateway.v1 import gateway_pb2, gateway_pb2_grpc
from service.cache import CacheStore, ResponseCache
from service.config import GatewayConfig, UpstreamConfig
from service.ledger import open_ledger
from service.local_model import LocalModelServer
from service.pipeline import Pipeline
from service.pool import UpstreamPool
from service.pricing import PriceList
from service.rpc_boundary import Admission, guard_servicer
from service.servicer import CompletionServicer
from service.telemetry import Telemetry, activate
from service.upstream.client import UpstreamClient

log = logging.getLogger("llm_gateway.server")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["CompletionService"].full_name
RPC_METHODS = [m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["CompletionService"].methods]


class GatewayServer:
    """The whole gateway in one object; `async with GatewayServer(config) as server:`.

    Owns every resource it creates (upstream pools, the local model, the gRPC server)
    and closes them in reverse order.
    """

    def __init__(self, config: GatewayConfig, *, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry
        self.port = 0
        self.health = HealthServicer()
        self.admission = Admission(
            max_in_flight=config.server.max_in_flight_calls,
            retry_after_s=config.server.overload_retry_after_s,
            max_queued=config.server.max_queued_calls,
        )
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self.pipeline: Pipeline | None = None
        self.local_model: LocalModelServer | None = None

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
        local = self.config.local_model
        wants_local = local.enabled == "always" or (local.enabled == "auto" and not configs)
        if wants_local:
            self.local_model = await self._stack.enter_async_context(LocalModelServer(local))
            configs.append(self.local_model.upstream_config())
        for upstream in self.config.upstreams:
            if upstream not in configs and upstream.api_key_env:
                log.info(
                    "upstream.disabled",
                    extra={"upstream": upstream.name, "missing_env": upstream.api_key_env},
                )
        return configs

    async def start(self) -> None:
        """Build everything and start listening."""
        prices = PriceList(self.config.models)
        await self._start_telemetry(prices)
        ledger = open_ledger(self.config.ledger)
        self._stack.push_async_callback(ledger.aclose)
        clients = [
            await self._stack.enter_async_context(UpstreamClient(c))
            for c in await self._upstream_configs()
        ]
        cache = await self._stack.enter_async_context(
            ResponseCache(
                self.config.cache,
                store=CacheStore(self.config.cache),
                default_mode=self.config.defaults.cache_mode,
            )
        )
        pool = UpstreamPool(clients, settings=self.config.resilience)
        self.pipeline = Pipeline(self.config, pool, prices, ledger=ledger, cache=cache)
        servicer = CompletionServicer(self.pipeline)
        guard_servicer(servicer, RPC_METHODS, self.admission)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.config.server.max_receive_message_bytes),
                ("grpc.so_reuseport", 1 if self.config.server.workers != 1 else 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        gateway_pb2_grpc.add_CompletionServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = server.add_insecure_port(self.config.server.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.server.listen}")
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "server.started", extra={"port": self.port, "upstreams": [c.name for c in clients]}
        )

    async def _start_telemetry(self, prices: PriceList) -> None:
        """Install this server's telemetry; restored and flushed when the server closes."""
        if self.telemetry is None:
            self.telemetry = Telemetry.from_config(self.config.telemetry, prices=prices)
        else:
            self.telemetry.prices = prices
        previous = activate(self.telemetry)
        self._stack.push_async_callback(self.telemetry.aclose)
        self._stack.callback(activate, previous)

    @property
    def address(self) -> str:
        """`host:port` actually bound (the port resolved when configured as 0)."""
        host = self.config.server.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, stop accepting, let in-flight calls finish, close all."""
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
            log.info("server.stopped")
        await self._stack.aclose()


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: GatewayConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then shut down gracefully.

    `on_ready` gets the bound address once the server listens (default: print it).
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with GatewayServer(config) as server:
        if on_ready is None:
            print(f"llm-gateway listening on {server.address}", flush=True)
        else:
            on_ready(server.address)
        await stopping.wait()
        log.info("server.stopping", extra={"grace_s": config.server.grace_period_s})


def run(config: GatewayConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Blocking entry point for one process."""
    _install_uvloop()
    asyncio.run(serve(config, on_ready=on_ready))
