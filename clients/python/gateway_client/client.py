"""`GatewayClient`: a typed asyncio client over the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import numbers
import ssl
import tempfile
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path, PurePath
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.hosts import is_loopback_host

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
Turn = tuple[str, str] | pb.Message
# A request `complete` and `stream` take as it is: the two messages have the same fields.
ReadyRequest = pb.CompleteRequest | pb.CompleteStreamRequest
_Request = TypeVar("_Request", pb.CompleteRequest, pb.CompleteStreamRequest)
_Answer = TypeVar("_Answer")
_Event = TypeVar("_Event")


class _Default(enum.Enum):
    TIMEOUT = "the client's timeout_s"


# A call's `timeout_s` left out: the client's own (`GatewayClient(timeout_s=...)`).
CLIENT_TIMEOUT: Final = _Default.TIMEOUT
Timeout = float | None | Literal[_Default.TIMEOUT]
# clients/service_config.json, linked into the package so that a wheel carries it too.
SERVICE_CONFIG_PATH = Path(__file__).with_name("service_config.json")
# A unary answer, or a batch item's, is one message, and the gateway takes upstream
# answers of up to 16 MiB: gRPC's default 4 MiB receive limit would refuse the larger ones
# after they were paid for.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
# gRPC retries a call only while its request fits the call's retry buffer, 256 KiB by
# default: a longer prompt (a 100k-token document) would get the first pushback as its
# answer. The buffer is the gateway's default `server.max_receive_message_bytes`: a request
# past it is refused in gRPC itself, RESOURCE_EXHAUSTED with no pushback, which the retry
# policy would send again four times (a 10 MB document uploaded 50 MB, seconds of backoff).
MAX_RETRIED_REQUEST_BYTES = 4 * 1024 * 1024
# The longest deadline a call takes (11.5 days). Past about 7e9 s a deadline's nanoseconds
# overflow gRPC's clock, and the call fails at once with DEADLINE_EXCEEDED, as though the
# gateway were slow; `None` is the way to ask for no deadline.
MAX_TIMEOUT_S = 1_000_000.0
# A call's deadline when neither the call nor the client sets one.
DEFAULT_TIMEOUT_S = 300.0


def _service_config() -> str:
    """The shipped retry policy; a client without it would not wait out pushbacks."""
    return SERVICE_CONFIG_PATH.read_text(encoding="utf-8")


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def reasoning_effort_value(name: str) -> pb.ReasoningEffort.ValueType:
    """The `ReasoningEffort` sent as `name` ("low", "max", ...)."""
    if name not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}")
    return pb.ReasoningEffort.Value(f"REASONING_EFFORT_{name.upper()}")


CACHE_MODES = ("default", "bypass", "refresh", "no_store")
TRUNCATION_MODES = ("none", "keep_recent")


def _message_of(turn: object, where: str) -> pb.Message:
    """`turn`, a (role, content) pair or a `pb.Message`, as a Message; `where` names it
    in errors ("prompt[2]").

    Raises:
        TypeError: `turn` is not a pair of strings or a Message.
        ValueError: its role is not one of `_ROLES`, or its content is not UTF-8 text.
    """
    if isinstance(turn, pb.Message):
        return turn
    expected = f"{where}: expected (role, content) or a Message"
    # A str is a sequence too: unpacked as a pair, "hi" became role "h" and content "i".
    if not isinstance(turn, tuple | list):
        raise TypeError(f"{expected}, got {type(turn).__name__}")
    if len(turn) != 2:
        raise TypeError(f"{expected}, got a {type(turn).__name__} of length {len(turn)}")
    role, content = turn
    if not isinstance(role, str) or not isinstance(content, str):
        wrong, name = (role, "role") if not isinstance(role, str) else (content, "content")
        raise TypeError(f"{where}: the {name} must be a str, got {type(wrong).__name__}")
    if role not in _ROLES:
        raise ValueError(f"{where}: a turn's role must be one of {', '.join(_ROLES)}, got {role!r}")
    return pb.Message(role=_ROLES[role], content=_utf8_text(content, where))


_NOT_TURNS = (bytes, bytearray, memoryview, Mapping)


def _messages_of(prompt: str | Sequence[Turn], system: str | None) -> list[pb.Message]:
    """The request's messages: `system` first, then `prompt`'s turns (a str: one user turn).

    Raises:
        TypeError, ValueError: naming the argument, and the turn by its index in `prompt`.
    """
    if isinstance(prompt, str):
        turns: list[object] = [("user", prompt)]
        names = ["prompt"]
    # Bytes (a file read in "rb") and a mapping are iterables too: read as turns, b"hi"
    # was refused as `prompt[0]: ... got int`, naming neither what was given nor the fix.
    elif isinstance(prompt, Iterable) and not isinstance(prompt, _NOT_TURNS):
        turns = list(prompt)
        names = [f"prompt[{index}]" for index in range(len(turns))]
    else:
        hint = " (decode it to a str)" if isinstance(prompt, bytes | bytearray) else ""
        raise TypeError(
            "prompt: expected a str, a sequence of turns or a CompleteRequest, "
            f"got {type(prompt).__name__}{hint}"
        )
    if system:
        turns.insert(0, ("system", system))
        names.insert(0, "system")
    return [_message_of(turn, where) for turn, where in zip(turns, names, strict=True)]


def _kind_of(field: FieldDescriptor) -> str:
    """What a GenerationParams field takes, for errors: "an int", "a float", ..."""
    if field.message_type is not None:
        return f"a pb.{field.message_type.name}"
    if field.enum_type is not None:
        return f"a name or a pb.{field.enum_type.name}"
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        kind = "float"
    elif field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        kind = "str"
    else:
        kind = "int"
    article = "an" if kind == "int" else "a"
    return f"{article} {kind} or a list of {kind}" if field.is_repeated else f"{article} {kind}"


def _generation_params(params: Mapping[str, Any]) -> pb.GenerationParams:
    """`params` as GenerationParams, each checked on its own so that an error names it.

    Raises:
        TypeError: a name GenerationParams has no field for, or a value of the wrong type.
        ValueError: a value out of its field's range.
    """
    # Protobuf takes a bool as a number for a float or an enum (temperature=True is 1.0);
    # no generation parameter is a bool.
    if not any(isinstance(value, bool) for value in params.values()):
        try:
            return pb.GenerationParams(**params)
        except (TypeError, ValueError):
            pass  # which one, and why: checked one by one below
    fields = pb.GenerationParams.DESCRIPTOR.fields_by_name
    for name, value in params.items():
        if name not in fields:
            raise TypeError(
                f"unexpected keyword argument {name!r} (generation parameters: {', '.join(fields)})"
            )
        if isinstance(value, bool):
            raise TypeError(f"{name}: expected {_kind_of(fields[name])}, got bool")
        try:
            pb.GenerationParams(**{name: value})
        except TypeError:
            raise TypeError(
                f"{name}: expected {_kind_of(fields[name])}, got {type(value).__name__}"
            ) from None
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return pb.GenerationParams(**params)


def _text_of(value: object, where: str) -> str:
    """`value`, which a string field takes; `where` names it in errors ("model").

    Raises:
        TypeError: `value` is not a str (protobuf's own error names neither field nor type).
        ValueError: `value` is not UTF-8 text (`_utf8_text`).
    """
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a str, got {type(value).__name__}")
    return _utf8_text(value, where)


def _utf8_text(text: str, where: str) -> str:
    """`text`, which protobuf can send: UTF-8 text, no lone surrogate.

    Raises:
        ValueError: naming `where` and the surrogate's index. Python holds bytes that are
            not UTF-8 as lone surrogates (a file read with `errors="surrogateescape"`);
            protobuf's own UnicodeEncodeError named no argument of the several texts.
    """
    if text.isascii():  # no surrogate: without encoding it (a flag of the str)
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where}: not UTF-8 text: a lone surrogate {text[exc.start]!r} at index "
            f"{exc.start} (bytes read with errors='surrogateescape'?)"
        ) from None
    return text


def _set_int(message: Message, field: str, value: object, *, where: str = "") -> None:
    """Set the integer field `field` of `message` to `value`; errors name `where`, the
    argument that gave it (the field's own name by default).

    Raises:
        TypeError: `value` is not an int (protobuf's own error named neither field nor
            argument: "'str' object cannot be interpreted as an integer").
        ValueError: `value` is out of the field's range.
    """
    where = where or field
    if isinstance(value, bool):  # protobuf would take True as 1
        raise TypeError(f"{where}: expected an int, got bool")
    try:
        setattr(message, field, value)  # any integer protobuf takes (numpy's too)
    except TypeError:
        raise TypeError(f"{where}: expected an int, got {type(value).__name__}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _labels_of(labels: Mapping[str, str] | None) -> dict[str, str]:
    """`labels` as a request's label map, each key and value checked to be a str.

    Raises:
        TypeError: naming the label (`labels['team']`) and the type its key or value got.
    """
    try:
        pairs = dict(labels or {})
    except (TypeError, ValueError):
        raise TypeError(
            f"labels: expected a mapping of str to str, got {type(labels).__name__}"
        ) from None
    for key, value in pairs.items():
        if not isinstance(key, str):
            raise TypeError(f"labels[{key!r}]: the key must be a str, got {type(key).__name__}")
        _text_of(value, f"labels[{key!r}]")
    return pairs


def cache_mode_value(name: str) -> pb.CacheMode.ValueType:
    """The `CacheMode` sent as `name` ("bypass", "no_store", ...)."""
    if name not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}")
    return pb.CacheMode.Value(f"CACHE_MODE_{name.upper()}")


def truncation_mode_value(name: str) -> pb.TruncationMode.ValueType:
    """The `TruncationMode` sent as `name` ("none", "keep_recent")."""
    if name not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode must be one of {', '.join(TRUNCATION_MODES)}")
    return pb.TruncationMode.Value(f"TRUNCATION_MODE_{name.upper()}")


def _cache_policy(cache: str | pb.CachePolicy | None, ttl_s: int | None) -> pb.CachePolicy | None:
    if isinstance(cache, pb.CachePolicy):
        if ttl_s is not None:
            raise ValueError("cache_ttl_s goes into the CachePolicy itself when one is given")
        return cache
    if cache is None and ttl_s is None:
        return None
    policy = pb.CachePolicy(
        mode=cache_mode_value(cache) if cache is not None else pb.CACHE_MODE_UNSPECIFIED
    )
    if ttl_s is not None:
        _set_int(policy, "ttl_seconds", ttl_s, where="cache_ttl_s")
    return policy


def _truncation_policy(
    truncation: str | pb.TruncationPolicy | None,
) -> pb.TruncationPolicy | None:
    if truncation is None or isinstance(truncation, pb.TruncationPolicy):
        return truncation
    return pb.TruncationPolicy(mode=truncation_mode_value(truncation))


def build_request(
    prompt: str | Sequence[Turn],
    *,
    model: str,
    system: str | None = None,
    labels: Mapping[str, str] | None = None,
    tools: Sequence[pb.Tool] = (),
    tool_choice: pb.ToolChoice | None = None,
    cache: str | pb.CachePolicy | None = None,
    cache_ttl_s: int | None = None,
    truncation: str | pb.TruncationPolicy | None = None,
    idempotency_key: str = "",
    **params: Any,
) -> pb.CompleteRequest:
    """A CompleteRequest from a prompt (or turns: (role, content) pairs, or `pb.Message`s
    such as tool-call turns and tool results), tools and generation params.

    `reasoning_effort` may be given by its name on the wire ("low", "max"), and `stop`
    as one string, as the OpenAI API takes it. `cache` ("default", "bypass", "refresh",
    "no_store", or a `pb.CachePolicy`), `cache_ttl_s`, `truncation` ("none",
    "keep_recent", or a `pb.TruncationPolicy`) and `idempotency_key` set the request's
    own fields; unset, the gateway's defaults apply.
    """
    effort = params.get("reasoning_effort")
    if isinstance(effort, str):
        params["reasoning_effort"] = reasoning_effort_value(effort)
    if isinstance(params.get("stop"), str):
        # Protobuf would take the string as a sequence: each character a stop sequence.
        params["stop"] = [params["stop"]]
    return pb.CompleteRequest(
        model=_text_of(model, "model"),
        messages=_messages_of(prompt, system),
        params=_generation_params(params),
        labels=_labels_of(labels),
        tools=list(tools),
        tool_choice=tool_choice,
        cache=_cache_policy(cache, cache_ttl_s),
        truncation=_truncation_policy(truncation),
        idempotency_key=_text_of(idempotency_key, "idempotency_key"),
    )


def authorization_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The caller key as call metadata.

    Raises:
        TypeError: the key is not a str (bytes, or a list, which went as `Bearer ['...']`).
        ValueError: the key has characters gRPC metadata cannot carry (only printable
            ASCII); the message never repeats the key.
    """
    if api_key is None:
        return ()
    if not isinstance(api_key, str):
        raise TypeError(f"api_key: expected a str, got {type(api_key).__name__}")
    # Before any check that names a character: a byte that is not UTF-8 (a lone
    # surrogate) is one more that metadata cannot carry, said without it or its index.
    if not all(" " <= char <= "~" for char in api_key):
        raise ValueError(
            "the caller key has characters gRPC metadata cannot carry (a stray newline?)"
        )
    if not api_key:
        return ()
    return (("authorization", f"Bearer {api_key}"),)


def _request_of(
    prompt: str | Sequence[Turn] | ReadyRequest,
    options: Mapping[str, Any],
    kind: type[_Request],
) -> _Request:
    """`prompt` as a `kind` request: built (`build_request`) with `options`, or as given,
    either message (same fields, same numbers); options beside a ready request are refused
    rather than silently left out."""
    if not isinstance(prompt, ReadyRequest):
        request: ReadyRequest = build_request(prompt, **options)
    elif options:
        raise TypeError(
            f"options {', '.join(sorted(options))} go into the {type(prompt).__name__} "
            "itself when one is given"
        )
    else:
        request = prompt
    if isinstance(request, kind):
        return request
    return kind.FromString(request.SerializeToString())


class _ClientLife:
    """Whether the client was closed, which its calls' ends read.

    Closing the channel cancels the calls still in flight, and gRPC reports each as
    `asyncio.CancelledError`: out of the call, that ended the caller's task as though
    someone had cancelled it (a TaskGroup's, or `gather`'s, with it).
    """

    def __init__(self) -> None:
        self.is_closed = False

    def is_cut_by_close(self) -> bool:
        """Whether a call that gRPC reports cancelled was cut by `close()`, not by the
        cancellation of the task awaiting it (which stays a cancellation)."""
        return self.is_closed and not _is_task_cancelling()


def _is_task_cancelling() -> bool:
    """Whether the running task is being cancelled: a `CancelledError` it gets is its own,
    not gRPC's report of a cancelled call."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancelled_call_error(details: str) -> grpc.aio.AioRpcError:
    """The failure of a call the client saw cancelled: CANCELLED, as any failed call's."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


def _closed_client_error() -> grpc.aio.AioRpcError:
    """The failure of a call cut by `close()`."""
    return _cancelled_call_error("the client was closed while the call was in flight")


class _CallEnd:
    """How a streaming call's events ended, for a loop begun after one read them to their
    end: the call's failure again, or a RuntimeError saying they were read, where grpc.aio
    would yield nothing, as though the call had answered nothing.

    A RuntimeError, as Python's own for a coroutine awaited twice (and httpx's
    `StreamConsumed`): the object is of the right type, in a state that cannot serve.

    A call cut before its end (a loop left, the client closed, the event loop it was made
    in ended) is a failure too, CANCELLED: grpc.aio reported it to the next loop as a bare
    `asyncio.CancelledError`, which ended the caller's task as though someone had
    cancelled it, and to the loop after that as no events at all.
    """

    def __init__(self, name: str, call: grpc.aio.Call, client_life: _ClientLife) -> None:
        self._name = name
        self._call = call
        self._client_life = client_life
        self._is_read = False
        self._is_cancelled = False
        self._failure: grpc.aio.AioRpcError | None = None

    def check_unread(self) -> None:
        """Raise the call's failure, or a RuntimeError, once a loop read it to its end."""
        if self._failure is not None:
            raise self._failure
        if self._is_read:
            # Its events are not kept for a replay: a long answer's would stay in memory
            # as long as the stream object did.
            raise RuntimeError(
                f"this {self._name} was read to its end already: its events are read once "
                "(keep them as they arrive, or make the call again)"
            )

    def cancel(self) -> None:
        """Cancel the call for the caller: the loops reading it end, quietly."""
        self._is_cancelled = True
        self._call.cancel()

    def leave(self) -> None:
        """The latest loop's leaving: cancel the call (a no-op once it has ended). Left
        before its end, the call fails every later loop CANCELLED."""
        is_cut = self._call.cancel()
        if is_cut and not self._is_read and self._failure is None:
            self._failure = _cancelled_call_error(
                f"this {self._name}'s call was cancelled when a loop over it was left before "
                "its end (a break, or a first event peeked and dropped before the next loop "
                "began): make the call again"
            )

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Note the end of the loop it wraps: read to its end, or failed with the call."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            self._failure = exc
            raise
        except asyncio.CancelledError:
            if _is_task_cancelling():
                # The reader's own cancellation: it stays one. grpc.aio cancelled the call
                # it waited on, and ended its events: a later loop would read none.
                if not self._is_cancelled and self._failure is None:
                    self._failure = self._cancelled_with_reader_error()
                raise
            if self._is_cancelled:
                return
            # gRPC's own cancelled call: out of the loop, it would end the caller's task.
            self._failure = self._failure or self._cut_call_error()
            raise self._failure from None
        self._is_read = True

    def _cancelled_with_reader_error(self) -> grpc.aio.AioRpcError:
        """The failure of a call cut by the cancellation of the task reading it."""
        return _cancelled_call_error(
            f"this {self._name}'s call was cancelled with the task of a loop reading it "
            "(its cancellation, or a timeout around the loop): make the call again"
        )

    def _cut_call_error(self) -> grpc.aio.AioRpcError:
        """The failure of a call gRPC reports cancelled, which neither the caller nor the
        task reading it cancelled."""
        if self._client_life.is_closed:
            return _closed_client_error()
        return _cancelled_call_error(
            f"this {self._name}'s call was cancelled before its end (a loop over it was "
            "left, or the event loop it was made in ended): make the call again"
        )


class _Readers:
    """The loops reading one streaming call's events, each through a generator of its own.

    Only the latest reader's leaving cancels the call: a first event read with
    `anext(aiter(...))` leaves a reader behind, closed whenever it is collected, and its
    close must not cut the `async for` that took over from it. Its close comes in the
    event loop's next turn: a loop begun after that begins on a call it left, and fails
    CANCELLED (`_CallEnd`), as after a `break`. A loop that would read
    while another waits for the next event (a second task's) is refused on its own: before,
    grpc.aio refused it ("asynchronous generator is already running") and its leaving
    cancelled the call, ending the first loop with a bare `CancelledError`.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._count = 0
        self._latest = 0
        self._is_waiting = False

    def new(self) -> int:
        """A number for a new reader."""
        self._count += 1
        return self._count

    def is_latest(self, reader: int) -> bool:
        """Whether `reader` read last: its leaving cancels the call."""
        return reader == self._latest

    async def events(self, call: AsyncIterable[_Event], reader: int) -> AsyncIterator[_Event]:
        """`call`'s events, read by `reader`.

        Raises:
            RuntimeError: another reader waits for the next event; the call goes on.
        """
        events = aiter(call)
        while True:
            if self._is_waiting:
                raise RuntimeError(
                    f"this {self._name} is being read by another loop (another task's): "
                    "read it in one loop, or make a call for each"
                )
            self._latest = reader
            self._is_waiting = True
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            finally:
                self._is_waiting = False
            yield event


class BatchResults:
    """A batch's events; each `async for` reads them through a generator of its own, so
    that leaving the loop closes it, and cancels the call, even while this object is
    still referenced (an iterator kept in a variable would outlive the loop); only the
    latest reader's leaving does (`_Readers`). A loop begun after one left the call before
    its end fails CANCELLED.
    """

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[pb.CompleteBatchRequest, pb.CompleteBatchResponse],
        *,
        client_life: _ClientLife | None = None,
    ) -> None:
        self._call = call
        self._readers = _Readers("BatchResults")
        self._end = _CallEnd("BatchResults", call, client_life or _ClientLife())

    def __aiter__(self) -> AsyncIterator[pb.CompleteBatchResponse]:
        return self._events(self._readers.new())

    async def _events(self, reader: int) -> AsyncIterator[pb.CompleteBatchResponse]:
        self._end.check_unread()
        try:
            async with self._end.watching():
                async for event in self._readers.events(self._call, reader):
                    yield event
        finally:
            if self._readers.is_latest(reader):
                self._end.leave()


class CompletionStream:
    """Text deltas as they arrive; afterwards `final` holds usage, cost and timings, and
    `tool_calls` the tool calls the model made, assembled from their pieces.

    `reasoning` is the model's reasoning received so far (a reasoning model's "thinking",
    which arrives before the text): all of it once the first text is yielded, or the
    stream has ended. `on_reasoning`, when given, is called with each reasoning piece as
    it arrives, to show the model working before its first text.

    Leaving the loop early (break, an exception) cancels the call, and with it the
    upstream request, even while the stream object is still referenced; as with
    `BatchResults`, only the latest loop's leaving does (a first text peeked with
    `anext(aiter(stream))` is read on by a loop that follows at once), and a loop begun
    after one left the call before its end fails CANCELLED.
    """

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[pb.CompleteStreamRequest, pb.CompleteStreamResponse],
        *,
        on_reasoning: Callable[[str], object] | None = None,
        client_life: _ClientLife | None = None,
    ) -> None:
        self._call = call
        self._on_reasoning = on_reasoning
        self.final: pb.CompletionMetadata | None = None
        self._tool_calls: list[pb.ToolCall] = []
        # Each call's argument pieces not yet joined into it: `+=` on a protobuf string
        # copies it whole, so 100,000 pieces took seconds, 400,000 over a minute.
        self._arguments: list[list[str]] = []
        self._reasoning: list[str] = []
        self._readers = _Readers("CompletionStream")
        self._end = _CallEnd("CompletionStream", call, client_life or _ClientLife())

    @property
    def reasoning(self) -> str:
        """The reasoning pieces received so far, joined."""
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[pb.ToolCall]:
        """The tool calls received so far, each with its argument pieces joined."""
        self._join_arguments()
        return self._tool_calls

    def _join_arguments(self) -> None:
        """Join each call's argument pieces received so far into it."""
        for call, pieces in zip(self._tool_calls, self._arguments, strict=True):
            if pieces:
                call.arguments = "".join([call.arguments, *pieces])
                pieces.clear()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts(self._readers.new())

    def cancel(self) -> None:
        """Stop the call, and the loop reading it; the gateway closes the upstream request
        at once."""
        self._end.cancel()

    def _gather(self, event: pb.CompleteStreamResponse) -> str:
        """Keep what `event` carries besides text (the final message, reasoning, tool call
        pieces); its text, if any."""
        if event.HasField("final"):
            self.final = event.final
            return ""
        if event.delta.reasoning:
            self._reasoning.append(event.delta.reasoning)
            if self._on_reasoning is not None:
                self._on_reasoning(event.delta.reasoning)
        for piece in event.delta.tool_calls:
            if piece.index == len(self._tool_calls):
                self._tool_calls.append(pb.ToolCall(id=piece.id, name=piece.name))
                self._arguments.append([])
            self._arguments[piece.index].append(piece.arguments)
        return event.delta.content

    async def _texts(self, reader: int) -> AsyncIterator[str]:
        self._end.check_unread()
        try:
            async with self._end.watching():
                async for event in self._readers.events(self._call, reader):
                    if text := self._gather(event):
                        yield text
        finally:
            # Whole at the end, for a list (or a call) of `tool_calls` kept from earlier.
            self._join_arguments()
            if self._readers.is_latest(reader):
                self._end.leave()


