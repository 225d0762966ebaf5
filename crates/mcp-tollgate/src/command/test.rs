//! `tollgate test PATH...`: run policy test cases (docs/policy.md) kept beside the policy,
//! and with `--coverage` say what of each policy they exercised.

pub mod coverage;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_policy::{Action, Decision, Policy, RateLimiter, ToolCall, evaluate};

use super::simulate::user_key;
use super::{Format, read_file};

/// Arguments of `tollgate test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// `--format`.
    #[command(flatten)]
    pub output: super::FormatArg,
    /// `*.test.yaml` files, or directories searched for them.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// After the cases, report per policy each rule's outcomes the cases exercised
    /// and those none did.
    #[arg(long)]
    pub coverage: bool,
    /// Exit 1 when a policy's coverage is below PCT percent (implies `--coverage`).
    #[arg(long, value_name = "PCT", value_parser = percent)]
    pub min_coverage: Option<f64>,
}

fn percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(pct) if (0.0..=100.0).contains(&pct) => Ok(pct),
        _ => Err(format!("`{text}` is not a percentage from 0 to 100")),
    }
}

/// A test file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The policy under test, relative to the test file.
    pub policy: PathBuf,
    /// The cases, run in order. Each is independent of the others (a rate-limit state
    /// of its own) unless they name the same `session`, `client` or claims' `sub`:
    /// cases joined that way share one state ([`shared_states`]).
    pub cases: Vec<Case>,
}

/// Expected decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
    /// Held for a human.
    RequireApproval,
}

/// One case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Shown when it fails.
    pub name: String,
    /// The tool called.
    pub tool: String,
    /// Its arguments.
    #[serde(default)]
    pub arguments: Option<Value>,
    /// The session (default `default`).
    #[serde(default)]
    pub session: Option<String>,
    /// The authenticated client.
    #[serde(default)]
    pub client: Option<String>,
    /// The caller's OAuth token claims (for rules with `when`; `sub` is the user of
    /// `per: user` limits).
    #[serde(default)]
    pub claims: Option<tollgate_policy::Claims>,
    /// The scopes of the caller's token (for rules with `scopes`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Seconds since the start of the test file.
    #[serde(default)]
    pub at: f64,
    /// The same call this many times (default 1).
    #[serde(default = "one")]
    pub repeat: u32,
    /// Expected decision of every call (of all but the last when `expect_last` is set).
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Expected decision of the last call.
    #[serde(default)]
    pub expect_last: Option<Expect>,
    /// Expected refusal kind of the last call: deny, arguments, rate_limit or insufficient_scope.
    #[serde(default)]
    pub kind: Option<String>,
    /// An approver's grant is active for this tool and this client or session: a call
    /// that would be held passes without asking.
    #[serde(default)]
    pub grant: bool,
    /// The tool's result (a CallToolResult: `content`, `structuredContent`), for the
    /// policy's `results:` entries.
    #[serde(default)]
    pub result: Option<Value>,
    /// The detectors expected to redact `result`, by name (`[]`: none).
    #[serde(default)]
    pub expect_redacted: Option<Vec<String>>,
    /// Whether `result` is expected to be withheld.
    #[serde(default)]
    pub expect_blocked: Option<bool>,
}

fn one() -> u32 {
    1
}

fn action_of(expect: Expect) -> Action {
    match expect {
        Expect::Allow => Action::Allow,
        Expect::Deny => Action::Deny,
        Expect::RequireApproval => Action::RequireApproval,
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require_approval",
    }
}

/// The policy a test file tests: its `policy`, relative to the test file.
fn policy_path(test_file: &Path, suite: &Suite) -> PathBuf {
    test_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(&suite.policy)
}

/// Parses a test file and compiles its policy.
pub fn load_suite(path: &Path, source: &str) -> Result<(Suite, Policy), Vec<String>> {
    let suite = parse_suite(path, source)?;
    let policy_path = policy_path(path, &suite);
    let policy_source = read_file(&policy_path).map_err(|e| vec![e])?;
    let policy = Policy::from_yaml(&policy_source, &policy_path.display().to_string())
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    Ok((suite, policy))
}

