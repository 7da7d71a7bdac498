"""The OpenAI chat-completions JSON shape, in both directions.

https://platform.openai.com/docs/api-reference/chat — the only module that knows it.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, NoReturn

import orjson

from service.domain import (
    DEFAULT_SCHEMA_NAME,
    FOLDED_EVERY,
    MAX_TOKEN_COUNT,
    MAX_TOOL_CALL_FIELD,
    MAX_TOOL_CALLS_PER_MESSAGE,
    ChatRequest,
    FinishReason,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from service.upstream.types import RateLimitHints, StreamEnd, TextChunk, UpstreamReply

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
    # Gemini's, relayed by proxies (in upper case: read without case): its filters.
    "safety": FinishReason.CONTENT_FILTER,
    "recitation": FinishReason.CONTENT_FILTER,
    "blocklist": FinishReason.CONTENT_FILTER,
    "prohibited_content": FinishReason.CONTENT_FILTER,
    "spii": FinishReason.CONTENT_FILTER,
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
# A streamed request's last fields, as `request_body` writes them (after `messages`,
# never the first).
_STREAM_FIELDS = b',"stream":true,"stream_options":{"include_usage":true}}'
# An `extra_body` field that goes only with a request that declares tools: OpenAI refuses
# it in any other ("'parallel_tool_calls' is only allowed when 'tools' are specified").
_TOOLS_SWITCH = "parallel_tool_calls"
# What a tool without parameters sends: some servers refuse a function without them.
_NO_PARAMETERS = orjson.Fragment(b'{"type":"object","properties":{}}')
# What follows system text folded into a user message, as Gemma 3's chat template writes it.
_AFTER_SYSTEM_TEXT = "\n\n"


_NO_HINTS = RateLimitHints()
# The text a choice's message or delta may carry of an answer (besides its tool calls).
_TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")
# The index of tool-call pieces sent without one (Gemini's OpenAI-compatible streams send
# each call whole, with no index): a piece with a new id begins the next call.
_NO_INDEX = -1
# The most argument text held for calls whose id or name has not come, all of them
# together (a bound per call let calls at many indexes each hold as much): past any real
# call's, and a bound on what a broken upstream can make the gateway hold.
_MAX_HELD_CHARS = 16 * 1024 * 1024
# A `\u` escape of a UTF-16 surrogate (U+D800 to U+DFFF), which orjson refuses unpaired.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A UTF-16 surrogate in a string: what the standard library's json makes of one unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Where an answer's tool calls are, and the keys of a call's id and its function's name
# there: a lone UTF-16 half in either is kept as it is parsed, to be refused with the
# call (`_check_id_and_name`), not made U+FFFD, an id or a name the upstream never sent.
_CALL_KEYS = frozenset({"tool_calls", "function_call"})
_CALL_NAME_KEYS = frozenset({"id", "name"})
# What a character cut in two and never made whole becomes, as in invalid UTF-8 (`sse.py`).
_REPLACEMENT = "\ufffd"
# A stream's fields whose text goes on piece by piece: a piece may end with the first half
# of a character the next piece ends (`_paired_ends`).
_STREAMED_TEXT_KEYS = frozenset(
    {"content", "refusal", "reasoning_content", "reasoning", "arguments", "text", "thinking"}
)
# The part types of a `content` given as a list (`_content_parts`) whose text is read.
_TEXT_PART = "text"
_THINKING_PART = "thinking"
# Where a stream's legacy `function_call` pieces are kept among its tool calls: an index no
# upstream's `tool_calls` piece can have (those are 0 or more, or `_NO_INDEX`).
_FUNCTION_CALL_INDEX = -2
# How many skipped part types an error names, and how much of each: the upstream's text.
_MAX_NAMED_PARTS = 4
_MAX_PART_TYPE_CHARS = 32


class MalformedReply(ValueError):
    """The upstream's JSON is not a chat completion."""


class ReportedError(MalformedReply):
    """A stream event that is an `error` object in place of a chunk; `data` is the event's."""

    def __init__(self, data: str) -> None:
        super().__init__("the upstream reported an error mid-stream")
        self.data = data


def request_body(
    request: ChatRequest,
    *,
    upstream_model: str,
    stream: bool,
    extra: Mapping[str, object] | None = None,
    max_tokens_field: str = "max_tokens",
    seed_field: str = "seed",
    json_schema_format: str = "openai",
    reasoning_field: str = "reasoning_content",
    system_messages: Literal["send", "fold", "merge"] = "send",
) -> bytes:
    """Serialise `request` as an OpenAI chat-completions body for one upstream, with the
    upstream's `extra` fields (none of which the request's own fields use, but for a
    `reasoning_effort` the request's own replaces; `parallel_tool_calls` only with tools),
    `params.max_tokens` in the upstream's `max_tokens_field`, `params.seed` in its
    `seed_field`, a JSON Schema format in its `json_schema_format`, an assistant message's
    reasoning in its `reasoning_field`, and its system messages folded into the first
    user message when `system_messages` is `fold` (`with_system_folded`), or merged into
    one when it is `merge` (`with_system_merged`)."""
    messages = request.messages
    if system_messages == "fold":
        messages = with_system_folded(messages)
    elif system_messages == "merge":
        messages = with_system_merged(messages)
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [
            _message_json(m, reasoning_field)
            if m.tool_calls or m.tool_call_id or m.reasoning
            # The role as is: orjson writes an enum's value, without `.value`'s Python call.
            else {"role": m.role, "content": m.content}
            for m in messages
        ],
    }
    if request.tools:
        body["tools"] = [_tool_json(tool) for tool in request.tools]
    if request.tool_choice.is_set:
        body["tool_choice"] = _tool_choice_json(request.tool_choice)
    params = request.params
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.max_tokens is not None:
        body[max_tokens_field] = params.max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body[seed_field] = params.seed
    if params.presence_penalty is not None:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty is not None:
        body["frequency_penalty"] = params.frequency_penalty
    if params.response_format is not None:
        body["response_format"] = _response_format(params.response_format, json_schema_format)
    if extra:
        body.update(extra)
        if not request.tools and _TOOLS_SWITCH in extra:
            del body[_TOOLS_SWITCH]  # OpenAI refuses it without tools (400)
    if params.reasoning_effort is not None:
        # After `extra`: an upstream's `extra_body` may set a default the caller overrides.
        body["reasoning_effort"] = params.reasoning_effort.value
    if not stream:
        return orjson.dumps(body)
    # Last, so that `unary_body` and `body_without_stream_options` cut them off.
    return orjson.dumps(body)[:-1] + _STREAM_FIELDS


def with_system_folded(messages: Sequence[Message]) -> tuple[Message, ...]:
    """`messages` without system messages, their texts (in order, each then a blank line)
    put before the first user message's text, as Gemma 3's chat template puts a system
    message's (`first_user_prefix` of google/gemma-3-4b-it's `chat_template`,
    https://huggingface.co/google/gemma-3-4b-it/blob/main/tokenizer_config.json): for a
    server whose chat format has no system role and drops the message.

    With no user message, the system texts become one, first: an instruction the model
    sees, where dropping it is the silence this exists to end.
    """
    texts = [m.content for m in messages if m.role is Role.SYSTEM]
    if not texts:
        return tuple(messages)
    rest = [m for m in messages if m.role is not Role.SYSTEM]
    for index, message in enumerate(rest):
        if message.role is Role.USER:
            prefix = "".join(text + _AFTER_SYSTEM_TEXT for text in texts)
            rest[index] = replace(message, content=prefix + message.content)
            return tuple(rest)
    return (Message(Role.USER, _AFTER_SYSTEM_TEXT.join(texts)), *rest)


def with_system_merged(messages: Sequence[Message]) -> tuple[Message, ...]:
    """`messages` with their system messages' texts (in order, a blank line between) as one
    system message, first: for a server whose chat format takes only the first system
    message, wherever it is, and drops the others without a word."""
    texts = [m.content for m in messages if m.role is Role.SYSTEM]
    if len(texts) < 2:
        return tuple(messages)
    rest = (m for m in messages if m.role is not Role.SYSTEM)
    return (Message(Role.SYSTEM, _AFTER_SYSTEM_TEXT.join(texts)), *rest)


