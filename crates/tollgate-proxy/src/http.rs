//! The downstream side: the axum router, guards, sessions and dispatch.
//!
//! Stages of a POST, in order: guard (Host, Origin) → authenticate → client rate →
//! read body → decode → check routing headers → session → evaluate → audit →
//! forward. Each stage either passes the request on or answers through
//! [`ProxyError`], so every refusal is shaped in one place.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::Value;
use tollgate_mcp::{Era, Incoming, Kind, Message, RoutingHeaders, era_of};

use crate::enforce::{Caller, Verdict, enforce, record_outcome};
use crate::error::ProxyError;
use crate::forward::{Rewrite, SESSION_HEADER, relay, send};
use crate::hold::{HoldContext, OWN_REQUEST_PREFIX, hold};
use crate::session::Session;
use crate::state::{AppState, Server};

/// The proxy's router: `/servers/<name>/mcp` (Streamable HTTP) and
/// `/servers/<name>/sse` (legacy HTTP+SSE) for each server, and `/mcp`, `/sse`
/// when there is one.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mcp", any(single_server))
        .route("/servers/{name}/mcp", any(named_server))
        .route("/sse", get(crate::legacy::single_stream))
        .route("/messages", post(crate::legacy::single_message))
        .route("/servers/{name}/sse", get(crate::legacy::named_stream))
        .route(
            "/servers/{name}/messages",
            post(crate::legacy::named_message),
        )
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// DNS-rebinding and cross-origin protection, before anything else is read.
async fn guard(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if let Err(err) = check_host_and_origin(&app, request.headers()) {
        tracing::warn!(error = %err, "request refused");
        return err.into_response();
    }
    next.run(request).await
}

fn check_host_and_origin(app: &AppState, headers: &HeaderMap) -> Result<(), ProxyError> {
    check_request_source(app, app.loopback, false, headers)
}

/// DNS-rebinding and cross-origin checks. On a loopback listener the `Host` must be
/// a loopback name or in `allowed_hosts`; an `Origin` must be in `allowed_origins`,
/// or, on a loopback listener, name a loopback host (a rebound page's Origin names
/// the attacker's host, never a loopback one), or, when `same_origin_ok` (the admin
/// page calling its own API), name the listener itself.
pub(crate) fn check_request_source(
    app: &AppState,
    loopback_listener: bool,
    same_origin_ok: bool,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    let is_loopback = |name: &str| {
        name.eq_ignore_ascii_case("localhost")
            || matches!(name, "[::1]" | "::1")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if loopback_listener {
        let name = host_name(host);
        if !is_loopback(name)
            && !app
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
        {
            return Err(ProxyError::MisdirectedHost(host.to_owned()));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let same_origin = same_origin_ok
            && !host.is_empty()
            && (origin == format!("http://{host}") || origin == format!("https://{host}"));
        let loopback_origin = loopback_listener
            && origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|authority| {
                    !authority.contains(['/', '@', '?', '#']) && is_loopback(host_name(authority))
                });
        if !same_origin && !loopback_origin && !app.allowed_origins.iter().any(|o| o == origin) {
            return Err(ProxyError::ForbiddenOrigin(origin.to_owned()));
        }
    }
    Ok(())
}

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            name
        } else {
            host
        }
    })
}

async fn single_server(State(app): State<AppState>, request: Request) -> Response {
    let server = match app.servers.len() {
        1 => app.servers.values().next().cloned(),
        _ => None,
    };
    match server {
        Some(server) => serve(app, server, request).await,
        None => ProxyError::AmbiguousServer.into_response(),
    }
}

async fn named_server(
    State(app): State<AppState>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    match app.servers.get(&name).cloned() {
        Some(server) => serve(app, server, request).await,
        None => unknown_server(&app, request.headers()).into_response(),
    }
}

/// A 404 for a server name that is not configured. Only an authenticated client
/// learns which names are: to anyone else the list would map the deployment.
pub(crate) fn unknown_server(app: &AppState, headers: &HeaderMap) -> ProxyError {
    if !app.clients.is_empty() && matches!(authenticate(app, headers), Ok(Some(_))) {
        let names: Vec<&str> = app.servers.keys().map(String::as_str).collect();
        return ProxyError::UnknownServerOf(names.join(", "));
    }
    ProxyError::UnknownServer
}

