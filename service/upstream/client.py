"""One OpenAI-compatible upstream over a pooled HTTP/1.1 connection pool (`http.py`).

Foreign errors are translated to `UpstreamError` subclasses at one seam,
`_TranslatedErrors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping

import orjson

from service.config import UpstreamConfig
from service.context_window import holds_prompt_and_answer, max_tokens_refused_advice
from service.domain import FOLDED_EVERY, Usage, assemble_tool_calls, whole_tool_calls
from service.errors import (
    UpstreamAuthRejected,
    UpstreamContextExceeded,
    UpstreamError,
    UpstreamFailedMidStream,
    UpstreamLacksModel,
    UpstreamNotOpenAI,
    UpstreamRateLimited,
    UpstreamRateLimitedMidStream,
    UpstreamRefusedSilently,
    UpstreamRejected,
    UpstreamTemplateRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    clipped,
)
from service.upstream.codings import UndecodableBody
from service.upstream.headers import media_type, rate_limit_hints, retry_after_s
from service.upstream.http import (
    BodyTooLarge,
    ConnectFailed,
    HttpError,
    HttpPool,
    NotHttp,
    ProxyFailed,
    ProxyRefused,
    Response,
)
from service.upstream.openai_json import (
    MalformedReply,
    Missing,
    ReportedError,
    StreamParser,
    body_without_stream_options,
    context_counts,
    error_status,
    is_json_or_cut,
    parse_completion,
    reported_usage,
    says_content_flagged,
    says_context_exceeded,
    says_out_of_credit,
    says_stream_options_unknown,
    unary_body,
    what_is_missing,
)
from service.upstream.proxy import Proxy, choose_proxy
from service.upstream.relay import relayed_error, scrubbed, secrets_of
from service.upstream.sse import SSEDecoder
from service.upstream.think_tags import ThinkTagSplitter, split_reply, splitter_for
from service.upstream.types import (
    StreamEnd,
    StreamEvent,
    StreamTally,
    TextChunk,
    UpstreamCall,
    UpstreamReply,
    fold_chunks,
    joined_chunks,
    output_chars,
)

log = logging.getLogger("llm_gateway.upstream")

_USER_AGENT = "llm-gateway"
# Idle connections older than this are not reused (providers close theirs after a while).
_KEEPALIVE_S = 30.0
# How long a stream's connection waits after `[DONE]` for its last chunk before it is
# closed rather than reused: a server sends that chunk right after its last event.
_STREAM_END_GRACE_S = 0.25
# The largest answer read, whole (decoded bytes of a body, or of one stream event) or
# streamed (characters of a stream's output: text, reasoning and tool calls' ids, names
# and arguments, never more than the bytes of the events they came in): far past any real
# completion, and a bound on what a broken or hostile upstream (a model looping with no
# max_tokens) can make the gateway hold in memory, as the relayed stream is kept till its end.
_MAX_ANSWER_SIZE = 16 * 1024 * 1024
# How much of a stream's body is held while no event has come, to be read as the JSON
# error object some proxies and providers send in place of a stream (as
# `text/event-stream`, without SSE lines): far past any error object's size.
_MAX_EVENTLESS_HEAD = 64 * 1024
# A proxy, or a connection below HTTP, that keeps failing the same way is logged once in
# this long, not per connection.
_FAILURE_LOG_INTERVAL_S = 60.0
# The most kinds of failure remembered for that at once: causes name addresses, which vary.
_MAX_FAILURES_REMEMBERED = 64
# The statuses of a refusal of a request field the upstream does not know: most send 400,
# Mistral's API (its validation's `extra_forbidden`) 422.
_UNKNOWN_FIELD_STATUSES = (400, 422)
# What an answer may come as, besides its own media type, and still be the provider's
# when it parses so: some proxies send an answer, or a stream, as text/plain or untyped.
_UNTYPED_MEDIA = frozenset({"", "text/plain"})
# What an operator does about a 407 from the proxy: no retry or wait mends it.
_PROXY_AUTH_FIX = (
    "the proxy refused the gateway's credentials: set user:password in the variable "
    "proxy_authorization_env names (or in the environment proxy URL), then restart"
)


def _error_for_status(
    upstream: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes = b"",
    *,
    secrets: Iterable[str] = (),
    request_refusals: frozenset[str] = frozenset(),
) -> UpstreamError:
    """Map an HTTP error or redirect status (and, for a 400, its body) to the most
    specific `UpstreamError`; a refusal of the request itself relays what its body says
    of it, `secrets` redacted (`relay.relayed_error`). A 500 whose message starts with one
    of `request_refusals` is such a refusal (`UpstreamConfig.request_refusals`)."""
    if status < 400:
        # Not followed: a POST carrying the key is not sent on to another address. The
        # upstream is unusable as configured, as a failing one is (failed over, its
        # breaker opened), and the message says what mends it.
        return UpstreamUnavailable(
            f"upstream {upstream!r} answered a redirect (HTTP {status}), which the gateway "
            "does not follow: set its base_url to the address it redirects to",
            upstream=upstream,
            status=status,
        )
    now_epoch_s = time.time()
    wait = retry_after_s(headers, now_epoch_s=now_epoch_s)
    # 402: the gateway's account there is out of credit (DeepSeek's "Insufficient Balance"),
    # and so is OpenAI's 429 `insufficient_quota`, which no wait mends: as much the
    # operator's to fix, and another upstream's to serve, as a rejected key.
    is_out_of_credit = status == 402 or (status == 429 and says_out_of_credit(body))
    if status == 429 and not is_out_of_credit:
        if wait is None:
            # No Retry-After, but a window with nothing left (OpenAI sends its
            # `x-ratelimit-*` on a 429 too): its reset is when to try again.
            wait = rate_limit_hints(headers).exhausted_for_s(now_epoch_s)
        return UpstreamRateLimited(
            f"upstream {upstream!r} is rate limiting (HTTP 429)",
            upstream=upstream,
            status=status,
            retry_after_s=wait,
        )
    if status == 403 and says_content_flagged(body):
        # The caller's prompt, not the gateway's key: the upstream stays healthy for others.
        return UpstreamRejected(
            f"upstream {upstream!r} refused the request's content as flagged by its "
            f"moderation (HTTP {status})",
            upstream=upstream,
            status=status,
            relayed=relayed_error(body, secrets=secrets),
        )
    if status in (401, 403) or is_out_of_credit:
        problem = "rejected the gateway's key"
        if is_out_of_credit:
            problem = "refused the gateway's account for lack of credit"
        return UpstreamAuthRejected(
            f"upstream {upstream!r} {problem} (HTTP {status})",
            upstream=upstream,
            status=status,
        )
    if status == 500 and request_refusals:
        refused = _template_refusal(upstream, body, secrets, request_refusals)
        if refused is not None:
            return refused
    if status in (408, 409) or status >= 500:
        return UpstreamUnavailable(
            f"upstream {upstream!r} failed (HTTP {status})",
            upstream=upstream,
            status=status,
            retry_after_s=wait,
        )
    if says_context_exceeded(body, status):
        counts = context_counts(body)
        advice = (
            "shorten it, or send it again under TRUNCATION_MODE_KEEP_RECENT, which fits it "
            "to the count this refusal taught the gateway"
        )
        window_tokens: int | None = None
        prompt_tokens: int | None = None
        is_input_limit = counts_answer = False
        if counts is not None:
            window_tokens, prompt_tokens, is_input_limit, counts_answer = counts
            is_prompt_alone = not (is_input_limit or counts_answer)
            if is_prompt_alone and holds_prompt_and_answer(window_tokens, prompt_tokens):
                advice = max_tokens_refused_advice(window_tokens, prompt_tokens)
        return UpstreamContextExceeded(
            f"upstream {upstream!r} says the prompt with max_tokens is over the model's "
            f"context window (HTTP {status})",
            advice=advice,
            upstream=upstream,
            status=status,
            relayed=relayed_error(body, secrets=secrets),
            window_tokens=window_tokens,
            prompt_tokens=prompt_tokens,
            is_input_limit=is_input_limit,
            counts_answer=counts_answer,
        )
    missing = what_is_missing(body, status)
    if missing is Missing.MODEL:
        return UpstreamLacksModel(
            f"upstream {upstream!r} does not serve the model (HTTP {status})",
            upstream=upstream,
            status=status,
            relayed=relayed_error(body, secrets=secrets),
        )
    if missing is Missing.PATH:
        # Every model there fails so: the upstream's fault, as an answer that is no OpenAI
        # one is (failed over, its own breaker told), not the request's nor one model's.
        return UpstreamNotOpenAI(
            f"upstream {upstream!r} answered HTTP {status} for a path it does not route, "
            "saying no model is missing: check its base_url",
            upstream=upstream,
            status=status,
            content_type=_shown_media(media_type(headers)),
        )
    return UpstreamRejected(
        f"upstream {upstream!r} rejected the request (HTTP {status})",
        upstream=upstream,
        status=status,
        relayed=relayed_error(body, secrets=secrets),
    )


def _template_refusal(
    upstream: str, body: bytes, secrets: Iterable[str], request_refusals: frozenset[str]
) -> UpstreamTemplateRefused | None:
    """The refusal a 500 stands for when its message is one of `request_refusals`: the
    chat template refused the caller's messages, which no retry and no other moment mends;
    None when it is another failure."""
    relayed = relayed_error(body, secrets=secrets)
    if relayed is None or not relayed.message.startswith(tuple(request_refusals)):
        return None
    return UpstreamTemplateRefused(
        f"upstream {upstream!r} refused the request: the model's chat template does not "
        "take these messages (HTTP 500)",
        upstream=upstream,
        status=500,
        relayed=relayed,
    )


def _failed_mid_stream(
    upstream: str, body: bytes, *, secrets: Iterable[str]
) -> UpstreamFailedMidStream:
    """The error of a stream whose upstream reported the error object `body` after its
    output began, relaying what it said (`secrets` redacted, `relay.relayed_error`) but of
    the gateway's key or account, or a rate limit's, which are the operator's, as such a
    refusal's body is; a rate limit is RESOURCE_EXHAUSTED, as a 429 is."""
    status = error_status(body)
    is_out_of_credit = status == 402 or says_out_of_credit(body)
    is_rate_limit = status == 429 and not is_out_of_credit
    # A rate limit's text names the account's organisation and tier, as a 429's body does.
    is_about_account = (
        is_out_of_credit
        or is_rate_limit
        or status == 401
        or (status == 403 and not says_content_flagged(body))
    )
    relayed = None if is_about_account else relayed_error(body, secrets=secrets)
    kind = UpstreamRateLimitedMidStream if is_rate_limit else UpstreamFailedMidStream
    return kind(
        f"upstream {upstream!r} reported an error mid-stream", upstream=upstream, relayed=relayed
    )


