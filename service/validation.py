"""Field-by-field validation of a chat request; every problem is reported at once."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import orjson

from service.config import MAX_LABELS, MAX_MODEL_NAME, RequestDefaults, is_model_name
from service.domain import (
    MAX_TOOL_CALL_FIELD,
    MAX_TOOL_CALLS_PER_MESSAGE,
    ChatRequest,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)
from service.errors import FieldViolation, InvalidRequest, clipped
from service.tokens import estimate_prompt_tokens

# Label keys the gateway sets itself (the ledger's overflow row).
RESERVED_LABEL_PREFIX = "llm_gateway."
# The labels of a tenant's calls past `ledger.max_rows_per_tenant` new rows in one bucket
# (`service.ledger`): the only label of the gateway's own that a usage row can carry.
OVERFLOW_LABELS: Mapping[str, str] = MappingProxyType({"llm_gateway.overflow": "true"})
_LABEL_KEY = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")  # fullmatch: `$` passes a final newline
# C0 controls other than tab, LF and CR, DEL, and C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_RUN = re.compile(_CONTROL.pattern + "+")
# What `_CONTROL` refuses, as a violation says it: a stop sequence may be "\n".
_NO_CONTROLS = "no control characters but tab, CR and LF"
# A character a reader sees: neither whitespace nor one Unicode has rendered as nothing
# (Default_Ignorable_Code_Point: a soft hyphen, a zero-width space or joiner, a
# direction mark, Arabic's among them, a variation selector, a Hangul filler, a tag, a
# byte order mark).
_VISIBLE = re.compile(
    r"[^\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
# The caller's own text is held to the control-character rule. A model's earlier answer
# and a tool's output (a shell's ANSI colours) come back as they came: refusing them would
# stall a conversation or an agent loop on text the caller did not write.
_CALLERS_ROLES = frozenset({Role.SYSTEM, Role.USER})
# What a message's role, unset or a number the enum lacks, must be instead.
ROLE_RULE = "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
_ROLE_FIELD = re.compile(r"messages\[(\d+)\]\.role")
_NO_INDEXES: frozenset[int] = frozenset()
# A caller's own key for a call or an item (an idempotency key, sent upstream; a batch
# item's id, sent back with its result to be matched by the caller's tools): one line of
# printable text, no longer than a model's name or, by default, a label's value.
MAX_CALLER_ID = 256
CALLER_ID_RULE = f"must be printable, at most {MAX_CALLER_ID} characters"
_MAX_TOKENS_CAP = 1_000_000
# OpenAI's rule for a tool's and a JSON schema's name (fullmatch, as _LABEL_KEY).
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128  # OpenAI's limit
# A message's tool calls whose bad ids and names are each a violation; those after are
# counted in one: 1,000 messages of 128 empty calls (261 KB) were 256,000 violations,
# 0.6 s of the event loop to build, of which a caller is shown ten.
_TOOL_CALLS_TOLD_APART = 8


def _range(
    violations: list[FieldViolation],
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        violations.append(
            FieldViolation(name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")
        )


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a character no message may contain (see `_CONTROL`)."""
    return _CONTROL.search(text) is not None


def has_visible_text(text: str) -> bool:
    """Whether `text` holds anything a reader sees: a text of blanks and invisible format
    characters alone (a zero-width space, a word joiner), sent, would be paid for and
    answered as if it said something."""
    return _VISIBLE.search(text) is not None


def without_control_characters(text: str) -> str:
    """`text` with each run of characters no message may contain as one space."""
    return _CONTROL_RUN.sub(" ", text)


def is_caller_id(text: str) -> bool:
    """Whether `text` may be a caller's key for a call or an item (`MAX_CALLER_ID`):
    printable, so no control, line-break or zero-width characters."""
    return len(text) <= MAX_CALLER_ID and text.isprintable()


def model_violations(model: str) -> list[FieldViolation]:
    """What is wrong with a model name, whichever RPC it came in (empty list: nothing)."""
    if not model:
        return [FieldViolation("model", "must not be empty")]
    if not is_model_name(model):
        return [
            FieldViolation(
                "model", f"must be a printable name of at most {MAX_MODEL_NAME} characters"
            )
        ]
    return []


def too_many_messages(count: int, limits: RequestDefaults) -> FieldViolation:
    """The violation of a request of `count` messages, more than `limits` allow."""
    return FieldViolation("messages", f"at most {limits.max_messages} messages, got {count}")


