"""Stream deltas longer than a caller's default gRPC message (4 MiB) arrive in pieces."""

from __future__ import annotations

from typing import Any

import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import FAKE_MODEL, gateway_config
from tests.fake_upstream import Reply, ToolCallReply

GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
# One upstream event of over 4 MiB of UTF-8 (the gateway reads events up to 16 MiB).
ASCII = "word " * (1024 * 1024 + 7)
EMOJI = "\U0001f600" * (1024 * 1024 + 3)
DETERMINISTIC = pb.GenerationParams(temperature=0.0)


def _ask(**fields: Any) -> pb.CompleteStreamRequest:
    return pb.CompleteStreamRequest(
        model=FAKE_MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Say it all")], **fields
    )


async def _collect(stub: Any, request: pb.CompleteStreamRequest) -> list[pb.CompleteStreamResponse]:
    """Read through a channel with gRPC's default 4 MiB receive limit (the fixture's)."""
    events = [event async for event in stub.CompleteStream(request)]
    assert all(event.ByteSize() <= GRPC_DEFAULT_MAX_MESSAGE for event in events)
    return events


@pytest.mark.parametrize("text", [ASCII, EMOJI], ids=["ascii", "emoji"])
async def test_a_long_event_reaches_a_default_client_in_pieces(gateway, upstream, text):
    upstream.script(Reply(content=text, chunks=1))
    events = await _collect(gateway.stub, _ask())
    deltas = [event for event in events if event.HasField("delta")]
    assert len(deltas) >= 3
    assert "".join(event.delta.content for event in deltas) == text
    assert events[-1].HasField("final")
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP


async def test_long_reasoning_and_text_keep_their_order(gateway, upstream):
    reasoning = "think " * (700 * 1024)
    upstream.script(Reply(content=ASCII, chunks=1, reasoning=reasoning, reasoning_pieces=1))
    events = await _collect(gateway.stub, _ask())
    assert "".join(event.delta.reasoning for event in events) == reasoning
    assert "".join(event.delta.content for event in events) == ASCII
    last_reasoning = max(i for i, event in enumerate(events) if event.delta.reasoning)
    first_text = min(i for i, event in enumerate(events) if event.delta.content)
    assert last_reasoning < first_text


async def test_long_tool_call_arguments_are_appended_by_index(gateway, upstream):
    arguments = '{"text": "' + "x" * (5 * 1024 * 1024) + '"}'
    call = ToolCallReply("call_1", "store", arguments)
    upstream.script(
        Reply(content="", finish_reason="tool_calls", tool_calls=(call,), tool_call_pieces=1)
    )
    tool = pb.Tool(name="store", parameters='{"type": "object"}')
    events = await _collect(gateway.stub, _ask(tools=[tool]))
    pieces = [piece for event in events for piece in event.delta.tool_calls]
    assert len(pieces) >= 3
    assert {piece.index for piece in pieces} == {pieces[0].index}
    assert (pieces[0].id, pieces[0].name) == ("call_1", "store")
    assert all((piece.id, piece.name) == ("", "") for piece in pieces[1:])
    assert "".join(piece.arguments for piece in pieces) == arguments
    assert events[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_a_long_cached_answer_is_replayed_in_pieces(upstream, start_gateway):
    cache = {"backend": "memory", "max_entry_bytes": 16 << 20, "memory_max_bytes": 64 << 20}
    gateway = await start_gateway(gateway_config(upstream.base_url, cache=cache))
    upstream.script(Reply(content=ASCII, chunks=1))
    request = _ask(params=DETERMINISTIC)
    live = await _collect(gateway.stub, request)
    replayed = await _collect(gateway.stub, request)
    assert not live[-1].final.cache_hit
    assert replayed[-1].final.cache_hit
    assert len(upstream.requests) == 1
    assert "".join(event.delta.content for event in replayed) == ASCII
    assert sum(1 for event in replayed if event.delta.content) >= 3


async def test_many_tool_calls_begun_in_one_event_reach_a_default_client_in_pieces(
    gateway, upstream
):
    """One event beginning 1,024 calls (the most an answer may make), each with an id and
    a name of 256 emoji (the most either may hold) and 512 emoji of arguments: over 4 MiB,
    which went out as one message a default client refuses while ids and names were not
    counted in a delta's size (the arguments alone are 512 Ki characters, not over it)."""
    emoji = "\U0001f600" * 256
    arguments = emoji * 2
    pieces = [
        {
            "index": i,
            "id": f"{i:04}" + emoji[4:],
            "function": {"name": emoji, "arguments": arguments},
        }
        for i in range(1024)
    ]
    upstream.script(Reply(content="", finish_reason="tool_calls", raw_tool_call_deltas=(pieces,)))
    tool = pb.Tool(name="store", parameters='{"type": "object"}')
    events = await _collect(gateway.stub, _ask(tools=[tool]))
    calls = [piece for event in events for piece in event.delta.tool_calls]
    assert [(call.index, call.name) for call in calls] == [(i, emoji) for i in range(1024)]
    assert all(call.arguments == arguments for call in calls)
    assert events[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
