"""Subcommands of the `llm-gateway` CLI, one module each."""
