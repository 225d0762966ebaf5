//! Stage 4, held: a call that needs a human. The client gets a stream at once; a
//! task holds the call (`approvals::hold`) and then either forwards it exactly as
//! it was evaluated (less Tollgate's own `requestState` and `inputResponses`),
//! through the same [`call::forward`] as every other call, or answers with the
//! refusal, or tells the client to call again: an `approval_pending` tool result,
//! or in the stateless era an `InputRequiredResult` (multi round-trip requests).

use std::sync::Arc;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_mcp::{Era, ErrorCode, Message, error_response, result_response};

use super::context::{Answer, Context};
use super::decide::{Held, deny, refusal, rule_label};
use super::respond::Chain;
use super::{call, relay, tasks};
use crate::approvals::hold::{Asking, Ending, Hold, Pending, QUESTION_KEY, Sink, hold};
use crate::approvals::state::PREFIX;
use crate::audit::canonical_digest;
use crate::store::principal::Principal;
use crate::telemetry;
use crate::upstream::{Body, Event, Payload};

/// Answers a held call with a stream that ends with the call's answer.
pub fn respond(ctx: Context, message: Message, held: Held) -> Answer {
    let (sink, events) = mpsc::channel(16);
    let (entry, cancelled) = ctx
        .core
        .holding
        .hold(holding_key(&ctx, message.id().unwrap_or(&Value::Null)));
    // The held call stays in its trace (`telemetry:`), its wait a span of its own.
    tokio::spawn(telemetry::in_current(async move {
        let holding = hold_of(&ctx, &message, &held);
        let ending = tokio::select! {
            ending = telemetry::approval_wait(hold(
                ctx.shared(),
                &ctx.core.elicitations,
                &ctx.core.state_key,
                &holding,
                &sink,
            )) => ending,
            // The client cancelled the request: it no longer waits, the approval stays
            // for its retry. (A cancellation after this goes upstream like any other.)
            Ok(()) = cancelled => {
                tracing::info!(tool = %holding.tool, "held call cancelled by the client");
                Ending::Gone
            }
        };
        drop(entry);
        settle(ctx, message, held, ending, sink).await;
    }));
    Answer {
        status: axum::http::StatusCode::OK,
        body: Body::Events(ReceiverStream::new(events).boxed()),
        session: None,
        retry_after: None,
    }
}

/// A held call's key among its owner's: client, session, request id.
fn holding_key(ctx: &Context, id: &Value) -> String {
    format!(
        "{}\n{}\n{id}",
        ctx.client_key,
        ctx.session.as_ref().map_or("", |s| &*s.id)
    )
}

/// Takes the client's `notifications/cancelled` for a call still being held: the
/// hold ends (the approval stays for the retry); `true` when it was one, which then
/// goes no further (the upstream never saw that request).
pub fn withdraw(ctx: &Context, message: &Message) -> bool {
    if message.method() != Some("notifications/cancelled") || message.id().is_some() {
        return false;
    }
    let Some(id) = message.params().and_then(|p| p.get("requestId")) else {
        return false;
    };
    ctx.core.holding.cancel(&holding_key(ctx, id))
}

/// Tollgate's `requestState` in a call's params, if it carries one.
fn own_state(message: &Message) -> Option<&str> {
    message
        .request_state()?
        .as_str()
        .filter(|s| s.starts_with(PREFIX))
}

