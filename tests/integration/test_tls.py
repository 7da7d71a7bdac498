"""TLS and mutual TLS on the gRPC port, with certificates made by openssl."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_client import GatewayClient, tls_credentials
from gateway_client.cli import main as cli_main
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.config import ConfigError, load_config, parse_config
from service.hosts import ListenError
from service.server import GatewayServer
from tests.conftest import chat, gateway_config, gateway_config_data
from tests.integration.pki import Pki, issue, make_pki
from tests.integration.tenancy_helpers import as_tenant, bearer, detail, rpc_error, secure_config

_TIMEOUT_S = 20.0
_REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, two clients and an untrusted one."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **extra}


def _mtls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return _tls(pki, client_ca_file=str(pki.ca), require_client_cert=True, **extra)


@pytest_asyncio.fixture
async def tls_server() -> AsyncIterator[Any]:
    """Starts gateways with a config; each is stopped at teardown."""
    servers: list[GatewayServer] = []

    async def start(config: Any) -> GatewayServer:
        server = GatewayServer(config)
        await server.__aenter__()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.stop(grace_s=0)


def _channel(
    server: GatewayServer, pki: Pki, client: tuple[Path, Path] | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(server.address, credentials)


async def test_tls_serves_a_client_that_trusts_the_ca(upstream, tls_server, pki):
    """With TLS on, a client verifying the server against the CA is served."""
    server = await tls_server(
        gateway_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": _tls(pki)})
    )
    async with _channel(server, pki) as channel:
        response = await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=_TIMEOUT_S)
    assert response.content == "Hello from fake"


async def test_tls_port_refuses_plaintext(upstream, tls_server, pki):
    """A plaintext client cannot talk to the TLS port; nothing reaches the upstream."""
    server = await tls_server(
        gateway_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": _tls(pki)})
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        error = await rpc_error(
            pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=_TIMEOUT_S)
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert upstream.requests == []


async def test_health_listen_answers_probes_in_plaintext_and_serves_nothing_else(
    upstream, tls_server, pki
):
    """With mTLS on the gateway's port, `server.health_listen` answers plaintext health
    checks (Kubernetes' native gRPC probes speak no TLS): SERVING, then NOT_SERVING once the
    gateway is stopping. The gateway's own service is not served there."""
    server = await tls_server(
        gateway_config(
            upstream.base_url,
            server={"listen": "127.0.0.1:0", "tls": _mtls(pki), "health_listen": "127.0.0.1:0"},
        )
    )
    assert server.health_port not in (0, server.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "llmgateway.v1.CompletionService"):
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=_TIMEOUT_S
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        error = await rpc_error(
            pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=_TIMEOUT_S)
        )
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED
        await server.health.enter_graceful_shutdown()  # as `stop` begins
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=_TIMEOUT_S)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert upstream.requests == []


