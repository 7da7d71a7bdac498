"""grpc core must not cancel calls that the gateway's admission would still take."""

from __future__ import annotations

from service.rpc_boundary import pending_call_options


def test_pending_limit_covers_every_admitted_and_queued_call() -> None:
    """The soft pending limit is at least in-flight + queued, the hard limit above it."""
    options = dict(pending_call_options(5000, 300))
    assert options["grpc.server.max_pending_requests"] == 5300
    assert options["grpc.server.max_pending_requests_hard_limit"] > 5300


def test_pending_limit_never_drops_below_grpc_default() -> None:
    """A small admission limit keeps grpc core's own default of 1000 pending calls."""
    options = dict(pending_call_options(10, 0))
    assert options["grpc.server.max_pending_requests"] == 1000
