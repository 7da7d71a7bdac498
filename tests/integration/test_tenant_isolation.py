"""Tenants share neither cache entries nor ledger rows, through the real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import RunningGateway, chat
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.tenancy_helpers import as_tenant, rpc_error, secure_config

pytestmark = pytest.mark.timeout(60)

SAME_PROMPT = chat("What is the capital of France?", params=pb.GenerationParams(temperature=0.0))
# team-a may read every tenant's usage; team-b only its own.
TENANTS = {"team-a": {"is_admin": True}, "team-b": {}}


@pytest.fixture
async def tenanted(upstream, start_gateway, cache_section) -> RunningGateway:
    """A gateway with caller keys for team-a (admin) and team-b, and the cache on."""
    config = secure_config(upstream.base_url, tenants=TENANTS, cache=cache_section)
    gateway: RunningGateway = await start_gateway(config)
    return gateway


async def settled(gateway: RunningGateway) -> None:
    """Wait until the cache has stored every answer it is storing."""
    cache = gateway.server.pipeline.cache
    async with asyncio.timeout(10):
        while cache.in_flight:
            await asyncio.sleep(0.005)


async def ask(gateway: RunningGateway, tenant: str) -> pb.CompleteResponse:
    """The shared temperature-0 prompt, sent as `tenant`; waits until it is cached."""
    response: pb.CompleteResponse = await gateway.stub.Complete(
        SAME_PROMPT, metadata=as_tenant(tenant)
    )
    await settled(gateway)
    return response


async def test_same_prompt_from_two_tenants_never_shares_a_cache_entry(
    tenanted: RunningGateway, upstream: FakeUpstream
):
    """Each tenant's first request reaches the upstream; each then hits only its own entry."""
    upstream.script(Reply(content="answer for a"), Reply(content="answer for b"))
    a1 = await ask(tenanted, "team-a")
    b1 = await ask(tenanted, "team-b")
    assert (a1.metadata.cache_hit, b1.metadata.cache_hit) == (False, False)
    assert len(upstream.requests) == 2
    a2, b2 = await ask(tenanted, "team-a"), await ask(tenanted, "team-b")
    assert (a2.content, a2.metadata.cache_hit) == ("answer for a", True)
    assert (b2.content, b2.metadata.cache_hit) == ("answer for b", True)
    assert a2.metadata.saved_cost_usd == a1.metadata.cost_usd > 0
    assert len(upstream.requests) == 2


async def test_tenants_never_share_a_ledger_row(tenanted: RunningGateway, upstream: FakeUpstream):
    """The admin sees one row per tenant; team-b sees only its own and is refused others'."""
    upstream.script(Reply(), Reply(), Reply())
    await ask(tenanted, "team-a")
    await ask(tenanted, "team-b")
    # A different prompt so that team-b's second call is a miss that costs something.
    await tenanted.stub.Complete(chat("another question"), metadata=as_tenant("team-b"))
    everyone = await tenanted.stub.GetUsage(
        pb.GetUsageRequest(tenant="*"), metadata=as_tenant("team-a")
    )
    by_tenant: dict[str, list[pb.UsageRow]] = {}
    for row in everyone.rows:
        by_tenant.setdefault(row.tenant, []).append(row)
    assert set(by_tenant) == {"team-a", "team-b"}
    assert sum(r.requests for r in by_tenant["team-a"]) == 1
    assert sum(r.requests for r in by_tenant["team-b"]) == 2
    own = await tenanted.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-b"))
    assert {r.tenant for r in own.rows} == {"team-b"}
    assert own.total.requests == 2
    assert own.total.cost_usd == pytest.approx(
        sum(r.cost_usd for r in by_tenant["team-b"]), abs=1e-12
    )
    admin_own = await tenanted.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
    assert {r.tenant for r in admin_own.rows} == {"team-a"}
    for other in ("team-a", "*"):
        refused = await rpc_error(
            tenanted.stub.GetUsage(pb.GetUsageRequest(tenant=other), metadata=as_tenant("team-b"))
        )
        assert refused.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_the_same_idempotency_key_from_two_tenants_reaches_the_upstream_apart(
    tenanted: RunningGateway, upstream: FakeUpstream
):
    """All tenants share the provider's API key: a provider de-duplicating by
    `Idempotency-Key` must not see one tenant's key as another's. Each tenant's own
    retries keep one value, and the caller's key itself is not sent."""
    request = chat("hi", idempotency_key="order-42")
    for tenant in ("team-a", "team-a", "team-b"):
        await tenanted.stub.Complete(request, metadata=as_tenant(tenant))
    sent = [r.headers["idempotency-key"] for r in upstream.requests]
    assert sent[0] == sent[1] != sent[2]
    assert "order-42" not in "".join(sent)
