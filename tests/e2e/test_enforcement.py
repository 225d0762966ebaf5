"""Enforcement details of SPEC §4, §6 and §8 that the SDK tests do not reach:
paginated and streamed tools/list, rolling windows, slots given back, per-client
keys, the audit record written before forwarding, authentication of clients."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest
from mcp import Client

from conftest import free_port, start_tollgate, start_upstream, wait_port
from test_http import headers, tool_call

pytestmark = pytest.mark.anyio

DENY_DELETES = """
version: 1
default: allow
rules:
  - tool: delete_*
    action: deny
    reason: no deletes
"""


def tool(name: str) -> dict:
    return {"name": name, "inputSchema": {"type": "object"}}


def handshake_headers() -> dict:
    return {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def open_session(url: str) -> dict:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    r = httpx.post(url, json=init, headers=handshake_headers(), timeout=10)
    assert r.status_code == 200, r.text
    h = {**handshake_headers(), "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    r = httpx.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h, timeout=10)
    assert r.status_code == 202
    return h


def sse_or_json(r: httpx.Response) -> dict:
    if r.headers["content-type"].startswith("text/event-stream"):
        datas = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        answers = [json.loads(d) for d in datas if d]
        (answer,) = [a for a in answers if "id" in a and ("result" in a or "error" in a)]
        return answer
    return r.json()


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("era", ["stateless", "handshake"])
def test_every_tools_list_page_is_filtered(sse, era, recorder, procs, tmp_path):
    recorder.sse = sse
    recorder.tool_pages = [
        [tool("echo"), tool("delete_fhir_datastore")],
        [tool("delete_everything"), tool("list_fhir_datastores")],
        [tool("delete_last")],
    ]
    tg = start_tollgate(procs, tmp_path, recorder.url, DENY_DELETES)
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}
    h = headers(method="tools/list") if era == "stateless" else open_session(tg.url)
    names, cursors, cursor = [], [], None
    for _ in range(5):
        params = {"_meta": meta} if era == "stateless" else {}
        if cursor is not None:
            params["cursor"] = cursor
        r = httpx.post(tg.url, json={"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": params},
                       headers=h, timeout=10)
        assert r.status_code == 200, r.text
        result = sse_or_json(r)["result"]
        names += [t["name"] for t in result["tools"]]
        cursor = result.get("nextCursor")
        cursors.append(cursor)
        if cursor is None:
            break
    assert names == ["echo", "list_fhir_datastores"]
    # Cursors pass through untouched, even for a page left empty by the filter.
    assert cursors == ["1", "2", None]


def test_the_window_rolls_and_retry_after_is_honest(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url,
                        "version: 1\nrules:\n  - tool: echo\n    action: allow\n    rate_limit: {max: 2, window: 2}\n")
    h = open_session(tg.url)

    def call(n: int) -> dict:
        body = {"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": str(n)}}}
        return sse_or_json(httpx.post(tg.url, json=body, headers=h, timeout=10))["result"]

    assert call(1)["isError"] is False
    assert call(2)["isError"] is False
    limited = call(3)
    assert limited["isError"] is True
    retry_ms = limited["_meta"]["dev.tollgate/decision"]["retry_after_ms"]
    assert 0 < retry_ms <= 2000
    time.sleep(retry_ms / 1000 + 0.3)
    assert call(4)["isError"] is False, "the window rolled: the oldest call left it"
    assert upstream.tools_called() == ["echo", "echo", "echo"]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_a_call_the_upstream_never_received_gives_its_slot_back(era, procs, tmp_path):
    """SPEC §4: the slot is given back when the upstream cannot be reached."""
    port = free_port()
    policy = "version: 1\nrules:\n  - tool: echo\n    action: allow\n    rate_limit: {max: 1, window: 600, per: global}\n"
    upstream = start_upstream(procs, tmp_path, port=port)
    tg = start_tollgate(procs, tmp_path, upstream.url, policy)
    async with Client(tg.url, mode=era) as client:
        upstream.proc.stop()  # gone between the handshake and the call
        procs.remove(upstream.proc)
        with anyio.fail_after(30):
            try:
                failed = await client.call_tool("echo", {"text": "lost"})
                assert failed.is_error is True
                assert "dev.tollgate/decision" not in (failed.meta or {}), "not a policy refusal"
            except AssertionError:
                raise
            except Exception:
                pass  # a JSON-RPC error naming the upstream is the expected answer
    upstream = start_upstream(procs, tmp_path, port=port)
    async with Client(tg.url, mode=era) as client:
        result = await client.call_tool("echo", {"text": "again"})
    assert result.is_error is False, result
    assert upstream.tools_called() == ["echo"]
    outcomes = [a for a in tg.audit() if a["event"] == "decision"]
    assert [a["decision"] for a in outcomes] == ["allow", "allow"]


CLIENTS = """
clients:
  - {name: alice, key: alice-key-0123456789}
  - {name: bob, key: bob-key-0123456789}
"""


def test_per_client_quotas_are_per_client_and_keys_are_required(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url,
                        "version: 1\nrules:\n  - tool: echo\n    action: allow\n    rate_limit: {max: 1, window: 60, per: client}\n",
                        extra=CLIENTS)

    def call(key: str | None, n: int) -> httpx.Response:
        h = headers(name="echo")
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        return httpx.post(tg.url, json=tool_call("echo", {"text": str(n)}, n), headers=h, timeout=10)

    assert call(None, 1).status_code == 401
    assert call("wrong-key", 2).status_code == 401
    assert call("alice-key-0123456789", 3).json()["result"]["isError"] is False
    second = call("alice-key-0123456789", 4).json()["result"]
    assert second["_meta"]["dev.tollgate/decision"]["kind"] == "rate_limit"
    assert call("bob-key-0123456789", 5).json()["result"]["isError"] is False, "bob has a quota of his own"
    assert [c["arguments"]["text"] for c in upstream.calls()] == ["3", "5"]
    decisions = [r for r in tg.audit() if r["event"] == "decision"]
    assert [(r["client"], r["decision"]) for r in decisions] == [("alice", "allow"), ("alice", "deny"), ("bob", "allow")]


def test_the_decision_is_in_the_audit_log_before_the_call_is_forwarded(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, DENY_DELETES)
    body = tool_call("slow_progress", {"steps": 6})
    body["params"]["_meta"]["progressToken"] = "p"
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", tg.url, json=body, headers=headers(name="slow_progress")) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:") and "notifications/progress" in line:
                    break
            # The upstream is running the tool right now; the decision is already written.
            assert upstream.tools_called() == ["slow_progress"]
            mid = [a for a in tg.audit() if a["event"] == "decision"]
            assert [(a["tool"], a["decision"], a["rule"]) for a in mid] == [("slow_progress", "allow", "default")]
            rest = "\n".join(lines)
    assert "done after 6 steps" in rest
    # An outcome is written with the next record or within 50 ms.
    deadline = time.monotonic() + 5
    while not any(a["event"] == "outcome" and a["tool"] == "slow_progress" for a in tg.audit()):
        assert time.monotonic() < deadline, f"no outcome record: {tg.audit()}"
        time.sleep(0.05)
