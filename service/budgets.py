"""Budgets: a tenant's USD limit per UTC day or month, checked before any upstream call.

A call is refused when what the tenant has spent this period, plus what its calls still
in flight have reserved, plus this call's expected cost would pass the limit. The
expected cost is the prompt estimate (the estimator errs high), raised by the tenant's
calibration for the model where it says the upstream counts more, priced as input plus,
when the request sets `max_tokens`, that many tokens priced as output (no more than the
model's window holds, `Budgets.expected_cost_usd`); without it the
budget's `reserve_output_tokens` (0 by default: the prompt only, since the output's
length is unknown), at most what the model's window leaves beside the prompt. A call
that passes holds
its expected cost in the ledger until its usage is recorded, or until it fails or is
cancelled. The check and the reservation are one atomic step, in the process and, with
a Redis ledger, across replicas, so concurrent calls never pass on the same figure. Its
cost is spent in the period it was reserved in, even when it ends in the next one.

The guarantee: calls that set `max_tokens` never take a tenant past its limit together
(as long as the upstream bills no more prompt tokens than so estimated); each call without
it that is in flight when the limit is reached may overrun it by at most its own output
beyond `reserve_output_tokens`. A reservation is renewed while its call runs; one its
replica never released (it died mid-call) lapses within `ledger.RESERVATION_TTL_S`, a
minute. The `"*"` entry applies to every tenant without its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from service.config import ANY_TENANT, BudgetConfig
from service.domain import ChatRequest, Usage
from service.errors import BudgetExceeded
from service.ledger import PICO, Ledger, Reservation, WallClock, period_key_end_s
from service.pricing import PriceList

_ADJECTIVE = {"day": "daily", "month": "monthly"}
# The retry a call refused only for what the tenant's calls in flight hold is told to
# wait: most calls end within seconds, and a retry then sees what they spent.
CALLS_IN_FLIGHT_RETRY_S = 1.0


class HeldByCallsInFlight(BudgetExceeded):
    """A budget refusal only for what the tenant's calls in flight hold: it passes once
    they end (most often spending less), not at the period's reset.

    `releases_seen`: the count of this process's releases as its check began, for
    `Budgets.released`.
    """

    def __init__(
        self, message: str, *, subject: str, retry_after_s: float, releases_seen: int
    ) -> None:
        super().__init__(message, subject=subject, retry_after_s=retry_after_s)
        self.releases_seen = releases_seen


@dataclass(slots=True)
class _ReleaseWait:
    """Calls of one tenant waiting for one of its reservations to be released."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0


def _never_fits(tenant: str, cost_usd: float, budget: BudgetConfig) -> BudgetExceeded:
    """The refusal of a call expected to cost more than the tenant's whole budget."""
    refusal = BudgetExceeded(
        f"a call expected to cost ${cost_usd:.6f} (its prompt, and its max_tokens or the "
        f"budget's reserve_output_tokens) can never fit tenant {tenant!r}'s "
        f"${budget.usd:.6f} {_ADJECTIVE[budget.period]} budget",
        subject=f"tenant:{tenant}",
        retry_after_s=None,
    )
    # Pushback -1 and no RetryInfo: the next period's budget would refuse it again.
    refusal.is_retry_futile = True
    return refusal


