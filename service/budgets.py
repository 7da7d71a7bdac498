"""Budgets: a tenant's USD limit per UTC day or month, checked before any upstream call.

A call is refused when what the tenant has spent this period plus what the call's
prompt alone will cost would pass the limit; the completion's price is unknown until
it is generated, so the last call of a period may overrun by at most its output. The
`"*"` entry applies to every tenant without its own.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.config import BudgetConfig
from service.domain import ChatRequest, Usage
from service.errors import QuotaExceeded
from service.ledger import Ledger, WallClock, period_end_s
from service.pricing import PriceList

ANY_TENANT = "*"
_ADJECTIVE = {"day": "daily", "month": "monthly"}


class Budgets:
    """Refuses calls that would take a tenant past its budget."""

    def __init__(
        self,
        budgets: Mapping[str, BudgetConfig],
        *,
        ledger: Ledger,
        prices: PriceList,
        wall_clock: WallClock,
    ) -> None:
        self._budgets = dict(budgets)
        self._ledger = ledger
        self._prices = prices
        self._now = wall_clock

    def budget_of(self, tenant: str) -> BudgetConfig | None:
        """The budget that applies to `tenant`, if any."""
        return self._budgets.get(tenant) or self._budgets.get(ANY_TENANT)

    async def check(self, request: ChatRequest, *, prompt_tokens: int) -> None:
        """Raise `QuotaExceeded` (retry when the period resets) if the call would overrun.

        `prompt_tokens`: the request's prompt estimate (the estimator errs high), priced
        as the input part of what the call will cost.
        """
        budget = self.budget_of(request.tenant)
        if budget is None:
            return
        spent = await self._ledger.spent_usd(request.tenant, budget.period)
        prompt = Usage(input_tokens=prompt_tokens, is_estimated=True)
        expected = self._prices.cost_usd(request.model, prompt)
        if spent < budget.usd and spent + expected <= budget.usd:
            return
        now = self._now()
        raise QuotaExceeded(
            f"tenant {request.tenant!r} has spent ${spent:.6f} of its ${budget.usd:.6f} "
            f"{_ADJECTIVE[budget.period]} budget",
            subject=f"tenant:{request.tenant}",
            retry_after_s=max(0.0, period_end_s(budget.period, now) - now),
        )
