"""What the cache saved each tenant: GetUsage's `cache_hits` and `saved_cost_usd`, in
memory and in Redis, and in `llm-gateway usage`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway_client.cli import main as cli_main
from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, RunningGateway, gateway_config
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.test_cache import _rewrite_the_entry, ask, settled
from tests.integration.test_cost_and_usage import (
    MOST_TOKENS,
    PRICED_MODELS,
    USAGE,
    output_priced,
)
from tests.integration.test_node_client import node_scenarios, run_against  # noqa: F401
from tests.redis_server import RedisServer

PICO = 10**12


def pico(usd: float) -> int:
    """USD as the ledger's integer pico-dollars."""
    return round(usd * PICO)


async def _priced_gateway(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], ledger_redis_url: str | None
) -> RunningGateway:
    """A gateway with a memory cache and a priced model; its ledger in Redis when given."""
    ledger = {"redis_url": ledger_redis_url} if ledger_redis_url else {}
    config = gateway_config(
        upstream.base_url, models=PRICED_MODELS, cache={"backend": "memory"}, ledger=ledger
    )
    gateway: RunningGateway = await start_gateway(config)
    return gateway


async def _usage(gateway: RunningGateway) -> pb.GetUsageResponse:
    response: pb.GetUsageResponse = await gateway.stub.GetUsage(pb.GetUsageRequest())
    return response


async def test_a_miss_and_two_hits_are_one_row_of_three_requests_two_of_them_hits(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], limits_redis_url: str | None
) -> None:
    """A miss then two hits of the same request: one row of 3 requests, 2 cache hits,
    the miss's cost, and twice that saved, in the row and the total alike. Before, the
    hits counted at $0 with nothing to say what they saved."""
    gateway = await _priced_gateway(upstream, start_gateway, limits_redis_url)
    upstream.script(USAGE)
    miss = (await gateway.stub.Complete(ask())).metadata
    await settled(gateway)
    hits = [(await gateway.stub.Complete(ask())).metadata for _ in range(2)]
    assert [m.cache_hit for m in (miss, *hits)] == [False, True, True]
    usage = await _usage(gateway)
    [row] = usage.rows
    for summed in (row, usage.total):
        assert (summed.requests, summed.cache_hits) == (3, 2)
        assert pico(summed.cost_usd) == pico(miss.cost_usd) > 0
        assert pico(summed.saved_cost_usd) == 2 * pico(miss.cost_usd)
        assert summed.usage.output_tokens == 3 * 567
    assert len(upstream.requests) == 1


async def test_savings_past_2_63_pico_dollars_are_summed_exactly(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], limits_redis_url: str | None
) -> None:
    """A call of the most output tokens at the highest price ($42,949,672.95) and two
    hits of it: the row saved twice that, to the pico-dollar, past 2^63 pico-dollars
    (kept in Redis as its pico-dollars and its whole millions, as the cost is)."""
    ledger = {"redis_url": limits_redis_url} if limits_redis_url else {}
    config = gateway_config(
        upstream.base_url,
        models=output_priced(10_000.0),
        cache={"backend": "memory"},
        ledger=ledger,
    )
    gateway: RunningGateway = await start_gateway(config)
    upstream.script(Reply(prompt_tokens=1, completion_tokens=MOST_TOKENS))
    miss = (await gateway.stub.Complete(ask())).metadata
    await settled(gateway)
    for _ in range(2):
        await gateway.stub.Complete(ask())
    total = (await _usage(gateway)).total
    assert (total.requests, total.cache_hits) == (3, 2)
    assert miss.cost_usd == 42_949_672.95
    assert pico(total.saved_cost_usd) == 2 * pico(miss.cost_usd)


async def test_a_redis_row_the_older_release_wrote_reads_as_no_hits_and_takes_new_ones(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], redis_server: RedisServer
) -> None:
    """A row as the release before wrote it (no `cache_hits`, no `saved_pico`: its hits
    counted at $0 alone) reads as 0 hits and $0 saved, and the next hit adds to it."""
    gateway = await _priced_gateway(upstream, start_gateway, redis_server.url)
    upstream.script(USAGE)
    miss = (await gateway.stub.Complete(ask())).metadata
    await settled(gateway)
    await gateway.stub.Complete(ask())
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        [row_key] = await client.keys("*:row:*")
        fields = set(await client.hkeys(row_key))
        assert {"cache_hits", "saved_pico"} <= fields  # this release's own
        await client.hdel(row_key, "cache_hits", "saved_pico")
    finally:
        await client.aclose()
    before = (await _usage(gateway)).total
    assert (before.requests, before.cache_hits, before.saved_cost_usd) == (2, 0, 0.0)
    await gateway.stub.Complete(ask())
    after = (await _usage(gateway)).total
    assert (after.requests, after.cache_hits) == (3, 1)
    assert (pico(after.cost_usd), pico(after.saved_cost_usd)) == (pico(miss.cost_usd),) * 2


