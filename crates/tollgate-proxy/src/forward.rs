//! The upstream side: sending what was evaluated, and relaying what comes back.
//!
//! Answers are streamed through as they arrive. Only `tools/list` results are
//! parsed on the way back, to hide tools the policy denies outright.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;
use tollgate_mcp::{SseEvent, encode_event, events};
use tollgate_policy::Policy;

use crate::error::ProxyError;
use crate::state::{AppState, Server, Upstream};
use crate::upstream::describe;

/// JSON answers up to this size are read whole before relaying.
const WHOLE_BODY_LIMIT: u64 = 1 << 20;

/// Session id header of the handshake era.
pub const SESSION_HEADER: &str = "mcp-session-id";

/// Request headers a client may send that are forwarded as they are. Everything
/// else (credentials above all) stays on this side.
const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
];

/// Response headers relayed to the client.
const RELAYED_RESPONSE_HEADERS: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::RETRY_AFTER,
];

/// A failed upstream exchange, before any answer arrived.
#[derive(Debug)]
pub enum UpstreamFailure {
    /// Connecting or sending failed.
    Unreachable(String),
    /// No response headers within the server's timeout.
    Timeout(Duration),
}

impl UpstreamFailure {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamFailure::Unreachable(_) => "unreachable",
            UpstreamFailure::Timeout(_) => "timeout",
        }
    }

    /// The client-facing error, naming the server and what to check.
    pub fn into_error(self, server: &Server, id: Option<Value>) -> ProxyError {
        let message = match self {
            UpstreamFailure::Unreachable(why) => format!(
                "upstream `{}` ({}) could not be reached: {why}; check that it is running and that {} is right",
                server.name,
                server.location,
                server.location_key()
            ),
            UpstreamFailure::Timeout(after) => format!(
                "upstream `{}` ({}) did not answer within {}s (servers.{}.timeout)",
                server.name,
                server.location,
                after.as_secs_f64(),
                server.name
            ),
        };
        ProxyError::Upstream { id, message }
    }
}

/// Sends one request upstream and waits (at most the server's timeout) for its headers.
pub async fn send(
    app: &AppState,
    server: &Server,
    method: Method,
    upstream_session: Option<&str>,
    client_headers: &HeaderMap,
    body: Option<Vec<u8>>,
) -> Result<reqwest::Response, UpstreamFailure> {
    let url = match &server.upstream {
        Upstream::Http(url) => url,
        Upstream::Bridged(bridge) => {
            let mut headers = HeaderMap::new();
            if let Some(session) = upstream_session.and_then(|s| HeaderValue::from_str(s).ok()) {
                headers.insert(SESSION_HEADER, session);
            }
            let answer = bridge.handle(method, &headers, body);
            return match tokio::time::timeout(server.timeout, answer).await {
                Ok(answer) => Ok(reqwest::Response::from(answer)),
                Err(_) => Err(UpstreamFailure::Timeout(server.timeout)),
            };
        }
    };
    let mut request = app.http.request(method.clone(), url.clone());
    let accept = if method == Method::GET {
        "text/event-stream"
    } else {
        "application/json, text/event-stream"
    };
    request = request.header(header::ACCEPT, accept);
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(value) = client_headers.get(*name) {
            request = request.header(*name, value);
        }
    }
    // `Mcp-Param-*` mirror tool arguments for the upstream to check; forward them untouched.
    for (name, value) in client_headers {
        if name.as_str().starts_with("mcp-param-") {
            request = request.header(name, value);
        }
    }
    if let Some(session) = upstream_session {
        request = request.header(SESSION_HEADER, session);
    }
    request = request.headers(server.headers.clone());
    if let Some(body) = body {
        request = request
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    match tokio::time::timeout(server.timeout, request.send()).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(err)) if err.is_timeout() => Err(UpstreamFailure::Timeout(server.timeout)),
        Ok(Err(err)) => Err(UpstreamFailure::Unreachable(describe(&err))),
        Err(_) => Err(UpstreamFailure::Timeout(server.timeout)),
    }
}

/// The JSON-RPC answer in an upstream response (JSON, or the first answer in an
/// SSE stream), read within the server's timeout; `None` if there is none.
pub async fn read_answer(server: &Server, response: reqwest::Response) -> Option<Value> {
    let read = async {
        if !is_event_stream(response.headers()) {
            let bytes = response.bytes().await.ok()?;
            return serde_json::from_slice::<Value>(&bytes).ok();
        }
        let mut stream = Box::pin(events(response.bytes_stream()));
        while let Some(Ok(event)) = stream.next().await {
            if let Ok(message) = serde_json::from_str::<Value>(&event.data)
                && message.get("method").is_none()
                && message.get("id").is_some()
            {
                return Some(message);
            }
        }
        None
    };
    tokio::time::timeout(server.timeout, read)
        .await
        .ok()
        .flatten()
}

