//! A message channel to one upstream that is not Streamable HTTP: a stdio process or
//! a legacy HTTP+SSE connection. Both carry single JSON-RPC messages both ways.
//!
//! Requests go out under ids of the channel's own, so clients that share a channel
//! can never answer or cancel each other's calls; answers come back under the
//! client's original id. Messages the server sends on its own (notifications, and in
//! the handshake era requests) go to the request they belong to when that can be
//! told, else to the session's listener (the GET stream), else to the newest request
//! in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

/// Messages buffered per request or listener before the sender waits.
const SINK_CAPACITY: usize = 64;

/// How a message leaves the channel (a line on stdin, a POST).
pub type Outgoing = mpsc::Sender<Value>;

/// The channel is gone: the process exited or the connection ended.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Closed(pub Arc<str>);

/// One request in flight.
struct Pending {
    original_id: Value,
    progress_token: Option<Value>,
    sink: mpsc::Sender<Value>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    listener: Option<mpsc::Sender<Value>>,
    closed: Option<Arc<str>>,
}

/// The routing table shared by the channel and the task that reads the upstream.
#[derive(Default)]
pub struct Routes {
    table: Mutex<Table>,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means another thread panicked mid-update; the table
        // itself stays consistent (every update is a single insert or remove).
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Routes one message read from the upstream.
    pub async fn deliver(&self, mut message: Value) {
        if let Value::Array(items) = message {
            for item in items {
                Box::pin(self.deliver(item)).await;
            }
            return;
        }
        let is_response = message.get("method").is_none()
            && (message.get("result").is_some() || message.get("error").is_some());
        let sink = if is_response {
            let own = message.get("id").and_then(Value::as_u64);
            let pending = own.and_then(|id| self.lock().pending.remove(&id));
            match pending {
                Some(pending) => {
                    if let Some(slot) = message.get_mut("id") {
                        *slot = pending.original_id;
                    }
                    Some(pending.sink)
                }
                None => {
                    tracing::debug!(id = ?message.get("id"), "answer to no request in flight; dropped");
                    None
                }
            }
        } else {
            self.owner_of(&message)
        };
        match sink {
            Some(sink) => {
                let _ = sink.send(message).await;
            }
            None if !is_response => {
                tracing::debug!(method = ?message.get("method"), "server message with nobody listening; dropped");
            }
            None => {}
        }
    }

    /// Where a server-sent notification or request goes.
    fn owner_of(&self, message: &Value) -> Option<mpsc::Sender<Value>> {
        let table = self.lock();
        let token = message.pointer("/params/progressToken");
        if let Some(token) = token
            && let Some(pending) = table
                .pending
                .values()
                .find(|p| p.progress_token.as_ref() == Some(token))
        {
            return Some(pending.sink.clone());
        }
        if let Some(listener) = table.listener.as_ref().filter(|l| !l.is_closed()) {
            return Some(listener.clone());
        }
        table
            .pending
            .iter()
            .max_by_key(|(id, _)| **id)
            .map(|(_, p)| p.sink.clone())
    }

    /// Answers one request in flight with an error (its message could not be sent).
    pub async fn fail(&self, own_id: u64, code: i64, why: &str) {
        let pending = self.lock().pending.remove(&own_id);
        if let Some(pending) = pending {
            let error = serde_json::json!({
                "jsonrpc": "2.0",
                "id": pending.original_id,
                "error": { "code": code, "message": why },
            });
            let _ = pending.sink.send(error).await;
        }
    }

    /// Ends the channel: every request in flight and the listener see it close.
    pub fn close(&self, why: &str) {
        let mut table = self.lock();
        if table.closed.is_none() {
            table.closed = Some(why.into());
        }
        table.pending.clear();
        table.listener = None;
    }

    /// Why the channel closed, if it did.
    pub fn closed(&self) -> Option<Closed> {
        self.lock().closed.clone().map(Closed)
    }
}

