"""README's Python examples run as written: they compile, paste into the asyncio REPL, and
name models the shipped config serves."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from service.config import GatewayConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Fenced blocks, also those indented under a list item.
PYTHON_BLOCKS = [
    textwrap.dedent(body)
    for _, body in re.findall(r"^([ \t]*)```python\n(.*?)^\1```", README, re.S | re.M)
]
# The YAML blocks that are gateway configs (all their keys its sections), not a
# Kubernetes patch or a Prometheus job.
_SECTIONS = {field.name for field in dataclasses.fields(GatewayConfig)}
CONFIG_BLOCKS = [
    data
    for _, body in re.findall(r"^([ \t]*)```yaml\n(.*?)^\1```", README, re.S | re.M)
    if isinstance(data := yaml.safe_load(textwrap.dedent(body)), dict) and set(data) <= _SECTIONS
]
# The Node example program's command lines (a line continued with `\` included).
NODE_EXAMPLE_COMMANDS = re.findall(
    r"^node dist/clients/node/src/example\.js .*(?:\n  .*)*", README, re.M
)


def test_readme_has_python_examples() -> None:
    """The pattern finds the examples, so the tests below check something."""
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_a_python_example_compiles(block: str) -> None:
    """Each example is Python (top-level `await` and `async with` allowed, as in the
    `python -m asyncio` REPL the README offers)."""
    compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_a_python_example_pastes_into_the_repl(block: str) -> None:
    """No blank line inside an indented block: pasted into a REPL, the blank line ends the
    block, and the rest fails with IndentationError (the quick start's example did)."""
    lines = block.splitlines()
    inside = [
        number
        for number, (blank, following) in enumerate(itertools.pairwise(lines), 1)
        if not blank.strip() and following[:1] in (" ", "\t")
    ]
    assert inside == []


def test_python_examples_name_models_the_shipped_config_serves() -> None:
    """`model="..."` in an example is a model `config/gateway.yaml` serves (a preset's or
    the local model), so an example run against `make run` is never NOT_FOUND for its
    name alone (the tool-call example named `deepseek-chat`, which no preset serves)."""
    config = load_config(ROOT / "config" / "gateway.yaml", environ={})
    served = {name for upstream in config.upstreams for name in upstream.models}
    served.add(config.local_model.model)
    named = {name for block in PYTHON_BLOCKS for name in re.findall(r'model="([^"]+)"', block)}
    assert named
    assert named <= served, named - served


def test_the_node_examples_tls_files_are_the_worked_examples() -> None:
    """The Node example runs in clients/node (after `cd clients/node`), so its PEM paths,
    read from there, name the worked TLS example's files in pki/ at the repository's root.
    They said `pki/ca.pem`, which the example could not open (ENOENT) from clients/node."""
    paths = [
        path
        for line in NODE_EXAMPLE_COMMANDS
        for path in re.findall(r"--(?:ca|cert|key)-file (\S+)", line)
    ]
    assert paths
    for path in paths:
        assert (ROOT / "clients" / "node" / path).resolve().parent == ROOT / "pki", path


def test_the_node_example_against_the_quick_start_gateway_bounds_its_answers() -> None:
    """The Node example's command against the quick start's gateway (127.0.0.1:50051,
    the local model by default) passes `--max-tokens`, as the quick start's `complete`
    does. Without it the local model answered each of the example's two calls until its
    2048-token window was full, about 45 s each on 2 cores."""
    quick_start = [line for line in NODE_EXAMPLE_COMMANDS if "127.0.0.1:50051" in line]
    assert quick_start
    for line in quick_start:
        assert re.search(r"--max-tokens[ =][1-9]\d*\b", line), line


def test_python_examples_await_every_unary_stub_call() -> None:
    """Every stub the README makes is a `grpc.aio` one (`GatewayClient.stub` too), whose
    unary call must be awaited: the JSON-answers example called `stub.Complete(...)` bare
    and read `.content` of the call object (AttributeError: 'UnaryUnaryCall')."""
    unawaited = [
        call.group(0)
        for block in PYTHON_BLOCKS
        for call in re.finditer(
            r"(?<!await )\bstub\.(?:Complete|Summarize|ListModels|GetUsage)\(", block
        )
    ]
    assert unawaited == []


def test_readme_has_config_examples() -> None:
    """The pattern finds the config examples, so the test below checks something."""
    assert len(CONFIG_BLOCKS) >= 5


@pytest.mark.parametrize("data", CONFIG_BLOCKS)
def test_a_config_example_is_a_valid_config(data: dict[str, object]) -> None:
    """Each config example is one the gateway starts with as written (the password its
    `redis_password_env` names set): no key of an older release, no value out of range."""
    parse_config(data, source="README.md", environ={"REDIS_PASSWORD": "secret"})
