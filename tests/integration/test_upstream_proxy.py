"""The upstream HTTP pool through a real forward proxy (`tests/forward_proxy.py`): an
http upstream's requests in absolute form, an https one's through a CONNECT tunnel.

The upstream is named `upstream.test`, which resolves nowhere: only the proxy, mapping it
to a loopback port, can reach it, so a call that got an answer went through the proxy.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from service.upstream.http import (
    ConnectFailed,
    HttpError,
    HttpPool,
    ProxyFailed,
    ProxyRefused,
    ProxyTimeout,
)
from service.upstream.proxy import Proxy, basic_authorization
from tests.forward_proxy import ForwardProxy
from tests.integration.pki import https_server_context
from tests.integration.test_upstream_http import answer_forever, read_request

NAME = "upstream.test"


def via(proxy: ForwardProxy, *, authorization: str | None = None) -> Proxy:
    return Proxy("127.0.0.1", proxy.port, source="proxy_url", authorization=authorization)


async def _echo_server(context: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(answer_forever, "127.0.0.1", 0, ssl=context)
    return server, int(server.sockets[0].getsockname()[1])


# As squid's default `http_access deny CONNECT !SSL_ports`: no CONNECT but to 443.
SQUID_PORTS = frozenset({443})


async def test_an_http_upstream_is_reached_in_absolute_form_over_one_reused_connection() -> None:
    """Behind a proxy that refuses CONNECT to any port but 443, as squid does, an http
    upstream's requests go to the proxy in absolute form, with the upstream's `Host`, one
    connection to the proxy reused; no CONNECT is sent."""
    server, port = await _echo_server()
    hosts = {NAME: ("127.0.0.1", port)}
    async with ForwardProxy(hosts=hosts, connect_ports=SQUID_PORTS) as proxy:
        pool = HttpPool(
            f"http://{NAME}:{port}/v1?v=1", max_connections=2, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            for body in (b"one", b"two"):
                async with await pool.request("POST", "/chat", {}, body) as response:
                    assert response.status == 200
                    assert await response.read() == body
            assert [(r.method, r.target, r.host_header) for r in proxy.requests] == [
                ("POST", f"http://{NAME}:{port}/v1/chat?v=1", f"{NAME}:{port}")
            ] * 2
            assert proxy.requests[0].proxy_authorization is None
            assert (proxy.connections, pool.open_connections) == (1, 1)
        finally:
            await pool.aclose()
    server.close()
    await server.wait_closed()


async def test_an_http_upstream_on_the_default_port_is_named_without_it() -> None:
    """The absolute form names the origin as `Host` does: no `:80`."""
    async with ForwardProxy(mode="refuse", status=502) as proxy:
        pool = HttpPool(
            f"http://{NAME}/v1", max_connections=1, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            async with await pool.request("GET", "/models", {}) as response:
                assert response.status == 502
        finally:
            await pool.aclose()
    assert [(r.target, r.host_header) for r in proxy.requests] == [
        (f"http://{NAME}/v1/models", NAME)
    ]


async def test_the_proxy_authorization_goes_to_the_proxy_alone() -> None:
    """`Proxy-Authorization` goes to the proxy with the request in absolute form; the
    request the upstream gets has none."""
    seen: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        finally:  # else open until the proxy's reset, which the test's loop may not see
            writer.close()

    server = await asyncio.start_server(recording, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    authorization = basic_authorization("gw:proxy-pass")
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", port)}, connect_ports=SQUID_PORTS) as proxy:
        pool = HttpPool(
            f"http://{NAME}:{port}/v1",
            max_connections=1,
            connect_timeout_s=5,
            proxy=via(proxy, authorization=authorization),
        )
        try:
            async with await pool.request("GET", "/models", {}) as response:
                assert await response.read() == b"ok"
        finally:
            await pool.aclose()
        assert [r.proxy_authorization for r in proxy.requests] == [authorization]
    assert b"proxy-authorization" not in seen[0].lower()
    server.close()
    await server.wait_closed()


async def test_a_407_to_a_request_in_absolute_form_is_the_proxys_refusal() -> None:
    """A 407 answering a request in absolute form is the proxy refusing it, as it would
    refuse a tunnel: `ProxyRefused` with its status, never an upstream's answer; the
    connection, its answer read whole, is reused for the next request."""
    async with ForwardProxy(mode="refuse", status=407) as proxy:
        pool = HttpPool(
            f"http://{NAME}:8000/v1", max_connections=1, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            with pytest.raises(ProxyRefused) as caught:
                await pool.request("POST", "/chat", {}, b"x")
            assert (caught.value.status, caught.value.problem) == (
                407,
                "refused the request (HTTP 407)",
            )
            with pytest.raises(ProxyRefused):
                await pool.request("POST", "/chat", {}, b"y")
            assert (proxy.connections, len(proxy.requests), pool.checked_out) == (1, 2, 0)
        finally:
            await pool.aclose()


async def test_only_an_error_the_proxy_marks_as_its_own_is_its_refusal() -> None:
    """In absolute form, an error answer the proxy marks as its own (a `Proxy-Status`
    whose last entry names an error) is `ProxyRefused` with its status. The upstream's
    own error, relayed by a proxy that marks what it relays (`Via`, an entry of its own
    after a farther intermediary's error), is the upstream's answer."""

    async def forbidden(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(forbidden, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", port)}, mode="refuse", status=403) as proxy:
        proxy.refusal_headers = b"Proxy-Status: test-proxy; error=destination_ip_prohibited\r\n"
        proxy.relay_headers = (
            b"Via: 1.1 test-proxy\r\nProxy-Status: cdn; error=http_protocol_error\r\n"
            b'Proxy-Status: test-proxy; details="a, b; error"; received-status=403\r\n'
        )
        pool = HttpPool(
            f"http://{NAME}:{port}/v1", max_connections=1, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            with pytest.raises(ProxyRefused) as caught:
                await pool.request("POST", "/chat", {}, b"x")
            assert (caught.value.status, caught.value.problem) == (
                403,
                "refused the request (HTTP 403)",
            )
            proxy.mode = "tunnel"
            async with await pool.request("POST", "/chat", {}, b"y") as response:
                assert (response.status, await response.read()) == (403, b"{}")
        finally:
            await pool.aclose()
    server.close()
    await server.wait_closed()


async def test_a_proxy_connection_cut_mid_body_is_not_reused_and_one_after_an_error_is():
    """A proxy that closes mid-body fails that answer and its connection is not reused;
    an error the proxy answers in full (502, keep-alive) leaves the connection for the
    next request, whose answer is framed right."""
    server, port = await _echo_server()
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", port)}, cut_after=45) as proxy:
        pool = HttpPool(
            f"http://{NAME}:{port}/v1", max_connections=1, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            response = await pool.request("POST", "/", {}, b"x" * 100)
            with pytest.raises(HttpError, match="mid-response"):
                await response.read()
            response.release()
            assert pool.open_connections == 0
            proxy.cut_after = None
            proxy.mode, proxy.status = "refuse", 502
            async with await pool.request("POST", "/", {}, b"one") as response:
                assert (response.status, await response.read()) == (502, b"<html>refused</html>")
            proxy.mode = "tunnel"
            async with await pool.request("POST", "/", {}, b"two") as response:
                assert (response.status, await response.read()) == (200, b"two")
            assert proxy.connections == 2  # the cut one, then one for the 502 and after
        finally:
            await pool.aclose()
    server.close()
    await server.wait_closed()


async def https_through_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, certified_name: str
) -> None:
    """Calls to an https upstream through the tunnel, its certificate made for
    `certified_name`: TLS runs end to end with the upstream, checked for `upstream.test`."""
    context, ca = https_server_context(tmp_path, certified_name)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the default trust store, as OpenSSL reads it
    server, port = await _echo_server(context)
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", port)}) as proxy:
        pool = HttpPool(
            f"https://{NAME}:{port}/v1", max_connections=2, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            if certified_name != NAME:
                with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                    await pool.request("POST", "/", {}, b"secret")
                assert pool.open_connections == 0
                return
            for body in (b"over", b"tls"):
                async with await pool.request("POST", "/", {}, body) as response:
                    assert await response.read() == body
            assert pool.open_connections == 1
            assert proxy.targets == [f"{NAME}:{port}"]
        finally:
            await pool.aclose()
            server.close()
            await server.wait_closed()


async def test_an_https_upstream_is_verified_for_its_name_through_the_tunnel(tmp_path, monkeypatch):
    """TLS over the tunnel checks the upstream's certificate for its own host name."""
    await https_through_tunnel(tmp_path, monkeypatch, certified_name=NAME)


async def test_an_https_upstream_certified_for_another_name_is_refused(tmp_path, monkeypatch):
    """A certificate for another name fails the connect through the tunnel too."""
    await https_through_tunnel(tmp_path, monkeypatch, certified_name="other.test")


async def refused(mode: str, status: int = 407, **options: bytes) -> BaseException:
    """What a request to an https upstream fails with through a proxy in `mode`
    (`options`: the proxy's others), which fails it at CONNECT, before any TLS; nothing
    is left open."""
    server, port = await _echo_server()
    hosts = {NAME: ("127.0.0.1", port)}
    async with ForwardProxy(hosts, mode=mode, status=status, **options) as proxy:  # type: ignore[arg-type]
        pool = HttpPool(
            f"https://{NAME}:{port}/v1", max_connections=1, connect_timeout_s=0.5, proxy=via(proxy)
        )
        try:
            with pytest.raises(ConnectFailed) as caught:
                await pool.request("GET", "/models", {})
            assert pool.open_connections == 0
            # The slot was given back: a second try fails the same way, not by waiting.
            with pytest.raises(type(caught.value)):
                await pool.request("GET", "/models", {})
        finally:
            await pool.aclose()
        assert proxy.targets == [f"{NAME}:{port}"] * 2
    server.close()
    await server.wait_closed()
    return caught.value


@pytest.mark.parametrize("status", [403, 407, 502, 503])
async def test_a_refusal_is_a_connect_failure_with_the_proxys_status(status):
    """A non-2xx answer to CONNECT is `ProxyRefused` carrying its status and the proxy's
    address, never a credential."""
    error = await refused("refuse", status)
    assert isinstance(error, ProxyRefused)
    assert error.status == status
    assert f"HTTP {status}" in str(error)


@pytest.mark.parametrize(
    ("mode", "problem"),
    [("drop", "closed the connection"), ("garbage", "malformed HTTP")],
)
async def test_a_proxy_that_drops_or_answers_garbage_fails_the_connect(mode, problem):
    """A proxy that closes without answering, or answers what is not HTTP, fails the
    connect as `ProxyFailed`."""
    error = await refused(mode)
    assert type(error) is ProxyFailed
    assert problem in error.problem


@pytest.mark.parametrize(
    "established",
    [
        b"HTTP/1.1 200 OK\n\n",
        b"HTTP/1.1 200 OK\nProxy-Agent: t\n\n",
        b"HTTP/1.1 200 OK\r\nProxy-Agent: t\n\r\n",
        b"HTTP/1.1 200 OK\nProxy-Agent: t\r\n\n",
    ],
    ids=["lf", "lf-header", "crlf-then-lf", "crlf-header-lf-end"],
)
async def test_an_answer_with_bare_lf_line_ends_opens_the_tunnel(
    established, tmp_path, monkeypatch
):
    """The head's end is its first empty line, each line ending in CRLF or LF alone."""
    context, ca = https_server_context(tmp_path, NAME)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    server, port = await _echo_server(context)
    async with ForwardProxy(hosts={NAME: ("127.0.0.1", port)}, established=established) as proxy:
        pool = HttpPool(
            f"https://{NAME}:{port}/v1", max_connections=1, connect_timeout_s=5, proxy=via(proxy)
        )
        try:
            async with await pool.request("POST", "/chat", {}, b"through") as response:
                assert await response.read() == b"through"
        finally:
            await pool.aclose()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    "established",
    [b"HTTP/1.1 200 OK\n\nHTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\n\n\n"],
    ids=["a-second-head", "a-blank-line"],
)
async def test_bytes_after_a_bare_lf_answers_end_are_no_part_of_it(established):
    """What follows the first empty line is not the answer's: sent before the tunnel
    is used, it fails the connect as bytes nobody asked for."""
    error = await refused("tunnel", established=established)
    assert type(error) is ProxyFailed
    assert "did not ask for" in error.problem


