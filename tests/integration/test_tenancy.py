"""Caller keys, tenants and per-tenant quotas through the real server."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

import service.caller_gate
import service.summarize
import service.tenant_limits
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.auth import hash_key
from service.caller_gate import part_tokens
from service.config import load_config, parse_config
from service.errors import RETRY_ELSEWHERE_TRAILER, RETRY_PUSHBACK_TRAILER, QuotaExceeded
from service.security import InsecureListen
from service.server import GatewayServer
from service.summarize import document_prompt
from service.tenant_limits import is_over_call_cap
from service.tokens import estimate_text_tokens
from tests.conftest import (
    FAKE_MODEL,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config,
    gateway_config_data,
)
from tests.fake_upstream import FakeUpstream, Reply, Status
from tests.integration.tenancy_helpers import (
    as_tenant,
    bearer,
    detail,
    rpc_error,
    secure_config,
    stream_error,
    trailer,
)
from tests.integration.test_resilience import dataclass_replace_upstream, settle
from tests.scripted_upstream import ScriptedUpstream, user_text
from tests.secret_capture import CALLER_KEY_A, CALLER_KEY_B, PROVIDER_KEY

SERVICE_CONFIG = Path(__file__).resolve().parents[2] / "clients" / "service_config.json"


async def _call_in_progress(
    gw, upstream, tenant: str, *, answer_after_s: float = 1.0
) -> asyncio.Future[pb.CompleteResponse]:
    """A call of `tenant` that the upstream answers `answer_after_s` after it arrives,
    once it is there."""
    upstream.script(Reply(delay_s=answer_after_s))
    call = asyncio.ensure_future(gw.stub.Complete(chat(), metadata=as_tenant(tenant)))
    for _ in range(1000):  # up to 10 s for the call to reach the upstream
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    return call


async def test_missing_key_is_unauthenticated_before_any_upstream_call(upstream, start_gateway):
    """A call without a key fails UNAUTHENTICATED with ErrorInfo and reaches no upstream."""
    gw = await start_gateway(secure_config(upstream.base_url))
    error = await rpc_error(gw.stub.Complete(chat()))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
    stream = await stream_error(gw.stub.CompleteStream(chat_stream()))
    assert stream.code() is grpc.StatusCode.UNAUTHENTICATED
    listed = await rpc_error(gw.stub.ListModels(pb.ListModelsRequest()))
    assert listed.code() is grpc.StatusCode.UNAUTHENTICATED
    assert upstream.requests == []


@pytest.mark.parametrize(
    "value",
    [CALLER_KEY_A, f"Token {CALLER_KEY_A}", f" Bearer {CALLER_KEY_A}", f"Bearer:{CALLER_KEY_A}"],
    ids=["no-scheme", "another-scheme", "leading-space", "no-space"],
)
async def test_a_key_not_sent_as_bearer_is_told_apart_from_a_missing_one(
    upstream, start_gateway, value
):
    """`authorization` metadata not of the form `Bearer <key>` is UNAUTHENTICATED with
    ErrorInfo, saying it was sent but not as `Bearer <key>` (before, "missing caller
    key") and how to send it, without repeating any of it; with no metadata at all, the
    key is still called missing."""
    gw = await start_gateway(secure_config(upstream.base_url))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=(("authorization", value),)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
    details = error.details() or ""
    assert "metadata was sent, but not as 'Bearer <key>'" in details
    assert details.endswith("send metadata 'authorization: Bearer <key>'")
    assert "missing" not in details
    assert CALLER_KEY_A.removeprefix("llmgw_")[:8] not in details
    missing = await rpc_error(gw.stub.Complete(chat()))
    assert missing.details() == "missing caller key: send metadata 'authorization: Bearer <key>'"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "first", [f"Bearer {CALLER_KEY_A}", "Token abc", "Bearer "], ids=["two-keys", "token", "empty"]
)
async def test_authorization_metadata_sent_twice_is_unauthenticated(upstream, start_gateway, first):
    """Two `authorization` entries name the caller ambiguously (a proxy in front may
    vouch for the other one): refused, saying so, never served as either key's tenant
    (before, the first Bearer entry won, and an empty one hid a valid one after it)."""
    gw = await start_gateway(secure_config(upstream.base_url))
    metadata = (("authorization", first), ("authorization", f"Bearer {CALLER_KEY_B}"))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=metadata))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
    details = error.details() or ""
    assert details.startswith("the 'authorization' metadata was sent 2 times")
    assert CALLER_KEY_B.removeprefix("llmgw_")[:8] not in details
    assert upstream.requests == []


async def test_with_keys_optional_authorization_sent_twice_is_the_default_tenant(
    upstream, start_gateway
):
    """With keys optional, two `authorization` entries name no tenant, as an unknown key
    does: the caller is `default` (before, the first key's tenant)."""
    gw = await start_gateway(secure_config(upstream.base_url, auth={"mode": "off"}))
    metadata = as_tenant("team-a") + as_tenant("team-b")
    assert (await gw.stub.Complete(chat(), metadata=metadata)).content
    usage = await gw.stub.GetUsage(pb.GetUsageRequest(tenant="*"))
    assert [row.tenant for row in usage.rows] == ["default"]


async def test_callers_without_a_valid_key_take_no_server_slot(upstream, start_gateway):
    """With the server's only slot taken and one place to wait, calls without a key or
    with a wrong one are refused at once, and never hold that place: a valid caller
    arriving after them still waits for the slot and is served."""
    config = secure_config(
        upstream.base_url, server={"max_in_flight_calls": 1, "max_queued_calls": 1}
    )
    gw = await start_gateway(config)
    first = await _call_in_progress(gw, upstream, "team-a", answer_after_s=3.0)
    for metadata in ((), bearer("llmgw_not-a-key-anyone-was-given")):
        error = await rpc_error(gw.stub.Complete(chat(), metadata=metadata))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert not first.done()  # refused while the slot was held: it never queued for it
    waiting = asyncio.ensure_future(gw.stub.Complete(chat(), metadata=as_tenant("team-b")))
    assert (await first).content
    assert (await waiting).content
    assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    "metadata",
    [
        bearer("llmgw_not-a-key-anyone-was-given"),
        bearer(CALLER_KEY_A + "x"),
        bearer(CALLER_KEY_A[:-1]),
        (("authorization", f"Basic {CALLER_KEY_A}"),),
        bearer("k" * 5000),
    ],
    ids=["unknown", "longer", "shorter", "wrong-scheme", "huge"],
)
async def test_wrong_key_is_unauthenticated(upstream, start_gateway, metadata):
    """Keys that are not exactly a stored one are refused, without echoing them."""
    gw = await start_gateway(secure_config(upstream.base_url))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=metadata))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert CALLER_KEY_A[:20] not in (error.details() or "")
    assert upstream.requests == []


async def test_a_flood_of_unknown_keys_logs_one_rejection(upstream, start_gateway, caplog):
    """Fifty calls with fifty unknown keys are each UNAUTHENTICATED, but log one
    `auth.rejected` line, not one each: anyone reaching the port could flood the log."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    gw = await start_gateway(secure_config(upstream.base_url))
    for number in range(50):
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(f"wrong-{number}")))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    rejected = [r for r in caplog.records if r.getMessage() == "auth.rejected"]
    assert [(r.levelname, getattr(r, "suppressed", None)) for r in rejected] == [("INFO", 0)]
    assert upstream.requests == []


async def test_an_over_long_key_is_logged_as_a_rejection(upstream, start_gateway, caplog):
    """A key over 512 characters, refused without a lookup, is logged `auth.rejected` by
    its SHA-256 prefix, never itself, and counted in the lines' throttling as any unknown
    key is. Before, it was refused without a line: unknown keys went unseen in the log."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    gw = await start_gateway(secure_config(upstream.base_url))
    huge = ["k" * 5000, "j" * 513]
    for key in huge:
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(key)))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    await gw.server.stop(grace_s=0)  # tells the one left out
    assert _rejection_lines(caplog) == [(hash_key(huge[0])[:8], 0), (hash_key(huge[1])[:8], 0)]
    assert not any("k" * 100 in r.getMessage() + repr(r.__dict__) for r in caplog.records)


def _rejection_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    """Each `auth.rejected` line as (its key's SHA-256 prefix, `suppressed`)."""
    return [
        (r.key_sha256_prefix, r.suppressed)
        for r in caplog.records
        if r.getMessage() == "auth.rejected"
    ]


def _rejection_timers() -> list[asyncio.Task[Any]]:
    """The tasks of the gateway's `auth.rejected` timer still running."""
    return [t for t in asyncio.all_tasks() if "RejectedCallerKeys" in repr(t.get_coro())]


