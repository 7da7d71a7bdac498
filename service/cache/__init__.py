"""The response cache: canonical keys, aiocache storage, single-flight, stream replay."""

from service.cache.entry import CachedAnswer
from service.cache.keys import cache_key, canonical_request
from service.cache.response_cache import ResponseCache, is_deterministic
from service.cache.single_flight import SingleFlight
from service.cache.stats import CacheStats
from service.cache.store import CacheStore

__all__ = [
    "CacheStats",
    "CacheStore",
    "CachedAnswer",
    "ResponseCache",
    "SingleFlight",
    "cache_key",
    "canonical_request",
    "is_deterministic",
]
