"""stdio on both sides (SPEC §2, §3; issue 6).

Upstream: a program Tollgate spawns from `command:` (one process per handshake-era
session), whose stderr lands in Tollgate's log under the server's name, which is
ended with its session and with Tollgate (even a SIGKILLed one), and whose crash
fails the call in flight without failing the next session. `tollgate scan -- CMD`.

Downstream: `tollgate stdio` speaks MCP on its own stdin/stdout (logs on stderr only)
in each of its forms: --config/--server, --policy/--upstream [--transport sse],
--policy -- CMD ARGS.

Children are found in /proc by the record path on their command line, which is
unique to each test.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import anyio
import pytest
from mcp import MCPError

from conftest import (
    PYTHON,
    TOLLGATE,
    RawSession,
    StdioUpstream,
    downstream,
    live_pids,
    make_upstream,
    pid_alive,
    serve_config,
    start_upstream,
    stdio_argv,
    wait_until,
    write_config,
)
from test_transports import POLICY, EXCHANGE_TIMEOUT

pytestmark = pytest.mark.anyio

# How long a child may take to be gone once its session or its Tollgate is:
# Tollgate's own grace periods (stdin closed, SIGTERM, SIGKILL) are about 3 s.
GONE_WITHIN = 10

LIFECYCLE_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: pid
    action: allow
  - tool: crash
    action: allow
"""


def text_of(answer: dict) -> str:
    assert "result" in answer, answer
    assert answer["result"]["isError"] is False, answer
    return answer["result"]["content"][0]["text"]


def raw_pid(session: RawSession) -> int:
    return int(text_of(session.call("pid", {})))


# ---------------------------------------------------------------------------
# One child per session, ended with its session.

def test_each_session_gets_its_own_process(procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "own")
    base, _ = serve_config(procs, write_config(tmp_path, {"own": (upstream.block, LIFECYCLE_POLICY)}))
    a, b = RawSession(f"{base}/servers/own/mcp"), RawSession(f"{base}/servers/own/mcp")
    try:
        a.initialize()
        b.initialize()
        pa, pb = raw_pid(a), raw_pid(b)
        assert pa != pb, "two handshake-era sessions share one stdio process"
        assert raw_pid(a) == pa and raw_pid(b) == pb, "a session's calls moved to another process"
        assert upstream.servers() == {pa, pb}
    finally:
        a.close()
        b.close()


async def test_stateless_era_clients_share_one_process_of_a_server_that_speaks_it(procs, tmp_path):
    """The SDK's stdio server answers `server/discover` as a 2026-07-28 server, so
    stateless-era requests, which belong to no session, all go to one shared process,
    while each handshake-era session still gets a process of its own."""
    upstream = StdioUpstream(tmp_path, "shared")
    base, _ = serve_config(procs, write_config(tmp_path, {"shared": (upstream.block, LIFECYCLE_POLICY)}))
    url = f"{base}/servers/shared/mcp"
    from mcp import Client

    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with Client(url, mode="auto") as first, Client(url, mode="auto") as second:
            assert first.protocol_version == second.protocol_version == "2026-07-28"
            one = int((await first.call_tool("pid", {})).content[0].text)
            two = int((await second.call_tool("pid", {})).content[0].text)
            assert one == two, "stateless-era requests were spread over several processes"
            assert int((await first.call_tool("pid", {})).content[0].text) == one
        async with Client(url, mode="legacy") as handshake:
            own = int((await handshake.call_tool("pid", {})).content[0].text)
    assert own != one, "a handshake-era session was given the shared stateless process"
    await anyio.to_thread.run_sync(
        lambda: wait_until(lambda: upstream.servers() == {one}, GONE_WITHIN,
                           f"the handshake-era session's process outlived it: {upstream.servers()}"))


