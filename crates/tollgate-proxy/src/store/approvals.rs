//! Calls held for a human: approvals, and the grants approvers give.
//!
//! An approval outlives the request that asked for it. The request waits a while
//! (`approval.wait`) and is then told to retry; the approval stays pending until
//! its deadline (`approval.timeout`). A retry of the same call (same server,
//! principal, tool and arguments digest: the approval's key) joins it while it is
//! pending, redeems it once it is approved (once, within `valid_for` of the
//! decision), and is answered with the approver's reason once it is denied, until
//! the deadline. A grant lets one client's (or session's) calls of one tool through
//! for a window.
//!
//! The interface is narrow, so that a shared backend (several replicas) can
//! implement the same methods: [`Approvals::open`] (or join), [`Approvals::find`],
//! [`Approvals::decide`],
//! [`Approvals::redeem`] (atomic, once), [`Approvals::consume`] (a one-use token),
//! [`Approvals::wait`], [`Approvals::list`], [`Approvals::subscribe`], and for grants
//! [`Approvals::grant`], [`Approvals::use_grant`], [`Approvals::revoke`],
//! [`Approvals::grants`]. Every change to an approval is broadcast for the admin
//! page's live stream and for the requests waiting on it. Held calls use the
//! `*_anywhere` forms ([`Approvals::find_anywhere`], [`Approvals::standing_anywhere`],
//! [`Approvals::redeem_anywhere`], [`Approvals::use_grant_anywhere`], ...), which
//! in memory are the plain ones and with `state.backend: redis` also see (and
//! atomically use) what the other replicas opened.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use redis::Script;

use super::remote::{Remote, Unavailable};

/// How many settled approvals are kept for `GET /approvals`.
const SETTLED_KEPT: usize = 500;

/// The most approvals alive (pending, or decided and not yet used or expired) at
/// once; more are refused, so that clients that never wait cannot fill memory.
pub const MAX_LIVE: usize = 10_000;

/// The most approvals alive for one principal, so that one client cannot crowd out the rest.
pub const MAX_LIVE_PER_PRINCIPAL: usize = 100;

/// The most bytes of arguments (as JSON) the live approvals keep, together.
pub const MAX_LIVE_BYTES: usize = 64 << 20;

/// The most bytes of arguments one principal's live approvals keep, by default
/// (`approvals.bytes_per_client`): an eighth of [`MAX_LIVE_BYTES`], so that one client
/// cannot fill the budget every client shares.
pub const DEFAULT_BYTES_PER_PRINCIPAL: usize = MAX_LIVE_BYTES / 8;

/// The most grants active at once.
pub const MAX_GRANTS: usize = 10_000;

/// The most of a settled approval's arguments kept, as JSON text: a preview, so
/// that the settled list stays small whatever the calls carried.
pub const PREVIEW_BYTES: usize = 2048;

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a human.
    Pending,
    /// Approved: the call is (or may be, once, within `valid_until`) forwarded.
    Approved,
    /// Denied by a human, or by the policy in force when a human approved.
    Denied,
    /// Nobody decided before the deadline, or the approved call was not retried in time.
    Expired,
}

/// One approval, as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    /// Random id.
    pub id: String,
    /// Where it stands.
    pub status: Status,
    /// The server the call is for.
    pub server: String,
    /// The tool.
    pub tool: String,
    /// The call's arguments; once settled, a preview (a string of their first
    /// [`PREVIEW_BYTES`] bytes of JSON) when they were larger.
    pub arguments: Value,
    /// Set when `arguments` is a preview: the size of the whole arguments as JSON text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub arguments_truncated_from: Option<usize>,
    /// `sha256:<hex>` of the arguments as canonical JSON: what a retry must match.
    pub arguments_digest: String,
    /// The authenticated client, if any.
    pub client: Option<String>,
    /// Who asked: the OAuth token's user (`sub`), when the caller sent a token.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// The OAuth token's client (`azp` / `client_id`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_id: Option<String>,
    /// The session, if any.
    pub session: Option<String>,
    /// Who may retry the call: `client:<name>`, else `session:<id>`, else `peer:<address>`.
    pub principal: String,
    /// The id (in the audit log) of the call that asked first.
    pub call_id: String,
    /// The rule that asked for approval.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// When the call arrived (RFC 3339).
    pub created_at: String,
    /// When it expires (RFC 3339).
    pub deadline: String,
    /// How many seconds after the decision an approved call may be retried.
    pub valid_for_secs: u64,
    /// Who decided.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decided_by: Option<String>,
    /// The approver's reason.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decision_reason: Option<String>,
    /// When it was decided (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decided_at: Option<String>,
    /// Until when an approved call may be retried (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub valid_until: Option<String>,
    /// When the approved call was forwarded (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub redeemed_at: Option<String>,
    /// The grant given with the approval, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grant_id: Option<String>,
}

/// A human's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Approved or not.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Why, when given.
    pub reason: Option<String>,
}

/// Where an approval stands, as a held call needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Nobody decided yet; the deadline.
    Pending(SystemTime),
    /// Decided, and the decision still answers retries.
    Decided(Verdict),
    /// Over: expired, or already used.
    Over(Status),
}

/// What a new approval is about.
#[derive(Debug, Clone)]
pub struct Request {
    /// Server name.
    pub server: String,
    /// Tool name.
    pub tool: String,
    /// Arguments.
    pub arguments: Value,
    /// `sha256:<hex>` of the arguments as canonical JSON.
    pub arguments_digest: String,
    /// Client.
    pub client: Option<String>,
    /// The OAuth token's user.
    pub user: Option<String>,
    /// The OAuth token's client.
    pub client_id: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Who may retry: see [`Approval::principal`].
    pub principal: String,
    /// Key of the client (`client:<name>`, else `peer:<address>`), for client grants.
    pub client_key: String,
    /// Key of the session (`session:<id>`, else the client key), for session grants.
    pub session_key: String,
    /// The asking call's id.
    pub call_id: String,
    /// Deciding rule.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// How long a human has.
    pub timeout: Duration,
    /// How long after approval the call may be retried.
    pub valid_for: Duration,
    /// The caller's token claims and scopes, for deciding the call again (never shown).
    pub identity: Identity,
}

/// What the policy may need of the caller to decide a held call again.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The OAuth token's claims.
    pub claims: Option<serde_json::Map<String, Value>>,
    /// Its scopes.
    pub scopes: Vec<String>,
}

