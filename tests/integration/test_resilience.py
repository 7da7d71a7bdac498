"""Retries, failover, breaker and shedding through the real server and fault-injecting upstreams.

The fault matrix runs every row both unary and streaming and asserts, for each, the final
status or answer, the attempts, the time taken (bounds that prove a wait was honoured and
not exceeded), and that no upstream connection, limiter slot, admission slot or task is
left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.breaker import BreakerState
from service.clock import Deadline
from service.config import GatewayConfig, UpstreamConfig
from service.domain import ChatRequest, Message, Role
from service.errors import RETRY_ELSEWHERE_TRAILER, RETRY_PUSHBACK_TRAILER, UpstreamAuthRejected
from service.pipeline import Pipeline
from service.pool import AttemptLog, UpstreamPool
from service.pool_hooks import AttemptRecord, RetryDecision
from service.pricing import PriceList
from service.retry import LACKING_MODEL_MEMORY_S
from service.upstream.client import UpstreamClient
from tests.conftest import FAKE_MODEL, RunningGateway, chat, chat_stream, gateway_config
from tests.fake_clock import FakeClock
from tests.fake_upstream import (
    Behaviour,
    CutStream,
    FakeUpstream,
    Hang,
    MalformedSSE,
    Reply,
    Reset,
    Status,
)
from tests.integration.helpers import error_info
from tests.ports import refusing_port
from tests.scripted_upstream import GatedUpstream, ScriptedUpstream, user_text

# Small waits keep the matrix fast; the bounds below are generous for a loaded 2-core box.
FAST_RESILIENCE = {
    "attempts": 3,
    "backoff_base_s": 0.02,
    "backoff_cap_s": 0.1,
    "max_retry_after_s": 5.0,
}
REFUSED = "refused"


@dataclass(frozen=True)
class Expect:
    """What the caller should see."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    attempts: int = 1
    upstream: str = "up0"
    min_s: float = 0.0
    # A guard against a hang or a wait of the unscaled settings (backoffs up to 8 s, a
    # Retry-After up to 60 s); the waits the rows expect are at most about a second.
    max_s: float = 6.0
    reason: str | None = None
    # Text received before the error, for interrupted streams (events that arrived in
    # one read are relayed as one delta, so the text is what is certain, not the count).
    text: str | None = None


@dataclass(frozen=True)
class Row:
    """One fault: the behaviour of each upstream, and what unary and stream calls see."""

    id: str
    scripts: tuple[tuple[Behaviour, ...] | str, ...]
    unary: Expect
    stream: Expect
    default: Behaviour | None = None  # what up0 does once its script runs out
    timeout_s: float = 10.0
    config: dict[str, Any] = field(default_factory=dict)


MATRIX = [
    Row(
        "429-retry-after-then-ok",
        ((Status(429, headers={"Retry-After": "1"}), Reply()),),
        unary=Expect(attempts=2, min_s=0.9),
        stream=Expect(attempts=2, min_s=0.9),
    ),
    Row(
        "500-500-then-ok",
        ((Status(500), Status(500), Reply()),),
        unary=Expect(attempts=3),
        stream=Expect(attempts=3),
    ),
    Row(
        "always-503",
        ((),),
        default=Status(503),
        unary=Expect(grpc.StatusCode.UNAVAILABLE, attempts=3, reason="UPSTREAM_UNAVAILABLE"),
        stream=Expect(grpc.StatusCode.UNAVAILABLE, attempts=3, reason="UPSTREAM_UNAVAILABLE"),
    ),
    Row(
        "reset-before-headers-then-ok",
        ((Reset(), Reply()),),
        unary=Expect(attempts=2),
        stream=Expect(attempts=2),
    ),
    Row(
        "hang-past-deadline",
        ((),),
        default=Hang(),
        timeout_s=1.0,
        unary=Expect(grpc.StatusCode.DEADLINE_EXCEEDED, attempts=1, min_s=0.9),
        stream=Expect(grpc.StatusCode.DEADLINE_EXCEEDED, attempts=1, min_s=0.9),
    ),
    Row(
        "cut-after-2-chunks",
        ((CutStream(after_chunks=2), Reply()),),
        unary=Expect(attempts=2),
        stream=Expect(
            grpc.StatusCode.UNAVAILABLE, attempts=1, reason="STREAM_INTERRUPTED", text="a b"
        ),
    ),
    Row(
        "cut-before-first-delta-then-ok",
        ((CutStream(after_chunks=0), Reply()),),
        unary=Expect(attempts=2),
        stream=Expect(attempts=2),
    ),
    Row(
        "malformed-sse",
        ((MalformedSSE(after_chunks=1), Reply()),),
        unary=Expect(attempts=2),
        stream=Expect(
            grpc.StatusCode.UNAVAILABLE, attempts=1, reason="STREAM_INTERRUPTED", text="a"
        ),
    ),
    Row(
        # DeepSeek cuts a generation short for lack of capacity with a finish reason.
        "deepseek-insufficient-resource-then-ok",
        ((Reply(finish_reason="insufficient_system_resource"), Reply()),),
        unary=Expect(attempts=2),
        stream=Expect(
            grpc.StatusCode.UNAVAILABLE,
            attempts=1,
            reason="STREAM_INTERRUPTED",
            text="Hello from fake",
        ),
    ),
    Row(
        "401-on-one-of-two",
        ((Status(401),), ()),
        unary=Expect(attempts=2, upstream="up1"),
        stream=Expect(attempts=2, upstream="up1"),
    ),
    Row(  # DeepSeek's "Insufficient Balance": the gateway's account there, not the call
        "402-out-of-credit-on-one-of-two",
        ((Status(402, '{"error": {"message": "Insufficient Balance"}}'),), ()),
        unary=Expect(attempts=2, upstream="up1"),
        stream=Expect(attempts=2, upstream="up1"),
    ),
    Row(
        "refused-on-one-of-two",
        (REFUSED, ()),
        unary=Expect(attempts=2, upstream="up1"),
        stream=Expect(attempts=2, upstream="up1"),
    ),
]


def error_details(error: grpc.aio.AioRpcError) -> tuple[dict[str, str], str, float | None]:
    """(ErrorInfo metadata, ErrorInfo reason, RetryInfo seconds) from a failed call."""
    metadata: dict[str, str] = {}
    reason = ""
    retry_s = None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                metadata, reason = dict(info.metadata), info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return metadata, reason, retry_s


def checked_out_connections(gateway: RunningGateway) -> int:
    """Upstream connections the gateway holds checked out (not idle in the pool)."""
    assert gateway.server.pipeline is not None
    return sum(c.checked_out_connections for c in gateway.server.pipeline.pool.clients)


def slots_in_use(gateway: RunningGateway) -> int:
    """Admission and per-upstream limiter slots still taken."""
    assert gateway.server.pipeline is not None
    pool = gateway.server.pipeline.pool
    return gateway.server.admission.in_flight + sum(pool.health(c.name)[1] for c in pool.clients)


def leftover_tasks() -> list[str]:
    """Tasks still running an RPC handler or gateway code (grpc's own loops excluded)."""
    found = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", "")
        code = getattr(coro, "cr_code", None)
        filename = code.co_filename if code is not None else ""
        if name == "_schedule_rpc_coro" or "/service/" in filename:
            found.append(name or repr(coro))
    return found


