"""The official Python SDK (mcp 2.x) as client, through the real tollgate binary,
to upstreams written with the same SDK: both eras (the client's default `auto`
mode probes `server/discover`, so the stateless era; `legacy` is the handshake
era) and both upstream modes (stateful SSE, and stateless_http + json_response).
"""

from __future__ import annotations

import re
import time
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp import types

from conftest import start_tollgate, start_upstream

pytestmark = pytest.mark.anyio

POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: list_fhir_datastores
    action: allow
  - tool: slow_progress
    action: allow
  - tool: ask_user
    action: allow
  - tool: describe_fhir_export_job
    action: allow
    rate_limit: { max: 2, window: 60 }
  - tool: start_fhir_export_job
    action: allow
    arguments:
      type: object
      properties:
        output_data_config:
          properties:
            s3_configuration:
              properties:
                s3_uri: { type: string, pattern: "^s3://approved-exports/" }
  - tool: delete_*
    action: deny
    reason: Deleting data stores is never done by agents.
"""

ERAS = ["auto", "legacy"]
UPSTREAMS = ["stateful", "stateless"]


MODERN = "2026-07-28"
HANDSHAKE = {"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"}


@asynccontextmanager
async def connect(target, era: str, **kwargs):
    """A connected `Client` that really is in the era asked for.

    `mode="auto"` silently falls back to `initialize` when `server/discover`
    fails, so without this check a proxy that broke the stateless era would
    still pass every "auto" test in the handshake era.
    """
    async with Client(target, mode=era, **kwargs) as client:
        if era == "auto":
            assert client.protocol_version == MODERN, f"auto mode fell back to {client.protocol_version}"
        else:
            assert client.protocol_version in HANDSHAKE, client.protocol_version
        yield client


def assert_refused(result: types.CallToolResult, kind: str, tool: str) -> dict:
    """The SPEC §6 shape of a refused call; returns the decision object."""
    assert result.is_error is True
    assert len(result.content) == 1 and result.content[0].type == "text"
    assert result.content[0].text.startswith("Denied by policy: "), result.content[0].text
    found = decision(result)
    assert found["kind"] == kind and found["tool"] == tool, found
    assert isinstance(found["rule"], str) and found["rule"], found
    assert isinstance(found["reason"], str) and found["reason"], found
    assert result.content[0].text.startswith(f"Denied by policy: {found['reason']}")
    return found


def decision(result: types.CallToolResult) -> dict:
    meta = result.meta or {}
    return meta["dev.tollgate/decision"]


def text(result: types.CallToolResult) -> str:
    return result.content[0].text


@pytest.fixture(params=UPSTREAMS)
def upstream(request, procs, tmp_path):
    return start_upstream(procs, tmp_path, request.param)


@pytest.mark.parametrize("era", ERAS)
async def test_tools_list_hides_tools_denied_outright(era, upstream, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    async with connect(upstream.url, era) as direct:
        upstream_names = {t.name for t in (await direct.list_tools()).tools}
    async with connect(tg.url, era) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert {"delete_fhir_datastore", "chatty", "announce"} <= upstream_names
    # Removed: the tool a rule denies outright, and those no rule matches under
    # `default: deny` (docs/policy.md). Rate-limited, argument-checked and allowed tools stay.
    assert names == upstream_names - {"delete_fhir_datastore", "chatty", "announce"}
    assert names == {"echo", "list_fhir_datastores", "slow_progress", "ask_user",
                     "describe_fhir_export_job", "start_fhir_export_job"}
    assert upstream.calls() == []


@pytest.mark.parametrize("era", ERAS)
async def test_allowed_call_returns_the_upstreams_result_unchanged(era, upstream, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    async with connect(upstream.url, era) as direct:
        expected = await direct.call_tool("echo", {"text": "héllo"})
        expected_list = await direct.call_tool("list_fhir_datastores", {})
    async with connect(tg.url, era) as client:
        got = await client.call_tool("echo", {"text": "héllo"})
        got_list = await client.call_tool("list_fhir_datastores", {})
    assert got.is_error is False
    assert got.content[0].text == "echo: héllo ✓ — ünïcödé"
    assert [c.model_dump() for c in got.content] == [c.model_dump() for c in expected.content]
    assert [c.model_dump() for c in got_list.content] == [c.model_dump() for c in expected_list.content]
    # Byte for byte: the JSON text of the content, not only its parsed value.
    assert got.content[0].text.encode() == expected.content[0].text.encode()
    assert got_list.content[0].text.encode() == expected_list.content[0].text.encode()
    assert got.structured_content == expected.structured_content
    assert upstream.tools_called() == ["echo", "list_fhir_datastores", "echo", "list_fhir_datastores"]
    assert upstream.calls()[2] == {"tool": "echo", "arguments": {"text": "héllo"}}


@pytest.mark.parametrize("era", ERAS)
async def test_refused_calls_never_reach_the_upstream(era, upstream, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    async with connect(tg.url, era) as client:
        denied = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
        assert_refused(denied, "deny", "delete_fhir_datastore")
        assert text(denied) == "Denied by policy: Deleting data stores is never done by agents."
        assert decision(denied) == {
            "kind": "deny",
            "tool": "delete_fhir_datastore",
            "rule": "rules[6] (delete_*)",
            "reason": "Deleting data stores is never done by agents.",
        }

        default = await client.call_tool("drop_tables", {})
        assert assert_refused(default, "deny", "drop_tables")["rule"] == "default"

        bad_args = await client.call_tool(
            "start_fhir_export_job",
            {"datastore_id": "d", "data_access_role_arn": "r",
             "output_data_config": {"s3_configuration": {"s3_uri": "s3://attacker/x"}}},
        )
        assert_refused(bad_args, "arguments", "start_fhir_export_job")
        assert "/output_data_config/s3_configuration/s3_uri" in decision(bad_args)["reason"]
        assert decision(bad_args)["rule"].startswith("rules[5]")

        for _ in range(2):
            ok = await client.call_tool("describe_fhir_export_job", {"datastore_id": "d", "job_id": "j"})
            assert ok.is_error is False
        limited = await client.call_tool("describe_fhir_export_job", {"datastore_id": "d", "job_id": "j"})
        assert_refused(limited, "rate_limit", "describe_fhir_export_job")
        assert decision(limited)["rule"].startswith("rules[4]")
        assert 0 < decision(limited)["retry_after_ms"] <= 60_000
        assert re.search(r"retry in \d+s", text(limited)), text(limited)
    assert upstream.tools_called() == ["describe_fhir_export_job", "describe_fhir_export_job"]
    decisions = [r for r in tg.audit() if r["event"] == "decision"]
    assert [r["decision"] for r in decisions] == ["deny", "deny", "deny", "allow", "allow", "deny"]
    assert [r["kind"] for r in decisions] == ["deny", "deny", "arguments", None, None, "rate_limit"]
    assert [r["tool"] for r in decisions] == [
        "delete_fhir_datastore", "drop_tables", "start_fhir_export_job",
        "describe_fhir_export_job", "describe_fhir_export_job", "describe_fhir_export_job"]
    assert [r["rule"] for r in decisions] == [
        "rules[6] (delete_*)", "default", decision(bad_args)["rule"],
        decision(limited)["rule"], decision(limited)["rule"], decision(limited)["rule"]]
    assert decisions[0]["reason"] == "Deleting data stores is never done by agents."
    assert decisions[2]["reason"] == decision(bad_args)["reason"]
    assert decisions[5]["reason"] == decision(limited)["reason"]
    assert all(isinstance(r["reason"], str) and r["reason"] for r in decisions)
    assert all(r["server"] == "upstream" and r["arguments_digest"].startswith("sha256:") for r in decisions)


@pytest.mark.parametrize("era", ERAS)
async def test_deny_as_error_answers_with_a_json_rpc_error(era, upstream, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, upstream.url, "version: 1\ndeny_as: error\nrules:\n  - tool: delete_*\n    action: deny\n    reason: no deletes\n  - tool: echo\n    action: allow\n")
    async with connect(tg.url, era) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
        assert (await client.call_tool("echo", {"text": "still fine"})).is_error is False
    assert raised.value.error.code == -32001
    assert raised.value.error.message == "Tool call denied by policy: no deletes"
    assert raised.value.error.data == {
        "kind": "deny", "tool": "delete_fhir_datastore", "rule": "rules[0] (delete_*)", "reason": "no deletes"}
    assert upstream.tools_called() == ["echo"]


AUDIT_ONLY = """
version: 1
mode: audit
default: deny
rules:
  - tool: delete_*
    action: deny
    reason: no deletes
