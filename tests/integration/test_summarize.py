"""Summarize through the real server, against an upstream that records every part."""

import asyncio
import dataclasses
import itertools
import math
import re

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway_client import GatewayClient
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from service.calibration import TokenCalibration
from service.config import BudgetConfig
from service.tokens import PER_MESSAGE_OVERHEAD, PER_REQUEST_OVERHEAD, estimate_text_tokens
from service.validation import has_control_characters
from tests.conftest import FAKE_MODEL, chat, fake_model_window, gateway_config
from tests.fake_upstream import Hang, Reply, Status
from tests.integration.helpers import error_info, field_violations, rich_status
from tests.scripted_upstream import ScriptedUpstream, system_text, user_text
from tests.telemetry_support import attributes_of, captured_telemetry

WINDOW = 1024
CONCURRENCY = 3
OVERLAP = 32
PART_HEADER = re.compile(r"^Part (\d+) of (\d+):\n\n")


def document(paragraphs: int, sentences: int = 5) -> str:
    """Numbered paragraphs of numbered sentences (about 15 tokens each)."""
    return "\n\n".join(
        " ".join(f"Paragraph p{p} sentence s{s} says something." for s in range(sentences))
        for p in range(paragraphs)
    )


def sentences(text: str) -> list[str]:
    """The numbered sentences in `text`, in order."""
    return re.findall(r"Paragraph p\d+ sentence s\d+ says something\.", text)


def config(
    base_url: str, *, upstream_attempts: int | None = None, window: int = WINDOW, **summarize
):
    """A 1024-token window and a summarize section for the tests; `upstream_attempts`: the
    pipeline's own tries per call (1: a failure reaches Summarize's retry at once)."""
    resilience = {} if upstream_attempts is None else {"attempts": upstream_attempts}
    return gateway_config(
        base_url,
        resilience=resilience,
        models=fake_model_window(window),
        summarize={
            "concurrency": CONCURRENCY,
            "chunk_overlap_tokens": OVERLAP,
            "default_target_tokens": 64,
            "retry_backoff_s": 0.01,
            **summarize,
        },
    )


def is_part(body) -> bool:
    """Whether a recorded request summarises one part of the document."""
    return system_text(body).startswith("You summarise one part")


def is_combine(body) -> bool:
    """Whether a recorded request combines summaries."""
    return system_text(body).startswith("You are given summaries")


def default_respond(body):
    """Parts answer with the range of sentences they saw; combines answer FINAL."""
    if is_part(body):
        seen = sentences(user_text(body))
        return Reply(content=f"[{seen[0][10:23]} .. {seen[-1][10:23]}]", delay_s=0.05)
    if is_combine(body):
        return Reply(content="FINAL")
    return Reply(content="WHOLE")


@pytest.fixture
async def recorder():
    """The scripted upstream."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=default_respond) as fake:
        yield fake


async def test_a_summarys_upstream_time_counts_parts_waited_side_by_side_once(
    recorder, start_gateway
):
    """Parts summarised side by side wait on the upstream together: `upstream_ms` is the
    time they covered, within the call's total, and the overhead trailer is what is left.
    Before, their waits were summed and passed the call's wall time."""

    def slow_parts(body):
        reply = default_respond(body)
        return dataclasses.replace(reply, delay_s=0.3) if is_part(body) else reply

    recorder.respond = slow_parts
    gateway = await start_gateway(config(recorder.base_url))
    call = gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    response = await call
    overhead = float(dict(await call.trailing_metadata())["llm-gateway-overhead-ms"])
    timings = response.timings
    assert response.chunks >= 5
    assert recorder.peak_in_flight >= 2
    assert 300 <= timings.upstream_ms <= timings.total_ms
    assert overhead == pytest.approx(timings.total_ms - timings.upstream_ms, abs=50)


async def test_a_summary_whose_parts_share_anothers_calls_counts_that_wait_upstream(
    recorder, start_gateway
):
    """Two identical summaries at once: the second's parts join the first's upstream calls
    (single flight), and its `upstream_ms` is the time it waited on them, as a coalesced
    `Complete`'s is, with its overhead trailer what is left. Before, a shared part counted
    as no wait at all: `upstream_ms` 0, while the trailer left the wait out, so
    `total_ms - upstream_ms` passed the gateway's own work by the whole wait."""

    def slow_parts(body):
        reply = default_respond(body)
        return dataclasses.replace(reply, delay_s=0.3) if is_part(body) else reply

    recorder.respond = slow_parts
    gateway = await start_gateway(config(recorder.base_url))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    first = gateway.stub.Summarize(request)
    async with asyncio.timeout(10):
        while not recorder.requests:  # the first's parts are upstream: the second joins them
            await asyncio.sleep(0.01)
    second = gateway.stub.Summarize(request)
    answers = await asyncio.gather(first, second)
    overhead = float(dict(await second.trailing_metadata())["llm-gateway-overhead-ms"])
    shared = answers[1].timings
    assert answers[1].summary == answers[0].summary
    assert 100 <= shared.upstream_ms <= shared.total_ms
    assert overhead == pytest.approx(shared.total_ms - shared.upstream_ms, abs=50)


async def test_long_document_is_chunked_summarised_concurrently_and_combined(
    recorder, start_gateway
):
    """Chunks fit, end at sentence ends, overlap, cover the document; concurrency is bounded."""
    gateway = await start_gateway(config(recorder.base_url))
    text = document(60)
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    combines = [r.body for r in recorder.requests if is_combine(r.body)]
    assert response.summary == "FINAL"
    assert response.chunks == len(parts) >= 5
    assert response.levels == 1
    assert len(combines) == 1
    assert response.upstream_calls == len(parts) + 1 == len(recorder.requests)
    assert response.usage.input_tokens == 7 * response.upstream_calls
    assert response.cost_usd == pytest.approx(response.upstream_calls * (7 * 0.14 + 3 * 0.42) / 1e6)
    # Each part is numbered once, fits the window with its answer, and ends a sentence.
    numbered = {}
    for body in parts:
        header = PART_HEADER.match(user_text(body))
        assert header is not None
        assert int(header.group(2)) == len(parts)
        chunk = user_text(body)[header.end() :]
        numbered[int(header.group(1))] = chunk
        assert chunk.endswith("says something.")
        assert estimate_text_tokens(chunk) + body["max_tokens"] < WINDOW
    assert sorted(numbered) == list(range(1, len(parts) + 1))
    chunks = [numbered[i] for i in sorted(numbered)]
    # Together the chunks cover every sentence, in order; neighbours overlap, but little.
    covered: list[str] = []
    for chunk in chunks:
        covered += [s for s in sentences(chunk) if s not in covered]
    assert covered == sentences(text)
    for before, after in itertools.pairwise(chunks):
        first = sentences(after)[0]
        assert first in sentences(before)
        assert estimate_text_tokens(before[before.index(first) :]) <= OVERLAP + 2
    # The combine call got every part's summary, in document order.
    combined = user_text(combines[0])
    expected = [f"[{sentences(c)[0][10:23]} .. {sentences(c)[-1][10:23]}]" for c in chunks]
    assert [line for line in combined.splitlines() if line.startswith("[")] == expected
    assert 2 <= recorder.peak_in_flight <= CONCURRENCY


async def test_a_document_one_part_holds_is_summarised_in_one_call(recorder, start_gateway):
    """A document too long for one call with the target's answer, which one part with a
    part's shorter answer holds, is summarised in one call asking for that shorter answer.
    Before, it was summarised as "Part 1 of 1" and that one summary combined again: two
    calls, the second paying for the same text again. Sizes either side of the gap keep
    their one call (the whole, with the target's answer) or their parts and combine."""
    # Answers without usage: the token calibration stays where it starts, so each size
    # is split as it would be first.
    recorder.respond = lambda body: dataclasses.replace(default_respond(body), include_usage=False)
    gateway = await start_gateway(config(recorder.base_url))
    target = 250  # a part's answer is at most an eighth of the 1024 window: 128

    async def calls(paragraphs: int) -> list[dict]:
        recorder.requests.clear()
        # Each size its own text: no part is answered from another's cached call.
        text = f"Edition {paragraphs}.\n\n{document(paragraphs)}"
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=text, target_tokens=target)
        response = await gateway.stub.Summarize(request)
        assert response.upstream_calls == len(recorder.requests)
        return [r.body for r in recorder.requests]

    sizes = {paragraphs: await calls(paragraphs) for paragraphs in range(4, 16)}
    shorter = [p for p, bodies in sizes.items() if [b["max_tokens"] for b in bodies] == [128]]
    assert shorter, "some sizes fall in the gap"
    for paragraphs in shorter:
        [body] = sizes[paragraphs]
        assert not is_part(body)
        assert "at most about 96 words" in system_text(body)
    assert [b["max_tokens"] for b in sizes[4]] == [target]  # the whole, the target's answer
    assert len(sizes[15]) >= 3  # parts and a combine
    assert all(len(bodies) != 2 for bodies in sizes.values())


