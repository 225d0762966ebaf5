//! The writing side of the Redis approvals: every change of an approval this
//! replica holds is written to its record in Redis (a hash per approval: where it
//! stands and what it binds), with the grant it gave, and then published, so that
//! every replica lists it and a retry reaching any of them finds it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::Script;
use tokio::sync::broadcast;

use super::super::memory::Announce;
use super::super::record::{Approval, Grant, Status, key_of};
use super::{key_name, millis, parse_time};
use crate::store::remote::{Remote, Unavailable};

/// How long a settled approval's record stays in Redis, for the answer to a late retry.
const RECORD_KEPT: Duration = Duration::from_secs(3600);

/// Writes an approval's record, never going back (pending < decided < expired <
/// redeemed: changes are written by tasks of their own, and may arrive out of
/// order), and keeps the call's key (for a retry's lookup) while it answers retries.
/// KEYS: record, key; ARGV: status, rank, principal, server, tool, digest,
/// valid_until_ms, json, expire_at_ms, id, key_until_ms.
const SAVE: &str = r"
local old = tonumber(redis.call('HGET', KEYS[1], 'rank') or '-1')
if old > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2], 'principal', ARGV[3],
  'server', ARGV[4], 'tool', ARGV[5], 'digest', ARGV[6], 'valid_until_ms', ARGV[7], 'json', ARGV[8])
redis.call('PEXPIREAT', KEYS[1], ARGV[9])
if tonumber(ARGV[2]) <= 1 then
  redis.call('SET', KEYS[2], ARGV[10], 'PXAT', ARGV[11])
elseif redis.call('GET', KEYS[2]) == ARGV[10] then
  redis.call('DEL', KEYS[2])
end
return 1
";

/// Writes the changes of this replica's approvals to Redis and publishes them.
pub struct Share {
    remote: Arc<Remote>,
    save: Arc<Script>,
}

impl Share {
    /// Changes written to `remote`.
    pub fn new(remote: Arc<Remote>) -> Share {
        Share {
            remote,
            save: Arc::new(Script::new(SAVE)),
        }
    }

    /// Writes an approval (and a grant) to Redis, then publishes the change.
    pub fn write(
        &self,
        approval: Approval,
        grant: Option<Grant>,
    ) -> impl Future<Output = Result<(), Unavailable>> + Send + 'static {
        let (remote, save) = (self.remote.clone(), self.save.clone());
        let key = key_of(
            &approval.server,
            &approval.principal,
            &approval.tool,
            &approval.arguments_digest,
        );
        async move {
            let (status, rank) = match approval.status {
                _ if approval.redeemed_at.is_some() => ("redeemed", 3),
                Status::Pending => ("pending", 0),
                Status::Approved => ("approved", 1),
                Status::Denied => ("denied", 1),
                Status::Expired => ("expired", 2),
            };
            let deadline = parse_time(Some(&approval.deadline)).unwrap_or_else(SystemTime::now);
            let valid_until = parse_time(approval.valid_until.as_deref());
            let answers_until = valid_until.unwrap_or(deadline).max(deadline);
            let body = serde_json::to_string(&approval).unwrap_or_default();
            let mut conn = remote.connection();
            if let Some(grant) = grant {
                let text = serde_json::to_string(&grant).unwrap_or_default();
                remote
                    .run(
                        redis::cmd("HSET")
                            .arg(remote.key(&["approvals", "grants"]))
                            .arg(&grant.id)
                            .arg(text)
                            .query_async::<i64>(&mut conn),
                    )
                    .await?;
            }
            remote
                .run(
                    save.key(remote.key(&["approvals", "id", &approval.id]))
                        .key(key_name(&remote, &key))
                        .arg(status)
                        .arg(rank)
                        .arg(&approval.principal)
                        .arg(&approval.server)
                        .arg(&approval.tool)
                        .arg(&approval.arguments_digest)
                        .arg(valid_until.map_or(0, millis))
                        .arg(&body)
                        .arg(millis(answers_until + RECORD_KEPT))
                        .arg(&approval.id)
                        .arg(millis(answers_until).max(millis(SystemTime::now()) + 1))
                        .invoke_async::<i64>(&mut conn),
                )
                .await?;
            remote
                .publish(&remote.key(&["approvals", "changed"]), &body)
                .await
        }
    }
}

impl Announce for Share {
    fn changed(
        &self,
        changes: &broadcast::Sender<Approval>,
        approval: Approval,
        grant: Option<Grant>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let _ = changes.send(approval);
            return;
        };
        // A call released by an approval redeems it in Redis: it is woken once the
        // record is written. Anything else is told at once (a denial at shutdown too).
        let later = approval.status == Status::Approved && approval.redeemed_at.is_none();
        let shared = self.write(approval.clone(), grant);
        let local = later.then(|| (changes.clone(), approval.clone()));
        runtime.spawn(async move {
            if let Err(err) = shared.await {
                tracing::warn!(error = %err, "an approval's change could not be shared with the other replicas");
            }
            if let Some((changes, approval)) = local {
                let _ = changes.send(approval);
            }
        });
        if !later {
            let _ = changes.send(approval);
        }
    }
}
