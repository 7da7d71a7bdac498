"""One OpenAI-compatible upstream over a pooled aiohttp session.

The only module (with its siblings in `upstream/`) that imports aiohttp. Foreign errors
are translated to `UpstreamError` subclasses at one seam, `_translate_errors`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp

from service.config import UpstreamConfig
from service.errors import (
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.upstream.headers import rate_limit_hints, retry_after_s
from service.upstream.openai_json import MalformedReply, StreamParser, parse_completion
from service.upstream.sse import SSEDecoder
from service.upstream.types import (
    StreamEnd,
    StreamEvent,
    TextChunk,
    UpstreamCall,
    UpstreamReply,
)

_STREAM_READ_BYTES = 64 * 1024


def _error_for_status(upstream: str, status: int, headers: Mapping[str, str]) -> UpstreamError:
    """Map an HTTP error status to the most specific `UpstreamError`."""
    wait = retry_after_s(headers, now_epoch_s=time.time())
    if status == 429:
        return UpstreamRateLimited(
            f"upstream {upstream!r} is rate limiting (HTTP 429)",
            upstream=upstream,
            status=status,
            retry_after_s=wait,
        )
    if status in (401, 403):
        return UpstreamAuthRejected(
            f"upstream {upstream!r} rejected the gateway's key (HTTP {status})",
            upstream=upstream,
            status=status,
        )
    if status in (408, 409) or status >= 500:
        return UpstreamUnavailable(
            f"upstream {upstream!r} failed (HTTP {status})",
            upstream=upstream,
            status=status,
            retry_after_s=wait,
        )
    return UpstreamRejected(
        f"upstream {upstream!r} rejected the request (HTTP {status})",
        upstream=upstream,
        status=status,
    )


@contextlib.contextmanager
def _translate_errors(upstream: str) -> Iterator[None]:
    """Turn aiohttp and timeout errors into `UpstreamError` subclasses.

    We map to the most specific class we can; the original goes in `__cause__` for
    logs, never into the message a caller sees.
    """
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {upstream!r} timed out", upstream=upstream) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(
            f"upstream {upstream!r} refused or could not be reached", upstream=upstream
        ) from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise UpstreamUnavailable(
            f"upstream {upstream!r} dropped the connection", upstream=upstream
        ) from exc
    except MalformedReply as exc:
        raise UpstreamUnavailable(
            f"upstream {upstream!r} sent a malformed answer: {exc}", upstream=upstream
        ) from exc


def _text_of_read(
    raw: bytes, decoder: SSEDecoder, parser: StreamParser
) -> tuple[str, MalformedReply | None]:
    """The text of every event completed by one read, joined, and what cut it short.

    Events that arrived in one read go on as one delta: the caller gets the same text in
    one message instead of one per event, which spares a gRPC write per event when the
    upstream sends faster than the gateway relays. The first event's text waits only for
    the rest of its read to be parsed (about 2 µs an event).
    Text before a malformed event is still returned, so it reaches the caller first.
    """
    texts: list[str] = []
    try:
        for data in decoder.feed(raw):
            chunk = parser.parse(data)
            if chunk is not None:
                texts.append(chunk.content)
            elif parser.is_done:
                break
    except MalformedReply as exc:
        return "".join(texts), exc
    return "".join(texts), None


class UpstreamClient:
    """Sends chat completions to one upstream; owns its connection pool.

    Use as `async with UpstreamClient(config) as client:`; a session may be injected
    for tests, and is then not closed by the client.
    """

    def __init__(
        self, config: UpstreamConfig, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._owns_session = session is None
        self._session = session
        self._headers = {"Content-Type": "application/json"}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"

    async def __aenter__(self) -> UpstreamClient:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections, keepalive_timeout=30, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool, if this client created it."""
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    @property
    def open_connections(self) -> int:
        """Connections currently checked out or idle in the pool."""
        connector = self._session.connector if self._session is not None else None
        if connector is None:
            return 0
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle + len(getattr(connector, "_acquired", ()))

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        total = max(0.001, min(timeout_s, self.config.timeout_s))
        return aiohttp.ClientTimeout(total=total, connect=min(total, self.config.connect_timeout_s))

    def _request_headers(self, call: UpstreamCall) -> dict[str, str]:
        if not call.headers:
            return self._headers
        return {**self._headers, **call.headers}

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session; raises when the client is not open."""
        if self._session is None:
            raise RuntimeError(f"upstream client {self.name!r} is not open")
        return self._session

    async def complete(self, call: UpstreamCall, *, timeout_s: float) -> UpstreamReply:
        """Send one unary completion and parse the answer."""
        with _translate_errors(self.name):
            async with self.session.post(
                self._url,
                data=call.body,
                headers=self._request_headers(call),
                timeout=self._timeout(timeout_s),
            ) as response:
                body = await response.read()
                if response.status >= 400:
                    raise _error_for_status(self.name, response.status, response.headers)
                reply_id, model, content, finish, usage = parse_completion(body)
                return UpstreamReply(
                    id=reply_id,
                    model=model or call.upstream_model,
                    content=content,
                    finish_reason=finish,
                    usage=usage,
                    rate_limits=rate_limit_hints(response.headers),
                )

    async def stream(self, call: UpstreamCall, *, timeout_s: float) -> AsyncIterator[StreamEvent]:
        """Yield text chunks as they arrive, then one `StreamEnd`.

        The response is closed on every exit path: when the consumer stops early or is
        cancelled the connection is dropped at once, so the provider stops generating.
        """
        with _translate_errors(self.name):
            response = await self.session.post(
                self._url,
                data=call.body,
                headers=self._request_headers(call),
                timeout=self._timeout(timeout_s),
            )
            try:
                if response.status >= 400:
                    await response.read()
                    raise _error_for_status(self.name, response.status, response.headers)
                decoder = SSEDecoder()
                parser = StreamParser()
                async for raw in response.content.iter_chunked(_STREAM_READ_BYTES):
                    text, error = _text_of_read(raw, decoder, parser)
                    if text:
                        yield TextChunk(text)
                    if error is not None:
                        raise error
                    if parser.is_done:
                        break
                end = parser.end()
                if not parser.is_done and decoder.has_pending:
                    raise MalformedReply("the stream was cut in the middle of an event")
                yield StreamEnd(
                    id=end.id,
                    model=end.model or call.upstream_model,
                    finish_reason=end.finish_reason,
                    usage=end.usage,
                    rate_limits=rate_limit_hints(response.headers),
                )
            finally:
                # Ensure the response is closed even if the consumer doesn't read all
                # data: a half-read connection is dropped, never reused.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()


async def probe_models(config: UpstreamConfig, *, timeout_s: float) -> tuple[int, list[str]]:
    """GET `{base_url}/models` on a short-lived session: the status and model ids listed.

    The old client's key check: 200 lists the models, 401 means a bad or expired key.
    """
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    with _translate_errors(config.name):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                config.base_url.rstrip("/") + "/models",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response,
        ):
            if response.status != 200:
                return response.status, []
            try:
                data = await response.json(content_type=None)
            except ValueError as exc:
                raise MalformedReply("model list is not JSON") from exc
            items = data.get("data", []) if isinstance(data, dict) else []
            return 200, [str(m.get("id")) for m in items if isinstance(m, dict)]


__all__ = ["UpstreamClient", "probe_models"]
