//! `compare`: direct vs nginx vs Tollgate in one run, with wrk or the built-in load
//! generator, CPU per call of nginx, Tollgate and the upstream from `/proc`, and
//! issue 15's targets printed as ratios with pass/miss. Output is markdown.

mod extras;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::load::{self, Cell, Era, Target, Workload};
use crate::procs::{Child, Lab};
use crate::wrk;

/// Which load generator drives the cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Loader {
    /// `wrk -t1`, when installed (else the built-in one, with a warning).
    Wrk,
    /// The built-in closed loop (each worker its own session).
    Builtin,
}

/// What `compare` measures.
pub struct Options {
    /// Seconds per cell.
    pub secs: Duration,
    /// Concurrency levels of the main table.
    pub levels: Vec<usize>,
    /// How many times to measure everything.
    pub runs: usize,
    /// The load generator.
    pub loader: Loader,
    /// Skip the extra cells (audit, rules, large bodies, tools/list, idle sessions).
    pub quick: bool,
    /// Idle sessions opened for the memory and crowding cells.
    pub idle_sessions: usize,
}

enum Driver {
    Wrk(PathBuf),
    Builtin,
}

/// One measured cell and the CPU each process spent per call in it.
#[derive(Debug, Clone, Default)]
struct Measured {
    cell: Cell,
    /// The proxy's CPU µs per call (0 for direct).
    proxy_cpu: f64,
    /// The upstream's CPU µs per call.
    upstream_cpu: f64,
}

struct Row {
    answer: &'static str,
    era: Era,
    concurrency: usize,
    direct: Measured,
    nginx: Option<Measured>,
    tollgate: Measured,
}

/// Figures of one run, by name, for the targets table.
type Figures = BTreeMap<&'static str, f64>;

/// Runs the comparison `options.runs` times and prints every run's table and the targets.
pub async fn run(tollgate: &Path, options: &Options) -> anyhow::Result<()> {
    let driver = match (options.loader, wrk::find()) {
        (Loader::Wrk, Some(path)) => Driver::Wrk(path),
        (Loader::Wrk, None) => {
            eprintln!(
                "wrk is not installed (apt-get install wrk): using the built-in load generator"
            );
            Driver::Builtin
        }
        (Loader::Builtin, _) => Driver::Builtin,
    };
    let loader = match driver {
        Driver::Wrk(_) => "wrk -t1",
        Driver::Builtin => "built-in",
    };
    let mut runs: Vec<Figures> = Vec::new();
    for run in 1..=options.runs {
        let mut lab = Lab::new()?;
        let mut figures = Figures::new();
        let rows = grid(&mut lab, tollgate, &driver, options, &mut figures).await?;
        println!(
            "### Run {run} of {} ({loader}, {} s per cell)\n",
            options.runs,
            options.secs.as_secs_f64()
        );
        print_grid(&rows);
        if !options.quick {
            extras::extras(&mut lab, tollgate, &driver, options, &mut figures).await?;
        }
        lab.stop_all();
        runs.push(figures);
    }
    print_targets(&runs, loader);
    Ok(())
}

/// What the cells in front of one upstream are measured with.
struct Bench<'a> {
    driver: &'a Driver,
    dir: &'a Path,
    upstream: &'a Child,
    era: Era,
    secs: Duration,
}

impl Bench<'_> {
    /// Warms up, then measures `url` with the CPU of `proxy` and the upstream counted.
    async fn measure(
        &self,
        url: &str,
        proxy: Option<&Child>,
        workload: Workload,
        concurrency: usize,
    ) -> anyhow::Result<Measured> {
        let Bench {
            driver,
            dir,
            upstream,
            era,
            secs,
        } = *self;
        let target = Target::new(url);
        // Fills connection pools and caches (and checks that calls succeed).
        let warm = load::run_workload(
            &target,
            era,
            workload,
            concurrency.min(16),
            Duration::from_millis(300),
        )
        .await?;
        anyhow::ensure!(
            warm.calls > 0,
            "no call to {url} succeeded ({} errors)",
            warm.errors
        );
        let cpu = |child: Option<&Child>| child.map_or(Ok(Duration::ZERO), Child::cpu_time);
        let (proxy0, upstream0) = (cpu(proxy)?, upstream.cpu_time()?);
        let cell = match driver {
            Driver::Builtin => load::run_workload(&target, era, workload, concurrency, secs)
                .await?
                .cell(),
            Driver::Wrk(wrk) => {
                let headers = load::open_for(&target, era, workload).await?;
                let body = serde_json::to_vec(&load::body(workload, 1, era))?;
                let (wrk, dir, url) = (wrk.clone(), dir.to_owned(), url.to_owned());
                tokio::task::spawn_blocking(move || {
                    wrk::run(&wrk, &dir, &url, &headers, &body, concurrency, secs)
                })
                .await??
            }
        };
        let calls = cell.calls.max(1) as f64;
        let per_call = |before: Duration, after: Duration| {
            after.saturating_sub(before).as_secs_f64() * 1e6 / calls
        };
        Ok(Measured {
            proxy_cpu: per_call(proxy0, cpu(proxy)?),
            upstream_cpu: per_call(upstream0, upstream.cpu_time()?),
            cell,
        })
    }
}

