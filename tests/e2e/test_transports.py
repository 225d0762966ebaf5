"""Every transport (SPEC §3, §6; issue 6): several servers behind one Tollgate,
every pairing of downstream transport (Streamable HTTP in both eras, legacy
HTTP+SSE, `tollgate stdio`) with upstream transport (Streamable HTTP, legacy
HTTP+SSE, a stdio program Tollgate spawns), the legacy SSE endpoint on the wire,
concurrent calls racing for rate-limit slots, and an upstream that loses its session.

The lifecycle of stdio children and `tollgate stdio` itself are in test_stdio.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import anyio
import httpx
import pytest
from mcp import Client, MCPError
from mcp.client.sse import sse_client

from conftest import (
    DOWNSTREAMS,
    RawSession,
    RecordingUpstream,
    SilentUpstream,
    downstream,
    make_upstream,
    serve_config,
    start_tollgate,
    start_upstream,
    free_port,
    wait_until,
    write_config,
)
from test_http import headers, tool_call

pytestmark = pytest.mark.anyio

POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: delete_*
    action: deny
    reason: no deletes
"""

# Every bounded wait of a whole client exchange (pytest's own timeout is the backstop).
EXCHANGE_TIMEOUT = 60


def check_enforced(names: set[str], allowed, denied) -> None:
    assert "echo" in names and "delete_fhir_datastore" not in names
    assert allowed.is_error is False and allowed.content[0].text == "echo: hi ✓ — ünïcödé"
    assert denied.is_error is True and denied.content[0].text == "Denied by policy: no deletes"


async def exercise(client) -> tuple[set[str], object, object]:
    names = {t.name for t in (await client.list_tools()).tools}
    allowed = await client.call_tool("echo", {"text": "hi"})
    denied = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
    return names, allowed, denied


def start_multi(procs, tmp_path, servers: dict[str, tuple[str, str]], extra: str = "") -> str:
    """servers: name -> (upstream url or config lines indented by 4 spaces, policy text).
    Returns the base URL."""
    return serve_config(procs, write_config(tmp_path, servers, extra))[0]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_each_server_has_its_own_path_and_policy(era, procs, tmp_path):
    a = start_upstream(procs, tmp_path)
    b = start_upstream(procs, tmp_path)
    base = start_multi(procs, tmp_path, {
        "alpha": (a.url, POLICY),
        "beta": (b.url, "version: 1\ndefault: allow\nrules:\n  - tool: echo\n    action: deny\n    reason: not here\n"),
    })
    async with Client(f"{base}/servers/alpha/mcp", mode=era) as client:
        check_enforced(*await exercise(client))
    async with Client(f"{base}/servers/beta/mcp", mode=era) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        echo = await client.call_tool("echo", {"text": "hi"})
        deleted = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
    assert "echo" not in names and "delete_fhir_datastore" in names
    assert echo.is_error is True and echo.content[0].text == "Denied by policy: not here"
    assert deleted.is_error is False and deleted.content[0].text == "deleted"
    assert a.tools_called() == ["echo"]
    assert b.tools_called() == ["delete_fhir_datastore"]
    # With two servers there is no unambiguous /mcp, and unknown names are not found.
    assert httpx.post(f"{base}/servers/gamma/mcp", json=tool_call("echo", {}), headers=headers(name="echo"),
                      timeout=10).status_code == 404


