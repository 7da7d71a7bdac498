"""Token estimates without a tokenizer download.

Conservative by design: it over-counts rather than under-counts, so that a prompt the
estimator accepts fits the real window; `service.calibration` then learns, per model, how
far below the estimate the upstream's own counts run.

The estimate follows how byte-level BPE tokenizers (tiktoken's cl100k/o200k, DeepSeek,
Llama, Gemma) pre-split text: a word, a digit, a punctuation mark or a whitespace run
never shares a token with its neighbours (a single space joins the next word for free).

- ASCII words: one token per started 4 letters ("the" 1, "gateway" 2).
- Latin with diacritics, Vietnamese, Greek, Cyrillic: a letter with a diacritic or from
  another alphabet costs a token, and a plain ASCII letter in the same word half of one.
- CJK ideographs, kana and Hangul: 1.5 tokens each (cl100k needs up to ~1.1, o200k ~0.8).
- Digits: one token each (Llama and Gemma split numbers into single digits).
- Punctuation and symbols: one each; characters beyond the BMP (emoji) two.

Measured against cl100k_base and o200k_base on the samples in
tests/unit/test_tokens.py, the estimate is 1.1-1.7x the larger real count.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from service.domain import Message

PER_MESSAGE_OVERHEAD = 4
PER_REQUEST_OVERHEAD = 3

# Unicode letters (CJK ideographs, kana and Hangul are letters too).
_WORD = re.compile(r"[^\W\d_]+")
# Everything else that takes a token of its own: digits, punctuation, symbols, "_", and
# whitespace other than the single space that joins the next word.
_OTHER = re.compile(r"\d|[^\w\s]|_|\s{2,}|[^\S ]")
_ASTRAL = re.compile(r"[\U00010000-\U0010FFFF]")
# In ASCII text a word's ceil(len / 4) tokens are its runs of up to 4 letters, counted by
# the regex engine rather than word by word in Python (4: _ASCII_LETTERS_PER_TOKEN).
_ASCII_WORD_PIECE = re.compile(r"[A-Za-z]{1,4}")
# Recent texts are remembered: calls repeat system prompts and conversation history, and
# the caller gate and validation estimate a prompt before `Pipeline.prepare` does (which
# then carries its one estimate to budgets, the upstream limiter and calibration).
# Bounded to _MEMO_SIZE texts of at most _MEMO_MAX_CHARS each (8 M characters at worst).
_MEMO_SIZE = 256
_MEMO_MAX_CHARS = 32 * 1024

_ASCII_LETTERS_PER_TOKEN = 4
_ASCII_LETTER_COST = 0.5  # inside a word with diacritics
_WIDE_CHAR_COST = 1.5  # CJK, kana, Hangul
_OTHER_LETTER_COST = 1.0  # diacritics, Greek, Cyrillic, other scripts


def _is_wide(code: int) -> bool:
    return (
        0x3040 <= code <= 0x30FF  # kana
        or 0x3400 <= code <= 0x9FFF  # CJK ideographs (extension A and unified)
        or 0xAC00 <= code <= 0xD7AF  # Hangul syllables
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or code >= 0x20000  # CJK extensions B and later
    )


def _word_tokens(word: str) -> int:
    if word.isascii():
        return -(-len(word) // _ASCII_LETTERS_PER_TOKEN)
    cost = 0.0
    for char in word:
        code = ord(char)
        if code < 0x80:
            cost += _ASCII_LETTER_COST
        elif _is_wide(code):
            cost += _WIDE_CHAR_COST
        else:
            cost += _OTHER_LETTER_COST
    return -int(-cost // 1)  # ceil


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens for `text`: never below what common BPE tokenizers count."""
    if not text:
        return 0
    if len(text) <= _MEMO_MAX_CHARS:
        return _remembered_estimate(text)
    return _estimate(text)


def _estimate(text: str) -> int:
    if text.isascii():
        return len(_ASCII_WORD_PIECE.findall(text)) + len(_OTHER.findall(text))
    total = sum(_word_tokens(word) for word in _WORD.findall(text))
    total += len(_OTHER.findall(text))
    total += len(_ASTRAL.findall(text))  # emoji and rare symbols: several byte tokens
    return total


_remembered_estimate = functools.lru_cache(maxsize=_MEMO_SIZE)(_estimate)


def estimate_message_tokens(message: Message) -> int:
    """Estimated tokens of one message, with its share of the chat template."""
    return PER_MESSAGE_OVERHEAD + estimate_text_tokens(message.content)


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    """Estimated prompt tokens for a conversation, with per-message overhead."""
    return PER_REQUEST_OVERHEAD + sum(estimate_message_tokens(m) for m in messages)
