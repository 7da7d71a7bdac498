"""JSON mode and structured outputs through the real server, to a real-socket upstream."""

from __future__ import annotations

import json

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from tests.conftest import chat, chat_stream
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.helpers import field_violations

SCHEMA = (
    '{"type": "object", "properties": {"name": {"type": "string"},'
    ' "age": {"type": "integer", "minimum": 0}}, "required": ["name", "age"]}'
)
ANSWER = '{"name": "Ada", "age": 36}'


def schema_params(**fields: object) -> pb.GenerationParams:
    """Params asking for JSON that follows `SCHEMA`."""
    return pb.GenerationParams(
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=SCHEMA,
            **fields,  # type: ignore[arg-type]
        )
    )


async def test_json_mode_reaches_the_upstream(stub, upstream: FakeUpstream) -> None:
    """JSON mode is sent as `{"type": "json_object"}`; the answer comes back as written."""
    upstream.script(Reply(content=ANSWER))
    params = pb.GenerationParams(
        response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    )
    response = await stub.Complete(chat("Who? Answer in JSON.", params=params))
    assert json.loads(response.content) == {"name": "Ada", "age": 36}
    assert upstream.requests[-1].body["response_format"] == {"type": "json_object"}


async def test_a_schema_reaches_the_upstream_as_json(stub, upstream: FakeUpstream) -> None:
    """A schema is sent as a JSON object with its name and `strict`, integers kept."""
    upstream.script(Reply(content=ANSWER))
    await stub.Complete(chat("Who?", params=schema_params(schema_name="person", strict=True)))
    sent = upstream.requests[-1].body["response_format"]
    assert sent == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": json.loads(SCHEMA), "strict": True},
    }
    assert type(sent["json_schema"]["schema"]["properties"]["age"]["minimum"]) is int


async def test_a_stream_sends_the_schema_too(stub, upstream: FakeUpstream) -> None:
    """A streamed call carries the format, with the default name and no `strict`."""
    upstream.script(Reply(content=ANSWER, chunks=3))
    events = [event async for event in stub.CompleteStream(chat_stream(params=schema_params()))]
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == ANSWER
    sent = upstream.requests[-1].body["response_format"]
    assert sent == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": json.loads(SCHEMA)},
    }


@pytest.mark.parametrize(
    ("response_format", "fields"),
    [
        (pb.ResponseFormat(type=9), {"params.response_format.type"}),
        (
            pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA),
            {"params.response_format.json_schema"},
        ),
        (
            pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[]"),
            {"params.response_format.json_schema"},
        ),
        (pb.ResponseFormat(json_schema=SCHEMA), {"params.response_format.json_schema"}),
        (
            pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, strict=True),
            {"params.response_format.strict"},
        ),
        (
            pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=SCHEMA, schema_name="a b"
            ),
            {"params.response_format.schema_name"},
        ),
    ],
)
async def test_a_bad_format_is_refused_before_the_upstream(
    stub, upstream: FakeUpstream, response_format: pb.ResponseFormat, fields: set[str]
) -> None:
    """A bad format gives INVALID_ARGUMENT naming its field; nothing reaches the upstream."""
    params = pb.GenerationParams(response_format=response_format)
    for call in (stub.Complete(chat(params=params)), _drain(stub, params)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(caught.value)) == fields
    assert upstream.requests == []


async def _drain(stub, params: pb.GenerationParams) -> None:
    async for _ in stub.CompleteStream(chat_stream(params=params)):
        pass


async def test_a_format_of_fields_unknown_here_sends_none(stub, upstream: FakeUpstream) -> None:
    """A newer client's format field, unknown to this gateway, beside no type is an unset
    format: nothing is sent upstream, as the README says of an unset one. Before, it went
    as `{"type": "text"}`, which a server that takes no `response_format` refuses."""
    newer_field = b"\x78\x01"  # field 15, varint 1: in no ResponseFormat this gateway knows
    params = pb.GenerationParams(response_format=pb.ResponseFormat.FromString(newer_field))
    await stub.Complete(chat("Say hi", params=params))
    async for _ in stub.CompleteStream(chat_stream("Say hi again", params=params)):
        pass
    assert [request.body.get("response_format") for request in upstream.requests] == [None, None]
