//! `tollgate approvals list | show ID | approve ID | deny ID --reason TEXT | grants |
//! revoke GRANT_ID`: the admin API from a terminal. Without `--admin` it asks every
//! running Tollgate of this user (see `instances`), else `http://127.0.0.1:9090`. An ID
//! may be any unique prefix (the admin API resolves it); `--format json` prints what
//! the API answered.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::Format;

/// Arguments of `tollgate approvals`.
#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// The admin listener's URL. Without it: every running Tollgate of this user
    /// (recorded in $XDG_RUNTIME_DIR/tollgate or ~/.local/state/tollgate), else
    /// http://127.0.0.1:9090.
    #[arg(long, global = true, env = "TOLLGATE_ADMIN_URL")]
    pub admin: Option<String>,
    /// Output format: lines for people, or the admin API's JSON for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// What to do.
    #[command(subcommand)]
    pub action: ApprovalAction,
}

/// Who a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GrantScope {
    /// The client (else the peer address).
    Client,
    /// The MCP session.
    Session,
}

/// `approvals` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ApprovalAction {
    /// Pending and recently settled approvals, newest first.
    List {
        /// Print JSON instead of a table (as `--format json`).
        #[arg(long)]
        json: bool,
    },
    /// One approval: tool, client, session, rule, reason and the full arguments.
    Show {
        /// The approval's id (or a unique prefix).
        id: String,
    },
    /// Approve a pending call: it (or its retry) is forwarded upstream.
    Approve {
        /// The approval's id (or a unique prefix).
        id: String,
        /// A note for the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Also let this tool's calls by the same client (or session) through for this
        /// long (`30s`, `10m`, `1h`; at most 24h).
        #[arg(long)]
        grant_for: Option<String>,
        /// Who the grant is for.
        #[arg(long, value_enum, default_value_t = GrantScope::Client, requires = "grant_for")]
        scope: GrantScope,
        /// The grant covers any arguments the rule lets through, not only these.
        #[arg(long, requires = "grant_for")]
        any_arguments: bool,
    },
    /// Deny a pending call: the agent gets the reason.
    Deny {
        /// The approval's id.
        id: String,
        /// Why; the agent sees it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The active grants.
    Grants,
    /// End a grant at once.
    Revoke {
        /// The grant's id.
        id: String,
    },
}

/// Runs `tollgate approvals`.
pub fn run(args: ApprovalsArgs) -> ExitCode {
    let token = std::env::var("TOLLGATE_ADMIN_TOKEN").ok();
    let Some(runtime) = super::client_runtime() else {
        return ExitCode::from(2);
    };
    let targets = match &args.admin {
        Some(url) => {
            let base = url.trim_end_matches('/').to_owned();
            // A running instance at that address may have a token generated for it.
            let recorded = super::instances::running()
                .into_iter()
                .find(|instance| instance.admin.trim_end_matches('/') == base)
                .and_then(|instance| instance.token);
            vec![Target {
                base,
                token: token.clone().or(recorded),
                about: None,
            }]
        }
        None => discovered(token.as_deref()),
    };
    match runtime.block_on(execute(&args, &targets)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", super::serve::error_chain(&err));
            ExitCode::from(2)
        }
    }
}

/// One admin API to ask.
struct Target {
    base: String,
    token: Option<String>,
    /// How a running instance describes itself (`stdio a, pid 12`), when found.
    about: Option<String>,
}

/// The running instances, each with its generated token or else `token`; the
/// default admin address when none is recorded.
fn discovered(token: Option<&str>) -> Vec<Target> {
    let found: Vec<Target> = super::instances::running()
        .into_iter()
        .map(|instance| Target {
            about: Some(format!(
                "{} {}, pid {}",
                instance.command,
                instance.servers.join(" "),
                instance.pid
            )),
            base: instance.admin,
            token: instance.token.or_else(|| token.map(str::to_owned)),
        })
        .collect();
    if found.is_empty() {
        return vec![Target {
            base: "http://127.0.0.1:9090".to_owned(),
            token: token.map(str::to_owned),
            about: None,
        }];
    }
    found
}

/// An answer of one admin API.
struct Answer {
    status: reqwest::StatusCode,
    body: Value,
}

