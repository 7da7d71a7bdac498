"""What an attempt the upstream most likely billed, but whose answer was lost, records.

The gateway gives up on an attempt that times out at its upstream's `timeout_s` once its
request was sent, and on one whose answer fails after a success status (malformed, cut
or reset before any text reached the caller); the provider took both calls and bills at
least their prompts. Each is recorded, whatever came of the call, for the caller's
tenant and that attempt's upstream: the prompt's estimate as input, no output,
estimated, and not as a request (`requests` stays the number of calls). An attempt that
ended in an error status, or a reset before any answer, is not billed and records nothing;
nor is a success status whose answer is no OpenAI answer at all (a wrong base_url's login
page), which some other server sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from llmgateway.v1 import gateway_pb2 as pb
from service.config import GatewayConfig, parse_config
from tests.conftest import RunningGateway, chat, chat_stream, gateway_config_data
from tests.fake_upstream import (
    Behaviour,
    CutStream,
    EndWithoutDone,
    FakeUpstream,
    Hang,
    MalformedSSE,
    Reply,
    Reset,
    Status,
    ToolCallReply,
)
from tests.integration.helpers import error_info, rich_status
from tests.integration.test_cache import eventually
from tests.integration.test_cut_call_charges import prompt_tokens
from tests.integration.test_resilience import FAST_RESILIENCE
from tests.integration.test_stream_charges import (
    CACHE_PRICED_MODELS,
    CACHED_PROMPT,
    CACHED_PROMPT_USD,
    CALIBRATED,
    CUT,
    PRICED_MODELS,
    calibrated_estimate,
    plain_estimate,
)
from tests.redis_server import RedisServer
from tests.redis_support import redis_url  # noqa: F401 - fixture
from tests.scripted_upstream import ScriptedUpstream, user_text
from tests.telemetry_support import captured_telemetry

# An upstream that gives up this soon times out well within the caller's deadline.
SHORT_TIMEOUT_S = 0.3
ANSWER = Reply(prompt_tokens=11, completion_tokens=5)
ANSWER_USD = (11 * 0.27 + 5 * 1.10) / 1e6
PROMPT_USD = prompt_tokens() * 0.27 / 1e6
MODES = ["unary", "stream"]
_TIMEOUT_S = 10.0


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    """Two upstreams serving the model: up0, where each call starts, then up1."""
    async with FakeUpstream() as up0, FakeUpstream() as up1:
        yield up0, up1


def config_for(
    fakes: tuple[FakeUpstream, ...], *, timeouts_s: tuple[float, ...], **sections: Any
) -> GatewayConfig:
    """A gateway over `fakes` (up0, up1, ...) with each upstream's `timeout_s`."""
    data = gateway_config_data(
        *(fake.base_url for fake in fakes),
        **{"models": PRICED_MODELS, "resilience": FAST_RESILIENCE, **sections},
    )
    for upstream, timeout_s in zip(data["upstreams"], timeouts_s, strict=True):
        upstream["timeout_s"] = timeout_s
    return parse_config(data, source="<test>", environ={})


async def call(gateway: RunningGateway, mode: str, **fields: Any) -> pb.CompletionMetadata:
    """One call's final metadata; raises the call's AioRpcError."""
    if mode == "unary":
        return (await gateway.stub.Complete(chat(**fields), timeout=_TIMEOUT_S)).metadata
    async for item in gateway.stub.CompleteStream(chat_stream(**fields), timeout=_TIMEOUT_S):
        if item.HasField("final"):
            return item.final
    raise AssertionError("the stream ended without its final message")


async def usage(gateway: RunningGateway) -> pb.GetUsageResponse:
    await asyncio.sleep(0.2)  # a late or second record would land by now
    return await gateway.stub.GetUsage(pb.GetUsageRequest())


def by_upstream(response: pb.GetUsageResponse) -> dict[str, pb.UsageRow]:
    return {row.upstream: row for row in response.rows}