def _resolved_target(address: str) -> str:
    """The `HOST:PORT` that gRPC resolves for the target `address`, read as gRPC reads it:
    a URI whose `dns:` scheme goes in any case, with or without `//DNS-SERVER/`, whose
    escapes (`%3A`) are decoded, and whose query or fragment (`?x`, `#x`) and trailing
    blanks are left out."""
    target = address
    if target[:4].lower() == "dns:":
        target = target[4:]
        if target.startswith("//"):
            target = target[2:].partition("/")[2]  # past the DNS server to ask, if any
    return unquote(target.partition("?")[0].partition("#")[0]).rstrip()


def _listed_addresses(target: str) -> list[str]:
    """The addresses a resolved target names: each of an `ipv4:`/`ipv6:` list's (`ipv4:
    HOST:PORT,HOST:PORT`), else the target itself."""
    if target[:5].lower() in ("ipv4:", "ipv6:"):
        return target[5:].split(",")
    return [target]


def is_loopback_address(address: str) -> bool:
    """Whether a gRPC target (`HOST:PORT`, `[V6]:PORT`, `dns:///HOST:PORT`, any form
    `_resolved_target` reads) names this machine (`service.hosts.is_loopback_host`); an
    `ipv4:`/`ipv6:` list does when each of its addresses does."""
    listed = _listed_addresses(_resolved_target(address))
    return all(_is_loopback_host_port(each) for each in listed)


