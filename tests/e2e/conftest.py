"""Fixtures: the real `tollgate` binary in front of real MCP servers.

Every process is started with a bounded wait for readiness and killed at
teardown. Only loopback addresses are used.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLLGATE = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "debug" / "tollgate"))
PYTHON = sys.executable
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A child process whose stdout lines are collected in the background."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.args = args
        self.log = log
        self.stderr = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = regex.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise TimeoutError(
            f"{self.args[0]} printed no line matching {pattern!r}; exit={self.proc.poll()}\n"
            f"stdout: {self.lines}\nstderr: {self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.stderr.close()


class Upstream:
    def __init__(self, proc: Proc, port: int, record: Path, mode: str):
        self.proc, self.port, self.record, self.mode = proc, port, record, mode
        self.url = f"http://127.0.0.1:{port}/" + ("sse" if mode == "sse" else "mcp")

    def calls(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def tools_called(self) -> list[str]:
        return [c["tool"] for c in self.calls()]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def procs(request):
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
    failed = any(getattr(getattr(request.node, f"report_{w}", None), "failed", False) for w in ("setup", "call"))
    if failed:
        # The children's stderr, so a failure shows what Tollgate and the upstream logged.
        for p in started:
            try:
                tail = p.log.read_text(errors="replace")[-4000:]
            except OSError:
                continue
            print(f"\n----- stderr of {' '.join(map(str, p.args[:3]))} ({p.log.name}) -----\n{tail}")


def start_upstream(procs: list, tmp_path: Path, mode: str = "stateful", port: int | None = None) -> Upstream:
    port = port or free_port()
    record = tmp_path / f"upstream-{port}.jsonl"
    args = [PYTHON, str(HERE / "upstream_server.py"), str(port), str(record)]
    if mode in ("stateless", "sse", "resumable"):
        args.append(f"--{mode}")
    proc = Proc(args, tmp_path / f"upstream-{port}.log")
    procs.append(proc)
    wait_port(port)
    return Upstream(proc, port, record, mode)


class Tollgate:
    def __init__(self, proc: Proc, url: str, admin: str | None, audit: Path):
        self.proc, self.url, self.admin, self.audit_path = proc, url, admin, audit

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]


def start_tollgate(
    procs: list,
    tmp_path: Path,
    upstream_url: str,
    policy: str,
    extra: str = "",
    server_extra: str = "",
    env: dict | None = None,
) -> Tollgate:
    """Writes policy and config into tmp_path and starts `tollgate serve --config`."""
    n = len(procs)
    (tmp_path / f"policy{n}.yaml").write_text(policy)
    audit = tmp_path / f"audit{n}.jsonl"
    config = (
        f"listen: 127.0.0.1:0\n"
        f"audit: {{path: '{audit}'}}\n"
        f"{extra}\n"
        f"servers:\n  upstream:\n    url: {upstream_url}\n    policy: policy{n}.yaml\n{server_extra}"
    )
    (tmp_path / f"tollgate{n}.yaml").write_text(config)
    proc = Proc([TOLLGATE, "serve", "--config", str(tmp_path / f"tollgate{n}.yaml")], tmp_path / f"tollgate{n}.log", env)
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
    admin = None
    if "admin:" in extra:
        admin = proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)
    return Tollgate(proc, url, admin, audit)


class RecordingUpstream:
    """A bare HTTP "MCP server" that accepts anything and records every request.

    Unlike the SDK's own server it checks no Host, Origin or routing header, so a
    test against it proves Tollgate itself refused a request: if Tollgate let one
    through, it shows up in `requests`.
    """

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        # tools/list pages (cursor = page index); answers as SSE instead of JSON when `sse`.
        self.tool_pages: list[list[dict]] = [[{"name": "echo", "inputSchema": {"type": "object"}}]]
        self.sse = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: bytes | None, extra: dict | None = None):
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if body is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    msg = json.loads(raw)
                except ValueError:
                    msg = None
                outer.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": msg, "raw": raw})
                if not isinstance(msg, dict) or "id" not in msg:
                    return self._reply(202, None)
                method = msg.get("method")
                extra = {}
                if method == "initialize":
                    result = {"protocolVersion": msg["params"].get("protocolVersion", "2025-11-25"),
                              "capabilities": {"tools": {}}, "serverInfo": {"name": "recorder", "version": "1"}}
                    extra["mcp-session-id"] = "recorder-session-0123456789abcdef"
                elif method == "server/discover":
                    result = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}},
                              "serverInfo": {"name": "recorder", "version": "1"}, "resultType": "complete"}
                elif method == "tools/list":
                    page = int(((msg.get("params") or {}).get("cursor")) or 0)
                    result = {"tools": outer.tool_pages[page]}
                    if page + 1 < len(outer.tool_pages):
                        result["nextCursor"] = str(page + 1)
                elif method == "tools/call":
                    result = {"content": [{"type": "text", "text": "recorded"}], "isError": False}
                else:
                    result = {}
                answer = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode()
                if outer.sse and method != "initialize":
                    body = b"event: message\ndata: " + answer + b"\n\n"
                    self.send_response(200)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._reply(200, answer, extra)

            def do_GET(self):
                self._reply(405, b"")

            def do_DELETE(self):
                self._reply(200, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tool_calls(self) -> list[dict]:
        return [r for r in self.requests if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()
