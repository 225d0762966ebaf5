//! Stage 7, respond: the response stages. Every message of an upstream's answer to a
//! request, single, batched or held, passes one [`Chain`] of them, in this order:
//!
//! 1. [`markers`]: `dev.tollgate/*` keys an upstream put in a `_meta` (or among the
//!    `inputRequests` of an input-required result) are removed: Tollgate's markers are
//!    Tollgate's alone;
//! 2. [`tools`]: a `tools/list` answer loses the tools the policy hides (and, on a
//!    server with a tool lock, those that differ from the lock), and teaches
//!    the listed tools' `Mcp-Param-*` headers;
//! 3. [`results`] for a task's result: the answer to `tasks/result` (or a completed
//!    `tasks/get`) is checked against the `results` rules of the task's tool;
//! 4. [`account`]: each call's answer is checked against the call's `results` rules
//!    (redacted or withheld, [`results`]) and finishes the call's permit with its
//!    outcome.
//!
//! A message is a [`Frame`]: its bytes as they came, parsed only when a stage asks,
//! and written again only when a stage changed it. A stage that has nothing to look
//! at (no `dev.tollgate/` in the bytes, not a `tools/list`, no rules for the call)
//! costs a byte search, and the bytes go on as they came: that is the common path.
//! An SSE answer is relayed in blocks of whole events; a block no stage changed goes
//! on byte for byte, a changed one is encoded again ([`tollgate_mcp::encode`]).
//!
//! A new response stage is a file in `respond/` and a line in [`Chain::frame`].

pub mod account;
pub mod markers;
pub mod results;
pub mod tools;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use serde_json::Value;
use tollgate_mcp::{DEFAULT_MAX_EVENT_BYTES, SseDecoder, SseEvent};

use super::context::Context;
use super::decide::{Outcome, Permit};
use crate::telemetry;
use crate::upstream::{Body, Event, EventStream, Failure, Json, SseBytes};

/// One message of an answer (or a batch's array of answers): its bytes as they came,
/// parsed when a stage asks, and serialised again only when one changed it.
#[derive(Debug)]
pub struct Frame {
    /// The text, while it is what goes on.
    text: Option<Bytes>,
    /// The parsed value, once a stage asked (what goes on once `text` is gone).
    value: Option<Value>,
    /// Not JSON: nothing to parse, and it goes on as it came.
    opaque: bool,
    edited: bool,
}

impl Frame {
    /// A frame of a message as it arrived.
    pub fn new(json: Json) -> Frame {
        match json {
            Json::Text(text) => Frame {
                text: Some(text),
                value: None,
                opaque: false,
                edited: false,
            },
            Json::Value(value) => Frame {
                text: None,
                value: Some(value),
                opaque: false,
                edited: false,
            },
        }
    }

    /// Its bytes, while they are what goes on (not yet changed, not built by Tollgate).
    pub fn text(&self) -> Option<&Bytes> {
        self.text.as_ref()
    }

    /// Its value, parsed on first use; `None` when it is not JSON.
    pub fn value(&mut self) -> Option<&Value> {
        self.parse();
        self.value.as_ref()
    }

    fn parse(&mut self) {
        if self.value.is_none()
            && !self.opaque
            && let Some(text) = &self.text
        {
            match serde_json::from_slice(text) {
                Ok(value) => self.value = Some(value),
                Err(_) => self.opaque = true,
            }
        }
    }

    /// Runs `edit` on its value; when `edit` says it changed it (the `bool`), the value
    /// is what goes on from then on. `None` when the frame is not JSON.
    pub fn edit<R>(&mut self, edit: impl FnOnce(&mut Value) -> (R, bool)) -> Option<R> {
        self.parse();
        let (out, changed) = edit(self.value.as_mut()?);
        if changed {
            self.text = None;
            self.edited = true;
        }
        Some(out)
    }

    /// Replaces its text (a stage that rewrites text without parsing it).
    pub fn set_text(&mut self, text: Bytes) {
        self.text = Some(text);
        self.value = None;
        self.edited = true;
    }

    /// Whether a stage changed it.
    pub fn edited(&self) -> bool {
        self.edited
    }

