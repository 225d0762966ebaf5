//! `tollgate approvals list | show ID | approve ID | deny ID --reason TEXT`: the admin
//! API from a terminal. Without `--admin` it asks every running Tollgate of this user
//! (see `instances`), else `http://127.0.0.1:9090`.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

/// Arguments of `tollgate approvals`.
#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// The admin listener's URL. Without it: every running Tollgate of this user
    /// (recorded in $XDG_RUNTIME_DIR/tollgate or ~/.local/state/tollgate), else
    /// http://127.0.0.1:9090.
    #[arg(long, global = true, env = "TOLLGATE_ADMIN_URL")]
    pub admin: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub action: ApprovalAction,
}

/// `approvals` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ApprovalAction {
    /// Pending and recently settled approvals, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One approval, with its arguments.
    Show {
        /// The approval's id.
        id: String,
    },
    /// Approve a pending call: it is forwarded upstream.
    Approve {
        /// The approval's id.
        id: String,
        /// A note for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending call: the agent gets the reason.
    Deny {
        /// The approval's id.
        id: String,
        /// Why; the agent sees it.
        #[arg(long)]
        reason: Option<String>,
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
        ApprovalAction::Approve { id, reason } => client
            .post(format!("{base}/approvals/{id}/approve"))
            .json(&json!({"reason": reason, "by": cli_user()})),
        ApprovalAction::Deny { id, reason } => client
            .post(format!("{base}/approvals/{id}/deny"))
            .json(&json!({"reason": reason, "by": cli_user()})),
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
        return list(&client, targets, *json).await;
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
        match &args.action {
            ApprovalAction::Show { .. } => {
                println!("{}", serde_json::to_string_pretty(&answer.body)?);
            }
            _ => println!(
                "{} {} ({})",
                answer.body["id"].as_str().unwrap_or("?"),
                answer.body["status"].as_str().unwrap_or("?"),
                answer.body["tool"].as_str().unwrap_or("?")
            ),
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

fn print_table(list: &Value) {
    let rows = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        println!("no approvals");
        return;
    }
    println!(
        "{:<26} {:<10} {:<28} {:<14} {:<16} DEADLINE",
        "ID", "STATUS", "TOOL", "SERVER", "CLIENT"
    );
    for row in rows {
        let field = |key: &str| {
            row.get(key)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "{:<26} {:<10} {:<28} {:<14} {:<16} {}",
            field("id"),
            field("status"),
            field("tool"),
            field("server"),
            field("client"),
            field("deadline")
        );
    }
}
