"""Unit tests for the error tree's mapping to gRPC status (service.errors)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.errors import (
    ERROR_DOMAIN,
    RETRY_PUSHBACK_TRAILER,
    ContextWindowExceeded,
    DeadlineExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotImplementedYet,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    RelayedError,
    ShuttingDown,
    StreamInterrupted,
    SummarizePartFailed,
    Unauthenticated,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamNotOpenAI,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    clipped,
    pushback_trailer,
    quoted,
    to_rpc_status,
)
from service.upstream.client import _error_for_status

_DETAIL_TYPES: dict[str, type[protobuf_message.Message]] = {
    "BadRequest": error_details_pb2.BadRequest,
    "ErrorInfo": error_details_pb2.ErrorInfo,
    "QuotaFailure": error_details_pb2.QuotaFailure,
    "RetryInfo": error_details_pb2.RetryInfo,
}


def details_of(status: status_pb2.Status) -> dict[str, Any]:
    """The status's details unpacked, by message type name (each type at most once)."""
    found: dict[str, Any] = {}
    for packed in status.details:
        name = packed.TypeName().rsplit(".", 1)[-1]
        assert name not in found, f"{name} packed twice"
        message = _DETAIL_TYPES[name]()
        assert packed.Unpack(message)
        found[name] = message
    return found


def error_info(status: status_pb2.Status) -> tuple[str, str, dict[str, str]]:
    """The ErrorInfo detail as (reason, domain, metadata)."""
    info = details_of(status)["ErrorInfo"]
    return info.reason, info.domain, dict(info.metadata)


def retry_delay_s(status: status_pb2.Status) -> float | None:
    """The RetryInfo delay in seconds, or None without RetryInfo."""
    info = details_of(status).get("RetryInfo")
    if info is None:
        return None
    delay = info.retry_delay
    return float(delay.seconds + delay.nanos / 1e9)


def upstream(cls: type[UpstreamError], **fields: Any) -> UpstreamError:
    """An upstream error as the client raises it: named by its configured name only."""
    return cls("upstream 'deepseek' failed", upstream="deepseek", **fields)


VIOLATIONS = [
    FieldViolation("model", "must not be empty"),
    FieldViolation("params.temperature", "must be in [0, 2], got 3.0"),
]
STREAM_CAUSE = UpstreamUnavailable(
    "upstream 'deepseek' dropped the connection", upstream="deepseek", status=502
)


