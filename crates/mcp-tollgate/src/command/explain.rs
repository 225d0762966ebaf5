//! `tollgate explain`: which rule decides a call, and why.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_policy::{Action, Policy, RateLimiter, ToolCall, evaluate};

use super::simulate::apply_grant;
use super::{Format, read_file};

/// Arguments of `tollgate explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// `--format`.
    #[command(flatten)]
    pub output: super::FormatArg,
    /// The policy file.
    #[arg(long)]
    pub policy: PathBuf,
    /// The tool called.
    #[arg(long)]
    pub tool: String,
    /// The call's arguments, as JSON.
    #[arg(long)]
    pub args: Option<String>,
    /// The session (for per-session rules).
    #[arg(long, default_value = "default")]
    pub session: String,
    /// The authenticated client (for rules with `clients:`).
    #[arg(long)]
    pub client: Option<String>,
    /// As if an approver had granted this tool to this client or session (a call that
    /// would be held then passes without asking).
    #[arg(long)]
    pub grant: bool,
    /// The caller's OAuth token claims, as a JSON object (for rules with `when`);
    /// its `scope` (or `scp`) claim gives the token's scopes unless `--scopes` does.
    #[arg(long)]
    pub claims: Option<String>,
    /// The token's scopes, space-separated (for rules with `scopes`).
    #[arg(long)]
    pub scopes: Option<String>,
}

/// Runs `tollgate explain`.
pub fn run(args: ExplainArgs, format: Format) -> ExitCode {
    let (policy, arguments, claims) = match load(&args) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let scopes = scopes(args.scopes.as_deref(), claims.as_ref());
    let client_key = args.client.clone().unwrap_or_else(|| "default".to_owned());
    let user_key = super::simulate::user_key(claims.as_ref(), args.client.as_deref());
    let call = ToolCall {
        tool: &args.tool,
        arguments: &arguments,
        client: args.client.as_deref(),
        session_key: &args.session,
        client_key: &client_key,
        user_key: &user_key,
        claims: claims.as_ref(),
        scopes: &scopes,
    };
    let mut decision = evaluate(&policy, &mut RateLimiter::new(), &call, Duration::ZERO);
    if args.grant {
        apply_grant(&mut decision);
    }
    let explained = Explained {
        origin: args.policy.display().to_string(),
        results: policy
            .result_rules(&args.tool, args.client.as_deref(), claims.as_ref())
            .map(|rules| rules.entries().collect())
            .unwrap_or_default(),
        policy: &policy,
        decision: &decision,
    };
    match format {
        Format::Json => explained.print_json(),
        Format::Human => explained.print_human(),
    }
    ExitCode::SUCCESS
}

/// The policy, the call's arguments and its claims; a failure is printed, and its exit
/// code returned (1 for a policy to fix, 2 for a file or flag).
fn load(args: &ExplainArgs) -> Result<(Policy, Value, Option<tollgate_policy::Claims>), ExitCode> {
    let source = read_file(&args.policy).map_err(|err| {
        eprintln!("error: {err}");
        ExitCode::from(2)
    })?;
    let policy =
        Policy::from_yaml(&source, &args.policy.display().to_string()).map_err(|errors| {
            eprintln!("{errors}");
            ExitCode::from(1)
        })?;
    let arguments: Value = match args.args.as_deref().map(serde_json::from_str).transpose() {
        Ok(arguments) => arguments.unwrap_or(Value::Null),
        Err(err) => {
            eprintln!("error: --args is not valid JSON: {err}");
            return Err(ExitCode::from(2));
        }
    };
    let claims = args
        .claims
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|err| {
            eprintln!("error: --claims is not a JSON object: {err}");
            ExitCode::from(2)
        })?;
    Ok((policy, arguments, claims))
}

/// `--scopes`, else the token's `scope` (or `scp`) claim, a string or a list.
fn scopes(flag: Option<&str>, claims: Option<&tollgate_policy::Claims>) -> Vec<String> {
    match (flag, claims) {
        (Some(scopes), _) => scopes.split_whitespace().map(str::to_owned).collect(),
        (None, Some(claims)) => ["scope", "scp"]
            .iter()
            .filter_map(|name| claims.get(*name))
            .flat_map(|value| match value {
                Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            })
            .collect(),
        (None, None) => Vec::new(),
    }
}

/// A decision and the `results:` entries that apply to the call, to print.
struct Explained<'a> {
    policy: &'a Policy,
    decision: &'a tollgate_policy::Decision,
    results: Vec<&'a tollgate_policy::ResultEntryInfo>,
    /// The policy file, for `file:line:column`.
    origin: String,
}

impl Explained<'_> {
    fn action(&self) -> &'static str {
        match self.decision.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::RequireApproval => "require_approval",
        }
    }

    fn print_json(&self) {
        let decision = self.decision;
        let mut out = decision.meta_json();
        out["decision"] = json!(self.action());
        out["failing_path"] = json!(decision.failing_path);
        if let Some(approval) = &decision.approval {
            out["approval_timeout_s"] = json!(approval.timeout.as_secs());
        }
        out["results"] = self
            .results
            .iter()
            .map(|entry| {
                json!({
                    "entry": entry.label,
                    "at": format!("{}:{}:{}", self.origin, entry.line, entry.column),
                    "redact": entry.redact,
                    "block": entry.block,
                    "mode": if entry.audit { "audit" } else { "enforce" },
                })
            })
            .collect();
        println!("{out}");
    }

    fn print_human(&self) {
        let decision = self.decision;
        let kind = decision
            .kind
            .map(|k| format!(" ({})", k.as_str()))
            .unwrap_or_default();
        let rule = decision.rule.as_ref().map_or_else(
            || "default (no rule matches)".to_owned(),
            ToString::to_string,
        );
        println!("decision: {}{kind}", self.action());
        println!("rule:     {rule}");
        println!("reason:   {}", decision.reason);
        if let Some(path) = &decision.failing_path {
            println!("argument: {path}");
        }
        if let Some(approval) = &decision.approval {
            println!(
                "approval: a human has {}s, via {:?}",
                approval.timeout.as_secs(),
                approval.via
            );
        }
        self.print_human_results();
        if self.policy.mode() == tollgate_policy::Mode::Audit {
            println!("mode:     audit (the proxy logs this decision but lets the call through)");
        }
    }

    /// One line per `results:` entry that applies, or why there is none.
    fn print_human_results(&self) {
        for (i, entry) in self.results.iter().enumerate() {
            let mut does = Vec::new();
            if !entry.redact.is_empty() {
                does.push(format!("redacts {}", entry.redact.join(", ")));
            }
            if !entry.block.is_empty() {
                does.push(format!(
                    "withholds a result with {}",
                    entry.block.join(", ")
                ));
            }
            let audit = if entry.audit {
                " (audit: records only)"
            } else {
                ""
            };
            println!(
                "{}{} at {}:{}:{}: {}{audit}",
                if i == 0 { "results:  " } else { "          " },
                entry.label,
                self.origin,
                entry.line,
                entry.column,
                does.join("; ")
            );
        }
        if self.results.is_empty() && self.policy.has_result_rules() {
            println!("results:  no `results` entry applies (the result passes untouched)");
        }
    }
}