def _headers(config: UpstreamConfig, *, accept: str) -> dict[str, str]:
    """What every request to the upstream carries: who we are, what we take, the key."""
    # identity: without Accept-Encoding a server may compress, at a cost in CPU (and, for
    # a stream, latency) on both ends; one that compresses anyway is decoded (`codings`).
    headers = {"Accept": accept, "Accept-Encoding": "identity", "User-Agent": _USER_AGENT}
    if config.api_key:
        if config.api_key_header == "api-key":
            headers["api-key"] = config.api_key
        else:
            headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


def _ignore_status(status: int) -> None:
    """An `on_status` that wants nothing."""


async def _read_answer(response: Response) -> bytes:
    """The whole answer, up to `_MAX_ANSWER_SIZE` decoded. A refusal's (an error status)
    in a coding the gateway cannot decode reads as empty: its status says what happened,
    as it did before bodies were decoded; its text only refines it."""
    try:
        return await response.read(max_bytes=_MAX_ANSWER_SIZE)
    except UndecodableBody:
        if response.status < 300:
            raise
        return b""


def _is_json_media(media: str) -> bool:
    """Whether `media` is JSON: `application/json`, or a JSON-based type (`+json`)."""
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _may_be_providers_answer(media: str, body: bytes) -> bool:
    """Whether a whole success answer that is no chat completion may still be the
    provider's (billed): JSON, or JSON cut short, sent as JSON or untyped; or an event
    stream (a server that streams what was asked for whole)."""
    if media == "text/event-stream":
        return True
    return (_is_json_media(media) or media in _UNTYPED_MEDIA) and is_json_or_cut(body)


def _may_be_providers_stream(media: str, *, has_events: bool) -> bool:
    """Whether a success answer read as an event stream, failed before its first output,
    may still be the provider's (billed): sent as one, or untyped with an event in it."""
    return media == "text/event-stream" or (media in _UNTYPED_MEDIA and has_events)


