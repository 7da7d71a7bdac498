"""grpc core must not cancel calls that the gateway's admission would take or shed."""

from __future__ import annotations

from service.rpc_boundary import pending_call_options


def test_pending_limit_covers_every_admitted_and_queued_call_and_a_burst() -> None:
    """The soft pending limit is in-flight + queued and 10,000 more (a burst admission
    sheds with OVERLOADED, not grpc with CANCELLED), the hard limit above it."""
    options = dict(pending_call_options(5000, 300))
    assert options["grpc.server.max_pending_requests"] == 15_300
    assert options["grpc.server.max_pending_requests_hard_limit"] > 15_300


def test_pending_limit_fits_grpcs_c_ints() -> None:
    """The largest admission the config takes still gives limits gRPC can hold."""
    options = dict(pending_call_options(2**30 - 1, 0))
    assert options["grpc.server.max_pending_requests_hard_limit"] <= 2**31 - 1
