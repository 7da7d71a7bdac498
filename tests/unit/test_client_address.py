"""The Python client's check of the gateway's address, before any channel is made."""

from __future__ import annotations

import re

import pytest

from gateway_client.client import check_address

PORT_REFUSED = "the port must be 1..65535, in digits alone"

# Ports gRPC reads its own way: with a sign or a leading blank (`-15485` is 50051 modulo
# 65536), empty (443), past 65535 (modulo 65536), 0, or not digits at all.
BAD_PORTS = [
    "+50051",
    "-1",
    "-15485",
    " 50051",
    "\t50051",
    "+ 50051",
    "50_051",
    "5e4",
    "0x10",
    "\uff15\uff10\uff10\uff15\uff11",  # fullwidth digits, which `str.isdigit` takes
    "\u0665\u0660\u0660\u0665\u0661",  # Arabic-Indic digits
    "",
    "0",
    "00",
    "65536",
    "115587",
    "https",
]

# Ports in digits alone, 1..65535: leading zeros are still digits.
GOOD_PORTS = ["1", "50051", "65535", "050051"]

# Every form of target whose port the check reads.
FORMS = [
    "localhost:{port}",
    "127.0.0.1:{port}",
    "[::1]:{port}",
    "dns:///gw.example:{port}",
    "dns:gw.example:{port}",
    "DNS://ns.example/gw.example:{port}",
    "dns:///gw.example%3A{port}",
    "ipv4:127.0.0.1:{port}",
    "ipv4:127.0.0.1:50051,127.0.0.1:{port}",
    "ipv6:[::1]:{port}",
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_not_1_to_65535_in_digits_alone_is_refused(form: str, port: str) -> None:
    """A port with a sign or a leading blank, an empty one, 0, one past 65535 and one not
    in digits are refused alike, in each form of target. Before, `int()`'s forms passed:
    gRPC read `:-15485` as port 50051, another service's maybe, caller key and all."""
    address = form.format(port=port)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{address!r}: {PORT_REFUSED}')}$"):
        check_address(address)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("port", GOOD_PORTS)
def test_a_port_1_to_65535_in_digits_is_taken(form: str, port: str) -> None:
    """Leading zeros are still digits: `050051` is port 50051, as gRPC reads it."""
    check_address(form.format(port=port))


@pytest.mark.parametrize(
    "address",
    [
        "localhost",
        "gw.example",
        "::1",
        "[::1]",
        "dns:///gw.example",
        "localhost:50051 ",  # gRPC leaves trailing blanks out
        "localhost:50051?x",
        "unix:/run/gw.sock",
        "unix:gw.sock",
        "unix-abstract:gw",
        "vsock:3:50051",
    ],
)
def test_a_target_naming_no_port_or_a_good_one_is_taken(address: str) -> None:
    """A bare host (gRPC's default port), a bare IPv6 address, and a socket's path or
    name are no HOST:PORT: nothing to refuse."""
    check_address(address)


@pytest.mark.parametrize("address", ["", "h\udce9st:50051"])
def test_an_empty_address_or_one_not_utf8_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"empty|not UTF-8 text"):
        check_address(address)
