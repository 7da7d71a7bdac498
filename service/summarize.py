"""Summarize: a document of any length, chunked, summarised concurrently, combined.

1. The document is split on paragraph boundaries (a page break is one), then sentence
   boundaries, then (for a sentence longer than a chunk) line, word or character
   boundaries, into chunks that fit the model's window with room for the prompt and the
   answer. Consecutive chunks overlap by up to `chunk_overlap_tokens` of whole sentences,
   so nothing that straddles a boundary is lost.
2. Each chunk is summarised through `Pipeline.complete`, at most `concurrency` at once.
   A failed part is retried; if it still fails the call fails (`SummarizePartFailed`):
   a summary of part of the document is never returned as if it were the whole. No
   other part starts then, but those already with their upstream run to their end
   (`_Halt`), so that their answers are paid once and cached for the call run again.
3. The part summaries are combined in one call when they fit together; when they do not,
   they are grouped into chunks and summarised again, level by level.
4. A summary cut off by its length limit (`finish_reason` LENGTH) is still a summary: it is
   answered OK, saying so, and a part's cut off is combined and counted (`parts_cut`).

Chunks and groups are sized with the tenant's token calibration for the model as it
stands when they are made. Upstream usage can raise it while they wait (a model whose
answers report more tokens than estimated), so each text is checked again just before it
is sent; one that no longer fits is split, with the calibration as it is then, into
smaller pieces that are summarised in its place and in order. Only a window with too
little room for any piece fails the call (`InvalidRequest`).

Under a tenant's tokens_per_minute each call takes its tokens as it starts, so every call
is also sized to fit one minute's tokens: a larger one could never be taken, and the
default target shrinks to a quarter of the minute. A minute too small for any piece, for
a combine call holding one part's summary at its longest, or (when they must be grouped)
for a group of two, fails the call
(`QuotaExceeded`, for good) before any part is sent; once parts are paid
for, a piece split again is not refused for its longer header. Summaries that, as long as
a part may answer, would need more than `max_levels` levels fail the call
(`InvalidRequest`) before any part is sent too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.caller_gate import current_pacer, part_tokens
from service.clock import SYSTEM_CLOCK, Clock, Deadline, covered_s
from service.config import SummarizeConfig
from service.domain import (
    ChatRequest,
    Completion,
    FinishReason,
    GenerationParams,
    Message,
    ReasoningEffort,
    Role,
    Timings,
    TruncationMode,
    Usage,
)
from service.errors import (
    BudgetExceeded,
    ContextWindowExceeded,
    DeadlineExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    QuotaExceeded,
    ShuttingDown,
    SummarizePartFailed,
    SummarizePartRejected,
    UpstreamContextExceeded,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    ended_unsent,
    mark_unsent,
)
from service.ledger import PICO, to_pico
from service.pipeline import Pipeline, Turn, paced, unpaced
from service.retry import doubled, next_try_s, says_why
from service.tokens import (
    PER_MESSAGE_OVERHEAD,
    PER_REQUEST_OVERHEAD,
    estimate_text_tokens,
    estimate_text_tokens_up_to,
)
from service.validation import (
    has_control_characters,
    has_visible_text,
    label_violations,
    model_violations,
    without_control_characters,
)

_MS = 1000.0
# A unit (a paragraph, sentence, line or word) whose separator starts fewer than this
# many characters into it is merged with the one after it: each unit costs an estimate
# and a step of the packing in Python, and a document of one character per line or per
# paragraph would otherwise be a million units (seconds of CPU, holding the GIL, for
# every call on the process). Few real sentences or lines are this short; a heading
# joins the paragraph after it.
_MIN_UNIT_CHARS = 16
_SHORT_UNIT_CHARS = 4096
# What a word cut by characters can take off the sum of its pieces' estimates at each
# cut, joined again in a chunk (see `service.tokens._JOIN_LOSS`): "mNkY" and "Ph" cost
# less as "mNkYPh", whose case flips look across the cut; a whitespace run, a rule or a
# run of emoji cut in two costs a token or two more than whole.
_CUT_TOKENS = 4
# Each separator is matched from its first character, which the regex engine finds
# fast, rather than after a lookbehind tried at every position: a unit ends where the
# match does.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\r?\n\s*")
# After a sentence end: whitespace after . ! ? … or another script's full stop or
# question mark (Devanagari danda, Arabic question mark, Urdu, Armenian, Ethiopic and
# Myanmar full stops), and closing quotes; or straight after the full-width marks CJK
# text uses without spaces.
_FULL_WIDTH_ENDS = "\u3002\uff01\uff1f"
_SENTENCE_ENDS = ".!?\u2026\u0964\u0965\u061f\u06d4\u0589\u1362\u1367\u104b"
_SENTENCE_BREAK = re.compile(
    rf"[{_SENTENCE_ENDS}{_FULL_WIDTH_ENDS}]"
    rf"(?:(?<=[{_FULL_WIDTH_ENDS}])|[\"')\]\u2019\u201d]?\s+)"
)
# After a line break and the indentation that follows it (a unit keeps the whitespace
# after it, so estimates still add up).
_LINE_BREAK = re.compile(r"\n\s*")
_WORD_BREAK = re.compile(r"\s(?=\S)")
# Whitespace that validation refuses in a message's text: a form feed (the page break
# PDF text extraction writes) is sent as a paragraph break, where a part may end, and a
# vertical tab (a word processor's line break) as a line break.
_PAGE_BREAKS = str.maketrans({"\f": "\n\n", "\v": "\n"})
# Tokens kept free besides the estimate, for what the estimate cannot see.
_SAFETY_TOKENS = 16
_MIN_CHUNK_TOKENS = 64
# The least a default target or a part's answer shrinks to for a small minute, and the
# least target a caller may ask for: about 24 words, little enough for a summary still to
# say something. Fewer would be cut off mid-sentence by the answer's `max_tokens`.
_MIN_TARGET_TOKENS = 32


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """A Summarize call as the caller asked for it."""

    model: str
    document: str
    target_tokens: int | None = None
    instructions: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    tenant: str = "default"
    reasoning_effort: ReasoningEffort | None = None  # None: the upstream's default
    # Problems only visible on the wire (an unknown enum value), reported with the rest.
    violations: tuple[FieldViolation, ...] = ()


@dataclass(frozen=True, slots=True)
class Summary:
    """The summary and what it took."""

    summary: str
    chunks: int
    levels: int
    usage: Usage
    cost_usd: float
    upstream_calls: int
    timings: Timings
    # The final call's: LENGTH when its max_tokens (the target) cut the summary off.
    finish_reason: FinishReason
    parts_cut: int  # part (or group) summaries combined although their max_tokens cut them


# --- chunking (pure) -----------------------------------------------------------------


def as_sent(document: str) -> str:
    """`document` as its parts are sent: page breaks and vertical tabs as line breaks."""
    return document.translate(_PAGE_BREAKS)


def _tokens_within(text: str, max_tokens: int) -> int:
    """The estimate of `text` when it is at most `max_tokens`, else more: a long text is
    read only as far as it takes to tell (`estimate_text_tokens_up_to`)."""
    if len(text) <= _SHORT_UNIT_CHARS:  # nearly every unit: one call less each
        return estimate_text_tokens(text)
    return estimate_text_tokens_up_to(text, max_tokens + 1)


def _split_long(text: str, max_tokens: int) -> list[tuple[str, int]]:
    """Split a sentence longer than `max_tokens` at line breaks (CSV, code, lists have
    no sentence ends), then a line longer than that between words, or characters.
    """
    return _pieces_within(text, _LINE_BREAK, max_tokens, too_long=_hard_split)


def _pieces_within(
    text: str,
    separator: re.Pattern[str],
    max_tokens: int,
    *,
    too_long: Callable[[str, int], list[tuple[str, int]]],
) -> list[tuple[str, int]]:
    """`text` cut after `separator` into (piece, tokens) pairs of at most `max_tokens`,
    short runs merged (`_split_after`); a run still too long cut out on its own, and one
    alone too long handed to `too_long`."""
    pieces: list[tuple[str, int]] = []
    for run in _split_after(text, separator):
        tokens = _tokens_within(run, max_tokens)
        if tokens <= max_tokens:
            pieces.append((run, tokens))
            continue
        # Short runs merged with one too long: cut it out on its own.
        for one in _split_after(run, separator, 1):
            tokens = _tokens_within(one, max_tokens)
            pieces += [(one, tokens)] if tokens <= max_tokens else too_long(one, max_tokens)
    return pieces


def _hard_split(text: str, max_tokens: int) -> list[tuple[str, int]]:
    """Split a line longer than `max_tokens` between words, or characters.

    Returns (piece, tokens) pairs whose tokens add up to at least the estimate of any
    run of consecutive pieces joined again: pieces cut between words add up to it, and
    a piece cut inside a word counts `_CUT_TOKENS` more than its own estimate.
    """
    return _pieces_within(text, _WORD_BREAK, max_tokens, too_long=_cut_word)


def _cut_word(word: str, max_tokens: int) -> list[tuple[str, int]]:
    """Cut a word (no spaces: CJK, emoji, a long identifier) longer than `max_tokens`
    by characters, about max_tokens // 3 at a time. Emoji and other characters costed by their
    UTF-8 bytes take up to 4 tokens each (a run 1 more): such a piece is cut shorter,
    until it fits with `_CUT_TOKENS`, which each piece counts more than its estimate
    (up to `max_tokens`: a piece that fills a chunk has it to itself)."""
    pieces: list[tuple[str, int]] = []
    start = 0
    room = max(1, max_tokens - _CUT_TOKENS)
    # Two pieces of 1.5 tokens a character (CJK), each with `_CUT_TOKENS`, fill a chunk.
    length = max(1, (max_tokens - 2 * _CUT_TOKENS) // 3)
    while start < len(word):
        piece = word[start : start + length]
        tokens = _piece_tokens(piece, word)
        while tokens > room and len(piece) > 1:
            piece = piece[: max(1, len(piece) * room // tokens)]
            tokens = _piece_tokens(piece, word)
        pieces.append((piece, max(tokens, min(tokens + _CUT_TOKENS, max_tokens))))
        start += len(piece)
    return pieces


def _piece_tokens(piece: str, word: str) -> int:
    """The estimate of `piece`, cut from `word`, as part of that word."""
    if piece.isascii() and not word.isascii():
        # In a word with a non-ASCII letter each ASCII letter costs half a token (more
        # than in an all-ASCII word): count the piece as part of that word. The appended
        # letter costs exactly one token, in its own run or not.
        return estimate_text_tokens(piece + "\u00e9") - 1
    return estimate_text_tokens(piece)


def split_units(text: str, max_tokens: int) -> tuple[list[tuple[str, int]], list[bool]]:
    """The document as (text, tokens) units, each fitting `max_tokens`.

    Units are sentences (or, for a sentence too long to be one, its lines, or the words
    or characters of a line too long), each of `_MIN_UNIT_CHARS` or more with the ones
    after it. Each unit keeps the whitespace that follows it, so joining units restores
    the text. The second list says which units end a paragraph.
    """
    units: list[tuple[str, int]] = []
    ends_paragraph: list[bool] = []
    for paragraph in _split_after(text, _PARAGRAPH_BREAK):
        if paragraph.isspace():
            if units:  # leading/blank runs join the previous unit, so no text is lost
                units[-1] = (units[-1][0] + paragraph, units[-1][1])
            continue
        for sentence in _split_after(paragraph, _SENTENCE_BREAK):
            tokens = _tokens_within(sentence, max_tokens)
            if tokens <= max_tokens:
                units.append((sentence, tokens))
                ends_paragraph.append(False)
                continue
            for piece in _split_long(sentence, max_tokens):
                units.append(piece)
                ends_paragraph.append(False)
        ends_paragraph[-1] = True
    return units, ends_paragraph


def fit_units(
    units: Sequence[tuple[str, int]], ends_paragraph: Sequence[bool], max_tokens: int
) -> tuple[list[tuple[str, int]], list[bool]]:
    """`split_units` of the same text for a smaller `max_tokens`, from its units for a
    larger one: only the units over it are split again (as `split_units` splits them)."""
    fitted: list[tuple[str, int]] = []
    ends: list[bool] = []
    for unit, ends_one in zip(units, ends_paragraph, strict=True):
        pieces = [unit] if unit[1] <= max_tokens else _split_long(unit[0], max_tokens)
        fitted += pieces
        ends += [False] * (len(pieces) - 1) + [ends_one]
    return fitted, ends


def _split_after(
    text: str, separator: re.Pattern[str], min_chars: int = _MIN_UNIT_CHARS
) -> list[str]:
    """`text` cut after each match of `separator` that starts `min_chars` or more
    characters into its piece, the match kept on the left piece."""
    pieces: list[str] = []
    start = 0
    while (match := separator.search(text, start + min_chars)) is not None:
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def pack_units(
    tokens: Sequence[int],
    *,
    max_tokens: int,
    overlap_tokens: int,
    ends_paragraph: Sequence[bool] | None = None,
) -> list[range]:
    """Group consecutive units into chunks of at most `max_tokens`.

    A chunk ends at a paragraph end when one keeps it at least half full. Each chunk
    after the first starts with the trailing units of the previous chunk that together
    take at most `overlap_tokens`. Estimates add up (the estimator counts pieces between
    whitespace), so a chunk's estimate is the sum of its units'.

    Returns:
        The unit index ranges of the chunks, in order.
    """
    overlap_tokens = min(overlap_tokens, max_tokens // 4)
    chunks: list[range] = []
    start = 0
    count = len(tokens)
    while start < count:
        end = start
        total = 0
        best_break, best_total = 0, 0
        while end < count and (end == start or total + tokens[end] <= max_tokens):
            total += tokens[end]
            end += 1
            if ends_paragraph is not None and ends_paragraph[end - 1]:
                best_break, best_total = end, total
        if end < count and best_break > start and best_total * 2 >= max_tokens:
            end = best_break
        chunks.append(range(start, end))
        if end >= count:
            break
        # Carry whole trailing units into the next chunk, but always move forward.
        next_start = end
        carried = 0
        while next_start - 1 > start and carried + tokens[next_start - 1] <= overlap_tokens:
            next_start -= 1
            carried += tokens[next_start]
        start = next_start
    return chunks


def split_into_chunks(text: str, *, max_tokens: int, overlap_tokens: int) -> list[str]:
    """`text` as overlapping chunks of at most `max_tokens`, split at natural boundaries."""
    units, ends_paragraph = split_units(text, max_tokens)
    return join_units(units, ends_paragraph, max_tokens=max_tokens, overlap_tokens=overlap_tokens)


def join_units(
    units: Sequence[tuple[str, int]],
    ends_paragraph: Sequence[bool],
    *,
    max_tokens: int,
    overlap_tokens: int,
) -> list[str]:
    """`split_units`' units (for `max_tokens`, or less) packed and joined into chunks."""
    ranges = pack_units(
        [t for _, t in units],
        max_tokens=max_tokens,
        overlap_tokens=overlap_tokens,
        ends_paragraph=ends_paragraph,
    )
    chunks = ("".join(units[i][0] for i in chunk).strip() for chunk in ranges)
    # A chunk of blanks alone (a long run of them cut by characters) has nothing to
    # summarise.
    return [chunk for chunk in chunks if has_visible_text(chunk)]


