"""`keys create`, keys files, and keys and tenant limits shared through Redis."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from google.rpc import error_details_pb2

import service.auth
from gateway_client.cli import main as cli_main
from llmgateway.v1 import gateway_pb2 as pb
from service.auth import hash_key
from service.config import ConfigError, TenantConfig
from service.errors import RETRY_PUSHBACK_TRAILER, QuotaExceeded
from service.keys_cli import keys_command
from service.lean_redis import LeanRedis
from service.store_cooldown import COOLDOWN_S, StoreCooldown
from service.tenant_limits import RedisTenantLimiter
from tests.conftest import FAKE_MODEL, chat, gateway_config
from tests.fake_upstream import Reply
from tests.integration.tenancy_helpers import (
    as_tenant,
    bearer,
    detail,
    rpc_error,
    secure_config,
    trailer,
)
from tests.integration.test_cache import eventually
from tests.redis_server import RedisServer
from tests.scripted_upstream import ScriptedUpstream
from tests.secret_capture import CALLER_KEY_A, CALLER_KEY_B, register_secret

_REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a Unix socket (no TCP port at all)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed: `make redis-server` installs it"
    directory = tmp_path_factory.mktemp("redis")
    socket_path = directory / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(unix_socket_path=str(socket_path))
        started = time.monotonic()
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() - started < 20, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _write_config(path: Path, auth: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"auth": auth, "local_model": {"enabled": "never"}}))
    return path


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    """The key goes to stdout once; the keys file holds its digest and tenant, not the key."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"mode": "keys", "keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "team-a", "--config", str(config)]) == 0
    assert keys_command(["create", "--tenant", "team-b", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    key_a, key_b = (register_secret(k) for k in printed.out.split())
    assert key_a != key_b
    assert key_a not in printed.err
    assert key_b not in printed.err
    stored = keys_file.read_text()
    assert stored == f"{hash_key(key_a)} team-a\n{hash_key(key_b)} team-b\n"
    assert keys_file.stat().st_mode & 0o077 == 0


def test_keys_create_names_the_digest_that_revokes_the_key(tmp_path, capsys):
    """stderr names the stored SHA-256: the line (or Redis field) to delete to revoke
    this key later, one of several of its tenant's, once the key is given away. Before,
    it said only that a digest was stored."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"mode": "keys", "keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "team-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    key = register_secret(printed.out.strip())
    assert f"SHA-256 {hash_key(key)} for tenant 'team-a' in {keys_file}" in printed.err
    assert key not in printed.err


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (0o644, "(mode 0644) is readable by every user"),
        (0o664, "(mode 0664) is writable by its group"),
        (0o666, "(mode 0666) is writable by every user"),
        (0o640, None),
    ],
    ids=["world-readable", "group-writable", "world-writable", "group-readable"],
)
def test_keys_create_warns_of_an_existing_keys_file_open_to_others(tmp_path, capsys, mode, said):
    """A keys file already there that every user may read, or its group or every user
    may write, gets its key all the same, with one warning line naming its mode and
    `chmod 600`; its mode is left as it is (a gateway may read it through its group).
    Before, a 0644 file stayed world-readable without a word."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("")
    keys_file.chmod(mode)
    config = _write_config(tmp_path / "gw.yaml", {"mode": "keys", "keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "team-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    register_secret(printed.out.strip())
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    if said is None:
        assert warnings == []
    else:
        assert warnings == [warnings[0]]
        assert f"auth.keys_file {keys_file} {said}" in warnings[0]
        assert f"chmod 600 {keys_file}" in warnings[0]
    assert keys_file.stat().st_mode & 0o777 == mode


def test_keys_create_makes_a_new_keys_file_without_a_warning(tmp_path, capsys):
    """A keys file `keys create` makes is its owner's alone, so nothing is warned of."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"mode": "keys", "keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "team-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    register_secret(printed.out.strip())
    assert "warning" not in printed.err
    assert keys_file.stat().st_mode & 0o077 == 0


def test_llm_gateway_keys_create_issues_a_key_as_python_m_service_does(tmp_path, capsys):
    """`llm-gateway keys create` (the console script every other command is under) issues
    a key whose digest lands in the keys file, and names itself in its usage errors.
    Before, `keys` was no `llm-gateway` command: exit 2, "invalid choice"."""
    keys_file = tmp_path / "keys.txt"
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"mode": "keys", "keys_file": str(keys_file)},
                "local_model": {"enabled": "never"},
            }
        )
    )
    assert cli_main(["keys", "create", "--tenant", "team-a", "--config", str(config)]) == 0
    key = register_secret(capsys.readouterr().out.strip())
    assert keys_file.read_text().split() == [hash_key(key), "team-a"]
    with pytest.raises(SystemExit) as exited:
        cli_main(["keys", "create"])
    assert exited.value.code == 2
    assert "usage: llm-gateway keys create" in capsys.readouterr().err


def test_keys_help_names_the_create_action(capsys):
    """`llm-gateway keys --help` (as `llm-gateway --help` says to ask each command) names
    `create` and its options. Before, it listed only a bare `keys_args`."""
    with pytest.raises(SystemExit) as exited:
        cli_main(["keys", "--help"])
    assert exited.value.code == 0
    assert "create --tenant T [--config PATH]" in capsys.readouterr().out


def test_keys_create_for_a_tenant_the_config_does_not_list_says_so(tmp_path, capsys):
    """A key for a tenant missing from `tenants:` (a typo, say) is issued with a note that
    it has no rate limits and no budget; a listed tenant gets no note."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"mode": "keys", "keys_file": str(tmp_path / "keys.txt")},
                "tenants": {"team-a": {"requests_per_minute": 60}},
                "local_model": {"enabled": "never"},
            }
        )
    )
    assert keys_command(["create", "--tenant", "team-a", "--config", str(config)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert keys_command(["create", "--tenant", "taem-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    register_secret(printed.out.strip())
    assert "note: tenant 'taem-a' has no entry under tenants:" in printed.err
    assert "it has no rate limits and may use every model, and no budget" in printed.err
    assert "team-a" in printed.err.split("tenants there:")[1]


@pytest.mark.parametrize(
    ("budgets", "said"),
    [
        ({"taem-a": {"usd": 250}}, "its own budget under budgets: ($250 a month)"),
        ({"taem-a": {"usd": 1500000}}, "its own budget under budgets: ($1,500,000 a month)"),
        ({"taem-a": {"usd": 1234.5}}, "its own budget under budgets: ($1,234.50 a month)"),
        # No whole number of cents: its digits, not rounded to $0 (no spending) or $3.
        ({"taem-a": {"usd": 0.004}}, "its own budget under budgets: ($0.004 a month)"),
        ({"taem-a": {"usd": 2.999}}, "its own budget under budgets: ($2.999 a month)"),
        (
            {"team-a": {"usd": 5}, "*": {"usd": 20, "period": "day"}},
            'the budget of the "*" entry under budgets: ($20 a day, spent by it alone)',
        ),
    ],
)
def test_keys_create_for_an_unlisted_tenant_with_a_budget_names_it(tmp_path, capsys, budgets, said):
    """A tenant missing from `tenants:` but given a budget (its own or the `"*"` one) is
    told which, with no rate limits beside it. Before, `budgets:` was not read and the
    note said the tenant had no limits, where its spending was limited."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"mode": "keys", "keys_file": str(tmp_path / "keys.txt")},
                "tenants": {"team-a": {"requests_per_minute": 60}},
                "budgets": budgets,
                "local_model": {"enabled": "never"},
            }
        )
    )
    assert keys_command(["create", "--tenant", "taem-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    register_secret(printed.out.strip())
    assert f"it has no rate limits and may use every model, and {said}" in printed.err
    assert "no limits" not in printed.err


def test_keys_create_for_an_unlisted_tenant_names_the_any_tenant_entry(tmp_path, capsys):
    """With a `"*"` entry, a key for a tenant missing from `tenants:` is issued with a note
    that it gets "*"'s limits, not that it has none (and "*" is no tenant to list)."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"mode": "keys", "keys_file": str(tmp_path / "keys.txt")},
                "tenants": {"team-a": {}, "*": {"requests_per_minute": 60}},
                "local_model": {"enabled": "never"},
            }
        )
    )
    assert keys_command(["create", "--tenant", "taem-a", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    register_secret(printed.out.strip())
    assert "note: tenant 'taem-a' has no entry under tenants:" in printed.err
    assert 'gets the limits and models of the "*" entry' in printed.err
    assert "no limits" not in printed.err
    assert printed.err.split("tenants there:")[1].strip() == "team-a)"


def test_keys_create_refuses_bad_tenants_and_configs_without_a_store(tmp_path, capsys):
    """Invalid tenant names and configs naming no key store exit 2 and print no key."""
    no_store = _write_config(tmp_path / "a.yaml", {"mode": "keys"})
    with_file = _write_config(tmp_path / "b.yaml", {"keys_file": str(tmp_path / "k")})
    assert keys_command(["create", "--tenant", "team-a", "--config", str(no_store)]) == 2
    assert keys_command(["create", "--tenant", "bad name", "--config", str(with_file)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "keys_file" in printed.err
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("mode", ["off", "keys"])
def test_keys_create_refuses_the_default_tenant_saying_why(mode, tmp_path, capsys):
    """`default` is the tenant of callers without a valid key under `auth.mode: off`: a
    key for it would have its holders share their usage rows, limits and budget with
    them. Refused (exit 2, nothing stored) under either mode, as the mode may be `off`
    later. Before, the key was issued."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"mode": mode, "keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "default", "--config", str(config)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "tenant 'default' is the one callers without a valid key are served as" in printed.err
    assert "issue the key for another tenant; no key was added" in printed.err
    assert not keys_file.exists()


def test_python_m_service_keys_create(tmp_path):
    """`python -m service keys create` is wired into the server's command line."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    done = subprocess.run(
        [sys.executable, "-m", "service", "keys", "create", "--tenant", "ops", "--config",
         str(config)],
        cwd=_REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = register_secret(done.stdout.strip())
    assert keys_file.read_text() == f"{hash_key(key)} ops\n"


async def test_key_entries_naming_the_default_tenant_are_warned_of_where_keys_are_optional(
    upstream, start_gateway, tmp_path, caplog
):
    """With keys optional (`auth.mode: off`), an entry of `auth.keys` or of the keys file
    (as it is at start, and each version read later) giving a key to tenant `default` is
    a WARNING naming the entry, never the key; with `mode: keys` no caller is `default`
    unless its key says so, and nothing is said. Before, the key's holders silently
    shared the anonymous callers' usage rows, limits and budget."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n{hash_key(CALLER_KEY_B)} default\n")
    listed = [
        {"sha256": hash_key("llmgw_some-other-key"), "tenant": "team-c"},
        {"sha256": hash_key("llmgw_yet-another-key"), "tenant": "default"},
    ]
    auth = {"keys": listed, "keys_file": str(keys_file), "keys_file_check_s": 0}

    def warned() -> list[str]:
        return [r.entry for r in caplog.records if r.getMessage() == "auth.default_tenant_key"]

    caplog.set_level(logging.INFO, logger="llm_gateway")
    await start_gateway(gateway_config(upstream.base_url, auth={"mode": "keys", **auth}))
    assert warned() == []
    gw = await start_gateway(gateway_config(upstream.base_url, auth={"mode": "off", **auth}))
    assert warned() == ["auth.keys[1]", f"{keys_file}:2"]
    with keys_file.open("a") as file:
        file.write(f"{hash_key('llmgw_a-third-key')} default  # added later\n")
    # A key's lookup reads the changed file.
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    assert warned()[2:] == [f"{keys_file}:2", f"{keys_file}:3"]


@pytest.mark.redis
async def test_a_redis_key_naming_the_default_tenant_is_warned_of_as_it_is_first_used(
    upstream, start_gateway, redis_url, caplog
):
    """With keys optional, a key entry written into the Redis hash by hand for tenant
    `default` is a WARNING the first time this process serves its key (once, naming the
    hash and the key's digest, never the key): a scan of a big hash at start would cost
    too much, and an entry may be added at any time. With `mode: keys` nothing is said.
    Before, only `auth.keys` and the keys file were warned of."""
    client = redis.Redis.from_url(redis_url)
    client.hset("t-default:keys", hash_key(CALLER_KEY_A), "default")
    client.hset("t-default:keys", hash_key(CALLER_KEY_B), "team-b")
    client.close()
    auth = {"redis_url": redis_url, "redis_key_prefix": "t-default:"}

    def warned() -> list[str]:
        return [r.entry for r in caplog.records if r.getMessage() == "auth.default_tenant_key"]

    caplog.set_level(logging.INFO, logger="llm_gateway")
    required = await start_gateway(gateway_config(upstream.base_url, auth={"mode": "keys", **auth}))
    assert (await required.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    assert warned() == []
    optional = await start_gateway(gateway_config(upstream.base_url, auth={"mode": "off", **auth}))
    assert warned() == []
    for key in (CALLER_KEY_A, CALLER_KEY_B, CALLER_KEY_A):
        assert (await optional.stub.Complete(chat(), metadata=bearer(key))).content
    assert warned() == [f"t-default:keys {hash_key(CALLER_KEY_A)}"]


async def test_a_created_key_authenticates_through_the_keys_file(
    upstream, start_gateway, tmp_path, capsys
):
    """A key from `keys create` is accepted by a gateway reading that keys file."""
    keys_file = tmp_path / "keys.txt"
    config_file = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "team-c", "--config", str(config_file)]) == 0
    key = register_secret(capsys.readouterr().out.strip())
    gw = await start_gateway(
        gateway_config(upstream.base_url, auth={"mode": "keys", "keys_file": str(keys_file)})
    )
    assert (await gw.stub.Complete(chat(), metadata=bearer(key))).content
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(key[:-2])))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.redis
async def test_keys_created_in_redis_work_on_running_replicas(
    upstream, start_gateway, tmp_path, capsys, redis_url
):
    """A key stored in Redis after startup is accepted by every replica at once."""
    auth = {"mode": "keys", "redis_url": redis_url, "redis_key_prefix": "t-keys:"}
    replicas = [await start_gateway(gateway_config(upstream.base_url, auth=auth)) for _ in "ab"]
    config_file = _write_config(tmp_path / "gw.yaml", auth)
    assert keys_command(["create", "--tenant", "team-r", "--config", str(config_file)]) == 0
    key = register_secret(capsys.readouterr().out.strip())
    for gw in replicas:
        assert (await gw.stub.Complete(chat(), metadata=bearer(key))).content
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall("t-keys:keys")
    client.close()
    assert stored == {hash_key(key).encode(): b"team-r"}


@pytest.mark.redis
async def test_keys_create_against_a_redis_refusing_the_write_says_what_redis_said(
    tmp_path, capsys, monkeypatch
):
    """A Redis whose ACL lets the gateway's user (its default, by the password in
    `redis_password_env`) do all but HSET refuses the key: `keys create` exits 2 naming
    what Redis said (the user and the command it lacks), never the password. Before, it
    said only `cannot store the key in Redis (NoPermissionError)`, which did not tell the
    operator what the user lacked."""
    server = RedisServer(password="redis-secret-pw")
    await server.start()
    try:
        admin = aioredis.Redis.from_url(server.url, password="redis-secret-pw")
        await admin.acl_setuser("default", enabled=True, commands=["-hset"])
        await admin.aclose()
        monkeypatch.setenv("TEST_KEYS_REDIS_PASSWORD", "redis-secret-pw")
        auth = {
            "mode": "keys",
            "redis_url": server.url,
            "redis_password_env": "TEST_KEYS_REDIS_PASSWORD",
        }
        config_file = _write_config(tmp_path / "gw.yaml", auth)
        assert keys_command(["create", "--tenant", "team-r", "--config", str(config_file)]) == 2
    finally:
        await server.stop()
    printed = capsys.readouterr()
    assert printed.out == ""
    said = printed.err
    # Redis 7.0 says "this user", 7.2 on names it: "User default".
    assert said.startswith("llm-gateway keys: cannot store the key in Redis (NoPermissionError: ")
    assert "Redis said: " in said
    assert "has no permissions to run the 'hset' command)" in said
    assert "redis-secret-pw" not in said


@pytest.mark.redis
async def test_tenant_limits_in_redis_are_shared_by_replicas(upstream, start_gateway, redis_url):
    """Three calls a minute for team-a, spread over two replicas: the fourth is refused."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_url, "redis_key_prefix": "t-limits:"},
        tenants={"team-a": {"requests_per_minute": 3, "max_concurrent_calls": 2}, "team-b": {}},
    )
    first, second = [await start_gateway(config) for _ in range(2)]
    for gw in (first, second, first):
        assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    for gw in (second, first):
        error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await second.stub.Complete(chat(), metadata=as_tenant("team-b"))).content
    client = redis.Redis.from_url(redis_url)
    in_flight = client.zcard("t-limits:tenant:{team-a}:inflight")
    client.close()
    assert in_flight == 0  # every lease was released
    assert len(upstream.requests) == 4


@pytest.mark.redis
async def test_unlisted_tenants_each_get_the_any_tenant_limits_across_replicas(
    upstream, start_gateway, redis_url
):
    """Two replicas sharing Redis hold each tenant without its own entry to "*"'s
    requests_per_minute, in a bucket of its own: team-a's third call is refused on either
    replica, naming team-a, while team-b still has its two."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_url, "redis_key_prefix": "t-any:"},
        tenants={"*": {"requests_per_minute": 2, "max_concurrent_calls": 1}},
    )
    first, second = [await start_gateway(config) for _ in range(2)]
    for tenant in ("team-a", "team-b"):
        for gw in (first, second):
            assert (await gw.stub.Complete(chat(), metadata=as_tenant(tenant))).content
        for gw in (first, second):
            error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant(tenant)))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            quota = detail(error, error_details_pb2.QuotaFailure)
            assert quota.violations[0].subject == f"tenant:{tenant}:requests_per_minute"
    client = redis.Redis.from_url(redis_url)
    buckets = sorted(client.scan_iter("t-any:tenant:*:rpm"))
    in_flight = [client.zcard(f"t-any:tenant:{{{t}}}:inflight") for t in ("team-a", "team-b")]
    client.close()
    assert buckets == [b"t-any:tenant:{team-a}:rpm", b"t-any:tenant:{team-b}:rpm"]
    assert in_flight == [0, 0]  # every lease was released
    assert len(upstream.requests) == 4


@pytest.mark.parametrize(
    "corrupt",
    [{"level": "-1e308", "at": "0"}, {"level": "1", "at": "soon"}, {"level": "1"}],
    ids=["level-below-zero", "time-not-a-number", "time-missing"],
)
async def test_a_tenant_bucket_hash_the_script_cannot_read_counts_as_full_and_is_rewritten(
    upstream, start_gateway, redis_url, corrupt
):
    """A tenant's requests bucket left unreadable in Redis (written by hand or by another
    tool) reads as a missing one, full: the minute's calls go, the bucket is written
    afresh, and the next call is refused as usual.

    Before, an impossible level refused every call of the tenant for ever, and an
    unreadable time let every call through, unlimited, for as long as the key stayed."""
    prefix = f"t-unreadable-{len(corrupt)}-{corrupt.get('at', '')}:"
    client = aioredis.Redis.from_url(redis_url)
    key = prefix + "tenant:{team-a}:rpm"
    await client.hset(key, mapping=corrupt)
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_url, "redis_key_prefix": prefix},
        tenants={"team-a": {"requests_per_minute": 2}},
    )
    gateway = await start_gateway(config)
    for _ in range(2):
        assert (await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    error = await rpc_error(gateway.stub.Complete(chat(), metadata=as_tenant("team-a")))
    after = await client.hgetall(key)
    await client.aclose()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests_per_minute" in (error.details() or "")
    assert 0 <= float(after[b"level"]) < 1
    assert float(after[b"at"]) > 0


@pytest.mark.redis
async def test_a_batch_paced_by_redis_limits_takes_one_request_and_lease_an_item(
    upstream, start_gateway, redis_url
):
    """With the limits in Redis, a batch's items take team-a's three requests a minute one
    by one as they start (the fourth's turn is 20 s away, after the call's deadline), each
    with a lease of team-a's one call slot, released as its call ends: none is left."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_url, "redis_key_prefix": "t-paced:"},
        tenants={"team-a": {"requests_per_minute": 3, "max_concurrent_calls": 1}},
        batch={"rate_left_to_other_calls": 0},
    )
    gw = await start_gateway(config)
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(4)],
        concurrency=1,
    )
    call = gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=10)
    events = [e async for e in call]
    failed = [e.result for e in events if e.HasField("result") and e.result.HasField("error")]
    assert [r.id for r in failed] == ["item-3"]
    assert failed[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert (events[-1].summary.succeeded, events[-1].summary.failed) == (3, 1)
    client = redis.Redis.from_url(redis_url)
    in_flight = client.zcard("t-paced:tenant:{team-a}:inflight")
    level = float(client.hget("t-paced:tenant:{team-a}:rpm", "level") or -1)
    client.close()
    assert in_flight == 0
    assert 0 <= level < 1  # all three requests taken, in Redis
    assert len(upstream.requests) == 3


@pytest.mark.redis
async def test_a_batch_paced_by_redis_limits_leaves_its_share_to_other_calls(
    upstream, start_gateway, redis_url
):
    """With the limits in Redis, a paced batch leaves `batch.rate_left_to_other_calls` of
    team-a's ten requests a minute to its other calls: eight items run, the ninth's turn
    is past the deadline, and two unary calls, on another replica, still pass."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_url, "redis_key_prefix": "t-share:"},
        tenants={"team-a": {"requests_per_minute": 10}},
        batch={"rate_left_to_other_calls": 0.2},
    )
    first, second = [await start_gateway(config) for _ in range(2)]
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(9)],
        concurrency=1,
    )
    call = first.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=3)
    events = [e async for e in call]
    assert (events[-1].summary.succeeded, events[-1].summary.failed) == (8, 1)
    (refused,) = (e.result for e in events if e.HasField("result") and e.result.HasField("error"))
    assert "20% of it kept for the tenant's other calls" in refused.error.message
    for _ in range(2):
        assert (await second.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    assert len(upstream.requests) == 10


@pytest.mark.redis
async def test_batches_on_two_replicas_run_no_more_calls_at_once_than_the_cap_in_redis(
    start_gateway, redis_url
):
    """Two replicas sharing Redis, team-a allowed two calls at once: a batch of four on
    each, asking for four at once, runs two upstream calls at once between them, every
    item succeeds (one replica's items take the slots the other's give back), a plain
    call at the cap is refused at once, and no lease is left.

    Before, each batch held one lease and ran two calls itself: four at once."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="ok", delay_s=0.05)
    ) as scripted:
        config = secure_config(
            scripted.base_url,
            auth={"redis_url": redis_url, "redis_key_prefix": "t-capped:"},
            tenants={"team-a": {"max_concurrent_calls": 2}},
        )
        replicas = [await start_gateway(config) for _ in range(2)]
        scripted.gate.clear()
        batches = [
            asyncio.ensure_future(
                _events(gw.stub.CompleteBatch(_batch(name), metadata=as_tenant("team-a")))
            )
            for name, gw in zip(("first", "second"), replicas, strict=True)
        ]
        await scripted.wait_until(lambda: scripted.in_flight == 2)
        refused = await rpc_error(replicas[1].stub.Complete(chat(), metadata=as_tenant("team-a")))
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        subject = detail(refused, error_details_pb2.QuotaFailure).violations[0].subject
        assert subject == "tenant:team-a:max_concurrent_calls"
        scripted.gate.set()
        for events in await asyncio.gather(*batches):
            assert (events[-1].summary.succeeded, events[-1].summary.failed) == (4, 0)
    assert scripted.peak_in_flight == 2
    client = redis.Redis.from_url(redis_url)
    in_flight = client.zcard("t-capped:tenant:{team-a}:inflight")
    client.close()
    assert in_flight == 0


