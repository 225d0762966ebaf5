//! Stage 5, call: the one routine that sends what was evaluated upstream and
//! accounts for it, used by single calls, batches and approved calls alike.
//!
//! It measures the upstream's latency, counts its failures, re-initializes a
//! session the upstream lost (when that is safe) and finishes every call's
//! [`Permit`] with its outcome: what the upstream answered (`ok`, `tool_error`,
//! `rpc_error`), read from a JSON answer at once and from a stream as the call's
//! answer passes, or why there is no answer.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use serde_json::Value;
use tollgate_mcp::{DEFAULT_MAX_EVENT_BYTES, SseDecoder, SseEvent};

use super::context::{Answer, Context};
use super::decide::{Outcome, Permit};
use super::session;
use crate::error::ProxyError;
use crate::state::Server;
use crate::telemetry;
use crate::upstream::{Body, Event, EventStream, Failure, Json, Payload, Reply, Request, SseBytes};

/// Sends `payload` (one message, or a batch) on the context's session and
/// accounts for each call in it (`permits`).
pub async fn forward(
    ctx: &Context,
    payload: Payload<'_>,
    permits: Vec<Permit>,
) -> Result<Reply, ProxyError> {
    let id = payload.id();
    let mut permits = permits;
    let started = Instant::now();
    for permit in &mut permits {
        permit.start(started);
    }
    let traced = match telemetry::enabled() {
        true => traced(ctx, payload, &mut permits),
        false => None,
    };
    let payload = match traced.as_ref().and_then(|t| t.message.as_ref()) {
        Some(message) => Payload::One(message),
        None => payload,
    };
    let headers = match traced.as_ref().and_then(|t| t.headers.as_deref()) {
        Some(headers) => headers,
        None => &ctx.forwarded,
    };
    let _in_flight = ctx.session.as_ref().map(|s| s.start_request());
    let upstream_session = ctx.session.as_ref().and_then(|s| s.upstream_id());
    let mut sent = send(ctx, payload, headers, upstream_session.as_deref()).await;
    // The upstream forgot its session (restarted, expired): re-initialize it
    // behind the client's back when that is safe, and send the request again.
    if let (Ok(reply), Some(session), Some(lost)) = (&sent, &ctx.session, &upstream_session)
        && reply.status == StatusCode::NOT_FOUND
    {
        match session::recover(ctx, session, lost, id).await {
            Ok(renewed) => sent = send(ctx, payload, headers, renewed.as_deref()).await,
            Err(err) => {
                finish(permits, Outcome::SessionLost);
                return Err(err);
            }
        }
    }
    if let Some(traced) = &traced {
        match &sent {
            Err(failure) => traced.span.failed(failure.kind()),
            Ok(reply) if reply.status.is_server_error() => traced.span.failed("status_5xx"),
            Ok(_) => {}
        }
    }
    account(ctx, sent, permits, started, upstream_session.is_some(), id)
}

/// The exchange's client span (`telemetry:`) and what carries its context upstream:
/// the message with it in `params._meta`, and the headers with `traceparent`; each
/// call's permit keeps the span until the call's outcome.
struct Traced {
    span: telemetry::Upstream,
    message: Option<Value>,
    headers: Option<Vec<(HeaderName, HeaderValue)>>,
}

fn traced(ctx: &Context, payload: Payload<'_>, permits: &mut [Permit]) -> Option<Traced> {
    let message = match payload {
        Payload::One(message) => Some(message),
        Payload::Verbatim(message, _) => Some(message.as_value()),
        Payload::Batch(_) => None,
    };
    let pipe = ctx.server.network_address.is_none();
    let span = telemetry::upstream(&ctx.server.name, message, pipe)?;
    for permit in permits.iter_mut() {
        if let Some(trace) = permit.trace() {
            trace.sent(&span);
        }
    }
    Some(Traced {
        message: message.and_then(|m| span.message(m)),
        headers: span.headers(&ctx.forwarded),
        span,
    })
}

/// Measures and records an exchange, and finishes its calls' permits.
fn account(
    ctx: &Context,
    sent: Result<Reply, Failure>,
    permits: Vec<Permit>,
    started: Instant,
    had_upstream_session: bool,
    id: Option<&Value>,
) -> Result<Reply, ProxyError> {
    let server = &ctx.server;
    let metrics = &ctx.shared().metrics;
    match sent {
        Ok(mut reply) => {
            metrics.upstream_latency(&server.name, started.elapsed().as_secs_f64());
            if reply.status.is_server_error() {
                metrics.upstream_error(&server.name, "status_5xx");
            }
            let lost = reply.status == StatusCode::NOT_FOUND && had_upstream_session;
            match reply.status {
                _ if lost => finish(permits, Outcome::SessionLost),
                status if status.is_success() => {
                    reply.body = answered(reply.body, permits);
                }
                _ => finish(permits, Outcome::UpstreamError),
            }
            if let (true, Some(session)) = (lost, &ctx.session) {
                // The upstream forgot its session: forget ours so the client re-initializes.
                ctx.shared().sessions.remove(&session.id);
                return Err(ProxyError::UnknownSession);
            }
            Ok(reply)
        }
        Err(failure) => {
            metrics.upstream_error(&server.name, failure.kind());
            finish(permits, failed(&failure));
            tracing::warn!(error = %failure, "upstream request failed");
            Err(failure_error(server, &failure, id.cloned()))
        }
    }
}