def _shown_media(media: str) -> str:
    """An answer's media type as a status says it: the server's own text (a portal's, a
    proxy's), so its control characters are spaces (`scrubbed`), as in a relayed message:
    an escape sequence reached the caller's terminal, a NUL its log. Cut like `clipped`."""
    return clipped(scrubbed(media, ()))


def _not_openai(upstream: str, response: Response, media: str) -> UpstreamNotOpenAI:
    """The error for a success answer that is no OpenAI answer at all, saying what came
    (`media`, its media type)."""
    media = _shown_media(media)
    what = f"Content-Type {media}" if media else "no Content-Type"
    return UpstreamNotOpenAI(
        f"upstream {upstream!r} answered HTTP {response.status} ({what}) with no OpenAI "
        "chat completion: check its base_url (a login page, a captive portal or a proxy's "
        "error page answers so)",
        upstream=upstream,
        status=response.status,
        content_type=media,
    )


class _TranslatedErrors:
    """Turn connection, HTTP and timeout errors into `UpstreamError` subclasses.

    We map to the most specific class we can; the original goes in `__cause__` for
    logs, never into the message a caller sees. A class rather than
    `contextlib.contextmanager`: every attempt enters one.

    With `logs_causes` (the serving client's), a failure below HTTP is logged for the
    operator with its `cause` (the connect's OSError, the TLS library's reason, llhttp's),
    which the caller's message leaves out: `upstream.connect_failed` (refused, a name that
    does not resolve, a certificate not trusted) and `upstream.exchange_failed` (an answer
    that is not HTTP/1.1, a connection reset or closed mid-answer), each once a minute at
    most per cause. Those texts hold no key and no proxy credentials: neither is ever in
    an address, a TLS alert or a parser's reason.
    """

    __slots__ = ("_logs_causes", "_said_at", "_upstream")

    def __init__(self, upstream: str, *, logs_causes: bool = False) -> None:
        self._upstream = upstream
        self._logs_causes = logs_causes
        # When each kind of failure was last logged: once a minute at most.
        self._said_at: dict[str, float] = {}

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            self.translate(exc)

    def translate(self, exc: BaseException) -> None:
        """Raise the `UpstreamError` that `exc` stands for; return for one that is one
        already, or that none stands for (a cancel), for the caller to raise as it is."""
        if isinstance(exc, UpstreamError):
            return
        upstream = self._upstream
        if isinstance(exc, ProxyFailed):
            self._say_proxy_failed(exc)
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    f"upstream {upstream!r} timed out: its proxy {exc.problem}",
                    upstream=upstream,
                ) from exc
            problem = exc.problem if exc.status else "failed"
            raise UpstreamUnavailable(
                f"upstream {upstream!r} could not be reached: its proxy {problem}",
                upstream=upstream,
                # An overloaded proxy's wait is honoured as an upstream's own 503's is.
                retry_after_s=exc.retry_after_s if isinstance(exc, ProxyRefused) else None,
            ) from exc
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(f"upstream {upstream!r} timed out", upstream=upstream) from exc
        if isinstance(exc, ConnectFailed):
            self._say_cause("upstream.connect_failed", exc)
            raise UpstreamUnavailable(
                f"upstream {upstream!r} refused or could not be reached", upstream=upstream
            ) from exc
        if isinstance(exc, NotHttp):
            self._say_cause("upstream.exchange_failed", exc)
            raise UpstreamUnavailable(
                f"upstream {upstream!r} answered with something other than HTTP/1.1",
                upstream=upstream,
            ) from exc
        if isinstance(exc, HttpError | ConnectionError):
            self._say_cause("upstream.exchange_failed", exc)
            raise UpstreamUnavailable(
                f"upstream {upstream!r} dropped the connection", upstream=upstream
            ) from exc
        if isinstance(exc, MalformedReply | BodyTooLarge | UndecodableBody):
            raise UpstreamUnavailable(
                f"upstream {upstream!r} sent a malformed answer: {exc}", upstream=upstream
            ) from exc

    def _is_due(self, kind: str) -> bool:
        """Whether a failure of `kind` may be logged now: once a minute at most."""
        now = time.monotonic()
        said_at = self._said_at.get(kind)
        if said_at is not None and now - said_at < _FAILURE_LOG_INTERVAL_S:
            return False
        if len(self._said_at) >= _MAX_FAILURES_REMEMBERED:
            self._said_at = {
                k: t for k, t in self._said_at.items() if now - t < _FAILURE_LOG_INTERVAL_S
            }
        self._said_at[kind] = now
        return True

    def _say_cause(self, event: str, exc: BaseException) -> None:
        """Log `event` with what failed below HTTP (`exc`'s text), when this logs causes."""
        if not self._logs_causes:
            return
        cause = str(exc) or type(exc).__name__
        if self._is_due(f"{event} {cause}"):
            log.warning(event, extra={"upstream": self._upstream, "cause": cause})

    def _say_proxy_failed(self, exc: ProxyFailed) -> None:
        """Log a proxy's failure (its address and status, never its credentials), once a
        minute at most for the same problem."""
        if not self._is_due(f"proxy {exc.problem}"):
            return
        extra: dict[str, object] = {"upstream": self._upstream, "proxy": exc.proxy}
        if isinstance(exc, ProxyRefused) and exc.status == 407:
            # The operator's to fix, like a rejected key: said as loudly.
            log.error(
                "upstream.proxy_auth_rejected",
                extra={**extra, "http_status": 407, "fix": _PROXY_AUTH_FIX},
            )
        elif isinstance(exc, ProxyRefused):
            log.warning("upstream.proxy_refused", extra={**extra, "http_status": exc.status})
        else:
            log.warning("upstream.proxy_failed", extra={**extra, "problem": exc.problem})


