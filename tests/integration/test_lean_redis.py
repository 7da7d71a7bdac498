"""The lean Redis client answers as redis-py does, against a real redis-server.

It carries the commands every call sends (the tenant limiter's admission script and
lease release, the ledger's record and budget scripts), so each must get its own reply
through timeouts, cancellations and closed connections, and fail with the very error
class redis-py raises: the callers' handling (`refused_for_good`, cool-downs, late
releases) depends on it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
import uvloop
from redis import exceptions

from llmgateway.v1 import gateway_pb2 as pb
from service.lean_redis import LeanRedis
from tests.conftest import chat, gateway_config
from tests.fake_upstream import FakeUpstream
from tests.integration.pki import make_pki
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.integration.test_cache import settled
from tests.redis_server import RedisServer
from tests.redis_support import _free_port, redis_url  # noqa: F401 - fixture

pytestmark = pytest.mark.redis

COUNT_LUA = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[aioredis.Redis, LeanRedis]]:
    """A redis-py client (decoding replies, 0.5 s timeouts) and a lean one beside it."""
    client = aioredis.Redis.from_url(
        redis_server.url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    lean = LeanRedis.beside(client)
    try:
        yield client, lean
    finally:
        await lean.aclose()
        await client.aclose()


async def test_scripts_and_commands_answer_as_redis_py_decodes_them(
    pair: tuple[aioredis.Redis, LeanRedis],
) -> None:
    client, lean = pair
    script = lean.register_script("return {ARGV[1], tonumber(ARGV[2]) * 2, KEYS[1]}")
    assert await script(keys=["k"], args=["é", 0.25]) == ["é", 0, "k"]  # Lua truncates 0.5
    assert await script(keys=["k"], args=["x", 2]) == await client.register_script(
        "return {ARGV[1], tonumber(ARGV[2]) * 2, KEYS[1]}"
    )(keys=["k"], args=["x", 2])
    await client.zadd("z", {"lease": 1})
    assert await lean.execute_command("ZREM", "z", "lease") == 1
    assert await lean.execute_command("ZREM", "z", "lease") == 0
    assert await lean.execute_command("GET", "missing") is None


async def test_replies_stay_bytes_beside_a_client_that_does_not_decode(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    lean = LeanRedis.beside(client)
    try:
        assert await lean.execute_command("ECHO", "wait") == b"wait"
    finally:
        await lean.aclose()
        await client.aclose()


async def test_a_script_redis_lost_is_loaded_and_run_once(
    pair: tuple[aioredis.Redis, LeanRedis],
) -> None:
    """After SCRIPT FLUSH (as after a restart) the script is loaded again and run once."""
    client, lean = pair
    count = lean.register_script(COUNT_LUA)
    assert await count(keys=["n"], args=[1]) == 1
    await client.script_flush()
    assert await count(keys=["n"], args=[1]) == 2
    assert await client.get("n") == "2"


ERROR_REPLIES = [
    "READONLY You can't write against a read only replica.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOPERM this user has no permissions to run the 'zrem' command",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "NOSCRIPT No matching script.",
    "BUSY Redis is busy running a script.",
    "LOADING Redis is loading the dataset in memory",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MISCONF Errors writing to the AOF file",
    "ERR max number of clients reached",
    "NOREPLICAS Not enough good replicas to write.",
]


@pytest.mark.parametrize("reply", ERROR_REPLIES, ids=[r.split()[0] for r in ERROR_REPLIES])
async def test_each_error_reply_raises_what_redis_py_raises(
    pair: tuple[aioredis.Redis, LeanRedis], reply: str
) -> None:
    client, lean = pair
    lua = f"return redis.error_reply({reply!r})"
    with pytest.raises(exceptions.RedisError) as expected:
        await client.register_script(lua)(keys=["k"], args=[])
    with pytest.raises(exceptions.RedisError) as raised:
        await lean.register_script(lua)(keys=["k"], args=[])
    assert type(raised.value) is type(expected.value)
    assert str(raised.value) == str(expected.value)
    assert await lean.execute_command("ECHO", "next") == "next"  # the connection still answers


async def test_a_real_wrong_type_is_a_response_error(
    pair: tuple[aioredis.Redis, LeanRedis],
) -> None:
    client, lean = pair
    await client.set("plain", "1")
    with pytest.raises(exceptions.ResponseError) as raised:
        await lean.execute_command("ZREM", "plain", "lease")
    assert str(raised.value).startswith("WRONGTYPE")


async def test_the_password_user_and_db_come_from_the_url_or_the_configured_password() -> None:
    """As `Redis.from_url` reads them: an ACL user and db from the URL; a password passed
    beside a URL without one (the configured password variable)."""
    server = RedisServer(password="server-pw")
    await server.start()
    admin = aioredis.Redis.from_url(server.url, password="server-pw", decode_responses=True)
    leans: list[LeanRedis] = []
    try:
        await admin.acl_setuser(
            "gw", enabled=True, passwords=["+gw-pw"], keys=["*"], commands=["+@all"]
        )
        as_user = aioredis.Redis.from_url(
            f"redis://gw:gw-pw@127.0.0.1:{server.port}/3", decode_responses=True
        )
        leans.append(LeanRedis.beside(as_user))
        assert await leans[-1].execute_command("ACL", "WHOAMI") == "gw"
        await leans[-1].register_script(COUNT_LUA)(keys=["in-3"], args=[5])
        db3 = aioredis.Redis.from_url(f"{server.url[:-2]}/3", password="server-pw")
        assert await db3.get("in-3") == b"5"
        assert await admin.get("in-3") is None  # not in db 0
        await db3.aclose()
        await as_user.aclose()

        configured = aioredis.Redis.from_url(server.url, password="server-pw")
        leans.append(LeanRedis.beside(configured))
        assert await leans[-1].execute_command("ECHO", "in") == b"in"
        await configured.aclose()

        wrong = aioredis.Redis.from_url(server.url, password="wrong")
        leans.append(LeanRedis.beside(wrong))
        with pytest.raises(exceptions.AuthenticationError):
            await leans[-1].execute_command("ECHO", "in")
        await wrong.aclose()
    finally:
        for lean in leans:
            await lean.aclose()
        await admin.aclose()
        await server.stop()


class _RedisBefore6:
    """A Redis as those before 6.0 answer AUTH, over a real socket: one argument, the
    password; two (a user and a password) are a wrong number of arguments. Records the
    AUTH commands it was sent."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.auths: list[tuple[str, ...]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> _RedisBefore6:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        parser = hiredis.Reader(encoding="utf-8")
        is_authenticated = False
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                name, args = command[0].upper(), tuple(command[1:])
                if name == "AUTH":
                    self.auths.append(args)
                    if len(args) != 1:
                        writer.write(b"-ERR wrong number of arguments for 'auth' command\r\n")
                    elif args[0] == self.password:
                        is_authenticated = True
                        writer.write(b"+OK\r\n")
                    else:
                        writer.write(b"-ERR invalid password\r\n")
                elif not is_authenticated:
                    writer.write(b"-NOAUTH Authentication required.\r\n")
                elif name == "SELECT":
                    writer.write(b"+OK\r\n")
                elif name == "ECHO":
                    writer.write(f"${len(args[0])}\r\n{args[0]}\r\n".encode())
                else:
                    writer.write(f"-ERR unknown command '{command[0]}'\r\n".encode())
        writer.close()


