"""Issue 16: approvals that survive real clients. The official Python SDK (mcp 2.x) as
the client, with a short read timeout and a short `approval.wait`: a held call hands out
a ticket (`approval_pending`), the retry redeems the approval exactly once; in the
stateless era the SDK's own multi round-trip driver retries an `InputRequiredResult`
with Tollgate's `requestState`; scoped grants; a reload between hold and approval."""

from __future__ import annotations

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, MCPError, types
from mcp.client.streamable_http import streamable_http_client

from conftest import start_tollgate, start_upstream
from test_approvals import ADMIN, ALICE, EXPORT, admin_get, admin_post, wait_pending

pytestmark = pytest.mark.anyio

KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789"}
CLIENTS = "clients:\n" + "".join(f"  - {{name: {n}, key: {k}}}\n" for n, k in KEYS.items())

POLICY = """
version: 1
default: deny
rules:
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    approval: { timeout: %(timeout)s, wait: %(wait)s, via: %(via)s }
    arguments:
      type: object
      properties:
        output_data_config:
          properties:
            s3_configuration:
              properties:
                s3_uri: { type: string, pattern: "^s3://approved-exports/" }
  - tool: echo
    action: allow
"""

OTHER = {**EXPORT, "job_name": "other"}
TOOL = "start_fhir_export_job"


def policy(timeout=60, wait=1, via="queue") -> str:
    return POLICY % {"timeout": timeout, "wait": wait, "via": via}


def start(procs, tmp_path, **kw):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, policy(**kw), extra=ADMIN + "\n" + CLIENTS)
    return upstream, tg


def authed(tg, name: str):
    return streamable_http_client(tg.url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEYS[name]}"}))


def decision(result) -> dict:
    return result.meta["dev.tollgate/decision"]


def pending_ids(tg) -> list[str]:
    return [a["id"] for a in admin_get(tg, "/approvals").json() if a["status"] == "pending"]


def events(tg, name: str) -> list[dict]:
    return [r for r in tg.audit() if r["event"] == name]


