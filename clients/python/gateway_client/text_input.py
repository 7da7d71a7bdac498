"""Text the CLI reads (a prompt, a document, a batch input), in the encoding its byte order
mark names.

Windows "Unicode" (Notepad's UTF-16 LE) and PowerShell 5's `>` save text as UTF-16 after a
byte order mark. Read as UTF-8, every other byte of it was a NUL: the gateway refused such
a prompt or document as holding control characters, and a batch input's every line was
skipped as "not JSON". Text without a mark is UTF-8, bytes that are not replaced (U+FFFD),
as before; a UTF-8 mark (which Windows editors write) is no text.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from service.text_encoding import MARK_BYTES, encoding_of

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


def file_text(path: Path) -> str:
    """The text of the file at `path`, read as `text_lines` reads it (line breaks as
    `\\n`, as a file read as text has them).

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb") as source, text_lines(source) as text:
        return text.read()


def text_lines(source: BinaryIO) -> io.TextIOWrapper:
    """`source`'s text, read as it is needed, in the encoding its mark names
    (`encoding_of`), bytes that do not decode replaced; a pipe's too, which cannot be
    read again once its start was read to find the mark.

    Closing the wrapper leaves `source` open (standard input stays so): whoever opened
    `source` closes it.
    """
    start = source.read(MARK_BYTES)
    replayed = io.BufferedReader(_Replayed(start, source))
    return io.TextIOWrapper(replayed, encoding=encoding_of(start), errors="replace")


class _Replayed(io.RawIOBase):
    """`source` from its start: `start`, the bytes already read from it, then the rest;
    closed, it leaves `source` open."""

    def __init__(self, start: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._start = start
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._start:
            data, self._start = self._start[: len(view)], self._start[len(view) :]
        else:
            data = self._source.read(len(view))
        view[: len(data)] = data
        return len(data)
