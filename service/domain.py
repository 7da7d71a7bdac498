"""Domain values that flow through the gateway.

Only `servicer.py` knows Protobuf and only `upstream/` knows the OpenAI JSON shape;
everything in between speaks these frozen dataclasses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """Who wrote a message, spelled as the OpenAI API spells it."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.StrEnum):
    """Why the model stopped, spelled as the OpenAI API spells it."""

    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    # A reason the gateway does not know: callers see STOP (TOOL_CALLS for an answer that
    # called tools), and the answer is never cached.
    UNKNOWN = "unknown"


class CacheMode(enum.Enum):
    """How one request may use the response cache."""

    DEFAULT = "default"
    BYPASS = "bypass"
    REFRESH = "refresh"
    NO_STORE = "no_store"

    @property
    def reads(self) -> bool:
        """Whether a cached answer may be served."""
        return self in (CacheMode.DEFAULT, CacheMode.NO_STORE)

    @property
    def writes(self) -> bool:
        """Whether a fresh answer may be stored."""
        return self in (CacheMode.DEFAULT, CacheMode.REFRESH)


class TruncationMode(enum.Enum):
    """What to do with a prompt longer than the context window."""

    NONE = "none"
    KEEP_RECENT = "keep_recent"


# The most characters of a tool call's id, and of its function's name: what a caller may
# send back in an assistant message (`validation`), and so what an upstream's answer may
# hold (`openai_json`). A model may call a function it was never given, whose name need
# not follow the rule for declared tools (64 characters), but real ids and names are tens.
MAX_TOOL_CALL_FIELD = 256
# The most tool calls in one message: an upstream's answer may make no more (`openai_json`;
# OpenAI documents no bound on parallel calls, and models make a few), and a caller may
# send as many back (`validation`), so that every answer can go on to its next turn.
# Past it, converting millions of them would hold the event loop.
MAX_TOOL_CALLS_PER_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool the model asked for; `arguments` is JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call of a stream: id and name on the call's first piece, and
    `arguments` pieces to append, by `index`."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation.

    `tool_calls` only on an assistant message (its content may then be empty), and
    `tool_call_id` only on a tool message: the call it answers. `reasoning`, only on an
    assistant message, is the reasoning it came with, sent back upstream.
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is a JSON Schema object as JSON text
    ("" for none)."""

    name: str
    description: str = ""
    parameters: str = ""


class ToolChoiceMode(enum.StrEnum):
    """Whether the model may, must or must not call tools, spelled as OpenAI spells it."""

    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """A request's tool choice: a mode, or the one tool the model must call (neither set:
    the upstream's default)."""

    mode: ToolChoiceMode | None = None
    function_name: str = ""
    # Whether the request chose anything. Kept, not a property: validation, the request's
    # body and its cache key ask it of every call, most of which choose nothing.
    is_set: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_set", self.mode is not None or bool(self.function_name))


class ResponseFormatType(enum.StrEnum):
    """The shape of an answer, spelled as the OpenAI API spells it."""

    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


# The name a schema left unnamed is sent with, as the contract says (OpenAI requires one).
DEFAULT_SCHEMA_NAME = "response"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """JSON mode, or structured output following `json_schema` (a JSON object as text)."""

    type: ResponseFormatType
    json_schema: str = ""
    schema_name: str = ""
    is_strict: bool = False