@pytest.mark.parametrize(
    ("cost_usd", "is_bad"),
    [(-0.5, True), (1e30, True), (0.100001, True), (0.1, False)],
    ids=["negative", "huge", "past-the-highest-price", "at-the-highest-price"],
)
async def test_an_entry_whose_cost_no_call_has_is_a_miss_not_a_saving(
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    redis_server: RedisServer,
    cost_usd: float,
    is_bad: bool,
) -> None:
    """An entry whose `cost_usd` is negative, or more than its 10 tokens cost at the
    highest price a config allows ($10,000 a million: $0.1), is unreadable: answered from
    upstream, not recorded as a saving that made the tenant's row negative or past any
    bill. At that price exactly, it is a hit that saved $0.1."""
    gateway: RunningGateway = await start_gateway(
        gateway_config(upstream.base_url, cache={"backend": "redis", "redis_url": redis_server.url})
    )
    first = await gateway.stub.Complete(ask())
    assert first.metadata.usage.input_tokens + first.metadata.usage.output_tokens == 10
    await settled(gateway)
    await _rewrite_the_entry(redis_server, lambda e: e["c"].update(cost_usd=cost_usd))
    replies = [await gateway.stub.Complete(ask()) for _ in range(2)]
    await settled(gateway)
    total = (await _usage(gateway)).total
    if is_bad:
        assert [r.metadata.cache_hit for r in replies] == [False, True]
        assert len(upstream.requests) == 2
        assert (total.cache_hits, pico(total.saved_cost_usd)) == (1, pico(first.metadata.cost_usd))
    else:
        assert [r.metadata.cache_hit for r in replies] == [True, True]
        assert len(upstream.requests) == 1
        assert (total.cache_hits, pico(total.saved_cost_usd)) == (2, 2 * pico(cost_usd))


async def test_usage_command_shows_hits_and_savings(
    upstream: FakeUpstream, start_gateway: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-gateway usage` has HITS and SAVED $ columns, and its TOTAL sums them."""
    gateway = await _priced_gateway(upstream, start_gateway, None)
    upstream.script(USAGE)
    miss = (await gateway.stub.Complete(ask())).metadata
    await settled(gateway)
    await gateway.stub.Complete(ask())
    code = await asyncio.to_thread(cli_main, ["usage", "--address", gateway.server.address])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == [
        "TENANT", "MODEL", "UPSTREAM", "LABELS", "REQUESTS", "ESTIMATED", "HITS", "IN", "OUT",
        "REASONING", "CACHED", "COST", "$", "SAVED", "$",
    ]  # fmt: skip
    cost = f"{miss.cost_usd:.6f}"
    row, total = out[1].split(), out[-1].split()
    assert row[:6] == ["default", FAKE_MODEL, "up0", "2", "0", "1"]  # no labels
    assert row[-2:] == [cost, cost]
    assert (total[:4], total[-2:]) == (["TOTAL", "2", "0", "1"], [cost, cost])


@pytest.mark.xdist_group("node_client")  # its `tsc` build beside the Node client's tests
async def test_the_node_client_reads_hits_and_savings(
    node_scenarios: Path,  # noqa: F811 - fixture
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
) -> None:
    """The Node client's GetUsage rows and total carry `cacheHits` and `savedCostUsd`."""
    gateway = await _priced_gateway(upstream, start_gateway, None)
    upstream.script(USAGE)
    miss = (await gateway.stub.Complete(ask())).metadata
    await settled(gateway)
    await gateway.stub.Complete(ask())
    result = await run_against(node_scenarios, gateway, "usage-savings")
    expected = [2, 1, pico(miss.cost_usd) / PICO]
    assert result == {"rows": [expected], "total": expected}
