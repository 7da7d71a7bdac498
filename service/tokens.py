"""Token estimates without a tokenizer download.

Conservative by design (it over-counts rather than under-counts), so that a prompt the
estimator accepts fits the real window. Rates per character, measured roughly against
BPE tokenizers: ASCII text ~4 characters a token, Latin with diacritics (Vietnamese)
~2, CJK, kana and Hangul ~1 token a character or more.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.domain import Message

_PER_MESSAGE_OVERHEAD = 4
_PER_REQUEST_OVERHEAD = 3


def _char_cost(code: int) -> float:
    if code < 0x80:
        return 0.3
    if code < 0x2000:  # Latin extended, Greek, Cyrillic, Vietnamese diacritics
        return 0.7
    if 0x3040 <= code <= 0x30FF or 0x4E00 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF:
        return 1.3
    return 1.0


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens for `text`."""
    if text.isascii():
        return int(len(text) * 0.3) + 1 if text else 0
    return int(sum(_char_cost(ord(c)) for c in text)) + 1


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    """Estimated prompt tokens for a conversation, with per-message overhead."""
    return _PER_REQUEST_OVERHEAD + sum(
        _PER_MESSAGE_OVERHEAD + estimate_text_tokens(m.content) for m in messages
    )
