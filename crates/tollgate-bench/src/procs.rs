//! The processes of a measurement: demo upstreams, Tollgate and nginx, each killed
//! when the lab is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A started process and the URL it serves.
#[derive(Debug, Clone)]
pub struct Child {
    /// Its MCP endpoint.
    pub url: String,
    pid: u32,
}

impl Child {
    /// User + system CPU time of the whole process (all threads).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("malformed /proc stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        // Linux reports in clock ticks of 1/100 s (USER_HZ).
        Ok(Duration::from_millis(ticks * 10))
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("VmRSS value")?
            .parse()?;
        Ok(kib * 1024)
    }
}

/// Owns every process started for a measurement.
pub struct Lab {
    dir: PathBuf,
    children: Vec<std::process::Child>,
    counter: usize,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Lab {
    /// A lab with its own temporary directory.
    pub fn new() -> anyhow::Result<Lab> {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Lab {
            dir,
            children: Vec::new(),
            counter: 0,
        })
    }

    /// Kills everything started so far.
    pub fn stop_all(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `cmd`, returning once it prints a line matching `prefix` (the rest is the URL).
    fn start(&mut self, mut cmd: Command, prefix: &str) -> anyhow::Result<Child> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("no stdout")?;
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix(prefix) {
                        return Ok(Child {
                            url: url.trim().to_owned(),
                            pid,
                        });
                    }
                }
                Err(_) => break,
            }
        }
        bail!("{cmd:?} did not print `{prefix}` within 20s")
    }

    /// The demo upstream, answering with JSON or SSE, adding `latency_ms` per call.
    pub async fn demo_upstream(
        &mut self,
        tollgate: &Path,
        sse: bool,
        latency_ms: u64,
    ) -> anyhow::Result<Child> {
        self.demo_upstream_with(tollgate, sse, latency_ms, 0).await
    }

    /// [`Lab::demo_upstream`] listing `extra_tools` more tools in `tools/list`.
    pub async fn demo_upstream_with(
        &mut self,
        tollgate: &Path,
        sse: bool,
        latency_ms: u64,
        extra_tools: usize,
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(tollgate);
        cmd.args([
            "demo-upstream",
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            &latency_ms.to_string(),
        ]);
        if sse {
            cmd.arg("--sse");
        }
        if extra_tools > 0 {
            cmd.args(["--extra-tools", &extra_tools.to_string()]);
        }
        self.start(cmd, "Demo MCP server listening on ")
    }

    /// The lab's own directory (scripts, bodies, audit logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tollgate in front of `upstream` with the 50-rule policy.
    pub async fn tollgate(&mut self, tollgate: &Path, upstream: &str) -> anyhow::Result<Child> {
        self.tollgate_with(tollgate, upstream, &fifty_rule_policy(), "")
            .await
    }

    /// Tollgate with a given policy and extra configuration lines.
    pub async fn tollgate_with(
        &mut self,
        tollgate: &Path,
        upstream: &str,
        policy_text: &str,
        extra: &str,
    ) -> anyhow::Result<Child> {
        self.counter += 1;
        let policy = self.dir.join(format!("policy{}.yaml", self.counter));
        std::fs::write(&policy, policy_text)?;
        let config = self.dir.join(format!("tollgate{}.yaml", self.counter));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\nlimits: {{requests_per_second: 0, max_sessions: 50000, sessions_per_client: 50000}}\n{extra}\nservers:\n  bench:\n    url: {upstream}\n    policy: {}\n",
                policy.display()
            ),
        )?;
        let mut cmd = Command::new(tollgate);
        // Default settings, as users run it: INFO logs (to /dev/null here).
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG");
        // Tollgate's worker threads (tokio reads this); the bench's own runtime is not affected.
        if let Ok(threads) = std::env::var("TOLLGATE_BENCH_PROXY_THREADS") {
            cmd.env("TOKIO_WORKER_THREADS", threads);
        }
        self.start(cmd, "Tollgate listening on ")
    }

    /// A redis-server of its own on a free loopback port, keeping nothing on disk;
    /// returns its port.
    pub async fn redis(&mut self) -> anyhow::Result<u16> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start redis-server (apt-get install redis-server)")?;
        self.children.push(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("redis-server did not listen on {port} within 10s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(port)
    }

    /// nginx as a plain reverse proxy: one worker, keep-alive to the upstream, no buffering.
    pub async fn nginx(&mut self, upstream: &str) -> anyhow::Result<Child> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("nginx not found")?;
        let port = free_port()?;
        let target = upstream
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        self.counter += 1;
        let prefix = self.dir.join(format!("nginx{}", self.counter));
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                // One process that serves (no master): killing it leaves no orphaned worker.
                "master_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_max_body_size 16m;\n  client_body_buffer_size 2m;\n  client_body_temp_path {p};\n  proxy_temp_path {p};\n  upstream up {{ server {target}; keepalive 256; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://up;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
                p = prefix.display()
            ),
        )?;
        let child = Command::new(nginx)
            .args(["-p"])
            .arg(&prefix)
            .args(["-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let pid = child.id();
        self.children.push(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("nginx did not listen on {port} within 10s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = upstream.splitn(4, '/').nth(3).unwrap_or("mcp");
        Ok(Child {
            url: format!("http://127.0.0.1:{port}/{path}"),
            pid,
        })
    }
}

/// 49 rules that do not match, then the called tool with an argument schema: a
/// first-match policy's worst case.
pub fn fifty_rule_policy() -> String {
    rule_policy(50)
}

/// [`fifty_rule_policy`] with `rules` rules in all.
pub fn rule_policy(rules: usize) -> String {
    let mut text = String::from("version: 1\ndefault: deny\nrules:\n");
    for i in 0..rules.saturating_sub(1) {
        let (tool, action) = match i % 3 {
            0 => (format!("admin_tool_{i}"), "deny"),
            1 => (format!("report_{i}_*"), "allow"),
            _ => (format!("export_{i}"), "require_approval"),
        };
        text.push_str(&format!("  - tool: \"{tool}\"\n    action: {action}\n"));
    }
    text.push_str(concat!(
        "  - tool: describe_fhir_export_job\n    action: allow\n    rate_limit: { max: 1000000, window: 1s }\n",
        "    arguments:\n      type: object\n      required: [datastore_id, job_id]\n      properties:\n",
        "        datastore_id: { type: string, pattern: \"^[A-Za-z0-9]{32}$\" }\n        job_id: { type: string, maxLength: 64 }\n",
    ));
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    #[test]
    fn the_fifty_rule_policy_has_fifty_rules() {
        let text = super::fifty_rule_policy();
        assert_eq!(text.matches("  - tool:").count(), 50);
        assert!(text.contains("pattern"));
        assert_eq!(super::rule_policy(1000).matches("  - tool:").count(), 1000);
    }
}
