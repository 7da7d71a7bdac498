"""OpenTelemetry's SDK, imported whatever the `OTEL_*` variables it reads on import say.

`opentelemetry.sdk.trace` reads `OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT` as it is imported, for
a module constant kept for backward compatibility that nothing reads, and raises its
ValueError for a value that is no whole number from 0. Imported with the gateway's
modules, every command (`llm-gateway models --help` too, which reads no telemetry) ended
in that traceback, status 1. So it is imported here with such a value hidden: the tracer
provider reads the variable again as it is built, and `setup` makes a bad one a config
error naming it before then. (The SDK's other modules the gateway imports read no
variable they can refuse on import: resources, metrics and exporters read theirs as
they are built.)

This module imports no SDK module at its top: `service.telemetry` calls
`import_sdk_trace` before it imports any.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# The one variable the installed SDK refuses on import (opentelemetry-sdk 1.45).
READ_ON_IMPORT = "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"


def span_limit_problem(value: str) -> str | None:
    """Why the SDK's `SpanLimits` refuses `value` for a span limit, else None: it takes
    a whole number from 0, or an empty value (no limit)."""
    try:
        is_limit = not value.strip() or int(value) >= 0
    except ValueError:
        is_limit = False
    return None if is_limit else f"{value!r} is not a whole number from 0"


def refused_on_import(environ: Mapping[str, str]) -> bool:
    """Whether importing the SDK's trace module would raise for `environ`."""
    value = environ.get(READ_ON_IMPORT)
    return value is not None and span_limit_problem(value) is not None


def import_sdk_trace() -> None:
    """Import `opentelemetry.sdk.trace`, with `READ_ON_IMPORT` hidden from it while it
    is imported when its value would make the import raise."""
    if not refused_on_import(os.environ):
        return  # imported with the rest, by what imports it
    value = os.environ.pop(READ_ON_IMPORT)
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    finally:
        os.environ[READ_ON_IMPORT] = value