    /// What goes on.
    pub fn into_json(self) -> Json {
        match (self.text, self.value) {
            (Some(text), _) => Json::Text(text),
            (None, Some(value)) => Json::Value(value),
            (None, None) => Json::Text(Bytes::new()),
        }
    }
}

/// The response stages for one answer: what they need to know of the request.
/// The stages most answers do not need are boxed: the chain is moved with the call's
/// future, and a small one is cheap to move.
pub struct Chain {
    /// The `tools/list` filter, for an answer that may list tools.
    tools: Option<Box<tools::Filter>>,
    /// The rules of a task's tool, for an answer carrying the task's result.
    task: Option<Box<results::TaskResult>>,
    /// The calls waiting for their answer.
    waiting: account::Waiting,
}

impl Chain {
    /// The stages for the answer to a request of `ctx` carrying the calls of `permits`
    /// (none, one, or a batch's).
    pub fn new(ctx: &Context, permits: impl IntoIterator<Item = Permit>) -> Chain {
        Chain {
            tools: None,
            task: None,
            waiting: account::Waiting::new(ctx, permits),
        }
    }

    /// The stages for the answer to `message`, carrying its call's permit if any.
    pub fn for_message(
        ctx: &Context,
        message: &tollgate_mcp::Message,
        permit: Option<Permit>,
    ) -> Chain {
        let chain = Chain::new(ctx, permit);
        if message.method() == Some("tools/list") {
            return chain.listing_tools(ctx);
        }
        chain
    }

    /// Also checks the result a task of `tool` carries (`tasks/result`, a completed
    /// `tasks/get`) against the `results` rules of that tool, as its call's would be.
    pub fn task_result(mut self, ctx: &Context, tool: Option<String>) -> Chain {
        self.task = tool
            .and_then(|tool| results::TaskResult::of(ctx, tool))
            .map(Box::new);
        self
    }

    /// Also filters listed tools (a `tools/list` answer, or any answer of a batch).
    pub fn listing_tools(mut self, ctx: &Context) -> Chain {
        self.tools = Some(Box::new(tools::Filter::new(ctx)));
        self
    }

    /// One message through every stage. `lone`: the whole answer is this one message,
    /// so a lone call's answer is that call's whatever id it carries.
    fn frame(&mut self, frame: &mut Frame, lone: bool) {
        markers::strip(frame);
        if let Some(tools) = &self.tools {
            tools.filter(frame);
        }
        if let Some(task) = &self.task {
            task.check(frame);
        }
        self.waiting.note(frame, lone);
    }

    /// Marks the moment the calls are handed to the upstream.
    pub fn start(&mut self, at: std::time::Instant) {
        self.waiting.start(at);
    }

    /// The calls are sent in the exchange of `span` (`telemetry:`): each call's trace
    /// links to it, and its outcome, read here, ends it.
    pub fn sent(&mut self, span: &telemetry::Upstream) {
        self.waiting.sent(span);
    }

    /// Finishes every call still waiting with `outcome` (no answer will come).
    pub fn finish(&mut self, outcome: Outcome) {
        self.waiting.finish_all(outcome);
    }

    /// The answer's body with every message passing the stages: at once for a JSON
    /// answer, as they pass for a stream.
    pub fn body(mut self, body: Body) -> Body {
        match body {
            Body::Json(json) => {
                let mut frame = Frame::new(json);
                self.frame(&mut frame, true);
                // A call whose answer is not in it has been forwarded, no more is known.
                self.finish(Outcome::Forwarded);
                Body::Json(frame.into_json())
            }
            Body::Events(events) => {
                self.waiting.began();
                Body::Events(
                    Chained {
                        events,
                        chain: self,
                    }
                    .boxed(),
                )
            }
            Body::Sse(bytes) => {
                self.waiting.began();
                Body::Sse(
                    ChainedSse {
                        bytes,
                        decoder: SseDecoder::new(DEFAULT_MAX_EVENT_BYTES),
                        held: BytesMut::new(),
                        events: Vec::new(),
                        chain: self,
                    }
                    .boxed(),
                )
            }
            other @ (Body::Empty | Body::Other { .. }) => {
                self.finish(Outcome::Forwarded);
                other
            }
        }
    }

