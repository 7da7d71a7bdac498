"""An upstream's `takes_tools: false`: calls that use tools avoid it, or are refused."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import ConfigError, LocalModelConfig, UpstreamConfig
from service.domain import ChatRequest, Message, Role, Tool, ToolCall
from service.errors import ToolsUnsupported, to_rpc_status
from service.local_model import FORMATS_WITH_TOOLS, LocalModelServer
from service.pool import UpstreamPool
from service.upstream.client import UpstreamClient
from tests.unit.test_config_parsing import parse, upstream
from tests.unit.test_system_message_folding import _formatters

USER = Message(Role.USER, "Weather in Paris?")
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
ASKED = Message(Role.ASSISTANT, "", tool_calls=(CALL,))
RESULT = Message(Role.TOOL, "sunny", tool_call_id="call_1")


def test_an_upstream_takes_tools_unless_set_false() -> None:
    """`true` by default, `false` when set; anything but a boolean is refused, named."""
    assert parse({"upstreams": [upstream()]}).upstreams[0].takes_tools is True
    config = parse({"upstreams": [upstream(takes_tools=False)]})
    assert config.upstreams[0].takes_tools is False
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(takes_tools="no")]})
    assert caught.value.key == "upstreams[0].takes_tools"


def _pool(*takes_tools: bool) -> UpstreamPool:
    """A pool of upstreams up0, up1, ... serving model `m`, each taking tools as given."""
    return UpstreamPool(
        [
            UpstreamClient(
                UpstreamConfig(
                    name=f"up{i}",
                    base_url="http://127.0.0.1:9/v1",
                    models={"m": "m"},
                    takes_tools=takes,
                ),
                environ={},
            )
            for i, takes in enumerate(takes_tools)
        ]
    )


@pytest.mark.parametrize(
    ("messages", "tools", "field"),
    [
        ((USER,), (Tool("get_weather"),), "tools"),
        ((USER, ASKED, RESULT), (), "messages[1].tool_calls"),
        # A tool result alone (validation refuses it before: no call it answers).
        ((USER, RESULT), (), "messages[1].tool_call_id"),
    ],
)
def test_a_call_using_tools_is_refused_by_a_model_taking_none(
    messages: tuple[Message, ...], tools: tuple[Tool, ...], field: str
) -> None:
    """Tools declared, or tool calls or results sent back: refused on the first field
    that uses them, with the model named; a call without them goes on."""
    request = ChatRequest(model="m", messages=messages, tools=tools)
    with pytest.raises(ToolsUnsupported) as caught:
        _pool(False).toolless_upstreams(request)
    assert [v.field for v in caught.value.violations] == [field]
    assert to_rpc_status(caught.value).code == 3  # INVALID_ARGUMENT
    assert _pool(False).toolless_upstreams(ChatRequest(model="m", messages=(USER,))) == set()


def test_a_call_using_tools_leaves_out_only_the_upstreams_taking_none() -> None:
    """Beside an upstream that takes tools, those that take none are left out of it."""
    request = ChatRequest(model="m", messages=(USER, ASKED, RESULT))
    assert _pool(False, True, False).toolless_upstreams(request) == {"up0", "up2"}
    assert _pool(True, True).toolless_upstreams(request) == set()


@pytest.mark.parametrize(
    ("chat_format", "expected"),
    [
        ("gemma", False),
        ("chatml", False),
        ("llama-3", False),
        ("chatml-function-calling", True),
        ("functionary-v2", True),
        # A template of the model file gets the tools, to render as it says.
        ("chat_template.default", True),
    ],
)
def test_the_local_model_takes_tools_only_with_a_format_that_does(
    chat_format: str, expected: bool
) -> None:
    """The shipped `gemma` format ignores tools: the local upstream takes none."""
    config = LocalModelConfig(chat_format=chat_format)
    local = LocalModelServer(config, python="python").upstream_config()
    assert local.takes_tools is expected


def test_the_formats_taking_tools_are_the_function_calling_handlers() -> None:
    """Checked against the installed llama-cpp-python: every plain formatter leaves the
    tools, a tool call and a tool result out of its prompt, and the handlers that are no
    plain formatter are the function-calling ones, listed."""
    pytest.importorskip("llama_cpp.llama_chat_format")
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    tools = [{"type": "function", "function": {"name": "TOOL-NAME", "parameters": {}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "CALLED", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "TOOL-RESULT", "tool_call_id": "c1"},
    ]
    formatters = _formatters()
    prompts = {name: f(messages=messages, tools=tools).prompt for name, f in formatters.items()}
    assert {n for n, p in prompts.items() if any(s in p for s in ("TOOL-", "CALLED"))} == set()
    handlers = set(LlamaChatCompletionHandlerRegistry()._chat_handlers)
    assert handlers - set(formatters) == FORMATS_WITH_TOOLS
