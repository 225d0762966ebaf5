//! Upstreams that do not speak Streamable HTTP (stdio processes, legacy HTTP+SSE
//! servers), bridged behind the same [`Upstream`] interface.
//!
//! A [`Bridge`] answers as a Streamable HTTP server would (`initialize` opens a
//! session and names it, a request is answered with its message or a stream of
//! related messages ending with it, an unknown session is 404), so the core treats
//! every transport alike.
//!
//! Each handshake-era session gets its own connection (its own process for stdio),
//! so sessions are never shared between clients. Stateless-era requests share one
//! process, but only after the server proved with `server/discover` that it speaks
//! that era; on it, each request is owned by its client ([`channel`](super::channel)).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tollgate_mcp::{ErrorCode, STATELESS_PROTOCOL_VERSION, error_response, is_stateless_version};

use super::channel::{Channel, Closed, Exchange};
use super::{
    Body, Event, Failure, Json, Lane, Owner, Payload, Reply, Request, Upstream, legacy_sse, stdio,
};

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

/// How many processes a stdio upstream may run, and for how long one may sit idle.
#[derive(Debug, Clone, Copy)]
struct Processes {
    max: usize,
    idle: Duration,
}

/// A stdio or legacy SSE upstream behind the [`Upstream`] interface.
pub struct Bridge {
    server: Arc<str>,
    connector: Connector,
    http: reqwest::Client,
    children: Arc<stdio::Children>,
    timeout: Duration,
    sessions: Mutex<HashMap<String, Live>>,
    shared: tokio::sync::Mutex<Shared>,
    backoff: Mutex<Backoff>,
    processes: Option<Processes>,
    /// Connections being started, counted against the cap until they are live.
    starting: AtomicUsize,
    /// The stateless era's shared process, once ready, for counting.
    shared_live: Mutex<Option<Arc<Channel>>>,
}

/// A place under the process cap, held while a process starts.
struct Reservation<'a>(&'a AtomicUsize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Bridge {
    /// A bridge to `connector`; `children` tracks every process it starts; a
    /// request's answer must begin within `timeout`.
    pub fn new(
        server: Arc<str>,
        connector: Connector,
        http: reqwest::Client,
        children: Arc<stdio::Children>,
        timeout: Duration,
    ) -> Bridge {
        Bridge {
            server,
            connector,
            http,
            children,
            timeout,
            sessions: Mutex::new(HashMap::new()),
            shared: tokio::sync::Mutex::new(Shared::Unknown),
            backoff: Mutex::new(Backoff::default()),
            processes: None,
            starting: AtomicUsize::new(0),
            shared_live: Mutex::new(None),
        }
    }

    /// At most `max` processes at once (`servers.<n>.max_processes`); a session's
    /// process unused for `idle` is ended by the sweep (`servers.<n>.idle`).
    pub fn with_processes(mut self, max: usize, idle: Duration) -> Bridge {
        self.processes = Some(Processes { max, idle });
        self
    }

    /// The live sessions (processes or connections) of this upstream.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// The live processes or connections: one per session, and the shared one.
    fn live(&self, sessions: &HashMap<String, Live>) -> usize {
        let shared = self
            .shared_live
            .lock()
            .as_ref()
            .is_some_and(|channel| channel.closed().is_none());
        sessions.len() + usize::from(shared)
    }

