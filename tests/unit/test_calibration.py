"""TokenCalibration: learns reported ÷ estimated, conservatively."""

import pytest

from service.calibration import TokenCalibration, at_least_estimate


def feed(
    calibration: TokenCalibration, ratio: float, times: int, model: str = "m", tenant: str = "t"
) -> None:
    """Observe `times` answers to `tenant` whose reported prompt tokens are `ratio` times 1000."""
    for _ in range(times):
        reported = round(1000 * ratio)
        calibration.observe(model, tenant, estimated_tokens=1000, reported_tokens=reported)


def test_no_factor_before_enough_samples():
    """The factor stays 1.0 until min_samples answers were seen."""
    calibration = TokenCalibration(min_samples=3)
    feed(calibration, 0.7, 2)
    assert calibration.factor("m", "t") == 1.0
    feed(calibration, 0.7, 1)
    assert calibration.factor("m", "t") == pytest.approx(0.77)


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.8, 0.88), (0.1, 0.5), (1.2, 1.32), (10.0, 4.0)],
)
def test_factor_has_margin_floor_and_ceiling(ratio, expected):
    """The factor is the mean ratio plus a margin, clamped to [floor, ceiling]."""
    calibration = TokenCalibration(floor=0.5, ceiling=4.0, margin=0.1)
    feed(calibration, ratio, 5)
    assert calibration.factor("m", "t") == pytest.approx(expected)


def test_models_are_calibrated_separately():
    """What one model teaches does not change another's factor."""
    calibration = TokenCalibration()
    feed(calibration, 0.6, 5, model="a")
    assert calibration.factor("b", "t") == 1.0
    assert calibration.samples("a", "t") == 5


def test_tenants_are_calibrated_separately():
    """What one tenant's texts teach (emoji, counted far below the estimate) does not
    change how another tenant's prompts for the same model are fitted, nor does its
    refusal as too long."""
    calibration = TokenCalibration()
    feed(calibration, 0.3, 5, tenant="emoji")
    feed(calibration, 0.9, 5, tenant="prose")
    calibration.refused_as_too_long("m", "emoji", estimated_tokens=1000, room_tokens=500)
    assert calibration.factor("m", "emoji") == pytest.approx(1.0)
    assert calibration.factor("m", "prose") == pytest.approx(0.99)
    assert calibration.factor("m", "new") == 1.0
    assert calibration.samples("m", "prose") == 5


def test_short_prompts_are_ignored():
    """Prompts under min_estimated_tokens are mostly overhead and teach nothing."""
    calibration = TokenCalibration(min_estimated_tokens=32)
    for _ in range(10):
        calibration.observe("m", "t", estimated_tokens=9, reported_tokens=7)
    assert calibration.samples("m", "t") == 0


def test_mean_moves_towards_new_ratios():
    """A change in the upstream's counting is learned over time."""
    calibration = TokenCalibration(weight=0.5, margin=0.0, min_samples=1)
    feed(calibration, 0.6, 1)
    feed(calibration, 1.0, 10)
    assert calibration.factor("m", "t") == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("floor", [0.0, 1.5])
def test_floor_must_be_sane(floor):
    """A floor outside (0, 1] is refused."""
    with pytest.raises(ValueError, match="floor"):
        TokenCalibration(floor=floor)


def test_an_upstream_refusing_a_prompt_as_too_long_resets_a_low_factor():
    """A factor learned low goes back to 1.0 (learning down again from there); one
    learned high is left as it is, when the refused prompt says no more (its estimate
    already far over the room)."""
    calibration = TokenCalibration(margin=0.1)
    feed(calibration, 0.6, 5, model="low")
    feed(calibration, 1.5, 5, model="high")
    for model in ("low", "high"):
        calibration.refused_as_too_long(model, "t", estimated_tokens=1000, room_tokens=500)
    assert calibration.factor("low", "t") == pytest.approx(1.0)
    assert calibration.factor("high", "t") == pytest.approx(1.65)
    feed(calibration, 0.6, 1, model="low")
    assert calibration.factor("low", "t") < 1.0


@pytest.mark.parametrize("samples", [0, 1, 5])
def test_a_refused_prompt_is_over_its_room_with_the_factor_it_teaches(samples):
    """The upstream counted more than the room the prompt was fitted into: the factor
    rises past room / estimate at once (however few answers were seen), so the same
    prompt's calibrated estimate is over the room; answers learn it down again."""
    calibration = TokenCalibration(margin=0.1, min_samples=3)
    feed(calibration, 1.1, samples)
    calibration.refused_as_too_long("m", "t", estimated_tokens=800, room_tokens=1000)
    assert 800 * calibration.factor("m", "t") > 1000
    assert calibration.factor("m", "t") == pytest.approx(1001 / 800 * 1.1)
    feed(calibration, 1.0, 20)
    assert calibration.factor("m", "t") < 1.2


