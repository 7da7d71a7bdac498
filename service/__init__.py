"""llm-gateway: a typed gRPC gateway in front of OpenAI-compatible LLM providers."""

from service.otel_context import import_otel_context

import_otel_context()  # before anything imports OpenTelemetry: see `otel_context`
