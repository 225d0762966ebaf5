//! Stage 6, relay: the upstream's answer, past the response stages
//! ([`super::respond`]), on its way back to the client. Answers stream through as
//! they arrive; a stream that breaks before the request's answer ends with an error
//! for it, and an `initialize` answer is looked at, to open the session it started.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use tollgate_mcp::{ErrorCode, Message, error_response};

use super::context::{Answer, Context};
use super::session;
use crate::error::ProxyError;
use crate::store::sessions::Session;
use crate::upstream::{Body, Event, EventStream, Failure, Reply};

/// Turns the upstream's reply to `message` into the client's answer.
pub async fn answer(
    ctx: &Context,
    message: &Message,
    initialize: bool,
    reply: Reply,
) -> Result<Answer, ProxyError> {
    let mut body = reply.body;
    // Only this answer is looked at here; every other stream goes through as it came.
    if initialize {
        body = body.into_events();
    }
    if let Some(id) = message.id() {
        body = until_answered(body, id, &ctx.server.name);
    }
    let mut answer = Answer {
        status: reply.status,
        body,
        session: None,
        retry_after: reply.retry_after,
    };
    if initialize && reply.status.is_success() {
        let opened = match &answer.body {
            Body::Json(json) => {
                let value = json.clone().into_value().ok();
                session::open(ctx, message.as_value(), reply.session, value.as_ref()).await?
            }
            _ => session::open(ctx, message.as_value(), reply.session, None).await?,
        };
        if let Body::Events(_) = &answer.body
            && let Body::Events(events) = std::mem::replace(&mut answer.body, Body::Empty)
        {
            answer.body = Body::Events(note_version(events, opened.clone()));
        }
        answer.session = Some(opened.id.clone());
    }
    Ok(answer)
}

/// A streamed answer that ends with an error message for `id` when the
/// upstream's stream breaks before the answer; other bodies as they are.
fn until_answered(body: Body, id: &Value, server: &Arc<str>) -> Body {
    // The id and server are kept only for a stream (a JSON answer is whole).
    match body {
        Body::Events(events) => {
            let (id, server) = (id.clone(), server.clone());
            Body::Events(ending_with(events, move |failure| {
                Event::message(broken(&id, &server, &failure))
            }))
        }
        Body::Sse(bytes) => {
            let (id, server) = (id.clone(), server.clone());
            Body::Sse(ending_with(bytes, move |failure| {
                let error = broken(&id, &server, &failure).to_string();
                // The stages pass on whole events only, so nothing is cut short.
                tollgate_mcp::encode("message", None, None, error.as_bytes())
            }))
        }
        other => other,
    }
}

/// `stream`, whose first failure becomes a last item made by `last`.
fn ending_with<T: Send + 'static>(
    stream: futures::stream::BoxStream<'static, Result<T, Failure>>,
    last: impl Fn(Failure) -> T + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<T, Failure>> {
    stream
        .scan(false, move |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let item = item.or_else(|failure| {
                *ended = true;
                Ok(last(failure))
            });
            futures::future::ready(Some(item))
        })
        .boxed()
}

/// The error a broken stream ends with, logged.
fn broken(id: &Value, server: &str, failure: &Failure) -> Value {
    let message = format!("upstream `{server}`: {failure}");
    tracing::warn!(error = %message, "upstream stream failed");
    error_response(Some(id), ErrorCode::InternalError, &message, None)
}

/// Records the protocol version from an `initialize` answer that arrives as an event.
fn note_version(events: EventStream, session: Arc<Session>) -> EventStream {
    events
        .map(move |event| {
            if let Ok(Event { data, .. }) = &event
                && let Ok(value) = data.clone().into_value()
                && let Some(version) = value
                    .pointer("/result/protocolVersion")
                    .and_then(Value::as_str)
            {
                session.set_protocol_version(version);
            }
            event
        })
        .boxed()
}