async def settle(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll `condition` until it holds or the timeout passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


@contextlib.asynccontextmanager
async def upstreams_for(row: Row) -> AsyncIterator[tuple[list[str], list[FakeUpstream]]]:
    """Start one fake per scripted upstream (or a closed port); yield URLs and fakes."""
    async with contextlib.AsyncExitStack() as stack:
        urls: list[str] = []
        fakes: list[FakeUpstream] = []
        for index, script in enumerate(row.scripts):
            if script == REFUSED:
                port = stack.enter_context(refusing_port())
                urls.append(f"http://127.0.0.1:{port}/v1")
                continue
            default = row.default if index == 0 else None
            fake = await stack.enter_async_context(
                FakeUpstream(models=("fake-model",), default=default)
            )
            assert not isinstance(script, str)
            fake.script(*script)
            urls.append(fake.base_url)
            fakes.append(fake)
        yield urls, fakes


async def call(gateway: RunningGateway, mode: str, timeout_s: float) -> tuple[Any, list[str]]:
    """Make one call; (final metadata or the AioRpcError, deltas received)."""
    if mode == "unary":
        try:
            response = await gateway.stub.Complete(chat(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return error, []
        return response.metadata, [response.content]
    deltas: list[str] = []
    try:
        async for item in gateway.stub.CompleteStream(chat_stream(), timeout=timeout_s):
            if item.HasField("final"):
                return item.final, deltas
            deltas.append(item.delta.content)
    except grpc.aio.AioRpcError as error:
        return error, deltas
    raise AssertionError("stream ended without a final message")


@pytest.mark.parametrize("mode", ["unary", "stream"])
@pytest.mark.parametrize("row", MATRIX, ids=[r.id for r in MATRIX])
async def test_fault_matrix(row: Row, mode: str, start_gateway):
    """Each fault ends in the expected answer or status, attempts and time, leaking nothing."""
    expect = row.unary if mode == "unary" else row.stream
    async with upstreams_for(row) as (urls, fakes):
        config = gateway_config(*urls, resilience={**FAST_RESILIENCE, **row.config})
        gateway = await start_gateway(config)
        await gateway.stub.ListModels(pb.ListModelsRequest())  # warm the channel

        started = time.monotonic()
        result, deltas = await call(gateway, mode, row.timeout_s)
        elapsed = time.monotonic() - started

        assert expect.min_s <= elapsed < expect.max_s, f"took {elapsed:.2f}s"
        upstream_requests = sum(len(f.requests) for f in fakes)
        refused = sum(1 for s in row.scripts if s == REFUSED)
        assert upstream_requests == expect.attempts - refused
        if expect.code is grpc.StatusCode.OK:
            assert isinstance(result, pb.CompletionMetadata), result
            assert result.attempts == expect.attempts
            assert result.upstream == expect.upstream
            assert "".join(deltas) == "Hello from fake"
        else:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() is expect.code
            if expect.reason is not None:
                metadata, reason, retry_s = error_details(result)
                assert reason == expect.reason
                if expect.code is grpc.StatusCode.UNAVAILABLE:
                    # No Retry-After from the upstream: the first backoff (breaker closed).
                    assert retry_s == pytest.approx(FAST_RESILIENCE["backoff_base_s"])
                assert metadata["attempts"] == str(expect.attempts)
                assert metadata["upstream"] == expect.upstream
                assert "http://" not in result.details()
            if expect.text is not None:
                assert "".join(deltas) == expect.text
                assert metadata["deltas_sent"] == str(len(deltas))
        if isinstance(row.default, Hang):
            await fakes[0].wait_for_disconnect(timeout_s=3.0)

        assert await settle(lambda: checked_out_connections(gateway) == 0)
        assert await settle(lambda: slots_in_use(gateway) == 0)
        assert await settle(lambda: not leftover_tasks()), leftover_tasks()
        counters = gateway.server.pipeline.pool.counters
        assert await settle(lambda: counters.attempts == expect.attempts)
        assert counters.retries == expect.attempts - 1


async def test_text_read_with_a_malformed_event_reaches_the_caller_before_the_error(stub, upstream):
    """Good events read together with a malformed one are relayed, then the stream fails."""
    upstream.script(MalformedSSE(after_chunks=2, coalesce=True))
    deltas: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stub.CompleteStream(chat_stream()):
            deltas.append(event.delta.content)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert deltas == ["a", " b"]  # the first text alone, then the rest of the read
    metadata, reason, _ = error_details(caught.value)
    assert (reason, metadata["deltas_sent"]) == ("STREAM_INTERRUPTED", "2")


async def test_key_rejected_upstream_is_skipped_and_shown_unhealthy(start_gateway):
    """After a 401 the upstream's breaker opens: later calls go straight to the healthy one."""
    async with FakeUpstream(default=Status(401)) as bad, FakeUpstream() as good:
        gateway = await start_gateway(
            gateway_config(bad.base_url, good.base_url, resilience=FAST_RESILIENCE)
        )
        first = await gateway.stub.Complete(chat())
        assert (first.metadata.attempts, first.metadata.upstream) == (2, "up1")
        for _ in range(3):
            later = await gateway.stub.Complete(chat())
            assert (later.metadata.attempts, later.metadata.upstream) == (1, "up1")
        assert len(bad.requests) == 1  # never retried in a loop
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        health = {u.name: u.health for u in models.models[0].upstreams}
        assert health == {"up0": pb.UPSTREAM_HEALTH_UNHEALTHY, "up1": pb.UPSTREAM_HEALTH_HEALTHY}


async def test_a_prompt_flagged_by_moderation_fails_alone_and_leaves_the_upstream_healthy(
    start_gateway,
):
    """OpenRouter answers a prompt its moderation flags with 403 and the reasons: the
    caller's content, not the gateway's key. The call fails INVALID_ARGUMENT
    (UPSTREAM_REJECTED_REQUEST) and the upstream stays healthy, serving later calls.

    Before, the 403 was read as a rejected key: the call failed over, and the upstream's
    breaker opened for the key cool-down, for every caller, over one flagged prompt."""
    flagged = json.dumps(
        {
            "error": {
                "code": 403,
                "message": "Your chosen model requires moderation and your input was flagged",
                "metadata": {"reasons": ["violence"], "flagged_input": "..."},
            }
        }
    )
    async with FakeUpstream() as moderated, FakeUpstream() as other:
        gateway = await start_gateway(
            gateway_config(moderated.base_url, other.base_url, resilience=FAST_RESILIENCE)
        )
        moderated.script(Status(403, flagged))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "flagged by its moderation" in refused.value.details()
        assert refused.value.details().endswith(
            "(HTTP 403): Your chosen model requires moderation and your input was flagged"
        )
        _, reason, _ = error_details(refused.value)
        assert reason == "UPSTREAM_REJECTED_REQUEST"
        assert other.requests == []
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        health = {u.name: u.health for u in models.models[0].upstreams}
        assert health == {"up0": pb.UPSTREAM_HEALTH_HEALTHY, "up1": pb.UPSTREAM_HEALTH_HEALTHY}
        served = {(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(2)}
        assert served == {"up0", "up1"}  # round robin goes on reaching the moderated one


# How upstreams say they have no such model: OpenAI's 404, vLLM's (its bare error
# object) and DeepSeek's 400.
OPENAI_MODEL_NOT_FOUND = Status(
    404,
    json.dumps(
        {
            "error": {
                "message": "The model `fake-model` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
    ),
)
VLLM_MODEL_NOT_FOUND = Status(
    404,
    json.dumps(
        {
            "object": "error",
            "message": "The model `fake-model` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
    ),
)
DEEPSEEK_MODEL_NOT_FOUND = Status(
    400,
    '{"error": {"message": "Model Not Exist", "type": "invalid_request_error", "param": null, '
    '"code": "invalid_request_error"}}',
)
MODEL_NOT_FOUND_REFUSALS = [
    pytest.param(OPENAI_MODEL_NOT_FOUND, id="openai-404"),
    pytest.param(VLLM_MODEL_NOT_FOUND, id="vllm-404"),
    pytest.param(DEEPSEEK_MODEL_NOT_FOUND, id="deepseek-400"),
]


@pytest.mark.parametrize("mode", ["unary", "stream"])
@pytest.mark.parametrize("refusal", MODEL_NOT_FOUND_REFUSALS)
async def test_an_upstream_without_the_model_fails_over_to_one_that_serves_it(
    start_gateway, mode, refusal
):
    """One provider dropped or renamed the model, another still serves it: the call goes
    to the other at once and is answered (attempts 2), the first not retried, and shown
    unhealthy for the model while it is passed over for it (its breaker is not told).
    Before, the 404 ended the call INVALID_ARGUMENT, as if the request were at fault."""
    async with FakeUpstream(default=refusal) as lacking, FakeUpstream() as serving:
        gateway = await start_gateway(
            gateway_config(lacking.base_url, serving.base_url, resilience=FAST_RESILIENCE)
        )
        metadata, _ = await call(gateway, mode, timeout_s=10)
        assert not isinstance(metadata, grpc.aio.AioRpcError), metadata
        assert (metadata.upstream, metadata.attempts) == ("up1", 2)
        assert (len(lacking.requests), len(serving.requests)) == (1, 1)
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        health = {u.name: u.health for u in models.models[0].upstreams}
        assert health == {"up0": pb.UPSTREAM_HEALTH_UNHEALTHY, "up1": pb.UPSTREAM_HEALTH_HEALTHY}
        pool = gateway.server.pipeline.pool
        assert pool.breaker("up0", FAKE_MODEL).state is BreakerState.CLOSED


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_an_upstream_found_lacking_the_model_is_passed_over_for_it(
    start_gateway, mode, caplog
):
    """Once up0 has answered that it lacks the model, the calls that follow go straight to
    up1 (attempts 1), whose turn in the round-robin up0's would have been: up0 got one
    request in four calls, not two. ListModels shows it unhealthy for the model meanwhile,
    and the operator is told once, not per call. Before, every other call paid up0's 404
    (a round trip, and on a metered reseller maybe a request) before up1 answered it."""
    caplog.set_level(logging.INFO, logger="llm_gateway.pool")
    async with FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking, FakeUpstream() as serving:
        gateway = await start_gateway(
            gateway_config(lacking.base_url, serving.base_url, resilience=FAST_RESILIENCE)
        )
        served = []
        for _ in range(4):
            metadata, _ = await call(gateway, mode, timeout_s=10)
            assert not isinstance(metadata, grpc.aio.AioRpcError), metadata
            served.append((metadata.upstream, metadata.attempts))
        assert served == [("up1", 2), ("up1", 1), ("up1", 1), ("up1", 1)]
        assert (len(lacking.requests), len(serving.requests)) == (1, 4)
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        health = {u.name: u.health for u in models.models[0].upstreams}
        assert health == {"up0": pb.UPSTREAM_HEALTH_UNHEALTHY, "up1": pb.UPSTREAM_HEALTH_HEALTHY}
    [said] = [r for r in caplog.records if r.getMessage() == "pool.upstream_lacks_model"]
    assert (said.levelname, said.upstream, said.upstream_model) == ("WARNING", "up0", FAKE_MODEL)


async def test_an_upstream_found_lacking_the_model_is_tried_again_after_a_while():
    """The lack is remembered for `LACKING_MODEL_MEMORY_S` only: OpenAI's `model_not_found`
    also means no access, which can be granted, and an Azure deployment can be created.
    Once it has passed, up0 takes its turn again, and serves the model it now has. (A
    fake clock moves the pool's time; the HTTP is real.)"""
    clock = FakeClock()
    async with FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking, FakeUpstream() as serving:
        config = gateway_config(lacking.base_url, serving.base_url, resilience=FAST_RESILIENCE)
        async with (
            UpstreamClient(config.upstreams[0]) as first,
            UpstreamClient(config.upstreams[1]) as second,
        ):
            pool = UpstreamPool([first, second], settings=config.resilience, clock=clock)
            pipeline = Pipeline(config, pool, PriceList(config.models))

            async def served_by(number: int) -> str:
                request = ChatRequest(FAKE_MODEL, (Message(Role.USER, f"call {number}"),))
                completion = await pipeline.complete(request, deadline=Deadline.after(None, clock))
                return completion.upstream

            assert [await served_by(n) for n in range(4)] == ["up1"] * 4
            assert len(lacking.requests) == 1
            clock.advance(LACKING_MODEL_MEMORY_S - 1.0)
            assert [await served_by(n) for n in range(4, 6)] == ["up1"] * 2
            assert len(lacking.requests) == 1
            clock.advance(1.0)
            lacking.default = Reply()  # the deployment was created meanwhile
            assert {await served_by(n) for n in range(6, 8)} == {"up0", "up1"}
            assert len(lacking.requests) == 2


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_model_its_only_upstream_lacks_is_still_a_rejected_request(start_gateway, mode):
    """With no other upstream the lack is the caller's to hear as before: INVALID_ARGUMENT,
    UPSTREAM_REJECTED_REQUEST with what the upstream said, one attempt, no RetryInfo; with
    two that both lack it, the same, naming both attempts. Found lacking it, neither is
    passed over by the next call: no other upstream may serve it."""
    async with FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as only:
        gateway = await start_gateway(gateway_config(only.base_url, resilience=FAST_RESILIENCE))
        error, _ = await call(gateway, mode, timeout_s=10)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().endswith(
            "(HTTP 404): The model `fake-model` does not exist or you do not have access to it."
        )
        metadata, reason, retry_s = error_details(error)
        assert (reason, metadata["attempts"], metadata["upstream_code"], retry_s) == (
            "UPSTREAM_REJECTED_REQUEST",
            "1",
            "model_not_found",
            None,
        )
        assert len(only.requests) == 1
        again, _ = await call(gateway, mode, timeout_s=10)  # not passed over: no other serves it
        assert isinstance(again, grpc.aio.AioRpcError)
        assert error_details(again)[1] == "UPSTREAM_REJECTED_REQUEST"
        assert len(only.requests) == 2
    async with (
        FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as first,
        FakeUpstream(default=VLLM_MODEL_NOT_FOUND) as second,
    ):
        gateway = await start_gateway(
            gateway_config(first.base_url, second.base_url, resilience=FAST_RESILIENCE)
        )
        error, _ = await call(gateway, mode, timeout_s=10)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        metadata, reason, retry_s = error_details(error)
        assert (reason, metadata["attempts"], retry_s) == ("UPSTREAM_REJECTED_REQUEST", "2", None)
        assert metadata["attempt_errors"] == (
            "up0: model not served (HTTP 404); up1: model not served (HTTP 404)"
        )
        assert (len(first.requests), len(second.requests)) == (1, 1)
        again, _ = await call(gateway, mode, timeout_s=10)  # each lacks it: neither passed over
        assert isinstance(again, grpc.aio.AioRpcError)
        assert error_details(again)[0]["attempts"] == "2"
        assert (len(first.requests), len(second.requests)) == (2, 2)


# What servers answer for a path they do not route (a wrong base_url): llama.cpp's server,
# OpenAI's API ("Invalid URL"), Azure's, as JSON error bodies; Ollama's (Go) as text. None
# says a model is missing.
NO_SUCH_PATH_REFUSALS = [
    pytest.param(
        Status(404, '{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'),
        id="llama.cpp",
    ),
    pytest.param(
        Status(
            404,
            '{"error": {"message": "Invalid URL (POST /v1/v1/chat/completions)", '
            '"type": "invalid_request_error", "param": null, "code": null}}',
        ),
        id="openai",
    ),
    pytest.param(
        Status(404, '{"error":{"code":"404","message":"Resource not found"}}'), id="azure"
    ),
    pytest.param(
        Status(404, "404 page not found", headers={"Content-Type": "text/plain"}), id="ollama"
    ),
]


@pytest.mark.parametrize("refusal", NO_SUCH_PATH_REFUSALS)
async def test_a_404_for_a_path_is_a_wrong_base_url_not_a_missing_model(
    start_gateway, refusal, caplog
):
    """A 404 that says no model is missing is a path the server does not route: a wrong
    base_url, which fails every model there. The call fails over as for an answer that is
    no OpenAI one, and the upstream's own breaker is told (open after one failure here),
    not the model passed over there as if it lacked it. Its only upstream's caller gets
    UNAVAILABLE saying to check the base_url, not INVALID_ARGUMENT. Before, a JSON 404 was
    taken for the model missing (and, with the lack remembered, kept the model off a
    misconfigured upstream whose breaker never opened); a text one for the request at
    fault."""
    caplog.set_level(logging.INFO, logger="llm_gateway.pool")
    resilience = {**FAST_RESILIENCE, "breaker_consecutive_failures": 1}
    async with FakeUpstream(default=refusal) as misrouted, FakeUpstream() as serving:
        gateway = await start_gateway(
            gateway_config(misrouted.base_url, serving.base_url, resilience=resilience)
        )
        answer = await gateway.stub.Complete(chat())
        assert (answer.metadata.upstream, answer.metadata.attempts) == ("up1", 2)
        assert gateway.server.pipeline.pool.state("up0").breaker.state is BreakerState.OPEN
    assert not [r for r in caplog.records if r.getMessage() == "pool.upstream_lacks_model"]
    async with FakeUpstream(default=refusal) as only:
        gateway = await start_gateway(gateway_config(only.base_url, resilience=FAST_RESILIENCE))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await gateway.stub.Complete(chat())
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "check its base_url" in failed.value.details()
        metadata, reason, _ = error_details(failed.value)
        assert (reason, metadata["http_status"]) == ("UPSTREAM_UNAVAILABLE", "404")


async def test_a_refusal_of_a_parameter_is_not_failed_over(start_gateway):
    """A 400 about the request itself would fail the same on every upstream: the caller
    gets it at once, and the other upstream sees nothing of the call."""
    bad_temperature = Status(
        400,
        '{"error": {"message": "Invalid \'temperature\': must be at most 2.", "type": '
        '"invalid_request_error", "param": "temperature", "code": "invalid_value"}}',
    )
    async with FakeUpstream(default=bad_temperature) as first, FakeUpstream() as other:
        gateway = await start_gateway(
            gateway_config(first.base_url, other.base_url, resilience=FAST_RESILIENCE)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        metadata, reason, _ = error_details(refused.value)
        assert (reason, metadata["attempts"]) == ("UPSTREAM_REJECTED_REQUEST", "1")
        assert other.requests == []


async def test_a_lack_of_the_model_after_a_5xx_leaves_the_5xx_to_say_why(start_gateway):
    """up0 answers 503, up1 lacks the model, and the attempts run out: the call ends with
    up0's 503 (UNAVAILABLE, with a RetryInfo: up0 may serve the retry), not with up1's
    lack as if the request were at fault; and with a third attempt up0 is tried again."""
    async with FakeUpstream() as flaky, FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking:
        flaky.script(Status(503))
        resilience = {**FAST_RESILIENCE, "attempts": 2}
        gateway = await start_gateway(
            gateway_config(flaky.base_url, lacking.base_url, resilience=resilience)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await gateway.stub.Complete(chat())
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        metadata, reason, retry_s = error_details(failed.value)
        assert (reason, metadata["upstream"], metadata["http_status"]) == (
            "UPSTREAM_UNAVAILABLE",
            "up0",
            "503",
        )
        assert metadata["attempt_errors"] == "up0: HTTP 503; up1: model not served (HTTP 404)"
        assert retry_s is not None
    async with FakeUpstream() as flaky, FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking:
        flaky.script(Status(503))
        gateway = await start_gateway(
            gateway_config(flaky.base_url, lacking.base_url, resilience=FAST_RESILIENCE)
        )
        answer = await gateway.stub.Complete(chat())
        assert (answer.metadata.upstream, answer.metadata.attempts) == ("up0", 3)
        assert (len(flaky.requests), len(lacking.requests)) == (2, 1)


async def test_a_lack_of_the_model_beside_an_open_breaker_is_unavailable(start_gateway):
    """up0 lacks the model and up1, which serves it, has its breaker open: the call ends
    UNAVAILABLE saying why each was passed over, with RetryInfo for up1's cool-down, since
    the caller's retry may reach up1 once it is back; not INVALID_ARGUMENT. up0, found
    lacking the model by the first call, is passed over without a request (attempts 0)."""
    async with (
        FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking,
        FakeUpstream(default=Status(500)) as failing,
    ):
        resilience = {
            **FAST_RESILIENCE,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 30.0,
        }
        gateway = await start_gateway(
            gateway_config(lacking.base_url, failing.base_url, resilience=resilience)
        )
        with pytest.raises(grpc.aio.AioRpcError) as opened:
            await gateway.stub.Complete(chat())  # up0's lack, then up1's 500 opens it
        assert error_details(opened.value)[1] == "UPSTREAM_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert refused.value.details().startswith(
            "no upstream for model 'fake-model' is available: "
            "up0 (model not served there), up1 (circuit open for this model)"
        )
        metadata, reason, retry_s = error_details(refused.value)
        assert (reason, metadata["attempts"]) == ("UPSTREAM_UNAVAILABLE", "0")
        assert retry_s is not None
        assert FAST_RESILIENCE["backoff_cap_s"] < retry_s <= 30.0
        assert (len(lacking.requests), len(failing.requests)) == (1, 1)


async def test_a_lack_of_the_model_beside_an_upstream_at_its_limit_is_that_limit(start_gateway):
    """up0 lacks the model and up1, which serves it, is paused past `max_limit_wait_s`
    (`X-RateLimit-Remaining: 0` for 30 s): the call ends with up1's limit
    (RESOURCE_EXHAUSTED, UPSTREAM_LIMIT, with its wait), the soonest the model is served;
    up0, found lacking it by the first call, is not asked again."""
    paused = Reply(headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    async with FakeUpstream(default=OPENAI_MODEL_NOT_FOUND) as lacking, FakeUpstream() as busy:
        busy.script(paused)
        resilience = {**FAST_RESILIENCE, "max_limit_wait_s": 0.2}
        gateway = await start_gateway(
            gateway_config(lacking.base_url, busy.base_url, resilience=resilience)
        )
        first = await gateway.stub.Complete(chat())  # its answer pauses up1
        assert (first.metadata.upstream, first.metadata.attempts) == ("up1", 2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        _, reason, retry_s = error_details(refused.value)
        assert reason == "UPSTREAM_LIMIT"
        assert retry_s is not None
        assert 0 < retry_s <= 30.0
        assert (len(lacking.requests), len(busy.requests)) == (1, 1)


# OpenAI's answer to an account with no quota left: a 429 no wait mends.
OUT_OF_QUOTA = Status(
    429,
    '{"error": {"message": "You exceeded your current quota, please check your plan and '
    'billing details.", "type": "insufficient_quota", "param": null, '
    '"code": "insufficient_quota"}}',
)


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        pytest.param(Status(403), "rejected the gateway's key", id="403"),
        pytest.param(Status(402), "account for lack of credit", id="402"),
        pytest.param(OUT_OF_QUOTA, "account for lack of credit", id="429-insufficient-quota"),
    ],
)
async def test_only_upstream_key_rejected_is_unavailable_upstream_auth(
    start_gateway, reply, problem
):
    """With its only upstream's key rejected, or its account out of credit (402, or
    OpenAI's 429 `insufficient_quota`), the caller gets UNAVAILABLE/UPSTREAM_AUTH: not
    INVALID_ARGUMENT, as if its request were at fault (a 402 was, before), nor a rate
    limit to wait out (the 429 was, retried and with the breaker never opened). So do the
    calls while its breaker is open, without reaching it, and with the same "do not
    retry" pushback: they got UPSTREAM_UNAVAILABLE, pushed back for the rest of the key
    cool-down, as if time would mend it."""
    async with FakeUpstream(default=reply) as bad:
        gateway = await start_gateway(gateway_config(bad.base_url, resilience=FAST_RESILIENCE))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert problem in info.value.details()
        metadata, reason, _ = error_details(info.value)
        assert reason == "UPSTREAM_AUTH"
        assert metadata["attempts"] == "1"
        assert len(bad.requests) == 1
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await gateway.stub.Complete(chat())
        assert again.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "rejected the gateway's key or account" in again.value.details()
        assert error_details(again.value)[1] == "UPSTREAM_AUTH"
        # Refused without an attempt, and saying so (it said nothing of attempts before).
        assert error_details(again.value)[0]["attempts"] == "0"
        assert dict(again.value.trailing_metadata()).get(RETRY_PUSHBACK_TRAILER) == "-1"
        for error in (info.value, again.value):  # every replica holds the same key
            assert RETRY_ELSEWHERE_TRAILER not in dict(error.trailing_metadata())
        assert len(bad.requests) == 1  # the open breaker answered, not the upstream


def _key_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int]]:
    """The rejected-key lines logged: (level, event, rejections so far or 0)."""
    return [
        (r.levelname, r.getMessage(), getattr(r, "rejections", 0))
        for r in caplog.records
        if r.getMessage().startswith("upstream.key_")
    ]


async def test_a_key_still_rejected_is_recalled_once_a_minute_until_it_is_accepted(caplog):
    """While an upstream's key stays rejected, its probes keep the operator told: the first
    rejection (ERROR), a reminder at most once a minute with the count (WARNING), and the
    answer that shows it mended (INFO). Before, one line was logged and then nothing, for
    as long as the key stayed bad. (A fake clock moves the pool's time; the HTTP is real.)"""
    caplog.set_level(logging.INFO, logger="llm_gateway.pool")
    clock = FakeClock()
    async with FakeUpstream(default=Status(401)) as bad:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "key_rejected_cool_down_s": 20.0}
        config = gateway_config(bad.base_url, resilience=resilience)
        async with UpstreamClient(config.upstreams[0]) as client:
            pool = UpstreamPool([client], settings=config.resilience, clock=clock)
            pipeline = Pipeline(config, pool, PriceList(config.models))

            async def call(number: int) -> None:
                request = ChatRequest(FAKE_MODEL, (Message(Role.USER, f"call {number}"),))
                await pipeline.complete(request, deadline=Deadline.after(None, clock))

            for number in range(8):  # a probe every 20 s for 140 s, each rejected
                with pytest.raises(UpstreamAuthRejected):
                    await call(number)
                clock.advance(20.0)
            bad.default = Reply()
            await call(8)
            await call(9)
    assert len(bad.requests) == 10  # each rejected call a probe after its cool-down
    assert _key_lines(caplog) == [
        ("ERROR", "upstream.key_rejected", 0),
        ("WARNING", "upstream.key_still_rejected", 4),  # 60 s after the first
        ("WARNING", "upstream.key_still_rejected", 7),  # 120 s
        ("INFO", "upstream.key_accepted", 8),
    ]
    assert all(r.upstream == "up0" for r in caplog.records if hasattr(r, "rejections"))


async def test_a_rejected_key_mended_is_logged_through_the_gateway(start_gateway, caplog):
    """Through the real server: the first 401 logs `upstream.key_rejected` with the
    upstream and status, a probe rejected within the minute adds nothing, and the probe
    that is answered logs `upstream.key_accepted` with the rejections in all."""
    caplog.set_level(logging.INFO, logger="llm_gateway.pool")
    async with FakeUpstream(default=Status(401)) as bad:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "key_rejected_cool_down_s": 0.2}
        gateway = await start_gateway(gateway_config(bad.base_url, resilience=resilience))
        breaker = gateway.server.pipeline.pool.state("up0").breaker
        for number in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.stub.Complete(chat(f"call {number}"))
            assert await settle(breaker.allows)  # the cool-down passed: half-open
        bad.default = Reply()
        await gateway.stub.Complete(chat("mended"))
        await gateway.stub.Complete(chat("again"))
    assert _key_lines(caplog) == [
        ("ERROR", "upstream.key_rejected", 0),
        ("INFO", "upstream.key_accepted", 2),
    ]
    [rejected] = [r for r in caplog.records if r.getMessage() == "upstream.key_rejected"]
    assert (rejected.upstream, rejected.http_status) == ("up0", 401)


async def _refused_during_probe(gateway: RunningGateway, probed: Any) -> grpc.aio.AioRpcError:
    """Send "probe" (the half-open upstream's probe) and, while `probed` answers it, call
    again: that call's error. The probe itself is served."""
    probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
    assert await settle(lambda: probed.in_flight == 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(chat("another"))
    assert (await probe).content == "Hello from fake"
    return refused.value


def told_to_wait_out_the_probe(error: grpc.aio.AioRpcError, cool_down_s: float) -> float:
    """The RetryInfo of a call refused while a probe runs: until that probe has answered
    or another may go (its breaker's cool-down from its start), not the first backoff;
    the pushback trailer the same. The seconds, for a test to say more."""
    retry_s = error_details(error)[2]
    assert retry_s is not None
    assert FAST_RESILIENCE["backoff_base_s"] < retry_s <= cool_down_s
    pushback = dict(error.trailing_metadata()).get(RETRY_PUSHBACK_TRAILER)
    assert pushback == str(math.ceil(retry_s * 1000 - 1e-6))
    return retry_s


async def test_a_call_during_a_rejected_keys_probe_is_not_told_to_give_up(start_gateway):
    """Once the key cool-down has passed, the upstream is half-open and its probe may find
    the key mended: a call arriving while the probe runs is no longer one that finds the
    upstream set aside for its key, so it gets UPSTREAM_UNAVAILABLE with a pushback until
    the probe has answered or another may go (it got UPSTREAM_AUTH and -1, "do not retry",
    though the probe then succeeded)."""
    behaviours = {"bad": Status(401), "probe": Reply(delay_s=1.5)}
    async with ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "key_rejected_cool_down_s": 0.4}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await gateway.stub.Complete(chat("bad"))
        assert error_details(rejected.value)[1] == "UPSTREAM_AUTH"
        await asyncio.sleep(0.45)  # the cool-down has passed: half-open
        error = await _refused_during_probe(gateway, fake)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(error)[1] == "UPSTREAM_UNAVAILABLE"
        told_to_wait_out_the_probe(error, cool_down_s=15.0)  # breaker_cool_down_s's default
        assert [user_text(r.body) for r in fake.requests] == ["bad", "probe"]


async def test_a_rejected_keys_probe_answered_5xx_is_unavailable_not_upstream_auth(
    start_gateway,
):
    """The key cool-down passed and the probe got a 5xx: the key was not rejected this
    time, so the calls while the breaker is open again are UPSTREAM_UNAVAILABLE, pushed
    back until the next probe (they got UPSTREAM_AUTH and -1, "do not retry", as if the
    key were still rejected). A 401 on the next probe sets the key aside again."""
    behaviours = {"bad": Status(401), "probe": Status(500), "probe again": Status(401)}
    async with ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            # Long enough that the calls after each probe come while it holds, on a busy
            # machine too.
            "key_rejected_cool_down_s": 1.0,
            "breaker_cool_down_s": 1.0,
        }
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await gateway.stub.Complete(chat("bad"))
        assert error_details(rejected.value)[1] == "UPSTREAM_AUTH"
        await asyncio.sleep(1.05)  # the key cool-down has passed: half-open
        with pytest.raises(grpc.aio.AioRpcError) as probed:
            await gateway.stub.Complete(chat("probe"))
        assert error_details(probed.value)[1] == "UPSTREAM_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as meanwhile:
            await gateway.stub.Complete(chat("meanwhile"))
        assert meanwhile.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(meanwhile.value)[1] == "UPSTREAM_UNAVAILABLE"
        assert dict(meanwhile.value.trailing_metadata()).get(RETRY_PUSHBACK_TRAILER) != "-1"
        await asyncio.sleep(1.05)  # the 5xx's cool-down has passed: half-open
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("probe again"))
        with pytest.raises(grpc.aio.AioRpcError) as set_aside:
            await gateway.stub.Complete(chat("meanwhile"))
        assert error_details(set_aside.value)[1] == "UPSTREAM_AUTH"
        assert dict(set_aside.value.trailing_metadata()).get(RETRY_PUSHBACK_TRAILER) == "-1"
        assert [user_text(r.body) for r in fake.requests] == ["bad", "probe", "probe again"]


async def test_a_key_rejected_beside_a_rejected_keys_probe_leaves_the_retry_open(start_gateway):
    """up0 rejected the key earlier; its cool-down has passed and a probe is finding out
    whether the key was mended. A call that up1 now rejects the key of is told to retry
    once up0's probe has answered (or another may go), not "do not retry" (-1)."""
    up0 = {"bad": Status(401), "probe": Reply(delay_s=1.5)}
    up1 = {"another": Status(401)}
    async with (
        ScriptedUpstream(respond=lambda body: up0.get(user_text(body))) as first,
        ScriptedUpstream(respond=lambda body: up1.get(user_text(body))) as second,
    ):
        resilience = {**FAST_RESILIENCE, "attempts": 2, "key_rejected_cool_down_s": 0.4}
        gateway = await start_gateway(
            gateway_config(first.base_url, second.base_url, resilience=resilience)
        )
        await gateway.stub.Complete(chat("bad"))  # up0's 401, then up1's answer
        await asyncio.sleep(0.45)  # up0's key cool-down has passed: half-open
        await gateway.stub.Complete(chat("up1's turn"))  # round robin: up1
        error = await _refused_during_probe(gateway, first)
        assert [user_text(r.body) for r in first.requests] == ["bad", "probe"]
        assert [user_text(r.body) for r in second.requests] == ["bad", "up1's turn", "another"]
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(error)[1] == "UPSTREAM_AUTH"
        told_to_wait_out_the_probe(error, cool_down_s=15.0)  # breaker_cool_down_s's default


async def test_a_rejected_key_does_not_push_back_a_retry_past_the_other_upstreams_probe(
    start_gateway,
):
    """One upstream's key is rejected (set aside for its long cool-down), the other is
    half-open with its probe running: the call that finds neither usable is told to come
    back once the probe has answered (or another may go), not after the rejected key's
    cool-down (the rejected upstream is set aside)."""
    behaviours = {"fail": Status(500), "probe": Reply(delay_s=2.5)}
    async with (
        FakeUpstream(default=Status(401)) as rejected,
        ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as flaky,
    ):
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 2,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 1.0,
            "key_rejected_cool_down_s": 4.0,
        }
        gateway = await start_gateway(
            gateway_config(flaky.base_url, rejected.base_url, resilience=resilience)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("fail"))  # up0's 500, then up1's 401
        assert (len(flaky.requests), len(rejected.requests)) == (1, 1)
        await asyncio.sleep(1.05)  # up0 half-open; up1's key cool-down lasts
        error = await _refused_during_probe(gateway, flaky)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(error)[1] == "UPSTREAM_UNAVAILABLE"
        told_to_wait_out_the_probe(error, cool_down_s=1.0)
        assert len(rejected.requests) == 1


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_key_rejected_after_a_5xx_leaves_the_callers_retry_open(start_gateway, mode):
    """A 5xx on one upstream, then a 401 on the other: the call ends UPSTREAM_AUTH but
    without the "do not retry" pushback (-1), since the first upstream may serve a retry
    (pushed back by its backoff, its breaker being closed); and the retry, which skips
    the rejected key, does."""
    async with FakeUpstream(default=Status(401)) as rejected, FakeUpstream() as flaky:
        flaky.script(Status(503))
        resilience = {**FAST_RESILIENCE, "attempts": 2}
        gateway = await start_gateway(
            gateway_config(flaky.base_url, rejected.base_url, resilience=resilience)
        )
        error, _ = await call(gateway, mode, timeout_s=10)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(error)[1] == "UPSTREAM_AUTH"
        assert (len(flaky.requests), len(rejected.requests)) == (1, 1)
        assert dict(error.trailing_metadata()).get(RETRY_PUSHBACK_TRAILER) == "20"
        assert error_details(error)[2] == pytest.approx(0.02)
        metadata, _ = await call(gateway, mode, timeout_s=10)
        assert not isinstance(metadata, grpc.aio.AioRpcError)
        assert (metadata.upstream, metadata.attempts) == ("up0", 1)
        assert len(rejected.requests) == 1


async def test_all_upstreams_down_is_unavailable_and_names_no_secret(start_gateway):
    """Both upstreams failing ends UNAVAILABLE; the message carries no URL or key."""
    async with FakeUpstream(default=Status(503)) as a, FakeUpstream(default=Status(502)) as b:
        config = gateway_config(a.base_url, b.base_url, resilience=FAST_RESILIENCE)
        config = dataclass_replace_upstream(config, api_key="sk-very-secret")
        gateway = await start_gateway(config)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        metadata, _, _ = error_details(info.value)
        assert metadata["attempts"] == "3"
        assert len(a.requests) + len(b.requests) == 3
        assert len(a.requests) >= 1
        assert len(b.requests) >= 1
        text = info.value.details() + repr(info.value.trailing_metadata())
        assert "127.0.0.1" not in text
        assert "sk-" not in text


async def test_unknown_model_is_not_found(stub):
    """A model no upstream serves is NOT_FOUND without any upstream call."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(chat(model="nobody-serves-this"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_breaker_opens_after_failures_then_probe_closes_it(start_gateway):
    """Failures open the breaker (fast UNAVAILABLE); after the cool-down a probe heals it."""
    async with FakeUpstream(default=Status(500)) as fake:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 2,
            "breaker_cool_down_s": 0.5,
        }
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.stub.Complete(chat())
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_UNHEALTHY
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        _, _, retry_s = error_details(info.value)
        assert retry_s is not None
        assert 0 < retry_s <= 0.5
        assert len(fake.requests) == 2  # the open breaker kept the third call off it
        fake.default = Reply()
        await asyncio.sleep(0.6)  # the configured cool-down, not a speed assertion
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_PROBING
        response = await gateway.stub.Complete(chat())
        assert response.content == "Hello from fake"
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_HEALTHY


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_retry_after_shorter_than_the_cool_down_it_opened_is_not_what_the_caller_waits(
    start_gateway, mode
):
    """An upstream's 503 with `Retry-After: 1` opens its breaker for 10 s: the caller is
    told to come back once the breaker lets a call through, not in a second, when the
    gateway itself refuses its retry (`circuit open`).

    Before, the Retry-After won: the retry came back a second later, was refused without
    an attempt, and only then was told the cool-down."""
    async with FakeUpstream(default=Status(503, headers={"Retry-After": "1"})) as fake:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 2,
            "breaker_cool_down_s": 10.0,
        }
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        first, _ = await call(gateway, mode, timeout_s=30)
        assert error_details(first)[2] == 1.0  # the breaker is still closed: its Retry-After
        opening, _ = await call(gateway, mode, timeout_s=30)
        assert gateway.server.pipeline.pool.breaker("up0", FAKE_MODEL).state is BreakerState.OPEN
        metadata, reason, retry_s = error_details(opening)
        assert (reason, metadata["attempts"], metadata["upstream"]) == (
            "UPSTREAM_UNAVAILABLE",
            "1",
            "up0",
        )
        assert retry_s is not None
        assert 1.0 < retry_s <= 10.0
        assert int(dict(opening.trailing_metadata())[RETRY_PUSHBACK_TRAILER]) > 1000
        assert len(fake.requests) == 2


async def test_a_streamed_probe_closes_the_breaker_with_its_first_output(start_gateway):
    """A stream sent as the half-open probe closes the breaker once its first output comes:
    other calls are served while it streams on, rather than refused until its end (a
    reasoning model's can take minutes)."""
    async with FakeUpstream() as fake:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 0.3,
        }
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        fake.script(Status(503), Reply(content="one two three four", chunks=4, chunk_delay_s=0.5))
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat())
        await asyncio.sleep(0.4)  # the configured cool-down, not a speed assertion
        probe = gateway.stub.CompleteStream(chat_stream())
        first = await probe.read()
        assert first.delta.content
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_HEALTHY
        served = await gateway.stub.Complete(chat("while the probe streams"))
        assert served.content == "Hello from fake"
        last = first
        while (event := await probe.read()) is not grpc.aio.EOF:
            last = event
        assert last.final.finish_reason == pb.FINISH_REASON_STOP
        assert len(fake.requests) == 3