async fn grid(
    lab: &mut Lab,
    tollgate: &Path,
    driver: &Driver,
    options: &Options,
    figures: &mut Figures,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let dir = lab.dir().to_owned();
    for (answer, sse) in [("json", false), ("sse", true)] {
        let upstream = lab.demo_upstream(tollgate, sse, 0).await?;
        let proxy = lab.tollgate(tollgate, &upstream.url).await?;
        let nginx = match lab.nginx(&upstream.url).await {
            Ok(nginx) => Some(nginx),
            Err(why) => {
                eprintln!("nginx: {why:#} (apt-get install nginx): its columns are empty");
                None
            }
        };
        for era in [Era::Handshake, Era::Stateless] {
            for &concurrency in &options.levels {
                let bench = Bench {
                    driver,
                    dir: &dir,
                    upstream: &upstream,
                    era,
                    secs: options.secs,
                };
                let row = measure_row(&bench, answer, &proxy, nginx.as_ref(), concurrency).await?;
                eprintln!("measured {answer} {era:?} c={concurrency}");
                rows.push(row);
            }
        }
        lab.stop_all();
    }
    record_grid(&rows, figures);
    Ok(rows)
}

/// One row's cells, in this order: direct, through nginx (when it runs), through Tollgate.
async fn measure_row(
    bench: &Bench<'_>,
    answer: &'static str,
    proxy: &Child,
    nginx: Option<&Child>,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let upstream = bench.upstream;
    let direct = bench
        .measure(&upstream.url, None, Workload::Call, concurrency)
        .await?;
    let nginx = match nginx {
        Some(n) => Some(
            bench
                .measure(&n.url, Some(n), Workload::Call, concurrency)
                .await?,
        ),
        None => None,
    };
    let tollgate = bench
        .measure(&proxy.url, Some(proxy), Workload::Call, concurrency)
        .await?;
    Ok(Row {
        answer,
        era: bench.era,
        concurrency,
        direct,
        nginx,
        tollgate,
    })
}

/// The grid's figures for the targets table, named `answer/era/cN/figure`.
fn record_grid(rows: &[Row], figures: &mut Figures) {
    for row in rows {
        let key = |name: &'static str| -> &'static str {
            // Leaked once per figure name and run: a handful of short strings.
            Box::leak(
                format!("{}/{:?}/c{}/{name}", row.answer, row.era, row.concurrency)
                    .into_boxed_str(),
            )
        };
        figures.insert(key("tollgate_cpu"), row.tollgate.proxy_cpu);
        figures.insert(key("tollgate_rps"), row.tollgate.cell.rps);
        figures.insert(key("tollgate_p99"), row.tollgate.cell.p99_us);
        figures.insert(
            key("tollgate_added_p50"),
            row.tollgate.cell.p50_us - row.direct.cell.p50_us,
        );
        if let Some(nginx) = &row.nginx {
            figures.insert(key("nginx_cpu"), nginx.proxy_cpu);
            figures.insert(key("nginx_rps"), nginx.cell.rps);
            figures.insert(
                key("nginx_added_p50"),
                nginx.cell.p50_us - row.direct.cell.p50_us,
            );
        }
    }
}

