"""`python -m service serve --config PATH`: the same as `llm-gateway serve`."""

from service.early_signals import hold
from service.grpc_core_logs import quiet_grpc_core

hold()  # before the imports below, which take most of a second
quiet_grpc_core()  # before the imports below import grpc, which reads it once

from service.command_line import exit_status  # noqa: E402
from service.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
