"""GetUsage answers in pages (AIP-158), in the memory and the Redis ledger.

Before, GetUsage answered every matching row in one message: a label with many values (a
request id per call) made a day's rows larger than gRPC's default 4 MiB receive limit,
and grpcurl and other clients on that limit failed RESOURCE_EXHAUSTED ("Received message
larger than max") with no details. Now rows come in pages of `page_size` (1,000 by
default), sorted by tenant, model, upstream and labels, each page continued from the
last row's key by an opaque `next_page_token`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import pytest

from gateway_client import GatewayClient
from gateway_client.cli import main as cli_main
from llmgateway.v1 import gateway_pb2 as pb
from service.domain import Usage
from service.ledger import UsageEntry, UsageFilter, UsageRow
from tests.conftest import FAKE_MODEL, RunningGateway, chat, gateway_config
from tests.fake_upstream import FakeUpstream
from tests.integration.helpers import field_violations
from tests.integration.tenancy_helpers import as_tenant, rpc_error, secure_config
from tests.redis_server import RedisServer

RowKey = tuple[str, str, str, tuple[tuple[str, str], ...]]
_RECORDED_AT_ONCE = 50


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def ledger_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ledger config section for each ledger; Redis is a real redis-server."""
    # Room for more rows than a page holds, from one tenant in one bucket.
    section: dict[str, Any] = {"max_rows_per_tenant": 20_000}
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        section |= {"redis_url": redis.url, "key_prefix": uuid.uuid4().hex}
    return section


@pytest.fixture
async def gateway(
    upstream: FakeUpstream, start_gateway: Any, ledger_section: dict[str, Any]
) -> RunningGateway:
    """A gateway whose ledger is the one `ledger_section` asks for."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, ledger=ledger_section)
    )
    return gateway


async def record(
    gateway: RunningGateway,
    request_ids: Iterable[str],
    *,
    tenant: str = "default",
    labels: Mapping[str, str] | None = None,
) -> None:
    """Record one call of `tenant` for each request id, labelled with it (and `labels`),
    up to _RECORDED_AT_ONCE at a time, as concurrent calls are (one by one, the 10,001
    rows of a test took 7 s of Redis round trips)."""
    ledger = gateway.server.pipeline.ledger
    entries = [
        UsageEntry(
            tenant=tenant,
            model=FAKE_MODEL,
            upstream="up0",
            labels={"request_id": request_id, **(labels or {})},
            usage=Usage(input_tokens=7, output_tokens=3),
            cost_usd=1e-6,
        )
        for request_id in request_ids
    ]
    for start in range(0, len(entries), _RECORDED_AT_ONCE):
        batch = entries[start : start + _RECORDED_AT_ONCE]
        await asyncio.gather(*(ledger.record(entry) for entry in batch))
    # A row Redis was too slow for (a loaded machine: `ledger.record_failed`) is sent again
    # once its cool-down ends, as a served call's is: the pages are read after it lands.
    late = getattr(ledger, "late_releases", None)  # the Redis ledger's; memory has none
    async with asyncio.timeout(60):
        while late is not None and late.pending:
            await asyncio.sleep(0.05)


def key_of(row: pb.UsageRow) -> RowKey:
    """A row's dimensions, in the order GetUsage sorts rows by."""
    return row.tenant, row.model, row.upstream, tuple(sorted(row.labels.items()))


