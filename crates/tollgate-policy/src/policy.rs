//! A compiled policy and its decisions: validation and compilation (`compile`),
//! evaluation of a call (`decide`).

use hashbrown::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use globset::GlobSet;
use serde_json::{Value, json};

use crate::doc::{Action, ApprovalVia, DenyAs, Mode};
use crate::error::PolicyWarning;
use crate::limiter::{RateLimit, Slot};
pub use crate::matching::Claims;
use crate::results::{ResultEntryInfo, ResultRules, Results};

mod compile;
mod decide;

pub use decide::{counted_on, evaluate, limit_of, over_limit};

/// Default time a human has to approve.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

/// Default time an approved call may be retried after the decision.
pub const DEFAULT_APPROVAL_VALID_FOR: Duration = Duration::from_secs(600);

/// Approval settings of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// How long a human has.
    pub timeout: Duration,
    /// How long one request waits before it is told to retry; `None`: the proxy's default.
    pub wait: Option<Duration>,
    /// How long after the decision an approved call may be retried (once).
    pub valid_for: Duration,
    /// Where the human is asked.
    pub via: ApprovalVia,
}

impl Default for Approval {
    fn default() -> Self {
        Approval {
            timeout: DEFAULT_APPROVAL_TIMEOUT,
            wait: None,
            valid_for: DEFAULT_APPROVAL_VALID_FOR,
            via: ApprovalVia::Queue,
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyKind {
    /// A rule (or the default) denies it.
    Deny,
    /// Its arguments fail the rule's schema.
    Arguments,
    /// Over the rule's rate limit.
    RateLimit,
    /// A human denied it.
    ApprovalDenied,
    /// No human decided in time.
    ApprovalTimeout,
    /// The rule needs OAuth scopes the caller's token does not carry.
    InsufficientScope,
    /// The tool's definition differs from the tool lock, or the lock does not name it.
    ToolChanged,
}

impl DenyKind {
    /// The wire name (docs/errors.md).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyKind::Deny => "deny",
            DenyKind::Arguments => "arguments",
            DenyKind::RateLimit => "rate_limit",
            DenyKind::ApprovalDenied => "approval_denied",
            DenyKind::ApprovalTimeout => "approval_timeout",
            DenyKind::InsufficientScope => "insufficient_scope",
            DenyKind::ToolChanged => "tool_changed",
        }
    }
}

/// The rule that decided. Made once per rule when the policy is compiled, and
/// shared by the decisions it makes: every call's decision, audit record and metric
/// names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// 0-based position in `rules:`.
    pub index: usize,
    /// Its `tool` pattern.
    pub tool: Arc<str>,
    label: Arc<str>,
}

impl RuleRef {
    /// The rule at `index` of `rules:`, whose `tool` is `tool`.
    pub fn new(index: usize, tool: &str) -> RuleRef {
        RuleRef {
            index,
            tool: tool.into(),
            label: format!("rules[{index}] ({tool})").into(),
        }
    }

    /// `rules[<index>] (<tool>)`, as `Display` has it.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A tool call as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ToolCall<'a> {
    /// `params.name`.
    pub tool: &'a str,
    /// `params.arguments` (`Null` when absent).
    pub arguments: &'a Value,
    /// The authenticated client, for rules with `clients:`.
    pub client: Option<&'a str>,
    /// Key of `per: session` limits.
    pub session_key: &'a str,
    /// Key of `per: client` limits.
    pub client_key: &'a str,
    /// Key of `per: user` limits.
    pub user_key: &'a str,
    /// The caller's OAuth token claims, for rules with `when: {claims}`; `None`
    /// without a token.
    pub claims: Option<&'a Claims>,
    /// The scopes of the caller's token, for rules with `scopes`.
    pub scopes: &'a [String],
}

