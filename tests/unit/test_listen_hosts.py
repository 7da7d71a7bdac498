"""`listen_host_problem`: the one judge of a listen host, for every listen key."""

from __future__ import annotations

import pytest

from service.hosts import listen_host_problem
from tests.host_addresses import link_local_address

_SHORTHAND = "is IPv4 shorthand, which grpc and the C library read differently: write"


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("127.1", f"127.1 {_SHORTHAND} 127.0.0.1"),
        ("127.0.1", f"127.0.1 {_SHORTHAND} 127.0.0.1"),
        ("0x7f.1", f"0x7f.1 {_SHORTHAND} 127.0.0.1"),
        ("0x7f.0.0.1", f"0x7f.0.0.1 {_SHORTHAND} 127.0.0.1"),
        ("2130706433", f"2130706433 {_SHORTHAND} 127.0.0.1"),
        ("0", f"0 {_SHORTHAND} 0.0.0.0"),
        ("127.0.0.01", f"127.0.0.01 {_SHORTHAND} 127.0.0.1"),  # zero-padded, one reading
        (
            "0177.0.0.1",
            "0177.0.0.1 is octal to the C library, decimal to grpc: write 177.0.0.1 or 127.0.0.1",
        ),
        (
            "127.0.0.010",
            "127.0.0.010 is octal to the C library, decimal to grpc: write 127.0.0.10 or 127.0.0.8",
        ),
    ],
)
def test_an_ipv4_form_other_than_dotted_decimal_names_the_address_to_write(
    host: str, problem: str
) -> None:
    """An IPv4 address the C library reads (so Python's probe bound it) but grpc does not,
    or reads otherwise, is refused as written, naming the dotted-decimal address."""
    assert listen_host_problem(host) == problem


@pytest.mark.parametrize(
    "host", ["", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_a_host_of_this_machine_has_no_problem(host: str) -> None:
    """Wildcards, loopbacks and `localhost` pass, as grpc listens on them."""
    assert listen_host_problem(host) is None


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("no-such-host.invalid", "no name resolves 'no-such-host.invalid'"),  # RFC 6761
        ("10 foo", "no name resolves '10 foo'"),  # not 0.0.0.10, as inet_aton would read it
        ("a" * 64, f"no name resolves '{'a' * 64}'"),  # a label over 63: a UnicodeError
        ("192.0.2.7", "192.0.2.7 is no address of this machine"),  # TEST-NET-1
    ],
)
def test_a_host_none_of_this_machines_says_why(host: str, problem: str) -> None:
    """A name that resolves nowhere, or to another machine, is refused in one wording."""
    assert listen_host_problem(host) == problem


def test_a_link_local_address_of_no_interface_here_says_it_needs_a_zone_too() -> None:
    """`fe80::1` without its zone, on no interface of this machine: refused, saying both."""
    assert listen_host_problem("fe80::1") == (
        "fe80::1 is no address of this machine (and a link-local one needs its zone, the "
        "interface it is on, as in [fe80::1%eth0])"
    )


def test_a_link_local_address_of_this_machine_without_its_zone_names_its_interface() -> None:
    """This machine's own link-local address without `%eth0`: grpc cannot bind it (the
    link is not named), so it is refused naming the zone to add."""
    found = link_local_address()
    if found is None:
        pytest.skip("no IPv6 link-local address here")
    address, interface = found
    assert listen_host_problem(address) == (
        f"{address} is link-local, on {interface}: add its zone: [{address}%{interface}]"
    )
    assert listen_host_problem(f"{address}%{interface}") is None


@pytest.mark.parametrize("host", ["ff02::1", "224.0.0.1", "239.1.2.3", "ff02::1%lo"])
def test_a_multicast_address_is_refused_as_no_listen_host(host: str) -> None:
    """A multicast group's address: grpc's bind failed with only "Invalid argument",
    exit 1, as a taken port; refused as the config's fault, naming what to listen on."""
    assert listen_host_problem(host) == (
        f"{host} is a multicast address; listen on an address of this machine"
    )


@pytest.mark.parametrize(("host", "bare"), [("::1%lo", "::1"), ("2001:db8::7%eth0", "2001:db8::7")])
def test_a_zone_on_an_address_not_link_local_names_the_address_to_write(
    host: str, bare: str
) -> None:
    """A zone only names a link-local address's interface: on another it was refused as
    "no name resolves '::1%lo'", which sent the operator looking at DNS."""
    assert listen_host_problem(host) == (
        f"{host}: a zone names a link-local address's interface; write {bare}"
    )