/// One downstream request against one server.
pub(crate) async fn serve(app: AppState, server: Arc<Server>, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
    let session_id = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let span = tracing::info_span!(
        "mcp",
        server = %server.name,
        session = session_id.as_deref().unwrap_or(""),
        client = tracing::field::Empty,
        tool = tracing::field::Empty,
    );
    let result = async {
        let client = authenticate(&app, request.headers())?;
        if let Some(client) = &client {
            tracing::Span::current().record("client", &**client);
        }
        check_client_rate(&app, client.as_deref(), peer)?;
        let ctx = Downstream {
            app: app.clone(),
            server,
            client,
            peer,
        };
        match *request.method() {
            Method::POST => ctx.post(request).await,
            Method::GET => ctx.get(request.headers()).await,
            Method::DELETE => ctx.delete(request.headers()).await,
            _ => Err(ProxyError::MethodNotAllowed),
        }
    };
    let result = tracing::Instrument::instrument(result, span).await;
    let response = result.unwrap_or_else(|err| {
        tracing::debug!(error = %err, "answered with an error");
        err.into_response()
    });
    // Every SSE answer (relayed or held) counts as an open stream until its body is dropped.
    if crate::forward::is_event_stream(response.headers()) {
        let (parts, body) = response.into_parts();
        return Response::from_parts(
            parts,
            Body::from_stream(crate::forward::counted(&app, body.into_data_stream())),
        );
    }
    response
}

pub(crate) fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Arc<str>>, ProxyError> {
    if app.clients.is_empty() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ProxyError::Unauthorized)?;
    // Compare against every key in constant time so timing reveals nothing.
    let mut found = None;
    for client in &app.clients {
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_bytes(),
            client.key.as_slice(),
        )) {
            found = Some(client.name.clone());
        }
    }
    found.map(Some).ok_or(ProxyError::Unauthorized)
}

fn check_client_rate(app: &AppState, client: Option<&str>, peer: IpAddr) -> Result<(), ProxyError> {
    let Some(rate) = &app.client_rate else {
        return Ok(());
    };
    let key = client.map_or_else(|| peer.to_string(), str::to_owned);
    rate.check_key(&key).map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        ProxyError::TooManyRequests(wait)
    })
}

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(
    limit: usize,
    request: Request,
) -> Result<axum::body::Bytes, ProxyError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|err| {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || err.to_string().contains("length limit");
            if too_large {
                ProxyError::BodyTooLarge(limit)
            } else {
                ProxyError::BodyRead(err.to_string())
            }
        })
}

struct Downstream {
    app: AppState,
    server: Arc<Server>,
    client: Option<Arc<str>>,
    peer: IpAddr,
}

impl Downstream {
    async fn read_body(&self, request: Request) -> Result<axum::body::Bytes, ProxyError> {
        read_body(self.app.max_body, request).await
    }

    /// The handshake-era session named by the request, checked against server and client.
    fn session(&self, headers: &HeaderMap) -> Result<Option<Arc<Session>>, ProxyError> {
        let Some(id) = headers.get(SESSION_HEADER) else {
            return Ok(None);
        };
        let id = id.to_str().map_err(|_| ProxyError::UnknownSession)?;
        let session = self
            .app
            .sessions
            .get(id)
            .ok_or(ProxyError::UnknownSession)?;
        // A session is only valid for the server and client that opened it.
        if session.server != self.server.name || session.client != self.client {
            return Err(ProxyError::UnknownSession);
        }
        Ok(Some(session))
    }

    async fn post(&self, request: Request) -> Result<Response, ProxyError> {
        let headers = request.headers().clone();
        let body = self.read_body(request).await?;
        match Incoming::parse(&body)? {
            Incoming::Single(message) => self.post_single(&headers, message).await,
            Incoming::Batch(messages) => self.post_batch(&headers, messages).await,
        }
    }

