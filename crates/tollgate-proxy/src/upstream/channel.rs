//! A message channel to one upstream that is not Streamable HTTP: a stdio process or
//! a legacy HTTP+SSE connection. Both carry single JSON-RPC messages both ways.
//!
//! Every request in flight records its owner (client and session). Requests go out
//! under ids of the channel's own and progress tokens of the channel's own, so
//! clients that share a channel can never answer, cancel or see the progress of
//! each other's calls; answers and progress come back under the client's own id
//! and token. Messages the server sends on its own (notifications, and in the
//! handshake era requests) go to the request they belong to when that can be told,
//! else to the session's listener (the GET stream), else to the newest request in
//! flight when every request in flight has the same owner; otherwise they are
//! dropped, never sent to another client.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Owner;

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
    /// The client's progress token, when it asked for progress (ours is derived from the id).
    progress_token: Option<Value>,
    owner: Owner,
    sink: mpsc::Sender<Value>,
}

/// The progress token the upstream sees for our request `own_id`.
fn own_token(own_id: u64) -> Value {
    Value::from(format!("tollgate-progress-{own_id}"))
}

fn own_id_of_token(token: &Value) -> Option<u64> {
    token
        .as_str()?
        .strip_prefix("tollgate-progress-")?
        .parse()
        .ok()
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
    fn lock(&self) -> parking_lot::MutexGuard<'_, Table> {
        self.table.lock()
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
            self.owner_of(&mut message)
        };
        match sink {
            // Never waited on: one client that does not read its stream must not
            // stop the reader, and with it every other request on the channel.
            Some(sink) => match sink.try_send(message) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                // An answer is never dropped: it waits on its own, one per request.
                Err(mpsc::error::TrySendError::Full(message)) if is_response => {
                    tokio::spawn(async move {
                        let _ = sink.send(message).await;
                    });
                }
                Err(mpsc::error::TrySendError::Full(message)) => {
                    tracing::debug!(method = ?message.get("method"), "server message for a client that does not read its stream; dropped");
                }
            },
            None if !is_response => {
                tracing::debug!(method = ?message.get("method"), "server message with nobody listening; dropped");
            }
            None => {}
        }
    }

    /// Where a server-sent notification or request goes; a progress notification
    /// gets the client's own token back.
    fn owner_of(&self, message: &mut Value) -> Option<mpsc::Sender<Value>> {
        let table = self.lock();
        if let Some(token) = message.pointer_mut("/params/progressToken") {
            let pending = own_id_of_token(token).and_then(|own| table.pending.get(&own));
            let Some(pending) = pending else {
                // Progress for a request that is gone, or a token we never issued.
                return None;
            };
            if let Some(original) = &pending.progress_token {
                *token = original.clone();
            }
            return Some(pending.sink.clone());
        }
        if let Some(listener) = table.listener.as_ref().filter(|l| !l.is_closed()) {
            return Some(listener.clone());
        }
        let (_, newest) = table.pending.iter().max_by_key(|(id, _)| **id)?;
        // Only when it cannot be anyone else's: every request in flight has one owner.
        if table.pending.values().all(|p| p.owner == newest.owner) {
            Some(newest.sink.clone())
        } else {
            tracing::debug!(method = ?message.get("method"), "server message that cannot be attributed to one client; dropped");
            None
        }
    }

    /// Answers one request in flight with an error (its message could not be sent).
    pub async fn fail(&self, own_id: u64, why: &str) {
        let pending = self.lock().pending.remove(&own_id);
        if let Some(pending) = pending {
            let error = tollgate_mcp::error_response(
                Some(&pending.original_id),
                tollgate_mcp::ErrorCode::InternalError,
                why,
                None,
            );
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

    /// Sends `owner`'s request (a message with `method` and `id`) and returns its exchange.
    pub async fn request(&self, mut message: Value, owner: &Owner) -> Result<Exchange, Closed> {
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
                    owner: owner.clone(),
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
        if let Some(token) = message.pointer_mut("/params/_meta/progressToken") {
            *token = own_token(own_id);
        }
        self.outgoing
            .send(message)
            .await
            .map_err(|_| self.closed_now())?;
        Ok(exchange)
    }

    /// Sends `owner`'s notification or response to a server's request.
    pub async fn send(&self, mut message: Value, owner: &Owner) -> Result<(), Closed> {
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
                .filter(|(_, p)| p.original_id == *request_id && p.owner == *owner)
                .max_by_key(|(id, _)| **id)
                .map(|(id, _)| *id);
            match own {
                Some(own) => *request_id = Value::from(own),
                // Nothing of that id is in flight for this owner: the notification
                // would only confuse the server about some other request.
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

    fn owner(name: &str) -> Owner {
        Owner {
            client: format!("client:{name}").into(),
            session: None,
        }
    }

    #[tokio::test]
    async fn answers_come_back_under_the_clients_id() {
        let (channel, mut wire, routes) = channel();
        let mut a = channel
            .request(
                json!({"jsonrpc": "2.0", "id": "x", "method": "tools/list"}),
                &owner("a"),
            )
            .await
            .unwrap();
        let mut b = channel
            .request(
                json!({"jsonrpc": "2.0", "id": "x", "method": "tools/list"}),
                &owner("b"),
            )
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
    async fn equal_progress_tokens_of_two_clients_stay_apart() {
        let (channel, mut wire, routes) = channel();
        let call = |id| {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                               "params": {"name": "t", "_meta": {"progressToken": 1}}})
        };
        let mut a = channel.request(call(1), &owner("a")).await.unwrap();
        let mut b = channel.request(call(1), &owner("b")).await.unwrap();
        let token_a = wire.recv().await.unwrap()["params"]["_meta"]["progressToken"].clone();
        let token_b = wire.recv().await.unwrap()["params"]["_meta"]["progressToken"].clone();
        assert_ne!(token_a, token_b);
        routes
            .deliver(json!({"jsonrpc": "2.0", "method": "notifications/progress",
                            "params": {"progressToken": token_b, "progress": 2}}))
            .await;
        let progress = b.messages.recv().await.unwrap();
        assert_eq!(
            progress["params"]["progressToken"], 1,
            "the client's own token"
        );
        assert_eq!(progress["params"]["progress"], 2);
        assert!(a.messages.try_recv().is_err(), "a saw b's progress");
    }

    #[tokio::test]
    async fn server_messages_go_to_their_request_or_the_listener() {
        let (channel, mut wire, routes) = channel();
        let mut call = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "t", "_meta": {"progressToken": "p"}}}),
                &owner("a"),
            )
            .await
            .unwrap();
        let token = wire.recv().await.unwrap()["params"]["_meta"]["progressToken"].clone();
        let mut listener = channel.listen();
        routes
            .deliver(json!({"jsonrpc": "2.0", "method": "notifications/progress",
                            "params": {"progressToken": token, "progress": 1}}))
            .await;
        routes
            .deliver(json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
            .await;
        let progress = call.messages.recv().await.unwrap();
        assert_eq!(progress["method"], "notifications/progress");
        assert_eq!(progress["params"]["progressToken"], "p");
        assert_eq!(
            listener.recv().await.unwrap()["method"],
            "notifications/tools/list_changed"
        );
    }

    #[tokio::test]
    async fn a_notification_no_one_client_owns_is_dropped() {
        let (channel, mut wire, routes) = channel();
        let ping = |id| json!({"jsonrpc": "2.0", "id": id, "method": "ping"});
        let mut a = channel.request(ping(1), &owner("a")).await.unwrap();
        let _ = wire.recv().await.unwrap();
        let log = json!({"jsonrpc": "2.0", "method": "notifications/message",
                         "params": {"level": "info", "data": "x"}});
        // One owner in flight: the message can only be theirs.
        routes.deliver(log.clone()).await;
        assert_eq!(
            a.messages.recv().await.unwrap()["method"],
            "notifications/message"
        );
        let mut b = channel.request(ping(2), &owner("b")).await.unwrap();
        let _ = wire.recv().await.unwrap();
        routes.deliver(log).await;
        assert!(a.messages.try_recv().is_err());
        assert!(
            b.messages.try_recv().is_err(),
            "b got a message that may be a's"
        );
    }

    #[tokio::test]
    async fn cancellations_are_translated_and_reach_only_the_senders_requests() {
        let (channel, mut wire, routes) = channel();
        let mut call = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "t"}}),
                &owner("a"),
            )
            .await
            .unwrap();
        let own = wire.recv().await.unwrap()["id"].clone();
        let cancel = |id| json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id}});
        // Another client cannot cancel it, though it names the same id.
        channel.send(cancel(7), &owner("b")).await.unwrap();
        assert!(wire.try_recv().is_err());
        channel.send(cancel(7), &owner("a")).await.unwrap();
        assert_eq!(wire.recv().await.unwrap()["params"]["requestId"], own);
        // A cancellation of nothing in flight is not sent at all.
        channel.send(cancel(99), &owner("a")).await.unwrap();
        assert!(wire.try_recv().is_err());
        routes.close("process exited");
        assert!(call.messages.recv().await.is_none());
        let err = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 8, "method": "ping"}),
                &owner("a"),
            )
            .await
            .err()
            .unwrap();
        assert_eq!(&*err.0, "process exited");
    }

    #[tokio::test]
    async fn a_listener_that_is_not_read_holds_up_nothing() {
        let (channel, mut wire, routes) = channel();
        let _listener = channel.listen();
        let mut call = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                &owner("a"),
            )
            .await
            .unwrap();
        let own = wire.recv().await.unwrap()["id"].clone();
        let note =
            json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}});
        // Far more than the listener holds: the excess is dropped, not waited on.
        for _ in 0..SINK_CAPACITY * 4 {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                routes.deliver(note.clone()),
            )
            .await
            .unwrap();
        }
        routes
            .deliver(json!({"jsonrpc": "2.0", "id": own, "result": {}}))
            .await;
        assert_eq!(call.messages.recv().await.unwrap()["id"], 1);
    }

    #[tokio::test]
    async fn a_request_given_up_is_forgotten() {
        let (channel, mut wire, routes) = channel();
        let call = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                &owner("a"),
            )
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
