//! MCP tasks bound to their caller. Behind Tollgate every caller reaches the upstream
//! as Tollgate, so the upstream cannot tell whose task is whose; Tollgate records the
//! owner of each task it relays (`store::tasks`) and:
//!
//! * answers `tasks/get`, `tasks/result`, `tasks/cancel` and `tasks/update` for a task
//!   the caller does not own (or that Tollgate never relayed) as the upstream answers
//!   an unknown task, without forwarding them ([`check`]);
//! * records the task a `tools/call` created from its answer, before the client sees
//!   it, and filters a `tasks/list` answer to the caller's tasks ([`relayed`]);
//! * lets `notifications/tasks/status` reach only the task's owner, on every stream
//!   ([`streamed`]).

use std::sync::Arc;

use serde_json::Value;
use tollgate_mcp::{ErrorCode, Message, error_response};

use super::context::{Answer, Context};
use crate::error::ProxyError;
use crate::state::Shared;
use crate::store::tasks::{TaskOwner, TaskRecord, Tasks};
use crate::upstream::{Body, Event, Json};

/// An answer that creates or lists tasks names a `taskId`.
static TASK_ID: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"taskId"));

/// Requests naming one task by `params.taskId`.
const BY_ID: [&str; 4] = ["tasks/get", "tasks/result", "tasks/cancel", "tasks/update"];

/// What an upstream answers for a task it does not know (the spec's example).
pub const UNKNOWN_TASK: &str = "Failed to retrieve task: Task not found";

/// The owner a request's tasks are recorded under: its caller's client and user
/// keys, and its handshake-era session.
pub fn owner(ctx: &Context) -> TaskOwner {
    TaskOwner {
        client: ctx.client_key.to_string(),
        user: ctx.user_key.to_string(),
        session: ctx.session.as_ref().map(|s| s.id.to_string()),
    }
}

/// The record of the task `message` names, when the caller owns it. `None` for any
/// other request, or when the caller does not own it.
pub async fn owned(ctx: &Context, message: &Message) -> Result<Option<TaskRecord>, ProxyError> {
    let Some(id) = message
        .params()
        .and_then(|p| p.get("taskId"))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    let record = ctx.shared().tasks.owner_of(&ctx.server.name, id).await?;
    Ok(record.filter(|r| r.owned_by(&owner(ctx))))
}

/// A request for a task the caller does not own, answered here: `Some(answer)`
/// (an unknown task's error; nothing for a notification); `None` to go on.
pub async fn check(ctx: &Context, message: &Message) -> Result<Option<Answer>, ProxyError> {
    if !message.method().is_some_and(|m| BY_ID.contains(&m)) {
        return Ok(None);
    }
    if owned(ctx, message).await?.is_some() {
        return Ok(None);
    }
    Ok(Some(match message.id() {
        Some(id) => Answer::message(unknown(id)),
        None => Answer::accepted(),
    }))
}

fn unknown(id: &Value) -> Value {
    error_response(Some(id), ErrorCode::InvalidParams, UNKNOWN_TASK, None)
}

/// A batch member that cannot be bound to its caller, answered here: tasks began
/// with 2025-11-25, batches ended with 2025-03-26.
pub fn in_batch(message: &Message) -> Option<Value> {
    let method = message.method()?;
    let task_call =
        method == "tools/call" && message.params().is_some_and(|p| p.contains_key("task"));
    if !(task_call || method.starts_with("tasks/")) {
        return None;
    }
    Some(error_response(
        message.id(),
        ErrorCode::InvalidRequest,
        "tasks cannot be used in a JSON-RPC batch (batches end with protocol 2025-03-26, tasks begin with 2025-11-25); send the request on its own",
        None,
    ))
}

/// What the answer to one request is watched for.
#[derive(Clone)]
struct Watch {
    shared: Arc<Shared>,
    server: Arc<str>,
    owner: TaskOwner,
    /// The tool of a `tools/call`, whose answer may create a task.
    tool: Option<String>,
    /// Whether the answer lists tasks, to be filtered.
    list: bool,
}

/// The upstream's answer to `message` on its way back: a created task recorded
/// before the client sees it, a `tasks/list` filtered, status notifications of
/// other callers' tasks dropped.
pub async fn relayed(
    ctx: &Context,
    message: &Message,
    mut answer: Answer,
) -> Result<Answer, ProxyError> {
    let list = message.method() == Some("tasks/list");
    // A JSON answer that names no task has nothing to record: the common call's.
    if let Body::Json(Json::Text(text)) = &answer.body
        && !list
        && TASK_ID.find(text).is_none()
    {
        return Ok(answer);
    }
    let watch = Watch {
        shared: ctx.shared().clone(),
        server: ctx.server.name.clone(),
        owner: owner(ctx),
        tool: message.tool_call().map(|call| call.name.to_owned()),
        list,
    };
    answer.body = match answer.body {
        Body::Json(json) if watch.tool.is_some() || watch.list => {
            Body::Json(watch.message(json).await?)
        }
        body => watch.stream(body),
    };
    Ok(answer)
}

