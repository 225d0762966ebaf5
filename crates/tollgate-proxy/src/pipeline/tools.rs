//! The tool lock at run time (SPEC §10), for a server with `tools_lock:`: every
//! `tools/list` answer relayed teaches Tollgate the tools' current definitions and
//! loses the tools that differ from the lock ([`Screen`]); a call to a tool whose
//! current definition Tollgate has not seen makes it list the tools itself first,
//! and a call to a changed or unknown tool is refused ([`check`]). Each change is
//! recorded once (audit record `tool_changed`, metric, one WARN line).

use std::sync::Arc;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tollgate_mcp::Message;
use tollgate_policy::{Action, Decision, DenyKind};

use super::context::Context;
use crate::audit::{Audit, Record};
use crate::lock::{Change, Status, ToolWatch};
use crate::metrics::Metrics;
use crate::state::{Server, Shared};
use crate::upstream::{Body, Json, Payload, Request};

/// Most pages Tollgate reads when it lists a server's tools itself.
const MAX_PAGES: usize = 100;

/// The key of what one upstream session listed: its id, or `""` outside one.
fn session_key(ctx: &Context) -> String {
    ctx.session
        .as_ref()
        .and_then(|s| s.upstream_id())
        .unwrap_or_default()
}

/// What a relayed `tools/list` answer passes through on a server with a lock.
#[derive(Clone)]
pub struct Screen {
    shared: Arc<Shared>,
    server: Arc<Server>,
    key: Arc<str>,
}

impl Screen {
    /// The screen for `ctx`'s server, if it has a lock.
    pub fn of(ctx: &Context) -> Option<Screen> {
        ctx.server.tools.as_ref()?;
        Some(Screen {
            shared: ctx.shared().clone(),
            server: ctx.server.clone(),
            key: session_key(ctx).into(),
        })
    }

    /// Learns the tools of a parsed `tools/list` answer (or of each answer of a batch)
    /// and removes those that differ from the lock (unless `on_tool_change: warn`).
    /// Returns whether anything was removed. The `tools/list` response stage
    /// (`respond::tools`) parses the answer and calls this first.
    pub fn screen(&self, message: &mut Value) -> bool {
        let Some(watch) = &self.server.tools else {
            return false;
        };
        if let Value::Array(items) = message {
            return items
                .iter_mut()
                .fold(false, |changed, item| self.screen(item) | changed);
        }
        let Some(tools) = message
            .pointer_mut("/result/tools")
            .and_then(Value::as_array_mut)
        else {
            return false;
        };
        let (keep, changes) = watch.learn(&self.key, tools, false);
        record(
            self.shared.audit(),
            self.shared.metrics(),
            &self.server,
            watch,
            &changes,
        );
        let before = tools.len();
        let mut keep = keep.into_iter();
        tools.retain(|_| keep.next().unwrap_or(true));
        tools.len() != before
    }
}

/// Records changes seen for the first time: the audit record, the metric, a WARN line.
fn record(
    audit: &Audit,
    metrics: &Metrics,
    server: &Server,
    watch: &ToolWatch,
    changes: &[Change],
) {
    let mode = if watch.warns() { "warn" } else { "refuse" };
    for change in changes {
        audit.write_soon(&Record::ToolChanged {
            server: &server.name,
            tool: &change.tool,
            locked: change.locked.as_deref(),
            seen: &change.seen,
            on_tool_change: mode,
        });
        metrics.tool_change(&server.name);
        tracing::warn!(
            server = %server.name,
            tool = %change.tool,
            locked = change.locked.as_deref().unwrap_or("none"),
            seen = %change.seen,
            on_tool_change = mode,
            lock = %watch.path.display(),
            "tool definition differs from the tool lock; review it with `tollgate lock --check`"
        );
    }
}

