"""Budgets count the expected cost of calls still in flight, per tenant and across replicas.

Every call here sets `max_tokens`, so its expected cost (prompt as input plus
`max_tokens` as output) is what it reserves. The upstream holds its answers until
`gate` is set, so the calls overlap for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

import service.budgets
from llmgateway.v1 import gateway_pb2 as pb
from service.config import ModelConfig
from service.domain import Message, Role, Usage
from service.ledger import RESERVATION_TTL_S
from service.pricing import cost_usd
from service.tokens import estimate_prompt_tokens
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream, Reply, Status
from tests.integration.helpers import retry_delay_s, rich_status
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.integration.test_batch import collect
from tests.integration.test_resilience import dataclass_replace_upstream
from tests.integration.test_stream_charges import (
    CALIBRATED,
    calibrate,
    calibrated_estimate,
    plain_estimate,
)
from tests.redis_support import redis_url, use_short_leases  # noqa: F401 - fixture
from tests.scripted_upstream import ScriptedUpstream, user_text

MAX_TOKENS = 1000
PRICE = ModelConfig(context_window=4096, input_usd_per_million=0.14, output_usd_per_million=0.42)
_TIMEOUT_S = 10.0


def expected_cost_usd(content: str) -> float:
    """What a call with one user message `content` reserves: prompt in, max_tokens out."""
    prompt = estimate_prompt_tokens((Message(Role.USER, content),))
    return cost_usd(Usage(input_tokens=prompt, output_tokens=MAX_TOKENS), PRICE)


def budget_for(calls: float, content: str = "call a") -> dict[str, Any]:
    """A daily budget with room for `calls` calls like `content` in flight."""
    return {"usd": calls * expected_cost_usd(content), "period": "day"}


def capped(content: str, **fields: Any) -> pb.CompleteRequest:
    """A unary request with max_tokens set."""
    params = pb.GenerationParams(max_tokens=MAX_TOKENS, **fields)
    return chat(content, params=params)


def capped_stream(content: str) -> pb.CompleteStreamRequest:
    """A streamed request with max_tokens set."""
    return chat_stream(content, params=pb.GenerationParams(max_tokens=MAX_TOKENS))


@pytest_asyncio.fixture
async def held() -> AsyncIterator[ScriptedUpstream]:
    """An upstream that holds every answer while its gate is cleared."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        yield fake


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def ledger(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ledger section: in memory, or in a real Redis under a prefix of its own."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": uuid.uuid4().hex}


async def outcome(call: Awaitable[Any]) -> Any:
    """The call's result, or the gRPC error it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc


async def streamed(gateway: RunningGateway, content: str, **kwargs: Any) -> list[Any]:
    """Every response of one CompleteStream call."""
    return [e async for e in gateway.stub.CompleteStream(capped_stream(content), **kwargs)]


def assert_budget_refused(error: Any, tenant: str = "default") -> None:
    """RESOURCE_EXHAUSTED with QuotaFailure on the tenant and RetryInfo until the reset."""
    assert isinstance(error, grpc.aio.AioRpcError), f"expected a refusal, got {error!r}"
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "reserved" in error.details()
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in rich_status(error).details)
    assert quota.violations[0].subject == f"tenant:{tenant}"
    assert 0 < (retry_delay_s(error) or 0) <= 86400


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until `predicate()` holds."""
    async with asyncio.timeout(_TIMEOUT_S):
        while not predicate():
            await asyncio.sleep(0.01)


async def nothing_reserved(gateway: RunningGateway, tenant: str = "default") -> None:
    """Wait until the gateway's ledger holds no reservation for `tenant`."""
    async with asyncio.timeout(_TIMEOUT_S):
        while await gateway.server.pipeline.ledger.reserved_usd(tenant, "day"):
            await asyncio.sleep(0.01)


async def test_concurrent_calls_past_the_budget_never_reach_the_upstream(
    held, start_gateway, ledger
):
    """Eight calls at once, unary and streamed, on room for three: three go upstream."""
    fits, calls = 3, 8
    contents = [f"call {letter}" for letter in "abcdefgh"]
    assert len({expected_cost_usd(c) for c in contents}) == 1
    gateway = await start_gateway(
        gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(fits)})
    )
    held.gate.clear()

    async def call(index: int) -> Any:
        if index % 2:
            return await outcome(streamed(gateway, contents[index]))
        return await outcome(gateway.stub.Complete(capped(contents[index])))

    tasks = [asyncio.create_task(call(i)) for i in range(calls)]
    first_done = asyncio.as_completed(tasks, timeout=_TIMEOUT_S)
    refusals = [await next_done for next_done in itertools.islice(first_done, calls - fits)]
    for refusal in refusals:
        assert_budget_refused(refusal)
    await held.wait_until(lambda: held.in_flight == fits)
    held.gate.set()
    results = await asyncio.gather(*tasks)
    assert sum(isinstance(r, grpc.aio.AioRpcError) for r in results) == calls - fits
    assert len(held.requests) == fits
    await nothing_reserved(gateway)
    assert (await gateway.stub.Complete(capped("call z"))).content


