"""Upstreams reached through an HTTP forward proxy, through the real gRPC server: an
http upstream's requests in absolute form, an https one's through a CONNECT tunnel.

The upstream is named `upstream.test`, which resolves nowhere: only the test proxy
(`tests/forward_proxy.py`), mapping it to the fake upstream's loopback port, can reach
it. A call answered by that name went through the proxy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from gateway_client.commands import check
from gateway_client.commands.check import check_upstream
from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.upstream.client import answers_http, probe_models
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config_data
from tests.fake_upstream import FakeUpstream
from tests.forward_proxy import ForwardProxy
from tests.integration.pki import https_server_context
from tests.integration.tenancy_helpers import rpc_error
from tests.integration.test_resilience import FAST_RESILIENCE, error_details
from tests.secret_capture import record_emitted, register_secret

NAME = "upstream.test"
# Distinctive, so that the session's secret grep (tests/test_zz_secret_grep.py) finds
# any leak of them anywhere the run emitted.
PROXY_PASSWORD = register_secret("FAKEPROXYPASS-3e7a9c1b5d")
ENV_PROXY_PASSWORD = register_secret("FAKEENVPROXYPASS-8b2d4f6a0c")
PROXY_BASIC = register_secret(
    base64.b64encode(f"gw:{PROXY_PASSWORD}".encode()).decode()
)  # what goes on the wire


@pytest_asyncio.fixture
async def proxy(upstream: FakeUpstream) -> AsyncIterator[ForwardProxy]:
    """A CONNECT proxy that maps `upstream.test` to the fake upstream."""
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", upstream.port)}) as running:
        yield running


def through(upstream: FakeUpstream, scheme: str = "http") -> str:
    """The fake upstream's base URL by the name only the proxy can reach."""
    return f"{scheme}://{NAME}:{upstream.port}/v1"


def config_data(*base_urls: str, **upstream_fields: Any) -> dict[str, Any]:
    """Upstreams up0, up1, ...; `upstream_fields` set on up0."""
    data = gateway_config_data(*base_urls, resilience=FAST_RESILIENCE)
    data["upstreams"][0].update(upstream_fields)
    return data


@pytest.mark.parametrize("source", ["proxy_url", "HTTP_PROXY", "http_proxy"])
async def test_an_http_upstream_behind_a_squid_like_proxy_is_called_in_absolute_form(
    source, upstream, start_gateway, monkeypatch, caplog
):
    """Behind a proxy that refuses CONNECT to any port but 443 (squid's default), an http
    upstream's unary and streamed calls go to the proxy in absolute form, with its
    credentials, over one connection reused; the upstream gets its own `Host`, its key in
    `Authorization` and no proxy credentials. Before, each call was refused (403 to
    CONNECT). The start logs which proxy the upstream uses, once."""
    hosts = {NAME: ("127.0.0.1", upstream.port)}
    async with ForwardProxy(hosts=hosts, connect_ports={443}) as proxy:
        environ = {"UP_KEY": "sk-up-key"}
        fields: dict[str, Any] = {"api_key_env": "UP_KEY"}
        if source == "proxy_url":
            fields.update(proxy_url=proxy.url, proxy_authorization_env="GW_PROXY_CREDS")
            environ["GW_PROXY_CREDS"] = f"gw:{PROXY_PASSWORD}"
        else:
            monkeypatch.setenv(source, f"http://gw:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")
            # The test's own gRPC channel to the gateway reads `http_proxy` too.
            monkeypatch.setenv("no_proxy", "127.0.0.1")
        data = config_data(through(upstream), **fields)
        with caplog.at_level(logging.DEBUG):
            gateway = await start_gateway(parse_config(data, source="<test>", environ=environ))
            reply = await gateway.stub.Complete(chat())
            deltas = [m async for m in gateway.stub.CompleteStream(chat_stream("again"))]
    assert reply.content == "Hello from fake"
    assert "".join(m.delta.content for m in deltas) == "Hello from fake"
    origin = f"{NAME}:{upstream.port}"
    assert [(r.method, r.target, r.host_header) for r in proxy.requests] == [
        ("POST", f"http://{origin}/v1/chat/completions", origin)
    ] * 2
    assert {r.proxy_authorization for r in proxy.requests} == {f"Basic {PROXY_BASIC}"}
    assert proxy.connections == 1  # one connection, reused
    for request in upstream.requests:
        assert request.headers["host"] == origin
        assert request.headers["authorization"] == "Bearer sk-up-key"
        assert "proxy-authorization" not in {h.lower() for h in request.headers}
    said = [r for r in caplog.records if r.getMessage() == "upstream.proxy"]
    assert [(r.upstream, r.proxy, r.source) for r in said] == [
        ("up0", f"127.0.0.1:{proxy.port}", source)
    ]
    assert PROXY_PASSWORD not in caplog.text + repr([r.__dict__ for r in caplog.records])
    assert PROXY_BASIC not in caplog.text + repr([r.__dict__ for r in caplog.records])


