//! Calls held for a human: the pending-approval store.
//!
//! A held call owns a [`Ticket`]. Approving or denying completes the ticket; if the
//! caller goes away first (client disconnect, cancellation), dropping the ticket
//! marks the approval `abandoned`, so nothing stays pending for a call nobody
//! waits for. Every change is broadcast for the admin page's live stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};

/// How many settled approvals are kept for `GET /approvals`.
const SETTLED_KEPT: usize = 500;

/// The most of a settled approval's arguments kept, as JSON text: a preview, so
/// that the settled list stays small whatever the calls carried.
pub const PREVIEW_BYTES: usize = 2048;

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a human.
    Pending,
    /// Approved: the call was forwarded.
    Approved,
    /// Denied by a human.
    Denied,
    /// Nobody decided before the deadline.
    Expired,
    /// The caller went away before a decision.
    Abandoned,
}

/// One approval, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments_truncated_from: Option<usize>,
    /// The authenticated client, if any.
    pub client: Option<String>,
    /// Who asked: the OAuth token's user (`sub`), when the caller sent a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The OAuth token's client (`azp` / `client_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The session, if any.
    pub session: Option<String>,
    /// The rule that asked for approval.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// When the call arrived (RFC 3339).
    pub created_at: String,
    /// When it expires (RFC 3339).
    pub deadline: String,
    /// Who decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The approver's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
    /// When it was settled (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

/// A human's verdict, delivered to the waiting call.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Approved or not.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Why, when given.
    pub reason: Option<String>,
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
    /// Client.
    pub client: Option<String>,
    /// The OAuth token's user.
    pub user: Option<String>,
    /// The OAuth token's client.
    pub client_id: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Deciding rule.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// How long a human has.
    pub timeout: Duration,
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
}

struct Pending {
    approval: Approval,
    reply: oneshot::Sender<Verdict>,
    deadline: SystemTime,
}

#[derive(Default)]
struct Table {
    pending: HashMap<String, Pending>,
    settled: VecDeque<Approval>,
}

/// The store.
pub struct Approvals {
    table: Mutex<Table>,
    changes: broadcast::Sender<Approval>,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals::new()
    }
}

/// A held call's claim on its approval. Dropping it before a verdict abandons it.
pub struct Ticket {
    /// The approval's id.
    pub id: String,
    /// When it expires.
    pub deadline: SystemTime,
    verdict: Option<oneshot::Receiver<Verdict>>,
    store: Arc<Approvals>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Approvals {
    /// An empty store.
    pub fn new() -> Approvals {
        let (changes, _) = broadcast::channel(1024);
        Approvals {
            table: Mutex::new(Table::default()),
            changes,
        }
    }

    /// Holds a call: returns the ticket its handler waits on.
    pub fn open(self: &Arc<Self>, request: Request) -> Ticket {
        let id = super::random_hex(12);
        let now = SystemTime::now();
        let deadline = now + request.timeout;
        let approval = Approval {
            id: id.clone(),
            status: Status::Pending,
            server: request.server,
            tool: request.tool,
            arguments: request.arguments,
            arguments_truncated_from: None,
            client: request.client,
            user: request.user,
            client_id: request.client_id,
            session: request.session,
            rule: request.rule,
            reason: request.reason,
            created_at: rfc3339(now),
            deadline: rfc3339(deadline),
            decided_by: None,
            decision_reason: None,
            decided_at: None,
        };
        let (reply, verdict) = oneshot::channel();
        self.table.lock().pending.insert(
            id.clone(),
            Pending {
                approval: approval.clone(),
                reply,
                deadline,
            },
        );
        let _ = self.changes.send(approval);
        Ticket {
            id,
            deadline,
            verdict: Some(verdict),
            store: self.clone(),
        }
    }

    /// Approves or denies a pending approval.
    pub fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
    ) -> Result<Approval, DecideError> {
        let mut table = self.table.lock();
        let Some(pending) = table.pending.remove(id) else {
            return match table.settled.iter().find(|a| a.id == id) {
                Some(settled) => Err(DecideError::Settled(Box::new(settled.clone()))),
                None => Err(DecideError::NotFound(id.to_owned())),
            };
        };
        if SystemTime::now() >= pending.deadline {
            let expired = settle(&mut table, pending.approval, Status::Expired, None, None);
            let _ = self.changes.send(expired.clone());
            return Err(DecideError::Settled(Box::new(expired)));
        }
        let status = if approved {
            Status::Approved
        } else {
            Status::Denied
        };
        let verdict = Verdict {
            approved,
            by: by.to_owned(),
            reason: reason.clone(),
        };
        let delivered = pending.reply.send(verdict).is_ok();
        let status = if delivered { status } else { Status::Abandoned };
        let settled = settle(
            &mut table,
            pending.approval,
            status,
            Some(by.to_owned()),
            reason,
        );
        drop(table);
        let _ = self.changes.send(settled.clone());
        Ok(settled)
    }

    /// Settles an approval its caller stopped waiting for.
    fn close(&self, id: &str, status: Status) {
        let mut table = self.table.lock();
        if let Some(pending) = table.pending.remove(id) {
            let settled = settle(&mut table, pending.approval, status, None, None);
            drop(table);
            let _ = self.changes.send(settled);
        }
    }

    /// Pending and recently settled approvals, newest first.
    pub fn list(&self) -> Vec<Approval> {
        let table = self.table.lock();
        let mut all: Vec<Approval> = table
            .pending
            .values()
            .map(|p| p.approval.clone())
            .chain(table.settled.iter().cloned())
            .collect();
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
            .pending
            .get(id)
            .map(|p| p.approval.clone())
            .or_else(|| table.settled.iter().find(|a| a.id == id).cloned())
    }

