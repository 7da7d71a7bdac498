"""The Python client's checks of a request's text arguments, before any call."""

from __future__ import annotations

import fractions
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway_client import GatewayClient, build_request, tls_credentials
from gateway_client.client import check_timeout
from tests.integration.pki import Pki, make_pki

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


@pytest.mark.parametrize(
    ("prompt", "got"),
    [
        (b"Say hi", "bytes (decode it to a str)"),
        (bytearray(b"Say hi"), "bytearray (decode it to a str)"),
        ({"role": "user", "content": "Say hi"}, "dict"),
    ],
)
def test_a_prompt_of_bytes_or_a_mapping_is_named_as_a_whole(prompt: Any, got: str) -> None:
    """Bytes (a file read in "rb") and a mapping are iterables, but no sequence of turns.
    Before, they were read as turns: b"Say hi" was `prompt[0]: ... got int`."""
    with pytest.raises(TypeError) as raised:
        build_request(prompt, model="m")
    assert str(raised.value) == (
        f"prompt: expected a str, a sequence of turns or a CompleteRequest, got {got}"
    )


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


# Bytes that are not UTF-8, as Python reads them with errors="surrogateescape": "Café" in
# Latin-1 holds the lone surrogate "\udce9" at index 3.
NOT_UTF8 = b"Caf\xe9".decode("utf-8", "surrogateescape")
NOT_UTF8_MESSAGE = r"not UTF-8 text: a lone surrogate '\\udce9' at index 3"


@pytest.mark.parametrize(
    ("arguments", "where"),
    [
        ({"prompt": NOT_UTF8}, "prompt"),
        ({"system": NOT_UTF8}, "system"),
        ({"prompt": [("user", "hi"), ("assistant", NOT_UTF8)]}, r"prompt\[1\]"),
        ({"model": NOT_UTF8}, "model"),
        ({"labels": {"team": NOT_UTF8}}, r"labels\['team'\]"),
    ],
)
def test_build_request_names_a_text_that_is_not_utf8(arguments: dict[str, Any], where: str) -> None:
    """A text argument holding a lone surrogate is a ValueError naming the argument and
    where in it. Before, protobuf's UnicodeEncodeError named none of the texts."""
    with pytest.raises(ValueError, match=rf"^{where}: {NOT_UTF8_MESSAGE}"):
        build_request(**{"prompt": "hi", "model": "m", **arguments})


async def test_a_summarys_document_or_instructions_not_utf8_are_named() -> None:
    """A document read as `surrogateescape` reads bytes that are not UTF-8, or instructions
    so read, are named before any call (nothing listens at the address), as the other
    texts are."""
    async with GatewayClient("127.0.0.1:9", timeout_s=1) as client:
        with pytest.raises(ValueError, match=rf"^document: {NOT_UTF8_MESSAGE}"):
            await client.summarize(NOT_UTF8, model="m")
        with pytest.raises(ValueError, match=rf"^instructions: {NOT_UTF8_MESSAGE}"):
            await client.summarize("A document.", model="m", instructions=NOT_UTF8)


@pytest.mark.parametrize("api_key", [b"llmgw_key", ["llmgw_key"], 7])
def test_a_caller_key_that_is_not_a_str_is_named_without_repeating_it(api_key: Any) -> None:
    """A caller key as bytes (a secret store's) or a list is refused when the client is
    made, naming the argument, not the key. Before, bytes and an int failed inside the
    check with an error naming neither, and a list was sent as `Bearer ['llmgw_key']`."""
    with pytest.raises(TypeError, match=r"^api_key: expected a str, got \w+$"):
        GatewayClient("127.0.0.1:9", api_key=api_key)


def test_a_caller_key_holding_bytes_that_are_not_utf8_is_refused_without_showing_them() -> None:
    """A key read from a file or variable whose bytes are not UTF-8 (a lone surrogate) is
    refused as any key gRPC metadata cannot carry. Before, the text check came first and
    named the key's byte and where it stood in the key: `a lone surrogate '\\udce9' at
    index 13`."""
    with pytest.raises(ValueError, match="characters gRPC metadata cannot carry") as refused:
        GatewayClient("127.0.0.1:9", api_key="llmgw_secret" + NOT_UTF8)
    assert str(refused.value) == (
        "the caller key has characters gRPC metadata cannot carry (a stray newline?)"
    )