async def _refuse_unknown_keys(gw: Any, count: int) -> list[str]:
    """`count` calls with unknown keys, each UNAUTHENTICATED; the keys' SHA-256 prefixes."""
    keys = [f"wrong-{number}" for number in range(count)]
    for key in keys:
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(key)))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    return [hash_key(key)[:8] for key in keys]


async def test_unknown_keys_left_out_are_told_as_their_interval_ends(
    upstream, start_gateway, caplog
):
    """Rejections left out of the log are told when their interval ends, with no
    rejection after them to carry the count: the line names the last of them, and
    `suppressed` the others. The timer that waited for it is gone once it has told them.

    Before, their count waited for the next rejection, and was never logged without one."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    gw = await start_gateway(
        secure_config(upstream.base_url, auth={"rejected_log_interval_s": 0.2})
    )
    prefixes = await _refuse_unknown_keys(gw, 4)
    assert await settle(lambda: len(_rejection_lines(caplog)) == 2)
    assert _rejection_lines(caplog) == [(prefixes[0], 0), (prefixes[3], 2)]
    assert await settle(lambda: not _rejection_timers())


async def test_unknown_keys_left_out_are_told_as_the_gateway_stops(upstream, start_gateway, caplog):
    """Rejections left out within the minute of the line before are told as the gateway
    stops, which leaves no timer task behind."""
    caplog.set_level(logging.INFO, logger="llm_gateway.auth")
    gw = await start_gateway(secure_config(upstream.base_url))
    prefixes = await _refuse_unknown_keys(gw, 3)
    assert _rejection_lines(caplog) == [(prefixes[0], 0)]
    assert _rejection_timers()  # waiting for the minute's end
    await gw.server.stop(grace_s=0)
    assert _rejection_lines(caplog) == [(prefixes[0], 0), (prefixes[2], 1)]
    assert not _rejection_timers()


async def test_valid_key_is_served_with_the_provider_key_not_the_callers(upstream, start_gateway):
    """The caller's key authenticates the call and is never forwarded upstream."""
    gw = await start_gateway(secure_config(upstream.base_url))
    response = await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))
    assert response.content == "Hello from fake"
    (sent,) = upstream.requests
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert CALLER_KEY_A not in repr(sent.headers) + repr(sent.body)


async def test_an_override_on_a_tenant_named_by_a_number_keeps_its_file_entry(
    upstream, start_gateway
):
    """`LLM_GATEWAY__TENANTS__4711__...` adds to the entry of tenant 4711, which YAML reads
    as a number. Before, the override made a second entry "4711" that replaced the file's:
    the tenant lost its model list (and its other limits) without a word."""
    data = gateway_config_data(
        upstream.base_url,
        auth={"mode": "keys", "keys": [{"sha256": hash_key(CALLER_KEY_A), "tenant": "4711"}]},
        tenants={4711: {"allowed_models": ["another-model"]}},
    )
    environ = {"LLM_GATEWAY__TENANTS__4711__TOKENS_PER_MINUTE": "100000"}
    gw = await start_gateway(parse_config(data, source="<test>", environ=environ))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstream.requests == []


@pytest.mark.parametrize("tenant", ["007", "no", "0x1F", "null"])
async def test_a_tenant_whose_name_yaml_reads_as_another_value_keeps_its_limits(
    upstream, start_gateway, tmp_path, tenant
):
    """A tenant written `007:` (or `no:`, `0x1F:`, `null:`) in the config file is the
    tenant `keys create --tenant 007` issues keys for. Before, YAML 1.1 read the name as
    7 (false, 31, None): the limits went to a tenant "7" no key names, and the key's
    tenant could use every model without a word."""
    (tmp_path / "keys").write_text(f"{hash_key(CALLER_KEY_A)} {tenant}\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:0'}}\nlocal_model: {{enabled: never}}\n"
        f"upstreams: [{{name: up0, base_url: '{upstream.base_url}', models: [{FAKE_MODEL}]}}]\n"
        f"auth: {{mode: keys, keys_file: '{tmp_path / 'keys'}'}}\n"
        f"tenants:\n  {tenant}: {{allowed_models: [another-model]}}\n"
    )
    gw = await start_gateway(load_config(path))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstream.requests == []


@pytest.mark.parametrize("names", [("007", "7"), ("7", "007"), ("no", "false")])
async def test_two_tenants_yaml_reads_as_one_value_each_keep_their_limits(
    upstream, start_gateway, tmp_path, names
):
    """Tenants `007:` and `7:` in one file are two tenants, each with its own limits.
    Before, YAML read both names as 7 and kept the later entry alone: the other tenant
    lost its model list (and limits, budget) without a word."""
    first, second = names
    (tmp_path / "keys").write_text(
        f"{hash_key(CALLER_KEY_A)} {first}\n{hash_key(CALLER_KEY_B)} {second}\n"
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:0'}}\nlocal_model: {{enabled: never}}\n"
        f"upstreams: [{{name: up0, base_url: '{upstream.base_url}', models: [{FAKE_MODEL}]}}]\n"
        f"auth: {{mode: keys, keys_file: '{tmp_path / 'keys'}'}}\n"
        f"tenants:\n  {first}: {{allowed_models: [another-model]}}\n"
        f"  {second}: {{allowed_models: [another-model]}}\n"
    )
    gw = await start_gateway(load_config(path))
    for key in (CALLER_KEY_A, CALLER_KEY_B):
        error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(key)))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstream.requests == []


@pytest.mark.parametrize("tenant", ["007", "0x1F", "1.10", ".inf"])
@pytest.mark.parametrize("is_in_environment", [False, True], ids=["file", "variable"])
async def test_a_config_key_of_a_tenant_yaml_reads_as_a_number_names_it_as_written(
    upstream, start_gateway, tmp_path, tenant, is_in_environment
):
    """`auth.keys`' `tenant: 007`, in the file or an `LLM_GATEWAY__AUTH__KEYS` variable,
    names the tenant `007`, whose `007:` entry holds its limits, as a keys file's line
    would: not a tenant "7". So does `tenant: 1.10`: before, it named a tenant "1.1",
    whose key could use every model its `1.10:` entry left out."""
    keys = f"[{{sha256: {hash_key(CALLER_KEY_A)}, tenant: {tenant}}}]"
    environ = {"LLM_GATEWAY__AUTH__KEYS": keys} if is_in_environment else {}
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:0'}}\nlocal_model: {{enabled: never}}\n"
        f"upstreams: [{{name: up0, base_url: '{upstream.base_url}', models: [{FAKE_MODEL}]}}]\n"
        f"auth: {{mode: keys, keys: {'[]' if is_in_environment else keys}}}\n"
        f"tenants:\n  {tenant}: {{allowed_models: [another-model]}}\n"
    )
    gw = await start_gateway(load_config(path, environ=environ))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=bearer(CALLER_KEY_A)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"tenant '{tenant}'" in (error.details() or "")
    assert upstream.requests == []


async def test_model_outside_the_tenants_list_is_permission_denied(upstream, start_gateway):
    """A valid key asking for a model its tenant may not use gets PERMISSION_DENIED."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"allowed_models": ["fake-model"]}, "team-b": {"allowed_models": ["x"]}},
    )
    gw = await start_gateway(config)
    error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-b")))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "PERMISSION_DENIED"
    stream = await stream_error(gw.stub.CompleteStream(chat_stream(), metadata=as_tenant("team-b")))
    assert stream.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstream.requests == []
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    seen_b = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant("team-b"))
    seen_a = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant("team-a"))
    assert [m.name for m in seen_b.models] == []
    assert [m.name for m in seen_a.models] == ["fake-model"]


async def test_list_models_shows_the_calls_in_flight_only_to_those_who_may_see_every_tenant(
    upstream, start_gateway
):
    """An upstream's `in_flight` counts every tenant's calls, so ListModels shows it to an
    admin tenant, and with auth off, and as 0 to other tenants, who would otherwise watch
    each other's load; its health is shown to all."""
    tenants = {"team-a": {}, "team-b": {"is_admin": True}}
    gw = await start_gateway(secure_config(upstream.base_url, tenants=tenants))
    call = await _call_in_progress(gw, upstream, "team-b")
    seen = {}
    for tenant in ("team-a", "team-b"):
        listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant(tenant))
        seen[tenant] = [(u.health, u.in_flight) for m in listed.models for u in m.upstreams]
    assert seen == {
        "team-a": [(pb.UPSTREAM_HEALTH_HEALTHY, 0)],
        "team-b": [(pb.UPSTREAM_HEALTH_HEALTHY, 1)],
    }
    assert (await call).content
    open_gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.script(Reply(delay_s=1.0))
    call = asyncio.ensure_future(open_gateway.stub.Complete(chat()))
    for _ in range(1000):  # up to 10 s for the call to reach the upstream
        if len(upstream.requests) == 2:
            break
        await asyncio.sleep(0.01)
    listed = await open_gateway.stub.ListModels(pb.ListModelsRequest())
    assert [u.in_flight for m in listed.models for u in m.upstreams] == [1]
    assert (await call).content


