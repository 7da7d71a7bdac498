"""Assertions on gRPC errors and their google.rpc details, and a server that sends
details no client can decode."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

STATUS_DETAILS_TRAILER = "grpc-status-details-bin"
# A `grpc-status-details-bin` value that is no `google.rpc.Status`: a varint that never ends.
GARBLED_DETAILS = b"\xff\xff\xff\xff\x0f"


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried; fails the test when absent."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}"
    return status


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """BadRequest field violations by field path."""
    for detail in rich_status(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return {v.field: v.description for v in bad_request.field_violations}
    raise AssertionError("no BadRequest detail")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail, whose domain is the gateway's, as the README says of every one."""
    for detail in rich_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "llmgateway.v1", info
            return info
    raise AssertionError("no ErrorInfo detail")


def retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay in seconds, if any."""
    for detail in rich_status(error).details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return None


def trailer(error: grpc.aio.AioRpcError, key: str) -> str | None:
    """A trailing-metadata value of a failed call."""
    for item in error.trailing_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


class GarbledDetailsService(pb_grpc.CompletionServiceServicer):
    """Fails each call INVALID_ARGUMENT "refused" with a `grpc-status-details-bin` trailer
    of its own: by default one that is no `google.rpc.Status`, as a proxy on the way might
    leave one; `trailers`, other trailers beside it."""

    def __init__(
        self, details: bytes = GARBLED_DETAILS, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._details = details
        self._trailers = trailers

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self.fail(context)

    async def CompleteStream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self.fail(context)

    async def fail(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_trailing_metadata(((STATUS_DETAILS_TRAILER, self._details), *self._trailers))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")


@contextlib.asynccontextmanager
async def garbled_details_server(
    details: bytes = GARBLED_DETAILS, trailers: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[str]:
    """A `GarbledDetailsService` on loopback sending `details` and `trailers`: its address."""
    server = grpc.aio.server()
    service = GarbledDetailsService(details, trailers)
    pb_grpc.add_CompletionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
