//! Holding a call for a human. The request waits at most `approval.wait` (with
//! progress notifications, if the client asked for progress); if nobody decided by
//! then, the client is told the approval is pending and to call again, while the
//! approval stays pending until its deadline. A retry of the same call joins the
//! same approval, redeems it once approved, or hears the denial.
//!
//! Who is asked: the approvals queue (admin page and API, webhook); or, with `via:
//! elicitation`, the client's own user: by an `elicitation/create` request on the
//! open stream in the handshake era, or by an `inputRequests` form in an
//! `InputRequiredResult` in the stateless era (multi round-trip requests).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tollgate_policy::{Approval, ApprovalVia, DenyKind};

use super::elicit::{Elicitations, Question};
use super::state::{Claims, Expected, Keys, Kind, StateError, StateKey, unix_after, unix_of};
use crate::audit::Record;
use crate::state::Shared;
use crate::store::approvals::{Binding, Principal, Request, Standing, Status, Verdict};
use crate::upstream::{Event, Failure};

/// Where a held call's messages go while it waits.
pub type Sink = mpsc::Sender<Result<Event, Failure>>;

/// The `inputRequests` key of Tollgate's approval question (stateless era).
pub const QUESTION_KEY: &str = "dev.tollgate/approval";

/// The `inputRequests` key of the link to the approvals page (stateless era).
pub const PAGE_KEY: &str = "dev.tollgate/approval-page";

/// How often a waiting request hears that it still waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How the client can be asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asking {
    /// Handshake era, `elicitation` declared at `initialize`: a request on the stream.
    pub on_stream: bool,
    /// Stateless era, form elicitation declared: an `inputRequests` form.
    pub form: bool,
    /// Stateless era, URL elicitation declared: an `inputRequests` link.
    pub url: bool,
    /// Stateless era: the answer is an `InputRequiredResult`.
    pub stateless: bool,
}

/// A call to hold.
pub struct Hold<'m> {
    /// Its id in the audit log.
    pub call_id: String,
    /// The server.
    pub server: Arc<str>,
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub arguments: &'m Value,
    /// `sha256:<hex>` of the arguments as canonical JSON.
    pub digest: String,
    /// Who calls (and may retry it), shared with its approval.
    pub principal: Arc<Principal>,
    /// The deciding rule.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// How the rule asks for approval.
    pub approval: Approval,
    /// How long this request waits before it is told to retry.
    pub wait: Duration,
    /// The client's progress token, if it asked for progress.
    pub progress_token: Option<Value>,
    /// How the client can be asked.
    pub asking: Asking,
    /// Tollgate's `requestState`, when the call is a retry that carries one.
    pub state: Option<String>,
    /// The client's answer to Tollgate's question (`inputResponses`), if any.
    pub answer: Option<Value>,
}

/// How holding ended.
#[derive(Debug)]
pub enum Ending {
    /// Forward the call: a human, the client's user or a grant approved it.
    Forward,
    /// Refuse it.
    Refuse(DenyKind, String),
    /// Nobody decided yet: the client is to call again.
    Pending(Pending),
    /// The retry's `requestState` is refused.
    Invalid(StateError),
    /// The client went away.
    Gone,
}

/// What a client told to call again gets.
#[derive(Debug)]
pub struct Pending {
    /// The approval's id (or the question's).
    pub approval_id: String,
    /// When it expires.
    pub expires_at: SystemTime,
    /// Where a person approves it, for the queue.
    pub url: Option<String>,
    /// `requestState`, in the stateless era.
    pub state: Option<String>,
    /// `inputRequests`, in the stateless era.
    pub input_requests: Option<Value>,
}

