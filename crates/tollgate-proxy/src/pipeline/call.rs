//! Stage 5, call: the one routine that sends what was evaluated upstream and
//! accounts for it, used by single calls, batches and approved calls alike.
//!
//! It measures the upstream's latency, counts its failures, re-initializes a
//! session the upstream lost (when that is safe) and hands the answer to the
//! response stages ([`respond::Chain`]), which finish every call's permit with its
//! outcome as its answer passes; or finishes them with why there is no answer.

use std::time::Instant;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use futures::StreamExt as _;
use serde_json::Value;

use super::context::{Answer, Context};
use super::decide::Outcome;
use super::respond::{Chain, account};
use super::session;
use crate::error::ProxyError;
use crate::state::Server;
use crate::telemetry;
use crate::upstream::{Body, Failure, Json, Payload, Reply, Request};

/// Sends `payload` (one message, or a batch) on the context's session; its answer
/// passes `chain`, the response stages that know the calls in it.
pub async fn forward(
    ctx: &Context,
    payload: Payload<'_>,
    mut chain: Chain,
) -> Result<Reply, ProxyError> {
    let id = payload.id();
    let started = Instant::now();
    chain.start(started);
    let traced = match telemetry::enabled() {
        true => traced(ctx, payload, &mut chain),
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
                chain.finish(Outcome::SessionLost);
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
    account(ctx, sent, chain, started, upstream_session.is_some(), id)
}

/// The exchange's client span (`telemetry:`) and what carries its context upstream:
/// the message with it in `params._meta`, and the headers with `traceparent`; each
/// call's permit (waiting in `chain`) keeps the span until the call's outcome.
struct Traced {
    span: telemetry::Upstream,
    message: Option<Value>,
    headers: Option<Vec<(HeaderName, HeaderValue)>>,
}

fn traced(ctx: &Context, payload: Payload<'_>, chain: &mut Chain) -> Option<Traced> {
    let message = match payload {
        Payload::One(message) => Some(message),
        Payload::Verbatim(message, _) => Some(message.as_value()),
        Payload::Batch(_) => None,
    };
    let pipe = ctx.server.network_address.is_none();
    let span = telemetry::upstream(&ctx.server.name, message, pipe)?;
    chain.sent(&span);
    Some(Traced {
        message: message.and_then(|m| span.message(m)),
        headers: span.headers(&ctx.forwarded),
        span,
    })
}

/// Measures and records an exchange, and passes its answer to the response stages.
fn account(
    ctx: &Context,
    sent: Result<Reply, Failure>,
    mut chain: Chain,
    started: Instant,
    had_upstream_session: bool,
    id: Option<&Value>,
) -> Result<Reply, ProxyError> {
    let server = &ctx.server;
    let metrics = ctx.shared().metrics();
    match sent {
        Ok(mut reply) => {
            metrics.upstream_latency(&server.name, started.elapsed().as_secs_f64());
            if reply.status.is_server_error() {
                metrics.upstream_error(&server.name, "status_5xx");
            }
            let lost = reply.status == StatusCode::NOT_FOUND && had_upstream_session;
            match reply.status {
                _ if lost => chain.finish(Outcome::SessionLost),
                status if status.is_success() => {}
                _ => chain.finish(Outcome::UpstreamError),
            }
            if let (true, Some(session)) = (lost, &ctx.session) {
                // The upstream forgot its session: forget ours so the client re-initializes.
                ctx.shared().sessions().remove(&session.id);
                return Err(ProxyError::UnknownSession);
            }
            if !reply.status.is_success() {
                // A bare error status (a wrong path's 404, a gateway's 502 page) tells the
                // client nothing about which upstream failed: say it in JSON-RPC.
                let (body, answered) = jsonrpc_body(reply.body);
                if !answered {
                    if !reply.status.is_server_error() {
                        metrics.upstream_error(&server.name, "status_not_ok");
                    }
                    let error = status_error(server, reply.status, id.cloned());
                    tracing::warn!(status = %reply.status, location = %server.location, "upstream answered without a JSON-RPC message");
                    return Err(error);
                }
                reply.body = body;
            }
            reply.body = chain.body(reply.body);
            Ok(reply)
        }
        Err(failure) => {
            metrics.upstream_error(&server.name, failure.kind());
            chain.finish(account::failed(&failure));
            tracing::warn!(error = %failure, "upstream request failed");
            Err(failure_error(server, &failure, id.cloned()))
        }
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
        lane: ctx.lane,
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
        .listen(ctx.lane, upstream_session.as_deref(), &forwarded)
        .await
        .map_err(failed)?;
    if let Some(lost) = &upstream_session
        && reply.status == StatusCode::NOT_FOUND
        && let Ok(renewed) = session::recover(ctx, session, lost, None).await
    {
        reply = upstream
            .listen(ctx.lane, renewed.as_deref(), &forwarded)
            .await
            .map_err(failed)?;
    }
    if reply.status == StatusCode::NOT_FOUND && upstream_session.is_some() {
        ctx.shared().sessions().remove(&session.id);
        return Err(ProxyError::UnknownSession);
    }
    let body = super::tools::on_list_changed(ctx, reply.body);
    let body = holding(body, slot);
    Ok(Answer {
        status: reply.status,
        body,
        session: None,
        retry_after: reply.retry_after,
    })
}

/// The stream `body`, holding the session's stream `slot` for as long as it lives.
fn holding<T: Send + Sync + 'static>(body: Body, slot: T) -> Body {
    match body {
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
    }
}

/// An error answer's body, and whether it carries JSON-RPC (a JSON object or batch
/// with `jsonrpc`, or a stream of messages) rather than nothing or an error page.
fn jsonrpc_body(body: Body) -> (Body, bool) {
    match body {
        Body::Json(json) => match json.into_value() {
            Ok(value) => {
                let answered = match &value {
                    Value::Object(message) => message.contains_key("jsonrpc"),
                    Value::Array(messages) => messages.iter().any(|m| m.get("jsonrpc").is_some()),
                    _ => false,
                };
                (Body::Json(Json::Value(value)), answered)
            }
            Err(_) => (Body::Empty, false),
        },
        body @ (Body::Events(_) | Body::Sse(_)) => (body, true),
        body @ (Body::Empty | Body::Other { .. }) => (body, false),
    }
}

/// The client-facing error for an HTTP error status without a JSON-RPC message.
fn status_error(server: &Server, status: StatusCode, id: Option<Value>) -> ProxyError {
    let message = format!(
        "upstream `{}` ({}) answered HTTP {} without a JSON-RPC message; check that {} is the server's MCP endpoint and that the server is healthy",
        server.name, server.location, status, server.location_key
    );
    ProxyError::Upstream { id, message }
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
    use super::*;

    fn text(body: &str) -> Body {
        Body::Json(Json::Text(bytes::Bytes::copy_from_slice(body.as_bytes())))
    }

    #[test]
    fn only_json_rpc_counts_as_an_answer_to_an_error_status() {
        let answered = |body| jsonrpc_body(body).1;
        assert!(answered(text(
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32600,"message":"x"}}"#
        )));
        assert!(answered(text(r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#)));
        assert!(!answered(text(r#"{"detail":"Not Found"}"#)));
        assert!(!answered(text("not json")));
        assert!(!answered(Body::Empty));
        assert!(!answered(Body::Other {
            content_type: None,
            bytes: bytes::Bytes::from_static(b"<html>404</html>"),
        }));
    }
}