def _batch(name: str) -> pb.CompleteBatchRequest:
    """Four items of distinct prompts, all asked for at once."""
    return pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"{name}-{i}", request=chat(f"{name} {i}")) for i in range(4)],
        concurrency=4,
    )


async def _events(call: Any) -> list[pb.CompleteBatchResponse]:
    """Every message of a batch call."""
    return [event async for event in call]


async def _create_key_while_serving(upstream, start_gateway, tmp_path, capsys) -> tuple[Any, str]:
    """A gateway re-reading `tmp_path/keys.txt` at once, and a key `keys create` then
    issued for tenant "late" into that file."""
    keys_file = tmp_path / "keys.txt"
    auth = {"mode": "keys", "keys_file": str(keys_file), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    config_file = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "late", "--config", str(config_file)]) == 0
    return gw, register_secret(capsys.readouterr().out.strip())


async def test_a_key_created_while_the_gateway_runs_works_without_a_restart(
    upstream, start_gateway, tmp_path, capsys
):
    """The keys file is re-read when it changes, so a new key needs no restart."""
    gw, key = await _create_key_while_serving(upstream, start_gateway, tmp_path, capsys)
    assert (await gw.stub.Complete(chat(), metadata=bearer(key))).content


async def test_a_key_created_after_a_hand_edit_left_no_final_newline_still_works(
    upstream, start_gateway, tmp_path, capsys
):
    """A keys file whose last line lost its newline (a revocation made in an editor) gets
    the new key on a line of its own: appended as is, it would join that line, leaving a
    malformed file that a running gateway ignores and a restart refuses."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{hash_key(CALLER_KEY_A)} team-a", encoding="utf-8")
    gw, key = await _create_key_while_serving(upstream, start_gateway, tmp_path, capsys)
    assert (await gw.stub.Complete(chat(), metadata=bearer(key))).content
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    assert keys_file.read_text(encoding="utf-8").splitlines()[1] == f"{hash_key(key)} late"


async def test_keys_create_adds_no_key_to_a_file_running_gateways_ignore(
    upstream, start_gateway, tmp_path, capsys
):
    """A keys file a hand edit left malformed is kept at its last good keys by running
    gateways: `keys create` exits 2 naming the bad line, prints no key and leaves the file
    as it was, and the gateway goes on serving the keys it has.

    Before, it appended a key, exit 0, that the running gateway refused."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys_file), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    broken = f"{hash_key(CALLER_KEY_A)} team-a\nnot-a-digest team-b\n"
    keys_file.write_text(broken, encoding="utf-8")
    config_file = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    assert keys_command(["create", "--tenant", "late", "--config", str(config_file)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"{keys_file}:2:" in printed.err
    assert keys_file.read_text(encoding="utf-8") == broken
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content


async def test_a_keys_file_being_read_stops_no_call_that_needs_none_of_it(
    upstream, start_gateway, tmp_path, monkeypatch
):
    """The keys file is checked in a worker thread: while a check of a changed file is
    still reading it (a file of many keys, a slow network mount), a caller whose key the
    config lists is served, and the caller of the key just added waits for the check and
    is served after it. Before, the file was read and parsed on the event loop, which
    stopped every call of the process (0.15 s or more at 10,000 keys, each change)."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"keys_file": str(keys_file), "keys_file_check_s": 0}
    gw = await start_gateway(secure_config(upstream.base_url, auth=auth))
    reading, released, read = threading.Event(), threading.Event(), threading.Event()
    text_of_keys_file = service.auth.keys_file_text

    def slow_read(raw: bytes, *, source: str) -> str:
        reading.set()
        released.wait(timeout=10)  # bounded: before, nothing could release it
        read.set()
        return text_of_keys_file(raw, source=source)

    monkeypatch.setattr(service.auth, "keys_file_text", slow_read)
    added = "llmgw_added-while-serving"
    with keys_file.open("a", encoding="utf-8") as file:
        file.write(f"{hash_key(added)} team-c\n")
    waiting = asyncio.ensure_future(gw.stub.Complete(chat(), metadata=bearer(added)))
    assert await asyncio.to_thread(reading.wait, 10)
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-b"))).content
    assert not read.is_set()  # served while the check was still reading
    assert not waiting.done()
    released.set()
    assert (await waiting).content


async def test_a_keys_file_that_turns_unreachable_keeps_the_last_keys(
    upstream, start_gateway, tmp_path
):
    """A keys file whose directory can no longer be looked into keeps serving the keys last
    read, as a malformed or unreadable file does. Before, every call with a key from the
    file failed INTERNAL. (A file where the directory was stands in for a directory whose
    permissions changed: these tests run as root, which permissions do not stop.)"""
    directory = tmp_path / "keys.d"
    directory.mkdir()
    (directory / "keys").write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(directory / "keys"), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    directory.rename(tmp_path / "moved.d")
    directory.write_text("", encoding="utf-8")
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer("llmgw_unknown-to-all")))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_keys_file_whose_read_hangs_keeps_the_last_keys(
    upstream, start_gateway, tmp_path, monkeypatch
):
    """A keys file whose read never returns (a hung network mount; a FIFO no one writes
    stands in for it) is logged, and the keys read last answer once the check has run
    `_CHECK_WAIT_S`, as for a file that turned unreadable. Before, every call with a key
    waited for the check, till its deadline (for ever, without one)."""
    monkeypatch.setattr(service.auth, "_CHECK_WAIT_S", 0.2)
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    keys.unlink()
    os.mkfifo(keys)
    try:
        reply = await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A), timeout=30)
        assert reply.content
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer("llmgw_unknown-to-all")))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        # The check's thread, blocked opening the FIFO, reads it empty and ends.
        with contextlib.suppress(OSError):  # ENXIO: no reader
            os.close(os.open(keys, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("how", ["emptied", "removed"])
async def test_a_keys_file_seen_mid_save_keeps_its_keys_until_a_second_check(
    upstream, start_gateway, tmp_path, how
):
    """An editor saving the keys file in place leaves it empty for a moment, one saving by
    rename leaves it gone: a check that lands then keeps the keys it has, and the file
    saved after it is read as usual. One still empty or gone at the next check is taken,
    revoking every key.

    Before, the one check in the middle of the save refused every key until the next."""
    keys = tmp_path / "keys"
    line = f"{hash_key(CALLER_KEY_A)} team-a\n"
    keys.write_text(line, encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))

    def mid_save() -> None:
        if how == "emptied":
            keys.write_text("", encoding="utf-8")
        else:
            keys.unlink()

    mid_save()
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    keys.write_text(line + f"{hash_key(CALLER_KEY_B)} team-b\n", encoding="utf-8")
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_B))).content
    mid_save()
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_keys_file_moved_away_and_back_still_keeps_its_keys_through_a_later_save(
    upstream, start_gateway, tmp_path
):
    """A keys file moved away and back unchanged (`mv keys keys.bak`, then back) is the
    file the gateway read: a later save by rename that a check lands in the middle of
    keeps the keys one check more, as ever. Before, the gone file seen before was still
    counted, so that one check took the file as removed and refused every key."""
    keys, moved = tmp_path / "keys", tmp_path / "keys.bak"
    keys.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    keys.rename(moved)
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    moved.rename(keys)
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    keys.unlink()  # an editor's save by rename, between its two steps
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content


async def test_a_key_whose_line_an_editor_saving_a_bom_deleted_is_revoked(
    upstream, start_gateway, tmp_path
):
    """A keys file saved with a byte order mark (as Windows editors and PowerShell write
    UTF-8), one key's line deleted, revokes that key on the running gateway and serves the
    others; and a gateway starts with such a file.

    Before, the mark made line 1 malformed: the running gateway kept its last keys, the
    deleted one included, and a restart failed on a config error."""
    keys = tmp_path / "keys"
    lines = [f"{hash_key(CALLER_KEY_A)} team-a\n", f"{hash_key(CALLER_KEY_B)} team-b\n"]
    keys.write_text("".join(lines), encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_B))).content
    keys.write_text(lines[0], encoding="utf-8-sig")
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_B)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    restarted = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    assert (await restarted.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content


async def test_a_key_revoked_in_place_within_the_files_mtime_tick_is_refused(
    upstream, start_gateway, tmp_path
):
    """A filesystem keeps modification times to a tick (1 s on HFS+, ext3 and some
    network mounts): a key's line commented out in place, at the same size, in the tick
    the gateway read the file in, leaves the file's mtime, size and inode as they were.
    The gateway reads such a file again, and refuses the revoked key.

    Before, it judged the file unchanged by those three alone, and served the revoked
    key until some later edit changed one of them."""
    keys = tmp_path / "keys"
    line_a, line_b = (
        f"{hash_key(k)} {t}\n" for k, t in [(CALLER_KEY_A, "team-a"), (CALLER_KEY_B, "team-b")]
    )
    keys.write_text(line_b, encoding="utf-8")
    auth = {"mode": "keys", "keys_file": str(keys), "keys_file_check_s": 0}
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth))
    keys.write_text(line_a + line_b, encoding="utf-8")
    read = keys.stat()
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    keys.write_text("#" + line_a[1:] + line_b, encoding="utf-8")
    os.utime(keys, ns=(read.st_atime_ns, read.st_mtime_ns))  # the tick has not moved on
    rewritten = keys.stat()
    assert (rewritten.st_mtime_ns, rewritten.st_size, rewritten.st_ino) == (
        read.st_mtime_ns,
        read.st_size,
        read.st_ino,
    )
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_B))).content


def _windows_text(text: str, encoding: str) -> bytes:
    """`text` as a Windows tool saves it: CRLF line ends, after the byte order mark of
    `encoding` (`utf-16-le`: Notepad's "Unicode" and PowerShell 5's `>`)."""
    marks = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
             "utf-32-le": codecs.BOM_UTF32_LE, "utf-8": codecs.BOM_UTF8}  # fmt: skip
    return marks[encoding] + text.replace("\n", "\r\n").encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-8"])
async def test_a_keys_file_saved_by_windows_tools_serves_its_keys_and_takes_new_ones(
    upstream, start_gateway, tmp_path, capsys, encoding
):
    """A keys file in UTF-16 or UTF-32 after its byte order mark, as Windows tools save
    it, is read as the config file is: a gateway starts with it and serves its keys, and
    `keys create` appends the new key in the file's own encoding and line ends, which the
    running gateway then serves too. Before, a gateway refused to start on it, and
    `keys create` exited 2 calling it malformed."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_bytes(_windows_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding))
    gw, key = await _create_key_while_serving(upstream, start_gateway, tmp_path, capsys)
    assert (await gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A))).content
    assert (await gw.stub.Complete(chat(), metadata=bearer(key))).content
    expected = f"{hash_key(CALLER_KEY_A)} team-a\n{hash_key(key)} late\n"
    assert keys_file.read_bytes() == _windows_text(expected, encoding)


