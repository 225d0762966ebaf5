//! Stage 3, decide: a `tools/call` evaluated against the policy and its rate
//! limits, its decision recorded (audit log, metrics, a DEBUG line) before anything is
//! forwarded, and answered as docs/errors.md describes when it is refused.
//!
//! A call that may go on gets a [`Permit`]: the only way to the upstream, owning
//! the call's rate-limit slot, id and start time. Finishing it writes the outcome;
//! dropping it unfinished gives the slot back only if the call never left Tollgate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_mcp::{Era, ErrorCode, Message, error_response, result_response};
use tollgate_policy::{Action, Decision, DenyAs, DenyKind, Mode, Redaction, ToolCall};

use super::context::Context;
use crate::audit::{Record, digest, uuid_v7};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::state::{Notify, Server, Shared};
use crate::store::limits::{Taken, Unchecked};
use crate::store::remote::Unavailable;
use crate::telemetry;

/// What to do with an evaluated message.
pub enum Verdict {
    /// Forward it; a tool call carries its permit.
    Forward(Option<Permit>),
    /// Answer the client with this JSON-RPC message; nothing goes upstream.
    Refuse(Value),
    /// Hold the call until a human decides.
    Hold(Box<Held>),
}

/// A call waiting for approval.
pub struct Held {
    /// Its permit (holding its slot) for when it is approved.
    pub permit: Permit,
    /// The decision that asked for approval.
    pub decision: Decision,
    /// The policy's `deny_as`, for the eventual refusal.
    pub deny_as: DenyAs,
}

/// How a forwarded call ended, for its outcome record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with a result.
    Ok,
    /// The upstream answered with a result that has `isError: true`.
    ToolError,
    /// The upstream answered with a JSON-RPC error of this code.
    RpcError(i64),
    /// The upstream accepted the call, in an answer Tollgate does not read (not JSON-RPC).
    Forwarded,
    /// The upstream answered with an HTTP error.
    UpstreamError,
    /// Nothing was sent: the upstream could not be reached.
    Unreachable,
    /// Nothing was sent: the server already runs as many processes as it may.
    AtCapacity,
    /// Sent, and no answer came in time.
    Timeout,
    /// Sent, and the answer broke off.
    Broken,
    /// The upstream lost the session before the call reached a tool.
    SessionLost,
    /// Sent, and the client went away before the answer came.
    ClientGone,
    /// The upstream answered, and the policy's `results` rules withheld the result.
    ResultBlocked,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool_error",
            Outcome::RpcError(_) => "rpc_error",
            Outcome::Forwarded => "forwarded",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Unreachable => "upstream_unreachable",
            Outcome::AtCapacity => "upstream_at_capacity",
            Outcome::Timeout => "upstream_timeout",
            Outcome::Broken => "upstream_broken",
            Outcome::SessionLost => "upstream_session_lost",
            Outcome::ClientGone => "client_gone",
            Outcome::ResultBlocked => "result_blocked",
        }
    }

    /// Whether the call left Tollgate, so that its slot stays spent.
    fn reached_upstream(self) -> bool {
        !matches!(self, Outcome::Unreachable | Outcome::AtCapacity)
    }
}

/// A call allowed to go upstream. Not `Clone`: one call, one account.
pub struct Permit {
    shared: Arc<Shared>,
    server: Arc<Server>,
    call_id: String,
    request_id: Value,
    tool: String,
    slot: Option<Taken>,
    started: Option<Instant>,
    latency: Option<Duration>,
    /// The call's spans, with `telemetry:`.
    trace: Option<Box<telemetry::CallTrace>>,
    redactions: Vec<Redaction>,
}

impl Permit {
    /// The call's id in the audit log (a UUIDv7).
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The tool called.
    pub fn tool(&self) -> &str {
        &self.tool
    }

    /// Notes what the policy's `results` rules found in the call's result, for its
    /// outcome record.
    pub fn redacted(&mut self, redactions: Vec<Redaction>) {
        self.redactions = redactions;
    }

    /// The JSON-RPC id of the call, which its answer carries.
    pub fn request_id(&self) -> &Value {
        &self.request_id
    }

    /// Marks the moment the call is handed to the upstream.
    pub fn start(&mut self, at: Instant) {
        self.started = Some(at);
    }

    /// Marks the moment the upstream's answer began (a stream's headers), when the
    /// call is finished only later, once its answer passes.
    pub fn answer_began(&mut self) {
        self.latency = self.started.map(|at| at.elapsed());
    }