@pytest.mark.parametrize(
    ("exc", "code", "kinds", "reason", "metadata"),
    [
        pytest.param(
            InvalidRequest(VIOLATIONS),
            code_pb2.INVALID_ARGUMENT,
            {"BadRequest"},
            None,
            None,
            id="invalid-request",
        ),
        pytest.param(
            ContextWindowExceeded(estimated_tokens=5000, limit_tokens=4096),
            code_pb2.INVALID_ARGUMENT,
            {"BadRequest", "ErrorInfo"},
            "CONTEXT_WINDOW_EXCEEDED",
            {"estimated_tokens": "5000", "limit_tokens": "4096"},
            id="context-window",
        ),
        pytest.param(
            ModelNotFound("gpt-9"),
            code_pb2.NOT_FOUND,
            {"ErrorInfo"},
            "MODEL_NOT_FOUND",
            {"model": "gpt-9"},
            id="model-not-found",
        ),
        pytest.param(
            Unauthenticated("no key"),
            code_pb2.UNAUTHENTICATED,
            {"ErrorInfo"},
            "UNAUTHENTICATED",
            {},
            id="unauthenticated",
        ),
        pytest.param(
            PermissionDenied("not yours"),
            code_pb2.PERMISSION_DENIED,
            {"ErrorInfo"},
            "PERMISSION_DENIED",
            {},
            id="permission-denied",
        ),
        pytest.param(
            QuotaExceeded("budget spent", subject="tenant:acme", retry_after_s=30.0),
            code_pb2.RESOURCE_EXHAUSTED,
            {"ErrorInfo", "QuotaFailure", "RetryInfo"},
            "QUOTA_EXCEEDED",
            {},
            id="quota-exceeded",
        ),
        pytest.param(
            QuotaExceeded("budget spent", subject="tenant:acme", retry_after_s=None),
            code_pb2.RESOURCE_EXHAUSTED,
            {"ErrorInfo", "QuotaFailure"},
            "QUOTA_EXCEEDED",
            {},
            id="quota-no-retry",
        ),
        pytest.param(
            Overloaded(retry_after_s=1.0),
            code_pb2.RESOURCE_EXHAUSTED,
            {"ErrorInfo", "RetryInfo"},
            "OVERLOADED",
            {},
            id="overloaded",
        ),
        pytest.param(
            DeadlineExceeded("too late"),
            code_pb2.DEADLINE_EXCEEDED,
            {"ErrorInfo"},
            "DEADLINE_EXCEEDED",
            {},
            id="deadline",
        ),
        pytest.param(
            NotImplementedYet("later"),
            code_pb2.UNIMPLEMENTED,
            {"ErrorInfo"},
            "UNIMPLEMENTED",
            {},
            id="unimplemented",
        ),
        pytest.param(
            GatewayError("generic"),
            code_pb2.INTERNAL,
            {"ErrorInfo"},
            "INTERNAL",
            {},
            id="gateway-error-root",
        ),
        pytest.param(
            upstream(UpstreamError),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "UPSTREAM_ERROR",
            {"upstream": "deepseek"},
            id="upstream-error",
        ),
        pytest.param(
            upstream(UpstreamRateLimited, status=429, retry_after_s=2.0),
            code_pb2.RESOURCE_EXHAUSTED,
            {"ErrorInfo", "RetryInfo"},
            "UPSTREAM_RATE_LIMITED",
            {"upstream": "deepseek", "http_status": "429"},
            id="upstream-429",
        ),
        pytest.param(
            upstream(UpstreamRateLimited, status=429),
            code_pb2.RESOURCE_EXHAUSTED,
            {"ErrorInfo"},
            "UPSTREAM_RATE_LIMITED",
            {"upstream": "deepseek", "http_status": "429"},
            id="upstream-429-no-retry-after",
        ),
        pytest.param(
            upstream(UpstreamUnavailable, status=503, retry_after_s=5.0),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo", "RetryInfo"},
            "UPSTREAM_UNAVAILABLE",
            {"upstream": "deepseek", "http_status": "503"},
            id="upstream-503",
        ),
        pytest.param(
            upstream(UpstreamUnavailable),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "UPSTREAM_UNAVAILABLE",
            {"upstream": "deepseek"},
            id="upstream-reset-no-status",
        ),
        pytest.param(
            UpstreamNotOpenAI("x", upstream="deepseek", status=200, content_type="text/html"),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "UPSTREAM_UNAVAILABLE",
            {"upstream": "deepseek", "http_status": "200", "content_type": "text/html"},
            id="upstream-not-openai",
        ),
        pytest.param(
            upstream(UpstreamAuthRejected, status=401),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "UPSTREAM_AUTH",
            {"upstream": "deepseek", "http_status": "401"},
            id="upstream-auth",
        ),
        pytest.param(
            upstream(UpstreamRejected, status=422),
            code_pb2.INVALID_ARGUMENT,
            {"ErrorInfo"},
            "UPSTREAM_REJECTED_REQUEST",
            {"upstream": "deepseek", "http_status": "422"},
            id="upstream-rejected",
        ),
        pytest.param(
            upstream(
                UpstreamRejected,
                status=400,
                relayed=RelayedError("Invalid 'tools[0]'", param="tools[0]", code="invalid_value"),
            ),
            code_pb2.INVALID_ARGUMENT,
            {"ErrorInfo"},
            "UPSTREAM_REJECTED_REQUEST",
            {
                "upstream": "deepseek",
                "http_status": "400",
                "upstream_message": "Invalid 'tools[0]'",
                "upstream_param": "tools[0]",
                "upstream_code": "invalid_value",
            },
            id="upstream-rejected-saying-why",
        ),
        pytest.param(
            upstream(UpstreamTimeout),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "UPSTREAM_TIMEOUT",
            {"upstream": "deepseek"},
            id="upstream-timeout",
        ),
        pytest.param(
            StreamInterrupted(STREAM_CAUSE, deltas_sent=3, chars_sent=42),
            code_pb2.UNAVAILABLE,
            {"ErrorInfo"},
            "STREAM_INTERRUPTED",
            {
                "upstream": "deepseek",
                "http_status": "502",
                "deltas_sent": "3",
                "chars_sent": "42",
            },
            id="stream-interrupted",
        ),
    ],
)
def test_every_error_class_maps_to_code_and_details(
    exc: GatewayError,
    code: int,
    kinds: set[str],
    reason: str | None,
    metadata: dict[str, str] | None,
) -> None:
    """Each error class maps to its gRPC code, its message and exactly its detail types."""
    status = to_rpc_status(exc)
    assert status.code == code
    assert status.message == exc.message
    assert set(details_of(status)) == kinds
    if reason is not None:
        assert error_info(status) == (reason, ERROR_DOMAIN, metadata)
    # The class attribute and the packed code agree, and grpc-status accepts the result.
    assert exc.grpc_code.value[0] == code
    assert rpc_status.to_status(status).code == exc.grpc_code


