"""A Summarize part whose call was sent keeps the per-minute units its turn took of its
tenant's limits, and one the gateway refused before sending gives them back: read from
the tenant's buckets as stored, in memory or in Redis (a take lowers the stored level,
a give-back raises it; neither waits for the refill)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmgateway.v1 import gateway_pb2 as pb
from service.caller_gate import part_tokens
from service.config import TenantConfig
from service.tenant_limits import MemoryTenantLimiter
from tests.conftest import FAKE_MODEL, RunningGateway, chat
from tests.fake_clock import FakeClock
from tests.fake_upstream import Status
from tests.integration.helpers import error_info
from tests.integration.tenancy_helpers import as_tenant, rpc_error
from tests.integration.test_drain_gives_units_back import (
    SHORT_DOCUMENT,
    limited_config,
    stored_level,
)
from tests.integration.test_summarize import (
    TEMPERATURE_REFUSED,
    config,
    default_respond,
    document,
    header,
    is_part,
    reporting,
)
from tests.scripted_upstream import ScriptedUpstream, system_text, user_text

TOKENS_PER_MINUTE = 100_000
REQUESTS_PER_MINUTE = 5


async def level(gateway: RunningGateway, tenant: str, bucket: str, redis_url: str | None) -> float:
    """`tenant`'s `bucket` (`rpm`, `tpm`) level as stored, without refill since."""
    if redis_url is not None:
        return await stored_level(redis_url, bucket)
    limiter = gateway.server.tenant_limiter
    assert isinstance(limiter, MemoryTenantLimiter)
    table = limiter._tokens if bucket == "tpm" else limiter._requests
    return table[tenant].level


def sent_tokens(requests: Any) -> int:
    """What a tenant's tokens_per_minute counts for the Summarize calls recorded."""
    return sum(
        part_tokens((system_text(r.body), user_text(r.body)), max_tokens=r.body["max_tokens"])
        for r in requests
    )


async def test_a_part_sent_then_asked_without_temperature_keeps_its_units(
    start_gateway: Any, limits_redis_url: str | None
) -> None:
    """team-a's Summarize, one call: the upstream refuses its temperature 0 (a 400, sent),
    and the call asked again without one finds the upstream's one request a minute spent,
    and fails unsent. The call was sent all the same: the part's tokens and the
    Summarize's request stay spent, as for any call sent and refused. Before, the retry's
    refusal said nothing was sent, and both went back."""
    redis_url = limits_redis_url

    def respond(body: Any) -> Any:
        if "temperature" in body:
            return Status(400, body=TEMPERATURE_REFUSED)
        return default_respond(body)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        limits = {
            "tokens_per_minute": TOKENS_PER_MINUTE,
            "requests_per_minute": REQUESTS_PER_MINUTE,
        }
        settings = limited_config(fake.base_url, limits, redis_url=redis_url)
        (upstream,) = settings.upstreams
        upstream = dataclasses.replace(upstream, requests_per_minute=1)
        gateway = await start_gateway(dataclasses.replace(settings, upstreams=(upstream,)))
        call = gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=SHORT_DOCUMENT),
            metadata=as_tenant("team-a"),
            timeout=30,
        )
        failed = await rpc_error(call)
        assert error_info(failed).reason == "SUMMARIZE_PART_FAILED"
        assert len(fake.requests) == 1  # the refused temperature's
        assert await level(gateway, "team-a", "rpm", redis_url) == REQUESTS_PER_MINUTE - 1
        spent = TOKENS_PER_MINUTE - await level(gateway, "team-a", "tpm", redis_url)
        assert spent == sent_tokens(fake.requests)


async def test_a_part_the_gateway_refuses_as_its_calibration_rose_gives_its_units_back(
    start_gateway: Any,
) -> None:
    """Parts 1 and 2 take their turns at once, fitted to the window; part 2 waits for the
    upstream's one slot while part 1's answer (the third to report its prompt) triples
    the calibration, and looking again it no longer fits: the gateway refuses it unsent
    and splits it. The tenant's minute is
    charged for what was sent, once: part 2's pieces take their own tokens, and its own
    go back. Before, they stayed spent, the text counted twice."""

    def respond(body: Any) -> Any:
        reply = default_respond(body)
        return dataclasses.replace(reply, delay_s=0.3) if is_part(body) else reply

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=reporting(3.0, respond)) as fake:
        settings = config(fake.base_url, concurrency=2)
        # One call at a time, and a refusal at once for the other: part 2 looks again
        # after each pause, prepared anew.
        upstream = dataclasses.replace(settings.upstreams[0], max_concurrency=1, max_limit_wait_s=0)
        tenants = {"*": TenantConfig(tokens_per_minute=TOKENS_PER_MINUTE)}
        gateway = await start_gateway(
            dataclasses.replace(settings, upstreams=(upstream,), tenants=tenants)
        )
        # Two answers short of the samples a factor needs: part 1's is the third.
        for _ in range(2):
            await gateway.stub.Complete(chat(document(1)), timeout=30)
        warming = len(fake.requests)
        # The bucket as the warming calls left it, never refilled (the limiter's clock
        # stopped): what it loses is what the parts take.
        limiter = gateway.server.tenant_limiter
        assert isinstance(limiter, MemoryTenantLimiter)
        stopped = FakeClock(start=limiter._clock.now())
        limiter._clock = stopped
        limiter._tokens["default"].refill(stopped.now(), TOKENS_PER_MINUTE)
        before = await level(gateway, "default", "tpm", None)
        response = await gateway.stub.Summarize(
            pb.SummarizeRequest(model=FAKE_MODEL, document=document(30)), timeout=60
        )
        del fake.requests[:warming]
        assert response.summary == "FINAL"
        second = [header(r.body) for r in fake.requests if header(r.body).startswith("Part 2 ")]
        assert second
        assert all(", piece " in h for h in second)  # refused whole, unsent
        spent = before - await level(gateway, "default", "tpm", None)
        assert spent == sent_tokens(fake.requests)
