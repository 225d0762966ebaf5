"""The Helm chart (deploy/helm/tollgate), rendered by Helm's own engine (the Go SDK, through
helm-python-sdk's bundled library: no `helm` binary is installable from this project's
registries) with its defaults and with every option on, then checked: each object against the
Kubernetes schemas of one pinned version (strictly: no unknown field), the rendered
configuration and policies with `tollgate validate`, every `${VAR}` the configuration uses
given to the container (a server's `${TOKEN}` from a Secret through extraEnv), and what ties
the objects together (selectors, ports, the Secret's keys)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm  # helm-python-sdk, tests/requirements.txt
import pytest
import yaml

from conftest import ROOT, TOLLGATE
from test_scripts import KUBERNETES

CHART = ROOT / "deploy" / "helm" / "tollgate"
REQUIRED = {"adminToken": "a" * 32, "redis": {"password": "r" * 32}}
EVERYTHING = {
    **REQUIRED,
    "clients": [{"name": "agent-one", "key": "k" * 32}],
    "extraEnv": [{"name": "DOCS_TOKEN", "valueFrom": {"secretKeyRef": {"name": "docs-mcp", "key": "token"}}}],
    "envFrom": [{"secretRef": {"name": "mcp-tokens"}}],
    "servers": {"docs": {"url": "http://docs-mcp:8000/mcp", "policy": "policies/docs.yaml",
                         "headers": {"Authorization": "Bearer ${DOCS_TOKEN}"}}},
    "trustedProxies": ["10.0.0.0/8"],
    "ingress": {"enabled": True, "className": "nginx", "annotations": {"a.example.com/b": "c"},
                "tls": [{"secretName": "mcp-tls", "hosts": ["mcp.example.com"]}]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "networkPolicy": {"enabled": True},
}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="gate", namespace="mcp")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def kubernetes_validate(docs: list[dict], tmp_path: Path) -> str:
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"{i}-{doc['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    run = subprocess.run([str(validate), "-k", KUBERNETES, "--strict", "--quiet", "--no-warn", *map(str, files)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.mark.parametrize("values", [REQUIRED, EVERYTHING], ids=["defaults", "everything"])
def test_the_rendered_chart_follows_the_kubernetes_schemas(values, tmp_path):
    docs = render(values)
    core = [d for d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"]
    kubernetes_validate(core, tmp_path)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    expected = {"ConfigMap/gate-tollgate", "Deployment/gate-tollgate", "Deployment/gate-tollgate-redis",
                "NetworkPolicy/gate-tollgate-redis", "PodDisruptionBudget/gate-tollgate", "Secret/gate-tollgate",
                "Service/gate-tollgate", "Service/gate-tollgate-admin", "Service/gate-tollgate-redis"}
    if values is EVERYTHING:
        expected |= {"Ingress/gate-tollgate", "NetworkPolicy/gate-tollgate", "ServiceMonitor/gate-tollgate"}
    assert set(kinds) == expected, kinds


def test_the_rendered_configuration_validates_with_every_variable_it_uses_given(tmp_path):
    docs = render(EVERYTHING)
    config_map = find(docs, "ConfigMap", "gate-tollgate")
    deployment = find(docs, "Deployment", "gate-tollgate")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # Lay the ConfigMap out as the Deployment mounts it.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")["mountPath"]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    for item in volume["configMap"]["items"]:
        (tmp_path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item["path"]).write_text(config_map["data"][item["key"]])
    assert container["args"] == ["serve", "--config", f"{mount}/tollgate.yaml"]
    config = (tmp_path / "tollgate.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", config))
    assert {"TOLLGATE_ADMIN_TOKEN", "REDIS_PASSWORD", "DOCS_TOKEN", "TOLLGATE_CLIENT_KEY_AGENT_ONE"} <= used, used
    env = {e["name"]: e for e in container["env"]}
    assert used <= set(env), f"the configuration uses {sorted(used - set(env))}, which the container is not given"
    assert env["DOCS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "docs-mcp", "key": "token"}
    assert container["envFrom"] == [{"secretRef": {"name": "mcp-tokens"}}]
    # Every key the chart's Secret is asked for is in it.
    secret = find(docs, "Secret", "gate-tollgate")
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    redis = find(docs, "Deployment", "gate-tollgate-redis")["spec"]["template"]["spec"]["containers"][0]
    refs += [e["valueFrom"]["secretKeyRef"] for e in redis["env"]]
    for ref in refs:
        if ref["name"] == "gate-tollgate":
            assert ref["key"] in secret["stringData"], ref
    # The configuration as the pod sees it, with the Secret's values.
    values = {"TOLLGATE_ADMIN_TOKEN": EVERYTHING["adminToken"], "REDIS_PASSWORD": EVERYTHING["redis"]["password"],
              "DOCS_TOKEN": "d" * 32, "TOLLGATE_CLIENT_KEY_AGENT_ONE": "k" * 32, "PATH": "/usr/bin:/bin"}
    run = subprocess.run([TOLLGATE, "validate", str(tmp_path / "tollgate.yaml")], capture_output=True, text=True,
                         timeout=60, env=values, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    # Redis wants the password, and the URL Tollgate uses carries it.
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert "redis://:${REDIS_PASSWORD}@gate-tollgate-redis:6379/0" in config
    assert yaml.safe_load(config)["trusted_proxies"] == ["10.0.0.0/8"]


def test_the_optional_objects_point_at_what_the_chart_runs():
    docs = render(EVERYTHING)
    pod_labels = find(docs, "Deployment", "gate-tollgate")["spec"]["template"]["metadata"]["labels"]
    admin = find(docs, "Service", "gate-tollgate-admin")
    # ServiceMonitor (a CRD, outside the Kubernetes schemas): the admin Service's port and
    # labels, the admin token as its bearer token.
    monitor = find(docs, "ServiceMonitor", "gate-tollgate")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "gate-tollgate", "key": "admin-token"}
    # Only the admin Service is scraped, not the MCP one.
    mcp = find(docs, "Service", "gate-tollgate")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= mcp["metadata"]["labels"].items()
    ingress = find(docs, "Ingress", "gate-tollgate")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gate-tollgate", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == EVERYTHING["ingress"]["tls"]
    pdb = find(docs, "PodDisruptionBudget", "gate-tollgate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = find(docs, "NetworkPolicy", "gate-tollgate")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = [[p["port"] for p in rule["ports"]] for rule in policy["spec"]["ingress"]]
    assert ports == [[8080], [9090]] and "from" not in policy["spec"]["ingress"][0]
    redis_policy = find(docs, "NetworkPolicy", "gate-tollgate-redis")
    [rule] = redis_policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_the_chart_refuses_to_render_its_redis_without_a_password():
    with pytest.raises(Exception, match=r"redis\.password is needed"):
        render({"adminToken": "a" * 32})
    # With a Redis of your own (its password in redis.url, from a ${VAR}) none is asked.
    docs = render({"adminToken": "a" * 32, "redis": {"enabled": False, "url": "redis://:${REDIS_PASSWORD}@r:6379/0"},
                   "extraEnv": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "r", "key": "p"}}}]})
    assert not any(d["metadata"]["name"].endswith("-redis") for d in docs)


def test_helm_lint_finds_nothing():
    report = helm.lint(str(CHART), values=REQUIRED, strict=True, kube_version=f"v{KUBERNETES}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
