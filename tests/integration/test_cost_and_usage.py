"""Cost on every path, the usage ledger behind GetUsage, budgets, and `llm-gateway usage`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway_client.cli import main as cli_main
from gateway_client.commands import usage
from llmgateway.v1 import gateway_pb2 as pb
from service.config import MAX_BUDGET_USD, MAX_RETENTION_DAYS, parse_config
from service.domain import ToolCall
from service.errors import RETRY_PUSHBACK_TRAILER
from service.ledger import UsageFilter, UsageRow
from service.pricing import cost_usd
from service.store_cooldown import COOLDOWN_S
from service.tokens import (
    PER_MESSAGE_OVERHEAD,
    PER_REQUEST_OVERHEAD,
    estimate_text_tokens,
    estimate_tool_call_tokens,
)
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_clock import FakeClock
from tests.fake_upstream import Reply, ToolCallReply
from tests.integration.helpers import error_info, field_violations, retry_delay_s
from tests.integration.tenancy_helpers import trailer
from tests.integration.test_stream_charges import (
    CALIBRATED,
    CUT,
    calibrate,
    calibrated_estimate,
    labelled,
    plain_estimate,
)
from tests.redis_support import redis_url  # noqa: F401 - fixture
from tests.telemetry_support import captured_telemetry

# DeepSeek-like prices in USD per million tokens, with a cached-input price.
PRICED_MODELS = {
    FAKE_MODEL: {
        "context_window": 8192,
        "input_usd_per_million": 0.27,
        "output_usd_per_million": 1.10,
        "cached_input_usd_per_million": 0.07,
    }
}
USAGE = Reply(prompt_tokens=1234, completion_tokens=567, cached_tokens=1000)
# Worked by hand: 234 uncached x 0.27 + 1000 cached x 0.07 + 567 x 1.10 = 756.88 micro-dollars.
EXPECTED_COST = 756.88e-6


@pytest.fixture
async def priced(upstream, start_gateway):
    """A gateway whose model has input, cached-input and output prices."""
    return await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))


def metadata_of(items):
    """The final metadata of a stream's responses."""
    return items[-1].final


async def test_unary_and_stream_cost_the_same_to_the_micro_dollar(priced, upstream):
    """The same usage costs 756.88 micro-dollars, cached input priced apart, on both paths."""
    upstream.script(USAGE, USAGE)
    unary = (await priced.stub.Complete(chat())).metadata
    streamed = metadata_of([e async for e in priced.stub.CompleteStream(chat_stream())])
    for metadata in (unary, streamed):
        assert metadata.usage.input_tokens == 1234
        assert metadata.usage.cached_input_tokens == 1000
        assert not metadata.usage.estimated
        assert round(metadata.cost_usd * 1e6, 6) == round(EXPECTED_COST * 1e6, 6)
    assert unary.cost_usd == streamed.cost_usd