async def test_every_summarising_call_thinks_at_the_effort_asked_for(recorder, start_gateway):
    """A reasoning effort on the Summarize request reaches every part and combine call
    (thinking is billed as output on each); without one, none is sent."""
    gateway = await start_gateway(config(recorder.base_url))
    low = pb.SummarizeRequest(
        model=FAKE_MODEL, document=document(60), reasoning_effort=pb.REASONING_EFFORT_LOW
    )
    assert (await gateway.stub.Summarize(low)).summary == "FINAL"
    assert len(recorder.requests) >= 3
    assert {r.body.get("reasoning_effort") for r in recorder.requests} == {"low"}
    sent = len(recorder.requests)
    async with GatewayClient(gateway.server.address) as client:
        await client.summarize("A short text.", model=FAKE_MODEL, reasoning_effort="max")
        await client.summarize("A short text, again.", model=FAKE_MODEL)
    assert [r.body.get("reasoning_effort") for r in recorder.requests[sent:]] == ["max", None]


async def test_long_summaries_are_combined_recursively(recorder, start_gateway):
    """When the part summaries do not fit one call they are grouped and summarised again."""
    long_summary = " ".join(["summary"] * 150)

    def respond(body):
        if is_part(body):
            return Reply(content=long_summary)
        if is_combine(body) and body["max_tokens"] < 200:
            return Reply(content="MID " + long_summary)
        return Reply(content="FINAL")

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60), target_tokens=200)
    )
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    middles = [
        r.body for r in recorder.requests if is_combine(r.body) and r.body["max_tokens"] < 200
    ]
    finals = [r.body for r in recorder.requests if r.body["max_tokens"] == 200]
    assert response.summary == "FINAL"
    assert response.levels == 2
    assert response.chunks == len(parts)
    assert 2 <= len(middles) < len(parts)
    assert len(finals) == 1
    # Every part summary went into exactly one second-level call.
    assert sum(user_text(m).count("Summary of part") for m in middles) == len(parts)
    assert user_text(finals[0]).count("MID") == len(middles)
    assert response.upstream_calls == len(parts) + len(middles) + 1


async def test_a_part_the_upstream_refuses_fails_the_call_at_once_naming_the_part(
    recorder, start_gateway
):
    """A part the upstream refuses itself (a 400 that is not about length: its moderation,
    say) is not retried, and the caller hears which part: INVALID_ARGUMENT,
    UPSTREAM_REJECTED_REQUEST, with the part, parts and level in the ErrorInfo. It used
    to carry no more than a refused Complete would, leaving the caller to guess where in
    a long document the refusal was."""
    flagged = '{"error": {"message": "Input flagged", "type": "invalid_request_error"}}'

    def respond(body):
        if is_part(body) and header(body).startswith("Part 2 of"):
            return Status(400, body=flagged)
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert (info.metadata["part"], info.metadata["level"]) == ("2", "1")
    assert int(info.metadata["parts"]) > 2
    assert "part 2 of" in caught.value.details()
    assert caught.value.details().endswith("(HTTP 400): Input flagged")
    assert info.metadata["upstream_message"] == "Input flagged"
    refused = [r for r in recorder.requests if header(r.body).startswith("Part 2 of")]
    assert len(refused) == 1  # not retried


async def test_summaries_that_never_fit_one_call_fail_on_the_document(recorder, start_gateway):
    """Past `max_levels` the caller gets INVALID_ARGUMENT on `document`, not INTERNAL."""
    recorder.respond = lambda body: Reply(content=" ".join(["summary"] * 150))
    gateway = await start_gateway(config(recorder.base_url, max_levels=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document(60), target_tokens=200)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert list(violations) == ["document"]
    assert "summarize.max_levels" in violations["document"]
    assert not any(is_combine(r.body) for r in recorder.requests)  # gave up before combining


def full_answer(body) -> Reply:
    """An answer as long as the call's max_tokens allows, by the gateway's estimate (and
    no usage that would calibrate it)."""
    words = ["summary"]
    while estimate_text_tokens(" ".join([*words, "summary"])) <= body["max_tokens"]:
        words.append("summary")
    return Reply(content=" ".join(words), prompt_tokens=0)


# OpenAI's reasoning models (o-series, gpt-5) take only their default temperature.
TEMPERATURE_REFUSED = (
    '{"error": {"message": "Unsupported value: \'temperature\' does not support 0 with this '
    'model. Only the default (1) value is supported.", "type": "invalid_request_error", '
    '"param": "temperature", "code": "unsupported_value"}}'
)


async def test_a_model_that_refuses_temperature_0_is_summarised_without_it(recorder, start_gateway):
    """An upstream that refuses the summarising calls' temperature 0 (OpenAI's reasoning
    models answer 400 for any but their default) has the part asked again at once without
    one, and the model's later parts and summaries go without it. Before, every Summarize
    of such a model failed INVALID_ARGUMENT on a temperature the caller never set, and no
    setting could stop the gateway sending it."""

    def respond(body):
        if "temperature" in body:
            return Status(400, body=TEMPERATURE_REFUSED)
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    assert response.summary == "FINAL"
    assert response.chunks > 2
    refused = [r.body for r in recorder.requests if "temperature" in r.body]
    assert len(refused) == 1  # the first part's first try; the others went without
    answered = [r.body for r in recorder.requests if "temperature" not in r.body]
    assert response.upstream_calls == len(answered)
    assert header(refused[0]) == header(answered[0])  # the refused part, asked again


async def test_a_temperature_refused_by_an_upstream_that_takes_it_still_fails_the_call(
    recorder, start_gateway
):
    """The part is asked again without its temperature once only: an upstream that
    refuses that too fails the call, as any refusal does, naming the part."""

    def respond(body):
        return Status(400, body=TEMPERATURE_REFUSED) if is_part(body) else default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "UPSTREAM_REJECTED_REQUEST"
    assert [("temperature" in r.body) for r in recorder.requests] == [True, False]


@pytest.mark.parametrize("max_levels", [2, 3])
async def test_a_document_needing_more_levels_than_max_levels_is_refused_up_front(
    recorder, start_gateway, max_levels
):
    """Parts that answer as long as they may: the summaries of this document's parts fit
    one combine call only after two levels of groups (three levels in all). Under
    max_levels 2 the run is refused before any upstream call, on `document`, saying the
    levels it would need; under 3 it runs its three levels and returns the summary.

    Before, the run under max_levels 2 paid for every part and group, then failed."""
    recorder.respond = full_answer
    gateway = await start_gateway(config(recorder.base_url, max_levels=max_levels))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(300), target_tokens=200)
    if max_levels == 3:
        response = await gateway.stub.Summarize(request)
        assert response.levels == 3
        assert response.summary.startswith("summary")
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert list(violations) == ["document"]
    assert "in 2 levels (summarize.max_levels)" in violations["document"]
    assert "would need 3 levels" in violations["document"]
    assert recorder.requests == []


async def test_short_document_is_one_call(recorder, start_gateway):
    """A document that fits is summarised in one call, sent as it is."""
    gateway = await start_gateway(config(recorder.base_url))
    text = document(2)
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=text, instructions="In French.")
    )
    assert (response.summary, response.chunks, response.levels) == ("WHOLE", 1, 1)
    assert response.upstream_calls == 1
    (only,) = recorder.requests
    assert user_text(only.body) == text
    assert system_text(only.body).endswith("In French.")
    assert only.body["max_tokens"] == 64


async def test_a_small_model_summarises_with_a_default_target_scaled_to_its_window(
    recorder, start_gateway
):
    """Without target_tokens, a model whose window is under four times the configured
    default gets a quarter of its window as the target, as Complete's answer reserve does.

    Before, the default (256 here) was refused as over a quarter of a 512-token window."""
    gateway = await start_gateway(config(recorder.base_url, window=512, default_target_tokens=256))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(2))
    )
    assert (response.summary, response.chunks) == ("WHOLE", 1)
    (only,) = recorder.requests
    assert only.body["max_tokens"] == 128
    # A target asked for that does not fit is still refused, on its field.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document(2), target_tokens=200)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {
        "target_tokens": "at most a quarter of the model's context window (128), got 200"
    }


