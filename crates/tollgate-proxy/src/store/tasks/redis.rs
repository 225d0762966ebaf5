//! Task owners in the shared Redis (`state.backend: redis`), so every replica
//! agrees: each record a key expiring with its task, each owner's tasks two sorted
//! sets, by expiry and by age. Recording is one script (one round trip), a lookup one
//! `MGET`.

use std::sync::Arc;
use std::time::Duration;

use ::redis::Script;

use super::{TASKS_PER_OWNER, TaskRecord, TaskStore};
use crate::store::remote::{Remote, Unavailable};

/// Records a task (KEYS[1]) unless it is recorded already, and adds it to its
/// owner's two sorted sets: KEYS[2] scored by expiry, KEYS[3] by order of recording
/// (so that the oldest, not the soonest to expire, is pushed out, as in memory).
/// The owner's expired tasks leave both first and do not count; past ARGV[3] the
/// oldest live ones are forgotten. ARGV: the record, its ttl in ms, the owner's
/// bound. Redis's own clock is used.
const RECORD: &str = r"
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl, 'NX') then
  return 0
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #expired do redis.call('ZREM', KEYS[3], expired[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local newest = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
local order = 0
if #newest > 0 then order = tonumber(newest[2]) + 1 end
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('ZADD', KEYS[3], order, KEYS[1])
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[3])
if excess > 0 then
  local old = redis.call('ZPOPMIN', KEYS[3], excess)
  for i = 1, #old, 2 do
    redis.call('ZREM', KEYS[2], old[i])
    redis.call('DEL', old[i])
  end
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], tonumber(last[2]))
redis.call('PEXPIREAT', KEYS[3], tonumber(last[2]))
return 1
";

/// The tasks of every server in the shared Redis.
pub struct Tasks {
    remote: Arc<Remote>,
    script: Script,
}

impl Tasks {
    /// Tasks kept in the Redis of `remote`.
    pub fn new(remote: Arc<Remote>) -> Tasks {
        Tasks {
            remote,
            script: Script::new(RECORD),
        }
    }

    /// The key of `task_id` of `server`.
    fn key(&self, server: &str, task_id: &str) -> String {
        self.remote.key(&["task", &digest(&[server, task_id])])
    }
}

impl TaskStore for Tasks {
    /// One script, one round trip.
    async fn record(
        &self,
        server: &Arc<str>,
        task_id: &str,
        record: TaskRecord,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let remote = &self.remote;
        let bucket = digest(&[&record.owner.bucket()]);
        let text = serde_json::to_string(&record).map_err(|e| Unavailable {
            url: remote.shown().to_owned(),
            reason: format!("a task's record cannot be written: {e}"),
        })?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.script.key(self.key(server, task_id));
        invocation
            .key(remote.key(&["tasks-of", &bucket]))
            .key(remote.key(&["tasks-order", &bucket]))
            .arg(text)
            .arg(ttl_ms)
            .arg(TASKS_PER_OWNER);
        let mut conn = remote.connection();
        remote
            .run(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// One `MGET`.
    async fn owners_of(
        &self,
        server: &Arc<str>,
        ids: &[&str],
    ) -> Result<Vec<Option<TaskRecord>>, Unavailable> {
        let keys: Vec<String> = ids.iter().map(|id| self.key(server, id)).collect();
        let mut conn = self.remote.connection();
        let texts: Vec<Option<String>> = self
            .remote
            .run(
                ::redis::cmd("MGET")
                    .arg(&keys)
                    .query_async::<Vec<Option<String>>>(&mut conn),
            )
            .await?;
        Ok(texts
            .into_iter()
            .map(|text| text.and_then(|t| serde_json::from_str(&t).ok()))
            .collect())
    }

    /// Records expire by themselves.
    fn sweep(&self) {}
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
