"""Splitting a leading `<think>...</think>` block off an answer's text, whole or in pieces."""

from __future__ import annotations

import pytest

from service.domain import FinishReason, ToolCallDelta
from service.upstream.think_tags import ThinkTagSplitter, split_reply
from service.upstream.types import TextChunk, UpstreamReply

# (answer's text, reasoning, answer)
CASES = [
    pytest.param("<think>hmm</think>Paris.", "hmm", "Paris.", id="tagged"),
    pytest.param(" \n<think>\nhmm\n</think>\n\n Paris.", "hmm", "Paris.", id="whitespace"),
    # Qwen3 without thinking: an empty block on every answer, which is no reasoning.
    pytest.param("<think>\n\n</think>\n\nParis.", "", "Paris.", id="blank-block"),
    pytest.param("<think>\nhm\n\n so\n</think>x", "hm\n\n so", "x", id="inner-whitespace"),
    pytest.param("<think>hm \n", "hm", "", id="unclosed-blank-end"),
    pytest.param("<think></think>Paris.", "", "Paris.", id="empty-block"),
    pytest.param("<think>a</think>b</think>c", "a", "b</think>c", id="first-close-ends-it"),
    pytest.param("<think>hmm, so the answer is", "hmm, so the answer is", "", id="unclosed"),
    pytest.param("<think>hmm</thi", "hmm</thi", "", id="unclosed-in-the-tag"),
    pytest.param("<think>", "", "", id="tag-alone"),
    pytest.param("Paris.", "", "Paris.", id="no-tag"),
    pytest.param("Paris. <think>hmm</think>", "", "Paris. <think>hmm</think>", id="not-leading"),
    pytest.param("<thinking>hmm</thinking>x", "", "<thinking>hmm</thinking>x", id="other-tag"),
    pytest.param("<th", "", "<th", id="tags-beginning-alone"),
    pytest.param("  \n", "", "  \n", id="whitespace-alone"),
    pytest.param("<b>Paris</b>", "", "<b>Paris</b>", id="html"),
    # Tags in any case: some relays upper-case them. Only ASCII letters make one.
    pytest.param("<THINK>hm</THINK>Paris.", "hm", "Paris.", id="upper-case"),
    pytest.param("<Think>hm</tHiNk>Paris.", "hm", "Paris.", id="mixed-case"),
    pytest.param("<thin\u212a>hm", "", "<thin\u212a>hm", id="kelvin-sign-is-no-k"),
    pytest.param("", "", "", id="empty"),
]


def _split_in_pieces(pieces: list[str], *, forced_open: bool = False) -> tuple[str, str]:
    splitter = ThinkTagSplitter(forced_open=forced_open)
    reasoning, answer = [], []
    for piece in [*pieces, None]:
        thought, text = splitter.end() if piece is None else splitter.feed(piece)
        reasoning.append(thought)
        answer.append(text)
    return "".join(reasoning), "".join(answer)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
def test_a_whole_text_is_split_at_its_leading_block(text: str, reasoning: str, answer: str) -> None:
    """Only a block opening the text (after whitespace) is reasoning, up to the first close
    tag; the answer after it loses its leading whitespace; unclosed, all of it is reasoning."""
    assert _split_in_pieces([text]) == (reasoning, answer)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
def test_any_cut_into_pieces_splits_as_the_whole_does(
    text: str, reasoning: str, answer: str
) -> None:
    """Tags cut anywhere across pieces (`<th` + `ink>`, `</thi` + `nk>`), in two or in
    three, give the same reasoning and answer as the whole text."""
    for first in range(len(text) + 1):
        assert _split_in_pieces([text[:first], text[first:]]) == (reasoning, answer)
        for second in range(first, len(text) + 1):
            pieces = [text[:first], text[first:second], text[second:]]
            assert _split_in_pieces(pieces) == (reasoning, answer)


# With `forced_open` (the chat template opened the block): (answer's text, reasoning, answer)
FORCED_OPEN_CASES = [
    pytest.param("hmm</think>\n\nParis.", "hmm", "Paris.", id="closed-only"),
    pytest.param("\n hmm \n</think>Paris.", "hmm", "Paris.", id="whitespace"),
    pytest.param("<think>hmm</think>Paris.", "hmm", "Paris.", id="open-tag-written-too"),
    pytest.param("</think>Paris.", "", "Paris.", id="empty-block"),
    pytest.param("hm <think> so</think>x", "hm <think> so", "x", id="open-tag-later"),
    pytest.param("a</think>b</think>c", "a", "b</think>c", id="first-close-ends-it"),
    pytest.param("hmm, so the answer is", "hmm, so the answer is", "", id="never-closed"),
    pytest.param("<th", "<th", "", id="tags-beginning-alone"),
    pytest.param("<b>hm</b></THINK>ok", "<b>hm</b>", "ok", id="html-and-upper-case"),
    pytest.param("", "", "", id="empty"),
]


