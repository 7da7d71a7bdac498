"""HTTP/1.1 to one upstream: a keep-alive connection pool on asyncio, parsed by httptools.

Written here rather than taken from aiohttp's client because, per request, aiohttp's
client spent about 85 µs of CPU on this machine (building its request and response
objects, timers, cookie and redirect handling the gateway never uses) against about
17 µs for this, measured against the same local server; in the gateway a cache miss
went from 578 to 513 µs. Parsing, the part that must be right, is llhttp's (the C parser
behind Node.js) through httptools; what is left is the pool, writing one request, and
handing the body over as it arrives.

Only what an OpenAI-compatible API needs: POST and GET with a body in one write,
responses with Content-Length, chunked or read-until-close bodies (decoded from gzip or
deflate when a server compresses though asked not to, as a content or a transfer coding:
`codings`), keep-alive reuse,
TLS (https), a connect timeout, and an HTTP forward proxy: an http upstream's requests
go to it in absolute form (`POST http://host/v1/... HTTP/1.1`), an https one's through a
CONNECT tunnel, opened with each new connection (`_tunnel`). The caller bounds the
whole exchange: with its own timeout around it, or by the deadline it hands `request`,
which bounds the body's read too (`ExchangeTimeout`). Addresses are tried in turn,
without Happy Eyeballs: uvloop's `create_connection` does not take
`happy_eyeballs_delay`, so when a host's first address silently drops packets the
connect fails after `upstreams[].connect_timeout_s`, all addresses counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import httptools

from service.hosts import ascii_host
from service.upstream.codings import BodyDecoder, decoder_for
from service.upstream.headers import retry_after_s

if TYPE_CHECKING:
    from service.upstream.proxy import Proxy

_T = TypeVar("_T")

# A body the consumer has not read yet beyond this pauses reading from the socket.
_HIGH_WATER_BYTES = 256 * 1024
# What each piece of body held costs beside its bytes (a `bytes` object and its list entry),
# counted toward the high-water mark: a body sent in tiny chunks is that many pieces.
_PIECE_OVERHEAD_BYTES = 48
_MAX_HEADER_BYTES = 64 * 1024
# What a response released with `release_at_end` may still send before its end.
_MAX_TRAILING_BODY_BYTES = 64 * 1024
# A proxy's answer to CONNECT is a status line and a few headers.
_MAX_PROXY_HEAD_BYTES = 16 * 1024
# The headers of a proxy's refusal of CONNECT that are kept: the wait it asks for.
_WAIT_HEADERS = frozenset({"retry-after", "retry-after-ms"})
# Where a head ends: the empty line after its last, each line ending in CRLF or a bare LF
# (RFC 9112 §2.2), as `_response_parser` reads them.
_HEAD_END = re.compile(rb"\n\r?\n")
# An obs-fold (RFC 9112 §5.2): a line end followed by blanks, continuing the line before.
_OBS_FOLD = re.compile(rb"\r?\n[ \t]+")
# A structured field's quoted string, its escapes included (RFC 8941 §3.3.3): the commas
# and semicolons in it separate nothing.
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# A reused connection the server closes unanswered within this long of a request going
# out crossed its idle timeout: the close was on its way (a round trip at most) before the
# request arrived. One closed later was held: the server had the request, and may have
# worked on it, so it is not sent again behind the caller's attempts.
_IDLE_CLOSE_RACE_S = 1.0


class HttpError(Exception):
    """The exchange failed below HTTP semantics: connect, reset, malformed, cut short."""


class ExchangeTimeout(TimeoutError):
    """The exchange was not over by the deadline `HttpPool.request` was given: no
    connection in time, or the answer's head or the rest of its body did not come.

    Once the deadline's timer has run, the exchange ends so whatever else that loop turn
    brought (the answer, its connection's failure), as the cancel of an `asyncio.timeout`
    overrides the wake-up it lands on: the same exchange times out on either loop, in
    whichever order it runs the turn's timers and reads.
    """


class _FramedApart(Exception):
    """Raised in llhttp's head callback for a `Transfer-Encoding` other than `chunked`
    (rare): llhttp frames one folded over lines (`gzip,<fold> chunked`) as its value does
    not say, so such a head is parsed once more, unfolded, before any of its body is read
    (`_Connection._parse_again`). `pieces`: the response's bytes before those just fed."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self.pieces = pieces


class NotHttp(HttpError):
    """The answer is not HTTP/1.1 as a client may read it: another protocol (an HTTP/2-only
    server's frames, a switch of protocols) or HTTP broken past what RFC 9112 lets a
    client accept. llhttp's reason is in the message."""


def wrote_nothing(cancel: BaseException) -> bool:
    """Whether `cancel` (a caller's `asyncio.CancelledError`) cut `HttpPool.request` before
    any byte of the request was written: as it waited for a connection, or made one (a
    TCP connect, a TLS handshake, a proxy's tunnel), none of which is the request."""
    return getattr(cancel, "wrote_nothing", False) is True


class ConnectFailed(HttpError):
    """No connection could be made (refused, unreachable, DNS, TLS handshake)."""


class ProxyFailed(ConnectFailed):
    """The forward proxy did not open the tunnel: it dropped the connection, answered
    CONNECT with something that is not HTTP, or did not answer in time.

    `proxy` is its `HOST:PORT`, never its credentials; `problem` says what it did.
    """

    def __init__(self, problem: str, *, proxy: str, status: int | None = None) -> None:
        super().__init__(f"the proxy {proxy} {problem}")
        self.problem = problem
        self.proxy = proxy
        self.status = status


class ProxyRefused(ProxyFailed):
    """The forward proxy answered CONNECT with a status other than 2xx (`status`): 407
    for missing or wrong credentials, 403 for a destination it does not allow, 502/503
    when it cannot reach the upstream. Or it answered a request sent to it in absolute
    form (`refused="the request"`) with an error of its own (`_is_proxys_own`).

    `retry_after_s`: the wait its `Retry-After` (or `retry-after-ms`) asked for, as an
    overloaded proxy's 503 or 429 names one; None without.
    """

    def __init__(
        self,
        status: int,
        *,
        proxy: str,
        refused: str = "the tunnel",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"refused {refused} (HTTP {status})", proxy=proxy, status=status)
        self.retry_after_s = retry_after_s


class ProxyTimeout(ProxyFailed, TimeoutError):
    """The forward proxy did not answer CONNECT within the connect timeout: a timeout,
    as a direct connect's is, that says whose."""


class BodyTooLarge(Exception):
    """A body longer than its reader takes (`Response.read(max_bytes=...)`)."""


class _Slots:
    """At most `count` holders at a time; the others wait in turn.

    `asyncio.Semaphore`'s work without its cost on every request: its `acquire` is a
    coroutine that asks `locked()`, which runs a generator over the waiters, and its
    `release` calls `_wake_up_next`. Here a free slot is one test, and a slot given back
    while calls wait goes straight to the first of them. The pool takes a free slot and
    gives one back to no waiter itself (`_free`), without a call.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, count: int) -> None:
        self._free = count
        # Each waiter's future, first in line first; one cancelled before its turn is
        # skipped when a slot is handed over, so none is held while a slot is free.
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self) -> None:
        """Wait in line for a slot."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot as it was cancelled: the next in line has it
            else:
                with contextlib.suppress(ValueError):  # skipped by a hand-over already
                    self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        """Give a slot back: to the first call still waiting, else to the free ones."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: one request at a time, its response parsed as it comes."""

    def __init__(self) -> None:
        # Made only inside the loop (by `create_connection` or the pool): kept, so that
        # each response's futures come from it without asking for the running loop,
        # which on Python 3.11 is a `getpid` system call every time.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Under a TLS `transport`, the TCP one it writes its records to: what the socket
        # has not taken yet waits in its buffer, which `transport`'s own size leaves out.
        self.tcp_transport: asyncio.Transport | None = None
        self.is_closed = False
        self.is_paused = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._response: Response | None = None

    # asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or self._parser is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        parsed = response.parsed
        size = len(data)
        response.received_bytes += size
        if response.held_reason is not None:  # a head repeating its length, still coming
            self._parse_again(response, data, parsed)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response.fail(NotHttp("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if response.head_pieces is not None and "Content-Length" in str(exc):
                # Perhaps one length sent twice, which llhttp refuses: merged, if so, once
                # the head is all in (`_parse_again`).
                response.held_reason = str(exc)
            elif isinstance(exc.__context__, _FramedApart):
                response.head_pieces = exc.__context__.pieces
            else:
                response.fail(_parse_failure(exc))
                return
        else:
            pieces = response.head_pieces
            if pieces is not None:  # the head is not all in: kept, should it be parsed again
                pieces.append(data)
                if response.received_bytes > _MAX_HEADER_BYTES:
                    # All of it heads, interim ones (`100 Continue`) among them: each parsed
                    # is progress, so an endless run of them was kept here without bound.
                    response.fail(HttpError("response headers too large"))
                    return
            if response.parsed != parsed and response._end_timer is None:
                # `fed` written out for most reads: progress, and no end awaited.
                response._unparsed_bytes = 0
            else:
                response.fed(size, made_progress=response.parsed != parsed)
            return
        # Not in the `except`: a callback's error in the parse again would be chained to
        # the first parse's error there, not to its own (`_parse_failure` reads it).
        self._parse_again(response, data, parsed)

    def _parse_again(self, response: Response, data: bytes, parsed: int) -> None:
        """Parse the response again from its start, `data` the last of it received, once
        its head is all in: unfolded (`_unfolded`), and with a `held_reason` its
        `Content-Length` values merged into one (`_one_content_length`); refuse it as
        llhttp did (`held_reason`) if they are not one number repeated and no fold was
        unfolded."""
        pieces = response.head_pieces
        assert pieces is not None
        pieces.append(data)
        received = b"".join(pieces)
        found = _final_head(received)
        if found is None:  # the rest of the head is still to come
            if len(received) > _MAX_HEADER_BYTES:
                response.fail(HttpError("response headers too large"))
            return
        start, end = found
        folded = received[start:end]
        head = _unfolded(folded)
        if response.held_reason is not None:
            merged = _one_content_length(head)
            if merged is None and head == folded:
                response.fail(NotHttp(f"malformed HTTP response: {response.held_reason}"))
                return
            # No repeat to merge, but a fold llhttp refused the length for (a blank line
            # folded onto it, `Content-Length: 42<fold>`): the unfolded head is parsed as
            # it stands, and refused then if its length is no length.
            head = merged or head
        response.restart()
        self._parser = _response_parser(response)
        rewritten = received[:start] + head + received[end:]
        try:
            self._parser.feed_data(rewritten)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            response.fail(_parse_failure(exc))
        else:
            response.fed(len(rewritten), made_progress=response.parsed != parsed)

    def eof_received(self) -> None:
        # The transport closes itself after this, but calls connection_lost only later:
        # not reusable from now on.
        self.is_closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        response = self._response
        if response is not None:
            response.connection_lost(exc)

    # what the pool and the response call ---------------------------------------------

    def send(self, head: bytes, body: bytes, response: Response) -> None:
        """Write one request; `response` receives what comes back."""
        assert self.transport is not None
        self._response = response
        self._parser = _response_parser(response)
        self.transport.writelines((head, body))  # one call, no copy of a long body

    @property
    def has_sent_all(self) -> bool:
        """Whether every byte written is in the socket, none left in the transport's buffer."""
        if self.transport is None or self.transport.get_write_buffer_size() > 0:
            return False
        return self.tcp_transport is None or self.tcp_transport.get_write_buffer_size() == 0

    def pause(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.pause_reading()
            self.is_paused = True

    def resume(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.resume_reading()
            self.is_paused = False

    def close(self) -> None:
        """Close the connection, dropping what of a request it has not sent yet."""
        self.is_closed = True
        if self.transport is None:
            return
        if self.has_sent_all:
            self.transport.close()
        else:
            # A close would go on writing the request nobody waits for (a cut call's
            # prompt, which an upstream reading it whole bills) and hold the socket until
            # the upstream read it all.
            self.transport.abort()


# Each header name as `Response.headers` keys it, by the bytes llhttp hands over: a
# provider sends the same twenty-odd names with every answer, and one lookup costs less
# than decoding, lowering and checking each again (about 0.2 µs a header), kept with the
# name's length, which counts against the head's bound. Bounded in entries and in a
# name's length, so that an upstream's made-up names cannot grow it.
_header_keys: dict[bytes, tuple[str, int]] = {}
_MAX_HEADER_KEYS = 512
_MAX_KEPT_NAME_BYTES = 64


def _header_key(name: bytes) -> str:
    """`name` as `Response.headers` keys it: lower case, kept for the next answer."""
    key = name.decode("latin-1").lower()
    if key[-1:] in (" ", "\t"):  # sliced, not stripped: no call for the usual names
        # llhttp's lenient mode takes `Content-Length : 5` as the length; read without
        # the blank, as it does, so that the body's framing here is the one it parses.
        key = key.rstrip(" \t")
    size = len(name)
    if len(_header_keys) < _MAX_HEADER_KEYS and size <= _MAX_KEPT_NAME_BYTES:
        _header_keys[name] = (key, size)
    return key


def _parse_failure(exc: httptools.HttpParserError | httptools.HttpParserUpgrade) -> HttpError:
    """What llhttp's refusal of a response says: the gateway's own error when one of
    `Response`'s callbacks raised it (a head too large), which httptools hands on only
    as the context of its own (`on_header_field callback error`)."""
    cause = exc.__context__
    if isinstance(cause, HttpError):
        return cause
    return NotHttp(f"malformed HTTP response: {exc}")


def _response_parser(response: Response | _Tunnel) -> httptools.HttpResponseParser:
    """llhttp's parser for one response (or a proxy's answer to CONNECT), as tolerant as
    the aiohttp client it replaced.

    Strict llhttp refuses what RFC 9112 has a client accept: a folded header line
    (section 5.2: a user agent MUST read the fold as a space), bare LF line ends (section
    2.2: MAY) and blanks between a chunk's size and its extension (section 7.1.1, `BWS`).
    Refused, each was an attempt the server answered (and billed) reported as a dropped
    connection and sent again. aiohttp's response parser enables these three leniencies
    outside its debug mode (`_http_parser.pyx`); nothing downstream parses these bytes
    again, so no request smuggling comes of them. A `Content-Length` beside
    `Transfer-Encoding` is read as RFC 9112 §6.3 frames it, by the latter, as curl's and
    Go's clients read it; the connection then goes (`Response._read_transfer_codings`).
    """
    parser = httptools.HttpResponseParser(response)
    parser.set_dangerous_leniencies(
        lenient_headers=True,
        lenient_chunked_length=True,
        lenient_optional_cr_before_lf=True,
        lenient_spaces_after_chunk_size=True,
    )
    return parser


# A `Content-Length` line of a head, the line end included.
_LENGTH_LINE = re.compile(rb"^content-length[ \t]*:([^\n]*)\n", re.IGNORECASE | re.MULTILINE)


def _final_head(received: bytes | bytearray) -> tuple[int, int] | None:
    """Where the final head starts and ends in `received` (an answer's bytes from its
    start), past the interim (1xx) heads before it, which a client reads and drops (RFC
    9110 §15.2); None while it is not all in. A 101 is final: a switch of protocols."""
    start = 0
    while (blank := _HEAD_END.search(received, start)) is not None:
        if not _is_interim(received[start : blank.end()].split(b"\n", 1)[0]):
            return start, blank.end()
        start = blank.end()
    return None


def _is_interim(status_line: bytes | bytearray) -> bool:
    """Whether a head's status line is an interim answer's (`HTTP/1.1 100 Continue`)."""
    status = status_line.split(b" ", 2)[1:2]
    return (
        status_line.startswith(b"HTTP/")
        and bool(status)
        and status[0][:1] == b"1"
        and status[0][:3] != b"101"
    )


def _unfolded(head: bytes) -> bytes:
    """`head` with each obs-fold a space, as RFC 9112 §5.2 has a user agent read it before
    the field's value: llhttp's lenient mode reads a folded value's text whole, as the
    gateway's headers hold it, but frames a folded `Transfer-Encoding` (or length) apart,
    `gzip,<fold> chunked` as not chunked."""
    return _OBS_FOLD.sub(b" ", head)


def _one_content_length(head: bytes) -> bytes | None:
    """`head` with its `Content-Length` values as one line, when there are several and
    all are the same number (`Content-Length: 42` twice, `Content-Length: 42, 42`); None
    when there is no such repeat to merge, or they differ (`42` and `43`).

    RFC 9110 §8.6 lets a recipient read a length repeated so as that one length ("this
    likely indicates that a duplicate was generated or combined by an upstream message
    processor"), as curl does; llhttp refuses it. Lengths that differ stay refused: two
    parsers could frame such an answer differently (response smuggling).
    """
    values = [
        value.strip() for line in _LENGTH_LINE.finditer(head) for value in line.group(1).split(b",")
    ]
    if len(values) < 2 or len(set(values)) != 1 or not values[0].isdigit():
        return None
    lines = iter([b"Content-Length: " + values[0] + b"\r\n"])  # the first line's place
    return _LENGTH_LINE.sub(lambda _: next(lines, b""), head)


class _Tunnel(asyncio.Protocol):
    """A connection to a forward proxy until it answers CONNECT (RFC 9110 §9.3.6).

    Writes the request on connect, then reads the answer's head, bounded, and parses it
    with llhttp. `opened` is set once the head is in: with None for a 2xx (the bytes that
    follow are the upstream's), else with the error. Reading pauses there, for the pool's
    own protocol (or TLS) to take the transport over.
    """

    def __init__(self, request: bytes, proxy: str) -> None:
        self._request = request
        self._proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_lost = False
        self._head = bytearray()
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0  # stays 0 unless a whole, well-formed head is parsed
        self._waits: dict[str, str] = {}  # the final head's Retry-After and retry-after-ms

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.opened.done():  # bytes before the pool spoke: nobody asked for them
            self._fail(ProxyFailed("sent bytes the tunnel did not ask for", proxy=self._proxy))
            return
        self._head += data
        found = _final_head(self._head)
        if found is None:  # the head is not all in yet
            if len(self._head) > _MAX_PROXY_HEAD_BYTES:
                self._fail(ProxyFailed("answered CONNECT with too long a head", proxy=self._proxy))
            return
        start, end = found
        status = self._status_of(bytes(self._head[start:end]))
        if not 100 <= status <= 599:
            self._fail(ProxyFailed("answered CONNECT with malformed HTTP", proxy=self._proxy))
        elif not 200 <= status < 300:
            wait = retry_after_s(self._waits, now_epoch_s=time.time()) if self._waits else None
            self._fail(ProxyRefused(status, proxy=self._proxy, retry_after_s=wait))
        elif len(self._head) > end:
            self._fail(ProxyFailed("sent bytes the tunnel did not ask for", proxy=self._proxy))
        else:
            assert self.transport is not None
            self.transport.pause_reading()
            self.opened.set_result(None)

    def _status_of(self, head: bytes) -> int:
        """The status of the final answer's `head` as llhttp reads it (0: not HTTP). An
        upgrade (a 101 with `Upgrade`) stops llhttp after its head is read: a status like
        any other refusal's."""
        self._status = 0
        self._waits = {}
        self._parser = _response_parser(self)
        with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._parser.feed_data(head)
        return self._status

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools: one header line
        key = name.decode("latin-1").strip().lower()
        if key in _WAIT_HEADERS:
            text = value.decode("latin-1")
            self._waits[key] = f"{self._waits[key]}, {text}" if key in self._waits else text

    def on_headers_complete(self) -> None:  # httptools: the status line and headers are in
        assert self._parser is not None
        self._status = self._parser.get_status_code()

    def eof_received(self) -> bool:
        return False  # the transport closes, and connection_lost says it

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        self._fail(ProxyFailed("closed the connection before answering CONNECT", proxy=self._proxy))

    def _fail(self, error: ProxyFailed) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class Response:
    """One response: status and headers at once, the body read whole or as it arrives.

    Call `release()` (or use `async with`) when done: a connection whose response was
    read to the end goes back to the pool; any other is closed. `release_at_end` waits
    for the end first, for a caller that knows the body is whole but for its framing.
    """

    def __init__(self, pool: HttpPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self.status = 0
        self.headers: dict[str, str] = {}
        self._header_bytes = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._is_complete = False
        self._keep_alive = True
        self._until_close = False
        self._error: HttpError | None = None
        # Set once the head is in, for a body in a content coding (`codings`): what the
        # reader gets is decoded; None (the usual case) hands the bytes over as they came.
        self._decoder: BodyDecoder | None = None
        self._head_ready: asyncio.Future[None] = connection.loop.create_future()
        self._wakeup: asyncio.Future[None] | None = None
        self._is_released = False
        self._is_informational = False
        # Heads, body pieces and ends parsed so far, and the bytes fed since the last read
        # that parsed one: httptools keeps a header or trailer to itself until it is whole.
        self.parsed = 0
        self._unparsed_bytes = 0
        self.received_bytes = 0
        self._end_timer: asyncio.TimerHandle | None = None  # set while waiting for the end
        # The deadline's timer (`HttpPool.request`'s `deadline`), cancelled on release, and
        # the error it ended the exchange with.
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.timed_out: ExchangeTimeout | None = None
        self.sent_at = 0.0  # perf_counter when the request was written
        self._answered_at: float | None = None  # and when the answer's end was read
        # The bytes received until the final head is parsed (None from then on), and why
        # llhttp refused a `Content-Length` in it: `_Connection._parse_again`.
        self.head_pieces: list[bytes] | None = []
        self.held_reason: str | None = None

    # httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._is_complete:  # a second message nobody asked for: stop parsing, close
            raise HttpError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        try:
            key, name_size = _header_keys[name]  # a name seen before: its length with it
        except KeyError:
            key, name_size = "", len(name)
        self._header_bytes += name_size + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise HttpError("response headers too large")
        key = key or _header_key(name)
        headers = self.headers
        if key in headers:
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.parsed += 1
        parser = self._connection._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:  # informational (103 Early Hints): the answer is still to come
            self._is_informational = True
            self.headers.clear()
            return
        self.status = status
        pieces, self.head_pieces = self.head_pieces, None
        self._keep_alive = bool(parser.should_keep_alive())
        headers = self.headers
        transfer = headers.get("transfer-encoding")
        if transfer is None:
            self._until_close = "content-length" not in headers
            if "content-encoding" in headers:
                self._decoder = decoder_for(headers["content-encoding"])
        elif transfer == "chunked" and "content-length" not in headers:
            if "content-encoding" in headers:
                self._decoder = decoder_for(headers["content-encoding"])
        else:  # rare: a coding besides chunked, or a length beside it
            if pieces is not None:  # not parsed again yet: a fold in it is framed apart
                raise _FramedApart(pieces)
            self._read_transfer_codings(transfer)
        if not self._head_ready.done():
            self._head_ready.set_result(None)

    def _read_transfer_codings(self, transfer: str) -> None:
        """Frame and decode a body as its `Transfer-Encoding` says, as llhttp frames it:
        chunked when that is the final coding, else read until the close (RFC 9112 §6.3);
        a coding before it (`gzip, chunked`) decoded as a content coding is.

        A `Content-Length` beside it is ignored (RFC 9112 §6.3: Transfer-Encoding
        overrides it), as curl, Go and Python's clients ignore it, but the connection is
        not reused: the server framed its answer two ways, and the next answer on the
        connection may start where its other framing ends (response smuggling)."""
        self._until_close = transfer.rpartition(",")[2].strip().lower() != "chunked"
        if "content-length" in self.headers:
            if self._until_close:  # to be read until a close a server framing by length delays
                raise NotHttp(
                    "malformed HTTP response: Content-Length beside a Transfer-Encoding not "
                    "ending in chunked"
                )
            self._keep_alive = False
        self._decoder = decoder_for(self.headers.get("content-encoding"), transfer)

    def on_body(self, body: bytes) -> None:
        self.parsed += 1
        if self._end_timer is not None:  # released: nobody reads it; only bound it
            self._buffered += len(body)
            if self._buffered > _MAX_TRAILING_BODY_BYTES:
                raise HttpError("more body after the caller was done with it")
            return
        self._chunks.append(body)
        self._buffered += len(body) + _PIECE_OVERHEAD_BYTES
        if self._buffered > _HIGH_WATER_BYTES:
            self._connection.pause()
        if self._wakeup is not None:  # a reader waits (a stream's); a short answer has none yet
            self._wake()

    def on_message_complete(self) -> None:
        self.parsed += 1
        if self._is_informational:
            self._is_informational = False
            return
        self._is_complete = True
        self._answered_at = time.perf_counter()
        if self._wakeup is not None:
            self._wake()

    # connection events ---------------------------------------------------------------

    def restart(self) -> None:
        """Forget the head parsed so far, for it to be parsed again from the start, and
        never again after that."""
        self.headers.clear()
        self._header_bytes = 0
        self._is_informational = False
        self.head_pieces = None
        self.held_reason = None

    def fed(self, size: int, *, made_progress: bool) -> None:
        """`size` bytes were parsed: fail once too many held no head, body or end, and
        hand the connection back if this was the end `release_at_end` waits for."""
        if made_progress:
            self._unparsed_bytes = 0
            if self._end_timer is not None and self._is_complete:
                self.release()  # the end that `release_at_end` waited for
            return
        self._unparsed_bytes += size
        if self._unparsed_bytes > _MAX_HEADER_BYTES:
            self.fail(HttpError("response headers too large"))

    def fail(self, error: HttpError) -> None:
        if self._error is None and not self._is_complete:
            self._error = error
        if not self._head_ready.done():
            self._head_ready.set_exception(error)
        self._connection.close()
        self._wake()
        if self._end_timer is not None:
            self.release()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._is_complete:
            return
        if self._head_ready.done() and self._until_close and exc is None:
            # A body without a length ends when the peer closes; a reset cuts it short.
            self._is_complete = True
            self._keep_alive = False
            self._wake()
            return
        self.fail(HttpError("the upstream closed the connection mid-response"))

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _time_out(self) -> None:
        """The deadline passed: the exchange ends with `ExchangeTimeout`, what it waits for
        failed or woken (it then reads `timed_out`). The connection is left to `release`,
        which the caller's exit calls: it closes one whose answer is not whole."""
        self._deadline_timer = None
        error = self.timed_out = ExchangeTimeout(
            "the upstream's answer did not come by the deadline"
        )
        if not self._head_ready.done():
            self._head_ready.set_exception(error)
        self._wake()

    # what the client calls -------------------------------------------------------------

    async def next_chunk(self) -> bytes | None:
        """The body bytes that arrived since the last call, decoded from their content
        coding (in pieces of at most `codings.DECODED_PIECE_BYTES`); None at the end.

        Raises:
            UndecodableBody: the body is in a coding the gateway cannot decode.
        """
        if self._decoder is not None:
            return await self._next_decoded(self._decoder)
        # No coroutine of its own while bytes are buffered: a stream's burst is read so.
        while not self._chunks:
            if not await self._arrival():
                return None
        return self._take_chunks()

    async def _next_decoded(self, decoder: BodyDecoder) -> bytes | None:
        """`next_chunk` for a body in a content coding: decoded as it arrives."""
        while True:
            if decoder.has_more:
                # More decoded from bytes already here, with no wait on the socket: let the
                # other calls, and every timer, run first. A stream of 1 MB decoding to a GiB
                # of blank lines would otherwise hold the event loop for seconds.
                await asyncio.sleep(0)
                if self.timed_out is not None:
                    raise self.timed_out
                data = decoder.decode(b"")
            else:
                while not self._chunks:
                    if not await self._arrival():
                        return None
                data = decoder.decode(self._take_chunks())
            if data:  # else a header, or a piece that decoded to nothing yet
                return data

    async def _arrival(self) -> bool:
        """Wait for more of the body: False once it is all in, with none left to read.

        Raises:
            HttpError: the exchange failed.
        """
        if self._error is not None:
            raise self._error
        if self._is_complete:
            return False
        self._wakeup = self._connection.loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None
        if self.timed_out is not None:  # whatever else woke it in the same turn
            raise self.timed_out
        return True

    def _take_chunks(self) -> bytes:
        """The body bytes buffered so far, handed over; reading resumes if it paused for them."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > _HIGH_WATER_BYTES:
            self._connection.resume()
        self._buffered = 0
        return data

    async def read(self, *, max_bytes: int | None = None) -> bytes:
        """The whole body, decoded as `next_chunk`; `BodyTooLarge` once it passes
        `max_bytes` (decoded: a compressed body is held to its decoded size)."""
        if self._is_complete and self._error is None and self._decoder is None:
            # All of it is here already (a short answer comes with its head): take it
            # without `next_chunk`'s coroutines.
            body = self._take_chunks()
            if max_bytes is not None and len(body) > max_bytes:
                raise BodyTooLarge(f"the answer is larger than {max_bytes} bytes")
            return body
        parts = []
        size = 0
        while (data := await self.next_chunk()) is not None:
            size += len(data)
            if max_bytes is not None and size > max_bytes:
                raise BodyTooLarge(f"the answer is larger than {max_bytes} bytes")
            parts.append(data)
        return b"".join(parts)

    @property
    def waited_s(self) -> float:
        """Seconds from the request's writing to the answer's end (to now while it is
        still coming): the wait on the server, without the caller's own work before or
        after."""
        end = self._answered_at if self._answered_at is not None else time.perf_counter()
        return end - self.sent_at

    @property
    def is_unanswered(self) -> bool:
        """Whether not one byte of the response arrived."""
        return self.received_bytes == 0

    @property
    def is_complete(self) -> bool:
        """Whether the whole response has arrived."""
        return self._is_complete

    def release(self) -> None:
        """Done with the response: its connection is reused if it was read to the end."""
        if self._is_released:
            return
        self._is_released = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._end_timer is not None:
            self._end_timer.cancel()
        reusable = self._is_complete and self._keep_alive and self._error is None
        self._pool._release(self._connection, reusable=reusable)

    def release_at_end(self, *, within_s: float) -> None:
        """Done with a body that is whole but for its end (an SSE stream after `[DONE]`,
        the chunked encoding's last chunk still in flight).

        The connection goes back to the pool when the end arrives within `within_s`, and
        is closed otherwise; it keeps its slot until then. Closing it at once instead
        would cost the next call a new connection (a TLS handshake to a real provider)
        whenever a server writes its last chunk separately from its last event.
        """
        if self._is_released or self._end_timer is not None:
            return
        reusable_at_end = self._keep_alive and not self._until_close and self._error is None
        if self._is_complete or not reusable_at_end:
            self.release()  # nothing to wait for, or no end that would make it reusable
            return
        self._chunks.clear()
        self._buffered = 0
        self._end_timer = self._connection.loop.call_later(within_s, self.release)
        if self._connection.is_paused:
            self._connection.resume()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class HttpPool:
    """Keep-alive connections to one origin (scheme, host, port), at most `max_connections`."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        """`headers`: sent with every request, before its own; `proxy`: the forward proxy
        every request goes through (`service.upstream.proxy.choose_proxy`)."""
        parts = urlsplit(base_url)
        self._is_tls = parts.scheme == "https"
        hostname = parts.hostname or ""
        self._host = ascii_host(hostname) or hostname
        default_port = 443 if self._is_tls else 80
        self._port = parts.port or default_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if self._port == default_port else f"{host}:{self._port}"
        self.path_prefix = parts.path.rstrip("/")
        self.query = f"?{parts.query}" if parts.query else ""  # after every path
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._ssl = ssl.create_default_context() if self._is_tls else None
        # The name TLS sends (SNI) and checks the certificate for: without the trailing dot
        # of a fully qualified `api.example.com.` (which spares a resolver its search
        # domains), as RFC 6066 §3 writes SNI and curl checks it; no certificate names one.
        self._tls_name = self._host.rstrip(".")
        self._proxy = proxy
        self._headers = dict(headers or {})
        # An http upstream's requests go to the proxy in absolute form (RFC 9112 §3.2.2),
        # as curl's, requests' and httpx's do: forward proxies refuse CONNECT to ports other
        # than 443 (squid's default `http_access deny CONNECT !SSL_ports`). Its connections
        # are this pool's, to this one origin through this one proxy, so its limits and
        # keep-alive stay the upstream's and no connection carries two upstreams' requests.
        self._forwards_to = proxy if proxy is not None and not self._is_tls else None
        self._origin = ""  # before each request's path: the absolute form's scheme and host
        if self._forwards_to is not None:
            self._origin = f"http://{self.host_header}"
            if self._forwards_to.authorization is not None:
                self._headers["Proxy-Authorization"] = self._forwards_to.authorization
        # Checked and written out once rather than for every request; None when one is
        # refused, as every request carrying it then is.
        self._header_names = frozenset(self._headers)  # `isdisjoint` in one call a request
        self._header_lines: str | None
        try:
            self._header_lines = _header_lines(self._headers)
        except ValueError:
            self._header_lines = None
        # Each request head's start (`_head_start`), by method and path.
        self._head_starts: dict[tuple[str, str], bytes] = {}
        self._slots = _Slots(max_connections)
        self._idle: list[_Connection] = []  # oldest first: released in this order
        self._busy: set[_Connection] = set()
        self._is_closed = False
        # Closes idle connections past keep-alive, so a quiet pool holds no sockets.
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def checked_out(self) -> int:
        """Connections carrying a request now."""
        return len(self._busy)

    @property
    def open_connections(self) -> int:
        """Connections checked out or idle in the pool."""
        return len(self._busy) + sum(1 for c in self._idle if not c.is_closed)

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        on_sent: Callable[[], None] | None = None,
        deadline: float | None = None,
    ) -> Response:
        """Send one request and return once the response's status and headers are in.

        `on_sent` is called once the server surely has the whole request: when its status
        and headers arrive, or when the wait for them is cut (cancelled, timed out) after
        every byte of the request was written to the socket. A request cut while waiting
        for a connection, or still in the transport's buffer, is not sent.

        `deadline` (the running loop's time, `loop.time()`) bounds the whole exchange, the
        read of the response's body included, up to its `release`: one timer, where an
        `asyncio.timeout` around the exchange costs each request a dozen Python calls.

        Raises:
            ConnectFailed: no connection could be made.
            HttpError: the connection failed or the answer was not HTTP.
            ExchangeTimeout: the deadline passed (then, too, from the body's read).
        """
        checked = self._header_lines
        if checked is None or (headers and not self._header_names.isdisjoint(headers)):
            # A request's header of a pool header's name takes its value, in its place.
            merged = {**self._headers, **headers}
            target = self._origin + self.path_prefix + path + self.query
            head = _head(method, target, self.host_header, merged, len(body))
        else:
            # `_head` written out: its request line and the pool's headers made once per
            # method and path (the client's few), then the request's own lines and length.
            try:
                start = self._head_starts[method, path]
            except KeyError:
                start = self._head_start(method, path, checked)
            lines = _header_lines(headers).encode() if headers else b""
            head = b"%s%sContent-Length: %d\r\n\r\n" % (start, lines, len(body))
        may_reuse = True
        while True:
            slots = self._slots
            try:
                if slots._free > 0:  # `try_take` written out: a slot is free on most calls
                    slots._free -= 1
                else:
                    await _by(deadline, slots.take())
            except asyncio.CancelledError as cancel:
                vars(cancel)["wrote_nothing"] = may_reuse  # else written on a closed one
                raise
            try:
                idle = self._idle_connection() if may_reuse else None
                is_reused = idle is not None
                connection = idle or await self._connect_by(deadline)
            except BaseException as exc:
                self._slots.give()
                if isinstance(exc, asyncio.CancelledError):
                    vars(exc)["wrote_nothing"] = may_reuse
                raise
            self._busy.add(connection)
            response = Response(self, connection)
            if deadline is not None:
                response._deadline_timer = connection.loop.call_at(deadline, response._time_out)
            try:
                connection.send(head, body, response)
                response.sent_at = time.perf_counter()
                await response._head_ready  # the future itself: no coroutine around it
                if response.timed_out is not None:  # the head came in the deadline's turn
                    raise response.timed_out
            except BaseException as exc:
                timed_out = response.timed_out
                if isinstance(exc, HttpError) and timed_out is None:
                    response.release()
                    if (
                        is_reused
                        and response.is_unanswered
                        and response.waited_s < _IDLE_CLOSE_RACE_S
                    ):
                        # The server closed the idle connection as the request went out
                        # (its keep-alive timeout): it never answered, so send it on a new one.
                        may_reuse = False
                        continue
                    raise
                if on_sent is not None and connection.has_sent_all:  # before release closes it
                    on_sent()
                response.release()
                if timed_out is not None and isinstance(exc, HttpError):
                    raise timed_out from exc  # it failed in the deadline's turn: a timeout
                raise
            if (
                response.status >= 400
                and self._forwards_to is not None
                and _is_proxys_own(response)
            ):
                # The proxy's own refusal, as of a tunnel: not the upstream's answer.
                response.release()
                raise ProxyRefused(
                    response.status,
                    proxy=self._forwards_to.address,
                    refused="the request",
                    retry_after_s=retry_after_s(response.headers, now_epoch_s=time.time()),
                )
            if on_sent is not None:
                on_sent()
            return response

    def _head_start(self, method: str, path: str, checked: str) -> bytes:
        """A request head's request line, `Host` and the pool's own header lines
        (`checked`), kept for the next request of `method` to `path` (the client's own
        paths, never a caller's: a handful)."""
        target = self._origin + self.path_prefix + path + self.query
        start = f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n{checked}".encode()
        self._head_starts[method, path] = start
        return start

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect_by(self, deadline: float | None) -> _Connection:
        """A new connection, made by `deadline` (loop time) when there is one."""
        return await _by(deadline, self._connect())

    async def _connect(self) -> _Connection:
        if self._forwards_to is not None:
            return await self._connect_to_proxy(self._forwards_to)
        if self._proxy is not None:
            return await self._tunnel(self._proxy)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                tcp, connection = await loop.create_connection(_Connection, self._host, self._port)
                if self._ssl is not None:
                    await self._secure(tcp, connection)
        except TimeoutError:
            raise
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (SSLError)
            raise ConnectFailed(f"cannot connect: {exc}") from exc
        return connection  # asyncio and uvloop set TCP_NODELAY on their own

    async def _secure(self, tcp: asyncio.Transport, connection: _Connection) -> None:
        """TLS with the upstream over `tcp` (its host name for SNI and the certificate
        check), `connection` then speaking through it. Started here rather than by
        `create_connection(ssl=...)`, which leaves no hold of `tcp` (`tcp_transport`).

        Raises:
            OSError: the handshake failed (`ssl.SSLError`), or the connection closed in it.
        """
        assert self._ssl is not None
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(tcp, connection, self._ssl, server_hostname=self._tls_name)
        if tls is None:
            raise ConnectionResetError("the connection closed during the TLS handshake")
        connection.connection_made(tls)
        connection.tcp_transport = tcp

    async def _connect_to_proxy(self, proxy: Proxy) -> _Connection:
        """A connection to `proxy` itself, for requests in absolute form, within the
        connect timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(_Connection, proxy.host, proxy.port)
        except TimeoutError as exc:
            raise ProxyTimeout("was not reached in time", proxy=proxy.address) from exc
        except OSError as exc:
            raise ProxyFailed(f"cannot be reached: {exc}", proxy=proxy.address) from exc
        return connection

    async def _tunnel(self, proxy: Proxy) -> _Connection:
        """A connection to an https upstream through `proxy`: TCP to the proxy, `CONNECT
        host:port`, its 2xx, then TLS with the upstream (its name for SNI and for the
        certificate check), all within the connect timeout. The pool's own protocol then
        takes the transport over: nothing after this differs."""
        assert self._ssl is not None  # an http upstream's requests go in absolute form
        loop = asyncio.get_running_loop()
        host = f"[{self._host}]" if ":" in self._host else self._host
        target = f"{host}:{self._port}"  # the port always, even the scheme's default
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        transport: asyncio.BaseTransport | None = None
        connected = is_answered = False
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                transport, tunnel = await loop.create_connection(
                    lambda: _Tunnel(request, proxy.address), proxy.host, proxy.port
                )
                connected = True
                await tunnel.opened
                is_answered = True
                connection = _Connection()
                tls = await loop.start_tls(
                    transport, connection, self._ssl, server_hostname=self._tls_name
                )
                if tls is None:  # the proxy closed the tunnel during the handshake
                    raise ProxyFailed("closed the tunnel during TLS", proxy=proxy.address)
                transport = tls
                connection.connection_made(tls)
                connection.tcp_transport = tunnel.transport
                if tunnel.is_lost:
                    raise ProxyFailed("closed the tunnel as it opened", proxy=proxy.address)
        except TimeoutError as exc:
            if transport is not None:
                transport.close()
            if is_answered:
                raise  # the upstream's TLS handshake, through the tunnel, took too long
            problem = "did not answer CONNECT in time" if connected else "was not reached in time"
            raise ProxyTimeout(problem, proxy=proxy.address) from exc
        except ProxyFailed:
            if transport is not None:
                transport.close()
            raise
        except OSError as exc:  # the proxy refused or unreachable, or the upstream's TLS
            if transport is not None:
                transport.close()
            if not is_answered:
                raise ProxyFailed(f"cannot be reached: {exc}", proxy=proxy.address) from exc
            raise ConnectFailed(f"cannot connect through the proxy: {exc}") from exc
        except BaseException:
            if transport is not None:
                transport.close()
            raise
        return connection

    def _release(self, connection: _Connection, *, reusable: bool) -> None:
        self._busy.discard(connection)
        connection._response = connection._parser = None  # `finished` written out
        if reusable and not connection.is_closed and not self._is_closed:
            if connection.is_paused:  # its body arrived whole but was left unread
                connection.resume()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
            if self._expiry is None:  # else its timer is already set
                self._schedule_expiry()
        else:
            connection.close()
        slots = self._slots
        if slots._waiters:
            slots.give()
        else:  # `give` written out for the usual case: no call waits for the slot
            slots._free += 1

    def _schedule_expiry(self) -> None:
        """Wake when the oldest idle connection passes keep-alive (`_idle_connection` pops
        the newest, so under light load the oldest would otherwise stay open for ever)."""
        if self._expiry is not None or not self._idle:
            return
        delay_s = self._idle[0].idle_since + self._keepalive_s - time.monotonic()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = time.monotonic()
        kept = []
        for connection in self._idle:
            if connection.is_closed or now - connection.idle_since >= self._keepalive_s:
                connection.close()
            else:
                kept.append(connection)
        self._idle = kept
        self._schedule_expiry()

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        self._is_closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run


async def _by(deadline: float | None, step: Awaitable[_T]) -> _T:
    """`step` (a wait for a free connection, or the making of one) awaited by `deadline`
    (loop time), when there is one: the exchange's own timer is armed only once it has a
    connection. Its end is an `ExchangeTimeout`; a timeout of the step's own (connecting,
    a proxy's) stays as it is."""
    if deadline is None:
        return await step
    try:
        async with asyncio.timeout_at(deadline) as bound:
            return await step
    except TimeoutError as exc:
        if bound.expired():
            raise ExchangeTimeout("no connection was free or made by the deadline") from exc
        raise


def _is_proxys_own(response: Response) -> bool:
    """Whether an error answer to a request in absolute form is the proxy's own rather
    than the upstream's it relays: a 407 (no upstream sends one), or one whose head says
    an intermediary wrote it: `X-Squid-Error` (on the error pages squid writes itself), or
    a `Proxy-Status` (RFC 9209) whose last member, the intermediary nearest the gateway,
    carries an `error`. A proxy that marks nothing is read as the upstream, as by curl.

    Nothing else tells them apart: a proxy adds `Via` to every answer it relays, and an
    http upstream's own front (nginx before vLLM) answers 502 or 504 without JSON too.
    """
    headers = response.headers
    if response.status == 407 or "x-squid-error" in headers:
        return True
    proxy_status = headers.get("proxy-status")
    if proxy_status is None:
        return False
    last = _QUOTED_STRING.sub('""', proxy_status).rsplit(",", 1)[-1]
    return any(param.split("=", 1)[0].strip() == "error" for param in last.split(";")[1:])


def _head(
    method: str,
    path: str,
    host: str,
    headers: Mapping[str, str],
    length: int,
    *,
    checked: str = "",
) -> bytes:
    """The request line and headers: `checked` (lines `_header_lines` wrote), then
    `headers`, whose lines are refused as `_header_lines` refuses them."""
    lines = _header_lines(headers) if headers else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{checked}{lines}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _header_lines(headers: Mapping[str, str]) -> str:
    """`headers` as lines, each ending in CRLF; a CR or LF in any of them, or a colon in a
    name, is refused (no injection)."""
    # Added up rather than joined from a list: a request carries one or two (its
    # `traceparent`, an idempotency key), and each `append` and the `join` are a call.
    lines = ""
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"request header {name!r} holds a line break or colon")
        lines += f"{name}: {value}\r\n"
    return lines
