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

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::InstrumentationScope;
use opentelemetry::context::FutureExt as _;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{
    LogBatch, LogExporter as _, LogProcessor, SdkLogRecord, SdkLogger, SdkLoggerProvider,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value};
use tollgate_mcp::Message;

use crate::config::TelemetryConfig;

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// Longest string taken from a request into a span attribute or name.
const MAX_ATTRIBUTE_BYTES: usize = 256;

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

/// The queue's bounds and timings: the OpenTelemetry SDK's `OTEL_BSP_*` and
/// `OTEL_EXPORTER_OTLP_TIMEOUT` variables, with their standard defaults.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_queue: usize,
    max_batch: usize,
    delay: Duration,
    timeout: Duration,
}

impl Bounds {
    fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Bounds {
        let number = |name: &str, default: u64| {
            env(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048) as usize;
        Bounds {
            max_queue,
            max_batch: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512) as usize).min(max_queue),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            timeout: Duration::from_millis(number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)),
        }
    }
}

/// The resource every export names: `telemetry.service_name` (else
/// `OTEL_SERVICE_NAME`, else `tollgate`) and this version.
fn resource(config: &TelemetryConfig, env: &dyn Fn(&str) -> Option<String>) -> Resource {
    let service_name = config
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "tollgate".to_owned());
    Resource::builder()
        .with_service_name(service_name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `telemetry.otlp.endpoint` with `path` (`/v1/traces`, `/v1/logs`), when set
/// (else the exporter reads the `OTEL_EXPORTER_OTLP_*` variables).
fn endpoint(config: &TelemetryConfig, path: &str) -> Option<String> {
    config
        .otlp
        .endpoint
        .as_deref()
        .map(|base| format!("{}{path}", base.trim_end_matches('/')))
}

/// The OTLP/HTTP exporter of the spans.
fn span_exporter(
    config: &TelemetryConfig,
    client: Transport,
    headers: HashMap<String, String>,
    bounds: Bounds,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let mut spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(bounds.timeout)
        .with_headers(headers);
    if let Some(url) = endpoint(config, "/v1/traces") {
        spans = spans.with_endpoint(url);
    }
    spans
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))
}

/// The OTLP/HTTP exporter of the audit records (`telemetry.audit_logs`).
fn log_exporter(
    config: &TelemetryConfig,
    client: Transport,
    headers: HashMap<String, String>,
    bounds: Bounds,
) -> Result<opentelemetry_otlp::LogExporter, TelemetryError> {
    let mut logs = opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(bounds.timeout)
        .with_headers(headers);
    if let Some(url) = endpoint(config, "/v1/logs") {
        logs = logs.with_endpoint(url);
    }
    logs.build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))
}

