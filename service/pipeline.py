"""The request pipeline: validate → fit the context window → route → price.

Knows neither Protobuf nor HTTP: it takes a `ChatRequest` and returns a `Completion`
(or, for streams, `Delta`s then a `Completion`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from service.clock import Deadline
from service.config import GatewayConfig, RequestDefaults
from service.context_window import fit_messages
from service.domain import ChatRequest, Completion, Delta, Timings, Usage
from service.pool import AttemptLog, UpstreamPool
from service.pricing import PriceList
from service.tokens import estimate_prompt_tokens, estimate_text_tokens
from service.upstream.types import StreamEnd, TextChunk
from service.validation import validate_chat_request

if TYPE_CHECKING:  # only annotated here; the server builds the cache and passes it in
    from service.cache import ResponseCache

_MS = 1000.0
_DEFAULT_CONTEXT_WINDOW = 8192


class Pipeline:
    """Runs chat completions through the gateway's policies to an upstream."""

    def __init__(
        self,
        config: GatewayConfig,
        pool: UpstreamPool,
        prices: PriceList,
        *,
        cache: ResponseCache | None = None,
    ) -> None:
        self._cache = cache
        self._config = config
        self._pool = pool
        self._prices = prices

    @property
    def pool(self) -> UpstreamPool:
        """The upstream pool this pipeline routes to."""
        return self._pool

    @property
    def limits(self) -> RequestDefaults:
        """Request limits and defaults from the config."""
        return self._config.defaults

    @property
    def prices(self) -> PriceList:
        """The pricing catalog."""
        return self._prices

    @property
    def cache(self) -> ResponseCache | None:
        """The response cache, if any."""
        return self._cache

    def prepare(self, request: ChatRequest) -> tuple[ChatRequest, int]:
        """Validate `request` and fit it to its model's window: (request to send, dropped)."""
        validate_chat_request(request, self._config.defaults)
        self._pool.routes(request.model)
        fitted = fit_messages(
            request.messages,
            context_window=self._prices.context_window(request.model, _DEFAULT_CONTEXT_WINDOW),
            max_tokens=request.params.max_tokens,
            mode=request.truncation or self._config.defaults.truncation,
        )
        if fitted.dropped:
            request = dataclasses.replace(request, messages=fitted.messages)
        return request, fitted.dropped

    def _usage(self, request: ChatRequest, content: str, reported: Usage | None) -> Usage:
        if reported is not None:
            return reported
        return Usage(
            input_tokens=estimate_prompt_tokens(request.messages),
            output_tokens=estimate_text_tokens(content),
            is_estimated=True,
        )

    async def complete(self, request: ChatRequest, *, deadline: Deadline) -> Completion:
        """One unary completion, from the cache when it has it."""
        started = time.monotonic()
        request, dropped = self.prepare(request)
        fetch = functools.partial(self._complete, request, dropped, deadline, started)
        if self._cache is None:
            return await fetch()
        completion = await self._cache.complete(request, fetch=fetch, deadline=deadline)
        return _with_dropped(completion, dropped)

    async def _complete(
        self, request: ChatRequest, dropped: int, deadline: Deadline, started: float
    ) -> Completion:
        log = AttemptLog()
        reply = await self._pool.complete(request, deadline=deadline, log=log)
        usage = self._usage(request, reply.content, reply.usage)
        upstream_ms = log.upstream_s * _MS
        return Completion(
            id=reply.id or f"gw-{uuid.uuid4().hex}",
            model=reply.model,
            content=reply.content,
            finish_reason=reply.finish_reason,
            usage=usage,
            cost_usd=self._prices.cost_usd(request.model, usage),
            upstream=log.upstream,
            attempts=log.attempts,
            timings=Timings(
                total_ms=(time.monotonic() - started) * _MS,
                upstream_ms=upstream_ms,
                time_to_first_token_ms=upstream_ms,
            ),
            dropped_messages=dropped,
        )

    async def stream(
        self, request: ChatRequest, *, deadline: Deadline
    ) -> AsyncIterator[Delta | Completion]:
        """One streamed completion: deltas as they arrive, then the `Completion`."""
        started = time.monotonic()
        request, dropped = self.prepare(request)
        fetch = functools.partial(self._stream, request, dropped, deadline, started)
        events = (
            fetch()
            if self._cache is None
            else self._cache.stream(request, fetch=fetch, deadline=deadline)
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield _with_dropped(event, dropped) if isinstance(event, Completion) else event

    async def _stream(
        self, request: ChatRequest, dropped: int, deadline: Deadline, started: float
    ) -> AsyncGenerator[Delta | Completion, None]:
        log = AttemptLog()
        parts: list[str] = []
        end: StreamEnd | None = None
        async for event in self._pool.stream(request, deadline=deadline, log=log):
            if isinstance(event, TextChunk):
                parts.append(event.content)
                yield Delta(event.content)
            else:
                end = event
        if end is None:  # the pool always ends a stream with StreamEnd or raises
            raise RuntimeError("stream ended without its end event")
        content = "".join(parts)
        usage = self._usage(request, content, end.usage)
        yield Completion(
            id=end.id or f"gw-{uuid.uuid4().hex}",
            model=end.model,
            content=content,
            finish_reason=end.finish_reason,
            usage=usage,
            cost_usd=self._prices.cost_usd(request.model, usage),
            upstream=log.upstream,
            attempts=log.attempts,
            timings=Timings(
                total_ms=(time.monotonic() - started) * _MS,
                upstream_ms=log.upstream_s * _MS,
                time_to_first_token_ms=(log.first_token_s or log.upstream_s) * _MS,
            ),
            dropped_messages=dropped,
        )


def _with_dropped(completion: Completion, dropped: int) -> Completion:
    # A cached answer may come from a request that dropped a different number of messages.
    if completion.dropped_messages == dropped:
        return completion
    return dataclasses.replace(completion, dropped_messages=dropped)
