"""The gRPC servicer: Protobuf ⇄ domain types, and nothing else.

Every handler converts the request, calls the pipeline, and converts the answer.
Errors are raised as `GatewayError`s and mapped to statuses in one place,
`service.rpc_boundary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.auth import check_model_allowed
from service.batch import BatchItem, BatchTotals, ItemOutcome, check_batch, run_batch
from service.breaker import BreakerState
from service.caller_gate import (
    caller_may_read_all_usage,
    completion_tokens,
    current_pacer,
    current_principal,
    current_tenant,
)
from service.clock import Deadline
from service.config import RequestDefaults, is_model_name, is_tenant_name
from service.domain import (
    MAX_TOOL_CALLS_PER_MESSAGE,
    CacheMode,
    CachePolicy,
    ChatRequest,
    Completion,
    Delta,
    FinishReason,
    GenerationParams,
    Message,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    TruncationMode,
    Usage,
)
from service.errors import (
    INTERNAL_ERROR_REASON,
    FieldViolation,
    InvalidRequest,
    PermissionDenied,
    to_rpc_status,
)
from service.ledger import UsageFilter, UsageRow, total_of
from service.pipeline import REPEATABLE_MAX_BYTES, Pipeline, PreparedRequest, RepeatKey
from service.summarize import Summarizer, SummaryRequest
from service.telemetry import (
    active,
    add_rpc_queued_ms,
    mark_multi_call_rpc,
    ms_since_rpc_start,
    rpc_queued_ms,
)
from service.telemetry.tracing import timed_from_arrival
from service.usage_pages import (
    page_size_of,
    page_size_violations,
    page_token,
    position_of,
    rows_after,
)
from service.validation import (
    MAX_TOOLS,
    chat_request_violations,
    label_violations,
    model_violations,
    too_many_labels,
    too_many_messages,
    too_many_stop_sequences,
    too_many_tool_calls,
    too_many_tools,
    unknown_role,
)

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_TOOL_CHOICE_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: None,
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.UNKNOWN: pb.FINISH_REASON_STOP,  # the contract has no better value
}
_CACHE_MODES = {
    pb.CACHE_MODE_UNSPECIFIED: None,
    pb.CACHE_MODE_DEFAULT: CacheMode.DEFAULT,
    pb.CACHE_MODE_BYPASS: CacheMode.BYPASS,
    pb.CACHE_MODE_REFRESH: CacheMode.REFRESH,
    pb.CACHE_MODE_NO_STORE: CacheMode.NO_STORE,
}
_TRUNCATION = {
    pb.TRUNCATION_MODE_UNSPECIFIED: None,
    pb.TRUNCATION_MODE_NONE: TruncationMode.NONE,
    pb.TRUNCATION_MODE_KEEP_RECENT: TruncationMode.KEEP_RECENT,
}
_RESPONSE_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: None,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}
_REASONING_EFFORTS = {
    pb.REASONING_EFFORT_UNSPECIFIED: None,
    pb.REASONING_EFFORT_NONE: ReasoningEffort.NONE,
    pb.REASONING_EFFORT_MINIMAL: ReasoningEffort.MINIMAL,
    pb.REASONING_EFFORT_LOW: ReasoningEffort.LOW,
    pb.REASONING_EFFORT_MEDIUM: ReasoningEffort.MEDIUM,
    pb.REASONING_EFFORT_HIGH: ReasoningEffort.HIGH,
    pb.REASONING_EFFORT_XHIGH: ReasoningEffort.XHIGH,
    pb.REASONING_EFFORT_MAX: ReasoningEffort.MAX,
}

_HEALTH = {
    BreakerState.CLOSED: pb.UPSTREAM_HEALTH_HEALTHY,
    BreakerState.HALF_OPEN: pb.UPSTREAM_HEALTH_PROBING,
    BreakerState.OPEN: pb.UPSTREAM_HEALTH_UNHEALTHY,
}

AnyCompleteRequest = pb.CompleteRequest | pb.CompleteStreamRequest
# A batch's items are converted this many messages (and tools) to a turn of the event
# loop, about what one request may hold (`defaults.max_messages`).
_MESSAGES_A_TURN = 1000


_Key = TypeVar("_Key")
_Value = TypeVar("_Value")

_NO_PARAMS = GenerationParams()
_NO_CACHE_POLICY = CachePolicy()
_NO_TOOL_CHOICE = ToolChoice()


def params_from_proto(
    params: pb.GenerationParams, *, max_stop: int | None = None
) -> GenerationParams:
    """Generation parameters; unset proto3 optionals stay None. With `max_stop`, only
    that many stop sequences are converted (the caller refuses the rest by their count)."""
    if params.ByteSize() == 0:
        return _NO_PARAMS  # nothing set: one shared value instead of seven field reads
    return GenerationParams(
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        stop=tuple(params.stop[:max_stop]),
        seed=params.seed if params.HasField("seed") else None,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else None,
        frequency_penalty=(
            params.frequency_penalty if params.HasField("frequency_penalty") else None
        ),
        response_format=_response_format_from_proto(params.response_format),
        reasoning_effort=_REASONING_EFFORTS.get(params.reasoning_effort),
    )


def _response_format_from_proto(message: pb.ResponseFormat) -> ResponseFormat | None:
    """The response format; None when unset. A schema given without its type is kept,
    as TEXT, for validation to refuse (an unknown type is refused on the wire). Fields
    only a newer contract has leave it unset: sent as TEXT, a server that takes no
    `response_format` would refuse the call (`ListFields` lists only the known ones)."""
    kind = _RESPONSE_FORMATS.get(message.type)
    if kind is None and not message.ListFields():
        return None
    return ResponseFormat(
        type=kind or ResponseFormatType.TEXT,
        json_schema=message.json_schema,
        schema_name=message.schema_name,
        is_strict=message.strict,
    )


def labels_from_proto(
    wire: Mapping[str, str], limits: RequestDefaults | None, violations: list[FieldViolation]
) -> dict[str, str]:
    """A request's labels. With `limits`, labels past the number they allow are refused
    by their count (added to `violations`) and not converted: 4 MB hold 400,000."""
    if not wire:  # most requests: `dict` of an empty map field still runs Mapping's methods
        return {}
    if limits is None or len(wire) <= limits.max_labels:
        return dict(wire)
    violations.append(too_many_labels(len(wire), limits))
    return dict(itertools.islice(wire.items(), limits.max_labels))


def _known(
    table: Mapping[_Key, _Value],
    value: _Key,
    violations: list[FieldViolation],
    field: str,
    what: str,
) -> _Value | None:
    """`table`'s entry for an enum's wire `value`; a value it lacks (proto3 enums are
    open: any number arrives) is a violation of `field` ("unknown `what`"), and None."""
    if value not in table:
        violations.append(FieldViolation(field, f"unknown {what}"))
        return None
    return table[value]


def chat_request_from_proto(
    message: AnyCompleteRequest, *, tenant: str, limits: RequestDefaults | None = None
) -> tuple[ChatRequest, list[FieldViolation]]:
    """The domain request, and violations only visible on the wire (unknown enums).

    With `limits`, messages, tools, stop sequences and labels past the number they allow
    are refused by their count, and not converted: 4 MB of empty messages are two
    million, seconds of work for a request that is refused anyway.
    """
    violations: list[FieldViolation] = []
    wire_messages: Sequence[pb.Message] = message.messages
    wire_tools: Sequence[pb.Tool] = message.tools
    if limits is not None and len(wire_messages) > limits.max_messages:
        violations.append(too_many_messages(len(wire_messages), limits))
        wire_messages = wire_messages[: limits.max_messages]
    if limits is not None and len(wire_tools) > MAX_TOOLS:
        violations.append(too_many_tools(len(wire_tools)))
        wire_tools = wire_tools[:MAX_TOOLS]
    messages = []
    for index, item in enumerate(wire_messages):
        role = _ROLES.get(item.role)
        if role is None:
            violations.append(unknown_role(index))
            role = Role.USER  # held to no role's rules: `chat_request_violations`
        if item.tool_calls or item.tool_call_id or item.reasoning:
            wire_calls: Sequence[pb.ToolCall] = item.tool_calls
            if len(wire_calls) > MAX_TOOL_CALLS_PER_MESSAGE:  # refused by their count alone
                violations.append(too_many_tool_calls(index, len(wire_calls)))
                wire_calls = wire_calls[:MAX_TOOL_CALLS_PER_MESSAGE]
            calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in wire_calls)
            messages.append(Message(role, item.content, calls, item.tool_call_id, item.reasoning))
        else:
            messages.append(Message(role, item.content))
    # A sub-message the caller did not set holds only defaults: most calls set none, and
    # each one read costs a wrapper object.
    cache = _NO_CACHE_POLICY
    if message.HasField("cache"):
        wire_cache = message.cache
        cache_mode = _known(_CACHE_MODES, wire_cache.mode, violations, "cache.mode", "cache mode")
        if cache_mode is not None or wire_cache.ttl_seconds:
            cache = CachePolicy(mode=cache_mode, ttl_s=wire_cache.ttl_seconds or None)
    params = _NO_PARAMS
    if message.HasField("params"):
        wire_params = message.params
        max_stop = None
        stop_count = len(wire_params.stop)
        if limits is not None and stop_count > limits.max_stop_sequences:
            violations.append(too_many_stop_sequences(stop_count, limits))
            max_stop = limits.max_stop_sequences
        format_type, effort = wire_params.response_format.type, wire_params.reasoning_effort
        _known(
            _RESPONSE_FORMATS,
            format_type,
            violations,
            "params.response_format.type",
            "response format type",
        )
        _known(
            _REASONING_EFFORTS, effort, violations, "params.reasoning_effort", "reasoning effort"
        )
        params = params_from_proto(wire_params, max_stop=max_stop)
    truncation = None
    if message.HasField("truncation"):
        truncation = _known(
            _TRUNCATION, message.truncation.mode, violations, "truncation.mode", "truncation mode"
        )
    tool_choice = _NO_TOOL_CHOICE
    if message.HasField("tool_choice"):
        wire_choice = message.tool_choice
        mode = _known(
            _TOOL_CHOICE_MODES, wire_choice.mode, violations, "tool_choice.mode", "tool choice mode"
        )
        tool_choice = ToolChoice(mode, wire_choice.function_name)
    # `labels_from_proto` only for labels sent: a frame on every call, most of which send none.
    wire_labels = message.labels
    labels = labels_from_proto(wire_labels, limits, violations) if wire_labels else {}
    request = ChatRequest(
        model=message.model,
        messages=tuple(messages),
        params=params,
        cache=cache,
        truncation=truncation,
        labels=labels,
        idempotency_key=message.idempotency_key,
        tenant=tenant,
        tools=tuple(Tool(t.name, t.description, t.parameters) for t in wire_tools)
        if wire_tools
        else (),
        tool_choice=tool_choice,
    )
    return request, violations


def usage_to_proto(usage: Usage) -> pb.Usage:
    """Token counts on the wire."""
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        estimated=usage.is_estimated,
        reasoning_tokens=usage.reasoning_tokens,
    )


def metadata_to_proto(completion: Completion) -> pb.CompletionMetadata:
    """Everything about a completion but its text."""
    metadata = pb.CompletionMetadata()
    _fill_metadata(metadata, completion)
    return metadata


def _finish_reason_to_proto(completion: Completion) -> pb.FinishReason.ValueType:
    """The finish reason a caller sees. One the gateway does not know says STOP, but
    TOOL_CALLS when the answer called tools: an agent loop waits for that to run them."""
    if completion.finish_reason is FinishReason.UNKNOWN and completion.tool_calls:
        return pb.FINISH_REASON_TOOL_CALLS
    return _FINISH[completion.finish_reason]


def _fill_metadata(target: pb.CompletionMetadata, completion: Completion) -> None:
    """Write a completion's metadata into `target`, the message a response already holds.

    Setting fields in place takes half the time of building `Usage`, `Timings` and the
    metadata as separate messages and copying each into its parent; every field is
    assigned, even when zero, so every submessage is present as before.
    """
    target.id = completion.id
    target.model = completion.model
    finish_reason = completion.finish_reason
    if finish_reason is FinishReason.UNKNOWN:  # the rare case in its own frame
        target.finish_reason = _finish_reason_to_proto(completion)
    else:
        target.finish_reason = _FINISH[finish_reason]
    usage = completion.usage
    target.usage.input_tokens = usage.input_tokens
    target.usage.output_tokens = usage.output_tokens
    target.usage.cached_input_tokens = usage.cached_input_tokens
    target.usage.estimated = usage.is_estimated
    target.usage.reasoning_tokens = usage.reasoning_tokens
    target.cost_usd = completion.cost_usd
    target.saved_cost_usd = completion.saved_cost_usd
    target.cache_hit = completion.is_cache_hit
    target.upstream = completion.upstream
    target.attempts = completion.attempts
    timings = completion.timings
    target.timings.total_ms = timings.total_ms
    target.timings.upstream_ms = timings.upstream_ms
    target.timings.time_to_first_token_ms = timings.time_to_first_token_ms
    target.timings.queued_ms = timings.queued_ms
    target.dropped_messages = completion.dropped_messages


def item_timed_from_arrival(timings: pb.Timings) -> None:
    """Count a batch item's `timings` (from the batch's start) from the call's arrival: a
    batch queued for admission (`server.max_queued_calls`) kept each item waiting with it,
    in its total, its time to first token and its queued time, as `timed_from_arrival`
    counts a single call's."""
    admission_ms = rpc_queued_ms()  # 0 for most calls: none queued
    if admission_ms > 0:
        timings.total_ms += admission_ms
        if timings.time_to_first_token_ms:
            timings.time_to_first_token_ms += admission_ms
        timings.queued_ms += admission_ms


