"""`python -m service serve`: bad command-line overrides fail like config errors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from service.main import main
from tests.integration.pki import issue, make_ca


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--listen", "nowhere"], "listen must be HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], "port must be 0..65535"),
        (["--workers", "-1"], "workers must be 0..1024"),
    ],
)
def test_a_bad_override_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], problem: str
) -> None:
    """A bad --listen or --workers exits 2 with a one-line config error naming the flag
    typed, not a traceback.

    Before, it named both flags (`--listen/--workers: ...`), whichever was wrong.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("local_model: {enabled: never}\n")
    assert main(["serve", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-gateway: config error: command line: {flags[0]}: ")
    assert ({"--listen", "--workers"} - {flags[0]}).pop() not in err
    assert str(config) not in err
    assert problem in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_auth_off_on_a_public_address_from_listen_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    """`serve --listen 0.0.0.0:0` with auth off is refused naming `--listen`: the file
    says 127.0.0.1, and the operator is told how to allow it.

    Before, the error blamed `server.listen` in a file that does not hold 0.0.0.0.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    flags = ["--listen", "0.0.0.0:0", "--workers", workers]
    assert main(["serve", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert (
        "llm-gateway: config error: command line: --listen: refusing to listen on 0.0.0.0:0" in err
    )
    assert "server.listen" not in err
    assert "auth.mode: keys" in err
    assert "mTLS" in err
    assert "auth.allow_auth_off_on_public_listen: true" in err


def test_listen_sharing_the_files_health_listen_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--listen 127.0.0.1:P` beside the file's `health_listen: localhost:P` is refused
    before the start, naming the flag and both addresses."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server: {listen: '127.0.0.1:0', health_listen: 'localhost:50599'}\n"
        "local_model: {enabled: never}\n"
    )
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:50599"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-gateway: config error: command line: --listen: ")
    assert "health_listen localhost:50599 and listen 127.0.0.1:50599 would listen" in err


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_an_unreadable_tls_file_exits_2_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """A certificate file that is not there is a config error at load, not a traceback."""
    files = {name: tmp_path / name for name in ("cert_file", "key_file", "client_ca_file")}
    for name, path in files.items():
        if name != key:
            path.write_text("PEM\n")
    tls = ", ".join(f"{name}: {path}" for name, path in files.items())
    config = tmp_path / "gateway.yaml"
    config.write_text(f"server: {{tls: {{{tls}}}}}\nlocal_model: {{enabled: never}}\n")
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-gateway: config error: ")
    assert f"server.tls.{key}" in err
    assert str(files[key]) in err


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'"),
        ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER: unknown exporter 'statsd'"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: OTLP protocol 'http/json'",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TIMEOUT": "10s"},
            "OTEL_EXPORTER_OTLP_TIMEOUT: OTLP timeout '10s' is not a number of seconds",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": ""},
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT: OTLP timeout '' is not a number of seconds",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
            "OTEL_EXPORTER_OTLP_COMPRESSION: OTLP compression 'zstd' is not one of gzip,",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "256"},
            "OTEL_BSP_MAX_QUEUE_SIZE: a span export batch of 512 "
            "(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) cannot exceed the queue of 256",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "0"},
            "OTEL_BSP_SCHEDULE_DELAY: '0' is not a number above 0",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SPAN_EVENT_COUNT_LIMIT": "-1"},
            "OTEL_SPAN_EVENT_COUNT_LIMIT: '-1' is not a whole number from 0",
        ),
    ],
)
def test_an_otel_variable_the_gateway_cannot_use_exits_2_naming_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    named: str,
) -> None:
    """An unknown OTEL_* exporter or protocol, or an OTLP timeout or compression the
    exporters cannot read, or a span batch setting or span limit the SDK refuses, is a
    one-line config error, not a traceback.

    Before, the server's start raised TelemetrySetupError through `serve`: a traceback
    and status 1; and the gRPC exporters' own ValueError for a timeout that is no number,
    as the SDK's for a span queue below its batch (`OTEL_BSP_MAX_QUEUE_SIZE=256`).
    """
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    assert main(["serve", "--config", str(config), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"llm-gateway: config error: environment: {named}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_auth_off_on_a_public_address_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    """Refusing to serve unauthenticated callers publicly is a one-line config error.

    Before, `InsecureListen` escaped `serve` (and each worker) as a traceback, status 1.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '0.0.0.0:0'}\nlocal_model: {enabled: never}\n")
    assert main(["serve", "--config", str(config), "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert f"llm-gateway: config error: {config}: server.listen: refusing to listen" in err
    # It says how to listen publicly safely, as README's Security does.
    assert "auth.mode: keys" in err
    assert "mTLS (server.tls.client_ca_file, require_client_cert: true" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_auth_off_on_a_public_address_from_the_environment_names_the_variable(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    """An address set by LLM_GATEWAY__SERVER__LISTEN is refused naming the variable, as
    every error in a key the environment set does: the file says 127.0.0.1.

    Before, the error blamed `server.listen` in a file that does not hold 0.0.0.0.
    """
    monkeypatch.setenv("LLM_GATEWAY__SERVER__LISTEN", "0.0.0.0:0")
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    assert main(["serve", "--config", str(config), "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert f"{config}: server.listen: refusing to listen on 0.0.0.0:0" in err
    assert "(set from the environment: LLM_GATEWAY__SERVER__LISTEN)" in err
    # --listen replaces what the variable said: then the variable is not to blame.
    assert main(["serve", "--config", str(config), "--listen", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "LLM_GATEWAY__SERVER__LISTEN" not in err
    assert "command line: --listen: refusing to listen on 0.0.0.0:0" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_prometheus_port_exits_1_naming_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], workers: str
) -> None:
    """A metrics port already in use fails like a taken gRPC port: one line, status 1,
    from `serve` itself or from the worker that could not listen.

    Before, the OSError from the Prometheus HTTP server escaped `serve` as a traceback,
    and a worker's ListenError was a traceback on the worker's stderr.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.yaml"
        config.write_text(
            "server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n"
            f"telemetry: {{prometheus_port: {port}}}\n"
        )
        assert main(["serve", "--config", str(config), "--workers", workers]) == 1
    err = capfd.readouterr().err  # the workers' stderr too: they share its descriptor
    assert f"llm-gateway: cannot listen on 127.0.0.1:{port} for Prometheus metrics" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "bad_host",
    [
        ("no-such-host.invalid", "no name resolves 'no-such-host.invalid'"),  # RFC 6761
        ("192.0.2.7", "192.0.2.7 is no address of this machine"),  # TEST-NET-1
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_prometheus_host_of_no_address_here_is_a_config_error_naming_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_host: tuple[str, str], workers: str
) -> None:
    """A `telemetry.prometheus_host` the endpoint cannot listen on (unresolvable, or not
    this machine's) exits 2 naming the file and the key, from `serve` or its workers, in
    the words a `server.listen` alike gets.

    Before, it was a listen failure (status 1) naming neither file nor key, as a taken
    port is; then a config error in the resolver's words ("Name or service not known").
    """
    host, why = bad_host
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n"
        f"telemetry: {{prometheus_port: 0, prometheus_host: '{host}'}}\n"
    )
    assert main(["serve", "--config", str(config), "--workers", workers]) == 2
    err = capfd.readouterr().err
    assert (
        f"llm-gateway: config error: {config}: telemetry.prometheus_host: "
        f"cannot listen on {host}:0 for Prometheus metrics: {why}\n"
    ) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "bad_host",
    [
        ("no-such-host.invalid", "no name resolves 'no-such-host.invalid'"),  # RFC 6761
        ("192.0.2.7", "192.0.2.7 is no address of this machine"),  # TEST-NET-1
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("key", ["listen", "health_listen"])
def test_a_listen_host_of_no_address_here_is_a_config_error_naming_it(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    bad_host: tuple[str, str],
    workers: str,
    key: str,
) -> None:
    """A `server.listen` or `server.health_listen` whose host no name resolves, or that is
    another machine's, exits 2 naming the file, the key and why, from `serve` or its
    supervisor. Before, it exited 1 as "the address is taken or not local" (the
    supervisor: "Cannot assign requested address"), naming no key, where a
    `telemetry.prometheus_host` alike is a config error."""
    host, why = bad_host
    addresses = {"listen": "127.0.0.1:0", key: f"{host}:0"}
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {{listen: '{addresses['listen']}', allow_insecure_public_listen: true"
        + (f", health_listen: '{host}:0'" if key == "health_listen" else "")
        + "}\nlocal_model: {enabled: never}\n"
    )
    assert main(["serve", "--config", str(config), "--workers", workers]) == 2
    err = capfd.readouterr().err
    assert f"config error: {config}: server.{key}: cannot listen on {host}:0: {why}\n" in err
    assert "Traceback" not in err
    assert "Failed to add port" not in err  # grpc's own line, before the error that says why


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "server: {listen: '127.0.0.1:0'}\nupstreams:\n  - {name: up, models: [m],"
            " base_url: 'http://127.0.0.1:9/v1', api_key: sk-from-the-file-0123}\n",
            "upstreams[0].api_key: never read from the file",
        ),
        (
            "server: {grace_period_s: 1}\nserver: {listen: '127.0.0.1:0'}\n",
            "duplicate key 'server'",
        ),
        (
            "flags: {server.listen: --listen}\nserver: {listen: '127.0.0.1:0'}\n",
            "flags: unknown key",
        ),
    ],
)
def test_a_key_in_the_file_or_a_repeated_key_exits_2(tmp_path: Path, text: str, named: str) -> None:
    """`serve` refuses a provider key written in the file, a key given twice, or `flags:`
    (which only the command line sets), in one line.

    Before, all three started the gateway: the first sending the file's key upstream, the
    second with the first `server` section silently dropped, the third blaming `--listen`
    for errors in the file's `server.listen`.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text(text + "local_model: {enabled: never}\n")
    command = [sys.executable, "-m", "service", "serve", "--config", str(config), "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"llm-gateway: config error: {config}: ")
    assert named in done.stderr
    assert done.stderr.count("\n") == 1
    assert "sk-from-the-file" not in done.stderr


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("environment", "config"),
    [
        ({}, "config/gateway.yaml"),
        ({"LLM_GATEWAY_CONFIG": "/etc/llm-gateway/mine.yaml"}, "/etc/llm-gateway/mine.yaml"),
        ({"LLM_GATEWAY_CONFIG": "/etc/mine.yaml", "CONFIG": "theirs.yaml"}, "theirs.yaml"),
    ],
)
def test_make_run_serves_the_config_the_operator_names(
    environment: dict[str, str], config: str
) -> None:
    """`make run` reads `CONFIG`, else `$LLM_GATEWAY_CONFIG`, else config/gateway.yaml.

    Before, it always passed its own `--config`, so `$LLM_GATEWAY_CONFIG` was ignored.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "LLM_GATEWAY_CONFIG")}
    dry_run = subprocess.run(
        ["make", "--dry-run", "--always-make", "run"],
        cwd=REPO, env={**env, **environment}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    (serve,) = [line for line in dry_run.stdout.splitlines() if " -m service serve" in line]
    assert serve.endswith(f" -m service serve --config {config}")


def test_a_local_model_path_naming_no_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`model_path: ""` is a one-line config error, not the start's ValueError traceback."""
    config = tmp_path / "gateway.yaml"
    config.write_text('local_model: {enabled: always, model_path: ""}\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-gateway: config error: ")
    assert "local_model: model_path must name a file" in err


def test_an_admin_entry_for_every_unlisted_tenant_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tenants: {"*": {is_admin: true}}` would let every tenant without its own entry
    (a mistyped key's tenant included) read all tenants' usage: serve refuses it."""
    config = tmp_path / "gateway.yaml"
    config.write_text("tenants: {'*': {is_admin: true}}\nlocal_model: {enabled: never}\n")
    assert main(["serve", "--config", str(config), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-gateway: config error: {config}: tenants.*.is_admin: ")
    assert "Traceback" not in err


def test_empty_variables_are_unset_and_an_empty_config_flag_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty `$LLM_GATEWAY_CONFIG` (or `$LLM_GATEWAY_LOG_LEVEL`) is unset, as for
    `make run`: `serve` reads config/gateway.yaml. `--config ""` is a usage error.

    Before, both variables were taken as given: the config error named no file
    (`: (top level): cannot read: Is a directory`), the log level was refused.
    """
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gateway.yaml").write_text("bogus: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM_GATEWAY_CONFIG", "")
    monkeypatch.setenv("LLM_GATEWAY_LOG_LEVEL", "")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == "llm-gateway: config error: config/gateway.yaml: bogus: unknown key\n"
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--config", ""])
    assert usage.value.code == 2
    assert "argument --config: names no file" in capsys.readouterr().err


def test_a_log_level_flag_leaves_a_bad_variable_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--log-level` wins over `$LLM_GATEWAY_LOG_LEVEL`: a bad variable beside it is not
    refused (the start goes on, here to the config's own error)."""
    config = tmp_path / "gateway.yaml"
    config.write_text("bogus: 1\n")
    monkeypatch.setenv("LLM_GATEWAY_LOG_LEVEL", "verbose")
    assert main(["serve", "--config", str(config), "--log-level", "warning"]) == 2
    assert capsys.readouterr().err == f"llm-gateway: config error: {config}: bogus: unknown key\n"


_COMMANDS = {
    "serve": ["-m", "service", "serve", "--workers", "1"],
    "check": ["-m", "gateway_client.cli", "check"],
}


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize(
    ("text", "environ", "said"),
    [
        pytest.param(
            "",
            {
                "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:0",
                "LLM_GATEWAY__Server__Listen": "127.0.0.1:1",
            },
            "LLM_GATEWAY__SERVER__LISTEN: server.listen: also set by LLM_GATEWAY__Server__Listen",
            id="one-key-from-two-variables",
        ),
        pytest.param(
            "",
            {"LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:0", "LLM_GATEWAY__SERVER": "{workers: 1}"},
            "LLM_GATEWAY__SERVER__LISTEN: server.listen: also set by LLM_GATEWAY__SERVER, which "
            "sets all of server",
            id="a-key-and-its-section-from-two-variables",
        ),
        pytest.param(
            "resilience: {attempts: 017}\n",
            {},
            "{config}: resilience.attempts: 017 reads as 15 in YAML 1.1: write 17, or 0o17",
            id="octal-in-the-file",
        ),
        pytest.param(
            "",
            {"LLM_GATEWAY__RESILIENCE__ATTEMPTS": "1:30"},
            "{config}: resilience.attempts: 1:30 reads as 90 in YAML 1.1 (base 60, as a time): "
            "write 90 (set from the environment: LLM_GATEWAY__RESILIENCE__ATTEMPTS)",
            id="base-60-from-a-variable",
        ),
        pytest.param(
            "auth: {keys: [{sha256: " + "a" * 64 + ", tenant: TeamA}]}\n",
            {"LLM_GATEWAY__BUDGETS__TEAMA__USD": "10"},
            "LLM_GATEWAY__BUDGETS__TEAMA__USD: budgets.teama: the file lists no entry 'teama'",
            id="a-tenant-added-from-a-variable",
        ),
    ],
)
def test_a_config_that_would_not_do_what_it_says_exits_2_from_serve_and_check(
    tmp_path: Path, command: str, text: str, environ: dict[str, str], said: str
) -> None:
    """`serve` and `check` alike refuse, with exit status 2 and one line naming the key
    and the variable: two variables setting one key, a number YAML 1.1 reads as octal or
    base 60, and a variable adding a tenant. Before, both took them without a word."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text + "local_model: {enabled: never}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    done = subprocess.run(
        [sys.executable, *_COMMANDS[command], "--config", str(config)],
        env={**env, **environ}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("llm-gateway: config error: " + said.format(config=config))
    assert done.stderr.count("\n") == 1
    assert "listening" not in done.stdout


def _run_with_otel(
    tmp_path: Path, argv: list[str], telemetry: str, otel: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`argv` run with the `otel` variables set (a config of `telemetry` given, unless it
    asks for --help), asserted to end in no traceback."""
    config = tmp_path / "gateway.yaml"
    config.write_text(telemetry + "local_model: {enabled: never}\n")
    done = subprocess.run(
        [sys.executable, *argv, *(() if "--help" in argv else ("--config", str(config)))],
        env={**os.environ, **otel}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    return done


_UNKNOWN_PROPAGATOR = "OTEL_PROPAGATORS: Propagator b3multi not found."


@pytest.mark.parametrize(
    ("argv", "telemetry", "said"),
    [
        (_COMMANDS["serve"], "", _UNKNOWN_PROPAGATOR),
        (_COMMANDS["check"], "", _UNKNOWN_PROPAGATOR),
        (_COMMANDS["check"], "telemetry: {enabled: false}\n", None),
        (["-m", "gateway_client.cli", "models", "--help"], "", None),
    ],
)
def test_a_propagator_no_package_provides_is_a_config_error_not_a_traceback(
    tmp_path: Path, argv: list[str], telemetry: str, said: str | None
) -> None:
    """`OTEL_PROPAGATORS` naming a propagator no installed package provides (`b3multi`
    comes in a package of its own, or a typo) is a one-line config error naming the
    variable from `serve` and `check` (exit 2); with telemetry off, whatever OTEL_* says,
    it is not; and a command that reads no telemetry (a client's) runs.

    Before, OpenTelemetry raised its ValueError as the gateway's modules were imported:
    every command, `llm-gateway models --help` too, ended in a traceback and status 1.
    """
    done = _run_with_otel(tmp_path, argv, telemetry, {"OTEL_PROPAGATORS": "b3multi"})
    if said is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stdout + done.stderr
        *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
        assert last.startswith(f"llm-gateway: config error: environment: {said}")


_BAD_SPAN_COUNT_LIMIT = "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT: 'x' is not a whole number from 0"


@pytest.mark.parametrize(
    ("argv", "telemetry", "said"),
    [
        (_COMMANDS["serve"], "", _BAD_SPAN_COUNT_LIMIT),
        (_COMMANDS["check"], "", _BAD_SPAN_COUNT_LIMIT),
        (_COMMANDS["check"], "telemetry: {enabled: false}\n", None),
        (["-m", "gateway_client.cli", "models", "--help"], "", None),
        (["-m", "gateway_client.cli", "serve", "--help"], "", None),
        (["-m", "service", "serve", "--help"], "", None),
    ],
)
def test_a_span_limit_the_sdk_reads_on_import_is_a_config_error_not_a_traceback(
    tmp_path: Path, argv: list[str], telemetry: str, said: str | None
) -> None:
    """`OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT` that is no whole number from 0 is, with traces
    exported, a one-line config error naming it from `serve` and `check` (exit 2), as the
    other span limits are; with telemetry off it is not; and a command that reads no
    telemetry (a client's, any `--help`) runs.

    Before, OpenTelemetry's SDK raised its ValueError as its trace module was imported,
    with the gateway's modules: every command, `llm-gateway models --help` too, ended in
    a traceback and status 1.
    """
    otel = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "x"}
    done = _run_with_otel(tmp_path, argv, telemetry, otel)
    if said is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stdout + done.stderr
        *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
        assert last == f"llm-gateway: config error: environment: {said}"


_RETRYABLE_CODES = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES"
_HTTP_CREDENTIALS = "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER"
_NO_METER_PROVIDER = "no installed package provides the meter provider 'bogus'"


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize(
    ("otel", "said"),
    [
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRICS_EXEMPLAR_FILTER": "bogus"},
            "OTEL_METRICS_EXEMPLAR_FILTER: 'bogus' is not one of always_on, always_off, "
            "trace_based",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "-1"},
            "OTEL_METRIC_EXPORT_INTERVAL: '-1' is not a number of milliseconds above 0",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_TIMEOUT": "0"},
            "OTEL_METRIC_EXPORT_TIMEOUT: '0' is not a number of milliseconds above 0",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", _RETRYABLE_CODES: "unavailable, bogus"},
            f"{_RETRYABLE_CODES}: 'bogus' is not a gRPC status code name",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_PYTHON_METER_PROVIDER": "bogus"},
            f"OTEL_PYTHON_METER_PROVIDER: {_NO_METER_PROVIDER}",
        ),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                _HTTP_CREDENTIALS: "bogus",
            },
            f"{_HTTP_CREDENTIALS}: no installed package provides the credential provider 'bogus'",
        ),
        (
            {"OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "host, bogus"},
            "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS: no installed package provides the resource "
            "detector 'bogus'",
        ),
    ],
)
def test_a_setting_the_sdk_refuses_as_telemetry_is_built_is_a_config_error(
    tmp_path: Path, command: str, otel: dict[str, str], said: str
) -> None:
    """An exemplar filter, metric export interval, retryable gRPC code, meter provider or
    OTLP credential provider the OpenTelemetry SDK or an exporter raises for as the
    gateway builds its telemetry is a one-line config error naming the variable, from
    `serve` and `check` (exit 2); so is a metric export timeout at or below 0, and a
    resource detector no package provides.

    Before, `serve` ended in the SDK's traceback (ValueError, KeyError, StopIteration,
    RuntimeError), status 1, while `check` said ok; and with that timeout it served, every
    metric collection timing out (no metric exported), a traceback logged each interval;
    with that detector, it served without the attributes asked for, having logged the
    SDK's traceback.
    """
    done = _run_with_otel(tmp_path, _COMMANDS[command], "", otel)
    assert done.returncode == 2, done.stdout + done.stderr
    *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
    assert last == f"llm-gateway: config error: environment: {said}"


def test_check_takes_every_such_setting_the_sdk_takes(tmp_path: Path) -> None:
    """`check` refuses none of the values the SDK and exporters take for those settings:
    a named exemplar filter, an interval that is no number (the SDK logs it and takes its
    default), status code names in any case, an installed meter provider, `*` among the
    resource detectors."""
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "console,otlp",
        "OTEL_METRICS_EXEMPLAR_FILTER": "always_on",
        "OTEL_METRIC_EXPORT_INTERVAL": "soon",
        "OTEL_METRIC_EXPORT_TIMEOUT": "1e3",
        _RETRYABLE_CODES: "unavailable,,Resource_Exhausted",
        "OTEL_PYTHON_METER_PROVIDER": "sdk_meter_provider",
        _HTTP_CREDENTIALS: "",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "*, process",
    }
    done = _run_with_otel(tmp_path, _COMMANDS["check"], "", otel)
    assert done.returncode == 0, done.stderr


_SAMPLERS = (
    "always_on, always_off, parentbased_always_on, parentbased_always_off, traceidratio, "
    "parentbased_traceidratio"
)
_RATIO = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize(
    ("otel", "said"),
    [
        (
            {"OTEL_TRACES_SAMPLER": "always_of"},
            f"OTEL_TRACES_SAMPLER: 'always_of' is not one of {_SAMPLERS}",
        ),
        (
            {**_RATIO, "OTEL_TRACES_SAMPLER_ARG": "0,1"},
            "OTEL_TRACES_SAMPLER_ARG: '0,1' is not a sampling ratio from 0 to 1",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "10%"},
            "OTEL_TRACES_SAMPLER_ARG: '10%' is not a sampling ratio from 0 to 1",
        ),
        (
            {**_RATIO, "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG: '2' is not a sampling ratio from 0 to 1",
        ),
    ],
)
def test_a_trace_sampler_the_sdk_does_not_know_is_a_config_error(
    tmp_path: Path, command: str, otel: dict[str, str], said: str
) -> None:
    """With traces exported, an `OTEL_TRACES_SAMPLER` the SDK does not know, or a ratio
    sampler's `OTEL_TRACES_SAMPLER_ARG` that is no number from 0 to 1, is a one-line
    config error naming the variable, from `serve` and `check` (exit 2).

    Before, the SDK logged a warning and sampled every trace: an unknown name as
    `parentbased_always_on`, a ratio it could not take as 1.0.
    """
    otel = {"OTEL_TRACES_EXPORTER": "console", **otel}
    done = _run_with_otel(tmp_path, _COMMANDS[command], "", otel)
    assert done.returncode == 2, done.stdout + done.stderr
    *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
    assert last == f"llm-gateway: config error: environment: {said}"


@pytest.mark.parametrize(
    ("argv", "otel"),
    [
        (_COMMANDS["check"], {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "Always_Off"}),
        (_COMMANDS["check"], {"OTEL_TRACES_EXPORTER": "console", **_RATIO}),  # 1.0, as specified
        (
            _COMMANDS["check"],
            {"OTEL_TRACES_EXPORTER": "console", **_RATIO, "OTEL_TRACES_SAMPLER_ARG": " 0.25 "},
        ),
        (  # only the ratio samplers read it
            _COMMANDS["check"],
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER_ARG": "bogus"},
        ),
        (_COMMANDS["check"], {"OTEL_METRICS_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "bogus"}),
        (
            _COMMANDS["check"],
            {
                "OTEL_SDK_DISABLED": "true",
                "OTEL_TRACES_EXPORTER": "console",
                **_RATIO,
                "OTEL_TRACES_SAMPLER_ARG": "bogus",
            },
        ),
        (
            ["-m", "gateway_client.cli", "models", "--help"],
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "bogus"},
        ),
    ],
)
def test_a_trace_sampler_the_sdk_takes_or_does_not_read_is_no_error(
    tmp_path: Path, argv: list[str], otel: dict[str, str]
) -> None:
    """A sampler name in any case, a ratio sampler without its argument (1.0) or with one
    from 0 to 1, an argument only a ratio sampler reads, and a sampler with no traces
    exported, telemetry off, or for a command that reads no telemetry, are taken."""
    done = _run_with_otel(tmp_path, argv, "", otel)
    assert done.returncode == 0, done.stderr


_NO_HEADER = (
    "is no name=value header the OTLP exporters can send (its text is not shown): "
    "URL-encode any comma, semicolon, double quote, backslash or non-ASCII character in a value"
)
_NO_ATTRIBUTE = "is no key=value attribute (its text is not shown): URL-encode any comma in a value"


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize(
    ("otel", "said"),
    [
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a, authorization:Bearer CANARY",
            },
            f"OTEL_EXPORTER_OTLP_HEADERS: entry 2 of 2 {_NO_HEADER}",
        ),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a",
                "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "api-key=CANARY;tenant=a",
            },
            f"OTEL_EXPORTER_OTLP_METRICS_HEADERS: entry 1 of 1 {_NO_HEADER}",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=clé-CANARY",
            },
            f"OTEL_EXPORTER_OTLP_TRACES_HEADERS: entry 1 of 1 {_NO_HEADER}",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,CANARY",
            },
            f"OTEL_RESOURCE_ATTRIBUTES: entry 2 of 2 {_NO_ATTRIBUTE}",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": " =CANARY"},
            f"OTEL_RESOURCE_ATTRIBUTES: entry 1 of 1 {_NO_ATTRIBUTE}",
        ),
    ],
)
def test_a_header_or_resource_attribute_the_sdk_would_drop_is_a_config_error(
    tmp_path: Path, command: str, otel: dict[str, str], said: str
) -> None:
    """An OTLP header (by the general variable, or the signal's own that the exporter
    reads in its place) that is no name=value pair the exporters take, or a resource
    attribute with no `=` or no key, is, with an exporter that reads it, a one-line
    config error naming the variable and the entry's place, never its text (headers hold
    secrets), from `serve` and `check` (exit 2).

    Before, the exporter or SDK dropped it with a warning: a collector's auth header went
    missing, and every export was refused, the exporters' warning quoting the header.
    """
    done = _run_with_otel(tmp_path, _COMMANDS[command], "", otel)
    assert "CANARY" not in done.stdout + done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
    assert last == f"llm-gateway: config error: environment: {said}"


