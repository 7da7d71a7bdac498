"""The `llm-gateway` console script: `gateway_client.cli`, with SIGTERM and SIGINT held
from its first line (`service.early_signals`), before the CLI's slow imports."""

from __future__ import annotations

from service.early_signals import hold
from service.grpc_core_logs import quiet_grpc_core


def main() -> int:
    """Entry point of the `llm-gateway` console script."""
    hold()
    quiet_grpc_core()  # before the CLI imports grpc, which reads it once
    from gateway_client.cli import main as cli_main
    from service.command_line import exit_status

    return exit_status(cli_main())
