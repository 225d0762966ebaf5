"""For the people who run it (issue 30): what a container log, a busy port, a restarted
demo and an approver at the terminal meet."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

from conftest import TOLLGATE, Proc, free_port, start_tollgate, start_upstream

pytestmark = pytest.mark.anyio

ALLOW_ECHO = "version: 1\ndefault: deny\nrules:\n  - tool: echo\n    action: allow\n"


async def test_with_the_audit_log_on_stdout_the_banner_goes_to_stderr(procs, tmp_path):
    """`audit.path: "-"` (the Kubernetes default): stdout carries records and nothing else."""
    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text(ALLOW_ECHO)
    config = tmp_path / "t.yaml"
    config.write_text(f"listen: 127.0.0.1:0\naudit: {{path: '-'}}\nadmin: {{listen: '127.0.0.1:0', token: banner-token-0123456789}}\n"
                      f"servers:\n  s:\n    url: {upstream.url}\n    policy: p.yaml\n")
    log = tmp_path / "serve.log"
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], log)
    procs.append(proc)
    with anyio.fail_after(20):
        while "Tollgate admin on" not in log.read_text():
            await anyio.sleep(0.05)
    url = next(line.split()[-1] for line in log.read_text().splitlines() if line.startswith("Tollgate listening on"))
    async with Client(url, mode="auto") as client:
        assert (await client.call_tool("echo", {"text": "hi"})).is_error is False
    with anyio.fail_after(10):
        while not any('"tool":"echo"' in line.replace(" ", "") for line in proc.lines):
            await anyio.sleep(0.05)
    proc.stop()
    assert proc.lines, "no audit record on stdout"
    for line in proc.lines:
        json.loads(line)  # every stdout line is a record


def test_an_address_in_use_suggests_listen(tmp_path):
    (tmp_path / "p.yaml").write_text(ALLOW_ECHO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run([TOLLGATE, "serve", "--upstream", "http://127.0.0.1:9/mcp", "--policy", str(tmp_path / "p.yaml"),
                              "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "--listen" in run.stderr, run.stderr


def test_the_demos_claude_desktop_entry_survives_a_restart(procs, tmp_path):
    upstream_port = free_port()
    entries = []
    for run in range(2):
        proc = Proc([TOLLGATE, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                     "--upstream-listen", f"127.0.0.1:{upstream_port}"], tmp_path / f"demo{run}.log", cwd=tmp_path)
        procs.append(proc)
        entries.append(proc.wait_line(r'^(\{"mcpServers": ?\{"healthlake": ?\{"command".*)$').group(1))
        proc.stop()
    assert entries[0] == entries[1]
    assert f"127.0.0.1:{upstream_port}" in entries[0]


APPROVAL_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: require_approval
    reason: A human looks first.
    approval: { timeout: 60 }
"""
TOKEN = "approvals-token-0123456789"


async def test_approvals_of_anonymous_callers_are_told_apart_and_leave_with_their_session(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, APPROVAL_POLICY,
                        extra=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}")
    auth = {"authorization": f"Bearer {TOKEN}"}

    def pending() -> list[dict]:
        return [a for a in httpx.get(tg.admin + "/approvals", headers=auth, timeout=10).json() if a["status"] == "pending"]

    async with Client(tg.url, mode="legacy") as first, Client(tg.url, mode="legacy") as second:
        for client in (first, second):
            with anyio.move_on_after(1.0):
                await client.call_tool("echo", {"text": "same"})
        with anyio.fail_after(15):
            while len(waiting := pending()) < 2:
                await anyio.sleep(0.05)
        listed = subprocess.run([TOLLGATE, "approvals", "list", "--admin", tg.admin], capture_output=True, text=True,
                                env={"TOLLGATE_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}, timeout=30)
        assert listed.returncode == 0, listed.stderr
        for approval in waiting:
            assert approval["principal"].startswith("session:")
            row = next(line for line in listed.stdout.splitlines() if line.startswith(approval["id"]))
            assert approval["principal"] in row, (row, approval)
    # Both sessions are closed (the SDK ends them with DELETE): nobody can retry those calls.
    with anyio.fail_after(15):
        while pending():
            await anyio.sleep(0.05)
    settled = httpx.get(tg.admin + "/approvals", headers=auth, timeout=10).json()
    assert {a["status"] for a in settled} == {"denied"}
    assert all("session that asked was closed" in a["decision_reason"] for a in settled)
    assert upstream.calls() == []


def test_a_client_at_full_speed_stays_within_the_default_request_rate(procs, tmp_path):
    """Default `limits`: 600 requests from one address as fast as 16 connections send them
    (a desktop client's start-up burst, a test suite) all pass the bucket; beyond it a
    client gets 429 with Retry-After (test_limits.py). The calls are denied by the policy,
    so Tollgate answers each itself, as fast as it can."""
    from concurrent.futures import ThreadPoolExecutor

    from test_http import headers, tool_call

    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, ALLOW_ECHO)
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16)) as http:
        def call(i: int) -> int:
            return http.post(tg.url, json=tool_call("denied", {}, i), headers=headers(name="denied")).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(600)))
    assert codes.count(200) == 600, {c: codes.count(c) for c in set(codes)}


