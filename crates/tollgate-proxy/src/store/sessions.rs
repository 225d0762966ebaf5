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
    max: usize,
    idle: Duration,
    epoch: Instant,
}

/// The table is full.
#[derive(Debug, thiserror::Error)]
#[error("too many sessions ({0}, limits.max_sessions); try again later")]
pub struct SessionsFull(pub usize);

impl Sessions {
    /// An empty table holding at most `max` sessions, each forgotten after `idle`.
    pub fn new(max: usize, idle: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            max,
            idle,
            epoch: Instant::now(),
        }
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
                return Err(SessionsFull(self.max));
            }
        }
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// The live session with this id, refreshed.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let session = self.map.lock().get(id).cloned()?;
        session.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        Some(session)
    }

    /// Forgets a session.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().remove(id)
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
        map.retain(|_, s| now.saturating_sub(s.last_seen_ms.load(Ordering::Relaxed)) < idle);
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