async def test_health_listen_is_closed_with_the_gateway(upstream, pki):
    """Stopping the gateway closes its health port too: nothing answers there after."""
    config = gateway_config(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": _tls(pki), "health_listen": "127.0.0.1:0"},
    )
    async with GatewayServer(config) as server:
        port = server.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        error = await rpc_error(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("taken", ["listen", "health_listen"])
async def test_a_start_failing_on_one_port_leaves_the_other_free(upstream, taken):
    """A start failing with ListenError on a taken port, the gateway's or its health
    port, lets go of the other one, bound just before: a second start on it succeeds
    (it stayed bound for the life of the process).

    The other port, probed free, may be bound by another test process before either
    start binds it: the test then tries again on another (with the bug, every try fails).
    """
    for _ in range(3):
        if await _fails_then_starts_on_the_other_port(upstream, taken, _free_port()):
            return
    raise AssertionError("the port the failed start had bound stayed taken")


# A start failing on a taken port, in a process whose logging keeps its DEBUG records (as
# pytest's capture does), then a collection and the records dropped.
_FAILED_START_COLLECTED = """
import asyncio, gc, logging, socket, sys

from service.hosts import ListenError
from service.server import GatewayServer
from tests.conftest import gateway_config

kept = []


class Keep(logging.Handler):
    def emit(self, record):
        kept.append(record)


logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.DEBUG)


async def start(server):
    try:
        async with GatewayServer(gateway_config(sys.argv[1], server=server)):
            pass
    except ListenError:
        print("refused")


with socket.socket() as holder:
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    held = f"127.0.0.1:{holder.getsockname()[1]}"
    taken = {sys.argv[2]: held}
    asyncio.run(start({"listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0", **taken}))
gc.collect()
kept.clear()
print("collected")
"""


@pytest.mark.parametrize("taken", ["listen", "health_listen"])
async def test_a_failed_starts_grpc_servers_are_let_go_before_they_are_collected(upstream, taken):
    """grpc collecting a server never started logs the dying server itself at DEBUG; a
    record kept after (pytest's capture) freed it again later: a test process segfaulted
    in the teardown of whatever test ran next. A failed start starts and stops them."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FAILED_START_COLLECTED,
        upstream.base_url,
        taken,
        cwd=_REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert (process.returncode, output.decode().split()) == (0, ["refused", "collected"]), (
        errors.decode()[-2000:]
    )


async def _fails_then_starts_on_the_other_port(upstream, taken: str, free: int) -> bool:
    """A start with `taken` held and the other port at `free` fails naming the held
    one; a start on `free` then succeeds. False where a start found `free` taken."""
    other = "health_listen" if taken == "listen" else "listen"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = f"127.0.0.1:{holder.getsockname()[1]}"
        server = {taken: held, other: f"127.0.0.1:{free}"}
        with pytest.raises(ListenError) as refused:
            async with GatewayServer(gateway_config(upstream.base_url, server=server)):
                pass
    if _names_port(refused.value, free):
        return False
    assert f"cannot listen on {held}" in str(refused.value)
    again = {"listen": f"127.0.0.1:{free}", "health_listen": "127.0.0.1:0"}
    if other == "health_listen":
        again = {"listen": "127.0.0.1:0", "health_listen": f"127.0.0.1:{free}"}
    try:
        async with GatewayServer(gateway_config(upstream.base_url, server=again)) as started:
            assert free in (started.port, started.health_port)
    except ListenError as error:
        if _names_port(error, free):
            return False
        raise
    return True


def _names_port(error: ListenError, port: int) -> bool:
    return re.search(rf"cannot listen on 127\.0\.0\.1:{port}\b", str(error)) is not None


def _dockerfile_healthcheck() -> list[str]:
    """The image's HEALTHCHECK command, run with this interpreter."""
    text = (_REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    (command,) = re.findall(r"^HEALTHCHECK .*?\\\n\s*CMD (\[.*\])$", text, flags=re.MULTILINE)
    program, *arguments = json.loads(command)
    assert program == "python"
    return [sys.executable, *arguments]


async def _exit_status(command: list[str], **environment: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, **environment},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), _TIMEOUT_S)


async def test_the_images_healthcheck_passes_on_the_health_port_of_a_tls_gateway(
    upstream, tls_server, pki
):
    """The Dockerfile's HEALTHCHECK, pointed at `server.health_listen` by
    LLM_GATEWAY_HEALTHCHECK_ADDRESS, passes for a gateway serving mTLS; pointed at the TLS
    port it fails, as it did for every TLS gateway before."""
    server = await tls_server(
        gateway_config(
            upstream.base_url,
            server={"listen": "127.0.0.1:0", "tls": _mtls(pki), "health_listen": "127.0.0.1:0"},
        )
    )
    healthcheck = _dockerfile_healthcheck()
    health_port = f"127.0.0.1:{server.health_port}"
    assert await _exit_status(healthcheck, LLM_GATEWAY_HEALTHCHECK_ADDRESS=health_port) == 0
    assert await _exit_status(healthcheck, LLM_GATEWAY_HEALTHCHECK_ADDRESS=server.address) != 0


