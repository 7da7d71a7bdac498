"""The headers an upstream attempt carries: written from the span's context when the
propagator is the default, and always exactly what the propagator itself writes."""

from __future__ import annotations

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.config import TelemetryConfig
from service.domain import ChatRequest, Message, Role
from service.telemetry import core
from service.telemetry.core import Telemetry
from service.telemetry.propagation import inject_trace_context

REQUEST = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))
SAMPLED = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
SAMPLED_RANDOM = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03")
UNSAMPLED = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
TRACE_STATE = ("tracestate", "vendor=opaque,other=1")
BAGGAGE = ("baggage", "user.id=u-1234,team=search")

CALLERS = {
    "none": (),
    "sampled": (SAMPLED,),
    "sampled, random trace id": (SAMPLED_RANDOM,),
    "unsampled": (UNSAMPLED,),
    "sampled with trace state": (SAMPLED, TRACE_STATE),
    "unsampled with trace state": (UNSAMPLED, TRACE_STATE),
    "sampled with baggage": (SAMPLED, BAGGAGE),
    "baggage alone": (BAGGAGE,),
    "everything": (SAMPLED, TRACE_STATE, BAGGAGE),
}


def attempt_headers(telemetry: Telemetry, metadata: tuple[tuple[str, str], ...]) -> list[bool]:
    """Check an attempt's headers in an RPC from a caller sending `metadata` against what
    the global propagator writes for the attempt's span; returns, per attempt, whether
    the headers were written from the span context (without the propagator)."""
    paths: list[bool] = []
    written: list[SpanContext] = []
    real = core.inject_trace_context

    def spy(headers: dict[str, str], span_context: SpanContext) -> None:
        written.append(span_context)
        real(headers, span_context)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "inject_trace_context", spy)
        with telemetry.rpc(service="svc", method="Complete", metadata=metadata):
            for attempt_number in (1, 2):  # a retry's headers are its own
                headers = {"authorization": "Bearer k"}
                before = len(written)
                with telemetry.upstream_attempt(
                    REQUEST,
                    upstream="up",
                    base_url="http://127.0.0.1:8000/v1",
                    upstream_model="m",
                    attempt=attempt_number,
                    headers=headers,
                ) as attempt:
                    expected = {"authorization": "Bearer k"}
                    propagate.inject(expected, context=trace.set_span_in_context(attempt.span))
                    if not telemetry.forward_baggage:
                        expected.pop("baggage", None)
                    assert headers == expected
                    assert list(headers) == list(expected)  # and in the same order
                paths.append(len(written) > before)
    return paths


def telemetry_with(*, forward_baggage: bool) -> Telemetry:
    return Telemetry.from_config(
        TelemetryConfig(forward_baggage=forward_baggage),
        environ={},
        span_processors=[SimpleSpanProcessor(InMemorySpanExporter())],
    )


def use_propagators(monkeypatch: pytest.MonkeyPatch, names: str | None) -> None:
    """The global propagator as the SDK builds it from `OTEL_PROPAGATORS=names`."""
    if names is None:
        monkeypatch.delenv("OTEL_PROPAGATORS", raising=False)
    else:
        monkeypatch.setenv("OTEL_PROPAGATORS", names)
    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", propagate._load_propagators())


@pytest.mark.parametrize("forward_baggage", [False, True])
@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("propagators", [None, "tracecontext,baggage"])
def test_with_the_default_propagators_the_headers_are_the_propagators_own(
    monkeypatch: pytest.MonkeyPatch, propagators: str | None, caller: str, forward_baggage: bool
):
    use_propagators(monkeypatch, propagators)
    telemetry = telemetry_with(forward_baggage=forward_baggage)
    paths = attempt_headers(telemetry, CALLERS[caller])
    # Only baggage to pass on takes the propagator.
    has_baggage = BAGGAGE in CALLERS[caller]
    assert paths == [not (forward_baggage and has_baggage)] * 2


@pytest.mark.parametrize("forward_baggage", [False, True])
@pytest.mark.parametrize("caller", ["sampled", "sampled with trace state", "everything"])
@pytest.mark.parametrize("propagators", ["tracecontext", "baggage,tracecontext", "none"])
def test_other_propagators_are_called_as_configured(
    monkeypatch: pytest.MonkeyPatch, propagators: str, caller: str, forward_baggage: bool
):
    use_propagators(monkeypatch, propagators)
    telemetry = telemetry_with(forward_baggage=forward_baggage)
    assert attempt_headers(telemetry, CALLERS[caller]) == [False, False]


def test_a_propagator_set_in_code_is_called(monkeypatch: pytest.MonkeyPatch):
    """A composite of the default's types set by an application is the default; one
    that adds its own propagator is not."""

    class Extra(propagate.textmap.TextMapPropagator):  # type: ignore[misc]
        def extract(self, carrier, context=None, getter=None):  # type: ignore[no-untyped-def]
            return context

        def inject(self, carrier, context=None, setter=None):  # type: ignore[no-untyped-def]
            carrier["x-extra"] = "1"

        @property
        def fields(self) -> set[str]:
            return {"x-extra"}

    default = propagate._load_propagators()
    monkeypatch.delenv("OTEL_PROPAGATORS", raising=False)
    composite = type(default)([*default._propagators, Extra()])  # type: ignore[attr-defined]
    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", composite)
    assert attempt_headers(telemetry_with(forward_baggage=False), (SAMPLED,)) == [False, False]
    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", type(default)(default._propagators))  # type: ignore[attr-defined]
    assert attempt_headers(telemetry_with(forward_baggage=False), (SAMPLED,)) == [True, True]


@pytest.mark.parametrize("trace_id", [1, 0x0AF7651916CD43DD8448EB211C80319C, 2**128 - 1, 0])
@pytest.mark.parametrize("span_id", [1, 0xB7AD6B7169203331, 0])
@pytest.mark.parametrize("flags", [0, 1, 2, 3])
@pytest.mark.parametrize("state", ["", "vendor=opaque,other=1"])
def test_written_from_a_span_context_as_the_trace_context_propagator_writes(
    trace_id: int, span_id: int, flags: int, state: str
):
    """Ids with leading zeros, every flag, trace state or none, invalid ids."""
    span_context = SpanContext(
        trace_id, span_id, False, TraceFlags(flags), TraceState.from_header([state])
    )
    ours: dict[str, str] = {}
    inject_trace_context(ours, span_context)
    theirs: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(
        theirs, context=trace.set_span_in_context(NonRecordingSpan(span_context))
    )
    assert ours == theirs
    assert list(ours) == list(theirs)
