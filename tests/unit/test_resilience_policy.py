"""Pure resilience policy: retryability, backoff, retry budget, breaker and limiter."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from service.breaker import BreakerSettings, BreakerState, CircuitBreaker, FailureScope
from service.errors import (
    Overloaded,
    ShuttingDown,
    StreamInterrupted,
    UpstreamAuthRejected,
    UpstreamLacksModel,
    UpstreamNotOpenAI,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.limits import LimitExceeded, TokenBucket, UpstreamLimiter
from service.pool_hooks import PoolCounters, PoolHooks
from service.retry import (
    BackoffPolicy,
    RetryBudget,
    backoff_s,
    counts_against_health,
    failure_scope,
    is_failover_only,
    is_retryable,
)
from service.rpc_boundary import Admission
from service.shared_limits import SharedRate, SharedUpstreamLimiter
from service.store_cooldown import StoreCooldown
from service.upstream.types import RateLimitHints
from tests.fake_clock import FakeClock, SteppedClock


def _status_error(status: int) -> Exception:
    if status == 429:
        return UpstreamRateLimited("x", upstream="u", status=429)
    if status in (401, 403):
        return UpstreamAuthRejected("x", upstream="u", status=status)
    if status in (408, 409) or status >= 500:
        return UpstreamUnavailable("x", upstream="u", status=status)
    return UpstreamRejected("x", upstream="u", status=status)


@pytest.mark.parametrize(
    ("status", "retryable", "failover_only", "unhealthy"),
    [
        (400, False, False, False),
        (401, False, True, True),
        (403, False, True, True),
        (404, False, False, False),
        (408, True, False, True),
        (409, True, False, True),
        (422, False, False, False),
        (429, True, False, False),
        (500, True, False, True),
        (502, True, False, True),
        (503, True, False, True),
        (504, True, False, True),
    ],
)
def test_status_policy(status, retryable, failover_only, unhealthy):
    """Each HTTP status is retried, failed over, or returned as the policy table says."""
    error = _status_error(status)
    assert is_retryable(error) is retryable
    assert is_failover_only(error) is failover_only
    assert counts_against_health(error) is unhealthy


def test_an_upstream_without_the_model_is_failed_over_and_stays_healthy():
    """A 404 (or a 400 saying so) for a model the upstream does not have: the request is
    fine and another upstream may serve it, so it is failed over, not retried there, and
    the upstream is no less healthy for it."""
    error = UpstreamLacksModel("x", upstream="u", status=404)
    assert is_failover_only(error)
    assert not is_retryable(error)
    assert not counts_against_health(error)


def test_an_answer_from_some_other_server_is_failed_over_and_unhealthy():
    """A 200 that is no OpenAI answer (a wrong base_url's login page) is not retried on its
    upstream, which a backoff will not mend, but failed over, and opens its breaker."""
    error = UpstreamNotOpenAI("x", upstream="u", status=200, content_type="text/html")
    assert is_failover_only(error)
    assert counts_against_health(error)


@pytest.mark.parametrize(
    ("error", "is_sent", "scope"),
    [
        # The upstream took the request: what failed is the model's.
        (UpstreamUnavailable("x", upstream="u", status=500), True, FailureScope.MODEL),
        (UpstreamUnavailable("x", upstream="u", status=503), True, FailureScope.MODEL),
        (UpstreamUnavailable("x", upstream="u", status=408), True, FailureScope.MODEL),
        (UpstreamTimeout("waited for the answer", upstream="u"), True, FailureScope.MODEL),
        (UpstreamUnavailable("malformed or cut", upstream="u"), True, FailureScope.MODEL),
        # It never reached the upstream whole: the upstream's.
        (UpstreamUnavailable("refused or reset", upstream="u"), False, FailureScope.UPSTREAM),
        (UpstreamTimeout("connect timed out", upstream="u"), False, FailureScope.UPSTREAM),
        # What the upstream's address answers every model alike: the upstream's.
        (UpstreamUnavailable("x", upstream="u", status=301), True, FailureScope.UPSTREAM),
        (
            UpstreamNotOpenAI("x", upstream="u", status=200, content_type="text/html"),
            True,
            FailureScope.UPSTREAM,
        ),
        (UpstreamAuthRejected("x", upstream="u", status=401), True, FailureScope.UPSTREAM),
        # Nothing of health.
        (UpstreamRateLimited("x", upstream="u", status=429), True, None),
        (UpstreamRejected("x", upstream="u", status=400), True, None),
        (UpstreamLacksModel("x", upstream="u", status=404), True, None),
    ],
)
def test_failure_scope(error, is_sent, scope):
    """A failure counts against the model's breaker once its request reached the upstream
    whole, against the upstream's own when it did not or when its address answers every
    model alike (a redirect, no OpenAI answer, a rejected key)."""
    assert failure_scope(error, is_sent=is_sent) is scope


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (UpstreamUnavailable("reset", upstream="u"), True),
        (UpstreamTimeout("slow", upstream="u"), True),
        (
            StreamInterrupted(
                UpstreamUnavailable("cut", upstream="u"), deltas_sent=2, chars_sent=4
            ),
            False,
        ),
        (ValueError("bug"), False),
    ],
)
def test_non_status_errors(error, retryable):
    """Connection errors and timeouts retry; a stream cut after deltas and bugs never do."""
    assert is_retryable(error) is retryable


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(1.0, 1.0), (0.0, 0.0), (2.5, 2.5), (500.0, 60.0)],
)
def test_backoff_honours_retry_after_up_to_the_cap(retry_after, expected):
    """A server-directed wait is used as is, capped at max_retry_after_s."""
    assert backoff_s(0, retry_after_s=retry_after, rng=random.Random(1)) == expected


@pytest.mark.parametrize("retries_taken", [0, 1, 2, 3, 4, 8, 20])
def test_backoff_full_jitter_is_bounded(retries_taken):
    """Without Retry-After the wait is uniform in [0, min(cap, base * 2**n)]."""
    policy = BackoffPolicy(base_s=0.5, cap_s=8.0)
    rng = random.Random(42)
    waits = [
        backoff_s(retries_taken, retry_after_s=None, rng=rng, policy=policy) for _ in range(200)
    ]
    ceiling = min(8.0, 0.5 * 2**retries_taken)
    assert all(0.0 <= w <= ceiling for w in waits)
    assert max(waits) > ceiling * 0.8  # full jitter uses the whole range
    assert min(waits) < ceiling * 0.2


def test_backoff_is_reproducible_with_a_seeded_rng():
    """The same seed gives the same waits, so tests can pin them."""
    a = [backoff_s(n, retry_after_s=None, rng=random.Random(7)) for n in range(5)]
    b = [backoff_s(n, retry_after_s=None, rng=random.Random(7)) for n in range(5)]
    assert a == b


def test_retry_budget_caps_retries_to_a_ratio_of_requests():
    """With ratio 0.2 and no floor, 100 requests allow 20 retries, not 21."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_retries=0, clock=clock)
    for _ in range(100):
        budget.record_request()
    allowed = 0
    while budget.can_retry():
        budget.record_retry()
        allowed += 1
    assert allowed == 20


def test_retry_budget_refills_after_the_window():
    """Retries older than the window no longer count against the budget."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_retries=2, clock=clock)
    budget.record_retry()
    budget.record_retry()
    assert not budget.can_retry()
    clock.advance(10.5)
    assert budget.can_retry()


def _breaker(clock: FakeClock, on_change=None, **overrides: float) -> CircuitBreaker:
    settings = BreakerSettings(
        **{
            "consecutive_failures": 3,
            "failure_ratio": 0.5,
            "min_calls": 10,
            "window_s": 30.0,
            "cool_down_s": 5.0,
            "key_rejected_cool_down_s": 60.0,
            **overrides,
        }
    )
    return CircuitBreaker("up0", settings, clock=clock, on_change=on_change)


def test_breaker_opens_after_consecutive_failures_and_probes_after_cool_down():
    """Three failures open it; after the cool-down one probe is let through and closes it."""
    clock = FakeClock()
    changes = []
    breaker = _breaker(clock, on_change=changes.append)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.acquire()
    assert breaker.retry_after_s() == pytest.approx(5.0)
    clock.advance(5.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire()
    assert not breaker.acquire()  # only one probe at a time
    breaker.record_success(probe=breaker.episode)
    assert breaker.state is BreakerState.CLOSED
    assert [c.new for c in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_breaker_failed_probe_reopens():
    """A probe that fails opens the breaker for another cool-down."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(5.0)
    assert breaker.acquire()
    breaker.record_failure(probe=breaker.episode)
    assert breaker.state is BreakerState.OPEN
    clock.advance(4.9)
    assert breaker.state is BreakerState.OPEN


def test_breaker_half_open_is_reopened_by_its_probe_alone():
    """Half-open, a failing call that is not the probe (sent before the breaker opened)
    leaves it half-open with its probe running; the probe's success closes it."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(5.0)
    assert breaker.acquire()
    probe = breaker.episode
    breaker.record_failure(probe=None)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.acquire()  # the probe is still the one running
    breaker.record_failure(probe=probe - 1)  # a probe of an earlier half-open
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success(probe=probe)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_half_open_is_closed_by_its_probe_alone():
    """Half-open, an answer to a call that is not the probe (sent before the breaker
    opened) leaves it half-open, its probe still the one call let through; the probe's
    answer closes it."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(5.0)
    assert breaker.acquire()
    breaker.record_success(probe=None)
    breaker.record_success(probe=breaker.episode - 1)  # a probe of an earlier half-open
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.acquire()
    breaker.record_success(probe=breaker.episode)
    assert breaker.state is BreakerState.CLOSED


def _half_open_with_its_probe(clock: FakeClock) -> tuple[CircuitBreaker, int]:
    """A breaker opened by three failures, half-open, its probe claimed: (it, the probe)."""
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(5.0)
    assert breaker.acquire()
    return breaker, breaker.episode


def test_breaker_probe_running_a_cool_down_lets_one_more_through():
    """A probe that has not answered a cool-down after it was sent (an upstream that took
    it and hangs, up to its `timeout_s`) lets one more probe through, and only one; until
    then, calls are told when that will be, not kept off for the hung probe's timeout."""
    clock = FakeClock()
    breaker, _ = _half_open_with_its_probe(clock)
    assert breaker.probe_due_s() == pytest.approx(5.0)
    clock.advance(4.9)
    assert not breaker.allows()
    assert breaker.probe_due_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.allows()
    assert breaker.acquire()
    assert not breaker.acquire()  # the second probe holds the slot for its own cool-down
    assert breaker.probe_due_s() == pytest.approx(5.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_overtaken_probe_frees_nothing_and_its_failure_leaves_the_decision():
    """The overtaken probe's end (a 4xx, its caller gone) frees nothing, and its failure
    (its timeout, at last) leaves the breaker to the probe sent after it."""
    clock = FakeClock()
    breaker, hung = _half_open_with_its_probe(clock)
    clock.advance(5.0)
    assert breaker.acquire()
    breaker.release(probe=hung)
    assert not breaker.acquire()
    breaker.record_failure(probe=hung)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.acquire()
    breaker.record_failure(probe=breaker.episode)
    assert breaker.state is BreakerState.OPEN


def test_breaker_overtaken_probe_that_answers_closes_it():
    """An upstream whose answers take longer than the cool-down has each probe overtaken
    before it answers: the overtaken probe's success still closes the breaker, else the
    upstream, healthy, stayed half-open for good."""
    clock = FakeClock()
    breaker, slow = _half_open_with_its_probe(clock)
    clock.advance(5.0)
    assert breaker.acquire()
    breaker.record_success(probe=slow)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_on_failure_ratio():
    """Half the calls failing in the window opens it, even without a streak of three."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(5):
        breaker.record_success()
        breaker.record_failure()
        clock.advance(0.1)
    assert breaker.state is BreakerState.OPEN


def test_breaker_ratio_needs_min_calls():
    """Below min_calls the ratio alone does not open it."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(4):
        breaker.record_success()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_key_rejected_opens_for_the_long_cool_down():
    """A rejected key opens the breaker at once, for key_rejected_cool_down_s."""
    clock = FakeClock()
    breaker = _breaker(clock)
    breaker.record_key_rejected()
    assert breaker.state is BreakerState.OPEN
    assert breaker.is_key_rejected
    clock.advance(59.0)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1.0)
    assert breaker.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    ("per_minute", "level", "amount", "expected_wait"),
    [(60, 60, 1, 0.0), (60, 0, 1, 1.0), (600, 0, 10, 1.0), (60, 0.5, 1, 0.5), (60, 0, 120, 60.0)],
)
def test_token_bucket_wait(per_minute, level, amount, expected_wait):
    """The wait is the missing units at the refill rate (capped at one minute's worth)."""
    bucket = TokenBucket(per_minute, level, updated_at=0.0)
    assert bucket.wait_s(amount, now=0.0) == pytest.approx(expected_wait)


