"""Unit tests for server-directed waits and rate-limit headers (service.upstream.headers)."""

from __future__ import annotations

import email.utils
import time

import pytest

from service.upstream.headers import go_duration_s, media_type, rate_limit_hints, retry_after_s
from service.upstream.types import RateLimitHints

# 2026-01-01T00:00:00Z: a fixed "now", so HTTP dates are checked without the real clock.
NOW = 1_767_225_600.0


def http_date(epoch_s: float) -> str:
    """An RFC 9110 IMF-fixdate for `epoch_s`."""
    return email.utils.formatdate(epoch_s, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, None, id="absent"),
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms"),
        pytest.param({"retry-after-ms": "250.5"}, 0.2505, id="ms-fractional"),
        pytest.param({"retry-after-ms": "0"}, 0.0, id="ms-zero"),
        # No delay-seconds: ignored, so that the backoff waits, not a retry sent at once.
        pytest.param({"retry-after-ms": "-20"}, None, id="ms-negative-ignored"),
        pytest.param(
            {"retry-after-ms": "-20", "retry-after": "2"}, 2.0, id="ms-negative-falls-back"
        ),
        pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
        pytest.param({"retry-after": " 7 "}, 7.0, id="seconds-padded"),
        pytest.param({"retry-after": "0.25"}, 0.25, id="seconds-fractional"),
        pytest.param({"retry-after": "0"}, 0.0, id="seconds-zero"),
        pytest.param({"retry-after": "-5"}, None, id="seconds-negative-ignored"),
        pytest.param({"retry-after": "-0"}, 0.0, id="seconds-negative-zero"),
        pytest.param({"retry-after": "3, -1"}, None, id="seconds-twice-one-negative"),
        pytest.param({"retry-after": http_date(NOW + 30)}, 30.0, id="date-future"),
        pytest.param({"retry-after": http_date(NOW - 30)}, 0.0, id="date-past"),
        pytest.param({"retry-after": http_date(NOW)}, 0.0, id="date-now"),
        pytest.param({"retry-after": "soon"}, None, id="garbage"),
        pytest.param({"retry-after": ""}, None, id="empty"),
        pytest.param({"retry-after": "Mon, 99 Foo 2026 99:99:99 GMT"}, None, id="bad-date"),
        pytest.param(
            {"retry-after": "Thu, 01 Jan 2026 00:00:" + "9" * 20 + " GMT"},
            None,
            id="date-second-past-any-int",
        ),
        pytest.param(
            {"retry-after": "Thu, 01 Jan " + "9" * 20 + " 00:00:00 GMT"},
            None,
            id="date-year-past-any-int",
        ),
        pytest.param({"retry-after-ms": "soon"}, None, id="ms-garbage-alone"),
        pytest.param({"retry-after": "inf"}, None, id="infinite"),
        pytest.param({"retry-after": "1e400"}, None, id="overflows-to-infinite"),
        pytest.param({"retry-after": "nan"}, None, id="nan"),
        pytest.param({"retry-after-ms": "Infinity"}, None, id="ms-infinite"),
        pytest.param({"retry-after-ms": "nan", "retry-after": "2"}, 2.0, id="ms-nan-falls-back"),
        # Sent twice (a proxy adding its own), a header arrives joined: the longest wait.
        pytest.param({"retry-after": "1, 1"}, 1.0, id="seconds-twice"),
        pytest.param({"retry-after": "2, 30"}, 30.0, id="seconds-twice-the-longest"),
        pytest.param({"retry-after-ms": "500,200"}, 0.5, id="ms-twice"),
        pytest.param({"retry-after": "2, soon"}, None, id="seconds-and-garbage"),
        pytest.param({"retry-after": http_date(NOW + 30)}, 30.0, id="date-has-a-comma-too"),
        pytest.param(
            {"retry-after": f"{http_date(NOW + 5)}, {http_date(NOW + 20)}"},
            20.0,
            id="date-twice-the-later",
        ),
        pytest.param({"retry-after": f"7, {http_date(NOW + 20)}"}, 20.0, id="seconds-then-date"),
        pytest.param({"retry-after": f"{http_date(NOW + 5)}, 40"}, 40.0, id="date-then-seconds"),
        pytest.param(
            {"retry-after": "5, Thursday, 01-Jan-26 00:00:30 GMT"}, 30.0, id="rfc850-date-twice"
        ),
        pytest.param({"retry-after": f"{http_date(NOW + 5)}, soon"}, None, id="date-and-garbage"),
    ],
)
def test_retry_after_s(headers: dict[str, str], expected: float | None) -> None:
    """Each Retry-After form gives the wait in seconds, or None for one not to trust."""
    wait = retry_after_s(headers, now_epoch_s=NOW)
    if expected is None:
        assert wait is None
    else:
        assert wait == pytest.approx(expected)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "100", "retry-after": "9"}, 0.1, id="ms-wins"),
        pytest.param({"retry-after-ms": "0", "retry-after": "9"}, 0.0, id="ms-zero-wins"),
        pytest.param(
            {"retry-after-ms": "2000", "retry-after": http_date(NOW + 60)}, 2.0, id="ms-over-date"
        ),
        pytest.param(
            {"retry-after-ms": "garbage", "retry-after": "4"}, 4.0, id="bad-ms-falls-back"
        ),
    ],
)
def test_retry_after_ms_takes_precedence(headers: dict[str, str], expected: float) -> None:
    """A valid `retry-after-ms` wins over `Retry-After`; an invalid one is skipped."""
    assert retry_after_s(headers, now_epoch_s=NOW) == pytest.approx(expected)


