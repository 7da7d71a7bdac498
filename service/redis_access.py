"""Refusing to start on a Redis that refuses the gateway's credentials.

A wrong password (or none where Redis asks for one) would otherwise pass for an outage:
budgets and tenant limits fail open, usage rows wait and are lost, the cache never
stores, and the log says only that the store is cooling down. So as the gateway starts
(and in `llm-gateway check`) each configured Redis gets one PING within its section's
timeout. A refusal of the credentials is a config error on the key that holds them, with
what Redis said, and so are one of the database the URL selects (past its `databases`)
and protected mode's refusal of the gateway's host (DENIED: no password set at all); no
answer at all (down, unreachable, hung) is an outage, which the gateway starts through as
it runs through one, saying so once (`redis.no_answer_at_start`; `check`, a warning line),
and a user refused PING itself (NOPERM) was let in. Each PING waits at most
`MOST_PROBE_S`: a hung Redis must not hold the start for a long configured timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from redis import exceptions

from service.config import GatewayConfig, has_redis_credentials, redis_password
from service.redis_errors import access_refusal, is_denied, is_unanswered

__all__ = [
    "MOST_PROBE_S",
    "RedisNoAnswer",
    "check_redis_access",
    "redis_address",
    "warn_of_no_answer",
]

log = logging.getLogger("llm_gateway.redis")

# The longest the start's PING of a Redis waits, whatever its section's timeout: a Redis
# that accepts connections and hangs must not hold the start (a probe's, a rollout's).
MOST_PROBE_S = 1.0
# What stands for a password in a Redis error's text that happened to repeat it.
_REDACTED = "[redacted]"

# Refusals of the credentials themselves. Not NOPERM: a user refused PING was let in, and
# the gateway never sends PING otherwise (a least-privilege ACL may well leave it out);
# one refused a command the gateway does send says so at its first call.
# (AuthenticationWrongNumberOfArgsError: AUTH with a user name to a Redis before 6.)
_AUTHENTICATION = (exceptions.AuthenticationError, exceptions.AuthenticationWrongNumberOfArgsError)


# Redis's reply to a SELECT (as redis-py connects) of a database past its `databases`.
_DATABASE_OUT_OF_RANGE = "DB index is out of range"


def _refuses_database(exc: BaseException) -> bool:
    """Whether Redis refused the database the URL selects: every command would fail the
    same way, as for a wrong password (usage rows lost, budgets and limits open)."""
    return isinstance(exc, exceptions.ResponseError) and _DATABASE_OUT_OF_RANGE in str(exc)


@dataclass(frozen=True, slots=True)
class _RedisUse:
    """One section's Redis, as its clients connect to it."""

    section: str  # cache, auth or ledger
    url: str = field(repr=False)  # the ledger's may carry a password
    password_env: str | None
    timeout_s: float

    @property
    def probe_timeout_s(self) -> float:
        """How long the start's PING waits for this Redis."""
        return min(self.timeout_s, MOST_PROBE_S)

    def refused_key(self, refusal: BaseException) -> str:
        """The key that holds what Redis refused: the URL for its database, or when it
        carries credentials (redis-py prefers them to the variable's), else the password
        variable's key."""
        if _refuses_database(refusal) or is_denied(refusal) or has_redis_credentials(self.url):
            return f"{self.section}.redis_url"
        return f"{self.section}.redis_password_env"

    def problem(self, refusal: BaseException) -> str:
        """What the config error says: never the password, only Redis's reply."""
        said = f"Redis said: {refusal}"
        if _refuses_database(refusal):
            return (
                f"Redis refused the database the URL selects ({said}); name one it has, "
                "0 to 15 unless its `databases` setting says otherwise"
            )
        if is_denied(refusal):
            return (
                f"Redis refuses connections from other hosts in protected mode (Redis said: "
                f"{_first_sentence(str(refusal))}); give its default user a password (and "
                "name the variable holding it in redis_password_env), or turn protected-mode off"
            )
        if has_redis_credentials(self.url):
            return f"Redis refused the user or password in the URL ({said})"
        if self.password_env:
            return (
                f"Redis refused the password in {self.password_env} ({said}); set it to "
                "the password Redis expects"
            )
        return (
            f"Redis asks for a password and none is configured ({said}); name the "
            "environment variable holding it here"
        )


def _first_sentence(reply: str) -> str:
    """The first sentence of Redis's reply: protected mode's goes on for a paragraph."""
    return reply.partition(". ")[0].rstrip(".") + "."


def _redis_uses(config: GatewayConfig) -> list[_RedisUse]:
    """Each section's Redis, in the README's order: cache, auth, ledger."""
    cache, auth, ledger = config.cache, config.auth, config.ledger
    sections = [
        ("cache", cache.redis_url if cache.uses_redis else None, cache.redis_password_env),
        ("auth", auth.redis_url, auth.redis_password_env),
        ("ledger", ledger.redis_url, ledger.redis_password_env),
    ]
    # Each within the timeout its clients have for one operation.
    timeouts_s = (cache.operation_timeout_s, auth.redis_timeout_s, ledger.operation_timeout_s)
    return [
        _RedisUse(section, url, password_env, timeout_s)
        for (section, url, password_env), timeout_s in zip(sections, timeouts_s, strict=True)
        if url
    ]


