//! `tollgate-bench`: measures what Tollgate costs, as ratios against a baseline
//! measured in the same run.
//!
//! * `compare`: closed-loop MCP `tools/call` load against the demo upstream directly,
//!   through nginx (a plain reverse proxy: the cost of any extra HTTP hop), and through
//!   Tollgate with a 50-rule policy and an argument schema; JSON and SSE answers,
//!   handshake and stateless eras, concurrency 1/16/64, plus an upstream that takes 1 ms.
//! * `memory`: Tollgate's RSS with 0, 1,000 and 10,000 idle handshake-era sessions.
//! * `state`: the same rate-limited calls with `state.backend: memory` and `redis`
//!   (a redis-server of its own): added latency, CPU and Redis commands per call.
//!
//! Every process it starts is killed when it exits; every wait is bounded.

mod load;
mod procs;
mod soak;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use load::{Era, Stats, Target};
use procs::{Child, Lab};

#[derive(Debug, Parser)]
#[command(name = "tollgate-bench", about)]
struct Cli {
    /// The tollgate binary (build it with `cargo build --release -p mcp-tollgate`).
    #[arg(long, global = true, default_value = "target/release/tollgate")]
    tollgate: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Direct vs nginx vs Tollgate, side by side.
    Compare {
        /// Seconds per measurement cell.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        /// Print JSON lines instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// RSS per idle session, and with 1,000 calls waiting for approval.
    Memory,
    /// The shared state's cost: the same rate-limited calls with `state.backend`
    /// memory and redis, and the Redis round trips each call needs.
    State {
        /// Seconds per measurement cell.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
    },
    /// Mixed allowed, denied and rate-limited calls with sessions opening and closing.
    Soak {
        /// How long.
        #[arg(long, default_value_t = 180)]
        secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tollgate = std::fs::canonicalize(&cli.tollgate).with_context(|| {
        format!(
            "{}: build it first: cargo build --release -p mcp-tollgate",
            cli.tollgate.display()
        )
    })?;
    runtime.block_on(async {
        match cli.command {
            Command::Compare {
                secs,
                concurrency,
                json,
            } => compare(&tollgate, Duration::from_secs_f64(secs), &concurrency, json).await,
            Command::Memory => memory(&tollgate).await,
            Command::State { secs, concurrency } => {
                state(&tollgate, Duration::from_secs_f64(secs), &concurrency).await
            }
            Command::Soak { secs } => soak::run(&tollgate, Duration::from_secs(secs)).await,
        }
    })
}

struct Row {
    response: &'static str,
    era: Era,
    concurrency: usize,
    direct: Stats,
    nginx: Option<Stats>,
    tollgate: Stats,
    tollgate_cpu_us: f64,
    upstream_cpu_us: f64,
}

async fn measure(
    target: &Target,
    era: Era,
    concurrency: usize,
    secs: Duration,
) -> anyhow::Result<Stats> {
    // A short warm-up fills connection pools and caches.
    load::run(target, era, concurrency, Duration::from_millis(300)).await?;
    load::run(target, era, concurrency, secs).await
}

async fn compare(
    tollgate: &std::path::Path,
    secs: Duration,
    levels: &[usize],
    json: bool,
) -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let mut rows = Vec::new();
    for (response, sse) in [("json", false), ("sse", true)] {
        let upstream = lab.demo_upstream(tollgate, sse, 0).await?;
        let proxy = lab.tollgate(tollgate, &upstream.url).await?;
        let nginx = lab.nginx(&upstream.url).await.ok();
        if nginx.is_none() {
            eprintln!(
                "nginx is not installed: the nginx column is skipped (apt-get install nginx)"
            );
        }
        for era in [Era::Handshake, Era::Stateless] {
            for &concurrency in levels {
                let direct = measure(&Target::new(&upstream.url), era, concurrency, secs).await?;
                let nginx_stats = match &nginx {
                    Some(n) => Some(measure(&Target::new(&n.url), era, concurrency, secs).await?),
                    None => None,
                };
                let (tg_cpu0, up_cpu0) = (proxy.cpu_time()?, upstream.cpu_time()?);
                let through = measure(&Target::new(&proxy.url), era, concurrency, secs).await?;
                let calls = (through.calls + through.warmup_calls).max(1) as f64;
                let tollgate_cpu_us = (proxy.cpu_time()? - tg_cpu0).as_secs_f64() * 1e6 / calls;
                let upstream_cpu_us = (upstream.cpu_time()? - up_cpu0).as_secs_f64() * 1e6 / calls;
                let row = Row {
                    response,
                    era,
                    concurrency,
                    direct,
                    nginx: nginx_stats,
                    tollgate: through,
                    tollgate_cpu_us,
                    upstream_cpu_us,
                };
                if json {
                    println!("{}", row_json(&row));
                } else {
                    eprintln!("measured {response} {era:?} c={concurrency}");
                }
                rows.push(row);
            }
        }
        lab.stop_all();
    }
    // An upstream that takes 1 ms per call: Tollgate's share of a realistic call.
    let slow = lab.demo_upstream(tollgate, false, 1).await?;
    let proxy = lab.tollgate(tollgate, &slow.url).await?;
    let slow_direct = measure(&Target::new(&slow.url), Era::Stateless, 64, secs).await?;
    let slow_proxied = measure(&Target::new(&proxy.url), Era::Stateless, 64, secs).await?;
    lab.stop_all();

    if json {
        println!(
            "{}",
            serde_json::json!({"slow_upstream_1ms": {"direct_rps": slow_direct.rps(), "tollgate_rps": slow_proxied.rps(),
            "ratio": slow_proxied.rps() / slow_direct.rps()}})
        );
        return Ok(());
    }
    println!(
        "| answer | era | conc | direct rps | nginx rps | tollgate rps | tollgate/direct | tollgate/nginx | added p50 µs (nginx) | added p99 µs (nginx) | tollgate CPU µs/call | upstream CPU µs/call | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let nginx_rps = r
            .nginx
            .as_ref()
            .map_or("-".to_owned(), |n| format!("{:.0}", n.rps()));
        let vs_nginx = r.nginx.as_ref().map_or("-".to_owned(), |n| {
            format!("{:.2}", r.tollgate.rps() / n.rps())
        });
        let added = |p: f64| {
            let tg = r.tollgate.percentile(p) - r.direct.percentile(p);
            let ng = r.nginx.as_ref().map_or("-".to_owned(), |n| {
                format!("{:.0}", n.percentile(p) - r.direct.percentile(p))
            });
            format!("{tg:.0} ({ng})")
        };
        println!(
            "| {} | {:?} | {} | {:.0} | {} | {:.0} | {:.2} | {} | {} | {} | {:.1} | {:.1} | {} |",
            r.response,
            r.era,
            r.concurrency,
            r.direct.rps(),
            nginx_rps,
            r.tollgate.rps(),
            r.tollgate.rps() / r.direct.rps(),
            vs_nginx,
            added(50.0),
            added(99.0),
            r.tollgate_cpu_us,
            r.upstream_cpu_us,
            r.tollgate.errors + r.direct.errors,
        );
    }
    println!();
    println!(
        "1 ms upstream, stateless, c=64: direct {:.0} rps, tollgate {:.0} rps, ratio {:.3}",
        slow_direct.rps(),
        slow_proxied.rps(),
        slow_proxied.rps() / slow_direct.rps()
    );
    Ok(())
}

fn row_json(r: &Row) -> serde_json::Value {
    let stats = |s: &Stats| {
        serde_json::json!({"rps": s.rps(), "p50_us": s.percentile(50.0), "p90_us": s.percentile(90.0),
        "p99_us": s.percentile(99.0), "max_us": s.percentile(100.0), "errors": s.errors, "calls": s.calls})
    };
    serde_json::json!({
        "answer": r.response, "era": format!("{:?}", r.era), "concurrency": r.concurrency,
        "direct": stats(&r.direct), "nginx": r.nginx.as_ref().map(stats), "tollgate": stats(&r.tollgate),
        "tollgate_cpu_us_per_call": r.tollgate_cpu_us, "upstream_cpu_us_per_call": r.upstream_cpu_us,
    })
}

/// Round trips Tollgate made to Redis for requests, from its `/metrics`.
async fn round_trips(admin: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("tollgate_state_round_trips_total "))
        .context("no tollgate_state_round_trips_total in /metrics")?
        .trim()
        .parse()
        .context("tollgate_state_round_trips_total")
}