@pytest.mark.parametrize("variable", ["https_proxy", "http_proxy"])
async def test_the_images_healthcheck_passes_with_an_egress_proxy_in_the_environment(
    gateway, variable
):
    """The Dockerfile's HEALTHCHECK calls the gateway in its own container directly, not
    through the proxy an operator sets for upstream egress (gRPC would tunnel a loopback
    call through it, and the proxy cannot reach the container's loopback)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead_proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        status = await _exit_status(
            _dockerfile_healthcheck(),
            LLM_GATEWAY_HEALTHCHECK_ADDRESS=gateway.server.address,
            **{variable: dead_proxy},
        )
    assert status == 0


def _readme_tls_example() -> tuple[str, str]:
    """The README's worked TLS example: its shell steps and its server config."""
    text = (_REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### TLS and mTLS: a worked example") :]
    shell, config = re.findall(r"```(?:sh|yaml)\n(.*?)```", section, flags=re.DOTALL)[:2]
    return shell, config


async def test_the_readmes_tls_example_loads_where_its_steps_leave_the_shell(tmp_path, monkeypatch):
    """The README's openssl steps, run as written in one shell, leave it where the
    config's `pki/...` paths name the files they made, so the config loads there."""
    shell, config = _readme_tls_example()
    steps = await asyncio.create_subprocess_exec(
        "bash",
        "-ec",
        f"{shell}\npwd",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    output, _ = await asyncio.wait_for(steps.communicate(), _TIMEOUT_S)
    assert steps.returncode == 0
    monkeypatch.chdir(output.decode().splitlines()[-1])
    Path("gateway.yaml").write_text(config, encoding="utf-8")
    loaded = load_config("gateway.yaml")
    assert loaded.server.tls.tenant_from_cert_subject


async def _serving_cert_tenants(upstream: Any, tls_server: Any, pki: Any, **sections: Any) -> Any:
    """A gateway over mutual TLS whose callers are the tenants their certificates name."""
    config = secure_config(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": _mtls(pki, tenant_from_cert_subject=True)},
        **sections,
    )
    return await tls_server(config)


async def test_mtls_names_the_tenant_from_a_valid_client_certificate(upstream, tls_server, pki):
    """A certificate signed by the CA is accepted and its CN is the tenant, without a key."""
    config = secure_config(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": _mtls(pki, tenant_from_cert_subject=True)},
        tenants={
            "team-a": {"allowed_models": ["fake-model"]},
            "team-b": {"allowed_models": ["other"]},
        },
    )
    server = await tls_server(config)
    async with _channel(server, pki, pki.client_a) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        assert (await stub.Complete(chat(), timeout=_TIMEOUT_S)).content == "Hello from fake"
    async with _channel(server, pki, pki.client_b) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        # team-b's certificate makes the call team-b's, whose tenant may not use the model.
        denied = await rpc_error(stub.Complete(chat(), timeout=_TIMEOUT_S))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "team-b" in (denied.details() or "")
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=_TIMEOUT_S)
        assert list(listed.models) == []
    assert len(upstream.requests) == 1


async def test_the_cli_calls_a_mtls_gateway_with_its_certificate(upstream, tls_server, pki, capsys):
    """`llm-gateway complete` with `--ca-file`, `--cert-file` and `--key-file` is served
    as the certificate's tenant; without the client certificate the handshake fails."""
    server = await _serving_cert_tenants(
        upstream, tls_server, pki, tenants={"team-a": {"allowed_models": ["fake-model"]}}
    )
    cert, key = pki.client_a
    base = ["complete", "--address", server.address, "--model", "fake-model", "hi"]
    served = await asyncio.to_thread(
        cli_main,
        [*base, "--ca-file", str(pki.ca), "--cert-file", str(cert), "--key-file", str(key)],
    )
    assert served == 0
    assert "Hello from fake" in capsys.readouterr().out
    refused = await asyncio.to_thread(cli_main, [*base, "--ca-file", str(pki.ca)])
    assert refused == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        await asyncio.to_thread(cli_main, [*base, "--cert-file", str(cert)])
    assert caught.value.code == 2
    assert "go together" in capsys.readouterr().err
    assert len(upstream.requests) == 1


async def test_pems_given_as_text_connect_as_their_bytes(upstream, tls_server, pki):
    """`tls_credentials` given each PEM as a str (read with `read_text`) is served over
    mutual TLS as the certificate's tenant, as with bytes. Before, a str failed inside
    the checks with a TypeError naming no argument."""
    server = await _serving_cert_tenants(upstream, tls_server, pki)
    cert, key = pki.client_a
    credentials = tls_credentials(
        root_certificates=pki.ca.read_text(),
        certificate_chain=cert.read_text(),
        private_key=key.read_text(),
    )
    async with GatewayClient(server.address, credentials=credentials) as client:
        answer = await client.complete("Say hi", model="fake-model", timeout_s=_TIMEOUT_S)
    assert answer.content == "Hello from fake"


@pytest.mark.parametrize(
    "wrong",
    [
        (lambda pki: pki.client_b[1], "the private key is not the client certificate's"),
        (lambda pki: pki.client_a[0], "unencrypted PEM private key"),
    ],
    ids=["another-certificates-key", "a-certificate-as-key"],
)
async def test_a_client_key_that_is_not_the_certificates_is_refused_before_any_call(
    upstream, tls_server, pki, capsys, wrong
):
    """`tls_credentials`, and with it the CLI, refuses a client certificate with a key
    that is not its own when made (ValueError; exit 2), as the server refuses such a pair
    at start; before, every call was retried for seconds and failed UNAVAILABLE
    ("Failed to create security handshaker"). The certificate's own key is served."""
    server = await _serving_cert_tenants(upstream, tls_server, pki)
    cert, key = pki.client_a
    wrong_key, problem = wrong
    with pytest.raises(ValueError, match=problem):
        tls_credentials(
            root_certificates=pki.ca.read_bytes(),
            certificate_chain=cert.read_bytes(),
            private_key=wrong_key(pki).read_bytes(),
        )
    files = ["--ca-file", str(pki.ca), "--cert-file", str(cert)]
    with pytest.raises(SystemExit) as caught:
        await asyncio.to_thread(
            cli_main,
            ["models", "--address", server.address, *files, "--key-file", str(wrong_key(pki))],
        )
    assert caught.value.code == 2
    assert problem in capsys.readouterr().err
    credentials = tls_credentials(
        root_certificates=pki.ca.read_bytes(),
        certificate_chain=cert.read_bytes(),
        private_key=key.read_bytes(),
    )
    async with GatewayClient(server.address, credentials=credentials) as client:
        assert [m.name for m in (await client.list_models(timeout_s=_TIMEOUT_S)).models]
    assert upstream.requests == []


@pytest.mark.parametrize("wrong_ca", ["ca.key", "team-a.csr"], ids=["a-key", "a-request"])
async def test_a_ca_file_holding_no_certificate_is_refused_before_any_call(
    upstream, tls_server, pki, capsys, monkeypatch, *, wrong_ca
):
    """A CA file that holds no certificate (the CA's key, a certificate request) is a
    usage error naming it (exit 2), from --ca-file or $LLM_GATEWAY_CA_FILE, and
    `tls_credentials` refuses such root certificates (ValueError), as the Node client
    does; before, gRPC took it, trusted nothing, and every call was retried for seconds
    and failed UNAVAILABLE ("Failed to create security handshaker")."""
    server = await tls_server(
        gateway_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": _tls(pki)})
    )
    wrong = pki.ca.with_name(wrong_ca)
    with pytest.raises(ValueError, match="the root certificates hold no PEM certificate"):
        tls_credentials(root_certificates=wrong.read_bytes())
    argv = ["complete", "--address", server.address, "--model", "fake-model", "hi"]
    with pytest.raises(SystemExit) as flagged:
        await asyncio.to_thread(cli_main, [*argv, "--ca-file", str(wrong)])
    assert flagged.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            f"error: argument --ca-file: {wrong} holds no PEM certificate "
            "(no -----BEGIN CERTIFICATE----- line)"
        )
    )
    monkeypatch.setenv("LLM_GATEWAY_CA_FILE", str(wrong))
    with pytest.raises(SystemExit) as from_variable:
        await asyncio.to_thread(cli_main, argv)
    assert from_variable.value.code == 2
    assert "error: environment variable LLM_GATEWAY_CA_FILE: " in capsys.readouterr().err
    assert upstream.requests == []
    monkeypatch.setenv("LLM_GATEWAY_CA_FILE", str(pki.ca))
    assert await asyncio.to_thread(cli_main, argv) == 0
    assert "Hello from fake" in capsys.readouterr().out