def assert_lost(row: pb.UsageRow, attempts: int = 1) -> None:
    """`attempts` lost attempts: each its prompt's estimate, no output, and no request."""
    assert row.requests == 0
    assert row.estimated_requests == attempts
    assert row.usage.input_tokens == attempts * prompt_tokens() > 0
    assert row.usage.output_tokens == 0
    assert row.usage.estimated
    assert row.cost_usd == pytest.approx(attempts * PROMPT_USD, abs=1e-12)


def assert_answered(row: pb.UsageRow) -> None:
    """The call's answer, as the upstream reported it."""
    assert (row.requests, row.estimated_requests) == (1, 0)
    assert (row.usage.input_tokens, row.usage.output_tokens) == (11, 5)
    assert not row.usage.estimated
    assert row.cost_usd == pytest.approx(ANSWER_USD, abs=1e-12)


def assert_answer_and_one_lost(response: pb.GetUsageResponse, *, lost_on: str) -> None:
    """One call answered by the other upstream, and one attempt lost on `lost_on`."""
    rows = by_upstream(response)
    assert sorted(rows) == ["up0", "up1"]
    assert_lost(rows[lost_on])
    assert_answered(rows["up1" if lost_on == "up0" else "up0"])
    total = response.total
    assert (total.requests, total.estimated_requests) == (1, 1)
    assert total.usage.input_tokens == 11 + prompt_tokens()
    assert total.usage.output_tokens == 5
    assert total.usage.estimated
    assert total.cost_usd == pytest.approx(ANSWER_USD + PROMPT_USD, abs=1e-12)


def assert_the_answers_own(metadata: pb.CompletionMetadata, *, attempts: int) -> None:
    """The caller is told its answer's usage and cost, not the lost attempts'."""
    assert (metadata.upstream, metadata.attempts) == ("up1", attempts)
    assert (metadata.usage.input_tokens, metadata.usage.output_tokens) == (11, 5)
    assert metadata.cost_usd == pytest.approx(ANSWER_USD, abs=1e-12)


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("mode", MODES)
async def test_an_attempt_past_its_upstreams_timeout_is_charged_its_prompt(
    fakes: tuple[FakeUpstream, FakeUpstream],
    start_gateway: Any,
    request: pytest.FixtureRequest,
    mode: str,
    ledger: str,
) -> None:
    """up0 hangs past its `timeout_s` and up1 answers: one request, the answer's usage on
    up1 and the hung attempt's prompt on up0, in the ledger and the cost metric."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": f"lost-{mode}"}
    captured = captured_telemetry()
    config = config_for(fakes, timeouts_s=(SHORT_TIMEOUT_S, 10), ledger=section)
    gateway = await start_gateway(config, telemetry=captured.telemetry)
    fakes[0].script(Hang())
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    assert_answer_and_one_lost(await usage(gateway), lost_on="up0")
    cost = captured.total("llm_gateway.cost.usd", llm_gateway__tenant="default")
    assert cost == pytest.approx(ANSWER_USD + PROMPT_USD, abs=1e-12)
    method = "Complete" if mode == "unary" else "CompleteStream"
    assert captured.total("llm_gateway.requests", rpc__method=method) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_lost_attempt_is_charged_its_prompt_as_its_tenants_calibration_counts_it(
    start_gateway: Any, mode: str
) -> None:
    """The tenant's answers report 1.3 times the estimated prompt tokens: an attempt lost
    past its upstream's timeout is charged the prompt's estimate times the calibration,
    not below what the provider counts, in GetUsage and the cost metric (before, the
    plain estimate)."""
    reported = round(1.3 * plain_estimate())
    answer = Reply(prompt_tokens=reported, completion_tokens=5)
    lost_prompt = CALIBRATED + "Once more."
    attempts = itertools.count()

    def respond(body: dict[str, Any]) -> Behaviour:
        # Whichever upstream the call starts on hangs; the other answers.
        if user_text(body) != lost_prompt or next(attempts):
            return answer
        return Hang()

    captured = captured_telemetry()
    async with ScriptedUpstream(respond=respond) as up0, ScriptedUpstream(respond=respond) as up1:
        config = config_for((up0, up1), timeouts_s=(SHORT_TIMEOUT_S, SHORT_TIMEOUT_S))
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        for _ in range(3):
            await call(gateway, "unary", content=CALIBRATED)
        billed = calibrated_estimate(gateway, lost_prompt)
        metadata = await call(gateway, mode, content=lost_prompt, labels=CUT)
        assert (metadata.attempts, metadata.usage.input_tokens) == (2, reported)
        rows = [row for row in (await usage(gateway)).rows if dict(row.labels) == CUT]
    lost = next(row for row in rows if row.upstream != metadata.upstream)
    assert (lost.requests, lost.estimated_requests) == (0, 1)
    assert lost.usage.input_tokens == billed >= reported
    assert lost.usage.output_tokens == 0
    assert lost.cost_usd == pytest.approx(billed * 0.27 / 1e6, abs=1e-12)
    answer_usd = (reported * 0.27 + 5 * 1.10) / 1e6
    cost = captured.total("llm_gateway.cost.usd", llm_gateway__tenant="default")
    assert cost == pytest.approx(4 * answer_usd + lost.cost_usd, abs=1e-12)


# A provider's answer cut short: JSON that ends too soon.
TRUNCATED_JSON = (
    '{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"index": 0, '
    '"message": {"role": "assistant", "content": "Hel'
)
AFTER_SUCCESS_STATUS: dict[str, Behaviour] = {
    "truncated-json": Status(200, body=TRUNCATED_JSON),
    "cut-body": CutStream(after_chunks=0),
    "malformed-sse": MalformedSSE(after_chunks=0),
    "end-without-done": EndWithoutDone(after_chunks=0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(AFTER_SUCCESS_STATUS))
async def test_an_answer_that_fails_after_a_success_status_is_charged_its_prompt(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, fault: str, mode: str
) -> None:
    """A 200 whose body is not JSON, is cut, or whose stream fails before its first text:
    retried on up1, and the attempt up0 took is recorded there as lost."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(10, 10)))
    fakes[0].script(AFTER_SUCCESS_STATUS[fault])
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    assert_answer_and_one_lost(await usage(gateway), lost_on="up0")


