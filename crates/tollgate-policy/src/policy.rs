//! Validation, compilation and evaluation.

use hashbrown::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde_json::{Value, json};

use crate::doc::{Action, ApprovalVia, DenyAs, Mode, Per, PolicyDoc, RuleDoc, parse_window};
use crate::error::{PolicyError, PolicyErrors, PolicyWarning};
use crate::limiter::{RateLimit, RateLimiter, Slot};
pub use crate::matching::Claims;
use crate::matching::{Checker, claims_match, client_matches, compile_claims, is_glob};
use crate::results::{ResultEntryInfo, ResultRules, Results};
use crate::yaml;

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

/// Compiles `rules:` (raw items, with their spans when written in block style),
/// reporting every problem to `check`.
fn compile_rules(
    check: &mut Checker<'_>,
    spans: Option<&[yaml::Span]>,
    raw: Vec<yaml::RawValue>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let span = spans.and_then(|s| s.get(index).copied());
        let parsed: Result<RuleDoc, PolicyError> = match span {
            Some(span) => yaml::item(&yaml::item_text(check.source, span), check.origin),
            None => yaml::from_value(raw).map_err(|message| PolicyError {
                origin: check.origin.to_owned(),
                line: 1,
                column: 1,
                message: format!("rules[{index}]: {message}"),
            }),
        };
        match parsed {
            Ok(rule) => {
                if let Some(rule) = compile_rule(check, span, index, rule) {
                    rules.push(rule);
                }
            }
            Err(error) => check.errors.push(error),
        }
    }
    rules
}

/// The rules by tool: exact names to their rules, and the globs (to build) with
/// the rule each stands for.
fn index_tools(
    check: &mut Checker<'_>,
    spans: Option<&[yaml::Span]>,
    rules: &[Rule],
) -> (HashMap<String, Vec<usize>>, GlobSetBuilder, Vec<usize>) {
    let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
    let mut globs = GlobSetBuilder::new();
    let mut glob_rules = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if !is_glob(&rule.name.tool) {
            exact
                .entry(rule.name.tool.to_string())
                .or_default()
                .push(index);
            continue;
        }
        match GlobBuilder::new(&rule.name.tool)
            .literal_separator(false)
            .build()
        {
            Ok(glob) => {
                globs.add(glob);
                glob_rules.push(index);
            }
            Err(err) => {
                let span = spans.and_then(|s| s.get(rule.name.index).copied());
                check.at(
                    span,
                    "tool",
                    format!(
                        "rules[{}].tool: `{}` is not a valid glob: {}",
                        rule.name.index,
                        rule.name.tool,
                        err.kind()
                    ),
                );
            }
        }
    }
    (exact, globs, glob_rules)
}

