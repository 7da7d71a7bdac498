"""Retry policy as pure functions: what to retry, how long to wait, and the retry budget.

The retry loop itself lives in `service.pool`, where it is visible; this module only
decides. Every number the policy uses by default is a constant here.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from service.clock import SYSTEM_CLOCK, Clock
from service.errors import (
    GatewayError,
    StreamInterrupted,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamLacksModel,
    UpstreamNotOpenAI,
    UpstreamRateLimited,
    UpstreamTemplateRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)


class FailureScope(enum.Enum):
    """What a failure that counts against health says is unhealthy (`failure_scope`):
    which circuit breaker it counts against (`service.breaker.RouteBreaker`)."""

    UPSTREAM = "upstream"  # the upstream itself: every model it serves
    MODEL = "model"  # the model the call asked for, there


DEFAULT_ATTEMPTS = 3
INITIAL_BACKOFF_S = 0.5  # seconds: the first backoff's upper bound (full jitter below it)
MAX_BACKOFF_S = 8.0  # seconds
MAX_RETRY_AFTER_S = 60.0  # seconds: honour server-directed waits up to a minute
RETRY_BUDGET_RATIO = 0.2  # retries per request, per upstream, over the window
RETRY_BUDGET_WINDOW_S = 10.0  # seconds
RETRY_BUDGET_MIN_RETRIES = 10  # retries always allowed per window, so quiet upstreams retry
MIN_ATTEMPT_S = 0.05  # seconds: no attempt starts with less than this before the deadline
# Seconds an upstream found lacking a model is passed over for it, when another may serve
# it: long enough to spare each call the round trip, short enough that access granted or
# a deployment created is found without a restart.
LACKING_MODEL_MEMORY_S = 60.0

# HTTP statuses worth another try: timeout, conflict, rate limit and every 5xx.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable(error: BaseException) -> bool:
    """Whether another attempt (here or on another upstream) may succeed.

    Retries 408, 409, 429, 5xx, a redirect (3xx: that upstream is misconfigured, and the
    retry may go to another), connection errors and timeouts. A rejected key (401/403)
    or account (402) is not retried on the same upstream but is failed over (see
    `is_failover_only`). A stream that already sent deltas to the caller is never retried.
    """
    if isinstance(error, StreamInterrupted):
        return False
    if isinstance(error, UpstreamRateLimited | UpstreamTimeout):
        return True
    if isinstance(error, UpstreamUnavailable):
        # No status: a connection error, reset, or malformed answer.
        status = error.status
        return status is None or status in RETRYABLE_STATUSES or not 400 <= status < 500
    return False


def is_failover_only(error: BaseException) -> bool:
    """Whether the error rules out this upstream but another one may still serve the call:
    its key rejected, an answer from some other server than an OpenAI one (a wrong
    base_url's login page will not have changed by the next backoff), no such model
    there (a provider that dropped or renamed it; the request is fine elsewhere), or
    messages the local model's chat template refuses (a provider serving the model beside
    it takes them)."""
    return isinstance(
        error,
        UpstreamAuthRejected | UpstreamNotOpenAI | UpstreamLacksModel | UpstreamTemplateRefused,
    )


def counts_against_health(error: BaseException) -> bool:
    """Whether the error says the upstream itself is unhealthy (for the circuit breaker).

    A 429 is the upstream working as designed (the limiter handles it), and a 4xx
    rejection is about the request, so neither opens the breaker.
    """
    if isinstance(error, UpstreamRateLimited):
        return False
    return isinstance(error, UpstreamAuthRejected | UpstreamTimeout | UpstreamUnavailable)


def failure_scope(error: BaseException, *, is_sent: bool) -> FailureScope | None:
    """What a failed attempt counts against, for the circuit breakers: the upstream itself
    (every model it serves) or the model the call asked for there; None when it says
    nothing of health (`counts_against_health`). `is_sent`: the request reached the
    upstream whole (`AttemptLog.is_sent`: its answer began, or the wait for it ran out
    after every byte was written).

    The model's, once the upstream took the request: an error status (5xx, 408, 409), the
    wait for the answer timed out, a malformed or cut answer, a stream's error event.
    The upstream's, when the request never reached it whole (refused, reset or closed
    before any answer, a name that does not resolve, TLS, a proxy's failure, a connect
    timeout), and for what its address answers every model alike: a rejected key or
    account, a redirect, an answer that is no OpenAI one (a wrong base_url).
    """
    if not counts_against_health(error):
        return None
    if not is_sent or isinstance(error, UpstreamAuthRejected | UpstreamNotOpenAI):
        return FailureScope.UPSTREAM
    status = error.status if isinstance(error, UpstreamError) else None
    if status is not None and 300 <= status < 400:
        return FailureScope.UPSTREAM
    return FailureScope.MODEL


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The numbers of capped exponential backoff with full jitter."""

    base_s: float = INITIAL_BACKOFF_S
    cap_s: float = MAX_BACKOFF_S
    max_retry_after_s: float = MAX_RETRY_AFTER_S


