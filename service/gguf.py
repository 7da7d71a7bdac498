"""The chat templates a GGUF model file holds, read from its metadata (no tensors).

llama-cpp-python offers each as the chat format `chat_template.NAME`: the file's
`tokenizer.chat_template` as `chat_template.default`, and `tokenizer.chat_template.NAME`
as `chat_template.NAME`. It only finds out at a completion that one is missing.

Read by hand: llama-cpp-python reads metadata only by loading the whole model, and the
`gguf` package is not among the gateway's dependencies; the header is a simple
length-prefixed list.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
# Bytes of each fixed-size metadata value type (GGUF's type ids).
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_DEFAULT_KEY = "tokenizer.chat_template"
# Longer keys are a corrupt length, not a key: never read into memory.
_MAX_KEY_BYTES = 65536


class _NotGguf(Exception):
    """The file is not a GGUF this reader understands."""


def chat_templates(path: Path) -> frozenset[str] | None:
    """The `chat_template.NAME` formats of the file at `path`; None when it cannot be read
    as a GGUF (llama.cpp, loading it, says why)."""
    try:
        with path.open("rb") as file:
            return frozenset(_template_formats(file))
    except (OSError, _NotGguf, struct.error, UnicodeDecodeError):
        return None


def _template_formats(file: BinaryIO) -> list[str]:
    if file.read(4) != _MAGIC:
        raise _NotGguf
    _read(file, "<I")  # version
    _read(file, "<Q")  # tensor count
    formats = []
    for _ in range(_read(file, "<Q")):
        length = _read(file, "<Q")
        if length > _MAX_KEY_BYTES:
            raise _NotGguf
        key = file.read(length).decode()
        kind = _read(file, "<I")
        if key == _DEFAULT_KEY:
            formats.append("chat_template.default")
        elif key.startswith(f"{_DEFAULT_KEY}."):
            formats.append(key.removeprefix("tokenizer."))
        _skip_value(file, kind)
    return formats


def _read(file: BinaryIO, layout: str) -> int:
    size = struct.calcsize(layout)
    data = file.read(size)
    if len(data) != size:
        raise _NotGguf
    return int(struct.unpack(layout, data)[0])


def _skip_value(file: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        file.seek(_read(file, "<Q"), 1)
    elif kind == _ARRAY:
        inner, count = _read(file, "<I"), _read(file, "<Q")
        if inner in _FIXED_SIZES:
            file.seek(_FIXED_SIZES[inner] * count, 1)
        else:
            for _ in range(count):
                _skip_value(file, inner)
    elif kind in _FIXED_SIZES:
        file.seek(_FIXED_SIZES[kind], 1)
    else:
        raise _NotGguf
