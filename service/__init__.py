"""llm-gateway: a typed gRPC gateway in front of OpenAI-compatible LLM providers."""
