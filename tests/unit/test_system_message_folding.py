"""An upstream's `system_messages: fold`: system text goes in the first user message."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.config import ConfigError, LocalModelConfig
from service.domain import ChatRequest, Message, Role, ToolCall
from service.local_model import (
    FORMATS_WITH_ONE_SYSTEM_MESSAGE,
    FORMATS_WITHOUT_SYSTEM_ROLE,
    LocalModelServer,
)
from service.upstream.openai_json import (
    request_body,
    unary_body,
    with_system_folded,
    with_system_merged,
)
from tests.unit.test_config_parsing import parse, upstream

SYSTEM = Message(Role.SYSTEM, "Always answer in French.")
USER = Message(Role.USER, "hi")
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # Nothing to fold: the messages as they are.
        ((USER,), (USER,)),
        ((USER, Message(Role.ASSISTANT, "salut")), (USER, Message(Role.ASSISTANT, "salut"))),
        # Gemma 3's template: the system text, a blank line, then the user's.
        ((SYSTEM, USER), (Message(Role.USER, "Always answer in French.\n\nhi"),)),
        # Only the first user message takes it; later turns stay as sent.
        (
            (SYSTEM, USER, Message(Role.ASSISTANT, "salut"), Message(Role.USER, "again")),
            (
                Message(Role.USER, "Always answer in French.\n\nhi"),
                Message(Role.ASSISTANT, "salut"),
                Message(Role.USER, "again"),
            ),
        ),
        # Several system messages, wherever they are, in their order.
        (
            (SYSTEM, USER, Message(Role.ASSISTANT, "a"), Message(Role.SYSTEM, "Be brief.")),
            (
                Message(Role.USER, "Always answer in French.\n\nBe brief.\n\nhi"),
                Message(Role.ASSISTANT, "a"),
            ),
        ),
        # A tool-call turn before the first user message keeps its calls and place.
        (
            (
                SYSTEM,
                Message(Role.ASSISTANT, "", tool_calls=(CALL,)),
                Message(Role.TOOL, "sunny", tool_call_id="call_1"),
                USER,
            ),
            (
                Message(Role.ASSISTANT, "", tool_calls=(CALL,)),
                Message(Role.TOOL, "sunny", tool_call_id="call_1"),
                Message(Role.USER, "Always answer in French.\n\nhi"),
            ),
        ),
        # No user message: the system text becomes one, first, rather than dropped.
        ((SYSTEM,), (Message(Role.USER, "Always answer in French."),)),
        (
            (SYSTEM, Message(Role.SYSTEM, "Be brief."), Message(Role.ASSISTANT, "Bonjour")),
            (
                Message(Role.USER, "Always answer in French.\n\nBe brief."),
                Message(Role.ASSISTANT, "Bonjour"),
            ),
        ),
    ],
)
def test_system_messages_fold_into_the_first_user_message(
    messages: tuple[Message, ...], expected: tuple[Message, ...]
) -> None:
    """Every system text, each then a blank line, opens the first user message's text."""
    assert with_system_folded(messages) == expected


def sent_messages(request: ChatRequest, **options: Any) -> Any:
    """The messages of the body `request_body` writes for `request`, streamed and unary
    alike (asserted)."""
    unary = request_body(request, upstream_model="u", stream=False, **options)
    streamed = request_body(request, upstream_model="u", stream=True, **options)
    assert unary_body(streamed) == unary
    return orjson.loads(unary)["messages"]


def test_an_upstream_set_to_fold_is_sent_the_system_text_in_the_user_message() -> None:
    """`fold`: one user message holding both texts; the default sends them as they are."""
    request = ChatRequest(model="m", messages=(SYSTEM, USER))
    assert sent_messages(request, system_messages="fold") == [
        {"role": "user", "content": "Always answer in French.\n\nhi"}
    ]
    assert sent_messages(request) == [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": "hi"},
    ]


def test_an_upstreams_system_messages_is_send_fold_or_merge() -> None:
    """`send` by default, `fold` or `merge` when set; any other value is refused, naming
    the option."""
    assert parse({"upstreams": [upstream()]}).upstreams[0].system_messages == "send"
    config = parse({"upstreams": [upstream(system_messages="fold")]})
    assert config.upstreams[0].system_messages == "fold"
    config = parse({"upstreams": [upstream(system_messages="merge")]})
    assert config.upstreams[0].system_messages == "merge"
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(system_messages="drop")]})
    assert caught.value.key == "upstreams[0].system_messages"


