"""The `llm-gateway` console script: `gateway_client.cli`, with SIGTERM and SIGINT held
from its first line (`service.early_signals`), before the CLI's slow imports."""

from __future__ import annotations

from service.early_signals import hold


def main() -> int:
    """Entry point of the `llm-gateway` console script."""
    hold()
    from gateway_client.cli import main as cli_main

    return cli_main()
