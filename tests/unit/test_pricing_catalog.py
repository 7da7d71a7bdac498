"""Unit tests for cost from usage and the pricing catalog (service.pricing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ModelConfig, load_config
from service.domain import Usage
from service.pricing import PriceList, cost_usd

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


@pytest.fixture(scope="module")
def catalog() -> PriceList:
    """The pricing catalog of the shipped config file."""
    return PriceList(load_config(REPO_CONFIG, environ={}).models)


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        ("deepseek-v4", 0.14, 0.42),
        ("gpt-4", 30.00, 60.00),
        ("claude-sonnet-4.5", 3.00, 15.00),
        ("gemini-2.5-flash", 0.30, 2.50),
        ("gemma-3-270m", 0.0, 0.0),
    ],
)
def test_catalog_prices(
    catalog: PriceList, model: str, input_price: float, output_price: float
) -> None:
    """The shipped catalog lists each model at its published USD per million tokens."""
    price = catalog.price(model)
    assert price is not None
    assert (price.input_usd_per_million, price.output_usd_per_million) == (
        input_price,
        output_price,
    )
    assert price.cached_input_usd_per_million is None


# Expected costs worked out by hand: (input x input price + output x output price) / 1e6.
@pytest.mark.parametrize(
    ("model", "input_tokens", "output_tokens", "expected_usd"),
    [
        # 1234 x 0.14 = 172.76; 567 x 0.42 = 238.14; 410.90 / 1e6
        ("deepseek-v4", 1234, 567, 0.000410_90),
        # 10000 x 0.14 = 1400; 2000 x 0.42 = 840
        ("deepseek-v4", 10_000, 2_000, 0.002240),
        # a million of each: 0.14 + 0.42
        ("deepseek-v4", 1_000_000, 1_000_000, 0.56),
        ("deepseek-v4", 1, 0, 0.000000_14),
        ("deepseek-v4", 0, 1, 0.000000_42),
        # 1234 x 30 = 37020; 567 x 60 = 34020
        ("gpt-4", 1234, 567, 0.071040),
        # 10000 x 30 = 300000; 2000 x 60 = 120000
        ("gpt-4", 10_000, 2_000, 0.42),
        ("gpt-4", 1_000_000, 1_000_000, 90.00),
        # 1234 x 3 = 3702; 567 x 15 = 8505
        ("claude-sonnet-4.5", 1234, 567, 0.012207),
        # 10000 x 3 = 30000; 2000 x 15 = 30000
        ("claude-sonnet-4.5", 10_000, 2_000, 0.06),
        ("claude-sonnet-4.5", 1_000_000, 1_000_000, 18.00),
        # 1234 x 0.30 = 370.2; 567 x 2.50 = 1417.5
        ("gemini-2.5-flash", 1234, 567, 0.001787_7),
        # 10000 x 0.30 = 3000; 2000 x 2.50 = 5000
        ("gemini-2.5-flash", 10_000, 2_000, 0.008),
        ("gemini-2.5-flash", 1_000_000, 1_000_000, 2.80),
        ("gemma-3-270m", 1_000_000, 1_000_000, 0.0),
        ("deepseek-v4", 0, 0, 0.0),
    ],
)
def test_catalog_costs_to_the_micro_dollar(
    catalog: PriceList, model: str, input_tokens: int, output_tokens: int, expected_usd: float
) -> None:
    """A call's cost matches the hand-computed catalog price well below a micro-dollar."""
    cost = catalog.cost_usd(model, Usage(input_tokens=input_tokens, output_tokens=output_tokens))
    assert cost == pytest.approx(expected_usd, rel=0, abs=1e-12)
    assert round(cost * 1e6) == round(expected_usd * 1e6)


def test_estimated_usage_costs_the_same(catalog: PriceList) -> None:
    """Estimated usage is priced like reported usage."""
    reported = Usage(input_tokens=1234, output_tokens=567)
    estimated = Usage(input_tokens=1234, output_tokens=567, is_estimated=True)
    assert catalog.cost_usd("gpt-4", estimated) == catalog.cost_usd("gpt-4", reported)


@pytest.mark.parametrize("model", ["unknown-model", "", "GPT-4", "gpt-4 "])
def test_unknown_model_costs_zero(catalog: PriceList, model: str) -> None:
    """A model outside the catalog costs 0 rather than a guessed price."""
    assert catalog.price(model) is None
    assert catalog.cost_usd(model, Usage(input_tokens=10_000, output_tokens=10_000)) == 0.0


def test_cost_without_price_is_zero() -> None:
    """`cost_usd` with no catalog entry is 0."""
    assert cost_usd(Usage(input_tokens=5, output_tokens=5), None) == 0.0


CACHED = ModelConfig(
    context_window=128_000,
    input_usd_per_million=0.14,
    output_usd_per_million=0.42,
    cached_input_usd_per_million=0.014,
)


@pytest.mark.parametrize(
    ("usage", "expected_usd"),
    [
        # 200 x 0.14 = 28; 800 x 0.014 = 11.2; 100 x 0.42 = 42; 81.2 / 1e6
        pytest.param(Usage(1000, 100, cached_input_tokens=800), 0.000081_2, id="mostly-cached"),
        # 1000 x 0.014 = 14; 0 output
        pytest.param(Usage(1000, 0, cached_input_tokens=1000), 0.000014, id="all-cached"),
        # 1000 x 0.14 = 140; 100 x 0.42 = 42
        pytest.param(Usage(1000, 100, cached_input_tokens=0), 0.000182, id="none-cached"),
        # cached is capped at input: 1000 x 0.014 = 14
        pytest.param(Usage(1000, 0, cached_input_tokens=5000), 0.000014, id="cached-over-input"),
    ],
)
def test_cached_input_price(usage: Usage, expected_usd: float) -> None:
    """Cached input tokens are billed at the cached price, the rest at the input price."""
    assert cost_usd(usage, CACHED) == pytest.approx(expected_usd, rel=0, abs=1e-12)


def test_cached_tokens_at_full_price_without_cached_price(catalog: PriceList) -> None:
    """Without a cached price, cached tokens are billed as ordinary input."""
    usage = Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=800)
    # 1000 x 0.14 = 140; 100 x 0.42 = 42
    assert catalog.cost_usd("deepseek-v4", usage) == pytest.approx(0.000182, rel=0, abs=1e-12)


def test_free_cached_price() -> None:
    """A cached price of 0 makes cached tokens free, unlike an unset one."""
    free = ModelConfig(
        context_window=1024,
        input_usd_per_million=1.0,
        output_usd_per_million=0.0,
        cached_input_usd_per_million=0.0,
    )
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=600_000)
    assert cost_usd(usage, free) == pytest.approx(0.40, rel=0, abs=1e-12)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("deepseek-v4", 128_000),
        ("claude-sonnet-4.5", 200_000),
        ("gemini-2.5-flash", 1_000_000),
        ("gemma-3-270m", 2048),
        ("unknown-model", 4096),
    ],
)
def test_context_window(catalog: PriceList, model: str, expected: int) -> None:
    """The context window comes from the catalog, or the default for unknown models."""
    assert catalog.context_window(model, 4096) == expected
