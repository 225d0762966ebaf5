"""A small stand-in for the AWS HealthLake API (JSON 1.0 protocol), on 127.0.0.1.

The real `awslabs.healthlake-mcp-server` is pointed at it with `AWS_ENDPOINT_URL`,
so its boto3 client really sends `StartFHIRExportJob` and friends here. Every
request is recorded (`X-Amz-Target` and the parsed body) for assertions.

The server's FHIR data-plane tools (read, search, create, update, delete) do not use
`AWS_ENDPOINT_URL`: they call `https://healthlake.<region>.amazonaws.com/datastore/<id>/r4/`
with httpx. With `HTTPS_PROXY` pointing here too, such a call arrives as a `CONNECT` to
that host, which is recorded (target `CONNECT <host:port>`) and refused, so a delete that got
through would show up here and still never leave the machine.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JOB_ID = "0123456789abcdef0123456789abcdef"


class FakeHealthLake:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                target = self.headers.get("x-amz-target", "")
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                outer.requests.append({"target": target, "body": body,
                                       "signed": "AWS4-HMAC-SHA256" in self.headers.get("authorization", "")})
                status, answer = outer.answer(target.removeprefix("HealthLake."), body or {})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/x-amz-json-1.0")
                self.send_header("x-amzn-requestid", "fake-request-id")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_CONNECT(self):
                outer.requests.append({"target": f"CONNECT {self.path}", "body": None, "signed": False})
                self.send_response(403, "the fake HealthLake tunnels nowhere")
                self.send_header("content-length", "0")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, operation: str, body: dict) -> tuple[int, dict]:
        if operation == "StartFHIRExportJob":
            return 200, {"JobId": JOB_ID, "JobStatus": "SUBMITTED", "DatastoreId": body.get("DatastoreId")}
        if operation == "DescribeFHIRExportJob":
            return 200, {"ExportJobProperties": {
                "JobId": body.get("JobId"), "JobStatus": "SUBMITTED", "SubmitTime": 1700000000,
                "DatastoreId": body.get("DatastoreId"),
                "OutputDataConfig": {"S3Configuration": {"S3Uri": "s3://approved-exports/", "KmsKeyId": "k"}},
                "DataAccessRoleArn": "arn:aws:iam::123456789012:role/export"}}
        if operation == "ListFHIRDatastores":
            return 200, {"DatastorePropertiesList": []}
        return 400, {"__type": "com.amazonaws.healthlake#ValidationException",
                     "message": f"the fake HealthLake does not implement {operation}"}

    def operations(self) -> list[str]:
        return [r["target"].removeprefix("HealthLake.") for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
