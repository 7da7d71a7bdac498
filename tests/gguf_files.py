"""Small GGUF files for tests: a header with metadata and tensor entries, no tensor data
unless asked."""

from __future__ import annotations

import struct

_STRING = 8
_Q4_K, _Q4_K_BLOCK = 12, (256, 144)  # ggml type id; values and bytes per block


def gguf_with(metadata: dict[str, str], *, version: int = 3, tensors: int = 0) -> bytes:
    """A GGUF file with string `metadata` and `tensors` Q4_K tensors of 256 values each
    (listed, their data not written: `tensor_data_bytes` says how much it takes)."""
    out = [b"GGUF", struct.pack("<IQQ", version, tensors, len(metadata))]
    for key, value in metadata.items():
        out.append(struct.pack("<Q", len(key)) + key.encode())
        out.append(struct.pack("<IQ", _STRING, len(value)) + value.encode())
    block_bytes = _Q4_K_BLOCK[1]
    for index in range(tensors):
        name = f"blk.{index}.weight".encode()
        out.append(struct.pack("<Q", len(name)) + name)
        out.append(struct.pack("<IQIQ", 1, _Q4_K_BLOCK[0], _Q4_K, index * block_bytes))
    return b"".join(out)


def whole_gguf(metadata: dict[str, str], *, tensors: int) -> bytes:
    """`gguf_with` followed by its tensors' data (zeros), aligned as GGUF's default says."""
    header = gguf_with(metadata, tensors=tensors)
    padding = -len(header) % 32
    return header + b"\0" * (padding + tensors * _Q4_K_BLOCK[1])


# A GGUF llama.cpp cannot load (no architecture, no tensors) that the gateway's checks of
# the file pass: the model file of the tests that stand a script in for llama.cpp.
STAND_IN_MODEL = gguf_with({})
