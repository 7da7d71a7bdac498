"""GetUsage over a Redis ledger shared by two replicas: per tenant, bounded, and upgraded.

Each tenant reads only its own rows whichever replica recorded them, every ledger key
expires (labels with a new value in every call once grew Redis for ever), and rows the
release before this layout wrote are still read, and not counted twice, until they expire.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from llmgateway.v1 import gateway_pb2 as pb
from service.ledger import period_key
from tests.conftest import FAKE_MODEL, RunningGateway, chat
from tests.fake_upstream import FakeUpstream
from tests.integration.tenancy_helpers import as_tenant, rpc_error, secure_config
from tests.old_ledger_layout import record_in_old_layout
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
# team-a may read every tenant's usage; team-b only its own.
TENANTS = {"team-a": {"is_admin": True}, "team-b": {}}


async def replicas(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any, prefix: str
) -> tuple[RunningGateway, RunningGateway]:
    """Two gateways whose ledger is in `redis_server` under `prefix`."""
    ledger = {"redis_url": redis_server.url, "key_prefix": prefix}
    config = secure_config(upstream.base_url, tenants=TENANTS, ledger=ledger)
    return await start_gateway(config), await start_gateway(config)


async def usage(gateway: RunningGateway, caller: str, **request: Any) -> pb.GetUsageResponse:
    response: pb.GetUsageResponse = await gateway.stub.GetUsage(
        pb.GetUsageRequest(**request), metadata=as_tenant(caller)
    )
    return response


def by_labels(response: pb.GetUsageResponse) -> dict[tuple[str, str], int]:
    """Requests by (tenant, the `team` label)."""
    return {(r.tenant, r.labels.get("team", "")): r.requests for r in response.rows}


async def test_each_tenant_reads_its_own_rows_from_either_replica_and_every_key_expires(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """team-a calls one replica and team-b the other, with a label value new on every
    call: each replica shows team-b its own rows only, the admin every tenant's, and
    every key the ledger wrote has a TTL."""
    prefix = uuid.uuid4().hex
    one, two = await replicas(redis_server, upstream, start_gateway, prefix)
    for call in range(3):
        await one.stub.Complete(chat(labels={"team": f"a{call}"}), metadata=as_tenant("team-a"))
    for call in range(2):
        await two.stub.Complete(chat(labels={"team": f"b{call}"}), metadata=as_tenant("team-b"))
    for replica in (one, two):
        own = await usage(replica, "team-b")
        assert by_labels(own) == {("team-b", "b0"): 1, ("team-b", "b1"): 1}
        assert own.total.requests == 2
        everyone = await usage(replica, "team-a", tenant="*")
        assert everyone.total.requests == 5
        assert {r.tenant for r in everyone.rows} == {"team-a", "team-b"}
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        never_expire = [key for key in keys if await client.ttl(key) < 0]
    finally:
        await client.aclose()
    assert len(keys) > 10
    assert never_expire == []


async def test_rows_written_before_the_upgrade_are_still_read(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """Rows of the old layout, two hours ago and this hour, for both tenants; then
    upgraded replicas record more, one row of it the same (tenant, labels, hour) as an
    old one: GetUsage sums both layouts per tenant, counts that shared row once, and
    honours the time window and label filters over old rows too."""
    prefix = uuid.uuid4().hex
    now = time.time()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for at_s, tenant in ((now - 7200, "team-b"), (now, "team-b"), (now, "team-a")):
            await record_in_old_layout(
                client, prefix, at_s=at_s, tenant=tenant, model=FAKE_MODEL, upstream="up0",
                labels={"team": "x"}, counters={"requests": 1, "input_tokens": 100},
            )  # fmt: skip
    finally:
        await client.aclose()
    one, two = await replicas(redis_server, upstream, start_gateway, prefix)
    await one.stub.Complete(chat(labels={"team": "x"}), metadata=as_tenant("team-b"))
    await two.stub.Complete(chat(labels={"team": "y"}), metadata=as_tenant("team-b"))

    own = await usage(two, "team-b")
    assert by_labels(own) == {("team-b", "x"): 3, ("team-b", "y"): 1}
    assert own.total.usage.input_tokens == 200 + 2 * 7  # the fake's 7 prompt tokens a call
    everyone = await usage(one, "team-a", tenant="*")
    assert by_labels(everyone) == {("team-a", "x"): 1, ("team-b", "x"): 3, ("team-b", "y"): 1}
    this_hour = await usage(one, "team-b", start_time=Timestamp(seconds=int(now) - 3600))
    assert by_labels(this_hour) == {("team-b", "x"): 2, ("team-b", "y"): 1}
    labelled = await usage(two, "team-a", tenant="*", labels={"team": "x"})
    assert by_labels(labelled) == {("team-a", "x"): 1, ("team-b", "x"): 3}


async def test_a_corrupt_row_is_skipped_and_logged_and_the_rest_still_counts(
    redis_server: RedisServer,
    upstream: FakeUpstream,
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Usage rows under the prefix written by hand or a bad migration: a counter that is
    not an integer, a row key of the wrong type, dims that are not JSON. GetUsage skips
    each, logging its key, and sums the others (it failed INTERNAL or UNAVAILABLE for
    all). A call landing on a corrupt row still adds to its tenant's budget spend and
    leaves the row as it was (its spend was lost, and the row half incremented)."""
    prefix = uuid.uuid4().hex
    one, _ = await replicas(redis_server, upstream, start_gateway, prefix)
    await one.stub.Complete(chat(labels={"team": "a"}), metadata=as_tenant("team-a"))
    await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        (b_rows,) = [k async for k in client.scan_iter(match=f"{prefix}:rows:*:team-b")]
        (b_row_id,) = await client.smembers(b_rows)
        bucket = b_rows.split(":")[2]
        b_row = f"{prefix}:row:{bucket}:{b_row_id}"
        await client.hset(b_row, "requests", "lots")
        a_rows = f"{prefix}:rows:{bucket}:team-a"
        await client.sadd(a_rows, "wrongtype", "badjson")
        await client.set(f"{prefix}:row:{bucket}:wrongtype", "1")
        await client.hset(f"{prefix}:row:{bucket}:badjson", mapping={"dims": "{", "requests": 1})
        with caplog.at_level("WARNING", logger="llm_gateway.ledger"):
            everyone = await usage(one, "team-a", tenant="*")
            assert by_labels(everyone) == {("team-a", "a"): 1}
            assert everyone.total.requests == 1
            own = await usage(one, "team-b")
            assert (by_labels(own), own.total.requests) == ({}, 0)
            ledger = one.server.pipeline.ledger
            spent = await ledger.spent_usd("team-b", "day")
            await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
            assert await ledger.spent_usd("team-b", "day") > spent
            assert await client.hget(b_row, "requests") == "lots"
            assert await client.hget(b_row, "input_tokens") == "7"
        warned = {r.key for r in caplog.records if r.getMessage() == "ledger.row_corrupt"}
        assert warned == {
            b_row,
            f"{prefix}:row:{bucket}:wrongtype",
            f"{prefix}:row:{bucket}:badjson",
        }
    finally:
        await client.aclose()


