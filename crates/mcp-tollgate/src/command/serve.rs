//! `tollgate serve`: run the proxy from a configuration file, or in front of one upstream.

mod admin;
mod logging;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate_proxy::{AppState, Config, Lanes, LoadedPolicy};

pub use admin::{AdminMode, AdminStarted, bind_admin, start_admin};
pub use logging::{LogFormat, init_logging};

/// Arguments of `tollgate serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (docs/configuration.md).
    #[arg(long, conflicts_with_all = ["upstream", "policy", "command"])]
    pub config: Option<PathBuf>,
    /// One Streamable HTTP upstream, without a configuration file (with `--policy`).
    #[arg(long, requires = "policy")]
    pub upstream: Option<String>,
    /// The policy, without a configuration file: with `--upstream URL` or `-- CMD ARGS`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A stdio MCP server to start and forward to (with `--policy`).
    #[arg(last = true, value_name = "CMD", requires = "policy")]
    pub command: Vec<String>,
    /// The stdio server's environment (with `-- CMD ARGS`).
    #[command(flatten)]
    pub child_env: super::ChildEnv,
    /// Where to listen (overrides the configuration's `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where the admin API and approvals page listen (overrides `admin.listen`).
    /// Without a configuration file the default is 127.0.0.1:9090 (an ephemeral port if
    /// it is taken) with a generated token, when the policy holds calls for a human.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A failure with its exit code (docs/configuration.md, "Command line").
#[derive(Debug)]
pub struct Failure {
    /// 1: the user must fix a file; 2: usage or I/O.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl Failure {
    /// A file the user must fix (exit 1).
    pub fn invalid(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
    /// Usage or I/O (exit 2).
    pub fn io(error: anyhow::Error) -> Failure {
        Failure { code: 2, error }
    }
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::io(anyhow::anyhow!("{}: cannot read: {e}", path.display())))
}

/// Loads and compiles one policy file.
pub fn load_policy(path: &Path) -> Result<LoadedPolicy, Failure> {
    let source = read(path)?;
    LoadedPolicy::compile(&source, Some(path), &path.display().to_string())
        .map_err(|errors| Failure::invalid(anyhow::anyhow!("{errors}")))
}

/// Loads a configuration file and every policy it names.
pub fn load_config(path: &Path) -> Result<(Config, BTreeMap<String, LoadedPolicy>), Failure> {
    let source = read(path)?;
    let mut config = Config::from_yaml(&source, &path.display().to_string(), &|name| {
        std::env::var(name).ok()
    })
    .map_err(|e| Failure::invalid(anyhow::anyhow!("{e}")))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    config.resolve_paths(dir);
    let mut policies = BTreeMap::new();
    for (name, server) in &config.servers {
        policies.insert(name.clone(), load_policy(&config.policy_path(dir, server))?);
    }
    Ok((config, policies))
}

/// The one upstream of a configuration given on the command line.
pub enum CommandLineUpstream<'a> {
    /// `--upstream URL`: Streamable HTTP, or legacy HTTP+SSE when `sse`.
    Url {
        /// The endpoint.
        url: &'a str,
        /// Whether it speaks the legacy HTTP+SSE transport.
        sse: bool,
    },
    /// `-- CMD ARGS`: a stdio server to start, with `--env` and `--inherit-env`.
    Command(&'a [String], &'a super::ChildEnv),
}

/// A one-server configuration (server `upstream`) from the command line, checked
/// like a file.
pub fn single_server_config(
    upstream: CommandLineUpstream<'_>,
    policy: &Path,
    listen: SocketAddr,
) -> Result<Config, Failure> {
    // JSON string literals are YAML scalars, so any URL, path or argument is quoted safely.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let target = match upstream {
        CommandLineUpstream::Url { url, sse: false } => format!("    url: {}\n", quote(url)),
        CommandLineUpstream::Url { url, sse: true } => {
            format!("    url: {}\n    transport: sse\n", quote(url))
        }
        CommandLineUpstream::Command(argv, env) => {
            let vars: serde_json::Map<String, serde_json::Value> = env
                .env
                .iter()
                .map(|(name, value)| (name.clone(), value.as_str().into()))
                .collect();
            format!(
                "    command: {}\n    env: {}\n    inherit_env: {}\n",
                serde_json::Value::from(argv.to_vec()),
                serde_json::Value::Object(vars),
                serde_json::Value::from(env.inherit_env.clone())
            )
        }
    };
    let yaml = format!(
        "listen: {}\nservers:\n  upstream:\n{target}    policy: {}\n",
        quote(&listen.to_string()),
        quote(&policy.display().to_string()),
    );
    Config::from_yaml(&yaml, "command line", &|_| None).map_err(|e| Failure {
        code: 2,
        error: anyhow::anyhow!("{e}"),
    })
}

