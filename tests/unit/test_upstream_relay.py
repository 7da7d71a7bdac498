"""What of an upstream's refusal is relayed to a caller, and what never is."""

from __future__ import annotations

import json

import pytest

from service.config import UpstreamConfig
from service.errors import RelayedError
from service.upstream.proxy import Proxy, basic_authorization
from service.upstream.relay import MAX_RELAYED_BYTES, relayed_error, scrubbed, secrets_of


def _error(**fields: object) -> bytes:
    return json.dumps({"error": fields}).encode()


@pytest.mark.parametrize(
    ("body", "relayed"),
    [
        (
            _error(message="bad name", type="invalid_request_error", param="tools", code="x"),
            RelayedError("bad name", param="tools", code="x"),
        ),
        (
            b'{"object": "error", "message": "bad temperature", "code": 400}',
            RelayedError("bad temperature"),
        ),
        (_error(message="bad", param=["tools"], code=400), RelayedError("bad")),
        (_error(message="bad", param="p" * 101), RelayedError("bad")),
        (b'{"error": "the message alone"}', RelayedError("the message alone")),
        (_error(message=["not", "a", "string"]), None),
        (_error(message=" \n\t "), None),
        (b"<html>400 Bad Request</html>", None),
        (b'{"detail": "FastAPI\'s own"}', None),
        (b"", None),
    ],
    ids=[
        "openai",
        "vllm-bare",
        "non-strings-dropped",
        "long-param-dropped",
        "message-alone",
        "message-not-a-string",
        "message-blank",
        "html",
        "no-error",
        "empty",
    ],
)
def test_what_a_refusal_relays(body: bytes, relayed: RelayedError | None) -> None:
    """An error body's message, param and code as strings, or nothing."""
    assert relayed_error(body, secrets=()) == relayed


@pytest.mark.parametrize(
    ("text", "secrets", "scrubbed_text"),
    [
        ("key sk-abcdef123456 refused", (), "key [redacted] refused"),
        (
            "Incorrect API key provided: sk-proj-****1234.",
            (),
            "Incorrect API key provided: [redacted].",
        ),
        ("header Bearer abc.def-ghi_123 sent", (), "header [redacted] sent"),
        ("proxy said basic dXNlcjpwYXNzd29yZA==", (), "proxy said [redacted]"),
        ("key my-own-key-1234 there", ("my-own-key-1234",), "key [redacted] there"),
        ("key abc-def-ghi and abc", ("abc", "abc-def-ghi"), "key [redacted] and abc"),
        ("a\nforged\r\nline\x1b[0m\u202eend\x00", (), "a forged line [0m end"),
        ("ask-me sk-short, basic authentication, Bearer tokens", (), None),
    ],
    ids=[
        "sk-key",
        "masked-sk-key",
        "bearer",
        "basic",
        "configured-secret",
        "short-secret-kept",
        "controls",
        "not-keys",
    ],
)
def test_scrubbed(text: str, secrets: tuple[str, ...], scrubbed_text: str | None) -> None:
    """Secrets and key-like strings are redacted, controls become one space (None: the
    text is relayed as it is)."""
    assert scrubbed(text, secrets) == (text if scrubbed_text is None else scrubbed_text)


def test_a_long_message_is_cut_after_its_secrets_are_redacted() -> None:
    """A key straddling the cut is redacted whole, not relayed in part."""
    secret = "configured-secret-123456"
    text = "x" * (MAX_RELAYED_BYTES - 20) + secret + "y" * 100
    relayed = scrubbed(text, (secret,))
    assert len(relayed) == MAX_RELAYED_BYTES
    assert relayed.endswith("x[redacted]yyyyyyy...")
    assert "configured" not in relayed


def test_a_long_message_is_cut_to_its_bytes_at_a_characters_end() -> None:
    """The cut counts UTF-8 bytes (the trailers' size), never splitting a character."""
    relayed = scrubbed("😀" * 200, ())
    assert relayed == "😀" * ((MAX_RELAYED_BYTES - 3) // 4) + "..."


@pytest.mark.parametrize("gap", [0, 1_000, 5_000, 2_000_000])
def test_a_secret_after_a_long_run_of_whitespace_is_redacted_whole(gap: int) -> None:
    """A message is scrubbed only as far as it can be relayed, but as far as its
    collapsed text goes: a run of whitespace (one space) never pushes a secret past it."""
    secret = "configured-secret-123456"
    relayed = scrubbed("x " * 240 + "\n" * gap + secret + "y" * 2_000, (secret,))
    assert relayed.startswith("x " * 240 + "[redacted]yyy")
    assert "configured" not in relayed


def test_an_upstreams_secrets_are_its_key_and_its_proxys_credentials() -> None:
    """The key, and the proxy's credentials as configured and as sent."""
    config = UpstreamConfig(
        name="up", base_url="http://127.0.0.1:1/v1", models={"m": "m"}, api_key="the-key-123"
    )
    config_with_proxy = UpstreamConfig(
        name="up",
        base_url="http://127.0.0.1:1/v1",
        models={"m": "m"},
        proxy_authorization="me:configured-pw",
    )
    proxy = Proxy("proxy.test", 3128, "HTTPS_PROXY", basic_authorization("env:env-password"))
    token = basic_authorization("env:env-password").partition(" ")[2]
    assert secrets_of(config) == ("the-key-123",)
    assert secrets_of(config_with_proxy) == ("me:configured-pw", "configured-pw")
    assert secrets_of(config, proxy) == ("the-key-123", token, "env:env-password", "env-password")
