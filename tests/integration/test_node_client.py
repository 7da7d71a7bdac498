"""A non-Python caller gets the full experience: the Node client against the real gateway.

The TypeScript client in clients/node (built on the ts-proto stubs in generated/ts) is
compiled once per session and runs scenarios against a gateway started in-process in front
of the fault-injecting upstream. Each scenario prints one JSON line of what the client saw.
One Node process runs the scenarios one after another (each with a client and connections
of its own), sparing each test a Node start; a scenario that needs an environment or stdin
of its own, and the example program, run in a process of their own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

from gateway_client import GatewayClient
from gateway_client.client import check_address
from gateway_client.connection import DEFAULT_MODEL
from gateway_client.errors import error_details, status_details
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.errors import (
    ContextWindowExceeded,
    GatewayError,
    QuotaExceeded,
    UpstreamRateLimited,
    to_rpc_status,
)
from tests.conftest import (
    FAKE_MODEL,
    RunningGateway,
    chat,
    chat_stream,
    fake_model_window,
    gateway_config,
)
from tests.counting_relay import CountingRelay
from tests.fake_upstream import CutStream, FakeUpstream, Hang, Reply, Status, ToolCallReply
from tests.forward_proxy import ForwardProxy
from tests.integration.helpers import garbled_details_server
from tests.integration.pki import Pki, make_pki
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.integration.test_python_client import LOOPBACK_ADDRESSES
from tests.integration.test_resilience import checked_out_connections
from tests.secret_capture import CALLER_KEY_A
from tests.unit.test_client_address import BAD_PORTS, GOOD_PORTS
from tests.unit.test_client_address import FORMS as PYTHON_ADDRESS_FORMS

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "node"
SCENARIOS_JS = NODE_DIR / "dist" / "clients" / "node" / "src" / "scenarios.js"

# One test process compiles the client (`node_scenarios`) and runs these: another's `tsc`
# rewriting dist/ under a running scenario would break it.
pytestmark = pytest.mark.xdist_group("node_client")

SERVICE_CONFIG = ROOT / "clients" / "service_config.json"
# Hang guards, not timings: a scenario's whole run, a wait for the gateway or upstream to
# reach a state. A busy CI machine (load 3 on 2 cores) takes seconds to start a Node process.
NODE_TIMEOUT_S = 90.0
WAIT_S = 30.0
# Price of fake-model in gateway_config(): USD per million input / output tokens.
INPUT_USD_PER_M, OUTPUT_USD_PER_M = 0.14, 0.42

StartGateway = Callable[..., Any]


class NodeScenarios:
    """The compiled scenarios program, and one Node process of it serving scenarios one
    after another (`scenarios.js serve`), started at the first and again after a crash."""

    def __init__(self, path: Path, stderr: IO[bytes]) -> None:
        """`stderr`: where the serving process writes, read back if it ends."""
        self.path = path
        self._serving: subprocess.Popen[bytes] | None = None
        self._stderr = stderr

    @property
    def example(self) -> Path:
        """The example program, compiled with the scenarios."""
        return self.path.with_name("example.js")

    async def answer(self, *args: str) -> dict[str, Any]:
        """Run one scenario (its command-line arguments) in the serving process: the JSON
        line it prints. A scenario that crashed (a process of its own would exit 2) or hung
        fails the test, and the next scenario gets a new process."""
        process = self._process()
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps(args).encode() + b"\n")
        process.stdin.flush()
        line = b""
        try:
            async with asyncio.timeout(NODE_TIMEOUT_S):
                line = await asyncio.to_thread(process.stdout.readline)
        finally:
            if process.poll() is None and not line.endswith(b"\n"):
                self.close()  # hung: its reader thread sees the end of stdout
        if not line:
            self.close()
            self._stderr.seek(0)
            pytest.fail(f"the Node scenarios process ended: {self._stderr.read().decode()}")
        result: dict[str, Any] = json.loads(line)
        if "crashed" in result:
            self.close()
            pytest.fail(f"the Node scenario {args[0]} crashed: {result['crashed']}")
        return result

    def _process(self) -> subprocess.Popen[bytes]:
        if self._serving is None or self._serving.poll() is not None:
            self._stderr.seek(0)
            self._stderr.truncate()
            self._serving = subprocess.Popen(
                ["node", str(self.path), "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        return self._serving

    def close(self) -> None:
        """End the serving process, if any."""
        if self._serving is None:
            return
        process, self._serving = self._serving, None
        assert process.stdin is not None
        assert process.stdout is not None
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()


@pytest.fixture(scope="session")
def node_scenarios() -> Iterator[NodeScenarios]:
    """The Node scenarios program, compiled from the current TypeScript sources."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    assert node, "node (v20+) is needed to test the Node client"
    assert npm, "npm is needed to install the Node client's packages"
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
        )
    subprocess.run(
        [str(NODE_DIR / "node_modules" / ".bin" / "tsc"), "-p", str(NODE_DIR)],
        check=True,
        timeout=300,
    )
    with tempfile.TemporaryFile() as stderr:
        scenarios = NodeScenarios(SCENARIOS_JS, stderr)
        yield scenarios
        scenarios.close()


async def run_process(
    script: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a Node program to completion without blocking the loop the gateway runs on:
    (exit status, stdout, stderr). `env` is added to this process's environment."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        async with asyncio.timeout(NODE_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def run_after_go_ahead(
    scenarios: NodeScenarios, *args: str, ready: Callable[[], bool]
) -> dict[str, Any]:
    """Run one scenario, in a process of its own, that waits for a line on its stdin, sent
    once `ready()` holds; the JSON line it prints."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(scenarios.path),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(ready)
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        async with asyncio.timeout(NODE_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


async def run_program(script: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a Node program that must succeed; its stdout."""
    returncode, stdout, stderr = await run_process(script, *args, env=env)
    assert returncode == 0, stderr
    return stdout


