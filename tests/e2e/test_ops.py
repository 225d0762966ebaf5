"""Operations: hot reload under load, exact metrics, graceful shutdown, and the
container files checked against the binary they run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

from conftest import ROOT, TOLLGATE, Proc, free_port, serve_config, start_tollgate, start_upstream, wait_port

pytestmark = pytest.mark.anyio

TOKEN = "ops-token-0123456789"
ADMIN = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def policy(version: int, allow: bool) -> str:
    action = "allow" if allow else f"deny\n    reason: policy version {version}"
    return f"version: 1\ndefault: deny\nrules:\n  - tool: echo\n    action: {action}\n  - tool: slow_progress\n    action: allow\n"


def policy_file(tg) -> Path:
    return tg.audit_path.parent / f"policy{tg.audit_path.stem.removeprefix('audit')}.yaml"


def replace_file(path: Path, text: str) -> None:
    """Writes as editors, git and config tools do: a new file renamed over the old.

    `Path.write_text` truncates first, and Tollgate's file watcher, which reloads on
    its own beside `POST /reload`, could read the file in that instant: a real
    (refused) reload that the counts below do not expect."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def serve_with_policy_at(procs, tmp_path: Path, upstream_url: str, policy_path: str) -> tuple[str, str, Proc]:
    """Starts Tollgate with its one server's policy at `policy_path` (relative to
    tmp_path); returns the MCP URL, the admin URL and the process."""
    config = tmp_path / "watched.yaml"
    config.write_text(f"listen: 127.0.0.1:0\n{ADMIN}\nservers:\n  upstream:\n    url: {upstream_url}\n    policy: {policy_path}\n")
    base, proc = serve_config(procs, config)
    admin = proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)
    return base + "/mcp", admin, proc


async def call_until_denied(client):
    """Calls `echo` until the watcher has swapped in a policy that denies it."""
    with anyio.fail_after(10):
        while not (result := await client.call_tool("echo", {"text": "b"})).is_error:
            await anyio.sleep(0.1)
    return result


