"""An MCP server (official Python SDK) that records the HTTP headers of every request
it receives, so a test can prove what Tollgate forwarded (never the client's token).

    python identity_upstream.py PORT RECORD_FILE

RECORD_FILE gets one JSON line per tool call ({"tool", "arguments"}), and
RECORD_FILE.headers one per HTTP request (its header names and values, lowercased names).
"""

import json
import sys

import uvicorn

from mcp.server.mcpserver import MCPServer

PORT = int(sys.argv[1])
RECORD = sys.argv[2]

mcp = MCPServer("identity-upstream")


def record(tool: str, arguments: dict) -> None:
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@mcp.tool()
def query_metrics(query: str) -> str:
    """Query the metrics store."""
    record("query_metrics", {"query": query})
    return f"42 rows for {query}"


@mcp.tool()
def start_export(dataset: str) -> str:
    """Start exporting a data set."""
    record("start_export", {"dataset": dataset})
    return f"export of {dataset} started"


@mcp.tool()
def whoami() -> str:
    """A cheap call, to count."""
    record("whoami", {})
    return "someone"


def recording(app):
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            headers = [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in scope["headers"]]
            with open(RECORD + ".headers", "a", encoding="utf-8") as f:
                f.write(json.dumps({"method": scope["method"], "path": scope["path"], "headers": headers}) + "\n")
        await app(scope, receive, send)

    return wrapped


if __name__ == "__main__":
    app = mcp.streamable_http_app()
    uvicorn.run(recording(app), host="127.0.0.1", port=PORT, log_level="warning")
