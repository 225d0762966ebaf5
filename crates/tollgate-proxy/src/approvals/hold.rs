//! Holding a call for a human. The client's request stays open as a stream (a
//! progress notification first, if it asked for progress); the human is asked
//! through the approvals queue, or, with `via: elicitation` and a client that can
//! be asked, through the client itself. The wait ends with the verdict, the
//! deadline, or the client going away (the approval is then `abandoned`).

use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tollgate_policy::{Approval, ApprovalVia};

use super::elicit::{Elicitations, Question};
use crate::audit::Record;
use crate::state::Shared;
use crate::store::approvals::{Outcome, Request};
use crate::upstream::{Event, Failure};

/// Where a held call's messages go while it waits.
pub type Sink = mpsc::Sender<Result<Event, Failure>>;

/// A call to hold.
pub struct Hold {
    /// Its id in the audit log.
    pub call_id: String,
    /// The server.
    pub server: Arc<str>,
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub arguments: Value,
    /// The authenticated client.
    pub client: Option<Arc<str>>,
    /// The OAuth token's user and client, when the caller sent a token.
    pub user: Option<(Arc<str>, Option<Arc<str>>)>,
    /// Tollgate's session id.
    pub session: Option<Arc<str>>,
    /// The deciding rule.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// How the rule asks for approval.
    pub approval: Approval,
    /// The client's progress token, if it asked for progress.
    pub progress_token: Option<Value>,
    /// Whether the client can be asked by elicitation (handshake era, capability declared).
    pub can_elicit: bool,
}

type Wait = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Waits for the human; `None` when the client went away first.
pub async fn wait(
    shared: &Arc<Shared>,
    elicitations: &Arc<Elicitations>,
    hold: &Hold,
    sink: &Sink,
) -> Option<Outcome> {
    let by_elicitation = hold.approval.via == ApprovalVia::Elicitation && hold.can_elicit;
    let (approval_id, wait, mut first) = ask(shared, elicitations, hold, by_elicitation);
    tracing::info!(approval = %approval_id, tool = %hold.tool, by_elicitation, "call held for approval");
    shared.audit.write(&Record::ApprovalRequested {
        call_id: &hold.call_id,
        approval_id: &approval_id,
        server: &hold.server,
        tool: &hold.tool,
        via: if by_elicitation {
            "elicitation"
        } else {
            "queue"
        },
    });
    if let Some(token) = &hold.progress_token {
        let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
            "progressToken": token, "progress": 0,
            "message": format!(
                "Waiting for a human to approve `{}` (approval {approval_id}, up to {}s)",
                hold.tool,
                hold.approval.timeout.as_secs()
            ),
        }});
        first.insert(0, note);
    }
    let outcome = async {
        for message in first {
            if sink.send(Ok(Event::message(message))).await.is_err() {
                return None;
            }
        }
        tokio::select! {
            outcome = wait => Some(outcome),
            // Dropping the wait withdraws the request: the approval is abandoned.
            () = sink.closed() => None,
        }
    }
    .await;
    settled(shared, hold, &approval_id, outcome.as_ref());
    outcome
}

/// Asks the human: opens an approval in the queue (and sends the webhook), or
/// prepares the elicitation request. Returns the approval's id, the wait for its
/// outcome and the messages to send the client first.
fn ask(
    shared: &Arc<Shared>,
    elicitations: &Arc<Elicitations>,
    hold: &Hold,
    by_elicitation: bool,
) -> (String, Wait, Vec<Value>) {
    let mut first = Vec::new();
    let (approval_id, wait): (String, Wait) = if by_elicitation {
        let (id, request, wait) = elicitations.ask(Question {
            server: &hold.server,
            tool: &hold.tool,
            arguments: &hold.arguments,
            reason: &hold.reason,
            session: hold.session.clone(),
            timeout: hold.approval.timeout,
        });
        first.push(request);
        (id, Box::pin(wait))
    } else {
        let ticket = shared.approvals.open(Request {
            server: hold.server.to_string(),
            tool: hold.tool.clone(),
            arguments: hold.arguments.clone(),
            client: hold.client.as_deref().map(str::to_owned),
            user: hold.user.as_ref().map(|(user, _)| user.to_string()),
            client_id: hold
                .user
                .as_ref()
                .and_then(|(_, client_id)| client_id.as_deref().map(str::to_owned)),
            session: hold.session.as_deref().map(str::to_owned),
            rule: hold.rule.clone(),
            reason: hold.reason.clone(),
            timeout: hold.approval.timeout,
        });
        let id = ticket.id.clone();
        super::webhook::notify(shared, &id);
        (id, Box::pin(ticket.wait()))
    };
    (approval_id, wait, first)
}

/// The `approval` record and log line of a settled hold.
fn settled(shared: &Shared, hold: &Hold, approval_id: &str, outcome: Option<&Outcome>) {
    let (verdict, by, reason) = match outcome {
        None => ("abandoned", None, None),
        Some(Outcome::Expired) => ("expired", None, None),
        Some(Outcome::Decided(v)) => (
            if v.approved { "approved" } else { "denied" },
            Some(v.by.as_str()),
            v.reason.as_deref(),
        ),
    };
    shared.audit.write(&Record::Approval {
        call_id: &hold.call_id,
        approval_id,
        server: &hold.server,
        tool: &hold.tool,
        verdict,
        decided_by: by,
        reason,
    });
    tracing::info!(approval = %approval_id, verdict, "approval settled");
}