    /// Number of pending approvals.
    pub fn pending(&self) -> usize {
        self.table.lock().pending.len()
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.changes.subscribe()
    }

    /// Denies everything pending, e.g. on shutdown.
    pub fn deny_all(&self, by: &str, reason: &str) {
        let ids: Vec<String> = self.table.lock().pending.keys().cloned().collect();
        for id in ids {
            let _ = self.decide(&id, false, by, Some(reason.to_owned()));
        }
    }
}

fn settle(
    table: &mut Table,
    mut approval: Approval,
    status: Status,
    by: Option<String>,
    reason: Option<String>,
) -> Approval {
    preview(&mut approval);
    approval.status = status;
    approval.decided_by = by;
    approval.decision_reason = reason;
    approval.decided_at = Some(rfc3339(SystemTime::now()));
    table.settled.push_front(approval.clone());
    table.settled.truncate(SETTLED_KEPT);
    approval
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

/// How a held call ended.
#[derive(Debug)]
pub enum Outcome {
    /// A human decided.
    Decided(Verdict),
    /// The deadline passed.
    Expired,
}

impl Ticket {
    /// Waits for a verdict or the deadline.
    pub async fn wait(mut self) -> Outcome {
        let Some(verdict) = self.verdict.take() else {
            return Outcome::Expired;
        };
        let left = self
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let outcome = match tokio::time::timeout(left, verdict).await {
            Ok(Ok(verdict)) => Outcome::Decided(verdict),
            // The sender is only dropped without a verdict when the store settled it otherwise.
            Ok(Err(_)) | Err(_) => {
                self.store.close(&self.id, Status::Expired);
                Outcome::Expired
            }
        };
        // Settled either way: nothing for Drop to abandon.
        self.id.clear();
        outcome
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.id.is_empty() {
            self.store.close(&self.id, Status::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn request(timeout: Duration) -> Request {
        Request {
            server: "s".into(),
            tool: "start_fhir_export_job".into(),
            arguments: json!({"a": 1}),
            client: None,
            user: None,
            client_id: None,
            session: Some("abc".into()),
            rule: "rules[0] (start_*)".into(),
            reason: "needs a human".into(),
            timeout,
        }
    }

    #[tokio::test]
    async fn approving_releases_the_waiting_call() {
        let store = Arc::new(Approvals::new());
        let ticket = store.open(request(Duration::from_secs(60)));
        let id = ticket.id.clone();
        assert_eq!(store.get(&id).unwrap().status, Status::Pending);
        let waiter = tokio::spawn(ticket.wait());
        tokio::task::yield_now().await;
        let settled = store.decide(&id, true, "alice", None).unwrap();
        assert_eq!(settled.status, Status::Approved);
        match waiter.await.unwrap() {
            Outcome::Decided(v) => assert!(v.approved),
            Outcome::Expired => panic!("expired"),
        }
        assert!(matches!(
            store.decide(&id, false, "bob", None),
            Err(DecideError::Settled(_))
        ));
        assert!(matches!(
            store.decide("nope", false, "bob", None),
            Err(DecideError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_dropped_ticket_is_abandoned_and_a_late_one_expires() {
        let store = Arc::new(Approvals::new());
        let ticket = store.open(request(Duration::from_secs(60)));
        let id = ticket.id.clone();
        drop(ticket);
        assert_eq!(store.get(&id).unwrap().status, Status::Abandoned);
        assert_eq!(store.pending(), 0);

        let ticket = store.open(request(Duration::from_millis(20)));
        let id = ticket.id.clone();
        assert!(matches!(ticket.wait().await, Outcome::Expired));
        assert_eq!(store.get(&id).unwrap().status, Status::Expired);
        assert!(matches!(
            store.decide(&id, true, "late", None),
            Err(DecideError::Settled(_))
        ));
    }

    #[tokio::test]
    async fn settled_approvals_keep_a_preview_of_large_arguments() {
        let store = Arc::new(Approvals::new());
        let mut large = request(Duration::from_secs(60));
        large.arguments = json!({"blob": "é".repeat(100_000)});
        let ticket = store.open(large);
        assert_eq!(
            store.get(&ticket.id).unwrap().arguments["blob"]
                .as_str()
                .unwrap()
                .len(),
            200_000
        );
        let settled = store.decide(&ticket.id, false, "alice", None).unwrap();
        let preview = settled.arguments.as_str().unwrap();
        assert!(preview.starts_with("{\"blob\":\"éé") && preview.ends_with('…'));
        assert!(preview.len() <= PREVIEW_BYTES + '…'.len_utf8());
        assert_eq!(settled.arguments_truncated_from, Some(200_000 + 11));
        assert_eq!(store.get(&ticket.id).unwrap().arguments, settled.arguments);
        let small = store.open(request(Duration::from_secs(60)));
        let settled = store.decide(&small.id, true, "alice", None).unwrap();
        assert_eq!(settled.arguments, json!({"a": 1}));
        assert_eq!(settled.arguments_truncated_from, None);
    }

    #[tokio::test]
    async fn broadcasts_changes_and_lists_newest_first() {
        let store = Arc::new(Approvals::new());
        let mut changes = store.subscribe();
        let first = store.open(request(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(2));
        let second = store.open(request(Duration::from_secs(60)));
        assert_eq!(changes.recv().await.unwrap().id, first.id);
        assert_eq!(changes.recv().await.unwrap().id, second.id);
        let list = store.list();
        assert_eq!(list[0].id, second.id);
        store.deny_all("tollgate", "shutting down");
        assert_eq!(store.get(&first.id).unwrap().status, Status::Denied);
    }
}
