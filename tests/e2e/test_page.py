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
from test_approvals import ADMIN, EXPORT, POLICY, TOKEN, admin_get

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
    # Issue 16.5: the call's age, the time left and the grant choices.
    assert any(m.startswith("waiting ") for m in seen["meta"]), seen
    assert seen["left"].endswith("s left"), seen
    assert seen["choices"][0] == "once" and "this client, 10 min" in seen["choices"], seen
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


async def test_the_page_grants_a_window_and_revokes_it(procs, tmp_path):
    """Issue 16.4: Approve with "this client, 10 min, any arguments" lets the client's next
    call through without asking; Revoke on the page ends the grant at once."""
    if shutil.which("chromium") is None or not (ROOT / "tests/ts/node_modules/playwright-core").exists():
        pytest.fail("chromium or playwright-core is missing: run tests/run, which installs both")
    upstream = start_upstream(procs, tmp_path)
    policy = POLICY.replace("approval: { timeout: %s }", "approval: { timeout: 60, wait: 20 }")
    tg = start_tollgate(procs, tmp_path, upstream.url, policy, extra=ADMIN)
    browser = subprocess.Popen(
        ["node", str(ROOT / "tests/ts/page.mjs"), tg.admin, TOKEN, str(tmp_path / "grant.png"), "grant"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert browser.stderr is not None and browser.stdin is not None
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(browser.stderr.readline)
        assert line.strip() == "READY", line
        async with Client(tg.url, mode="legacy") as client:
            with anyio.fail_after(60):
                first = await client.call_tool("start_fhir_export_job", EXPORT)
                line = await anyio.to_thread.run_sync(browser.stderr.readline)
            assert line.startswith("GRANTED "), line
            grant_id = line.split()[1]
            assert first.is_error is False
            granted = await client.call_tool("start_fhir_export_job", {**EXPORT, "job_name": "two"})
            assert granted.is_error is False, "the grant lets the client's next call through"
            browser.stdin.write("revoke\n")
            browser.stdin.flush()
            out, err = await anyio.to_thread.run_sync(lambda: browser.communicate(timeout=30))
            assert browser.returncode == 0, err
            seen = json.loads(out)
            assert "start_fhir_export_job" in seen["grant"] and "any" in seen["grant"] and seen["revoked"]
            with anyio.move_on_after(2):
                await client.call_tool("start_fhir_export_job", {**EXPORT, "job_name": "three"})
            held = [a for a in admin_get(tg, "/approvals").json() if a["status"] == "pending"]
            assert [a["arguments"]["job_name"] for a in held] == ["three"], "revoked: held again"
    finally:
        if browser.poll() is None:
            browser.kill()
    assert upstream.tools_called() == ["start_fhir_export_job"] * 2
    revoked = [r for r in tg.audit() if r["event"] == "grant_revoked"]
    assert [r["grant_id"] for r in revoked] == [grant_id]