def wall_ms_from_arrival(wall_ms: float) -> float:
    """A batch's `wall_ms` (from when its items started) counted from the call's arrival,
    as its items' timings are (`item_timed_from_arrival`): a batch queued for admission
    kept its caller waiting too, and its wall time is never less than one item's total."""
    elapsed_ms = ms_since_rpc_start()
    return wall_ms if elapsed_ms is None else max(wall_ms, elapsed_ms)


def response_to_proto(completion: Completion) -> pb.CompleteResponse:
    """A unary response."""
    response = pb.CompleteResponse(content=completion.content)
    if completion.reasoning:
        response.reasoning = completion.reasoning
    _fill_metadata(response.metadata, completion)
    for call in completion.tool_calls:
        response.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
    return response


# The events that end a streaming method's messages: CompleteStream's and CompleteBatch's.
_LAST_EVENTS = frozenset({"final", "summary"})


def is_last_message(message: pb.CompleteStreamResponse | pb.CompleteBatchResponse) -> bool:
    """Whether `message` is its stream's last: a CompleteStream's final, a batch's summary."""
    return message.WhichOneof("event") in _LAST_EVENTS


def stream_final_to_proto(completion: Completion) -> pb.CompleteStreamResponse:
    """A stream's last message: the completion's metadata."""
    message = pb.CompleteStreamResponse()
    _fill_metadata(message.final, completion)
    return message


