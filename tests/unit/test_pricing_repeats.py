"""An answer's usage priced twice in a row (its attempt span's cost, then its call's) is
computed once, and a price is never taken for another model's or another usage's."""

from __future__ import annotations

import pytest

from service import pricing
from service.config import ModelConfig
from service.domain import Usage
from service.pricing import PriceList

PRICES = PriceList(
    {
        "cheap": ModelConfig(
            context_window=32768, input_usd_per_million=0.14, output_usd_per_million=0.42
        ),
        "dear": ModelConfig(
            context_window=32768, input_usd_per_million=30.0, output_usd_per_million=60.0
        ),
    }
)


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[Usage]:
    """The usages `pricing.cost_usd` computes a cost for, in order."""
    seen: list[Usage] = []
    compute = pricing.cost_usd

    def counting(usage: Usage, price: ModelConfig | None) -> float:
        seen.append(usage)
        return compute(usage, price)

    monkeypatch.setattr(pricing, "cost_usd", counting)
    return seen


def test_the_same_usage_of_the_same_model_is_computed_once(computed: list[Usage]):
    """The span's price and the call's, of one answer's `Usage`, cost one computation."""
    usage = Usage(input_tokens=1000, output_tokens=500)
    first = PRICES.cost_usd("cheap", usage)
    assert PRICES.cost_usd("cheap", usage) == first == pytest.approx(0.00035)
    assert computed == [usage]


def test_another_model_or_another_usage_is_priced_afresh(computed: list[Usage]):
    """The usage priced last is remembered by identity and model only: an equal usage
    that is another object, or the same of another model, is computed again."""
    usage = Usage(input_tokens=1000, output_tokens=500)
    assert PRICES.cost_usd("cheap", usage) == pytest.approx(0.00035)
    assert PRICES.cost_usd("dear", usage) == pytest.approx(0.06)
    assert PRICES.cost_usd("cheap", usage) == pytest.approx(0.00035)
    assert PRICES.cost_usd("unknown", usage) == 0.0
    other = Usage(input_tokens=2000, output_tokens=0)
    assert PRICES.cost_usd("unknown", other) == 0.0
    assert PRICES.cost_usd("dear", other) == pytest.approx(0.06)
    assert len(computed) == 6
