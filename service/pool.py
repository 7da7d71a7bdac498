"""The upstreams that serve each model, and how a call is sent to one of them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from service.clock import Deadline
from service.domain import ChatRequest
from service.errors import DeadlineExceeded, ModelNotFound, UpstreamTimeout
from service.telemetry import active as telemetry
from service.upstream.client import UpstreamClient
from service.upstream.openai_json import request_body
from service.upstream.types import StreamEvent, TextChunk, UpstreamCall, UpstreamReply


@dataclass(slots=True)
class AttemptLog:
    """What the pool did for one call: filled in as it goes, read by the pipeline."""

    attempts: int = 0
    upstream: str = ""
    upstream_s: float = 0.0
    first_token_s: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream able to serve a model, and the model's name there."""

    client: UpstreamClient
    upstream_model: str


class UpstreamPool:
    """Routes each model to the upstreams that serve it."""

    def __init__(self, clients: Sequence[UpstreamClient]) -> None:
        self.clients = tuple(clients)
        self._routes: dict[str, list[Route]] = {}
        for client in self.clients:
            for model, upstream_model in client.config.models.items():
                self._routes.setdefault(model, []).append(Route(client, upstream_model))

    @property
    def models(self) -> Mapping[str, Sequence[Route]]:
        """Every model served, with its routes in preference order."""
        return self._routes

    def routes(self, model: str) -> Sequence[Route]:
        """The routes for `model`; raises `ModelNotFound` when none serves it."""
        routes = self._routes.get(model)
        if not routes:
            raise ModelNotFound(model)
        return routes

    def _call(
        self, request: ChatRequest, route: Route, *, stream: bool, headers: dict[str, str]
    ) -> UpstreamCall:
        if request.idempotency_key:
            headers["Idempotency-Key"] = request.idempotency_key
        return UpstreamCall(
            upstream_model=route.upstream_model,
            body=request_body(request, upstream_model=route.upstream_model, stream=stream),
            headers=headers,
        )

    @staticmethod
    def _time_left(route: Route, deadline: Deadline) -> float:
        timeout = deadline.bound(route.client.config.timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("the caller's deadline passed before the upstream call")
        return timeout

    async def complete(
        self, request: ChatRequest, *, deadline: Deadline, log: AttemptLog
    ) -> UpstreamReply:
        """Send a unary completion to the first route of its model."""
        route = self.routes(request.model)[0]
        log.upstream = route.client.name
        log.attempts += 1
        started = time.monotonic()
        headers: dict[str, str] = {}
        try:
            with telemetry().upstream_attempt(
                request,
                upstream=route.client.name,
                base_url=route.client.config.base_url,
                upstream_model=route.upstream_model,
                attempt=log.attempts,
                headers=headers,  # receives `traceparent`
            ) as attempt:
                call = self._call(request, route, stream=False, headers=headers)
                reply = await route.client.complete(
                    call, timeout_s=self._time_left(route, deadline)
                )
                attempt.finish(
                    response_id=reply.id,
                    response_model=reply.model,
                    finish_reason=str(reply.finish_reason),
                    usage=reply.usage,
                    content=reply.content,
                )
                return reply
        except UpstreamTimeout:
            if deadline.has_expired:
                raise DeadlineExceeded("the caller's deadline passed") from None
            raise
        finally:
            log.upstream_s += time.monotonic() - started

    async def stream(
        self, request: ChatRequest, *, deadline: Deadline, log: AttemptLog
    ) -> AsyncIterator[StreamEvent]:
        """Stream a completion from the first route of its model."""
        route = self.routes(request.model)[0]
        log.upstream = route.client.name
        log.attempts += 1
        started = time.monotonic()
        headers: dict[str, str] = {}
        try:
            with telemetry().upstream_attempt(
                request,
                upstream=route.client.name,
                base_url=route.client.config.base_url,
                upstream_model=route.upstream_model,
                attempt=log.attempts,
                headers=headers,  # receives `traceparent`
            ) as attempt:
                call = self._call(request, route, stream=True, headers=headers)
                async for event in route.client.stream(
                    call, timeout_s=self._time_left(route, deadline)
                ):
                    if isinstance(event, TextChunk):
                        if log.first_token_s is None:
                            log.first_token_s = time.monotonic() - started
                        attempt.chunk(event.content)
                    else:
                        attempt.finish(
                            response_id=event.id,
                            response_model=event.model,
                            finish_reason=str(event.finish_reason),
                            usage=event.usage,
                        )
                    yield event
        except UpstreamTimeout:
            if deadline.has_expired:
                raise DeadlineExceeded("the caller's deadline passed") from None
            raise
        finally:
            log.upstream_s += time.monotonic() - started
