//! Upstreams that do not speak Streamable HTTP (stdio processes, legacy HTTP+SSE
//! servers), bridged so that the rest of the proxy sees one.
//!
//! A [`Bridge`] answers in-process requests exactly as a Streamable HTTP server
//! would (`initialize` opens a session and returns `Mcp-Session-Id`, POST answers
//! with JSON or an SSE stream, GET streams server messages, DELETE ends the
//! session, an unknown session is 404). Enforcement, filtering, audit and session
//! mapping therefore stay in one place and work the same for every transport.
//!
//! Each handshake-era session gets its own connection (its own process for stdio),
//! so sessions are never shared between clients. Stateless-era requests share one
//! process, but only after the server proved with `server/discover` that it speaks
//! that era.

pub mod channel;
pub mod legacy_sse;
pub mod stdio;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use bytes::Bytes;
use serde_json::{Value, json};
use tollgate_mcp::{STATELESS_PROTOCOL_VERSION, is_stateless_version};

use channel::{Channel, Closed, Exchange};

/// A reqwest error's root cause: its top-level message is generic.
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text = cause.to_string();
        source = cause.source();
    }
    text
}

/// Session id header of the handshake era.
const SESSION_HEADER: &str = "mcp-session-id";

/// Keep-alive comment interval on SSE answers.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The longest wait between restarts of an upstream that keeps failing to start.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How to reach the upstream.
pub enum Connector {
    /// Spawn a process per session.
    Stdio(stdio::Command),
    /// Open a legacy HTTP+SSE connection per session.
    LegacySse(legacy_sse::Target),
}

/// What the stateless era shares.
enum Shared {
    /// Not asked yet.
    Unknown,
    /// The server answered `server/discover` as a handshake-era server would.
    HandshakeOnly,
    /// A process that speaks the stateless era.
    Ready(Arc<Channel>),
}

/// Consecutive failures to start, and when the next attempt may begin.
#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

/// One session's connection, and when a request last used it.
struct Live {
    channel: Arc<Channel>,
    last_used: Instant,
}

/// A Streamable HTTP face on a stdio or legacy SSE upstream.
pub struct Bridge {
    server: Arc<str>,
    connector: Connector,
    http: reqwest::Client,
    children: Arc<stdio::Children>,
    sessions: Mutex<HashMap<String, Live>>,
    shared: tokio::sync::Mutex<Shared>,
    backoff: Mutex<Backoff>,
}

/// An answer in the shape of an HTTP response from an upstream.
pub type Answer = http::Response<reqwest::Body>;

impl Bridge {
    /// A bridge to `connector`; `children` tracks every process it starts.
    pub fn new(
        server: Arc<str>,
        connector: Connector,
        http: reqwest::Client,
        children: Arc<stdio::Children>,
    ) -> Bridge {
        Bridge {
            server,
            connector,
            http,
            children,
            sessions: Mutex::new(HashMap::new()),
            shared: tokio::sync::Mutex::new(Shared::Unknown),
            backoff: Mutex::new(Backoff::default()),
        }
    }

    /// Where the upstream is, for messages: the command line or the URL.
    pub fn location(&self) -> String {
        match &self.connector {
            Connector::Stdio(command) => command.display(),
            Connector::LegacySse(target) => target.url.to_string(),
        }
    }