async def test_without_a_cached_price_cached_input_costs_full_price(upstream, start_gateway):
    """A model with no cached-input price charges cached tokens at the input price."""
    models = {FAKE_MODEL: {**PRICED_MODELS[FAKE_MODEL], "cached_input_usd_per_million": None}}
    gw = await start_gateway(gateway_config(upstream.base_url, models=models))
    upstream.script(USAGE)
    metadata = (await gw.stub.Complete(chat())).metadata
    assert round(metadata.cost_usd * 1e6, 6) == round(1234 * 0.27 + 567 * 1.10, 6)


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_cached_input_reported_above_the_input_counts_as_all_of_it(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """An upstream saying 50 of 10 prompt tokens were cached: the call is priced with all
    10 cached, and the response and the ledger say 10 cached, not more than the input.

    Before, the figures said 50 cached of 10 (the ledger's CACHED over its IN) while the
    cost counted 10."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": "over-cached"}
    gw = await start_gateway(
        gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=section)
    )
    over = Reply(prompt_tokens=10, completion_tokens=5, cached_tokens=50)
    upstream.script(over, over)
    unary = (await gw.stub.Complete(chat())).metadata
    streamed = metadata_of([e async for e in gw.stub.CompleteStream(chat_stream())])
    for metadata in (unary, streamed):
        assert (metadata.usage.input_tokens, metadata.usage.cached_input_tokens) == (10, 10)
        assert metadata.cost_usd == pytest.approx((10 * 0.07 + 5 * 1.10) / 1e6, abs=1e-12)
    total = (await gw.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.cached_input_tokens) == (20, 20)


async def test_a_stream_without_usage_is_priced_from_an_estimate_flagged_as_such(priced, upstream):
    """No usage from the upstream: estimated tokens, flagged, priced by the same formula."""
    upstream.script(Reply(content="one two three four", include_usage=False))
    final = metadata_of([e async for e in priced.stub.CompleteStream(chat_stream())])
    assert final.usage.estimated
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens > 0
    expected = (final.usage.input_tokens * 0.27 + final.usage.output_tokens * 1.10) / 1e6
    assert final.cost_usd == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_an_answer_without_usage_is_charged_its_prompt_as_its_tenant_is_calibrated(
    priced, upstream, stream
):
    """The tenant's answers report 1.3 times the estimated prompt tokens; one answer then
    reports no usage: its response says, and the ledger records, the prompt's estimate
    times the calibration, not below what the provider counts (before, the plain
    estimate, under the provider's bill)."""
    reported = await calibrate(priced, upstream, ratio=1.3)
    billed = calibrated_estimate(priced)
    upstream.script(Reply(content="one two three four", include_usage=False))
    if stream:
        request = chat_stream(CALIBRATED, labels=CUT)
        metadata = metadata_of([e async for e in priced.stub.CompleteStream(request)])
    else:
        metadata = (await priced.stub.Complete(chat(CALIBRATED, labels=CUT))).metadata
    assert metadata.usage.estimated
    assert metadata.usage.input_tokens == billed >= reported
    expected = (billed * 0.27 + metadata.usage.output_tokens * 1.10) / 1e6
    assert metadata.cost_usd == pytest.approx(expected, abs=1e-12)
    row = await labelled(priced, CUT)
    assert (row.usage.input_tokens, row.cost_usd) == (billed, metadata.cost_usd)


async def test_an_answer_without_usage_of_a_tenant_counted_low_is_charged_the_plain_estimate(
    priced, upstream
):
    """The tenant's answers report 0.7 times the estimated prompt tokens: one without
    usage is charged the plain estimate, never less."""
    await calibrate(priced, upstream, ratio=0.7)
    upstream.script(Reply(include_usage=False))
    metadata = (await priced.stub.Complete(chat(CALIBRATED))).metadata
    assert metadata.usage.estimated
    assert metadata.usage.input_tokens == plain_estimate()


async def test_usage_counts_that_are_not_integers_are_estimated_on_both_paths(priced, upstream):
    """A count of 7.9 tokens, or `true`, is no count a call can have: the answer stands,
    its usage estimated and flagged, not billed as 7 tokens (or 1) reported."""
    odd = (Reply(prompt_tokens=7.9), Reply(completion_tokens=True))  # type: ignore[arg-type]
    upstream.script(*odd, *odd)
    for reply in odd:
        unary = (await priced.stub.Complete(chat())).metadata
        assert unary.usage.estimated, reply
    for reply in odd:
        streamed = metadata_of([e async for e in priced.stub.CompleteStream(chat_stream())])
        assert streamed.usage.estimated, reply


async def answered(gateway, stream: bool) -> pb.CallMetadata:
    """One call's final metadata, unary or streamed."""
    if stream:
        return metadata_of([e async for e in gateway.stub.CompleteStream(chat_stream())])
    return (await gateway.stub.Complete(chat())).metadata


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_count_left_out_is_estimated_beside_the_one_reported(priced, upstream, stream):
    """Usage with the prompt's count and no output's (or the other way round) bills the
    reported count as reported and estimates the other, flagged: never output at $0."""
    upstream.script(
        Reply(content="one two three four", raw_usages=({"prompt_tokens": 1234},)),
        Reply(content="one two three four", raw_usages=({"completion_tokens": 567},)),
    )
    input_only, output_only = [await answered(priced, stream) for _ in range(2)]
    assert (input_only.usage.input_tokens, input_only.usage.estimated) == (1234, True)
    assert input_only.usage.output_tokens > 0
    assert (output_only.usage.output_tokens, output_only.usage.estimated) == (567, True)
    assert output_only.usage.input_tokens > 0
    for metadata in (input_only, output_only):
        expected = (metadata.usage.input_tokens * 0.27 + metadata.usage.output_tokens * 1.10) / 1e6
        assert metadata.cost_usd == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_total_tokens_gives_the_count_left_out(priced, upstream, stream):
    """`total_tokens` less the reported count is the other count, reported, not estimated."""
    upstream.script(Reply(raw_usages=({"prompt_tokens": 1234, "total_tokens": 1801},)))
    metadata = await answered(priced, stream)
    assert (metadata.usage.input_tokens, metadata.usage.output_tokens) == (1234, 567)
    assert not metadata.usage.estimated


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "counts",
    [
        {"prompt_tokens": 0, "completion_tokens": 567, "total_tokens": 1801},
        {"prompt_tokens": 1234, "completion_tokens": 0, "total_tokens": 1801},
    ],
    ids=["input-0", "output-0"],
)
async def test_total_tokens_gives_a_count_of_0_no_call_can_have(priced, upstream, stream, counts):
    """A 0 beside the other count is as good as none, so `total_tokens` gives it as it
    gives one left out: the provider's own count, reported, in the response and the
    ledger. Before, the gateway's estimate (9 input tokens for 1,234) was billed instead,
    flagged, while the same provider leaving the key out was billed its count."""
    upstream.script(Reply(content="one two three four", raw_usages=(counts,)))
    metadata = await answered(priced, stream)
    assert (metadata.usage.input_tokens, metadata.usage.output_tokens) == (1234, 567)
    assert not metadata.usage.estimated
    total = (await priced.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.output_tokens) == (1234, 567)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "counts",
    [
        {"prompt_tokens": 1234, "total_tokens": 1234},
        {"completion_tokens": 567, "total_tokens": 567},
    ],
    ids=["no-output", "no-input"],
)
async def test_a_total_no_larger_than_the_reported_count_leaves_the_other_estimated(
    priced, upstream, stream, counts
):
    """`total_tokens` equal to the one count reported says nothing of the other: no call
    has no prompt, and this one wrote text. Before, the other count was taken as 0, not
    flagged, and the answer's output (or input) cost nothing, in the response and the
    ledger alike."""
    upstream.script(Reply(content="one two three four", raw_usages=(counts,)))
    metadata = await answered(priced, stream)
    assert metadata.usage.estimated
    assert metadata.usage.input_tokens > 0
    assert metadata.usage.output_tokens > 0
    total = (await priced.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.output_tokens) == (
        metadata.usage.input_tokens,
        metadata.usage.output_tokens,
    )
    assert total.cost_usd == pytest.approx(metadata.cost_usd, abs=1e-12)