async def test_limiter_requests_per_minute_waits_then_refuses_past_max_wait():
    """At 60 RPM the second immediate call waits 1 s (and says so: the pool counts it as
    upstream time); with no room to wait it is refused."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", requests_per_minute=60, clock=clock)
    limiter._requests.level = 1  # type: ignore[union-attr]
    assert await limiter.acquire(tokens=1, max_wait_s=5.0) == 0.0
    limiter.release()
    assert await limiter.acquire(tokens=1, max_wait_s=5.0) == pytest.approx(1.0)
    limiter.release()
    assert clock.slept == [pytest.approx(1.0)]
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire(tokens=1, max_wait_s=0.5)
    assert info.value.retry_after_s == pytest.approx(1.0)


async def test_limiter_tokens_per_minute():
    """A call larger than what is left of the token bucket waits for the refill."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", tokens_per_minute=600, clock=clock)
    await limiter.acquire(tokens=600, max_wait_s=0.0)
    limiter.release()
    await limiter.acquire(tokens=100, max_wait_s=20.0)
    assert clock.slept == [pytest.approx(10.0)]


async def test_limiter_concurrency_hands_slots_over_in_order():
    """Past max_concurrency a call waits and gets the slot of the next one to finish."""
    limiter = UpstreamLimiter("up0", max_concurrency=1)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    with pytest.raises(LimitExceeded):
        await limiter.acquire(tokens=1, max_wait_s=0.0)
    waiting = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    limiter.release()
    await waiting
    assert limiter.in_flight == 1
    limiter.release()
    assert limiter.in_flight == 0


