"""The Python client's checks of a request's text arguments, before any call."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_client import GatewayClient, build_request

# (the arguments, how the TypeError's message reads)
NON_TEXT_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"model": 5}, "model: expected a str, got int"),
    ({"model": None}, "model: expected a str, got NoneType"),
    ({"model": b"m"}, "model: expected a str, got bytes"),
    ({"labels": {"team": 5}}, "labels['team']: expected a str, got int"),
    ({"labels": {"team": "a", "env": None}}, "labels['env']: expected a str, got NoneType"),
    ({"labels": {5: "search"}}, "labels[5]: the key must be a str, got int"),
    ({"labels": "team=search"}, "labels: expected a mapping of str to str, got str"),
    ({"labels": 5}, "labels: expected a mapping of str to str, got int"),
]


@pytest.mark.parametrize(("arguments", "message"), NON_TEXT_ARGUMENTS)
def test_build_request_names_a_non_text_model_or_label(
    arguments: dict[str, Any], message: str
) -> None:
    """A model, label key or label value that is not a str is a TypeError naming it and
    the type it got. Before, protobuf's "bad argument type for built-in operation" named
    neither."""
    with pytest.raises(TypeError) as raised:
        build_request("hi", **{"model": "m", **arguments})
    assert str(raised.value) == message


def test_build_request_takes_text_labels_as_given() -> None:
    """String labels, as a mapping or as (key, value) pairs, reach the request unchanged."""
    for labels in ({"team": "search"}, [("team", "search")]):
        assert dict(build_request("hi", model="m", labels=labels).labels) == {"team": "search"}


@pytest.mark.parametrize(("arguments", "message"), NON_TEXT_ARGUMENTS)
async def test_summarize_and_usage_name_a_non_text_model_or_label(
    arguments: dict[str, Any], message: str
) -> None:
    """`summarize` and `usage` check their model and labels as `build_request` does,
    before any call (nothing listens at the address)."""
    async with GatewayClient("127.0.0.1:9", timeout_s=1) as client:
        with pytest.raises(TypeError) as summarized:
            await client.summarize("A document.", **{"model": "m", **arguments})
        with pytest.raises(TypeError) as read:
            await client.usage(**arguments)
    assert str(summarized.value) == str(read.value) == message


async def test_every_other_text_argument_is_named_when_not_a_str() -> None:
    """The idempotency key, a summary's document and instructions, and the usage filter's
    tenant are checked alike (protobuf's error named none of them)."""
    with pytest.raises(TypeError, match=r"^idempotency_key: expected a str, got int$"):
        build_request("hi", model="m", idempotency_key=5)  # type: ignore[arg-type]
    async with GatewayClient("127.0.0.1:9", timeout_s=1) as client:
        with pytest.raises(TypeError, match=r"^document: expected a str, got bytes$"):
            await client.summarize(b"A document.", model="m")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^instructions: expected a str, got NoneType$"):
            await client.summarize("A document.", model="m", instructions=None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^tenant: expected a str, got int$"):
            await client.usage(tenant=7)  # type: ignore[arg-type]
