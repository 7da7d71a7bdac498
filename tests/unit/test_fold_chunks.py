"""Pieces held till a stream's end are folded in runs: each fold joins only what came
since the last one, so a stream of millions of one-character pieces costs its length,
not its square (each fold copying the whole output so far)."""

from service.domain import FOLDED_EVERY, ToolCallDelta
from service.upstream.types import TextChunk, fold_chunks, joined_chunks


def test_a_fold_joins_only_the_chunks_since_the_last_one() -> None:
    held: list[TextChunk] = []
    folds = []
    for at in range(3 * FOLDED_EVERY):
        held.append(TextChunk(str(at % 10)))
        if (at + 1) % FOLDED_EVERY == 0:
            fold_chunks(held, FOLDED_EVERY)
            folds.append(held[-1])

    assert len(held) == 3
    # What an earlier fold made is kept as it is, not copied into the next one.
    assert all(kept is made for kept, made in zip(held, folds, strict=True))
    assert joined_chunks(held).content == "".join(str(at % 10) for at in range(3 * FOLDED_EVERY))


def test_a_fold_keeps_the_chunks_before_it_and_merges_tool_call_pieces() -> None:
    before = TextChunk("first")
    held = [before] + [
        TextChunk("", (ToolCallDelta(0, "call_1" if at == 0 else "", "f" if at == 0 else "", "x"),))
        for at in range(4)
    ]

    fold_chunks(held, 4)

    assert held[0] is before
    assert held[1].tool_calls == (ToolCallDelta(0, "call_1", "f", "xxxx"),)
