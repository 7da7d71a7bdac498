"""`StoreCooldown`: a Redis that did not answer is left alone, and tried by one at a time."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis import exceptions
from redis._parsers.base import BaseParser
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.late_release import LateReleases
from service.store_cooldown import StoreCooldown
from tests.fake_clock import FakeClock


def test_after_a_timeout_redis_is_skipped_then_tried_by_one_caller_at_a_time() -> None:
    """Skipped for the cool-down; past it one caller tries while the others still skip,
    and Redis answering that one ends the cool-down for all."""
    clock = FakeClock()
    cooldown = StoreCooldown("test", cooldown_s=1.0, clock=clock)
    assert not cooldown.skips()
    cooldown.failed(RedisTimeoutError("Timeout reading from socket"))
    assert [cooldown.skips() for _ in range(3)] == [True, True, True]
    clock.advance(1.0)
    assert [cooldown.skips() for _ in range(3)] == [False, True, True]
    cooldown.answered()
    assert not cooldown.is_cooling_down
    assert [cooldown.skips() for _ in range(3)] == [False, False, False]


def test_an_error_reply_starts_no_cool_down_and_ends_one() -> None:
    """`READONLY` is an answer: Redis is up, so it is tried as before."""
    clock = FakeClock()
    cooldown = StoreCooldown("test", cooldown_s=1.0, clock=clock)
    cooldown.failed(ReadOnlyError("READONLY You can't write against a read only replica."))
    assert not cooldown.skips()
    cooldown.failed(ConnectionRefusedError(111, "Connection refused"))
    assert cooldown.skips()
    cooldown.failed(ReadOnlyError("READONLY You can't write against a read only replica."))
    assert not cooldown.is_cooling_down


async def test_a_cool_down_another_user_of_the_store_ends_wakes_the_writes_waiting() -> None:
    """A release queued untried during a cool-down goes as soon as the cool-down ends,
    whoever ended it (the key store and the tenant limits share one Redis): not after
    the retry worker's backoff, during which the tenant's slot would stay taken."""
    cooldown = StoreCooldown("test", cooldown_s=1.0, clock=FakeClock())
    releases = LateReleases("test", lease_ttl_s=60, first_delay_s=30, cooldown=cooldown)
    released = asyncio.Event()

    async def release() -> None:
        released.set()

    cooldown.failed(RedisTimeoutError("Timeout reading from socket"))
    await releases.release_now(release)
    assert releases.pending == 1
    cooldown.answered()  # a key lookup, say, got its answer
    async with asyncio.timeout(5):
        await released.wait()
    await releases.aclose()
    assert releases.pending == 0


def test_error_replies_are_logged_once_an_episode(caplog: pytest.LogCaptureFixture) -> None:
    """The first error reply is logged, with its error, and its user logs it too; later
    ones are counted, a reminder at most every `error_report_s`; an answer between them
    (a read, while writes are refused) ends nothing, and the first answer after none for
    `error_report_s` ends the episode."""
    clock = FakeClock()
    cooldown = StoreCooldown("test", clock=clock, error_report_s=60.0)
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    with caplog.at_level(logging.INFO, logger="llm_gateway.store"):
        assert cooldown.failed(oom)
        logged: list[bool] = []
        for _ in range(10):
            clock.advance(10.0)
            cooldown.answered()  # a read Redis answers
            logged.append(cooldown.failed(oom))
        assert not any(logged)
        clock.advance(59.0)
        cooldown.answered()
        clock.advance(1.0)
        cooldown.answered()
        cooldown.answered()
    lines = [(r.message, r.__dict__.get("error_replies")) for r in caplog.records]
    assert lines == [
        ("store.error_replies", None),
        ("store.error_replies_continuing", 7),
        ("store.error_replies_ended", 11),
    ]
    assert caplog.records[0].__dict__["error"] == "OutOfMemoryError"
    assert "maxmemory" in caplog.records[0].__dict__["reply"]
    assert not cooldown.skips()


def test_timeouts_are_still_logged_by_their_users() -> None:
    """A failure Redis did not answer is its user's to log, as before, during an
    episode of error replies too."""
    cooldown = StoreCooldown("test", cooldown_s=1.0, clock=FakeClock())
    assert cooldown.failed(ReadOnlyError("READONLY You can't write against a read only replica."))
    assert cooldown.failed(RedisTimeoutError("Timeout reading from socket"))
    assert cooldown.failed(RedisTimeoutError("Timeout reading from socket"))
    assert not cooldown.failed(ReadOnlyError("READONLY"))


def test_a_refused_password_is_one_error_until_redis_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """WRONGPASS (a password rotated under the gateway) cools the store down as an outage
    does, but says `store.auth_refused` at ERROR, once however many operations fail
    after it, and again only once Redis has answered in between."""
    clock = FakeClock()
    cooldown = StoreCooldown("ledger", cooldown_s=1.0, clock=clock)
    wrongpass = BaseParser.parse_error("WRONGPASS invalid username-password pair")
    with caplog.at_level(logging.INFO, logger="llm_gateway.store"):
        for _ in range(5):
            assert not cooldown.skips()
            cooldown.failed(wrongpass)
            assert cooldown.skips()
            clock.advance(1.0)
        cooldown.answered()
        cooldown.failed(wrongpass)
    lines = [(r.message, r.levelno) for r in caplog.records]
    assert lines == [
        ("store.auth_refused", logging.ERROR),
        ("store.cooldown_ended", logging.INFO),
        ("store.auth_refused", logging.ERROR),
    ]
    assert caplog.records[0].__dict__["store"] == "ledger"


def test_a_refused_password_on_a_unix_socket_is_an_error_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py raises a refusal on a unix socket (`unix://`) as a plain ConnectionError
    from the refusal: `store.auth_refused` all the same, naming the refusal, not a
    `store.cooldown_started` warning as for an outage."""
    cooldown = StoreCooldown("auth", clock=FakeClock())
    wrongpass = BaseParser.parse_error("WRONGPASS invalid username-password pair")
    try:
        raise exceptions.ConnectionError(wrongpass) from wrongpass
    except exceptions.ConnectionError as wrapped:
        with caplog.at_level(logging.INFO, logger="llm_gateway.store"):
            cooldown.failed(wrapped)
    assert [(r.message, r.levelno) for r in caplog.records] == [
        ("store.auth_refused", logging.ERROR)
    ]
    assert caplog.records[0].__dict__["error"] == "AuthenticationError"


