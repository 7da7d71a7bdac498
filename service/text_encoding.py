"""The encoding a text file's byte order mark names: UTF-16 or UTF-32, else UTF-8.

Windows "Unicode" (Notepad's UTF-16 LE) and PowerShell 5's `>` save text as UTF-16 after a
byte order mark, and Windows editors begin UTF-8 with one. No dependency beyond the
standard library, so that the client library (`gateway_client.text_input`) shares it with
the config loader.
"""

from __future__ import annotations

import codecs

__all__ = [
    "MARK_BYTES",
    "NotMarkedText",
    "encoding_of",
    "following_encoding",
    "marked_text",
    "unicode_name",
]

# UTF-32 LE's mark first: it begins with UTF-16 LE's. The codecs named read the mark to
# learn the byte order, and leave it out of the text; the second codec of each writes text
# that follows the mark in its byte order, without a mark of its own (`following_encoding`).
_MARKED_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "utf-32", "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32", "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16", "utf-16-be"),
)
# The longest mark: what is read of an input to tell its encoding.
MARK_BYTES = 4


def encoding_of(start: bytes) -> str:
    """The encoding of text that begins with `start`: the one its UTF-16 or UTF-32 byte
    order mark names, else UTF-8 (a UTF-8 mark left out)."""
    for mark, encoding, _ in _MARKED_ENCODINGS:
        if start.startswith(mark):
            return encoding
    return "utf-8-sig"


def following_encoding(start: bytes) -> str:
    """The encoding in which to append text to a file that begins with `start`: that of its
    mark, in its byte order, and no mark again (`utf-16` would write one before each
    addition, in this machine's byte order); UTF-8 without a mark."""
    for mark, _, following in _MARKED_ENCODINGS:
        if start.startswith(mark):
            return following
    return "utf-8"


def unicode_name(encoding: str) -> str:
    """`encoding_of`'s answer as a user knows it: `UTF-8`, `UTF-16` or `UTF-32`."""
    return encoding.removesuffix("-sig").upper()


class NotMarkedText(ValueError):
    """A file's bytes hold one that is not of the encoding its byte order mark names."""

    def __init__(self, line: int, name: str) -> None:
        super().__init__(f"line {line}: a byte that is not {name}")
        self.line = line  # the line (from 1) of the first such byte
        self.name = name  # `unicode_name` of the encoding


def marked_text(raw: bytes) -> str:
    """A file's bytes as text, in the encoding its byte order mark names (`encoding_of`).

    Raises:
        NotMarkedText: at the first byte that is not of that encoding (a comment saved
            as Latin-1 by an editor, a UTF-16 file cut mid-character).
    """
    encoding = encoding_of(raw[:MARK_BYTES])
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].decode(encoding, errors="replace").count("\n") + 1
        raise NotMarkedText(line, unicode_name(encoding)) from None
