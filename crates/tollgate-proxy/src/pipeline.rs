//! The core: every JSON-RPC message from every front door passes the same stages,
//! in this order, each in its own file and each taking the previous one's output:
//!
//! 1. [`inbound`]: routing headers checked against the body, era told, headers to
//!    forward picked;
//! 2. [`session`]: the handshake-era session found (or opened after `initialize`);
//! 3. [`decide`]: a `tools/call` evaluated against the policy and rate limits,
//!    recorded, and turned into a refusal, a hold, or a [`decide::Permit`];
//! 4. [`held`]: a held call waits for a human (in `approvals`), then goes on;
//! 5. [`call`]: the one routine that forwards and accounts for every call, single,
//!    batched or approved;
//! 6. [`respond`]: the response stages every message of the answer passes (the
//!    upstream's `dev.tollgate/*` markers removed, `tools/list` filtered, results
//!    checked against the policy's `results` rules, each call's outcome recorded);
//! 7. [`relay`]: the answer on its way back to the client;
//! 8. [`batch`]: the same, message by message, for a JSON-RPC batch.
//!
//! [`tasks`] binds MCP tasks to their caller: before `decide` a `tasks/*` request
//! for another caller's task is answered, after `relay` a created task is recorded.
//!
//! Front doors authenticate and decode once, then call [`Core::handle`]; nothing
//! here knows which door a message came through or which transport an upstream uses.

pub mod batch;
pub mod call;
pub mod context;
pub mod decide;
pub mod held;
pub mod inbound;
pub mod relay;
pub mod respond;
pub mod session;
pub mod tasks;
pub mod tools;

use std::future::Future;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use futures::future::Either;
use tollgate_mcp::{Era, Incoming, Message};

pub use context::{Answer, Caller, Context, Core, Identity, Inbound, Meta, Routing};

use crate::error::ProxyError;
use crate::state::Server;
use crate::telemetry;
use crate::upstream::Lane;

/// What the server span needs to know of a message's arrival.
fn arrival<'a>(server: &'a Server, caller: &'a Caller, meta: &'a Meta) -> telemetry::Arrival<'a> {
    telemetry::Arrival {
        server: &server.name,
        client: caller.shown_name(),
        session: meta.session.as_deref(),
        protocol_version: meta
            .routing
            .as_ref()
            .and_then(|r| r.protocol_version.as_ref())
            .and_then(|v| v.to_str().ok()),
        pipe: meta.pipe,
        headers: meta.trace.as_deref(),
    }
}

