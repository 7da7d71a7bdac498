"""Circuit breakers per upstream and model: one model's failures on an upstream keep that
model off it, not the other models it serves; the upstream's own failures, or two of its
models failing at once, keep them all off.

Each test runs the real server on loopback in front of one local upstream serving two
models (`MODEL_A`, `MODEL_B`), or a reseller serving three and another serving the third
(`reseller_config`), and calls it through the generated stubs.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.breaker import BreakerState
from service.config import GatewayConfig, parse_config
from service.telemetry.metrics import BREAKER_STATES
from service.telemetry.tracing import UPSTREAM, UPSTREAM_MODEL
from tests.conftest import RunningGateway, chat, gateway_config_data
from tests.fake_upstream import Status
from tests.integration.helpers import error_info, retry_delay_s
from tests.integration.test_resilience import FAST_RESILIENCE, settle
from tests.scripted_upstream import GatedUpstream, ScriptedUpstream, user_text
from tests.telemetry_support import captured_telemetry

MODEL_A = "model-a"
MODEL_B = "model-b"
MODEL_C = "model-c"
PRICE = {"context_window": 4096, "input_usd_per_million": 0.14, "output_usd_per_million": 0.42}


def two_model_config(base_url: str, **resilience: Any) -> GatewayConfig:
    """One upstream, up0, serving both models; one attempt a call, no retry to wait out."""
    data = gateway_config_data(
        base_url, resilience={**FAST_RESILIENCE, "attempts": 1, **resilience}
    )
    data["upstreams"][0]["models"] = [MODEL_A, MODEL_B]
    data["models"] = {MODEL_A: PRICE, MODEL_B: PRICE}
    return parse_config(data, source="<test>", environ={})


def reseller_config(reseller_url: str, other_url: str, **resilience: Any) -> GatewayConfig:
    """up0, a reseller serving model-a, model-b and model-c, and up1 serving model-c
    alone; two attempts a call (a failed one fails over, or tries up0 again)."""
    data = gateway_config_data(
        reseller_url, other_url, resilience={**FAST_RESILIENCE, "attempts": 2, **resilience}
    )
    data["upstreams"][0]["models"] = [MODEL_A, MODEL_B, MODEL_C]
    data["upstreams"][1]["models"] = [MODEL_C]
    data["models"] = {MODEL_A: PRICE, MODEL_B: PRICE, MODEL_C: PRICE}
    return parse_config(data, source="<test>", environ={})


def failing_for(model: str) -> Any:
    """A `respond` answering 500 to the requests for `model`, the others as by default."""
    return lambda body: Status(500) if body.get("model") == model else None


async def health(gateway: RunningGateway) -> dict[str, int]:
    """up0's health in ListModels, by model."""
    listed = await gateway.stub.ListModels(pb.ListModelsRequest())
    return {m.name: m.upstreams[0].health for m in listed.models}


async def healths(gateway: RunningGateway) -> dict[tuple[str, str], int]:
    """Each upstream's health in ListModels, by model and upstream."""
    listed = await gateway.stub.ListModels(pb.ListModelsRequest())
    return {(m.name, u.name): u.health for m in listed.models for u in m.upstreams}


