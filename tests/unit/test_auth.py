"""Caller keys: hashing, parsing, stores, the authenticator and the listen policy."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import sys
from typing import Any

import pytest

from service.auth import (
    Authenticator,
    FileKeyStore,
    RejectedCallerKeys,
    StaticKeyStore,
    bearer_key,
    check_model_allowed,
    generate_key,
    hash_key,
    parse_keys_file,
    redis_connection_options,
)
from service.caller_gate import CallerGate, _common_names_in
from service.config import AuthConfig, CallerKey, ConfigError, TenantConfig
from service.errors import PermissionDenied, Unauthenticated
from service.security import (
    InsecureListen,
    build_caller_gate,
    check_caller_security,
    open_auth_redis,
)
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import gateway_config
from tests.fake_clock import SteppedClock

KEY = "llmgw_unit-test-key"


def test_hash_is_sha256_hex():
    """Keys are stored as the SHA-256 hex digest of their UTF-8 bytes."""
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_generated_keys_are_random_and_prefixed():
    """Each generated key is new, prefixed and long enough to be unguessable."""
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(k.startswith("llmgw_") and len(k) >= 40 for k in keys)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("authorization", "bearer  abc ")], "abc"),
        ([("Authorization", "BEARER abc")], "abc"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([("x-other", "Bearer abc")], None),
        ([("authorization-bin", b"Bearer abc")], None),
        ([], None),
        ([("authorization", "Bearer abc"), ("authorization", "Bearer def")], None),
        ([("authorization", "Token abc"), ("authorization", "Bearer def")], None),
        ([("authorization", "Bearer "), ("authorization", "Bearer def")], None),
    ],
)
def test_bearer_key_parsing(metadata, expected):
    """Only one `authorization: Bearer <key>` (any case) yields a key: sent twice, which
    one names the caller is ambiguous."""
    assert bearer_key(metadata) == expected


def test_keys_file_lines_and_comments():
    """A keys file holds `HASH TENANT` lines; blank lines and comments are skipped."""
    digest = hash_key(KEY)
    keys = parse_keys_file(f"# issued keys\n\n{digest} team-a  # ci\n", source="k")
    assert keys == (CallerKey(digest, "team-a"),)


@pytest.mark.parametrize(
    "line", ["abc team-a", f"{hash_key(KEY)}", f"{hash_key(KEY)} a b", f"{hash_key(KEY)} bad/name"]
)
def test_malformed_keys_file_names_the_line(line):
    """A malformed entry is an error naming the file and line, never silently skipped."""
    with pytest.raises(ValueError, match=r"^keys:2: "):
        parse_keys_file(f"# header\n{line}\n", source="keys")


def test_a_key_given_for_two_tenants_is_a_malformed_keys_file():
    """The same key on two lines for two tenants names both lines: which tenant its
    caller is cannot be told (the last line won, silently). Twice for one tenant is fine."""
    digest = hash_key(KEY)
    with pytest.raises(ValueError, match=r"^keys:3: the key of line 1 again, for another tenant"):
        parse_keys_file(f"{digest} team-a\n\n{digest} team-b\n", source="keys")
    twice = parse_keys_file(f"{digest} team-a\n{digest} team-a\n", source="keys")
    assert {key.tenant for key in twice} == {"team-a"}


def test_config_refuses_a_plain_key_in_place_of_a_hash():
    """`auth.keys` takes digests only: a raw key there is a config error."""
    with pytest.raises(ValueError, match="sha256"):
        CallerKey(sha256=KEY, tenant="team-a")


async def test_static_store_finds_the_tenant_of_a_digest():
    """The store maps the digest of a stored key to its tenant, and others to None."""
    store = StaticKeyStore([CallerKey(hash_key(KEY), "team-a"), CallerKey(hash_key("x"), "b")])
    assert await store.tenant_for(hash_key(KEY)) == "team-a"
    assert await store.tenant_for(hash_key(KEY + "!")) is None


def _calls_to_look_up(store: StaticKeyStore, digest: str) -> int:
    """The Python calls (functions and builtins) one `tenant_for` makes."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    lookup = store.tenant_for(digest)
    sys.setprofile(count)
    try:
        with contextlib.suppress(StopIteration):
            lookup.send(None)
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("wanted", ["stored", "unknown"])
def test_a_key_lookup_takes_the_same_work_however_many_keys_are_held(wanted):
    """Every call of an authenticated caller looks its key up: a walk over every entry
    took 2 ms of the event loop a call at 10,000 keys (a keys file `keys create` grew)."""
    few = [CallerKey(hash_key(KEY), "team-a")]
    many = few + [CallerKey(hash_key(f"{KEY}-{n}"), "team-b") for n in range(10_000)]
    digest = hash_key(KEY if wanted == "stored" else "llmgw_nobody-has-this")
    assert _calls_to_look_up(StaticKeyStore(many), digest) == _calls_to_look_up(
        StaticKeyStore(few), digest
    )