/// Aborts a background task when dropped.
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An open channel. Dropping it ends the connection (and the process, for stdio).
pub struct Channel {
    outgoing: Outgoing,
    routes: Arc<Routes>,
    _tasks: Vec<TaskGuard>,
    _owned: Option<Box<dyn Send + Sync>>,
}

/// A request sent on a channel: its related messages, then its answer.
pub struct Exchange {
    /// Messages for this request; the last one is its answer. Ends early if the
    /// channel closes.
    pub messages: mpsc::Receiver<Value>,
    /// The client's id for the request, to recognise its answer.
    pub original_id: Value,
    own_id: u64,
    routes: Arc<Routes>,
}

impl Exchange {
    /// Why no more messages come: the channel's reason for closing.
    pub fn closed(&self) -> Closed {
        self.routes
            .closed()
            .unwrap_or_else(|| Closed("the connection to the upstream ended".into()))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // The caller gave up (timeout, client gone): forget the request.
        self.routes.lock().pending.remove(&self.own_id);
    }
}

impl Channel {
    /// A channel over `outgoing`, with `routes` fed by the reading task. `tasks` and
    /// `owned` (a process guard) live as long as the channel.
    pub fn new(
        outgoing: Outgoing,
        routes: Arc<Routes>,
        tasks: Vec<TaskGuard>,
        owned: Option<Box<dyn Send + Sync>>,
    ) -> Channel {
        Channel {
            outgoing,
            routes,
            _tasks: tasks,
            _owned: owned,
        }
    }

    /// Why the channel closed, if it did.
    pub fn closed(&self) -> Option<Closed> {
        self.routes.closed()
    }

    /// Whether a request is waiting for its answer.
    pub fn busy(&self) -> bool {
        !self.routes.lock().pending.is_empty()
    }

    /// Sends a request (a message with `method` and `id`) and returns its exchange.
    pub async fn request(&self, mut message: Value) -> Result<Exchange, Closed> {
        let original_id = message.get("id").cloned().unwrap_or(Value::Null);
        let progress_token = message.pointer("/params/_meta/progressToken").cloned();
        let (sink, messages) = mpsc::channel(SINK_CAPACITY);
        let own_id = {
            let mut table = self.routes.lock();
            if let Some(why) = &table.closed {
                return Err(Closed(why.clone()));
            }
            table.next_id += 1;
            let own_id = table.next_id;
            table.pending.insert(
                own_id,
                Pending {
                    original_id: original_id.clone(),
                    progress_token,
                    sink,
                },
            );
            own_id
        };
        let exchange = Exchange {
            messages,
            original_id,
            own_id,
            routes: self.routes.clone(),
        };
        if let Some(slot) = message.get_mut("id") {
            *slot = Value::from(own_id);
        }
        self.outgoing
            .send(message)
            .await
            .map_err(|_| self.closed_now())?;
        Ok(exchange)
    }

    /// Sends a notification or a response to a server's request.
    pub async fn send(&self, mut message: Value) -> Result<(), Closed> {
        if let Some(why) = self.routes.closed() {
            return Err(why);
        }
        // A cancellation names the request by the client's id; the server knows ours.
        if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled")
            && let Some(request_id) = message.pointer_mut("/params/requestId")
        {
            let table = self.routes.lock();
            let own = table
                .pending
                .iter()
                .filter(|(_, p)| p.original_id == *request_id)
                .max_by_key(|(id, _)| **id)
                .map(|(id, _)| *id);
            match own {
                Some(own) => *request_id = Value::from(own),
                // Nothing of that id is in flight: the notification would only
                // confuse the server about some other request.
                None => return Ok(()),
            }
        }
        self.outgoing
            .send(message)
            .await
            .map_err(|_| self.closed_now())
    }

    /// Messages the server sends on its own, from now until the channel closes or
    /// another listener replaces this one.
    pub fn listen(&self) -> mpsc::Receiver<Value> {
        let (sink, messages) = mpsc::channel(SINK_CAPACITY);
        let mut table = self.routes.lock();
        if table.closed.is_none() {
            table.listener = Some(sink);
        }
        messages
    }