def test_bad_request_lists_every_violation() -> None:
    """BadRequest carries each field violation's path and description, in order."""
    bad = details_of(to_rpc_status(InvalidRequest(VIOLATIONS)))["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [
        (v.field, v.description) for v in VIOLATIONS
    ]


def test_context_window_violation_explains_the_fix() -> None:
    """The context-window violation names the estimate, the limit and the truncation mode."""
    bad = details_of(to_rpc_status(ContextWindowExceeded(estimated_tokens=9, limit_tokens=8)))
    (violation,) = bad["BadRequest"].field_violations
    assert violation.field == "messages"
    assert "9" in violation.description
    assert "8" in violation.description
    assert "TRUNCATION_MODE_KEEP_RECENT" in violation.description


def test_quota_failure_names_subject_and_reason() -> None:
    """QuotaFailure carries the subject and the message of the refused quota."""
    exc = QuotaExceeded("daily budget of $5 spent", subject="tenant:acme", retry_after_s=60.0)
    (violation,) = details_of(to_rpc_status(exc))["QuotaFailure"].violations
    assert (violation.subject, violation.description) == ("tenant:acme", exc.message)


@pytest.mark.parametrize(
    ("retry_after_s", "seconds", "nanos"),
    [
        (0.0, 0, 0),
        (0.5, 0, 500_000_000),
        (1.0, 1, 0),
        (1.5, 1, 500_000_000),
        (0.25, 0, 250_000_000),
        (30.0, 30, 0),
        (120.75, 120, 750_000_000),
        (0.001, 0, 1_000_000),
        (3600.125, 3600, 125_000_000),
    ],
)
def test_retry_info_duration(retry_after_s: float, seconds: int, nanos: int) -> None:
    """RetryInfo's delay is the error's retry-after split into seconds and nanoseconds."""
    exc = upstream(UpstreamRateLimited, status=429, retry_after_s=retry_after_s)
    delay = details_of(to_rpc_status(exc))["RetryInfo"].retry_delay
    assert (delay.seconds, delay.nanos) == (seconds, nanos)


@pytest.mark.parametrize("retry_after_s", [0.1, 0.3, 0.7, 1.1, 2.675, 59.999])
def test_retry_info_decimal_durations_within_a_nanosecond(retry_after_s: float) -> None:
    """Decimal retry-afters survive the float-to-Duration split to within a nanosecond."""
    status = to_rpc_status(Overloaded(retry_after_s=retry_after_s))
    delay = details_of(status)["RetryInfo"].retry_delay
    assert 0 <= delay.nanos < 1_000_000_000
    assert retry_delay_s(status) == pytest.approx(retry_after_s, rel=0, abs=1.5e-9)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("boom at /srv/app/secret.py with key sk-live-abcdef"),
        KeyError("sk-live-abcdef"),
        ValueError("postgres://user:pw@db/prod"),
        ZeroDivisionError(),
        Exception(),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_unknown_exception_is_internal_without_leaking(exc: BaseException) -> None:
    """Anything outside the tree is INTERNAL 'internal error' with no details or text."""
    status = to_rpc_status(exc)
    assert status.code == code_pb2.INTERNAL
    assert status.message == "internal error"
    assert list(status.details) == []
    wire = status.SerializeToString()
    for secret in (b"sk-live", b"/srv/app", b"postgres", type(exc).__name__.encode()):
        assert secret not in wire