async def test_a_start_given_back_returns_its_slot_and_bucket_units():
    """A call the limiter started but the pool does not send (its retry budget spent while
    it waited) gives back its request and tokens as well as its slot: the next call is not
    held for units nothing used."""
    clock = FakeClock()
    limiter = UpstreamLimiter(
        "up0", max_concurrency=1, requests_per_minute=1, tokens_per_minute=100, clock=clock
    )
    assert await limiter.acquire(tokens=100, max_wait_s=0.0) == 0.0
    limiter.give_back(100)
    assert limiter.in_flight == 0
    assert limiter.wait_s(100)[0] == 0.0
    assert await limiter.acquire(tokens=100, max_wait_s=0.0) == 0.0


async def test_a_call_cancelled_as_its_slot_is_handed_over_stays_cancelled():
    """The slot reaches a queued call and the call is cancelled before it runs on: it
    must end cancelled and give the slot back. Python 3.11's `asyncio.wait_for` returned
    the slot instead, swallowing the cancellation, and the call went on upstream."""
    limiter = UpstreamLimiter("up0", max_concurrency=1)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    queued = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5.0))
    await asyncio.sleep(0)
    assert limiter.queued == 1
    limiter.release()
    await asyncio.sleep(0)  # the slot is handed over; the queued call has not run on yet
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert limiter.in_flight == 0
    assert limiter.queued == 0