def _is_loopback_host_port(target: str) -> bool:
    """Whether one `HOST:PORT`, `[V6]:PORT` or bare host names this machine."""
    if target.startswith("["):
        host = target[1:].partition("]")[0]
    elif target.count(":") == 1:
        host = target.partition(":")[0]
    else:
        host = target
    return is_loopback_host(host)


def check_address(address: str) -> None:
    """Refuse a gRPC target gRPC would misread: an empty one, one not UTF-8 text, or a
    `HOST:PORT` (also as `dns:///HOST:PORT`, `dns:HOST:PORT`, `dns://DNS-SERVER/HOST:PORT`,
    or in an `ipv4:`/`ipv6:` list) whose port is not 1..65535 written in digits alone.

    gRPC takes a port past 65535 modulo 65536 (`:115587` is `:50051`), reads a sign or a
    leading blank (`:-15485` is `:50051` too, `:+50051` and `: 50051` are `:50051`), and
    an empty port (`HOST:`, a script's unset variable) as 443: it would send the calls, and
    the caller key with them, to whatever listens there.

    Raises:
        ValueError: the address, and what is wrong with it.
    """
    if not address:
        raise ValueError("the gateway's address is empty: give HOST:PORT")
    if not address.isascii() and not _is_utf8(address):
        # Bytes of an argument or variable that are not UTF-8, which Python holds as lone
        # surrogates: gRPC's own encoding of the target failed in a traceback.
        raise ValueError(f"{address!r}: the address is not UTF-8 text")
    # Read as gRPC reads it: a port with trailing blanks (`:115587 `) or escaped colons
    # (`%3A115587`) is still that port.
    target = _resolved_target(address)
    if target[:5].lower() == "unix:" or target[:14].lower() == "unix-abstract:":
        return  # a socket's path or name, not HOST:PORT
    # `ipv4:`/`ipv6:` name a list of addresses, each with its port: gRPC refuses a port
    # past 65535 there only as each call fails UNKNOWN ("the target uri is not valid").
    for each in _listed_addresses(target):
        port = _port_of(each)
        if port is not None and not _is_port_number(port):
            raise ValueError(f"{address!r}: the port must be 1..65535, in digits alone")


