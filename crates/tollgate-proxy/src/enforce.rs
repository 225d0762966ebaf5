//! The evaluate and audit stages: decide a `tools/call`, record the decision, and
//! either let it through or answer it the way SPEC §6 asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tollgate_mcp::{Era, ErrorCode, ToolCallRef, error_response, result_response};
use tollgate_policy::{Action, Decision, DenyAs, DenyKind, Mode, Policy, Slot, ToolCall, evaluate};

use crate::audit::digest;
use crate::state::{AppState, Server};

/// Who is calling, as far as the policy is concerned.
pub struct Caller<'a> {
    /// Authenticated client name.
    pub client: Option<&'a str>,
    /// Key of `per: session` limits.
    pub session_key: &'a str,
    /// Key of `per: client` limits.
    pub client_key: &'a str,
    /// Tollgate's session id, for the audit log.
    pub session: Option<&'a str>,
    /// The request's era, which shapes the answer.
    pub era: Era,
}

/// What to do with an evaluated call.
pub enum Verdict {
    /// Forward it; give `slot` back if the upstream never answers.
    Forward {
        /// Audit id of the call.
        call_id: u64,
        /// Rate-limit slot taken.
        slot: Option<Slot>,
    },
    /// Answer the client with this JSON-RPC message; nothing goes upstream.
    Refuse(Value),
    /// Hold the call until a human decides.
    Hold(Held),
}

/// A call waiting for approval.
pub struct Held {
    /// Audit id of the call.
    pub call_id: u64,
    /// The decision that asked for approval (its slot, if any, is taken).
    pub decision: Decision,
    /// The policy's `deny_as`, for the eventual refusal.
    pub deny_as: DenyAs,
}

static CALL_IDS: AtomicU64 = AtomicU64::new(1);

fn decision_name(decision: &Decision) -> &'static str {
    match decision.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require_approval",
    }
}

/// Evaluates one `tools/call`, writes the decision to the audit log, and says what to do.
pub fn enforce(
    app: &AppState,
    server: &Server,
    caller: &Caller<'_>,
    id: &Value,
    call: ToolCallRef<'_>,
) -> Verdict {
    let policy: Arc<Policy> = server.policy.load_full();
    let tool_call = ToolCall {
        tool: call.name,
        arguments: call.arguments,
        client: caller.client,
        session_key: caller.session_key,
        client_key: caller.client_key,
    };
    let mut decision = match server.limiter.lock() {
        Ok(mut limiter) => evaluate(&policy, &mut limiter, &tool_call, app.now()),
        // A poisoned limiter means a panic elsewhere; fail closed on the limit only.
        Err(poisoned) => evaluate(&policy, &mut poisoned.into_inner(), &tool_call, app.now()),
    };
    let call_id = CALL_IDS.fetch_add(1, Ordering::Relaxed);
    let audit_mode = policy.mode() == Mode::Audit;

    // Without an admin listener no human can decide, so refuse at once instead of
    // holding the call until it times out.
    if decision.action == Action::RequireApproval && !audit_mode && app.admin_url.get().is_none() {
        server.release(decision.slot.take());
        decision.action = Action::Deny;
        decision.kind = Some(DenyKind::ApprovalDenied);
        decision.reason = format!(
            "{} (this call needs a human's approval, and approval is not available: no admin listener is configured)",
            decision.reason
        );
    }

    // Building the record (and hashing the arguments) is skipped when nothing is logged.
    if app.audit.enabled() {
        let mut record = json!({
            "event": "decision",
            "call_id": call_id,
            "server": &*server.name,
            "client": caller.client,
            "session": caller.session,
            "tool": call.name,
            "decision": decision_name(&decision),
            "kind": decision.kind.map(|k| k.as_str()),
            "rule": decision.rule.as_ref().map(|r| r.to_string()).unwrap_or_else(|| "default".into()),
            "reason": &decision.reason,
            "mode": if audit_mode { "audit" } else { "enforce" },
            "arguments_digest": digest(call.arguments),
        });
        if app.audit.includes_arguments() {
            record["arguments"] = call.arguments.clone();
        }
        if let Some(path) = &decision.failing_path {
            record["failing_path"] = json!(path);
        }
        app.audit.write(record);
    }
    let rule_label = decision
        .rule
        .as_ref()
        .map_or_else(|| "default".to_owned(), ToString::to_string);
    app.metrics.decision(
        &server.name,
        call.name,
        policy.names_tool(call.name),
        decision_name(&decision),
        &rule_label,
    );
    tracing::info!(
        tool = call.name,
        decision = decision_name(&decision),
        rule = %decision.rule.as_ref().map(|r| r.to_string()).unwrap_or_else(|| "default".into()),
        reason = %decision.reason,
        audit_mode,
        "tools/call decided"
    );

    match decision.action {
        _ if audit_mode => Verdict::Forward {
            call_id,
            slot: decision.slot,
        },
        Action::Allow => Verdict::Forward {
            call_id,
            slot: decision.slot,
        },
        Action::RequireApproval => Verdict::Hold(Held {
            call_id,
            deny_as: policy.deny_as(),
            decision,
        }),
        Action::Deny => Verdict::Refuse(refusal(&decision, id, caller.era, policy.deny_as())),
    }
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

/// Writes the outcome of a forwarded call.
pub fn record_outcome(
    app: &AppState,
    server: &Server,
    call_id: u64,
    tool: &str,
    latency: std::time::Duration,
    outcome: &str,
) {
    if !app.audit.enabled() {
        return;
    }
    app.audit.write(json!({
        "event": "outcome",
        "call_id": call_id,
        "server": &*server.name,
        "tool": tool,
        "upstream_latency_ms": latency.as_secs_f64() * 1000.0,
        "outcome": outcome,
    }));
}
