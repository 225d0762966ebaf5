//! `tollgate test --coverage`: which outcomes of each rule (and of the default) the
//! cases exercised, and which none did.
//!
//! An item is a rule, the default or a `results` entry. Each item has the outcomes it
//! can produce: a rule its
//! action (allow, hold or deny), an argument-schema failure if it has `arguments`, a
//! rate-limit refusal if it has `rate_limit`, a claims mismatch if it has `when`
//! (a call it would take, kept out by the caller's claims) and a scope refusal if
//! it has `scopes`; the default its action; a `results` entry a redaction if it
//! redacts and a withheld result if it blocks. A rule that can never decide (an earlier
//! rule matches every call it matches; `tollgate validate` warns) is listed as
//! unreachable and its outcomes are not counted: no case can exercise them, and
//! `validate --strict` is the check that fails on it. So is the default after a
//! rule that takes every call (`tool: "*"` for everyone).

use serde_json::{Value, json};
use tollgate_policy::{Action, Decision, DenyKind, Policy, ToolCall};

/// What coverage is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// `rules[i]`.
    Rule(usize),
    /// The policy's `default`.
    Default,
    /// `results[i]`.
    Result(usize),
}

/// One thing an item can do to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Let through.
    Allow,
    /// Held for a human (`require_approval`).
    Hold,
    /// Refused by the rule's (or the default's) `deny`.
    Deny,
    /// Refused: the arguments fail the rule's schema.
    Arguments,
    /// Refused: over the rule's rate limit.
    RateLimit,
    /// Passed over: the caller's claims do not match the rule's `when`.
    Claims,
    /// Refused: the caller's token lacks the rule's scopes.
    Scopes,
    /// A result had something a `results` entry redacts.
    Redact,
    /// A result was withheld: it had something a `results` entry blocks on.
    Block,
}

impl Outcome {
    const ALL: [Outcome; 9] = [
        Outcome::Allow,
        Outcome::Hold,
        Outcome::Deny,
        Outcome::Arguments,
        Outcome::RateLimit,
        Outcome::Claims,
        Outcome::Scopes,
        Outcome::Redact,
        Outcome::Block,
    ];

    /// The name the report uses.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Hold => "hold",
            Outcome::Deny => "deny",
            Outcome::Arguments => "arguments",
            Outcome::RateLimit => "rate_limit",
            Outcome::Claims => "claims",
            Outcome::Scopes => "scopes",
            Outcome::Redact => "redact",
            Outcome::Block => "block",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u8)
    }

    fn of_action(action: Action) -> Outcome {
        match action {
            Action::Allow => Outcome::Allow,
            Action::RequireApproval => Outcome::Hold,
            Action::Deny => Outcome::Deny,
        }
    }

    /// What a decision did, as its deciding rule's (or the default's) outcome.
    pub fn of(decision: &Decision) -> Outcome {
        match decision.kind {
            Some(DenyKind::Arguments) => Outcome::Arguments,
            Some(DenyKind::RateLimit) => Outcome::RateLimit,
            Some(DenyKind::InsufficientScope) => Outcome::Scopes,
            _ => Outcome::of_action(decision.action),
        }
    }
}

/// A set of outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Outcomes(u16);

impl Outcomes {
    fn insert(&mut self, outcome: Outcome) {
        self.0 |= outcome.bit();
    }
    fn contains(self, outcome: Outcome) -> bool {
        self.0 & outcome.bit() != 0
    }
    fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    fn iter(self) -> impl Iterator<Item = Outcome> {
        Outcome::ALL.into_iter().filter(move |o| self.contains(*o))
    }
    fn names(self) -> Vec<&'static str> {
        self.iter().map(Outcome::name).collect()
    }
}

/// One item's coverage.
#[derive(Debug)]
struct Entry {
    item: Item,
    /// `rules[i] (tool)` or `default (deny)`.
    label: String,
    /// `file:line` of a rule's `tool:`.
    at: Option<String>,
    /// What it can do.
    possible: Outcomes,
    /// What the cases made it do.
    exercised: Outcomes,
    /// The rule that decides every call it matches, when it can never decide.
    unreachable_by: Option<String>,
}

/// The coverage of one policy by the cases run against it (one or more test files).
#[derive(Debug)]
pub struct Coverage {
    /// The policy file, as the test file names it.
    pub policy: String,
    entries: Vec<Entry>,
}

impl Coverage {
    /// Nothing exercised yet, for `policy` read from `origin`.
    pub fn new(policy: &Policy, origin: &str) -> Coverage {
        let mut entries: Vec<Entry> = policy
            .rules()
            .map(|rule| {
                let mut possible = Outcomes::default();
                possible.insert(Outcome::of_action(rule.action));
                for (has, outcome) in [
                    (rule.arguments, Outcome::Arguments),
                    (rule.rate_limit, Outcome::RateLimit),
                    (rule.claims, Outcome::Claims),
                    (rule.scopes, Outcome::Scopes),
                ] {
                    if has {
                        possible.insert(outcome);
                    }
                }
                Entry {
                    item: Item::Rule(rule.rule.index),
                    label: rule.rule.to_string(),
                    at: Some(format!("{origin}:{}", rule.line)),
                    possible,
                    exercised: Outcomes::default(),
                    unreachable_by: rule.shadowed_by.map(ToString::to_string),
                }
            })
            .collect();
        for entry in policy.result_entries() {
            let mut possible = Outcomes::default();
            if !entry.redact.is_empty() {
                possible.insert(Outcome::Redact);
            }
            if !entry.block.is_empty() {
                possible.insert(Outcome::Block);
            }
            entries.push(Entry {
                item: Item::Result(entry.index),
                label: entry.label.clone(),
                at: Some(format!("{origin}:{}", entry.line)),
                possible,
                exercised: Outcomes::default(),
                unreachable_by: None,
            });
        }
        let default = Outcome::of_action(policy.default_action());
        let mut possible = Outcomes::default();
        possible.insert(default);
        entries.push(Entry {
            item: Item::Default,
            label: format!("default ({})", default.name()),
            at: None,
            possible,
            exercised: Outcomes::default(),
            unreachable_by: policy.default_shadowed_by().map(ToString::to_string),
        });
        Coverage {
            policy: origin.to_owned(),
            entries,
        }
    }

