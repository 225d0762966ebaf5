"""The container image, built and run (issue 30, point 12): scripts/image builds
docker/Dockerfile's `prebuilt` target with podman from the binary under test, on a base made
from this host's glibc files (no registry, no Rust image), and writes an OCI archive. Then
docker/compose.yaml's layout runs for real: the demo upstream in a second container on a
user network, Tollgate with the mounted docker/tollgate.yaml and policies/, both non-root on
a read-only root filesystem without a writable /tmp; the official Python SDK calls through
the published port, and each container's HEALTHCHECK passes.

Podman is configured by tests/podman/containers.conf (runc, cgroupfs, ulimits below this
machine's); tests/run installs podman from Debian. These tests skip, saying why, only when
podman is missing or `podman info` fails; a build or run that fails is a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
import yaml
from mcp import Client

from conftest import ROOT, TOLLGATE, free_port

CONF = ROOT / "tests" / "podman" / "containers.conf"
ENV = {**os.environ, "CONTAINERS_CONF": str(CONF)}
RUN_ID = uuid.uuid4().hex[:8]
TOKEN = "image-test-token-0123456789abcdef"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    run = subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check:
        assert run.returncode == 0, f"podman {' '.join(args)}: {run.stderr}"
    return run


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(tag, OCI archive) made by scripts/image from the binary under test; removed after."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (tests/run installs it: apt-get install podman runc)")
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, env=ENV, timeout=120,
                          stdin=subprocess.DEVNULL)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: `podman info` failed: {info.stderr.strip()[-500:]}")
    tag = f"localhost/tollgate-e2e:{RUN_ID}"
    archive = tmp_path_factory.mktemp("image") / "tollgate.oci.tar"
    run = subprocess.run([str(ROOT / "scripts" / "image"), "--binary", TOLLGATE, "--tag", tag, "--out", str(archive)],
                         capture_output=True, text=True, env=ENV, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == tag, run.stdout
    yield tag, archive
    podman("rmi", "-f", tag, check=False)


@pytest.fixture
def containers():
    """Names of containers and networks to remove after the test."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in reversed(made):
        if kind == "container":
            podman("rm", "-f", "-t", "2", name, check=False)
        else:
            podman("network", "rm", "-f", name, check=False)


def wait_log(name: str, pattern: str, seconds: float = 60) -> re.Match:
    deadline = time.monotonic() + seconds
    while True:
        logs = podman("logs", name).stdout + podman("logs", name).stderr
        if match := re.search(pattern, logs, re.M):
            return match
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running" and time.monotonic() < deadline, f"{name} ({state}): no {pattern!r} in:\n{logs}"
        time.sleep(0.2)


def healthcheck(name: str) -> subprocess.CompletedProcess:
    return podman("healthcheck", "run", name, check=False, timeout=60)