    /// The call's spans, with `telemetry:`.
    pub fn trace(&mut self) -> Option<&mut telemetry::CallTrace> {
        self.trace.as_deref_mut()
    }

    /// Accounts for the call: the outcome record, and the slot kept or given back.
    pub fn finish(mut self, outcome: Outcome) {
        let trace = self.trace.take();
        let _in_trace = trace.as_ref().map(|trace| trace.enter());
        let latency = self
            .latency
            .or_else(|| self.started.map(|at| at.elapsed()))
            .map_or(0.0, |d| d.as_secs_f64());
        if !outcome.reached_upstream()
            && let Some(slot) = self.slot.take()
        {
            self.server.limits.release(slot);
        }
        // A sent call keeps its slot, whatever happened after.
        self.slot = None;
        self.shared.audit().write_soon(&Record::Outcome {
            call_id: &self.call_id,
            server: &self.server.name,
            tool: &self.tool,
            upstream_latency_ms: latency * 1000.0,
            outcome: outcome.as_str(),
            code: match outcome {
                Outcome::RpcError(code) => Some(code),
                _ => None,
            },
            redactions: &self.redactions,
        });
        if let Some(trace) = trace {
            let code = match outcome {
                Outcome::RpcError(code) => Some(code),
                _ => None,
            };
            trace.finish(outcome.as_str(), code);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Unfinished: the call never left Tollgate (refused later, abandoned, …).
        if let Some(slot) = self.slot.take() {
            self.server.limits.release(slot);
        }
    }
}

fn decision_name(decision: &Decision) -> &'static str {
    match decision.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require_approval",
    }
}

/// Evaluates a message: anything but a `tools/call` goes on as it is.
pub async fn decide(ctx: &Context, message: &Message) -> Result<Verdict, ProxyError> {
    let Some(call) = message.tool_call() else {
        if message.is_malformed_tool_call() {
            return Err(ProxyError::MalformedToolCall {
                id: message.id().cloned(),
            });
        }
        return Ok(Verdict::Forward(None));
    };
    tracing::Span::current().record("tool", call.name);
    let id = message.id().cloned().unwrap_or(Value::Null);
    // Only a server with a tool lock checks: without one, the check's future and its
    // answer (a whole `Decision`, copied out of it) would be part of every call.
    if ctx.server.tools.is_some()
        && let Some(changed) = super::tools::check(ctx, message, call.name).await
    {
        return Ok(refuse_changed(ctx, &id, changed, call.arguments).await);
    }
    enforce(ctx, &id, call.name, call.arguments).await
}

/// A call to a tool whose definition differs from the tool lock: recorded as any
/// decision, and refused.
async fn refuse_changed(
    ctx: &Context,
    id: &Value,
    decision: Decision,
    arguments: &Value,
) -> Verdict {
    let deciding = telemetry::clock();
    let policy = ctx.server.policy.load_full();
    let permit = Permit::new(ctx, id, decision.tool.clone(), None);
    let named = policy.names_tool(&decision.tool);
    record(ctx, &decision, &permit, arguments, false, named, deciding).await;
    Verdict::Refuse(refusal(&decision, id, ctx.era, policy.deny_as()))
}

impl Permit {
    /// The permit of call `id` to `tool`, holding its rate-limit `slot` if it took one.
    /// Inlined: built in place in the caller's future instead of copied into it.
    #[inline(always)]
    fn new(ctx: &Context, id: &Value, tool: String, slot: Option<Taken>) -> Permit {
        Permit {
            shared: ctx.shared().clone(),
            server: ctx.server.clone(),
            call_id: uuid_v7(),
            request_id: id.clone(),
            tool,
            slot,
            started: None,
            latency: None,
            trace: telemetry::call(),
            redactions: Vec::new(),
        }
    }
}