/// Sets telemetry up from `telemetry:` (and the `OTEL_*` variables `env` reads), once
/// per process; `dropped` counts what is dropped. Must run inside the Tokio runtime
/// that will drive the exports.
pub fn install(
    config: &TelemetryConfig,
    dropped: Counter,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), TelemetryError> {
    if enabled() {
        tracing::debug!("telemetry is already set up in this process");
        return Ok(());
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let bounds = Bounds::from_env(env);
    let resource = resource(config, env);
    let client = Transport::new(bounds.timeout)?;
    let headers: HashMap<String, String> = config
        .otlp
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut drains = Vec::new();

    let mut spans = span_exporter(config, client.clone(), headers.clone(), bounds)?;
    spans.set_resource(&resource);
    let span_queue = Arc::new(Queue::new(bounds, dropped.clone()));
    drains.push(runtime.spawn(drain(
        span_queue.clone(),
        SpanSink(spans),
        bounds,
        stopped.clone(),
    )));
    let mut traces = SdkTracerProvider::builder()
        .with_span_processor(SpanQueue(span_queue))
        .with_resource(resource.clone());
    // Otherwise the SDK reads OTEL_TRACES_SAMPLER(_ARG), else keeps every trace.
    if let Some(ratio) = config.traces.sample_ratio {
        traces = traces.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    let traces = traces.build();

    let logs = if config.audit_logs {
        let mut logs = log_exporter(config, client, headers, bounds)?;
        opentelemetry_sdk::logs::LogExporter::set_resource(&mut logs, &resource);
        let log_queue = Arc::new(Queue::new(bounds, dropped));
        drains.push(runtime.spawn(drain(log_queue.clone(), LogSink(logs), bounds, stopped)));
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(LogQueue(log_queue))
            .with_resource(resource)
            .build();
        Some((provider.logger("tollgate"), provider))
    } else {
        None
    };
    let telemetry = Telemetry {
        tracer: traces.tracer("tollgate"),
        _traces: traces,
        logs,
        propagator: TraceContextPropagator::new(),
        stop,
        drains: Mutex::new(drains),
    };
    if TELEMETRY.set(telemetry).is_err() {
        tracing::debug!("telemetry was set up twice; the first stays");
    }
    Ok(())
}

/// Exports what waits, for at most `within` (at exit).
pub async fn shutdown(within: Duration) {
    let Some(telemetry) = TELEMETRY.get() else {
        return;
    };
    let _ = telemetry.stop.send(true);
    let drains = std::mem::take(&mut *telemetry.drains.lock());
    let all = futures::future::join_all(drains);
    if tokio::time::timeout(within, all).await.is_err() {
        tracing::warn!("telemetry not all exported before exit: the collector is slow or down");
    }
}

// ---- the queue ----------------------------------------------------------------------

/// Spans or log records waiting for export: at most `max_queue`, the rest dropped.
struct Queue<T> {
    items: Mutex<Vec<T>>,
    full_batch: tokio::sync::Notify,
    bounds: Bounds,
    dropped: Counter,
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl<T> Queue<T> {
    fn new(bounds: Bounds, dropped: Counter) -> Queue<T> {
        Queue {
            items: Mutex::new(Vec::new()),
            full_batch: tokio::sync::Notify::new(),
            bounds,
            dropped,
        }
    }

    /// Adds an item, or drops and counts it when the queue is full. Never waits.
    fn push(&self, item: T) {
        let mut items = self.items.lock();
        if items.len() >= self.bounds.max_queue {
            drop(items);
            self.dropped.inc();
            return;
        }
        items.push(item);
        // The drain is woken once per batch, not per item.
        let wake = items.len() == self.bounds.max_batch;
        drop(items);
        if wake {
            self.full_batch.notify_one();
        }
    }

    fn take_batch(&self) -> Vec<T> {
        let mut items = self.items.lock();
        let n = items.len().min(self.bounds.max_batch);
        items.drain(..n).collect()
    }
}

/// Where a queue's batches go.
trait Sink<T>: Send + Sync + 'static {
    fn export(&self, batch: Vec<T>) -> impl Future<Output = OTelSdkResult> + Send;
}

struct SpanSink(opentelemetry_otlp::SpanExporter);

impl Sink<SpanData> for SpanSink {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.export(batch).await
    }
}

type LogItem = (SdkLogRecord, InstrumentationScope);

struct LogSink(opentelemetry_otlp::LogExporter);

impl Sink<LogItem> for LogSink {
    async fn export(&self, batch: Vec<LogItem>) -> OTelSdkResult {
        let items: Vec<(&SdkLogRecord, &InstrumentationScope)> = batch
            .iter()
            .map(|(record, scope)| (record, scope))
            .collect();
        self.0.export(LogBatch::new(&items)).await
    }
}

/// Drains `queue` into `sink`: every `delay`, whenever a batch is full, and once more
/// when stopped. One export at a time, each within `timeout`; a failed one's items
/// are counted as dropped (meanwhile the queue fills, and drops, on its own).
async fn drain<T: Send + 'static>(
    queue: Arc<Queue<T>>,
    sink: impl Sink<T>,
    bounds: Bounds,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(bounds.delay) => false,
            () = queue.full_batch.notified() => false,
            _ = stop.wait_for(|stop| *stop) => true,
        };
        loop {
            let batch = queue.take_batch();
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            match tokio::time::timeout(bounds.timeout, sink.export(batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    queue.dropped.inc_by(n);
                    tracing::debug!(error = %err, dropped = n, "telemetry export failed");
                }
                Err(_) => {
                    queue.dropped.inc_by(n);
                    tracing::debug!(dropped = n, "telemetry export timed out");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[derive(Debug)]
struct SpanQueue(Arc<Queue<SpanData>>);

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.0.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

#[derive(Debug)]
struct LogQueue(Arc<Queue<LogItem>>);

impl LogProcessor for LogQueue {
    fn emit(&self, record: &mut SdkLogRecord, scope: &InstrumentationScope) {
        self.0.push((record.clone(), scope.clone()));
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// OTLP/HTTP over the workspace's reqwest client (rustls), on the runtime the drains
/// run on.
#[derive(Debug, Clone)]
struct Transport(reqwest::Client);

/// Largest collector answer read (OTLP answers are a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl Transport {
    fn new(timeout: Duration) -> Result<Transport, TelemetryError> {
        reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map(Transport)
            .map_err(|e| TelemetryError::Exporter(e.to_string()))
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Transport {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                break;
            }
            answer.extend_from_slice(&chunk);
        }
        let mut out = http::Response::new(Bytes::from(answer));
        *out.status_mut() = response.status();
        *out.headers_mut() = std::mem::take(response.headers_mut());
        Ok(out)
    }
}

// ---- spans --------------------------------------------------------------------------

/// The W3C trace context of an HTTP request's headers, kept only with telemetry on.
#[derive(Debug, Clone, Default)]
pub struct TraceHeaders {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// An HTTP request's `traceparent`/`tracestate`, when telemetry is on and it has one.
pub fn headers_of(headers: &HeaderMap) -> Option<Box<TraceHeaders>> {
    if !enabled() {
        return None;
    }
    let text = |name: &str| Some(headers.get(name)?.to_str().ok()?.to_owned());
    let traceparent = text("traceparent")?;
    Some(Box::new(TraceHeaders {
        traceparent: Some(traceparent),
        tracestate: text("tracestate"),
    }))
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// `params._meta` read as a carrier (SEP-414): string values only.
struct MetaCarrier<'a>(&'a Map<String, Value>);

impl Extractor for MetaCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MetaInjector<'a>(&'a mut Map<String, Value>);

impl Injector for MetaInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), Value::String(value));
    }
}

