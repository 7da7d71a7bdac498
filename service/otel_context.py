"""OpenTelemetry's runtime context, imported whatever `OTEL_PYTHON_CONTEXT` says.

`opentelemetry.context` loads the runtime context that variable names as it is first
imported (by redis, the gateway's modules, a client command's), and for a name no
installed package provides logs its failure with a traceback and falls back to the
default, `contextvars_context`: every command, `llm-gateway models` too, printed that
traceback, though it then worked. So `service` imports it here first, with such a name
hidden, and `serve` and `check` say it in one warning line (`unknown_context`).

A warning, not a config error: the fallback is the SDK's own rule for this variable, as
for `OTEL_TRACES_SAMPLER`, and `contextvars_context` is the one runtime context installed
and the one asyncio, and the gateway's tracer, need.

Standard library only, until the variable names an unknown context: `service` imports
this module before anything else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CONTEXT = "OTEL_PYTHON_CONTEXT"
DEFAULT_CONTEXT = "contextvars_context"


def unknown_context(environ: Mapping[str, str]) -> str | None:
    """The name `OTEL_PYTHON_CONTEXT` gives that no installed package provides, else
    None (unset or empty: the default, as OpenTelemetry reads it)."""
    name = environ.get(CONTEXT)
    if not name:
        return None
    from importlib.metadata import entry_points

    return None if entry_points(group="opentelemetry_context", name=name) else name


def import_otel_context() -> None:
    """Import `opentelemetry.context` with `OTEL_PYTHON_CONTEXT` hidden from it while it
    is imported when it names a context no package provides: it takes the default then."""
    name = unknown_context(os.environ)
    if name is None:
        return  # imported with the rest, by what imports it
    del os.environ[CONTEXT]
    try:
        import opentelemetry.context  # noqa: F401
    finally:
        os.environ[CONTEXT] = name
