"""The gateway's tracer against the SDK's: same sampling, context, limits and span content."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    TracerProvider,
    sampling,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.telemetry.lean_tracer import (
    LeanTracer,
    _runtime_context_variable,
    attach_span,
    current_span,
)

RESOURCE = Resource.create({"service.name": "llm-gateway-test"})
PROPAGATOR = TraceContextTextMapPropagator()


def lean(sampler: sampling.Sampler | None = None) -> tuple[LeanTracer, InMemorySpanExporter]:
    """A lean tracer on a provider configured as the gateway configures it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, sampler=sampler, shutdown_on_exit=False)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return LeanTracer(provider, [processor], scope_name="llm_gateway"), exporter


def sdk() -> tuple[trace.Tracer, InMemorySpanExporter]:
    """The SDK's own tracer with the same resource and scope."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("llm_gateway"), exporter


def exercise(tracer: trace.Tracer) -> None:
    """The same operations, through either tracer."""
    span = tracer.start_span(
        "chat m",
        kind=SpanKind.CLIENT,
        attributes={"gen_ai.request.model": "m", "attempt": 1, "ratio": 0.5, "ok": True},
    )
    span.set_attribute("llm_gateway.tenant", "acme")
    span.set_attributes({"gen_ai.response.finish_reasons": ("stop",), "cost": 1.5e-6})
    span.add_event("llm_gateway.retry", {"llm_gateway.retry.wait_ms": 200.0})
    span.set_status(Status(StatusCode.ERROR, "503"))
    span.end()


def comparable(span: ReadableSpan) -> dict[str, Any]:
    """What a span exports, less its ids and times."""
    return {
        "name": span.name,
        "kind": span.kind,
        "attributes": dict(span.attributes or {}),
        "events": [(e.name, dict(e.attributes or {})) for e in span.events],
        "status": (span.status.status_code, span.status.description),
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "parent": span.parent,
        "sampled": span.context.trace_flags.sampled,
    }


def test_a_span_exports_what_the_sdks_span_exports_for_the_same_calls():
    lean_tracer, lean_spans = lean()
    sdk_tracer, sdk_spans = sdk()
    exercise(lean_tracer)
    exercise(sdk_tracer)
    [ours] = lean_spans.get_finished_spans()
    [theirs] = sdk_spans.get_finished_spans()
    assert comparable(ours) == comparable(theirs)
    assert ours.start_time is not None
    assert ours.end_time is not None
    assert ours.start_time <= ours.end_time
    assert encode_spans([ours]).resource_spans[0].scope_spans[0].spans[0].name == "chat m"


def test_a_child_continues_a_sampled_remote_parent():
    tracer, spans = lean()
    parent = PROPAGATOR.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    )
    span = tracer.start_span("svc/Complete", context=parent, kind=SpanKind.SERVER)
    headers: dict[str, str] = {}
    PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
    span.end()
    [ended] = spans.get_finished_spans()
    assert ended.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert ended.parent is not None
    assert ended.parent.span_id == 0xB7AD6B7169203331
    assert ended.parent.is_remote
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert headers["traceparent"].endswith("-01")


def test_an_unsampled_remote_parent_is_followed_and_nothing_is_recorded():
    tracer, spans = lean()
    parent = PROPAGATOR.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    )
    span = tracer.start_span("svc/Complete", context=parent, kind=SpanKind.SERVER)
    headers: dict[str, str] = {}
    PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
    span.set_attribute("k", "v")
    span.end()
    assert not span.is_recording()
    assert span.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert headers["traceparent"].endswith("-00")
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("sampler", "is_kept"),
    [
        (sampling.ALWAYS_OFF, False),
        (sampling.TraceIdRatioBased(0.0), False),
        (sampling.ParentBased(sampling.TraceIdRatioBased(1.0)), True),
        (sampling.ALWAYS_ON, True),
    ],
)
def test_a_configured_sampler_decides_for_root_spans(sampler: sampling.Sampler, is_kept: bool):
    tracer, spans = lean(sampler)
    span = tracer.start_span("root", attributes={"a": "b"})
    span.end()
    assert span.is_recording() is False
    assert span.get_span_context().is_valid
    assert span.get_span_context().trace_flags.sampled is is_kept
    assert len(spans.get_finished_spans()) == int(is_kept)
    if is_kept:
        assert dict(spans.get_finished_spans()[0].attributes or {}) == {"a": "b"}


def test_span_limits_set_in_the_environment_are_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    tracer, spans = lean()
    span = tracer.start_span("limited", attributes={"a": "abcdefgh"})
    span.set_attributes({"b": "12345678", "c": "xyz"})
    span.end()
    [ended] = spans.get_finished_spans()
    attributes = dict(ended.attributes or {})
    assert len(attributes) == 2
    assert ended.dropped_attributes == 1
    assert all(len(str(value)) <= 4 for value in attributes.values())


def test_ok_is_final_unset_changes_nothing_and_a_description_needs_an_error():
    tracer, spans = lean()
    span = tracer.start_span("s")
    span.set_status(StatusCode.UNSET)
    span.set_status(StatusCode.ERROR, "first")
    span.set_status(Status(StatusCode.OK))
    span.set_status(StatusCode.ERROR, "late")
    span.end()
    [ended] = spans.get_finished_spans()
    assert ended.status.status_code is StatusCode.OK


def test_an_ended_span_takes_nothing_more_and_is_exported_once():
    tracer, spans = lean()
    span = tracer.start_span("s", attributes={"a": 1})
    span.end()
    span.set_attribute("b", 2)
    span.set_attributes({"c": 3})
    span.add_event("late")
    span.update_name("renamed")
    span.end()
    [ended] = spans.get_finished_spans()
    assert (ended.name, dict(ended.attributes or {}), ended.events) == ("s", {"a": 1}, ())


def test_none_values_are_dropped_as_the_sdk_drops_them():
    tracer, spans = lean()
    span = tracer.start_span("s", attributes={"a": None, "b": 1})  # type: ignore[dict-item]
    span.set_attribute("c", None)  # type: ignore[arg-type]
    span.set_attributes({"d": None, "e": "x"})  # type: ignore[dict-item]
    span.end()
    [ended] = spans.get_finished_spans()
    assert dict(ended.attributes or {}) == {"b": 1, "e": "x"}


def test_attributes_given_to_end_are_set_as_set_attributes_sets_them_before_it_ends():
    """`end(attributes=...)` (an RPC's span ends so): the span `set_attributes` then `end`
    exports, `None` dropped and an earlier value kept; a second end changes nothing."""
    tracer, spans = lean()
    for ends_with_them in (False, True):
        span = tracer.start_span("s", attributes={"a": 1, "b": 2})
        late = {"b": None, "c": 3, "d": "x"}
        if ends_with_them:
            span.end(attributes=late)  # type: ignore[call-arg]  # the lean span's own
            span.end(attributes={"e": 4})  # type: ignore[call-arg]
        else:
            span.set_attributes(late)  # type: ignore[arg-type]
            span.end()
    by_setting, by_ending = spans.get_finished_spans()
    assert dict(by_ending.attributes or {}) == dict(by_setting.attributes or {})
    assert dict(by_ending.attributes or {}) == {"a": 1, "b": 2, "c": 3, "d": "x"}


def test_start_as_current_span_is_current_inside_and_records_an_escaping_error():
    tracer, spans = lean()
    with (
        pytest.raises(ValueError, match="bad input"),
        tracer.start_as_current_span("block") as span,
    ):
        assert trace.get_current_span() is span
        child = tracer.start_span("child")
        child.end()
        raise ValueError("bad input")
    assert trace.get_current_span() is not span
    child_span, block = spans.get_finished_spans()
    assert child_span.parent is not None
    assert child_span.parent.span_id == block.context.span_id
    assert block.status.status_code is StatusCode.ERROR
    [event] = block.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "bad input"
    assert "Traceback" in str(event.attributes["exception.stacktrace"])


def test_a_span_encodes_for_otlp_as_the_sdks_span_does():
    """What an OTLP exporter sends of the same calls, ids and times aside: every field
    the encoder reads from a `ReadableSpan` (flags, scope, resource, dropped counts)."""
    lean_tracer, lean_spans = lean()
    sdk_tracer, sdk_spans = sdk()
    exercise(lean_tracer)
    exercise(sdk_tracer)

    def encoded(span: ReadableSpan) -> Any:
        request = encode_spans([span])
        [sent] = request.resource_spans[0].scope_spans[0].spans
        sent.trace_id = sent.span_id = b""
        sent.start_time_unix_nano = sent.end_time_unix_nano = 0
        for event in sent.events:
            event.time_unix_nano = 0
        return request

    [ours] = lean_spans.get_finished_spans()
    [theirs] = sdk_spans.get_finished_spans()
    assert encoded(ours) == encoded(theirs)


def test_a_span_sets_every_field_readable_spans_constructor_sets():
    """`LeanSpan` sets `ReadableSpan`'s fields itself: a field a new SDK release adds to
    the constructor, which its exporters would read, must not be missing."""
    tracer, _ = lean()
    span = tracer.start_span("s")
    assert set(vars(ReadableSpan("s"))) <= set(vars(span))


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02",
    ],
)
@pytest.mark.parametrize("is_local_parent", [False, True])
def test_a_spans_context_is_the_sdks_under_any_parent(
    traceparent: str | None, is_local_parent: bool
):
    """Trace id, flags (sampled, random trace id), trace state and parent as the SDK's
    tracer gives them, under no parent, a remote one or a local one under either."""
    carrier = {"tracestate": "vendor=a,other=b"}
    if traceparent is not None:
        carrier["traceparent"] = traceparent
    remote = PROPAGATOR.extract(carrier)

    def contexts(tracer: trace.Tracer) -> tuple[Any, ...]:
        context = remote
        if is_local_parent:
            context = trace.set_span_in_context(tracer.start_span("local", context=remote))
        span = tracer.start_span("s", context=context, kind=SpanKind.CLIENT)
        parent = trace.get_current_span(context).get_span_context()
        made = span.get_span_context()
        return (
            made.trace_id == parent.trace_id,
            made.trace_flags,
            made.trace_state,
            made.is_remote,
            span.is_recording(),
            getattr(span, "parent", None) == (parent if parent.is_valid else None),
        )

    lean_tracer, _ = lean()
    sdk_tracer, _ = sdk()
    assert contexts(lean_tracer) == contexts(sdk_tracer)


PARENTS = (
    None,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
)


def sampled_contexts(tracer: trace.Tracer, parents: int) -> list[tuple[Context, trace.Span]]:
    """Spans started by `tracer` under no parent, a sampled and an unsampled remote parent
    (each with a trace state) and a local span under each, `parents` times over."""
    started = []
    for _ in range(parents):
        for traceparent in PARENTS:
            carrier = {"tracestate": "vendor=a"}
            if traceparent is not None:
                carrier["traceparent"] = traceparent
            remote = PROPAGATOR.extract(carrier)
            local = trace.set_span_in_context(tracer.start_span("local", context=remote))
            for context in (remote, local):
                started.append((context, tracer.start_span("s", context=context)))
    return started


@pytest.mark.parametrize(
    "sampler",
    [
        sampling.DEFAULT_ON,
        sampling.DEFAULT_OFF,
        sampling.ParentBasedTraceIdRatio(0.3),
        sampling.ParentBased(sampling.TraceIdRatioBased(0.7)),
    ],
    ids=["parentbased_always_on", "parentbased_always_off", "ratio 0.3", "ratio 0.7"],
)
def test_parent_based_samplers_are_decided_as_they_decide_without_being_asked(
    sampler: sampling.Sampler, monkeypatch: pytest.MonkeyPatch
):
    """The samplers `OTEL_TRACES_SAMPLER` names `parentbased_*` (the default among them)
    decide each span as their `should_sample` does, roots by their trace id and children
    by their parent, remote or local, with its trace state: without a call to it."""
    decide = sampling.ParentBased.should_sample
    asked: list[str] = []

    def counted(self: sampling.ParentBased, *args: Any, **kwargs: Any) -> sampling.SamplingResult:
        asked.append("should_sample")
        return decide(self, *args, **kwargs)

    monkeypatch.setattr(sampling.ParentBased, "should_sample", counted)
    tracer, _ = lean(sampler)
    outcomes = set()
    for context, span in sampled_contexts(tracer, parents=100):
        made = span.get_span_context()
        expected = decide(sampler, context, made.trace_id, "s")  # type: ignore[arg-type]
        is_sampled = expected.decision is sampling.Decision.RECORD_AND_SAMPLE
        assert made.trace_flags.sampled is is_sampled
        assert span.is_recording() is is_sampled
        assert made.trace_state == (expected.trace_state or trace.DEFAULT_TRACE_STATE)
        outcomes.add(is_sampled)
    assert asked == []
    assert outcomes == {True, False}  # each sampler samples some of these, and not others


def test_a_parent_based_sampler_with_other_delegates_is_asked():
    """One that samples under an unsampled remote parent is no default one: asked."""
    sampler = sampling.ParentBased(sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON)
    tracer, _ = lean(sampler)
    remote = PROPAGATOR.extract({"traceparent": PARENTS[2] or ""})
    span = tracer.start_span("s", context=remote)
    assert span.get_span_context().trace_flags.sampled
    assert span.is_recording()


def test_a_span_keeps_no_reference_to_the_attributes_it_was_given():
    tracer, spans = lean()
    given: dict[str, Any] = {"a": 1}
    span = tracer.start_span("s", attributes=given)
    given["b"] = 2
    later: dict[str, Any] = {"c": 3}
    span.set_attributes(later)
    later["d"] = 4
    span.end()
    [ended] = spans.get_finished_spans()
    assert dict(ended.attributes or {}) == {"a": 1, "c": 3}


def test_current_span_is_the_apis_current_span():
    tracer, _ = lean()
    own = tracer.start_span("own")
    remote = PROPAGATOR.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    )
    contexts = [
        None,
        Context(),
        trace.set_span_in_context(own),
        remote,
        context_api.set_value(_SPAN_KEY, "not a span"),
    ]
    for context in contexts:
        assert current_span(context) is trace.get_current_span(context)
    token = context_api.attach(trace.set_span_in_context(own))
    try:
        assert current_span() is trace.get_current_span() is own
    finally:
        context_api.detach(token)
    assert current_span() is trace.get_current_span() is trace.INVALID_SPAN


def test_spans_end_through_a_batch_processor_as_through_its_on_end():
    """The batch processor's queue takes the sampled spans its `on_end` would have
    queued, flushes them on `force_flush` and takes none once shut down."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    provider.add_span_processor(processor)
    tracer = LeanTracer(provider, [processor], scope_name="llm_gateway")
    unsampled = PROPAGATOR.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    )
    kept = [tracer.start_span("one"), tracer.start_span("two")]
    dropped = tracer.start_span("unsampled", context=unsampled)
    for span in [*kept, dropped]:
        span.end()
    assert exporter.get_finished_spans() == ()  # queued, not exported on the spot
    assert provider.force_flush()
    assert list(exporter.get_finished_spans()) == kept
    provider.shutdown()
    late = tracer.start_span("late")
    late.end()
    assert list(exporter.get_finished_spans()) == kept


