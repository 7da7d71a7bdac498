"""`python -m service keys create --tenant T [--config PATH]`: issue a caller key.

The new key is printed once, on stdout, and never stored: only its SHA-256 digest is,
appended to the config's `auth.keys_file` or, with `auth.redis_url`, put in Redis.
Running gateways re-read a changed keys file within `auth.keys_file_check_s` and look
keys up in Redis on every call.
"""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal
from pathlib import Path

from service.auth import (
    DEFAULT_TENANT,
    generate_key,
    hash_key,
    keys_file_line,
    keys_file_readable_warning,
    keys_file_text,
    keys_file_writable_warning,
    parse_keys_file,
    redis_connection_options,
    redis_keys_hash,
)
from service.command_line import default_config, file_path
from service.config import (
    ANY_TENANT,
    AuthConfig,
    BudgetConfig,
    CallerKey,
    ConfigError,
    GatewayConfig,
    load_config,
)
from service.text_encoding import MARK_BYTES, following_encoding


def _append_to_keys_file(path: Path, caller_key: CallerKey, auth: AuthConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Digests are not secrets, but the file says who may call: keep it private anyway.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a+b") as file:
        file.seek(0)
        existing = file.read()
        text = _check_keys_file(existing, path, auth)
        newline = "\r\n" if "\r\n" in text else "\n"
        line = keys_file_line(caller_key).replace("\n", newline)
        # A hand edit can leave the last line without its newline: the new line must not
        # join it (a malformed file, which running gateways ignore and a restart refuses).
        if text and not text.endswith("\n"):
            line = newline + line
        # In the file's own encoding: a UTF-8 line after UTF-16 text is no line of it.
        file.write(line.encode(following_encoding(existing[:MARK_BYTES])))


def _check_keys_file(existing: bytes, path: Path, auth: AuthConfig) -> str:
    """The keys file's text, or raise `ValueError` for one running gateways would not
    take: they keep the keys they read last, so a key added to it would be refused, and a
    restart fails."""
    try:
        text = keys_file_text(existing, source=str(path))
        parse_keys_file(text, source=str(path), listed=auth.keys)
    except ValueError as exc:  # a malformed line, or bytes not of the file's encoding
        raise ValueError(
            f"{exc}; running gateways ignore {path} until it is fixed, so no key was added"
        ) from None
    return text


def _store_in_redis(auth: AuthConfig, caller_key: CallerKey) -> None:
    import redis

    options = redis_connection_options(auth, os.environ)
    client = redis.Redis.from_url(auth.redis_url or "", **options)
    try:
        client.hset(redis_keys_hash(auth.redis_key_prefix), caller_key.sha256, caller_key.tenant)
    except redis.RedisError as exc:
        raise OSError(f"cannot store the key in Redis ({_redis_failure(exc)})") from None
    finally:
        client.close()


def _redis_failure(exc: BaseException) -> str:
    """What `exc` says of a failed write to Redis: its class, and Redis's own reply where
    Redis refused it (an ACL's NOPERM names the user and the command or key, a WRONGPASS
    the credentials' fault), which holds no secret. Else the class alone: redis-py's own
    messages may hold the URL, and with it a password."""
    from redis.exceptions import ResponseError

    from service.redis_errors import access_refusal

    reply = access_refusal(exc)
    if reply is None and isinstance(exc, ResponseError):
        reply = exc
    if reply is None:
        return type(exc).__name__
    return f"{type(reply).__name__}: Redis said: {reply}"


# Refused whatever `auth.mode` says now: the mode may be set to `off` later (to roll keys
# out to new callers), and the key would then quietly join the anonymous callers.
_DEFAULT_TENANT_REFUSAL = (
    f"tenant {DEFAULT_TENANT!r} is the one callers without a valid key are served as "
    "under auth.mode: off: its key's holders would share their usage rows, limits and "
    "budget with those callers; issue the key for another tenant; no key was added"
)


def create_key(auth: AuthConfig, tenant: str) -> tuple[str, str]:
    """Make a key for `tenant`, store its digest; returns (key, where it was stored).

    Raises:
        ValueError: the tenant name is invalid or `DEFAULT_TENANT`, or the config names
            no key store.
    """
    if tenant == DEFAULT_TENANT:
        raise ValueError(_DEFAULT_TENANT_REFUSAL)
    key = generate_key()
    caller_key = CallerKey(sha256=hash_key(key), tenant=tenant)
    if auth.redis_url:
        _store_in_redis(auth, caller_key)
        return key, "redis"
    if auth.keys_file:
        path = Path(auth.keys_file).expanduser()
        _append_to_keys_file(path, caller_key, auth)
        return key, str(path)
    raise ValueError("the config names no auth.keys_file or auth.redis_url to store keys in")


def keys_command(argv: list[str], *, prog: str = "python -m service keys") -> int:
    """Run `keys create --tenant T [--config PATH]`; exit status 0, 2 on a usage error, or 1
    when the key, stored, cannot be written to standard output."""
    parser = argparse.ArgumentParser(prog=prog)
    commands = parser.add_subparsers(dest="action", required=True)
    create = commands.add_parser("create", help="issue a new caller key for a tenant")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument(
        "--config",
        type=file_path,
        default=default_config(),
        help="YAML config file naming auth.keys_file or auth.redis_url",
    )
    args = parser.parse_args(argv)
    if sys.stdout is None:  # `>&-`: the key would be stored and shown to nobody, exit 0
        print(
            "llm-gateway keys: cannot write the key: standard output is closed; no key was added",
            file=sys.stderr,
        )
        return 1
    try:
        config = load_config(args.config)
        key, where = create_key(config.auth, args.tenant)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"llm-gateway keys: {exc}", file=sys.stderr)
        return 2
    try:
        print(key, flush=True)
    except OSError as exc:  # a full disk, a reader that left: the key is stored all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else exit flushes again
        print(
            f"llm-gateway keys: cannot write the key to standard output ({exc.strerror}); "
            f"its SHA-256 {hash_key(key)} is stored for tenant {args.tenant!r} in {where}, "
            "a key nobody has: remove it there",
            file=sys.stderr,
        )
        return 1
    # The digest is what names the key later: to revoke one of a tenant's keys, the line
    # or hash field to delete, where the key itself may be long given away.
    print(
        f"stored the key's SHA-256 {hash_key(key)} for tenant {args.tenant!r} in {where} "
        "(delete it there to revoke the key); the key itself is shown only this once",
        file=sys.stderr,
    )
    if where != "redis":
        warning = _loose_permissions_warning(Path(where))
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
    if config.tenants and args.tenant not in config.tenants:
        # Allowed (tenants need an entry only for limits), but a typo would look the same.
        print(_unlisted_note(config, args.tenant, args.config), file=sys.stderr)
    return 0