@pytest.mark.parametrize("user", ["", "default"])
async def test_a_redis_before_6_takes_the_password_alone_as_redis_py_sends_it(
    user: str,
) -> None:
    """Redis before 6.0 knows AUTH with the password alone. Without a user, the lean client
    sends just that, as redis-py does (on RESP2: on RESP3 it opens with HELLO, which such a
    Redis lacks); with one, `AUTH user password` is a wrong number of arguments there, and
    redis-py then sends the password alone: so does the lean client. Before, a URL naming
    a user failed on such a Redis where redis-py connected."""
    async with _RedisBefore6("secret") as server:
        url = f"redis://{user}:secret@127.0.0.1:{server.port}/2?protocol=2"
        client = aioredis.Redis.from_url(url, decode_responses=True)
        lean = LeanRedis.beside(client)
        try:
            assert await client.echo("py") == "py"
            sent_by_redis_py = list(server.auths)
            server.auths.clear()
            assert await lean.execute_command("ECHO", "lean") == "lean"
            assert server.auths == sent_by_redis_py
            assert server.auths[-1] == ("secret",)
            assert len(server.auths) == (2 if user else 1)
        finally:
            await lean.aclose()
            await client.aclose()


async def test_a_refused_acl_user_is_refused_not_served_as_the_default_user(
    redis_server: RedisServer,
) -> None:
    """AUTH's WRONGPASS is an AuthenticationError, a ConnectionError: a connection whose
    AUTH failed must fail as redis-py's does, not run its commands as `default` (whose
    NOPERM the callers would take for a refusal for good). A password sent to a Redis
    that has none still connects, as redis-py's HELLO does."""
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await admin.acl_setuser(
        "gw", enabled=True, passwords=["+gw-pw"], keys=["*"], commands=["+@all"]
    )
    await admin.aclose()
    for url, password, whoami in [
        (f"redis://gw:wrong@127.0.0.1:{redis_server.port}/0", None, exceptions.AuthenticationError),
        (f"redis://gw:wrong@127.0.0.1:{redis_server.port}/2", None, exceptions.AuthenticationError),
        (redis_server.url, "a-password-redis-lacks", "default"),
    ]:
        client = aioredis.Redis.from_url(url, password=password, decode_responses=True)
        lean = LeanRedis.beside(client)
        try:
            assert await _answers(lambda lean=lean: lean.execute_command("ACL", "WHOAMI")) == whoami
            assert await _answers(lambda client=client: client.acl_whoami()) == whoami
        finally:
            await lean.aclose()
            await client.aclose()


