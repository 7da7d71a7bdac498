"""A long answer without usage is estimated up to its cap, not read whole.

Estimating holds the event loop (about 0.1 s a MB), so the output estimate of an answer
its upstream reported no usage for reads no more of it than `max_tokens`, or else the
room the prompt leaves in the model's window, needs: the model wrote at most that many
tokens.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import RunningGateway, chat, chat_stream, gateway_config
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.test_stream_charges import recorded

WINDOW = 4096  # the fake model's, in `gateway_config`
TEXT = "word " * 600_000  # 3 MB, 600,000 tokens as estimated whole


async def _call(gateway: RunningGateway, mode: str, params: pb.GenerationParams) -> None:
    if mode == "unary":
        response = await gateway.stub.Complete(chat(params=params), timeout=30)
        assert response.content == TEXT
        assert response.metadata.usage.estimated
        return
    text = ""
    status = grpc.StatusCode.OK
    try:
        async for event in gateway.stub.CompleteStream(chat_stream(params=params), timeout=30):
            text += event.delta.content
    except grpc.aio.AioRpcError as error:
        status = error.code()
    assert status is (grpc.StatusCode.UNAVAILABLE if mode == "cut" else grpc.StatusCode.OK)
    assert len(text) > 1_000_000
    assert (text == TEXT) is (mode == "stream")


@pytest.mark.parametrize("max_tokens", [None, 100], ids=["window", "max_tokens"])
@pytest.mark.parametrize("mode", ["unary", "stream", "cut"])
async def test_a_long_answer_without_usage_is_estimated_up_to_its_cap(
    upstream: FakeUpstream,
    start_gateway: Any,
    estimator_reads: list[int],
    mode: str,
    max_tokens: int | None,
) -> None:
    gateway = await start_gateway(gateway_config(upstream.base_url))
    cut_after = 5 if mode == "cut" else None  # the role event and 4 of 8 chunks
    upstream.script(Reply(content=TEXT, chunks=8, include_usage=False, cut_after_events=cut_after))
    await _call(gateway, mode, pb.GenerationParams(max_tokens=max_tokens))
    total = await recorded(gateway, requests=1)
    assert total.usage.estimated
    # Before, the whole window (4,096 output tokens beside a 9-token prompt): the window
    # holds the prompt and the answer together.
    assert total.usage.output_tokens == (max_tokens or WINDOW - total.usage.input_tokens)
    assert 0 < total.usage.input_tokens < 100
    assert sum(estimator_reads) <= len(TEXT) // 8


async def test_a_long_answer_reporting_its_prompt_alone_is_estimated_up_to_the_room_left(
    upstream: FakeUpstream, start_gateway: Any, estimator_reads: list[int]
) -> None:
    """An answer whose usage reports its prompt tokens and not its output: the output is
    estimated up to what that reported prompt leaves of the window, not the whole window."""
    gateway = await start_gateway(gateway_config(upstream.base_url))
    upstream.script(Reply(content=TEXT, chunks=8, raw_usages=({"prompt_tokens": 1000},)))
    await _call(gateway, "unary", pb.GenerationParams())
    total = await recorded(gateway, requests=1)
    assert total.usage.estimated
    assert (total.usage.input_tokens, total.usage.output_tokens) == (1000, WINDOW - 1000)
    assert sum(estimator_reads) <= len(TEXT) // 8