async def test_a_407_to_an_http_upstreams_request_is_the_proxys_refusal(
    upstream, proxy, start_gateway, caplog
):
    """A 407 answering a request in absolute form fails the attempt as a proxy refusing
    a tunnel does: retried, then `UNAVAILABLE` naming the upstream and the proxy's
    refusal, the fix logged once; never taken for the upstream's answer."""
    proxy.mode, proxy.status = "refuse", 407
    data = config_data(through(upstream), proxy_url=proxy.url)
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        error = await rpc_error(gateway.stub.Complete(chat(), timeout=20))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "its proxy refused the request (HTTP 407)" in error.details()
    metadata, reason, _ = error_details(error)
    assert (reason, metadata["upstream"], metadata["attempts"]) == (
        "UPSTREAM_UNAVAILABLE",
        "up0",
        "3",
    )
    assert upstream.requests == []
    assert [r.method for r in proxy.requests] == ["POST"] * 3
    said = [r for r in caplog.records if r.getMessage().startswith("upstream.proxy_")]
    assert [(r.getMessage(), r.http_status) for r in said] == [
        ("upstream.proxy_auth_rejected", 407)
    ]


@pytest.mark.parametrize(
    ("status", "marks"),
    [
        (403, b"X-Squid-Error: ERR_ACCESS_DENIED 0\r\n"),
        (403, b"Proxy-Status: test-proxy; error=destination_ip_prohibited\r\n"),
        (502, b'Proxy-Status: test-proxy; error=connection_refused; details="a, b; c"\r\n'),
        (
            504,
            b"Proxy-Status: origin-cdn; received-status=200\r\n"
            b"Proxy-Status: test-proxy; error=http_response_timeout\r\n",
        ),
    ],
    ids=["squid-403", "proxy-status-403", "proxy-status-502", "proxy-status-last-504"],
)
async def test_an_error_the_proxy_marks_as_its_own_is_its_refusal_not_the_upstreams(  # noqa: PLR0917
    status, marks, upstream, proxy, start_gateway, caplog
):
    """An error answer to an http upstream's request that the proxy marks as its own
    (squid's `X-Squid-Error`, a `Proxy-Status` whose last entry names an error) fails the
    attempt as the proxy's refusal of a tunnel does: `UPSTREAM_UNAVAILABLE` naming the
    proxy's refusal, `upstream.proxy_refused` logged once. Before, a 403 read as the
    upstream rejecting the gateway's key (`UPSTREAM_AUTH`), and a 502 as the upstream
    failing."""
    proxy.mode, proxy.status, proxy.refusal_headers = "refuse", status, marks
    data = config_data(through(upstream), proxy_url=proxy.url)
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        error = await rpc_error(gateway.stub.Complete(chat(), timeout=20))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert f"its proxy refused the request (HTTP {status})" in error.details()
    metadata, reason, _ = error_details(error)
    assert (reason, metadata["upstream"], metadata["attempts"]) == (
        "UPSTREAM_UNAVAILABLE",
        "up0",
        "3",
    )
    assert upstream.requests == []
    said = [r for r in caplog.records if r.getMessage().startswith("upstream.proxy_")]
    assert [(r.getMessage(), r.http_status, r.proxy) for r in said] == [
        ("upstream.proxy_refused", status, f"127.0.0.1:{proxy.port}")
    ]


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxys_retry_after_is_honoured_as_an_upstreams_own(
    scheme, status, upstream, proxy, start_gateway
):
    """A proxy refusing an http upstream's request (marked as its own) or an https one's
    tunnel with a `Retry-After` is waited for as an upstream's own 503 is: the caller's
    RetryInfo says its wait, and the next call is kept off the proxy until then. Before,
    the wait was dropped: RetryInfo said the backoff and the next call went to the proxy."""
    proxy.mode, proxy.status = "refuse", status
    proxy.refusal_headers = (
        b"Retry-After: 3\r\nProxy-Status: test-proxy; error=connection_limit_reached\r\n"
    )
    resilience = {**FAST_RESILIENCE, "attempts": 1, "max_limit_wait_s": 0.1}
    data = gateway_config_data(through(upstream, scheme), resilience=resilience)
    data["upstreams"][0]["proxy_url"] = proxy.url
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    refused = await rpc_error(gateway.stub.Complete(chat(), timeout=20))
    paused = await rpc_error(gateway.stub.Complete(chat("again"), timeout=20))
    assert refused.code() is grpc.StatusCode.UNAVAILABLE
    assert f"its proxy refused the {'request' if scheme == 'http' else 'tunnel'}" in (
        refused.details()
    )
    _, reason, retry_s = error_details(refused)
    assert (reason, retry_s) == ("UPSTREAM_UNAVAILABLE", pytest.approx(3.0))
    assert (paused.code(), error_details(paused)[1]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPSTREAM_LIMIT",
    )
    assert len(proxy.requests) == 1
    assert upstream.requests == []


