"""Host names as the gateway and its clients judge them: loopback or not, and the form
one goes on the wire in. No dependency beyond the standard library, so that the client
library (`gateway_client`) shares these with the server without importing its config."""

from __future__ import annotations

import ipaddress

__all__ = ["ascii_host", "is_loopback_host", "listen_hosts_overlap"]


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


# grpc listens on a wildcard host, either spelling, as [::] with IPv4 mapped in (0.0.0.0
# where the machine has no IPv6), and on `localhost` at both loopbacks whatever
# /etc/hosts says: a server on [::1] or 127.0.0.1 and one on `localhost` share a port.
_LOCALHOST_ADDRESSES = frozenset({"127.0.0.1", "::1"})


def listen_hosts_overlap(first: str, second: str) -> bool:
    """Whether grpc servers listening on hosts `first` and `second`, on one port, would
    bind a shared address (the second's start failing "address in use"): a wildcard
    (`0.0.0.0`, `[::]`) overlaps every host, `localhost` both loopbacks.

    Decided without a resolver: a host name other than `localhost` overlaps only the
    same name (and a wildcard), as what it resolves to is for the bind to find.
    """
    first_bound, second_bound = _bound_addresses(first), _bound_addresses(second)
    if first_bound is None or second_bound is None:  # a wildcard
        return True
    return not first_bound.isdisjoint(second_bound)


def _bound_addresses(host: str) -> frozenset[str] | None:
    """The addresses grpc binds for `host`; None for every address (a wildcard)."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return _LOCALHOST_ADDRESSES
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return frozenset({host.rstrip(".")})
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # the same socket address to the kernel
    return None if address.is_unspecified else frozenset({str(address)})
