//! The MCP tasks Tollgate relayed (the `tasks` utility of 2025-11-25, the
//! `io.modelcontextprotocol/tasks` extension of 2026-07-28): who owns each and which
//! tool created it.
//!
//! Behind Tollgate every caller reaches an upstream as Tollgate, so the upstream
//! cannot bind a task to the caller that created it. Tollgate does: each task id an
//! upstream hands out in answer to a `tools/call` is recorded here with its owner,
//! and a `tasks/*` request reaches the upstream only for a task its caller owns.
//!
//! The lookup API, for every stage that needs it:
//!
//! * [`Tasks::record`]`(server, task_id, TaskRecord { owner, tool }, ttl)`: after the
//!   create-task answer, before the client sees it;
//! * [`Tasks::owner_of`]`(server, task_id) -> Option<TaskRecord>`: who owns a task and
//!   which tool created it (`None`: not a task Tollgate relayed, or forgotten);
//!   [`TaskRecord::owned_by`] says whether a caller is its owner;
//! * [`Tasks::owners_of`]`(server, ids)`: the same for many ids in one round trip.
//!
//! A record lives as long as the task's `ttl` (at most [`MAX_TTL`]; an unlimited or
//! missing `ttl` is [`MAX_TTL`]); an owner keeps at most [`TASKS_PER_OWNER`] records
//! (a new one pushes the oldest out), and this process at most [`MAX_TASKS`]. A task
//! Tollgate has forgotten is unknown to everyone, its owner included: the bounds fail
//! closed. With `state.backend: redis` the records live in Redis (each a key expiring
//! with its task, each owner's a sorted set), so every replica agrees.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::Script;
use serde::{Deserialize, Serialize};

use super::remote::{Remote, Unavailable};

/// The longest a task is remembered: a task whose `ttl` is longer, unlimited or unsaid.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Tasks remembered per owner (client and user); a new one pushes out the oldest.
pub const TASKS_PER_OWNER: usize = 1000;
/// Tasks remembered by one process (memory backend).
pub const MAX_TASKS: usize = 100_000;

/// Who created a task: the caller's keys, and its session in the handshake era.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOwner {
    /// The caller's `per: client` key (`client:<name>`, `oauth-client:<id>`, `peer:<addr>`).
    pub client: String,
    /// The caller's `per: user` key (`user:<sub>`, else as `client`).
    pub user: String,
    /// The handshake-era session the task was created in; `None` in the stateless era.
    pub session: Option<String>,
}

impl TaskOwner {
    /// The key the per-owner bound counts under (the session aside: the bound is per client).
    fn bucket(&self) -> String {
        let mut bucket = String::with_capacity(self.client.len() + self.user.len() + 1);
        bucket.push_str(&self.client);
        bucket.push('\n');
        bucket.push_str(&self.user);
        bucket
    }
}

/// What Tollgate knows of a task it relayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Who created it.
    pub owner: TaskOwner,
    /// The tool of the `tools/call` that created it (result rules read it for `tasks/result`).
    pub tool: String,
}

impl TaskRecord {
    /// Whether `caller` owns the task: the same client and user, and, when the task
    /// was created in a session, the same session.
    pub fn owned_by(&self, caller: &TaskOwner) -> bool {
        self.owner.client == caller.client
            && self.owner.user == caller.user
            && (self.owner.session.is_none() || self.owner.session == caller.session)
    }
}

/// The tasks of every server: in this process, or in the shared Redis.
pub struct Tasks {
    local: Mutex<Local>,
    shared: Option<Shared>,
}

struct Shared {
    remote: Arc<Remote>,
    script: Script,
}

type Key = (Arc<str>, String);

#[derive(Default)]
struct Local {
    records: HashMap<Key, (TaskRecord, Instant)>,
    /// Each owner's tasks, oldest first.
    by_owner: HashMap<String, VecDeque<(Key, Instant)>>,
}

/// Records a task (KEYS[1]) unless it is recorded already, and adds it to its owner's
/// sorted set (KEYS[2], scored by expiry), dropping the owner's expired entries and,
/// past ARGV[3], its oldest tasks.
/// ARGV: the record, its ttl in ms, the owner's bound. Redis's own clock is used.
const RECORD: &str = r"
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl, 'NX') then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if excess > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], tonumber(last[2]))
return 1
";

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks::new()
    }
}

