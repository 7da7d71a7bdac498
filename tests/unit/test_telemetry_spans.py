"""The span helpers on their own: a retried call's span tree, and overhead accounting."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from service.clock import covered_s
from service.domain import ChatRequest, Message, Role, Usage
from service.errors import UpstreamUnavailable
from service.telemetry import setup
from service.telemetry.attempt_labels import MOST_ANSWER_MODELS
from service.telemetry.tracing import CURRENT_RPC
from tests.telemetry_support import attributes_of, captured_telemetry

REQUEST = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))


def test_a_retried_call_has_one_client_span_per_attempt_under_the_rpc_span():
    """Attempt 1 fails with 503, the retry is counted, attempt 2 carries its wait and succeeds."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    with telemetry.rpc(service="svc", method="Complete", metadata=()) as rpc:
        headers: dict[str, str] = {}
        with (
            pytest.raises(UpstreamUnavailable),
            telemetry.upstream_attempt(
                REQUEST,
                upstream="up0",
                base_url="https://api.deepseek.com/v1",
                upstream_model="deepseek-chat",
                attempt=1,
                headers=headers,
            ),
        ):
            raise UpstreamUnavailable("boom", upstream="up0", status=503)
        telemetry.record_retry("up0", wait_s=0.2)
        retry_headers: dict[str, str] = {}
        with telemetry.upstream_attempt(
            REQUEST,
            upstream="up1",
            base_url="http://10.0.0.7:8000/v1",
            upstream_model="deepseek-chat",
            attempt=2,
            headers=retry_headers,
            retry_wait_s=0.2,
        ) as attempt:
            attempt.finish(
                response_id="r2", response_model="deepseek-chat", finish_reason="stop", usage=None
            )
    first, second = [s for s in captured.spans() if s.kind is SpanKind.CLIENT]
    server = captured.span("svc/Complete")
    assert first.parent.span_id == server.context.span_id
    assert second.parent.span_id == server.context.span_id
    assert attributes_of(first)["llm_gateway.attempt"] == 1
    assert attributes_of(first)["error.type"] == "503"
    assert attributes_of(first)["gen_ai.provider.name"] == "deepseek"
    assert first.status.status_code is StatusCode.ERROR
    assert attributes_of(second)["llm_gateway.attempt"] == 2
    assert attributes_of(second)["llm_gateway.retry.wait_ms"] == pytest.approx(200.0)
    assert attributes_of(second)["gen_ai.provider.name"] == "up1"
    assert attributes_of(second)["server.address"] == "10.0.0.7"
    assert "error.type" not in attributes_of(second)
    assert [e.name for e in server.events] == ["llm_gateway.retry"]
    assert headers["traceparent"] != retry_headers["traceparent"]
    assert captured.total("llm_gateway.retries", llm_gateway__upstream="up0") == 1
    assert captured.total("llm_gateway.upstream.errors", llm_gateway__upstream="up0") == 1
    assert rpc.upstream_s > 0


def test_waits_that_overlap_count_once_in_the_upstream_time():
    """A batch's or a summary's calls wait on their upstreams side by side: the RPC's
    upstream time is what their waits cover together, not their sum (which passed the
    call's wall time, and read as no overhead at all)."""
    captured = captured_telemetry()
    with captured.telemetry.rpc(service="svc", method="CompleteBatch", metadata=()) as rpc:
        rpc.upstream_waits.extend([(10.0, 11.0), (10.5, 11.5), (12.0, 12.25)])
        assert rpc.upstream_s == pytest.approx(1.75)