def too_many_tool_calls(index: int, count: int) -> FieldViolation:
    """The violation of message `index` sending back `count` tool calls, too many."""
    return FieldViolation(
        f"messages[{index}].tool_calls",
        f"at most {MAX_TOOL_CALLS_PER_MESSAGE} tool calls, got {count}",
    )


def too_many_labels(count: int, limits: RequestDefaults) -> FieldViolation:
    """The violation of a request of `count` labels, more than `limits` allow."""
    return FieldViolation("labels", f"at most {limits.max_labels} labels, got {count}")


def too_many_stop_sequences(count: int, limits: RequestDefaults) -> FieldViolation:
    """The violation of a request of `count` stop sequences, more than `limits` allow."""
    return FieldViolation(
        "params.stop", f"at most {limits.max_stop_sequences} stop sequences, got {count}"
    )


def too_many_tools(count: int) -> FieldViolation:
    """The violation of a request of `count` tools, more than `MAX_TOOLS`."""
    return FieldViolation("tools", f"at most {MAX_TOOLS} tools, got {count}")


def unknown_role(index: int) -> FieldViolation:
    """The violation of `messages[index]`, whose role on the wire is unset or unknown.

    Its other fields are then held to no role's rules (`chat_request_violations`): which
    of them it may carry, and whether its content may be empty, depends on its role.
    """
    return FieldViolation(f"messages[{index}].role", ROLE_RULE)


def _unknown_roles(prior: Sequence[FieldViolation]) -> frozenset[int]:
    """The indexes of the messages that `prior` refuses with `unknown_role`."""
    indexes = []
    for violation in prior:
        matched = _ROLE_FIELD.fullmatch(violation.field)
        if matched is not None and violation.description == ROLE_RULE:
            indexes.append(int(matched[1]))
    return frozenset(indexes)