/// What the policy decided about one call. Not `Clone`: it may own a rate-limit slot.
#[derive(Debug)]
pub struct Decision {
    /// The outcome.
    pub action: Action,
    /// Why it was refused, when `action` is `Deny`.
    pub kind: Option<DenyKind>,
    /// The tool called.
    pub tool: String,
    /// The deciding rule; `None` means the default.
    pub rule: Option<RuleRef>,
    /// Human-readable reason.
    pub reason: String,
    /// JSON pointer of the argument that failed the schema.
    pub failing_path: Option<String>,
    /// When a rate-limited call may be retried.
    pub retry_after: Option<Duration>,
    /// For `RequireApproval`.
    pub approval: Option<Approval>,
    /// The rate-limit slot this call took.
    pub slot: Option<Slot>,
    /// With kind `insufficient_scope`: every scope the deciding rule needs.
    pub required_scopes: Vec<String>,
}

impl Decision {
    /// `_meta["dev.tollgate/decision"]` (docs/errors.md).
    pub fn meta_json(&self) -> Value {
        let kind = match (self.action, self.kind) {
            (_, Some(kind)) => kind.as_str(),
            (Action::Allow, None) => "allow",
            (Action::RequireApproval, None) => "require_approval",
            (Action::Deny, None) => "deny",
        };
        let mut meta = json!({
            "kind": kind,
            "tool": self.tool,
            "rule": self.rule.as_ref().map_or_else(|| "default".to_owned(), ToString::to_string),
            "reason": self.reason,
        });
        if let Some(wait) = self.retry_after {
            meta["retry_after_ms"] = json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        }
        meta
    }
}

#[derive(Debug)]
struct Rule {
    /// Its position in the file's `rules:` (compiled rules skip none, but errors need
    /// it) and `tool` pattern, as decisions name them.
    name: RuleRef,
    /// 1-based line and column of its `tool:` (for warnings).
    at: (usize, usize),
    clients: Option<Vec<String>>,
    /// `when.claims`: each claim (by name) and the values one of which it must match.
    claims: Vec<(String, Vec<Value>)>,
    scopes: Vec<String>,
    action: Action,
    reason: Option<String>,
    rate_limit: Option<RateLimit>,
    approval: Approval,
    arguments: Option<jsonschema::Validator>,
}

/// How a call finds its rule ([`Policy::route`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// The index of the rule that decides; `None`: the default.
    pub rule: Option<usize>,
    /// The rules with `when: {claims}` passed over because the claims do not match.
    pub claims_skipped: Vec<usize>,
}

/// A rule as review tools see it ([`Policy::rules`]).
#[derive(Debug, Clone, Copy)]
pub struct RuleInfo<'p> {
    /// Its index and `tool` pattern, as decisions name it.
    pub rule: &'p RuleRef,
    /// 1-based line of its `tool:` in the policy file.
    pub line: usize,
    /// 1-based column of its `tool:`.
    pub column: usize,
    /// What it decides.
    pub action: Action,
    /// Whether it has an `arguments` schema (a call can fail it).
    pub arguments: bool,
    /// Whether it has a `rate_limit` (a call can be over it).
    pub rate_limit: bool,
    /// Whether it has `when: {claims}` (a caller's claims can keep it out).
    pub claims: bool,
    /// Whether it needs `scopes` (a caller's token can lack them).
    pub scopes: bool,
    /// The earlier rule that decides every call this one matches, so this one never
    /// decides (`tollgate validate` warns about it).
    pub shadowed_by: Option<&'p RuleRef>,
}

/// A validated, compiled policy. Immutable; share it in an `Arc`.
#[derive(Debug)]
pub struct Policy {
    default: Action,
    mode: Mode,
    deny_as: DenyAs,
    rules: Vec<Rule>,
    /// Exact tool names → indices of the rules with that name, in order (foldhash:
    /// a call's tool name is hashed on every call; only the policy inserts).
    exact: HashMap<String, Vec<usize>>,
    /// Glob rules, matched together; `glob_rules[i]` is the rule of glob `i`.
    globs: GlobSet,
    glob_rules: Vec<usize>,
    /// Valid but suspicious: rules that can never decide.
    warnings: Vec<PolicyWarning>,
    /// `(rule, the earlier rule that decides every call it matches)`, as warned.
    shadowed: Vec<(usize, usize)>,
    /// `results:`, when there are entries.
    results: Option<Results>,
}