async def test_concurrent_calls_cannot_overspend_a_rate_limit(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateless")
    tg = start_tollgate(procs, tmp_path, upstream.url,
                        "version: 1\nrules:\n  - tool: echo\n    action: allow\n    rate_limit: {max: 5, window: 60, per: global}\n",
                        extra="limits: {requests_per_second: 0}")
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(*[
            client.post(tg.url, json=tool_call("echo", {"text": str(i)}, i), headers=headers(name="echo"))
            for i in range(20)
        ])
    results = [r.json()["result"] for r in answers]
    allowed = [r for r in results if not r["isError"]]
    limited = [r for r in results if r["isError"]]
    assert len(allowed) == 5, [r["content"][0]["text"] for r in results]
    assert all(r["_meta"]["dev.tollgate/decision"]["kind"] == "rate_limit" for r in limited)
    assert len(upstream.calls()) == 5


# ---------------------------------------------------------------------------
# Every downstream transport against every upstream transport.

UPSTREAMS = ["http", "sse", "stdio"]
PAIRINGS = [pytest.param(d, u, id=f"{d}-to-{u}") for d in DOWNSTREAMS for u in UPSTREAMS]


@pytest.mark.parametrize("down,up", PAIRINGS)
async def test_every_pairing_of_transports_enforces_the_policy(down, up, procs, tmp_path):
    """The SDK's own client transports in front, the SDK's own server transports behind:
    the denied tool is hidden, the allowed call answers, the denied call is refused
    with the policy's reason, and the upstream's record shows it never arrived."""
    upstream = make_upstream(up, procs, tmp_path)
    config = write_config(tmp_path, {"x": (upstream.block, POLICY)})
    base = None if down.startswith("stdio") else serve_config(procs, config)[0]
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with downstream(down, procs, tmp_path, "x", base=base, config=config) as client:
            check_enforced(*await exercise(client))
    assert upstream.tools_called() == ["echo"]


CHATTY_POLICY = """
version: 1
default: deny
rules:
  - tool: chatty
    action: allow
  - tool: ask_user
    action: allow
  - tool: slow_progress
    action: allow
"""
HANDSHAKE_PAIRINGS = [pytest.param(d, u, id=f"{d}-to-{u}")
                      for d in ("http-legacy", "sse", "stdio-legacy") for u in UPSTREAMS]


@pytest.mark.parametrize("down,up", HANDSHAKE_PAIRINGS)
async def test_server_messages_cross_every_transport(down, up, procs, tmp_path):
    """What the policy does not cover passes through both ways, mid-call: log and
    progress notifications to the client, and the upstream's elicitation request to
    the client with the client's answer back to the upstream."""
    from mcp import types

    upstream = make_upstream(up, procs, tmp_path)
    config = write_config(tmp_path, {"x": (upstream.block, CHATTY_POLICY)})
    base = None if down.startswith("stdio") else serve_config(procs, config)[0]
    logs, asked, progress = [], [], []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append((params.level, params.data))

    async def on_elicit(context, params: types.ElicitRequestParams):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"answer": "forty-two"})

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with downstream(down, procs, tmp_path, "x", base=base, config=config,
                              logging_callback=on_log, elicitation_callback=on_elicit) as client:
            chatty = await client.call_tool("chatty", {"text": "hi"})
            answered = await client.call_tool("ask_user", {"question": "What is the answer?"})
            slow = await client.call_tool("slow_progress", {"steps": 2}, progress_callback=on_progress)
    assert chatty.content[0].text == "logged twice"
    assert logs == [("info", "first: hi"), ("warning", "second: hi")]
    assert asked == ["What is the answer?"]
    assert answered.is_error is False and answered.content[0].text == "user said: forty-two"
    assert slow.is_error is False and progress == [1, 2]
    assert upstream.tools_called() == ["chatty", "ask_user", "slow_progress"]


# ---------------------------------------------------------------------------
# Several servers of mixed transports behind one Tollgate.

ALPHA = POLICY  # Streamable HTTP upstream: echo only; deletes denied
BETA = """
version: 1
default: allow
rules:
  - tool: echo
    action: deny
    reason: not here
"""
GAMMA = """
version: 1
default: deny
deny_as: error
rules:
  - tool: echo
    action: deny
    reason: gamma says no
  - tool: list_fhir_datastores
    action: allow
"""
SERVER_NAMES = ("alpha", "beta", "gamma")