# Callers' gRPC clients take 4 MiB a message by default, and one upstream event may hold
# up to 16 MiB: a longer delta goes out in pieces of at most this many characters (2 MiB
# of UTF-8 at most), one field each, in the order the caller appends them.
DELTA_PIECE_CHARS = 512 * 1024


def delta_chars(delta: Delta) -> int:
    """The characters a delta's message carries: its calls' ids and names too, as one
    event may begin thousands of calls."""
    chars = len(delta.content) + len(delta.reasoning)
    if delta.tool_calls:
        chars += sum(
            len(call.id) + len(call.name) + len(call.arguments) for call in delta.tool_calls
        )
    return chars


def long_delta_to_proto(delta: Delta) -> Iterator[pb.CompleteStreamResponse]:
    """A delta over `DELTA_PIECE_CHARS` as several messages that append to the same."""
    for piece in _pieces(delta.reasoning):
        yield stream_delta_to_proto("", reasoning=piece)
    for piece in _pieces(delta.content):
        yield stream_delta_to_proto(piece)
    for call in delta.tool_calls:
        first = ToolCallDelta(call.index, call.id, call.name, call.arguments[:DELTA_PIECE_CHARS])
        yield stream_delta_to_proto("", (first,))
        for piece in _pieces(call.arguments[DELTA_PIECE_CHARS:]):
            yield stream_delta_to_proto("", (ToolCallDelta(call.index, arguments=piece),))


