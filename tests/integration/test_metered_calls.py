"""Calls of a tenant with limits: the caller gate checks each request before it takes the
tenant's quota, and the call then runs on what that check prepared."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.clock import Deadline
from service.servicer import chat_request_from_proto
from tests.conftest import FAKE_MODEL, chat, chat_stream
from tests.fake_upstream import Reply
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.integration.test_context_window import conversation, small_window_config
from tests.scripted_upstream import ScriptedUpstream

DETERMINISTIC = pb.GenerationParams(temperature=0.0)
LIMITED = {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000}


def count_prepares(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model of each request the gateway's pipeline prepares, from now on."""
    pipeline = gateway.server.pipeline
    prepare = pipeline.prepare
    seen: list[str] = []

    def counted(request: Any) -> Any:
        seen.append(request.model)
        return prepare(request)

    monkeypatch.setattr(pipeline, "prepare", counted)
    return seen


async def test_a_metered_call_is_prepared_once(upstream, start_gateway, monkeypatch):
    config = secure_config(upstream.base_url, tenants={"team-a": LIMITED})
    gateway = await start_gateway(config)
    prepared = count_prepares(gateway, monkeypatch)
    answer = await gateway.stub.Complete(chat("hi"), metadata=as_tenant("team-a"))
    assert answer.content == "Hello from fake"
    assert prepared == [FAKE_MODEL]
    events = [
        e
        async for e in gateway.stub.CompleteStream(chat_stream("hi"), metadata=as_tenant("team-a"))
    ]
    assert "".join(e.delta.content for e in events) == "Hello from fake"
    assert prepared == [FAKE_MODEL, FAKE_MODEL]


async def test_a_metered_repeat_is_answered_without_preparing_it_again(
    upstream, start_gateway, monkeypatch
):
    """The same bytes from the same tenant, prepared moments ago and read from the cache:
    answered again without the gate's check preparing them, and the tenant's limits still
    count them."""
    tenants = {"team-a": {"requests_per_minute": 4}, "team-b": LIMITED}
    config = secure_config(upstream.base_url, tenants=tenants, cache={"backend": "memory"})
    gateway = await start_gateway(config)
    prepared = count_prepares(gateway, monkeypatch)
    request = chat("hi", params=DETERMINISTIC)
    first = await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
    assert prepared == [FAKE_MODEL]
    # A hit read from the store: the check knows the bytes, the store read prepares them.
    second = await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
    assert prepared == [FAKE_MODEL] * 2
    # The entry that read returned, recalled: nothing is prepared.
    third = await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
    assert prepared == [FAKE_MODEL] * 2
    assert [r.metadata.cache_hit for r in (first, second, third)] == [False, True, True]
    assert third.content == first.content
    # Another tenant's same bytes are its own (tenants share no entries): checked once.
    other = await gateway.stub.Complete(request, metadata=as_tenant("team-b"))
    assert not other.metadata.cache_hit
    assert prepared == [FAKE_MODEL] * 3
    await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(upstream.requests) == 2


async def test_an_invalid_metered_request_is_still_refused(upstream, start_gateway):
    config = secure_config(upstream.base_url, tenants={"team-a": LIMITED})
    gateway = await start_gateway(config)
    bad = chat("hi", params=pb.GenerationParams(temperature=9.0))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(bad, metadata=as_tenant("team-a"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    stream = gateway.stub.CompleteStream(
        chat_stream("hi", params=pb.GenerationParams(temperature=9.0)),
        metadata=as_tenant("team-a"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
        await stream.read()
    assert refused_stream.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert upstream.requests == []


async def test_a_request_prepared_before_the_calibration_moved_is_fitted_again(start_gateway):
    """What the gate's check prepared is used only with the calibration it was fitted
    with: a call that waited for its tenant's limits while answers moved it is fitted
    again, here keeping every message that the old factor would have dropped."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as upstream:
        upstream.default = Reply()
        gateway = await start_gateway(small_window_config(upstream.base_url))
        pipeline = gateway.server.pipeline
        request, violations = chat_request_from_proto(
            conversation(9, mode=pb.TRUNCATION_MODE_KEEP_RECENT),
            tenant="default",
            limits=pipeline.limits,
        )
        assert violations == []
        prepared = pipeline.prepare(request)
        assert prepared.dropped > 0
        for _ in range(5):  # answers that report half the prompt tokens estimated
            pipeline.calibration.observe(
                FAKE_MODEL, "default", estimated_tokens=1000, reported_tokens=500
            )
        completion = await pipeline.complete(prepared, deadline=Deadline.after(None))
        assert completion.dropped_messages == 0
        assert len(upstream.requests[-1].body["messages"]) == 10
