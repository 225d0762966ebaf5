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
    let source = match read_file(&args.policy) {
        Ok(source) => source,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let policy = match Policy::from_yaml(&source, &args.policy.display().to_string()) {
        Ok(policy) => policy,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let arguments: Value = match args.args.as_deref().map(serde_json::from_str).transpose() {
        Ok(arguments) => arguments.unwrap_or(Value::Null),
        Err(err) => {
            eprintln!("error: --args is not valid JSON: {err}");
            return ExitCode::from(2);
        }
    };
    let claims: Option<tollgate_policy::Claims> =
        match args.claims.as_deref().map(serde_json::from_str).transpose() {
            Ok(claims) => claims,
            Err(err) => {
                eprintln!("error: --claims is not a JSON object: {err}");
                return ExitCode::from(2);
            }
        };
    let scopes: Vec<String> = match (&args.scopes, &claims) {
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
    };
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
    let action = match decision.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require_approval",
    };
    let origin = args.policy.display().to_string();
    let results: Vec<&tollgate_policy::ResultEntryInfo> = policy
        .result_rules(&args.tool, args.client.as_deref(), claims.as_ref())
        .map(|rules| rules.entries().collect())
        .unwrap_or_default();
    let rule = decision.rule.as_ref().map_or_else(
        || "default (no rule matches)".to_owned(),
        ToString::to_string,
    );
    match format {
        Format::Json => {
            let mut out = decision.meta_json();
            out["decision"] = json!(action);
            out["failing_path"] = json!(decision.failing_path);
            if let Some(approval) = &decision.approval {
                out["approval_timeout_s"] = json!(approval.timeout.as_secs());
            }
            out["results"] = results
                .iter()
                .map(|entry| {
                    json!({
                        "entry": entry.label,
                        "at": format!("{origin}:{}:{}", entry.line, entry.column),
                        "redact": entry.redact,
                        "block": entry.block,
                        "mode": if entry.audit { "audit" } else { "enforce" },
                    })
                })
                .collect();
            println!("{out}");
        }
        Format::Human => {
            let kind = decision
                .kind
                .map(|k| format!(" ({})", k.as_str()))
                .unwrap_or_default();
            println!("decision: {action}{kind}");
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
            for (i, entry) in results.iter().enumerate() {
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
                    "{}{} at {origin}:{}:{}: {}{audit}",
                    if i == 0 { "results:  " } else { "          " },
                    entry.label,
                    entry.line,
                    entry.column,
                    does.join("; ")
                );
            }
            if results.is_empty() && policy.has_result_rules() {
                println!("results:  no `results` entry applies (the result passes untouched)");
            }
            if policy.mode() == tollgate_policy::Mode::Audit {
                println!(
                    "mode:     audit (the proxy logs this decision but lets the call through)"
                );
            }
        }
    }
    ExitCode::SUCCESS
}
