"""Cost in USD from usage and the pricing catalog."""

from __future__ import annotations

from collections.abc import Mapping

from service.config import ModelConfig
from service.domain import Usage

_PER_MILLION = 1_000_000


def cost_usd(usage: Usage, price: ModelConfig | None) -> float:
    """What `usage` costs at `price`; cached input at the cached price when it has one.

    Unknown models cost 0: the catalog, not a guess, is the source of truth.
    """
    if price is None:
        return 0.0
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    cached_price = price.cached_input_usd_per_million
    if cached_price is None:
        cached_price, cached = price.input_usd_per_million, 0
    uncached = usage.input_tokens - cached
    total = (
        uncached * price.input_usd_per_million
        + cached * cached_price
        + usage.output_tokens * price.output_usd_per_million
    ) / _PER_MILLION
    # Round to a micro-dollar fraction so sums are stable across paths.
    return round(total, 12)


class PriceList:
    """The catalog of model prices and context windows."""

    def __init__(self, models: Mapping[str, ModelConfig]) -> None:
        self._models = dict(models)
        # The usage priced last, of which model, and its cost: with telemetry on, an
        # attempt's span prices its answer's usage, and the call then prices the same
        # `Usage` (immutable) again at once.
        self._last_usage: Usage | None = None
        self._last_model = ""
        self._last_cost = 0.0

    def price(self, model: str) -> ModelConfig | None:
        """The model's catalog entry, if any."""
        return self._models.get(model)

    def is_priced(self, model: str) -> bool:
        """Whether any use of `model` can cost something."""
        entry = self._models.get(model)
        return entry is not None and any(
            (
                entry.input_usd_per_million,
                entry.output_usd_per_million,
                entry.cached_input_usd_per_million,
            )
        )

    def cost_usd(self, model: str, usage: Usage) -> float:
        """What `usage` of `model` costs."""
        if usage is self._last_usage and model == self._last_model:
            return self._last_cost
        cost = cost_usd(usage, self._models.get(model))
        self._last_usage, self._last_model, self._last_cost = usage, model, cost
        return cost

    def context_window(self, model: str, default: int) -> int:
        """The model's context window, or `default` when the catalog has none."""
        entry = self._models.get(model)
        return entry.context_window if entry else default
