//! Handshake-era sessions: ids Tollgate issues, each mapped to the upstream's own
//! session and bound to the server and the client that opened it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

/// One downstream session.
#[derive(Debug)]
pub struct Session {
    /// The id Tollgate issued (`Mcp-Session-Id`).
    pub id: Arc<str>,
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
}

/// A fresh unguessable id: 128 random bits in hex.
pub fn random_id() -> String {
    super::random_hex(16)
}

impl Session {
    /// The upstream's current session id.
    pub fn upstream_id(&self) -> Option<String> {
        self.upstream_id.lock().clone()
    }

    /// Replaces the upstream's session id after a re-initialization.
    pub fn set_upstream_id(&self, id: Option<String>) {
        *self.upstream_id.lock() = id;
    }

    /// The protocol version the upstream chose, once its `initialize` answer was seen.
    pub fn protocol_version(&self) -> Option<Arc<str>> {
        self.protocol_version.lock().clone()
    }

    /// Records the protocol version the upstream chose.
    pub fn set_protocol_version(&self, version: &str) {
        *self.protocol_version.lock() = Some(version.into());
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
}

/// No session can be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionsFull {
    /// The table is full.
    #[error("too many sessions ({0}, limits.max_sessions); try again later")]
    Total(usize),
    /// This client holds as many sessions (or legacy streams) as it may.
    #[error(
        "this client already holds {0} sessions (limits.sessions_per_client); end one (DELETE, or close its stream) or let one expire, then try again"
    )]
    Client(usize),
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
        }
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
        let session = Arc::new(Session {
            id: random_id().into(),
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
                return Err(SessionsFull::Client(self.per_client));
            }
        }
        *held.entry(session.quota_key.clone()).or_insert(0) += 1;
        drop(held);
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// Gives a forgotten session's quota back to its client.
    fn release(&self, session: &Session) {
        let mut held = self.held.lock();
        if let Some(count) = held.get_mut(&session.quota_key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&session.quota_key);
            }
        }
    }

    /// The live session with this id, refreshed.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let session = self.map.lock().get(id).cloned()?;
        session.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        Some(session)
    }

    /// Forgets a session.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let removed = self.map.lock().remove(id);
        if let Some(session) = &removed {
            self.release(session);
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
        }
    }

    #[test]
    fn issues_unguessable_ids_and_finds_them() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let a = sessions.open(new(Some("up"))).unwrap();
        let b = sessions.open(new(None)).unwrap();
        assert_eq!(a.id.len(), 32);
        assert_ne!(a.id, b.id);
        assert_eq!(
            sessions.get(&a.id).unwrap().upstream_id().as_deref(),
            Some("up")
        );
        assert!(sessions.get("nope").is_none());
        sessions.remove(&a.id);
        assert!(sessions.get(&a.id).is_none());
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
mod quota_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn of(key: &str) -> NewSession {
        NewSession {
            server: "s".into(),
            client: None,
            upstream_id: None,
            initialize: None,
            elicitation: false,
            protocol_version: None,
            quota_key: key.into(),
        }
    }

    #[test]
    fn one_client_cannot_take_every_session() {
        let sessions = Sessions::new(10, Duration::from_secs(60)).with_quotas(2, 1);
        let a = sessions.open(of("client:a")).unwrap();
        sessions.open(of("client:a")).unwrap();
        assert!(matches!(
            sessions.open(of("client:a")),
            Err(SessionsFull::Client(2))
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
