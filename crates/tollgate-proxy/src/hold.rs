//! Holding a call for a human: the client's request stays open as an SSE stream
//! (progress notification if it asked for progress, keep-alive comments), and
//! once a human approves, the call is forwarded exactly as it was evaluated and
//! the upstream's answer is relayed on the same stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tollgate_mcp::{Era, Message, SseEvent, encode_event, events};
use tollgate_policy::{Action, ApprovalVia, DenyKind};

use crate::approvals::{Outcome, Request as ApprovalRequest, Verdict};
use crate::enforce::{Held, record_outcome, refusal};
use crate::forward::send;
use crate::state::{AppState, Server};

/// How often a held stream gets a keep-alive comment. Writing is also how a
/// vanished client is noticed, which abandons its approval.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Everything a held call needs after the request handler returns.
pub struct HoldContext {
    /// Proxy state.
    pub app: AppState,
    /// The server the call is for.
    pub server: Arc<Server>,
    /// The client's headers (forwarded headers are picked from them).
    pub headers: HeaderMap,
    /// The call as evaluated.
    pub message: Message,
    /// Authenticated client.
    pub client: Option<Arc<str>>,
    /// Tollgate's session id.
    pub session: Option<Arc<str>>,
    /// The upstream's session id.
    pub upstream_session: Option<String>,
    /// The request's era.
    pub era: Era,
}

fn message_event(value: &Value) -> Bytes {
    encode_event(&SseEvent {
        event: "message".into(),
        data: value.to_string(),
        id: String::new(),
        retry: None,
    })
}

/// Prefix of the ids of requests Tollgate itself sends to clients; their answers
/// are taken here and never forwarded upstream.
pub const OWN_REQUEST_PREFIX: &str = "tollgate-elicit-";

/// Answers a held call with an SSE stream that ends with the call's result. The
/// human is asked through the admin queue, or, with `via: elicitation` and a
/// handshake-era client that declared the capability, through the client itself.
pub fn hold(ctx: HoldContext, held: Held, client_can_elicit: bool) -> Response {
    let Some(call) = ctx.message.tool_call() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let approval = held.decision.approval.clone().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let by_elicitation =
        approval.via == ApprovalVia::Elicitation && client_can_elicit && ctx.era == Era::Handshake;
    let (approval_id, mut first_events, wait): (String, Vec<Bytes>, WaitFuture) = if by_elicitation
    {
        let (id, request, wait) = elicit(
            &ctx,
            call.name,
            call.arguments,
            &held.decision.reason,
            approval.timeout,
        );
        (id, vec![message_event(&request)], wait)
    } else {
        let ticket = ctx.app.approvals.open(ApprovalRequest {
            server: ctx.server.name.to_string(),
            tool: call.name.to_owned(),
            arguments: call.arguments.clone(),
            client: ctx.client.as_deref().map(str::to_owned),
            session: ctx.session.as_deref().map(str::to_owned),
            rule: held
                .decision
                .rule
                .as_ref()
                .map_or_else(|| "default".to_owned(), ToString::to_string),
            reason: held.decision.reason.clone(),
            timeout: approval.timeout,
        });
        let id = ticket.id.clone();
        crate::webhook::notify(&ctx.app, &id);
        (id, Vec::new(), Box::pin(ticket.wait()))
    };
    tracing::info!(approval = %approval_id, tool = call.name, by_elicitation, "call held for approval");
    ctx.app.audit.write(json!({
        "event": "approval_requested", "call_id": held.call_id, "approval_id": approval_id,
        "server": &*ctx.server.name, "tool": call.name, "via": if by_elicitation { "elicitation" } else { "queue" },
    }));
    if let Some(token) = ctx.message.progress_token() {
        let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
            "progressToken": token, "progress": 0,
            "message": format!("Waiting for a human to approve `{}` (approval {approval_id}, up to {}s)", call.name, approval.timeout.as_secs()),
        }});
        first_events.insert(0, message_event(&note));
    }

    tokio::spawn(async move {
        for event in first_events {
            let _ = tx.send(Ok(event)).await;
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        let mut wait = wait;
        let outcome = loop {
            tokio::select! {
                outcome = &mut wait => break Some(outcome),
                _ = keep_alive.tick() => {
                    if tx.send(Ok(Bytes::from_static(b": waiting for approval\n\n"))).await.is_err() {
                        break None;
                    }
                }
                () = tx.closed() => break None,
            }
        };
        // Dropping the wait withdraws the request when the client went away (abandoned).
        drop(wait);
        settle(ctx, held, outcome, &approval_id, tx).await;
    });

    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;
type WaitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// Removes a pending elicitation when its waiter goes away.
struct PendingElicitation {
    app: AppState,
    id: String,
}

impl Drop for PendingElicitation {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.app.elicitations.lock() {
            pending.remove(&self.id);
        }
    }
}

