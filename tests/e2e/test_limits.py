"""Sessions bound to their client, log notifications relayed, and the proxy's own
limits (SPEC §3 `limits`, §6): chunked bodies over max_body, requests per second."""

from __future__ import annotations

import json

import httpx
import pytest
from mcp import Client
from mcp import types

from conftest import start_tollgate, start_upstream
from test_http import headers, tool_call

pytestmark = pytest.mark.anyio

POLICY = "version: 1\ndefault: allow\nrules: []\n"

CLIENTS = """
clients:
  - {name: alice, key: alice-key-0123456789}
  - {name: bob, key: bob-key-0123456789}
"""


def test_a_session_belongs_to_the_client_that_opened_it(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY, extra=CLIENTS)
    h = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    alice = {**h, "authorization": "Bearer alice-key-0123456789"}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    r = httpx.post(tg.url, json=init, headers=alice, timeout=10)
    assert r.status_code == 200, r.text
    session = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    r = httpx.post(tg.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                   headers={**alice, **session}, timeout=10)
    assert r.status_code == 202
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "bob"}}}
    bob = {**h, **session, "authorization": "Bearer bob-key-0123456789"}
    r = httpx.post(tg.url, json=call, headers=bob, timeout=10)
    assert r.status_code in (403, 404), (r.status_code, r.text)
    assert httpx.delete(tg.url, headers=bob, timeout=10).status_code in (403, 404)
    assert upstream.calls() == []
    # Alice's session survived bob's attempts.
    r = httpx.post(tg.url, json=call, headers={**alice, **session}, timeout=10)
    assert r.status_code == 200 and "echo: bob" in r.text
    assert upstream.tools_called() == ["echo"]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_log_notifications_reach_the_client(era, procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    logs: list[tuple[str, object]] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append((params.level, params.data))

    async with Client(tg.url, mode=era, logging_callback=on_log, log_level="debug") as client:
        result = await client.call_tool("chatty", {"text": "hi"})
    assert result.content[0].text == "logged twice"
    assert logs == [("info", "first: hi"), ("warning", "second: hi")]


def test_a_chunked_body_over_max_body_is_413(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY, extra="limits: {max_body: 1KiB}")
    body = httpx.Request("POST", "http://x", json=tool_call("echo", {"text": "y" * 4000})).content

    def chunks():  # no Content-Length: the limit has to hold on the bytes as they stream in
        for i in range(0, len(body), 256):
            yield body[i:i + 256]

    r = httpx.post(tg.url, content=chunks(), headers=headers(name="echo"), timeout=10)
    assert r.status_code == 413
    small = httpx.post(tg.url, json=tool_call("echo", {"text": "y"}), headers=headers(name="echo"), timeout=10)
    assert small.status_code == 200, small.text
    assert upstream.tools_called() == ["echo"]


def test_requests_per_second_per_client(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY, extra="limits: {requests_per_second: 2, burst: 2}")
    answers = [httpx.post(tg.url, json=tool_call("echo", {"text": str(i)}, i), headers=headers(name="echo"),
                          timeout=10) for i in range(12)]
    codes = [a.status_code for a in answers]
    assert 429 in codes, codes
    assert codes.count(200) < 12
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1, refused.headers
    assert len(upstream.calls()) == codes.count(200)


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_a_cancelled_call_is_cancelled_upstream_too(era, procs, tmp_path):
    """notifications/cancelled (handshake era) or the closed stream (stateless era)
    reaches the upstream, whose tool then stops: slow_progress never finishes."""
    import anyio
    from pathlib import Path

    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    async with Client(tg.url, mode=era) as client:
        with anyio.move_on_after(0.8) as scope:
            await client.call_tool("slow_progress", {"steps": 8})
        assert scope.cancelled_caught
        await anyio.sleep(3.2)  # 8 steps x 0.3 s: it would have finished by now
        assert (await client.call_tool("echo", {"text": "next"})).content[0].text.startswith("echo: next")
    assert upstream.tools_called() == ["slow_progress", "echo"]
    assert not Path(f"{upstream.record}.done").exists(), "the upstream ran the cancelled call to its end"


def sse_events(lines):
    event: dict = {}
    for line in lines:
        if line == "":
            if event:
                yield event
            event = {}
        elif ":" in line:
            key, _, value = line.partition(":")
            event[key] = value.strip()


def test_a_dropped_stream_resumes_with_last_event_id(procs, tmp_path):
    """Handshake era, an upstream with an event store: the client drops the POST stream
    after the first progress event and picks up the rest with GET + Last-Event-ID."""
    upstream = start_upstream(procs, tmp_path, "resumable")
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    h = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    r = httpx.post(tg.url, json=init, headers=h, timeout=10)
    h = {**h, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    assert httpx.post(tg.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                      headers=h, timeout=10).status_code == 202
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
        "name": "slow_progress", "arguments": {"steps": 6}, "_meta": {"progressToken": "t"}}}
    last_id = None
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", tg.url, json=call, headers=h) as r:
            for event in sse_events(r.iter_lines()):
                if "notifications/progress" in event.get("data", ""):
                    assert json.loads(event["data"])["params"]["progress"] == 1
                    last_id = event.get("id")
                    break
    assert last_id, "the relayed events lost their ids: a client cannot resume"
    progress, result = [], None
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", tg.url, headers={**h, "accept": "text/event-stream", "last-event-id": last_id}) as r:
            assert r.status_code == 200
            for event in sse_events(r.iter_lines()):
                if not event.get("data"):
                    continue
                message = json.loads(event["data"])
                if message.get("method") == "notifications/progress":
                    progress.append(message["params"]["progress"])
                elif message.get("id") == 5:
                    result = message["result"]
                    break
    assert progress == [2, 3, 4, 5, 6]
    assert result is not None and result["content"][0]["text"] == "done after 6 steps"
    assert upstream.tools_called() == ["slow_progress"], "resuming must not run the tool again"


async def test_notifications_on_the_get_stream_reach_the_client(procs, tmp_path):
    """Handshake era: a notification tied to no request travels on the standalone GET
    stream, which Tollgate relays."""
    import anyio

    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    got: list[str] = []

    async def on_message(message) -> None:
        got.append(type(message).__name__)

    async with Client(tg.url, mode="legacy", message_handler=on_message) as client:
        assert (await client.call_tool("announce", {})).content[0].text == "announced"
        with anyio.move_on_after(5):
            while "ToolListChangedNotification" not in got:
                await anyio.sleep(0.05)
    assert "ToolListChangedNotification" in got, got