async def test_a_key_given_to_two_tenants_is_refused_wherever_it_is_listed(
    upstream, start_gateway, tmp_path, capsys
):
    """One digest for an admin and another tenant, both in `auth.keys` or one there and
    one in the keys file, is a config error, as it is within a keys file: its callers
    could not be told apart, and `keys create` adds no key beside it.

    Before, the gateway started and served the key as one of them, silently (the last in
    `auth.keys`, the config's over the file's): here, as the admin."""
    admin = {"sha256": hash_key(CALLER_KEY_A), "tenant": "ops"}
    tenants = {"ops": {"is_admin": True}, "team-a": {}}
    with pytest.raises(ConfigError, match=r"auth: keys\[1\]: the key of keys\[0\] again"):
        gateway_config(
            upstream.base_url,
            auth={"mode": "keys", "keys": [admin, {**admin, "tenant": "team-a"}]},
            tenants=tenants,
        )
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{hash_key(CALLER_KEY_A)} team-a\n", encoding="utf-8")
    auth = {"mode": "keys", "keys": [admin], "keys_file": str(keys_file)}
    with pytest.raises(ConfigError, match=r":1: the key of auth\.keys\[0\] again"):
        await start_gateway(gateway_config(upstream.base_url, auth=auth, tenants=tenants))
    config_file = _write_config(tmp_path / "gw.yaml", auth)
    assert keys_command(["create", "--tenant", "late", "--config", str(config_file)]) == 2
    assert capsys.readouterr().out == ""
    keys_file.write_text(f"{hash_key(CALLER_KEY_B)} team-b\n", encoding="utf-8")
    gw = await start_gateway(gateway_config(upstream.base_url, auth=auth, tenants=tenants))
    own = await gw.stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(CALLER_KEY_B))
    assert own.total.requests == 0


