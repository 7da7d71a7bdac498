"""Who is calling: caller keys, stored only as hashes, and the tenant each one names.

A caller sends `authorization: Bearer <key>`. The gateway never stores or logs the key:
it hashes it with SHA-256 and looks the digest up in the key stores (the config file's
`auth.keys`, the `auth.keys_file`, and Redis when configured), by digest, as a table
index, in the same time however many keys there are. A digest is no secret: it is what
the keys file and Redis hold, and keys carry 256 random bits, so a digest (let alone a
timing hint about one) gives no key. So a fast hash is right, and no constant-time
comparison is needed, where a walk comparing every stored entry cost each call 2 ms of
the event loop at 10,000 keys.

With a verified client certificate and `server.tls.tenant_from_cert_subject`, the
certificate's subject common name names the tenant instead; one that is not a tenant name
names none, and the call's key names the tenant, as beside a certificate without a CN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cachetools import TTLCache

from service.clock import SYSTEM_CLOCK, Clock
from service.config import (
    ANY_TENANT,
    CALLER_KEY_PREFIX,
    AuthConfig,
    CallerKey,
    TenantConfig,
    is_tenant_name,
    redis_password,
)
from service.episodes import REPEAT_AFTER_S
from service.errors import PermissionDenied, Unauthenticated, UpstreamUnavailable, quoted
from service.redis_errors import is_unanswered
from service.store_cooldown import COOLDOWN_S, StoreCooldown
from service.text_encoding import NotMarkedText, marked_text

log = logging.getLogger("llm_gateway.auth")

KEY_PREFIX = CALLER_KEY_PREFIX
DEFAULT_TENANT = "default"
_BEARER = "bearer "
_MAX_KEY_LENGTH = 512


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which `key` is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random caller key (256 bits of entropy, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key of the `authorization: Bearer <key>` header, or None if absent, not in
    that form, or sent more than once."""
    key = None
    sent = 0
    for name, value in metadata:
        if name.lower() != "authorization":
            continue
        sent += 1
        if isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            key = value[len(_BEARER) :].strip() or None
    # Two keys name the caller ambiguously: a proxy or mesh in front may read the other
    # one, and the gateway would then serve the call as a tenant it did not vouch for.
    return key if sent == 1 else None


_SEND_BEARER = "send metadata 'authorization: Bearer <key>'"


