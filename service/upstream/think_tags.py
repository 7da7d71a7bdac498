"""Reasoning a server writes inside `<think>...</think>` at the start of the answer's text.

Reasoning models served without a reasoning parser (vLLM without `--reasoning-parser`,
llama.cpp's server without `--reasoning-format`, older Ollama, many resellers of DeepSeek
R1 and Qwen3) open `content` with their thinking inside these tags. For an upstream set
`think_tags: true` it is relayed as reasoning, and the text after the close tag as the
answer; only a leading tag counts, as some models write such tags in their answers.

Some chat templates open the block themselves, at the end of the prompt (DeepSeek R1's
since its 0528 release, its distills', QwQ's): the answer starts inside it and only closes
it, `hmm</think>Paris.`. For an upstream set `think_tags: forced_open` everything up to
the first close tag is reasoning, as llama.cpp's `thinking_forced_open` reads it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import replace
from typing import Literal

from service.upstream.types import TextChunk, UpstreamReply

# An upstream's `think_tags`: off, a leading block, or a block its chat template opened.
ThinkTags = Literal["false", "true", "forced_open"]

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
# The tags in any case: the models' own templates write them in lower case, and some relays
# upper-case them. ASCII letters only: no other letter makes one (the Kelvin sign's lower
# case is `k`).
_OPEN = re.compile(re.escape(OPEN_TAG), re.IGNORECASE | re.ASCII)
_CLOSE = re.compile(re.escape(CLOSE_TAG), re.IGNORECASE | re.ASCII)


class _Phase(enum.Enum):
    OPENING = enum.auto()  # only whitespace so far, or the open tag's beginning
    THINKING = enum.auto()  # inside the tags: reasoning until the close tag
    CLOSED = enum.auto()  # just past the close tag: whitespace before the answer dropped
    ANSWERING = enum.auto()  # the answer's text, passed on as it comes


def _is_tag_beginning(text: str, tag: str) -> bool:
    """Whether `text`, shorter than `tag`, is its beginning, in any case."""
    return text.isascii() and tag.startswith(text.lower())


def _tag_start_at_end(text: str, tag: str) -> int:
    """How many characters at the end of `text` may begin `tag`, cut across pieces.

    The tag has its `<` only at its start, so only the last `<` can begin it.
    """
    start = text.rfind("<", max(0, len(text) - len(tag) + 1))
    return len(text) - start if start >= 0 and _is_tag_beginning(text[start:], tag) else 0


class ThinkTagSplitter:
    """Splits an answer's text, given piece by piece, into reasoning and answer.

    Text is held back only while it may still be a tag cut across pieces: the open tag's
    beginning (after any leading whitespace) or the close tag's (after any whitespace ending
    the reasoning so far), never more of it than the tag. Each piece is read once: held
    whitespace is kept in its pieces, and joined once, when the text after it comes.

    >>> splitter = ThinkTagSplitter()
    >>> splitter.feed("<think>hmm</th"), splitter.feed("ink>\\nParis."), splitter.end()
    (('hmm', ''), ('', 'Paris.'), ('', ''))
    """

    __slots__ = ("_blank", "_forced_open", "_has_reasoning", "_held", "_phase")

    def __init__(self, *, forced_open: bool = False) -> None:
        self._phase = _Phase.OPENING
        # The prompt opened the block: the text is reasoning from its start, a leading open
        # tag (which such a model may still write) dropped.
        self._forced_open = forced_open
        # Whitespace held back, in the pieces it came in: before the open tag, or ending
        # the reasoning so far (which a close tag would drop).
        self._blank: list[str] = []
        self._held = ""  # a tag's beginning, after `_blank`
        # Whether reasoning was passed on yet: whitespace that opens the block is dropped,
        # as is whitespace that ends it (Qwen3 without thinking sends "<think>\n\n</think>"
        # on every answer, which is no reasoning).
        self._has_reasoning = False

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer's text that `text` adds."""
        phase = self._phase
        if phase is _Phase.ANSWERING:
            return "", text
        if phase is _Phase.CLOSED:
            return "", self._answer_after_close(text)
        text, self._held = self._held + text, ""
        if phase is _Phase.THINKING:
            return self._thinking(text)
        start = text.lstrip()  # `_held` holds no whitespace: only this piece's is read
        if len(start) < len(text):
            self._blank.append(text[: len(text) - len(start)])
        if _OPEN.match(start):
            self._phase = _Phase.THINKING
            self._blank.clear()
            return self._thinking(start[len(OPEN_TAG) :])
        if len(start) < len(OPEN_TAG) and _is_tag_beginning(start, OPEN_TAG):
            self._held = start  # nothing yet, or the tag's beginning
            return "", ""
        if self._forced_open:
            self._phase = _Phase.THINKING
            self._blank.clear()  # whitespace opening the reasoning is none of it
            return self._thinking(start)
        self._phase = _Phase.ANSWERING  # no tag: the text is the answer, as before
        return "", self._taken_blank() + start

    def end(self) -> tuple[str, str]:
        """The reasoning and answer text still held when the answer ends: reasoning whose
        close tag never came (cut by `max_tokens`), or text that only began like the tag."""
        blank, held = self._taken_blank(), self._held
        self._held = ""
        if self._phase is _Phase.OPENING and self._forced_open:
            return held, ""  # only the open tag's beginning came: reasoning, as any text
        if self._phase is not _Phase.THINKING:
            return "", blank + held
        if not held:  # whitespace ending the reasoning: none of it
            return "", ""
        return (blank if self._has_reasoning else "") + held, ""

    def split(self, chunk: TextChunk) -> TextChunk | None:
        """`chunk` with its text split: the reasoning that adds after the server's own, and
        the answer's text; None when all it brought is held back."""
        reasoning, answer = self.feed(chunk.content)
        if reasoning or answer or chunk.tool_calls or chunk.reasoning:
            return TextChunk(answer, chunk.tool_calls, chunk.reasoning + reasoning)
        return None

    def rest(self) -> TextChunk | None:
        """What `end` releases, as the answer's last chunk; None when nothing was held."""
        reasoning, answer = self.end()
        return TextChunk(answer, (), reasoning) if reasoning or answer else None

    def _taken_blank(self) -> str:
        blank = "".join(self._blank)
        self._blank.clear()
        return blank

    def _thinking(self, text: str) -> tuple[str, str]:
        close = _CLOSE.search(text)
        if close is None:
            # Held: the close tag's beginning, and the whitespace before it (`_blank`),
            # which may end the block.
            cut = len(text) - _tag_start_at_end(text, CLOSE_TAG)
            body, self._held = text[:cut], text[cut:]
        else:
            body = text[: close.start()]
        thought = body.rstrip()
        reasoning = ""
        if thought:
            blank = self._taken_blank() if self._blank else ""
            reasoning = blank + thought if self._has_reasoning else thought.lstrip()
            self._has_reasoning = True
        if close is not None:
            self._blank.clear()
            self._phase = _Phase.CLOSED
            return reasoning, self._answer_after_close(text[close.end() :])
        if len(thought) < len(body):
            self._blank.append(body[len(thought) :])
        return reasoning, ""

    def _answer_after_close(self, text: str) -> str:
        answer = text.lstrip()
        if answer:
            self._phase = _Phase.ANSWERING
        return answer


def splitter_for(think_tags: ThinkTags) -> ThinkTagSplitter:
    """The splitter an upstream's `think_tags` setting, `true` or `forced_open`, asks for."""
    return ThinkTagSplitter(forced_open=think_tags == "forced_open")


def split_reply(reply: UpstreamReply, splitter: ThinkTagSplitter) -> UpstreamReply:
    """A unary answer with its leading `<think>` block moved to its reasoning, after any
    reasoning the server sent in a field of its own; `splitter` a new one."""
    reasoning, answer = splitter.feed(reply.content)
    held_reasoning, held_answer = splitter.end()
    return replace(
        reply,
        content=answer + held_answer,
        reasoning=reply.reasoning + reasoning + held_reasoning,
    )


__all__ = [
    "CLOSE_TAG",
    "OPEN_TAG",
    "ThinkTagSplitter",
    "ThinkTags",
    "split_reply",
    "splitter_for",
]