async def test_a_client_certificate_or_key_from_the_environment_is_named_when_refused(
    upstream, tls_server, pki, capsys, monkeypatch
):
    """A certificate from $LLM_GATEWAY_CERT_FILE without a key, or with another
    certificate's key from $LLM_GATEWAY_KEY_FILE, is a usage error naming the variables
    (README: not the options they stand in for), before any call; before, it named
    --cert-file and --key-file, which the user never typed. The right pair is served."""
    server = await _serving_cert_tenants(
        upstream, tls_server, pki, tenants={"team-a": {"allowed_models": ["fake-model"]}}
    )
    cert, key = pki.client_a
    argv = ["complete", "--address", server.address, "--model", "fake-model", "hi"]
    monkeypatch.setenv("LLM_GATEWAY_CA_FILE", str(pki.ca))
    monkeypatch.setenv("LLM_GATEWAY_CERT_FILE", str(cert))
    with pytest.raises(SystemExit) as alone:
        await asyncio.to_thread(cli_main, argv)
    assert alone.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "llm-gateway: environment variable LLM_GATEWAY_CERT_FILE: "
        "--cert-file and --key-file go together"
    )
    monkeypatch.setenv("LLM_GATEWAY_KEY_FILE", str(pki.client_b[1]))
    with pytest.raises(SystemExit) as mismatched:
        await asyncio.to_thread(cli_main, argv)
    assert mismatched.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "llm-gateway: environment variable LLM_GATEWAY_CERT_FILE and environment variable "
        "LLM_GATEWAY_KEY_FILE: the private key is not the client certificate's "
        "(the key of another one?)"
    )
    assert upstream.requests == []
    monkeypatch.setenv("LLM_GATEWAY_KEY_FILE", str(key))
    assert await asyncio.to_thread(cli_main, argv) == 0
    assert "Hello from fake" in capsys.readouterr().out