def _pieces(text: str) -> list[str]:
    return [text[at : at + DELTA_PIECE_CHARS] for at in range(0, len(text), DELTA_PIECE_CHARS)]


def stream_delta_to_proto(
    content: str, tool_calls: tuple[ToolCallDelta, ...] = (), reasoning: str = ""
) -> pb.CompleteStreamResponse:
    """One streamed piece of text, reasoning or tool calls (assigned in place: a stream
    sends hundreds of these)."""
    message = pb.CompleteStreamResponse()
    message.delta.content = content
    if reasoning:
        message.delta.reasoning = reasoning
    for piece in tool_calls:
        message.delta.tool_calls.add(
            index=piece.index, id=piece.id, name=piece.name, arguments=piece.arguments
        )
    return message


def upstream_status_to_proto(
    pipeline: Pipeline, upstream: str, *, model: str, shows_load: bool
) -> pb.UpstreamStatus:
    """An upstream's circuit-breaker health for `model` (its own breaker's and the model's
    there) and, if `shows_load`, its calls in flight."""
    state, in_flight = pipeline.pool.health(upstream, model)
    return pb.UpstreamStatus(
        name=upstream, health=_HEALTH[state], in_flight=in_flight if shows_load else 0
    )


def deadline_of(context: grpc.aio.ServicerContext[object, object]) -> Deadline:
    """The caller's deadline, read once."""
    return Deadline.after(context.time_remaining())