/// What the hold needs of the call; the arguments are borrowed from the message,
/// which a large call would otherwise keep twice while it waits.
fn hold_of<'m>(ctx: &Context, message: &'m Message, held: &Held) -> Hold<'m> {
    let (tool, arguments) = message
        .tool_call()
        .map_or(("", &Value::Null), |call| (call.name, call.arguments));
    let session = ctx.session.as_ref();
    let approval = held.decision.approval.clone().unwrap_or_default();
    let elicitation = (ctx.era == Era::Stateless)
        .then(|| {
            message
                .client_capabilities()?
                .get("elicitation")?
                .as_object()
        })
        .flatten();
    let asking = Asking {
        on_stream: ctx.era == Era::Handshake && session.is_some_and(|s| s.elicitation),
        // An empty `elicitation` object means form mode.
        form: elicitation.is_some_and(|e| e.is_empty() || e.contains_key("form")),
        url: elicitation.is_some_and(|e| e.contains_key("url")),
        stateless: ctx.era == Era::Stateless,
    };
    Hold {
        call_id: held.permit.call_id().to_owned(),
        server: ctx.server.name.clone(),
        digest: canonical_digest(arguments),
        tool: tool.to_owned(),
        arguments,
        principal: Arc::new(Principal {
            client: ctx.caller.client.clone(),
            token: ctx.caller.identity.clone(),
            session: session.map(|s| s.id.clone()),
            // The client's key (or the token's user), else the session, else the peer.
            key: if ctx.caller.client.is_some() || ctx.caller.identity.is_some() {
                ctx.user_key.clone()
            } else {
                ctx.session_key.clone()
            },
            client_key: ctx.client_key.clone(),
            session_key: ctx.session_key.clone(),
        }),
        rule: rule_label(&held.decision).to_owned(),
        reason: held.decision.reason.clone(),
        wait: approval.wait.unwrap_or(ctx.shared().approval_wait()),
        approval,
        progress_token: message.progress_token().cloned(),
        asking,
        state: own_state(message).map(str::to_owned),
        answer: message
            .input_responses()
            .and_then(|r| r.get(QUESTION_KEY))
            .cloned(),
    }
}

