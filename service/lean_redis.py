"""A lean async Redis client for the commands every call sends: its scripts, one ZREM.

Hand-written because redis-py spends 125-180 µs of CPU on each command's way through
its generic path (encoder, pool checkout, retry wrapper, observability recorder,
`wait_for` timeouts), more than the rest of a cached call; here a command is packed by
hiredis straight onto an asyncio protocol and its reply parsed by hiredis (~20 µs).

`LeanRedis.beside(client)` connects as the redis-py client it sits beside (its URL,
password, db, timeouts, TLS) and raises what redis-py raises, mapped by redis-py's own
parser, so the callers' error handling holds. Queries, pipelines and transactions stay
on redis-py. One command at a time per connection: a connection whose command timed
out, failed or was cancelled before its reply is closed, so no late reply can be read
as the next command's.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis import exceptions
from redis._parsers.base import NO_AUTH_SET_ERROR, BaseParser
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

__all__ = ["LeanRedis", "LeanScript"]

Arg = str | bytes | int | float

# As redis-py's blocking pool: beyond this many connections, a command waits for one
# (at most its timeout).
MAX_CONNECTIONS = 100
# As redis-py's error for a connection the server closed.
_CLOSED_BY_SERVER = "Connection closed by server."
# As redis-py's blocking pool words a wait for a connection that timed out.
_NO_CONNECTION = "No connection available."
# Redis's reply to a long command from a connection that has not authenticated, before
# it closes it ("... multibulk length", "... bulk length"); a short one gets NOAUTH.
_UNAUTHENTICATED = "Protocol error: unauthenticated "
# The reply to AUTH from a Redis that has no password (each version's wording).
_NO_PASSWORD_SET = tuple(NO_AUTH_SET_ERROR)


class _Connection(asyncio.Protocol):
    """One connection to Redis, one command on it at a time (the pool sees to it)."""

    def __init__(self, reader: hiredis.Reader, where: str) -> None:
        self._reader = reader
        self._where = where
        self._transport: asyncio.Transport | None = None
        self._replies: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.is_closed = False
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except Exception as exc:  # not RESP: nothing after it can be trusted
                self._fail(exc)
                self.close()
                return
            if reply is False:
                return
            if not self._replies:  # a reply nobody asked for
                self.close()
                return
            waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def eof_received(self) -> bool:
        self.is_closed = True
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if exc is None:
            self._fail(exceptions.ConnectionError(_CLOSED_BY_SERVER))
        else:
            self._fail(
                exceptions.ConnectionError(f"Error while reading from {self._where} : {exc.args}")
            )
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail(self, exc: Exception) -> None:
        while self._replies:
            waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def send(self, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        """Write `commands` at once; each future gets its command's reply."""
        # hiredis's stub types the command as a 1-tuple; it takes any length.
        packed = [hiredis.pack_command(tuple(c)) for c in commands]  # type: ignore[arg-type]
        if self.is_closed or self._transport is None or self._transport.is_closing():
            raise exceptions.ConnectionError(_CLOSED_BY_SERVER)
        try:  # uvloop raises for a transport closing under it; asyncio only logs
            self._transport.write(packed[0] if len(packed) == 1 else b"".join(packed))
        except (RuntimeError, OSError) as exc:
            raise exceptions.ConnectionError(
                f"Error while writing to {self._where} : {exc.args}"
            ) from exc
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in commands]
        self._replies.extend(waiters)
        return waiters

    async def ask(self, command: Sequence[Arg], timeout_s: float | None) -> Any:
        """`command`'s reply (an error reply returned, not raised) within `timeout_s`."""
        (reply,) = self.send((command,))
        if timeout_s is None:
            return await reply
        timer = asyncio.get_running_loop().call_later(timeout_s, self._time_out, reply)
        try:
            return await reply
        finally:
            timer.cancel()

    def _time_out(self, reply: asyncio.Future[Any]) -> None:
        if not reply.done():
            reply.set_exception(exceptions.TimeoutError(f"Timeout reading from {self._where}"))

    def keep_alive(self, options: dict[int, Any] | None) -> None:
        """TCP keepalive with `options`, as redis-py sets it (None: left off)."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None or options is None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in options.items():
            sock.setsockopt(socket.SOL_TCP, option, value)

    def close(self) -> None:
        self.is_closed = True
        if self._transport is not None:
            if self.loop.is_closed():
                return  # nothing can run its closing: the transport's finalizer does
            self._transport.abort()  # nothing unsent is worth waiting for
        elif not self.lost.done():
            self.lost.set_result(None)


class LeanRedis:
    """A pool of lean connections for single commands and scripts.

    Idle connections are reused (the most recent first); more are opened, up to
    `max_connections`, as concurrent commands need them. A connection Redis closed is
    dropped as it is taken, never handed out to fail, and so is one made on another event
    loop than the one running (the client outlived it): only that loop reads it.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: Any = None,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        decode_responses: bool = False,
        encoding: str = "utf-8",
        encoding_errors: str = "strict",
        keepalive_options: dict[int, Any] | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._where = path if path is not None else f"{host}:{port}"
        self._db = int(db)
        # As redis-py authenticates: AUTH user password, or AUTH password alone.
        self._auth: tuple[str, ...] = (
            (username, password or "") if username else (password,) if password else ()
        )
        self._ssl = ssl_context
        self._timeout_s = socket_timeout
        self._connect_timeout_s = (
            socket_connect_timeout if socket_connect_timeout is not None else socket_timeout
        )
        self._reader_options: dict[str, Any] = {
            "protocolError": exceptions.InvalidResponse,
            "replyError": BaseParser.parse_error,
            "errors": encoding_errors,
        }
        if decode_responses:
            self._reader_options["encoding"] = encoding
        self._keepalive_options = keepalive_options
        self._max = max_connections
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._opened = 0  # open, opening or in use: what counts against `_max`
        # Commands waiting for a connection: each future gets one, or None to open one.
        self._waiting: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._is_closed = False

    @classmethod
    def beside(cls, client: Any, *, max_connections: int = MAX_CONNECTIONS) -> LeanRedis:
        """A lean client that connects as redis-py `client` does (its pool's settings)."""
        pool = client.connection_pool
        # A connection object, never connected: redis-py's own reading of the URL and
        # options (defaults, the TLS context from the URL's ssl_* query).
        conn = pool.connection_class(**pool.connection_kwargs)
        if conn.credential_provider is not None:
            raise ValueError("a lean Redis client takes a username and password, not a provider")
        where: dict[str, Any] = (
            {"path": conn.path}
            if isinstance(conn, UnixDomainSocketConnection)
            else {
                "host": conn.host,
                "port": conn.port,
                "keepalive_options": dict(conn.socket_keepalive_options)
                if conn.socket_keepalive
                else None,
            }
        )
        if isinstance(conn, SSLConnection):
            where["ssl_context"] = conn.ssl_context.get()
        encoder = conn.encoder
        return cls(
            **where,
            db=int(conn.db),
            username=conn.username,
            password=conn.password,
            socket_timeout=conn.socket_timeout,
            socket_connect_timeout=conn.socket_connect_timeout,
            decode_responses=encoder.decode_responses,
            encoding=encoder.encoding,
            encoding_errors=encoder.encoding_errors,
            max_connections=max_connections,
        )

    def register_script(self, lua: str) -> LeanScript:
        """`lua` as a script run by its SHA1, as redis-py's `register_script`."""
        return LeanScript(self, lua)

    async def execute_command(self, *command: Arg) -> Any:
        """Send `command`, return its reply; raise its error reply as redis-py would."""
        conn = await self._take()
        try:
            reply = await conn.ask(command, self._timeout_s)
        except BaseException:
            # Timed out, failed or cancelled before the reply: that reply may still come.
            self._drop(conn)
            raise
        if isinstance(reply, Exception):  # an error reply, mapped by redis-py's parser
            reply = _unauthenticated_as_refusal(reply)
            if isinstance(reply, exceptions.ConnectionError):
                self._drop(conn)  # LOADING, too many clients: redis-py drops it too
            else:
                self._give_back(conn)
            raise reply
        self._give_back(conn)
        return reply

    async def _take(self) -> _Connection:
        """An idle connection, a new one, or, at `_max`, the next one given back."""
        if self._is_closed:
            raise exceptions.ConnectionError("the lean Redis client is closed")
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed and conn.loop is loop:
                return conn
            self._drop(conn, waking=False)
        if self._opened >= self._max:
            given = await self._wait_for_turn()
            if given is not None:
                return given
            # None: a connection was dropped, and its place kept for this command.
        else:
            self._opened += 1
        try:
            return await self._connect()
        except BaseException:
            self._opened -= 1
            self._pass_on(None)
            raise

    async def _wait_for_turn(self) -> _Connection | None:
        """The next connection given back, or None: a place kept to open one in.

        Waited for at most the command timeout, as redis-py's blocking pool waits its own:
        on a hung Redis every connection is held until its command times out, and a
        command queued behind them would then open a connection to that Redis and wait
        out a timeout of its own, wave after wave, past the cool-down its users started.
        """
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # given one, then cancelled
                given = waiter.result()
                if given is None:
                    self._opened -= 1
                self._pass_on(given)
            if isinstance(exc, TimeoutError):
                raise exceptions.ConnectionError(_NO_CONNECTION) from None
            raise

    def _give_back(self, conn: _Connection) -> None:
        if conn.is_closed or self._is_closed:
            self._drop(conn)
        else:
            self._pass_on(conn)

    def _pass_on(self, conn: _Connection | None) -> None:
        """Hand `conn` (or, None, leave to open one) to the first command waiting."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                if conn is None:
                    self._opened += 1  # the place, kept for the waiter to open one in
                waiter.set_result(conn)
                return
        if conn is not None:
            self._idle.append(conn)

    def _drop(self, conn: _Connection, *, waking: bool = True) -> None:
        conn.close()
        if conn in self._all:
            self._all.discard(conn)
            self._opened -= 1
            if waking:
                self._pass_on(None)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(hiredis.Reader(**self._reader_options), self._where)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: conn, self._path)
                else:
                    await loop.create_connection(
                        lambda: conn, self._host, self._port, ssl=self._ssl
                    )
                    conn.keep_alive(self._keepalive_options)
        except TimeoutError:
            conn.close()
            raise exceptions.TimeoutError("Timeout connecting to server") from None
        except OSError as exc:
            conn.close()
            raise exceptions.ConnectionError(_connect_error(self._where, exc)) from exc
        except BaseException:
            conn.close()
            raise
        if self._is_closed:  # closed while this one opened
            conn.close()
            raise exceptions.ConnectionError("the lean Redis client is closed")
        self._all.add(conn)
        try:
            await self._hello(conn)
        except BaseException:
            self._all.discard(conn)
            conn.close()
            raise
        return conn

    async def _hello(self, conn: _Connection) -> None:
        """Authenticate and select the db, in one round trip."""
        commands: list[tuple[Arg, ...]] = []
        if self._auth:
            commands.append(("AUTH", *self._auth))
        if self._db:
            commands.append(("SELECT", self._db))
        if not commands:
            return
        answers = await self._answers(conn, commands)
        if len(self._auth) == 2 and isinstance(
            answers[0], exceptions.AuthenticationWrongNumberOfArgsError
        ):
            # A Redis before 6.0 knows no users: as redis-py, the password alone.
            commands[0] = ("AUTH", self._auth[1])
            answers = await self._answers(conn, commands)
        for answer in answers:
            # WRONGPASS and NOAUTH are AuthenticationErrors, ConnectionErrors rather than
            # ResponseErrors: missed, the connection would serve as the default user.
            # A password sent to a Redis without one is no error: redis-py's HELLO takes it.
            if isinstance(answer, Exception) and not str(answer).startswith(_NO_PASSWORD_SET):
                raise answer
        if self._db and answers[-1] not in ("OK", b"OK"):
            raise exceptions.ConnectionError("Invalid Database")

    async def _answers(self, conn: _Connection, commands: list[tuple[Arg, ...]]) -> list[Any]:
        """The replies to `commands`, sent at once (error replies returned, not raised)."""
        replies = asyncio.gather(*conn.send(commands))
        try:
            async with asyncio.timeout(self._timeout_s):
                return await replies
        except TimeoutError:
            raise exceptions.TimeoutError(f"Timeout reading from {self._where}") from None

    async def aclose(self) -> None:
        """Close every connection, idle or in use; later commands fail."""
        self._is_closed = True
        conns = list(self._all)
        self._all.clear()
        self._idle.clear()
        self._opened = 0
        for conn in conns:
            conn.close()
        loop = asyncio.get_running_loop()  # another loop's would never tell this one
        await asyncio.gather(*(conn.lost for conn in conns if conn.loop is loop))
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(exceptions.ConnectionError("the lean Redis client is closed"))


class LeanScript:
    """A Lua script run by EVALSHA; loaded and run again once if Redis lacks it (after
    a restart or SCRIPT FLUSH), as redis-py's `Script`."""

    def __init__(self, client: LeanRedis, lua: str) -> None:
        self._client = client
        self._lua = lua
        self.sha = hashlib.sha1(lua.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self._client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except exceptions.NoScriptError:
            self.sha = await self._client.execute_command("SCRIPT", "LOAD", self._lua)
            return await self._client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


def _unauthenticated_as_refusal(reply: Exception) -> Exception:
    """`reply`, or NOAUTH's AuthenticationError for Redis's refusal of a command too long
    to take from a connection that has not authenticated (over 10 arguments, as the
    scripts send, or one over 16 KiB), which it closes after: a password required under a
    gateway that sends none. redis-py's connections meet it as a refused handshake; taken
    for a refusal for good, it would have usage rows given up at once."""
    if isinstance(reply, exceptions.ResponseError) and str(reply).startswith(_UNAUTHENTICATED):
        refusal = exceptions.AuthenticationError(f"Authentication required ({reply}).")
        refusal.__cause__ = reply
        return refusal
    return reply


def _connect_error(where: str, exc: OSError) -> str:
    """As redis-py words a failed connect."""
    if not exc.args:
        return f"Error connecting to {where}."
    if len(exc.args) == 1:
        return f"Error {exc.args[0]} connecting to {where}."
    return f"Error {exc.args[0]} connecting to {where}. {exc.args[1]}."