struct HeaderInjector<'a>(&'a mut Vec<(HeaderName, HeaderValue)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.retain(|(n, _)| *n != name);
            self.0.push((name, value));
        }
    }
}

/// What the core knows about a message when it arrives, besides the message.
pub struct Arrival<'a> {
    /// The server it is for.
    pub server: &'a str,
    /// The caller's name (client, else token user).
    pub client: Option<&'a str>,
    /// The session it names (`Mcp-Session-Id`, or the conversation's).
    pub session: Option<&'a str>,
    /// `MCP-Protocol-Version`, when the binding has headers.
    pub protocol_version: Option<&'a str>,
    /// Came over a pipe (`tollgate stdio`) rather than TCP.
    pub pipe: bool,
    /// The HTTP request's trace context.
    pub headers: Option<&'a TraceHeaders>,
}

/// `text` cut to at most [`MAX_ATTRIBUTE_BYTES`], on a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_ATTRIBUTE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ATTRIBUTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => bounded(s),
        other => bounded(&other.to_string()),
    }
}

/// The span name and the target-specific attributes of a message: `{method} {target}`.
fn named(
    method: &str,
    params: Option<&Map<String, Value>>,
    attributes: &mut Vec<KeyValue>,
) -> String {
    let text = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_str);
    let target = match method {
        "tools/call" => text("name").inspect(|name| {
            attributes.push(KeyValue::new("gen_ai.operation.name", "execute_tool"));
            attributes.push(KeyValue::new("gen_ai.tool.name", bounded(name)));
        }),
        "prompts/get" => text("name").inspect(|name| {
            attributes.push(KeyValue::new("gen_ai.prompt.name", bounded(name)));
        }),
        m if m.starts_with("resources/") => {
            if let Some(uri) = text("uri") {
                attributes.push(KeyValue::new("mcp.resource.uri", bounded(uri)));
            }
            None
        }
        _ => None,
    };
    match target {
        Some(target) => format!("{method} {}", bounded(target)),
        None => method.to_owned(),
    }
}

