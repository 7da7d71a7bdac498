"""The forward proxy's config keys: `proxy_url` and `proxy_authorization_env`."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from service.config import ConfigError, GatewayConfig, UpstreamConfig, parse_config

PASSWORD = "pr0xy-S3CRET-pass"


def upstream(**fields: Any) -> dict[str, Any]:
    """One valid upstream entry, with `fields` replacing its keys."""
    return {"name": "up", "base_url": "https://api.example.com/v1", "models": ["m"], **fields}


def parse(data: Any, **environ: str) -> GatewayConfig:
    return parse_config(copy.deepcopy(data), source="<test>", environ=environ)


def configured(environ: dict[str, str] | None = None, **fields: Any) -> UpstreamConfig:
    return parse({"upstreams": [upstream(**fields)]}, **(environ or {})).upstreams[0]


@pytest.mark.parametrize(
    ("proxy_url", "problem"),
    [
        ("https://proxy.corp:3128", "TLS to the proxy (https://) is not supported"),
        ("socks5://proxy.corp:1080", "not SOCKS or other schemes"),
        ("proxy.corp:3128", "not SOCKS or other schemes"),
        ("http://proxy.corp", "it names no port"),
        ("http://proxy.corp:0", "it names no port"),
        ("http://proxy.corp:99999", "its host or port cannot be read"),
        ("http://:3128", "it names no host"),
        ("http://cache..proxy.corp:3128", "its host is not a valid host name"),
        (f"http://{'x' * 64}.proxy.corp:3128", "its host is not a valid host name"),
        ("http://pro xy.corp:3128", "its host is not a valid host name"),
        ("http://proxy\x01.corp:3128", "its host is not a valid host name"),
        ("http://proxy.corp:3128/path", "without a path, query or fragment"),
        ("http://proxy.corp:3128/?a=b", "without a path, query or fragment"),
        (f"http://gw:{PASSWORD}@proxy.corp:3128", "put user:password in proxy_authorization_env"),
        ("http://gw@proxy.corp:3128", "must not carry a user or password"),
    ],
)
def test_a_proxy_url_the_gateway_cannot_use_is_refused_unechoed(proxy_url, problem):
    """Each refused form of `proxy_url` is a config error on the upstream that names the
    key and never repeats the URL (it may hold a password)."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(proxy_url=proxy_url)]})
    assert caught.value.key == "upstreams[0]"
    assert "proxy_url" in caught.value.problem
    assert problem in caught.value.problem
    assert PASSWORD not in str(caught.value)
    assert "proxy.corp" not in str(caught.value)


def test_a_usable_proxy_url_is_kept():
    """`http://HOST:PORT` (a trailing slash too) is accepted as written."""
    assert configured(proxy_url="http://proxy.corp:3128/").proxy_url == "http://proxy.corp:3128/"
    assert configured(proxy_url="http://[fd00::1]:3128").proxy_url == "http://[fd00::1]:3128"


def test_proxy_credentials_come_from_the_variable_proxy_authorization_env_names():
    """The variable's `user:password` fills the upstream's credentials; they are in
    neither its repr nor a config compare, and the variable counts among the secrets."""
    data = {"upstreams": [upstream(proxy_url="http://p:3128", proxy_authorization_env="PX")]}
    config = parse(data, PX=f"gw:{PASSWORD}")
    assert config.upstreams[0].proxy_authorization == f"gw:{PASSWORD}"
    assert PASSWORD not in repr(config.upstreams[0])
    assert "PX" in config.secret_variables


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({}, "the environment variable PX is not set"),
        ({"PX": ""}, "the environment variable PX is empty"),
        ({"PX": PASSWORD}, "must hold user:password"),
        ({"PX": f"gw:{PASSWORD}\r\nX-Injected: 1"}, "must hold user:password on one line"),
    ],
)
def test_proxy_authorization_env_must_hold_user_and_password(environ, problem):
    """A named variable that is unset, empty, or not `user:password` on one line is a
    config error naming the key, never its value."""
    data = {"upstreams": [upstream(proxy_url="http://p:3128", proxy_authorization_env="PX")]}
    with pytest.raises(ConfigError) as caught:
        parse(data, **environ)
    assert caught.value.key == "upstreams[0].proxy_authorization_env"
    assert problem in caught.value.problem
    assert PASSWORD not in str(caught.value)


def test_proxy_authorization_env_is_a_variable_name_not_the_credentials():
    """Credentials pasted where the variable's name goes are refused, unechoed."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(proxy_authorization_env=f"gw:{PASSWORD}")]})
    assert "proxy_authorization_env must name an environment variable" in caught.value.problem
    assert PASSWORD not in str(caught.value)


def test_a_disabled_upstreams_proxy_variable_is_not_required():
    """An upstream disabled for want of its key opens no connection: its proxy
    credentials are not required either."""
    data = {"upstreams": [upstream(api_key_env="KEY", proxy_authorization_env="PX")]}
    assert parse(data).enabled_upstreams == ()


def test_proxy_credentials_are_never_read_from_the_file():
    """`proxy_authorization` in the file is refused, as `api_key` is."""
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [upstream(proxy_authorization=f"gw:{PASSWORD}")]})
    assert "never read from the file" in str(caught.value)
    assert PASSWORD not in str(caught.value)
