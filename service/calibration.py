"""Per-tenant, per-model calibration of the token estimator from the usage upstreams report.

`service.tokens` over-counts on purpose. Every answer that reports its prompt tokens
tells us by how much for that model: the ratio of reported to estimated prompt tokens.
`TokenCalibration` keeps an exponentially weighted mean of that ratio per tenant and
model and hands `fit_messages` a factor that stays on the safe side of it. Per tenant,
since the ratio depends on the text (emoji, CJK and code count far below the estimate,
plain-ASCII Swahili above it): one tenant's traffic must not move how another's prompts
are fitted, truncated or refused.

- no factor until `min_samples` prompts of at least `min_estimated_tokens` were seen
  (short prompts are mostly chat-template overhead and say little about the text);
- a `margin` on top of the mean, because single prompts vary around it;
- never below `floor`, so a misreporting upstream (one that says 7 tokens whatever the
  prompt) cannot talk the gateway into sending prompts far over the window;
- never above `ceiling`: an estimate that is too low is corrected, within reason;
- each ratio is held to what the factor can follow (floor and ceiling less the margin)
  before it joins the mean: one absurd report (10⁹ tokens) would otherwise keep the
  mean, and the factor at its ceiling, far up for hundreds of answers;
- an upstream refusing a prompt as over the window says its own count was over the room
  the gateway fitted it in (`refused_as_too_long`): a lower bound of the ratio, which the
  mean is raised to at once, so the same prompt is truncated or refused before it is sent
  again, rather than sent, and refused, on every call.

Example:
    calibration = TokenCalibration()
    calibration.observe("deepseek-v4", "team-a", estimated_tokens=1200, reported_tokens=800)
    factor = calibration.factor("deepseek-v4", "team-a")  # 1.0 until enough samples
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def at_least_estimate(estimated_tokens: int, factor: float) -> int:
    """The prompt tokens a call is billed or budgeted at when no upstream count is known:
    `estimated_tokens` times `factor` (rounded up, as the window check counts it), never
    fewer than `estimated_tokens`: a factor below 1 says the upstream counts the tenant's
    text lower, but this prompt may be one the estimator counts low (errs high)."""
    return max(estimated_tokens, math.ceil(estimated_tokens * factor))


@dataclass(slots=True)
class _Ratio:
    mean: float
    samples: int
    is_refused: bool = False  # an upstream refused a prompt as too long: the mean counts now
    # The mean of reported ratios alone (`observe`'s), for billing: a refusal's bound says
    # the upstream's window is smaller, perhaps, not that it counts the text higher.
    reported: float = 0.0


class TokenCalibration:
    """Learns, per tenant and model, reported prompt tokens ÷ estimated prompt tokens."""

    def __init__(
        self,
        *,
        floor: float = 0.5,
        ceiling: float = 4.0,
        margin: float = 0.1,
        weight: float = 0.1,
        min_samples: int = 3,
        min_estimated_tokens: int = 32,
    ) -> None:
        if not 0 < floor <= 1 <= ceiling:
            raise ValueError("need 0 < floor <= 1 <= ceiling")
        if not 0 < weight <= 1:
            raise ValueError("weight must be in (0, 1]")
        self.floor = floor
        self.ceiling = ceiling
        self.margin = margin
        self.weight = weight
        self.min_samples = min_samples
        self.min_estimated_tokens = min_estimated_tokens
        # The ratios whose factor is the floor and the ceiling: past them a ratio moves
        # the factor no further, only how long the mean takes to come back.
        self._lowest = floor / (1 + margin)
        self._highest = ceiling / (1 + margin)
        # By (tenant, model): tenants are the configured or keyed ones, models the
        # configured ones (only answered calls are observed), so it stays small.
        self._ratios: dict[tuple[str, str], _Ratio] = {}

    def observe(
        self, model: str, tenant: str, *, estimated_tokens: int, reported_tokens: int
    ) -> None:
        """Learn from one answer to `tenant` whose upstream reported its prompt tokens."""
        if estimated_tokens < self.min_estimated_tokens or reported_tokens <= 0:
            return
        ratio = min(max(reported_tokens / estimated_tokens, self._lowest), self._highest)
        known = self._ratios.get((tenant, model))
        if known is None:
            self._ratios[tenant, model] = _Ratio(ratio, 1, reported=ratio)
            return
        known.mean += self.weight * (ratio - known.mean)
        # The first report after a refusal (which made the entry) starts its own mean.
        known.reported += self.weight * (ratio - known.reported) if known.samples else ratio
        known.samples += 1

    def refused_as_too_long(
        self,
        model: str,
        tenant: str,
        *,
        estimated_tokens: int,
        room_tokens: int,
        counted: tuple[int, int] | None = None,
    ) -> bool:
        """An upstream refused as over `model`'s window a prompt of `tenant` that the
        gateway fitted into `room_tokens` (the window less the answer's reserve) with its
        factor; `estimated_tokens` is its plain estimate; `counted`, where the refusal says
        them: the upstream's count of the prompt and its own room (its window less the
        answer's reserve, or its limit on the prompt alone).

        The upstream counted more than `room_tokens`, so this prompt's ratio is above
        `room_tokens / estimated_tokens`: the mean is raised to that bound (held to the
        factor's bounds like any ratio) at once, without waiting for `min_samples`, and the
        margin puts the same prompt over the room. The mean is also raised to at least the
        estimator's own 1: it is over the tenant's traffic as a whole, and texts the
        estimator counts low (plain-ASCII languages, rare letters) can then run over.
        Answers reporting their prompt tokens learn it down again from there.

        With `counted`, the ratio itself is known, not only a bound: the mean is raised to
        it, scaled by how much smaller the upstream's room is than the gateway's, so that
        the next fit is under the upstream's own count at once. The bound alone took a
        refusal for each step (four, for a conversation 1.6 times over the window): it
        moves the mean only as far as the room, however far over the prompt was.

        Returns:
            False when `counted` says a ratio past what the factor can follow (its
            ceiling): the same prompt fitted again is still over the upstream's count, as
            a window far smaller than the catalog's makes it. Else True.
        """
        at_least = 1 / (1 + self.margin)
        is_followed = True
        if estimated_tokens > 0:
            ratio = (room_tokens + 1) / estimated_tokens
            if counted is not None and counted[1] > 0:
                prompt_tokens, upstream_room_tokens = counted
                scale = max(1.0, room_tokens / upstream_room_tokens)
                ratio = max(ratio, prompt_tokens / estimated_tokens * scale)
                is_followed = ratio <= self._highest
            at_least = max(at_least, min(ratio, self._highest))
        known = self._ratios.setdefault((tenant, model), _Ratio(at_least, 0))
        known.mean = max(known.mean, at_least)
        known.is_refused = True
        return is_followed

    def factor(self, model: str, tenant: str) -> float:
        """What to multiply `tenant`'s estimates for `model` by (1.0 until enough is known)."""
        known = self._ratios.get((tenant, model))
        if known is None or (known.samples < self.min_samples and not known.is_refused):
            return 1.0
        return min(self.ceiling, max(self.floor, known.mean * (1 + self.margin)))

    def billed_tokens(self, model: str, tenant: str, *, estimated_tokens: int) -> int:
        """`at_least_estimate` of a prompt of `tenant` for `model`, with the factor its
        reported prompt counts alone teach (as `factor`, once `min_samples` reported):
        a refusal as too long raises `factor` to fit prompts into a window that may be
        smaller than the catalog's, which says nothing of what the upstream bills."""
        known = self._ratios.get((tenant, model))
        if known is None or known.samples < self.min_samples:
            return estimated_tokens
        factor = min(self.ceiling, max(self.floor, known.reported * (1 + self.margin)))
        return at_least_estimate(estimated_tokens, factor)

    def samples(self, model: str, tenant: str) -> int:
        """How many answers calibrated `model` for `tenant` so far."""
        known = self._ratios.get((tenant, model))
        return 0 if known is None else known.samples


__all__ = ["TokenCalibration", "at_least_estimate"]