@pytest.mark.parametrize("index", ["rows:{bucket}:team-b", "tenants:{bucket}"])
async def test_a_bucket_index_of_another_type_still_counts_the_spend_against_the_budget(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any, index: str
) -> None:
    """The set of a bucket's row ids for team-b, or of its tenants, written as a string
    (by hand or a bad migration): each call's row is given up, but its spend still adds
    to team-b's budget, which refuses the third call: two of the fake's (2.24e-6 USD
    each) leave less than its expected cost.

    Before, the record script stopped at that set before it added the spend: team-b's
    budget saw none of its calls, and every call passed it."""
    prefix = uuid.uuid4().hex
    ledger = {"redis_url": redis_server.url, "key_prefix": prefix}
    budgets = {"team-b": {"usd": 0.000005, "period": "day"}}
    config = secure_config(upstream.base_url, tenants=TENANTS, ledger=ledger, budgets=budgets)
    gateway = await start_gateway(config)
    await gateway.stub.Complete(chat(), metadata=as_tenant("team-b"))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        (rows,) = [k async for k in client.scan_iter(match=f"{prefix}:rows:*:team-b")]
        key = f"{prefix}:" + index.format(bucket=rows.split(":")[2])
        await client.delete(key)
        await client.set(key, "written by hand")
        ledger_of = gateway.server.pipeline.ledger
        spent = await ledger_of.spent_usd("team-b", "day")
        await gateway.stub.Complete(chat(), metadata=as_tenant("team-b"))
        assert await ledger_of.spent_usd("team-b", "day") > spent
        refused = await rpc_error(gateway.stub.Complete(chat(), metadata=as_tenant("team-b")))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await client.get(key) == "written by hand"
    finally:
        await client.aclose()