/// Watches policy files (for the life of the returned watcher) and reloads on SIGHUP.
pub fn start_reloading(state: &AppState) -> Option<tollgate_proxy::PolicyWatcher> {
    let watcher = match tollgate_proxy::watch(state.shared()) {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch policy files; reload with SIGHUP or POST /reload");
            None
        }
    };
    #[cfg(unix)]
    {
        let state = state.clone();
        if let Ok(mut hangup) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || tollgate_proxy::reload_all(&state))
                        .await;
                }
            });
        }
    }
    watcher
}

/// Where the listeners are, once bound.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The MCP listener.
    pub listen: SocketAddr,
    /// The admin listener, when there is one.
    pub admin: Option<SocketAddr>,
    /// The admin token Tollgate generated for this run, if it did.
    pub admin_token: Option<String>,
}

/// Binds, prints the URLs, and serves with `lanes` until SIGINT or SIGTERM. `on_bound`
/// gets the MCP listener's address and the admin page's URL (`http://ADDR/`), if any.
pub async fn run_proxy(
    config: Config,
    policies: BTreeMap<String, LoadedPolicy>,
    lanes: Lanes,
    mode: AdminMode,
    command: &str,
    on_bound: impl FnOnce(Bound),
) -> Result<(), Failure> {
    let state =
        AppState::build_with(&config, policies, lanes).map_err(|e| Failure::invalid(e.into()))?;
    let listeners = state.bind(config.listen).await.map_err(|err| {
        cannot_listen(
            config.listen,
            "--listen, or `listen:` in the configuration",
            err,
        )
    })?;
    let addr = listeners.local_addr().map_err(|e| Failure::io(e.into()))?;

    // One signal stops both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = bind_admin(&config, &state, stop_rx.clone(), mode, command).await?;
    print_listening(
        addr,
        &config,
        admin.as_ref().map(AdminStarted::announcement).as_deref(),
    );
    on_bound(Bound {
        listen: addr,
        admin: admin.as_ref().map(|a| a.addr),
        admin_token: admin.as_ref().and_then(|a| a.generated_token.clone()),
    });
    let admin_task = admin.map(|a| a.task);
    let _watcher = start_reloading(&state);
    let health = tokio::spawn(state.clone().watch_health());
    {
        let state = state.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            // Nobody is left to decide: tell waiting agents now rather than at their deadline.
            state
                .approvals()
                .deny_all("tollgate", "Tollgate is shutting down");
            let _ = stop_tx.send(true);
        });
    }
    let served = tollgate_proxy::serve(
        state,
        listeners,
        tollgate_proxy::stopped(stop_rx),
        config.shutdown_grace,
    )
    .await;
    health.abort();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    // What is still queued goes out, within a bound (the collector may be down).
    tollgate_proxy::telemetry::shutdown(std::time::Duration::from_secs(5)).await;
    served.map_err(|e| Failure::io(anyhow::anyhow!("server failed: {e}")))
}

/// Why the MCP listener cannot start; an address in use says how to pick another.
pub fn cannot_listen(listen: SocketAddr, flag: &str, err: std::io::Error) -> Failure {
    let hint = if err.kind() == std::io::ErrorKind::AddrInUse {
        format!(" (another program listens there: choose another address with {flag})")
    } else {
        String::new()
    };
    Failure::io(anyhow::anyhow!("cannot listen on {listen}: {err}{hint}"))
}

/// The start-up banner: the URLs, then the admin listener's line. On stdout, unless the
/// audit log is written there (`audit.path: "-"`, the container default), whose readers
/// expect one JSON record a line and nothing else: then on stderr, with the logs.
fn print_listening(addr: SocketAddr, config: &Config, admin: Option<&str>) {
    let audit_on_stdout = config.audit.as_ref().is_some_and(|audit| audit.path == "-");
    if audit_on_stdout {
        write_banner(&mut std::io::stderr().lock(), addr, config, admin);
    } else {
        write_banner(&mut std::io::stdout().lock(), addr, config, admin);
    }
}

