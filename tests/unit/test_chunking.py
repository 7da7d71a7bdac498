"""Splitting long documents into overlapping chunks at natural boundaries."""

# ruff: noqa: RUF001

import itertools
import random

import pytest

from service.summarize import fit_units, pack_units, split_into_chunks, split_units
from service.tokens import estimate_text_tokens
from service.validation import has_visible_text


def document(paragraphs: int, sentences: int = 5) -> str:
    """Numbered paragraphs of numbered sentences, easy to check for order and loss."""
    return "\n\n".join(
        " ".join(f"Paragraph p{p} sentence s{s} says something." for s in range(sentences))
        for p in range(paragraphs)
    )


def sentences_of(text: str) -> list[str]:
    """The sentences of `document`, in order."""
    return [s.strip() + "." for s in text.replace("\n\n", " ").split(".") if s.strip()]


@pytest.mark.parametrize(("max_tokens", "overlap"), [(60, 0), (80, 20), (200, 40), (100, 25)])
def test_chunks_fit_cover_and_overlap(max_tokens, overlap):
    """Each chunk fits; together they cover every sentence in order; neighbours overlap."""
    text = document(12)
    chunks = split_into_chunks(text, max_tokens=max_tokens, overlap_tokens=overlap)
    assert len(chunks) > 1
    for chunk in chunks:
        assert estimate_text_tokens(chunk) <= max_tokens
        assert chunk.endswith(".")  # cut at a sentence end, never mid-sentence
    seen: list[str] = []
    for chunk in chunks:
        for sentence in sentences_of(chunk):
            if sentence not in seen:
                seen.append(sentence)
    assert seen == sentences_of(text)
    for before, after in itertools.pairwise(chunks):
        first = sentences_of(after)[0]
        if overlap:
            assert first in sentences_of(before)  # the next chunk repeats the tail
            assert estimate_text_tokens(before[before.rindex(first) :]) <= overlap + 2
        else:
            assert first not in sentences_of(before)


def test_paragraphs_are_preferred_to_sentences():
    """Paragraphs that fit stay whole: every chunk boundary is a paragraph boundary."""
    text = document(10, sentences=2)
    paragraphs = text.split("\n\n")
    chunks = split_into_chunks(text, max_tokens=80, overlap_tokens=0)
    assert len(chunks) > 1
    for chunk in chunks:
        assert all(part in paragraphs for part in chunk.split("\n\n"))


def test_sentence_longer_than_a_chunk_is_split_between_words():
    """A sentence with no boundary inside is cut between words, losing none."""
    words = [f"w{i}" for i in range(300)]
    text = " ".join(words)
    chunks = split_into_chunks(text, max_tokens=50, overlap_tokens=0)
    assert len(chunks) > 1
    assert " ".join(chunks).split() == words


@pytest.mark.parametrize(
    "line",
    [
        "row {i}, alpha beta gamma, {i}7, delta epsilon",  # CSV, spaces after commas
        "    value_{i} = compute(alpha, beta_{i}) + other_thing",  # code
        "- the clause {i} without any punctuation at its end",  # a list
    ],
    ids=["csv", "code", "list"],
)
@pytest.mark.parametrize("overlap", [0, 20])
def test_lines_without_sentence_ends_are_split_at_line_breaks(line, overlap):
    """A paragraph with no sentence end is cut at line breaks, not between the words of
    a line: each chunk holds whole lines.

    Before, such a paragraph was one long sentence, cut between words mid-line."""
    lines = [line.format(i=i) for i in range(200)]
    text = "\n".join(lines)
    chunks = split_into_chunks(text, max_tokens=100, overlap_tokens=overlap)
    assert len(chunks) > 5
    stripped = [entry.strip() for entry in lines]
    for chunk in chunks:
        assert estimate_text_tokens(chunk) <= 100
        assert all(entry.strip() in stripped for entry in chunk.split("\n"))
    assert "\n".join(chunks).split("\n")[0] == stripped[0]
    assert chunks[-1].endswith(stripped[-1])