async def test_failing_part_is_retried_then_fails_the_call(recorder, start_gateway):
    """A part that keeps failing fails the RPC with a clear status; nothing is combined."""

    def respond(body):
        if is_part(body) and "Paragraph p30 sentence s2" in user_text(body):
            return Status(500)
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=3))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    details = error_details(caught.value)
    assert details.reason == "SUMMARIZE_PART_FAILED"
    assert details.metadata["attempts"] == "3"
    assert "no partial summary" in details.message
    poisoned = [r for r in recorder.requests if "Paragraph p30 sentence s2" in user_text(r.body)]
    assert len(poisoned) >= 3
    assert not any(is_combine(r.body) for r in recorder.requests)


async def test_a_failed_part_names_each_attempt_of_every_try(recorder, start_gateway):
    """A part failing 500, 502 (its first try's two attempts), then 503, 504 (its next
    try's): the status names all four in order, not only the 504 its message says. Before,
    nothing said the earlier three had failed."""
    statuses = iter((500, 502, 503, 504))

    def respond(body):
        if is_part(body) and "Paragraph p30 sentence s2" in user_text(body):
            return Status(next(statuses))
        return default_respond(body)

    recorder.respond = respond
    settings = config(recorder.base_url, upstream_attempts=2, chunk_attempts=2)
    gateway = await start_gateway(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    details = error_details(caught.value)
    assert (details.reason, details.metadata["attempts"]) == ("SUMMARIZE_PART_FAILED", "2")
    attempts = "up0: HTTP 500; up0: HTTP 502; up0: HTTP 503; up0: HTTP 504"
    assert details.metadata["attempt_errors"] == attempts
    assert "(HTTP 504); no partial summary is returned" in details.message
    assert details.message.endswith(f" (attempts: {attempts})")


async def test_a_failing_parts_next_tries_are_held_to_the_retry_budget(recorder, start_gateway):
    """A part's next try runs again what failed after the pool's own tries: it is held to
    the upstream's retry budget as a retry is. With no budget left, a failing upstream
    gets the part once, not once for each of `chunk_attempts` (times the pool's
    attempts), and the call still fails SUMMARIZE_PART_FAILED. Before, each try counted as
    a new request, so a failing provider got every part's tries in full."""

    def respond(body):
        if is_part(body) and "Paragraph p30 sentence s2" in user_text(body):
            return Status(500)
        return default_respond(body)

    recorder.respond = respond
    settings = config(recorder.base_url, upstream_attempts=1, chunk_attempts=3)
    no_retries = dataclasses.replace(
        settings.resilience, retry_budget_ratio=0.0, retry_budget_min_retries=0
    )
    gateway = await start_gateway(dataclasses.replace(settings, resilience=no_retries))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    details = error_details(caught.value)
    assert details.reason == "SUMMARIZE_PART_FAILED"
    assert "HTTP 500" in details.message  # the upstream's failure, not the budget's refusal
    poisoned = [r for r in recorder.requests if "Paragraph p30 sentence s2" in user_text(r.body)]
    assert len(poisoned) == 1
    assert not any(is_combine(r.body) for r in recorder.requests)


async def test_a_summary_run_again_after_a_part_failed_pays_only_for_what_was_missing(
    recorder, start_gateway
):
    """Parts are summarised deterministically (temperature 0), so they are cached: run
    again after its last part failed (as a retry policy would), with the token calibration
    unchanged, the Summarize sends only that part and the combine upstream, and its
    upstream_calls count only those; a third run sends nothing and costs nothing.

    Before, parts were sampled (temperature 0.2) and never cached: every part was sent,
    and paid for, again."""
    healthy = []
    last = "Paragraph p59 sentence s4"

    def respond(body):
        if is_part(body) and last in user_text(body) and not healthy:
            return Status(500, delay_s=0.3)  # after the parts running beside it finished
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=2, upstream_attempts=1))
    # Another document first: the token calibration it settles splits both runs alike.
    await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(40, 4)))
    before = len(recorder.requests)
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert error_details(caught.value).reason == "SUMMARIZE_PART_FAILED"
    assert len(recorder.requests) - before > 3
    first_run = len(recorder.requests)
    healthy.append(True)
    response = await gateway.stub.Summarize(request)
    assert response.summary == "FINAL"
    again = [r.body for r in recorder.requests[first_run:]]
    assert [is_part(b) for b in again] == [True, False]  # the failed part, then the combine
    assert last in user_text(again[0])
    assert response.chunks > 2
    assert response.upstream_calls == 2
    third = await gateway.stub.Summarize(request)
    assert (third.summary, third.upstream_calls, third.cost_usd) == ("FINAL", 0, 0.0)
    assert third.usage.output_tokens == response.usage.output_tokens  # the same summary
    assert len(recorder.requests) == first_run + 2


def part_number(body) -> int | None:
    """The number of the part a recorded request summarises (None: not a part)."""
    found = PART_HEADER.match(user_text(body))
    return int(found.group(1)) if found is not None and is_part(body) else None


async def test_a_failed_part_lets_its_siblings_in_flight_finish_and_be_cached(
    recorder, start_gateway
):
    """Part 3 fails for good while parts 1 and 2 are with the upstream: no other part
    starts, but those two are answered in full and billed once, as reported; the call
    fails SUMMARIZE_PART_FAILED as before, and run again once part 3 is mended it sends
    only the parts not summarised before, and the combine.

    Before, parts 1 and 2 were cut at once: billed their estimated prompt, not cached,
    and sent (and paid) again on the rerun."""
    broken = [True]

    def respond(body):
        if part_number(body) == 3 and broken:
            return Status(500)
        reply = default_respond(body)
        # Still with the upstream when part 3's failure comes back.
        return dataclasses.replace(reply, delay_s=0.2) if is_part(body) else reply

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=1, upstream_attempts=1))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(40))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    details = error_details(caught.value)
    assert (details.reason, details.metadata["part"]) == ("SUMMARIZE_PART_FAILED", "3")
    first_run = [part_number(r.body) for r in recorder.requests]
    assert sorted(first_run) == [1, 2, 3]  # part 4 never started
    assert (recorder.finished, recorder.disconnects) == (3, 0)
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.requests, total.estimated_requests) == (2, 0)
    assert (total.usage.input_tokens, total.usage.output_tokens) == (2 * 7, 2 * 3)
    assert total.cost_usd == pytest.approx(2 * (7 * 0.14 + 3 * 0.42) / 1e6)
    broken.clear()
    response = await gateway.stub.Summarize(request)
    assert (response.summary, response.chunks, response.upstream_calls) == ("FINAL", 4, 3)
    again = [r.body for r in recorder.requests[len(first_run) :]]
    assert sorted(map(part_number, again[:-1])) == [3, 4]
    assert is_combine(again[-1])


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_caller_leaving_after_a_part_failed_cuts_the_parts_in_flight(
    recorder, start_gateway, how
):
    """Parts in flight when another failed run on for the summary, but not past its
    caller: a cancel, or the deadline, closes their upstream requests at once, and each
    is billed as a cut call."""

    def respond(body):
        if part_number(body) == 3:
            return Status(500)
        return Hang() if is_part(body) else default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=1, upstream_attempts=1))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(40))
    call = gateway.stub.Summarize(request, timeout=None if how == "cancel" else 1.0)
    await recorder.wait_until(lambda: recorder.finished == 1 and recorder.in_flight == 2)
    if how == "cancel":
        call.cancel()
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await call
    await recorder.wait_for_disconnect()
    await recorder.wait_for_disconnect()
    total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert (total.requests, total.estimated_requests, total.usage.output_tokens) == (2, 2, 0)


async def test_parts_a_budget_refuses_for_their_siblings_holds_wait_their_turn(
    recorder, start_gateway
):
    """A budget with room for one part's expected cost at a time (its prompt and its
    answer's max_tokens), and for far more than the summary spends: a part refused only
    for what the parts running beside it hold waits for them to end. Before, the call
    failed RESOURCE_EXHAUSTED with a 1 s retry, its other parts cancelled, and so on every
    retry: the summary could never be made."""
    budgets = {"default": BudgetConfig(usd=0.00025, period="day")}
    gateway = await start_gateway(dataclasses.replace(config(recorder.base_url), budgets=budgets))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    response = await gateway.stub.Summarize(request, timeout=30)
    assert response.summary == "FINAL"
    assert response.chunks >= 2 * CONCURRENCY
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert usage.total.requests == response.upstream_calls
    assert usage.total.cost_usd == pytest.approx(response.cost_usd)