impl Core {
    /// Handles one message or batch from `caller` for `server`.
    ///
    /// Not an `async fn`: the future it returns is the stage's own (the untraced
    /// single message's, the common one), not one more layer around it that every
    /// call's future would carry and copy.
    pub fn handle<'a>(
        &'a self,
        server: &'a Arc<Server>,
        caller: &'a Caller,
        inbound: Inbound,
    ) -> impl Future<Output = Result<Answer, ProxyError>> + 'a {
        // With `telemetry:`, a message is handled inside its server span.
        if telemetry::enabled()
            && let Incoming::Single(message) = &inbound.incoming
            && let Some(span) = telemetry::server(message, &arrival(server, caller, &inbound.meta))
        {
            // Boxed: inline, the traced future would double the size of every call's
            // future (and the copy of it hyper makes), traced or not.
            return Either::Left(Box::pin(telemetry::traced(
                span,
                self.dispatch(server, caller, inbound),
                |err| err.to_json()["error"]["code"].as_i64().unwrap_or(0),
            )));
        }
        Either::Right(self.dispatch(server, caller, inbound))
    }

    /// A single message's stages, or a batch's (boxed: batches are rare, and their
    /// future need not make every single message's larger).
    fn dispatch<'a>(
        &'a self,
        server: &'a Arc<Server>,
        caller: &'a Caller,
        inbound: Inbound,
    ) -> impl Future<Output = Result<Answer, ProxyError>> + 'a {
        let Inbound { incoming, meta } = inbound;
        match incoming {
            Incoming::Single(message) => Either::Left(self.single(server, caller, meta, message)),
            Incoming::Batch(messages) => {
                Either::Right(Box::pin(self.batch(server, caller, meta, messages)))
            }
        }
    }

    async fn batch(
        &self,
        server: &Arc<Server>,
        caller: &Caller,
        meta: Meta,
        messages: Vec<Message>,
    ) -> Result<Answer, ProxyError> {
        // With `telemetry:`, each member of a batch is traced on its own.
        let arrival = telemetry::enabled().then(|| arrival(server, caller, &meta));
        batch::handle(self, server, caller, &meta, messages, arrival).await
    }

    async fn single(
        &self,
        server: &Arc<Server>,
        caller: &Caller,
        meta: Meta,
        message: Message,
    ) -> Result<Answer, ProxyError> {
        let meta = &meta;
        let decoded = inbound::decode(&message, meta, &server.params)?;
        if decoded.initialize {
            session::check_initialize(&message)?;
        }
        let session = session::resolve(self.shared(), server, caller, meta, &decoded).await?;
        // The client's answer to a request Tollgate sent (an approval asked by
        // elicitation) is Tollgate's, not the upstream's.
        if self.elicitations.take_answer(&message, session.as_deref()) {
            return Ok(Answer::accepted());
        }
        let ctx = Context::new(
            self,
            server,
            caller,
            session,
            decoded.era,
            decoded.forwarded,
            meta.lane,
        );
        if telemetry::enabled()
            && let Some(version) = ctx.session.as_ref().and_then(|s| s.protocol_version())
        {
            // A binding without headers: the version the session negotiated.
            telemetry::protocol_version(&version);
        }
        if held::withdraw(&ctx, &message) {
            return Ok(Answer::accepted());
        }
        if let Some(answer) = tasks::check(&ctx, &message).await? {
            return Ok(answer);
        }
        let permit = match decide::decide(&ctx, &message).await? {
            decide::Verdict::Refuse(answer) => return Ok(Answer::message(answer)),
            decide::Verdict::Hold(held) => return Ok(held::respond(ctx, message, *held)),
            decide::Verdict::Forward(permit) => permit,
        };
        let payload = crate::upstream::Payload::of(&message);
        // The result of a task the caller owns is checked with its tool's rules.
        let task_tool = task_tool(&ctx, &message).await?;
        let chain =
            respond::Chain::for_message(&ctx, &message, permit).task_result(&ctx, task_tool);
        let mut reply = call::forward(&ctx, payload, chain).await?;
        if ctx.server.tools.is_some() && message.method() == Some("subscriptions/listen") {
            // The stateless era's stream of server events (2026-07-28): a tools change
            // announced on it makes the tool lock list the tools again before a call.
            reply.body = tools::on_list_changed(&ctx, reply.body);
        }
        let answer = relay::answer(&ctx, &message, decoded.initialize, reply).await?;
        tasks::relayed(&ctx, &message, answer).await
    }

    /// Opens a handshake-era session's server-to-client stream.
    pub async fn listen(
        &self,
        server: &Arc<Server>,
        caller: &Caller,
        session_id: Option<&str>,
        forwarded: Vec<(HeaderName, HeaderValue)>,
        lane: Lane,
    ) -> Result<Answer, ProxyError> {
        // Without a session this is a stateless-era endpoint, which has no GET stream.
        let session = session::find(self.shared(), server, caller, session_id)
            .await?
            .ok_or(ProxyError::MethodNotAllowed)?;
        let ctx = Context::new(
            self,
            server,
            caller,
            Some(session),
            Era::Handshake,
            forwarded,
            lane,
        );
        Ok(tasks::streamed(&ctx, call::listen(&ctx).await?))
    }

    /// Ends a handshake-era session, here and upstream (through `lane`).
    pub async fn end(
        &self,
        server: &Arc<Server>,
        caller: &Caller,
        session_id: Option<&str>,
        lane: Lane,
    ) -> Result<(), ProxyError> {
        let session = session::find(self.shared(), server, caller, session_id)
            .await?
            .ok_or(ProxyError::MissingSession)?;
        session::end(self.shared(), server, &session, lane).await;
        Ok(())
    }
}

/// The tool of the task whose result `message` asks for (`tasks/result`, or
/// `tasks/get`, which in the 2026-07-28 extension carries a completed task's result),
/// when the caller owns the task (`tasks::check` answered any other).
async fn task_tool(ctx: &Context, message: &Message) -> Result<Option<String>, ProxyError> {
    if !matches!(message.method(), Some("tasks/result" | "tasks/get")) {
        return Ok(None);
    }
    Ok(tasks::owned(ctx, message).await?.map(|record| record.tool))
}
