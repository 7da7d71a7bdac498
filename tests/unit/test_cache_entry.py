"""Stored entries round-trip every field exactly, and hits report saved cost."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from service.cache import CachedAnswer
from service.cache.entry import _ENTRY_VERSION, EntryDecodeError, NewerEntryError, decode_entry
from service.domain import Completion, FinishReason, Timings, Usage

COMPLETION = Completion(
    id="chatcmpl-1",
    model="fake-model",
    content='héllo 👋\n"quoted"',
    finish_reason=FinishReason.LENGTH,
    usage=Usage(input_tokens=7, output_tokens=3, cached_input_tokens=2, is_estimated=True),
    cost_usd=(0.1 + 0.2) / 1000,  # no short decimal form; what 10 tokens can cost
    upstream="up0",
    attempts=2,
    timings=Timings(total_ms=12.345678901234, upstream_ms=1e-9, time_to_first_token_ms=3.0),
    saved_cost_usd=0.0,
    is_cache_hit=False,
    dropped_messages=1,
)


def test_entry_round_trips_exactly() -> None:
    """decode(encode(x)) == x, floats and unicode included."""
    answer = CachedAnswer(COMPLETION, ("hé", "llo 👋\n", '"quoted"'))
    assert CachedAnswer.decode(answer.encode()) == answer


def test_the_text_is_stored_once_and_entries_of_version_3_still_read() -> None:
    """An entry holds its text once, as the deltas; one written by version 3 (its text
    whole as well) decodes to the same answer."""
    answer = CachedAnswer(COMPLETION, ("hé", "llo 👋\n", '"quoted"'))
    assert orjson.loads(answer.encode())["c"]["content"] == ""
    # An answer whose content is not its deltas joined keeps it as it is.
    apart = CachedAnswer(dataclasses.replace(COMPLETION, content=""), ("hello",))
    assert CachedAnswer.decode(apart.encode()) == apart
    older = orjson.dumps({"v": 3, "c": COMPLETION, "d": answer.deltas})
    assert CachedAnswer.decode(older) == answer


def test_unary_answer_replays_as_one_delta() -> None:
    """A unary answer's content becomes its single delta."""
    assert CachedAnswer.of_unary(COMPLETION).deltas == (COMPLETION.content,)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"v": 99, "c": {}, "d": []}', b'{"v": 1, "c": {}, "d": []}'],
)
def test_garbage_is_rejected(data: bytes) -> None:
    """Bytes that are not a current entry raise EntryDecodeError."""
    with pytest.raises(EntryDecodeError):
        CachedAnswer.decode(data)


@pytest.mark.parametrize(
    ("reason", "cacheable"),
    [
        (FinishReason.STOP, True),
        (FinishReason.LENGTH, True),
        (FinishReason.TOOL_CALLS, True),
        (FinishReason.CONTENT_FILTER, False),
        (FinishReason.UNKNOWN, False),
    ],
)
def test_only_stop_length_and_tool_calls_are_cacheable(
    reason: FinishReason, cacheable: bool
) -> None:
    """Content-filtered answers and unknown finish reasons are never stored."""
    answer = CachedAnswer.of_unary(Completion("i", "m", "x", reason, Usage(), 0.0, "u"))
    assert answer.is_cacheable is cacheable


@pytest.mark.parametrize(
    ("content", "reasoning", "cacheable"),
    [
        ("x", "", True),
        (" x\n", "", True),
        ("", "", False),
        (" \n\t", "", False),
        ("\u3000", "", False),
        (" \n", "thought", True),
        ("", "\n\n", False),  # reasoning of whitespace alone is none either
        (" ", " \n", False),
        ("x", "\n", True),
        ("\u200b", "", False),  # invisible characters alone are none either
        ("\u2060 ", "\ufeff", False),
        ("\u200bx", "", True),
    ],
)
def test_text_of_whitespace_alone_is_no_text(content: str, reasoning: str, cacheable: bool) -> None:
    """An answer whose text and reasoning are whitespace alone is empty, as an empty one
    is, unless it has tool calls: a provider's blank reply, served for its whole TTL."""
    completion = Completion("i", "m", content, FinishReason.STOP, Usage(), 0.0, "u")
    answer = CachedAnswer.of_unary(dataclasses.replace(completion, reasoning=reasoning))
    assert answer.is_cacheable is cacheable


def test_served_from_cache_charges_nothing_and_reports_savings() -> None:
    """A hit costs 0, saves the original cost, and made no upstream attempt."""
    hit = CachedAnswer.of_unary(COMPLETION).served_from_cache(total_ms=1.0, first_token_ms=0.5)
    assert (hit.cost_usd, hit.saved_cost_usd, hit.is_cache_hit) == (0.0, COMPLETION.cost_usd, True)
    assert hit.attempts == 0
    assert hit.timings == Timings(total_ms=1.0, upstream_ms=0.0, time_to_first_token_ms=0.5)
    assert (hit.content, hit.usage, hit.id) == (COMPLETION.content, COMPLETION.usage, "chatcmpl-1")


