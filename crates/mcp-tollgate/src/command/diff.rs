//! `tollgate diff OLD NEW`: the calls whose decision a policy change would change.
//!
//! The calls come from policy test cases (`--cases`) and from audit logs (`--audit`),
//! each source replayed in its own order and times under both versions, each
//! version with its own rate-limit state. An audit log is streamed a line at a time:
//! memory grows with the number of distinct changes (capped), not with the log.
//!
//! A decision can depend on what an audit record did not keep: the arguments
//! (without `audit.arguments: true`) when the deciding rule has an `arguments`
//! schema; a token's claims when a rule with `when` could take the call; its scopes
//! when the deciding rule needs some. Such calls are counted and said, not guessed,
//! and take no rate-limit slot in the replay.

mod audit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_policy::{Action, Decision, DenyKind, Policy, RateLimiter, ToolCall, evaluate};

use super::{Format, read_file};

/// Arguments of `tollgate diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// `--format`.
    #[command(flatten)]
    pub output: super::FormatArg,
    /// The policy before the change: a file, or `REV:PATH` read with `git show`
    /// (`main:policies/healthlake.yaml`).
    pub old: String,
    /// The policy after the change: a file, or `REV:PATH`.
    pub new: String,
    /// Policy test files whose cases' calls are replayed.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub cases: Vec<PathBuf>,
    /// Audit logs (JSON lines) whose recorded calls are replayed.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub audit: Vec<PathBuf>,
    /// Only the audit records of this server (`servers:` key); default: every record.
    #[arg(long)]
    pub server: Option<String>,
    /// Exit 1 when any call's decision changes.
    #[arg(long)]
    pub fail_on_change: bool,
}

/// Distinct changes (and distinct undetermined calls) kept; more are counted only.
const MAX_GROUPS: usize = 10_000;

/// What a version decided about a call, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Verdict {
    action: Action,
    kind: Option<DenyKind>,
    /// `rules[i] (tool)` or `default`.
    rule: String,
}

impl Verdict {
    fn of(decision: &Decision) -> Verdict {
        Verdict {
            action: decision.action,
            kind: decision.kind,
            rule: decision
                .rule
                .as_ref()
                .map_or_else(|| "default".to_owned(), ToString::to_string),
        }
    }

    /// Whether the call fares differently: let through, held or refused (and why).
    /// The same decision by another rule (renumbered by an inserted rule) is not a change.
    fn differs(&self, other: &Verdict) -> bool {
        self.action != other.action || self.kind != other.kind
    }

    fn decision(&self) -> &'static str {
        match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::RequireApproval => "require_approval",
        }
    }

    fn human(&self) -> String {
        let kind = match self.kind {
            Some(kind) if kind != DenyKind::Deny => format!(" ({})", kind.as_str()),
            _ => String::new(),
        };
        format!("{}{kind} by {}", self.decision(), self.rule)
    }

    fn json(&self) -> Value {
        json!({"decision": self.decision(), "kind": self.kind.map(DenyKind::as_str), "rule": self.rule})
    }
}

/// Why a version's decision cannot be known from a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Unknown {
    /// The deciding rule has an `arguments` schema; the record has no arguments.
    Arguments(String),
    /// A rule with `when: {claims}` could take the call; the record has no claims.
    Claims(String),
    /// The deciding rule needs scopes; the record has no scopes.
    Scopes(String),
}

impl Unknown {
    fn human(&self) -> String {
        match self {
            Unknown::Arguments(rule) => format!(
                "{rule} checks the arguments, which the audit log did not keep (audit.arguments: true keeps them)"
            ),
            Unknown::Claims(rule) => {
                format!("{rule} depends on the token's claims, which the audit log does not keep")
            }
            Unknown::Scopes(rule) => {
                format!("{rule} needs scopes, which the audit log does not keep")
            }
        }
    }

    fn json(&self) -> Value {
        let (needs, rule) = match self {
            Unknown::Arguments(rule) => ("arguments", rule),
            Unknown::Claims(rule) => ("claims", rule),
            Unknown::Scopes(rule) => ("scopes", rule),
        };
        json!({"needs": needs, "rule": rule})
    }
}

