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
//!
//! Every process it starts is killed when it exits; every wait is bounded.

mod compare;
mod load;
mod procs;
mod soak;
mod wrk;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use load::Target;
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
            Command::Soak { secs } => soak::run(&tollgate, Duration::from_secs(secs)).await,
        }
    })
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