/// Holds a call until it may go on, is refused, or its request stops waiting.
pub async fn hold(
    shared: &Arc<Shared>,
    elicitations: &Arc<Elicitations>,
    keys: &Keys,
    hold: &Hold<'_>,
    sink: &Sink,
) -> Ending {
    let key = match keys.get().await {
        Ok(key) => key,
        Err(err) => return unreachable(hold, &err),
    };
    let expected = Expected {
        principal: &hold.principal.key,
        server: &hold.server,
        tool: &hold.tool,
        digest: &hold.digest,
    };
    let claims = match hold.state.as_deref().map(|s| key.open(s, &expected)) {
        None => None,
        Some(Ok(claims)) => Some(claims),
        Some(Err(err)) => {
            tracing::warn!(tool = %hold.tool, error = %err, "requestState refused");
            return Ending::Invalid(err);
        }
    };
    if hold.approval.via == ApprovalVia::Elicitation {
        if hold.asking.form {
            return ask_in_result(shared, key, hold, claims.as_ref());
        }
        if hold.asking.on_stream {
            return ask_on_stream(shared, elicitations, hold, sink).await;
        }
    }
    // The approval the state names, else this call's own; an approved one is used
    // before any grant; else a grant; else the approval (a new one if none).
    let found = match approval_of(shared, hold, claims).await {
        Ok(found) => found,
        Err(ending) => return ending,
    };
    let approved = matches!(&found, Some((_, Standing::Decided(v))) if v.approved);
    if !approved && let Some(ending) = granted(shared, hold).await {
        return ending;
    }
    let (id, standing) = match found {
        Some(found) => found,
        None => match open(shared, hold) {
            Ok(opened) => opened,
            Err(why) => return Ending::Refuse(DenyKind::ApprovalDenied, why),
        },
    };
    if let Some(ending) = settle(shared, hold, &id, standing).await {
        return ending;
    }
    let standing = match wait(shared, hold, &id, sink).await {
        Some(standing) => standing,
        None => {
            shared.approvals.abandon(&id);
            return Ending::Gone;
        }
    };
    if let Some(ending) = settle(shared, hold, &id, standing).await {
        return ending;
    }
    pending(shared, key, hold, &id)
}

/// The approval the retry's state names, else this call's own (by its key), and
/// where it stands; or how the call ends when that cannot be known.
async fn approval_of(
    shared: &Shared,
    hold: &Hold<'_>,
    claims: Option<Claims>,
) -> Result<Option<(String, Standing)>, Ending> {
    match claims {
        Some(claims) if claims.kind == Kind::Queue => {
            match shared.approvals.standing(&claims.id).await {
                Ok(Some(standing)) => Ok(Some((claims.id, standing))),
                Ok(None) => Err(Ending::Refuse(
                    DenyKind::ApprovalTimeout,
                    format!(
                        "approval {} is not known here (was Tollgate restarted?); call the tool again without requestState to ask anew",
                        claims.id
                    ),
                )),
                Err(err) => Err(unreachable(hold, &err)),
            }
        }
        // A question's state on a rule that now uses the queue: ask anew.
        _ => shared
            .approvals
            .find(&hold.server, &hold.principal.key, &hold.tool, &hold.digest)
            .await
            .map_err(|err| unreachable(hold, &err)),
    }
}

/// How the call ends when a grant lets it through (or the grants cannot be
/// read); `None` when no grant does.
async fn granted(shared: &Shared, hold: &Hold<'_>) -> Option<Ending> {
    let grant = shared
        .approvals
        .use_grant(
            &hold.server,
            &hold.tool,
            &hold.principal.client_key,
            &hold.principal.session_key,
            &hold.digest,
        )
        .await;
    match grant {
        Ok(Some(grant)) => {
            tracing::info!(grant = %grant.id, tool = %hold.tool, "call let through by a grant");
            shared.audit.write(&Record::GrantUsed {
                call_id: &hold.call_id,
                grant_id: &grant.id,
                server: &hold.server,
                tool: &hold.tool,
                granted_by: &grant.granted_by,
            });
            Some(Ending::Forward)
        }
        Ok(None) => None,
        Err(err) => Some(unreachable(hold, &err)),
    }
}