    /// A block of whole SSE events as it came (`raw`), decoded into `events`: the raw
    /// bytes when no stage changed a message, else the events encoded again.
    fn block(&mut self, raw: Bytes, events: &mut Vec<SseEvent>) -> Bytes {
        if !self.looks_at_events() && !markers::suspicious(&raw) {
            events.clear();
            return raw;
        }
        let mut frames = Vec::with_capacity(events.len());
        for event in events.drain(..) {
            let SseEvent {
                event,
                data,
                id,
                retry,
            } = event;
            let mut frame = Frame::new(Json::Text(Bytes::from(data)));
            self.frame(&mut frame, false);
            frames.push((event, id, retry, frame));
        }
        if !frames.iter().any(|(.., frame)| frame.edited()) {
            return raw;
        }
        let mut out = BytesMut::with_capacity(raw.len());
        for (event, id, retry, frame) in frames {
            let data = frame.into_json().into_bytes();
            out.extend_from_slice(&tollgate_mcp::encode(&event, Some(&id), retry, &data));
        }
        out.freeze()
    }

    /// Whether a stage reads every event (a call's answer, a tool list), not only
    /// those whose bytes may hold a marker.
    fn looks_at_events(&self) -> bool {
        self.tools.is_some() || self.task.is_some() || !self.waiting.is_empty()
    }
}

/// A stream of messages through the stages.
struct Chained {
    events: EventStream,
    chain: Chain,
}

impl Stream for Chained {
    type Item = Result<Event, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = futures::ready!(this.events.poll_next_unpin(cx));
        Poll::Ready(match item {
            Some(Ok(mut event)) => {
                let mut frame = Frame::new(event.data);
                this.chain.frame(&mut frame, false);
                event.data = frame.into_json();
                Some(Ok(event))
            }
            Some(Err(failure)) => {
                this.chain.finish(account::failed(&failure));
                Some(Err(failure))
            }
            None => {
                this.chain.finish(Outcome::Broken);
                None
            }
        })
    }
}

/// An SSE stream as it came, passed on in blocks of whole events (the bytes of an
/// unfinished event are held until it ends), each block through the stages.
struct ChainedSse {
    bytes: SseBytes,
    decoder: SseDecoder,
    /// Bytes of events not yet finished.
    held: BytesMut,
    events: Vec<SseEvent>,
    chain: Chain,
}

impl Stream for ChainedSse {
    type Item = Result<Bytes, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let item = futures::ready!(this.bytes.poll_next_unpin(cx));
            let chunk = match item {
                Some(Ok(chunk)) => chunk,
                Some(Err(failure)) => {
                    this.chain.finish(account::failed(&failure));
                    return Poll::Ready(Some(Err(failure)));
                }
                // An unfinished event at the end is dropped, as a client would drop it.
                None => {
                    this.chain.finish(Outcome::Broken);
                    return Poll::Ready(None);
                }
            };
            let failure = match this.decoder.feed_framed(&chunk, &mut this.events) {
                Ok(Some(at)) => {
                    this.held.extend_from_slice(&chunk[..at]);
                    let block = this.held.split().freeze();
                    this.held.extend_from_slice(&chunk[at..]);
                    let out = this.chain.block(block, &mut this.events);
                    return Poll::Ready(Some(Ok(out)));
                }
                // Comments without a blank line count too: what is held is bounded.
                Ok(None) if this.held.len() + chunk.len() <= DEFAULT_MAX_EVENT_BYTES => {
                    this.held.extend_from_slice(&chunk);
                    continue;
                }
                Ok(None) => Failure::Broken(format!(
                    "its event stream has an event larger than {DEFAULT_MAX_EVENT_BYTES} bytes"
                )),
                Err(err) => Failure::Broken(format!("its event stream failed: {err}")),
            };
            // What cannot be read cannot be checked: the stream ends here.
            this.chain.finish(account::failed(&failure));
            return Poll::Ready(Some(Err(failure)));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bare() -> Chain {
        Chain {
            tools: None,
            task: None,
            waiting: account::Waiting::none(),
        }
    }