async def test_a_ticket_then_the_retry_is_forwarded_exactly_once(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    # A read timeout far under what a person takes: the call must come back on its own.
    async with Client(authed(tg, "alpha"), mode="legacy", read_timeout_seconds=8) as alpha, \
            Client(authed(tg, "beta"), mode="legacy", read_timeout_seconds=8) as beta:
        first = await alpha.call_tool(TOOL, EXPORT)
        assert first.is_error is True
        meta = decision(first)
        assert meta["kind"] == "approval_pending", meta
        approval_id = meta["approval_id"]
        assert meta["url"].startswith(tg.admin + "/") and approval_id in meta["url"]
        assert meta["expires_at"]
        text = first.content[0].text
        assert text.startswith(f"Approval pending (id {approval_id})") and "call the same tool again with the same arguments" in text
        assert upstream.calls() == []

        # A retry while pending joins the same approval: one entry on the page.
        again = await alpha.call_tool(TOOL, dict(reversed(list(EXPORT.items()))))  # same arguments, other key order
        assert decision(again)["kind"] == "approval_pending" and decision(again)["approval_id"] == approval_id
        assert pending_ids(tg) == [approval_id]

        r = admin_post(tg, f"/approvals/{approval_id[:6]}/approve", token=ALICE)  # a unique prefix is enough
        assert r.status_code == 200 and r.json()["status"] == "approved", r.text

        # Another client's identical call, and the same client's call with other arguments: held.
        other_client = await beta.call_tool(TOOL, EXPORT)
        assert decision(other_client)["kind"] == "approval_pending"
        assert decision(other_client)["approval_id"] != approval_id
        other_args = await alpha.call_tool(TOOL, OTHER)
        assert decision(other_args)["kind"] == "approval_pending"
        assert upstream.calls() == []

        # The retry with the same arguments is forwarded, once.
        redeemed = await alpha.call_tool(TOOL, EXPORT)
        assert redeemed.is_error is False, redeemed
        assert upstream.tools_called() == [TOOL]
        second = await alpha.call_tool(TOOL, EXPORT)
        assert decision(second)["kind"] == "approval_pending"
        assert decision(second)["approval_id"] != approval_id
    assert upstream.tools_called() == [TOOL]
    settled = admin_get(tg, f"/approvals/{approval_id}").json()
    assert settled["status"] == "approved" and settled["redeemed_at"] and settled["principal"] == "client:alpha"
    assert [r["approval_id"] for r in events(tg, "approval_redeemed")] == [approval_id]
    assert events(tg, "approval_redeemed")[0]["decided_by"] == "alice"
    assert {r["approval_id"] for r in events(tg, "approval_pending")} >= {approval_id}
    assert [(r["verdict"], r["decided_by"]) for r in events(tg, "approval")] == [("approved", "alice")]


async def test_a_waiting_call_hears_progress_when_it_asked_for_it(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    notes: list = []

    async def on_progress(progress, total, message):
        notes.append((progress, message))

    async with Client(authed(tg, "alpha"), mode="legacy") as alpha:
        result = await alpha.call_tool(TOOL, EXPORT, progress_callback=on_progress)
    assert decision(result)["kind"] == "approval_pending"
    assert notes and "Waiting for a human to approve `start_fhir_export_job`" in notes[0][1], notes


async def test_a_denial_answers_every_retry_with_the_reason(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    async with Client(authed(tg, "alpha"), mode="legacy") as alpha:
        first = await alpha.call_tool(TOOL, EXPORT)
        approval_id = decision(first)["approval_id"]
        admin_post(tg, f"/approvals/{approval_id}/deny", {"reason": "not during the freeze"}, token=ALICE)
        for _ in range(2):
            retry = await alpha.call_tool(TOOL, EXPORT)
            assert decision(retry)["kind"] == "approval_denied"
            assert "not during the freeze" in retry.content[0].text and "alice" in retry.content[0].text
    assert upstream.calls() == []


async def test_a_reload_that_now_denies_the_tool_turns_the_approval_into_a_refusal(procs, tmp_path):
    upstream, tg = start(procs, tmp_path, wait=30)
    result = None
    async with Client(authed(tg, "alpha"), mode="legacy") as alpha:
        async with anyio.create_task_group() as tasks:
            async def call():
                nonlocal result
                result = await alpha.call_tool(TOOL, EXPORT)
            tasks.start_soon(call)
            (pending,) = await wait_pending(tg)
            # The policy file is changed and reloaded while the call is held.
            (policy_file,) = tmp_path.glob("policy*.yaml")
            policy_file.write_text("version: 1\ndefault: deny\nrules:\n  - tool: start_*\n    action: deny\n    reason: exports are frozen\n")
            assert admin_post(tg, "/reload").status_code == 200
            r = admin_post(tg, f"/approvals/{pending['id']}/approve", token=ALICE)
            assert r.status_code == 409, r.text
            assert "policy changed" in r.json()["error"] and "exports are frozen" in r.json()["error"]
            assert r.json()["approval"]["status"] == "denied"
    assert decision(result)["kind"] == "approval_denied"
    assert "policy changed" in result.content[0].text
    assert upstream.calls() == []


async def test_a_grant_lets_the_scope_through_for_its_window_and_revoking_ends_it(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    async with Client(authed(tg, "alpha"), mode="legacy") as alpha, Client(authed(tg, "beta"), mode="legacy") as beta:
        first = await alpha.call_tool(TOOL, EXPORT)
        grant = {"scope": "client", "for": "6s", "any_arguments": True}
        r = admin_post(tg, f"/approvals/{decision(first)['approval_id']}/approve", {"grant": grant}, token=ALICE)
        assert r.status_code == 200, r.text
        grant_id = r.json()["grant"]["id"]
        (listed,) = admin_get(tg, "/approvals/grants").json()
        assert listed["id"] == grant_id and listed["principal"] == "client:alpha" and listed["granted_by"] == "alice"
        # Three calls within the window pass, whatever their arguments (the schema still applies).
        for i in range(3):
            assert (await alpha.call_tool(TOOL, {**EXPORT, "job_name": f"j{i}"})).is_error is False
        bad = await alpha.call_tool(TOOL, {**EXPORT, "output_data_config": {"s3_configuration": {"s3_uri": "s3://elsewhere/"}}})
        assert decision(bad)["kind"] == "arguments"
        # Only for its client.
        assert decision(await beta.call_tool(TOOL, EXPORT))["kind"] == "approval_pending"
        assert admin_get(tg, "/approvals/grants").json()[0]["uses"] == 3
        with anyio.fail_after(15):
            while admin_get(tg, "/approvals/grants").json():
                await anyio.sleep(0.2)
        fourth = await alpha.call_tool(TOOL, {**EXPORT, "job_name": "late"})
        assert decision(fourth)["kind"] == "approval_pending"

        # Revoked: the next call is held at once.
        r = admin_post(tg, f"/approvals/{decision(fourth)['approval_id']}/approve",
                       {"grant": {"scope": "session", "for": "10m"}}, token=ALICE)
        grant_id2 = r.json()["grant"]["id"]
        assert (await alpha.call_tool(TOOL, {**EXPORT, "job_name": "late"})).is_error is False  # the approval itself
        assert (await alpha.call_tool(TOOL, {**EXPORT, "job_name": "late"})).is_error is False  # the grant (same arguments)
        revoked = httpx.delete(f"{tg.admin}/approvals/grants/{grant_id2}", headers={"authorization": f"Bearer {ALICE}"}, timeout=10)
        assert revoked.status_code == 200 and revoked.json()["id"] == grant_id2
        assert decision(await alpha.call_tool(TOOL, {**EXPORT, "job_name": "late"}))["kind"] == "approval_pending"
        assert httpx.delete(f"{tg.admin}/approvals/grants/{grant_id2}", headers={"authorization": f"Bearer {ALICE}"}, timeout=10).status_code == 404
    assert len(upstream.tools_called()) == 5
    created = events(tg, "grant_created")
    assert [(g["grant_id"], g["granted_by"], g["scope"], g["any_arguments"]) for g in created] == [
        (grant_id, "alice", "client", True), (grant_id2, "alice", "session", False)]
    assert [u["grant_id"] for u in events(tg, "grant_used")] == [grant_id] * 3 + [grant_id2]
    assert [(g["grant_id"], g["revoked_by"]) for g in events(tg, "grant_revoked")] == [(grant_id2, "alice")]


# ---- the stateless era (2026-07-28): multi round-trip requests ------------------------------


async def test_stateless_input_required_with_request_state_is_retried_by_the_sdk(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    async with Client(authed(tg, "alpha"), mode="auto") as alpha, Client(authed(tg, "beta"), mode="auto") as beta:
        # The SDK's request API, one round: an InputRequiredResult with Tollgate's state.
        first = await alpha.session.call_tool(TOOL, EXPORT, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), first
        state = first.request_state
        assert state and state.startswith("tollgate1.") and not first.input_requests
        approval_id = decision(first)["approval_id"]
        assert pending_ids(tg) == [approval_id]

        async def refused(client, arguments, request_state) -> MCPError:
            with pytest.raises(MCPError) as err:
                await client.session.call_tool(TOOL, arguments, request_state=request_state, allow_input_required=True)
            assert err.value.error.code == -32602, err.value.error
            return err.value

        # Tampered, replayed by another client, presented on another call: refused, never forwarded.
        at = len("tollgate1.") + 5
        tampered = state[:at] + ("A" if state[at] != "A" else "B") + state[at + 1:]
        assert "altered" in str(await refused(alpha, EXPORT, tampered))
        # A well-formed payload rewritten for another client, under the old MAC: only the MAC tells.
        import base64
        import json as json_
        payload, tag = state[len("tollgate1."):].split(".")
        claims = json_.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["principal"] == "client:alpha" and claims["id"] == approval_id
        claims["principal"] = "client:beta"
        forged = "tollgate1." + base64.urlsafe_b64encode(json_.dumps(claims).encode()).decode().rstrip("=") + "." + tag
        assert "altered" in str(await refused(beta, EXPORT, forged))
        assert "another client" in str(await refused(beta, EXPORT, state))
        assert "another call" in str(await refused(alpha, OTHER, state))
        assert upstream.calls() == []

        # Still pending: the retry waits again, then another InputRequiredResult.
        again = await alpha.session.call_tool(TOOL, EXPORT, request_state=state, allow_input_required=True)
        assert isinstance(again, types.InputRequiredResult) and decision(again)["approval_id"] == approval_id

        # The SDK's own driver retries with the state until a person approves.
        result = None
        async with anyio.create_task_group() as tasks:
            async def call():
                nonlocal result
                result = await alpha.call_tool(TOOL, EXPORT, request_state=again.request_state)
            tasks.start_soon(call)
            await anyio.sleep(1.5)
            assert admin_post(tg, f"/approvals/{approval_id}/approve", token=ALICE).status_code == 200
        assert result is not None and result.is_error is False, result
        assert upstream.tools_called() == [TOOL]
        # A replay of the used state is refused.
        replay = await alpha.session.call_tool(TOOL, EXPORT, request_state=state, allow_input_required=True)
        assert isinstance(replay, types.CallToolResult) and replay.is_error is True
        assert decision(replay)["kind"] == "approval_denied"
    assert upstream.tools_called() == [TOOL]


async def test_stateless_expired_request_state_is_refused(procs, tmp_path):
    upstream, tg = start(procs, tmp_path, timeout=2)
    async with Client(authed(tg, "alpha"), mode="auto") as alpha:
        first = await alpha.session.call_tool(TOOL, EXPORT, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        await anyio.sleep(2.5)
        with pytest.raises(MCPError) as err:
            await alpha.session.call_tool(TOOL, EXPORT, request_state=first.request_state, allow_input_required=True)
        assert "expired" in str(err.value)
    assert upstream.calls() == []


@pytest.mark.parametrize("approve", [True, False])
async def test_stateless_via_elicitation_asks_the_clients_user_in_input_requests(approve, procs, tmp_path):
    upstream, tg = start(procs, tmp_path, via="elicitation")
    asked: list = []

    async def on_elicit(context, params):
        asked.append(params)
        assert admin_get(tg, "/approvals").json() == [], "the user is asked instead of the queue"
        if approve:
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action="decline")

    async with Client(authed(tg, "alpha"), mode="auto", elicitation_callback=on_elicit) as alpha:
        first = await alpha.session.call_tool(TOOL, EXPORT, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        assert list(first.input_requests) == ["dev.tollgate/approval"]
        # The SDK's driver answers the form through the callback and retries.
        result = await alpha.call_tool(TOOL, EXPORT)
    assert len(asked) == 1
    assert TOOL in asked[0].message and "s3://approved-exports/a" in asked[0].message
    if approve:
        assert result.is_error is False
        assert upstream.tools_called() == [TOOL]
    else:
        assert result.is_error is True and decision(result)["kind"] == "approval_denied"
        assert "decline" in result.content[0].text
        assert upstream.calls() == []


async def test_the_typescript_sdk_with_its_default_timeout_gets_a_ticket_and_the_retry_goes_through(procs, tmp_path):
    import json
    import subprocess

    from conftest import ROOT

    if not (ROOT / "tests/ts/node_modules/@modelcontextprotocol/sdk").exists():
        pytest.fail("the TypeScript SDK is not installed: run tests/run (npm ci in tests/ts)")
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, policy(wait=3), extra=ADMIN)
    node = subprocess.Popen(["node", str(ROOT / "tests/ts/approval.mjs"), tg.url, json.dumps(EXPORT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None and node.stdin is not None
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(node.stdout.readline)
        first = json.loads(line)["first"]
        meta = first["_meta"]["dev.tollgate/decision"]
        assert first["isError"] is True and meta["kind"] == "approval_pending", first
        assert upstream.calls() == []
        assert admin_post(tg, f"/approvals/{meta['approval_id']}/approve", token=ALICE).status_code == 200
        node.stdin.write("approved\n")
        node.stdin.flush()
        out, err = await anyio.to_thread.run_sync(lambda: node.communicate(timeout=60))
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == 0, err
    report = json.loads(out)
    assert report["retry"]["isError"] is False, report["retry"]
    assert report["otherArgs"]["_meta"]["dev.tollgate/decision"]["kind"] == "approval_pending"
    assert report["secondRetry"]["_meta"]["dev.tollgate/decision"]["kind"] == "approval_pending"
    assert upstream.tools_called() == [TOOL], "forwarded exactly once"