async def test_with_keys_optional_a_keyed_tenant_sees_no_load_where_a_keyless_caller_does(
    upstream, start_gateway
):
    """`auth.mode: off` with keys configured: a caller with a valid key is its tenant and
    sees `in_flight` as 0; one without a key, or with an unknown one, is served as
    `default`, who may read every tenant's usage, and sees the load (as the README says)."""
    gw = await start_gateway(secure_config(upstream.base_url, auth={"mode": "off"}))
    call = await _call_in_progress(gw, upstream, "team-a")
    seen = {}
    for who, metadata in (
        ("team-b", as_tenant("team-b")),
        ("no key", ()),
        ("unknown key", (("authorization", "Bearer not-a-key-of-anyone"),)),
    ):
        listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        seen[who] = [u.in_flight for m in listed.models for u in m.upstreams]
    assert seen == {"team-b": [0], "no key": [1], "unknown key": [1]}
    assert (await call).content


async def test_tenants_without_an_entry_each_get_the_any_tenant_limits_on_their_own(
    upstream, start_gateway
):
    """`tenants: {"*": ...}` gives each tenant without its own entry those limits, with
    its own bucket: two unlisted tenants each pass "*"'s requests_per_minute, and each is
    refused past it, the refusal naming it. Before, "*" was not a tenant name (a config
    error), and an unlisted tenant had no limits at all."""
    gw = await start_gateway(
        secure_config(upstream.base_url, tenants={"*": {"requests_per_minute": 2}})
    )
    for tenant in ("team-a", "team-b"):
        for _ in range(2):
            assert (await gw.stub.Complete(chat(), metadata=as_tenant(tenant))).content
        error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant(tenant)))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == f"tenant:{tenant}:requests_per_minute"
        assert detail(error, error_details_pb2.RetryInfo).retry_delay.seconds > 0
    assert len(upstream.requests) == 4


async def test_a_listed_tenant_keeps_its_entry_and_the_others_get_the_any_tenant_models(
    upstream, start_gateway
):
    """A tenant with its own entry is held to it alone, never to "*"'s; an unlisted one
    may use only "*"'s models: another is PERMISSION_DENIED, in calls and streams, and
    ListModels shows it only those."""
    config = secure_config(
        upstream.base_url,
        tenants={
            "*": {"allowed_models": ["another-model"], "requests_per_minute": 1},
            "team-b": {},
        },
    )
    gw = await start_gateway(config)
    error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert detail(error, error_details_pb2.ErrorInfo).reason == "PERMISSION_DENIED"
    stream = await stream_error(gw.stub.CompleteStream(chat_stream(), metadata=as_tenant("team-a")))
    assert stream.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstream.requests == []
    for _ in range(3):
        assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-b"))).content
    seen_a = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant("team-a"))
    seen_b = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=as_tenant("team-b"))
    assert [m.name for m in seen_a.models] == []
    assert [m.name for m in seen_b.models] == [FAKE_MODEL]


async def test_a_batch_item_naming_a_model_the_tenant_may_not_use_fails_alone(
    upstream, start_gateway
):
    """In a batch, an item whose model its tenant may not use fails with its own
    PERMISSION_DENIED, and the other items run: one item's failure never fails the others.
    It makes no upstream call, so it does not count against the tenant's request limit.

    Before, the whole batch was refused up front, the allowed items with it.
    """
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"allowed_models": [FAKE_MODEL], "requests_per_minute": 1}},
    )
    gw = await start_gateway(config)
    batch = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(id="allowed", request=chat()),
            pb.BatchItem(id="forbidden", request=chat(model="other-model")),
        ]
    )
    events = [e async for e in gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"))]
    results = {e.result.id: e.result for e in events if e.HasField("result")}
    assert results["allowed"].response.content
    refused = results["forbidden"].error
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "may not use model 'other-model'" in refused.message
    summary = events[-1].summary
    assert (summary.succeeded, summary.failed) == (1, 1)
    assert len(upstream.requests) == 1


async def test_a_huge_model_name_is_permission_denied_with_a_short_status(upstream, start_gateway):
    """A 100 KB model name a tenant may not use is quoted in part, so the status fits.

    The name is checked against the tenant's models before the request is validated; echoed
    whole, it would overflow the trailers a gRPC client accepts (8-16 KiB).
    """
    config = secure_config(upstream.base_url, tenants={"team-a": {"allowed_models": ["x"]}})
    gw = await start_gateway(config)
    huge = "m" * 100_000
    unary = await rpc_error(gw.stub.Complete(chat(model=huge), metadata=as_tenant("team-a")))
    stream = await stream_error(
        gw.stub.CompleteStream(chat_stream(model=huge), metadata=as_tenant("team-a"))
    )
    for error in (unary, stream):
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert detail(error, error_details_pb2.ErrorInfo).reason == "PERMISSION_DENIED"
        assert error.details() == f"tenant 'team-a' may not use model {'m' * 100!r}..."
    assert upstream.requests == []


async def test_tenant_over_its_request_limit_is_refused_while_another_is_served(
    upstream, start_gateway
):
    """team-a's third call in a minute is refused with quota details; team-b is unaffected."""
    config = secure_config(
        upstream.base_url, tenants={"team-a": {"requests_per_minute": 2}, "team-b": {}}
    )
    gw = await start_gateway(config)
    for _ in range(2):
        await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))
    error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "tenant:team-a:requests_per_minute"
    retry = detail(error, error_details_pb2.RetryInfo).retry_delay
    # One request refills in 60 s / 2 = 30 s.
    assert 20 <= retry.seconds + retry.nanos / 1e9 <= 31
    assert 20_000 <= int(trailer(error, RETRY_PUSHBACK_TRAILER) or 0) <= 31_000
    # A tenant's limit is not this replica's to lift: a proxy must not try another.
    assert trailer(error, RETRY_ELSEWHERE_TRAILER) is None
    stream = await stream_error(gw.stub.CompleteStream(chat_stream(), metadata=as_tenant("team-a")))
    assert stream.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(5):
        assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-b"))).content
    assert len(upstream.requests) == 2 + 5


async def test_tenant_over_its_token_limit_is_refused(upstream, start_gateway):
    """Tokens per minute count the prompt estimate plus max_tokens; a big ask is refused."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"tokens_per_minute": 200}})
    gw = await start_gateway(config)
    ask = chat("hello", params=pb.GenerationParams(max_tokens=120))
    await gw.stub.Complete(ask, metadata=as_tenant("team-a"))
    error = await rpc_error(gw.stub.Complete(ask, metadata=as_tenant("team-a")))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    subject = detail(error, error_details_pb2.QuotaFailure).violations[0].subject
    assert subject == "tenant:team-a:tokens_per_minute"
    huge = chat("hello", params=pb.GenerationParams(max_tokens=500))
    never = await rpc_error(gw.stub.Complete(huge, metadata=as_tenant("team-a")))
    assert never.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "can never fit" in (never.details() or "")
    assert len(upstream.requests) == 1


async def test_a_call_that_can_never_fit_a_tenant_limit_tells_retry_policies_not_to_retry(
    upstream, start_gateway, caplog
):
    """A call larger than a whole minute's allowance fails the same however long the
    caller waits: its status says "do not retry" (pushback -1), so a channel with the
    shipped retry policy, which retries RESOURCE_EXHAUSTED, asks once, not five times.

    Before, the refusal carried no pushback and the channel retried it four more times."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"tokens_per_minute": 200}})
    gw = await start_gateway(config)
    huge = chat("hello", params=pb.GenerationParams(max_tokens=500))
    never = await rpc_error(gw.stub.Complete(huge, metadata=as_tenant("team-a")))
    assert never.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailer(never, RETRY_PUSHBACK_TRAILER) == "-1"
    options = [("grpc.service_config", SERVICE_CONFIG.read_text()), ("grpc.enable_retries", 1)]
    caplog.clear()
    with caplog.at_level("DEBUG", logger="llm_gateway.rpc"):
        async with grpc.aio.insecure_channel(gw.server.address, options=options) as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            retried = await rpc_error(stub.Complete(huge, metadata=as_tenant("team-a"), timeout=15))
    assert retried.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    refusals = [r for r in caplog.records if r.getMessage() == "rpc.failed"]
    assert len(refusals) == 1
    assert upstream.requests == []


