"""This machine's addresses, as tests of listen hosts need them."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def link_local_address() -> tuple[str, str] | None:
    """An IPv6 link-local address of this machine and its interface, if any."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hex_address, _, _, scope, _, interface = line.split()
        if scope == "20":  # the link's
            return str(ipaddress.IPv6Address(bytes.fromhex(hex_address))), interface
    return None