/// The server span of a message (a request or notification; none for a client's
/// answer), continuing the trace its `params._meta` (else its HTTP headers) carries.
/// `None` without telemetry.
pub fn server(message: &Message, arrival: &Arrival<'_>) -> Option<Context> {
    let telemetry = TELEMETRY.get()?;
    let method = message.method()?;
    // `params` of a message that arrived as bytes is parsed only when the bytes name a
    // trace context, or when the span needs a target from it.
    let wants_params = match message.raw() {
        Some(raw) => memchr::memmem::find(raw, b"traceparent").is_some(),
        None => true,
    } || matches!(method, "tools/call" | "prompts/get" | "initialize")
        || method.starts_with("resources/");
    let params = if wants_params { message.params() } else { None };
    let from_meta = params
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
        .filter(|meta| meta.contains_key("traceparent"));
    let parent = match (from_meta, arrival.headers) {
        (Some(meta), _) => telemetry.propagator.extract(&MetaCarrier(meta)),
        (None, Some(headers)) => telemetry.propagator.extract(headers),
        (None, None) => Context::new(),
    };
    let mut attributes = Vec::with_capacity(12);
    attributes.push(KeyValue::new("mcp.method.name", method.to_owned()));
    let name = named(method, params, &mut attributes);
    let version = arrival
        .protocol_version
        .or_else(|| message.meta_protocol_version())
        .or_else(|| {
            (method == "initialize")
                .then(|| params?.get("protocolVersion")?.as_str())
                .flatten()
        });
    if let Some(version) = version {
        attributes.push(KeyValue::new("mcp.protocol.version", bounded(version)));
    }
    if let Some(session) = arrival.session {
        attributes.push(KeyValue::new("mcp.session.id", bounded(session)));
    }
    if let Some(id) = message.id() {
        attributes.push(KeyValue::new("jsonrpc.request.id", id_text(id)));
    }
    attributes.push(KeyValue::new(
        "network.transport",
        if arrival.pipe { "pipe" } else { "tcp" },
    ));
    attributes.push(KeyValue::new("tollgate.server", arrival.server.to_owned()));
    if let Some(client) = arrival.client {
        attributes.push(KeyValue::new("tollgate.client", bounded(client)));
    }
    let span = telemetry
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&telemetry.tracer, &parent);
    Some(parent.with_span(span))
}

/// Runs `work` inside the span of `cx` (its current context), and marks the span when
/// the core answers with an error (`error.type`: the JSON-RPC code).
pub async fn traced<T, E>(
    cx: Context,
    work: impl Future<Output = Result<T, E>>,
    code: impl FnOnce(&E) -> i64,
) -> Result<T, E> {
    let result = work.with_context(cx.clone()).await;
    if let Err(err) = &result {
        failed(&cx, &code(err).to_string());
    }
    result
}

/// `work` inside the current context (a task spawned for a call stays in its trace).
pub fn in_current<F: Future>(work: F) -> impl Future<Output = F::Output> {
    if enabled() {
        Either::Left(work.with_current_context())
    } else {
        Either::Right(work)
    }
}

/// The protocol version a message's session negotiated, on the current span.
pub fn protocol_version(version: &str) {
    Context::map_current(|cx| {
        cx.span()
            .set_attribute(KeyValue::new("mcp.protocol.version", bounded(version)));
    });
}

fn failed(cx: &Context, kind: &str) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("error.type", kind.to_owned()));
    span.set_status(Status::error(kind.to_owned()));
}

/// The time a decision starts, with telemetry on.
#[inline]
pub fn clock() -> Option<SystemTime> {
    enabled().then(SystemTime::now)
}

/// What a policy decision said, for its span.
pub struct Decided<'a> {
    /// `allow`, `deny` or `require_approval`.
    pub decision: &'a str,
    /// Why it was refused, when it was.
    pub kind: Option<&'a str>,
    /// The deciding rule, or `default`.
    pub rule: &'a str,
    /// `enforce` or `audit`.
    pub mode: &'a str,
    /// Whether the call is refused here.
    pub refused: bool,
}

/// Records a decision begun at `started`: a child span of the current one, and its
/// result on the server span (`tollgate.decision`, `tollgate.rule`; `error.type` for
/// a refused call: its kind).
pub fn decision(started: SystemTime, decided: &Decided<'_>) {
    let Some(telemetry) = TELEMETRY.get() else {
        return;
    };
    Context::map_current(|cx| {
        // A call outside a message's span is not traced.
        if !cx.has_active_span() {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("tollgate.decision", decided.decision.to_owned()),
            KeyValue::new("tollgate.rule", bounded(decided.rule)),
            KeyValue::new("tollgate.mode", decided.mode.to_owned()),
        ];
        if let Some(kind) = decided.kind {
            attributes.push(KeyValue::new("tollgate.kind", kind.to_owned()));
        }
        let server = cx.span();
        for attribute in &attributes[..2] {
            server.set_attribute(attribute.clone());
        }
        if decided.refused {
            failed(cx, decided.kind.unwrap_or(decided.decision));
        }
        let mut span = telemetry
            .tracer
            .span_builder("tollgate.decision")
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .with_attributes(attributes)
            .start_with_context(&telemetry.tracer, cx);
        span.end();
    });
}

