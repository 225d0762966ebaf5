//! Evaluating a call: its rule, the rule's scopes and argument schema, then its
//! rate limit.

use std::time::Duration;

use serde_json::Value;

use super::{Approval, Claims, Decision, DenyKind, Policy, Route, Rule, ToolCall};
use crate::doc::{Action, Mode, Per};
use crate::limiter::{RateLimit, RateLimiter};
use crate::matching::{claims_match, client_matches};

impl Policy {
    /// How a call of `tool` by `client` with `claims` finds its rule: the rule that
    /// decides it (`None`: the default) and the rules with `when: {claims}` it reaches
    /// and passes over on the way because the claims do not match. For review tools,
    /// not the proxy ([`evaluate`] decides; this says which rules the caller's claims
    /// kept out, and which rule a decision depends on before it is made).
    pub fn route(&self, tool: &str, client: Option<&str>, claims: Option<&Claims>) -> Route {
        let mut candidates: Vec<usize> = self.exact.get(tool).cloned().unwrap_or_default();
        candidates.extend(
            self.globs
                .matches(tool)
                .into_iter()
                .filter_map(|g| self.glob_rules.get(g).copied()),
        );
        candidates.sort_unstable();
        let mut route = Route::default();
        for index in candidates {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            if !client_matches(rule.clients.as_deref(), client) {
                continue;
            }
            if claims_match(&rule.claims, claims) {
                route.rule = Some(index);
                break;
            }
            route.claims_skipped.push(index);
        }
        route
    }

    /// The first rule matching `tool` for `client` with `claims`.
    fn matching_rule(
        &self,
        tool: &str,
        client: Option<&str>,
        claims: Option<&Claims>,
    ) -> Option<usize> {
        let applies = |&index: &usize| {
            self.rules.get(index).is_some_and(|rule| {
                client_matches(rule.clients.as_deref(), client)
                    && claims_match(&rule.claims, claims)
            })
        };
        let exact = self
            .exact
            .get(tool)
            .and_then(|indices| indices.iter().copied().find(applies));
        if self.glob_rules.is_empty() {
            return exact;
        }
        // Globs only matter if one comes before the exact match.
        let glob = self
            .globs
            .matches(tool)
            .into_iter()
            .filter_map(|g| self.glob_rules.get(g).copied())
            .filter(|i| exact.is_none_or(|e| *i < e))
            .find(applies);
        glob.or(exact)
    }

    /// Whether some rule names `tool`: by its exact name or by a glob that matches it
    /// (whatever the rule's `clients`). Metrics label only such tools by name, so
    /// made-up names sent by clients all count as `other`.
    pub fn names_tool(&self, tool: &str) -> bool {
        self.exact.contains_key(tool) || self.globs.is_match(tool)
    }

    /// True when every call of `tool` by `client` (with `claims`) is denied whatever
    /// its arguments; such tools are removed from `tools/list`. A rule that needs
    /// scopes hides nothing: the caller may step up. Always false in audit mode.
    pub fn hides_tool(&self, tool: &str, client: Option<&str>, claims: Option<&Claims>) -> bool {
        if self.mode == Mode::Audit {
            return false;
        }
        match self
            .matching_rule(tool, client, claims)
            .and_then(|i| self.rules.get(i))
        {
            Some(rule) => rule.action == Action::Deny,
            None => self.default == Action::Deny,
        }
    }

    /// Decides a call by its rule and argument schema; no rate-limit state.
    pub fn evaluate(&self, call: &ToolCall<'_>) -> Decision {
        let mut decision = Decision {
            action: self.default,
            kind: None,
            tool: call.tool.to_owned(),
            rule: None,
            reason: String::new(),
            failing_path: None,
            retry_after: None,
            approval: None,
            slot: None,
            required_scopes: Vec::new(),
        };
        let Some(rule) = self
            .matching_rule(call.tool, call.client, call.claims)
            .and_then(|i| self.rules.get(i))
        else {
            self.by_default(&mut decision, call.tool);
            return decision;
        };
        decision.action = rule.action;
        decision.reason = rule
            .reason
            .clone()
            .unwrap_or_else(|| rule_reason(rule, call.tool));
        decision.rule = Some(rule.name.clone());
        if rule.action == Action::Deny {
            decision.kind = Some(DenyKind::Deny);
            return decision;
        }
        if refused_for_scopes(rule, call, &mut decision) {
            return decision;
        }
        if let Some(schema) = &rule.arguments
            && refused_for_arguments(schema, call.arguments, &mut decision)
        {
            return decision;
        }
        if rule.action == Action::RequireApproval {
            decision.approval = Some(rule.approval.clone());
        }
        decision
    }

    /// The decision of a call no rule matches: the policy's default.
    fn by_default(&self, decision: &mut Decision, tool: &str) {
        decision.reason = match self.default {
            Action::Deny => format!("no rule allows `{tool}`, and the policy's default is deny"),
            Action::Allow => format!("no rule matches `{tool}`; the policy's default is allow"),
            Action::RequireApproval => {
                format!("no rule matches `{tool}`; the policy's default is to ask a human")
            }
        };
        decision.kind = (self.default == Action::Deny).then_some(DenyKind::Deny);
        decision.approval = (self.default == Action::RequireApproval).then(Approval::default);
    }

    fn rate_limit_of(&self, decision: &Decision) -> Option<&RateLimit> {
        self.rules
            .get(decision.rule.as_ref()?.index)?
            .rate_limit
            .as_ref()
    }
}

