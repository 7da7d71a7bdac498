"""Static checks of the deployment assets in deploy/ (Dockerfile, Kubernetes, Envoy).

No cluster, Docker daemon or Envoy binary is needed: every Kubernetes object is checked
against the Kubernetes API's own schema (`kubernetes-validate`, strict: an unknown or
misspelt field fails), and the files' cross-references are checked (probes against the
config's grace period, Services against pod labels, Envoy against the headless Service,
Secret references against upstream key names).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.config import GatewayConfig, LocalModelConfig, load_config, parse_config
from service.errors import RETRY_ELSEWHERE_TRAILER
from service.workers import worker_configs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
ENVOY = DEPLOY / "envoy"
GRPC_PORT = 50051

# Config sections whose state replicas share through Redis, each with its own redis_url.
REDIS_SECTIONS = frozenset({"cache", "ledger", "auth"})

# The oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1, gRPC
# probes are all GA by then), and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

# What a real provider key looks like (OpenAI-style secret keys).
REAL_LOOKING_KEY = re.compile(r"sk-[A-Za-z0-9]{20,}")


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    """The file's documents, fresh objects each call (tests mutate them): the checks read
    the manifests dozens of times a test, and pure-Python YAML parsing took seconds."""
    return copy.deepcopy(_parsed(path.read_text(encoding="utf-8")))


@functools.cache
def _parsed(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# Objects of a custom resource (the Prometheus Operator's): no schema of the Kubernetes API
# covers them, so they are checked by their own tests.
CUSTOM_API_GROUPS = frozenset({"monitoring.coreos.com"})


def _manifests(*, custom: bool = False) -> Iterator[dict[str, Any]]:
    """Every Kubernetes object in deploy/ (documents with apiVersion and kind), those of
    a custom resource only if `custom`."""
    for path in _yaml_files():
        for doc in _documents(path):
            if "apiVersion" not in doc or doc.get("kind", "Kustomization") == "Kustomization":
                continue
            if custom or doc["apiVersion"].partition("/")[0] not in CUSTOM_API_GROUPS:
                yield doc


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [m for m in _manifests() if m["kind"] == kind]


def _gateway_deployments() -> list[dict[str, Any]]:
    """Deployments that run the llm-gateway image."""
    return [
        d
        for d in _of_kind("Deployment")
        if any(c["image"].startswith("llm-gateway") for c in _containers(d))
    ]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def _gateway_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in _containers(deployment) if c["image"].startswith("llm-gateway"))


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal env values, with Kubernetes' $(VAR) references expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
    return env


def _production_config() -> GatewayConfig:
    """deploy/kubernetes/gateway.yaml with the environment of the gateway's pods applied:
    the image's variables, then the Deployment's."""
    (data,) = _documents(KUBE / "gateway.yaml")
    env = {**_image_env(), **_plain_env(_gateway_container(_gateway_deployments()[0]))}
    return parse_config(data, source="deploy/kubernetes/gateway.yaml", environ=env)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continued lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = re.sub(r"\\\n", " ", text).splitlines()
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _image_env() -> dict[str, str]:
    """The variables the image's runtime stage (the last) sets with ENV."""
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    for keyword, arguments in instructions[last_from:]:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _image_config(tmp_path: Path) -> Path:
    """/etc/llm-gateway/gateway.yaml as the image's build writes it."""
    made = subprocess.run(
        ["sed", "-f", str(DEPLOY / "image-config.sed"), str(ROOT / "config" / "gateway.yaml")],
        check=True,
        capture_output=True,
        text=True,
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(made.stdout, encoding="utf-8")
    return path


def _kustomization(directory: Path) -> dict[str, Any]:
    (loaded,) = _documents(directory / "kustomization.yaml")
    return loaded


def _envoy() -> dict[str, Any]:
    (loaded,) = _documents(ENVOY / "envoy.yaml")
    return loaded


def _prestop_sleep_s(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    """Every YAML file under deploy/ parses and holds at least one document."""
    assert _documents(path), f"{path} is empty"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_object_matches_the_api_schema(version: str) -> None:
    """Each manifest is a valid object of its kind, with no unknown or misspelt field."""
    manifests = list(_manifests())
    assert {m["kind"] for m in manifests} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "NetworkPolicy",
    }
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """The check above would fail on a typo, e.g. `readinessProbe` spelt wrong."""
    deployment = _gateway_deployments()[0]
    container = _gateway_container(deployment)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_kubernetes_object_has_a_name_and_no_namespace() -> None:
    """Every manifest names itself and leaves the namespace to the operator."""
    manifests = list(_manifests(custom=True))
    assert len(manifests) >= 7
    for manifest in manifests:
        assert manifest["metadata"]["name"]
        assert "namespace" not in manifest["metadata"], manifest["metadata"]["name"]


def test_gateway_deployment_probes_grpc_health_on_the_grpc_port() -> None:
    """The gateway's startup, readiness and liveness probes are native gRPC probes on 50051."""
    deployments = _gateway_deployments()
    assert deployments
    for deployment in deployments:
        container = _gateway_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
        assert {"containerPort": GRPC_PORT, "name": "grpc", "protocol": "TCP"} in container["ports"]


def test_termination_grace_covers_prestop_and_the_configs_drain() -> None:
    """terminationGracePeriodSeconds exceeds preStop sleep plus the config's grace_period_s."""
    grace_period_s = _production_config().server.grace_period_s
    for deployment in _gateway_deployments():
        spec = deployment["spec"]["template"]["spec"]
        prestop_s = _prestop_sleep_s(_gateway_container(deployment))
        assert prestop_s >= 1
        assert spec["terminationGracePeriodSeconds"] > prestop_s + grace_period_s


def test_production_config_is_valid_and_listens_on_every_interface() -> None:
    """The ConfigMap's config validates, listens on 0.0.0.0:50051 and never starts llama.cpp."""
    config = _production_config()
    assert config.server.listen == f"0.0.0.0:{GRPC_PORT}"
    assert config.local_model.enabled == "never"
    assert {u.name for u in config.upstreams} == {"holysheep", "deepseek", "openai"}


STATE_REDIS_URL = "redis://llm-gateway-redis:6379/0"
CACHE_REDIS_URL = "redis://llm-gateway-redis:6380/0"


def test_production_config_shares_state_through_redis() -> None:
    """Cache, ledger and caller keys (with tenant limits) all use the Deployment's Redis:
    the cache its own server, the rest the state server."""
    config = _production_config()
    assert config.cache.backend == "redis"
    assert config.cache.redis_url == CACHE_REDIS_URL
    for section in (config.ledger, config.auth):
        assert section.redis_url == STATE_REDIS_URL


def test_each_redis_url_is_set_in_one_place() -> None:
    """Every section's redis_url override expands from REDIS_URL (state) or, the cache's,
    from CACHE_REDIS_URL."""
    env = _plain_env(_gateway_container(_gateway_deployments()[0]))
    overrides = {k: v for k, v in env.items() if k.endswith("__REDIS_URL")}
    assert set(overrides) == {f"LLM_GATEWAY__{s.upper()}__REDIS_URL" for s in REDIS_SECTIONS}
    assert overrides.pop("LLM_GATEWAY__CACHE__REDIS_URL") == env["CACHE_REDIS_URL"]
    assert set(overrides.values()) == {env["REDIS_URL"]}
    assert env["REDIS_URL"] != env["CACHE_REDIS_URL"]


def _redis_policies() -> dict[int, str]:
    """The demo Redis servers' eviction policies, by port."""
    policies: dict[int, str] = {}
    for deployment in _of_kind("Deployment"):
        for container in _containers(deployment):
            if container["image"].startswith("redis"):
                args = [str(a) for a in container["args"]]
                port = int(args[args.index("--port") + 1])
                policies[port] = args[args.index("--maxmemory-policy") + 1]
    return policies


def test_the_demo_redis_never_evicts_state_and_evicts_only_the_cache() -> None:
    """Cache entries outlive the gateway's state keys (hours against minutes), so one
    server's volatile-ttl evicted tenant limits and budget holds first, and an LRU
    policy a long call's: state runs noeviction, the cache alone evicts."""
    env = _plain_env(_gateway_container(_gateway_deployments()[0]))
    policies = _redis_policies()
    assert policies[urlsplit(env["REDIS_URL"]).port or 6379] == "noeviction"
    assert policies[urlsplit(env["CACHE_REDIS_URL"]).port or 6379] == "allkeys-lru"


def test_workers_follow_the_cpu_limit() -> None:
    """The worker count comes from the container's CPU limit, not the node's core count."""
    container = _gateway_container(_gateway_deployments()[0])
    workers = next(e for e in container["env"] if e["name"] == "LLM_GATEWAY__SERVER__WORKERS")
    assert workers["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def _cpus(quantity: str) -> int:
    """A CPU quantity rounded up, as the downward API gives it with divisor 1."""
    if quantity.endswith("m"):
        return math.ceil(int(quantity[:-1]) / 1000)
    return math.ceil(float(quantity))


def _metrics_ports(container: dict[str, Any]) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for p in container["ports"]
        if p["name"].startswith("metrics-")
    }


def test_each_worker_serves_metrics_on_a_port_the_pod_declares() -> None:
    """The config opens a Prometheus endpoint per worker (prometheus_port + index) on the
    pod's address, and the Deployment declares each of those ports as metrics-<index>, for
    the limit's worker count. Before, no port was opened, and the dashboard had nothing."""
    container = _gateway_container(_gateway_deployments()[0])
    config = _production_config()
    assert config.telemetry.enabled
    assert config.telemetry.prometheus_host == "0.0.0.0"  # not loopback: scraped from outside
    count = _cpus(container["resources"]["limits"]["cpu"])
    opened = [c.telemetry.prometheus_port for c in worker_configs(config, count, environ={})]
    assert _metrics_ports(container) == {f"metrics-{i}": port for i, port in enumerate(opened)}
    assert all(p["protocol"] == "TCP" for p in container["ports"])


def test_the_podmonitor_scrapes_every_workers_port_and_only_those() -> None:
    """podmonitor.yaml selects the gateway pods and keeps, of their ports, exactly those
    named metrics-<index>: every worker's, never the gRPC port."""
    (monitor,) = _documents(KUBE / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= _pod_labels("server").items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert "port" not in endpoint  # one endpoint for however many ports there are
    keep = next(r for r in endpoint["relabelings"] if r["action"] == "keep")
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    container = _gateway_container(_gateway_deployments()[0])
    kept = {p["name"] for p in container["ports"] if re.fullmatch(keep["regex"], p["name"])}
    assert kept == set(_metrics_ports(container))
    assert len(kept) >= 2
    assert "grpc" not in kept


# Who may reach each kind of port of the gateway pods: every source, or only Prometheus in
# the monitoring namespace (the selectors networkpolicy.yaml and the README name).
OPEN_TO_ALL = "open to all"
PROMETHEUS = "prometheus in monitoring"
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy's podSelector matches pods carrying `labels`."""
    selector: dict[str, str] = policy["spec"]["podSelector"]["matchLabels"]
    return selector.items() <= labels.items()


def _policy_for(component: str) -> dict[str, Any]:
    """The one NetworkPolicy that selects the pods of a component's Deployment."""
    (policy,) = [p for p in _of_kind("NetworkPolicy") if _selects(p, _pod_labels(component))]
    return policy


def _network_policy() -> dict[str, Any]:
    """The NetworkPolicy that selects the gateway pods."""
    return _policy_for("server")


def _admits(rule: dict[str, Any], port: dict[str, Any]) -> bool:
    """Whether an ingress rule covers a container port (a rule without ports covers all)."""
    ports = rule.get("ports")
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == port["protocol"]
        and (p.get("port") in (port["name"], port["containerPort"]) or "port" not in p)
        for p in ports
    )


def _who(rule: dict[str, Any]) -> str:
    """Which sources an ingress rule admits: `OPEN_TO_ALL`, `PROMETHEUS`, or its peers."""
    peers = rule.get("from")
    if not peers:
        return OPEN_TO_ALL
    if peers == [PROMETHEUS_PEER]:
        return PROMETHEUS
    return repr(peers)


def _policy_problems(policy: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """How the policy differs from its intent: each port the container names is admitted
    by exactly one rule, grpc's open to all, each metrics-<index> only to Prometheus."""
    problems: list[str] = []
    for port in container["ports"]:
        wanted = PROMETHEUS if port["name"].startswith("metrics-") else OPEN_TO_ALL
        rules = [r for r in policy["spec"].get("ingress", []) if _admits(r, port)]
        if [_who(r) for r in rules] != [wanted]:
            problems.append(f"{port['name']}: {[_who(r) for r in rules]}, not [{wanted}]")
    named = {p["name"] for p in container["ports"]}
    for rule in policy["spec"].get("ingress", []):
        for port in rule.get("ports", []):
            if isinstance(port.get("port"), str) and port["port"] not in named:
                problems.append(f"{port['port']}: names no port of the container")
    return problems


def test_the_network_policy_admits_each_port_as_meant() -> None:
    """networkpolicy.yaml selects the gateway pods and admits the gRPC port from anywhere
    and each worker's metrics port only from Prometheus in the monitoring namespace,
    every port by exactly one rule; egress is left open on purpose (internet upstreams,
    and a Redis, collector or upstream wherever the config points: README, Network policy).

    Before, no policy shipped: the per-tenant metrics were open to the whole cluster."""
    policy = _network_policy()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in policy["spec"]
    container = _gateway_container(_gateway_deployments()[0])
    assert len(_metrics_ports(container)) >= 2
    assert _policy_problems(policy, container) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda rules: rules[0]["ports"].append({"port": "metrics-1", "protocol": "TCP"}),
        lambda rules: rules[1].pop("from"),
        lambda rules: rules[1]["from"][0].pop("podSelector"),
        lambda rules: rules[1]["from"][0].update(namespaceSelector={}),
        lambda rules: rules[1]["ports"].pop(),
        lambda rules: rules[1]["ports"].append({"port": "metrics-9", "protocol": "TCP"}),
        lambda rules: rules.append({}),
    ],
    ids=[
        "metrics-open-to-all",
        "metrics-from-anyone",
        "any-pod-in-monitoring",
        "prometheus-in-any-namespace",
        "a-worker-left-out",
        "a-port-not-declared",
        "a-rule-for-every-port",
    ],
)
def test_the_network_policy_check_catches_a_port_admitted_wrongly(mutate: Any) -> None:
    """The check above fails on a policy that opens a metrics port to more than
    Prometheus in monitoring, leaves one out, or names a port the pods lack."""
    policy = _network_policy()
    mutate(policy["spec"]["ingress"])
    container = _gateway_container(_gateway_deployments()[0])
    assert _policy_problems(policy, container)