_WORDS = "one two three four five six seven eight"
_CALL = ToolCallReply("call_1", "get_weather", '{"city": "Paris"}')
# The gateway's estimates of `chat()`'s prompt, of `_WORDS` and of `_CALL`.
_PROMPT_ESTIMATE = PER_REQUEST_OVERHEAD + PER_MESSAGE_OVERHEAD + estimate_text_tokens("Say hi")
_WORDS_ESTIMATE = estimate_text_tokens(_WORDS)
_CALL_ESTIMATE = estimate_tool_call_tokens([ToolCall(_CALL.id, _CALL.name, _CALL.arguments)])


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("reply", "billed"),
    [
        (
            Reply(_WORDS, raw_usages=({"prompt_tokens": 0, "completion_tokens": 3},)),
            (_PROMPT_ESTIMATE, 3),
        ),
        (
            Reply(_WORDS, raw_usages=({"prompt_tokens": 1234, "completion_tokens": 0},)),
            (1234, _WORDS_ESTIMATE),
        ),
        (
            Reply("", "tool_calls", prompt_tokens=1234, completion_tokens=0, tool_calls=(_CALL,)),
            (1234, _CALL_ESTIMATE),
        ),
        (Reply(_WORDS, prompt_tokens=0, completion_tokens=0), (_PROMPT_ESTIMATE, _WORDS_ESTIMATE)),
    ],
    ids=["no-prompt", "no-output", "no-output-beside-tool-calls", "neither"],
)  # fmt: skip
async def test_a_count_of_0_no_call_can_have_is_estimated_everywhere_it_is_counted(
    upstream, start_gateway, stream, reply, billed
):
    """An upstream that reports 0 prompt tokens (every call sends a prompt) or 0 output
    tokens beside text or tool calls is believed no more than one that leaves the count
    out: the count is estimated, flagged and billed, the other kept as reported, and the
    response, the `GetUsage` row and `gen_ai.client.token.usage` agree.

    Before, the 0 was billed as reported: unflagged, and the answer free of it."""
    captured = captured_telemetry()
    gateway = await start_gateway(
        gateway_config(upstream.base_url, models=PRICED_MODELS), telemetry=captured.telemetry
    )
    upstream.script(reply)
    usage = (await answered(gateway, stream)).usage
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (*billed, True)
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.output_tokens) == billed
    assert (total.estimated_requests, total.usage.estimated) == (1, True)
    assert total.cost_usd == pytest.approx((billed[0] * 0.27 + billed[1] * 1.10) / 1e6, abs=1e-12)
    assert captured.tokens() == {("input", True): billed[0], ("output", True): billed[1]}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_0_output_tokens_for_an_answer_with_no_output_stay_reported(
    upstream, start_gateway, stream
):
    """An answer with no text, reasoning or tool call (its `max_tokens` spent before any)
    wrote 0 tokens for all the gateway can tell: 0 stands, reported, not estimated."""
    captured = captured_telemetry()
    gateway = await start_gateway(
        gateway_config(upstream.base_url, models=PRICED_MODELS), telemetry=captured.telemetry
    )
    upstream.script(Reply("", "length", prompt_tokens=1234, completion_tokens=0))
    usage = (await answered(gateway, stream)).usage
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (1234, 0, False)
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.output_tokens) == (1234, 0)
    assert total.estimated_requests == 0
    assert captured.tokens() == {("input", False): 1234, ("output", False): 0}


async def test_a_count_of_0_no_call_can_have_counts_against_the_budget(upstream, start_gateway):
    """Answers reported as 0 tokens in and out are billed their estimate against their
    tenant's budget, which they spend. Before, they cost $0 and passed a spent budget
    forever."""
    config = gateway_config(
        upstream.base_url, budgets={"default": {"usd": 0.000002, "period": "day"}}
    )
    gateway = await start_gateway(config)
    upstream.default = Reply(_WORDS, prompt_tokens=0, completion_tokens=0)
    assert (await gateway.stub.Complete(chat())).metadata.cost_usd > 0.000002  # spent
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(chat())
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "later",
    [
        {"prompt_tokens": -3, "completion_tokens": 1},
        {"prompt_tokens": 5},
        {"prompt_tokens": 0, "completion_tokens": 0},
        {"prompt_tokens": 1234, "completion_tokens": 0},
    ],
    ids=["unbelievable", "partial", "all-zero", "zero-output"],
)
async def test_a_worse_usage_event_later_in_a_stream_leaves_the_earlier_one(
    priced, upstream, later
):
    """A stream's usage events each replace the last (servers that count up send one a
    chunk), but an unbelievable or partial one never replaces a whole one, nor do counts
    of 0 the counts before them (a count never goes down). Before, an all-zero usage after
    whole counts replaced them: the call ended estimated, the counts reported thrown away."""
    whole = {"prompt_tokens": 1234, "completion_tokens": 567}
    upstream.script(Reply(raw_usages=(whole, later)), Reply(raw_usages=(later, whole)))
    for _ in range(2):
        metadata = await answered(priced, stream=True)
        assert (metadata.usage.input_tokens, metadata.usage.output_tokens) == (1234, 567)
        assert not metadata.usage.estimated


async def test_partial_usage_events_in_a_stream_add_up(priced, upstream):
    """The prompt's count in one usage event and the output's in a later one (adapters of
    Anthropic's stream send them so) are both reported counts: before, the later event
    replaced the earlier, and the prompt was estimated instead of billed as reported."""
    upstream.script(
        Reply(
            content="one two three four",
            raw_usages=(
                {"prompt_tokens": 1234, "prompt_tokens_details": {"cached_tokens": 1000}},
                {"completion_tokens": 567},
            ),
        )
    )
    metadata = await answered(priced, stream=True)
    usage = metadata.usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (1234, 1000, 567)
    assert not usage.estimated
    total = (await priced.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.usage.input_tokens, total.usage.output_tokens) == (1234, 567)
    assert total.cost_usd == pytest.approx(metadata.cost_usd, abs=1e-12)


async def test_get_usage_sums_every_path_exactly(priced, upstream):
    """GetUsage totals the unary and streamed calls to exactly the sum of their costs."""
    upstream.script(USAGE, USAGE, USAGE)
    costs = [(await priced.stub.Complete(chat(labels={"team": "search"}))).metadata.cost_usd]
    costs.append((await priced.stub.Complete(chat(labels={"team": "ads"}))).metadata.cost_usd)
    items = [e async for e in priced.stub.CompleteStream(chat_stream(labels={"team": "search"}))]
    costs.append(items[-1].final.cost_usd)
    usage = await priced.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == 3
    assert usage.total.usage.input_tokens == 3 * 1234
    assert usage.total.usage.cached_input_tokens == 3000
    assert round(usage.total.cost_usd * 1e6, 6) == round(3 * EXPECTED_COST * 1e6, 6)
    assert usage.total.cost_usd == pytest.approx(sum(costs), abs=1e-12)
    by_label = {r.labels["team"]: r for r in usage.rows}
    assert by_label["search"].requests == 2
    assert by_label["ads"].requests == 1
    assert {r.tenant for r in usage.rows} == {"default"}
    assert {r.upstream for r in usage.rows} == {"up0"}