    /// A place for one more process under `servers.<n>.max_processes`; at the cap,
    /// dead and idle sessions are ended first to make room.
    fn reserve(&self) -> Result<Option<Reservation<'_>>, Failure> {
        let Some(Processes { max, idle }) = self.processes else {
            return Ok(None);
        };
        let mut sessions = self.sessions.lock();
        let count = |sessions: &HashMap<String, Live>| {
            self.live(sessions) + self.starting.load(Ordering::SeqCst)
        };
        if count(&sessions) >= max {
            self.end_idle(&mut sessions, idle);
        }
        if count(&sessions) >= max {
            tracing::warn!(server = %self.server, max, "stdio upstream at its process cap");
            return Err(Failure::AtCapacity(format!(
                "already runs {max} processes, the most servers.{}.max_processes allows; \
                 end unused sessions (DELETE) or raise servers.{}.max_processes",
                self.server, self.server
            )));
        }
        // Under the sessions lock, so that two starts cannot both take the last place.
        self.starting.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Reservation(&self.starting)))
    }

    /// Ends dead sessions and those no request has used for `idle`.
    fn end_idle(&self, sessions: &mut HashMap<String, Live>, idle: Duration) {
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

    fn session(&self, id: &str) -> Option<Arc<Channel>> {
        let mut sessions = self.sessions.lock();
        let live = sessions.get_mut(id)?;
        if live.channel.closed().is_some() {
            // The process died or the connection dropped: the session is gone.
            sessions.remove(id);
            return None;
        }
        live.last_used = Instant::now();
        Some(live.channel.clone())
    }

    async fn post(&self, request: Request<'_>) -> Result<Reply, Failure> {
        // The channel renumbers requests, so it sends values, never the client's bytes.
        let payload = request.payload.parsed();
        let channel = match (request.session, payload) {
            (Some(id), _) => match self.session(id) {
                Some(channel) => channel,
                None => return Ok(not_found()),
            },
            (None, Payload::One(message))
                if message.get("method").and_then(Value::as_str) == Some("initialize") =>
            {
                return self.open_session(message.clone(), request.owner).await;
            }
            (None, _) => match self.shared_channel().await? {
                Ok(channel) => channel,
                Err(refusal) => return Ok(refusal),
            },
        };
        match payload {
            Payload::Batch(batch) => self.batch(&channel, batch, request.owner).await,
            Payload::One(message) if is_request(message) => {
                let exchange = channel
                    .request(message.clone(), request.owner)
                    .await
                    .map_err(|closed| self.unsent(&closed))?;
                self.answer(exchange).await
            }
            Payload::One(message) => self.notify(&channel, message, request.owner).await,
            // `parsed` left no bytes; were there any, their value is what is sent.
            Payload::Verbatim(message, _) => {
                self.notify(&channel, message.as_value(), request.owner)
                    .await
            }
        }
    }

    /// Sends a notification or a response; the channel answers nothing.
    async fn notify(
        &self,
        channel: &Channel,
        message: &Value,
        owner: &Owner,
    ) -> Result<Reply, Failure> {
        match channel.send(message.clone(), owner).await {
            Ok(()) => Ok(Reply::new(StatusCode::ACCEPTED, Body::Empty)),
            Err(_) => Ok(not_found()),
        }
    }

    /// Starts a connection (a process, for stdio), waiting out the restart backoff.
    async fn connect(&self) -> Result<Channel, Failure> {
        let wait = self
            .backoff
            .lock()
            .not_before
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
        connected.map_err(|why| {
            self.failed_to_start();
            Failure::Unreachable(why)
        })
    }

    fn failed_to_start(&self) {
        let mut backoff = self.backoff.lock();
        backoff.failures = backoff.failures.saturating_add(1);
        let wait = Duration::from_millis(100)
            .saturating_mul(1 << backoff.failures.min(9))
            .min(MAX_BACKOFF);
        backoff.not_before = Some(Instant::now() + wait);
    }

    fn started(&self) {
        *self.backoff.lock() = Backoff::default();
    }

    /// `initialize`: a new connection, and a session if the server accepts.
    async fn open_session(&self, message: Value, owner: &Owner) -> Result<Reply, Failure> {
        let reservation = self.reserve()?;
        let channel = self.connect().await?;
        let answer = match channel.request(message, owner).await {
            Ok(exchange) => final_answer(exchange).await,
            Err(closed) => Err(closed),
        };
        let answer = answer.map_err(|closed| {
            self.failed_to_start();
            Failure::Broken(format!("{closed} before answering `initialize`"))
        })?;
        if answer.get("result").is_none() {
            // The server refused the handshake; the connection is of no further use.
            return Ok(Reply::new(StatusCode::OK, Body::Json(Json::Value(answer))));
        }
        self.started();
        let session_id = crate::store::sessions::random_id();
        self.sessions.lock().insert(
            session_id.clone(),
            Live {
                channel: Arc::new(channel),
                last_used: Instant::now(),
            },
        );
        // Counted as a session now.
        drop(reservation);
        let mut reply = Reply::new(StatusCode::OK, Body::Json(Json::Value(answer)));
        reply.session = Some(session_id);
        Ok(reply)
    }

    /// The process shared by stateless-era requests, started and probed on first
    /// use; `Ok(Err(refusal))` when the server speaks only the handshake era.
    async fn shared_channel(&self) -> Result<Result<Arc<Channel>, Reply>, Failure> {
        let mut shared = self.shared.lock().await;
        match &*shared {
            Shared::Ready(channel) if channel.closed().is_none() => return Ok(Ok(channel.clone())),
            Shared::HandshakeOnly => return Ok(Err(self.handshake_only())),
            _ => {}
        }
        if matches!(self.connector, Connector::LegacySse(_)) {
            // HTTP+SSE predates the stateless era.
            *shared = Shared::HandshakeOnly;
            return Ok(Err(self.handshake_only()));
        }
        let reservation = self.reserve()?;
        let channel = self.connect().await?;
        let probe = json!({
            "jsonrpc": "2.0",
            "id": "tollgate-probe",
            "method": "server/discover",
            "params": { "_meta": {
                "io.modelcontextprotocol/protocolVersion": STATELESS_PROTOCOL_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            }},
        });
        let prober = Owner {
            client: "tollgate".into(),
            session: None,
        };
        let answer = match channel.request(probe, &prober).await {
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
            *self.shared_live.lock() = Some(channel.clone());
            drop(reservation);
            Ok(Ok(channel))
        } else {
            tracing::info!(server = %self.server, "the stdio upstream does not speak the stateless era; clients must initialize");
            *shared = Shared::HandshakeOnly;
            Ok(Err(self.handshake_only()))
        }
    }

    fn handshake_only(&self) -> Reply {
        let message = format!(
            "Bad Request: upstream `{}` speaks only the initialize handshake era; send `initialize` first",
            self.server
        );
        json_reply(
            StatusCode::BAD_REQUEST,
            error_response(None, ErrorCode::InvalidRequest, &message, None),
        )
    }

    /// A request's answer: its message when it comes first, else a stream of the
    /// related messages followed by it.
    async fn answer(&self, mut exchange: Exchange) -> Result<Reply, Failure> {
        let id = exchange.original_id.clone();
        match exchange.messages.recv().await {
            Some(first) if is_answer_to(&first, &id) => {
                Ok(Reply::new(StatusCode::OK, Body::Json(Json::Value(first))))
            }
            Some(first) => Ok(Reply::new(
                StatusCode::OK,
                Body::Events(exchange_events(first, exchange)),
            )),
            None => {
                let closed = exchange.closed();
                Err(self.lost(&closed))
            }
        }
    }

    /// The connection ended before a request could be sent.
    fn unsent(&self, closed: &Closed) -> Failure {
        self.forget_dead();
        Failure::Unreachable(format!(
            "{closed}; the next request starts a new upstream session"
        ))
    }

    /// The connection ended under a request: its session is gone.
    fn lost(&self, closed: &Closed) -> Failure {
        self.forget_dead();
        Failure::Broken(format!(
            "{closed} before answering; the next request starts a new upstream session"
        ))
    }

    fn forget_dead(&self) {
        self.sessions
            .lock()
            .retain(|_, live| live.channel.closed().is_none());
    }

    /// A JSON-RPC batch: each request answered in turn, one JSON array back.
    async fn batch(
        &self,
        channel: &Channel,
        batch: &[Value],
        owner: &Owner,
    ) -> Result<Reply, Failure> {
        let mut answers = Vec::new();
        for message in batch {
            if is_request(message) {
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                let answer = match channel.request(message.clone(), owner).await {
                    Ok(exchange) => final_answer(exchange).await,
                    Err(closed) => Err(closed),
                };
                answers.push(answer.unwrap_or_else(|closed| {
                    error_response(
                        Some(&id),
                        ErrorCode::InternalError,
                        &format!("upstream `{}`: {closed}", self.server),
                        None,
                    )
                }));
            } else if channel.send(message.clone(), owner).await.is_err() {
                break;
            }
        }
        Ok(if answers.is_empty() {
            Reply::new(StatusCode::ACCEPTED, Body::Empty)
        } else {
            json_reply(StatusCode::OK, Value::Array(answers))
        })
    }
}