@pytest.mark.parametrize(
    ("mode", "fault"),
    [
        ("unary", Status(200, body=TRUNCATED_JSON, headers={"Content-Type": "text/plain"})),
        # No usage event: one would be charged as reported, not as the prompt's estimate.
        (
            "stream",
            Reply(
                content="",
                finish_reason=None,
                include_usage=False,
                headers={"Content-Type": "text/plain"},
            ),
        ),
    ],
    ids=["json-cut", "stream-without-finish"],
)
async def test_an_untyped_answer_that_fails_as_openais_would_is_charged_its_prompt(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, mode: str, fault: Behaviour
) -> None:
    """A proxy that sends the provider's answer as text/plain: JSON cut short, or a stream
    whose events end without a finish reason, is still the provider's, billed as lost."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(10, 10)))
    fakes[0].script(fault)
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    assert_answer_and_one_lost(await usage(gateway), lost_on="up0")


LOGIN_PAGE = "<html><body><form action=/login>Sign in</form></body></html>"
# A 200 that is no OpenAI answer at all: what a wrong base_url answers.
NOT_OPENAI: dict[str, Behaviour] = {
    "html": Status(200, body=LOGIN_PAGE, headers={"Content-Type": "text/html; charset=utf-8"}),
    "html-sent-as-json": Status(200, body=LOGIN_PAGE),  # the fake's Content-Type: JSON
    "html-sent-as-text": Status(200, body=LOGIN_PAGE, headers={"Content-Type": "text/plain"}),
    "json-sent-as-html": Status(200, body=TRUNCATED_JSON, headers={"Content-Type": "text/html"}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(NOT_OPENAI))
async def test_a_success_status_from_some_other_server_is_not_charged(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, fault: str, mode: str
) -> None:
    """A 200 that is no OpenAI answer (a login page, or anything sent as HTML) is no
    provider taking the call: failed over to up1, with nothing recorded on up0 (before,
    its prompt was charged as a lost attempt)."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(10, 10)))
    fakes[0].script(NOT_OPENAI[fault])
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    response = await usage(gateway)
    assert sorted(by_upstream(response)) == ["up1"]
    assert_answered(response.total)