"""


@pytest.mark.parametrize("era", ERAS)
async def test_audit_mode_lets_everything_through_and_logs_the_decision(era, upstream, procs, tmp_path):
    tg = start_tollgate(procs, tmp_path, upstream.url, AUDIT_ONLY)
    async with connect(tg.url, era) as client:
        result = await client.call_tool("echo", {"text": "x"})
        deleted = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
        # In audit mode nothing is hidden either.
        names = {t.name for t in (await client.list_tools()).tools}
    assert result.is_error is False and text(result) == "echo: x ✓ — ünïcödé"
    assert deleted.is_error is False and text(deleted) == "deleted"
    assert "dev.tollgate/decision" not in (deleted.meta or {})
    assert "delete_fhir_datastore" in names
    assert upstream.tools_called() == ["echo", "delete_fhir_datastore"]
    records = [r for r in tg.audit() if r["event"] == "decision"]
    assert [(r["tool"], r["decision"], r["rule"], r["mode"]) for r in records] == [
        ("echo", "deny", "default", "audit"),
        ("delete_fhir_datastore", "deny", "rules[0] (delete_*)", "audit"),
    ]
    assert records[1]["reason"] == "no deletes"


CLIENTS = """
clients:
  - {name: alice, key: alice-key-0123456789}
"""

QUOTAS = """
version: 1
rules:
  - tool: echo
    action: allow
    rate_limit: { max: 1, window: 60, per: session }
  - tool: list_fhir_datastores
    action: allow
    rate_limit: { max: 1, window: 60, per: client }
