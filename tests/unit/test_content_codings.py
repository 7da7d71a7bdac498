"""Content codings of an answer's body: what is decoded, in what pieces, and what is refused."""

from __future__ import annotations

import zlib

import pytest

from service.upstream.codings import DECODED_PIECE_BYTES, UndecodableBody, decoder_for

_TEXT = b'data: {"choices": [{"delta": {"content": "hello"}}]}\n\n' * 50


def _compressed(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


def _decoded(coding: str, pieces: list[bytes]) -> bytes:
    decoder = decoder_for(coding)
    assert decoder is not None
    out = []
    for piece in pieces:
        out.append(decoder.decode(piece))
        while decoder.has_more:
            out.append(decoder.decode(b""))
    return b"".join(out)


@pytest.mark.parametrize(
    ("coding", "wbits"),
    [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15), ("Deflate", -15)],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "deflate-raw-capitalised"],
)
@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 7, 1 << 20])
def test_a_body_is_decoded_whatever_its_pieces(coding, wbits, piece_bytes):
    """gzip and both wrappings of deflate decode the same fed whole or a byte at a time
    (raw deflate is told apart from zlib's header even when that comes in two reads)."""
    body = _compressed(_TEXT, wbits)
    pieces = [body[i : i + piece_bytes] for i in range(0, len(body), piece_bytes)]
    assert _decoded(coding, pieces) == _TEXT


def test_a_body_decoding_to_much_more_is_handed_out_in_bounded_pieces():
    """Each call hands out at most DECODED_PIECE_BYTES, however much one read decodes to."""
    decoded_bytes = 8 * DECODED_PIECE_BYTES + 5
    decoder = decoder_for("gzip")
    assert decoder is not None
    sizes = [len(decoder.decode(_compressed(b"\0" * decoded_bytes, 31)))]
    while decoder.has_more:
        sizes.append(len(decoder.decode(b"")))
    assert max(sizes) == DECODED_PIECE_BYTES
    assert sum(sizes) == decoded_bytes


@pytest.mark.parametrize("value", [None, "", "identity", " Identity ", "identity, identity"])
def test_no_coding_needs_no_decoder(value):
    """Without a coding (or with identity only) the body is handed over as it came."""
    assert decoder_for(value) is None


@pytest.mark.parametrize(
    ("value", "named"),
    [("br", "'br'"), ("zstd", "'zstd'"), ("gzip, br", "'gzip, br'"), ("x" * 80, "'" + "x" * 40)],
)
def test_a_coding_it_cannot_decode_is_refused_by_name(value, named):
    """Any other coding (or several applied in turn) is refused once a body comes, named
    (a long name cut)."""
    decoder = decoder_for(value)
    assert decoder is not None
    with pytest.raises(UndecodableBody, match="content coding") as caught:
        decoder.decode(b"\x1b")
    assert named in str(caught.value)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_data_not_in_its_coding_is_refused(coding):
    """A body that is not the coding its header names fails, naming the coding."""
    decoder = decoder_for(coding)
    assert decoder is not None
    with pytest.raises(UndecodableBody, match=f"not valid {coding} data"):
        decoder.decode(b"plain text, not compressed")
