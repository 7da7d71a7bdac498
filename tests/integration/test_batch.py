"""CompleteBatch through the real server: streaming results, isolation, bounds, cancellation."""

import asyncio
import dataclasses
import gc
import logging

import grpc
import pytest
from google.rpc import error_details_pb2

import service.pipeline
import service.servicer
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from service.auth import hash_key
from service.config import parse_config
from tests.conftest import (
    FAKE_MODEL,
    chat,
    fake_model_window,
    gateway_config,
    gateway_config_data,
)
from tests.fake_upstream import FakeUpstream, Hang, Reply, Status
from tests.scripted_upstream import ScriptedUpstream, user_text
from tests.secret_capture import CALLER_KEY_A

# An OpenAI-style 400 saying why.
REFUSAL = '{"error": {"message": "Unsupported value: \'seed\'", "param": "seed", "code": "x"}}'


@pytest.fixture
async def scripted():
    """An upstream that answers by the prompt: 'fail' → 500, 'reject' → 400, 'refuse' → 400
    saying why, 'slow' → 0.3 s."""

    def respond(body):
        text = user_text(body)
        if text.startswith("fail"):
            return Status(500)
        if text.startswith("refuse"):
            return Status(400, body=REFUSAL)
        if text.startswith("reject"):
            return Status(400)
        if text.startswith("slow"):
            return Reply(content=f"answer to {text}", delay_s=0.3)
        if text.startswith("hang"):
            return Hang()
        return Reply(content=f"answer to {text}", delay_s=0.02)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        yield fake


@pytest.fixture
async def batch_gateway(scripted, start_gateway):
    """The gateway in front of the scripted upstream."""
    return await start_gateway(gateway_config(scripted.base_url))


def batch(*prompts: str, concurrency: int = 0) -> pb.CompleteBatchRequest:
    """A batch with ids item-0, item-1, ... for the prompts."""
    return pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(p)) for i, p in enumerate(prompts)],
        concurrency=concurrency,
    )


async def collect(call) -> tuple[list[pb.BatchItemResult], pb.BatchSummary]:
    """All results of a batch call, and its summary (which must come last)."""
    events = [event async for event in call]
    assert events[-1].HasField("summary")
    assert all(event.HasField("result") for event in events[:-1])
    return [event.result for event in events[:-1]], events[-1].summary


async def test_an_item_that_waited_for_its_tenants_slot_says_so(start_gateway):
    """Each item of a batch takes one of its tenant's `max_concurrent_calls` (here 1): its
    second item waits for the first to finish, and reports that wait as `queued_ms`, within its
    `total_ms` and apart from its `upstream_ms`. Before, its timings began when its turn
    came: the wait showed nowhere."""
    async with FakeUpstream() as fake:
        fake.script(Reply(delay_s=0.5), Reply())
        config = gateway_config(fake.base_url, tenants={"*": {"max_concurrent_calls": 1}})
        gateway = await start_gateway(config)
        results, summary = await collect(gateway.stub.CompleteBatch(batch("a", "b", concurrency=2)))
    assert summary.succeeded == 2
    first, second = (r.response.metadata.timings for r in sorted(results, key=lambda r: r.index))
    assert first.queued_ms < second.queued_ms
    assert second.queued_ms > second.upstream_ms  # the first's 0.5 s against its own answer
    assert second.total_ms >= second.queued_ms + second.upstream_ms
    assert second.time_to_first_token_ms >= second.queued_ms


async def test_an_item_of_a_batch_queued_for_admission_counts_that_wait(start_gateway):
    """A batch that waited in line for admission (`server.max_queued_calls`) kept its
    items waiting with it: each counts that wait in its `total_ms` and `queued_ms`, as a
    single call does, and the summary's `wall_ms` counts from the call's arrival too, so it
    is never less than its one item's `total_ms`. Before, an item's timings began when the
    batch was admitted and its `queued_ms` was 0 however long the batch stood in line; and
    the wall time began when the items started: the batch took less than its only item."""
    delay_s = 0.4
    async with FakeUpstream(default=Reply(delay_s=delay_s)) as fake:
        config = gateway_config(
            fake.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 1}
        )
        gateway = await start_gateway(config)
        first = asyncio.ensure_future(gateway.stub.Complete(chat("first")))
        async with asyncio.timeout(5):  # the first call holds the only slot
            while not fake.requests:
                await asyncio.sleep(0.01)
        results, summary = await collect(gateway.stub.CompleteBatch(batch("queued")))
        await first
    assert summary.succeeded == 1
    timings = results[0].response.metadata.timings
    # It stood in line for most of the first call's upstream wait (its own is a few µs).
    assert timings.queued_ms >= delay_s * 500
    assert timings.total_ms >= timings.upstream_ms + timings.queued_ms
    assert summary.wall_ms >= timings.total_ms


