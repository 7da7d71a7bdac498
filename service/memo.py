"""A dict that keeps at most a fixed number of entries, forgetting the least used first."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """At most `size` entries; putting one more drops the one put or got longest ago.

    Written by hand because `functools.lru_cache` memoizes a function, while the gateway
    remembers values it only learns after the call (a store read, a prepared request).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._size = size
        self._entries: dict[K, V] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value under `key`, or None; a value found is now the newest."""
        entries = self._entries
        value = entries.pop(key, None)
        if value is not None:
            entries[key] = value  # a hot key outlives a burst of keys put once
        return value

    def put(self, key: K, value: V) -> None:
        """Remember `value` under `key`, forgetting the oldest entry when full."""
        entries = self._entries
        entries.pop(key, None)  # re-put: now the newest
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = value

    def pop(self, key: K) -> V | None:
        """Forget `key`; its value, or None."""
        return self._entries.pop(key, None)