/// Why `rule` decides a call of `tool` as it does, when it gives no `reason`.
fn rule_reason(rule: &Rule, tool: &str) -> String {
    match rule.action {
        // The common case, once per allowed call: built without `format!`.
        Action::Allow => {
            let mut reason = String::with_capacity(tool.len() + rule.name.label.len() + 18);
            reason.push('`');
            reason.push_str(tool);
            reason.push_str("` is allowed by ");
            reason.push_str(&rule.name.label);
            reason
        }
        Action::Deny => format!("`{tool}` is denied by the policy"),
        Action::RequireApproval => format!("`{tool}` needs a human's approval"),
    }
}

/// Refuses a call whose token lacks a scope `rule` needs; whether it did.
fn refused_for_scopes(rule: &Rule, call: &ToolCall<'_>, decision: &mut Decision) -> bool {
    let missing: Vec<&str> = rule
        .scopes
        .iter()
        .filter(|needed| !call.scopes.contains(needed))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return false;
    }
    decision.action = Action::Deny;
    decision.kind = Some(DenyKind::InsufficientScope);
    decision.reason = format!(
        "`{}` needs the scope `{}`, which the caller's token does not carry; ask the authorization server for it",
        call.tool,
        missing.join(" ")
    );
    decision.required_scopes = rule.scopes.clone();
    true
}

/// Refuses a call whose arguments `schema` does not accept; whether it did.
fn refused_for_arguments(
    schema: &jsonschema::Validator,
    arguments: &Value,
    decision: &mut Decision,
) -> bool {
    let empty = Value::Object(serde_json::Map::new());
    let arguments = if arguments.is_null() {
        &empty
    } else {
        arguments
    };
    // `is_valid` builds no errors: the error is looked for only when there is one.
    if schema.is_valid(arguments) {
        return false;
    }
    let Some(error) = schema.iter_errors(arguments).next() else {
        return false;
    };
    let path = error.instance_path().to_string();
    let shown = if path.is_empty() {
        "/".to_owned()
    } else {
        path.clone()
    };
    decision.action = Action::Deny;
    decision.kind = Some(DenyKind::Arguments);
    decision.reason = format!("argument `{shown}` is not allowed: {error}");
    decision.failing_path = Some(shown);
    true
}

/// The full decision: the rule and its argument schema, then the rule's rate
/// limit for calls the policy would let through (allow or require_approval).
/// Over the limit, the call is denied with kind `rate_limit` and a retry time.
pub fn evaluate(
    policy: &Policy,
    limiter: &mut RateLimiter,
    call: &ToolCall<'_>,
    now: Duration,
) -> Decision {
    let mut decision = policy.evaluate(call);
    let Some((limit, key)) = limit_of(policy, &decision, call) else {
        return decision;
    };
    match limiter.try_acquire(limit, key, now) {
        Ok(slot) => decision.slot = Some(slot),
        Err(wait) => over_limit(&mut decision, limit, key, wait),
    }
    decision
}

/// The rate limit a call the policy would let through must fit in, and the key it
/// is counted under (its session, its client, or everyone's): what a limiter kept
/// elsewhere (shared by several processes) needs to take the slot itself.
pub fn limit_of<'p, 'c>(
    policy: &'p Policy,
    decision: &Decision,
    call: &ToolCall<'c>,
) -> Option<(&'p RateLimit, &'c str)> {
    if decision.action == Action::Deny {
        return None;
    }
    let limit = policy.rate_limit_of(decision)?;
    let key = match limit.per {
        Per::Session => call.session_key,
        Per::Client => call.client_key,
        Per::User => call.user_key,
        Per::Global => "",
    };
    Some((limit, key))
}

/// Turns a decision into the refusal of a call over `limit`, counted under `key`,
/// free again in `wait`. The reason says what was counted: the rule's `per`, and the
/// key when it tells more (an address, a client's or user's name, see [`counted_on`]).
pub fn over_limit(decision: &mut Decision, limit: &RateLimit, key: &str, wait: Duration) {
    decision.action = Action::Deny;
    decision.kind = Some(DenyKind::RateLimit);
    decision.approval = None;
    let per = match limit.per {
        Per::Session => "session",
        Per::Client => "client",
        Per::User => "user",
        Per::Global => "everyone",
    };
    decision.reason = format!(
        "rate limit of {} calls per {}s per {per} exceeded",
        limit.max,
        limit.window.as_secs()
    );
    if let Some(counted) = counted_on(key) {
        decision.reason.push_str(" (counted on ");
        decision.reason.push_str(&counted);
        decision.reason.push(')');
    }
    decision.retry_after = Some(wait);
}

/// What a rate-limit key names, in words: the proxy's keys are `session:<id>`,
/// `client:<name>`, `oauth-client:<id>`, `user:<sub>` and `peer:<address>` (a caller
/// without a session or credentials is counted by its address, an IPv6 one by its
/// /64). A session is "this session" (its id is the caller's own secret); other keys
/// (the global one, `tollgate test`'s names) add nothing.
pub fn counted_on(key: &str) -> Option<String> {
    let (kind, value) = key.split_once(':')?;
    let what = match kind {
        "session" => return Some("this session".to_owned()),
        "peer" => "address",
        "client" => "client",
        "oauth-client" => "OAuth client",
        "user" => "user",
        _ => return None,
    };
    Some(format!("{what} {value}"))
}