async def test_number_and_time_arguments_are_named_when_malformed() -> None:
    """A summary's `target_tokens`, `cache_ttl_s`, a batch's `concurrency`, `usage`'s
    `since` and `until`, and `timeout_s` are named in their TypeError (or, out of their
    field's range, ValueError) before any call, as `max_tokens` is. Before, protobuf's
    "'str' object cannot be interpreted as an integer", a bare "Value out of range", or
    an AttributeError ('str' object has no attribute 'utcoffset') named none of them."""
    with pytest.raises(TypeError, match=r"^cache_ttl_s: expected an int, got str$"):
        build_request("hi", model="m", cache_ttl_s="60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^cache_ttl_s: Value out of range: -1$"):
        build_request("hi", model="m", cache_ttl_s=-1)
    assert build_request("hi", model="m", cache_ttl_s=60).cache.ttl_seconds == 60
    async with GatewayClient("127.0.0.1:9", timeout_s=1) as client:
        with pytest.raises(TypeError, match=r"^target_tokens: expected an int, got float$"):
            await client.summarize("A document.", model="m", target_tokens=300.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^target_tokens: Value out of range: -1$"):
            await client.summarize("A document.", model="m", target_tokens=-1)
        with pytest.raises(TypeError, match=r"^concurrency: expected an int, got str$"):
            client.complete_batch([], concurrency="8")  # type: ignore[arg-type]
        for name in ("since", "until"):
            with pytest.raises(TypeError, match=rf"^{name}: expected a datetime, got str$"):
                await client.usage(**{name: "2026-03-01T00:00:00Z"})
        with pytest.raises(TypeError, match=r"^timeout_s: expected seconds or None, got str$"):
            await client.list_models(timeout_s="5")  # type: ignore[arg-type]


class _Count:
    """An integer of another type, as numpy's are: an int to whatever reads `__index__`."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_integers_and_seconds_of_other_numeric_types_are_taken() -> None:
    """What protobuf takes as an integer (numpy's `int64`, any `__index__`) is taken, and a
    timeout of any real number (a `Fraction`, numpy's numbers), as before the checks were
    added; a bool is no count."""
    request = build_request("hi", model="m", cache_ttl_s=_Count(60))  # type: ignore[arg-type]
    assert request.cache.ttl_seconds == 60
    with pytest.raises(TypeError, match=r"^cache_ttl_s: expected an int, got bool$"):
        build_request("hi", model="m", cache_ttl_s=True)
    assert check_timeout(fractions.Fraction(3, 2)) == 1.5
    with pytest.raises(TypeError, match=r"^timeout_s: expected seconds or None, got bool$"):
        check_timeout(True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and client certificates signed by it (openssl)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _pems(pki: Pki, *, as_text: bool) -> dict[str, Any]:
    """tls_credentials' arguments for team-a's mutual TLS, as bytes or as str."""
    files = {
        "root_certificates": pki.ca,
        "certificate_chain": pki.client_a[0],
        "private_key": pki.client_a[1],
    }
    return {
        name: path.read_text(encoding="ascii") if as_text else path.read_bytes()
        for name, path in files.items()
    }


def test_tls_credentials_take_pem_text_as_its_ascii_bytes(pki: Pki) -> None:
    """A PEM given as str (read with `read_text`, or from a secret store's text) is taken
    as its ASCII bytes, and checked as bytes are: a key that is not the certificate's is
    still refused. Before, a str failed with "'in <string>' requires string as left
    operand, not bytes", naming no argument."""
    assert isinstance(tls_credentials(**_pems(pki, as_text=True)), grpc.ChannelCredentials)
    mismatched = _pems(pki, as_text=True) | {"private_key": pki.client_b[1].read_text()}
    with pytest.raises(ValueError, match=r"^the private key is not the client certificate's"):
        tls_credentials(**mismatched)
    with pytest.raises(ValueError, match=r"^the root certificates hold no PEM certificate$"):
        tls_credentials(root_certificates=pki.ca_key.read_text())


@pytest.mark.parametrize("name", ["root_certificates", "certificate_chain", "private_key"])
@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (Path("ca.pem"), "expected PEM bytes or str, got PosixPath (a file's path: "
         "give its contents, path.read_bytes())"),
        (bytearray(b"-----BEGIN CERTIFICATE-----"), "expected PEM bytes or str, got bytearray"),
        (5, "expected PEM bytes or str, got int"),
    ],
    ids=["path", "bytearray", "int"],
)  # fmt: skip
def test_tls_credentials_name_a_pem_neither_bytes_nor_text(
    pki: Pki, name: str, wrong: object, message: str
) -> None:
    """A PEM of another type (a file's `Path`, a bytearray gRPC would refuse) is a
    TypeError naming the argument, and the fix for a path. Before, each failed inside
    the checks or gRPC with an error naming none ("argument of type 'PosixPath' is not
    iterable")."""
    with pytest.raises(TypeError) as raised:
        tls_credentials(**(_pems(pki, as_text=False) | {name: wrong}))
    assert str(raised.value) == f"{name}: {message}"


def test_tls_credentials_refuse_pem_text_with_other_than_ascii(pki: Pki) -> None:
    """A str with characters no PEM has (a curly quote pasted in) is a ValueError naming the
    argument and never repeating the key."""
    key = pki.client_a[1].read_text() + "\u2019"
    with pytest.raises(
        ValueError, match=r"^private_key: a PEM is ASCII text; this str has other characters$"
    ):
        tls_credentials(certificate_chain=pki.client_a[0].read_bytes(), private_key=key)