async def test_authenticator_modes():
    """`keys` requires a known key; `off` serves the default tenant yet honours keys."""
    keys = [CallerKey(hash_key(KEY), "team-a")]
    tenants = {"team-a": TenantConfig(requests_per_minute=5)}
    required = Authenticator(AuthConfig(mode="keys"), tenants, [StaticKeyStore(keys)])
    optional = Authenticator(AuthConfig(mode="off"), tenants, [StaticKeyStore(keys)])
    principal = await required.authenticate([("authorization", f"Bearer {KEY}")])
    assert principal.tenant == "team-a"
    assert principal.limits.requests_per_minute == 5
    with pytest.raises(Unauthenticated):
        await required.authenticate([])
    with pytest.raises(Unauthenticated):
        await required.authenticate([("authorization", "Bearer nope")])
    assert (await optional.authenticate([])).tenant == "default"
    assert (await optional.authenticate([("authorization", f"Bearer {KEY}")])).tenant == "team-a"


async def test_unknown_keys_are_logged_once_a_minute_with_those_left_out(caplog):
    """The first unknown key logs `auth.rejected`; those within the next minute log
    nothing, and the first after it logs again with how many were left out."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    clock = SteppedClock()
    authenticator = Authenticator(AuthConfig(mode="keys"), {}, [StaticKeyStore([])], clock=clock)
    for seconds in (0.0, 1.0, 58.0, 1.0, 30.0, 31.0):  # at 0, 1, 59, 60, 90, 121 s
        clock.advance(seconds)
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate([("authorization", f"Bearer wrong-{clock.t}")])
    await authenticator.aclose()
    assert _rejection_lines(caplog) == [
        (hash_key("wrong-1000.0")[:8], 0),
        (hash_key("wrong-1060.0")[:8], 2),
        (hash_key("wrong-1121.0")[:8], 1),
    ]


def _rejection_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [
        (r.key_sha256_prefix, r.suppressed)
        for r in caplog.records
        if r.getMessage() == "auth.rejected"
    ]


async def test_unknown_keys_left_out_are_told_at_their_minutes_end(caplog):
    """Keys left out are told as their minute ends without a rejection to carry them,
    the last of them named; a line written before that end (a rejection after the
    minute) tells them, and keys left out after it wait for its own minute's end, as
    those still left out at `aclose` are told then."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    clock = SteppedClock()
    rejected = RejectedCallerKeys(clock, interval_s=60.0)

    async def at(seconds: float, *keys: str) -> list[tuple[str, int]]:
        clock.advance(seconds)
        for key in keys:
            rejected.rejected(hash_key(key))
        for _ in range(3):  # the timer's turns: woken, then writing
            await asyncio.sleep(0)
        return _rejection_lines(caplog)

    def line(key: str, suppressed: int) -> tuple[str, int]:
        return (hash_key(key)[:8], suppressed)

    assert await at(0.0, "a", "b", "c") == [line("a", 0)]  # b, c left out until 1060 s
    assert await at(59.0) == [line("a", 0)]
    assert (await at(1.0))[1:] == [line("c", 1)]  # no rejection came to carry them
    await at(30.0, "d")  # left out until 1120 s
    # 1121 s: e's line carries d before the timer wakes; f is left out until 1181 s.
    assert (await at(31.0, "e", "f"))[2:] == [line("e", 1)]
    assert (await at(59.0))[3:] == []
    assert (await at(1.0))[3:] == [line("f", 0)]
    await at(0.0, "g")
    await rejected.aclose()
    assert _rejection_lines(caplog)[4:] == [line("g", 0)]


