//! The types every stage shares: who calls ([`Caller`]), what arrives ([`Inbound`]),
//! what is answered ([`Answer`]), and one request's [`Context`]. The bottom of the
//! core: it imports none of the stages.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tollgate_mcp::{Era, Incoming};

use crate::approvals::elicit::Elicitations;
use crate::approvals::state::Keys;
use crate::state::{Server, Shared};
use crate::store::limits::peer_key;
use crate::store::sessions::Session;
use crate::upstream::{Body, Json, Lane, Owner};

/// Who sends, as the front door established it. Built once per request
/// ([`Caller::new`]), with the keys its limits and quotas count under.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client whose `clients:` key was presented, if any.
    pub client: Option<Arc<str>>,
    /// The peer's address.
    pub peer: IpAddr,
    /// Whom a valid OAuth access token names, if one was presented.
    pub identity: Option<Arc<Identity>>,
    client_key: Arc<str>,
    user_key: Arc<str>,
}

/// What a validated OAuth access token says about its bearer (kept by the store,
/// which an approval carries it to).
pub use crate::store::principal::Identity;

impl Caller {
    /// A caller: an API key's client, or a token's bearer, or neither.
    pub fn new(client: Option<Arc<str>>, peer: IpAddr, identity: Option<Arc<Identity>>) -> Caller {
        let key = |kind: &str, name: &str| -> Arc<str> {
            let mut key = String::with_capacity(kind.len() + name.len());
            key.push_str(kind);
            key.push_str(name);
            key.into()
        };
        // `per: client` limits: the API key's client, the token's OAuth client
        // (else its user), else the address (an IPv6 peer's /64). `per: user`
        // limits, per-client quotas and shared upstream traffic: the token's user,
        // else the API key's client, else the address.
        let (client_key, user_key) = match (&client, &identity) {
            (Some(client), _) => {
                let both = key("client:", client);
                (both.clone(), both)
            }
            (None, Some(id)) => {
                let user = key("user:", &id.user);
                match &id.client_id {
                    Some(client_id) => (key("oauth-client:", client_id), user),
                    None => (user.clone(), user),
                }
            }
            (None, None) => {
                let both = key("peer:", &peer_key(peer));
                (both.clone(), both)
            }
        };
        Caller {
            client,
            peer,
            identity,
            client_key,
            user_key,
        }
    }

    /// A caller with no credentials but its address.
    pub fn anonymous(peer: IpAddr) -> Caller {
        Caller::new(None, peer, None)
    }

    /// Key of `per: client` limits: the API key's client, the token's OAuth
    /// client (else its user), else the address (an IPv6 peer's /64).
    pub fn client_key(&self) -> &Arc<str> {
        &self.client_key
    }

    /// Key of `per: user` limits, of per-client quotas, and owner of shared
    /// upstream traffic: the token's user, else the API key's client, else the address.
    pub fn user_key(&self) -> &Arc<str> {
        &self.user_key
    }

    /// Who owns what this caller opens (sessions, streams): the API key's client,
    /// or the token's user; `None` for an anonymous caller.
    pub fn principal(&self) -> Option<Arc<str>> {
        match (&self.client, &self.identity) {
            (Some(client), _) => Some(client.clone()),
            (None, Some(id)) => Some(format!("user:{}", id.user).into()),
            (None, None) => None,
        }
    }

    /// The name logs show for the caller: the client, else the token's user.
    pub fn shown_name(&self) -> Option<&str> {
        self.client
            .as_deref()
            .or(self.identity.as_deref().map(|id| &*id.user))
    }
}

/// Headers a binding carried with a message (Streamable HTTP has them; stdio and
/// legacy SSE do not).
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// `Mcp-Session-Id`, as sent.
    pub session: Option<String>,
    /// `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`; `None` on a binding without headers.
    pub routing: Option<Routing>,
    /// `Mcp-Param-*` headers, forwarded as they are.
    pub params: Vec<(HeaderName, HeaderValue)>,
    /// `traceparent`/`tracestate`, kept only with `telemetry:`.
    pub trace: Option<Box<crate::telemetry::TraceHeaders>>,
    /// Whether the message came over a pipe (`tollgate stdio`) rather than TCP.
    pub pipe: bool,
    /// The lane it came in on, whose upstream connections carry it.
    pub lane: Lane,
}

/// The routing headers of a Streamable HTTP request, as received.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<HeaderValue>,
    /// `Mcp-Method`.
    pub method: Option<HeaderValue>,
    /// `Mcp-Name`.
    pub name: Option<HeaderValue>,
}

/// What a front door hands the core: a message or a batch, and its headers.
pub struct Inbound {
    /// The decoded body.
    pub incoming: Incoming,
    /// Its headers.
    pub meta: Meta,
}