@pytest.mark.parametrize(
    ("chat_format", "expected"),
    [
        ("gemma", "fold"),
        ("mistral-instruct", "fold"),
        ("chatml", "merge"),
        ("llama-2", "merge"),
        ("llama-3", "send"),
        # A template of the model file renders system messages as it says (Gemma's folds).
        ("chat_template.default", "send"),
    ],
)
def test_the_local_model_folds_system_messages_for_a_format_that_drops_them(
    chat_format: str, expected: str
) -> None:
    """The shipped `gemma` format drops system messages: the local upstream folds them;
    `chatml` takes the first alone: it merges them."""
    config = LocalModelConfig(chat_format=chat_format)
    local = LocalModelServer(config, python="python").upstream_config()
    assert local.system_messages == expected


def _formatters() -> dict[str, Any]:
    """llama-cpp-python's registered chat formats that are plain formatters, by name."""
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    handlers = chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    formatters = {}
    for name, handler in handlers.items():
        # `register_chat_format` wraps each formatter in a handler closing over it; the
        # function-calling handlers (functionary, chatml-function-calling) close over none.
        cells = dict(zip(handler.__code__.co_freevars, handler.__closure__ or (), strict=True))
        if "chat_formatter" in cells:
            formatters[name] = cells["chat_formatter"].cell_contents
    return formatters


def test_the_formats_folded_for_are_those_whose_formatter_drops_system_messages() -> None:
    """Checked against the installed llama-cpp-python: a format not listed keeps a system
    message's text in its prompt, and one listed drops it, which folding mends."""
    messages = [{"role": "system", "content": "SYSTEM-TEXT"}, {"role": "user", "content": "hi"}]
    formatters = _formatters()
    dropping = {
        name
        for name, formatter in formatters.items()
        if "SYSTEM-TEXT" not in formatter(messages=messages).prompt
    }
    assert dropping == FORMATS_WITHOUT_SYSTEM_ROLE
    folded = sent_messages(ChatRequest(model="m", messages=(SYSTEM, USER)), system_messages="fold")
    assert formatters["gemma"](messages=folded).prompt == (
        "<start_of_turn>user\nAlways answer in French.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # One system message or none: the messages as they are.
        ((USER,), (USER,)),
        ((SYSTEM, USER), (SYSTEM, USER)),
        ((USER, SYSTEM), (USER, SYSTEM)),
        # Several, wherever they are: one, first, their texts in order.
        (
            (SYSTEM, USER, Message(Role.ASSISTANT, "salut"), Message(Role.SYSTEM, "Be brief.")),
            (
                Message(Role.SYSTEM, "Always answer in French.\n\nBe brief."),
                USER,
                Message(Role.ASSISTANT, "salut"),
            ),
        ),
    ],
)
def test_system_messages_merge_into_one_first(
    messages: tuple[Message, ...], expected: tuple[Message, ...]
) -> None:
    """`merge`: a format that takes one system message gets all their texts in it."""
    assert with_system_merged(messages) == expected


def test_the_formats_merged_for_are_those_whose_formatter_takes_one_system_message() -> None:
    """Checked against the installed llama-cpp-python: a format listed shows its prompt the
    first system message alone, dropping a later one, which merging mends; one not listed
    (and not folded for) shows both.

    Before, such a format (`chatml`, `llama-2`, ...) was sent every system message as it
    was, and a later one never reached the model, without a word."""
    messages = [
        {"role": "system", "content": "FIRST-SYSTEM"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "salut"},
        {"role": "system", "content": "LATER-SYSTEM"},
        {"role": "user", "content": "again"},
    ]
    formatters = _formatters()
    prompts = {name: formatter(messages=messages).prompt for name, formatter in formatters.items()}
    first_alone = {
        name for name, prompt in prompts.items() if "FIRST" in prompt and "LATER" not in prompt
    }
    assert first_alone == FORMATS_WITH_ONE_SYSTEM_MESSAGE
    request = ChatRequest(
        model="m",
        messages=(
            Message(Role.SYSTEM, "FIRST-SYSTEM"),
            USER,
            Message(Role.ASSISTANT, "salut"),
            Message(Role.SYSTEM, "LATER-SYSTEM"),
            Message(Role.USER, "again"),
        ),
    )
    merged = sent_messages(request, system_messages="merge")
    assert "LATER-SYSTEM" in formatters["chatml"](messages=merged).prompt