def test_scripts_image_writes_an_oci_archive(image):
    tag, archive = image
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert "oci-layout" in names and "index.json" in names, names
        index = json.load(tar.extractfile("index.json"))
        [entry] = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == tag
        blob = lambda digest: json.load(tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:")))  # noqa: E731
        config = blob(blob(entry["digest"])["config"]["digest"])["config"]
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["/usr/local/bin/tollgate"], config


def test_the_images_user_has_a_group_entry(image, containers, tmp_path):
    tag, _ = image
    name = f"tollgate-e2e-files-{RUN_ID}"
    podman("create", "--name", name, tag)
    containers.append(("container", name))
    for file in ("group", "passwd"):
        podman("cp", f"{name}:/etc/{file}", str(tmp_path / file))
    assert re.search(r"^nonroot:x:65532:", (tmp_path / "group").read_text(), re.M)
    assert re.search(r"^nonroot:x:65532:65532:", (tmp_path / "passwd").read_text(), re.M)


def run_args(name: str, network: str, spec: dict, tag: str, ports: dict[int, int]) -> list[str]:
    """`podman run` arguments for one compose service, on a read-only root without a tmpfs."""
    args = ["run", "-d", "--name", name, "--network", network, "--read-only", "--read-only-tmpfs=false"]
    for key, value in spec.get("environment", {}).items():
        args += ["-e", f"{key}={TOKEN if key == 'TOLLGATE_ADMIN_TOKEN' else value}"]
    for volume in spec.get("volumes", []):
        source, target, *mode = volume.split(":")
        args += ["-v", ":".join([str((ROOT / "docker" / source).resolve()), target, *mode])]
    for port in spec.get("ports", []):
        host, _, inside = port.rpartition(":")
        args += ["-p", f"127.0.0.1:{ports[int(inside)]}:{inside}"]
    if "healthcheck" in spec:
        args += ["--health-cmd", json.dumps(spec["healthcheck"]["test"][1:])]
    return [*args, tag, *spec.get("command", [])]


def test_the_compose_layout_runs_non_root_on_a_read_only_root(image, containers):
    tag, _ = image
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    network = f"tollgate-e2e-{RUN_ID}"
    podman("network", "create", network)
    containers.append(("network", network))
    upstream = f"tollgate-e2e-upstream-{RUN_ID}"
    # The upstream answers by its compose service name, as docker/tollgate.yaml names it.
    args = run_args(upstream, network, compose["demo-upstream"], tag, {})
    args.insert(args.index("--network") + 2, "--network-alias=demo-upstream")
    podman(*args)
    containers.append(("container", upstream))
    wait_log(upstream, r"Demo MCP server listening")
    ports = {8080: free_port(), 9090: free_port()}
    proxy = f"tollgate-e2e-proxy-{RUN_ID}"
    podman(*run_args(proxy, network, compose["tollgate"], tag, ports))
    containers.append(("container", proxy))
    wait_log(proxy, r"^Tollgate admin on")

    # Non-root, read-only root, no writable tmpfs: only the two read-only mounts.
    for name in (upstream, proxy):
        top = podman("top", name, "user", "group").stdout.split()
        assert top[2:] == ["nonroot", "nonroot"], top
        inspect = json.loads(podman("inspect", name).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
        assert not inspect["HostConfig"].get("Tmpfs"), inspect["HostConfig"].get("Tmpfs")
        assert all(m["Type"] == "bind" and not m["RW"] for m in inspect["Mounts"]), inspect["Mounts"]
        result = healthcheck(name)
        assert result.returncode == 0, (name, result.stdout, result.stderr)

    url = f"http://127.0.0.1:{ports[8080]}/mcp"

    async def through_the_proxy():
        async with Client(url, mode="legacy") as client:
            tools = [t.name for t in (await client.list_tools()).tools]
            listed = await client.call_tool("list_fhir_datastores", {})
            deleted = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x" * 32})
        return tools, listed, deleted

    tools, listed, deleted = anyio.run(through_the_proxy)
    assert "list_fhir_datastores" in tools and "delete_fhir_datastore" not in tools, tools
    assert listed.is_error is False, listed
    assert deleted.is_error is True and "Denied by policy" in deleted.content[0].text, deleted
    # The audit log is the container's stdout (audit.path: "-"): one JSON record a line.
    deadline = time.monotonic() + 20
    while '"list_fhir_datastores"' not in (out := podman("logs", proxy).stdout) and time.monotonic() < deadline:
        time.sleep(0.2)
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    # A clean start on a read-only root warns about nothing.
    warned = [line for line in podman("logs", proxy).stderr.splitlines() if " WARN " in line or " ERROR " in line]
    assert warned == [], warned
    assert any(r.get("tool") == "list_fhir_datastores" for r in records), out
    ready = httpx.get(f"http://127.0.0.1:{ports[9090]}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def test_the_healthcheck_follows_an_admin_listener_on_another_port(image, containers):
    """The HEALTHCHECK asks 127.0.0.1:9090 unless TOLLGATE_HEALTH_ADMIN names the admin
    listener (docker/Dockerfile says so): with the admin on 9191 it fails without it."""
    tag, _ = image
    name = f"tollgate-e2e-port-{RUN_ID}"
    podman("run", "-d", "--name", name, "--read-only", "--read-only-tmpfs=false", "-e",
           "TOLLGATE_HEALTH_ADMIN=http://127.0.0.1:9191", tag,
           "demo", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9191")
    containers.append(("container", name))
    wait_log(name, r"^Tollgate admin on")
    result = healthcheck(name)
    assert result.returncode == 0, (result.stdout, result.stderr)
    unset = podman("exec", name, "/usr/local/bin/tollgate", "health", "--admin", "http://127.0.0.1:9090", check=False)
    assert unset.returncode == 1 and "unhealthy" in unset.stderr, (unset.stdout, unset.stderr)