# The demo Redis's ports: only from the gateway's pods, by the labels its Deployment's pods
# carry, in its own namespace (a podSelector alone).
GATEWAY_PODS = "the gateway's pods"


def _gateway_peer() -> dict[str, Any]:
    selector: dict[str, Any] = _gateway_deployments()[0]["spec"]["selector"]
    return {"podSelector": {"matchLabels": selector["matchLabels"]}}


def _redis_network_policy() -> dict[str, Any]:
    """The NetworkPolicy that selects the demo Redis's pods."""
    return _policy_for("redis")


def _redis_ports() -> list[dict[str, Any]]:
    """Every port the demo Redis's pod declares (one per server)."""
    containers = _containers(_deployment_of("redis"))
    return [port for container in containers for port in container["ports"]]


def _redis_policy_problems(policy: dict[str, Any]) -> list[str]:
    """How the Redis policy differs from its intent: each Redis port admitted by exactly one
    rule, from the gateway's pods only, no rule naming a port the pods lack, and no
    connection out at all (Egress guarded, no egress rule)."""
    problems: list[str] = []
    if policy["spec"].get("policyTypes") != ["Ingress", "Egress"]:
        problems.append(f"policyTypes {policy['spec'].get('policyTypes')}: a direction unguarded")
    if policy["spec"].get("egress"):
        problems.append(f"egress {policy['spec']['egress']}: Redis needs no connection out")
    rules = policy["spec"].get("ingress", [])
    for port in _redis_ports():
        who = [
            GATEWAY_PODS if r.get("from") == [_gateway_peer()] else _who(r)
            for r in rules
            if _admits(r, port)
        ]
        if who != [GATEWAY_PODS]:
            problems.append(f"{port['name']}: {who}, not [{GATEWAY_PODS}]")
    named = {p["name"] for p in _redis_ports()}
    for rule in rules:
        for port in rule.get("ports", []):
            if isinstance(port.get("port"), str) and port["port"] not in named:
                problems.append(f"{port['port']}: names no port of the Redis pods")
    return problems