def test_a_processor_other_than_the_sdks_batch_one_is_told_through_on_end(
    monkeypatch: pytest.MonkeyPatch,
):
    """A subclass of the batch processor, any other processor, and a batch processor
    whose queue an SDK release moved, all get `on_end`."""

    class Counting(BatchSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            ended.append(span)
            super().on_end(span)

    ended: list[ReadableSpan] = []
    exporter = InMemorySpanExporter()
    moved = BatchSpanProcessor(exporter)
    monkeypatch.delattr(moved, "_batch_processor")
    monkeypatch.setattr(moved, "on_end", ended.append)
    processors = [Counting(InMemorySpanExporter()), SimpleSpanProcessor(exporter), moved]
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    tracer = LeanTracer(provider, processors, scope_name="llm_gateway")
    span = tracer.start_span("s")
    span.end()
    assert ended == [span, span]
    assert list(exporter.get_finished_spans()) == [span]


class CountingIds(IdGenerator):
    """Ids from a counter: not random, as `is_trace_id_random` (False) says."""

    def __init__(self) -> None:
        self.last = 0

    def generate_span_id(self) -> int:
        self.last += 1
        return self.last

    def generate_trace_id(self) -> int:
        self.last += 1
        return self.last


def test_ids_not_said_to_be_random_leave_the_random_trace_id_flag_unset_as_in_the_sdk():
    def root_flags(tracer: trace.Tracer) -> tuple[int, int]:
        span = tracer.start_span("root")
        child = tracer.start_span("child", context=trace.set_span_in_context(span))
        return span.get_span_context().trace_flags, child.get_span_context().trace_flags

    lean_provider = TracerProvider(id_generator=CountingIds(), shutdown_on_exit=False)
    sdk_provider = TracerProvider(id_generator=CountingIds(), shutdown_on_exit=False)
    ours = root_flags(LeanTracer(lean_provider, [], scope_name="llm_gateway"))
    theirs = root_flags(sdk_provider.get_tracer("llm_gateway"))
    assert ours == theirs == (TraceFlags.SAMPLED, TraceFlags.SAMPLED)


def test_ids_are_the_ones_the_sdks_generator_draws():
    """A root's trace and span ids, drawn at once, and a child's span id are those the
    SDK's `RandomIdGenerator` draws from the same `random` state; each context is the
    one `SpanContext`'s constructor makes."""
    tracer, _ = lean()
    random.seed(30)
    root = tracer.start_span("root")
    child = tracer.start_span("child", context=trace.set_span_in_context(root))
    random.seed(30)
    ids = RandomIdGenerator()
    expected = (ids.generate_trace_id(), ids.generate_span_id(), ids.generate_span_id())
    made = root.get_span_context(), child.get_span_context()
    assert (made[0].trace_id, made[0].span_id, made[1].span_id) == expected
    assert made[1].trace_id == made[0].trace_id
    for context in made:
        rebuilt = SpanContext(
            context.trace_id, context.span_id, False, context.trace_flags, context.trace_state
        )
        assert type(context) is SpanContext
        assert tuple(context) == tuple(rebuilt)
        assert context.is_valid


def test_a_generator_other_than_the_sdks_default_is_asked_for_every_id():
    """Ids come from a configured generator, as the SDK's tracer takes them."""

    def ids(tracer: trace.Tracer) -> list[tuple[int, int]]:
        root = tracer.start_span("root")
        child = tracer.start_span("child", context=trace.set_span_in_context(root))
        return [
            (s.get_span_context().trace_id, s.get_span_context().span_id) for s in (root, child)
        ]

    lean_provider = TracerProvider(id_generator=CountingIds(), shutdown_on_exit=False)
    sdk_provider = TracerProvider(id_generator=CountingIds(), shutdown_on_exit=False)
    ours = ids(LeanTracer(lean_provider, [], scope_name="llm_gateway"))
    assert ours == ids(sdk_provider.get_tracer("llm_gateway")) == [(1, 2), (1, 3)]


def test_a_span_attached_under_a_parent_is_current_as_the_api_makes_it():
    """`attach_span` makes the context `set_span_in_context` would, current until reset."""
    tracer, _ = lean()
    span = tracer.start_span("s")
    parent = context_api.set_value("other-key", "kept")
    token = attach_span(span, parent)
    try:
        assert context_api.get_current() == trace.set_span_in_context(span, parent)
        assert current_span() is trace.get_current_span() is span
    finally:
        token.var.reset(token)
    assert current_span() is trace.INVALID_SPAN


def test_another_runtime_context_is_reached_through_the_api(monkeypatch: pytest.MonkeyPatch):
    """The current context is read and set directly only in OpenTelemetry's default
    runtime context; any other (`OTEL_PYTHON_CONTEXT`) goes through its API."""
    assert _runtime_context_variable() is not None
    monkeypatch.setattr(context_api, "_RUNTIME_CONTEXT", object())
    assert _runtime_context_variable() is None