@pytest.mark.parametrize(
    "subject", ["/CN=team-a/CN=ops", "/CN=ops/CN=team-a", "/O=x/CN=team-a+CN=ops"]
)
async def test_a_certificate_naming_two_common_names_is_unauthenticated(
    upstream, tls_server, pki, tmp_path, subject
):
    """grpc reports a subject's first CN, other tools its last: a certificate naming two
    (an admin's and a team's) is refused rather than served as either tenant."""
    server = await _serving_cert_tenants(
        upstream, tls_server, pki, tenants={"ops": {"is_admin": True}}
    )
    two = issue(
        tmp_path, "two", ca=(pki.ca, pki.ca_key), subject=subject,
        extensions="extendedKeyUsage=clientAuth",
    )  # fmt: skip
    async with _channel(server, pki, two) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        refused = await rpc_error(stub.Complete(chat(), timeout=_TIMEOUT_S))
        assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "more than one common name" in (refused.details() or "")
        usage = await rpc_error(stub.GetUsage(pb.GetUsageRequest(tenant="*"), timeout=_TIMEOUT_S))
        assert usage.code() is grpc.StatusCode.UNAUTHENTICATED
    assert upstream.requests == []


async def test_a_certificate_whose_common_name_is_no_tenant_name_leaves_the_tenant_to_the_key(
    upstream, tls_server, pki, tmp_path
):
    """A CA's certificate whose CN is no tenant name ("Search Team (prod)") names no tenant:
    the call's valid key names it, as beside a certificate without a CN; without a known
    key the refusal names both problems. Before, it was refused whatever key it carried."""
    server = await _serving_cert_tenants(
        upstream, tls_server, pki, tenants={"team-a": {}, "team-b": {"allowed_models": ["x"]}}
    )
    named = issue(
        tmp_path, "named", ca=(pki.ca, pki.ca_key), common_name="Search Team (prod)",
        extensions="extendedKeyUsage=clientAuth",
    )  # fmt: skip
    async with _channel(server, pki, named) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        served = await stub.Complete(chat(), metadata=as_tenant("team-a"), timeout=_TIMEOUT_S)
        assert served.content == "Hello from fake"
        denied = await rpc_error(stub.Complete(chat(), metadata=as_tenant("team-b")))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'team-b'" in (denied.details() or "")
        for metadata, problem in [((), "missing caller key"), (bearer("llmgw_no"), "unknown")]:
            refused = await rpc_error(stub.Complete(chat(), metadata=metadata))
            assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
            assert detail(refused, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
            assert "'Search Team (prod)' is not a tenant name" in (refused.details() or "")
            assert problem in (refused.details() or "")
    assert len(upstream.requests) == 1


async def test_mtls_refuses_an_untrusted_client_certificate(upstream, tls_server, pki):
    """A client certificate from another CA (even with a known CN) fails the handshake."""
    server = await _serving_cert_tenants(upstream, tls_server, pki)
    for client in (pki.rogue_client, None):
        async with _channel(server, pki, client) as channel:
            stub = pb_grpc.CompletionServiceStub(channel)
            error = await rpc_error(stub.Complete(chat(), timeout=_TIMEOUT_S))
            assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert upstream.requests == []


async def test_failed_handshakes_print_no_grpc_line_each_from_the_served_process(
    upstream, pki, tmp_path
):
    """`python -m service serve` on an mTLS port: plaintext connections and a certificate
    from another CA fail their handshakes, and a trusted client is served, without a
    line from gRPC core on stderr for each failure. Before, each printed one at INFO,
    whatever `--log-level` said: anyone reaching the port could flood the log."""
    data = gateway_config_data(
        upstream.base_url, server={"tls": _mtls(pki, tenant_from_cert_subject=True)}
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_GATEWAY", "GRPC_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(path), "--workers", "1",
        "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        async with asyncio.timeout(_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        address = line.removeprefix("llm-gateway listening on ").strip()
        host, port = address.rsplit(":", 1)
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await reader.read()  # the gateway closes it
            writer.close()
        for client in (pki.rogue_client, pki.client_a):
            credentials = grpc.ssl_channel_credentials(
                pki.ca.read_bytes(), client[1].read_bytes(), client[0].read_bytes()
            )
            async with grpc.aio.secure_channel(address, credentials) as channel:
                call = pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=_TIMEOUT_S)
                if client is pki.rogue_client:
                    assert (await rpc_error(call)).code() is grpc.StatusCode.UNAVAILABLE
                else:
                    assert (await call).content == "Hello from fake"
    finally:
        process.terminate()
        stderr = (await process.stderr.read()).decode()
        await process.wait()
    assert "Handshake failed" not in stderr
    assert "ssl_transport_security" not in stderr


async def test_mtls_with_keys_still_requires_a_key_when_cert_tenant_is_off(
    upstream, tls_server, pki
):
    """Without tenant_from_cert_subject a valid certificate is transport only: keys still rule."""
    config = secure_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": _mtls(pki)})
    server = await tls_server(config)
    async with _channel(server, pki, pki.client_a) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        error = await rpc_error(stub.Complete(chat(), timeout=_TIMEOUT_S))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert detail(error, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
        response = await stub.Complete(chat(), metadata=as_tenant("team-b"), timeout=_TIMEOUT_S)
        assert response.content == "Hello from fake"


async def test_mtls_certificate_without_a_common_name_is_not_the_anonymous_tenant(
    upstream, tls_server, pki, tmp_path
):
    """With mTLS naming tenants (and auth.mode off, allowed on a public address), a
    certificate with no CN names no tenant: it must not become the anonymous `default`
    caller, who may read every tenant's usage."""
    from tests.integration.pki import _openssl

    ca_cert, ca_key = pki.ca, pki.ca.with_suffix(".key")
    (tmp_path / "ca.pem").write_bytes(ca_cert.read_bytes())
    (tmp_path / "ca.key").write_bytes(ca_key.read_bytes())
    (tmp_path / "nocn.ext").write_text("extendedKeyUsage=clientAuth\n", encoding="ascii")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", "/O=no-common-name", "-keyout", "nocn.key", "-out", "nocn.csr",
             cwd=tmp_path)  # fmt: skip
    _openssl("x509", "-req", "-in", "nocn.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "nocn.ext", "-out", "nocn.pem",
             cwd=tmp_path)  # fmt: skip
    config = gateway_config(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": _mtls(pki, tenant_from_cert_subject=True)},
    )
    server = await tls_server(config)
    async with _channel(server, pki, pki.client_a) as channel:
        await pb_grpc.CompletionServiceStub(channel).Complete(chat(), timeout=_TIMEOUT_S)
    async with _channel(server, pki, (tmp_path / "nocn.pem", tmp_path / "nocn.key")) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        error = await rpc_error(stub.GetUsage(pb.GetUsageRequest(tenant="*"), timeout=_TIMEOUT_S))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_from_cert_subject_without_required_certificates_is_a_config_error(pki):
    """grpc asks for no client certificate unless it requires one, so a certificate could
    never name the tenant: refused at startup rather than every such caller UNAUTHENTICATED."""
    tls = _tls(pki, client_ca_file=str(pki.ca), tenant_from_cert_subject=True)
    with pytest.raises(ConfigError, match=r"server\.tls.*require_client_cert"):
        secure_config("http://127.0.0.1:9", server={"listen": "127.0.0.1:0", "tls": tls})


async def _serve_until_it_exits(
    tmp_path: Path, tls: dict[str, str], *args: str
) -> tuple[Path, int | None, bytes, bytes]:
    """`python -m service serve` with `server.tls` set to `tls` (written to a config file
    in `tmp_path`), run until it exits: the file, its status, stdout and stderr."""
    path = tmp_path / "gateway.yaml"
    config = gateway_config_data(
        "http://127.0.0.1:9/v1", server={"listen": "127.0.0.1:0", "tls": tls}
    )
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=_REPO,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return path, process.returncode, out, err


async def test_tls_files_under_the_home_directory_serve_from_serve_and_pass_check(
    upstream, pki, tmp_path
):
    """`server.tls` paths written `~/pki/...` are the user's home, as `auth.keys_file`
    and `local_model.model_path` are: `check` passes them and `serve` speaks TLS with them.

    Before, both exited 2, "cannot read ~/pki/server.pem": no path was expanded.
    """
    home = tmp_path / "home"
    (home / "pki").mkdir(parents=True)
    for source in (pki.server_cert, pki.server_key, pki.ca):
        (home / "pki" / source.name).write_bytes(source.read_bytes())
    tls = {"cert_file": "~/pki/server.pem", "key_file": "~/pki/server.key"}
    config = gateway_config_data(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": {**tls, "client_ca_file": "~/pki/ca.pem"}},
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    env |= {"HOME": str(home), "PYTHONUNBUFFERED": "1"}
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "check", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=_REPO, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(check.communicate(), timeout=_TIMEOUT_S)
    assert check.returncode == 0, out + err
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(path), "--workers", "1",
        stdout=asyncio.subprocess.PIPE, cwd=_REPO, env=env,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        line = (await asyncio.wait_for(serve.stdout.readline(), timeout=_TIMEOUT_S)).decode()
        assert line.startswith("llm-gateway listening on "), line
        address = line.split(" on ", 1)[1].split()[0]
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(address, credentials) as channel:
            response = await pb_grpc.CompletionServiceStub(channel).Complete(
                chat(), timeout=_TIMEOUT_S
            )
    finally:
        serve.terminate()
        await asyncio.wait_for(serve.wait(), timeout=_TIMEOUT_S)
    assert response.content == "Hello from fake"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"cert_file": "not-pem"},
            "server.tls.cert_file: no PEM certificate in {not-pem}",
            id="cert-not-pem",
        ),
        pytest.param(
            {"key_file": "team-a.key"},
            "server.tls.key_file: not the private key of cert_file's certificate",
            id="key-of-another-certificate",
        ),
        pytest.param(
            {"key_file": "not-pem"},
            "server.tls.key_file: no unencrypted PEM private key in {not-pem}",
            id="key-not-pem",
        ),
        pytest.param(
            {"client_ca_file": "server.key"},
            "server.tls.client_ca_file: no PEM certificate in {server.key}",
            id="ca-is-a-key",
        ),
    ],
)
async def test_certificate_files_grpc_cannot_use_are_a_config_error(pki, tmp_path, files, expected):
    """`serve` with a certificate, key or CA file that is no such thing exits 2 naming the
    key. Before, grpc failed the listen and the gateway blamed the address ("the address is
    taken or not local"), exit status 1."""
    (tmp_path / "not-pem").write_text("not a certificate\n")

    def path_of(name: str) -> str:
        return str(tmp_path / name if name == "not-pem" else pki.ca.parent / name)

    tls = {**_mtls(pki), **{key: path_of(name) for key, name in files.items()}}
    path, code, _, stderr = await _serve_until_it_exits(tmp_path, tls)
    for name in ("not-pem", "server.key"):
        expected = expected.replace(f"{{{name}}}", path_of(name))
    assert stderr.decode().splitlines()[-1] == f"llm-gateway: config error: {path}: {expected}"
    assert code == 2


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_certificate_of_a_curve_grpc_cannot_serve_is_a_config_error(tmp_path, workers):
    """A well-formed certificate and key that grpc's TLS cannot use (an EC key on
    secp256k1: Python's ssl loads it, BoringSSL does not) exits 2 naming the key, with
    one process and with workers.

    Before, the start failed at the listen and blamed the address ("the address is taken
    or not local"), exit status 1: an operator would look for another process on a port
    nobody held.
    """
    from tests.integration.pki import _openssl

    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1",
             "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-keyout", "k1.key", "-out", "k1.pem", cwd=tmp_path)  # fmt: skip
    tls = {"cert_file": str(tmp_path / "k1.pem"), "key_file": str(tmp_path / "k1.key")}
    path, code, out, stderr = await _serve_until_it_exits(tmp_path, tls, "--workers", workers)
    said = f"llm-gateway: config error: {path}: server.tls.cert_file: grpc cannot serve TLS"
    assert any(line.startswith(said) for line in stderr.decode().splitlines()), stderr
    assert b"listening" not in out
    assert code == 2


