"""Host names as the gateway and its clients judge them: loopback or not, and the form
one goes on the wire in. No dependency beyond the standard library, so that the client
library (`gateway_client`) shares these with the server without importing its config;
and whether the server can listen on one (`listen_host_problem`), the one judge for
`server.listen`, `server.health_listen` and `telemetry.prometheus_host`."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

__all__ = [
    "ListenError",
    "ascii_host",
    "bind_failure",
    "is_loopback_host",
    "listen_host_problem",
    "listen_hosts_overlap",
]


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


# The letters IDNA 2003 (Python's `idna` codec) maps to others and IDNA 2008 (curl's
# libidn2, browsers) keeps (UTS #46's deviations): `faß.de` is fass.de to the one and
# xn--fa-hia.de to the other, two hosts with two owners.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")  # ß, final ς, ZWNJ, ZWJ


def ascii_host(host: str) -> str | None:
    """`host` as it goes on the wire (a `Host` header, `CONNECT`, SNI) and is matched: an
    internationalised name in its IDNA (`xn--`) form, as curl sends it; None when it is
    not a valid one: an empty label or one over 63 characters (which the resolver would
    refuse with a UnicodeError rather than an OSError, ASCII or not), a space or a
    control character, or a letter IDNA 2003 and 2008 write differently (`ß`: the codec
    here would send a key for `faß.de` to fass.de, where curl reaches xn--fa-hia.de)."""
    if any(c.isspace() or not c.isprintable() for c in host):
        return None  # the idna codec passes them: `pro xy` failed only at the first call
    if not _IDNA_DEVIATIONS.isdisjoint(host.lower()):
        return None
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


class ListenError(OSError):
    """The configured address cannot be listened on (taken, not this host's, no permission)."""


def listen_host_problem(host: str) -> str | None:
    """Why a server cannot listen on `host` (without brackets), in words that end a
    config error on its key; None when it can, as far as this machine can tell.

    A form that grpc's resolver reads otherwise than the C library's (`127.1`, which
    grpc does not read at all) or a link-local IPv6 address without its zone is refused
    as written; a host no name resolves, or whose every address is another machine's,
    once resolved. Resolving may ask DNS: the start and `check` ask, the config's load
    does not.
    """
    if host in ("", "0.0.0.0", "::") or host.lower() == "localhost":
        return None  # grpc's wildcards, and both loopbacks whatever /etc/hosts says
    return (
        _ipv4_form_problem(host)
        or _multicast_problem(host)
        or _zone_problem(host)
        or _resolution_problem(host)
    )


def _multicast_problem(host: str) -> str | None:
    """A multicast group's address, which no server listens on: the kernel refuses a
    stream socket's bind to it, and grpc said only "Invalid argument"."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not address.is_multicast:
        return None
    return f"{host} is a multicast address; listen on an address of this machine"


def _ipv4_form_problem(host: str) -> str | None:
    """The address to write for an IPv4 address in a form other than dotted decimal.

    The C library's `inet_aton` (so Python, curl, ping and the Prometheus endpoint) reads
    `127.1`, `0x7f.0.0.1` and `2130706433` as 127.0.0.1, and `010.0.0.1` as 8.0.0.1
    (octal); grpc reads none of the first three, and the last as 10.0.0.1.
    """
    if any(c.isspace() for c in host):
        return None  # inet_aton stops at a space: `10 foo` would be 0.0.0.10
    try:
        packed = socket.inet_aton(host)
    except (OSError, ValueError):  # ValueError: a NUL in it
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return None
    read = socket.inet_ntoa(packed)
    parts = host.split(".")
    if len(parts) == 4 and all(part.isdigit() for part in parts):  # zero-padded
        decimal = ".".join(str(int(part)) for part in parts)
        if decimal != read:
            return f"{host} is octal to the C library, decimal to grpc: write {decimal} or {read}"
    return f"{host} is IPv4 shorthand, which grpc and the C library read differently: write {read}"


def _zone_problem(host: str) -> str | None:
    """What to write for a link-local IPv6 address without its zone (`%eth0`): grpc
    cannot bind one, as the link is not named; or for a zone on any other address, where
    it names nothing (the resolver finds no such name)."""
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return None
    if not address.is_link_local:
        if address.scope_id is None:
            return None
        bare = host.partition("%")[0]
        return f"{host}: a zone names a link-local address's interface; write {bare}"
    if address.scope_id is not None:
        return None
    for index, interface in socket.if_nameindex():
        if bind_failure(socket.AF_INET6, (host, 0, 0, index)) is None:
            return f"{host} is link-local, on {interface}: add its zone: [{host}%{interface}]"
    return (
        f"{host} is no address of this machine (and a link-local one needs its zone, the "
        f"interface it is on, as in [{host}%eth0])"
    )


def _resolution_problem(host: str) -> str | None:
    """Why `host` is none of this machine's: no name resolves it, or each address it
    resolves to is another machine's."""
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # UnicodeError: a label the idna codec refuses
        return f"no name resolves {host!r}"
    failures = [
        bind_failure(family, (address[0], 0, *address[2:])) for family, _, _, _, address in found
    ]
    if failures and all(failure == errno.EADDRNOTAVAIL for failure in failures):
        return f"{host} is no address of this machine"
    return None


def bind_failure(family: socket.AddressFamily, address: tuple[Any, ...]) -> int | None:
    """The errno of a bind to `address` as grpc binds, or None when it would succeed."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(address)
    except OSError as exc:
        return exc.errno if exc.errno is not None else -1
    return None