/// Parses a test file and checks its cases (not its policy).
pub fn parse_suite(path: &Path, source: &str) -> Result<Suite, Vec<String>> {
    let suite: Suite = tollgate_policy::from_yaml_str(source, &path.display().to_string())
        .map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();
    for (i, case) in suite.cases.iter().enumerate() {
        let expects_result = case.expect_redacted.is_some() || case.expect_blocked.is_some();
        if case.expect.is_none() && case.expect_last.is_none() && !expects_result {
            problems.push(format!(
                "{}: cases[{i}] `{}`: needs `expect`, `expect_last`, `expect_redacted` or `expect_blocked`",
                path.display(),
                case.name
            ));
        }
        // A `result` without expectations is fine: `--coverage` counts what the
        // `results` entries did to it.
        if expects_result && case.result.is_none() {
            problems.push(format!(
                "{}: cases[{i}] `{}`: `expect_redacted` / `expect_blocked` need the `result` they check",
                path.display(),
                case.name
            ));
        }
        if case.repeat == 0 {
            problems.push(format!(
                "{}: cases[{i}] `{}`: `repeat` must be at least 1",
                path.display(),
                case.name
            ));
        }
        if !(case.at.is_finite() && case.at >= 0.0) {
            problems.push(format!(
                "{}: cases[{i}] `{}`: `at` must be seconds >= 0",
                path.display(),
                case.name
            ));
        }
        if let Some(kind) = &case.kind
            && !matches!(
                kind.as_str(),
                "deny" | "arguments" | "rate_limit" | "insufficient_scope"
            )
        {
            problems.push(format!(
                "{}: cases[{i}] `{}`: kind must be deny, arguments, rate_limit or insufficient_scope",
                path.display(),
                case.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(suite)
    } else {
        Err(problems)
    }
}

impl Case {
    /// The call this case makes; `user_key` is [`user_key`] of its claims and client.
    pub fn call<'a>(&'a self, user_key: &'a str) -> ToolCall<'a> {
        static NULL: Value = Value::Null;
        ToolCall {
            tool: &self.tool,
            arguments: self.arguments.as_ref().unwrap_or(&NULL),
            client: self.client.as_deref(),
            session_key: self.session.as_deref().unwrap_or("default"),
            client_key: self.client.as_deref().unwrap_or("default"),
            user_key,
            claims: self.claims.as_ref(),
            scopes: &self.scopes,
        }
    }

    /// When its calls are made, from the start of the test file.
    pub fn now(&self) -> Duration {
        Duration::from_secs_f64(self.at)
    }
}

/// What a suite's run shows an observer (`tollgate test --coverage`).
pub enum Seen<'a> {
    /// A call's decision, before a case's grant is applied.
    Decision(&'a Decision),
    /// What the `results` entries did to the result of a call let through.
    Result(&'a tollgate_policy::ResultVerdict),
}

/// What the policy's `results` entries do to `result`, the answer to `call`: the
/// result as the client would get it, and the verdict; `None` when no entry applies.
pub fn scan_result(
    policy: &Policy,
    call: &ToolCall<'_>,
    result: &Value,
) -> Option<(Value, tollgate_policy::ResultVerdict)> {
    let rules = policy.result_rules(call.tool, call.client, call.claims)?;
    let mut scanned = result.clone();
    let verdict = rules.apply(&mut scanned);
    Some((scanned, verdict))
}

/// Which rate-limit state each case uses: cases that name the same session, client or
/// user (the claims' `sub`), directly or through one another, share one; a case that
/// names none has one of its own. Returns each case's state index and the count.
pub fn shared_states(cases: &[Case]) -> (Vec<usize>, usize) {
    // Union-find over the cases, joined by every name they share.
    let mut parent: Vec<usize> = (0..cases.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_named: std::collections::HashMap<(u8, &str), usize> =
        std::collections::HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let sub = case
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(Value::as_str);
        let names = [
            (0, case.session.as_deref()),
            (1, case.client.as_deref()),
            (2, sub),
        ];
        for (kind, name) in names.into_iter().filter_map(|(k, n)| Some((k, n?))) {
            let other = *first_named.entry((kind, name)).or_insert(i);
            let (a, b) = (root(&mut parent, i), root(&mut parent, other));
            parent[a] = b;
        }
    }
    let mut index: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let states = (0..cases.len())
        .map(|i| {
            let r = root(&mut parent, i);
            let next = index.len();
            *index.entry(r).or_insert(next)
        })
        .collect();
    (states, index.len())
}

/// Runs the cases of one suite; returns failure messages. `observe` sees every
/// call's decision and what became of its result. Cases share rate-limit state only as
/// [`shared_states`] says.
pub fn run_suite(
    suite: &Suite,
    policy: &Policy,
    mut observe: impl FnMut(&ToolCall<'_>, Seen<'_>),
) -> Vec<(String, String)> {
    let (state_of, states) = shared_states(&suite.cases);
    let mut limiters: Vec<RateLimiter> = (0..states).map(|_| RateLimiter::new()).collect();
    let mut failures = Vec::new();
    for (case, &state) in suite.cases.iter().zip(&state_of) {
        let Some(limiter) = limiters.get_mut(state) else {
            continue;
        };
        let user_key = user_key(case.claims.as_ref(), case.client.as_deref());
        let call = case.call(&user_key);
        let now = case.now();
        let decisions: Vec<Decision> = (0..case.repeat)
            .map(|_| {
                let mut decision = evaluate(policy, limiter, &call, now);
                observe(&call, Seen::Decision(&decision));
                if case.grant {
                    super::simulate::apply_grant(&mut decision);
                }
                decision
            })
            .collect();
        if let (Some(result), Some(last)) = (&case.result, decisions.last())
            && last.action != Action::Deny
            && let Some((_, verdict)) = scan_result(policy, &call, result)
        {
            observe(&call, Seen::Result(&verdict));
        }
        let failure = check_decisions(case, &decisions).or_else(|| check_result(policy, case));
        if let Some(message) = failure {
            failures.push((case.name.clone(), message));
        }
    }
    failures
}

/// How a decision reads in a failure message: action, kind, deciding rule, reason.
fn describe(d: &Decision) -> String {
    let rule = d
        .rule
        .as_ref()
        .map_or_else(|| "default".to_owned(), ToString::to_string);
    let kind = d
        .kind
        .map(|k| format!(" ({})", k.as_str()))
        .unwrap_or_default();
    format!("{}{kind} by {rule}: {}", action_name(d.action), d.reason)
}

/// A case's decisions (one per repeat) against its `expect` (every call),
/// `expect_last` (the last one) and `kind` (of the last one); `None` when they hold,
/// else the first that does not.
fn check_decisions(case: &Case, decisions: &[Decision]) -> Option<String> {
    let last_index = decisions.len().saturating_sub(1);
    for (i, decision) in decisions.iter().enumerate() {
        let expected = match (case.expect, case.expect_last) {
            (_, Some(last)) if i == last_index => Some(last),
            (Some(all), _) => Some(all),
            _ => None,
        };
        if let Some(expected) = expected
            && decision.action != action_of(expected)
        {
            return Some(format!(
                "call {} of {}: expected {}, got {}",
                i + 1,
                decisions.len(),
                action_name(action_of(expected)),
                describe(decision)
            ));
        }
    }
    if let (Some(kind), Some(last)) = (&case.kind, decisions.last()) {
        let got = last.kind.map_or("none", |k| k.as_str());
        if got != kind {
            return Some(format!("expected kind {kind}, got {}", describe(last)));
        }
    }
    None
}

/// A case's result expectations against the policy's `results:` entries: which
/// detectors redacted its `result` (as the client would see them in
/// `_meta["dev.tollgate/redactions"]`) and whether it was withheld. `None` when they hold.
fn check_result(policy: &Policy, case: &Case) -> Option<String> {
    let result = case.result.as_ref()?;
    let user_key = user_key(case.claims.as_ref(), case.client.as_deref());
    let (result, verdict) = scan_result(policy, &case.call(&user_key), result)
        .unwrap_or_else(|| (result.clone(), tollgate_policy::ResultVerdict::default()));
    let redacted: Vec<&str> = result["_meta"][tollgate_policy::REDACTIONS_META]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    let found: Vec<&str> = verdict.redactions.iter().map(|r| r.name.as_str()).collect();
    if let Some(expected) = &case.expect_redacted {
        let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        expected.sort_unstable();
        expected.dedup();
        if expected != redacted {
            return Some(format!(
                "expected the result redacted by [{}], got [{}] (found: [{}]{})",
                expected.join(", "),
                redacted.join(", "),
                found.join(", "),
                verdict
                    .blocked
                    .as_ref()
                    .map(|b| format!("; withheld for {b}"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(expected) = case.expect_blocked
        && expected != verdict.blocked.is_some()
    {
        return Some(match &verdict.blocked {
            Some(blocker) => format!("expected the result not withheld, but it contains {blocker}"),
            None => format!(
                "expected the result withheld, but no `block` detector applying to `{}` found anything (found: [{}])",
                case.tool,
                found.join(", ")
            ),
        });
    }
    None
}

fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

/// What `tollgate test` found, over all its files.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    /// Files that could not be loaded.
    broken: usize,
    /// One entry per file, for `--format json`.
    report: Vec<Value>,
    /// Per policy file (several test files may test one), in the order first tested;
    /// with `--coverage` only.
    coverages: Vec<(PathBuf, coverage::Coverage)>,
}

impl Tally {
    /// Loads one test file, runs its cases (recording coverage when asked) and adds
    /// the outcome; failures are printed as found in the human format.
    fn test_file(&mut self, file: &Path, source: &str, with_coverage: bool, format: Format) {
        let (suite, policy) = match load_suite(file, source) {
            Ok(loaded) => loaded,
            Err(problems) => {
                self.broken += 1;
                for problem in &problems {
                    eprintln!("error: {problem}");
                }
                self.report
                    .push(json!({"path": file.display().to_string(), "errors": problems}));
                return;
            }
        };
        let failures = if with_coverage {
            let mut cov = self.coverage_of(file, &suite, &policy);
            run_suite(&suite, &policy, |call, seen| {
                if let Some(cov) = cov.as_deref_mut() {
                    match seen {
                        Seen::Decision(decision) => cov.record(&policy, call, decision),
                        Seen::Result(verdict) => cov.record_result(&policy, call, verdict),
                    }
                }
            })
        } else {
            run_suite(&suite, &policy, |_, _| {})
        };
        self.passed += suite.cases.len() - failures.len();
        self.failed += failures.len();
        if format == Format::Human {
            for (name, message) in &failures {
                println!("FAIL {}: {name}: {message}", file.display());
            }
            println!(
                "{}: {} of {} case(s) passed",
                file.display(),
                suite.cases.len() - failures.len(),
                suite.cases.len()
            );
        }
        self.report.push(json!({"path": file.display().to_string(), "cases": suite.cases.len(),
            "failures": failures.iter().map(|(n, m)| json!({"name": n, "message": m})).collect::<Vec<_>>()}));
    }

    /// The coverage of the policy that `suite` (in `file`) tests, started when first
    /// tested.
    fn coverage_of(
        &mut self,
        file: &Path,
        suite: &Suite,
        policy: &Policy,
    ) -> Option<&mut coverage::Coverage> {
        let policy_path = policy_path(file, suite);
        let key = policy_path
            .canonicalize()
            .unwrap_or_else(|_| policy_path.clone());
        if !self.coverages.iter().any(|(k, _)| *k == key) {
            let origin = policy_path.display().to_string();
            self.coverages
                .push((key.clone(), coverage::Coverage::new(policy, &origin)));
        }
        self.coverages
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| c)
    }
}

/// Runs `tollgate test`.
pub fn run(args: TestArgs, format: Format) -> ExitCode {
    let (files, mut io_errors) = super::collect(&args.paths, is_test_file);
    let with_coverage = args.coverage || args.min_coverage.is_some();
    let mut tally = Tally::default();
    for file in &files {
        match read_file(file) {
            Ok(source) => tally.test_file(file, &source, with_coverage, format),
            Err(err) => io_errors.push(err),
        }
    }
    for error in &io_errors {
        eprintln!("error: {error}");
    }
    let below: Vec<&coverage::Coverage> = tally
        .coverages
        .iter()
        .map(|(_, c)| c)
        .filter(|c| args.min_coverage.is_some_and(|min| c.percent() < min))
        .collect();
    let Tally {
        passed,
        failed,
        broken,
        ..
    } = tally;
    match format {
        Format::Json => {
            let mut out = json!({"passed": passed, "failed": failed, "files": tally.report, "io_errors": io_errors});
            if with_coverage {
                out["coverage"] = tally.coverages.iter().map(|(_, c)| c.json()).collect();
                out["min_coverage"] = json!(args.min_coverage);
                out["below_min_coverage"] = below.iter().map(|c| json!(c.policy)).collect();
            }
            println!("{out}");
        }
        Format::Human => {
            for (_, cov) in &tally.coverages {
                print!("{}", cov.human());
            }
            println!("{passed} passed, {failed} failed, {broken} broken file(s)");
        }
    }
    if let Some(min) = args.min_coverage {
        for cov in &below {
            eprintln!(
                "error: coverage of {} is {:.1}%, below --min-coverage {min}%: add cases for the outcomes marked MISSING",
                cov.policy,
                cov.shown_percent()
            );
        }
    }
    if !io_errors.is_empty() || files.is_empty() {
        if files.is_empty() && io_errors.is_empty() {
            eprintln!("error: no *.test.yaml files found");
        }
        ExitCode::from(2)
    } else if failed > 0 || broken > 0 || !below.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