fn print_grid(rows: &[Row]) {
    println!(
        "| answer | era | conc | direct rps | nginx rps | tollgate rps | tollgate/nginx rps | added p50 µs: tollgate (nginx) | p99 µs: tollgate (nginx) | CPU µs/call: tollgate / nginx / upstream | tollgate/nginx CPU | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let nginx = r.nginx.as_ref();
        let or_dash = |f: &dyn Fn(&Measured) -> String| nginx.map_or("-".to_owned(), f);
        println!(
            "| {} | {:?} | {} | {:.0} | {} | {:.0} | {} | {:.0} ({}) | {:.0} ({}) | {:.1} / {} / {:.1} | {} | {} |",
            r.answer,
            r.era,
            r.concurrency,
            r.direct.cell.rps,
            or_dash(&|n| format!("{:.0}", n.cell.rps)),
            r.tollgate.cell.rps,
            or_dash(&|n| format!("{:.2}", r.tollgate.cell.rps / n.cell.rps)),
            r.tollgate.cell.p50_us - r.direct.cell.p50_us,
            or_dash(&|n| format!("{:.0}", n.cell.p50_us - r.direct.cell.p50_us)),
            r.tollgate.cell.p99_us,
            or_dash(&|n| format!("{:.0}", n.cell.p99_us)),
            r.tollgate.proxy_cpu,
            or_dash(&|n| format!("{:.1}", n.proxy_cpu)),
            r.tollgate.upstream_cpu,
            or_dash(&|n| format!("{:.2}", r.tollgate.proxy_cpu / n.proxy_cpu)),
            r.tollgate.cell.errors + r.direct.cell.errors + nginx.map_or(0, |n| n.cell.errors),
        );
    }
    println!();
}

/// A target: its figure from a run's figures, the comparison and the goal.
struct Goal {
    name: &'static str,
    figure: fn(&Figures) -> Option<f64>,
    at_most: bool,
    goal: f64,
    unit: &'static str,
}

fn get(f: &Figures, key: &str) -> Option<f64> {
    f.get(key).copied()
}

/// `a / b`; none when `b` is not positive (an added latency lost in noise).
fn ratio(f: &Figures, a: &str, b: &str) -> Option<f64> {
    let b = get(f, b).filter(|b| *b > 0.0)?;
    Some(get(f, a)? / b)
}

