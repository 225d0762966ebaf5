//! The cells beyond the grid: Tollgate with an audit log and with 1,000 rules, 1 MiB
//! arguments, a filtered `tools/list`, idle sessions and a slow upstream.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use super::{Bench, Driver, Figures, Measured, Options};
use crate::load::{self, Era, Target, Workload};
use crate::procs::{Child, Lab, rule_policy};

/// The cells beyond the grid, all stateless-era JSON: an audit log, 1,000 rules,
/// 1 MiB arguments, `tools/list` of 1,000 tools, 10,000 idle sessions, a 1 ms upstream.
pub(super) async fn extras(
    lab: &mut Lab,
    tollgate: &Path,
    driver: &Driver,
    options: &Options,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let dir = lab.dir().to_owned();
    let upstream = lab.demo_upstream_with(tollgate, false, 0, 1000).await?;
    let proxy = lab.tollgate(tollgate, &upstream.url).await?;
    let nginx = lab.nginx(&upstream.url).await.ok();
    let bench = Bench {
        driver,
        dir: &dir,
        upstream: &upstream,
        era: Era::Stateless,
        secs: options.secs,
    };
    println!("Stateless-era JSON, beyond the grid:\n");
    println!("| cell | rps | p50 µs | p99 µs | proxy CPU µs/call | upstream CPU µs/call |");
    println!("|---|---|---|---|---|---|");
    variants(lab, tollgate, &bench, &proxy, nginx.as_ref(), figures).await?;
    big_arguments(&bench, &proxy, nginx.as_ref(), figures).await?;
    tools_list(&bench, &proxy, figures).await?;
    idle_sessions(
        lab,
        tollgate,
        &bench,
        &proxy,
        options.idle_sessions,
        figures,
    )
    .await?;
    lab.stop_all();
    slow_upstream(lab, tollgate, &bench, figures).await?;
    println!();
    Ok(())
}

/// One line of the extras table.
fn show(name: &str, m: &Measured) {
    println!(
        "| {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
        m.cell.rps, m.cell.p50_us, m.cell.p99_us, m.proxy_cpu, m.upstream_cpu
    );
}

/// Tollgate with an audit log file and with 1,000 rules, each back to back with the
/// plain Tollgate (50 rules) and nginx, at c=64.
async fn variants(
    lab: &mut Lab,
    tollgate: &Path,
    bench: &Bench<'_>,
    proxy: &Child,
    nginx: Option<&Child>,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let upstream = &bench.upstream.url;
    let audit_log = bench.dir.join("audit.jsonl");
    let audited = lab
        .tollgate_with(
            tollgate,
            upstream,
            &rule_policy(50),
            &format!("audit:\n  path: {}\n", audit_log.display()),
        )
        .await?;
    let thousand = lab
        .tollgate_with(tollgate, upstream, &rule_policy(1000), "")
        .await?;
    let plain = bench
        .measure(&proxy.url, Some(proxy), Workload::Call, 64)
        .await?;
    show("tollgate, 50 rules, c=64", &plain);
    let with_audit = bench
        .measure(&audited.url, Some(&audited), Workload::Call, 64)
        .await?;
    show("tollgate with an audit log file, c=64", &with_audit);
    let rules = bench
        .measure(&thousand.url, Some(&thousand), Workload::Call, 64)
        .await?;
    show("tollgate, 1,000 rules, c=64", &rules);
    figures.insert("plain_cpu", plain.proxy_cpu);
    figures.insert("audit_cpu", with_audit.proxy_cpu);
    figures.insert("thousand_rules_cpu", rules.proxy_cpu);
    if let Some(nginx) = nginx {
        let n = bench
            .measure(&nginx.url, Some(nginx), Workload::Call, 64)
            .await?;
        show("nginx, c=64", &n);
        figures.insert("extras_nginx_cpu", n.proxy_cpu);
    }
    Ok(())
}

