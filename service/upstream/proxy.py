"""Which HTTP forward proxy, if any, an upstream's connections go through.

The policy is the one curl, requests, httpx and the openai SDK share, so that an operator
who set the environment for them gets the same from the gateway:

- `upstreams[].proxy_url` (`http://HOST:PORT`), with `proxy_authorization_env` holding
  `user:password`, decides for its upstream, whatever the environment says;
- otherwise `https_proxy`/`HTTPS_PROXY` for an https upstream, `http_proxy`/`HTTP_PROXY`
  for an http one (the lower-case spelling first, as curl reads them), unless
  `no_proxy`/`NO_PROXY` excludes the upstream's host; its URL may carry `user:password@`
  (that is the convention there), and `proxy_authorization_env`, when set, replaces them;
- a loopback upstream (`localhost`, 127.0.0.0/8, ::1) never goes through the
  environment's proxy.

Decided once, when an upstream's client opens (`choose_proxy`); the connection pool then
sends every request through the proxy it was given (`service.upstream.http`): an http
upstream's in absolute form, an https one's through a CONNECT tunnel. Not
supported: TLS to the proxy (`https://` proxies), authentication schemes other than
Basic, SOCKS and PAC files. See https://everything.curl.dev/usingcurl/proxies/env.html
for the environment variables' conventions.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from service.config import ConfigError, UpstreamConfig, proxy_url_problem
from service.hosts import ascii_host, is_loopback_host

# Where the environment's proxy for each upstream scheme is read, first found first.
_PROXY_VARIABLES = {
    "https": ("https_proxy", "HTTPS_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY"),
}
_NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy: where to connect, and the `Proxy-Authorization` to send.

    `source` says who chose it (`proxy_url`, or the environment variable's name), for the
    start's log line; `authorization` is a credential and is never shown.
    """

    host: str
    port: int
    source: str
    authorization: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """`HOST:PORT` (an IPv6 host in brackets): what logs name it by."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def basic_authorization(credentials: str) -> str:
    """The `Proxy-Authorization` value for `user:password` (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


def choose_proxy(config: UpstreamConfig, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy `config`'s connections go through, or None for a direct connection.

    Raises:
        ConfigError: the environment's proxy URL is not one the gateway can use (an
            `https://` or SOCKS proxy, no port, a path); the error names the variable,
            never its value.
    """
    if config.proxy_url is not None:  # checked at load (`UpstreamConfig`)
        parts = urlsplit(config.proxy_url)
        authorization = config.proxy_authorization
        return Proxy(
            host=parts.hostname or "",
            port=parts.port or 0,
            source="proxy_url",
            authorization=basic_authorization(authorization) if authorization else None,
        )
    upstream = urlsplit(config.base_url)
    host = (upstream.hostname or "").lower()
    port = upstream.port or (443 if upstream.scheme == "https" else 80)
    if is_loopback_host(host):
        return None
    found = _first_set(environ, _PROXY_VARIABLES.get(upstream.scheme, ()))
    if found is None:
        return None
    variable, url = found
    excluded = _first_set(environ, _NO_PROXY_VARIABLES)
    if excluded is not None and is_excluded(host, port, excluded[1]):
        return None
    if "://" not in url:  # `proxy.corp:3128`: curl and requests read it as http://
        url = "http://" + url
    problem = proxy_url_problem(url, key="its URL", credentials_go=None)
    if problem is not None:
        raise ConfigError("environment", variable, problem)
    parts = urlsplit(url)
    authorization = None
    if config.proxy_authorization:
        authorization = basic_authorization(config.proxy_authorization)
    elif parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        authorization = basic_authorization(f"{user}:{password}")
    return Proxy(
        host=parts.hostname or "",
        port=parts.port or 0,
        source=variable,
        authorization=authorization,
    )


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of `names` set to something other than blanks, and its value."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def is_excluded(host: str, port: int, no_proxy: str) -> bool:
    """Whether a `NO_PROXY` value excludes `host:port` from the proxy.

    Entries are comma-separated: `*` (everything), a host name, which also excludes its
    subdomains (`example.com`, `.example.com` and `*.example.com` exclude `api.example.com`), an IP
    address or CIDR range (`10.0.0.0/8`), each optionally with `:PORT` (an IPv6 address
    then in brackets) to exclude that port alone. Names match without case, and an
    internationalised one in either form (`bücher.example`, `xn--bcher-kva.example`).
    """
    host = _name(host.strip("[]"))
    addresses = _addresses(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        pattern, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        pattern = pattern.strip("[]")
        if addresses:
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if any(address in network for address in addresses):
                return True
            continue
        if pattern.startswith("*."):  # Go's and Docker's `*.example.com`: `.example.com`
            pattern = pattern[1:]
        pattern = _name(pattern.lstrip("."))
        if pattern and (host == pattern or host.endswith("." + pattern)):
            return True
    return False


def _name(host: str) -> str:
    """A host name as it is matched: lower case, in its IDNA form, no trailing dot."""
    host = host.lower().rstrip(".")
    return ascii_host(host) or host


def _addresses(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """`host` as an address, and an IPv4-mapped IPv6 one (`::ffff:10.0.0.1`) as the IPv4
    one it is too, so that an IPv4 range excludes it; none when it is a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address, address.ipv4_mapped
    return (address,)


def _split_port(entry: str) -> tuple[str, int | None]:
    """A `NO_PROXY` entry's host and port (None: any port). A bare IPv6 address has
    colons of its own and no port; with a port it goes in brackets."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


__all__ = ["Proxy", "basic_authorization", "choose_proxy", "is_excluded"]