async def test_a_call_cancelled_as_its_slot_is_handed_over_leaves_the_learned_rate_as_it_was():
    """Under a learned rate (a call every 10 s), the slot reaches a queued call 10 s after
    the last start and the call is cancelled before it runs on: nothing was sent, so the
    next call may start at once, as it could have before the handover. Before, the start
    given back kept its time, and the next call was held (or refused) 10 s more."""
    clock = SteppedClock()
    limiter = UpstreamLimiter("up0", max_concurrency=1, clock=clock)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    limiter.learn(
        RateLimitHints(limit=100, remaining=5, reset_in_s=50.0), now_epoch_s=1_700_000_000.0
    )
    assert limiter.spacing_s == pytest.approx(10.0)
    clock.advance(10.0)
    queued = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=30.0))
    await asyncio.sleep(0)
    assert limiter.queued == 1
    limiter.release()
    await asyncio.sleep(0)  # the slot is handed over; the queued call has not run on yet
    assert limiter.in_flight == 1
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert limiter.in_flight == 0
    assert await limiter.acquire(tokens=1, max_wait_s=0.0) == 0.0


async def test_a_stopping_limiter_refuses_the_calls_in_line_and_any_that_would_wait():
    """As the server begins stopping, the calls waiting for the rate or for a slot are
    refused `ShuttingDown`, having taken nothing, and so is a call that would wait after;
    a call that can start at once still does."""
    clock = SteppedClock()
    limiter = UpstreamLimiter("up0", max_concurrency=3, requests_per_minute=2, clock=clock)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    queued = [  # the first waits 30 s for the rate, the others behind it
        asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=60.0, tenant=tenant))
        for tenant in ("a", "a", "b")
    ]
    await asyncio.sleep(0)
    assert limiter.queued == 3
    limiter.begin_stopping()
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, ShuttingDown) for r in results)
    assert (limiter.queued, limiter.in_flight) == (0, 2)
    assert limiter.wait_s(1) == (pytest.approx(30.0), "requests-per-minute")  # none taken
    with pytest.raises(ShuttingDown):
        await limiter.acquire(tokens=1, max_wait_s=60.0)
    clock.advance(30.0)
    assert await limiter.acquire(tokens=1, max_wait_s=60.0) == 0.0
    assert limiter.in_flight == 3