"""


def authed(url: str, key: str):
    return streamable_http_client(url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}))


@pytest.mark.parametrize("era", ERAS)
async def test_a_new_session_gets_a_fresh_session_quota_but_not_a_fresh_client_quota(era, procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, QUOTAS, extra=CLIENTS)
    async with connect(authed(tg.url, "alice-key-0123456789"), era) as first:
        assert (await first.call_tool("echo", {"text": "1"})).is_error is False
        assert (await first.call_tool("list_fhir_datastores", {})).is_error is False
        assert decision(await first.call_tool("echo", {"text": "2"}))["kind"] == "rate_limit"
    async with connect(authed(tg.url, "alice-key-0123456789"), era) as second:
        again = await second.call_tool("echo", {"text": "3"})
        client_quota = await second.call_tool("list_fhir_datastores", {})
    if era == "legacy":
        assert again.is_error is False, "a new handshake-era session has a fresh per-session quota"
        assert text(again) == "echo: 3 ✓ — ünïcödé"
    else:
        # The stateless era has no sessions: per-session limits key on the client (SPEC §6).
        assert decision(again)["kind"] == "rate_limit"
    assert_refused(client_quota, "rate_limit", "list_fhir_datastores")
    assert "per client" in decision(client_quota)["reason"], decision(client_quota)
    expected = ["echo", "list_fhir_datastores"] + (["echo"] if era == "legacy" else [])
    assert upstream.tools_called() == expected


async def test_clients_without_a_key_are_refused(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, QUOTAS, extra=CLIENTS)
    with pytest.raises(Exception):
        with anyio.fail_after(15):
            async with Client(tg.url, mode="legacy") as client:
                await client.list_tools()
    assert upstream.calls() == []


@pytest.mark.parametrize("era", ERAS)
async def test_progress_notifications_are_streamed_before_the_result(era, procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateful")
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    seen: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((time.monotonic(), progress))

    async with connect(tg.url, era) as client:
        result = await client.call_tool("slow_progress", {"steps": 4}, progress_callback=on_progress)
        finished = time.monotonic()
    assert result.is_error is False and "done after 4 steps" in text(result)
    assert [p for _, p in seen] == [1, 2, 3, 4]
    # Relayed as they happen: the first arrives ~1 s before the result, not with it.
    assert finished - seen[0][0] > 0.6, seen
    # ... and one by one, ~300 ms apart, not in one burst at the end.
    assert seen[-1][0] - seen[0][0] > 0.5, seen


# A stateless upstream (no back-channel) can only elicit in the stateless era, where the
# SDK asks with an InputRequiredResult and the client retries with the answer.
@pytest.mark.parametrize(("era", "upstream_mode"), [("auto", "stateful"), ("legacy", "stateful"), ("auto", "stateless")])
@pytest.mark.parametrize("accept", [True, False])
async def test_elicitation_from_the_upstream_reaches_the_client_and_back(era, upstream_mode, accept, procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, upstream_mode)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    asked: list[str] = []

    async def on_elicit(context, params: types.ElicitRequestParams):
        asked.append(params.message)
        if accept:
            return types.ElicitResult(action="accept", content={"answer": "forty-two"})
        return types.ElicitResult(action="decline")

    async with connect(tg.url, era, elicitation_callback=on_elicit) as client:
        result = await client.call_tool("ask_user", {"question": "What is the answer?"})
    assert asked == ["What is the answer?"]
    assert result.is_error is False
    assert text(result) == ("user said: forty-two" if accept else "user decline")
    assert upstream.tools_called()[-1] == "ask_user"


async def test_the_typescript_sdk_is_a_second_independent_client(upstream, procs, tmp_path):
    import json
    import os
    import shutil
    import subprocess

    from conftest import ROOT

    node_modules = ROOT / "tests" / "ts" / "node_modules" / "@modelcontextprotocol" / "sdk"
    if not node_modules.exists() or shutil.which("node") is None:
        pytest.fail("the TypeScript SDK is not installed: run tests/run (npm ci in tests/ts)")
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    out = subprocess.run(
        ["node", str(ROOT / "tests" / "ts" / "client.mjs"), tg.url],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["tools"]) == {"echo", "list_fhir_datastores", "slow_progress", "ask_user",
                                     "describe_fhir_export_job", "start_fhir_export_job"}
    # The session the TS client holds is one Tollgate issued: 128 bits or more of randomness.
    assert report["sessionId"] and len(report["sessionId"]) >= 32
    assert report["allowed"]["isError"] is False
    assert report["allowed"]["content"][0]["text"] == "echo: from node ✓ — ünïcödé"
    assert report["denied"]["isError"] is True
    assert report["denied"]["content"][0]["text"] == "Denied by policy: Deleting data stores is never done by agents."
    assert report["denied"]["_meta"]["dev.tollgate/decision"] == {
        "kind": "deny", "tool": "delete_fhir_datastore", "rule": "rules[6] (delete_*)",
        "reason": "Deleting data stores is never done by agents."}
    assert report["defaultDenied"]["isError"] is True
    assert report["defaultDenied"]["_meta"]["dev.tollgate/decision"]["rule"] == "default"
    assert upstream.tools_called() == ["echo"]


async def test_serve_with_upstream_and_policy_flags_needs_no_config_file(procs, tmp_path):
    from conftest import TOLLGATE, Proc

    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "flags.yaml").write_text(POLICY)
    proc = Proc([TOLLGATE, "serve", "--upstream", upstream.url, "--policy", str(tmp_path / "flags.yaml"),
                 "--listen", "127.0.0.1:0"], tmp_path / "flags.log")
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
    async with connect(url, "auto") as client:
        assert (await client.call_tool("echo", {"text": "x"})).is_error is False
        assert (await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})).is_error is True
    assert upstream.tools_called() == ["echo"]


def test_scan_lists_the_tools_and_prints_a_policy_that_validates(procs, tmp_path):
    import subprocess

    from conftest import TOLLGATE, free_port, wait_port

    port = free_port()
    demo = subprocess.Popen([TOLLGATE, "demo-upstream", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        out = subprocess.run([TOLLGATE, "scan", "--upstream", f"http://127.0.0.1:{port}/mcp"],
                             capture_output=True, text=True, timeout=60)
    finally:
        demo.terminate()
        demo.wait(timeout=10)
    assert out.returncode == 0, out.stderr
    policy = tmp_path / "scanned.yaml"
    policy.write_text(out.stdout)
    assert subprocess.run([TOLLGATE, "validate", str(policy)], capture_output=True, timeout=30).returncode == 0

    def decision(tool: str) -> str:
        r = subprocess.run([TOLLGATE, "--format", "json", "explain", "--policy", str(policy), "--tool", tool],
                           capture_output=True, text=True, timeout=30)
        return __import__("json").loads(r.stdout)["decision"]

    assert decision("list_fhir_datastores") == "allow"          # readOnlyHint
    assert decision("delete_fhir_datastore") == "deny"          # destructiveHint
    assert decision("start_fhir_export_job") == "require_approval"
    assert decision("not_listed") == "deny"                     # default
    assert "# Start exporting a data store's FHIR resources to S3." in out.stdout
    assert "    #   required:" in out.stdout

    # Scanning through Tollgate itself works too, as a client would see it.
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY)
    out = subprocess.run([TOLLGATE, "scan", "--upstream", tg.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tool: \"echo\"" in out.stdout and "delete_fhir_datastore" not in out.stdout
