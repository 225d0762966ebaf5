"""The real AWS Labs HealthLake MCP server (awslabs.healthlake-mcp-server 0.0.20 from
PyPI) as a stdio upstream, end to end.

Tollgate starts it from its own venv (tests/.venv-healthlake: it needs mcp<2) with
`AWS_ENDPOINT_URL` pointing at tests/e2e/fake_aws.py, so its boto3 client really
calls `HealthLake.StartFHIRExportJob` over HTTP. The agent is the official Python SDK
client (mcp 2.x). An export to the approved bucket is held, approved by a person
through the admin API and reaches AWS once; an export anywhere else and any delete
never reach AWS.
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


def start(procs, tmp_path: Path, aws: FakeHealthLake) -> tuple[str, str]:
    """Tollgate with the real server as a stdio upstream under policies/healthlake.yaml."""
    assert Path(HEALTHLAKE_PYTHON).exists(), (
        f"{HEALTHLAKE_PYTHON} is missing: tests/run builds it from tests/requirements-healthlake.txt"
    )
    env = {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": aws.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n"
        f"audit: {{path: '{tmp_path / 'audit.jsonl'}'}}\n"
        "servers:\n"
        "  healthlake:\n"
        f"    command: {json.dumps([HEALTHLAKE_PYTHON, '-m', 'awslabs.healthlake_mcp_server.main'])}\n"
        f"    env: {json.dumps(env)}\n"
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
            assert aws.operations() == [], "held, so AWS has seen nothing yet"
            approved = httpx.post(f"{admin}/approvals/{held['id']}/approve", json={"by": "dr-lee"},
                                  headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
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
    assert all("Delete" not in r["target"] for r in aws.requests)
    assert len(aws.requests) == 1, aws.requests