class ReasoningEffort(enum.StrEnum):
    """How much a reasoning model thinks; the value is OpenAI's `reasoning_effort`."""

    NONE = "none"
    MINIMAL = "minimal"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    XHIGH = "xhigh"
    MAX = "max"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling parameters; None means unset, which differs from zero."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    # None: the upstream's default (its `extra_body`'s, if it sets one).
    reasoning_effort: ReasoningEffort | None = None


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A request's cache mode and TTL override (None: the configured default)."""

    mode: CacheMode | None = None
    ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion as the caller asked for it."""

    model: str
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()
    cache: CachePolicy = CachePolicy()
    truncation: TruncationMode | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    tenant: str = "default"
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()


# The most tokens one count of a call's `Usage` may be: far beyond any real call (no model
# takes a billion-token prompt), and the most one call adds to a Redis usage row's 64-bit
# token counts (`service.ledger` leaves a row alone within this of 2^63). Its cost may
# pass 2^63 pico-dollars: the ledgers count it exactly.
MAX_TOKEN_COUNT = 2**32


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call; `estimated` when the upstream reported none.

    `reasoning_tokens` are part of `output_tokens` (billed as output): those the model
    spent reasoning, as the upstream reported them, else 0.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    is_estimated: bool = False
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            is_estimated=self.is_estimated or other.is_estimated,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent on one call; `queued_ms` is its wait on the gateway's own limits
    and queues, within `total_ms` and apart from `upstream_ms` (the proto says which)."""

    total_ms: float = 0.0
    upstream_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    queued_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished chat completion with everything the caller is told about it.

    `reasoning` is the model's reasoning ("thinking") before its answer, when the upstream
    sent any; it is output, never part of `content`, and never sent back upstream.

    `is_cache_hit`: answered without an upstream call of the caller's own, as its response
    says; `is_coalesced` tells the hits that shared another caller's identical call
    (single flight) from those read from the store, which telemetry counts apart.
    """

    id: str
    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    cost_usd: float
    upstream: str
    attempts: int = 1
    timings: Timings = Timings()
    saved_cost_usd: float = 0.0
    is_cache_hit: bool = False
    is_coalesced: bool = False
    dropped_messages: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece of a stream's text, reasoning or tool calls (in one read, reasoning
    comes before text)."""

    content: str
    tool_calls: tuple[ToolCallDelta, ...] = ()
    reasoning: str = ""


def whole_tool_calls(calls: tuple[ToolCall, ...]) -> tuple[ToolCallDelta, ...]:
    """Each call as one stream piece with everything: how an answer not streamed live
    (a cached one, a unary one) is streamed."""
    return tuple(
        ToolCallDelta(index, call.id, call.name, call.arguments) for index, call in enumerate(calls)
    )


def _calls_of(pieces: Iterable[ToolCallDelta]) -> dict[int, tuple[str, str, list[str]]]:
    """Each call's first id and name and its arguments' pieces in order, by index, in the
    order the calls began."""
    calls: dict[int, tuple[str, str, list[str]]] = {}
    for piece in pieces:
        call = calls.get(piece.index)
        if call is None:
            calls[piece.index] = (piece.id, piece.name, [piece.arguments])
        else:
            call[2].append(piece.arguments)
    return calls


def assemble_tool_calls(pieces: Iterable[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The tool calls a stream's pieces make: by index, arguments appended in order."""
    calls = _calls_of(pieces)
    return tuple(
        ToolCall(call_id, name, "".join(arguments))
        for _, (call_id, name, arguments) in sorted(calls.items())
    )


# Pieces of one stream a holder keeps as they came before joining them (`joined_deltas`,
# `folded_chunks`): an upstream may stream millions of one-character pieces, each an
# object of about 100 bytes, where the stream's bound counts characters. Joined every so
# many, what is held stays about the size of its text; an answer of fewer is untouched.
FOLDED_EVERY = 256


def merged_pieces(pieces: Iterable[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """`pieces` as one piece per call, in the order the calls began: the first piece's id
    and name, every piece's arguments appended in order (`assemble_tool_calls` reads the
    same calls from either)."""
    calls = _calls_of(pieces)
    return tuple(
        ToolCallDelta(index, call_id, name, "".join(arguments))
        for index, (call_id, name, arguments) in calls.items()
    )


def joined_deltas(deltas: Iterable[Delta]) -> Delta:
    """`deltas` as one: their text and reasoning joined, their tool-call pieces merged."""
    held = list(deltas)
    return Delta(
        "".join(delta.content for delta in held),
        merged_pieces(piece for delta in held for piece in delta.tool_calls),
        "".join(delta.reasoning for delta in held),
    )