async fn state(tollgate: &std::path::Path, secs: Duration, levels: &[usize]) -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let port = lab.redis().await?;
    let upstream = lab.demo_upstream(tollgate, false, 0).await?;
    let policy = procs::fifty_rule_policy();
    let memory = lab
        .tollgate_with(tollgate, &upstream.url, &policy, "")
        .await?;
    let admin_port = procs::free_port()?;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let redis_state = format!(
        "state: {{backend: redis, url: 'redis://127.0.0.1:{port}/0', prefix: 'bench:'}}\nadmin: {{listen: '127.0.0.1:{admin_port}'}}"
    );
    let redis = lab
        .tollgate_with(tollgate, &upstream.url, &policy, &redis_state)
        .await?;
    println!(
        "| era | conc | memory rps | redis rps | redis/memory | memory p50 µs | redis p50 µs | added p50 µs | added p99 µs | memory CPU µs/call | redis CPU µs/call | Redis round trips/call | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for era in [Era::Handshake, Era::Stateless] {
        for &concurrency in levels {
            let cpu0 = memory.cpu_time()?;
            let local = measure(&Target::new(&memory.url), era, concurrency, secs).await?;
            let local_calls = (local.calls + local.warmup_calls).max(1) as f64;
            let local_cpu = (memory.cpu_time()? - cpu0).as_secs_f64() * 1e6 / local_calls;
            let target = Target::new(&redis.url);
            // Warmed up apart, so that only the measured calls' round trips are counted.
            load::run(&target, era, concurrency, Duration::from_millis(300)).await?;
            let (cpu0, trips0) = (redis.cpu_time()?, round_trips(&admin).await?);
            let shared = load::run(&target, era, concurrency, secs).await?;
            let calls = (shared.calls + shared.warmup_calls + shared.errors).max(1) as f64;
            let trips = (round_trips(&admin).await? - trips0) as f64;
            let shared_cpu = (redis.cpu_time()? - cpu0).as_secs_f64() * 1e6 / calls;
            println!(
                "| {era:?} | {concurrency} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {local_cpu:.1} | {shared_cpu:.1} | {:.2} | {} |",
                local.rps(),
                shared.rps(),
                shared.rps() / local.rps(),
                local.percentile(50.0),
                shared.percentile(50.0),
                shared.percentile(50.0) - local.percentile(50.0),
                shared.percentile(99.0) - local.percentile(99.0),
                trips / calls,
                local.errors + shared.errors,
            );
        }
    }
    lab.stop_all();
    Ok(())
}

async fn memory(tollgate: &std::path::Path) -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let upstream = lab.demo_upstream(tollgate, false, 0).await?;
    let proxy: Child = lab.tollgate(tollgate, &upstream.url).await?;
    let target = Target::new(&proxy.url);
    let base = proxy.rss()?;
    println!("| idle sessions | RSS KiB | bytes per session |");
    println!("|---|---|---|");
    println!("| 0 | {} | - |", base / 1024);
    let mut opened = 0usize;
    for goal in [1_000usize, 10_000] {
        load::open_sessions(&target, goal - opened).await?;
        opened = goal;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = proxy.rss()?;
        println!(
            "| {goal} | {} | {} |",
            rss / 1024,
            rss.saturating_sub(base) / goal as u64
        );
    }
    lab.stop_all();
    soak::pending_approvals(tollgate, 1000).await
}