async def test_proxy_authorization_is_sent_and_never_emitted(
    upstream, proxy, start_gateway, caplog
):
    """`proxy_authorization_env`'s `user:password` goes to the proxy as Basic credentials,
    and appears in no log, error or answer, whether the proxy accepts or refuses it."""
    data = config_data(
        through(upstream), proxy_url=proxy.url, proxy_authorization_env="GW_PROXY_CREDS"
    )
    environ = {"GW_PROXY_CREDS": f"gw:{PROXY_PASSWORD}"}
    with caplog.at_level(logging.DEBUG):
        gateway = await start_gateway(parse_config(data, source="<test>", environ=environ))
        record_emitted(await gateway.stub.Complete(chat()))
        proxy.mode = "refuse"  # a new gateway: a new connection (the first is reused)
        proxy.status = 407
        refused = await start_gateway(parse_config(config_data(
            through(upstream), proxy_url=proxy.url, proxy_authorization_env="GW_PROXY_CREDS"
        ), source="<test>", environ=environ))  # fmt: skip
        error = await rpc_error(refused.stub.Complete(chat("refused")))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert {r.proxy_authorization for r in proxy.requests} == {f"Basic {PROXY_BASIC}"}
    assert "proxy-authorization" not in {h.lower() for h in upstream.requests[0].headers}
    for text in (caplog.text, repr([r.__dict__ for r in caplog.records]), error.details()):
        assert PROXY_PASSWORD not in text
        assert PROXY_BASIC not in text


@contextlib.asynccontextmanager
async def _tls_upstream_behind_env_proxy(
    tmp_path: Any, monkeypatch: Any, *, trusted: bool
) -> AsyncIterator[tuple[FakeUpstream, ForwardProxy, dict[str, Any]]]:
    """An https upstream for `upstream.test` (its CA trusted, or left out of the trust
    store), reached through the proxy `HTTPS_PROXY` names with `user:password`; and the
    config data of a gateway calling it."""
    context, ca = https_server_context(tmp_path, NAME)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    async with FakeUpstream(models=(FAKE_MODEL,), ssl_context=context) as tls_upstream:
        hosts = {NAME: ("127.0.0.1", tls_upstream.port)}
        async with ForwardProxy(hosts=hosts) as env_proxy:
            monkeypatch.setenv("HTTPS_PROXY", f"http://gw:{ENV_PROXY_PASSWORD}@{env_proxy.url[7:]}")
            yield tls_upstream, env_proxy, config_data(through(tls_upstream, "https"))


