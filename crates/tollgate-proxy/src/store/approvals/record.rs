//! What the approvals store keeps and answers: approvals, grants, verdicts, and
//! the bounds on them. Both backends keep the same records.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::store::principal::Principal;

/// How many settled approvals are kept for `GET /approvals`.
pub(super) const SETTLED_KEPT: usize = 500;

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
    /// Who asks: shared with the call, kept with the approval (its token's claims
    /// decide the call again at approval, and are never shown).
    pub principal: Arc<Principal>,
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
    pub(super) until: SystemTime,
}

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

impl Grant {
    /// Whether it lets this call through.
    pub(super) fn matches(
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

/// A time as the records show it (RFC 3339, milliseconds).
pub(super) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The key a retry must match: server, principal, tool, arguments digest.
pub(super) fn key_of(server: &str, principal: &str, tool: &str, digest: &str) -> String {
    format!("{server}\n{principal}\n{tool}\n{digest}")
}

/// Orders approvals newest first (ties by id), as every listing shows them.
pub(super) fn newest_first(all: &mut [Approval]) {
    all.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.id.cmp(&a.id))
    });
}

/// A request as the tests of both backends open it: server `s`, tool
/// `start_fhir_export_job`, an anonymous caller of session `abc`.
#[cfg(test)]
pub(super) fn sample_request(timeout: Duration) -> Request {
    Request {
        server: "s".into(),
        tool: "start_fhir_export_job".into(),
        arguments: serde_json::json!({"a": 1}),
        arguments_digest: "sha256:aa".into(),
        principal: Arc::new(Principal {
            client: None,
            token: None,
            session: Some("abc".into()),
            key: "session:abc".into(),
            client_key: "peer:127.0.0.1".into(),
            session_key: "session:abc".into(),
        }),
        call_id: "call".into(),
        rule: "rules[0] (start_*)".into(),
        reason: "needs a human".into(),
        timeout,
        valid_for: Duration::from_secs(600),
    }
}

impl Approval {
    /// A new pending approval of `request`, made at `now` with id `id`: the record
    /// the admin API shows, the caller as its fields say (never its token's claims).
    pub(super) fn pending(id: String, request: Request, now: SystemTime) -> Approval {
        let principal = &request.principal;
        let text = |value: Option<&Arc<str>>| value.map(|v| v.to_string());
        Approval {
            id,
            status: Status::Pending,
            client: text(principal.client.as_ref()),
            user: text(principal.user()),
            client_id: text(principal.client_id()),
            session: text(principal.session.as_ref()),
            principal: principal.key.to_string(),
            server: request.server,
            tool: request.tool,
            arguments: request.arguments,
            arguments_truncated_from: None,
            arguments_digest: request.arguments_digest,
            call_id: request.call_id,
            rule: request.rule,
            reason: request.reason,
            created_at: rfc3339(now),
            deadline: rfc3339(now + request.timeout),
            valid_for_secs: request.valid_for.as_secs(),
            decided_by: None,
            decision_reason: None,
            decided_at: None,
            valid_until: None,
            redeemed_at: None,
            grant_id: None,
        }
    }
}
