//! A bounded soak, and memory with calls held for approval.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::load::{self, Era, Target};
use crate::procs::Lab;

const SOAK_POLICY: &str = r#"
version: 1
default: deny
rules:
  - tool: describe_fhir_export_job
    action: allow
    arguments: { type: object, required: [datastore_id, job_id] }
  - tool: list_fhir_datastores
    action: allow
    rate_limit: { max: 3, window: 1s }
  - tool: delete_*
    action: deny
    reason: never
"#;

fn call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool,
        "arguments": {"datastore_id": "0123456789abcdef0123456789abcdef", "job_id": "j"}}})
}

#[derive(Default)]
struct Counts {
    allowed: AtomicUsize,
    denied: AtomicUsize,
    limited: AtomicUsize,
    sessions: AtomicUsize,
    errors: AtomicUsize,
}

async fn session_round(target: &Target, counts: &Counts) -> anyhow::Result<()> {
    let headers = load::open(target, Era::Handshake).await?;
    counts.sessions.fetch_add(1, Ordering::Relaxed);
    for i in 0..20u64 {
        let tool = match i % 4 {
            0 | 1 => "describe_fhir_export_job",
            2 => "list_fhir_datastores",
            _ => "delete_fhir_datastore",
        };
        let answer: Value = target
            .post(&headers, &call(i + 1, tool))
            .send()
            .await?
            .json()
            .await?;
        let kind = answer
            .pointer("/result/_meta/dev.tollgate~1decision/kind")
            .and_then(Value::as_str);
        let counter = match (kind, answer.pointer("/result/isError")) {
            (None, Some(Value::Bool(false))) => &counts.allowed,
            (Some("deny"), _) => &counts.denied,
            (Some("rate_limit"), _) => &counts.limited,
            _ => &counts.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    target.delete(&headers).send().await?;
    Ok(())
}

/// Runs the soak for `duration` and prints RSS over time.
pub async fn run(tollgate: &std::path::Path, duration: Duration) -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let upstream = lab.demo_upstream(tollgate, false, 0).await?;
    let proxy = Arc::new(
        lab.tollgate_with(tollgate, &upstream.url, SOAK_POLICY, "")
            .await?,
    );
    let counts = Arc::new(Counts::default());
    let target = Target::new(&proxy.url);
    let deadline = Instant::now() + duration;
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (target, counts) = (target.clone(), counts.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if session_round(&target, &counts).await.is_err() {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    println!("| seconds | RSS KiB | sessions opened | allowed | denied | rate limited | errors |");
    println!("|---|---|---|---|---|---|---|");
    let started = Instant::now();
    let every = (duration / 6).max(Duration::from_secs(1));
    loop {
        let row = |at: Duration| -> anyhow::Result<()> {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                at.as_secs(),
                proxy.rss()? / 1024,
                counts.sessions.load(Ordering::Relaxed),
                counts.allowed.load(Ordering::Relaxed),
                counts.denied.load(Ordering::Relaxed),
                counts.limited.load(Ordering::Relaxed),
                counts.errors.load(Ordering::Relaxed),
            );
            Ok(())
        };
        row(started.elapsed())?;
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    for worker in workers {
        let _ = worker.await;
    }
    lab.stop_all();
    Ok(())
}

/// RSS with `n` calls held for approval at once.
pub async fn pending_approvals(tollgate: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let upstream = lab.demo_upstream(tollgate, false, 0).await?;
    let policy = "version: 1\nrules:\n  - tool: start_fhir_export_job\n    action: require_approval\n    approval: {timeout: 600}\n";
    let proxy = lab
        .tollgate_with(
            tollgate,
            &upstream.url,
            policy,
            "admin: {listen: '127.0.0.1:0'}",
        )
        .await?;
    let before = proxy.rss()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .build()?;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "start_fhir_export_job",
        "arguments": {}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let mut held = Vec::new();
    for _ in 0..n {
        let request = http
            .post(&proxy.url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "start_fhir_export_job")
            .json(&body)
            .send();
        // The response headers arrive at once (an SSE stream); the body waits for a human.
        held.push(request.await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proxy.rss()?;
    println!();
    println!("| calls waiting for approval | RSS KiB | bytes per waiting call |");
    println!("|---|---|---|");
    println!("| 0 | {} | - |", before / 1024);
    println!(
        "| {n} | {} | {} |",
        after / 1024,
        after.saturating_sub(before) / n as u64
    );
    drop(held);
    lab.stop_all();
    Ok(())
}