def test_protected_mode_refusing_the_connection_is_one_error_and_a_cool_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DENIED (Redis in protected mode, a connection from another host) cools the store
    down and says `store.auth_refused` at ERROR once, as NOAUTH does: not an error reply
    to try again at every call."""
    cooldown = StoreCooldown("ledger", clock=FakeClock())
    denied = BaseParser.parse_error("DENIED Redis is running in protected mode because ...")
    with caplog.at_level(logging.INFO, logger="llm_gateway.store"):
        cooldown.failed(denied)
        cooldown.failed(denied)
    assert cooldown.skips()
    assert [(r.message, r.levelno) for r in caplog.records] == [
        ("store.auth_refused", logging.ERROR)
    ]


def test_a_noperm_reply_starts_its_episode_with_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """NOPERM (an ACL too narrow) is an error reply, logged by episode, its first line
    `store.auth_refused` at ERROR rather than `store.error_replies`."""
    cooldown = StoreCooldown("auth", clock=FakeClock())
    noperm = BaseParser.parse_error("NOPERM this user has no permissions to run the 'evalsha'")
    with caplog.at_level(logging.INFO, logger="llm_gateway.store"):
        assert cooldown.failed(noperm)
        assert not cooldown.failed(noperm)
    assert [(r.message, r.levelno) for r in caplog.records] == [
        ("store.auth_refused", logging.ERROR)
    ]
    assert not cooldown.is_cooling_down