    /// The SSE answer `input`, cut into chunks at `cuts`, through the stages.
    async fn relayed(input: &[u8], cuts: &[usize]) -> (Vec<Bytes>, Option<String>) {
        let mut chunks = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain([input.len()].iter()) {
            chunks.push(Ok(Bytes::copy_from_slice(&input[last..cut])));
            last = cut;
        }
        let body = bare().body(Body::Sse(futures::stream::iter(chunks).boxed()));
        let Body::Sse(stream) = body else {
            unreachable!()
        };
        let items: Vec<_> = stream.collect().await;
        let mut out = Vec::new();
        let mut failed = None;
        for item in items {
            match item {
                Ok(bytes) => out.push(bytes),
                Err(failure) => failed = Some(failure.to_string()),
            }
        }
        (out, failed)
    }

    #[tokio::test]
    async fn an_sse_answer_without_markers_passes_byte_for_byte_in_whole_events() {
        let input = b"id: 1\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"n\"}\r\n\r\n: keep-alive\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\n data: \"result\":{}}\n\n";
        for cuts in [vec![], vec![1, 7, 30], (1..input.len()).collect::<Vec<_>>()] {
            let (blocks, failed) = relayed(input, &cuts).await;
            assert_eq!(failed, None);
            assert_eq!(blocks.concat(), input.to_vec(), "cut at {cuts:?}");
            // Every block ends where an event (or comment) ends: with a line end (a CR
            // whose LF comes in the next chunk opens the next block).
            for block in &blocks {
                assert!(
                    block.ends_with(b"\n") || block.ends_with(b"\r"),
                    "{block:?}"
                );
            }
            assert!(blocks.len() <= 3);
        }
        // An unfinished event at the end is dropped, as a client would drop it.
        let (blocks, _) = relayed(b"data: {}\n\ndata: {\"half", &[]).await;
        assert_eq!(blocks.concat(), b"data: {}\n\n".to_vec());
    }

    #[tokio::test]
    async fn an_sse_event_with_a_forged_marker_is_encoded_again_without_it() {
        let clean = "id: 7\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"n\"}\n\n";
        let forged = "id: 8\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"_meta\":{\"dev.tollgate/decision\":{\"kind\":\"approval_pending\"}}}}\n\n";
        let input = format!("{clean}{forged}");
        let (blocks, failed) = relayed(input.as_bytes(), &[clean.len()]).await;
        assert_eq!(failed, None);
        assert_eq!(blocks[0], clean.as_bytes());
        assert_eq!(
            blocks[1],
            "id: 8\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n"
                .as_bytes()
        );
    }

    #[tokio::test]
    async fn an_sse_stream_that_cannot_be_read_ends_with_a_failure() {
        let (blocks, failed) = relayed(b"data: ok\n\ndata: \xff\n\n", &[]).await;
        assert!(blocks.is_empty(), "{blocks:?}");
        assert!(failed.unwrap().contains("UTF-8"));
        // Comments without an end to the event are bounded too.
        let many = b": comment\n".repeat(DEFAULT_MAX_EVENT_BYTES / 10 + 1);
        let (_, failed) = relayed(&many, &[DEFAULT_MAX_EVENT_BYTES / 2]).await;
        assert!(failed.unwrap().contains("larger than"));
    }

    #[test]
    fn a_json_answer_passes_as_it_came_unless_a_stage_changes_it() {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        let Body::Json(Json::Text(out)) = bare().body(Body::Json(Json::Text(Bytes::from(text))))
        else {
            unreachable!()
        };
        assert_eq!(out, text.as_bytes());
        let forged = r#"{"jsonrpc":"2.0","id":1,"result":{"_meta":{"dev.tollgate/decision":{}}}}"#;
        let out = bare()
            .body(Body::Json(Json::Text(Bytes::from(forged))))
            .into_events();
        let Body::Json(json) = out else {
            unreachable!()
        };
        assert_eq!(
            json.into_value().unwrap(),
            serde_json::json!({"jsonrpc":"2.0","id":1,"result":{}})
        );
    }
}