/// Before a call to `tool` on a server with a lock: the refusal, when its current
/// definition differs from the lock or the lock does not name it (and
/// `on_tool_change` is `refuse`); `None` to go on. Lists the upstream's tools first
/// when their current definitions are not known.
pub async fn check(ctx: &Context, call: &Message, tool: &str) -> Option<Decision> {
    let watch = ctx.server.tools.as_ref()?;
    let key = session_key(ctx);
    let status = match watch.status(&key, tool) {
        // The call path: one lookup.
        Some(Status::Unchanged) => return None,
        Some(status) => status,
        None => {
            // One listing at a time per server: those who waited find it learned.
            let _listing = watch.listing.lock().await;
            match watch.status(&key, tool) {
                Some(status) => status,
                None => {
                    if let Err(error) = list(ctx, call, watch, &key).await {
                        tracing::warn!(server = %ctx.server.name, tool, %error, "could not list the upstream's tools to check the call against the tool lock");
                        return (!watch.warns()).then(|| refused(tool, format!(
                            "tools/call `{tool}` was not forwarded: its definition could not be checked against the tool lock because listing the upstream's tools failed ({error}); retry later"
                        )));
                    }
                    // A complete listing: every tool is known now.
                    watch.status(&key, tool).unwrap_or(Status::Unknown {
                        seen: "none".into(),
                    })
                }
            }
        }
    };
    let reason = match &status {
        Status::Unchanged => return None,
        Status::Changed { locked, seen } => format!(
            "the definition of tool `{tool}` changed since it was locked (locked {locked}, upstream now {seen}); the policy was not written for it: review it with `tollgate lock --check`"
        ),
        Status::Unknown { seen } => format!(
            "tool `{tool}` is not in the tool lock (upstream definition {seen}); review it with `tollgate lock --check`"
        ),
    };
    if let Some(change) = watch.change(tool, status) {
        record(
            ctx.shared().audit(),
            ctx.shared().metrics(),
            &ctx.server,
            watch,
            &[change],
        );
    }
    (!watch.warns()).then(|| refused(tool, reason))
}

fn refused(tool: &str, reason: String) -> Decision {
    Decision {
        action: Action::Deny,
        kind: Some(DenyKind::ToolChanged),
        tool: tool.to_owned(),
        rule: None,
        reason,
        failing_path: None,
        retry_after: None,
        approval: None,
        slot: None,
        required_scopes: Vec::new(),
    }
}

/// Lists every page of the upstream's tools in the context's upstream session and
/// learns them, within the server's timeout. The listing is sent as the `call` was:
/// with its stateless-era `_meta` (protocol version, client info and capabilities)
/// and its headers, but for those that name the call (`Mcp-Method`, `Mcp-Name`,
/// `Mcp-Param-*`).
async fn list(ctx: &Context, call: &Message, watch: &ToolWatch, key: &str) -> Result<(), String> {
    let timeout = ctx.server.timeout;
    // Only a listing reads the whole call (for its `_meta`).
    let listed = tokio::time::timeout(timeout, all_pages(ctx, call.as_value()))
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs()))??;
    let (_, changes) = watch.learn(key, &listed, true);
    record(
        ctx.shared().audit(),
        ctx.shared().metrics(),
        &ctx.server,
        watch,
        &changes,
    );
    Ok(())
}