/// Opening an approval failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Too many approvals alive, or too many bytes of arguments.
    #[error(
        "too many approvals are waiting for a decision (at most {MAX_LIVE}, {} MiB of arguments); decide or let some expire, then retry",
        MAX_LIVE_BYTES >> 20
    )]
    Full,
    /// Too many approvals alive for this principal.
    #[error(
        "this client already has {MAX_LIVE_PER_PRINCIPAL} calls waiting for approval; wait for decisions, then retry"
    )]
    TooManyForPrincipal,
    /// This principal's live approvals keep too many bytes of arguments.
    #[error(
        "this client's calls waiting for approval already hold {0} bytes of arguments (approvals.bytes_per_client); wait for decisions, then retry"
    )]
    TooManyBytesForPrincipal(usize),
}

/// Deciding failed.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No approval has this id.
    #[error("no approval with id `{0}`")]
    NotFound(String),
    /// Already settled (or past its deadline); carries the current state.
    #[error("approval `{}` is already {:?}", .0.id, .0.status)]
    Settled(Box<Approval>),
    /// Held by another replica, which could not be reached or did not answer.
    #[error("approval `{0}` is held by another replica, which did not confirm the decision: {1}")]
    Unconfirmed(String, String),
}

/// Who a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The client (its key; the peer's address for a client without one).
    Client,
    /// The session (in the stateless era: the client).
    Session,
}

/// A window in which one tool's calls by one client or session pass without asking.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    /// Random id.
    pub id: String,
    /// The server.
    pub server: String,
    /// The tool.
    pub tool: String,
    /// Client or session.
    pub scope: Scope,
    /// The client's or session's key the grant is for.
    pub principal: String,
    /// The arguments digest it is limited to; `None`: any arguments the rule lets through.
    pub arguments_digest: Option<String>,
    /// Who granted it.
    pub granted_by: String,
    /// The approval it was given with.
    pub approval_id: String,
    /// When it was given (RFC 3339).
    pub created_at: String,
    /// When it ends (RFC 3339).
    pub expires_at: String,
    /// How many calls it let through.
    pub uses: u64,
    #[serde(skip, default = "epoch")]
    until: SystemTime,
}

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

impl Grant {
    /// Whether it lets this call through.
    fn matches(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> bool {
        self.server == server
            && self.tool == tool
            && self.principal
                == match self.scope {
                    Scope::Client => client_key,
                    Scope::Session => session_key,
                }
            && self.arguments_digest.as_deref().is_none_or(|d| d == digest)
    }
}

/// What an approver grants with an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    /// Client or session.
    pub scope: Scope,
    /// For how long.
    pub window: Duration,
    /// Any arguments the rule lets through, not only the approved call's.
    pub any_arguments: bool,
}

struct Entry {
    approval: Approval,
    identity: Identity,
    /// Size of the arguments as JSON, counted against [`MAX_LIVE_BYTES`].
    bytes: usize,
    /// When it is over: the deadline, or once approved `valid_until`.
    due: SystemTime,
    key: String,
    client_key: String,
    session_key: String,
    deadline: SystemTime,
    valid_for: Duration,
    valid_until: Option<SystemTime>,
}

#[derive(Default)]
struct Table {
    /// Approvals still answering retries: pending, or decided and not yet over.
    live: HashMap<String, Entry>,
    /// Live approvals by key.
    by_key: HashMap<String, String>,
    /// Bytes of arguments the live approvals keep.
    live_bytes: usize,
    /// Live approvals per principal.
    per_principal: HashMap<String, usize>,
    /// Bytes of arguments the live approvals of each principal keep.
    principal_bytes: HashMap<String, usize>,
    /// Live approvals by when they are over, so a sweep looks only at those due.
    due: BTreeSet<(SystemTime, String)>,
    settled: VecDeque<Approval>,
    grants: Vec<Grant>,
    /// One-use tokens already used, until they expire.
    used: HashMap<String, SystemTime>,
}

/// The store.
pub struct Approvals {
    table: Mutex<Table>,
    /// `approvals.bytes_per_client`.
    bytes_per_principal: std::sync::atomic::AtomicUsize,
    changes: broadcast::Sender<Approval>,
    /// With a shared backend: the other replicas' approvals, as they last published them.
    mirror: Option<Mirror>,
}

/// The shared side of approvals (`state.backend: redis`). An approval is opened,
/// waited on and decided by the replica holding the client's request; every change
/// is written to Redis (a hash per approval: where it stands and what it binds)
/// and published, so each replica lists them all, a decision made elsewhere is
/// sent to the holder (which wakes its waiting request at once), and a retry, a
/// `requestState` or a grant is honoured by whichever replica it reaches: the
/// approval is redeemed there by one Lua check-and-consume, exactly once.
struct Mirror {
    remote: Arc<Remote>,
    others: Arc<Mutex<HashMap<String, Approval>>>,
    save: Arc<Script>,
    redeem: Arc<Script>,
}

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

/// How long a settled approval's record stays in Redis, for the answer to a late retry.
const RECORD_KEPT: Duration = Duration::from_secs(3600);

/// What a retry presents: the call the approval must have been opened for.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// Who retries.
    pub principal: &'a str,
    /// The server.
    pub server: &'a str,
    /// The tool.
    pub tool: &'a str,
    /// The arguments digest.
    pub digest: &'a str,
}

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