def mixed_servers(procs, tmp_path):
    alpha = make_upstream("http", procs, tmp_path, "alpha")
    beta = make_upstream("sse", procs, tmp_path, "beta")
    gamma = make_upstream("stdio", procs, tmp_path, "gamma")
    config = write_config(tmp_path, {"alpha": (alpha.block, ALPHA), "beta": (beta.block, BETA),
                                     "gamma": (gamma.block, GAMMA)})
    return alpha, beta, gamma, config


async def outcome(client, tool: str, arguments: dict) -> tuple[str, str]:
    """("ok"|"denied"|"error", text): a tool result, an isError result, or a JSON-RPC error."""
    try:
        result = await client.call_tool(tool, arguments)
    except MCPError as e:
        return "error", f"{e.code} {e.message}"
    return ("denied" if result.is_error else "ok"), result.content[0].text


async def check_alpha(client):
    names = {t.name for t in (await client.list_tools()).tools}
    assert names == {"echo"}
    assert await outcome(client, "echo", {"text": "hi"}) == ("ok", "echo: hi ✓ — ünïcödé")
    assert await outcome(client, "delete_fhir_datastore", {"datastore_id": "a"}) == \
        ("denied", "Denied by policy: no deletes")
    kind, text = await outcome(client, "list_fhir_datastores", {})  # beta's default: allow is not alpha's
    assert kind == "denied" and text.startswith("Denied by policy:"), text


async def check_beta(client):
    names = {t.name for t in (await client.list_tools()).tools}
    assert "echo" not in names and {"delete_fhir_datastore", "list_fhir_datastores"} <= names
    assert await outcome(client, "echo", {"text": "hi"}) == ("denied", "Denied by policy: not here")
    assert await outcome(client, "delete_fhir_datastore", {"datastore_id": "b"}) == ("ok", "deleted")
    kind, text = await outcome(client, "list_fhir_datastores", {})
    assert kind == "ok" and "patients" in text


async def check_gamma(client):
    names = {t.name for t in (await client.list_tools()).tools}
    assert names == {"list_fhir_datastores"}
    # gamma's deny_as: error is gamma's alone: alpha and beta answer with isError results.
    assert await outcome(client, "echo", {"text": "hi"}) == \
        ("error", "-32001 Tool call denied by policy: gamma says no")
    kind, text = await outcome(client, "delete_fhir_datastore", {"datastore_id": "c"})
    assert kind == "error" and text.startswith("-32001 Tool call denied by policy:"), text
    kind, text = await outcome(client, "list_fhir_datastores", {})
    assert kind == "ok" and "patients" in text


CHECKS = {"alpha": check_alpha, "beta": check_beta, "gamma": check_gamma}


def check_records(alpha, beta, gamma):
    assert alpha.tools_called() == ["echo"]
    assert beta.tools_called() == ["delete_fhir_datastore", "list_fhir_datastores"]
    assert gamma.tools_called() == ["list_fhir_datastores"]


@pytest.mark.parametrize("era", ["legacy", "auto"])
async def test_three_servers_of_mixed_transports_keep_their_own_policies(era, procs, tmp_path):
    alpha, beta, gamma, config = mixed_servers(procs, tmp_path)
    base, _ = serve_config(procs, config)
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        # Sessions of all three open at once, calls interleaved: nothing of one leaks to another.
        async with Client(f"{base}/servers/alpha/mcp", mode=era) as a, \
                Client(f"{base}/servers/beta/mcp", mode=era) as b, \
                Client(f"{base}/servers/gamma/mcp", mode=era) as g:
            await check_gamma(g)
            await check_alpha(a)
            await check_beta(b)
    check_records(alpha, beta, gamma)