def test_the_redis_network_policy_admits_only_the_gateway_and_lets_nothing_out() -> None:
    """redis.yaml's policy selects the demo Redis's pods, admits both servers' ports
    (state and cache) only from the pods of the gateway's Deployment, in its namespace,
    and denies the pod every connection out.

    Before, Redis (no password, the ledger and caller keys in it) was open to every pod;
    then its egress stayed open, so a Redis taken over could reach anything."""
    policy = _redis_network_policy()
    assert [p["name"] for p in _redis_ports()] == ["redis", "redis-cache"]
    assert _gateway_peer()["podSelector"]["matchLabels"].items() <= _pod_labels("server").items()
    assert _redis_policy_problems(policy) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda spec: spec["ingress"][0].pop("from"),
        lambda spec: spec["ingress"][0]["from"][0].update(podSelector={}),
        lambda spec: spec["ingress"][0]["from"][0].update(namespaceSelector={}),
        lambda spec: spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"].pop(
            "app.kubernetes.io/component"
        ),
        lambda spec: spec["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
        lambda spec: spec["ingress"][0]["ports"].pop(),
        lambda spec: spec["ingress"].append({"ports": [{"port": "redis", "protocol": "TCP"}]}),
        lambda spec: spec["ingress"].append({}),
        lambda spec: spec.update(policyTypes=["Egress"]),
        lambda spec: spec.update(policyTypes=["Ingress"]),
        lambda spec: spec.update(egress=[{}]),
        lambda spec: spec.update(egress=[{"ports": [{"port": 53, "protocol": "UDP"}]}]),
    ],
    ids=[
        "open-to-all",
        "any-pod-in-the-namespace",
        "gateway-labels-in-any-namespace",
        "every-llm-gateway-pod-envoy-too",
        "and-any-address",
        "the-cache-port-left-out",
        "state-port-open-to-all",
        "a-rule-for-every-port",
        "ingress-not-guarded",
        "egress-not-guarded",
        "egress-to-anywhere",
        "egress-to-dns",
    ],
)
def test_the_redis_network_policy_check_catches_a_port_opened_wider(mutate: Any) -> None:
    """The check above fails on a copy of the Redis policy opened to more than the gateway's
    pods, leaving one of its servers out, or letting the pod connect anywhere."""
    policy = _redis_network_policy()
    mutate(policy["spec"])
    assert _redis_policy_problems(policy)


