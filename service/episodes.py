"""Something failing again and again, logged as an episode rather than once a failure.

`FailureEpisode` logs, for one thing that fails (a collector's exports, an upstream's
key), its first failure after a success (ERROR), a reminder at most every REPEAT_AFTER_S
while it keeps failing (WARNING, with the failures so far), and the success that ends it
(INFO, with the failures in all). Its callers say what failed, and when it worked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

# While failures go on, a reminder at most this often (seconds).
REPEAT_AFTER_S = 60.0


@dataclass(slots=True)
class FailureEpisode:
    """The log lines of one thing's failures: `failed_event`, `still_failing_event` and
    `ended_event` on `logger`, the count of failures under `count_key`."""

    logger: logging.Logger
    failed_event: str
    still_failing_event: str
    ended_event: str
    count_key: str
    now: Callable[[], float]
    # Failures since the last success.
    failures: int = 0
    _logged_at: float = 0.0

    def failed(self, extra: dict[str, object]) -> None:
        """One more failure: logged if it is the first, or a reminder is due."""
        self.failures += 1
        now = self.now()
        if self.failures == 1:
            self._logged_at = now
            self.logger.error(self.failed_event, extra=extra)
        elif now - self._logged_at >= REPEAT_AFTER_S:
            self._logged_at = now
            self.logger.warning(
                self.still_failing_event, extra={**extra, self.count_key: self.failures}
            )

    def succeeded(self, extra: dict[str, object]) -> None:
        """A success: the episode's end logged, if there was one."""
        if not self.failures:  # the usual case, on every success
            return
        failures, self.failures = self.failures, 0
        self.logger.info(self.ended_event, extra={**extra, self.count_key: failures})


__all__ = ["REPEAT_AFTER_S", "FailureEpisode"]