    /// The live sessions (processes or connections) of this upstream.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Ends every session and the shared process.
    pub async fn shutdown(&self) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.clear();
        }
        *self.shared.lock().await = Shared::Unknown;
    }

    /// Answers one request as a Streamable HTTP server would.
    pub async fn handle(
        &self,
        method: Method,
        headers: &HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let session_id = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match method {
            Method::POST => self.post(session_id, &body.unwrap_or_default()).await,
            Method::GET => match session_id.and_then(|id| self.session(&id)) {
                Some(channel) => stream_answer(
                    None,
                    Source::Listener(channel.listen()),
                    self.server.clone(),
                ),
                None => not_found(),
            },
            Method::DELETE => {
                let removed = session_id.and_then(|id| self.sessions.lock().ok()?.remove(&id));
                match removed {
                    Some(_) => {
                        tracing::debug!(server = %self.server, "upstream session ended");
                        plain(StatusCode::OK, Bytes::new())
                    }
                    None => not_found(),
                }
            }
            _ => plain(StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
        }
    }

    fn session(&self, id: &str) -> Option<Arc<Channel>> {
        let mut sessions = self.sessions.lock().ok()?;
        let live = sessions.get_mut(id)?;
        if live.channel.closed().is_some() {
            // The process died or the connection dropped: the session is gone.
            sessions.remove(id);
            return None;
        }
        live.last_used = Instant::now();
        Some(live.channel.clone())
    }

    /// Ends sessions no request has used for `idle` (clients that vanished without
    /// ending their session), and forgets dead ones: their processes must not linger.
    pub fn sweep(&self, idle: Duration) {
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        let before = sessions.len();
        sessions.retain(|_, live| {
            live.channel.closed().is_none()
                && (live.channel.busy() || live.last_used.elapsed() < idle)
        });
        let ended = before - sessions.len();
        if ended > 0 {
            tracing::info!(server = %self.server, ended, "ended idle or dead upstream sessions");
        }
    }

    async fn post(&self, session_id: Option<String>, body: &[u8]) -> Answer {
        let Ok(message) = serde_json::from_slice::<Value>(body) else {
            return json_answer(
                StatusCode::BAD_REQUEST,
                &rpc_error(&Value::Null, -32700, "parse error"),
            );
        };
        let channel = match session_id {
            Some(id) => match self.session(&id) {
                Some(channel) => channel,
                None => return not_found(),
            },
            None if message.get("method").and_then(Value::as_str) == Some("initialize") => {
                return self.open_session(message).await;
            }
            None => match self.shared_channel().await {
                Ok(channel) => channel,
                Err(answer) => return answer,
            },
        };
        match message {
            Value::Array(batch) => self.batch(&channel, batch).await,
            message if is_request(&message) => {
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                match channel.request(message).await {
                    Ok(exchange) => self.answer(exchange).await,
                    Err(closed) => self.lost(&closed, id),
                }
            }
            message => match channel.send(message).await {
                Ok(()) => plain(StatusCode::ACCEPTED, Bytes::new()),
                Err(_) => not_found(),
            },
        }
    }

    /// Starts a connection (a process, for stdio), waiting out the restart backoff.
    async fn connect(&self) -> Result<Channel, String> {
        let wait = self
            .backoff
            .lock()
            .ok()
            .and_then(|b| b.not_before)
            .map(|at| at.saturating_duration_since(Instant::now()));
        if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            tracing::info!(server = %self.server, wait_ms = wait.as_millis() as u64, "waiting before restarting the upstream");
            tokio::time::sleep(wait).await;
        }
        let connected = match &self.connector {
            Connector::Stdio(command) => {
                stdio::spawn(command, &self.children).map_err(|e| e.to_string())
            }
            Connector::LegacySse(target) => legacy_sse::connect(&self.http, target)
                .await
                .map_err(|e| e.to_string()),
        };
        if connected.is_err() {
            self.failed_to_start();
        }
        connected
    }

    fn failed_to_start(&self) {
        if let Ok(mut backoff) = self.backoff.lock() {
            backoff.failures = backoff.failures.saturating_add(1);
            let wait = Duration::from_millis(100)
                .saturating_mul(1 << backoff.failures.min(9))
                .min(MAX_BACKOFF);
            backoff.not_before = Some(Instant::now() + wait);
        }
    }

    fn started(&self) {
        if let Ok(mut backoff) = self.backoff.lock() {
            *backoff = Backoff::default();
        }
    }

    /// `initialize`: a new connection, and a session if the server accepts.
    async fn open_session(&self, message: Value) -> Answer {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let channel = match self.connect().await {
            Ok(channel) => channel,
            Err(why) => return self.error_answer(&id, &why),
        };
        let answer = match channel.request(message).await {
            Ok(exchange) => final_answer(exchange).await,
            Err(closed) => Err(closed),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(closed) => {
                self.failed_to_start();
                return self.error_answer(&id, &format!("{closed} before answering `initialize`"));
            }
        };
        if answer.get("result").is_none() {
            // The server refused the handshake; the connection is of no further use.
            return json_answer(StatusCode::OK, &answer);
        }
        self.started();
        let session_id = crate::session::random_id();
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                session_id.clone(),
                Live {
                    channel: Arc::new(channel),
                    last_used: Instant::now(),
                },
            );
        }
        let mut response = json_answer(StatusCode::OK, &answer);
        if let Ok(value) = HeaderValue::from_str(&session_id) {
            response.headers_mut().insert(SESSION_HEADER, value);
        }
        response
    }

    /// The process shared by stateless-era requests, started and probed on first use.
    async fn shared_channel(&self) -> Result<Arc<Channel>, Answer> {
        let mut shared = self.shared.lock().await;
        match &*shared {
            Shared::Ready(channel) if channel.closed().is_none() => return Ok(channel.clone()),
            Shared::HandshakeOnly => return Err(self.handshake_only()),
            _ => {}
        }
        if matches!(self.connector, Connector::LegacySse(_)) {
            // HTTP+SSE predates the stateless era.
            *shared = Shared::HandshakeOnly;
            return Err(self.handshake_only());
        }
        let channel = self
            .connect()
            .await
            .map_err(|why| self.error_answer(&Value::Null, &why))?;
        let probe = json!({
            "jsonrpc": "2.0",
            "id": "tollgate-probe",
            "method": "server/discover",
            "params": { "_meta": {
                "io.modelcontextprotocol/protocolVersion": STATELESS_PROTOCOL_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            }},
        });
        let answer = match channel.request(probe).await {
            Ok(exchange) => final_answer(exchange).await,
            Err(closed) => Err(closed),
        };
        let modern = answer.as_ref().is_ok_and(|answer| {
            answer
                .pointer("/result/supportedVersions")
                .and_then(Value::as_array)
                .is_some_and(|versions| {
                    versions
                        .iter()
                        .filter_map(Value::as_str)
                        .any(is_stateless_version)
                })
        });
        if modern {
            self.started();
            let channel = Arc::new(channel);
            *shared = Shared::Ready(channel.clone());
            Ok(channel)
        } else {
            tracing::info!(server = %self.server, "the stdio upstream does not speak the stateless era; clients must initialize");
            *shared = Shared::HandshakeOnly;
            Err(self.handshake_only())
        }
    }

    fn handshake_only(&self) -> Answer {
        json_answer(
            StatusCode::BAD_REQUEST,
            &rpc_error(
                &Value::Null,
                -32600,
                &format!(
                    "Bad Request: upstream `{}` speaks only the initialize handshake era; send `initialize` first",
                    self.server
                ),
            ),
        )
    }

    /// A request's answer: JSON when the answer comes first, else an SSE stream of
    /// the related messages followed by the answer.
    async fn answer(&self, mut exchange: Exchange) -> Answer {
        let id = exchange.original_id.clone();
        match exchange.messages.recv().await {
            Some(first) if is_answer_to(&first, &id) => json_answer(StatusCode::OK, &first),
            Some(first) => {
                stream_answer(Some(first), Source::Exchange(exchange), self.server.clone())
            }
            None => {
                let closed = exchange.closed();
                self.lost(&closed, id)
            }
        }
    }

    /// The connection ended under a request: its session is gone.
    fn lost(&self, closed: &Closed, id: Value) -> Answer {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|_, live| live.channel.closed().is_none());
        }
        self.error_answer(
            &id,
            &format!("{closed} before answering; the next request starts a new upstream session"),
        )
    }

    fn error_answer(&self, id: &Value, why: &str) -> Answer {
        let message = format!("upstream `{}` ({}): {why}", self.server, self.location());
        tracing::warn!(server = %self.server, error = %message, "upstream failed");
        json_answer(StatusCode::OK, &rpc_error(id, -32603, &message))
    }

    /// A JSON-RPC batch: each request answered in turn, one JSON array back.
    async fn batch(&self, channel: &Channel, batch: Vec<Value>) -> Answer {
        let mut answers = Vec::new();
        for message in batch {
            if is_request(&message) {
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                let answer = match channel.request(message).await {
                    Ok(exchange) => final_answer(exchange).await,
                    Err(closed) => Err(closed),
                };
                answers.push(answer.unwrap_or_else(|closed| {
                    rpc_error(
                        &id,
                        -32603,
                        &format!("upstream `{}`: {closed}", self.server),
                    )
                }));
            } else if channel.send(message).await.is_err() {
                break;
            }
        }
        if answers.is_empty() {
            plain(StatusCode::ACCEPTED, Bytes::new())
        } else {
            json_answer(StatusCode::OK, &Value::Array(answers))
        }
    }
}