    fn entry(&mut self, item: Item) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.item == item)
    }

    /// Counts what `decision` (made by `policy` for `call`, before any grant) exercised:
    /// its rule's (or the default's) outcome, and the `when` of every rule the
    /// caller's claims kept out on the way.
    pub fn record(&mut self, policy: &Policy, call: &ToolCall<'_>, decision: &Decision) {
        let item = decision
            .rule
            .as_ref()
            .map_or(Item::Default, |r| Item::Rule(r.index));
        if let Some(entry) = self.entry(item) {
            entry.exercised.insert(Outcome::of(decision));
        }
        for index in policy
            .route(call.tool, call.client, call.claims)
            .claims_skipped
        {
            if let Some(entry) = self.entry(Item::Rule(index)) {
                entry.exercised.insert(Outcome::Claims);
            }
        }
    }

    /// Counts what the `results` entries applying to `call` did to its result
    /// (`verdict`, from [`tollgate_policy::ResultRules::apply`]): a redaction for each
    /// entry that redacts a detector found, a withheld result for the entry that
    /// blocks on the detector that withheld it.
    pub fn record_result(
        &mut self,
        policy: &Policy,
        call: &ToolCall<'_>,
        verdict: &tollgate_policy::ResultVerdict,
    ) {
        let Some(rules) = policy.result_rules(call.tool, call.client, call.claims) else {
            return;
        };
        let mut hits = Vec::new();
        for entry in rules.entries() {
            if verdict
                .redactions
                .iter()
                .any(|found| entry.redact.contains(&found.name))
            {
                hits.push((entry.index, Outcome::Redact));
            }
            if verdict
                .blocked
                .as_ref()
                .is_some_and(|name| entry.block.contains(name))
            {
                hits.push((entry.index, Outcome::Block));
            }
        }
        for (index, outcome) in hits {
            if let Some(entry) = self.entry(Item::Result(index)) {
                entry.exercised.insert(outcome);
            }
        }
    }

    /// Outcomes exercised and outcomes that can be, over the reachable items.
    pub fn counts(&self) -> (usize, usize) {
        self.entries
            .iter()
            .filter(|e| e.unreachable_by.is_none())
            .fold((0, 0), |(covered, total), e| {
                (
                    covered + Outcomes(e.exercised.0 & e.possible.0).len(),
                    total + e.possible.len(),
                )
            })
    }

    /// Percent of the reachable outcomes exercised (100 when there are none).
    pub fn percent(&self) -> f64 {
        let (covered, total) = self.counts();
        if total == 0 {
            100.0
        } else {
            covered as f64 * 100.0 / total as f64
        }
    }

    /// [`Coverage::percent`] to one decimal, rounded down: never shown as 100.0 when
    /// an outcome is missing.
    pub fn shown_percent(&self) -> f64 {
        (self.percent() * 10.0).floor() / 10.0
    }

    /// The report for people: a line per item, what its cases exercised and what none did.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let (covered, total) = self.counts();
        let mut out = format!(
            "coverage of {}: {covered} of {total} outcomes exercised ({:.1}%)\n",
            self.policy,
            self.shown_percent()
        );
        for entry in &self.entries {
            let at = entry
                .at
                .as_deref()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default();
            let _ = match &entry.unreachable_by {
                Some(by) => writeln!(
                    out,
                    "  unreachable {}{at}: {by} decides every call it matches (not counted)",
                    entry.label
                ),
                None => {
                    let missing = Outcomes(entry.possible.0 & !entry.exercised.0);
                    let exercised = Outcomes(entry.possible.0 & entry.exercised.0);
                    let list = |o: Outcomes| {
                        if o.len() == 0 {
                            "-".to_owned()
                        } else {
                            o.names().join(", ")
                        }
                    };
                    let status = if missing.len() == 0 { "ok" } else { "MISSING" };
                    let mut line = format!(
                        "  {status:11} {}{at}: exercised {}",
                        entry.label,
                        list(exercised)
                    );
                    if missing.len() > 0 {
                        let _ = write!(line, "; never: {}", list(missing));
                    }
                    writeln!(out, "{line}")
                }
            };
        }
        out
    }

    /// The report for scripts.
    pub fn json(&self) -> Value {
        let (covered, total) = self.counts();
        let items: Vec<Value> = self
            .entries
            .iter()
            .map(|e| {
                let (kind, index) = match e.item {
                    Item::Rule(i) => ("rule", Some(i)),
                    Item::Default => ("default", None),
                    Item::Result(i) => ("result", Some(i)),
                };
                json!({
                    "item": kind,
                    "index": index,
                    "label": e.label,
                    "at": e.at,
                    "possible": e.possible.names(),
                    "exercised": Outcomes(e.possible.0 & e.exercised.0).names(),
                    "missing": if e.unreachable_by.is_some() { Vec::new() } else { Outcomes(e.possible.0 & !e.exercised.0).names() },
                    "unreachable": e.unreachable_by.is_some(),
                    "shadowed_by": e.unreachable_by,
                })
            })
            .collect();
        json!({
            "policy": self.policy,
            "covered": covered,
            "total": total,
            "percent": self.shown_percent(),
            "items": items,
        })
    }
}