def _no_key_problem(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """Why no key was read: none sent, more than one, or one sent in a form the gateway
    does not take (never repeating any of it, which may be the key itself)."""
    sent = sum(name.lower() == "authorization" for name, _ in metadata)
    if sent > 1:
        return f"the 'authorization' metadata was sent {sent} times: {_SEND_BEARER} once"
    if sent:
        return f"the 'authorization' metadata was sent, but not as 'Bearer <key>': {_SEND_BEARER}"
    return f"missing caller key: {_SEND_BEARER}"


def keys_file_text(raw: bytes, *, source: str) -> str:
    """A keys file's bytes as text, in the encoding its byte order mark names: UTF-16 or
    UTF-32 (as Windows "Unicode" and PowerShell 5's `>` and `Out-File` save), else UTF-8,
    a UTF-8 mark (Windows editors save one) no part of line 1.

    Raises:
        ValueError: naming the file and line of a byte that is not of that encoding.
    """
    try:
        return marked_text(raw)
    except NotMarkedText as exc:
        raise ValueError(
            f"{source}:{exc.line}: not {exc.name} text: a byte that is not {exc.name}"
        ) from None


def _entry_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """Each line of a keys file that holds an entry: its number and its fields, a `#`
    comment cut off (blank and comment-only lines left out)."""
    for number, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split("#", 1)[0].split()
        if parts:
            yield number, parts


def parse_keys_file(
    text: str, *, source: str, listed: Sequence[CallerKey] = ()
) -> tuple[CallerKey, ...]:
    """Entries of a keys file: one `SHA256HEX TENANT` a line, `#` starts a comment.
    `listed`: the config's own `auth.keys`, which no line may give to another tenant.

    Raises:
        ValueError: naming the file and line of a malformed entry.
    """
    keys = []
    # Each digest's first place and tenant. The config's keys are looked up first, so a
    # line giving one to another tenant would be served silently as the config's.
    first_given = {k.sha256: (f"auth.keys[{i}]", k.tenant) for i, k in enumerate(listed)}
    for number, parts in _entry_lines(text):
        try:
            if len(parts) != 2:
                raise ValueError("expected 'SHA256HEX TENANT'")
            key = CallerKey(sha256=parts[0], tenant=parts[1])
            # One key for two tenants: which one its caller is cannot be told.
            place, tenant = first_given.setdefault(key.sha256, (f"line {number}", key.tenant))
            if tenant != key.tenant:
                raise ValueError(f"the key of {place} again, for another tenant")
            keys.append(key)
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: {exc}") from None
    return tuple(keys)


def serves_anonymous_callers(
    config: AuthConfig, *, tenant_from_cert_subject: bool, requires_client_cert: bool
) -> bool:
    """Whether callers without a valid key are served, as the tenant `DEFAULT_TENANT`:
    under `auth.mode: off`, unless client certificates that must name the tenant identify
    every caller (one that names none must not fall back to the all-seeing `default`)."""
    return config.mode == "off" and not (tenant_from_cert_subject and requires_client_cert)


def _warn_of_default_tenant_keys(entries: Iterable[str]) -> None:
    """Log each key entry (`auth.keys[2]`, `PATH:LINE`) naming `DEFAULT_TENANT` where
    callers without a valid key are served as it."""
    for entry in entries:
        log.warning("auth.default_tenant_key", extra={"entry": entry, "tenant": DEFAULT_TENANT})


def _keys_file_lines_naming(text: str, tenant: str) -> list[int]:
    """The numbers of the lines of a parsed keys file that give a key to `tenant`."""
    return [number for number, parts in _entry_lines(text) if parts[1:] == [tenant]]


def keys_file_line(caller_key: CallerKey) -> str:
    """One line of a keys file."""
    return f"{caller_key.sha256} {caller_key.tenant}\n"


def keys_file_writable_warning(path: Path) -> str | None:
    """Why the keys file at `path` is open to a key nobody issued: its group or every user
    may write it, and whoever can write it can give themselves a key for any tenant, an
    admin's included. None for a file only its owner may change, or none there."""
    mode = _permissions(path)
    return None if mode is None else _writable_warning(path, mode)


def _writable_warning(path: Path, mode: int) -> str | None:
    """`keys_file_writable_warning` of the file at `path` of permission bits `mode`."""
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    writers = "every user" if mode & stat.S_IWOTH else "its group"
    return (
        f"auth.keys_file {path} (mode {mode:04o}) is writable by {writers}: whoever can "
        f"write it can give themselves a key for any tenant; chmod 600 {path} (640 if the "
        "gateway reads it through its group)"
    )


def keys_file_readable_warning(path: Path) -> str | None:
    """Why the keys file at `path` says too much: every user may read it. It holds
    digests, not keys, but names each tenant that has keys, and how many. None for a
    file its owner (and group) alone may read, or none there."""
    mode = _permissions(path)
    if mode is None or not mode & stat.S_IROTH:
        return None
    return (
        f"auth.keys_file {path} (mode {mode:04o}) is readable by every user: it holds "
        f"SHA-256 digests, not keys, but names the tenants that have keys; chmod 600 {path}"
    )


def _permissions(path: Path) -> int | None:
    """The permission bits of the file at `path` (a link's target's), or None where there
    is no such file or none to tell (not POSIX)."""
    if os.name != "posix":
        return None
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # missing or unreadable: reading it says so, or finds no keys
        return None


class KeyStore(Protocol):
    """Maps a key's digest to its tenant."""

    async def tenant_for(self, digest: str) -> str | None:
        """The tenant of the key with SHA-256 `digest`, or None if unknown."""
        ...


class StaticKeyStore:
    """Keys from the config file and the keys file, loaded at startup."""

    def __init__(self, keys: Iterable[CallerKey]) -> None:
        # One tenant a digest: the config and `parse_keys_file` refuse a key given to two.
        self._tenants = {k.sha256: k.tenant for k in keys}

    def __len__(self) -> int:
        return len(self._tenants)

    async def tenant_for(self, digest: str) -> str | None:
        """One lookup, however many keys are held (see the module docstring)."""
        return self._tenants.get(digest)


_GONE = (-1, -1, -1)  # the signature of a keys file that is not there
_IS_POSIX = os.name == "posix"  # elsewhere a file's mode tells nothing of who may write it
# The shortest pause between the checks `FileKeyStore.watch` makes (`keys_file_check_s`
# may be 0: a check on every call).
_WATCH_MIN_S = 0.5
# The coarsest tick a filesystem keeps modification times to (FAT's; 1 s on HFS+, ext3,
# some network and container mounts). A file rewritten at the same size within the tick
# it was read in keeps its signature: it is read again until read after that tick.
_MTIME_TICK_NS = 2_000_000_000
# The longest a lookup waits for a check of the keys file still reading it (a hung
# network mount, a FIFO put in its place): past it, lookups answer from the keys held.
_CHECK_WAIT_S = 5.0


class FileKeyStore:
    """The keys file, re-read when it changes (looked at no more than every `check_s`).

    So a key made with `keys create` works on a running gateway within seconds. A file
    that turns unreadable or malformed later is logged and the last good keys kept; at
    startup it is an error.

    While serving, the file is checked in a worker thread, one check at a time, and the
    lookups meanwhile wait for it, at most `_CHECK_WAIT_S` from its start: read and
    parsed on the event loop, a file of 10,000 keys stopped every call and stream of the
    process for a tenth of a second or more at each change, and a hung network mount
    stopped them for good. A check still reading past that is logged, and lookups answer
    from the keys held until it ends. Its thread is a daemon: one stuck in a read does
    not keep the process from exiting when the server stops.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_s: float,
        listed: Sequence[CallerKey] = (),
        warns_of_default_tenant: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._path = path
        self._listed = tuple(listed)
        self._warns_of_default_tenant = warns_of_default_tenant
        self._check_s = check_s
        self._clock = clock
        self._checked_at = -math.inf
        self._signature: tuple[int, int, int] | None = None
        # The file seen empty or gone (its signature, `_GONE`), which the next check takes.
        self._unconfirmed: tuple[int, int, int] | None = None
        # Whether the file was last read within its modification time's tick.
        self._is_read_in_its_tick = False
        self._keys: tuple[CallerKey, ...] = ()
        # The permission bits the file was last seen with (POSIX's), warned of as they
        # change while serving: `serve` warns of those it starts with.
        self._mode: int | None = None
        self._store = StaticKeyStore(())
        self._checking: asyncio.Future[None] | None = None  # the check in its thread
        self._checking_since = 0.0  # when it began (`_clock`)
        self._refresh(is_strict=True)

    def _refresh(self, *, is_strict: bool = False) -> None:
        now = self._clock.now()
        if now - self._checked_at < self._check_s:
            return
        self._checked_at = now
        seen_ns = time.time_ns()  # before the stat: a write after it is after this too
        try:
            found = os.stat(self._path)
        except FileNotFoundError:
            if not self._is_held_once(_GONE):
                self._store, self._signature, self._keys = StaticKeyStore(()), None, ()
            return
        except OSError as exc:  # its directory turned unreadable, or into a file
            if is_strict:
                raise
            log.warning("auth.keys_file_unusable", extra={"error": str(exc)})
            return
        # Before the signature's check: a chmod changes none of its fields.
        mode = stat.S_IMODE(found.st_mode)
        if _IS_POSIX and mode != self._mode:
            self._mode_changed(mode, is_strict=is_strict)
        signature = (found.st_mtime_ns, found.st_size, found.st_ino)
        if signature == self._signature and not self._is_read_in_its_tick:
            # The file read last, back after it was seen gone (moved away and back): that
            # sighting is over, else the next save by rename would count as its second.
            self._unconfirmed = None
            return
        if found.st_size == 0 and self._is_held_once(signature):
            return
        try:
            text = keys_file_text(self._path.read_bytes(), source=str(self._path))
            keys = parse_keys_file(text, source=str(self._path), listed=self._listed)
        except (OSError, ValueError) as exc:
            if is_strict:
                raise
            log.warning("auth.keys_file_unusable", extra={"error": str(exc)})
            return
        is_new = signature != self._signature or keys != self._keys
        self._store, self._signature, self._keys = StaticKeyStore(keys), signature, keys
        self._unconfirmed = None
        self._is_read_in_its_tick = seen_ns - found.st_mtime_ns < _MTIME_TICK_NS
        if is_new:
            log.info("auth.keys_file_loaded", extra={"path": str(self._path), "keys": len(keys)})
            if self._warns_of_default_tenant:
                lines = _keys_file_lines_naming(text, DEFAULT_TENANT)
                _warn_of_default_tenant_keys(f"{self._path}:{number}" for number in lines)

    def _mode_changed(self, mode: int, *, is_strict: bool) -> None:
        """Take the file's new permission bits `mode`, warning (`auth.keys_file_writable`)
        when they let its group or every user write it: a file loosened while serving (a
        chmod, an editor's save by rename under a loose umask) let any of them add a key
        for any tenant, and was said only at the next start. Not at the first read
        (`is_strict`): `serve` says it then, once for all its workers."""
        self._mode = mode
        problem = None if is_strict else _writable_warning(self._path, mode)
        if problem is not None:
            log.warning("auth.keys_file_writable", extra={"problem": problem})

    def _is_held_once(self, seen: tuple[int, int, int]) -> bool:
        """Whether the keys held are kept one check more on finding the file empty or gone
        (`seen`: its signature, `_GONE`). An editor rewriting the file in place leaves it
        empty for a moment, one saving by rename leaves it gone: a check landing then
        would refuse every key until the next. The next check that still sees it so takes
        it, revoking every key."""
        if len(self._store) and seen != self._unconfirmed:
            self._unconfirmed = seen
            return True
        self._unconfirmed = None
        return False

    async def watch(self) -> None:
        """Check the file every `check_s` between calls too, till cancelled: under
        `serve --workers N` only worker 0 says the file turned unusable
        (`service.logs.SaidByWorker0`), and the kernel may give it no call for a long time.
        In the worker thread lookups check it in (`_checked`), one check at a time: on the
        event loop a large file's parse stopped every call of the process."""
        while True:
            await self._clock.sleep(max(self._check_s, _WATCH_MIN_S))
            await self._checked()

    async def tenant_for(self, digest: str) -> str | None:
        """The tenant of `digest` in the file as it is now (as last read, while a check
        has been reading it longer than `_CHECK_WAIT_S`)."""
        if self._checking is not None or self._clock.now() - self._checked_at >= self._check_s:
            await self._checked(wait_s=_CHECK_WAIT_S)
        return await self._store.tenant_for(digest)

    async def _checked(self, *, wait_s: float | None = None) -> None:
        """Once the file's check, started now in a worker thread unless one runs, ends, or
        `wait_s` after it began. A lookup cancelled meanwhile leaves it running for the
        others (`asyncio.wait`)."""
        checking = self._checking
        if checking is None:
            checking = self._checking = self._started_check()
            self._checking_since = self._clock.now()
        timeout_s = None
        if wait_s is not None:
            timeout_s = max(0.0, self._checking_since + wait_s - self._clock.now())
        await asyncio.wait((checking,), timeout=timeout_s)

    def _started_check(self) -> asyncio.Future[None]:
        """`_refresh` in a daemon thread of its own, its end told by the future returned.
        Not `asyncio.to_thread`: the loop's executor is waited for as the process exits,
        and a read that never returns kept it running after the server stopped."""
        loop = asyncio.get_running_loop()
        checking: asyncio.Future[None] = loop.create_future()
        checking.add_done_callback(self._check_ended)
        overran = loop.call_later(_CHECK_WAIT_S, self._check_overran)
        checking.add_done_callback(lambda _: overran.cancel())

        def check() -> None:
            failure: BaseException | None = None
            try:
                self._refresh()
            except BaseException as exc:  # told to the loop, which logs it
                failure = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, checking, failure)

        threading.Thread(target=check, name="keys-file check", daemon=True).start()
        return checking

    def _check_overran(self) -> None:
        log.warning(
            "auth.keys_file_unusable",
            extra={
                "error": f"{self._path}: still being read after {_CHECK_WAIT_S:g} s "
                "(a hung mount?); calls are answered from the keys read last"
            },
        )

    def _check_ended(self, checking: asyncio.Future[None]) -> None:
        if self._checking is checking:
            self._checking = None
        if not checking.cancelled() and checking.exception() is not None:
            # `_refresh` logs what the file's reading raises; anything else is a bug.
            log.error("auth.keys_file_check_failed", exc_info=checking.exception())


def _settle(future: asyncio.Future[None], failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is None:
        future.set_result(None)
    else:
        future.set_exception(failure)


def redis_connection_options(config: AuthConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url(config.redis_url, ...)`: password, timeouts."""
    return {
        "password": redis_password(config.redis_password_env, environ),
        "socket_timeout": config.redis_timeout_s,
        "socket_connect_timeout": config.redis_timeout_s,
    }


def redis_keys_hash(prefix: str) -> str:
    """The Redis hash holding caller keys (field: digest, value: tenant)."""
    return f"{prefix}keys"


def _key_store_unavailable() -> UpstreamUnavailable:
    # Retry once the store's cool-down lets a lookup through again: sooner, it is refused.
    return UpstreamUnavailable(
        "the caller key store is unavailable", upstream="auth-store", retry_after_s=COOLDOWN_S
    )


# How long a key's tenant, as Redis last gave it, answers for Redis while it does not
# answer: the callers of the last minutes go on through an outage, new ones are refused.
KNOWN_KEY_S = 300.0
_KNOWN_KEYS = 10_000


class RedisKeyStore:
    """Keys in the Redis hash `redis_keys_hash(prefix)`.

    While Redis does not answer, or `cooldown` (shared with the other users of the same
    Redis client) leaves it alone, a key Redis named in the last `known_key_s` keeps its
    tenant; any other lookup fails at once. Redis is asked on every call while it
    answers, so a key removed there is refused at once, and forgotten.

    With `warns_of_default_tenant` (`serves_anonymous_callers`), an entry naming
    `DEFAULT_TENANT` is logged as `auth.default_tenant_key` the first time its key is
    looked up, once a process: entries are written by hand at any time, and a scan of a
    hash of millions at start would cost more than the warning is worth.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str,
        cooldown: StoreCooldown | None = None,
        known_key_s: float = KNOWN_KEY_S,
        warns_of_default_tenant: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._redis = redis
        self._hash = redis_keys_hash(prefix)
        self._cooldown = cooldown if cooldown is not None else StoreCooldown("auth")
        self._known: TTLCache[str, str] = TTLCache(_KNOWN_KEYS, known_key_s, timer=clock.now)
        self._warns_of_default_tenant = warns_of_default_tenant
        # Bounded by the hash's entries naming `default`, which only its writers add.
        self._warned_digests: set[str] = set()

    async def tenant_for(self, digest: str) -> str | None:
        """Look the digest up; Redis only ever sees digests, never keys. An entry whose
        tenant is not a valid tenant name counts as no entry.

        Raises:
            UpstreamUnavailable: Redis answered with an error; or it cannot be reached,
                or is in a cool-down, and did not name this key lately (the caller may
                retry).
        """
        if self._cooldown.skips():
            return self._known_tenant(digest)
        try:
            tenant = await self._redis.hget(self._hash, digest)
        except Exception as exc:  # redis-py errors, timeouts: fail closed, retryable
            if self._cooldown.failed(exc):
                log.warning("auth.key_store_unavailable", extra={"error": type(exc).__name__})
            if not is_unanswered(exc):  # an error reply: Redis is up, and did not vouch
                raise _key_store_unavailable() from None
            return self._known_tenant(digest)
        self._cooldown.answered()
        name = None
        if tenant is not None:
            name = tenant.decode("utf-8", "replace") if isinstance(tenant, bytes) else str(tenant)
        if name is not None and not is_tenant_name(name):
            # Entries written by hand are not checked on the way in, as the keys file's
            # are: an empty or "*" tenant would read every tenant's usage with GetUsage.
            log.warning("auth.key_store_bad_tenant", extra={"key_sha256_prefix": digest[:8]})
            name = None
        if name is None:
            self._known.pop(digest, None)
        else:
            self._known[digest] = name
            if name == DEFAULT_TENANT and self._warns_of_default_tenant:
                self._warn_of_default_tenant_entry(digest)
        return name

    def _warn_of_default_tenant_entry(self, digest: str) -> None:
        """Log the entry (`HASH DIGEST`: a digest is no secret, and `HDEL` needs it) once."""
        if digest not in self._warned_digests:
            self._warned_digests.add(digest)
            _warn_of_default_tenant_keys([f"{self._hash} {digest}"])

    def _known_tenant(self, digest: str) -> str:
        """The tenant Redis last named for `digest`, if lately; else fail closed."""
        tenant = self._known.get(digest)
        if tenant is None:
            raise _key_store_unavailable()
        return tenant


def local_key_stores(config: AuthConfig, *, serves_anonymous: bool = False) -> list[KeyStore]:
    """The config's keys, and the keys file if one is named (missing: no keys yet).
    `serves_anonymous` (`serves_anonymous_callers`): each key entry, there and in every
    version of the file read, that names `DEFAULT_TENANT` is logged as a warning.

    Raises:
        ValueError: the keys file is malformed.
        OSError: the keys file exists but cannot be read.
    """
    if serves_anonymous:
        _warn_of_default_tenant_keys(
            f"auth.keys[{i}]" for i, key in enumerate(config.keys) if key.tenant == DEFAULT_TENANT
        )
    stores: list[KeyStore] = [StaticKeyStore(config.keys)] if config.keys else []
    if config.keys_file:
        path = Path(config.keys_file).expanduser()
        stores.append(
            FileKeyStore(
                path,
                check_s=config.keys_file_check_s,
                listed=config.keys,
                warns_of_default_tenant=serves_anonymous,
            )
        )
    return stores


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its tenant, what that tenant may do, and whether it proved who it is.

    `is_authenticated` is False only for the `default` tenant of auth mode `off`.
    """

    tenant: str
    limits: TenantConfig
    is_authenticated: bool = True

    @property
    def may_read_all_usage(self) -> bool:
        """Whether GetUsage may show this caller other tenants' rows."""
        return self.limits.is_admin or not self.is_authenticated


_NO_LIMITS = TenantConfig()


class RejectedCallerKeys:
    """`auth.rejected` (INFO) for unknown caller keys: the first, then at most one line
    every `interval_s`, with `suppressed`, the rejections left out since the line
    before. Anyone who can reach the port may send unknown keys, as fast as it likes:
    a line for each would let it flood the log.

    Rejections left out are told when their interval ends, even if none follows to
    carry their count: the line then names the last of them, `suppressed` the others,
    so that every line is one rejection and those it left out. A timer task waits for
    that end only while a count is pending (an idle gateway runs none); `aclose`
    cancels it and writes the line that was pending.
    """

    __slots__ = ("_clock", "_interval_s", "_last_digest", "_logged_at", "_suppressed", "_timer")

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *, interval_s: float = REPEAT_AFTER_S) -> None:
        self._clock = clock
        self._interval_s = interval_s
        self._logged_at = -math.inf
        self._suppressed = 0
        self._last_digest = ""  # of the last rejection left out
        self._timer: asyncio.Task[None] | None = None

    def rejected(self, digest: str) -> None:
        """One more unknown key, with SHA-256 `digest`: logged if a line is due, else
        counted, and told when the interval ends."""
        now = self._clock.now()
        if now - self._logged_at >= self._interval_s:
            self._log(digest, suppressed=self._suppressed)
            return
        self._suppressed += 1
        self._last_digest = digest
        if self._timer is None:
            self._timer = asyncio.create_task(self._tell_when_due())

    async def aclose(self) -> None:
        """Stop the timer, and write the line of any rejections still left out."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.get_loop() is asyncio.get_running_loop():
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        self._tell_left_out()

    def _log(self, digest: str, *, suppressed: int) -> None:
        self._logged_at, self._suppressed = self._clock.now(), 0
        log.info("auth.rejected", extra={"key_sha256_prefix": digest[:8], "suppressed": suppressed})

    def _tell_left_out(self) -> None:
        if self._suppressed:
            self._log(self._last_digest, suppressed=self._suppressed - 1)

    async def _tell_when_due(self) -> None:
        """Sleep until the interval of the rejections left out ends, then tell them; a
        line written meanwhile (a rejection after the interval) may have told them
        already, and those left out after it wait for its own interval's end."""
        try:
            while self._suppressed:
                due_in_s = self._logged_at + self._interval_s - self._clock.now()
                if due_in_s <= 0:
                    self._tell_left_out()
                else:
                    await self._clock.sleep(due_in_s)
        finally:
            if self._timer is asyncio.current_task():
                self._timer = None


class Authenticator:
    """Turns a call's metadata (and client certificate) into a `Principal`, or refuses it."""

    def __init__(
        self,
        config: AuthConfig,
        tenants: Mapping[str, TenantConfig],
        stores: Iterable[KeyStore] = (),
        *,
        tenant_from_cert_subject: bool = False,
        requires_client_cert: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._is_required = not serves_anonymous_callers(
            config,
            tenant_from_cert_subject=tenant_from_cert_subject,
            requires_client_cert=requires_client_cert,
        )
        self._tenants = tenants
        # Looked up once here, so that each call's lookup stays one dict get.
        self._unlisted = tenants.get(ANY_TENANT) or _NO_LIMITS
        self._stores = tuple(stores)
        self._tenant_from_cert = tenant_from_cert_subject
        self._rejected = RejectedCallerKeys(clock, interval_s=config.rejected_log_interval_s)

    @property
    def uses_certificates(self) -> bool:
        """Whether a client certificate's common name can name the caller's tenant."""
        return self._tenant_from_cert

    @property
    def names_every_caller_default(self) -> bool:
        """Whether every caller is the anonymous `default` tenant: no key is required,
        there is none to look up, and no certificate names a tenant."""
        return not (self._is_required or self._stores or self._tenant_from_cert)

    async def aclose(self) -> None:
        """Write the `auth.rejected` line still pending, and stop its timer."""
        await self._rejected.aclose()

    def principal(self, tenant: str, *, is_authenticated: bool = True) -> Principal:
        """The principal of `tenant`; a tenant without its own entry gets the `"*"`
        entry's limits (its own buckets and count of them, as the limiters key by
        tenant), or none without that entry."""
        limits = self._tenants.get(tenant) or self._unlisted
        return Principal(tenant, limits, is_authenticated=is_authenticated)

    async def authenticate(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        *,
        cert_common_name: str | None = None,
    ) -> Principal:
        """The caller's principal.

        Raises:
            Unauthenticated: keys are required and none was sent, or one not as
                `Bearer <key>`, or an unknown one.
        """
        if self._tenant_from_cert and cert_common_name:
            if not is_tenant_name(cert_common_name):
                return await self._by_key_beside(metadata, cert_common_name)
            return self.principal(cert_common_name)
        key = bearer_key(metadata)
        if key is None:
            if self._is_required:
                raise Unauthenticated(_no_key_problem(metadata))
            return self.principal(DEFAULT_TENANT, is_authenticated=False)
        if len(key) > _MAX_KEY_LENGTH:
            # No key is this long: unknown, without looking it up (hashed only for its
            # log line). With keys optional its caller is `default`, as any other
            # unknown key's.
            if self._is_required:
                self._rejected.rejected(hash_key(key))
                raise Unauthenticated("unknown caller key")
            return self.principal(DEFAULT_TENANT, is_authenticated=False)
        digest = hash_key(key)
        for store in self._stores:
            tenant = await store.tenant_for(digest)
            if tenant is not None:
                return self.principal(tenant)
        if self._is_required:
            self._rejected.rejected(digest)
            raise Unauthenticated("unknown caller key")
        return self.principal(DEFAULT_TENANT, is_authenticated=False)

    async def _by_key_beside(
        self, metadata: Sequence[tuple[str, str | bytes]], common_name: str
    ) -> Principal:
        """The principal the caller's key names, for a certificate whose common name names
        no tenant (a CA's "Search Team (prod)"): the key is proof enough, as beside a
        certificate without a CN. Without a known one, the refusal says why the
        certificate named no tenant either."""
        try:
            principal = await self.authenticate(metadata)
        except Unauthenticated as exc:
            problem = exc.message
        else:
            if principal.is_authenticated:
                return principal
            problem = "no known caller key was sent"  # never the all-seeing `default`
        raise Unauthenticated(
            f"the client certificate's common name {quoted(common_name)} is not a tenant "
            f"name (1-128 of A-Z a-z 0-9 _ . - @ :), and {problem}"
        )


def may_use_model(principal: Principal, model: str) -> bool:
    """Whether the caller's tenant may use `model` (a missing name is validation's to refuse)."""
    return not model or principal.limits.allows_model(model)


def check_model_allowed(principal: Principal, model: str) -> None:
    """Raise `PermissionDenied` unless the caller's tenant may use `model`."""
    if not may_use_model(principal, model):
        raise PermissionDenied(f"tenant {principal.tenant!r} may not use model {quoted(model)}")