async def test_a_call_that_can_never_fit_is_told_so_while_its_tenant_is_at_its_call_cap(
    upstream, start_gateway
):
    """A call larger than a whole minute's tokens, sent while its tenant's calls fill its
    `max_concurrent_calls`, is told "do not retry" (pushback -1) at once, as the Redis
    limiter tells it: waiting for a slot would not make it fit.

    Before, the in-memory limiter refused it for the cap, with a retry in 1 s, and the
    shipped retry policy sent it again to be refused for good."""
    tenants = {"team-a": {"max_concurrent_calls": 1, "tokens_per_minute": 200}}
    gw = await start_gateway(secure_config(upstream.base_url, tenants=tenants))
    first = await _call_in_progress(gw, upstream, "team-a")
    huge = chat("hello", params=pb.GenerationParams(max_tokens=500))
    never = await rpc_error(gw.stub.Complete(huge, metadata=as_tenant("team-a")))
    assert never.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    subject = detail(never, error_details_pb2.QuotaFailure).violations[0].subject
    assert subject == "tenant:team-a:tokens_per_minute"
    assert trailer(never, RETRY_PUSHBACK_TRAILER) == "-1"
    assert (await first).content
    assert len(upstream.requests) == 1


async def test_tenant_concurrency_limit_refuses_extra_calls_and_frees_slots(
    upstream, start_gateway
):
    """With max_concurrent_calls 1, a second call while one runs is refused; then it passes."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"max_concurrent_calls": 1}})
    gw = await start_gateway(config)
    first = await _call_in_progress(gw, upstream, "team-a")
    error = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    subject = detail(error, error_details_pb2.QuotaFailure).violations[0].subject
    assert subject == "tenant:team-a:max_concurrent_calls"
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-b"))).content
    assert (await first).content
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content


async def test_a_batch_runs_no_more_upstream_calls_at_once_than_its_tenant_may(start_gateway):
    """Each of a batch's ten upstream calls takes one of team-a's two call slots: asked
    to run them all at once, it runs two at a time; team-b, unlimited, runs ten."""

    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="ok", delay_s=0.2)
    ) as scripted:
        config = secure_config(
            scripted.base_url, tenants={"team-a": {"max_concurrent_calls": 2}, "team-b": {}}
        )
        gw = await start_gateway(config)
        batch = pb.CompleteBatchRequest(
            items=[pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(10)],
            concurrency=10,
        )
        for tenant, peak in (("team-a", 2), ("team-b", 10)):
            scripted.peak_in_flight = 0
            events = [e async for e in gw.stub.CompleteBatch(batch, metadata=as_tenant(tenant))]
            assert events[-1].summary.succeeded == 10
            assert scripted.peak_in_flight == peak


def _batch_of(name: str, items: int) -> pb.CompleteBatchRequest:
    """`items` distinct prompts (no two share an answer from the cache), all at once."""
    return pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"{name}-{i}", request=chat(f"{name} q{i}")) for i in range(items)],
        concurrency=items,
    )


async def test_a_tenants_batches_together_run_no_more_upstream_calls_than_its_cap(
    start_gateway,
):
    """Three batches of team-a (two calls at once), each asking for four at once, run two
    upstream calls at once between them, and every item succeeds; meanwhile a plain call
    of team-a is refused at once for its cap, as before.

    Before, each batch held one slot for all its items and ran up to the cap itself: two
    batches ran four calls at once, and the third was refused whole."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="ok", delay_s=0.05)
    ) as scripted:
        config = secure_config(scripted.base_url, tenants={"team-a": {"max_concurrent_calls": 2}})
        gw = await start_gateway(config)
        scripted.gate.clear()  # the upstream holds every call until the plain one is sent
        batches = [
            asyncio.ensure_future(
                collect_events(gw.stub.CompleteBatch(_batch_of(n, 4), metadata=as_tenant("team-a")))
            )
            for n in ("b0", "b1", "b2")
        ]
        await scripted.wait_until(lambda: scripted.in_flight == 2)
        refused = await rpc_error(gw.stub.Complete(chat("plain"), metadata=as_tenant("team-a")))
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        subject = detail(refused, error_details_pb2.QuotaFailure).violations[0].subject
        assert subject == "tenant:team-a:max_concurrent_calls"
        assert detail(refused, error_details_pb2.RetryInfo).retry_delay.seconds == 1
        scripted.gate.set()
        for events in await asyncio.gather(*batches):
            assert (events[-1].summary.succeeded, events[-1].summary.failed) == (4, 0)
    assert scripted.peak_in_flight == 2
    assert scripted.finished == 12


