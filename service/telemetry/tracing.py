"""Span names, attributes and the per-RPC scope.

Attribute names follow the OpenTelemetry GenAI and RPC semantic conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/,
https://opentelemetry.io/docs/specs/semconv/rpc/grpc/); the gateway's own live under
`llm_gateway.`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import Span

from service.clock import covered_s
from service.domain import Message, Role, ToolCall

# GenAI semantic conventions.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# RPC semantic conventions.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

# The gateway's own.
COST_USD = "llm_gateway.cost.usd"
CACHE_HIT = "llm_gateway.cache.hit"
CACHE_COALESCED = "llm_gateway.cache.coalesced"
ATTEMPT = "llm_gateway.attempt"
ATTEMPTS = "llm_gateway.attempts"
UPSTREAM = "llm_gateway.upstream"
UPSTREAM_MODEL = "llm_gateway.upstream.model"
TIME_TO_FIRST_TOKEN_MS = "llm_gateway.time_to_first_token_ms"
QUEUED_MS = "llm_gateway.queued_ms"
RETRY_WAIT_MS = "llm_gateway.retry.wait_ms"
# `retry` (the failed upstream tried again) or `failover` (another upstream tried next).
RETRY_KIND = "llm_gateway.retry.kind"
CACHED_INPUT_TOKENS = "llm_gateway.usage.cached_input_tokens"
REASONING_TOKENS = "llm_gateway.usage.reasoning_tokens"
REASONING_EFFORT = "llm_gateway.request.reasoning_effort"
USAGE_ESTIMATED = "llm_gateway.usage.estimated"
TENANT = "llm_gateway.tenant"
OVERHEAD_MS = "llm_gateway.overhead_ms"
OUTCOME = "llm_gateway.outcome"
CACHE_RESULT = "llm_gateway.cache.result"
CACHE_DIRECTION = "llm_gateway.cache.direction"
STORE = "llm_gateway.store"
# A batch's failed items: how many on its span, and an event for each.
BATCH_FAILED_ITEMS = "llm_gateway.batch.failed_items"
BATCH_ITEM_FAILED = "llm_gateway.batch.item_failed"
BATCH_ITEM_INDEX = "llm_gateway.batch.item.index"
BATCH_ITEM_ID = "llm_gateway.batch.item.id"

OPERATION_CHAT = "chat"
# The most characters of a name an upstream's answer gives (`gen_ai.response.model`,
# `gen_ai.response.id`) a span or a metric point keeps: the upstream's to write, it may
# be of megabytes, and a collector refuses an export past its message size (4 MiB by
# default). On a cumulative histogram's point that export is refused every interval,
# every metric with it, for as long as the process runs. Real names are far shorter.
MOST_ANSWER_NAME_CHARS = 256
# The `error.type` of a call or attempt its caller cut: cancelled, or its deadline passed.
CANCELLED = "cancelled"
OVERHEAD_TRAILER = "llm-gateway-overhead-ms"

# gRPC codes a server span reports as errors (the rest are the caller's doing).
SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})

# Well-known provider hosts; anything else is named by its configured upstream name.
_PROVIDERS = {
    "api.openai.com": "openai",
    "api.deepseek.com": "deepseek",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistral_ai",
    "api.groq.com": "groq",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "generativelanguage.googleapis.com": "gcp.gemini",  # Gemini's OpenAI-compatible API
}
# Providers serving each customer under a host of its own: Azure OpenAI's resources
# (`<resource>.openai.azure.com`), the conventions' `azure.ai.openai` whatever the
# upstream is called.
_PROVIDER_DOMAINS = ((".openai.azure.com", "azure.ai.openai"),)


def provider_name(host: str, upstream: str) -> str:
    """`gen_ai.provider.name` for an upstream host, falling back to its configured name."""
    if known := _PROVIDERS.get(host):
        return known
    for domain, provider in _PROVIDER_DOMAINS:
        if host.endswith(domain):
            return provider
    return upstream


def error_type(exc: BaseException) -> str:
    """A low-cardinality `error.type`: the HTTP status when there is one, else the class."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return str(status)
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return CANCELLED
    return type(exc).__name__


