"""What the caller gate counts against a tenant's limits for each kind of request."""

from __future__ import annotations

from llmgateway.v1 import gateway_pb2 as pb
from service.caller_gate import completion_tokens, demand_of
from service.tokens import PER_MESSAGE_OVERHEAD, estimate_text_tokens


def _counted(*texts: str) -> int:
    return sum(PER_MESSAGE_OVERHEAD + estimate_text_tokens(text) for text in texts)


def test_every_text_of_a_completion_counts_once_with_its_answer():
    request = pb.CompleteRequest(
        model="m",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="Be terse."),
            pb.Message(role=pb.ROLE_USER, content="Weather in Paris and Oslo, 你好?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                reasoning="Two cities: two calls.",
                tool_calls=[
                    pb.ToolCall(id="1", name="weather", arguments='{"city": "Paris"}'),
                    pb.ToolCall(id="2", name="weather", arguments='{"city": "Oslo"}'),
                ],
            ),
            pb.Message(role=pb.ROLE_TOOL, content="12 C", tool_call_id="1"),
        ],
        tools=[pb.Tool(name="weather", description="By city", parameters='{"type": "object"}')],
        params=pb.GenerationParams(max_tokens=50),
    )
    expected = _counted(
        "Be terse.",
        "Weather in Paris and Oslo, 你好?",
        "",
        "12 C",
        "Two cities: two calls.",
        'weather {"city": "Paris"}',
        'weather {"city": "Oslo"}',
        'weather By city {"type": "object"}',
    )
    assert completion_tokens(request) == expected + 50
    assert demand_of(request).tokens == expected + 50
    stream = pb.CompleteStreamRequest(model="m", messages=request.messages, tools=request.tools)
    assert completion_tokens(stream) == expected


def test_each_kind_of_request_asks_for_what_it_takes_up_front():
    completion = demand_of(pb.CompleteRequest(model="m", messages=[pb.Message(content="hi")]))
    assert (completion.models, completion.requests, completion.tokens) == (
        ("m",),
        1,
        _counted("hi"),
    )
    summary = demand_of(pb.SummarizeRequest(model="s", document="text"))
    assert (summary.models, summary.requests, summary.paces_tokens) == (("s",), 1, True)
    batch = demand_of(pb.CompleteBatchRequest())
    assert (batch.is_paced, batch.requests, batch.models) == (True, 0, ())
    assert demand_of(pb.ListModelsRequest()) == demand_of(pb.GetUsageRequest())
    assert demand_of(pb.ListModelsRequest()).requests == 0