async def test_a_proxy_that_never_answers_times_out_at_the_connect_timeout():
    """A proxy that takes the CONNECT and never answers is a connect timeout."""
    error = await refused("hang")
    assert isinstance(error, ProxyTimeout)
    assert isinstance(error, TimeoutError)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_an_unreachable_proxy_is_a_proxy_failure(scheme):
    """Nothing listening at the proxy's address: `ProxyFailed`, naming the proxy, in
    absolute form as through a tunnel."""
    pool = HttpPool(
        f"{scheme}://upstream.test/v1",
        max_connections=1,
        connect_timeout_s=2,
        proxy=Proxy("127.0.0.1", 1, source="proxy_url"),
    )
    with pytest.raises(ProxyFailed, match=r"127\.0\.0\.1:1 cannot be reached"):
        await pool.request("GET", "/models", {})
    await pool.aclose()


async def test_an_overlong_answer_to_connect_is_refused_not_buffered():
    """A proxy whose answer's head never ends fails once past the bound."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            await writer.drain()
        await asyncio.sleep(5)

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(
        "https://upstream.test/v1",
        max_connections=1,
        connect_timeout_s=5,
        proxy=Proxy("127.0.0.1", port, source="proxy_url"),
    )
    with pytest.raises(ProxyFailed, match="too long"):
        await pool.request("GET", "/models", {})
    await pool.aclose()
    server.close()
    await server.wait_closed()


# The gateway serves on uvloop, whose transports and TLS differ from asyncio's.
def _on_uvloop(case: Callable[[], Awaitable[object]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(case())  # type: ignore[arg-type]


def test_tunnels_on_uvloop() -> None:
    """The absolute form, a refusal and a hang on the loop the gateway serves on."""
    _on_uvloop(test_an_http_upstream_is_reached_in_absolute_form_over_one_reused_connection)
    _on_uvloop(lambda: test_a_refusal_is_a_connect_failure_with_the_proxys_status(407))
    _on_uvloop(test_a_proxy_that_never_answers_times_out_at_the_connect_timeout)
    _on_uvloop(lambda: test_a_proxy_that_drops_or_answers_garbage_fails_the_connect(
        "garbage", "malformed HTTP"))  # fmt: skip


@pytest.mark.parametrize("certified_name", [NAME, "other.test"])
def test_https_through_the_tunnel_on_uvloop(certified_name, tmp_path, monkeypatch) -> None:
    """TLS over the tunnel through uvloop's own `start_tls`."""
    _on_uvloop(lambda: https_through_tunnel(tmp_path, monkeypatch, certified_name=certified_name))