async def test_an_unreachable_redis_fails_closed_for_keys_and_open_for_limits(
    upstream, start_gateway, tmp_path
):
    """Redis down: an unknown key gets a retryable UNAVAILABLE; a config key is still served."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": f"unix://{tmp_path}/no-such.sock"},
        tenants={"team-a": {"requests_per_minute": 1}},
    )
    gw = await start_gateway(config)
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer("llmgw_unknown-to-all")))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert detail(error, error_details_pb2.ErrorInfo).metadata["upstream"] == "auth-store"
    for _ in range(2):  # the limit cannot be checked, so it is not enforced
        assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    assert len(upstream.requests) == 2


async def test_an_unreachable_key_store_says_when_to_retry(upstream, start_gateway, tmp_path):
    """UNAVAILABLE from the key store carries RetryInfo and the pushback trailer, as the
    README's error table promises for every UPSTREAM_UNAVAILABLE: the store is left alone
    for its cool-down, and a retry sooner would only be refused the same way.

    Before, it carried neither, and a retry policy retried at its own 0.2 s backoff."""
    config = secure_config(upstream.base_url, auth={"redis_url": f"unix://{tmp_path}/none.sock"})
    gw = await start_gateway(config)
    for _ in range(2):  # the first lookup fails, the second skips Redis in its cool-down
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer("llmgw_unknown-to-all")))
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert detail(error, error_details_pb2.ErrorInfo).reason == "UPSTREAM_UNAVAILABLE"
        delay = detail(error, error_details_pb2.RetryInfo).retry_delay
        assert delay.seconds + delay.nanos / 1e9 == pytest.approx(COOLDOWN_S)
        assert trailer(error, RETRY_PUSHBACK_TRAILER) == str(round(COOLDOWN_S * 1000))
    assert upstream.requests == []


@pytest.mark.redis
@pytest.mark.parametrize("stored_tenant", ["", "*", "team a"], ids=["empty", "star", "space"])
async def test_a_redis_key_naming_no_valid_tenant_is_unauthenticated(
    upstream, start_gateway, redis_url, stored_tenant
):
    """An entry written into the Redis hash by hand is checked like the keys file's: one
    whose tenant is empty or `*` would otherwise pass GetUsage's own-tenant check as a
    caller whose filter matches every tenant's rows."""
    config = secure_config(
        upstream.base_url, auth={"redis_url": redis_url, "redis_key_prefix": "t-badname:"}
    )
    gw = await start_gateway(config)
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    key = "llmgw_hand-written-entry-0c7e2a9d41f6b853"
    client = redis.Redis.from_url(redis_url)
    client.hset("t-badname:keys", hash_key(key), stored_tenant)
    client.close()
    error = await rpc_error(gw.stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(key)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
    listed = await rpc_error(gw.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key)))
    assert listed.code() is grpc.StatusCode.UNAUTHENTICATED