impl Policy {
    /// Whether the policy has `results:` entries (when not, no result needs a look).
    pub fn has_result_rules(&self) -> bool {
        self.results.is_some()
    }

    /// The `results:` entries that apply to a call of `tool` by `client` with `claims`
    /// (tool name or glob, `clients`, `when`), or `None` when none does: then the
    /// answer's bytes can be relayed untouched.
    pub fn result_rules(
        &self,
        tool: &str,
        client: Option<&str>,
        claims: Option<&Claims>,
    ) -> Option<ResultRules<'_>> {
        self.results.as_ref()?.rules_for(tool, client, claims)
    }

    /// Every `results:` entry, in file order.
    pub fn result_entries(&self) -> impl Iterator<Item = &ResultEntryInfo> {
        self.results.iter().flat_map(|results| results.entries())
    }

    /// Valid but almost certainly unintended: each rule that can never decide because
    /// an earlier rule matches every call it matches (both locations named).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// Whether some call can be held for a human in the admin queue (a rule or the
    /// default says `require_approval` without `via: elicitation`), so an admin listener
    /// is needed to approve it.
    pub fn uses_approval_queue(&self) -> bool {
        self.default == Action::RequireApproval
            || self.rules.iter().any(|rule| {
                rule.action == Action::RequireApproval && rule.approval.via == ApprovalVia::Queue
            })
    }

    /// `enforce` or `audit`.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How refusals are answered.
    pub fn deny_as(&self) -> DenyAs {
        self.deny_as
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The `default` decision (no rule matches).
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The rule that decides every call no earlier rule takes (`tool: "*"` for every
    /// client, without `when`), so the default never decides; `None` when it can.
    pub fn default_shadowed_by(&self) -> Option<&RuleRef> {
        self.rules
            .iter()
            .find(|rule| {
                rule.clients.is_none()
                    && rule.claims.is_empty()
                    && !rule.name.tool.is_empty()
                    && rule.name.tool.chars().all(|c| c == '*')
            })
            .map(|rule| &rule.name)
    }

    /// Each rule as the review tools see it (`tollgate test --coverage`, `tollgate
    /// diff`): where it is, what it can decide, and whether it can decide at all.
    pub fn rules(&self) -> impl Iterator<Item = RuleInfo<'_>> {
        (0..self.rules.len()).filter_map(|index| self.rule(index))
    }

    /// `rules[index]` as the review tools see it.
    pub fn rule(&self, index: usize) -> Option<RuleInfo<'_>> {
        let rule = self.rules.get(index)?;
        Some(RuleInfo {
            rule: &rule.name,
            line: rule.at.0,
            column: rule.at.1,
            action: rule.action,
            arguments: rule.arguments.is_some(),
            rate_limit: rule.rate_limit.is_some(),
            claims: !rule.claims.is_empty(),
            scopes: !rule.scopes.is_empty(),
            shadowed_by: self
                .shadowed
                .iter()
                .find(|(later, _)| *later == index)
                .and_then(|(_, by)| self.rules.get(*by))
                .map(|by| &by.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RuleRef;

    #[test]
    fn rule_labels_read_as_display_prints_them() {
        for index in [0, 7, 9, 10, 49, 100, 999, 1000, 123_456] {
            let rule = RuleRef::new(index, "describe_*");
            assert_eq!(rule.label(), format!("rules[{index}] (describe_*)"));
            assert_eq!(rule.label(), rule.to_string());
        }
    }
}
