"""A Summarize part between its tries, and a batch item or a part waiting out an
upstream's limits, hold none of their tenant's `max_concurrent_calls`: its other calls
run meanwhile. Its tenant's limits kept in memory or in Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest

import service.limits
import service.pipeline
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from service.limits import LimitExceeded
from tests.conftest import FAKE_MODEL, chat
from tests.fake_upstream import Reply, Status
from tests.integration.tenancy_helpers import as_tenant, rpc_error
from tests.integration.test_batch import collect
from tests.integration.test_drain_gives_units_back import SHORT_DOCUMENT, limited_config
from tests.integration.test_summarize import default_respond
from tests.scripted_upstream import ScriptedUpstream, user_text


class HeldPauses:
    """`Pipeline.pause` held until `resume` is set: `waiting` says one began."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waiting, self.resume = asyncio.Event(), asyncio.Event()
        pause = service.pipeline.Pipeline.pause

        async def held(pipeline: Any, seconds: float, **kwargs: Any) -> None:
            self.waiting.set()
            await self.resume.wait()
            await pause(pipeline, seconds, **kwargs)

        monkeypatch.setattr(service.pipeline.Pipeline, "pause", held)


def assert_over_requests_per_minute(refused: grpc.aio.AioRpcError) -> None:
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    subject = error_details(refused).quota_violations[0][0]
    assert subject == "tenant:team-a:requests_per_minute"


async def test_a_summarize_part_between_its_tries_holds_no_call_slot(
    start_gateway: Any, limits_redis_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """team-a may run one call at a time. Its Summarize's one call fails 500, and waits
    out its back-off to try again: meanwhile team-a's plain Complete is served, for no
    upstream call of team-a is running. The part's next try then takes a slot again,
    and the Summarize still counts once against team-a's minute (the plain call takes
    the minute's other request).

    Before, the part held team-a's only slot from its first try to its last, and
    team-a's every other call was refused RESOURCE_EXHAUSTED for `max_concurrent_calls`
    while it only waited (a breaker's cool-down, 15 s by default, or a restart)."""
    pauses = HeldPauses(monkeypatch)
    failures = [Status(500)]

    def respond(body: Any) -> Any:
        if failures and "Paragraph" in user_text(body):
            return failures.pop()
        return default_respond(body)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        settings = limited_config(
            fake.base_url,
            {"max_concurrent_calls": 1, "requests_per_minute": 2},
            redis_url=limits_redis_url,
        )
        settings = dataclasses.replace(
            settings,
            resilience=dataclasses.replace(settings.resilience, attempts=1),
            summarize=dataclasses.replace(settings.summarize, chunk_attempts=2),
        )
        gateway = await start_gateway(settings)
        summary = asyncio.ensure_future(
            gateway.stub.Summarize(
                pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT),
                metadata=as_tenant("team-a"),
                timeout=30,
            )
        )
        await pauses.waiting.wait()
        plain = await gateway.stub.Complete(chat("q"), metadata=as_tenant("team-a"))
        assert plain.content == "WHOLE"
        pauses.resume.set()
        response = await summary
        assert response.summary == "WHOLE"
        refused = await rpc_error(
            gateway.stub.Complete(chat("again"), metadata=as_tenant("team-a"))
        )
    assert_over_requests_per_minute(refused)
    assert len(fake.requests) == 3  # the part's two tries, the plain call


def two_upstreams(base_url: str, redis_url: str | None) -> Any:
    """team-a capped at one call at a time and two requests a minute; up0 serving
    model-a, up1 model-b (one upstream, named twice), a call refused at once past its
    limits (`max_limit_wait_s: 0`)."""
    settings = limited_config(
        base_url, {"max_concurrent_calls": 1, "requests_per_minute": 2}, redis_url=redis_url
    )
    (only,) = settings.upstreams
    upstreams = tuple(
        dataclasses.replace(only, name=f"up{i}", models={model: model}, max_concurrency=10)
        for i, model in enumerate(("model-a", "model-b"))
    )
    window = settings.models[FAKE_MODEL]
    return dataclasses.replace(
        settings,
        upstreams=upstreams,
        models={"model-a": window, "model-b": window},
        resilience=dataclasses.replace(settings.resilience, max_limit_wait_s=0.0),
    )


async def test_a_batch_item_waiting_out_its_upstreams_pause_holds_no_call_slot(
    start_gateway: Any, limits_redis_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """team-b's call has up0 answer 429 with `Retry-After: 2`: up0 takes no call for 2 s
    (and team-b's call, its deadline too short to wait, fails with it).
    team-a's batch item for model-a, on up0, is refused at up0's limit and waits that
    out: meanwhile team-a's plain Complete to model-b, on up1, is served, though team-a
    may run one call at a time, for none of team-a's runs. The item then takes its turn
    again, is served, and counts once against team-a's minute.

    Before, the item held team-a's only slot while it went back in line every 0.1 s, to
    its deadline if need be, and team-a's other calls were refused RESOURCE_EXHAUSTED for
    `max_concurrent_calls` though nothing of team-a ran upstream."""
    pauses = HeldPauses(monkeypatch)
    limits_refusals = asyncio.Event()  # team-a's item refused at up0's limit twice
    refusals: list[LimitExceeded] = []
    acquire = service.limits.UpstreamLimiter.acquire

    async def counted(limiter: Any, *, tokens: int, max_wait_s: float, tenant: str = "") -> float:
        try:
            return await acquire(limiter, tokens=tokens, max_wait_s=max_wait_s, tenant=tenant)
        except LimitExceeded as refusal:
            if tenant == "team-a":
                refusals.append(refusal)
                if len(refusals) == 2:
                    limits_refusals.set()
            raise

    monkeypatch.setattr(service.limits.UpstreamLimiter, "acquire", counted)
    throttled = [Status(429, headers={"Retry-After": "2"})]

    def respond(body: Any) -> Any:
        if throttled:
            return throttled.pop()
        return Reply(content=f"answer from {body['model']}")

    async with ScriptedUpstream(models=("model-a", "model-b"), respond=respond) as fake:
        gateway = await start_gateway(two_upstreams(fake.base_url, limits_redis_url))
        throttling = await rpc_error(
            # Its deadline leaves no room to wait the 2 s out: the 429 is its answer.
            gateway.stub.Complete(
                chat("q", model="model-a"), metadata=as_tenant("team-b"), timeout=1
            )
        )
        assert throttling.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        item = pb.BatchItem(id="a", request=chat("q", model="model-a"))
        batch = asyncio.ensure_future(
            collect(
                gateway.stub.CompleteBatch(
                    pb.CompleteBatchRequest(items=[item]), metadata=as_tenant("team-a"), timeout=30
                )
            )
        )
        # Waiting out of its turn, or back in line in it (as before).
        await first_of(pauses.waiting.wait(), limits_refusals.wait())
        plain = await gateway.stub.Complete(
            chat("q", model="model-b"), metadata=as_tenant("team-a")
        )
        assert plain.content == "answer from model-b"
        pauses.resume.set()
        results, summary = await batch
        assert (summary.succeeded, summary.failed) == (1, 0)
        assert results[0].response.content == "answer from model-a"
        refused = await rpc_error(
            gateway.stub.Complete(chat("again", model="model-b"), metadata=as_tenant("team-a"))
        )
    assert_over_requests_per_minute(refused)
    assert [r.body["model"] for r in fake.requests] == ["model-a", "model-b", "model-a"]
    assert len(refusals) == 1  # refused once, then waited the pause out


async def first_of(*waits: Any) -> None:
    """Return once the first of `waits` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
