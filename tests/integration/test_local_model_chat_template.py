"""A `chat_template.NAME` chat format is checked against the model file at start.

llama.cpp's server is stood in for by the small OpenAI-compatible server of
test_local_model_restart, run by the real gateway as its Python; the model files are
GGUF headers holding metadata alone, as the check reads nothing else.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from tests.fake_upstream import Reply
from tests.gguf_files import gguf_with
from tests.integration.helpers import error_info
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    serve_with_stand_in,
    stand_in_local_model,
)
from tests.scripted_upstream import ScriptedUpstream


async def _serve(
    tmp_path: Path, metadata: dict[str, str], chat_format: str, *, prelude: str = ""
) -> tuple[int, str, str]:
    """`serve` with the stand-in on a model file holding `metadata`: its exit status (0
    once it listened, then stopped), its first stdout line and its stderr. `prelude`:
    Python the gateway's process runs first."""
    model, stand_in = stand_in_local_model(tmp_path)
    model.write_bytes(gguf_with(metadata))
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model), "chat_format": chat_format}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    gateway = await serve_with_stand_in(
        stand_in, config, stderr=asyncio.subprocess.PIPE, prelude=prelude
    )
    assert gateway.stdout is not None
    assert gateway.stderr is not None
    async with asyncio.timeout(60):
        line = (await gateway.stdout.readline()).decode()
        if line:  # listening: stop it (it stops its stand-in)
            gateway.send_signal(signal.SIGTERM)
        stderr = (await gateway.stderr.read()).decode()
        return await gateway.wait(), line, stderr


async def test_a_chat_template_the_model_file_lacks_fails_the_start(tmp_path: Path) -> None:
    """`chat_template.default` on a model file with no template (the shipped Gemma GGUF
    has none): exit 1 with one line saying so, before llama.cpp starts.

    Before, the gateway started, health SERVING, and llama.cpp answered every completion
    with HTTP 500: every call UNAVAILABLE."""
    metadata = {"general.architecture": "gemma3", "tokenizer.chat_template.tool_use": "{{x}}"}
    status, line, stderr = await _serve(tmp_path, metadata, "chat_template.default")
    assert (status, line) == (1, "")
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "llm-gateway: local model: local_model.chat_format 'chat_template.default' names no "
        f"chat template of the model file {tmp_path / 'model.gguf'} (templates it holds: "
        "chat_template.tool_use); name one of those, or a format llama.cpp registers, "
        "such as gemma"
    )


async def test_a_chat_template_the_model_file_holds_starts(tmp_path: Path) -> None:
    """The file's `tokenizer.chat_template` is `chat_template.default`, and a named one
    `chat_template.NAME`, as llama-cpp-python offers them."""
    metadata = {"tokenizer.chat_template": "{{x}}", "tokenizer.chat_template.rag": "{{y}}"}
    for chat_format in ("chat_template.default", "chat_template.rag"):
        status, line, stderr = await _serve(tmp_path, metadata, chat_format)
        assert (status, line.split()[:3]) == (0, ["llm-gateway", "listening", "on"]), stderr


# The opens of the model file by the gateway's process (llama.cpp's stand-in is another),
# counted by an audit hook and said on stderr's last line as it exits.
_COUNT_MODEL_FILE_OPENS = """
import atexit, sys
opens = []
sys.addaudithook(lambda event, args: event == "open" and args[0] == {model!r} and opens.append(1))
atexit.register(lambda: print(f"model file opens: {{len(opens)}}", file=sys.stderr))
"""


async def test_the_start_reads_the_model_file_header_once(tmp_path: Path) -> None:
    """`serve` reads the header once for its checks of the file (whole, its chat template)
    and the local model's start. It read it three times: `serve`'s check that llama.cpp
    could load it, the start's again, then its templates; each walks the whole header, a
    fifth of a second's CPU for the shipped Gemma file (its vocabulary's strings)."""
    prelude = _COUNT_MODEL_FILE_OPENS.format(model=str(tmp_path / "model.gguf"))
    metadata = {"tokenizer.chat_template": "{{x}}"}
    status, line, stderr = await _serve(
        tmp_path, metadata, "chat_template.default", prelude=prelude
    )
    assert (status, line.split()[:2]) == (0, ["llm-gateway", "listening"]), stderr
    assert stderr.strip().splitlines()[-1] == "model file opens: 1"