_ENDPOINT_PORT = "the OTLP endpoint's port is no number 0..65535 (its text is not shown)"


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize(
    ("otel", "said"),
    [
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://gw:CANARY@127.0.0.1:4317",
            },
            "OTEL_EXPORTER_OTLP_ENDPOINT: the OTLP endpoint carries a user or password",
        ),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://CANARY@collector:4317",
            },
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: the OTLP endpoint carries a user or password",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://gw:CANARY@127.0.0.1:431800",
            },
            f"OTEL_EXPORTER_OTLP_ENDPOINT: {_ENDPOINT_PORT}",
        ),
    ],
)
def test_an_otlp_endpoint_no_export_could_reach_is_a_config_error(
    tmp_path: Path, command: str, otel: dict[str, str], said: str
) -> None:
    """An OTLP endpoint with a user or password over gRPC (which reads them as part of the
    host name), or with a port past 65535, is a config error naming its variable, never
    its text, from `serve` and `check` (exit 2).

    Before, `check` said ok and every export failed, `telemetry.export_failed` quoting the
    endpoint, password and all ("errors resolving gw:CANARY@127.0.0.1:4317", "Failed to
    parse: http://gw:CANARY@...").
    """
    done = _run_with_otel(tmp_path, _COMMANDS[command], "", otel)
    assert "CANARY" not in done.stdout + done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    *_, last = done.stderr.splitlines()
    assert last.startswith(f"llm-gateway: config error: environment: {said}")


