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


def test_control_and_bidi_characters_are_shown_escaped_on_the_page(procs, tmp_path, recorder):
    """U+202E (right-to-left override) in a tool name or an argument would show the
    approver reordered text; the page shows it as `\\u202e` instead (issue 14, point 4)."""
    import threading

    from conftest import RawSession

    if shutil.which("chromium") is None or not (ROOT / "tests/ts/node_modules/playwright-core").exists():
        pytest.fail("chromium or playwright-core is missing: run tests/run, which installs both")
    policy = "version: 1\ndefault: deny\nrules:\n  - tool: \"start_*\"\n    action: require_approval\n"
    tg = start_tollgate(procs, tmp_path, recorder.url, policy, extra=ADMIN)
    tool = "start_\u202etxt.exe"
    answers: list[dict] = []
    session = RawSession(tg.url, timeout=60)
    session.initialize()
    browser = subprocess.Popen(
        ["node", str(ROOT / "tests/ts/page.mjs"), tg.admin, TOKEN, str(tmp_path / "bidi.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert browser.stderr is not None
        assert browser.stderr.readline().strip() == "READY"
        caller = threading.Thread(
            target=lambda: answers.append(session.call(tool, {"path": "/safe/\u202ecod.sh", "bell": "\u0007"})),
            daemon=True)
        caller.start()
        out, err = browser.communicate(timeout=60)
        caller.join(timeout=30)
    finally:
        if browser.poll() is None:
            browser.kill()
        session.close()
    assert browser.returncode == 0, err
    seen = json.loads(out)
    assert "\u202e" not in seen["tool"] and "\\u202e" in seen["tool"], seen
    assert "\u202e" not in seen["args"] and "\\u202e" in seen["args"], seen
    assert answers and answers[0]["result"]["isError"] is False, answers
    assert [c["body"]["params"]["name"] for c in recorder.tool_calls()] == [tool]