async def run_node(
    scenarios: NodeScenarios, scenario: str, *args: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one scenario and return the JSON line it prints; with `env` (added to this
    process's environment), in a Node process of its own."""
    if env is None:
        return await scenarios.answer(scenario, *args)
    stdout = await run_program(scenarios.path, scenario, *args, env=env)
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


async def run_against(
    scenarios: NodeScenarios, gateway: RunningGateway, scenario: str
) -> dict[str, Any]:
    """Run one scenario against a running gateway."""
    return await run_node(scenarios, scenario, "--address", gateway.server.address)


async def wait_until(condition: Callable[[], bool], *, timeout_s: float = WAIT_S) -> None:
    """Poll until `condition()` holds (a synchronisation aid, not a timing assertion)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def expected_cost_usd(input_tokens: int, output_tokens: int) -> float:
    """What the gateway charges for fake-model usage."""
    return (input_tokens * INPUT_USD_PER_M + output_tokens * OUTPUT_USD_PER_M) / 1e6


def overload_config(upstream: FakeUpstream, *, pushback_s: float) -> Any:
    """A gateway with a single call slot that refuses the rest with this pushback."""
    return gateway_config(
        upstream.base_url,
        server={"max_in_flight_calls": 1, "overload_retry_after_s": pushback_s},
    )


def service_config() -> dict[str, Any]:
    """The shipped gRPC service config."""
    loaded: dict[str, Any] = json.loads(SERVICE_CONFIG.read_text())
    return loaded


def max_attempts() -> int:
    """maxAttempts of the shipped retry policy."""
    return int(service_config()["methodConfig"][0]["retryPolicy"]["maxAttempts"])


async def test_node_unary_complete_reads_usage_and_cost(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A unary Complete from Node returns the content, usage and cost."""
    result = await run_against(node_scenarios, gateway, "complete")
    assert result["content"] == "Hello from fake"
    assert result["attempts"] == 1
    metadata = result["metadata"]
    assert metadata["finishReason"] == "FINISH_REASON_STOP"
    assert (metadata["inputTokens"], metadata["outputTokens"]) == (7, 3)
    assert metadata["costUsd"] == pytest.approx(expected_cost_usd(7, 3))
    assert metadata["upstream"] == "up0"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "form", ["{address}", "dns:{address}", "DNS:///{address}", "ipv4:{address},{address}"]
)
@pytest.mark.parametrize("variable", ["http_proxy", "https_proxy"])
async def test_node_client_calls_a_gateway_on_loopback_past_the_machines_proxy(
    node_scenarios: NodeScenarios,
    upstream: FakeUpstream,
    gateway: RunningGateway,
    variable: str,
    form: str,
) -> None:
    """grpc-js reads the proxy variables itself; a gateway on this machine is called
    directly, not through a proxy (here one that answers nothing) that cannot reach it,
    also as `dns:HOST:PORT` or an `ipv4:` list (before, each went to the proxy) and with
    the scheme in capitals, which gRPC reads in any case (before, grpc-js connected
    nowhere)."""
    address = form.format(address=gateway.server.address)
    env = {variable: "http://127.0.0.1:9"}
    result = await run_node(node_scenarios, "complete", "--address", address, env=env)
    assert result.get("content") == "Hello from fake", result  # the error, if any, said


async def test_node_client_tells_loopback_addresses_apart_as_the_python_client(
    node_scenarios: NodeScenarios,
) -> None:
    """Which gateway addresses each client calls past the machine's proxy: the same in
    Node as in Python, for IPv6 written out in full or IPv4-mapped too."""
    addresses = [address for address, _ in LOOPBACK_ADDRESSES]
    told = await run_node(node_scenarios, "loopback", *addresses)
    assert told == dict(LOOPBACK_ADDRESSES)


# Forms of the gateway's address both clients read a port from. Not the Python client's
# `dns:///HOST%3APORT`: grpc-js reads no escapes, and looks `HOST%3APORT` up as a host.
ADDRESS_FORMS = [form for form in PYTHON_ADDRESS_FORMS if "%3A" not in form]


def node_refusal(address: str) -> str:
    """What the Node client's `checkAddress` says of an address the Python client refuses."""
    quoted = json.dumps(address, ensure_ascii=False)  # as JSON.stringify quotes it
    return f"RangeError: {quoted}: the port must be 1..65535, in digits alone"


def python_refusal(address: str) -> str | None:
    """The Python client's refusal of `address` in the Node client's words, or None."""
    try:
        check_address(address)
    except ValueError:
        return node_refusal(address)
    return None


async def test_node_client_refuses_each_port_the_python_client_refuses(
    node_scenarios: NodeScenarios,
) -> None:
    """A port with a sign or a leading blank, an empty one, 0, one in other scripts'
    digits, and one past 65535 are refused by both clients, in each form of address, with
    the same words. Before, the Node client refused only ports past 65535 ("0..65535"),
    and grpc-js failed each call of the others UNAVAILABLE after retries, or at its deadline."""
    addresses = [
        *(form.format(port=port) for form in ADDRESS_FORMS for port in BAD_PORTS),
        "localhost:115587 ",  # read without its trailing blank: still past 65535
        "ipv4:127.0.0.1:50051 ,127.0.0.1:50052",  # a blank within a list is no trailing one
    ]
    told = await run_node(node_scenarios, "check-address", *addresses)
    assert told == {address: node_refusal(address) for address in addresses}
    assert told == {address: python_refusal(address) for address in addresses}


async def test_node_client_takes_each_address_the_python_client_takes(
    node_scenarios: NodeScenarios,
) -> None:
    """A port 1..65535 in digits (leading zeros too), a bare host or IPv6 address, a
    socket's path or name, and a port followed by blanks gRPC leaves out are taken by both
    clients."""
    addresses = [
        *(form.format(port=port) for form in ADDRESS_FORMS for port in GOOD_PORTS),
        "localhost",
        "gw.example",
        "::1",
        "[::1]",
        "dns:///gw.example",
        "dns:///h:1",
        "localhost:50051 ",
        "localhost:50051\t\r\n",
        "ipv4:127.0.0.1:50051,127.0.0.1:50052 ",
        "unix:/tmp/x",
        "unix:gw.sock",
        "UNIX:/tmp/x",
        "unix-abstract:gw",
        "vsock:3:50051",
    ]
    told = await run_node(node_scenarios, "check-address", *addresses)
    assert told == dict.fromkeys(addresses)
    assert told == {address: python_refusal(address) for address in addresses}


@pytest.mark.parametrize(
    "form",
    [
        "{host}:{port}",
        "dns:///{host}:{port}",
        "ipv4:{host}:{port}",
        "[::ffff:{host}]:{port}",
        # A list with the gateway's own address in it: the call hung past its deadline.
        "ipv4:{host}:{port},{host}:{good_port}",
        "ipv6:[::1]:{good_port},[::1]:{port}",
    ],
)
async def test_node_client_refuses_a_port_not_1_to_65535_in_digits_when_made(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway, form: str
) -> None:
    """An address whose port is past 65535, signed, after a blank, empty or 0 throws a
    RangeError when the client is made, saying so as the Python client's ValueError does.
    Before, grpc-js connected nowhere: each call was retried until it failed UNAVAILABLE
    ("Failed to parse DNS address") or waited out its whole deadline."""
    host, _, port = gateway.server.address.rpartition(":")
    for bad_port in [
        str(int(port) + 65536),
        f"+{port}",
        f"-{65536 - int(port)}",
        f" {port}",
        "",
        "0",
    ]:
        wrapped = form.format(host=host, port=bad_port, good_port=port)
        result = await run_node(
            node_scenarios, "without-timeout", "--address", wrapped, "--default-timeout-ms", "1000"
        )
        said = f"{json.dumps(wrapped)}: the port must be 1..65535, in digits alone"
        assert result == {"refused": said}


@pytest.mark.parametrize("form", ["{address}", "ipv4:{address}", "dns:///{address}"])
async def test_node_client_calls_an_address_with_trailing_blanks_without_them(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway, form: str
) -> None:
    """Blanks after the port are left out, as the Python client's gRPC leaves them out,
    and the call reaches the gateway. Before, grpc-js took them into the port, and each
    call failed UNAVAILABLE ("Failed to parse DNS address") after retries."""
    address = form.format(address=gateway.server.address) + " \t\n"
    result = await run_node(node_scenarios, "complete", "--address", address)
    assert result.get("content") == "Hello from fake", result  # the error, if any, said


async def test_node_client_takes_an_answer_over_grpcs_default_message_limit(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A unary answer of over 4 MiB (gRPC's default receive limit) reaches the Node client
    whole: it takes answers up to 32 MiB, the gateway's 16 MiB upstream bound and more."""
    upstream.script(Reply(content="word " * (1024 * 1024 + 7)))
    result = await run_against(node_scenarios, gateway, "long-answer")
    assert result == {"length": 5 * (1024 * 1024 + 7), "start": "word word "}


async def test_node_client_sends_its_api_key_on_every_call(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`new GatewayClient(address, { apiKey })` authenticates every call as the key's
    tenant, as the Python client's `api_key` does; without it the gateway refuses."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    address = gateway.server.address
    keyed = await run_node(
        node_scenarios, "complete", "--address", address, "--api-key", CALLER_KEY_A
    )
    assert keyed["content"] == "Hello from fake"
    unkeyed = await run_node(node_scenarios, "without-timeout", "--address", address)
    assert unkeyed["code"] == "UNAUTHENTICATED"
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
    assert usage.total.requests == 1


async def test_node_client_sends_no_key_for_an_empty_one_as_the_python_client(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`apiKey: ""` (an unset variable's) sends no `authorization` metadata, as Python's
    `api_key=""`: both calls are refused alike, as calls without a key. Before, Node sent
    `Bearer ` alone, refused as metadata not of the form `Bearer <key>`."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    address = gateway.server.address
    node = await run_node(node_scenarios, "try-complete", "--address", address, "--api-key", "")
    async with GatewayClient(address, api_key="") as client:
        with pytest.raises(grpc.aio.AioRpcError) as python:
            await client.complete("Say hi", model=FAKE_MODEL)
    assert python.value.details().startswith("missing caller key")
    assert (node["code"], node["message"]) == ("UNAUTHENTICATED", python.value.details())
    assert upstream.requests == []


async def test_node_client_never_shows_its_api_key_when_logged(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A keyed client passed to console.log, util.inspect or JSON.stringify (a log line, an
    error reporter) shows no caller key, while its calls still carry it. Before, the key
    was an ordinary property, printed with the rest."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    result = await run_node(
        node_scenarios, "shown", "--address", gateway.server.address, "--api-key", CALLER_KEY_A
    )
    assert result["content"] == "Hello from fake"
    assert "GatewayClient" in result["inspected"]
    assert CALLER_KEY_A not in result["inspected"]
    assert CALLER_KEY_A not in result["json"]


async def test_node_stream_never_shows_the_clients_api_key_when_logged(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A keyed client's stream passed to util.inspect (an error reporter logging what it
    holds), while it runs or once it ended, shows no caller key. Before, its gRPC call was
    an ordinary property, and with it the call's metadata, the key included."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    result = await run_node(
        node_scenarios,
        "shown-stream",
        "--address",
        gateway.server.address,
        "--api-key",
        CALLER_KEY_A,
    )
    assert result["content"] == "Hello from fake"
    assert "CompletionStream" in result["before"]
    assert CALLER_KEY_A not in result["before"]
    assert CALLER_KEY_A not in result["after"]


async def test_node_client_gives_a_call_without_a_timeout_its_default_deadline(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A call that sets no `timeoutMs` gets the client's `defaultTimeoutMs` (5 minutes
    unless set): against a hung upstream it ends DEADLINE_EXCEEDED, not never.
    Before, it had no deadline at all."""
    upstream.script(Hang())
    result = await run_node(
        node_scenarios,
        "without-timeout",
        "--address",
        gateway.server.address,
        "--default-timeout-ms",
        "500",
    )
    assert result["code"] == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("timeout_ms", ["9007199254740991", "NaN", "Infinity"])
async def test_node_client_refuses_a_timeout_a_call_cannot_keep(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway, timeout_ms: str
) -> None:
    """A `timeoutMs` or `defaultTimeoutMs` past 1e9 ms, or NaN, throws a RangeError before
    any call, while one within it is kept. Before, `Number.MAX_SAFE_INTEGER` (a common
    "no deadline") made grpc-js throw from inside the call, out of the caller's reach, and
    the process died; NaN failed the call at once with DEADLINE_EXCEEDED."""
    address = gateway.server.address
    refused = f"must be at most 1000000000 ms, or null for no deadline; got {timeout_ms}"
    calls = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--timeout-ms", timeout_ms
    )
    assert calls == {"complete": f"RangeError: timeoutMs {refused}", "stream": calls["complete"]}
    client = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--default-timeout-ms", timeout_ms
    )
    assert client == {"refused": f"defaultTimeoutMs {refused}"}
    assert upstream.requests == []
    kept = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--timeout-ms", "1000000000"
    )
    assert kept == {"complete": "answered", "stream": "answered"}


async def test_node_null_timeout_is_no_deadline_on_a_call_as_on_the_client(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`timeoutMs: null` on a call is no deadline, unary and streamed, as Python's
    `timeout_s=None`: an answer slower than the client's `defaultTimeoutMs` arrives; so it
    does on a client made with `defaultTimeoutMs: null`. Before, a call's null fell back
    to the client's default, and the call failed DEADLINE_EXCEEDED."""
    upstream.script(*[Reply(delay_s=1.0)] * 4)
    address = gateway.server.address
    per_call = await run_node(
        node_scenarios,
        "timed-calls",
        "--address",
        address,
        "--default-timeout-ms",
        "300",
        "--timeout-ms",
        "null",
    )
    assert per_call == {"complete": "answered", "stream": "answered"}
    client = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--default-timeout-ms", "null"
    )
    assert client == {"complete": "answered", "stream": "answered"}


@pytest.mark.parametrize(("timeout_ms", "kind"), [('"500"', "string"), ("true", "boolean")])
async def test_node_client_refuses_a_timeout_that_is_not_a_number(
    node_scenarios: NodeScenarios,
    upstream: FakeUpstream,
    gateway: RunningGateway,
    timeout_ms: str,
    kind: str,
) -> None:
    """A `timeoutMs` or `defaultTimeoutMs` that is not a number (a string read from the
    environment, a boolean) throws a TypeError before any call, as Python's `timeout_s`
    does. Before, grpc-js threw its own "deadline must be a number or Date" for a string,
    and took `true` for 1 ms: DEADLINE_EXCEEDED at once."""
    address = gateway.server.address
    refused = f"expected milliseconds or null, got {kind}"
    calls = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--timeout-ms", timeout_ms
    )
    assert calls == {"complete": f"TypeError: timeoutMs: {refused}", "stream": calls["complete"]}
    client = await run_node(
        node_scenarios, "timed-calls", "--address", address, "--default-timeout-ms", timeout_ms
    )
    assert client == {"refused": f"defaultTimeoutMs: {refused}"}
    assert upstream.requests == []


INT32_RANGE = "-2147483648..2147483647"
SAFE_RANGE = "-9007199254740991..9007199254740991"
# What `complete` and `completeStream` throw for each of the scenario's BAD_REQUESTS.
REFUSED_REQUESTS = {
    "max-tokens-past-int32": f"RangeError: params.maxTokens must be an integer {INT32_RANGE}; "
    "got 4294967312",
    "max-tokens-fraction": f"RangeError: params.maxTokens must be an integer {INT32_RANGE}; "
    "got 1.5",
    "max-tokens-string": "TypeError: params.maxTokens: expected an integer, got string",
    "ttl-negative": "RangeError: cache.ttlSeconds must be an integer 0..4294967295; got -1",
    "seed-past-2-53": f"RangeError: params.seed must be an integer {SAFE_RANGE}; "
    "got 1.1805916207174113e+21",
    "role-name": "TypeError: messages[0].role: expected a Role (Role.ROLE_SYSTEM, ...), got string",
    "effort-name": "TypeError: params.reasoningEffort: expected a ReasoningEffort "
    "(ReasoningEffort.REASONING_EFFORT_NONE, ...), got string",
    "temperature-string": "TypeError: params.temperature: expected a number, got string",
    "strict-string": "TypeError: params.responseFormat.strict: expected a boolean, got string",
    "content-number": "TypeError: messages[0].content: expected a string, got number",
    "label-number": 'TypeError: labels["team"]: expected a string, got number',
    "labels-map": "TypeError: labels: expected an object, got Map (Object.fromEntries(map) is one)",
    "stop-string": "TypeError: params.stop: expected an array, got string",
    "params-number": "TypeError: params: expected a GenerationParams object, got number",
    "message-null": "TypeError: messages[0]: expected a Message object, got null",
    "message-hole": "TypeError: messages[0]: expected a Message object, got undefined",
    "stop-hole": "TypeError: params.stop[1]: expected a string, got undefined",
    "max-tokens-snake-case": "TypeError: params.max_tokens: GenerationParams has no such field "
    "(the field is maxTokens)",
    "unknown-field": "TypeError: maxTokens: {message} has no such field",
    "undefined": "TypeError: request: expected a {message} object, got undefined",
    "null": "TypeError: request: expected a {message} object, got null",
}
# ... for each of its BAD_OPTIONS.
REFUSED_OPTIONS = {
    "null": "TypeError: options: expected an object (CallOptions), got null",
    "number": "TypeError: options: expected an object (CallOptions), got number",
    "metadata-object": "TypeError: options.metadata: expected a grpc.Metadata, got object",
    "signal-object": "TypeError: options.signal: expected an AbortSignal, got object",
    "timeout-snake-case": "TypeError: options.timeout_ms: CallOptions has no such option "
    "(the option is timeoutMs)",
    "deadline": "TypeError: options.deadline: CallOptions has no such option",
}


async def test_node_client_refuses_bad_arguments_by_name_before_any_call(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A request field its type cannot hold (`maxTokens: 2 ** 32 + 16` or `1.5` in an
    int32, `ttlSeconds: -1` in a uint32, a seed past 2**53, a role or effort by name, a
    string for a number, a boolean or a string field, a string for a list), a name the
    message has no field for (the contract's `max_tokens` for `maxTokens`, which went out
    dropped: a call with no output limit), no request at all, or options that are not
    CallOptions, is a TypeError or RangeError naming it,
    from `complete` and `completeStream` alike, and nothing reaches the gateway: the
    only way to it, a proxy, sees no connection. Before, a field grpc-js could not
    serialize failed the call INTERNAL ("Request message serialization failure: invalid
    int32"), the gateway-bug code, naming no field; a string for a number, a boolean or a
    string went out converted; and a missing request or null options threw "Cannot read
    properties of undefined". A list with a hole (a stray comma) and an option the call
    has no name for (`timeout_ms`, which left the call on the default deadline) are refused
    too: before, the hole went out as the stop sequence "undefined", or failed the call
    INTERNAL, and the option was dropped unread. So are labels given as a `Map`, which
    went out as none: a `Map`'s entries are no properties."""
    name = "gateway.test"
    port = int(gateway.server.address.rpartition(":")[2])
    async with ForwardProxy(hosts={name: ("127.0.0.1", port)}) as proxy:
        env = {"http_proxy": proxy.url, "https_proxy": proxy.url, "no_proxy": ""}
        seen = await run_node(
            node_scenarios, "bad-arguments", "--address", f"{name}:{port}", env=env
        )
        assert proxy.targets == []
    assert seen["requests"] == {
        case: {
            "complete": refused.format(message="CompleteRequest"),
            "stream": refused.format(message="CompleteStreamRequest"),
        }
        for case, refused in REFUSED_REQUESTS.items()
    }
    assert seen["options"] == {
        case: {"complete": refused, "stream": refused} for case, refused in REFUSED_OPTIONS.items()
    }
    assert upstream.requests == []


UNCARRIED_KEY = "apiKey has characters gRPC metadata cannot carry (a stray newline?)"


async def test_node_client_refuses_options_it_has_no_name_for_without_their_values(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A client option of a name the client does not take (`api_key`, `defaultTimeout`, a
    TLS option's `ca_file`), or `tls` as a file name, is a TypeError naming it, and not its
    value: a key under a wrong name is still a key. Before, each was dropped unread: the
    client sent no key, kept the 5-minute default, and verified the gateway against the
    system's CAs in place of the file named. An `apiKey` that is no string (a number, an
    object, a boolean, a Buffer, as JavaScript gives them) is a TypeError too, as Python's
    `api_key` of bytes is: before, it went out as its `String()`, `Bearer 42` or `Bearer
    [object Object]`; one with a carriage return or a NUL is refused as one with a newline
    is."""
    seen = await run_against(node_scenarios, gateway, "bad-client-options")
    assert seen == {
        "api-key-snake-case": "TypeError: options.api_key: GatewayClientOptions has no such "
        "option (the option is apiKey)",
        "default-timeout": "TypeError: options.defaultTimeout: GatewayClientOptions has no "
        "such option",
        "tls-string": "TypeError: tls: expected an object (TlsOptions), got string",
        "tls-snake-case": "TypeError: tls.ca_file: TlsOptions has no such option "
        "(the option is caFile)",
        "api-key-number": "TypeError: apiKey: expected a string, got number",
        "api-key-object": "TypeError: apiKey: expected a string, got object",
        "api-key-buffer": "TypeError: apiKey: expected a string, got object",
        "api-key-boolean": "TypeError: apiKey: expected a string, got boolean",
        "api-key-carriage-return": f"Error: {UNCARRIED_KEY}",
        "api-key-nul": f"Error: {UNCARRIED_KEY}",
    }
    assert "llmgw_key_under_a_wrong_name" not in json.dumps(seen)
    assert upstream.requests == []


async def test_node_client_sends_the_widest_values_each_field_holds(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """The checks refuse only what the wire cannot carry: a 64-bit seed as a bigint (up to
    2**63 - 1, exact) or as a safe integer, a uint32 TTL of 2**32 - 1, and null for a field
    left unset are sent; an int32 `maxTokens` of 2**31 - 1 reaches the gateway, which
    judges it (INVALID_ARGUMENT, past any model's output)."""
    seen = await run_against(node_scenarios, gateway, "edge-arguments")
    assert seen == {
        "widest": "answered",
        "max-int32": "INVALID_ARGUMENT",
        "min-safe-seed": "answered",
    }
    assert [request.body["seed"] for request in upstream.requests] == [
        2**63 - 1,
        -(2**53 - 1),
    ]


async def test_node_sends_a_typed_reasoning_effort(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`params.reasoningEffort` from the generated TypeScript enum reaches the upstream."""
    result = await run_against(node_scenarios, gateway, "reasoning-effort")
    assert result["content"] == "Hello from fake"
    assert [request.body["reasoning_effort"] for request in upstream.requests] == ["low"]


async def test_node_example_program_completes_and_streams(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """The documented example program prints the answer, the streamed text, usage and cost."""
    example = node_scenarios.example
    stdout = await run_program(
        example, "--address", gateway.server.address, "--model", "fake-model", "Say hi"
    )
    lines = stdout.splitlines()
    assert lines[0] == "complete: Hello from fake"
    assert lines[1] == "stream:   Hello from fake"
    assert lines[2].startswith("usage:    7 in, 3 out; cost $0.000002 via up0")
    assert len(upstream.requests) == 2


async def test_node_example_bounds_each_answer_with_max_tokens(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`--max-tokens N` reaches the upstream as both calls' `max_tokens`, as the Python
    CLI's does; left out, none is sent. A value that is no integer or outside
    1..2147483647 is a bad option, exit 2 before any call, in the Python CLI's words.
    Before, it was an unknown option, and the README's command against the quick start's
    local model ran each call until the model's window was full (about 45 s each)."""
    example = node_scenarios.example
    args = ("--address", gateway.server.address, "--model", "fake-model")
    await run_program(example, *args, "--max-tokens", "40", "Say hi")
    await run_program(example, *args, "--max-tokens=7", "Say hi")
    await run_program(example, *args, "Say hi")
    assert [request.body.get("max_tokens") for request in upstream.requests] == [
        *(40, 40),
        *(7, 7),
        *(None, None),
    ]
    for bad, said in [
        ("0", "0 is outside 1..2147483647"),
        ("2147483648", "2147483648 is outside 1..2147483647"),
        ("1.5", "'1.5' is not an integer"),
        ("x", "'x' is not an integer"),
    ]:
        returncode, stdout, stderr = await run_process(example, *args, "--max-tokens", bad, "hi")
        assert (returncode, stdout, stderr) == (2, "", f"example: --max-tokens: {said}\n")
    assert len(upstream.requests) == 6


async def test_node_example_whose_reader_left_exits_as_sigpipe_ends_a_program(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Piped into a reader that left (`| head`), the example program exits 141, as the
    Python CLI does, saying nothing. Before, its first answer line threw an unhandled
    EPIPE with a stack trace."""
    example = node_scenarios.example
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    try:
        process = await asyncio.create_subprocess_exec(
            "node",
            str(example),
            *("--address", gateway.server.address, "--model", "fake-model", "Say hi"),
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    async with asyncio.timeout(NODE_TIMEOUT_S):
        _, stderr = await process.communicate()
    assert (process.returncode, stderr.decode()) == (141, "")


async def test_node_example_whose_output_cannot_be_written_says_so_and_exits_1(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`example.js > answer.txt` on a full disk: one line saying so, exit status 1, as the
    Python CLI. Before, the answer's first line threw ENOSPC out of the program, a stack
    trace."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        process = await asyncio.create_subprocess_exec(
            "node",
            str(node_scenarios.example),
            *("--address", gateway.server.address, "--model", "fake-model", "Say hi"),
            stdout=full,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(full)
    async with asyncio.timeout(NODE_TIMEOUT_S):
        _, stderr = await process.communicate()
    said = "example: cannot write: no space left on device\n"
    assert (process.returncode, stderr.decode()) == (1, said)


async def test_node_example_stopped_by_ctrl_c_cancels_its_call_and_ends_by_sigint(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Ctrl-C (SIGINT) while the example's stream is open cancels the call (the gateway
    closes the upstream request and frees its slot) and ends the example by SIGINT,
    saying nothing, as the Python CLI does: a shell running it in a script stops the
    script (an exit of 130 is taken for a Ctrl-C handled, and a loop goes on)."""
    upstream.script(Reply(content="hi"), Reply(content="word " * 40, chunks=40, chunk_delay_s=0.5))
    process = await asyncio.create_subprocess_exec(
        "node",
        str(node_scenarios.example),
        *("--address", gateway.server.address, "--model", "fake-model", "Say hi"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(lambda: len(upstream.requests) == 2)  # the unary call, the stream
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(NODE_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (process.returncode, stderr.decode()) == (-signal.SIGINT, "")
    assert stdout.decode().startswith("complete: hi\nstream:   ")
    await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    await wait_until(lambda: gateway.server.admission.in_flight == 0)


async def test_node_example_asks_for_the_python_clis_default_model(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Without `--model` the example program asks for the model the Python CLI asks for,
    the quick start's local model. Before, it asked for deepseek-v4, and against the
    quick-start gateway every call was NOT_FOUND."""
    config = gateway_config(
        upstream.base_url,
        upstreams=[{"name": "up0", "base_url": upstream.base_url, "models": [DEFAULT_MODEL]}],
    )
    gateway = await start_gateway(config)
    example = node_scenarios.example
    stdout = await run_program(example, "--address", gateway.server.address, "Say hi")
    assert stdout.splitlines()[0] == "complete: Hello from fake"
    assert [request.body["model"] for request in upstream.requests] == [DEFAULT_MODEL] * 2


async def test_node_example_takes_its_address_from_the_python_clis_variable(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Without `--address` the example program calls the gateway $LLM_GATEWAY_ADDRESS
    names, as the Python CLI does; `--address` still wins over the variable."""
    example = node_scenarios.example
    address = gateway.server.address
    args = ("--model", "fake-model", "Say hi")
    from_variable = await run_program(example, *args, env={"LLM_GATEWAY_ADDRESS": address})
    assert from_variable.splitlines()[0] == "complete: Hello from fake"
    nowhere = {"LLM_GATEWAY_ADDRESS": "127.0.0.1:1"}  # nothing listens on port 1
    from_flag = await run_program(example, "--address", address, *args, env=nowhere)
    assert from_flag.splitlines()[0] == "complete: Hello from fake"
    assert len(upstream.requests) == 4


class DeadlineRecordingService(pb_grpc.CompletionServiceServicer):
    """Records the time each Complete call had left as it arrived, and refuses it."""

    def __init__(self) -> None:
        self.time_remaining_s: list[float | None] = []

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.time_remaining_s.append(context.time_remaining())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")


@contextlib.asynccontextmanager
async def deadline_recording_server() -> AsyncIterator[tuple[str, DeadlineRecordingService]]:
    """A `DeadlineRecordingService` on loopback: its address, and it."""
    server = grpc.aio.server()
    service = DeadlineRecordingService()
    pb_grpc.add_CompletionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        await server.stop(grace=None)


async def test_node_example_gives_its_calls_the_python_clis_timeout(
    node_scenarios: NodeScenarios,
) -> None:
    """The example's call has a deadline 300 s away, as the Python CLI's (the deadline
    the call arrives with, not a time measured), or `--timeout SECONDS`'s; a timeout that
    is no number, not above 0 or past 1e6 s is a bad option, exit 2 before any call.
    Before, each call had a fixed 60 s deadline and `--timeout` was an unknown option."""
    example = node_scenarios.example
    async with deadline_recording_server() as (address, service):
        for timeout in ([], ["--timeout", "7.5"]):
            returncode, _, stderr = await run_process(example, "--address", address, *timeout)
            assert (returncode, stderr.splitlines()[0]) == (1, "error: INVALID_ARGUMENT: refused")
        for bad, said in [
            ("x", "'x' is not a number of seconds"),
            ("0", "0 is not above 0 and at most 1e+06"),
            ("2e6", "2e6 is not above 0 and at most 1e+06"),
        ]:
            returncode, _, stderr = await run_process(
                example, "--address", address, "--timeout", bad
            )
            assert (returncode, stderr) == (2, f"example: --timeout: {said}\n")
    default_s, given_s = service.time_remaining_s
    assert default_s is not None
    assert 240 < default_s <= 300
    assert given_s is not None
    assert 0 < given_s <= 7.5


async def test_node_example_names_the_address_variable_whose_value_it_refuses(
    node_scenarios: NodeScenarios,
) -> None:
    """An invalid $LLM_GATEWAY_ADDRESS is a bad option naming the variable, exit 2, as in
    the Python CLI. Before, it was refused as though an `--address` had been given."""
    example = node_scenarios.example
    env = {"LLM_GATEWAY_ADDRESS": "127.0.0.1:70000"}
    returncode, stdout, stderr = await run_process(example, "Say hi", env=env)
    said = (
        'environment variable LLM_GATEWAY_ADDRESS: "127.0.0.1:70000": '
        "the port must be 1..65535, in digits alone"
    )
    assert (returncode, stdout, stderr) == (2, "", f"example: {said}\n")


async def test_node_example_names_the_api_key_variable_whose_value_it_refuses(
    node_scenarios: NodeScenarios,
) -> None:
    """A $LLM_GATEWAY_API_KEY gRPC metadata cannot carry (a stray newline) is a bad option
    naming the variable, exit 2, as in the Python CLI; an `--api-key` so, naming the
    option. Before, both were refused as the client's `apiKey`, an option never typed."""
    example = node_scenarios.example
    uncarried = "the caller key has characters gRPC metadata cannot carry (a stray newline?)"
    env = {"LLM_GATEWAY_API_KEY": "key\n"}
    returncode, stdout, stderr = await run_process(example, "Say hi", env=env)
    said = f"environment variable LLM_GATEWAY_API_KEY: {uncarried}"
    assert (returncode, stdout, stderr) == (2, "", f"example: {said}\n")
    returncode, stdout, stderr = await run_process(example, "--api-key=key\n", "Say hi", env=env)
    assert (returncode, stdout, stderr) == (2, "", f"example: --api-key: {uncarried}\n")


async def test_node_example_takes_its_api_key_from_the_flag_or_the_python_clis_variable(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Against a gateway with caller keys the example program authenticates with
    `--api-key`, else $LLM_GATEWAY_API_KEY, as the Python CLI does; without either it
    is refused UNAUTHENTICATED and exits 1. Before, it had no way to send a key."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    example = node_scenarios.example
    args = ("--address", gateway.server.address, "--model", "fake-model", "Say hi")
    from_variable = await run_program(example, *args, env={"LLM_GATEWAY_API_KEY": CALLER_KEY_A})
    assert from_variable.splitlines()[0] == "complete: Hello from fake"
    from_flag = await run_program(
        example, "--api-key", CALLER_KEY_A, *args, env={"LLM_GATEWAY_API_KEY": ""}
    )
    assert from_flag.splitlines()[0] == "complete: Hello from fake"
    returncode, _, stderr = await run_process(example, *args, env={"LLM_GATEWAY_API_KEY": ""})
    assert returncode == 1
    assert "UNAUTHENTICATED" in stderr
    usage = await gateway.stub.GetUsage(pb.GetUsageRequest(), metadata=as_tenant("team-a"))
    assert usage.total.requests == 4  # each program's unary call and its stream


async def test_node_example_refuses_a_key_with_a_stray_newline_without_printing_it(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A caller key gRPC metadata cannot carry (a newline a secret file left on it) is a
    bad option, exit status 2, as in the Python client: refused when the client is made,
    saying why but never the key. Before, grpc-js refused it at the first call with an
    error quoting the key, which the example printed with its stack."""
    example = node_scenarios.example
    key = CALLER_KEY_A + "\n"
    args = ("--address", gateway.server.address, "--model", "fake-model", "Say hi")
    for env in ({"LLM_GATEWAY_API_KEY": key}, {}):
        flags = () if env else ("--api-key", key)
        returncode, stdout, stderr = await run_process(example, *flags, *args, env=env)
        assert returncode == 2
        assert "characters gRPC metadata cannot carry" in stderr
        assert CALLER_KEY_A not in stdout + stderr
    assert upstream.requests == []


async def test_node_example_refuses_an_unknown_option_before_any_call(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A mistyped option is a bad option, exit status 2 before any call, as in the Python
    CLI; a prompt that begins with `--` goes after `--`. Before, `--modle fake-model` went
    out as the prompt "--modle fake-model Say hi", to the default model, and was billed."""
    example = node_scenarios.example
    address = ("--address", gateway.server.address)
    returncode, stdout, stderr = await run_process(example, *address, "--modle", "x", "Say hi")
    assert returncode == 2
    assert "unknown option --modle" in stderr
    assert stdout == ""
    assert upstream.requests == []
    await run_program(example, *address, "--model", "fake-model", "--", "--modle", "hi")
    assert [request.body["messages"][0]["content"] for request in upstream.requests] == [
        "--modle hi",
        "--modle hi",
    ]


async def test_node_example_takes_an_option_joined_to_its_value(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`--model=NAME` (and `--address=HOST:PORT`) is the option and its value, as the
    Python CLI takes them. Before, it was refused as an unknown option, told to go after
    `--` as a prompt."""
    example = node_scenarios.example
    await run_program(example, f"--address={gateway.server.address}", "--model=fake-model", "hi")
    assert {request.body["messages"][0]["content"] for request in upstream.requests} == {"hi"}


async def test_node_example_refuses_an_option_whose_value_is_the_next_option(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`--api-key --model gemma` is an option without its value, exit status 2 before any
    call, naming it but never the word after it (it may be a key); a value that begins
    with `--` goes as `--api-key=VALUE`. Before, "--model" went out as the caller key, and
    "gemma Say hi" as the prompt, to the default model."""
    example = node_scenarios.example
    address = ("--address", gateway.server.address)
    for flag, after in [("--api-key", "--model"), ("--model", "--tls"), ("--api-key", "--sk-a")]:
        returncode, stdout, stderr = await run_process(example, *address, flag, after, "hi")
        assert returncode == 2
        assert f"example: {flag} needs a value, not an option" in stderr
        assert f"goes as {flag}=VALUE" in stderr
        assert "sk-a" not in stderr
        assert stdout == ""
    assert upstream.requests == []
    await run_program(example, *address, "--model=fake-model", "--api-key=--not-an-option", "hi")
    assert [request.body["model"] for request in upstream.requests] == ["fake-model"] * 2


async def test_node_example_says_an_errors_facts_as_the_python_cli_does(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A failed call's ErrorInfo is said whole by the example program, its facts (the
    upstream, its HTTP status, the attempts) on the reason's line as the Python CLI writes
    them. Before, the example said the reason alone: which upstream failed, and how, was
    lost."""
    # A gateway for each client: the first refusal opens the upstream's circuit breaker.
    config = gateway_config(upstream.base_url, resilience={"attempts": 1})
    node_gateway, python_gateway = await start_gateway(config), await start_gateway(config)
    upstream.script(Status(401), Status(401))
    args = ("--address", node_gateway.server.address, "--model", "fake-model", "Say hi")
    returncode, _, stderr = await run_process(node_scenarios.example, *args)
    assert returncode == 1
    async with GatewayClient(python_gateway.server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as python:
            await client.complete("Say hi", model=FAKE_MODEL)
    described = error_details(python.value).describe().splitlines()
    (reason,) = [line for line in described if line.startswith("  reason ")]
    assert reason.startswith("  reason UPSTREAM_AUTH: ")
    assert "upstream=up0" in reason
    assert reason in stderr.splitlines()


async def test_node_example_refuses_an_llm_gateway_tls_neither_on_nor_off(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """$LLM_GATEWAY_TLS that is neither on nor off (`maybe`) exits 2 naming it, before any
    call, as the Python CLI does. Before, it connected in plaintext, sending the caller
    key unencrypted to a gateway the user meant to reach over TLS."""
    example = node_scenarios.example
    address = ("--address", gateway.server.address, "--model", "fake-model")
    returncode, stdout, stderr = await run_process(
        example, *address, "hi", env={"LLM_GATEWAY_TLS": "maybe"}
    )
    assert returncode == 2
    assert "environment variable LLM_GATEWAY_TLS: 'maybe' is neither on" in stderr
    assert stdout == ""
    assert upstream.requests == []
    returncode, _, _ = await run_process(example, *address, "hi", env={"LLM_GATEWAY_TLS": "off"})
    assert returncode == 0
    assert len(upstream.requests) == 2  # the example completes, then streams


async def test_node_stream_read_after_its_call_failed_throws_the_failure(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A stream whose call fails before the caller starts reading it (a model no upstream
    serves) throws the failure, decoded, when it is read. Before, grpc-js's 'error' event
    found no listener and crashed the caller's process."""
    result = await run_against(node_scenarios, gateway, "late-stream")
    assert result["code"] == "NOT_FOUND"
    assert result["details"]["errorInfo"]["reason"] == "MODEL_NOT_FOUND"
    assert result["kinds"] == []
    assert upstream.requests == []


async def test_node_stream_read_after_it_was_cut_gets_the_text_before_the_cut(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A stream cut mid-answer before the caller starts reading it yields the text the
    gateway sent, then throws the failure, as the Python client's does. Before, grpc-js
    dropped the messages nobody had read once the failed status came, and the loop got
    none of the text the gateway said it sent (and billed)."""
    upstream.script(Reply(content="one two three four five six", chunks=6, cut_after_events=4))
    result = await run_against(node_scenarios, gateway, "late-cut-stream")
    assert result["code"] == "UNAVAILABLE"
    info = result["details"]["errorInfo"]
    assert info["reason"] == "STREAM_INTERRUPTED"
    assert result["content"]
    assert len(result["content"]) == int(info["metadata"]["chars_sent"])
    assert len(result["kinds"]) == int(info["metadata"]["deltas_sent"])


async def test_node_stream_and_batch_read_again_say_they_were_read_already(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A stream or a batch read to its end, then looped over again, throws a TypeError
    saying its events were read already (they are not kept for a replay); a failed one
    throws its failure again. Before, the second loop yielded nothing, as though the call
    had answered nothing, and ended without a word."""
    seen = await run_against(node_scenarios, gateway, "read-again")
    said = "TypeError: this {} was read to its end already: its events are read once"
    for name, kind in [("stream", "CompletionStream"), ("batch", "BatchResults")]:
        assert seen[name]["first"] == "answered"
        assert seen[name]["again"].startswith(said.format(kind))
        assert seen[name]["eventsAgain"] == 0
    assert seen["failed"] == {"first": "NOT_FOUND", "again": "NOT_FOUND", "eventsAgain": 0}
    assert len(upstream.requests) == 2


async def test_node_stream_and_batch_read_by_two_loops_at_once_refuse_the_second(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """Two loops begun together over one stream or batch (`Promise.all` of a text reader
    and a tool call reader): the first reads every event, the second throws a TypeError
    saying another loop reads it, and the call goes on. Before, the events were split
    between the loops: here the second read none and ended without a word, as though the
    call had answered nothing. A first event read on an iterator of its own, then the
    rest by a loop, still reads every event."""
    seen = await run_against(node_scenarios, gateway, "read-by-two")
    said = "TypeError: this {} is being read by another loop: each event goes to one loop"
    stream_events = seen["stream"]["first"]["kinds"]
    assert stream_events[0] == "delta"
    for name, kind, events in [
        ("stream", "CompletionStream", [*stream_events[:-1], "final"]),
        ("batch", "BatchResults", ["response", "summary"]),
    ]:
        assert seen[name]["first"] == {"kinds": events, "outcome": "answered"}
        assert seen[name]["second"]["kinds"] == []
        assert seen[name]["second"]["outcome"].startswith(said.format(kind))
    assert seen["peeked"] == {"kinds": stream_events, "outcome": "answered"}
    assert len(upstream.requests) == 3


async def test_node_stream_prints_deltas_as_they_arrive(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """CompleteStream from Node yields each delta as the upstream sends it, then usage and cost."""
    chunk_delay_s = 0.15
    upstream.script(Reply(content="Hello from fake", chunks=3, chunk_delay_s=chunk_delay_s))
    result = await run_against(node_scenarios, gateway, "stream")
    deltas = result["deltas"]
    assert "".join(d["content"] for d in deltas) == "Hello from fake"
    assert len(deltas) == 3
    # Two upstream gaps separate the first delta from the last; buffering would collapse them.
    assert deltas[-1]["atMs"] - deltas[0]["atMs"] >= 0.5 * 2 * chunk_delay_s * 1000
    final = result["final"]
    assert final["finishReason"] == "FINISH_REASON_STOP"
    assert (final["inputTokens"], final["outputTokens"]) == (7, 3)
    assert final["costUsd"] == pytest.approx(expected_cost_usd(7, 3))


async def test_node_decodes_field_violations(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """An invalid request reaches Node as INVALID_ARGUMENT with every field violation decoded."""
    result = await run_against(node_scenarios, gateway, "invalid")
    assert result["code"] == "INVALID_ARGUMENT"
    fields = [v["field"] for v in result["details"]["fieldViolations"]]
    assert fields == ["messages[0].content", "params.temperature"]
    assert all(v["description"] for v in result["details"]["fieldViolations"])
    # INVALID_ARGUMENT is not retryable, here or on another replica, and nothing reached
    # the upstream.
    assert result["attempts"] == 1
    assert result["retryElsewhere"] is False
    assert upstream.requests == []


async def test_node_retry_policy_waits_out_overload_pushback(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Refused with RESOURCE_EXHAUSTED, Node's retry policy waits the pushback and succeeds."""
    pushback_s = 0.5
    gateway = await start_gateway(overload_config(upstream, pushback_s=pushback_s))
    # The holding stream ends about 0.6 s after its first delta: past the first retry,
    # well before the policy runs out of attempts (4 pushbacks = 2 s).
    upstream.script(Reply(content="hold the slot", chunks=2, chunk_delay_s=0.15))
    result = await run_against(node_scenarios, gateway, "overload-recovers")
    assert result["holdFirstEvent"] == "delta"
    assert result["content"] == "Hello from fake"
    assert 2 <= result["attempts"] <= max_attempts()
    # Each retry waited the server's pushback, not the policy's shorter backoff.
    assert result["elapsedMs"] >= (result["attempts"] - 1) * pushback_s * 1000
    # Refused attempts never reached the upstream: only the hold and the success did.
    assert len(upstream.requests) == 2


async def test_node_retry_policy_waits_out_overload_pushback_for_a_long_prompt(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A prompt of 1.5 MB (300k tokens, within a million-token model's window and the
    gateway's 2 MiB request limit) is retried after the overload pushback as a short one
    is. Before, it got the first RESOURCE_EXHAUSTED as its answer: grpc-js retries only a
    call whose request fits its retry buffer, 1 MiB unless the channel says otherwise."""
    config = gateway_config(
        upstream.base_url,
        server={"max_in_flight_calls": 1, "overload_retry_after_s": 0.5},
        models=fake_model_window(1_000_000),
    )
    gateway = await start_gateway(config)
    upstream.script(Reply(content="hold the slot", chunks=2, chunk_delay_s=0.15))
    address = gateway.server.address
    result = await run_node(
        node_scenarios, "overload-recovers", "--address", address, "--prompt-words", "300000"
    )
    assert result["content"] == "Hello from fake"
    assert 2 <= result["attempts"] <= max_attempts()
    assert len(upstream.requests) == 2


async def test_node_request_past_the_gateways_message_limit_is_sent_once(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A prompt past the gateway's `server.max_receive_message_bytes` (4 MiB), which gRPC
    refuses RESOURCE_EXHAUSTED with no pushback, goes out once and fails at once, as from
    the Python client. Before, the Node client's 16 MiB retry buffer let the retry policy
    send it five times: a 5.5 MB prompt uploaded 27 MB, over seconds of backoff."""
    words = 1_100_000  # "word " each: 5.5 MB
    relay = CountingRelay(gateway.server.address)
    async with relay as address:
        seen = await run_node(
            node_scenarios, "try-complete", "--address", address, "--prompt-words", str(words)
        )
    assert seen["code"] == "RESOURCE_EXHAUSTED"
    assert seen["attempts"] == 1
    assert relay.sent < 2 * len("word ") * words
    assert upstream.requests == []


async def test_node_overload_exhausts_attempts_and_decodes_retry_info(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """While the gateway stays full, Node retries maxAttempts times at the pushback, then fails."""
    pushback_s = 0.25
    gateway = await start_gateway(overload_config(upstream, pushback_s=pushback_s))
    upstream.script(Hang())
    hold = gateway.stub.Complete(chat("hold the slot"))
    try:
        await wait_until(lambda: len(upstream.requests) == 1)
        result = await run_against(node_scenarios, gateway, "overload-exhausted")
    finally:
        hold.cancel()
    assert result["code"] == "RESOURCE_EXHAUSTED"
    assert result["attempts"] == max_attempts()
    assert result["elapsedMs"] >= (max_attempts() - 1) * pushback_s * 1000
    assert result["pushbackMs"] == 250
    details = result["details"]
    assert details["retryDelayMs"] == pytest.approx(250)
    assert details["errorInfo"]["reason"] == "OVERLOADED"
    assert details["errorInfo"]["domain"] == "llmgateway.v1"
    # The llm-gateway-retry-elsewhere trailer: another replica may take it. Before, the
    # error kept none of the trailers, and a Node caller could not tell.
    assert result["retryElsewhere"] is True
    await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    assert len(upstream.requests) == 1


async def test_node_stream_that_stops_being_read_stalls_and_lets_go_of_the_upstream(
    node_scenarios: NodeScenarios, start_gateway: StartGateway
) -> None:
    """A Node caller that reads one event and then nothing for longer than
    `server.stalled_stream_timeout_s` stalls the stream as a Python caller does: the
    gateway closes the upstream request, and the caller reading on hears CALLER_STALLED.
    Before, the client read the whole answer into memory unasked, and the upstream
    generated (and billed) all of it for a caller that was not reading."""
    # Streamed for seconds: a fast upstream's whole answer waits in the gateway before
    # any stall, with no upstream request left to close.
    long_answer = Reply(content="x" * (4000 * 1000), chunks=1000, chunk_delay_s=0.003)
    async with FakeUpstream(default=long_answer) as upstream:
        gateway = await start_gateway(
            gateway_config(upstream.base_url, server={"stalled_stream_timeout_s": 0.5})
        )
        result = await run_after_go_ahead(
            node_scenarios,
            "stalled-stream",
            "--address",
            gateway.server.address,
            # The upstream request has ended: let go of, or answered whole.
            ready=lambda: len(upstream.requests) == 1 and checked_out_connections(gateway) == 0,
        )
    assert result["code"] == "DEADLINE_EXCEEDED", result
    assert result["details"]["errorInfo"]["reason"] == "CALLER_STALLED"
    assert 0 < result["chars"] < len(long_answer.content)
    assert upstream.disconnects == 1


@pytest.mark.parametrize("scenario", ["cancel", "abort-stream"])
async def test_node_cancelled_stream_closes_the_upstream_request(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway, scenario: str
) -> None:
    """Node cancelling a stream after its first delta (`cancel()`, or the signal in its
    options) closes the upstream request early."""
    upstream.script(Reply(content="word " * 20, chunks=20, chunk_delay_s=0.25))
    result = await run_against(node_scenarios, gateway, scenario)
    assert result == {"firstEvent": "delta", "afterCancel": "CANCELLED"}
    # The upstream notes a disconnect only for an answer closed before its end (about 5 s).
    await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    assert upstream.disconnects == 1
    await wait_until(lambda: gateway.server.admission.in_flight == 0)


@pytest.mark.parametrize(
    ("how", "answer"),
    [
        pytest.param(how, Reply(content="word " * 20, chunks=20), id=f"{how}-answered")
        for how in ("cancel", "abort", "return", "return-unstarted", "break")
    ]
    + [pytest.param("cancel", CutStream(after_chunks=6, content="a b c d e f g h"), id="cut")],
)
async def test_node_stream_left_after_its_messages_arrived_yields_none_of_them(
    node_scenarios: NodeScenarios,
    upstream: FakeUpstream,
    gateway: RunningGateway,
    how: str,
    answer: Reply | CutStream,
) -> None:
    """A slow Node reader that leaves a stream whose messages have all arrived, unread
    (`cancel()`, its signal, `return()` on its iterator or on one never read, `break`),
    reads none of them after, from that iterator or a new loop: the loop throws CANCELLED,
    as after a cancel mid-call, also when the call itself had failed. Before, the buffered
    events were yielded after the cancel (after a `break`, a later loop threw a bare
    AbortError)."""
    upstream.script(answer)
    args = ("--address", gateway.server.address, "--leave", how)
    result = await run_node(node_scenarios, "leave-buffered", *args)
    assert result == {"firstEvent": "delta", "after": [], "outcome": "CANCELLED"}
    assert len(upstream.requests) == 1


async def test_node_unary_call_aborted_by_its_signal_closes_the_upstream_request(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`complete(request, { signal })`: aborting once the upstream has the request rejects
    with the error a cancelled stream throws, and the gateway closes the upstream request."""
    upstream.script(Hang())
    result = await run_after_go_ahead(
        node_scenarios,
        "abort-complete",
        "--address",
        gateway.server.address,
        ready=lambda: len(upstream.requests) == 1,
    )
    assert (result["code"], result["message"]) == ("CANCELLED", "Cancelled on client")
    assert result["attempts"] == 1
    await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    await wait_until(lambda: gateway.server.admission.in_flight == 0)


async def test_node_client_closed_cancels_its_calls_in_flight(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`close()` cancels the client's calls still in flight (a stream never read too): each
    fails CANCELLED saying the client was closed, as in the Python client, the gateway
    closes their upstream requests, and the process ends. Before, grpc-js's close let them
    run on, and the process with them, until their deadline."""
    upstream.script(Hang(), Hang(), Hang(), Hang())
    result = await run_after_go_ahead(
        node_scenarios,
        "close-in-flight",
        "--address",
        gateway.server.address,
        ready=lambda: len(upstream.requests) == 4,
    )
    closed = {"code": "CANCELLED", "message": "the client was closed while the call was in flight"}
    assert result == {"complete": closed, "stream": closed, "batch": closed}
    for _ in range(4):
        await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    await wait_until(lambda: gateway.server.admission.in_flight == 0)


async def test_node_unary_call_with_an_aborted_signal_never_reaches_the_gateway(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A signal aborted before `complete` rejects it as cancelled without a connection to
    the gateway: the only way to it, a proxy, sees none until a call really goes out."""
    name = "gateway.test"
    port = int(gateway.server.address.rpartition(":")[2])
    async with ForwardProxy(hosts={name: ("127.0.0.1", port)}) as proxy:
        env = {"http_proxy": proxy.url, "https_proxy": proxy.url, "no_proxy": ""}
        address = f"{name}:{port}"
        args = ("--address", address)
        aborted = await run_node(node_scenarios, "aborted-before-complete", *args, env=env)
        assert (aborted["code"], aborted["message"]) == ("CANCELLED", "Cancelled on client")
        assert proxy.targets == []
        sent = await run_node(node_scenarios, "complete", *args, env=env)
        assert sent["content"] == "Hello from fake"
        assert proxy.targets == [address]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            QuotaExceeded("tenant budget spent", subject="tenant:acme", retry_after_s=1.5),
            {
                "quotaViolations": [
                    {"subject": "tenant:acme", "description": "tenant budget spent"}
                ],
                "retryDelayMs": 1500,
                "reason": "QUOTA_EXCEEDED",
            },
        ),
        (
            ContextWindowExceeded(estimated_tokens=5000, limit_tokens=4096),
            {"fields": ["messages"], "reason": "CONTEXT_WINDOW_EXCEEDED"},
        ),
        (
            UpstreamRateLimited("rate limited", upstream="up0", status=429, retry_after_s=2.0),
            {"retryDelayMs": 2000, "reason": "UPSTREAM_RATE_LIMITED"},
        ),
    ],
    ids=["quota", "context-window", "upstream-429"],
)
async def test_node_decodes_every_detail_the_gateway_packs(
    node_scenarios: NodeScenarios, error: GatewayError, expected: dict[str, Any]
) -> None:
    """The Node decoder reads the exact google.rpc.Status the gateway builds for each error."""
    status = to_rpc_status(error)
    encoded = base64.b64encode(status.SerializeToString()).decode()
    details = (await run_node(node_scenarios, "decode", "--status-base64", encoded))["details"]
    assert details["unknownTypeUrls"] == []
    assert details["errorInfo"]["reason"] == expected["reason"]
    assert details["quotaViolations"] == expected.get("quotaViolations", [])
    assert [v["field"] for v in details["fieldViolations"]] == expected.get("fields", [])
    assert details["retryDelayMs"] == (
        pytest.approx(expected["retryDelayMs"]) if "retryDelayMs" in expected else None
    )


async def test_node_decodes_details_packed_under_any_type_url_prefix_as_python(
    node_scenarios: NodeScenarios,
) -> None:
    """A detail whose type URL has another host than type.googleapis.com (a proxy's or
    another server's packing: the type is the URL's last segment) is decoded by Node as by
    the Python client. Before, Node read only type.googleapis.com/ and listed each such
    detail as of an unknown type."""
    status = to_rpc_status(
        QuotaExceeded("tenant budget spent", subject="tenant:acme", retry_after_s=1.5)
    )
    too_long = ContextWindowExceeded(estimated_tokens=5000, limit_tokens=4096)
    status.details.extend(to_rpc_status(too_long).details[:1])
    for detail in status.details:
        detail.type_url = detail.type_url.replace("type.googleapis.com/", "type.example.com/")
    python = status_details(status)
    assert python.unknown_type_urls == ()
    encoded = base64.b64encode(status.SerializeToString()).decode()
    details = (await run_node(node_scenarios, "decode", "--status-base64", encoded))["details"]
    assert details["unknownTypeUrls"] == []
    assert details["errorInfo"]["reason"] == python.reason
    assert [(v["subject"], v["description"]) for v in details["quotaViolations"]] == list(
        python.quota_violations
    )
    assert [(v["field"], v["description"]) for v in details["fieldViolations"]] == list(
        python.field_violations
    )
    assert python.retry_after_s is not None
    assert details["retryDelayMs"] == pytest.approx(python.retry_after_s * 1000)


@pytest.mark.parametrize("deadline_won", [False, True], ids=["same-code", "deadline-won"])
async def test_node_call_error_reads_the_trailers_details_only_for_its_own_code(
    node_scenarios: NodeScenarios, deadline_won: bool
) -> None:
    """A call whose deadline passed as the gateway sent its error fails
    DEADLINE_EXCEEDED with the gateway's status still in its trailer. Its details are
    of that other status (a RetryInfo, an upstream named), not of the deadline: they are
    left out, as the Python client leaves them out. Before, they were decoded as the
    call's own."""
    status = to_rpc_status(
        UpstreamRateLimited("rate limited", upstream="up0", status=429, retry_after_s=2.0)
    )
    encoded = base64.b64encode(status.SerializeToString()).decode()
    code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0] if deadline_won else status.code
    decoded = not deadline_won
    number = str(code)
    seen = await run_node(node_scenarios, "decode", "--status-base64", encoded, "--code", number)
    details = seen["details"]
    assert (details["errorInfo"] is not None) is decoded
    assert details["retryDelayMs"] == (pytest.approx(2000) if decoded else None)


async def test_node_call_error_survives_a_details_trailer_that_is_no_status(
    node_scenarios: NodeScenarios,
) -> None:
    """A call failed with a `grpc-status-details-bin` trailer that does not decode fails
    with its own code and message, and no details, from `complete` and from a stream's
    loop. Before, the decoding error was thrown from grpc-js's callback, where nobody
    could catch it, and ended the caller's process (a stream's loop threw it in place
    of the call's status)."""
    async with garbled_details_server() as address:
        unary = await run_node(node_scenarios, "try-complete", "--address", address)
        stream = await run_node(node_scenarios, "late-stream", "--address", address)
    no_details = {
        "fieldViolations": [],
        "quotaViolations": [],
        "retryDelayMs": None,
        "errorInfo": None,
        "unknownTypeUrls": [],
    }
    for seen in (unary, stream):
        assert (seen["code"], seen["message"]) == ("INVALID_ARGUMENT", "refused")
        assert seen["details"] == no_details


async def test_python_channel_with_service_config_honours_pushback(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A Python channel given clients/service_config.json retries an overload after the pushback."""
    pushback_s = 0.5
    gateway = await start_gateway(overload_config(upstream, pushback_s=pushback_s))
    upstream.script(Reply(content="hold the slot", chunks=2, chunk_delay_s=0.15))
    options = [("grpc.service_config", SERVICE_CONFIG.read_text()), ("grpc.enable_retries", 1)]
    async with grpc.aio.insecure_channel(gateway.server.address, options=options) as channel:
        stub = pb_grpc.CompletionServiceStub(channel)
        hold = stub.CompleteStream(chat_stream("hold the slot"))
        first = await hold.read()
        assert first.WhichOneof("event") == "delta"
        # Without the service config the same call is refused at once...
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.stub.Complete(chat())
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ...with it, the channel waits out the pushback until the slot frees up.
        started = time.monotonic()
        response = await stub.Complete(chat(), timeout=WAIT_S)
        elapsed_s = time.monotonic() - started
        last = first
        while (event := await hold.read()) is not grpc.aio.EOF:
            last = event
    assert response.content == "Hello from fake"
    assert elapsed_s >= pushback_s
    assert last.WhichOneof("event") == "final"


def test_service_config_retries_only_transient_codes_of_the_contract() -> None:
    """The shipped retry policy names the contract's service and retries only transient codes."""
    config = service_config()
    (method,) = config["methodConfig"]
    service = pb.DESCRIPTOR.services_by_name["CompletionService"].full_name
    assert method["name"] == [{"service": service}]
    policy = method["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    # gRPC caps maxAttempts at 5; more would be silently ignored.
    assert 2 <= policy["maxAttempts"] <= 5
    assert config["retryThrottling"]["maxTokens"] > 0


async def test_node_stream_gathers_reasoning_and_tool_calls(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A Node stream from a reasoning model calling tools: each delta carries its
    reasoning and tool-call pieces, and the stream gathers the reasoning and assembles the
    calls from their pieces."""
    calls = (
        ToolCallReply("call_1", "get_weather", '{"city": "Paris", "days": 3}'),
        ToolCallReply("call_2", "get_weather", '{"city": "Oslo"}'),
    )
    upstream.script(
        Reply(
            content="",
            reasoning="The user wants the weather; call the tool twice.",
            tool_calls=calls,
            finish_reason="tool_calls",
            chunk_delay_s=0.02,
        )
    )
    result = await run_against(node_scenarios, gateway, "stream-tools")
    assert result["reasoning"] == "The user wants the weather; call the tool twice."
    assert result["toolCalls"] == [
        {"id": call.id, "name": call.name, "arguments": call.arguments} for call in calls
    ]
    assert sum(result["pieces"]) > len(calls)  # the arguments came in several pieces
    assert upstream.requests[-1].body["tools"][0]["function"]["name"] == "get_weather"


async def test_node_batch_streams_each_result_a_decoded_failure_and_the_summary(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`client.completeBatch` yields each item's answer, or its failure with the
    `google.rpc.Status` decoded as a failed call's (code name, message, field violations),
    then the summary. Before, the Node client had no completeBatch: a caller used the
    generated stub, and unpacked each item's status by hand."""
    result = await run_against(node_scenarios, gateway, "batch")
    answered, refused, summary = result["events"]
    assert answered == {"kind": "response", "id": "0", "index": 0, "content": "Hello from fake"}
    assert (refused["kind"], refused["id"], refused["index"]) == ("error", "hot", 1)
    error = refused["error"]
    assert (error["code"], error["codeName"]) == (3, "INVALID_ARGUMENT")
    assert [v["field"] for v in error["details"]["fieldViolations"]] == ["params.temperature"]
    assert error["details"]["unknownTypeUrls"] == []
    assert summary == {
        "kind": "summary",
        "succeeded": 1,
        "failed": 1,
        "tokens": [7, 3],
        "costUsd": pytest.approx(expected_cost_usd(7, 3)),
    }
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("how", ["break", "return", "throw", "cancel", "abort"])
async def test_node_batch_left_early_cancels_the_items_in_flight(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway, how: str
) -> None:
    """A batch left while an item runs (`break`, `return()` on its iterator, an exception
    in the loop's body, `cancel()`, its signal) cancels the call: the gateway closes that
    item's upstream request and starts no other, and a later loop yields nothing more and
    throws CANCELLED."""
    upstream.script(Reply(content="first"), Hang())
    result = await run_after_go_ahead(
        node_scenarios,
        "leave-batch",
        "--address",
        gateway.server.address,
        "--leave",
        how,
        ready=lambda: len(upstream.requests) == 2,
    )
    assert result["first"] == {"kind": "response", "id": "0", "index": 0, "content": "first"}
    left = {
        "break": "answered",
        "return": "answered",
        "throw": "Error: the caller's own",
        "cancel": "CANCELLED",
        "abort": "CANCELLED",
    }[how]
    assert (result["left"], result["after"], result["outcome"]) == (left, [], "CANCELLED")
    await upstream.wait_for_disconnect(timeout_s=WAIT_S)
    await wait_until(lambda: gateway.server.admission.in_flight == 0)
    assert len(upstream.requests) == 2  # the third item never started


async def test_node_batch_over_max_items_fails_whole_with_its_field_violation(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A batch of more items than `batch.max_items` throws GatewayCallError
    INVALID_ARGUMENT from its loop, the violation on `items` decoded, and yields nothing."""
    gateway = await start_gateway(gateway_config(upstream.base_url, batch={"max_items": 2}))
    result = await run_against(node_scenarios, gateway, "batch-refused")
    assert (result["code"], result["events"]) == ("INVALID_ARGUMENT", [])
    (violation,) = result["details"]["fieldViolations"]
    assert violation["field"] == "items"
    assert "at most 2 items" in violation["description"]
    assert upstream.requests == []


async def test_node_summarize_returns_the_summary_its_chunks_and_usage(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """`client.summarize` resolves with the SummarizeResponse: the summary, chunks and
    levels, usage and cost. Before, the Node client had no summarize."""
    upstream.script(Reply(content="A summary."))
    result = await run_against(node_scenarios, gateway, "summarize")
    assert result == {
        "summary": "A summary.",
        "chunks": 1,
        "levels": 1,
        "tokens": [7, 3],
        "costUsd": pytest.approx(expected_cost_usd(7, 3)),
        "upstreamCalls": 1,
        "finishReason": "FINISH_REASON_STOP",
    }
    assert upstream.requests[0].body["max_tokens"] == 64


async def test_node_usage_pages_reads_every_page_and_get_usage_one(
    node_scenarios: NodeScenarios, gateway: RunningGateway
) -> None:
    """`client.usagePages` yields GetUsage's pages in order, each with the whole total,
    from the first or from a page's token; `getUsage` reads one page and rejects a
    negative page size or a token sent with another query as INVALID_ARGUMENT on that
    field, and a page size no int32 holds before any call, as it does a `Date` for a
    Timestamp and a `Map` for the labels, which went out as 1970 and as no filter: every
    row. Before, the Node client had no call for GetUsage, and the gateway no pages."""
    for n in range(5):
        await gateway.stub.Complete(chat(labels={"request_id": f"r{n}"}))
    result = await run_against(node_scenarios, gateway, "usage-pages")
    assert result == {
        "pages": [["r0", "r1"], ["r2", "r3"], ["r4"]],
        "totals": [5, 5, 5],
        "resumed": [["r2", "r3", "r4"]],
        "negative": {"code": "INVALID_ARGUMENT", "fields": ["page_size"]},
        "foreign": {"code": "INVALID_ARGUMENT", "fields": ["page_token"]},
        "notInt32": "RangeError: pageSize must be an integer -2147483648..2147483647; got 1.5",
        "startDate": "TypeError: startTime: expected a Timestamp object, got Date "
        "({ seconds: Math.floor(date.getTime() / 1000), nanos: 0 } is one)",
        "labelsMap": "TypeError: labels: expected an object, got Map "
        "(Object.fromEntries(map) is one)",
    }


async def test_node_list_models_reads_the_catalog_with_the_clients_key_as_python(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """`client.listModels()` reads the model catalog (each model's window and its
    upstreams' health) as the Python client's `list_models` does, with the client's key;
    without a key the gateway refuses it, UNAUTHENTICATED decoded. Before, the Node client
    had no listModels: a caller used the generated stub, without the key or a deadline."""
    gateway = await start_gateway(secure_config(upstream.base_url))
    address = gateway.server.address
    node = await run_node(
        node_scenarios, "list-models", "--address", address, "--api-key", CALLER_KEY_A
    )
    async with GatewayClient(address, api_key=CALLER_KEY_A) as client:
        python = await client.list_models()
    assert node["models"] == [
        {
            "name": model.name,
            "contextWindow": model.context_window,
            "upstreams": [[u.name, pb.UpstreamHealth.Name(u.health)] for u in model.upstreams],
        }
        for model in python.models
    ]
    assert FAKE_MODEL in [model["name"] for model in node["models"]]
    unkeyed = await run_node(node_scenarios, "list-models", "--address", address)
    assert unkeyed["code"] == "UNAUTHENTICATED"


async def test_node_summarize_of_an_unknown_model_rejects_not_found_decoded(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A Summarize the gateway refuses rejects with GatewayCallError, its ErrorInfo
    decoded: NOT_FOUND, MODEL_NOT_FOUND, for a model no upstream serves."""
    address = gateway.server.address
    result = await run_node(node_scenarios, "summarize", "--address", address, "--model", "nope")
    assert result["code"] == "NOT_FOUND"
    assert result["details"]["errorInfo"]["reason"] == "MODEL_NOT_FOUND"
    assert result["details"]["errorInfo"]["domain"] == "llmgateway.v1"
    assert upstream.requests == []


async def test_node_batch_and_summarize_take_the_deadlines_complete_takes(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A batch and a summary without `timeoutMs` get the client's `defaultTimeoutMs`
    (against a hung upstream they end, DEADLINE_EXCEEDED), and a `timeoutMs` they cannot
    keep is a RangeError before any call, as for `complete`."""
    upstream.script(Hang(), Hang())
    address = gateway.server.address
    args = ("--address", address, "--default-timeout-ms", "500")
    timed = await run_node(node_scenarios, "timed-batch-and-summary", *args)
    # The gateway counts the deadline from the call's arrival: the client's own passes first,
    # so the call fails; its item's own DEADLINE_EXCEEDED may just come before it on a loaded
    # machine (the two deadlines are a network hop apart), never any other event.
    assert (timed["batch"], timed["summarize"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    assert timed["events"] in ([], ["DEADLINE_EXCEEDED"])
    refused = "RangeError: timeoutMs must be at most 1000000000 ms, or null for no deadline"
    args = ("--address", address, "--timeout-ms", "NaN")
    too_long = await run_node(node_scenarios, "timed-batch-and-summary", *args)
    assert too_long == {
        "batch": f"{refused}; got NaN",
        "events": [],
        "summarize": f"{refused}; got NaN",
    }
    assert len(upstream.requests) == 2


# What completeBatch and summarize throw for each of their bad requests (scenarios.ts).
REFUSED_BATCHES = {
    "item-max-tokens-fraction": "RangeError: items[0].request.params.maxTokens must be an "
    f"integer {INT32_RANGE}; got 1.5",
    "item-snake-case": "TypeError: items[0].request.idempotency_key: CompleteRequest has no "
    "such field (the field is idempotencyKey)",
    "concurrency-negative": "RangeError: concurrency must be an integer 0..4294967295; got -1",
    "items-object": "TypeError: items: expected an array, got object",
    "undefined": "TypeError: request: expected a CompleteBatchRequest object, got undefined",
}
REFUSED_SUMMARIES = {
    "target-tokens-negative": "RangeError: targetTokens must be an integer 0..4294967295; got -1",
    "target-tokens-snake-case": "TypeError: target_tokens: SummarizeRequest has no such field "
    "(the field is targetTokens)",
    "document-number": "TypeError: document: expected a string, got number",
    "effort-name": "TypeError: reasoningEffort: expected a ReasoningEffort "
    "(ReasoningEffort.REASONING_EFFORT_NONE, ...), got string",
    "undefined": "TypeError: request: expected a SummarizeRequest object, got undefined",
}


async def test_node_batch_and_summarize_refuse_bad_arguments_before_any_call(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, gateway: RunningGateway
) -> None:
    """A batch or summary request with a field its type cannot hold (an item's too), a name
    its message has no field for, or no request at all, and options that are not
    CallOptions, are a TypeError or RangeError naming it, as for `complete`, and nothing
    reaches the gateway: the only way to it, a proxy, sees no connection."""
    name = "gateway.test"
    port = int(gateway.server.address.rpartition(":")[2])
    async with ForwardProxy(hosts={name: ("127.0.0.1", port)}) as proxy:
        env = {"http_proxy": proxy.url, "https_proxy": proxy.url, "no_proxy": ""}
        address = f"{name}:{port}"
        seen = await run_node(
            node_scenarios, "bad-batch-and-summary", "--address", address, env=env
        )
        assert proxy.targets == []
    assert seen["batches"] == REFUSED_BATCHES
    assert seen["summaries"] == REFUSED_SUMMARIES
    refused = REFUSED_OPTIONS["null"]
    assert seen["options"] == {"batch": refused, "summarize": refused}
    assert upstream.requests == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, two clients and an untrusted one."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(upstream: FakeUpstream, pki: Pki, *, mtls: bool = False) -> Any:
    """A gateway serving TLS; with `mtls`, only to clients with a certificate from the CA,
    whose CN names the tenant (team-a may use fake-model)."""
    tls: dict[str, Any] = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if not mtls:
        return gateway_config(upstream.base_url, server={"listen": "127.0.0.1:0", "tls": tls})
    tls |= {
        "client_ca_file": str(pki.ca),
        "require_client_cert": True,
        "tenant_from_cert_subject": True,
    }
    return secure_config(
        upstream.base_url,
        server={"listen": "127.0.0.1:0", "tls": tls},
        tenants={"team-a": {"allowed_models": ["fake-model"]}},
    )


def rogue_ca(pki: Pki) -> Path:
    """The certificate of a CA that signed nothing the gateway serves."""
    return pki.ca.with_name("rogue-ca.pem")


async def test_node_client_completes_over_tls_with_a_ca_file(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway, pki: Pki
) -> None:
    """`tls: { caFile }` verifies a TLS gateway against that CA and is served; the
    plaintext default is refused by the same port."""
    gateway = await start_gateway(tls_config(upstream, pki))
    address = gateway.server.address
    served = await run_node(
        node_scenarios, "complete", "--address", address, "--ca-file", str(pki.ca)
    )
    assert served["content"] == "Hello from fake"
    plaintext = await run_node(node_scenarios, "try-complete", "--address", address)
    assert plaintext["code"] == "UNAVAILABLE"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("pems", ["files", "bytes"])
async def test_node_client_completes_over_mtls_with_its_certificate(
    node_scenarios: NodeScenarios,
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    pki: Pki,
    pems: str,
) -> None:
    """With a client certificate and key (files, or their bytes) the Node client is served
    by a gateway requiring mTLS, as the certificate's tenant (no key sent); without the
    certificate the handshake fails."""
    gateway = await start_gateway(tls_config(upstream, pki, mtls=True))
    cert, key = pki.client_a
    trust = ["--address", gateway.server.address, "--ca-file", str(pki.ca)]
    bytes_flag = ["--pem-bytes"] if pems == "bytes" else []
    served = await run_node(
        node_scenarios, "complete", *trust, "--cert-file", str(cert), "--key-file", str(key),
        *bytes_flag,
    )  # fmt: skip
    assert served["content"] == "Hello from fake"
    anonymous = await run_node(node_scenarios, "try-complete", *trust, *bytes_flag)
    assert anonymous["code"] == "UNAVAILABLE"
    assert len(upstream.requests) == 1


async def test_node_client_fails_unavailable_when_the_gateways_ca_is_not_the_one_given(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway, pki: Pki
) -> None:
    """A gateway certificate the given CA did not sign fails the handshake: UNAVAILABLE
    saying why once the retry policy's attempts are spent, not the call's deadline run
    out (DEADLINE_EXCEEDED), and nothing reaches the upstream."""
    gateway = await start_gateway(tls_config(upstream, pki))
    result = await run_node(
        node_scenarios,
        "try-complete",
        "--address",
        gateway.server.address,
        "--ca-file",
        str(rogue_ca(pki)),
    )
    assert result["code"] == "UNAVAILABLE"
    assert "certificate" in result["message"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    "case",
    [
        ({"--cert-file": "team-a.pem"}, "a client certificate and its key go together"),
        ({"--key-file": "team-a.key"}, "a client certificate and its key go together"),
        ({"--ca-file": "ca.key"}, "no PEM certificate in {ca.key}"),
    ],
    ids=["cert-without-key", "key-without-cert", "ca-not-a-certificate"],
)
async def test_node_client_refuses_tls_options_it_cannot_use(
    node_scenarios: NodeScenarios,
    upstream: FakeUpstream,
    gateway: RunningGateway,
    pki: Pki,
    case: tuple[dict[str, str], str],
) -> None:
    """A client certificate without its key (or a key without its certificate), or a CA
    file holding no certificate, is refused when the client is made, saying so; no call is
    made. (Node takes such a CA and trusts nothing: every handshake would fail instead.)"""
    given, said = case
    files = {"--ca-file": "ca.pem"} | given
    options = [arg for flag, name in files.items() for arg in (flag, str(pki.ca.parent / name))]
    result = await run_node(
        node_scenarios, "complete", "--address", gateway.server.address, *options
    )
    assert result["refused"].startswith(
        "tls: " + said.replace("{ca.key}", str(pki.ca.parent / "ca.key"))
    )
    assert upstream.requests == []


async def test_node_tls_verifies_the_gateway_against_the_systems_cas(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway, pki: Pki
) -> None:
    """`tls: {}` verifies against the system's CA bundle ($SSL_CERT_FILE names it here),
    which grpc-js alone does not read (it trusts Node's built-in public roots), plus
    $NODE_EXTRA_CA_CERTS, which Node drops once the CAs are given."""
    gateway = await start_gateway(tls_config(upstream, pki))
    args = ("try-complete", "--address", gateway.server.address, "--tls")
    trusted = await run_node(node_scenarios, *args, env={"SSL_CERT_FILE": str(pki.ca)})
    assert trusted["content"] == "Hello from fake"
    rogue = {"SSL_CERT_FILE": str(rogue_ca(pki))}
    assert (await run_node(node_scenarios, *args, env=rogue))["code"] == "UNAVAILABLE"
    extra = await run_node(node_scenarios, *args, env=rogue | {"NODE_EXTRA_CA_CERTS": str(pki.ca)})
    assert extra["content"] == "Hello from fake"
    assert len(upstream.requests) == 2


async def test_node_tls_refuses_a_system_ca_bundle_that_holds_no_certificate(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway, pki: Pki
) -> None:
    """`tls: {}` with $SSL_CERT_FILE naming a file that holds no certificate (a key, a DER
    file) is refused when the client is made, naming the file, and the example exits 2
    saying so, as the Python CLI's `--tls`. Before, Node took the bundle and trusted
    nothing: every call failed UNAVAILABLE, the handshake blaming the gateway's
    certificate."""
    gateway = await start_gateway(tls_config(upstream, pki))
    key = pki.ca.parent / "ca.key"
    env = {"SSL_CERT_FILE": str(key), "NODE_EXTRA_CA_CERTS": ""}
    said = (
        f"tls: the system's CA bundle, $SSL_CERT_FILE {key}, holds no PEM certificate to "
        "verify the gateway with (give caFile)"
    )
    args = ("--address", gateway.server.address, "--tls")
    assert await run_node(node_scenarios, "try-complete", *args, env=env) == {"refused": said}
    returncode, _, stderr = await run_process(node_scenarios.example, *args, env=env)
    assert (returncode, stderr) == (2, f"example: {said}\n")
    assert upstream.requests == []


async def test_node_example_connects_with_mtls_from_the_python_clis_variables(
    node_scenarios: NodeScenarios, upstream: FakeUpstream, start_gateway: StartGateway, pki: Pki
) -> None:
    """The example program takes the Python CLI's TLS variables (and flags): with
    LLM_GATEWAY_CA_FILE, _CERT_FILE and _KEY_FILE it is served by an mTLS gateway; a
    certificate without its key is a bad option, exit status 2."""
    gateway = await start_gateway(tls_config(upstream, pki, mtls=True))
    example = node_scenarios.example
    cert, key = pki.client_a
    base = ("--address", gateway.server.address, "--model", "fake-model", "Say hi")
    env = {
        "LLM_GATEWAY_CA_FILE": str(pki.ca),
        "LLM_GATEWAY_CERT_FILE": str(cert),
        "LLM_GATEWAY_KEY_FILE": str(key),
    }
    stdout = await run_program(example, *base, env=env)
    assert stdout.splitlines()[0] == "complete: Hello from fake"
    returncode, _, stderr = await run_process(
        example, *base, "--ca-file", str(pki.ca), "--cert-file", str(cert)
    )
    assert returncode == 2
    assert "--cert-file and --key-file go together" in stderr
    assert len(upstream.requests) == 2