async def test_certificate_subject_names_the_tenant_only_when_enabled():
    """A verified certificate's common name is the tenant only with tenant_from_cert_subject."""
    config = AuthConfig(mode="keys")
    by_cert = Authenticator(config, {}, [], tenant_from_cert_subject=True)
    ignoring = Authenticator(config, {}, [], tenant_from_cert_subject=False)
    assert (await by_cert.authenticate([], cert_common_name="team-c")).tenant == "team-c"
    with pytest.raises(Unauthenticated):
        await ignoring.authenticate([], cert_common_name="team-c")
    with pytest.raises(Unauthenticated):
        await by_cert.authenticate([], cert_common_name="Team C; DROP")
    # A common name that names no tenant never makes its caller the all-seeing `default`.
    keys_optional = Authenticator(AuthConfig(mode="off"), {}, [], tenant_from_cert_subject=True)
    with pytest.raises(Unauthenticated, match="not a tenant name"):
        await keys_optional.authenticate([], cert_common_name="Team C; DROP")


async def test_allowed_models():
    """An empty allow-list allows every model; otherwise only those listed."""
    everything = Authenticator(AuthConfig(), {}, []).principal("t")
    limited = Authenticator(AuthConfig(), {"t": TenantConfig(allowed_models=("a",))}, [])
    check_model_allowed(everything, "anything")
    check_model_allowed(limited.principal("t"), "a")
    with pytest.raises(PermissionDenied):
        check_model_allowed(limited.principal("t"), "b")


# Server settings under which client certificates name the tenants.
_MTLS_TENANTS = {
    "tls": {
        "cert_file": "c",
        "key_file": "k",
        "client_ca_file": "ca",
        "require_client_cert": True,
        "tenant_from_cert_subject": True,
    }
}


@pytest.mark.parametrize(
    ("sections", "is_refused"),
    [
        ({"server": {"listen": "127.0.0.1:1"}}, False),
        ({"server": {"listen": "localhost:1"}}, False),
        ({"server": {"listen": "0.0.0.0:1"}}, True),
        ({"server": {"listen": "0.0.0.0:1"}, "auth": {"mode": "keys", "keys_file": "k"}}, False),
        (
            {"server": {"listen": "0.0.0.0:1"}, "auth": {"allow_auth_off_on_public_listen": True}},
            False,
        ),
        ({"server": {"listen": "0.0.0.0:1", "allow_insecure_public_listen": True}}, False),
        ({"server": {"listen": "0.0.0.0:1", **_MTLS_TENANTS}}, False),
    ],
    ids=["loopback", "localhost", "public", "keys", "forced", "forced-legacy", "mtls-tenants"],
)
def test_listen_policy(sections, is_refused):
    """Auth off on a public address is refused unless forced or certificates identify callers."""
    config = gateway_config("http://127.0.0.1:9", **sections)
    if is_refused:
        with pytest.raises(InsecureListen):
            check_caller_security(config)
    else:
        check_caller_security(config)


