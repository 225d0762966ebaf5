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
//! closed.
//!
//! [`Tasks`] is the front: the records live in this process ([`memory`]) or in the
//! shared Redis ([`redis`], `state.backend: redis`), where every replica agrees. Both
//! are held to one behaviour by `tasks/contract.rs`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dispatch;
use super::remote::{Remote, Unavailable};

#[cfg(test)]
mod contract;
mod memory;
mod redis;

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

/// What a backend of task owners does. [`memory::Tasks`] and [`redis::Tasks`]
/// implement it; `tasks/contract.rs` holds both to one behaviour.
pub trait TaskStore {
    /// Records `task_id` of `server` for `ttl` (1 ms to [`MAX_TTL`]: the front
    /// bounds it), unless a live record of it exists: a task keeps its first owner.
    /// An owner keeps at most [`TASKS_PER_OWNER`] live records, the deployment's
    /// bound (a new one pushes the owner's oldest out, whatever their ttls). `Err`
    /// when the records cannot be reached.
    fn record(
        &self,
        server: &Arc<str>,
        task_id: &str,
        record: TaskRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Unavailable>> + Send;

    /// The live record of each of `ids` (at least one: the front answers none
    /// itself) of `server`, in their order; `None` for an id never recorded,
    /// expired or pushed out. What one replica recorded the others know at once.
    fn owners_of(
        &self,
        server: &Arc<str>,
        ids: &[&str],
    ) -> impl Future<Output = Result<Vec<Option<TaskRecord>>, Unavailable>> + Send;

    /// Forgets expired records (a backend whose records expire by themselves does
    /// nothing).
    fn sweep(&self);
}

/// The tasks of every server.
pub struct Tasks {
    store: Backend,
}

/// The backends, dispatched without boxing.
enum Backend {
    Memory(memory::Tasks),
    Redis(redis::Tasks),
}

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks::new()
    }
}

impl Tasks {
    /// Tasks kept in this process.
    pub fn new() -> Tasks {
        Tasks {
            store: Backend::Memory(memory::Tasks::default()),
        }
    }

    /// Tasks kept in the shared Redis.
    pub fn shared(remote: Arc<Remote>) -> Tasks {
        Tasks {
            store: Backend::Redis(redis::Tasks::new(remote)),
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
        dispatch!(&self.store, store => store.record(server, task_id, record, ttl).await)
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
        dispatch!(&self.store, store => store.owners_of(server, ids).await)
    }

    /// Forgets expired tasks (memory backend; Redis expires its own).
    pub fn sweep(&self) {
        dispatch!(&self.store, store => store.sweep());
    }
}
