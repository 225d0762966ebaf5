"""A HealthLake-like MCP server written with the official Python SDK (mcp 2.x).

Every tool call is appended to a record file as one JSON line, so tests can prove
that calls Tollgate denied never arrived here.

    python upstream_server.py PORT RECORD_FILE [--stateless | --resumable | --sse | --stdio]

With --stdio it also has `pid` (which process answers; annotated read-only), `crash`
(the process dies mid-call; annotated destructive) and `block` (a synchronous sleep);
it says on stderr that it started, so tests can find it in Tollgate's log, and writes
how it ended (stdin closed, or SIGTERM) to RECORD_FILE.exit.
"""

import json
import os
import sys

import anyio
from pydantic import BaseModel

from typing import Annotated

from mcp.server.mcpserver import Context, Elicit, ElicitationResult, MCPServer, Resolve

PORT = int(sys.argv[1])
RECORD = sys.argv[2]
STATELESS = "--stateless" in sys.argv

mcp = MCPServer("python-healthlake")


def record(tool: str, arguments: dict) -> None:
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@mcp.tool()
def list_fhir_datastores() -> str:
    """List the FHIR data stores."""
    record("list_fhir_datastores", {})
    return json.dumps({"datastores": [{"DatastoreId": "0123456789abcdef0123456789abcdef", "Name": "patients"}]})


@mcp.tool()
def describe_fhir_export_job(datastore_id: str, job_id: str) -> str:
    """Describe an export job."""
    record("describe_fhir_export_job", {"datastore_id": datastore_id, "job_id": job_id})
    return json.dumps({"JobId": job_id, "JobStatus": "COMPLETED", "DatastoreId": datastore_id})


@mcp.tool()
def start_fhir_export_job(
    datastore_id: str, output_data_config: dict, data_access_role_arn: str, job_name: str | None = None
) -> str:
    """Start exporting a data store to S3."""
    record("start_fhir_export_job", {"datastore_id": datastore_id, "output_data_config": output_data_config})
    return json.dumps({"JobId": "job-1", "JobStatus": "SUBMITTED", "DatastoreId": datastore_id})


@mcp.tool()
def delete_fhir_datastore(datastore_id: str) -> str:
    """Delete a data store."""
    record("delete_fhir_datastore", {"datastore_id": datastore_id})
    return "deleted"


@mcp.tool()
def echo(text: str) -> str:
    """Echo the text back, with some unicode to check bytes survive."""
    record("echo", {"text": text})
    return f"echo: {text} ✓ — ünïcödé"


@mcp.tool()
async def slow_progress(steps: int, ctx: Context) -> str:
    """Report progress `steps` times, 300 ms apart, then return."""
    record("slow_progress", {"steps": steps})
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
        await anyio.sleep(0.3)
    with open(RECORD + ".done", "a", encoding="utf-8") as f:  # reached only if not cancelled
        f.write(json.dumps({"tool": "slow_progress", "steps": steps}) + "\n")
    return f"done after {steps} steps"


@mcp.tool()
async def chatty(text: str, ctx: Context) -> str:
    """Send two log notifications, then return."""
    record("chatty", {"text": text})
    await ctx.info(f"first: {text}")
    await ctx.warning(f"second: {text}")
    return "logged twice"


@mcp.tool()
async def announce(ctx: Context) -> str:
    """Tell the client the tool list changed: a notification tied to no request, which
    a handshake-era server sends on the client's standalone GET stream."""
    record("announce", {})
    await ctx.session.send_tool_list_changed()
    return "announced"


class Answer(BaseModel):
    answer: str


def ask(question: str) -> Elicit[Answer]:
    return Elicit(question, Answer)


@mcp.tool()
async def ask_user(
    question: str, answer: Annotated[ElicitationResult[Answer], Resolve(ask)]
) -> str:
    """Ask the client's user a question (elicitation) and return the answer.

    A resolver, so the SDK asks mid-call in the handshake era and with an
    InputRequiredResult (MRTR) in the stateless era.
    """
    record("ask_user", {"question": question})
    if answer.action == "accept":
        return f"user said: {answer.data.answer}"
    return f"user {answer.action}"


class MemoryEventStore:
    """Keeps every SSE event so a client can resume a stream with Last-Event-ID."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        from mcp.server.streamable_http import EventMessage

        found = [i for i, (eid, _, _) in enumerate(self.events) if eid == last_event_id]
        if not found:
            return None
        stream_id = self.events[found[0]][1]
        for eid, sid, message in self.events[found[0] + 1:]:
            if sid == stream_id and message is not None:
                await send_callback(EventMessage(message, eid))
        return stream_id


if "--stdio" in sys.argv:
    # Only in stdio mode, so the HTTP servers other tests list keep their exact tool set.

    from mcp.types import ToolAnnotations

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def pid() -> str:
        """The id of the process answering."""
        record("pid", {})
        return str(os.getpid())

    @mcp.tool(annotations=ToolAnnotations(destructiveHint=True))
    def crash() -> str:
        """Die in the middle of the call, without answering."""
        record("crash", {})
        os._exit(1)

    @mcp.tool()
    def block(seconds: float) -> str:
        """Sleep without yielding (a synchronous tool), so nothing else of the process runs."""
        import time

        record("block", {"seconds": seconds})
        time.sleep(seconds)
        return "unblocked"


if __name__ == "__main__":
    if "--stdio" in sys.argv:  # spawned by Tollgate as a stdio upstream; PORT is ignored
        import signal

        def exited(how: str) -> None:
            # How the process ended, in RECORD.exit: "eof" when it left by itself after its
            # stdin closed (the MCP shutdown sequence), "sigterm" when it had to be signalled.
            with open(RECORD + ".exit", "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "exit": how}) + "\n")

        def on_sigterm(signum, frame):
            exited("sigterm")
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
        print(f"upstream_server stdio ready pid={os.getpid()}", file=sys.stderr, flush=True)
        mcp.run("stdio")
        exited("eof")
    elif "--sse" in sys.argv:  # the legacy HTTP+SSE transport (2024-11-05), at /sse
        mcp.run("sse", host="127.0.0.1", port=PORT)
    else:
        mcp.run(
            "streamable-http",
            host="127.0.0.1",
            port=PORT,
            stateless_http=STATELESS,
            json_response=STATELESS,
            event_store=MemoryEventStore() if "--resumable" in sys.argv else None,
        )