async def pages(
    gateway: RunningGateway,
    request: pb.GetUsageRequest,
    *,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[pb.GetUsageResponse]:
    """Every page of `request`, each asked with the token the one before gave."""
    answered = [await gateway.stub.GetUsage(request, metadata=metadata)]
    while answered[-1].next_page_token:
        following = pb.GetUsageRequest()
        following.CopyFrom(request)
        following.page_token = answered[-1].next_page_token
        answered.append(await gateway.stub.GetUsage(following, metadata=metadata))
    return answered


def ids(rows: Iterable[pb.UsageRow]) -> list[str]:
    """The request ids of `rows`, in their order."""
    return [row.labels["request_id"] for row in rows]


async def test_pages_cover_every_row_once_in_order_each_with_the_whole_total(
    gateway: RunningGateway,
) -> None:
    """Ten rows in pages of three come as 3, 3, 3 and 1, sorted by their labels, each
    once; every page carries the total of all ten, and the last no token."""
    await record(gateway, [f"r{n:02d}" for n in reversed(range(10))])
    answered = await pages(gateway, pb.GetUsageRequest(page_size=3))
    assert [len(page.rows) for page in answered] == [3, 3, 3, 1]
    rows = [row for page in answered for row in page.rows]
    assert ids(rows) == [f"r{n:02d}" for n in range(10)]
    assert [key_of(r) for r in rows] == sorted(key_of(r) for r in rows)
    assert {page.total.requests for page in answered} == {10}
    assert {page.total.usage.input_tokens for page in answered} == {70}
    assert [bool(page.next_page_token) for page in answered] == [True, True, True, False]


async def test_rows_sort_by_tenant_model_upstream_then_labels(
    upstream: FakeUpstream, start_gateway: Any, ledger_section: dict[str, Any]
) -> None:
    """Pages over every tenant run through tenants, models and label sets in order,
    whichever order the calls came in."""
    gateway = await start_gateway(gateway_config(upstream.base_url, ledger=ledger_section))
    for tenant in ("team-b", "team-a"):
        await record(gateway, ["b", "a"], tenant=tenant, labels={"team": "z"})
        await record(gateway, ["c"], tenant=tenant, labels={"aa": "first"})
    await gateway.stub.Complete(chat(labels={"request_id": "call"}))
    answered = await pages(gateway, pb.GetUsageRequest(tenant="*", page_size=2))
    assert [len(page.rows) for page in answered] == [2, 2, 2, 1]
    rows = [row for page in answered for row in page.rows]
    assert [(r.tenant, r.labels["request_id"]) for r in rows] == [
        ("default", "call"),
        ("team-a", "c"), ("team-a", "a"), ("team-a", "b"),
        ("team-b", "c"), ("team-b", "a"), ("team-b", "b"),
    ]  # fmt: skip


async def test_a_row_recorded_between_pages_neither_repeats_nor_skips_those_there_before(
    gateway: RunningGateway,
) -> None:
    """Between the first and second page, a row that sorts first, a call added to a row of
    the first page and a row that sorts last are recorded: the rows there from the start
    each come once, the first-sorting new one on no page (the pages went past it), the
    last one on the last page. An offset would have shown r03 twice."""
    await record(gateway, [f"r{n:02d}" for n in range(1, 8)])
    first = await gateway.stub.GetUsage(pb.GetUsageRequest(page_size=3))
    await record(gateway, ["r00", "r02", "r99"])
    rest = await pages(gateway, pb.GetUsageRequest(page_size=3, page_token=first.next_page_token))
    seen = ids(first.rows) + ids(row for page in rest for row in page.rows)
    assert seen == ["r01", "r02", "r03", "r04", "r05", "r06", "r07", "r99"]
    assert first.total.requests == 7
    assert {page.total.requests for page in rest} == {10}


async def test_a_page_size_past_the_maximum_is_coerced_and_a_negative_one_refused(
    gateway: RunningGateway,
) -> None:
    """page_size 0 means 1,000 rows; above 10,000 it means 10,000 (AIP-158 coerces); a
    negative one is INVALID_ARGUMENT on page_size, with a BadRequest."""
    await record(gateway, [f"r{n:05d}" for n in range(10_001)])
    default = await gateway.stub.GetUsage(pb.GetUsageRequest())
    assert len(default.rows) == 1000
    assert default.next_page_token
    largest = await gateway.stub.GetUsage(pb.GetUsageRequest(page_size=2**31 - 1))
    assert len(largest.rows) == 10_000
    last = await gateway.stub.GetUsage(
        pb.GetUsageRequest(page_size=10_000, page_token=largest.next_page_token)
    )
    assert ids(last.rows) == ["r10000"]
    assert not last.next_page_token
    refused = await rpc_error(gateway.stub.GetUsage(pb.GetUsageRequest(page_size=-1)))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused)) == ["page_size"]