def _port_of(target: str) -> str | None:
    """The port text one `HOST:PORT` or `[V6]:PORT` names, as written (`""` for `HOST:`),
    or None when it names none: a bare host, a bare IPv6 address (`::1`, whose colons are
    its own), or a target that is no `HOST:PORT` (a path)."""
    if "/" in target:
        return None
    if target.startswith("["):
        rest = target.partition("]")[2]
        return rest[1:] if rest.startswith(":") else None
    host, sep, port = target.rpartition(":")
    return port if sep and host and ":" not in host else None


def _is_port_number(port: str) -> bool:
    """Whether `port` is a port number as written in digits alone: 1..65535.

    Not `int(port)`, which takes a sign and blanks (`"+1"`, `" 1"`, `"-1"`) that gRPC
    reads its own way; `str.isdigit` takes other scripts' digits too (fullwidth `"\\uff15"`).
    """
    return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def _is_utf8(text: str) -> bool:
    """Whether `text` encodes to UTF-8: no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_timeout(timeout_s: float | None) -> float | None:
    """`timeout_s`, a call's deadline in seconds (None: none), when gRPC can keep it.

    Raises:
        TypeError: not a number (a str of seconds is not read as one).
        ValueError: nan, or past `MAX_TIMEOUT_S` (infinity included).
    """
    # Any real number (numpy's too), but not a bool, nor a str of seconds.
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real | None):
        raise TypeError(f"timeout_s: expected seconds or None, got {type(timeout_s).__name__}")
    if timeout_s is not None and not timeout_s <= MAX_TIMEOUT_S:  # nan fails it too
        raise ValueError(
            f"timeout_s must be at most {MAX_TIMEOUT_S:g} seconds, or None for no deadline; "
            f"got {timeout_s}"
        )
    return None if timeout_s is None else float(timeout_s)


def _pem_bytes(pem: object, name: str) -> bytes | None:
    """`pem`, the argument `name`, as the bytes gRPC takes: a str (a PEM read as text, from
    a file or a secret store) encoded as ASCII, which every PEM is (RFC 7468).

    Raises:
        TypeError: neither bytes, str nor None, naming the argument (never its value).
        ValueError: a str with characters no PEM has.
    """
    if pem is None or isinstance(pem, bytes):
        return pem
    if isinstance(pem, str):
        if not pem.isascii():
            raise ValueError(f"{name}: a PEM is ASCII text; this str has other characters")
        return pem.encode("ascii")
    hint = (
        " (a file's path: give its contents, path.read_bytes())"
        if isinstance(pem, PurePath)
        else ""
    )
    raise TypeError(f"{name}: expected PEM bytes or str, got {type(pem).__name__}{hint}")


def tls_credentials(
    *,
    root_certificates: bytes | str | None = None,
    certificate_chain: bytes | str | None = None,
    private_key: bytes | str | None = None,
) -> grpc.ChannelCredentials:
    """`grpc.ssl_channel_credentials` (PEM bytes, or a str of PEM text; no root
    certificates: gRPC's own), with a client certificate and key checked to be a pair
    before any call.

    gRPC checks the pair only when it connects, and then fails every call `UNAVAILABLE`
    ("Failed to create security handshaker") once its retries are spent.

    Raises:
        TypeError: a PEM neither bytes nor str (a `Path`), naming the argument.
        ValueError: root certificates holding no PEM certificate (a key, the wrong file),
            a certificate without its key (or a key without its certificate), or a key
            that is not the certificate's, or either of them not PEM gRPC can use (an
            encrypted key), or a str PEM with characters other than ASCII.
    """
    root_certificates = _pem_bytes(root_certificates, "root_certificates")
    certificate_chain = _pem_bytes(certificate_chain, "certificate_chain")
    private_key = _pem_bytes(private_key, "private_key")
    if root_certificates is not None and not holds_certificate(root_certificates):
        # gRPC would take them, trust nothing, and fail every call `UNAVAILABLE`.
        raise ValueError("the root certificates hold no PEM certificate")
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate and its private key go together")
    if certificate_chain is not None and private_key is not None:
        check_key_pair(certificate_chain, private_key)
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def holds_certificate(pem: bytes) -> bool:
    """Whether `pem` holds a PEM certificate (not only a key or a certificate request)."""
    return b"-----BEGIN CERTIFICATE-----" in pem


def check_key_pair(certificate_chain: bytes, private_key: bytes) -> None:
    """Refuse a client certificate and key that are not a pair, as OpenSSL judges them.

    Raises:
        ValueError: saying which, never repeating the key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # judge the pair, not the key sizes gRPC takes
    # `load_cert_chain` reads files only: the PEM goes into a directory only this user
    # may enter (mode 0700), removed as soon as it is read.
    with tempfile.TemporaryDirectory(prefix="gateway-client-") as directory:
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(certificate_chain)
        key_file.write_bytes(private_key)
        try:
            # A password callback, so that an encrypted key fails here rather than prompting.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(
                    "the private key is not the client certificate's (the key of another one?)"
                ) from None
            raise ValueError(
                "the client certificate and key must be a PEM certificate and its "
                "unencrypted PEM private key"
            ) from None


