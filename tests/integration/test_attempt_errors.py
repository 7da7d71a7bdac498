"""A call whose every attempt failed says what each one failed with, not only the last.

The status's code, reason and `upstream` stay the decisive failure's (the error table's);
its message ends with `(attempts: up0: HTTP 500; up1: key rejected (HTTP 401))`, and its
`ErrorInfo` metadata `attempt_errors` says the same, whenever there was more than one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2

from llmgateway.v1 import gateway_pb2 as pb
from service.clock import Deadline
from service.config import GatewayConfig, parse_config
from service.domain import ChatRequest, Message, Role
from service.errors import DeadlineExceeded, to_rpc_status
from service.pool import AttemptLog, UpstreamPool
from service.upstream.client import UpstreamClient
from tests.conftest import FAKE_MODEL, chat, gateway_config, gateway_config_data
from tests.fake_upstream import Behaviour, FakeUpstream, Hang, Reset, Status
from tests.integration.test_resilience import FAST_RESILIENCE, call, error_details
from tests.telemetry_support import attributes_of, captured_telemetry

UNARY_SPAN = "llmgateway.v1.CompletionService/Complete"
STREAM_SPAN = "llmgateway.v1.CompletionService/CompleteStream"
# A 500 whose body quotes a key: no 5xx body is ever relayed, nor is it in the attempts.
LEAKY_500 = Status(
    500, body=json.dumps({"error": {"message": "backend sk-live-0123456789abcdef failed"}})
)


@dataclass(frozen=True)
class Failure:
    """How up1 fails, and what the caller is told of it."""

    behaviour: Behaviour
    code: grpc.StatusCode
    reason: str
    said: str  # in the attempts' list


SECOND_FAILURES = [
    Failure(Status(401), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_AUTH", "key rejected (HTTP 401)"),
    Failure(
        Status(429),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPSTREAM_RATE_LIMITED",
        "rate limited (HTTP 429)",
    ),
    Failure(Hang(), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_TIMEOUT", "timed out"),
    Failure(Reset(), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "dropped the connection"),
]


def _two_upstreams_config(first_url: str, second_url: str) -> GatewayConfig:
    """up0 and up1, two attempts in all; up1 times out after 0.3 s."""
    resilience = {**FAST_RESILIENCE, "attempts": 2}
    data = gateway_config_data(first_url, second_url, resilience=resilience)
    data["upstreams"][1]["timeout_s"] = 0.3
    return parse_config(data, source="<test>", environ={})


@pytest.mark.parametrize("mode", ["unary", "stream"])
@pytest.mark.parametrize("second", SECOND_FAILURES, ids=["401", "429", "timeout", "reset"])
async def test_the_error_names_each_upstreams_failure_not_only_the_last(
    start_gateway, mode: str, second: Failure
):
    """up0 answers 500 and up1 fails too: the caller is told up1's failure, as the error
    table says, and that up0 failed first (before, nothing said up0 had failed at all);
    the RPC span's error is still up1's."""
    captured = captured_telemetry()
    async with (
        FakeUpstream(default=LEAKY_500) as first,
        FakeUpstream(default=second.behaviour) as other,
    ):
        config = _two_upstreams_config(first.base_url, other.base_url)
        gateway = await start_gateway(config, telemetry=captured.telemetry)
        error, _ = await call(gateway, mode, timeout_s=10)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert (len(first.requests), len(other.requests)) == (1, 1)
        assert error.code() is second.code
        metadata, reason, _ = error_details(error)
        assert (reason, metadata["upstream"], metadata["attempts"]) == (second.reason, "up1", "2")
        attempts = f"up0: HTTP 500; up1: {second.said}"
        assert metadata["attempt_errors"] == attempts
        message = error.details() or ""
        assert message.startswith("upstream 'up1' ")
        assert message.endswith(f" (attempts: {attempts})")
        assert "sk-live" not in message + repr(error.trailing_metadata())
        span = await captured.ended(UNARY_SPAN if mode == "unary" else STREAM_SPAN)
        assert attributes_of(span)["error.type"] == second.reason


async def test_a_call_retried_many_times_names_its_first_attempts_and_counts_the_rest(
    start_gateway,
):
    """Eight 503s name the first five and say `and 3 more`; a call that ended after one
    attempt (a 400) says nothing of attempts, its message the failure alone."""
    async with FakeUpstream(default=Status(503)) as upstream:
        upstream.script(Status(400))
        resilience = {
            **FAST_RESILIENCE,
            "attempts": 8,
            "backoff_cap_s": 0.02,
            "breaker_consecutive_failures": 100,
        }
        gateway = await start_gateway(gateway_config(upstream.base_url, resilience=resilience))
        with pytest.raises(grpc.aio.AioRpcError) as once:
            await gateway.stub.Complete(chat())
        assert once.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "attempt_errors" not in error_details(once.value)[0]
        assert "(attempts:" not in (once.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as many:
            await gateway.stub.Complete(chat())
        assert len(upstream.requests) == 1 + 8
        metadata, reason, _ = error_details(many.value)
        assert (reason, metadata["attempts"]) == ("UPSTREAM_UNAVAILABLE", "8")
        attempts = "; ".join(["up0: HTTP 503"] * 5) + "; and 3 more"
        assert metadata["attempt_errors"] == attempts
        assert many.value.details() == f"upstream 'up0' failed (HTTP 503) (attempts: {attempts})"


async def test_a_batch_items_error_names_each_attempts_failure(start_gateway):
    """A CompleteBatch item failed by up0's 500 and up1's 401 carries both in its status,
    as a Complete does."""
    async with (
        FakeUpstream(default=Status(500)) as first,
        FakeUpstream(default=Status(401)) as other,
    ):
        gateway = await start_gateway(_two_upstreams_config(first.base_url, other.base_url))
        request = pb.CompleteBatchRequest(items=[pb.BatchItem(id="item-0", request=chat())])
        events = [event async for event in gateway.stub.CompleteBatch(request)]
        failed = events[0].result.error
        assert failed.code == grpc.StatusCode.UNAVAILABLE.value[0]
        attempts = "up0: HTTP 500; up1: key rejected (HTTP 401)"
        assert failed.message.endswith(f" (attempts: {attempts})")
        info = error_details_pb2.ErrorInfo()
        assert any(detail.Unpack(info) for detail in failed.details)
        assert (info.reason, info.metadata["attempt_errors"]) == ("UPSTREAM_AUTH", attempts)


async def _fail_through_the_pool(config: GatewayConfig, mode: str, deadline: Deadline) -> Exception:
    """What one call through a pool of `config`'s upstreams fails with, `mode` unary or
    stream."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(UpstreamClient(upstream))
            for upstream in config.upstreams
        ]
        pool = UpstreamPool(clients, settings=config.resilience)
        request = ChatRequest(FAKE_MODEL, (Message(Role.USER, "Say hi"),))
        log = AttemptLog()
        try:
            if mode == "unary":
                await pool.complete(request, prompt_tokens=8, deadline=deadline, log=log)
            else:
                stream = pool.stream(request, prompt_tokens=8, deadline=deadline, log=log)
                async with contextlib.aclosing(stream):
                    async for _ in stream:
                        pass
        except Exception as exc:
            return exc
    raise AssertionError("the call did not fail")


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_deadline_ending_the_last_attempt_still_names_the_earlier_ones(mode: str):
    """up0 answers 500 and up1 hangs until the caller's deadline: DEADLINE_EXCEEDED names
    up0's 500 and that the deadline cut up1 (before, it said only that the deadline
    passed). Through the pool: at a caller grpc's own deadline ends the call at that
    moment too, and either status may reach it."""
    async with (
        FakeUpstream(default=Status(500)) as first,
        FakeUpstream(default=Hang()) as other,
    ):
        resilience = {**FAST_RESILIENCE, "attempts": 2}
        config = gateway_config(first.base_url, other.base_url, resilience=resilience)
        error = await _fail_through_the_pool(config, mode, Deadline.after(1.5))
        assert (len(first.requests), len(other.requests)) == (1, 1)
    assert isinstance(error, DeadlineExceeded)
    status = to_rpc_status(error)
    assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    attempts = "up0: HTTP 500; up1: cut by the caller's deadline"
    assert status.message == f"the caller's deadline passed (attempts: {attempts})"
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert (info.reason, info.metadata["attempt_errors"]) == ("DEADLINE_EXCEEDED", attempts)
