//! `tollgate approvals list | approve ID | deny ID --reason TEXT`: the admin API from a terminal.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

/// Arguments of `tollgate approvals`.
#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// The admin listener's URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9090",
        env = "TOLLGATE_ADMIN_URL"
    )]
    pub admin: String,
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
    match runtime.block_on(execute(&args, token.as_deref())) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", super::serve::error_chain(&err));
            ExitCode::from(2)
        }
    }
}

async fn execute(args: &ApprovalsArgs, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let base = args.admin.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let with_token = |request: reqwest::RequestBuilder| match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let (request, list_json) = match &args.action {
        ApprovalAction::List { json } => (client.get(format!("{base}/approvals")), Some(*json)),
        ApprovalAction::Approve { id, reason } => (
            client
                .post(format!("{base}/approvals/{id}/approve"))
                .json(&json!({"reason": reason, "by": cli_user()})),
            None,
        ),
        ApprovalAction::Deny { id, reason } => (
            client
                .post(format!("{base}/approvals/{id}/deny"))
                .json(&json!({"reason": reason, "by": cli_user()})),
            None,
        ),
    };
    let response = with_token(request)
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {base}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == reqwest::StatusCode::UNAUTHORIZED {
        eprintln!(
            "error: the admin API refused the token; set TOLLGATE_ADMIN_TOKEN to admin.token"
        );
        return Ok(ExitCode::from(2));
    }
    if !status.is_success() {
        let message = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request failed");
        eprintln!("error: {message} (HTTP {status})");
        return Ok(ExitCode::from(1));
    }
    match list_json {
        Some(true) => println!("{}", serde_json::to_string_pretty(&body)?),
        Some(false) => print_table(&body),
        None => println!(
            "{} {} ({})",
            body["id"].as_str().unwrap_or("?"),
            body["status"].as_str().unwrap_or("?"),
            body["tool"].as_str().unwrap_or("?")
        ),
    }
    Ok(ExitCode::SUCCESS)
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