/// What the core answers.
pub struct Answer {
    /// In HTTP terms: 200 for an answer, 202 for nothing to answer, or what the
    /// upstream said.
    pub status: StatusCode,
    /// The answer: a message, a stream of messages, or nothing.
    pub body: Body,
    /// The session an `initialize` opened.
    pub session: Option<Arc<str>>,
    /// `Retry-After`, from the upstream.
    pub retry_after: Option<HeaderValue>,
}

impl Answer {
    /// A message of Tollgate's own.
    pub fn message(message: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: Body::Json(Json::Value(message)),
            session: None,
            retry_after: None,
        }
    }

    /// Nothing to answer (202).
    pub fn accepted() -> Answer {
        Answer {
            status: StatusCode::ACCEPTED,
            body: Body::Empty,
            session: None,
            retry_after: None,
        }
    }
}

/// The core, shared by every front door.
#[derive(Clone)]
pub struct Core {
    shared: Arc<Shared>,
    pub(super) elicitations: Arc<Elicitations>,
    /// Seals and checks the `requestState` of stateless-era retries.
    pub(super) state_key: Arc<Keys>,
    /// Calls being held, so that the client's `notifications/cancelled` withdraws one.
    pub(super) holding: Arc<Holding>,
}

/// Held calls by owner and request id.
#[derive(Default)]
pub struct Holding {
    calls: parking_lot::Mutex<
        std::collections::HashMap<String, (u64, tokio::sync::oneshot::Sender<()>)>,
    >,
    next: std::sync::atomic::AtomicU64,
}

/// A held call's entry; dropping it removes the entry.
pub struct HoldEntry {
    table: Arc<Holding>,
    key: String,
    token: u64,
}

impl Holding {
    /// Registers a held call; the receiver fires when the client cancels it.
    pub fn hold(self: &Arc<Self>, key: String) -> (HoldEntry, tokio::sync::oneshot::Receiver<()>) {
        let token = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        // A request id the client reuses replaces the older entry, whose wait then goes on.
        self.calls.lock().insert(key.clone(), (token, cancel));
        let entry = HoldEntry {
            table: self.clone(),
            key,
            token,
        };
        (entry, cancelled)
    }

    /// Withdraws a held call; `true` when one was held under `key`.
    pub fn cancel(&self, key: &str) -> bool {
        match self.calls.lock().remove(key) {
            // The held task may have just finished; then there is nothing to stop.
            Some((_, cancel)) => cancel.send(()).is_ok(),
            None => false,
        }
    }
}

impl Drop for HoldEntry {
    fn drop(&mut self) {
        let mut calls = self.table.calls.lock();
        if calls
            .get(&self.key)
            .is_some_and(|(token, _)| *token == self.token)
        {
            calls.remove(&self.key);
        }
    }
}

/// One request's place in the world: server, caller, session, era. Owned, so a
/// held call can carry it past the request handler.
#[derive(Clone)]
pub struct Context {
    /// The core.
    pub core: Core,
    /// The server the request is for.
    pub server: Arc<Server>,
    /// Who sent it.
    pub caller: Caller,
    /// Its handshake-era session.
    pub session: Option<Arc<Session>>,
    /// Its era.
    pub era: Era,
    /// Headers forwarded upstream as they are.
    pub forwarded: Vec<(HeaderName, HeaderValue)>,
    /// Its owner on a shared upstream.
    pub owner: Owner,
    /// Key of `per: client` limits.
    pub client_key: Arc<str>,
    /// Key of `per: user` limits and of per-client quotas.
    pub user_key: Arc<str>,
    /// Key of `per: session` limits.
    pub session_key: Arc<str>,
    /// The lane it came in on, whose upstream connections carry its exchanges.
    pub lane: Lane,
}

impl Context {
    pub(super) fn new(
        core: &Core,
        server: &Arc<Server>,
        caller: &Caller,
        session: Option<Arc<Session>>,
        era: Era,
        forwarded: Vec<(HeaderName, HeaderValue)>,
        lane: Lane,
    ) -> Context {
        let client_key = caller.client_key.clone();
        let user_key = caller.user_key.clone();
        let session_key = match &session {
            Some(session) => session.key.clone(),
            None => user_key.clone(),
        };
        Context {
            core: core.clone(),
            server: server.clone(),
            caller: caller.clone(),
            owner: Owner {
                client: user_key.clone(),
                session: session.as_ref().map(|s| s.id.clone()),
            },
            session,
            era,
            forwarded,
            client_key,
            user_key,
            session_key,
            lane,
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.core.shared
    }
}

impl Core {
    /// The core over `shared`, sealing `requestState`s with `state_key`.
    pub fn new(shared: Arc<Shared>, state_key: Keys) -> Core {
        Core {
            shared,
            elicitations: Arc::new(Elicitations::default()),
            state_key: Arc::new(state_key),
            holding: Arc::default(),
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}