/// The live approval of this call, or a new one (then announced).
fn open(shared: &Arc<Shared>, hold: &Hold<'_>) -> Result<(String, Standing), String> {
    let opened = shared.approvals.open(Request {
        server: hold.server.to_string(),
        tool: hold.tool.clone(),
        arguments: hold.arguments.clone(),
        arguments_digest: hold.digest.clone(),
        principal: hold.principal.clone(),
        call_id: hold.call_id.clone(),
        rule: hold.rule.clone(),
        reason: hold.reason.clone(),
        timeout: hold.approval.timeout,
        valid_for: hold.approval.valid_for,
    });
    let (id, standing, new) =
        opened.map_err(|err| format!("the call could not be held for approval: {err}"))?;
    if new {
        tracing::info!(approval = %id, tool = %hold.tool, "call held for approval");
        shared.audit.write(&Record::ApprovalRequested {
            call_id: &hold.call_id,
            approval_id: &id,
            server: &hold.server,
            tool: &hold.tool,
            via: "queue",
        });
        super::webhook::notify(shared, &id);
    } else {
        tracing::info!(approval = %id, tool = %hold.tool, "retry joined its approval");
    }
    Ok((id, standing))
}

/// A call that needs the shared approvals while Redis cannot be reached: refused
/// (whatever `state.on_failure` says, an approval is never assumed).
fn unreachable(hold: &Hold<'_>, err: &crate::store::remote::Unavailable) -> Ending {
    tracing::warn!(tool = %hold.tool, error = %err, "held call refused: its approval is kept in the shared state, which cannot be reached");
    Ending::Refuse(
        DenyKind::ApprovalDenied,
        format!(
            "tools/call `{}` was not forwarded: it needs an approval, kept in the shared state, and {err}; retry when the operator has Redis back",
            hold.tool
        ),
    )
}

/// What a decided (or over) approval means for this call; `None` while pending.
async fn settle(shared: &Shared, hold: &Hold<'_>, id: &str, standing: Standing) -> Option<Ending> {
    let verdict = match over(shared, hold, id, standing)? {
        Ok(verdict) => verdict,
        Err(ending) => return Some(ending),
    };
    if !verdict.approved {
        return Some(refused(&verdict));
    }
    let binding = Binding {
        principal: &hold.principal.key,
        server: &hold.server,
        tool: &hold.tool,
        digest: &hold.digest,
    };
    match shared.approvals.redeem(id, binding).await {
        Ok(Ok(verdict)) => {
            tracing::info!(approval = %id, tool = %hold.tool, "approval redeemed");
            shared.audit.write(&Record::ApprovalRedeemed {
                call_id: &hold.call_id,
                approval_id: id,
                server: &hold.server,
                tool: &hold.tool,
                decided_by: &verdict.by,
            });
            Some(Ending::Forward)
        }
        // Another retry used it in the meantime, or it just expired.
        Ok(Err(Some(standing))) if !matches!(standing, Standing::Decided(_)) => {
            match over(shared, hold, id, standing) {
                Some(Err(ending)) => Some(ending),
                _ => Some(unusable(id)),
            }
        }
        Ok(Err(_)) => Some(unusable(id)),
        Err(err) => Some(unreachable(hold, &err)),
    }
}

fn unusable(id: &str) -> Ending {
    Ending::Refuse(
        DenyKind::ApprovalDenied,
        format!("approval {id} could not be used; call the tool again to ask anew"),
    )
}

/// A decided approval's verdict, or the refusal an over one means; `None` while pending.
fn over(
    shared: &Shared,
    hold: &Hold<'_>,
    id: &str,
    standing: Standing,
) -> Option<Result<Verdict, Ending>> {
    Some(match standing {
        Standing::Pending(_) => return None,
        Standing::Decided(verdict) => Ok(verdict),
        Standing::Over(Status::Expired) => {
            record_verdict(shared, hold, id, "expired", None);
            Err(Ending::Refuse(
                DenyKind::ApprovalTimeout,
                "no one approved the call in time".to_owned(),
            ))
        }
        Standing::Over(_) => Err(Ending::Refuse(
            DenyKind::ApprovalDenied,
            format!(
                "approval {id} was already used by another request for this call; call the tool again (without requestState) to ask anew"
            ),
        )),
    })
}

