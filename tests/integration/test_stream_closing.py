"""Closing a completion stream early closes everything under it before `aclose` returns."""

from __future__ import annotations

from service.clock import Deadline
from service.domain import ChatRequest, GenerationParams, Message, Role
from service.pipeline import Pipeline
from service.pool import UpstreamPool
from service.pricing import PriceList
from service.upstream.client import UpstreamClient
from tests.conftest import FAKE_MODEL, gateway_config
from tests.fake_upstream import FakeUpstream, Reply


async def test_closing_a_pipeline_stream_releases_its_upstream_slot_at_once(
    upstream: FakeUpstream,
) -> None:
    """A consumer that stops after one delta gets the upstream slot back when aclose returns."""
    config = gateway_config(upstream.base_url)
    upstream.script(Reply(content="one two three four", chunks=4, chunk_delay_s=0.5))
    async with UpstreamClient(config.upstreams[0]) as client:
        pool = UpstreamPool([client], settings=config.resilience)
        pipeline = Pipeline(config, pool, PriceList(config.models))
        request = ChatRequest(
            model=FAKE_MODEL,
            messages=(Message(Role.USER, "hi"),),
            params=GenerationParams(temperature=0.7),
        )
        events = pipeline.stream(request, deadline=Deadline.after(None))
        first = await anext(events)
        assert first.content
        assert pool.state(client.name).limiter.in_flight == 1
        await events.aclose()
        # Closed by the stream's owner, not left to a garbage-collection hook's task later.
        assert pool.state(client.name).limiter.in_flight == 0
        await upstream.wait_for_disconnect(timeout_s=10)