impl Upstream for Bridge {
    fn send<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.post(request)).await {
                Ok(reply) => reply,
                Err(_) => Err(Failure::Timeout(self.timeout)),
            }
        })
    }

    fn listen<'a>(
        &'a self,
        _lane: Lane,
        session: Option<&'a str>,
        _headers: &'a [(HeaderName, HeaderValue)],
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            Ok(match session.and_then(|id| self.session(id)) {
                Some(channel) => {
                    let messages = tokio_stream::wrappers::ReceiverStream::new(channel.listen());
                    let events = messages.map(|message| Ok(Event::message(message)));
                    Reply::new(StatusCode::OK, Body::Events(events.boxed()))
                }
                None => not_found(),
            })
        })
    }

    fn end<'a>(&'a self, _lane: Lane, session: &'a str) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            if self.sessions.lock().remove(session).is_some() {
                tracing::debug!(server = %self.server, "upstream session ended");
            }
            Ok(())
        })
    }

    fn live_sessions(&self) -> Option<usize> {
        Some(self.session_count())
    }

    fn live_processes(&self) -> Option<usize> {
        match self.connector {
            Connector::Stdio(_) => Some(self.live(&self.sessions.lock())),
            Connector::LegacySse(_) => None,
        }
    }

    /// Ends sessions no request has used for `idle` (clients that vanished without
    /// ending their session; a stdio upstream's own `servers.<n>.idle` when it has
    /// one), and forgets dead ones: their processes must not linger.
    fn sweep(&self, idle: Duration) {
        let idle = self.processes.map_or(idle, |p| p.idle);
        self.end_idle(&mut self.sessions.lock(), idle);
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.sessions.lock().clear();
            *self.shared_live.lock() = None;
            *self.shared.lock().await = Shared::Unknown;
        })
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

