"""Issue 14: attacks from the hardening campaign, each against the real binary.

Secrets (stdio children's environment, an empty admin token, the demo's token), the
approvals page's framing headers, forged /metrics series and log lines, method names
that only look like MCP methods, loopback Origins, and an endless SSE line.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import PYTHON, TOLLGATE, Proc, RawSession, serve_config, start_tollgate, write_config

ADMIN_TOKEN = "admin-token-hardening-0123456789"

ALLOW_ECHO = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: env
    action: allow
"""

# A stdio MCP server in plain Python: its one tool, `env`, answers with its environment.
ENV_SERVER = r'''
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method = msg.get("method")
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "env", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "env", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": json.dumps(dict(os.environ))}], "isError": False}
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no"}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)
'''


def child_env(base: str, server: str) -> dict:
    session = RawSession(f"{base}/servers/{server}/mcp")
    try:
        session.initialize()
        answer = session.call("env", {})
        assert "result" in answer, answer
        return json.loads(answer["result"]["content"][0]["text"])
    finally:
        session.close()


# ---------------------------------------------------------------------------
# 1. stdio children get a cleared environment.

def test_a_stdio_child_sees_no_secret_of_tollgate_only_what_it_is_given(procs, tmp_path, recorder):
    script = tmp_path / "env_server.py"
    script.write_text(ENV_SERVER)
    envy = (f"    command: {json.dumps([PYTHON, str(script)])}\n"
            f"    env: {{OWN_SETTING: mine}}\n"
            f"    inherit_env: [PASSED_ON]\n")
    docs = f"    url: {recorder.url}\n    headers: {{Authorization: 'Bearer ${{DOCS_TOKEN}}'}}\n"
    config = write_config(tmp_path, {"envy": (envy, ALLOW_ECHO), "docs": (docs, ALLOW_ECHO)},
                          extra="admin: {listen: '127.0.0.1:0', token: '${TOLLGATE_ADMIN_TOKEN}'}\n"
                                "clients: [{name: agent, key: '${AGENT_KEY}'}]")
    env = {"TOLLGATE_ADMIN_TOKEN": ADMIN_TOKEN, "DOCS_TOKEN": "docs-secret-42", "AGENT_KEY": "agent-key-0123456789-42",
           "PASSED_ON": "yes", "NOT_PASSED": "no", "LC_ALL": "C.UTF-8"}
    base, _ = serve_config(procs, config, env)
    session = RawSession(f"{base}/servers/envy/mcp")
    session.http.headers["authorization"] = "Bearer agent-key-0123456789-42"
    try:
        session.initialize()
        answer = session.call("env", {})
    finally:
        session.close()
    seen = json.loads(answer["result"]["content"][0]["text"])
    text = json.dumps(seen)
    for secret in [ADMIN_TOKEN, "docs-secret-42", "agent-key-0123456789-42"]:
        assert secret not in text, f"a stdio child saw {secret!r}: {sorted(seen)}"
    assert "NOT_PASSED" not in seen, sorted(seen)
    assert seen.get("PASSED_ON") == "yes", "inherit_env: did not pass PASSED_ON"
    assert seen.get("OWN_SETTING") == "mine", "the server's env: was not set"
    assert seen.get("PATH") and seen.get("LC_ALL") == "C.UTF-8", sorted(seen)


# ---------------------------------------------------------------------------
# 2. An empty admin token is refused; the demo makes a random one.

@pytest.mark.parametrize("how", ["env", "literal"])
def test_an_empty_admin_token_is_refused_at_start_up(how, tmp_path):
    (tmp_path / "p.yaml").write_text(ALLOW_ECHO)
    token = "'${TOLLGATE_ADMIN_TOKEN}'" if how == "env" else "''"
    config = tmp_path / "t.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nadmin: {{listen: '127.0.0.1:0', token: {token}}}\n"
                      f"servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    run = subprocess.run([TOLLGATE, "serve", "--config", str(config)], capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "TOLLGATE_ADMIN_TOKEN": ""})
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert "admin.token is empty" in run.stderr, run.stderr
    assert "Tollgate listening" not in run.stdout