def test_retry_after_asctime_date_is_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asctime, one of the three HTTP-date forms a recipient must accept (RFC 9110
    section 5.6.7), names no zone: like every HTTP date it is UTC, not the host's time."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        wait = retry_after_s({"retry-after": "Thu Jan  1 00:00:30 2026"}, now_epoch_s=NOW)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert wait == pytest.approx(30.0)


@pytest.mark.parametrize(("reset", "seconds"), [("20s", 20.0), ("1m30s", 90.0), ("6ms", 0.006)])
def test_a_plain_reset_given_as_a_duration_is_read(reset: str, seconds: float) -> None:
    """`X-RateLimit-Reset` as some providers send it, a duration like OpenAI's resets: a
    reset given, so remaining 0 pauses until it rather than for the second of none."""
    headers = {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}
    hints = rate_limit_hints(headers)
    assert hints == RateLimitHints(limit=60, remaining=0, reset_in_s=seconds)
    assert hints.exhausted_for_s(NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [(NOW + 12, 12.0), ((NOW + 12) * 1000, 12.0), (7, 7.0)],
    ids=["epoch-seconds", "epoch-milliseconds", "seconds-from-now"],
)
def test_a_reset_in_epoch_milliseconds_is_read_as_such(reset: float, seconds: float) -> None:
    """OpenRouter sends `X-RateLimit-Reset` in epoch milliseconds: read as seconds it was
    thousands of years away, and paused the upstream for the 60 s cap, not 12 s."""
    headers = {
        "x-ratelimit-limit": "20",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(int(reset)),
    }
    assert rate_limit_hints(headers).exhausted_for_s(NOW) == pytest.approx(seconds)


def test_retry_after_date_uses_injected_now() -> None:
    """An HTTP date is measured from the `now_epoch_s` given, not the real clock."""
    headers = {"retry-after": http_date(NOW + 100)}
    assert retry_after_s(headers, now_epoch_s=NOW + 40) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, RateLimitHints(), id="none"),
        pytest.param(
            {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "59", "x-ratelimit-reset": "1.5"},
            RateLimitHints(limit=60, remaining=59, reset_epoch_s=1.5),
            id="plain",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499"},
            RateLimitHints(limit=500, remaining=499),
            id="openai-requests-names",
        ),
        pytest.param(
            {
                "x-ratelimit-limit": "10",
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining": "3",
                "x-ratelimit-remaining-requests": "499",
            },
            RateLimitHints(limit=10, remaining=3),
            id="plain-names-win",
        ),
        pytest.param(
            {"x-ratelimit-remaining": "0", "x-ratelimit-remaining-requests": "7"},
            RateLimitHints(remaining=0),
            id="zero-remaining-is-kept",
        ),
        pytest.param(
            {"x-ratelimit-limit": "lots", "x-ratelimit-remaining": "", "x-ratelimit-reset": "?"},
            RateLimitHints(),
            id="garbage-ignored",
        ),
        pytest.param(
            {
                "x-ratelimit-limit": "inf",
                "x-ratelimit-remaining": "nan",
                "x-ratelimit-reset": "inf",
            },
            RateLimitHints(),
            id="non-finite-ignored",
        ),
        pytest.param(
            {"x-ratelimit-limit": "100.0", "x-ratelimit-remaining": "42.9"},
            RateLimitHints(limit=100, remaining=42),
            id="float-counts-truncated",
        ),
    ],
)
def test_rate_limit_hints(headers: dict[str, str], expected: RateLimitHints) -> None:
    """`X-RateLimit-*` headers parse into hints; absent or unparseable ones stay None."""
    assert rate_limit_hints(headers) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("1s", 1.0, id="seconds"),
        pytest.param("6m0s", 360.0, id="minutes-and-zero-seconds"),
        pytest.param("20ms", 0.02, id="milliseconds"),
        pytest.param("1h2m3.5s", 3723.5, id="hours-minutes-fractional-seconds"),
        pytest.param("2m59.56s", 179.56, id="groq-style"),
        pytest.param("0s", 0.0, id="zero-seconds"),
        pytest.param("0", 0.0, id="bare-zero"),
        pytest.param(".5s", 0.5, id="leading-point"),
        pytest.param("1.s", 1.0, id="trailing-point"),
        pytest.param("1500us", 0.0015, id="microseconds"),
        pytest.param("1500µs", 0.0015, id="micro-sign"),
        pytest.param("1500μs", 0.0015, id="greek-mu"),
        pytest.param("250000000ns", 0.25, id="nanoseconds"),
        pytest.param(" 7s ", 7.0, id="padded"),
        pytest.param("1m1m", 120.0, id="repeated-unit-adds-up-as-in-go"),
        pytest.param("", None, id="empty"),
        pytest.param("1", None, id="no-unit"),
        pytest.param("1.5", None, id="number-without-unit"),
        pytest.param("-1s", None, id="negative"),
        pytest.param("+1s", None, id="signed"),
        pytest.param("1d", None, id="unknown-unit"),
        pytest.param("1S", None, id="upper-case-unit"),
        pytest.param("1 s", None, id="space-inside"),
        pytest.param("s", None, id="unit-without-number"),
        pytest.param("1.2.3s", None, id="two-points"),
        pytest.param("1sx", None, id="trailing-garbage"),
        pytest.param("\u0661s", None, id="non-ascii-digit"),
        pytest.param("inf", None, id="infinity"),
        pytest.param("nan", None, id="nan"),
        pytest.param("1" * 40 + "s", None, id="too-long"),
        pytest.param("9" * 31 + "h", 9.999999999999999e30 * 3600, id="longest-is-finite"),
    ],
)
def test_go_duration_s(raw: str, expected: float | None) -> None:
    """Go durations parse to seconds; anything else, however close, is None."""
    seconds = go_duration_s(raw)
    if expected is None:
        assert seconds is None
    else:
        assert seconds == pytest.approx(expected)


