"""An upstream's `extra_body`: provider switches added to every request body it gets."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import orjson
import pytest

from service.config import GATEWAY_BODY_FIELDS, ConfigError, LocalModelConfig
from service.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from service.local_model import LocalModelServer
from service.upstream.openai_json import request_body
from tests.unit.test_config_parsing import parse, upstream

THINKING_OFF = {"thinking": {"type": "disabled"}, "chat_template_kwargs": {"n": [1, 2.5, None]}}


def test_extra_body_is_parsed_as_json_data() -> None:
    """Nested mappings, lists, numbers, booleans and null are kept as written."""
    config = parse({"upstreams": [upstream(extra_body=THINKING_OFF)]})
    assert config.upstreams[0].extra_body == THINKING_OFF
    assert parse({"upstreams": [upstream()]}).upstreams[0].extra_body == {}


@pytest.mark.parametrize(
    ("extra_body", "key", "problem"),
    [
        ({"model": "other"}, "upstreams[0]", "extra_body must not set model"),
        ({"API_KEY": "sk-x", "token": "t"}, "upstreams[0]", "must not carry credentials"),
        ({"stream": False, "messages": []}, "upstreams[0]", "must not set messages, stream"),
        ({"a": float("nan")}, "upstreams[0].extra_body.a", "finite number"),
        ({"a": {1: "x"}}, "upstreams[0].extra_body.a", "keys must be strings"),
        ({"a": datetime.date(2026, 1, 1)}, "upstreams[0].extra_body.a", "must be JSON data"),
        (["thinking"], "upstreams[0].extra_body", "must be a mapping"),
        # Servers written in Go match JSON fields without case: "Model" would replace "model".
        ({"Model": "other"}, "upstreams[0]", "extra_body must not set Model"),
        # orjson writes no integer past 64 bits: every request would fail.
        ({"a": [2**64]}, "upstreams[0].extra_body.a[0]", "at most 64 bits"),
        ({"a": -(2**63) - 1}, "upstreams[0].extra_body.a", "at most 64 bits"),
        # A YAML key such as `on:` or `1:` is not a string, at the top as further in.
        ({True: 1}, "upstreams[0].extra_body", "keys must be strings"),
        # Several choices are all billed while one is relayed; a legacy function call
        # would be dropped.
        ({"n": 3}, "upstreams[0]", "extra_body must not set n: the gateway relays one answer"),
        ({"best_of": 2, "N": 2}, "upstreams[0]", "must not set N, best_of"),
        ({"functions": [], "function_call": "auto"}, "upstreams[0]", "function_call, functions"),
        # A default effort the request's own replaces only in this spelling: another one
        # would be sent beside the request's, and a Go server would read either.
        (
            {"Reasoning_Effort": "high"},
            "upstreams[0]",
            "write reasoning_effort in lower case, as a request's own effort replaces it",
        ),
    ],
)
def test_bad_extra_body_names_the_key(extra_body: Any, key: str, problem: str) -> None:
    """A field the gateway writes itself, or data JSON cannot carry, is a config error."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(extra_body=extra_body)]})
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_request_body_adds_the_extra_fields() -> None:
    """The extra fields sit beside the request's own, unchanged."""
    request = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))
    body = orjson.loads(request_body(request, upstream_model="up", stream=True, extra=THINKING_OFF))
    assert body["thinking"] == {"type": "disabled"}
    assert body["chat_template_kwargs"] == {"n": [1, 2.5, None]}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_goes_only_with_tools(stream: bool) -> None:
    """`parallel_tool_calls` is sent with a request that declares tools, and left out of
    one that declares none, which OpenAI refuses with it; the other extra fields go with
    both."""
    extra = {"parallel_tool_calls": False, "user": "gw"}
    plain = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))
    with_tools = dataclasses.replace(plain, tools=(Tool("t"),))
    bodies = [
        orjson.loads(request_body(request, upstream_model="up", stream=stream, extra=extra))
        for request in (plain, with_tools)
    ]
    assert [body.get("parallel_tool_calls") for body in bodies] == [None, False]
    assert [body["user"] for body in bodies] == ["gw", "gw"]
    assert extra == {"parallel_tool_calls": False, "user": "gw"}  # the config's, untouched


def test_the_gateway_fields_cover_every_field_it_writes() -> None:
    """`GATEWAY_BODY_FIELDS` (what extra_body may not set) lists every field a request with
    everything set is sent with, so no extra field can replace one."""
    request = ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(
            temperature=0.5,
            top_p=0.9,
            max_tokens=10,
            stop=("x",),
            seed=1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT),
        ),
        tools=(Tool("t"),),
        tool_choice=ToolChoice(ToolChoiceMode.AUTO),
    )
    body = orjson.loads(request_body(request, upstream_model="up", stream=True))
    other_fields_body = orjson.loads(
        request_body(
            request,
            upstream_model="up",
            stream=True,
            max_tokens_field="max_completion_tokens",
            seed_field="random_seed",
        )
    )
    assert set(body) | set(other_fields_body) == GATEWAY_BODY_FIELDS


def test_max_tokens_goes_in_the_upstreams_field() -> None:
    """OpenAI's reasoning models take only `max_completion_tokens`: an upstream set so gets
    the request's max_tokens there, and no `max_tokens`."""
    request = ChatRequest(
        model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(max_tokens=64)
    )
    body = orjson.loads(
        request_body(
            request, upstream_model="o4", stream=False, max_tokens_field="max_completion_tokens"
        )
    )
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body
    config = parse({"upstreams": [upstream(max_tokens_field="max_completion_tokens")]})
    assert config.upstreams[0].max_tokens_field == "max_completion_tokens"
    assert parse({"upstreams": [upstream()]}).upstreams[0].max_tokens_field == "max_tokens"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(max_tokens_field="max_new_tokens")]})
    assert caught.value.key == "upstreams[0].max_tokens_field"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(extra_body={"max_completion_tokens": 10})]})
    assert "must not set max_completion_tokens" in caught.value.problem