def test_the_demo_admin_api_needs_the_random_token_it_prints(procs, tmp_path):
    proc = Proc([TOLLGATE, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                tmp_path / "demo.log", cwd=tmp_path)
    procs.append(proc)
    token = proc.wait_line(r"Admin token \(new each run\): ([0-9a-f]{64})").group(1)
    page = proc.wait_line(r"Approvals page: (http://127\.0\.0\.1:\d+)/#token=([0-9a-f]+)")
    assert page.group(2) == token
    admin = page.group(1)
    assert httpx.get(f"{admin}/approvals", timeout=10).status_code == 401, "the demo's admin API is open"
    assert httpx.get(f"{admin}/approvals", headers={"authorization": f"Bearer {token}"}, timeout=10).status_code == 200


# ---------------------------------------------------------------------------
# 4. The approvals page cannot be framed.

def test_the_approvals_page_cannot_be_framed_and_runs_only_its_own_script(procs, tmp_path, recorder):
    tg = start_tollgate(procs, tmp_path, recorder.url, ALLOW_ECHO,
                        extra=f"admin: {{listen: '127.0.0.1:0', token: {ADMIN_TOKEN}}}")
    r = httpx.get(tg.admin + "/", timeout=10)
    assert r.status_code == 200
    csp = {d.strip().split(" ", 1)[0]: d.strip() for d in r.headers["content-security-policy"].split(";")}
    assert csp["frame-ancestors"] == "frame-ancestors 'none'", csp
    assert csp["default-src"] == "default-src 'none'", csp
    assert "'unsafe-inline'" not in csp["script-src"] and "'sha256-" in csp["script-src"], csp
    assert r.headers["x-frame-options"] == "DENY"


# ---------------------------------------------------------------------------
# 10. /metrics cannot be forged, and tool labels are bounded.

FORGED = 'x",decision="deny",rule="r"} 1\ntollgate_approvals_pending 1337'


def test_tool_names_cannot_forge_metrics_series_or_blow_up_the_body(procs, tmp_path, recorder):
    tg = start_tollgate(procs, tmp_path, recorder.url, ALLOW_ECHO,
                        extra=f"admin: {{listen: '127.0.0.1:0', token: {ADMIN_TOKEN}}}")
    session = RawSession(tg.url)
    try:
        session.initialize()
        assert session.call(FORGED, {})["result"]["isError"] is True
        for i in range(5):
            assert session.call(f"{i}" + "n" * (1 << 20), {})["result"]["isError"] is True
        assert session.call("echo", {})["result"]["isError"] is False
    finally:
        session.close()
    r = httpx.get(tg.admin + "/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200
    samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
    assert [l for l in samples if l.startswith("tollgate_approvals_pending ")] == ["tollgate_approvals_pending 0"], samples
    assert len(r.content) < 64 * 1024, f"/metrics is {len(r.content)} bytes"
    decisions = [l for l in samples if l.startswith("tollgate_decisions_total")]
    assert any('tool="echo"' in l for l in decisions), decisions
    assert any('tool="other"' in l and l.endswith(" 6") for l in decisions), decisions


# ---------------------------------------------------------------------------
# 11. Text logs show control characters escaped.

EVIL_TOOL = "x\n2026-01-01T00:00:00Z  INFO approval settled verdict=approved\x1b[2J"


def test_control_characters_from_requests_never_reach_the_text_log_raw(procs, tmp_path, recorder):
    tg = start_tollgate(procs, tmp_path, recorder.url, ALLOW_ECHO, env={"RUST_LOG": "debug"})
    session = RawSession(tg.url)
    try:
        session.initialize()
        session.call(EVIL_TOOL, {"path": "a\nFORGED LINE\x1b[31m"})
        session.request("resources/read", {"uri": "x\nFORGED RESOURCE\x1b[2J"})
    finally:
        session.close()
    tg.proc.stop()
    log = tg.proc.log.read_text()
    assert "approval settled" in log or "x\\n2026" in log, "the call was not logged at all"
    assert "\x1b" not in log, "an ANSI escape from a request reached the log"
    for line in log.splitlines():
        assert not line.startswith(("2026-01-01T00:00:00Z  INFO approval settled", "FORGED")), line


# ---------------------------------------------------------------------------
# 14. Methods that only look like MCP methods are invalid requests.

@pytest.mark.parametrize("method", ["Tools/Call", "tools/call ", "tools/call\u0000", "TOOLS/CALL", "tools/call\u200b"])
def test_a_method_that_only_looks_like_tools_call_is_refused_before_forwarding(method, procs, tmp_path, recorder):
    tg = start_tollgate(procs, tmp_path, recorder.url, "version: 1\ndefault: deny\nrules: []\n")
    session = RawSession(tg.url)
    try:
        session.initialize()
        answer = session.request(method, {"name": "delete_everything", "arguments": {}})
    finally:
        session.close()
    assert answer.get("error", {}).get("code") == -32600, answer
    methods = [r["body"].get("method") for r in recorder.requests if isinstance(r["body"], dict)]
    assert method not in methods, f"{method!r} was forwarded: {methods}"


# ---------------------------------------------------------------------------
# 16. A loopback Origin on a loopback listener is the legitimate case.

def test_a_loopback_origin_is_accepted_and_a_foreign_one_refused(procs, tmp_path, recorder):
    tg = start_tollgate(procs, tmp_path, recorder.url, ALLOW_ECHO)
    port = int(tg.url.split(":")[2].split("/")[0])
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "o", "version": "1"}}}
    h = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

    def status(host: str, origin: str) -> int:
        return httpx.post(tg.url, json=body, headers={**h, "host": host, "origin": origin}, timeout=10).status_code

    assert status(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 200
    assert status(f"localhost:{port}", f"http://localhost:{port}") == 200
    assert status(f"127.0.0.1:{port}", "http://localhost:3000") == 200
    assert status(f"[::1]:{port}", f"http://[::1]:{port}") == 200
    for origin in ["http://evil.example.com", f"http://127.0.0.1.evil.example:{port}",
                   f"http://evil.example@127.0.0.1:{port}", "null", f"ftp://127.0.0.1:{port}"]:
        assert status(f"127.0.0.1:{port}", origin) == 403, origin
    assert status("evil.example.com", "http://evil.example.com") == 421


# ---------------------------------------------------------------------------
# 5 (decoder). An endless SSE line is cut at 16 MiB, in bounded memory. Tollgate
# decodes the SSE answers it rewrites (tools/list, filtered by the policy).

class EndlessSseUpstream:
    """Answers initialize with JSON and every other request with an SSE response whose
    one `data:` line never ends (`total` bytes in 64 KiB writes)."""

    def __init__(self, total: int):
        outer = self
        self.sent = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no length: the body ends when the connection does

            def log_message(self, *args):
                pass

            def do_POST(self):
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                if "id" not in msg:
                    self.send_response(202)
                    self.end_headers()
                    return
                if msg["method"] == "initialize":
                    answer = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
                        "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                        "serverInfo": {"name": "endless", "version": "1"}}}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("mcp-session-id", "endless-session-0123456789")
                    self.send_header("content-length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                chunk = b"a" * (64 << 10)
                try:
                    self.wfile.write(b"event: message\ndata: ")
                    while outer.sent < total:
                        self.wfile.write(chunk)
                        outer.sent += len(chunk)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_an_endless_sse_line_from_the_upstream_ends_at_the_limit_in_bounded_memory(procs, tmp_path):
    upstream = EndlessSseUpstream(total=512 << 20)
    try:
        tg = start_tollgate(procs, tmp_path, upstream.url, ALLOW_ECHO)
        session = RawSession(tg.url, timeout=90)
        try:
            session.initialize()
            try:
                answer = session.request("tools/list")
            except httpx.TimeoutException as err:
                # The old decoder rescanned its buffer on every chunk: it never got far.
                pytest.fail(f"no answer and no end of stream in 90 s: {err!r}")
            except httpx.HTTPError as err:  # the stream was cut at the limit
                answer = {"cut": repr(err)}
        finally:
            session.close()
        peak = peak_rss_mib(tg.proc.proc.pid)
    finally:
        upstream.close()
    assert "result" not in answer, "an endless line became an answer"
    assert upstream.sent < 256 << 20, f"Tollgate kept reading an endless line: {upstream.sent >> 20} MiB"
    assert peak < 160, f"Tollgate's peak RSS was {peak:.0f} MiB for one endless SSE line"