@pytest.mark.parametrize(
    ("waited_ms", "expected"),
    [
        (None, (0.0, 0.0)),  # read from the store: it waited on no call
        (0.0, (0.0, 0.0)),  # joined as the answer came
        (150.0, (150.0, 0.0)),  # joined while the leader was upstream
        (350.0, (200.0, 150.0)),  # joined while the leader waited in the limiter
        (600.0, (200.0, 300.0)),  # joined before: the rest was the leader's own work
    ],
)
def test_a_followers_wait_splits_as_its_leaders_call(
    waited_ms: float | None, expected: tuple[float, float]
) -> None:
    """A follower's wait on a leader that queued 300 ms in its upstream's limiter, then
    was upstream 200 ms, is `(upstream_ms, queued_ms)` as the leader's, counted back from
    the answer: the upstream part last, the limiter's before it."""
    leader = dataclasses.replace(
        COMPLETION, timings=Timings(total_ms=520.0, upstream_ms=200.0, queued_ms=300.0)
    )
    hit = CachedAnswer.of_unary(leader).served_from_cache(
        total_ms=700.0, first_token_ms=700.0, waited_ms=waited_ms
    )
    assert (hit.timings.upstream_ms, hit.timings.queued_ms) == expected
    assert (hit.is_cache_hit, hit.is_coalesced) == (True, waited_ms is not None)


def test_an_entry_stores_no_coalesced_flag() -> None:
    """`is_coalesced` says how one caller was answered, not what the answer is: an entry
    leaves it out, so that a gateway of a release without it (sharing Redis during a
    rolling upgrade) reads the entry, and it decodes as the answer it was."""
    follower = CachedAnswer.of_unary(COMPLETION).served_from_cache(
        total_ms=1.0, first_token_ms=1.0, waited_ms=1.0
    )
    answer = CachedAnswer.of_unary(follower)
    assert "is_coalesced" not in orjson.loads(answer.encode())["c"]
    assert decode_entry(answer.encode()).completion.is_coalesced is False


def test_served_from_cache_keeps_every_other_field() -> None:
    """Every field a hit does not override is the stored completion's (new fields too)."""
    hit = CachedAnswer.of_unary(COMPLETION).served_from_cache(total_ms=1.0, first_token_ms=0.5)
    overridden = {
        "cost_usd",
        "saved_cost_usd",
        "is_cache_hit",
        "is_coalesced",
        "attempts",
        "timings",
    }
    for field in dataclasses.fields(Completion):
        if field.name not in overridden:
            assert getattr(hit, field.name) == getattr(COMPLETION, field.name), field.name


def test_decoding_the_same_bytes_again_reuses_the_answer() -> None:
    """A hot entry is decoded once; equal bytes read again give the same answer object."""
    data = CachedAnswer.of_unary(COMPLETION).encode()
    first = decode_entry(data)
    assert decode_entry(bytes(bytearray(data))) is first  # equal bytes, another object
    assert first == CachedAnswer.of_unary(COMPLETION)


def test_large_entries_decode_afresh_and_garbage_always_raises() -> None:
    """Entries over 16 KiB are not remembered; undecodable bytes raise on every read."""
    big = CachedAnswer.of_unary(dataclasses.replace(COMPLETION, content="x" * 20_000)).encode()
    assert decode_entry(big) == decode_entry(big)
    assert decode_entry(big) is not decode_entry(big)
    for _ in range(2):
        with pytest.raises(EntryDecodeError):
            decode_entry(b'{"v": 1, "c": {}, "d": []}')


@pytest.mark.parametrize(
    ("version", "said"), [(99, "entry version 99"), ("x" * 100_000, "entry version str")]
)
def test_an_unknown_version_is_named_briefly(version: object, said: str) -> None:
    """The error is logged (`cache.bad_entry`): a value some other writer left in the
    shared store is named by its type, never copied into the log whatever its length."""
    with pytest.raises(EntryDecodeError) as caught:
        decode_entry(orjson.dumps({"v": version, "c": {}, "d": []}))
    assert str(caught.value) == said


@pytest.mark.parametrize(
    ("version", "is_newer"),
    [
        (_ENTRY_VERSION + 1, True),
        (2**62, True),
        (0, False),
        (-1, False),
        (float(_ENTRY_VERSION + 1), False),
        (str(_ENTRY_VERSION + 1), False),
        # Equal to readable versions (`True == 1`), and none: no entry this gateway wrote.
        (float(_ENTRY_VERSION), False),
        (True, False),
    ],
)
def test_only_a_higher_version_number_is_a_newer_gateways_entry(
    version: object, is_newer: bool
) -> None:
    """A version number above the one this gateway writes is a newer gateway's entry (a
    rolling upgrade's, read as a quiet miss); any other unreadable one is a bad entry."""
    entry = orjson.loads(CachedAnswer.of_unary(COMPLETION).encode())
    entry["v"] = version
    with pytest.raises(EntryDecodeError) as caught:
        decode_entry(orjson.dumps(entry))
    assert isinstance(caught.value, NewerEntryError) is is_newer
