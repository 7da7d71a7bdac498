"""The encoding a text file's byte order mark names: UTF-16 or UTF-32, else UTF-8.

Windows "Unicode" (Notepad's UTF-16 LE) and PowerShell 5's `>` save text as UTF-16 after a
byte order mark, and Windows editors begin UTF-8 with one. No dependency beyond the
standard library, so that the client library (`gateway_client.text_input`) shares it with
the config loader.
"""

from __future__ import annotations

import codecs

__all__ = ["MARK_BYTES", "encoding_of", "unicode_name"]

# UTF-32 LE's mark first: it begins with UTF-16 LE's. The codecs named read the mark to
# learn the byte order, and leave it out of the text.
_MARKED_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# The longest mark: what is read of an input to tell its encoding.
MARK_BYTES = 4


def encoding_of(start: bytes) -> str:
    """The encoding of text that begins with `start`: the one its UTF-16 or UTF-32 byte
    order mark names, else UTF-8 (a UTF-8 mark left out)."""
    for mark, encoding in _MARKED_ENCODINGS:
        if start.startswith(mark):
            return encoding
    return "utf-8-sig"


def unicode_name(encoding: str) -> str:
    """`encoding_of`'s answer as a user knows it: `UTF-8`, `UTF-16` or `UTF-32`."""
    return encoding.removesuffix("-sig").upper()