def aware(when: datetime.datetime, *, name: str) -> datetime.datetime:
    """`when`, which says its time zone.

    A naive datetime is refused rather than guessed at: protobuf reads it as UTC,
    `datetime.timestamp()` as local time, and either guess shifts a window by the
    machine's UTC offset without a word.

    Raises:
        TypeError: `when` is not a datetime (an ISO string), naming it.
        ValueError: `when` is naive; the message names the fix.
    """
    if not isinstance(when, datetime.datetime):
        raise TypeError(f"{name}: expected a datetime, got {type(when).__name__}")
    if when.utcoffset() is None:
        raise ValueError(
            f"{name} has no time zone: give an aware datetime, such as datetime.now(timezone.utc)"
        )
    return when


class GatewayClient:
    """Calls one gateway; `async with GatewayClient("127.0.0.1:50051") as client:`."""

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`channel_options`: gRPC channel arguments, each replacing the client's own of its
        name, such as `("grpc.lb_policy_name", "round_robin")` to spread calls over
        every address a headless Service resolves to."""
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(json.loads(_service_config()))),
            ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            ("grpc.per_rpc_retry_buffer_size", MAX_RETRIED_REQUEST_BYTES),
        ]
        check_address(address)
        # Checked before the channel is made, which a refused option would leave open.
        self._metadata = authorization_metadata(api_key)
        self._timeout_s = check_timeout(timeout_s)
        if is_loopback_address(address):
            # gRPC reads `http_proxy`/`https_proxy` itself, and would send the calls to a
            # gateway on this machine through a proxy that cannot reach its loopback.
            options.append(("grpc.enable_http_proxy", 0))
        # gRPC takes the first of two arguments with one name: the caller's replace ours.
        given = {name for name, _ in channel_options}
        options = [option for option in options if option[0] not in given]
        options.extend(channel_options)
        self._address, self._credentials, self._options = address, credentials, options
        self._channel: grpc.aio.Channel | None = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        self._stub: pb_grpc.CompletionServiceStub | None = None
        self._life = _ClientLife()
        with contextlib.suppress(RuntimeError):  # made outside any loop: at its first call
            self._open_channel(asyncio.get_running_loop())

    @property
    def stub(self) -> pb_grpc.CompletionServiceStub:
        """The generated stub, on the client's channel for the running event loop.

        A grpc.aio channel serves the loop it was made in only, and failed every call of
        another ("attached to a different loop", "Event loop is closed"): a client made
        outside any loop (a module's global) makes its channel at its first call, and
        one whose loop no longer runs (an earlier `asyncio.run`, or a loop's
        `run_until_complete` that returned, the loop left stopped but not closed) makes a
        new one.

        Raises:
            RuntimeError: no event loop runs, or the channel's loop still runs (in
                another thread): a channel cannot serve two loops.
            grpc.aio.UsageError: the client is closed.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._channel_loop:
            self._open_channel(loop)
        assert self._stub is not None
        return self._stub

    def _open_channel(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the client's channel for `loop`, in place of one whose loop no longer runs
        (closed, or stopped and left unclosed)."""
        if self._life.is_closed:
            raise grpc.aio.UsageError("the GatewayClient is closed")
        if self._channel_loop is not None and self._channel_loop.is_running():
            raise RuntimeError(
                "this GatewayClient's channel serves another event loop, which still runs "
                "(in another thread): make a GatewayClient in each event loop"
            )
        # The channel of a loop that no longer runs, if any, is closed as it is collected:
        # its `await channel.close()` would need that loop running.
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(
                self._address, self._credentials, options=self._options
            )
        else:
            self._channel = grpc.aio.insecure_channel(self._address, options=self._options)
        self._channel_loop = loop
        self._stub = pb_grpc.CompletionServiceStub(self._channel)

    def _deadline(self, timeout_s: Timeout) -> float | None:
        return self._timeout_s if timeout_s is CLIENT_TIMEOUT else check_timeout(timeout_s)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; a call still in flight fails `CANCELLED`, an `AioRpcError`
        as any failed call, in the task awaiting it."""
        self._life.is_closed = True
        if self._channel is not None:
            await self._channel.close()

    async def _answer(self, call: Awaitable[_Answer]) -> _Answer:
        """The answer of the unary `call`; cut by `close()`, it fails `CANCELLED`."""
        try:
            return await call
        except asyncio.CancelledError:
            if self._life.is_cut_by_close():
                raise _closed_client_error() from None
            raise

    async def complete(
        self,
        prompt: str | Sequence[Turn] | ReadyRequest,
        *,
        timeout_s: Timeout = CLIENT_TIMEOUT,
        **kwargs: Any,
    ) -> pb.CompleteResponse:
        """One completion; `prompt` may be turns (as `build_request`) or a ready
        CompleteRequest (or CompleteStreamRequest). Every method takes `timeout_s`, this
        call's deadline in seconds (None: none), else the client's."""
        request = _request_of(prompt, kwargs, pb.CompleteRequest)
        return await self._answer(
            self.stub.Complete(request, timeout=self._deadline(timeout_s), metadata=self._metadata)
        )

    def stream(
        self,
        prompt: str | Sequence[Turn] | ReadyRequest,
        *,
        timeout_s: Timeout = CLIENT_TIMEOUT,
        on_reasoning: Callable[[str], object] | None = None,
        **kwargs: Any,
    ) -> CompletionStream:
        """A streamed completion: iterate for text, then read `.final`; `prompt` as
        `complete` takes it, a ready CompleteStreamRequest or CompleteRequest included.
        `on_reasoning(piece)` is called with each piece of reasoning as it arrives."""
        request = _request_of(prompt, kwargs, pb.CompleteStreamRequest)
        call = self.stub.CompleteStream(
            request, timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return CompletionStream(call, on_reasoning=on_reasoning, client_life=self._life)

    def complete_batch(
        self,
        items: Sequence[pb.BatchItem],
        *,
        concurrency: int = 0,
        timeout_s: Timeout = CLIENT_TIMEOUT,
    ) -> BatchResults:
        """Run a batch: each item's result as it finishes, then the summary.

        Leaving the loop early, or cancelling the task, cancels the call and, on the
        gateway, every upstream request still in flight.
        """
        request = pb.CompleteBatchRequest(items=items)
        _set_int(request, "concurrency", concurrency)
        call = self.stub.CompleteBatch(
            request,
            timeout=self._deadline(timeout_s),
            metadata=self._metadata,
        )
        return BatchResults(call, client_life=self._life)

    async def summarize(
        self,
        document: str,
        *,
        model: str,
        target_tokens: int = 0,
        instructions: str = "",
        labels: Mapping[str, str] | None = None,
        reasoning_effort: str | None = None,
        timeout_s: Timeout = CLIENT_TIMEOUT,
    ) -> pb.SummarizeResponse:
        """Summarise a document of any length; `reasoning_effort` by name ("low").

        The response's `finish_reason` is `FINISH_REASON_LENGTH` when `target_tokens` cut
        the summary off, and `parts_cut` counts part summaries cut before combining.
        """
        request = pb.SummarizeRequest(
            model=_text_of(model, "model"),
            document=_text_of(document, "document"),
            instructions=_text_of(instructions, "instructions"),
            labels=_labels_of(labels),
            reasoning_effort=(
                reasoning_effort_value(reasoning_effort)
                if reasoning_effort
                else pb.REASONING_EFFORT_UNSPECIFIED
            ),
        )
        _set_int(request, "target_tokens", target_tokens)
        return await self._answer(
            self.stub.Summarize(request, timeout=self._deadline(timeout_s), metadata=self._metadata)
        )

    async def list_models(self, *, timeout_s: Timeout = CLIENT_TIMEOUT) -> pb.ListModelsResponse:
        """The model catalog with upstream health."""
        return await self._answer(
            self.stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout_s), metadata=self._metadata
            )
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata (the caller key) for direct stub calls."""
        return self._metadata

    async def usage(
        self,
        *,
        tenant: str = "",
        model: str = "",
        labels: Mapping[str, str] | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        page_size: int = 0,
        timeout_s: Timeout = CLIENT_TIMEOUT,
    ) -> pb.GetUsageResponse:
        """Requests, tokens and cost recorded by the gateway, filtered: every matching row,
        read page by page (`usage_pages`), as one response; `since` and `until` are aware
        datetimes (`datetime.now(timezone.utc)`, any zone).

        The rows are each page's in turn; `total` is the last page's (the sum of every
        matching row as that page was read). `page_size` is the rows each call asks for
        (0: the gateway's default, 1,000), and `timeout_s` bounds each call.

        Raises:
            ValueError: `since` or `until` is naive, before any call.
        """
        whole = pb.GetUsageResponse()
        async for page in self.usage_pages(
            tenant=tenant, model=model, labels=labels, since=since, until=until,
            page_size=page_size, timeout_s=timeout_s,
        ):  # fmt: skip
            whole.rows.extend(page.rows)
            whole.total.CopyFrom(page.total)
        return whole

    async def usage_pages(
        self,
        *,
        tenant: str = "",
        model: str = "",
        labels: Mapping[str, str] | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: Timeout = CLIENT_TIMEOUT,
    ) -> AsyncIterator[pb.GetUsageResponse]:
        """Each page of `usage`'s answer as the gateway sends it, with its `total` and
        `next_page_token`, from the first page or from `page_token` (a page's
        `next_page_token`, with the same filters) on; `timeout_s` bounds each call.

        Raises:
            ValueError: `since` or `until` is naive, before any call.
        """
        request = pb.GetUsageRequest(
            tenant=_text_of(tenant, "tenant"),
            model=_text_of(model, "model"),
            labels=_labels_of(labels),
            page_token=_text_of(page_token, "page_token"),
        )
        _set_int(request, "page_size", page_size)
        if since is not None:
            request.start_time.FromDatetime(aware(since, name="since"))
        if until is not None:
            request.end_time.FromDatetime(aware(until, name="until"))
        while True:
            page = await self._answer(
                self.stub.GetUsage(
                    request, timeout=self._deadline(timeout_s), metadata=self._metadata
                )
            )
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token
