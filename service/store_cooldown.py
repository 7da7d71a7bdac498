"""Leaving a Redis that does not answer alone for a while, so it does not slow every call.

A hung Redis (a partition dropping packets, a stuck primary, a long fork) answers
nothing, so each operation on it waits out its whole timeout before failing, and a call
makes several: its key lookup, tenant slot and budget reservation, then its usage row and
the releases. After an operation times out or cannot connect, the store is left alone
for `COOLDOWN_S`: its users do at once what they do when it fails (admit, fail open or
closed), and writes that are retried anyway go straight to their `LateReleases` queue.
Past the cool-down one operation is let through to try Redis, while the others go on
skipping it until that one is answered or `COOLDOWN_S` has passed again; the first
operation Redis answers, a retried write's included, ends the cool-down. An error reply
(`READONLY`, a script error) is an answer: Redis is up, and is tried as before.

A Redis refusing the gateway's credentials (WRONGPASS, NOAUTH: a password rotated under
it) fails every connection it opens, so it is left alone as one that does not answer, but
logged `store.auth_refused` (ERROR) in place of `store.cooldown_started`: an operator must
mend it, and it will not pass. A NOPERM reply (an ACL too narrow) is an error reply whose
episode starts with `store.auth_refused` in place of `store.error_replies`.

Error replies start no cool-down, but a Redis refusing every write (out of memory under
`noeviction`, `READONLY` on a replica, `NOPERM`) would have each call log each failed
operation. They are logged by episode instead, one for each store:

- `store.error_replies` (WARNING) at the first, with its error, which its user logs too;
  later ones its users do not log (`failed` says so);
- `store.error_replies_continuing` (WARNING) at most once every `ERROR_REPORT_S` while
  they go on, with the latest error and how many came so far;
- `store.error_replies_ended` (INFO) at the first operation Redis answers after none for
  `ERROR_REPORT_S`, with how many came. Not at the first answer: reads go on while
  writes are refused, and each call would start the episode again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import ResponseError

from service.clock import SYSTEM_CLOCK, Clock
from service.redis_errors import access_refusal, is_unanswered, refuses_access

log = logging.getLogger("llm_gateway.store")

# As the response cache's default `error_cooldown_s`: a second of skipped Redis after it
# is back (budgets and tenant limits open, Redis keys refused) at most.
COOLDOWN_S = 1.0
# While error replies go on, a line at most this often; none for this long ends them.
ERROR_REPORT_S = 60.0
# Of an error reply, logged: a pipeline's names its command and arguments.
_MAX_REPLY_CHARS = 200


@dataclass(slots=True)
class _ErrorReplies:
    """An episode of error replies from one store."""

    replies: int  # so far
    first_s: float
    last_s: float  # the latest reply
    reported_s: float  # the latest line about them


class StoreCooldown:
    """Whether to try one Redis now (`store` names it in the logs)."""

    def __init__(
        self,
        store: str,
        *,
        cooldown_s: float = COOLDOWN_S,
        clock: Clock = SYSTEM_CLOCK,
        error_report_s: float | None = None,
    ):
        """`error_report_s`: as `ERROR_REPORT_S` (read now) when None."""
        self._store = store
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._error_report_s = ERROR_REPORT_S if error_report_s is None else error_report_s
        self._until: float | None = None  # None: Redis answers
        self.skipped = 0  # operations not tried, this cool-down
        self._on_end: list[Callable[[], None]] = []
        self._errors: _ErrorReplies | None = None  # None: no error replies lately

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a cool-down ends: what waits for Redis can go now."""
        self._on_end.append(callback)

    @property
    def is_cooling_down(self) -> bool:
        """Whether Redis last failed to answer."""
        return self._until is not None

    def skips(self) -> bool:
        """Whether to leave Redis alone now. Past the cool-down the caller is let through
        to try it, and the cool-down runs again for the others meanwhile."""
        if self._until is None:
            return False
        now = self._clock.now()
        if now >= self._until:
            self._until = now + self._cooldown_s
            return False
        self.skipped += 1
        return True

    def failed(self, exc: BaseException) -> bool:
        """An operation failed with `exc`: a cool-down starts (or runs again) if Redis
        did not answer; an error reply shows it is up, and counts in its episode.

        Returns whether the operation's user logs the failure: not for an error reply
        after the first of its episode, which the store's own lines count.
        """
        if not is_unanswered(exc):
            if isinstance(exc, ResponseError):
                self._end_cooldown()
                return self._error_reply(exc)
            return True
        if self._until is None:
            self.skipped = 0
            refusal = access_refusal(exc)
            if refusal is not None:
                log.error("store.auth_refused", extra=self._describe(refusal))
            else:
                log.warning(
                    "store.cooldown_started",
                    extra={
                        "store": self._store,
                        "error": type(exc).__name__,
                        "cooldown_s": self._cooldown_s,
                    },
                )
        self._until = self._clock.now() + self._cooldown_s
        return True

    def answered(self) -> None:
        """Redis answered an operation: the cool-down, if any, is over, and so are error
        replies if none came for `error_report_s`."""
        self._end_cooldown()
        errors = self._errors
        if errors is not None and self._clock.now() - errors.last_s >= self._error_report_s:
            self._errors = None
            log.info(
                "store.error_replies_ended",
                extra={
                    "store": self._store,
                    "error_replies": errors.replies,
                    "lasted_s": round(errors.last_s - errors.first_s, 3),
                },
            )

    def _end_cooldown(self) -> None:
        if self._until is not None:
            self._until = None
            log.info("store.cooldown_ended", extra={"store": self._store, "skipped": self.skipped})
            for callback in self._on_end:
                callback()

    def _describe(self, exc: BaseException) -> dict[str, str]:
        """A failure's log fields: Redis's reply, which never holds the password."""
        return {
            "store": self._store,
            "error": type(exc).__name__,
            "reply": str(exc)[:_MAX_REPLY_CHARS],
        }

    def _error_reply(self, exc: ResponseError) -> bool:
        """Count an error reply, logging its episode's start and reminders; whether it
        is the first."""
        now = self._clock.now()
        extra = self._describe(exc)
        errors = self._errors
        if errors is None:
            self._errors = _ErrorReplies(replies=1, first_s=now, last_s=now, reported_s=now)
            if refuses_access(exc):  # NOPERM: an ACL to mend, not a Redis to wait for
                log.error("store.auth_refused", extra=extra)
            else:
                log.warning("store.error_replies", extra=extra)
            return True
        errors.replies += 1
        errors.last_s = now
        if now - errors.reported_s >= self._error_report_s:
            errors.reported_s = now
            log.warning(
                "store.error_replies_continuing", extra={**extra, "error_replies": errors.replies}
            )
        return False
