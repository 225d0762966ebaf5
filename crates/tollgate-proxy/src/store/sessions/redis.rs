//! Sessions shared by the replicas through Redis (`state.backend: redis`): each
//! session a record any replica can read and serve, expiring after
//! `limits.session_idle` unless used. A replica keeps the sessions it opened, and
//! the copies it read of others', in a table of its own ([`memory`](super::memory));
//! a change feed tells it which copies another replica changed or ended.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use serde_json::Value;

use super::{NewSession, Opened, Session, SessionStore, SessionsFull, memory};
use crate::store::remote::{Remote, Unavailable};

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

impl Record {
    fn of(session: &Session) -> Record {
        Record {
            server: session.server.to_string(),
            client: session.client.as_deref().map(str::to_owned),
            upstream_id: session.upstream_id(),
            initialize: session.initialize.clone(),
            elicitation: session.elicitation,
            protocol_version: session.protocol_version().as_deref().map(str::to_owned),
            quota_key: session.quota_key.to_string(),
            replica: session.replica.as_deref().map(str::to_owned),
            pinned: session.pinned,
        }
    }
}

/// The shared table, and this replica's own.
pub struct Sessions {
    local: memory::Sessions,
    remote: Arc<Remote>,
    /// The ids of copies other replicas changed or ended.
    stale: Arc<Mutex<Stale>>,
    /// Sessions ended here whose shared record is still being removed: not read
    /// back meanwhile.
    ending: Arc<Mutex<HashSet<String>>>,
}

/// Most sessions remembered as being removed; past it one may be read back for the
/// round trip its removal takes.
const MAX_ENDING: usize = 10_000;

/// Copies of shared sessions to drop before the next lookup.
#[derive(Default)]
struct Stale {
    ids: Vec<String>,
    /// The change feed was interrupted: every copy may be out of date.
    all: bool,
}

impl Sessions {
    /// `local` kept in the shared backend too; a task follows the other replicas'
    /// changes.
    pub fn new(local: memory::Sessions, remote: Arc<Remote>) -> Sessions {
        let stale = Arc::new(Mutex::new(Stale::default()));
        // Each message names a session whose copy here is out of date; after a gap in
        // the feed every copy may be.
        let (changed, gap) = (stale.clone(), stale.clone());
        remote.follow(
            remote.key(&["sessions", "changed"]),
            move |id| {
                let mut stale = changed.lock();
                // Bounded: a burst beyond it drops every copy instead.
                if stale.ids.len() < 10_000 {
                    stale.ids.push(id.to_owned());
                } else {
                    stale.all = true;
                }
            },
            move || gap.lock().all = true,
        );
        Sessions {
            local,
            remote,
            stale,
            ending: Arc::default(),
        }
    }

    /// This replica's own table.
    pub fn local(&self) -> &memory::Sessions {
        &self.local
    }

    /// This replica's own table, to set it up.
    pub fn local_mut(&mut self) -> &mut memory::Sessions {
        &mut self.local
    }

    /// This replica's own table, no longer shared.
    pub fn into_local(self) -> memory::Sessions {
        self.local
    }

    /// This replica's name.
    pub fn replica(&self) -> &Arc<str> {
        self.remote.replica()
    }

    /// Writes a new session to the shared backend, to expire after
    /// `limits.session_idle` unless used.
    async fn share(&self, session: &Session) -> Result<(), Unavailable> {
        let text = serde_json::to_string(&Record::of(session)).map_err(|e| Unavailable {
            url: self.remote.shown().to_owned(),
            reason: e.to_string(),
        })?;
        let mut conn = self.remote.connection();
        let key = self.remote.key(&["session", &session.id]);
        self.remote
            .run(
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(&text)
                    .arg("PX")
                    .arg(self.local.idle_ms())
                    .query_async::<()>(&mut conn),
            )
            .await
    }

