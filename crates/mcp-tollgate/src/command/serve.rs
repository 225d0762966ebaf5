//! `tollgate serve`: run the proxy from a configuration file, or in front of one upstream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use tollgate_proxy::{AppState, Config, LoadedPolicy};

/// Arguments of `tollgate serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (SPEC §3).
    #[arg(long, conflicts_with_all = ["upstream", "policy"])]
    pub config: Option<PathBuf>,
    /// One Streamable HTTP upstream, without a configuration file.
    #[arg(long, requires = "policy")]
    pub upstream: Option<String>,
    /// The policy for `--upstream`.
    #[arg(long, requires = "upstream")]
    pub policy: Option<PathBuf>,
    /// Where to listen (overrides the configuration's `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A failure with the exit code SPEC §2 gives it.
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

/// Sets up `tracing` on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
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
    /// `-- CMD ARGS`: a stdio server to start.
    Command(&'a [String]),
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
        CommandLineUpstream::Command(argv) => {
            format!("    command: {}\n", serde_json::Value::from(argv.to_vec()))
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

/// Completes once `stop` turns true.
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Starts the admin listener when the configuration has one, until `stop`; returns
/// its task and the line that announces it.
pub async fn start_admin(
    config: &Config,
    state: &AppState,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<
    (
        Option<tokio::task::JoinHandle<std::io::Result<()>>>,
        Option<String>,
    ),
    Failure,
> {
    let Some(admin) = &config.admin else {
        return Ok((None, None));
    };
    let admin_listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", admin.listen))
        .map_err(Failure::io)?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| Failure::io(e.into()))?;
    let admin =
        tollgate_proxy::prepare_admin(state, admin_addr, admin.token.as_deref(), crate::VERSION)
            .map_err(|e| Failure::invalid(e.into()))?;
    let task = tokio::spawn(tollgate_proxy::serve_admin(
        admin,
        admin_listener,
        stopped(stop),
    ));
    Ok((
        Some(task),
        Some(format!("Tollgate admin on http://{admin_addr}/")),
    ))
}

/// Binds, prints the URLs, and serves until SIGINT or SIGTERM.
pub async fn run_proxy(
    config: Config,
    policies: BTreeMap<String, LoadedPolicy>,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), Failure> {
    let state = AppState::build(&config, policies).map_err(|e| Failure::invalid(e.into()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))
        .map_err(Failure::io)?;
    let addr = listener.local_addr().map_err(|e| Failure::io(e.into()))?;

    // One signal stops both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (admin_task, admin_line) = start_admin(&config, &state, stop_rx.clone()).await?;
    print_listening(addr, &config);
    if let Some(line) = admin_line {
        println!("{line}");
    }
    on_bound(addr);
    let _watcher = start_reloading(&state);
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
    let served =
        tollgate_proxy::serve(state, listener, stopped(stop_rx), config.shutdown_grace).await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    served.map_err(|e| Failure::io(anyhow::anyhow!("server failed: {e}")))
}

fn print_listening(addr: SocketAddr, config: &Config) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if config.servers.len() == 1 {
        let _ = writeln!(out, "Tollgate listening on http://{addr}/mcp");
    } else {
        let _ = writeln!(out, "Tollgate listening on http://{addr}");
    }
    for name in config.servers.keys() {
        let _ = writeln!(
            out,
            "  server {name}: http://{addr}/servers/{name}/mcp (legacy HTTP+SSE: http://{addr}/servers/{name}/sse)"
        );
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
        let (mut config, policies) = match (&args.config, &args.upstream, &args.policy) {
            (Some(path), _, _) => load_config(path)?,
            (None, Some(upstream), Some(policy)) => {
                let listen = args
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
                let upstream = CommandLineUpstream::Url {
                    url: upstream,
                    sse: false,
                };
                let config = single_server_config(upstream, policy, listen)?;
                let mut policies = BTreeMap::new();
                policies.insert("upstream".to_owned(), load_policy(policy)?);
                (config, policies)
            }
            _ => {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!(
                        "give either --config FILE, or --upstream URL and --policy FILE"
                    ),
                });
            }
        };
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        runtime()?.block_on(run_proxy(config, policies, |_| {}))
    })();
    finish(result)
}

/// Prints a failure and turns it into the exit code.
pub fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
