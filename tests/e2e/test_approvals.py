"""require_approval end to end: the Python SDK client's call waits while a human
decides through the admin API (or the web page, see test_page.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import anyio
import httpx
import pytest
from mcp import Client

from conftest import free_port, start_tollgate, start_upstream

pytestmark = pytest.mark.anyio

TOKEN = "admin-token-0123456789"
ALICE = "alice-approver-token-0123"
BOB = "bob-approver-token-456789"
ADMIN = (f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, approvers: "
         f"[{{name: alice, token: {ALICE}}}, {{name: bob, token: {BOB}}}]}}")

POLICY = """
version: 1
default: deny
rules:
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    approval: { timeout: %s }
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

EXPORT = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "data_access_role_arn": "arn:aws:iam::1:role/x",
    "output_data_config": {"s3_configuration": {"s3_uri": "s3://approved-exports/a"}},
}


def admin_get(tg, path: str, token: str | None = TOKEN) -> httpx.Response:
    h = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(tg.admin + path, headers=h, timeout=10)


def admin_post(tg, path: str, body: dict | None = None, token: str | None = TOKEN) -> httpx.Response:
    h = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(tg.admin + path, json=body or {}, headers=h, timeout=10)


async def wait_pending(tg, count: int = 1, timeout: float = 15) -> list[dict]:
    with anyio.fail_after(timeout):
        while True:
            pending = [a for a in admin_get(tg, "/approvals").json() if a["status"] == "pending"]
            if len(pending) >= count:
                return pending
            await anyio.sleep(0.05)


