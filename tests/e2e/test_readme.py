"""README.md's shell blocks, run as printed (issue 30: the README's commands all run).

Every ```sh block runs, unless the line before its fence is a marker:

  <!-- readme-test: skip REASON -->   not run: it needs the network (a package registry,
                                      a Docker engine, a cluster), or builds for minutes, or
                                      needs state no sandbox has; REASON says which, and names
                                      the test that covers it where one does.
  <!-- readme-test: serves -->        each line starts a server that runs until stopped: it
                                      must say it listens (`tollgate stdio`: answer an
                                      `initialize` on its stdin), then it is stopped.

Other blocks run whole with `bash -euo pipefail` and must exit 0. Each runs in a network
namespace of its own (only its loopback: the README's fixed ports are free, nothing leaves the
machine), in a directory holding a copy of policies/ and the README's own `tollgate.yaml`
example, with the binary under test first on PATH as `tollgate`, the variables that example
names set, and the servers the README points at: the demo MCP server at 127.0.0.1:8000 and a
legacy HTTP+SSE server at 127.0.0.1:8001."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import HERE, PYTHON, ROOT, TOLLGATE

README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-test: (skip|serves)\b\s*(.*?)\s*-->")
INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "readme", "version": "1"}}})


def blocks() -> list[tuple[int, str, str, str]]:
    """(line, marker, reason, text) of each sh block."""
    found = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```sh", "```bash", "```shell"):
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.search(before)
            found.append((start + 1, marker.group(1) if marker else "run", marker.group(2) if marker else "",
                          "\n".join(lines[start + 1:end]) + "\n"))
            i = end
        i += 1
    return found


def config_example() -> str:
    """The README's `tollgate.yaml` example: the yaml block right after its introduction."""
    text = README.read_text()
    at = text.index("`tollgate.yaml` (every key is optional except `servers`):")
    return re.search(r"```yaml\n(.*?)```", text[at:], re.S).group(1)


ENV_NAMES = sorted(set(re.findall(r"\$\{([A-Z0-9_]+)\}", config_example())))

PRELUDE = """set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
ip link set lo up
tollgate demo-upstream --listen 127.0.0.1:8000 >.servers.log 2>&1 &
ports=8000
if grep -q 127.0.0.1:8001 .block.sh; then  # the Python SDK's start-up takes seconds: only where needed
  {python} {sse} 8001 .sse.jsonl --sse >>.servers.log 2>&1 &
  ports="8000 8001"
fi
for port in $ports; do
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || {{ echo "the server on $port did not start"; cat .servers.log; exit 1; }}
done
"""

# Starts one line of a `serves` block, waits (bounded) until it listens, then stops it.
SERVES = """serve() {{
  local line="$1" pid
  if [[ "$line" == "tollgate stdio "* ]]; then
    rm -f .in; mkfifo .in
    eval "exec $line" <.in >.out 2>.err &
    pid=$!
    exec 4>.in  # held open until it is stopped: its stdin stays open
    printf '%s\\n' {init} >&4
    ready() {{ grep -q '"result"' .out; }}
  else
    eval "exec $line" >.out 2>.err </dev/null &
    pid=$!
    ready() {{ grep -q '^Tollgate listening on' .err .out; }}
  fi
  for _ in $(seq 900); do
    ready && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! ready; then
    echo "not listening: $line (running: $(kill -0 "$pid" 2>/dev/null && echo yes || echo no))"; cat .out .err; exit 1
  fi
  kill "$pid"
  exec 4>&- 2>/dev/null || true  # `tollgate stdio` ends when its stdin does
  wait "$pid" 2>/dev/null || true
  echo "ok: $line"
}}
"""


@pytest.fixture
def sandbox(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True,
                                                          timeout=30).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare -n): the README's fixed ports would collide")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tollgate").symlink_to(Path(TOLLGATE).resolve())
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "policies", work / "policies")
    (work / "tollgate.yaml").write_text(config_example())
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "TOLLGATE_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.update({name: f"readme-{name.lower()}-0123456789abcdef" for name in ENV_NAMES})
    return work, env


def run_in_namespace(script: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    (work / ".script.sh").write_text(script)
    return subprocess.run(["unshare", "-n", "bash", str(work / ".script.sh")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


BLOCKS = blocks()


def test_the_readme_has_shell_blocks_and_every_skip_says_why():
    assert len(BLOCKS) >= 10
    for line, marker, reason, _ in BLOCKS:
        assert marker != "skip" or len(reason) > 10, f"README.md:{line}: a skipped block says why"
    assert sum(marker != "skip" for _, marker, _, _ in BLOCKS) >= 4, "most of the README's commands run here"


@pytest.mark.parametrize("line,marker,reason,text", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_a_readme_shell_block_runs_as_printed(line, marker, reason, text, sandbox):
    if marker == "skip":
        pytest.skip(f"README.md:{line}: {reason}")
    work, env = sandbox
    prelude = PRELUDE.format(python=shlex.quote(PYTHON), sse=shlex.quote(str(HERE / "upstream_server.py")))
    (work / ".block.sh").write_text(text)
    if marker == "serves":
        commands = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        script = prelude + SERVES.format(init=shlex.quote(INIT)) + "".join(f"serve {shlex.quote(c)}\n" for c in commands)
    else:
        script = prelude + "bash -euo pipefail .block.sh\n"
    run = run_in_namespace(script, work, env)
    assert run.returncode == 0, f"README.md:{line}:\n{text}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