async def test_a_taken_port_with_a_usable_certificate_is_still_the_address(upstream, pki):
    """The certificate is blamed only when grpc refuses it: a taken port is the address."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = f"127.0.0.1:{holder.getsockname()[1]}"
        config = gateway_config(upstream.base_url, server={"listen": held, "tls": _tls(pki)})
        with pytest.raises(ListenError, match=re.escape(f"cannot listen on {held}")):
            async with GatewayServer(config):
                pass


@pytest.mark.parametrize(
    ("base_url", "warned"),
    [
        ("http://vllm.internal.example:8000/v1", True),
        ("http://10.0.0.7:8000/v1", True),
        ("https://vllm.internal.example/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://localhost:8000/v1", False),
    ],
)
async def test_a_provider_key_sent_over_plain_http_to_another_host_is_warned_about(
    start_gateway: Any, caplog: pytest.LogCaptureFixture, base_url: str, warned: bool
) -> None:
    """An upstream with a key on `http://` to another machine sends that key across the
    network unencrypted: said once at start, naming the upstream (never the key or the
    URL). Inside a cluster's own network that may be intended, so it is not refused."""
    data = gateway_config_data(base_url)
    data["upstreams"][0]["api_key_env"] = "PROVIDER_KEY"
    config = parse_config(data, source="<test>", environ={"PROVIDER_KEY": "sk-test-secret"})
    with caplog.at_level("WARNING", logger="llm_gateway"):
        await start_gateway(config)
    said = [r for r in caplog.records if r.getMessage() == "upstream.key_over_plain_http"]
    assert [r.upstream for r in said] == (["up0"] if warned else [])
    assert "sk-test-secret" not in caplog.text