def _output_of_events(
    events: list[str], parser: StreamParser, *, stop_at_output: bool
) -> tuple[TextChunk | None, int, MalformedReply | None]:
    """The output of `events` as one chunk (None without any), how many were parsed, and
    what cut them short.

    Events that arrived in one read go on as one delta: the caller gets the same text (and
    reasoning and tool-call pieces) in one message instead of one per event, which spares a
    gRPC write per event when the upstream sends faster than the gateway relays.
    `stop_at_output` stops after the first event with output, so that it goes on before the
    rest of its read is parsed (about 2 µs an event: 0.4 ms for a burst of 200). Output
    before a malformed event is still returned, so it reaches the caller first.
    """
    chunks: list[TextChunk] = []
    parsed = 0
    error = None
    try:
        for data in events:
            parsed += 1
            if len(data) > _MAX_ANSWER_SIZE:
                # `pending_bytes` sees only events a read left unfinished: not one whose
                # last read both passed the limit and completed it.
                raise MalformedReply(f"a stream event is larger than {_MAX_ANSWER_SIZE} bytes")
            chunk = parser.parse(data)
            if chunk is not None:
                chunks.append(chunk)
                if stop_at_output:
                    break
            elif parser.is_done:
                break
    except MalformedReply as exc:
        error = exc
    return (joined_chunks(chunks) if chunks else None), parsed, error


def _last_output(parser: StreamParser, splitter: ThinkTagSplitter | None) -> TextChunk | None:
    """What a stream's end releases, as one chunk: each UTF-16 half still held back, as
    U+FFFD, and what `splitter` held (that text split first, as the chunks before it)."""
    halves = parser.lone_halves()
    if splitter is None:
        return halves
    chunks = [splitter.split(halves) if halves is not None else None, splitter.rest()]
    held = [chunk for chunk in chunks if chunk is not None]
    return joined_chunks(held) if held else None


