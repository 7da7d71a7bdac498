"""Run last: no provider or caller key appears in anything the gateway emitted.

The session-wide capture (`tests/secret_capture.py`) holds every log record of the test
process, the errors and trailers the tests received, and every span and metric data
point any in-memory exporter or reader caught (`tests/telemetry_support.py`). This test
adds a run of its own that touches every path where a key is handled, with telemetry
captured, then greps all of it. Each test process greps its whole capture again once
its last test is done (`secret_capture.pytest_sessionfinish`), which under pytest-xdist
covers the other workers' tests too.
"""

from __future__ import annotations

import json
import re

import grpc

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import chat, chat_stream
from tests.fake_upstream import FakeUpstream, Status
from tests.integration.tenancy_helpers import as_tenant, bearer, rpc_error, secure_config
from tests.secret_capture import (
    CALLER_KEY_A,
    EMITTED_PATH,
    PROVIDER_KEY,
    leaked_secrets,
    record_emitted,
)
from tests.telemetry_support import Captured, attributes_of, captured_telemetry, record_open_readers


async def _exercise_every_key_path(start_gateway, captured: Captured) -> None:
    async with FakeUpstream(models=("fake-model",), api_key=PROVIDER_KEY) as accepting:
        gw = await start_gateway(secure_config(accepting.base_url), telemetry=captured.telemetry)
        record_emitted(await gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
        record_emitted(
            [e async for e in gw.stub.CompleteStream(chat_stream(), metadata=as_tenant("team-b"))]
        )
        record_emitted(
            await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant("team-a"))
        )
        assert accepting.requests[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        await rpc_error(gw.stub.Complete(chat()))
        await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A[:-3] + "zzz")))
        await rpc_error(gw.stub.Complete(chat(model="nope"), metadata=as_tenant("team-a")))
        accepting.script(Status(500), Status(500), Status(500), Status(500))
        await rpc_error(gw.stub.Complete(chat("x"), metadata=as_tenant("team-a")))
        # A refusal quoting the key relays it redacted; a 401 quoting it, nothing at all.
        echoed = json.dumps({"error": {"message": f"bad request, key {PROVIDER_KEY}"}})
        accepting.script(Status(400, body=echoed))
        refused = await rpc_error(gw.stub.Complete(chat("y"), metadata=as_tenant("team-a")))
        assert "bad request, key [redacted]" in (refused.details() or "")
        accepting.script(Status(401, body=echoed))
        await rpc_error(gw.stub.Complete(chat("z"), metadata=as_tenant("team-a")))
    async with FakeUpstream(models=("fake-model",), api_key="sk-some-other-key") as rejecting:
        gw = await start_gateway(secure_config(rejecting.base_url))
        rejected = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
        assert rejected.code() is grpc.StatusCode.UNAVAILABLE
        assert rejecting.requests[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_no_key_appears_in_logs_errors_or_responses(start_gateway, every_logger_at_debug):
    """Every key used in the run is absent from all logs, errors, trailers and responses,
    every library's DEBUG lines included (those `serve --log-level DEBUG` writes)."""
    captured = captured_telemetry(capture_content=True)
    await _exercise_every_key_path(start_gateway, captured)
    # The RPC span names the tenant the key authenticated, never the key itself.
    complete = [s for s in captured.spans() if s.name.endswith("CompletionService/Complete")]
    tenants = [attributes_of(s).get("llm_gateway.tenant") for s in complete]
    assert tenants[0] == "team-a"
    assert record_open_readers() >= 1
    emitted = EMITTED_PATH.read_text(encoding="utf-8", errors="replace")
    # Spans and metric points are in the capture too.
    assert '"llm_gateway.tenant": "team-a"' in emitted
    assert "CompletionService/CompleteStream" in emitted
    assert '"name": "llm_gateway.requests"' in emitted
    assert '"name": "llm_gateway.cost.usd"' in emitted
    # The capture works: it holds lifecycle logs, DEBUG decisions and received errors.
    assert "server.started" in emitted
    assert "rpc.failed" in emitted
    assert "UNAUTHENTICATED" in emitted
    assert "UPSTREAM_AUTH" in emitted
    assert re.search(r"^(?!llm_gateway)\S+ DEBUG ", emitted, re.MULTILINE)  # grpc's, at least
    leaked = leaked_secrets(emitted)
    assert leaked == [], f"keys found in emitted output: {leaked}"