@pytest.mark.parametrize(
    ("sections", "is_refused"),
    [
        ({"auth": {"mode": "keys"}}, True),
        ({"auth": {"mode": "keys", "keys_file": "keys"}}, False),
        ({"auth": {"mode": "keys", "redis_url": "redis://127.0.0.1:6379/0"}}, False),
        ({"auth": {"mode": "keys", "keys": [{"sha256": "ab" * 32, "tenant": "t"}]}}, False),
        ({"auth": {"mode": "keys"}, "server": _MTLS_TENANTS}, False),
        ({"auth": {"mode": "off"}}, False),
    ],
    ids=["nowhere", "keys-file", "redis", "listed", "mtls-tenants", "off"],
)
def test_keys_mode_with_no_key_anywhere_is_a_config_error(sections, is_refused):
    """`auth.mode: keys` with no key listed, no keys file, no Redis and no certificate
    tenants would refuse every call: refused at start, naming `auth.mode` and where keys
    go. Before, the gateway started and answered every call UNAUTHENTICATED."""
    config = gateway_config("http://127.0.0.1:9", **sections)
    if is_refused:
        with pytest.raises(ConfigError, match=r"auth\.mode: keys, but no key can be found") as e:
            check_caller_security(config)
        assert "server.tls.tenant_from_cert_subject: true" in str(e.value)  # the fourth way
    else:
        check_caller_security(config)


@pytest.mark.parametrize(("raw", "mode"), [(False, "off"), ("off", "off"), ("keys", "keys")])
def test_auth_mode_accepts_yaml_off(raw, mode):
    """`mode: off` in YAML (parsed as false) means auth off; `keys` means keys."""
    assert gateway_config("http://127.0.0.1:9", auth={"mode": raw}).auth.mode == mode


async def test_only_admins_and_unauthenticated_local_callers_read_all_usage():
    """An admin tenant or auth-off caller may read every tenant's usage; others only theirs."""
    keys = [CallerKey(hash_key(KEY), "team-a"), CallerKey(hash_key("ops-key"), "ops")]
    tenants = {"ops": TenantConfig(is_admin=True)}
    keyed = Authenticator(AuthConfig(mode="keys"), tenants, [StaticKeyStore(keys)])
    local = Authenticator(AuthConfig(mode="off"), tenants, [StaticKeyStore(keys)])
    team = await keyed.authenticate([("authorization", f"Bearer {KEY}")])
    ops = await keyed.authenticate([("authorization", "Bearer ops-key")])
    assert not team.may_read_all_usage
    assert ops.may_read_all_usage
    assert (await local.authenticate([])).may_read_all_usage
    assert not (await local.authenticate([("authorization", f"Bearer {KEY}")])).may_read_all_usage


async def test_a_tenant_without_its_own_entry_gets_the_any_tenant_entry():
    """An unlisted tenant (a key's, or auth off's `default`) gets the `"*"` entry; a
    listed one its own, however empty."""
    keys = [CallerKey(hash_key(KEY), "team-a"), CallerKey(hash_key("b-key"), "team-b")]
    unlisted = TenantConfig(allowed_models=("m",), requests_per_minute=5)
    tenants = {"*": unlisted, "team-b": TenantConfig()}
    keyed = Authenticator(AuthConfig(mode="off"), tenants, [StaticKeyStore(keys)])
    assert (await keyed.authenticate([("authorization", f"Bearer {KEY}")])).limits is unlisted
    assert (await keyed.authenticate([])).limits is unlisted
    listed = await keyed.authenticate([("authorization", "Bearer b-key")])
    assert listed.limits == TenantConfig()


class _Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        """The fake monotonic time."""
        return self.t

    async def sleep(self, seconds: float) -> None:
        """Advance the fake time."""
        self.t += seconds


async def test_keys_file_changes_are_picked_up_after_the_check_interval(tmp_path):
    """A key appended to the file works after `check_s`; a later broken file keeps old keys;
    a removed one revokes them at the second check that finds it gone."""
    path = tmp_path / "keys"
    path.write_text(f"{hash_key('one')} team-a\n")
    clock = _Clock()
    store = FileKeyStore(path, check_s=2.0, clock=clock)
    assert await store.tenant_for(hash_key("one")) == "team-a"
    with path.open("a") as file:
        file.write(f"{hash_key('two')} team-b\n")
    clock.t += 1.0
    assert await store.tenant_for(hash_key("two")) is None  # not looked at yet
    clock.t += 1.5
    assert await store.tenant_for(hash_key("two")) == "team-b"
    path.write_text("this is not a keys file at all\n")
    clock.t += 5
    assert await store.tenant_for(hash_key("one")) == "team-a"
    path.unlink()
    clock.t += 5
    # Gone at one check may be a save by rename: the next check that finds it gone takes it.
    assert await store.tenant_for(hash_key("one")) == "team-a"
    clock.t += 5
    assert await store.tenant_for(hash_key("one")) is None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