impl Default for Approvals {
    fn default() -> Self {
        Approvals::new()
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The key a retry must match: server, principal, tool, arguments digest.
fn key_of(server: &str, principal: &str, tool: &str, digest: &str) -> String {
    format!("{server}\n{principal}\n{tool}\n{digest}")
}

impl Approvals {
    /// An empty store.
    pub fn new() -> Approvals {
        let (changes, _) = broadcast::channel(1024);
        Approvals {
            table: Mutex::new(Table::default()),
            bytes_per_principal: DEFAULT_BYTES_PER_PRINCIPAL.into(),
            changes,
            mirror: None,
        }
    }

    /// The client that held approval `id` went away: its arguments are no longer
    /// kept whole, only a preview (as for a settled approval), and their bytes leave
    /// the budgets. The approval stays live for the client's retry, which carries
    /// the arguments again (and is evaluated against the policy in full).
    pub fn abandon(&self, id: &str) {
        let mut table = self.table.lock();
        let Some(entry) = table.live.get_mut(id) else {
            return;
        };
        if entry.approval.arguments_truncated_from.is_some() {
            return;
        }
        preview(&mut entry.approval);
        if entry.approval.arguments_truncated_from.is_none() {
            return;
        }
        let kept = serde_json::to_vec(&entry.approval.arguments).map_or(0, |v| v.len());
        let freed = entry.bytes.saturating_sub(kept);
        entry.bytes = kept;
        let (principal, approval) = (entry.approval.principal.clone(), entry.approval.clone());
        table.live_bytes = table.live_bytes.saturating_sub(freed);
        if let Some(b) = table.principal_bytes.get_mut(&principal) {
            *b = b.saturating_sub(freed);
        }
        drop(table);
        self.changed(approval);
    }

    /// Sets the most bytes of arguments one principal's live approvals keep
    /// (`approvals.bytes_per_client`).
    pub fn set_bytes_per_principal(&self, bytes: usize) {
        self.bytes_per_principal
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// A store whose approvals every replica on `remote` lists and can decide.
    pub fn shared(remote: Arc<Remote>) -> Arc<Approvals> {
        let (changes, _) = broadcast::channel(1024);
        let others = Arc::new(Mutex::new(HashMap::new()));
        let store = Arc::new(Approvals {
            table: Mutex::new(Table::default()),
            bytes_per_principal: DEFAULT_BYTES_PER_PRINCIPAL.into(),
            changes,
            mirror: Some(Mirror {
                remote: remote.clone(),
                others: others.clone(),
                save: Arc::new(Script::new(SAVE)),
                redeem: Arc::new(Script::new(REDEEM)),
            }),
        });
        let (weak, broadcast) = (Arc::downgrade(&store), store.changes.clone());
        let holder = weak.clone();
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
        store
    }

    /// Whether this replica holds (or held) the approval.
    fn holds(&self, id: &str) -> bool {
        let table = self.table.lock();
        table.live.contains_key(id) || table.settled.iter().any(|a| a.id == id)
    }

    /// Tells the admin stream and the waiting requests, and with a shared backend
    /// the other replicas.
    fn changed(&self, approval: Approval) {
        self.changed_with(approval, None);
    }

    /// [`Approvals::changed`], with the grant the change gave: both are written to
    /// Redis before the change is published, so that a replica told of it finds them.
    fn changed_with(&self, approval: Approval, grant: Option<Grant>) {
        if let Some(mirror) = &self.mirror
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // A call released by an approval redeems it in Redis: it is woken once the
            // record is written. Anything else is told at once (a denial at shutdown too).
            let later = approval.status == Status::Approved && approval.redeemed_at.is_none();
            let shared = self.shared_write(mirror, approval.clone(), grant);
            let local = later.then(|| (self.changes.clone(), approval.clone()));
            runtime.spawn(async move {
                if let Err(err) = shared.await {
                    tracing::warn!(error = %err, "an approval's change could not be shared with the other replicas");
                }
                if let Some((changes, approval)) = local {
                    let _ = changes.send(approval);
                }
            });
            if later {
                return;
            }
        }
        let _ = self.changes.send(approval);
    }

    /// Writes an approval (and a grant) to Redis, then publishes the change.
    fn shared_write(
        &self,
        mirror: &Mirror,
        approval: Approval,
        grant: Option<Grant>,
    ) -> impl Future<Output = Result<(), Unavailable>> + Send + 'static {
        let (remote, save) = (mirror.remote.clone(), mirror.save.clone());
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

    /// Settles an approval held here that another replica redeemed; whether it was held.
    fn settle_redeemed(&self, id: &str) -> bool {
        let mut table = self.table.lock();
        let Some(entry) = remove_live(&mut table, id) else {
            return false;
        };
        let mut approval = entry.approval;
        approval.redeemed_at = Some(rfc3339(SystemTime::now()));
        push_settled(&mut table, approval.clone());
        drop(table);
        let _ = self.changes.send(approval);
        true
    }

    /// [`Approvals::find`], and with a shared backend the approval of this call
    /// any replica opened.
    pub async fn find_anywhere(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> Result<Option<(String, Standing)>, Unavailable> {
        let found = self.find(server, principal, tool, digest);
        let Some(mirror) = &self.mirror else {
            return Ok(found);
        };
        if found.is_some() {
            return Ok(found);
        }
        let remote = &mirror.remote;
        let mut conn = remote.connection();
        let name = key_name(remote, &key_of(server, principal, tool, digest));
        let id: Option<String> = remote
            .run(redis::cmd("GET").arg(name).query_async(&mut conn))
            .await?;
        let Some(id) = id else { return Ok(None) };
        Ok(self
            .standing_anywhere(&id)
            .await?
            .map(|standing| (id, standing)))
    }

    /// [`Approvals::standing`], and with a shared backend that of an approval
    /// another replica holds.
    pub async fn standing_anywhere(&self, id: &str) -> Result<Option<Standing>, Unavailable> {
        let found = self.standing(id);
        let (Some(mirror), None) = (&self.mirror, &found) else {
            return Ok(found);
        };
        let remote = &mirror.remote;
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
            let mut others = mirror.others.lock();
            if others.len() < MIRRORED {
                others.entry(approval.id.clone()).or_insert(approval);
            }
            Some(standing)
        }))
    }