def test_tollgate_stdio_handles_messages_in_order_of_arrival(procs, tmp_path):
    """initialize, initialized, tools/list and tools/call written back to back, 200 times
    (a process each): every answer is a result, and the notification is never answered."""
    from concurrent.futures import ThreadPoolExecutor

    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text(ALLOW_ECHO)
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "burst", "version": "1"}}
    burst = "".join(json.dumps(m) + "\n" for m in [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}},
    ])

    def one(i: int) -> list[dict]:
        proc = subprocess.Popen([TOLLGATE, "stdio", "--policy", str(tmp_path / "p.yaml"), "--upstream", upstream.url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        timer = threading.Timer(30, proc.kill)  # bounds the reads below
        timer.start()
        try:
            proc.stdin.write(burst)
            proc.stdin.flush()
            answers = []
            while len(answers) < 3:
                line = proc.stdout.readline()
                if not line:
                    break
                answers.append(json.loads(line))
            return answers
        finally:
            timer.cancel()
            proc.kill()
            proc.wait(timeout=10)

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(one, range(200)))
    bad = [run for run in runs if sorted(a.get("id") for a in run) != [1, 2, 3] or any("error" in a for a in run)]
    assert bad == [], f"{len(bad)} of 200 bursts went wrong, e.g. {bad[0]}"


async def test_the_readmes_healthlake_line_runs_as_printed(procs, tmp_path):
    """README's `tollgate serve ... -- uvx --with 'mcp<2' awslabs.healthlake-mcp-server@latest`,
    as printed (plus where to listen). `uvx` is a stand-in that checks it was asked for exactly
    that and runs the server already installed in tests/.venv-healthlake (no network); the
    server itself needs AWS_REGION, which only `--env` gives it."""
    import shlex

    from conftest import ROOT
    from test_healthlake import HEALTHLAKE_PYTHON

    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("tollgate serve --policy") and "healthlake-mcp-server" in l)
    args = shlex.split(line)
    split = args.index("--")
    server = Path(HEALTHLAKE_PYTHON).parent / "awslabs.healthlake-mcp-server"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uvx").write_text(
        "#!/bin/sh\n"
        f'[ "$*" = {shlex.quote(" ".join(args[split + 2:]))} ] || {{ echo "uvx stand-in: unexpected $*" >&2; exit 2; }}\n'
        f"exec {shlex.quote(str(server))}\n")
    (bin_dir / "uvx").chmod(0o755)
    port = free_port()
    command = [TOLLGATE, *args[1:split], "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0", *args[split:]]
    proc = Proc(command, tmp_path / "serve.log", cwd=ROOT,
                env={"PATH": f"{bin_dir}:/usr/bin:/bin", "AWS_DEFAULT_REGION": ""})
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)

    async with Client(url, mode="legacy") as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert "start_fhir_export_job" in names, names


def test_readiness_asks_each_upstream_for_real(procs, tmp_path):
    """An upstream at a wrong path (a bare 404) and a stdio command that does not exist are
    not ready, each saying why, in /readyz and /status; a real server is."""
    from conftest import serve_config, write_config

    upstream = start_upstream(procs, tmp_path)
    token = "ready-token-0123456789"
    config = write_config(tmp_path, {
        "good": (upstream.url, ALLOW_ECHO),
        "wrong": (upstream.url.removesuffix("/mcp") + "/wrong", ALLOW_ECHO),
        "missing": ("    command: [surely-no-such-mcp-server]\n", ALLOW_ECHO),
    }, extra=f"admin: {{listen: '127.0.0.1:0', token: {token}}}")
    _, proc = serve_config(procs, config)
    admin = proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)
    auth = {"authorization": f"Bearer {token}"}
    ready = httpx.get(admin + "/readyz", headers=auth, timeout=30)
    assert ready.status_code == 503, ready.text
    upstreams = ready.json()["upstreams"]
    assert upstreams["good"]["ready"] is True, upstreams
    assert upstreams["wrong"]["ready"] is False and "HTTP 404" in upstreams["wrong"]["error"], upstreams
    assert upstreams["missing"]["ready"] is False and "surely-no-such-mcp-server" in upstreams["missing"]["error"]
    status = {s["name"]: s for s in httpx.get(admin + "/status", headers=auth, timeout=10).json()["servers"]}
    assert status["wrong"]["health"]["ready"] is False and status["good"]["health"]["ready"] is True, status
    assert "upstream not ready" in proc.log.read_text()


