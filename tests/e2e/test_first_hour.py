"""A new user's first hour (issue 18, points 2-6): what `demo` prints works as printed
(the Python snippet pasted as is, each client's config, the hints with this binary's
path and the ports in use); `serve --upstream/--policy` can approve what its policy holds;
`serve --policy -- CMD` starts a stdio server; two `tollgate stdio` processes of one
configuration both start, and `tollgate approvals` without `--admin` finds them all.

Every test points TOLLGATE_RUNTIME_DIR at its own directory, so the instances it sees
are its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import anyio
import httpx
import pytest

from conftest import ROOT, TOLLGATE, Proc, stdio_argv, start_upstream, wait_until

pytestmark = pytest.mark.anyio

HEALTHLAKE = ROOT / "policies" / "healthlake.yaml"
EXPORT_ARGS = {"datastore_id": "0123456789abcdef0123456789abcdef", "data_access_role_arn": "arn:aws:iam::1:role/x",
               "output_data_config": {"s3_configuration": {"s3_uri": "s3://approved-exports/a"}}}
APPROVAL_POLICY = """version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: start_fhir_export_job
    action: require_approval
    approval: {timeout: 60}
"""


def runtime_env(tmp_path) -> dict:
    path = tmp_path / "runtime"
    return {"TOLLGATE_RUNTIME_DIR": str(path)}


def start_demo(procs, tmp_path, *extra: str) -> Proc:
    proc = Proc([TOLLGATE, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *extra],
                tmp_path / "demo.log", cwd=tmp_path, env=runtime_env(tmp_path))
    procs.append(proc)
    proc.wait_line(r"^asyncio\.run\(main\(\)\)$")
    return proc


def labelled(proc: Proc, label: str) -> str:
    """The line printed after the line that starts with `label` and ends with a colon."""
    lines = proc.lines
    for i, line in enumerate(lines):
        if line.startswith(label) and line.endswith(":"):
            return lines[i + 1]
    raise AssertionError(f"no {label!r} in {lines}")


def approvals(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tollgate approvals ARGS` with no --admin: it finds the instances itself."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TOLLGATE_ADMIN_URL", "TOLLGATE_ADMIN_TOKEN")}
    return subprocess.run([TOLLGATE, "approvals", *args], capture_output=True, text=True, timeout=30,
                          env={**environ, **runtime_env(tmp_path), **(env or {})})


def pending(tmp_path, count: int) -> list[dict]:
    def found():
        out = approvals(tmp_path, "list", "--json")
        assert out.returncode == 0, out.stderr
        rows = [a for a in json.loads(out.stdout) if a["status"] == "pending"]
        return rows if len(rows) >= count else None
    return wait_until(found, 20, f"{count} pending approval(s)")


def test_the_python_snippet_runs_exactly_as_printed(procs, tmp_path):
    proc = start_demo(procs, tmp_path)
    url = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+/mcp)").group(1)
    lines = proc.lines
    start = next(i for i, l in enumerate(lines) if l.startswith("Python SDK")) + 1
    end = lines.index("asyncio.run(main())") + 1
    snippet = "\n".join(lines[start:end])
    assert snippet.startswith("import asyncio\n"), snippet
    assert url in snippet
    # No dedent, no cleanup: what a person pastes.
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert "list_fhir_datastores" in out[0] and "delete_fhir_datastore" not in out[0]
    assert "is_error=True" in out[2] and "Denied by policy: " in out[2]
    # Pasted into the interactive interpreter, line by line, it runs too.
    repl = subprocess.run([sys.executable, "-i", "-q"], input=snippet + "\n", capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert "Error" not in repl.stderr.replace("is_error", ""), repl.stderr
    assert "Denied by policy: " in repl.stdout


async def test_the_demo_prints_a_config_for_each_client_and_the_stdio_one_works(procs, tmp_path):
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    proc = start_demo(procs, tmp_path, "--policy", str(HEALTHLAKE))
    url = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+/mcp)").group(1)

    assert labelled(proc, "Claude Code") == f"claude mcp add --transport http healthlake {url}"
    cursor = json.loads(labelled(proc, "Cursor"))
    assert cursor == {"mcpServers": {"healthlake": {"url": url}}}
    vscode = json.loads(labelled(proc, "VS Code"))
    assert vscode == {"servers": {"healthlake": {"type": "http", "url": url}}}
    inspector = json.loads(labelled(proc, "MCP Inspector"))
    # The Inspector refuses "http": its name for Streamable HTTP is "streamable-http".
    assert inspector == {"mcpServers": {"healthlake": {"type": "streamable-http", "url": url}}}

    desktop = json.loads(labelled(proc, "Claude Desktop"))["mcpServers"]["healthlake"]
    assert os.path.realpath(desktop["command"]) == os.path.realpath(TOLLGATE)
    assert desktop["args"][0] == "stdio" and desktop["args"][2] == str(HEALTHLAKE)
    # Launched as a desktop client would: from another directory, with that command line.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = open(tmp_path / "desktop-stdio.log", "w")
    params = StdioServerParameters(command=desktop["command"], args=desktop["args"], cwd=str(elsewhere),
                                   env={**os.environ, **runtime_env(tmp_path)})
    with anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=log)) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert "list_fhir_datastores" in names and "delete_fhir_datastore" not in names
    log.close()


def test_hints_name_this_binary_and_the_ports_in_use(procs, tmp_path):
    proc = start_demo(procs, tmp_path)
    admin = proc.wait_line(r"Tollgate admin on (http://127\.0\.0\.1:(\d+))/")
    assert admin.group(2) != "9090"
    hint = proc.wait_line(r"or with: (.+)$").group(1)
    binary, rest = hint.split(" ", 1)
    assert os.path.realpath(binary) == os.path.realpath(TOLLGATE)
    assert rest == f"approvals list --admin {admin.group(1)}"
    assert ":9090" not in "\n".join(proc.lines)
    # The hint runs as printed.
    # In the same user's runtime directory, where the demo recorded its generated token.
    out = subprocess.run([binary, *rest.split()], capture_output=True, text=True, timeout=30,
                         env=runtime_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "no approvals" in out.stdout


def call_in_background(url: str, tool: str, arguments: dict) -> tuple[threading.Thread, dict]:
    """A tools/call through the SDK in a thread of its own; `result["text"]` once answered."""
    result: dict = {}

    def run():
        from mcp import Client

        async def call():
            async with Client(url) as client:
                answer = await client.call_tool(tool, arguments)
                result["error"] = answer.is_error
                result["text"] = " ".join(getattr(c, "text", "") for c in answer.content)
        anyio.run(call)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_serve_with_upstream_and_policy_can_approve_what_its_policy_holds(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    policy = tmp_path / "p.yaml"
    policy.write_text(APPROVAL_POLICY)
    proc = Proc([TOLLGATE, "serve", "--upstream", upstream.url, "--policy", str(policy), "--listen", "127.0.0.1:0"],
                tmp_path / "serve.log", env=runtime_env(tmp_path))
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
    token = proc.wait_line(r"Tollgate admin on http://127\.0\.0\.1:\d+/ \(token ([0-9a-f]{32})").group(1)
    assert sum(token in line for line in proc.lines) == 1, "the generated token is printed once"
    thread, result = call_in_background(url, "start_fhir_export_job", EXPORT_ARGS)
    (held,) = pending(tmp_path, 1)
    out = approvals(tmp_path, "approve", held["id"])
    assert out.returncode == 0, out.stderr
    thread.join(30)
    assert result.get("error") is False, result
    assert "start_fhir_export_job" in upstream.tools_called()


async def test_serve_with_a_policy_starts_a_stdio_server_given_after_the_dashes(procs, tmp_path):
    from mcp import Client

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: deny\nrules:\n  - tool: echo\n    action: allow\n")
    record = tmp_path / "stdio-record.jsonl"
    proc = Proc([TOLLGATE, "serve", "--policy", str(policy), "--listen", "127.0.0.1:0", "--", *stdio_argv(record)],
                tmp_path / "serve.log", env=runtime_env(tmp_path))
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
    with anyio.fail_after(60):
        async with Client(url) as client:
            answer = await client.call_tool("echo", {"text": "through a stdio server"})
    assert not answer.is_error and "through a stdio server" in answer.content[0].text
    assert "echo" in record.read_text()


def answer_to(child, id_: int) -> dict:
    """The next message on a `tollgate stdio` child's stdout that answers `id_`."""
    while True:
        line = child.stdout.readline()
        assert line, "stdout closed"
        message = json.loads(line)
        if message.get("id") == id_ and ("result" in message or "error" in message):
            return message