async def test_a_call_handed_its_slot_as_the_limiter_stops_gives_it_back_unsent():
    """The slot reaches a queued call just before the server begins stopping, and the call
    runs on after: it is refused `ShuttingDown` as the calls still in line are, and the
    slot goes back."""
    limiter = UpstreamLimiter("up0", max_concurrency=1)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    queued = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=5.0))
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.sleep(0)  # the slot is handed over; the queued call has not run on yet
    assert (limiter.queued, limiter.in_flight) == (0, 1)
    limiter.begin_stopping()
    with pytest.raises(ShuttingDown):
        await queued
    assert limiter.in_flight == 0


async def test_calls_leaving_a_long_line_out_of_order_compare_no_waiters_field_by_field():
    """Calls leave the line in any order (a cut-off or a cancelled batch cancels them in
    no particular one); each is found among the others by identity. Before, queued calls
    compared equal field by field, a Python call for every one passed over: 10,000 calls
    leaving in random order held the event loop 7 s (0.6 s before tenants took turns)."""
    limiter = UpstreamLimiter("up0", max_concurrency=1)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    queued = [asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=30.0)) for _ in range(50)]
    await asyncio.sleep(0)
    assert limiter.queued == 50
    compared: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "__eq__":
            compared.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        for call in reversed(queued):
            call.cancel()
        results = await asyncio.gather(*queued, return_exceptions=True)
    finally:
        sys.setprofile(None)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert limiter.queued == 0
    assert compared == []


async def test_limiter_hands_slots_to_tenants_in_turn():
    """Queued a, a, a, b, b, c (a cancelled b among them): slots go a, b, c, a, b, a, one
    tenant after another, first come first served within each; the cancelled call is
    skipped and nothing is left queued."""
    limiter = UpstreamLimiter("up0", max_concurrency=1)
    await limiter.acquire(tokens=1, max_wait_s=1.0)
    served: list[str] = []

    async def call(name: str, tenant: str) -> None:
        await limiter.acquire(tokens=1, max_wait_s=5.0, tenant=tenant)
        served.append(name)

    order = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("gone", "b"), ("b2", "b")]
    waiting = {name: asyncio.ensure_future(call(name, tenant)) for name, tenant in order}
    waiting["c1"] = asyncio.ensure_future(call("c1", "c"))
    await asyncio.sleep(0)
    assert limiter.queued == 7
    gone = waiting.pop("gone")
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert limiter.queued == 6
    for _ in range(6):
        limiter.release()
        for _ in range(5):  # the woken call's task runs on
            await asyncio.sleep(0)
    await asyncio.gather(*waiting.values())
    assert served == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert limiter.queued == 0
    assert limiter.in_flight == 1
    limiter.release()
    assert limiter.in_flight == 0


async def _run_ready() -> None:
    """Let the woken calls' tasks run on (a start takes a few loop turns to reach them)."""
    for _ in range(10):
        await asyncio.sleep(0)


def _rate_limited(clock: FakeClock, **limits: int) -> UpstreamLimiter:
    """A limiter of 60 requests a minute (one a second) whose bucket is empty."""
    limiter = UpstreamLimiter("up0", requests_per_minute=60, clock=clock, **limits)
    limiter._requests.level = 0  # type: ignore[union-attr]
    return limiter


async def test_limiter_hands_rate_limited_starts_to_tenants_in_turn():
    """Queued for the rate a, a, a, b, b, c: each second's one start goes to the next
    tenant in turn, a, b, c, a, b, a (not to whichever sleeper wakes first: a, with three
    calls, would get most), and each call is told how long it waited."""
    clock = SteppedClock()
    limiter = _rate_limited(clock)
    served: list[tuple[str, float]] = []

    async def call(name: str, tenant: str) -> None:
        waited = await limiter.acquire(tokens=1, max_wait_s=30.0, tenant=tenant)
        served.append((name, waited))

    order = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
    waiting = [asyncio.ensure_future(call(name, tenant)) for name, tenant in order]
    await _run_ready()
    assert limiter.queued == 6
    for started in range(1, 7):
        clock.advance(1.0)
        await _run_ready()
        assert len(served) == started  # one a second, as the bucket allows
    await asyncio.gather(*waiting)
    assert [name for name, _ in served] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert [waited for _, waited in served] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (limiter.queued, limiter.in_flight) == (0, 6)