def start(procs, tmp_path, timeout: int = 60, extra: str = ""):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY % timeout, extra=ADMIN + "\n" + extra)
    return upstream, tg


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_approve_forwards_the_call_and_returns_the_upstreams_result(era, procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    result = None
    async with Client(tg.url, mode=era) as client:
        async with anyio.create_task_group() as tg_tasks:
            async def call():
                nonlocal result
                result = await client.call_tool("start_fhir_export_job", EXPORT)
            tg_tasks.start_soon(call)
            (pending,) = await wait_pending(tg)
            assert pending["tool"] == "start_fhir_export_job"
            assert pending["arguments"] == EXPORT
            assert pending["server"] == "upstream"
            assert pending["reason"] == "Bulk export of patient data needs a human."
            assert upstream.calls() == [], "held, not forwarded"
            r = admin_post(tg, f"/approvals/{pending['id']}/approve", token=ALICE)
            assert r.status_code == 200 and r.json()["status"] == "approved"
    assert result is not None and result.is_error is False
    assert json.loads(result.content[0].text)["JobStatus"] == "SUBMITTED"
    assert upstream.tools_called() == ["start_fhir_export_job"]
    approvals = [r for r in tg.audit() if r["event"] == "approval"]
    assert approvals[0]["verdict"] == "approved" and approvals[0]["decided_by"] == "alice"


async def test_deny_returns_the_approvers_reason_to_the_agent(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    result = None
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            async def call():
                nonlocal result
                result = await client.call_tool("start_fhir_export_job", EXPORT)
            tasks.start_soon(call)
            (pending,) = await wait_pending(tg)
            admin_post(tg, f"/approvals/{pending['id']}/deny", {"reason": "not during the audit freeze"})
    assert result.is_error is True
    assert "not during the audit freeze" in result.content[0].text
    assert result.meta["dev.tollgate/decision"]["kind"] == "approval_denied"
    assert upstream.calls() == []


async def test_the_approver_is_named_by_their_token_never_by_the_body(procs, tmp_path):
    """Issue 14.3: a decision records the name of the token's owner; the body's `by`
    cannot put words in anyone's mouth, and an approver's token opens approvals only."""
    upstream, tg = start(procs, tmp_path)
    # By call, not by arrival: the approved call goes upstream and may answer after the
    # denied one on a busy machine.
    results = {}
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            async def call(name):
                results[name] = (await client.call_tool("start_fhir_export_job", EXPORT)).is_error
            tasks.start_soon(call, "approved")
            (first,) = await wait_pending(tg)
            assert admin_post(tg, f"/approvals/{first['id']}/approve", {"by": "mallory"}, token="not-a-token").status_code == 401
            r = admin_post(tg, f"/approvals/{first['id']}/approve", {"by": "mallory"}, token=ALICE)
            assert r.status_code == 200, r.text
            assert r.json()["decided_by"] == "alice"
            tasks.start_soon(call, "denied")
            (second,) = await wait_pending(tg)
            r = admin_post(tg, f"/approvals/{second['id']}/deny", {"reason": "no", "by": "alice"}, token=BOB)
            assert r.json()["decided_by"] == "bob"
    assert results == {"approved": False, "denied": True}
    assert admin_get(tg, f"/approvals/{first['id']}", token=BOB).json()["decided_by"] == "alice"
    # Operations stay the operator's.
    for path in ("/metrics", "/status"):
        assert admin_get(tg, path, token=ALICE).status_code == 403
    assert admin_post(tg, "/reload", token=BOB).status_code == 403
    assert admin_get(tg, "/status").status_code == 200
    approvals = [(r["verdict"], r["decided_by"]) for r in tg.audit() if r["event"] == "approval"]
    assert approvals == [("approved", "alice"), ("denied", "bob")]
    assert upstream.tools_called() == ["start_fhir_export_job"]


async def test_approvers_need_names_and_tokens_of_their_own(procs, tmp_path):
    from conftest import TOLLGATE
    import subprocess
    config = tmp_path / "bad.yaml"
    (tmp_path / "p.yaml").write_text("version: 1\nrules: []\n")
    config.write_text(
        f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, approvers: [{{name: a, token: {TOKEN}}}, {{name: a, token: short}}]}}\n"
        "servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    out = subprocess.run([TOLLGATE, "validate", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "admin.approvers[0].token" in out.stderr and "admin.approvers[1].name" in out.stderr, out.stderr
    assert "shorter than 16" in out.stderr, out.stderr


async def test_no_decision_before_the_timeout_refuses(procs, tmp_path):
    upstream, tg = start(procs, tmp_path, timeout=2)
    async with Client(tg.url, mode="auto") as client:
        started = time.monotonic()
        result = await client.call_tool("start_fhir_export_job", EXPORT)
    assert 1.5 < time.monotonic() - started < 10
    assert result.meta["dev.tollgate/decision"]["kind"] == "approval_timeout"
    assert upstream.calls() == []
    (settled,) = admin_get(tg, "/approvals").json()
    assert settled["status"] == "expired"
    r = admin_post(tg, f"/approvals/{settled['id']}/approve")
    assert r.status_code == 409 and r.json()["approval"]["status"] == "expired"


async def test_a_disconnecting_client_leaves_its_approval_pending_for_the_retry(procs, tmp_path):
    """Issue 16: a client that gives up and goes away (its own timeout, a proxy cutting the
    request) does not abandon the approval: the person's later click still counts, for the
    same client's retry."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    key = "alpha-key-0123456789"
    upstream, tg = start(procs, tmp_path, extra=f"clients: [{{name: alpha, key: {key}}}]")

    def alpha():
        return Client(streamable_http_client(tg.url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})),
                      mode="legacy")

    async with alpha() as client:
        with anyio.move_on_after(1.5):
            await client.call_tool("start_fhir_export_job", EXPORT)
    (pending,) = await wait_pending(tg)
    # Within a keep-alive interval Tollgate notices the request is gone ...
    with anyio.fail_after(20):
        while "tollgate_streams_active 0" not in admin_get(tg, "/metrics").text:
            await anyio.sleep(0.2)
    # ... and the approval stays pending: nothing is forwarded on the dead request.
    assert [a["status"] for a in admin_get(tg, "/approvals").json()] == ["pending"]
    assert admin_post(tg, f"/approvals/{pending['id']}/approve", token=ALICE).status_code == 200
    assert upstream.calls() == []
    async with alpha() as client:  # a new session of the same client
        result = await client.call_tool("start_fhir_export_job", EXPORT)
    assert result.is_error is False, result
    assert upstream.tools_called() == ["start_fhir_export_job"]


async def test_a_cancelled_call_stops_waiting_and_its_retry_redeems_the_approval(procs, tmp_path):
    """Issue 16: the client cancels the held call (`notifications/cancelled`) but keeps its
    session: the held request ends at once, nothing is ever forwarded for it, and the
    approval waits for the retry on the same session."""
    from conftest import RawSession

    upstream, tg = start(procs, tmp_path)
    session = RawSession(tg.url, timeout=60)
    session.initialize()
    answers: list[dict] = []
    caller = threading.Thread(target=lambda: answers.append(session.call("start_fhir_export_job", EXPORT)), daemon=True)
    caller.start()
    try:
        (pending,) = await wait_pending(tg)
        held_id = session.next_id - 1
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": held_id, "reason": "gave up"}}
        other = RawSession(tg.url)
        other.session_id, other.protocol = session.session_id, session.protocol
        assert other.http.post(tg.url, json=cancel, headers=other._headers()).status_code == 202
        await anyio.to_thread.run_sync(lambda: caller.join(timeout=4))
        assert not caller.is_alive(), "the cancelled request ended at once"
        assert "result" not in answers[0], answers
        assert admin_post(tg, f"/approvals/{pending['id']}/approve", token=ALICE).status_code == 200
        await anyio.sleep(0.5)
        assert upstream.calls() == [], "nothing forwarded for the cancelled request"
        retry = await anyio.to_thread.run_sync(lambda: session.call("start_fhir_export_job", EXPORT))
        assert retry["result"]["isError"] is False, retry
    finally:
        session.close()
    assert upstream.tools_called() == ["start_fhir_export_job"]


async def test_twenty_calls_waiting_at_once_are_each_settled_correctly(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    results: dict[int, object] = {}
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            for i in range(20):
                async def call(i=i):
                    args = {**EXPORT, "job_name": f"job-{i}"}
                    results[i] = await client.call_tool("start_fhir_export_job", args)
                tasks.start_soon(call)
            pending = await wait_pending(tg, 20)
            for approval in pending:
                i = int(approval["arguments"]["job_name"].split("-")[1])
                verdict = "approve" if i % 2 == 0 else "deny"
                assert admin_post(tg, f"/approvals/{approval['id']}/{verdict}", {"reason": f"odd {i}"}).status_code == 200
    for i, result in results.items():
        if i % 2 == 0:
            assert result.is_error is False, i
        else:
            assert result.is_error is True and f"odd {i}" in result.content[0].text, i
    assert len(upstream.calls()) == 10
    assert sorted(c["arguments"]["datastore_id"] for c in upstream.calls()) == [EXPORT["datastore_id"]] * 10


async def test_the_admin_api_wants_its_token_and_knows_its_ids(procs, tmp_path):
    upstream, tg = start(procs, tmp_path)
    assert admin_get(tg, "/approvals", token=None).status_code == 401
    assert admin_get(tg, "/approvals", token="wrong").status_code == 401
    assert admin_post(tg, "/approvals/nope/approve", token=None).status_code == 401
    assert admin_get(tg, "/approvals").json() == []
    assert admin_post(tg, "/approvals/unknown-id/approve").status_code == 404
    assert admin_get(tg, "/approvals/unknown-id").status_code == 404
    assert httpx.get(tg.admin + "/healthz", timeout=5).status_code == 200


class Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("content-length", 0))
        Receiver.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_the_webhook_gets_each_new_approval_and_a_dead_one_delays_nothing(procs, tmp_path):
    Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upstream, tg = start(procs, tmp_path, timeout=1, extra=f"approvals: {{webhook: 'http://127.0.0.1:{server.server_port}/hook'}}")
        async with Client(tg.url, mode="auto") as client:
            await client.call_tool("start_fhir_export_job", EXPORT)
        with anyio.fail_after(10):
            while not Receiver.received:
                await anyio.sleep(0.05)
        hook = Receiver.received[0]
        assert hook["type"] == "approval.pending"
        assert hook["approval"]["tool"] == "start_fhir_export_job"
        assert hook["approve_url"].startswith(tg.admin + "/approvals/") and hook["approve_url"].endswith("/approve")
        assert hook["deny_url"].endswith("/deny")
    finally:
        server.shutdown()

    # A receiver that is down: the call is decided just as fast (it expires after 1 s).
    dead = free_port()
    upstream2, tg2 = start(procs, tmp_path, timeout=1, extra=f"approvals: {{webhook: 'http://127.0.0.1:{dead}/hook'}}")
    async with Client(tg2.url, mode="auto") as client:
        await client.call_tool("echo", {"text": "warm up"})
        started = time.monotonic()
        result = await client.call_tool("start_fhir_export_job", EXPORT)
        assert time.monotonic() - started < 3
    assert result.meta["dev.tollgate/decision"]["kind"] == "approval_timeout"


ELICIT_POLICY = """
version: 1
rules:
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    approval: { timeout: 30, via: elicitation }
"""


@pytest.mark.parametrize("approve", [True, False])
async def test_via_elicitation_asks_the_clients_own_user(approve, procs, tmp_path):
    from mcp import types

    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, ELICIT_POLICY, extra=ADMIN)
    asked: list[types.ElicitRequestParams] = []

    async def on_elicit(context, params):
        asked.append(params)
        assert admin_get(tg, "/approvals").json() == [], "the user is asked instead of the queue"
        if approve:
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action="decline")

    async with Client(tg.url, mode="legacy", elicitation_callback=on_elicit) as client:
        result = await client.call_tool("start_fhir_export_job", EXPORT)
    assert len(asked) == 1
    assert "start_fhir_export_job" in asked[0].message and "s3://approved-exports/a" in asked[0].message
    if approve:
        assert result.is_error is False
        assert upstream.tools_called() == ["start_fhir_export_job"]
    else:
        assert result.is_error is True
        assert result.meta["dev.tollgate/decision"]["kind"] == "approval_denied"
        assert "decline" in result.content[0].text
        assert upstream.calls() == []
    verdicts = [r["verdict"] for r in tg.audit() if r["event"] == "approval"]
    assert verdicts == (["approved"] if approve else ["denied"])


async def test_via_elicitation_falls_back_to_the_queue_without_the_capability(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, ELICIT_POLICY, extra=ADMIN)
    result = None
    async with Client(tg.url, mode="auto") as client:  # stateless era: no server-to-client requests
        async with anyio.create_task_group() as tasks:
            async def call():
                nonlocal result
                result = await client.call_tool("start_fhir_export_job", EXPORT)
            tasks.start_soon(call)
            (pending,) = await wait_pending(tg)
            admin_post(tg, f"/approvals/{pending['id']}/approve")
    assert result.is_error is False
    assert upstream.tools_called() == ["start_fhir_export_job"]


async def test_the_cli_lists_approves_and_denies(procs, tmp_path):
    import subprocess

    from conftest import TOLLGATE

    upstream, tg = start(procs, tmp_path)
    env = {"TOLLGATE_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}

    def cli(*args):
        return subprocess.run([TOLLGATE, "approvals", *args, "--admin", tg.admin], capture_output=True, text=True, env=env, timeout=30)

    results = []
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            for name in ["keep", "drop"]:
                async def call(name=name):
                    results.append((name, await client.call_tool("start_fhir_export_job", {**EXPORT, "job_name": name})))
                tasks.start_soon(call)
            pending = await wait_pending(tg, 2)
            listed = await anyio.to_thread.run_sync(lambda: cli("list"))
            assert listed.returncode == 0, listed.stderr
            for approval in pending:
                assert approval["id"] in listed.stdout and "pending" in listed.stdout
            ids = {a["arguments"]["job_name"]: a["id"] for a in pending}
            ok = await anyio.to_thread.run_sync(lambda: cli("approve", ids["keep"]))
            assert ok.returncode == 0 and "approved" in ok.stdout, ok.stderr
            no = await anyio.to_thread.run_sync(lambda: cli("deny", ids["drop"], "--reason", "from the terminal"))
            assert no.returncode == 0 and "denied" in no.stdout, no.stderr
    outcome = dict(results)
    assert outcome["keep"].is_error is False
    assert "from the terminal" in outcome["drop"].content[0].text
    again = cli("approve", ids["keep"])
    assert again.returncode == 1 and "already settled" in again.stderr

    # Issue 16.5: show by a unique prefix, with the full arguments; --format json everywhere.
    shown = cli("show", ids["keep"][:5])
    assert shown.returncode == 0, shown.stderr
    assert "start_fhir_export_job" in shown.stdout and "Bulk export of patient data needs a human." in shown.stdout
    assert '"s3_uri": "s3://approved-exports/a"' in shown.stdout, "pretty JSON of the arguments"
    assert "rules[0] (start_fhir_export_job)" in shown.stdout and "alice" not in shown.stdout
    as_json = cli("show", ids["keep"][:5], "--format", "json")
    assert json.loads(as_json.stdout)["id"] == ids["keep"]
    listed = cli("list")
    assert '{"datastore_id":"0123456789' in listed.stdout, "an argument preview"
    assert {a["id"] for a in json.loads(cli("list", "--format", "json").stdout)} == set(ids.values())
    assert json.loads(cli("grants", "--format", "json").stdout) == []

    # Approve with a grant from the terminal, list it, revoke it.
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            async def held():
                results.append(("grant", await client.call_tool("start_fhir_export_job", {**EXPORT, "job_name": "g"})))
            tasks.start_soon(held)
            (pending,) = await wait_pending(tg)
            granted = await anyio.to_thread.run_sync(lambda: cli("approve", pending["id"], "--grant-for", "10m", "--scope", "session", "--format", "json"))
            assert granted.returncode == 0, granted.stderr
            grant = json.loads(granted.stdout)["grant"]
        assert grant["scope"] == "session" and grant["arguments_digest"]
        assert (await client.call_tool("start_fhir_export_job", {**EXPORT, "job_name": "g"})).is_error is False
    grants = cli("grants")
    assert grant["id"] in grants.stdout and "session" in grants.stdout, grants.stdout
    revoked = cli("revoke", grant["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    assert cli("revoke", grant["id"]).returncode == 1
    ambiguous = cli("show", "")
    assert ambiguous.returncode != 0
    wrong = subprocess.run([TOLLGATE, "approvals", "list", "--admin", tg.admin], capture_output=True, text=True,
                           env={"TOLLGATE_ADMIN_TOKEN": "wrong", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr


def test_a_non_loopback_admin_listener_needs_a_token(procs, tmp_path):
    import subprocess

    from conftest import TOLLGATE

    (tmp_path / "p.yaml").write_text("version: 1\nrules: []\n")
    (tmp_path / "t.yaml").write_text(
        "listen: 127.0.0.1:0\nadmin: {listen: '0.0.0.0:0'}\nservers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n"
    )
    out = subprocess.run([TOLLGATE, "serve", "--config", str(tmp_path / "t.yaml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "admin.token is required" in out.stderr