async def fails(gateway: RunningGateway, request: pb.CompleteRequest) -> grpc.aio.AioRpcError:
    """The error `request` fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await gateway.stub.Complete(request)
    return failed.value


async def test_a_models_5xx_opens_its_breaker_alone(start_gateway, caplog):
    """model-a's 500s open model-a's breaker on up0: its next call is refused without an
    attempt, saying the circuit is open for this model (not up0's own, which keeps every
    model off), and told to come back after the cool-down, while model-b's calls still go
    to up0 at the first attempt. ListModels, the breaker gauge and the log name the model.

    Before, up0 had one breaker: model-a's 500s opened it and model-b, healthy, was
    refused as well (`up0 (circuit open)`); then, with a breaker per model, model-a's
    refusal still said `up0 (circuit open)`, as for an upstream down for every model."""
    caplog.set_level(logging.INFO, logger="llm_gateway.breaker")
    captured = captured_telemetry()
    async with ScriptedUpstream(respond=failing_for(MODEL_A)) as fake:
        config = two_model_config(
            fake.base_url, breaker_consecutive_failures=2, breaker_cool_down_s=30.0
        )
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        for _ in range(2):
            failed = await fails(gateway, chat(model=MODEL_A))
            assert failed.code() is grpc.StatusCode.UNAVAILABLE
        refused = await fails(gateway, chat(model=MODEL_A))
        assert "up0 (circuit open for this model)" in refused.details()
        assert error_info(refused).metadata["attempts"] == "0"
        delay_s = retry_delay_s(refused)
        assert delay_s is not None
        assert 1.0 < delay_s <= 30.0  # the open circuit's cool-down, not the first backoff
        answered = await gateway.stub.Complete(chat(model=MODEL_B))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up0", 1)
        assert [r.body["model"] for r in fake.requests] == [MODEL_A, MODEL_A, MODEL_B]
        assert await health(gateway) == {
            MODEL_A: pb.UPSTREAM_HEALTH_UNHEALTHY,
            MODEL_B: pb.UPSTREAM_HEALTH_HEALTHY,
        }

    def gauge(**attributes: str) -> float:
        return captured.total("llm_gateway.upstream.breaker.state", **attributes)

    assert gauge(**{UPSTREAM: "up0", UPSTREAM_MODEL: MODEL_A}) == BREAKER_STATES["open"]
    assert gauge(**{UPSTREAM: "up0", UPSTREAM_MODEL: MODEL_B}) == BREAKER_STATES["closed"]
    changes = [r for r in caplog.records if r.getMessage() == "breaker.state_changed"]
    assert [(r.upstream, getattr(r, "model", None), r.to) for r in changes] == [
        ("up0", MODEL_A, "open")
    ]


async def test_a_refused_connection_opens_the_upstreams_own_breaker_for_every_model(
    start_gateway, caplog, refused_port
):
    """Connections to up0 refused, for model-a's calls: they count against up0's own
    breaker, which keeps model-b off up0 too (refused without an attempt); the models'
    own breakers stay closed, and the log's breaker change names no model."""
    caplog.set_level(logging.INFO, logger="llm_gateway.breaker")
    config = two_model_config(
        f"http://127.0.0.1:{refused_port}/v1",
        breaker_consecutive_failures=2,
        breaker_cool_down_s=30.0,
    )
    gateway = await start_gateway(config)
    for _ in range(2):
        failed = await fails(gateway, chat(model=MODEL_A))
        assert error_info(failed).metadata["attempts"] == "1"
    refused = await fails(gateway, chat(model=MODEL_B))
    assert "up0 (circuit open)" in refused.details()  # up0's own: not "for this model"
    assert error_info(refused).metadata["attempts"] == "0"
    pool = gateway.server.pipeline.pool
    assert pool.state("up0").breaker.state is BreakerState.OPEN
    for model in (MODEL_A, MODEL_B):
        assert pool.breaker("up0", model).model.state is BreakerState.CLOSED
    assert await health(gateway) == {
        MODEL_A: pb.UPSTREAM_HEALTH_UNHEALTHY,
        MODEL_B: pb.UPSTREAM_HEALTH_UNHEALTHY,
    }
    changes = [r for r in caplog.records if r.getMessage() == "breaker.state_changed"]
    assert [(r.upstream, getattr(r, "model", None), r.to) for r in changes] == [
        ("up0", None, "open")
    ]


async def test_a_models_breaker_recovers_by_its_own_probe(start_gateway):
    """model-a's breaker, half-open after its cool-down, lets one probe through: while
    it runs another model-a call is refused (`circuit half-open for this model, its probe
    running`) and model-b's calls go on to up0; the probe's answer closes model-a's
    breaker, and model-a's calls reach up0 again."""
    behaviours = {"fail": Status(500)}
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        for text in ("fail", "b", "after"):
            fake.release(text)
        config = two_model_config(
            fake.base_url, breaker_consecutive_failures=1, breaker_cool_down_s=0.3
        )
        gateway = await start_gateway(config)
        breaker = gateway.server.pipeline.pool.breaker("up0", MODEL_A)
        await fails(gateway, chat("fail", model=MODEL_A))
        assert breaker.state is BreakerState.OPEN
        assert await settle(lambda: breaker.state is BreakerState.HALF_OPEN)
        probe = gateway.stub.Complete(chat("probe", model=MODEL_A))
        assert await settle(lambda: fake.in_flight == 1)
        refused = await fails(gateway, chat("refused", model=MODEL_A))
        assert "up0 (circuit half-open for this model, its probe running)" in refused.details()
        answered = await gateway.stub.Complete(chat("b", model=MODEL_B))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up0", 1)
        assert await health(gateway) == {
            MODEL_A: pb.UPSTREAM_HEALTH_PROBING,
            MODEL_B: pb.UPSTREAM_HEALTH_HEALTHY,
        }
        fake.release("probe")
        assert (await probe).metadata.upstream == "up0"
        assert breaker.state is BreakerState.CLOSED
        after = await gateway.stub.Complete(chat("after", model=MODEL_A))
        assert (after.metadata.upstream, after.metadata.attempts) == ("up0", 1)
        assert [user_text(r.body) for r in fake.requests] == ["fail", "probe", "b", "after"]


