"""GetUsage pages: page sizes and the cursor tokens between pages (https://google.aip.dev/158).

A ledger answers rows sorted by their dimensions (tenant, model, upstream, sorted labels).
A page token holds the last row's dimensions, so the next page starts after that key,
not at an offset: a row recorded between pages shifts no other row onto a page twice or
off every page. The token also holds a fingerprint of the query it continues, so one
from another query (another tenant's included) is refused rather than read against this
one. It grants nothing: the caller's permission checks run on every page, and a forged
token can only skip rows of a query the caller may read anyway.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
from collections.abc import Sequence

from service.errors import FieldViolation, InvalidRequest
from service.ledger import Dims, UsageFilter, UsageRow

# AIP-158: 0 (unset) is a default, and a size past the maximum is coerced to it.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
# The token's layout; another is refused, as a token from another query is.
_TOKEN_VERSION = 1


def page_size_violations(page_size: int) -> list[FieldViolation]:
    """What is wrong with a request's `page_size` (empty: nothing)."""
    if page_size < 0:
        return [FieldViolation("page_size", "must not be negative (0: the default, 1,000)")]
    return []


def page_size_of(page_size: int) -> int:
    """The rows a page holds at most for a request's non-negative `page_size`."""
    return min(page_size, MAX_PAGE_SIZE) if page_size else DEFAULT_PAGE_SIZE


def query_fingerprint(query: UsageFilter) -> str:
    """A digest of everything that selects `query`'s rows: its tenant, as authorised."""
    selector = [
        query.tenant,
        query.model,
        sorted(query.labels.items()),
        query.start_s,
        query.end_s,
    ]
    encoded = json.dumps(selector, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def page_token(query: UsageFilter, last: Dims) -> str:
    """The token of the page after the one that ended with the row of dimensions `last`."""
    tenant, model, upstream, labels = last
    content = [_TOKEN_VERSION, query_fingerprint(query), tenant, model, upstream, labels]
    encoded = json.dumps(content, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(encoded).decode().rstrip("=")


def position_of(token: str, query: UsageFilter) -> Dims | None:
    """The dimensions a page `token` goes on after; None for no token (the first page).

    Raises:
        InvalidRequest: `token` is not one the gateway wrote for `query`.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, fingerprint, tenant, model, upstream, labels = json.loads(raw)
        pairs = tuple((key, value) for key, value in labels)
    except (binascii.Error, ValueError, TypeError, RecursionError):  # nested past json's depth
        raise _refused("is not a next_page_token of GetUsage") from None
    texts = (fingerprint, tenant, model, upstream, *(text for pair in pairs for text in pair))
    if version != _TOKEN_VERSION or not all(isinstance(text, str) for text in texts):
        raise _refused("is not a next_page_token of GetUsage")
    if fingerprint != query_fingerprint(query):
        raise _refused("continues another query: send every field as on the first page")
    return tenant, model, upstream, pairs


def _refused(description: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation("page_token", description)])


def rows_after(rows: Sequence[UsageRow], position: Dims | None) -> Sequence[UsageRow]:
    """The rows of `rows` (sorted by dimensions, as a ledger answers) after `position`."""
    if position is None:
        return rows
    return rows[bisect.bisect_right(rows, position, key=UsageRow.dims) :]