async def test_limiter_keeps_a_big_call_its_turn_until_the_tokens_refill():
    """A call needing more tokens than are left is first in line: a smaller call behind it
    that the bucket could take now waits its turn, so big calls are never starved."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", tokens_per_minute=600, clock=clock)
    limiter._tokens.level = 100  # type: ignore[union-attr]
    served: list[str] = []

    async def call(name: str, tokens: int, tenant: str) -> None:
        await limiter.acquire(tokens=tokens, max_wait_s=120.0, tenant=tenant)
        served.append(name)

    big = asyncio.ensure_future(call("big", 600, "a"))
    small = asyncio.ensure_future(call("small", 10, "b"))
    await asyncio.gather(big, small)
    assert served == ["big", "small"]
    # 50 s for the 500 tokens the big call lacked, then 1 s for the small one's 10.
    assert clock.slept == [pytest.approx(50.0), pytest.approx(1.0)]


async def test_limiter_turn_of_a_cancelled_rate_waiter_passes_on():
    """A call cancelled while it waits for the rate leaves nothing queued, not even its
    tenant's place in the turns, and spends nothing: the next tenant's call takes the
    start it would have had."""
    clock = SteppedClock()
    limiter = _rate_limited(clock)
    served: list[str] = []

    async def call(name: str, tenant: str) -> None:
        await limiter.acquire(tokens=1, max_wait_s=30.0, tenant=tenant)
        served.append(name)

    order = [("a1", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
    waiting = {name: asyncio.ensure_future(call(name, tenant)) for name, tenant in order}
    await _run_ready()
    for name in ("a1", "b2"):  # first in line, and one queued behind another
        gone = waiting.pop(name)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
    assert limiter.queued == 2
    assert list(limiter._waiters) == ["b", "c"]
    clock.advance(1.0)
    await _run_ready()
    assert served == ["b1"]
    clock.advance(1.0)
    await _run_ready()
    await asyncio.gather(*waiting.values())
    assert served == ["b1", "c1"]
    assert (limiter.queued, limiter.in_flight) == (0, 2)
    assert limiter._waiters == {}
    assert limiter._requests.level == pytest.approx(0.0)  # type: ignore[union-attr]


async def test_limiter_never_starts_a_rate_waiter_past_its_max_wait():
    """A call whose own wait is longer than it may wait is refused at once; one that may
    wait 1.5 s but whose turn comes after another's second is refused when the other
    starts, with the wait left and the limit that holds it, not started late."""
    clock = SteppedClock()
    limiter = _rate_limited(clock)
    with pytest.raises(LimitExceeded) as at_once:
        await limiter.acquire(tokens=1, max_wait_s=0.5, tenant="c")
    assert at_once.value.retry_after_s == pytest.approx(1.0)
    assert limiter.queued == 0
    first = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=30.0, tenant="a"))
    behind = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=1.5, tenant="b"))
    await _run_ready()
    assert limiter.queued == 2
    clock.advance(1.0)
    await _run_ready()
    assert await first == pytest.approx(1.0)
    with pytest.raises(LimitExceeded) as too_late:
        await behind
    assert too_late.value.retry_after_s == pytest.approx(1.0)
    assert too_late.value.what == "requests-per-minute"
    assert (limiter.queued, limiter.in_flight) == (0, 1)
    assert limiter._requests.level == pytest.approx(0.0)  # type: ignore[union-attr]


async def test_a_rate_waiter_whose_start_is_due_by_its_max_wait_is_started_not_refused():
    """A call that may wait 0.1 s for a start 0.1 s away is first in line: the
    dispatcher's timer starts it at its deadline. Its own timeout firing first (here on
    the loop's clock, before the test moves the limiter's) must not refuse it: before,
    whichever of the two ran first decided, and the call was refused a start it had."""
    clock = SteppedClock()
    limiter = UpstreamLimiter("up0", requests_per_minute=600, clock=clock)
    limiter._requests.level = 0  # type: ignore[union-attr]
    call = asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=0.1, tenant="a"))
    await asyncio.sleep(0.15)  # its own timeout has fired
    assert not call.done()
    clock.advance(0.1)
    await _run_ready()
    assert await call == pytest.approx(0.1)
    assert (limiter.queued, limiter.in_flight) == (0, 1)
    assert limiter._timer is None


async def test_limiter_pause_given_while_calls_wait_for_the_rate_holds_them_all():
    """A 429's pause that comes while calls queue for the rate holds the whole line: the
    start the bucket allows after a second waits for the pause to end (by when the bucket
    holds both calls' requests)."""
    clock = SteppedClock()
    limiter = _rate_limited(clock)
    waiting = [
        asyncio.ensure_future(limiter.acquire(tokens=1, max_wait_s=30.0, tenant=tenant))
        for tenant in ("a", "b")
    ]
    await _run_ready()
    limiter.pause(3.0)
    clock.advance(1.0)
    await _run_ready()
    assert limiter.in_flight == 0
    clock.advance(2.0)
    await _run_ready()
    assert await asyncio.gather(*waiting) == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize(
    ("hints", "expected_pause", "expected_spacing"),
    [
        (RateLimitHints(limit=100, remaining=50, reset_epoch_s=10.0), 0.0, 0.0),
        (RateLimitHints(limit=100, remaining=5, reset_epoch_s=10.0), 0.0, 2.0),
        (RateLimitHints(limit=100, remaining=0, reset_epoch_s=10.0), 10.0, 0.0),
        (RateLimitHints(limit=100, remaining=0, reset_epoch_s=1_700_000_007.0), 7.0, 0.0),
        (RateLimitHints(limit=100, remaining=0, reset_epoch_s=None), 1.0, 0.0),
        (RateLimitHints(limit=100, remaining=0, reset_in_s=6.5), 6.5, 0.0),
        (RateLimitHints(limit=100, remaining=0, reset_epoch_s=10.0, reset_in_s=3.0), 3.0, 0.0),
        (RateLimitHints(limit=100, remaining=5, reset_in_s=10.0), 0.0, 2.0),
        (RateLimitHints(), 0.0, 0.0),
    ],
)
def test_limiter_learns_from_rate_limit_headers(hints, expected_pause, expected_spacing):
    """Low remaining spaces calls over the reset window; zero pauses until reset."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", clock=clock)
    limiter.learn(hints, now_epoch_s=1_700_000_000.0)
    assert max(0.0, limiter.paused_until - clock.now()) == pytest.approx(expected_pause)
    assert limiter.spacing_s == pytest.approx(expected_spacing)


async def test_a_learned_rate_never_makes_a_call_wait_past_its_window():
    """One call left of a window resetting in 5 min spaces calls 5 min apart, but the
    learned rate holds for at most a minute (as a pause does): the wait a refused call is
    told, and the wait a patient one sleeps, end when it does, not 5 min on."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", clock=clock)
    await limiter.acquire(tokens=1, max_wait_s=0.0)
    limiter.release()
    limiter.learn(RateLimitHints(limit=100, remaining=1, reset_in_s=300.0), now_epoch_s=0.0)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire(tokens=1, max_wait_s=5.0)
    assert info.value.retry_after_s == pytest.approx(60.0)
    await limiter.acquire(tokens=1, max_wait_s=600.0)
    assert clock.slept == [pytest.approx(60.0)]