def test_a_line_longer_than_a_chunk_is_still_split_between_words():
    """Lines that fit stay whole; one too long for a chunk is cut between its words."""
    long_line = " ".join(f"w{i}" for i in range(300))
    text = "first short line\n" + long_line + "\nlast short line"
    chunks = split_into_chunks(text, max_tokens=50, overlap_tokens=0)
    assert chunks[0].startswith("first short line\n")
    assert chunks[-1].endswith("\nlast short line") or chunks[-1] == "last short line"
    assert " ".join(chunks).split() == text.split()


def test_cjk_without_spaces_is_split_at_full_stops():
    """Chinese sentences end at 。 with no space and are split there."""
    sentence = "网关为每个上游提供商维护一个连接池。"
    text = sentence * 30
    chunks = split_into_chunks(text, max_tokens=60, overlap_tokens=0)
    assert len(chunks) > 1
    assert all(chunk.endswith("。") for chunk in chunks)
    assert "".join(chunks) == text


@pytest.mark.parametrize(
    "sentence",
    [
        "यह एक लंबा हिंदी पाठ है जो विभाजन का परीक्षण करता है। ",  # Hindi: danda
        "هل هذا نص عربي طويل لاختبار التقسيم إلى أجزاء؟ ",  # Arabic question mark
        "یہ ایک طویل اردو متن ہے جو تقسیم کی جانچ کرتا ہے۔ ",  # Urdu full stop
        "Սա երկար հայերեն տեքստ է, որը ստուգում է բաժանումը։ ",  # Armenian full stop
        "ይህ ረጅም የአማርኛ ጽሑፍ ነው እና ሌላም ነገር አለ። ",  # Ethiopic full stop
    ],
    ids=["hindi", "arabic", "urdu", "armenian", "amharic"],
)
def test_sentences_ending_in_other_scripts_marks_are_split_at_them(sentence):
    """A paragraph of Hindi, Arabic, Urdu, Armenian or Amharic is cut at its sentences'
    own full stops, and chunks overlap by whole sentences, as the README promises.

    Before, only . ! ? … and the CJK marks ended a sentence: such a paragraph was one
    long sentence, cut between words mid-sentence."""
    text = sentence * 60
    mark = sentence.strip()[-1]
    chunks = split_into_chunks(text, max_tokens=120, overlap_tokens=40)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.endswith(mark)
        assert chunk.startswith(sentence.strip())


def test_units_rejoin_to_the_text():
    """Joining the units restores the document exactly."""
    text = document(3, sentences=40)
    units, ends_paragraph = split_units(text, 30)
    assert "".join(u for u, _ in units) == text
    assert all(t <= 30 for _, t in units)
    assert sum(ends_paragraph) == 3
    assert ends_paragraph[-1]


def test_pack_always_moves_forward():
    """Even with an overlap as big as a unit, every chunk starts after the previous."""
    ranges = pack_units([10] * 20, max_tokens=40, overlap_tokens=100)
    starts = [r.start for r in ranges]
    assert starts == sorted(set(starts))
    assert ranges[-1].stop == 20


def test_oversized_unit_gets_a_chunk_of_its_own():
    """A unit bigger than the limit is never dropped."""
    assert pack_units([5, 500, 5], max_tokens=100, overlap_tokens=0) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]


@pytest.mark.parametrize("character", ["\U0001f600", "\U0001d400", "\u10d0", "\u4e2d"])
def test_a_word_of_costly_characters_is_cut_into_pieces_that_fit(character):
    """A run without spaces of characters worth up to 4 tokens each is cut to fit, whole."""
    text = character * 3000
    chunks = split_into_chunks(text, max_tokens=500, overlap_tokens=64)
    assert all(estimate_text_tokens(chunk) <= 500 for chunk in chunks)
    assert "".join(chunks) == text


# Pieces random documents are made of: words, marks and whitespace of several scripts,
# sentence ends, line and paragraph breaks, rules, emoji with joiners, combining marks.
_PIECES = [
    "word ",
    "Gateway ",
    "mNkYPh",
    "x",
    "a ",
    "42",
    ", ",
    ". ",
    "! ",
    '." ',
    "? ",
    "\n",
    "\n\n",
    "\r\n",
    "\n  ",
    "  ",
    "\t",
    "=====",
    "----\n",
    "网关",
    "连接池。",
    "。",
    "\u3000",
    "слово ",
    "كلمة ",
    "\u0928\u092e\u0938\u094d\u0924\u0947। ",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U0001f600",
    "e\u0301",
    "\u00e9t\u00e9 ",
]


