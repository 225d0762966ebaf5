//! OpenTelemetry (`telemetry:`, docs/observability.md): a server span per MCP message,
//! its children (the policy decision, an approval wait, the upstream exchange), trace
//! context carried in `params._meta`, and audit records as OTLP log records.
//!
//! Installed once per process ([`install`]); without it every entry point here is one
//! load of an empty cell, so a call costs what it does without telemetry. Spans and
//! log records go out over OTLP/HTTP (protobuf, `opentelemetry-otlp`) from a bounded
//! queue drained by one task: a full queue, or an export that fails or takes longer
//! than its timeout, drops what it held and counts it
//! (`tollgate_telemetry_dropped_total`); nothing on a call's path ever waits for the
//! collector. (The SDK's batch processors count their drops only in a log line, so
//! the queue is this module's own; everything else is the SDK's.)
//!
//! The current span travels with a call as OpenTelemetry's current context
//! ([`traced`], [`in_current`]); a call's permit keeps its spans
//! ([`CallTrace`]) until its outcome is known, so a streamed answer ends its spans when
//! it ends, and its audit records are written inside its trace.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, Severity};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use parking_lot::Mutex;
use serde_json::Value;

mod batch;
mod export;
mod spans;

pub use batch::Batch;
pub use export::{install, shutdown};
pub use spans::{
    Arrival, CallTrace, Decided, TraceHeaders, Upstream, approval_wait, call, clock, decision,
    headers_of, in_current, protocol_version, server, traced, upstream,
};

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

struct Telemetry {
    tracer: SdkTracer,
    /// Kept so that the tracer's processor lives as long as the process.
    _traces: SdkTracerProvider,
    /// With `audit_logs: true`.
    logs: Option<(SdkLogger, SdkLoggerProvider)>,
    propagator: TraceContextPropagator,
    stop: tokio::sync::watch::Sender<bool>,
    drains: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter refused its settings.
    #[error("telemetry.otlp: {0}; check telemetry.otlp.endpoint and OTEL_EXPORTER_OTLP_*")]
    Exporter(String),
    /// Set up outside a runtime.
    #[error("telemetry: must be set up inside the Tokio runtime that serves")]
    NoRuntime,
}

/// Whether telemetry is on (an atomic load).
#[inline]
pub fn enabled() -> bool {
    TELEMETRY.get().is_some()
}

// ---- audit records as log records ---------------------------------------------------

/// Hands an audit record to telemetry: its approval id (if any) on the current span,
/// and the record as an OTLP log record with `audit_logs: true`.
#[inline]
pub fn audit(record: &impl serde::Serialize, approval_id: Option<&str>) {
    if let Some(telemetry) = TELEMETRY.get() {
        telemetry.audit(record, approval_id);
    }
}

/// Whether audit records are exported as log records.
#[inline]
pub fn exports_audit() -> bool {
    TELEMETRY.get().is_some_and(|t| t.logs.is_some())
}

impl Telemetry {
    fn audit(&self, record: &impl serde::Serialize, approval_id: Option<&str>) {
        if let Some(id) = approval_id {
            Context::map_current(|cx| {
                cx.span()
                    .set_attribute(KeyValue::new("tollgate.approval.id", id.to_owned()));
            });
        }
        let Some((logger, _)) = &self.logs else {
            return;
        };
        let Ok(Value::Object(fields)) = serde_json::to_value(record) else {
            return;
        };
        let mut log = logger.create_log_record();
        let now = SystemTime::now();
        log.set_timestamp(now);
        log.set_observed_timestamp(now);
        log.set_severity_number(Severity::Info);
        log.set_severity_text("INFO");
        log.set_event_name("tollgate.audit");
        if let Some(Value::String(event)) = fields.get("event") {
            log.set_body(AnyValue::from(event.clone()));
        }
        for (key, value) in fields {
            let value = match value {
                Value::Null => continue,
                Value::Bool(b) => AnyValue::from(b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => AnyValue::from(i),
                    None => AnyValue::from(n.as_f64().unwrap_or(0.0)),
                },
                Value::String(s) => AnyValue::from(s),
                // Arguments and the like: their JSON text.
                other => AnyValue::from(other.to_string()),
            };
            log.add_attribute(key, value);
        }
        logger.emit(log);
    }
}