class _ReplyNeverArrives:
    """A Redis client whose admission script runs on the server but whose reply hangs."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.script_ran = asyncio.Event()

    def register_script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        """The real script, run for real; the caller then waits for a reply forever. The
        admission's alone (the one script that counts leases): the call-off that follows
        its cancel is answered."""
        script = self.client.register_script(lua)
        if "ZCARD" not in lua:
            return script

        async def run(*, keys: list[str], args: list[object]) -> Any:
            await script(keys=keys, args=args)
            self.script_ran.set()
            await asyncio.Event().wait()

        return run

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_a_refusal_over_both_rates_tells_the_longer_wait(redis_url):
    """A tenant's requests come back in 1 s and its tokens in 50 s: the shared script
    refuses with the tokens' 50 s, as the in-process limiter does. Before, it said the
    requests' 1 s, and a paced item slept that only to be refused again."""
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisTenantLimiter(client, prefix="t-longer:")
    limits = TenantConfig(requests_per_minute=60, tokens_per_minute=600)
    try:
        await limiter.take_rate("team-a", limits, tokens=600, requests=60)
        with pytest.raises(QuotaExceeded) as refused:
            await limiter.take_rate("team-a", limits, tokens=500)
        assert refused.value.subject == "tenant:team-a:tokens_per_minute"
        assert refused.value.retry_after_s == pytest.approx(50.0, abs=0.5)
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_units_given_back_return_to_the_shared_buckets_up_to_full(redis_url):
    """Units taken for a call never sent (a batch item whose turn came as the drain began)
    go back to the tenant's shared buckets, never past a full minute's. Before, there was
    no way to give them back: they stayed spent for a call never made."""
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisTenantLimiter(client, prefix="t-give-back:")
    limits = TenantConfig(requests_per_minute=60, tokens_per_minute=600)
    try:
        await limiter.take_rate("team-a", limits, tokens=600, requests=60)
        await limiter.give_back_rate("team-a", limits, tokens=600, requests=60)
        await limiter.take_rate("team-a", limits, tokens=600, requests=60)
        await limiter.give_back_rate("team-a", limits, tokens=600, requests=60)
        await limiter.give_back_rate("team-a", limits, tokens=600, requests=60)  # no more
        await limiter.take_rate("team-a", limits, tokens=600, requests=60)
        with pytest.raises(QuotaExceeded):
            await limiter.take_rate("team-a", limits, tokens=10, requests=1)
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_a_call_held_past_its_lease_ttl_keeps_its_slot(redis_url):
    """A call running longer than its lease's TTL (a long paced batch) renews its lease,
    so the tenant's max_concurrent_calls still holds; once it ends, the slot is free.

    Before, the lease lapsed after its TTL (15 minutes) while the call still ran, and a
    second call of the tenant passed a cap of one on any replica."""
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisTenantLimiter(client, prefix="t-renew:", lease_ttl_s=1)
    limits = TenantConfig(max_concurrent_calls=1)
    try:
        async with limiter.admit("team-a", limits, tokens=0):
            await asyncio.sleep(2.5)  # past the 1 s TTL: renewed every third of it
            with pytest.raises(QuotaExceeded):
                async with limiter.admit("team-a", limits, tokens=0):
                    pass
        assert await client.zcard("t-renew:tenant:{team-a}:inflight") == 0
        async with limiter.admit("team-a", limits, tokens=0):
            pass
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_calls_held_at_once_share_one_lease_renewal_task(redis_url):
    """Twenty calls held at once have their leases renewed by one task, not a task each
    (every call of a capped tenant paid for creating and cancelling its own); each lease
    still outlives its TTL while its call runs, and none is left once they end."""
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisTenantLimiter(client, prefix="t-shared:", lease_ttl_s=1)
    limits = TenantConfig(max_concurrent_calls=20)
    in_flight = "t-shared:tenant:{team-a}:inflight"
    before = asyncio.all_tasks()
    try:
        async with contextlib.AsyncExitStack() as calls:
            for _ in range(20):
                await calls.enter_async_context(limiter.admit("team-a", limits, tokens=0))
            assert len(asyncio.all_tasks() - before) == 1
            await asyncio.sleep(2.5)  # past the 1 s TTL: renewed every third of it
            assert await client.zcard(in_flight) == 20
        assert await client.zcard(in_flight) == 0
    finally:
        await limiter.aclose()
        await client.aclose()
    assert asyncio.all_tasks() == before