async def test_pages_of_long_labels_stay_under_the_default_message_limit(
    gateway: RunningGateway,
) -> None:
    """Rows of 32 labels of 256 characters (the most a call may carry), 1,000 of which
    pass 4 MiB, come in smaller pages that a client on gRPC's default receive limit (the
    test's own channel) reads whole. Before, the one answer was RESOURCE_EXHAUSTED on the
    client: "Received message larger than max"."""
    labels = {f"key{n:02d}-{'k' * 56}": "v" * 256 for n in range(31)}
    await record(gateway, [f"r{n:03d}" for n in range(450)], labels=labels)
    answered = await pages(gateway, pb.GetUsageRequest())
    assert len(answered) > 1
    assert all(page.ByteSize() < 4 * 1024 * 1024 for page in answered)
    assert ids(row for page in answered for row in page.rows) == [f"r{n:03d}" for n in range(450)]


def forged(content: object) -> str:
    """A token of `content` as the gateway's own are written, but not by it."""
    return base64.urlsafe_b64encode(json.dumps(content).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!not base64!!!",
        forged({"after": "r01"}),
        forged([1, "0" * 32, "default", FAKE_MODEL, "up0", [["request_id", "r01"]]]),
        forged([2, "0" * 32, "default", FAKE_MODEL, "up0", []]),
        forged([1, "0" * 32, 5, FAKE_MODEL, "up0", [[1, 2]]]),
        forged([[[[[]]]]] * 6),
        "W" * 4000 + "=",
        base64.urlsafe_b64encode(b"[" * 100_000).decode(),
    ],
    ids=["word", "not-base64", "object", "other-fingerprint", "version", "numbers", "nested",
         "long", "deep"],
)  # fmt: skip
async def test_a_token_the_gateway_did_not_write_is_invalid_argument_on_page_token(
    gateway: RunningGateway, token: str
) -> None:
    """Garbage, or a token forged in the gateway's layout, is INVALID_ARGUMENT on
    page_token with a BadRequest, never INTERNAL and never rows."""
    await record(gateway, ["r01", "r02"])
    refused = await rpc_error(gateway.stub.GetUsage(pb.GetUsageRequest(page_token=token)))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused)) == ["page_token"]


@pytest.mark.parametrize(
    "changed",
    [{"model": "other-model"}, {"labels": {"team": "search"}}, {"tenant": "*"}, {"window": 1}],
    ids=["model", "labels", "tenant", "window"],
)
async def test_a_token_sent_with_another_query_is_invalid_argument(
    gateway: RunningGateway, changed: dict[str, Any]
) -> None:
    """A token continues only the query that gave it: with another model, labels, tenant
    or window it is INVALID_ARGUMENT on page_token; with another page_size it goes on."""
    await record(gateway, [f"r{n}" for n in range(5)], labels={"team": "search"})
    first = await gateway.stub.GetUsage(pb.GetUsageRequest(page_size=2))
    other = pb.GetUsageRequest(page_size=2, page_token=first.next_page_token)
    for name, value in changed.items():
        if name == "window":
            other.start_time.seconds = value
        elif name == "labels":
            other.labels.update(value)
        else:
            setattr(other, name, value)
    refused = await rpc_error(gateway.stub.GetUsage(other))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused)) == ["page_token"]
    resized = pb.GetUsageRequest(page_size=10, page_token=first.next_page_token)
    assert ids((await gateway.stub.GetUsage(resized)).rows) == ["r2", "r3", "r4"]


async def test_a_token_reads_no_tenant_the_caller_may_not(
    upstream: FakeUpstream, start_gateway: Any, ledger_section: dict[str, Any]
) -> None:
    """An admin's token for team-a's rows, or for every tenant's, is nothing to team-b:
    sent for its own rows it is another query (INVALID_ARGUMENT), and sent for team-a's or
    every tenant's the permission check refuses it first, as on any page."""
    config = secure_config(
        upstream.base_url,
        tenants={"team-a": {"is_admin": True}, "team-b": {}},
        ledger=ledger_section,
    )
    gateway = await start_gateway(config)
    await record(gateway, ["a1", "a2", "a3"], tenant="team-a")
    await record(gateway, ["b1", "b2", "b3"], tenant="team-b")
    admin = as_tenant("team-a")
    for tenant in ("team-a", "*"):
        first = await gateway.stub.GetUsage(
            pb.GetUsageRequest(tenant=tenant, page_size=1), metadata=admin
        )
        token = first.next_page_token
        own = pb.GetUsageRequest(page_size=1, page_token=token)
        refused = await rpc_error(gateway.stub.GetUsage(own, metadata=as_tenant("team-b")))
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(refused)) == ["page_token"]
        theirs = pb.GetUsageRequest(tenant=tenant, page_size=1, page_token=token)
        denied = await rpc_error(gateway.stub.GetUsage(theirs, metadata=as_tenant("team-b")))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    own_pages = await pages(gateway, pb.GetUsageRequest(page_size=2), metadata=as_tenant("team-b"))
    assert ids(row for page in own_pages for row in page.rows) == ["b1", "b2", "b3"]


