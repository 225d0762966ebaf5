//! The `results` response stage (SPEC §9): a call's result checked against the
//! policy's `results` entries that apply to the call (its tool, client and claims).
//! Matches are redacted, or the result withheld, by the policy engine
//! ([`tollgate_policy::ResultRules::apply`]); here they are counted
//! (`tollgate_result_redactions_total{server,detector}`) and handed to the call's
//! outcome record. A call no entry applies to is not looked at: its answer goes on as
//! it came.

use std::sync::Arc;

use serde_json::Value;
use tollgate_policy::{Policy, ResultRules, ResultVerdict};

use super::Frame;
use crate::pipeline::context::{Caller, Context};
use crate::state::Shared;

/// The `results` rules of one answer's calls.
pub struct Results {
    policy: Arc<Policy>,
    caller: Caller,
    server: Arc<str>,
    shared: Arc<Shared>,
}

impl Results {
    /// The rules, when the server's policy has any `results` entry.
    pub(super) fn of(ctx: &Context) -> Option<Results> {
        // Looked at before it is held: most policies have none.
        let policy = ctx.server.policy.load();
        policy.has_result_rules().then(|| Results {
            policy: arc_swap::Guard::into_inner(policy),
            caller: ctx.caller.clone(),
            server: ctx.server.name.clone(),
            shared: ctx.shared().clone(),
        })
    }

    fn rules(&self, tool: &str) -> Option<ResultRules<'_>> {
        let claims = self.caller.identity.as_ref().map(|id| &id.claims);
        self.policy
            .result_rules(tool, self.caller.client.as_deref(), claims)
    }

    /// Whether an entry applies to a call of `tool`.
    pub(super) fn apply_to(&self, tool: &str) -> bool {
        self.rules(tool).is_some()
    }

    /// Checks the result of a call of `tool` (a `CallToolResult`), changing it as the
    /// rules say; `None` when no entry applies.
    pub(super) fn apply(&self, tool: &str, result: &mut Value) -> Option<ResultVerdict> {
        let verdict = self.rules(tool)?.apply(result);
        let metrics = &self.shared.metrics();
        for redaction in &verdict.redactions {
            metrics.result_redactions(&self.server, &redaction.name, redaction.count);
        }
        if let Some(detector) = &verdict.blocked {
            tracing::info!(server = %self.server, tool, detector = %detector, "tool result withheld by policy");
        }
        Some(verdict)
    }
}

/// The rules of a task's tool, for the answer that carries the task's result.
pub struct TaskResult {
    results: Results,
    tool: String,
}

impl TaskResult {
    /// The rules, when an entry applies to calls of `tool`.
    pub(super) fn of(ctx: &Context, tool: String) -> Option<TaskResult> {
        let results = Results::of(ctx)?;
        results
            .apply_to(&tool)
            .then_some(TaskResult { results, tool })
    }

    /// Checks the tool result an answer carries: a `tasks/result` answer's result is
    /// the tool's; a `tasks/get` answer carries it under `result` once the task is done.
    pub(super) fn check(&self, frame: &mut Frame) {
        frame.edit(|message| {
            let Some(result) = message.get_mut("result").filter(|r| r.is_object()) else {
                return ((), false);
            };
            let carried = if result.get("result").is_some_and(Value::is_object) {
                result.get_mut("result")
            } else {
                Some(result)
            };
            let changed = carried
                .and_then(|result| self.results.apply(&self.tool, result))
                .is_some_and(|verdict| verdict.changed);
            ((), changed)
        });
    }
}