    /// [`Approvals::redeem`] of the call `binding`; with a shared backend, by one
    /// check-and-consume in Redis, so that it is used once whichever replica the
    /// retries reach.
    pub async fn redeem_anywhere(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> Result<Result<Verdict, Option<Standing>>, Unavailable> {
        let Some(mirror) = &self.mirror else {
            return Ok(self.redeem(id));
        };
        let remote = &mirror.remote;
        let mut conn = remote.connection();
        let key = key_of(
            binding.server,
            binding.principal,
            binding.tool,
            binding.digest,
        );
        let (outcome, body): (String, String) = remote
            .run(
                mirror
                    .redeem
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
                self.settle_redeemed(id);
            }
            return Ok(Err(match (outcome.as_str(), approval) {
                ("missing" | "other_call", _) => None,
                ("redeemed", _) => Some(Standing::Over(Status::Approved)),
                (status, Some(approval)) => Some(standing_of(status, &approval, SystemTime::now())),
                (_, None) => None,
            }));
        }
        if let Ok(verdict) = self.redeem(id) {
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
        mirror
            .others
            .lock()
            .insert(approval.id.clone(), approval.clone());
        self.changed(approval);
        Ok(Ok(verdict))
    }

    /// [`Approvals::use_grant`], and with a shared backend a grant given on any replica.
    pub async fn use_grant_anywhere(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Result<Option<Grant>, Unavailable> {
        // With a shared backend Redis is where grants are (and are revoked).
        let Some(mirror) = &self.mirror else {
            return Ok(self.use_grant(server, tool, client_key, session_key, digest));
        };
        let remote = &mirror.remote;
        let mut conn = remote.connection();
        let all: Vec<String> = remote
            .run(
                redis::cmd("HVALS")
                    .arg(remote.key(&["approvals", "grants"]))
                    .query_async(&mut conn),
            )
            .await?;
        let now = SystemTime::now();
        let mut over = Vec::new();
        let mut found = None;
        for text in all {
            let Ok(mut grant) = serde_json::from_str::<Grant>(&text) else {
                continue;
            };
            grant.until = parse_time(Some(&grant.expires_at)).unwrap_or(now);
            if grant.until <= now {
                over.push(grant.id);
                continue;
            }
            if found.is_none() && grant.matches(server, tool, client_key, session_key, digest) {
                found = Some(grant);
            }
        }
        if !over.is_empty() {
            let _ = remote
                .run(
                    redis::pipe()
                        .cmd("HDEL")
                        .arg(remote.key(&["approvals", "grants"]))
                        .arg(&over)
                        .ignore()
                        .cmd("HDEL")
                        .arg(remote.key(&["approvals", "grant-uses"]))
                        .arg(&over)
                        .ignore()
                        .query_async::<()>(&mut conn),
                )
                .await;
        }
        if let Some(grant) = &mut found {
            grant.uses = remote
                .run(
                    redis::cmd("HINCRBY")
                        .arg(remote.key(&["approvals", "grant-uses"]))
                        .arg(&grant.id)
                        .arg(1)
                        .query_async::<u64>(&mut conn),
                )
                .await?;
        }
        Ok(found)
    }

    /// [`Approvals::grants`], and with a shared backend every replica's (this
    /// replica's alone while Redis cannot be reached).
    pub async fn grants_anywhere(&self) -> Vec<Grant> {
        let Some(mirror) = &self.mirror else {
            return self.grants();
        };
        let mut all = Vec::new();
        let remote = &mirror.remote;
        let mut conn = remote.connection();
        let (texts, uses): (Vec<String>, HashMap<String, u64>) = remote
            .run(
                redis::pipe()
                    .cmd("HVALS")
                    .arg(remote.key(&["approvals", "grants"]))
                    .cmd("HGETALL")
                    .arg(remote.key(&["approvals", "grant-uses"]))
                    .query_async(&mut conn),
            )
            .await
            .unwrap_or_else(|_| {
                all = self.grants();
                (Vec::new(), HashMap::new())
            });
        let now = SystemTime::now();
        for text in texts.into_iter().take(MAX_GRANTS) {
            let Ok(mut grant) = serde_json::from_str::<Grant>(&text) else {
                continue;
            };
            grant.until = parse_time(Some(&grant.expires_at)).unwrap_or(now);
            grant.uses = uses.get(&grant.id).copied().unwrap_or(0);
            if grant.until > now && !all.iter().any(|g| g.id == grant.id) {
                all.push(grant);
            }
        }
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        all
    }

    /// [`Approvals::revoke`], and with a shared backend a grant given on any replica.
    pub async fn revoke_anywhere(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        let local = self.revoke(id);
        let Some(mirror) = &self.mirror else {
            return Ok(local);
        };
        let remote = &mirror.remote;
        let mut conn = remote.connection();
        let name = remote.key(&["approvals", "grants"]);
        let text: Option<String> = remote
            .run(redis::cmd("HGET").arg(&name).arg(id).query_async(&mut conn))
            .await?;
        remote
            .run(
                redis::pipe()
                    .cmd("HDEL")
                    .arg(&name)
                    .arg(id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(remote.key(&["approvals", "grant-uses"]))
                    .arg(id)
                    .ignore()
                    .query_async::<()>(&mut conn),
            )
            .await?;
        Ok(local.or_else(|| text.and_then(|t| serde_json::from_str(&t).ok())))
    }

    /// Approves or denies an approval held by this replica or, with a shared
    /// backend, by another one: the holder settles it (exactly once, whoever asks
    /// first), and the answer is what it published, awaited for at most 3 s, with
    /// the grant it gave (read from Redis, where every replica finds it).
    pub async fn decide_anywhere(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        let Some(mirror) = &self.mirror else {
            return self.decide(id, approved, by, reason, grant);
        };
        if self.holds(id) {
            let decided = self.decide(id, approved, by, reason, grant)?;
            // Written before the approver is answered, so that a retry reaching
            // another replica right after finds the decision.
            self.shared_write(mirror, decided.0.clone(), decided.1.clone())
                .await
                .map_err(|e| DecideError::Unconfirmed(id.to_owned(), e.to_string()))?;
            return Ok(decided);
        }
        let known = mirror.others.lock().get(id).cloned();
        let Some(known) = known else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if known.status != Status::Pending {
            return Err(DecideError::Settled(Box::new(known)));
        }
        let mut changes = self.changes.subscribe();
        let body = serde_json::to_string(&RemoteDecision {
            id: id.to_owned(),
            approved,
            by: by.to_owned(),
            reason,
            grant,
        })
        .unwrap_or_default();
        let unconfirmed = |why: String| DecideError::Unconfirmed(id.to_owned(), why);
        mirror
            .remote
            .publish(&mirror.remote.key(&["approvals", "decide"]), &body)
            .await
            .map_err(|e| unconfirmed(e.to_string()))?;
        let wanted = if approved {
            Status::Approved
        } else {
            Status::Denied
        };
        let settled = tokio::time::timeout(Duration::from_secs(3), async {
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
        .ok_or_else(|| unconfirmed("no answer within 3s".to_owned()))?;
        if settled.status == wanted && settled.decided_by.as_deref() == Some(by) {
            // The holder wrote the grant before it published the decision.
            let grant = match &settled.grant_id {
                Some(grant_id) => {
                    let remote = &mirror.remote;
                    let mut conn = remote.connection();
                    let text: Option<String> = remote
                        .run(
                            redis::cmd("HGET")
                                .arg(remote.key(&["approvals", "grants"]))
                                .arg(grant_id)
                                .query_async(&mut conn),
                        )
                        .await
                        .map_err(|e| unconfirmed(e.to_string()))?;
                    text.and_then(|t| serde_json::from_str::<Grant>(&t).ok())
                        .map(|mut g| {
                            g.until = parse_time(Some(&g.expires_at)).unwrap_or(g.until);
                            g
                        })
                }
                None => None,
            };
            Ok((settled, grant))
        } else {
            Err(DecideError::Settled(Box::new(settled)))
        }
    }

    /// The live approval for this call, or a new pending one. Returns its id, where
    /// it stands, and whether it is new.
    pub fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        let now = SystemTime::now();
        let key = key_of(
            &request.server,
            &request.principal,
            &request.tool,
            &request.arguments_digest,
        );
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let found = table
            .by_key
            .get(&key)
            .and_then(|id| Some((id.clone(), standing(table.live.get(id)?))));
        let bytes = serde_json::to_vec(&request.arguments).map_or(0, |v| v.len());
        let per_principal_bytes = self
            .bytes_per_principal
            .load(std::sync::atomic::Ordering::Relaxed);
        let result = match found {
            Some((id, standing)) => Ok((id, standing, false)),
            None if table.live.len() >= MAX_LIVE || table.live_bytes + bytes > MAX_LIVE_BYTES => {
                Err(OpenError::Full)
            }
            None if table
                .per_principal
                .get(&request.principal)
                .is_some_and(|n| *n >= MAX_LIVE_PER_PRINCIPAL) =>
            {
                Err(OpenError::TooManyForPrincipal)
            }
            None if table
                .principal_bytes
                .get(&request.principal)
                .map_or(0, |b| *b)
                + bytes
                > per_principal_bytes =>
            {
                Err(OpenError::TooManyBytesForPrincipal(per_principal_bytes))
            }
            None => {
                let id = super::random_hex(12);
                let deadline = now + request.timeout;
                let approval = Approval {
                    id: id.clone(),
                    status: Status::Pending,
                    server: request.server,
                    tool: request.tool,
                    arguments: request.arguments,
                    arguments_truncated_from: None,
                    arguments_digest: request.arguments_digest,
                    client: request.client,
                    user: request.user,
                    client_id: request.client_id,
                    session: request.session,
                    principal: request.principal,
                    call_id: request.call_id,
                    rule: request.rule,
                    reason: request.reason,
                    created_at: rfc3339(now),
                    deadline: rfc3339(deadline),
                    valid_for_secs: request.valid_for.as_secs(),
                    decided_by: None,
                    decision_reason: None,
                    decided_at: None,
                    valid_until: None,
                    redeemed_at: None,
                    grant_id: None,
                };
                table.by_key.insert(key.clone(), id.clone());
                table.live_bytes += bytes;
                table.due.insert((deadline, id.clone()));
                *table
                    .per_principal
                    .entry(approval.principal.clone())
                    .or_default() += 1;
                *table
                    .principal_bytes
                    .entry(approval.principal.clone())
                    .or_default() += bytes;
                table.live.insert(
                    id.clone(),
                    Entry {
                        approval: approval.clone(),
                        identity: request.identity,
                        bytes,
                        due: deadline,
                        key,
                        client_key: request.client_key,
                        session_key: request.session_key,
                        deadline,
                        valid_for: request.valid_for,
                        valid_until: None,
                    },
                );
                self.changed(approval);
                Ok((id, Standing::Pending(deadline), true))
            }
        };
        drop(table);
        self.announce(changed);
        result
    }

    /// The live approval of this call (by its key), if any, and where it stands.
    pub fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> Option<(String, Standing)> {
        let key = key_of(server, principal, tool, digest);
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let found = table
            .by_key
            .get(&key)
            .and_then(|id| Some((id.clone(), standing(table.live.get(id)?))));
        drop(table);
        self.announce(changed);
        found
    }

    /// Where an approval stands; `None` for an id never seen (or long forgotten).
    pub fn standing(&self, id: &str) -> Option<Standing> {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let found = standing_in(&table, id);
        drop(table);
        self.announce(changed);
        found
    }

    /// Waits up to `max` for a pending approval to be decided (or to expire); then
    /// where it stands.
    pub async fn wait(&self, id: &str, max: Duration) -> Option<Standing> {
        let mut changes = self.changes.subscribe();
        let until = tokio::time::Instant::now() + max;
        loop {
            let now = match self.standing_anywhere(id).await {
                Ok(now) => now?,
                // Redis away: what this replica knows.
                Err(_) => self.standing(id)?,
            };
            let Standing::Pending(deadline) = now else {
                return Some(now);
            };
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let stop = until.min(tokio::time::Instant::now() + left);
            loop {
                match tokio::time::timeout_at(stop, changes.recv()).await {
                    Err(_) => return self.standing_anywhere(id).await.ok().flatten(),
                    Ok(Ok(change)) if change.id != id => continue,
                    // Its change, or changes missed: look again.
                    Ok(_) => break,
                }
            }
        }
    }

    /// Approves or denies a pending approval. An approval with a grant request
    /// also opens the grant.
    pub fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let result = decide_in(&mut table, id, approved, by, reason, grant, now);
        drop(table);
        self.announce(changed);
        if let Ok((approval, grant)) = &result {
            self.changed_with(approval.clone(), grant.clone());
        }
        result
    }

    /// Uses an approved approval, atomically and once: the verdict, or where it
    /// stands when it cannot be used (pending, denied, over).
    pub fn redeem(&self, id: &str) -> Result<Verdict, Option<Standing>> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let usable = table
            .live
            .get(id)
            .is_some_and(|e| e.approval.status == Status::Approved);
        let result = if usable && let Some(entry) = remove_live(&mut table, id) {
            let mut approval = entry.approval;
            approval.redeemed_at = Some(rfc3339(now));
            let verdict = Verdict {
                approved: true,
                by: approval.decided_by.clone().unwrap_or_default(),
                reason: approval.decision_reason.clone(),
            };
            push_settled(&mut table, approval.clone());
            Ok((verdict, approval))
        } else {
            Err(standing_in(&table, id))
        };
        drop(table);
        self.announce(changed);
        result.map(|(verdict, approval)| {
            self.changed(approval);
            verdict
        })
    }

    /// Marks a one-use token used until `until`; `false` when it already was.
    pub fn consume(&self, token: &str, until: SystemTime) -> bool {
        let mut table = self.table.lock();
        let now = SystemTime::now();
        table.used.retain(|_, end| *end > now);
        if table.used.contains_key(token) {
            return false;
        }
        table.used.insert(token.to_owned(), until);
        true
    }

    /// Pending and recently settled approvals, newest first.
    pub fn list(&self) -> Vec<Approval> {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let mut all: Vec<Approval> = table
            .live
            .values()
            .map(|e| e.approval.clone())
            .chain(table.settled.iter().cloned())
            .collect();
        drop(table);
        self.announce(changed);
        if let Some(mirror) = &self.mirror {
            all.extend(mirror.others.lock().values().cloned());
        }
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        all
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Option<Approval> {
        let table = self.table.lock();
        table
            .live
            .get(id)
            .map(|e| e.approval.clone())
            .or_else(|| table.settled.iter().find(|a| a.id == id).cloned())
            .or_else(|| {
                drop(table);
                self.mirror
                    .as_ref()
                    .and_then(|m| m.others.lock().get(id).cloned())
            })
    }

    /// A pending approval held here, with what the policy needs of its caller to
    /// decide it again.
    pub fn held_call(&self, id: &str) -> Option<(Approval, Identity)> {
        let table = self.table.lock();
        let entry = table.live.get(id)?;
        Some((entry.approval.clone(), entry.identity.clone()))
    }

    /// Number of pending approvals.
    pub fn pending(&self) -> usize {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let pending = table
            .live
            .values()
            .filter(|e| e.approval.status == Status::Pending)
            .count();
        drop(table);
        self.announce(changed);
        pending
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.changes.subscribe()
    }

    /// Denies everything pending, e.g. on shutdown.
    pub fn deny_all(&self, by: &str, reason: &str) {
        let ids: Vec<String> = {
            let table = self.table.lock();
            table
                .live
                .iter()
                .filter(|(_, e)| e.approval.status == Status::Pending)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            let _ = self.decide(&id, false, by, Some(reason.to_owned()), None);
        }
    }

    /// Withdraws what a closed session was waiting for: its pending approvals that only
    /// it could retry (an anonymous caller's, `principal` `session:<id>`) are denied, so
    /// they leave the approvals page rather than wait for a retry that cannot come.
    pub fn session_closed(&self, session: &str) {
        let principal = format!("session:{session}");
        let ids: Vec<String> = {
            let table = self.table.lock();
            table
                .live
                .iter()
                .filter(|(_, e)| {
                    e.approval.status == Status::Pending && e.approval.principal == principal
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            let _ = self.decide(
                &id,
                false,
                "tollgate",
                Some("the session that asked was closed, so nobody can retry the call".to_owned()),
                None,
            );
        }
    }

    /// A grant that lets this call through, its use counted; `None` when none does.
    pub fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Option<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        let grant = table
            .grants
            .iter_mut()
            .find(|g| g.matches(server, tool, client_key, session_key, digest))?;
        grant.uses += 1;
        Some(grant.clone())
    }

    /// Active grants, newest first.
    pub fn grants(&self) -> Vec<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        table.grants.iter().rev().cloned().collect()
    }

    /// Ends a grant at once; the grant, or `None` when no active grant has this id.
    pub fn revoke(&self, id: &str) -> Option<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        let at = table.grants.iter().position(|g| g.id == id)?;
        Some(table.grants.remove(at))
    }

    /// Broadcasts approvals a sweep settled.
    fn announce(&self, changed: Vec<Approval>) {
        for approval in changed {
            self.changed(approval);
        }
    }
}

fn decide_in(
    table: &mut Table,
    id: &str,
    approved: bool,
    by: &str,
    reason: Option<String>,
    grant: Option<GrantRequest>,
    now: SystemTime,
) -> Result<(Approval, Option<Grant>), DecideError> {
    let Some(entry) = table.live.get_mut(id) else {
        return match table.settled.iter().find(|a| a.id == id) {
            Some(settled) => Err(DecideError::Settled(Box::new(settled.clone()))),
            None => Err(DecideError::NotFound(id.to_owned())),
        };
    };
    if entry.approval.status != Status::Pending {
        return Err(DecideError::Settled(Box::new(entry.approval.clone())));
    }
    entry.approval.status = if approved {
        Status::Approved
    } else {
        Status::Denied
    };
    entry.approval.decided_by = Some(by.to_owned());
    entry.approval.decision_reason = reason;
    entry.approval.decided_at = Some(rfc3339(now));
    let mut due = None;
    if approved {
        let until = now + entry.valid_for;
        entry.valid_until = Some(until);
        entry.approval.valid_until = Some(rfc3339(until));
        due = Some((std::mem::replace(&mut entry.due, until), until));
    }
    let granted = match grant {
        Some(request) if approved && table.grants.len() < MAX_GRANTS => {
            let until = now + request.window;
            let grant = Grant {
                id: super::random_hex(8),
                server: entry.approval.server.clone(),
                tool: entry.approval.tool.clone(),
                scope: request.scope,
                principal: match request.scope {
                    Scope::Client => entry.client_key.clone(),
                    Scope::Session => entry.session_key.clone(),
                },
                arguments_digest: (!request.any_arguments)
                    .then(|| entry.approval.arguments_digest.clone()),
                granted_by: by.to_owned(),
                approval_id: id.to_owned(),
                created_at: rfc3339(now),
                expires_at: rfc3339(until),
                uses: 0,
                until,
            };
            entry.approval.grant_id = Some(grant.id.clone());
            Some(grant)
        }
        _ => None,
    };
    let approval = entry.approval.clone();
    if let Some((old, new)) = due {
        table.due.remove(&(old, id.to_owned()));
        table.due.insert((new, id.to_owned()));
    }
    if let Some(grant) = &granted {
        table.grants.push(grant.clone());
    }
    Ok((approval, granted))
}

/// Where approval `id` stands in `table`: live, settled, or never seen (`None`).
fn standing_in(table: &Table, id: &str) -> Option<Standing> {
    match table.live.get(id) {
        Some(entry) => Some(standing(entry)),
        None => table
            .settled
            .iter()
            .find(|a| a.id == id)
            .map(|a| Standing::Over(a.status)),
    }
}

fn standing(entry: &Entry) -> Standing {
    match entry.approval.status {
        Status::Pending => Standing::Pending(entry.deadline),
        Status::Approved | Status::Denied => Standing::Decided(Verdict {
            approved: entry.approval.status == Status::Approved,
            by: entry.approval.decided_by.clone().unwrap_or_default(),
            reason: entry.approval.decision_reason.clone(),
        }),
        Status::Expired => Standing::Over(Status::Expired),
    }
}

fn remove_live(table: &mut Table, id: &str) -> Option<Entry> {
    let entry = table.live.remove(id)?;
    table.by_key.remove(&entry.key);
    table.live_bytes -= entry.bytes;
    table.due.remove(&(entry.due, entry.approval.id.clone()));
    if let Some(n) = table.per_principal.get_mut(&entry.approval.principal) {
        *n -= 1;
        if *n == 0 {
            table.per_principal.remove(&entry.approval.principal);
        }
    }
    if let Some(b) = table.principal_bytes.get_mut(&entry.approval.principal) {
        *b = b.saturating_sub(entry.bytes);
        if *b == 0 {
            table.principal_bytes.remove(&entry.approval.principal);
        }
    }
    Some(entry)
}

/// Settles what is over: pending past the deadline and approved past `valid_until`
/// expire; denied past the deadline stops answering retries. Returns what changed.
fn sweep(table: &mut Table, now: SystemTime) -> Vec<Approval> {
    let mut changed = Vec::new();
    while let Some((due, id)) = table.due.first().cloned()
        && due <= now
    {
        match remove_live(table, &id) {
            Some(entry) => {
                let mut approval = entry.approval;
                if approval.status != Status::Denied {
                    approval.status = Status::Expired;
                }
                push_settled(table, approval.clone());
                changed.push(approval);
            }
            None => {
                table.due.remove(&(due, id));
            }
        }
    }
    changed
}

fn push_settled(table: &mut Table, mut approval: Approval) {
    preview(&mut approval);
    table.settled.push_front(approval);
    table.settled.truncate(SETTLED_KEPT);
}

/// Replaces arguments larger than [`PREVIEW_BYTES`] of JSON by a preview of them.
fn preview(approval: &mut Approval) {
    let text = serde_json::to_string(&approval.arguments).unwrap_or_default();
    if text.len() <= PREVIEW_BYTES {
        return;
    }
    let mut end = PREVIEW_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    approval.arguments = Value::String(format!("{}…", &text[..end]));
    approval.arguments_truncated_from = Some(text.len());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::sync::Arc;

    use super::*;
    use serde_json::json;

    fn request(timeout: Duration) -> Request {
        Request {
            server: "s".into(),
            tool: "start_fhir_export_job".into(),
            arguments: json!({"a": 1}),
            arguments_digest: "sha256:aa".into(),
            client: None,
            user: None,
            client_id: None,
            session: Some("abc".into()),
            principal: "session:abc".into(),
            client_key: "peer:127.0.0.1".into(),
            session_key: "session:abc".into(),
            call_id: "call".into(),
            rule: "rules[0] (start_*)".into(),
            reason: "needs a human".into(),
            timeout,
            valid_for: Duration::from_secs(600),
            identity: Identity::default(),
        }
    }

    fn open(store: &Approvals, request: Request) -> String {
        store.open(request).unwrap().0
    }

    #[test]
    fn a_record_read_from_redis_stands_where_its_status_and_times_say() {
        let store = Approvals::new();
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

    #[test]
    fn a_grant_read_back_from_json_keeps_its_scope_and_matches_the_same_calls() {
        let store = Approvals::new();
        let id = open(&store, request(Duration::from_secs(60)));
        let window = GrantRequest {
            scope: Scope::Client,
            window: Duration::from_secs(60),
            any_arguments: false,
        };
        let (_, grant) = store
            .decide(&id, true, "alice", None, Some(window))
            .unwrap();
        let grant = grant.unwrap();
        let back: Grant = serde_json::from_str(&serde_json::to_string(&grant).unwrap()).unwrap();
        assert_eq!(
            (back.id.as_str(), back.principal.as_str()),
            (grant.id.as_str(), "peer:127.0.0.1")
        );
        assert!(back.matches(
            "s",
            "start_fhir_export_job",
            "peer:127.0.0.1",
            "x",
            "sha256:aa"
        ));
        assert!(!back.matches(
            "s",
            "start_fhir_export_job",
            "peer:127.0.0.1",
            "x",
            "sha256:bb"
        ));
        assert!(!back.matches(
            "s",
            "start_fhir_export_job",
            "client:other",
            "x",
            "sha256:aa"
        ));
    }

    #[tokio::test]
    async fn approving_releases_the_waiter_and_the_approval_is_used_once() {
        let store = Arc::new(Approvals::new());
        let id = open(&store, request(Duration::from_secs(60)));
        assert_eq!(store.get(&id).unwrap().status, Status::Pending);
        let waiting = store.clone();
        let wid = id.clone();
        let waiter = tokio::spawn(async move { waiting.wait(&wid, Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        let (settled, grant) = store.decide(&id, true, "alice", None, None).unwrap();
        assert_eq!((settled.status, grant.is_none()), (Status::Approved, true));
        match waiter.await.unwrap() {
            Some(Standing::Decided(v)) => assert!(v.approved && v.by == "alice"),
            other => panic!("{other:?}"),
        }
        assert!(store.redeem(&id).is_ok());
        assert_eq!(
            store.redeem(&id),
            Err(Some(Standing::Over(Status::Approved)))
        );
        assert!(store.get(&id).unwrap().redeemed_at.is_some());
        // Used up: the same call opens a new approval.
        let (again, standing, new) = store.open(request(Duration::from_secs(60))).unwrap();
        assert!(new && again != id && matches!(standing, Standing::Pending(_)));
        assert!(matches!(
            store.decide(&id, false, "bob", None, None),
            Err(DecideError::Settled(_))
        ));
        assert!(matches!(
            store.decide("nope", false, "bob", None, None),
            Err(DecideError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn the_same_call_joins_and_another_call_opens_its_own() {
        let store = Approvals::new();
        let first = open(&store, request(Duration::from_secs(60)));
        let (joined, _, new) = store.open(request(Duration::from_secs(60))).unwrap();
        assert_eq!((joined.as_str(), new), (first.as_str(), false));
        let r = request(Duration::from_secs(60));
        let found = store.find(&r.server, &r.principal, &r.tool, &r.arguments_digest);
        assert_eq!(found.map(|f| f.0), Some(first.clone()));
        assert!(
            store
                .find(&r.server, &r.principal, &r.tool, "sha256:zz")
                .is_none()
        );
        for change in [
            |r: &mut Request| r.arguments_digest = "sha256:bb".into(),
            |r: &mut Request| r.principal = "session:other".into(),
            |r: &mut Request| r.tool = "other".into(),
            |r: &mut Request| r.server = "t".into(),
        ] {
            let mut other = request(Duration::from_secs(60));
            change(&mut other);
            assert_ne!(open(&store, other), first);
        }
        assert_eq!(store.pending(), 5);
        // A denial answers retries until the deadline.
        store
            .decide(&first, false, "bob", Some("no".into()), None)
            .unwrap();
        let (id, standing, _) = store.open(request(Duration::from_secs(60))).unwrap();
        assert_eq!(id, first);
        assert_eq!(
            standing,
            Standing::Decided(Verdict {
                approved: false,
                by: "bob".into(),
                reason: Some("no".into())
            })
        );
        assert_eq!(store.redeem(&first), Err(Some(standing)));
    }

    #[tokio::test]
    async fn deadlines_expire_pending_and_unused_approvals() {
        let store = Approvals::new();
        let id = open(&store, request(Duration::from_millis(30)));
        assert_eq!(
            store.wait(&id, Duration::from_secs(5)).await,
            Some(Standing::Over(Status::Expired))
        );
        assert!(matches!(
            store.decide(&id, true, "late", None, None),
            Err(DecideError::Settled(_))
        ));
        // Waiting less than the deadline leaves it pending.
        let id = open(&store, request(Duration::from_secs(60)));
        assert!(matches!(
            store.wait(&id, Duration::from_millis(20)).await,
            Some(Standing::Pending(_))
        ));
        let mut short = request(Duration::from_secs(60));
        short.tool = "short".into();
        short.valid_for = Duration::from_millis(20);
        let id = open(&store, short);
        store.decide(&id, true, "alice", None, None).unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(
            store.redeem(&id),
            Err(Some(Standing::Over(Status::Expired)))
        );
        assert_eq!(store.get(&id).unwrap().decided_by.as_deref(), Some("alice"));
    }

    #[tokio::test]
    async fn live_approvals_are_bounded_in_number_per_principal_and_in_bytes() {
        let store = Approvals::new();
        let numbered = |principal: usize, i: usize| {
            let mut r = request(Duration::from_secs(60));
            r.principal = format!("client:{principal}");
            r.arguments_digest = i.to_string();
            r
        };
        for i in 0..MAX_LIVE_PER_PRINCIPAL {
            store.open(numbered(0, i)).unwrap();
        }
        assert!(matches!(
            store.open(numbered(0, 1000)),
            Err(OpenError::TooManyForPrincipal)
        ));
        // Joining an existing one still works, and other principals are not crowded out.
        assert!(store.open(numbered(0, 0)).is_ok());
        for p in 1..MAX_LIVE / MAX_LIVE_PER_PRINCIPAL {
            for i in 0..MAX_LIVE_PER_PRINCIPAL {
                store.open(numbered(p, i)).unwrap();
            }
        }
        assert!(matches!(
            store.open(numbered(9999, 0)),
            Err(OpenError::Full)
        ));
        // Bytes: large arguments fill the budget before the count does; using one frees its bytes.
        let store = Approvals::new();
        let big = |p: usize| {
            let mut r = numbered(p, 0);
            r.arguments = json!("x".repeat((4 << 20) - 2));
            r
        };
        let mut ids = Vec::new();
        for p in 0..(MAX_LIVE_BYTES / (4 << 20)) {
            ids.push(store.open(big(p)).unwrap().0);
        }
        assert!(matches!(store.open(big(1000)), Err(OpenError::Full)));
        store.decide(&ids[0], true, "alice", None, None).unwrap();
        store.redeem(&ids[0]).unwrap();
        assert!(store.open(big(1000)).is_ok());
        // One principal holds at most its own share of the bytes; another is not crowded out.
        let store = Approvals::new();
        let large = |p: usize, i: usize| {
            let mut r = numbered(p, i);
            r.arguments = json!("x".repeat(900 << 10));
            r
        };
        let fit = DEFAULT_BYTES_PER_PRINCIPAL / (900 << 10);
        let mut alices = Vec::new();
        for i in 0..fit {
            alices.push(store.open(large(0, i)).unwrap().0);
        }
        assert!(matches!(
            store.open(large(0, fit)),
            Err(OpenError::TooManyBytesForPrincipal(
                DEFAULT_BYTES_PER_PRINCIPAL
            ))
        ));
        assert!(store.open(large(1, 0)).is_ok());
        store
            .decide(&alices[0], false, "admin", None, None)
            .unwrap();
        store.redeem(&alices[0]).ok();
        store.set_bytes_per_principal(MAX_LIVE_BYTES);
        assert!(store.open(large(0, fit)).is_ok());
    }

    #[tokio::test]
    async fn grants_let_their_scope_through_until_revoked_or_expired() {
        let store = Approvals::new();
        let id = open(&store, request(Duration::from_secs(60)));
        let grant = GrantRequest {
            scope: Scope::Session,
            window: Duration::from_secs(60),
            any_arguments: false,
        };
        let (approval, grant) = store.decide(&id, true, "alice", None, Some(grant)).unwrap();
        let grant = grant.unwrap();
        assert_eq!(approval.grant_id.as_ref(), Some(&grant.id));
        assert_eq!(
            (grant.principal.as_str(), grant.granted_by.as_str()),
            ("session:abc", "alice")
        );
        let tool = "start_fhir_export_job";
        assert!(
            store
                .use_grant("s", tool, "x", "session:abc", "sha256:aa")
                .is_some()
        );
        assert_eq!(
            store
                .use_grant("s", tool, "x", "session:abc", "sha256:aa")
                .unwrap()
                .uses,
            2
        );
        assert!(
            store
                .use_grant("s", tool, "x", "session:abc", "sha256:bb")
                .is_none()
        );
        assert!(
            store
                .use_grant("s", tool, "x", "session:zzz", "sha256:aa")
                .is_none()
        );
        assert!(
            store
                .use_grant("s", "other", "x", "session:abc", "sha256:aa")
                .is_none()
        );
        assert_eq!(store.grants().len(), 1);
        assert!(store.revoke(&grant.id).is_some());
        assert!(store.revoke(&grant.id).is_none());
        assert!(
            store
                .use_grant("s", tool, "x", "session:abc", "sha256:aa")
                .is_none()
        );

        let mut other = request(Duration::from_secs(60));
        other.tool = "t2".into();
        let id = open(&store, other);
        let any = GrantRequest {
            scope: Scope::Client,
            window: Duration::from_millis(30),
            any_arguments: true,
        };
        store.decide(&id, true, "bob", None, Some(any)).unwrap();
        assert!(
            store
                .use_grant("s", "t2", "peer:127.0.0.1", "session:q", "sha256:zz")
                .is_some()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            store
                .use_grant("s", "t2", "peer:127.0.0.1", "session:q", "sha256:zz")
                .is_none()
        );
        assert!(store.grants().is_empty());
    }

    #[test]
    fn a_one_use_token_is_used_once() {
        let store = Approvals::new();
        let until = SystemTime::now() + Duration::from_secs(60);
        assert!(store.consume("t", until));
        assert!(!store.consume("t", until));
        assert!(store.consume("u", until));
    }

    #[tokio::test]
    async fn settled_approvals_keep_a_preview_of_large_arguments() {
        let store = Approvals::new();
        let mut large = request(Duration::from_secs(60));
        large.arguments = json!({"blob": "é".repeat(100_000)});
        let id = open(&store, large);
        assert_eq!(
            store.get(&id).unwrap().arguments["blob"]
                .as_str()
                .unwrap()
                .len(),
            200_000
        );
        store.decide(&id, true, "alice", None, None).unwrap();
        store.redeem(&id).unwrap();
        let settled = store.get(&id).unwrap();
        let preview = settled.arguments.as_str().unwrap();
        assert!(preview.starts_with("{\"blob\":\"éé") && preview.ends_with('…'));
        assert!(preview.len() <= PREVIEW_BYTES + '…'.len_utf8());
        assert_eq!(settled.arguments_truncated_from, Some(200_000 + 11));
    }

    #[tokio::test]
    async fn broadcasts_changes_and_lists_newest_first() {
        let store = Approvals::new();
        let mut changes = store.subscribe();
        let first = open(&store, request(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(2));
        let mut r = request(Duration::from_secs(60));
        r.tool = "second".into();
        let second = open(&store, r);
        assert_eq!(changes.recv().await.unwrap().id, first);
        assert_eq!(changes.recv().await.unwrap().id, second);
        let list = store.list();
        assert_eq!(list[0].id, second);
        store.deny_all("tollgate", "shutting down");
        assert_eq!(store.get(&first).unwrap().status, Status::Denied);
    }
}