async def test_a_part_retried_after_a_429_waits_its_retry_after(recorder, start_gateway):
    """Summarize's own retry of a part, after its short backoff, still waits out the
    429's Retry-After: the upstream is paused for it, so a rate-limited provider is not
    asked again before it said to."""
    failures = []

    def respond(body):
        if is_part(body) and "Paragraph p30 sentence s2" in user_text(body) and not failures:
            failures.append(body)
            return Status(429, headers={"Retry-After": "1"})
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, upstream_attempts=1))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    assert response.summary == "FINAL"
    poisoned = [r for r in recorder.requests if "Paragraph p30 sentence s2" in user_text(r.body)]
    assert len(poisoned) == 2
    assert poisoned[1].received_at - poisoned[0].received_at >= 0.9


async def test_parts_past_an_upstreams_concurrency_wait_their_turn(recorder, start_gateway):
    """Parts summarised 3 at a time against an upstream that takes 1 call at a time, each
    slower than `max_limit_wait_s`: the parts wait their turn, as a batch's items do. They
    are the gateway's own queue; before, the parts behind failed RESOURCE_EXHAUSTED on
    each try, and the call UNAVAILABLE, with the upstream well and the deadline far off."""

    def slow_parts(body):
        reply = default_respond(body)
        return dataclasses.replace(reply, delay_s=0.3) if is_part(body) else reply

    recorder.respond = slow_parts
    settings = config(recorder.base_url, chunk_attempts=2)
    resilience = dataclasses.replace(settings.resilience, max_limit_wait_s=0.1)
    upstream = dataclasses.replace(settings.upstreams[0], max_concurrency=1)
    gateway = await start_gateway(
        dataclasses.replace(settings, resilience=resilience, upstreams=(upstream,))
    )
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(30)), timeout=60
    )
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert response.summary == "FINAL"
    assert response.chunks == len(parts) >= CONCURRENCY
    assert recorder.peak_in_flight == 1


async def test_part_that_fails_once_is_retried(recorder, start_gateway):
    """A transient failure of one part is retried and the summary completes."""
    failures = []

    def respond(body):
        if is_part(body) and "Paragraph p30 sentence s2" in user_text(body) and not failures:
            failures.append(body)
            return Status(503)
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    assert response.summary == "FINAL"
    assert len(failures) == 1
    assert response.upstream_calls == response.chunks + 1


async def test_a_part_whose_failure_opened_the_breaker_waits_its_cool_down(recorder, start_gateway):
    """A part's 500 opens its only upstream's breaker: its next try waits for the
    cool-down, its deadline outlasting it, and is sent as the breaker's probe. Before, it
    came after `retry_backoff_s`, was refused `circuit open` unsent at once, and so was
    every later try: the summary failed in milliseconds though parts are retried."""
    answers = iter((Status(500), Reply(content="WHOLE")))
    recorder.respond = lambda body: next(answers)
    settings = config(recorder.base_url, upstream_attempts=1, chunk_attempts=3)
    breaker = {"breaker_consecutive_failures": 1, "breaker_cool_down_s": 0.5}
    resilience = dataclasses.replace(settings.resilience, **breaker)
    gateway = await start_gateway(dataclasses.replace(settings, resilience=resilience))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(2)), timeout=10
    )
    assert (response.summary, response.upstream_calls) == ("WHOLE", 1)
    assert len(recorder.requests) == 2
    health = (await gateway.stub.ListModels(pb.ListModelsRequest())).models[0].upstreams[0]
    assert health.health == pb.UPSTREAM_HEALTH_HEALTHY


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.SummarizeRequest(model=FAKE_MODEL, document="  "), "INVALID_ARGUMENT", "document"),
        (
            pb.SummarizeRequest(model=FAKE_MODEL, document="x" * 5000),
            "INVALID_ARGUMENT",
            "document",
        ),
        (
            pb.SummarizeRequest(model=FAKE_MODEL, document="text", target_tokens=900),
            "INVALID_ARGUMENT",
            "target_tokens",
        ),
        (pb.SummarizeRequest(model="nope", document="text"), "NOT_FOUND", None),
        (
            pb.SummarizeRequest(model=FAKE_MODEL, document="text", reasoning_effort=99),
            "INVALID_ARGUMENT",
            "reasoning_effort",
        ),
    ],
)
async def test_invalid_requests(recorder, start_gateway, request_, code, field):
    """Empty or oversize documents, absurd targets and unknown models are refused up front."""
    gateway = await start_gateway(config(recorder.base_url, max_document_bytes=4096))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request_)
    assert caught.value.code().name == code
    if field:
        assert error_details(caught.value).field_violations[0][0] == field
    assert recorder.requests == []


@pytest.mark.parametrize("target_tokens", [1, 5, 31])
async def test_a_target_under_the_least_summary_is_refused(
    recorder, start_gateway, target_tokens: int
):
    """An explicit target_tokens under 32 (about 24 words) is INVALID_ARGUMENT on it,
    naming the least one, before any part is sent.

    Before, it went through: the model was asked for "at most about 10 words" with
    `max_tokens` of the target itself, an answer cut off within a word or two."""
    gateway = await start_gateway(config(recorder.base_url))
    request = pb.SummarizeRequest(
        model=FAKE_MODEL, document=document(2), target_tokens=target_tokens
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {
        "target_tokens": f"at least 32 (or 0: the default), got {target_tokens}"
    }
    assert recorder.requests == []


async def test_the_least_target_is_summarised(recorder, start_gateway):
    """A target_tokens of exactly 32 is accepted and asked of the model."""
    gateway = await start_gateway(config(recorder.base_url))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(2), target_tokens=32)
    response = await gateway.stub.Summarize(request)
    assert response.summary == "WHOLE"
    assert [body["max_tokens"] for body in (r.body for r in recorder.requests)] == [32]


async def test_long_instructions_are_refused_having_read_only_what_the_limit_needs(
    recorder, start_gateway, estimator_reads: list[int]
):
    """Instructions of 600,000 characters, far over an eighth of the window, are refused
    on `instructions` with no more of them estimated than the limit needs.

    Before, they were estimated whole first: a quarter second of the event loop for
    4 MiB, every other call on the gateway stalled, for a request refused anyway."""
    gateway = await start_gateway(config(recorder.base_url))
    instructions = "Be brief. " * 60_000
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(2), instructions=instructions)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"instructions": f"at most about {WINDOW // 8} tokens"}
    assert sum(estimator_reads) < len(instructions)
    assert recorder.requests == []


async def test_instructions_over_an_eighth_of_the_request_bytes_are_refused_on_their_field(
    recorder, start_gateway
):
    """Instructions of 100,011 bytes on a model of a million tokens (within an eighth of its
    window) under a `max_request_bytes` of 64 KiB: refused on `instructions`, past an eighth
    of that limit (as of the window: each call holds them beside a part), before any call.

    Before, every call was refused for its size, on `messages`, a field a Summarize does
    not have, its message never naming the instructions."""
    gateway = await start_gateway(
        gateway_config(
            recorder.base_url,
            models=fake_model_window(1_000_000),
            defaults={"max_request_bytes": 65536},
        )
    )
    instructions = "Be brief please. " * 5883
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(3), instructions=instructions)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"instructions": "at most 8192 bytes, got 100011"}
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("", "must not be empty"),
        ("m" * 100_000, "must be a printable name of at most 256 characters"),
        ("bad\nname", "must be a printable name of at most 256 characters"),
    ],
    ids=["empty", "100-KB", "control-character"],
)
async def test_an_invalid_model_name_is_refused_as_complete_refuses_it(
    recorder, start_gateway, model: str, problem: str
):
    """The model field follows Complete's rules: INVALID_ARGUMENT on `model`, with a short
    status (a 100 KB name echoed whole would not fit the trailers a client accepts)."""
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=model, document="text"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"model": problem}
    assert len(caught.value.details() or "") < 1000
    assert recorder.requests == []


async def test_every_bad_field_of_a_summary_is_reported_at_once(recorder, start_gateway):
    """A Summarize with several bad fields names each of them in one BadRequest, as
    Complete does, so the caller fixes them in one go.

    Before, an unknown reasoning effort, then an invalid model name, were refused alone:
    the caller heard of the empty document and the bad label only on later tries."""
    gateway = await start_gateway(config(recorder.base_url))
    request = pb.SummarizeRequest(
        model="", document=" ", labels={"bad key": "v"}, reasoning_effort=99
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "reasoning_effort",
        "model",
        "document",
        "labels['bad key']",
    }
    assert recorder.requests == []


async def test_a_long_unknown_model_is_not_found_with_a_short_status(recorder, start_gateway):
    """An unknown model name is quoted in part, in the NOT_FOUND of a request whose
    fields are valid."""
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model="m" * 200, document="text"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        f"model {'m' * 100!r}... is not served by any configured upstream"
    )
    info = error_info(caught.value)
    assert (info.reason, info.metadata["model"]) == ("MODEL_NOT_FOUND", "m" * 100 + "...")
    assert recorder.requests == []