fn is_request(message: &Value) -> bool {
    message.get("method").is_some() && message.get("id").is_some()
}

fn is_answer_to(message: &Value, id: &Value) -> bool {
    message.get("method").is_none() && message.get("id") == Some(id)
}

/// Waits for a request's answer, skipping the messages that come before it.
async fn final_answer(mut exchange: Exchange) -> Result<Value, Closed> {
    let id = exchange.original_id.clone();
    while let Some(message) = exchange.messages.recv().await {
        if is_answer_to(&message, &id) {
            return Ok(message);
        }
    }
    Err(exchange.closed())
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

fn plain(status: StatusCode, body: Bytes) -> Answer {
    let mut response = http::Response::new(reqwest::Body::from(body));
    *response.status_mut() = status;
    response
}

fn json_answer(status: StatusCode, value: &Value) -> Answer {
    let mut response = plain(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn not_found() -> Answer {
    json_answer(
        StatusCode::NOT_FOUND,
        &rpc_error(
            &Value::Null,
            -32600,
            "Not Found: unknown or expired session",
        ),
    )
}

fn sse_event(message: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {message}\n\n"))
}

/// Where an SSE answer's messages come from.
enum Source {
    /// A request: its related messages, then its answer, which ends the stream.
    Exchange(Exchange),
    /// A session's own server messages, until the session ends.
    Listener(tokio::sync::mpsc::Receiver<Value>),
}

impl Source {
    async fn recv(&mut self) -> Option<Value> {
        match self {
            Source::Exchange(exchange) => exchange.messages.recv().await,
            Source::Listener(messages) => messages.recv().await,
        }
    }
}

struct StreamState {
    first: Option<Value>,
    source: Source,
    server: Arc<str>,
    done: bool,
}

/// An SSE body of `source`'s messages, with a keep-alive comment after each quiet
/// interval so intermediaries keep the connection open.
fn stream_answer(first: Option<Value>, source: Source, server: Arc<str>) -> Answer {
    let state = StreamState {
        first,
        source,
        server,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let next = match state.first.take() {
            Some(message) => Some(message),
            None => tokio::select! {
                message = state.source.recv() => message,
                () = tokio::time::sleep(KEEP_ALIVE) => {
                    return Some((Ok::<_, std::io::Error>(Bytes::from_static(b": keep-alive\n\n")), state));
                }
            },
        };
        let event = match (next, &state.source) {
            (Some(message), Source::Exchange(exchange)) => {
                state.done = is_answer_to(&message, &exchange.original_id);
                sse_event(&message)
            }
            (Some(message), Source::Listener(_)) => sse_event(&message),
            // The connection ended before the answer: say so, as the answer.
            (None, Source::Exchange(exchange)) => {
                state.done = true;
                let why = format!(
                    "upstream `{}`: {} before answering",
                    state.server,
                    exchange.closed()
                );
                sse_event(&rpc_error(&exchange.original_id, -32603, &why))
            }
            (None, Source::Listener(_)) => return None,
        };
        Some((Ok(event), state))
    });
    let mut response = http::Response::new(reqwest::Body::wrap_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A minimal handshake-era stdio server: answers every request with its method,
    /// and exits with status 3 on `tools/call` of `crash`.
    const SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m or "method" not in m:
        continue
    if m["method"] == "tools/call" and m["params"]["name"] == "crash":
        sys.exit(3)
    if m["method"] == "server/discover":
        out = {"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": "unknown"}}
    else:
        out = {"jsonrpc": "2.0", "id": m["id"], "result": {"method": m["method"]}}
    print(json.dumps(out), flush=True)
"#;

    fn bridge() -> Bridge {
        let command = stdio::Command {
            server: "py".into(),
            argv: vec!["python3".into(), "-c".into(), SERVER.into()],
            env: Default::default(),
            inherit_env: Vec::new(),
            cwd: None,
            max_line: 1 << 20,
        };
        Bridge::new(
            "py".into(),
            Connector::Stdio(command),
            reqwest::Client::new(),
            Arc::new(stdio::Children::default()),
        )
    }

    async fn post(
        bridge: &Bridge,
        session: Option<&str>,
        body: Value,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut headers = HeaderMap::new();
        if let Some(session) = session {
            headers.insert(SESSION_HEADER, session.parse().unwrap());
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            bridge.handle(Method::POST, &headers, Some(body.to_string().into_bytes())),
        )
        .await
        .unwrap();
        let response = reqwest::Response::from(answer);
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    async fn initialize(bridge: &Bridge) -> String {
        let (status, headers, answer) = post(
            bridge,
            None,
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        headers[SESSION_HEADER].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn each_session_has_its_own_process_until_it_ends() {
        let bridge = bridge();
        let a = initialize(&bridge).await;
        let b = initialize(&bridge).await;
        assert_ne!(a, b);
        assert_eq!(bridge.session_count(), 2);
        let (_, _, answer) = post(
            &bridge,
            Some(&a),
            json!({"jsonrpc": "2.0", "id": "x", "method": "tools/list"}),
        )
        .await;
        assert_eq!(
            answer,
            json!({"jsonrpc": "2.0", "id": "x", "result": {"method": "tools/list"}})
        );
        let (status, _, _) = post(
            &bridge,
            Some("nope"),
            json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let mut headers = HeaderMap::new();
        headers.insert(SESSION_HEADER, a.parse().unwrap());
        let ended = bridge.handle(Method::DELETE, &headers, None).await;
        assert_eq!(ended.status(), StatusCode::OK);
        assert_eq!(bridge.session_count(), 1);
        // An idle session is ended by the sweep; a busy one would not be.
        bridge.sweep(Duration::ZERO);
        assert_eq!(bridge.session_count(), 0);
    }

    #[tokio::test]
    async fn a_crash_fails_the_call_and_loses_the_session() {
        let bridge = bridge();
        let session = initialize(&bridge).await;
        let (status, _, answer) = post(
            &bridge,
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "crash"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["id"], 5);
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("exit status: 3"), "{message}");
        let (status, _, _) = post(
            &bridge,
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 6, "method": "ping"}),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "the next request is told to re-initialize"
        );
    }

    #[tokio::test]
    async fn a_handshake_only_server_is_not_shared_by_the_stateless_era() {
        let bridge = bridge();
        let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                          "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let (status, _, answer) = post(&bridge, None, call).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("send `initialize` first")
        );
        assert_eq!(bridge.session_count(), 0);
    }
}