def _levels_needed(
    parts: int, *, summary_tokens: int, combine_room: int, group_room: int
) -> int | None:
    """The levels that combine `parts` part summaries of `summary_tokens` each (header
    included) into one call of `combine_room` tokens of text, grouping them in calls of
    `group_room` while they do not fit, as `Summarizer.summarize` does (None: never).

    Summaries joined take 1 token more for each blank line between two; `pack_units`
    counts that token with each summary.
    """
    per_group = group_room // (summary_tokens + 1)
    levels = 1
    while parts * (summary_tokens + 1) - 1 > combine_room:
        if per_group < 2 or parts == 1:
            return None  # a group of one summary shrinks nothing
        parts = math.ceil(parts / per_group)
        levels += 1
    return levels


def _utf8_size(text: str) -> int:
    # ASCII text is as many bytes as characters: encoding a long part only to count it
    # would copy it.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# --- prompts -------------------------------------------------------------------------


def _words(tokens: int) -> int:
    return max(10, tokens * 3 // 4)


def document_prompt(*, target_tokens: int, instructions: str) -> str:
    """System message for summarising a document that fits one call."""
    prompt = (
        "Summarise the document the user sends in at most about "
        f"{_words(target_tokens)} words. Keep names, numbers, dates and conclusions; do not "
        "add anything that is not in the text."
    )
    return f"{prompt}\n{instructions}" if instructions else prompt


def part_prompt(*, target_tokens: int, instructions: str) -> str:
    """System message for summarising one part of a longer document."""
    prompt = (
        "You summarise one part of a longer document. Write a faithful, self-contained "
        f"summary of the part in at most about {_words(target_tokens)} words. Keep names, "
        "numbers, dates and conclusions; do not add anything that is not in the text."
    )
    return f"{prompt}\n{instructions}" if instructions else prompt


def combine_prompt(*, target_tokens: int, instructions: str) -> str:
    """System message for combining part summaries into one."""
    prompt = (
        "You are given summaries of consecutive parts of one document, in order. Combine "
        "them into one coherent summary of the whole document in at most about "
        f"{_words(target_tokens)} words, without repeating yourself."
    )
    return f"{prompt}\n{instructions}" if instructions else prompt


def _part_name(index: int, count: int) -> str:
    return f"Part {index + 1} of {count}"


def _piece_name(name: str, number: int) -> str:
    """The name of a piece a named text was split into (a group of summaries has none)."""
    return f"{name}, piece {number}" if name else ""


def _header(name: str) -> str:
    """What goes before a text in its message: its name, when it has one."""
    return f"{name}:\n\n" if name else ""


def _summaries_message(summaries: Sequence[str], *, first: int = 0) -> str:
    # A summary is the upstream's text: a control character in it (a form feed, an ANSI
    # escape) would fail the next call's validation, after every part was paid for.
    return "\n\n".join(
        f"Summary of part {first + i + 1}:\n{without_control_characters(s)}"
        for i, s in enumerate(summaries)
    )


def _summary_tokens(answer_tokens: int, *, number: int = 0) -> int:
    """One part's summary of `answer_tokens` in a combine call, with its header: that of
    part `number + 1`, whose digits widen it."""
    return answer_tokens + estimate_text_tokens(_summaries_message([""], first=number))


# --- the call ------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    usage: Usage = field(default_factory=Usage)
    # Summed as the ledger sums them, in integer pico-dollars: a float sum drifts.
    cost_pico: int = 0
    calls: int = 0
    # The calls' waits on their upstreams, (start, end) on the summary's clock: parts
    # run side by side, and a moment two of them waited is waited once.
    upstream_waits: list[tuple[float, float]] = field(default_factory=list)
    # Their waits on the gateway's limits, each placed just before its upstream wait.
    queued_waits: list[tuple[float, float]] = field(default_factory=list)
    parts_cut: int = 0  # summaries to combine that their max_tokens cut off
    # A call of the summary was sent (one whose failure may have been sent too), or
    # answered from the cache: the summary's own request stays spent (`summarize`).
    was_sent: bool = False

    def add(self, completion: Completion, *, now: float) -> None:
        self.was_sent = True
        self.usage = self.usage + completion.usage
        self.cost_pico += to_pico(completion.cost_usd)
        timings = completion.timings
        upstream_from = now - timings.upstream_ms / _MS
        if timings.queued_ms:
            self.queued_waits.append((upstream_from - timings.queued_ms / _MS, upstream_from))
        if not completion.is_cache_hit:  # a cached part made no upstream call
            self.calls += 1
        if timings.upstream_ms or not completion.is_cache_hit:
            # Its own call's, or one it shared (single flight), whose wait it waited.
            self.upstream_waits.append((upstream_from, now))

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around one try of a call: its failure, unless refused unsent (`is_unsent`),
        counts as sent, and so does its cancel, unless marked unsent (`ended_unsent`)."""
        try:
            yield
        except (GatewayError, asyncio.CancelledError) as ended:
            if not ended_unsent(ended):
                self.was_sent = True
            raise

    def queued_s(self) -> float:
        """The moments some call waited on the gateway's limits while none waited on an
        upstream: the summary's own queued time, apart from its upstream time."""
        if not self.queued_waits:
            return 0.0
        return covered_s(self.upstream_waits + self.queued_waits) - covered_s(self.upstream_waits)


class _Stopped(Exception):
    """A part's task ending because another part failed (never reaches the caller)."""


@dataclass(slots=True)
class _Halt:
    """The first failure among a Summarize's parts, and how it stops the others.

    Once a part failed for good no other call starts: a part waiting for its turn among
    the parts (`concurrency`), for the tenant's pacer or out a retry's backoff is cut,
    and one between calls (pieces, retries) stops before the next. A call already handed
    to the pipeline (sent, or waiting its turn at its upstream's limits) runs to its end,
    as the caller's deadline and its own timeouts bound it: cut, it would be paid for its
    prompt and not cached, and paid again when the Summarize is run again.
    """

    failure: Exception | None = None
    parts: list[asyncio.Task[None]] = field(default_factory=list)
    in_calls: set[asyncio.Task[Any]] = field(default_factory=set)

    def check(self) -> None:
        """Raise `_Stopped` once a part has failed."""
        if self.failure is not None:
            raise _Stopped

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Around one upstream call of a part's task, which `fail` then lets run."""
        self.check()
        task = asyncio.current_task()
        if task is not None:
            self.in_calls.add(task)
        try:
            yield
        finally:
            self.in_calls.discard(task)

    def fail(self, exc: Exception) -> None:
        """Keep the first failure; cut every other part not in an upstream call."""
        if self.failure is None:
            self.failure = exc
        current = asyncio.current_task()
        for part in self.parts:
            if part is not current and part not in self.in_calls:
                part.cancel()


@dataclass(frozen=True, slots=True)
class _Run:
    """What every call of one Summarize shares: the request, its deadline, its tally and
    the halt its parts' first failure sets."""

    request: SummaryRequest
    deadline: Deadline
    concurrency: int  # calls at once
    tally: _Tally = field(default_factory=_Tally)
    halt: _Halt = field(default_factory=_Halt)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where a call sits in the work, as `SummarizePartFailed` reports it."""

    part: int
    parts: int
    level: int


_WHOLE = _Slot(part=1, parts=1, level=1)


def _tokens_per_minute() -> int:
    """The tokens_per_minute of the tenant whose Summarize is running (0: none)."""
    pacer = current_pacer()
    return pacer.tokens_per_minute if pacer is not None else 0


def _rate_room(*, system: str, header: str, answer_tokens: int) -> int | None:
    """Tokens of text that one call may hold beside `system`, `header` and an answer and
    still fit the tenant's tokens_per_minute, counted as `_call` takes them (None: no
    such limit). A larger call would be refused for good, however long it waited."""
    limit = _tokens_per_minute()
    if not limit:
        return None
    # `header` and the text are one message: the header's overhead counts it.
    return (
        limit
        - part_tokens((system,), max_tokens=answer_tokens)
        - part_tokens((header,), max_tokens=0)
    )


def _rate_too_small(tenant: str, answer_tokens: int, least: int) -> QuotaExceeded:
    """The refusal of a Summarize whose tenant's tokens_per_minute holds no useful call:
    none with `least` tokens of text beside its prompt and answer."""
    limit = _tokens_per_minute()
    # An answer at the floor (the default target, a part's) is not the caller's to lower.
    lower = "lower target_tokens, " if answer_tokens > _MIN_TARGET_TOKENS else ""
    refusal = QuotaExceeded(
        f"tenant {tenant!r}'s tokens_per_minute of {limit} cannot hold one summarising "
        f"call: its prompt, a {answer_tokens}-token answer and at least "
        f"{least} tokens of text; {lower}shorten the instructions or raise "
        "the tenant's tokens_per_minute",
        subject=f"tenant:{tenant}:tokens_per_minute",
        retry_after_s=None,
    )
    refusal.is_retry_futile = True  # as any call larger than a minute's allowance
    return refusal


class Summarizer:
    """Runs Summarize calls through a `Pipeline`."""

    def __init__(
        self, pipeline: Pipeline, config: SummarizeConfig, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._pipeline = pipeline
        self._config = config
        self._clock = clock
        # Models whose upstream refused the summarising calls' temperature 0 (OpenAI's
        # reasoning models take only their default): their calls go without one.
        self._refusing_temperature: set[str] = set()

    def validate(self, request: SummaryRequest) -> int:
        """Check the request; return the target length in tokens.

        Every bad field is reported at once, as Complete's are, and before a model no
        upstream serves (NOT_FOUND), as Complete's are too; the checks against the
        model's window wait for a model that is served.
        """
        invalid_model = model_violations(request.model)
        violations = [*request.violations, *invalid_model]
        window = None
        unknown_model = None
        if not invalid_model:
            try:
                self._pipeline.pool.routes(request.model)
            except ModelNotFound as exc:
                unknown_model = exc
            else:
                window = self._pipeline.context_window(request.model)
        target = self._target(request, window)
        if not has_visible_text(request.document):
            violations.append(FieldViolation("document", "must not be empty"))
        else:
            size = len(request.document.encode("utf-8"))
            if size > self._config.max_document_bytes:
                violations.append(
                    FieldViolation(
                        "document",
                        f"at most {self._config.max_document_bytes} bytes, got {size}",
                    )
                )
            elif has_control_characters(as_sent(request.document)):
                # Refused here, not by the call that would send it: the parts before that
                # one would have been sent and paid for by then.
                violations.append(FieldViolation("document", "must not contain control characters"))
        if request.target_tokens is not None and request.target_tokens < _MIN_TARGET_TOKENS:
            violations.append(
                FieldViolation(
                    "target_tokens",
                    f"at least {_MIN_TARGET_TOKENS} (or 0: the default), "
                    f"got {request.target_tokens}",
                )
            )
        elif window is not None and target > window // 4:
            violations.append(
                FieldViolation(
                    "target_tokens",
                    f"at most a quarter of the model's context window ({window // 4}), "
                    f"got {target}",
                )
            )
        # Read no further than the limit needs: 4 MiB of instructions are a quarter second
        # of the event loop to estimate whole.
        room = None if window is None else window // 8
        if room is not None and estimate_text_tokens_up_to(request.instructions, room + 1) > room:
            violations.append(FieldViolation("instructions", f"at most about {room} tokens"))
        elif (size := _utf8_size(request.instructions)) > (
            most := self._pipeline.limits.max_request_bytes // 8
        ):
            # Every call sends them: over `max_request_bytes` beside a part, each would be
            # refused on `messages`, a field the caller never sent.
            violations.append(FieldViolation("instructions", f"at most {most} bytes, got {size}"))
        elif has_control_characters(request.instructions):
            violations.append(FieldViolation("instructions", "must not contain control characters"))
        # Checked here as well as by each part's call: so before the call takes its
        # tenant's limits (`CompletionServicer.check`).
        violations.extend(label_violations(request.labels, self._pipeline.limits))
        if violations:
            raise InvalidRequest(violations)
        if unknown_model is not None:
            raise unknown_model
        return target

    def _target(self, request: SummaryRequest, window: int | None) -> int:
        """The summary's length in tokens: as asked, else the default."""
        default = self._config.default_target_tokens
        # The default scales down for a small model, as Complete's answer reserve does,
        # and for a small tokens_per_minute (known once the call is admitted), whose
        # combine call must hold it beside the summaries.
        if window is not None:
            default = min(default, window // 4)
        if minute := _tokens_per_minute():
            default = min(default, max(_MIN_TARGET_TOKENS, minute // 4))
        return request.target_tokens or default

    def _factor(self, request: SummaryRequest) -> float:
        """The calibration its tenant's estimates for its model are multiplied by now."""
        return self._pipeline.calibration.factor(request.model, request.tenant)

    def _room(
        self, request: SummaryRequest, *, system: str, header: str, answer_tokens: int
    ) -> int:
        """Tokens of text that fit one call beside `system`, `header` and an answer, now,
        within the model's window and the tenant's tokens_per_minute (if it has one).

        Read again before every call: the calibration factor rises when upstreams report
        more prompt tokens than estimated. May be negative.
        """
        room = self._window_room(request, system=system, header=header, answer_tokens=answer_tokens)
        rate_room = _rate_room(system=system, header=header, answer_tokens=answer_tokens)
        return room if rate_room is None else min(room, rate_room)

    def _window_room(
        self, request: SummaryRequest, *, system: str, header: str, answer_tokens: int
    ) -> int:
        """`_room`, within the model's window alone."""
        window = self._pipeline.context_window(request.model)
        factor = self._factor(request)
        frame = PER_REQUEST_OVERHEAD + 2 * PER_MESSAGE_OVERHEAD + estimate_text_tokens(system)
        frame += estimate_text_tokens(header)
        room = math.floor((window - answer_tokens - _SAFETY_TOKENS) / factor) - frame
        # Each call is a completion, held to `max_prompt_tokens` (uncalibrated) however
        # large the model's window: a part over it would be refused on `messages`.
        return min(room, self._pipeline.limits.max_prompt_tokens - frame)

    def _require_room(
        self,
        request: SummaryRequest,
        *,
        system: str,
        header: str,
        answer_tokens: int,
        least: int = _MIN_CHUNK_TOKENS,
        min_rate_room: int | None = None,
    ) -> int:
        """`_room`, when enough text fits one call; else no split can help.

        Enough is `least`, or `min_rate_room` (if given) when the tenant's minute is what
        leaves less.

        Raises:
            InvalidRequest: on `instructions` (or `target_tokens` without them), saying
                how much room the prompt and the answer leave in the window.
            QuotaExceeded: the window has room, but the tenant's tokens_per_minute
                cannot hold a call of the smallest part (no wait would help).
        """
        model = request.model
        room = self._room(request, system=system, header=header, answer_tokens=answer_tokens)
        if room >= least:
            return room
        window_room = self._window_room(
            request, system=system, header=header, answer_tokens=answer_tokens
        )
        if window_room >= least:
            if room >= (least if min_rate_room is None else min_rate_room):
                return room
            raise _rate_too_small(request.tenant, answer_tokens, least)
        room = window_room
        window = self._pipeline.context_window(model)
        factor = self._factor(request)
        field_name = "instructions" if request.instructions else "target_tokens"
        raise InvalidRequest(
            [
                FieldViolation(
                    field_name,
                    f"the prompt, instructions and answer leave room for {max(0, room)} "
                    f"tokens of the document in the model's context window of {window} "
                    f"(estimates x{factor:.2f}, as calibrated for this model); at least "
                    f"{least} are needed: shorten the instructions or lower "
                    "target_tokens",
                )
            ]
        )

    def _require_levels(
        self,
        request: SummaryRequest,
        *,
        parts: int,
        one_answer: int,
        combine_system: str,
        group_system: str,
        target: int,
        part_target: int,
    ) -> None:
        """Before any part is paid for: the summaries of `parts` parts, each `one_answer`
        tokens (as long as a part may answer), come down to one combine call within
        `max_levels` levels of groups.

        Raises:
            QuotaExceeded, InvalidRequest: as `_require_room`, when summaries that may not
                fit one combine call cannot be grouped two at least (a group of one
                shrinks nothing).
            InvalidRequest: on `document`, when they would need more than `max_levels`.
        """
        # Each summary counted as `pack_units` is given it: with its blank line.
        one_summary = _summary_tokens(one_answer)
        combine_room = self._room(request, system=combine_system, header="", answer_tokens=target)
        if parts * (one_summary + 1) <= combine_room:
            return
        group_room = self._require_room(
            request,
            system=group_system,
            header="",
            answer_tokens=part_target,
            least=2 * (one_summary + 1),
        )
        # Their headers as wide as the parts' numbers.
        longest = _summary_tokens(one_answer, number=parts - 1)
        needed = _levels_needed(
            parts, summary_tokens=longest, combine_room=combine_room, group_room=group_room
        )
        max_levels = self._config.max_levels
        if needed is None or needed > max_levels:
            levels = f"more than {max_levels}" if needed is None else str(needed)
            violation = FieldViolation(
                "document",
                f"too long to summarise in {max_levels} levels (summarize.max_levels): the "
                f"summaries of its {parts} parts, as long as a part may answer, "
                f"would need {levels} levels to fit one call with a {target}-token answer; "
                "shorten the document or lower target_tokens",
            )
            raise InvalidRequest([violation])

    async def summarize(
        self,
        request: SummaryRequest,
        *,
        deadline: Deadline,
        max_concurrency: int | None = None,
        validated: bool = False,
    ) -> Summary:
        """Summarise `request.document`; see the module docstring for how.

        `max_concurrency` caps the configured calls at once (the tenant's own cap).
        `validated`: `validate` passed on this very request (the caller gate's check), so
        the document is not encoded and scanned again; only the target is read again,
        now that the tenant's tokens_per_minute is known.

        Raises:
            GatewayError: the summary failed; `is_unsent` when none of its calls was sent
                (nor answered from the cache), so that the request its tenant's limits
                took for it goes back (`CallerGate.admit`), as it does for a cancel so
                marked (`mark_unsent`).
        """
        tally = _Tally()
        try:
            return await self._summarize(
                request,
                tally,
                deadline=deadline,
                max_concurrency=max_concurrency,
                validated=validated,
            )
        except GatewayError as failed:
            failed.is_unsent = not tally.was_sent
            raise
        except asyncio.CancelledError as cancel:  # its parts' tasks ended before it
            mark_unsent(cancel, is_unsent=not tally.was_sent)
            raise

    async def _summarize(
        self,
        request: SummaryRequest,
        tally: _Tally,
        *,
        deadline: Deadline,
        max_concurrency: int | None,
        validated: bool,
    ) -> Summary:
        started = self._clock.now()
        model = request.model
        window = self._pipeline.context_window(model)
        # Validated as the caller sent it: the document's size is the caller's.
        target = self._target(request, window) if validated else self.validate(request)
        request = dataclasses.replace(request, document=as_sent(request.document))
        # A part's answer is at most an eighth of what one call may take: the window, and
        # the tenant's tokens_per_minute, else its summaries would barely shrink the text.
        per_call = min(window, _tokens_per_minute() or window)
        part_target = max(_MIN_TARGET_TOKENS, min(target, per_call // 8))
        part_system = part_prompt(target_tokens=part_target, instructions=request.instructions)
        combine_system = combine_prompt(target_tokens=target, instructions=request.instructions)
        concurrency = self._config.concurrency
        run = _Run(request, deadline, min(concurrency, max_concurrency or concurrency), tally)
        document_system = document_prompt(target_tokens=target, instructions=request.instructions)
        whole = await asyncio.to_thread(estimate_text_tokens, request.document)
        if whole <= self._room(request, system=document_system, header="", answer_tokens=target):
            answer = await self._call_if_fits(
                run, document_system, request.document, target, _WHOLE
            )
            if answer is not None:
                return self._result(answer, 1, 1, run.tally, started)
        # Before any part is paid for: the summaries must be combinable within the
        # tenant's tokens_per_minute as well as the window. Levels of groups end with one
        # summary, as long as a part's answer may be (estimated as the calibration
        # expects): a combine call that cannot hold it never ends the run.
        one_answer = math.ceil(part_target / self._factor(request))
        one_summary = _summary_tokens(one_answer)
        self._require_room(
            request,
            system=combine_system,
            header="",
            answer_tokens=target,
            least=max(_MIN_CHUNK_TOKENS, one_summary),
        )
        # Room for the widest "Part N of M" of as many digits as the parts turn out to
        # number: past 999 they are packed again, with room for the longer header (the
        # units are split once: only those too long for the smaller room again).
        widest = 999
        units: tuple[list[tuple[str, int]], list[bool]] | None = None
        while True:
            chunk_room = self._require_room(
                request,
                system=part_system,
                header=_header(_part_name(widest - 1, widest)),
                answer_tokens=part_target,
            )
            # Chunking a large document is CPU work: keep the event loop answering meanwhile.
            if units is None:
                units = await asyncio.to_thread(split_units, request.document, chunk_room)
            else:
                units = await asyncio.to_thread(fit_units, *units, chunk_room)
            chunks = await asyncio.to_thread(
                join_units,
                *units,
                max_tokens=chunk_room,
                overlap_tokens=self._config.chunk_overlap_tokens,
            )
            if len(chunks) <= widest:
                break
            widest = 10 ** len(str(len(chunks))) - 1
        if len(chunks) == 1:
            # Too long for one call with the target's answer, it fits with a part's: one
            # call with that shorter answer, where a part and a combine of its one summary
            # would pay twice for the same text.
            shorter = document_prompt(target_tokens=part_target, instructions=request.instructions)
            answer = await self._call_if_fits(run, shorter, request.document, part_target, _WHOLE)
            if answer is not None:
                return self._result(answer, 1, 1, run.tally, started)
        inputs = [(_part_name(i, len(chunks)), c) for i, c in enumerate(chunks)]
        # Levels after the first combine groups of summaries into shorter ones.
        group_system = combine_prompt(target_tokens=part_target, instructions=request.instructions)
        self._require_levels(
            request,
            parts=len(chunks),
            one_answer=one_answer,
            combine_system=combine_system,
            group_system=group_system,
            target=target,
            part_target=part_target,
        )
        system = part_system
        overlap_tokens = self._config.chunk_overlap_tokens
        level = 1
        while True:
            summaries = await self._summarise_all(
                run, system, inputs, part_target, overlap_tokens=overlap_tokens, level=level
            )
            if level == 1:
                parts_summarised = len(summaries)  # more than the chunks when any was re-split
            joined = _summaries_message(summaries)
            combine_room = self._room(
                request, system=combine_system, header="", answer_tokens=target
            )
            if estimate_text_tokens(joined) <= combine_room:
                final = _Slot(part=1, parts=1, level=level + 1)
                answer = await self._call_if_fits(run, combine_system, joined, target, final)
                if answer is not None:
                    return self._result(answer, parts_summarised, level, run.tally, started)
            # Too long to combine in one call: group the summaries and summarise them again.
            self._require_room(request, system=combine_system, header="", answer_tokens=target)
            if level >= self._config.max_levels:
                violation = FieldViolation(
                    "document",
                    f"too long to summarise in {level} levels (summarize.max_levels): the "
                    f"summaries of its {len(summaries)} parts still do not fit one call "
                    f"with a {target}-token answer; shorten the document or lower "
                    "target_tokens",
                )
                raise InvalidRequest([violation])
            group_room = self._require_room(
                request, system=group_system, header="", answer_tokens=part_target
            )
            # Each summary with its header as `_summaries_message` writes it, plus 1 for
            # the blank line between two (estimates add up across whitespace).
            tokens = [
                estimate_text_tokens(_summaries_message([s], first=i)) + 1
                for i, s in enumerate(summaries)
            ]
            groups = pack_units(tokens, max_tokens=group_room, overlap_tokens=0)
            inputs = [
                ("", _summaries_message([summaries[i] for i in group], first=group.start))
                for group in groups
            ]
            system = group_system
            overlap_tokens = 0
            level += 1

    def _result(
        self, answer: Completion, chunks: int, levels: int, tally: _Tally, started: float
    ) -> Summary:
        return Summary(
            summary=answer.content.strip(),
            chunks=chunks,
            levels=levels,
            usage=tally.usage,
            cost_usd=tally.cost_pico / PICO,
            upstream_calls=tally.calls,
            timings=Timings(
                total_ms=(self._clock.now() - started) * _MS,
                upstream_ms=covered_s(tally.upstream_waits) * _MS,
                queued_ms=tally.queued_s() * _MS,
            ),
            finish_reason=answer.finish_reason,
            parts_cut=tally.parts_cut,
        )

    async def _summarise_all(
        self,
        run: _Run,
        system: str,
        inputs: Sequence[tuple[str, str]],
        answer_tokens: int,
        *,
        overlap_tokens: int,
        level: int,
    ) -> list[str]:
        """Summarise every (name, text), `concurrency` at once; the first failure fails
        them all, once the calls it did not cut have ended (`_Halt`).

        Returns the summaries in the order of `inputs`, each input's re-split pieces (see
        `_summarise_fitting`) in place of it.

        Raises:
            ShuttingDown: the server began stopping before every input started; those
                running were left to finish (and be cached), for a retry elsewhere.
        """
        semaphore = asyncio.Semaphore(run.concurrency)
        results: list[list[str]] = [[] for _ in inputs]
        halt = run.halt
        not_started = False

        async def one(index: int) -> None:
            nonlocal not_started
            name, text = inputs[index]
            async with semaphore:
                if self._pipeline.is_stopping:
                    not_started = True
                    return
                slot = _Slot(part=index + 1, parts=len(inputs), level=level)
                try:
                    results[index] = await self._summarise_fitting(
                        run,
                        system,
                        text,
                        answer_tokens,
                        slot,
                        name=name,
                        overlap_tokens=overlap_tokens,
                    )
                except _Stopped:
                    pass
                except Exception as exc:  # told to the caller once all have ended
                    halt.fail(exc)  # before the semaphore lets another part start

        # A cancel (the caller's, its deadline) still cuts every part at once: the group's.
        async with asyncio.TaskGroup() as group:
            halt.parts = [group.create_task(one(index)) for index in range(len(inputs))]
        if halt.failure is not None:
            raise halt.failure
        if not_started:
            raise ShuttingDown()
        return [summary for summaries in results for summary in summaries]

    async def _summarise_fitting(
        self,
        run: _Run,
        system: str,
        text: str,
        answer_tokens: int,
        slot: _Slot,
        *,
        name: str,
        overlap_tokens: int,
    ) -> list[str]:
        """Summarise `text`, split again first when it no longer fits the window.

        Parts and groups are sized with the calibration as it stood when they were made;
        upstream usage may have raised it since. A text that no longer fits is split with
        the factor as it is now into pieces, each summarised in turn (and checked again
        when its turn comes). Every piece is at most the room, which is less than the text
        it came from (at most half of it, when the text was refused although it fitted by
        the estimate), so splitting ends; a room too small for any piece fails the call.

        Returns:
            One summary, or one for each piece, in order.
        """
        header = _header(name)
        room = self._room(run.request, system=system, header=header, answer_tokens=answer_tokens)
        tokens = estimate_text_tokens(text)
        was_refused = False
        if tokens <= room:
            answer = await self._call_if_fits(run, system, header + text, answer_tokens, slot)
            if answer is not None:
                return [_part_summary(answer, run.tally)]
            was_refused = True
        # Room for the widest piece number a split can reach (a piece takes a token at least).
        widest = _header(_piece_name(name, tokens))
        # The minute held `_MIN_CHUNK_TOKENS` of text beside the part's header before any
        # part was paid for; a piece's longer header takes a few of them (the minute's room
        # does not move with the calibration, as the window's does), so the pieces are that
        # much smaller, rather than the run failing half-way.
        max_tokens = self._require_room(
            run.request, system=system, header=widest, answer_tokens=answer_tokens, min_rate_room=1
        )
        if was_refused:
            # Refused although it fitted by the estimate: a refusal leaves a factor of 1 or
            # more as it was (no answer has calibrated a text the estimator counts low), and
            # split by the same room it would come back whole and be refused again.
            max_tokens = min(max_tokens, max(_MIN_CHUNK_TOKENS, tokens // 2))
        pieces = split_into_chunks(text, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
        if len(pieces) == 1:
            # One piece: splitting it again could loop if the estimate and the pipeline
            # disagreed. Send it; a refusal from the pipeline then stands.
            try:
                answer = await self._call(run, system, header + pieces[0], answer_tokens, slot)
            except UpstreamContextExceeded as exc:
                raise _smallest_piece_refused(exc, slot) from exc
            return [_part_summary(answer, run.tally)]
        summaries: list[str] = []
        for number, piece in enumerate(pieces, start=1):
            summaries += await self._summarise_fitting(
                run,
                system,
                piece,
                answer_tokens,
                slot,
                name=_piece_name(name, number),
                overlap_tokens=overlap_tokens,
            )
        return summaries

    async def _call_if_fits(
        self, run: _Run, system: str, user: str, answer_tokens: int, slot: _Slot
    ) -> Completion | None:
        """`_call`, or None when `user` does not fit the window after all: the pipeline
        refuses it before sending, or the upstream refuses it as too long; or when it
        is more bytes than `max_request_bytes` lets one call hold.

        Callers check the room first, so the pipeline refuses only on a retry: during its
        backoff other calls raised the tenant's calibration for the model. An upstream
        counts its own tokens, and its refusal raises the calibration too. The caller then
        splits the text as if it had not fitted to begin with.
        """
        if _utf8_size(system) + _utf8_size(user) > self._pipeline.limits.max_request_bytes:
            # A document near `max_document_bytes` fits a large window by its tokens, but
            # not `max_request_bytes` beside its prompt: refused on `messages`, a field the
            # caller never sent. Split, as though it had not fitted the window.
            return None
        try:
            return await self._call(run, system, user, answer_tokens, slot)
        except (ContextWindowExceeded, UpstreamContextExceeded):
            return None

    async def _call(
        self, run: _Run, system: str, user: str, answer_tokens: int, slot: _Slot
    ) -> Completion:
        """One summarising call, retried on upstream failures that may pass."""
        request, deadline = run.request, run.deadline
        chat = ChatRequest(
            model=request.model,
            messages=(Message(Role.SYSTEM, system), Message(Role.USER, user)),
            params=GenerationParams(
                max_tokens=answer_tokens,
                # A summary should be faithful, not sampled; and so deterministic, it is
                # cached by default: a Summarize run again (after a part failed, say) pays
                # only for the parts not summarised before. Dropped for a model that
                # refuses it, at each try (`_complete_part`).
                temperature=0.0,
                reasoning_effort=request.reasoning_effort,
            ),
            truncation=TruncationMode.NONE,
            labels=request.labels,
            tenant=request.tenant,
        )
        pacer = current_pacer()
        # Each try takes a turn of its own: the tenant's tokens_per_minute (while none of
        # the call's tries was sent) and one of its call slots, held until the try ends.
        # The wait between two (a back-off, a breaker's cool-down, a restart) holds no
        # slot, which the tenant's other calls may use meanwhile.
        turn: Turn = unpaced
        if pacer is not None:
            tokens = part_tokens((system, user), max_tokens=answer_tokens)
            turn = paced(pacer.turn, tokens, deadline, requests=0)
        attempts = self._config.chunk_attempts
        # The last failure that says why the part failed (`says_why`): an upstream's,
        # or a refusal as its upstream restarts, whatever tries came before it.
        telling: UpstreamError | None = None
        # Only a try that was sent makes the next a retry, held to the retry budget:
        # the parts refused unsent while the local model restarts would spend it.
        was_sent = False
        # What each upstream attempt of every try failed with, in order: the status
        # says them all, not only the telling failure's (`attempt_errors`).
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            if self._pipeline.is_stopping:  # cut at the grace's end, it would be paid for
                raise ShuttingDown(is_unsent=not was_sent)
            run.halt.check()  # another part failed: take nothing from the pacer
            waiting_since = time.monotonic()  # a wait for the pacer is queued time
            try:
                # A try that went back unsent gave its units back as it ended (`in_turn`).
                # A part waits its turn at its upstream's limits, as a batch's item does.
                completion = await self._complete_part(
                    chat,
                    deadline=deadline,
                    waiting_since=waiting_since,
                    was_sent=was_sent,
                    turn=turn,
                    within=functools.partial(_calling, run),
                )
            # Refused before this try was sent: unsent only if no earlier try was, and
            # naming the earlier tries' failures with this one's.
            except (
                ShuttingDown,
                BudgetExceeded,
                DeadlineExceeded,
                ContextWindowExceeded,  # the text is split again (`_call_if_fits`)
            ) as refused:
                refused.is_unsent = refused.is_unsent and not was_sent
                refused.attempt_failures = (*failures, *refused.attempt_failures)
                raise
            except UpstreamContextExceeded:
                raise  # the text is split again (`_call_if_fits`)
            except UpstreamRejected as exc:
                raise SummarizePartRejected(
                    exc, part=slot.part, parts=slot.parts, level=slot.level
                ) from exc
            except UpstreamError as exc:
                if says_why(exc):
                    telling = exc
                failures.extend(exc.attempt_failures)
                was_sent = was_sent or not exc.is_unsent
                wait_s = next_try_s(exc, doubled(self._config.retry_backoff_s, attempt - 1))
                left = deadline.remaining_s()
                # A rejected key stays rejected: a retry would only find the upstream set
                # aside, and say that instead.
                is_final = attempt == attempts or exc.is_retry_futile
                if is_final or (left is not None and left <= wait_s):
                    failed = SummarizePartFailed(
                        exc if telling is None else telling,
                        part=slot.part,
                        parts=slot.parts,
                        level=slot.level,
                        attempts=attempt,
                    )
                    failed.attempt_failures = tuple(failures)
                    # Unsent as its tries were (each try's turn gave its own units back).
                    failed.is_unsent = not was_sent
                    raise failed from exc
                # Ended by the server's stop, naming the failure: another replica
                # may take the call at once, where the next try would be sent into
                # the drain (or cut at its end).
                try:
                    await self._pipeline.pause(
                        wait_s,
                        sleep=self._clock.sleep,
                        last_error=exc if telling is None else telling,
                        is_unsent=not was_sent,
                    )
                except ShuttingDown as stopped:
                    stopped.attempt_failures = tuple(failures)
                    raise
                continue
            run.tally.add(completion, now=self._clock.now())
            _check_summary(completion, slot, attempts=attempt)
            return completion
        raise AssertionError("the retry loop always returns or raises")  # pragma: no cover

    async def _complete_part(
        self,
        chat: ChatRequest,
        *,
        deadline: Deadline,
        waiting_since: float | None,
        was_sent: bool,
        turn: Turn,
        within: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> Completion:
        """One try of a summarising call, in its `turn` and `within` that
        (`Pipeline.complete_in_turn`; `was_sent`: an earlier try was, which makes this one
        a rerun). An upstream that refuses its temperature (OpenAI's reasoning models
        answer 400 naming `temperature` for any but their default) has it asked again at
        once without one, and so are its model's later calls: the caller never set it,
        and could not stop it being sent."""
        if chat.params.temperature is not None and chat.model in self._refusing_temperature:
            chat = _without_temperature(chat)
        try:
            return await self._pipeline.complete_in_turn(
                chat,
                deadline=deadline,
                waiting_since=waiting_since,
                is_rerun=was_sent,
                turn=turn,
                was_sent=was_sent,
                within=within,
            )
        except UpstreamRejected as exc:
            if chat.params.temperature is None or not _refuses_temperature(exc):
                raise
        self._refusing_temperature.add(chat.model)
        try:
            # A turn of its own, taking only a slot: the try refused was sent.
            return await self._pipeline.complete_in_turn(
                _without_temperature(chat),
                deadline=deadline,
                waiting_since=None,
                is_rerun=was_sent,
                turn=turn,
                was_sent=True,
                within=within,
            )
        except GatewayError as refused:
            # The try refused for its temperature was sent: so was this one's call, whatever
            # stopped it (its turn's units, and the Summarize's request, stay spent).
            refused.is_unsent = False
            raise


@contextlib.contextmanager
def _calling(run: _Run) -> Iterator[None]:
    """Around one upstream call of a part, in its turn: one a failed part then lets run
    (`_Halt.calling`), its failure, unless unsent, marking the summary sent
    (`_Tally.sending`)."""
    with run.halt.calling(), run.tally.sending():
        yield


def _refuses_temperature(refusal: UpstreamRejected) -> bool:
    """Whether an upstream refused a request for its temperature (its error's `param`)."""
    return refusal.relayed is not None and refusal.relayed.param == "temperature"


def _without_temperature(chat: ChatRequest) -> ChatRequest:
    """`chat` with its temperature unset: the upstream's default."""
    return dataclasses.replace(chat, params=dataclasses.replace(chat.params, temperature=None))


def _smallest_piece_refused(exc: UpstreamContextExceeded, slot: _Slot) -> SummarizePartRejected:
    """The refusal of a part whose upstream finds even a piece too small to split again
    over its window: that upstream's window is smaller than the catalog says. Told as a
    part's, not as a Complete's (a violation on `messages` and advice to send it under
    KEEP_RECENT, neither of which a Summarize has)."""
    refused = UpstreamRejected(
        f"upstream {exc.upstream!r} says even a piece too small to split again, with the "
        f"prompt and the answer, is over the model's context window (HTTP {exc.status}): "
        "its window is smaller than the gateway's catalog says; lower target_tokens or "
        "shorten the instructions",
        upstream=exc.upstream,
        status=exc.status,
        relayed=exc.relayed,
    )
    return SummarizePartRejected(refused, part=slot.part, parts=slot.parts, level=slot.level)


def _part_summary(answer: Completion, tally: _Tally) -> str:
    """The text of a summary to combine, counted in `tally.parts_cut` when its max_tokens
    cut it off: the combined summary then misses its part's end, and still answers OK
    (the caller decides), so the response says how many were."""
    if answer.finish_reason is FinishReason.LENGTH:
        tally.parts_cut += 1
    return answer.content


def _check_summary(completion: Completion, slot: _Slot, *, attempts: int) -> None:
    """Fail the call on an answer that summarises nothing: used as it is, it would leave
    its part out of the summary, or make an empty summary, answered OK.

    No part is retried for it: at temperature 0 (and cached) it would answer the same.
    """
    if completion.finish_reason is FinishReason.CONTENT_FILTER:  # its moderation
        refused = UpstreamRejected(
            "its content filter stopped the answer", upstream=completion.upstream
        )
        raise SummarizePartRejected(refused, part=slot.part, parts=slot.parts, level=slot.level)
    if not has_visible_text(completion.content):
        why = "the answer had no text"
        if completion.finish_reason is FinishReason.LENGTH:
            why += (
                ": its max_tokens ran out first (reasoning took them; a lower "
                "reasoning_effort or a higher target_tokens leaves room for the text)"
            )
        failed = SummarizePartFailed(
            UpstreamUnavailable(why, upstream=completion.upstream),
            part=slot.part,
            parts=slot.parts,
            level=slot.level,
            attempts=attempts,
        )
        failed.is_retry_futile = True
        raise failed


__all__ = [
    "Summarizer",
    "Summary",
    "SummaryRequest",
    "as_sent",
    "combine_prompt",
    "document_prompt",
    "fit_units",
    "join_units",
    "pack_units",
    "part_prompt",
    "split_into_chunks",
    "split_units",
]
