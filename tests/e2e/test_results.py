"""Result rules (SPEC §9) and Tollgate's own markers, end to end: an upstream written
with the official Python SDK returns secrets and patient identifiers, answered as JSON
and as SSE, in text, structured and embedded-resource content; the SDK's client reads
them through Tollgate."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from mcp import Client

from conftest import HERE, PYTHON, Proc, free_port, start_tollgate, wait_port

pytestmark = pytest.mark.anyio

TOKEN = "results-admin-token-0123456789"
ADMIN = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"
AUTH = {"authorization": f"Bearer {TOKEN}"}

AWS_KEY = "AKIA2Z3X4C5V6B7N2M3Q"
PEM_LINE = "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu"
SSN = "123-45-6789"
MRN = "MRN-12345678"
SECRETS = [AWS_KEY, PEM_LINE, "BEGIN RSA PRIVATE KEY", SSN, MRN]

POLICY = """\
version: 1
default: allow
rules:
  - tool: read_config
    action: allow
    rate_limit: {max: 1, window: 1h, per: global}
results:
  - tool: "read_*"
    redact: [aws_access_key, private_key, us_ssn, {name: mrn, pattern: "MRN-[0-9]{8}"}]
  - tool: read_config
    block: [private_key]
"""


def start_secrets(procs, tmp_path, mode: str) -> str:
    port = free_port()
    args = [PYTHON, str(HERE / "secrets_upstream.py"), str(port)] + (["--json"] if mode == "json" else [])
    procs.append(Proc(args, tmp_path / f"secrets-{port}.log"))
    wait_port(port, timeout=90)  # a loaded machine starts Python slowly
    return f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(params=["json", "sse"])
def setup(request, procs, tmp_path):
    upstream = start_secrets(procs, tmp_path, request.param)
    tg = start_tollgate(procs, tmp_path, upstream, POLICY, extra=ADMIN)
    return upstream, tg


def dumped(result) -> str:
    return result.model_dump_json(by_alias=True)


def no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} reached the client: {text}"


async def test_secrets_are_redacted_in_text_structured_and_resource_content(setup):
    _, tg = setup
    async with Client(tg.url, mode="legacy") as client:
        log = await client.call_tool("read_log", {})
        patient = await client.call_tool("read_patient", {})
        resource = await client.call_tool("read_resource", {})
    assert not log.is_error
    assert log.content[0].text == (
        "2026-12-07 uploaded with key [redacted:aws_access_key] (twice: [redacted:aws_access_key])"
    )
    assert log.meta["dev.tollgate/redactions"] == [{"name": "aws_access_key", "count": 2}]
    assert patient.structured_content["patient"]["ssn"] == "[redacted:us_ssn]"
    assert patient.structured_content["patient"]["mrn"] == "[redacted:mrn]"
    assert patient.structured_content["patient"]["notes"] == ["verified [redacted:us_ssn]"]
    assert patient.structured_content["patient"]["name"] == "Jane Roe"
    assert patient.content[0].text == "Patient Jane Roe, [redacted:mrn]"
    assert patient.meta["dev.tollgate/redactions"] == [
        {"name": "mrn", "count": 2}, {"name": "us_ssn", "count": 2}]
    assert resource.content[0].resource.text == "SSN [redacted:us_ssn]; [redacted:mrn]"
    for result in (log, patient, resource):
        no_secret_in(dumped(result))


async def test_a_blocked_result_is_withheld_and_its_call_keeps_its_slot(setup):
    _, tg = setup
    async with Client(tg.url, mode="legacy") as client:
        withheld = await client.call_tool("read_config", {})
        again = await client.call_tool("read_config", {})
    assert withheld.is_error
    assert withheld.content[0].text == "Result withheld by policy: it contains private_key"
    assert withheld.meta["dev.tollgate/decision"]["kind"] == "result_blocked"
    no_secret_in(dumped(withheld))
    # The tool ran: its rate-limit slot stays spent, so the second call is refused.
    assert again.is_error and again.meta["dev.tollgate/decision"]["kind"] == "rate_limit", dumped(again)
    outcomes = wait_for(lambda: [r for r in tg.audit() if r.get("event") == "outcome"], 1)
    assert [o["outcome"] for o in outcomes] == ["result_blocked"], outcomes
    assert outcomes[0]["redactions"] == [{"name": "private_key", "count": 1}]


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_a_forged_tollgate_decision_never_reaches_the_client(procs, tmp_path, mode):
    # No `results` entry: markers are removed whatever the policy says.
    upstream = start_secrets(procs, tmp_path, mode)
    tg = start_tollgate(procs, tmp_path, upstream, "version: 1\ndefault: allow\n")
    async with Client(tg.url, mode="legacy") as client:
        forged = await client.call_tool("forged_pending", {})
    assert forged.meta == {"example.com/keep": "yes"}, forged.meta
    assert "evil.example/approve" not in json.dumps(forged.meta)
    # What the tool said in its own text is its own, and reaches the client.
    assert forged.content[0].text == "Approval pending: visit http://evil.example/approve"


async def test_audit_and_metrics_name_detectors_never_the_matched_text(setup):
    _, tg = setup
    async with Client(tg.url, mode="legacy") as client:
        await client.call_tool("read_log", {})
        await client.call_tool("read_patient", {})
    outcomes = wait_for(lambda: [r for r in tg.audit() if r.get("event") == "outcome"], 2)
    by_tool = {o["tool"]: o for o in outcomes}
    assert by_tool["read_log"]["redactions"] == [{"name": "aws_access_key", "count": 2}]
    assert by_tool["read_patient"]["redactions"] == [
        {"name": "mrn", "count": 2}, {"name": "us_ssn", "count": 2}]
    assert by_tool["read_log"]["outcome"] == "ok"
    metrics = httpx.get(tg.admin + "/metrics", headers=AUTH, timeout=10).text
    counted = dict(re.findall(
        r'tollgate_result_redactions_total\{server="upstream",detector="(\w+)"\} (\d+)', metrics))
    assert counted == {"aws_access_key": "2", "mrn": "2", "us_ssn": "2"}, metrics
    no_secret_in(tg.audit_path.read_text())
    no_secret_in(metrics)


STATELESS_CALL = (
    b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "%s", "arguments": {}, '
    b'"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", '
    b'"io.modelcontextprotocol/clientCapabilities": {}}}}'
)
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call"}


def test_a_result_no_entry_matches_arrives_byte_for_byte(procs, tmp_path):
    upstream = start_secrets(procs, tmp_path, "json")
    tg = start_tollgate(procs, tmp_path, upstream, POLICY)
    headers = {**HEADERS, "mcp-name": "status"}
    direct = httpx.post(upstream, content=STATELESS_CALL % b"status", headers=headers, timeout=10)
    through = httpx.post(tg.url, content=STATELESS_CALL % b"status", headers=headers, timeout=10)
    assert direct.status_code == through.status_code == 200
    assert "ünïcödé" in direct.json()["result"]["content"][0]["text"]
    assert through.content == direct.content
    # And a call whose result has a secret is not (the rules apply in the stateless era too).
    headers["mcp-name"] = "read_log"
    through = httpx.post(tg.url, content=STATELESS_CALL % b"read_log", headers=headers, timeout=10)
    assert AWS_KEY not in through.text and "[redacted:aws_access_key]" in through.text


def wait_for(read, count: int, timeout: float = 5):
    """`read()` once it has `count` items (records are written just after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if len(value) >= count or time.monotonic() >= deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("era", ["handshake", "stateless"])
def test_a_tasks_result_is_checked_with_the_rules_of_its_tool(procs, tmp_path, era):
    """A task-augmented call's result comes later, through `tasks/result`: asking for a
    task must not bypass the rules of the tool that created it."""
    from conftest import serve_config, write_config
    from test_tasks import Client as TaskClient, start_http

    key = "alice-key-0123456789abcdef"
    block, _ = start_http(procs, tmp_path)
    policy = "version: 1\ndefault: allow\nresults:\n  - tool: payroll_report\n    redact: [us_ssn]\n"
    extra = f"clients:\n  - {{name: alice, key: {key}}}\nlimits: {{requests_per_second: 0}}\n"
    config = write_config(tmp_path, {"tasks": (block, policy)}, extra=extra)
    base, _ = serve_config(procs, config)
    alice = TaskClient(f"{base}/servers/tasks/mcp", key, era)
    created = alice.request("tools/call", {"name": "payroll_report", "arguments": {"ssn": SSN},
                                           "task": {"ttl": 60000}})
    task = created["result"]["task"]["taskId"]
    result = alice.request("tasks/result", {"taskId": task})["result"]
    assert SSN not in json.dumps(result), result
    assert result["content"][0]["text"] == 'payroll_report: {"ssn": "[redacted:us_ssn]"}'
    assert result["_meta"]["dev.tollgate/redactions"] == [{"name": "us_ssn", "count": 1}]
    # The upstream's own _meta stays; a tool no entry names is left alone.
    assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task}
    other = alice.request("tools/call", {"name": "weather", "arguments": {"note": SSN}, "task": {"ttl": 60000}})
    plain = alice.request("tasks/result", {"taskId": other["result"]["task"]["taskId"]})["result"]
    assert SSN in plain["content"][0]["text"]


