"""`llm-gateway models`: the model catalog as a table."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from gateway_client.client import GatewayClient
from gateway_client.connection import add_connection_arguments, connection
from gateway_client.enums import enum_name
from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb


def register(subparsers: Any) -> None:
    """Add the `models` subcommand."""

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models", help="list models, context windows, prices and upstream health"
    )
    add_connection_arguments(parser)
    parser.set_defaults(handler=models_command)


def price_text(usd_per_million: float) -> str:
    """A price as the catalog holds it: cents always shown, and every digit past them
    (DeepSeek's cache-hit input is 0.028, which two decimals would print as 0.03)."""
    cents = f"{usd_per_million:.2f}"
    return cents if float(cents) == usd_per_million else repr(usd_per_million)


def cached_price_text(pricing: pb.Pricing) -> str:
    """The cached-input price, or `-` where the catalog sets none (cached input is then
    priced as input)."""
    if not pricing.HasField("cached_input_usd_per_million"):
        return "-"
    return price_text(pricing.cached_input_usd_per_million)


def format_models(response: pb.ListModelsResponse) -> str:
    """The catalog as an aligned text table."""
    rows = [("MODEL", "CONTEXT", "IN $/1M", "CACHED IN $/1M", "OUT $/1M", "UPSTREAMS")]
    for model in response.models:
        pricing = model.pricing
        upstreams = ", ".join(
            f"{u.name}({enum_name(pb.UpstreamHealth, u.health, prefix='UPSTREAM_HEALTH_').lower()})"
            for u in model.upstreams
        )
        rows.append(
            (
                model.name,
                str(model.context_window),
                price_text(pricing.input_usd_per_million),
                cached_price_text(pricing),
                price_text(pricing.output_usd_per_million),
                upstreams,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        # The last column unpadded: no trailing blanks for a diff or a pipe to carry.
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def models_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway models`."""
    async with GatewayClient(args.address, **connection(args)) as client:
        try:
            response = await client.list_models()
        except grpc.aio.AioRpcError as error:
            print(error_details(error).describe(), file=sys.stderr)
            return 1
    print(format_models(response))
    return 0