/// A server-to-client stream (a session's GET stream): status notifications of
/// other callers' tasks dropped.
pub fn streamed(ctx: &Context, mut answer: Answer) -> Answer {
    let watch = Watch {
        shared: ctx.shared().clone(),
        server: ctx.server.name.clone(),
        owner: owner(ctx),
        tool: None,
        list: false,
    };
    answer.body = watch.stream(answer.body);
    answer
}

impl Watch {
    fn tasks(&self) -> &Tasks {
        &self.shared.tasks
    }

    /// Every message of a streamed body through [`Watch::message`]; one that must not
    /// reach this caller is dropped.
    fn stream(self, body: Body) -> Body {
        use futures::StreamExt as _;
        let events = match body.into_events() {
            Body::Events(events) => events,
            other => return other,
        };
        Body::Events(
            events
                .filter_map(move |event| {
                    let watch = self.clone();
                    async move {
                        let Ok(mut event) = event else {
                            return Some(event);
                        };
                        if !watch.reaches_owner(&event).await {
                            return None;
                        }
                        match watch.message(event.data).await {
                            Ok(data) => {
                                event.data = data;
                                Some(Ok(event))
                            }
                            Err(err) => Some(Ok(Event::message(err.to_json()))),
                        }
                    }
                })
                .boxed(),
        )
    }

    /// Whether an event may reach this caller: anything but a status notification
    /// of a task it does not own.
    async fn reaches_owner(&self, event: &Event) -> bool {
        let text = match &event.data {
            Json::Text(text) => {
                if memchr::memmem::find(text, b"notifications/tasks/status").is_none() {
                    return true;
                }
                match serde_json::from_slice::<Value>(text) {
                    Ok(value) => value,
                    Err(_) => return true,
                }
            }
            Json::Value(value) => value.clone(),
        };
        if text.get("method").and_then(Value::as_str) != Some("notifications/tasks/status") {
            return true;
        }
        let Some(id) = text.pointer("/params/taskId").and_then(Value::as_str) else {
            return false;
        };
        match self.tasks().owner_of(&self.server, id).await {
            Ok(Some(record)) => record.owned_by(&self.owner),
            Ok(None) => false,
            Err(err) => {
                tracing::warn!(error = %err, "a task status notification was dropped: its owner cannot be looked up");
                false
            }
        }
    }

    /// One answer: a created task recorded, a task list filtered.
    async fn message(&self, json: Json) -> Result<Json, ProxyError> {
        if let Some(tool) = &self.tool {
            if let Json::Text(text) = &json
                && TASK_ID.find(text).is_none()
            {
                return Ok(json);
            }
            let Ok(value) = json.clone().into_value() else {
                return Ok(json);
            };
            if let Some((id, ttl)) = created(&value) {
                let record = TaskRecord {
                    owner: self.owner.clone(),
                    tool: tool.clone(),
                };
                self.tasks()
                    .record(&self.server, id, record, Tasks::ttl(ttl))
                    .await?;
            }
            return Ok(json);
        }
        if self.list {
            let Ok(mut value) = json.clone().into_value() else {
                return Ok(json);
            };
            let Some(listed) = value
                .pointer_mut("/result/tasks")
                .and_then(Value::as_array_mut)
            else {
                return Ok(json);
            };
            let ids: Vec<&str> = listed
                .iter()
                .map(|task| task.get("taskId").and_then(Value::as_str).unwrap_or(""))
                .collect();
            let owners = self.tasks().owners_of(&self.server, &ids).await?;
            let mut owners = owners.into_iter();
            listed.retain(|_| {
                owners
                    .next()
                    .flatten()
                    .is_some_and(|record| record.owned_by(&self.owner))
            });
            return Ok(Json::Value(value));
        }
        Ok(json)
    }
}

/// The task a `tools/call` answer created: its id and `ttl` (ms; `None`: unlimited
/// or unsaid). A `CreateTaskResult` (`result.task`), or a task handle (`result`
/// itself a task, as the 2026-07-28 extension may answer).
fn created(answer: &Value) -> Option<(&str, Option<u64>)> {
    let result = answer.get("result")?;
    let task = match result.get("task") {
        Some(task) if task.is_object() => task,
        _ => result,
    };
    let id = task.get("taskId")?.as_str()?;
    Some((id, task.get("ttl").and_then(Value::as_u64)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_created_task_is_read_from_either_shape() {
        let create = json!({"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T", "status": "working", "ttl": 60000}}});
        assert_eq!(created(&create), Some(("T", Some(60000))));
        let handle = json!({"jsonrpc": "2.0", "id": 1, "result": {"taskId": "H", "status": "working", "ttl": null}});
        assert_eq!(created(&handle), Some(("H", None)));
        let plain = json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "taskId"}]}});
        assert_eq!(created(&plain), None);
    }

    #[test]
    fn tasks_are_refused_in_a_batch() {
        let member = |v: Value| Message::from_value(v).unwrap();
        let get = member(
            json!({"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"taskId": "T"}}),
        );
        assert_eq!(in_batch(&get).unwrap()["id"], 3);
        let task_call = member(
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "x", "task": {}}}),
        );
        assert!(in_batch(&task_call).is_some());
        let call = member(
            json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "x"}}),
        );
        assert!(in_batch(&call).is_none());
    }
}