async def test_a_keys_file_loosened_while_serving_is_warned_of_once_a_change(tmp_path, caplog):
    """A keys file made writable by its group or every user while serving (`serve` warns
    of it only as it starts) is warned of at the next check that sees its new mode, once:
    not again at the checks after, and again at a later change that leaves it so.

    Before, a file loosened after the start was never said: any user could add a key."""
    path = tmp_path / "keys"
    path.write_text(f"{hash_key('one')} team-a\n")
    path.chmod(0o600)
    clock = _Clock()
    caplog.set_level(logging.WARNING, logger="llm_gateway.auth")
    store = FileKeyStore(path, check_s=2.0, clock=clock)

    async def warned_after_a_check() -> list[str]:
        clock.t += 5
        assert await store.tenant_for(hash_key("one")) == "team-a"
        said = [r.problem for r in caplog.records if r.message == "auth.keys_file_writable"]
        caplog.clear()
        return said

    path.chmod(0o644)  # readable by all, writable by its owner alone: no key to add
    assert await warned_after_a_check() == []
    path.chmod(0o666)
    assert [p.split(" is ")[1] for p in await warned_after_a_check()] == [
        "writable by every user: whoever can write it can give themselves a key for any "
        f"tenant; chmod 600 {path} (640 if the gateway reads it through its group)"
    ]
    assert await warned_after_a_check() == []
    path.chmod(0o620)
    [said] = await warned_after_a_check()
    assert f"{path} (mode 0620) is writable by its group" in said
    path.chmod(0o600)
    assert await warned_after_a_check() == []


def test_a_malformed_keys_file_is_a_startup_error(tmp_path):
    """At startup a malformed keys file raises instead of silently admitting nobody."""
    path = tmp_path / "keys"
    path.write_text("nonsense\n")
    with pytest.raises(ValueError, match="keys:1"):
        FileKeyStore(path, check_s=2.0)


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"# caf\xe9\n", "keys:1: not UTF-8 text"),
        (codecs.BOM_UTF16_LE + "# one\n".encode("utf-16-le") + b"\x00", "keys:2: not UTF-16"),
    ],
)
def test_a_keys_file_not_in_its_encoding_is_a_startup_error_naming_the_line(tmp_path, raw, said):
    """A byte that is not of the file's encoding (a comment saved as Latin-1, a UTF-16 file
    cut mid-character) names the file and line, as a malformed entry does."""
    path = tmp_path / "keys"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=said):
        FileKeyStore(path, check_s=2.0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:secret@127.0.0.1:6379/0",
        "redis://:secret@127.0.0.1/0",
        "http://x",
        # redis-py reads these query parameters too, and prefers them to `password=`.
        "redis://127.0.0.1:6379/0?password=secret",
        "redis://127.0.0.1:6379/0?username=gateway&password=secret",
        "unix:///run/redis.sock?password=secret",
    ],
)
def test_redis_url_must_not_carry_credentials(url):
    """Passwords come from `redis_password_env`, never the URL (which may be logged)."""
    with pytest.raises(ValueError, match="redis_url"):
        AuthConfig(redis_url=url)


def test_redis_password_comes_from_the_named_environment_variable():
    """The Redis password is read from `redis_password_env`; timeouts bound every call."""
    config = AuthConfig(
        redis_url="redis://127.0.0.1:6379/0", redis_password_env="GW_REDIS_PW", redis_timeout_s=0.2
    )
    options = redis_connection_options(config, {"GW_REDIS_PW": "pw"})
    assert options == {"password": "pw", "socket_timeout": 0.2, "socket_connect_timeout": 0.2}
    assert redis_connection_options(config, {})["password"] is None


