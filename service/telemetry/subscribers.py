"""Telemetry subscribing to the pool's hooks and reading the stores' counters.

The pool and the cache never import telemetry: the server attaches these at startup
(like aiohttp `TraceConfig` signals), so retries, breaker transitions and attempts reach
the metrics, and the cache's `CacheStats` and the Redis stores' late writes are observed
at collection time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from service.breaker import BreakerChange
from service.late_release import LateReleases
from service.pool_hooks import AttemptRecord, PoolHooks, RetryDecision
from service.telemetry.core import Telemetry
from service.telemetry.metrics import StoreWrites


def subscribe_pool(
    telemetry: Telemetry,
    hooks: PoolHooks,
    *,
    upstreams: Iterable[str],
    upstream_models: Iterable[tuple[str, str]] = (),
) -> None:
    """Feed the pool's retries, breaker changes and attempts to `telemetry`.

    Every breaker starts closed, so the gauge reports each upstream, and each model there
    (`upstream_models`: upstream and the model's name there), from the start.
    """

    def on_retry(decision: RetryDecision) -> None:
        # Counted against the upstream whose attempt failed: that is the one retried.
        telemetry.record_retry(
            decision.failed_upstream,
            wait_s=decision.wait_s,
            is_failover=decision.upstream != decision.failed_upstream,
        )

    def on_breaker_change(change: BreakerChange) -> None:
        telemetry.set_breaker_state(change.upstream, change.new.value, model=change.model)

    def on_attempt(record: AttemptRecord) -> None:
        telemetry.record_attempt(
            record.upstream, is_success=record.error is None, is_callers_cut=record.is_callers_cut
        )

    hooks.on_retry.append(on_retry)
    hooks.on_breaker_change.append(on_breaker_change)
    hooks.on_attempt.append(on_attempt)
    for upstream in upstreams:
        telemetry.set_breaker_state(upstream, "closed")
    for upstream, model in upstream_models:
        telemetry.set_breaker_state(upstream, "closed", model=model)


def observe_cache(
    telemetry: Telemetry, counters: Callable[[], Mapping[str, int]]
) -> Callable[[], None]:
    """Export the cache's counters (read when metrics are collected); returns a detacher."""
    telemetry.cache_counters = counters

    def detach() -> None:
        if telemetry.cache_counters is counters:
            telemetry.cache_counters = None

    return detach


def observe_store_writes(
    telemetry: Telemetry, stores: Mapping[str, LateReleases]
) -> Callable[[], None]:
    """Export the late writes of each shared store, by name (read when metrics are
    collected); returns a detacher."""

    def store_writes() -> dict[str, StoreWrites]:
        return {
            name: StoreWrites(waiting=late.pending, abandoned=late.abandoned)
            for name, late in stores.items()
        }

    telemetry.store_writes = store_writes

    def detach() -> None:
        if telemetry.store_writes is store_writes:
            telemetry.store_writes = None

    return detach


__all__ = ["observe_cache", "observe_store_writes", "subscribe_pool"]
