"""Which Redis errors may pass and which will not.

A write that failed for a reason that may pass (Redis unreachable, a timeout, a replica
mid-failover, memory or disk full) is retried until it lands (`LateReleases`). One that
Redis refused for what it is (a key of the wrong type, a script error, no permission)
would fail the same way for as long as it is retried, and hold back the writes queued
behind it: it is given up at once, and said so in the log.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

# "Not now" replies redis-py maps to classes of their own (LOADING is a ConnectionError).
_NOT_NOW_ERRORS = (ReadOnlyError, OutOfMemoryError, TryAgainError, ClusterDownError, NoScriptError)
# "Not now" replies it does not map, which keep their code in the message: a script
# running too long, a failing disk, too few replicas.
_NOT_NOW_CODES = ("BUSY ", "MISCONF ", "NOREPLICAS ")


# How redis-py words a failed command of a pipeline or transaction, before Redis's reply.
_PIPELINE_ERROR = " of pipeline caused error: "


def refused_for_good(exc: BaseException) -> bool:
    """Whether Redis answered `exc` to this very command, so sending it again cannot
    succeed; connection errors, timeouts, "not now" replies and a refusal of the
    connection itself (protected mode's) may pass."""
    if not isinstance(exc, ResponseError) or isinstance(exc, _NOT_NOW_ERRORS):
        return False
    return not _reply(exc).startswith((*_NOT_NOW_CODES, _PROTECTED_MODE))


def _reply(exc: ResponseError) -> str:
    """Redis's reply in `exc`, a pipeline's command's included."""
    reply = str(exc)
    if reply.startswith("Command # ") and _PIPELINE_ERROR in reply:
        # "Command # 1 (ZREM k m) of pipeline caused error: ('NOREPLICAS ...',)"
        reply = reply.partition(_PIPELINE_ERROR)[2].lstrip("('\"")
    return reply


# What Redis in protected mode (no password for its default user) says to a connection
# from another host as it accepts it, then closes it: no command will ever run there, as
# under NOAUTH, until an operator sets a password (or turns protected mode off).
_PROTECTED_MODE = "DENIED "


def is_denied(exc: BaseException) -> bool:
    """Whether `exc` is protected mode's refusal of the connection (a ResponseError)."""
    return isinstance(exc, ResponseError) and _reply(exc).startswith(_PROTECTED_MODE)


# Redis refusing the gateway's credentials (WRONGPASS; NOAUTH: none sent where it asks for
# one; AUTH with a user to a Redis before 6, which knows none: the wrong-number-of-args
# error) or its user the command or key (NOPERM); AuthorizationError is redis-py's own
# refusal of a TLS server whose OCSP status it may not read. redis-py maps the first ones
# to ConnectionErrors, NOPERM to a ResponseError. (Protected mode's DENIED, a
# ResponseError of no class of its own, is `is_denied`.)
_ACCESS_REFUSED = (
    exceptions.AuthenticationError,
    exceptions.AuthenticationWrongNumberOfArgsError,
    exceptions.AuthorizationError,
    exceptions.NoPermissionError,
)


def access_refusal(exc: BaseException) -> BaseException | None:
    """Redis's refusal of the gateway's credentials or its user's rights in `exc`, or None:
    `exc` itself, or the error it was raised from. redis-py's unix-socket connections
    authenticate inside their connect, whose failures it raises as a plain ConnectionError
    from the refusal: missed, a wrong password on `unix://` passed for an outage."""
    cause: BaseException | None = exc
    for _ in range(_MOST_CAUSES):
        if cause is None or isinstance(cause, _ACCESS_REFUSED) or is_denied(cause):
            return cause
        cause = cause.__cause__
    return None


# How deep `access_refusal` looks: redis-py wraps a refusal once.
_MOST_CAUSES = 3


def refuses_access(exc: BaseException) -> bool:
    """Whether Redis refused the gateway's credentials or its user's rights: an operator's
    mistake (a wrong or missing password, an ACL too narrow), not an outage."""
    return access_refusal(exc) is not None


# LOADING (`BusyLoadingError`) is a ConnectionError too: a Redis that cannot serve yet.
_UNANSWERED = (exceptions.ConnectionError, exceptions.TimeoutError, TimeoutError, OSError)


def is_unanswered(exc: BaseException) -> bool:
    """Whether Redis gave no answer: the operation timed out, or could not connect (or
    was refused the connection: NOAUTH, protected mode's DENIED). Any other error is an
    answer, so Redis is up."""
    return isinstance(exc, _UNANSWERED) or is_denied(exc)


def replacing_closed_connections() -> dict[str, Any]:
    """Options for `Redis.from_url` under which a pooled connection that Redis closed (its
    idle `timeout`, a proxy's, a restart) is replaced as it is taken, not handed out to
    fail its command and start a cool-down. A redis-py with maintenance notifications
    (Redis Enterprise's, RESP3 only) skips that check while they are on, as by default."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # an older redis-py: it always checks
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