async def test_batches_cancelled_while_their_items_wait_for_slots_leave_none_held(
    start_gateway,
):
    """team-a may run one call at a time: of two batches, one item holds the slot and
    three wait in line for it when both callers cancel. The waiting items leave the line,
    the running one's upstream request is closed and its slot given back: team-a's next
    call is served, not refused for a slot nobody uses.

    Before, the second batch was refused whole for the slot the first held."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="ok")
    ) as scripted:
        config = secure_config(scripted.base_url, tenants={"team-a": {"max_concurrent_calls": 1}})
        gw = await start_gateway(config)
        scripted.gate.clear()
        calls = [
            gw.stub.CompleteBatch(_batch_of(name, 2), metadata=as_tenant("team-a"))
            for name in ("b0", "b1")
        ]
        batches = [asyncio.ensure_future(collect_events(call)) for call in calls]
        await scripted.wait_until(lambda: scripted.in_flight == 1)
        await asyncio.sleep(0.1)  # time for a batch refused whole to be told so
        for call in calls:
            call.cancel()
        for batch in batches:
            with pytest.raises(asyncio.CancelledError):
                await batch
        await scripted.wait_until(lambda: scripted.in_flight == 0)
        scripted.gate.set()
        answer = await gw.stub.Complete(chat("after"), metadata=as_tenant("team-a"), timeout=10)
        assert answer.content == "ok"
    # The running item, and at most one more: the first cancel to land may free the slot
    # for the other batch's first waiting item before that batch's own cancel lands.
    assert 2 <= len(scripted.requests) <= 3
    assert scripted.requests[-1].body["messages"][-1]["content"] == "after"


async def test_a_slot_given_back_as_an_item_is_refused_for_the_cap_is_taken_at_once(
    start_gateway, monkeypatch
):
    """team-a may run one call at a time. A batch item is refused for its cap while a
    plain call holds the slot, and that call gives it back before the item starts waiting
    (the refusal's reply and the item's wake-up are loop turns apart): the item takes the
    slot at once and runs.

    Before, the slot given back woke no one, and the item waited for another one to its
    deadline (here the batch's, 5 s), then failed for a cap nobody held; without a
    deadline it waited for good."""
    refused, slot_free = asyncio.Event(), asyncio.Event()
    take_turn = service.tenant_limits.MemoryTenantLimiter.take_turn

    async def refused_as_the_slot_frees(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await take_turn(self, *args, **kwargs)
        except QuotaExceeded as refusal:
            if is_over_call_cap(refusal) and not refused.is_set():
                refused.set()
                await slot_free.wait()  # the plain call gives its slot back now
            raise

    monkeypatch.setattr(
        service.tenant_limits.MemoryTenantLimiter, "take_turn", refused_as_the_slot_frees
    )
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="ok")
    ) as scripted:
        config = secure_config(scripted.base_url, tenants={"team-a": {"max_concurrent_calls": 1}})
        gw = await start_gateway(config)
        scripted.gate.clear()
        plain = asyncio.ensure_future(gw.stub.Complete(chat("plain"), metadata=as_tenant("team-a")))
        await scripted.wait_until(lambda: scripted.in_flight == 1)
        batch = asyncio.ensure_future(
            collect_events(
                gw.stub.CompleteBatch(_batch_of("b", 1), metadata=as_tenant("team-a"), timeout=5)
            )
        )
        await refused.wait()
        scripted.gate.set()
        assert (await plain).content == "ok"
        limiter = gw.server.tenant_limiter
        assert isinstance(limiter, service.tenant_limits.MemoryTenantLimiter)
        assert await settle(lambda: limiter.in_flight("team-a") == 0)
        slot_free.set()
        events = await batch
    assert (events[-1].summary.succeeded, events[-1].summary.failed) == (1, 0)


async def collect_events(call: Any) -> list[pb.CompleteBatchResponse]:
    """Every message of a batch call."""
    return [event async for event in call]


async def test_a_batch_larger_than_a_minutes_allowance_runs_at_its_tenants_rate(
    upstream, start_gateway
):
    """13 items for a tenant allowed 12 requests a minute: 12 start at once and the last
    5 s later, when the bucket has refilled; the batch uses up the tenant's minute (the
    call after it is refused: the next request refills 5 s after the last item's, a
    margin a loaded machine keeps, where at 60 a minute its 1 s was not).

    Before, the batch took every item's request up front and was refused as a call that
    could never fit (pushback -1), so no batch larger than a minute's allowance ran."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"requests_per_minute": 12}},
        batch={"rate_left_to_other_calls": 0},  # the whole minute to the batch
    )
    gw = await start_gateway(config)
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(13)]
    )
    events = [e async for e in gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"))]
    summary = events[-1].summary
    assert (summary.succeeded, summary.failed) == (13, 0)
    assert len(upstream.requests) == 13
    after = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert after.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_paced_batch_leaves_a_share_of_its_tenants_minute_to_other_calls(
    upstream, start_gateway
):
    """A batch paced by its tenant's 10 requests a minute leaves a fifth of them
    (`batch.rate_left_to_other_calls`) to the tenant's other calls: its eighth item waits
    for the bucket to hold three requests, past the batch's deadline, while two unary
    calls of the tenant still pass. Before, the batch took all ten and each refill as it
    came, refusing the tenant's other calls for as long as it ran."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"requests_per_minute": 10}},
        batch={"rate_left_to_other_calls": 0.2},
    )
    gw = await start_gateway(config)
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(9)],
        concurrency=1,
    )
    call = gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=3)
    events = [e async for e in call]
    summary = events[-1].summary
    assert (summary.succeeded, summary.failed) == (8, 1)
    (refused,) = (e.result for e in events if e.HasField("result") and e.result.HasField("error"))
    assert "20% of it kept for the tenant's other calls" in refused.error.message
    for _ in range(2):
        assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    assert len(upstream.requests) == 10


async def rpc_error_or_response(call: Any) -> Any:
    """The call's response, or the `AioRpcError` it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error


def _item_detail(status, message_type):
    """The detail of `message_type` in a batch item's google.rpc.Status."""
    for item in status.details:
        found = message_type()
        if item.Unpack(found):
            return found
    raise AssertionError(f"no {message_type.__name__} in {status}")


async def test_batch_items_the_tenants_limits_cannot_take_fail_alone(upstream, start_gateway):
    """An item whose turn under requests_per_minute comes after the call's deadline
    fails at once with RESOURCE_EXHAUSTED and when to retry, and one larger than a
    minute's tokens fails for good; the other items run, and the batch ends with its
    summary, not at its deadline."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"requests_per_minute": 3, "tokens_per_minute": 200}},
        batch={"rate_left_to_other_calls": 0},
    )
    gw = await start_gateway(config)
    huge = chat("big", params=pb.GenerationParams(max_tokens=500))
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id="huge", request=huge)]
        + [pb.BatchItem(id=f"item-{i}", request=chat(f"q{i}")) for i in range(4)],
        concurrency=1,
    )
    call = gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=10)
    events = [e async for e in call]
    results = {e.result.id: e.result for e in events if e.HasField("result")}
    never = results.pop("huge").error
    assert never.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "can never fit" in never.message
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in never.details)
    late = results.pop("item-3").error
    assert late.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    quota = _item_detail(late, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "tenant:team-a:requests_per_minute"
    assert _item_detail(late, error_details_pb2.RetryInfo).retry_delay.seconds >= 19
    assert all(r.response.content for r in results.values())
    summary = events[-1].summary
    assert (summary.succeeded, summary.failed) == (3, 2)
    assert len(upstream.requests) == 3


async def test_batch_items_that_make_no_upstream_call_take_nothing_from_the_limits(
    upstream, start_gateway
):
    """An invalid item (empty text) and one naming a model no upstream serves fail alone
    and take none of the tenant's requests_per_minute, as one its tenant may not use:
    the one valid item after them still gets the minute's only request."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"requests_per_minute": 1}})
    gw = await start_gateway(config)
    batch = pb.CompleteBatchRequest(
        items=[
            pb.BatchItem(id="empty", request=chat("")),
            pb.BatchItem(id="unknown", request=chat(model="no-such-model")),
            pb.BatchItem(id="valid", request=chat()),
        ],
        concurrency=1,
    )
    call = gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a"), timeout=10)
    results = {e.result.id: e.result for e in [e async for e in call] if e.HasField("result")}
    assert results["empty"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results["unknown"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results["valid"].response.content == "Hello from fake"
    assert len(upstream.requests) == 1


async def test_calls_refused_before_any_upstream_call_take_nothing_from_the_limits(
    upstream, start_gateway
):
    """An invalid Complete, CompleteStream and Summarize (its document or its labels),
    and a call naming a model no upstream serves, are refused as such and take none of
    the tenant's requests_per_minute, as a batch's invalid items take none: the valid
    call after them still gets the minute's only request.

    Before, each took the minute's request before it was refused, and the valid call
    then got RESOURCE_EXHAUSTED."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"requests_per_minute": 1}})
    gw = await start_gateway(config)
    team_a = as_tenant("team-a")
    nan = chat(params=pb.GenerationParams(temperature=float("nan")))
    document = pb.SummarizeRequest(model=FAKE_MODEL, document="a\x00b")
    labelled = pb.SummarizeRequest(model=FAKE_MODEL, document="text", labels={"bad key!": "v"})
    refusals = [
        (lambda: rpc_error(gw.stub.Complete(nan, metadata=team_a)), "params.temperature"),
        (lambda: rpc_error(gw.stub.Complete(chat(model="nope"), metadata=team_a)), None),
        (
            lambda: stream_error(gw.stub.CompleteStream(chat_stream(""), metadata=team_a)),
            "messages[0].content",
        ),
        (lambda: rpc_error(gw.stub.Summarize(document, metadata=team_a)), "document"),
        (lambda: rpc_error(gw.stub.Summarize(labelled, metadata=team_a)), "labels['bad key!']"),
    ]
    for refuse, field in refusals:
        error = await refuse()
        if field is None:
            assert error.code() is grpc.StatusCode.NOT_FOUND
        else:
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            violations = detail(error, error_details_pb2.BadRequest).field_violations
            assert [v.field for v in violations] == [field]
    assert (await gw.stub.Complete(chat(), metadata=team_a)).content == "Hello from fake"
    assert len(upstream.requests) == 1


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limits_auth(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The auth section's extra keys: tenant limits in memory, or in a real Redis."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_server").url}


async def test_calls_their_tenants_budget_refuses_take_nothing_from_its_limits(
    upstream, start_gateway, limits_auth
):
    """A Complete and a CompleteStream that team-a's budget refuses (each expected to cost
    more than the whole budget) make no upstream call and take none of its
    requests_per_minute or tokens_per_minute, in memory and in Redis alike: each is told
    the budget's refusal (do not retry), and the minute's two requests and its tokens
    still serve the two small calls after them.

    Before, each refused call took a request and its tokens: the third was refused for
    requests_per_minute (retry in 30 s) instead of the budget, and the small calls after
    them were refused too."""
    config = secure_config(
        upstream.base_url,
        auth=limits_auth,
        tenants={"team-a": {"requests_per_minute": 2, "tokens_per_minute": 1000}},
        budgets={"team-a": {"usd": 0.0001, "period": "day"}},
        models={
            FAKE_MODEL: {
                "context_window": 4096,
                "input_usd_per_million": 1,
                "output_usd_per_million": 1,
            }
        },
    )
    gw = await start_gateway(config)
    team_a = as_tenant("team-a")
    costly = "word " * 150  # about 150 tokens of $1 a million: past the $0.0001 budget
    refusals = [
        lambda: rpc_error(gw.stub.Complete(chat(costly), metadata=team_a)),
        lambda: stream_error(gw.stub.CompleteStream(chat_stream(costly), metadata=team_a)),
        lambda: rpc_error(gw.stub.Complete(chat(costly), metadata=team_a)),
    ]
    for refuse in refusals:  # one after another: a call starts as it is made
        error = await refuse()
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "tenant:team-a"
        assert "can never fit tenant 'team-a''s $0.000100 daily budget" in (error.details() or "")
        assert trailer(error, RETRY_PUSHBACK_TRAILER) == "-1"
    for _ in range(2):
        assert (await gw.stub.Complete(chat("hi"), metadata=team_a)).content == "Hello from fake"
    assert len(upstream.requests) == 2


async def test_batch_items_and_summaries_their_tenants_budget_refuses_take_nothing_from_its_limits(
    upstream, start_gateway, limits_auth
):
    """A batch's items and a Summarize's part that team-a's budget refuses make no
    upstream call and give back the request and tokens their turns took: each item fails
    alone with the budget's refusal, and team-a's minute still holds the two plain calls
    after them and all their tokens.

    Before, each took its share of the minute: the second item was refused for
    requests_per_minute, and so were the plain calls after the batch."""
    tokens_per_minute = 2000
    config = secure_config(
        upstream.base_url,
        auth=limits_auth,
        tenants={"team-a": {"requests_per_minute": 3, "tokens_per_minute": tokens_per_minute}},
        budgets={"team-a": {"usd": 0.0001, "period": "day"}},
        models={
            FAKE_MODEL: {
                "context_window": 4096,
                "input_usd_per_million": 1,
                "output_usd_per_million": 0,  # the large max_tokens below costs nothing
            }
        },
    )
    gw = await start_gateway(config)
    team_a = as_tenant("team-a")
    costly = "word " * 150  # about 150 tokens of $1 a million: past the $0.0001 budget
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=chat(f"{costly}{i}")) for i in range(3)],
        concurrency=1,
    )
    events = [e async for e in gw.stub.CompleteBatch(batch, metadata=team_a, timeout=10)]
    for result in (e.result for e in events if e.HasField("result")):
        assert result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "daily budget" in result.error.message
    summary = pb.SummarizeRequest(model=FAKE_MODEL, document=costly)
    refused = await rpc_error(gw.stub.Summarize(summary, metadata=team_a, timeout=10))
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "daily budget" in (refused.details() or "")
    # The whole minute's tokens but the estimate of "hi" (and a few to spare).
    whole_minute = pb.GenerationParams(max_tokens=tokens_per_minute - 20)
    assert (await gw.stub.Complete(chat("hi", params=whole_minute), metadata=team_a)).content
    assert (await gw.stub.Complete(chat("hi"), metadata=team_a)).content == "Hello from fake"
    assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    ("rpc", "field"),
    [
        ("max_tokens", "params.max_tokens"),
        ("messages", "messages"),
        ("document", "document"),
    ],
)
async def test_an_invalid_field_is_invalid_argument_however_small_the_tenants_limit(
    upstream, start_gateway, rpc, field
):
    """A request whose own field is invalid (a max_tokens past any window, more than
    `max_messages` messages, a document with a NUL) is INVALID_ARGUMENT naming the
    field, as for any tenant, not RESOURCE_EXHAUSTED "do not retry" because its
    tokens could never fit the tenant's tokens_per_minute: no wait would help, a fix
    would."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"tokens_per_minute": 200}})
    gw = await start_gateway(config)
    team_a = as_tenant("team-a")
    if rpc == "max_tokens":
        huge = chat(params=pb.GenerationParams(max_tokens=2**31 - 1))
        error = await rpc_error(gw.stub.Complete(huge, metadata=team_a))
    elif rpc == "messages":
        many = pb.CompleteStreamRequest(
            model=FAKE_MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="hi")] * 1001
        )
        error = await stream_error(gw.stub.CompleteStream(many, metadata=team_a))
    else:
        document = pb.SummarizeRequest(model=FAKE_MODEL, document="Some words.\x00 " * 100)
        error = await rpc_error(gw.stub.Summarize(document, metadata=team_a))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(error, error_details_pb2.BadRequest).field_violations] == [
        field
    ]
    assert upstream.requests == []