@dataclass(frozen=True, slots=True)
class _Ping:
    """What one PING found: Redis's refusal of the credentials or the database, or the
    failure of a Redis that gave no answer (`unanswered`, said in words); neither when it
    answered (a user refused PING itself included)."""

    refusal: BaseException | None = None
    unanswered: str = ""


@dataclass(frozen=True, slots=True)
class RedisNoAnswer:
    """A Redis that gave the start's PING no answer: where it is (`redis_address`: no
    user, password or options), the keys naming it, and what failed."""

    address: str
    keys: tuple[str, ...]
    error: str

    def warning(self) -> str:
        """What `llm-gateway check` says of it, after `warning: `."""
        return (
            f"{', '.join(self.keys)}: Redis at {self.address} does not answer ({self.error}); "
            "serve starts anyway and runs through it as through an outage (budgets and "
            "tenant limits fail open, the cache is skipped) until it answers"
        )


def redis_address(url: str) -> str:
    """`url` as a log line or warning may show it: its scheme, host, port and path (the
    database, a unix socket's file), without a user, a password or query options (which
    may hold one: `?password=`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _passwords(use: _RedisUse, environ: Mapping[str, str]) -> list[str]:
    """Every password `use` connects with: its variable's, its URL's (as written, and
    decoded as redis-py sends it), its query's."""
    parts = urlsplit(use.url)
    query = parse_qs(parts.query)
    found = [redis_password(use.password_env, environ), parts.password]
    found += [unquote(parts.password)] if parts.password else []
    found += [
        value for name, values in query.items() if name.lower() == "password" for value in values
    ]
    return [password for password in found if password]


def _unanswered(exc: BaseException, use: _RedisUse, environ: Mapping[str, str]) -> str:
    """What failed a PING that got no answer, in words, without any password."""
    # The PING's deadline or redis-py's socket timeout, whichever fired first: one wording.
    if isinstance(exc, TimeoutError | exceptions.TimeoutError):
        return f"no answer within {use.probe_timeout_s:g} s"
    said = str(exc) or type(exc).__name__
    for password in _passwords(use, environ):
        said = said.replace(password, _REDACTED)
    return said


async def _ping(use: _RedisUse, environ: Mapping[str, str]) -> _Ping:
    """One PING of `use`'s Redis, within `probe_timeout_s`."""
    import redis.asyncio

    timeout_s = use.probe_timeout_s
    client = redis.asyncio.Redis.from_url(
        use.url,
        password=redis_password(use.password_env, environ),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except Exception as exc:
        if _refuses_database(exc) or is_denied(exc):
            return _Ping(refusal=exc)
        refusal = access_refusal(exc)
        if isinstance(refusal, _AUTHENTICATION):
            return _Ping(refusal=refusal)
        if is_unanswered(exc):  # an outage: started through, and said
            return _Ping(unanswered=_unanswered(exc, use, environ))
        return _Ping()  # an answer all the same (NOPERM): Redis is up
    finally:
        await client.aclose()
    return _Ping()


def _no_answers(uses: Iterable[tuple[_RedisUse, _Ping]]) -> list[RedisNoAnswer]:
    """The Redis servers that gave no answer, each once with every key naming it (one
    Redis for all three sections is one outage, not three)."""
    found: dict[str, tuple[list[str], str]] = {}
    for use, ping in uses:
        if ping.unanswered:
            keys, _ = found.setdefault(redis_address(use.url), ([], ping.unanswered))
            keys.append(f"{use.section}.redis_url")
    return [RedisNoAnswer(address, tuple(keys), error) for address, (keys, error) in found.items()]


async def check_redis_access(
    config: GatewayConfig, *, environ: Mapping[str, str] | None = None
) -> list[RedisNoAnswer]:
    """Ping every Redis `config` uses, at once, each within its section's timeout (at most
    `MOST_PROBE_S`).

    Returns:
        The Redis servers that gave no answer: an outage, which the gateway starts through.

    Raises:
        ConfigError: a Redis refused the credentials or the database, on the key
            holding them (the first section in the README's order, if several did).
    """
    uses = _redis_uses(config)
    env = os.environ if environ is None else environ
    pings = await asyncio.gather(*(_ping(use, env) for use in uses))
    for use, ping in zip(uses, pings, strict=True):
        if ping.refusal is not None:
            raise config.error(use.refused_key(ping.refusal), use.problem(ping.refusal))
    return _no_answers(zip(uses, pings, strict=True))


def warn_of_no_answer(no_answers: Iterable[RedisNoAnswer]) -> None:
    """Log `redis.no_answer_at_start` for each Redis that gave the start's PING no answer:
    else nothing would say it before the first call's store cooled down. Said once per
    gateway: by the `--workers` supervisor (`SAID_BY_THE_SUPERVISOR`), not each worker."""
    for no_answer in no_answers:
        log.warning(
            "redis.no_answer_at_start",
            extra={
                "redis": no_answer.address,
                "keys": ", ".join(no_answer.keys),
                "error": no_answer.error,
            },
        )
