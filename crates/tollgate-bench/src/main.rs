//! `tollgate-bench`: measures what Tollgate costs, as ratios against a baseline
//! measured in the same run.
//!
//! * `compare`: MCP `tools/call` load (wrk, or the built-in closed loop) against the demo
//!   upstream directly, through nginx (a plain reverse proxy: the cost of any extra HTTP
//!   hop), and through Tollgate with a 50-rule policy and an argument schema; JSON and
//!   SSE answers, handshake and stateless eras, concurrency 1/16/64; then an audit log,
//!   1,000 rules, 1 MiB arguments, a `tools/list` of 1,000 tools, 10,000 idle sessions and
//!   an upstream that takes 1 ms; CPU per call of each process from `/proc`; every
//!   target of issue 15 as a ratio with pass/miss, as markdown.
//! * `memory`: Tollgate's RSS with 0, 1,000 and 10,000 idle handshake-era sessions.
//! * `diff`: `tollgate diff` over a generated audit log of 100,000 decision records.
//! * `state`: the same rate-limited calls with `state.backend: memory` and `redis`
//!   (a redis-server of its own): added latency, CPU and Redis commands per call.
//!
//! Every process it starts is killed when it exits; every wait is bounded.

mod compare;
mod load;
mod procs;
mod review;
mod soak;
mod wrk;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use load::{Era, Stats, Target, Workload};
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
        /// How many times to measure everything (the targets show the median and range).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// The load generator.
        #[arg(long, value_enum, default_value = "wrk")]
        load: compare::Loader,
        /// Only the grid: no audit, 1,000-rule, large-body, tools/list, idle-session or slow-upstream cells.
        #[arg(long)]
        quick: bool,
        /// Idle sessions opened for the memory and crowding cells.
        #[arg(long, default_value_t = 10_000)]
        idle_sessions: usize,
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
    /// `tollgate diff` over a generated audit log: its time, best of `runs`.
    Diff {
        /// Decision records in the log.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// How many times to run it.
        #[arg(long, default_value_t = 3)]
        runs: usize,
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
    if let Command::Diff { records, runs } = cli.command {
        return review::run(&tollgate, records, runs);
    }
    runtime.block_on(async {
        match cli.command {
            Command::Diff { .. } => Ok(()),
            Command::Compare {
                secs,
                concurrency,
                runs,
                load,
                quick,
                idle_sessions,
            } => {
                let options = compare::Options {
                    secs: Duration::from_secs_f64(secs),
                    levels: concurrency,
                    runs: runs.max(1),
                    loader: load,
                    quick,
                    idle_sessions,
                };
                compare::run(&tollgate, &options).await
            }
            Command::Memory => memory(&tollgate).await,
            Command::State { secs, concurrency } => {
                state(&tollgate, Duration::from_secs_f64(secs), &concurrency).await
            }
            Command::Soak { secs } => soak::run(&tollgate, Duration::from_secs(secs)).await,
        }
    })
}

/// `concurrency` workers making small `tools/call`s for `secs`.
async fn run(
    target: &Target,
    era: Era,
    concurrency: usize,
    secs: Duration,
) -> anyhow::Result<Stats> {
    load::run_workload(target, era, Workload::Call, concurrency, secs).await
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
            let target = Target::new(&memory.url);
            // Each backend is warmed up apart, so that only the measured calls count.
            run(&target, era, concurrency, Duration::from_millis(300)).await?;
            let cpu0 = memory.cpu_time()?;
            let local = run(&target, era, concurrency, secs).await?;
            let local_calls = (local.calls + local.errors).max(1) as f64;
            let local_cpu = (memory.cpu_time()? - cpu0).as_secs_f64() * 1e6 / local_calls;
            let target = Target::new(&redis.url);
            run(&target, era, concurrency, Duration::from_millis(300)).await?;
            let (cpu0, trips0) = (redis.cpu_time()?, round_trips(&admin).await?);
            let shared = run(&target, era, concurrency, secs).await?;
            let calls = (shared.calls + shared.errors).max(1) as f64;
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
