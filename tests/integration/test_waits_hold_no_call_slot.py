"""A Summarize part between its tries, and a batch item or a part waiting out an
upstream's limits, hold none of their tenant's `max_concurrent_calls`: its other calls
run meanwhile. Its tenant's limits kept in memory or in Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest

import service.pipeline
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, chat
from tests.fake_upstream import Status
from tests.integration.tenancy_helpers import as_tenant, rpc_error
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