@pytest.mark.parametrize(
    ("argv", "otel"),
    [
        (  # a value with a space, as the exporters take it; an empty signal's own
            _COMMANDS["check"],
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer a.b.c , x-scope=a%2Cb,",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "",
                "OTEL_RESOURCE_ATTRIBUTES": "team=ml,service.name=billing%20gw,",
            },
        ),
        (  # the signal's own in the general one's place
            _COMMANDS["check"],
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_HEADERS": "bogus",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=a",
            },
        ),
        (  # no exporter reads them
            _COMMANDS["check"],
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_EXPORTER_OTLP_HEADERS": "bogus",
                "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "bogus",
            },
        ),
        (_COMMANDS["check"], {"OTEL_RESOURCE_ATTRIBUTES": "bogus"}),
        (
            _COMMANDS["check"],
            {
                "OTEL_SDK_DISABLED": "true",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_HEADERS": "bogus",
                "OTEL_RESOURCE_ATTRIBUTES": "bogus",
            },
        ),
        (
            ["-m", "gateway_client.cli", "models", "--help"],
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_HEADERS": "bogus"},
        ),
        (  # HTTP (requests) sends an endpoint's user and password as Basic auth
            _COMMANDS["check"],
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://gw:pw@127.0.0.1:4318",
            },
        ),
    ],
)
def test_headers_and_resource_attributes_the_sdk_takes_or_does_not_read_are_no_error(
    tmp_path: Path, argv: list[str], otel: dict[str, str]
) -> None:
    """Headers and resource attributes the exporters and SDK take (a header value with a
    space, URL-encoded characters, a trailing comma), and ones nothing reads (a signal's
    own set in the general one's place, no OTLP exporter, no exporter at all, telemetry
    off, a command that reads no telemetry), are no error."""
    done = _run_with_otel(tmp_path, argv, "", otel)
    assert done.returncode == 0, done.stderr