async def test_a_call_refused_for_what_calls_in_flight_hold_is_told_to_retry_in_a_second(
    held, start_gateway, ledger
):
    """Room for one call and a half: a second call, refused while the first holds the
    room, is told to retry in a second (`RetryInfo` and the pushback), not when the
    budget resets; once the first has ended, having spent less than it held, the retry
    passes.

    Before, it was told to wait until midnight UTC, with the pushback -1 (a wait past
    five minutes): a client obeying it gave up on a budget with room."""
    gateway = await start_gateway(
        gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(1.5)})
    )
    held.gate.clear()
    first = asyncio.ensure_future(gateway.stub.Complete(capped("call a")))
    await held.wait_until(lambda: held.in_flight == 1)
    refused = await outcome(gateway.stub.Complete(capped("call b")))
    assert_budget_refused(refused)
    assert retry_delay_s(refused) == 1.0
    assert dict(refused.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    held.gate.set()
    assert (await first).content
    await nothing_reserved(gateway)
    assert (await gateway.stub.Complete(capped("call b"))).content


def budget_checks(gateway: RunningGateway) -> list[bool]:
    """Each budget check its ledger makes from now on (on Redis, one script): granted or not."""
    ledger = gateway.server.pipeline.ledger
    reserve = ledger.reserve
    checks: list[bool] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reservation = await reserve(*args, **kwargs)
        checks.append(reservation.is_granted)
        return reservation

    ledger.reserve = counted  # type: ignore[method-assign]
    return checks


async def test_batch_items_held_by_a_siblings_reservation_wait_for_its_release_not_a_poll(
    held, start_gateway, ledger, monkeypatch
):
    """Three items with room for one at a time: the two refused for what the first holds
    check the budget again only as a reservation of their tenant's is released, the
    first's, then the next's: not every 0.1 s while the first runs (on Redis, a script
    each time), nor only once their retry (1 s, here made 30 s) comes."""
    monkeypatch.setattr(service.budgets, "CALLS_IN_FLIGHT_RETRY_S", 30.0)
    contents = ["call a", "call b", "call c"]
    gateway = await start_gateway(
        gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(1.5)})
    )
    checks = budget_checks(gateway)
    held.gate.clear()
    items = [pb.BatchItem(id=content, request=capped(content)) for content in contents]
    call = gateway.stub.CompleteBatch(
        pb.CompleteBatchRequest(items=items, concurrency=3), timeout=60
    )
    batch = asyncio.ensure_future(collect(call))
    await until(lambda: checks.count(False) == 2)
    await held.wait_until(lambda: held.in_flight == 1)
    await asyncio.sleep(0.5)  # five of the pauses they were polled at
    assert (checks.count(True), checks.count(False)) == (1, 2)
    held.gate.set()
    async with asyncio.timeout(_TIMEOUT_S):  # a third of their retry: woken by releases
        results, summary = await batch
    assert (summary.succeeded, summary.failed) == (3, 0)
    assert sorted(result.id for result in results) == contents
    # The first's release: both try, one passes; the second's: the last passes.
    assert (checks.count(True), checks.count(False)) == (3, 3)
    await nothing_reserved(gateway)


async def test_calls_without_max_tokens_hold_the_budgets_output_reserve(held, start_gateway):
    """With `reserve_output_tokens`, calls that set no max_tokens reserve that much output
    while they run: past the room for three, the next is refused before the upstream."""
    budget = {**budget_for(3), "reserve_output_tokens": MAX_TOKENS}
    gateway = await start_gateway(gateway_config(held.base_url, budgets={"default": budget}))
    held.gate.clear()
    running = [
        asyncio.create_task(outcome(gateway.stub.Complete(chat(f"call {letter}"))))
        for letter in "abc"
    ]
    await held.wait_until(lambda: held.in_flight == 3)
    assert_budget_refused(await outcome(gateway.stub.Complete(chat("call d"))))
    held.gate.set()
    assert all(not isinstance(r, grpc.aio.AioRpcError) for r in await asyncio.gather(*running))
    assert len(held.requests) == 3
    await nothing_reserved(gateway)