impl Tasks {
    /// Tasks kept in this process.
    pub fn new() -> Tasks {
        Tasks {
            local: Mutex::new(Local::default()),
            shared: None,
        }
    }

    /// Tasks kept in the shared Redis.
    pub fn shared(remote: Arc<Remote>) -> Tasks {
        Tasks {
            local: Mutex::new(Local::default()),
            shared: Some(Shared {
                remote,
                script: Script::new(RECORD),
            }),
        }
    }

    /// How long a task whose answer says `ttl_ms` (`None`: unlimited or unsaid) is kept.
    pub fn ttl(ttl_ms: Option<u64>) -> Duration {
        ttl_ms.map_or(MAX_TTL, |ms| Duration::from_millis(ms).min(MAX_TTL))
    }

    /// Records that `task_id` of `server` was created by `record.owner` calling
    /// `record.tool`, for `ttl` (see [`Tasks::ttl`]). A task recorded already keeps its
    /// first owner: an upstream that hands out an id twice cannot move a task.
    pub async fn record(
        &self,
        server: &Arc<str>,
        task_id: &str,
        record: TaskRecord,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let ttl = ttl.clamp(Duration::from_millis(1), MAX_TTL);
        if let Some(shared) = &self.shared {
            let remote = &shared.remote;
            let key = remote.key(&["task", &digest(&[server, task_id])]);
            let owner = remote.key(&["tasks-of", &digest(&[&record.owner.bucket()])]);
            let text = serde_json::to_string(&record).map_err(|e| Unavailable {
                url: remote.shown().to_owned(),
                reason: format!("a task's record cannot be written: {e}"),
            })?;
            let mut conn = remote.connection();
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let mut invocation = shared.script.key(&key);
            invocation
                .key(&owner)
                .arg(text)
                .arg(ttl_ms)
                .arg(TASKS_PER_OWNER);
            return remote
                .run(invocation.invoke_async::<i64>(&mut conn))
                .await
                .map(drop);
        }
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
            return Ok(());
        }
        let key: Key = (server.clone(), task_id.to_owned());
        if local
            .records
            .get(&key)
            .is_some_and(|(_, until)| *until > now)
        {
            return Ok(());
        }
        let bucket = record.owner.bucket();
        local.records.insert(key.clone(), (record, expires));
        let Local { records, by_owner } = &mut *local;
        let owned = by_owner.entry(bucket).or_default();
        owned.retain(|(_, until)| *until > now);
        owned.push_back((key, expires));
        while owned.len() > TASKS_PER_OWNER {
            if let Some((old, until)) = owned.pop_front()
                && records.get(&old).is_some_and(|(_, e)| *e == until)
            {
                records.remove(&old);
            }
        }
        Ok(())
    }

    /// Who owns `task_id` of `server` and which tool created it; `None` for a task
    /// Tollgate did not relay, or has forgotten.
    pub async fn owner_of(
        &self,
        server: &Arc<str>,
        task_id: &str,
    ) -> Result<Option<TaskRecord>, Unavailable> {
        Ok(self
            .owners_of(server, &[task_id])
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// [`Tasks::owner_of`] for each of `ids`, in their order (one round trip to Redis).
    pub async fn owners_of(
        &self,
        server: &Arc<str>,
        ids: &[&str],
    ) -> Result<Vec<Option<TaskRecord>>, Unavailable> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(shared) = &self.shared {
            let remote = &shared.remote;
            let keys: Vec<String> = ids
                .iter()
                .map(|id| remote.key(&["task", &digest(&[server, id])]))
                .collect();
            let mut conn = remote.connection();
            let texts: Vec<Option<String>> = remote
                .run(
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async::<Vec<Option<String>>>(&mut conn),
                )
                .await?;
            return Ok(texts
                .into_iter()
                .map(|text| text.and_then(|t| serde_json::from_str(&t).ok()))
                .collect());
        }
        let now = Instant::now();
        let local = self.local.lock();
        Ok(ids
            .iter()
            .map(|id| {
                local
                    .records
                    .get(&(server.clone(), (*id).to_owned()))
                    .filter(|(_, expires)| *expires > now)
                    .map(|(record, _)| record.clone())
            })
            .collect())
    }

    /// Forgets expired tasks (memory backend; Redis expires its own).
    pub fn sweep(&self) {
        self.local.lock().sweep(Instant::now());
    }

    /// Tasks remembered in this process.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.local.lock().records.len()
    }

    /// Whether no task is remembered in this process.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
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