async fn settle(ctx: Context, message: Message, held: Held, ending: Ending, sink: Sink) {
    let Held {
        permit,
        mut decision,
        deny_as,
    } = held;
    let id = message.id().cloned().unwrap_or(Value::Null);
    let (kind, reason) = match ending {
        // The client went away: dropping the permit gives its slot back.
        Ending::Gone => return,
        Ending::Forward => {
            // Tollgate's own MRTR state and answers are taken out; otherwise the
            // client's own bytes go on.
            let forwarded = without_own_input(&message);
            let payload = match &forwarded {
                Some(forwarded) => Payload::One(forwarded),
                None => Payload::of(&message),
            };
            let chain = Chain::for_message(&ctx, &message, Some(permit));
            let answer = match call::forward(&ctx, payload, chain).await {
                Ok(reply) => match relay::answer(&ctx, &message, false, reply).await {
                    Ok(answer) => tasks::relayed(&ctx, &message, answer).await,
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            match answer {
                Ok(answer) => pipe(answer.body, &sink).await,
                Err(err) => send(&sink, err.to_json()).await,
            }
            return;
        }
        Ending::Pending(pending) => {
            // Not forwarded: the permit's slot is given back; the retry takes its own.
            drop(permit);
            send(&sink, to_call_again(&ctx, &decision, &id, pending)).await;
            return;
        }
        Ending::Invalid(err) => {
            drop(permit);
            let answer = error_response(
                Some(&id),
                ErrorCode::InvalidParams,
                &format!("tools/call was not forwarded: {err}"),
                Some(json!({"reason": "invalid_request_state"})),
            );
            send(&sink, answer).await;
            return;
        }
        Ending::Refuse(kind, reason) => (kind, reason),
    };
    // Refused: the permit is dropped unfinished and its slot given back.
    drop(permit);
    deny(&mut decision, kind, reason);
    send(&sink, refusal(&decision, &id, ctx.era, deny_as)).await;
}

/// The message without Tollgate's own `requestState` and `inputResponses` entry,
/// which are not the upstream's business; `None` when it carries neither.
fn without_own_input(message: &Message) -> Option<Value> {
    let own_answer = message
        .input_responses()
        .and_then(Value::as_object)
        .is_some_and(|r| {
            r.contains_key(QUESTION_KEY) || r.contains_key(crate::approvals::hold::PAGE_KEY)
        });
    let own_state = own_state(message).is_some();
    if !own_state && !own_answer {
        return None;
    }
    let mut value = message.as_value().clone();
    let params = value.get_mut("params")?.as_object_mut()?;
    if own_state {
        params.remove("requestState");
    }
    if let Some(Value::Object(responses)) = params.get_mut("inputResponses") {
        responses.remove(QUESTION_KEY);
        responses.remove(crate::approvals::hold::PAGE_KEY);
        if responses.is_empty() {
            params.remove("inputResponses");
        }
    }
    Some(value)
}

/// What a client told to call again gets: in the stateless era an
/// `InputRequiredResult`; otherwise an `approval_pending` tool result (never a
/// JSON-RPC error: the model is to read it and call again).
fn to_call_again(
    ctx: &Context,
    decision: &tollgate_policy::Decision,
    id: &Value,
    pending: Pending,
) -> Value {
    let expires_at = humantime::format_rfc3339_seconds(pending.expires_at).to_string();
    let mut meta = decision.meta_json();
    meta["kind"] = json!("approval_pending");
    meta["approval_id"] = json!(pending.approval_id);
    meta["url"] = json!(pending.url);
    meta["expires_at"] = json!(expires_at);
    if ctx.era == Era::Stateless {
        let mut result = json!({
            "resultType": "input_required",
            "_meta": {"dev.tollgate/decision": meta},
        });
        if let Some(state) = pending.state {
            result["requestState"] = json!(state);
        }
        if let Some(requests) = pending.input_requests {
            result["inputRequests"] = requests;
        }
        return result_response(id, result);
    }
    let at = match &pending.url {
        Some(url) => format!(" at {url}"),
        None => String::new(),
    };
    // What the retry must match besides tool and arguments: who may redeem it.
    let who = match (&ctx.caller.client, &ctx.caller.identity) {
        (Some(client), _) => format!("as client `{client}` (from any of its sessions)"),
        (None, Some(identity)) => {
            format!("as user `{}` (from any of their sessions)", identity.user)
        }
        (None, None) if ctx.session_key.starts_with("session:") => {
            "in this same session (an anonymous caller is known only by its session)".to_owned()
        }
        (None, None) => "from this same address".to_owned(),
    };
    let text = format!(
        "Approval pending (id {}): a person must approve this call{at}; once it is approved, call the same tool again with the same arguments {who} (the approval expires at {expires_at})",
        pending.approval_id
    );
    result_response(
        id,
        json!({
            "content": [{"type": "text", "text": text}],
            "isError": true,
            "_meta": {"dev.tollgate/decision": meta},
        }),
    )
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn message(value: Value) -> Message {
        Message::from_value(value).unwrap()
    }

    #[test]
    fn tollgates_own_input_is_not_forwarded_and_the_upstreams_is() {
        let call = |params: Value| {
            message(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}))
        };
        let plain = call(json!({"name": "t", "arguments": {"a": 1}}));
        assert!(without_own_input(&plain).is_none());
        let ours = call(json!({
            "name": "t", "arguments": {"a": 1},
            "requestState": "tollgate1.x.y",
            "inputResponses": {QUESTION_KEY: {"action": "accept"}},
        }));
        let forwarded = without_own_input(&ours).unwrap();
        assert_eq!(
            forwarded["params"],
            json!({"name": "t", "arguments": {"a": 1}})
        );
        // The upstream's own multi round-trip state and answers pass through.
        let mixed = call(json!({
            "name": "t",
            "requestState": "upstream-state",
            "inputResponses": {QUESTION_KEY: {"action": "accept"}, "github_login": {"action": "accept"}},
        }));
        let forwarded = without_own_input(&mixed).unwrap();
        assert_eq!(forwarded["params"]["requestState"], "upstream-state");
        assert_eq!(
            forwarded["params"]["inputResponses"],
            json!({"github_login": {"action": "accept"}})
        );
        assert!(own_state(&mixed).is_none());
    }
}
