"""A tracer of the OpenTelemetry API whose spans cost a fraction of the SDK's.

Why by hand: the SDK's span validates and cleans every attribute value on the way in
(`BoundedAttributes`), takes a lock per call and builds a second object when it ends:
about 40 µs of CPU a span, two spans a call, a quarter of the gateway's throughput with
tracing on (`bench/README.md`). These spans keep their attributes in a plain dict and
end straight into the SDK's span processors as the `ReadableSpan` its exporters take.

Everything that shapes what is exported still comes from the SDK's `TracerProvider`:
its sampler (`OTEL_TRACES_SAMPLER`), resource, id generator and span limits. What is
left out is what this gateway never relies on:
- attribute values are not cleaned: every value the gateway sets is typed as an
  `AttributeValue` (a string, bool, number or a sequence of one of them), and `None`
  is dropped as the SDK drops it;
- no locks: a span belongs to the one asyncio task of its RPC;
- processors are told when spans end, not when they start (the gateway's are batch or
  simple exporting processors, whose `on_start` does nothing).
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from random import getrandbits
from time import time_ns
from typing import cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
    sampling,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    DEFAULT_TRACE_STATE,
    INVALID_SPAN_CONTEXT,
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util import types

log = logging.getLogger("llm_gateway.telemetry")

_UNSET = Status(StatusCode.UNSET)
# A span's trace flags by (sampled, random trace id), built once.
_FLAGS = {
    (is_sampled, is_random): TraceFlags(
        (TraceFlags.SAMPLED if is_sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if is_random else 0)
    )
    for is_sampled in (False, True)
    for is_random in (False, True)
}
_TRACE_ID_BITS = (1 << 128) - 1  # the low 128 bits of a draw of 192 (`LeanTracer.start_span`)
_RATIO_TRACE_ID_BITS = sampling.TraceIdRatioBased.TRACE_ID_LIMIT  # what its ratio decides on
# `ParentBased`'s delegates by default: a child samples as its parent did, remote or local.
_PARENTS_DELEGATES = {
    "_remote_parent_sampled": sampling.ALWAYS_ON,
    "_remote_parent_not_sampled": sampling.ALWAYS_OFF,
    "_local_parent_sampled": sampling.ALWAYS_ON,
    "_local_parent_not_sampled": sampling.ALWAYS_OFF,
}
_SPAN_ID_MAX = (1 << 64) - 1


class LeanTracer(trace.Tracer):
    """Starts `LeanSpan`s as `provider` configures them, ending into `processors`.

    `processors` are the ones added to `provider` (`add_span_processor`), which flushes
    and shuts them down, so ended spans are exported, flushed and dropped exactly as the
    SDK's own spans are.
    """

    def __init__(
        self, provider: TracerProvider, processors: Sequence[SpanProcessor], *, scope_name: str
    ) -> None:
        self.processors = tuple(processors)
        self.resource = provider.resource
        self._sampler = provider.sampler
        # The bound a root's trace id is sampled under when the sampler samples what the
        # parent sampled and decides a root by its trace id (every `parentbased_*`
        # sampler OTEL_TRACES_SAMPLER names, the default `parentbased_always_on`
        # included): decided inline, as its `should_sample` decides, without its calls.
        # None: the sampler is asked.
        self._root_bound = _root_bound(self._sampler)
        self._ids = provider.id_generator
        self._random_trace_ids = bool(self._ids.is_trace_id_random())  # a key of `_FLAGS`
        # The SDK's default generator draws ids as `random.getrandbits`: drawn here the
        # same way, without its two calls an id (any other generator is asked).
        self._draws_ids = type(self._ids) is RandomIdGenerator
        self.scope = InstrumentationScope(scope_name)
        self.limits = SpanLimits()  # read from OTEL_SPAN_* and OTEL_ATTRIBUTE_* as the SDK does
        self._ends = tuple(_ender(processor) for processor in self.processors)

    def start_span(  # noqa: PLR0917  # the API's signature
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        """A span under `context`'s (else the current) span, sampled by the provider's sampler."""
        # `current_span(context).get_span_context()`, without calling either for no span
        # (an RPC whose caller sent no trace context) or one of the gateway's own (an
        # attempt's parent, its RPC's). `in` and indexing: a `Context` is a dict.
        parent_context = context if context is not None else _current_context()
        found = parent_context[_SPAN_KEY] if _SPAN_KEY in parent_context else None  # noqa: SIM401
        if found is None:
            parent = INVALID_SPAN_CONTEXT
        elif type(found) is LeanSpan:
            parent = found._context  # type: ignore[assignment]  # always given: see `__init__`
        elif type(found) is trace.NonRecordingSpan:  # an unsampled parent's span
            parent = found.get_span_context()
        else:
            parent = current_span(parent_context).get_span_context()
        # A SpanContext is a tuple: one unpacking instead of a property call per field.
        parent_trace_id, _, _, parent_flags, parent_state, has_parent = parent
        span_id = 0  # 0: not drawn yet (or drawn as the invalid 0), asked of the generator
        if has_parent:
            trace_id = parent_trace_id
            random_trace_id = bool(parent_flags & TraceFlags.RANDOM_TRACE_ID)
            if self._draws_ids:
                span_id = getrandbits(64)
        elif self._draws_ids:
            # A root's two ids in one draw: its low 128 bits are what the SDK's
            # `generate_trace_id` would draw, its high 64 its `generate_span_id` next.
            ids = getrandbits(192)
            trace_id, span_id = ids & _TRACE_ID_BITS, ids >> 128
            if not trace_id:  # the invalid 0, which the SDK's generator draws again
                trace_id = self._ids.generate_trace_id()
            random_trace_id = True
        else:
            trace_id = self._ids.generate_trace_id()
            random_trace_id = self._random_trace_ids
        root_bound = self._root_bound
        if root_bound is not None:
            # `ParentBased` with its default delegates, decided inline: its calls cost a
            # few µs a span (twenty-odd calls). A child is sampled as its parent was, with
            # its parent's trace state; a root by the low 64 bits of its trace id, as
            # `TraceIdRatioBased` decides (always, or never, for the static samplers).
            if has_parent:
                is_sampled = bool(parent_flags & TraceFlags.SAMPLED)
                trace_state = parent_state
            else:
                is_sampled = trace_id & _RATIO_TRACE_ID_BITS < root_bound
                trace_state = None
            initial = attributes if is_sampled else None
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            # RECORD_ONLY is not told apart: exporting processors drop unsampled spans.
            is_sampled = result.decision is sampling.Decision.RECORD_AND_SAMPLE
            trace_state, initial = result.trace_state, result.attributes
        span_id = span_id or self._ids.generate_span_id()
        # What `SpanContext(trace_id, span_id, False, flags, trace_state)` makes, without
        # its constructor's Python frame (a test holds the two equal).
        span_context: SpanContext = tuple.__new__(
            SpanContext,
            (
                trace_id,
                span_id,
                False,
                _FLAGS[is_sampled, random_trace_id],
                trace_state if trace_state is not None else DEFAULT_TRACE_STATE,
                0 < trace_id <= _TRACE_ID_BITS and 0 < span_id <= _SPAN_ID_MAX,
            ),
        )
        if not is_sampled:
            return trace.NonRecordingSpan(span_context)
        return LeanSpan(
            self,
            name,
            span_context,
            parent=parent if has_parent else None,
            kind=kind,
            attributes=initial,
            links=links or (),
            start_time=start_time if start_time is not None else time_ns(),
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # noqa: PLR0917  # the API's
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        """`start_span`, made the current span for the block."""
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span: attributes in a dict; once ended, it is its own read-only view.

    As the SDK's own span, it is also the `ReadableSpan` the processors take, so ending
    it builds nothing more: it takes no change once ended, so it is not copied.
    """

    def __init__(
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext,
        *,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, types.AttributeValue] | None,
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        # `ReadableSpan.__init__`'s fields set here rather than through its keyword
        # call (a test holds them to the constructor's, should an SDK release add one).
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_info = None
        self._instrumentation_scope = tracer.scope
        self._parent = parent
        self._start_time = start_time
        self._end_time: int | None = None
        self._links = tuple(links)
        self._resource = tracer.resource
        self._status = _UNSET
        self._tracer = tracer
        copied = dict(attributes) if attributes else {}
        if None in copied.values():  # dropped, as the SDK drops them
            copied = {key: value for key, value in copied.items() if value is not None}
        self._attributes: dict[str, types.AttributeValue] | BoundedAttributes = copied
        self._events: BoundedList[Event] | tuple[()] = ()

    def get_span_context(self) -> SpanContext:
        """The span's trace and span ids, and whether it is sampled."""
        return self._context  # type: ignore[return-value]  # always given: see `__init__`

    def is_recording(self) -> bool:
        """Whether it still takes attributes (until it ends)."""
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """Set one attribute (`None` is dropped, as the SDK drops it)."""
        if self._end_time is None and value is not None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set several attributes at once."""
        if self._end_time is None:
            if None in attributes.values():
                attributes = {key: value for key, value in attributes.items() if value is not None}
            self._attributes.update(attributes)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        """Add an event (a retry, an exception), kept within the span limits."""
        if self._end_time is not None:
            return
        limits = self._tracer.limits
        if isinstance(self._events, tuple):
            self._events = BoundedList(limits.max_events)
        self._events.append(
            Event(
                name,
                BoundedAttributes(
                    limits.max_event_attributes,
                    attributes,
                    max_value_len=limits.max_attribute_length,
                    immutable=True,
                ),
                timestamp,
            )
        )

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Link another span (kept only while the span records)."""
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status; as in the SDK, OK is final and UNSET changes nothing."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Record `exception` as an `exception` event, as the SDK does."""
        kind = type(exception)
        module = kind.__module__
        event: dict[str, types.AttributeValue] = {
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(
        self,
        end_time: int | None = None,
        *,
        attributes: Mapping[str, types.AnyValue] | None = None,
    ) -> None:
        """End the span and hand it to the processors (a second `end` is ignored), with
        `attributes` set first when given: `set_attributes` and `end` in one call."""
        if self._end_time is not None:
            log.warning("telemetry.span_ended_twice", extra={"span": self._name})
            return
        if attributes is not None:
            if None in attributes.values():
                attributes = {key: value for key, value in attributes.items() if value is not None}
            self._attributes.update(attributes)
        self._end_time = end_time if end_time is not None else time_ns()
        tracer = self._tracer
        most, longest = tracer.limits.max_span_attributes, tracer.limits.max_span_attribute_length
        if longest is not None or (most is not None and len(self._attributes) > most):
            # Limits an operator set (the defaults are far above a gateway span's size).
            self._attributes = BoundedAttributes(
                most, self._attributes, immutable=True, max_value_len=longest
            )
        for on_end in tracer._ends:
            on_end(self)


def _root_bound(sampler: sampling.Sampler) -> int | None:
    """The bound under which `sampler` samples a root span's trace id (the low 64 bits),
    when it is a `ParentBased` with its default delegates whose root sampler is the
    SDK's ratio or always-on or always-off one; else None (`LeanTracer` asks it).

    Read from the sampler's private fields, as no public accessor exists; a sampler
    without them (an SDK release that moved them) is asked as any other."""
    if type(sampler) not in {sampling.ParentBased, sampling.ParentBasedTraceIdRatio}:
        return None
    for name, delegate in _PARENTS_DELEGATES.items():
        if getattr(sampler, name, None) is not delegate:
            return None
    root = getattr(sampler, "_root", None)
    if root is sampling.ALWAYS_ON:
        return _RATIO_TRACE_ID_BITS + 1
    if root is sampling.ALWAYS_OFF:
        return 0
    if type(root) is sampling.TraceIdRatioBased:
        return root.bound
    return None


def _ender(processor: SpanProcessor) -> Callable[[ReadableSpan], None]:
    """What ends a span into `processor`: its `on_end`, or for the SDK's batch processor
    the queue's `emit` its `on_end` calls once it has checked the span is sampled, as
    every `LeanSpan` is (an unsampled span is a `NonRecordingSpan`, never ended into a
    processor). Two spans a call, each saving four calls. An SDK whose batch processor
    moved its queue keeps `on_end`."""
    if type(processor) is BatchSpanProcessor:
        emit = getattr(getattr(processor, "_batch_processor", None), "emit", None)
        if callable(emit):
            return cast(Callable[[ReadableSpan], None], emit)
    return processor.on_end


def _runtime_context_variable() -> ContextVar[Context] | None:
    """The variable OpenTelemetry's default runtime context keeps the current context in,
    read and set here in one call where its API takes three; None when another runtime
    context is configured (`OTEL_PYTHON_CONTEXT`) or an API release moved it: the API is
    used then."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(variable, ContextVar):
        return variable
    return None


_CONTEXT_VARIABLE = _runtime_context_variable()
_current_context: Callable[[], Context] = (
    _CONTEXT_VARIABLE.get if _CONTEXT_VARIABLE is not None else otel_context.get_current
)
# `context.get_current`, in one call rather than three.
current_context = _current_context
_attach: Callable[[Context], Token[Context]] = (
    _CONTEXT_VARIABLE.set if _CONTEXT_VARIABLE is not None else otel_context.attach
)


def current_span(context: Context | None = None) -> trace.Span:
    """`trace.get_current_span`, in one call rather than four, and without its ABC
    check when the span is one of the gateway's own, sampled or not (or there is none)."""
    if context is None:
        context = _current_context()
    # `in` and indexing rather than `get`: a call fewer (a `Context` is a dict).
    span = context[_SPAN_KEY] if _SPAN_KEY in context else None  # noqa: SIM401
    kind = type(span)
    if kind is LeanSpan or kind is trace.NonRecordingSpan:  # the gateway's, sampled or not
        return span  # type: ignore[return-value]  # one of the two
    if span is not None and isinstance(span, trace.Span):
        return span
    return trace.INVALID_SPAN


def attach_span(span: trace.Span, parent: Context) -> Token[Context]:
    """`context.attach(trace.set_span_in_context(span, parent))`: `span` made current
    under `parent`, in two calls rather than six. Reset with the token's `var.reset`."""
    return _attach(Context({**parent, _SPAN_KEY: span}))
