//! Task owners in this process: a table of records, each with its expiry, and each
//! owner's records oldest first, for the per-owner bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{MAX_TASKS, TASKS_PER_OWNER, TaskRecord, TaskStore};
use crate::store::remote::Unavailable;

/// The tasks of every server in this process.
#[derive(Default)]
pub struct Tasks {
    local: Mutex<Local>,
}

type Key = (Arc<str>, String);

#[derive(Default)]
struct Local {
    records: HashMap<Key, (TaskRecord, Instant)>,
    /// Each owner's tasks, oldest first.
    by_owner: HashMap<String, VecDeque<(Key, Instant)>>,
}

impl Tasks {
    /// Records `task_id` of `server` for `ttl`, unless it is recorded already; past
    /// [`MAX_TASKS`] it is not recorded (and so unknown to its caller too).
    fn insert(&self, server: &Arc<str>, task_id: &str, record: TaskRecord, ttl: Duration) {
        let now = Instant::now();
        let expires = now + ttl;
        let mut local = self.local.lock();
        if local.records.len() >= MAX_TASKS {
            local.sweep(now);
        }
        if local.records.len() >= MAX_TASKS {
            tracing::warn!(
                server = %server,
                "{MAX_TASKS} tasks are remembered already; this one is unknown to its caller too"
            );
            return;
        }
        let key: Key = (server.clone(), task_id.to_owned());
        if local
            .records
            .get(&key)
            .is_some_and(|(_, until)| *until > now)
        {
            return;
        }
        let bucket = record.owner.bucket();
        local.records.insert(key.clone(), (record, expires));
        let Local { records, by_owner } = &mut *local;
        let owned = by_owner.entry(bucket).or_default();
        owned.retain(|(_, until)| *until > now);
        owned.push_back((key, expires));
        while owned.len() > TASKS_PER_OWNER {
            // An entry whose record was recorded again since (after expiring) is stale.
            if let Some((old, until)) = owned.pop_front()
                && records.get(&old).is_some_and(|(_, e)| *e == until)
            {
                records.remove(&old);
            }
        }
    }

    /// The live record of each of `ids` of `server`, in their order.
    fn lookup(&self, server: &Arc<str>, ids: &[&str]) -> Vec<Option<TaskRecord>> {
        let now = Instant::now();
        let local = self.local.lock();
        ids.iter()
            .map(|id| {
                local
                    .records
                    .get(&(server.clone(), (*id).to_owned()))
                    .filter(|(_, expires)| *expires > now)
                    .map(|(record, _)| record.clone())
            })
            .collect()
    }

    /// Tasks remembered, expired or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.local.lock().records.len()
    }
}

/// Done when called (the futures are ready); never unavailable.
impl TaskStore for Tasks {
    /// Past [`MAX_TASKS`] in this process a task is not recorded (and so unknown
    /// to its caller too).
    fn record(
        &self,
        server: &Arc<str>,
        task_id: &str,
        record: TaskRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Unavailable>> + Send {
        self.insert(server, task_id, record, ttl);
        std::future::ready(Ok(()))
    }

    fn owners_of(
        &self,
        server: &Arc<str>,
        ids: &[&str],
    ) -> impl Future<Output = Result<Vec<Option<TaskRecord>>, Unavailable>> + Send {
        std::future::ready(Ok(self.lookup(server, ids)))
    }

    fn sweep(&self) {
        self.local.lock().sweep(Instant::now());
    }
}

impl Local {
    fn sweep(&mut self, now: Instant) {
        self.records.retain(|_, (_, expires)| *expires > now);
        self.by_owner.retain(|_, owned| {
            owned.retain(|(_, expires)| *expires > now);
            !owned.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::TaskOwner;
    use super::*;

    fn record(client: &str) -> TaskRecord {
        TaskRecord {
            owner: TaskOwner {
                client: format!("client:{client}"),
                user: format!("client:{client}"),
                session: None,
            },
            tool: "payroll_report".into(),
        }
    }

    #[test]
    fn a_sweep_frees_what_expired_and_keeps_the_rest() {
        let tasks = Tasks::default();
        let s: Arc<str> = "s".into();
        tasks.insert(&s, "short", record("alice"), Duration::from_millis(1));
        tasks.insert(&s, "long", record("alice"), Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(tasks.len(), 2, "expired, not yet swept");
        tasks.sweep();
        assert_eq!(tasks.len(), 1);
        assert!(tasks.lookup(&s, &["long"])[0].is_some());
        assert!(tasks.local.lock().by_owner.values().all(|o| o.len() == 1));
    }

    #[test]
    fn the_process_bound_is_kept_and_fails_closed() {
        let tasks = Tasks::default();
        let s: Arc<str> = "s".into();
        // An owner each, so that the per-owner bound drops none.
        for i in 0..MAX_TASKS {
            let id = i.to_string();
            tasks.insert(&s, &id, record(&id), Duration::from_secs(60));
        }
        assert_eq!(tasks.len(), MAX_TASKS);
        tasks.insert(&s, "one-more", record("late"), Duration::from_secs(60));
        assert_eq!(tasks.len(), MAX_TASKS);
        assert!(tasks.lookup(&s, &["one-more"])[0].is_none());
        assert!(tasks.lookup(&s, &["0"])[0].is_some(), "none pushed out");
    }
}