async def test_one_giant_word_with_a_diacritic_is_split_into_parts_that_fit(
    recorder, start_gateway
):
    """A long word without spaces, mixing plain and accented letters, still fits each part.

    Inside a word with a diacritic every ASCII letter counts half a token, so the pieces
    such a word is cut into must be counted as parts of that word, not as ASCII words.
    """

    def respond(body):
        return Reply(content="FINAL" if is_combine(body) else "part")

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    text = "é" + "a" * 6000
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert response.chunks == len(parts) >= 2
    for body in parts:
        assert estimate_text_tokens(user_text(body)) + body["max_tokens"] < WINDOW


@pytest.mark.parametrize(
    "invisible",
    [
        "\ufeff",
        "\u200b \u200b\n\n\u2060",
        "\u00ad",
        "\u200e\u200f",
        "\u061c \u061c",
        "\ufe0f\u034f",
        "\u3164 \uffa0",
        "\U000e0020\U000e0001",
    ],
    ids=[
        "byte-order-mark",
        "zero-width-spaces",
        "soft-hyphen",
        "direction-marks",
        "arabic-letter-mark",
        "variation-selector-and-grapheme-joiner",
        "hangul-fillers",
        "tags",
    ],
)
async def test_a_document_of_invisible_characters_alone_is_empty(
    recorder, start_gateway, invisible
):
    """A document with nothing a reader sees (characters Unicode says to show nothing
    for, such as a byte order mark, zero-width spaces, Arabic's letter mark or a variation
    selector, between blanks) is refused as empty, as blanks alone are.

    Before, it was sent, paid for, and the model's made-up summary returned OK; Arabic's
    direction mark, variation selectors, Hangul fillers and tags still were."""
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=invisible))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"document": "must not be empty"}
    assert recorder.requests == []


@pytest.mark.parametrize("blank", [" ", "\t", "\u200b", "\ufe0f"])
async def test_a_long_run_of_blanks_makes_no_part_without_text(recorder, start_gateway, blank):
    """A sentence split inside a long run of spaces, tabs, zero-width spaces or variation
    selectors (padding, a broken export) leaves pieces of blanks alone; a chunk of nothing
    else is not sent as a part: a call with only its header would be paid for and its
    made-up summary combined.

    Before, 50,000 spaces between two words made about 10 parts with only a header, and
    50,000 variation selectors about 90."""

    def respond(body):
        return Reply(content="FINAL" if is_combine(body) else "part")

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    text = document(2) + " Then one" + blank * 50_000 + "word more."
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert response.chunks == len(parts) >= 2
    for body in parts:
        header = PART_HEADER.match(user_text(body))
        assert header is not None
        assert user_text(body)[header.end() :].replace(blank, "").strip()


@pytest.mark.parametrize("character", ["\U0001f600", "\U0001d400", "\U00020000"])
async def test_a_run_of_four_byte_characters_is_split_into_parts_that_fit(
    recorder, start_gateway, character
):
    """Emoji, math letters or rare ideographs without spaces are cut into parts that fit.

    Such a character is estimated at its 4 UTF-8 bytes (a run of them 1 more): a piece cut
    at a third of the room in characters would not fit, and splitting it again would never
    end in a piece that did.
    """

    def respond(body):
        return Reply(content="FINAL" if is_combine(body) else "part")

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    text = character * 2000
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert response.chunks == len(parts) >= 8
    sent = ""
    for body in parts:
        assert estimate_text_tokens(user_text(body)) + body["max_tokens"] < WINDOW
        sent += PART_HEADER.sub("", user_text(body))
    assert sent == text


# --- calibration rising mid-call ----------------------------------------------------


def estimated_prompt(body) -> int:
    """The gateway's uncalibrated estimate of a recorded request's prompt."""
    return PER_REQUEST_OVERHEAD + sum(
        PER_MESSAGE_OVERHEAD + estimate_text_tokens(m["content"]) for m in body["messages"]
    )


def reporting(ratio, respond):
    """`respond`, with every reply reporting `ratio` times the estimated prompt tokens.

    `ratio` is a number, or a function of the request body giving one.
    """
    ratio_of = ratio if callable(ratio) else lambda _body: ratio

    def scaled(body):
        behaviour = respond(body)
        if not isinstance(behaviour, Reply):
            return behaviour
        prompt_tokens = math.ceil(ratio_of(body) * estimated_prompt(body))
        return dataclasses.replace(behaviour, prompt_tokens=prompt_tokens)

    return scaled


def header(body) -> str:
    """The first line of a recorded request's user message: "Part 4 of 9, piece 1:"."""
    return user_text(body).split("\n", 1)[0]


def is_piece(body) -> bool:
    """Whether a recorded request summarises a piece a part was re-split into."""
    return is_part(body) and ", piece " in header(body)


SPAN = re.compile(r"\[(p\d+ s\d+) \.\. p\d+ s\d+\]")


def span(body) -> str:
    """The first and last sentence a part saw, as "[p3 s1 .. p7 s4]"."""
    seen = re.findall(r"Paragraph (p\d+) sentence (s\d+)", user_text(body))
    return f"[{' '.join(seen[0])} .. {' '.join(seen[-1])}]"


def spans(text: str) -> list[str]:
    """The spans in `text`, in order."""
    return [match.group(0) for match in SPAN.finditer(text)]


def in_document_order(found: list[str]) -> list[str]:
    """`found` spans sorted by their first sentence's place in the document."""

    def key(found_span: str) -> tuple[int, int]:
        paragraph, sentence = SPAN.fullmatch(found_span).group(1).split()
        return int(paragraph[1:]), int(sentence[1:])

    return sorted(found, key=key)


def respond_with_span(body, *, padding: str = ""):
    """Parts answer with their span (then `padding`); combines answer FINAL."""
    if is_part(body):
        return Reply(content=f"{span(body)} {padding}".strip(), delay_s=0.05)
    return Reply(content="FINAL")


def assert_each_request_fitted(requests, ratio_of) -> float:
    """Each request fitted the window at the calibration the gateway had when it was sent.

    Replays the usage the upstream reported (`ratio_of(body)` times the estimate), in
    order, through a calibration of its own: with one request in flight at a time the
    gateway learnt exactly the same. Returns the factor learnt.
    """
    calibration = TokenCalibration()
    for recorded in requests:
        estimate = estimated_prompt(recorded.body)
        calibrated = math.ceil(estimate * calibration.factor(FAKE_MODEL, "default"))
        assert calibrated + recorded.body["max_tokens"] <= WINDOW
        calibration.observe(
            FAKE_MODEL,
            "default",
            estimated_tokens=estimate,
            reported_tokens=math.ceil(ratio_of(recorded.body) * estimate),
        )
    return calibration.factor(FAKE_MODEL, "default")


@pytest.mark.parametrize("ratio", [1.3, 2.0])
async def test_parts_queued_when_calibration_rises_are_resplit(recorder, start_gateway, ratio):
    """Parts sized before the upstream's usage raised the calibration are re-split, not refused."""
    recorder.respond = reporting(ratio, default_respond)
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    text = document(60)
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    assert assert_each_request_fitted(recorder.requests, lambda _body: ratio) > ratio
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert any(is_piece(body) for body in parts), "no part was re-split"
    assert response.chunks == len(parts)
    assert response.upstream_calls == len(recorder.requests) == len(parts) + 1
    # The parts sent, pieces included, still cover the document in order.
    covered: list[str] = []
    for body in parts:
        covered += [s for s in sentences(user_text(body)) if s not in covered]
    assert covered == sentences(text)


async def test_resplit_pieces_keep_document_order_in_the_combine(recorder, start_gateway):
    """The summaries of re-split pieces reach the combine in document order, each once.

    Earlier parts answer more slowly, so summaries finish out of document order.
    """
    text = document(100)

    def respond(body):
        reply = respond_with_span(body)
        if is_part(body):
            first = sentences(user_text(body))[0]
            return dataclasses.replace(reply, delay_s=0.15 * (1 - text.index(first) / len(text)))
        return reply

    recorder.respond = reporting(1.5, respond)
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    (combine,) = [r.body for r in recorder.requests if is_combine(r.body)]
    assert response.summary == "FINAL"
    assert sum(is_piece(body) for body in parts) >= 2
    assert response.chunks == len(parts)
    combined = user_text(combine)
    assert spans(combined) == in_document_order([span(body) for body in parts])
    numbers = [int(n) for n in re.findall(r"^Summary of part (\d+):", combined, re.MULTILINE)]
    assert numbers == list(range(1, len(parts) + 1))


