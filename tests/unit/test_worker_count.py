"""How many worker processes `serve` runs when the config does or does not say."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import parse_config
from service.cpus import usable_cpus
from service.workers import state_kept_per_worker, worker_count

CORES = usable_cpus()
REDIS = "redis://127.0.0.1:6379/0"
LIMITED = {"acme": {"requests_per_minute": 60}}


def config(**sections: Any) -> Any:
    return parse_config({"local_model": {"enabled": "never"}, **sections}, environ={})


@pytest.mark.parametrize(("workers", "expected"), [(3, 3), (1, 1), (0, CORES)])
def test_a_configured_count_is_used_whatever_the_state(workers: int, expected: int) -> None:
    """server.workers wins: N processes, 0 one per core, even with state in memory."""
    count, _ = worker_count(config(server={"workers": workers}))
    assert count == expected


def test_unset_with_the_ledger_in_memory_runs_one_process_and_says_why() -> None:
    """A default setup keeps usage in memory: several processes would each hold a part."""
    count, why = worker_count(config())
    assert count == 1
    assert "ledger.redis_url" in why


def test_unset_with_tenant_limits_in_memory_runs_one_process() -> None:
    """Per-process limits would let a tenant through once per process."""
    count, why = worker_count(config(ledger={"redis_url": REDIS}, tenants=LIMITED))
    assert count == 1
    assert "auth.redis_url" in why


def _upstream(**limits: Any) -> dict[str, Any]:
    return {"name": "up0", "base_url": "http://127.0.0.1:9/v1", "models": ["m"], **limits}


def test_unset_with_an_upstreams_rate_per_process_runs_one_process() -> None:
    """Per-process buckets would send the provider N times the upstream's rate."""
    upstreams = [_upstream(requests_per_minute=600)]
    count, why = worker_count(config(ledger={"redis_url": REDIS}, upstreams=upstreams))
    assert count == 1
    assert "'up0'" in why
    assert "shared_limits" in why


@pytest.mark.parametrize(
    "sections",
    [
        {"ledger": {"redis_url": REDIS}},
        {"ledger": {"redis_url": REDIS}, "auth": {"redis_url": REDIS}, "tenants": LIMITED},
        {
            "ledger": {"redis_url": REDIS},
            "auth": {"redis_url": REDIS},
            "upstreams": [_upstream(tokens_per_minute=10_000, shared_limits=True)],
        },
        {"ledger": {"redis_url": REDIS}, "upstreams": [_upstream(max_concurrency=5)]},
    ],
    ids=["no-limits", "limits-in-redis", "shared-upstream-rate", "upstream-concurrency-only"],
)
def test_unset_with_shared_state_in_redis_runs_one_process_per_core(
    sections: dict[str, Any],
) -> None:
    """With the ledger (and any limits) in Redis, the default uses every core."""
    count, why = worker_count(config(**sections))
    assert count == CORES
    assert "Redis" in why


def test_the_state_kept_per_worker_names_each_part_and_what_shares_it() -> None:
    """Each part several workers would keep apart is named, each unshared upstream too,
    for `serve --workers N` to warn of: the automatic count names only the first."""
    upstreams = [
        {**_upstream(requests_per_minute=600), "name": "up0"},
        {**_upstream(tokens_per_minute=10_000), "name": "up1"},
    ]
    kept = state_kept_per_worker(config(tenants=LIMITED, upstreams=upstreams))
    assert len(kept) == 4
    assert "ledger.redis_url" in kept[0]
    assert "auth.redis_url" in kept[1]
    assert "'up0'" in kept[2]
    assert "'up1'" in kept[3]


def test_no_state_is_kept_per_worker_when_it_is_all_in_redis() -> None:
    """The ledger and the limits in Redis, the cache in memory: nothing to warn of."""
    sections = {"ledger": {"redis_url": REDIS}, "auth": {"redis_url": REDIS}, "tenants": LIMITED}
    assert state_kept_per_worker(config(**sections)) == []
