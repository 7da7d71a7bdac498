"""Token estimates without a tokenizer download.

Conservative by design: it over-counts rather than under-counts, so that a prompt the
estimator accepts fits the real window; `service.calibration` then learns, per tenant and
model, how far below the estimate the upstream's own counts run.

The estimate follows how byte-level BPE tokenizers (tiktoken's cl100k/o200k, DeepSeek,
Llama, Gemma) pre-split text: a word, a digit, a punctuation mark or a whitespace run
never shares a token with its neighbours (a single space joins the next word for free).

- ASCII words: the first token holds up to 4 lowercase letters, later ones 3 ("the" 1,
  "gateway" 2, long rare words split finer than common ones); a capital joins the
  lowercase letters after it, and a run of capitals takes a token per 3 ("GATEWAY" 3).
- Mixed case: a case flip that does not start a camelCase word costs one more ("mNkYPh"):
  keys and base64 fall apart into one- and two-letter tokens.
- Digits and ASCII punctuation: one token each (Llama and Gemma split numbers into single
  digits). Whitespace: a token per run of up to 16 spaces or 8 newlines or tabs.
- A run of 5 or more of one mark that markdown and code draw lines with (`#%*+-./=_~`:
  rules, headings, dot leaders, banners) costs a token per 8 and 3 more: every
  vocabulary has tokens for long runs of these (300 of one cost cl100k and o200k at most
  12 tokens, Gemma 3 at most 21; the rule counts 41). Runs of other marks (`"`, `[`,
  `}`, backticks) cost up to a token per two characters there, and stay one each.
- Any other character costs by its script: 1 for Cyrillic and Vietnamese; 1.25 for Greek
  and Arabic; 1.5 for other Latin letters with diacritics (they split a word into pieces
  the vocabularies know less well), Hebrew, Devanagari, Thai, CJK ideographs, kana and
  Hangul syllables; 2 for Bengali, Tamil, dashes, quotes and box drawing. Every other
  character (emoji, math, scripts the vocabularies hardly cover, Hangul jamo, combining
  diacritics as in NFD text or stacked "Zalgo" marks) costs its UTF-8 bytes, the most a
  byte-level BPE can ever use, and a run of them one more, as the space before it may
  not merge with its first byte.

Measured against cl100k_base and o200k_base on the samples in tests/unit/test_tokens.py,
the estimate is 1.0-2.0x the larger real count on English, code, data, European and CJK
text (Russian 2.1x), 1.0-1.6x on the other scripts, and up to 3.2x on emoji and symbols.
A character class cannot tell every text apart, so some still run under:
languages the vocabularies cover poorly but write in plain ASCII letters (Swahili
0.75x), random lowercase or all-caps strings, and strings of rare letters (rare CJK
ideographs, random Hangul syllables or Cyrillic letters, about 0.6x); calibration
corrects those per model once answers report their real counts.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable

from service.domain import Message, ResponseFormat, ResponseFormatType, Tool, ToolCall
from service.memo import BoundedMemo

PER_MESSAGE_OVERHEAD = 4
PER_REQUEST_OVERHEAD = 3
# The template's share of each tool call and each tool definition (the JSON keys, the
# function wrapper); its text is counted on top.
PER_TOOL_CALL_OVERHEAD = 4
PER_TOOL_OVERHEAD = 8

# In ASCII text every token is one regex match, counted by the regex engine rather than
# character by character in Python. Letters: a capital joins the lowercase letters after
# it; the first token of a lowercase run holds up to 4 letters, the rest 3, and a run of
# capitals 3 per token. Then the characters that take a token of their own: a digit, a
# punctuation mark ("_" too), a whitespace run (every vocabulary has tokens for 16 spaces
# and 8 newlines or tabs) and a lone newline, tab or control character. A lone space
# joins the next word. Non-ASCII characters match nothing here and split words.
_ASCII_TOKEN = re.compile(
    r"[A-Z]?(?<![a-z])[a-z]{1,4}|[a-z]{1,3}|[A-Z]{1,3}|[0-9]|[!-/:-@\[-`{-~]"
    r"| {2,16}|\n{1,8}|\t{1,8}|[\x00-\x08\x0b-\x1f\x7f]"
)
# A case flip that does not start a camelCase word costs a token more: keys, hashes and
# base64 flip case every letter or two ("mNkYPhf"), and BPE vocabularies have no long
# tokens for them. Counted as capitals after a lowercase letter that do not start a word
# of 2+ lowercase letters ("mN", "kY"), and capitals inside a word that start only 1 or 2
# ("Nk", "Phf"); each pattern starts at a capital, which keeps the scan over English fast.
_CASE_FLIPS = (
    re.compile(r"[A-Z](?<=[a-z][A-Z])(?![a-z]{2})"),
    re.compile(r"[A-Z](?<=[A-Za-z][A-Z])(?=[a-z]{1,2}(?![a-z]))"),
)
# The same tokens, and each run of non-ASCII characters as one match more: a run is
# skipped at once instead of a character at a time through every alternative above.
_ASCII_TOKEN_OR_RUN = re.compile(_ASCII_TOKEN.pattern + r"|[^\x00-\x7f]+")
# Runs of a line-drawing mark, counted a token a character by `_ASCII_TOKEN` and then
# corrected to `_rule_run_tokens`.
_RULE_RUN = re.compile(r"([#%*+\-./=_~])\1{4,}")
# Recent texts are remembered: calls repeat system prompts and conversation history, and
# the caller gate and validation estimate a prompt before `Pipeline.prepare` does (which
# then carries its one estimate to budgets, the upstream limiter and calibration).
# Bounded to _MEMO_SIZE texts of at most _MEMO_MAX_CHARS each (8 M characters at worst).
_MEMO_SIZE = 256
_MEMO_MAX_CHARS = 32 * 1024

# Tokens per character of the scripts that cl100k and o200k learned from enough text,
# as (last code point of a block, cost); None marks a gap, whose characters cost their
# UTF-8 bytes like every character past the table.
_SCRIPT_COSTS: tuple[tuple[int, float | None], ...] = (
    (0x024F, 1.5),  # Latin-1, Latin Extended-A and -B: letters with diacritics
    (0x02FF, None),  # IPA, spacing modifiers
    (0x036F, None),  # combining diacritics: nearly all take a token per UTF-8 byte
    (0x03FF, 1.25),  # Greek
    (0x04FF, 1.0),  # Cyrillic
    (0x058F, None),  # Cyrillic Supplement, Armenian
    (0x05FF, 1.5),  # Hebrew
    (0x06FF, 1.25),  # Arabic
    (0x08FF, None),  # Syriac, Thaana, N'Ko, ...
    (0x097F, 1.5),  # Devanagari
    (0x09FF, 2.0),  # Bengali
    (0x0B7F, None),  # Gurmukhi, Gujarati, Oriya
    (0x0BFF, 2.0),  # Tamil
    (0x0DFF, None),  # Telugu, Kannada, Malayalam, Sinhala
    (0x0E7F, 1.5),  # Thai
    (0x1DFF, None),  # Lao, Tibetan, Myanmar, Georgian, Hangul jamo, Ethiopic, ...
    (0x1EFF, 1.0),  # Latin Extended Additional: Vietnamese
    (0x1FFF, None),  # Greek Extended
    (0x206F, 2.0),  # general punctuation: dashes, quotes, ellipsis, zero-width joiners
    (0x24FF, None),  # super- and subscripts, currency, arrows, math, technical, ...
    (0x25FF, 2.0),  # box drawing, blocks, geometric shapes
    (0x2FFF, None),  # symbols, dingbats, ...
    (0x30FF, 1.5),  # CJK punctuation, kana
    (0x33FF, None),  # Bopomofo, Hangul compatibility jamo, ...
    (0x9FFF, 1.5),  # CJK ideographs (extension A and unified)
    (0xABFF, None),  # Yi, Vai, ...
    (0xD7AF, 1.5),  # Hangul syllables
    (0xF8FF, None),  # surrogates, private use
    (0xFAFF, 1.5),  # CJK compatibility ideographs
)

# Non-ASCII text is costed in bulk by C string methods rather than a character at a time
# in Python (a 4 MiB request held the event loop for a second or more). Each character
# of the Basic Multilingual Plane is translated to a letter naming its cost: 1.25 ("a"),
# 1.5 ("b"), 1 ("c"), 2 ("d"), or its UTF-8 bytes when its script is not in the table: 2
# ("e") or 3 ("f", surrogates too); ASCII becomes a space, and the characters past the
# plane (4 bytes) are left as they are, to become "?" when encoded to ASCII. A run's
# costs are whole numbers but for a quarter a character of "a" and a half of "b", so its
# ceiling is those whole numbers plus the ceiling of (a + 2b) / 4 of the run alone.
_COST_LETTERS = {1.25: "a", 1.5: "b", 1.0: "c", 2.0: "d"}
_WHOLE_TOKENS = {b"a": 1, b"b": 1, b"c": 1, b"d": 2, b"e": 2, b"f": 3, b"?": 4}
_UNLISTED = b"ef?"  # a run that starts with one costs a token more
# Every class letter to "x", the spaces kept: a run starts at each " x".
_RUN_MARKS = bytes(byte if byte == ord(" ") else ord("x") for byte in range(256))


def _cost_letter_table() -> tuple[int, ...]:
    """The class letter of each code point of the Basic Multilingual Plane."""
    table = [ord(" ")] * 0x80 + [ord("e")] * (0x800 - 0x80) + [ord("f")] * (0x10000 - 0x800)
    start = 0x80
    for end, cost in _SCRIPT_COSTS:
        if cost is not None:
            table[start : end + 1] = [ord(_COST_LETTERS[cost])] * (end + 1 - start)
        start = end + 1
    return tuple(table)


# Indexed by code point: `str.translate` leaves the characters past its end unchanged.
_COST_LETTER_TABLE = _cost_letter_table()


def _cost_letters(text: str) -> bytes:
    """`text` with each character replaced by the letter of its cost class."""
    return text.translate(_COST_LETTER_TABLE).encode("ascii", "replace")


def _run_count(letters: bytes) -> int:
    """How many runs of non-ASCII characters the text of `letters` holds."""
    return letters.translate(_RUN_MARKS).count(b" x") + (letters[0] != ord(" "))


def _non_ascii_tokens(letters: bytes) -> int:
    """Tokens of the runs of non-ASCII characters in the text of `letters`."""
    total = sum(letters.count(letter) * whole for letter, whole in _WHOLE_TOKENS.items())
    total += sum(letters.count(bytes([ord(" "), first])) for first in _UNLISTED)
    total += letters[0] in _UNLISTED
    # Each run's quarters, a letter a quarter: a token per 4 and one for any left over.
    quarters = letters.translate(None, b"cdef?").replace(b"b", b"aa")
    left = quarters.replace(b"aaaa", b"")
    return total + quarters.count(b"aaaa") + left.count(b" a") + left.startswith(b"a")


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens for `text`: never below what common BPE tokenizers count."""
    if not text:
        return 0
    if len(text) <= _MEMO_MAX_CHARS:
        return _remembered_estimate(text)
    if len(text) <= _LONG_MEMO_MAX_CHARS:
        return _remembered_long_estimate(text)
    return _estimate(text)


