"""Assertions on gRPC errors and their google.rpc details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


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
