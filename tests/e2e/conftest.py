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

    @property
    def block(self) -> str:
        """The config lines (under a server's name) that point a server at this upstream."""
        if self.mode == "sse":
            return f"    transport: sse\n    url: {self.url}\n"
        return f"    url: {self.url}\n"


def stdio_argv(record: Path) -> list[str]:
    return [PYTHON, str(HERE / "upstream_server.py"), "0", str(record), "--stdio"]


class StdioUpstream:
    """upstream_server.py --stdio, for Tollgate to spawn (`command:`). Its record path is
    unique to the test, so it also finds the children in /proc (see `live_pids`)."""

    mode = "stdio"

    def __init__(self, tmp_path: Path, name: str = "stdio", extra: str = ""):
        self.record = tmp_path / f"{name}-record.jsonl"
        self.argv = stdio_argv(self.record)
        self.marker = str(self.record)
        self.block = f"    command: {json.dumps(self.argv)}\n{extra}"

    calls = Upstream.calls
    tools_called = Upstream.tools_called

    def pids(self) -> set[int]:
        """Every live process with this upstream's command on its command line: the
        servers, and whatever Tollgate runs them under (a guard, a shell)."""
        return live_pids(self.marker)

    def servers(self) -> set[int]:
        """The live processes running exactly this upstream's command."""
        argv = b"\0".join(a.encode() for a in self.argv) + b"\0"
        found = set()
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == argv:
                    found.add(pid)
            except OSError:
                continue
        return found

    def family(self, pid: int) -> set[int]:
        """`pid` and its ancestors that carry this upstream's command line (a guard)."""
        found = set()
        while pid in self.pids():
            found.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
        return found

    def exits(self) -> dict[int, str]:
        """pid -> how each child ended: "eof" (by itself, its stdin closed) or "sigterm"."""
        path = Path(str(self.record) + ".exit")
        if not path.exists():
            return {}
        return {e["pid"]: e["exit"] for e in map(json.loads, path.read_text().splitlines())}


def make_upstream(kind: str, procs: list, tmp_path: Path, name: str = "up"):
    """kind: http (Streamable HTTP, stateful), sse (legacy HTTP+SSE) or stdio (spawned by Tollgate)."""
    if kind == "stdio":
        return StdioUpstream(tmp_path, name)
    return start_upstream(procs, tmp_path, {"http": "stateful", "sse": "sse"}[kind])


def live_pids(marker: str) -> set[int]:
    """Processes (not zombies) whose command line contains `marker`, other than this one."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker.encode() not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.add(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate, timeout: float, what: str):
    """Polls `predicate` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still not the case after {timeout}s")
        time.sleep(0.05)


class StderrLog:
    """A log file some other launcher writes a process's stderr into (the SDK's
    stdio_client), kept in `procs` so a failed test prints it like the others."""

    def __init__(self, log: Path, args: list[str]):
        self.log, self.args = log, args
        self.file = open(log, "w", encoding="utf-8")

    def stop(self) -> None:
        self.file.close()


def write_config(tmp_path: Path, servers: dict, extra: str = "", name: str = "multi.yaml") -> Path:
    """servers: name -> (upstream URL, or config lines indented by 4 spaces, policy text).
    Each policy is written beside the config as <server>.yaml."""
    blocks = []
    for server, (target, policy) in servers.items():
        (tmp_path / f"{server}.yaml").write_text(policy)
        where = target if target.startswith("    ") else f"    url: {target}\n"
        blocks.append(f"  {server}:\n{where}    policy: {server}.yaml\n")
    config = tmp_path / name
    config.write_text(f"listen: 127.0.0.1:0\n{extra}\nservers:\n" + "".join(blocks))
    return config


def serve_config(procs: list, config: Path, env: dict | None = None) -> tuple[str, Proc]:
    """Starts `tollgate serve --config`; returns the base URL (no path) and the process."""
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], config.with_suffix(".log"), env)
    procs.append(proc)
    base = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+)").group(1)
    return base, proc


DOWNSTREAMS = ["http-auto", "http-legacy", "sse", "stdio-legacy", "stdio-auto"]