async def test_three_servers_over_every_downstream_transport(procs, tmp_path):
    """The same servers reached over legacy SSE and `tollgate stdio --server`: the
    server named picks the policy, whatever the transport."""
    alpha, beta, gamma, config = mixed_servers(procs, tmp_path)
    base, _ = serve_config(procs, config)
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with downstream("sse", procs, tmp_path, "alpha", base=base) as a:
            await check_alpha(a)
        async with downstream("stdio-legacy", procs, tmp_path, "beta", config=config) as b:
            await check_beta(b)
        async with downstream("sse", procs, tmp_path, "gamma", base=base) as g:
            await check_gamma(g)
    check_records(alpha, beta, gamma)


def test_unknown_servers_are_404_and_name_no_other_server(procs, tmp_path):
    _, _, _, config = mixed_servers(procs, tmp_path)
    base, _ = serve_config(procs, config)
    with httpx.Client(timeout=10) as http:
        answers = {
            "POST /servers/delta/mcp": http.post(f"{base}/servers/delta/mcp", json=tool_call("echo", {}),
                                                 headers=headers(name="echo")),
            "GET /servers/delta/sse": http.get(f"{base}/servers/delta/sse", headers={"accept": "text/event-stream"}),
            "POST /servers/delta/messages": http.post(f"{base}/servers/delta/messages?session_id=00", json={}),
            # Three servers: neither /mcp nor /sse is unambiguous.
            "POST /mcp": http.post(f"{base}/mcp", json=tool_call("echo", {}), headers=headers(name="echo")),
            "GET /sse": http.get(f"{base}/sse", headers={"accept": "text/event-stream"}),
        }
    for what, r in answers.items():
        assert r.status_code == 404, (what, r.status_code, r.text)
        body = r.text
        json.loads(body)  # a JSON body, as for every other error
        leaked = [name for name in SERVER_NAMES if name in body]
        assert not leaked, (what, body)


def test_each_server_has_its_own_headers_and_timeout(procs, tmp_path):
    """`headers:` and `timeout:` of one server apply to that server alone."""
    with SilentUpstream() as silent, RecordingUpstream() as rec_a, RecordingUpstream() as rec_b:
        base = start_multi(procs, tmp_path, {
            "a": (f"    url: {rec_a.url}\n    headers: {{Authorization: Bearer token-a, X-Team: a}}\n", POLICY),
            "b": (f"    url: {rec_b.url}\n    headers: {{X-Team: b}}\n", POLICY),
            "quick": (f"    url: {silent.url}\n    timeout: 1s\n", POLICY),
            "patient": (f"    url: {silent.url}\n    timeout: 3s\n", POLICY),
        })
        elapsed, said = {}, {}
        with httpx.Client(timeout=20) as http:
            for name in ("a", "b"):
                r = http.post(f"{base}/servers/{name}/mcp", json=tool_call("echo", {}), headers=headers(name="echo"))
                assert r.json()["result"]["content"][0]["text"] == "recorded", r.text
            for name in ("quick", "patient"):
                started = time.monotonic()
                r = http.post(f"{base}/servers/{name}/mcp", json=tool_call("echo", {}), headers=headers(name="echo"))
                elapsed[name] = time.monotonic() - started
                said[name] = r.json()["error"]["message"]
        assert [q["headers"].get("x-team") for q in rec_a.requests] == ["a"]
        assert [q["headers"].get("authorization") for q in rec_a.requests] == ["Bearer token-a"]
        assert [q["headers"].get("x-team") for q in rec_b.requests] == ["b"]
        assert [q["headers"].get("authorization") for q in rec_b.requests] == [None], "a's credentials reached b"
    assert "within 1s (servers.quick.timeout)" in said["quick"], said
    assert "within 3s (servers.patient.timeout)" in said["patient"], said
    assert elapsed["patient"] >= 2.9, f"patient gave up before its own 3s: {elapsed}"


# ---------------------------------------------------------------------------
# Downstream legacy HTTP+SSE on the wire.