def test_covered_time_counts_each_moment_once():
    assert covered_s([]) == 0.0
    assert covered_s([(0.0, 10.0), (2.0, 5.0)]) == 10.0  # one inside the other
    assert covered_s([(2.0, 5.0), (0.0, 10.0)]) == 10.0
    assert covered_s([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert covered_s([(1.0, 1.0), (1.0, 2.0)]) == 1.0


def test_overhead_is_wall_time_minus_upstream_time_and_never_negative():
    """The trailer reports elapsed minus upstream time, clamped at zero: a wait reported
    as a duration is placed as ending when it is reported."""
    captured = captured_telemetry()
    with captured.telemetry.rpc(service="svc", method="Summarize", metadata=()) as rpc:
        assert rpc.overhead_s() == pytest.approx(rpc.elapsed_s(), abs=0.01)
        rpc.waited(1e6)  # longer than the call: all of it was waiting
        assert rpc.overhead_s() == 0.0
        [(name, value)] = rpc.trailers()
    assert name == "llm-gateway-overhead-ms"
    assert float(value) >= 0


def test_overhead_of_an_elapsed_time_takes_out_each_moment_of_waiting_once() -> None:
    """One wait (most calls) or several overlapping (a batch's, a summary's): the time
    they cover together comes off; never below zero."""
    captured = captured_telemetry()
    with captured.telemetry.rpc(service="svc", method="Complete", metadata=()) as rpc:
        assert rpc.overhead_s(5.0) == 5.0
        rpc.upstream_waits[:] = [(1.0, 3.0)]
        assert rpc.overhead_s(5.0) == 3.0
        assert rpc.overhead_s(1.5) == 0.0
        rpc.upstream_waits[:] = [(1.0, 3.0), (2.0, 4.0), (6.0, 7.0)]
        assert rpc.overhead_s(5.0) == 1.0
        assert rpc.overhead_s(2.0) == 0.0


def test_an_exception_leaving_the_rpc_ends_its_span_with_the_exceptions_type() -> None:
    """An error nothing recorded first: status 2 (UNKNOWN) and the type as error.type."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    with pytest.raises(KeyError), telemetry.rpc(service="svc", method="Complete", metadata=()):
        raise KeyError("x")
    span = captured.span("svc/Complete")
    assert attributes_of(span)["rpc.grpc.status_code"] == 2
    assert attributes_of(span)["error.type"] == "KeyError"
    assert span.status.status_code is StatusCode.ERROR
    assert telemetry.in_flight == 0
    assert CURRENT_RPC.get() is None


def test_a_cancelled_rpc_ends_its_span_as_cancelled() -> None:
    """Cancellation is status 1 (CANCELLED), not an error of the server's."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    with (
        pytest.raises(asyncio.CancelledError),
        telemetry.rpc(service="svc", method="Complete", metadata=()) as rpc,
    ):
        assert CURRENT_RPC.get() is rpc
        raise asyncio.CancelledError
    span = captured.span("svc/Complete")
    assert attributes_of(span)["rpc.grpc.status_code"] == 1
    assert attributes_of(span)["error.type"] == "cancelled"
    assert span.status.status_code is not StatusCode.ERROR
    assert (telemetry.in_flight, CURRENT_RPC.get()) == (0, None)


def test_an_upstream_url_without_a_port_is_named_by_its_schemes_port():
    """`server.port` goes with `server.address` on the span and the GenAI metrics, the
    scheme's default port when the URL names none (https://api.openai.com/v1: 443)."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    for attempt, base_url in enumerate(("https://api.openai.com/v1", "http://vllm/v1"), 1):
        with telemetry.upstream_attempt(
            REQUEST,
            upstream=f"up{attempt}",
            base_url=base_url,
            upstream_model="m",
            attempt=attempt,
            headers={},
        ):
            pass
    ports = {
        attributes_of(span)["server.address"]: attributes_of(span)["server.port"]
        for span in captured.spans()
    }
    assert ports == {"api.openai.com": 443, "vllm": 80}
    points = captured.points("gen_ai.client.operation.duration")
    assert {p.attributes["server.address"]: p.attributes["server.port"] for p in points} == ports


def test_the_local_models_restarts_on_new_ports_keep_its_metric_series():
    """The local model's server restarts on a new free port each time: its attempts stay
    one series of the GenAI metrics, named by its address alone. With the port,
    a server crash-looping for a day started a series a restart, filling the histograms'
    cap of series for good."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    for attempt, port in enumerate((41001, 41002, 41003), 1):
        with telemetry.upstream_attempt(
            REQUEST,
            upstream="local",
            base_url=f"http://127.0.0.1:{port}/v1",
            upstream_model="m",
            attempt=attempt,
            headers={},
        ):
            pass
    assert len(captured.spans()) == 3
    points = captured.points("gen_ai.client.operation.duration")
    assert len(points) == 1
    assert points[0].count == 3
    assert "server.port" not in points[0].attributes
    assert points[0].attributes["server.address"] == "127.0.0.1"


def rpc_points(monkeypatch: pytest.MonkeyPatch, *, sdks: bool) -> dict[str, set[Any]]:
    """The RPC histograms' (attributes, count) after RPCs of two methods and statuses,
    recorded by the gateway's histograms or, with `sdks`, by the SDK's."""
    if sdks:
        monkeypatch.setattr(setup, "suits", lambda reader: False)
    captured = captured_telemetry()
    telemetry = captured.telemetry
    assert (telemetry.providers.histograms is None) is sdks
    for method, status in [
        ("Complete", 0),
        ("Complete", 5),
        ("Complete", 0),
        ("Complete", 5),
        ("Stream", 0),
    ]:
        with telemetry.rpc(service="svc", method=method, metadata=()) as scope:
            if status:
                scope.fail(status_code=status, error_type="NOT_FOUND")
    return {
        name: {
            (frozenset(point.attributes.items()), point.count) for point in captured.points(name)
        }
        for name in ("llm_gateway.rpc.duration", "llm_gateway.overhead.duration")
    }


def test_the_rpc_histograms_count_by_method_and_status_as_the_sdks_do(
    monkeypatch: pytest.MonkeyPatch,
):
    """Their attribute sets are built once per method and status, and kept."""
    ours = rpc_points(monkeypatch, sdks=False)
    assert ours == rpc_points(monkeypatch, sdks=True)
    assert ours == {
        "llm_gateway.rpc.duration": {
            (frozenset({("rpc.method", "Complete"), ("rpc.grpc.status_code", 0)}), 2),
            (frozenset({("rpc.method", "Complete"), ("rpc.grpc.status_code", 5)}), 2),
            (frozenset({("rpc.method", "Stream"), ("rpc.grpc.status_code", 0)}), 1),
        },
        "llm_gateway.overhead.duration": {
            (frozenset({("rpc.method", "Complete")}), 4),
            (frozenset({("rpc.method", "Stream")}), 1),
        },
    }


def attempt_points(monkeypatch: pytest.MonkeyPatch, *, sdks: bool) -> dict[str, set[Any]]:
    """The attempt histograms' (attributes, count, sum) after attempts on two routes:
    answered under a dated model name, failed before answering, answered again under the
    same name (its counts estimated), and a stream naming no model, recorded by the
    gateway's histograms or, with `sdks`, by the SDK's."""
    if sdks:
        monkeypatch.setattr(setup, "suits", lambda reader: False)
    captured = captured_telemetry()
    telemetry = captured.telemetry
    routes = {"up1": "http://a:8001/v1", "up2": "http://b/v1"}
    outcomes = [
        ("up1", "m-0613", Usage(input_tokens=7, output_tokens=3)),
        ("up1", None, None),
        ("up1", "m-0613", Usage(input_tokens=20, output_tokens=0, is_estimated=True)),
        ("up2", "", Usage(input_tokens=5, output_tokens=2)),
    ]
    for attempt, (upstream, response_model, usage) in enumerate(outcomes, 1):
        with (
            contextlib.suppress(UpstreamUnavailable),
            telemetry.upstream_attempt(
                REQUEST,
                upstream=upstream,
                base_url=routes[upstream],
                upstream_model=f"{upstream}-m",
                attempt=attempt,
                headers={},
            ) as span,
        ):
            if usage is None:
                raise UpstreamUnavailable("503", upstream=upstream)
            if upstream == "up2":
                span.chunk("hello")
            span.finish(
                response_id="r",
                response_model=response_model or "",
                finish_reason="stop",
                usage=usage,
            )
        if usage is not None:
            telemetry.record_token_usage(span, usage)
    names = (
        "gen_ai.client.operation.duration",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.token.usage",
    )
    return {
        name: {
            (
                frozenset(point.attributes.items()),
                point.count,
                point.sum if name.endswith("usage") else None,
            )
            for point in captured.points(name)
        }
        for name in names
    }


def test_the_attempt_histograms_count_by_route_and_answer_as_the_sdks_do(
    monkeypatch: pytest.MonkeyPatch,
):
    """Their attribute sets are built once per route and answer model, and kept: each
    attempt's points under its own route, its answer's model (none before it answered)
    and, for a failure's duration alone, its `error.type`."""
    ours = attempt_points(monkeypatch, sdks=False)
    assert ours == attempt_points(monkeypatch, sdks=True)
    up1 = {
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "up1"),
        ("gen_ai.request.model", "m"),
        ("llm_gateway.upstream.model", "up1-m"),
        ("server.address", "a"),
        ("server.port", 8001),
    }
    answered = up1 | {("gen_ai.response.model", "m-0613")}
    up2 = {
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "up2"),
        ("gen_ai.request.model", "m"),
        ("llm_gateway.upstream.model", "up2-m"),
        ("server.address", "b"),
        ("server.port", 80),
    }

    def tokens(base: set[Any], kind: str, *, estimated: bool) -> frozenset[Any]:
        return frozenset(
            base | {("gen_ai.token.type", kind), ("llm_gateway.usage.estimated", estimated)}
        )

    assert ours == {
        "gen_ai.client.operation.duration": {
            (frozenset(answered), 2, None),
            (frozenset(up1 | {("error.type", "UpstreamUnavailable")}), 1, None),
            (frozenset(up2), 1, None),
        },
        "gen_ai.client.operation.time_to_first_chunk": {(frozenset(up2), 1, None)},
        "gen_ai.client.token.usage": {
            (tokens(answered, "input", estimated=False), 1, 7),
            (tokens(answered, "output", estimated=False), 1, 3),
            (tokens(answered, "input", estimated=True), 1, 20),
            (tokens(answered, "output", estimated=True), 1, 0),
            (tokens(up2, "input", estimated=False), 1, 5),
            (tokens(up2, "output", estimated=False), 1, 2),
        },
    }


def test_a_route_answered_under_ever_new_model_names_records_each_under_its_own():
    """Past the answer models a route keeps (`MOST_ANSWER_MODELS`), each answer is still
    recorded under the model it names."""
    captured = captured_telemetry()
    telemetry = captured.telemetry
    models = [f"m-{n}" for n in range(MOST_ANSWER_MODELS + 5)]
    for model in (*models, models[-1]):
        with telemetry.upstream_attempt(
            REQUEST,
            upstream="up1",
            base_url="http://a/v1",
            upstream_model="m",
            attempt=1,
            headers={},
        ) as span:
            span.finish(response_id="r", response_model=model, finish_reason="stop", usage=None)
    counts = {
        point.attributes["gen_ai.response.model"]: point.count
        for point in captured.points("gen_ai.client.operation.duration")
    }
    assert counts == {model: 2 if model == models[-1] else 1 for model in models}