fn finish(permits: Vec<Permit>, outcome: Outcome) {
    for permit in permits {
        permit.finish(outcome);
    }
}

fn failed(failure: &Failure) -> Outcome {
    match failure {
        Failure::Unreachable(_) => Outcome::Unreachable,
        Failure::AtCapacity(_) => Outcome::AtCapacity,
        Failure::Timeout(_) => Outcome::Timeout,
        Failure::Broken(_) | Failure::TooLarge(_) => Outcome::Broken,
    }
}

/// Finishes each call with what its answer in `body` says: at once for a JSON
/// answer, as the answer passes for a stream. Only answers to calls are read.
fn answered(body: Body, permits: Vec<Permit>) -> Body {
    if permits.is_empty() {
        return body;
    }
    match body {
        Body::Json(json) => {
            let answers = match (&json, &permits[..]) {
                // A lone call's answer, whatever id it carries: the common case is read
                // without parsing.
                (Json::Text(text), [_]) if plainly_ok(text) => vec![(Value::Null, Outcome::Ok)],
                _ => answers_in(&json).unwrap_or_default(),
            };
            // A lone answer is the lone call's, whatever id it carries (a parse error's is null).
            let lone = match (&answers[..], &permits[..]) {
                ([(_, outcome)], [_]) => Some(*outcome),
                _ => None,
            };
            for permit in permits {
                let outcome = lone.or_else(|| {
                    answers
                        .iter()
                        .find(|(id, _)| id == permit.request_id())
                        .map(|(_, outcome)| *outcome)
                });
                permit.finish(outcome.unwrap_or(Outcome::Forwarded));
            }
            Body::Json(json)
        }
        Body::Events(events) => Body::Events(
            Accounted {
                events,
                waiting: Waiting::began(permits),
            }
            .boxed(),
        ),
        Body::Sse(bytes) => Body::Sse(
            AccountedSse {
                bytes,
                decoder: Some(SseDecoder::new(DEFAULT_MAX_EVENT_BYTES)),
                decoded: Vec::new(),
                waiting: Waiting::began(permits),
            }
            .boxed(),
        ),
        other @ (Body::Empty | Body::Other { .. }) => {
            finish(permits, Outcome::Forwarded);
            other
        }
    }
}

/// The JSON-RPC answers in a message or batch, by id, with what each says.
fn answers_in(json: &Json) -> Option<Vec<(Value, Outcome)>> {
    match json {
        Json::Value(Value::Array(items)) => Some(items.iter().filter_map(answer_of).collect()),
        Json::Value(value) => Some(answer_of(value).into_iter().collect()),
        Json::Text(text) => {
            // Only the few fields that tell the outcome are read; results are skipped.
            let batch = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            let heads = if batch {
                serde_json::from_slice::<Vec<Head>>(text).ok()?
            } else {
                vec![serde_json::from_slice::<Head>(text).ok()?]
            };
            Some(heads.into_iter().filter_map(Head::answer).collect())
        }
    }
}

/// The common case, told without parsing: one answer with a result, no `"error"`
/// anywhere in it, and every `"isError"` key set to `false`, is a lone call's `ok`.
/// Inside a JSON string a quote is escaped, so `"isError"` followed by `:` is a key
/// (or a key that merely ends so, which only sends the answer to the full parse).
fn plainly_ok(text: &[u8]) -> bool {
    let keys = &*KEYS;
    let skip = |rest: &[u8]| -> usize {
        rest.iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(rest.len())
    };
    text.get(skip(text)) == Some(&b'{')
        && keys.result.find(text).is_some()
        && keys.error.find(text).is_none()
        && keys.is_error.find_iter(text).all(|at| {
            let rest = &text[at + b"\"isError\"".len()..];
            let rest = &rest[skip(rest)..];
            match rest.split_first() {
                Some((b':', value)) => value[skip(value)..].starts_with(b"false"),
                // A string value `"isError"`, not a key.
                _ => true,
            }
        })
}