async def test_an_invalid_batch_is_invalid_argument_while_its_tenant_is_at_its_call_cap(
    upstream, start_gateway
):
    """A batch refused as a whole (a duplicate item id, a concurrency past the maximum),
    sent while its tenant's only concurrent call is taken, is INVALID_ARGUMENT naming the
    fields, as an invalid Complete is then: not RESOURCE_EXHAUSTED with a RetryInfo,
    which a retry policy would follow only to be refused for the fields once the slot
    was free.

    Before, a batch took its slot before it was checked."""
    config = secure_config(upstream.base_url, tenants={"team-a": {"max_concurrent_calls": 1}})
    gw = await start_gateway(config)
    held = await _call_in_progress(gw, upstream, "team-a", answer_after_s=2.0)
    item = pb.BatchItem(id="same", request=chat())
    batch = pb.CompleteBatchRequest(items=[item, item], concurrency=10**6)
    error = await stream_error(gw.stub.CompleteBatch(batch, metadata=as_tenant("team-a")))
    assert not held.done()  # refused while the tenant's only slot was taken
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == ["concurrency", "items[1].id"]
    assert (await held).content
    assert len(upstream.requests) == 1


async def test_a_metered_summarys_document_is_validated_once(start_gateway, monkeypatch):
    """For a tenant with limits, the caller gate's check validates a Summarize (encoding
    its document and scanning it for control characters) and the handler takes that
    result, as Complete's does: the document is scanned once, and summarised.

    Before, `summarize()` validated it again: twice the scan, a few ms for 2 MiB."""
    document = " ".join(f"Sentence {i} says something." for i in range(50))
    scanned: list[str] = []
    scan = service.summarize.has_control_characters

    def counting(text: str) -> bool:
        if text == document:
            scanned.append(text)
        return scan(text)

    monkeypatch.setattr(service.summarize, "has_control_characters", counting)
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short")
    ) as scripted:
        config = secure_config(scripted.base_url, tenants={"team-a": {"requests_per_minute": 10}})
        gw = await start_gateway(config)
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
        assert summary.summary == "short"
        assert len(scanned) == 1