@pytest.mark.parametrize(
    ("status", "headers", "cls", "code", "retry_after"),
    [
        (429, {"retry-after": "2"}, UpstreamRateLimited, code_pb2.RESOURCE_EXHAUSTED, 2.0),
        (429, {}, UpstreamRateLimited, code_pb2.RESOURCE_EXHAUSTED, None),
        (401, {"retry-after": "2"}, UpstreamAuthRejected, code_pb2.UNAVAILABLE, None),
        (403, {}, UpstreamAuthRejected, code_pb2.UNAVAILABLE, None),
        (408, {}, UpstreamUnavailable, code_pb2.UNAVAILABLE, None),
        (409, {}, UpstreamUnavailable, code_pb2.UNAVAILABLE, None),
        (500, {}, UpstreamUnavailable, code_pb2.UNAVAILABLE, None),
        (503, {"retry-after-ms": "1500"}, UpstreamUnavailable, code_pb2.UNAVAILABLE, 1.5),
        (400, {}, UpstreamRejected, code_pb2.INVALID_ARGUMENT, None),
        (404, {}, UpstreamRejected, code_pb2.INVALID_ARGUMENT, None),
        (422, {}, UpstreamRejected, code_pb2.INVALID_ARGUMENT, None),
    ],
)
def test_http_status_error_names_upstream_not_url(
    status: int,
    headers: dict[str, str],
    cls: type[UpstreamError],
    code: int,
    retry_after: float | None,
) -> None:
    """An upstream HTTP error maps to its class and code, naming the upstream, never a URL."""
    exc = _error_for_status("deepseek", status, headers)
    assert type(exc) is cls
    rpc = to_rpc_status(exc)
    assert rpc.code == code
    _, _, metadata = error_info(rpc)
    assert metadata == {"upstream": "deepseek", "http_status": str(status)}
    assert retry_delay_s(rpc) == retry_after
    wire = rpc.SerializeToString()
    assert b"://" not in wire
    assert b"api.deepseek.com" not in wire


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(
            QuotaExceeded("q", subject="t", retry_after_s=1.5), "1500", id="quota-seconds"
        ),
        pytest.param(Overloaded(retry_after_s=1.0), "1000", id="overloaded"),
        pytest.param(Overloaded(retry_after_s=0.0), "0", id="zero"),
        # Never shorter than the wait: a retry a fraction of a millisecond early is refused.
        pytest.param(Overloaded(retry_after_s=0.0004), "1", id="a-part-of-a-ms-rounds-up"),
        pytest.param(Overloaded(retry_after_s=1.0001), "1001", id="rounds-up-past-whole-ms"),
        pytest.param(Overloaded(retry_after_s=0.1), "100", id="float-noise-is-no-ms"),
        pytest.param(Overloaded(retry_after_s=-3.0), "0", id="negative-clamped"),
        pytest.param(
            upstream(UpstreamRateLimited, status=429, retry_after_s=0.25), "250", id="upstream-429"
        ),
        pytest.param(
            upstream(UpstreamRateLimited, status=429, retry_after_s=120.0),
            "120000",
            id="upstream-429-long",
        ),
        pytest.param(
            upstream(UpstreamUnavailable, status=503, retry_after_s=5.0), "5000", id="503-wait"
        ),
        pytest.param(upstream(UpstreamTimeout, retry_after_s=0.5), "500", id="timeout-backoff"),
        pytest.param(upstream(UpstreamAuthRejected, status=401), "-1", id="key-rejected"),
        pytest.param(
            upstream(UpstreamAuthRejected, status=403, retry_after_s=1.0), "-1", id="key-403"
        ),
    ],
)
def test_pushback_trailer_values(exc: GatewayError, expected: str) -> None:
    """Retried codes (RESOURCE_EXHAUSTED, UNAVAILABLE) whose wait the gateway knows push
    back that many milliseconds; a rejected upstream key pushes back "do not retry"."""
    assert pushback_trailer(exc) == ((RETRY_PUSHBACK_TRAILER, expected),)


