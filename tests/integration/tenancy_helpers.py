"""Helpers for the tenancy and security tests: configs with keys and tenants, errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Mapping
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2

from service.auth import hash_key
from service.config import GatewayConfig
from tests.conftest import gateway_config
from tests.secret_capture import CALLER_KEY_A, CALLER_KEY_B, PROVIDER_KEY, record_emitted

TENANT_KEYS = {"team-a": CALLER_KEY_A, "team-b": CALLER_KEY_B}


def secure_config(
    *base_urls: str,
    tenants: Mapping[str, Any] | None = None,
    auth: Mapping[str, Any] | None = None,
    **sections: Any,
) -> GatewayConfig:
    """A gateway config with caller keys for team-a and team-b and the fake provider key."""
    config = gateway_config(
        *base_urls,
        auth={
            "mode": "keys",
            "keys": [{"sha256": hash_key(k), "tenant": t} for t, k in TENANT_KEYS.items()],
            **(auth or {}),
        },
        tenants=dict(tenants or {"team-a": {}, "team-b": {}}),
        **sections,
    )
    upstreams = tuple(dataclasses.replace(u, api_key=PROVIDER_KEY) for u in config.upstreams)
    return dataclasses.replace(config, upstreams=upstreams)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `key`."""
    return (("authorization", f"Bearer {key}"),)


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the key of `tenant`."""
    return bearer(TENANT_KEYS[tenant])


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error `call` fails with (recorded for the secret grep); fails if it succeeds."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        record_emitted(exc.code(), exc.details(), exc.trailing_metadata(), exc.debug_error_string())
        return exc
    raise AssertionError(f"expected an RPC error, got {result!r}")


async def stream_error(stream: Any) -> grpc.aio.AioRpcError:
    """The error a server stream fails with (recorded for the secret grep)."""
    return await rpc_error(_drain(stream))


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


def details_of(error: grpc.aio.AioRpcError) -> list[pb_message.Message]:
    """The unpacked `google.rpc.Status` details of an RPC error."""
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            kinds = (
                error_details_pb2.BadRequest,
                error_details_pb2.ErrorInfo,
                error_details_pb2.QuotaFailure,
                error_details_pb2.RetryInfo,
            )
            found: list[pb_message.Message] = []
            for packed in status.details:
                for kind in kinds:
                    if packed.Is(kind.DESCRIPTOR):
                        item = kind()
                        packed.Unpack(item)
                        found.append(item)
            return found
    return []


def detail(error: grpc.aio.AioRpcError, kind: type[Any]) -> Any:
    """The one detail of type `kind`; fails if absent."""
    matches = [d for d in details_of(error) if isinstance(d, kind)]
    assert matches, f"no {kind.__name__} in the details of {error.code()}"
    return matches[0]


def trailer(error: grpc.aio.AioRpcError, name: str) -> str | None:
    """A trailing metadata value of an RPC error."""
    return next((v for k, v in error.trailing_metadata() or () if k == name), None)
