"""OpenTelemetry (SPEC §11, docs/observability.md): one trace from the agent to the tool.

The official Python SDK is the client (in this process) and the upstream server
(otel_upstream.py), each with the OpenTelemetry SDK; both, and Tollgate, export over
OTLP/HTTP to a receiver written here, which decodes what it gets with the official
`opentelemetry-proto` messages. The SDK 2.x puts its client span's `traceparent` in
`params._meta` (SEP-414) and opens its server span from the one it receives there.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx
import pytest
from mcp import Client
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from conftest import (
    DOWNSTREAMS,
    HERE,
    PYTHON,
    Proc,
    Upstream,
    downstream,
    free_port,
    serve_config,
    wait_port,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.anyio

SERVER, CLIENT, INTERNAL = 2, 3, 1  # Span.SpanKind
STATUS_ERROR = 2

TOKEN = "admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}

POLICY = """
version: 1
default: deny
rules:
  - tool: list_fhir_datastores
    action: allow
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    approval: {timeout: 60s}
  - tool: delete_*
    action: deny
    reason: Deleting data stores is never done by agents.
  - tool: describe_fhir_export_job
    action: allow
"""

EXPORT = {
    "datastore_id": "0123456789abcdef0123456789abcdef",
    "output_data_config": {"s3_configuration": {"s3_uri": "s3://approved-exports/a"}},
    "data_access_role_arn": "arn:aws:iam::123456789012:role/export",
}


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(items) -> dict:
    return {kv.key: value(kv.value) for kv in items}


class Receiver:
    """An OTLP/HTTP collector: POST /v1/traces and /v1/logs (protobuf), kept in memory."""

    def __init__(self):
        self.spans: list[dict] = []
        self.logs: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/traces":
                    outer._spans(ExportTraceServiceRequest.FromString(body))
                    answer = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/logs":
                    outer._logs(ExportLogsServiceRequest.FromString(body))
                    answer = ExportLogsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _spans(self, request):
        for resource_spans in request.resource_spans:
            service = attributes(resource_spans.resource.attributes).get("service.name")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append({
                        "service": service,
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "attributes": attributes(span.attributes),
                        "status": span.status.code,
                    })

    def _logs(self, request):
        for resource_logs in request.resource_logs:
            service = attributes(resource_logs.resource.attributes).get("service.name")
            for scope in resource_logs.scope_logs:
                for record in scope.log_records:
                    self.logs.append({
                        "service": service,
                        "body": value(record.body),
                        "event_name": record.event_name,
                        "trace_id": record.trace_id.hex(),
                        "span_id": record.span_id.hex(),
                        "attributes": attributes(record.attributes),
                    })

    def trace(self, trace_id: str) -> list[dict]:
        return [s for s in list(self.spans) if s["trace_id"] == trace_id]


RECEIVER: Receiver | None = None


def receiver() -> Receiver:
    """One receiver for this process, with this process's tracer provider exporting to
    it (a provider is set once per process)."""
    global RECEIVER
    if RECEIVER is None:
        RECEIVER = Receiver()
        provider = TracerProvider(resource=Resource.create({"service.name": "agent"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=RECEIVER.url + "/v1/traces")))
        trace.set_tracer_provider(provider)
    return RECEIVER


def start_upstream(procs, tmp_path, otlp: str) -> Upstream:
    port = free_port()
    record = tmp_path / f"upstream-{port}.jsonl"
    proc = Proc([PYTHON, str(HERE / "otel_upstream.py"), otlp, str(port), str(record)],
                tmp_path / f"upstream-{port}.log")
    procs.append(proc)
    wait_port(port)
    return Upstream(proc, port, record, "stateful")


def telemetry(endpoint: str) -> str:
    return (f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n"
            f"telemetry:\n  otlp: {{endpoint: '{endpoint}'}}\n  traces: {{sample_ratio: 1.0}}\n  audit_logs: true\n")


@pytest.fixture
def quick_export(monkeypatch):
    """Tollgate exports every 100 ms and gives up on an export after 500 ms."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "500")