def sse_events(lines):
    """(event, data) pairs from an iterator of SSE lines; comments (keep-alives) skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def next_answer(events, id_) -> dict:
    for event, data in events:
        assert event == "message", (event, data)
        msg = json.loads(data)
        if msg.get("id") == id_:
            return msg
    raise AssertionError(f"the stream ended before the answer to {id_}")


def test_legacy_sse_endpoint_messages_and_cleanup(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    base = start_multi(procs, tmp_path, {"x": (upstream.url, POLICY), "y": (upstream.url, POLICY)})
    with httpx.Client(timeout=httpx.Timeout(15)) as http:
        with http.stream("GET", f"{base}/servers/x/sse", headers={"accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = sse_events(stream.iter_lines())
            event, endpoint = next(events)
            assert event == "endpoint"
            # A session id of 128 bits or more, in hex.
            assert re.fullmatch(r"/servers/x/messages\?session_id=[0-9a-f]{32,}", endpoint), endpoint
            post = lambda msg: http.post(f"{base}{endpoint}", json=msg)  # noqa: E731
            init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2024-11-05", "capabilities": {},
                               "clientInfo": {"name": "raw-sse", "version": "1"}}}
            assert post(init).status_code == 202
            answer = next_answer(events, 1)
            assert answer["result"]["protocolVersion"] == "2024-11-05"
            assert post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
            assert post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).status_code == 202
            names = {t["name"] for t in next_answer(events, 2)["result"]["tools"]}
            assert "echo" in names and "delete_fhir_datastore" not in names
            call = {"jsonrpc": "2.0", "id": "d", "method": "tools/call",
                    "params": {"name": "delete_fhir_datastore", "arguments": {"datastore_id": "x"}}}
            assert post(call).status_code == 202
            denied = next_answer(events, "d")["result"]
            assert denied["isError"] is True and denied["content"][0]["text"] == "Denied by policy: no deletes"
            assert denied["_meta"]["dev.tollgate/decision"]["kind"] == "deny"
            call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "sse"}}}
            assert post(call).status_code == 202
            assert next_answer(events, 3)["result"]["content"][0]["text"] == "echo: sse ✓ — ünïcödé"
            # The session is bound to its server: y's endpoint does not know it.
            other = http.post(f"{base}{endpoint.replace('/servers/x/', '/servers/y/')}", json=call)
            assert other.status_code == 404, other.text
            # An unknown session id is not found either.
            assert http.post(f"{base}/servers/x/messages?session_id={'0' * 32}", json=call).status_code == 404
        # The stream is closed: its session goes with it.
        # Probed with a ping: a tools/call accepted before the close is seen would count.
        ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        wait_until(lambda: http.post(f"{base}{endpoint}", json=ping).status_code == 404, 10,
                   "the legacy SSE session still accepts messages after its stream closed")
    assert upstream.tools_called() == ["echo"]


async def test_legacy_sse_at_the_root_when_there_is_one_server(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    base = start_multi(procs, tmp_path, {"only": (upstream.url, POLICY)})
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with Client(sse_client(f"{base}/sse", timeout=30), mode="legacy") as client:
            check_enforced(*await exercise(client))
    assert upstream.tools_called() == ["echo"]


# ---------------------------------------------------------------------------
# An upstream that forgets its session (handshake era).

def check_echo(answer: dict, text: str) -> None:
    assert "result" in answer, answer
    assert answer["result"]["isError"] is False, answer
    assert answer["result"]["content"][0]["text"] == f"echo: {text} ✓ — ünïcödé"


def restart_upstream(procs, tmp_path, upstream):
    """Stops the upstream and starts a new one on the same port (and record file):
    the new one knows none of the old one's sessions."""
    upstream.proc.stop()
    return start_upstream(procs, tmp_path, upstream.mode, port=upstream.port)


