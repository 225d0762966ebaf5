"""Hardening (issue 14): each test reproduces one attack of the campaign against the
real binary and checks that it no longer works. Memory bounds are RSS ceilings read
from /proc/<pid>/status, never timings; waits are bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import (
    PYTHON, TOLLGATE, Proc, RawSession, serve_config, start_upstream, stdio_argv, wait_until,
    write_config,
)
from test_stdio import StdioPeer

ALLOW = "version: 1\ndefault: allow\nrules: []\n"
TOKEN = "admin-token-0123456789"
ADMIN = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n"
H = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
MIB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def initialize(id_=0, capabilities: dict | None = None) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": capabilities or {},
        "clientInfo": {"name": "hardening", "version": "1"}}}


def admin_url(proc: Proc) -> str:
    return proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)


def metric(admin: str, prefix: str) -> float:
    text = httpx.get(f"{admin}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# ---------------------------------------------------------------------------
# 6. A session keeps what a re-initialize needs, not the client's whole initialize.

def test_initialize_bodies_are_not_kept_whole_by_their_sessions(procs, tmp_path, recorder):
    base, proc = serve_config(procs, write_config(tmp_path, {"up": (recorder.url, ALLOW)}))
    url = f"{base}/mcp"
    pid = proc.proc.pid
    pad = "x" * (3_500_000)
    big = lambda i: initialize(i, {"experimental": {"pad": pad}})  # noqa: E731
    with httpx.Client(timeout=30) as http:
        assert http.post(url, json=initialize(), headers=H).status_code == 200
        # A few first: what reading one such body takes is held by the allocator afterwards.
        for i in range(100, 105):
            http.post(url, json=big(i), headers=H)
        before = rss_mib(pid)
        answers = [http.post(url, json=big(i), headers=H) for i in range(1, 41)]
        grown = rss_mib(pid) - before
        # A modest initialize (well under the limit) still opens a session.
        modest = http.post(url, json=initialize(99, {"experimental": {"pad": "y" * 40_000}}), headers=H)
    # Before: +150 MiB (each session kept its initialize).
    assert grown < 32, f"40 sessions with 3.5 MiB initialize bodies grew RSS by {grown:.0f} MiB"
    for answer in answers:
        error = answer.json().get("error")
        assert error and "64 KiB" in error["message"] and "initialize" in error["message"], answer.text
        assert "mcp-session-id" not in answer.headers
    assert modest.status_code == 200 and "result" in modest.json(), modest.text
    assert modest.headers.get("mcp-session-id")


# ---------------------------------------------------------------------------
# 7. A settled approval keeps a preview of its arguments, not the arguments.

APPROVAL_POLICY = """
version: 1
default: allow
rules:
  - tool: big
    action: require_approval
    reason: needs a human
    approval: { timeout: 2 }
"""


def test_settled_approvals_keep_a_preview_of_large_arguments(procs, tmp_path, recorder):
    config = write_config(tmp_path, {"up": (recorder.url, APPROVAL_POLICY)}, extra=ADMIN)
    # What is measured is what the approvals keep, not what the allocator caches:
    # mimalloc returns freed pages only when the freeing thread next allocates, so an
    # idle lane would hold a batch's peak (tens of MiB, differing run to run).
    base, proc = serve_config(procs, config, env={"MIMALLOC_PURGE_DELAY": "0"})
    admin = admin_url(proc)
    url = f"{base}/mcp"
    pid = proc.proc.pid

    def held_call(i: int):
        s = RawSession(url)
        try:
            s.initialize()
            s.call("big", {"n": i, "blob": "z" * 3_500_000})  # waits for the approval to expire
        finally:
            s.close()

    def batch(first: int):  # 8 calls held at once
        threads = [threading.Thread(target=held_call, args=(first + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    # A first batch: what 8 calls held at once take is held by the allocator afterwards.
    batch(0)
    time.sleep(0.5)
    before = rss_mib(pid)
    for first in range(8, 48, 8):
        batch(first)
    time.sleep(0.5)
    grown = rss_mib(pid) - before
    approvals = httpx.get(f"{admin}/approvals", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    settled = [a for a in approvals if a["status"] != "pending"]
    assert len(settled) == 48, [a["status"] for a in approvals]
    # Before: +110 MiB for 40 more settled approvals (each kept its arguments).
    assert grown < 32, f"40 settled approvals with 3.5 MiB arguments grew RSS by {grown:.0f} MiB"
    for approval in settled:
        assert approval["arguments_truncated_from"] > 3_500_000, approval.keys()
        assert isinstance(approval["arguments"], str) and len(approval["arguments"]) < 4096
        assert approval["arguments"].startswith('{"n":')
    assert recorder.tool_calls() == []


# ---------------------------------------------------------------------------
# 8. Per-client quotas: sessions, legacy streams, and GET streams per session.

CLIENTS = """
clients:
  - {name: alice, key: alice-key-0123456789}
  - {name: bob, key: bob-key-0123456789}