class UpstreamClient:
    """Sends chat completions to one upstream; owns its connection pool.

    Use as `async with UpstreamClient(config) as client:`. `environ` (the process's by
    default) is where `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` are read when the client
    opens, for an upstream without `proxy_url`. `redacted`: the other upstreams' secrets,
    redacted with this one's own from what its refusals relay to a caller.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        environ: Mapping[str, str] | None = None,
        redacted: Collection[str] = (),
    ) -> None:
        self.config = config
        self.name = config.name
        self._environ = os.environ if environ is None else environ
        self._redacted = tuple(redacted)
        self.proxy: Proxy | None = None  # chosen when the client opens
        self._pool: HttpPool | None = None
        # Holds no state of a call; logs causes once a minute, so it lives as long as we do.
        self._translated_errors = _TranslatedErrors(self.name, logs_causes=True)
        self._omits_stream_options = False  # the upstream refused them once

    async def __aenter__(self) -> UpstreamClient:
        if self._pool is None:
            self._pool = self._new_pool()
        return self

    def _new_pool(self) -> HttpPool:
        """A connection pool to the configured address, sending the configured key."""
        # Decided once a pool: every connection it opens goes the same way.
        self.proxy = choose_proxy(self.config, self._environ)
        if self.proxy is not None:
            log.info(
                "upstream.proxy",
                extra={
                    "upstream": self.name,
                    "proxy": self.proxy.address,
                    "source": self.proxy.source,
                    "authenticated": self.proxy.authorization is not None,
                },
            )
        headers = {
            **_headers(self.config, accept="application/json, text/event-stream"),
            "Content-Type": "application/json",
        }
        return HttpPool(
            self.config.base_url,
            max_connections=self.config.max_connections,
            connect_timeout_s=self.config.connect_timeout_s,
            keepalive_s=_KEEPALIVE_S,
            headers=headers,
            proxy=self.proxy,
        )

    async def retarget(self, *, base_url: str, api_key: str | None) -> None:
        """Send calls from now on to `base_url`, with `api_key`: the local model's server
        takes a new port and key at each start.

        Connections to the old address are closed (a call still on one fails, as it would
        have with that server gone); the upstream's limits and routes stay as they are.
        """
        self.config = dataclasses.replace(self.config, base_url=base_url, api_key=api_key)
        if self._pool is None:  # not open: it opens on the new address
            return
        old, self._pool = self._pool, self._new_pool()
        await old.aclose()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.aclose()
        self._pool = None

    @property
    def open_connections(self) -> int:
        """Connections currently checked out or idle in the pool."""
        return self._pool.open_connections if self._pool is not None else 0

    @property
    def checked_out_connections(self) -> int:
        """Connections carrying a request now."""
        return self._pool.checked_out if self._pool is not None else 0

    def _deadline(self, timeout_s: float) -> float:
        """The loop time by which the whole exchange must be over."""
        total = max(0.001, min(timeout_s, self.config.timeout_s))
        return asyncio.get_running_loop().time() + total

    def _first_output_deadline(self, deadline: float) -> float | None:
        """The loop time by which a stream's first output must come, when
        `first_output_timeout_s` ends its wait before `deadline` does; else None."""
        first_output_s = self.config.first_output_timeout_s
        if first_output_s is None:
            return None
        first_output_by = asyncio.get_running_loop().time() + first_output_s
        return first_output_by if first_output_by < deadline else None

    def _no_first_output(self) -> UpstreamTimeout:
        """The timeout of an attempt whose stream sent no output within its
        `first_output_timeout_s`: an upstream that took the request and hangs."""
        return UpstreamTimeout(
            f"upstream {self.name!r} timed out: no output within its first_output_timeout_s "
            f"({self.config.first_output_timeout_s:g} s)",
            upstream=self.name,
        )

    @property
    def pool(self) -> HttpPool:
        """The connection pool; raises when the client is not open."""
        if self._pool is None:
            raise RuntimeError(f"upstream client {self.name!r} is not open")
        return self._pool

    def _secrets(self) -> tuple[str, ...]:
        """Every secret a refusal relayed to a caller must not show: this upstream's own
        (its key as now retargeted, its proxy's credentials) and the others'."""
        return (*secrets_of(self.config, self.proxy), *self._redacted)

    def _error_for_status(self, response: Response, body: bytes) -> UpstreamError:
        """The error an answer's error status and `body` stand for."""
        return _error_for_status(
            self.name,
            response.status,
            response.headers,
            body,
            secrets=self._secrets(),
            request_refusals=self.config.request_refusals,
        )

    def _stalled_refusal(self, response: Response) -> UpstreamError:
        """The error an error status stands for when its body did not come in time: what
        its status and headers said (a 429's or a 503's Retry-After, which the caller's
        RetryInfo and the gateway's own back-off honour), as for a body the gateway cannot
        decode; the body only refines it. Not a timeout: the upstream answered."""
        return self._error_for_status(response, b"")

    def _refuse_empty_stream(self) -> None:
        """Raise `UpstreamRejected` for a stream that ended before its first event, from an
        upstream that ends so the streams it refuses (`empty_stream_is_refusal`); else let
        the end be read as malformed (no finish reason), as from any other."""
        if self.config.empty_stream_is_refusal:
            raise UpstreamRefusedSilently(
                f"upstream {self.name!r} refused the request: it ended the stream before its "
                "first event, as llama-cpp-python's server does for a prompt over its "
                "context window (its tokens, not the gateway's estimate); shorten it",
                upstream=self.name,
            )

    def _reply(
        self,
        call: UpstreamCall,
        response: Response,
        body: bytes,
        on_status: Callable[[int], None] | None,
        on_usage: Callable[[Usage], None] | None,
    ) -> UpstreamReply:
        """A success answer's body as a chat completion, or, where it holds an error in
        place of one, the error its status would have been (`on_status` told that
        status: the upstream refused the call, and bills nothing for it). The usage of
        the provider's answer refused as malformed goes to `on_usage`: the provider
        bills it so, and the attempt is recorded with it (`AttemptLog.lose`)."""
        try:
            return parse_completion(
                body,
                model=call.upstream_model,
                rate_limits=rate_limit_hints(response.headers),
                waited_s=response.waited_s,
            )
        except MalformedReply as exc:
            status = error_status(body)
            if status is not None:
                raise self._refusal(response, body, status, on_status) from None
            media = media_type(response.headers)
            if not _may_be_providers_answer(media, body):
                raise _not_openai(self.name, response, media) from exc
            if on_usage is not None and (counts := reported_usage(body)) is not None:
                on_usage(counts)
            raise

    def _reported_error(
        self,
        error: ReportedError,
        response: Response,
        on_status: Callable[[int], None] | None,
        *,
        has_output: bool,
    ) -> UpstreamError:
        """The error a stream's error event stands for. Before any output it is in place of
        the answer, as a 200 whose body is that error: what OpenRouter sends once its
        stream began (its 200 and comments). After it, the generation failed part-way."""
        body = error.data.encode()
        if has_output:
            return _failed_mid_stream(self.name, body, secrets=self._secrets())
        return self._refusal(response, body, error_status(body) or 502, on_status)

    def _refuse_eventless_stream(
        self,
        response: Response,
        head: bytes,
        on_status: Callable[[int], None] | None,
        *,
        is_empty: bool,
    ) -> None:
        """Raise for a stream that ended without an event: the error its body (`head`, its
        start) holds when that is a JSON error object sent in place of a stream, as a 200
        whose body is one is; else `_refuse_empty_stream` when it sent nothing but comments,
        or nothing at all (`is_empty`)."""
        status = error_status(head)
        if status is not None:
            raise self._refusal(response, head, status, on_status)
        if is_empty:
            self._refuse_empty_stream()

    def _refusal(
        self,
        response: Response,
        body: bytes,
        status: int,
        on_status: Callable[[int], None] | None,
    ) -> UpstreamError:
        """The error a success answer's error `body` stands for, as if sent with `status`
        (`on_status` told it: the upstream refused the call, and bills nothing for it)."""
        if on_status is not None:
            on_status(status)
        return _error_for_status(
            self.name,
            status,
            response.headers,
            body,
            secrets=self._secrets(),
            request_refusals=self.config.request_refusals,
        )

    async def _post(
        self,
        call: UpstreamCall,
        on_sent: Callable[[], None] | None,
        on_status: Callable[[int], None] | None,
    ) -> Response:
        """Send the call; the response once its status and headers are in."""
        # The client's own headers are the pool's: it sends them first.
        # The `pool` property only when there is none, for its error: a frame every call.
        response = await (self._pool or self.pool).request(
            "POST", "/chat/completions", call.headers, call.body, on_sent=on_sent
        )
        if on_status is not None:
            on_status(response.status)
        return response

    async def _post_stream(
        self,
        call: UpstreamCall,
        on_sent: Callable[[], None] | None,
        on_status: Callable[[int], None] | None,
    ) -> Response:
        """`_post` for a stream. The body asks for the stream's usage in `stream_options`;
        an upstream that refuses the field (a 400 naming it: Azure OpenAI before API
        version 2024-09-01-preview; a 422: Mistral's API) is asked again at once without
        it, and never sent it
        again once that is taken, rather than every stream failing as the caller's bad
        request."""
        if self._omits_stream_options:
            return await self._post(self._without_stream_options(call), on_sent, on_status)
        # Its status told `on_status` only as the answer: a refusal asked again stands for
        # nothing, and the attempt would count as refused, billing none of what follows.
        response = await self._post(call, on_sent, None)
        told = on_status or _ignore_status
        if response.status not in _UNKNOWN_FIELD_STATUSES:
            told(response.status)
            return response
        try:
            body = await _read_answer(response)
        except BaseException:
            told(response.status)  # refused all the same, whatever became of its body
            raise
        finally:
            response.release()
        if not says_stream_options_unknown(body):
            told(response.status)
            raise self._error_for_status(response, body)
        response = await self._post(self._without_stream_options(call), on_sent, on_status)
        # Remembered only once taken without them: a refusal for another cause may quote
        # the request whole (vLLM's validation errors), `stream_options` and all.
        if response.status < 400 and not self._omits_stream_options:
            # Once, by the first taken: streams sent meanwhile were refused and asked again too.
            self._omits_stream_options = True
            log.warning("upstream.stream_options_refused", extra={"upstream": self.name})
        return response

    @staticmethod
    def _without_stream_options(call: UpstreamCall) -> UpstreamCall:
        return dataclasses.replace(call, body=body_without_stream_options(call.body))

    async def complete(
        self,
        call: UpstreamCall,
        *,
        timeout_s: float,
        on_sent: Callable[[], None] | None = None,
        on_status: Callable[[int], None] | None = None,
        on_output: Callable[[TextChunk], None] | None = None,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> UpstreamReply:
        """Send one unary completion and parse the answer; `on_sent` as `HttpPool.request`,
        `on_status` with the answer's status, before its body is read.

        To an upstream with `stream_unary_calls` the call is a stream (its body built so),
        read whole: `_complete_streamed`, which passes each piece of output to `on_output`
        as it arrives, and its usage to `on_usage` as `stream` does (what the upstream
        generated, and billed, should the stream be cut).
        """
        if self.config.stream_unary_calls:
            return await self._complete_streamed(
                call,
                timeout_s=timeout_s,
                on_sent=on_sent,
                on_status=on_status,
                on_output=on_output,
                on_usage=on_usage,
            )
        return await self._complete_unary(
            call, timeout_s=timeout_s, on_sent=on_sent, on_status=on_status, on_usage=on_usage
        )

    async def _complete_streamed(
        self,
        call: UpstreamCall,
        *,
        timeout_s: float,
        on_sent: Callable[[], None] | None = None,
        on_status: Callable[[int], None] | None = None,
        on_output: Callable[[TextChunk], None] | None = None,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> UpstreamReply:
        """A unary completion sent as the stream `call` is, its events read whole into the
        answer `complete` gives; `timeout_s` bounds all of it, as a unary call's. Each
        piece of output goes to `on_output` too, as it arrives, and its usage to
        `on_usage` (as `stream`'s).

        llama-cpp-python's server (0.3.x, `server/app.py`) asks `request.is_disconnected()`
        once before a unary completion starts (`create_chat_completion`), and in a stream
        after each chunk (`get_event_publisher`): a unary call cut by its caller would
        generate to its `max_tokens`, every later call queued behind it, where a stream
        stops once its connection closes, as `stream` closes it on any exit.
        A stream it refused without a word is asked again unary by `stream`, whose error
        says why (a prompt over its context window: `UpstreamContextExceeded`, as before).
        """
        chunks: list[TextChunk] = []
        unfolded = 0  # chunks since `chunks` was last folded (`FOLDED_EVERY`)
        end: StreamEnd | None = None
        # The stream's own waits end by `timeout_s`, after its first output too
        # (`whole_timeout_s`), not an outer timer's: one fired a moment before the stream's
        # own, so a 429 whose body stalled was a timeout (its Retry-After lost), and an
        # answer whose finish reason came was a timeout, retried and billed again, where
        # the stream's own ends it as finished.
        events = self.stream(
            call,
            timeout_s=timeout_s,
            on_sent=on_sent,
            on_status=on_status,
            on_usage=on_usage,
            whole_timeout_s=timeout_s,
        )
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TextChunk):
                    chunks.append(event)
                    unfolded += 1
                    if unfolded == FOLDED_EVERY:
                        fold_chunks(chunks, FOLDED_EVERY)
                        unfolded = 0
                    if on_output is not None:
                        on_output(event)
                else:
                    end = event
        if end is None:  # `stream` always ends with StreamEnd or raises
            raise RuntimeError("stream ended without its end event")
        whole = joined_chunks(chunks)
        return UpstreamReply(
            id=end.id,
            model=end.model,
            content=whole.content,
            finish_reason=end.finish_reason,
            usage=end.usage,
            rate_limits=end.rate_limits,
            tool_calls=assemble_tool_calls(whole.tool_calls),
            reasoning=whole.reasoning,
            waited_s=end.waited_s,
        )

    async def _complete_unary(
        self,
        call: UpstreamCall,
        *,
        timeout_s: float,
        on_sent: Callable[[], None] | None,
        on_status: Callable[[int], None] | None,
        on_usage: Callable[[Usage], None] | None,
    ) -> UpstreamReply:
        """`complete`, as one unary HTTP exchange; `on_usage` gets the usage of an answer
        refused as malformed (`_reply`)."""
        response: Response | None = None
        # `with self._translated_errors` written out: its two frames on every unary call.
        try:
            try:
                # `_deadline` written out: its `min`, `max` and frame on every unary call.
                # The pool's timer bounds the exchange (`ExchangeTimeout`, a TimeoutError)
                # up to the release, where an `asyncio.timeout` around it cost a dozen calls.
                limit_s = self.config.timeout_s
                whole_s = timeout_s if timeout_s < limit_s else limit_s
                deadline = asyncio.get_running_loop().time() + (
                    whole_s if whole_s > 0.001 else 0.001
                )
                # `_post` written out: a coroutine's frame, and its resumption, every call.
                response = await (self._pool or self.pool).request(
                    "POST",
                    "/chat/completions",
                    call.headers,
                    call.body,
                    on_sent=on_sent,
                    deadline=deadline,
                )
                if on_status is not None:
                    on_status(response.status)
                try:
                    # `_read_answer` written out: a coroutine's frame on every call.
                    body = await response.read(max_bytes=_MAX_ANSWER_SIZE)
                except UndecodableBody:
                    if response.status < 300:
                        raise
                    body = b""  # a refusal's: its status says what happened
                finally:
                    response.release()
            except TimeoutError as exc:
                if response is None or response.status < 300:
                    raise
                raise self._stalled_refusal(response) from exc
            if response.status >= 300:  # a redirect, a refusal or a failure
                raise self._error_for_status(response, body)
            reply = self._reply(call, response, body, on_status, on_usage)
            think_tags = self.config.think_tags
            return reply if think_tags == "false" else split_reply(reply, splitter_for(think_tags))
        except BaseException as exc:
            self._translated_errors.translate(exc)
            raise

    def stream(
        self,
        call: UpstreamCall,
        *,
        timeout_s: float,
        on_sent: Callable[[], None] | None = None,
        on_status: Callable[[int], None] | None = None,
        tally: StreamTally | None = None,
        on_usage: Callable[[Usage], None] | None = None,
        whole_timeout_s: float | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Yield text chunks as they arrive, then one `StreamEnd`; `on_sent` and
        `on_status` as in `complete`; `tally` counts the output yielded; `on_usage` is
        told the usage the upstream reported, if any, once the stream ends, however it
        ends: a stream cut after its usage event (before `[DONE]`) was billed so. From an
        upstream with `think_tags`, a `<think>` block opening the text comes as reasoning,
        and what the splitter holds back (a tag's beginning, whitespace) is no output yet:
        it neither ends the wait for the first output nor restarts the idle timeout.

        Output past `_MAX_ANSWER_SIZE` characters is a malformed answer, as a unary one
        past as many bytes is: the chunk that would pass it is not yielded, and the
        connection is closed. Every stream is held whole by someone till its end (the
        pipeline's relayed output, a shared call's deltas, a streamed unary call's answer),
        so a stream that never ends would otherwise grow the gateway's memory without limit.

        The response is released on every exit path: when the consumer stops early or is
        cancelled the connection is closed at once, so the provider stops generating; a
        stream read to `[DONE]` leaves its connection for the next call.

        `timeout_s` (the caller's deadline, within the upstream's `timeout_s`) bounds the
        gateway's own waits until the first text, and so does `first_output_timeout_s`
        (when set, from the attempt's start: `UpstreamTimeout`, failed over as any
        timeout); after it, only the upstream's `timeout_s` does, and
        `stream_idle_timeout_s` (when set) each wait for the next output: reads
        that bring none (keep-alive comments, events without text) do not restart it. Once text
        flows its consumers end the stream by leaving when their deadlines pass (gRPC
        cancels each call), and a stream the cache shares among callers must not end at its
        first caller's deadline. The idle timeout counts the gateway's own waits, never
        the consumer's time between chunks; the upstream's `timeout_s` is the whole
        stream's, from its start, the consumer's time included. `whole_timeout_s` (within
        it) bounds the whole stream instead, as a unary call's deadline bounds its answer
        (`_complete_streamed`): an answer whose finish reason came ends by it as finished,
        as it does when its body is then reset or cut in the middle of an event.

        From an upstream with `empty_stream_is_refusal`, a stream it ends before its first
        event is asked again unary (`_asked_again_unary`).
        """
        tally = StreamTally() if tally is None else tally
        events = self._stream(
            call,
            timeout_s=timeout_s,
            on_sent=on_sent,
            on_status=on_status,
            tally=tally,
            on_usage=on_usage,
            splitter=(
                None if self.config.think_tags == "false" else splitter_for(self.config.think_tags)
            ),
            whole_timeout_s=self.config.timeout_s if whole_timeout_s is None else whole_timeout_s,
        )
        if not self.config.empty_stream_is_refusal:
            return events
        return self._asked_again_unary(
            events,
            call,
            deadline=self._deadline(timeout_s),
            on_sent=on_sent,
            on_status=on_status,
            tally=tally,
            on_usage=on_usage,
        )

    async def _asked_again_unary(
        self,
        events: AsyncGenerator[StreamEvent, None],
        call: UpstreamCall,
        *,
        deadline: float,
        on_sent: Callable[[], None] | None,
        on_status: Callable[[int], None] | None,
        tally: StreamTally,
        on_usage: Callable[[Usage], None] | None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """`events`; or, where they end in `UpstreamRefusedSilently`, the same request
        asked again unary, by `deadline`: its error says why (llama-cpp-python's 400 for a
        prompt over its context window, `UpstreamContextExceeded`, which the pipeline
        learns from, as from a unary call's), or its answer comes as one chunk and the end.
        """
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    yield event
                return
            except UpstreamRefusedSilently:
                pass
        unary = dataclasses.replace(call, body=unary_body(call.body))
        remaining_s = deadline - asyncio.get_running_loop().time()
        reply = await self._complete_unary(
            unary,
            timeout_s=remaining_s,
            on_sent=on_sent,
            on_status=on_status,
            on_usage=on_usage,
        )
        for event in _reply_events(reply, tally):
            yield event

    async def _stream(
        self,
        call: UpstreamCall,
        *,
        timeout_s: float,
        on_sent: Callable[[], None] | None,
        on_status: Callable[[int], None] | None,
        tally: StreamTally,
        on_usage: Callable[[Usage], None] | None,
        splitter: ThinkTagSplitter | None,
        whole_timeout_s: float,
    ) -> AsyncGenerator[StreamEvent, None]:
        """`stream`, each chunk's text split by `splitter` when given, and over by
        `whole_timeout_s` once its output flows.

        The bound counts the output as the upstream sent it (tags and text held included);
        `tally`, what is passed on, the `chars_sent` of a cut stream.
        """
        deadline = self._deadline(timeout_s)
        whole_stream_deadline = self._deadline(whole_timeout_s)
        first_output_by = self._first_output_deadline(deadline)
        if first_output_by is not None:
            deadline = first_output_by
        with self._translated_errors:
            try:
                async with asyncio.timeout_at(deadline) as waiting:
                    response = await self._post_stream(call, on_sent, on_status)
            except TimeoutError as exc:
                if first_output_by is None or not waiting.expired():  # a connect's own
                    raise
                raise self._no_first_output() from exc
            headers_at = time.monotonic()
            parser = StreamParser()
            media = media_type(response.headers)
            has_events = has_output = False
            try:
                if response.status >= 300:  # a redirect, a refusal or a failure
                    try:
                        async with asyncio.timeout_at(deadline):
                            body = await _read_answer(response)
                    except TimeoutError as exc:
                        raise self._stalled_refusal(response) from exc
                    raise self._error_for_status(response, body)
                if _is_json_media(media):
                    # Some OpenAI-compatible servers ignore `stream: true` and answer with
                    # one completion: relay it as one chunk and the end.
                    async with asyncio.timeout_at(deadline):
                        body = await _read_answer(response)
                    reply = self._reply(call, response, body, on_status, on_usage)
                    if splitter is not None:
                        reply = split_reply(reply, splitter)
                    for event in _reply_events(reply, tally):
                        yield event
                    return
                decoder = SSEDecoder()
                idle_s = self.config.stream_idle_timeout_s
                loop = asyncio.get_running_loop()
                # When the idle timeout ends the stream: set after each output is passed on,
                # so the consumer's time does not count and comments do not put it off.
                idle_until: float | None = None
                read_chars = 0  # the output as the upstream sent it, which the bound counts
                head = b""  # the body read while no event has come (`_MAX_EVENTLESS_HEAD`)
                while True:
                    wait_until = deadline if idle_until is None else min(deadline, idle_until)
                    try:
                        async with asyncio.timeout_at(wait_until):
                            raw = await response.next_chunk()
                    except (TimeoutError, HttpError):
                        if not has_output or parser.finish_reason is None:
                            raise
                        # The answer was whole, and said so: only its usage or `[DONE]`
                        # was to come. Failing it, stalled or reset, would have its caller
                        # ask (and pay) again for an answer it has; its connection is
                        # closed, and an event it began (its usage) left unread.
                        break
                    if raw is None:  # a clean end; a reset raises instead
                        parser.end_of_body(decoder.data_at_end())
                        break
                    events = decoder.feed(raw)
                    if not has_events:
                        if events:
                            has_events = True
                        elif len(head) < _MAX_EVENTLESS_HEAD:
                            head += raw
                    while events:
                        # Until output is read, not until it is passed on: a `<think>`
                        # block's beginning, held, is split with the rest of its read.
                        chunk, parsed, error = _output_of_events(
                            events, parser, stop_at_output=not read_chars
                        )
                        del events[:parsed]
                        if chunk is not None:
                            # `output_chars`, inline: a Python call less for every chunk.
                            chars = read_chars + len(chunk.content) + len(chunk.reasoning)
                            for piece in chunk.tool_calls:
                                chars += len(piece.id) + len(piece.name) + len(piece.arguments)
                            if chars > _MAX_ANSWER_SIZE:
                                raise MalformedReply(
                                    f"the stream's output is longer than {_MAX_ANSWER_SIZE} "
                                    "characters (text, reasoning and tool calls)"
                                )
                            read_chars = chars
                            if splitter is None:
                                tally.chars = chars
                            elif (chunk := splitter.split(chunk)) is not None:
                                tally.chars += output_chars(chunk)
                        if chunk is not None:
                            has_output = True
                            deadline = whole_stream_deadline
                            yield chunk
                            if idle_s is not None:
                                idle_until = loop.time() + idle_s
                        if error is not None:
                            if isinstance(error, ReportedError):
                                raise self._reported_error(
                                    error, response, on_status, has_output=has_output
                                ) from None
                            raise error
                        if parser.is_done:
                            break
                    if parser.is_done:
                        break
                    if decoder.pending_bytes > _MAX_ANSWER_SIZE:
                        raise MalformedReply(
                            f"a stream event is larger than {_MAX_ANSWER_SIZE} bytes"
                        )
                if not has_events:
                    self._refuse_eventless_stream(
                        response, head, on_status, is_empty=not decoder.has_pending
                    )
                # Once output and its finish reason came, an event its end cut (its usage,
                # `[DONE]`) is left unread, however the body ended (`next_chunk` above).
                # Before `end`, which would tell a cut before the finish reason as none sent.
                is_whole = parser.is_done or (has_output and parser.finish_reason is not None)
                if not is_whole and decoder.has_pending:
                    raise MalformedReply("the stream was cut in the middle of an event")
                end = parser.end()
                if (last := _last_output(parser, splitter)) is not None:
                    tally.chars += output_chars(last)
                    yield last
                yield StreamEnd(
                    id=end.id,
                    model=end.model or call.upstream_model,
                    finish_reason=end.finish_reason,
                    usage=end.usage,
                    # Its resets count from the headers, sent before the whole stream.
                    rate_limits=rate_limit_hints(response.headers).aged(
                        time.monotonic() - headers_at
                    ),
                    waited_s=response.waited_s,
                )
            except TimeoutError as exc:
                # Before the first output every wait here ends at `deadline`, now its bound.
                if has_output or first_output_by is None:
                    raise
                raise self._no_first_output() from exc
            except MalformedReply as exc:
                # `_reply` judged a JSON answer, and output shows the stream the provider's.
                if has_output or _is_json_media(media):
                    raise
                if not _may_be_providers_stream(media, has_events=has_events):
                    raise _not_openai(self.name, response, media) from exc
                raise
            finally:
                # Told once, here, rather than on each usage event (some servers send one
                # with every chunk): a cut stream's consumer reads it once it is closed.
                if on_usage is not None and parser.usage is not None:
                    on_usage(parser.usage)
                if parser.is_done:
                    # Only the body's framing can be left: reuse the connection once it ends.
                    response.release_at_end(within_s=_STREAM_END_GRACE_S)
                else:
                    response.release()  # half read: closed, so the provider stops generating


def _reply_events(reply: UpstreamReply, tally: StreamTally) -> Iterable[StreamEvent]:
    """A whole answer as stream events: its output as one chunk (none without output),
    counted in `tally`, then its end."""
    if reply.content or reply.tool_calls or reply.reasoning:
        whole = TextChunk(reply.content, whole_tool_calls(reply.tool_calls), reply.reasoning)
        # Within the bound, as the body it came in was (`_read_answer`).
        tally.chars = output_chars(whole)
        yield whole
    yield StreamEnd(
        id=reply.id,
        model=reply.model,
        finish_reason=reply.finish_reason,
        usage=reply.usage,
        rate_limits=reply.rate_limits,
        waited_s=reply.waited_s,
    )


async def _get_once(
    config: UpstreamConfig, path: str, *, timeout_s: float, environ: Mapping[str, str] | None
) -> tuple[int, bytes]:
    """GET `{base_url}{path}` on a short-lived connection, through the proxy the upstream's
    calls would take (`environ`: the process's by default): the status and the body."""
    headers = _headers(config, accept="application/json")
    proxy = choose_proxy(config, os.environ if environ is None else environ)
    pool = HttpPool(config.base_url, max_connections=1, connect_timeout_s=timeout_s, proxy=proxy)
    try:
        with _TranslatedErrors(config.name):
            async with asyncio.timeout(timeout_s):
                async with await pool.request("GET", path, headers) as response:
                    return response.status, await _read_answer(response)
    finally:
        await pool.aclose()


async def probe_models(
    config: UpstreamConfig, *, timeout_s: float, environ: Mapping[str, str] | None = None
) -> tuple[int, list[str]]:
    """GET `{base_url}/models`: the status and model ids listed.

    The old client's key check: 200 lists the models, 401 means a bad or expired key.
    Through the upstream's proxy, as its calls go (`environ` as `UpstreamClient`'s).
    """
    status, body = await _get_once(config, "/models", timeout_s=timeout_s, environ=environ)
    if status != 200:
        return status, []
    with _TranslatedErrors(config.name):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedReply("model list is not JSON") from exc
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):  # Go servers send an empty list as null
        items = []
    return 200, [str(m.get("id")) for m in items if isinstance(m, dict)]


async def answers_http(
    config: UpstreamConfig, *, timeout_s: float, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether the upstream answers an HTTP request at all, whatever the status (through
    its proxy, as its calls go).

    A path no server routes (a 404 is an answer): llama-cpp-python's `/v1/models` waits
    for the model's lock, so a server busy generating would look hung.
    """
    try:
        await _get_once(config, "/llm-gateway-liveness", timeout_s=timeout_s, environ=environ)
    except UpstreamError:
        return False
    return True


__all__ = ["UpstreamClient", "answers_http", "probe_models"]