@pytest.mark.parametrize(
    ("headers", "retry_s", "pushback"),
    [
        ({"retry-after-ms": "50"}, 0.05, "50"),
        # A bare 429 still says when to retry (the first backoff), so a caller's retry
        # policy waits instead of hammering.
        ({}, FAST_RESILIENCE["backoff_base_s"], "20"),
    ],
    ids=["retry-after", "bare"],
)
async def test_upstream_429_after_retries_is_resource_exhausted_with_pushback(
    start_gateway, headers, retry_s, pushback
):
    """A 429 that outlasts the retries reaches the caller as RESOURCE_EXHAUSTED with
    RetryInfo and the pushback trailer: the upstream's Retry-After, else the backoff."""
    async with FakeUpstream(default=Status(429, headers=headers)) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=FAST_RESILIENCE))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        _, reason, retry_after_s = error_details(info.value)
        assert reason == "UPSTREAM_RATE_LIMITED"
        assert retry_after_s == pytest.approx(retry_s)
        assert dict(info.value.trailing_metadata())[RETRY_PUSHBACK_TRAILER] == pushback
        # Another replica would only call the same upstream again after its own retries.
        assert RETRY_ELSEWHERE_TRAILER not in dict(info.value.trailing_metadata())
        assert len(fake.requests) == 3


