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

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
        // Field values and messages carry what clients and upstreams sent (tool names,
        // reasons, stderr lines): escaped, so none can start a forged line or drive the
        // terminal. JSON already escapes every string.
        LogFormat::Text => builder.fmt_fields(escaping_fields()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The text format's field formatter: `message` first as it is, then `name=value`,
/// each with control, bidi and invisible characters escaped ([`escape_log_text`]).
fn escaping_fields() -> EscapingFields {
    EscapingFields
}

/// See [`escaping_fields`]. Every span and event of every call passes here, so values
/// are escaped as they are written (no string per field), and a plain string is
/// written between its quotes without the `Debug` machinery.
struct EscapingFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapingFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        let writer = &mut self.writer;
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                writer.write_char(' ')?;
            }
            if field.name() != "message" {
                let name = field.name();
                writer.write_str(name.strip_prefix("r#").unwrap_or(name))?;
                writer.write_char('=')?;
            }
            value(writer)
        })();
    }
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // What `Debug` would print, without it, when nothing needs escaping.
        if every_byte(value, |b| {
            (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
        }) {
            self.field(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.field(field, |w| {
            std::fmt::Write::write_fmt(&mut Escaping(w), format_args!("{value:?}"))
        });
    }
}

/// Writes through [`escape_log_text`].
struct Escaping<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.write_str(&escape_log_text(text))
    }
}

/// Whether every byte of `text` is `plain`. Each is looked at (no early exit), which
/// the compiler does many at a time: log fields are short and almost always plain.
fn every_byte(text: &str, plain: impl Fn(u8) -> bool) -> bool {
    text.bytes().fold(true, |all, b| all & plain(b))
}

/// Escapes what must not reach a text log raw: control characters (`\n` `\r` `\t`
/// as such, others as `\x1b`, `\u{85}`), and bidi and invisible characters that
/// reorder or hide text (`\u{202e}`). Everything else is kept.
pub fn escape_log_text(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
    };
    // Printable ASCII, as most fields are, needs nothing: told without decoding.
    if every_byte(text, |b| (0x20..0x7f).contains(&b)) || !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
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

/// How the admin listener is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminMode {
    /// `admin:` exactly as configured, or none (`serve --config`, `demo`).
    Configured,
    /// Tollgate started for one person (`serve --upstream/--policy`, `stdio`): a
    /// configured admin port that is taken is replaced by an ephemeral one, and with no
    /// `admin:` at all, a policy that holds calls for a human gets a listener at
    /// `default_listen` (an ephemeral port if that is taken) with a generated token.
    Personal {
        /// Where the generated listener goes.
        default_listen: SocketAddr,
        /// `--admin-listen` named it: start it whatever the policies say, and fail
        /// rather than move when its port is taken.
        explicit: bool,
    },
}

/// A running admin listener.
pub struct AdminStarted {
    /// Its task; ends when `stop` turns true.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The token Tollgate generated for it, if it did.
    pub generated_token: Option<String>,
    /// `https` with `admin.listen_tls`, else `http`.
    pub scheme: &'static str,
}

impl AdminStarted {
    /// The line that announces it (with a generated token: printed this once).
    pub fn announcement(&self) -> String {
        match &self.generated_token {
            None => format!("Tollgate admin on {}://{}/", self.scheme, self.addr),
            Some(token) => format!(
                "Tollgate admin on {}://{}/ (token {token}, generated for this run; `{} approvals` finds it)",
                self.scheme,
                self.addr,
                super::own_binary()
            ),
        }
    }
}

/// Whether some server's policy holds calls in the admin queue.
fn policies_need_approvers(state: &AppState) -> bool {
    state
        .servers()
        .values()
        .any(|server| server.policy.load().uses_approval_queue())
}

/// 256 random bits as 64 hex digits.
fn generated_token() -> String {
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// Starts the admin listener of a `tollgate stdio` process (see [`AdminMode::Personal`]:
/// each stdio process of one configuration gets a port of its own), until `stop`;
/// returns its task and the line that announces it.
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
    let mode = AdminMode::Personal {
        default_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        explicit: false,
    };
    Ok(
        match bind_admin(config, state, stop, mode, "stdio").await? {
            Some(admin) => {
                let line = admin.announcement();
                (Some(admin.task), Some(line))
            }
            None => (None, None),
        },
    )
}