@pytest.mark.parametrize(
    ("counted", "factor"),
    [
        ((1600, 1000), 2.0 * 1.1),  # its own count, in a room as large: the ratio itself
        ((1600, 500), 4.0),  # a room half the gateway's: twice the ratio, at the ceiling
        ((1200, 400), 4.0),
        ((900, 1000), 1001 / 800 * 1.1),  # a count under the room says less than the bound
        ((1600, 0), 1001 / 800 * 1.1),  # no room at all: only the bound
    ],
)
def test_a_refusal_stating_its_count_teaches_the_ratio_itself(counted, factor):
    """A refusal that says the upstream's count and window raises the factor to the
    count's ratio to the estimate (scaled by how much smaller the upstream's room is), so
    the next fit is under that count at once, rather than only past the room."""
    calibration = TokenCalibration(margin=0.1, ceiling=4.0)
    calibration.refused_as_too_long(
        "m", "t", estimated_tokens=800, room_tokens=1000, counted=counted
    )
    assert calibration.factor("m", "t") == pytest.approx(factor)


def test_a_refusal_teaches_at_most_the_ceiling():
    """A prompt refused far under its room (a catalog window larger than the upstream's)
    moves the factor to its ceiling, no further, and only for its tenant."""
    calibration = TokenCalibration(ceiling=4.0, margin=0.1)
    calibration.refused_as_too_long("m", "t", estimated_tokens=100, room_tokens=100_000)
    assert calibration.factor("m", "t") == pytest.approx(4.0)
    assert calibration.factor("m", "other") == 1.0


def test_a_ratio_past_the_bounds_counts_as_at_them():
    """One absurd report (10⁹ tokens) moves the mean as a ratio at the ceiling would: the
    factor is back under it after the next honest answer, not hundreds later."""
    calibration = TokenCalibration(ceiling=4.0, margin=0.1, weight=0.1)
    feed(calibration, 1.0, 3)
    calibration.observe("m", "t", estimated_tokens=1000, reported_tokens=10**9)
    assert calibration.factor("m", "t") == pytest.approx(1.1 * (1.0 + 0.1 * (4.0 / 1.1 - 1.0)))
    feed(calibration, 1.0, 1)
    assert calibration.factor("m", "t") < 1.5


@pytest.mark.parametrize(
    ("ratio", "times", "billed"),
    [(1.3, 3, 1432), (1.3, 2, 1001), (0.6, 5, 1001), (0.95, 5, 1047), (10.0, 5, 4004)],
)
def test_a_prompt_is_billed_at_its_calibrated_estimate_never_below_the_plain_one(
    ratio, times, billed
):
    """Billed at the estimate times the factor, with its margin (none until enough
    answers), rounded up, never below the plain estimate; per tenant."""
    calibration = TokenCalibration()
    feed(calibration, ratio, times)
    assert calibration.billed_tokens("m", "t", estimated_tokens=1001) == billed
    assert calibration.billed_tokens("m", "other", estimated_tokens=1001) == 1001


@pytest.mark.parametrize(
    ("estimated", "factor", "expected"), [(0, 1.43, 0), (7, 1.43, 11), (7, 0.5, 7), (10, 1.0, 10)]
)
def test_at_least_estimate_rounds_up_and_never_goes_below_the_estimate(estimated, factor, expected):
    """`at_least_estimate` is the estimate times the factor, rounded up, or the estimate."""
    assert at_least_estimate(estimated, factor) == expected


def test_a_refusal_raises_the_fitting_factor_but_not_the_billed_estimate():
    """`refused_as_too_long` raises `factor` at once (prompts are fitted lower), while
    `billed_tokens` learns from reported counts alone: the refusal's bound may be a
    smaller window than the catalog's, which says nothing of what the upstream bills."""
    calibration = TokenCalibration()
    calibration.refused_as_too_long("m", "t", estimated_tokens=100, room_tokens=3000)
    assert calibration.factor("m", "t") == 4.0
    assert calibration.billed_tokens("m", "t", estimated_tokens=1001) == 1001
    feed(calibration, 1.3, 3)  # then three answers report 1.3 times the estimate
    assert calibration.billed_tokens("m", "t", estimated_tokens=1001) == 1432