async def test_reload_under_load_drops_nothing_and_each_call_sees_the_policy_in_force(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateless")
    # The per-client token bucket would (rightly) slow this client down; the test is about reloads.
    tg = start_tollgate(procs, tmp_path, upstream.url, policy(0, True), extra=ADMIN + "\nlimits: {requests_per_second: 0}")
    path = policy_file(tg)
    failures: list[str] = []
    background_calls = 0
    stop = anyio.Event()

    async with Client(tg.url, mode="auto") as loader, Client(tg.url, mode="auto") as checker:
        async def load():
            nonlocal background_calls
            while not stop.is_set():
                try:
                    result = await loader.call_tool("echo", {"text": "load"})
                    kind = (result.meta or {}).get("dev.tollgate/decision", {}).get("kind")
                    if result.is_error and kind != "deny":
                        failures.append(f"unexpected error: {result}")
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    failures.append(repr(e))
                background_calls += 1

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load)
            for version in range(1, 21):
                allow = version % 2 == 0
                replace_file(path, policy(version, allow))
                r = httpx.post(tg.admin + "/reload", headers=AUTH, timeout=10)
                assert r.status_code == 200, r.text
                result = await checker.call_tool("echo", {"text": f"v{version}"})
                if allow:
                    assert result.is_error is False, (version, result)
                else:
                    assert result.meta["dev.tollgate/decision"]["reason"] == f"policy version {version}"
                # Let the background client make calls under this version too.
                seen = background_calls
                with anyio.fail_after(10):
                    while background_calls < seen + 2:
                        await anyio.sleep(0.01)
            stop.set()
    assert failures == []
    assert background_calls >= 40

    # A broken file is refused: the old policy stays, and it shows in /status and /metrics.
    replace_file(path, "version: 1\nrules:\n  - tool: echo\n    actoin: allow\n")
    r = httpx.post(tg.admin + "/reload", headers=AUTH, timeout=10)
    assert r.status_code == 422 and "actoin" in r.text
    async with Client(tg.url, mode="auto") as client:
        assert (await client.call_tool("echo", {"text": "still v20"})).is_error is False
    status = httpx.get(tg.admin + "/status", headers=AUTH, timeout=10).json()
    assert "actoin" in status["servers"][0]["policy"]["last_error"]
    metrics = httpx.get(tg.admin + "/metrics", headers=AUTH, timeout=10).text
    assert 'tollgate_policy_reloads_total{server="upstream",result="failed"} 1' in metrics

    # Fixed back to the policy in force: nothing to swap, but the failure is over.
    replace_file(path, policy(20, True))
    r = httpx.post(tg.admin + "/reload", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["reloads"][0]["result"] == "unchanged", r.text
    status = httpx.get(tg.admin + "/status", headers=AUTH, timeout=10).json()
    assert status["servers"][0]["policy"].get("last_error") is None, status


async def test_the_file_watcher_waits_for_a_file_written_in_pieces(procs, tmp_path):
    """`cat > policy.yaml` or a slow copy leaves the file half-written for a while:
    the watcher reloads once the writes have stopped, never in between."""
    upstream = start_upstream(procs, tmp_path, "stateless")
    quiet = tmp_path / "policies"
    quiet.mkdir()
    (quiet / "p.yaml").write_text(policy(1, True))
    url, admin, proc = serve_with_policy_at(procs, tmp_path, upstream.url, "policies/p.yaml")
    text = policy(2, False)
    # Eight pieces 50 ms apart: every gap is shorter than the watcher's quiet period,
    # and the whole write is longer, so a watcher that only waited a fixed time after
    # the first event would read a prefix (and refuse it as broken).
    pieces = [text[i : i + len(text) // 8 + 1] for i in range(0, len(text), len(text) // 8 + 1)]
    with open(quiet / "p.yaml", "w") as f:
        for piece in pieces:
            f.write(piece)
            f.flush()
            time.sleep(0.05)
    async with Client(url, mode="auto") as client:
        await call_until_denied(client)
    metrics = httpx.get(admin + "/metrics", headers=AUTH, timeout=10).text
    assert 'tollgate_policy_reloads_total{server="upstream",result="ok"} 1' in metrics
    assert 'result="failed"' not in metrics
    assert "reload refused" not in proc.log.read_text()


async def test_an_audit_log_beside_the_policy_does_not_wake_the_file_watcher(procs, tmp_path):
    """The docs put `audit.jsonl` beside the policy. Appending a record is not a change
    to a policy file: it once woke the watcher on every record and, under load,
    re-read every policy every 2 s."""
    upstream = start_upstream(procs, tmp_path, "stateless")
    tg = start_tollgate(procs, tmp_path, upstream.url, policy(1, True),
                        env={"RUST_LOG": "info,tollgate_proxy::reload=trace"})
    async with Client(tg.url, mode="auto") as client:
        for i in range(20):
            assert (await client.call_tool("echo", {"text": str(i)})).is_error is False
    await anyio.sleep(0.6)  # longer than the watcher's quiet period (150 ms)
    assert len([r for r in tg.audit() if r["event"] == "decision"]) == 20
    assert "policy files changed" not in tg.proc.log.read_text()
    # A change to the policy itself is still seen.
    replace_file(policy_file(tg), policy(2, False))
    with anyio.fail_after(10):
        while "policy files changed" not in tg.proc.log.read_text():
            await anyio.sleep(0.1)


async def test_the_file_watcher_reloads_on_an_atomic_symlink_swap(procs, tmp_path):
    """Kubernetes mounts ConfigMaps as `..data -> ..<timestamp>` symlinks swapped atomically."""
    upstream = start_upstream(procs, tmp_path, "stateless")
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "p.yaml").write_text(policy(1, True))
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/p.yaml", mount / "p.yaml")
    url, _, _ = serve_with_policy_at(procs, tmp_path, upstream.url, "mount/p.yaml")
    async with Client(url, mode="auto") as client:
        assert (await client.call_tool("echo", {"text": "a"})).is_error is False
        (mount / "..v2").mkdir()
        (mount / "..v2" / "p.yaml").write_text(policy(2, False))
        os.symlink("..v2", mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        result = await call_until_denied(client)
    assert result.meta["dev.tollgate/decision"]["reason"] == "policy version 2"


async def test_metrics_match_a_scripted_mix_of_calls_exactly(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateful")
    mix = "version: 1\ndefault: deny\nrules:\n  - tool: echo\n    action: allow\n  - tool: delete_*\n    action: deny\n"
    tg = start_tollgate(procs, tmp_path, upstream.url, mix, extra=ADMIN)
    async with Client(tg.url, mode="legacy") as client:
        for i in range(3):
            await client.call_tool("echo", {"text": str(i)})
        for _ in range(2):
            await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
        await client.call_tool("unknown_tool", {})
        text = httpx.get(tg.admin + "/metrics", headers=AUTH, timeout=10).text
    counts = {
        (m.group(1), m.group(2), m.group(3)): float(m.group(4))
        for m in re.finditer(r'tollgate_decisions_total\{server="upstream",tool="([^"]+)",decision="([^"]+)",rule="([^"]+)"\} (\S+)', text)
    }
    assert counts == {
        ("echo", "allow", "rules[0] (echo)"): 3,
        ("delete_fhir_datastore", "deny", "rules[1] (delete_*)"): 2,
        # No rule names it: a made-up name is no label (issue 14, point 10).
        ("other", "deny", "default"): 1,
    }
    assert 'tollgate_upstream_latency_seconds_count{server="upstream"} ' in text
    latency_count = float(re.search(r'tollgate_upstream_latency_seconds_count\{server="upstream"\} (\S+)', text).group(1))
    assert latency_count >= 3
    assert "tollgate_sessions_active 1" in text
    assert "tollgate_approvals_pending 0" in text
    assert httpx.get(tg.admin + "/readyz", headers=AUTH, timeout=10).status_code == 200


def test_sigterm_lets_the_call_in_flight_finish_and_exits_0(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateful")
    tg = start_tollgate(procs, tmp_path, upstream.url, policy(0, True))
    meta = {"progressToken": "p", "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "slow_progress", "arguments": {"steps": 5}, "_meta": meta}}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
               "mcp-method": "tools/call", "mcp-name": "slow_progress"}
    messages = []
    with httpx.stream("POST", tg.url, json=body, headers=headers, timeout=30) as response:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            messages.append(json.loads(line[5:]))
            if len(messages) == 1:
                # The call is in flight: ask Tollgate to stop.
                tg.proc.proc.send_signal(signal.SIGTERM)
    assert messages[-1]["id"] == 1
    assert messages[-1]["result"]["content"][0]["text"] == "done after 5 steps"
    assert len(messages) == 6, "every progress notification, then the result"
    assert tg.proc.proc.wait(timeout=30) == 0
    # New connections are refused once it has stopped.
    with pytest.raises(httpx.ConnectError):
        httpx.post(tg.url, json=body, headers=headers, timeout=5)
    events = [(r["event"], r.get("tool")) for r in tg.audit()]
    assert events == [("decision", "slow_progress"), ("outcome", "slow_progress")]


def test_the_container_files_run_this_binary_with_these_paths(tmp_path):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert "cargo build --release --locked -p mcp-tollgate" in dockerfile
    assert "USER 65532:65532" in dockerfile and "EXPOSE 8080 9090" in dockerfile
    assert 'HEALTHCHECK' in dockerfile and '"health"' in dockerfile
    assert "/etc/tollgate/tollgate.yaml" in dockerfile
    assert "../policies:/etc/tollgate/policies:ro" in compose
    assert "./tollgate.yaml:/etc/tollgate/tollgate.yaml:ro" in compose
    # Lay the files out as the container sees them and validate them with the binary.
    etc = tmp_path / "etc-tollgate"
    shutil.copytree(ROOT / "policies", etc / "policies")
    shutil.copy(ROOT / "docker" / "tollgate.yaml", etc / "tollgate.yaml")
    env = {**os.environ, "TOLLGATE_ADMIN_TOKEN": "compose-token-0123456789"}
    out = subprocess.run([TOLLGATE, "validate", str(etc)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    # The commands compose and the HEALTHCHECK run exist and work.
    port = free_port()
    demo = subprocess.Popen([TOLLGATE, "demo-upstream", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        health = subprocess.run([TOLLGATE, "health", "--url", f"http://127.0.0.1:{port}/mcp"], capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
    finally:
        demo.terminate()
        demo.wait(timeout=10)
    dead = subprocess.run([TOLLGATE, "health", "--admin", f"http://127.0.0.1:{free_port()}"], capture_output=True, timeout=30)
    assert dead.returncode == 1


def test_the_readmes_run_command_picks_the_tollgate_binary():
    """`cargo run --release -- demo` is the README's first command; `cargo run` must know
    which of the workspace's binaries to run (debug here, to reuse the test build)."""
    out = subprocess.run(["cargo", "run", "--quiet", "--locked", "--", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tollgate ")
