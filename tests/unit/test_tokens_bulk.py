"""The bulk estimator against the per-character one it replaced: the same integer for
every text. The reference below is the earlier `service.tokens` code, kept verbatim but
for its memo, so that any difference is the new code's."""
# ruff: noqa: RUF001

import bisect
import random
import re

import pytest

from service import tokens
from service.tokens import estimate_text_tokens

_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_SCRIPT_ENDS = [end for end, _ in tokens._SCRIPT_COSTS]


def _script_cost(char: str) -> float | None:
    index = bisect.bisect_left(_SCRIPT_ENDS, ord(char))
    return tokens._SCRIPT_COSTS[index][1] if index < len(tokens._SCRIPT_COSTS) else None


def _char_tokens(char: str) -> float:
    cost = _script_cost(char)
    if cost is None:
        return len(char.encode(errors="surrogatepass"))
    return cost


def _non_ascii_tokens(run: str) -> int:
    cost = sum(map(_char_tokens, run))
    if _script_cost(run[0]) is None:
        cost += 1
    return -int(-cost // 1)


def reference_estimate(text: str) -> int:
    if not text:
        return 0
    total = len(tokens._ASCII_TOKEN.findall(text))
    for run in tokens._RULE_RUN.finditer(text):
        length = run.end() - run.start()
        total -= length - tokens._rule_run_tokens(length)
    total += sum(len(flip.findall(text)) for flip in tokens._CASE_FLIPS)
    if not text.isascii():
        total += sum(map(_non_ascii_tokens, _NON_ASCII_RUN.findall(text)))
    return total


def _boundaries() -> list[str]:
    """The first and last code points of every range of the script table, and their
    neighbours, surrogates and the ends of the planes."""
    points = {0x7E, 0x7F, 0x80, 0x81, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF}
    start = 0x80
    for end, _ in tokens._SCRIPT_COSTS:
        points.update((start, start + 1, end - 1, end, end + 1))
        start = end + 1
    points.update((0xD800, 0xDBFF, 0xDC00, 0xDFFF))
    return [chr(point) for point in sorted(points)]


BOUNDARIES = _boundaries()
# Pieces that exercise each path of the ASCII regexes: words of every case, camelCase,
# keys, digits, punctuation, rule runs, whitespace runs and control characters.
ASCII_PIECES = [
    *("the", "gateway", "Gateway", "GATEWAY", "camelCase", "mNkYPhf", "aB", "Ab", "ABc"),
    *("x", "Q", "42", "3.14", "!", '"', "{", "`", "_", "..", "=====", "-----------"),
    *("#########", "~~~~~~", " ", "     ", " " * 20, "\n", "\n" * 11, "\t\t"),
    *("\x00", "\x1f", "\x7f"),
]
NON_ASCII_PIECES = [
    *("Привет", "мир", "Ελληνικά", "مرحبا", "שלום", "नमस्ते", "বাংলা", "தமிழ்"),
    *("สวัสดี", "日本語", "ゲートウェイ", "게이트웨이", "가", "Tiếng", "café", "😀"),
    *("🎉🚀", "—", "“”", "…", "┌─┐", "∑∞", "Ⅻ", "ﬁ", "豈", "\u00a0"),
    *("e\u0301\u0302", "Z\u0351\u0300\u0489", "👨\u200d👩\u200d👧"),
    *("\ud800", "\udfff", "\ud83d\ude00", "\uffff", "\U0010ffff"),
]


def _random_text(rnd: random.Random) -> str:
    pools = (ASCII_PIECES, NON_ASCII_PIECES, BOUNDARIES)
    return "".join(rnd.choice(rnd.choice(pools)) for _ in range(rnd.randrange(1, 40)))


def test_every_code_point_of_the_plane_alone_and_in_runs():
    for point in range(0x10000):
        char = chr(point)
        for text in (char, f"{char}a{char}{char}é"):
            assert estimate_text_tokens(text) == reference_estimate(text), hex(point)


@pytest.mark.parametrize("text", ["", *BOUNDARIES], ids=repr)
def test_boundaries_and_empty(text):
    assert estimate_text_tokens(text) == reference_estimate(text)


def test_generated_texts():
    rnd = random.Random(20261130)
    for _ in range(20_000):
        text = _random_text(rnd)
        assert estimate_text_tokens(text) == reference_estimate(text), repr(text)


def test_runs_whose_quarters_carry():
    # A run's fractions sum before its ceiling: 4 Greek letters are 5 tokens, not 8.
    for greek in range(9):
        for cjk in range(9):
            for lead in ("", "😀", "д"):
                text = f"x {lead}{'α' * greek}{'日' * cjk} y"
                assert estimate_text_tokens(text) == reference_estimate(text), text


def test_long_texts_past_the_memo():
    rnd = random.Random(7)
    for _ in range(5):
        text = " ".join(_random_text(rnd) for _ in range(3_000))
        assert len(text) > tokens._MEMO_MAX_CHARS
        assert estimate_text_tokens(text) == reference_estimate(text)