async def test_an_https_upstream_through_https_proxy_is_verified_for_its_name(
    tmp_path, monkeypatch, start_gateway, caplog
):
    """`HTTPS_PROXY` from the environment takes an https upstream's calls: TLS runs end to
    end through the tunnel and checks the certificate for `upstream.test`. Credentials in
    the variable's URL reach the proxy and nothing else."""
    async with _tls_upstream_behind_env_proxy(tmp_path, monkeypatch, trusted=True) as (
        tls_upstream,
        env_proxy,
        data,
    ):
        with caplog.at_level(logging.DEBUG):
            gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
            reply = await gateway.stub.Complete(chat())
            deltas = [m async for m in gateway.stub.CompleteStream(chat_stream("s"))]
        assert reply.content == "Hello from fake"
        assert "".join(m.delta.content for m in deltas) == "Hello from fake"
        assert env_proxy.targets == [f"{NAME}:{tls_upstream.port}"]
        expected = base64.b64encode(f"gw:{ENV_PROXY_PASSWORD}".encode()).decode()
        assert env_proxy.requests[0].proxy_authorization == f"Basic {expected}"
        said = [r for r in caplog.records if r.getMessage() == "upstream.proxy"]
        assert [(r.upstream, r.source) for r in said] == [("up0", "HTTPS_PROXY")]
        assert ENV_PROXY_PASSWORD not in caplog.text
        assert ENV_PROXY_PASSWORD not in repr([r.__dict__ for r in caplog.records])


async def test_a_certificate_not_trusted_through_the_proxy_is_logged_without_credentials(
    tmp_path, monkeypatch, start_gateway, caplog
):
    """An https upstream whose certificate is not trusted, reached through a proxy whose
    URL carries `user:password`: the TLS library's reason is logged for the operator, and
    the password is nowhere in the logs or the caller's error."""
    async with _tls_upstream_behind_env_proxy(tmp_path, monkeypatch, trusted=False) as (
        _,
        _,
        data,
    ):
        with caplog.at_level(logging.DEBUG):
            gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
            error = await rpc_error(gateway.stub.Complete(chat()))
        record_emitted(error.details())
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "refused or could not be reached" in error.details()
    said = [r for r in caplog.records if r.getMessage() == "upstream.connect_failed"]
    assert [r.upstream for r in said] == ["up0"]
    assert "through the proxy" in said[0].cause
    assert "CERTIFICATE_VERIFY_FAILED" in said[0].cause
    for text in (caplog.text, repr([r.__dict__ for r in caplog.records]), error.details()):
        assert ENV_PROXY_PASSWORD not in text
        assert "gw:" not in text