# Texts up to this long are estimated whole against a limit, as without one.
_WHOLE_MAX_CHARS = 512 * 1024
# Longer ones are read in pieces of about this many characters.
_PIECE_CHARS = 256 * 1024
# A piece ends, where it can, after a lone space or a lone newline that is followed by
# another character. No match of the estimator's regexes holds it and a character beside
# it (a space run needs two spaces, a newline run two newlines), their lookarounds see
# in it what they see at the start or the end of a text, and as ASCII it ends any
# non-ASCII run: the estimate of a text joined there is exactly the sum of its pieces'.
_CLEAN_JOIN = re.compile(r"(?<! ) (?=[^ ])|(?<!\n)\n(?=[^\n])")
# Sought first this near a piece's end, for a piece of about `_PIECE_CHARS`.
_CLEAN_JOIN_REACH = 4096
# Elsewhere (text with no such space or newline: CJK, a key, a run of one character), a
# join can take at most this much off the sum of the two pieces' estimates, with a
# margin: only matches and runs that touch the join change. Joined letters merge a word
# (1 token) and drop at most 2 case flips whose lookahead ended with the first piece;
# joined whitespace merges a run (1); joined marks of one kind merge two rule runs (4:
# "====" and "====" cost 8, "========" 4); joined non-ASCII runs drop the second run's
# extra token and share one rounded-up quarter (2). A join is one of these kinds: 4 at
# most, counted as 16.
_JOIN_LOSS = 16