@pytest.mark.parametrize(
    ("auth", "tenants", "stores", "from_cert", "checks_nothing"),
    [
        (AuthConfig(), {}, [], False, True),
        (AuthConfig(), {"team-a": TenantConfig(requests_per_minute=5)}, [], False, True),
        (AuthConfig(mode="keys"), {}, [], False, False),
        (AuthConfig(), {}, [StaticKeyStore([CallerKey(hash_key(KEY), "t")])], False, False),
        (AuthConfig(), {}, [], True, False),
        (AuthConfig(), {"default": TenantConfig(requests_per_minute=5)}, [], False, False),
        (AuthConfig(), {"default": TenantConfig(allowed_models=("m",))}, [], False, False),
    ],
    ids=[
        "auth-off",
        "limits-only-for-others",
        "keys-required",
        "keys-to-look-up",
        "tenant-from-certificate",
        "default-tenant-limited",
        "default-tenant-restricted",
    ],
)
def test_the_gate_is_skipped_only_when_it_would_admit_everyone_unlimited(
    auth, tenants, stores, from_cert, checks_nothing
):
    """Skipping the gate must change nothing: every caller default, nothing to check."""
    authenticator = Authenticator(auth, tenants, stores, tenant_from_cert_subject=from_cert)
    gate = CallerGate(authenticator, MemoryTenantLimiter())
    assert gate.checks_nothing is checks_nothing


@pytest.mark.parametrize(
    ("sections", "checks_nothing"),
    [
        ({}, True),
        ({"auth": {"mode": "keys"}}, False),
        ({"auth": {"keys": [{"sha256": hash_key(KEY), "tenant": "team-a"}]}}, False),
    ],
    ids=["default-config", "keys-required", "keys-configured"],
)
async def test_the_gate_built_for_a_config_is_skipped_only_without_auth(sections, checks_nothing):
    """The default config builds a gate that checks nothing (so the boundary skips it)."""
    async with contextlib.AsyncExitStack() as stack:
        config = gateway_config("http://127.0.0.1:1/v1", **sections)
        gate = await build_caller_gate(config, stack, open_auth_redis(config, stack))
        assert gate.checks_nothing is checks_nothing


@pytest.mark.parametrize(
    ("server", "warns"),
    [
        ({"listen": "0.0.0.0:1"}, True),
        ({"listen": "127.0.0.1:1"}, False),
        ({"listen": "0.0.0.0:1", "tls": {"cert_file": "c", "key_file": "k"}}, False),
    ],
    ids=["public-clear", "loopback", "public-tls"],
)
def test_keys_in_clear_text_on_a_public_address_are_warned_about(
    server: dict[str, Any], warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys over a public port without TLS start (a proxy may terminate TLS) but warn."""
    auth = {"mode": "keys", "keys_file": "k"}
    config = gateway_config("http://127.0.0.1:9", server=server, auth=auth)
    with caplog.at_level("WARNING", logger="llm_gateway"):
        check_caller_security(config)
    assert ("security.keys_without_tls" in caplog.messages) is warns


@pytest.mark.parametrize(
    ("subject", "count"),
    [
        ("CN=team-a", 1),
        ("CN=ops,CN=team-a", 2),
        ("CN=team-a+CN=ops,O=x", 2),
        ("cn=team-a,O=x", 1),
        ("CN=team-a\\,CN=ops", 1),  # an escaped comma is in the value
        ("CN=team-a\\\\,CN=ops", 2),  # an escaped backslash, then a separator
        ("2.5.4.3=team-a,CN=ops", 2),  # the CN's OID, as RFC 2253 writes an unknown type
        ("O=x", 0),
        ("", 0),
    ],
)
def test_common_names_in_a_subject_are_counted_as_rfc_2253_writes_them(
    subject: str, count: int
) -> None:
    """grpc's `x509_subject` is RFC 2253 text: `,` and `+` separate attributes unless
    escaped."""
    assert _common_names_in(subject) == count