/// Builds the `elicitation/create` request that asks the client's own user, and
/// the future that waits for the answer (or the deadline).
fn elicit(
    ctx: &HoldContext,
    tool: &str,
    arguments: &Value,
    reason: &str,
    timeout: Duration,
) -> (String, Value, WaitFuture) {
    let mut bytes = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let id = format!(
        "{OWN_REQUEST_PREFIX}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let pretty = serde_json::to_string_pretty(arguments).unwrap_or_default();
    let request = json!({
        "jsonrpc": "2.0", "id": id, "method": "elicitation/create",
        "params": {
            "mode": "form",
            "message": format!("Tollgate: the agent wants to call `{tool}` on `{}`.\n{reason}\n\nArguments:\n{pretty}\n\nApprove this call?", ctx.server.name),
            "requestedSchema": {
                "type": "object",
                "properties": {"approve": {"type": "boolean", "title": "Approve this call", "default": false}},
                "required": ["approve"],
            },
        },
    });
    let (reply, answer) = oneshot::channel::<Value>();
    if let Ok(mut pending) = ctx.app.elicitations.lock() {
        pending.insert(id.clone(), (ctx.session.clone(), reply));
    }
    let guard = PendingElicitation {
        app: ctx.app.clone(),
        id: id.clone(),
    };
    let wait = async move {
        let _guard = guard;
        let by = "the client's user (elicitation)".to_owned();
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => {
                let result = response.get("result");
                let action = result
                    .and_then(|r| r.get("action"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let approved = action == "accept"
                    && result
                        .and_then(|r| r.pointer("/content/approve"))
                        .and_then(Value::as_bool)
                        == Some(true);
                let reason = match (approved, action, response.get("error")) {
                    (true, _, _) => None,
                    (false, _, Some(error)) => {
                        Some(format!("the client could not ask its user: {error}"))
                    }
                    (false, "accept", None) => Some("the user did not approve".to_owned()),
                    (false, other, None) => Some(format!("the user chose `{other}`")),
                };
                Outcome::Decided(Verdict {
                    approved,
                    by,
                    reason,
                })
            }
            Ok(Err(_)) | Err(_) => Outcome::Expired,
        }
    };
    (id, request, Box::pin(wait))
}

async fn settle(
    ctx: HoldContext,
    mut held: Held,
    outcome: Option<Outcome>,
    approval_id: &str,
    tx: Sender,
) {
    let tool = ctx
        .message
        .tool_call()
        .map(|c| c.name.to_owned())
        .unwrap_or_default();
    let release = |held: &mut Held| {
        ctx.server.release(held.decision.slot.take());
    };
    let (verdict, by, reason) = match &outcome {
        None => ("abandoned", None, None),
        Some(Outcome::Expired) => ("expired", None, None),
        Some(Outcome::Decided(v)) => (
            if v.approved { "approved" } else { "denied" },
            Some(v.by.clone()),
            v.reason.clone(),
        ),
    };
    ctx.app.audit.write(json!({
        "event": "approval", "call_id": held.call_id, "approval_id": approval_id, "server": &*ctx.server.name,
        "tool": tool, "verdict": verdict, "decided_by": by, "reason": reason,
    }));
    tracing::info!(approval = %approval_id, verdict, "approval settled");
    let id = ctx.message.id().cloned().unwrap_or(Value::Null);
    match outcome {
        None => release(&mut held),
        Some(Outcome::Decided(v)) if v.approved => {
            forward_approved(&ctx, &mut held, &tool, tx).await
        }
        Some(outcome) => {
            release(&mut held);
            let decision = &mut held.decision;
            decision.action = Action::Deny;
            match outcome {
                Outcome::Decided(v) => {
                    decision.kind = Some(DenyKind::ApprovalDenied);
                    decision.reason = match v.reason {
                        Some(reason) if !reason.trim().is_empty() => {
                            format!("approval denied by {}: {reason}", v.by)
                        }
                        _ => format!("approval denied by {}", v.by),
                    };
                }
                Outcome::Expired => {
                    decision.kind = Some(DenyKind::ApprovalTimeout);
                    decision.reason = "no one approved the call in time".to_owned();
                }
            }
            let answer = refusal(decision, &id, ctx.era, held.deny_as);
            let _ = tx.send(Ok(message_event(&answer))).await;
        }
    }
}

async fn forward_approved(ctx: &HoldContext, held: &mut Held, tool: &str, tx: Sender) {
    let id = ctx.message.id().cloned();
    let started = Instant::now();
    let body = ctx.message.to_bytes();
    let sent = send(
        &ctx.app,
        &ctx.server,
        Method::POST,
        ctx.upstream_session.as_deref(),
        &ctx.headers,
        Some(body),
    )
    .await;
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(failure) => {
            ctx.server.release(held.decision.slot.take());
            record_outcome(
                &ctx.app,
                &ctx.server,
                held.call_id,
                tool,
                started.elapsed(),
                "upstream_unreachable",
            );
            let error = failure.into_error(&ctx.server, id);
            let _ = tx.send(Ok(message_event(&error.to_json()))).await;
            return;
        }
    };
    record_outcome(
        &ctx.app,
        &ctx.server,
        held.call_id,
        tool,
        started.elapsed(),
        "forwarded",
    );
    let sse = crate::forward::is_event_stream(upstream.headers());
    if sse {
        let mut stream = events(upstream.bytes_stream());
        while let Some(event) = stream.next().await {
            let item = event
                .map(|e| encode_event(&e))
                .map_err(std::io::Error::other);
            if tx.send(item).await.is_err() {
                return;
            }
        }
    } else {
        match tokio::time::timeout(ctx.server.timeout, upstream.bytes()).await {
            Ok(Ok(bytes)) => {
                let data = String::from_utf8_lossy(&bytes).into_owned();
                let event = SseEvent {
                    event: "message".into(),
                    data,
                    id: String::new(),
                    retry: None,
                };
                let _ = tx.send(Ok(encode_event(&event))).await;
            }
            _ => {
                let error = crate::forward::UpstreamFailure::Timeout(ctx.server.timeout)
                    .into_error(&ctx.server, id);
                let _ = tx.send(Ok(message_event(&error.to_json()))).await;
            }
        }
    }
}