async def _client_id(lean: LeanRedis) -> int:
    reply = await lean.execute_command("CLIENT", "ID")
    assert isinstance(reply, int)
    return reply


async def test_a_hung_redis_times_out_and_its_connection_is_not_reused(
    redis_server: RedisServer, pair: tuple[aioredis.Redis, LeanRedis]
) -> None:
    """The timed-out command's reply comes once Redis wakes: it must not be read as the
    next command's, so the next command is sent on a new connection."""
    _, lean = pair
    first = await _client_id(lean)
    redis_server.pause()
    try:
        with pytest.raises(exceptions.TimeoutError):
            await lean.execute_command("ECHO", "late")
    finally:
        redis_server.resume()
    assert await lean.execute_command("ECHO", "own") == "own"
    assert await _client_id(lean) != first


async def test_a_connection_redis_closed_is_replaced_not_handed_out(
    pair: tuple[aioredis.Redis, LeanRedis],
) -> None:
    """Connections Redis closed (CLIENT KILL, its idle timeout, a restart) are dropped as
    they are taken: the next command opens a new one and answers."""
    client, lean = pair
    await asyncio.gather(*(lean.execute_command("ECHO", str(i)) for i in range(3)))
    first = await _client_id(lean)
    assert await client.client_kill_filter(_type="normal", skipme=True) >= 1
    for i in range(5):
        assert await lean.execute_command("ECHO", str(i)) == str(i)
    assert await _client_id(lean) != first


async def test_concurrent_commands_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    """Beyond `max_connections` commands wait for a connection: no more are opened."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    lean = LeanRedis.beside(client, max_connections=3)
    echo = lean.register_script("return ARGV[1]")
    try:
        replies = await asyncio.gather(
            *(echo(keys=[], args=[str(i)]) for i in range(100)),
            *(lean.execute_command("ECHO", str(i)) for i in range(100, 200)),
        )
        assert replies == [str(i) for i in range(200)]
        names = await client.client_list()
        assert len(names) <= 3 + 1  # the lean client's, and redis-py's own
    finally:
        await lean.aclose()
        await client.aclose()


async def test_a_command_cancelled_awaiting_its_reply_leaves_no_reply_for_the_next(
    redis_server: RedisServer, pair: tuple[aioredis.Redis, LeanRedis]
) -> None:
    _, lean = pair
    assert await lean.execute_command("ECHO", "warm") == "warm"
    redis_server.pause()
    try:
        waiting = asyncio.create_task(lean.execute_command("ECHO", "cancelled"))
        for _ in range(5):
            await asyncio.sleep(0)  # sent, awaiting its reply
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        redis_server.resume()
    assert [await lean.execute_command("ECHO", str(i)) for i in range(3)] == ["0", "1", "2"]


async def test_closing_closes_every_connection(
    pair: tuple[aioredis.Redis, LeanRedis],
) -> None:
    client, lean = pair
    await asyncio.gather(*(lean.execute_command("ECHO", str(i)) for i in range(4)))
    assert len(await client.client_list()) >= 2
    await lean.aclose()
    assert len(await client.client_list()) == 1  # redis-py's own
    with pytest.raises(exceptions.ConnectionError):
        await lean.execute_command("ECHO", "closed")


def test_the_same_holds_on_uvloop(request: pytest.FixtureRequest) -> None:
    """The gateway runs on uvloop, whose transports are not asyncio's."""
    url = request.getfixturevalue("redis_url")

    async def scenario() -> None:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        lean = LeanRedis.beside(client, max_connections=2)
        try:
            count = lean.register_script(COUNT_LUA)
            key = "uvloop-count"
            await client.delete(key)
            replies = await asyncio.gather(*(count(keys=[key], args=[1]) for _ in range(20)))
            assert sorted(replies) == list(range(1, 21))
            await client.client_kill_filter(_type="normal", skipme=True)
            assert await lean.execute_command("ECHO", "after") == "after"
        finally:
            await lean.aclose()
            await client.aclose()

    uvloop.run(scenario())


