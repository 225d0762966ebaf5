//! Approvals shared by the replicas (`state.backend: redis`). An approval is
//! opened, waited on and decided by the replica holding the client's request (in
//! its [`memory`](super::memory) table); every change is written to Redis and
//! published ([`share`]), so each replica lists them all, a decision made elsewhere
//! is sent to the holder (which wakes its waiting request at once), and a retry, a
//! `requestState` or a grant is honoured by whichever replica it reaches: the
//! approval is redeemed there by one Lua check-and-consume, exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::ApprovalStore;
use super::memory::{self, Announce as _};
use super::record::{
    Approval, Binding, DecideError, Grant, GrantRequest, OpenError, Principal, Request,
    SETTLED_KEPT, Standing, Status, Verdict, key_of, rfc3339,
};
use crate::store::remote::{Remote, Unavailable};

mod grants;
mod share;

pub use share::Share;

/// This replica's approvals, and what the others published of theirs.
pub struct Approvals {
    local: Arc<memory::Approvals<Share>>,
    /// The other replicas' approvals, as they last published them.
    others: Arc<Mutex<HashMap<String, Approval>>>,
    remote: Arc<Remote>,
    redeem_script: Script,
}

/// Uses an approved approval once, when the call presenting it is the one approved
/// (principal, server, tool, arguments digest) and it is within `valid_for` of the
/// decision (Redis's clock). KEYS: record, key; ARGV: principal, server, tool,
/// digest, id. Returns `{outcome, json}`: `ok`, or why not (`missing`, its status,
/// `other_call`, `expired`).
const REDEEM: &str = r"
local f = redis.call('HMGET', KEYS[1], 'status', 'principal', 'server', 'tool', 'digest', 'valid_until_ms', 'json')
if not f[1] then return {'missing', ''} end
if f[1] ~= 'approved' then return {f[1], f[7]} end
if f[2] ~= ARGV[1] or f[3] ~= ARGV[2] or f[4] ~= ARGV[3] or f[5] ~= ARGV[4] then
  return {'other_call', ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(f[6]) then return {'expired', f[7]} end
redis.call('HSET', KEYS[1], 'status', 'redeemed', 'rank', 3)
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
return {'ok', f[7]}
";

fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_time(text: Option<&str>) -> Option<SystemTime> {
    humantime::parse_rfc3339(text?).ok()
}

/// The name (in Redis) of a call's key: a digest, so it is short and safe.
fn key_name(remote: &Remote, key: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    remote.key(&["approvals", "key", &hex])
}

/// Where an approval read from Redis stands now.
fn standing_of(status: &str, approval: &Approval, now: SystemTime) -> Standing {
    let deadline = parse_time(Some(&approval.deadline)).unwrap_or(now);
    match status {
        "pending" if deadline > now => Standing::Pending(deadline),
        "approved" | "denied"
            if parse_time(approval.valid_until.as_deref()).unwrap_or(deadline) > now =>
        {
            Standing::Decided(Verdict {
                approved: status == "approved",
                by: approval.decided_by.clone().unwrap_or_default(),
                reason: approval.decision_reason.clone(),
            })
        }
        "redeemed" => Standing::Over(Status::Approved),
        _ => Standing::Over(Status::Expired),
    }
}

/// Most approvals of other replicas kept in the mirror.
const MIRRORED: usize = 2 * SETTLED_KEPT + 10_000;

/// A decision made on another replica, for the replica holding the approval.
#[derive(Serialize, Deserialize)]
struct RemoteDecision {
    id: String,
    approved: bool,
    by: String,
    reason: Option<String>,
    #[serde(default)]
    grant: Option<GrantRequest>,
}
impl Approvals {
    /// The approvals shared by every replica on `remote`.
    pub fn new(remote: Arc<Remote>) -> Approvals {
        let local = Arc::new(memory::Approvals::announcing(Share::new(remote.clone())));
        let others = Arc::new(Mutex::new(HashMap::new()));
        follow_changes(&remote, &local, others.clone());
        follow_decisions(&remote, Arc::downgrade(&local));
        Approvals {
            local,
            others,
            remote,
            redeem_script: Script::new(REDEEM),
        }
    }

    /// Sends a decision to the replica holding the approval, and awaits what it
    /// published (at most 3 s), with the grant it gave (read from Redis).
    async fn decide_elsewhere(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        let changes = self.local.subscribe();
        let body = serde_json::to_string(&RemoteDecision {
            id: id.to_owned(),
            approved,
            by: by.to_owned(),
            reason,
            grant,
        })
        .unwrap_or_default();
        let unconfirmed = |why: String| DecideError::Unconfirmed(id.to_owned(), why);
        self.remote
            .publish(&self.remote.key(&["approvals", "decide"]), &body)
            .await
            .map_err(|e| unconfirmed(e.to_string()))?;
        let settled = settled(changes, id)
            .await
            .ok_or_else(|| unconfirmed("no answer within 3s".to_owned()))?;
        let wanted = if approved {
            Status::Approved
        } else {
            Status::Denied
        };
        if settled.status != wanted || settled.decided_by.as_deref() != Some(by) {
            return Err(DecideError::Settled(Box::new(settled)));
        }
        // The holder wrote the grant before it published the decision.
        let grant = match &settled.grant_id {
            Some(grant_id) => self
                .stored_grant(grant_id)
                .await
                .map_err(|e| unconfirmed(e.to_string()))?,
            None => None,
        };
        Ok((settled, grant))
    }

    /// Grant `id` as Redis keeps it.
    async fn stored_grant(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        let remote = &self.remote;
        let mut conn = remote.connection();
        let text: Option<String> = remote
            .run(
                redis::cmd("HGET")
                    .arg(remote.key(&["approvals", "grants"]))
                    .arg(id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(text
            .and_then(|t| serde_json::from_str::<Grant>(&t).ok())
            .map(|mut g| {
                g.until = parse_time(Some(&g.expires_at)).unwrap_or(g.until);
                g
            }))
    }
}

impl ApprovalStore for Approvals {
    /// This replica's table.
    fn set_bytes_per_principal(&self, bytes: usize) {
        self.local.set_bytes_per_principal(bytes);
    }

    /// Held by this replica (and written to Redis by its announcer).
    fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        self.local.open(request)
    }

    async fn wait(&self, id: &str, max: Duration) -> Option<Standing> {
        super::wait_for(self.local.subscribe(), id, max, || async move {
            match self.standing(id).await {
                Ok(standing) => Ok(standing),
                Err(_) => Err(self.local.standing(id)),
            }
        })
        .await
    }

    /// Pending and recently settled approvals of every replica, newest first.
    fn list(&self) -> Vec<Approval> {
        let mut all = self.local.list();
        all.extend(self.others.lock().values().cloned());
        super::record::newest_first(&mut all);
        all
    }

    /// One approval, held here or by another replica.
    fn get(&self, id: &str) -> Option<Approval> {
        self.local
            .get(id)
            .or_else(|| self.others.lock().get(id).cloned())
    }

    /// The approval of this call any replica opened.
    async fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> Result<Option<(String, Standing)>, Unavailable> {
        let found = self.local.find(server, principal, tool, digest);
        if found.is_some() {
            return Ok(found);
        }
        let remote = &self.remote;
        let mut conn = remote.connection();
        let name = key_name(remote, &key_of(server, principal, tool, digest));
        let id: Option<String> = remote
            .run(redis::cmd("GET").arg(name).query_async(&mut conn))
            .await?;
        let Some(id) = id else { return Ok(None) };
        Ok(self.standing(&id).await?.map(|standing| (id, standing)))
    }

    /// Where an approval stands, held here or by another replica.
    async fn standing(&self, id: &str) -> Result<Option<Standing>, Unavailable> {
        let found = self.local.standing(id);
        if found.is_some() {
            return Ok(found);
        }
        let remote = &self.remote;
        let mut conn = remote.connection();
        let (status, body): (Option<String>, Option<String>) = remote
            .run(
                redis::cmd("HMGET")
                    .arg(remote.key(&["approvals", "id", id]))
                    .arg("status")
                    .arg("json")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(status.zip(body).and_then(|(status, body)| {
            let approval = serde_json::from_str::<Approval>(&body).ok()?;
            let standing = standing_of(&status, &approval, SystemTime::now());
            let mut others = self.others.lock();
            if others.len() < MIRRORED {
                others.entry(approval.id.clone()).or_insert(approval);
            }
            Some(standing)
        }))
    }

    /// Uses an approved approval of the call `binding` by one check-and-consume in
    /// Redis, so that it is used once whichever replica the retries reach.
    async fn redeem(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> Result<Result<Verdict, Option<Standing>>, Unavailable> {
        let remote = &self.remote;
        let mut conn = remote.connection();
        let key = key_of(
            binding.server,
            binding.principal,
            binding.tool,
            binding.digest,
        );
        let (outcome, body): (String, String) = remote
            .run(
                self.redeem_script
                    .key(remote.key(&["approvals", "id", id]))
                    .key(key_name(remote, &key))
                    .arg(binding.principal)
                    .arg(binding.server)
                    .arg(binding.tool)
                    .arg(binding.digest)
                    .arg(id)
                    .invoke_async(&mut conn),
            )
            .await?;
        let approval = serde_json::from_str::<Approval>(&body).ok();
        if outcome != "ok" {
            // Used or over in Redis: so it is here.
            if matches!(outcome.as_str(), "redeemed" | "expired") {
                self.local.settle_redeemed(id);
            }
            return Ok(Err(match (outcome.as_str(), approval) {
                ("missing" | "other_call", _) => None,
                ("redeemed", _) => Some(Standing::Over(Status::Approved)),
                (status, Some(approval)) => Some(standing_of(status, &approval, SystemTime::now())),
                (_, None) => None,
            }));
        }
        if let Ok(verdict) = self.local.redeem(id) {
            return Ok(Ok(verdict));
        }
        // Held by another replica: tell it (and the pages) that it was used.
        let Some(mut approval) = approval else {
            return Ok(Err(None));
        };
        approval.redeemed_at = Some(rfc3339(SystemTime::now()));
        let verdict = Verdict {
            approved: true,
            by: approval.decided_by.clone().unwrap_or_default(),
            reason: approval.decision_reason.clone(),
        };
        self.others
            .lock()
            .insert(approval.id.clone(), approval.clone());
        self.local
            .announcer()
            .changed(self.local.changes(), approval, None);
        Ok(Ok(verdict))
    }

    /// Approves or denies an approval held by this replica or by another one: the holder settles it (exactly once, whoever asks
    /// first), and the answer is what it published, awaited for at most 3 s, with
    /// the grant it gave (read from Redis, where every replica finds it).
    async fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        if self.local.holds(id) {
            let decided = self.local.decide(id, approved, by, reason, grant)?;
            // Written before the approver is answered, so that a retry reaching
            // another replica right after finds the decision.
            self.local
                .announcer()
                .write(decided.0.clone(), decided.1.clone())
                .await
                .map_err(|e| DecideError::Unconfirmed(id.to_owned(), e.to_string()))?;
            return Ok(decided);
        }
        let known = self.others.lock().get(id).cloned();
        let Some(known) = known else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if known.status != Status::Pending {
            return Err(DecideError::Settled(Box::new(known)));
        }
        self.decide_elsewhere(id, approved, by, reason, grant).await
    }

    fn abandon(&self, id: &str) {
        self.local.abandon(id);
    }

    fn consume(&self, token: &str, until: SystemTime) -> bool {
        self.local.consume(token, until)
    }

    fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)> {
        self.local.held_call(id)
    }

    fn pending(&self) -> usize {
        self.local.pending()
    }

    /// This replica's changes and the others' (as they publish them).
    fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.local.subscribe()
    }

    fn deny_all(&self, by: &str, reason: &str) {
        self.local.deny_all(by, reason);
    }

    fn session_closed(&self, session: &str) {
        self.local.session_closed(session);
    }

    async fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Result<Option<Grant>, Unavailable> {
        self.grant_for(server, tool, client_key, session_key, digest)
            .await
    }

    async fn grants(&self) -> Vec<Grant> {
        self.all_grants().await
    }

    async fn revoke(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        self.end_grant(id).await
    }
}

/// Approval `id` once `changes` tell it left pending; `None` after 3 s.
async fn settled(mut changes: broadcast::Receiver<Approval>, id: &str) -> Option<Approval> {
    tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match changes.recv().await {
                Ok(change) if change.id == id && change.status != Status::Pending => {
                    return Some(change);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Follows the changes the replicas publish: one this replica holds that another
/// redeemed is settled here; the rest are kept in `others` and told to the pages.
fn follow_changes(
    remote: &Arc<Remote>,
    local: &Arc<memory::Approvals<Share>>,
    others: Arc<Mutex<HashMap<String, Approval>>>,
) {
    let (holder, broadcast) = (Arc::downgrade(local), local.changes().clone());
    remote.follow(
        remote.key(&["approvals", "changed"]),
        move |body| {
            let Ok(approval) = serde_json::from_str::<Approval>(body) else {
                return;
            };
            // Redeemed on another replica: this one, if it holds it, settles it.
            if approval.redeemed_at.is_some()
                && let Some(store) = holder.upgrade()
                && store.settle_redeemed(&approval.id)
            {
                return;
            }
            let mut others = others.lock();
            if others.len() >= MIRRORED {
                others.retain(|_, a| a.status == Status::Pending);
                if others.len() >= MIRRORED {
                    return;
                }
            }
            // Changes are published by tasks of their own, so they may arrive out
            // of order: a decided approval never goes back to pending.
            if approval.status == Status::Pending
                && others
                    .get(&approval.id)
                    .is_some_and(|known| known.status != Status::Pending)
            {
                return;
            }
            others.insert(approval.id.clone(), approval.clone());
            drop(others);
            let _ = broadcast.send(approval);
        },
        || {},
    );
}

/// Follows the decisions made on other replicas: the one holding the approval settles it.
fn follow_decisions(remote: &Arc<Remote>, weak: Weak<memory::Approvals<Share>>) {
    remote.follow(
        remote.key(&["approvals", "decide"]),
        move |body| {
            let (Some(store), Ok(decision)) =
                (weak.upgrade(), serde_json::from_str::<RemoteDecision>(body))
            else {
                return;
            };
            // Only the replica holding the approval settles it; the rest ignore it.
            if store.holds(&decision.id) {
                let _ = store.decide(
                    &decision.id,
                    decision.approved,
                    &decision.by,
                    decision.reason,
                    decision.grant,
                );
            }
        },
        || {},
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::super::record::sample_request as request;
    use super::*;

    fn open(store: &memory::Approvals, request: super::super::Request) -> String {
        store.open(request).unwrap().0
    }

    #[test]
    fn a_record_read_from_redis_stands_where_its_status_and_times_say() {
        let store = memory::Approvals::new();
        let id = open(&store, request(Duration::from_secs(60)));
        let pending = store.get(&id).unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            standing_of("pending", &pending, now),
            Standing::Pending(_)
        ));
        // Past its deadline, whatever the record says: expired.
        let later = now + Duration::from_secs(120);
        assert_eq!(
            standing_of("pending", &pending, later),
            Standing::Over(Status::Expired)
        );
        let (approved, _) = store.decide(&id, true, "alice", None, None).unwrap();
        match standing_of("approved", &approved, now) {
            Standing::Decided(v) => assert!(v.approved && v.by == "alice"),
            other => panic!("{other:?}"),
        }
        // Past valid_for: over.
        let after = now + Duration::from_secs(601);
        assert_eq!(
            standing_of("approved", &approved, after),
            Standing::Over(Status::Expired)
        );
        assert_eq!(
            standing_of("redeemed", &approved, now),
            Standing::Over(Status::Approved)
        );
    }
}