/// Evaluates one `tools/call`, writes the decision to the audit log, and says what
/// to do; a token that lacks a scope the rule needs is an error (HTTP 403) that
/// lets the client step up.
async fn enforce(
    ctx: &Context,
    id: &Value,
    tool: &str,
    arguments: &Value,
) -> Result<Verdict, ProxyError> {
    let deciding = telemetry::clock();
    let shared = ctx.shared();
    let server = &ctx.server;
    let policy = server.policy.load_full();
    let identity = ctx.caller.identity.as_deref();
    let call = ToolCall {
        tool,
        arguments,
        client: ctx.caller.client.as_deref(),
        session_key: &ctx.session_key,
        client_key: &ctx.client_key,
        user_key: &ctx.user_key,
        claims: identity.map(|id| &id.claims),
        scopes: identity.map_or(&[], |id| id.scopes.as_slice()),
    };
    // Kept whole, the decision in place: taken apart, it would be copied once more.
    let mut decided = server.limits.decide(&policy, &call, shared.now()).await;
    // A call refused for it is refused as any other call is: with its audit record.
    let unchecked = decided
        .unchecked
        .take()
        .and_then(|u| limits_unchecked(shared.metrics(), server, tool, u));
    let audit_mode = policy.mode() == Mode::Audit && unchecked.is_none();
    let permit = Permit::new(ctx, id, tool.to_owned(), decided.taken.take());
    if !audit_mode {
        refuse_without_approvers(&mut decided.decision, shared.notify());
    }
    let named = policy.names_tool(tool);
    let decision = &decided.decision;
    let recorded = record(
        ctx, decision, &permit, arguments, audit_mode, named, deciding,
    )
    .await;
    if let Some(error) = unchecked {
        return Ok(Verdict::Refuse(error_response(
            Some(id),
            ErrorCode::InternalError,
            &format!(
                "tools/call `{tool}` was not forwarded: its rate limit could not be checked because {error} (state.on_failure: refuse); retry when the operator has Redis back"
            ),
            None,
        )));
    }
    let goes_on = audit_mode || decision.action != Action::Deny;
    if !recorded && goes_on && shared.audit().refuses_unrecorded() {
        // `audit.on_failure: refuse`: what cannot be recorded does not happen. The
        // permit is dropped unused, so its slot is given back.
        return Ok(Verdict::Refuse(refuse_unrecorded(
            shared.metrics(),
            server,
            id,
            tool,
        )));
    }
    // The usual way on, without handing the decision to `verdict` (a copy of it).
    if audit_mode || decision.action == Action::Allow {
        return Ok(Verdict::Forward(Some(permit)));
    }
    verdict(ctx, id, decided.decision, permit, policy.deny_as())
}

/// A rate limit the shared state could not check: counted and logged; the error
/// when `state.on_failure: refuse` refuses the call.
fn limits_unchecked(
    metrics: &Metrics,
    server: &Server,
    tool: &str,
    Unchecked { error, refused }: Unchecked,
) -> Option<Unavailable> {
    metrics.state_unavailable(&server.name, refused);
    if refused {
        tracing::warn!(tool, error = %error, "tools/call refused: its rate limit is kept in the shared state, which cannot be reached (state.on_failure: refuse)");
    } else {
        tracing::warn!(tool, error = %error, "tools/call let through without its rate limit: the shared state cannot be reached (state.on_failure: allow)");
    }
    refused.then_some(error)
}

/// Without an admin listener no human can decide, so a call that needs approval is
/// refused at once instead of held until it times out.
fn refuse_without_approvers(decision: &mut Decision, notify: &Notify) {
    if decision.action == Action::RequireApproval && notify.admin_url().is_none() {
        decision.action = Action::Deny;
        decision.kind = Some(DenyKind::ApprovalDenied);
        decision.reason = format!(
            "{} (this call needs a human's approval, and approval is not available: no admin listener is configured)",
            decision.reason
        );
    }
}

/// The answer to a call refused because its decision could not be recorded
/// (`audit.on_failure: refuse`).
fn refuse_unrecorded(metrics: &Metrics, server: &Server, id: &Value, tool: &str) -> Value {
    metrics.audit_refusal(&server.name);
    tracing::warn!(
        tool,
        "tools/call refused: its decision could not be written to the audit log"
    );
    error_response(
        Some(id),
        ErrorCode::InternalError,
        &format!(
            "tools/call `{tool}` was not forwarded: its decision could not be written to the audit log (audit.on_failure: refuse); the operator must fix the audit log"
        ),
        None,
    )
}

