"""What the policy does not judge passes through unchanged (SPEC §4, §6), and what
Tollgate sends upstream is what the config says (SPEC §3), against a bare recording
upstream so every byte that leaves Tollgate is visible."""

from __future__ import annotations

import httpx
import pytest

from conftest import start_tollgate
from test_http import STATELESS_META, headers, tool_call

POLICY = """
version: 1
default: allow
rules:
  - tool: delete_*
    action: deny
    reason: no deletes
"""


def test_unknown_fields_and_methods_pass_through_unchanged(recorder, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    body = tool_call("echo", {"text": "x", "nested": {"n": [1, 2.5, -3, "é", None, True]}})
    body["params"]["x-vendor"] = {"keep": "me"}
    r = httpx.post(tg.url, json=body, headers=headers(name="echo"), timeout=10)
    assert r.status_code == 200, r.text
    (forwarded,) = recorder.tool_calls()
    assert forwarded["body"]["params"]["arguments"] == body["params"]["arguments"]
    assert forwarded["body"]["params"]["x-vendor"] == {"keep": "me"}
    assert forwarded["body"]["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    # A method no one has heard of goes to the upstream and its answer comes back.
    unknown = {"jsonrpc": "2.0", "id": "vendor-1", "method": "vendor/thing", "params": {"_meta": dict(STATELESS_META), "a": 1}}
    r = httpx.post(tg.url, json=unknown, headers=headers(method="vendor/thing"), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"jsonrpc": "2.0", "id": "vendor-1", "result": {}}
    assert [q["body"]["method"] for q in recorder.requests if q["body"].get("method") == "vendor/thing"] == ["vendor/thing"]


@pytest.mark.parametrize("id_", ["a-string-é", 0, -7, 9007199254740993])
def test_request_ids_come_back_as_sent(id_, recorder, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    allowed = httpx.post(tg.url, json=tool_call("echo", {}, id_), headers=headers(name="echo"), timeout=10)
    denied = httpx.post(tg.url, json=tool_call("delete_x", {}, id_), headers=headers(name="delete_x"), timeout=10)
    assert allowed.json()["id"] == id_ and denied.json()["id"] == id_
    assert allowed.json()["result"]["content"][0]["text"] == "recorded"
    result = denied.json()["result"]
    assert result["isError"] is True and result["content"][0]["text"] == "Denied by policy: no deletes"
    # SPEC §6: in the stateless era a refusal is a complete result like any other.
    assert result["resultType"] == "complete"
    assert len(recorder.tool_calls()) == 1


def test_upstream_headers_are_sent_and_client_credentials_never_are(recorder, procs, tmp_path):
    tg = start_tollgate(
        procs, tmp_path, recorder.url, POLICY,
        extra="clients:\n  - {name: alice, key: '${ALICE_KEY}'}\n",
        server_extra="    headers:\n      Authorization: Bearer ${UPSTREAM_TOKEN}\n      X-Team: e2e\n",
        env={"ALICE_KEY": "alice-secret-0123456789", "UPSTREAM_TOKEN": "upstream-token-abc"},
    )
    h = {**headers(name="echo"), "authorization": "Bearer alice-secret-0123456789"}
    r = httpx.post(tg.url, json=tool_call("echo", {"text": "x"}), headers=h, timeout=10)
    assert r.status_code == 200, r.text
    assert recorder.requests, "nothing reached the upstream"
    for request in recorder.requests:
        assert request["headers"].get("authorization") == "Bearer upstream-token-abc"
        assert request["headers"].get("x-team") == "e2e"
        assert "alice-secret-0123456789" not in repr(request)


def test_allowed_origins_and_ipv6_loopback_host(recorder, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY, extra="allowed_origins: ['http://ok.example']")
    port = tg.url.split(":")[2].split("/")[0]
    body = tool_call("echo", {"text": "x"})
    r = httpx.post(tg.url, json=body, headers={**headers(name="echo"), "origin": "http://ok.example"}, timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.post(tg.url, json=body, headers={**headers(name="echo"), "origin": "http://ok.example.evil.example"}, timeout=10)
    assert r.status_code == 403
    r = httpx.post(tg.url, json=body, headers={**headers(name="echo"), "host": f"[::1]:{port}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert len(recorder.tool_calls()) == 2


def test_duplicate_keys_cannot_show_the_policy_one_tool_and_the_upstream_another(recorder, procs, tmp_path):
    """SPEC §6: what goes upstream is the message Tollgate evaluated, re-serialised."""
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    meta = '"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}'
    sneaky = ('{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "%s", "name": "%s", '
              '"arguments": {}, ' + meta + '}}')
    for first, last in [("echo", "delete_fhir_datastore"), ("delete_fhir_datastore", "echo")]:
        r = httpx.post(tg.url, content=(sneaky % (first, last)).encode(), headers=headers(name=last), timeout=10)
        if r.status_code == 200 and "result" in r.json() and not r.json()["result"].get("isError"):
            # Allowed as `echo`: then the upstream must see `echo` and only `echo`.
            (forwarded,) = recorder.tool_calls()
            assert b"delete" not in forwarded["raw"], forwarded["raw"]
            assert forwarded["body"]["params"]["name"] == "echo"
        else:
            assert r.status_code in (200, 400), r.text
            assert recorder.tool_calls() == [] or b"delete" not in recorder.tool_calls()[-1]["raw"]
    assert all(b"delete" not in q["raw"] for q in recorder.requests)


def test_invalid_utf8_is_a_parse_error(recorder, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo\xff", "arguments": {}}}'
    r = httpx.post(tg.url, content=body, headers=headers(name="echo"), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32700
    assert recorder.tool_calls() == []


META_TEXT = ('"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", '
             '"io.modelcontextprotocol/clientCapabilities": {}}')


def raw_call(arguments: str, name: str = "echo") -> bytes:
    return ('{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "%s", '
            '"arguments": %s, %s}}' % (name, arguments, META_TEXT)).encode()


@pytest.mark.parametrize("arguments", [
    '{"path": "/tmp/ok", "path": "/etc/shadow"}',
    '{"options": {"mode": "read", "mode": "write"}}',
    '{"items": [{"id": 1}, {"id": 2, "id": 3}]}',
    '{"path": "/tmp/ok", "pa\\u0074h": "/etc/shadow"}',  # the same key once decoded
])
def test_duplicate_keys_nested_in_arguments_are_refused_and_never_forwarded(arguments, recorder, procs, tmp_path):
    """SPEC §6: the strict parse refuses a duplicate key at any depth, so the bytes
    forwarded can never mean one thing to the policy and another to the upstream."""
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    r = httpx.post(tg.url, content=raw_call(arguments), headers=headers(name="echo"), timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == -32700
    assert "duplicate object key" in r.json()["error"]["message"]
    assert recorder.tool_calls() == []


@pytest.mark.parametrize("text", ["\\ud800", "\\udfff", "x\\ud83dy", "\\ude00\\ud83d"])
def test_lone_surrogates_are_refused_and_never_forwarded(text, recorder, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    r = httpx.post(tg.url, content=raw_call('{"text": "%s"}' % text), headers=headers(name="echo"), timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == -32700
    # Nor in the tool name, where the policy reads it.
    r = httpx.post(tg.url, content=raw_call("{}", name="echo%s" % text), headers=headers(name="echo"), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32700, r.text
    assert recorder.tool_calls() == []


def test_an_unchanged_message_is_forwarded_as_its_own_bytes(recorder, procs, tmp_path):
    """What the strict parse accepted goes upstream byte for byte: escapes, spacing
    and key order as the client wrote them."""
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    body = raw_call('{ "text" : "caf\\u00e9 \\ud83d\\ude00",\n  "n": [1, -2, 18446744073709551615], "z": {"b": null, "a": true} }')
    r = httpx.post(tg.url, content=body, headers=headers(name="echo"), timeout=10)
    assert r.status_code == 200, r.text
    (forwarded,) = recorder.tool_calls()
    assert forwarded["raw"] == body
    # A fraction is forwarded as the number the policy evaluated (re-serialised): a
    # parser with more precision than an f64 would read the text as another number.
    body = raw_call('{"x": 0.1000000000000000000000001}')
    r = httpx.post(tg.url, content=body, headers=headers(name="echo"), timeout=10)
    assert r.status_code == 200, r.text
    forwarded = recorder.tool_calls()[-1]
    assert forwarded["raw"] != body and b'"x":0.1' in forwarded["raw"], forwarded["raw"]