def unary_body(stream_body: bytes) -> bytes:
    """A streamed request's body (`request_body(stream=True)`) as the same request unary."""
    return _without_stream_fields(stream_body) + b"}"


def body_without_stream_options(stream_body: bytes) -> bytes:
    """A streamed request's body (`request_body(stream=True)`) without its `stream_options`."""
    return _without_stream_fields(stream_body) + b',"stream":true}'


def _without_stream_fields(stream_body: bytes) -> bytes:
    """`stream_body` without its stream fields and the object's end, the rest byte for byte:
    decoded and encoded again, a tool's parameters or a JSON schema had its integers past
    64 bits sent as floats, where `request_body` sends them as the caller wrote them."""
    if not stream_body.endswith(_STREAM_FIELDS):
        raise ValueError("not a body of request_body(stream=True)")
    return stream_body[: -len(_STREAM_FIELDS)]


def _message_json(message: Message, reasoning_field: str) -> dict[str, Any]:
    """A message with tool calls (content null when empty), answering one, or with reasoning."""
    data: dict[str, Any] = {"role": message.role.value, "content": message.content}
    if message.tool_calls:
        data["content"] = message.content or None
        data["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        data["tool_call_id"] = message.tool_call_id
    if message.reasoning:
        data[reasoning_field] = message.reasoning
    return data


def _tool_json(tool: Tool) -> dict[str, Any]:
    """A tool as a function; its parameters (validated as a JSON object) embedded as sent."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = (
        orjson.Fragment(tool.parameters.encode()) if tool.parameters.strip() else _NO_PARAMETERS
    )
    return {"type": "function", "function": function}


def _tool_choice_json(choice: ToolChoice) -> object:
    if choice.function_name:
        return {"type": "function", "function": {"name": choice.function_name}}
    return None if choice.mode is None else choice.mode.value


def _response_format(response_format: ResponseFormat, json_schema_format: str) -> dict[str, Any]:
    if response_format.type is not ResponseFormatType.JSON_SCHEMA:
        return {"type": response_format.type.value}
    if json_schema_format == "json_object_schema":
        # llama-cpp-python's (and Anyscale's) shape: JSON mode held to the schema by a
        # grammar; it has no name and is always strict.
        return {"type": "json_object", "schema": orjson.Fragment(response_format.json_schema)}
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
        value = value.lower()  # Gemini's through a proxy: MAX_TOKENS, SAFETY, STOP
        known = _FINISH_REASONS.get(value)
        if known is not None:
            return known
        if value in _FAILED_FINISH_REASONS:
            raise MalformedReply(f"the upstream reported an error (finish reason {value!r})")
    return FinishReason.UNKNOWN


def _with_tool_calls(reason: FinishReason, *, has_tool_calls: bool) -> FinishReason:
    """An answer that called tools finished as a tool-call answer: OpenAI and vLLM say
    "stop" for a call forced by `tool_choice`, as older Ollama streams do for any call.
    And one that called none is not one: vLLM says "tool_calls" when its parser failed
    to read the calls (the model's text is then the content)."""
    if has_tool_calls and reason is FinishReason.STOP:
        return FinishReason.TOOL_CALLS
    if not has_tool_calls and reason is FinishReason.TOOL_CALLS:
        return FinishReason.STOP
    return reason


def usage(data: object) -> Usage | None:
    """Parse an OpenAI `usage` object, or None when absent or not to be believed."""
    # Parsed JSON's types compared without `isinstance`'s call, as in `parse_completion`.
    if type(data) is not dict:
        return None
    prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
    if prompt is None and completion is None:
        return None  # `{}`: no counts at all, so estimated (and flagged), not free
    # The total is read only where it is needed: most answers give both counts.
    if prompt is None or completion is None:
        prompt, completion = _with_total(prompt, completion, data.get("total_tokens"))
    elif not (prompt and completion) and _is_zero(prompt) != _is_zero(completion):
        # (Two counts that are both true are neither 0: most answers, settled without a call.)
        prompt, completion = _zero_from_total(prompt, completion, data.get("total_tokens"))
    # A count still left out is 0 here and flagged: `Pipeline` estimates it, as it
    # estimates a call with no usage. Billing it as 0 would make the answer free.
    is_partial = prompt is None or completion is None
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    if not cached:
        # DeepSeek's own spelling; resellers relaying it add OpenAI's details, counting
        # none (empty, null or 0), beside it.
        cached = data.get("prompt_cache_hit_tokens", 0)
    # Counts that are not integers, negative (billed as credits) or past any real call
    # count as none: the answer stands, estimated. Failing it would have it retried, and
    # billed twice.
    try:
        counts = Usage(
            # `_count` written out for a count as JSON has it: an int.
            input_tokens=prompt if type(prompt) is int else _count(prompt),
            output_tokens=completion if type(completion) is int else _count(completion),
            cached_input_tokens=_detail_count(cached) if cached else 0,  # 0: most answers
            is_estimated=is_partial,
        )
    except (TypeError, ValueError, OverflowError):
        return None
    if not (
        0 <= counts.input_tokens <= MAX_TOKEN_COUNT and 0 <= counts.output_tokens <= MAX_TOKEN_COUNT
    ):
        return None
    if counts.cached_input_tokens > counts.input_tokens and prompt is not None:
        # Cached input is part of the input: reported as priced (`pricing.cost_usd`).
        counts = replace(counts, cached_input_tokens=counts.input_tokens)
    completion_details = data.get("completion_tokens_details")
    # Else no reasoning count: many servers send no details.
    if type(completion_details) is dict:
        # A count that is not true (absent, null, 0: most) is none: no `_detail_count`.
        said = completion_details.get("reasoning_tokens")
        reasoning = _detail_count(said) if said else 0
        if reasoning and _is_left_out_of_completion(counts, reasoning, data.get("total_tokens")):
            counts = replace(counts, output_tokens=counts.output_tokens + reasoning)
        if 0 < reasoning <= counts.output_tokens:  # else no count that can be part of it
            counts = replace(counts, reasoning_tokens=reasoning)
    return counts


def _is_left_out_of_completion(counts: Usage, reasoning: int, total: object) -> bool:
    """Whether `completion_tokens` leaves out the `reasoning` tokens, which OpenAI's usage
    counts in it: some relays of Gemini (whose own counts keep thoughts apart) do, and
    their `total_tokens` is then the prompt, the completion and the reasoning. The
    provider bills the reasoning as output: billed from `completion_tokens` alone, a
    thinking answer cost a fraction of its price."""
    if not reasoning or counts.is_estimated:
        return False
    try:
        whole = _count(total)
    except TypeError:
        return False
    output = counts.output_tokens + reasoning
    return whole == counts.input_tokens + output and output <= MAX_TOKEN_COUNT


def _joined(earlier: Usage, later: Usage) -> Usage:
    """Two partial usages as one: each count (0: left out) from the later where it has
    one, else from the earlier; estimated while a count is still left out."""
    prompt = later if later.input_tokens else earlier
    output = later if later.output_tokens else earlier
    return Usage(
        input_tokens=prompt.input_tokens,
        output_tokens=output.output_tokens,
        cached_input_tokens=prompt.cached_input_tokens,
        is_estimated=not (prompt.input_tokens and output.output_tokens),
        reasoning_tokens=output.reasoning_tokens,
    )


def _drops_a_count(earlier: Usage, later: Usage) -> bool:
    """Whether `later` has a 0 where `earlier` has a count."""
    return bool(
        (earlier.input_tokens and not later.input_tokens)
        or (earlier.output_tokens and not later.output_tokens)
    )


def _with_total(prompt: object, completion: object, total: object) -> tuple[object, object]:
    """The count left out as `total_tokens` less the other, where both are counts and
    the total holds more than the other; else the counts as they came. A total no larger
    says nothing of the count left out: no call has no prompt, nor an answer no output."""
    known = completion if prompt is None else prompt
    try:
        whole, part = _count(total), _count(known)
    except TypeError:
        return prompt, completion
    if total is None or part >= whole:
        return prompt, completion
    return (whole - part, completion) if prompt is None else (prompt, whole - part)


def _is_zero(count: object) -> bool:
    """Whether a reported count is 0 (`false` is no count)."""
    return count == 0 and not isinstance(count, bool)


def _zero_from_total(prompt: object, completion: object, total: object) -> tuple[object, object]:
    """One count 0 beside the other: as good as none (`Pipeline` estimates it), so the
    total gives it as it gives one left out (`_with_total`); else the counts as they came.
    Without this, a provider sending `prompt_tokens: 0` and its total was billed the
    gateway's estimate, where one leaving the key out was billed its own count."""
    given = _with_total(
        None if _is_zero(prompt) else prompt, None if _is_zero(completion) else completion, total
    )
    return (prompt if given[0] is None else given[0], completion if given[1] is None else given[1])


def _count(value: object) -> int:
    """A token count as JSON has it (absent or null: 0); raises for anything else.

    `int()` alone would take 7.9 as 7, "7" as 7 and `true` as 1.
    """
    if type(value) is int:  # what JSON's counts are, in one test
        return value
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"not a token count: {type(value).__name__}")


def _detail_count(value: object) -> int:
    """A count that details another (cached input), as reported when it can be one, else
    0: only a detail, so a bad one never costs the answer its usage (the input is then
    priced whole, never below the bill)."""
    try:
        count = _count(value)
    except TypeError:
        return 0
    return count if 0 <= count <= MAX_TOKEN_COUNT else 0


def _loads(raw: bytes | str) -> dict[str, Any]:
    """A whole answer's JSON object, each lone UTF-16 half in its strings U+FFFD."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        data = _loads_with_halves(raw, exc)
    if not isinstance(data, dict):
        raise MalformedReply("not a JSON object")
    return data


def _loads_with_halves(
    raw: bytes | str, refusal: orjson.JSONDecodeError, kept_at_ends: Collection[str] = ()
) -> Any:
    """`raw`, which orjson refused (`refusal`), parsed by the standard library's json when it
    escapes a UTF-16 surrogate, its halves paired or U+FFFD but at the ends of strings under
    `kept_at_ends` (`_halves_replaced`); else it is not valid JSON.

    A relay that cuts text by UTF-16 code units (JavaScript's strings: Node proxies) sends an
    emoji, U+1F600, as `"\\ud83d"` at the end of one event and `"\\ude00"` at the start of
    the next: each a lone half, which orjson refuses and json keeps, to be paired again.
    Only such events pay for the slower parser.
    """
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if _SURROGATE_ESCAPE.search(text):
            value = json.loads(text, parse_constant=_refuse_constant)
            return _halves_replaced(value, kept_at_ends)
    # Not UTF-8, not JSON, `_refuse_constant`'s, or nested deeper than json and
    # `_halves_replaced` recurse (some hundreds of levels; orjson refuses past 1024): a
    # malformed answer, retried, as orjson's refusal is, not the gateway's INTERNAL error.
    except (ValueError, RecursionError):
        pass
    raise MalformedReply("not valid JSON") from refusal


def _refuse_constant(name: str) -> NoReturn:
    """Refuse `NaN` and `Infinity`, which json takes and orjson (and JSON) does not."""
    raise ValueError(f"{name} is not JSON")


def _halves_replaced(
    value: Any, kept_at_ends: Collection[str] = (), key: str = "", *, is_in_call: bool = False
) -> Any:
    """Parsed JSON `value` with each lone UTF-16 half in its strings U+FFFD, and each pair of
    halves one character, but for the halves at the ends of a string under a key in
    `kept_at_ends` (`_ends_kept`), and those of a tool call's id or name (`_CALL_KEYS`)."""
    if isinstance(value, str):
        if not _SURROGATE.search(value) or (is_in_call and key in _CALL_NAME_KEYS):
            return value
        return _ends_kept(value) if key in kept_at_ends else _paired(value)
    if isinstance(value, dict):
        return {
            k: _halves_replaced(v, kept_at_ends, k, is_in_call=is_in_call or k in _CALL_KEYS)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_halves_replaced(v, kept_at_ends, key, is_in_call=is_in_call) for v in value]
    return value


def _paired(text: str) -> str:
    """`text` with each pair of UTF-16 halves one character, a half left lone U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _is_high_half(char: str) -> bool:
    """Whether `char` is a UTF-16 high surrogate: the first half of a character past U+FFFF."""
    return "\ud800" <= char <= "\udbff"


def _is_low_half(char: str) -> bool:
    """Whether `char` is a UTF-16 low surrogate: the second half of such a character."""
    return "\udc00" <= char <= "\udfff"


def _ends_kept(text: str) -> str:
    """`_paired(text)`, but for a low half opening it and a high half ending it: kept as they
    are, for a stream to pair with the pieces around it (`_paired_ends`)."""
    start = 1 if _is_low_half(text[0]) else 0
    end = len(text) - 1 if len(text) > start and _is_high_half(text[-1]) else len(text)
    return text[:start] + _paired(text[start:end]) + text[end:]


def _paired_ends(half: str, text: str) -> tuple[str, str]:
    """`text`, a stream field's next piece, after `half`: the high UTF-16 half the field's
    last piece ended with, held back, or "". The pair they make is one character, and
    either half left lone is U+FFFD; the high half `text` ends with is returned apart, to be
    held back for the field's next piece.

    Only the piece's first and last code units are looked at: halves elsewhere were made
    whole or U+FFFD as it was parsed (`_ends_kept`).
    """
    if not text:
        return "", half
    first = text[0] if _is_low_half(text[0]) else ""
    if half or first:
        text = _paired(half + first) + text[len(first) :]
    if _is_high_half(text[-1]):
        return text[:-1], text[-1]
    return text, ""


def is_json_or_cut(body: bytes) -> bool:
    """Whether `body` is JSON, or JSON cut short (it fails only where it ends): what a
    provider sent, if not a chat completion, rather than some other server's page."""
    # Decoded leniently: a body cut in the middle of a character is still cut JSON. The
    # error's position counts characters.
    text = body.decode("utf-8", errors="replace")
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if exc.pos < len(text.rstrip()) and _SURROGATE_ESCAPE.search(text):
            return _is_json_with_halves_or_cut(text)
        return exc.pos >= len(text.rstrip())
    return True


def _is_json_with_halves_or_cut(text: str) -> bool:
    """`is_json_or_cut` for a `text` orjson refused with a UTF-16 half escaped in it, which
    JSON allows and orjson refuses alone (`_loads_with_halves`): a provider's answer that
    has one where it is refused (a tool call's id) was read as some other server's page."""
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text.rstrip())
    except (ValueError, RecursionError):
        return False
    return True


def _tool_calls(data: object) -> tuple[ToolCall, ...]:
    """A unary answer's `message.tool_calls`; absent or null is none."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise MalformedReply("tool_calls is not a list")
    if len(data) > MAX_TOOL_CALLS_PER_MESSAGE:
        raise _too_many_calls()
    calls = []
    for item in data:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise MalformedReply("a tool call has no function object")
        call_id, name = item.get("id"), function.get("name")
        arguments = function.get("arguments")
        if not isinstance(call_id, str) or not call_id:
            raise MalformedReply("a tool call has no id")
        if not isinstance(name, str) or not name:
            raise MalformedReply("a tool call has no function name")
        if arguments is not None and not isinstance(arguments, str):
            raise MalformedReply("tool call arguments are not a string")
        _check_id_and_name(call_id, name)
        calls.append(ToolCall(call_id, name, arguments or ""))
    return tuple(calls)


def _check_id_and_name(call_id: str, name: str) -> None:
    """Raise for a tool call's id or function name its caller could not send back
    (`validation`): past `MAX_TOOL_CALL_FIELD` (a stream's message carrying a broken
    upstream's name of megabytes could pass the 4 MiB its caller's client takes), or not
    printable: a control character (a NUL, a line break, an escape sequence, which would
    reach the caller's logs and the cache too), a zero-width or direction mark, or a lone
    UTF-16 half (no character: protobuf cannot encode it). Dots, spaces and letters of
    any script are printable: a model may call `python.run`, never declared."""
    for what, value in (("id", call_id), ("function name", name)):
        if len(value) > MAX_TOOL_CALL_FIELD:
            raise MalformedReply(
                f"a tool call's {what} is longer than {MAX_TOOL_CALL_FIELD} characters"
            )
        if not value.isprintable():
            raise MalformedReply(
                f"a tool call's {what} has a character that is not printable (a control "
                "or format character, or a lone UTF-16 surrogate)"
            )


def _too_many_calls() -> MalformedReply:
    """The error of an answer making more than `MAX_TOOL_CALLS_PER_MESSAGE` tool calls."""
    return MalformedReply(f"the answer makes more than {MAX_TOOL_CALLS_PER_MESSAGE} tool calls")


def _function_call(data: object) -> ToolCall:
    """A unary answer's legacy `message.function_call` (OpenAI's `functions` API, which some
    servers and proxies still answer in) as a tool call; it has no id, so it gets one."""
    name, arguments = _function_call_fields(data)
    if not name:
        raise MalformedReply("a function call has no function name")
    call_id = _new_call_id()
    _check_id_and_name(call_id, name)
    return ToolCall(call_id, name, arguments or "")


def _function_call_fields(data: object) -> tuple[str | None, str | None]:
    """A legacy `function_call`'s (or one streamed piece's) name and arguments."""
    if not isinstance(data, dict):
        raise MalformedReply("function_call is not an object")
    name, arguments = data.get("name"), data.get("arguments")
    if not isinstance(name, str | None) or not isinstance(arguments, str | None):
        raise MalformedReply("a function call has a field that is not a string")
    return name, arguments


def _new_call_id() -> str:
    """An id for a call the upstream sent without one, in OpenAI's form (`call_` and 24
    characters): the caller sends it back as the `tool_call_id` of the call's result."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class _ContentParts:
    """A `content` given as a list of typed parts: the text of its text parts, that of its
    thinking parts, and the types of the parts it had that are neither (skipped)."""

    text: str
    thinking: str
    skipped: tuple[str, ...]