class Budgets:
    """Refuses calls that would take a tenant past its budget; reserves the others."""

    def __init__(
        self,
        budgets: Mapping[str, BudgetConfig],
        *,
        ledger: Ledger,
        prices: PriceList,
        wall_clock: WallClock,
    ) -> None:
        self._budgets = dict(budgets)
        # Whether any tenant has a budget: without one, no call reserves anything.
        self.has_any = bool(self._budgets)
        self._ledger = ledger
        self._prices = prices
        self._now = wall_clock
        # Reservations this process released, and per tenant (one int each) the count at
        # its last one: a call refused for what its tenant's calls in flight hold tries
        # again when one of them is released (`released`), during its check included.
        self._releases = 0
        self._last_release: dict[str, int] = {}
        self._release_waits: dict[str, _ReleaseWait] = {}

    def budget_of(self, tenant: str) -> BudgetConfig | None:
        """The budget that applies to `tenant`, if any."""
        return self._budgets.get(tenant) or self._budgets.get(ANY_TENANT)

    def expected_cost_usd(
        self, request: ChatRequest, *, prompt_tokens: int, reserve_output_tokens: int = 0
    ) -> float:
        """The most the call can cost: prompt as input, plus `max_tokens` as output if
        set (`_capped_cost_usd`: no more than the model's context window holds), else
        `reserve_output_tokens`, at most what the window leaves beside the prompt."""
        max_tokens = request.params.max_tokens
        if max_tokens is None:
            # No answer outgrows the room its prompt leaves in the model's window: a larger
            # reserve refused calls that fit (a model the catalog lacks: the reserve).
            window = self._prices.context_window(
                request.model, prompt_tokens + reserve_output_tokens
            )
            max_tokens = min(reserve_output_tokens, max(0, window - prompt_tokens))
        else:
            window = self._prices.context_window(request.model, prompt_tokens + max_tokens)
            if prompt_tokens + max_tokens > window:
                return self._capped_cost_usd(request.model, prompt_tokens, max_tokens, window)
        usage = Usage(input_tokens=prompt_tokens, output_tokens=max_tokens, is_estimated=True)
        return self._prices.cost_usd(request.model, usage)

    def _capped_cost_usd(
        self, model: str, prompt_tokens: int, max_tokens: int, window: int
    ) -> float:
        """The most a call whose prompt and `max_tokens` pass the model's window can cost:
        prompt and answer share the window, so it is billed no more than the window holds.
        The dearer of two bills: the prompt as estimated and the room it leaves as output
        (as an estimated charge caps it), or `max_tokens` of output beside the prompt the
        window then leaves. The second is reachable: such a call was fitted to the window
        with its tenant's calibration below 1 (the upstream counts its text lower than the
        estimate), so the upstream counts a shorter prompt, leaving `max_tokens` room, and
        output is most often the dearer token; capped at the first alone, the guarantee
        that calls with `max_tokens` never pass the budget would not hold."""
        room = max(0, window - prompt_tokens)
        as_estimated = Usage(input_tokens=prompt_tokens, output_tokens=room, is_estimated=True)
        longest_answer = Usage(
            input_tokens=max(0, window - max_tokens),
            output_tokens=min(max_tokens, window),
            is_estimated=True,
        )
        return max(
            self._prices.cost_usd(model, as_estimated),
            self._prices.cost_usd(model, longest_answer),
        )

    async def reserve(self, request: ChatRequest, *, prompt_tokens: int) -> Reservation | None:
        """Reserve the call's expected cost, or raise `QuotaExceeded` (retry when the period
        resets; never, for a call over the whole budget) if it would overrun; None when no
        budget applies.

        `prompt_tokens`: the tokens its prompt is reserved at (its estimate, raised by
        its tenant's calibration: `BudgetHold.reserving`). A call to a model that costs
        nothing (no price, or every price 0) is never refused: None.
        """
        budget = self.budget_of(request.tenant)
        if budget is None:
            return None
        cost_usd = self.expected_cost_usd(
            request, prompt_tokens=prompt_tokens, reserve_output_tokens=budget.reserve_output_tokens
        )
        if not cost_usd and not self._prices.is_priced(request.model):
            # A model without a price: no budget counts it, spent or not. A priced one
            # expected to cost nothing (free input, no output reserved) still bills its
            # answer, so it is refused once the budget is spent.
            return None
        releases_seen = self._releases
        reservation = await self._ledger.reserve(
            request.tenant, budget.period, cost_usd=cost_usd, limit_usd=budget.usd
        )
        if reservation.is_granted:
            return reservation
        if not reservation.fits_an_unspent_period(budget.usd):
            raise _never_fits(request.tenant, cost_usd, budget)
        spent, reserved = reservation.spent_pico / PICO, reservation.reserved_pico / PICO
        held = f" and reserved ${reserved:.6f} for calls in flight" if reserved else ""
        message = (
            f"tenant {request.tenant!r} has spent ${spent:.6f}{held} of its "
            f"${budget.usd:.6f} {_ADJECTIVE[budget.period]} budget; this call is expected "
            f"to cost ${cost_usd:.6f}"
        )
        subject = f"tenant:{request.tenant}"
        if reservation.fits_without_calls_in_flight(budget.usd):
            # Refused only for what calls in flight hold: released as they end (or turned
            # into what they spent, most often less), seconds from now, not at the reset.
            raise HeldByCallsInFlight(
                message,
                subject=subject,
                retry_after_s=CALLS_IN_FLIGHT_RETRY_S,
                releases_seen=releases_seen,
            )
        # The end of the period the ledger refused in: past midnight by now, the new
        # day's budget may already have room.
        retry_after_s = max(0.0, period_key_end_s(reservation.period_key) - self._now())
        raise BudgetExceeded(message, subject=subject, retry_after_s=retry_after_s)

    async def release(self, reservation: Reservation) -> None:
        """Stop holding a reservation (its call's usage is recorded, or it never ran), and
        wake the calls of its tenant waiting for one (`released`)."""
        await self._ledger.release(reservation)
        # No call here unless one waits: every call with a budget ends through this.
        self._releases += 1
        self._last_release[reservation.tenant] = self._releases
        if self._release_waits:
            self._wake(reservation.tenant)

    def _wake(self, tenant: str) -> None:
        wait = self._release_waits.pop(tenant, None)
        if wait is not None:
            wait.event.set()

    async def released(self, tenant: str, *, since: int) -> None:
        """Return once this process releases a reservation of `tenant`, at once if it
        did after the check that refused a call (`HeldByCallsInFlight.releases_seen` is
        `since`). Releases by other replicas are not seen: the caller bounds the wait.
        """
        if self._last_release.get(tenant, 0) > since:
            return
        wait = self._release_waits.get(tenant)
        if wait is None:
            wait = self._release_waits[tenant] = _ReleaseWait()
        wait.waiters += 1
        try:
            await wait.event.wait()
        finally:
            wait.waiters -= 1
            if not wait.waiters and self._release_waits.get(tenant) is wait:
                del self._release_waits[tenant]  # all gave up (timed out, cancelled)

    def holding(self) -> BudgetHold:
        """A hold for one caller's call (`async with`), released on leaving: after its
        usage is recorded."""
        return BudgetHold(self)


