"""`llm-gateway usage`: requests, tokens, cost and what the cache saved, from the gateway's
ledger, as a table."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from gateway_client.client import GatewayClient
from gateway_client.connection import add_connection_arguments, connection, text_argument
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb

_UNITS = {"m": 60, "h": 3600, "d": 86400}
# The ledger counts cost in pico-dollars.
_PICO = 10**12


def utc_now() -> dt.datetime:
    """The wall clock, in UTC."""
    return dt.datetime.now(dt.UTC)


def parse_time(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """`30m`, `24h`, `7d` (ago) or an ISO 8601 time (UTC unless it says otherwise)."""
    match = re.fullmatch(r"(\d+)([mhd])", value.strip())
    if match:
        current = now or utc_now()
        try:
            return current - dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
        except OverflowError:  # argparse turns only ValueError and TypeError into usage
            raise argparse.ArgumentTypeError(f"{value!r} reaches back before year 1") from None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (30m, 24h, 7d) nor an ISO 8601 time"
        ) from None
    if not when.tzinfo:
        return when.replace(tzinfo=dt.UTC)
    try:
        # The request's Timestamp is in UTC: an offset can take it past a datetime's years.
        return when.astimezone(dt.UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{value!r} is outside years 1 to 9999 in UTC") from None


def parse_label(value: str) -> tuple[str, str]:
    """`key=value`."""
    key, sep, label = text_argument(value).partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE")
    return key, label


def register(subparsers: Any, *, clock: Callable[[], dt.datetime] = utc_now) -> None:
    """Add the `usage` subcommand; `clock` is read once, for every relative time."""
    # One reading for both bounds, whatever their order: a reading each made
    # `--until 1h --since 1h` a window ending before it starts.
    window_bound = functools.partial(parse_time, now=clock())
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "usage",
        help="requests, cache hits, tokens, cost and savings by tenant, model, upstream and label",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--tenant", type=text_argument, default="", help="tenant ('*': all, admins only)"
    )
    parser.add_argument("--model", type=text_argument, default="", help="only this model")
    parser.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        help="KEY=VALUE; only rows carrying it (repeatable)",
    )
    parser.add_argument(
        "--since", type=window_bound, help="window start: 30m, 24h, 7d (ago) or an ISO 8601 time"
    )
    parser.add_argument(
        "--until", type=window_bound, help="window end: 30m, 24h, 7d (ago) or an ISO 8601 time"
    )
    parser.set_defaults(handler=usage_command, usage_error=parser.error)


def window_error(since: dt.datetime | None, until: dt.datetime | None) -> str | None:
    """Why `--since` and `--until` make no window, or None.

    The gateway would refuse the call too (INVALID_ARGUMENT on `end_time`); saying so
    here names the options the user typed rather than the request's fields.
    """
    if since is None or until is None or until >= since:
        return None
    return (
        f"argument --until: {until.isoformat(timespec='seconds')} is before"
        f" --since {since.isoformat(timespec='seconds')}"
    )


# The row dimensions, then the counters (right-aligned).
_HEADER = (
    *("TENANT", "MODEL", "UPSTREAM", "LABELS"),
    *("REQUESTS", "ESTIMATED", "HITS", "IN", "OUT", "REASONING", "CACHED", "COST $", "SAVED $"),
)


def _row(row: pb.UsageRow, *, name: str | None = None) -> tuple[str, ...]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(row.labels.items()))
    return (
        name if name is not None else row.tenant,
        row.model,
        row.upstream,
        labels,
        str(row.requests),
        str(row.estimated_requests),
        str(row.cache_hits),
        str(row.usage.input_tokens),
        str(row.usage.output_tokens),
        str(row.usage.reasoning_tokens),
        str(row.usage.cached_input_tokens),
        f"{row.cost_usd:.6f}",
        f"{row.saved_cost_usd:.6f}",
    )


def total_of(rows: Sequence[pb.UsageRow]) -> pb.UsageRow:
    """The sum of `rows`, its cost and savings added in pico-dollars (the ledger's unit)
    so that they drift by no float's error however many rows there are."""
    total = pb.UsageRow()
    cost_pico = saved_pico = 0
    for row in rows:
        total.requests += row.requests
        total.estimated_requests += row.estimated_requests
        total.cache_hits += row.cache_hits
        total.usage.input_tokens += row.usage.input_tokens
        total.usage.output_tokens += row.usage.output_tokens
        total.usage.reasoning_tokens += row.usage.reasoning_tokens
        total.usage.cached_input_tokens += row.usage.cached_input_tokens
        total.usage.estimated |= row.usage.estimated
        cost_pico += round(row.cost_usd * _PICO)
        saved_pico += round(row.saved_cost_usd * _PICO)
    total.cost_usd = cost_pico / _PICO
    total.saved_cost_usd = saved_pico / _PICO
    return total


def format_usage(response: pb.GetUsageResponse) -> str:
    """The ledger rows and their total as an aligned text table.

    The total is the rows' sum, not the response's `total`: read in pages, that is the
    last page's, which also counts calls recorded after earlier pages were read (in rows
    printed before them, or in new rows sorting before the last page), so that it
    disagreed with the column above it.
    """
    rows: list[tuple[str, ...]] = [_HEADER]
    rows.extend(_row(r) for r in response.rows)
    rows.append(_row(total_of(response.rows), name="TOTAL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = range(4, len(widths))
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


async def usage_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway usage`."""
    if error := window_error(args.since, args.until):
        args.usage_error(error)  # exits 2, before any call
    async with GatewayClient(args.address, **connection(args)) as client:
        try:
            response = await client.usage(
                tenant=args.tenant,
                model=args.model,
                labels=dict(args.label),
                since=args.since,
                until=args.until,
            )
        except grpc.aio.AioRpcError as error:
            print(error_details(error).describe(), file=sys.stderr)
            return 1
    print(format_usage(response))
    return 0