def _loose_permissions_warning(path: Path) -> str | None:
    """What is wrong with the permissions of the keys file just written to, the worse
    first. A file made here is the owner's alone, but one already there keeps its own:
    they are not tightened, as a gateway running as another user may read it through its
    group, and so a chmod is the operator's to make."""
    return keys_file_writable_warning(path) or keys_file_readable_warning(path)


def _unlisted_note(config: GatewayConfig, tenant: str, path: str) -> str:
    """The note that `tenant` has no entry under `tenants:`, and what it gets instead: the
    `"*"` entry's limits or none, and its budget (`budgets:` is read apart from `tenants:`,
    so a tenant without limits may still have one)."""
    limits = (
        f'it gets the limits and models of the "{ANY_TENANT}" entry'
        if ANY_TENANT in config.tenants
        else "it has no rate limits and may use every model"
    )
    listed = ", ".join(sorted(t for t in config.tenants if t != ANY_TENANT)) or "none by name"
    return (
        f"note: tenant {tenant!r} has no entry under tenants: in {path}, so {limits}, "
        f"and {_budget_of(config, tenant)} (tenants there: {listed})"
    )


def _budget_of(config: GatewayConfig, tenant: str) -> str:
    """Which budget applies to `tenant` (as `Budgets.budget_of` picks it), in words."""
    if tenant in config.budgets:
        return f"its own budget under budgets: ({_spend(config.budgets[tenant])})"
    if ANY_TENANT in config.budgets:
        return f'the budget of the "{ANY_TENANT}" entry under budgets: ' + (
            f"({_spend(config.budgets[ANY_TENANT])}, spent by it alone)"
        )
    return "no budget"


def _spend(budget: BudgetConfig) -> str:
    """`$1,500,000 a month`, `$12.50 a day`: dollars as people write them, not `1.5e+06`.
    An amount of no whole number of cents keeps its digits: `$0.004`, never `$0`."""
    usd = budget.usd
    cents = f"{usd:,.2f}"
    if float(cents.replace(",", "")) != usd:
        cents = format(Decimal(repr(usd)), ",f")
    return f"${cents.removesuffix('.00')} a {budget.period}"