def random_document(rng: random.Random) -> str:
    """A document of up to about 3,000 characters, runs of one piece among them."""
    pieces = []
    for _ in range(rng.randint(1, 400)):
        piece = rng.choice(_PIECES)
        pieces.append(piece * (rng.randint(1, 40) if rng.random() < 0.1 else 1))
    return "".join(pieces)


@pytest.mark.parametrize("seed", range(300))
def test_random_documents_are_chunked_whole_in_order_and_within_the_limit(seed):
    """On random mixed-script documents: every chunk's estimate is within the limit; the
    units rejoin to the text; chunks follow each other over all the units, each after the
    one before, overlapping it by at most the overlap; and the chunks are those units."""
    rng = random.Random(seed)
    text = random_document(rng)
    max_tokens = rng.choice([8, 12, 16, 24, 32, 64, 100, 300])
    overlap = rng.choice([0, 4, 20, 64])
    chunks = split_into_chunks(text, max_tokens=max_tokens, overlap_tokens=overlap)
    assert all(estimate_text_tokens(chunk) <= max_tokens for chunk in chunks)

    units, ends_paragraph = split_units(text, max_tokens)
    joined = "".join(u for u, _ in units)
    assert joined == text[len(text) - len(joined) :]  # at most leading blanks dropped
    assert not text[: len(text) - len(joined)].strip()
    assert all(estimate_text_tokens(u) <= t <= max_tokens for u, t in units)
    if not units:  # blanks alone
        assert chunks == []
        return
    tokens = [t for _, t in units]
    ranges = pack_units(
        tokens, max_tokens=max_tokens, overlap_tokens=overlap, ends_paragraph=ends_paragraph
    )
    assert (ranges[0].start, ranges[-1].stop) == (0, len(units))
    for before, after in itertools.pairwise(ranges):
        assert before.start < after.start <= before.stop
        assert sum(tokens[after.start : before.stop]) <= min(overlap, max_tokens // 4)
    made = ["".join(u for u, _ in units[r.start : r.stop]).strip() for r in ranges]
    assert chunks == [chunk for chunk in made if has_visible_text(chunk)]


@pytest.mark.parametrize(
    "text",
    ["x\n" * 5000, "x\n\n" * 5000, "a " * 5000, "Hi. " * 5000, "x\n\n" * 2000 + "a " * 2000],
    ids=["char-per-line", "char-per-paragraph", "one-letter-words", "short-sentences", "mixed"],
)
def test_tiny_units_are_merged_into_units_of_16_characters_or_more(text):
    """Lines, paragraphs, words and sentences of a character or two are merged into units
    of 16 characters or more (but a few beside one too long for a chunk), of whole lines
    and words, so a document of a million is not a million estimates and steps of packing
    in Python.

    Before, each was a unit of its own: one character per line took seconds on 2 MiB."""
    units, _ = split_units(text, 500)
    assert "".join(u for u, _ in units) == text
    assert len(units) <= len(text) // 16 + 4
    assert all(u[-1].isspace() for u, _ in units[:-1])  # cut after whitespace only
    chunks = split_into_chunks(text, max_tokens=500, overlap_tokens=64)
    assert all(estimate_text_tokens(chunk) <= 500 for chunk in chunks)


def test_units_fitted_to_a_smaller_room_are_those_split_for_it():
    """`fit_units` splits again only the units over the smaller room, as `split_units`
    would have split them: Summarize packs a document of over 999 parts again for their
    longer header without chunking all of it a second time."""
    long_sentence = " ".join(f"w{i}" for i in range(60))
    sentence_of_80 = " ".join(["lengthy"] * 40) + "."  # a unit for 100, split for 40
    text = "\n\n".join([document(20), long_sentence, sentence_of_80, "line of code\n" * 30])
    units, ends = split_units(text, 100)
    fitted = fit_units(units, ends, 40)
    assert fitted != (units, ends)
    assert fitted == split_units(text, 40)