def messages_json(messages: Iterable[Message]) -> str:
    """Messages in the GenAI conventions' `gen_ai.input.messages` shape: text, the tool
    calls an assistant message made, and a tool message's result."""
    messages = tuple(messages)
    return _dumps(lambda parse: [_message_parts(m, parse) for m in messages])


def output_json(content: str, finish_reason: str, tool_calls: Sequence[ToolCall] = ()) -> str:
    """A completion in the GenAI conventions' `gen_ai.output.messages` shape."""

    def build(parse: bool) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "content": content}] if content else []
        parts.extend(_tool_call_part(call, parse) for call in tool_calls)
        if not parts:
            parts.append({"type": "text", "content": ""})
        return [{"role": "assistant", "parts": parts, "finish_reason": finish_reason}]

    return _dumps(build)


def _dumps(build: Callable[[bool], object]) -> str:
    """`build(True)` as JSON, tool-call arguments parsed; when they nest deeper than the
    encoder recurses, `build(False)`, arguments as text: a caller's or a model's text
    must not fail its call."""
    try:
        return json.dumps(build(True))
    except RecursionError:
        return json.dumps(build(False))


def _message_parts(message: Message, parse: bool) -> dict[str, Any]:
    if message.role is Role.TOOL:
        part = {
            "type": "tool_call_response",
            "id": message.tool_call_id,
            "response": message.content,
        }
        return {"role": str(message.role), "parts": [part]}
    parts: list[dict[str, Any]] = []
    if message.content or not message.tool_calls:
        parts.append({"type": "text", "content": message.content})
    parts.extend(_tool_call_part(call, parse) for call in message.tool_calls)
    return {"role": str(message.role), "parts": parts}


def _tool_call_part(call: ToolCall, parse: bool) -> dict[str, Any]:
    """A tool call as the conventions record it: its arguments as JSON when `parse` and
    they parse, else as the model wrote them."""
    arguments: object = call.arguments
    if parse:
        with contextlib.suppress(ValueError, RecursionError):  # not JSON, or nested too deep
            arguments = json.loads(call.arguments)
    return {"type": "tool_call", "id": call.id, "name": call.name, "arguments": arguments}


@dataclass(slots=True)
class RpcScope:
    """One RPC as the boundary measures it: its span, its status and its upstream time."""

    span: Span
    method: str
    # Whether `span` records, asked once: it does until the RPC's end ends it, and the
    # tenant and the end asked it again on every RPC (the no-op span too).
    is_recording: bool = False
    started: float = field(default_factory=time.perf_counter)
    # Its waits on upstreams, (start, end) on perf_counter: a batch's or a summary's
    # calls overlap, and a moment two of them waited is waited once.
    upstream_waits: list[tuple[float, float]] = field(default_factory=list)
    # Its wait in the server's admission queue (`server.max_queued_calls`), if it queued.
    queued_s: float = 0.0
    # Whether it makes several upstream calls (a batch, a summary): its span sums their
    # usage, and one call's time to first token or queued time would mis-state it.
    is_multi_call: bool = False
    status_code: int = 0
    error_type: str | None = None
    # Attributes for the span, set in one call when it ends: each `set_attribute(s)`
    # call takes the span's lock and validates on its own.
    attributes: dict[str, Any] = field(default_factory=dict)

    def fail(self, *, status_code: int, error_type: str) -> None:
        """Record the status the call is about to end with."""
        self.status_code = status_code
        self.error_type = error_type

    def elapsed_s(self) -> float:
        """Seconds since the RPC started."""
        return time.perf_counter() - self.started

    def waited(self, seconds: float) -> None:
        """A wait on an upstream of `seconds` that ended now."""
        end = time.perf_counter()
        self.upstream_waits.append((end - seconds, end))

    @property
    def upstream_s(self) -> float:
        """Time spent waiting on upstreams, overlapping waits counted once."""
        return covered_s(self.upstream_waits) if self.upstream_waits else 0.0  # a hit: none

    def overhead_s(self, elapsed_s: float | None = None) -> float:
        """Time not spent waiting on an upstream (never negative: a wait reported as a
        duration is placed as ending when it is reported, a little after it ended), of
        `elapsed_s` when given (the RPC's `elapsed_s()` just read), else of now."""
        # `elapsed_s()` and `upstream_s` written out: every RPC asks twice (its trailer,
        # its end), a frame each time.
        # So are `max` and, for the one wait of most calls, `covered_s`.
        elapsed = time.perf_counter() - self.started if elapsed_s is None else elapsed_s
        waits = self.upstream_waits
        if waits:
            if waits[1:]:  # a batch's or a summary's calls, overlapping
                elapsed -= covered_s(waits)
            else:
                start, end = waits[0]
                elapsed -= end - start
        return elapsed if elapsed > 0.0 else 0.0

    def set_tenant(self, tenant: str) -> None:
        """Name the tenant the caller was authenticated as (the tenant id, never a key)."""
        if self.is_recording:
            self.attributes[TENANT] = tenant

    def trailers(self) -> Sequence[tuple[str, str]]:
        """The `llm-gateway-overhead-ms` trailer."""
        return ((OVERHEAD_TRAILER, f"{self.overhead_s() * 1000.0:.3f}"),)