    /// Pushes a used session's expiry back, at most every eighth of
    /// `limits.session_idle`, by a task of its own (off the request's path).
    fn refresh(&self, session: &Arc<Session>) {
        let now = self.local.now_ms();
        let idle = self.local.idle_ms();
        if now.saturating_sub(session.refreshed_ms.load(Ordering::Relaxed)) < idle / 8 {
            return;
        }
        session.refreshed_ms.store(now, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (remote, key) = (
            self.remote.clone(),
            self.remote.key(&["session", &session.id]),
        );
        runtime.spawn(async move {
            let mut conn = remote.connection();
            let _ = remote
                .run(
                    ::redis::cmd("PEXPIRE")
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
        if stale.all {
            self.local.drop_copies();
        }
        for id in stale.ids {
            self.local.remove(&id);
        }
    }
}

impl SessionStore for Sessions {
    /// Opened here, then written to the shared backend (one round trip).
    async fn open(&self, new: NewSession) -> Result<Opened, SessionsFull> {
        let session = self.local.create(new, Some(&self.remote))?;
        let unshared = self.share(&session).await.err();
        Ok(Opened { session, unshared })
    }

    /// The live session with this id, refreshed: from this replica's table, else
    /// read once from the shared backend and kept.
    async fn get(&self, id: &str) -> Result<Option<Arc<Session>>, Unavailable> {
        self.drop_stale();
        if let Some(session) = self.local.lookup(id) {
            self.refresh(&session);
            return Ok(Some(session));
        }
        // Session ids are 32 hex digits; nothing else is worth a round trip.
        if id.len() != 32
            || !id.bytes().all(|b| b.is_ascii_hexdigit())
            || self.ending.lock().contains(id)
        {
            return Ok(None);
        }
        let mut conn = self.remote.connection();
        let key = self.remote.key(&["session", id]);
        let text: Option<String> = self
            .remote
            .run(::redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        let Some(record) = text.and_then(|t| serde_json::from_str::<Record>(&t).ok()) else {
            return Ok(None);
        };
        let mut origin = self.local.origin(Some(&self.remote), false);
        origin.replica = record.replica.map(Into::into);
        let new = NewSession {
            server: record.server.into(),
            client: record.client.map(Into::into),
            upstream_id: record.upstream_id,
            initialize: record.initialize,
            elicitation: record.elicitation,
            protocol_version: record.protocol_version.map(Into::into),
            quota_key: record.quota_key.into(),
            pinned: record.pinned,
        };
        let session = Arc::new(Session::new(id.into(), new, origin));
        self.local.keep_copy(&session);
        Ok(Some(session))
    }

    /// Forgets a session, here and (by a task of its own) in the shared backend,
    /// telling the other replicas to drop their copies.
    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let removed = self.local.remove(id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return removed;
        };
        let (remote, id, ending) = (self.remote.clone(), id.to_owned(), self.ending.clone());
        {
            let mut ending = ending.lock();
            if ending.len() < MAX_ENDING {
                ending.insert(id.clone());
            }
        }
        runtime.spawn(async move {
            let mut conn = remote.connection();
            let mut pipe = ::redis::pipe();
            pipe.cmd("DEL").arg(remote.key(&["session", &id])).ignore();
            pipe.cmd("PUBLISH")
                .arg(remote.key(&["sessions", "changed"]))
                .arg(format!("{}\n{id}", remote.replica()))
                .ignore();
            if let Err(err) = remote.run(pipe.query_async::<()>(&mut conn)).await {
                tracing::warn!(session = %id, error = %err, "an ended session could not be removed from the shared state; it expires after limits.session_idle");
            }
            ending.lock().remove(&id);
        });
        removed
    }

    fn sweep(&self) {
        self.local.sweep();
    }

    fn len(&self) -> usize {
        self.local.len()
    }
}

/// Writes a change of `session` to its shared record (keeping its expiry) and tells
/// the other replicas to drop their copies, by a task of its own.
pub fn write_through(remote: &Arc<Remote>, session: &Session) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(text) = serde_json::to_string(&Record::of(session)) else {
        return;
    };
    let (remote, id) = (remote.clone(), session.id.clone());
    runtime.spawn(async move {
        let mut conn = remote.connection();
        let key = remote.key(&["session", &id]);
        let mut pipe = ::redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(&text)
            .arg("XX")
            .arg("KEEPTTL")
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(remote.key(&["sessions", "changed"]))
            .arg(format!("{}\n{id}", remote.replica()))
            .ignore();
        if let Err(err) = remote.run(pipe.query_async::<()>(&mut conn)).await {
            tracing::warn!(session = %id, error = %err, "a session's change could not be shared");
        }
    });
}