async def test_groups_of_summaries_are_resplit_when_calibration_rises(recorder, start_gateway):
    """A group of part summaries that no longer fits is re-split at its level, order kept."""
    padding = " ".join(["sum"] * 150)

    def respond(body):
        if is_combine(body) and body["max_tokens"] < 200:
            return Reply(content="MID " + " ".join(spans(user_text(body))))
        return respond_with_span(body, padding=padding)

    def ratio_of(body):
        # Parts report 1.3x the estimate, groups 4x: each group answered raises the factor.
        return 4.0 if is_combine(body) and body["max_tokens"] < 200 else 1.3

    recorder.respond = reporting(ratio_of, respond)
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60), target_tokens=200)
    )
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    groups = [
        r.body for r in recorder.requests if is_combine(r.body) and r.body["max_tokens"] < 200
    ]
    (final,) = [r.body for r in recorder.requests if r.body["max_tokens"] == 200]
    assert response.summary == "FINAL"
    assert response.levels == 2
    assert_each_request_fitted(recorder.requests, ratio_of)
    # Some groups were split: more calls than the summaries needed, packed as the first was.
    per_group = [user_text(body).count("Summary of part") for body in groups]
    assert sum(per_group) == len(parts)
    assert len(groups) > math.ceil(len(parts) / per_group[0])
    assert spans(user_text(final)) == in_document_order([span(body) for body in parts])


async def test_part_retried_after_calibration_rose_is_resplit(recorder, start_gateway):
    """A part retried after others raised the calibration, and no longer fitting, is split."""
    failed: list[str] = []

    def respond(body):
        if is_part(body) and header(body).startswith("Part 2 of") and not failed:
            failed.append(header(body))
            return Status(503)
        return respond_with_span(body)

    recorder.respond = reporting(1.5, respond)
    # One upstream attempt per call: Summarize's own retry, after its backoff, resends it.
    settings = config(recorder.base_url, upstream_attempts=1, concurrency=2, retry_backoff_s=1.0)
    gateway = await start_gateway(settings)
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    assert response.summary == "FINAL"
    second = [header(r.body) for r in recorder.requests if "Part 2 of" in header(r.body)]
    assert second[0] == failed[0]
    assert len(second) >= 3
    assert all(", piece " in h for h in second[1:])


async def test_no_room_left_for_the_document_fails_with_a_field_violation(recorder, start_gateway):
    """When instructions and answer leave too little of the window, the call fails cleanly.

    Mid-call (the calibration rose to its ceiling) and then up front on the next call.
    """
    recorder.respond = reporting(4.0, default_respond)
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    instructions = " ".join(["Name"] * 110)
    request = pb.SummarizeRequest(
        model=FAKE_MODEL, document=document(60), instructions=instructions
    )
    # The first call sends three parts before the calibration rises; the next one none.
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Summarize(request)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert list(violations) == ["instructions"]
        assert "context window of 1024" in violations["instructions"]
        assert "shorten the instructions" in violations["instructions"]
        assert len(recorder.requests) == 3


async def test_document_retried_after_other_calls_raised_the_calibration_is_chunked(
    recorder, start_gateway
):
    """A one-call document that no longer fits when retried is chunked instead of refused.

    Other RPCs on the same model (here three Completes) raise the calibration during
    Summarize's backoff.
    """
    failed: list[str] = []

    def respond(body):
        if system_text(body).startswith("Summarise the document") and not failed:
            failed.append(user_text(body))
            return Status(503)
        return respond_with_span(body)

    recorder.respond = reporting(4.0, respond)
    gateway = await start_gateway(
        config(recorder.base_url, upstream_attempts=1, retry_backoff_s=1.0)
    )
    text = document(6)
    summarizing = asyncio.ensure_future(
        gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    )
    await recorder.wait_until(lambda: bool(failed))
    for _ in range(3):
        await gateway.stub.Complete(chat(document(1)))
    response = await summarizing
    assert response.summary == "FINAL"
    assert response.chunks >= 2
    assert len(failed) == 1
    whole = [r for r in recorder.requests if system_text(r.body).startswith("Summarise the")]
    assert len(whole) == 1


@pytest.mark.parametrize(
    ("document_", "instructions", "field"),
    [
        # Here in the last part only: NUL is no text, and an escape no plain text either.
        (document(60) + "\n\nThe end of page one.\x00Page two.", "", "document"),
        (document(60) + "\n\nIn \x1b[31mred\x1b[0m.", "", "document"),
        (document(2), "Be brief.\x07", "instructions"),
    ],
    ids=["nul", "escape", "bell-in-instructions"],
)
async def test_control_characters_are_refused_up_front_on_the_field_sent(
    recorder, start_gateway, document_, instructions, field
):
    """A control character fails the call before any part is sent (and paid for), and the
    violation names the Summarize field that holds it, not the internal call's messages."""
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document_, instructions=instructions)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert recorder.requests == []
    assert field_violations(caught.value) == {field: "must not contain control characters"}


@pytest.mark.parametrize("page_break", ["\f", "\n\f"], ids=["form-feed", "line-then-form-feed"])
async def test_form_feeds_are_page_breaks_where_parts_end(recorder, start_gateway, page_break):
    """pdftotext separates pages with a form feed (a control character a message may not
    hold): a Summarize document is summarised with each page break sent as a paragraph
    break, and parts end at page ends. A vertical tab is sent as a line break.

    Before, any form feed or vertical tab refused the document as INVALID_ARGUMENT."""
    gateway = await start_gateway(config(recorder.base_url))
    pages = document(60).split("\n\n")
    text = page_break.join(pages).replace(" sentence s2", "\vsentence s2")
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert response.chunks == len(parts) >= 3
    for body in parts:
        chunk = PART_HEADER.sub("", user_text(body))
        assert not has_control_characters(chunk)
        assert chunk.endswith("sentence s4 says something.")  # the end of a page
    assert "p0\nsentence s2" in user_text(parts[0])
    assert re.search(r"says something\.\n\n+Paragraph p1 ", user_text(parts[0]))


async def test_groups_of_summaries_are_sized_with_their_headers(recorder, start_gateway):
    """With the calibration steady, each group of summaries fits the call it was packed for:
    no group is re-split (an extra call), however many digits its part numbers have."""
    padding = " ".join(["sum"] * 14)

    def respond(body):
        if is_part(body):
            return Reply(content=padding)
        if body["max_tokens"] < 200:
            return Reply(content="MID")
        return Reply(content="FINAL")

    recorder.respond = reporting(1.0, respond)
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(400), target_tokens=200)
    )
    groups = [
        r.body for r in recorder.requests if is_combine(r.body) and r.body["max_tokens"] < 200
    ]
    per_group = [user_text(body).count("Summary of part") for body in groups]
    assert response.summary == "FINAL"
    assert response.levels == 2
    assert response.chunks >= 20
    assert sum(per_group) == response.chunks
    assert len(groups) == math.ceil(response.chunks / max(per_group))


async def test_a_document_the_upstream_refuses_as_too_long_is_split_and_summarised(
    start_gateway,
):
    """Answers reporting few prompt tokens taught the gateway half its estimate, so the
    whole document looks like one call; the upstream counts its own tokens and refuses
    it as over the window. The calibration goes back to the plain estimate and the
    document is split into parts that fit, summarised and combined: one refusal, then
    an answer, not a failed call."""

    def respond(body):
        if estimate_text_tokens(user_text(body)) > WINDOW - 100:
            return Status(400, body=TOO_LONG)
        return Reply(content="short", prompt_tokens=1)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        gateway = await start_gateway(config(fake.base_url))
        question = chat("Paragraph p1 sentence s1 says something. " * 8)
        for _ in range(5):
            await gateway.stub.Complete(question)
        calibration = gateway.server.pipeline.calibration
        assert calibration.factor(FAKE_MODEL, "default") == 0.5
        text = document(20)  # about 1.5 windows by the plain estimate
        asked = len(fake.requests)
        response = await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=text)
        )
        sent = [r.body for r in fake.requests[asked:]]
        assert user_text(sent[0]) == text  # the whole document, refused
        assert response.summary == "short"
        assert response.chunks >= 2
        assert response.upstream_calls == len(sent) - 1  # the refused call is not counted
        assert all(estimate_text_tokens(user_text(b)) <= WINDOW - 100 for b in sent[1:])


TOO_LONG = (
    '{"error": {"message": "This model\'s maximum context length is 1024 tokens.", '
    '"type": "invalid_request_error", "code": "context_length_exceeded"}}'
)