# Envoy's pods: the gRPC listener open to every source, as the gateway's own gRPC port is
# (narrowing one alone protects nothing), and nothing else in; out, only the gateway pods'
# gRPC port and the cluster DNS (kube-dns in kube-system, UDP and TCP).
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


def _envoy_ports() -> list[dict[str, Any]]:
    """Every port the Envoy pods declare."""
    containers = _containers(_deployment_of("envoy"))
    return [port for container in containers for port in container["ports"]]


def _envoy_admin_port() -> dict[str, Any]:
    """envoy.yaml's admin API, as a port an ingress rule might admit."""
    address = _envoy()["admin"]["address"]["socket_address"]
    return {"name": "admin", "containerPort": address["port_value"], "protocol": "TCP"}


def _gateway_grpc_port() -> int:
    """The gateway pods' port that the headless Service (Envoy's cluster) targets."""
    (service_port,) = _service("llm-gateway-headless")["spec"]["ports"]
    container = _gateway_container(_gateway_deployments()[0])
    (port,) = [p for p in container["ports"] if p["name"] == service_port["targetPort"]]
    return int(port["containerPort"])


def _envoy_egress() -> list[dict[str, Any]]:
    """The egress rules Envoy's pods need, and no more."""
    return [
        {"to": [_gateway_peer()], "ports": [{"port": _gateway_grpc_port(), "protocol": "TCP"}]},
        {"to": [DNS_PEER], "ports": DNS_PORTS},
    ]


