"""Real completions from the embedded local model (llama.cpp + Gemma 3 270M).

The model is a small base model: its words are real tokens but not useful prose, so
these tests assert shape, usage and finish reason, never the text.
"""

from __future__ import annotations

import json
import random
import string

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from tests.conftest import gateway_config
from tests.e2e.conftest import LOCAL_MODEL
from tests.integration.helpers import error_info

pytestmark = [pytest.mark.local_model, pytest.mark.xdist_group("local_model")]

FINISHED = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def _messages(prompt: str) -> list[pb.Message]:
    return [pb.Message(role=pb.ROLE_USER, content=prompt)]


async def test_local_model_answers_a_real_completion(local_gateway):
    """A unary call is answered by the local upstream with real tokens. It went as a
    stream (so that a cancel stops llama.cpp), which reports no usage: it is estimated."""
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        response = await stub.Complete(
            pb.CompleteRequest(
                model=LOCAL_MODEL,
                messages=_messages("Write one sentence about the sea."),
                params=pb.GenerationParams(max_tokens=16, temperature=0.0, seed=1),
            ),
            timeout=120,
        )
    meta = response.metadata
    assert response.content.strip()
    assert meta.upstream == "local"
    assert meta.finish_reason in FINISHED
    assert meta.usage.input_tokens > 0
    assert 0 < meta.usage.output_tokens <= 16
    assert meta.usage.estimated
    assert meta.cost_usd == 0.0


async def test_local_model_streams_deltas_and_estimates_usage(local_gateway):
    """A stream relays several real deltas; llama.cpp sends no usage, so it is estimated."""
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        events = [
            event
            async for event in stub.CompleteStream(
                pb.CompleteStreamRequest(
                    model=LOCAL_MODEL,
                    messages=_messages("Count from one to ten."),
                    params=pb.GenerationParams(max_tokens=24, temperature=0.0),
                ),
                timeout=120,
            )
        ]
    deltas = [e.delta.content for e in events if e.HasField("delta")]
    assert len(deltas) >= 2
    assert "".join(deltas).strip()
    final = events[-1].final
    assert final.finish_reason in FINISHED
    assert final.upstream == "local"
    assert final.usage.estimated
    assert final.usage.output_tokens > 0
    assert final.timings.time_to_first_token_ms <= final.timings.total_ms


async def test_local_model_is_listed_with_its_window(local_gateway):
    """ListModels shows the local model served by the healthy `local` upstream."""
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        response = await pb_grpc.CompletionServiceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=10
        )
    [model] = [m for m in response.models if m.name == LOCAL_MODEL]
    assert model.context_window == 2048
    assert [u.name for u in model.upstreams] == ["local"]


async def test_local_model_rejects_invalid_request_before_calling_it(local_gateway):
    """llama.cpp answers 200 to empty messages, so the gateway must refuse them itself."""
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(pb.CompleteRequest(model=LOCAL_MODEL), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Random lowercase "words": the gateway's estimate of them fits the 2048-token window,
# Gemma's tokenizer counts about 1.6 times as many, more than the window holds.
_OVER_THE_REAL_WINDOW = " ".join(
    "".join(random.Random(index).choices(string.ascii_lowercase, k=3 + index % 7))
    for index in range(700)
)


async def test_a_stream_over_the_models_real_window_is_refused_and_the_model_stays_in_use(
    local_gateway,
):
    """A streamed prompt the estimate fits but llama.cpp's tokenizer does not is refused
    with INVALID_ARGUMENT after one attempt, as the same call unary is, and the local
    model stays in use for the next call, however many such streams came before.

    Before, llama.cpp's empty answer to it was a malformed stream: retried, and each
    attempt held against the breaker, so four such streams opened it and every caller
    was refused for its cool-down."""
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        request = pb.CompleteStreamRequest(
            model=LOCAL_MODEL,
            messages=_messages(_OVER_THE_REAL_WINDOW),
            params=pb.GenerationParams(max_tokens=8),
        )
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _event in stub.CompleteStream(request, timeout=120):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        response = await stub.Complete(
            pb.CompleteRequest(
                model=LOCAL_MODEL,
                messages=_messages("Hello"),
                params=pb.GenerationParams(max_tokens=4),
            ),
            timeout=120,
        )
    assert response.metadata.upstream == "local"


async def test_local_model_answers_a_json_schema_with_json_that_follows_it(local_gateway):
    """A JSON Schema answer from the local model: llama-cpp-python takes the schema only in
    its own shape, which the gateway sends; the grammar then holds the answer to it."""
    schema = (
        '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],'
        ' "additionalProperties": false}'
    )
    params = pb.GenerationParams(
        max_tokens=64,
        temperature=0.0,
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema
        ),
    )
    async with grpc.aio.insecure_channel(local_gateway) as channel:
        response = await pb_grpc.CompletionServiceStub(channel).Complete(
            pb.CompleteRequest(
                model=LOCAL_MODEL,
                messages=_messages("Is water wet? Answer in JSON."),
                params=params,
            ),
            timeout=120,
        )
    assert response.metadata.finish_reason == pb.FINISH_REASON_STOP
    assert isinstance(json.loads(response.content)["ok"], bool)


async def test_a_system_message_reaches_the_local_models_prompt(start_gateway):
    """A system message over the model's real window, beside a short user message, is
    refused by llama.cpp as over its window (CONTEXT_WINDOW_EXCEEDED), as the same text as
    a user message is: its `gemma` format has no system role, so the gateway folds the
    system text into the user message, where llama.cpp's prompt holds it. A gateway of its
    own: one whose calibration learned from an earlier refusal would refuse the call itself.

    Before, llama-cpp-python's `gemma` formatter dropped the system message without a word:
    the call was answered from "Hi" alone."""
    gateway = await start_gateway(gateway_config(local_model={"enabled": "always", "threads": 1}))
    request = pb.CompleteRequest(
        model=LOCAL_MODEL,
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=_OVER_THE_REAL_WINDOW),
            pb.Message(role=pb.ROLE_USER, content="Hi"),
        ],
        params=pb.GenerationParams(max_tokens=4),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(request, timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