@pytest.mark.parametrize("contents", [b"", b"not a certificate\n"], ids=["empty", "no-pem"])
def test_cli_tls_names_a_system_ca_bundle_holding_no_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    contents: bytes,
) -> None:  # fmt: skip
    """`--tls` with `$SSL_CERT_FILE` naming a file with no PEM certificate (a DER bundle,
    the wrong file) is a usage error naming that variable and file, before any call.
    Before, it said `--cert-file and --key-file: the root certificates hold no PEM
    certificate`, blaming options the command was not given."""
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(contents)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with pytest.raises(SystemExit) as caught:
        cli_main(["models", "--tls", "--address", "127.0.0.1:1"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"llm-gateway: environment variable SSL_CERT_FILE: {bundle} holds no PEM "
        "certificate to verify the gateway with (give --ca-file)\n"
    )


async def test_cli_tls_verifies_the_gateway_against_the_systems_cas(
    upstream, tls_server, pki, monkeypatch, capsys
):
    """`llm-gateway complete --tls` verifies against the system's CAs (README), so a
    gateway whose private CA is installed there is served. SSL_CERT_FILE names the system
    bundle to OpenSSL; gRPC alone would only trust the public roots it ships with."""
    server = await tls_server(
        gateway_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": _tls(pki)})
    )
    base = ["complete", "--address", server.address, "--model", "fake-model", "--tls", "hi"]
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    assert await asyncio.to_thread(cli_main, base) == 0
    assert "Hello from fake" in capsys.readouterr().out
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.with_name("rogue-ca.pem")))
    assert await asyncio.to_thread(cli_main, base) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