fn write_banner(
    out: &mut impl std::io::Write,
    addr: SocketAddr,
    config: &Config,
    admin: Option<&str>,
) {
    let scheme = if config.listen_tls.is_some() {
        "https"
    } else {
        "http"
    };
    if config.servers.len() == 1 {
        let _ = writeln!(out, "Tollgate listening on {scheme}://{addr}/mcp");
    } else {
        let _ = writeln!(out, "Tollgate listening on {scheme}://{addr}");
    }
    for name in config.servers.keys() {
        let _ = writeln!(
            out,
            "  server {name}: {scheme}://{addr}/servers/{name}/mcp (legacy HTTP+SSE: {scheme}://{addr}/servers/{name}/sse)"
        );
    }
    if let Some(admin) = admin {
        let _ = writeln!(out, "{admin}");
    }
    let _ = out.flush();
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// The multi-threaded runtime the servers run on.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::io(e.into()))
}

/// Runs `tollgate serve`.
pub fn run(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    let result = (|| {
        let command_line = args.config.is_none();
        let (mut config, policies) = match (&args.config, &args.policy) {
            (Some(path), _) => load_config(path)?,
            (None, Some(policy)) => command_line_config(&args, policy)?,
            _ => {
                return Err(usage(
                    "give either --config FILE, or --policy FILE with --upstream URL or -- CMD ARGS",
                ));
            }
        };
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        let mode = admin_mode(args.admin_listen, &mut config, command_line);
        // One lane per core (or `TOKIO_WORKER_THREADS`), each a thread with a
        // current-thread runtime; this thread is the first.
        let lanes = Lanes::new(lane_count());
        tollgate_proxy::lane_runtime()
            .map_err(|e| Failure::io(e.into()))?
            .block_on(run_proxy(config, policies, lanes, mode, "serve", |_| {}))
    })();
    finish(result)
}

/// A usage error (exit 2).
fn usage(text: &str) -> Failure {
    Failure {
        code: 2,
        error: anyhow::anyhow!("{text}"),
    }
}

/// The one-server configuration of `--policy` with `--upstream URL` or `-- CMD ARGS`.
fn command_line_config(
    args: &ServeArgs,
    policy: &Path,
) -> Result<(Config, BTreeMap<String, LoadedPolicy>), Failure> {
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let upstream = match (&args.upstream, args.command.as_slice()) {
        (Some(_), []) if !args.child_env.is_empty() => {
            return Err(usage(
                "--env and --inherit-env are for a stdio server (-- CMD ARGS); an --upstream URL has its own environment",
            ));
        }
        (Some(url), []) => CommandLineUpstream::Url { url, sse: false },
        (None, command) if !command.is_empty() => {
            CommandLineUpstream::Command(command, &args.child_env)
        }
        _ => {
            return Err(usage(
                "with --policy, give either --upstream URL or -- CMD ARGS (not both)",
            ));
        }
    };
    let config = single_server_config(upstream, policy, listen)?;
    let mut policies = BTreeMap::new();
    policies.insert("upstream".to_owned(), load_policy(policy)?);
    Ok((config, policies))
}

/// How the admin listener is chosen: `--admin-listen` moves a configured one, or asks
/// for a personal one; a Tollgate started without a configuration file is personal.
fn admin_mode(
    admin_listen: Option<SocketAddr>,
    config: &mut Config,
    command_line: bool,
) -> AdminMode {
    match (admin_listen, &mut config.admin) {
        (Some(listen), Some(admin)) => {
            admin.listen = listen;
            AdminMode::Configured
        }
        (Some(listen), None) => AdminMode::Personal {
            default_listen: listen,
            explicit: true,
        },
        (None, _) if command_line => AdminMode::Personal {
            default_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            explicit: false,
        },
        (None, _) => AdminMode::Configured,
    }
}

/// How many lanes serve the proxy listener: `TOKIO_WORKER_THREADS` when set (as tokio
/// reads it for its own workers), else one per core.
fn lane_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// Prints a failure and turns it into the exit code.
pub fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", error_chain(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}

/// The error and its causes joined by `: `, like `{:#}`, except that a cause whose
/// text the message before it already ends with is not repeated (errors that print
/// their source *and* return it from `source()` would otherwise say it twice).
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
    }
    text
}