/// The keys [`plainly_ok`] and [`Waiting::note`] look for, each searcher built once
/// (building one costs more than a search through a small answer).
struct Keys {
    result: memchr::memmem::Finder<'static>,
    error: memchr::memmem::Finder<'static>,
    is_error: memchr::memmem::Finder<'static>,
    method: memchr::memmem::Finder<'static>,
}

static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys {
    result: memchr::memmem::Finder::new(br#""result""#),
    error: memchr::memmem::Finder::new(br#""error""#),
    is_error: memchr::memmem::Finder::new(br#""isError""#),
    method: memchr::memmem::Finder::new(br#""method""#),
});

fn answer_of(message: &Value) -> Option<(Value, Outcome)> {
    let answer = message.get("result").is_some() || message.get("error").is_some();
    answer.then(|| {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        (id, Outcome::of_answer(message))
    })
}

/// What an answer's outcome depends on, read without the rest of it.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    error: Option<ErrorHead>,
    #[serde(default)]
    result: Option<ResultHead>,
}

#[derive(Deserialize)]
struct ErrorHead {
    #[serde(default)]
    code: Value,
}

#[derive(Deserialize)]
struct ResultHead {
    #[serde(default, rename = "isError")]
    is_error: Value,
}

impl Head {
    fn answer(self) -> Option<(Value, Outcome)> {
        let outcome = match (self.error, self.result) {
            (Some(error), _) => Outcome::RpcError(error.code.as_i64().unwrap_or(0)),
            (None, Some(result)) if result.is_error == Value::Bool(true) => Outcome::ToolError,
            (None, Some(_)) => Outcome::Ok,
            (None, None) => return None,
        };
        Some((self.id, outcome))
    }
}

/// The calls of a streamed answer still waiting for theirs. Each is finished when its
/// answer passes; when the stream fails or ends first, or is dropped (the client went
/// away), the calls still waiting are finished with that.
struct Waiting(Vec<Permit>);

impl Waiting {
    /// The permits of calls whose answer has begun to stream.
    fn began(mut permits: Vec<Permit>) -> Waiting {
        for permit in &mut permits {
            permit.answer_began();
        }
        Waiting(permits)
    }

    fn note(&mut self, message: &Json) {
        if self.0.is_empty() {
            return;
        }
        // A lone call's answer in its stream, told without parsing: a plain result that
        // is not a message of the server's own (those have a `method`).
        if let (Json::Text(text), [_]) = (message, &self.0[..])
            && plainly_ok(text)
            && KEYS.method.find(text).is_none()
        {
            self.finish_all(Outcome::Ok);
            return;
        }
        let Some(answers) = answers_in(message) else {
            return;
        };
        for (id, outcome) in answers {
            if let Some(at) = self.0.iter().position(|p| *p.request_id() == id) {
                self.0.swap_remove(at).finish(outcome);
            }
        }
    }

    fn finish_all(&mut self, outcome: Outcome) {
        finish(std::mem::take(&mut self.0), outcome);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.finish_all(Outcome::ClientGone);
    }
}

/// A stream of messages, accounted as it passes.
struct Accounted {
    events: EventStream,
    waiting: Waiting,
}

impl Stream for Accounted {
    type Item = Result<Event, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = futures::ready!(this.events.poll_next_unpin(cx));
        match &item {
            Some(Ok(event)) => this.waiting.note(&event.data),
            Some(Err(failure)) => this.waiting.finish_all(failed(failure)),
            None => this.waiting.finish_all(Outcome::Broken),
        }
        Poll::Ready(item)
    }
}

/// An SSE stream relayed as it came, accounted the same way: its bytes pass unchanged
/// while a decoder beside them watches for the calls' answers.
struct AccountedSse {
    bytes: SseBytes,
    /// `None` once the stream is past what the decoder accepts: nothing more is read.
    decoder: Option<SseDecoder>,
    decoded: Vec<SseEvent>,
    waiting: Waiting,
}

impl Stream for AccountedSse {
    type Item = Result<Bytes, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = futures::ready!(this.bytes.poll_next_unpin(cx));
        match &item {
            Some(Ok(chunk)) if !this.waiting.0.is_empty() => {
                if let Some(decoder) = &mut this.decoder
                    && decoder.feed(chunk, &mut this.decoded).is_err()
                {
                    this.decoder = None;
                    this.waiting.finish_all(Outcome::Forwarded);
                }
                for event in this.decoded.drain(..) {
                    this.waiting.note(&Json::Text(Bytes::from(event.data)));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(failure)) => this.waiting.finish_all(failed(failure)),
            None => this.waiting.finish_all(Outcome::Broken),
        }
        Poll::Ready(item)
    }
}

async fn send(
    ctx: &Context,
    payload: Payload<'_>,
    headers: &[(HeaderName, HeaderValue)],
    upstream_session: Option<&str>,
) -> Result<Reply, Failure> {
    let version = ctx.session.as_ref().and_then(|s| s.protocol_version());
    let request = Request {
        payload,
        session: upstream_session,
        protocol_version: version.as_deref(),
        headers,
        owner: &ctx.owner,
    };
    ctx.server.upstream.send(request).await
}

/// Opens the session's server-to-client stream upstream.
pub async fn listen(ctx: &Context) -> Result<Answer, ProxyError> {
    let Some(session) = &ctx.session else {
        return Err(ProxyError::MethodNotAllowed);
    };
    // One upstream connection per GET stream: a client may not open them without bound.
    let slot = session.open_stream().map_err(|limit| {
        ProxyError::Quota(format!(
            "this session already has {limit} GET stream(s) open (limits.streams_per_session); close one before opening another"
        ))
    })?;
    let upstream = &ctx.server.upstream;
    let upstream_session = session.upstream_id();
    let mut forwarded = ctx.forwarded.clone();
    if let Some(version) = session.protocol_version()
        && !forwarded
            .iter()
            .any(|(name, _)| name == "mcp-protocol-version")
        && let Ok(value) = HeaderValue::from_str(&version)
    {
        forwarded.push((HeaderName::from_static("mcp-protocol-version"), value));
    }
    let failed = |failure: Failure| failure_error(&ctx.server, &failure, None);
    let mut reply = upstream
        .listen(upstream_session.as_deref(), &forwarded)
        .await
        .map_err(failed)?;
    if let Some(lost) = &upstream_session
        && reply.status == StatusCode::NOT_FOUND
        && let Ok(renewed) = session::recover(ctx, session, lost, None).await
    {
        reply = upstream
            .listen(renewed.as_deref(), &forwarded)
            .await
            .map_err(failed)?;
    }
    if reply.status == StatusCode::NOT_FOUND && upstream_session.is_some() {
        ctx.shared().sessions.remove(&session.id);
        return Err(ProxyError::UnknownSession);
    }
    // The slot is held for as long as the stream lives.
    let body = match reply.body {
        Body::Events(events) => Body::Events(
            events
                .map(move |event| {
                    let _open = &slot;
                    event
                })
                .boxed(),
        ),
        Body::Sse(bytes) => Body::Sse(
            bytes
                .map(move |chunk| {
                    let _open = &slot;
                    chunk
                })
                .boxed(),
        ),
        other => other,
    };
    Ok(Answer {
        status: reply.status,
        body,
        session: None,
        retry_after: reply.retry_after,
    })
}

/// The client-facing error for a failed exchange, naming the server and what to check.
pub fn failure_error(server: &Server, failure: &Failure, id: Option<Value>) -> ProxyError {
    let message = match failure {
        Failure::Unreachable(why) => format!(
            "upstream `{}` ({}) could not be reached: {why}; check that it is running and that {} is right",
            server.name, server.location, server.location_key
        ),
        Failure::Timeout(after) => format!(
            "upstream `{}` ({}) did not answer within {}s (servers.{}.timeout)",
            server.name,
            server.location,
            after.as_secs_f64(),
            server.name
        ),
        Failure::Broken(_) | Failure::TooLarge(_) | Failure::AtCapacity(_) => format!(
            "upstream `{}` ({}): {failure}",
            server.name, server.location
        ),
    };
    ProxyError::Upstream { id, message }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn outcome(text: &str) -> Vec<(Value, Outcome)> {
        answers_in(&Json::Text(Bytes::from(text.to_owned()))).unwrap()
    }

    #[test]
    fn a_plain_result_is_ok_without_parsing_and_anything_else_is_parsed() {
        for ok in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}"#,
            r#" {"jsonrpc":"2.0","id":1,"result":{"isError" : false,"x":{"isError":false}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"isError"}]}}"#,
        ] {
            assert!(plainly_ok(ok.as_bytes()), "{ok}");
            // The full parse agrees.
            assert_eq!(outcome(ok), [(json!(1), Outcome::Ok)], "{ok}");
        }
        for (text, expected) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#,
                Outcome::ToolError,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"a":{"isError":false},"isError": true}}"#,
                Outcome::ToolError,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"no"}}"#,
                Outcome::RpcError(-32602),
            ),
            // A key that only ends in `isError` sends the answer to the full parse.
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"x\"isError":true}}"#,
                Outcome::Ok,
            ),
        ] {
            assert!(!plainly_ok(text.as_bytes()), "{text}");
            assert_eq!(outcome(text), [(json!(1), expected)], "{text}");
        }
    }
}
