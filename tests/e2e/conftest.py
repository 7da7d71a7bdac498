"""The gateway with its embedded default upstream: llama.cpp serving Gemma 3 270M."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LOCAL_MODEL = "gemma-3-270m"


@pytest.fixture(scope="session")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service serve` with `local_model.enabled: always`; yields its address."""
    config = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    config["server"]["listen"] = "127.0.0.1:0"
    config["local_model"]["enabled"] = "always"
    # One core for llama.cpp: `make test` runs the other test process beside this one, and
    # its tests wait on sub-second timeouts (a cache write over TLS, 250 ms).
    config["local_model"]["threads"] = 1
    path = tmp_path_factory.mktemp("local") / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until listening (or exit)
        assert line.startswith("llm-gateway listening on"), f"gateway did not start: {line!r}"
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
