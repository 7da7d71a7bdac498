"""Unit tests for the incremental SSE decoder (service.upstream.sse)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.upstream.sse import SSEDecoder


def decode(*chunks: bytes) -> list[str]:
    """Feed `chunks` in order to one decoder and return every event it completed."""
    decoder = SSEDecoder()
    events: list[str] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"data: hello\n\n", ["hello"], id="lf"),
        pytest.param(b"data: hello\r\n\r\n", ["hello"], id="crlf"),
        pytest.param(b"data: hello\r\rdata: next\r\r", ["hello", "next"], id="lone-cr"),
        pytest.param(b"data: a\r\n\ndata: b\r\r\n", ["a", "b"], id="mixed-line-ends"),
        pytest.param(b"data:hello\n\n", ["hello"], id="data-without-space"),
        pytest.param(b"data:  two spaces\n\n", [" two spaces"], id="only-one-space-stripped"),
        pytest.param(b"data:\n\n", [""], id="empty-data"),
        pytest.param(b"data\n\n", [""], id="data-field-without-colon"),
        # The spec's own example: "fires two events", the last block is discarded.
        pytest.param(b"data\n\ndata\ndata\n\ndata:", ["", "\n"], id="spec-empty-data-example"),
        pytest.param(b"data: line1\ndata: line2\n\n", ["line1\nline2"], id="multi-line"),
        pytest.param(b"data: a\ndata:\ndata: b\n\n", ["a\n\nb"], id="multi-line-with-empty"),
        pytest.param(b": keep-alive\n\ndata: x\n\n", ["x"], id="comment-alone"),
        pytest.param(b"data: x\n: ping\ndata: y\n\n", ["x\ny"], id="comment-inside-event"),
        pytest.param(b":\n\n:\n\n", [], id="bare-comments"),
        pytest.param(
            b"event: message\nid: 7\nretry: 100\nfoo: bar\ndata: x\n\n", ["x"], id="unknown-fields"
        ),
        pytest.param(b"event: ping\n\n", [], id="event-without-data"),
        pytest.param(b"\n\n\n\ndata: x\n\n\n\n", ["x"], id="extra-blank-lines"),
        pytest.param(b"data: 1\n\ndata: 2\n\ndata: 3\n\n", ["1", "2", "3"], id="several-events"),
        pytest.param(b"data: [DONE]\n\n", ["[DONE]"], id="done-marker"),
        pytest.param("data: héllo 世界\n\n".encode(), ["héllo 世界"], id="utf8"),
        pytest.param(b"data: x\n", [], id="no-blank-line-yet"),
        pytest.param(b"datum: x\n\n", [], id="similar-field-name"),
    ],
)
def test_decodes_whole_feed(raw: bytes, expected: list[str]) -> None:
    """A stream fed in one piece yields exactly the expected event data."""
    assert decode(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"data: hello\n\n", ["hello"], id="lf"),
        pytest.param(b"data: hello\r\n\r\n", ["hello"], id="crlf"),
        pytest.param(b"data: a\r\rdata: b\r\r", ["a", "b"], id="lone-cr"),
        pytest.param(b"data: a\ndata: b\n\n: c\n\ndata: d\n\n", ["a\nb", "d"], id="multi"),
        pytest.param("data: 世界\r\n\r\n".encode(), ["世界"], id="utf8-crlf"),
    ],
)
def test_byte_by_byte_matches_whole(raw: bytes, expected: list[str]) -> None:
    """Feeding one byte at a time yields the same events as feeding the whole stream."""
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == expected


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param((b"data: a\r", b"\n\r\n"), id="cr|lf"),
        pytest.param((b"data: a\r\n\r", b"\n"), id="second-crlf-split"),
        pytest.param((b"data: a\r", b"", b"\n\r\n"), id="empty-feed-between"),
        pytest.param((b"data: a\r\n", b"\r", b"\n"), id="blank-crlf-split"),
    ],
)
def test_crlf_split_across_feeds_counts_once(chunks: tuple[bytes, ...]) -> None:
    """A CRLF whose CR ends one feed and whose LF starts the next is one line end."""
    assert decode(*chunks) == ["a"]


def test_crlf_split_does_not_end_event_early() -> None:
    """A CR at the end of a feed followed by LF does not make an extra blank line."""
    assert decode(b"data: a\r", b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_lone_cr_at_end_of_feed_completes_the_event() -> None:
    """An event ended by CR CR is delivered by that feed, not only when more bytes come."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]\r\r") == ["[DONE]"]
    assert not decoder.has_pending


def test_lone_cr_then_data_after_split() -> None:
    """After a CR at the end of a feed, a following non-LF byte starts a new line."""
    assert decode(b"data: a\r", b"\rdata: b\r", b"\r") == ["a", "b"]


def test_event_split_across_feeds() -> None:
    """An event split in the middle of a field is delivered once it is complete."""
    decoder = SSEDecoder()
    assert decoder.feed(b"da") == []
    assert decoder.feed(b"ta: hel") == []
    assert decoder.feed(b"lo\n") == []
    assert decoder.feed(b"\n") == ["hello"]


def test_utf8_character_split_across_feeds() -> None:
    """A multi-byte UTF-8 character cut between feeds is decoded whole."""
    raw = "data: 世\n\n".encode()
    cut = raw.index(b"\xe4") + 1
    assert decode(raw[:cut], raw[cut:]) == ["世"]


