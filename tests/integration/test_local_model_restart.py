"""The local model restarted after a crash takes calls again as soon as health says so.

llama.cpp's server is stood in for by a small OpenAI-compatible HTTP server, run by the
gateway's real supervisor (service.local_model) as its Python.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.server import LOCAL_MODEL_HEALTH
from tests.integration.gateway_process import is_running

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m"

_STAND_IN = """#!{python}
import http.server, json, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class OpenAI(http.server.BaseHTTPRequestHandler):
    def _send(self, reply):
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._send({{"object": "list", "data": [{{"id": {model!r}, "object": "model"}}]}})
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        message = {{"role": "assistant", "content": "hi"}}
        self._send({{
            "id": "x", "object": "chat.completion", "created": 0, "model": {model!r},
            "choices": [{{"index": 0, "message": message, "finish_reason": "stop"}}],
            "usage": {{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        }})
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), OpenAI).serve_forever()
"""


def stand_in_local_model(tmp_path: Path) -> tuple[Path, Path]:
    """A file standing in for the model and, as `tmp_path/python`, the stand-in server
    the supervisor runs as llama.cpp's Python: (model file, stand-in)."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    stand_in = tmp_path / "python"
    stand_in.write_text(_STAND_IN.format(python=sys.executable, model=MODEL))
    stand_in.chmod(0o755)
    return model, stand_in


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


async def _call(stub: pb_grpc.CompletionServiceStub) -> grpc.StatusCode:
    request = pb.CompleteRequest(
        model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Hello")]
    )
    try:
        await stub.Complete(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_calls_refused_while_it_restarts_do_not_keep_it_out_once_serving(
    tmp_path: Path,
) -> None:
    """Calls refused while llama.cpp was down opened the breaker; once the restart answers
    (health SERVING) calls go through at once, not only after the breaker's cool-down."""
    model, stand_in = stand_in_local_model(tmp_path)
    config = tmp_path / "gateway.yaml"
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": 1.0}
    resilience = {"breaker_consecutive_failures": 2, "breaker_cool_down_s": 60.0}
    config.write_text(
        yaml.safe_dump(
            {"server": {"listen": "127.0.0.1:0"}, "local_model": local, "resilience": resilience}
        )
    )
    # The supervisor runs `sys.executable` as llama.cpp's Python: the stand-in.
    driver = (
        f"import sys; sys.executable = {str(stand_in)!r}\n"
        "from service.main import main\n"
        f"raise SystemExit(main(['serve', '--config', {str(config)!r}, '--workers', '1']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", driver, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    children: list[int] = []
    try:
        assert gateway.stdout is not None
        async with asyncio.timeout(30):
            line = (await gateway.stdout.readline()).decode()
        assert line.startswith("llm-gateway listening on "), line
        children = _children(gateway.pid)
        async with grpc.aio.insecure_channel(line.split()[-1]) as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert await _call(stub) == grpc.StatusCode.OK
            os.kill(children[0], signal.SIGKILL)
            await asyncio.sleep(0.2)
            assert {await _call(stub) for _ in range(3)} == {grpc.StatusCode.UNAVAILABLE}
            check = health_pb2.HealthCheckRequest(service=LOCAL_MODEL_HEALTH)
            async with asyncio.timeout(20):
                while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.05)
            children += _children(gateway.pid)
            assert await _call(stub) == grpc.StatusCode.OK
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await gateway.wait()
        for pid in children:  # the stand-in runs no PR_SET_PDEATHSIG: do not leave it behind
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