async def test_an_output_reserve_past_the_models_window_reserves_the_window(
    held, start_gateway, ledger
):
    """A `reserve_output_tokens` larger than the model's window (4,096) reserves what the
    window leaves beside the prompt, the longest answer the model can write: a call that
    fits the budget so passes.

    Before, it reserved the whole 100,000 tokens ($0.042) and was refused as a call that
    can never fit the $0.01 budget (pushback -1), though it can cost at most ~$0.0017."""
    budget = {"usd": 0.01, "period": "day", "reserve_output_tokens": 100_000}
    gateway = await start_gateway(
        gateway_config(held.base_url, ledger=ledger, budgets={"default": budget})
    )
    held.gate.clear()
    call = asyncio.create_task(outcome(gateway.stub.Complete(chat("call a"))))
    await held.wait_until(lambda: held.in_flight == 1)
    reserved = await gateway.server.pipeline.ledger.reserved_usd("default", "day")
    assert reserved == pytest.approx(cost_of_the_window_beside("call a"), abs=1e-12)
    held.gate.set()
    assert (await call).content
    await nothing_reserved(gateway)


def cost_of_the_window_beside(content: str) -> float:
    """What a call of one user message `content` without max_tokens can cost at most: its
    prompt as input and the rest of the model's window as output."""
    prompt = estimate_prompt_tokens((Message(Role.USER, content),))
    window = Usage(input_tokens=prompt, output_tokens=PRICE.context_window - prompt)
    return cost_usd(window, PRICE)


async def test_an_output_reserve_past_the_room_the_prompt_leaves_reserves_that_room(
    held, start_gateway
):
    """A prompt of about 3,000 of the window's 4,096 tokens leaves room for about 1,100
    tokens of answer: a reserve of 4,000 (within the window) reserves only that room, so
    a budget just big enough for the prompt and that room lets the call through.

    Before, the reserve was capped at the whole window, not what the prompt leaves of it:
    the call reserved its prompt and 4,000 tokens and was refused as one that can never
    fit the budget (pushback -1), though it cannot cost that much."""
    content = "word " * 3000
    fits_usd = cost_of_the_window_beside(content)
    budget = {"usd": fits_usd + 1e-7, "period": "day", "reserve_output_tokens": 4000}
    prompt = estimate_prompt_tokens((Message(Role.USER, content),))
    assert prompt + 4000 > PRICE.context_window
    assert cost_usd(Usage(input_tokens=prompt, output_tokens=4000), PRICE) > budget["usd"]
    gateway = await start_gateway(gateway_config(held.base_url, budgets={"default": budget}))
    assert (await gateway.stub.Complete(chat(content))).content
    assert len(held.requests) == 1


async def test_a_max_tokens_past_the_room_the_prompt_leaves_reserves_what_the_window_holds(
    held, start_gateway
):
    """The tenant's answers report half the estimated prompt tokens, so a prompt
    estimated at about 3,000 of the window's 4,096 tokens is fitted with max_tokens 2,000
    (about 1,650 calibrated). Prompt and answer share the window, so the call can cost
    no more than the dearer of: its prompt with the ~1,100 tokens it leaves as output,
    or 2,000 tokens of output beside the ~2,100 of prompt the window then leaves (the
    upstream counts it lower). It reserves that, and a budget just big enough lets it
    through.

    Before, it reserved its whole prompt and all 2,000 tokens as output, more than it can
    ever cost, and was refused as a call that can never fit the budget (pushback -1)."""
    content, max_tokens, window = "word " * 3000, 2000, PRICE.context_window
    prompt = estimate_prompt_tokens((Message(Role.USER, content),))
    assert prompt + max_tokens > window
    most_usd = max(
        cost_usd(Usage(input_tokens=prompt, output_tokens=window - prompt), PRICE),
        cost_usd(Usage(input_tokens=window - max_tokens, output_tokens=max_tokens), PRICE),
    )
    reported = round(0.5 * plain_estimate())
    spent_usd = 3 * cost_usd(Usage(input_tokens=reported, output_tokens=3), PRICE)
    budget = {"usd": spent_usd + most_usd + 1e-7, "period": "day"}
    uncapped = cost_usd(Usage(input_tokens=prompt, output_tokens=max_tokens), PRICE)
    assert spent_usd + uncapped > budget["usd"]
    gateway = await start_gateway(gateway_config(held.base_url, budgets={"default": budget}))
    await calibrate(gateway, held, ratio=0.5)
    held.gate.clear()
    params = pb.GenerationParams(max_tokens=max_tokens)
    call = asyncio.create_task(outcome(gateway.stub.Complete(chat(content, params=params))))
    await until(lambda: held.in_flight == 1 or call.done())
    assert not call.done(), await call  # refused before the upstream
    reserved = await gateway.server.pipeline.ledger.reserved_usd("default", "day")
    assert reserved == pytest.approx(most_usd, abs=1e-12)
    held.gate.set()
    assert (await call).content
    assert len(held.requests) == 4