def _envoy_policy_problems(policy: dict[str, Any]) -> list[str]:
    """How the Envoy policy differs from its intent: each declared port admitted by exactly
    one rule, open to all; the admin port by none; no rule naming a port the pods lack;
    egress exactly the gateway pods' gRPC port and DNS."""
    spec = policy["spec"]
    problems: list[str] = []
    if spec.get("policyTypes") != ["Ingress", "Egress"]:
        problems.append(f"policyTypes {spec.get('policyTypes')}: a direction unguarded")
    rules = spec.get("ingress", [])
    for port in _envoy_ports():
        who = [_who(r) for r in rules if _admits(r, port)]
        if who != [OPEN_TO_ALL]:
            problems.append(f"{port['name']}: {who}, not [{OPEN_TO_ALL}]")
    if any(_admits(r, _envoy_admin_port()) for r in rules):
        problems.append("the admin port is admitted from outside the pod")
    named = {p["name"] for p in _envoy_ports()}
    for rule in rules:
        for port in rule.get("ports", []):
            if isinstance(port.get("port"), str) and port["port"] not in named:
                problems.append(f"{port['port']}: names no port of the Envoy pods")
    if spec.get("egress") != _envoy_egress():
        problems.append(f"egress {spec.get('egress')}, not {_envoy_egress()}")
    return problems


def test_the_envoy_network_policy_admits_grpc_and_lets_out_only_the_gateway_and_dns() -> None:
    """deploy/envoy's policy selects the Envoy pods, admits their gRPC port from every
    source and no other (the admin API on loopback), and lets them reach only the port
    envoy.yaml's cluster calls on the gateway pods, and the cluster DNS that resolves it.

    Before, no policy selected Envoy's pods: every port in and every connection out open."""
    policy = _policy_for("envoy")
    assert not _selects(policy, _pod_labels("server"))
    assert _envoy_policy_problems(policy) == []
    (listener,) = _envoy()["static_resources"]["listeners"]
    (envoy_grpc,) = [p for p in _envoy_ports() if p["name"] == "grpc"]
    assert listener["address"]["socket_address"]["port_value"] == envoy_grpc["containerPort"]
    assert _envoy()["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert {p["containerPort"] for p in _envoy_ports()} == {envoy_grpc["containerPort"]}
    (cluster,) = _envoy()["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == _gateway_grpc_port()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda spec: spec["ingress"][0].update({"from": [{"podSelector": {}}]}),
        lambda spec: spec["ingress"][0]["ports"].append({"port": 9901, "protocol": "TCP"}),
        lambda spec: spec["ingress"].append({}),
        lambda spec: spec["ingress"][0]["ports"].append({"port": "admin", "protocol": "TCP"}),
        lambda spec: spec.update(policyTypes=["Ingress"]),
        lambda spec: spec["egress"].append({}),
        lambda spec: spec["egress"][0].pop("to"),
        lambda spec: spec["egress"][0]["to"][0]["podSelector"]["matchLabels"].pop(
            "app.kubernetes.io/component"
        ),
        lambda spec: spec["egress"][0]["ports"][0].update(port=6379),
        lambda spec: spec["egress"][1]["to"][0].pop("namespaceSelector"),
        lambda spec: spec["egress"][1]["ports"].pop(),
    ],
    ids=[
        "grpc-from-the-namespace-only",
        "admin-port-admitted",
        "a-rule-for-every-port",
        "a-port-not-declared",
        "egress-not-guarded",
        "egress-to-anywhere",
        "gateway-port-to-anyone",
        "every-llm-gateway-pod-redis-too",
        "redis-port-not-grpc",
        "dns-in-this-namespace",
        "dns-over-udp-only",
    ],
)
def test_the_envoy_network_policy_check_catches_a_rule_gone_wrong(mutate: Any) -> None:
    """The check above fails on a copy of the Envoy policy that narrows gRPC, admits the
    admin port or another, or lets the pods reach more (or less) than the gateway and DNS."""
    policy = _policy_for("envoy")
    mutate(policy["spec"])
    assert _envoy_policy_problems(policy)


