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