def estimate_text_tokens_up_to(text: str, limit: int) -> int:
    """`min(estimate_text_tokens(text), limit)`, reading no more of a long text than
    the limit needs: a long answer whose output is capped costs the event loop a few
    hundred KB of estimating rather than all of it.

    Read in pieces, the text's estimate is at least the sum of the pieces' read so far,
    less `_JOIN_LOSS` for each of their joins (the last one's with the rest of the text
    included) that is not clean (`_CLEAN_JOIN`): the rest costs 0 or more, and a join
    takes off no more than that. Once that reaches `limit`, so does the whole text's
    estimate, and `limit` is exact. Pieces that never reach it sum to the whole text's
    estimate when all their joins were clean; else the text is estimated whole.
    """
    if limit <= 0:
        return limit
    if len(text) <= _WHOLE_MAX_CHARS:
        return min(estimate_text_tokens(text), limit)
    counted = unclean = start = 0
    while start < len(text):
        end, clean = _piece_end(text, start)
        counted += _estimate(text[start:end])
        start = end
        unclean += not clean
        if counted - unclean * _JOIN_LOSS >= limit:
            return limit
    return min(counted if not unclean else estimate_text_tokens(text), limit)


def _piece_end(text: str, start: int) -> tuple[int, bool]:
    """Where the piece of `text` from `start` ends (about `_PIECE_CHARS` on, at a clean
    join where one is found in its second half), and whether the join there is clean.
    The last piece ends with the text, and has no join."""
    end = start + _PIECE_CHARS
    if end >= len(text):
        return len(text), True
    middle = start + _PIECE_CHARS // 2
    for lowest in (max(end - _CLEAN_JOIN_REACH, middle), middle):
        # `end + 1`: a join at `end` needs the character after it to tell it is clean.
        join = _CLEAN_JOIN.search(text, lowest, end + 1)
        if join is not None:
            return join.end(), True
    return end, False


