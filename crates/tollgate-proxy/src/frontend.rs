//! Downstream transports that carry single messages rather than HTTP requests:
//! legacy HTTP+SSE (`/servers/<name>/sse`) and stdio (`tollgate stdio`).
//!
//! A [`Relay`] turns each message from such a client into an in-process Streamable
//! HTTP request through the same handler HTTP clients use, so the same guards,
//! sessions, policy, approvals and audit apply, and turns the answers (JSON or
//! SSE) back into messages for the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc};
use tollgate_mcp::{ErrorCode, Incoming, error_response, events, mirrored_headers};

use crate::forward::SESSION_HEADER;
use crate::state::{AppState, Server};

/// The client's request headers a relay keeps using: who it is and where it came from.
const CLIENT_HEADERS: &[header::HeaderName] =
    &[header::AUTHORIZATION, header::HOST, header::ORIGIN];

/// One client on a message transport, bound to one server.
pub struct Relay {
    app: AppState,
    server: Arc<Server>,
    headers: HeaderMap,
    peer: SocketAddr,
    session: Mutex<Option<HeaderValue>>,
    protocol_version: std::sync::Mutex<Option<HeaderValue>>,
    listening: AtomicBool,
    out: mpsc::Sender<Value>,
}

impl Relay {
    /// A relay for a client whose first request carried `client_headers`; the
    /// messages for the client are sent to `out`.
    pub fn new(
        app: AppState,
        server: Arc<Server>,
        client_headers: &HeaderMap,
        peer: SocketAddr,
        out: mpsc::Sender<Value>,
    ) -> Relay {
        let mut headers = HeaderMap::new();
        for name in CLIENT_HEADERS {
            if let Some(value) = client_headers.get(name) {
                headers.insert(name, value.clone());
            }
        }
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, HeaderValue::from_static("localhost"));
        }
        Relay {
            app,
            server,
            headers,
            peer,
            session: Mutex::new(None),
            protocol_version: std::sync::Mutex::new(None),
            listening: AtomicBool::new(false),
            out,
        }
    }

    /// The server this relay serves.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    fn request(&self, method: Method, session: Option<&HeaderValue>, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.headers_mut() = self.headers.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(session) = session {
            headers.insert(SESSION_HEADER, session.clone());
        }
        request.extensions_mut().insert(ConnectInfo(self.peer));
        request
    }

    async fn call(&self, request: Request<Body>) -> Response {
        crate::http::serve(self.app.clone(), self.server.clone(), request).await
    }

    /// Handles one body from the client (a message or a batch). Answers go to `out`.
    pub async fn handle(self: &Arc<Self>, body: Bytes) {
        let parsed = Incoming::parse(&body).ok();
        let ids: Vec<Value> = match &parsed {
            Some(Incoming::Single(message)) => message.id().cloned().into_iter().collect(),
            Some(Incoming::Batch(messages)) => {
                messages.iter().filter_map(|m| m.id().cloned()).collect()
            }
            None => Vec::new(),
        };
        let initialize =
            matches!(&parsed, Some(Incoming::Single(m)) if m.method() == Some("initialize"));
        // The session lock is held from sending `initialize` until its answer is in,
        // so nothing the client sends next can overtake the handshake.
        let mut session = self.session.lock().await;
        let mut request = self.request(Method::POST, session.as_ref(), Body::from(body));
        if let Some(Incoming::Single(message)) = &parsed {
            let mirrored = mirrored_headers(message);
            let headers = request.headers_mut();
            for (name, value) in mirrored {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            if !headers.contains_key("mcp-protocol-version")
                && let Some(version) = self.protocol_version.lock().ok().and_then(|v| v.clone())
            {
                headers.insert("mcp-protocol-version", version);
            }
        }
        if !initialize {
            drop(session);
            let response = self.call(request).await;
            self.deliver(response, &ids).await;
            return;
        }
        let response = self.call(request).await;
        if let Some(id) = response.headers().get(SESSION_HEADER) {
            *session = Some(id.clone());
        }
        let answers = self.read(response, &ids, true).await;
        drop(session);
        for answer in answers {
            if let Some(version) = answer
                .pointer("/result/protocolVersion")
                .and_then(Value::as_str)
                .and_then(|v| HeaderValue::from_str(v).ok())
                && let Ok(mut slot) = self.protocol_version.lock()
            {
                *slot = Some(version);
            }
            let _ = self.out.send(answer).await;
        }
        self.listen().await;
    }

    /// Opens the session's server-to-client stream once, after the handshake.
    async fn listen(self: &Arc<Self>) {
        let Some(session) = self.session.lock().await.clone() else {
            return;
        };
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let relay = self.clone();
        tokio::spawn(async move {
            let mut request = relay.request(Method::GET, Some(&session), Body::empty());
            request.headers_mut().insert(
                header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
            if let Some(version) = relay.protocol_version.lock().ok().and_then(|v| v.clone()) {
                request
                    .headers_mut()
                    .insert("mcp-protocol-version", version);
            }
            let response = relay.call(request).await;
            if response.status().is_success() {
                relay.deliver(response, &[]).await;
            }
            // No GET stream (405) is fine: the upstream then only answers requests.
        });
    }

    /// Ends the session (as DELETE), e.g. when the client's stream closes.
    pub async fn close(&self) {
        let Some(session) = self.session.lock().await.take() else {
            return;
        };
        let _ = self
            .call(self.request(Method::DELETE, Some(&session), Body::empty()))
            .await;
    }

    async fn deliver(&self, response: Response, ids: &[Value]) {
        for answer in self.read(response, ids, false).await {
            if self.out.send(answer).await.is_err() {
                return;
            }
        }
    }

    /// The messages in an answer: a JSON body, each event of an SSE body (sent on
    /// as they arrive unless `collect`), or an error for each request when the
    /// answer is neither.
    async fn read(&self, response: Response, ids: &[Value], collect: bool) -> Vec<Value> {
        let status = response.status();
        if status == StatusCode::ACCEPTED {
            return Vec::new();
        }
        if crate::forward::is_event_stream(response.headers()) {
            let mut stream = Box::pin(events(response.into_body().into_data_stream()));
            let mut collected = Vec::new();
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { break };
                let Ok(message) = serde_json::from_str::<Value>(&event.data) else {
                    continue;
                };
                if collect {
                    collected.push(message);
                } else if self.out.send(message).await.is_err() {
                    break;
                }
            }
            return collected;
        }
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Array(items)) => items,
            Ok(message @ Value::Object(_)) if message.get("jsonrpc").is_some() => {
                // Tollgate's own refusals carry no id when it could not know it.
                vec![with_id(message, ids)]
            }
            _ => ids
                .iter()
                .map(|id| {
                    let text = String::from_utf8_lossy(&body);
                    error_response(
                        Some(id),
                        ErrorCode::InternalError,
                        &format!("request failed with HTTP {status}: {}", text.trim()),
                        None,
                    )
                })
                .collect(),
        }
    }
}

/// An error without an id answers the one request that was sent, when there was one.
fn with_id(mut message: Value, ids: &[Value]) -> Value {
    if let [id] = ids
        && message.get("id").is_some_and(Value::is_null)
        && message.get("error").is_some()
        && let Some(slot) = message.get_mut("id")
    {
        *slot = id.clone();
    }
    message
}
