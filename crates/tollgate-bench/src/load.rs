//! The closed-loop load generator: N workers, each its own MCP session, each
//! issuing `tools/call` back to back for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Which MCP era the workers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// `initialize` once, then calls with `Mcp-Session-Id`.
    Handshake,
    /// 2026-07-28: `_meta` in every call and the routing headers.
    Stateless,
}

/// An MCP endpoint and a pooled HTTP client for it.
#[derive(Clone)]
pub struct Target {
    url: Arc<str>,
    http: reqwest::Client,
}

impl Target {
    /// A target with a fresh connection pool.
    pub fn new(url: &str) -> Target {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Target {
            url: url.into(),
            http,
        }
    }
}

impl Target {
    /// A POST to the endpoint with these headers and body.
    pub fn post(
        &self,
        headers: &[(&'static str, String)],
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&*self.url)
            .header("accept", "application/json, text/event-stream");
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        request.json(body)
    }

    /// A DELETE of the session named in `headers`.
    pub fn delete(&self, headers: &[(&'static str, String)]) -> reqwest::RequestBuilder {
        let mut request = self.http.delete(&*self.url);
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        request
    }
}

/// One measurement, whichever load generator made it.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// Calls per second.
    pub rps: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Calls answered in the window.
    pub calls: usize,
    /// Failed calls.
    pub errors: usize,
}

/// What each call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `describe_fhir_export_job` with two small arguments.
    Call,
    /// The same with one more argument of this many bytes.
    BigCall(usize),
    /// `tools/list`.
    ToolsList,
}

/// Latencies and counts of one run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful calls in the measured window.
    pub calls: usize,
    /// Failed calls.
    pub errors: usize,
    /// Sorted latencies, microseconds.
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

impl Stats {
    /// Calls per second.
    pub fn rps(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency in microseconds (100 = max).
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }

    /// The figures a comparison reads.
    pub fn cell(&self) -> Cell {
        Cell {
            rps: self.rps(),
            p50_us: self.percentile(50.0),
            p99_us: self.percentile(99.0),
            calls: self.calls,
            errors: self.errors,
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

const DATASTORE: &str = "0123456789abcdef0123456789abcdef";

/// The JSON-RPC request of a workload.
pub fn body(workload: Workload, id: u64, era: Era) -> Value {
    let mut body = match workload {
        Workload::ToolsList => {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": {}})
        }
        _ => json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "describe_fhir_export_job", "arguments": {"datastore_id": DATASTORE, "job_id": "job-1"}}}),
    };
    if let Workload::BigCall(size) = workload {
        body["params"]["arguments"]["blob"] = json!("x".repeat(size));
    }
    if era == Era::Stateless {
        body["params"]["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}});
    }
    body
}

/// One worker's session: the headers every call carries.
pub async fn open(target: &Target, era: Era) -> anyhow::Result<Vec<(&'static str, String)>> {
    open_for(target, era, Workload::Call).await
}

/// [`open`] for a workload (the stateless era's routing headers name its method).
pub async fn open_for(
    target: &Target,
    era: Era,
    workload: Workload,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    match era {
        Era::Stateless if workload == Workload::ToolsList => Ok(vec![
            ("mcp-protocol-version", "2026-07-28".into()),
            ("mcp-method", "tools/list".into()),
        ]),
        Era::Stateless => Ok(vec![
            ("mcp-protocol-version", "2026-07-28".into()),
            ("mcp-method", "tools/call".into()),
            ("mcp-name", "describe_fhir_export_job".into()),
        ]),
        Era::Handshake => {
            let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "tollgate-bench", "version": "1"}}});
            let response = target
                .http
                .post(&*target.url)
                .header("accept", "application/json, text/event-stream")
                .json(&init)
                .send()
                .await?;
            let session = response
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            response.bytes().await?;
            let mut headers = vec![("mcp-protocol-version", "2025-11-25".to_owned())];
            if let Some(session) = session {
                headers.push(("mcp-session-id", session));
            }
            let mut note = target
                .http
                .post(&*target.url)
                .header("accept", "application/json, text/event-stream");
            for (k, v) in &headers {
                note = note.header(*k, v);
            }
            note.json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
                .send()
                .await?
                .bytes()
                .await?;
            Ok(headers)
        }
    }
}

async fn one_call(target: &Target, headers: &[(&'static str, String)], body: &Value) -> bool {
    let mut request = target
        .http
        .post(&*target.url)
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    match request.json(body).send().await {
        Ok(response) if response.status().is_success() => match response.bytes().await {
            Ok(bytes) => contains(&bytes, b"\"result\"") && !contains(&bytes, b"\"isError\":true"),
            Err(_) => false,
        },
        _ => false,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `concurrency` workers doing `workload` for `duration`.
pub async fn run_workload(
    target: &Target,
    era: Era,
    workload: Workload,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let mut workers = Vec::new();
    let start = Instant::now();
    for w in 0..concurrency {
        let target = target.clone();
        workers.push(tokio::spawn(async move {
            let headers = open_for(&target, era, workload).await?;
            let deadline = Instant::now() + duration;
            let (mut latencies, mut errors, mut id) = (Vec::new(), 0usize, (w as u64) << 32);
            while Instant::now() < deadline {
                id += 1;
                let body = body(workload, id, era);
                let started = Instant::now();
                if one_call(&target, &headers, &body).await {
                    latencies
                        .push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    let mut stats = Stats::default();
    for worker in workers {
        let (latencies, errors) = worker.await??;
        stats.latencies_us.extend(latencies);
        stats.errors += errors;
    }
    stats.elapsed = start.elapsed();
    stats.calls = stats.latencies_us.len();
    stats.latencies_us.sort_unstable();
    Ok(stats)
}

/// Opens `n` handshake-era sessions and leaves them idle.
pub async fn open_sessions(target: &Target, n: usize) -> anyhow::Result<()> {
    for opened in 0..n {
        let headers = open(target, Era::Handshake).await?;
        anyhow::ensure!(
            headers.iter().any(|(name, _)| *name == "mcp-session-id"),
            "only {opened} of {n} sessions opened (limits.max_sessions, limits.sessions_per_client?)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&[7], 50.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn stateless_calls_carry_the_meta_envelope() {
        let body = body(Workload::Call, 1, Era::Stateless);
        assert_eq!(
            body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
        assert!(
            super::body(Workload::Call, 1, Era::Handshake)["params"]
                .get("_meta")
                .is_none()
        );
    }
}