/// The refusal a denial becomes.
fn refused(verdict: &Verdict) -> Ending {
    let reason = match verdict.reason.as_deref().map(str::trim) {
        Some(reason) if !reason.is_empty() => {
            format!("approval denied by {}: {reason}", verdict.by)
        }
        _ => format!("approval denied by {}", verdict.by),
    };
    Ending::Refuse(DenyKind::ApprovalDenied, reason)
}

/// Waits up to the hold's `wait` for a decision, telling a client that asked for
/// progress now and then; `None` when the client went away.
async fn wait(shared: &Arc<Shared>, hold: &Hold<'_>, id: &str, sink: &Sink) -> Option<Standing> {
    let until = tokio::time::Instant::now() + hold.wait;
    let mut progress = 0u64;
    loop {
        if let Some(token) = &hold.progress_token {
            let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                "progressToken": token, "progress": progress,
                "message": format!(
                    "Waiting for a human to approve `{}` (approval {id})",
                    hold.tool
                ),
            }});
            if sink.send(Ok(Event::message(note))).await.is_err() {
                return None;
            }
            progress += 1;
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let standing = tokio::select! {
            standing = shared.approvals.wait(id, left.min(PROGRESS_EVERY)) => standing,
            () = sink.closed() => return None,
        };
        let standing = standing.unwrap_or(Standing::Over(Status::Expired));
        if !matches!(standing, Standing::Pending(_)) || tokio::time::Instant::now() >= until {
            return Some(standing);
        }
    }
}

/// The client is told to call again: an `approval_pending` result, or in the
/// stateless era an `InputRequiredResult` with a sealed `requestState`.
fn pending(shared: &Shared, key: &StateKey, hold: &Hold<'_>, id: &str) -> Ending {
    let approval = shared.approvals.get(id);
    let expires_at = approval
        .as_ref()
        .and_then(|a| humantime::parse_rfc3339(&a.deadline).ok())
        .unwrap_or_else(|| SystemTime::now() + hold.approval.timeout);
    let url = shared
        .notify()
        .admin_url()
        .map(|admin| format!("{admin}/#approval={id}"));
    let expires = humantime::format_rfc3339_seconds(expires_at).to_string();
    shared.audit.write(&Record::ApprovalPending {
        call_id: &hold.call_id,
        approval_id: id,
        server: &hold.server,
        tool: &hold.tool,
        expires_at: &expires,
    });
    tracing::info!(approval = %id, tool = %hold.tool, "approval pending: the client is to call again");
    let (state, input_requests) = if hold.asking.stateless {
        let state = key.seal(&claims_for(hold, Kind::Queue, id, unix_of(expires_at)));
        let link = match (&url, hold.asking.url) {
            (Some(url), true) => Some(json!({PAGE_KEY: {
                "method": "elicitation/create",
                "params": {
                    "mode": "url",
                    "message": format!(
                        "Tollgate: a person must approve the call of `{}` on `{}` ({}). Open the approvals page to approve it, or ask an approver.",
                        hold.tool, hold.server, hold.reason
                    ),
                    "url": url,
                },
            }})),
            _ => None,
        };
        (Some(state), link)
    } else {
        (None, None)
    };
    Ending::Pending(Pending {
        approval_id: id.to_owned(),
        expires_at,
        url,
        state,
        input_requests,
    })
}

fn claims_for(hold: &Hold<'_>, kind: Kind, id: &str, expires: u64) -> Claims {
    Claims {
        kind,
        id: id.to_owned(),
        principal: hold.principal.key.to_string(),
        server: hold.server.to_string(),
        tool: hold.tool.clone(),
        digest: hold.digest.clone(),
        expires,
    }
}