@pytest.mark.parametrize(("text", "reasoning", "answer"), FORCED_OPEN_CASES)
def test_a_forced_open_block_is_reasoning_up_to_its_close_however_cut(
    text: str, reasoning: str, answer: str
) -> None:
    """An answer that starts inside the block: everything to the first close tag is
    reasoning (a leading open tag dropped), whole or cut anywhere in two or three pieces.
    Without `forced_open` such text is the answer, close tag and all."""
    for first in range(len(text) + 1):
        assert _split_in_pieces([text[:first], text[first:]], forced_open=True) == (
            reasoning,
            answer,
        )
        for second in range(first, len(text) + 1):
            pieces = [text[:first], text[first:second], text[second:]]
            assert _split_in_pieces(pieces, forced_open=True) == (reasoning, answer)
    assert _split_in_pieces(["hmm</think>Paris."]) == ("", "hmm</think>Paris.")


def test_one_character_at_a_time_holds_back_only_what_may_be_a_tag() -> None:
    """Each character goes out as soon as it cannot be part of a tag: reasoning as it
    comes, never more held than the tag's own length."""
    splitter = ThinkTagSplitter()
    text = "<think>a<b</think>\n Paris <think>"
    out = [splitter.feed(c) for c in text]
    assert out[:7] == [("", "")] * 7  # the open tag
    assert out[7:11] == [("a", ""), ("", ""), ("<b", ""), ("", "")]  # `<` may begin `</think>`
    assert out[11:20] == [("", "")] * 9  # `/think>`, then the whitespace after it
    assert "".join(a for _, a in out[20:]) == "Paris <think>"
    assert all(len(a) == 1 for _, a in out[20:]), "the answer is passed on as it comes"
    assert splitter.end() == ("", "")


def _reply(content: str, reasoning: str = "") -> UpstreamReply:
    return UpstreamReply("c1", "m", content, FinishReason.STOP, None, reasoning=reasoning)


def test_a_unary_answers_block_is_appended_to_the_reasoning_it_sent() -> None:
    """Reasoning sent in a field of its own comes first, the block's after it."""
    split = split_reply(_reply("<think>b</think>Paris.", reasoning="a"), ThinkTagSplitter())
    assert (split.reasoning, split.content) == ("ab", "Paris.")
    assert split_reply(_reply("Paris.", reasoning="a"), ThinkTagSplitter()) == _reply(
        "Paris.", reasoning="a"
    )


def test_chunks_relay_each_pieces_reasoning_and_the_rest_comes_at_the_end() -> None:
    """Chunks that bring only a tag's beginning split to nothing; reasoning the server sent
    in its field and tool-call pieces go on beside; text held when the stream ends (a tag's
    beginning that was not one) is the rest."""
    call = ToolCallDelta(0, "call_1", "f", "{}")
    splitter = ThinkTagSplitter()
    chunks = [
        TextChunk("", (), "r"),
        TextChunk("<th"),
        TextChunk("ink>hm"),
        TextChunk("m</thi"),
        TextChunk("nk>", (call,)),
    ]
    assert [splitter.split(chunk) for chunk in chunks] == [
        TextChunk("", (), "r"),
        None,
        TextChunk("", (), "hm"),
        TextChunk("", (), "m"),
        TextChunk("", (call,)),
    ]
    assert splitter.rest() is None
    cut = ThinkTagSplitter()
    assert (cut.split(TextChunk("<th")), cut.rest()) == (None, TextChunk("<th"))


@pytest.mark.parametrize(
    ("pieces", "reasoning", "answer"),
    [
        pytest.param([*[" "] * 1000, "<think>hm</think>ok"], "hm", "ok", id="before-the-tag"),
        pytest.param(["<think>hm", *[" "] * 1000, "</think>ok"], "hm", "ok", id="before-close"),
        pytest.param(["<think>hm", *[" "] * 3, "so</think>"], "hm   so", "", id="inside"),
        pytest.param([*["\n"] * 1000, "Paris."], "", "\n" * 1000 + "Paris.", id="no-tag"),
    ],
)
def test_whitespace_in_many_pieces_splits_as_the_whole_does(
    pieces: list[str], reasoning: str, answer: str
) -> None:
    """Whitespace held piece by piece (before the open tag, or ending the reasoning so far)
    goes where the text after it says: dropped before a tag, kept inside the reasoning, the
    answer's when no tag comes."""
    assert _split_in_pieces(pieces) == (reasoning, answer)