/// 1 MiB of arguments: CPU per MiB is the difference from a small call.
async fn big_arguments(
    bench: &Bench<'_>,
    proxy: &Child,
    nginx: Option<&Child>,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let mib = 1 << 20;
    let small = bench
        .measure(&proxy.url, Some(proxy), Workload::Call, 1)
        .await?;
    let big = bench
        .measure(&proxy.url, Some(proxy), Workload::BigCall(mib), 1)
        .await?;
    show("tollgate, 1 MiB argument, c=1", &big);
    figures.insert("tollgate_us_per_mib", big.proxy_cpu - small.proxy_cpu);
    if let Some(nginx) = nginx {
        let small = bench
            .measure(&nginx.url, Some(nginx), Workload::Call, 1)
            .await?;
        let big = bench
            .measure(&nginx.url, Some(nginx), Workload::BigCall(mib), 1)
            .await?;
        show("nginx, 1 MiB argument, c=1", &big);
        figures.insert("nginx_us_per_mib", big.proxy_cpu - small.proxy_cpu);
    }
    Ok(())
}

/// `tools/list` of 1,004 tools, of which the policy hides all but one (default: deny).
async fn tools_list(bench: &Bench<'_>, proxy: &Child, figures: &mut Figures) -> anyhow::Result<()> {
    let direct_list = bench
        .measure(&bench.upstream.url, None, Workload::ToolsList, 1)
        .await?;
    let list = bench
        .measure(&proxy.url, Some(proxy), Workload::ToolsList, 1)
        .await?;
    show("direct, tools/list of 1,004 tools, c=1", &direct_list);
    show("tollgate, tools/list of 1,004 tools, c=1", &list);
    figures.insert(
        "tools_list_added_p50",
        list.cell.p50_us - direct_list.cell.p50_us,
    );
    Ok(())
}

/// Idle sessions, on a Tollgate of their own: their memory, and whether calls on
/// other sessions slow down (against the same process before they were opened).
async fn idle_sessions(
    lab: &mut Lab,
    tollgate: &Path,
    bench: &Bench<'_>,
    proxy: &Child,
    idle_sessions: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let idle = idle_sessions.max(1);
    let fresh = lab.tollgate(tollgate, &bench.upstream.url).await?;
    let before = fresh.rss()?;
    load::open_sessions(&Target::new(&fresh.url), idle)
        .await
        .with_context(|| format!("opening {idle} idle sessions"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_session = fresh.rss()?.saturating_sub(before) as f64 / idle as f64;
    let uncrowded = bench
        .measure(&proxy.url, Some(proxy), Workload::Call, 64)
        .await?;
    let crowded = bench
        .measure(&fresh.url, Some(&fresh), Workload::Call, 64)
        .await?;
    show("tollgate, no idle sessions, c=64", &uncrowded);
    show(
        &format!("tollgate with {idle} idle sessions, c=64"),
        &crowded,
    );
    figures.insert("uncrowded_cpu", uncrowded.proxy_cpu);
    figures.insert("idle_session_bytes", per_session);
    figures.insert("crowded_cpu", crowded.proxy_cpu);
    Ok(())
}

/// An upstream that takes 1 ms per call: direct, through Tollgate, and through nginx,
/// which tells what any hop costs against this upstream.
async fn slow_upstream(
    lab: &mut Lab,
    tollgate: &Path,
    bench: &Bench<'_>,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let slow = lab.demo_upstream(tollgate, false, 1).await?;
    let proxy = lab.tollgate(tollgate, &slow.url).await?;
    let bench = Bench {
        upstream: &slow,
        ..*bench
    };
    let direct = bench.measure(&slow.url, None, Workload::Call, 64).await?;
    let through = bench
        .measure(&proxy.url, Some(&proxy), Workload::Call, 64)
        .await?;
    show("direct, 1 ms upstream, c=64", &direct);
    show("tollgate, 1 ms upstream, c=64", &through);
    figures.insert("slow_ratio", through.cell.rps / direct.cell.rps.max(1e-9));
    if let Ok(nginx) = lab.nginx(&slow.url).await {
        let hop = bench
            .measure(&nginx.url, Some(&nginx), Workload::Call, 64)
            .await?;
        show("nginx, 1 ms upstream, c=64", &hop);
        figures.insert("slow_nginx_ratio", hop.cell.rps / direct.cell.rps.max(1e-9));
    }
    Ok(())
}