async def cancel_unary(gateway: RunningGateway, held: ScriptedUpstream) -> None:
    """A unary call held upstream, then cancelled by its caller."""
    call = gateway.stub.Complete(capped("call a"))
    await held.wait_until(lambda: held.in_flight == 1)
    await asserting_the_next_call_is_refused(gateway)
    call.cancel()
    await held.wait_for_disconnect()


async def cancel_stream(gateway: RunningGateway, held: ScriptedUpstream) -> None:
    """A streamed call held upstream, then cancelled by its caller."""
    call = gateway.stub.CompleteStream(capped_stream("call a"))
    reading = asyncio.create_task(call.read())
    await held.wait_until(lambda: held.in_flight == 1)
    await asserting_the_next_call_is_refused(gateway)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):  # how grpc.aio ends a read it cancelled
        await reading
    await held.wait_for_disconnect()


async def succeed(gateway: RunningGateway, held: ScriptedUpstream) -> None:
    """A unary call held upstream, then answered."""
    call = asyncio.create_task(outcome(gateway.stub.Complete(capped("call a"))))
    await held.wait_until(lambda: held.in_flight == 1)
    await asserting_the_next_call_is_refused(gateway)
    held.gate.set()
    assert (await call).content


async def fail_upstream(gateway: RunningGateway, held: ScriptedUpstream) -> None:
    """A streamed call held upstream, then failed by it (503, no retry)."""
    held.script(Status(503))
    call = asyncio.create_task(outcome(streamed(gateway, "call a")))
    await held.wait_until(lambda: held.in_flight == 1)
    await asserting_the_next_call_is_refused(gateway)
    held.gate.set()
    assert (await call).code() is grpc.StatusCode.UNAVAILABLE


async def asserting_the_next_call_is_refused(gateway: RunningGateway) -> None:
    """While the first call is in flight its reservation leaves no room for another."""
    assert_budget_refused(await outcome(gateway.stub.Complete(capped("call b"))))


@pytest.mark.parametrize("end", [succeed, fail_upstream, cancel_unary, cancel_stream])
async def test_a_reservation_is_released_however_its_call_ends(held, start_gateway, ledger, end):
    """Success, upstream failure or the caller cancelling: the next call passes."""
    config = gateway_config(
        held.base_url,
        ledger=ledger,
        budgets={"default": budget_for(1.5)},
        resilience={"attempts": 1},
    )
    gateway = await start_gateway(config)
    held.gate.clear()
    await end(gateway, held)
    await nothing_reserved(gateway)
    held.gate.set()
    assert (await gateway.stub.Complete(capped("call c"))).content
    assert len(held.requests) == 2


async def test_a_shared_cache_flight_releases_after_its_first_caller_left(held, start_gateway):
    """The caller that started a flight cancels; the flight serves the other, then releases."""
    config = gateway_config(
        held.base_url, cache={"backend": "memory"}, budgets={"default": budget_for(1.5)}
    )
    gateway = await start_gateway(config)
    cache = gateway.server.pipeline.cache
    held.gate.clear()
    first = gateway.stub.Complete(capped("call a", temperature=0.0))
    await held.wait_until(lambda: held.in_flight == 1)
    second = asyncio.create_task(outcome(gateway.stub.Complete(capped("call a", temperature=0.0))))
    await until(lambda: cache.following == 2)
    await asserting_the_next_call_is_refused(gateway)
    first.cancel()
    await until(lambda: gateway.server.admission.in_flight == 1)  # the gateway let it go
    held.gate.set()
    answer = await second
    assert answer.metadata.cache_hit
    await nothing_reserved(gateway)
    assert (await gateway.stub.Complete(capped("call c"))).content
    assert len(held.requests) == 2


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_shared_flight_whose_first_caller_left_is_still_charged(held, start_gateway, kind):
    """The upstream's charge for a shared call is recorded once, for the caller's tenant,
    even when the caller that started it cancelled and only a follower (charged nothing,
    as a cache hit) got the answer."""
    gateway = await start_gateway(gateway_config(held.base_url, cache={"backend": "memory"}))
    stream_request = chat_stream("call a", params=pb.GenerationParams(temperature=0.0))
    metadata = await first_caller_leaves_a_shared_flight(
        gateway, held, capped("call a", temperature=0.0) if kind == "unary" else stream_request
    )
    assert metadata.cache_hit
    assert metadata.cost_usd == 0
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    async with asyncio.timeout(_TIMEOUT_S):
        while usage.total.requests < 2:  # the flight records after serving its follower
            await asyncio.sleep(0.01)
            usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == 2  # the flight's call and the follower's hit
    assert usage.total.cost_usd == pytest.approx(
        cost_usd(Usage(input_tokens=7, output_tokens=3), PRICE), abs=1e-12
    )
    assert len(held.requests) == 1


