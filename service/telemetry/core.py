"""`Telemetry`: what the boundary, pipeline and pool call to trace, measure and price.

Core modules never import exporters: they call `active()` (the telemetry the running
server installed) or the module-level hooks below, which cost next to nothing when
telemetry is off because the tracer and meter are then OpenTelemetry's no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from service.config import LOCAL_MODEL_UPSTREAM, TelemetryConfig
from service.domain import (
    ChatRequest,
    Completion,
    ToolCall,
    ToolCallDelta,
    Usage,
    assemble_tool_calls,
)
from service.ledger import PICO, to_pico
from service.pricing import PriceList
from service.telemetry import tracing as attr
from service.telemetry.attempt_labels import AnswerLabels, RouteLabels
from service.telemetry.histograms import AttributeSet
from service.telemetry.lean_tracer import LeanSpan, attach_span, current_context, current_span
from service.telemetry.metrics import BREAKER_STATES, Instruments, StoreWrites
from service.telemetry.propagation import inject_trace_context, is_default
from service.telemetry.setup import Providers, build_providers, trace_propagator
from service.telemetry.tracing import CURRENT_RPC, RpcScope

log = logging.getLogger("llm_gateway.telemetry")

_SHUTDOWN_TIMEOUT_S = 5.0
_BAGGAGE_HEADER = "baggage"  # what W3CBaggagePropagator writes
_NO_CONTEXT = otel_context.Context()  # immutable: what a carrier without trace keys gives
_MOST_RPC_LABELS = 1024  # (method, status code) pairs: far more than the gateway has
# Routes (base URL, upstream, the caller's model, the upstream's) whose metric attribute
# sets are kept: the configured ones, far fewer; past it, built for each attempt.
_MOST_ROUTES = 1024
_NO_ROUTE = RouteLabels({})  # what an attempt records under when nothing is recorded


@dataclass(slots=True)
class AttemptSpan:
    """One upstream attempt in progress: the CLIENT span and what it measures.

    `with` it (`Telemetry.upstream_attempt` starts it): leaving the block ends the span,
    records the attempt's duration and, when it raised, its error. A class rather than
    `contextlib.contextmanager`, as `RpcContext` is: every attempt enters one.
    """

    span: Span
    telemetry: Telemetry
    request: ChatRequest
    upstream: str
    # Its route's attributes on the GenAI client metrics, and the sets its points are
    # recorded under: without a response model until its answer names one (`finish`).
    route: RouteLabels
    answer: AnswerLabels
    # Whether `span` records, known as it starts (`Telemetry.upstream_attempt`): it does
    # until the attempt's end ends it.
    is_recording: bool = False
    is_callers_cut: Callable[[BaseException], bool] | None = None
    started: float = field(default_factory=time.perf_counter)
    first_chunk_s: float | None = None
    # A unary answer's wait on the upstream (`finish`): the RPC's upstream time, which
    # leaves the attempt's own encoding and parsing to the gateway's overhead.
    waited_s: float | None = None
    # Its answer's attributes (`finish`), set on a `LeanSpan` as it ends: a call less.
    _answered: dict[str, Any] | None = None
    _parts: list[str] | None = None  # with `capture_content`: the text streamed so far
    _tool_call_pieces: list[ToolCallDelta] | None = None  # and the tool-call pieces

    def __enter__(self) -> AttemptSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        telemetry, span = self.telemetry, self.span
        error_type = None
        try:
            if exc is not None:
                # A cut by the caller's own deadline is no fault of the upstream's: it is
                # `cancelled`, as a cut by the caller's cancel is, not the upstream's
                # timeout. Once a stream's text flows, that deadline bounds none of its reads.
                is_callers_cut = (
                    self.first_chunk_s is None
                    and self.is_callers_cut is not None
                    and self.is_callers_cut(exc)
                )
                error_type = attr.CANCELLED if is_callers_cut else attr.error_type(exc)
                span.set_attribute(attr.ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
                if isinstance(exc, Exception) and not is_callers_cut:
                    telemetry.record_upstream_error(self.upstream, error_type)
        finally:
            elapsed = time.perf_counter() - self.started
            scope = CURRENT_RPC.get()
            if scope is not None:
                scope.waited(elapsed if self.waited_s is None else self.waited_s)
            if exc is None and self.first_chunk_s is not None:
                self._record_first_chunk(self.first_chunk_s)
            if telemetry.records_metrics:
                duration: Mapping[str, Any] = self.answer.duration
                if error_type is not None:  # its duration's alone: no attribute of its tokens
                    duration = {**duration, attr.ERROR_TYPE: error_type}
                telemetry.instruments.operation_duration.record(elapsed, duration)
            if type(span) is LeanSpan:
                span.end(attributes=self._answered)
            elif self.is_recording:  # else the no-op span, or an unsampled one: no end
                span.end()

    def _record_first_chunk(self, first_chunk_s: float) -> None:
        """Time to first chunk of a stream that answered, on the span and the metric, as
        the attempt ends: only then do its attributes hold `gen_ai.response.model`, which
        the stream says at its end.

        An attempt that failed (or was cut) has none: the GenAI conventions give
        `gen_ai.client.operation.time_to_first_chunk` no `error.type`, so its points
        could not be told from those of the answers.
        """
        self.span.set_attribute(attr.TIME_TO_FIRST_TOKEN_MS, first_chunk_s * 1000.0)
        if self.telemetry.records_metrics:
            self.telemetry.instruments.time_to_first_chunk.record(
                first_chunk_s, self.answer.duration
            )

    def chunk(self, text: str, tool_calls: Sequence[ToolCallDelta] = ()) -> None:
        """A streamed chunk arrived; the first one marks time to first token."""
        if self.first_chunk_s is None:
            self.first_chunk_s = time.perf_counter() - self.started
        if self._parts is not None:
            self._parts.append(text)
        if self._tool_call_pieces is not None:
            self._tool_call_pieces.extend(tool_calls)

    def finish(
        self,
        *,
        response_id: str,
        response_model: str,
        finish_reason: str,
        usage: Usage | None,
        content: str | None = None,
        tool_calls: Sequence[ToolCall] = (),
        waited_s: float | None = None,
    ) -> None:
        """The upstream answered in full: response attributes, tokens and cost. (The
        tokens' metric waits for the call's usage: `Telemetry.record_token_usage`.)

        `content`, `tool_calls` and `waited_s` (how long the answer took to come) are a
        unary answer's; a stream's were gathered by `chunk`."""
        self.waited_s = waited_s
        span = self.span
        # Sliced, not measured first: a name within the bound is the same string again.
        response_model = response_model[: attr.MOST_ANSWER_NAME_CHARS]
        if response_model and self.telemetry.records_metrics:
            self.answer = self.route.answered[response_model]
        if not self.is_recording:  # the no-op span, or an unsampled one
            return
        # Set in one call, as the span ends for the gateway's own (`__exit__`).
        attributes: dict[str, Any] = {
            attr.GEN_AI_RESPONSE_ID: response_id[: attr.MOST_ANSWER_NAME_CHARS],
            attr.GEN_AI_RESPONSE_MODEL: response_model,
            attr.GEN_AI_RESPONSE_FINISH_REASONS: (finish_reason,),
        }
        if usage is not None:
            # The counts the upstream reported: a usage with one left out (`is_estimated`)
            # holds 0 in its place, which the pipeline estimates. That is no count of 0
            # tokens, so it is left out here.
            is_estimated = usage.is_estimated
            if usage.input_tokens or not is_estimated:
                attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
            if usage.output_tokens or not is_estimated:
                attributes[attr.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
            attributes[attr.CACHED_INPUT_TOKENS] = usage.cached_input_tokens
            attributes[attr.REASONING_TOKENS] = usage.reasoning_tokens
        if usage is not None and not usage.is_estimated:
            # Priced from a count left out, it would say less than the call is billed:
            # its cost is the call's, on the RPC span, with the count estimated.
            attributes[attr.COST_USD] = self.telemetry.prices.cost_usd(self.request.model, usage)
        if self.telemetry.capture_content:
            if content is None:
                content = "".join(self._parts or ())
                tool_calls = assemble_tool_calls(self._tool_call_pieces or ())
            attributes[attr.GEN_AI_OUTPUT_MESSAGES] = attr.output_json(
                content, finish_reason, tool_calls
            )
        if type(span) is LeanSpan:
            self._answered = attributes
        else:
            span.set_attributes(attributes)


class RpcContext:
    """One RPC's span in a `with` block: `Telemetry.rpc` starts it, leaving ends it.

    A class rather than `contextlib.contextmanager`: every RPC enters one, and the
    generator machinery cost a few µs more per call.
    """

    __slots__ = ("otel_token", "rpc_token", "scope", "telemetry")

    def __init__(
        self,
        telemetry: Telemetry,
        scope: RpcScope,
        rpc_token: contextvars.Token[RpcScope | None],
        otel_token: contextvars.Token[otel_context.Context] | None,
    ) -> None:
        self.telemetry = telemetry
        self.scope = scope
        self.rpc_token = rpc_token
        self.otel_token = otel_token

    def __enter__(self) -> RpcScope:
        return self.scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Leaving the RPC here, not in a `Telemetry` method: a frame less on every RPC.
        scope = self.scope
        # A status the call was already ended with (`RpcScope.fail`) stands.
        if exc_type is not None and scope.error_type is None:
            if issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
                scope.fail(status_code=1, error_type=attr.CANCELLED)
            else:
                scope.fail(status_code=2, error_type=exc_type.__name__)
        try:
            self.telemetry._end_rpc(scope)
        finally:
            # A stream's generator closed after grpc's handler ended (its caller left while
            # a write waited) is closed in another context than the RPC began in: there is
            # nothing to reset there. (OpenTelemetry's `detach` would log an ERROR.) A `try`,
            # not `contextlib.suppress`: three calls fewer on every RPC.
            try:
                CURRENT_RPC.reset(self.rpc_token)
                if self.otel_token is not None:
                    self.otel_token.var.reset(self.otel_token)
            except ValueError:
                pass


class Telemetry:
    """Tracer, instruments and content policy of one gateway.

    Build it with `Telemetry.from_config`; `Telemetry.disabled()` is the no-op default.
    """

    def __init__(
        self,
        providers: Providers,
        *,
        capture_content: bool = False,
        forward_baggage: bool = False,
        prices: PriceList | None = None,
        propagator: TextMapPropagator,
    ) -> None:
        self.providers = providers
        self.tracer = providers.tracer
        # Asked on every call, and fixed once the providers are built: read once.
        self.records_spans = providers.records_spans
        self.records_metrics = providers.records_metrics
        self.in_flight = 0
        # Set by `subscribers.observe_cache`: the response cache's counters by name.
        self.cache_counters: Callable[[], Mapping[str, int]] | None = None
        # Set by `subscribers.observe_store_writes`: each shared store's late writes.
        self.store_writes: Callable[[], Mapping[str, StoreWrites]] | None = None
        self.instruments = Instruments(
            providers.meter,
            in_flight=lambda: self.in_flight,
            cache_counters=lambda: self.cache_counters() if self.cache_counters else {},
            store_writes=lambda: self.store_writes() if self.store_writes else {},
            histograms=providers.histograms,
        )
        self.capture_content = capture_content
        self.forward_baggage = forward_baggage
        self.prices = prices if prices is not None else PriceList({})
        self._propagator = propagator
        self._injects_defaults = is_default(self._propagator)
        self._rpc_labels: dict[tuple[str, int], tuple[AttributeSet, AttributeSet]] = {}
        self._routes: dict[tuple[str, str, str, str], RouteLabels] = {}
        # The metadata keys the configured propagators read (OTEL_PROPAGATORS).
        self._trace_keys = frozenset(key.lower() for key in self._propagator.fields)
        self._is_closed = False

    @classmethod
    def from_config(
        cls,
        config: TelemetryConfig,
        *,
        prices: PriceList | None = None,
        environ: Mapping[str, str] | None = None,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        worker: int | None = None,
    ) -> Telemetry:
        """Telemetry as configured (of `worker`, its index among `--workers N`, when one);
        tests inject in-memory span processors and readers."""
        env = os.environ if environ is None else environ
        propagator = trace_propagator(config, env)
        providers = build_providers(
            config,
            environ=env,
            span_processors=span_processors,
            extra_metric_readers=metric_readers,
            worker=worker,
        )
        return cls(
            providers,
            capture_content=config.capture_content,
            forward_baggage=config.forward_baggage,
            prices=prices,
            propagator=propagator,
        )

    @classmethod
    def disabled(cls) -> Telemetry:
        """Telemetry that records nothing."""
        return cls.from_config(TelemetryConfig(enabled=False))

    async def aclose(self) -> None:
        """Flush and shut exporters down in a thread, waiting a bounded time.

        An unreachable collector must not hold up shutdown: after the bound the
        exporter thread is left to give up on its own.
        """
        if not self.providers.is_recording or self._is_closed:
            return
        self._is_closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def shut_down() -> None:
            try:
                self.providers.shutdown()
            except BaseException as exc:
                error: BaseException | None = exc
            else:
                error = None
            with contextlib.suppress(RuntimeError):  # the loop closed before it finished
                loop.call_soon_threadsafe(_settle, done, error)

        # A daemon thread of its own, not asyncio.to_thread: `asyncio.run` joins its
        # executor's threads on the way out, which would hold the process until the
        # exporters give up, however long this waits.
        threading.Thread(target=shut_down, name="telemetry-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), _SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("telemetry.shutdown_timed_out", extra={"timeout_s": _SHUTDOWN_TIMEOUT_S})

    # --- one span per RPC -------------------------------------------------------------

    def rpc(self, *, service: str, method: str, metadata: Sequence[tuple[str, Any]]) -> RpcContext:
        """The SERVER span of one RPC, continuing the caller's W3C trace context.

        Started here; `with` it, and it ends with the block's outcome.
        """
        token = None
        # Whether the caller sent anything the propagators read (gRPC keys are lowercase):
        # a loop here, not `any` over a generator or a method, a frame more on every RPC.
        has_trace_context = False
        trace_keys = self._trace_keys
        for key, _ in metadata:
            if key in trace_keys:
                has_trace_context = True
                break
        is_recording = False
        if not self.records_spans and not has_trace_context:
            # Nothing to record and nothing to pass on: skip reading the metadata.
            span: Span = trace.INVALID_SPAN
        else:
            # With no tracer provider the span is a no-op carrying the caller's context,
            # which the upstream request then passes on unchanged. Without any key the
            # propagators read, extracting would only return an empty context.
            parent = _NO_CONTEXT
            if has_trace_context:
                carrier = {k: v for k, v in metadata if isinstance(v, str)}
                parent = self._propagator.extract(carrier)
            span = self.tracer.start_span(
                f"{service}/{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    attr.RPC_SYSTEM: "grpc",
                    attr.RPC_SERVICE: service,
                    attr.RPC_METHOD: method,
                },
            )
            token = attach_span(span, parent)
            # The gateway's own span records, as it just started; the SDK's non-recording
            # one does not: neither is asked, a call on every RPC.
            is_recording = type(span) is LeanSpan or (
                type(span) is not NonRecordingSpan and span.is_recording()
            )
        scope = RpcScope(span=span, method=method, is_recording=is_recording)
        self.in_flight += 1
        return RpcContext(self, scope, CURRENT_RPC.set(scope), token)

    def _end_rpc(self, scope: RpcScope) -> None:
        records_spans, records_metrics = self.records_spans, self.records_metrics
        if not (records_spans or records_metrics):
            # Telemetry off: the span is a no-op one (or the caller's context carried on),
            # the histograms no-ops. Their times, `is_recording` and `end` were 5 calls.
            self.in_flight -= 1
            self.instruments.requests.add(1, scope.method, scope.status_code)
            return
        elapsed = time.perf_counter() - scope.started  # `scope.elapsed_s()`: a frame less
        overhead = scope.overhead_s(elapsed)
        span = scope.span
        if scope.is_recording:
            attributes = scope.attributes
            attributes[attr.RPC_GRPC_STATUS_CODE] = scope.status_code
            attributes[attr.OVERHEAD_MS] = overhead * 1000.0
            if scope.error_type is not None:
                attributes[attr.ERROR_TYPE] = scope.error_type
            if scope.status_code in attr.SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, scope.error_type))
            if type(span) is LeanSpan:  # set as it ends: a call less on every RPC
                span.end(attributes=attributes)
            else:
                span.set_attributes(attributes)
                span.end()
        # A span that does not record (unsampled, or no tracer provider) has nothing to end.
        self.in_flight -= 1
        self.instruments.requests.add(1, scope.method, scope.status_code)
        if not records_metrics:
            return  # the histograms are no-ops: skip building their attributes
        try:  # indexed, not `get`: a call fewer; only a method's first status misses
            labels = self._rpc_labels[scope.method, scope.status_code]
        except KeyError:
            labels = self._rpc_labels_of(scope.method, scope.status_code)
        by_status, by_method = labels
        self.instruments.record_rpc(elapsed, by_status, overhead, by_method)

    def _rpc_labels_of(self, method: str, status_code: int) -> tuple[AttributeSet, AttributeSet]:
        """The RPC histograms' attributes for `method` ending with `status_code`, kept
        for the next RPC: the gateway's methods and gRPC's codes are few."""
        labels = (
            AttributeSet({attr.RPC_METHOD: method, attr.RPC_GRPC_STATUS_CODE: status_code}),
            AttributeSet({attr.RPC_METHOD: method}),
        )
        if len(self._rpc_labels) < _MOST_RPC_LABELS:
            self._rpc_labels[method, status_code] = labels
        return labels

    # --- one CLIENT span per upstream attempt -----------------------------------------

    def upstream_attempt(
        self,
        request: ChatRequest,
        *,
        upstream: str,
        base_url: str,
        upstream_model: str,
        attempt: int,
        headers: MutableMapping[str, str],
        retry_wait_s: float | None = None,
        is_callers_cut: Callable[[BaseException], bool] | None = None,
    ) -> AttemptSpan:
        """The CLIENT span of one upstream attempt, to `with`; injects `traceparent` into
        `headers` (and the caller's `baggage` only with `forward_baggage`).

        `upstream_model` is the model's name at this upstream, which the request is sent
        under: `llm_gateway.upstream.model`, beside the caller's `gen_ai.request.model`.
        An attempt that fails counts in `llm_gateway.upstream.errors`, unless
        `is_callers_cut` says its caller's deadline cut it: the upstream did nothing wrong.
        """
        route = _NO_ROUTE
        if self.records_spans or self.records_metrics:
            key = (base_url, upstream, request.model, upstream_model)
            # Indexed, not `get`: a call fewer; only a route's first attempt misses.
            try:
                route = self._routes[key]
            except KeyError:
                route = self._route_labels(key)
        attributes: dict[str, Any] | None = None
        is_recording = False
        # With no tracer provider every span is a no-op: skip describing it.
        if self.records_spans:
            attributes = {**route.attributes, attr.UPSTREAM: upstream, attr.ATTEMPT: attempt}
            params = request.params
            if params.temperature is not None:
                attributes[attr.GEN_AI_REQUEST_TEMPERATURE] = params.temperature
            if params.top_p is not None:
                attributes[attr.GEN_AI_REQUEST_TOP_P] = params.top_p
            if params.max_tokens is not None:
                attributes[attr.GEN_AI_REQUEST_MAX_TOKENS] = params.max_tokens
            if params.reasoning_effort is not None:
                attributes[attr.REASONING_EFFORT] = params.reasoning_effort.value
            if retry_wait_s is not None:
                attributes[attr.RETRY_WAIT_MS] = retry_wait_s * 1000.0
        if attributes is not None:
            span = self.tracer.start_span(
                f"{attr.OPERATION_CHAT} {request.model}",
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
            # Known without asking, as the RPC's (`rpc`): a call on every attempt.
            is_recording = type(span) is LeanSpan or (
                type(span) is not NonRecordingSpan and span.is_recording()
            )
            if self.capture_content and is_recording:
                span.set_attribute(attr.GEN_AI_INPUT_MESSAGES, attr.messages_json(request.messages))
            # Baggage the default propagator would write is dropped below unless forwarded.
            if self._injects_defaults and not (self.forward_baggage and baggage.get_all()):
                inject_trace_context(headers, span.get_span_context())
            else:
                self._propagator.inject(headers, context=trace.set_span_in_context(span))
        else:
            span = trace.INVALID_SPAN
            if current_context():  # the caller's context, passed on unchanged
                self._propagator.inject(headers)
        if not self.forward_baggage and _BAGGAGE_HEADER in headers:
            del headers[_BAGGAGE_HEADER]
        return AttemptSpan(
            span=span,
            telemetry=self,
            request=request,
            upstream=upstream,
            route=route,
            answer=route.unanswered,
            is_recording=is_recording,
            is_callers_cut=is_callers_cut,
            _parts=[] if self.capture_content else None,
            _tool_call_pieces=[] if self.capture_content else None,
        )

    def _route_labels(self, key: tuple[str, str, str, str]) -> RouteLabels:
        """The metric attributes of attempts on the route `key` (base URL, upstream, the
        caller's model, the upstream's), kept for its next attempts."""
        base_url, upstream, model, upstream_model = key
        host, port, provider = _endpoint(base_url, upstream)
        attributes: dict[str, AttributeValue] = {
            attr.GEN_AI_OPERATION_NAME: attr.OPERATION_CHAT,
            attr.GEN_AI_PROVIDER_NAME: provider,
            # The caller's name, as on the cost, the cache hits and the RPC span: one
            # series per model offered, whatever each upstream calls it.
            attr.GEN_AI_REQUEST_MODEL: model,
            attr.UPSTREAM_MODEL: upstream_model,
            attr.SERVER_ADDRESS: host,
        }
        if port is not None and upstream != LOCAL_MODEL_UPSTREAM:
            # Conditionally required with `server.address`, on the metrics as on the span.
            # Not the local model's: it restarts on a new free port, each a new series of
            # every metric (a crash loop would fill the histograms' cap of series for good).
            attributes[attr.SERVER_PORT] = port
        route = RouteLabels(attributes)
        if len(self._routes) < _MOST_ROUTES:
            self._routes[key] = route
        return route

    # --- what a finished call cost ----------------------------------------------------

    def record_completion(
        self, request: ChatRequest, completion: Completion, *, operation: str = attr.OPERATION_CHAT
    ) -> None:
        """Put usage, cost and cache outcome on the RPC span and the cost metrics."""
        usage = completion.usage
        # Only this gateway's tracer records spans: without a provider, no span to ask.
        span = current_span() if self.records_spans else None
        scope = CURRENT_RPC.get() if span is not None else None
        if scope is not None and scope.span is not span:
            scope = None  # a span of its own: not the RPC's
        # The RPC's own span (most calls') records till the RPC's end, as its scope knows:
        # not asked. (Set on it later, its attributes go nowhere: it ended.)
        if span is not None and (scope.is_recording if scope is not None else span.is_recording()):
            attributes: dict[str, Any] = {
                attr.GEN_AI_OPERATION_NAME: operation,
                attr.GEN_AI_REQUEST_MODEL: request.model,
                # None (left out): a cut call, whose answer never named its model.
                attr.GEN_AI_RESPONSE_MODEL: completion.model[: attr.MOST_ANSWER_NAME_CHARS] or None,
                attr.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
                attr.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
                attr.CACHED_INPUT_TOKENS: usage.cached_input_tokens,
                attr.REASONING_TOKENS: usage.reasoning_tokens,
                attr.USAGE_ESTIMATED: usage.is_estimated,
                attr.COST_USD: completion.cost_usd,
                attr.CACHE_HIT: completion.is_cache_hit,
                attr.UPSTREAM: completion.upstream,
                attr.ATTEMPTS: completion.attempts,
                attr.TENANT: request.tenant,
            }
            if completion.is_coalesced:
                # It shared another caller's upstream call: a hit to its caller, who paid
                # nothing, but no answer the cache held, as `cache.lookups` counts it.
                attributes[attr.CACHE_HIT] = False
                attributes[attr.CACHE_COALESCED] = True
            if scope is None or not scope.is_multi_call:
                # One call's figures: a batch's or a summary's span has the RPC's queued
                # time instead (set by the servicer), and each call has its attempt span.
                timings = completion.timings
                if timings.time_to_first_token_ms:  # 0: a call cut before its first token
                    attributes[attr.TIME_TO_FIRST_TOKEN_MS] = timings.time_to_first_token_ms
                attributes[attr.QUEUED_MS] = timings.queued_ms
            if scope is not None:
                # The RPC's own span: set with the rest of its attributes when it ends.
                # A batch or a summary makes several calls in one RPC: they add up.
                earlier = scope.attributes
                if attr.COST_USD in earlier:  # an earlier call of this RPC's
                    if scope.is_multi_call:
                        _merge_calls(attributes, earlier)
                    _add_usage(attributes, earlier)
                earlier.update(attributes)
            else:
                span.set_attributes(attributes)
        self.instruments.cost.add(completion.cost_usd, request.tenant, request.model)
        if completion.is_cache_hit and not completion.is_coalesced:
            # `record_cache_hit` written out: a frame on every hit.
            self.instruments.cache_hits.add(1, request.model)

    def record_token_usage(self, attempt: AttemptSpan | None, usage: Usage) -> None:
        """One upstream call's (or lost attempt's) tokens as billed, on
        `gen_ai.client.token.usage` under its `attempt`'s metric attributes (with its
        answer's model, if it named one, and without its `error.type`).

        The usage is the one its response and ledger row have: as reported, else
        estimated, which the GenAI conventions allow as offline counting. Leaving
        estimates out had a sum of the metric miss every call whose upstream reports no
        usage; `llm_gateway.usage.estimated` (true or false) tells them apart.
        """
        if not self.records_metrics or attempt is None:
            return
        answer = attempt.answer
        inputs, outputs = answer.estimated_tokens if usage.is_estimated else answer.reported_tokens
        self.instruments.record_tokens(usage.input_tokens, inputs, usage.output_tokens, outputs)

    def record_lost_attempt(self, request: ChatRequest, cost_usd: float) -> None:
        """The cost of an upstream attempt whose answer was lost (`AttemptLog.lose`): on
        the cost metric with the calls', not on the call's span nor as a request."""
        self.instruments.cost.add(cost_usd, request.tenant, request.model)

    # --- a batch's items ----------------------------------------------------------------

    def record_batch_item(self, *, status_code: int, model: str, tenant: str) -> None:
        """One item of a batch ended with `status_code` (0: answered). `model` must be
        one the gateway serves, or "" (a caller's unknown names are unbounded)."""
        self.instruments.batch_items.add(1, status_code, model, tenant)

    def mark_failed_batch_item(
        self, *, index: int, item_id: str, status_code: int, error_type: str, model: str | None
    ) -> None:
        """An event on the batch's span for its item `index` that failed, and one more in
        the span's count of them: the span's own status is its RPC's, OK."""
        span = current_span() if self.records_spans else trace.INVALID_SPAN
        if not span.is_recording():
            return
        attributes: dict[str, AttributeValue] = {
            attr.BATCH_ITEM_INDEX: index,
            attr.BATCH_ITEM_ID: item_id,
            attr.RPC_GRPC_STATUS_CODE: status_code,
            attr.ERROR_TYPE: error_type,
        }
        if model is not None:
            attributes[attr.GEN_AI_REQUEST_MODEL] = model
        span.add_event(attr.BATCH_ITEM_FAILED, attributes)
        scope = CURRENT_RPC.get()
        if scope is not None and scope.span is span:  # set with the rest as the span ends
            failed = scope.attributes
            failed[attr.BATCH_FAILED_ITEMS] = failed.get(attr.BATCH_FAILED_ITEMS, 0) + 1

    # --- hooks for the cache, retry loop and breaker -----------------------------------

    def record_cache_hit(self, *, model: str = "") -> None:
        """One answer served from the cache."""
        self.instruments.cache_hits.add(1, model)

    def record_retry(
        self, upstream: str, *, wait_s: float | None = None, is_failover: bool = False
    ) -> None:
        """One upstream attempt is being retried after `wait_s`: on `upstream` again, or
        on another (`is_failover`)."""
        kind = "failover" if is_failover else "retry"
        self.instruments.retries.add(1, {attr.UPSTREAM: upstream, attr.RETRY_KIND: kind})
        span = current_span()
        if wait_s is not None and span.is_recording():
            span.add_event(
                "llm_gateway.retry",
                {
                    attr.UPSTREAM: upstream,
                    attr.RETRY_KIND: kind,
                    attr.RETRY_WAIT_MS: wait_s * 1000.0,
                },
            )

    def waited_on_upstream(self, seconds: float) -> None:
        """The call waited `seconds` before an attempt on an upstream's account (a retry's
        backoff, its Retry-After): upstream time, not the gateway's overhead."""
        scope = CURRENT_RPC.get()
        if scope is not None:
            scope.waited(seconds)

    def record_upstream_error(self, upstream: str, error_type: str) -> None:
        """One upstream attempt failed with `error_type`."""
        self.instruments.upstream_errors.add(
            1, {attr.UPSTREAM: upstream, attr.ERROR_TYPE: error_type}
        )

    def record_attempt(
        self, upstream: str, *, is_success: bool, is_callers_cut: bool = False
    ) -> None:
        """One upstream attempt ended: a success, a failure, or cut by its caller
        (cancelled, or its deadline passed), which is no failure of the upstream's."""
        outcome = "success" if is_success else "cancelled" if is_callers_cut else "failure"
        self.instruments.attempts.add(1, upstream, outcome)

    def set_breaker_state(self, upstream: str, state: str, *, model: str | None = None) -> None:
        """The breaker of `upstream` (of `model` there, the upstream's name of it, when
        given) is now `state` (closed, half_open or open)."""
        attributes = {attr.UPSTREAM: upstream}
        if model is not None:
            attributes[attr.UPSTREAM_MODEL] = model
        self.instruments.breaker_state.set(BREAKER_STATES[state], attributes)


_SUMMED = (
    attr.GEN_AI_USAGE_INPUT_TOKENS,
    attr.GEN_AI_USAGE_OUTPUT_TOKENS,
    attr.CACHED_INPUT_TOKENS,
    attr.REASONING_TOKENS,
    attr.ATTEMPTS,
)


# What a batch's or a summary's span names only when every one of its calls had the same.
_SHARED_BY_CALLS = (attr.GEN_AI_REQUEST_MODEL, attr.GEN_AI_RESPONSE_MODEL, attr.UPSTREAM)


def _merge_calls(attributes: dict[str, Any], earlier: dict[str, Any]) -> None:
    """A call of a multi-call RPC (`RpcScope.is_multi_call`) after its earlier ones (whose
    attributes are `earlier`): the span names a model or an upstream only while every
    call had the same (a batch's items may each name their own; the last one's named none
    of the others), is a cache hit only if each call was one, and coalesced only if each
    call was a hit or coalesced, not all hits: the RPC made no upstream call of its own,
    but shared one."""
    is_hit = attributes[attr.CACHE_HIT] and earlier[attr.CACHE_HIT]
    is_served = _is_served_by_cache(attributes) and _is_served_by_cache(earlier)
    attributes[attr.CACHE_HIT] = is_hit
    if is_served and not is_hit:
        attributes[attr.CACHE_COALESCED] = True
    else:
        attributes.pop(attr.CACHE_COALESCED, None)
        earlier.pop(attr.CACHE_COALESCED, None)
    for key in _SHARED_BY_CALLS:
        if earlier.get(key) != attributes[key]:  # absent: an earlier pair already differed
            del attributes[key]
            earlier.pop(key, None)


def _is_served_by_cache(attributes: Mapping[str, Any]) -> bool:
    """Whether the call (or calls) these span attributes describe made no upstream call
    of their own: a hit, or coalesced."""
    return bool(attributes[attr.CACHE_HIT] or attributes.get(attr.CACHE_COALESCED, False))


def _add_usage(attributes: dict[str, Any], earlier: Mapping[str, Any]) -> None:
    """Add the usage and cost of the RPC's earlier calls (`earlier`) into `attributes`."""
    for key in _SUMMED:
        attributes[key] += earlier[key]
    # In integer pico-dollars, as the ledger and the summaries sum: a float sum drifts.
    cost_pico = to_pico(attributes[attr.COST_USD]) + to_pico(earlier[attr.COST_USD])
    attributes[attr.COST_USD] = cost_pico / PICO
    attributes[attr.USAGE_ESTIMATED] = (
        attributes[attr.USAGE_ESTIMATED] or earlier[attr.USAGE_ESTIMATED]
    )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


_DEFAULT_PORTS = {"https": 443, "http": 80}


@functools.lru_cache(maxsize=256)
def _endpoint(base_url: str, upstream: str) -> tuple[str, int | None, str]:
    """Host, port and `gen_ai.provider.name` of an upstream, parsed once per base URL."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    return host, port, attr.provider_name(host, upstream)


_active = Telemetry.disabled()


def active() -> Telemetry:
    """The telemetry of the running server (a no-op one when none is installed)."""
    return _active


def activate(telemetry: Telemetry) -> Telemetry:
    """Install `telemetry` process-wide and return the one it replaces."""
    global _active
    previous, _active = _active, telemetry
    return previous


def record_cache_hit(*, model: str = "") -> None:
    """One answer served from the cache."""
    _active.record_cache_hit(model=model)


def record_retry(upstream: str, *, wait_s: float | None = None, is_failover: bool = False) -> None:
    """One upstream attempt is being retried after `wait_s` seconds, on another upstream
    when `is_failover`."""
    _active.record_retry(upstream, wait_s=wait_s, is_failover=is_failover)


def record_upstream_error(upstream: str, error_type: str) -> None:
    """One upstream attempt failed (already counted by every attempt span)."""
    _active.record_upstream_error(upstream, error_type)


def set_breaker_state(upstream: str, state: str, *, model: str | None = None) -> None:
    """The breaker of `upstream` (of `model` there, when given) is now `closed`,
    `half_open` or `open`."""
    _active.set_breaker_state(upstream, state, model=model)
