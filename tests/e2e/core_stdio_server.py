"""A stdio MCP server (official Python SDK, mcp 2.x) for test_core.py: one tool, `work`,
that can wait for another call to start, log, report progress and sleep.

    python core_stdio_server.py RECORD_FILE

It speaks both eras (it answers `server/discover`), so Tollgate shares one process of it
between stateless-era clients. Each call appends {"event": "start"|"done", "label": ...}
to RECORD_FILE as one JSON line ("done" only when the call ran to its end, i.e. it was
not cancelled), so a test can see which calls are running right now.
"""

import json
import os
import sys
import time
import warnings

import anyio

from mcp.server.mcpserver import Context, MCPServer

RECORD = sys.argv[1]

# ctx.info is deprecated in 2026-07-28 (per-request opt-in); it is what this server tests.
warnings.filterwarnings("ignore", message=".*deprecated as of 2026-07-28.*")

mcp = MCPServer("core-stdio")


def record(event: str, label: str) -> None:
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "label": label, "pid": os.getpid()}) + "\n")


def started(label: str) -> bool:
    try:
        with open(RECORD, encoding="utf-8") as f:
            return any(json.loads(line) == {"event": "start", "label": label, "pid": os.getpid()}
                       for line in f if line.strip())
    except OSError:
        return False


@mcp.tool()
async def work(label: str, ctx: Context, log_first: str = "", wait_for: str = "", log: str = "",
               steps: int = 0, step_seconds: float = 0.2, seconds: float = 0.0) -> str:
    """Send `log_first` as an info log message (then pause 0.2 s, for it to be delivered);
    record the start; wait (at most 10 s) until the call labelled `wait_for` has started;
    send `log` as an info log message; report progress `steps` times, `step_seconds` apart,
    each with the message "<label> <n>"; sleep `seconds`; record the end."""
    if log_first:
        await ctx.info(log_first)
        await anyio.sleep(0.2)
    record("start", label)
    if wait_for:
        deadline = time.monotonic() + 10
        while not started(wait_for) and time.monotonic() < deadline:
            await anyio.sleep(0.02)
    if log:
        await ctx.info(log)
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"{label} {i + 1}")
        await anyio.sleep(step_seconds)
    await anyio.sleep(seconds)
    record("done", label)
    return f"{label} done"


if __name__ == "__main__":
    print(f"core_stdio_server ready pid={os.getpid()}", file=sys.stderr, flush=True)
    mcp.run("stdio")
