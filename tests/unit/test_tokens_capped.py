"""An estimate capped by a limit: the same figure as the whole text's estimate capped,
read no further into a long text than the limit needs."""

import itertools
import random
from collections.abc import Iterator

import pytest

from service import tokens
from service.domain import ToolCall
from service.tokens import (
    estimate_output_tokens,
    estimate_text_tokens,
    estimate_text_tokens_up_to,
)
from tests.unit.test_tokens_bulk import ASCII_PIECES, BOUNDARIES, NON_ASCII_PIECES

PIECES = [*ASCII_PIECES, *NON_ASCII_PIECES, *BOUNDARIES, "aBc", "xY", "Abc", "====", "ab"]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 2,000 characters past 4,000, so that texts of tens of KB stop early."""
    monkeypatch.setattr(tokens, "_WHOLE_MAX_CHARS", 4000)
    monkeypatch.setattr(tokens, "_PIECE_CHARS", 2000)


def _texts() -> Iterator[tuple[str, str]]:
    rng = random.Random(19)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    yield "words", "the gateway relays words " * 2000
    yield "mixed", "".join(rng.choice(PIECES) for _ in range(8000))
    yield "mixed-spaced", " ".join(rng.choice(PIECES) for _ in range(8000))
    yield "emoji", "\U0001f600" * 30_000
    emoji = ["\U0001f389\U0001f680", "\U0001f600", " ", "x"]
    yield "emoji-runs", "".join(rng.choice(emoji) for _ in range(20_000))
    yield "cjk", "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(30_000))
    yield "rule", "=" * 100_000
    yield "rule-runs", "".join(rng.choice(["====", "=" * 300, "-" * 9, " "]) for _ in range(2000))
    yield "no-whitespace", "".join(rng.choice(letters) for _ in range(60_000))
    yield "case-flips", "aBcDeFgHiJ" * 6000
    yield "base64", "".join(rng.choice(letters + "0123456789+/") for _ in range(60_000))
    yield "spaces", " " * 50_000 + "x"
    yield "newlines", "\n" * 50_000
    yield (
        "newlines-and-words",
        "".join(rng.choice(["\n", "x\n", "ab\n\n", "Cd"]) for _ in range(20_000)),
    )


TEXTS = dict(_texts())


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("name", TEXTS)
def test_the_capped_estimate_is_the_whole_estimate_capped(
    name: str, estimator_reads: list[int]
) -> None:
    text = TEXTS[name]
    whole = estimate_text_tokens(text)
    for limit in (0, 1, whole // 10, whole // 2, whole - 17, whole - 1, whole, whole + 1):
        capped = estimate_text_tokens_up_to(text, limit)
        assert capped == min(whole, limit), (name, limit)
        assert capped <= whole
    estimator_reads.clear()
    estimate_text_tokens_up_to(text, whole // 2)
    assert sum(estimator_reads) < len(text)  # stopped early, not estimated whole


@pytest.mark.usefixtures("small_pieces")
def test_a_low_limit_stops_reading_a_long_text(estimator_reads: list[int]) -> None:
    text = TEXTS["mixed-spaced"]
    assert estimate_text_tokens_up_to(text, 500) == 500
    assert 0 < sum(estimator_reads) <= 2 * tokens._PIECE_CHARS < len(text)


def test_joining_two_texts_takes_off_no_more_than_the_margin() -> None:
    """The argument for stopping early: the estimate of `a + b` is at least the sum of
    theirs minus 4 (`_JOIN_LOSS` keeps a margin over it), for adversarial joins."""
    estimate = tokens._estimate
    worst = 0
    for a, b in itertools.product(PIECES, repeat=2):
        for left, right in ((a, b), ("q" + a, b + "q"), (a * 3, b * 3), ("A" + a, b + "Z")):
            worst = max(worst, estimate(left) + estimate(right) - estimate(left + right))
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice(PIECES) for _ in range(30))
        cut = rng.randrange(len(text) + 1)
        worst = max(worst, estimate(text[:cut]) + estimate(text[cut:]) - estimate(text))
    assert 0 < worst <= 4 < tokens._JOIN_LOSS


def test_a_clean_join_adds_up_exactly() -> None:
    """Split after a lone space or newline, the pieces' estimates sum to the text's: a
    text read whole in pieces gets the figure it gets read at once."""
    rng = random.Random(11)
    separators = [" ", "\n", "  ", "\n\n", "", " \n", "\n "]
    texts = [
        *(text[:3000] for text in TEXTS.values()),
        *(
            "".join(rng.choice(PIECES) + rng.choice(separators) for _ in range(40))
            for _ in range(500)
        ),
    ]
    joins = 0
    for text in texts:
        for join in itertools.islice(tokens._CLEAN_JOIN.finditer(text), 0, None, 5):
            left, right = text[: join.end()], text[join.end() :]
            assert tokens._estimate(left) + tokens._estimate(right) == tokens._estimate(text)
            joins += 1
    assert joins > 1000


def test_pieces_end_at_a_clean_join_when_there_is_one() -> None:
    text = "word " * 200_000
    end, clean = tokens._piece_end(text, 0)
    assert clean
    assert tokens._PIECE_CHARS - tokens._CLEAN_JOIN_REACH <= end <= tokens._PIECE_CHARS
    assert text[end - 1] == " "
    assert tokens._piece_end("x" * 600_000, 0) == (tokens._PIECE_CHARS, False)
    assert tokens._piece_end("x" * 600_000, 500_000) == (600_000, True)


@pytest.mark.parametrize("name", ["words", "mixed-spaced", "newlines-and-words"])
def test_a_long_text_under_its_limit_is_read_once_when_its_joins_are_clean(
    name: str, estimator_reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "_WHOLE_MAX_CHARS", 4000)
    monkeypatch.setattr(tokens, "_PIECE_CHARS", 2000)
    monkeypatch.setattr(tokens, "_CLEAN_JOIN_REACH", 100)
    text = TEXTS[name]
    whole = tokens._estimate(text)
    estimator_reads.clear()
    assert estimate_text_tokens_up_to(text, whole + 1) == whole
    assert sum(estimator_reads) == len(text)


@pytest.mark.usefixtures("small_pieces")
def test_an_answers_capped_estimate_is_its_whole_estimate_capped() -> None:
    content, reasoning = TEXTS["mixed"][:9000], TEXTS["cjk"][:7000]
    calls = (ToolCall("call_1", "store", TEXTS["base64"][:8000]), ToolCall("call_2", "f", "{}"))
    whole = estimate_output_tokens(content, calls, reasoning)
    for limit in (1, whole // 3, estimate_text_tokens(content) + 1, whole - 1, whole, whole + 9):
        assert estimate_output_tokens(content, calls, reasoning, limit=limit) == min(whole, limit)