async fn ask(
    client: &reqwest::Client,
    target: &Target,
    action: &ApprovalAction,
) -> anyhow::Result<Answer> {
    let base = &target.base;
    let request = match action {
        ApprovalAction::List { .. } => client.get(format!("{base}/approvals")),
        ApprovalAction::Show { id } => client.get(format!("{base}/approvals/{id}")),
        ApprovalAction::Approve {
            id,
            reason,
            grant_for,
            scope,
            any_arguments,
        } => {
            let mut body = json!({"reason": reason, "by": cli_user()});
            if let Some(window) = grant_for {
                body["grant"] = json!({
                    "for": window,
                    "scope": match scope {
                        GrantScope::Client => "client",
                        GrantScope::Session => "session",
                    },
                    "any_arguments": any_arguments,
                });
            }
            client
                .post(format!("{base}/approvals/{id}/approve"))
                .json(&body)
        }
        ApprovalAction::Deny { id, reason } => client
            .post(format!("{base}/approvals/{id}/deny"))
            .json(&json!({"reason": reason, "by": cli_user()})),
        ApprovalAction::Grants => client.get(format!("{base}/approvals/grants")),
        ApprovalAction::Revoke { id } => client.delete(format!("{base}/approvals/grants/{id}")),
    };
    let request = match &target.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {base}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Ok(Answer { status, body })
}

/// Turns a refusal into the exit code after printing it; `None` for a success.
fn refusal(target: &Target, answer: &Answer) -> Option<ExitCode> {
    if answer.status == reqwest::StatusCode::UNAUTHORIZED {
        eprintln!(
            "error: the admin API at {} refused the token; set TOLLGATE_ADMIN_TOKEN to admin.token",
            target.base
        );
        return Some(ExitCode::from(2));
    }
    if !answer.status.is_success() {
        let message = answer
            .body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request failed");
        eprintln!("error: {message} (HTTP {})", answer.status);
        return Some(ExitCode::from(1));
    }
    None
}