def repeat_key_of(message: pb.CompleteRequest, *, tenant: str) -> RepeatKey | None:
    """The tenant and the request's exact bytes, by which `Pipeline.repeat` knows a
    request sent again; None for a message too long to be worth remembering."""
    # `ByteSize` encodes the message as serializing does: encode once and measure that.
    # Only a map's order can differ between two encodings of one message, so only a
    # request with labels pays for the deterministic (sorted) one.
    if message.labels:
        data = message.SerializeToString(deterministic=True)
    else:
        data = message.SerializeToString()
    return (tenant, data) if len(data) <= REPEATABLE_MAX_BYTES else None


def tenant_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """The tenant the caller gate authenticated for this call ("default" without auth)."""
    return current_tenant()


def _record_item(
    outcome: ItemOutcome, request: ChatRequest, status_code: int, served: Mapping[str, object]
) -> None:
    """Count a batch's item that ended with `status_code` (0: answered), and mark one that
    failed on the batch's span: the RPC itself ends OK. The metric names only a model
    the gateway serves; the span's event names the caller's, as its result does."""
    model = request.model
    telemetry = active()
    telemetry.record_batch_item(
        status_code=status_code, model=model if model in served else "", tenant=request.tenant
    )
    if status_code:
        telemetry.mark_failed_batch_item(
            index=outcome.index,
            item_id=outcome.id,
            status_code=status_code,
            error_type=getattr(outcome.error, "reason", INTERNAL_ERROR_REASON),
            model=model if is_model_name(model) else None,
        )


def caller_is_admin(context: grpc.aio.ServicerContext[object, object]) -> bool:
    """Whether the caller may read other tenants' usage: an admin tenant, or auth off."""
    return caller_may_read_all_usage()


def _tenant_concurrency() -> int | None:
    """The caller's tenant's `max_concurrent_calls`, if it has one.

    Each upstream call of a batch or a summary takes one of the tenant's call slots as
    it starts (`BatchPacer`): more at once than the cap would only wait in line.
    """
    principal = current_principal()
    return (principal.limits.max_concurrent_calls or None) if principal is not None else None


ALL_TENANTS = "*"
# A GetUsage page stops short of this many bytes of rows, whatever its page_size asks:
# with its total and token it fits gRPC's default 4 MiB receive limit, which grpcurl and
# most clients keep (a row may carry 32 labels of 256 characters: 1,000 are ~10 MB).
MAX_USAGE_PAGE_BYTES = 3 * 1024 * 1024
# What a row adds to the page beside its own bytes: its field's tag and length prefix.
_ROW_FRAMING_BYTES = 6


def usage_row_to_proto(row: UsageRow) -> pb.UsageRow:
    """One ledger row."""
    return pb.UsageRow(
        tenant=row.tenant,
        model=row.model,
        upstream=row.upstream,
        labels=dict(row.labels),
        requests=row.requests,
        usage=pb.Usage(
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cached_input_tokens=row.cached_input_tokens,
            reasoning_tokens=row.reasoning_tokens,
            estimated=row.estimated_requests > 0,
        ),
        cost_usd=row.cost_usd,
        estimated_requests=row.estimated_requests,
        cache_hits=row.cache_hits,
        saved_cost_usd=row.saved_cost_usd,
    )


def usage_page_to_proto(
    rows: Sequence[UsageRow], *, page_size: int
) -> tuple[list[pb.UsageRow], bool]:
    """The first of `rows` as a page: at most `page_size` of them and about
    `MAX_USAGE_PAGE_BYTES` (never none while any is left); and whether rows are left."""
    page: list[pb.UsageRow] = []
    page_bytes = 0
    for row in itertools.islice(rows, page_size):
        message = usage_row_to_proto(row)
        page_bytes += message.ByteSize() + _ROW_FRAMING_BYTES
        if page and page_bytes > MAX_USAGE_PAGE_BYTES:
            break
        page.append(message)
    return page, len(page) < len(rows)


