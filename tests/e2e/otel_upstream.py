"""upstream_server.py with the OpenTelemetry SDK exporting its spans (the official
SDK's server span per message) over OTLP/HTTP, as service `upstream`.

    python otel_upstream.py OTLP_BASE_URL PORT RECORD_FILE [upstream_server.py flags]
"""

import runpy
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "upstream"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1] + "/v1/traces")))
trace.set_tracer_provider(provider)

server = str(Path(__file__).resolve().parent / "upstream_server.py")
sys.argv = [server, *sys.argv[2:]]
runpy.run_path(server, run_name="__main__")