# A refusal whose status and headers (asking for 2 s) come at once, its body long after
# the upstream's `timeout_s` (STALLING_TIMEOUT_S) has passed.
STALLED_BODY_REFUSALS = [
    Status(code, headers={"Retry-After": "2"}, body_delay_s=2.0) for code in (429, 503)
]
STALLING_TIMEOUT_S = 0.3


# How a call reaches the upstream: a unary call, a stream, or a unary call sent as a
# stream (`stream_unary_calls`, as llama-cpp-python's server takes them).
STALLED_BODY_MODES = ["unary", "stream", "streamed-unary"]


def stalling_upstream(config: GatewayConfig, mode: str) -> UpstreamConfig:
    """`config`'s upstream with STALLING_TIMEOUT_S, taking unary calls as streams in the
    `streamed-unary` mode."""
    return dataclasses.replace(
        config.upstreams[0],
        timeout_s=STALLING_TIMEOUT_S,
        stream_unary_calls=mode == "streamed-unary",
    )


@pytest.mark.parametrize("mode", STALLED_BODY_MODES)
@pytest.mark.parametrize("refusal", STALLED_BODY_REFUSALS, ids=["429", "503"])
async def test_a_refusal_whose_body_stalls_keeps_what_its_status_and_headers_said(
    start_gateway, refusal: Status, mode: str
):
    """A 429 (or 503) with Retry-After whose body stalls past the upstream's `timeout_s`
    reaches the caller as its status does, with RetryInfo from the Retry-After. Before,
    it was a timeout, UNAVAILABLE with the first backoff for RetryInfo (a unary call sent
    as a stream until later: its own timer fired a moment before the stream's)."""
    async with FakeUpstream(default=refusal) as fake:
        data = gateway_config(fake.base_url, resilience={**FAST_RESILIENCE, "attempts": 1})
        config = dataclasses.replace(data, upstreams=[stalling_upstream(data, mode)])
        gateway = await start_gateway(config)
        error, _ = await call(gateway, mode.removeprefix("streamed-"), timeout_s=10)
    assert isinstance(error, grpc.aio.AioRpcError)
    metadata, reason, retry_after_s = error_details(error)
    if refusal.code == 429:
        assert (error.code(), reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
        )
    else:
        assert (error.code(), reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert metadata["http_status"] == str(refusal.code)
    assert retry_after_s == pytest.approx(2.0)


@pytest.mark.parametrize("mode", STALLED_BODY_MODES)
@pytest.mark.parametrize("refusal", STALLED_BODY_REFUSALS, ids=["429", "503"])
async def test_the_retry_of_a_refusal_whose_body_stalls_waits_its_retry_after(
    refusal: Status, mode: str
):
    """The pool's own retry after such a refusal waits the 2 s its Retry-After asked for,
    not the first backoff. (A fake clock keeps the pool's time; the HTTP is real.)"""
    clock = FakeClock()
    async with FakeUpstream() as fake:
        fake.script(refusal, Reply())
        config = gateway_config(fake.base_url, resilience=FAST_RESILIENCE)
        async with UpstreamClient(stalling_upstream(config, mode)) as client:
            pool = UpstreamPool([client], settings=config.resilience, clock=clock)
            log = AttemptLog()
            request = ChatRequest(FAKE_MODEL, (Message(Role.USER, "Say hi"),))
            deadline = Deadline.after(None, clock)
            if mode != "stream":
                await pool.complete(request, prompt_tokens=8, deadline=deadline, log=log)
            else:
                events = pool.stream(request, prompt_tokens=8, deadline=deadline, log=log)
                async with contextlib.aclosing(events):
                    async for _ in events:
                        pass
    assert log.attempts == 2
    assert clock.slept == [pytest.approx(2.0)]


async def test_a_retry_after_past_the_cap_is_passed_on_capped(start_gateway):
    """An upstream asking for an hour (or a misread milliseconds value): the gateway
    pauses it `max_retry_after_s` and tells the caller the same, not the hour."""
    async with FakeUpstream(default=Status(429, headers={"Retry-After": "3600"})) as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
    _, reason, retry_after_s = error_details(info.value)
    assert reason == "UPSTREAM_RATE_LIMITED"
    assert retry_after_s == pytest.approx(FAST_RESILIENCE["max_retry_after_s"])
    assert dict(info.value.trailing_metadata())[RETRY_PUSHBACK_TRAILER] == "5000"


async def test_a_retry_after_sent_twice_with_a_date_is_the_longer_wait(start_gateway):
    """A 429 whose Retry-After arrives twice, a proxy's 1 s and the provider's HTTP date
    some seconds on (joined: `1, Wed, 02 Dec ...`): the caller is told the date's wait,
    the longer. Before, split at every comma, the joined value read as no Retry-After at
    all, and the caller was told the first backoff (0.02 s), into the rate limit."""
    later = email.utils.formatdate(time.time() + 4, usegmt=True)
    limited = Status(429, headers={"Retry-After": f"1, {later}"})
    async with FakeUpstream(default=limited) as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
    _, reason, retry_after_s = error_details(info.value)
    assert reason == "UPSTREAM_RATE_LIMITED"
    assert retry_after_s is not None
    assert 2.0 < retry_after_s <= 4.0  # whole seconds in a date: 3 to 4 s from its writing


async def test_a_429_without_retry_after_waits_for_its_exhausted_windows_reset(start_gateway):
    """A 429 with no Retry-After but OpenAI's rate-limit headers saying the requests window
    is empty for 2 s: the caller is told 2 s, and the upstream is left alone until then
    (the next call is refused by the gateway's own pause, not sent to be refused again)."""
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
    }
    async with FakeUpstream(default=Status(429, headers=headers)) as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "max_limit_wait_s": 0.1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        with pytest.raises(grpc.aio.AioRpcError) as paused:
            await gateway.stub.Complete(chat())
    _, reason, retry_after_s = error_details(refused.value)
    assert (reason, retry_after_s) == ("UPSTREAM_RATE_LIMITED", pytest.approx(2.0))
    assert paused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(paused.value)[1] == "UPSTREAM_LIMIT"
    assert len(fake.requests) == 1


async def test_a_keep_alive_connection_dropped_as_it_is_reused_is_sent_on_a_new_one(
    start_gateway,
):
    """A server that closes an idle connection just as a request reuses it never answered
    it: the request goes again on a new connection, within the same attempt, and the
    breaker counts no failure (one attempt allowed, and one failure would open it)."""
    async with FakeUpstream() as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "breaker_consecutive_failures": 1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        await gateway.stub.Complete(chat("one"))  # leaves its connection idle in the pool
        fake.script(Reset())  # what the reused connection gets: closed, no answer
        response = await gateway.stub.Complete(chat("two"))
        assert response.content == "Hello from fake"
        assert response.metadata.attempts == 1
        assert len(fake.requests) == 3
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_HEALTHY
        assert await settle(lambda: checked_out_connections(gateway) == 0)
        assert gateway.server.pipeline.pool.clients[0].open_connections == 1


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_request_held_then_dropped_on_a_reused_connection_is_not_sent_again(
    mode, start_gateway
):
    """A reused connection the server closes unanswered long after the request went out
    crossed no idle timeout: the server had the request, and may have worked on it. It
    fails its attempt as a reset does, seen by the breaker, and is not sent again unseen
    (one attempt allowed: the upstream gets it once, and not twice while it was failing)."""
    async with FakeUpstream() as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "breaker_consecutive_failures": 1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        await gateway.stub.Complete(chat("one"))  # leaves its connection idle in the pool
        fake.script(Reset(delay_s=2.0))  # held, then dropped with no answer
        result, _ = await call(gateway, mode, timeout_s=10.0)
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(result)[0]["attempts"] == "1"
        assert len(fake.requests) == 2
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_UNHEALTHY


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_an_answer_larger_than_any_completion_is_refused_not_buffered(mode, start_gateway):
    """A 17 MiB answer (or one stream event that size) is a malformed answer: the gateway
    stops reading at 16 MiB, closes the connection and says UNAVAILABLE, rather than hold
    whatever a broken upstream sends and pass it on."""
    huge = Reply(content="x" * (17 * 1024 * 1024), chunks=1)
    async with FakeUpstream(default=huge) as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        result, deltas = await call(gateway, mode, timeout_s=10.0)
        assert isinstance(result, grpc.aio.AioRpcError), type(result)
        assert result.code() is grpc.StatusCode.UNAVAILABLE, result.details()
        assert error_details(result)[1] == "UPSTREAM_UNAVAILABLE"
        assert "larger than" in result.details()
        assert deltas == []
        assert await settle(lambda: gateway.server.pipeline.pool.clients[0].open_connections == 0)


