"""The OpenAI chat-completions JSON shape, in both directions.

https://platform.openai.com/docs/api-reference/chat — the only module that knows it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from service.domain import (
    ChatRequest,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    Usage,
)
from service.upstream.types import StreamEnd, TextChunk

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,  # OpenAI's deprecated functions
    # Other servers' spellings: llama.cpp and vLLM (eos, max_tokens), Hugging Face TGI
    # (eos_token, stop_sequence), Mistral (model_length: the context window ran out),
    # and Anthropic-style reasons relayed by proxies (end_turn, stop_sequence, tool_use).
    "eos": FinishReason.STOP,
    "eos_token": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "end_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_length": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
}
# Finish reasons that say the generation failed part-way: the text is no answer (never
# cached; retried before any text reached the caller, an interrupted stream after).
_FAILED_FINISH_REASONS = frozenset(
    {
        "error",  # OpenRouter, watsonx
        "insufficient_system_resource",  # DeepSeek: cut short for lack of capacity
        "abort",  # vLLM: the request was aborted
    }
)
_DONE = "[DONE]"  # the data of a stream's last event
# Far beyond any real call (no model takes a billion-token prompt); priced even at
# $2,000 a million tokens, one call stays within the ledgers' int64 pico-dollar counters.
_MAX_TOKEN_COUNT = 2**32


# OpenAI requires a schema's name; callers may leave it out.
DEFAULT_SCHEMA_NAME = "response"


class MalformedReply(ValueError):
    """The upstream's JSON is not a chat completion."""


