"""The approver's web page in real headless Chromium (Debian's chromium, driven by
playwright-core from tests/ts): a pending call appears without a reload, and
clicking Approve releases the waiting Python SDK client."""

from __future__ import annotations

import json
import shutil
import subprocess

import anyio
import pytest
from mcp import Client

from conftest import ROOT, start_tollgate, start_upstream
from test_approvals import ADMIN, EXPORT, POLICY, TOKEN

pytestmark = pytest.mark.anyio


async def test_a_pending_call_appears_live_and_approve_releases_the_client(procs, tmp_path):
    if shutil.which("chromium") is None or not (ROOT / "tests/ts/node_modules/playwright-core").exists():
        pytest.fail("chromium or playwright-core is missing: run tests/run, which installs both")
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY % 60, extra=ADMIN)
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    screenshot = artifacts / "approvals-page.png"
    browser = subprocess.Popen(
        ["node", str(ROOT / "tests/ts/page.mjs"), tg.admin, TOKEN, str(screenshot)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Wait until the page is signed in, so the call can only appear live.
        assert browser.stderr is not None
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(browser.stderr.readline)
        assert line.strip() == "READY", line
        async with Client(tg.url, mode="legacy") as client:
            with anyio.fail_after(60):
                result = await client.call_tool("start_fhir_export_job", EXPORT)
        out, err = await anyio.to_thread.run_sync(lambda: browser.communicate(timeout=30))
    finally:
        if browser.poll() is None:
            browser.kill()
    assert browser.returncode == 0, err
    seen = json.loads(out)
    assert seen["tool"] == "start_fhir_export_job"
    assert "s3://approved-exports/a" in seen["args"]
    assert result.is_error is False
    assert upstream.tools_called() == ["start_fhir_export_job"]
    assert screenshot.stat().st_size > 10_000
