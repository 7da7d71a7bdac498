"""The Python client's `error_details` on statuses as a caller may receive them."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway_client.errors import error_details


def _error(code: grpc.StatusCode, status: status_pb2.Status) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details="late")


def test_details_of_another_code_than_the_calls_are_left_out_not_raised() -> None:
    """A call whose deadline passed as the gateway sent its error ends DEADLINE_EXCEEDED
    with the error's details (UNAVAILABLE) still in its trailers: gRPC's deadline won
    the race. `error_details` describes the call as it ended, without them.

    Before, it raised ValueError (grpc_status refuses a status whose code is not the
    call's), and a caller's error handling failed on a plain deadline; the fuzzer of the
    RPC boundary saw it about once in 6,000 streams."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="UPSTREAM_TIMEOUT", domain="llmgateway.v1"))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="late", details=[info])
    details = error_details(_error(grpc.StatusCode.DEADLINE_EXCEEDED, status))
    assert (details.code, details.message, details.reason) == ("DEADLINE_EXCEEDED", "late", "")


def test_details_of_the_calls_own_code_are_read() -> None:
    """The usual case: the status in the trailers is the call's, and its details count."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="UPSTREAM_TIMEOUT", domain="llmgateway.v1"))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="late", details=[info])
    details = error_details(_error(grpc.StatusCode.UNAVAILABLE, status))
    assert details.reason == "UPSTREAM_TIMEOUT"
