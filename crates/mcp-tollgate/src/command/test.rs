//! `tollgate test PATH...`: run policy test cases (docs/policy.md) kept beside the policy.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_policy::{Action, Decision, Policy, RateLimiter, ToolCall, evaluate};

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

/// The key of `per: user` limits, as the proxy forms it: the token's `sub`, else
/// the client, else one shared key.
pub fn user_key(claims: Option<&tollgate_policy::Claims>, client: Option<&str>) -> String {
    match (
        claims.and_then(|c| c.get("sub")).and_then(Value::as_str),
        client,
    ) {
        (Some(sub), _) => format!("user:{sub}"),
        (None, Some(client)) => format!("client:{client}"),
        (None, None) => "default".to_owned(),
    }
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

/// Parses a test file and compiles its policy.
pub fn load_suite(path: &Path, source: &str) -> Result<(Suite, Policy), Vec<String>> {
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
        if expects_result != case.result.is_some() {
            problems.push(format!(
                "{}: cases[{i}] `{}`: `result` and `expect_redacted` / `expect_blocked` go together",
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
    let policy_path = path.parent().unwrap_or(Path::new(".")).join(&suite.policy);
    let policy_source = read_file(&policy_path).map_err(|e| vec![e])?;
    let policy = Policy::from_yaml(&policy_source, &policy_path.display().to_string())
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    if problems.is_empty() {
        Ok((suite, policy))
    } else {
        Err(problems)
    }
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

/// Runs the cases of one suite; returns failure messages.
pub fn run_suite(suite: &Suite, policy: &Policy) -> Vec<(String, String)> {
    let (state_of, states) = shared_states(&suite.cases);
    let mut limiters: Vec<RateLimiter> = (0..states).map(|_| RateLimiter::new()).collect();
    let mut failures = Vec::new();
    let null = Value::Null;
    for (case, &state) in suite.cases.iter().zip(&state_of) {
        let limiter = &mut limiters[state];
        let arguments = case.arguments.as_ref().unwrap_or(&null);
        let session = case.session.as_deref().unwrap_or("default");
        let client_key = case.client.as_deref().unwrap_or("default");
        let user_key = user_key(case.claims.as_ref(), case.client.as_deref());
        let call = ToolCall {
            tool: &case.tool,
            arguments,
            client: case.client.as_deref(),
            session_key: session,
            client_key,
            user_key: &user_key,
            claims: case.claims.as_ref(),
            scopes: &case.scopes,
        };
        let now = Duration::from_secs_f64(case.at);
        let decisions: Vec<Decision> = (0..case.repeat)
            .map(|_| {
                let mut decision = evaluate(policy, limiter, &call, now);
                if case.grant {
                    super::explain::apply_grant(&mut decision);
                }
                decision
            })
            .collect();
        let describe = |d: &Decision| {
            let rule = d
                .rule
                .as_ref()
                .map_or_else(|| "default".to_owned(), ToString::to_string);
            let kind = d
                .kind
                .map(|k| format!(" ({})", k.as_str()))
                .unwrap_or_default();
            format!("{}{kind} by {rule}: {}", action_name(d.action), d.reason)
        };
        let last_index = decisions.len().saturating_sub(1);
        let mut failure = None;
        for (i, decision) in decisions.iter().enumerate() {
            let expected = match (case.expect, case.expect_last) {
                (_, Some(last)) if i == last_index => Some(last),
                (Some(all), _) => Some(all),
                _ => None,
            };
            if let Some(expected) = expected
                && decision.action != action_of(expected)
            {
                failure = Some(format!(
                    "call {} of {}: expected {}, got {}",
                    i + 1,
                    decisions.len(),
                    action_name(action_of(expected)),
                    describe(decision)
                ));
                break;
            }
        }
        if failure.is_none()
            && let (Some(kind), Some(last)) = (&case.kind, decisions.last())
        {
            let got = last.kind.map_or("none", |k| k.as_str());
            if got != kind {
                failure = Some(format!("expected kind {kind}, got {}", describe(last)));
            }
        }
        if failure.is_none() {
            failure = check_result(policy, case);
        }
        if let Some(message) = failure {
            failures.push((case.name.clone(), message));
        }
    }
    failures
}

/// A case's result expectations against the policy's `results:` entries: which
/// detectors redacted its `result` (as the client would see them in
/// `_meta["dev.tollgate/redactions"]`) and whether it was withheld. `None` when they hold.
fn check_result(policy: &Policy, case: &Case) -> Option<String> {
    let mut result = case.result.clone()?;
    let verdict = policy
        .result_rules(&case.tool, case.client.as_deref(), case.claims.as_ref())
        .map(|rules| rules.apply(&mut result))
        .unwrap_or_default();
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

/// Runs `tollgate test`.
pub fn run(args: TestArgs, format: Format) -> ExitCode {
    let (files, mut io_errors) = super::validate::collect(&args.paths, is_test_file);
    let (mut passed, mut failed, mut broken) = (0usize, 0usize, 0usize);
    let mut report = Vec::new();
    for file in &files {
        let source = match read_file(file) {
            Ok(source) => source,
            Err(err) => {
                io_errors.push(err);
                continue;
            }
        };
        let (suite, policy) = match load_suite(file, &source) {
            Ok(loaded) => loaded,
            Err(problems) => {
                broken += 1;
                for problem in &problems {
                    eprintln!("error: {problem}");
                }
                report.push(json!({"path": file.display().to_string(), "errors": problems}));
                continue;
            }
        };
        let failures = run_suite(&suite, &policy);
        passed += suite.cases.len() - failures.len();
        failed += failures.len();
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
        report.push(json!({"path": file.display().to_string(), "cases": suite.cases.len(),
            "failures": failures.iter().map(|(n, m)| json!({"name": n, "message": m})).collect::<Vec<_>>()}));
    }
    for error in &io_errors {
        eprintln!("error: {error}");
    }
    match format {
        Format::Json => println!(
            "{}",
            json!({"passed": passed, "failed": failed, "files": report, "io_errors": io_errors})
        ),
        Format::Human => println!("{passed} passed, {failed} failed, {broken} broken file(s)"),
    }
    if !io_errors.is_empty() || files.is_empty() {
        if files.is_empty() && io_errors.is_empty() {
            eprintln!("error: no *.test.yaml files found");
        }
        ExitCode::from(2)
    } else if failed > 0 || broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
