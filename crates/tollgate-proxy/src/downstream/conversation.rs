//! A conversation with one client over a message transport (legacy HTTP+SSE, or
//! `tollgate stdio`): messages in, messages out, and the session that the
//! client's `initialize` opened remembered between them. Each message goes to the
//! core as it is; answers and server messages go to the client's outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderName, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Mutex, OwnedMutexGuard, mpsc};
use tollgate_mcp::{ErrorCode, Incoming, Kind, error_response};

use super::Doors;
use crate::error::ProxyError;
use crate::pipeline::{Answer, Caller, Inbound, Meta};
use crate::state::Server;
use crate::upstream::{Body, Lane};

/// One client on a message transport, bound to one server.
pub struct Conversation {
    doors: Arc<Doors>,
    server: Arc<Server>,
    caller: Caller,
    session: Arc<Mutex<Option<String>>>,
    listening: AtomicBool,
    out: mpsc::Sender<Value>,
    /// Over a pipe (`tollgate stdio`) rather than TCP (legacy HTTP+SSE).
    pipe: bool,
    /// The lane of the client's stream (the first, for a pipe): its session's end goes
    /// through that lane's upstream connections.
    lane: Lane,
}

impl Conversation {
    /// A conversation of `caller` with `server`; messages for the client go to `out`.
    pub fn new(
        doors: Arc<Doors>,
        server: Arc<Server>,
        caller: Caller,
        out: mpsc::Sender<Value>,
    ) -> Conversation {
        Conversation {
            doors,
            server,
            caller,
            session: Arc::new(Mutex::new(None)),
            listening: AtomicBool::new(false),
            out,
            pipe: false,
            lane: Lane::FIRST,
        }
    }

    /// The same conversation, its stream served on `lane`.
    pub fn on_lane(mut self, lane: Lane) -> Conversation {
        self.lane = lane;
        self
    }

    /// The same conversation over a pipe (`tollgate stdio`).
    pub fn over_pipe(mut self) -> Conversation {
        self.pipe = true;
        self
    }

    /// The server this conversation is with.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Handles one body from the client: a message, a batch, or something that is
    /// not JSON-RPC (answered with the error).
    pub async fn receive(self: &Arc<Self>, body: Bytes) {
        self.admit(body).await.run().await;
    }

    /// Takes one body in, in order of arrival: what it needs of the conversation so
    /// far (the session) is settled here, so a caller that admits each message before
    /// reading the next, then runs them concurrently, has them handled as if one by
    /// one. An `initialize` holds the session until its answer is in: the next
    /// admission waits for the handshake.
    pub async fn admit(self: &Arc<Self>, body: Bytes) -> Admitted {
        match Incoming::parse_bytes(body) {
            Ok(incoming) => self.admit_incoming(incoming).await,
            Err(err) => Admitted {
                conversation: self.clone(),
                work: Work::Refuse(ProxyError::Framing(err)),
                lane: self.lane,
            },
        }
    }

    /// [`Conversation::admit`] for a decoded message or batch.
    pub async fn admit_incoming(self: &Arc<Self>, incoming: Incoming) -> Admitted {
        let initialize =
            matches!(&incoming, Incoming::Single(m) if m.method() == Some("initialize"));
        let (session, handshake) = if initialize {
            let held = self.session.clone().lock_owned().await;
            (held.clone(), Some(held))
        } else {
            (self.session.lock().await.clone(), None)
        };
        Admitted {
            conversation: self.clone(),
            work: Work::Handle {
                incoming,
                session,
                handshake,
            },
            lane: self.lane,
        }
    }

    async fn handle_admitted(
        self: &Arc<Self>,
        incoming: Incoming,
        session: Option<String>,
        handshake: Option<OwnedMutexGuard<Option<String>>>,
        lane: Lane,
    ) {
        let ids: Vec<Value> = match &incoming {
            Incoming::Single(message) => message.id().cloned().into_iter().collect(),
            Incoming::Batch(messages) => messages.iter().filter_map(|m| m.id().cloned()).collect(),
        };
        // Notifications (and responses) are never answered, not even with an error.
        let answered = match &incoming {
            Incoming::Single(message) => message.kind() == Kind::Request,
            Incoming::Batch(messages) => messages.iter().any(|m| m.kind() == Kind::Request),
        };
        if let Err(err) = self.doors.check_rate(&self.caller) {
            return self.deliver(Err(err), &ids, answered).await;
        }
        let inbound = Inbound {
            incoming,
            meta: Meta {
                session,
                pipe: self.pipe,
                lane,
                ..Meta::default()
            },
        };
        let Some(mut handshake) = handshake else {
            let answer = self.core_handle(inbound).await;
            return self.deliver(answer, &ids, answered).await;
        };
        // The session lock is held from sending `initialize` until its answer is in,
        // so nothing the client sends next can overtake the handshake.
        let answer = self.core_handle(inbound).await;
        if let Ok(Answer {
            session: Some(id), ..
        }) = &answer
        {
            *handshake = Some(id.to_string());
        }
        let answers = self.messages(answer, &ids, true).await;
        drop(handshake);
        for answer in answers {
            if self.out.send(answer).await.is_err() {
                return;
            }
        }
        self.listen(lane).await;
    }