async def first_caller_leaves_a_shared_flight(
    gateway: RunningGateway,
    held: ScriptedUpstream,
    request: pb.CompleteRequest | pb.CompleteStreamRequest,
) -> pb.CompletionMetadata:
    """Two callers send `request` and share one upstream call, held until the first has
    cancelled; the follower's metadata (a stream's final message) once it is served."""
    held.gate.clear()
    is_unary = isinstance(request, pb.CompleteRequest)

    def call() -> Any:  # gRPC starts a call as soon as it is made
        return (gateway.stub.Complete if is_unary else gateway.stub.CompleteStream)(request)

    first = call()
    first_read = asyncio.create_task(outcome(first if is_unary else first.read()))
    await held.wait_until(lambda: held.in_flight == 1)
    follower = call()
    second = asyncio.create_task(outcome(follower if is_unary else _final_of(follower)))
    await until(lambda: gateway.server.pipeline.cache.following == 2)
    first.cancel()
    await until(lambda: gateway.server.admission.in_flight == 1)  # the gateway let it go
    held.gate.set()
    answer = await second
    first_read.cancel()
    return answer.metadata if is_unary else answer


async def _final_of(call: Any) -> Any:
    """The final message of a CompleteStream call."""
    items = [item async for item in call]
    return items[-1].final


@pytest.mark.redis
async def test_replicas_on_one_redis_see_each_others_reservations(
    held,
    start_gateway,
    redis_url,  # noqa: F811
):
    """A call in flight on one gateway leaves no room on the other until it is recorded."""
    ledger = {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    config = gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(1.5)})
    first, second = await start_gateway(config), await start_gateway(config)
    held.gate.clear()
    call = asyncio.create_task(outcome(first.stub.Complete(capped("call a"))))
    await held.wait_until(lambda: held.in_flight == 1)
    assert_budget_refused(await outcome(second.stub.Complete(capped("call b"))))
    assert_budget_refused(await outcome(streamed(second, "call b")))
    held.gate.set()
    assert (await call).content
    assert (await second.stub.Complete(capped("call c"))).content
    assert len(held.requests) == 2


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_call_running_past_its_reservations_ttl_still_holds_it(
    held,
    start_gateway,
    redis_url,  # noqa: F811
    monkeypatch,
    kind,
):
    """A call that runs longer than its reservation's TTL (a long stream, a paced batch)
    has it renewed as it goes: the budget still counts it, on any replica, until it ends.

    Before, a reservation was never renewed: it stopped counting after its TTL (15
    minutes) while its call still ran, and other calls could pass the budget."""
    use_short_leases(monkeypatch, 1)
    ledger = {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    config = gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(1.5)})
    first, second = await start_gateway(config), await start_gateway(config)
    held.gate.clear()
    if kind == "unary":
        call = asyncio.create_task(outcome(first.stub.Complete(capped("call a"))))
    else:
        call = asyncio.create_task(outcome(streamed(first, "call a")))
    await held.wait_until(lambda: held.in_flight == 1)
    await asyncio.sleep(2.5)  # past the 1 s TTL: renewed every third of it
    assert_budget_refused(await outcome(second.stub.Complete(capped("call b"))))
    held.gate.set()
    assert not isinstance(await call, grpc.aio.AioRpcError)
    await nothing_reserved(first)
    assert (await second.stub.Complete(capped("call c"))).content
    assert len(held.requests) == 2