async def test_get_usage_filters_by_model_label_and_time(priced):
    """Model, label and time-window filters narrow GetUsage; an empty match totals zero."""
    await priced.stub.Complete(chat(labels={"team": "search", "env": "prod"}))
    await priced.stub.Complete(chat(labels={"team": "ads"}))
    search = await priced.stub.GetUsage(pb.GetUsageRequest(labels={"team": "search"}))
    assert search.total.requests == 1
    assert dict(search.rows[0].labels) == {"team": "search", "env": "prod"}
    assert (await priced.stub.GetUsage(pb.GetUsageRequest(model="other"))).total.requests == 0
    future = pb.GetUsageRequest()
    future.start_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    assert (await priced.stub.GetUsage(future)).total.requests == 0
    past = pb.GetUsageRequest()
    past.start_time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    assert (await priced.stub.GetUsage(past)).total.requests == 2
    assert (await priced.stub.GetUsage(pb.GetUsageRequest(tenant="*"))).total.requests == 2


async def test_get_usage_sums_a_tenants_calls_past_its_row_cap_in_one_overflow_row(
    upstream, start_gateway
):
    """A label with a new value on every call (a request id) starts at most
    `ledger.max_rows_per_tenant` rows a bucket; GetUsage shows the rest in one row
    labelled `llm_gateway.overflow`, and the total still counts every call and cent."""
    gw = await start_gateway(gateway_config(upstream.base_url, ledger={"max_rows_per_tenant": 2}))
    costs = [
        (await gw.stub.Complete(chat(labels={"request_id": str(n)}))).metadata.cost_usd
        for n in range(5)
    ]
    usage = await gw.stub.GetUsage(pb.GetUsageRequest())
    assert sorted((*r.labels.items(), r.requests) for r in usage.rows) == [
        (("llm_gateway.overflow", "true"), 3),
        (("request_id", "0"), 1),
        (("request_id", "1"), 1),
    ]
    assert usage.total.requests == 5
    assert usage.total.cost_usd == pytest.approx(sum(costs), abs=1e-12)
    # The gateway's own label is refused on a call, but a filter may name it.
    overflow = await gw.stub.GetUsage(pb.GetUsageRequest(labels={"llm_gateway.overflow": "true"}))
    assert overflow.total.requests == 3


async def test_get_usage_refuses_a_timestamp_out_of_range_as_invalid_argument(priced):
    """A window bound no Timestamp can hold is the caller's error, on that field.

    Before, converting it raised ValueError in the servicer: INTERNAL, and an
    unexpected-error traceback in the server log.
    """
    beyond = pb.GetUsageRequest()
    beyond.end_time.seconds = 10**12  # past year 9999
    negative_nanos = pb.GetUsageRequest()
    negative_nanos.start_time.nanos = -1
    for request, field in ((beyond, "end_time"), (negative_nanos, "start_time")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await priced.stub.GetUsage(request)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(refused.value)) == [field]


async def test_get_usage_refuses_a_window_that_ends_before_it_starts(priced):
    """Swapped bounds are the caller's error, on end_time; a window of one instant is not.

    Before, the swapped window matched no row and GetUsage answered OK with a zero total,
    which reads as "no usage" when there was some.
    """
    await priced.stub.Complete(chat())
    now = dt.datetime.now(dt.UTC)
    swapped = pb.GetUsageRequest()
    swapped.start_time.FromDatetime(now + dt.timedelta(hours=1))
    swapped.end_time.FromDatetime(now - dt.timedelta(hours=1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await priced.stub.GetUsage(swapped)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused.value)) == ["end_time"]
    instant = pb.GetUsageRequest()
    instant.start_time.FromDatetime(now)
    instant.end_time.FromDatetime(now)
    await priced.stub.GetUsage(instant)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"tenant": "team a"}, "tenant"),
        ({"model": "fake\x00model"}, "model"),
        ({"model": "m" * 300}, "model"),
        ({"labels": {"bad key!": "v"}}, "labels['bad key!']"),
        ({"labels": {"team": "search\n"}}, "labels['team']"),
        ({"labels": {"llm_gateway.team": "search"}}, "labels['llm_gateway.team']"),
        ({"labels": {"llm_gateway.overflow": "false"}}, "labels['llm_gateway.overflow']"),
    ],
    ids=[
        "tenant", "model-control", "model-long", "label-key", "label-value",
        "gateway-label", "overflow-value",
    ],
)  # fmt: skip
async def test_get_usage_refuses_a_filter_no_call_could_match(priced, filters, field):
    """A tenant, model or label no call could have been recorded with is INVALID_ARGUMENT
    on that field, held to the rules a call's are.

    Before, any string went through as a filter that matched no row, and GetUsage
    answered OK with a zero total: "no usage" for a typo'd or mangled filter. And any
    `llm_gateway.*` label did, though the only one a row carries is the overflow row's.
    """
    await priced.stub.Complete(chat(labels={"team": "search"}))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await priced.stub.GetUsage(pb.GetUsageRequest(**filters))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused.value)


@pytest.mark.redis
async def test_get_usage_finds_labels_recorded_under_larger_label_limits(
    upstream,
    start_gateway,
    redis_url,  # noqa: F811
):
    """A replica whose `defaults` allow fewer and shorter labels (a config lowered since,
    or met mid-rollout) still finds the rows another recorded under larger ones: a filter
    is held to what no call could carry, not to this replica's limits for new calls.

    Before, the filter was refused as INVALID_ARGUMENT, though rows matched it."""
    ledger = {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    recorder = await start_gateway(gateway_config(upstream.base_url, ledger=ledger))
    stricter = await start_gateway(
        gateway_config(
            upstream.base_url,
            ledger=ledger,
            defaults={"max_labels": 1, "max_label_length": 8},
        )
    )
    labels = {"team": "search-and-ranking", "env": "prod"}
    await recorder.stub.Complete(chat(labels=labels))
    usage = await stricter.stub.GetUsage(pb.GetUsageRequest(labels=labels))
    assert usage.total.requests == 1
    assert [dict(row.labels) for row in usage.rows] == [labels]


async def test_a_usage_filter_holds_as_many_labels_as_a_call_may_carry(upstream, start_gateway):
    """A filter of 256 labels, the most any config lets a call carry, finds the row of a
    call that carried them; one more is INVALID_ARGUMENT on `labels`, as no row holds it.

    Before, a filter of any size went through, and one no row could match answered OK
    with a zero total: "no usage"."""
    gw = await start_gateway(gateway_config(upstream.base_url, defaults={"max_labels": 256}))
    labels = {f"k{i}": "v" for i in range(256)}
    await gw.stub.Complete(chat(labels=labels))
    usage = await gw.stub.GetUsage(pb.GetUsageRequest(labels=labels))
    assert usage.total.requests == 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.GetUsage(pb.GetUsageRequest(labels={**labels, "k256": "v"}))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value) == {"labels": "at most 256 labels, got 257"}