def _content_parts(value: object) -> _ContentParts:
    """Read a `content` that is not a string: a list of typed parts, as Mistral's reasoning
    models (Magistral, and others with `reasoning_effort`) answer and stream it:
    `[{"type": "thinking", "thinking": [{"type": "text", "text": "..."}]},
    {"type": "text", "text": "Paris."}]` (https://docs.mistral.ai/capabilities/reasoning/).
    Other parts (an image, a reference) are skipped: the caller gets what can be read.
    """
    if not isinstance(value, list):
        raise MalformedReply("content is not a string or a list of parts")
    texts: list[str] = []
    thoughts: list[str] = []
    skipped: list[str] = []
    for part in value:
        if not isinstance(part, dict):
            raise MalformedReply("a content part is not an object")
        kind = part.get("type")
        if kind is None:  # Mistral's text and thinking chunks may leave their type out
            kind = _TEXT_PART if "text" in part else _THINKING_PART if "thinking" in part else ""
        if kind == _TEXT_PART:
            texts.append(_part_text(part))
        elif kind == _THINKING_PART:
            thoughts.append(_thinking_text(part.get("thinking")))
        else:
            skipped.append(str(kind)[:_MAX_PART_TYPE_CHARS])
    return _ContentParts("".join(texts), "".join(thoughts), tuple(skipped))


