//! Stage 7, batch: a JSON-RPC batch (2025-03-26). Each tool call in it is decided
//! on its own; refused calls are answered here, the rest go upstream as one batch
//! through the same [`call::forward`], and their answers through the same response
//! stages, which account for every call in it. With `telemetry:` each member is traced
//! as a message of its own: its server span, its decision inside it, its upstream exchange.

use std::sync::Arc;

use serde_json::Value;
use tollgate_mcp::{Era, Message};
use tollgate_policy::DenyKind;

use super::context::{Answer, Caller, Context, Core, Meta};
use super::decide::{Held, Permit, Verdict, decide, deny, refusal};
use super::respond::Chain;
use super::{call, session, tasks};
use crate::error::ProxyError;
use crate::state::Server;
use crate::telemetry;
use crate::upstream::{Body, Payload};

/// Handles a batch; `arrival` (with `telemetry:`) is what each member's server span needs.
pub async fn handle(
    core: &Core,
    server: &Arc<Server>,
    caller: &Caller,
    meta: &Meta,
    messages: Vec<Message>,
    arrival: Option<telemetry::Arrival<'_>>,
) -> Result<Answer, ProxyError> {
    headers_fit_batch(server, meta, &messages)?;
    let session = session::find(core.shared(), server, caller, meta.session.as_deref()).await?;
    if session.is_none() && !messages.iter().any(|m| m.method() == Some("initialize")) {
        return Err(ProxyError::MissingSession);
    }
    let forwarded = forwarded_headers(meta);
    let ctx = Context::new(
        core,
        server,
        caller,
        session,
        Era::Handshake,
        forwarded,
        meta.lane,
    );
    let Decided {
        refused,
        mut forward,
        mut permits,
        mut trace,
    } = decide_each(&ctx, messages, arrival.as_ref()).await;
    if forward.is_empty() {
        return Ok(Answer::message(Value::Array(refused)));
    }
    if let Some(trace) = &mut trace {
        let pipe = server.network_address.is_none();
        trace.send(&server.name, pipe, &mut forward, |at, span| {
            if let Some(call) = permits.get_mut(at).and_then(Permit::trace) {
                call.sent(span);
            }
        });
    }
    // Any answer in a batch may list tools.
    let chain = Chain::new(&ctx, permits).listing_tools(&ctx);
    let reply = match call::forward(&ctx, Payload::Batch(&forward), chain).await {
        Ok(reply) => reply,
        Err(err) => {
            if let Some(trace) = &trace {
                trace.failed(err.to_json()["error"]["code"].as_i64().unwrap_or(0));
            }
            return Err(err);
        }
    };
    let body = reply.body;
    if refused.is_empty() {
        return Ok(Answer {
            status: reply.status,
            body,
            session: None,
            retry_after: reply.retry_after,
        });
    }
    merge(server, body, refused)
}

/// Headers that describe one message cannot describe a batch: the routing headers,
/// and an `Mcp-Param-*` header one of the batch's tools declares (it cannot be
/// checked against one call). Headers no tool declares go on untouched.
fn headers_fit_batch(server: &Server, meta: &Meta, messages: &[Message]) -> Result<(), ProxyError> {
    // On a batch they could only mislead whatever routes on them after Tollgate.
    if meta
        .routing
        .as_ref()
        .is_some_and(|r| r.method.is_some() || r.name.is_some())
    {
        return Err(ProxyError::HeaderMismatch {
            id: None,
            message: "header mismatch: Mcp-Method and Mcp-Name cannot describe a JSON-RPC batch"
                .into(),
        });
    }
    let declared = |header: &str| {
        messages.iter().filter_map(Message::tool_call).any(|call| {
            server
                .params
                .get(call.name)
                .is_some_and(|d| d.iter().any(|p| p.header == header))
        })
    };
    if let Some((name, _)) = meta.params.iter().find(|(name, _)| declared(name.as_str())) {
        return Err(ProxyError::HeaderMismatch {
            id: None,
            message: format!("header mismatch: {name} cannot describe a JSON-RPC batch"),
        });
    }
    Ok(())
}

/// The headers forwarded upstream with the batch: its protocol version and its
/// `Mcp-Param-*` headers.
fn forwarded_headers(meta: &Meta) -> Vec<(axum::http::HeaderName, axum::http::HeaderValue)> {
    let mut forwarded = Vec::new();
    if let Some(version) = meta
        .routing
        .as_ref()
        .and_then(|r| r.protocol_version.clone())
    {
        forwarded.push((
            axum::http::HeaderName::from_static("mcp-protocol-version"),
            version,
        ));
    }
    forwarded.extend(meta.params.iter().cloned());
    forwarded
}