@pytest.mark.redis
async def test_a_replica_whose_clock_runs_ahead_still_sees_the_others_reservations(
    held,
    start_gateway,
    redis_url,  # noqa: F811
):
    """A replica whose clock runs a lease's TTL ahead of another's still counts that one's
    call in flight: leases expire on Redis's clock, not on the reserving replica's.

    Before, each replica swept the leases older than its own "now" minus the TTL, so the
    fast one dropped the slow one's reservation and let a second call past the budget."""
    ledger = {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    config = gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(1.5)})
    ahead_s = RESERVATION_TTL_S + 60
    # Both clocks run from noon of the 15th, so that the fast one's day and month are the
    # slow one's at any real time (near midnight it would budget the next day's).
    started, noon = time.time(), dt.datetime.now(dt.UTC).replace(day=15, hour=12).timestamp()
    first = await start_gateway(config, wall_clock=lambda: noon + time.time() - started)
    second = await start_gateway(config, wall_clock=lambda: noon + time.time() - started + ahead_s)
    held.gate.clear()
    call = asyncio.create_task(outcome(first.stub.Complete(capped("call a"))))
    await held.wait_until(lambda: held.in_flight == 1)
    assert_budget_refused(await outcome(second.stub.Complete(capped("call b"))))
    held.gate.set()
    assert (await call).content
    assert len(held.requests) == 1


async def test_one_tenants_reservations_never_limit_another(held, start_gateway, ledger):
    """team-a's call in flight fills team-a's budget only; team-b's call goes upstream."""
    config = secure_config(held.base_url, ledger=ledger, budgets={"*": budget_for(1.5)})
    gateway = await start_gateway(config)
    held.gate.clear()
    team_a = asyncio.create_task(
        outcome(gateway.stub.Complete(capped("call a"), metadata=as_tenant("team-a")))
    )
    await held.wait_until(lambda: held.in_flight == 1)
    team_b = asyncio.create_task(
        outcome(gateway.stub.Complete(capped("call b"), metadata=as_tenant("team-b")))
    )
    await held.wait_until(lambda: held.in_flight == 2)
    refused = await outcome(gateway.stub.Complete(capped("call c"), metadata=as_tenant("team-a")))
    assert_budget_refused(refused, tenant="team-a")
    held.gate.set()
    assert (await team_a).content
    assert (await team_b).content


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_shared_flight_whose_first_caller_left_is_recorded_before_it_is_released(
    held,
    start_gateway,
    redis_url,  # noqa: F811
    kind,
):
    """The flight records the call of a caller that left, then releases its reservation:
    in the other order, for the round trip between the two, a Redis budget counted the
    call as neither spent nor reserved, and another replica's call could pass on it."""
    ledger = {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    config = gateway_config(
        held.base_url,
        ledger=ledger,
        cache={"backend": "memory"},
        budgets={"default": budget_for(2)},
    )
    gateway = await start_gateway(config)
    watcher = aioredis.Redis.from_url(redis_url, decode_responses=True)
    watching_from = asyncio.Event()
    seen: list[str] = []  # the ledger's scripts in the order Redis ran them (or NOSCRIPT)

    async def watch() -> None:
        async with watcher.monitor() as monitor:
            watching_from.set()
            async for command in monitor.listen():
                words = command["command"].split()
                if words[0] != "EVALSHA":
                    continue
                if words[3].startswith(f"{ledger['key_prefix']}:row:"):  # KEYS[1]: the row
                    seen.append("record")
                elif words[2] == "3":  # KEYS: reserved, its millions, leases
                    seen.append("release")

    watching = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(watching_from.wait(), _TIMEOUT_S)
        stream_request = chat_stream(
            "call a", params=pb.GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)
        )
        metadata = await first_caller_leaves_a_shared_flight(
            gateway, held, capped("call a", temperature=0.0) if kind == "unary" else stream_request
        )
        assert metadata.cache_hit
        await nothing_reserved(gateway)
        async with asyncio.timeout(_TIMEOUT_S):  # the flight's call and the follower's hit
            while (await gateway.stub.GetUsage(pb.GetUsageRequest())).total.requests < 2:
                await asyncio.sleep(0.01)
    finally:
        watching.cancel()
        await asyncio.wait([watching])
        await watcher.aclose()
    assert seen.index("record") < seen.index("release"), seen


