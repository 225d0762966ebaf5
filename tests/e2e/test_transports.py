"""Layouts of SPEC §3: several servers behind one Tollgate, and concurrent calls
racing for the same rate-limit slots. (stdio and legacy HTTP+SSE, issue 6, are
drafted in issue6_transports_draft.py, which pytest does not collect.)"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from mcp import Client

from conftest import TOLLGATE, Proc, start_tollgate, start_upstream
from test_http import headers, tool_call

pytestmark = pytest.mark.anyio

POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
  - tool: delete_*
    action: deny
    reason: no deletes
"""


def check_enforced(names: set[str], allowed, denied) -> None:
    assert "echo" in names and "delete_fhir_datastore" not in names
    assert allowed.is_error is False and allowed.content[0].text == "echo: hi ✓ — ünïcödé"
    assert denied.is_error is True and denied.content[0].text == "Denied by policy: no deletes"


async def exercise(client) -> tuple[set[str], object, object]:
    names = {t.name for t in (await client.list_tools()).tools}
    allowed = await client.call_tool("echo", {"text": "hi"})
    denied = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
    return names, allowed, denied


def start_multi(procs, tmp_path, servers: dict[str, tuple[str, str]]) -> str:
    """servers: name -> (upstream url or `command:` YAML, policy text). Returns the base URL."""
    blocks = []
    for name, (target, policy) in servers.items():
        (tmp_path / f"{name}.yaml").write_text(policy)
        where = target if target.startswith("    ") else f"    url: {target}\n"
        blocks.append(f"  {name}:\n{where}    policy: {name}.yaml\n")
    config = tmp_path / "multi.yaml"
    config.write_text("listen: 127.0.0.1:0\nservers:\n" + "".join(blocks))
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / "multi.log")
    procs.append(proc)
    proc.wait_line(r"Tollgate listening on (http://\S+)")
    url = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+)").group(1)
    return url


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_each_server_has_its_own_path_and_policy(era, procs, tmp_path):
    a = start_upstream(procs, tmp_path)
    b = start_upstream(procs, tmp_path)
    base = start_multi(procs, tmp_path, {
        "alpha": (a.url, POLICY),
        "beta": (b.url, "version: 1\ndefault: allow\nrules:\n  - tool: echo\n    action: deny\n    reason: not here\n"),
    })
    async with Client(f"{base}/servers/alpha/mcp", mode=era) as client:
        check_enforced(*await exercise(client))
    async with Client(f"{base}/servers/beta/mcp", mode=era) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        echo = await client.call_tool("echo", {"text": "hi"})
        deleted = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
    assert "echo" not in names and "delete_fhir_datastore" in names
    assert echo.is_error is True and echo.content[0].text == "Denied by policy: not here"
    assert deleted.is_error is False and deleted.content[0].text == "deleted"
    assert a.tools_called() == ["echo"]
    assert b.tools_called() == ["delete_fhir_datastore"]
    # With two servers there is no unambiguous /mcp, and unknown names are not found.
    assert httpx.post(f"{base}/servers/gamma/mcp", json=tool_call("echo", {}), headers=headers(name="echo"),
                      timeout=10).status_code == 404


async def test_concurrent_calls_cannot_overspend_a_rate_limit(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path, "stateless")
    tg = start_tollgate(procs, tmp_path, upstream.url,
                        "version: 1\nrules:\n  - tool: echo\n    action: allow\n    rate_limit: {max: 5, window: 60, per: global}\n",
                        extra="limits: {requests_per_second: 0}")
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(*[
            client.post(tg.url, json=tool_call("echo", {"text": str(i)}, i), headers=headers(name="echo"))
            for i in range(20)
        ])
    results = [r.json()["result"] for r in answers]
    allowed = [r for r in results if not r["isError"]]
    limited = [r for r in results if r["isError"]]
    assert len(allowed) == 5, [r["content"][0]["text"] for r in results]
    assert all(r["_meta"]["dev.tollgate/decision"]["kind"] == "rate_limit" for r in limited)
    assert len(upstream.calls()) == 5
