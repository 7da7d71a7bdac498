"""The comma lists of `name=value` pairs two `OTEL_*` variables hold, checked as read.

The OTLP exporters read their headers from `OTEL_EXPORTER_OTLP_HEADERS` (or a signal's
own), the SDK the resource's attributes from `OTEL_RESOURCE_ATTRIBUTES`, and each drops
a pair it cannot take with a warning, the exporters' quoting the pair: a collector's
auth header went missing (every export refused) and its secret into the log. Here such
a pair is found first, and said by its place in the list, never its text.
"""

from __future__ import annotations

import re

# A header as the OTLP exporters (gRPC and HTTP) take it, liberally: a name of the
# characters an HTTP token holds, `=`, and a value of printable ASCII but `"`, `,`, `;`
# and `\` (URL-encoded, or a space left as it is); space or tab around each part and
# around the commas (opentelemetry-api 1.45, `opentelemetry.util.re`).
_HEADER = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)
_HEADER_COMMA = re.compile(r"[ \t]*,[ \t]*")


def header_problem(value: str) -> str | None:
    """Why an OTLP exporter drops a header of `value` (by its place), else None."""
    entries = _HEADER_COMMA.split(value)
    for place, entry in enumerate(entries, start=1):
        if entry.strip() and not _HEADER.fullmatch(entry.strip()):
            return (
                f"entry {place} of {len(entries)} is no name=value header the OTLP exporters "
                "can send (its text is not shown): URL-encode any comma, semicolon, double "
                "quote, backslash or non-ASCII character in a value"
            )
    return None


def resource_attribute_problem(value: str) -> str | None:
    """Why the SDK drops a resource attribute of `value` (by its place), else None: one
    with no `=`, or no key before it. An empty entry (a trailing comma) drops nothing."""
    entries = value.split(",")
    for place, entry in enumerate(entries, start=1):
        key, is_pair, _ = entry.partition("=")
        if entry.strip() and not (is_pair and key.strip()):
            return (
                f"entry {place} of {len(entries)} is no key=value attribute "
                "(its text is not shown): URL-encode any comma in a value"
            )
    return None
