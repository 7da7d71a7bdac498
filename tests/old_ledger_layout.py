"""Usage rows written as the release before the per-tenant layout wrote them.

Its record script, copied verbatim (with the row id and day/month spend keys it was
given), so that tests can check that an upgraded gateway still reads those rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Mapping
from typing import Any

from service.ledger import period_key

_FIELDS = (
    "requests",
    "estimated_requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_pico",
)
# KEYS: dims, row, bucket's row ids, buckets, day spend, month spend, applied numbers.
# ARGV: row id, dims JSON, row TTL, bucket, drop buckets before, record number, lowest
# unconfirmed number, applied numbers' TTL, then the counters in _FIELDS order.
OLD_RECORD_LUA = """
if redis.call('ZSCORE', KEYS[7], ARGV[6]) then return 0 end
redis.call('ZADD', KEYS[7], ARGV[6], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. ARGV[7])
redis.call('EXPIRE', KEYS[7], ARGV[8])
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local fields = {FIELDS}
for i, name in ipairs(fields) do redis.call('HINCRBY', KEYS[2], name, ARGV[8 + i]) end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[5])
local cost = ARGV[8 + #fields]
for k = 5, 6 do
  redis.call('INCRBY', KEYS[k], cost)
  redis.call('EXPIRE', KEYS[k], ARGV[3])
end
return 1
""".replace("FIELDS", ", ".join(f"'{name}'" for name in _FIELDS))
_numbers = itertools.count(1)


async def record_in_old_layout(
    client: Any,
    prefix: str,
    *,
    at_s: float,
    tenant: str,
    model: str,
    upstream: str,
    labels: Mapping[str, str],
    counters: Mapping[str, int],
    bucket_s: int = 3600,
    retention_days: int = 62,
) -> None:
    """One call recorded by the old release's `RedisLedger.record` at `at_s`."""
    ttl_s = retention_days * 86400
    bucket = int(at_s // bucket_s) * bucket_s
    dims = (tenant, model, upstream, tuple(sorted(labels.items())))
    row_id = hashlib.sha256(json.dumps(dims, separators=(",", ":")).encode()).hexdigest()[:24]
    keys = [
        f"{prefix}:dims",
        f"{prefix}:row:{bucket}:{row_id}",
        f"{prefix}:bucket:{bucket}",
        f"{prefix}:buckets",
        *(f"{prefix}:spend:{tenant}:{period_key(p, at_s)}" for p in ("day", "month")),
        f"{prefix}:applied:{uuid.uuid4().hex}",
    ]
    args = [
        row_id, json.dumps(dims), ttl_s, bucket, at_s - ttl_s, next(_numbers), 0, 7200,
        *(counters.get(name, 0) for name in _FIELDS),
    ]  # fmt: skip
    await client.eval(OLD_RECORD_LUA, len(keys), *keys, *args)
