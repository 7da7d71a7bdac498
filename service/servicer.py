"""The gRPC servicer: Protobuf ⇄ domain types, and nothing else.

Every handler converts the request, calls the pipeline, and converts the answer.
Errors are raised as `GatewayError`s and mapped to statuses in one place,
`service.rpc_boundary`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.caller_gate import current_principal, current_tenant
from service.clock import Deadline
from service.domain import (
    CacheMode,
    CachePolicy,
    ChatRequest,
    Completion,
    FinishReason,
    GenerationParams,
    Message,
    Role,
    TruncationMode,
)
from service.errors import FieldViolation, InvalidRequest, NotImplementedYet
from service.pipeline import Pipeline
from service.validation import chat_request_violations

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
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

AnyCompleteRequest = pb.CompleteRequest | pb.CompleteStreamRequest


def params_from_proto(params: pb.GenerationParams) -> GenerationParams:
    """Generation parameters; unset proto3 optionals stay None."""
    return GenerationParams(
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else None,
        frequency_penalty=(
            params.frequency_penalty if params.HasField("frequency_penalty") else None
        ),
    )


def chat_request_from_proto(
    message: AnyCompleteRequest, *, tenant: str
) -> tuple[ChatRequest, list[FieldViolation]]:
    """The domain request, and violations only visible on the wire (unknown enums)."""
    violations: list[FieldViolation] = []
    messages = []
    for index, item in enumerate(message.messages):
        role = _ROLES.get(item.role)
        if role is None:
            violations.append(
                FieldViolation(
                    f"messages[{index}].role",
                    "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                )
            )
            role = Role.USER
        messages.append(Message(role, item.content))
    cache_mode = _CACHE_MODES.get(message.cache.mode)
    if message.cache.mode not in _CACHE_MODES:
        violations.append(FieldViolation("cache.mode", "unknown cache mode"))
    truncation = _TRUNCATION.get(message.truncation.mode)
    if message.truncation.mode not in _TRUNCATION:
        violations.append(FieldViolation("truncation.mode", "unknown truncation mode"))
    request = ChatRequest(
        model=message.model,
        messages=tuple(messages),
        params=params_from_proto(message.params),
        cache=CachePolicy(mode=cache_mode, ttl_s=message.cache.ttl_seconds or None),
        truncation=truncation,
        labels=dict(message.labels),
        idempotency_key=message.idempotency_key,
        tenant=tenant,
    )
    return request, violations


def metadata_to_proto(completion: Completion) -> pb.CompletionMetadata:
    """Everything about a completion but its text."""
    usage = completion.usage
    timings = completion.timings
    return pb.CompletionMetadata(
        id=completion.id,
        model=completion.model,
        finish_reason=_FINISH[completion.finish_reason],
        usage=pb.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            estimated=usage.is_estimated,
        ),
        cost_usd=completion.cost_usd,
        saved_cost_usd=completion.saved_cost_usd,
        cache_hit=completion.is_cache_hit,
        upstream=completion.upstream,
        attempts=completion.attempts,
        timings=pb.Timings(
            total_ms=timings.total_ms,
            upstream_ms=timings.upstream_ms,
            time_to_first_token_ms=timings.time_to_first_token_ms,
        ),
        dropped_messages=completion.dropped_messages,
    )


def response_to_proto(completion: Completion) -> pb.CompleteResponse:
    """A unary response."""
    return pb.CompleteResponse(content=completion.content, metadata=metadata_to_proto(completion))


def deadline_of(context: grpc.aio.ServicerContext[object, object]) -> Deadline:
    """The caller's deadline, read once."""
    return Deadline.after(context.time_remaining())


def tenant_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """The tenant the caller gate authenticated for this call ("default" without auth)."""
    return current_tenant()


class CompletionServicer(pb_grpc.CompletionServiceServicer):
    """Implements `llmgateway.v1.CompletionService` on top of a `Pipeline`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def _request(
        self, message: AnyCompleteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> ChatRequest:
        request, violations = chat_request_from_proto(message, tenant=tenant_of(context))
        if violations:
            raise InvalidRequest(
                violations + chat_request_violations(request, self._pipeline.limits)
            )
        return request

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CompleteResponse:
        completion = await self._pipeline.complete(
            self._request(request, context), deadline=deadline_of(context)
        )
        return response_to_proto(completion)

    async def CompleteStream(
        self,
        request: pb.CompleteStreamRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        chat = self._request(request, context)
        async for event in self._pipeline.stream(chat, deadline=deadline_of(context)):
            if isinstance(event, Completion):
                yield pb.CompleteStreamResponse(final=metadata_to_proto(event))
            else:
                yield pb.CompleteStreamResponse(delta=pb.Delta(content=event.content))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListModelsResponse:
        models = []
        prices = self._pipeline.prices
        caller = current_principal()
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
                    context_window=prices.context_window(name, 0),
                    pricing=pricing,
                    upstreams=[
                        pb.UpstreamStatus(name=route.client.name, health=pb.UPSTREAM_HEALTH_HEALTHY)
                        for route in routes
                    ],
                )
            )
        return pb.ListModelsResponse(models=models)

    async def CompleteBatch(
        self,
        request: pb.CompleteBatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.CompleteBatchResponse]:
        raise NotImplementedYet("CompleteBatch is not offered yet")
        yield pb.CompleteBatchResponse()  # pragma: no cover - makes this a generator

    async def Summarize(
        self, request: pb.SummarizeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SummarizeResponse:
        raise NotImplementedYet("Summarize is not offered yet")

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetUsageResponse:
        raise NotImplementedYet("GetUsage is not offered yet")