@pytest.mark.parametrize(
    ("retry_after_s", "time_remaining_s", "expected"),
    [
        pytest.param(86_400.0, 300.0, "-1", id="budget-resets-after-the-deadline"),
        pytest.param(5.0, 5.0, "-1", id="retry-exactly-at-the-deadline"),
        pytest.param(0.5, 15.0, "500", id="fits-before-the-deadline"),
        pytest.param(120.0, None, "120000", id="no-deadline"),
        pytest.param(86_400.0, None, "-1", id="no-deadline-budget-resets-tomorrow"),
        pytest.param(300.0, None, "-1", id="no-deadline-at-the-longest-pushback"),
    ],
)
def test_pushback_past_the_deadline_says_do_not_retry(
    retry_after_s: float, time_remaining_s: float | None, expected: str
) -> None:
    """A wait the call's deadline cannot outlast pushes back -1, gRPC's "do not retry";
    so does one past five minutes for a call without a deadline, which a retry policy
    would otherwise sit out for hours (a budget spent until tomorrow) without a word."""
    exc = QuotaExceeded("q", subject="t", retry_after_s=retry_after_s)
    assert pushback_trailer(exc, time_remaining_s) == ((RETRY_PUSHBACK_TRAILER, expected),)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(QuotaExceeded("q", subject="t", retry_after_s=None), id="quota-no-wait"),
        pytest.param(upstream(UpstreamRateLimited, status=429), id="429-no-wait"),
        pytest.param(upstream(UpstreamUnavailable, status=503), id="503-no-wait"),
        # Its RetryInfo says 0 s; the caller's own backoff lets its balancer move on.
        pytest.param(ShuttingDown(), id="shutting-down"),
        pytest.param(
            upstream(UpstreamRejected, status=400, retry_after_s=5.0), id="rejected-not-retried"
        ),
        pytest.param(InvalidRequest(VIOLATIONS), id="invalid"),
        pytest.param(DeadlineExceeded("late"), id="deadline"),
        pytest.param(RuntimeError("x"), id="unknown"),
    ],
)
def test_no_pushback_trailer(exc: BaseException) -> None:
    """Codes the retry policy does not retry, and errors that know no wait, push nothing
    back."""
    assert pushback_trailer(exc) == ()


def test_grpc_codes_are_status_codes() -> None:
    """Every class's `grpc_code` is a real grpc.StatusCode (the table cannot drift)."""
    classes: list[type[GatewayError]] = [GatewayError, *_all_subclasses(GatewayError)]
    assert len(classes) >= 17
    for cls in classes:
        assert isinstance(cls.grpc_code, grpc.StatusCode)
        assert cls.reason.isupper()


def _all_subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    """Every subclass of `cls`, recursively."""
    found: list[type[GatewayError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


@pytest.mark.parametrize(
    ("value", "expected_clipped", "expected_quoted"),
    [
        ("gpt-4o", "gpt-4o", "'gpt-4o'"),
        ("a" * 100, "a" * 100, repr("a" * 100)),
        ("a" * 101, "a" * 100 + "...", repr("a" * 100) + "..."),
        ("é" * 100_000, "é" * 100 + "...", repr("é" * 100) + "..."),
    ],
    ids=["short", "at-limit", "one-over", "huge"],
)
def test_echoed_caller_values_are_cut_to_100_characters(
    value: str, expected_clipped: str, expected_quoted: str
) -> None:
    """A value the caller sent is repeated whole up to 100 characters, then cut with '...'."""
    assert clipped(value) == expected_clipped
    assert quoted(value) == expected_quoted


@pytest.mark.parametrize(("attempts", "said"), [(1, "after 1 attempt:"), (3, "after 3 attempts:")])
def test_a_failed_summarize_part_counts_its_attempts_in_words(attempts: int, said: str) -> None:
    cause = UpstreamError("HTTP 500", upstream="up0", status=500)

    failed = SummarizePartFailed(cause, part=2, parts=5, level=1, attempts=attempts)

    assert said in failed.message
