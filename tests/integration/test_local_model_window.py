"""The shipped config fits prompts to the local model's real window.

llama.cpp's server is stood in for by the small OpenAI-compatible server of
test_local_model_restart, started by the real gateway with config/gateway.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmgateway.v1 import gateway_pb2 as pb
from service.config import load_config
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    stand_in_local_model,
)

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


def _six_turns_then_go_on() -> pb.CompleteRequest:
    """Six turns of about 300 tokens, then a short one, under KEEP_RECENT: the last two
    fit in 1024 tokens (five would in 2048)."""
    turn = "The harbour town woke slowly while fishermen mended their nets. " * 20
    turns = [pb.Message(role=r, content=turn) for r in [pb.ROLE_USER, pb.ROLE_ASSISTANT] * 3]
    return pb.CompleteRequest(
        model=MODEL,
        messages=[*turns, pb.Message(role=pb.ROLE_USER, content="Go on.")],
        params=pb.GenerationParams(max_tokens=16),
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT),
    )


async def test_the_shipped_config_uses_the_local_models_context_window_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """With `local_model.context_window` set to 1024 (llama.cpp's n_ctx), ListModels says
    1024 and KEEP_RECENT fits the prompt to 1024 tokens.

    Before, config/gateway.yaml listed gemma-3-270m in its catalog at 2048, which wins
    over `local_model.context_window`: ListModels said 2048, and a conversation fitted to
    2048 was refused by llama.cpp as over its window, though truncation was asked for."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    environ = {
        "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:0",
        "LLM_GATEWAY__LOCAL_MODEL__MODEL_PATH": str(model),
        "LLM_GATEWAY__LOCAL_MODEL__CONTEXT_WINDOW": "1024",
    }
    gateway = await start_gateway(load_config(REPO_CONFIG, environ=environ))
    listed = await gateway.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [(m.name, m.context_window) for m in listed.models] == [(MODEL, 1024)]
    answer = await gateway.stub.Complete(_six_turns_then_go_on(), timeout=10)
    assert answer.metadata.dropped_messages == 4


async def test_a_catalog_window_over_n_ctx_fits_prompts_to_n_ctx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A `models` entry giving the local model a window of 4096 beside an n_ctx of 1024:
    ListModels says 1024 and KEEP_RECENT fits the prompt to 1024 tokens.

    Before, the catalog's 4096 won: prompts of 3,000 tokens were sent to a llama.cpp that
    refuses any past its n_ctx, truncation asked for or not."""
    model, stand_in = stand_in_local_model(tmp_path)
    run_stand_in_as_llama(monkeypatch, stand_in)
    environ = {
        "LLM_GATEWAY__SERVER__LISTEN": "127.0.0.1:0",
        "LLM_GATEWAY__LOCAL_MODEL__MODEL_PATH": str(model),
        "LLM_GATEWAY__LOCAL_MODEL__CONTEXT_WINDOW": "1024",
    }
    data = yaml.safe_load(REPO_CONFIG.read_text())
    data["models"][MODEL] = {
        "context_window": 4096,
        "input_usd_per_million": 0.0,
        "output_usd_per_million": 0.0,
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    gateway = await start_gateway(load_config(config, environ=environ))
    listed = await gateway.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [(m.name, m.context_window) for m in listed.models] == [(MODEL, 1024)]
    answer = await gateway.stub.Complete(_six_turns_then_go_on(), timeout=10)
    assert answer.metadata.dropped_messages == 4
