"""The cache key: a hash of a canonical encoding of everything that changes the output.

The encoding is a JSON array in a fixed order (never a dict, so no key order to get
wrong) of: the key format version, the tenant, the model, every message as
`[role, content]` in order, and every generation parameter with unset kept as `null`
(distinct from `0`); a `response_format` of TEXT is keyed as unset, since it asks for
what an unset one does, and a schema named "response" as an unnamed one, which is sent
so. Labels and the idempotency key are left out: they change who is billed and how the
call is retried, not what the model answers.

Tool calling adds to that only where a request uses it, so the keys of every other
request (and the entries stored under them) stay as they were: a message with tool calls,
answering one or carrying reasoning back is
`[role, content, [[id, name, arguments], ...], tool_call_id, reasoning]`, and a
request with tools or a tool choice ends with `[[name, description, parameters], ...]`
and `[mode, function_name]`. Lengths differ, so no two encodings coincide.
"""

from __future__ import annotations

import hashlib

import orjson

from service.domain import DEFAULT_SCHEMA_NAME, ChatRequest, ResponseFormatType

__all__ = ["KEY_FORMAT_VERSION", "cache_key", "canonical_request"]

# Bump when the encoding or the stored entry changes, so old entries are never misread.
KEY_FORMAT_VERSION = 1


def _number(value: float | None) -> float | None:
    # -0.0 and 0.0 sample identically; fold them so they share an entry.
    return None if value is None else value + 0.0


def canonical_request(request: ChatRequest) -> bytes:
    """The canonical bytes of everything in `request` that can change the answer."""
    params = request.params
    sampling: list[object] = [
        _number(params.temperature),
        _number(params.top_p),
        params.max_tokens,
        list(params.stop),
        params.seed,
        _number(params.presence_penalty),
        _number(params.frequency_penalty),
    ]
    response_format = params.response_format
    if response_format is not None and response_format.type is not ResponseFormatType.TEXT:
        # Appended only when set, so the keys of every other request stay as they were;
        # TEXT (which carries no schema, name or strict) shares the unset format's entry.
        name = response_format.schema_name
        sampling.append(
            [
                response_format.type.value,
                response_format.json_schema,
                # An unnamed schema is sent named "response": the same request.
                "" if name == DEFAULT_SCHEMA_NAME else name,
                response_format.is_strict,
            ]
        )
    if params.reasoning_effort is not None:
        # Appended only when set too; a str, so never taken for the format's list.
        sampling.append(params.reasoning_effort.value)
    parts: list[object] = [
        KEY_FORMAT_VERSION,
        request.tenant,
        request.model,
        [
            [
                message.role.value,
                message.content,
                [[call.id, call.name, call.arguments] for call in message.tool_calls],
                message.tool_call_id,
                message.reasoning,
            ]
            if message.tool_calls or message.tool_call_id or message.reasoning
            else [message.role.value, message.content]
            for message in request.messages
        ],
        sampling,
    ]
    choice = request.tool_choice
    if request.tools or choice.is_set:
        parts.append([[tool.name, tool.description, tool.parameters] for tool in request.tools])
        parts.append([None if choice.mode is None else choice.mode.value, choice.function_name])
    return orjson.dumps(parts)


def cache_key(request: ChatRequest, *, prefix: str) -> str:
    """`PREFIX:vN:SHA256` of the canonical request; the tenant is inside the hash."""
    digest = hashlib.sha256(canonical_request(request)).hexdigest()
    return f"{prefix}:v{KEY_FORMAT_VERSION}:{digest}"