/// `wait` (a held call waiting for a human) inside a child span of the current one,
/// which ends when the wait does. The approval's audit records name its id on it.
pub fn approval_wait<F: Future>(wait: F) -> impl Future<Output = F::Output> {
    let Some(telemetry) = TELEMETRY.get() else {
        return Either::Right(wait);
    };
    let cx = Context::current();
    if !cx.has_active_span() {
        return Either::Right(wait);
    }
    let span = telemetry
        .tracer
        .span_builder("tollgate.approval_wait")
        .with_kind(SpanKind::Internal)
        .start_with_context(&telemetry.tracer, &cx);
    Either::Left(wait.with_context(cx.with_span(span)))
}

/// The spans of a call that may go upstream, kept by its permit until its outcome.
pub struct CallTrace {
    server: Context,
    client: Option<Context>,
}

/// The current call's spans, with telemetry on and a span current.
#[inline]
pub fn call() -> Option<Box<CallTrace>> {
    if !enabled() {
        return None;
    }
    let server = Context::current();
    server.has_active_span().then(|| {
        Box::new(CallTrace {
            server,
            client: None,
        })
    })
}

impl CallTrace {
    /// The upstream exchange the call went out in.
    pub fn sent(&mut self, upstream: &Upstream) {
        self.client = Some(upstream.cx.clone());
    }

    /// Makes the call's server span current until the guard drops (its outcome's
    /// audit record is written in its trace).
    pub fn enter(&self) -> opentelemetry::ContextGuard {
        self.server.clone().attach()
    }

    /// Records the outcome (`tollgate.outcome`; `error.type`: `tool_error`, the JSON-RPC
    /// code, or why there is no answer) and ends the spans the call holds.
    pub fn finish(self, outcome: &str, code: Option<i64>) {
        let kind: Option<Cow<'_, str>> = match (outcome, code) {
            ("ok" | "forwarded", _) => None,
            ("rpc_error", Some(code)) => Some(code.to_string().into()),
            (other, _) => Some(other.into()),
        };
        for cx in std::iter::once(&self.server).chain(&self.client) {
            cx.span()
                .set_attribute(KeyValue::new("tollgate.outcome", outcome.to_owned()));
            if let Some(kind) = &kind {
                failed(cx, kind);
            }
        }
    }
}

/// The upstream exchange: a client span, child of the current one.
pub struct Upstream {
    cx: Context,
}

/// Opens the client span of sending `message` (`None` for a batch) upstream to
/// `server`; `None` without telemetry or a current span.
pub fn upstream(server: &str, message: Option<&Value>, pipe: bool) -> Option<Upstream> {
    upstream_under(Context::current(), server, message, pipe)
}

fn upstream_under(
    parent: Context,
    server: &str,
    message: Option<&Value>,
    pipe: bool,
) -> Option<Upstream> {
    let telemetry = TELEMETRY.get()?;
    if !parent.has_active_span() {
        return None;
    }
    let method = message
        .and_then(|m| m.get("method"))
        .and_then(Value::as_str);
    let params = message
        .and_then(|m| m.get("params"))
        .and_then(Value::as_object);
    let mut attributes = Vec::with_capacity(8);
    let name = match method {
        Some(method) => {
            attributes.push(KeyValue::new("mcp.method.name", method.to_owned()));
            named(method, params, &mut attributes)
        }
        None => "batch".to_owned(),
    };
    if let Some(id) = message.and_then(|m| m.get("id")) {
        attributes.push(KeyValue::new("jsonrpc.request.id", id_text(id)));
    }
    attributes.push(KeyValue::new(
        "network.transport",
        if pipe { "pipe" } else { "tcp" },
    ));
    attributes.push(KeyValue::new("tollgate.server", server.to_owned()));
    let span = telemetry
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .start_with_context(&telemetry.tracer, &parent);
    Some(Upstream {
        cx: parent.with_span(span),
    })
}

impl Upstream {
    fn sampled(&self) -> bool {
        self.cx.span().span_context().is_sampled()
    }