async def test_a_part_summary_with_control_characters_is_still_combined(recorder, start_gateway):
    """A model's summary of a part may hold control characters (a form feed, an ANSI
    escape): they are the upstream's, not the caller's, so the combine call still goes
    out, without them, instead of failing on a field the caller never sent after every
    part was paid for."""

    def respond(body):
        if is_part(body):
            return Reply(content="part\x1b[1m one\x0c two\x85 end")
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    assert response.summary == "FINAL"
    (combine,) = [r.body for r in recorder.requests if is_combine(r.body)]
    assert not has_control_characters(user_text(combine))
    assert "part [1m one two end" in " ".join(user_text(combine).split())


async def test_a_summary_costs_exactly_what_its_calls_cost(start_gateway):
    """Two parts and their combine, each 43 input tokens at $0.14 a million and 2,522,627,994
    output tokens at $0.42 ($1,059.5037635): the response says $3,178.5112905, as GetUsage
    does, not the float sum 3178.511290500001.

    Before, the calls' costs were added as floats, and at thousands of dollars the sum
    drifted past the pico-dollar that rounding hides."""

    def respond(body):
        content = "FINAL" if is_combine(body) else "part"
        return Reply(content=content, prompt_tokens=43, completion_tokens=2_522_627_994)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(config(upstream.base_url))
        response = await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document(12))
        )
        assert (response.chunks, response.upstream_calls) == (2, 3)
        total = (await gateway.stub.GetUsage(pb.GetUsageRequest())).total
    assert total.cost_usd == 3178.5112905
    assert response.cost_usd == total.cost_usd


async def test_parts_the_upstream_refuses_before_any_calibration_are_split_until_they_fit(
    recorder, start_gateway
):
    """A text the estimator counts low (a plain-ASCII language, rare letters: the README
    names them) on a fresh gateway: no answer has calibrated the model, so its factor is
    the estimator's own, 1, and the parts sized with it run over the upstream's window.
    Each refused part is split into smaller pieces until they fit, and the summary
    completes.

    Before, a refused part was split with the same factor, unchanged by the refusal:
    the same text came back as one piece, was refused again, and the Summarize failed
    with INVALID_ARGUMENT on `messages`, a field it does not have."""
    ratio = 1.6  # the upstream's count of every prompt, against the estimate

    def respond(body):
        if ratio * estimated_prompt(body) + body["max_tokens"] > WINDOW:
            return Status(400, body=TOO_LONG)
        return default_respond(body)

    recorder.respond = reporting(ratio, respond)
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=1))
    text = document(40)
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    answered = [r.body for r in recorder.requests if is_part(r.body)]
    answered = [b for b in answered if ratio * estimated_prompt(b) + b["max_tokens"] <= WINDOW]
    covered = {s for body in answered for s in sentences(user_text(body))}
    assert covered == set(sentences(text))
    assert response.chunks == len(answered)


async def test_a_piece_too_small_to_split_its_upstream_still_refuses_fails_as_the_parts(
    recorder, start_gateway
):
    """An upstream whose real window is far smaller than the catalog's (here 150 tokens
    against 1,024) refuses even the smallest piece a part is split into: the call fails
    as that part's refusal, INVALID_ARGUMENT with the part, parts, level and what the
    upstream said, saying what the caller can change.

    Before, the piece's refusal reached the caller as a Complete's: a violation on
    `messages`, a field Summarize does not have, advising to send it again under
    TRUNCATION_MODE_KEEP_RECENT, which it cannot, and no word of which part."""

    def respond(body):
        if estimated_prompt(body) + body["max_tokens"] > 150:
            return Status(400, body=TOO_LONG)
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, concurrency=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(8)))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert (info.metadata["part"], info.metadata["level"]) == ("1", "1")
    assert (
        info.metadata["upstream_message"] == "This model's maximum context length is 1024 tokens."
    )
    details = caught.value.details()
    assert "lower target_tokens or shorten the instructions" in details
    assert "KEEP_RECENT" not in details
    assert not any(
        d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in rich_status(caught.value).details
    )


async def test_a_document_of_over_999_parts_is_chunked_with_room_for_their_numbers(
    recorder, start_gateway
):
    """Chunks are sized with room for their "Part N of M" header. A document of more than
    999 parts (2 MB on a small window) has four-digit numbers: each part still fits as
    it was made, and none is split again into pieces, each a call more.

    Before, the room was always that of "Part 999 of 999": a part packed to within a
    token or two of it no longer fitted with its longer header, and was re-split (here
    an eighth of them, each into two calls)."""
    recorder.respond = lambda body: Reply(content="ok", prompt_tokens=0)  # no calibration
    small = fake_model_window(256)
    # max_levels: its parts' summaries, as long as a part may answer, would need 7.
    settings = {
        "concurrency": 16,
        "chunk_overlap_tokens": 0,
        "default_target_tokens": 32,
        "max_levels": 7,
    }
    gateway = await start_gateway(
        gateway_config(recorder.base_url, models=small, summarize=settings)
    )
    text = " ".join(f"Item {i} is {'very ' * (i % 7)}good." for i in range(14000))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=text), timeout=120
    )
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert len(parts) > 999
    assert [header(b) for b in parts if is_piece(b)] == []
    assert response.chunks == len(parts)


async def test_a_document_of_the_maximum_size_with_page_breaks_is_taken(recorder, start_gateway):
    """`max_document_bytes` caps the document the caller sends: its page breaks are sent
    as paragraph breaks (two characters for one), which must not push a document of
    exactly the maximum over it.

    Before, the size was measured after that translation: INVALID_ARGUMENT on a
    document the caller could not have made any smaller to fit."""
    gateway = await start_gateway(config(recorder.base_url, max_document_bytes=4096))
    text = "\f".join(document(40).split("\n\n"))
    text = text[:4095].rstrip() + "."
    text += "x" * (4096 - len(text.encode()))
    assert len(text.encode()) == 4096
    assert "\f" in text
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    assert response.chunks >= 2


@pytest.mark.parametrize("limit", [{"max_request_bytes": 8000}, {"max_prompt_tokens": 2000}])
async def test_a_document_over_one_calls_request_limits_is_split_within_them(
    recorder, start_gateway, limit
):
    """A document that fits a large window in one call can still be more than one
    completion may hold (`defaults.max_request_bytes` or `max_prompt_tokens`: a document
    of `max_document_bytes`, both 2 MiB by default, beside its prompt, on a model of a
    million tokens): it is split into parts that each keep within them.

    Before, it was sent whole (or as one part as large), and the call was refused with
    INVALID_ARGUMENT on `messages`, a field a SummarizeRequest does not have."""
    settings = config(recorder.base_url, window=100_000)
    settings = dataclasses.replace(
        settings, defaults=dataclasses.replace(settings.defaults, **limit)
    )
    gateway = await start_gateway(settings)
    text = document(40)
    response = await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=text))
    assert response.summary == "FINAL"
    parts = [r.body for r in recorder.requests if is_part(r.body)]
    assert len(parts) >= 2
    assert set(sentences(text)) == {s for body in parts for s in sentences(user_text(body))}
    for body in (r.body for r in recorder.requests):
        texts = [m["content"] for m in body["messages"]]
        assert len("".join(texts).encode()) <= limit.get("max_request_bytes", 8000)
        prompt = PER_REQUEST_OVERHEAD + sum(
            PER_MESSAGE_OVERHEAD + estimate_text_tokens(t) for t in texts
        )
        assert prompt <= limit.get("max_prompt_tokens", 2000)


async def test_a_part_answered_without_text_fails_the_call_and_is_not_retried(
    recorder, start_gateway
):
    """A part whose answer has no text (a reasoning model that spent its `max_tokens`
    thinking) fails the call with SUMMARIZE_PART_FAILED, saying why, and the pushback
    `-1`: at temperature 0 a retry would answer the same. Nothing is combined.

    Before, the empty text stood as the part's summary: the call answered OK with a
    summary that left the part out."""
    empty = "Paragraph p30 sentence s2"

    def respond(body):
        if is_part(body) and empty in user_text(body):
            return Reply(content="", reasoning="thinking " * 50, finish_reason="length")
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url, chunk_attempts=3))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    details = error_details(caught.value)
    assert details.reason == "SUMMARIZE_PART_FAILED"
    assert "no text" in details.message
    assert "reasoning_effort" in details.message
    assert dict(caught.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
    assert len([r for r in recorder.requests if empty in user_text(r.body)]) == 1
    assert not any(is_combine(r.body) for r in recorder.requests)


@pytest.mark.parametrize("blank", ["  \n", "\ufeff\u200b "], ids=["blanks", "invisible"])
async def test_a_whole_document_answered_without_text_is_no_empty_summary(
    recorder, start_gateway, blank
):
    """A document summarised in one call whose answer is blank, or holds only characters
    a reader does not see (a byte order mark, a zero-width space), fails the call, rather
    than answering OK with an empty summary.

    Before, an answer of invisible characters alone was answered OK as the summary."""
    recorder.respond = lambda body: Reply(content=blank)
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(2)))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value).reason == "SUMMARIZE_PART_FAILED"
    assert len(recorder.requests) == 1