@pytest.mark.parametrize("mode", MODES)
async def test_a_wrong_base_url_is_reported_after_one_attempt(
    start_gateway: Any, mode: str
) -> None:
    """An upstream whose base_url answers a login page: the caller gets UNAVAILABLE saying
    what came back (status, Content-Type, the base_url to check) after one attempt (no
    backoff mends a login page), the breaker counts it, and the ledger has no row (before:
    "malformed answer" after three attempts, their three prompts charged)."""
    resilience = {**FAST_RESILIENCE, "breaker_consecutive_failures": 1}
    async with FakeUpstream(default=NOT_OPENAI["html"]) as fake:
        gateway = await start_gateway(config_for((fake,), timeouts_s=(10,), resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(gateway, mode)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "HTTP 200 (Content-Type text/html)" in caught.value.details()
        assert "check its base_url" in caught.value.details()
        info = error_info(caught.value)
        assert info.reason == "UPSTREAM_UNAVAILABLE"
        assert dict(info.metadata) == {
            "upstream": "up0",
            "http_status": "200",
            "content_type": "text/html",
            "attempts": "1",
        }
        assert len(fake.requests) == 1
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_UNHEALTHY
        assert not (await usage(gateway)).rows


@pytest.mark.parametrize("mode", MODES)
async def test_a_wrong_base_url_spends_none_of_the_tenants_budget(
    start_gateway: Any, mode: str
) -> None:
    """With room for two prompts, a call a login page answered leaves the budget whole: the
    next call, once the upstream answers, is admitted (before, the three prompts charged
    for the login page had spent it, and the call was refused)."""
    budgets = {"default": {"usd": 2 * PROMPT_USD, "period": "day"}}
    async with FakeUpstream() as fake:
        gateway = await start_gateway(config_for((fake,), timeouts_s=(10,), budgets=budgets))
        fake.script(NOT_OPENAI["html"], ANSWER)
        params = pb.GenerationParams(max_tokens=1)  # room for its prompt and one token
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(gateway, mode, params=params)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        metadata = await call(gateway, mode, params=params)
        assert (metadata.upstream, metadata.attempts) == ("up0", 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "fault", [Status(500), Status(429), Reset()], ids=["500", "429", "reset-before-status"]
)
async def test_an_attempt_that_fails_before_a_success_status_is_not_charged(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, fault: Behaviour, mode: str
) -> None:
    """up0 fails with an error status (or a reset before any answer), up1 hangs past its
    `timeout_s`, and up0 answers: only up1's attempt is lost; up0's row is its answer."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(10, SHORT_TIMEOUT_S)))
    fakes[0].script(fault, ANSWER)
    fakes[1].script(Hang())
    metadata = await call(gateway, mode)
    assert (metadata.upstream, metadata.attempts) == ("up0", 3)
    assert_answer_and_one_lost(await usage(gateway), lost_on="up1")


@pytest.mark.parametrize("mode", MODES)
async def test_an_error_sent_with_a_success_status_is_not_charged(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, mode: str
) -> None:
    """A 200 whose body is an error in place of an answer (a reseller relaying a
    provider's failure) is a refusal, billed nothing: retried on up1 with no row lost."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(10, 10)))
    failed = '{"error": {"message": "The server had an error", "type": "server_error"}}'
    fakes[0].script(Status(200, body=failed))
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    response = await usage(gateway)
    assert sorted(by_upstream(response)) == ["up1"]
    assert_answered(by_upstream(response)["up1"])


@pytest.mark.parametrize("mode", MODES)
async def test_an_error_status_whose_body_times_out_is_not_charged(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, mode: str
) -> None:
    """up0 answers 503 at once but its body stalls past up0's `timeout_s`, and up1
    answers: the attempt up0 refused with its status records nothing, as any error status
    does (before, its timeout made it a lost attempt, its prompt charged)."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(SHORT_TIMEOUT_S, 10)))
    fakes[0].script(Status(503, body_delay_s=5.0))
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    response = await usage(gateway)
    assert sorted(by_upstream(response)) == ["up1"]
    assert_answered(response.total)


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_whose_every_attempt_timed_out_is_charged_their_prompts(
    start_gateway: Any, mode: str
) -> None:
    """Both upstreams hang past their `timeout_s` on all three attempts: the caller gets
    UNAVAILABLE (UPSTREAM_TIMEOUT), and the ledger no request but three lost prompts."""
    async with FakeUpstream(default=Hang()) as up0, FakeUpstream(default=Hang()) as up1:
        config = config_for((up0, up1), timeouts_s=(SHORT_TIMEOUT_S, SHORT_TIMEOUT_S))
        gateway = await start_gateway(config)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(gateway, mode)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        info = error_info(caught.value)
        assert (info.reason, info.metadata["attempts"]) == ("UPSTREAM_TIMEOUT", "3")
        response = await usage(gateway)
    rows = by_upstream(response)
    assert sorted(rows) == ["up0", "up1"]
    assert_lost(rows["up0"], attempts=2)  # the first and third attempts
    assert_lost(rows["up1"])
    assert_lost(response.total, attempts=3)


async def test_a_stream_cut_after_text_records_its_lost_attempt_and_itself_once(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any
) -> None:
    """up0 hangs past its `timeout_s`, then up1's stream is cut after two words: up0's
    prompt is lost, and up1's row is the cut stream's alone (one request, one prompt)."""
    gateway = await start_gateway(config_for(fakes, timeouts_s=(SHORT_TIMEOUT_S, 10)))
    fakes[0].script(Hang())
    fakes[1].script(CutStream(after_chunks=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(gateway, "stream")
    assert error_info(caught.value).reason == "STREAM_INTERRUPTED"
    response = await usage(gateway)
    rows = by_upstream(response)
    assert sorted(rows) == ["up0", "up1"]
    assert_lost(rows["up0"])
    cut = rows["up1"]
    assert (cut.requests, cut.estimated_requests) == (1, 1)
    assert cut.usage.input_tokens == prompt_tokens()
    assert cut.usage.output_tokens > 0
    assert (response.total.requests, response.total.estimated_requests) == (1, 2)


@pytest.mark.parametrize("first_caller", ["stays", "leaves"])
async def test_a_shared_call_records_its_lost_attempt_once(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any, first_caller: str
) -> None:
    """Two callers share one upstream call (the cache's flight) whose first attempt hangs
    past up0's `timeout_s`: the lost attempt is recorded once, whether or not the caller
    that started the call stays for the answer."""
    config = config_for(fakes, timeouts_s=(SHORT_TIMEOUT_S, 10), cache={"backend": "memory"})
    gateway = await start_gateway(config)
    fakes[0].script(Hang())
    fakes[1].script(ANSWER)
    request = chat(params=pb.GenerationParams(temperature=0.0))
    first = gateway.stub.Complete(request, timeout=_TIMEOUT_S)
    async with asyncio.timeout(_TIMEOUT_S):
        while not fakes[0].requests:
            await asyncio.sleep(0.01)
    second = gateway.stub.Complete(request, timeout=_TIMEOUT_S)
    async with asyncio.timeout(_TIMEOUT_S):
        while gateway.server.pipeline.cache.following < 2:
            await asyncio.sleep(0.01)
    if first_caller == "leaves":
        first.cancel()
    else:
        assert (await first).metadata.upstream == "up1"
    assert (await second).content == "Hello from fake"
    response = await usage(gateway)
    rows = by_upstream(response)
    assert sorted(rows) == ["up0", "up1"]
    assert_lost(rows["up0"])
    assert rows["up1"].requests == 2  # the answer, and the follower's free cache hit
    assert rows["up1"].cost_usd == pytest.approx(ANSWER_USD, abs=1e-12)
    assert len(fakes[0].requests) == len(fakes[1].requests) == 1


async def test_a_lost_attempt_counts_against_its_tenants_budget(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any
) -> None:
    """With room for one answer and one and a half prompts, a call whose first attempt was
    lost leaves no room for the next call's prompt: the lost prompt is spent."""
    budgets = {"default": {"usd": ANSWER_USD + 1.5 * PROMPT_USD, "period": "day"}}
    gateway = await start_gateway(
        config_for(fakes, timeouts_s=(SHORT_TIMEOUT_S, 10), budgets=budgets)
    )
    fakes[0].script(Hang())
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, "unary"), attempts=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(gateway, "unary")
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_status(caught.value).message.startswith("tenant 'default' has spent")
    assert len(fakes[0].requests) == len(fakes[1].requests) == 1


# Long enough for the answer to come on a loaded machine, short for the suite.
_WRITES_PAUSED_MS = 3000


@pytest.mark.redis
@pytest.mark.parametrize("cache", ["off", "shared"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_call_cut_while_its_lost_attempts_are_recorded_records_them_and_its_answer(
    fakes: tuple[FakeUpstream, FakeUpstream],
    start_gateway: Any,
    redis_server: RedisServer,
    mode: str,
    cache: str,
) -> None:
    """up0 and up1 hang past their `timeout_s`, then up0 answers; Redis holds writes as the
    answer comes (a failover), so recording the two lost attempts waits, and the caller
    cancels meanwhile (with the cache, the shared call is then cut too). Once Redis takes
    writes again the ledger has both lost prompts and the answer: before, the cancel
    stopped the recording at the first lost row, and the answer, which the upstream
    billed, was never recorded."""
    ledger = {"redis_url": redis_server.url, "key_prefix": f"cut-lost-{mode}-{cache}"}
    config = config_for(
        fakes,
        timeouts_s=(SHORT_TIMEOUT_S, SHORT_TIMEOUT_S),
        ledger={**ledger, "operation_timeout_s": 5.0},
        cache={"backend": "memory", "enabled": cache == "shared"},
    )
    gateway = await start_gateway(config)
    fakes[0].script(Hang(), Reply(prompt_tokens=11, completion_tokens=5, delay_s=0.2))
    fakes[1].script(Hang())
    params = pb.GenerationParams(temperature=0.0)  # cacheable: the call runs in a flight
    answered = asyncio.ensure_future(call(gateway, mode, params=params))
    await eventually(lambda: len(fakes[0].requests) == 2)
    counters = gateway.server.pipeline.pool.counters
    client = aioredis.Redis.from_url(redis_server.url)
    loop = asyncio.get_running_loop()
    try:
        await client.execute_command("CLIENT", "PAUSE", _WRITES_PAUSED_MS, "WRITE")
        writes_resume_at = loop.time() + _WRITES_PAUSED_MS / 1000
        # Answered (its third attempt ended: a fixed sleep lost the race on a loaded
        # machine, and the cancel cut the answer), its lost attempts waiting on Redis.
        await eventually(lambda: counters.attempts == 3)
        answered.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answered
    finally:
        await client.aclose()
    assert loop.time() < writes_resume_at  # cancelled while the recording still waited
    # Counted once the server has seen the cancel: a lookup counts as the flight it ended on.
    await eventually(lambda: gateway.server.pipeline.cache.stats.misses == (cache == "shared"))
    ledger_ = gateway.server.pipeline.ledger
    await asyncio.sleep(max(0.0, writes_resume_at - loop.time()) + 0.1)  # writes taken again
    await eventually(lambda: ledger_.late_releases.pending == 0)
    response = await usage(gateway)
    rows = by_upstream(response)
    assert sorted(rows) == ["up0", "up1"]
    assert_lost(rows["up1"])
    answer_and_lost = rows["up0"]
    assert (answer_and_lost.requests, answer_and_lost.estimated_requests) == (1, 1)
    assert answer_and_lost.usage.input_tokens == 11 + prompt_tokens()
    assert answer_and_lost.usage.output_tokens == 5
    assert answer_and_lost.cost_usd == pytest.approx(ANSWER_USD + PROMPT_USD, abs=1e-12)


async def test_a_streamed_unary_attempt_lost_after_its_usage_is_charged_that_usage(
    fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: Any
) -> None:
    """up0 reads unary calls as streams (`stream_unary_calls`) and resets one after its
    usage event, before its finish reason: the call is answered by up1, and the attempt
    lost on up0 is charged the usage it reported, cached input at its price, as a stream
    cut there is (before, the prompt's estimate at the full input price, and the text's
    estimate)."""
    data = gateway_config_data(
        *(fake.base_url for fake in fakes),
        models=CACHE_PRICED_MODELS,
        resilience=FAST_RESILIENCE,
    )
    data["upstreams"][0]["stream_unary_calls"] = True
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    fakes[0].script(dataclasses.replace(CACHED_PROMPT, cut_before_done=True, finish_reason=None))
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, "unary"), attempts=2)
    lost = by_upstream(await usage(gateway))["up0"]
    assert (lost.requests, lost.estimated_requests) == (0, 0)
    assert not lost.usage.estimated
    assert (lost.usage.input_tokens, lost.usage.cached_input_tokens) == (1000, 800)
    assert lost.usage.output_tokens == 3
    assert lost.cost_usd == pytest.approx(CACHED_PROMPT_USD, abs=1e-12)


# A whole answer refused as malformed (more tool calls than an answer may make), whose
# usage says what the provider billed for it: most of its prompt cached, and its output.
TOO_MANY_CALLS = dataclasses.replace(
    CACHED_PROMPT,
    content="",
    tool_calls=tuple(ToolCallReply(f"call_{i}", "f", "{}") for i in range(1025)),
    completion_tokens=9000,
    ignore_stream=True,  # a stream too is answered as one completion
)
TOO_MANY_CALLS_USD = (200 * 0.27 + 800 * 0.07 + 9000 * 1.10) / 1e6


@pytest.mark.parametrize("ledger", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("mode", MODES)
async def test_a_whole_answer_refused_as_malformed_is_charged_the_usage_it_reported(
    fakes: tuple[FakeUpstream, FakeUpstream],
    start_gateway: Any,
    request: pytest.FixtureRequest,
    mode: str,
    ledger: str,
) -> None:
    """up0's answer makes 1,025 tool calls, one past the bound: refused as malformed and
    answered by up1. The provider billed it as its usage says, its 9,000 output tokens
    and cached input included: the attempt lost on up0 is charged that (before, the
    prompt's estimate alone, at the full input price, and none of its output)."""
    section = {}
    if ledger == "redis":
        section = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": f"bad-{mode}"}
    config = config_for(fakes, timeouts_s=(10, 10), models=CACHE_PRICED_MODELS, ledger=section)
    gateway = await start_gateway(config)
    fakes[0].script(TOO_MANY_CALLS)
    fakes[1].script(ANSWER)
    assert_the_answers_own(await call(gateway, mode), attempts=2)
    lost = by_upstream(await usage(gateway))["up0"]
    assert (lost.requests, lost.estimated_requests) == (0, 0)
    assert not lost.usage.estimated
    assert (lost.usage.input_tokens, lost.usage.cached_input_tokens) == (1000, 800)
    assert lost.usage.output_tokens == 9000
    assert lost.cost_usd == pytest.approx(TOO_MANY_CALLS_USD, abs=1e-12)