@pytest.mark.parametrize("no_proxy", [NAME, ".test", "*", f"other.example, {NAME}:{{port}}"])
async def test_no_proxy_excludes_an_upstream_from_the_environments_proxy(
    no_proxy, upstream, proxy, monkeypatch, start_gateway
):
    """An upstream `NO_PROXY` names is connected to directly: the proxy sees nothing (and
    `upstream.test`, resolving nowhere, cannot be reached without it)."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=upstream.port))
    data = config_data(through(upstream))
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    error = await rpc_error(gateway.stub.Complete(chat()))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert proxy.requests == []
    monkeypatch.delenv("NO_PROXY")  # the same upstream, not excluded: through the proxy
    data = config_data(through(upstream))
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    assert (await gateway.stub.Complete(chat())).content == "Hello from fake"
    assert proxy.targets == [f"{through(upstream)}/chat/completions"]


@pytest.mark.parametrize(
    ("mode", "status", "event", "reason"),
    [
        ("refuse", 407, "upstream.proxy_auth_rejected", "UPSTREAM_UNAVAILABLE"),
        ("refuse", 502, "upstream.proxy_refused", "UPSTREAM_UNAVAILABLE"),
        ("refuse", 101, "upstream.proxy_refused", "UPSTREAM_UNAVAILABLE"),  # an upgrade
        ("drop", 0, "upstream.proxy_failed", "UPSTREAM_UNAVAILABLE"),
        ("garbage", 0, "upstream.proxy_failed", "UPSTREAM_UNAVAILABLE"),
        ("hang", 0, "upstream.proxy_failed", "UPSTREAM_TIMEOUT"),
    ],
)
async def test_a_failing_proxy_is_a_connect_failure_of_its_upstream(  # noqa: PLR0917
    mode, status, event, reason, upstream, proxy, start_gateway, caplog
):
    """A proxy that refuses an https upstream's tunnel, drops the connection, answers
    garbage or never answers (within `connect_timeout_s`) fails its upstream's attempts
    like a failed connect: retried, then `UNAVAILABLE` with the upstream named. One log
    line says what the proxy did, with its status; a 407 says the operator must fix the
    credentials."""
    proxy.mode = mode
    proxy.status = status
    data = config_data(through(upstream, "https"), proxy_url=proxy.url, connect_timeout_s=0.3)
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        error = await rpc_error(gateway.stub.Complete(chat(), timeout=20))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    metadata, got_reason, _ = error_details(error)
    assert (got_reason, metadata["upstream"], metadata["attempts"]) == (reason, "up0", "3")
    assert "through its proxy" in error.details() or "its proxy" in error.details()
    assert upstream.requests == []
    assert len(proxy.requests) == 3
    said = [r for r in caplog.records if r.getMessage().startswith("upstream.proxy_")]
    assert [(r.getMessage(), r.upstream, r.proxy) for r in said] == [
        (event, "up0", f"127.0.0.1:{proxy.port}")
    ]  # once, not once an attempt
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    if status:
        assert said[0].http_status == status
        assert f"HTTP {status}" in error.details()
    if status == 407:
        assert said[0].levelno == logging.ERROR
        assert "proxy_authorization_env" in said[0].fix


@pytest.mark.parametrize(
    ("interim", "established"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: b\r\n\r\n", None),
        (b"HTTP/1.1 100 Continue\n\n", b"HTTP/1.1 200 Connection established\nProxy-Agent: t\n\n"),
    ],
    ids=["interim-heads", "bare-lf-lines"],
)
async def test_an_answer_to_connect_a_client_may_read_opens_the_tunnel(
    interim, established, tmp_path, monkeypatch, start_gateway
):
    """1xx heads before the proxy's 200 (RFC 9110 §15.2: a client reads and drops them),
    and lines ending in LF alone (RFC 9112 §2.2: a client MAY read them), open the tunnel:
    the call is answered through it, not refused, nor waited on until the connect
    timeout as a hang."""
    async with _tls_upstream_behind_env_proxy(tmp_path, monkeypatch, trusted=True) as (
        tls_upstream,
        env_proxy,
        data,
    ):
        env_proxy.interim = interim
        if established is not None:
            env_proxy.established = established
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        reply = await gateway.stub.Complete(chat())
        assert (reply.content, reply.metadata.attempts) == ("Hello from fake", 1)
        assert env_proxy.targets == [f"{NAME}:{tls_upstream.port}"]


@pytest.mark.parametrize("name", ["\u4f8b\u3048.test", "b\u00fccher.test"])
async def test_an_internationalised_host_goes_through_the_proxy_in_its_idna_form(
    name, upstream, start_gateway
):
    """The request line and `Host` name an upstream's internationalised host by its IDNA
    (`xn--`) form, as curl does: a request line or header is ASCII."""
    idna = name.encode("idna").decode("ascii")
    async with ForwardProxy(hosts={idna: ("127.0.0.1", upstream.port)}) as proxy:
        data = config_data(f"http://{name}:{upstream.port}/v1", proxy_url=proxy.url)
        gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
        reply = await gateway.stub.Complete(chat())
        assert reply.content == "Hello from fake"
        assert proxy.targets == [f"http://{idna}:{upstream.port}/v1/chat/completions"]
        assert proxy.requests[0].host_header == f"{idna}:{upstream.port}"
        assert upstream.requests[0].headers["host"] == f"{idna}:{upstream.port}"


@pytest.mark.parametrize("status", [407, 502])
async def test_a_refusing_proxy_fails_over_to_the_next_upstream(
    status, upstream, proxy, start_gateway
):
    """A call whose first upstream's proxy refuses is served by the next upstream."""
    proxy.mode = "refuse"
    proxy.status = status
    data = config_data(through(upstream), upstream.base_url, proxy_url=proxy.url)
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    replies = [await gateway.stub.Complete(chat(f"call {i}")) for i in range(2)]
    assert {r.metadata.upstream for r in replies} == {"up1"}
    assert len(upstream.requests) == 2
    assert len(proxy.requests) >= 1


