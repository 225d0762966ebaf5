"""`Mcp-Param-*` headers (issue 14, point 13; 2026-07-28 Streamable HTTP, "Custom
Headers from Tool Parameters"): Tollgate learns from the upstream's `tools/list`
which argument each tool mirrors into a header (`x-mcp-header`), refuses a call whose
header disagrees with the body or is missing (400, -32020) before it reaches the
upstream, and forwards the headers no tool declares untouched."""

from __future__ import annotations

import base64

import httpx
import pytest

from conftest import start_tollgate
from test_http import headers, tool_call

POLICY = """
version: 1
default: deny
rules:
  - tool: read_file
    action: allow
  - tool: plain
    action: allow
  - tool: invalid
    action: allow
"""

READ_FILE = {
    "name": "read_file",
    "inputSchema": {
        "type": "object",
        "properties": {
            "path": {"type": "string", "x-mcp-header": "Path"},
            "lines": {"type": "integer", "x-mcp-header": "Lines"},
        },
    },
}
# Annotated on a `number`, which the spec does not allow: the tool is not offered.
INVALID = {
    "name": "invalid",
    "inputSchema": {"type": "object", "properties": {"n": {"type": "number", "x-mcp-header": "N"}}},
}
PLAIN = {"name": "plain", "inputSchema": {"type": "object"}}


def b64(value: str) -> str:
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


@pytest.fixture
def setup(procs, tmp_path, recorder):
    recorder.tool_pages = [[READ_FILE, INVALID, PLAIN]]
    tg = start_tollgate(procs, tmp_path, recorder.url, POLICY)
    with httpx.Client(timeout=20) as http:
        listed = http.post(tg.url, json={"jsonrpc": "2.0", "id": 0, "method": "tools/list",
                                         "params": {"_meta": tool_call("x", {})["params"]["_meta"]}},
                           headers=headers("tools/list"))
        assert listed.status_code == 200, listed.text
        tg.listed = [t["name"] for t in listed.json()["result"]["tools"]]
        yield tg, recorder, http


def test_tools_with_invalid_annotations_are_not_offered(setup):
    tg, _, _ = setup
    # A Streamable HTTP client must exclude them; Tollgate could not check their headers.
    assert tg.listed == ["read_file", "plain"]


def call(http, tg, arguments: dict, params: dict[str, str], tool: str = "read_file"):
    return http.post(tg.url, json=tool_call(tool, arguments), headers={**headers(name=tool), **params})


def assert_mismatch(r, fragment: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == -32020, error
    assert fragment in error["message"], error


def test_a_param_header_that_disagrees_with_the_body_is_refused_and_never_forwarded(setup):
    tg, recorder, http = setup
    r = call(http, tg, {"path": "/safe/x"}, {"Mcp-Param-Path": "/etc/passwd"})
    assert_mismatch(r, "Mcp-Param-Path header value '/etc/passwd' does not match")
    # Encoded, the same lie is decoded and refused.
    r = call(http, tg, {"path": "/safe/x"}, {"Mcp-Param-Path": b64("/etc/passwd")})
    assert_mismatch(r, "does not match")
    r = call(http, tg, {"path": "/safe/x", "lines": 10}, {"Mcp-Param-Path": "/safe/x", "Mcp-Param-Lines": "11"})
    assert_mismatch(r, "Mcp-Param-Lines")
    # A header for an argument the body does not carry.
    r = call(http, tg, {}, {"Mcp-Param-Path": "/etc/passwd"})
    assert_mismatch(r, "no value in the body")
    assert recorder.tool_calls() == []


def test_a_missing_param_header_is_refused(setup):
    tg, recorder, http = setup
    r = call(http, tg, {"path": "/safe/x"}, {})
    assert_mismatch(r, "the Mcp-Param-Path header is required")
    assert recorder.tool_calls() == []


def test_matching_param_headers_go_through_as_sent(setup):
    tg, recorder, http = setup
    r = call(http, tg, {"path": "/safe/x", "lines": 10}, {"Mcp-Param-Path": "/safe/x", "Mcp-Param-Lines": "10"})
    assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "recorded", r.text
    encoded = b64("/dossier/été")
    r = call(http, tg, {"path": "/dossier/été"}, {"Mcp-Param-Path": encoded})
    assert r.status_code == 200, r.text
    # An argument the body leaves out needs no header.
    r = call(http, tg, {}, {})
    assert r.status_code == 200, r.text
    sent = [c["headers"] for c in recorder.tool_calls()]
    assert [(h.get("mcp-param-path"), h.get("mcp-param-lines")) for h in sent] == [
        ("/safe/x", "10"), (encoded, None), (None, None)]


def test_undeclared_param_headers_are_forwarded_untouched(setup):
    tg, recorder, http = setup
    r = call(http, tg, {"path": "/safe/x"}, {"Mcp-Param-Path": "/safe/x", "Mcp-Param-Tenant": "acme"})
    assert r.status_code == 200, r.text
    r = call(http, tg, {}, {"Mcp-Param-Anything": "=?base64?not checked?="}, tool="plain")
    assert r.status_code == 200, r.text
    sent = [c["headers"] for c in recorder.tool_calls()]
    assert sent[0].get("mcp-param-tenant") == "acme"
    assert sent[1].get("mcp-param-anything") == "=?base64?not checked?="
