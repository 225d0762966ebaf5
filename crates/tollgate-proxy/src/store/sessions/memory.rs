//! Sessions in this process: the table, its `limits.max_sessions` and per-client
//! quotas, and idle expiry. The Redis backend keeps one too, for the sessions
//! opened on its replica and the copies it read of others'.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{NewSession, Opened, Origin, Session, SessionStore, SessionsFull};
use crate::store::remote::{Remote, Unavailable};

/// The table of one process.
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

impl Sessions {
    /// An empty table of at most `max` sessions, each forgotten after `idle`.
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

    /// At most `per_client` sessions per client key, `streams_per_session` GET
    /// streams on each.
    pub fn set_quotas(&mut self, per_client: usize, streams_per_session: usize) {
        self.per_client = per_client;
        self.streams_per_session = streams_per_session;
    }

    /// The most sessions one client may hold.
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    /// `limits.session_idle`.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// `limits.session_idle` in milliseconds, at least 1.
    pub fn idle_ms(&self) -> u64 {
        u64::try_from(self.idle.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `limits.max_sessions`.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// This table's clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Where a session object comes from, on this table's clock.
    pub(super) fn origin(&self, shared: Option<&Arc<Remote>>, counted: bool) -> Origin {
        Origin {
            replica: shared.map(|r| r.replica().clone()),
            counted,
            shared: shared.cloned(),
            max_streams: self.streams_per_session,
            now_ms: self.now_ms(),
        }
    }

    /// Opens a session with a fresh id, counted against its client's quota;
    /// `shared` is the backend it is written to, if any.
    pub fn create(
        &self,
        new: NewSession,
        shared: Option<&Arc<Remote>>,
    ) -> Result<Arc<Session>, SessionsFull> {
        let origin = self.origin(shared, true);
        let session = Arc::new(Session::new(super::random_id().into(), new, origin));
        let mut map = self.map.lock();
        if map.len() >= self.max {
            self.sweep_locked(&mut map);
            if map.len() >= self.max {
                return Err(SessionsFull::Total(self.max));
            }
        }
        self.count(&mut map, &session.quota_key)?;
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// Takes one of `key`'s sessions of its quota, sweeping idle ones if it is full.
    fn count(
        &self,
        map: &mut HashMap<Arc<str>, Arc<Session>>,
        key: &Arc<str>,
    ) -> Result<(), SessionsFull> {
        let mut held = self.held.lock();
        if held.get(key).copied().unwrap_or(0) >= self.per_client {
            drop(held);
            // Idle sessions of this client may be what holds its quota.
            self.sweep_locked(map);
            held = self.held.lock();
            if held.get(key).copied().unwrap_or(0) >= self.per_client {
                let counted =
                    tollgate_policy::counted_on(key).unwrap_or_else(|| "this client".to_owned());
                return Err(SessionsFull::Client(self.per_client, counted));
            }
        }
        *held.entry(key.clone()).or_insert(0) += 1;
        Ok(())
    }

    /// Keeps a copy of another replica's session (not counted here), if it fits.
    pub fn keep_copy(&self, session: &Arc<Session>) {
        let mut map = self.map.lock();
        if map.len() >= self.max {
            self.sweep_locked(&mut map);
        }
        // A copy that does not fit is still served, just not kept.
        if map.len() < self.max {
            map.entry(session.id.clone())
                .or_insert_with(|| session.clone());
        }
    }

    /// The live session with this id, its idle time restarted.
    pub fn lookup(&self, id: &str) -> Option<Arc<Session>> {
        let session = self.map.lock().get(id).cloned()?;
        session.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        Some(session)
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

    /// Forgets the copies of other replicas' sessions.
    pub fn drop_copies(&self) {
        self.map.lock().retain(|_, s| s.counted);
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

/// Done when called (the futures are ready); never unavailable.
impl SessionStore for Sessions {
    fn open(&self, new: NewSession) -> impl Future<Output = Result<Opened, SessionsFull>> + Send {
        std::future::ready(self.create(new, None).map(|session| Opened {
            session,
            unshared: None,
        }))
    }

    fn get(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Arc<Session>>, Unavailable>> + Send {
        std::future::ready(Ok(self.lookup(id)))
    }

    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let removed = self.map.lock().remove(id);
        if let Some(session) = &removed {
            self.release(session);
        }
        removed
    }

    fn sweep(&self) {
        let mut map = self.map.lock();
        self.sweep_locked(&mut map);
    }

    fn len(&self) -> usize {
        self.map.lock().len()
    }
}