async def test_limiter_pause_after_429_delays_the_next_call():
    """A pause (from a 429's Retry-After) makes the next call wait it out."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", clock=clock)
    limiter.pause(2.0)
    await limiter.acquire(tokens=1, max_wait_s=5.0)
    assert clock.slept == [pytest.approx(2.0)]


async def test_limiter_starts_now_says_whether_a_call_would_wait_and_spends_nothing():
    """`starts_now` is true only with a free slot, the units at hand and no pause, and
    `expected_wait_s` gives the rate's wait; asking either, however often, takes nothing
    (the pool asks of every route of a call it plans)."""
    clock = FakeClock()
    limiter = UpstreamLimiter("up0", max_concurrency=1, requests_per_minute=60, clock=clock)
    limiter._requests.level = 1  # type: ignore[union-attr]
    for _ in range(3):
        assert limiter.starts_now(1)
        assert limiter.expected_wait_s(1) == 0.0
    assert await limiter.acquire(tokens=1, max_wait_s=0.0) == 0.0  # its one unit was there
    assert not limiter.starts_now(1)  # no slot, and no request left
    limiter.release()
    assert not limiter.starts_now(1)
    assert limiter.expected_wait_s(1) == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.starts_now(1)
    limiter.pause(2.0)
    assert not limiter.starts_now(1)
    assert limiter.expected_wait_s(1) == pytest.approx(2.0)


async def test_a_shared_limiters_starts_now_asks_redis_nothing():
    """A shared upstream whose reserve is empty starts a call now while Redis may hold
    its units (never asked yet, or its last answer says so), not once Redis said it is
    short; saying so asks no fetch of Redis: the plan reads only what the process holds."""

    class _NoRedis:
        def register_script(self, script: str) -> object:
            async def run(**_: object) -> list[str]:
                raise AssertionError("the plan asked Redis")

            return run

    rate = SharedRate(
        "up0",
        requests_per_minute=60,
        tokens_per_minute=None,
        commands=_NoRedis(),
        prefix="t:",
        cooldown=StoreCooldown("auth"),
        clock=FakeClock(),
    )
    clock = FakeClock()
    limiter = SharedUpstreamLimiter("up0", rate, max_concurrency=10, clock=clock)
    assert limiter.starts_now(1)  # never asked: one fetch away
    assert not rate.is_fetching
    assert rate.requests is not None
    rate.requests.level, rate.requests.level_at = 0.0, clock.now()  # Redis said: empty
    assert not limiter.starts_now(1)
    assert limiter.expected_wait_s(1) > 0
    assert not rate.is_fetching
    rate.requests.reserve = 5
    assert limiter.starts_now(1)


async def test_admission_queues_then_sheds_immediately():
    """Past in-flight calls wait in a bounded queue; past the queue, Overloaded at once."""
    admission = Admission(max_in_flight=1, max_queued=1, retry_after_s=0.5)
    first = await admission.enter()
    queued = asyncio.ensure_future(admission.enter())
    await asyncio.sleep(0)
    assert admission.queued == 1
    with pytest.raises(Overloaded) as info:
        await admission.enter()
    assert info.value.retry_after_s == 0.5
    admission.leave(first)
    second = await queued
    assert (admission.in_flight, admission.queued) == (1, 0)
    admission.leave(second)
    assert admission.in_flight == 0


async def test_admission_admits_at_once_only_while_a_slot_is_free_and_none_queue():
    """`enter_at_once` takes a free slot without an await; with every slot taken, or a
    call queued for one, it admits nothing and the call goes to `enter`'s queue."""
    admission = Admission(max_in_flight=2, max_queued=1, retry_after_s=0.5)
    first = admission.enter_at_once()
    assert first is asyncio.current_task()
    second = await admission.enter()
    assert admission.enter_at_once() is False
    queued = asyncio.ensure_future(admission.enter())
    await asyncio.sleep(0)
    assert (admission.in_flight, admission.queued) == (2, 1)
    admission.leave(first)  # its slot passes to the queued call
    assert admission.enter_at_once() is False
    admission.leave(await queued)
    assert admission.enter_at_once() is not False  # free again: no one queues
    assert admission.in_flight == 2
    admission.leave(second)
    admission.leave(asyncio.current_task())
    assert admission.in_flight == 0


