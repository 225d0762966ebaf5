//! Handshake-era sessions: ids Tollgate issues, each mapped to the upstream's own
//! session and bound to the server and the client that opened it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use super::remote::{Remote, Unavailable};

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
    /// Requests of this session waiting for the upstream's answer.
    in_flight: AtomicUsize,
    /// Held while re-initializing, so only one request does it.
    pub reinitializing: tokio::sync::Mutex<()>,
    last_seen_ms: AtomicU64,
    /// The replica that opened it (with a shared backend).
    pub replica: Option<Arc<str>>,
    /// Whether its upstream session lives on that replica only (a stdio process, a
    /// legacy SSE connection), so no other replica can serve it.
    pub pinned: bool,
    /// Whether it counts towards its client's `limits.sessions_per_client` here
    /// (opened here, not a copy read from the shared backend).
    counted: bool,
    /// The shared backend it is written to, if any.
    shared: Option<Arc<Remote>>,
    /// When its shared record's expiry was last pushed back.
    refreshed_ms: AtomicU64,
}

/// A session as the shared backend keeps it: what any replica needs to serve it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    server: String,
    client: Option<String>,
    upstream_id: Option<String>,
    initialize: Option<Value>,
    elicitation: bool,
    protocol_version: Option<String>,
    quota_key: String,
    replica: Option<String>,
    pinned: bool,
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

    fn record(&self) -> Record {
        Record {
            server: self.server.to_string(),
            client: self.client.as_deref().map(str::to_owned),
            upstream_id: self.upstream_id(),
            initialize: self.initialize.clone(),
            elicitation: self.elicitation,
            protocol_version: self.protocol_version().as_deref().map(str::to_owned),
            quota_key: self.quota_key.to_string(),
            replica: self.replica.as_deref().map(str::to_owned),
            pinned: self.pinned,
        }
    }

    /// Writes a change to the shared record (keeping its expiry) and tells the other
    /// replicas to drop their copies, by a task of its own.
    fn write_through(&self) {
        let Some(remote) = self.shared.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(text) = serde_json::to_string(&self.record()) else {
            return;
        };
        let id = self.id.clone();
        runtime.spawn(async move {
            let mut conn = remote.connection();
            let key = remote.key(&["session", &id]);
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(&key).arg(&text).arg("XX").arg("KEEPTTL").ignore();
            pipe.cmd("PUBLISH")
                .arg(remote.key(&["sessions", "changed"]))
                .arg(format!("{}\n{id}", remote.replica()))
                .ignore();
            if let Err(err) = remote.run(pipe.query_async::<()>(&mut conn)).await {
                tracing::warn!(session = %id, error = %err, "a session's change could not be shared");
            }
        });
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

/// The session table.
pub struct Sessions {
    map: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Sessions held by each client key.
    held: Mutex<HashMap<Arc<str>, usize>>,
    max: usize,
    per_client: usize,
    streams_per_session: usize,
    idle: Duration,
    epoch: Instant,
    /// The shared backend, and the ids of copies other replicas changed or ended.
    shared: Option<Arc<Remote>>,
    stale: Arc<Mutex<Stale>>,
}

/// Copies of shared sessions to drop before the next lookup.
#[derive(Default)]
struct Stale {
    ids: Vec<String>,
    /// The change feed was interrupted: every copy may be out of date.
    all: bool,
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

impl Sessions {
    /// An empty table holding at most `max` sessions, each forgotten after `idle`.
    pub fn new(max: usize, idle: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            max,
            per_client: usize::MAX,
            streams_per_session: usize::MAX,
            idle,
            epoch: Instant::now(),
            shared: None,
            stale: Arc::new(Mutex::new(Stale::default())),
        }
    }

    /// The same table kept in the shared backend too, so that every replica can
    /// serve every session; a task follows the other replicas' changes.
    pub fn with_shared(mut self, remote: Arc<Remote>) -> Sessions {
        // Each message names a session whose copy here is out of date; after a gap in
        // the feed every copy may be.
        let (stale, gap) = (self.stale.clone(), self.stale.clone());
        remote.follow(
            remote.key(&["sessions", "changed"]),
            move |id| {
                let mut stale = stale.lock();
                // Bounded: a burst beyond it drops every copy instead.
                if stale.ids.len() < 10_000 {
                    stale.ids.push(id.to_owned());
                } else {
                    stale.all = true;
                }
            },
            move || gap.lock().all = true,
        );
        self.shared = Some(remote);
        self
    }

    /// The same table with per-client quotas: at most `per_client` sessions per
    /// client key, and `streams_per_session` GET streams on each session.
    pub fn with_quotas(mut self, per_client: usize, streams_per_session: usize) -> Sessions {
        self.per_client = per_client;
        self.streams_per_session = streams_per_session;
        self
    }

    /// The most sessions (and legacy streams) one client may hold.
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Opens a session with a fresh random id (128 bits).
    pub fn open(&self, new: NewSession) -> Result<Arc<Session>, SessionsFull> {
        let id = random_id();
        let session = Arc::new(Session {
            key: session_key(&id),
            id: id.into(),
            server: new.server,
            client: new.client,
            initialize: new.initialize,
            elicitation: new.elicitation,
            quota_key: new.quota_key,
            streams: AtomicUsize::new(0),
            max_streams: self.streams_per_session,
            protocol_version: Mutex::new(new.protocol_version),
            upstream_id: Mutex::new(new.upstream_id),
            in_flight: AtomicUsize::new(0),
            reinitializing: tokio::sync::Mutex::new(()),
            last_seen_ms: AtomicU64::new(self.now_ms()),
            replica: self.shared.as_ref().map(|r| r.replica().clone()),
            pinned: new.pinned,
            counted: true,
            shared: self.shared.clone(),
            refreshed_ms: AtomicU64::new(self.now_ms()),
        });
        let mut map = self.map.lock();
        if map.len() >= self.max {
            self.sweep_locked(&mut map);
            if map.len() >= self.max {
                return Err(SessionsFull::Total(self.max));
            }
        }
        let mut held = self.held.lock();
        let count = held.entry(session.quota_key.clone()).or_insert(0);
        if *count >= self.per_client {
            drop(held);
            // Idle sessions of this client may be what holds its quota.
            self.sweep_locked(&mut map);
            held = self.held.lock();
            if held.get(&session.quota_key).copied().unwrap_or(0) >= self.per_client {
                let counted = tollgate_policy::counted_on(&session.quota_key)
                    .unwrap_or_else(|| "this client".to_owned());
                return Err(SessionsFull::Client(self.per_client, counted));
            }
        }
        *held.entry(session.quota_key.clone()).or_insert(0) += 1;
        drop(held);
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// Writes a new session to the shared backend (a no-op without one), to expire
    /// after `limits.session_idle` unless used.
    pub async fn share(&self, session: &Session) -> Result<(), Unavailable> {
        let Some(remote) = &self.shared else {
            return Ok(());
        };
        let text = serde_json::to_string(&session.record()).map_err(|e| Unavailable {
            url: remote.shown().to_owned(),
            reason: e.to_string(),
        })?;
        let mut conn = remote.connection();
        let key = remote.key(&["session", &session.id]);
        let idle = self.idle_ms();
        remote
            .run(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&text)
                    .arg("PX")
                    .arg(idle)
                    .query_async::<()>(&mut conn),
            )
            .await
    }

    fn idle_ms(&self) -> u64 {
        u64::try_from(self.idle.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Gives a forgotten session's quota back to its client.
    fn release(&self, session: &Session) {
        if !session.counted {
            return;
        }
        let mut held = self.held.lock();
        if let Some(count) = held.get_mut(&session.quota_key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&session.quota_key);
            }
        }
    }

    /// The live session with this id, refreshed: from this process, else (with a
    /// shared backend) read once from it and kept.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<Session>>, Unavailable> {
        self.drop_stale();
        let found = self.map.lock().get(id).cloned();
        if let Some(session) = found {
            let now = self.now_ms();
            session.last_seen_ms.store(now, Ordering::Relaxed);
            self.refresh(&session, now);
            return Ok(Some(session));
        }
        let Some(remote) = &self.shared else {
            return Ok(None);
        };
        // Session ids are 32 hex digits; nothing else is worth a round trip.
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let mut conn = remote.connection();
        let key = remote.key(&["session", id]);
        let text: Option<String> = remote
            .run(redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        let Some(record) = text.and_then(|t| serde_json::from_str::<Record>(&t).ok()) else {
            return Ok(None);
        };
        let session = Arc::new(Session {
            key: session_key(id),
            id: id.into(),
            server: record.server.into(),
            client: record.client.map(Into::into),
            initialize: record.initialize,
            elicitation: record.elicitation,
            quota_key: record.quota_key.into(),
            streams: AtomicUsize::new(0),
            max_streams: self.streams_per_session,
            protocol_version: Mutex::new(record.protocol_version.map(Into::into)),
            upstream_id: Mutex::new(record.upstream_id),
            in_flight: AtomicUsize::new(0),
            reinitializing: tokio::sync::Mutex::new(()),
            last_seen_ms: AtomicU64::new(self.now_ms()),
            replica: record.replica.map(Into::into),
            pinned: record.pinned,
            counted: false,
            shared: Some(remote.clone()),
            refreshed_ms: AtomicU64::new(self.now_ms()),
        });
        let mut map = self.map.lock();
        if map.len() >= self.max {
            self.sweep_locked(&mut map);
        }
        // A copy that does not fit is still served, just not kept.
        if map.len() < self.max {
            map.entry(session.id.clone())
                .or_insert_with(|| session.clone());
        }
        Ok(Some(session))
    }

    /// Pushes a used shared session's expiry back, at most every eighth of
    /// `limits.session_idle`, by a task of its own (off the request's path).
    fn refresh(&self, session: &Arc<Session>, now: u64) {
        let Some(remote) = &session.shared else {
            return;
        };
        let every = self.idle_ms() / 8;
        if now.saturating_sub(session.refreshed_ms.load(Ordering::Relaxed)) < every {
            return;
        }
        session.refreshed_ms.store(now, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (remote, key, idle) = (
            remote.clone(),
            remote.key(&["session", &session.id]),
            self.idle_ms(),
        );
        runtime.spawn(async move {
            let mut conn = remote.connection();
            let _ = remote
                .run(
                    redis::cmd("PEXPIRE")
                        .arg(&key)
                        .arg(idle)
                        .query_async::<i64>(&mut conn),
                )
                .await;
        });
    }

    /// Drops the copies that other replicas changed or ended since the last lookup.
    fn drop_stale(&self) {
        let stale = {
            let mut stale = self.stale.lock();
            if stale.ids.is_empty() && !stale.all {
                return;
            }
            std::mem::take(&mut *stale)
        };
        let mut map = self.map.lock();
        if stale.all {
            map.retain(|_, s| s.counted);
        }
        for id in stale.ids {
            if let Some(session) = map.remove(id.as_str()) {
                self.release(&session);
            }
        }
    }

    /// Forgets a session, here and (by a task of its own) in the shared backend,
    /// telling the other replicas to drop their copies.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let removed = self.map.lock().remove(id);
        if let Some(session) = &removed {
            self.release(session);
        }
        if let Some(remote) = self.shared.clone()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let id = id.to_owned();
            runtime.spawn(async move {
                let mut conn = remote.connection();
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(remote.key(&["session", &id])).ignore();
                pipe.cmd("PUBLISH")
                    .arg(remote.key(&["sessions", "changed"]))
                    .arg(format!("{}\n{id}", remote.replica()))
                    .ignore();
                if let Err(err) = remote.run(pipe.query_async::<()>(&mut conn)).await {
                    tracing::warn!(session = %id, error = %err, "an ended session could not be removed from the shared state; it expires after limits.session_idle");
                }
            });
        }
        removed
    }

    /// How long an unused session is kept (`limits.session_idle`).
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The most sessions the table holds (`limits.max_sessions`).
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Forgets sessions idle for longer than the limit.
    pub fn sweep(&self) {
        let mut map = self.map.lock();
        self.sweep_locked(&mut map);
    }

    fn sweep_locked(&self, map: &mut HashMap<Arc<str>, Arc<Session>>) {
        let now = self.now_ms();
        let idle = u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX);
        map.retain(|_, s| {
            let live = now.saturating_sub(s.last_seen_ms.load(Ordering::Relaxed)) < idle;
            if !live {
                self.release(s);
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn new(upstream_id: Option<&str>) -> NewSession {
        NewSession {
            server: "s".into(),
            client: None,
            upstream_id: upstream_id.map(Into::into),
            initialize: None,
            elicitation: false,
            protocol_version: None,
            quota_key: "peer:127.0.0.1".into(),
            pinned: false,
        }
    }

    #[test]
    fn issues_unguessable_ids_and_finds_them() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let a = sessions.open(new(Some("up"))).unwrap();
        let b = sessions.open(new(None)).unwrap();
        assert_eq!(a.id.len(), 32);
        assert_ne!(a.id, b.id);
        let get = |id: &str| sessions.map.lock().get(id).cloned();
        assert_eq!(get(&a.id).unwrap().upstream_id().as_deref(), Some("up"));
        assert!(get("nope").is_none());
        sessions.remove(&a.id);
        assert!(get(&a.id).is_none());
    }

    #[test]
    fn refuses_beyond_the_maximum_and_sweeps_idle_ones() {
        let sessions = Sessions::new(2, Duration::from_millis(0));
        sessions.open(new(None)).unwrap();
        sessions.open(new(None)).unwrap();
        // Idle limit 0: both are idle, so a third one fits after the sweep.
        sessions.open(new(None)).unwrap();
        assert_eq!(sessions.len(), 1);
        let strict = Sessions::new(1, Duration::from_secs(3600));
        strict.open(new(None)).unwrap();
        assert!(strict.open(new(None)).is_err());
    }
}

#[cfg(test)]
mod shared_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_sessions_record_carries_what_another_replica_needs() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let session = sessions
            .open(NewSession {
                server: "s".into(),
                client: Some("alice".into()),
                upstream_id: Some("up-1".into()),
                initialize: Some(serde_json::json!({"method": "initialize"})),
                elicitation: true,
                protocol_version: Some("2025-11-25".into()),
                quota_key: "client:alice".into(),
                pinned: true,
            })
            .unwrap();
        session.set_upstream_id(Some("up-2".into()));
        let text = serde_json::to_string(&session.record()).unwrap();
        let record: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(record.server, "s");
        assert_eq!(record.client.as_deref(), Some("alice"));
        assert_eq!(record.upstream_id.as_deref(), Some("up-2"));
        assert_eq!(record.protocol_version.as_deref(), Some("2025-11-25"));
        assert!(record.elicitation && record.pinned);
        assert_eq!(record.initialize, session.initialize);
    }

    #[test]
    fn copies_named_stale_are_dropped_before_the_next_lookup() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let a = sessions.open(of_key("client:a")).unwrap();
        let b = sessions.open(of_key("client:a")).unwrap();
        sessions.stale.lock().ids.push(a.id.to_string());
        sessions.drop_stale();
        assert!(sessions.map.lock().get(&a.id).is_none());
        assert!(sessions.map.lock().get(&b.id).is_some());
        // Its client's quota was given back with it.
        assert_eq!(sessions.held.lock().get("client:a").copied(), Some(1));
    }

    /// A new session with quota key `key` and nothing else.
    pub(super) fn of_key(key: &str) -> NewSession {
        NewSession {
            server: "s".into(),
            client: None,
            upstream_id: None,
            initialize: None,
            elicitation: false,
            protocol_version: None,
            quota_key: key.into(),
            pinned: false,
        }
    }
}

#[cfg(test)]
mod quota_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    use super::shared_tests::of_key as of;

    #[test]
    fn one_client_cannot_take_every_session() {
        let sessions = Sessions::new(10, Duration::from_secs(60)).with_quotas(2, 1);
        let a = sessions.open(of("client:a")).unwrap();
        sessions.open(of("client:a")).unwrap();
        assert!(matches!(
            sessions.open(of("client:a")),
            Err(SessionsFull::Client(2, _))
        ));
        sessions.open(of("client:b")).unwrap();
        sessions.remove(&a.id);
        sessions.open(of("client:a")).unwrap();
    }

    #[test]
    fn a_session_has_one_stream_at_a_time() {
        let sessions = Sessions::new(10, Duration::from_secs(60)).with_quotas(2, 1);
        let session = sessions.open(of("client:a")).unwrap();
        let first = session.open_stream().unwrap();
        assert_eq!(session.open_stream().err(), Some(1));
        drop(first);
        assert!(session.open_stream().is_ok());
    }
}
