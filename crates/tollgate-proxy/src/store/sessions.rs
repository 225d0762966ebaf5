//! Handshake-era sessions: ids Tollgate issues, each mapped to the upstream's own
//! session and bound to the server and the client that opened it.
//!
//! [`Sessions`] is the front every caller uses: a table in this process
//! ([`memory`]) or one shared by the replicas through Redis ([`redis`],
//! `state.backend: redis`), behind `state.on_failure` (what an `initialize` or a
//! lookup gets when the shared state cannot be reached) and replica pinning (a
//! session whose upstream lives on another replica is not served here). The caller
//! never learns which backend it has. Both are held to one behaviour by
//! `sessions/contract.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

use super::dispatch;
use super::remote::{Remote, Unavailable};
use crate::config::OnStateFailure;

#[cfg(test)]
mod contract;
mod memory;
mod redis;

/// One downstream session.
#[derive(Debug)]
pub struct Session {
    /// The id Tollgate issued (`Mcp-Session-Id`).
    pub id: Arc<str>,
    /// `session:<id>`, the key of its `per: session` limits (built once, not per call).
    pub key: Arc<str>,
    /// The server it belongs to.
    pub server: Arc<str>,
    /// The authenticated client that opened it.
    pub client: Option<Arc<str>>,
    /// The client's `initialize` request, replayed to re-initialize upstream.
    pub initialize: Option<Value>,
    /// Whether the client declared the elicitation capability in `initialize`.
    pub elicitation: bool,
    /// Whose session it is for `limits.sessions_per_client` (the caller's client key).
    quota_key: Arc<str>,
    /// GET streams open on it, and the most allowed (`limits.streams_per_session`).
    streams: AtomicUsize,
    max_streams: usize,
    /// The protocol version the upstream chose in its `initialize` answer.
    protocol_version: Mutex<Option<Arc<str>>>,
    /// The upstream's session id, when the upstream issued one; replaced when
    /// Tollgate re-initializes a session the upstream lost.
    upstream_id: Mutex<Option<String>>,
    /// Requests of this session waiting for the upstream.
    in_flight: AtomicUsize,
    /// Held while re-initializing, so only one request does it.
    pub reinitializing: tokio::sync::Mutex<()>,
    last_seen_ms: AtomicU64,
    /// The replica that opened it (with a shared backend).
    replica: Option<Arc<str>>,
    /// Whether its upstream session lives on that replica only (a stdio process, a
    /// legacy SSE connection), so no other replica can serve it.
    pinned: bool,
    /// Whether it counts towards its client's `limits.sessions_per_client` here
    /// (opened here, not a copy read from the shared backend).
    counted: bool,
    /// The shared backend it is written to, if any.
    shared: Option<Arc<Remote>>,
    /// When its shared record's expiry was last pushed back.
    refreshed_ms: AtomicU64,
}

/// What a new session starts with.
pub struct NewSession {
    /// The server.
    pub server: Arc<str>,
    /// The authenticated client.
    pub client: Option<Arc<str>>,
    /// The upstream's session id.
    pub upstream_id: Option<String>,
    /// The client's `initialize`.
    pub initialize: Option<Value>,
    /// Whether the client can be asked by elicitation.
    pub elicitation: bool,
    /// The negotiated protocol version.
    pub protocol_version: Option<Arc<str>>,
    /// Whose session it is, for `limits.sessions_per_client`.
    pub quota_key: Arc<str>,
    /// Whether the upstream session lives in this process only (see [`Session::pinned`]).
    pub pinned: bool,
}

/// Where a [`Session`] object comes from: opened here, or a copy of another
/// replica's read from the shared backend.
struct Origin {
    replica: Option<Arc<str>>,
    counted: bool,
    shared: Option<Arc<Remote>>,
    max_streams: usize,
    now_ms: u64,
}

/// A fresh unguessable id: 128 random bits in hex.
pub fn random_id() -> String {
    super::random_hex(16)
}

/// The key of a session's `per: session` limits.
fn session_key(id: &str) -> Arc<str> {
    let mut key = String::with_capacity(8 + id.len());
    key.push_str("session:");
    key.push_str(id);
    key.into()
}

impl Session {
    fn new(id: Arc<str>, new: NewSession, origin: Origin) -> Session {
        Session {
            key: session_key(&id),
            id,
            server: new.server,
            client: new.client,
            initialize: new.initialize,
            elicitation: new.elicitation,
            quota_key: new.quota_key,
            streams: AtomicUsize::new(0),
            max_streams: origin.max_streams,
            protocol_version: Mutex::new(new.protocol_version),
            upstream_id: Mutex::new(new.upstream_id),
            in_flight: AtomicUsize::new(0),
            reinitializing: tokio::sync::Mutex::new(()),
            last_seen_ms: AtomicU64::new(origin.now_ms),
            replica: origin.replica,
            pinned: new.pinned,
            counted: origin.counted,
            shared: origin.shared,
            refreshed_ms: AtomicU64::new(origin.now_ms),
        }
    }

