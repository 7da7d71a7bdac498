"""What of an upstream's refusal of a request the caller is told, and how it is made safe.

An upstream that refuses the request itself (a 400, 404 or 422, a moderation 403, a
prompt over its context window) says why in its error body: the caller cannot mend its
request without that. What is relayed is the error's `message` (and its `param` and
`code`), or a validation refusal's first few errors (each its field and why, never the
value refused), as strings only, its control characters replaced, cut to a bound, and every
secret the gateway knows, or anything that looks like a key, replaced by `[redacted]`.
Refusals that are about the gateway's key or account, its rate or the upstream's health
(401, 403, 402, 429, 5xx) relay nothing: their bodies can quote the gateway's key
(OpenAI's `Incorrect API key provided: sk-proj-****1234`) and are the operator's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Iterable

from service.config import UpstreamConfig
from service.errors import RelayedError
from service.upstream.openai_json import error_explanation, validation_explanation
from service.upstream.proxy import Proxy

REDACTED = "[redacted]"
# The most of an upstream's message relayed: a sentence or two says why it refused, and
# the status travels in trailers, which clients refuse past 8-16 KiB. Counted in UTF-8
# bytes, not characters: the message goes out three times (the status's text,
# percent-encoded, each byte past ASCII as three; in the details, base64, as itself and
# as `upstream_message`), so 500 four-byte characters made trailers of over 11 KiB, past
# the 8 KiB a gRPC client takes by default (Java's always, C-core's at random).
MAX_RELAYED_BYTES = 500
# How far past the cut a message is read, so that a key or secret beginning before the
# cut is seen whole (and redacted whole): the rest of a message of megabytes is never
# scrubbed, which took a second of the event loop's time for each 16 MiB refusal.
_READ_PAST_CUT_CHARS = 1024
# A `param` or `code` longer than this names no field or error code: it is not relayed.
_MAX_NAME_CHARS = 100
# A secret shorter than this is no credential worth the name, and replacing it would
# redact ordinary words of the message.
_MIN_SECRET_CHARS = 8
# A run this long of a secret's characters is redacted too, wherever it stands: a message
# may quote a key cut short or without its prefix, and no word of a message shares 16
# characters in a row with a key by chance.
_PIECE_CHARS = 16
# Whitespace and control runs (C0, C1, zero-width and bidirectional marks, separators):
# one space each, so that no message can forge a line in a log or turn text around.
_CONTROLS = re.compile(
    r"[\s\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+"
)
# What looks like a credential whoever's it is: a bearer or basic credential (a digit in
# it, so that "basic authentication" is left as words), an OpenAI-style key (`sk-...`,
# `sk-proj-...`, `sk-ant-...`, masked ones with `*` too).
_KEY_LIKE = re.compile(
    r"\b(?:bearer|basic)\s+(?=[\w.~+/=*-]*\d)[\w.~+/=*-]{8,}|\bsk-[\w*-]{6,}",
    re.IGNORECASE | re.ASCII,
)


def secrets_of(config: UpstreamConfig, proxy: Proxy | None = None) -> tuple[str, ...]:
    """The secrets an upstream's requests carry: its key, and its proxy's credentials
    (`proxy_authorization`, and those `proxy`'s `Proxy-Authorization` holds, which may come
    from the environment's proxy URL) as sent and as `user:password` and password."""
    found = [config.api_key or ""]
    if config.proxy_authorization:
        found += _credentials(config.proxy_authorization)
    if proxy is not None and proxy.authorization:
        token = proxy.authorization.partition(" ")[2]
        found.append(token)
        # One the gateway did not encode is redacted as it is sent.
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            found += _credentials(base64.b64decode(token, validate=True).decode())
    return tuple(s for s in found if s)


def _credentials(user_password: str) -> list[str]:
    """`user:password`, and the password alone."""
    return [user_password, user_password.partition(":")[2]]


def scrubbed(text: str, secrets: Iterable[str]) -> str:
    """`text` with its control characters replaced by spaces, each of `secrets` and
    anything key-like replaced by `[redacted]`, cut to `MAX_RELAYED_BYTES`."""
    # Longest first: a secret that holds another is replaced whole.
    secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True)
    # Past the cut, then the cut: a cut first could leave half a key that no longer
    # matches the whole.
    longest = len(secrets[0]) if secrets else 0
    text = _collapsed_head(text, MAX_RELAYED_BYTES + max(longest, _READ_PAST_CUT_CHARS))
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for secret in secrets:
        text = _without_pieces(text, secret)
    return _cut(_KEY_LIKE.sub(REDACTED, text))


def _without_pieces(text: str, secret: str) -> str:
    """`text` with each run of at least `_PIECE_CHARS` characters that `secret` holds in
    a row (a key quoted cut short, or without its first characters) replaced whole by
    `[redacted]`."""
    for start in range(len(secret) - _PIECE_CHARS + 1):
        piece = secret[start : start + _PIECE_CHARS]
        at = text.find(piece)
        while at != -1:
            begin, end = at, at + _PIECE_CHARS
            before, after = start, start + _PIECE_CHARS  # the run's place in `secret`
            while begin > 0 and before > 0 and text[begin - 1] == secret[before - 1]:
                begin, before = begin - 1, before - 1
            while end < len(text) and after < len(secret) and text[end] == secret[after]:
                end, after = end + 1, after + 1
            text = text[:begin] + REDACTED + text[end:]
            at = text.find(piece, begin + len(REDACTED))
    return text


def _collapsed_head(text: str, chars: int) -> str:
    """`text` with each whitespace or control run one space, stripped, as far as its
    first `chars` characters: its raw text is read in growing lengths until that many
    remain once its runs are collapsed (a run of megabytes is one space), or it ends."""
    read = chars
    while True:
        head = _CONTROLS.sub(" ", text[:read]).lstrip()
        if read >= len(text):
            return head.rstrip()
        if len(head) >= chars:
            return head[:chars]
        read *= 4


def _cut(text: str) -> str:
    """`text` cut to its first `MAX_RELAYED_BYTES` of UTF-8, `...` included, at a
    character's end."""
    encoded = text.encode()
    if len(encoded) <= MAX_RELAYED_BYTES:
        return text
    return encoded[: MAX_RELAYED_BYTES - 3].decode(errors="ignore") + "..."


def relayed_error(body: bytes, *, secrets: Iterable[str]) -> RelayedError | None:
    """What an upstream's error `body` says of the request it refused, made safe to relay
    (`scrubbed` of `secrets`): its error's message, else its validation errors
    (`validation_explanation`); None when the body says nothing a caller can be told (not
    JSON, as a proxy's HTML page, or no message in it)."""
    explanation = error_explanation(body)
    if explanation is None:
        validation = validation_explanation(body)
        if validation is None:
            return None
        explanation = (validation, "", "")
    secrets = tuple(secrets)
    message, param, code = (scrubbed(text, secrets) for text in explanation)
    if not message:
        return None
    return RelayedError(message=message, param=_name(param), code=_name(code))


def _name(value: str) -> str:
    """A `param` or `code` as relayed: "" when too long to be one."""
    return value if len(value) <= _MAX_NAME_CHARS else ""


__all__ = ["MAX_RELAYED_BYTES", "REDACTED", "relayed_error", "scrubbed", "secrets_of"]
