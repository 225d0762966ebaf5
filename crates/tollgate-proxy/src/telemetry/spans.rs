//! The spans of a request: the server span of a message (continuing the trace its
//! `params._meta` or HTTP headers carry), its children (the policy decision, an
//! approval wait, the upstream exchange), and the trace context put in what goes
//! upstream.

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use futures::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use serde_json::{Map, Value};
use tollgate_mcp::Message;

use super::{TELEMETRY, enabled};

/// Longest string taken from a request into a span attribute or name.
const MAX_ATTRIBUTE_BYTES: usize = 256;

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

pub(super) fn failed(cx: &Context, kind: &str) {
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

pub(super) fn upstream_under(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ATTRIBUTE_BYTES);
        assert!(long.starts_with(&cut));
    }
}
