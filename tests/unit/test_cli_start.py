"""What `llm-gateway` imports to start a command that only calls the gateway, and
`python -m service serve` to refuse a config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# The `service` modules a calling command shares with the gateway: the console script's
# own (signals held, grpc's logs quieted, OpenTelemetry's context), `serve`'s options,
# and the client's helpers. Each imports the standard library, grpc or protobuf only.
SHARED = {
    "service",
    "service.clock",
    "service.command_line",
    "service.console",
    "service.early_signals",
    "service.errors",
    "service.grpc_core_logs",
    "service.hosts",
    "service.option_variables",
    "service.otel_context",
    "service.retry",
    "service.text_encoding",
}
# What the gateway alone needs: Redis, telemetry, the config's YAML, llama.cpp, aiohttp.
GATEWAY_PACKAGES = {"redis", "opentelemetry", "yaml", "pydantic", "llama_cpp", "aiohttp"}

# The console script's entry point, run as `llm-gateway ARGS`; then what it imported.
STARTED = """
import json, sys
from service.console import main
sys.argv = ["llm-gateway", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


# `python -m service ARGS`; then its status and what it imported.
SERVED = """
import json, runpy, sys
sys.argv = ["python -m service", *json.loads(sys.argv[1])]
try:
    runpy.run_module("service", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    print(json.dumps([exc.code, sorted(sys.modules)]), file=sys.stderr)
"""


def last_line_of(script: str, *argv: str) -> Any:
    """What `script`, run with ARGV, wrote as JSON on its last line of stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "OTEL_PYTHON_CONTEXT"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argv)],
        capture_output=True, text=True, cwd=REPO, env=environ, timeout=60, check=False,
    )  # fmt: skip
    return json.loads(done.stderr.splitlines()[-1])


def imported_by(*argv: str) -> set[str]:
    """The modules `llm-gateway ARGV` had imported when it ended."""
    return set(last_line_of(STARTED, *argv))


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("complete", "--help"),
        ("models", "--help"),
        ("usage", "--help"),
        ("batch", "--help"),
        ("summarize", "--help"),
        ("complete", "Say hi", "--address", "127.0.0.1:1"),  # a call, refused
    ],
)
def test_a_calling_command_starts_without_the_gateway(argv: tuple[str, ...]) -> None:
    """Every command was registered with the modules that run it: `check` and `serve`
    imported the gateway (config, Redis, telemetry, the local model) for each `complete`
    and `models` too, three quarters of their start's CPU. Those commands import it now
    as they run."""
    imported = imported_by(*argv)
    gateway_modules = {
        name for name in imported if name.split(".")[0] == "service" and name not in SHARED
    }
    gateway_packages = {name.split(".")[0] for name in imported} & GATEWAY_PACKAGES
    assert sorted(gateway_modules | gateway_packages) == []
    assert "gateway_client.cli" in imported  # the command did start


def test_check_and_serve_still_import_what_they_run() -> None:
    """The commands that need the gateway get it as they run: `check` with a config
    that is not there reads it (a config error) rather than failing to import."""
    imported = imported_by("check", "--config", str(REPO / "no-such-config.yaml"))
    assert {"service.config", "gateway_client.commands.check"} <= imported


def test_serve_refuses_a_config_before_importing_the_workers(tmp_path: Path) -> None:
    """`serve` with a bad value in its config exits 2 having loaded the config alone:
    it imported the workers' supervisor, the local model and telemetry first."""
    config = tmp_path / "gateway.yaml"
    config.write_text("server:\n  workers: many\n")
    status, imported = last_line_of(SERVED, "serve", "--config", str(config))
    started = {"service.workers", "service.local_model", "service.telemetry", "service.server"}
    assert (status, sorted(started & set(imported))) == (2, [])


def test_serve_refuses_a_config_naming_redis_without_importing_redis(tmp_path: Path) -> None:
    """A config error found past a valid `redis_url` exits 2 without redis-py, which the
    config imported at its top to check a URL's query options: half of the error's CPU."""
    config = tmp_path / "gateway.yaml"
    config.write_text("auth:\n  redis_url: redis://127.0.0.1:6379/0\n  redis_timeout_s: -1\n")
    status, imported = last_line_of(SERVED, "serve", "--config", str(config))
    assert (status, sorted(name for name in imported if name.split(".")[0] == "redis")) == (2, [])


# A Ctrl-C as `check`'s modules are imported (now as the command runs, once the signals
# held from the console script's first line were let go).
CTRL_C_IN_CHECKS_IMPORT = """
import signal, sys

class CtrlCAtTheConfig:
    def find_spec(self, name, path, target=None):
        if name == "service.config":
            signal.raise_signal(signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal's foreground
sys.meta_path.insert(0, CtrlCAtTheConfig())
from service.console import main
sys.argv = ["llm-gateway", "check", "--config", sys.argv[1]]
sys.exit(main())
"""


def test_a_ctrl_c_while_check_imports_its_modules_is_status_130(tmp_path: Path) -> None:
    """As while they were imported with every command, signals held: status 130 (the
    process ends by SIGINT, which a shell reports so), no traceback and no check (the
    config file's absence is not said)."""
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_CHECKS_IMPORT, str(tmp_path / "gone.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")


# A Ctrl-C as `keys` starts, at the import of MODULE: `llm-gateway keys` (the console
# script) or `python -m service keys`, whose first lines hold the signals until `keys` is
# chosen; its own modules are imported after.
CTRL_C_IN_KEYS_START = """
import json, runpy, signal, sys

entry, module, config = json.loads(sys.argv[1])

class CtrlCAtTheModule:
    def find_spec(self, name, path, target=None):
        if name == module:
            signal.raise_signal(signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal's foreground
sys.meta_path.insert(0, CtrlCAtTheModule())
sys.argv = [entry, "keys", "create", "--tenant", "team-a", "--config", config]
if entry == "llm-gateway":
    from service.console import main
    sys.exit(main())
runpy.run_module("service", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("entry", "module"),
    [
        ("llm-gateway", "gateway_client.cli"),  # held
        ("llm-gateway", "service.keys_cli"),
        ("python -m service", "service.main"),  # held
        ("python -m service", "service.keys_cli"),
    ],
)
def test_a_ctrl_c_while_keys_starts_is_status_130(tmp_path: Path, entry: str, module: str) -> None:
    """As for every other command: status 130 (by SIGINT), no traceback and no key (the
    config file's absence is not said). It ended in a KeyboardInterrupt traceback,
    `python -m service keys` for one held as it started too."""
    arguments = json.dumps([entry, module, str(tmp_path / "gone.yaml")])
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_KEYS_START, arguments],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")