async def test_two_models_failing_on_an_upstream_keep_every_model_off_it(start_gateway, caplog):
    """up0, a reseller whose backend is down, answers 500 for every model. model-a's
    failures open model-a's breaker there; model-b's then open model-b's, and with
    model-a's still open that opens up0's own: model-c, never failed, is kept off up0 at
    once, its call answered by up1 at the first attempt. A model-a call is refused naming
    up0's own circuit, told to come back after its cool-down; ListModels, the breaker
    gauge and the log say up0 down for every model.

    Before, each model's breaker opened only after its own run of failures: model-c's
    call went to the dead up0 first and only then failed over (2 attempts)."""
    caplog.set_level(logging.INFO, logger="llm_gateway.breaker")
    captured = captured_telemetry()
    async with (
        ScriptedUpstream(respond=lambda body: Status(500)) as reseller,
        ScriptedUpstream() as other,
    ):
        config = reseller_config(
            reseller.base_url,
            other.base_url,
            breaker_consecutive_failures=2,
            breaker_cool_down_s=30.0,
        )
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        for model in (MODEL_A, MODEL_B):
            failed = await fails(gateway, chat(model=model))
            assert error_info(failed).metadata["attempts"] == "2"
        answered = await gateway.stub.Complete(chat(model=MODEL_C))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up1", 1)
        assert [r.body["model"] for r in reseller.requests] == [MODEL_A] * 2 + [MODEL_B] * 2
        refused = await fails(gateway, chat(model=MODEL_A))
        assert "up0 (circuit open)" in refused.details()  # up0's own: every model
        assert error_info(refused).metadata["attempts"] == "0"
        delay_s = retry_delay_s(refused)
        assert delay_s is not None
        assert 1.0 < delay_s <= 30.0
        assert await healths(gateway) == {
            (MODEL_A, "up0"): pb.UPSTREAM_HEALTH_UNHEALTHY,
            (MODEL_B, "up0"): pb.UPSTREAM_HEALTH_UNHEALTHY,
            (MODEL_C, "up0"): pb.UPSTREAM_HEALTH_UNHEALTHY,
            (MODEL_C, "up1"): pb.UPSTREAM_HEALTH_HEALTHY,
        }

    own = [
        p.value
        for p in captured.points("llm_gateway.upstream.breaker.state")
        if p.attributes.get(UPSTREAM) == "up0" and UPSTREAM_MODEL not in p.attributes
    ]
    assert own == [BREAKER_STATES["open"]]
    changes = [r for r in caplog.records if r.getMessage() == "breaker.state_changed"]
    assert [(r.upstream, getattr(r, "model", None), r.to) for r in changes] == [
        ("up0", MODEL_A, "open"),
        ("up0", MODEL_B, "open"),
        ("up0", None, "open"),
    ]
    assert changes[-1].why == f"2 models failing: {MODEL_A}, {MODEL_B}"


async def test_one_models_failures_beside_anothers_single_failure_keep_that_model_off_alone(
    start_gateway,
):
    """model-a's 500s open its breaker on up0; model-b fails once there (its retry on up0
    answered), too few to open its own: up0's own breaker stays closed, and model-c's
    call goes to up0 at the first attempt. One model down is that model's alone."""
    b_failures = [Status(500)]

    def respond(body: dict[str, Any]) -> Any:
        if body.get("model") == MODEL_A:
            return Status(500)
        return b_failures.pop() if body.get("model") == MODEL_B and b_failures else None

    async with ScriptedUpstream(respond=respond) as reseller, ScriptedUpstream() as other:
        config = reseller_config(
            reseller.base_url,
            other.base_url,
            breaker_consecutive_failures=2,
            breaker_cool_down_s=30.0,
        )
        gateway = await start_gateway(config)
        await fails(gateway, chat(model=MODEL_A))
        answered = await gateway.stub.Complete(chat(model=MODEL_B))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up0", 2)
        answered = await gateway.stub.Complete(chat(model=MODEL_C))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up0", 1)
        pool = gateway.server.pipeline.pool
        assert pool.state("up0").breaker.state is BreakerState.CLOSED
        assert (await healths(gateway))[(MODEL_C, "up0")] == pb.UPSTREAM_HEALTH_HEALTHY


async def test_a_model_breaker_half_open_past_the_window_is_not_counted_failing(start_gateway):
    """model-a's breaker opened, then turned half-open and no call came to probe it for
    longer than `breaker_window_s`: model-b's breaker opening then is one model failing,
    not two, and keeps model-b off up0 alone (model-c's call still goes to up0)."""
    behaviours = {MODEL_A: Status(500), MODEL_B: Status(500)}
    async with (
        ScriptedUpstream(respond=lambda body: behaviours.get(body.get("model"))) as reseller,
        ScriptedUpstream() as other,
    ):
        config = reseller_config(
            reseller.base_url,
            other.base_url,
            breaker_consecutive_failures=2,
            breaker_cool_down_s=0.1,
            breaker_window_s=0.3,
        )
        gateway = await start_gateway(config)
        pool = gateway.server.pipeline.pool
        await fails(gateway, chat(model=MODEL_A))
        model_a = pool.breaker("up0", MODEL_A).model
        assert await settle(lambda: not model_a.is_failing())
        assert model_a.state is BreakerState.HALF_OPEN
        await fails(gateway, chat(model=MODEL_B))
        assert pool.breaker("up0", MODEL_B).model.state is not BreakerState.CLOSED
        assert pool.state("up0").breaker.state is BreakerState.CLOSED
        answered = await gateway.stub.Complete(chat(model=MODEL_C))
        assert (answered.metadata.upstream, answered.metadata.attempts) == ("up0", 1)
