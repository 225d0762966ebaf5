//! `tollgate-bench diff`: how long `tollgate diff` takes over a large audit log.
//!
//! Writes an audit log of `records` decision records (as the proxy writes them,
//! docs/audit.md: a dozen tools, 50 clients, 200 sessions, one call every 10 ms,
//! arguments logged, an outcome record after each allowed call), and two versions of
//! a policy that differ in a deny rule, a rate limit and an argument schema; then
//! times `tollgate diff OLD NEW --audit LOG` (the best of `runs`) and prints the
//! figure with the command, as markdown.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const OLD: &str = "version: 1
default: deny
rules:
  - tool: start_export
    action: require_approval
    rate_limit: {max: 10, window: 1m}
    arguments:
      type: object
      required: [bucket]
      properties: {bucket: {type: string, pattern: '^approved-'}}
  - tool: delete_*
    action: deny
  - tool: list_*
    action: allow
  - tool: get_*
    action: allow
  - tool: search_*
    action: allow
    rate_limit: {max: 60, window: 1m, per: client}
";

const NEW: &str = "version: 1
default: deny
rules:
  - tool: start_export
    action: require_approval
    rate_limit: {max: 5, window: 1m}
    arguments:
      type: object
      required: [bucket]
      properties: {bucket: {type: string, pattern: '^approved-eu-'}}
  - tool: delete_*
    action: deny
  - tool: list_secrets
    action: deny
  - tool: list_*
    action: allow
  - tool: get_*
    action: allow
  - tool: search_*
    action: allow
    rate_limit: {max: 30, window: 1m, per: client}
";

const TOOLS: [&str; 12] = [
    "list_buckets",
    "list_secrets",
    "list_jobs",
    "get_object",
    "get_job",
    "search_logs",
    "search_events",
    "start_export",
    "delete_bucket",
    "drop_table",
    "get_config",
    "list_users",
];

/// `2026-01-01T00:00:00.000Z` plus `ms` milliseconds (less than a day).
fn time(ms: u64) -> String {
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        "2026-01-01T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn write_log(path: &Path, records: u64) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let mut out = std::io::BufWriter::new(file);
    let mut line = String::with_capacity(512);
    let mut lines = 0;
    for i in 0..records {
        let tool = TOOLS[(i * 7 % 12) as usize];
        let client = i % 50;
        let session = i % 200;
        let at = time(i * 10);
        let arguments = match tool {
            "start_export" if i % 3 == 0 => "{\"bucket\":\"approved-us-1\",\"format\":\"ndjson\"}",
            "start_export" => "{\"bucket\":\"approved-eu-1\",\"format\":\"ndjson\"}",
            "search_logs" | "search_events" => "{\"query\":\"status:500\",\"limit\":100}",
            _ => "{\"id\":\"0123456789abcdef\"}",
        };
        line.clear();
        let _ = writeln!(
            line,
            "{{\"event\":\"decision\",\"call_id\":\"0190c0de-0000-7000-8000-{i:012}\",\"server\":\"s\",\"client\":\"agent-{client}\",\"session\":\"sess-{session}\",\"tool\":\"{tool}\",\"decision\":\"allow\",\"kind\":null,\"rule\":\"rules[2] (list_*)\",\"reason\":\"`{tool}` is allowed by rules[2] (list_*)\",\"mode\":\"enforce\",\"arguments_digest\":\"sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef\",\"arguments\":{arguments},\"time\":\"{at}\",\"run\":\"0190c0de-0000-7000-8000-000000000000\"}}"
        );
        out.write_all(line.as_bytes())?;
        lines += 1;
        if i % 2 == 0 {
            line.clear();
            let _ = writeln!(
                line,
                "{{\"event\":\"outcome\",\"call_id\":\"0190c0de-0000-7000-8000-{i:012}\",\"server\":\"s\",\"tool\":\"{tool}\",\"upstream_latency_ms\":1.2,\"outcome\":\"ok\",\"time\":\"{at}\",\"run\":\"0190c0de-0000-7000-8000-000000000000\"}}"
            );
            out.write_all(line.as_bytes())?;
            lines += 1;
        }
    }
    out.flush()?;
    Ok(lines)
}

/// Runs the benchmark and prints its markdown.
pub fn run(tollgate: &Path, records: u64, runs: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(tollgate, &dir, records, runs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(tollgate: &Path, dir: &Path, records: u64, runs: usize) -> anyhow::Result<()> {
    let (old, new, log) = (
        dir.join("old.yaml"),
        dir.join("new.yaml"),
        dir.join("audit.jsonl"),
    );
    std::fs::write(&old, OLD)?;
    std::fs::write(&new, NEW)?;
    let lines = write_log(&log, records)?;
    let size = std::fs::metadata(&log)?.len();
    let mut best = Duration::MAX;
    let mut summary = String::new();
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let out = std::process::Command::new(tollgate)
            .arg("diff")
            .args([&old, &new])
            .arg("--audit")
            .arg(&log)
            .args(["--format", "json"])
            .stdin(std::process::Stdio::null())
            .output()
            .context("run tollgate diff")?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "tollgate diff failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        best = best.min(took);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        summary = format!(
            "{} calls: {} changed, {} unchanged, {} undetermined",
            report["calls"], report["changed"], report["unchanged"], report["undetermined"]
        );
    }
    println!(
        "| records (decision) | lines | log size | `tollgate diff` (best of {runs}) | calls per second | result |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {records} | {lines} | {:.1} MiB | {:.3} s | {:.0} | {summary} |",
        size as f64 / (1024.0 * 1024.0),
        best.as_secs_f64(),
        records as f64 / best.as_secs_f64()
    );
    Ok(())
}
