"""`refused_for_good`: which Redis errors a write may outlive, and which it will not.

The errors are built by redis-py's own reply parser from the server's error replies,
as a real connection would raise them.
"""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, TimeoutError

from service.redis_errors import is_unanswered, refused_for_good, refuses_access


@pytest.mark.parametrize(
    "reply",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value script: abc",
        "ERR user_script:3: Script attempted to access nonexistent global variable 'x'",
        "ERR value is not an integer or out of range",
        "NOPERM User gateway has no permissions to run the 'evalsha' command",
        "CROSSSLOT Keys in request don't hash to the same slot",
    ],
)
def test_a_reply_refusing_the_command_itself_is_for_good(reply: str) -> None:
    assert refused_for_good(BaseParser.parse_error(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "READONLY You can't write against a read only replica.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
        "MISCONF Redis is configured to save RDB snapshots, but it's unable to persist to disk.",
        "NOREPLICAS Not enough good replicas to write.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "NOSCRIPT No matching script. Please use EVAL.",
    ],
)
def test_a_reply_saying_not_now_may_pass(reply: str) -> None:
    assert not refused_for_good(BaseParser.parse_error(reply))


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Connection refused"), TimeoutError("Timeout reading"), OSError(104, "reset")],
)
def test_connection_errors_and_timeouts_may_pass(error: Exception) -> None:
    assert not refused_for_good(error)


@pytest.mark.parametrize(
    ("reply", "refuses"),
    [
        ("WRONGPASS invalid username-password pair or user is disabled.", True),
        ("NOAUTH Authentication required.", True),
        ("NOPERM this user has no permissions to run the 'evalsha' command", True),
        ("ERR wrong number of arguments for 'auth' command", True),  # a Redis before 6
        ("READONLY You can't write against a read only replica.", False),
        ("OOM command not allowed when used memory > 'maxmemory'.", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_a_refusal_of_the_credentials_or_rights_is_told_apart(reply: str, refuses: bool) -> None:
    """WRONGPASS, NOAUTH and NOPERM are an operator's to mend; other replies are not."""
    assert refuses_access(BaseParser.parse_error(reply)) is refuses


# As Redis in protected mode (no password for its default user) answers a connection
# from another host, then closes it.
DENIED = (
    "DENIED Redis is running in protected mode because protected mode is enabled and no "
    "password is set for the default user. In this mode connections are only accepted from "
    "the loopback interface."
)


@pytest.mark.parametrize(
    "reply",
    [DENIED, f"Command # 1 (EVALSHA abc 0) of pipeline caused error: ('{DENIED}',)"],
    ids=["reply", "pipeline"],
)
def test_protected_mode_refusing_the_connection_is_a_refusal_that_may_pass(reply: str) -> None:
    """DENIED: no command will run until an operator sets a password, as under NOAUTH.
    Before, it was an error reply Redis would give again: each usage row written was
    given up at once (`ledger.record_lost`), logged `store.error_replies`."""
    denied = BaseParser.parse_error(reply)
    assert refuses_access(denied)
    assert is_unanswered(denied)
    assert not refused_for_good(denied)


def test_no_answer_is_no_refusal() -> None:
    """A Redis down or hung refuses nothing: it is an outage."""
    assert not refuses_access(ConnectionError("Connection refused"))
    assert not refuses_access(TimeoutError("Timeout reading"))