async def test_far_too_many_messages_of_a_metered_tenant_are_refused_before_any_is_estimated(
    upstream, start_gateway, monkeypatch
):
    """A million and a half empty messages from a tenant with a per-minute limit are
    refused on their count before the gate estimates their tokens, as for any caller.

    Before, the gate estimated every message first (some 3 s on the event loop, every
    other call on the gateway stalled) for a request its check then refused by count."""
    estimated = []
    estimate = service.caller_gate.estimate_text_tokens

    def counting(text: str) -> int:
        estimated.append(1)
        return estimate(text)

    monkeypatch.setattr(service.caller_gate, "estimate_text_tokens", counting)
    config = secure_config(upstream.base_url, tenants={"team-a": {"requests_per_minute": 10}})
    gw = await start_gateway(config)
    raw = gw.channel.unary_unary(
        "/llmgateway.v1.CompletionService/Complete",
        request_serializer=lambda data: data,
        response_deserializer=pb.CompleteResponse.FromString,
    )
    payload = b"\x0a\x0a" + FAKE_MODEL.encode() + b"\x12\x00" * 1_500_000
    error = await rpc_error(raw(payload, metadata=as_tenant("team-a"), timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert violations[0].field == "messages"
    assert violations[0].description.endswith("got 1500000")
    assert len(estimated) < 1000
    assert upstream.requests == []


async def test_a_summary_runs_no_more_upstream_calls_at_once_than_its_tenant_may(start_gateway):
    """The same for the parts of a Summarize: team-a may run one call at a time."""

    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short", delay_s=0.05)
    ) as scripted:
        config = secure_config(
            scripted.base_url,
            tenants={"team-a": {"max_concurrent_calls": 1}, "team-b": {}},
            models=fake_model_window(1024),
            summarize={"concurrency": 4, "default_target_tokens": 64},
        )
        gw = await start_gateway(config)
        document = "\n\n".join(
            " ".join(f"Paragraph {p} sentence {s} says something." for s in range(5))
            for p in range(150)
        )
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        for tenant, peak in (("team-a", 1), ("team-b", 4)):
            scripted.peak_in_flight = 0
            summary = await gw.stub.Summarize(request, metadata=as_tenant(tenant))
            assert summary.upstream_calls > 4
            assert scripted.peak_in_flight == peak


async def test_a_tenants_summaries_and_batches_together_run_no_more_calls_than_its_cap(
    start_gateway,
):
    """Two summaries of team-a (two calls at once), each allowed four calls at once, and a
    batch beside them run two upstream calls at once between them, and all succeed;
    meanwhile a plain call of team-a is refused at once for its cap.

    Before, each summary held one slot and ran up to the cap itself: two summaries ran
    four calls at once, and the batch was refused whole."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short", delay_s=0.02)
    ) as scripted:
        config = secure_config(
            scripted.base_url,
            tenants={"team-a": {"max_concurrent_calls": 2}},
            models=fake_model_window(1024),
            summarize={"concurrency": 4, "default_target_tokens": 64},
        )
        gw = await start_gateway(config)
        scripted.gate.clear()
        summaries = [
            asyncio.ensure_future(
                gw.stub.Summarize(
                    pb.SummarizeRequest(model=FAKE_MODEL, document=_document(name)),
                    metadata=as_tenant("team-a"),
                )
            )
            for name in ("first", "second")
        ]
        batch = asyncio.ensure_future(
            collect_events(gw.stub.CompleteBatch(_batch_of("b", 3), metadata=as_tenant("team-a")))
        )
        await scripted.wait_until(lambda: scripted.in_flight == 2)
        refused = await rpc_error(gw.stub.Complete(chat("plain"), metadata=as_tenant("team-a")))
        subject = detail(refused, error_details_pb2.QuotaFailure).violations[0].subject
        assert subject == "tenant:team-a:max_concurrent_calls"
        scripted.gate.set()
        for summary in await asyncio.gather(*summaries):
            assert summary.summary == "short"
            assert summary.upstream_calls > 4
        assert (await batch)[-1].summary.succeeded == 3
    assert scripted.peak_in_flight == 2


def _document(name: str) -> str:
    """A document of about ten parts in a 1024-token window, its words its own."""
    return "\n\n".join(
        " ".join(f"{name} paragraph {p} sentence {s} says something." for s in range(5))
        for p in range(150)
    )


async def test_a_summary_of_more_than_a_minutes_tokens_takes_them_call_by_call(
    start_gateway,
):
    """A Summarize's calls take the tenant's tokens_per_minute as each starts: a document
    whose estimate, twice over, exceeded team-a's 16,000 tokens a minute was refused for
    good ("can never fit", pushback -1), though its calls fit. Now it runs, and the
    tokens its calls took are gone from the minute: of the 17 completions of 900 tokens a
    fresh minute holds, one of the first 7 is refused."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short")
    ) as scripted:
        config = secure_config(
            scripted.base_url,
            tenants={"team-a": {"tokens_per_minute": 16_000}},
            models=fake_model_window(1024),
            summarize={"default_target_tokens": 64},
        )
        gw = await start_gateway(config)
        document = "\n\n".join(
            " ".join(f"Paragraph {p} sentence {s} says something." for s in range(5))
            for p in range(150)
        )
        assert 2 * estimate_text_tokens(document) > 16_000  # what the gate took, before
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
        assert summary.upstream_calls > 4
        greedy = chat("hi", params=pb.GenerationParams(max_tokens=900))
        outcomes = [
            await rpc_error_or_response(gw.stub.Complete(greedy, metadata=as_tenant("team-a")))
            for _ in range(7)
        ]
        refused = next(o for o in outcomes if isinstance(o, grpc.aio.AioRpcError))
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        quota = detail(refused, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "tenant:team-a:tokens_per_minute"


def _summary_config(base_url: str, tokens_per_minute: int, *, default_target: int = 64) -> Any:
    """team-a under `tokens_per_minute`, a model of a 32K window, parts without overlap."""
    return secure_config(
        base_url,
        tenants={"team-a": {"tokens_per_minute": tokens_per_minute}},
        models=fake_model_window(32_768),
        summarize={"default_target_tokens": default_target, "chunk_overlap_tokens": 0},
        batch={"rate_left_to_other_calls": 0},  # the whole minute to the summary
    )


async def test_a_summary_is_split_into_calls_that_fit_its_tenants_tokens_per_minute(
    start_gateway,
):
    """A document that fits the model's window in one call, but not team-a's 20,000
    tokens a minute, is split into parts that each fit that minute, and runs paced.

    Before, parts were sized to the window only: the one call was refused for good as
    larger than a minute's allowance ("can never fit", pushback -1)."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short")
    ) as scripted:
        gw = await start_gateway(_summary_config(scripted.base_url, 20_000))
        document = "\n\n".join(
            " ".join(f"Paragraph {p} sentence {s} says something." for s in range(5))
            for p in range(270)
        )
        whole_call = part_tokens(
            (document_prompt(target_tokens=64, instructions=""), document), max_tokens=64
        )
        assert 20_000 < whole_call < 30_000  # over the minute, well within the window
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
        assert summary.summary == "short"
        assert summary.chunks >= 2
        assert summary.upstream_calls == len(scripted.requests) == summary.chunks + 1
        for recorded in scripted.requests:
            texts = [m["content"] for m in recorded.body["messages"]]
            assert part_tokens(texts, max_tokens=recorded.body["max_tokens"]) <= 20_000


@pytest.mark.parametrize(
    ("tokens_per_minute", "target_tokens", "answer"),
    [(120, 0, 32), (1500, 1400, 1400)],
    ids=["default target at its floor", "combine"],
)
async def test_a_summary_whose_tenant_minute_holds_no_useful_part_is_refused_up_front(
    start_gateway, tokens_per_minute: int, target_tokens: int, answer: int
):
    """A tokens_per_minute too small for the prompt, an answer and the smallest part (or
    for combining the parts' summaries into the target asked for) is refused for good
    before any part is sent and paid for: RESOURCE_EXHAUSTED on that limit, with
    pushback -1, saying what one call needs. Without a target the default shrinks to a
    quarter of the minute, but not below 32 tokens: a minute that cannot hold that is
    refused, and not told to lower a target it never gave."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short")
    ) as scripted:
        gw = await start_gateway(_summary_config(scripted.base_url, tokens_per_minute))
        document = " ".join(f"Sentence {i} says something." for i in range(100))
        request = pb.SummarizeRequest(
            model=FAKE_MODEL, document=document, target_tokens=target_tokens
        )
        error = await rpc_error(gw.stub.Summarize(request, metadata=as_tenant("team-a")))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"cannot hold one summarising call: its prompt, a {answer}-token answer" in (
            error.details() or ""
        )
        assert ("lower target_tokens" in (error.details() or "")) == bool(target_tokens)
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "tenant:team-a:tokens_per_minute"
        assert trailer(error, RETRY_PUSHBACK_TRAILER) == "-1"
        assert scripted.requests == []


@pytest.fixture
def short_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenant buckets that refill in a fifth of a second: a summary paced by a minute of a
    few hundred tokens takes one call a "minute", and the test need not wait real minutes
    (nor half-second ones: what is paced is the same, only sooner)."""
    monkeypatch.setattr(service.tenant_limits, "_WINDOW_S", 0.2)


async def test_a_summary_without_a_target_takes_one_that_fits_a_small_minute(
    start_gateway, short_minutes
):
    """Without target_tokens, a tenant of 300 tokens a minute gets a target of a quarter
    of that (75), as a small model's window gets a quarter of the window: its parts and
    their combine each fit the minute, and the summary comes back.

    Before, the default stayed at 256 tokens: the combine could not fit the minute, and
    the call was refused for good and told to lower a target_tokens it never gave."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=lambda body: Reply(content="short")
    ) as scripted:
        gw = await start_gateway(_summary_config(scripted.base_url, 300, default_target=256))
        document = " ".join(f"Sentence {i} says something." for i in range(100))
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document)
        summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
        assert summary.summary == "short"
        assert summary.chunks >= 2
        combine = scripted.requests[-1].body
        assert combine["max_tokens"] == 300 // 4
        for recorded in scripted.requests:
            texts = [m["content"] for m in recorded.body["messages"]]
            assert part_tokens(texts, max_tokens=recorded.body["max_tokens"]) <= 300


async def test_a_part_split_again_under_a_small_minute_is_summarised_in_smaller_pieces(
    start_gateway, short_minutes
):
    """Team-a's 182 tokens a minute leave parts exactly the 64 tokens of text a useful
    part needs. The upstream refuses part 3 of 10 (63 tokens) as too long: it is split
    again, and its pieces, whose "Part 3 of 10, piece K" header is longer, take a few
    tokens less text each. The summary completes, every call within the minute.

    Before, the re-split asked the minute for 64 tokens of text beside the longer header
    and failed the call RESOURCE_EXHAUSTED for good, after parts 1 and 2 were paid for."""

    def respond(body: dict[str, Any]) -> Reply | Status:
        if user_text(body).startswith("Part 3 of") and ", piece" not in user_text(body)[:30]:
            return Status(400, body=_TOO_LONG)
        return Reply(content="short")

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as scripted:
        gw = await start_gateway(_summary_config(scripted.base_url, 182))
        document = " ".join(f"Sentence {i} says something." for i in range(70))
        request = pb.SummarizeRequest(model=FAKE_MODEL, document=document, target_tokens=40)
        summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
        assert summary.summary == "short"
        pieces = [r.body for r in scripted.requests if user_text(r.body).startswith("Part 3 of")]
        assert len(pieces) >= 3  # the refused part, then its pieces
        for recorded in scripted.requests:
            texts = [m["content"] for m in recorded.body["messages"]]
            assert part_tokens(texts, max_tokens=recorded.body["max_tokens"]) <= 182


def _full_answer(body: dict[str, Any]) -> Reply:
    """An answer as long as the call's max_tokens allows, by the gateway's estimate."""
    words = ["summary"]
    while estimate_text_tokens(" ".join([*words, "summary"])) <= body["max_tokens"]:
        words.append("summary")
    return Reply(content=" ".join(words))