    async fn core_handle(&self, inbound: Inbound) -> Result<Answer, ProxyError> {
        self.doors
            .core()
            .handle(&self.server, &self.caller, inbound)
            .await
    }

    /// Opens the session's server-to-client stream once, after the handshake.
    async fn listen(self: &Arc<Self>, lane: Lane) {
        let Some(session) = self.session.lock().await.clone() else {
            return;
        };
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let conversation = self.clone();
        tokio::spawn(async move {
            let core = conversation.doors.core();
            let no_headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
            let answer = core
                .listen(
                    &conversation.server,
                    &conversation.caller,
                    Some(&session),
                    no_headers,
                    lane,
                )
                .await;
            // No GET stream (405) is fine: the upstream then only answers requests.
            if let Ok(answer) = answer
                && answer.status.is_success()
            {
                conversation.deliver(Ok(answer), &[], true).await;
            }
        });
    }

    /// Ends the session, e.g. when the client's stream closes.
    pub async fn close(&self) {
        let Some(session) = self.session.lock().await.take() else {
            return;
        };
        if let Err(err) = self
            .doors
            .core()
            .end(&self.server, &self.caller, Some(&session), self.lane)
            .await
        {
            tracing::debug!(error = %err, "the session had already ended");
        }
    }

    /// Sends an answer on; an error is sent only when it answers a request.
    async fn deliver(&self, answer: Result<Answer, ProxyError>, ids: &[Value], answered: bool) {
        if let Err(err) = &answer
            && !answered
        {
            tracing::warn!(error = %err, "a notification from the client was refused");
            return;
        }
        for message in self.messages(answer, ids, false).await {
            if self.out.send(message).await.is_err() {
                return;
            }
        }
    }

    /// The messages of an answer: its JSON, each message of a stream (sent on as
    /// they arrive unless `collect`), or an error for each request when it is
    /// neither.
    async fn messages(
        &self,
        answer: Result<Answer, ProxyError>,
        ids: &[Value],
        collect: bool,
    ) -> Vec<Value> {
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => return vec![with_id(err.to_json(), ids)],
        };
        match answer.body.into_events() {
            Body::Empty | Body::Sse(_) => Vec::new(),
            Body::Json(json) => match json.into_value() {
                Ok(Value::Array(items)) => items,
                Ok(message @ Value::Object(_)) => vec![with_id(message, ids)],
                _ => failed(answer.status, b"the answer is not JSON-RPC", ids),
            },
            Body::Events(mut events) => {
                let mut collected = Vec::new();
                while let Some(Ok(event)) = events.next().await {
                    let Ok(message) = event.data.into_value() else {
                        continue;
                    };
                    if collect {
                        collected.push(message);
                    } else if self.out.send(message).await.is_err() {
                        break;
                    }
                }
                collected
            }
            Body::Other { bytes, .. } => failed(answer.status, &bytes, ids),
        }
    }
}

/// A message admitted in order ([`Conversation::admit`]), to be handled.
pub struct Admitted {
    conversation: Arc<Conversation>,
    work: Work,
    /// The lane it is handled on (the conversation's, unless [`Admitted::on`]).
    lane: Lane,
}

enum Work {
    Refuse(ProxyError),
    Handle {
        incoming: Incoming,
        session: Option<String>,
        handshake: Option<OwnedMutexGuard<Option<String>>>,
    },
}

impl Admitted {
    /// The same message, handled on `lane` (the lane its POST came in on).
    pub fn on(mut self, lane: Lane) -> Admitted {
        self.lane = lane;
        self
    }

    /// Handles it: through the core, the answers to the client's outbox.
    pub async fn run(self) {
        match self.work {
            Work::Refuse(err) => {
                let _ = self.conversation.out.send(err.to_json()).await;
            }
            Work::Handle {
                incoming,
                session,
                handshake,
            } => {
                self.conversation
                    .handle_admitted(incoming, session, handshake, self.lane)
                    .await;
            }
        }
    }
}

/// An error for each request, when an answer is not JSON-RPC.
fn failed(status: axum::http::StatusCode, body: &[u8], ids: &[Value]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    ids.iter()
        .map(|id| {
            error_response(
                Some(id),
                ErrorCode::InternalError,
                &format!("request failed with HTTP {status}: {}", text.trim()),
                None,
            )
        })
        .collect()
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
