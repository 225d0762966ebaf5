"""Policy review end to end: calls made with the official MCP SDK through the real
`tollgate` binary write a real audit log, and `tollgate diff` replays it under a
changed policy: the calls whose decision changes are reported with their client and
old and new rule, the others are not, rate limits are replayed per client in the
recorded order, and calls whose decision depends on arguments the log did not keep
are counted, not guessed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import TOLLGATE, serve_config, start_upstream, wait_until, write_config

pytestmark = pytest.mark.anyio

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}
CLIENTS = "clients:\n" + "".join(f"  - {{name: {n}, key: {k}}}\n" for n, k in KEYS.items())

# The policy the proxy runs.
OLD = """version: 1
default: deny
rules:
  - tool: echo
    action: allow
    rate_limit: {max: 3, window: 1m, per: client}
  - tool: list_*
    action: allow
  - tool: start_fhir_export_job
    action: allow
    arguments: {type: object, required: [output_data_config]}
"""

# The change under review: a tighter echo quota, one list tool refused, exports only
# to the approved bucket.
NEW = """version: 1
default: deny
rules:
  - tool: echo
    action: allow
    rate_limit: {max: 1, window: 1m, per: client}
  - tool: list_fhir_datastores
    action: deny
  - tool: list_*
    action: allow
  - tool: start_fhir_export_job
    action: allow
    arguments:
      type: object
      required: [output_data_config]
      properties:
        output_data_config:
          type: object
          properties:
            s3_configuration:
              properties: {s3_uri: {pattern: "^s3://approved-exports/"}}
"""

EXPORT = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "data_access_role_arn": "arn:aws:iam::123456789012:role/export",
    "output_data_config": {"s3_configuration": {"s3_uri": "s3://elsewhere/a"}},
}


def client(url: str, name: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEYS[name]}"})
    return Client(streamable_http_client(url, http_client=http), mode="legacy")


async def record_calls(procs, tmp_path: Path, upstream_url: str, arguments: bool) -> Path:
    """Runs the calls through a Tollgate that runs OLD; returns its audit log."""
    audit = tmp_path / f"audit-{arguments}.jsonl"
    config = write_config(
        tmp_path,
        {"health": (upstream_url, OLD)},
        extra=f"audit: {{path: '{audit}', arguments: {str(arguments).lower()}}}\n{CLIENTS}",
        name=f"tollgate-{arguments}.yaml",
    )
    base, _ = serve_config(procs, config)
    url = f"{base}/servers/health/mcp"
    async with client(url, "alice") as alice, client(url, "bob") as bob:
        assert (await alice.call_tool("echo", {"text": "1"})).is_error is False
        assert (await alice.call_tool("echo", {"text": "2"})).is_error is False
        assert (await alice.call_tool("list_fhir_datastores", {})).is_error is False
        assert (await alice.call_tool("start_fhir_export_job", EXPORT)).is_error is False
        assert (await bob.call_tool("echo", {"text": "3"})).is_error is False
        assert (await bob.call_tool("delete_fhir_datastore", {"datastore_id": "x"})).is_error is True

    def decisions():
        if not audit.exists():
            return []
        found = [json.loads(l) for l in audit.read_text().splitlines() if l.strip()]
        found = [r for r in found if r["event"] == "decision"]
        return found if len(found) == 6 else []

    records = wait_until(decisions, 10, "six decision records in the audit log")
    assert [(r["client"], r["tool"], r["decision"]) for r in records] == [
        ("alice", "echo", "allow"),
        ("alice", "echo", "allow"),
        ("alice", "list_fhir_datastores", "allow"),
        ("alice", "start_fhir_export_job", "allow"),
        ("bob", "echo", "allow"),
        ("bob", "delete_fhir_datastore", "deny"),
    ]
    assert all(("arguments" in r) == arguments for r in records)
    return audit


def diff(tmp_path: Path, audit: Path, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "old.yaml").write_text(OLD)
    (tmp_path / "new.yaml").write_text(NEW)
    return subprocess.run(
        [TOLLGATE, "diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml"), "--audit", str(audit), *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def changes(report: dict) -> set[tuple]:
    return {
        (c["tool"], c["client"], c["old"]["decision"], c["old"]["rule"], c["new"]["decision"], c["new"]["kind"],
         c["new"]["rule"], c["count"])
        for c in report["changes"]
    }


async def test_diff_replays_a_real_audit_log_under_a_changed_policy(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    logged = await record_calls(procs, tmp_path, upstream.url, arguments=True)
    unlogged = await record_calls(procs, tmp_path, upstream.url, arguments=False)

    out = diff(tmp_path, logged, "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["calls"], report["changed"], report["unchanged"], report["undetermined"]) == (6, 3, 3, 0), report
    assert changes(report) == {
        # alice's second echo is over the new quota of one; bob's own quota is untouched.
        ("echo", "alice", "allow", "rules[0] (echo)", "deny", "rate_limit", "rules[0] (echo)", 1),
        ("list_fhir_datastores", "alice", "allow", "rules[1] (list_*)", "deny", "deny",
         "rules[1] (list_fhir_datastores)", 1),
        ("start_fhir_export_job", "alice", "allow", "rules[2] (start_fhir_export_job)", "deny", "arguments",
         "rules[3] (start_fhir_export_job)", 1),
    }

    # Without the arguments the export is counted and said, not guessed.
    out = diff(tmp_path, unlogged, "--format", "json")
    report = json.loads(out.stdout)
    assert (report["changed"], report["unchanged"], report["undetermined"]) == (2, 3, 1), report
    assert [(u["tool"], u["client"], u["needs"], u["count"]) for u in report["undetermined_calls"]] == [
        ("start_fhir_export_job", "alice", "arguments", 1)
    ]

    out = diff(tmp_path, logged, "--fail-on-change")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 x client alice: allow by rules[1] (list_*) -> deny by rules[1] (list_fhir_datastores)" in out.stdout
    assert "bob" not in out.stdout, "bob's calls do not change"
    out = subprocess.run(
        [TOLLGATE, "diff", str(tmp_path / "old.yaml"), str(tmp_path / "old.yaml"), "--audit", str(logged),
         "--fail-on-change"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout + out.stderr