# Which directions each component's policy guards: the gateway's egress is left open on
# purpose (README, Network policy); Envoy's and the demo Redis's are held both ways.
GUARDED = {"server": ["Ingress"], "envoy": ["Ingress", "Egress"], "redis": ["Ingress", "Egress"]}


def _policies_by_component(manifests: list[dict[str, Any]]) -> dict[str, list[str]]:
    """For each Deployment among `manifests`, by its pods' component label: the names of
    the NetworkPolicies among them that select its pods."""
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    selected: dict[str, list[str]] = {}
    for deployment in (m for m in manifests if m["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        names = [p["metadata"]["name"] for p in policies if _selects(p, labels)]
        selected[labels["app.kubernetes.io/component"]] = names
    return selected


def test_every_pod_is_selected_by_one_network_policy_guarding_what_it_should() -> None:
    """Each Deployment's pods (by the labels its template puts on them) are selected by
    exactly one NetworkPolicy, which guards the directions GUARDED names, and no policy
    selects pods no Deployment makes."""
    manifests = list(_manifests())
    selected = _policies_by_component(manifests)
    assert set(selected) == set(GUARDED)
    for component, names in selected.items():
        assert len(names) == 1, (component, names)
        assert _policy_for(component)["spec"]["policyTypes"] == GUARDED[component]
    policies = {m["metadata"]["name"] for m in manifests if m["kind"] == "NetworkPolicy"}
    assert policies == {name for names in selected.values() for name in names}


def test_every_upstream_key_comes_from_the_secret() -> None:
    """Each upstream's api_key_env is filled from the provider-key Secret, never a literal."""
    config = _production_config()
    container = _gateway_container(_gateway_deployments()[0])
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for upstream in config.upstreams:
        ref = from_secret[str(upstream.api_key_env)]
        assert ref["name"] == "llm-gateway-provider-keys"
        assert ref["key"] == upstream.api_key_env
    assert not any(k.endswith("_API_KEY") for k in _plain_env(container))


def test_every_container_is_non_root_with_resources() -> None:
    """Every container has requests and limits and runs non-root without privilege escalation."""
    for deployment in _of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]


def _deployment_of(component: str) -> dict[str, Any]:
    """The Deployment whose pods carry app.kubernetes.io/component: `component`."""
    for deployment in _of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") == component:
            return deployment
    raise AssertionError(f"no Deployment for component {component}")


def _pod_labels(component: str) -> dict[str, str]:
    labels: dict[str, str] = _deployment_of(component)["spec"]["template"]["metadata"]["labels"]
    return labels


def _service(name: str) -> dict[str, Any]:
    return next(s for s in _of_kind("Service") if s["metadata"]["name"] == name)


def test_headless_service_selects_the_gateway_pods() -> None:
    """llm-gateway-headless is headless (clusterIP None) over the gateway pods' gRPC port."""
    service = _service("llm-gateway-headless")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= _pod_labels("server").items()
    assert [p["port"] for p in service["spec"]["ports"]] == [GRPC_PORT]


def test_clusterip_service_fronts_envoy() -> None:
    """llm-gateway is a normal ClusterIP Service selecting the Envoy pods, not the replicas."""
    service = _service("llm-gateway")
    assert service["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in service["spec"]
    assert service["spec"]["selector"].items() <= _pod_labels("envoy").items()
    assert not service["spec"]["selector"].items() <= _pod_labels("server").items()


def test_hpa_and_pdb_target_the_gateway() -> None:
    """The autoscaler scales the gateway Deployment on CPU and the budget keeps one pod up."""
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _gateway_deployments()[0]["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (pdb,) = _of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels("server").items()
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_the_autoscaled_deployment_leaves_its_replica_count_to_the_autoscaler() -> None:
    """The Deployment the autoscaler scales declares no `replicas`, as Kubernetes' HPA
    documentation asks: with one, each `kubectl apply -k` (a config edit, which rolls the
    pods) set the count back to it, scaling a busy gateway of 10 pods down to 2 at once,
    then up again as the autoscaler noticed."""
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    (deployment,) = [d for d in _of_kind(target["kind"]) if d["metadata"]["name"] == target["name"]]
    assert "replicas" not in deployment["spec"]


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    """kustomization.yaml applies every manifest and the config, never the example Secret."""
    kustomization = _kustomization(KUBE)
    resources = set(kustomization["resources"])
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml", "gateway.yaml"}
    # Neither applied by `kubectl apply -k`: fake keys, and a CRD a cluster may lack.
    assert resources == (manifests - {"secret.example.yaml", "podmonitor.yaml"}) | {"../envoy"}
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["gateway.yaml"]
    volumes = _gateway_deployments()[0]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": generator["name"]}} in volumes
    envoy_kustomization = _kustomization(ENVOY)
    assert envoy_kustomization["configMapGenerator"][0]["files"] == ["envoy.yaml"]
    envoy_manifests = {p.name for p in ENVOY.glob("*.yaml")} - {"kustomization.yaml", "envoy.yaml"}
    assert set(envoy_kustomization["resources"]) == envoy_manifests


def test_secret_example_holds_only_placeholders() -> None:
    """The example Secret's values are obvious placeholders."""
    (secret,) = _documents(KUBE / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert all(v.startswith("REPLACE-ME") for v in secret["stringData"].values())


def test_no_file_contains_a_real_looking_key() -> None:
    """No deployment asset contains anything shaped like a provider secret key."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    assert len(files) >= 10
    for path in files:
        assert not REAL_LOOKING_KEY.search(path.read_text(encoding="utf-8")), path


def test_envoy_balances_http2_across_the_headless_service_with_health_checks() -> None:
    """Envoy's cluster speaks HTTP/2 to every headless-Service pod and gRPC-health-checks them."""
    (cluster,) = _envoy()["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["lb_policy"] in ("ROUND_ROBIN", "LEAST_REQUEST")
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "llm-gateway-headless", "port_value": GRPC_PORT}
    (health,) = cluster["health_checks"]
    assert health["grpc_health_check"]["service_name"] == "llmgateway.v1.CompletionService"


def test_envoy_retries_only_a_replicas_own_refusals_within_a_budget() -> None:
    """Envoy retries on another replica only what the gateway marks as that replica's own
    refusal (and connection failures), capped by a budget: not every UNAVAILABLE or
    RESOURCE_EXHAUSTED, which would multiply upstream calls and lift per-replica quotas."""
    (listener,) = _envoy()["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    policy = route["route"]["retry_policy"]
    retry_on = set(policy["retry_on"].split(","))
    assert retry_on == {"retriable-headers", "connect-failure", "refused-stream"}
    (header,) = policy["retriable_headers"]
    assert header == {"name": RETRY_ELSEWHERE_TRAILER, "string_match": {"exact": "true"}}
    assert 1 <= policy["num_retries"] <= 3
    assert policy["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    (cluster,) = _envoy()["static_resources"]["clusters"]
    budget = cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]
    assert budget["budget_percent"]["value"] <= 25


def test_dockerfile_is_multi_stage_non_root_and_keyless() -> None:
    """The Dockerfile builds a wheel in a build stage, runs as a non-root uid and sets no key."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "pip wheel" in text
    # Every pip install in the image is held to the versions CI passed with.
    installs = re.findall(r"pip install[^;&]*", text)
    assert installs
    assert all("-c constraints.txt" in install for install in installs), installs
    ignored = (DEPLOY.parent / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!constraints.txt" in ignored
    assert "ARG WITH_LOCAL_MODEL=false" in text
    (user,) = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert int(user.split(":")[0]) > 0
    assert f"EXPOSE {GRPC_PORT}" in text
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*API_KEY", text, flags=re.MULTILINE)


IMAGE_MODEL_PATH = "/opt/llm-gateway/models/gemma3-270m-q4_k_m.gguf"


def test_the_image_listens_on_every_interface_from_its_config_file(tmp_path: Path) -> None:
    """`docker run` of the image listens on 0.0.0.0:50051 and finds the model it holds,
    both set in the config file its build writes (the one `serve` reads), not as
    LLM_GATEWAY__... variables: the image sets none."""
    instructions = _dockerfile_instructions()
    assert ("CMD", '["--config", "/etc/llm-gateway/gateway.yaml"]') in instructions
    assert any(
        keyword == "RUN" and "sed -f image-config.sed gateway.yaml" in arguments
        for keyword, arguments in instructions
    )
    env = _image_env()
    assert env["LLM_GATEWAY_CONFIG"] == "/etc/llm-gateway/gateway.yaml"
    assert not [name for name in env if name.startswith("LLM_GATEWAY__")]
    config = load_config(_image_config(tmp_path), environ=env)
    assert config.server.listen == f"0.0.0.0:{GRPC_PORT}"
    assert config.local_model.model_path == IMAGE_MODEL_PATH


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        pytest.param(
            "LLM_GATEWAY__SERVER",
            "{listen: '0.0.0.0:6000', grace_period_s: 3}",
            lambda c: (c.server.listen, c.server.grace_period_s) == ("0.0.0.0:6000", 3),
            id="server",
        ),
        pytest.param(
            "LLM_GATEWAY__LOCAL_MODEL",
            "{enabled: never}",
            lambda c: (
                (c.local_model.enabled, c.local_model.model_path)
                == ("never", LocalModelConfig().model_path)
            ),
            id="local_model",
        ),
    ],
)
def test_a_pods_section_set_whole_replaces_the_images(
    tmp_path: Path, variable: str, value: str, check: Any
) -> None:
    """A pod's `LLM_GATEWAY__SERVER='{...}'` replaces the image's `server` section, as it
    replaces a file's.

    Before, the image set LLM_GATEWAY__SERVER__LISTEN (and ..._LOCAL_MODEL__MODEL_PATH),
    a second variable for a key of the section: the pod would not start, a config error
    naming a variable its spec never set.
    """
    config = load_config(_image_config(tmp_path), environ={**_image_env(), variable: value})
    assert check(config)


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's patterns in order, each (is an exception `!...`, its regex), with
    Docker's syntax: `*` and `?` within one path segment, `**` across any number."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        glob = os.path.normpath(text.removeprefix("!").strip()).lstrip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((text.startswith("!"), re.compile(regex)))
    return patterns


def _in_build_context(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `docker build .` sends `path` (relative to the root): the last pattern
    matching it or a directory above it decides."""
    paths = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
    included = True
    for exception, pattern in patterns:
        if any(pattern.fullmatch(p) for p in paths):
            included = exception
    return included


def _image_needs() -> tuple[set[Path], set[Path]]:
    """What the image's build reads: the wheel's package directories (pyproject.toml's),
    and single files: those the wheel is built with, the default config and the script
    making the image's of it, and the targets of links in the packages."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tops = {name.split(".")[0] for name in setuptools["packages"]}
    packages = {ROOT / setuptools["package-dir"].get(top, top) for top in tops}
    files = {ROOT / f for f in ("pyproject.toml", "README.md", "constraints.txt")}
    files.add(ROOT / "config" / "gateway.yaml")
    files.add(DEPLOY / "image-config.sed")
    files.update(p.resolve() for d in packages for p in d.rglob("*") if p.is_symlink())
    return packages, files


# Made by `make setup`, `make test` and builds: never in a checkout's history, and too big
# to walk, so checked by a sample path each.
_BUILD_OUTPUTS = frozenset({".git", ".venv", "node_modules", "__pycache__", "build", "dist"})


def test_the_build_context_holds_what_the_image_needs_and_nothing_else() -> None:
    """`docker build` sends the daemon (and copies into the build stage) only the wheel's
    sources and the files it is built with: not the Node client, whose node_modules
    (over 150 MB after `make test`) came along whole, nor a venv or a cache."""
    patterns = _ignore_patterns()
    packages, files = _image_needs()
    for directory, subdirectories, names in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in _BUILD_OUTPUTS]
        for path in (Path(directory) / name for name in names):
            needed = path in files or any(p in path.parents for p in packages)
            relative = str(path.relative_to(ROOT))
            assert _in_build_context(relative, patterns) == needed, relative
    for output in (
        "clients/node/node_modules/typescript/package.json",
        ".venv/bin/python",
        "service/__pycache__/server.cpython-311.pyc",
        "generated/llmgateway/v1/__pycache__/gateway_pb2.cpython-311.pyc",
    ):
        assert not _in_build_context(output, patterns), output


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def test_envoy_never_ends_a_call_that_is_silent_within_the_callers_deadline() -> None:
    """No Envoy timeout ends a call the caller's deadline allows, however long it is silent.

    A unary Complete sends nothing until it ends: through its retries that is up to
    attempts x the upstream timeout (and a Summarize runs many such calls).
    """
    (listener,) = _envoy()["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert _seconds(route["route"]["timeout"]) == 0
    assert _seconds(route["route"]["max_stream_duration"]["grpc_timeout_header_max"]) == 0
    assert _seconds(manager.get("request_timeout", "0s")) == 0
    config = _production_config()
    longest_unary_s = config.resilience.attempts * max(u.timeout_s for u in config.upstreams)
    for timeout in (manager.get("stream_idle_timeout", "300s"), route["route"].get("idle_timeout")):
        if timeout is not None:
            assert _seconds(timeout) == 0 or _seconds(timeout) > longest_unary_s, timeout
