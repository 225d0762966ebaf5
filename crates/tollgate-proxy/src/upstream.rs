//! Upstreams: how a message reaches an MCP server and how its answer comes back.
//!
//! [`Upstream`] is the one interface the core sees, implemented by Streamable HTTP
//! ([`http::HttpUpstream`]) and, through a [`bridge::Bridge`], by stdio processes
//! and legacy HTTP+SSE servers. It speaks in JSON-RPC messages and a few facts about
//! the exchange (status, session id), never in HTTP objects. This module imports
//! only the configuration below it.

pub mod bridge;
pub mod channel;
pub mod http;
pub mod legacy_sse;
mod pool;
pub mod probe;
pub mod stdio;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::Value;

pub use bridge::{Bridge, Connector};

/// Who a request belongs to, so that on an upstream shared by several clients no
/// client's traffic reaches another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `client:<name>` for an authenticated client, else `peer:<address>`.
    pub client: Arc<str>,
    /// Tollgate's session id, in the handshake era.
    pub session: Option<Arc<str>>,
}

/// The lanes that serve the proxy listener: threads, each with a current-thread
/// runtime, its own listener on the one port and its own upstream connections
/// (`tollgate_proxy::serve`). A value the library is built with
/// (`AppState::build_with`), never a process global: two proxies in one process may
/// have different lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    count: std::num::NonZeroUsize,
}

impl Lanes {
    /// `count` lanes (at least one).
    pub fn new(count: usize) -> Lanes {
        Lanes {
            count: std::num::NonZeroUsize::new(count).unwrap_or(std::num::NonZeroUsize::MIN),
        }
    }

    /// One lane: the thread that serves.
    pub fn one() -> Lanes {
        Lanes::new(1)
    }

    /// How many lanes there are.
    pub fn count(self) -> usize {
        self.count.get()
    }

    /// Every lane, the first ([`Lane::FIRST`]) first.
    pub fn each(self) -> impl Iterator<Item = Lane> {
        (0..self.count()).map(Lane)
    }
}

impl Default for Lanes {
    fn default() -> Lanes {
        Lanes::one()
    }
}

/// One lane of [`Lanes`], passed with each exchange so that it uses the lane's own
/// upstream connections (which are driven on the lane's thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Lane(usize);

impl Lane {
    /// The first lane: the thread that called `serve`, which also runs the admin
    /// listener, the sweeps and the readiness probes (and the CLI's own exchanges).
    pub const FIRST: Lane = Lane(0);

    /// Its index among the lanes, from 0.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What is sent: one message or a JSON-RPC batch, as evaluated.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// One message, serialised to send.
    One(&'a Value),
    /// One client message with the bytes it arrived as, which mean exactly what the
    /// value does (the strict parse, [`tollgate_mcp::Message::raw`]): sent as they are,
    /// and its value parsed only for a transport that rewrites it.
    Verbatim(&'a tollgate_mcp::Message, &'a Bytes),
    /// A batch (2025-03-26).
    Batch(&'a [Value]),
}

impl<'a> Payload<'a> {
    /// A client's message as evaluated: its own bytes when it has them.
    pub fn of(message: &'a tollgate_mcp::Message) -> Payload<'a> {
        match message.raw() {
            Some(raw) => Payload::Verbatim(message, raw),
            None => Payload::One(message.as_value()),
        }
    }

    /// The one message's `id`, if it is not a batch.
    pub fn id(&self) -> Option<&'a Value> {
        match *self {
            Payload::One(message) => message.get("id"),
            Payload::Verbatim(message, _) => message.id(),
            Payload::Batch(_) => None,
        }
    }

    /// The payload as a value, for a transport that rewrites what it sends (ids).
    pub fn parsed(self) -> Payload<'a> {
        match self {
            Payload::Verbatim(message, _) => Payload::One(message.as_value()),
            other => other,
        }
    }

    /// The payload as JSON text.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising a `Value` cannot fail: every key is a string.
        match self {
            Payload::One(message) => serde_json::to_vec(message).unwrap_or_default().into(),
            Payload::Verbatim(_, raw) => Bytes::clone(raw),
            Payload::Batch(messages) => serde_json::to_vec(messages).unwrap_or_default().into(),
        }
    }
}

/// One request to an upstream.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The message(s).
    pub payload: Payload<'a>,
    /// The upstream's session id, in the handshake era.
    pub session: Option<&'a str>,
    /// The negotiated protocol version, sent when the client's headers have none.
    pub protocol_version: Option<&'a str>,
    /// Client headers that are forwarded as they are (routing and `Mcp-Param-*`).
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// Whose request this is.
    pub owner: &'a Owner,
    /// The lane whose upstream connections carry it.
    pub lane: Lane,
}

/// A JSON value as it arrived: text from the network, or a value already parsed.
#[derive(Debug, Clone)]
pub enum Json {
    /// JSON text.
    Text(Bytes),
    /// A parsed value.
    Value(Value),
}

impl Json {
    /// The value, parsing text.
    pub fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Json::Text(text) => serde_json::from_slice(&text),
            Json::Value(value) => Ok(value),
        }
    }

    /// The JSON text.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Json::Text(text) => text,
            Json::Value(value) => Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
        }
    }
}

/// One message of a streamed answer (an SSE event upstream and downstream).
#[derive(Debug, Clone)]
pub struct Event {
    /// The message.
    pub data: Json,
    /// The event id, for resumption with `Last-Event-ID`.
    pub id: Option<String>,
    /// The reconnection delay the upstream asked for, in milliseconds.
    pub retry: Option<u64>,
}

