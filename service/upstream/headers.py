"""Reading an upstream's server-directed waits and rate-limit headers."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
from collections.abc import Mapping

from service.upstream.types import RateLimitHints


def retry_after_s(headers: Mapping[str, str], *, now_epoch_s: float) -> float | None:
    """Seconds the upstream asked us to wait: `retry-after-ms`, then `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP date (RFC 9110 section 10.2.3); a date
    in the past means no wait. Unparseable values are ignored rather than trusted, a
    negative number among them: no delay-seconds, and read as 0 it sent the retry at
    once, where the backoff would have waited.
    """
    wait_ms = _longest(headers, "retry-after-ms")
    if wait_ms is not None:
        return wait_ms / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    # Sent twice (a proxy adding its own), the values arrive joined: the longest wait, of
    # dates as of numbers. Split at every comma, a date's own was read as the first date
    # alone (the longer one after it dropped) or as nothing at all after a number.
    waits = [_one_retry_after(value, now_epoch_s) for value in _retry_after_values(raw)]
    if None in waits:
        return None
    return max(wait for wait in waits if wait is not None)


# An HTTP date's weekday, before the comma the date holds ("Sun, 06 Nov 1994 08:49:37
# GMT", "Sunday, 06-Nov-94 08:49:37 GMT"): no value of Retry-After on its own.
_WEEKDAY = re.compile(r"[A-Za-z]{3,9}")


def _retry_after_values(raw: str) -> list[str]:
    """The values of a `Retry-After` header sent once or more, each date whole."""
    values: list[str] = []
    for part in raw.split(","):
        if values and _WEEKDAY.fullmatch(values[-1]):
            values[-1] += ", " + part.strip()
        else:
            values.append(part.strip())
    return values


def _one_retry_after(value: str, now_epoch_s: float) -> float | None:
    """Seconds one `Retry-After` value asks for: delay-seconds or an HTTP date; None
    for anything else, a negative number among them."""
    seconds = _finite(value)
    if seconds is not None:
        return None if seconds < 0 else seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a field past any C int
        return None
    if when.tzinfo is None:  # asctime names no zone; every HTTP date is UTC
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now_epoch_s)


def media_type(headers: Mapping[str, str]) -> str:
    """The answer's media type as `Content-Type` names it, without its parameters and in
    lower case (media types are case-insensitive, RFC 9110 section 8.3.1); "" when none."""
    return headers.get("content-type", "").partition(";")[0].strip().lower()


def _longest(headers: Mapping[str, str], name: str) -> float | None:
    """A wait header's number; sent twice (a proxy adding its own), the two arrive joined
    as `1, 1`: the longest, rather than none and retries at once into the rate limit."""
    raw = headers.get(name)
    if raw is None:
        return None
    waits = [_finite(part) for part in raw.split(",")]
    if None in waits or any(w is not None and w < 0 for w in waits):
        return None
    return max(w for w in waits if w is not None)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    return None if raw is None else _finite(raw)


def _finite(text: str) -> float | None:
    """`text` as a finite number, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    # "inf" and "nan" parse as floats but are no wait or count to act on (int(inf) raises).
    return value if math.isfinite(value) else None


# One number and its unit of a Go duration; `ms` is tried before `m`.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|μs|ns)")
_DURATION = re.compile(f"(?:{_DURATION_PART.pattern})+")
_MAX_DURATION_CHARS = 32  # "1h2m3.5s" is 8: anything far longer is not a reset
_SECONDS_PER_UNIT = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu
    "ns": 1e-9,
}


def go_duration_s(raw: str) -> float | None:
    """Seconds in a Go duration (`1s`, `6m0s`, `20ms`, `1h2m3.5s`), or None if it is not one.

    The form of OpenAI's `x-ratelimit-reset-requests` / `-tokens` headers, as Go's
    `time.Duration.String` writes it (https://pkg.go.dev/time#ParseDuration). Strict: a
    sign, a unit missing (but for a bare `0`) or anything else makes it unreadable.
    """
    text = raw.strip()
    if text == "0":
        return 0.0
    if len(text) > _MAX_DURATION_CHARS or not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _SECONDS_PER_UNIT[unit] for n, unit in _DURATION_PART.findall(text))


def _duration(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    return None if raw is None else go_duration_s(raw)


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)


# Every header `rate_limit_hints` can read a hint from without another one alongside.
_HINT_HEADERS = frozenset(
    {
        "x-ratelimit-limit",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-tokens",
    }
)
_NO_HINTS = RateLimitHints()


def rate_limit_hints(headers: Mapping[str, str]) -> RateLimitHints:
    """The upstream's rate-limit headers, as the limiter reads them.

    `X-RateLimit-Limit/Remaining/Reset` (reset in epoch seconds, seconds from now, or a Go
    duration) win when sent. Otherwise OpenAI's two windows,
    `x-ratelimit-{limit,remaining,reset}-requests` and `-tokens`, resets as Go durations:
    the hints describe the tokens window when it is exhausted and the requests window is
    not (or resets sooner), else the requests window.
    """
    if _HINT_HEADERS.isdisjoint(headers):  # most answers: skip reading each one
        return _NO_HINTS
    limit = _number(headers, "x-ratelimit-limit") or _number(headers, "x-ratelimit-limit-requests")
    remaining = _number(headers, "x-ratelimit-remaining")
    reset_epoch_s = _number(headers, "x-ratelimit-reset")
    if remaining is not None:
        return RateLimitHints(
            limit=_count(limit),
            remaining=int(remaining),
            reset_epoch_s=reset_epoch_s,
            # Some providers send it as OpenAI sends its windows' resets: `20s`, `1m30s`.
            reset_in_s=None
            if reset_epoch_s is not None
            else _duration(headers, "x-ratelimit-reset"),
        )
    remaining = _number(headers, "x-ratelimit-remaining-requests")
    reset_in_s = _duration(headers, "x-ratelimit-reset-requests")
    tokens_left = _number(headers, "x-ratelimit-remaining-tokens")
    if tokens_left is not None and tokens_left <= 0:
        tokens_reset_in_s = _duration(headers, "x-ratelimit-reset-tokens")
        is_requests_exhausted = remaining is not None and remaining <= 0
        if not is_requests_exhausted or (tokens_reset_in_s or 0.0) > (reset_in_s or 0.0):
            return RateLimitHints(
                limit=_count(_number(headers, "x-ratelimit-limit-tokens")),
                remaining=int(tokens_left),
                reset_epoch_s=reset_epoch_s,
                reset_in_s=tokens_reset_in_s,
            )
    return RateLimitHints(
        limit=_count(limit),
        remaining=_count(remaining),
        reset_epoch_s=reset_epoch_s,
        reset_in_s=reset_in_s,
    )