/// What to do to an answer on its way back.
#[derive(Clone)]
pub enum Rewrite {
    /// Stream it through untouched.
    None,
    /// Remove tools the policy denies outright from every `tools/list` result in it.
    FilterTools {
        /// The policy in force when the request was evaluated.
        policy: Arc<Policy>,
        /// The authenticated client, for rules scoped to clients.
        client: Option<Arc<str>>,
    },
}

/// Whether a response is an SSE stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Relays an upstream response to the client, applying `rewrite`.
pub async fn relay(
    server: &Server,
    upstream: reqwest::Response,
    rewrite: Rewrite,
    id: Option<Value>,
) -> Result<Response, ProxyError> {
    let status = upstream.status();
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY));
    for name in RELAYED_RESPONSE_HEADERS {
        if let Some(value) = upstream.headers().get(name) {
            builder = builder.header(name, value);
        }
    }
    let sse = is_event_stream(upstream.headers());
    if sse {
        builder = builder.header("x-accel-buffering", HeaderValue::from_static("no"));
    }
    let body = match (&rewrite, sse) {
        (Rewrite::None, true) => Body::from_stream(upstream.bytes_stream()),
        // A small JSON answer of known length is read whole: one write downstream, with a
        // Content-Length, instead of a chunked stream.
        (Rewrite::None, false)
            if upstream
                .content_length()
                .is_some_and(|n| n <= WHOLE_BODY_LIMIT) =>
        {
            match tokio::time::timeout(server.timeout, upstream.bytes()).await {
                Ok(Ok(bytes)) => Body::from(bytes),
                Ok(Err(err)) => {
                    return Err(UpstreamFailure::Unreachable(describe(&err)).into_error(server, id));
                }
                Err(_) => {
                    return Err(UpstreamFailure::Timeout(server.timeout).into_error(server, id));
                }
            }
        }
        (Rewrite::None, false) => {
            Body::from_stream(idle_timeout(upstream.bytes_stream(), server.timeout))
        }
        (Rewrite::FilterTools { policy, client }, true) => {
            let (policy, client) = (policy.clone(), client.clone());
            let stream = events(upstream.bytes_stream()).map(move |event| match event {
                Ok(mut event) => {
                    rewrite_event(&mut event, &policy, client.as_deref());
                    Ok(encode_event(&event))
                }
                Err(err) => Err(std::io::Error::other(err)),
            });
            Body::from_stream(stream)
        }
        (Rewrite::FilterTools { policy, client }, false) => {
            let bytes = match tokio::time::timeout(server.timeout, upstream.bytes()).await {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(err)) => {
                    return Err(UpstreamFailure::Unreachable(describe(&err)).into_error(server, id));
                }
                Err(_) => {
                    return Err(UpstreamFailure::Timeout(server.timeout).into_error(server, id));
                }
            };
            Body::from(rewrite_json(bytes, policy, client.as_deref()))
        }
    };
    builder.body(body).map_err(|e| ProxyError::Upstream {
        id: None,
        message: e.to_string(),
    })
}

/// Counts an open downstream SSE stream (`tollgate_streams_active`) for as long as
/// its body lives: the count drops when the stream ends or the client goes away.
struct OpenStream(AppState);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .metrics
            .open_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `stream`, counted as an open SSE stream while it lives.
pub fn counted<S: Stream + Send + 'static>(
    app: &AppState,
    stream: S,
) -> impl Stream<Item = S::Item> + Send + 'static {
    app.metrics
        .open_streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let guard = OpenStream(app.clone());
    stream.map(move |item| {
        let _alive = &guard;
        item
    })
}

/// Ends a body with an error when the upstream stalls for longer than `limit` between chunks.
fn idle_timeout(
    stream: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    limit: Duration,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    tokio_stream::StreamExt::timeout(stream, limit).map(|item| match item {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(err)) => Err(std::io::Error::other(err)),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "upstream stalled",
        )),
    })
}

/// Removes hidden tools from one JSON-RPC response (or each response of a batch).
/// Returns whether anything was removed.
pub fn filter_tools(message: &mut Value, policy: &Policy, client: Option<&str>) -> bool {
    if let Value::Array(items) = message {
        return items.iter_mut().fold(false, |changed, item| {
            filter_tools(item, policy, client) | changed
        });
    }
    let Some(tools) = message
        .pointer_mut("/result/tools")
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = tools.len();
    tools.retain(|tool| match tool.get("name").and_then(Value::as_str) {
        Some(name) => !policy.hides_tool(name, client),
        None => true,
    });
    tools.len() != before
}

fn rewrite_json(bytes: Bytes, policy: &Policy, client: Option<&str>) -> Bytes {
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return bytes;
    };
    if filter_tools(&mut value, policy, client) {
        serde_json::to_vec(&value).map(Bytes::from).unwrap_or(bytes)
    } else {
        bytes
    }
}

fn rewrite_event(event: &mut SseEvent, policy: &Policy, client: Option<&str>) {
    if !event.data.contains("\"tools\"") {
        return;
    }
    if let Ok(mut value) = serde_json::from_str::<Value>(&event.data)
        && filter_tools(&mut value, policy, client)
    {
        event.data = value.to_string();
    }
}