impl Event {
    /// An event carrying `message` and nothing else.
    pub fn message(message: Value) -> Event {
        Event {
            data: Json::Value(message),
            id: None,
            retry: None,
        }
    }
}

/// Messages as they come; an error ends the stream.
pub type EventStream = BoxStream<'static, Result<Event, Failure>>;

/// An upstream's SSE stream as it came, not yet decoded; an error ends it.
pub type SseBytes = BoxStream<'static, Result<Bytes, Failure>>;

/// The body of an upstream's answer.
pub enum Body {
    /// Nothing (202 Accepted, or an empty error).
    Empty,
    /// One JSON value: a message or a batch's answers.
    Json(Json),
    /// A stream of messages.
    Events(EventStream),
    /// A stream of messages in SSE framing, as the upstream sent it. Relayed to an
    /// SSE client byte for byte; decoded ([`Body::into_events`]) only where the
    /// messages themselves are needed.
    Sse(SseBytes),
    /// Something that is not JSON-RPC (an error page, say), relayed as it is.
    Other {
        /// Its `Content-Type`.
        content_type: Option<HeaderValue>,
        /// Its bytes.
        bytes: Bytes,
    },
}

impl Body {
    /// The body with an SSE stream decoded into messages.
    pub fn into_events(self) -> Body {
        use futures::StreamExt as _;
        match self {
            Body::Sse(bytes) => {
                let events = tollgate_mcp::events(bytes).map(|event| match event {
                    Ok(event) => Ok(Event {
                        data: Json::Text(Bytes::from(event.data)),
                        id: (!event.id.is_empty()).then_some(event.id),
                        retry: event.retry,
                    }),
                    Err(err) => Err(Failure::Broken(format!("its event stream failed: {err}"))),
                });
                Body::Events(events.boxed())
            }
            other => other,
        }
    }

    /// The first JSON-RPC answer in it: the JSON, or the first answer in a stream.
    pub async fn first_answer(self) -> Option<Value> {
        use futures::StreamExt as _;
        match self.into_events() {
            Body::Json(json) => json.into_value().ok(),
            Body::Events(mut events) => {
                while let Some(Ok(event)) = events.next().await {
                    if let Ok(message) = event.data.into_value()
                        && message.get("method").is_none()
                        && message.get("id").is_some()
                    {
                        return Some(message);
                    }
                }
                None
            }
            Body::Empty | Body::Other { .. } | Body::Sse(_) => None,
        }
    }
}

/// An upstream's answer.
pub struct Reply {
    /// The status, in HTTP terms (bridges answer as a Streamable HTTP server would).
    pub status: StatusCode,
    /// The session id the upstream issued (`initialize`).
    pub session: Option<String>,
    /// `Retry-After`, relayed.
    pub retry_after: Option<HeaderValue>,
    /// The answer.
    pub body: Body,
}

impl Reply {
    /// A reply of `status` with `body`.
    pub fn new(status: StatusCode, body: Body) -> Reply {
        Reply {
            status,
            session: None,
            retry_after: None,
            body,
        }
    }
}

/// Why an exchange with the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// Nothing was sent: connecting or starting failed.
    #[error("could not be reached: {0}")]
    Unreachable(String),
    /// Nothing was sent: the server runs as many processes as its configuration allows.
    #[error("{0}")]
    AtCapacity(String),
    /// Sent, but no answer came within the server's timeout.
    #[error("did not answer within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// Sent, and the answer broke off or never came.
    #[error("{0}")]
    Broken(String),
    /// Sent, and the answer was larger than Tollgate buffers.
    #[error(
        "answered with a message larger than {0} bytes, the most Tollgate reads (4 × limits.max_body, at least 4 MiB)"
    )]
    TooLarge(usize),
}

impl Failure {
    /// Whether the request left Tollgate (so the tool may have run).
    pub fn was_sent(&self) -> bool {
        !matches!(self, Failure::Unreachable(_) | Failure::AtCapacity(_))
    }

    /// A short label for metrics and the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::AtCapacity(_) => "at_capacity",
            Failure::Timeout(_) => "timeout",
            Failure::Broken(_) => "broken",
            Failure::TooLarge(_) => "too_large",
        }
    }
}

/// An MCP server as the core sees it.
pub trait Upstream: Send + Sync {
    /// Sends a message (or batch) and waits, at most the server's timeout, for its
    /// answer to begin.
    fn send<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Reply, Failure>>;

    /// Opens a session's server-to-client stream (the handshake era's GET); `None`
    /// when the upstream issued no session id.
    fn listen<'a>(
        &'a self,
        lane: Lane,
        session: Option<&'a str>,
        headers: &'a [(HeaderName, HeaderValue)],
    ) -> BoxFuture<'a, Result<Reply, Failure>>;

    /// Ends a session upstream.
    fn end<'a>(&'a self, lane: Lane, session: &'a str) -> BoxFuture<'a, Result<(), Failure>>;

    /// Connections or processes held open for sessions, where the upstream has any.
    fn live_sessions(&self) -> Option<usize> {
        None
    }

    /// Processes running for this upstream (stdio upstreams only).
    fn live_processes(&self) -> Option<usize> {
        None
    }

    /// Ends sessions unused for `idle`.
    fn sweep(&self, _idle: Duration) {}

    /// Ends every session (and process).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// An HTTP client error's root cause: its top-level message is generic.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = cause.to_string();
        source = cause.source();
    }
    text
}