/// The listing's `_meta`: the call's stateless-era keys (protocol version, client
/// info and capabilities).
fn listing_meta(call: &Value) -> serde_json::Map<String, Value> {
    call.pointer("/params/_meta")
        .and_then(Value::as_object)
        .map(|meta| {
            meta.iter()
                .filter(|(key, _)| key.starts_with("io.modelcontextprotocol/"))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The listing's headers: the call's, but for those that name the call
/// (`Mcp-Method` says `tools/list` instead).
fn listing_headers(
    forwarded: &[(axum::http::HeaderName, axum::http::HeaderValue)],
) -> Vec<(axum::http::HeaderName, axum::http::HeaderValue)> {
    let mut headers: Vec<_> = forwarded
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name != "mcp-method" && name != "mcp-name" && !name.starts_with("mcp-param-")
        })
        .cloned()
        .collect();
    if forwarded.iter().any(|(name, _)| name == "mcp-method") {
        headers.push((
            axum::http::HeaderName::from_static("mcp-method"),
            axum::http::HeaderValue::from_static("tools/list"),
        ));
    }
    headers
}

/// The JSON-RPC answer in a listing's reply: the body, or the stream's first answer.
async fn answer_of(body: Body) -> Result<Value, String> {
    match body.into_events() {
        Body::Json(json) => json.into_value().map_err(|e| e.to_string()),
        Body::Events(mut events) => loop {
            match events.next().await {
                Some(Ok(event)) => {
                    let message = event.data.into_value().map_err(|e| e.to_string())?;
                    if message.get("method").is_none() && message.get("id").is_some() {
                        return Ok(message);
                    }
                }
                Some(Err(failure)) => return Err(failure.to_string()),
                None => return Err("the stream ended without an answer".into()),
            }
        },
        _ => Err("the answer is not JSON-RPC".into()),
    }
}

async fn all_pages(ctx: &Context, call: &Value) -> Result<Vec<Value>, String> {
    let upstream_session = ctx.session.as_ref().and_then(|s| s.upstream_id());
    let version = ctx.session.as_ref().and_then(|s| s.protocol_version());
    let meta = listing_meta(call);
    let headers = listing_headers(&ctx.forwarded);
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..MAX_PAGES {
        let mut params = json!({});
        if !meta.is_empty() {
            params["_meta"] = Value::Object(meta.clone());
        }
        if let Some(cursor) = &cursor {
            params["cursor"] = json!(cursor);
        }
        let body = json!({"jsonrpc": "2.0", "id": format!("tollgate-tools-{page}"), "method": "tools/list", "params": params});
        let request = Request {
            payload: Payload::One(&body),
            session: upstream_session.as_deref(),
            protocol_version: version.as_deref(),
            headers: &headers,
            owner: &ctx.owner,
            lane: ctx.lane,
        };
        let reply = ctx
            .server
            .upstream
            .send(request)
            .await
            .map_err(|f| f.to_string())?;
        if !reply.status.is_success() {
            return Err(format!("the upstream answered HTTP {}", reply.status));
        }
        let answer = answer_of(reply.body).await?;
        if let Some(error) = answer.get("error") {
            return Err(format!("tools/list failed: {error}"));
        }
        if let Some(page) = answer.pointer("/result/tools").and_then(Value::as_array) {
            tools.extend(page.iter().cloned());
        }
        cursor = answer
            .pointer("/result/nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            return Ok(tools);
        }
    }
    Err(format!("more than {MAX_PAGES} pages of tools"))
}

/// The upstream's notification that its tools changed, as it appears in a message.
const LIST_CHANGED: &[u8] = b"notifications/tools/list_changed";

/// A server-to-client stream (a handshake-era session's GET stream, a stateless-era
/// `subscriptions/listen` answer) that makes
/// Tollgate forget what the session's upstream listed when the upstream says its
/// tools changed, so that the next call lists them again. Read as bytes: a false
/// alarm only costs a listing.
pub fn on_list_changed(ctx: &Context, body: Body) -> Body {
    let Some(server) = ctx.server.tools.is_some().then(|| ctx.server.clone()) else {
        return body;
    };
    let key = session_key(ctx);
    let forget = move || {
        if let Some(watch) = &server.tools {
            tracing::info!(server = %server.name, "the upstream said its tools changed (notifications/tools/list_changed); they are listed again before the next call");
            watch.forget(&key);
        }
    };
    match body {
        Body::Events(events) => Body::Events(
            events
                .map(move |event| {
                    if let Ok(event) = &event
                        && match &event.data {
                            Json::Text(text) => memchr::memmem::find(text, LIST_CHANGED).is_some(),
                            Json::Value(value) => {
                                value.get("method").and_then(Value::as_str)
                                    == std::str::from_utf8(LIST_CHANGED).ok()
                            }
                        }
                    {
                        forget();
                    }
                    event
                })
                .boxed(),
        ),
        Body::Sse(bytes) => {
            // The end of the previous chunk, for a name cut in two.
            let mut tail: Vec<u8> = Vec::new();
            Body::Sse(
                bytes
                    .map(move |chunk| {
                        if let Ok(chunk) = &chunk {
                            let reach = LIST_CHANGED.len() - 1;
                            tail.extend_from_slice(&chunk[..chunk.len().min(reach)]);
                            if memchr::memmem::find(chunk, LIST_CHANGED).is_some()
                                || memchr::memmem::find(&tail, LIST_CHANGED).is_some()
                            {
                                forget();
                            }
                            if chunk.len() >= reach {
                                tail.clear();
                                tail.extend_from_slice(&chunk[chunk.len() - reach..]);
                            } else {
                                let cut = tail.len().saturating_sub(reach);
                                tail.drain(..cut);
                            }
                        }
                        chunk
                    })
                    .boxed(),
            )
        }
        other => other,
    }
}
