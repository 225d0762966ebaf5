//! Stage 2, session: the handshake era's sessions, bound to the server and the
//! client that opened them, and mapped to the upstream's own.

use std::sync::Arc;

use serde_json::Value;
use tollgate_mcp::{Era, Message};

use super::context::{Caller, Context, Meta};
use super::inbound::Decoded;
use crate::error::ProxyError;
use crate::state::{Server, Shared};
use crate::store::sessions::{Missing, NewSession, NotOpened, Opened, Session};
use crate::upstream::{Lane, Payload, Request};

/// The session a message belongs to: none in the stateless era or for
/// `initialize`, else the one its header names.
pub async fn resolve(
    shared: &Shared,
    server: &Server,
    caller: &Caller,
    meta: &Meta,
    decoded: &Decoded,
) -> Result<Option<Arc<Session>>, ProxyError> {
    match decoded.era {
        // The stateless era has no sessions: a stray session header is ignored.
        Era::Stateless => Ok(None),
        Era::Handshake if decoded.initialize => Ok(None),
        Era::Handshake => find(shared, server, caller, meta.session.as_deref())
            .await?
            .map(Some)
            .ok_or(ProxyError::MissingSession),
    }
}

/// The session named by `id`, checked against server and client, and (with a
/// shared backend) that this replica can serve it.
pub async fn find(
    shared: &Shared,
    server: &Server,
    caller: &Caller,
    id: Option<&str>,
) -> Result<Option<Arc<Session>>, ProxyError> {
    let Some(id) = id else {
        return Ok(None);
    };
    let principal = caller.principal();
    match shared
        .sessions
        .get(id, &server.name, principal.as_deref())
        .await
    {
        Ok(session) => Ok(Some(session)),
        Err(Missing::Unknown) => Err(ProxyError::UnknownSession),
        Err(Missing::Unavailable { error, refused }) => {
            shared.metrics.state_unavailable(&server.name, refused);
            tracing::warn!(error = %error, "a session could not be looked up in the shared state");
            // Unreadable is unknown with `allow`: nothing is let through unchecked.
            Err(if refused {
                ProxyError::StateUnavailable(error)
            } else {
                ProxyError::UnknownSession
            })
        }
        Err(Missing::OtherReplica { owner, here }) => Err(ProxyError::OtherReplica {
            replica: owner.to_string(),
            here: here.to_string(),
            server: server.name.to_string(),
        }),
    }
}

/// The largest `initialize` accepted: a session keeps it for as long as it lives.
pub const MAX_INITIALIZE: usize = 64 * 1024;

/// Refuses an `initialize` larger than a session may keep ([`MAX_INITIALIZE`]).
pub fn check_initialize(message: &Message) -> Result<(), ProxyError> {
    let size = json_len(message.as_value());
    if size > MAX_INITIALIZE {
        tracing::warn!(size, "initialize refused: larger than a session keeps");
        return Err(ProxyError::InitializeTooLarge {
            id: message.id().cloned(),
            size,
            limit: MAX_INITIALIZE,
        });
    }
    Ok(())
}

/// The length of `value` as JSON text, counted without building the text.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// What a re-initialize replays of the client's `initialize`: the handshake's own
/// fields, nothing else the client put in it.
fn replayable(initialize: &Value) -> Value {
    let mut params = serde_json::Map::new();
    if let Some(sent) = initialize.get("params").and_then(Value::as_object) {
        for key in ["protocolVersion", "capabilities", "clientInfo", "_meta"] {
            if let Some(value) = sent.get(key) {
                params.insert(key.to_owned(), value.clone());
            }
        }
    }
    serde_json::json!({"jsonrpc": "2.0", "method": "initialize", "params": params})
}