/// Starts the admin listener `mode` asks for, until `stop`, and records it in the
/// runtime directory (removed when it stops) so `tollgate approvals` finds it.
pub async fn bind_admin(
    config: &Config,
    state: &AppState,
    stop: tokio::sync::watch::Receiver<bool>,
    mode: AdminMode,
    command: &str,
) -> Result<Option<AdminStarted>, Failure> {
    let (listen, token, generated_token) = match (&config.admin, mode) {
        (Some(admin), _) => (admin.listen, admin.token.clone(), None),
        (
            None,
            AdminMode::Personal {
                default_listen,
                explicit,
            },
        ) if explicit || policies_need_approvers(state) => {
            let token = generated_token();
            (default_listen, Some(token.clone()), Some(token))
        }
        (None, _) => {
            if policies_need_approvers(state) {
                tracing::warn!(
                    "a policy holds calls for a human, but there is no `admin:` listener to approve them, so they are refused; add `admin: {{listen: 127.0.0.1:9090}}` to the configuration"
                );
            }
            return Ok(None);
        }
    };
    let admin_listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err)
            if err.kind() == std::io::ErrorKind::AddrInUse
                && matches!(
                    mode,
                    AdminMode::Personal {
                        explicit: false,
                        ..
                    }
                ) =>
        {
            let any = SocketAddr::new(listen.ip(), 0);
            let listener = tokio::net::TcpListener::bind(any)
                .await
                .with_context(|| format!("cannot listen on {any} for the admin API"))
                .map_err(Failure::io)?;
            if let Ok(addr) = listener.local_addr() {
                tracing::warn!(
                    "admin.listen {listen} is taken (another Tollgate with this configuration?); the admin API is on http://{addr}/ instead"
                );
            }
            listener
        }
        Err(err) => {
            return Err(Failure::io(
                anyhow::Error::new(err).context(format!("cannot listen on admin.listen {listen}")),
            ));
        }
    };
    let addr = admin_listener
        .local_addr()
        .map_err(|e| Failure::io(e.into()))?;
    let admin = tollgate_proxy::prepare_admin(state, addr, token.as_deref(), crate::VERSION)
        .map_err(|e| Failure::invalid(e.into()))?;
    let scheme = if config
        .admin
        .as_ref()
        .is_some_and(|a| a.listen_tls.is_some())
    {
        "https"
    } else {
        "http"
    };
    let registration = super::instances::register(&super::instances::Instance {
        pid: std::process::id(),
        admin: format!("{scheme}://{addr}"),
        token: generated_token.clone(),
        command: command.to_owned(),
        servers: config.servers.keys().cloned().collect(),
    });
    let task = tokio::spawn(async move {
        // The record lives exactly as long as the listener.
        let _registration = registration;
        tollgate_proxy::serve_admin(admin, admin_listener, tollgate_proxy::stopped(stop)).await
    });
    Ok(Some(AdminStarted {
        task,
        addr,
        generated_token,
        scheme,
    }))
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

/// Binds, prints the URLs, and serves until SIGINT or SIGTERM. `on_bound` gets the
/// MCP listener's address and the admin page's URL (`http://ADDR/`), if any.
pub async fn run_proxy(
    config: Config,
    policies: BTreeMap<String, LoadedPolicy>,
    mode: AdminMode,
    command: &str,
    on_bound: impl FnOnce(Bound),
) -> Result<(), Failure> {
    let state = AppState::build(&config, policies).map_err(|e| Failure::invalid(e.into()))?;
    let (listener, lanes) = bind_lanes(config.listen, tollgate_proxy::upstream::lanes())
        .await
        .map_err(|err| {
            cannot_listen(
                config.listen,
                "--listen, or `listen:` in the configuration",
                err,
            )
        })?;
    let addr = listener.local_addr().map_err(|e| Failure::io(e.into()))?;

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
        listener,
        lanes,
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
        let usage = |text: &str| Failure {
            code: 2,
            error: anyhow::anyhow!("{text}"),
        };
        let command_line = args.config.is_none();
        let (mut config, policies) = match (&args.config, &args.policy) {
            (Some(path), _) => load_config(path)?,
            (None, Some(policy)) => {
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
                (config, policies)
            }
            _ => {
                return Err(usage(
                    "give either --config FILE, or --policy FILE with --upstream URL or -- CMD ARGS",
                ));
            }
        };
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        let mode = match (args.admin_listen, &mut config.admin) {
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
        };
        // One lane per core (or `TOKIO_WORKER_THREADS`), each a thread with a
        // current-thread runtime; this thread is the first.
        tollgate_proxy::upstream::set_lanes(lane_count());
        tollgate_proxy::lane_runtime()
            .map_err(|e| Failure::io(e.into()))?
            .block_on(run_proxy(config, policies, mode, "serve", |_| {}))
    })();
    finish(result)
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

/// The proxy's listener and, with more than one lane, one more per lane on the same
/// address (`SO_REUSEPORT`: the kernel spreads connections over them).
async fn bind_lanes(
    listen: SocketAddr,
    lanes: usize,
) -> std::io::Result<(tokio::net::TcpListener, Vec<std::net::TcpListener>)> {
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    if lanes > 1 {
        let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        };
        let first = bind(listen)?;
        // Port 0 picked a port: the other lanes take the same one.
        let addr = first.local_addr()?;
        let mut more = Vec::with_capacity(lanes - 1);
        for _ in 1..lanes {
            more.push(bind(addr)?.into_std()?);
        }
        return Ok((first, more));
    }
    let _ = lanes;
    Ok((tokio::net::TcpListener::bind(listen).await?, Vec::new()))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn log_text_escapes_control_bidi_and_invisible_characters() {
        assert_eq!(escape_log_text("plain tool_name é"), "plain tool_name é");
        assert_eq!(
            escape_log_text("x\n2026-01-01 INFO approval settled\u{1b}[2J\r\t\u{7f}\u{85}"),
            "x\\n2026-01-01 INFO approval settled\\x1b[2J\\r\\t\\x7f\\u{85}"
        );
        assert_eq!(
            escape_log_text("a\u{202e}b\u{200b}c"),
            "a\\u{202e}b\\u{200b}c"
        );
    }

    #[test]
    fn the_text_format_escapes_every_field_and_the_message() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(escaping_fields())
            .finish();
        let evil = "t\n2026 INFO forged\u{1b}[2J";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("call", tool = %evil);
            let _entered = span.enter();
            tracing::info!(reason = %evil, debug = ?evil, plain = evil, quoted = "a \"b\"", simple = "a b", "decided {evil}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.contains("decided t\\n2026 INFO forged\\x1b[2J"),
            "{text}"
        );
        assert!(text.contains("call{tool=t\\n2026"), "{text}");
        assert!(text.contains("reason=t\\n2026"), "{text}");
        // Strings read as `Debug` prints them, whether or not they needed escaping.
        assert!(text.contains(r#" quoted="a \"b\"" simple="a b""#), "{text}");
    }
}
