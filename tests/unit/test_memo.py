"""The bounded memo (service.memo): a size bound that forgets the least used entry first."""

from __future__ import annotations

import pytest

from service.memo import BoundedMemo


def test_putting_past_the_bound_forgets_the_oldest() -> None:
    """Three entries in a memo of two: the first one put is gone, the others stay."""
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    for index, key in enumerate("abc"):
        memo.put(key, index)
    assert (memo.get("a"), memo.get("b"), memo.get("c"), len(memo)) == (None, 1, 2, 2)


def test_putting_a_key_again_makes_it_the_newest() -> None:
    """A key put again outlives keys put between its two puts."""
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    memo.put("a", 3)
    memo.put("c", 4)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (3, None, 4)


def test_pop_forgets_and_returns_the_value() -> None:
    """`pop` returns what was there, then nothing; an absent key pops None."""
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.put("a", 1)
    assert (memo.pop("a"), memo.pop("a"), memo.get("a"), len(memo)) == (1, None, None, 0)


def test_a_size_below_one_is_refused() -> None:
    """A memo that could hold nothing is a mistake, not a silent no-op."""
    with pytest.raises(ValueError, match="at least 1"):
        BoundedMemo(0)


def test_getting_a_key_keeps_it_past_a_burst_of_new_keys() -> None:
    """A key got between puts outlives keys put after it was put but never got."""
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.put("hot", 1)
    memo.put("b", 2)
    assert memo.get("hot") == 1
    memo.put("c", 3)
    assert (memo.get("hot"), memo.get("b"), memo.get("c")) == (1, None, 3)