async def test_an_item_the_upstream_refuses_says_why(batch_gateway):
    """An item the upstream refuses carries what it said, as a refused Complete does."""
    results, summary = await collect(batch_gateway.stub.CompleteBatch(batch("ok", "refuse")))
    refused = {r.id: r for r in results}["item-1"].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (
        refused.message
        == "upstream 'up0' rejected the request (HTTP 400): Unsupported value: 'seed'"
    )
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in refused.details)
    assert (info.metadata["upstream_message"], info.metadata["upstream_param"]) == (
        "Unsupported value: 'seed'",
        "seed",
    )
    assert (summary.succeeded, summary.failed) == (1, 1)


async def test_mixed_successes_and_failures(batch_gateway):
    """Failures are per item with their own status; the others succeed; the summary adds up."""
    prompts = ["ok a", "fail b", "ok c", "reject d", "ok e", "fail f", "ok g"]
    bad_role = pb.BatchItem(
        id="bad-role",
        request=pb.CompleteRequest(model=FAKE_MODEL, messages=[pb.Message(role=9, content="x")]),
    )
    unknown_model = pb.BatchItem(id="no-model", request=chat("ok", model="nope"))
    request = batch(*prompts, concurrency=3)
    request.items.extend([bad_role, unknown_model])
    results, summary = await collect(batch_gateway.stub.CompleteBatch(request))
    assert sorted(r.index for r in results) == list(range(9))
    by_id = {r.id: r for r in results}
    assert len(by_id) == 9
    for i, prompt in enumerate(prompts):
        result = by_id[f"item-{i}"]
        assert result.index == i
        if prompt.startswith("ok"):
            assert result.response.content == f"answer to {prompt}"
            assert result.response.metadata.usage.input_tokens == 7
        elif prompt.startswith("fail"):
            assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        else:
            assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    role_error = by_id["bad-role"].error
    assert role_error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = error_details_pb2.BadRequest()
    assert role_error.details[0].Unpack(violations)
    assert violations.field_violations[0].field == "messages[0].role"
    assert by_id["no-model"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert (summary.succeeded, summary.failed) == (4, 5)
    assert summary.usage.input_tokens == 4 * 7
    assert summary.usage.output_tokens == 4 * 3
    assert summary.cost_usd == pytest.approx(4 * (7 * 0.14 + 3 * 0.42) / 1e6)
    assert summary.wall_ms > 0


async def test_results_stream_as_they_finish(batch_gateway):
    """A slow first item does not hold back the fast ones: results come in finishing order."""
    results, _ = await collect(
        batch_gateway.stub.CompleteBatch(batch("slow", "ok 1", "ok 2", "ok 3", concurrency=4))
    )
    assert [r.index for r in results][-1] == 0
    assert results[-1].response.content == "answer to slow"


async def test_concurrency_is_bounded(batch_gateway, scripted):
    """No more than `concurrency` upstream requests are ever in flight for one batch."""
    _, summary = await collect(
        batch_gateway.stub.CompleteBatch(batch(*(f"ok {i}" for i in range(24)), concurrency=4))
    )
    assert summary.succeeded == 24
    assert 2 <= scripted.peak_in_flight <= 4


def limited_gateway_config(base_url: str, **resilience: object):
    """A gateway whose one upstream takes 2 calls at a time, waited for at most 0.2 s."""
    config = gateway_config(base_url, resilience={"max_limit_wait_s": 0.2, **resilience})
    upstream = dataclasses.replace(config.upstreams[0], max_concurrency=2, max_connections=2)
    return dataclasses.replace(config, upstreams=(upstream,))


async def test_items_past_an_upstreams_concurrency_wait_their_turn(scripted, start_gateway):
    """Six slow items at concurrency 6 against an upstream that takes 2 at a time: each
    waits its turn (its deadline allowing), as under a tenant's limits, rather than fail
    RESOURCE_EXHAUSTED once `max_limit_wait_s` passed, as a unary call would."""
    gateway = await start_gateway(limited_gateway_config(scripted.base_url))
    results, summary = await collect(
        gateway.stub.CompleteBatch(batch(*(f"slow {i}" for i in range(6)), concurrency=6))
    )
    assert (summary.succeeded, summary.failed) == (6, 0)
    assert sorted(r.response.content for r in results) == [f"answer to slow {i}" for i in range(6)]
    assert scripted.peak_in_flight == 2
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await asyncio.gather(*(gateway.stub.Complete(chat(f"slow {i}")) for i in range(3)))
    assert unary.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_an_item_whose_turn_comes_after_the_deadline_is_refused_at_once(start_gateway):
    """An upstream paused for longer than the batch's deadline (its 429's Retry-After):
    each item is refused with the limit's RESOURCE_EXHAUSTED and its wait, not held until
    the deadline cuts the whole call."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        gateway = await start_gateway(limited_gateway_config(fake.base_url, attempts=1))
        fake.script(Status(429, headers={"Retry-After": "30"}))
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("paused"))
        results, summary = await collect(
            gateway.stub.CompleteBatch(batch("ok a", "ok b"), timeout=10)
        )
    assert (summary.succeeded, summary.failed) == (0, 2)
    assert {r.error.code for r in results} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert len(fake.requests) == 1


async def test_an_item_whose_failure_opened_the_breaker_waits_its_cool_down(start_gateway):
    """An item's 500 opens its only upstream's breaker: the item tries again once the
    cool-down lets a probe through, its deadline outlasting it, as it waits for a restart;
    the probe's answer is its result. Before, it failed with the 500 at once."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        fake.script(Status(500))
        # Two tries an item (`resilience.attempts`); the call's own retry is kept off.
        breaker = {"attempts": 2, "breaker_consecutive_failures": 1, "breaker_cool_down_s": 0.5}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=breaker))
        results, summary = await collect(gateway.stub.CompleteBatch(batch("a"), timeout=10))
    assert (summary.succeeded, summary.failed) == (1, 0)
    assert results[0].response.content == "Hello from fake"
    assert len(fake.requests) == 2


