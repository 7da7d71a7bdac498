"""The outgoing `traceparent` written straight from a span's context.

Why by hand: injecting through the global propagator costs about 25 calls an attempt
(the composite, the trace-context and baggage propagators, a context built to carry
the span, the current span and baggage looked up again). When the propagator is
OpenTelemetry's default (trace context then baggage, which `OTEL_PROPAGATORS` unset or
set to `tracecontext,baggage` gives) and no baggage is to be passed on, what it writes
is known: the `traceparent` and `tracestate` headers of the span's context, formatted
here as `TraceContextTextMapPropagator.inject` formats them. Any other propagator, or
baggage to forward, goes through the propagator itself.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_DEFAULT_TYPES = [TraceContextTextMapPropagator, W3CBaggagePropagator]


def default_propagator() -> CompositePropagator:
    """OpenTelemetry's default propagator, as `OTEL_PROPAGATORS` unset builds it: trace
    context, then baggage."""
    return CompositePropagator([kind() for kind in _DEFAULT_TYPES])


def is_default(propagator: TextMapPropagator) -> bool:
    """Whether `propagator` is exactly the default composite: trace context, then baggage.

    Read from the composite's private list, as no public accessor exists; a composite
    without it (an SDK release that moved it) is not the default, and is called."""
    if type(propagator) is not CompositePropagator:
        return False
    inner = getattr(propagator, "_propagators", None)
    return isinstance(inner, list | tuple) and [type(p) for p in inner] == _DEFAULT_TYPES


def inject_trace_context(headers: MutableMapping[str, str], span_context: SpanContext) -> None:
    """Write the headers `TraceContextTextMapPropagator.inject` writes for `span_context`."""
    if span_context == INVALID_SPAN_CONTEXT:
        return
    trace_id, span_id, _, trace_flags, trace_state, _ = span_context
    headers[_TRACEPARENT] = f"00-{trace_id:032x}-{span_id:016x}-{trace_flags:02x}"
    # The default (empty) state, which most contexts carry, tested without its __len__.
    if trace_state is not DEFAULT_TRACE_STATE and trace_state:
        headers[_TRACESTATE] = trace_state.to_header()