    fn closed_now(&self) -> Closed {
        self.routes
            .closed()
            .unwrap_or_else(|| Closed("the connection to the upstream ended".into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn channel() -> (Channel, mpsc::Receiver<Value>, Arc<Routes>) {
        let (tx, rx) = mpsc::channel(16);
        let routes = Arc::new(Routes::default());
        (
            Channel::new(tx, routes.clone(), Vec::new(), None),
            rx,
            routes,
        )
    }

    #[tokio::test]
    async fn answers_come_back_under_the_clients_id() {
        let (channel, mut wire, routes) = channel();
        let mut a = channel
            .request(json!({"jsonrpc": "2.0", "id": "x", "method": "tools/list"}))
            .await
            .unwrap();
        let mut b = channel
            .request(json!({"jsonrpc": "2.0", "id": "x", "method": "tools/list"}))
            .await
            .unwrap();
        let sent_a = wire.recv().await.unwrap();
        let sent_b = wire.recv().await.unwrap();
        assert_ne!(
            sent_a["id"], sent_b["id"],
            "two clients' equal ids are kept apart"
        );
        routes
            .deliver(json!({"jsonrpc": "2.0", "id": sent_b["id"], "result": {"n": 2}}))
            .await;
        routes
            .deliver(json!({"jsonrpc": "2.0", "id": sent_a["id"], "result": {"n": 1}}))
            .await;
        assert_eq!(
            a.messages.recv().await.unwrap(),
            json!({"jsonrpc": "2.0", "id": "x", "result": {"n": 1}})
        );
        assert_eq!(b.messages.recv().await.unwrap()["result"]["n"], 2);
    }

    #[tokio::test]
    async fn server_messages_go_to_their_request_or_the_listener() {
        let (channel, mut wire, routes) = channel();
        let mut call = channel
            .request(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                            "params": {"name": "t", "_meta": {"progressToken": "p"}}}))
            .await
            .unwrap();
        let _ = wire.recv().await.unwrap();
        let mut listener = channel.listen();
        routes
            .deliver(json!({"jsonrpc": "2.0", "method": "notifications/progress",
                            "params": {"progressToken": "p", "progress": 1}}))
            .await;
        routes
            .deliver(json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
            .await;
        assert_eq!(
            call.messages.recv().await.unwrap()["method"],
            "notifications/progress"
        );
        assert_eq!(
            listener.recv().await.unwrap()["method"],
            "notifications/tools/list_changed"
        );
    }

    #[tokio::test]
    async fn cancellations_are_translated_and_closing_ends_requests() {
        let (channel, mut wire, routes) = channel();
        let mut call = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "t"}}),
            )
            .await
            .unwrap();
        let own = wire.recv().await.unwrap()["id"].clone();
        channel
            .send(
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                         "params": {"requestId": 7}}),
            )
            .await
            .unwrap();
        assert_eq!(wire.recv().await.unwrap()["params"]["requestId"], own);
        // A cancellation of nothing in flight is not sent at all.
        channel
            .send(
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                         "params": {"requestId": 99}}),
            )
            .await
            .unwrap();
        assert!(wire.try_recv().is_err());
        routes.close("process exited");
        assert!(call.messages.recv().await.is_none());
        let err = channel
            .request(json!({"jsonrpc": "2.0", "id": 8, "method": "ping"}))
            .await
            .err()
            .unwrap();
        assert_eq!(&*err.0, "process exited");
    }

    #[tokio::test]
    async fn a_request_given_up_is_forgotten() {
        let (channel, mut wire, routes) = channel();
        let call = channel
            .request(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .await
            .unwrap();
        let own = wire.recv().await.unwrap()["id"].clone();
        drop(call);
        assert!(routes.lock().pending.is_empty());
        // Its late answer is dropped without harm.
        routes
            .deliver(json!({"jsonrpc": "2.0", "id": own, "result": {}}))
            .await;
    }
}