@pytest.mark.parametrize("down", ["http-legacy", "sse", "stdio-legacy"])
async def test_a_session_that_ends_takes_its_child_with_it(down, procs, tmp_path):
    """Client exit (DELETE for Streamable HTTP, the stream closing for legacy SSE, stdin
    closing for `tollgate stdio`) ends that session's child, and only that one."""
    upstream = StdioUpstream(tmp_path, "ends")
    config = write_config(tmp_path, {"ends": (upstream.block, LIFECYCLE_POLICY)})
    base, _ = serve_config(procs, config)
    keeper = RawSession(f"{base}/servers/ends/mcp")  # another session, which must survive
    try:
        keeper.initialize()
        kept = raw_pid(keeper)
        with anyio.fail_after(EXCHANGE_TIMEOUT):
            async with downstream(down, procs, tmp_path, "ends", base=base, config=config) as client:
                ended = int((await client.call_tool("pid", {})).content[0].text)
                assert ended != kept and pid_alive(ended)
        await anyio.to_thread.run_sync(
            lambda: wait_until(lambda: not pid_alive(ended), GONE_WITHIN,
                               f"the child of a {down} session that ended is alive"))
        # The MCP shutdown sequence: stdin closed first, and the child, which exits within
        # about 0.1 s of that, left by itself before any signal was needed.
        assert upstream.exits().get(ended) == "eof", upstream.exits()
        assert pid_alive(kept), "ending one session killed another session's child"
        assert raw_pid(keeper) == kept
        # Nothing of the ended session is left (nor whatever it ran under).
        await anyio.to_thread.run_sync(
            lambda: wait_until(lambda: upstream.pids() == upstream.family(kept), GONE_WITHIN,
                               f"processes of the ended {down} session are left: {upstream.pids()}"))
        assert upstream.servers() == {kept}
    finally:
        keeper.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_children_never_outlive_tollgate(sig, procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "outlive")
    base, tollgate = serve_config(procs, write_config(tmp_path, {"outlive": (upstream.block, LIFECYCLE_POLICY)}))
    sessions = [RawSession(f"{base}/servers/outlive/mcp") for _ in range(2)]
    try:
        for s in sessions:
            s.initialize()
        children = {raw_pid(s) for s in sessions}
        assert len(children) == 2 and upstream.servers() == children
        # Sessions still open, calls not ended: Tollgate goes away.
        tollgate.proc.send_signal(sig)
        tollgate.proc.wait(timeout=15)
        left = wait_until(lambda: not upstream.pids(), GONE_WITHIN,
                          f"stdio children {upstream.pids()} outlived a tollgate ended by {sig.name}")
        assert left
    finally:
        for s in sessions:
            s.close(delete=False)
        for pid in upstream.pids():  # leave nothing behind if the test failed
            os.kill(pid, signal.SIGKILL)


def test_a_child_busy_in_a_call_does_not_outlive_a_sigkilled_tollgate(procs, tmp_path):
    """A SIGKILLed Tollgate can end nothing itself; a child that is not reading its stdin
    (here: stuck in a synchronous 60 s call, as a slow export would be) never sees the EOF
    either. Only the kernel can end it (a parent-death signal), and it must."""
    upstream = StdioUpstream(tmp_path, "busy", extra="    timeout: 120s\n")
    policy = LIFECYCLE_POLICY + "  - tool: block\n    action: allow\n"
    base, tollgate = serve_config(procs, write_config(tmp_path, {"busy": (upstream.block, policy)}))
    session = RawSession(f"{base}/servers/busy/mcp")
    caller = RawSession(f"{base}/servers/busy/mcp")
    try:
        session.initialize()
        child = raw_pid(session)
        caller.session_id = session.session_id
        threading.Thread(target=lambda: _swallow(caller.call, "block", {"seconds": 60}), daemon=True).start()
        wait_until(lambda: "block" in upstream.tools_called(), 10, "the blocking call never reached the child")
        tollgate.proc.send_signal(signal.SIGKILL)
        tollgate.proc.wait(timeout=15)
        wait_until(lambda: not pid_alive(child), GONE_WITHIN,
                   f"stdio child {child}, busy in a call, outlived a SIGKILLed tollgate")
        wait_until(lambda: not upstream.pids(), GONE_WITHIN,
                   f"processes {upstream.pids()} of the stdio upstream outlived a SIGKILLed tollgate")
    finally:
        session.close(delete=False)
        caller.close(delete=False)
        for pid in upstream.pids():
            os.kill(pid, signal.SIGKILL)