async def test_no_backoff_sleeps_past_the_deadline(start_gateway):
    """A Retry-After longer than the caller's deadline is reported at once, not slept on."""
    async with FakeUpstream(default=Status(503, headers={"Retry-After": "40"})) as fake:
        resilience = {**FAST_RESILIENCE, "max_retry_after_s": 60.0}  # one it would wait
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat(), timeout=20.0)
        elapsed = time.monotonic() - started
        # Slept on, the call would end DEADLINE_EXCEEDED, or UNAVAILABLE at its 20 s end.
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert elapsed < 10.0
        assert len(fake.requests) == 1


# Retries at most half the requests, with no floor, and a breaker that never opens.
HALF_RETRY_BUDGET = {
    **FAST_RESILIENCE,
    "retry_budget_ratio": 0.5,
    "retry_budget_min_retries": 0,
    "breaker_consecutive_failures": 1000,
    "breaker_min_calls": 1000,
}


async def test_retry_budget_limits_amplification(start_gateway):
    """With no floor and ratio 0.5, a failing upstream sees at most 1.5x the calls."""
    async with FakeUpstream(default=Status(500)) as fake:
        resilience = HALF_RETRY_BUDGET
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        calls = 10
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.stub.Complete(chat())
        assert calls < len(fake.requests) <= calls * 1.5


async def test_a_route_skipped_by_our_own_limit_does_not_make_the_next_attempt_a_retry(
    start_gateway,
):
    """The first attempt sent after a rate-limited route is a request, not a retry.

    The budget allows one retry (no ratio): were the attempts sent after up0 was skipped
    counted as retries, the retry the third call needs would be refused.
    """
    async with FakeUpstream() as limited, FakeUpstream() as spare:
        resilience = {
            **FAST_RESILIENCE,
            "retry_budget_ratio": 0.0,
            "retry_budget_min_retries": 1,
            "retry_budget_window_s": 60.0,
        }
        config = gateway_config(limited.base_url, spare.base_url, resilience=resilience)
        upstreams = (
            dataclasses.replace(config.upstreams[0], weight=100, requests_per_minute=1),
            dataclasses.replace(config.upstreams[1], weight=1),
        )
        gateway = await start_gateway(dataclasses.replace(config, upstreams=upstreams))
        first = await gateway.stub.Complete(chat())
        second = await gateway.stub.Complete(chat())  # up0 is out of requests this minute
        spare.script(Status(503), Reply())
        third = await gateway.stub.Complete(chat())
        served = [r.metadata.upstream for r in (first, second, third)]
        assert served == ["up0", "up1", "up1"]
        assert third.metadata.attempts == 2
        assert (len(limited.requests), len(spare.requests)) == (1, 3)


async def test_a_failover_is_a_first_attempt_on_the_upstream_it_moves_to(start_gateway):
    """When one upstream fails every call, the calls it fails over are the other's own
    first attempts: they are not held to the other's retry budget.

    The budget allows no retry at all (no floor, no ratio), and the breaker never opens,
    so every call tries up0 first; counted as retries, up1's failovers would be refused
    and every call would fail while up1 is healthy.
    """
    async with FakeUpstream(default=Status(503)) as failing, FakeUpstream() as healthy:
        resilience = {
            **FAST_RESILIENCE,
            "retry_budget_ratio": 0.0,
            "retry_budget_min_retries": 0,
            "breaker_consecutive_failures": 1000,
            "breaker_min_calls": 1000,
        }
        config = gateway_config(failing.base_url, healthy.base_url, resilience=resilience)
        upstreams = (
            dataclasses.replace(config.upstreams[0], weight=100),
            dataclasses.replace(config.upstreams[1], weight=1),
        )
        gateway = await start_gateway(dataclasses.replace(config, upstreams=upstreams))
        answers = [await gateway.stub.Complete(chat()) for _ in range(5)]
        assert [a.metadata.upstream for a in answers] == ["up1"] * 5
        assert [a.metadata.attempts for a in answers] == [2] * 5
        assert (len(failing.requests), len(healthy.requests)) == (5, 5)
        # A retry on up0 itself is still held to its (empty) budget: a call that fails
        # over and fails on up1 too does not go back to up0.
        healthy.script(Status(503))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat())
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert (len(failing.requests), len(healthy.requests)) == (6, 6)


async def test_a_failing_attempt_subscriber_is_logged_and_the_others_are_still_told(
    upstream, start_gateway, caplog
):
    """A pool subscriber that raises never fails the call: it is logged, and the
    subscribers after it (the pool's own counters among them) get the record all the same."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    pool = gateway.server.pipeline.pool

    def broken(record: AttemptRecord) -> None:
        raise RuntimeError("a broken exporter")

    seen: list[AttemptRecord] = []
    pool.hooks.on_attempt[:0] = [broken]
    pool.hooks.on_attempt.append(seen.append)
    caplog.set_level(logging.ERROR, logger="llm_gateway.pool")
    response = await gateway.stub.Complete(chat())
    assert response.content
    assert [(r.upstream, r.error) for r in seen] == [("up0", None)]
    assert pool.counters.attempts == 1
    failures = [r for r in caplog.records if r.name == "llm_gateway.pool"]
    assert [(r.getMessage(), r.exc_info is not None) for r in failures] == [
        ("pool.hook_failed", True)
    ]


async def test_a_return_to_an_upstream_the_call_tried_waits_its_backoff(start_gateway):
    """Two upstreams both failing: the second attempt fails over at once, the third goes
    back to the first, a retry of it, and waits its backoff as any retry on one does."""
    async with FakeUpstream() as first, FakeUpstream() as second:
        resilience = {**FAST_RESILIENCE, "backoff_base_s": 0.05, "backoff_cap_s": 0.05}
        config = gateway_config(first.base_url, second.base_url, resilience=resilience)
        gateway = await start_gateway(config)
        decisions: list[RetryDecision] = []
        gateway.server.pipeline.pool.hooks.on_retry.append(decisions.append)
        first.script(Status(503), Status(503))
        second.script(Status(503))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    routes = [(d.failed_upstream, d.upstream) for d in decisions]
    assert routes == [("up0", "up1"), ("up1", "up0")]
    assert decisions[0].wait_s == 0.0
    assert decisions[1].wait_s > 0.0
    assert (len(first.requests), len(second.requests)) == (2, 1)


async def test_the_largest_rates_the_config_takes_let_calls_through(upstream, start_gateway):
    """Upstream and tenant rates at the largest integer the config takes (64 bits) pass
    calls, unary and streamed; a larger one is a config error (`test_config_parsing`).

    Before, a rate of 10**400 was a valid config on which every call failed INTERNAL: its
    bucket's refill overflowed a float."""
    largest = 2**63 - 1
    rates = {"requests_per_minute": largest, "tokens_per_minute": largest}
    config = gateway_config(upstream.base_url, tenants={"*": rates})
    gateway = await start_gateway(dataclass_replace_upstream(config, **rates))
    assert (await gateway.stub.Complete(chat())).content == "Hello from fake"
    text = "".join([e.delta.content async for e in gateway.stub.CompleteStream(chat_stream())])
    assert text == "Hello from fake"


async def test_concurrency_limit_queues_on_the_upstream(start_gateway):
    """With max_concurrency 1 concurrent calls reach the upstream one at a time."""
    async with FakeUpstream(default=Reply(delay_s=0.1)) as fake:
        config = gateway_config(fake.base_url, resilience=FAST_RESILIENCE)
        config = dataclass_replace_upstream(config, max_concurrency=1)
        gateway = await start_gateway(config)
        results = await asyncio.gather(*(gateway.stub.Complete(chat()) for _ in range(4)))
        assert all(r.content == "Hello from fake" for r in results)
        starts = sorted(r.received_at for r in fake.requests)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 0.09  # each waited for the previous to finish


def dataclass_replace_upstream(config: Any, **changes: Any) -> Any:
    """`config` with every upstream's fields replaced."""
    return dataclasses.replace(
        config, upstreams=tuple(dataclasses.replace(u, **changes) for u in config.upstreams)
    )


async def test_admission_sheds_immediately_past_in_flight_and_queue(start_gateway):
    """Past in-flight + queued calls the server answers RESOURCE_EXHAUSTED at once."""
    # Answers slowly enough that a loaded machine still refuses the fourth call while the
    # three accepted are all pending: a count, not a clock, says "at once".
    async with FakeUpstream(default=Reply(delay_s=2.0)) as fake:
        config = gateway_config(
            fake.base_url,
            server={"max_in_flight_calls": 2, "max_queued_calls": 1},
            resilience=FAST_RESILIENCE,
        )
        gateway = await start_gateway(config)
        accepted = [asyncio.ensure_future(gateway.stub.Complete(chat())) for _ in range(3)]
        assert await settle(lambda: gateway.server.admission.queued == 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat())
        assert not any(call.done() for call in accepted)  # before any accepted call ended
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        _, reason, retry_s = error_details(info.value)
        assert reason == "OVERLOADED"
        assert retry_s == pytest.approx(1.0)
        assert dict(info.value.trailing_metadata())[RETRY_PUSHBACK_TRAILER] == "1000"
        # This replica is full, not the service: a proxy may try the call on another.
        assert dict(info.value.trailing_metadata())[RETRY_ELSEWHERE_TRAILER] == "true"
        results = await asyncio.gather(*accepted)
        assert [r.content for r in results] == ["Hello from fake"] * 3


async def test_a_burst_past_admission_is_shed_overloaded_never_cancelled(start_gateway):
    """3,000 calls opened at once against one slot outran the handlers: grpc core's pending
    limit (1000) cancelled over a thousand of them (a bare CANCELLED, no RetryInfo, no
    trailer a proxy retries on) before admission could shed them with OVERLOADED."""
    async with ScriptedUpstream() as fake:
        config = gateway_config(fake.base_url, server={"max_in_flight_calls": 1})
        gateway = await start_gateway(config)
        fake.gate.clear()  # the admitted call holds the slot until the burst is answered
        admitted = asyncio.ensure_future(gateway.stub.Complete(chat()))
        await fake.wait_until(lambda: fake.in_flight == 1)
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
        address = gateway.server.address
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(2)]
        stubs = [pb_grpc.CompletionServiceStub(channel) for channel in channels]
        try:
            outcomes = await asyncio.gather(
                *(stubs[i % len(stubs)].Complete(chat()) for i in range(3000)),
                return_exceptions=True,
            )
        finally:
            for channel in channels:
                await channel.close()
        codes = [o.code() if isinstance(o, grpc.aio.AioRpcError) else o for o in outcomes]
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert {error_details(o)[1] for o in outcomes} == {"OVERLOADED"}
        fake.gate.set()
        assert (await admitted).content == "Hello from fake"