async def test_a_spent_budget_refuses_before_any_upstream_call(upstream, start_gateway):
    """Over budget: RESOURCE_EXHAUSTED, QuotaFailure, RetryInfo and pushback; no upstream call."""
    config = gateway_config(
        upstream.base_url, budgets={"default": {"usd": 0.000002, "period": "day"}}
    )
    gw = await start_gateway(config)
    first = await gw.stub.Complete(chat())
    assert first.metadata.cost_usd > 0.000002  # 7 x 0.14 + 3 x 0.42 = 2.24 micro-dollars
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.Complete(chat())
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(refused.value.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    kinds = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    quota = error_details_pb2.QuotaFailure()
    kinds["google.rpc.QuotaFailure"].Unpack(quota)
    retry = error_details_pb2.RetryInfo()
    kinds["google.rpc.RetryInfo"].Unpack(retry)
    assert quota.violations[0].subject == "tenant:default"
    assert 0 < retry.retry_delay.seconds <= 86400
    # A call without a deadline is pushed back only a wait a retry policy should sit out.
    wait_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    pushback = trailers["grpc-retry-pushback-ms"]
    assert pushback == "-1" if wait_s >= 300 else abs(int(pushback) - wait_s * 1000) <= 1
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [e async for e in gw.stub.CompleteStream(chat_stream())]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_call_over_the_whole_budget_is_told_never_to_retry(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """A call whose expected cost alone passes the budget is refused as one that can never
    fit: no RetryInfo, pushback -1, no upstream call; a smaller call still passes.

    Before, it was told its tenant had spent $0 and to retry when the period resets,
    where the next period's budget refused it again."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": "never-fits"}
    budgets = {"default": {"usd": 0.001, "period": "day"}}
    gw = await start_gateway(gateway_config(upstream.base_url, ledger=section, budgets=budgets))
    # 4,000 output tokens at $0.42 a million: $0.00168 expected, over the $0.001 budget.
    large = chat(params=pb.GenerationParams(max_tokens=4000))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.Complete(large)
    error = refused.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "can never fit" in (error.details() or "")
    assert (retry_delay_s(error), trailer(error, RETRY_PUSHBACK_TRAILER)) == (None, "-1")
    assert upstream.requests == []
    assert (await gw.stub.Complete(chat(params=pb.GenerationParams(max_tokens=100)))).content


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_the_largest_budget_lets_calls_through_and_counts_them(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """A budget of `MAX_BUDGET_USD`, as good as none, passes calls and records their cost,
    in the process and in Redis; a larger one is a config error (`test_config_parsing`).

    Before, `usd: 1e300` was a valid config on which every call failed INTERNAL: its
    pico-dollars are past a float's range."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": "big-budget"}
    budgets = {"*": {"usd": MAX_BUDGET_USD, "period": "day"}}
    gw = await start_gateway(gateway_config(upstream.base_url, ledger=section, budgets=budgets))
    unary = (await gw.stub.Complete(chat())).metadata
    streamed = metadata_of([e async for e in gw.stub.CompleteStream(chat_stream())])
    total = (await gw.stub.GetUsage(pb.GetUsageRequest())).total
    assert total.requests == 2
    assert total.cost_usd == pytest.approx(unary.cost_usd + streamed.cost_usd, abs=1e-12)


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_the_longest_retention_records_every_call(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """With `retention_days` at its most (`MAX_RETENTION_DAYS`), calls are recorded and
    charged, in the process and in Redis; a longer one is a config error
    (`test_config_parsing`).

    Before, a retention of 2e11 days was a valid config whose expiry Redis refused: every
    call's usage and spend were lost (`ledger.record_lost`), GetUsage showed none and no
    budget was ever charged, while the calls themselves succeeded."""
    section: dict[str, object] = {"retention_days": MAX_RETENTION_DAYS}
    if ledger == "redis":
        section |= {
            "redis_url": request.getfixturevalue("redis_url"),
            "key_prefix": uuid.uuid4().hex,
        }
    gw = await start_gateway(gateway_config(upstream.base_url, ledger=section))
    unary = (await gw.stub.Complete(chat())).metadata
    streamed = metadata_of([e async for e in gw.stub.CompleteStream(chat_stream())])
    total = (await gw.stub.GetUsage(pb.GetUsageRequest())).total
    assert total.requests == 2
    assert total.cost_usd == pytest.approx(unary.cost_usd + streamed.cost_usd, abs=1e-12)


async def test_a_spent_budget_still_lets_calls_that_cost_nothing_through(upstream, start_gateway):
    """A model without a price (the local model, say) costs $0 and no budget counts it:
    its calls pass after the tenant's budget is spent, while priced calls are refused."""
    data = gateway_config_data(
        upstream.base_url, budgets={"default": {"usd": 0.000002, "period": "day"}}
    )
    data["upstreams"][0]["models"] = [FAKE_MODEL, "free-model"]
    gw = await start_gateway(parse_config(data, source="<test>", environ={}))
    assert (await gw.stub.Complete(chat())).metadata.cost_usd > 0.000002  # spent
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.Complete(chat())
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    free = await gw.stub.Complete(chat(model="free-model"))
    assert (free.content, free.metadata.cost_usd) == ("Hello from fake", 0.0)
    streamed = [e async for e in gw.stub.CompleteStream(chat_stream(model="free-model"))]
    assert streamed[-1].final.cost_usd == 0.0


async def test_a_spent_budget_refuses_a_priced_model_whose_expected_cost_is_zero(
    upstream, start_gateway
):
    """A model whose input is free but whose output is priced bills every answer, so its
    calls count: once the budget is spent, one without `max_tokens` (expected to cost
    nothing, its output unknown) is refused like any priced call. Only a model without a
    price passes a spent budget."""
    models = {FAKE_MODEL: {**PRICED_MODELS[FAKE_MODEL], "input_usd_per_million": 0.0}}
    models[FAKE_MODEL].pop("cached_input_usd_per_million")
    config = gateway_config(
        upstream.base_url, models=models, budgets={"default": {"usd": 0.000002, "period": "day"}}
    )
    gw = await start_gateway(config)
    assert (await gw.stub.Complete(chat())).metadata.cost_usd > 0.000002  # 3 x 1.10: spent
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.Complete(chat())
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(upstream.requests) == 1


async def test_usage_command_prints_a_table(priced, capsys):
    """`llm-gateway usage` prints one row per tenant/model/upstream/labels and a total."""
    await priced.stub.Complete(chat(labels={"team": "search"}))
    await priced.stub.Complete(chat(labels={"team": "search"}))
    address = priced.server.address
    code = await asyncio.to_thread(
        cli_main, ["usage", "--address", address, "--label", "team=search", "--since", "1h"]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == [
        "TENANT", "MODEL", "UPSTREAM", "LABELS", "REQUESTS", "ESTIMATED", "HITS", "IN", "OUT",
        "REASONING", "CACHED", "COST", "$", "SAVED", "$",
    ]  # fmt: skip
    assert out[1].split()[:6] == ["default", FAKE_MODEL, "up0", "team=search", "2", "0"]
    assert out[-1].split()[0] == "TOTAL"
    assert out[-1].split()[1] == "2"


async def test_usage_command_ends_the_window_at_until(priced, capsys):
    """`--until` is sent as the window's end: an hour ago ends before this hour's bucket,
    so today's calls drop out, and a time after them keeps them. Before, `usage` had
    `--since` alone, and `--until` was an unrecognized argument (exit 2)."""
    await priced.stub.Complete(chat())
    address = priced.server.address
    totals = []
    for until in ("1h", "9999-01-01T00:00:00Z"):
        code = await asyncio.to_thread(
            cli_main, ["usage", "--address", address, "--since", "1h", "--until", until]
        )
        assert code == 0
        totals.append(capsys.readouterr().out.splitlines()[-1].split()[:2])
    assert totals == [["TOTAL", "0"], ["TOTAL", "1"]]


async def test_usage_command_takes_an_equal_relative_window_in_either_order(priced, capsys):
    """`--until 1h --since 1h` is the same empty window as `--since 1h --until 1h`: both
    are measured from one reading of the clock. Before, each option read the clock, so
    with `--until` first the window ended a moment before it started: exit 2."""
    await priced.stub.Complete(chat())
    address = priced.server.address
    tables = []
    for window in (["--since", "1h", "--until", "1h"], ["--until", "1h", "--since", "1h"]):
        code = await asyncio.to_thread(cli_main, ["usage", "--address", address, *window])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        tables.append(captured.out)
    assert tables[0] == tables[1]
    assert tables[0].splitlines()[-1].split()[:2] == ["TOTAL", "0"]


def ticking_clock(start: dt.datetime) -> Callable[[], dt.datetime]:
    """A wall clock a second later at each reading, from `start`."""
    readings = itertools.count()
    return lambda: start + dt.timedelta(seconds=next(readings))


@pytest.mark.parametrize(
    "window", [["--since", "2h", "--until", "1h"], ["--until", "1h", "--since", "2h"]]
)
async def test_usage_command_measures_relative_times_from_one_reading_of_the_clock(
    priced, monkeypatch, window
):
    """`--since 2h --until 1h` asks the gateway for the hour from two hours to one hour
    before the clock's one reading, in either order, however the clock moves meanwhile."""
    asked: list[UsageFilter] = []
    ledger = priced.server.pipeline.ledger
    query = ledger.query

    async def recording(usage_filter: UsageFilter) -> list[UsageRow]:
        asked.append(usage_filter)
        return await query(usage_filter)

    monkeypatch.setattr(ledger, "query", recording)
    now = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    parser = argparse.ArgumentParser()
    usage.register(parser.add_subparsers(), clock=ticking_clock(now))
    args = parser.parse_args(["usage", "--address", priced.server.address, *window])

    assert await usage.usage_command(args) == 0

    hour_s = 3600
    assert [(f.start_s, f.end_s) for f in asked] == [
        (now.timestamp() - 2 * hour_s, now.timestamp() - hour_s)
    ]


@pytest.mark.redis
async def test_replicas_share_one_redis_ledger(upstream, start_gateway, redis_url):  # noqa: F811
    """Two gateways on one Redis ledger: usage from both shows in either's GetUsage."""
    config = gateway_config(
        upstream.base_url,
        models=PRICED_MODELS,
        ledger={"redis_url": redis_url, "key_prefix": "replicas-test"},
    )
    first, second = await start_gateway(config), await start_gateway(config)
    upstream.script(USAGE, USAGE)
    await first.stub.Complete(chat())
    await second.stub.Complete(chat())
    for gw in (first, second):
        usage = await gw.stub.GetUsage(pb.GetUsageRequest())
        assert usage.total.requests == 2
        assert round(usage.total.cost_usd * 1e6, 6) == round(2 * EXPECTED_COST * 1e6, 6)


def test_hand_computed_cost_matches_the_pricing_function():
    """The hand figure used above is what pricing.cost_usd computes for the same usage."""
    from service.config import ModelConfig
    from service.domain import Usage

    price = ModelConfig(
        context_window=8192,
        input_usd_per_million=0.27,
        output_usd_per_million=1.10,
        cached_input_usd_per_million=0.07,
    )
    usage = Usage(input_tokens=1234, output_tokens=567, cached_input_tokens=1000)
    assert cost_usd(usage, price) == pytest.approx(EXPECTED_COST, abs=1e-12)


async def test_every_path_charges_the_same_figure_and_the_ledger_agrees(upstream, start_gateway):
    """Unary, stream, batch items, batch total and a cache hit's saving all equal 756.88 µ$."""
    config = gateway_config(upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"})
    gw = await start_gateway(config)
    deterministic = pb.GenerationParams(temperature=0.0)
    upstream.script(USAGE, USAGE, USAGE, USAGE)
    miss = (await gw.stub.Complete(chat("unary", params=deterministic))).metadata
    cache = gw.server.pipeline.cache
    async with asyncio.timeout(10):
        while cache.in_flight:
            await asyncio.sleep(0.005)
    hit = (await gw.stub.Complete(chat("unary", params=deterministic))).metadata
    streamed = metadata_of(
        [e async for e in gw.stub.CompleteStream(chat_stream("stream", params=deterministic))]
    )
    batch = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(id=f"item-{i}", request=chat(f"batch {i}", params=deterministic))
            for i in range(2)
        ]
    )
    events = [e async for e in gw.stub.CompleteBatch(batch)]
    items = [e.result.response.metadata for e in events if e.HasField("result")]
    summary = events[-1].summary

    def micro(usd: float) -> float:
        return round(usd * 1e6, 6)

    expected = micro(EXPECTED_COST)
    charged = [miss, streamed, *items]
    assert [micro(m.cost_usd) for m in charged] == [expected] * 4
    assert not miss.cache_hit
    assert hit.cache_hit
    assert micro(hit.cost_usd) == 0
    assert micro(hit.saved_cost_usd) == micro(miss.cost_usd) == expected
    assert summary.succeeded == 2
    assert micro(summary.cost_usd) == micro(2 * EXPECTED_COST)
    assert summary.usage.input_tokens == 2 * 1234
    assert len(upstream.requests) == 4
    usage = await gw.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == 5  # the hit is counted, at no cost
    assert micro(usage.total.cost_usd) == micro(4 * EXPECTED_COST)
    assert usage.total.cost_usd == pytest.approx(sum(m.cost_usd for m in charged), abs=1e-12)
    assert usage.total.usage.output_tokens == 5 * 567


async def test_an_unreachable_redis_ledger_is_unavailable_for_get_usage(
    upstream, start_gateway, tmp_path
):
    """Ledger down: calls are still served, and GetUsage says UNAVAILABLE, not INTERNAL,
    with when to retry (the store's cool-down) as every UNAVAILABLE does; before, it
    carried no RetryInfo and no pushback."""
    ledger = {"redis_url": f"unix://{tmp_path}/no-such.sock"}
    gateway = await start_gateway(gateway_config(upstream.base_url, ledger=ledger))
    assert (await gateway.stub.Complete(chat())).content
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no-such.sock" not in caught.value.details()
    assert error_info(caught.value).metadata["upstream"] == "usage-ledger"
    details = status_pb2.Status.FromString(
        dict(caught.value.trailing_metadata())["grpc-status-details-bin"]
    ).details
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in details)
    assert retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 == pytest.approx(COOLDOWN_S)
    pushback = dict(caught.value.trailing_metadata())[RETRY_PUSHBACK_TRAILER]
    assert pushback == str(round(COOLDOWN_S * 1000))


@pytest.mark.redis
async def test_a_frozen_redis_ledger_delays_a_call_by_its_timeout_only(
    upstream, start_gateway, redis_server
):
    """A Redis that accepts connections but never answers costs a call its bound, not 5 s."""
    ledger = {"redis_url": redis_server.url, "operation_timeout_s": 0.3}
    gateway = await start_gateway(gateway_config(upstream.base_url, ledger=ledger))
    assert (await gateway.stub.Complete(chat())).content  # connection made while healthy
    redis_server.pause()
    try:
        started = asyncio.get_running_loop().time()
        response = await gateway.stub.Complete(chat(), timeout=10)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        redis_server.resume()
    assert response.content == "Hello from fake"
    # redis-py's default socket timeout, 5 s, is what a write it bounded would wait:
    # 4.5 s leaves a loaded machine 15 times the ledger's 0.3 s.
    assert elapsed < 4.5, "the ledger's timeout, not redis-py's default, bounds the write"


async def test_a_served_model_without_a_price_is_warned_about_at_start(
    upstream, start_gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider model missing from `models:` would cost $0 and escape every budget: the
    gateway says so once at start, naming it; priced models are not named."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["models"] = [FAKE_MODEL, "typo-model"]
    with caplog.at_level("WARNING", logger="llm_gateway"):
        await start_gateway(parse_config(data, source="<test>", environ={}))
    warned = [r for r in caplog.records if r.getMessage() == "pricing.model_without_price"]
    assert [r.model for r in warned] == ["typo-model"]
    assert warned[0].upstreams == ["up0"]


@pytest.mark.parametrize("ledger", ["memory", "redis"])
async def test_usage_says_how_many_requests_were_estimated(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """A stream whose upstream reported no usage is counted as estimated in its row and
    the total, in memory and in Redis; a call with reported usage is not."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": "est-test"}
    gw = await start_gateway(
        gateway_config(upstream.base_url, models=PRICED_MODELS, ledger=section)
    )
    upstream.script(USAGE, Reply(content="no usage reported", include_usage=False))
    await gw.stub.Complete(chat(labels={"case": "reported"}))
    _ = [e async for e in gw.stub.CompleteStream(chat_stream(labels={"case": "estimated"}))]
    usage = await gw.stub.GetUsage(pb.GetUsageRequest())
    rows = {row.labels["case"]: row for row in usage.rows}
    assert (rows["reported"].estimated_requests, rows["reported"].usage.estimated) == (0, False)
    assert (rows["estimated"].estimated_requests, rows["estimated"].usage.estimated) == (1, True)
    assert (usage.total.requests, usage.total.estimated_requests) == (2, 1)
    assert usage.total.usage.estimated


async def test_a_batch_summary_costs_exactly_what_its_items_cost(upstream, start_gateway):
    """Three items of 2 input tokens at $0.27 a million and 990,436,117 output tokens at
    $1.10 cost $1,089.47972924 each: the summary says $3,268.43918772, as GetUsage does,
    not the float sum 3268.4391877200005.

    Before, the summary added the items' costs as floats, and at hundreds of dollars the
    sum drifted past the pico-dollar that rounding hides."""
    gw = await start_gateway(gateway_config(upstream.base_url, models=PRICED_MODELS))
    big = Reply(prompt_tokens=2, completion_tokens=990_436_117)
    upstream.script(big, big, big)
    request = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"item {i}")) for i in range(3)]
    )
    events = [e async for e in gw.stub.CompleteBatch(request)]
    items = [e.result.response.metadata.cost_usd for e in events if e.HasField("result")]
    assert items == [1089.47972924] * 3
    summary = events[-1].summary
    total = (await gw.stub.GetUsage(pb.GetUsageRequest())).total
    assert total.cost_usd == 3268.43918772
    assert summary.cost_usd == total.cost_usd


# The most tokens an upstream may report for a count (more is taken for no count at all).
MOST_TOKENS = 2**32 - 1


def output_priced(usd_per_million: float) -> dict[str, Any]:
    """The `models` section pricing the fake model's output only."""
    return {
        FAKE_MODEL: {
            "context_window": 8192,
            "input_usd_per_million": 0.0,
            "output_usd_per_million": usd_per_million,
        }
    }


LARGE_SUMS = {
    # $1,073,741.82375 a call into one row: the second takes it past 10^18 pico-dollars.
    "a row past $1M": (250.0, 3, False),
    # $4,294,967.295 a call, a row each: the third takes the day's spend past 2^63 pico.
    "spend past $9.22M": (1000.0, 3, True),
    # $42,949,672.95 in one call: past 2^63 pico-dollars alone.
    "one call past $9.22M": (10_000.0, 2, True),
}


@pytest.mark.redis
@pytest.mark.parametrize("case", list(LARGE_SUMS))
async def test_sums_past_2_63_pico_dollars_are_counted_as_the_memory_ledger_counts_them(
    upstream,
    start_gateway,
    redis_url,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """Calls reporting the most output tokens an upstream may, at prices the config
    allows, counted in a memory ledger and a Redis one: GetUsage (rows and total) and
    the day's spend are the same in both, and are the sum of the answers' costs; nothing
    is logged lost.

    Before, Redis kept each sum in one 64-bit counter: a row past $1M was taken for
    corrupt and the calls after it left out of GetUsage, a spend past $9.22M stopped
    counting, and a call past $9.22M was missing from GetUsage and the spend alike."""
    price, calls, is_row_each = LARGE_SUMS[case]
    seen = []
    for ledger in ({}, {"redis_url": redis_url, "key_prefix": uuid.uuid4().hex}):
        config = gateway_config(upstream.base_url, models=output_priced(price), ledger=ledger)
        gw = await start_gateway(config)
        upstream.script(*[Reply(prompt_tokens=1, completion_tokens=MOST_TOKENS)] * calls)
        costs = []
        for call in range(calls):
            labels = {"call": str(call)} if is_row_each else {}
            costs.append((await gw.stub.Complete(chat(labels=labels))).metadata.cost_usd)
        usage = await gw.stub.GetUsage(pb.GetUsageRequest())
        spent = await gw.server.pipeline.ledger.spent_usd("default", "day")
        seen.append((usage, spent))
        assert usage.total.requests == calls
        assert usage.total.usage.output_tokens == calls * MOST_TOKENS
        assert usage.total.cost_usd == spent == sum(round(c * 1e12) for c in costs) / 1e12
    (in_memory, memory_spent), (in_redis, redis_spent) = seen
    assert in_redis == in_memory
    assert redis_spent == memory_spent
    assert not [r for r in caplog.records if r.getMessage() == "ledger.record_lost"]


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_budget_past_9_million_dollars_refuses_once_spent(
    upstream, start_gateway, request: pytest.FixtureRequest, ledger: str
) -> None:
    """A daily budget of $12M and calls of $4,294,967.295 each: three pass, the fourth
    is refused, the tenant having spent $12,884,901.885.

    Before, a Redis ledger's spend stopped at $8,589,934.59 (2^63 pico-dollars is about
    $9.22M): the third call was lost from it, and the tenant spent on past its budget."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": "9m-budget"}
    budgets = {"default": {"usd": 12_000_000, "period": "day"}}
    config = gateway_config(
        upstream.base_url, models=output_priced(1000.0), ledger=section, budgets=budgets
    )
    gw = await start_gateway(config)
    upstream.script(*[Reply(prompt_tokens=1, completion_tokens=MOST_TOKENS)] * 4)
    small = chat(params=pb.GenerationParams(max_tokens=1))  # reserves a thousandth of a cent
    for _ in range(3):
        await gw.stub.Complete(small)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gw.stub.Complete(small)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has spent $12884901.885000 of its $12000000.000000 daily budget" in (
        refused.value.details() or ""
    )
    assert len(upstream.requests) == 3


@pytest.mark.redis
async def test_both_ledgers_keep_a_row_retention_days_after_its_last_call(
    upstream,
    start_gateway,
    redis_url,  # noqa: F811
):
    """A gateway with the memory ledger and one with Redis, on one clock: a row whose last
    call came late in its hour is shown by both a day (`retention_days: 1`) after its
    hour began, past it only once a day after its last call. Before, both dropped it with
    its hour's start (the memory ledger at once, Redis once a call came), while its key
    in Redis still lived; a call recorded each time makes both prune what they drop."""
    hour = 3600
    clock = FakeClock(start=1_800_000_000 // hour * hour + hour - 60)  # late in its hour
    retention = {"retention_days": 1, "bucket_s": hour}
    redis_ledger = {**retention, "redis_url": redis_url, "key_prefix": uuid.uuid4().hex}
    gateways = [
        await start_gateway(gateway_config(upstream.base_url, ledger=section), wall_clock=clock.now)
        for section in (retention, redis_ledger)
    ]

    async def call_then_rows(call: str) -> list[list[str]]:
        rows = []
        for gateway in gateways:
            await gateway.stub.Complete(chat(labels={"call": call}))
            response = await gateway.stub.GetUsage(pb.GetUsageRequest())
            rows.append(sorted(row.labels["call"] for row in response.rows))
        return rows

    assert await call_then_rows("old") == [["old"]] * 2
    clock.advance(86400 - 60)  # a day after its hour began, and before its last call was
    assert await call_then_rows("new") == [["new", "old"]] * 2
    clock.advance(hour)  # a day after the end of its hour: after its last call too
    assert await call_then_rows("newer") == [["new", "newer"]] * 2