    /// The upstream's current session id.
    pub fn upstream_id(&self) -> Option<String> {
        self.upstream_id.lock().clone()
    }

    /// Replaces the upstream's session id after a re-initialization.
    pub fn set_upstream_id(&self, id: Option<String>) {
        *self.upstream_id.lock() = id;
        self.write_through();
    }

    /// The protocol version the upstream chose, once its `initialize` answer was seen.
    pub fn protocol_version(&self) -> Option<Arc<str>> {
        self.protocol_version.lock().clone()
    }

    /// Records the protocol version the upstream chose.
    pub fn set_protocol_version(&self, version: &str) {
        *self.protocol_version.lock() = Some(version.into());
        self.write_through();
    }

    /// Writes a change to the shared record, if the session has one.
    fn write_through(&self) {
        if let Some(remote) = &self.shared {
            redis::write_through(remote, self);
        }
    }

    /// Counts a request as waiting for the upstream until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Requests waiting for the upstream.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Takes one of the session's GET stream slots (`limits.streams_per_session`)
    /// until the returned guard drops; `Err` with the limit when none is free.
    pub fn open_stream(self: &Arc<Self>) -> Result<OpenStream, usize> {
        let taken = self
            .streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < self.max_streams).then_some(open + 1)
            });
        match taken {
            Ok(_) => Ok(OpenStream(self.clone())),
            Err(_) => Err(self.max_streams),
        }
    }
}

/// One open GET stream of a session.
pub struct OpenStream(Arc<Session>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request of a session waiting for the upstream.
pub struct InFlight(Arc<Session>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// No session can be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionsFull {
    /// The table is full.
    #[error("too many sessions ({0}, limits.max_sessions); try again later")]
    Total(usize),
    /// This client holds as many sessions (or legacy streams) as it may.
    #[error(
        "{1} already holds {0} sessions (limits.sessions_per_client); end one (DELETE, or close its stream) or let one expire, then try again"
    )]
    Client(usize, String),
}

/// What a backend of the session table does. [`memory::Sessions`] and
/// [`redis::Sessions`] implement it; `sessions/contract.rs` holds both to one
/// behaviour.
pub trait SessionStore {
    /// Opens a session with a fresh random id (128 bits in hex), counted against
    /// its client's quota: `Err` when the table (`limits.max_sessions`) or the
    /// client's quota is full even after idle sessions are swept. A shared
    /// backend writes it there too, to expire after `limits.session_idle` unless
    /// used; `unshared` says why it could not (it is then kept here only).
    fn open(&self, new: NewSession) -> impl Future<Output = Result<Opened, SessionsFull>> + Send;

    /// The live session with this id, whoever opened it, its idle time restarted:
    /// from this process, else read once from a shared backend and kept (a copy
    /// that does not count against its client's quota here). A change made, or a
    /// removal, on another replica is seen a moment later. `Err` when the shared
    /// backend cannot be read.
    fn get(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Arc<Session>>, Unavailable>> + Send;

    /// Forgets a session, giving its quota back: here at once, in a shared backend
    /// (and the other replicas' copies) soon. The session, if it was here.
    fn remove(&self, id: &str) -> Option<Arc<Session>>;

    /// Forgets sessions idle longer than `limits.session_idle` (shared records
    /// expire by themselves).
    fn sweep(&self);

    /// Sessions held here (copies of other replicas' included).
    fn len(&self) -> usize;
}

/// The session table, in this process or shared by the replicas.
pub struct Sessions {
    store: Backend,
    on_failure: OnStateFailure,
}

/// The backends, dispatched without boxing: a lookup costs one match.
enum Backend {
    Memory(memory::Sessions),
    Redis(redis::Sessions),
}

/// A session opened.
#[derive(Debug)]
pub struct Opened {
    /// The session.
    pub session: Arc<Session>,
    /// Why it is kept on this replica only, if the shared state could not be
    /// written and `state.on_failure` is `allow`.
    pub unshared: Option<Unavailable>,
}

/// Why no session was opened.
#[derive(Debug)]
pub enum NotOpened {
    /// No room: the table or the client's quota is full.
    Full(SessionsFull),
    /// The shared state could not be written (`state.on_failure: refuse`).
    Unavailable(Unavailable),
}

/// Why a lookup found no session to serve.
#[derive(Debug)]
pub enum Missing {
    /// No such session (or not the asking server's and client's).
    Unknown,
    /// The shared state could not be read: with `state.on_failure: refuse` the call
    /// is refused for it (`refused`), else the session is unknown.
    Unavailable {
        /// Why.
        error: Unavailable,
        /// Whether `state.on_failure` is `refuse`.
        refused: bool,
    },
    /// The session's upstream lives on another replica (a process or connection of it).
    OtherReplica {
        /// The replica that opened it.
        owner: Arc<str>,
        /// This replica.
        here: Arc<str>,
    },
}

impl Sessions {
    /// An empty table in this process holding at most `max` sessions, each
    /// forgotten after `idle`.
    pub fn new(max: usize, idle: Duration) -> Sessions {
        Sessions {
            store: Backend::Memory(memory::Sessions::new(max, idle)),
            on_failure: OnStateFailure::default(),
        }
    }

