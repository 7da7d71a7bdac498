"""Reading an upstream's server-directed waits and rate-limit headers."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping

from service.upstream.types import RateLimitHints


def retry_after_s(headers: Mapping[str, str], *, now_epoch_s: float) -> float | None:
    """Seconds the upstream asked us to wait: `retry-after-ms`, then `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP date (RFC 9110 section 10.2.3); a date
    in the past means no wait. Unparseable values are ignored rather than trusted.
    """
    wait_ms = _number(headers, "retry-after-ms")
    if wait_ms is not None:
        return max(0.0, wait_ms / 1000.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    wait = _number(headers, "retry-after")
    if wait is not None:
        return max(0.0, wait)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now_epoch_s)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    # "inf" and "nan" parse as floats but are no wait or count to act on (int(inf) raises).
    return value if math.isfinite(value) else None


def rate_limit_hints(headers: Mapping[str, str]) -> RateLimitHints:
    """The `X-RateLimit-Limit/Remaining/Reset` headers (reset in epoch seconds)."""
    limit = _number(headers, "x-ratelimit-limit") or _number(headers, "x-ratelimit-limit-requests")
    remaining = _number(headers, "x-ratelimit-remaining")
    if remaining is None:
        remaining = _number(headers, "x-ratelimit-remaining-requests")
    return RateLimitHints(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset_epoch_s=_number(headers, "x-ratelimit-reset"),
    )