def downstream(kind: str, procs: list, tmp_path: Path, server: str, base: str | None = None,
               config: Path | None = None, **client_kwargs):
    """An SDK `Client` (not entered) reaching `server` through Tollgate over `kind`:
    http-auto / http-legacy: Streamable HTTP at /servers/<server>/mcp (base from serve_config);
    sse: legacy HTTP+SSE at /servers/<server>/sse;
    stdio-legacy / stdio-auto: `tollgate stdio --config CONFIG --server <server>` via stdio_client."""
    from mcp import Client
    from mcp.client.sse import sse_client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    if kind.startswith("http-"):
        return Client(f"{base}/servers/{server}/mcp", mode=kind.removeprefix("http-"), **client_kwargs)
    if kind == "sse":
        return Client(sse_client(f"{base}/servers/{server}/sse", timeout=30), mode="legacy", **client_kwargs)
    if kind.startswith("stdio-"):
        args = ["stdio", "--config", str(config), "--server", server]
        log = StderrLog(tmp_path / f"tollgate-stdio-{server}-{len(procs)}.log", [TOLLGATE, *args])
        procs.append(log)
        params = StdioServerParameters(command=TOLLGATE, args=args, env={**os.environ})
        return Client(stdio_client(params, errlog=log.file), mode=kind.removeprefix("stdio-"), **client_kwargs)
    raise ValueError(kind)


def sse_answer(text: str, id_) -> dict | None:
    """The JSON-RPC answer with `id_` among the events of an SSE body."""
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if not data:
            continue
        msg = json.loads(data)
        if isinstance(msg, dict) and msg.get("id") == id_ and ("result" in msg or "error" in msg):
            return msg
    return None


class RawSession:
    """A handshake-era Streamable HTTP client in plain httpx, so a test knows every
    request it made (e.g. that it initialized exactly once)."""

    def __init__(self, url: str, protocol: str = "2025-06-18", timeout: float = 30):
        import httpx

        self.http = httpx.Client(timeout=timeout)
        self.url, self.protocol = url, protocol
        self.session_id: str | None = None
        self.next_id = 1
        self.initializes = 0

    def _headers(self) -> dict:
        h = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if self.session_id:
            h["mcp-session-id"] = self.session_id
            h["mcp-protocol-version"] = self.protocol
        return h

    def request(self, method: str, params: dict | None = None) -> dict:
        """Sends one request; returns its JSON-RPC answer, or {"http_status", "body"} when
        the answer is no JSON-RPC message."""
        id_ = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or {}}
        r = self.http.post(self.url, json=msg, headers=self._headers())
        self.last = r
        kind = r.headers.get("content-type", "")
        if kind.startswith("application/json"):
            return r.json()
        if kind.startswith("text/event-stream"):
            answer = sse_answer(r.text, id_)
            if answer is not None:
                return answer
        return {"http_status": r.status_code, "body": r.text}

    def notify(self, method: str) -> int:
        r = self.http.post(self.url, json={"jsonrpc": "2.0", "method": method}, headers=self._headers())
        return r.status_code

    def initialize(self) -> dict:
        self.initializes += 1
        answer = self.request("initialize", {"protocolVersion": self.protocol, "capabilities": {},
                                             "clientInfo": {"name": "raw-e2e", "version": "1"}})
        assert "result" in answer, answer
        self.session_id = self.last.headers["mcp-session-id"]
        assert self.notify("notifications/initialized") == 202
        return answer

    def call(self, name: str, arguments: dict) -> dict:
        return self.request("tools/call", {"name": name, "arguments": arguments})

    def close(self, delete: bool = True) -> None:
        if delete and self.session_id:
            try:
                self.http.delete(self.url, headers=self._headers())
            except Exception:
                pass
        self.http.close()


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
                # Tollgate's readiness probe (an `initialize` every health_interval) is not a request under test.
                probe = isinstance(msg, dict) and ((msg.get("params") or {}).get("clientInfo") or {}).get("name") == "tollgate-readiness"
                if not probe:
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

    def __enter__(self) -> "RecordingUpstream":
        return self

    def __exit__(self, *exc):
        self.close()


class SilentUpstream:
    """A TCP listener that accepts connections and never answers: an upstream that hangs."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/mcp"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:  # closed
                return

    def __enter__(self) -> "SilentUpstream":
        return self

    def __exit__(self, *exc):
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def recorder():
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()


class BatchUpstream:
    """A bare 2025-03-26 Streamable HTTP server that answers JSON-RPC batches (the SDK
    upstreams take none). `result(method, params)` gives each request's result; it
    answers `initialize` itself."""

    def __init__(self, result, session_id: str = "batch-session-0123456789abcdef"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        def answer(msg: dict) -> dict | None:
            if "id" not in msg:
                return None
            if msg.get("method") == "initialize":
                out = {"protocolVersion": "2025-03-26", "capabilities": {"tools": {}},
                       "serverInfo": {"name": "batch", "version": "1"}}
            else:
                out = result(msg.get("method"), msg.get("params") or {})
            return {"jsonrpc": "2.0", "id": msg["id"], "result": out}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                out = [a for a in map(answer, msg) if a] if isinstance(msg, list) else answer(msg)
                body = json.dumps(out).encode() if out else b""
                self.send_response(200 if out else 202)
                self.send_header("mcp-session-id", session_id)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_DELETE(self):  # noqa: N802
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