class _GatedPerCall(ScriptedUpstream):
    """Holds each request until the gate named by its user text is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gates: dict[str, asyncio.Event] = {}

    async def _play(self, request: Any, body: dict[str, Any], behaviour: Any) -> Any:
        await self.gates.setdefault(user_text(body), asyncio.Event()).wait()
        return await super()._play(request, body, behaviour)


async def test_a_call_reserving_nothing_survives_another_ending_first(start_gateway):
    """A priced model with free input, called without max_tokens, reserves $0 against the
    budget; a dearer call of the tenant's that starts after it and ends before it must
    not leave it nothing to give back: both are answered, and nothing stays reserved."""
    free_input = {"context_window": 4096, "input_usd_per_million": 0.0,
                  "output_usd_per_million": PRICE.output_usd_per_million}  # fmt: skip
    async with _GatedPerCall(models=(FAKE_MODEL,)) as upstream:
        gateway = await start_gateway(
            gateway_config(
                upstream.base_url,
                models={FAKE_MODEL: free_input},
                budgets={"default": budget_for(3)},
            )
        )
        cheap = asyncio.create_task(outcome(gateway.stub.Complete(chat("free prompt"))))
        await until(lambda: "free prompt" in upstream.gates)
        dear = asyncio.create_task(outcome(gateway.stub.Complete(capped("dear prompt"))))
        await until(lambda: "dear prompt" in upstream.gates)
        assert await gateway.server.pipeline.ledger.reserved_usd("default", "day") > 0
        upstream.gates["dear prompt"].set()
        assert (await dear).content
        upstream.gates["free prompt"].set()
        answer = await cheap
        assert not isinstance(answer, grpc.aio.AioRpcError), answer
        assert answer.content
        await nothing_reserved(gateway)


class SettableClock:
    """Epoch time that moves only when a test sets it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_call_straddling_midnight_is_spent_in_the_period_it_was_admitted_in(
    held, start_gateway, ledger, kind
):
    """A call admitted a second before midnight UTC on a month's last day, and answered a
    second after it, reserved against the old day and month: its cost is spent there, and
    the new day and month start with nothing spent or reserved. Its usage row is the
    hour it ended in, as GetUsage shows.

    Before, its cost was added to the new day and month, where nothing was reserved for
    it, while the old period's reservation was released."""
    midnight = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    clock = SettableClock(midnight.timestamp() - 1)
    gateway = await start_gateway(
        gateway_config(held.base_url, ledger=ledger, budgets={"default": budget_for(3)}),
        wall_clock=clock,
    )
    held.gate.clear()
    if kind == "unary":
        call = asyncio.create_task(outcome(gateway.stub.Complete(capped("call a"))))
    else:
        call = asyncio.create_task(outcome(streamed(gateway, "call a")))
    await held.wait_until(lambda: held.in_flight == 1)
    clock.now = midnight.timestamp() + 1
    held.gate.set()
    answer = await call
    assert not isinstance(answer, grpc.aio.AioRpcError), answer
    cost = (answer.metadata if kind == "unary" else answer[-1].final).cost_usd
    assert cost > 0
    ledger_ = gateway.server.pipeline.ledger
    await nothing_reserved(gateway)
    for period in ("day", "month"):
        assert await ledger_.spent_usd("default", period) == 0
    clock.now = midnight.timestamp() - 1
    for period in ("day", "month"):
        assert await ledger_.spent_usd("default", period) == pytest.approx(cost, abs=1e-12)
    since_midnight = pb.GetUsageRequest()
    since_midnight.start_time.FromDatetime(midnight)
    assert (await gateway.stub.GetUsage(since_midnight)).total.requests == 1


@pytest.mark.parametrize(("room", "is_admitted"), [(1.2, False), (1.5, True)])
async def test_a_call_reserves_its_prompt_as_its_tenants_calibration_counts_it(
    upstream: FakeUpstream, start_gateway: Any, room: float, is_admitted: bool
) -> None:
    """The tenant's answers report 1.3 times the estimated prompt tokens, and its budget
    has room left for `room` prompts at the plain estimate (no max_tokens: the prompt
    is all a call reserves). Room for 1.2 is refused before any upstream call, as the
    upstream would bill about 1.3 (before, it passed, and its bill took the tenant past
    its budget); room for 1.5 passes."""
    reported = round(1.3 * plain_estimate())
    spent_usd = 3 * cost_usd(Usage(input_tokens=reported, output_tokens=3), PRICE)
    room_usd = room * cost_usd(Usage(input_tokens=plain_estimate(), output_tokens=0), PRICE)
    budgets = {"default": {"usd": spent_usd + room_usd, "period": "day"}}
    gateway = await start_gateway(gateway_config(upstream.base_url, budgets=budgets))
    await calibrate(gateway, upstream, ratio=1.3)
    result = await outcome(gateway.stub.Complete(chat(CALIBRATED), timeout=_TIMEOUT_S))
    if is_admitted:
        assert isinstance(result, pb.CompleteResponse), result
        assert len(upstream.requests) == 4
        return
    assert isinstance(result, grpc.aio.AioRpcError), f"expected a refusal, got {result!r}"
    assert result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert result.details().startswith("tenant 'default' has spent")
    assert len(upstream.requests) == 3