CURRENT_RPC: contextvars.ContextVar[RpcScope | None] = contextvars.ContextVar(
    "llm_gateway_rpc", default=None
)


def ms_since_rpc_start() -> float | None:
    """Milliseconds since the current RPC reached the gateway (None outside one)."""
    scope = CURRENT_RPC.get()
    return None if scope is None else scope.elapsed_s() * 1000.0


class ResponseTimings(Protocol):
    """A response's timings as the proto carries them (`llmgateway.v1.Timings`)."""

    total_ms: float
    time_to_first_token_ms: float
    queued_ms: float


def timed_from_arrival(timings: ResponseTimings) -> None:
    """Count a response's `timings` from the call's arrival at the gateway, not from where
    the pipeline took it up: a call queued for admission (`server.max_queued_calls`) waited
    before, and its caller waited with it, that wait counted as queued too. The RPC span's
    time to first token and queued time say the same.

    Here, beside the RPC's scope, rather than through `ms_since_rpc_start` and
    `rpc_queued_ms`: every unary response and stream's end comes here, a frame each. The
    span's figures are set where its completion set them, and its queued time on a
    batch's or summary's span too, which none sets.
    """
    scope = CURRENT_RPC.get()
    if scope is None:
        return
    attributes = scope.attributes
    elapsed_ms = (time.perf_counter() - scope.started) * 1000.0
    before_ms = elapsed_ms - timings.total_ms
    if before_ms > 0:
        timings.total_ms = elapsed_ms
        if timings.time_to_first_token_ms:
            timings.time_to_first_token_ms += before_ms
            if TIME_TO_FIRST_TOKEN_MS in attributes:  # where its completion set one
                attributes[TIME_TO_FIRST_TOKEN_MS] = timings.time_to_first_token_ms
        # 0 for most calls: none queued.
        timings.queued_ms += min(scope.queued_s * 1000.0, before_ms)
    # Even when it did not queue for admission: a summary's span has none of its calls'.
    if QUEUED_MS in attributes or scope.is_multi_call:
        attributes[QUEUED_MS] = timings.queued_ms


def rpc_queued_ms() -> float:
    """Milliseconds the current RPC waited in the server's admission queue (0 outside one)."""
    scope = CURRENT_RPC.get()
    return 0.0 if scope is None else scope.queued_s * 1000.0


def mark_multi_call_rpc() -> None:
    """Mark the current RPC as one that makes several upstream calls (`CompleteBatch`,
    `Summarize`): its span gets the RPC's queued time (`timed_from_arrival`,
    `add_rpc_queued_ms`) and no time to first token: one call's would say nothing of it,
    and each call has its own attempt span."""
    scope = CURRENT_RPC.get()
    if scope is not None:
        scope.is_multi_call = True


def add_rpc_queued_ms(ms: float) -> None:
    """Add `ms` to the current RPC's queued time on its span: a batch's is the sum of its
    items' (each as its result reports it), as its tokens and cost are."""
    scope = CURRENT_RPC.get()
    if scope is not None and scope.is_recording:
        scope.attributes[QUEUED_MS] = scope.attributes.get(QUEUED_MS, 0.0) + ms