def _rule_run_tokens(length: int) -> int:
    """Tokens of a run of `length` (5 or more) of one line-drawing mark."""
    return -(-length // 8) + 3


def _estimate(text: str) -> int:
    if text.isascii():
        total = len(_ASCII_TOKEN.findall(text))
    else:
        letters = _cost_letters(text)
        total = len(_ASCII_TOKEN_OR_RUN.findall(text)) - _run_count(letters)
        total += _non_ascii_tokens(letters)
    for run in _RULE_RUN.finditer(text):
        length = run.end() - run.start()
        total -= length - _rule_run_tokens(length)
    total += sum(len(flip.findall(text)) for flip in _CASE_FLIPS)
    return total


_remembered_estimate = functools.lru_cache(maxsize=_MEMO_SIZE)(_estimate)

# The last texts past the memo's bound, by identity: validation estimates a long prompt and
# fitting it to the window again, each pass up to half a second for 4 MiB, while hashing
# or comparing such a text is a pass of its own. An entry holds its text, so that no other
# object can take its id while it is remembered.
_LONG_MEMO_SIZE = 2
# Past a default gRPC message (4 MiB), held texts would grow with a raised message limit.
_LONG_MEMO_MAX_CHARS = 4 * 1024 * 1024
_long_estimates: BoundedMemo[int, tuple[str, int]] = BoundedMemo(_LONG_MEMO_SIZE)
_long_estimates_lock = threading.Lock()  # Summarize estimates its document in a thread


def _remembered_long_estimate(text: str) -> int:
    with _long_estimates_lock:
        known = _long_estimates.get(id(text))
    if known is not None and known[0] is text:
        return known[1]
    estimate = _estimate(text)
    with _long_estimates_lock:
        _long_estimates.put(id(text), (text, estimate))
    return estimate


def estimate_tool_call_tokens(calls: Iterable[ToolCall]) -> int:
    """Estimated tokens of tool calls: their ids, names and arguments."""
    return sum(
        PER_TOOL_CALL_OVERHEAD
        + estimate_text_tokens(call.id)
        + estimate_text_tokens(call.name)
        + estimate_text_tokens(call.arguments)
        for call in calls
    )


def estimate_tools_tokens(tools: Iterable[Tool]) -> int:
    """Estimated tokens of tool definitions: names, descriptions and parameter schemas."""
    return sum(
        PER_TOOL_OVERHEAD
        + estimate_text_tokens(tool.name)
        + estimate_text_tokens(tool.description)
        + estimate_text_tokens(tool.parameters)
        for tool in tools
    )


def estimate_message_tokens(message: Message) -> int:
    """Estimated tokens of one message, with its share of the chat template."""
    tokens = PER_MESSAGE_OVERHEAD + estimate_text_tokens(message.content)
    if message.tool_calls:
        tokens += estimate_tool_call_tokens(message.tool_calls)
    if message.tool_call_id:
        tokens += estimate_text_tokens(message.tool_call_id)
    if message.reasoning:
        tokens += estimate_text_tokens(message.reasoning)
    return tokens


def estimate_format_tokens(response_format: ResponseFormat | None) -> int:
    """Estimated tokens of a JSON Schema answer format: providers put the schema in the
    prompt (and bill it) as they do tool definitions. JSON mode and text cost none."""
    if response_format is None or response_format.type is not ResponseFormatType.JSON_SCHEMA:
        return 0
    return (
        PER_TOOL_OVERHEAD
        + estimate_text_tokens(response_format.schema_name)
        + estimate_text_tokens(response_format.json_schema)
    )


def estimate_prompt_tokens(
    messages: Iterable[Message],
    tools: Iterable[Tool] = (),
    response_format: ResponseFormat | None = None,
) -> int:
    """Estimated prompt tokens for a conversation, its tools and its answer's schema, with
    per-message overhead."""
    return (
        PER_REQUEST_OVERHEAD
        + sum(estimate_message_tokens(m) for m in messages)
        + estimate_tools_tokens(tools)
        + estimate_format_tokens(response_format)
    )


def estimate_output_tokens(
    content: str,
    tool_calls: Iterable[ToolCall] = (),
    reasoning: str = "",
    *,
    limit: int | None = None,
) -> int:
    """Estimated tokens of an answer: its text, its tool calls and its reasoning; with
    `limit`, no more than it (`estimate_text_tokens_up_to`: what is past it is not read)."""
    if limit is None:
        return (
            estimate_text_tokens(content)
            + estimate_tool_call_tokens(tool_calls)
            + estimate_text_tokens(reasoning)
        )
    # Each part up to what the parts before it left: the sum is min(estimate, limit).
    total = 0
    for text in (content, reasoning):
        total += estimate_text_tokens_up_to(text, limit - total)
    for call in tool_calls:
        if total >= limit:
            break
        total += PER_TOOL_CALL_OVERHEAD
        for text in (call.id, call.name, call.arguments):
            total += estimate_text_tokens_up_to(text, max(limit - total, 0))
    return min(total, limit)