async def test_leases_held_through_a_redis_pause_are_all_renewed_after_it(
    redis_server: RedisServer,
) -> None:
    """A renewal that times out starts the cool-down; once Redis answers the next round's
    first renewal, the cool-down is over and every other lease is renewed too.

    Before, an answered renewal did not end the cool-down, so each round renewed its one
    probe and skipped the rest: with nothing else asking that Redis, the other calls'
    leases lapsed while their calls still ran, and the tenant's cap let more in."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.1)
    lean = LeanRedis.beside(client)
    limiter = RedisTenantLimiter(
        client,
        prefix="t-pause:",
        lease_ttl_s=1,
        cooldown=StoreCooldown("tenant_limits", cooldown_s=0.1),
        commands=lean,
    )
    limits = TenantConfig(max_concurrent_calls=3)
    in_flight = "t-pause:tenant:{team-a}:inflight"
    try:
        async with contextlib.AsyncExitStack() as calls:
            for _ in range(3):
                await calls.enter_async_context(limiter.admit("team-a", limits, tokens=0))
            redis_server.pause()
            try:
                # Past a renewal round (every third of the TTL): it times out.
                await eventually(lambda: limiter.cooldown.is_cooling_down)
            finally:
                redis_server.resume()
            await asyncio.sleep(2.5)  # past the TTL twice: renewed, or lapsed
            seconds, _ = await client.time()
            assert await client.zcount(in_flight, seconds, "+inf") == 3
    finally:
        await limiter.aclose()
        await lean.aclose()
        await client.aclose()


class _CuttableProxy:
    """A TCP proxy on loopback in front of `port`: `cut()` drops its connections and
    refuses new ones (Redis unreachable, as across a partition or a failover), `mend()`
    takes them again, on the same port."""

    def __init__(self, port: int) -> None:
        self._target = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, to_writer}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
            sink.transport.abort()

        await asyncio.gather(copy(reader, to_writer), copy(to_reader, writer))
        self._writers -= {writer, to_writer}


async def test_a_lease_lapsed_while_redis_was_unreachable_is_put_back_once_it_answers(
    redis_server: RedisServer,
) -> None:
    """Redis unreachable past a lease's TTL: the lease lapses while its call runs, and the
    tenant's cap then counts one call too few (another replica may admit past it). Once
    Redis answers again, the next renewal puts the lease back, so the cap holds again for
    the rest of the call; the call's end still gives it back.

    Before, a renewal only moved a lease Redis still had: the call ran uncounted to its end."""
    proxy = _CuttableProxy(redis_server.port)
    await proxy.mend()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=0.5)
    lean = LeanRedis.beside(client)
    limiter = RedisTenantLimiter(
        client,
        prefix="t-lapse:",
        lease_ttl_s=1,
        cooldown=StoreCooldown("tenant_limits", cooldown_s=0.1),
        commands=lean,
    )
    other = aioredis.Redis.from_url(redis_server.url)
    other_replica = RedisTenantLimiter(other, prefix="t-lapse:")
    limits = TenantConfig(max_concurrent_calls=1)
    in_flight = "t-lapse:tenant:{team-a}:inflight"
    try:
        async with limiter.admit("team-a", limits, tokens=0):
            await proxy.cut()
            await eventually(lambda: limiter.cooldown.is_cooling_down)
            await asyncio.sleep(1.5)  # past the 1 s TTL: the lease lapsed
            async with other_replica.admit("team-a", limits, tokens=0):
                pass  # the cap counts one call too few while Redis is unreachable
            await proxy.mend()
            await asyncio.sleep(1.0)  # three renewal rounds (every third of the TTL)
            with pytest.raises(QuotaExceeded):
                async with other_replica.admit("team-a", limits, tokens=0):
                    pass
        await eventually(lambda: limiter.late_releases.pending == 0)
        assert await other.zcard(in_flight) == 0
        async with other_replica.admit("team-a", limits, tokens=0):
            pass
    finally:
        await limiter.aclose()
        await other_replica.aclose()
        await lean.aclose()
        await client.aclose()
        await other.aclose()
        await proxy.cut()


class _RenewalRunsLate:
    """A Redis client whose lease renewals reach the server only once `go` is set (as a
    renewal stuck in a stalled server's input, or on a slow path, does)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.go = asyncio.Event()
        self.renewed = asyncio.Event()

    def register_script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        script = self.client.register_script(lua)
        if "ZREMRANGEBYSCORE" in lua:  # the admission script: at once
            return script  # type: ignore[no-any-return]

        async def renew_late(*, keys: list[str], args: list[object]) -> Any:
            await self.go.wait()
            reply = await script(keys=keys, args=args)
            self.renewed.set()
            return reply

        return renew_late

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_a_renewal_redis_runs_after_its_lease_was_given_back_does_not_put_it_back(
    redis_url,
):
    """A renewal puts back a lease that lapsed; one that reaches Redis after its call gave
    the lease back must not, or the tenant's slot would count for the lease's TTL with no
    call behind it: a lease a renewal was sent for is marked released as it is given back."""
    client = aioredis.Redis.from_url(redis_url)
    late = _RenewalRunsLate(client)
    limiter = RedisTenantLimiter(client, prefix="t-late-renew:", lease_ttl_s=1, commands=late)
    limits = TenantConfig(max_concurrent_calls=1)
    in_flight = "t-late-renew:tenant:{team-a}:inflight"
    try:
        async with limiter.admit("team-a", limits, tokens=0):
            await asyncio.sleep(0.5)  # past a renewal round: its renewal is on its way
        assert await client.zcard(in_flight) == 0
        late.go.set()
        async with asyncio.timeout(10):
            await late.renewed.wait()
        assert await client.zcard(in_flight) == 0
        async with limiter.admit("team-a", limits, tokens=0):
            pass
    finally:
        await limiter.aclose()
        await client.aclose()


def test_a_limiter_used_from_a_new_event_loop_renews_and_releases_there(redis_url):
    """A limiter outlives the loop it first ran on (a CLI or test harness running one loop
    after another): on the next loop its calls' leases are renewed past their TTL and
    given back at their end as on the first, and it closes on a loop after that.

    Before, the second loop's calls waited out the lean client's timeout on connections
    the first loop had made, and closing awaited tasks of a loop already closed."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
    lean = LeanRedis.beside(client)
    limiter = RedisTenantLimiter(client, prefix="t-loops:", lease_ttl_s=1, commands=lean)
    limits = TenantConfig(max_concurrent_calls=1)
    in_flight = "t-loops:tenant:{team-a}:inflight"

    async def hold_past_the_ttl() -> int:
        async with limiter.admit("team-a", limits, tokens=0):
            await asyncio.sleep(1.5)  # past the 1 s TTL: renewed every third of it
            with pytest.raises(QuotaExceeded):
                async with limiter.admit("team-a", limits, tokens=0):
                    pass
        await eventually(lambda: limiter.late_releases.pending == 0)
        return int(await lean.execute_command("ZCARD", in_flight))

    async def hold_and_close_redis_py() -> int:
        try:
            return await hold_past_the_ttl()
        finally:
            await client.aclose()  # redis-py's connections close only on their own loop

    async def close() -> None:
        await limiter.aclose()
        await lean.aclose()

    try:
        assert asyncio.run(hold_past_the_ttl()) == 0
        assert asyncio.run(hold_and_close_redis_py()) == 0
    finally:
        asyncio.run(close())


async def test_a_call_cancelled_while_redis_admits_it_leaves_no_lease(redis_url):
    """Cancelled between the admission script running and its reply: the slot is given back."""
    client = aioredis.Redis.from_url(redis_url)
    slow = _ReplyNeverArrives(client)
    limiter = RedisTenantLimiter(slow, prefix="t-cancel:")
    limits = TenantConfig(max_concurrent_calls=1)

    async def one_call() -> None:
        async with limiter.admit("team-a", limits, tokens=10):
            pass

    call = asyncio.create_task(one_call())
    await slow.script_ran.wait()
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    try:
        assert await client.zcard("t-cancel:tenant:{team-a}:inflight") == 0
    finally:
        await client.aclose()


@pytest.mark.redis
def test_keys_create_refuses_a_tenant_name_with_a_trailing_newline(tmp_path, capsys, redis_url):
    """`team-a\\n` is not `team-a`: stored in Redis it would name a tenant with no limits
    at all, so a key for it would escape team-a's allowed models."""
    auth = {"mode": "keys", "redis_url": redis_url, "redis_key_prefix": "t-newline:"}
    config_file = _write_config(tmp_path / "gw.yaml", auth)
    assert keys_command(["create", "--tenant", "team-a\n", "--config", str(config_file)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall("t-newline:keys")
    client.close()
    assert stored == {}


class _ReplyTimesOut(_ReplyNeverArrives):
    """A Redis client whose admission script runs on the server but whose reply times out."""

    def register_script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        """The real script, run for real; the caller then gets redis-py's timeout error."""
        script = self.client.register_script(lua)

        async def run(*, keys: list[str], args: list[object]) -> Any:
            await script(keys=keys, args=args)
            self.script_ran.set()
            raise redis.TimeoutError("Timeout reading from socket")

        return run


async def test_a_call_admitted_without_a_reply_from_redis_leaves_no_lease(redis_url):
    """Redis ran the admission script but its reply timed out: the call is admitted (fail
    open) and ends without leaving a lease that holds the tenant's slot for 15 minutes
    (given back in the background: Redis timed out just now, so it is left alone a while)."""
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisTenantLimiter(_ReplyTimesOut(client), prefix="t-timeout:")
    limits = TenantConfig(max_concurrent_calls=1)
    try:
        async with limiter.admit("team-a", limits, tokens=10):
            pass
        await eventually(lambda: limiter.late_releases.pending == 0)
        assert await client.zcard("t-timeout:tenant:{team-a}:inflight") == 0
    finally:
        await client.aclose()


class _ScriptRunsLate(_ReplyNeverArrives):
    """A Redis client whose admission script times out unrun, and runs later: as a script
    left in a stalled server's input (a failover, a long fork) runs once it wakes up."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.pending: list[Callable[[], Awaitable[Any]]] = []

    def register_script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        """The real script, held back; the caller gets redis-py's timeout error at once."""
        script = self.client.register_script(lua)

        async def run(*, keys: list[str], args: list[object]) -> Any:
            self.pending.append(lambda: script(keys=keys, args=args))
            raise redis.TimeoutError("Timeout reading from socket")

        return run


async def test_an_admission_script_run_after_its_call_ended_takes_no_lease(redis_url):
    """Redis stalled with the admission script unread and woke after the call was over:
    the script, run then, takes no lease. Before, it took one that nobody would release,
    and a tenant at its max_concurrent_calls was refused for the lease's 15 minutes."""
    client = aioredis.Redis.from_url(redis_url)
    late = _ScriptRunsLate(client)
    limiter = RedisTenantLimiter(late, prefix="t-late:")
    limits = TenantConfig(max_concurrent_calls=1)
    try:
        async with limiter.admit("team-a", limits, tokens=10):
            pass
        await eventually(lambda: limiter.late_releases.pending == 0)
        (script,) = late.pending
        assert await script() == [0, b""]  # it admits, as it would have on time
        assert await client.zcard("t-late:tenant:{team-a}:inflight") == 0
        async with RedisTenantLimiter(client, prefix="t-late:").admit("team-a", limits, tokens=1):
            pass
    finally:
        await client.aclose()


@pytest.mark.parametrize("entry", [["-m", "service"], ["-m", "gateway_client.cli"]])
def test_keys_create_with_stderr_closed_prints_the_key_alone(tmp_path, entry):
    """`key=$(llm-gateway keys create ... 2>&-)` holds the key alone, the one stored. Before,
    Python set up no stderr and the note meant for it went to stdout after the key: the
    captured value was two lines, no key at all."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, *entry, "keys", "create",
         "--tenant", "ops", "--config", str(config)],
        cwd=_REPO, stdout=subprocess.PIPE, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    (key,) = done.stdout.splitlines()
    assert keys_file.read_text() == f"{hash_key(key)} ops\n"


def test_keys_create_with_stdout_closed_adds_no_key_and_exits_1(tmp_path):
    """`keys create ... >&-`: one line saying standard output is closed, exit status 1, and
    no key stored. Before, the key was stored and printed nowhere (Python sets up no
    stdout), exit 0: a key nobody has, that nothing said to remove."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "service", "keys", "create",
         "--tenant", "ops", "--config", str(config)],
        cwd=_REPO, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "llm-gateway keys: cannot write the key: standard output is closed; no key was added"
    ]
    assert not keys_file.exists()


def test_keys_create_whose_key_cannot_be_written_says_which_digest_to_remove(tmp_path):
    """A standard output that cannot take the key (a full disk, a reader that left) is one
    line naming the digest stored, exit status 1. Before, a traceback, and nothing said a
    key nobody has was stored."""
    keys_file = tmp_path / "keys.txt"
    config = _write_config(tmp_path / "gw.yaml", {"keys_file": str(keys_file)})
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "service", "keys", "create", "--tenant", "ops", "--config",
             str(config)],
            cwd=_REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    digest = keys_file.read_text().split()[0]
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "llm-gateway keys: cannot write the key to standard output (No space left on device); "
        f"its SHA-256 {digest} is stored for tenant 'ops' in {keys_file}, "
        "a key nobody has: remove it there"
    ]