_OPENAI_WINDOWS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29000",
    "x-ratelimit-reset-tokens": "2s",
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {},
            RateLimitHints(limit=500, remaining=499, reset_in_s=0.12),
            id="neither-exhausted-requests-window",
        ),
        pytest.param(
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
            RateLimitHints(limit=30000, remaining=0, reset_in_s=360.0),
            id="tokens-exhausted",
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"},
            RateLimitHints(limit=500, remaining=0, reset_in_s=1.5),
            id="requests-exhausted",
        ),
        pytest.param(
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "20s",
            },
            RateLimitHints(limit=30000, remaining=0, reset_in_s=20.0),
            id="both-exhausted-tokens-later",
        ),
        pytest.param(
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1m",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "20s",
            },
            RateLimitHints(limit=500, remaining=0, reset_in_s=60.0),
            id="both-exhausted-requests-later",
        ),
        pytest.param(
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "soon"},
            RateLimitHints(limit=30000, remaining=0),
            id="tokens-exhausted-garbage-reset",
        ),
        pytest.param(
            {"x-ratelimit-reset-requests": "-1s"},
            RateLimitHints(limit=500, remaining=499),
            id="negative-reset-ignored",
        ),
        pytest.param(
            {"x-ratelimit-remaining": "3", "x-ratelimit-remaining-tokens": "0"},
            RateLimitHints(limit=500, remaining=3),
            id="plain-names-still-win",
        ),
    ],
)
def test_rate_limit_hints_of_openai_windows(
    changes: dict[str, str], expected: RateLimitHints
) -> None:
    """OpenAI's requests and tokens windows: the exhausted one's reset is the one used."""
    assert rate_limit_hints({**_OPENAI_WINDOWS, **changes}) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-ratelimit-limit", "60"),
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "30"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-remaining-tokens", "0"),
    ],
)
def test_each_hint_header_is_read_on_its_own(name: str, value: str) -> None:
    """An answer with only one of these headers (and others that are no hint) still gives
    a hint: none is skipped by the check that spares answers without any."""
    assert rate_limit_hints({"content-type": "application/json", name: value}) != RateLimitHints()


def test_a_tokens_window_without_its_remaining_gives_no_hint() -> None:
    """The tokens window's limit and reset say nothing without its remaining count."""
    headers = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-reset-tokens": "6m0s"}
    assert rate_limit_hints(headers) == RateLimitHints()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"content-type": "application/json"}, "application/json"),
        ({"content-type": "Application/JSON; charset=UTF-8"}, "application/json"),
        ({"content-type": " text/event-stream ;charset=utf-8"}, "text/event-stream"),
        ({}, ""),
    ],
    ids=["bare", "case-and-charset", "spaces", "none"],
)
def test_media_type(headers: dict[str, str], expected: str) -> None:
    """The media type alone, in lower case: "" when the answer names none."""
    assert media_type(headers) == expected