/// What an enforced decision does with the call.
fn verdict(
    ctx: &Context,
    id: &Value,
    decision: Decision,
    mut permit: Permit,
    deny_as: DenyAs,
) -> Result<Verdict, ProxyError> {
    Ok(match decision.action {
        Action::Allow => Verdict::Forward(Some(permit)),
        Action::RequireApproval => Verdict::Hold(Box::new(Held {
            permit,
            deny_as,
            decision,
        })),
        // A token bearer can get the scope and retry (MCP's step-up flow); anyone
        // else is refused like any other denial.
        Action::Deny
            if decision.kind == Some(DenyKind::InsufficientScope)
                && ctx.caller.identity.is_some() =>
        {
            return Err(ProxyError::InsufficientScope {
                scope: decision.required_scopes.join(" "),
                challenge: None,
            });
        }
        Action::Deny => {
            // Refused here: the slot (if the decision took one) is not spent.
            if let Some(slot) = permit.slot.take() {
                ctx.server.limits.release(slot);
            }
            Verdict::Refuse(refusal(&decision, id, ctx.era, deny_as))
        }
    })
}

/// The decision's audit record, metric and log line; whether the record was written.
async fn record(
    ctx: &Context,
    decision: &Decision,
    permit: &Permit,
    arguments: &Value,
    audit_mode: bool,
    named_by_policy: bool,
    deciding: Option<std::time::SystemTime>,
) -> bool {
    let shared = ctx.shared();
    let identity = ctx.caller.identity.as_deref();
    let rule = rule_label(decision);
    // Building the record (and hashing the arguments) is skipped when nothing is logged.
    let recorded = !shared.audit().enabled()
        || shared
            .audit()
            .write_together(&Record::Decision {
                call_id: &permit.call_id,
                server: &ctx.server.name,
                client: ctx.caller.client.as_deref(),
                client_address: ctx.caller.peer,
                user: identity.map(|id| &*id.user),
                client_id: identity.and_then(|id| id.client_id.as_deref()),
                jti: identity.and_then(|id| id.jti.as_deref()),
                session: ctx.session.as_ref().map(|s| &*s.id),
                tool: &permit.tool,
                decision: decision_name(decision),
                kind: decision.kind.map(|k| k.as_str()),
                rule,
                reason: &decision.reason,
                mode: if audit_mode { "audit" } else { "enforce" },
                arguments_digest: digest(arguments),
                arguments: shared.audit().includes_arguments().then_some(arguments),
                failing_path: decision.failing_path.as_deref(),
            })
            .await;
    shared.metrics().decision(
        &ctx.server.name,
        &permit.tool,
        named_by_policy,
        decision_name(decision),
        rule,
    );
    if let Some(started) = deciding {
        telemetry::decision(
            started,
            &telemetry::Decided {
                decision: decision_name(decision),
                kind: decision.kind.map(|k| k.as_str()),
                rule,
                mode: if audit_mode { "audit" } else { "enforce" },
                refused: !audit_mode && decision.action == Action::Deny,
            },
        );
    }
    // The audit log is the record of decisions; a line per call at INFO would cost
    // as much as the rest of the call's logging put together.
    tracing::debug!(
        tool = %permit.tool,
        decision = decision_name(decision),
        rule = %rule,
        reason = %decision.reason,
        audit_mode,
        "tools/call decided"
    );
    recorded
}

/// The deciding rule as the audit log, metrics and approvals name it, or `default`.
pub fn rule_label(decision: &Decision) -> &str {
    decision
        .rule
        .as_ref()
        .map_or("default", tollgate_policy::RuleRef::label)
}

/// Turns a held call's decision into a refusal (approval denied, expired, or not
/// possible where it was asked).
pub fn deny(decision: &mut Decision, kind: DenyKind, reason: String) {
    decision.action = Action::Deny;
    decision.kind = Some(kind);
    decision.reason = reason;
}

/// The answer to a refused call: a tool result with `isError: true` (or a JSON-RPC
/// error with `deny_as: error`), carrying the decision under `_meta`.
pub fn refusal(decision: &Decision, id: &Value, era: Era, deny_as: DenyAs) -> Value {
    let meta = decision.meta_json();
    match deny_as {
        DenyAs::Error => error_response(
            Some(id),
            ErrorCode::DeniedByPolicy,
            &format!("Tool call denied by policy: {}", decision.reason),
            Some(meta),
        ),
        DenyAs::Result => {
            let mut text = format!("Denied by policy: {}", decision.reason);
            if let Some(wait) = decision.retry_after {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                text.push_str(&format!("; retry in {secs}s"));
            }
            let mut result = json!({
                "content": [{"type": "text", "text": text}],
                "isError": true,
                "_meta": {"dev.tollgate/decision": meta},
            });
            if era == Era::Stateless {
                result["resultType"] = json!("complete");
            }
            result_response(id, result)
        }
    }
}