async def test_items_a_budget_refuses_for_their_siblings_holds_wait_their_turn(
    scripted, start_gateway
):
    """Six items whose `max_tokens` each reserve almost half the tenant's budget, though
    they spend a tiny part of it: an item refused only for what the items running beside
    it hold waits for them to end, as under an upstream's limits. Before, four of the six
    failed RESOURCE_EXHAUSTED with a 1 s retry, on every run of the batch."""
    gateway = await start_gateway(
        gateway_config(scripted.base_url, budgets={"default": {"usd": 0.001, "period": "day"}})
    )
    request = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(
                id=f"item-{i}",
                request=chat(f"ok {i}", params=pb.GenerationParams(max_tokens=1000)),
            )
            for i in range(6)
        ],
        concurrency=6,
    )
    results, summary = await collect(gateway.stub.CompleteBatch(request, timeout=30))
    assert [r.WhichOneof("outcome") for r in results] == ["response"] * 6
    assert (summary.succeeded, summary.failed) == (6, 0)
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == 6
    assert usage.total.cost_usd == pytest.approx(summary.cost_usd)


async def test_cancelling_the_call_cancels_outstanding_upstream_requests(batch_gateway, scripted):
    """Cancelling a batch closes every upstream request in flight and starts no new one."""
    call = batch_gateway.stub.CompleteBatch(batch(*(f"hang {i}" for i in range(20)), concurrency=5))
    await scripted.wait_until(lambda: scripted.in_flight == 5)
    call.cancel()
    for _ in range(5):
        await scripted.wait_for_disconnect(timeout_s=10)
    await scripted.wait_until(lambda: scripted.in_flight == 0)
    assert len(scripted.requests) == 5
    assert scripted.disconnects == 5
    # The gateway is still healthy and serves the next call.
    response = await batch_gateway.stub.Complete(chat("ok after"))
    assert response.content == "answer to ok after"
    assert len(scripted.requests) == 6