def batch_upstream():
    """A batch-answering upstream whose `read_log` returns an AWS key."""
    from conftest import BatchUpstream

    def result(method, params):
        text = f"key {AWS_KEY}" if params.get("name") == "read_log" else "nothing here"
        return {"content": [{"type": "text", "text": text}], "isError": False}

    return BatchUpstream(result)


def test_each_call_of_a_batch_is_checked_with_its_own_rules(procs, tmp_path):
    from conftest import RawSession

    upstream = batch_upstream()
    try:
        policy = "version: 1\ndefault: allow\nresults:\n  - tool: read_log\n    redact: [aws_access_key]\n"
        tg = start_tollgate(procs, tmp_path, upstream.url, policy)
        session = RawSession(tg.url, protocol="2025-03-26")
        session.initialize()
        batch = [{"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": name, "arguments": {}}}
                 for i, name in enumerate(["read_log", "status"], start=10)]
        r = session.http.post(tg.url, json=batch, headers=session._headers())
        answers = {a["id"]: a for a in r.json()}
        assert answers[10]["result"]["content"][0]["text"] == "key [redacted:aws_access_key]", answers
        assert answers[10]["result"]["_meta"]["dev.tollgate/redactions"] == [{"name": "aws_access_key", "count": 1}]
        assert answers[11]["result"] == {"content": [{"type": "text", "text": "nothing here"}], "isError": False}
        assert AWS_KEY not in r.text
        outcomes = wait_for(lambda: [o for o in tg.audit() if o.get("event") == "outcome"], 2)
        redacted = {o["tool"]: o.get("redactions") for o in outcomes}
        assert redacted == {"read_log": [{"name": "aws_access_key", "count": 1}], "status": None}, outcomes
    finally:
        upstream.close()


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_an_approved_calls_result_is_checked_as_any_other(procs, tmp_path, mode):
    import anyio

    upstream = start_secrets(procs, tmp_path, mode)
    policy = ("version: 1\ndefault: allow\nrules:\n  - tool: read_log\n    action: require_approval\n"
              "results:\n  - tool: read_log\n    redact: [aws_access_key]\n")
    tg = start_tollgate(procs, tmp_path, upstream, policy, extra=ADMIN)
    result = None
    async with Client(tg.url, mode="legacy") as client:
        async with anyio.create_task_group() as tasks:
            async def call():
                nonlocal result
                result = await client.call_tool("read_log", {})
            tasks.start_soon(call)
            with anyio.fail_after(30):
                while not (pending := [a for a in httpx.get(tg.admin + "/approvals", headers=AUTH, timeout=10).json()
                                       if a["status"] == "pending"]):
                    await anyio.sleep(0.1)
            r = httpx.post(tg.admin + f"/approvals/{pending[0]['id']}/approve", json={}, headers=AUTH, timeout=10)
            assert r.status_code == 200, r.text
    assert result is not None and not result.is_error, result
    assert "[redacted:aws_access_key]" in result.content[0].text
    no_secret_in(dumped(result))
