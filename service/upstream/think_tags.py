"""Reasoning a server writes inside `<think>...</think>` at the start of the answer's text.

Reasoning models served without a reasoning parser (vLLM without `--reasoning-parser`,
llama.cpp's server without `--reasoning-format`, older Ollama, many resellers of DeepSeek
R1 and Qwen3) open `content` with their thinking inside these tags. For an upstream set
`think_tags: true` it is relayed as reasoning, and the text after the close tag as the
answer; only a leading tag counts, as some models write such tags in their answers.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncGenerator
from dataclasses import replace

from service.upstream.types import (
    StreamEvent,
    StreamTally,
    TextChunk,
    UpstreamReply,
    output_chars,
)

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class _Phase(enum.Enum):
    OPENING = enum.auto()  # only whitespace so far, or the open tag's beginning
    THINKING = enum.auto()  # inside the tags: reasoning until the close tag
    CLOSED = enum.auto()  # just past the close tag: whitespace before the answer dropped
    ANSWERING = enum.auto()  # the answer's text, passed on as it comes


def _tag_start_at_end(text: str, tag: str) -> int:
    """How many characters at the end of `text` may begin `tag`, cut across pieces.

    The tag has its `<` only at its start, so only the last `<` can begin it.
    """
    start = text.rfind("<", max(0, len(text) - len(tag) + 1))
    return len(text) - start if start >= 0 and tag.startswith(text[start:]) else 0


class ThinkTagSplitter:
    """Splits an answer's text, given piece by piece, into reasoning and answer.

    Text is held back only while it may still be a tag cut across pieces: the open tag's
    beginning (after any leading whitespace) or the close tag's, never more than the tag.

    >>> splitter = ThinkTagSplitter()
    >>> splitter.feed("<think>hmm</th"), splitter.feed("ink>\\nParis."), splitter.end()
    (('hmm', ''), ('', 'Paris.'), ('', ''))
    """

    __slots__ = ("_has_reasoning", "_held", "_phase")

    def __init__(self) -> None:
        self._phase = _Phase.OPENING
        self._held = ""
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
        start = text.lstrip()
        if start.startswith(OPEN_TAG):
            self._phase = _Phase.THINKING
            return self._thinking(start[len(OPEN_TAG) :])
        if OPEN_TAG.startswith(start):  # whitespace alone, or the tag's beginning
            self._held = text
            return "", ""
        self._phase = _Phase.ANSWERING  # no tag: the text is the answer, as before
        return "", text

    def end(self) -> tuple[str, str]:
        """The reasoning and answer text still held when the answer ends: reasoning whose
        close tag never came (cut by `max_tokens`), or text that only began like the tag."""
        held, self._held = self._held, ""
        return (held.rstrip(), "") if self._phase is _Phase.THINKING else ("", held)

    def _thinking(self, text: str) -> tuple[str, str]:
        if not self._has_reasoning:
            text = text.lstrip()
        close = text.find(CLOSE_TAG)
        if close < 0:
            # Held: the close tag's beginning, and the whitespace before it, which may end
            # the block.
            body = text[: len(text) - _tag_start_at_end(text, CLOSE_TAG)]
            reasoning = body.rstrip()
            self._held = text[len(reasoning) :]
            self._has_reasoning = self._has_reasoning or bool(reasoning)
            return reasoning, ""
        self._phase = _Phase.CLOSED
        return text[:close].rstrip(), self._answer_after_close(text[close + len(CLOSE_TAG) :])

    def _answer_after_close(self, text: str) -> str:
        answer = text.lstrip()
        if answer:
            self._phase = _Phase.ANSWERING
        return answer


def split_reply(reply: UpstreamReply) -> UpstreamReply:
    """A unary answer with its leading `<think>` block moved to its reasoning, after any
    reasoning the server sent in a field of its own."""
    splitter = ThinkTagSplitter()
    reasoning, answer = splitter.feed(reply.content)
    held_reasoning, held_answer = splitter.end()
    return replace(
        reply,
        content=answer + held_answer,
        reasoning=reply.reasoning + reasoning + held_reasoning,
    )


async def split_stream(
    events: AsyncGenerator[StreamEvent, None], tally: StreamTally
) -> AsyncGenerator[StreamEvent, None]:
    """`events` with a leading `<think>` block's text relayed as reasoning, as it comes;
    `tally` counts the output passed on.

    A chunk left with nothing (the tag alone, or its beginning) is not passed on; what is
    held at the end goes out before the `StreamEnd`.
    """
    splitter = ThinkTagSplitter()
    # Closed on every exit, so that a caller leaving closes the upstream's stream at once.
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TextChunk):
                reasoning, answer = splitter.feed(event.content)
                if reasoning or answer or event.tool_calls or event.reasoning:
                    chunk = TextChunk(answer, event.tool_calls, event.reasoning + reasoning)
                    tally.chars += output_chars(chunk)
                    yield chunk
                continue
            reasoning, answer = splitter.end()
            if reasoning or answer:
                tally.chars += len(reasoning) + len(answer)
                yield TextChunk(answer, (), reasoning)
            yield event


__all__ = ["CLOSE_TAG", "OPEN_TAG", "ThinkTagSplitter", "split_reply", "split_stream"]