def _part_text(part: dict[str, Any]) -> str:
    """A text part's text."""
    text = part.get("text")
    if not isinstance(text, str):
        raise MalformedReply("a content part's text is not a string")
    return text


def _thinking_text(value: object) -> str:
    """A thinking part's text: Mistral's is a list of text parts (others skipped); a
    relay's may be the text itself, as Anthropic's thinking blocks have it."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise MalformedReply("a thinking part's thinking is not a list of parts")
    return _content_parts(value).text


def _unreadable(skipped: Collection[str]) -> MalformedReply:
    """The error for an answer whose content parts, of the `skipped` types, hold nothing
    the gateway can relay."""
    kinds = ", ".join(sorted(set(skipped))[:_MAX_NAMED_PARTS])
    return MalformedReply(f"content has no text or thinking part, only: {kinds}")


def _reasoning(message: dict[str, Any]) -> str:
    """A message's or a delta's reasoning: DeepSeek, vLLM and llama.cpp spell it
    `reasoning_content`, OpenRouter and newer vLLM `reasoning`; null or absent is none."""
    value = message.get("reasoning_content")
    if value is None:
        value = message.get("reasoning")
    if value is not None and not isinstance(value, str):
        raise MalformedReply("reasoning is not a string")
    return value or ""


def _refusal(message: dict[str, Any]) -> str:
    """OpenAI's `refusal`: the model declining, for safety, instead of answering (null or
    absent: none). Relayed as the answer's text, finished as a content filter's."""
    value = message.get("refusal")
    if value is not None and not isinstance(value, str):
        raise MalformedReply("refusal is not a string")
    return value or ""


def _choices_by_index(choices: list[Any], part: str) -> dict[int, dict[str, Any]]:
    """An answer's or an event's choices by index (absent or null is 0), the first of each,
    but for those that carry nothing in their `part` (`message`, or a stream's `delta`)."""
    by_index: dict[int, dict[str, Any]] = {}
    for choice in choices:
        if not isinstance(choice, dict):
            raise MalformedReply("choices is not a list of objects")
        if _carries_something(choice, part):
            by_index.setdefault(_index_of(choice), choice)
    return by_index


def _carries_something(choice: dict[str, Any], part: str) -> bool:
    """Whether a choice has a finish reason, or text, tool calls (or a legacy function
    call), a refusal or reasoning in its `part`. One with none is no choice: some proxies
    send an empty `delta` at index 0 beside an answer numbered from 1, which counted as a
    second choice and failed it. An empty list of content parts is no text, as "" is. A
    field of the wrong type counts, to fail as malformed where it is read."""
    if choice.get("finish_reason"):
        return True
    fields = choice.get(part)
    if not isinstance(fields, dict):
        return False
    return (
        fields.get("tool_calls") not in (None, [])
        or fields.get("function_call") is not None
        or any(fields.get(name) not in (None, "", []) for name in _TEXT_FIELDS)
    )


def _index_of(choice: dict[str, Any]) -> int:
    """A choice's index: absent or null is 0."""
    index = choice.get("index") or 0
    if type(index) is not int or index < 0:  # a bool is no index
        raise MalformedReply("a choice has a bad index")
    return index


def _answer_index(indexes: Collection[int]) -> int:
    """Which of an answer's choices is the answer: the one at index 0, else the only one
    (some proxies and batch backends number from 1); several, none at 0, are no answer."""
    if 0 in indexes:
        return 0
    if len(indexes) == 1:
        return next(iter(indexes))
    raise MalformedReply(f"choices at indexes {_listed(indexes)} and none at 0")


def _listed(indexes: Collection[int]) -> str:
    """Indexes as an error message lists them: "1, 2"."""
    return ", ".join(str(index) for index in sorted(indexes))


def _informational(value: object) -> str:
    """An answer's `id` or `model` as the gateway passes it on: "" (not given: the caller
    gets the gateway's own id, and the model asked of the upstream) for one that is not
    printable text. They only inform, unlike a tool call's id the caller sends back (a
    control character there makes the answer malformed), and reach the caller, the cache,
    logs, spans and terminals, where an escape sequence would be written as it came."""
    text = str(value or "")
    return text if text.isprintable() else ""


def parse_completion(
    raw: bytes, *, model: str = "", rate_limits: RateLimitHints = _NO_HINTS, waited_s: float = 0.0
) -> UpstreamReply:
    """Parse a unary answer; `model` names it when the body does not, `rate_limits` are
    what its headers said and `waited_s` how long it took to come."""
    # Parsed JSON holds no subclasses (orjson's, or json's for `_loads_with_halves`): its
    # types are compared by `__class__`, without `isinstance`'s call. `_loads` written out.
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        data = _loads_with_halves(raw, exc)
    if data.__class__ is not dict:
        raise MalformedReply("not a JSON object")
    choices = data.get("choices")
    if choices.__class__ is not list or not choices:
        raise MalformedReply("no choices")
    if len(choices) == 1:  # nearly every answer: the answer, at whatever index
        choice = choices[0]
        if choice.__class__ is not dict:
            raise MalformedReply("choices is not a list of objects")
        # `_index_of` written out: a bad one refused, as among several (absent, null or
        # 0 is 0; a bool is no index).
        index = choice.get("index")
        if index and (index.__class__ is not int or index < 0):
            raise MalformedReply("a choice has a bad index")
    else:
        # Others are other completions' (`n` is never sent), whatever order they are
        # listed in: the answer is picked as a stream's is, so that both relay the same one.
        by_index = _choices_by_index(choices, "message")
        if not by_index:  # only empty choices: none says why it finished
            raise MalformedReply("no finish reason")
        choice = by_index[_answer_index(by_index)]
    message = choice.get("message")
    if message.__class__ is not dict:
        message = {}
    content = message.get("content")
    parts = None
    if content.__class__ is not str and content is not None:
        parts = _content_parts(content)
        content = parts.text
    raw_tool_calls = message.get("tool_calls")
    tool_calls = () if raw_tool_calls is None else _tool_calls(raw_tool_calls)
    # `in`, not `get`: no call for the answers without one. Only without tool calls: some
    # proxies repeat the first tool call as this too.
    if not tool_calls and "function_call" in message and message["function_call"] is not None:
        tool_calls = (_function_call(message["function_call"]),)
    # `_reasoning` only for a message that has either spelling: most have neither.
    has_reasoning = "reasoning_content" in message or "reasoning" in message
    reasoning = _reasoning(message) if has_reasoning else ""
    if parts is not None:
        reasoning += parts.thinking
    # `finish_reason` written out for a reason it knows as spelled: most answers' "stop".
    said = choice.get("finish_reason")
    is_known = said.__class__ is str and said in _FINISH_REASONS
    reason = _FINISH_REASONS[said] if is_known else finish_reason(said)
    if reason is None:
        raise MalformedReply("no finish reason")
    if tool_calls or reason is FinishReason.TOOL_CALLS:  # else nothing to correct
        reason = _with_tool_calls(reason, has_tool_calls=bool(tool_calls))
    refusal = _refusal(message) if "refusal" in message else ""
    if parts is not None and parts.skipped and not (content or reasoning or tool_calls or refusal):
        raise _unreadable(parts.skipped)
    if refusal:  # never an empty "stop" answer, cached and served as if answered
        content, reason = (content or "") + refusal, FinishReason.CONTENT_FILTER
    # `_informational`, inline for a text id and the model asked for: no call more than `str`.
    answer_id = data.get("id")
    if answer_id.__class__ is not str or not answer_id.isprintable():
        answer_id = _informational(answer_id)
    answered = data.get("model")
    if answered.__class__ is not str or (answered != model and not answered.isprintable()):
        answered = _informational(answered)
    return UpstreamReply(
        id=answer_id,
        model=answered or model,
        content=content or "",
        finish_reason=reason,
        usage=usage(data.get("usage")),
        rate_limits=rate_limits,
        tool_calls=tool_calls,
        reasoning=reasoning,
        waited_s=waited_s,
    )


def reported_usage(raw: bytes) -> Usage | None:
    """The usage a whole answer's body reports, for one refused as malformed (more than
    `MAX_TOOL_CALLS_PER_MESSAGE` tool calls, no finish reason, ...): the provider took the
    call and bills what it counted, whatever the gateway made of its answer. None when
    the body is no JSON object, or reports no usage to be believed."""
    try:
        data = _loads(raw)
    except (MalformedReply, ValueError, RecursionError):
        return None
    return usage(data.get("usage"))


@dataclass(slots=True)
class _StreamedCall:
    """A streamed tool call: its position once begun (sent with its id and name), and
    until then what it has so far."""

    id: str = ""
    name: str = ""
    position: int | None = None
    held: list[str] = field(default_factory=list)  # arguments before it began
    held_chars: int = 0
    unfolded: int = 0  # pieces appended to `held` since it was last folded (`FOLDED_EVERY`)
    half: str = ""  # the high UTF-16 half its arguments' last piece ended with (`_paired_ends`)


def _check_begun(call: _StreamedCall) -> None:
    """Raise for a call that never got its name or id (as a unary answer's would)."""
    if call.position is None:
        missing = "function name" if not call.name else "id"
        raise MalformedReply(f"a streamed tool call has no {missing}")


class StreamParser:
    """Turns the data of each SSE event into text chunks and, at the end, a `StreamEnd`.

    Tool-call pieces come out numbered by the order their calls began (whatever indexes
    the upstream used, and a new id at an index already used is a new call), with id and
    name on each call's first piece only. A call begins once it has both: some servers
    (vmlx, some llama.cpp and vLLM versions) send the id, the name and the first arguments
    in separate pieces, so what comes before is held and sent with its first piece.
    """

    __slots__ = (
        "_calls",
        "_calls_opened",
        "_content_half",
        "_has_relayed",
        "_held_chars",
        "_index",
        "_is_pairing",
        "_reasoning_half",
        "_skipped_parts",
        "_tool_calls",
        "finish_reason",
        "id",
        "is_done",
        "is_refused",
        "model",
        "usage",
    )

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.is_done = False
        self.is_refused = False  # a `refusal` came: the stream ends as a content filter's
        self._tool_calls: dict[int, _StreamedCall] = {}  # by the upstream's index
        self._calls = 0  # tool calls begun
        self._calls_opened = 0  # begun or not (`MAX_TOOL_CALLS_PER_MESSAGE`)
        self._held_chars = 0  # the arguments held for calls not begun (`_MAX_HELD_CHARS`)
        self._index: int | None = None  # the answer's choice, once an event named one
        self._has_relayed = False  # text or reasoning of it came out
        # Once an event came with a lone UTF-16 half, each text piece's ends are paired
        # (`_paired_ends`), and the high half a field's piece ends with held for its next.
        self._is_pairing = False
        self._content_half = ""
        self._reasoning_half = ""
        # Types of content parts skipped (`_content_parts`), a few: an answer of only such
        # parts is malformed, not an empty answer.
        self._skipped_parts: set[str] = set()

    def _take_usage(self, counts: Usage | None) -> None:
        """A later usage event replaces an earlier one (servers that send it on each
        chunk count up), unless it is worse: unbelievable, or partial after a whole one.
        Two partial ones add up: adapters of Anthropic's stream report the prompt's count
        as it starts and the output's as it ends. A count of 0 after one that was not
        is no count (a count never goes down): the earlier stands for it, so an all-zero
        usage after whole counts costs none of them."""
        known = self.usage
        if counts is None or (counts.is_estimated and known and not known.is_estimated):
            return
        if known is None or not (counts.is_estimated or _drops_a_count(known, counts)):
            self.usage = counts
        else:
            self.usage = _joined(known, counts)

    def _answer_choice(self, choices: list[Any]) -> dict[str, Any] | None:
        """The answer's choice in an event: the first event with choices picks it as a unary
        answer's is picked; None in an event with only other completions' beside index 0's.
        A stream whose answer is at another index may name no other choice after it, but
        index 0 before anything of the other was taken: then index 0's is the answer.
        Choices that carry nothing (`_carries_something`) neither pick nor name an index."""
        if len(choices) == 1 and self._index is not None:  # nearly every event: one choice
            first = choices[0]
            if isinstance(first, dict) and _index_of(first) == self._index:
                return first
        by_index = _choices_by_index(choices, "delta")
        if not by_index:  # only empty choices, at whatever index: nothing of any answer
            return None
        if self._index is None:
            self._index = _answer_index(by_index)
        elif self._index and 0 in by_index and not self._has_relayed and not self._tool_calls:
            # Another completion's role (or bare finish) came first: nothing of it relayed.
            self._index, self.finish_reason = 0, None
        elif self._index and by_index.keys() != {self._index}:
            others = _listed(by_index.keys() - {self._index})
            raise MalformedReply(
                f"the stream's answer, at index {self._index}, was followed by choices at {others}"
            )
        return by_index.get(self._index)

    def _tool_call_pieces(self, data: object) -> tuple[ToolCallDelta, ...]:
        if not isinstance(data, list):
            raise MalformedReply("delta tool_calls is not a list")
        pieces: list[ToolCallDelta] = []
        for item in data:
            if not isinstance(item, dict):
                raise MalformedReply("a tool call piece is not an object")
            index, call_id = item.get("index"), item.get("id")
            function = item.get("function")
            function = {} if function is None else function
            if index is None:
                index = _NO_INDEX
            elif not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise MalformedReply("a tool call piece has a bad index")
            if not isinstance(function, dict):
                raise MalformedReply("a tool call piece's function is not an object")
            name, arguments = function.get("name"), function.get("arguments")
            if not all(isinstance(v, str | None) for v in (call_id, name, arguments)):
                raise MalformedReply("a tool call piece has a field that is not a string")
            self._take_piece(pieces, index, call_id, name, arguments)
        return tuple(pieces)

    def _function_call_pieces(self, data: object) -> tuple[ToolCallDelta, ...]:
        """A legacy `delta.function_call` piece as a piece of one tool call, which gets an
        id as it begins (the upstream gives none)."""
        name, arguments = _function_call_fields(data)
        call_id = None if _FUNCTION_CALL_INDEX in self._tool_calls else _new_call_id()
        pieces: list[ToolCallDelta] = []
        self._take_piece(pieces, _FUNCTION_CALL_INDEX, call_id, name, arguments)
        return tuple(pieces)

    def _has_listed_calls(self) -> bool:
        """Whether a call came in `tool_calls` pieces, not as a legacy `function_call`."""
        return any(index != _FUNCTION_CALL_INDEX for index in self._tool_calls)

    def _take_piece(
        self,
        pieces: list[ToolCallDelta],
        index: int,
        call_id: str | None,
        name: str | None,
        arguments: str | None,
    ) -> None:
        """Take one tool-call piece at the upstream's `index`; append what it relays."""
        known = self._tool_calls.get(index)
        # A new id at a known index is a new call: Ollama streams every call at index 0.
        if known is None or (call_id and known.id and call_id != known.id):
            if known is not None and known.position is None:
                _check_begun(known)  # its index is taken: it can never begin
            if known is not None and known.half and known.position is not None:
                # Its arguments' last piece ended with half a character.
                pieces.append(ToolCallDelta(known.position, arguments=_REPLACEMENT))
            if self._calls_opened == MAX_TOOL_CALLS_PER_MESSAGE:
                raise _too_many_calls()
            self._calls_opened += 1
            known = self._tool_calls[index] = _StreamedCall()
        if arguments and self._is_pairing:
            arguments, known.half = _paired_ends(known.half, arguments)
        if known.position is not None:
            if arguments:  # some servers repeat the id and name: sent once
                pieces.append(ToolCallDelta(known.position, arguments=arguments))
            return
        known.id, known.name = known.id or call_id or "", known.name or name or ""
        _check_id_and_name(known.id, known.name)  # before it is held, waiting for the other
        if arguments:
            known.held.append(arguments)
            known.unfolded += 1
            if known.unfolded == FOLDED_EVERY:  # one-character pieces: held as their text
                # Those since the last fold alone: all again would copy all at each fold.
                known.held[-FOLDED_EVERY:] = ["".join(known.held[-FOLDED_EVERY:])]
                known.unfolded = 0
            known.held_chars += len(arguments)
            self._held_chars += len(arguments)
            if self._held_chars > _MAX_HELD_CHARS:
                raise MalformedReply("tool calls' arguments ran long before their ids and names")
        if known.id and known.name:
            known.position, self._calls = self._calls, self._calls + 1
            self._held_chars -= known.held_chars
            pieces.append(ToolCallDelta(known.position, known.id, known.name, "".join(known.held)))
            known.held.clear()

    def _content_parts(self, content: object) -> tuple[str, str]:
        """A delta's `content` that is not a string, read as typed parts (`_content_parts`):
        its text and its thinking."""
        parts = _content_parts(content)
        if parts.skipped and len(self._skipped_parts) < _MAX_NAMED_PARTS:
            self._skipped_parts.update(parts.skipped)
        text = parts.text
        if text and self._is_pairing:  # a half each side of where two parts meet
            text = _ends_kept(text)
        return text, parts.thinking

    def parse(self, data: str) -> TextChunk | None:
        """Parse one event; return its text, reasoning and tool-call pieces, if any.
        `[DONE]` marks the end."""
        if data == _DONE:
            self.is_done = True
            return None
        if not data.strip():
            # `data:` alone: the SSE spec dispatches it with empty data, but it carries no
            # chunk (no JSON is blank), and failing the stream on it would cut an answer.
            return None
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if data.strip() == _DONE:  # blanks around it, as JSON events may have (`data:  {`)
                self.is_done = True
                return None
            event = _loads_with_halves(data, exc, _STREAMED_TEXT_KEYS)
            self._is_pairing = True
        if not isinstance(event, dict):  # inline: a Python call less for every event
            raise MalformedReply("not a JSON object")
        if event.get("error"):  # also beside choices (OpenRouter); `"error": null` is none
            raise ReportedError(data)
        # Each from the first event that gives it: a role chunk may name no model, and a
        # server that sends no id would have a usage chunk without a model unname it.
        if not self.id:
            self.id = _informational(event.get("id"))
        if not self.model:
            self.model = _informational(event.get("model"))
        if event.get("usage"):
            self._take_usage(usage(event["usage"]))
        choices = event.get("choices")
        if not choices:
            return None
        if not isinstance(choices, list):
            raise MalformedReply("choices is not a list of objects")
        choice = self._answer_choice(choices)
        if choice is None:
            return None
        reason = finish_reason(choice.get("finish_reason"))
        if reason is not None:
            self.finish_reason = reason
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        content = delta.get("content")
        thinking = ""
        if content is not None and not isinstance(content, str):
            content, thinking = self._content_parts(content)  # Mistral's, while it thinks
        refusal = _refusal(delta)
        if refusal:
            content, self.is_refused = (content or "") + refusal, True
            if self._is_pairing:  # a half each side of where the two meet
                content = _ends_kept(content)
        reasoning = _reasoning(delta)
        if thinking:
            reasoning += thinking
            if self._is_pairing:
                reasoning = _ends_kept(reasoning)
        if self._is_pairing:
            content, self._content_half = _paired_ends(self._content_half, content or "")
            reasoning, self._reasoning_half = _paired_ends(self._reasoning_half, reasoning)
        tool_calls = delta.get("tool_calls")
        pieces = () if tool_calls is None else self._tool_call_pieces(tool_calls)
        # `in`, not `get`: no call for the events without one (every event is parsed here).
        # Only without tool calls: some proxies repeat the first tool call as this too.
        if (
            "function_call" in delta
            and delta["function_call"] is not None
            and not tool_calls
            and not self._has_listed_calls()
        ):
            pieces = self._function_call_pieces(delta["function_call"])
        if content or pieces or reasoning:
            self._has_relayed = True
            return TextChunk(content or "", pieces, reasoning)
        return None

    def end_of_body(self, data_at_end: str | None) -> None:
        """Take the event a clean end of the body left without its blank line: only `[DONE]`.

        `data_at_end` is that event's data (`SSEDecoder.data_at_end`). A whole `[DONE]` says
        the upstream finished and only the blank line after it was lost; anything else left
        open (`[DO`, a chunk) stays unread, and the stream counts as cut.
        """
        if data_at_end is not None and data_at_end.strip() == _DONE:
            self.is_done = True

    def lone_halves(self) -> TextChunk | None:
        """What the stream's end leaves of characters cut in two: each high UTF-16 half still
        held back, no low half having followed it, as U+FFFD (what a broken UTF-8 sequence
        becomes, `SSEDecoder`), in one chunk; None when none is held."""
        if not self._is_pairing:
            return None
        content, reasoning = self._content_half, self._reasoning_half
        pieces = tuple(
            ToolCallDelta(call.position, arguments=_REPLACEMENT)
            for call in self._tool_calls.values()
            if call.half and call.position is not None
        )
        self._content_half = self._reasoning_half = ""
        for call in self._tool_calls.values():
            call.half = ""
        if not (content or reasoning or pieces):
            return None
        return TextChunk(content and _REPLACEMENT, pieces, reasoning and _REPLACEMENT)

    def end(self) -> StreamEnd:
        """The stream's end; raises when it never said why it finished."""
        if self.finish_reason is None:
            raise MalformedReply("the stream ended without a finish reason")
        for call in self._tool_calls.values():
            _check_begun(call)
        if self._skipped_parts and not self._has_relayed:
            raise _unreadable(self._skipped_parts)
        reason = (
            FinishReason.CONTENT_FILTER
            if self.is_refused
            else _with_tool_calls(self.finish_reason, has_tool_calls=self._calls > 0)
        )
        return StreamEnd(id=self.id, model=self.model, finish_reason=reason, usage=self.usage)


# How OpenAI-compatible servers say a request is over the model's context window, in a
# 400: OpenAI's `code`, llama.cpp's `type`, and the message vLLM, DeepSeek, OpenAI and
# llama.cpp write ("This model's maximum context length is 8192 tokens. However ...",
# "the request exceeds the available context size").
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_PHRASES = (
    "maximum context length",  # OpenAI, vLLM, DeepSeek, Mistral
    "context size",  # llama.cpp
    "context window",
    "context length",
    "input token count",  # Gemini: "The input token count (N) exceeds the maximum ..."
    "prompt is too long",  # Anthropic: "prompt is too long: N tokens > M maximum"
    "exceed context limit",  # Anthropic: "input length and `max_tokens` exceed context limit"
    "input is too long",  # Bedrock: "Input is too long for requested model."
    "exceeded model token limit",  # Moonshot (Kimi): "exceeded model token limit: N"
)
# TGI's (Together, Hugging Face endpoints), in a 422, its status for any invalid input:
# only these two say too long there. The second refuses a prompt over its
# `--max-input-tokens` (set below the total on many endpoints) whose answer would still
# fit: "`inputs` must have less than N tokens. Given: M".
_TGI_CONTEXT_PHRASES = ("tokens + `max_new_tokens` must be <=", "`inputs` must have less than")
_CONTEXT_PHRASES_BY_STATUS = {
    400: (*_CONTEXT_PHRASES, *_TGI_CONTEXT_PHRASES),
    422: _TGI_CONTEXT_PHRASES,
}


def _error_of(body: bytes) -> object:
    """The error an error body holds: its `error` (an object, or a message alone), or the
    body itself when it is vLLM's bare error object; None when there is none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # Gemini's OpenAI endpoint wraps its error in a list
    if not isinstance(data, dict):
        return None
    # vLLM before 0.10 sends its error object bare: {"object": "error", "message": ...}.
    return data.get("error", data if data.get("object") == "error" else None)


def error_explanation(body: bytes) -> tuple[str, str, str] | None:
    """What an error body says of the refusal: its error's `message`, `param` and `code`,
    each "" where absent or not a string (llama.cpp's `code` is the status, a number);
    None when it holds no message: not JSON (a proxy's HTML page), or no error in it."""
    error = _error_of(body)
    if isinstance(error, str):  # some servers send the message alone: {"error": "..."}
        return (error, "", "") if error else None
    if not isinstance(error, dict):
        return None
    message, param, code = (error.get(key) for key in ("message", "param", "code"))
    if not isinstance(message, str) or not message:
        return None
    return message, _text(param), _text(code)


def _text(value: object) -> str:
    """`value` when it is a string, else ""."""
    return value if isinstance(value, str) else ""


# The status an error object's `code` or `type` stands for, when it names no status.
_ERROR_STATUS_BY_NAME = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}


def error_status(body: bytes) -> int | None:
    """The HTTP status a success answer's body stands for when it holds an error in place
    of an answer (OpenRouter's `{"error": {"code": 429, ...}}` with a 200, a reseller
    relaying a provider's refusal), or None when it holds none: its `code` when that is
    an error status, else the status its `code` or `type` names, else 502."""
    error = _error_of(body)
    if not error:
        return None
    if not isinstance(error, dict):
        return 400 if says_context_exceeded(body) else 502
    code = error.get("code")
    if isinstance(code, str) and code.isascii() and code.isdigit():
        code = int(code)
    if type(code) is int and 400 <= code <= 599:
        return code
    if says_context_exceeded(body):
        return 400
    for name in (error.get("code"), error.get("type")):
        if isinstance(name, str) and name in _ERROR_STATUS_BY_NAME:
            return _ERROR_STATUS_BY_NAME[name]
    return 502


def says_content_flagged(body: bytes) -> bool:
    """Whether an error body says the request's content was flagged by moderation
    (OpenRouter's 403: `error.metadata` naming the `reasons` and the `flagged_input`),
    rather than that the gateway's key was refused."""
    error = _error_of(body)
    metadata = error.get("metadata") if isinstance(error, dict) else None
    return isinstance(metadata, dict) and ("flagged_input" in metadata or "reasons" in metadata)


def says_out_of_credit(body: bytes) -> bool:
    """Whether an error body says the gateway's account has no quota left (OpenAI's 429
    with the code or type `insufficient_quota`), rather than that it is sending too fast."""
    error = _error_of(body)
    return isinstance(error, dict) and any(
        error.get(key) == "insufficient_quota" for key in ("code", "type")
    )


def says_stream_options_unknown(body: bytes) -> bool:
    """Whether an error body refuses the request's `stream_options` as a field it does not
    know: Azure OpenAI before API version 2024-09-01-preview answers "Unrecognized request
    argument supplied: stream_options", others "Unknown parameter: 'stream_options'", and
    Mistral's API (a 422) lists it among the fields its validation forbids, its message an
    object: `{"detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
    ...}]}` (as a FastAPI server's bare `{"detail": [...]}` does)."""
    explanation = error_explanation(body)
    if explanation is None:
        return any(
            isinstance(error, dict)
            and isinstance(error.get("loc"), list)
            and "stream_options" in error["loc"]
            for error in _validation_errors(body)
        )
    message, param, _ = explanation
    return param == "stream_options" or "stream_options" in message


# How many of a validation refusal's errors are told: the first few say what to mend, and
# a request with many bad fields is mended a few at a time.
_MAX_VALIDATION_ERRORS_TOLD = 3


def _validation_errors(body: bytes) -> list[object]:
    """The errors of a pydantic validation refusal (a 422 of a FastAPI server, some vLLM
    and TGI front ends, as `{"detail": [...]}`; Mistral's API's, as its error's `message`,
    an object: `{"object": "error", "message": {"detail": [...]}, ...}`), each a mapping
    with the `loc` of the field it refused, its `msg` and `type`; [] when there are none."""
    holder = _error_of(body)
    if isinstance(holder, dict):
        holder = holder.get("message")
    elif holder is None:
        try:
            holder = orjson.loads(body)
        except orjson.JSONDecodeError:
            return []
    detail = holder.get("detail") if isinstance(holder, dict) else None
    return detail if isinstance(detail, list) else []


def validation_explanation(body: bytes) -> str | None:
    """What a pydantic validation refusal's errors say of the request, its first few as
    `loc: msg (type)` (`body.seed: Extra inputs are not permitted (extra_forbidden)`),
    then how many more; None when its body holds no such error. Each error's `input` (the
    value refused: it may be the caller's prompt, or a secret) is never part of it."""
    errors = _validation_errors(body)
    told = [_told(error) for error in errors[:_MAX_VALIDATION_ERRORS_TOLD]]
    told = [text for text in told if text]
    if not told:
        return None
    left = len(errors) - _MAX_VALIDATION_ERRORS_TOLD
    return "; ".join(told) + (f"; and {left} more" if left > 0 else "")


def _told(error: object) -> str:
    """One validation error as `loc: msg (type)`, of its parts those that are strings
    (and the `loc` its strings and integers); "" when it has no `msg`."""
    if not isinstance(error, dict) or not _text(error.get("msg")):
        return ""
    loc = error.get("loc")
    places = [str(p) for p in loc if type(p) in (str, int)] if isinstance(loc, list) else []
    kind = _text(error.get("type"))
    told = f"{'.'.join(places)}: {error['msg']}" if places else error["msg"]
    return f"{told} ({kind})" if kind else told


# The sizes OpenAI's refusal states, which llama-cpp-python's server and vLLM before 0.10
# write alike: "This model's maximum context length is 512 tokens. However, you requested
# 818 tokens (810 in the messages, 8 in the completion). ..."; OpenAI's other wording,
# "However, your messages resulted in 8367 tokens (8000 in the messages, 367 in the
# functions)", whose first count is the whole prompt; and vLLM's since 0.10, "However, your
# request has 1500 input tokens", or for a max_tokens too large, "... maximum context
# length is 4096 tokens and your request has 2778 input tokens (8000 > 4096 - 2778)".
# With tools, OpenAI's first wording counts them apart: "you requested 16610 tokens (14138
# in the messages, 226 in the functions, and 2246 in the completion)"; the prompt is both.
# OpenRouter's: "This endpoint's maximum context length is 256000 tokens. However, you
# requested about 424983 tokens (358454 of text input, 56529 of tool input, 10000 in the
# output)", the prompt both inputs.
# Counts of at most 18 digits, as orjson holds those of `n_ctx` to 64 bits: a longer one
# is no tokenizer's, and failed the call INTERNAL (past 4300 digits no int, past about 308
# no float in the calibration).
_CONTEXT_COUNTS = re.compile(
    r"maximum context length is (\d{1,18}) tokens\b.*?"
    r"(?:your messages resulted in (\d{1,18}) tokens\b|your request has (\d{1,18}) input tokens"
    r"|\((\d{1,18}) in the messages(?:, (\d{1,18}) in the functions)?"
    r"|\((\d{1,18}) of text input(?:, (\d{1,18}) of tool input)?)",
    re.DOTALL,
)


# The sizes other providers' refusals state, each wording with whether its limit is on
# the prompt alone (an input limit: the answer's room is not in it). Gemini's OpenAI
# endpoint: "The input token count (1048577) exceeds the maximum number of tokens allowed
# (1048576)."; TGI's 422 for a prompt over its `--max-input-tokens`: "`inputs` must have
# less than 1000 tokens. Given: 1100"; Anthropic's, "prompt is too long: 210000 tokens >
# 200000 maximum", and for a prompt that fits but not with its max_tokens, "input length
# and `max_tokens` exceed context limit: 198000 + 8192 > 200000, ..."; TGI's for the two
# together: "`inputs` tokens + `max_new_tokens` must be <= 1024. Given: 1000 `inputs`
# tokens and 100 `max_new_tokens`"; Mistral's, "Prompt contains 300000 tokens, too large
# for model with 131072 maximum context length" (some add "and 0 draft tokens").
_STATED_COUNTS = (
    (
        re.compile(
            r"input token count \((?P<prompt>\d{1,18})\) exceeds the maximum number of tokens "
            r"allowed \((?P<window>\d{1,18})\)",
            re.IGNORECASE,
        ),
        True,
    ),
    (
        re.compile(
            r"`inputs` must have less than (?P<window>\d{1,18}) tokens\. "
            r"Given: (?P<prompt>\d{1,18})"
        ),
        True,
    ),
    (
        re.compile(
            r"prompt is too long: (?P<prompt>\d{1,18}) tokens > (?P<window>\d{1,18}) maximum",
            re.IGNORECASE,
        ),
        False,
    ),
    (
        re.compile(
            r"exceed context limit: (?P<prompt>\d{1,18})\s*\+\s*\d{1,18}\s*>\s*"
            r"(?P<window>\d{1,18})",
            re.IGNORECASE,
        ),
        False,
    ),
    (re.compile(r"must be <= (?P<window>\d{1,18})\. Given: (?P<prompt>\d{1,18}) `?inputs"), False),
    (
        re.compile(
            r"prompt contains (?P<prompt>\d{1,18}) tokens\b.{0,64}?too large for model with "
            r"(?P<window>\d{1,18}) maximum context length",
            re.IGNORECASE | re.DOTALL,
        ),
        False,
    ),
)
# Moonshot's (Kimi's): "Your request exceeded model token limit: 262144 (requested:
# 300000)". Its window holds the prompt and the answer together, and its count is of both:
# the prompt and the max_tokens asked (or its own default, when none is).
_PROMPT_AND_ANSWER_COUNTS = re.compile(
    r"exceeded model token limit: (?P<window>\d{1,18}) \(requested: (?P<total>\d{1,18})\)",
    re.IGNORECASE,
)


class ContextCounts(NamedTuple):
    """The sizes an over-the-window refusal states: its window (or, `is_input_limit`, its
    limit on the prompt alone) and its count of the prompt (or, `counts_answer`, of the
    prompt and the answer's room together: the prompt's own is less by a max_tokens the
    refusal does not say)."""

    window_tokens: int
    prompt_tokens: int
    is_input_limit: bool = False
    counts_answer: bool = False


def context_counts(body: bytes) -> ContextCounts | None:
    """The sizes an over-the-window refusal's body states: in its message, or as
    llama.cpp's own server (C++) says them, `n_ctx` and `n_prompt_tokens` beside it; None
    when it states not both a limit and the prompt's count."""
    error = _error_of(body)
    if isinstance(error, dict):
        window, prompt = error.get("n_ctx"), error.get("n_prompt_tokens")
        if type(window) is int and type(prompt) is int:
            return ContextCounts(window, prompt)
    explanation = error_explanation(body)
    if explanation is None:
        return None
    message = explanation[0]
    match = _CONTEXT_COUNTS.search(message)
    if match is not None:
        window, resulted, request_has, *parts = match.groups()
        prompt = resulted or request_has
        if prompt is not None:
            return ContextCounts(int(window), int(prompt))
        # The messages' (or text's) count, and the functions' (or tools') beside it.
        return ContextCounts(int(window), sum(int(part) for part in parts if part is not None))
    for wording, is_input_limit in _STATED_COUNTS:
        match = wording.search(message)
        if match is not None:
            return ContextCounts(int(match["window"]), int(match["prompt"]), is_input_limit)
    match = _PROMPT_AND_ANSWER_COUNTS.search(message)
    if match is not None:
        return ContextCounts(int(match["window"]), int(match["total"]), counts_answer=True)
    return None


def says_context_exceeded(body: bytes, status: int = 400) -> bool:
    """Whether an error body, with its HTTP `status`, says the prompt (with max_tokens) is
    over the context window."""
    phrases = _CONTEXT_PHRASES_BY_STATUS.get(status)
    if phrases is None:
        return False
    error = _error_of(body)
    if isinstance(error, dict):
        if status == 400 and any(error.get(key) in _CONTEXT_CODES for key in ("code", "type")):
            return True
        error = error.get("message")
    # Some servers send the message alone: {"error": "..."}.
    return isinstance(error, str) and any(p in error.lower() for p in phrases)


# How a 400 or 404 says the upstream has no such model: OpenAI's (and Groq's) `code`
# `model_not_found`, Azure's `DeploymentNotFound`, Together's `model_not_available`; the
# messages of OpenAI, Groq, vLLM ("The model `x` does not exist"), Ollama ("model 'x' not
# found, try pulling it first"), Fireworks ("Model not found"), DeepSeek ("Model Not
# Exist"), Mistral ("Invalid model: x"), LiteLLM's proxy ("Invalid model name passed"),
# OpenRouter ("x is not a valid model ID") and Anthropic's ("model: x"). A 404 that says
# none of that is a path the server does not route, a wrong base_url: llama.cpp's server
# (`{"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}`),
# OpenAI's ("Invalid URL (POST /v1/...)"), Azure's ("Resource not found"), FastAPI's
# (vLLM, LiteLLM: `{"detail": "Not Found"}`), Go's (Ollama: "404 page not found"), a
# proxy's page. Read in the message's head only: a refusal's message may run to megabytes.
_MODEL_MISSING_CODES = frozenset({"model_not_found", "DeploymentNotFound", "model_not_available"})
_MODEL_MISSING_WORDS = re.compile(
    r"\bmodel\b.{0,100}?\b(?:not exist|not found)|\b(?:invalid|unknown|no such) model\b"
    r"|\bnot a valid model\b|^model: \S",
    re.IGNORECASE,
)
_MODEL_MISSING_HEAD_CHARS = 1000


class Missing(enum.Enum):
    """What an error status says the upstream lacks (`what_is_missing`)."""

    MODEL = "model"  # no such model there: another upstream of it may serve the call
    PATH = "path"  # no such path: its base_url is wrong, for every model it serves


def what_is_missing(body: bytes, status: int) -> Missing | None:
    """What an error body, with its HTTP `status`, says the upstream lacks: the model
    (one provider dropped or renamed it, or never had it) when a 400 or a 404 says so by
    its `code` or `type` or its message (the shapes above); the path, for any other 404
    with a body; None for anything else, a 404 with no body included (nothing is known)."""
    if status not in (400, 404):
        return None
    explanation = error_explanation(body)
    if explanation is not None:
        message, _, code = explanation
        error = _error_of(body)
        kind = error.get("type") if isinstance(error, dict) else None
        if (
            code in _MODEL_MISSING_CODES
            or kind in _MODEL_MISSING_CODES
            or _MODEL_MISSING_WORDS.search(message[:_MODEL_MISSING_HEAD_CHARS]) is not None
        ):
            return Missing.MODEL
    return Missing.PATH if status == 404 and body.strip() else None
