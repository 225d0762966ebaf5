//! Getting spans and log records out: [`install`] sets up the OTLP/HTTP exporters
//! and the bounded queues that feed them, drained by one task each; [`shutdown`]
//! exports what waits at exit.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::logs::LoggerProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{
    LogBatch, LogExporter as _, LogProcessor, SdkLogRecord, SdkLoggerProvider,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

use super::{TELEMETRY, Telemetry, TelemetryError, enabled};
use crate::config::TelemetryConfig;

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
}