    async fn post_single(
        &self,
        headers: &HeaderMap,
        message: Message,
    ) -> Result<Response, ProxyError> {
        let routing = RoutingHeaders {
            protocol_version: headers
                .get("mcp-protocol-version")
                .map(HeaderValue::as_bytes),
            method: headers.get("mcp-method").map(HeaderValue::as_bytes),
            name: headers.get("mcp-name").map(HeaderValue::as_bytes),
        };
        routing
            .validate(&message)
            .map_err(|mismatch| ProxyError::HeaderMismatch {
                id: message.id().cloned(),
                message: mismatch.to_string(),
            })?;
        let header_version = headers
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok());
        let era = era_of(&message, header_version);
        let initialize = message.kind() == Kind::Request && message.method() == Some("initialize");

        let session = match era {
            // The stateless era has no sessions: a stray session header is ignored.
            Era::Stateless => None,
            Era::Handshake if initialize => None,
            Era::Handshake => Some(self.session(headers)?.ok_or(ProxyError::MissingSession)?),
        };

        // The client's answer to a request Tollgate sent (an approval asked by
        // elicitation) is Tollgate's, not the upstream's.
        if message.kind() == Kind::Response
            && let Some(id) = message
                .id()
                .and_then(Value::as_str)
                .filter(|id| id.starts_with(OWN_REQUEST_PREFIX))
        {
            let waiter = self.app.elicitations.lock().ok().and_then(|mut pending| {
                // Only the session the request was sent on may answer it.
                let same_session = pending
                    .get(id)
                    .is_some_and(|(s, _)| s.as_deref() == session.as_ref().map(|s| &*s.id));
                if same_session {
                    pending.remove(id)
                } else {
                    None
                }
            });
            if let Some((_, reply)) = waiter {
                let _ = reply.send(message.into_value());
            }
            return Ok(StatusCode::ACCEPTED.into_response());
        }

        let peer_key = format!("peer:{}", self.peer);
        let client_key = self
            .client
            .as_deref()
            .map_or(peer_key.clone(), |c| format!("client:{c}"));
        let session_key = match &session {
            Some(session) => format!("session:{}", session.id),
            None => client_key.clone(),
        };

        let mut slot = None;
        let mut call_id = None;
        if message.is_malformed_tool_call() {
            return Err(ProxyError::MalformedToolCall {
                id: message.id().cloned(),
            });
        }
        if let Some(call) = message.tool_call() {
            tracing::Span::current().record("tool", call.name);
            let caller = Caller {
                client: self.client.as_deref(),
                session_key: &session_key,
                client_key: &client_key,
                session: session.as_ref().map(|s| &*s.id),
                era,
            };
            let id = message.id().cloned().unwrap_or(Value::Null);
            match enforce(&self.app, &self.server, &caller, &id, call) {
                Verdict::Refuse(answer) => return Ok(json_response(&answer)),
                Verdict::Hold(held) => {
                    let ctx = HoldContext {
                        app: self.app.clone(),
                        server: self.server.clone(),
                        headers: headers.clone(),
                        client: self.client.clone(),
                        session: session.as_ref().map(|s| s.id.clone()),
                        upstream_session: session.as_ref().and_then(|s| s.upstream_id()),
                        era,
                        message,
                    };
                    let can_elicit = session
                        .as_ref()
                        .is_some_and(|s| s.elicitation.load(std::sync::atomic::Ordering::Relaxed));
                    return Ok(hold(ctx, held, can_elicit));
                }
                Verdict::Forward {
                    call_id: cid,
                    slot: s,
                } => {
                    slot = s;
                    call_id = Some((cid, call.name.to_owned()));
                }
            }
        }

