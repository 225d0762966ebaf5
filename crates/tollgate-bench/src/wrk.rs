//! `wrk` as the load generator: it spends far less CPU per request than the built-in
//! one, so it shows more of a proxy's own cost (`apt-get install wrk`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::load::Cell;

/// Where `wrk` is, if installed.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("wrk"))
        .find(|candidate| candidate.is_file())
}

/// Runs `wrk -t1 -c<concurrency>` for `duration`, POSTing `body` with `headers` to
/// `url`. `dir` holds the Lua script and body.
pub fn run(
    wrk: &Path,
    dir: &Path,
    url: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Cell> {
    let body_file = dir.join("wrk-body.json");
    std::fs::write(&body_file, body)?;
    let mut script = format!(
        "local f = assert(io.open({:?}, \"rb\"))\nwrk.method = \"POST\"\nwrk.body = f:read(\"*a\")\nf:close()\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.headers[\"Accept\"] = \"application/json, text/event-stream\"\n",
        body_file.display().to_string()
    );
    for (name, value) in headers {
        script.push_str(&format!("wrk.headers[{name:?}] = {value:?}\n"));
    }
    let script_file = dir.join("wrk.lua");
    std::fs::write(&script_file, script)?;
    let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
    let output = Command::new(wrk)
        .args(["-t1", &format!("-c{concurrency}"), &format!("-d{secs}s")])
        .args(["--timeout", "10s", "--latency", "-s"])
        .arg(&script_file)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", wrk.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

/// Reads requests, duration, errors and the 50th/99th percentile latencies.
fn parse(text: &str) -> anyhow::Result<Cell> {
    let mut cell = Cell::default();
    let mut seconds = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => cell.p50_us = micros(value)?,
            ["99%", value] => cell.p99_us = micros(value)?,
            [count, "requests", "in", elapsed, ..] => {
                cell.calls = count.parse()?;
                seconds = Some(micros(elapsed.trim_end_matches(','))? / 1e6);
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                cell.errors += count.parse::<usize>()?
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        cell.errors += n.trim_end_matches(',').parse::<usize>()?;
                    }
                }
            }
            _ => {}
        }
    }
    let seconds = seconds.context("no `requests in` line")?;
    cell.rps = cell.calls as f64 / seconds.max(1e-9);
    Ok(cell)
}

/// `123.45us`, `1.20ms`, `2.00s`, `10.00m` in microseconds.
fn micros(value: &str) -> anyhow::Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .context("a duration without a unit")?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse()?;
    Ok(number
        * match unit {
            "us" => 1.0,
            "ms" => 1e3,
            "s" => 1e6,
            "m" => 60e6,
            other => bail!("unknown unit {other}"),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_wrks_report() {
        let report = "Running 2s test @ http://127.0.0.1:1/mcp
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.62ms  336.21us   7.07ms   87.10%
    Req/Sec    39.61k     1.50k   41.52k    80.00%
  Latency Distribution
     50%    1.55ms
     75%    1.71ms
     90%    1.95ms
     99%    2.90ms
  78830 requests in 2.00s, 27.06MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  39411.56
Transfer/sec:     13.53MB
";
        let cell = parse(report).unwrap();
        assert_eq!(cell.calls, 78830);
        assert!((cell.rps - 39415.0).abs() < 1.0);
        assert_eq!(cell.p50_us, 1550.0);
        assert_eq!(cell.p99_us, 2900.0);
        assert_eq!(cell.errors, 7);
        assert_eq!(micros("812.00us").unwrap(), 812.0);
    }
}