async fn execute(args: &ApprovalsArgs, targets: &[Target]) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    if let ApprovalAction::List { json } = &args.action {
        return list(&client, targets, *json || args.format == Format::Json).await;
    }
    // One id belongs to one instance: the first that knows it answers.
    let mut last = None;
    for target in targets {
        let answer = match ask(&client, target, &args.action).await {
            Ok(answer) => answer,
            Err(err) if targets.len() > 1 => {
                tracing::debug!(error = %err, "skipping an instance");
                continue;
            }
            Err(err) => return Err(err),
        };
        if answer.status == reqwest::StatusCode::NOT_FOUND && targets.len() > 1 {
            last = Some((target, answer));
            continue;
        }
        if let Some(code) = refusal(target, &answer) {
            return Ok(code);
        }
        let field = |key: &str| escaped(answer.body[key].as_str().unwrap_or("?"));
        match &args.action {
            _ if args.format == Format::Json => {
                println!("{}", serde_json::to_string_pretty(&answer.body)?);
            }
            ApprovalAction::Show { .. } => print_approval(&answer.body),
            ApprovalAction::Grants => print_grants(&answer.body),
            ApprovalAction::Revoke { .. } => {
                println!("grant {} revoked ({})", field("id"), field("tool"));
            }
            _ => {
                println!("{} {} ({})", field("id"), field("status"), field("tool"));
                if let Some(grant) = answer.body.get("grant") {
                    println!(
                        "grant {} for {} until {}",
                        escaped(grant["id"].as_str().unwrap_or("?")),
                        escaped(grant["principal"].as_str().unwrap_or("?")),
                        escaped(grant["expires_at"].as_str().unwrap_or("?"))
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    match last {
        Some((target, answer)) => Ok(refusal(target, &answer).unwrap_or(ExitCode::from(1))),
        None => {
            eprintln!("error: no running Tollgate could be reached; give --admin URL");
            Ok(ExitCode::from(2))
        }
    }
}

async fn list(
    client: &reqwest::Client,
    targets: &[Target],
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let [target] = targets {
        let answer = ask(client, target, &ApprovalAction::List { json }).await?;
        if let Some(code) = refusal(target, &answer) {
            return Ok(code);
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&answer.body)?);
        } else {
            print_table(&answer.body);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Several instances: each one's approvals, tagged with its admin URL.
    let mut all = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for target in targets {
        let about = target.about.as_deref().unwrap_or("");
        let answer = match ask(client, target, &ApprovalAction::List { json }).await {
            Ok(answer) => answer,
            Err(err) => {
                eprintln!(
                    "warning: {} ({about}): {}",
                    target.base,
                    super::serve::error_chain(&err)
                );
                continue;
            }
        };
        if let Some(failed) = refusal(target, &answer) {
            code = failed;
            continue;
        }
        let rows = answer.body.as_array().cloned().unwrap_or_default();
        if json {
            all.extend(rows.into_iter().map(|mut row| {
                row["admin"] = json!(target.base);
                row
            }));
        } else {
            println!("{} ({about}):", target.base);
            print_table(&Value::Array(rows));
            println!();
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(code)
}

fn cli_user() -> String {
    std::env::var("USER")
        .map(|u| format!("{u} (cli)"))
        .unwrap_or_else(|_| "cli".to_owned())
}

/// Text a call sent, safe for a terminal: control and bidirectional-override
/// characters are shown as `\u{…}` escapes, so nothing reorders or hides what is shown.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                format!("\\u{{{:04x}}}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The first characters of an approval's arguments, on one line.
fn preview(arguments: &Value) -> String {
    const SHOWN: usize = 40;
    let text = match arguments {
        Value::String(preview) => preview.clone(),
        other => other.to_string(),
    };
    let text = escaped(&text);
    if text.chars().count() <= SHOWN {
        return text;
    }
    let mut short: String = text.chars().take(SHOWN - 1).collect();
    short.push('…');
    short
}

fn print_approval(approval: &Value) {
    let field = |key: &str| escaped(approval.get(key).and_then(Value::as_str).unwrap_or("-"));
    for (label, key) in [
        ("id", "id"),
        ("status", "status"),
        ("server", "server"),
        ("tool", "tool"),
        ("client", "client"),
        ("session", "session"),
        ("principal", "principal"),
        ("rule", "rule"),
        ("reason", "reason"),
        ("created", "created_at"),
        ("deadline", "deadline"),
        ("decided by", "decided_by"),
        ("decision", "decision_reason"),
        ("valid until", "valid_until"),
        ("forwarded", "redeemed_at"),
    ] {
        if approval.get(key).is_some_and(|v| !v.is_null()) || matches!(key, "client" | "session") {
            println!("{label:<12} {}", field(key));
        }
    }
    let arguments = approval.get("arguments").unwrap_or(&Value::Null);
    let pretty = match arguments {
        // A settled approval keeps a preview of large arguments.
        Value::String(preview) => preview.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    println!("arguments:");
    for line in pretty.lines() {
        println!("  {}", escaped(line));
    }
}

fn print_grants(list: &Value) {
    let rows = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        println!("no active grants");
        return;
    }
    println!(
        "{:<18} {:<28} {:<14} {:<24} {:<6} {:<10} EXPIRES",
        "ID", "TOOL", "SERVER", "FOR", "USES", "BY"
    );
    for row in rows {
        let field = |key: &str| escaped(row.get(key).and_then(Value::as_str).unwrap_or("-"));
        println!(
            "{:<18} {:<28} {:<14} {:<24} {:<6} {:<10} {}",
            field("id"),
            field("tool"),
            field("server"),
            format!("{} {}", field("scope"), field("principal")),
            row.get("uses").and_then(Value::as_u64).unwrap_or(0),
            field("granted_by"),
            field("expires_at")
        );
    }
}

/// Who asked, as the table shows it: the client's name (or the token's user), else,
/// for an anonymous caller, what tells it apart: its session or its address
/// (`principal`, `session:<id>` or `peer:<address>`).
fn caller(row: &Value) -> String {
    let text = |key: &str| row.get(key).and_then(Value::as_str);
    let named = text("client")
        .or_else(|| text("client_id"))
        .or_else(|| text("user"));
    escaped(named.or_else(|| text("principal")).unwrap_or("-"))
}

fn print_table(list: &Value) {
    let rows = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        println!("no approvals");
        return;
    }
    println!(
        "{:<26} {:<10} {:<28} {:<14} {:<16} {:<24} ARGUMENTS",
        "ID", "STATUS", "TOOL", "SERVER", "CALLER", "DEADLINE"
    );
    for row in rows {
        let field = |key: &str| escaped(row.get(key).and_then(Value::as_str).unwrap_or("-"));
        println!(
            "{:<26} {:<10} {:<28} {:<14} {:<16} {:<24} {}",
            field("id"),
            field("status"),
            field("tool"),
            field("server"),
            caller(row),
            field("deadline"),
            preview(row.get("arguments").unwrap_or(&Value::Null))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_call_sent_is_shown_escaped_and_previews_are_short() {
        assert_eq!(escaped("a\u{202e}b\u{7}c"), "a\\u{202e}b\\u{0007}c");
        assert_eq!(escaped("plain é"), "plain é");
        let long = json!({"text": "x".repeat(100)});
        let shown = preview(&long);
        assert_eq!(shown.chars().count(), 40);
        assert!(shown.starts_with("{\"text\":\"xxx") && shown.ends_with('…'));
        assert_eq!(preview(&json!({"a": 1})), "{\"a\":1}");
    }
}
