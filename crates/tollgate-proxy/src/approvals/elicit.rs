//! Approval by elicitation: Tollgate's own `elicitation/create` requests to a
//! handshake-era client that declared the capability, and their answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tollgate_mcp::{Kind, Message};

use crate::store::approvals::Verdict;
use crate::store::sessions::Session;

/// Prefix of the ids of requests Tollgate itself sends to clients; their answers
/// are taken here and never forwarded upstream.
pub const OWN_REQUEST_PREFIX: &str = "tollgate-elicit-";

type Waiter = (Option<Arc<str>>, oneshot::Sender<Value>);

/// Tollgate's requests awaiting the client's answer, by request id, with the
/// session they were sent on.
#[derive(Default)]
pub struct Elicitations {
    pending: Mutex<HashMap<String, Waiter>>,
}

/// Removes a pending elicitation when its waiter goes away.
struct Pending {
    table: Arc<Elicitations>,
    id: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.table.pending.lock().remove(&self.id);
    }
}

/// What the user is asked about.
pub struct Question<'a> {
    /// The server.
    pub server: &'a str,
    /// The tool.
    pub tool: &'a str,
    /// Its arguments.
    pub arguments: &'a Value,
    /// The rule's reason.
    pub reason: &'a str,
    /// The session it is asked on.
    pub session: Option<Arc<str>>,
    /// How long the user has.
    pub timeout: Duration,
}

impl Elicitations {
    /// Takes a client's answer to one of Tollgate's own requests; `true` when the
    /// message was one (it is never forwarded, whoever sent it).
    pub fn take_answer(&self, message: &Message, session: Option<&Session>) -> bool {
        if message.kind() != Kind::Response {
            return false;
        }
        let Some(id) = message
            .id()
            .and_then(Value::as_str)
            .filter(|id| id.starts_with(OWN_REQUEST_PREFIX))
        else {
            return false;
        };
        let mut pending = self.pending.lock();
        // Only the session the request was sent on may answer it.
        let same_session = pending
            .get(id)
            .is_some_and(|(s, _)| s.as_deref() == session.map(|s| &*s.id));
        if same_session && let Some((_, reply)) = pending.remove(id) {
            // The waiter may have given up meanwhile; then the answer has no one to go to.
            let _ = reply.send(message.as_value().clone());
        }
        true
    }

    /// The `elicitation/create` request that asks the client's user, and the future
    /// that waits for the answer (`None` at the deadline).
    pub fn ask(
        self: &Arc<Self>,
        question: Question<'_>,
    ) -> (
        String,
        Value,
        impl Future<Output = Option<Verdict>> + Send + 'static,
    ) {
        let id = format!("{OWN_REQUEST_PREFIX}{}", crate::store::random_hex(12));
        let request = json!({
            "jsonrpc": "2.0", "id": id, "method": "elicitation/create", "params": form(&question),
        });
        let (reply, answer) = oneshot::channel::<Value>();
        self.pending
            .lock()
            .insert(id.clone(), (question.session, reply));
        let guard = Pending {
            table: self.clone(),
            id: id.clone(),
        };
        let timeout = question.timeout;
        let wait = async move {
            let _guard = guard;
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(response)) => Some(verdict(&response)),
                Ok(Err(_)) | Err(_) => None,
            }
        };
        (id, request, wait)
    }
}

/// The `elicitation/create` form that asks the user to approve a call.
pub fn form(question: &Question<'_>) -> Value {
    let pretty = serde_json::to_string_pretty(question.arguments).unwrap_or_default();
    json!({
        "mode": "form",
        "message": format!(
            "Tollgate: the agent wants to call `{}` on `{}`.\n{}\n\nArguments:\n{pretty}\n\nApprove this call?",
            question.tool, question.server, question.reason
        ),
        "requestedSchema": {
            "type": "object",
            "properties": {"approve": {"type": "boolean", "title": "Approve this call", "default": false}},
            "required": ["approve"],
        },
    })
}

/// The user's answer (a JSON-RPC response to Tollgate's request) as a verdict.
fn verdict(response: &Value) -> Verdict {
    match response.get("error") {
        Some(error) => Verdict {
            approved: false,
            by: BY.to_owned(),
            reason: Some(format!("the client could not ask its user: {error}")),
        },
        None => verdict_of_result(response.get("result").unwrap_or(&Value::Null)),
    }
}

/// Who decides by elicitation.
pub const BY: &str = "the client's user (elicitation)";

/// An `ElicitResult` as a verdict: approved only on `accept` with `approve: true`.
pub fn verdict_of_result(result: &Value) -> Verdict {
    let action = result.get("action").and_then(Value::as_str).unwrap_or("");
    let approved = action == "accept"
        && result.pointer("/content/approve").and_then(Value::as_bool) == Some(true);
    let reason = match (approved, action) {
        (true, _) => None,
        (false, "accept") => Some("the user did not approve".to_owned()),
        (false, other) => Some(format!("the user chose `{other}`")),
    };
    Verdict {
        approved,
        by: BY.to_owned(),
        reason,
    }
}