CUT = "The document says that the"


def is_first_part(body) -> bool:
    """Whether a recorded request summarises the document's first part."""
    header = PART_HEADER.match(user_text(body))
    return is_part(body) and header is not None and header.group(1) == "1"


def cutting(is_cut):
    """`default_respond`, but a request `is_cut` picks is answered `CUT`, its max_tokens
    run out mid-sentence."""

    def respond(body):
        if is_cut(body):
            return Reply(content=CUT, finish_reason="length")
        return default_respond(body)

    return respond


@pytest.mark.parametrize(
    ("is_cut", "finish_reason", "parts_cut"),
    [
        (lambda body: False, pb.FINISH_REASON_STOP, 0),
        (is_combine, pb.FINISH_REASON_LENGTH, 0),
        (is_first_part, pb.FINISH_REASON_STOP, 1),
        (lambda body: is_combine(body) or is_first_part(body), pb.FINISH_REASON_LENGTH, 1),
    ],
    ids=["nothing", "the-summary", "a-part", "both"],
)
async def test_a_summary_cut_off_by_a_length_limit_says_so(
    recorder, start_gateway, is_cut, finish_reason, parts_cut
):
    """A summary whose final call ran out of its max_tokens (the target) is answered OK,
    `finish_reason` LENGTH; a part's summary cut off is combined as it came, and counted
    in `parts_cut`; a summary nothing cut is STOP, 0.

    Before, the response had neither: a summary ending mid-sentence looked whole."""
    recorder.respond = cutting(is_cut)
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(30))
    )
    (combine,) = [r.body for r in recorder.requests if is_combine(r.body)]
    assert response.chunks >= 2
    assert (response.finish_reason, response.parts_cut) == (finish_reason, parts_cut)
    assert response.summary == (CUT if finish_reason == pb.FINISH_REASON_LENGTH else "FINAL")
    assert (CUT in user_text(combine)) == (parts_cut == 1)


async def test_group_summaries_cut_off_by_their_length_limit_count_as_parts_cut(
    recorder, start_gateway
):
    """Summaries of groups of summaries (a second level) cut off by their max_tokens are
    counted in `parts_cut` too: their parts' ends are as missing from the summary."""
    long_summary = " ".join(["summary"] * 150)

    def respond(body):
        if is_part(body):
            return Reply(content=long_summary)
        if is_combine(body) and body["max_tokens"] < 200:
            return Reply(content="MID " + long_summary, finish_reason="length")
        return Reply(content="FINAL")

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60), target_tokens=200)
    )
    middles = [r for r in recorder.requests if is_combine(r.body) and r.body["max_tokens"] < 200]
    assert response.levels == 2
    assert len(middles) >= 2
    assert (response.finish_reason, response.parts_cut) == (pb.FINISH_REASON_STOP, len(middles))


async def test_a_one_call_summary_cut_off_says_so_when_answered_from_the_cache_too(
    recorder, start_gateway
):
    """A document summarised in one call that ran out of its max_tokens is LENGTH, with
    no part cut; asked again, the cached answer says the same."""
    recorder.respond = lambda body: Reply(content=CUT, finish_reason="length")
    gateway = await start_gateway(config(recorder.base_url))
    request = pb.SummarizeRequest(model=FAKE_MODEL, document=document(2))
    first = await gateway.stub.Summarize(request)
    again = await gateway.stub.Summarize(request)
    assert (first.summary, first.upstream_calls, first.parts_cut) == (CUT, 1, 0)
    assert (again.summary, again.upstream_calls, again.parts_cut) == (CUT, 0, 0)
    assert first.finish_reason == again.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(recorder.requests) == 1


async def test_a_part_its_upstream_refused_to_summarise_fails_the_call_as_rejected(
    recorder, start_gateway
):
    """A part answered with a refusal (its content filter) fails the call as a part the
    upstream refused: INVALID_ARGUMENT, UPSTREAM_REJECTED_REQUEST, the part named.

    Before, the refusal's text stood as the part's summary and was combined with the
    others."""
    refused = "Paragraph p30 sentence s2"

    def respond(body):
        if is_part(body) and refused in user_text(body):
            return Reply(refusal="I can't help with that.", finish_reason="content_filter")
        return default_respond(body)

    recorder.respond = respond
    gateway = await start_gateway(config(recorder.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(60)))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.reason == "UPSTREAM_REJECTED_REQUEST"
    assert "content filter" in details.message
    assert "part" in details.metadata
    assert not any(is_combine(r.body) for r in recorder.requests)


def _pause_after_the_first_answer(recorder) -> None:
    """`recorder`'s first answer says its rate window is spent for 300 ms: the gateway's
    limiter then holds the next call that long."""
    paused = {
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "300ms",
    }
    answered = itertools.count()

    def pausing_once(body):
        reply = default_respond(body)
        return dataclasses.replace(reply, headers=paused) if next(answered) == 0 else reply

    recorder.respond = pausing_once


async def test_a_summarys_wait_in_its_upstreams_limiter_is_its_queued_time(recorder, start_gateway):
    """A summary whose call waited out its upstream's pause reports that wait as
    `queued_ms`, within `total_ms` and apart from `upstream_ms`, as a completion does."""
    _pause_after_the_first_answer(recorder)
    gateway = await start_gateway(config(recorder.base_url))
    await gateway.stub.Complete(chat("Warm up"))  # its answer pauses the upstream
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(2))
    )
    timings = response.timings
    assert response.upstream_calls == 1
    assert timings.queued_ms > timings.upstream_ms
    assert timings.total_ms >= timings.queued_ms + timings.upstream_ms


async def test_a_summarys_span_carries_its_queued_time_not_its_last_calls(recorder, start_gateway):
    """The Summarize span's `llm_gateway.queued_ms` is the response's `timings.queued_ms`.

    Before, it was the last call's (the combine's, which waited on nothing): a summary
    whose parts waited out their upstream's pause showed about 0 there."""
    _pause_after_the_first_answer(recorder)
    captured = captured_telemetry()
    gateway = await start_gateway(config(recorder.base_url), telemetry=captured.telemetry)
    await gateway.stub.Complete(chat("Warm up"))  # its answer pauses the upstream
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    span = await captured.ended("llmgateway.v1.CompletionService/Summarize")
    assert response.upstream_calls > 1
    assert response.timings.queued_ms > 0
    assert attributes_of(span)["llm_gateway.queued_ms"] == response.timings.queued_ms


async def test_a_summarys_span_has_no_time_to_first_token_of_one_call(recorder, start_gateway):
    """A Summarize span carries no `llm_gateway.time_to_first_token_ms`: each of its
    calls has its own attempt span, and its response no time to first token.

    Before, it had the last call's (the combine's): a figure of one call among many, which
    said nothing of when the summary's first token came (its response has none)."""
    captured = captured_telemetry()
    gateway = await start_gateway(config(recorder.base_url), telemetry=captured.telemetry)
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=FAKE_MODEL, document=document(60))
    )
    rpc = attributes_of(await captured.ended("llmgateway.v1.CompletionService/Summarize"))
    attempts = [attributes_of(s) for s in captured.spans() if s.name.startswith("chat ")]
    assert response.upstream_calls > 1
    assert "llm_gateway.time_to_first_token_ms" not in rpc
    assert rpc["llm_gateway.queued_ms"] == response.timings.queued_ms
    assert len(attempts) == response.upstream_calls


async def test_a_part_retried_past_1024_times_fails_naming_its_attempts(recorder, start_gateway):
    """A part whose upstream keeps failing, under a config allowing more than 1024 tries
    without backoff (`chunk_attempts: 1100`, `retry_backoff_s: 0`), fails
    `SUMMARIZE_PART_FAILED` after them all.

    Before, the 1025th backoff was computed as 0 times 2 ** 1024, an int no float holds:
    INTERNAL.
    """
    recorder.respond = lambda body: Status(503)
    settings = config(
        recorder.base_url, upstream_attempts=1, chunk_attempts=1100, retry_backoff_s=0
    )
    # A breaker that never opens: open, each next try would wait out its cool-down.
    never_opens = {"breaker_consecutive_failures": 2000, "breaker_min_calls": 2000}
    resilience = dataclasses.replace(settings.resilience, **never_opens)
    gateway = await start_gateway(dataclasses.replace(settings, resilience=resilience))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(pb.SummarizeRequest(model=FAKE_MODEL, document=document(2)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "SUMMARIZE_PART_FAILED"
    assert info.metadata["attempts"] == "1100"
