"""Traces, metrics and the per-call overhead figure, behind a small hook interface.

setup.py    providers and exporters from `OTEL_*` variables
outages.py  a collector outage logged as a few lines, not one per retry
metrics.py  the instruments
tracing.py  attribute names, the per-RPC scope
core.py     `Telemetry` and the hooks other modules call
sdk_import.py  the SDK imported whatever the variables it reads on import say
"""

from service.telemetry.sdk_import import import_sdk_trace

import_sdk_trace()  # before the imports below import the SDK: it can raise on import

from service.telemetry.core import (  # noqa: E402
    AttemptSpan,
    Telemetry,
    activate,
    active,
    record_cache_hit,
    record_retry,
    record_upstream_error,
    set_breaker_state,
)
from service.telemetry.setup import TelemetrySetupError  # noqa: E402
from service.telemetry.tracing import (  # noqa: E402
    OVERHEAD_TRAILER,
    RpcScope,
    add_rpc_queued_ms,
    mark_multi_call_rpc,
    ms_since_rpc_start,
    rpc_queued_ms,
)

__all__ = [
    "OVERHEAD_TRAILER",
    "AttemptSpan",
    "RpcScope",
    "Telemetry",
    "TelemetrySetupError",
    "activate",
    "active",
    "add_rpc_queued_ms",
    "mark_multi_call_rpc",
    "ms_since_rpc_start",
    "record_cache_hit",
    "record_retry",
    "record_upstream_error",
    "rpc_queued_ms",
    "set_breaker_state",
]
