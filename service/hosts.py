"""Host names as the gateway and its clients judge them: loopback or not, and the form
one goes on the wire in. No dependency beyond the standard library, so that the client
library (`gateway_client`) shares these with the server without importing its config."""

from __future__ import annotations

import ipaddress

__all__ = ["ascii_host", "is_loopback_host"]


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine: `localhost` (any case, or
    the absolute `localhost.`), 127.0.0.0/8, ::1 or the IPv4-mapped ::ffff:127.x.y.z. A
    DNS name such as 127.corp.example may resolve anywhere: not loopback."""
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # not so on Python before 3.13
    return address.is_loopback


def ascii_host(host: str) -> str | None:
    """`host` as it goes on the wire (a `Host` header, `CONNECT`, SNI) and is matched: an
    internationalised name in its IDNA (`xn--`) form, as curl sends it; None when it is
    not a valid one: an empty label or one over 63 characters (which the resolver would
    refuse with a UnicodeError rather than an OSError, ASCII or not), a space or a
    control character."""
    if any(c.isspace() or not c.isprintable() for c in host):
        return None  # the idna codec passes them: `pro xy` failed only at the first call
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