async def test_graceful_shutdown_finishes_running_calls_and_refuses_queued_ones(start_gateway):
    """Stopping under load lets every running call finish in the grace; the calls queued
    for a slot, not started, are refused at once with SHUTTING_DOWN and the
    retry-elsewhere trailer, for another replica to take."""
    async with FakeUpstream(default=Reply(delay_s=0.3)) as fake:
        config = gateway_config(
            fake.base_url,
            server={"max_in_flight_calls": 3, "max_queued_calls": 3},
            resilience=FAST_RESILIENCE,
        )
        gateway = await start_gateway(config)
        calls = [asyncio.ensure_future(gateway.stub.Complete(chat())) for _ in range(6)]
        admission = gateway.server.admission
        assert await settle(lambda: len(fake.requests) == 3 and admission.queued == 3)
        await gateway.server.stop(grace_s=5.0)
        results = await asyncio.gather(*calls, return_exceptions=True)
        answered = [r.content for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert answered == ["Hello from fake"] * 3
        assert [error_details(r)[1] for r in refused] == ["SHUTTING_DOWN"] * 3
        assert all(dict(r.trailing_metadata())[RETRY_ELSEWHERE_TRAILER] == "true" for r in refused)
        assert len(fake.requests) == 3


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_call_queued_for_admission_counts_its_wait_in_its_timings(start_gateway, is_stream):
    """A call that waited in line for admission (`server.max_queued_calls`) reported only
    the time after it: `total_ms` a fraction of what its caller waited (the CLI printed
    `total=1003ms` for a call of 1.8 s), and a stream's first token as early. The wait in
    line is its `queued_ms`, apart from `upstream_ms`."""
    delay_s = 0.4
    async with FakeUpstream(default=Reply(delay_s=delay_s)) as fake:
        config = gateway_config(
            fake.base_url,
            server={"max_in_flight_calls": 1, "max_queued_calls": 1},
            resilience=FAST_RESILIENCE,
        )
        gateway = await start_gateway(config)
        first = asyncio.ensure_future(gateway.stub.Complete(chat()))
        assert await settle(lambda: len(fake.requests) == 1)
        if is_stream:
            events = [e async for e in gateway.stub.CompleteStream(chat_stream())]
            timings = events[-1].final.timings
            # Its own upstream's delay, and most of the first call's before it.
            assert timings.time_to_first_token_ms >= delay_s * 1500
        else:
            timings = (await gateway.stub.Complete(chat())).metadata.timings
        await first
        # It waited in line for most of the first call's upstream wait, then its own.
        assert timings.upstream_ms >= delay_s * 1000
        assert timings.total_ms >= timings.upstream_ms + delay_s * 500
        assert timings.queued_ms > 0
        assert timings.total_ms >= timings.upstream_ms + timings.queued_ms


async def _weighted_3_to_1(
    start_gateway: Any, heavy: FakeUpstream, light: FakeUpstream
) -> RunningGateway:
    """A gateway serving the model from `heavy` (up0, weight 3) and `light` (up1, 1)."""
    config = gateway_config(heavy.base_url, light.base_url, resilience=FAST_RESILIENCE)
    weighted = (
        dataclasses.replace(config.upstreams[0], weight=3),
        dataclasses.replace(config.upstreams[1], weight=1),
    )
    return await start_gateway(dataclasses.replace(config, upstreams=weighted))


async def test_weighted_pick_spreads_calls_by_weight(start_gateway):
    """Weights 3:1 send three calls to the first upstream for each one to the second."""
    async with FakeUpstream() as heavy, FakeUpstream() as light:
        gateway = await _weighted_3_to_1(start_gateway, heavy, light)
        served = [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(8)]
        assert served.count("up0") == 6
        assert served.count("up1") == 2
        assert (len(heavy.requests), len(light.requests)) == (6, 2)


async def test_calls_start_on_the_idle_upstream_while_the_other_is_paused_by_a_429(
    start_gateway,
):
    """After up0's 429 asks for a pause, the calls its turn would send there start on idle
    up1 at once instead of waiting out the pause; once it is over, the two take turns again.

    Before, every other call was planned on up0 and waited its Retry-After in its limiter.
    """
    async with FakeUpstream() as paused, FakeUpstream() as idle:
        paused.script(Status(429, headers={"Retry-After": "1"}))
        config = gateway_config(paused.base_url, idle.base_url, resilience=FAST_RESILIENCE)
        gateway = await start_gateway(config)
        first = await gateway.stub.Complete(chat())
        assert (first.metadata.upstream, first.metadata.attempts) == ("up1", 2)
        during = [(await gateway.stub.Complete(chat())).metadata for _ in range(4)]
        assert [(m.upstream, m.timings.queued_ms) for m in during] == [("up1", 0.0)] * 4
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        assert await settle(lambda: limiter.starts_now(1))  # the pause is over
        after = [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(4)]
        # up0 kept its turn while it was left out: the round-robin goes on where it was.
        assert after == ["up1", "up0", "up1", "up0"]
        assert (len(paused.requests), len(idle.requests)) == (3, 7)


async def test_an_upstream_at_max_concurrency_is_skipped_for_one_with_a_free_slot(start_gateway):
    """With up0's one slot held, the calls its turn would queue there start on up1 at once.

    Before, every other call waited in up0's line for the held call to end (here, for
    `max_limit_wait_s`, then failed over).
    """
    async with ScriptedUpstream() as full, FakeUpstream() as free:
        resilience = {**FAST_RESILIENCE, "max_limit_wait_s": 1.0}
        config = gateway_config(full.base_url, free.base_url, resilience=resilience)
        one_slot = dataclasses.replace(config.upstreams[0], max_concurrency=1)
        upstreams = (one_slot, config.upstreams[1])
        gateway = await start_gateway(dataclasses.replace(config, upstreams=upstreams))
        full.gate.clear()
        held = asyncio.ensure_future(gateway.stub.Complete(chat("held")))
        await full.wait_until(lambda: full.in_flight == 1)
        answers = [(await gateway.stub.Complete(chat())).metadata for _ in range(3)]
        assert [(m.upstream, m.timings.queued_ms, m.attempts) for m in answers] == [
            ("up1", 0.0, 1)
        ] * 3
        full.gate.set()
        assert (await held).metadata.upstream == "up0"
        assert (len(full.requests), len(free.requests)) == (1, 3)


async def test_weights_hold_over_many_calls_and_after_an_upstream_is_left_out_a_while(
    start_gateway,
):
    """Weights 3:1 give exactly 3:1 over many calls, and again once up0, paused a while
    (`X-RateLimit-Remaining: 0`), is back: no burst to up0 to make up for the calls it
    missed, nor a share lost."""
    exhausted = {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}
    async with FakeUpstream() as heavy, FakeUpstream() as light:
        gateway = await _weighted_3_to_1(start_gateway, heavy, light)

        async def served(calls: int) -> list[str]:
            return [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(calls)]

        before = await served(40)
        assert (before.count("up0"), before.count("up1")) == (30, 10)
        heavy.script(Reply(headers=exhausted))
        assert await served(1) == ["up0"]  # its answer pauses up0 for a second
        assert await served(5) == ["up1"] * 5
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        assert await settle(lambda: limiter.starts_now(1))
        after = await served(40)
        assert (after.count("up0"), after.count("up1")) == (30, 10)
        assert "up0" * 4 not in "".join(after)  # never more than three in a row


async def test_every_upstream_at_its_limit_is_refused_with_the_shortest_wait(start_gateway):
    """Both upstreams paused (`X-RateLimit-Remaining: 0`, up0 for 30 s, up1 for 2 s) past
    `max_limit_wait_s`: the call is refused at once, and its RetryInfo is up1's wait, the
    soonest either can take it. Before, it was the wait of the upstream the round-robin
    picked (up0's 30 s)."""

    def exhausted(reset: str) -> Reply:
        return Reply(headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})

    async with FakeUpstream() as slow, FakeUpstream() as soon:
        slow.script(exhausted("30"))
        soon.script(exhausted("2"))
        resilience = {**FAST_RESILIENCE, "max_limit_wait_s": 0.2}
        config = gateway_config(slow.base_url, soon.base_url, resilience=resilience)
        gateway = await start_gateway(config)
        served = [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(2)]
        assert served == ["up0", "up1"]  # each answer pauses its upstream
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat())
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        _, reason, retry_after_s = error_details(caught.value)
        assert reason == "UPSTREAM_LIMIT"
        assert retry_after_s is not None
        assert 0 < retry_after_s <= 2.0
        assert (len(slow.requests), len(soon.requests)) == (1, 1)


@pytest.mark.parametrize(
    ("limit", "is_elsewhere"),
    [("max_concurrency", True), ("requests_per_minute", True), ("paused by a 429", False)],
)
async def test_a_refusal_at_this_replicas_own_upstream_limit_says_retry_elsewhere(
    start_gateway, limit, is_elsewhere
):
    """UPSTREAM_LIMIT carries `llm-gateway-retry-elsewhere: true` when the limit is this
    replica's own, which another replica holds apart: its slots (`max_concurrency`) or its
    in-memory per-minute bucket. A pause the upstream's 429 asked for would be the same
    there (the upstream refuses every replica), so it does not. Before, none said so, and
    a proxy left a call refused for one replica's full slots to the caller."""
    async with ScriptedUpstream() as fake:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "max_limit_wait_s": 0}
        config = gateway_config(fake.base_url, resilience=resilience)
        held = None
        if limit == "max_concurrency":
            gateway = await start_gateway(dataclass_replace_upstream(config, max_concurrency=1))
            fake.gate.clear()
            held = asyncio.ensure_future(gateway.stub.Complete(chat("held")))
            await fake.wait_until(lambda: fake.in_flight == 1)
        elif limit == "requests_per_minute":
            gateway = await start_gateway(dataclass_replace_upstream(config, requests_per_minute=1))
            await gateway.stub.Complete(chat("first"))
        else:
            gateway = await start_gateway(config)
            fake.script(Status(429, headers={"Retry-After": "30"}))
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.stub.Complete(chat("first"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat("refused"))
        fake.gate.set()
        if held is not None:
            await held
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)[1] == "UPSTREAM_LIMIT"
    trailers = dict(caught.value.trailing_metadata())
    assert (RETRY_ELSEWHERE_TRAILER in trailers) is is_elsewhere
    if is_elsewhere:
        assert trailers[RETRY_ELSEWHERE_TRAILER] == "true"
    assert len(fake.requests) == 1


async def test_a_refusal_with_one_upstream_full_here_and_another_paused_says_retry_elsewhere(
    start_gateway,
):
    """up0 is at this replica's one slot, up1 paused by its 429: another replica may have
    a slot of up0 for the call, so the refusal says retry elsewhere (whichever of the two
    waits, the shorter, it reports)."""
    async with ScriptedUpstream() as full, FakeUpstream() as paused:
        resilience = {**FAST_RESILIENCE, "attempts": 1, "max_limit_wait_s": 0}
        config = gateway_config(full.base_url, paused.base_url, resilience=resilience)
        one_slot = dataclasses.replace(config.upstreams[0], max_concurrency=1)
        gateway = await start_gateway(
            dataclasses.replace(config, upstreams=(one_slot, config.upstreams[1]))
        )
        paused.script(Status(429, headers={"Retry-After": "30"}))
        full.gate.clear()
        held = asyncio.ensure_future(gateway.stub.Complete(chat("held")))
        await full.wait_until(lambda: full.in_flight == 1)
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("paused"))  # up1's 429 pauses it
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(chat("refused"))
        full.gate.set()
        await held
    assert error_details(caught.value)[1] == "UPSTREAM_LIMIT"
    assert dict(caught.value.trailing_metadata())[RETRY_ELSEWHERE_TRAILER] == "true"
    assert (len(full.requests), len(paused.requests)) == (1, 1)


async def test_a_call_refused_by_every_limit_is_told_the_shortest_wait_not_the_first(
    start_gateway,
):
    """A call waits in line for up0's one slot (up1 is paused 2 s); the call holding the
    slot gets a 429 that pauses up0, so the waiting call is refused there, then by up1: its
    RetryInfo is up1's wait, the shorter, not up0's pause, which came first. (Weights 2:1
    put the round-robin's turn on up0 as well, so it failed before the change too.)"""
    exhausted = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}
    async with ScriptedUpstream() as full, FakeUpstream() as paused:
        resilience = {**FAST_RESILIENCE, "max_limit_wait_s": 1.0}
        config = gateway_config(full.base_url, paused.base_url, resilience=resilience)
        one_slot = dataclasses.replace(config.upstreams[0], max_concurrency=1, weight=2)
        gateway = await start_gateway(
            dataclasses.replace(config, upstreams=(one_slot, *config.upstreams[1:]))
        )
        paused.script(Reply(headers=exhausted))
        served = [(await gateway.stub.Complete(chat())).metadata.upstream for _ in range(2)]
        assert served == ["up0", "up1"]  # up1's answer pauses it
        full.gate.clear()
        full.script(Status(429, headers={"Retry-After": "30"}))
        # A deadline short of the retry's wait: it gives up rather than wait for up0 again.
        held = asyncio.ensure_future(gateway.stub.Complete(chat("held"), timeout=3))
        await full.wait_until(lambda: full.in_flight == 1)
        waiting = asyncio.ensure_future(gateway.stub.Complete(chat("waiting")))
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        assert await settle(lambda: limiter.queued == 1)
        full.gate.set()
        outcomes = await asyncio.gather(held, waiting, return_exceptions=True)
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
        _, reason, retry_after_s = error_details(outcomes[1])
        assert reason == "UPSTREAM_LIMIT"
        assert retry_after_s is not None
        assert 0 < retry_after_s <= 2.0
        assert (len(full.requests), len(paused.requests)) == (2, 1)


# A model only up1 serves: a call to it loads up1 (its tokens, its one slot) without
# moving the round-robin of the model the failover tests call.
SIDE_MODEL = "side-model"
# Tokens up1 allows a minute in the failover tests; the load call spends all of them, so
# a call there waits about a second for its tokens.
BUSY_TOKENS_PER_MINUTE = 2400


async def _with_a_busy_second_upstream(
    start_gateway: Any, *upstreams: FakeUpstream, **limits: Any
) -> RunningGateway:
    """A gateway serving the model from `upstreams` (up0, up1, ...), up1 with `limits` and
    serving `SIDE_MODEL` too."""
    config = gateway_config(*(u.base_url for u in upstreams), resilience=FAST_RESILIENCE)
    second = config.upstreams[1]
    busy = dataclasses.replace(second, models={**second.models, SIDE_MODEL: SIDE_MODEL}, **limits)
    routes = (config.upstreams[0], busy, *config.upstreams[2:])
    return await start_gateway(dataclasses.replace(config, upstreams=routes))


async def _spend_the_busy_upstreams_tokens(gateway: RunningGateway) -> None:
    """One call on `SIDE_MODEL` takes every token of up1's minute."""
    params = pb.GenerationParams(max_tokens=BUSY_TOKENS_PER_MINUTE)
    await gateway.stub.Complete(chat(model=SIDE_MODEL, params=params))
    assert not gateway.server.pipeline.pool.state("up1").limiter.starts_now(1)


async def _served(gateway: RunningGateway, *, is_stream: bool) -> pb.CompletionMetadata:
    """The metadata of one call of the model, unary or streamed."""
    params = pb.GenerationParams(max_tokens=20)
    if is_stream:
        events = [e async for e in gateway.stub.CompleteStream(chat_stream(params=params))]
        return events[-1].final
    return (await gateway.stub.Complete(chat(params=params))).metadata


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_failover_skips_an_upstream_waiting_for_its_tokens_for_an_idle_one(
    start_gateway, is_stream
):
    """up0 fails with a 500; up1, next in line, is out of tokens for about a second; up2
    is idle: the call fails over to up2 at once, and up1 sees nothing of it.

    Before, failover took the next upstream in line: the call waited in up1's limiter for
    its tokens (`queued_ms` about 1000) and was answered there while up2 sat idle.
    """
    async with FakeUpstream() as failing, FakeUpstream() as busy, FakeUpstream() as idle:
        gateway = await _with_a_busy_second_upstream(
            start_gateway, failing, busy, idle, tokens_per_minute=BUSY_TOKENS_PER_MINUTE
        )
        decisions: list[RetryDecision] = []
        gateway.server.pipeline.pool.hooks.on_retry.append(decisions.append)
        await _spend_the_busy_upstreams_tokens(gateway)
        failing.script(Status(500))
        metadata = await _served(gateway, is_stream=is_stream)
    assert (metadata.upstream, metadata.attempts, metadata.timings.queued_ms) == ("up2", 2, 0.0)
    assert [(d.failed_upstream, d.upstream, d.wait_s) for d in decisions] == [("up0", "up2", 0.0)]
    assert gateway.server.pipeline.pool.counters.failovers == 1
    assert (len(failing.requests), len(busy.requests), len(idle.requests)) == (1, 1, 1)


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_failover_skips_an_upstream_at_max_concurrency_for_an_idle_one(
    start_gateway, is_stream
):
    """up0 fails with a 500; up1, next in line, has its one slot held by a hanging call;
    up2 is idle: the call fails over to up2 at once, and up1 sees nothing of it.

    Before, the call queued in up1's line for `max_limit_wait_s` (5 s), was refused there,
    and only then went on to up2.
    """
    async with FakeUpstream() as failing, ScriptedUpstream() as busy, FakeUpstream() as idle:
        gateway = await _with_a_busy_second_upstream(
            start_gateway, failing, busy, idle, max_concurrency=1
        )
        busy.gate.clear()
        held = asyncio.ensure_future(gateway.stub.Complete(chat("held", model=SIDE_MODEL)))
        await busy.wait_until(lambda: busy.in_flight == 1)
        failing.script(Status(500))
        metadata = await _served(gateway, is_stream=is_stream)
        served = (metadata.upstream, metadata.attempts, metadata.timings.queued_ms)
        assert served == ("up2", 2, 0.0)
        assert (len(failing.requests), len(busy.requests), len(idle.requests)) == (1, 1, 1)
        busy.gate.set()
        assert (await held).metadata.upstream == "up1"
    assert gateway.server.pipeline.pool.counters.failovers == 1


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_failover_to_the_only_untried_upstream_waits_there_when_it_is_busy(
    start_gateway, is_stream
):
    """up0 fails with a 500; up1, the only upstream the call has not tried, is out of
    tokens for about a second: the call fails over there all the same and waits its turn
    (a wait in up1's limiter, `queued_ms`), rather than retry up0."""
    async with FakeUpstream() as failing, FakeUpstream() as busy:
        gateway = await _with_a_busy_second_upstream(
            start_gateway, failing, busy, tokens_per_minute=BUSY_TOKENS_PER_MINUTE
        )
        await _spend_the_busy_upstreams_tokens(gateway)
        failing.script(Status(500))
        metadata = await _served(gateway, is_stream=is_stream)
    assert (metadata.upstream, metadata.attempts) == ("up1", 2)
    assert metadata.timings.queued_ms > 0
    assert (len(failing.requests), len(busy.requests)) == (1, 2)