/// The answer to a member refused with an error: with the member's own id, so the
/// client knows which call was refused (a step-up refusal is an error without one).
fn refused_member(err: &ProxyError, message: &Message) -> Value {
    let mut answer = err.to_json();
    if let (Some(id), Some(slot)) = (message.id(), answer.get_mut("id"))
        && slot.is_null()
    {
        *slot = id.clone();
    }
    answer
}

/// The refusal of a member that needs approval: a batch has one answer for all its
/// calls, so one call cannot wait for a human while the others return. Its permit is
/// dropped unused.
fn held_in_batch(mut held: Held, message: &Message) -> Value {
    let reason = format!(
        "{} (calls that need approval cannot be sent in a JSON-RPC batch; send it on its own)",
        held.decision.reason
    );
    deny(&mut held.decision, DenyKind::ApprovalDenied, reason);
    let id = message.id().cloned().unwrap_or(Value::Null);
    refusal(&held.decision, &id, Era::Handshake, held.deny_as)
}

/// A batch's messages, decided one by one.
struct Decided {
    /// Answers to the calls refused here.
    refused: Vec<Value>,
    /// The messages that go upstream.
    forward: Vec<Value>,
    /// The permits of the calls among them.
    permits: Vec<Permit>,
    /// Each member's spans, with `telemetry:`.
    trace: Option<telemetry::Batch>,
}

/// Decides each message; with telemetry (`arrival`), each in a server span of its own.
async fn decide_each(
    ctx: &Context,
    messages: Vec<Message>,
    arrival: Option<&telemetry::Arrival<'_>>,
) -> Decided {
    let mut refused = Vec::new();
    let mut forward = Vec::new();
    let mut permits = Vec::new();
    let mut trace = arrival.map(|_| telemetry::Batch::default());
    for message in messages {
        let span = arrival.and_then(|arrival| telemetry::server(&message, arrival));
        // Where the member went: its index among the forwarded messages and the
        // permits; or why it was refused here when no decision span says so.
        let mut went = None;
        let mut refused_here = None;
        let verdict = match (tasks::in_batch(&message), &span) {
            (Some(answer), _) => {
                refused_here = Some(answer["error"]["code"].to_string());
                Err(answer)
            }
            // Boxed, so that the untraced batch's future does not grow.
            (None, Some(span)) => Ok(Box::pin(telemetry::traced(
                span.clone(),
                decide(ctx, &message),
                |err| err.to_json()["error"]["code"].as_i64().unwrap_or(0),
            ))
            .await),
            (None, None) => Ok(decide(ctx, &message).await),
        };
        match verdict {
            Err(answer) => refused.push(answer),
            Ok(Err(err)) => refused.push(refused_member(&err, &message)),
            Ok(Ok(Verdict::Refuse(answer))) => refused.push(answer),
            Ok(Ok(Verdict::Hold(held))) => {
                refused_here = Some(DenyKind::ApprovalDenied.as_str().to_owned());
                refused.push(held_in_batch(*held, &message));
            }
            Ok(Ok(Verdict::Forward(permit))) => {
                went = Some((forward.len(), permit.is_some().then_some(permits.len())));
                permits.extend(permit);
                forward.push(message.into_value());
            }
        }
        if let (Some(trace), Some(span)) = (&mut trace, span) {
            trace.member(span, went, refused_here.as_deref());
        }
    }
    Decided {
        refused,
        forward,
        permits,
        trace,
    }
}

/// Tollgate's answers merged into the upstream's JSON array.
fn merge(server: &Server, body: Body, refused: Vec<Value>) -> Result<Answer, ProxyError> {
    let mut answers = match body {
        Body::Json(json) => match json.into_value() {
            Ok(Value::Array(items)) => items,
            Ok(single @ Value::Object(_)) => vec![single],
            _ => return Err(not_json(server)),
        },
        Body::Empty => Vec::new(),
        Body::Events(_) | Body::Sse(_) | Body::Other { .. } => return Err(not_json(server)),
    };
    answers.extend(refused);
    Ok(Answer::message(Value::Array(answers)))
}

fn not_json(server: &Server) -> ProxyError {
    ProxyError::Upstream {
        id: None,
        message: format!(
            "upstream `{}` answered a batch with something that is not JSON",
            server.name
        ),
    }
}