    /// `message` with this span's trace context in `params._meta` (the upstream's span
    /// becomes its child); `None` when the trace is not sampled (the message then goes
    /// as it came, with whatever context its sender put in it).
    pub fn message(&self, message: &Value) -> Option<Value> {
        let telemetry = TELEMETRY.get()?;
        if !self.sampled() || !message.is_object() {
            return None;
        }
        let mut message = message.clone();
        let object = message.as_object_mut()?;
        let params = object
            .entry("params")
            .or_insert_with(|| Value::Object(Map::new()));
        let params = params.as_object_mut()?;
        let meta = params
            .entry("_meta")
            .or_insert_with(|| Value::Object(Map::new()));
        let meta = meta.as_object_mut()?;
        meta.remove("tracestate");
        telemetry
            .propagator
            .inject_context(&self.cx, &mut MetaInjector(meta));
        Some(message)
    }

    /// `forwarded` with this span's `traceparent` (and `tracestate`), for an HTTP
    /// upstream; `None` when the trace is not sampled.
    pub fn headers(
        &self,
        forwarded: &[(HeaderName, HeaderValue)],
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let telemetry = TELEMETRY.get()?;
        if !self.sampled() {
            return None;
        }
        let mut headers = forwarded.to_vec();
        telemetry
            .propagator
            .inject_context(&self.cx, &mut HeaderInjector(&mut headers));
        Some(headers)
    }

    /// Marks the exchange failed (`error.type`: why).
    pub fn failed(&self, kind: &str) {
        failed(&self.cx, kind);
    }
}

// ---- batches ------------------------------------------------------------------------

/// The spans of a JSON-RPC batch's members (`telemetry:`): each member is a message with
/// its own server span, decided inside it; each forwarded member has its own client span,
/// child of its server span, carried in its `params._meta` (the batch has one HTTP
/// exchange, so no `traceparent` header speaks for all of them). Kept until the batch is
/// answered; a call's permit keeps its own spans until its outcome.
#[derive(Default)]
pub struct Batch {
    members: Vec<Member>,
}

struct Member {
    server: Context,
    /// Its index among the forwarded messages, and among the permits.
    forwarded: Option<(usize, Option<usize>)>,
    upstream: Option<Upstream>,
}

impl Batch {
    /// Keeps a member's server span; `forwarded`: its index among the messages sent
    /// upstream and, for a call, among the permits. `refused`: why the batch answered it
    /// itself, when no decision span said so.
    pub fn member(
        &mut self,
        server: Context,
        forwarded: Option<(usize, Option<usize>)>,
        refused: Option<&str>,
    ) {
        if let Some(kind) = refused {
            failed(&server, kind);
        }
        self.members.push(Member {
            server,
            forwarded,
            upstream: None,
        });
    }

    /// Opens each forwarded member's client span and, when its trace is sampled, puts the
    /// span's context in that member's `params._meta` in `forward`; `link` gets the index
    /// of each call's permit with its exchange.
    pub fn send(
        &mut self,
        server: &str,
        pipe: bool,
        forward: &mut [Value],
        mut link: impl FnMut(usize, &Upstream),
    ) {
        for member in &mut self.members {
            let Some((at, permit)) = member.forwarded else {
                continue;
            };
            let Some(message) = forward.get_mut(at) else {
                continue;
            };
            let Some(span) = upstream_under(member.server.clone(), server, Some(message), pipe)
            else {
                continue;
            };
            if let Some(traced) = span.message(message) {
                *message = traced;
            }
            if let Some(permit) = permit {
                link(permit, &span);
            }
            member.upstream = Some(span);
        }
    }

    /// The batch failed as a whole (`error.type`: the JSON-RPC code): its forwarded
    /// members' spans say so.
    pub fn failed(&self, code: i64) {
        let code = code.to_string();
        for member in self.members.iter().filter(|m| m.forwarded.is_some()) {
            failed(&member.server, &code);
            if let Some(upstream) = &member.upstream {
                upstream.failed(&code);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bounds_follow_the_standard_variables() {
        let bounds = Bounds::from_env(&|name| match name {
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("4".into()),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("100".into()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some("x".into()),
            _ => None,
        });
        assert_eq!(bounds.max_queue, 4);
        assert_eq!(bounds.max_batch, 4);
        assert_eq!(bounds.delay, Duration::from_secs(5));
        assert_eq!(bounds.timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = Counter::default();
        let bounds =
            Bounds::from_env(&|name| (name == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| "2".into()));
        let queue = Queue::new(bounds, dropped.clone());
        for i in 0..5 {
            queue.push(i);
        }
        assert_eq!(dropped.get(), 3);
        assert_eq!(queue.take_batch(), vec![0, 1]);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ATTRIBUTE_BYTES);
        assert!(long.starts_with(&cut));
    }
}
