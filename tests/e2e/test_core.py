"""The proxy core's accounting and routing, end to end (the real binary):

* a JSON-RPC batch is accounted call by call: each forwarded call gets its `outcome`
  audit record, and a call that never left Tollgate gives its rate-limit slot back;
* a call the upstream received but answered after `timeout` keeps its slot (the tool ran);
* an approved call is forwarded like any other call: it is measured in
  `tollgate_upstream_latency_seconds`, and a lost upstream session is re-initialized;
* stateless-era clients that share one stdio process are kept apart: log and progress
  notifications reach only the client whose call they belong to, and one client's
  `notifications/cancelled` cannot cancel another client's call.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client

from conftest import (
    HERE,
    PYTHON,
    RawSession,
    serve_config,
    start_tollgate,
    start_upstream,
    wait_until,
    write_config,
)
from test_http import STATELESS_META, headers, tool_call
from test_transports import ForgetfulUpstream

pytestmark = pytest.mark.anyio

TOKEN = "core-admin-token-0123456789"
ADMIN = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"
AUTH = {"authorization": f"Bearer {TOKEN}"}

# How long a record written after the answer may take to show up in the audit log.
AUDIT_GRACE = 5


# ---------------------------------------------------------------------------
# Helpers.

class ScriptedUpstream:
    """A bare Streamable HTTP "MCP server" in this process: answers `initialize` (with a
    session id), `server/discover`, `tools/list` and `tools/call` (echo), and JSON-RPC
    batches with a JSON array of answers. Each tools/call is recorded when it arrives;
    its answer comes `delay` seconds later. Every connection is closed after one
    response, so `stop()` really takes the upstream away (nothing pooled survives it),
    and `start()` brings it back on the same port."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[dict] = []  # {"name", "arguments"}
        self.lock = threading.Lock()
        self.server = None
        self.port = 0
        self.start()
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def _handler(self):
        from http.server import BaseHTTPRequestHandler

        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body, extra: dict | None = None):
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if body is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.send_header("connection", "close")
                self.close_connection = True
                try:
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # Tollgate gave up on this answer (its timeout) and hung up

            def answer(self, msg: dict) -> tuple[dict | None, dict]:
                method, params = msg.get("method"), msg.get("params") or {}
                if "id" not in msg:
                    return None, {}
                extra = {}
                if method == "initialize":
                    result = {"protocolVersion": params.get("protocolVersion", "2025-11-25"),
                              "capabilities": {"tools": {}}, "serverInfo": {"name": "scripted", "version": "1"}}
                    extra["mcp-session-id"] = "scripted-session-0123456789abcdef"
                elif method == "server/discover":
                    result = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}},
                              "serverInfo": {"name": "scripted", "version": "1"}, "resultType": "complete"}
                elif method == "tools/list":
                    result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "other")]}
                elif method == "tools/call":
                    with outer.lock:
                        outer.calls.append({"name": params.get("name"), "arguments": params.get("arguments")})
                    if outer.delay:
                        time.sleep(outer.delay)
                    text = (params.get("arguments") or {}).get("text")
                    result = {"content": [{"type": "text", "text": f"echo: {text}"}], "isError": False}
                else:
                    result = {}
                return {"jsonrpc": "2.0", "id": msg["id"], "result": result}, extra

            def do_POST(self):
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                if isinstance(msg, list):
                    answers = [a for a, _ in map(self.answer, msg) if a is not None]
                    return self.reply(200 if answers else 202, answers or None)
                answer, extra = self.answer(msg)
                self.reply(200 if answer else 202, answer, extra)

            def do_GET(self):
                self.reply(405, None)

            def do_DELETE(self):
                self.reply(200, None)

        return Handler

    def start(self) -> None:
        from http.server import ThreadingHTTPServer

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def tool_calls(self) -> list[dict]:
        with self.lock:
            return list(self.calls)

    def __enter__(self) -> "ScriptedUpstream":
        return self

    def __exit__(self, *exc):
        self.stop()


