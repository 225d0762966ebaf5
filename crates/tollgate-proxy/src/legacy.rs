//! Downstream legacy HTTP+SSE (MCP 2024-11-05) at `/servers/<name>/sse`.
//!
//! `GET …/sse` opens the stream and names, in its first `endpoint` event, where
//! the client POSTs its messages (`…/messages?session_id=<id>`, as the SDKs
//! expect). Each POST is accepted with 202 and carried through a [`Relay`]; every
//! answer and server message arrives on the stream as a `message` event. Closing
//! the stream ends the session, here and upstream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_mcp::Incoming;

use crate::error::ProxyError;
use crate::frontend::Relay;
use crate::state::{AppState, Server};

/// Messages queued for a slow legacy client before its relay waits.
const QUEUE: usize = 64;

/// Open legacy streams by id.
#[derive(Default)]
pub struct LegacyClients {
    map: Mutex<HashMap<String, Arc<LegacyClient>>>,
}

/// Messages of one stream being handled at once; beyond that a POST gets 429.
const IN_FLIGHT: usize = 64;

/// One open stream: its relay and the client that opened it.
pub struct LegacyClient {
    relay: Arc<Relay>,
    client: Option<Arc<str>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl LegacyClients {
    fn get(&self, id: &str) -> Option<Arc<LegacyClient>> {
        self.map.lock().ok()?.get(id).cloned()
    }

    /// Number of open legacy streams.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the stream's entry and ends its session when the client goes away.
struct Cleanup {
    app: AppState,
    id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let removed = self
            .app
            .legacy
            .map
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&self.id));
        if let Some(client) = removed {
            tracing::info!(legacy_session = %self.id, "legacy SSE stream closed");
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { client.relay.close().await });
            }
        }
    }
}

fn server_for(
    app: &AppState,
    name: Option<&str>,
    headers: &axum::http::HeaderMap,
) -> Result<Arc<Server>, ProxyError> {
    match name {
        Some(name) => app
            .servers
            .get(name)
            .cloned()
            .ok_or_else(|| crate::http::unknown_server(app, headers)),
        None if app.servers.len() == 1 => app
            .servers
            .values()
            .next()
            .cloned()
            .ok_or(ProxyError::UnknownServer),
        None => Err(ProxyError::AmbiguousServer),
    }
}

fn peer_of(request: &Request) -> SocketAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from((IpAddr::from([127, 0, 0, 1]), 0)), |c| c.0)
}

/// `GET /servers/<name>/sse`.
pub async fn named_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    open_stream(app, Some(name), request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `GET /sse`, when there is exactly one server.
pub async fn single_stream(State(app): State<AppState>, request: Request) -> Response {
    open_stream(app, None, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn open_stream(
    app: AppState,
    name: Option<String>,
    request: Request,
) -> Result<Response, ProxyError> {
    let server = server_for(&app, name.as_deref(), request.headers())?;
    let client = crate::http::authenticate(&app, request.headers())?;
    if app.legacy.len() >= app.sessions.capacity() {
        return Err(ProxyError::SessionsFull(crate::session::SessionsFull(
            app.sessions.capacity(),
        )));
    }
    let id = crate::session::random_id();
    let (out, messages) = mpsc::channel::<Value>(QUEUE);
    let relay = Arc::new(Relay::new(
        app.clone(),
        server.clone(),
        request.headers(),
        peer_of(&request),
        out,
    ));
    if let Ok(mut map) = app.legacy.map.lock() {
        map.insert(
            id.clone(),
            Arc::new(LegacyClient {
                relay,
                client: client.clone(),
                in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            }),
        );
    }
    let endpoint = match &name {
        Some(name) => format!("/servers/{name}/messages?session_id={id}"),
        None => format!("/messages?session_id={id}"),
    };
    tracing::info!(server = %server.name, legacy_session = %id, "legacy SSE stream opened");
    let cleanup = Cleanup {
        app: app.clone(),
        id,
    };
    let first = futures::stream::once(async move {
        Ok::<_, Infallible>(Event::default().event("endpoint").data(endpoint))
    });
    let rest = ReceiverStream::new(messages).map(move |message| {
        let _alive = &cleanup;
        Ok(Event::default().event("message").data(message.to_string()))
    });
    let stream = crate::forward::counted(&app, first.chain(rest));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Query of the message endpoint.
#[derive(serde::Deserialize)]
pub struct SessionQuery {
    session_id: Option<String>,
}

/// `POST /servers/<name>/messages?session_id=…`.
pub async fn named_message(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<SessionQuery>,
    request: Request,
) -> Response {
    post_message(app, Some(name), query, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /messages?session_id=…`, when there is exactly one server.
pub async fn single_message(
    State(app): State<AppState>,
    Query(query): Query<SessionQuery>,
    request: Request,
) -> Response {
    post_message(app, None, query, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn post_message(
    app: AppState,
    name: Option<String>,
    query: SessionQuery,
    request: Request,
) -> Result<Response, ProxyError> {
    let server = server_for(&app, name.as_deref(), request.headers())?;
    let client = crate::http::authenticate(&app, request.headers())?;
    let legacy = query
        .session_id
        .as_deref()
        .and_then(|id| app.legacy.get(id))
        .ok_or(ProxyError::UnknownSession)?;
    // A stream belongs to the server and the client that opened it.
    if legacy.relay.server().name != server.name || legacy.client != client {
        return Err(ProxyError::UnknownSession);
    }
    let body = crate::http::read_body(app.max_body, request).await?;
    // Refuse what is not JSON-RPC here, as the SDKs' servers do, so the client
    // learns at once; everything else is answered on the stream.
    Incoming::parse(&body)?;
    // A client that POSTs without reading its stream must not pile up work here.
    let permit = legacy
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::TooManyRequests(Duration::from_secs(1)))?;
    let relay = legacy.relay.clone();
    tokio::spawn(async move {
        relay.handle(body).await;
        drop(permit);
    });
    Ok((StatusCode::ACCEPTED, "Accepted").into_response())
}