@pytest.mark.parametrize("counter", ["007", "-0", "9223372036854775000"])
async def test_a_counter_redis_cannot_increment_leaves_the_row_and_still_counts_the_spend(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any, counter: str
) -> None:
    """Digits that Redis does not take as an integer (a leading zero, a minus zero), or
    a count with no room left below 2^63 for a call's: the row is left as it is, the
    call still adds to its tenant's spend, and its usage counts among the writes given
    up (`llm_gateway.store.writes_abandoned`) besides the log.

    Before, the record script passed them as integers; HINCRBY then stopped it after it
    had marked the record applied, and the call's spend was never added. And a row left
    alone was logged only, not counted."""
    prefix = uuid.uuid4().hex
    one, _ = await replicas(redis_server, upstream, start_gateway, prefix)
    await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        (b_rows,) = [k async for k in client.scan_iter(match=f"{prefix}:rows:*:team-b")]
        (b_row_id,) = await client.smembers(b_rows)
        b_row = f"{prefix}:row:{b_rows.split(':')[2]}:{b_row_id}"
        await client.hset(b_row, "requests", counter)
        ledger = one.server.pipeline.ledger
        spent = await ledger.spent_usd("team-b", "day")
        await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
        assert await ledger.spent_usd("team-b", "day") > spent
        assert await client.hget(b_row, "requests") == counter
        assert await client.hget(b_row, "input_tokens") == "7"
        assert ledger.late_releases.abandoned == 1
    finally:
        await client.aclose()


async def test_a_row_and_spend_an_older_release_left_past_a_million_dollars_still_count(
    redis_server: RedisServer, upstream: FakeUpstream, start_gateway: Any
) -> None:
    """A row whose `cost_pico` an older release took to 19 digits ($1,073,741.82...) and
    a day's spend it took to $9,000,000, each one counter: GetUsage and the spend read
    them exactly, a new call adds to both, and its write carries their whole millions
    into `cost_usd_millions` and `spend_usd_millions`, so neither nears 2^63 again.

    Before, the record script took such a row for corrupt: every later call in its
    bucket was left out of GetUsage."""
    prefix = uuid.uuid4().hex
    one, _ = await replicas(redis_server, upstream, start_gateway, prefix)
    await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
    old_row, old_spend = 1_073_741_823_750_000_007, 9_000_000_000_000_000_000
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        (b_rows,) = [k async for k in client.scan_iter(match=f"{prefix}:rows:*:team-b")]
        (b_row_id,) = await client.smembers(b_rows)
        b_row = f"{prefix}:row:{b_rows.split(':')[2]}:{b_row_id}"
        day = period_key("day", time.time())
        await client.hset(b_row, "cost_pico", str(old_row))
        await client.set(f"{prefix}:spend:team-b:{day}", str(old_spend))
        ledger = one.server.pipeline.ledger
        before = await usage(one, "team-b")
        assert before.total.cost_usd == old_row / 1e12
        assert await ledger.spent_usd("team-b", "day") == old_spend / 1e12

        call = await one.stub.Complete(chat(labels={"team": "b"}), metadata=as_tenant("team-b"))
        call_pico = round(call.metadata.cost_usd * 1e12)
        after = await usage(one, "team-b")
        assert (after.total.requests, after.total.usage.input_tokens) == (2, 14)
        assert after.total.cost_usd == (old_row + call_pico) / 1e12
        assert await ledger.spent_usd("team-b", "day") == (old_spend + call_pico) / 1e12
        row = await client.hgetall(b_row)
        assert (int(row["cost_usd_millions"]), int(row["cost_pico"])) == divmod(
            old_row + call_pico, 10**18
        )
        millions = await client.get(f"{prefix}:spend_usd_millions:team-b:{day}")
        low = await client.get(f"{prefix}:spend:team-b:{day}")
        assert (int(millions), int(low)) == divmod(old_spend + call_pico, 10**18)
        assert await client.ttl(f"{prefix}:spend_usd_millions:team-b:{day}") > 0
    finally:
        await client.aclose()