def test_an_upstream_that_lost_its_session_is_reinitialized_transparently(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateful", port=free_port())
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    client = RawSession(tg.url)
    try:
        client.initialize()
        session = client.session_id
        check_echo(client.call("echo", {"text": "before"}), "before")
        restarted = restart_upstream(procs, tmp_path, upstream)
        # Same Tollgate session, no new initialize from the client: the call still succeeds.
        answer = client.call("echo", {"text": "after"})
        check_echo(answer, "after")
        assert client.session_id == session and client.initializes == 1
        assert client.last.status_code == 200
        # The session keeps working, and keeps its policy, on the new upstream session.
        denied = client.call("delete_fhir_datastore", {"datastore_id": "x"})
        assert denied["result"]["isError"] is True, denied
        assert denied["result"]["content"][0]["text"] == "Denied by policy: no deletes"
        listed = client.request("tools/list")
        names = {t["name"] for t in listed["result"]["tools"]}
        assert "echo" in names and "delete_fhir_datastore" not in names
    finally:
        client.close()
    assert [c["arguments"] for c in restarted.calls()] == [{"text": "before"}, {"text": "after"}]


async def test_an_sdk_client_never_notices_that_the_upstream_lost_its_session(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateful", port=free_port())
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    with anyio.fail_after(EXCHANGE_TIMEOUT):
        async with Client(tg.url, mode="legacy") as client:
            first = await client.call_tool("echo", {"text": "one"})
            assert first.is_error is False
            restarted = await anyio.to_thread.run_sync(restart_upstream, procs, tmp_path, upstream)
            second = await client.call_tool("echo", {"text": "two"})
            assert second.is_error is False and second.content[0].text == "echo: two ✓ — ünïcödé"
    assert restarted.tools_called() == ["echo", "echo"]


class ForgetfulUpstream:
    """A bare handshake-era Streamable HTTP upstream that can forget every session on
    demand (404 "Session not found", as the SDK's server answers) and hold a call
    (`hold`) until released. Records each request with the upstream session it came in."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.sessions: set[str] = set()
        self.issued: list[str] = []
        self.log: list[dict] = []  # {"method", "session", "status", "arguments"?}
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict | None, extra: dict | None = None):
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if body is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                method, sid = msg.get("method"), self.headers.get("mcp-session-id")
                entry = {"method": method, "session": sid}
                # Tollgate's readiness probe (an `initialize` every health_interval) is not a request under test.
                entry["probe"] = ((msg.get("params") or {}).get("clientInfo") or {}).get("name") == "tollgate-readiness"
                if method == "tools/call":
                    entry["arguments"] = msg["params"].get("arguments")
                with outer.lock:
                    outer.log.append(entry)
                    if method == "initialize":
                        sid = f"upstream-{len(outer.issued) + 1:04d}-0123456789abcdef"
                        outer.issued.append(sid)
                        outer.sessions.add(sid)
                        entry["status"] = 200
                        return self.reply(200, {"jsonrpc": "2.0", "id": msg["id"], "result": {
                            "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                            "serverInfo": {"name": "forgetful", "version": "1"}}}, {"mcp-session-id": sid})
                    if sid not in outer.sessions:
                        entry["status"] = 404
                        return self.reply(404, {"jsonrpc": "2.0", "id": "server-error",
                                                "error": {"code": -32600, "message": "Session not found"}})
                    entry["status"] = 200
                if "id" not in msg:
                    return self.reply(202, None)
                if method == "tools/list":
                    result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "hold")]}
                elif method == "tools/call" and msg["params"]["name"] == "hold":
                    outer.held.set()
                    outer.release.wait(30)
                    result = {"content": [{"type": "text", "text": "held"}], "isError": False}
                elif method == "tools/call":
                    text = (msg["params"].get("arguments") or {}).get("text")
                    result = {"content": [{"type": "text", "text": f"echo: {text} ✓ — ünïcödé"}], "isError": False}
                else:
                    result = {}
                self.reply(200, {"jsonrpc": "2.0", "id": msg["id"], "result": result})

            def do_GET(self):
                self.reply(405, None)

            def do_DELETE(self):
                with outer.lock:
                    outer.sessions.discard(self.headers.get("mcp-session-id"))
                self.reply(200, None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forget(self) -> None:
        with self.lock:
            self.sessions.clear()

    def initializes(self) -> int:
        with self.lock:
            return sum(1 for e in self.log if e["method"] == "initialize" and not e["probe"])

    def calls(self) -> list[tuple[str, str]]:
        """(text argument, upstream session) of every echo that was answered."""
        with self.lock:
            return [(e["arguments"]["text"], e["session"]) for e in self.log
                    if e["method"] == "tools/call" and e.get("status") == 200 and "text" in (e["arguments"] or {})]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def forgetful():
    upstream = ForgetfulUpstream()
    yield upstream
    upstream.close()


FORGETFUL_POLICY = "version: 1\nrules:\n  - tool: echo\n    action: allow\n  - tool: hold\n    action: allow\n"


def test_sessions_that_lost_their_upstream_session_get_new_ones_of_their_own(forgetful, procs, tmp_path):
    base, _ = serve_config(procs, write_config(tmp_path, {"forgetful": (forgetful.url, FORGETFUL_POLICY)}))
    a, b = RawSession(f"{base}/servers/forgetful/mcp"), RawSession(f"{base}/servers/forgetful/mcp")
    try:
        a.initialize()
        b.initialize()
        ids = (a.session_id, b.session_id)
        check_echo(a.call("echo", {"text": "a1"}), "a1")
        check_echo(b.call("echo", {"text": "b1"}), "b1")
        forgetful.forget()
        check_echo(a.call("echo", {"text": "a2"}), "a2")
        check_echo(b.call("echo", {"text": "b2"}), "b2")
        check_echo(a.call("echo", {"text": "a3"}), "a3")
        check_echo(b.call("echo", {"text": "b3"}), "b3")
        assert (a.session_id, b.session_id) == ids and a.initializes == b.initializes == 1
    finally:
        a.close()
        b.close()
    calls = dict(forgetful.calls())
    assert forgetful.initializes() == 4  # two each: at the start, and once after the loss
    # Before the loss each session had its own upstream session; after it, each got a new
    # one of its own, and kept it.
    assert calls["a1"] != calls["b1"]
    assert calls["a2"] == calls["a3"] and calls["b2"] == calls["b3"]
    assert calls["a2"] != calls["b2"]
    assert {calls["a2"], calls["b2"]}.isdisjoint({calls["a1"], calls["b1"]})


def test_a_lost_upstream_session_with_a_request_in_flight_is_a_clear_error(forgetful, procs, tmp_path):
    """Not safe to re-initialize while another request of the session waits on the old
    upstream session: the client gets a JSON-RPC error naming the server, promptly."""
    base, _ = serve_config(procs, write_config(tmp_path, {"forgetful": (forgetful.url, FORGETFUL_POLICY)}))
    url = f"{base}/servers/forgetful/mcp"
    client = RawSession(url)
    other = RawSession(url)  # a second connection carrying the same Tollgate session
    held: dict = {}
    try:
        client.initialize()
        other.session_id = client.session_id
        check_echo(client.call("echo", {"text": "first"}), "first")
        holder = threading.Thread(target=lambda: held.update(other.call("hold", {})), daemon=True)
        holder.start()
        assert forgetful.held.wait(10), "the held call never reached the upstream"
        forgetful.forget()
        started = time.monotonic()
        answer = client.call("echo", {"text": "while held"})
        assert time.monotonic() - started < 10
        assert "error" in answer, answer
        message = answer["error"]["message"]
        assert "forgetful" in message and "session" in message.lower(), message
        assert forgetful.initializes() == 1, "re-initialized while another request was in flight"
        forgetful.release.set()
        holder.join(10)
        assert not holder.is_alive()
    finally:
        forgetful.release.set()
        client.close(delete=False)
        other.close(delete=False)
    assert [text for text, _ in forgetful.calls()] == ["first"]