def setup(procs, tmp_path, kind: str, endpoint: str | None = None):
    """An upstream with OpenTelemetry, Tollgate exporting to `endpoint` (the receiver by
    default), and an SDK client reaching it over `kind` (not entered); also the admin URL."""
    rx = receiver()
    upstream = start_upstream(procs, tmp_path, rx.url)
    config = write_config(tmp_path, {"hl": (upstream.url, POLICY)}, extra=telemetry(endpoint or rx.url))
    base = admin = None
    if not kind.startswith("stdio-"):
        base, proc = serve_config(procs, config)
        admin = proc.wait_line(r"Tollgate admin on (http://\S+)/").group(1)
    return upstream, admin, downstream(kind, procs, tmp_path, "hl", base=base, config=config)


def one(spans: list[dict], **want) -> dict:
    found = [s for s in spans if all(s.get(k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [(s["service"], s["kind"], s["name"], s["span_id"], s["parent"]) for s in spans])
    return found[0]


def settled(rx: Receiver, trace_id: str, *wanted: dict) -> list[dict]:
    """The spans of a trace, once each of `wanted` (attributes of a span) is among them."""
    def ready():
        spans = rx.trace(trace_id)
        found = all(any(all(s.get(k) == v for k, v in want.items()) for s in spans) for want in wanted)
        return spans if found else None
    return wait_until(ready, 20, f"spans {wanted} of trace {trace_id}")


@pytest.mark.parametrize("kind", DOWNSTREAMS)
async def test_one_trace_from_the_agent_through_tollgate_to_the_tool(kind, quick_export, procs, tmp_path):
    rx = receiver()
    upstream, _, client = setup(procs, tmp_path, kind)
    tracer = trace.get_tracer("test")
    async with client:
        with tracer.start_as_current_span("agent turn") as root:
            result = await client.call_tool("list_fhir_datastores", {})
            trace_id = format(root.get_span_context().trace_id, "032x")
    assert result.is_error is False
    assert upstream.tools_called() == ["list_fhir_datastores"]

    name = "tools/call list_fhir_datastores"
    # agent turn, the SDK's client span, Tollgate's server, decision and client spans,
    # the upstream's server span.
    spans = settled(rx, trace_id, dict(service="agent", kind=CLIENT, name=f"MCP send {name}"),
                    dict(service="tollgate", kind=SERVER, name=name), dict(service="tollgate", kind=CLIENT, name=name),
                    dict(service="upstream", kind=SERVER, name=name))
    # (The SDK lists the tools before its first call, in the same trace.)
    sdk_client = one(spans, service="agent", kind=CLIENT, name=f"MCP send {name}")
    server = one(spans, service="tollgate", kind=SERVER, name=name)
    decision = one(spans, service="tollgate", name="tollgate.decision")
    forwarded = one(spans, service="tollgate", kind=CLIENT, name=name)
    tool = one(spans, service="upstream", kind=SERVER, name=name)
    assert server["parent"] == sdk_client["span_id"], "Tollgate continues the client's trace from params._meta"
    assert decision["parent"] == forwarded["parent"] == server["span_id"]
    assert tool["parent"] == forwarded["span_id"], "the upstream's span is Tollgate's child"

    a = server["attributes"]
    assert a["mcp.method.name"] == "tools/call"
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == "list_fhir_datastores"
    assert a["jsonrpc.request.id"] == sdk_client["attributes"]["jsonrpc.request.id"]
    assert a["network.transport"] == ("pipe" if kind.startswith("stdio-") else "tcp")
    assert a["tollgate.server"] == "hl"
    assert a["tollgate.decision"] == "allow" and a["tollgate.rule"] == "rules[0] (list_fhir_datastores)"
    assert a["tollgate.outcome"] == "ok" and "error.type" not in a
    if kind.endswith("legacy") or kind == "sse":
        assert a["mcp.session.id"] and a["mcp.protocol.version"]
    else:
        assert a["mcp.protocol.version"] == "2026-07-28"
    assert decision["attributes"]["tollgate.decision"] == "allow"
    assert forwarded["attributes"]["gen_ai.tool.name"] == "list_fhir_datastores"

    # The audit records, as OTLP log records in the call's trace.
    logs = wait_until(lambda: [l for l in rx.logs if l["trace_id"] == trace_id] if len(
        [l for l in rx.logs if l["trace_id"] == trace_id]) >= 2 else None, 20, "the call's audit records as logs")
    decided = one(logs, body="decision")
    outcome = one(logs, body="outcome")
    assert decided["event_name"] == "tollgate.audit"
    assert decided["span_id"] == server["span_id"]
    assert decided["attributes"]["tool"] == "list_fhir_datastores"
    assert decided["attributes"]["decision"] == "allow"
    assert decided["attributes"]["server"] == "hl"
    assert decided["attributes"]["arguments_digest"].startswith("sha256:")
    assert outcome["attributes"]["call_id"] == decided["attributes"]["call_id"]
    assert outcome["attributes"]["outcome"] == "ok"


@pytest.mark.parametrize("kind", ["http-auto", "http-legacy", "stdio-auto"])
async def test_a_denied_call_is_traced_with_its_decision_and_never_reaches_the_upstream(
        kind, quick_export, procs, tmp_path):
    rx = receiver()
    upstream, _, client = setup(procs, tmp_path, kind)
    async with client:
        with trace.get_tracer("test").start_as_current_span("agent turn") as root:
            result = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
            trace_id = format(root.get_span_context().trace_id, "032x")
    assert result.is_error is True
    spans = settled(rx, trace_id, dict(service="tollgate", kind=SERVER, name="tools/call delete_fhir_datastore"),
                    dict(name="tollgate.decision"))
    server = one(spans, service="tollgate", kind=SERVER, name="tools/call delete_fhir_datastore")
    decision = one(spans, service="tollgate", name="tollgate.decision")
    assert decision["parent"] == server["span_id"]
    assert server["attributes"]["tollgate.decision"] == "deny"
    assert server["attributes"]["tollgate.rule"] == "rules[2] (delete_*)"
    assert server["attributes"]["error.type"] == "deny"
    assert server["status"] == STATUS_ERROR
    assert decision["attributes"]["tollgate.kind"] == "deny"
    time.sleep(0.5)  # anything else of this trace would have been exported by now
    spans = rx.trace(trace_id)
    assert not [s for s in spans if s["service"] == "tollgate" and s["kind"] == CLIENT and "delete" in s["name"]]
    assert not [s for s in spans if s["service"] == "upstream" and "delete" in s["name"]]
    assert upstream.calls() == []
    logs = [l for l in rx.logs if l["trace_id"] == trace_id]
    assert [l["attributes"]["decision"] for l in logs if l["body"] == "decision"] == ["deny"]


async def test_a_tool_error_is_the_error_type_of_the_calls_spans(quick_export, procs, tmp_path):
    # The outcome the response chain reads from the answer (`isError: true`) ends the spans.
    rx = receiver()
    upstream, _, client = setup(procs, tmp_path, "http-auto")
    name = "tools/call describe_fhir_export_job"
    async with client:
        with trace.get_tracer("test").start_as_current_span("agent turn") as root:
            result = await client.call_tool("describe_fhir_export_job", {})  # arguments missing
            trace_id = format(root.get_span_context().trace_id, "032x")
    assert result.is_error is True
    spans = settled(rx, trace_id, dict(service="tollgate", kind=SERVER, name=name),
                    dict(service="tollgate", kind=CLIENT, name=name))
    for span in (one(spans, service="tollgate", kind=SERVER, name=name),
                 one(spans, service="tollgate", kind=CLIENT, name=name)):
        assert span["attributes"]["tollgate.outcome"] == "tool_error"
        assert span["attributes"]["error.type"] == "tool_error"
        assert span["status"] == STATUS_ERROR


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_a_held_calls_approval_wait_is_a_span_of_its_trace(era, quick_export, procs, tmp_path):
    rx = receiver()
    upstream, admin, client = setup(procs, tmp_path, f"http-{era}")
    approval_id = None
    async with client:
        with trace.get_tracer("test").start_as_current_span("agent turn") as root:
            trace_id = format(root.get_span_context().trace_id, "032x")
            result = None
            async with anyio.create_task_group() as tasks:
                async def call():
                    nonlocal result
                    result = await client.call_tool("start_fhir_export_job", EXPORT)
                tasks.start_soon(call)
                with anyio.fail_after(20):
                    while not (pending := httpx.get(admin + "/approvals", headers=AUTH, timeout=10).json()):
                        await anyio.sleep(0.05)
                approval_id = pending[0]["id"]
                r = httpx.post(f"{admin}/approvals/{approval_id}/approve", headers=AUTH, json={}, timeout=10)
                assert r.status_code == 200
    assert result is not None and result.is_error is False
    assert upstream.tools_called() == ["start_fhir_export_job"]
    name = "tools/call start_fhir_export_job"
    spans = settled(rx, trace_id, dict(service="tollgate", kind=SERVER, name=name),
                    dict(service="upstream", kind=SERVER, name=name), dict(name="tollgate.approval_wait"))
    server = one(spans, service="tollgate", kind=SERVER, name=name)
    wait = one(spans, service="tollgate", name="tollgate.approval_wait")
    forwarded = one(spans, service="tollgate", kind=CLIENT, name=name)
    tool = one(spans, service="upstream", kind=SERVER, name=name)
    assert wait["parent"] == server["span_id"] and wait["attributes"]["tollgate.approval.id"] == approval_id
    assert server["attributes"]["tollgate.decision"] == "require_approval"
    assert forwarded["parent"] == server["span_id"], "the approved call goes out in its own trace"
    assert tool["parent"] == forwarded["span_id"]
    # (The approver's verdict is recorded in the approver's request, not in this trace.)
    wait_until(lambda: {l["body"] for l in rx.logs if l["trace_id"] == trace_id} >= {
        "decision", "approval_requested", "outcome"}, 20, "the held call's audit records")
    requested = one([l for l in rx.logs if l["trace_id"] == trace_id], body="approval_requested")
    assert requested["span_id"] == wait["span_id"]
    assert requested["attributes"]["approval_id"] == approval_id


def metric(admin: str, name: str) -> float:
    text = httpx.get(admin + "/metrics", headers=AUTH, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


class Hanging:
    """A collector that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("collector", ["closed", "hanging"])
async def test_a_collector_that_is_down_never_touches_a_call_and_drops_are_counted(
        collector, quick_export, procs, tmp_path):
    hanging = Hanging() if collector == "hanging" else None
    endpoint = hanging.url if hanging else f"http://127.0.0.1:{free_port()}"
    try:
        upstream, admin, client = setup(procs, tmp_path, "http-legacy", endpoint=endpoint)
        assert metric(admin, "tollgate_telemetry_dropped_total") == 0
        async with client:
            for _ in range(5):
                with anyio.fail_after(10):
                    result = await client.call_tool("list_fhir_datastores", {})
                assert result.is_error is False
            denied = await client.call_tool("delete_fhir_datastore", {"datastore_id": "x"})
            assert denied.is_error is True
        assert upstream.tools_called() == ["list_fhir_datastores"] * 5
        wait_until(lambda: metric(admin, "tollgate_telemetry_dropped_total") >= 5, 20,
                   "the spans that could not be exported counted as dropped")
    finally:
        if hanging:
            hanging.close()


async def test_without_telemetry_the_upstream_sees_the_clients_own_context(procs, tmp_path):
    """Nothing is exported and nothing rewritten: the message goes on as the client sent
    it, so the upstream's span is the client's child."""
    rx = receiver()
    upstream = start_upstream(procs, tmp_path, rx.url)
    config = write_config(tmp_path, {"hl": (upstream.url, POLICY)})
    base, _ = serve_config(procs, config)
    async with Client(f"{base}/servers/hl/mcp", mode="legacy") as client:
        with trace.get_tracer("test").start_as_current_span("agent turn") as root:
            await client.call_tool("list_fhir_datastores", {})
            trace_id = format(root.get_span_context().trace_id, "032x")
    spans = settled(rx, trace_id, dict(service="upstream", kind=SERVER, name="tools/call list_fhir_datastores"))
    sdk_client = one(spans, service="agent", kind=CLIENT, name="MCP send tools/call list_fhir_datastores")
    tool = one(spans, service="upstream", kind=SERVER, name="tools/call list_fhir_datastores")
    assert tool["parent"] == sdk_client["span_id"]
    assert not [s for s in spans if s["service"] == "tollgate"]


class TracedBatchUpstream:
    """A batch-answering upstream that keeps every tool call it gets (with its
    `params._meta`)."""

    def __init__(self):
        from conftest import BatchUpstream

        self.calls: list[dict] = []

        def result(method, params):
            if method != "tools/call":
                return {}
            self.calls.append(params)
            return {"content": [{"type": "text", "text": "done"}], "isError": False}

        self.upstream = BatchUpstream(result, "telemetry-batch-session-0123456789")
        self.url = self.upstream.url

    def close(self):
        self.upstream.close()


def test_each_call_of_a_batch_is_traced_like_a_message_of_its_own(quick_export, procs, tmp_path):
    """Issue 27: a JSON-RPC batch (2025-03-26, raw: the SDK sends none) of three calls is
    three server spans continuing each member's `params._meta` trace context, each with
    its decision span; each forwarded member has its own client span, whose context it
    carries upstream in its `params._meta`; the denied one has none."""
    import os

    from conftest import RawSession

    rx = receiver()
    upstream = TracedBatchUpstream()
    try:
        config = write_config(tmp_path, {"hl": (upstream.url, POLICY)}, extra=telemetry(rx.url))
        base, _ = serve_config(procs, config)
        session = RawSession(f"{base}/servers/hl/mcp", protocol="2025-03-26")
        session.initialize()
        trace_id, caller = os.urandom(16).hex(), os.urandom(8).hex()
        meta = {"traceparent": f"00-{trace_id}-{caller}-01"}
        calls = [("list_fhir_datastores", {}), ("delete_fhir_datastore", {"datastore_id": "x"}),
                 ("describe_fhir_export_job", {"job_id": "j"})]
        batch = [{"jsonrpc": "2.0", "id": n, "method": "tools/call",
                  "params": {"name": tool, "arguments": args, "_meta": meta}}
                 for n, (tool, args) in enumerate(calls, start=1)]
        r = session.http.post(session.url, json=batch, headers=session._headers())
        answers = {a["id"]: a for a in r.json()}
        session.close()
    finally:
        upstream.close()
    assert answers[1]["result"]["isError"] is False and answers[3]["result"]["isError"] is False, answers
    assert answers[2]["result"]["isError"] is True, answers
    assert [c["name"] for c in upstream.calls] == ["list_fhir_datastores", "describe_fhir_export_job"]

    names = [f"tools/call {tool}" for tool, _ in calls]
    spans = settled(rx, trace_id, *[dict(service="tollgate", kind=SERVER, name=n) for n in names],
                    *[dict(service="tollgate", kind=CLIENT, name=names[i]) for i in (0, 2)])
    decisions = [s for s in spans if s["name"] == "tollgate.decision"]
    assert len(decisions) == 3, decisions
    for n, name in enumerate(names, start=1):
        server = one(spans, service="tollgate", kind=SERVER, name=name)
        assert server["parent"] == caller, "each member continues its own params._meta trace context"
        a = server["attributes"]
        assert a["mcp.method.name"] == "tools/call" and a["jsonrpc.request.id"] == str(n), a
        assert a["mcp.session.id"] == session.session_id and a["tollgate.server"] == "hl", a
        decision = one(decisions, parent=server["span_id"])
        assert decision["attributes"]["tollgate.decision"] == a["tollgate.decision"]
    denied = one(spans, service="tollgate", kind=SERVER, name=names[1])
    assert denied["attributes"]["tollgate.decision"] == "deny"
    assert denied["attributes"]["error.type"] == "deny" and denied["status"] == STATUS_ERROR
    assert not [s for s in spans if s["kind"] == CLIENT and s["name"] == names[1]]
    for i, sent in zip((0, 2), upstream.calls):
        server = one(spans, service="tollgate", kind=SERVER, name=names[i])
        forwarded = one(spans, service="tollgate", kind=CLIENT, name=names[i])
        assert forwarded["parent"] == server["span_id"]
        assert server["attributes"]["tollgate.decision"] == "allow"
        assert server["attributes"]["tollgate.outcome"] == "ok" and "error.type" not in server["attributes"]
        # The member went upstream carrying its own client span, not the caller's.
        assert sent["_meta"]["traceparent"] == f"00-{trace_id}-{forwarded['span_id']}-01", sent