    /// The same table kept in the shared backend too, so that every replica can
    /// serve every session; `on_failure` says what a call gets when it cannot be
    /// reached.
    pub fn with_shared(self, remote: Arc<Remote>, on_failure: OnStateFailure) -> Sessions {
        let local = match self.store {
            Backend::Memory(local) => local,
            Backend::Redis(shared) => shared.into_local(),
        };
        Sessions {
            store: Backend::Redis(redis::Sessions::new(local, remote)),
            on_failure,
        }
    }

    /// The same table with per-client quotas: at most `per_client` sessions per
    /// client key, and `streams_per_session` GET streams on each session.
    pub fn with_quotas(mut self, per_client: usize, streams_per_session: usize) -> Sessions {
        self.local_mut().set_quotas(per_client, streams_per_session);
        self
    }

    fn local(&self) -> &memory::Sessions {
        match &self.store {
            Backend::Memory(local) => local,
            Backend::Redis(shared) => shared.local(),
        }
    }

    fn local_mut(&mut self) -> &mut memory::Sessions {
        match &mut self.store {
            Backend::Memory(local) => local,
            Backend::Redis(shared) => shared.local_mut(),
        }
    }

    /// The most sessions (and legacy streams) one client may hold.
    pub fn per_client(&self) -> usize {
        self.local().per_client()
    }

    /// Opens a session with a fresh random id (128 bits) and, with a shared
    /// backend, writes it there, to expire after `limits.session_idle` unless used.
    pub async fn open(&self, new: NewSession) -> Result<Opened, NotOpened> {
        let opened = dispatch!(&self.store, store => store.open(new).await);
        let opened = opened.map_err(NotOpened::Full)?;
        if self.on_failure == OnStateFailure::Refuse
            && let Some(error) = opened.unshared
        {
            self.remove(&opened.session.id);
            return Err(NotOpened::Unavailable(error));
        }
        Ok(opened)
    }

    /// The live session `id` of `server` opened by `client`, refreshed: from this
    /// process, else (with a shared backend) read once from it and kept; and only if
    /// this replica can serve it.
    pub async fn get(
        &self,
        id: &str,
        server: &str,
        client: Option<&str>,
    ) -> Result<Arc<Session>, Missing> {
        let found = dispatch!(&self.store, store => store.get(id).await);
        let session = found
            .map_err(|error| Missing::Unavailable {
                error,
                refused: self.on_failure == OnStateFailure::Refuse,
            })?
            .ok_or(Missing::Unknown)?;
        // A session is only valid for the server and client that opened it.
        if *session.server != *server || session.client.as_deref() != client {
            return Err(Missing::Unknown);
        }
        self.pinned_elsewhere(&session)?;
        Ok(session)
    }

    /// Replica pinning: a session whose upstream lives on the replica that opened
    /// it is served there only.
    fn pinned_elsewhere(&self, session: &Session) -> Result<(), Missing> {
        let Backend::Redis(shared) = &self.store else {
            return Ok(());
        };
        match &session.replica {
            Some(owner) if session.pinned && owner != shared.replica() => {
                Err(Missing::OtherReplica {
                    owner: owner.clone(),
                    here: shared.replica().clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Forgets a session, here and (by a task of its own) in the shared backend,
    /// telling the other replicas to drop their copies.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        dispatch!(&self.store, store => store.remove(id))
    }

    /// How long an unused session is kept (`limits.session_idle`).
    pub fn idle(&self) -> Duration {
        self.local().idle()
    }

    /// The most sessions the table holds (`limits.max_sessions`).
    pub fn capacity(&self) -> usize {
        self.local().capacity()
    }

    /// Number of live sessions (and copies of other replicas' kept here).
    pub fn len(&self) -> usize {
        dispatch!(&self.store, store => store.len())
    }

    /// Forgets sessions idle for longer than the limit (shared records expire by
    /// themselves).
    pub fn sweep(&self) {
        dispatch!(&self.store, store => store.sweep());
    }
}