_OTLP = "OTEL_EXPORTER_OTLP_"
_TLS_ENDPOINT = {f"{_OTLP}ENDPOINT": "https://127.0.0.1:1"}
_NOT_THERE = "cannot read {missing}: No such file or directory"


@pytest.fixture(scope="module")
def otlp_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files for the OTLP exporters' TLS variables: a CA, a client certificate it
    signed and its key, a collector's certificate for 127.0.0.1 it signed and its key, a
    key of another, a file missing, a directory, a file that holds text (that no error
    may repeat), the client certificate and key in one file."""
    directory = tmp_path_factory.mktemp("otlp-pki")
    ca = make_ca(directory, "ca")
    client = issue(
        directory, "client", ca=ca, common_name="gateway", extensions="extendedKeyUsage=clientAuth"
    )
    text = directory / "notes.txt"
    text.write_text("SECRET-LOOKING TEXT\n")
    combined = directory / "combined.pem"
    combined.write_text(client[0].read_text() + client[1].read_text())
    server = issue(
        directory, "server", ca=ca, common_name="127.0.0.1",
        extensions="subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )  # fmt: skip
    return {
        "ca": str(ca[0]),
        "server_cert": str(server[0]),
        "server_key": str(server[1]),
        "cert": str(client[0]),
        "key": str(client[1]),
        "other_key": str(ca[1]),
        "missing": str(directory / "missing.pem"),
        "directory": str(directory),
        "text": str(text),
        "combined": str(combined),
    }


# OTLP TLS variables an exporter reads and cannot use, and what `serve` and `check` say.
_UNUSABLE_TLS_FILES = [
    (  # the gRPC exporter trusted the system's roots instead, after a traceback
        {"OTEL_TRACES_EXPORTER": "otlp", **_TLS_ENDPOINT, f"{_OTLP}CERTIFICATE": "missing"},
        f"{_OTLP}CERTIFICATE: {_NOT_THERE}",
    ),
    (  # read whether or not the endpoint is secure
        {"OTEL_TRACES_EXPORTER": "otlp", f"{_OTLP}TRACES_CERTIFICATE": "missing"},
        f"{_OTLP}TRACES_CERTIFICATE: {_NOT_THERE}",
    ),
    (  # `serve` ended in the gRPC exporter's IsADirectoryError
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            f"{_OTLP}INSECURE": "false",
            f"{_OTLP}METRICS_CERTIFICATE": "directory",
        },
        f"{_OTLP}METRICS_CERTIFICATE: cannot read {{directory}}: Is a directory",
    ),
    (  # every HTTP export failed
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            f"{_OTLP}PROTOCOL": "http/protobuf",
            **_TLS_ENDPOINT,
            f"{_OTLP}CERTIFICATE": "text",
        },
        f"{_OTLP}CERTIFICATE: {{text}} holds no PEM certificate",
    ),
    (
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            f"{_OTLP}METRICS_PROTOCOL": "http/protobuf",
            f"{_OTLP}METRICS_CLIENT_CERTIFICATE": "cert",
            f"{_OTLP}CLIENT_KEY": "missing",
        },
        f"{_OTLP}CLIENT_KEY: {_NOT_THERE}",
    ),
    (
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            **_TLS_ENDPOINT,
            f"{_OTLP}CERTIFICATE": "ca",
            f"{_OTLP}CLIENT_CERTIFICATE": "cert",
            f"{_OTLP}CLIENT_KEY": "other_key",
        },
        f"{_OTLP}CLIENT_KEY: {{other_key}} holds no unencrypted PEM private key that "
        f"matches the certificate in {_OTLP}CLIENT_CERTIFICATE",
    ),
    (  # a gRPC client's pair without its group's CA, once not read
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            **_TLS_ENDPOINT,
            f"{_OTLP}TRACES_CLIENT_CERTIFICATE": "cert",
            f"{_OTLP}TRACES_CLIENT_KEY": "other_key",
        },
        f"{_OTLP}TRACES_CLIENT_KEY: {{other_key}} holds no unencrypted PEM private key that "
        f"matches the certificate in {_OTLP}TRACES_CLIENT_CERTIFICATE",
    ),
    (  # half a pair: the HTTP exporter left the key out; gRPC aborted `serve` (SIGABRT)
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            **_TLS_ENDPOINT,
            f"{_OTLP}CERTIFICATE": "ca",
            f"{_OTLP}CLIENT_KEY": "key",
        },
        f"{_OTLP}CLIENT_KEY: a client key is used only with its certificate: "
        f"set {_OTLP}CLIENT_CERTIFICATE",
    ),
    (  # every HTTPS export failed
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            f"{_OTLP}TRACES_PROTOCOL": "http/protobuf",
            **_TLS_ENDPOINT,
            f"{_OTLP}TRACES_CLIENT_CERTIFICATE": "cert",
        },
        f"{_OTLP}TRACES_CLIENT_CERTIFICATE: {{cert}} holds no unencrypted PEM private key "
        f"beside its certificate: set {_OTLP}TRACES_CLIENT_KEY",
    ),
]
# Such variables no exporter reads, and files one can use: no error.
_UNREAD_TLS_FILES = [
    (  # an insecure gRPC channel reads no general TLS variable
        _COMMANDS["check"],
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            f"{_OTLP}ENDPOINT": "http://127.0.0.1:1",
            f"{_OTLP}CERTIFICATE": "missing",
        },
        None,
    ),
    (  # the HTTP exporter reads no CA for an http endpoint
        _COMMANDS["check"],
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            f"{_OTLP}PROTOCOL": "http/protobuf",
            f"{_OTLP}CERTIFICATE": "missing",
        },
        None,
    ),
    (  # no OTLP exporter
        _COMMANDS["check"],
        {"OTEL_TRACES_EXPORTER": "console", f"{_OTLP}CERTIFICATE": "missing"},
        None,
    ),
    (
        _COMMANDS["check"],
        {
            "OTEL_SDK_DISABLED": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            **_TLS_ENDPOINT,
            f"{_OTLP}CERTIFICATE": "missing",
        },
        None,
    ),
    (
        ["-m", "gateway_client.cli", "models", "--help"],
        {"OTEL_TRACES_EXPORTER": "otlp", **_TLS_ENDPOINT, f"{_OTLP}CERTIFICATE": "missing"},
        None,
    ),
    (  # files it can use, for both protocols; a directory of CAs for HTTP
        _COMMANDS["check"],
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            f"{_OTLP}METRICS_PROTOCOL": "http/protobuf",
            **_TLS_ENDPOINT,
            f"{_OTLP}CERTIFICATE": "ca",
            f"{_OTLP}METRICS_CERTIFICATE": "directory",
            f"{_OTLP}CLIENT_CERTIFICATE": "cert",
            f"{_OTLP}CLIENT_KEY": "key",
        },
        None,
    ),
    (  # the HTTP exporter takes a client certificate holding its key
        _COMMANDS["check"],
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            f"{_OTLP}PROTOCOL": "http/protobuf",
            f"{_OTLP}CLIENT_CERTIFICATE": "combined",
        },
        None,
    ),
]


@pytest.mark.parametrize(
    ("argv", "otel", "said"),
    [
        *(
            (_COMMANDS[command], otel, said)
            for otel, said in _UNUSABLE_TLS_FILES
            for command in ("serve", "check")
        ),
        *_UNREAD_TLS_FILES,
    ],
)
def test_an_otlp_tls_file_the_exporter_cannot_use_is_a_config_error(
    tmp_path: Path,
    otlp_pki: dict[str, str],
    argv: list[str],
    otel: dict[str, str],
    said: str | None,
) -> None:
    """A CA, client certificate or key file an OTLP exporter reads (by the general variable
    or the signal's own) that is not there, is a directory, holds no PEM certificate, is
    no key of that certificate, or is half a pair (a key without its certificate; a
    certificate without its key, unless HTTP's holding it) is a one-line config error
    naming the variable and the file, never its text, from `serve` and `check` (exit 2).
    One no exporter reads
    is not (an insecure gRPC channel's general CA, an HTTP exporter's CA for an http
    endpoint, without an OTLP exporter, with telemetry off, for a command that reads no
    telemetry), and files an exporter can use are taken.

    Before, `check` said ok; `serve` served with the gRPC exporter trusting the system's
    roots in place of the CA asked for, having logged a traceback (a directory, it ended
    in one, status 1); the HTTP exporter failed every export, and left a key without its
    certificate out; a gRPC client key without its certificate aborted `serve` in gRPC's
    C++ core (SIGABRT, no Python error).
    """
    otel = {name: otlp_pki.get(value, value) for name, value in otel.items()}
    done = _run_with_otel(tmp_path, argv, "", otel)
    assert "SECRET-LOOKING" not in done.stderr
    if said is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2, done.stdout + done.stderr
        *_, last = done.stderr.splitlines()  # after `serve`'s line on its workers
        assert last == f"llm-gateway: config error: environment: {said.format(**otlp_pki)}"


class _MutualTlsCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC metrics receiver that notes the common name of each client
    certificate an export came with (its TLS refuses a connection without one)."""

    def __init__(self) -> None:
        self.exported = threading.Event()
        self.client_names: list[bytes] = []

    def Export(self, request, context):
        self.client_names.extend(context.auth_context().get("x509_common_name", []))
        self.exported.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def mutual_tls_collector(otlp_pki: dict[str, str]) -> Iterator[tuple[_MutualTlsCollector, int]]:
    """A real OTLP/gRPC receiver on loopback, with a certificate `otlp_pki`'s CA signed,
    that takes only clients with a certificate that CA signed; and its port."""
    collector = _MutualTlsCollector()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    credentials = grpc.ssl_server_credentials(
        [(Path(otlp_pki["server_key"]).read_bytes(), Path(otlp_pki["server_cert"]).read_bytes())],
        root_certificates=Path(otlp_pki["ca"]).read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield collector, port
    server.stop(0)


@pytest.mark.parametrize(
    "otel",
    [
        {f"{_OTLP}CLIENT_CERTIFICATE": "cert", f"{_OTLP}CLIENT_KEY": "key"},
        {f"{_OTLP}METRICS_CLIENT_CERTIFICATE": "cert", f"{_OTLP}METRICS_CLIENT_KEY": "key"},
        {  # the CA by the general variable, the client's by the signal's own
            f"{_OTLP}CERTIFICATE": "ca",
            f"{_OTLP}METRICS_CLIENT_CERTIFICATE": "cert",
            f"{_OTLP}METRICS_CLIENT_KEY": "key",
        },
    ],
)
def test_an_otlp_grpc_client_certificate_without_its_groups_ca_is_shown_to_the_collector(
    tmp_path: Path,
    otlp_pki: dict[str, str],
    mutual_tls_collector: tuple[_MutualTlsCollector, int],
    otel: dict[str, str],
) -> None:
    """A client certificate and key set for the gRPC OTLP exporter with no CA beside
    them (by the general variables or the signal's own) are shown to a collector that
    asks for one: the collector trusted by the CA set for the signal, else by the system's
    roots (here `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`).

    Before, the exporter read a client certificate only beside a CA of its own group:
    without one it opened TLS with no client certificate, the collector refused every
    export, and the operator's mTLS was silently not used.
    """
    collector, port = mutual_tls_collector
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    env = {
        **os.environ,
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
        f"{_OTLP}ENDPOINT": f"https://127.0.0.1:{port}",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": otlp_pki["ca"],
        **{name: otlp_pki[value] for name, value in otel.items()},
    }
    serve = subprocess.Popen(
        [sys.executable, *_COMMANDS["serve"], "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "listening on" in serve.stdout.readline()
        exported = collector.exported.wait(timeout=30)  # a hang guard: it exports each 0.1 s
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    assert exported, err
    assert b"gateway" in collector.client_names


_UNKNOWN_CONTEXT = {"OTEL_PYTHON_CONTEXT": "greenlet_context"}


@pytest.mark.parametrize(
    ("argv", "telemetry", "warned"),
    [
        (
            _COMMANDS["check"],
            "",
            "warning: OTEL_PYTHON_CONTEXT: no installed package provides the runtime context "
            "'greenlet_context': OpenTelemetry uses contextvars_context",
        ),
        (_COMMANDS["check"], "telemetry: {enabled: false}\n", None),
        (["-m", "gateway_client.cli", "models", "--help"], "", None),
    ],
)
def test_a_runtime_context_no_package_provides_is_one_warning_not_a_traceback(
    tmp_path: Path, argv: list[str], telemetry: str, warned: str | None
) -> None:
    """`OTEL_PYTHON_CONTEXT` naming a runtime context no installed package provides is,
    with telemetry on, one warning line from `check`, which still says ok (OpenTelemetry
    uses its default, the one the gateway needs); a command that reads no telemetry
    says nothing of it.

    Before, OpenTelemetry logged its failure with a traceback as it was imported, with
    the gateway's modules: every command, `llm-gateway models --help` too, printed it.
    """
    done = _run_with_otel(tmp_path, argv, telemetry, _UNKNOWN_CONTEXT)
    assert done.returncode == 0, done.stderr
    # Its config serves no model, which `check` warns of too.
    lines = [line for line in done.stderr.splitlines() if "no upstream serves" not in line]
    assert lines == ([] if warned is None else [warned])


def test_serve_warns_once_of_a_runtime_context_no_package_provides(tmp_path: Path) -> None:
    """`serve` with an unknown `OTEL_PYTHON_CONTEXT` serves, having logged one warning
    naming the variable and the context used in its place, and no traceback.

    Before, OpenTelemetry's traceback came first, as its context module was imported.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    serve = subprocess.Popen(
        [sys.executable, *_COMMANDS["serve"], "--config", str(config)],
        env={**os.environ, **_UNKNOWN_CONTEXT}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "listening on" in serve.stdout.readline()
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    assert "Traceback" not in err
    [warning] = [line for line in err.splitlines() if "telemetry.unknown_context" in line]
    said = "variable=OTEL_PYTHON_CONTEXT context=greenlet_context used=contextvars_context"
    assert said in warning


def _keys_file_of_mode(tmp_path: Path, mode: int) -> Path:
    """A config (no upstream, auth on) whose keys file holds one key and has `mode`."""
    keys = tmp_path / "keys"
    keys.write_text("a" * 64 + " team-a\n")
    keys.chmod(mode)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n"
        f"auth: {{mode: keys, keys_file: '{keys}'}}\n"
    )
    return config


@pytest.mark.parametrize(
    ("mode", "writers"),
    [(0o620, "its group"), (0o602, "every user"), (0o600, None)],
    ids=["group-writable", "world-writable", "owner-only"],
)
def test_check_warns_of_a_keys_file_others_may_write(
    tmp_path: Path, mode: int, writers: str | None
) -> None:
    """`check` warns of a keys file its group or every user may write (whoever can write
    it can add a key for any tenant), naming its mode and the chmod that mends it, and
    still says ok. Before, it said nothing."""
    config = _keys_file_of_mode(tmp_path, mode)
    done = subprocess.run(
        [sys.executable, *_COMMANDS["check"], "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "keys_file_writable" in line]
    if writers is None:
        assert warned == []
        return
    keys = tmp_path / "keys"
    assert warned == [
        f"warning: auth.keys_file {keys} (mode {mode:04o}) is writable by {writers}: whoever "
        f"can write it can give themselves a key for any tenant; chmod 600 {keys} (640 if "
        "the gateway reads it through its group) (auth.keys_file_writable)"
    ]


def test_serve_warns_once_of_a_keys_file_others_may_write(tmp_path: Path) -> None:
    """`serve` with a keys file every user may write serves, having logged one
    `auth.keys_file_writable` warning naming the file and its mode. Before, it said
    nothing: anyone on the machine could add a key unseen."""
    config = _keys_file_of_mode(tmp_path, 0o666)
    serve = subprocess.Popen(
        [sys.executable, *_COMMANDS["serve"], "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "listening on" in serve.stdout.readline()
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    [warning] = [line for line in err.splitlines() if "auth.keys_file_writable" in line]
    assert "WARNING" in warning
    assert f"{tmp_path / 'keys'} (mode 0666) is writable by every user" in warning


# `run` in a program of its own: it reports the loop it served on (from inside, as the
# gateway listens), stops itself, and then reports the process's event loop policy.
_RUN_IN_PROCESS = """
import asyncio, json, os, signal, sys
{setup}
from service.config import load_config
from service.server import run

served_on = []

def on_ready(_address):
    loop = type(asyncio.get_running_loop())
    served_on.append(f"{{loop.__module__}}.{{loop.__qualname__}}")
    os.kill(os.getpid(), signal.SIGTERM)

run(load_config(sys.argv[1]), on_ready=on_ready)
policy = type(asyncio.get_event_loop_policy())
print(json.dumps({{"loop": served_on, "policy": f"{{policy.__module__}}.{{policy.__qualname__}}"}}))
"""


@pytest.mark.parametrize(
    ("setup", "loop"),
    [
        ("", "uvloop.Loop"),
        (
            "sys.modules['uvloop'] = None  # not installed",
            "asyncio.unix_events._UnixSelectorEventLoop",
        ),
    ],
    ids=["uvloop", "without-uvloop"],
)
def test_run_serves_on_uvloop_and_leaves_the_processs_loop_policy_alone(
    tmp_path: Path, setup: str, loop: str
) -> None:
    """`run` serves on a uvloop loop (asyncio's own without uvloop), and once it returns
    the process still has asyncio's default event loop policy.

    Before, `run` set uvloop's policy for the whole process: every loop a program running
    the gateway in-process made after it was a uvloop loop.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    program = _RUN_IN_PROCESS.format(setup=setup)
    done = subprocess.run(
        [sys.executable, "-c", program, str(config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said == {"loop": [loop], "policy": "asyncio.unix_events._UnixDefaultEventLoopPolicy"}