async def test_failover_with_every_untried_upstream_waiting_goes_where_the_wait_is_least():
    """up0 fails with a 500 while up1 is paused 3 s and up2 1 s: the call fails over to
    up2, the shorter wait, not to up1, next in line (before, it waited out up1's 3 s)."""
    clock = FakeClock()
    async with contextlib.AsyncExitStack() as stack:
        fakes = [await stack.enter_async_context(FakeUpstream()) for _ in range(3)]
        fakes[0].script(Status(500))
        config = gateway_config(*(f.base_url for f in fakes), resilience=FAST_RESILIENCE)
        clients = [
            await stack.enter_async_context(UpstreamClient(upstream))
            for upstream in config.upstreams
        ]
        pool = UpstreamPool(clients, settings=config.resilience, clock=clock)
        pool.state("up1").limiter.pause(3.0)
        pool.state("up2").limiter.pause(1.0)
        log = AttemptLog()
        request = ChatRequest(FAKE_MODEL, (Message(Role.USER, "Say hi"),))
        await pool.complete(request, prompt_tokens=8, deadline=Deadline.after(None, clock), log=log)
    assert [(r.upstream, r.error is None) for r in log.records] == [("up0", False), ("up2", True)]
    assert clock.slept == [pytest.approx(1.0)]
    assert [len(f.requests) for f in fakes] == [1, 0, 1]


async def test_limiter_slows_down_when_the_upstream_says_none_remain(start_gateway):
    """`X-RateLimit-Remaining: 0` with a 1 s reset holds the next call about a second."""
    exhausted = {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}
    async with FakeUpstream() as fake:
        fake.script(Reply(headers=exhausted))
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=FAST_RESILIENCE))
        await gateway.stub.Complete(chat())
        started = time.monotonic()
        response = await gateway.stub.Complete(chat())
        elapsed = time.monotonic() - started
        assert response.metadata.attempts == 1
        # Held for the reset's second; the upper bound guards only against a reset read as
        # minutes (60 s) or a hold of resilience.max_limit_wait_s (5 s).
        assert 0.9 <= elapsed < 4.5
        gap = fake.requests[1].received_at - fake.requests[0].received_at
        assert gap >= 0.9  # the upstream never saw the call it would have refused


@pytest.mark.parametrize("is_stream", [False, True], ids=["unary", "stream"])
async def test_a_calls_wait_in_its_upstreams_limiter_is_queued_time(start_gateway, is_stream):
    """A call held by its upstream's pause (`X-RateLimit-Remaining: 0`) says so in its
    timings, unary and streamed alike: the wait is `queued_ms`, within `total_ms` and its
    time to first token, and apart from `upstream_ms`. Before, the response had no such
    field and counted the wait in `upstream_ms`, as though the upstream had been slow."""
    exhausted = {
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "500ms",
    }
    async with FakeUpstream() as fake:
        fake.script(Reply(headers=exhausted))
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=FAST_RESILIENCE))
        await gateway.stub.Complete(chat())  # its answer pauses the upstream
        if is_stream:
            events = [e async for e in gateway.stub.CompleteStream(chat_stream("Say hi again"))]
            metadata = events[-1].final
        else:
            metadata = (await gateway.stub.Complete(chat("Say hi again"))).metadata
    timings = metadata.timings
    assert (metadata.attempts, len(fake.requests)) == (1, 2)
    assert timings.queued_ms > timings.upstream_ms  # the pause held it longer than its answer
    assert timings.time_to_first_token_ms >= timings.queued_ms
    assert timings.total_ms >= timings.queued_ms + timings.upstream_ms


_OPENAI_WINDOWS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29000",
    "x-ratelimit-reset-tokens": "6m0s",
}


@pytest.mark.parametrize(
    ("exhausted", "pause_s"),
    [
        pytest.param(
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1s500ms"},
            1.5,
            id="tokens",
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"},
            2.0,
            id="requests",
        ),
    ],
)
async def test_limiter_pauses_for_the_reset_of_the_exhausted_openai_window(
    start_gateway, exhausted, pause_s
):
    """OpenAI's windows: the one with nothing left holds the next call for its own reset.

    The resets are Go durations (`1s500ms`); the other window has plenty left, so only
    reading the exhausted one's reset gives the pause (not none, not a fixed second).
    """
    async with FakeUpstream() as fake:
        fake.script(Reply(headers={**_OPENAI_WINDOWS, **exhausted}))
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=FAST_RESILIENCE))
        await gateway.stub.Complete(chat())
        response = await gateway.stub.Complete(chat())
        assert response.metadata.attempts == 1
        gap = fake.requests[1].received_at - fake.requests[0].received_at
        assert pause_s - 0.1 <= gap < pause_s + 2.0


async def test_a_streams_window_reset_counts_from_its_headers_not_from_its_end(start_gateway):
    """A reset given as a duration (`1s`) counts from when the upstream sent it, with the
    stream's headers: a stream that outlasts it ends with its window already reset, so the
    next call goes at once instead of the upstream pausing a second more."""
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
    }
    async with FakeUpstream() as fake:
        fake.script(Reply(headers=headers, chunks=3, chunk_delay_s=0.75))
        resilience = {**FAST_RESILIENCE, "attempts": 1, "max_limit_wait_s": 0.0}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        deltas = [m async for m in gateway.stub.CompleteStream(chat_stream())]
        assert deltas[-1].HasField("final")
        response = await gateway.stub.Complete(chat())
        assert response.metadata.attempts == 1
        assert len(fake.requests) == 2


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_its_deadline_ends_at_a_limit_after_a_failed_attempt_names_that_failure(
    mode, start_gateway
):
    """A call whose attempt on up0 failed (HTTP 500) fails over to up1, whose one slot
    another call holds, and waits there until its deadline leaves no room for an attempt:
    it ends with up0's failure, cut short by the deadline, as one whose retry's back-off
    the deadline leaves no room for does, not with a DEADLINE_EXCEEDED naming only the
    slot (a call none of whose attempts began gets that)."""
    async with (
        FakeUpstream(default=Status(500)) as failing,
        ScriptedUpstream(models=(FAKE_MODEL,)) as full,
    ):
        resilience = {**FAST_RESILIENCE, "min_attempt_s": 1.0, "max_limit_wait_s": 30.0}
        config = gateway_config(failing.base_url, full.base_url, resilience=resilience)
        first, second = config.upstreams
        second = dataclasses.replace(second, max_concurrency=1)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=(first, second)))
        full.gate.clear()
        held = asyncio.ensure_future(gateway.stub.Complete(chat("held"), timeout=30))
        await full.wait_until(lambda: full.in_flight == 1)
        failed, deltas = await call(gateway, mode, timeout_s=3.0)
        full.gate.set()
        await held
    assert isinstance(failed, grpc.aio.AioRpcError), failed
    assert failed.code() is grpc.StatusCode.UNAVAILABLE, failed
    metadata, _, _ = error_details(failed)
    assert (metadata["upstream"], metadata["http_status"]) == ("up0", "500")
    assert deltas == []
    assert len(full.requests) == 1  # the held call's


async def test_a_call_queued_for_a_slot_honours_a_retry_after_given_meanwhile(start_gateway):
    """A 429's Retry-After pauses the upstream for calls already queued on its limiter too.

    With max_concurrency 1, the second call waits for the first one's slot; the first gets
    a 429 asking for a 1 s pause. The slot it hands over must not send the queued call
    to the upstream before that second has passed.
    """
    async with FakeUpstream() as fake:
        fake.script(Status(429, headers={"Retry-After": "1"}, delay_s=0.3))
        config = gateway_config(fake.base_url, resilience={**FAST_RESILIENCE, "attempts": 1})
        gateway = await start_gateway(dataclass_replace_upstream(config, max_concurrency=1))
        first = asyncio.ensure_future(gateway.stub.Complete(chat()))
        assert await settle(lambda: len(fake.requests) == 1)
        second = asyncio.ensure_future(gateway.stub.Complete(chat()))
        with pytest.raises(grpc.aio.AioRpcError):
            await first
        response = await second
        assert response.content == "Hello from fake"
        answered_429_at = fake.requests[0].received_at + 0.3
        assert fake.requests[1].received_at - answered_429_at >= 0.9


async def test_retry_budget_holds_for_calls_failing_at_once(start_gateway):
    """Calls that fail together share one budget: with ratio 0.5, 10 calls retry at most 5.

    Each call waits (Retry-After) between deciding to retry and sending the retry; the
    budget must count the retries already decided, not only those already sent. And
    `llm_gateway.retries` (the pool's counters) counts the retries sent, not the
    decisions: it counted both, twice what reached the upstream in the very storm the
    budget holds back.
    """
    failing = Status(503, headers={"Retry-After": "0.3"}, delay_s=0.2)
    async with FakeUpstream(default=failing) as fake:
        resilience = {**HALF_RETRY_BUDGET, "attempts": 2}
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        calls = 10
        results = await asyncio.gather(
            *(gateway.stub.Complete(chat()) for _ in range(calls)), return_exceptions=True
        )
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
        assert len(fake.requests) <= calls * 1.5
        counters = gateway.server.pipeline.pool.counters
        assert counters.retries == len(fake.requests) - calls
        assert counters.attempts == len(fake.requests)


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_queued_for_a_slot_is_not_sent_once_the_breaker_opened(mode, start_gateway):
    """A call waiting for the upstream's one slot when the call holding it fails and
    opens the breaker is kept off the upstream, as a call arriving then is: it ends
    UNAVAILABLE naming the open circuit, and the dead upstream sees one request, not one
    for every call that was queued behind it."""
    async with ScriptedUpstream(default=Status(503)) as fake:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 60.0,
        }
        config = gateway_config(fake.base_url, resilience=resilience)
        upstreams = (dataclasses.replace(config.upstreams[0], max_concurrency=1),)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=upstreams))
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        fake.gate.clear()
        first = asyncio.ensure_future(call(gateway, mode, timeout_s=10.0))
        assert await settle(lambda: fake.in_flight == 1)
        queued = asyncio.ensure_future(call(gateway, mode, timeout_s=10.0))
        assert await settle(lambda: limiter.queued == 1)
        fake.gate.set()  # the first call's 503 opens the breaker
        failed, _ = await first
        assert error_details(failed)[0]["http_status"] == "503"
        refused, deltas = await queued
        assert isinstance(refused, grpc.aio.AioRpcError), type(refused)
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert "circuit open" in refused.details()
        assert error_details(refused)[2] == pytest.approx(60.0, abs=5.0)
        assert deltas == []
        assert len(fake.requests) == 1
        assert limiter.in_flight == 0


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_whose_every_upstream_opened_as_it_waited_is_told_their_cool_down(
    mode, start_gateway
):
    """A call waits for up0's one slot, whose call's 503 opens the model's breaker there;
    it moves to up1, waits for its one slot, and that call's 503 opens the model's there.
    Refused with no attempt, both named `circuit open for this model`, it is told to come
    back as their cool-down ends, as a call finding them open is.

    Before, left out of both as it waited, neither counted for its RetryInfo: it was told
    the first backoff (and a pushback of 20 ms) while both stayed open for a minute."""
    async with (
        ScriptedUpstream(default=Status(503)) as fake0,
        ScriptedUpstream(default=Status(503)) as fake1,
    ):
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 60.0,
        }
        config = gateway_config(fake0.base_url, fake1.base_url, resilience=resilience)
        upstreams = tuple(dataclasses.replace(u, max_concurrency=1) for u in config.upstreams)
        gateway = await start_gateway(dataclasses.replace(config, upstreams=upstreams))
        pool = gateway.server.pipeline.pool
        fakes = {"up0": fake0, "up1": fake1}
        for fake in fakes.values():
            fake.gate.clear()
        first = [asyncio.ensure_future(call(gateway, mode, timeout_s=10.0)) for _ in fakes]
        assert await settle(lambda: fake0.in_flight == fake1.in_flight == 1)
        queued = asyncio.ensure_future(call(gateway, mode, timeout_s=10.0))
        assert await settle(lambda: any(pool.state(n).limiter.queued for n in fakes))
        waited_at = next(n for n in fakes if pool.state(n).limiter.queued)
        [then_at] = set(fakes) - {waited_at}
        fakes[waited_at].gate.set()  # its call's 503 opens its breaker
        assert await settle(lambda: pool.state(then_at).limiter.queued == 1)
        fakes[then_at].gate.set()
        refused, deltas = await queued
        await asyncio.gather(*first)
        assert isinstance(refused, grpc.aio.AioRpcError), type(refused)
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert (
            "up0 (circuit open for this model), up1 (circuit open for this model)"
            in refused.details()
        )
        metadata, reason, retry_s = error_details(refused)
        assert (reason, metadata["attempts"]) == ("UPSTREAM_UNAVAILABLE", "0")
        assert retry_s == pytest.approx(60.0, abs=5.0)
        assert dict(refused.trailing_metadata())[RETRY_PUSHBACK_TRAILER] == "-1"  # past 10 s
        assert deltas == []
        assert len(fake0.requests) == len(fake1.requests) == 1