def test_a_client_used_from_a_new_event_loop_connects_again_there(
    request: pytest.FixtureRequest,
) -> None:
    """A client outlives the loop it first ran on (a CLI or test harness running one loop
    after another, on asyncio or uvloop): the connections made on a loop gone are dropped
    as they are taken, and new ones opened on the loop now running; closing the client
    there closes them all.

    Before, a command on the second loop was written to a connection whose loop no longer
    read it: it waited its whole timeout (for ever without one), then failed with
    "Event loop is closed" and left its place in the pool taken for good."""
    url = request.getfixturevalue("redis_url")
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0)
    lean = LeanRedis.beside(client, max_connections=2)

    async def echo_twice(word: str) -> list[Any]:
        return await asyncio.gather(*(lean.execute_command("ECHO", word) for _ in range(2)))

    async def echo_and_close(word: str) -> Any:
        try:
            return await lean.execute_command("ECHO", word)
        finally:
            await lean.aclose()
            await client.aclose()

    assert asyncio.run(echo_twice("first")) == ["first", "first"]
    assert uvloop.run(echo_twice("second")) == ["second", "second"]
    assert asyncio.run(echo_twice("third")) == ["third", "third"]
    assert asyncio.run(echo_and_close("last")) == "last"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server answering TLS only, its certificate for 127.0.0.1: (port, CA).

    Its port, free when probed, may be bound by another test process (xdist) before the
    server binds it: the server then exits at once, and starts again on another port."""
    pki = make_pki(tmp_path)
    binary = shutil.which("redis-server")
    assert binary is not None
    for attempt in range(3):
        port = _free_port()
        process = subprocess.Popen(
            [
                binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
                "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_until_answering_tls(port, pki.ca, process, timeout_s=10.0)
            break
        except RuntimeError:
            if process.poll() is None or attempt == 2:
                process.kill()
                process.wait(timeout=10)
                raise
    try:
        yield port, pki.ca
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_answering_tls(
    port: int, ca: Path, process: subprocess.Popen[bytes], timeout_s: float
) -> None:
    """Until the server answers PING over TLS with a certificate `ca` vouches for: not
    merely a listener, which may be another process's on a port it took first."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("redis-server exited at startup")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(7).startswith(b"+PONG"):
                    return
        except OSError:  # refused, not TLS, or not this certificate
            pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start answering")


async def _answers(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except exceptions.RedisError as exc:
        return type(exc)


async def test_rediss_urls_verify_the_server_as_redis_py_does(
    tls_redis: tuple[int, Path],
) -> None:
    """The TLS context is redis-py's own, from the URL's ssl_* query: a server the CA
    vouches for answers; without that CA the certificate is refused, as by redis-py."""
    port, ca = tls_redis
    urls = {
        "trusted": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}",
        "unverified": f"rediss://127.0.0.1:{port}/0",
    }
    for name, url in urls.items():
        client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        lean = LeanRedis.beside(client)
        try:
            got = await _answers(lambda lean=lean: lean.execute_command("ECHO", "tls"))
            expected = await _answers(lambda client=client: client.echo("tls"))
        finally:
            await lean.aclose()
            await client.aclose()
        assert got == expected, name
        assert (got == b"tls") == (name == "trusted")


async def test_a_rediss_cache_trusts_the_ca_its_url_names(
    tls_redis: tuple[int, Path], upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The cache reads the URL as redis-py does for auth and the ledger: a rediss:// URL
    whose `ssl_ca_certs` names a private CA stores and serves answers, rather than
    failing every cache operation on the server's certificate."""
    port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    # What is checked is the CA, not the speed: a busy machine's TLS write may take more
    # than the default 250 ms, which would count as a failed write and a miss.
    cache = {"backend": "redis", "redis_url": url, "operation_timeout_s": 5}
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache))
    params = pb.GenerationParams(temperature=0.0)
    first = await gateway.stub.Complete(chat(params=params), timeout=10)
    await settled(gateway)  # its answer stored: the write may end after the response
    again = await gateway.stub.Complete(chat(params=params), timeout=10)
    assert (first.metadata.cache_hit, again.metadata.cache_hit) == (False, True)
    assert len(upstream.requests) == 1
    assert gateway.server.pipeline.cache.stats.errors == 0


async def test_a_stopped_gateway_leaves_no_redis_connection_open(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The lean clients of the tenant limiter and the ledger close with the rest."""
    config = secure_config(
        upstream.base_url,
        auth={"redis_url": redis_server.url, "redis_key_prefix": "stop:"},
        tenants={"team-a": {"max_concurrent_calls": 2}, "team-b": {}},
        ledger={"redis_url": redis_server.url, "key_prefix": "stop:usage"},
        budgets={"team-a": {"usd": 1.0, "period": "day"}},
    )
    gateway = await start_gateway(config)
    for _ in range(3):
        reply = await gateway.stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=10)
        assert reply.content
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert "evalsha" in {entry["cmd"] for entry in await client.client_list()}
        await gateway.server.stop(grace_s=0)
        assert [entry["cmd"] for entry in await client.client_list()] == ["client|list"]
    finally:
        await client.aclose()