impl Policy {
    /// Parses, validates (collecting every error) and compiles a policy. Pure.
    pub fn from_yaml(source: &str, origin: &str) -> Result<Policy, PolicyErrors> {
        let (doc, top_level_errors) = yaml::document(source, origin, lenient_doc)?;
        let mut check = Checker {
            source,
            origin,
            errors: top_level_errors,
        };
        if doc.version != 1 {
            check.at(
                Some(yaml::Span {
                    start: 0,
                    end: source.lines().count(),
                }),
                "version",
                format!("unsupported version {}: expected `version: 1`", doc.version),
            );
        }
        let spans = yaml::rule_spans(source).filter(|spans| spans.len() == doc.rules.len());
        let rules = compile_rules(&mut check, spans.as_deref(), doc.rules);
        let (exact, globs, glob_rules) = index_tools(&mut check, spans.as_deref(), &rules);
        let results = crate::results::compile(&mut check, doc.results, doc.mode);
        let globs = match globs.build() {
            Ok(set) => set,
            Err(err) => {
                check.at(
                    None,
                    "rules",
                    format!("the tool globs do not compile together: {err}"),
                );
                GlobSet::empty()
            }
        };
        if !check.errors.is_empty() {
            check.errors.sort_by_key(|e| (e.line, e.column));
            return Err(PolicyErrors {
                errors: check.errors,
            });
        }
        let shadowed = shadowed_rules(&rules);
        let warnings = shadow_warnings(&rules, &shadowed, origin);
        Ok(Policy {
            default: doc.default,
            mode: doc.mode,
            deny_as: doc.deny_as,
            rules,
            exact,
            globs,
            glob_rules,
            warnings,
            shadowed,
            results,
        })
    }

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

/// The top level of a policy whose top level has errors (already reported): the
/// rules, if they are a list, so they are checked too; defaults for the rest.
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

fn lenient_doc(raw: &yaml::RawValue) -> PolicyDoc<yaml::RawValue> {
    let list = |key: &str| match raw.get(key) {
        Some(yaml::RawValue::Sequence(items)) => items.clone(),
        _ => Vec::new(),
    };
    let rules = list("rules");
    let results = list("results");
    PolicyDoc {
        // A bad `version` was reported with the rest; do not report it twice.
        version: 1,
        default: Action::Deny,
        mode: Mode::default(),
        deny_as: DenyAs::default(),
        rules,
        results,
    }
}

fn shadowed_rules(rules: &[Rule]) -> Vec<(usize, usize)> {
    let shapes: Vec<crate::shadow::Shape<'_>> = rules
        .iter()
        .map(|rule| crate::shadow::Shape {
            tool: &rule.name.tool,
            clients: rule.clients.as_deref(),
            conditional: !rule.claims.is_empty(),
        })
        .collect();
    crate::shadow::shadowed(&shapes)
}

fn shadow_warnings(
    rules: &[Rule],
    shadowed: &[(usize, usize)],
    origin: &str,
) -> Vec<PolicyWarning> {
    shadowed
        .iter()
        .filter_map(|&(later, by)| {
            let (later, by) = (rules.get(later)?, rules.get(by)?);
            let arguments = if by.arguments.is_some() {
                format!(
                    " (a call failing rules[{}]'s `arguments` is denied there, not passed on)",
                    by.name.index
                )
            } else {
                String::new()
            };
            Some(PolicyWarning {
                origin: origin.to_owned(),
                line: later.at.0,
                column: later.at.1,
                message: format!(
                    "rules[{}] (`{}`) can never decide: rules[{}] (`{}`) at {origin}:{}:{} comes first and matches every call it matches{arguments}; remove it or move it above",
                    later.name.index, later.name.tool, by.name.index, by.name.tool, by.at.0, by.at.1
                ),
            })
        })
        .collect()
}

/// A rule's `rate_limit`, checked.
fn compile_rate_limit(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: &RuleDoc,
) -> Option<RateLimit> {
    match &doc.rate_limit {
        None => None,
        Some(_) if doc.action == Action::Deny => {
            check.at(span, "rate_limit", format!("rules[{index}].rate_limit: a deny rule lets nothing through, so a rate limit has no effect; remove it"));
            None
        }
        Some(limit) => {
            if limit.max == 0 {
                check.at(span, "max", format!("rules[{index}].rate_limit.max: must be at least 1 (use `action: deny` to refuse every call)"));
            }
            match parse_window(&limit.window) {
                Ok(window) => Some(RateLimit {
                    id: format!(
                        "{}|{:?}|{:?}|{}|{}|{:?}",
                        doc.tool,
                        doc.clients,
                        doc.when,
                        limit.max,
                        window.as_secs(),
                        limit.per
                    )
                    .into(),
                    max: limit.max,
                    window,
                    per: limit.per,
                }),
                Err(message) => {
                    check.at(
                        span,
                        "window",
                        format!("rules[{index}].rate_limit.window: {message}"),
                    );
                    None
                }
            }
        }
    }
}

/// A rule's `approval` settings, checked (the defaults where it has none).
fn compile_approval(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: &RuleDoc,
) -> Approval {
    let mut approval = Approval::default();
    if let Some(doc_approval) = &doc.approval {
        if doc.action != Action::RequireApproval {
            check.at(
                span,
                "approval",
                format!("rules[{index}].approval: only applies to `action: require_approval`"),
            );
        }
        approval.via = doc_approval.via;
        let mut duration = |value: &Option<crate::doc::Duration>, key: &str| {
            let parsed = parse_window(value.as_ref()?);
            parsed
                .map_err(|message| {
                    check.at(
                        span,
                        key,
                        format!("rules[{index}].approval.{key}: {message}"),
                    );
                })
                .ok()
        };
        if let Some(timeout) = duration(&doc_approval.timeout, "timeout") {
            approval.timeout = timeout;
        }
        approval.wait = duration(&doc_approval.wait, "wait");
        if let Some(valid_for) = duration(&doc_approval.valid_for, "valid_for") {
            approval.valid_for = valid_for;
        }
    }
    approval
}

fn compile_rule(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: RuleDoc,
) -> Option<Rule> {
    let before = check.errors.len();
    if doc.tool.is_empty() {
        check.at(span, "tool", format!("rules[{index}].tool: must not be empty: use an exact name or a glob like `describe_*`"));
    }
    if matches!(&doc.clients, Some(c) if c.is_empty()) {
        check.at(span, "clients", format!("rules[{index}].clients: an empty list matches no one; remove it to match every client"));
    }
    let claims = compile_claims(check, span, &format!("rules[{index}]"), doc.when.as_ref());
    let scopes = doc.scopes.clone().unwrap_or_default();
    if matches!(&doc.scopes, Some(s) if s.is_empty())
        || scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace) || s.contains(['"', '\\']))
    {
        check.at(span, "scopes", format!("rules[{index}].scopes: list one or more scope names, each without spaces or quotes; remove it to need none"));
    }
    if !scopes.is_empty() && doc.action == Action::Deny {
        check.at(span, "scopes", format!("rules[{index}].scopes: a deny rule lets nothing through, so scopes have no effect; remove them"));
    }
    let rate_limit = compile_rate_limit(check, span, index, &doc);
    let approval = compile_approval(check, span, index, &doc);
    let arguments = match &doc.arguments {
        None => None,
        Some(schema) => match jsonschema::options().build(schema) {
            Ok(validator) => Some(validator),
            Err(err) => {
                check.at(
                    span,
                    "arguments",
                    format!("rules[{index}].arguments: not a valid JSON Schema: {err}"),
                );
                None
            }
        },
    };
    if check.errors.len() > before {
        return None;
    }
    let at = span
        .and_then(|s| yaml::find_key(check.source, s, "tool").or(Some((s.start + 1, 1))))
        .unwrap_or((1, 1));
    Some(Rule {
        name: RuleRef::new(index, &doc.tool),
        at,
        clients: doc.clients,
        claims,
        scopes,
        action: doc.action,
        reason: doc.reason,
        rate_limit,
        approval,
        arguments,
    })
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