def backoff_s(
    retries_taken: int,
    *,
    retry_after_s: float | None,
    rng: random.Random,
    policy: BackoffPolicy = BackoffPolicy(),
) -> float:
    """Seconds to wait before retry number `retries_taken + 1`.

    A server-directed wait (`retry-after-ms` / `Retry-After`) is honoured, capped at
    `policy.max_retry_after_s`. Otherwise full jitter: uniform in
    [0, min(cap, base * 2**retries_taken)], which spreads retries of many callers apart
    (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).
    """
    if retry_after_s is not None:
        return max(0.0, min(retry_after_s, policy.max_retry_after_s))
    ceiling = min(policy.cap_s, doubled(policy.base_s, max(0, retries_taken)))
    return rng.uniform(0.0, ceiling)


# The most doublings a float takes: 2.0 ** 1024 is none (OverflowError).
_MAX_DOUBLINGS = 1023


def doubled(seconds: float, times: int) -> float:
    """`seconds` doubled `times` times, infinity past a float's range: the 1025th retry of
    a config allowing that many (`attempts`, `chunk_attempts`) failed the call INTERNAL
    on `2 ** 1024`, an int no float holds."""
    return seconds * 2.0 ** min(times, _MAX_DOUBLINGS)


class RetryBudget:
    """Caps retries to a fraction of requests over a sliding window, per upstream.

    With ratio 0.2, at most one retry per five requests (plus `min_retries` per window)
    reaches the upstream, so a failing provider sees at most 1.2x its normal load.
    """

    def __init__(
        self,
        *,
        ratio: float = RETRY_BUDGET_RATIO,
        window_s: float = RETRY_BUDGET_WINDOW_S,
        min_retries: int = RETRY_BUDGET_MIN_RETRIES,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_retries = min_retries
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        _drop_until(self._requests, horizon)
        _drop_until(self._retries, horizon)

    def record_request(self) -> None:
        """A first attempt was sent to the upstream."""
        now = self._clock.now()
        # Only the requests' stamps: every call's first attempt comes here; the retries'
        # are pruned where they are counted or added. `_drop_until` written out (a frame
        # on every call).
        requests, horizon = self._requests, now - self.window_s
        while requests and requests[0] <= horizon:
            requests.popleft()
        requests.append(now)

    def can_retry(self) -> bool:
        """Whether one more retry fits in the budget now."""
        self._prune(self._clock.now())
        allowed = self.min_retries + self.ratio * len(self._requests)
        return len(self._retries) + 1 <= allowed

    def record_retry(self) -> None:
        """A retry was sent to the upstream."""
        now = self._clock.now()
        self._prune(now)
        self._retries.append(now)


def _drop_until(stamps: deque[float], horizon: float) -> None:
    """Drop the stamps (oldest first) at or before `horizon`."""
    while stamps and stamps[0] <= horizon:
        stamps.popleft()


def restart_wait_s(failure: UpstreamError) -> float | None:
    """Seconds until the restart `failure` met should answer (its `RetryInfo`), when the
    call was refused as its upstream restarts (the local model's, dead under it or before
    it); None when it met no restart."""
    if failure.restarting and failure.retry_after_s is not None:
        return failure.retry_after_s
    return None


def reopen_wait_s(failure: UpstreamError) -> float | None:
    """Seconds until an upstream of the call that ended with `failure` takes a call again,
    when the call found none that would: the restart it met (`restart_wait_s`), or the
    first of its upstreams' breakers to let a call through (`shut_for_s`); None when
    neither kept it off every upstream."""
    restart_s = restart_wait_s(failure)
    if failure.shut_for_s is None:
        return restart_s
    return max(restart_s or 0.0, failure.shut_for_s)


def next_try_s(failure: UpstreamError, backoff_s: float) -> float:
    """How long a call the gateway tries again itself (a Summarize part, a batch item)
    waits before its next try after `failure`: its back-off, or, while its upstreams
    restart or their breakers keep every call off, until one takes calls again, since
    each try before that is refused at once, unsent."""
    return max(backoff_s, reopen_wait_s(failure) or 0.0)


def says_why(failure: UpstreamError) -> bool:
    """Whether `failure` of a call the gateway tries again itself is the one to end it
    with, should no try after it say why: an upstream's own failure (it was sent), or a
    refusal as its upstream restarts, which says what stopped the call and when to come
    back. Not a try its retry budget or breaker kept from any upstream: that says less of
    why the call failed than the failure before it."""
    return failure.attempts != 0 or bool(failure.restarting)


def describe(error: BaseException) -> str:
    """A short, secret-free label of an error for logs and attempt records."""
    if isinstance(error, GatewayError):
        status = getattr(error, "status", None)
        return f"{error.reason}:{status}" if status is not None else error.reason
    return type(error).__name__


__all__ = [
    "DEFAULT_ATTEMPTS",
    "INITIAL_BACKOFF_S",
    "LACKING_MODEL_MEMORY_S",
    "MAX_BACKOFF_S",
    "MAX_RETRY_AFTER_S",
    "MIN_ATTEMPT_S",
    "RETRYABLE_STATUSES",
    "RETRY_BUDGET_MIN_RETRIES",
    "RETRY_BUDGET_RATIO",
    "RETRY_BUDGET_WINDOW_S",
    "BackoffPolicy",
    "FailureScope",
    "RetryBudget",
    "backoff_s",
    "counts_against_health",
    "describe",
    "failure_scope",
    "is_failover_only",
    "is_retryable",
    "next_try_s",
    "reopen_wait_s",
    "restart_wait_s",
    "says_why",
]
