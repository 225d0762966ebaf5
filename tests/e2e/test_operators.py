"""For the people who run Tollgate (issue 18): stdio processes that are capped, end when
idle and are counted; probes an orchestrator can use without the admin token; audit
records that hold up (unique call ids across restarts, a run id, what the upstream
answered); and paths in the config that are relative to the config file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import (
    TOLLGATE,
    Proc,
    RawSession,
    StdioUpstream,
    pid_alive,
    serve_config,
    wait_until,
    write_config,
)
from test_core import eventually, post_batch, records, rpc_call

TOKEN = "operators-token-0123456789"
ADMIN = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"
AUTH = {"authorization": f"Bearer {TOKEN}"}

ALLOW_ALL = "version: 1\ndefault: allow\n"

UUID_V7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def admin_of(proc: Proc) -> str:
    return proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)


def live_processes(admin: str, server: str) -> int | None:
    """`tollgate_upstream_processes{server=...}` from /metrics."""
    text = httpx.get(admin + "/metrics", headers=AUTH, timeout=10).text
    found = re.search(r'tollgate_upstream_processes\{server="' + re.escape(server) + r'"\} (\S+)', text)
    return int(float(found.group(1))) if found else None


def pid_of(session: RawSession) -> int:
    answer = session.call("pid", {})
    assert answer.get("result", {}).get("isError") is False, answer
    return int(answer["result"]["content"][0]["text"])


def initialize_params() -> dict:
    return {"protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "operators-e2e", "version": "1"}}


# ---------------------------------------------------------------------------
# 1. stdio upstreams: a cap on live processes, an idle time, a metric.

def test_a_stdio_server_runs_at_most_max_processes_and_the_refusal_names_the_key(procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "capped", extra="    max_processes: 2\n")
    config = write_config(tmp_path, {"capped": (upstream.block, ALLOW_ALL)}, extra=ADMIN)
    base, proc = serve_config(procs, config)
    admin = admin_of(proc)
    url = f"{base}/servers/capped/mcp"
    assert live_processes(admin, "capped") == 0
    first, second, third = RawSession(url), RawSession(url), RawSession(url)
    try:
        first.initialize()
        second.initialize()
        assert live_processes(admin, "capped") == 2
        refused = third.request("initialize", initialize_params())
        assert "error" in refused, f"a third process was started past max_processes: 2: {refused}"
        message = refused["error"]["message"]
        assert "servers.capped.max_processes" in message and "2 processes" in message, message
        assert len(upstream.servers()) == 2, upstream.servers()
        assert live_processes(admin, "capped") == 2
        # Ending a session frees its place.
        first.close()
        third.initialize()
        assert pid_of(third) != pid_of(second)
        assert live_processes(admin, "capped") == 2
    finally:
        for session in (first, second, third):
            session.close()


def test_an_idle_stdio_process_is_ended_and_its_session_carries_on(procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "idler", extra="    idle: 1s\n")
    config = write_config(tmp_path, {"idler": (upstream.block, ALLOW_ALL)}, extra=ADMIN)
    base, proc = serve_config(procs, config)
    admin = admin_of(proc)
    session = RawSession(f"{base}/servers/idler/mcp")
    try:
        session.initialize()
        pid = pid_of(session)
        assert live_processes(admin, "idler") == 1
        wait_until(lambda: not pid_alive(pid), 10, f"the idle process {pid} (idle: 1s) still runs")
        assert live_processes(admin, "idler") == 0
        # The client's session outlives the process: the next call gets a new one.
        again = pid_of(session)
        assert again != pid
        assert session.initializes == 1, "the client had to initialize again"
        assert live_processes(admin, "idler") == 1
    finally:
        session.close()


# ---------------------------------------------------------------------------
# 7. Probes without the token, everything else behind it.

def test_the_probes_answer_without_the_token_on_a_non_loopback_admin_address(procs, tmp_path, recorder):
    # 0.0.0.0 is not a loopback address, so the token is required; the test reaches it on 127.0.0.1.
    admin_line = f"admin: {{listen: '0.0.0.0:0', token: {TOKEN}}}"
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW_ALL)}, extra=admin_line)
    _, proc = serve_config(procs, config)
    port = proc.wait_line(r"Tollgate admin on http://0\.0\.0\.0:(\d+)/").group(1)
    admin = f"http://127.0.0.1:{port}"

    assert httpx.get(admin + "/healthz", timeout=10).status_code == 200
    ready = httpx.get(admin + "/readyz", timeout=10)
    assert ready.status_code == 200, f"/readyz without the token: {ready.status_code} {ready.text}"
    assert ready.json() == {"ready": True}, "without the token /readyz says only whether it is ready"
    detailed = httpx.get(admin + "/readyz", headers=AUTH, timeout=10).json()
    assert detailed["ready"] is True and detailed["upstreams"]["up"]["ready"] is True, detailed

    for method, path in [("GET", "/status"), ("GET", "/metrics"), ("GET", "/approvals"),
                         ("GET", "/approvals/x"), ("POST", "/reload"), ("POST", "/approvals/x/approve")]:
        r = httpx.request(method, admin + path, timeout=10)
        assert r.status_code == 401, f"{method} {path} without the token: {r.status_code}"
    assert httpx.get(admin + "/status", headers=AUTH, timeout=10).status_code == 200


# ---------------------------------------------------------------------------
# 11. call_id unique across restarts; a run id on every record.

def test_call_ids_are_unique_across_restarts_and_every_record_names_its_run(procs, tmp_path, recorder):
    audit = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW_ALL)}, extra=f"audit: {{path: '{audit}'}}")
    for _ in range(2):
        base, proc = serve_config(procs, config)
        session = RawSession(f"{base}/mcp")
        try:
            session.initialize()
            for text in ("a", "b"):
                assert "result" in session.call("echo", {"text": text})
        finally:
            session.close()
        proc.stop()
        procs.remove(proc)

    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    decisions = [r for r in lines if r["event"] == "decision"]
    outcomes = [r for r in lines if r["event"] == "outcome"]
    ids = [r["call_id"] for r in decisions]
    assert len(ids) == 4 and len(set(ids)) == 4, f"one call_id names several calls: {ids}"
    assert all(isinstance(i, str) and UUID_V7.match(i) for i in ids), ids
    assert sorted(r["call_id"] for r in outcomes) == sorted(ids)
    runs = [r.get("run") for r in lines]
    assert all(isinstance(run, str) and UUID_V7.match(run) for run in runs), runs
    first, second = runs[0], runs[-1]
    assert first != second, "two processes wrote the same run id"
    assert runs == [first] * runs.count(first) + [second] * runs.count(second), runs
    assert runs.count(first) == 4, "each run wrote two decisions and two outcomes"


# ---------------------------------------------------------------------------
# 12. Paths relative to the config file, not to the working directory.

def test_relative_paths_in_the_config_are_relative_to_the_config_file(procs, tmp_path, recorder):
    conf = tmp_path / "conf"
    (conf / "work").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    upstream = StdioUpstream(tmp_path, "local", extra="    cwd: work\n")
    config = write_config(conf, {"http": (recorder.url, ALLOW_ALL), "local": (upstream.block, ALLOW_ALL)},
                          extra="audit: {path: audit.jsonl}", name="tollgate.yaml")
    # Started as a desktop client would: from some other directory, with a relative --config.
    args = [TOLLGATE, "serve", "--config", os.path.relpath(config, elsewhere)]
    proc = Proc(args, tmp_path / "tollgate.log", cwd=elsewhere)
    procs.append(proc)
    base = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+)").group(1)

    http = RawSession(f"{base}/servers/http/mcp")
    local = RawSession(f"{base}/servers/local/mcp")
    try:
        http.initialize()
        assert "result" in http.call("echo", {"text": "where"})
        assert not (elsewhere / "audit.jsonl").exists(), "audit.path was taken relative to the working directory"
        wait_until(lambda: (conf / "audit.jsonl").exists(), 5, "no audit file beside the config file")
        local.initialize()
        pid = pid_of(local)
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == conf / "work", "servers.local.cwd is not relative to the config file"
    finally:
        http.close()
        local.close()


# ---------------------------------------------------------------------------
# 13. An outcome record says what the upstream answered.

class AnsweringUpstream:
    """A bare Streamable HTTP "MCP server" whose tools answer in every way a call can be
    answered: `fine` (a result), `fails` (a result with isError: true), `refuses` (a
    JSON-RPC error -32602). With the argument `sse: true` the answer comes as an SSE
    stream, after a progress notification."""

    def __init__(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status: int, kind: str | None, raw: bytes, extra: dict | None = None):
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if kind:
                    self.send_header("content-type", kind)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def answer(self, msg: dict) -> dict | None:
                if "id" not in msg:
                    return None
                method, params = msg.get("method"), msg.get("params") or {}
                if method == "initialize":
                    result = {"protocolVersion": params.get("protocolVersion", "2025-11-25"),
                              "capabilities": {"tools": {}}, "serverInfo": {"name": "answering", "version": "1"}}
                elif method == "tools/call":
                    name = params.get("name")
                    if name == "refuses":
                        return {"jsonrpc": "2.0", "id": msg["id"],
                                "error": {"code": -32602, "message": "bad arguments"}}
                    result = {"content": [{"type": "text", "text": name}], "isError": name == "fails"}
                else:
                    result = {}
                return {"jsonrpc": "2.0", "id": msg["id"], "result": result}

            def do_POST(self):
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                extra = {"mcp-session-id": "answering-session-0123456789abcdef"}
                if isinstance(msg, list):
                    answers = [a for a in map(self.answer, msg) if a is not None]
                    return self.send(200, "application/json", json.dumps(answers).encode(), extra)
                answer = self.answer(msg)
                if answer is None:
                    return self.send(202, None, b"")
                if ((msg.get("params") or {}).get("arguments") or {}).get("sse"):
                    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                                "params": {"progressToken": "t", "progress": 1}}
                    body = b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n"
                                    for m in (progress, answer))
                    return self.send(200, "text/event-stream", body, extra)
                self.send(200, "application/json", json.dumps(answer).encode(), extra)

            def do_DELETE(self):
                self.send(200, None, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def answering():
    upstream = AnsweringUpstream()
    yield upstream
    upstream.close()


class Audited:
    """What `records` needs: the audit log of one Tollgate."""

    def __init__(self, path: Path):
        self.audit_path = path

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]


def test_an_outcome_record_says_what_the_upstream_answered(procs, tmp_path, answering):
    audit = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, {"up": (answering.url, ALLOW_ALL)}, extra=f"audit: {{path: '{audit}'}}")
    base, _ = serve_config(procs, config)
    session = RawSession(f"{base}/mcp", protocol="2025-03-26")
    try:
        session.initialize()
        for sse in (False, True):
            assert session.call("fine", {"sse": sse})["result"]["isError"] is False
            assert session.call("fails", {"sse": sse})["result"]["isError"] is True
            assert session.call("refuses", {"sse": sse})["error"]["code"] == -32602
        r = post_batch(session, [rpc_call(100, "refuses", {}), rpc_call(101, "fine", {}), rpc_call(102, "fails", {})])
        assert r.status_code == 200, r.text
        assert {a["id"] for a in r.json()} == {100, 101, 102}
    finally:
        session.close()

    tg = Audited(audit)
    decisions = records(tg, "decision")
    assert len(decisions) == 9, decisions
    outcomes = eventually(lambda: records(tg, "outcome"), lambda found: len(found) >= 9)
    tool_of = {d["call_id"]: d["tool"] for d in decisions}
    seen = sorted((tool_of[o["call_id"]], o["outcome"], o.get("code")) for o in outcomes)
    assert seen == sorted(
        [("fine", "ok", None), ("fails", "tool_error", None), ("refuses", "rpc_error", -32602)] * 3
    ), f"JSON answers, SSE answers and a batch's answers, each by what it said: {seen}"