const GOALS: &[Goal] = &[
    Goal {
        name: "CPU per call, JSON, stateless, c=64: tollgate / nginx",
        figure: |f| {
            ratio(
                f,
                "json/Stateless/c64/tollgate_cpu",
                "json/Stateless/c64/nginx_cpu",
            )
        },
        at_most: true,
        goal: 1.5,
        unit: "×",
    },
    Goal {
        name: "CPU per call, JSON, handshake, c=64: tollgate / nginx",
        figure: |f| {
            ratio(
                f,
                "json/Handshake/c64/tollgate_cpu",
                "json/Handshake/c64/nginx_cpu",
            )
        },
        at_most: true,
        goal: 1.5,
        unit: "×",
    },
    Goal {
        name: "throughput, JSON, stateless, c=64: tollgate / nginx",
        figure: |f| {
            ratio(
                f,
                "json/Stateless/c64/tollgate_rps",
                "json/Stateless/c64/nginx_rps",
            )
        },
        at_most: false,
        goal: 0.9,
        unit: "×",
    },
    Goal {
        name: "throughput, JSON, handshake, c=64: tollgate / nginx",
        figure: |f| {
            ratio(
                f,
                "json/Handshake/c64/tollgate_rps",
                "json/Handshake/c64/nginx_rps",
            )
        },
        at_most: false,
        goal: 0.9,
        unit: "×",
    },
    Goal {
        name: "added p50, JSON, stateless, c=1: tollgate / nginx",
        figure: |f| {
            ratio(
                f,
                "json/Stateless/c1/tollgate_added_p50",
                "json/Stateless/c1/nginx_added_p50",
            )
        },
        at_most: true,
        goal: 1.5,
        unit: "×",
    },
    Goal {
        name: "p99, JSON, stateless, c=1 (µs)",
        figure: |f| get(f, "json/Stateless/c1/tollgate_p99"),
        at_most: true,
        goal: 1000.0,
        unit: " µs",
    },
    Goal {
        name: "CPU per call with an audit log file, c=64: tollgate / nginx",
        figure: |f| ratio(f, "audit_cpu", "extras_nginx_cpu"),
        at_most: true,
        goal: 2.0,
        unit: "×",
    },
    Goal {
        name: "SSE vs JSON, stateless, c=64: tollgate CPU per call, sse / json",
        figure: |f| {
            ratio(
                f,
                "sse/Stateless/c64/tollgate_cpu",
                "json/Stateless/c64/tollgate_cpu",
            )
        },
        at_most: true,
        goal: 1.1,
        unit: "×",
    },
    Goal {
        name: "SSE vs JSON, stateless, c=64: tollgate/nginx throughput, sse / json",
        figure: |f| {
            let sse = ratio(
                f,
                "sse/Stateless/c64/tollgate_rps",
                "sse/Stateless/c64/nginx_rps",
            )?;
            let json = ratio(
                f,
                "json/Stateless/c64/tollgate_rps",
                "json/Stateless/c64/nginx_rps",
            )?;
            Some(sse / json)
        },
        at_most: false,
        goal: 0.9,
        unit: "×",
    },
    Goal {
        name: "1 ms upstream, c=64: tollgate / direct throughput",
        figure: |f| get(f, "slow_ratio"),
        at_most: false,
        goal: 0.95,
        unit: "×",
    },
    Goal {
        name: "1 ms upstream, c=64: nginx / direct throughput (report)",
        figure: |f| get(f, "slow_nginx_ratio"),
        at_most: true,
        goal: f64::INFINITY,
        unit: "×",
    },
    Goal {
        name: "1,000 rules vs 50, c=64: CPU per call",
        figure: |f| ratio(f, "thousand_rules_cpu", "plain_cpu"),
        at_most: true,
        goal: 1.05,
        unit: "×",
    },
    Goal {
        name: "1 MiB argument: CPU µs per MiB, tollgate / nginx (report)",
        figure: |f| ratio(f, "tollgate_us_per_mib", "nginx_us_per_mib"),
        at_most: true,
        goal: f64::INFINITY,
        unit: "×",
    },
    Goal {
        name: "1 MiB argument: tollgate CPU µs per MiB (report)",
        figure: |f| get(f, "tollgate_us_per_mib"),
        at_most: true,
        goal: f64::INFINITY,
        unit: " µs",
    },
    Goal {
        name: "tools/list of 1,004 tools filtered: added p50 (µs)",
        figure: |f| get(f, "tools_list_added_p50"),
        at_most: true,
        goal: 1000.0,
        unit: " µs",
    },
    Goal {
        name: "idle sessions (10,000 by default): RSS bytes per session",
        figure: |f| get(f, "idle_session_bytes"),
        at_most: true,
        goal: 16384.0,
        unit: " B",
    },
    Goal {
        name: "idle sessions: CPU per call on other sessions, with / without",
        figure: |f| ratio(f, "crowded_cpu", "uncrowded_cpu"),
        at_most: true,
        goal: 1.05,
        unit: "×",
    },
];

fn print_targets(runs: &[Figures], loader: &str) {
    println!("### Targets ({} run(s), {loader})\n", runs.len());
    println!("| target | goal | median | range | result |");
    println!("|---|---|---|---|---|");
    for goal in GOALS {
        let mut values: Vec<f64> = runs.iter().filter_map(|f| (goal.figure)(f)).collect();
        if values.is_empty() {
            println!("| {} | - | not measured | - | - |", goal.name);
            continue;
        }
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        let (low, high) = (values[0], values[values.len() - 1]);
        let fmt = |v: f64| {
            if goal.unit == "×" {
                format!("{v:.2}×")
            } else {
                format!("{v:.0}{}", goal.unit)
            }
        };
        let (limit, result) = if goal.goal.is_infinite() {
            ("report".to_owned(), "-")
        } else {
            let met = if goal.at_most {
                median <= goal.goal
            } else {
                median >= goal.goal
            };
            (
                format!(
                    "{} {}",
                    if goal.at_most { "≤" } else { "≥" },
                    fmt(goal.goal)
                ),
                if met { "pass" } else { "miss" },
            )
        };
        let range = if values.len() > 1 {
            format!("{}–{}", fmt(low), fmt(high))
        } else {
            "-".to_owned()
        };
        println!(
            "| {} | {limit} | {} | {range} | {result} |",
            goal.name,
            fmt(median),
        );
    }
}
