"""The cache key covers every field that changes the output, and nothing else."""

from __future__ import annotations

import dataclasses

import pytest

from service.cache import cache_key
from service.domain import (
    CacheMode,
    CachePolicy,
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)

BASE = ChatRequest(
    model="m",
    messages=(Message(Role.SYSTEM, "be brief"), Message(Role.USER, "hi")),
    params=GenerationParams(temperature=0.0, max_tokens=10, stop=("\n",)),
)


def _params(**changes: object) -> ChatRequest:
    return dataclasses.replace(BASE, params=dataclasses.replace(BASE.params, **changes))


CHANGED = {
    "model": dataclasses.replace(BASE, model="m2"),
    "tenant": dataclasses.replace(BASE, tenant="other"),
    "role": dataclasses.replace(
        BASE, messages=(Message(Role.USER, "be brief"), Message(Role.USER, "hi"))
    ),
    "content": dataclasses.replace(
        BASE, messages=(Message(Role.SYSTEM, "be brief"), Message(Role.USER, "hi!"))
    ),
    "order": dataclasses.replace(BASE, messages=tuple(reversed(BASE.messages))),
    "extra message": dataclasses.replace(
        BASE, messages=(*BASE.messages, Message(Role.ASSISTANT, ""))
    ),
    "fewer messages": dataclasses.replace(BASE, messages=BASE.messages[1:]),
    "content split across messages": dataclasses.replace(
        BASE, messages=(Message(Role.SYSTEM, "be brief"), Message(Role.USER, "h"))
    ),
    "temperature unset": _params(temperature=None),
    "temperature": _params(temperature=0.5),
    "top_p set to zero": _params(top_p=0.0),
    "top_p": _params(top_p=0.9),
    "max_tokens unset": _params(max_tokens=None),
    "max_tokens": _params(max_tokens=11),
    "stop removed": _params(stop=()),
    "stop changed": _params(stop=("\n\n",)),
    "stop added": _params(stop=("\n", "END")),
    "seed zero": _params(seed=0),
    "seed": _params(seed=7),
    "presence_penalty zero": _params(presence_penalty=0.0),
    "frequency_penalty zero": _params(frequency_penalty=0.0),
    "frequency_penalty": _params(frequency_penalty=1.0),
    "json mode": _params(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)),
    "json schema": _params(
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, json_schema="{}")
    ),
}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_changing_any_field_changes_the_key(name: str) -> None:
    """A request that differs in one output-relevant field gets a different key."""
    assert cache_key(CHANGED[name], prefix="p") != cache_key(BASE, prefix="p")


def test_all_keys_are_distinct() -> None:
    """No two of the variants collide with each other either."""
    keys = {cache_key(r, prefix="p") for r in (BASE, *CHANGED.values())}
    assert len(keys) == len(CHANGED) + 1


def test_equal_requests_share_a_key() -> None:
    """Two separately built equal requests get the same key."""
    twin = ChatRequest(
        model="m",
        messages=(Message(Role.SYSTEM, "be brief"), Message(Role.USER, "hi")),
        params=GenerationParams(temperature=0.0, max_tokens=10, stop=("\n",)),
    )
    assert cache_key(twin, prefix="p") == cache_key(BASE, prefix="p")


@pytest.mark.parametrize(
    "same",
    [
        dataclasses.replace(BASE, labels={"team": "a"}),
        dataclasses.replace(BASE, idempotency_key="abc"),
        dataclasses.replace(BASE, cache=CachePolicy(mode=CacheMode.REFRESH, ttl_s=5)),
        _params(temperature=-0.0),
        _params(response_format=ResponseFormat(ResponseFormatType.TEXT)),
    ],
)
def test_fields_that_do_not_change_the_answer_keep_the_key(same: ChatRequest) -> None:
    """Labels, idempotency key, cache policy, the sign of zero and a text format (what
    an unset format asks for) do not split entries."""
    assert cache_key(same, prefix="p") == cache_key(BASE, prefix="p")


def test_a_schema_named_response_shares_the_unnamed_schemas_key() -> None:
    """An unnamed schema is sent named "response": naming it so asks for the same answer,
    and shares its entry; any other name does not."""

    def schema(name: str) -> ChatRequest:
        return _params(
            response_format=ResponseFormat(
                ResponseFormatType.JSON_SCHEMA, json_schema="{}", schema_name=name
            )
        )

    unnamed = cache_key(schema(""), prefix="p")
    assert cache_key(schema("response"), prefix="p") == unnamed
    assert cache_key(schema("answer"), prefix="p") != unnamed


def test_key_has_prefix_and_version_and_no_prompt_text() -> None:
    """The key is namespaced, versioned, and never contains the prompt."""
    key = cache_key(BASE, prefix="llmgw")
    assert key.startswith("llmgw:v1:")
    assert "brief" not in key
    assert len(key.rsplit(":", 1)[1]) == 64