async def test_cancelling_after_a_result_closes_the_batch_cleanly(batch_gateway, scripted, caplog):
    """A caller leaving while results are being sent ends the batch with no error logged."""
    for attempt in range(3):
        prompts = (f"ok {attempt} {i}" for i in range(40))
        call = batch_gateway.stub.CompleteBatch(batch(*prompts, concurrency=40))
        await anext(aiter(call))
        # Forty answers come at once: the server is still writing the others.
        call.cancel()
    await scripted.wait_until(lambda: scripted.in_flight == 0)
    await asyncio.sleep(0.2)
    gc.collect()  # a failed close is only reported when its task is collected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_empty_batch_has_only_a_summary(batch_gateway):
    """A batch without items answers with a zero summary."""
    events = [e async for e in batch_gateway.stub.CompleteBatch(pb.CompleteBatchRequest())]
    assert len(events) == 1
    assert (events[0].summary.succeeded, events[0].summary.failed) == (0, 0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (batch("ok", concurrency=1000), "concurrency"),
        (
            pb.CompleteBatchRequest(
                items=[
                    pb.BatchItem(id="same", request=chat()),
                    pb.BatchItem(id="same", request=chat()),
                ]
            ),
            "items[1].id",
        ),
    ],
)
async def test_whole_batch_problems_are_invalid_argument(batch_gateway, scripted, request_, field):
    """Problems of the batch itself refuse the call before any upstream work."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(batch_gateway.stub.CompleteBatch(request_))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).field_violations[0][0] == field
    assert scripted.requests == []


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param("line\nbreak", id="newline"),
        pytest.param("nul\x00", id="control"),
        pytest.param("zero\u200bwidth", id="zero-width"),
        pytest.param("x" * 257, id="too-long"),
        pytest.param("x" * 1_000_000, id="a-megabyte"),
    ],
)
async def test_an_item_id_that_is_not_one_printable_line_refuses_the_batch(
    batch_gateway, scripted, bad_id
):
    """An item id is held to an idempotency key's rule (printable, at most 256
    characters): the call is INVALID_ARGUMENT naming `items[i].id`, before any item runs.

    Before, any text was taken and sent back in the item's result.
    """
    request = batch("ok a", "ok b", "ok c")
    request.items[1].id = bad_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(batch_gateway.stub.CompleteBatch(request))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error_details(caught.value).field_violations) == [
        ("items[1].id", "must be printable, at most 256 characters")
    ]
    assert scripted.requests == []


async def test_an_item_id_of_256_printable_characters_is_taken(batch_gateway):
    """Any printable text up to the limit is an id, in any script, spaces included."""
    item_id = ("ünïcödé id 名前 " * 20)[:256]
    request = batch("ok a")
    request.items[0].id = item_id
    results, summary = await collect(batch_gateway.stub.CompleteBatch(request))
    assert [r.id for r in results] == [item_id]
    assert summary.succeeded == 1


async def test_too_many_items(scripted, start_gateway):
    """More items than batch.max_items is refused."""
    gateway = await start_gateway(gateway_config(scripted.base_url, batch={"max_items": 3}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(gateway.stub.CompleteBatch(batch("a", "b", "c", "d")))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 3 items" in error_details(caught.value).field_violations[0][1]


async def test_a_batch_of_long_items_is_read_a_turn_of_the_event_loop_at_a_time(
    batch_gateway, scripted, monkeypatch
):
    """Twenty items of 1,000 messages each (each within `defaults.max_messages`) are
    converted with the event loop turning between every two of them: other calls run.

    Before, every item was converted in one go before the first could start: 900 such
    items (3.6 MB, under the receive limit) held the event loop for seconds, with every
    other call on the gateway stalled meanwhile."""
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    turns_at_conversion = []
    convert = service.servicer.chat_request_from_proto

    def noting(*args, **kwargs):
        turns_at_conversion.append(turns)
        return convert(*args, **kwargs)

    monkeypatch.setattr(service.servicer, "chat_request_from_proto", noting)
    # Empty messages: each item fails alone, on its content, before any upstream call.
    long_item = pb.CompleteRequest(
        model=FAKE_MODEL, messages=[pb.Message(role=pb.ROLE_USER)] * 1000
    )
    request = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=long_item) for i in range(20)]
    )
    ticker = asyncio.create_task(count_turns())
    try:
        results, summary = await collect(batch_gateway.stub.CompleteBatch(request))
    finally:
        ticker.cancel()
    assert (len(results), summary.failed) == (20, 20)
    assert len(turns_at_conversion) == 20
    assert len(set(turns_at_conversion)) == 20  # the loop turned between every two
    assert scripted.requests == []


async def test_a_batch_of_far_too_many_items_is_refused_before_any_is_read(
    scripted, start_gateway, monkeypatch
):
    """Half a million empty items (1 MB, well under the receive limit) are refused on
    `items` by their count alone, over `batch.max_items`, before any item is converted.

    Before, every item was converted and checked first, some 10 s on the event loop,
    with every other call on the gateway stalled meanwhile (4 MB of them: half a
    minute)."""
    converted = []
    convert = service.servicer.chat_request_from_proto

    def counting(*args, **kwargs):
        converted.append(1)
        return convert(*args, **kwargs)

    monkeypatch.setattr(service.servicer, "chat_request_from_proto", counting)
    gateway = await start_gateway(gateway_config(scripted.base_url, batch={"max_items": 3}))
    call = gateway.channel.unary_stream(
        "/llmgateway.v1.CompletionService/CompleteBatch",
        request_serializer=lambda data: data,
        response_deserializer=pb.CompleteBatchResponse.FromString,
    )
    empty_items = b"\x0a\x00" * 500_000  # field 1 (items): an empty BatchItem, each time
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call(empty_items, timeout=60))
    assert converted == []
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = error_details(caught.value).field_violations
    assert violation[0] == "items"
    assert "at most 3 items, got 500000" in violation[1]
    assert scripted.requests == []


async def test_an_item_failing_lets_the_items_in_flight_finish_and_be_cached(start_gateway):
    """As a Summarize part's siblings now do, a failing item's siblings in flight run to
    their end: answered in full, billed once as reported and cached, so the batch run
    again once the item is mended sends only that item."""
    broken = [True]

    def respond(body):
        text = user_text(body)
        if text == "fail" and broken:
            return Status(500)
        return Reply(content=f"answer to {text}", delay_s=0.2)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(gateway_config(upstream.base_url, resilience={"attempts": 1}))
        prompts = ("slow a", "fail", "slow b")
        request = pb.CompleteBatchRequest(
            items=[
                pb.BatchItem(id=p, request=chat(p, params=pb.GenerationParams(temperature=0)))
                for p in prompts
            ],
            concurrency=3,
        )
        results, summary = await collect(gateway.stub.CompleteBatch(request))
        assert (summary.succeeded, summary.failed) == (2, 1)
        assert {r.id: r.WhichOneof("outcome") for r in results}["fail"] == "error"
        assert (upstream.finished, upstream.disconnects) == (3, 0)
        total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
        assert (total.requests, total.estimated_requests, total.usage.input_tokens) == (2, 0, 14)
        sent = len(upstream.requests)
        broken.clear()
        _, again = await collect(gateway.stub.CompleteBatch(request))
        assert again.succeeded == 3
        assert [user_text(r.body) for r in upstream.requests[sent:]] == ["fail"]


async def test_a_caller_that_stops_reading_stops_the_batch_starting_items(start_gateway):
    """A caller that takes one result of 40 and reads no further holds the batch a few
    results later: its items' answers (1 MiB each) fill gRPC's flow-control window, and no
    item starts while `concurrency` results wait to be taken. Read on, it gets all 40.

    Before, an item's turn was given back as it ended, not as its result was taken: every
    item ran, was paid for and waited in the server's memory for a caller that may never
    read it (40 MiB here; up to `max_items` answers of 16 MiB each)."""
    answer = Reply(content="x " * (1 << 19))

    def respond(_body):
        return answer

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        call = gateway.stub.CompleteBatch(batch(*(f"q{i}" for i in range(40)), concurrency=2))
        events = aiter(call)
        await anext(events)
        with pytest.raises(TimeoutError):  # unread, the batch stops short of its end
            await fake.wait_until(lambda: len(fake.requests) == 40, timeout_s=1)
        assert len(fake.requests) < 40
        rest = [event async for event in events]
    assert rest[-1].summary.succeeded == 40
    assert len(fake.requests) == 40


def _two_models_for_team_a(
    base_url: str, *, team_a: dict, limits_redis_url: str | None, **resilience: object
):
    """up0 serving model-a and model-b; callers' keys for team-a (limited by `team_a`, in
    Redis at `limits_redis_url`, else in memory)."""
    data = gateway_config_data(
        base_url,
        auth={
            "mode": "keys",
            "keys": [{"sha256": hash_key(CALLER_KEY_A), "tenant": "team-a"}],
            "redis_url": limits_redis_url,
        },
        tenants={"team-a": team_a},
        resilience=resilience,
        batch={"rate_left_to_other_calls": 0},
    )
    data["upstreams"][0]["models"] = ["model-a", "model-b"]
    data["models"] = {name: fake_model_window(4096)[FAKE_MODEL] for name in ("model-a", "model-b")}
    return parse_config(data, source="<test>", environ={})


async def test_an_item_waiting_out_its_breakers_cool_down_holds_no_call_slot(
    start_gateway, monkeypatch, limits_redis_url
):
    """team-a may run one call at a time. Its batch item's 500 opens model-a's breaker,
    and the item waits out the cool-down to try again: meanwhile team-a's call to
    model-b, healthy, is served, for no upstream call of team-a is running. The item's
    second try then takes a slot again, and no second request of team-a's minute: both
    tries together count as the one item (the plain call takes the minute's other).

    Before, the item held team-a's only slot through the cool-down (15 s by default,
    and as long again for each later try), and team-a's every other call was refused
    RESOURCE_EXHAUSTED for `max_concurrent_calls` though nothing of it ran upstream."""
    waiting, cooled_down = asyncio.Event(), asyncio.Event()
    pause = service.pipeline.Pipeline.pause

    async def held_until_told(self, seconds, **kwargs):
        waiting.set()
        await cooled_down.wait()
        await pause(self, seconds, **kwargs)

    monkeypatch.setattr(service.pipeline.Pipeline, "pause", held_until_told)
    failures = [Status(500)]

    def respond(body):
        if body["model"] == "model-a" and failures:
            return failures.pop()
        return Reply(content=f"answer from {body['model']}")

    async with ScriptedUpstream(respond=respond) as upstream:
        config = _two_models_for_team_a(
            upstream.base_url,
            team_a={"max_concurrent_calls": 1, "requests_per_minute": 2},
            limits_redis_url=limits_redis_url,
            attempts=2,
            breaker_consecutive_failures=1,
            breaker_cool_down_s=0.2,
        )
        gateway = await start_gateway(config)
        key = (("authorization", f"Bearer {CALLER_KEY_A}"),)
        item = pb.BatchItem(id="a", request=chat("q", model="model-a"))
        call = gateway.stub.CompleteBatch(
            pb.CompleteBatchRequest(items=[item]), metadata=key, timeout=30
        )
        batch_done = asyncio.ensure_future(collect(call))
        await waiting.wait()
        plain = await gateway.stub.Complete(chat("q", model="model-b"), metadata=key)
        assert plain.content == "answer from model-b"
        cooled_down.set()
        results, summary = await batch_done
        assert (summary.succeeded, summary.failed) == (1, 0)
        assert results[0].response.content == "answer from model-a"
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await gateway.stub.Complete(chat("again", model="model-b"), metadata=key)
    assert over.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(over.value).quota_violations[0][0] == "tenant:team-a:requests_per_minute"
    assert [r.body["model"] for r in upstream.requests] == ["model-a", "model-b", "model-a"]