"""
ALICE = {**H, "authorization": "Bearer alice-key-0123456789"}
BOB = {**H, "authorization": "Bearer bob-key-0123456789"}


def test_one_client_cannot_take_every_session(procs, tmp_path, recorder):
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW)},
                          extra=CLIENTS + "limits: {max_sessions: 10, sessions_per_client: 3}\n")
    base, _ = serve_config(procs, config)
    url = f"{base}/mcp"
    with httpx.Client(timeout=10) as http:
        alice = [http.post(url, json=initialize(i), headers=ALICE) for i in range(3)]
        assert all(r.status_code == 200 for r in alice), [r.text for r in alice]
        over = http.post(url, json=initialize(3), headers=ALICE)
        assert over.status_code == 429, over.text
        assert "limits.sessions_per_client" in over.json()["error"]["message"]
        # Another client is not locked out.
        bob = http.post(url, json=initialize(4), headers=BOB)
        assert bob.status_code == 200 and bob.headers["mcp-session-id"], bob.text
        # Ending a session gives its slot back.
        ended = {**ALICE, "mcp-session-id": alice[0].headers["mcp-session-id"]}
        assert http.delete(url, headers=ended).status_code == 200
        again = http.post(url, json=initialize(5), headers=ALICE)
        assert again.status_code == 200, again.text


def test_one_client_cannot_take_every_legacy_stream(procs, tmp_path, recorder):
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW)},
                          extra=CLIENTS + "limits: {sessions_per_client: 2}\n")
    base, _ = serve_config(procs, config)
    sse = {"accept": "text/event-stream"}
    with httpx.Client(timeout=10) as http:
        opened = []
        try:
            for _ in range(2):
                stream = http.stream("GET", f"{base}/sse", headers={**sse, "authorization": ALICE["authorization"]})
                response = stream.__enter__()
                lines = response.iter_lines()  # kept: dropping it closes the stream
                opened.append((stream, lines))
                assert response.status_code == 200
                assert next(lines).startswith("event: endpoint")
            over = httpx.get(f"{base}/sse", headers={**sse, "authorization": ALICE["authorization"]}, timeout=10)
            assert over.status_code == 429, over.text
            assert "limits.sessions_per_client" in over.json()["error"]["message"]
            with httpx.stream("GET", f"{base}/sse", headers={**sse, "authorization": BOB["authorization"]},
                              timeout=10) as bob:
                assert bob.status_code == 200
        finally:
            for stream, _ in opened:
                stream.__exit__(None, None, None)


def test_a_session_opens_one_get_stream_at_a_time(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    base, _ = serve_config(procs, write_config(tmp_path, {"up": (upstream.url, ALLOW)}))
    url = f"{base}/mcp"
    session = RawSession(url)
    session.initialize()
    get = {"accept": "text/event-stream", "mcp-session-id": session.session_id,
           "mcp-protocol-version": session.protocol}
    first_client = httpx.Client(timeout=10)
    first = first_client.stream("GET", url, headers=get)
    response = first.__enter__()
    try:
        assert response.status_code == 200
        # The default is one GET stream per session: a second one never reaches the upstream.
        for _ in range(5):
            second = httpx.get(url, headers=get, timeout=10)
            assert second.status_code == 429, (second.status_code, second.text)
            assert "limits.streams_per_session" in second.json()["error"]["message"]
    finally:
        first.__exit__(None, None, None)
        first_client.close()

    def reopened():
        with httpx.stream("GET", url, headers=get, timeout=10) as again:
            return again.status_code != 429

    # Closing the stream gives its slot back (noticed at the next keep-alive write).
    wait_until(reopened, 20, "a GET stream once the first one closed")
    session.close()


# ---------------------------------------------------------------------------
# 9. Slowloris: half-sent headers cannot hold the listener.

def test_half_sent_headers_do_not_lock_out_other_clients(procs, tmp_path, recorder):
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW)}, extra=ADMIN)
    # A small open-file limit, as in the campaign: 600 slow connections used to exhaust it.
    proc = Proc(["sh", "-c", f'ulimit -n 512 && exec "{TOLLGATE}" serve --config "{config}"'],
                tmp_path / "slow.log")
    procs.append(proc)
    base = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+)").group(1)
    admin = admin_url(proc)
    port = int(base.rsplit(":", 1)[1])
    slow: list[socket.socket] = []
    try:
        for _ in range(600):
            s = socket.socket()
            s.settimeout(2)
            s.bind(("127.0.0.3", 0))  # the attacker: another loopback address than the client's
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            except OSError:
                pass
            slow.append(s)
        # A legitimate client still gets in, at once.
        started = time.monotonic()
        r = httpx.post(f"{base}/mcp", json=initialize(), headers=H, timeout=5)
        assert r.status_code == 200 and "result" in r.json(), r.text
        assert time.monotonic() - started < 5
        # And every slow connection is closed: beyond the per-peer limit at once, the
        # rest when limits.header_read_timeout (10 s by default) runs out.
        deadline = time.monotonic() + 25
        still_open = 0
        for s in slow:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = s.recv(4096)
                if data and not data.startswith(b"HTTP/1.1 408"):
                    still_open += 1
            except (ConnectionResetError, BrokenPipeError):
                pass
            except (TimeoutError, socket.timeout):
                still_open += 1
        assert still_open == 0, f"{still_open} of 600 half-sent requests still hold a connection"
    finally:
        for s in slow:
            s.close()
    assert metric(admin, 'tollgate_connections_refused_total{listener="proxy",reason="connections_per_peer"}') > 0
    assert metric(admin, 'tollgate_client_timeouts_total{listener="proxy",reason="header"}') > 0


# ---------------------------------------------------------------------------
# 12. A decision that cannot be recorded is not acted on.

def test_a_call_whose_decision_cannot_be_audited_is_not_forwarded(procs, tmp_path, recorder):
    refusing = write_config(tmp_path, {"up": (recorder.url, ALLOW)}, extra="audit: {path: /dev/full}\n" + ADMIN)
    base, proc = serve_config(procs, refusing)
    admin = admin_url(proc)
    session = RawSession(f"{base}/mcp")
    session.initialize()
    answer = session.call("echo", {"text": "unrecorded"})
    session.close()
    assert "error" in answer, answer
    assert "audit" in answer["error"]["message"] and "audit.on_failure" in answer["error"]["message"]
    assert recorder.tool_calls() == [], "a call whose decision was not recorded reached the upstream"
    assert metric(admin, "tollgate_audit_refusals_total") == 1

    lenient = write_config(tmp_path, {"up": (recorder.url, ALLOW)},
                           extra="audit: {path: /dev/full, on_failure: continue}\n", name="lenient.yaml")
    base, _ = serve_config(procs, lenient)
    session = RawSession(f"{base}/mcp")
    session.initialize()
    answer = session.call("echo", {"text": "unrecorded"})
    session.close()
    assert "result" in answer, answer
    assert len(recorder.tool_calls()) == 1


# ---------------------------------------------------------------------------
# 15. One over-long line costs that line, never the stream.

def test_tollgate_stdio_discards_an_over_long_line_and_keeps_reading(procs, tmp_path):
    record = tmp_path / "record.jsonl"
    config = tmp_path / "stdio.yaml"
    (tmp_path / "allow.yaml").write_text(ALLOW)
    config.write_text("limits: {max_body: 1KiB}\nservers:\n  up:\n"
                      f"    command: {json.dumps(stdio_argv(record))}\n    policy: allow.yaml\n")
    peer = StdioPeer(["--config", str(config)], tmp_path / "stdio.log")
    try:
        assert "result" in peer.request(1, "initialize", initialize()["params"])
        peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        peer.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"text": "y" * 5000}}})
        refused = peer.answer(2)
        assert "limits.max_body" in refused["error"]["message"], refused
        answer = peer.request(3, "tools/call", {"name": "echo", "arguments": {"text": "short"}})
        assert answer["result"]["content"][0]["text"].startswith("echo: short"), answer
        assert peer.proc.poll() is None
    finally:
        peer.stop()


LONG_LINES_SERVER = r'''
import json, os, sys, time

def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()

def text(id_, value):
    send({"jsonrpc": "2.0", "id": id_, "result": {"content": [{"type": "text", "text": value}]}})

for line in sys.stdin:
    msg = json.loads(line)
    id_, method = msg.get("id"), msg.get("method")
    if id_ is None:
        continue
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": id_, "result": {
            "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
            "serverInfo": {"name": "long-lines", "version": "1"}}})
    elif method == "tools/call" and msg["params"]["name"] == "flood":
        text(id_, "x" * (5 << 20))  # one stdout line over Tollgate's 4 MiB
    elif method == "tools/call" and msg["params"]["name"] == "shout":
        sys.stderr.write("e" * (100 * 1024) + "\n")  # one stderr line over 64 KiB
        sys.stderr.flush()
        time.sleep(0.5)
        sys.stderr.write("after the long line\n")  # a closed pipe would kill the server here
        sys.stderr.flush()
        text(id_, "shouted")
    elif method == "tools/call" and msg["params"]["name"] == "pid":
        text(id_, str(os.getpid()))
    elif method == "server/discover":
        send({"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": "no"}})
    else:
        send({"jsonrpc": "2.0", "id": id_, "result": {}})
'''


def test_a_stdio_upstreams_over_long_lines_cost_only_their_request(procs, tmp_path):
    script = tmp_path / "long_lines_server.py"
    script.write_text(LONG_LINES_SERVER)
    block = f"    command: {json.dumps([PYTHON, str(script)])}\n"
    config = write_config(tmp_path, {"long": (block, ALLOW)}, extra="limits: {max_body: 1KiB}\n")
    base, proc = serve_config(procs, config)
    session = RawSession(f"{base}/mcp")
    session.initialize()
    pid = session.call("pid", {})["result"]["content"][0]["text"]
    flood = session.call("flood", {})
    assert "error" in flood, str(flood)[:300]
    message = flood["error"]["message"]
    assert "`long`" in message and "4194304 bytes" in message, message
    # The same process goes on answering, on the same channel.
    assert session.call("pid", {})["result"]["content"][0]["text"] == pid
    shout = session.call("shout", {})
    assert shout.get("result", {}).get("content", [{}])[0].get("text") == "shouted", shout
    assert session.call("pid", {})["result"]["content"][0]["text"] == pid
    wait_until(lambda: "after the long line" in proc.log.read_text(), 10, "the stderr line after the long one logged")
    session.close()


# ---------------------------------------------------------------------------
# 5 (proxy side). What an upstream sends is bounded before it is buffered.

def test_an_oversized_tools_list_answer_is_refused_not_buffered(procs, tmp_path, recorder):
    base, proc = serve_config(procs, write_config(tmp_path, {"up": (recorder.url, ALLOW)}))
    session = RawSession(f"{base}/mcp")
    session.initialize()
    pid = proc.proc.pid
    before = rss_mib(pid)
    # 40 MiB of tools/list answer, more than the 16 MiB Tollgate reads by default.
    recorder.tool_pages = [[{"name": f"tool{i}", "description": "d" * 1000, "inputSchema": {"type": "object"}}
                            for i in range(40_000)]]
    for _ in range(3):
        answer = session.request("tools/list")
        assert "error" in answer, str(answer)[:300]
        message = answer["error"]["message"]
        assert "`up`" in message and "16777216 bytes" in message and "limits.max_body" in message, message
    grown = rss_mib(pid) - before
    assert grown < 32, f"three 40 MiB tools/list answers grew RSS by {grown:.0f} MiB"
    recorder.tool_pages = [[{"name": "echo", "inputSchema": {"type": "object"}}]]
    assert session.request("tools/list")["result"]["tools"][0]["name"] == "echo"
    session.close()


FLOODING_SSE_SERVER = r'''
"""A legacy HTTP+SSE MCP server that, once initialized, floods its stream with
notifications of 64 KiB for as long as its reader takes them. Each GET stream is
a session of its own (Tollgate's readiness probe opens one too), so an answer
goes to the stream whose session asked."""
import itertools, json, queue, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sessions = {}
ids = itertools.count(1)
sent = [0]
lock = threading.Lock()

class Session:
    def __init__(self):
        self.outbox = queue.Queue()
        self.flooding = threading.Event()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        sid = str(next(ids))
        session = sessions[sid] = Session()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b"event: endpoint\ndata: /messages?session_id=" + sid.encode() + b"\n\n")
        self.wfile.flush()
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                           "params": {"level": "info", "data": "x" * (64 << 10)}}).encode()
        try:
            while True:
                try:
                    msg = session.outbox.get(timeout=0.05)
                    self.wfile.write(b"event: message\ndata: " + json.dumps(msg).encode() + b"\n\n")
                    self.wfile.flush()
                except queue.Empty:
                    pass
                while session.flooding.is_set() and session.outbox.empty():
                    self.wfile.write(b"event: message\ndata: " + note + b"\n\n")
                    with lock:
                        sent[0] += 1
                        count = sent[0]
                    if count % 100 == 0:
                        self.wfile.flush()
                        print("sent", count, flush=True)
        except OSError:
            return
        finally:
            sessions.pop(sid, None)

    def do_POST(self):
        msg = json.loads(self.rfile.read(int(self.headers["content-length"])))
        session = sessions.get(parse_qs(urlparse(self.path).query).get("session_id", [""])[0])
        if session is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()
        if msg.get("method") == "initialize":
            session.outbox.put({"jsonrpc": "2.0", "id": msg["id"], "result": {
                "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"logging": {}},
                "serverInfo": {"name": "flood", "version": "1"}}})
        elif msg.get("method") == "notifications/initialized":
            session.flooding.set()
        elif "id" in msg:
            session.outbox.put({"jsonrpc": "2.0", "id": msg["id"], "result": {}})

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


@pytest.mark.parametrize("reader", ["idle", "stalled-get-stream"])
def test_a_flooding_legacy_sse_upstream_does_not_grow_memory(reader, procs, tmp_path):
    from conftest import free_port, wait_port

    script = tmp_path / "flood_sse.py"
    script.write_text(FLOODING_SSE_SERVER)
    port = free_port()
    flood = Proc([PYTHON, str(script), str(port)], tmp_path / "flood.log")
    procs.append(flood)
    wait_port(port)
    block = f"    transport: sse\n    url: http://127.0.0.1:{port}/sse\n"
    base, proc = serve_config(procs, write_config(tmp_path, {"up": (block, ALLOW)}),
                              env={"MIMALLOC_PURGE_DELAY": "0"})
    url = f"{base}/mcp"
    pid = proc.proc.pid
    before = rss_mib(pid)
    session = RawSession(url)
    session.initialize()
    stalled = None
    if reader == "stalled-get-stream":
        # A GET stream the client never reads: what Tollgate queues for it must stay bounded.
        stalled = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall((f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\naccept: text/event-stream\r\n"
                         f"mcp-session-id: {session.session_id}\r\nmcp-protocol-version: {session.protocol}\r\n\r\n").encode())
    try:
        # 64 MiB of notifications, or as many as Tollgate takes in 15 s when it pushes back;
        # then RSS is sampled while the flood goes on, so a bound that holds only between
        # bursts (or memory the allocator keeps long after it was freed) fails too.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(line == "sent 1000" for line in flood.lines):
            time.sleep(0.2)
        assert flood.lines, "the upstream never flooded"
        samples = []
        for _ in range(12):
            samples.append(rss_mib(pid) - before)
            time.sleep(0.25)
        peak = max(samples)
        print(f"{reader}: {flood.lines[-1]} notifications of 64 KiB, RSS +{peak:.0f} MiB at most")
        assert peak < 32, f"a flooding upstream grew RSS by {peak:.0f} MiB ({flood.lines[-1]})"
        # The session still answers.
        assert "result" in session.request("ping")
    finally:
        if stalled is not None:
            stalled.close()
        session.close()


# ---------------------------------------------------------------------------
# Lanes: one thread and runtime per core, accepting on one port, behind one gate.

def test_the_lanes_accept_on_one_port_and_share_one_connection_gate(procs, tmp_path, recorder):
    """With four lanes (`TOKIO_WORKER_THREADS=4`) the kernel spreads connections over
    four listeners on one port. `limits.max_connections` still counts them all: a
    gate per lane would let four times as many in."""
    config = write_config(tmp_path, {"up": (recorder.url, ALLOW)},
                          extra="limits: {max_connections: 4, connections_per_peer: 100}")
    base, proc = serve_config(procs, config, env={"TOKIO_WORKER_THREADS": "4"})
    port = int(base.rsplit(":", 1)[1])
    lanes = {"tollgate-lane-1", "tollgate-lane-2", "tollgate-lane-3"}
    wait_until(lambda: lanes <= {Path(t, "comm").read_text().strip()
                                 for t in Path(f"/proc/{proc.proc.pid}/task").iterdir()}, 10, "four lanes")
    request = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n")
    body = json.dumps(initialize()).encode()
    held, served = [], 0
    try:
        # From eight addresses: one address may hold at most half of max_connections.
        for i in range(16):
            s = socket.socket()
            s.settimeout(5)
            s.bind((f"127.0.0.{1 + i % 8}", 0))
            s.connect(("127.0.0.1", port))
            held.append(s)
            try:
                s.sendall(request % len(body) + body)
                answer = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError, TimeoutError, socket.timeout):
                answer = b""
            # A served connection stays open (keep-alive), so it holds its place.
            served += answer.startswith(b"HTTP/1.1 200")
        assert served == 4, f"{served} of 16 connections were served with max_connections: 4"
    finally:
        for s in held:
            s.close()
    # Closed connections give their places back to every lane.
    def served_again() -> bool:
        try:
            return httpx.post(f"{base}/mcp", json=initialize(), headers=H, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(served_again, 10, "no connection was served after the others closed")