@pytest.mark.parametrize(
    ("fed", "pending"),
    [
        pytest.param(b"", False, id="nothing"),
        pytest.param(b"data: x\n\n", False, id="complete-event"),
        pytest.param(b"data: x\n", True, id="data-line-without-blank"),
        pytest.param(b"data: x", True, id="partial-line"),
        pytest.param(b"data: x\ndata: y\n\ndata: z", True, id="second-event-cut"),
        pytest.param(b": keep-alive\n\n", False, id="comment-only"),
        pytest.param(b"data: x\r\n\r\n", False, id="crlf-complete"),
        pytest.param(b"data: x\r\n\r", False, id="crlf-complete-but-last-lf-unseen"),
    ],
)
def test_has_pending(fed: bytes, pending: bool) -> None:
    """`has_pending` is true exactly when an event was started but not finished."""
    decoder = SSEDecoder()
    decoder.feed(fed)
    assert decoder.has_pending is pending


@pytest.mark.parametrize(
    ("fed", "data"),
    [
        pytest.param(b"", None, id="nothing"),
        pytest.param(b"data: x\n\n", None, id="every-event-complete"),
        pytest.param(b"data: [DONE]", "[DONE]", id="last-line-without-line-end"),
        pytest.param(b"data: [DONE]\n", "[DONE]", id="without-blank-line"),
        pytest.param(b"data: [DONE]\r\n", "[DONE]", id="crlf-without-blank-line"),
        pytest.param(b"data: [DO", "[DO", id="partial-value"),
        pytest.param(b"da", None, id="partial-field-name"),
        pytest.param(b"data: a\ndata: [DONE]", "a\n[DONE]", id="several-lines"),
        pytest.param(b"data: x\n\nevent: ping\n: c\n", None, id="no-data-field"),
        pytest.param(b"data:\n", "", id="empty-data"),
    ],
)
def test_data_at_end(fed: bytes, data: str | None) -> None:
    """`data_at_end` is the data of the event left open, its last line taken as whole."""
    decoder = SSEDecoder()
    decoder.feed(fed)
    assert decoder.data_at_end() == data


def test_pending_clears_once_event_completes() -> None:
    """A cut event stops being pending once its blank line arrives."""
    decoder = SSEDecoder()
    decoder.feed(b"data: x\n")
    assert decoder.has_pending
    assert decoder.feed(b"\n") == ["x"]
    assert not decoder.has_pending


_PAYLOAD = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=20,
)
_EVENT = st.lists(_PAYLOAD, min_size=1, max_size=3)
_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[str], list[int]]:
    """A valid event stream, the event data it encodes, and cut points into it."""
    eol = draw(_EOL)
    events = draw(st.lists(_EVENT, max_size=5))
    parts: list[bytes] = []
    expected: list[str] = []
    for lines in events:
        if draw(st.booleans()):
            parts.append(b": keep-alive" + eol)
        for line in lines:
            # The space after the colon is optional, so a value that starts with a
            # space must be written after one.
            space = b" " if line.startswith(" ") or draw(st.booleans()) else b""
            parts.append(b"data:" + space + line.encode() + eol)
        parts.append(eol)
        expected.append("\n".join(lines))
    raw = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    return raw, expected, cuts


@settings(max_examples=150, deadline=None, database=None)
@given(_streams())
def test_random_splits_decode_identically(case: tuple[bytes, list[str], list[int]]) -> None:
    """Any split of a valid event stream into feeds decodes to the same events."""
    raw, expected, cuts = case
    bounds = [0, *cuts, len(raw)]
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    decoder = SSEDecoder()
    events: list[str] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    assert events == expected
    assert not decoder.has_pending


def test_byte_order_mark_at_the_start_is_skipped() -> None:
    """A BOM opening the stream is not part of the first line (so its event is kept)."""
    raw = b"\xef\xbb\xbfdata: first\n\ndata: second\n\n"
    assert decode(raw) == ["first", "second"]
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == ["first", "second"]


def test_byte_order_mark_is_only_skipped_at_the_start() -> None:
    """A BOM later in the stream starts a line that is no `data:` field."""
    assert decode(b"data: a\n\n", b"\xef\xbb\xbfdata: b\n\ndata: c\n\n") == ["a", "c"]


def test_empty_data_lines_count_in_the_pending_size() -> None:
    """Each `data:` line adds a line end to the event's data (and an entry to hold)."""
    decoder = SSEDecoder()
    decoder.feed(b"data:\n" * 1000)
    assert decoder.pending_bytes >= 1000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b'error: {"code":400,"message":"too long"}\n\n',
            ['{"error":{"code":400,"message":"too long"}}'],
            id="llama-cpp-error-field",
        ),
        pytest.param(
            b'event: error\ndata: {"message":"overloaded"}\n\n',
            ['{"error":{"message":"overloaded"}}'],
            id="error-event-of-a-bare-object",
        ),
        pytest.param(
            b'event: error\ndata: {"error": {"message": "x"}}\n\n',
            ['{"error": {"message": "x"}}'],
            id="error-event-of-an-error-object",
        ),
        pytest.param(
            b"event: error\ndata: Internal error\n\n",
            ['{"error":"Internal error"}'],
            id="error-event-of-text",
        ),
        pytest.param(
            b"event: error\n\ndata: x\n\n", ["x"], id="error-event-without-data-marks-no-other"
        ),
        pytest.param(
            b"event: error\ndata:\n\nerror: {}\n\n",
            ['{"error":{"message":""}}'] * 2,
            id="error-events-without-a-message",
        ),
        pytest.param(
            b'event: error\ndata: {"message":"a"}\n\ndata: {"b": 1}\n\n',
            ['{"error":{"message":"a"}}', '{"b": 1}'],
            id="error-type-lasts-one-event",
        ),
    ],
)
def test_error_events_come_as_error_objects(raw: bytes, expected: list[str]) -> None:
    """An `event: error` event, or llama.cpp's `error:` field, comes out as an error object,
    whole or fed a byte at a time."""
    assert decode(raw) == expected
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == expected