def rpc_call(id_, name: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def post_batch(session: RawSession, batch: list[dict]) -> httpx.Response:
    """POSTs a JSON-RPC batch on a handshake-era session (no Mcp-Method/Mcp-Name: they
    cannot describe a batch)."""
    return session.http.post(session.url, json=batch, headers=session._headers())


def records(tg, event: str) -> list[dict]:
    return [r for r in tg.audit() if r.get("event") == event]


def eventually(read, done, timeout: float = AUDIT_GRACE):
    """`read()` as soon as `done(value)` holds, else its last value after `timeout`
    seconds: for what is written just after an answer was sent."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.1)


def latency_count(tg, server: str = "upstream") -> float:
    """tollgate_upstream_latency_seconds_count for `server` (0 when no call was measured yet)."""
    text = httpx.get(tg.admin + "/metrics", headers=AUTH, timeout=10).text
    m = re.search(r'tollgate_upstream_latency_seconds_count\{server="%s"\} (\S+)' % re.escape(server), text)
    return float(m.group(1)) if m else 0.0


def pending_approvals(tg, count: int = 1, timeout: float = 15) -> list[dict]:
    def pending():
        found = [a for a in httpx.get(tg.admin + "/approvals", headers=AUTH, timeout=10).json()
                 if a["status"] == "pending"]
        return found if len(found) >= count else None
    return wait_until(pending, timeout, f"{count} pending approval(s)")


def approve(tg, approval: dict) -> None:
    r = httpx.post(f"{tg.admin}/approvals/{approval['id']}/approve", json={"by": "core-test"}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text


def refusal_kind(answer: dict) -> str | None:
    """The policy decision's kind of a refused call's answer, or None if it is no refusal."""
    result = answer.get("result") or {}
    if result.get("isError") is not True:
        return None
    return ((result.get("_meta") or {}).get("dev.tollgate/decision") or {}).get("kind")


# ---------------------------------------------------------------------------
# 1. Batches (2025-03-26) are accounted call by call.

BATCH_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: delete_*
    action: deny
    reason: no deletes
"""


def test_each_forwarded_call_of_a_batch_gets_its_own_outcome_record(procs, tmp_path):
    """Every forwarded tools/call in a batch has a `decision` record and, once the
    upstream answered, an `outcome` record with the same call_id; a call the policy
    refused in the same batch has a decision and no outcome."""
    with ScriptedUpstream() as upstream:
        tg = start_tollgate(procs, tmp_path, upstream.url, BATCH_POLICY)
        session = RawSession(tg.url, protocol="2025-03-26")
        try:
            session.initialize()
            r = post_batch(session, [
                rpc_call(1, "echo", {"text": "one"}),
                rpc_call(2, "delete_fhir_datastore", {"datastore_id": "x"}),
                rpc_call(3, "echo", {"text": "three"}),
            ])
        finally:
            session.close()
        assert r.status_code == 200, r.text
        answers = {a["id"]: a for a in r.json()}
        assert answers[1]["result"]["content"][0]["text"] == "echo: one", answers
        assert answers[3]["result"]["content"][0]["text"] == "echo: three", answers
        assert refusal_kind(answers[2]) == "deny", answers
        assert [c["arguments"]["text"] for c in upstream.tool_calls()] == ["one", "three"]

    decisions = records(tg, "decision")
    assert sorted((d["tool"], d["decision"]) for d in decisions) == \
        [("delete_fhir_datastore", "deny"), ("echo", "allow"), ("echo", "allow")], decisions
    forwarded = sorted(d["call_id"] for d in decisions if d["decision"] == "allow")
    refused = [d["call_id"] for d in decisions if d["decision"] == "deny"]
    assert len(set(forwarded)) == 2, f"the two forwarded calls share a call_id: {decisions}"
    outcomes = eventually(lambda: records(tg, "outcome"), lambda found: len(found) >= len(forwarded))
    assert sorted(o["call_id"] for o in outcomes) == forwarded, (
        f"each forwarded call of the batch needs exactly one outcome record with its call_id; "
        f"decisions: {decisions}; outcomes: {outcomes}")
    assert all(o["tool"] == "echo" and isinstance(o["outcome"], str) and o["outcome"] for o in outcomes), outcomes
    assert not set(refused) & {o["call_id"] for o in outcomes}, "a refused call has no outcome"
    # The decision is written before the call is forwarded, so before its outcome.
    order = [(r["event"], r.get("call_id")) for r in tg.audit() if r.get("event") in ("decision", "outcome")]
    for cid in forwarded:
        assert order.index(("decision", cid)) < order.index(("outcome", cid)), order


LIMITED_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
    rate_limit: { max: 2, window: 60, per: client }
"""


def test_batch_calls_that_never_reached_the_upstream_give_their_slots_back(procs, tmp_path):
    """`per: client` (no `clients:`, so keyed on the peer address, the same for both
    sessions), at most 2 calls a minute. A batch of 2 calls is sent while the
    upstream is down (connection refused): neither left Tollgate, so both slots are
    given back. With the upstream back, 2 more calls are allowed, and a third is not."""
    upstream = ScriptedUpstream()
    try:
        tg = start_tollgate(procs, tmp_path, upstream.url, LIMITED_POLICY)
        first = RawSession(tg.url, protocol="2025-03-26")
        try:
            first.initialize()
            upstream.stop()
            r = post_batch(first, [rpc_call(1, "echo", {"text": "lost-1"}), rpc_call(2, "echo", {"text": "lost-2"})])
            # Whatever the shape of the answer, neither call got a result.
            assert '"result"' not in r.text, r.text
        finally:
            first.close(delete=False)
        decisions = records(tg, "decision")
        assert [d["decision"] for d in decisions] == ["allow", "allow"], \
            f"both batch calls were within the limit and were let through: {decisions}"

        upstream.start()  # same port
        second = RawSession(tg.url, protocol="2025-03-26")
        try:
            second.initialize()
            answers = [second.call("echo", {"text": f"after-{i}"}) for i in (1, 2, 3)]
        finally:
            second.close()
        for i, answer in enumerate(answers[:2], 1):
            assert "result" in answer and answer["result"]["isError"] is False, (
                f"call {i} after the failed batch was refused: the batch's 2 slots were kept although "
                f"its calls never reached the upstream: {answer}")
            assert answer["result"]["content"][0]["text"] == f"echo: after-{i}", answer
        assert refusal_kind(answers[2]) == "rate_limit", f"the limit of 2 still holds: {answers[2]}"
        assert [c["arguments"]["text"] for c in upstream.tool_calls()] == ["after-1", "after-2"]
    finally:
        upstream.stop()


# ---------------------------------------------------------------------------
# 2. A call that timed out upstream still ran there: it keeps its slot.

ONCE_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
    rate_limit: { max: 1, window: 60 }
"""


def test_a_call_answered_after_the_timeout_keeps_its_rate_limit_slot(procs, tmp_path):
    """`timeout: 2s`, an upstream that receives the call and answers after 4 s, at most 1
    call a minute: the first call times out (the client is told so), but the upstream
    got it and the tool ran, so its slot stays taken and the second call is refused by
    the rate limit without reaching the upstream."""
    with ScriptedUpstream(delay=4) as upstream:
        tg = start_tollgate(procs, tmp_path, upstream.url, ONCE_POLICY, server_extra="    timeout: 2s\n")
        with httpx.Client(timeout=20) as http:
            started = time.monotonic()
            first = http.post(tg.url, json=tool_call("echo", {"text": "slow"}, 1), headers=headers(name="echo")).json()
            elapsed = time.monotonic() - started
            assert "error" in first and "did not answer within 2s" in first["error"]["message"], first
            assert 1.5 < elapsed < 4, elapsed
            assert len(upstream.tool_calls()) == 1, "the first call reached the upstream"
            second = http.post(tg.url, json=tool_call("echo", {"text": "again"}, 2), headers=headers(name="echo")).json()
        assert refusal_kind(second) == "rate_limit", (
            f"the timed-out call's slot was given back although the upstream received the call: {second}")
        assert second["result"]["content"][0]["text"].startswith("Denied by policy: "), second
        assert [c["arguments"]["text"] for c in upstream.tool_calls()] == ["slow"]


# ---------------------------------------------------------------------------
# 3. An approved call is forwarded like any other.

APPROVAL_POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: require_approval
    reason: a human looks at every echo
  - tool: list_fhir_datastores
    action: allow
"""


async def test_an_approved_call_is_counted_in_the_upstream_latency_metric(procs, tmp_path):
    """An allowed call adds one sample to tollgate_upstream_latency_seconds for its
    server; so does a held call once it is approved and forwarded."""
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, APPROVAL_POLICY, extra=ADMIN)
    result = None
    with anyio.fail_after(60):
        async with Client(tg.url, mode="auto") as client:
            assert (await client.call_tool("list_fhir_datastores", {})).is_error is False
            before = await anyio.to_thread.run_sync(latency_count, tg)
            assert before >= 1, "the allowed call was measured"
            async with anyio.create_task_group() as tasks:
                async def call():
                    nonlocal result
                    result = await client.call_tool("echo", {"text": "approved"})
                tasks.start_soon(call)
                (pending,) = await anyio.to_thread.run_sync(pending_approvals, tg)
                await anyio.to_thread.run_sync(approve, tg, pending)
            after = await anyio.to_thread.run_sync(
                lambda: eventually(lambda: latency_count(tg), lambda count: count > before))
    assert result is not None and result.is_error is False, result
    assert result.content[0].text.startswith("echo: approved")
    assert upstream.tools_called() == ["list_fhir_datastores", "echo"]
    assert after == before + 1, (
        f"tollgate_upstream_latency_seconds_count went from {before} to {after}: "
        "the approved, forwarded call was not measured")


def test_an_approved_call_survives_an_upstream_that_lost_the_session_meanwhile(procs, tmp_path):
    """Handshake era: while a call waits for a human, the upstream forgets its session
    (404 "Session not found"). Once approved, the call is forwarded, the 404 is seen,
    the upstream session is re-initialized (the client's `initialize` replayed, once),
    and the call succeeds on the new upstream session, with no new initialize from the client."""
    forgetful = ForgetfulUpstream()
    try:
        tg = start_tollgate(procs, tmp_path, forgetful.url, APPROVAL_POLICY, extra=ADMIN)
        client = RawSession(tg.url)
        answer: dict = {}
        try:
            client.initialize()
            holder = threading.Thread(target=lambda: answer.update(client.call("echo", {"text": "held"})), daemon=True)
            holder.start()
            (pending,) = pending_approvals(tg)
            assert forgetful.calls() == [], "held, not forwarded"
            forgetful.forget()
            approve(tg, pending)
            holder.join(20)
            assert not holder.is_alive(), "the approved call got no answer within 20 s"
        finally:
            client.close(delete=False)
        assert "result" in answer and answer["result"]["isError"] is False, (
            f"the approved call failed although the upstream session could be re-initialized: {answer}")
        assert answer["result"]["content"][0]["text"] == "echo: held ✓ — ünïcödé", answer
        assert client.initializes == 1
        assert forgetful.initializes() == 2, "one initialize from the client, one re-initialization"
        ((text, upstream_session),) = forgetful.calls()
        assert text == "held" and upstream_session == forgetful.issued[-1], forgetful.log
    finally:
        forgetful.close()


# ---------------------------------------------------------------------------
# 4. Stateless-era clients sharing one stdio process are kept apart.

CLIENT_KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}
CLIENTS = "clients:\n" + "".join(f"  - {{name: {n}, key: {k}}}\n" for n, k in CLIENT_KEYS.items())
WORK_POLICY = "version: 1\ndefault: deny\nrules:\n  - tool: work\n    action: allow\n"


class SharedStdio:
    """Tollgate (clients alice and bob) in front of core_stdio_server.py, which both
    reach in the stateless era, so through one shared process."""

    def __init__(self, procs, tmp_path: Path):
        self.record = tmp_path / "work-record.jsonl"
        argv = [PYTHON, str(HERE / "core_stdio_server.py"), str(self.record)]
        # A call whose answer never comes fails after 6 s instead of hanging the test.
        block = f"    command: {json.dumps(argv)}\n    timeout: 6s\n"
        self.base, self.proc = serve_config(procs, write_config(tmp_path, {"work": (block, WORK_POLICY)}, CLIENTS))
        self.url = f"{self.base}/servers/work/mcp"

    def events(self) -> list[tuple[str, str, int]]:
        if not self.record.exists():
            return []
        found = []
        for line in self.record.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            found.append((e["event"], e["label"], e["pid"]))
        return found

    def wait_started(self, label: str, timeout: float = 20) -> int:
        """Waits until the call labelled `label` runs in the server; returns the pid running it."""
        found = wait_until(lambda: [pid for e, lab, pid in self.events() if (e, lab) == ("start", label)],
                           timeout, f"the call {label!r} never started in the stdio server")
        return found[0]

    def done(self, label: str) -> bool:
        return any((e, lab) == ("done", label) for e, lab, _ in self.events())

    def sdk_client(self, name: str, **kwargs) -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {CLIENT_KEYS[name]}"}, timeout=30)
        return Client(streamable_http_client(self.url, http_client=http), mode="auto", **kwargs)

    def post(self, who: str, body: dict, method: str = "tools/call", name: str | None = "work",
             timeout: float = 30) -> httpx.Response:
        """A raw stateless-era POST as `who`, with the routing headers the body calls for."""
        h = {**headers(method=method, name=name), "authorization": f"Bearer {CLIENT_KEYS[who]}"}
        return httpx.post(self.url, json=body, headers=h, timeout=timeout)


@pytest.fixture
def shared(procs, tmp_path) -> SharedStdio:
    return SharedStdio(procs, tmp_path)


def messages_of(response: httpx.Response) -> list[dict]:
    """Every JSON-RPC message of an answer: the JSON body, or each SSE event's data."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return [response.json()]
    found = []
    for event in response.text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if data:
            found.append(json.loads(data))
    return found


def work_call(id_, arguments: dict, meta: dict | None = None) -> dict:
    body = tool_call("work", arguments, id_)
    body["params"]["_meta"].update(meta or {})
    return body


async def test_a_log_message_never_reaches_another_client(shared):
    """Alice's call logs once while it is the only call in flight (that message is plainly
    hers, and she gets it), then again while Bob's call, started after hers, is in flight on
    the same stdio process. Bob never gets a message of Alice's call. (Which of the two calls
    the second message belongs to cannot be told from the wire, so whether Alice gets it too
    is left open; Bob must not.)"""
    logs: dict[str, list] = {"alice": [], "bob": []}

    def logger(who: str):
        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            logs[who].append(params.data)
        return on_log

    results = {}
    with anyio.fail_after(60):
        async with shared.sdk_client("alice", log_level="info", logging_callback=logger("alice")) as alice, \
                shared.sdk_client("bob", log_level="info", logging_callback=logger("bob")) as bob:
            assert alice.protocol_version == bob.protocol_version == "2026-07-28"
            async with anyio.create_task_group() as tasks:
                async def alice_call():
                    # Logs "alice alone", starts, waits for Bob's call to start, logs again.
                    results["alice"] = await alice.call_tool("work", {
                        "label": "alice", "log_first": "alice alone", "wait_for": "bob",
                        "log": "alice while bob waits", "seconds": 0.3})
                tasks.start_soon(alice_call)
                alice_pid = await anyio.to_thread.run_sync(shared.wait_started, "alice")
                # Alice's call is still in flight (it waits for this one), and runs 1.5 s more.
                results["bob"] = await bob.call_tool("work", {"label": "bob", "seconds": 1.5})
    assert shared.wait_started("bob") == alice_pid, "the two clients were not given one shared process"
    assert results["alice"].is_error is False and results["alice"].content[0].text == "alice done", results
    assert results["bob"].is_error is False and results["bob"].content[0].text == "bob done", results
    assert logs["bob"] == [], f"Bob received a log message of Alice's call: {logs}"
    assert logs["alice"][:1] == ["alice alone"], f"Alice's own log message did not reach her: {logs}"
    assert set(logs["alice"]) <= {"alice alone", "alice while bob waits"}, logs


def test_equal_progress_tokens_of_two_clients_are_kept_apart(shared):
    """Alice and Bob both call with request id 1 and progressToken 1, at the same time,
    on the shared process: each gets exactly its own progress notifications, under the
    token it sent, and its own result."""
    steps = 5

    def call(who: str, other: str) -> list[dict]:
        body = work_call(1, {"label": who, "wait_for": other, "steps": steps, "step_seconds": 0.2},
                         {"progressToken": 1})
        return messages_of(shared.post(who, body))

    with ThreadPoolExecutor(2) as pool:
        alice = pool.submit(call, "alice", "bob")
        shared.wait_started("alice")
        bob = pool.submit(call, "bob", "alice")
        got = {"alice": alice.result(timeout=30), "bob": bob.result(timeout=30)}
    for who in ("alice", "bob"):
        progress = [m["params"] for m in got[who] if m.get("method") == "notifications/progress"]
        assert [p.get("message") for p in progress] == [f"{who} {i}" for i in range(1, steps + 1)], (
            f"{who} got the wrong progress notifications: {[p.get('message') for p in progress]}")
        assert all(p["progressToken"] == 1 for p in progress), progress
        answer = got[who][-1]
        assert answer["id"] == 1 and answer["result"]["content"][0]["text"] == f"{who} done", got[who]


def test_a_client_cannot_cancel_another_clients_call(shared):
    """While Alice's call (request id 7) runs on the shared process, Bob POSTs
    notifications/cancelled for request id 7. It is not Bob's request: Alice's call runs
    to its end and she gets its result."""
    with ThreadPoolExecutor(1) as pool:
        alice = pool.submit(lambda: shared.post("alice", work_call(7, {"label": "alice", "seconds": 1.5}), timeout=20))
        shared.wait_started("alice")
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                  "params": {"requestId": 7, "reason": "bob says stop", "_meta": dict(STATELESS_META)}}
        bob = shared.post("bob", cancel, method="notifications/cancelled", name=None)
        assert bob.status_code < 500, bob.text
        answer = messages_of(alice.result(timeout=30))[-1]
    assert "result" in answer and shared.done("alice"), (
        f"Bob's notifications/cancelled cancelled Alice's call (ran to its end in the server: "
        f"{shared.done('alice')}); Alice got: {answer}")
    assert answer["id"] == 7 and answer["result"]["content"][0]["text"] == "alice done", answer