/// What a source knows about a call beyond its tool and client.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// The arguments are the call's.
    arguments: bool,
    /// The claims and scopes are the call's (a case's, or a call without a token).
    identity: bool,
}

/// One policy version and its rate-limit state for the source being replayed.
struct Side<'p> {
    policy: &'p Policy,
    limiter: RateLimiter,
}

impl Side<'_> {
    /// The decision, or what it depends on that the source did not keep.
    fn decide(
        &mut self,
        call: &ToolCall<'_>,
        now: Duration,
        known: Known,
        grant: bool,
    ) -> Result<Verdict, Unknown> {
        if !known.identity || !known.arguments {
            let route = self.policy.route(call.tool, call.client, call.claims);
            let label = |index: usize| {
                self.policy
                    .rule(index)
                    .map_or_else(String::new, |r| r.rule.to_string())
            };
            if !known.identity
                && let Some(&first) = route.claims_skipped.first()
            {
                return Err(Unknown::Claims(label(first)));
            }
            if let Some(rule) = route.rule.and_then(|i| self.policy.rule(i))
                && rule.action != Action::Deny
            {
                if !known.identity && rule.scopes {
                    return Err(Unknown::Scopes(rule.rule.to_string()));
                }
                if !known.arguments && rule.arguments {
                    return Err(Unknown::Arguments(rule.rule.to_string()));
                }
            }
        }
        let mut decision = evaluate(self.policy, &mut self.limiter, call, now);
        if grant {
            super::simulate::apply_grant(&mut decision);
        }
        Ok(Verdict::of(&decision))
    }
}

/// Who made a call, as the report groups them.
fn who(client: Option<&str>, user: Option<&str>) -> String {
    match (client, user) {
        (Some(client), _) => format!("client {client}"),
        (None, Some(user)) => format!("user {user}"),
        (None, None) => "anonymous".to_owned(),
    }
}

/// A change as grouped: tool, who, old and new verdict.
type Change = (String, String, Verdict, Verdict);

/// The calls replayed, and what became of them.
#[derive(Default)]
struct Report {
    calls: u64,
    unchanged: u64,
    changed: u64,
    undetermined: u64,
    /// (tool, who, old, new) → calls.
    changes: HashMap<Change, u64>,
    /// Changes past [`MAX_GROUPS`] distinct ones: counted, not listed.
    changes_unlisted: u64,
    /// (tool, who, why) → calls.
    unknowns: HashMap<(String, String, Unknown), u64>,
    unknowns_unlisted: u64,
    /// Audit lines that are not a readable record.
    unreadable: u64,
    /// The first unreadable line: file, line number, why.
    first_unreadable: Option<String>,
}

impl Report {
    fn add(
        &mut self,
        tool: &str,
        who: impl FnOnce() -> String,
        old: Result<Verdict, Unknown>,
        new: Result<Verdict, Unknown>,
    ) {
        self.calls += 1;
        match (old, new) {
            (Ok(old), Ok(new)) if !old.differs(&new) => self.unchanged += 1,
            (Ok(old), Ok(new)) => {
                self.changed += 1;
                if !count(&mut self.changes, (tool.to_owned(), who(), old, new)) {
                    self.changes_unlisted += 1;
                }
            }
            (Err(why), _) | (_, Err(why)) => {
                self.undetermined += 1;
                if !count(&mut self.unknowns, (tool.to_owned(), who(), why)) {
                    self.unknowns_unlisted += 1;
                }
            }
        }
    }

    fn sorted_changes(&self) -> Vec<(&Change, u64)> {
        let mut changes: Vec<_> = self.changes.iter().map(|(k, n)| (k, *n)).collect();
        changes.sort_by(|a, b| {
            (
                &a.0.0,
                std::cmp::Reverse(a.1),
                &a.0.1,
                &a.0.2.rule,
                &a.0.3.rule,
            )
                .cmp(&(
                    &b.0.0,
                    std::cmp::Reverse(b.1),
                    &b.0.1,
                    &b.0.2.rule,
                    &b.0.3.rule,
                ))
        });
        changes
    }