def request_body(request: ChatRequest, *, upstream_model: str, stream: bool) -> bytes:
    """Serialise `request` as an OpenAI chat-completions body for one upstream."""
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [{"role": m.role.value, "content": m.content} for m in request.messages],
    }
    params = request.params
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty is not None:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty is not None:
        body["frequency_penalty"] = params.frequency_penalty
    if params.response_format is not None:
        body["response_format"] = _response_format(params.response_format)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _response_format(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.type is not ResponseFormatType.JSON_SCHEMA:
        return {"type": response_format.type.value}
    json_schema: dict[str, Any] = {
        "name": response_format.schema_name or DEFAULT_SCHEMA_NAME,
        # Validated as a JSON object, and sent as the caller wrote it.
        "schema": orjson.Fragment(response_format.json_schema),
    }
    if response_format.is_strict:
        json_schema["strict"] = True
    return {"type": "json_schema", "json_schema": json_schema}


def finish_reason(value: object) -> FinishReason | None:
    """Map an upstream finish reason; any other non-empty value is `UNKNOWN`.

    A reason that says the generation failed (`_FAILED_FINISH_REASONS`) raises: the text
    so far is no answer.
    """
    if not value:
        return None
    if isinstance(value, str):
        known = _FINISH_REASONS.get(value)
        if known is not None:
            return known
        if value in _FAILED_FINISH_REASONS:
            raise MalformedReply(f"the upstream reported an error (finish reason {value!r})")
    return FinishReason.UNKNOWN


def usage(data: object) -> Usage | None:
    """Parse an OpenAI `usage` object, or None when absent or not to be believed."""
    if not isinstance(data, dict):
        return None
    if data.get("prompt_tokens") is None and data.get("completion_tokens") is None:
        return None  # `{}`: no counts at all, so estimated (and flagged), not free
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    # Counts that are not integers, negative (billed as credits) or past any real call
    # count as none: the answer stands, estimated. Failing it would have it retried, and
    # billed twice.
    try:
        counts = Usage(
            input_tokens=int(data.get("prompt_tokens") or 0),
            output_tokens=int(data.get("completion_tokens") or 0),
            cached_input_tokens=int(cached or 0),
        )
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(
        0 <= n <= _MAX_TOKEN_COUNT
        for n in (counts.input_tokens, counts.output_tokens, counts.cached_input_tokens)
    ):
        return None
    if counts.cached_input_tokens > counts.input_tokens:
        # Cached input is part of the input: reported as priced (`pricing.cost_usd`).
        counts = replace(counts, cached_input_tokens=counts.input_tokens)
    return counts


def _loads(raw: bytes | str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedReply("not valid JSON") from exc
    if not isinstance(data, dict):
        raise MalformedReply("not a JSON object")
    return data


def parse_completion(raw: bytes) -> tuple[str, str, str, FinishReason, Usage | None]:
    """Parse a unary answer into (id, model, content, finish reason, usage)."""
    data = _loads(raw)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedReply("no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        raise MalformedReply("message content is not a string")
    reason = finish_reason(choices[0].get("finish_reason"))
    if reason is None:
        raise MalformedReply("no finish reason")
    return (
        str(data.get("id") or ""),
        str(data.get("model") or ""),
        content or "",
        reason,
        usage(data.get("usage")),
    )


class StreamParser:
    """Turns the data of each SSE event into text chunks and, at the end, a `StreamEnd`."""

    __slots__ = ("finish_reason", "id", "is_done", "model", "usage")

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.is_done = False

    def parse(self, data: str) -> TextChunk | None:
        """Parse one event; return its text, if any. `[DONE]` marks the end."""
        if data == _DONE:
            self.is_done = True
            return None
        if not data.strip():
            # `data:` alone: the SSE spec dispatches it with empty data, but it carries no
            # chunk (no JSON is blank), and failing the stream on it would cut an answer.
            return None
        event = _loads(data)
        if event.get("error"):  # also beside choices (OpenRouter); `"error": null` is none
            raise MalformedReply("the upstream reported an error mid-stream")
        if not self.id:
            self.id = str(event.get("id") or "")
            self.model = str(event.get("model") or "")
        if event.get("usage"):
            self.usage = usage(event["usage"])
        choices = event.get("choices")
        if not choices:
            return None
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise MalformedReply("choices is not a list of objects")
        choice = choices[0]
        if choice.get("index"):  # another completion's (`n` is never sent): find the answer's
            firsts = [c for c in choices if isinstance(c, dict) and not c.get("index")]
            if not firsts:
                return None
            choice = firsts[0]
        reason = finish_reason(choice.get("finish_reason"))
        if reason is not None:
            self.finish_reason = reason
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if content:
            if not isinstance(content, str):
                raise MalformedReply("delta content is not a string")
            return TextChunk(content)
        return None

    def end_of_body(self, data_at_end: str | None) -> None:
        """Take the event a clean end of the body left without its blank line: only `[DONE]`.

        `data_at_end` is that event's data (`SSEDecoder.data_at_end`). A whole `[DONE]` says
        the upstream finished and only the blank line after it was lost; anything else left
        open (`[DO`, a chunk) stays unread, and the stream counts as cut.
        """
        if data_at_end == _DONE:
            self.is_done = True

    def end(self) -> StreamEnd:
        """The stream's end; raises when it never said why it finished."""
        if self.finish_reason is None:
            raise MalformedReply("the stream ended without a finish reason")
        return StreamEnd(
            id=self.id, model=self.model, finish_reason=self.finish_reason, usage=self.usage
        )


# How OpenAI-compatible servers say a request is over the model's context window, in a
# 400: OpenAI's `code`, llama.cpp's `type`, and the message vLLM, DeepSeek, OpenAI and
# llama.cpp write ("This model's maximum context length is 8192 tokens. However ...",
# "the request exceeds the available context size").
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_PHRASES = ("maximum context length", "context size", "context window", "context length")


def says_context_exceeded(body: bytes) -> bool:
    """Whether an error body says the prompt (with max_tokens) is over the context window."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        if any(error.get(key) in _CONTEXT_CODES for key in ("code", "type")):
            return True
        error = error.get("message")
    # Some servers send the message alone: {"error": "..."}.
    return isinstance(error, str) and any(p in error.lower() for p in _CONTEXT_PHRASES)