async def test_an_authenticated_clients_approval_is_redeemed_from_its_next_session(procs, tmp_path):
    """Re-running a script after approving: the new session of the same client gets the call
    through, and the pending message said so."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    key = "script-key-0123456789"
    upstream = start_upstream(procs, tmp_path)
    policy = APPROVAL_POLICY.replace("approval: { timeout: 60 }", "approval: { timeout: 60, wait: 1 }")
    tg = start_tollgate(procs, tmp_path, upstream.url, policy,
                        extra=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\nclients: [{{name: script, key: {key}}}]")

    def script():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
        return Client(streamable_http_client(tg.url, http_client=http), mode="legacy")

    async with script() as client:
        first = await client.call_tool("echo", {"text": "run"})
    assert first.is_error is True
    text = first.content[0].text
    assert "as client `script` (from any of its sessions)" in text, text
    approval_id = first.meta["dev.tollgate/decision"]["approval_id"]
    approved = httpx.post(f"{tg.admin}/approvals/{approval_id}/approve", json={},
                          headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert approved.status_code == 200, approved.text
    async with script() as client:  # the script run again: a new session
        again = await client.call_tool("echo", {"text": "run"})
    assert again.is_error is False, again
    assert upstream.tools_called() == ["echo"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_call_to_a_broken_upstream_is_a_json_rpc_error_naming_it(procs, tmp_path, mode):
    """A wrong path (a bare 404, over Streamable HTTP and legacy SSE), a stdio command that
    does not exist and a refused connection: the SDK client sees a JSON-RPC error naming the server, where it is (URL
    or command) and, for an HTTP answer, its status; each is logged at WARN."""
    from mcp import MCPError

    from conftest import serve_config, write_config

    upstream = start_upstream(procs, tmp_path)
    wrong = upstream.url.removesuffix("/mcp") + "/wrong"
    refused = f"http://127.0.0.1:{free_port()}/mcp"
    config = write_config(tmp_path, {
        "wrong": (wrong, ALLOW_ECHO),
        "missing": ("    command: [surely-no-such-mcp-server, --flag]\n", ALLOW_ECHO),
        "refused": (refused, ALLOW_ECHO),
        "sse-wrong": (f"    url: {wrong}\n    transport: sse\n", ALLOW_ECHO),
    })
    base, proc = serve_config(procs, config)
    expected = {
        "wrong": [wrong, "HTTP 404", "servers.wrong.url"],
        "missing": ["surely-no-such-mcp-server --flag", "could not start `surely-no-such-mcp-server`"],
        "refused": [refused, "servers.refused.url"],
        "sse-wrong": [wrong, "404 Not Found", "servers.sse-wrong.url"],
    }
    for server, words in expected.items():
        try:
            with anyio.fail_after(30):
                async with Client(f"{base}/servers/{server}/mcp", mode=mode) as client:
                    await client.call_tool("echo", {"text": "hi"})
        except Exception as raised:  # noqa: BLE001 - the SDK wraps it in exception groups
            errors = [raised]
            while isinstance(errors[0], BaseExceptionGroup):
                errors = list(errors[0].exceptions)
            error = errors[0]
        else:
            pytest.fail(f"{server}: the call went through")
        assert isinstance(error, MCPError), repr(error)
        message = str(error)
        assert f"upstream `{server}`" in message, message
        for word in words:
            assert word in message, (word, message)
    warned = [line for line in proc.log.read_text().splitlines() if " WARN " in line and "readiness" not in line]
    for server in expected:
        assert any(f'server="{server}"' in line for line in warned), (server, warned)


def test_tollgate_stdio_ends_on_sigterm_while_its_stdin_stays_open(procs, tmp_path):
    """A client (or a service manager) that stops `tollgate stdio` with SIGTERM and keeps the
    pipe open: it ends anyway, not at the next byte on stdin."""
    import signal

    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text(ALLOW_ECHO)
    proc = subprocess.Popen([TOLLGATE, "stdio", "--policy", str(tmp_path / "p.yaml"), "--upstream", upstream.url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    timer = threading.Timer(60, proc.kill)  # bounds the read below
    timer.start()
    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "term", "version": "1"}}
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}) + "\n")
        proc.stdin.flush()
        assert "result" in json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("`tollgate stdio` still runs 20s after SIGTERM, its stdin open")
        assert code == 0
    finally:
        timer.cancel()
        proc.kill()
        proc.stdin.close()
        proc.wait(timeout=10)
