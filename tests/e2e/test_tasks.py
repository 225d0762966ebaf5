"""MCP tasks bound to the caller that created them (issue 31).

Behind Tollgate every caller reaches an upstream as Tollgate, so an upstream cannot
tell alice's task from bob's. tasks_upstream.py is such an upstream (it binds tasks to
nobody, lists them all, and streams every task's status to whoever polls). Alice
creates a task with `payroll_report` (allowed to her only); bob, denied that tool, must
not see it in `tasks/list`, nor read, cancel or update it, nor get its status
notifications: those requests are answered as for an unknown task and never reach
the upstream. Over a Streamable HTTP upstream and a shared stdio one, in both eras,
and across two replicas on one Redis.

The Python SDK (2.x) has no task support, so the calls are raw JSON-RPC over httpx.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import PYTHON, HERE, Proc, RawSession, free_port, serve_config, sse_answer, wait_port, write_config

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
CLIENTS = f"clients:\n  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key: {BOB}}}\nlimits: {{requests_per_second: 0}}\n"
POLICY = """version: 1
default: allow
rules:
  - tool: payroll_report
    action: allow
    clients: [alice]
  - tool: payroll_report
    action: deny
    reason: payroll is alice's
"""
UNKNOWN = {"code": -32602, "message": "Failed to retrieve task: Task not found"}
STATELESS_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def start_http(procs: list, tmp_path: Path) -> tuple[str, Path]:
    """tasks_upstream.py over HTTP: the config lines and its record file."""
    port = free_port()
    record = tmp_path / "tasks-upstream.jsonl"
    procs.append(Proc([PYTHON, str(HERE / "tasks_upstream.py"), str(port), str(record)],
                      tmp_path / "tasks-upstream.log"))
    wait_port(port)
    return f"    url: http://127.0.0.1:{port}/mcp\n", record


def stdio_block(tmp_path: Path) -> tuple[str, Path]:
    record = tmp_path / "tasks-stdio.jsonl"
    argv = [PYTHON, str(HERE / "tasks_upstream.py"), "0", str(record), "--stdio"]
    return f"    command: {json.dumps(argv)}\n", record


def received(record: Path) -> list[dict]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


class Client:
    """One caller (an API key) in one era, raw JSON-RPC; remembers every message streamed to it."""

    def __init__(self, url: str, key: str, era: str):
        self.url, self.key, self.era = url, key, era
        self.seen: list[dict] = []
        self.session: RawSession | None = None
        if era == "handshake":
            self.session = RawSession(url, protocol="2025-11-25")
            self.session.http.headers["authorization"] = f"Bearer {key}"
            self.session.initialize()
        self.next_id = 100

    def request(self, method: str, params: dict) -> dict:
        self.next_id += 1
        id_ = self.next_id
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "authorization": f"Bearer {self.key}"}
        if self.session is not None:
            headers["mcp-session-id"] = self.session.session_id
            headers["mcp-protocol-version"] = "2025-11-25"
        else:
            params = {**params, "_meta": dict(STATELESS_META)}
            headers.update({"mcp-protocol-version": "2026-07-28", "mcp-method": method})
            if method == "tools/call":
                headers["mcp-name"] = params["name"]
        body = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}
        r = httpx.post(self.url, json=body, headers=headers, timeout=30)
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            for event in r.text.replace("\r\n", "\n").split("\n\n"):
                data = "\n".join(l[5:].lstrip() for l in event.split("\n") if l.startswith("data:"))
                if data:
                    self.seen.append(json.loads(data))
            answer = sse_answer(r.text, id_)
            assert answer is not None, r.text
            return answer
        assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text)
        answer = r.json()
        self.seen.append(answer)
        return answer

    def statuses(self) -> set[str]:
        return {m["params"]["taskId"] for m in self.seen if m.get("method") == "notifications/tasks/status"}


def bob_cannot_reach_alices_task(alice: Client, bob: Client, record: Path) -> None:
    created = alice.request("tools/call", {"name": "payroll_report", "arguments": {"ssn": "078-05-1120"},
                                           "task": {"ttl": 60000}})
    task = created["result"]["task"]["taskId"]
    # Bob is denied the tool itself.
    denied = bob.request("tools/call", {"name": "payroll_report", "arguments": {"ssn": "x"}, "task": {"ttl": 60000}})
    assert "task" not in (denied.get("result") or {}), denied
    mine = bob.request("tools/call", {"name": "weather", "arguments": {"city": "Oslo"}, "task": {"ttl": 60000}})
    bobs = mine["result"]["task"]["taskId"]

    before = len(received(record))
    for method in ("tasks/get", "tasks/result", "tasks/cancel", "tasks/update"):
        answer = bob.request(method, {"taskId": task})
        assert answer.get("error") == UNKNOWN, (method, answer)
        assert "result" not in answer
    # As for a task nobody created, and for an id that is not even a string.
    assert bob.request("tasks/get", {"taskId": "no-such-task"}).get("error") == UNKNOWN
    assert bob.request("tasks/get", {"taskId": 7}).get("error") == UNKNOWN
    assert received(record)[before:] == [], "a request for another caller's task reached the upstream"

    listed = bob.request("tasks/list", {})
    assert [t["taskId"] for t in listed["result"]["tasks"]] == [bobs], listed
    # Bob's own poll streams every task's status from the upstream: only his reach him.
    assert bob.request("tasks/get", {"taskId": bobs})["result"]["taskId"] == bobs
    assert task not in bob.statuses() and bobs in bob.statuses(), bob.seen
    assert "078-05-1120" not in json.dumps(bob.seen)

    # Alice still reaches hers (never cancelled by bob), and lists only hers.
    got = alice.request("tasks/get", {"taskId": task})
    assert got["result"]["status"] == "completed", got
    assert task in alice.statuses() and bobs not in alice.statuses(), alice.seen
    result = alice.request("tasks/result", {"taskId": task})
    assert "078-05-1120" in result["result"]["content"][0]["text"], result
    assert [t["taskId"] for t in alice.request("tasks/list", {})["result"]["tasks"]] == [task]


@pytest.mark.parametrize("era", ["handshake", "stateless"])
@pytest.mark.parametrize("kind", ["http", "stdio"])
def test_a_task_is_reached_only_by_the_caller_that_created_it(procs, tmp_path, kind, era):
    block, record = start_http(procs, tmp_path) if kind == "http" else stdio_block(tmp_path)
    config = write_config(tmp_path, {"pay": (block, POLICY)}, CLIENTS)
    base, _ = serve_config(procs, config)
    url = f"{base}/servers/pay/mcp"
    alice, bob = Client(url, ALICE, era), Client(url, BOB, era)
    bob_cannot_reach_alices_task(alice, bob, record)


def test_a_task_of_one_session_is_not_reached_from_another_session_of_the_same_client(procs, tmp_path):
    block, record = start_http(procs, tmp_path)
    config = write_config(tmp_path, {"pay": (block, POLICY)}, CLIENTS)
    base, _ = serve_config(procs, config)
    url = f"{base}/servers/pay/mcp"
    first, second = Client(url, ALICE, "handshake"), Client(url, ALICE, "handshake")
    created = first.request("tools/call", {"name": "weather", "arguments": {}, "task": {"ttl": 60000}})
    task = created["result"]["task"]["taskId"]
    assert second.request("tasks/get", {"taskId": task}).get("error") == UNKNOWN
    assert second.request("tasks/list", {})["result"]["tasks"] == []
    assert first.request("tasks/get", {"taskId": task})["result"]["taskId"] == task


def test_tasks_are_refused_inside_a_batch(procs, tmp_path):
    block, record = start_http(procs, tmp_path)
    config = write_config(tmp_path, {"pay": (block, POLICY)}, CLIENTS)
    base, _ = serve_config(procs, config)
    alice = Client(f"{base}/servers/pay/mcp", ALICE, "handshake")
    before = len(received(record))
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"taskId": "x"}},
             {"jsonrpc": "2.0", "id": 2, "method": "tasks/list", "params": {}}]
    r = httpx.post(alice.url, json=batch, timeout=30,
                   headers={"accept": "application/json, text/event-stream", "content-type": "application/json",
                            "authorization": f"Bearer {ALICE}", "mcp-session-id": alice.session.session_id,
                            "mcp-protocol-version": "2025-03-26"})
    answers = {a["id"]: a for a in r.json()}
    assert answers[1]["error"]["code"] == -32600 and answers[2]["error"]["code"] == -32600, answers
    assert received(record)[before:] == []


@pytest.mark.parametrize("era", ["handshake", "stateless"])
def test_tasks_stay_bound_across_two_replicas_on_one_redis(procs, tmp_path, era):
    from test_replicas import Redis

    redis = Redis(procs, tmp_path)
    block, record = start_http(procs, tmp_path)
    urls = []
    for name in "ab":
        config = write_config(tmp_path, {"pay": (block, POLICY)},
                              CLIENTS + f"state:\n  backend: redis\n  url: {redis.url}\n  prefix: 'e2e:'\n"
                                        f"  replica: {name}\n  timeout: 500ms\n", name=f"tollgate-{name}.yaml")
        base, _ = serve_config(procs, config)
        urls.append(f"{base}/servers/pay/mcp")
    a, b = urls
    # Alice creates on replica a; bob tries on b, alice reads on b.
    alice_a = Client(a, ALICE, era)
    created = alice_a.request("tools/call", {"name": "payroll_report", "arguments": {"ssn": "078-05-1120"},
                                             "task": {"ttl": 60000}})
    task = created["result"]["task"]["taskId"]
    keys = redis.cli("--scan", "--pattern", "e2e:task:*").splitlines()
    assert len(keys) == 1 and 0 < int(redis.cli("PTTL", keys[0])) <= 60000, keys
    bob_b = Client(b, BOB, era)
    before = len(received(record))
    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        assert bob_b.request(method, {"taskId": task}).get("error") == UNKNOWN
    assert received(record)[before:] == []
    assert bob_b.request("tasks/list", {})["result"]["tasks"] == []
    alice_b = alice_a
    if era == "handshake":
        # The same session, continued through the other replica.
        alice_b = Client(b, ALICE, "stateless")
        alice_b.session, alice_b.era = alice_a.session, "handshake"
    else:
        alice_b = Client(b, ALICE, era)
    got = alice_b.request("tasks/result", {"taskId": task})
    assert "078-05-1120" in got["result"]["content"][0]["text"], got