async def test_a_probe_queued_past_its_half_open_is_not_sent_once_the_breaker_opened_again(
    start_gateway,
):
    """A call that took the half-open's probe slot and waits in line (the limiter paused
    by the 503's Retry-After) is kept off the upstream when an older call's 401 opens the
    breaker again meanwhile, as any call queued then is: it ends UNAVAILABLE, and the
    upstream whose key was refused sees no request from it.

    Before, the call went on as the earlier half-open's probe, into an open breaker (and
    beside the next half-open's own probe: two at once).
    """
    behaviours = {
        "old": Status(401, delay_s=1.0),  # sent closed; answers while the probe waits
        "fail": Status(503, headers={"Retry-After": "3"}),  # opens, and pauses the limiter
        "probe": Reply(),
    }
    async with ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        gateway, old = await _half_open_beside_an_old_call(
            start_gateway,
            fake,
            cool_down_s=0.3,
            max_retry_after_s=10.0,
            max_limit_wait_s=10.0,
        )
        limiter = gateway.server.pipeline.pool.state("up0").limiter
        probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
        assert await settle(lambda: limiter.queued == 1)
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await old  # the key rejected: open again, for key_rejected_cool_down_s
        assert rejected.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await probe
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail"]
        assert limiter.in_flight == 0


async def _half_open_beside_an_old_call(
    start_gateway, fake, *, cool_down_s: float, **resilience: float
):
    """`_open_beside_an_old_call`, left `cool_down_s` and a little to go half-open."""
    gateway, old = await _open_beside_an_old_call(
        start_gateway, fake, cool_down_s=cool_down_s, **resilience
    )
    await asyncio.sleep(cool_down_s + 0.05)  # the cool-down: the breaker is half-open
    return gateway, old


async def _open_beside_an_old_call(start_gateway, fake, *, cool_down_s: float, **resilience: float):
    """A gateway in front of `fake` (one attempt a call, a breaker opened by one failure
    for `cool_down_s`, and `resilience`) whose call "old" is in flight at the upstream
    when the call "fail" opens the breaker: (gateway, the old call)."""
    resilience = {
        **FAST_RESILIENCE,
        "attempts": 1,
        "breaker_consecutive_failures": 1,
        "breaker_cool_down_s": cool_down_s,
        **resilience,
    }
    gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
    old = asyncio.ensure_future(gateway.stub.Complete(chat("old")))
    assert await settle(lambda: fake.in_flight == 1)
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(chat("fail"))  # opens the breaker
    return gateway, old


async def test_half_open_lets_one_probe_through_while_older_calls_end(start_gateway):
    """A call sent before the breaker opened, ending during the probe, frees no second probe.

    The old call's 400 says nothing about the upstream's health; it must not release the
    probe slot of the call that is probing.
    """
    behaviours = {"old": Status(400), "fail": Status(500), "probe": Reply()}
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        fake.release("fail")
        gateway, old = await _half_open_beside_an_old_call(start_gateway, fake, cool_down_s=1.0)
        probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
        assert await settle(lambda: fake.in_flight == 2)
        fake.release("old")
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await old
        assert rejected.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat("another"))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail", "probe"]
        fake.release("probe")
        assert (await probe).content == "Hello from fake"


async def test_a_probe_from_an_earlier_half_open_does_not_free_the_current_probe(start_gateway):
    """A probe outlives its half-open: an older call's rejected key opens the breaker
    again (a 5xx would not: the probe decides), and after the next cool-down a second
    probe goes out. The first probe's 429 then ends
    nothing but itself: the second probe's slot stays taken, and a third call is kept off
    the upstream while it runs.
    """
    behaviours = {
        "old": Status(401),  # sent closed; fails while the first probe runs
        "fail": Status(500),
        "probe1": Status(429),
        "probe2": Reply(),
    }
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        fake.release("fail")
        gateway, old = await _half_open_beside_an_old_call(
            start_gateway, fake, cool_down_s=1.0, key_rejected_cool_down_s=0.4
        )
        probe1 = asyncio.ensure_future(gateway.stub.Complete(chat("probe1")))
        assert await settle(lambda: len(fake.requests) == 3)
        fake.release("old")
        with pytest.raises(grpc.aio.AioRpcError):
            await old  # its 401 opens the breaker again, probe1 still running
        await asyncio.sleep(0.45)  # half-open again
        probe2 = asyncio.ensure_future(gateway.stub.Complete(chat("probe2")))
        assert await settle(lambda: len(fake.requests) == 4)
        fake.release("probe1")
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await probe1
        assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not probe2.done()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat("another"))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail", "probe1", "probe2"]
        fake.release("probe2")
        assert (await probe2).content == "Hello from fake"
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_HEALTHY
        assert models.models[0].upstreams[0].in_flight == 0


async def test_an_old_call_failing_during_the_probe_leaves_the_breaker_to_the_probe(
    start_gateway,
):
    """A call sent while the upstream was healthy fails once the breaker is half-open, its
    probe running: its failure is older news than the opening, so the breaker stays
    half-open, and the probe's success closes it; the next call reaches the upstream.

    Before, the old call's failure was taken for the probe's: it opened the breaker again
    for another cool-down, the probe's answer then was ignored as older news, and the
    upstream, back up, was refused to every caller (`up0 (circuit open)`)."""
    behaviours = {"old": Status(500), "fail": Status(500), "probe": Reply(), "after": Reply()}
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        fake.release("fail")
        fake.release("after")
        gateway, old = await _half_open_beside_an_old_call(start_gateway, fake, cool_down_s=1.0)
        breaker = gateway.server.pipeline.pool.breaker("up0", FAKE_MODEL)
        probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
        assert await settle(lambda: len(fake.requests) == 3)
        fake.release("old")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await old
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_PROBING
        fake.release("probe")
        assert (await probe).content == "Hello from fake"
        assert breaker.state is BreakerState.CLOSED
        after = await gateway.stub.Complete(chat("after"))
        assert (after.metadata.upstream, after.metadata.attempts) == ("up0", 1)
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail", "probe", "after"]


async def test_an_old_call_answered_during_the_probe_leaves_the_breaker_to_the_probe(
    start_gateway,
):
    """A call sent while the upstream was healthy is answered once the breaker is
    half-open, its probe running: the breaker stays half-open, a third call is kept off
    the upstream while the probe runs, and the probe's failure opens it again.

    Before, the old call's answer closed the breaker: every call went on to the upstream
    beside its probe, and the probe's failure then counted as one of a closed breaker's."""
    behaviours = {"old": Reply(), "fail": Status(500), "probe": Status(500), "other": Reply()}
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        fake.release("fail")
        fake.release("other")
        gateway, old = await _half_open_beside_an_old_call(
            start_gateway, fake, cool_down_s=0.3, breaker_consecutive_failures=1
        )
        breaker = gateway.server.pipeline.pool.breaker("up0", FAKE_MODEL)
        probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
        assert await settle(lambda: len(fake.requests) == 3)
        fake.release("old")
        assert (await old).content == "Hello from fake"
        assert breaker.state is BreakerState.HALF_OPEN
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat("other"))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "its probe running" in refused.value.details()
        fake.release("probe")
        with pytest.raises(grpc.aio.AioRpcError):
            await probe
        assert breaker.state is BreakerState.OPEN
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail", "probe"]


async def test_a_call_sent_before_the_breaker_opened_does_not_close_it_by_succeeding(
    start_gateway,
):
    """A long call sent while the upstream was healthy succeeds after failures opened the
    breaker: its answer is older news than they are, so the breaker stays open for its
    cool-down and the next call is kept off the failing upstream (it closed the breaker at
    once, and the calls went back to the upstream as if nothing had failed)."""
    behaviours = {"old": Reply(delay_s=1.0), "fail": Status(500), "after": Status(500)}
    async with ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        gateway, old = await _open_beside_an_old_call(start_gateway, fake, cool_down_s=30.0)
        assert (await old).content == "Hello from fake"
        models = await gateway.stub.ListModels(pb.ListModelsRequest())
        assert models.models[0].upstreams[0].health == pb.UPSTREAM_HEALTH_UNHEALTHY
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.stub.Complete(chat("after"))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(info.value)[2] == pytest.approx(30.0, abs=3.0)
        assert [user_text(r.body) for r in fake.requests] == ["old", "fail"]


async def test_a_call_finding_one_upstream_open_and_the_other_probing_waits_the_sooner(
    start_gateway,
):
    """up0's breaker is half-open with its probe running, up1's is open for about a second
    more: the call that finds neither usable is told to come back when up1's cool-down
    ends, sooner than up0's probe may be overtaken (a cool-down from its start), and not
    after the retry backoff, as though the probe were sure to have answered by then."""
    behaviours = {"probe": Reply(delay_s=1.5)}
    async with ScriptedUpstream(
        respond=lambda body: behaviours.get(user_text(body)), default=Status(500)
    ) as flaky:
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 2.0,
        }
        gateway = await start_gateway(
            gateway_config(flaky.base_url, flaky.base_url, resilience=resilience)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("fail"))  # opens up0
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("fail"))  # opens up1, a second after up0
        await asyncio.sleep(1.05)  # up0 half-open; up1 open for about a second more
        error = await _refused_during_probe(gateway, flaky)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(error)[1] == "UPSTREAM_UNAVAILABLE"
        # up1's cool-down has under a second left; up0's probe window most of 2 s.
        assert told_to_wait_out_the_probe(error, cool_down_s=2.0) < 1.5
        assert [user_text(r.body) for r in flaky.requests] == ["fail", "fail", "probe"]


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_call_that_opens_the_last_usable_breaker_waits_the_earliest_probe(
    start_gateway, mode
):
    """up1 is half-open with its probe running; a call's 5xx on up0 opens up0's breaker
    too, leaving no upstream for the call: it is told to come back once up1's probe has
    answered or another may go, as the next call finding both unusable is, not after
    up0's cool-down (which it was, as the upstream it tried), nor after the backoff."""
    behaviours = {"fail": Status(500), "probe": Reply(delay_s=2.5)}
    async with (
        FakeUpstream() as steady,
        ScriptedUpstream(respond=lambda body: behaviours.get(user_text(body))) as flaky,
    ):
        resilience = {
            **FAST_RESILIENCE,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 1.0,
        }
        gateway = await start_gateway(
            gateway_config(steady.base_url, flaky.base_url, resilience=resilience)
        )
        # Round robin: up0, then up1 (whose 500 opens it; the call fails over to up0).
        assert (await gateway.stub.Complete(chat("first"))).metadata.upstream == "up0"
        assert (await gateway.stub.Complete(chat("fail"))).metadata.upstream == "up0"
        await asyncio.sleep(1.05)  # up1's cool-down has passed: half-open
        # Round robin again: up0, then up1, whose call is its probe.
        assert (await gateway.stub.Complete(chat("third"))).metadata.upstream == "up0"
        probe = asyncio.ensure_future(gateway.stub.Complete(chat("probe")))
        assert await settle(lambda: flaky.in_flight == 1)
        steady.script(Status(503))
        error, _ = await call(gateway, mode, timeout_s=10)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        metadata, reason, retry_s = error_details(error)
        assert (reason, metadata["upstream"], metadata["attempts"]) == (
            "UPSTREAM_UNAVAILABLE",
            "up0",
            "1",
        )
        # Sooner than up0's whole cool-down: up1's probe was sent before the call.
        assert told_to_wait_out_the_probe(error, cool_down_s=1.0) == retry_s < 1.0
        assert (await probe).metadata.upstream == "up1"


async def test_a_hung_probe_lets_another_through_after_a_cool_down(start_gateway):
    """The half-open breaker's probe is taken and held by the upstream (the default
    `timeout_s`: two minutes). A call meanwhile is refused with a RetryInfo that says when
    the probe will have answered or may be overtaken, not the first backoff (callers
    retried every backoff for the whole timeout); once the probe has run a cool-down,
    one more call goes through as a probe, and its answer closes the breaker."""
    behaviours = {"fail": Status(500), "hung": Reply(), "second": Reply(), "after": Reply()}
    async with GatedUpstream(respond=lambda body: behaviours.get(user_text(body))) as fake:
        for text in ("fail", "second", "after"):
            fake.release(text)
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 1,
            "breaker_consecutive_failures": 1,
            "breaker_cool_down_s": 1.0,
        }
        gateway = await start_gateway(gateway_config(fake.base_url, resilience=resilience))
        breaker = gateway.server.pipeline.pool.breaker("up0", FAKE_MODEL)
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(chat("fail"))  # opens the breaker
        assert await settle(lambda: breaker.state is BreakerState.HALF_OPEN)
        hung = asyncio.ensure_future(gateway.stub.Complete(chat("hung")))
        assert await settle(lambda: fake.in_flight == 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat("refused"))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "its probe running" in refused.value.details()
        told_to_wait_out_the_probe(refused.value, cool_down_s=1.0)
        assert await settle(breaker.allows)  # the hung probe has run a cool-down
        second = await gateway.stub.Complete(chat("second"))
        assert (second.metadata.upstream, second.metadata.attempts) == ("up0", 1)
        assert breaker.state is BreakerState.CLOSED
        assert (await gateway.stub.Complete(chat("after"))).metadata.upstream == "up0"
        assert not hung.done()
        fake.release("hung")
        assert (await hung).content == "Hello from fake"
        assert [user_text(r.body) for r in fake.requests] == ["fail", "hung", "second", "after"]


async def test_a_call_retried_past_1024_times_fails_as_its_last_attempt_did(
    upstream, start_gateway
):
    """An upstream that keeps failing, under a config allowing more than 1024 retries
    (`attempts`, the retry budget and the breaker raised, a microsecond's backoff), ends
    the call `UNAVAILABLE` naming it, after every attempt.

    Before, the 1025th backoff computed its base times 2 ** 1024, an int no float holds:
    INTERNAL.
    """
    upstream.script(*[Status(503)] * 1100)
    resilience = {
        "attempts": 1100,
        "backoff_base_s": 1e-6,
        "backoff_cap_s": 1e-6,
        "retry_budget_min_retries": 10_000,
        "breaker_consecutive_failures": 10_000,
        "breaker_min_calls": 10_000,
    }
    gateway = await start_gateway(gateway_config(upstream.base_url, resilience=resilience))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat(), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_UNAVAILABLE"
    assert info.metadata["attempts"] == "1100"