async def test_a_hanging_proxy_fails_over_within_the_connect_timeout(
    upstream, proxy, start_gateway
):
    """A proxy that never answers an https upstream's CONNECT costs one
    `connect_timeout_s`, then the call moves on to the next upstream: not the upstream's
    `timeout_s`, here past the call's deadline."""
    proxy.mode = "hang"
    data = config_data(
        through(upstream, "https"),
        upstream.base_url,
        proxy_url=proxy.url,
        connect_timeout_s=0.3,
        timeout_s=60,
    )
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    reply = await gateway.stub.Complete(chat(), timeout=20)
    assert (reply.metadata.upstream, reply.metadata.attempts) == ("up1", 2)


async def test_health_probes_go_through_the_upstreams_proxy(
    upstream, proxy, monkeypatch, every_logger_at_debug
):
    """`probe_models`, `answers_http` and `llm-gateway check` reach the upstream through
    its proxy, `proxy_url` or the environment's; a refusal is a failed check that says
    so without the credentials."""
    data = config_data(
        through(upstream), proxy_url=proxy.url, proxy_authorization_env="GW_PROXY_CREDS"
    )
    environ = {"GW_PROXY_CREDS": f"gw:{PROXY_PASSWORD}"}
    config = parse_config(data, source="<test>", environ=environ).upstreams[0]
    assert await probe_models(config, timeout_s=5) == (200, [FAKE_MODEL])
    assert await answers_http(config, timeout_s=5) is True
    assert (await check_upstream(config, timeout_s=5)).is_ok
    assert len(proxy.requests) == 3
    assert {r.proxy_authorization for r in proxy.requests} == {f"Basic {PROXY_BASIC}"}
    proxy.mode = "refuse"
    check = await check_upstream(config, timeout_s=5)
    assert (check.is_reachable, check.problem) == (
        False,
        "upstream 'up0' could not be reached: its proxy refused the request (HTTP 407)",
    )
    assert await answers_http(config, timeout_s=5) is False
    proxy.mode = "tunnel"
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # from the environment, as the calls
    plain = parse_config(config_data(through(upstream)), source="<test>", environ={})
    assert await probe_models(plain.upstreams[0], timeout_s=5) == (200, [FAKE_MODEL])
    assert len(proxy.requests) == 6


async def test_an_unusable_environment_proxy_refuses_the_start(upstream, monkeypatch):
    """An `HTTPS_PROXY` the gateway cannot use (a SOCKS one here) stops the start with a
    config error naming the variable, never its value, rather than going around it."""
    from service.config import ConfigError
    from service.server import GatewayServer

    monkeypatch.setenv("HTTPS_PROXY", f"socks5://gw:{ENV_PROXY_PASSWORD}@127.0.0.1:1080")
    data = config_data(through(upstream, "https"))
    with pytest.raises(ConfigError) as caught:
        async with GatewayServer(parse_config(data, source="<test>", environ={})):
            pass
    assert caught.value.key == "HTTPS_PROXY"
    assert ENV_PROXY_PASSWORD not in str(caught.value)


async def test_check_refuses_an_unusable_environment_proxy_as_serve_does(
    tmp_path, monkeypatch, capsys
):
    """`llm-gateway check` exits 2 on an `HTTPS_PROXY` `serve` would refuse, naming the
    variable and never its value."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "upstreams: [{name: up0, base_url: 'https://api.example.com/v1', models: [m]}]\n"
        "local_model: {enabled: never}\n"
    )
    monkeypatch.setenv("HTTPS_PROXY", f"https://gw:{ENV_PROXY_PASSWORD}@proxy.corp:3128")
    parser = argparse.ArgumentParser()
    check.register(parser.add_subparsers())
    code = await check.check_command(parser.parse_args(["check", "--config", str(config)]))
    captured = capsys.readouterr()
    assert code == 2
    assert (
        "config error: environment: HTTPS_PROXY: its URL must be http://HOST:PORT: TLS to the proxy"
        in captured.err
    )
    assert ENV_PROXY_PASSWORD not in captured.out + captured.err


__all__ = ["pb"]
