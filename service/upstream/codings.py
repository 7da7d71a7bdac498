"""Content codings (RFC 9110 §8.4.1) and transfer codings (RFC 9112 §7) an answer may
come in: gzip and deflate, decoded as the body arrives, in bounded pieces.

The gateway asks for `identity`, but some servers and proxies compress anyway. A body
in `gzip` (or `x-gzip`) or `deflate` is decoded with the standard library's zlib: for
`deflate` both the zlib-wrapped data the RFC names and the raw deflate some servers send
(as browsers and curl accept). Each call hands out at most `piece_bytes` of decoded
bytes and keeps the rest of its input for the next, so that a small body decoding to
gigabytes (a decompression bomb) meets its reader's byte limit, not the memory's. Any
other coding (`br`, `zstd`, ...) is refused, by its name, once there is a body to decode.

A transfer coding before `chunked` (`Transfer-Encoding: gzip, chunked`), or alone on a
body read until the close, is decoded so too: llhttp undoes `chunked`, this the rest, and
then the content coding. `chunked` anywhere but last, or twice, is refused: RFC 9112 §6.1
has a sender apply it once, last (llhttp reads such a body until the close, still coded).
"""

from __future__ import annotations

import zlib
from typing import Protocol

_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate data
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_WBITS = -zlib.MAX_WBITS
# The most decoded bytes one call hands out: the pool's high-water mark, so that a
# compressed body holds no more in memory than a plain one.
DECODED_PIECE_BYTES = 256 * 1024


class UndecodableBody(Exception):
    """A body in a content coding the gateway cannot decode: one it does not know, or
    data that is not in the coding its header names."""


class BodyDecoder(Protocol):
    """Decodes one body, piece by piece."""

    def decode(self, data: bytes) -> bytes:
        """The decoded bytes of `data` (with what earlier calls left), at most
        `DECODED_PIECE_BYTES`; call `more` for the rest while `has_more`."""
        ...

    @property
    def has_more(self) -> bool:
        """Whether decoded bytes may be left that the last call did not hand out."""
        ...


class _Inflate:
    """gzip or deflate through zlib, its output bounded per call."""

    __slots__ = ("_coding", "_has_more", "_is_probing", "_seen", "_zlib")

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._is_probing = coding == "deflate"
        wbits = _ZLIB_WBITS if self._is_probing else _GZIP_WBITS
        self._zlib = zlib.decompressobj(wbits)
        self._seen = b""  # while probing: the input so far, for a second try as raw deflate
        self._has_more = False

    @property
    def has_more(self) -> bool:
        return self._has_more

    def decode(self, data: bytes) -> bytes:
        if self._is_probing:
            return self._probe(data)
        return self._inflate(self._zlib.unconsumed_tail + data)

    def _probe(self, data: bytes) -> bytes:
        """`deflate` as zlib-wrapped data, else as raw deflate: zlib checks its two-byte
        header, so two bytes in tell them apart."""
        self._seen += data
        try:
            output = self._inflate(data)
        except UndecodableBody:
            self._zlib = zlib.decompressobj(_RAW_WBITS)
            self._is_probing = False
            return self._inflate(self._seen)
        if len(self._seen) >= 2:
            self._is_probing = False
            self._seen = b""
        return output

    def _inflate(self, data: bytes) -> bytes:
        if self._zlib.eof:  # what follows the end is no part of it (as aiohttp and httpx)
            self._has_more = False
            return b""
        try:
            output = self._zlib.decompress(data, DECODED_PIECE_BYTES)
        except zlib.error as exc:
            raise UndecodableBody(f"the answer is not valid {self._coding} data: {exc}") from exc
        # Cut at the bound: the rest is in `unconsumed_tail`, or in zlib's window.
        self._has_more = len(output) == DECODED_PIECE_BYTES
        return output


class _Chain:
    """Two codings applied in turn: `first` (the one applied last) undone, then `then`,
    each call's output bounded as each decoder bounds its own."""

    __slots__ = ("_first", "_then")

    def __init__(self, first: BodyDecoder, then: BodyDecoder) -> None:
        self._first = first
        self._then = then

    @property
    def has_more(self) -> bool:
        return self._first.has_more or self._then.has_more

    def decode(self, data: bytes) -> bytes:
        if self._then.has_more:  # called with b"": what `then` holds comes out first
            return self._then.decode(b"")
        return self._then.decode(self._first.decode(data))


class _Refused:
    """A coding the gateway cannot decode: refused with the first byte of body."""

    __slots__ = ("_problem",)

    def __init__(self, problem: str) -> None:
        self._problem = problem

    @property
    def has_more(self) -> bool:
        return False

    def decode(self, data: bytes) -> bytes:
        raise UndecodableBody(self._problem)


_NAMES = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
# The longest coding named in an error: the header is the upstream's to fill.
_MAX_NAMED_CHARS = 40


def decoder_for(
    content_encoding: str | None, transfer_encoding: str | None = None
) -> BodyDecoder | None:
    """The decoder of a body sent with `content_encoding` (its `Content-Encoding`) and
    `transfer_encoding` (its `Transfer-Encoding`, whose final `chunked` the parser
    undoes); None when neither names a coding to undo (none, `identity`, `chunked`)."""
    content = _undone(_listed(content_encoding), "content coding") if content_encoding else None
    if transfer_encoding is None:
        return content
    transfer = _transfer_decoder(transfer_encoding)
    if isinstance(transfer, _Refused) or content is None:
        return transfer
    return content if transfer is None else _Chain(transfer, content)


def _transfer_decoder(transfer_encoding: str) -> BodyDecoder | None:
    """The decoder of the codings `transfer_encoding` lists before its final `chunked`
    (all of them without one: a body read until the close)."""
    codings = _listed(transfer_encoding)
    if codings[-1] == "chunked":  # as llhttp reads it: `chunked,` does not end in chunked
        codings.pop()
    if "chunked" in codings:
        return _Refused(
            f"the answer's Transfer-Encoding {_named(transfer_encoding)!r} holds chunked "
            "other than once and last, where a server applies it (RFC 9112 §6.1): check "
            "what sends it"
        )
    return _undone(codings, "transfer coding")


def _listed(header: str) -> list[str]:
    """The codings a `Content-Encoding` or `Transfer-Encoding` header lists, in order."""
    return [c.strip().lower() for c in header.split(",")]


def _undone(listed: list[str], kind: str) -> BodyDecoder | None:
    """The decoder of the codings of one `kind` a header `listed` (`_listed`)."""
    codings = [c for c in listed if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _NAMES:
        return _Inflate(_NAMES[codings[0]])
    # One it does not know, or several applied in turn.
    return _Refused(
        f"the answer came in {kind} {_named(', '.join(codings))!r}, which the gateway "
        "cannot decode (it asks for identity; gzip and deflate are decoded): check what "
        "compresses it"
    )


def _named(codings: str) -> str:
    """`codings` as an error names them: short and printable, the header being the
    upstream's to fill."""
    if len(codings) > _MAX_NAMED_CHARS or not codings.isprintable():
        return codings[:_MAX_NAMED_CHARS].encode("ascii", "backslashreplace").decode() + "..."
    return codings


__all__ = ["DECODED_PIECE_BYTES", "BodyDecoder", "UndecodableBody", "decoder_for"]
