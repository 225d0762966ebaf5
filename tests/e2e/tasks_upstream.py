"""An MCP server that supports tasks (2025-11-25 `tasks`) and binds them to nobody:
every caller that names a task id reaches it, `tasks/list` lists every task, and each
`tasks/get` answer streams a `notifications/tasks/status` for every task it knows
first. Behind Tollgate every caller looks the same to it, so only Tollgate can keep
alice's task from bob. (The Python SDK has no task support, so this is raw JSON-RPC.)

    python tasks_upstream.py PORT RECORD_FILE        Streamable HTTP on 127.0.0.1:PORT/mcp
    python tasks_upstream.py 0 RECORD_FILE --stdio   stdio

RECORD_FILE gets one JSON line per request received (method, params).
"""

import json
import sys
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
RECORD = sys.argv[2]
LOCK = threading.Lock()
TASKS: dict[str, dict] = {}
RESULTS: dict[str, dict] = {}

TOOLS = [
    {"name": "payroll_report", "inputSchema": {"type": "object", "properties": {"ssn": {"type": "string"}}},
     "execution": {"taskSupport": "optional"}},
    {"name": "weather", "inputSchema": {"type": "object"}, "execution": {"taskSupport": "optional"}},
]
CAPABILITIES = {"tools": {}, "tasks": {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}}


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def record(msg: dict) -> None:
    with LOCK, open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps({"method": msg.get("method"), "params": msg.get("params")}) + "\n")


def ok(id_, result) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "result": result}


def unknown(id_) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": -32602, "message": "Failed to retrieve task: Task not found"}}


def handle(msg: dict) -> list[dict]:
    """The messages to send back for `msg`: notifications first, the answer last."""
    record(msg)
    if "id" not in msg:
        return []
    id_, method, params = msg["id"], msg.get("method"), msg.get("params") or {}
    if method == "initialize":
        return [ok(id_, {"protocolVersion": params.get("protocolVersion", "2025-11-25"),
                         "capabilities": CAPABILITIES, "serverInfo": {"name": "tasks", "version": "1"}})]
    if method == "server/discover":
        return [ok(id_, {"supportedVersions": ["2026-07-28"], "capabilities": CAPABILITIES,
                         "serverInfo": {"name": "tasks", "version": "1"}, "resultType": "complete"})]
    if method == "tools/list":
        return [ok(id_, {"tools": TOOLS})]
    if method == "tools/call":
        text = f"{params.get('name')}: {json.dumps(params.get('arguments') or {}, sort_keys=True)}"
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        if "task" not in params:
            return [ok(id_, result)]
        task_id = str(uuid.uuid4())
        ttl = (params.get("task") or {}).get("ttl", 60000)
        task = {"taskId": task_id, "status": "completed", "createdAt": now(), "lastUpdatedAt": now(),
                "ttl": ttl, "pollInterval": 100}
        with LOCK:
            TASKS[task_id] = task
            RESULTS[task_id] = result
        return [ok(id_, {"task": {**task, "status": "working"}})]
    if method == "tasks/list":
        with LOCK:
            return [ok(id_, {"tasks": list(TASKS.values())})]
    if method in ("tasks/get", "tasks/result", "tasks/cancel", "tasks/update"):
        task_id = params.get("taskId")
        with LOCK:
            task = TASKS.get(task_id)
            if task is None:
                return [unknown(id_)]
            if method == "tasks/cancel":
                task["status"] = "cancelled"
                return [ok(id_, dict(task))]
            if method == "tasks/result":
                meta = {"io.modelcontextprotocol/related-task": {"taskId": task_id}}
                return [ok(id_, {**RESULTS[task_id], "_meta": meta})]
            if method == "tasks/update":
                return [ok(id_, dict(task))]
            # A leaky server: every task's status, whoever asks.
            notes = [{"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": dict(t)}
                     for t in TASKS.values()]
            return notes + [ok(id_, dict(task))]
    if method == "ping":
        return [ok(id_, {})]
    return [{"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": f"no method {method}"}}]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        msg = json.loads(raw)
        out = handle(msg)
        if not out:
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if msg.get("method") == "initialize":
            self.send_header("mcp-session-id", uuid.uuid4().hex)
        if len(out) == 1:
            body = json.dumps(out[0]).encode()
            self.send_header("content-type", "application/json")
        else:
            body = b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m in out)
            self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_response(405)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_DELETE(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


def stdio() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        for out in handle(json.loads(line)):
            sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if "--stdio" in sys.argv:
        stdio()
    else:
        server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
        server.daemon_threads = True
        server.serve_forever()