class BudgetHold:
    """The reservation of one caller's call, kept until the caller has recorded its usage.

    The upstream part of the call runs inside `reserving()`. If that part fails or is
    cancelled its reservation is released at once; if it succeeds the reservation is
    kept until the caller leaves `Budgets.holding()`, after recording the usage, so the
    call's cost is never counted in neither spent nor reserved. An upstream part that
    succeeds after its caller left (a shared cache flight that other callers still
    follow) releases its own reservation.
    """

    # Attributes, not properties, and `close` written out in `__aexit__`: every cache
    # miss reads them, a Python call each.
    __slots__ = ("_budgets", "_kept", "admitted_s", "caller_has_left")

    def __init__(self, budgets: Budgets) -> None:
        self._budgets = budgets
        self._kept: list[Reservation] = []
        # Whether the caller has left (`close`d), with its upstream part maybe still running.
        self.caller_has_left = False
        # When the budget admitted the call (None: nothing reserved): its usage is recorded
        # with it (`UsageEntry.admitted_s`), so that its cost is spent in the period it was
        # reserved in.
        self.admitted_s: float | None = None

    # A class, not a generator context manager: every call, cache hits too, enters one.
    async def __aenter__(self) -> BudgetHold:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.caller_has_left = True
        if self._kept:
            await self._release_kept()

    def reserving(
        self, request: ChatRequest, *, prompt_tokens: int
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Reserve before the body (or raise `QuotaExceeded`); hand over or release after.

        `prompt_tokens`: the prompt's estimate as its tenant's calibration bills it when
        the upstream reports no count (`TokenCalibration.billed_tokens`).
        """
        if not self._budgets.has_any:
            return _NOTHING_TO_RESERVE
        return _Reserving(self, request, prompt_tokens)

    async def _reserve(self, request: ChatRequest, prompt_tokens: int) -> Reservation | None:
        reservation = await self._budgets.reserve(request, prompt_tokens=prompt_tokens)
        if reservation is not None:
            self.admitted_s = reservation.at_s
        return reservation

    async def _settle(self, reservation: Reservation, *, has_failed: bool) -> None:
        """After the body: release a failed call's reservation, or one whose caller left;
        else keep it until the caller leaves."""
        if has_failed or self.caller_has_left:
            await self._budgets.release(reservation)
        else:
            self._kept.append(reservation)

    async def close(self) -> None:
        """Release what was kept; anything reserved from now on releases itself."""
        self.caller_has_left = True
        if self._kept:
            await self._release_kept()

    async def _release_kept(self) -> None:
        """Shielded from the caller's cancellation: a reservation left unreleased would be
        renewed for as long as the replica runs (`LeaseRenewals`), not lapse."""
        kept, self._kept = self._kept, []
        await asyncio.shield(self._release_all(kept))

    async def _release_all(self, kept: list[Reservation]) -> None:
        for reservation in kept:
            await self._budgets.release(reservation)


_NOTHING_TO_RESERVE: contextlib.nullcontext[None] = contextlib.nullcontext()


class _Reserving:
    """`BudgetHold.reserving`'s block. A class, not a generator context manager: every
    cache miss enters one, and an async generator costs its machinery on each."""

    __slots__ = ("_hold", "_prompt_tokens", "_request", "_reservation")

    def __init__(self, hold: BudgetHold, request: ChatRequest, prompt_tokens: int) -> None:
        self._hold = hold
        self._request = request
        self._prompt_tokens = prompt_tokens
        self._reservation: Reservation | None = None

    async def __aenter__(self) -> None:
        self._reservation = await self._hold._reserve(self._request, self._prompt_tokens)

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._reservation is not None:
            await self._hold._settle(self._reservation, has_failed=exc_type is not None)