/// Opens the session an `initialize` asked for, once the upstream accepted it (and,
/// with a shared backend, writes it there, so any replica can serve it).
pub async fn open(
    ctx: &Context,
    initialize: &Value,
    upstream_id: Option<String>,
    answer: Option<&Value>,
) -> Result<Arc<Session>, ProxyError> {
    let elicitation = initialize
        .pointer("/params/capabilities/elicitation")
        .is_some();
    let protocol_version = answer
        .and_then(|a| a.pointer("/result/protocolVersion"))
        .and_then(Value::as_str)
        .map(Into::into);
    let shared = ctx.shared();
    let opened = shared
        .sessions
        .open(NewSession {
            server: ctx.server.name.clone(),
            client: ctx.caller.principal(),
            upstream_id: upstream_id.clone(),
            initialize: Some(replayable(initialize)),
            elicitation,
            protocol_version,
            quota_key: ctx.user_key.clone(),
            pinned: ctx.server.pinned,
        })
        .await;
    let session = match opened {
        Ok(Opened { session, unshared }) => {
            if let Some(error) = unshared {
                shared.metrics.state_unavailable(&ctx.server.name, false);
                tracing::warn!(error = %error, "session kept on this replica only: the shared state cannot be reached (state.on_failure: allow)");
            }
            session
        }
        Err(NotOpened::Full(full)) => return Err(full.into()),
        Err(NotOpened::Unavailable(error)) => {
            shared.metrics.state_unavailable(&ctx.server.name, true);
            tracing::warn!(error = %error, "initialize refused: its session could not be written to the shared state (state.on_failure: refuse)");
            if let Some(upstream_id) = upstream_id {
                let _ = ctx.server.upstream.end(ctx.lane, &upstream_id).await;
            }
            return Err(ProxyError::StateUnavailable(error));
        }
    };
    tracing::info!(session = %session.id, "session opened");
    Ok(session)
}

/// Ends a session here and upstream (through `lane`).
pub async fn end(shared: &Shared, server: &Server, session: &Session, lane: Lane) {
    shared.sessions.remove(&session.id);
    shared.approvals.session_closed(&session.id);
    if let Some(upstream_id) = session.upstream_id()
        && let Err(failure) = server.upstream.end(lane, &upstream_id).await
    {
        tracing::warn!(error = %failure, "could not end the upstream session");
    }
    tracing::info!(session = %session.id, "session closed");
}

/// Re-initializes a session the upstream lost (`lost` was its id), replaying the
/// client's `initialize`; returns the new upstream session id. Only when no other
/// request of the session waits on the upstream: their answers are gone with the
/// old session, and the client must learn that rather than see them hang.
pub async fn recover(
    ctx: &Context,
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
    let server = &ctx.server;
    let give_up = |why: String| {
        ctx.shared().sessions.remove(&session.id);
        tracing::warn!(session = %session.id, "upstream session lost: {why}");
        ProxyError::Upstream {
            id: id.cloned(),
            message: format!(
                "upstream `{}` lost this session ({why}); start a new session with `initialize`",
                server.name
            ),
        }
    };
    // The request in flight that asked for this recovery is the one allowed.
    if session.in_flight() > 1 {
        return Err(give_up(
            "other requests were waiting for it, so it was not re-initialized".into(),
        ));
    }
    let Some(initialize) = &session.initialize else {
        return Err(give_up("the original `initialize` is unknown".into()));
    };
    let renewed = reinitialize(ctx, initialize).await.map_err(give_up)?;
    session.set_upstream_id(renewed.clone());
    tracing::info!(session = %session.id, "the upstream lost its session; re-initialized it");
    Ok(renewed)
}

/// Replays the client's `initialize` (under an id of Tollgate's) and its
/// `notifications/initialized`; returns the upstream's new session id.
async fn reinitialize(ctx: &Context, initialize: &Value) -> Result<Option<String>, String> {
    let server = &ctx.server;
    let mut initialize = initialize.clone();
    initialize["id"] = Value::from(format!(
        "tollgate-reinit-{}",
        crate::store::sessions::random_id()
    ));
    let send = |payload, upstream_session| Request {
        payload,
        session: upstream_session,
        protocol_version: None,
        headers: &[],
        owner: &ctx.owner,
        lane: ctx.lane,
    };
    let failed =
        |failure: crate::upstream::Failure| format!("re-initializing failed: upstream {failure}");
    let reply = server
        .upstream
        .send(send(Payload::One(&initialize), None))
        .await
        .map_err(failed)?;
    let renewed = reply.session.clone();
    let answer = tokio::time::timeout(server.timeout, reply.body.first_answer())
        .await
        .ok()
        .flatten()
        .filter(|answer| answer.get("result").is_some())
        .ok_or_else(|| "the upstream refused to re-initialize".to_owned())?;
    let version = answer
        .pointer("/result/protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let initialized = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let mut notify = send(Payload::One(&initialized), renewed.as_deref());
    notify.protocol_version = version.as_deref();
    server.upstream.send(notify).await.map_err(failed)?;
    Ok(renewed)
}