def _check(tmp_path: Path, metadata: dict[str, str], chat_format: str) -> tuple[int, str]:
    """`llm-gateway check` of the config `_serve` runs: its exit status and stderr."""
    model = tmp_path / "model.gguf"
    model.write_bytes(gguf_with(metadata))
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model), "chat_format": chat_format}
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "local_model": local}))
    command = [sys.executable, "-m", "gateway_client.cli", "check", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stderr


async def test_check_refuses_a_chat_template_the_model_file_lacks_as_serve_does(
    tmp_path: Path,
) -> None:
    """`check` exits 1 with the line `serve` exits 1 with (less its `llm-gateway: `), and
    passes a template the file holds.

    Before, `check` exited 0 saying the gateway would serve the local model."""
    metadata = {"tokenizer.chat_template.tool_use": "{{x}}"}
    status, _, serve_err = await _serve(tmp_path, metadata, "chat_template.default")
    assert status == 1
    code, check_err = _check(tmp_path, metadata, "chat_template.default")
    assert code == 1
    refusal = serve_err.strip().splitlines()[-1].removeprefix("llm-gateway: ")
    assert check_err.strip().splitlines()[-1] == refusal
    assert _check(tmp_path, metadata, "chat_template.tool_use") == (0, "")


_ROLES_REFUSAL = "Conversation roles must alternate user/assistant/user/assistant/..."
# As Gemma's and Mistral's templates refuse two user messages in a row.
_ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    f"{{{{ raise_exception('{_ROLES_REFUSAL}') }}}}"
    "{% endif %}{{ message['content'] }}{% endfor %}"
)


async def test_messages_the_chat_template_refuses_are_the_callers_error_not_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A request the model file's template refuses (`raise_exception`, which llama.cpp's
    server answers with HTTP 500) is `INVALID_ARGUMENT` with the template's message, sent
    once, and does not count against the local model's breaker.

    Before, it was `UNAVAILABLE` "HTTP 500" after three attempts, with no word of why, and
    a few such calls (here two failures in a row) opened the breaker: every caller's call
    to the local model was refused for its cool-down."""
    model, stand_in = stand_in_local_model(tmp_path, refusal=_ROLES_REFUSAL)
    model.write_bytes(gguf_with({"tokenizer.chat_template": _ALTERNATING_TEMPLATE}))
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "chat_format": "chat_template.default"}
    data = {
        "server": {"listen": "127.0.0.1:0"},
        "local_model": local,
        "resilience": {"breaker_consecutive_failures": 2},
    }
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    twice = [pb.Message(role=pb.ROLE_USER, content=text) for text in ("a", "b")]
    request = pb.CompleteRequest(model=MODEL, messages=twice)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request, timeout=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().endswith(f"(HTTP 500): {_ROLES_REFUSAL}")
        info = error_info(caught.value)
        assert (info.reason, info.metadata["upstream"]) == ("UPSTREAM_REJECTED_REQUEST", "local")


async def test_messages_the_chat_template_refuses_fail_over_to_a_provider_of_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A provider serving the local model's name beside it takes the messages the local
    template refuses: the refusal rules the local model out of the call, as an upstream
    lacking the model is, and the call (unary or a stream) is served by the provider.

    Before, every call routed to the local model first ended INVALID_ARGUMENT, about half
    of them, though the provider would have answered (as it did while that refusal was a
    500, retried elsewhere)."""
    model, stand_in = stand_in_local_model(tmp_path, refusal=_ROLES_REFUSAL)
    model.write_bytes(gguf_with({"tokenizer.chat_template": _ALTERNATING_TEMPLATE}))
    run_stand_in_as_llama(monkeypatch, stand_in)
    local = {"enabled": "always", "model_path": str(model), "chat_format": "chat_template.default"}
    async with ScriptedUpstream(models=(MODEL,), respond=lambda _: Reply(content="hi")) as cloud:
        data = {
            "server": {"listen": "127.0.0.1:0"},
            "local_model": local,
            "upstreams": [{"name": "cloud", "base_url": cloud.base_url, "models": [MODEL]}],
        }
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        twice = [pb.Message(role=pb.ROLE_USER, content=text) for text in ("a", "b")]
        served = []
        for _ in range(2):
            answer = await gateway.stub.Complete(pb.CompleteRequest(model=MODEL, messages=twice))
            served.append((answer.content, answer.metadata.upstream, answer.metadata.attempts))
        for _ in range(2):
            stream = gateway.stub.CompleteStream(
                pb.CompleteStreamRequest(model=MODEL, messages=twice)
            )
            events = [event async for event in stream]
            text = "".join(e.delta.content for e in events if e.HasField("delta"))
            final = events[-1].final
            served.append((text, final.upstream, final.attempts))
    assert [(text, upstream) for text, upstream, _ in served] == [("hi", "cloud")] * 4
    # The local model was tried first, and refused, for some of them (round robin).
    assert {attempts for _, _, attempts in served} == {1, 2}