async def test_an_upstreams_token_limit_counts_a_prompt_as_its_tenants_calibration_does(
    upstream: FakeUpstream, start_gateway: Any
) -> None:
    """The tenant's answers report 1.3 times the estimated prompt tokens, and the
    upstream's `tokens_per_minute` has room left for its next prompt at the plain
    estimate, not at the calibrated one: the call is refused before it is sent, as the
    provider would count about 1.3 times (before, it was sent on the plain estimate, and
    the tenant took about 30 % more of the provider's tokens than configured)."""
    one_token = pb.GenerationParams(max_tokens=1)  # so a call takes its prompt and 1
    plain = plain_estimate() + 1
    # Three calibrating calls at the plain estimate, then room for one more and 4 to spare
    # (the bucket refills about 5 tokens a second): the calibrated one takes 31 more.
    config = gateway_config(upstream.base_url, resilience={"max_limit_wait_s": 0})
    config = dataclass_replace_upstream(config, tokens_per_minute=4 * plain + 4)
    gateway = await start_gateway(config)
    reported = round(1.3 * plain_estimate())
    upstream.script(*[Reply(prompt_tokens=reported, completion_tokens=1)] * 3)
    for _ in range(3):
        await gateway.stub.Complete(chat(CALIBRATED, params=one_token), timeout=_TIMEOUT_S)
    assert calibrated_estimate(gateway) + 1 > plain + 4 + 5 * 5  # over 5 s of refill too
    result = await outcome(gateway.stub.Complete(chat(CALIBRATED, params=one_token)))
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(upstream.requests) == 3


async def test_reservations_past_2_63_pico_dollars_are_held_and_released(
    held, start_gateway, ledger
):
    """A budget of $25 billion and calls without max_tokens reserving 10^12 output tokens
    at $10,000 a million, $10 billion each: two are held at once, the third is refused
    for what they hold, and once they end nothing is held.

    Before, Redis could not add $10 billion (10^22 pico-dollars) to its 64-bit total of
    reservations: the script failed, the budget failed open, and every call passed with
    nothing held."""
    price = {"input_usd_per_million": 0.14, "output_usd_per_million": 10_000.0}
    # A window as large as the reserve: a reserve is held to its model's window.
    models = {FAKE_MODEL: {"context_window": 2 * 10**12, **price}}
    budgets = {"default": {"usd": 25e9, "period": "day", "reserve_output_tokens": 10**12}}
    gateway = await start_gateway(
        gateway_config(held.base_url, models=models, ledger=ledger, budgets=budgets)
    )
    held.gate.clear()
    first = [asyncio.ensure_future(gateway.stub.Complete(chat(f"call {i}"))) for i in "ab"]
    await held.wait_until(lambda: held.in_flight == 2)
    ledger_of = gateway.server.pipeline.ledger
    reserved = await ledger_of.reserved_usd("default", "day")
    assert round(reserved / 1e10, 6) == 2.0  # and their prompts' few pico-dollars
    refused = await outcome(gateway.stub.Complete(chat("call c")))
    assert_budget_refused(refused)
    assert retry_delay_s(refused) == 1.0  # held by calls in flight, not spent
    held.gate.set()
    for call in first:
        assert (await call).content
    await nothing_reserved(gateway)


async def test_a_refusal_for_the_calls_own_cost_names_that_cost(upstream, start_gateway):
    """A tenant that has spent half a percent of its budget is refused a call whose
    `max_tokens` would take it past the limit: the refusal names what that call is
    expected to cost, so the caller sees why (and that a smaller `max_tokens` passes).

    Before, it said only "has spent $0.016000 of its $3.010000 daily budget", which read
    as a refusal with almost the whole budget left."""
    price = ModelConfig(
        context_window=4096, input_usd_per_million=1000.0, output_usd_per_million=3000.0
    )
    models = {
        FAKE_MODEL: {
            "context_window": price.context_window,
            "input_usd_per_million": price.input_usd_per_million,
            "output_usd_per_million": price.output_usd_per_million,
        }
    }
    budgets = {"default": {"usd": 3.01, "period": "day"}}
    gateway = await start_gateway(gateway_config(upstream.base_url, models=models, budgets=budgets))
    assert (await gateway.stub.Complete(chat("call a"))).metadata.cost_usd == 0.016
    prompt = estimate_prompt_tokens((Message(Role.USER, "call b"),))
    expected = cost_usd(Usage(input_tokens=prompt, output_tokens=MAX_TOKENS), price)
    refused = await outcome(gateway.stub.Complete(capped("call b")))
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.details() or "").startswith(
        "tenant 'default' has spent $0.016000 of its $3.010000 daily budget"
    )
    assert f"this call is expected to cost ${expected:.6f}" in (refused.details() or "")
