"""Which requests the cache reads and writes by default, and their TTL."""

from __future__ import annotations

import pytest

from service.cache import CacheStore, ResponseCache
from service.config import CacheConfig
from service.domain import CacheMode, CachePolicy, ChatRequest, GenerationParams, Message, Role

M = CacheMode


def _request(*, mode: CacheMode | None = None, ttl_s: int | None = None, **params: object):
    return ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(**params),  # type: ignore[arg-type]
        cache=CachePolicy(mode=mode, ttl_s=ttl_s),
    )


def _cache(**config: object) -> ResponseCache:
    settings = CacheConfig(**config)  # type: ignore[arg-type]
    return ResponseCache(settings, store=CacheStore(settings))


@pytest.mark.parametrize(
    ("cacheable", "params", "mode", "expected"),
    [
        ("deterministic", {"temperature": 0.0}, None, M.DEFAULT),
        ("deterministic", {"seed": 1, "temperature": 0.9}, None, M.DEFAULT),
        ("deterministic", {"seed": 0}, None, M.DEFAULT),
        ("deterministic", {"seed": -1}, None, M.BYPASS),  # llama.cpp: a random seed
        ("deterministic", {"seed": -1, "temperature": 0.0}, None, M.DEFAULT),
        # llama.cpp keeps a seed's low 32 bits: all ones is its -1, a random seed.
        ("deterministic", {"seed": 0xFFFFFFFF}, None, M.BYPASS),
        ("deterministic", {"seed": 0x1FFFFFFFF}, None, M.BYPASS),
        ("deterministic", {"seed": 0xFFFFFFFE}, None, M.DEFAULT),
        ("deterministic", {"seed": 0x100000000}, None, M.DEFAULT),
        ("deterministic", {}, None, M.BYPASS),
        ("deterministic", {"temperature": 0.7}, None, M.BYPASS),
        ("deterministic", {"temperature": 0.7}, M.DEFAULT, M.DEFAULT),
        ("deterministic", {"temperature": 0.0}, M.BYPASS, M.BYPASS),
        ("deterministic", {}, M.NO_STORE, M.NO_STORE),
        ("deterministic", {}, M.REFRESH, M.REFRESH),
        ("all", {"temperature": 1.0}, None, M.DEFAULT),
        ("none", {"temperature": 0.0}, None, M.BYPASS),
        ("none", {"temperature": 0.0}, M.DEFAULT, M.DEFAULT),
    ],
)
def test_mode_for(
    cacheable: str, params: dict[str, object], mode: CacheMode | None, expected: CacheMode
) -> None:
    """An explicit mode wins; otherwise cacheable_by_default decides."""
    cache = _cache(cacheable_by_default=cacheable)
    assert cache.mode_for(_request(mode=mode, **params)) is expected


def test_disabled_cache_bypasses_everything() -> None:
    """With the cache off, even an explicit DEFAULT bypasses it."""
    cache = _cache(enabled=False)
    assert cache.mode_for(_request(mode=M.DEFAULT, temperature=0.0)) is M.BYPASS


@pytest.mark.parametrize(("override", "expected"), [(None, 60), (5, 5), (10_000, 120)])
def test_ttl_override_is_capped(override: int | None, expected: int) -> None:
    """The request's TTL replaces the default, up to max_ttl_s."""
    cache = _cache(default_ttl_s=60, max_ttl_s=120)
    assert cache.ttl_for(_request(ttl_s=override)) == expected


def test_mode_reads_and_writes() -> None:
    """The four modes read and write as the contract says."""
    assert [(m.reads, m.writes) for m in (M.DEFAULT, M.BYPASS, M.REFRESH, M.NO_STORE)] == [
        (True, True),
        (False, False),
        (False, True),
        (True, False),
    ]