async def test_the_python_client_reads_every_page_as_one_answer(gateway: RunningGateway) -> None:
    """`usage()` answers every row however many pages they take, with the total;
    `usage_pages()` yields each page, from the first or from a page's token on."""
    await record(gateway, [f"r{n}" for n in range(7)])
    async with GatewayClient(gateway.server.address, timeout_s=10) as client:
        whole = await client.usage(page_size=3)
        answered = [page async for page in client.usage_pages(page_size=3)]
        resumed = [
            page
            async for page in client.usage_pages(
                page_size=2, page_token=answered[0].next_page_token
            )
        ]
    assert ids(whole.rows) == [f"r{n}" for n in range(7)]
    assert whole.total.requests == 7
    assert not whole.next_page_token
    assert [ids(page.rows) for page in answered] == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert [ids(page.rows) for page in resumed] == [["r3", "r4"], ["r5", "r6"]]


async def test_the_usage_command_prints_every_page_as_one_table(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-gateway usage` over more rows than a page holds reads every page (here two of
    the default 1,000 rows) and prints one table: every row once, in order, then the
    total of all of them."""
    ledger = gateway.server.pipeline.ledger
    query = ledger.query
    queries: list[UsageFilter] = []

    async def counted(usage_filter: UsageFilter) -> list[UsageRow]:
        queries.append(usage_filter)
        return await query(usage_filter)

    monkeypatch.setattr(ledger, "query", counted)
    await record(gateway, [f"r{n:04d}" for n in range(1005)])
    code = await asyncio.to_thread(cli_main, ["usage", "--address", gateway.server.address])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[0] == "TENANT"
    assert [line.split()[3] for line in lines[1:-1]] == [
        f"request_id=r{n:04d}" for n in range(1005)
    ]
    assert lines[-1].split()[:2] == ["TOTAL", "1005"]
    assert len(queries) == 2


async def test_the_usage_commands_total_is_the_sum_of_the_rows_it_prints(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calls recorded while `llm-gateway usage` reads its pages (one more to a row of the
    first page, and a new row that sorts before the second) are in the last page's total
    but in no row printed: the table's TOTAL is the sum of the rows above it, as a reader
    adding up the column expects, not the last page's total.

    Before, TOTAL said 1007 requests under rows that add up to 1005."""
    ledger = gateway.server.pipeline.ledger
    query = ledger.query
    queries: list[UsageFilter] = []

    async def recorded_between(usage_filter: UsageFilter) -> list[UsageRow]:
        if queries:  # the second page: calls came in since the first was read
            await record(gateway, ["r0000", "a"])
        queries.append(usage_filter)
        return await query(usage_filter)

    monkeypatch.setattr(ledger, "query", recorded_between)
    await record(gateway, [f"r{n:04d}" for n in range(1005)])
    code = await asyncio.to_thread(cli_main, ["usage", "--address", gateway.server.address])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    printed = [line.split() for line in lines[1:-1]]
    assert len(printed) == 1005
    total = lines[-1].split()
    assert total[0] == "TOTAL"
    assert int(total[1]) == sum(int(row[4]) for row in printed) == 1005
    assert int(total[4]) == sum(int(row[7]) for row in printed) == 1005 * 7
    assert total[-2:] == [f"{1005e-6:.6f}", f"{0:.6f}"]  # cost, saved
    assert len(queries) == 2