/// A Redis key part for values a client or upstream chose (any bytes, any length).
fn digest(parts: &[&str]) -> String {
    use sha2::{Digest as _, Sha256};
    use std::fmt::Write as _;
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn owner(client: &str, session: Option<&str>) -> TaskOwner {
        TaskOwner {
            client: format!("client:{client}"),
            user: format!("client:{client}"),
            session: session.map(str::to_owned),
        }
    }

    fn record(client: &str, session: Option<&str>) -> TaskRecord {
        TaskRecord {
            owner: owner(client, session),
            tool: "payroll_report".into(),
        }
    }

    #[tokio::test]
    async fn a_task_is_known_to_its_owner_only_and_per_server() {
        let tasks = Tasks::new();
        let (s, t): (Arc<str>, Arc<str>) = ("s".into(), "t".into());
        tasks
            .record(&s, "T", record("alice", None), Duration::from_secs(60))
            .await
            .unwrap();
        let found = tasks.owner_of(&s, "T").await.unwrap().unwrap();
        assert_eq!(found.tool, "payroll_report");
        assert!(found.owned_by(&owner("alice", None)));
        assert!(found.owned_by(&owner("alice", Some("any"))));
        assert!(!found.owned_by(&owner("bob", None)));
        assert!(tasks.owner_of(&t, "T").await.unwrap().is_none());
        assert!(tasks.owner_of(&s, "U").await.unwrap().is_none());
        // The same id again (a buggy or hostile upstream) does not move the task.
        tasks
            .record(&s, "T", record("bob", None), Duration::from_secs(60))
            .await
            .unwrap();
        let found = tasks.owner_of(&s, "T").await.unwrap().unwrap();
        assert!(found.owned_by(&owner("alice", None)) && !found.owned_by(&owner("bob", None)));
        // A task created in a session belongs to that session.
        tasks
            .record(&s, "S", record("alice", Some("1")), Duration::from_secs(60))
            .await
            .unwrap();
        let found = tasks.owner_of(&s, "S").await.unwrap().unwrap();
        assert!(found.owned_by(&owner("alice", Some("1"))));
        assert!(!found.owned_by(&owner("alice", Some("2"))));
        assert!(!found.owned_by(&owner("alice", None)));
    }

    #[tokio::test]
    async fn records_expire_and_each_owner_keeps_a_bounded_number() {
        let tasks = Tasks::new();
        let s: Arc<str> = "s".into();
        tasks
            .record(&s, "short", record("alice", None), Duration::from_millis(1))
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(tasks.owner_of(&s, "short").await.unwrap().is_none());
        tasks.sweep();
        assert!(tasks.is_empty());
        for i in 0..=TASKS_PER_OWNER {
            tasks
                .record(
                    &s,
                    &i.to_string(),
                    record("alice", None),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        }
        tasks
            .record(&s, "b", record("bob", None), Duration::from_secs(60))
            .await
            .unwrap();
        // Alice's oldest was pushed out; bob's own is untouched.
        let ids = ["0", "1", "b"];
        let found = tasks.owners_of(&s, &ids).await.unwrap();
        assert!(found[0].is_none() && found[1].is_some() && found[2].is_some());
        assert_eq!(tasks.len(), TASKS_PER_OWNER + 1);
        assert_eq!(Tasks::ttl(None), MAX_TTL);
        assert_eq!(Tasks::ttl(Some(1500)), Duration::from_millis(1500));
        assert_eq!(Tasks::ttl(Some(u64::MAX)), MAX_TTL);
    }
}