def test_the_seed_goes_in_the_upstreams_field() -> None:
    """Mistral's API refuses `seed` (422, `extra_forbidden`) and takes `random_seed`: an
    upstream set so gets the request's seed there, and no `seed`; `seed` is the default,
    any other name a config error, and `extra_body` may set neither."""
    request = ChatRequest(
        model="m", messages=(Message(Role.USER, "hi"),), params=GenerationParams(seed=7)
    )
    body = orjson.loads(
        request_body(request, upstream_model="mistral", stream=False, seed_field="random_seed")
    )
    assert body["random_seed"] == 7
    assert "seed" not in body
    config = parse({"upstreams": [upstream(seed_field="random_seed")]})
    assert config.upstreams[0].seed_field == "random_seed"
    assert parse({"upstreams": [upstream()]}).upstreams[0].seed_field == "seed"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(seed_field="sampling_seed")]})
    assert caught.value.key == "upstreams[0].seed_field"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(extra_body={"random_seed": 1})]})
    assert "must not set random_seed" in caught.value.problem


def test_an_upstream_taking_json_object_schemas_gets_the_schema_in_that_shape() -> None:
    """llama-cpp-python's server takes a schema only as `{"type": "json_object", "schema":
    ...}`: an upstream set so gets the caller's schema there, byte for byte; the default
    is OpenAI's shape; the local model's upstream is set so."""
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}}'
    request = ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema=schema)
        ),
    )
    sent = request_body(
        request, upstream_model="u", stream=False, json_schema_format="json_object_schema"
    )
    assert b'"response_format":{"type":"json_object","schema":' + schema.encode() in sent
    openai = orjson.loads(request_body(request, upstream_model="u", stream=False))
    assert openai["response_format"]["type"] == "json_schema"
    config = parse({"upstreams": [upstream(json_schema_format="json_object_schema")]})
    assert config.upstreams[0].json_schema_format == "json_object_schema"
    assert parse({"upstreams": [upstream()]}).upstreams[0].json_schema_format == "openai"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(json_schema_format="grammar")]})
    assert caught.value.key == "upstreams[0].json_schema_format"
    local = LocalModelServer(LocalModelConfig(), python="python").upstream_config()
    assert local.json_schema_format == "json_object_schema"


def test_the_local_model_is_sent_unary_calls_as_streams() -> None:
    """`stream_unary_calls` is off for an upstream unless set, and on for the local model:
    llama-cpp-python stops a generation whose caller left only in a stream."""
    assert not parse({"upstreams": [upstream()]}).upstreams[0].stream_unary_calls
    assert parse({"upstreams": [upstream(stream_unary_calls=True)]}).upstreams[0].stream_unary_calls
    local = LocalModelServer(LocalModelConfig(), python="python").upstream_config()
    assert local.stream_unary_calls


def test_an_upstreams_reasoning_field_is_one_of_the_two_spellings() -> None:
    """`reasoning_field` is `reasoning_content` (DeepSeek's, the default) or `reasoning`
    (OpenRouter's, newer vLLM's); any other is refused at start, naming the option."""
    assert parse({"upstreams": [upstream()]}).upstreams[0].reasoning_field == "reasoning_content"
    config = parse({"upstreams": [upstream(reasoning_field="reasoning")]})
    assert config.upstreams[0].reasoning_field == "reasoning"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(reasoning_field="thinking")]})
    assert caught.value.key == "upstreams[0].reasoning_field"


def test_think_tags_is_off_unless_set_true_or_forced_open() -> None:
    """`think_tags` is off by default (some models write such tags as text), on for
    `true`, and `forced_open` for a template that opens the block itself; any other value
    is refused at start, naming the option and its settings."""
    settings = [
        parse({"upstreams": [upstream(**given)]}).upstreams[0].think_tags
        for given in (
            {},
            {"think_tags": False},
            {"think_tags": True},
            {"think_tags": "forced_open"},
        )
    ]
    assert settings == ["false", "false", "true", "forced_open"]
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(think_tags="yes please")]})
    assert "false, true, forced_open" in str(caught.value)
    assert caught.value.key == "upstreams[0].think_tags"


def test_extra_body_is_not_in_the_upstreams_repr() -> None:
    """Whatever an operator put there stays out of anything that prints the config."""
    config = parse({"upstreams": [upstream(extra_body={"x_org": "internal-team-7"})]})
    assert "internal-team-7" not in repr(config)


def test_a_requests_reasoning_effort_replaces_the_upstreams_default() -> None:
    """`extra_body` may set a default effort; the request's own, when set, goes out instead."""
    plain = ChatRequest(model="m", messages=(Message(Role.USER, "hi"),))
    low = ChatRequest(
        model="m",
        messages=(Message(Role.USER, "hi"),),
        params=GenerationParams(reasoning_effort=ReasoningEffort.LOW),
    )
    default = {"reasoning_effort": "high"}

    def sent(request: ChatRequest, extra: dict[str, object] | None) -> object:
        body = orjson.loads(request_body(request, upstream_model="u", stream=False, extra=extra))
        return body.get("reasoning_effort")

    assert (sent(low, default), sent(plain, default)) == ("low", "high")
    assert (sent(low, None), sent(plain, None)) == ("low", None)
    assert "reasoning_effort" not in GATEWAY_BODY_FIELDS  # so a default is allowed
    assert parse({"upstreams": [upstream(extra_body=default)]}).upstreams[0].extra_body == default
