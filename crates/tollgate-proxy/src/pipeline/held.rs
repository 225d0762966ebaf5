//! Stage 4, held: a call that needs a human. The client gets a stream at once; a
//! task waits for the decision (`approvals::hold`) and then either forwards the
//! call exactly as it was evaluated, through the same [`call::forward`] as every
//! other call, or answers with the refusal.

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_mcp::{Era, Message};
use tollgate_policy::DenyKind;

use super::context::{Answer, Context};
use super::decide::{Held, deny, refusal, rule_label};
use super::{call, relay};
use crate::approvals::hold::{Hold, Sink, wait};
use crate::store::approvals::Outcome;
use crate::upstream::{Body, Event, Payload};

/// Answers a held call with a stream that ends with the call's result.
pub fn respond(ctx: Context, message: Message, held: Held) -> Answer {
    let (sink, events) = mpsc::channel(16);
    tokio::spawn(async move {
        let hold = hold_of(&ctx, &message, &held);
        let outcome = wait(ctx.shared(), &ctx.core.elicitations, &hold, &sink).await;
        settle(ctx, message, held, outcome, sink).await;
    });
    Answer {
        status: axum::http::StatusCode::OK,
        body: Body::Events(ReceiverStream::new(events).boxed()),
        session: None,
        retry_after: None,
    }
}

fn hold_of(ctx: &Context, message: &Message, held: &Held) -> Hold {
    let (tool, arguments) = message.tool_call().map_or_else(Default::default, |call| {
        (call.name.to_owned(), call.arguments.clone())
    });
    let session = ctx.session.as_ref();
    Hold {
        call_id: held.permit.call_id().to_owned(),
        server: ctx.server.name.clone(),
        tool,
        arguments,
        client: ctx.caller.client.clone(),
        session: session.map(|s| s.id.clone()),
        rule: rule_label(&held.decision),
        reason: held.decision.reason.clone(),
        approval: held.decision.approval.clone().unwrap_or_default(),
        progress_token: message.progress_token().cloned(),
        can_elicit: ctx.era == Era::Handshake && session.is_some_and(|s| s.elicitation),
    }
}

async fn settle(ctx: Context, message: Message, held: Held, outcome: Option<Outcome>, sink: Sink) {
    let Held {
        permit,
        mut decision,
        deny_as,
    } = held;
    let id = message.id().cloned().unwrap_or(Value::Null);
    let reason = match outcome {
        // The client went away: dropping the permit gives its slot back.
        None => return,
        Some(Outcome::Decided(verdict)) if verdict.approved => {
            let payload = Payload::of(&message);
            let answer = match call::forward(&ctx, payload, vec![permit]).await {
                Ok(reply) => relay::answer(&ctx, &message, false, reply),
                Err(err) => Err(err),
            };
            match answer {
                Ok(answer) => pipe(answer.body, &sink).await,
                Err(err) => send(&sink, err.to_json()).await,
            }
            return;
        }
        Some(Outcome::Decided(verdict)) => {
            let reason = match verdict.reason {
                Some(reason) if !reason.trim().is_empty() => {
                    format!("approval denied by {}: {reason}", verdict.by)
                }
                _ => format!("approval denied by {}", verdict.by),
            };
            (DenyKind::ApprovalDenied, reason)
        }
        Some(Outcome::Expired) => (
            DenyKind::ApprovalTimeout,
            "no one approved the call in time".to_owned(),
        ),
    };
    // Refused: the permit is dropped unfinished and its slot given back.
    drop(permit);
    deny(&mut decision, reason.0, reason.1);
    send(&sink, refusal(&decision, &id, ctx.era, deny_as)).await;
}

async fn send(sink: &Sink, message: Value) {
    // A client that went away meanwhile has nobody left to tell.
    let _ = sink.send(Ok(Event::message(message))).await;
}

/// Sends an answer's messages on the held call's stream.
async fn pipe(body: Body, sink: &Sink) {
    match body.into_events() {
        Body::Json(json) => {
            let _ = sink
                .send(Ok(Event {
                    data: json,
                    id: None,
                    retry: None,
                }))
                .await;
        }
        Body::Events(mut events) => {
            while let Some(event) = events.next().await {
                if sink.send(event).await.is_err() {
                    return;
                }
            }
        }
        Body::Empty | Body::Other { .. } | Body::Sse(_) => {}
    }
}
