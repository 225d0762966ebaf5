//! Downstream legacy HTTP+SSE (MCP 2024-11-05) at `/servers/<name>/sse`.
//!
//! `GET …/sse` opens the stream and names, in its first `endpoint` event, where
//! the client POSTs its messages (`…/messages?session_id=<id>`, as the SDKs
//! expect). Each POST is decoded, accepted with 202 and carried through the
//! stream's [`Conversation`]; every answer and server message arrives on the
//! stream as a `message` event. Closing the stream ends the session, here and
//! upstream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_mcp::Incoming;

use super::conversation::Conversation;
use super::{Doors, lane_of, read_body};
use crate::error::ProxyError;
use crate::store::sessions::{SessionsFull, random_id};

/// Messages queued for a slow legacy client before its conversation waits.
const QUEUE: usize = 64;

/// Messages of one stream being handled at once; beyond that a POST gets 429.
const IN_FLIGHT: usize = 64;

/// Open legacy streams by id.
#[derive(Default)]
pub struct Streams {
    map: Mutex<HashMap<String, Arc<Stream>>>,
}

/// One open stream: its conversation and the client that opened it.
struct Stream {
    conversation: Arc<Conversation>,
    client: Option<Arc<str>>,
    /// The caller's client key, for `limits.sessions_per_client`.
    key: String,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Streams {
    fn get(&self, id: &str) -> Option<Arc<Stream>> {
        self.map.lock().get(id).cloned()
    }

    /// Number of open legacy streams.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Number of open legacy streams of one client key.
    fn held_by(&self, key: &str) -> usize {
        self.map.lock().values().filter(|s| s.key == key).count()
    }
}

/// Removes the stream's entry and ends its session when the client goes away.
struct Cleanup {
    doors: Arc<Doors>,
    id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let removed = self.doors.legacy.map.lock().remove(&self.id);
        if let Some(stream) = removed {
            tracing::info!(legacy_session = %self.id, "legacy SSE stream closed");
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { stream.conversation.close().await });
            }
        }
    }
}

/// `GET /servers/<name>/sse`.
pub async fn named_stream(
    State(doors): State<Arc<Doors>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    open_stream(doors, Some(name), request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `GET /sse`, when there is exactly one server.
pub async fn single_stream(State(doors): State<Arc<Doors>>, request: Request) -> Response {
    open_stream(doors, None, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn open_stream(
    doors: Arc<Doors>,
    name: Option<String>,
    request: Request,
) -> Result<Response, ProxyError> {
    let server = doors.server(name.as_deref(), request.headers())?;
    let path = super::resource_path(name.as_deref(), "sse");
    let caller = doors
        .identify(request.headers(), doors.client_address(&request), &path)
        .await?;
    let sessions = &doors.shared().sessions();
    let capacity = sessions.capacity();
    if doors.legacy.len() >= capacity {
        return Err(ProxyError::SessionsFull(SessionsFull::Total(capacity)));
    }
    let key = caller.client_key().to_string();
    let per_client = sessions.per_client();
    if doors.legacy.held_by(&key) >= per_client {
        tracing::warn!(client = %key, "legacy SSE stream refused: limits.sessions_per_client");
        return Err(ProxyError::SessionsFull(SessionsFull::Client(
            per_client,
            super::counted_on(&key),
        )));
    }
    let id = random_id();
    let (out, messages) = mpsc::channel::<Value>(QUEUE);
    let client = caller.principal();
    let conversation = Arc::new(
        Conversation::new(doors.clone(), server.clone(), caller, out).on_lane(lane_of(&request)),
    );
    doors.legacy.map.lock().insert(
        id.clone(),
        Arc::new(Stream {
            conversation,
            client,
            key,
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }),
    );
    let endpoint = match &name {
        Some(name) => format!("/servers/{name}/messages?session_id={id}"),
        None => format!("/messages?session_id={id}"),
    };
    tracing::info!(server = %server.name, legacy_session = %id, "legacy SSE stream opened");
    let cleanup = Cleanup {
        doors: doors.clone(),
        id,
    };
    let first = futures::stream::once(async move {
        tollgate_mcp::encode("endpoint", None, None, endpoint.as_bytes())
    });
    let rest = ReceiverStream::new(messages).map(move |message| {
        let _alive = &cleanup;
        tollgate_mcp::encode("message", None, None, message.to_string().as_bytes())
    });
    Ok(super::stream::sse_response(
        doors.shared(),
        StatusCode::OK,
        first.chain(rest),
        Duration::from_secs(15),
    ))
}

/// Query of the message endpoint.
#[derive(serde::Deserialize)]
pub struct SessionQuery {
    session_id: Option<String>,
}

/// `POST /servers/<name>/messages?session_id=…`.
pub async fn named_message(
    State(doors): State<Arc<Doors>>,
    Path(name): Path<String>,
    Query(query): Query<SessionQuery>,
    request: Request,
) -> Response {
    post_message(doors, Some(name), query, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /messages?session_id=…`, when there is exactly one server.
pub async fn single_message(
    State(doors): State<Arc<Doors>>,
    Query(query): Query<SessionQuery>,
    request: Request,
) -> Response {
    post_message(doors, None, query, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn post_message(
    doors: Arc<Doors>,
    name: Option<String>,
    query: SessionQuery,
    request: Request,
) -> Result<Response, ProxyError> {
    let server = doors.server(name.as_deref(), request.headers())?;
    let path = super::resource_path(name.as_deref(), "messages");
    let client = match doors
        .identify(request.headers(), doors.client_address(&request), &path)
        .await
    {
        Ok(caller) => caller.principal(),
        Err(err) => return Ok(super::stream::unread(err.into_response())),
    };
    // Read (bounded) before answering, so the connection stays usable for the next POST.
    let lane = lane_of(&request);
    let body = read_body(doors.shared(), request).await?;
    let stream = query
        .session_id
        .as_deref()
        .and_then(|id| doors.legacy.get(id))
        .ok_or(ProxyError::UnknownSession)?;
    // A stream belongs to the server and the client that opened it.
    if stream.conversation.server().name != server.name || stream.client != client {
        return Err(ProxyError::UnknownSession);
    }
    // Refuse what is not JSON-RPC here, as the SDKs' servers do, so the client
    // learns at once; everything else is answered on the stream.
    let incoming = Incoming::parse(&body)?;
    // A client that POSTs without reading its stream must not pile up work here.
    let permit =
        stream
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::TooManyRequests {
                wait: Duration::from_secs(1),
                counted: "this stream, whose messages are still in flight".to_owned(),
            })?;
    // Admitted before the 202, in the order the POSTs came, then handled concurrently.
    let admitted = stream.conversation.admit_incoming(incoming).await.on(lane);
    tokio::spawn(async move {
        admitted.run().await;
        drop(permit);
    });
    Ok((StatusCode::ACCEPTED, "Accepted").into_response())
}