def chat_request_violations(
    request: ChatRequest, limits: RequestDefaults, *, prior: Sequence[FieldViolation] = ()
) -> list[FieldViolation]:
    """`prior` (found on the wire: unknown enums, counts over their limits), then every
    invalid field of `request`, in field order.

    A message whose role `prior` refuses (`unknown_role`) is converted as ROLE_USER's,
    but is held to no role's rules: its role's violation is all it gets.
    """
    found = [*prior]
    model = request.model
    # `model_violations` and its `is_model_name` written out for a good name: two frames
    # on every call.
    if not (0 < len(model) <= MAX_MODEL_NAME and model.isprintable()):
        found.extend(model_violations(model))
    unknown_roles = _unknown_roles(prior) if prior else _NO_INDEXES
    message_count = len(request.messages)  # read once: three uses below
    if not message_count:
        found.append(FieldViolation("messages", "must contain at least one message"))
    elif message_count > limits.max_messages:
        found.append(too_many_messages(message_count, limits))
    total_chars = 0
    tool_calls = 0  # sent back, each with its overhead in the estimate
    call_ids: set[str] = set()  # of the tool calls of the messages so far
    for index, message in enumerate(request.messages[: limits.max_messages]):
        total_chars += len(message.content)
        if unknown_roles and index in unknown_roles:
            total_chars += len(message.reasoning)
            if message.tool_calls or message.tool_call_id:
                total_chars += _tool_message_violations(
                    found, index, message, call_ids, is_role_known=False
                )
                tool_calls += len(message.tool_calls)
            continue
        if message.tool_calls or message.tool_call_id or message.role is Role.TOOL:
            total_chars += _tool_message_violations(found, index, message, call_ids)
            tool_calls += len(message.tool_calls)
        if message.reasoning:
            total_chars += len(message.reasoning)
            if message.role is not Role.ASSISTANT:
                found.append(
                    FieldViolation(
                        f"messages[{index}].reasoning", "only on ROLE_ASSISTANT messages"
                    )
                )
        # `has_visible_text` written out: a Python call less for every message of a call.
        if _VISIBLE.search(message.content) is None:
            # A tool-call turn may have no text, a tool may return none, and a reasoning
            # model's turn that spent its max_tokens thinking has only its reasoning
            # (whitespace and invisible characters alone are none, as in a Summarize document).
            if not (
                message.tool_calls
                or has_visible_text(message.reasoning)
                or message.role is Role.TOOL
            ):
                found.append(FieldViolation(f"messages[{index}].content", "must not be empty"))
        elif message.role in _CALLERS_ROLES and _CONTROL.search(message.content):
            found.append(
                FieldViolation(f"messages[{index}].content", "must not contain control characters")
            )
    if request.tools or request.tool_choice.is_set:
        total_chars += _tools_violations(found, request)
    # UTF-8 takes at most 4 bytes a character, so only long texts need encoding.
    is_over_bytes = False
    if total_chars * 4 > limits.max_request_bytes:
        size = len("".join(_texts_of(request)).encode("utf-8"))
        is_over_bytes = size > limits.max_request_bytes
        if is_over_bytes:
            found.append(
                FieldViolation(
                    "messages", f"at most {limits.max_request_bytes} bytes of text, got {size}"
                )
            )
    response_format = request.params.response_format
    schema_chars = 0
    if response_format is not None:
        schema_chars = len(response_format.json_schema) + len(response_format.schema_name)
        is_over_bytes |= _is_over_bytes(response_format.json_schema, limits)
    # Only worth estimating when the text could be over: no character costs more than
    # 5 tokens (an emoji alone: its 4 UTF-8 bytes, 1 more for starting a run), plus a
    # few tokens of overhead a message, tool and tool call. Not past a count or a byte
    # limit, which refuses the request already: a 4 MiB prompt is a quarter second of
    # the event loop to estimate, and cheap to measure.
    overheads = message_count + len(request.tools) + tool_calls + 1
    bound = (total_chars + schema_chars) * 5 + 8 * overheads
    is_refused = is_over_bytes or message_count > limits.max_messages
    if not is_refused and bound > limits.max_prompt_tokens and not _is_counted_out(prior):
        estimate = estimate_prompt_tokens(request.messages, request.tools, response_format)
        if estimate > limits.max_prompt_tokens:
            found.append(
                FieldViolation(
                    "messages",
                    f"about {estimate} tokens, over the limit of "
                    f"{limits.max_prompt_tokens} tokens a request",
                )
            )
    params = request.params
    # Each checked only when set: most requests set none.
    if params.temperature is not None:
        _range(found, "params.temperature", params.temperature, 0.0, 2.0)
    if params.top_p is not None:
        _range(found, "params.top_p", params.top_p, 0.0, 1.0, low_open=True)
    if params.presence_penalty is not None:
        _range(found, "params.presence_penalty", params.presence_penalty, -2.0, 2.0)
    if params.frequency_penalty is not None:
        _range(found, "params.frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    if params.max_tokens is not None and not 1 <= params.max_tokens <= _MAX_TOKENS_CAP:
        found.append(
            FieldViolation(
                "params.max_tokens", f"must be in [1, {_MAX_TOKENS_CAP}], got {params.max_tokens}"
            )
        )
    if params.response_format is not None:
        found.extend(_response_format_violations(params.response_format, limits))
    if params.stop:  # most requests send none: not even measured
        if len(params.stop) > limits.max_stop_sequences:
            found.append(too_many_stop_sequences(len(params.stop), limits))
        for index, stop in enumerate(params.stop[: limits.max_stop_sequences]):
            if not stop or len(stop) > limits.max_stop_length or _CONTROL.search(stop):
                found.append(
                    FieldViolation(
                        f"params.stop[{index}]",
                        f"must be 1 to {limits.max_stop_length} characters, {_NO_CONTROLS}",
                    )
                )
    if request.labels:
        found.extend(label_violations(request.labels, limits))
    key = request.idempotency_key
    if key and not is_caller_id(key):
        found.append(FieldViolation("idempotency_key", CALLER_ID_RULE))
    # No upper bound here: the cache caps a TTL at its configured `max_ttl_s`.
    if request.cache.ttl_s is not None and request.cache.ttl_s < 1:
        found.append(FieldViolation("cache.ttl_seconds", "must be >= 1"))
    return found


def _is_counted_out(prior: Sequence[FieldViolation]) -> bool:
    """Whether the wire held more messages, tools or tool calls of a message than allowed:
    only those allowed were converted, and the estimate of them is not the request's."""
    return any(v.field in ("messages", "tools") or v.field.endswith(".tool_calls") for v in prior)


def _label_field(key: str) -> str:
    """The path of label `key` in a violation: escaped to ASCII and clipped, as a bad key
    may hold anything (64 invisible tag characters are 640 escaped, 768 bytes as an emoji
    in a status message) and ten such paths overflowed the trailers a client accepts."""
    return f"labels[{clipped(ascii(key[:64]))}]"


def label_violations(
    labels: Mapping[str, str], limits: RequestDefaults, *, is_filter: bool = False
) -> list[FieldViolation]:
    """What is wrong with a call's labels, whichever RPC they came in (empty: nothing).

    With `is_filter` they are GetUsage's filter, which may name the gateway's own label
    (`OVERFLOW_LABELS`, its overflow row's), and is not held to `limits`: rows recorded under
    larger ones (before the config lowered them, or by another replica mid-rollout) match.
    It is held to `MAX_LABELS` instead, the most labels any config lets a call carry, so
    no row carries more. Labels past the number allowed are counted, never read.
    """
    found = []
    allowed = MAX_LABELS if is_filter else limits.max_labels
    if len(labels) > allowed:
        found.append(FieldViolation("labels", f"at most {allowed} labels, got {len(labels)}"))
    for key, value in itertools.islice(labels.items(), allowed):
        if not _LABEL_KEY.fullmatch(key):
            found.append(
                FieldViolation(_label_field(key), "key must be 1-64 of A-Z a-z 0-9 _ . - /")
            )
        elif key.startswith(RESERVED_LABEL_PREFIX) and not is_filter:
            # The ledger's overflow row is labelled so: a caller's own would pass for it.
            found.append(
                FieldViolation(
                    _label_field(key), f"{RESERVED_LABEL_PREFIX}* keys are the gateway's"
                )
            )
        elif key.startswith(RESERVED_LABEL_PREFIX) and OVERFLOW_LABELS.get(key) != value:
            # No row carries any other: the filter would match nothing, read as "no usage".
            overflow = ", ".join(f"{k}: {v!r}" for k, v in OVERFLOW_LABELS.items())
            found.append(
                FieldViolation(
                    _label_field(key), f"the only {RESERVED_LABEL_PREFIX}* label is {overflow}"
                )
            )
        elif is_filter:
            if not value.isprintable():
                found.append(FieldViolation(_label_field(key), "value must be printable"))
        elif len(value) > limits.max_label_length or not value.isprintable():
            found.append(
                FieldViolation(
                    _label_field(key),
                    f"value must be printable and at most {limits.max_label_length} characters",
                )
            )
    return found


def _texts_of(request: ChatRequest) -> list[str]:
    """Every text of `request` that counts towards its size."""
    texts = []
    for message in request.messages:
        texts.append(message.content)
        texts.append(message.tool_call_id)
        texts.append(message.reasoning)
        texts.extend(f"{call.id}{call.name}{call.arguments}" for call in message.tool_calls)
    texts.extend(f"{tool.name}{tool.description}{tool.parameters}" for tool in request.tools)
    return texts


def _tool_message_violations(
    found: list[FieldViolation],
    index: int,
    message: Message,
    call_ids: set[str],
    *,
    is_role_known: bool = True,
) -> int:
    """Check a message's tool calls or the call it answers; the characters they add.

    `call_ids` holds the ids of the tool calls of the messages before; this message's are
    added. Without `is_role_known`, only what holds whatever the role: its calls' count,
    ids and names.
    """
    path = f"messages[{index}]"
    chars = len(message.tool_call_id)
    if is_role_known and message.tool_calls and message.role is not Role.ASSISTANT:
        found.append(FieldViolation(f"{path}.tool_calls", "only on ROLE_ASSISTANT messages"))
    if len(message.tool_calls) > MAX_TOOL_CALLS_PER_MESSAGE:
        found.append(too_many_tool_calls(index, len(message.tool_calls)))
    more_bad_fields = 0  # bad ids and names past the first few, told as one count
    for number, call in enumerate(message.tool_calls[:MAX_TOOL_CALLS_PER_MESSAGE]):
        chars += len(call.id) + len(call.name) + len(call.arguments)
        # Both are the model's own output sent back, so a name need not follow the rule
        # for declared tools: a model may call one it was never given ("python.run"), and
        # refusing the turn that carries it would leave the caller no way to answer it.
        for name, value in (("id", call.id), ("name", call.name)):
            if not value or len(value) > MAX_TOOL_CALL_FIELD or not value.isprintable():
                if number >= _TOOL_CALLS_TOLD_APART:
                    more_bad_fields += 1
                    continue
                found.append(
                    FieldViolation(
                        f"{path}.tool_calls[{number}].{name}",
                        f"must be 1 to {MAX_TOOL_CALL_FIELD} printable characters",
                    )
                )
        call_ids.add(call.id)
    if more_bad_fields:
        found.append(
            FieldViolation(
                f"{path}.tool_calls",
                f"{more_bad_fields} more ids and names (from tool_calls[{_TOOL_CALLS_TOLD_APART}]) "
                f"must be 1 to {MAX_TOOL_CALL_FIELD} printable characters",
            )
        )
    if not is_role_known:
        return chars
    if message.role is Role.TOOL:
        if not message.tool_call_id:
            found.append(FieldViolation(f"{path}.tool_call_id", "required on ROLE_TOOL messages"))
        elif message.tool_call_id not in call_ids:
            found.append(
                FieldViolation(
                    f"{path}.tool_call_id",
                    "must be the id of a tool call of an earlier assistant message",
                )
            )
    elif message.tool_call_id:
        found.append(FieldViolation(f"{path}.tool_call_id", "only on ROLE_TOOL messages"))
    return chars


def _tools_violations(found: list[FieldViolation], request: ChatRequest) -> int:
    """Check the tools and the tool choice; the characters the tools add."""
    tools = request.tools
    if len(tools) > MAX_TOOLS:
        found.append(too_many_tools(len(tools)))
    chars = 0
    names: set[str] = set()
    for index, tool in enumerate(tools[:MAX_TOOLS]):
        chars += len(tool.name) + len(tool.description) + len(tool.parameters)
        if not _FUNCTION_NAME.fullmatch(tool.name):
            found.append(FieldViolation(f"tools[{index}].name", "must be 1-64 of a-z A-Z 0-9 _ -"))
        elif tool.name in names:
            found.append(FieldViolation(f"tools[{index}].name", f"{tool.name!r} is declared twice"))
        names.add(tool.name)
        if has_control_characters(tool.description):
            found.append(
                FieldViolation(f"tools[{index}].description", "must not contain control characters")
            )
        problem = _json_object_problem(tool.parameters) if tool.parameters.strip() else None
        if problem:
            found.append(
                FieldViolation(
                    f"tools[{index}].parameters",
                    f"must be a JSON object (a JSON Schema); {problem}",
                )
            )
    choice = request.tool_choice
    if choice.is_set and not tools:
        found.append(FieldViolation("tool_choice", "needs tools"))
    elif choice.function_name:
        if choice.mode is not None:
            found.append(
                FieldViolation("tool_choice.mode", "must be unspecified with a function_name")
            )
        if choice.function_name not in names:
            found.append(
                FieldViolation("tool_choice.function_name", "must name one of the request's tools")
            )
    return chars


def validate_chat_request(
    request: ChatRequest, limits: RequestDefaults, *, prior: list[FieldViolation] | None = None
) -> None:
    """Raise `InvalidRequest` listing `prior` and every invalid field of `request`."""
    found = chat_request_violations(request, limits, prior=prior or ())
    if found:
        raise InvalidRequest(found)


def _response_format_violations(
    response_format: ResponseFormat, limits: RequestDefaults
) -> list[FieldViolation]:
    """A schema, its name and `strict` belong to JSON_SCHEMA, which needs a JSON object."""
    field = "params.response_format"
    if response_format.type is not ResponseFormatType.JSON_SCHEMA:
        return [
            FieldViolation(f"{field}.{name}", "only with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
            for name, is_set in (
                ("json_schema", bool(response_format.json_schema)),
                ("schema_name", bool(response_format.schema_name)),
                ("strict", response_format.is_strict),
            )
            if is_set
        ]
    found = []
    schema = response_format.json_schema
    if _is_over_bytes(schema, limits):
        found.append(
            FieldViolation(f"{field}.json_schema", f"at most {limits.max_request_bytes} bytes")
        )
    elif problem := _json_object_problem(schema):
        found.append(
            FieldViolation(
                f"{field}.json_schema", f"must be a JSON Schema object as JSON text; {problem}"
            )
        )
    if response_format.schema_name and not _FUNCTION_NAME.fullmatch(response_format.schema_name):
        found.append(FieldViolation(f"{field}.schema_name", "must be 1-64 of A-Z a-z 0-9 _ -"))
    return found


def _is_over_bytes(text: str, limits: RequestDefaults) -> bool:
    """Whether `text` is more UTF-8 bytes than `limits.max_request_bytes`; encoded only
    when it could be (UTF-8 takes at most 4 bytes a character)."""
    limit = limits.max_request_bytes
    return len(text) * 4 > limit and len(text.encode("utf-8")) > limit


def _json_object_problem(text: str) -> str | None:
    """Why `text` is no JSON object the gateway can read and send on, or None. JSON it
    cannot read names its reason: `1e400` is valid JSON but no number a parser keeps."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"not read as JSON: {exc}"
    return None if isinstance(value, dict) else f"got a JSON {_JSON_TYPES[type(value)]}"


_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