def _swallow(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass  # the connection dies with Tollgate


# ---------------------------------------------------------------------------
# A child that dies mid-call.

@pytest.mark.parametrize("era", ["legacy", "auto"])
async def test_a_stdio_upstream_that_crashes_mid_call(era, procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "crashy", extra="    timeout: 60s\n")
    config = write_config(tmp_path, {"crashy": (upstream.block, LIFECYCLE_POLICY)})
    base, _ = serve_config(procs, config)
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with downstream(f"http-{era}", procs, tmp_path, "crashy", base=base) as client:
            first = int((await client.call_tool("pid", {})).content[0].text)
            started = time.monotonic()
            # Promptly: the child's death is noticed, not the 60 s upstream timeout waited out.
            with anyio.fail_after(15):
                try:
                    result = await client.call_tool("crash", {})
                    failed, message = result.is_error, result.content[0].text
                except MCPError as e:
                    failed, message = True, e.message
            elapsed = time.monotonic() - started
            assert failed, message
            assert elapsed < 10, elapsed
            # Which upstream failed, said to the client (SPEC §6: "says which upstream and why").
            assert "crashy" in message, message
    await anyio.to_thread.run_sync(
        lambda: wait_until(lambda: not pid_alive(first), GONE_WITHIN, "the crashed child is still there"))
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with downstream(f"http-{era}", procs, tmp_path, "crashy", base=base) as client:
            second = int((await client.call_tool("pid", {})).content[0].text)
            echo = await client.call_tool("echo", {"text": "again"})
    assert second != first
    assert echo.is_error is False and echo.content[0].text == "echo: again ✓ — ünïcödé"
    assert upstream.tools_called() == ["pid", "crash", "pid", "echo"]


# ---------------------------------------------------------------------------
# The child's stderr in Tollgate's log.

def test_child_stderr_is_logged_under_the_server_name(procs, tmp_path):
    upstream = StdioUpstream(tmp_path, "chatty-child")
    base, tollgate = serve_config(procs, write_config(tmp_path, {"hl-local": (upstream.block, LIFECYCLE_POLICY)}))
    session = RawSession(f"{base}/servers/hl-local/mcp")
    try:
        session.initialize()
        child = raw_pid(session)
    finally:
        session.close()
    line = f"upstream_server stdio ready pid={child}"

    def logged():
        return [entry for entry in tollgate.log.read_text(errors="replace").splitlines() if line in entry]

    found = wait_until(logged, 10, f"{line!r} is not in Tollgate's log")
    assert any("hl-local" in entry for entry in found), found
    # A log line on stderr, never on stdout (which carries only the listening lines).
    assert not any(line in out for out in tollgate.lines)


# ---------------------------------------------------------------------------
# tollgate scan -- CMD ARGS

STDIO_TOOLS = {"list_fhir_datastores", "describe_fhir_export_job", "start_fhir_export_job",
               "delete_fhir_datastore", "echo", "slow_progress", "chatty", "announce", "ask_user",
               "pid", "crash", "block"}


def run(args: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def check_starter_policy(tmp_path, text: str, tools: set[str]) -> None:
    # One rule per tool, every tool (rules commented out do not count).
    named = re.findall(r"^\s*-?\s*tool:\s*['\"]?([^'\"\s]+)['\"]?\s*$", text, re.M)
    assert sorted(named) == sorted(tools), text
    assert re.search(r"^default:\s*deny\s*$", text, re.M), text
    policy = tmp_path / "scanned.yaml"
    policy.write_text(text)
    validated = run([TOLLGATE, "validate", str(policy)])
    assert validated.returncode == 0, validated.stdout + validated.stderr
    # Issue 6: tools annotated readOnlyHint are allowed, destructiveHint denied, the rest wait
    # for a human; anything else is denied. Checked with Tollgate's own policy tests,
    # whatever the layout of the YAML.
    expect = {"pid": "allow", "crash": "deny"}
    cases = [{"name": f"{t} is {expect.get(t, 'require_approval')}", "tool": t, "arguments": {},
              "expect": expect.get(t, "require_approval")} for t in sorted(tools)]
    cases.append({"name": "an unknown tool is denied", "tool": "not_a_tool_of_this_server", "expect": "deny"})
    (tmp_path / "scanned.test.yaml").write_text(json.dumps({"policy": "scanned.yaml", "cases": cases}))
    tested = run([TOLLGATE, "test", str(tmp_path / "scanned.test.yaml")])
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_scan_a_stdio_server(tmp_path):
    record = tmp_path / "scan-record.jsonl"
    scanned = run([TOLLGATE, "scan", "--", *stdio_argv(record)])
    assert scanned.returncode == 0, scanned.stderr
    check_starter_policy(tmp_path, scanned.stdout, STDIO_TOOLS)
    assert not record.exists(), "scan called a tool"
    wait_until(lambda: not live_pids(str(record)), GONE_WITHIN, "the scanned server outlived tollgate scan")


def test_scan_a_legacy_sse_server(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "sse")
    scanned = run([TOLLGATE, "scan", "--upstream", upstream.url, "--transport", "sse"])
    assert scanned.returncode == 0, scanned.stderr
    check_starter_policy(tmp_path, scanned.stdout, STDIO_TOOLS - {"pid", "crash", "block"})
    assert upstream.calls() == []


# ---------------------------------------------------------------------------
# tollgate stdio, by hand: stdout carries MCP and nothing else.

class StdioPeer:
    """`tollgate stdio ...` with pipes: every stdout line is kept, stderr goes to a file."""

    def __init__(self, args: list[str], log):
        self.log = log
        self.stderr = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen([TOLLGATE, "stdio", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, encoding="utf-8")
        self.raw: list[str] = []
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def answer(self, id_, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer to {id_} within {timeout}s; stdout {self.raw}, "
                                     f"stderr {self.log.read_text()[-2000:]}")
            if line is None:
                raise AssertionError(f"stdout closed before the answer to {id_}; stdout {self.raw}, "
                                     f"stderr {self.log.read_text()[-2000:]}")
            msg = json.loads(line)  # anything on stdout that is not JSON fails here
            if isinstance(msg, dict) and msg.get("id") == id_ and ("result" in msg or "error" in msg):
                return msg

    def request(self, id_, method: str, params: dict | None = None) -> dict:
        self.send({"jsonrpc": "2.0", "id": id_, "method": method, "params": params or {}})
        return self.answer(id_)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stderr.close()


STDIO_FORMS = ["config", "upstream-http", "upstream-sse", "command"]


@pytest.mark.parametrize("form", STDIO_FORMS)
def test_tollgate_stdio_keeps_stdout_for_mcp_alone(form, procs, tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    policy = str(tmp_path / "policy.yaml")
    record = tmp_path / "stdio-form-record.jsonl"
    if form == "config":
        upstream = StdioUpstream(tmp_path, "form")
        record = upstream.record
        args = ["--config", str(write_config(tmp_path, {"form": (upstream.block, POLICY)})), "--server", "form"]
    elif form == "upstream-http":
        upstream = make_upstream("http", procs, tmp_path)
        record, args = upstream.record, ["--policy", policy, "--upstream", upstream.url]
    elif form == "upstream-sse":
        upstream = make_upstream("sse", procs, tmp_path)
        record, args = upstream.record, ["--policy", policy, "--upstream", upstream.url, "--transport", "sse"]
    else:
        args = ["--policy", policy, "--", *stdio_argv(record)]
    peer = StdioPeer(args, tmp_path / f"tollgate-stdio-{form}.log")
    peer.args = [TOLLGATE, "stdio", form]
    procs.append(peer)
    init = peer.request(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                          "clientInfo": {"name": "by-hand", "version": "1"}})
    assert init["result"]["protocolVersion"] == "2025-06-18", init
    peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    names = {t["name"] for t in peer.request(2, "tools/list")["result"]["tools"]}
    assert "echo" in names and "delete_fhir_datastore" not in names
    echo = peer.request(3, "tools/call", {"name": "echo", "arguments": {"text": "by hand"}})
    assert echo["result"]["content"][0]["text"] == "echo: by hand ✓ — ünïcödé", echo
    denied = peer.request("four", "tools/call", {"name": "delete_fhir_datastore", "arguments": {"datastore_id": "x"}})
    assert denied["result"]["isError"] is True
    assert denied["result"]["content"][0]["text"] == "Denied by policy: no deletes"
    assert denied["result"]["_meta"]["dev.tollgate/decision"]["kind"] == "deny"
    # The client closes stdin: tollgate stdio ends, cleanly, within a bounded time.
    peer.proc.stdin.close()
    assert peer.proc.wait(timeout=15) == 0, peer.log.read_text()[-2000:]
    assert peer.lines  # the reader saw stdout close
    for line in peer.raw:
        msg = json.loads(line)
        assert isinstance(msg, dict) and msg.get("jsonrpc") == "2.0", line
    assert [json.loads(c)["tool"] for c in record.read_text().splitlines()] == ["echo"]
    if form in ("config", "command"):
        # The child's stderr went to tollgate's stderr (its log), and the child is gone.
        assert "upstream_server stdio ready" in peer.log.read_text()
        wait_until(lambda: not live_pids(str(record)), GONE_WITHIN, "the child outlived tollgate stdio")
