"""What the upstream pool reports as it works: attempt records, counters and hooks.

The pool never imports an exporter. Telemetry attaches callables to a `PoolHooks`
(like aiohttp's `TraceConfig` signals): one call per upstream attempt, one per breaker
transition, one per retry decision. `PoolCounters` is the built-in subscriber that keeps
plain totals, enough for tests, the bench and a metrics helper to read.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from service.breaker import BreakerChange

log = logging.getLogger("llm_gateway.pool")
_T = TypeVar("_T")
# Breaker transitions kept by `PoolCounters`: the most recent only, so that an upstream
# that flaps for months does not grow the process.
RECENT_BREAKER_CHANGES = 1000


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One upstream attempt of one call, as it ended."""

    number: int  # 1-based within the call
    upstream: str
    model: str
    is_stream: bool
    started_at: float  # monotonic seconds
    duration_s: float
    error: str | None = None  # e.g. "UPSTREAM_UNAVAILABLE:503"; None when it succeeded
    deltas_sent: int = 0
    # The caller cut it (cancelled, or its deadline passed): no fault of the upstream's.
    is_callers_cut: bool = False


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The pool chose to try again: where, after how long, and why."""

    upstream: str  # where the next attempt goes
    failed_upstream: str
    attempt: int  # the number of the attempt about to start
    wait_s: float
    reason: str  # the failed attempt's error label


@dataclass(slots=True)
class PoolHooks:
    """Subscribers to the pool's events; each list is called in order, errors logged.
    `UpstreamPool._record` tells `on_attempt`'s itself (a frame less on every attempt)."""

    on_attempt: list[Callable[[AttemptRecord], None]] = field(default_factory=list)
    on_retry: list[Callable[[RetryDecision], None]] = field(default_factory=list)
    on_breaker_change: list[Callable[[BreakerChange], None]] = field(default_factory=list)

    def retry(self, decision: RetryDecision) -> None:
        """Tell every subscriber a retry or failover was scheduled."""
        log.debug(
            "pool.retry_scheduled",
            extra={
                "upstream": decision.upstream,
                "failed_upstream": decision.failed_upstream,
                "attempt": decision.attempt,
                "wait_s": round(decision.wait_s, 3),
                "why": decision.reason,
            },
        )
        for hook in self.on_retry:
            _safely(hook, decision)

    def breaker_changed(self, change: BreakerChange) -> None:
        """Tell every subscriber a circuit breaker changed state."""
        for hook in self.on_breaker_change:
            _safely(hook, change)


def _safely(hook: Callable[[_T], None], payload: _T) -> None:
    # A broken subscriber must never fail a caller's request.
    try:
        hook(payload)
    except Exception:
        log.exception("pool.hook_failed")


@dataclass(slots=True)
class PoolCounters:
    """Plain totals of what the pool did, kept by subscribing to its hooks."""

    attempts: int = 0
    retries: int = 0
    failovers: int = 0
    upstream_errors: Counter[str] = field(default_factory=Counter)
    attempts_by_upstream: Counter[str] = field(default_factory=Counter)
    breaker_changes: deque[BreakerChange] = field(
        default_factory=lambda: deque(maxlen=RECENT_BREAKER_CHANGES)
    )

    def attach(self, hooks: PoolHooks) -> PoolCounters:
        """Subscribe to `hooks`; returns self."""
        hooks.on_attempt.append(self._on_attempt)
        hooks.on_retry.append(self._on_retry)
        hooks.on_breaker_change.append(self.breaker_changes.append)
        return self

    def _on_attempt(self, record: AttemptRecord) -> None:
        self.attempts += 1
        self.attempts_by_upstream[record.upstream] += 1
        if record.error is not None:
            self.upstream_errors[record.error] += 1

    def _on_retry(self, decision: RetryDecision) -> None:
        self.retries += 1
        if decision.upstream != decision.failed_upstream:
            self.failovers += 1


__all__ = ["AttemptRecord", "PoolCounters", "PoolHooks", "RetryDecision"]