def usage_filter_from_proto(
    request: pb.GetUsageRequest, *, tenant: str | None, limits: RequestDefaults
) -> UsageFilter:
    """The ledger filter of a GetUsage request (`tenant` already authorised).

    Raises:
        InvalidRequest: a tenant, model or label no call could have been recorded with
            (held to the rules a call's are), a window bound is not a valid Timestamp,
            the window ends before it starts, or `page_size` is negative (checked here
            so that one answer names every field wrong).
    """
    violations: list[FieldViolation] = []
    # Each would match no row: an OK with no rows would read as "no usage".
    if request.tenant not in ("", ALL_TENANTS) and not is_tenant_name(request.tenant):
        violations.append(FieldViolation("tenant", "must be *, or 1-128 of A-Z a-z 0-9 _ . - @ :"))
    if request.model:
        violations.extend(model_violations(request.model))
    violations.extend(label_violations(request.labels, limits, is_filter=True))
    start_s = _epoch_s(request, "start_time", violations)
    end_s = _epoch_s(request, "end_time", violations)
    # Swapped bounds match nothing: an OK with no rows would read as "no usage".
    if start_s is not None and end_s is not None and end_s < start_s:
        violations.append(FieldViolation("end_time", "must not be before start_time"))
    violations.extend(page_size_violations(request.page_size))
    if violations:
        raise InvalidRequest(violations)
    return UsageFilter(
        tenant=tenant,
        model=request.model or None,
        labels=dict(request.labels),
        start_s=start_s,
        end_s=end_s,
    )


def _epoch_s(
    request: pb.GetUsageRequest,
    name: Literal["start_time", "end_time"],
    violations: list[FieldViolation],
) -> float | None:
    if not request.HasField(name):
        return None
    try:
        return float(getattr(request, name).ToMicroseconds() / 1e6)
    except ValueError:  # seconds outside years 1-9999, or nanos outside 0-999,999,999
        violations.append(FieldViolation(name, "must be a valid Timestamp (years 1 to 9999)"))
        return None


@dataclass(frozen=True, slots=True)
class _Checked:
    """What `CompletionServicer.check` found for the call's message, for its handler."""

    message: object
    prepared: PreparedRequest | None  # None: bytes prepared lately (`prepared_before`)
    repeat_key: RepeatKey | None
    summary: SummaryRequest | None = None  # a Summarize's request, validated


# Set by `check` in the call's own task, read by its handler (each RPC runs in a task).
_checked: contextvars.ContextVar[_Checked | None] = contextvars.ContextVar("checked", default=None)


def _checked_for(message: object) -> _Checked | None:
    """What `check` found for `message`, if it checked this very message in this call."""
    checked = _checked.get()
    return checked if checked is not None and checked.message is message else None


def _sent_tokens(
    message: pb.CompleteRequest | pb.CompleteStreamRequest, prepared: PreparedRequest
) -> int | None:
    """The tokens `tokens_per_minute` counts for the messages of `message` that `prepared`
    kept, when truncation dropped some; else None (the request's own count stands)."""
    if not prepared.dropped:
        return None
    # The kept messages are the very objects converted from `message`'s, in order.
    kept = iter(prepared.request.messages)
    next_kept = next(kept, None)
    sent = []
    for proto, converted in zip(message.messages, prepared.asked.messages, strict=True):
        if converted is next_kept:
            sent.append(proto)
            next_kept = next(kept, None)
    return completion_tokens(message, sent)


def _paced_tokens(message: pb.CompleteRequest, prepared: PreparedRequest) -> int:
    """The tokens `tokens_per_minute` counts for a batch item's `message` as `prepared`."""
    sent = _sent_tokens(message, prepared)
    return completion_tokens(message) if sent is None else sent


