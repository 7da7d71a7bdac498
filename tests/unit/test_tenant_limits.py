"""Per-tenant token buckets and in-flight counts, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from service.auth import Principal
from service.caller_gate import BatchPacer
from service.clock import Deadline
from service.config import TenantConfig
from service.errors import DeadlineExceeded, QuotaExceeded
from service.tenant_limits import MemoryTenantLimiter
from tests.fake_clock import FakeClock


def test_requests_burst_to_the_limit_then_refill_at_its_rate():
    """60 rpm: 60 pass at once, the 61st waits 1 s, and 1 s later one more passes."""
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(requests_per_minute=60)
    for _ in range(60):
        limiter.take("a", limits, tokens=0)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.take("a", limits, tokens=0)
    assert refused.value.retry_after_s == pytest.approx(1.0)
    assert refused.value.subject == "tenant:a:requests_per_minute"
    clock.t += 1.0
    limiter.take("a", limits, tokens=0)
    with pytest.raises(QuotaExceeded):
        limiter.take("a", limits, tokens=0)


async def test_units_given_back_return_to_the_buckets_up_to_full():
    """Units taken for a call never sent go back to its tenant's buckets, never past a
    full minute's. Before, there was no way to give them back."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(requests_per_minute=60, tokens_per_minute=600)
    limiter.take("a", limits, tokens=600, requests=60)
    await limiter.give_back_rate("a", limits, tokens=600, requests=60)
    limiter.take("a", limits, tokens=600, requests=60)
    await limiter.give_back_rate("a", limits, tokens=600, requests=60)
    await limiter.give_back_rate("a", limits, tokens=600, requests=60)  # no more than full
    limiter.take("a", limits, tokens=600, requests=60)
    with pytest.raises(QuotaExceeded):
        limiter.take("a", limits, tokens=1, requests=1)


def test_tenants_have_separate_buckets():
    """One tenant's exhaustion never refuses another."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(requests_per_minute=1)
    limiter.take("a", limits, tokens=0)
    with pytest.raises(QuotaExceeded):
        limiter.take("a", limits, tokens=0)
    limiter.take("b", limits, tokens=0)


@pytest.mark.parametrize(
    ("taken", "ask", "wait_s"), [(900, 200, 6.0), (1000, 1, 0.06), (500, 500, 0.0)]
)
def test_token_bucket_wait(taken, ask, wait_s):
    """1000 tpm: the wait is the missing tokens at 1000/60 tokens a second."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(tokens_per_minute=1000)
    limiter.take("a", limits, tokens=taken)
    if wait_s == 0:
        limiter.take("a", limits, tokens=ask)
        return
    with pytest.raises(QuotaExceeded) as refused:
        limiter.take("a", limits, tokens=ask)
    assert refused.value.retry_after_s == pytest.approx(wait_s)


def test_a_refusal_takes_nothing():
    """A call refused on tokens does not spend a request, and vice versa."""
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(requests_per_minute=2, tokens_per_minute=100)
    limiter.take("a", limits, tokens=90)
    with pytest.raises(QuotaExceeded):
        limiter.take("a", limits, tokens=50)
    limiter.take("a", limits, tokens=10)  # the second request is still there


@pytest.mark.parametrize(
    ("tokens", "requests", "subject"),
    [(101, 1, "tenant:a:tokens_per_minute"), (0, 11, "tenant:a:requests_per_minute")],
)
def test_a_call_larger_than_a_minutes_allowance_is_refused_without_a_retry_hint(
    tokens, requests, subject
):
    """Waiting cannot help a call bigger than the bucket (a big batch), so no RetryInfo."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(tokens_per_minute=100, requests_per_minute=10)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.take("a", limits, tokens=tokens, requests=requests)
    assert refused.value.retry_after_s is None
    assert refused.value.subject == subject


async def test_concurrency_slots_are_released_on_every_exit():
    """A slot is held for the body and given back on success and on error alike."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(max_concurrent_calls=1)
    async with limiter.admit("a", limits, tokens=0):
        assert limiter.in_flight("a") == 1
        with pytest.raises(QuotaExceeded):
            async with limiter.admit("a", limits, tokens=0):
                pass
        async with limiter.admit("b", limits, tokens=0):
            assert limiter.in_flight("b") == 1
    with pytest.raises(RuntimeError):
        async with limiter.admit("a", limits, tokens=0):
            raise RuntimeError("boom")
    assert limiter.in_flight("a") == 0


