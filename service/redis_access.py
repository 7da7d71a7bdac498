"""Refusing to start on a Redis that refuses the gateway's credentials.

A wrong password (or none where Redis asks for one) would otherwise pass for an outage:
budgets and tenant limits fail open, usage rows wait and are lost, the cache never
stores, and the log says only that the store is cooling down. So as the gateway starts
(and in `llm-gateway check`) each configured Redis gets one PING within its section's
timeout. A refusal of the credentials is a config error on the key that holds them, with
what Redis said, and so are one of the database the URL selects (past its `databases`)
and protected mode's refusal of the gateway's host (DENIED: no password set at all); no
answer at all (down, unreachable, hung) is an outage, which the gateway starts through as
it runs through one, and a user refused PING itself (NOPERM) was let in.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from redis import exceptions

from service.config import GatewayConfig, has_redis_credentials, redis_password
from service.redis_errors import access_refusal, is_denied

__all__ = ["check_redis_access"]

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


async def _refusal(use: _RedisUse, environ: Mapping[str, str]) -> BaseException | None:
    """Redis's refusal of one PING, or None: it answered, or gave no answer in time."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(
        use.url,
        password=redis_password(use.password_env, environ),
        socket_timeout=use.timeout_s,
        socket_connect_timeout=use.timeout_s,
    )
    try:
        async with asyncio.timeout(use.timeout_s):
            await client.ping()
    except Exception as exc:  # any failure but a refusal is an outage: started through
        if _refuses_database(exc) or is_denied(exc):
            return exc
        refusal = access_refusal(exc)
        return refusal if isinstance(refusal, _AUTHENTICATION) else None
    finally:
        await client.aclose()
    return None


async def check_redis_access(
    config: GatewayConfig, *, environ: Mapping[str, str] | None = None
) -> None:
    """Ping every Redis `config` uses, at once, each within its section's timeout.

    Raises:
        ConfigError: a Redis refused the credentials or the database, on the key
            holding them (the first section in the README's order, if several did).
    """
    uses = _redis_uses(config)
    env = os.environ if environ is None else environ
    refusals = await asyncio.gather(*(_refusal(use, env) for use in uses))
    for use, refusal in zip(uses, refusals, strict=True):
        if refusal is not None:
            raise config.error(use.refused_key(refusal), use.problem(refusal))