async def test_admission_cancelled_waiter_frees_its_queue_place():
    """A queued call that is cancelled leaves the queue and takes no slot."""
    admission = Admission(max_in_flight=1, max_queued=1, retry_after_s=0.5)
    ticket = await admission.enter()
    queued = asyncio.ensure_future(admission.enter())
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert admission.queued == 0
    admission.leave(ticket)
    assert admission.in_flight == 0


async def test_admission_bounds_the_calls_arriving_at_once():
    """Calls whose keys are being looked up count as arriving; no more arrive at once than
    the server would hold (in flight and queued): past that, Overloaded at once."""
    admission = Admission(max_in_flight=1, max_queued=1, retry_after_s=0.5)
    looked_up = asyncio.Event()

    async def arrive() -> None:
        with admission.arriving_call():
            await looked_up.wait()

    waiting = [asyncio.ensure_future(arrive()) for _ in range(2)]
    await asyncio.sleep(0)
    assert admission.arriving == 2
    with pytest.raises(Overloaded) as info, admission.arriving_call():
        pass
    assert info.value.retry_after_s == 0.5
    looked_up.set()
    await asyncio.gather(*waiting)
    assert admission.arriving == 0
    with admission.arriving_call():
        assert admission.arriving == 1


def test_pool_counters_keep_a_bounded_history_of_breaker_changes():
    """A flapping upstream does not grow the pool's counters for the life of the process."""
    clock = FakeClock()
    hooks = PoolHooks()
    counters = PoolCounters().attach(hooks)
    breaker = _breaker(clock, on_change=hooks.breaker_changed)
    for _ in range(5000):
        breaker.record_key_rejected()  # open
        clock.advance(60.0)
        assert breaker.acquire()  # half-open: the probe
        breaker.record_success(probe=breaker.episode)  # closed
    assert len(counters.breaker_changes) <= 1000
    assert counters.breaker_changes[-1].new is BreakerState.CLOSED