class CompletionServicer(pb_grpc.CompletionServiceServicer):
    """Implements `llmgateway.v1.CompletionService` on top of a `Pipeline`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._limits = pipeline.limits  # read for every call's request; fixed with the config
        self._summarizer = Summarizer(pipeline, pipeline.config.summarize)

    def check(self, message: object) -> int | None:
        """Raise what a call would be refused with before any upstream call: an invalid
        field, an unknown model, a prompt over the window (see `CallerGate.admit`); return
        the tokens its tenant's `tokens_per_minute` counts when truncation dropped turns
        (what is sent), else None.

        What it prepares is kept for the call's handler (`_checked`), which would
        otherwise convert and prepare the same message again; bytes that this tenant sent
        and the pipeline prepared lately are not checked again (a cache hit, the caller
        sending the same request again).
        """
        pipeline = self._pipeline
        if isinstance(message, pb.CompleteRequest):
            repeat_key = (
                repeat_key_of(message, tenant=current_tenant()) if pipeline.takes_repeats else None
            )
            known = None if repeat_key is None else pipeline.prepared_before(repeat_key)
            if known is not None:
                _checked.set(_Checked(message, None, repeat_key))
                return _sent_tokens(message, known)
            prepared = pipeline.prepare(self._request(message))
            _checked.set(_Checked(message, prepared, repeat_key))
            return _sent_tokens(message, prepared)
        if isinstance(message, pb.CompleteStreamRequest):
            prepared = pipeline.prepare(self._request(message))
            _checked.set(_Checked(message, prepared, None))
            return _sent_tokens(message, prepared)
        if isinstance(message, pb.SummarizeRequest):
            summary = self._summary_request(message)
            self._summarizer.validate(summary)
            _checked.set(_Checked(message, None, None, summary))
        elif isinstance(message, pb.CompleteBatchRequest):
            # The batch as a whole only: each item's own problems fail that item alone.
            check_batch(message.items, message.concurrency, pipeline.config.batch)
        return None

    def _summary_request(self, request: pb.SummarizeRequest) -> SummaryRequest:
        """The call's domain request; an unknown effort is a violation `validate` reports."""
        effort = request.reasoning_effort
        violations: list[FieldViolation] = []
        if effort not in _REASONING_EFFORTS:
            violations.append(FieldViolation("reasoning_effort", "unknown reasoning effort"))
        labels = labels_from_proto(request.labels, self._pipeline.limits, violations)
        return SummaryRequest(
            model=request.model,
            document=request.document,
            target_tokens=request.target_tokens or None,
            instructions=request.instructions,
            labels=labels,
            tenant=current_tenant(),
            reasoning_effort=_REASONING_EFFORTS.get(effort),
            violations=tuple(violations),
        )

    def _request(self, message: AnyCompleteRequest) -> ChatRequest:
        """The call's domain request, or `InvalidRequest` with every violation."""
        limits = self._limits
        request, violations = chat_request_from_proto(
            message, tenant=current_tenant(), limits=limits
        )
        if violations:
            raise InvalidRequest(chat_request_violations(request, limits, prior=violations))
        return request

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CompleteResponse:
        # `_checked_for`, `tenant_of` and `deadline_of` written out: a frame each, every call.
        pipeline = self._pipeline
        checked = _checked.get()
        prepared = None
        if checked is not None and checked.message is request:
            repeat_key, prepared = checked.repeat_key, checked.prepared
        elif pipeline.takes_repeats:
            repeat_key = repeat_key_of(request, tenant=current_tenant())
        else:
            repeat_key = None
        completion = None if repeat_key is None else await pipeline.repeat(repeat_key)
        if completion is None:
            completion = await pipeline.complete(
                prepared or self._request(request),
                deadline=Deadline.after(context.time_remaining()),
                repeat_key=repeat_key,
            )
        response = response_to_proto(completion)
        timed_from_arrival(response.metadata.timings)
        return response

    async def CompleteStream(
        self,
        request: pb.CompleteStreamRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        checked = _checked_for(request)
        prepared = checked.prepared if checked is not None else None
        # Closed here, not by the garbage collector, however this generator ends.
        events = self._pipeline.stream(
            prepared or self._request(request), deadline=deadline_of(context)
        )
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Completion):
                    final = stream_final_to_proto(event)
                    timed_from_arrival(final.final.timings)
                    yield final
                elif delta_chars(event) <= DELTA_PIECE_CHARS:
                    yield stream_delta_to_proto(event.content, event.tool_calls, event.reasoning)
                else:
                    for message in long_delta_to_proto(event):
                        yield message

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListModelsResponse:
        models = []
        prices = self._pipeline.prices
        caller = current_principal()
        # Calls in flight are every tenant's together: a tenant that may not read the
        # others' usage must not watch their load either. Health is everyone's to see,
        # since callers choose by it.
        shows_load = caller_may_read_all_usage()
        for name, routes in sorted(self._pipeline.pool.models.items()):
            if caller is not None and not caller.limits.allows_model(name):
                continue  # a tenant sees only the models it may use
            price = prices.price(name)
            pricing = pb.Pricing()
            if price is not None:
                pricing = pb.Pricing(
                    input_usd_per_million=price.input_usd_per_million,
                    output_usd_per_million=price.output_usd_per_million,
                )
                if price.cached_input_usd_per_million is not None:
                    pricing.cached_input_usd_per_million = price.cached_input_usd_per_million
            models.append(
                pb.ModelInfo(
                    name=name,
                    context_window=self._pipeline.context_window(name),
                    pricing=pricing,
                    upstreams=[
                        upstream_status_to_proto(
                            self._pipeline, r.client.name, model=name, shows_load=shows_load
                        )
                        for r in routes
                    ],
                )
            )
        return pb.ListModelsResponse(models=models)

    async def CompleteBatch(
        self,
        request: pb.CompleteBatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.CompleteBatchResponse]:
        mark_multi_call_rpc()
        tenant = tenant_of(context)
        principal = current_principal()
        pacer = current_pacer()
        # Before any item is read: a batch far over `max_items` would take seconds.
        concurrency = check_batch(request.items, request.concurrency, self._pipeline.config.batch)
        items = []
        converted = 0  # messages and tools converted since the event loop last turned
        for item in request.items:
            if converted >= _MESSAGES_A_TURN:
                # 4 MB of items hold a million messages: seconds of work, every other
                # call on the gateway stalled, were they converted in one go.
                converted = 0
                await asyncio.sleep(0)
            converted += len(item.request.messages) + len(item.request.tools)
            chat, violations = chat_request_from_proto(
                item.request, tenant=tenant, limits=self._pipeline.limits
            )
            refusal = None
            if principal is not None:
                try:
                    check_model_allowed(principal, item.request.model)
                except PermissionDenied as exc:
                    refusal = exc
            # Estimated as it starts, once prepared: an item refused on the wire (a million
            # messages past `max_messages`) or by its checks (a prompt past
            # `max_request_bytes`) takes no tokens, and estimating it whole would hold the
            # event loop for up to a second.
            tokens = functools.partial(_paced_tokens, item.request)
            items.append(BatchItem(item.id, chat, tuple(violations), refusal, tokens))
        results = run_batch(
            self._pipeline,
            items,
            concurrency=min(concurrency, _tenant_concurrency() or concurrency),
            deadline=deadline_of(context),
            pace=None if pacer is None else pacer.turn,
        )
        served = self._pipeline.pool.models
        async with contextlib.aclosing(results):
            async for event in results:
                if isinstance(event, BatchTotals):
                    yield pb.CompleteBatchResponse(
                        summary=pb.BatchSummary(
                            succeeded=event.succeeded,
                            failed=event.failed,
                            usage=usage_to_proto(event.usage),
                            cost_usd=event.cost_usd,
                            wall_ms=wall_ms_from_arrival(event.wall_ms),
                        )
                    )
                elif event.completion is not None:
                    _record_item(event, items[event.index].request, 0, served)
                    response = response_to_proto(event.completion)
                    item_timed_from_arrival(response.metadata.timings)
                    add_rpc_queued_ms(response.metadata.timings.queued_ms)
                    yield pb.CompleteBatchResponse(
                        result=pb.BatchItemResult(id=event.id, index=event.index, response=response)
                    )
                else:
                    error = event.error or RuntimeError()
                    status = to_rpc_status(error)
                    _record_item(event, items[event.index].request, status.code, served)
                    yield pb.CompleteBatchResponse(
                        result=pb.BatchItemResult(id=event.id, index=event.index, error=status)
                    )

    async def Summarize(
        self, request: pb.SummarizeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SummarizeResponse:
        mark_multi_call_rpc()
        checked = _checked_for(request)
        validated = checked.summary if checked is not None else None
        summary = await self._summarizer.summarize(
            validated or self._summary_request(request),
            deadline=deadline_of(context),
            max_concurrency=_tenant_concurrency(),
            validated=validated is not None,
        )
        response = pb.SummarizeResponse(
            summary=summary.summary,
            chunks=summary.chunks,
            levels=summary.levels,
            usage=usage_to_proto(summary.usage),
            cost_usd=summary.cost_usd,
            upstream_calls=summary.upstream_calls,
            timings=pb.Timings(
                total_ms=summary.timings.total_ms,
                upstream_ms=summary.timings.upstream_ms,
                queued_ms=summary.timings.queued_ms,
            ),
            finish_reason=_FINISH[summary.finish_reason],
            parts_cut=summary.parts_cut,
        )
        timed_from_arrival(response.timings)
        return response

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetUsageResponse:
        caller = tenant_of(context)
        wanted = request.tenant or caller
        if wanted != caller and not caller_is_admin(context):
            raise PermissionDenied(f"tenant {caller!r} may only read its own usage")
        query = usage_filter_from_proto(
            request,
            tenant=None if wanted == ALL_TENANTS else wanted,
            limits=self._pipeline.limits,
        )
        # Refused before the ledger is read: a token for another query reads nothing.
        position = position_of(request.page_token, query)
        rows = await self._pipeline.ledger.query(query)
        later = rows_after(rows, position)
        page, has_more = usage_page_to_proto(later, page_size=page_size_of(request.page_size))
        response = pb.GetUsageResponse(rows=page, total=usage_row_to_proto(total_of(rows)))
        if has_more:
            response.next_page_token = page_token(query, later[len(page) - 1].dims())
        return response
