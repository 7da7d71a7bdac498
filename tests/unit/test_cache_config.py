"""The cache section of the config is checked when loaded, naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import CacheConfig, ConfigError, parse_config


def test_defaults_are_memory_and_deterministic_only() -> None:
    """With no cache section: in-process memory, only deterministic requests cached."""
    cache = parse_config({}, environ={}).cache
    assert (cache.enabled, cache.backend, cache.cacheable_by_default) == (
        True,
        "memory",
        "deterministic",
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"backend": "redis"}, "redis_url"),
        ({"backend": "redis", "redis_url": "http://127.0.0.1:6379"}, "redis_url"),
        ({"backend": "redis", "redis_url": "redis://u:p@127.0.0.1:6379/0"}, "credentials"),
        ({"backend": "redis", "redis_url": "redis://127.0.0.1/0?password=p"}, "credentials"),
        ({"backend": "memcached"}, "backend"),
        ({"default_ttl_s": 0}, "default_ttl_s"),
        ({"default_ttl_s": 100, "max_ttl_s": 10}, "default_ttl_s"),
        # Past what Redis takes as an expiry: every write would fail (`MAX_TTL_S`).
        ({"default_ttl_s": 10**16, "max_ttl_s": 10**16}, "max_ttl_s"),
        ({"max_ttl_s": 2**32}, "max_ttl_s"),
        ({"operation_timeout_s": 0}, "operation_timeout_s"),
        ({"cacheable_by_default": "sometimes"}, "cacheable_by_default"),
        ({"ttl": 5}, "unknown key"),
    ],
)
def test_bad_cache_settings_are_refused(section: dict[str, Any], problem: str) -> None:
    """Each invalid setting is a ConfigError under `cache` that says what is wrong."""
    with pytest.raises(ConfigError, match="cache") as info:
        parse_config({"cache": section}, environ={})
    assert problem in str(info.value)


def test_redis_settings_load_from_yaml_and_environment() -> None:
    """A Redis URL given by environment override is accepted."""
    config = parse_config(
        {"cache": {"backend": "redis"}},
        environ={"LLM_GATEWAY__CACHE__REDIS_URL": "redis://127.0.0.1:6380/2"},
    )
    assert config.cache == CacheConfig(backend="redis", redis_url="redis://127.0.0.1:6380/2")