    fn sorted_unknowns(&self) -> Vec<(&(String, String, Unknown), u64)> {
        let mut unknowns: Vec<_> = self.unknowns.iter().map(|(k, n)| (k, *n)).collect();
        unknowns.sort_by(|a, b| {
            (&a.0.0, std::cmp::Reverse(a.1), &a.0.1).cmp(&(&b.0.0, std::cmp::Reverse(b.1), &b.0.1))
        });
        unknowns
    }

    fn human(&self, old: &str, new: &str) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{} call(s) replayed under {old} and {new}: {} change decision, {} unchanged, {} undetermined\n",
            self.calls, self.changed, self.unchanged, self.undetermined
        );
        let mut tool = None;
        for ((t, who, old, new), count) in self.sorted_changes() {
            if tool != Some(t) {
                let _ = writeln!(out, "\n{t}:");
                tool = Some(t);
            }
            let _ = writeln!(
                out,
                "  {count:>6} x {who}: {} -> {}",
                old.human(),
                new.human()
            );
        }
        if self.changes_unlisted > 0 {
            let _ = writeln!(
                out,
                "  ... and {} more changed call(s) not listed (more than {MAX_GROUPS} distinct changes)",
                self.changes_unlisted
            );
        }
        if self.undetermined > 0 {
            let _ = writeln!(
                out,
                "\nundetermined: {} call(s) whose decision depends on what the audit log did not keep (not guessed):",
                self.undetermined
            );
            for ((tool, who, why), count) in self.sorted_unknowns() {
                let _ = writeln!(out, "  {count:>6} x {tool} by {who}: {}", why.human());
            }
            if self.unknowns_unlisted > 0 {
                let _ = writeln!(out, "  ... and {} more", self.unknowns_unlisted);
            }
        }
        if self.unreadable > 0 {
            let _ = writeln!(
                out,
                "\nskipped {} audit line(s) that are not a decision record Tollgate can read (first: {})",
                self.unreadable,
                self.first_unreadable.as_deref().unwrap_or("?")
            );
        }
        out
    }

    fn json(&self, old: &str, new: &str) -> Value {
        let split = |who: &str| -> (Option<String>, Option<String>) {
            match who.split_once(' ') {
                Some(("client", c)) => (Some(c.to_owned()), None),
                Some(("user", u)) => (None, Some(u.to_owned())),
                _ => (None, None),
            }
        };
        let changes: Vec<Value> = self
            .sorted_changes()
            .into_iter()
            .map(|((tool, who, old, new), count)| {
                let (client, user) = split(who);
                json!({"tool": tool, "client": client, "user": user, "old": old.json(), "new": new.json(), "count": count})
            })
            .collect();
        let undetermined: Vec<Value> = self
            .sorted_unknowns()
            .into_iter()
            .map(|((tool, who, why), count)| {
                let (client, user) = split(who);
                let mut entry = why.json();
                entry["tool"] = json!(tool);
                entry["client"] = json!(client);
                entry["user"] = json!(user);
                entry["count"] = json!(count);
                entry
            })
            .collect();
        json!({
            "old": old,
            "new": new,
            "calls": self.calls,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "undetermined": self.undetermined,
            "changes": changes,
            "changes_unlisted": self.changes_unlisted,
            "undetermined_calls": undetermined,
            "undetermined_unlisted": self.unknowns_unlisted,
            "unreadable_lines": self.unreadable,
        })
    }
}

/// Counts one more call under `key`; false when `key` is new and [`MAX_GROUPS`] are
/// already kept (the call is then counted only in a total).
fn count<K: std::hash::Hash + Eq>(groups: &mut HashMap<K, u64>, key: K) -> bool {
    let kept = groups.len();
    match groups.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut entry) => *entry.get_mut() += 1,
        std::collections::hash_map::Entry::Vacant(_) if kept >= MAX_GROUPS => return false,
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(1);
        }
    }
    true
}

