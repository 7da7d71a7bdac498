"""What a GGUF model file holds, read from its header: its chat templates (metadata), and
whether it is a whole GGUF llama.cpp can load at all (`model_file_problem`), both from one
walk of the header, remembered while the file stays as it is.

llama-cpp-python offers each as the chat format `chat_template.NAME`: the file's
`tokenizer.chat_template` as `chat_template.default`, and `tokenizer.chat_template.NAME`
as `chat_template.NAME`. It only finds out at a completion that one is missing.

Read by hand: llama-cpp-python reads metadata only by loading the whole model, and the
`gguf` package is not among the gateway's dependencies; the header is a simple
length-prefixed list.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from service.memo import BoundedMemo

_MAGIC = b"GGUF"
# The versions llama.cpp loads: it refuses GGUFv1 ("no longer supported") and any later
# than its own, 3.
_VERSIONS = frozenset({2, 3})
# Bytes of each fixed-size metadata value type (GGUF's type ids).
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_DEFAULT_KEY = "tokenizer.chat_template"
# Longer keys are a corrupt length, not a key: never read into memory.
_MAX_KEY_BYTES = 65536
# Longer templates are not read (`chat_template_text`): real ones take a few KiB.
_MAX_TEMPLATE_BYTES = 1 << 20
_ALIGNMENT_KEY, _DEFAULT_ALIGNMENT = "general.alignment", 32
_UINT32 = 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
# (values per block, bytes per block) of the ggml tensor types of common model files, by
# type id; a tensor of another type counts from its offset alone.
_TENSOR_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
    28: (1, 8), 30: (1, 2),
}  # fmt: skip


class _NotGguf(Exception):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True, slots=True)
class ModelFileHeader:
    """What the header of a GGUF model file tells: why llama.cpp could not load the file
    (`model_file_problem`; None when whole as far as its header tells), and its
    `chat_template.NAME` formats (`chat_templates`; None when its metadata cannot be read
    whole as a GGUF llama.cpp loads: a file cut short in its tensor list, which comes
    after, still has them)."""

    problem: str | None
    chat_templates: frozenset[str] | None
    # The text of each of `chat_templates` (one over `_MAX_TEMPLATE_BYTES` left out).
    template_texts: Mapping[str, str] = field(default_factory=dict)


# A file as read: its path (named in a problem), device, inode, size and times.
_FileIdentity = tuple[str, int, int, int, int, int]
# The last file read, and what its header told: `serve` checks the model file, then the
# local model's start checks it again and reads its chat templates. Each walk of the
# shipped Gemma file's header (its vocabulary's 262,144 strings) takes a fifth of a
# second's CPU. A file replaced or written to since is another identity, read again.
_LAST_READ: BoundedMemo[_FileIdentity, ModelFileHeader] = BoundedMemo(1)


def chat_templates(path: Path) -> frozenset[str] | None:
    """The `chat_template.NAME` formats of the file at `path`; None when it cannot be read
    as a GGUF (llama.cpp, loading it, says why)."""
    return model_file_header(path).chat_templates


def chat_template_text(path: Path, chat_format: str) -> str | None:
    """The text of the template the `chat_template.NAME` format `chat_format` renders with,
    from the file at `path`; None when the file lacks it, or it is over
    `_MAX_TEMPLATE_BYTES`."""
    return model_file_header(path).template_texts.get(chat_format)


def model_file_problem(path: Path) -> str | None:
    """Why the file at `path` is no GGUF model llama.cpp could load: not a GGUF at all (a
    text file, an HTML error page saved under the model's name), a version llama.cpp does
    not read, or cut short (a download that did not finish); None when it is whole as far
    as its header tells.

    llama.cpp finds the same only once started, seconds later, in a line of its own.
    """
    return model_file_header(path).problem


def model_file_header(path: Path) -> ModelFileHeader:
    """What the header of the file at `path` tells; read once while the file stays as it
    was (`_LAST_READ`)."""
    with contextlib.suppress(OSError):
        known = _LAST_READ.get(_identity(path, os.stat(path)))
        if known is not None:
            return known
    identity, header = _read_header(path)
    if identity is not None:
        _LAST_READ.put(identity, header)
    return header


def _identity(path: Path, status: os.stat_result) -> _FileIdentity:
    # ctime too: a copy that keeps its source's mtime (`cp -p`, `rsync -t`) changes it.
    return (
        str(path), status.st_dev, status.st_ino, status.st_size,
        status.st_mtime_ns, status.st_ctime_ns,
    )  # fmt: skip


def _read_header(path: Path) -> tuple[_FileIdentity | None, ModelFileHeader]:
    """The file's identity as opened (None when it could not be), and its header."""
    try:
        with path.open("rb") as file:
            status = os.fstat(file.fileno())  # before reading: a write since is seen next
            return _identity(path, status), _header(file, path, status.st_size)
    except OSError as exc:
        return None, ModelFileHeader(f"{path} cannot be read: {exc.strerror or exc}", None)


def _header(file: BinaryIO, path: Path, size: int) -> ModelFileHeader:
    """The header `file` reads from its start, `size` bytes long; raises OSError."""
    head = file.read(8)
    if len(head) < 8 or head[:4] != _MAGIC:
        problem = (
            f"{path} is not a GGUF model file: it begins with {head[:8]!r}, where a "
            f"GGUF file begins with {_MAGIC!r} and its version"
        )
        return ModelFileHeader(problem, None)
    (version,) = struct.unpack("<I", head[4:])
    if version not in _VERSIONS:
        problem = (
            f"{path} is GGUF version {version}, which llama.cpp cannot load "
            "(it loads versions 2 and 3)"
        )
        return ModelFileHeader(problem, None)
    file.seek(0)
    cut_short = f"{path} is cut short or corrupt: its GGUF header does not read to its end"
    try:
        tensors, alignment, read = _walk_metadata(file)
    except (_NotGguf, struct.error, UnicodeDecodeError):
        return ModelFileHeader(cut_short, None)
    if file.tell() > size:  # a value skipped past the file's end: the metadata is cut
        return ModelFileHeader(cut_short, None)
    templates = frozenset(read)
    texts = {name: text for name, text in read.items() if text is not None}
    try:
        needed = _data_end(file, tensors, alignment)
    except (_NotGguf, struct.error):
        # The tensor list comes after the metadata: its templates were read whole.
        return ModelFileHeader(cut_short, templates, texts)
    if needed > size:
        problem = (
            f"{path} is cut short: it holds {size} bytes, where its tensors end at byte "
            f"{needed} (a download or copy that did not finish?)"
        )
        return ModelFileHeader(problem, templates, texts)
    return ModelFileHeader(None, templates, texts)


def _walk_metadata(file: BinaryIO) -> tuple[int, int, dict[str, str | None]]:
    """The tensor count, the data's alignment and the `chat_template.NAME` formats, each
    with its text (None when not a string, or too long to read), of the header `file`
    reads from its start, read up to its tensor list."""
    tensors, entries = _counts(file)
    alignment = _DEFAULT_ALIGNMENT
    templates: dict[str, str | None] = {}
    for key, kind in _metadata(file, entries):
        name = _template_name(key)
        if name is not None and kind == _STRING:
            templates[name] = _read_text(file)
            continue
        if name is not None:
            templates[name] = None
        if key == _ALIGNMENT_KEY and kind == _UINT32:
            alignment = _read(file, "<I") or _DEFAULT_ALIGNMENT
        else:
            _skip_value(file, kind)
    return tensors, alignment, templates


def _template_name(key: str) -> str | None:
    """The `chat_template.NAME` format metadata `key` holds the template of, if any."""
    if key == _DEFAULT_KEY:
        return "chat_template.default"
    if key.startswith(f"{_DEFAULT_KEY}."):
        return key.removeprefix("tokenizer.")
    return None


def _read_text(file: BinaryIO) -> str | None:
    """The string value `file` reads next; None (skipped) when over `_MAX_TEMPLATE_BYTES`."""
    length = _read(file, "<Q")
    if length > _MAX_TEMPLATE_BYTES:
        file.seek(length, 1)
        return None
    data = file.read(length)
    if len(data) != length:
        raise _NotGguf
    # As a value skipped: not UTF-8 is llama.cpp's to say, at the render.
    return data.decode(errors="replace")


def _data_end(file: BinaryIO, tensors: int, alignment: int) -> int:
    """How long a file must be to hold every one of the `tensors` whose entries `file`
    reads next, their data aligned to `alignment`."""
    ends = [_tensor_end(file) for _ in range(tensors)]
    if not ends:  # a file of metadata alone needs no padding to its (empty) data
        return file.tell()
    data_start = -(-file.tell() // alignment) * alignment
    return data_start + max(ends)


def _tensor_end(file: BinaryIO) -> int:
    """Where the tensor whose entry `file` reads next ends, from the data's start."""
    file.seek(_read(file, "<Q"), 1)  # its name
    dims = _read(file, "<I")
    if dims > _MAX_DIMS:
        raise _NotGguf
    values = 1
    for _ in range(dims):
        values *= _read(file, "<Q")
    kind, offset = _read(file, "<I"), _read(file, "<Q")
    per_block, block_bytes = _TENSOR_BLOCKS.get(kind, (1, 0))
    return offset + values // per_block * block_bytes


def _counts(file: BinaryIO) -> tuple[int, int]:
    """The tensor and metadata entry counts of the GGUF `file` reads from its start."""
    if file.read(4) != _MAGIC:
        raise _NotGguf
    _read(file, "<I")  # version
    return _read(file, "<Q"), _read(file, "<Q")


def _metadata(file: BinaryIO, entries: int) -> Iterator[tuple[str, int]]:
    """Each of the `entries` metadata keys `file` reads next, with its value's type id;
    the caller reads or skips the value before the next."""
    for _ in range(entries):
        length = _read(file, "<Q")
        if length > _MAX_KEY_BYTES:
            raise _NotGguf
        yield file.read(length).decode(), _read(file, "<I")


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
