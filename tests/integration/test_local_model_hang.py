"""A local model server that stops answering is killed and restarted, not left "up".

llama.cpp's server is stood in for by the small OpenAI-compatible server of
test_local_model_restart, run by the real supervisor (service.local_model) as its Python;
SIGSTOP stands in for a deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from service.config import LocalModelConfig
from service.errors import UpstreamTimeout
from service.local_model import LocalModelServer, LocalModelState
from service.upstream.client import probe_models
from tests.gguf_files import STAND_IN_MODEL
from tests.integration.test_local_model_restart import _STAND_IN, MODEL

# While a file `busy` sits beside it, GET /v1/models waits, as llama-cpp-python's does
# while the model generates; any other path is answered at once.
_BUSY = """
_get = OpenAI.do_GET
def do_GET(self):
    import os, time
    while self.path == "/v1/models" and os.path.exists(os.path.join({here!r}, "busy")):
        time.sleep(0.05)
    _get(self)
OpenAI.do_GET = do_GET
"""


def _stand_in(tmp_path: Path) -> Path:
    python = tmp_path / "python"
    script = _STAND_IN.format(
        python=sys.executable,
        model=MODEL,
        delay_s=0.0,
        dies_once="",
        fails_first=False,
        refusal="",
    )
    serve = "http.server.ThreadingHTTPServer"
    script = script.replace(serve, _BUSY.format(here=str(tmp_path)) + serve, 1)
    python.write_text(script)
    python.chmod(0o755)
    return python


async def test_a_hung_server_is_killed_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that answers no probe for `hang_timeout_s` is killed (health follows it
    down) and restarted (on a new port, with a new key), answering again."""
    model = tmp_path / "model.gguf"
    model.write_bytes(STAND_IN_MODEL)
    config = LocalModelConfig(
        model=MODEL, model_path=str(model), hang_timeout_s=0.6, restart_backoff_s=0.1
    )
    changes: list[bool] = []

    async def on_availability(state: LocalModelState) -> None:
        changes.append(state.is_up)

    server = LocalModelServer(
        config, python=str(_stand_in(tmp_path)), on_availability=on_availability
    )
    caplog.set_level(logging.ERROR, logger="llm_gateway.local_model")
    async with server:
        hung = server.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        async with asyncio.timeout(20):
            while server.restarts == 0 or not server.is_up:
                await asyncio.sleep(0.05)
        assert server.pid not in (None, hung)
        assert changes == [False, True]
        status, models = await probe_models(server.upstream_config(), timeout_s=2.0)
        assert (status, models) == (200, [MODEL])
        assert [r.message for r in caplog.records] == ["local_model.hung"]
    assert not _is_alive(hung)


async def test_a_busy_server_is_left_alone(tmp_path: Path) -> None:
    """A server whose model endpoints wait (llama-cpp-python's `/v1/models` waits for the
    model while it generates) but that answers other requests is never killed."""
    model = tmp_path / "model.gguf"
    model.write_bytes(STAND_IN_MODEL)
    config = LocalModelConfig(model=MODEL, model_path=str(model), hang_timeout_s=0.3)
    async with LocalModelServer(config, python=str(_stand_in(tmp_path))) as server:
        first = server.pid
        assert first is not None
        Path(f"{tmp_path}/busy").touch()  # the stand-in's /v1/models now waits
        with pytest.raises(UpstreamTimeout):
            await probe_models(server.upstream_config(), timeout_s=0.5)
        await asyncio.sleep(1.5)  # five hang timeouts of probes, every 0.1 s
        assert (server.pid, server.restarts, server.is_up) == (first, 0, True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
