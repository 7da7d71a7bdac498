"""`redis_address`: a Redis URL as a log line or a warning may show it."""

from __future__ import annotations

import pytest

from service.redis_access import redis_address


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://gw:s3cret@redis:6379/2", "redis://redis:6379/2"),
        ("redis://:s3cret@redis:6379", "redis://redis:6379"),
        ("redis://redis:6379/0?password=s3cret&socket_timeout=1", "redis://redis:6379/0"),
        ("rediss://gw:s3cret@[::1]:6380/1", "rediss://[::1]:6380/1"),
        ("unix://:s3cret@/run/redis.sock?db=3", "unix:///run/redis.sock"),
        ("redis://redis", "redis://redis"),
    ],
    ids=["plain", "user-password", "password", "query-password", "ipv6-tls", "unix", "no-port"],
)
def test_an_address_keeps_where_redis_is_and_drops_credentials_and_options(
    url: str, address: str
) -> None:
    """Scheme, host, port and path stay; a user, a password and query options go."""
    assert redis_address(url) == address
