"""Which forward proxy an upstream goes through: its `proxy_url`, or the environment's."""

from __future__ import annotations

import base64

import pytest

from service.config import ConfigError
from service.upstream.proxy import Proxy, choose_proxy, is_excluded
from tests.unit.test_proxy_config import PASSWORD, configured


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def test_proxy_url_decides_whatever_the_environment_says():
    """`proxy_url` is used even where `NO_PROXY` or a loopback upstream would exclude the
    environment's, with Basic credentials from `proxy_authorization_env`."""
    config = configured(
        {"PX": "gw:pw"},
        base_url="http://127.0.0.1:8000/v1",
        proxy_url="http://proxy.corp:3128",
        proxy_authorization_env="PX",
    )
    proxy = choose_proxy(config, {"NO_PROXY": "*", "HTTP_PROXY": "http://other:1"})
    assert proxy == Proxy("proxy.corp", 3128, source="proxy_url", authorization=basic("gw:pw"))
    assert "gw:pw" not in repr(proxy)
    assert basic("gw:pw") not in repr(proxy)


@pytest.mark.parametrize(
    ("base_url", "environ", "expected"),
    [
        ("https://api.example.com/v1", {"HTTPS_PROXY": "http://p:3128"}, ("p:3128", "HTTPS_PROXY")),
        ("https://api.example.com/v1", {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"},
         ("low:1", "https_proxy")),
        ("https://api.example.com/v1", {"HTTPS_PROXY": "p:3128"}, ("p:3128", "HTTPS_PROXY")),
        ("https://api.example.com/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("https://api.example.com/v1", {"HTTPS_PROXY": "  "}, None),
        ("http://vllm.internal:8000/v1", {"HTTP_PROXY": "http://p:3128"}, ("p:3128", "HTTP_PROXY")),
        ("http://vllm.internal:8000/v1", {"http_proxy": "http://p:3128"}, ("p:3128", "http_proxy")),
        ("http://vllm.internal:8000/v1", {"HTTPS_PROXY": "http://p:3128"}, None),
        ("http://127.0.0.1:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://127.8.9.1:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://localhost:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://[::1]:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://localhost.:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://[::ffff:127.0.0.1]:8000/v1", {"HTTP_PROXY": "http://p:3128"}, None),
        ("https://api.example.com/v1", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.com"},
         None),
        ("https://api.example.com/v1", {"HTTPS_PROXY": "http://p:3128", "no_proxy": "other.com"},
         ("p:3128", "HTTPS_PROXY")),
        ("https://api.example.com/v1",
         {"HTTPS_PROXY": "http://[fd00::1]:3128"}, ("[fd00::1]:3128", "HTTPS_PROXY")),
    ],
)  # fmt: skip
def test_the_environment_picks_the_proxy_as_curl_does(base_url, environ, expected):
    """`https_proxy`/`HTTPS_PROXY` for https, `http_proxy`/`HTTP_PROXY` for http (lower
    case first), `NO_PROXY` excludes, a loopback upstream never goes through them."""
    proxy = choose_proxy(configured(base_url=base_url), environ)
    assert (None if proxy is None else (proxy.address, proxy.source)) == expected


def test_an_environment_proxy_url_may_carry_credentials():
    """`http://user:password@host:port` (percent-encoded) becomes Basic credentials."""
    environ = {"HTTPS_PROXY": "http://corp%5Cgw:p%40ss@p:3128"}
    proxy = choose_proxy(configured(), environ)
    assert proxy is not None
    assert proxy.authorization == basic("corp\\gw:p@ss")
    assert "p@ss" not in repr(proxy)


def test_proxy_authorization_env_replaces_the_environment_urls_credentials():
    """Credentials named in the config win over those in the environment's URL."""
    config = configured({"PX": "mine:pw"}, proxy_authorization_env="PX")
    proxy = choose_proxy(config, {"HTTPS_PROXY": "http://theirs:x@p:3128"})
    assert proxy is not None
    assert proxy.authorization == basic("mine:pw")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"https://gw:{PASSWORD}@p:3128", "TLS to the proxy (https://) is not supported"),
        (f"socks5h://gw:{PASSWORD}@p:1080", "not SOCKS"),
        (f"http://gw:{PASSWORD}@p", "names no port"),
        (f"http://gw:{PASSWORD}@p:3128/proxy.pac", "without a path"),
        (f"http://gw:{PASSWORD}@p..corp:3128", "not a valid host name"),
    ],
)
def test_an_environment_proxy_the_gateway_cannot_use_is_an_error_naming_the_variable(
    value, problem
):
    """An unusable `HTTPS_PROXY` is a config error naming the variable, not its value
    (which holds a password): rather than connecting around the proxy."""
    with pytest.raises(ConfigError) as caught:
        choose_proxy(configured(), {"HTTPS_PROXY": value})
    assert caught.value.key == "HTTPS_PROXY"
    assert problem in caught.value.problem
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "excluded"),
    [
        ("api.example.com", 443, "*", True),
        ("api.example.com", 443, "example.com", True),
        ("api.example.com", 443, ".example.com", True),
        ("example.com", 443, ".example.com", True),
        ("api.example.com", 443, "API.Example.COM", True),
        ("api.example.com", 443, " other.org , example.com ", True),
        ("badexample.com", 443, "example.com", False),
        ("example.com.evil", 443, "example.com", False),
        ("api.example.com", 443, "example.com:443", True),
        ("api.example.com", 443, "example.com:8443", False),
        ("api.example.com", 443, "", False),
        ("api.example.com", 443, ",,", False),
        ("10.1.2.3", 80, "10.1.2.3", True),
        ("10.1.2.3", 80, "10.0.0.0/8", True),
        ("10.1.2.3", 80, "10.1.2.3:8080", False),
        ("11.1.2.3", 80, "10.0.0.0/8", False),
        ("fd00::5", 80, "fd00::5", True),
        ("fd00::5", 80, "[fd00::5]:80", True),
        ("fd00::5", 80, "[fd00::5]:81", False),
        ("fd00::5", 80, "fd00::/16", True),
        # An IPv4-mapped IPv6 address is its IPv4 address too.
        ("::ffff:10.1.2.3", 80, "10.0.0.0/8", True),
        ("[::ffff:10.1.2.3]", 80, "10.1.2.3", True),
        ("::ffff:10.1.2.3", 80, "::ffff:10.0.0.0/104", True),
        ("::ffff:11.1.2.3", 80, "10.0.0.0/8", False),
        # Go's and Docker's form, as `.example.com` (curl knows only that one).
        ("api.example.com", 443, "*.example.com", True),
        ("example.com", 443, "*.example.com", True),
        ("badexample.com", 443, "*.example.com", False),
        ("api.example.com", 443, "*example.com", False),
        ("api.b\u00fccher.example", 443, "xn--bcher-kva.example", True),
        ("xn--bcher-kva.example", 443, "B\u00dcCHER.example", True),
    ],
)
def test_no_proxy_matches_hosts_suffixes_addresses_and_ports(host, port, no_proxy, excluded):
    """`NO_PROXY` entries: `*`, host names with their subdomains (leading dot or not),
    IP addresses and CIDR ranges, each with an optional port."""
    assert is_excluded(host, port, no_proxy) is excluded