def test_zero_means_unlimited():
    """A tenant with no limits is never refused."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    for _ in range(10_000):
        limiter.take("a", TenantConfig(), tokens=10**6)


def _pacer(limits: TenantConfig, clock: FakeClock) -> BatchPacer:
    principal = Principal(tenant="a", limits=limits, is_authenticated=True)
    return BatchPacer(MemoryTenantLimiter(clock=clock), principal)


async def test_a_batch_pacer_waits_for_the_bucket_to_refill():
    """60 rpm: a batch's first 60 items start at once, the next ones a second apart, each
    waiting for its own request (taken in order, each with the call slot the one before
    gave back)."""
    clock = FakeClock()
    pacer = _pacer(TenantConfig(requests_per_minute=60, max_concurrent_calls=1), clock)
    for _ in range(62):
        async with pacer.turn(0, Deadline.after(None, clock)):
            pass
    assert clock.slept == [pytest.approx(1.0), pytest.approx(1.0)]


async def test_a_batch_pacer_waits_for_a_call_slot_to_be_given_back():
    """Under a cap of one call, an item waits in line for the slot a call holds and
    takes it as soon as that call gives it back, rather than being refused."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(max_concurrent_calls=1)
    pacer = BatchPacer(limiter, Principal(tenant="a", limits=limits))
    held = await limiter.take_turn("a", limits, tokens=0)
    waiting = asyncio.ensure_future(pacer.take(0, Deadline.after(None)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    await held.give_back()
    slot = await asyncio.wait_for(waiting, 5)
    assert limiter.in_flight("a") == 1
    await slot.give_back()
    assert limiter.in_flight("a") == 0


async def test_a_batch_pacer_refuses_an_item_still_without_a_slot_at_the_deadline():
    """An item whose slot is not given back before the call's deadline is refused for
    the cap, with a retry in a second, and takes none of the tenant's requests."""
    limiter = MemoryTenantLimiter(clock=FakeClock())
    limits = TenantConfig(requests_per_minute=2, max_concurrent_calls=1)
    pacer = BatchPacer(limiter, Principal(tenant="a", limits=limits))
    held = await limiter.take_turn("a", limits, tokens=0)
    with pytest.raises(QuotaExceeded) as refused:
        await pacer.take(0, Deadline.after(0.05))
    assert refused.value.subject == "tenant:a:max_concurrent_calls"
    assert refused.value.retry_after_s == 1.0
    await held.give_back()
    limiter.take("a", limits, tokens=0)  # the minute's second request is still there


async def test_a_batch_pacer_refuses_an_item_it_cannot_take_before_the_deadline():
    """An item whose turn comes after the deadline is refused at once, with the wait, not
    held until the deadline; one larger than a minute's tokens is refused for good."""
    clock = FakeClock()
    pacer = _pacer(TenantConfig(requests_per_minute=3, tokens_per_minute=1000), clock)
    for _ in range(3):
        await pacer.take(10, Deadline.after(5.0, clock))
    with pytest.raises(QuotaExceeded) as late:
        await pacer.take(10, Deadline.after(5.0, clock))
    assert late.value.retry_after_s == pytest.approx(20.0)
    assert clock.slept == []
    await pacer.take(10, Deadline.after(30.0, clock))  # time enough: it waits its turn
    assert clock.slept == [pytest.approx(20.0)]
    with pytest.raises(QuotaExceeded) as never:
        await pacer.take(1001, Deadline.after(None, clock))
    assert never.value.retry_after_s is None
    assert never.value.is_retry_futile


async def test_a_batch_pacer_refuses_at_once_an_item_whose_tokens_come_after_the_deadline():
    """Both buckets empty: the item's request is back in 1 s, its 500 tokens in 50 s,
    past its 5 s deadline. It is refused at once with the 50 s wait, as the README says
    ("as soon as it is next in line"). Before, it was told the requests' 1 s, slept it
    (holding the batch's other items behind it) and only then was refused."""
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(requests_per_minute=60, tokens_per_minute=600)
    limiter.take("a", limits, tokens=600, requests=60)
    pacer = BatchPacer(limiter, Principal(tenant="a", limits=limits))
    with pytest.raises(QuotaExceeded) as late:
        await pacer.take(500, Deadline.after(5.0, clock))
    assert late.value.retry_after_s == pytest.approx(50.0)
    assert late.value.subject == "tenant:a:tokens_per_minute"
    assert clock.slept == []


async def test_a_batch_pacer_takes_nothing_once_the_deadline_has_passed():
    """An item that reaches its turn after the call's deadline takes no request: it would
    be paid for under the tenant's limit and never sent."""
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(requests_per_minute=2)
    pacer = BatchPacer(limiter, Principal(tenant="a", limits=limits))
    with pytest.raises(DeadlineExceeded):
        await pacer.take(0, Deadline(expires_at=clock.t - 0.1, clock=clock))
    for _ in range(2):  # both of the minute's requests are still there
        limiter.take("a", limits, tokens=0)


async def test_a_batch_pacer_leaves_its_share_to_the_tenants_other_calls():
    """10 rpm, a fifth left to other calls: a batch takes the bucket down to 2 requests
    and then waits until it holds 3, so the tenant's unary calls still pass meanwhile.
    Taking every refill the moment it came, a batch refused them for as long as it ran.
    """
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(requests_per_minute=10, tokens_per_minute=1000)
    principal = Principal(tenant="a", limits=limits, is_authenticated=True)
    pacer = BatchPacer(limiter, principal, leave_share=0.2)
    for _ in range(8):
        await pacer.take(10, Deadline.after(None, clock))
    assert clock.slept == []
    with pytest.raises(QuotaExceeded) as waits:
        await pacer.take(10, Deadline.after(1.0, clock))
    assert waits.value.retry_after_s == pytest.approx(6.0)  # until 3 requests are in
    for _ in range(2):  # the share left: two unary calls pass
        limiter.take("a", limits, tokens=10)
    with pytest.raises(QuotaExceeded):
        limiter.take("a", limits, tokens=10)


def test_the_share_left_to_other_calls_never_asks_more_than_the_bucket_holds():
    """With a large share a take needs at most the whole bucket, never more: it waits for
    a full bucket rather than forever."""
    clock = FakeClock()
    limiter = MemoryTenantLimiter(clock=clock)
    limits = TenantConfig(tokens_per_minute=100)
    limiter.take("a", limits, tokens=50)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.take("a", limits, tokens=90, leave_share=0.5)
    assert refused.value.retry_after_s == pytest.approx(30.0)  # 50 more to a full 100
    clock.t += 30.0
    limiter.take("a", limits, tokens=90, leave_share=0.5)