@pytest.mark.parametrize(("target_tokens", "converges"), [(1300, False), (1230, True)])
async def test_a_summary_whose_combine_cannot_hold_one_part_summary_is_refused_up_front(
    start_gateway, short_minutes, target_tokens: int, converges: bool
):
    """Under team-a's 1,500 tokens a minute, a 1,300-token target leaves the combine call
    about 130 tokens of summaries: more than the 64 a part needs, less than one part's
    summary of up to 187 tokens. However many levels group the summaries, the last one
    never fits: such a run is refused for good before any upstream call, as a combine
    with no room at all is. A 1,230-token target leaves room for one whole part summary:
    the parts' summaries, as long as they may be, are grouped and combined.

    Before, the 1,300-token run paid for its parts and groups, then failed at max_levels."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=_full_answer) as scripted:
        gw = await start_gateway(_summary_config(scripted.base_url, 1500))
        document = " ".join(f"Sentence {i} says something." for i in range(500))
        request = pb.SummarizeRequest(
            model=FAKE_MODEL, document=document, target_tokens=target_tokens
        )
        if converges:
            summary = await gw.stub.Summarize(request, metadata=as_tenant("team-a"))
            assert summary.chunks >= 2
            assert summary.levels == 2
            assert summary.summary.startswith("summary")
            return
        error = await rpc_error(gw.stub.Summarize(request, metadata=as_tenant("team-a")))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"cannot hold one summarising call: its prompt, a {target_tokens}-token" in (
            error.details() or ""
        )
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "tenant:team-a:tokens_per_minute"
        assert trailer(error, RETRY_PUSHBACK_TRAILER) == "-1"
        assert scripted.requests == []


async def test_a_summary_whose_groups_cannot_hold_two_part_summaries_is_refused_up_front(
    start_gateway, short_minutes
):
    """Under team-a's 1,500 tokens a minute, about 870 tokens of instructions and a
    187-token target leave each call about 370 tokens of text: room for a part, and for
    one part's summary of up to 187 tokens, but not for two. The parts' summaries do not
    fit one combine call, and a group of one summary does not shrink them: such a run is
    refused for good before any upstream call.

    Before, it paid for its parts and for group after group of one summary, then failed
    at max_levels."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=_full_answer) as scripted:
        config = secure_config(
            scripted.base_url,
            tenants={"team-a": {"tokens_per_minute": 1500}},
            models=fake_model_window(32_768),
            summarize={"chunk_overlap_tokens": 0, "max_levels": 2},
            batch={"rate_left_to_other_calls": 0},
        )
        gw = await start_gateway(config)
        request = pb.SummarizeRequest(
            model=FAKE_MODEL,
            document=" ".join(f"Sentence {i} says something." for i in range(300)),
            target_tokens=187,
            instructions=" ".join(f"Rule {i} keep it." for i in range(140)),
        )
        error = await rpc_error(gw.stub.Summarize(request, metadata=as_tenant("team-a")))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "tenant:team-a:tokens_per_minute"
        assert trailer(error, RETRY_PUSHBACK_TRAILER) == "-1"
        assert scripted.requests == []


_TOO_LONG = (
    '{"error": {"message": "This model\'s maximum context length is 1024 tokens.", '
    '"type": "invalid_request_error", "code": "context_length_exceeded"}}'
)


async def test_auth_off_serves_the_default_tenant_on_loopback(upstream, start_gateway):
    """With auth off (the default) a call without a key is served."""
    gw = await start_gateway(gateway_config(upstream.base_url))
    assert (await gw.stub.Complete(chat())).content == "Hello from fake"


async def test_auth_off_with_keys_serves_a_valid_key_as_its_tenant_and_others_as_default(
    upstream, start_gateway
):
    """Mode off with keys configured makes them optional, as the README says: a valid key
    is its tenant, under its limits; no key or an unknown one is `default`, served."""
    config = secure_config(
        upstream.base_url,
        auth={"mode": "off"},
        tenants={"team-a": {"requests_per_minute": 1}},
    )
    gw = await start_gateway(config)
    assert (await gw.stub.Complete(chat(), metadata=as_tenant("team-a"))).content
    limited = await rpc_error(gw.stub.Complete(chat(), metadata=as_tenant("team-a")))
    assert limited.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for metadata in ((), bearer("llmgw_not-a-key-anyone-was-given")):
        assert (await gw.stub.Complete(chat(), metadata=metadata)).content
    own = await gw.stub.GetUsage(pb.GetUsageRequest())
    assert own.total.requests == 2
    theirs = await gw.stub.GetUsage(pb.GetUsageRequest(tenant="team-a"))  # default sees all
    assert theirs.total.requests == 1


async def test_auth_off_holds_the_default_tenant_to_the_any_tenant_limits(upstream, start_gateway):
    """With auth off every caller is tenant `default`, which has no entry of its own: it
    gets "*"'s limits. Before, "*" was a config error and `default` had no limits."""
    gw = await start_gateway(
        gateway_config(upstream.base_url, tenants={"*": {"requests_per_minute": 1}})
    )
    assert (await gw.stub.Complete(chat())).content
    error = await rpc_error(gw.stub.Complete(chat()))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "tenant:default:requests_per_minute"
    assert len(upstream.requests) == 1


async def test_auth_off_serves_a_bearer_token_longer_than_any_key_as_default(
    upstream, start_gateway
):
    """A token no key could be (a 1 KB JWT an ingress or client library attaches) is an
    unknown key like any other: with keys optional, its caller is `default`, served, not
    UNAUTHENTICATED; with keys required it is refused as unknown."""
    jwt_like = "eyJhbGciOiJSUzI1NiJ9." + "x" * 1000
    optional = await start_gateway(secure_config(upstream.base_url, auth={"mode": "off"}))
    served = await optional.stub.Complete(chat(), metadata=bearer(jwt_like))
    assert served.content == "Hello from fake"
    rows = await optional.stub.GetUsage(pb.GetUsageRequest(tenant="default"))
    assert rows.total.requests == 1
    required = await start_gateway(secure_config(upstream.base_url))
    refused = await rpc_error(required.stub.Complete(chat(), metadata=bearer(jwt_like)))
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED


def _own_public_address() -> str:
    """An address of this machine other than loopback (the one its default route leaves
    from: a UDP connect sends nothing); the wildcard where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never reached
        except OSError:
            return "0.0.0.0"
        return str(probe.getsockname()[0])


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "own-address"])
async def test_auth_off_on_a_public_address_is_refused_at_startup(listen):
    """The server will not start unauthenticated on a non-loopback address unless forced:
    the wildcards, and one of this machine's own (another machine's is refused before, as
    no address to listen on)."""
    if listen == "own-address":
        listen = f"{_own_public_address()}:0"
    config = gateway_config("http://127.0.0.1:9", server={"listen": listen})
    with pytest.raises(InsecureListen, match=r"auth\.mode: off"):
        async with GatewayServer(config):
            pass


def _calls_as(gw: Any, tenant: str, texts: list[str]) -> list[asyncio.Future[Any]]:
    """One `Complete` call of `tenant` per text, started at once, in order."""
    return [
        asyncio.ensure_future(gw.stub.Complete(chat(text), metadata=as_tenant(tenant)))
        for text in texts
    ]


async def test_tenants_take_turns_for_a_busy_upstreams_slots(start_gateway):
    """team-a fills the upstream's one slot and its queue; team-b's call, sent last, is
    served next but one, not after all of team-a's (first come, first served would put
    it sixth)."""
    async with FakeUpstream(default=Reply(delay_s=0.2)) as fake:
        config = secure_config(fake.base_url, tenants={"team-a": {}, "team-b": {}})
        gw = await start_gateway(dataclass_replace_upstream(config, max_concurrency=1))
        limiter = gw.server.pipeline.pool.state("up0").limiter
        calls = _calls_as(gw, "team-a", [f"a{i}" for i in range(5)])
        assert await settle(lambda: limiter.queued == 4)
        calls += _calls_as(gw, "team-b", ["b0"])
        assert await settle(lambda: limiter.queued == 5)
        answers = await asyncio.gather(*calls)
    assert all(a.content == "Hello from fake" for a in answers)
    served = [user_text(r.body) for r in fake.requests]
    assert served[2] == "b0", served
    assert sorted(served) == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert limiter.in_flight == 0
    assert limiter.queued == 0


async def test_tenants_take_turns_for_an_upstreams_request_rate(start_gateway):
    """An upstream allowed 120 requests a minute (one each half second) whose bucket is
    spent: team-a's burst of five queues for the rate, and team-b's call, sent last, is
    the next to start after team-a's first, not after all five (each waking sleeper
    racing for the bucket would leave it last)."""
    async with FakeUpstream() as fake:
        config = secure_config(fake.base_url, tenants={"team-a": {}, "team-b": {}})
        gw = await start_gateway(dataclass_replace_upstream(config, requests_per_minute=120))
        limiter = gw.server.pipeline.pool.state("up0").limiter
        limiter._requests.level = 0.0
        calls = _calls_as(gw, "team-a", [f"a{i}" for i in range(5)])
        assert await settle(lambda: limiter.queued == 5)
        calls += _calls_as(gw, "team-b", ["b0"])
        answers = await asyncio.gather(*calls)
    assert all(a.content == "Hello from fake" for a in answers)
    served = [user_text(r.body) for r in fake.requests]
    # team-a's five were sent at once and queued in whatever order they arrived.
    assert served[1] == "b0", served
    assert sorted(served) == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert limiter.queued == 0
