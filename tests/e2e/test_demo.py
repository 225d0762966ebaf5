"""`tollgate demo` as a new user meets it: it prints a URL, a client config and a
Python SDK snippet, and the snippet works as printed (issue 4, Done when)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

from conftest import TOLLGATE, Proc


def test_the_demo_and_the_snippet_it_prints(procs, tmp_path):
    # From an empty directory: the demo's policy is built in, not read from the checkout.
    proc = Proc([TOLLGATE, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                tmp_path / "demo.log", cwd=tmp_path)
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+/mcp)").group(1)
    proc.wait_line(r"asyncio\.run\(main\(\)\)")
    out = "\n".join(proc.lines)

    config = json.loads(proc.wait_line(r"^\s*(\{\"mcpServers\".*\})\s*$").group(1))
    assert config["mcpServers"]["healthlake"]["url"] == url

    snippet_lines = out.split("Python SDK (pip", 1)[1].splitlines()[1:]
    snippet_lines = snippet_lines[: next(i for i, l in enumerate(snippet_lines) if "asyncio.run(main())" in l) + 1]
    snippet = textwrap.dedent("\n".join(snippet_lines))
    assert url in snippet
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    tools = eval(lines[0])  # the snippet prints a Python list of names
    assert "list_fhir_datastores" in tools and "delete_fhir_datastore" not in tools
    assert "is_error=False" in lines[1] or "isError" not in lines[1]
    assert "is_error=True" in lines[2] and "Denied by policy: " in lines[2]
    assert re.search(r"dev\.tollgate/decision", lines[2])


def test_logs_written_to_a_file_are_plain_text_or_json(procs, tmp_path):
    """stderr that is not a terminal (a file, docker logs, journald) gets no colour codes;
    `--log-format json` gives one JSON object per line."""
    import httpx

    from conftest import start_upstream
    from test_http import headers, tool_call

    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text("version: 1\ndefault: allow\nrules: []\n")
    env = {"RUST_LOG": "info", "NO_COLOR": ""}  # an empty NO_COLOR does not turn colour off
    for fmt in ["text", "json"]:
        log = tmp_path / f"serve-{fmt}.log"
        proc = Proc([TOLLGATE, "serve", "--upstream", upstream.url, "--policy", str(tmp_path / "p.yaml"),
                     "--listen", "127.0.0.1:0", "--log-format", fmt], log, env=env)
        procs.append(proc)
        url = proc.wait_line(r"Tollgate listening on (http://\S+/mcp)").group(1)
        assert httpx.post(url, json=tool_call("echo", {"text": "x"}), headers=headers(name="echo"),
                          timeout=10).status_code == 200
        proc.stop()
        text = log.read_text()
        assert text.strip(), "nothing logged at RUST_LOG=info"
        assert "\x1b[" not in text, f"ANSI colour codes in a log file: {text[:200]!r}"
        if fmt == "json":
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