/// A policy named on the command line: a file, else `REV:PATH` for `git show`.
fn load_policy(spec: &str) -> Result<Policy, (u8, String)> {
    let path = Path::new(spec);
    let source = if path.exists() {
        read_file(path).map_err(|e| (2, e))?
    } else if spec.contains(':') {
        git_show(spec).map_err(|e| (2, e))?
    } else {
        return Err((
            2,
            format!(
                "{spec}: no such file; give a policy file or REV:PATH (`main:policies/x.yaml`)"
            ),
        ));
    };
    Policy::from_yaml(&source, spec).map_err(|errors| (1, errors.to_string()))
}

/// `git show REV:PATH`, run where tollgate was started.
fn git_show(spec: &str) -> Result<String, String> {
    let out = std::process::Command::new("git")
        .args(["show", spec])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{spec}: cannot run `git show`: {e}; is git installed?"))?;
    if !out.status.success() {
        return Err(format!(
            "{spec}: `git show {spec}` failed: {}; REV:PATH is read as git reads it (PATH from the repository's root, or REV:./PATH from here)",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("{spec}: is not UTF-8 text"))
}

/// Replays the calls of one test file's cases.
fn replay_cases(
    path: &Path,
    old: &Policy,
    new: &Policy,
    report: &mut Report,
) -> Result<(), String> {
    let source = read_file(path)?;
    let suite = super::test::parse_suite(path, &source).map_err(|problems| problems.join("\n"))?;
    let (mut old, mut new) = (
        Side {
            policy: old,
            limiter: RateLimiter::new(),
        },
        Side {
            policy: new,
            limiter: RateLimiter::new(),
        },
    );
    let known = Known {
        arguments: true,
        identity: true,
    };
    for case in &suite.cases {
        let user_key = super::simulate::user_key(case.claims.as_ref(), case.client.as_deref());
        let call = case.call(&user_key);
        let now = case.now();
        let sub = case
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(Value::as_str);
        for _ in 0..case.repeat {
            let before = old.decide(&call, now, known, case.grant);
            let after = new.decide(&call, now, known, case.grant);
            report.add(
                &case.tool,
                || who(case.client.as_deref(), sub),
                before,
                after,
            );
        }
    }
    Ok(())
}

/// Runs `tollgate diff`.
pub fn run(args: DiffArgs, format: Format) -> ExitCode {
    if args.cases.is_empty() && args.audit.is_empty() {
        eprintln!(
            "error: no calls to compare: give --cases FILE.test.yaml... and/or --audit audit.jsonl..."
        );
        return ExitCode::from(2);
    }
    let (old, new) = match (load_policy(&args.old), load_policy(&args.new)) {
        (Ok(old), Ok(new)) => (old, new),
        (old, new) => {
            let mut code = 0;
            for (which, result) in [("OLD", old.err()), ("NEW", new.err())] {
                if let Some((c, message)) = result {
                    eprintln!("error: {which} policy: {message}");
                    code = code.max(c);
                }
            }
            return ExitCode::from(code);
        }
    };
    let mut report = Report::default();
    let mut errors = Vec::new();
    for path in &args.cases {
        if let Err(e) = replay_cases(path, &old, &new, &mut report) {
            errors.push(e);
        }
    }
    for path in &args.audit {
        if let Err(e) = audit::replay_audit(path, args.server.as_deref(), &old, &new, &mut report) {
            errors.push(e);
        }
    }
    match format {
        Format::Human => print!("{}", report.human(&args.old, &args.new)),
        Format::Json => {
            let mut out = report.json(&args.old, &args.new);
            out["errors"] = json!(errors);
            println!("{out}");
        }
    }
    for error in &errors {
        eprintln!("error: {error}");
    }
    if !errors.is_empty() {
        ExitCode::from(2)
    } else if args.fail_on_change && report.changed > 0 {
        if format == Format::Human {
            eprintln!(
                "error: {} call(s) change decision (--fail-on-change)",
                report.changed
            );
        }
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
