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
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};

use super::remote::Remote;

/// How many settled approvals are kept for `GET /approvals`.
const SETTLED_KEPT: usize = 500;

/// The most of a settled approval's arguments kept, as JSON text: a preview, so
/// that the settled list stays small whatever the calls carried.
pub const PREVIEW_BYTES: usize = 2048;

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Held by another replica, which could not be reached or did not answer.
    #[error("approval `{0}` is held by another replica, which did not confirm the decision: {1}")]
    Unconfirmed(String, String),
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
    /// With a shared backend: the other replicas' approvals, as they last published them.
    mirror: Option<Mirror>,
}

/// Other replicas' approvals (`state.backend: redis`). A call stays held by the
/// replica it reached; every change is published, so each replica lists them all,
/// and a decision made elsewhere is sent to the holder, which settles it (once).
struct Mirror {
    remote: Arc<Remote>,
    others: Arc<Mutex<HashMap<String, Approval>>>,
}

/// Most approvals of other replicas kept in the mirror.
const MIRRORED: usize = 2 * SETTLED_KEPT + 10_000;

/// A decision made on another replica, for the replica holding the call.
#[derive(Serialize, Deserialize)]
struct Decision {
    id: String,
    approved: bool,
    by: String,
    reason: Option<String>,
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
            mirror: None,
        }
    }

    /// A store whose approvals every replica on `remote` lists and can decide.
    pub fn shared(remote: Arc<Remote>) -> Arc<Approvals> {
        let (changes, _) = broadcast::channel(1024);
        let others = Arc::new(Mutex::new(HashMap::new()));
        let store = Arc::new(Approvals {
            table: Mutex::new(Table::default()),
            changes,
            mirror: Some(Mirror {
                remote: remote.clone(),
                others: others.clone(),
            }),
        });
        let (weak, broadcast) = (Arc::downgrade(&store), store.changes.clone());
        remote.follow(
            remote.key(&["approvals", "changed"]),
            move |body| {
                let Ok(approval) = serde_json::from_str::<Approval>(body) else {
                    return;
                };
                let mut others = others.lock();
                if others.len() >= MIRRORED {
                    others.retain(|_, a| a.status == Status::Pending);
                    if others.len() >= MIRRORED {
                        return;
                    }
                }
                // Changes are published by tasks of their own, so they may arrive out
                // of order: a settled approval never goes back to pending.
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
                    (weak.upgrade(), serde_json::from_str::<Decision>(body))
                else {
                    return;
                };
                // Only the replica holding the call settles it; the rest ignore it.
                if store.holds(&decision.id) {
                    let _ = store.decide(
                        &decision.id,
                        decision.approved,
                        &decision.by,
                        decision.reason,
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
        table.pending.contains_key(id) || table.settled.iter().any(|a| a.id == id)
    }

    /// Tells the admin stream, and with a shared backend the other replicas.
    fn changed(&self, approval: Approval) {
        if let Some(mirror) = &self.mirror
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let Ok(body) = serde_json::to_string(&approval)
        {
            let remote = mirror.remote.clone();
            runtime.spawn(async move {
                let channel = remote.key(&["approvals", "changed"]);
                if let Err(err) = remote.publish(&channel, &body).await {
                    tracing::warn!(error = %err, "an approval's change could not be shared with the other replicas");
                }
            });
        }
        let _ = self.changes.send(approval);
    }

    /// Approves or denies an approval held by this replica or, with a shared
    /// backend, by another one: the holder settles it (exactly once, whoever asks
    /// first), and the answer is what it published, awaited for at most 3 s.
    pub async fn decide_anywhere(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
    ) -> Result<Approval, DecideError> {
        let Some(mirror) = &self.mirror else {
            return self.decide(id, approved, by, reason);
        };
        if self.holds(id) {
            return self.decide(id, approved, by, reason);
        }
        let known = mirror.others.lock().get(id).cloned();
        let Some(known) = known else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if known.status != Status::Pending {
            return Err(DecideError::Settled(Box::new(known)));
        }
        let mut changes = self.changes.subscribe();
        let body = serde_json::to_string(&Decision {
            id: id.to_owned(),
            approved,
            by: by.to_owned(),
            reason,
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
            Ok(settled)
        } else {
            Err(DecideError::Settled(Box::new(settled)))
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
        self.changed(approval);
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
            drop(table);
            self.changed(expired.clone());
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
        self.changed(settled.clone());
        Ok(settled)
    }

    /// Settles an approval its caller stopped waiting for.
    fn close(&self, id: &str, status: Status) {
        let mut table = self.table.lock();
        if let Some(pending) = table.pending.remove(id) {
            let settled = settle(&mut table, pending.approval, status, None, None);
            drop(table);
            self.changed(settled);
        }
    }

    /// Pending and recently settled approvals, newest first (with a shared
    /// backend, every replica's).
    pub fn list(&self) -> Vec<Approval> {
        let table = self.table.lock();
        let mut all: Vec<Approval> = table
            .pending
            .values()
            .map(|p| p.approval.clone())
            .chain(table.settled.iter().cloned())
            .collect();
        drop(table);
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

    /// One approval (with a shared backend, of any replica).
    pub fn get(&self, id: &str) -> Option<Approval> {
        let table = self.table.lock();
        table
            .pending
            .get(id)
            .map(|p| p.approval.clone())
            .or_else(|| table.settled.iter().find(|a| a.id == id).cloned())
            .or_else(|| {
                drop(table);
                self.mirror
                    .as_ref()
                    .and_then(|m| m.others.lock().get(id).cloned())
            })
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