fn json_reply(status: StatusCode, value: Value) -> Reply {
    Reply::new(status, Body::Json(Json::Value(value)))
}

fn not_found() -> Reply {
    json_reply(
        StatusCode::NOT_FOUND,
        error_response(
            None,
            ErrorCode::InvalidRequest,
            "Not Found: unknown or expired session",
            None,
        ),
    )
}

/// A request's messages after `first`, ending with its answer, or with an error
/// when the connection ends before it.
fn exchange_events(first: Value, exchange: Exchange) -> super::EventStream {
    struct State {
        first: Option<Value>,
        exchange: Exchange,
        done: bool,
    }
    let state = State {
        first: Some(first),
        exchange,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let next = match state.first.take() {
            Some(message) => Some(message),
            None => state.exchange.messages.recv().await,
        };
        let item = match next {
            Some(message) => {
                state.done = is_answer_to(&message, &state.exchange.original_id);
                Ok(Event::message(message))
            }
            None => {
                state.done = true;
                Err(Failure::Broken(format!(
                    "{} before answering",
                    state.exchange.closed()
                )))
            }
        };
        Some((item, state))
    })
    .boxed()
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
            Duration::from_secs(20),
        )
    }

    /// Status, session and answer (or the failure's text as `error.message`).
    async fn post(
        bridge: &Bridge,
        session: Option<&str>,
        body: Value,
    ) -> (StatusCode, Option<String>, Value) {
        let owner = Owner {
            client: "client:test".into(),
            session: None,
        };
        let request = Request {
            payload: Payload::One(&body),
            session,
            protocol_version: None,
            headers: &[],
            owner: &owner,
            lane: Lane::FIRST,
        };
        match bridge.send(request).await {
            Ok(reply) => {
                let value = match reply.body {
                    Body::Json(json) => json.into_value().unwrap(),
                    _ => Value::Null,
                };
                (reply.status, reply.session, value)
            }
            Err(failure) => (
                StatusCode::BAD_GATEWAY,
                None,
                json!({"error": {"message": failure.to_string()}}),
            ),
        }
    }

    async fn initialize(bridge: &Bridge) -> String {
        let (status, session, answer) = post(
            bridge,
            None,
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        session.unwrap()
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
        bridge.end(Lane::FIRST, &a).await.unwrap();
        assert_eq!(bridge.session_count(), 1);
        // An idle session is ended by the sweep; a busy one would not be.
        bridge.sweep(Duration::ZERO);
        assert_eq!(bridge.session_count(), 0);
    }

    #[tokio::test]
    async fn the_process_cap_refuses_a_start_until_an_idle_process_can_be_ended() {
        let bridge = bridge().with_processes(2, Duration::from_secs(600));
        initialize(&bridge).await;
        initialize(&bridge).await;
        assert_eq!(bridge.live_processes(), Some(2));
        let (status, _, answer) = post(
            &bridge,
            None,
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("servers.py.max_processes"), "{message}");
        assert_eq!(bridge.live_processes(), Some(2));
        // At the cap, sessions idle longer than `idle` make room.
        let bridge = bridge.with_processes(2, Duration::ZERO);
        initialize(&bridge).await;
        assert_eq!(bridge.live_processes(), Some(1));
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
        assert_eq!(status, StatusCode::BAD_GATEWAY);
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