        let rewrite = if message.method() == Some("tools/list") {
            Rewrite::FilterTools {
                policy: self.server.policy.load_full(),
                client: self.client.clone(),
            }
        } else {
            Rewrite::None
        };
        let upstream_session = session.as_ref().and_then(|s| s.upstream_id());
        let _in_flight = session.as_ref().map(Session::start_request);
        let started = Instant::now();
        let body = message.to_bytes();
        let mut sent = send(
            &self.app,
            &self.server,
            Method::POST,
            upstream_session.as_deref(),
            headers,
            Some(body.clone()),
        )
        .await;
        // The upstream forgot its session (restarted, expired): re-initialize it
        // behind the client's back when that is safe, and send the request again.
        if let (Ok(answer), Some(session), Some(lost)) = (&sent, &session, &upstream_session)
            && answer.status() == reqwest::StatusCode::NOT_FOUND
        {
            match self.recover_session(session, lost, message.id()).await {
                Ok(renewed) => {
                    sent = send(
                        &self.app,
                        &self.server,
                        Method::POST,
                        renewed.as_deref(),
                        headers,
                        Some(body),
                    )
                    .await;
                }
                Err(err) => {
                    self.abandon_call(slot, &call_id, started, "upstream_session_lost");
                    return Err(err);
                }
            }
        }
        let upstream = match sent {
            Ok(upstream) => {
                self.app
                    .metrics
                    .upstream_latency(&self.server.name, started.elapsed().as_secs_f64());
                if upstream.status().is_server_error() {
                    self.app
                        .metrics
                        .upstream_error(&self.server.name, "status_5xx");
                }
                upstream
            }
            Err(failure) => {
                self.app
                    .metrics
                    .upstream_error(&self.server.name, failure.kind());
                self.abandon_call(slot, &call_id, started, "upstream_unreachable");
                tracing::warn!(?failure, "upstream request failed");
                return Err(failure.into_error(&self.server, message.id().cloned()));
            }
        };
        let outcome = if upstream.status().is_success() {
            "forwarded"
        } else {
            "upstream_error"
        };
        self.record_call(&call_id, started, outcome);
        if upstream.status() == reqwest::StatusCode::NOT_FOUND
            && let Some(session) = session.as_ref().filter(|_| upstream_session.is_some())
        {
            // The upstream forgot its session: forget ours so the client re-initializes.
            self.app.sessions.remove(&session.id);
            return Err(ProxyError::UnknownSession);
        }
        let upstream_session_id = upstream
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let success = upstream.status().is_success();
        let mut response = relay(&self.server, upstream, rewrite, message.id().cloned()).await?;
        if initialize && success {
            let session = self.app.sessions.open(
                self.server.name.clone(),
                self.client.clone(),
                upstream_session_id,
                Some(message.as_value().clone()),
            )?;
            let declared = message
                .params()
                .and_then(|p| p.get("capabilities"))
                .and_then(|c| c.get("elicitation"));
            session
                .elicitation
                .store(declared.is_some(), std::sync::atomic::Ordering::Relaxed);
            if let Ok(value) = HeaderValue::from_str(&session.id) {
                response.headers_mut().insert(SESSION_HEADER, value);
            }
            tracing::info!(session = %session.id, "session opened");
        }
        Ok(response)
    }

    /// A JSON-RPC batch (2025-03-26): each tool call is decided on its own; refused
    /// calls are answered here, the rest go upstream as one batch.
    async fn post_batch(
        &self,
        headers: &HeaderMap,
        messages: Vec<Message>,
    ) -> Result<Response, ProxyError> {
        // Routing headers describe one message; on a batch they could only mislead
        // whatever routes on them after Tollgate.
        if headers.contains_key("mcp-method") || headers.contains_key("mcp-name") {
            return Err(ProxyError::HeaderMismatch {
                id: None,
                message:
                    "header mismatch: Mcp-Method and Mcp-Name cannot describe a JSON-RPC batch"
                        .into(),
            });
        }
        let session = self.session(headers)?;
        if session.is_none() && !messages.iter().any(|m| m.method() == Some("initialize")) {
            return Err(ProxyError::MissingSession);
        }
        let peer_key = format!("peer:{}", self.peer);
        let client_key = self
            .client
            .as_deref()
            .map_or(peer_key, |c| format!("client:{c}"));
        let session_key = session
            .as_ref()
            .map_or(client_key.clone(), |s| format!("session:{}", s.id));
        let mut refused = Vec::new();
        let mut forward = Vec::new();
        for message in messages {
            if message.is_malformed_tool_call() {
                refused.push(
                    ProxyError::MalformedToolCall {
                        id: message.id().cloned(),
                    }
                    .to_json(),
                );
                continue;
            }
            if let Some(call) = message.tool_call() {
                let caller = Caller {
                    client: self.client.as_deref(),
                    session_key: &session_key,
                    client_key: &client_key,
                    session: session.as_ref().map(|s| &*s.id),
                    era: Era::Handshake,
                };
                let id = message.id().cloned().unwrap_or(Value::Null);
                match enforce(&self.app, &self.server, &caller, &id, call) {
                    Verdict::Forward { .. } => {}
                    Verdict::Refuse(answer) => {
                        refused.push(answer);
                        continue;
                    }
                    Verdict::Hold(mut held) => {
                        // A batch has one answer for all its calls, so one call cannot wait
                        // for a human while the others return.
                        self.server.release(held.decision.slot.take());
                        held.decision.action = tollgate_policy::Action::Deny;
                        held.decision.kind = Some(tollgate_policy::DenyKind::ApprovalDenied);
                        held.decision.reason = format!(
                            "{} (calls that need approval cannot be sent in a JSON-RPC batch; send it on its own)",
                            held.decision.reason
                        );
                        refused.push(crate::enforce::refusal(
                            &held.decision,
                            &id,
                            Era::Handshake,
                            held.deny_as,
                        ));
                        continue;
                    }
                }
            }
            forward.push(message.into_value());
        }
        if forward.is_empty() {
            return Ok(json_response(&Value::Array(refused)));
        }
        let body = serde_json::to_vec(&Value::Array(forward)).unwrap_or_default();
        let upstream_session = session.as_ref().and_then(|s| s.upstream_id());
        let upstream = send(
            &self.app,
            &self.server,
            Method::POST,
            upstream_session.as_deref(),
            headers,
            Some(body),
        )
        .await
        .map_err(|failure| failure.into_error(&self.server, None))?;
        if refused.is_empty() {
            let rewrite = Rewrite::FilterTools {
                policy: self.server.policy.load_full(),
                client: self.client.clone(),
            };
            return relay(&self.server, upstream, rewrite, None).await;
        }
        // Merge our answers into the upstream's JSON array.
        let status = upstream.status();
        let bytes = upstream.bytes().await.map_err(|e| ProxyError::Upstream {
            id: None,
            message: e.to_string(),
        })?;
        let mut answers = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => items,
            Ok(single @ Value::Object(_)) => vec![single],
            _ if status == reqwest::StatusCode::ACCEPTED => Vec::new(),
            _ => {
                return Err(ProxyError::Upstream {
                    id: None,
                    message: format!(
                        "upstream `{}` answered a batch with something that is not JSON",
                        self.server.name
                    ),
                });
            }
        };
        answers.extend(refused);
        let mut merged = Value::Array(answers);
        crate::forward::filter_tools(
            &mut merged,
            &self.server.policy.load(),
            self.client.as_deref(),
        );
        Ok(json_response(&merged))
    }

    /// A forwarded call that never reached the upstream's tool: its rate-limit slot
    /// is given back and the audit log gets its outcome.
    fn abandon_call(
        &self,
        slot: Option<tollgate_policy::Slot>,
        call_id: &Option<(u64, String)>,
        started: Instant,
        outcome: &str,
    ) {
        self.server.release(slot);
        self.record_call(call_id, started, outcome);
    }

    /// The audit log's `outcome` event of a forwarded call (`None`: not a tool call).
    fn record_call(&self, call_id: &Option<(u64, String)>, started: Instant, outcome: &str) {
        if let Some((cid, tool)) = call_id {
            record_outcome(
                &self.app,
                &self.server,
                *cid,
                tool,
                started.elapsed(),
                outcome,
            );
        }
    }

    /// Re-initializes a session the upstream lost (`lost` was its id), replaying the
    /// client's `initialize`; returns the new upstream session id. Only when no other
    /// request of the session waits on the upstream: their answers are gone with the
    /// old session, and the client must learn that rather than see them hang.
    async fn recover_session(
        &self,
        session: &Arc<Session>,
        lost: &str,
        id: Option<&Value>,
    ) -> Result<Option<String>, ProxyError> {
        let _only_one = session.reinitializing.lock().await;
        let current = session.upstream_id();
        if current.as_deref() != Some(lost) {
            // Another request re-initialized it meanwhile.
            return Ok(current);
        }
        let give_up = |why: String| {
            self.app.sessions.remove(&session.id);
            tracing::warn!(session = %session.id, "upstream session lost: {why}");
            ProxyError::Upstream {
                id: id.cloned(),
                message: format!(
                    "upstream `{}` lost this session ({why}); start a new session with `initialize`",
                    self.server.name
                ),
            }
        };
        if session.in_flight() > 1 {
            return Err(give_up(
                "other requests were waiting for it, so it was not re-initialized".into(),
            ));
        }
        let Some(mut initialize) = session.initialize.clone() else {
            return Err(give_up("the original `initialize` is unknown".into()));
        };
        initialize["id"] = Value::from(format!("tollgate-reinit-{}", crate::session::random_id()));
        let failed = |failure: crate::forward::UpstreamFailure| {
            let error = failure.into_error(&self.server, None);
            give_up(format!("re-initializing failed: {error}"))
        };
        let none = HeaderMap::new();
        let body = serde_json::to_vec(&initialize).unwrap_or_default();
        let answer = send(
            &self.app,
            &self.server,
            Method::POST,
            None,
            &none,
            Some(body),
        )
        .await
        .map_err(&failed)?;
        let renewed = answer
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let result = crate::forward::read_answer(&self.server, answer)
            .await
            .and_then(|answer| answer.get("result").cloned())
            .ok_or_else(|| give_up("the upstream refused to re-initialize".into()))?;
        let mut version = HeaderMap::new();
        if let Some(v) = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            version.insert("mcp-protocol-version", v);
        }
        let initialized = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec();
        send(
            &self.app,
            &self.server,
            Method::POST,
            renewed.as_deref(),
            &version,
            Some(initialized),
        )
        .await
        .map_err(&failed)?;
        session.set_upstream_id(renewed.clone());
        tracing::info!(session = %session.id, "the upstream lost its session; re-initialized it");
        Ok(renewed)
    }

    /// The handshake era's server-to-client stream.
    async fn get(&self, headers: &HeaderMap) -> Result<Response, ProxyError> {
        // Without a session this is a stateless-era endpoint, which has no GET stream.
        let session = self.session(headers)?.ok_or(ProxyError::MethodNotAllowed)?;
        let upstream_session = session.upstream_id();
        let mut upstream = send(
            &self.app,
            &self.server,
            Method::GET,
            upstream_session.as_deref(),
            headers,
            None,
        )
        .await
        .map_err(|failure| failure.into_error(&self.server, None))?;
        if let Some(lost) = &upstream_session
            && upstream.status() == reqwest::StatusCode::NOT_FOUND
            && let Ok(renewed) = self.recover_session(&session, lost, None).await
        {
            upstream = send(
                &self.app,
                &self.server,
                Method::GET,
                renewed.as_deref(),
                headers,
                None,
            )
            .await
            .map_err(|failure| failure.into_error(&self.server, None))?;
        }
        if upstream.status() == reqwest::StatusCode::NOT_FOUND && upstream_session.is_some() {
            self.app.sessions.remove(&session.id);
            return Err(ProxyError::UnknownSession);
        }
        relay(&self.server, upstream, Rewrite::None, None).await
    }

    /// Ends a session here and upstream.
    async fn delete(&self, headers: &HeaderMap) -> Result<Response, ProxyError> {
        let session = self.session(headers)?.ok_or(ProxyError::MissingSession)?;
        self.app.sessions.remove(&session.id);
        if let Some(upstream_id) = &session.upstream_id() {
            match send(
                &self.app,
                &self.server,
                Method::DELETE,
                Some(upstream_id),
                headers,
                None,
            )
            .await
            {
                Ok(response) => {
                    tracing::debug!(status = %response.status(), "upstream session ended")
                }
                Err(failure) => tracing::warn!(?failure, "could not end the upstream session"),
            }
        }
        tracing::info!(session = %session.id, "session closed");
        Ok(StatusCode::OK.into_response())
    }
}

fn json_response(value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn splits_host_names_from_ports() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("[::1]:9"), "[::1]");
        assert_eq!(host_name("evil.example"), "evil.example");
    }
}
