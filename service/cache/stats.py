"""Counters of what the cache did, for a telemetry hook to read; no exporter here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CacheStats"]


@dataclass(slots=True)
class CacheStats:
    """Monotonic counters since start (one process).

    hits: answers served from the store. misses: reads that found nothing (or an
    unreadable entry) and called upstream. coalesced: reads that found nothing and joined
    an identical in-flight call instead of calling upstream. A read that found nothing
    counts once, when its caller's call ends, as its last try; a call cancelled while the
    store reads, as a miss (no answer came from the cache). errors: store operations
    that failed or timed out (the request went on without the cache). unavailable:
    operations skipped while the store cooled down after an error. stores: entries
    written. skipped: answers not stored (finish reason, size). bytes_read /
    bytes_written: encoded entry bytes moved.
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    errors: int = 0
    unavailable: int = 0
    stores: int = 0
    skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)
