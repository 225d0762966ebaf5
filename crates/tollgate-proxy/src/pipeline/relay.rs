//! Stage 6, relay: the upstream's answer on its way back. Answers stream through
//! as they arrive; only `tools/list` results are parsed, to hide the tools the
//! policy denies outright and to learn which arguments each tool mirrors into
//! `Mcp-Param-*` headers, and only an `initialize` answer is looked at, to open
//! the session it started.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use tollgate_mcp::{ErrorCode, Message, error_response};
use tollgate_policy::Policy;

use super::context::{Answer, Caller, Context};
use super::session;
use crate::error::ProxyError;
use crate::state::Server;
use crate::store::params::ToolParams;
use crate::store::sessions::Session;
use crate::upstream::{Body, Event, EventStream, Failure, Json, Reply};

/// Turns the upstream's reply to `message` into the client's answer.
pub async fn answer(
    ctx: &Context,
    message: &Message,
    initialize: bool,
    reply: Reply,
) -> Result<Answer, ProxyError> {
    let tools_list = message.method() == Some("tools/list");
    let mut body = reply.body;
    // Only these answers are looked at; every other stream goes through as it came.
    if tools_list || initialize {
        body = body.into_events();
    }
    if tools_list {
        body = filter(
            body,
            ctx.server.clone(),
            ctx.server.policy.load_full(),
            ctx.caller.clone(),
        );
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
    let (id, server) = (id.clone(), server.clone());
    match body {
        Body::Events(events) => Body::Events(ending_with(events, move |failure| {
            Event::message(broken(&id, &server, &failure))
        })),
        // The blank line first ends whatever event the break cut short.
        Body::Sse(bytes) => Body::Sse(ending_with(bytes, move |failure| {
            let error = broken(&id, &server, &failure);
            bytes::Bytes::from(format!("\n\nevent: message\ndata: {error}\n\n"))
        })),
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

/// Hides the tools the policy denies `caller` outright, in a JSON body or in every
/// event of a stream, and learns the listed tools' `x-mcp-header` annotations.
pub fn filter(body: Body, server: Arc<Server>, policy: Arc<Policy>, caller: Caller) -> Body {
    match body {
        Body::Json(json) => Body::Json(filter_json(json, &server, &policy, &caller)),
        Body::Events(events) => Body::Events(
            events
                .map(move |event| {
                    event.map(|mut event| {
                        event.data = filter_json(event.data, &server, &policy, &caller);
                        event
                    })
                })
                .boxed(),
        ),
        other => other,
    }
}

fn filter_json(json: Json, server: &Server, policy: &Policy, caller: &Caller) -> Json {
    let params = &server.params;
    match json {
        Json::Value(mut value) => {
            filter_tools(&mut value, &server.name, params, policy, caller);
            Json::Value(value)
        }
        Json::Text(text) => {
            // Only an answer that lists tools is parsed.
            if memchr_tools(&text)
                && let Ok(mut value) = serde_json::from_slice::<Value>(&text)
                && filter_tools(&mut value, &server.name, params, policy, caller)
            {
                return Json::Value(value);
            }
            Json::Text(text)
        }
    }
}

fn memchr_tools(text: &[u8]) -> bool {
    text.windows(7).any(|w| w == b"\"tools\"")
}

/// Removes hidden tools from one JSON-RPC response (or each response of a batch),
/// and tools whose `x-mcp-header` annotations are not valid (as a Streamable HTTP
/// client must); learns the annotations of the others into `params`. Returns
/// whether anything was removed.
pub fn filter_tools(
    message: &mut Value,
    server: &str,
    params: &ToolParams,
    policy: &Policy,
    caller: &Caller,
) -> bool {
    if let Value::Array(items) = message {
        return items.iter_mut().fold(false, |changed, item| {
            filter_tools(item, server, params, policy, caller) | changed
        });
    }
    let Some(tools) = message
        .pointer_mut("/result/tools")
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = tools.len();
    tools.retain(|tool| {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return true;
        };
        let claims = caller.identity.as_ref().map(|id| &id.claims);
        if policy.hides_tool(name, caller.client.as_deref(), claims) {
            return false;
        }
        let schema = tool.get("inputSchema").unwrap_or(&Value::Null);
        match tollgate_mcp::param_headers(schema) {
            Ok(declared) => {
                if !params.learn(name, declared) {
                    tracing::warn!(
                        server,
                        tool = name,
                        "too many tools with x-mcp-header annotations; this one's are not checked"
                    );
                }
                true
            }
            Err(invalid) => {
                tracing::warn!(server, tool = name, error = %invalid, "tool hidden");
                params.forget(name);
                false
            }
        }
    });
    tools.len() != before
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn tools_list_teaches_param_headers_and_hides_invalid_tools() {
        let policy = Policy::from_yaml("version: 1\ndefault: allow\n", "test").unwrap();
        let params = ToolParams::default();
        let mut answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "read", "inputSchema": {"type": "object", "properties": {
                "path": {"type": "string", "x-mcp-header": "Path"}}}},
            {"name": "plain", "inputSchema": {"type": "object"}},
            {"name": "bad", "inputSchema": {"type": "object", "properties": {
                "n": {"type": "number", "x-mcp-header": "N"}}}}
        ]}});
        let anyone = Caller::anonymous(std::net::IpAddr::from([127, 0, 0, 1]));
        assert!(filter_tools(&mut answer, "s", &params, &policy, &anyone));
        let names: Vec<_> = answer["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read", "plain"]);
        assert_eq!(params.get("read").unwrap()[0].header, "mcp-param-path");
        assert!(params.get("plain").is_none());
        assert!(params.get("bad").is_none());
    }
}
