"""A rejected provider key in a few log lines, for as long as it stays rejected.

An upstream that answers 401/403 (or 402, or `insufficient_quota`) for the gateway's key
is set aside for `key_rejected_cool_down_s`, then probed, again and again until an
operator mends the key. One line as it was first rejected is easy to miss, and the calls
failing meanwhile log nothing of their own, so each upstream's `RejectedKeyWatch` logs,
as `service.telemetry.outages` does for a collector:

- `upstream.key_rejected` (ERROR) as the key is rejected after it was accepted (or first);
- `upstream.key_still_rejected` (WARNING) at most once every _REPEAT_AFTER_S while
  attempts (the breaker's probes) are still rejected, with `rejections` so far;
- `upstream.key_accepted` (INFO) as an answer comes back again, with `rejections` in all.

Each line names the upstream and the answer's `http_status`, never the key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.clock import Clock

log = logging.getLogger("llm_gateway.pool")

# While the key stays rejected, a reminder at most this often (seconds).
_REPEAT_AFTER_S = 60.0


@dataclass(slots=True)
class RejectedKeyWatch:
    """Whether one upstream's key is rejected, and the lines that say so as that changes."""

    upstream: str
    clock: Clock
    # Attempts rejected since the key was last accepted.
    _rejections: int = 0
    _logged_at: float = 0.0

    def rejected(self, *, http_status: int | None) -> None:
        """An attempt's answer rejected the key: log the first, then a reminder a minute."""
        self._rejections += 1
        now = self.clock.now()
        extra: dict[str, object] = {"upstream": self.upstream, "http_status": http_status}
        if self._rejections == 1:
            self._logged_at = now
            log.error("upstream.key_rejected", extra=extra)
        elif now - self._logged_at >= _REPEAT_AFTER_S:
            self._logged_at = now
            log.warning(
                "upstream.key_still_rejected", extra={**extra, "rejections": self._rejections}
            )

    def accepted(self) -> None:
        """An attempt was answered: the key is good, logged once if it was rejected."""
        if not self._rejections:  # the usual case, on every answer
            return
        rejections, self._rejections = self._rejections, 0
        log.info(
            "upstream.key_accepted", extra={"upstream": self.upstream, "rejections": rejections}
        )


__all__ = ["RejectedKeyWatch"]
