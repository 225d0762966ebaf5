//! `tollgate lock`: list an upstream's tools and pin their definitions in a lock file
//! kept in git beside the policy (SPEC §10); `--check` compares instead of writing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;
use tollgate_proxy::lock::ToolLock;

use super::listing::{self, Source, TIMEOUT, UpstreamArgs};

/// Arguments of `tollgate lock`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["config", "upstream", "command"])))]
pub struct LockArgs {
    /// Lock every server of this configuration that has `tools_lock:` (written there).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["upstream", "command", "output"])]
    pub config: Option<PathBuf>,
    /// Only this server of `--config`.
    #[arg(long, value_name = "NAME", requires = "config")]
    pub server: Option<String>,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// The lock file, with `--upstream URL` or `-- CMD ARGS`.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write nothing: print how the live tools differ from the lock, exit 1 if they do.
    #[arg(long)]
    pub check: bool,
}

/// One lock to write or check: its server's name, where its tools are, its file.
struct Job {
    server: String,
    source: Source,
    timeout: std::time::Duration,
    path: PathBuf,
}

/// Runs `tollgate lock`: 0 when written (or unchanged), 1 when `--check` finds a
/// difference, 2 on an error.
pub fn run(args: LockArgs) -> ExitCode {
    let jobs = match jobs(&args) {
        Ok(jobs) => jobs,
        Err(err) => {
            eprintln!("error: {}", super::serve::error_chain(&err));
            return ExitCode::from(2);
        }
    };
    let mut differs = false;
    for job in jobs {
        match one(&job, args.check) {
            Ok(same) => differs |= !same,
            Err(err) => {
                eprintln!(
                    "error: server `{}`: {}",
                    job.server,
                    super::serve::error_chain(&err)
                );
                return ExitCode::from(2);
            }
        }
    }
    if differs {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The locks to write or check: the one of `--upstream URL`/`-- CMD ARGS` and
/// `--output`, else those of the configuration's servers.
fn jobs(args: &LockArgs) -> anyhow::Result<Vec<Job>> {
    let Some(path) = &args.config else {
        let source = args
            .upstream
            .source()
            .context("give `--config FILE`, `--upstream URL` or `-- CMD ARGS`")?;
        let output = args
            .output
            .clone()
            .context("give `--output FILE`: where the lock is written (or read with --check)")?;
        let server = match &source {
            Source::Http(url, _) | Source::Sse(url, _) => url.clone(),
            Source::Stdio { argv, .. } => argv.join(" "),
        };
        return Ok(vec![Job {
            server,
            source,
            timeout: TIMEOUT,
            path: output,
        }]);
    };
    config_jobs(path, args.server.as_deref())
}

/// The locks of the servers of the configuration at `path` that have `tools_lock:`
/// (only `only`, when given, which must have one).
fn config_jobs(path: &Path, only: Option<&str>) -> anyhow::Result<Vec<Job>> {
    let text = super::read_file(path).map_err(anyhow::Error::msg)?;
    let mut config =
        tollgate_proxy::Config::from_yaml(&text, &path.display().to_string(), &|name| {
            std::env::var(name).ok()
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    config.resolve_paths(dir);
    if let Some(name) = only
        && !config.servers.contains_key(name)
    {
        let known: Vec<&str> = config.servers.keys().map(String::as_str).collect();
        anyhow::bail!(
            "{}: no server `{name}` (servers: {})",
            path.display(),
            known.join(", ")
        );
    }
    let mut jobs = Vec::new();
    for (name, server) in &config.servers {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        let Some(lock) = server.tools_lock.clone() else {
            if only.is_some() {
                anyhow::bail!(
                    "{}: server `{name}` has no `tools_lock:`; add one (e.g. `tools_lock: policies/{name}.tools.lock`) to say where its lock is kept",
                    path.display()
                );
            }
            continue;
        };
        jobs.push(Job {
            server: name.clone(),
            source: Source::of_server(server),
            timeout: server.timeout,
            path: lock,
        });
    }
    if jobs.is_empty() {
        anyhow::bail!(
            "{}: no server has `tools_lock:`; add one to each server whose tools to pin",
            path.display()
        );
    }
    Ok(jobs)
}

/// Writes (or checks) one lock; whether the live tools match what was there.
fn one(job: &Job, check: bool) -> anyhow::Result<bool> {
    let (_, tools) = listing::list_blocking(job.source.clone(), job.timeout)?;
    let live = ToolLock::from_tools(&job.server, &tools)?;
    if !check {
        std::fs::write(&job.path, live.to_yaml())
            .with_context(|| format!("{}: cannot write the lock", job.path.display()))?;
        eprintln!(
            "server `{}`: locked {} tools in {}",
            job.server,
            live.tools().len(),
            job.path.display()
        );
        return Ok(true);
    }
    let locked = ToolLock::load(&job.path)?;
    let diffs = locked.diff(&live);
    if diffs.is_empty() {
        eprintln!(
            "server `{}`: the {} tools match {}",
            job.server,
            live.tools().len(),
            job.path.display()
        );
        return Ok(true);
    }
    for diff in &diffs {
        println!(
            "server `{}`: tool `{}` {}",
            job.server, diff.name, diff.kind
        );
        print!("{}", diff.diff);
    }
    eprintln!(
        "server `{}`: {} tools differ from {}; review the diff, then run `tollgate lock` again to accept it",
        job.server,
        diffs.len(),
        job.path.display()
    );
    Ok(false)
}

/// Writes the lock of `tools` (listed from `server`) to `path`; for `tollgate scan --lock`.
pub fn write(path: &Path, server: &str, tools: &[Value]) -> anyhow::Result<()> {
    let lock = ToolLock::from_tools(server, tools)?;
    std::fs::write(path, lock.to_yaml())
        .with_context(|| format!("{}: cannot write the lock", path.display()))
}
