"""A rejected provider key in a few log lines, for as long as it stays rejected.

An upstream that answers 401/403 (or 402, or `insufficient_quota`) for the gateway's key
is set aside for `key_rejected_cool_down_s`, then probed, again and again until an
operator mends the key. One line as it was first rejected is easy to miss, and the calls
failing meanwhile log nothing of their own, so each upstream's `RejectedKeyWatch` logs
the rejections as one episode (`service.episodes`), as a collector's outage is logged:

- `upstream.key_rejected` (ERROR) as the key is rejected after it was accepted (or first);
- `upstream.key_still_rejected` (WARNING) at most once every REPEAT_AFTER_S while
  attempts (the breaker's probes) are still rejected, with `rejections` so far;
- `upstream.key_accepted` (INFO) as an answer comes back again, with `rejections` in all.

Each line names the upstream and the answer's `http_status`, never the key.
"""

from __future__ import annotations

import logging

from service.clock import Clock
from service.episodes import FailureEpisode

log = logging.getLogger("llm_gateway.pool")


class RejectedKeyWatch:
    """Whether one upstream's key is rejected, and the lines that say so as that changes."""

    __slots__ = ("_episode", "upstream")

    def __init__(self, upstream: str, clock: Clock) -> None:
        self.upstream = upstream
        self._episode = FailureEpisode(
            log,
            "upstream.key_rejected",
            "upstream.key_still_rejected",
            "upstream.key_accepted",
            count_key="rejections",
            now=clock.now,
        )

    def rejected(self, *, http_status: int | None) -> None:
        """An attempt's answer rejected the key: log the first, then a reminder a minute."""
        self._episode.failed({"upstream": self.upstream, "http_status": http_status})

    def accepted(self) -> None:
        """An attempt was answered: the key is good, logged once if it was rejected."""
        if self._episode.failures:  # else nothing to log: every answered attempt asks
            self._episode.succeeded({"upstream": self.upstream})


__all__ = ["RejectedKeyWatch"]