/// Stateless era, `via: elicitation`: the client's user is asked by a form in an
/// `InputRequiredResult`; the retry carries the answer and the state, used once.
fn ask_in_result(
    shared: &Shared,
    key: &StateKey,
    hold: &Hold<'_>,
    claims: Option<&Claims>,
) -> Ending {
    if let (Some(claims), Some(answer)) = (claims.filter(|c| c.kind == Kind::Elicit), &hold.answer)
    {
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(claims.expires);
        if !shared.approvals.consume(&claims.id, until) {
            return Ending::Invalid(StateError::Used);
        }
        let verdict = super::elicit::verdict_of_result(answer);
        shared.audit.write(&Record::Approval {
            call_id: &hold.call_id,
            approval_id: &claims.id,
            server: &hold.server,
            tool: &hold.tool,
            verdict: if verdict.approved {
                "approved"
            } else {
                "denied"
            },
            decided_by: Some(&verdict.by),
            reason: verdict.reason.as_deref(),
        });
        return if verdict.approved {
            Ending::Forward
        } else {
            refused(&verdict)
        };
    }
    let id = crate::store::random_hex(12);
    shared.audit.write(&Record::ApprovalRequested {
        call_id: &hold.call_id,
        approval_id: &id,
        server: &hold.server,
        tool: &hold.tool,
        via: "elicitation",
    });
    let question = super::elicit::form(&Question {
        server: &hold.server,
        tool: &hold.tool,
        arguments: hold.arguments,
        reason: &hold.reason,
        session: None,
        timeout: hold.approval.timeout,
    });
    let expires = unix_after(hold.approval.timeout);
    Ending::Pending(Pending {
        state: Some(key.seal(&claims_for(hold, Kind::Elicit, &id, expires))),
        approval_id: id,
        expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
        url: None,
        input_requests: Some(json!({QUESTION_KEY: {
            "method": "elicitation/create", "params": question,
        }})),
    })
}

/// Handshake era, `via: elicitation`: an `elicitation/create` request on the open
/// stream; the request stays open until the user answers (or the deadline).
async fn ask_on_stream(
    shared: &Shared,
    elicitations: &Arc<Elicitations>,
    hold: &Hold<'_>,
    sink: &Sink,
) -> Ending {
    let (id, request, answer) = elicitations.ask(Question {
        server: &hold.server,
        tool: &hold.tool,
        arguments: hold.arguments,
        reason: &hold.reason,
        session: hold.principal.session.clone(),
        timeout: hold.approval.timeout,
    });
    tracing::info!(approval = %id, tool = %hold.tool, "call held: asking the client's user");
    shared.audit.write(&Record::ApprovalRequested {
        call_id: &hold.call_id,
        approval_id: &id,
        server: &hold.server,
        tool: &hold.tool,
        via: "elicitation",
    });
    if sink.send(Ok(Event::message(request))).await.is_err() {
        return Ending::Gone;
    }
    let verdict = tokio::select! {
        verdict = answer => verdict,
        // Dropping the wait withdraws the question.
        () = sink.closed() => {
            record_verdict(shared, hold, &id, "abandoned", None);
            return Ending::Gone;
        }
    };
    match verdict {
        Some(verdict) => {
            let name = if verdict.approved {
                "approved"
            } else {
                "denied"
            };
            record_verdict(shared, hold, &id, name, Some(&verdict));
            if verdict.approved {
                Ending::Forward
            } else {
                refused(&verdict)
            }
        }
        None => {
            record_verdict(shared, hold, &id, "expired", None);
            Ending::Refuse(
                DenyKind::ApprovalTimeout,
                "no one approved the call in time".to_owned(),
            )
        }
    }
}

fn record_verdict(shared: &Shared, hold: &Hold<'_>, id: &str, verdict: &str, by: Option<&Verdict>) {
    shared.audit.write(&Record::Approval {
        call_id: &hold.call_id,
        approval_id: id,
        server: &hold.server,
        tool: &hold.tool,
        verdict,
        decided_by: by.map(|v| v.by.as_str()),
        reason: by.and_then(|v| v.reason.as_deref()),
    });
    tracing::info!(approval = %id, verdict, "approval settled");
}