def test_two_stdio_processes_of_one_config_both_start_and_approvals_finds_both(procs, tmp_path):
    """Two desktop entries (`--server a`, `--server b`) of one config with a fixed
    admin.listen: the second takes an ephemeral admin port; `tollgate approvals` with no
    --admin lists, shows and approves the held calls of both; their records go with them."""
    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text(APPROVAL_POLICY)
    admin_port = 20000 + os.getpid() % 20000
    config = tmp_path / "desktop.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:{admin_port}\nservers:\n"
                      f"  a:\n    url: {upstream.url}\n    policy: p.yaml\n  b:\n    url: {upstream.url}\n    policy: p.yaml\n")
    env = {**os.environ, **runtime_env(tmp_path)}
    children = []
    for server in ["a", "b"]:
        log = open(tmp_path / f"stdio-{server}.log", "w")
        child = subprocess.Popen([TOLLGATE, "stdio", "--config", str(config), "--server", server],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        children.append((child, log))
    try:
        for i, (child, _) in enumerate(children):
            child.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}) + "\n")
            child.stdin.flush()
            assert "result" in answer_to(child, 1), f"stdio {i} did not start"
            child.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
            child.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                "name": "start_fhir_export_job", "arguments": {**EXPORT_ARGS, "datastore_id": f"store-{i}"}}}) + "\n")
            child.stdin.flush()
        logs = "".join((tmp_path / f"stdio-{s}.log").read_text() for s in "ab")
        assert f"admin.listen 127.0.0.1:{admin_port} is taken" in logs, logs
        held = pending(tmp_path, 2)
        assert {h["arguments"]["datastore_id"] for h in held} == {"store-0", "store-1"}
        assert len({h["admin"] for h in held}) == 2
        shown = approvals(tmp_path, "show", held[1]["id"], "--format", "json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == held[1]["id"], shown.stderr
        for h in held:
            out = approvals(tmp_path, "approve", h["id"])
            assert out.returncode == 0, out.stderr
        for child, _ in children:
            answer = answer_to(child, 2)
            assert not answer["result"].get("isError"), answer
        assert len(list((tmp_path / "runtime").glob("*.json"))) == 2
    finally:
        for child, log in children:
            child.stdin.close()
            child.wait(timeout=30)
            log.close()
    assert list((tmp_path / "runtime").glob("*.json")) == [], "each instance removes its record on exit"
