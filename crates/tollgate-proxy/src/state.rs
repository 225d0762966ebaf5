//! What every request shares: the servers (each with its policy, rate-limit
//! windows and upstream), sessions, approvals, the audit log and metrics.
//!
//! Built once from the configuration. This module sits below everything that
//! handles requests and imports nothing above it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use tollgate_policy::Policy;

use crate::audit::Audit;
use crate::config::{Config, ServerConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::store::approvals::Approvals;
use crate::store::limits::CallLimits;
use crate::store::params::ToolParams;
use crate::store::remote::{Remote, RemoteConfig};
use crate::store::sessions::Sessions;
use crate::store::tasks::Tasks;
use crate::upstream::{Bridge, Connector, Lanes, Upstream, http::HttpUpstream, legacy_sse, stdio};

/// One upstream MCP server and the policy that guards it.
pub struct Server {
    /// Its name in the configuration, used in paths, logs and errors.
    pub name: Arc<str>,
    /// How it is reached.
    pub upstream: Box<dyn Upstream>,
    /// Where it is, for messages: its URL or command line.
    pub location: String,
    /// The configuration key to check when it cannot be reached.
    pub location_key: String,
    /// Host and port to try for readiness, for network upstreams.
    pub network_address: Option<(String, u16)>,
    /// Its readiness probe and last outcome.
    pub health: crate::upstream::probe::Health,
    /// Per upstream request.
    pub timeout: Duration,
    /// The policy in force; swapped whole on reload, read once per request.
    pub policy: ArcSwap<Policy>,
    /// Rolling-window rate-limit state, kept across reloads.
    pub limits: CallLimits,
    /// Where the policy came from and how its last reload went.
    pub policy_info: Mutex<PolicyInfo>,
    /// The `Mcp-Param-*` headers its tools declare, learned from `tools/list`.
    pub params: ToolParams,
    /// Its tool lock and what the upstream advertised, when it has `tools_lock:`.
    pub tools: Option<crate::lock::ToolWatch>,
    /// Whether its upstream sessions live in this process (a stdio process, a legacy
    /// SSE connection), so that another replica cannot serve them.
    pub pinned: bool,
}

impl Server {
    /// Probes its upstream for readiness now (at most 5 s, or its timeout if shorter).
    pub async fn probe(&self) -> crate::upstream::probe::Checked {
        let timeout = self.timeout.min(Duration::from_secs(5));
        let span = tracing::info_span!("readiness", server = %self.name);
        tracing::Instrument::instrument(self.health.check(&*self.upstream, timeout), span).await
    }
}

/// Provenance of a server's policy, for `/status` and reloads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyInfo {
    /// The policy file, when it came from one.
    pub path: Option<std::path::PathBuf>,
    /// `sha256:<hex>` of the file's text.
    pub hash: String,
    /// When the policy in force was loaded (RFC 3339).
    pub loaded_at: String,
    /// The last reload's error, if it failed; the previous policy stays in force.
    pub last_error: Option<String>,
    /// Hash of the text that last failed, so the same broken file counts once.
    #[serde(skip)]
    pub failed_hash: Option<String>,
}

/// A compiled policy and where it came from.
pub struct LoadedPolicy {
    /// The compiled policy.
    pub policy: Policy,
    /// Its file, if any.
    pub path: Option<std::path::PathBuf>,
    /// `sha256:<hex>` of its text.
    pub hash: String,
}

impl LoadedPolicy {
    /// Compiles `source`; `path` is used in messages and for reloads.
    pub fn compile(
        source: &str,
        path: Option<&std::path::Path>,
        origin: &str,
    ) -> Result<LoadedPolicy, String> {
        let policy = Policy::from_yaml(source, origin).map_err(|e| e.to_string())?;
        Ok(LoadedPolicy {
            policy,
            path: path.map(ToOwned::to_owned),
            hash: crate::audit::text_digest(source),
        })
    }

    /// Reads and compiles a policy file.
    pub fn read(path: &std::path::Path) -> Result<LoadedPolicy, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        LoadedPolicy::compile(&source, Some(path), &path.display().to_string())
    }
}

/// Everything the request handlers share, built once: the owner of the narrow
/// handles a stage is given ([`Upstreams`], [`Audit`], [`Metrics`], [`Notify`],
/// [`Tls`], the `limits:`), each reached through its accessor.
pub struct Shared {
    /// The servers and what their upstreams share.
    upstreams: Upstreams,
    /// Handshake-era sessions.
    pub(crate) sessions: Sessions,
    /// The audit log.
    pub(crate) audit: Audit,
    /// `limits:`, for what reads them late (the listeners, body reads).
    limits: crate::config::Limits,
    /// Time zero for the policy engine's clock.
    epoch: Instant,
    /// Calls waiting for a human.
    pub(crate) approvals: Arc<Approvals>,
    /// The MCP tasks relayed: who owns each, which tool created it.
    pub(crate) tasks: Tasks,
    /// Prometheus metrics.
    pub(crate) metrics: Metrics,
    /// How people hear of held calls: the admin page and `approvals.webhook`.
    notify: Notify,
    /// How often idle sessions and processes are looked for.
    sweep_every: Duration,
    /// `approvals.wait`: how long a held call's request waits by default.
    pub(crate) approval_wait: Duration,
    /// The shared backend (`state.backend: redis`), if any.
    pub(crate) remote: Option<Arc<Remote>>,
    /// `state.on_failure`.
    pub(crate) state_on_failure: crate::config::OnStateFailure,
    /// The listeners' certificates.
    tls: Tls,
}

/// The upstream servers and what their connections share: what a stage that
/// finds a server or forwards to one is given.
pub struct Upstreams {
    /// Servers by name.
    servers: BTreeMap<String, Arc<Server>>,
    /// Every process started for stdio upstreams.
    children: Arc<stdio::Children>,
    /// How often each upstream is probed for readiness.
    health_interval: Duration,
}

impl Upstreams {
    /// The server named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.get(name)
    }

    /// The servers, by name.
    pub fn servers(&self) -> &BTreeMap<String, Arc<Server>> {
        &self.servers
    }

    /// How often each upstream is probed for readiness (`health_interval`).
    pub fn health_interval(&self) -> Duration {
        self.health_interval
    }

    /// Ends every upstream session and every child process.
    pub async fn shutdown(&self) {
        for server in self.servers.values() {
            server.upstream.shutdown().await;
        }
        let children = self.children.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || children.shutdown()).await {
            tracing::error!(error = %err, "ending the stdio upstreams failed");
        }
    }

    /// Drops upstream sessions idle for `idle` and rate-limit windows empty at `now`.
    fn sweep(&self, idle: Duration, now: Duration) {
        for server in self.servers.values() {
            server.upstream.sweep(idle);
            server.limits.sweep(now);
        }
    }
}

/// How people hear of a held call: the admin page's address once its listener is
/// bound, and `approvals.webhook` with the client that posts to it.
pub struct Notify {
    /// Base URL of the admin listener once bound; approvals need it.
    admin_url: std::sync::OnceLock<String>,
    /// POSTed for each new pending approval.
    webhook: Option<reqwest::Url>,
    /// The HTTP client the webhook is posted with.
    http: reqwest::Client,
    /// Webhook deliveries that failed after every retry.
    failures: AtomicU64,
}

impl Notify {
    /// The admin listener's base URL, once bound.
    pub fn admin_url(&self) -> Option<&str> {
        self.admin_url.get().map(String::as_str)
    }

    /// Records the admin listener's base URL; `false` if one was already set.
    pub fn set_admin_url(&self, url: String) -> bool {
        self.admin_url.set(url).is_ok()
    }

    /// `approvals.webhook`, if set.
    pub fn webhook(&self) -> Option<&reqwest::Url> {
        self.webhook.as_ref()
    }

    /// The HTTP client to post the webhook with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Counts a webhook delivery that failed after every retry.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Webhook deliveries that failed after every retry.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The listeners' certificates, reloaded with the policies.
pub struct Tls {
    /// The proxy listener's (`listen_tls:`).
    listen: Option<Arc<crate::tls::Certs>>,
    /// The admin listener's (`admin.listen_tls:`).
    admin: Option<Arc<crate::tls::Certs>>,
}

impl Tls {
    /// The proxy listener's certificate, with `listen_tls:`.
    pub fn listen(&self) -> Option<&Arc<crate::tls::Certs>> {
        self.listen.as_ref()
    }

    /// The admin listener's certificate, with `admin.listen_tls:`.
    pub fn admin(&self) -> Option<&Arc<crate::tls::Certs>> {
        self.admin.as_ref()
    }

    /// Every certificate in use.
    pub fn all(&self) -> impl Iterator<Item = &crate::tls::Certs> {
        self.listen.iter().chain(&self.admin).map(|c| &**c)
    }
}

/// The longest wait between sweeps; a short `servers.<n>.idle` sweeps more often.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Why the proxy could not be built from a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A server has no policy loaded.
    #[error("server `{0}`: no policy was loaded for it")]
    MissingPolicy(String),
    /// A header value cannot be sent.
    #[error("server `{0}`: header `{1}` has a value that cannot be sent in HTTP")]
    BadHeader(String, String),
    /// The URL does not parse.
    #[error("server `{0}`: url `{1}` is not valid: {2}")]
    BadUrl(String, String, String),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditOpenError),
    /// The HTTP client could not be built.
    #[error("could not build the upstream HTTP client: {0}")]
    Http(String),
    /// The `requestState` key could not be made.
    #[error("approvals.state_key: cannot be used as a key: {0}")]
    StateKey(String),
    /// The shared state's connection could not be prepared.
    #[error("{0}")]
    State(String),
    /// The OAuth resource server could not be set up.
    #[error("{0}")]
    Auth(String),
    /// A tool lock cannot be used.
    #[error("server `{0}`: {1}")]
    Lock(String, String),
    /// Telemetry could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// A listener's certificate cannot be used.
    #[error("{0}")]
    Tls(String),
}

/// What every server's upstream shares: the HTTP pool, the record of child processes.
struct UpstreamKit<'a> {
    http: &'a reqwest::Client,
    children: &'a Arc<stdio::Children>,
    max_message: usize,
    remote: Option<&'a Arc<Remote>>,
    on_state_failure: crate::config::OnStateFailure,
    lanes: Lanes,
}

fn build_server(
    name: &str,
    config: &ServerConfig,
    loaded: LoadedPolicy,
    kit: &UpstreamKit<'_>,
) -> Result<Server, BuildError> {
    let Reached {
        upstream,
        location,
        location_key,
        network,
    } = reach(name, config, kit)?;
    Ok(Server {
        tools: tool_watch(name, config, kit.remote)?,
        name: name.into(),
        health: crate::upstream::probe::Health::new(probe_of(&config.upstream)),
        upstream,
        location,
        location_key: format!("servers.{name}.{location_key}"),
        network_address: network,
        timeout: config.timeout,
        policy: ArcSwap::from_pointee(loaded.policy),
        limits: match kit.remote {
            Some(remote) => CallLimits::shared(remote.clone(), name, kit.on_state_failure),
            None => CallLimits::local(),
        },
        pinned: !matches!(config.upstream, UpstreamConfig::Http { .. }),
        policy_info: Mutex::new(PolicyInfo {
            path: loaded.path,
            hash: loaded.hash,
            loaded_at: crate::audit::now_rfc3339(),
            last_error: None,
            failed_hash: None,
        }),
        params: match kit.remote {
            Some(remote) => ToolParams::shared(remote.clone(), name),
            None => ToolParams::default(),
        },
    })
}

/// A server's upstream and where it is, for messages and readiness.
struct Reached {
    upstream: Box<dyn Upstream>,
    location: String,
    location_key: &'static str,
    network: Option<(String, u16)>,
}

/// The upstream of server `name`, as its configuration says it is reached.
fn reach(name: &str, config: &ServerConfig, kit: &UpstreamKit<'_>) -> Result<Reached, BuildError> {
    let headers = build_headers(name, config)?;
    let (command, env, inherit_env, cwd, max_processes, idle) = match &config.upstream {
        UpstreamConfig::Http { url } => return reach_url(name, url, false, headers, config, kit),
        UpstreamConfig::Sse { url } => return reach_url(name, url, true, headers, config, kit),
        UpstreamConfig::Stdio {
            command,
            env,
            inherit_env,
            cwd,
            max_processes,
            idle,
        } => (command, env, inherit_env, cwd, max_processes, idle),
    };
    let command = stdio::Command {
        server: name.into(),
        argv: command.clone(),
        env: env.clone(),
        inherit_env: inherit_env.clone(),
        cwd: cwd.clone(),
        max_line: kit.max_message,
    };
    let location = command.display();
    let upstream =
        bridge(name, Connector::Stdio(command), config, kit).with_processes(*max_processes, *idle);
    Ok(Reached {
        upstream: Box::new(upstream),
        location,
        location_key: "command",
        network: None,
    })
}

/// A network upstream at `url`: Streamable HTTP, or legacy SSE (`sse`) through a bridge.
fn reach_url(
    name: &str,
    url: &str,
    sse: bool,
    headers: HeaderMap,
    config: &ServerConfig,
    kit: &UpstreamKit<'_>,
) -> Result<Reached, BuildError> {
    let bad_url = |e: String| BuildError::BadUrl(name.into(), url.to_owned(), e);
    let parsed = reqwest::Url::parse(url).map_err(|e| bad_url(e.to_string()))?;
    let network = address_of(&parsed);
    let upstream: Box<dyn Upstream> = if sse {
        let target = legacy_sse::Target {
            server: name.into(),
            url: parsed,
            headers,
            timeout: config.timeout,
        };
        Box::new(bridge(name, Connector::LegacySse(target), config, kit))
    } else {
        Box::new(
            HttpUpstream::new(&parsed, headers, config.timeout, kit.max_message)
                .map_err(|e| bad_url(e.to_string()))?
                .with_lanes(kit.lanes),
        )
    };
    Ok(Reached {
        upstream,
        location: url.to_owned(),
        location_key: "url",
        network,
    })
}

/// The bridge that carries a legacy SSE or stdio upstream's sessions.
fn bridge(
    name: &str,
    connector: Connector,
    config: &ServerConfig,
    kit: &UpstreamKit<'_>,
) -> Bridge {
    Bridge::new(
        name.into(),
        connector,
        kit.http.clone(),
        kit.children.clone(),
        config.timeout,
    )
}

/// The server's tool lock and what it learns, with `tools_lock:`.
fn tool_watch(
    name: &str,
    config: &ServerConfig,
    remote: Option<&Arc<Remote>>,
) -> Result<Option<crate::lock::ToolWatch>, BuildError> {
    let Some(path) = &config.tools_lock else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        BuildError::Lock(
            name.into(),
            format!("{}: cannot read the tool lock: {e}", path.display()),
        )
    })?;
    let lock = crate::lock::ToolLock::parse(&text, &path.display().to_string())
        .map_err(|e| BuildError::Lock(name.into(), e.to_string()))?;
    let watch = crate::lock::ToolWatch::new(
        lock,
        path.clone(),
        crate::audit::text_digest(&text),
        config.on_tool_change,
    );
    Ok(Some(match remote {
        Some(remote) => watch.with_shared(remote.clone(), name),
        None => watch,
    }))
}

/// How the upstream's readiness is probed: a stdio command is looked for on its
/// `PATH`; anything else answers an exchange.
fn probe_of(upstream: &UpstreamConfig) -> crate::upstream::probe::Probe {
    match upstream {
        UpstreamConfig::Stdio {
            command, env, cwd, ..
        } => crate::upstream::probe::Probe::Command {
            program: command.first().cloned().unwrap_or_default(),
            path: env
                .get("PATH")
                .cloned()
                .or_else(|| std::env::var("PATH").ok()),
            cwd: cwd.clone(),
        },
        _ => crate::upstream::probe::Probe::Exchange,
    }
}

/// This replica's name: `state.replica`, else `$HOSTNAME` (a pod's name), else a
/// random one.
fn replica_name(configured: Option<&str>) -> Arc<str> {
    configured
        .map(str::to_owned)
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| format!("tollgate-{}", crate::store::random_hex(4)))
        .into()
}

fn address_of(url: &reqwest::Url) -> Option<(String, u16)> {
    Some((url.host_str()?.to_owned(), url.port_or_known_default()?))
}

fn build_headers(name: &str, config: &ServerConfig) -> Result<HeaderMap, BuildError> {
    let mut headers = HeaderMap::new();
    for (key, value) in &config.headers {
        let bad = || BuildError::BadHeader(name.into(), key.clone());
        let header = HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad())?;
        let mut value = HeaderValue::from_str(value).map_err(|_| bad())?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

impl Shared {
    /// The servers and what their upstreams share.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The servers, by name.
    pub fn servers(&self) -> &BTreeMap<String, Arc<Server>> {
        self.upstreams.servers()
    }

    /// Handshake-era sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Pending and settled approvals.
    pub fn approvals(&self) -> &Arc<Approvals> {
        &self.approvals
    }

    /// The MCP tasks relayed.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The admin page's address and `approvals.webhook`.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// The listeners' certificates.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// `limits:`.
    pub fn limits(&self) -> &crate::config::Limits {
        &self.limits
    }

    /// The largest body accepted from a client (`limits.max_body`).
    pub fn max_body(&self) -> usize {
        self.limits.max_body
    }

    /// `approvals.wait`: how long a held call's request waits by default.
    pub fn approval_wait(&self) -> Duration {
        self.approval_wait
    }

    /// Builds the state from a validated configuration and each server's compiled
    /// policy, with upstream connections for each of `lanes`.
    pub fn build(
        config: &Config,
        policies: BTreeMap<String, LoadedPolicy>,
        lanes: Lanes,
    ) -> Result<Shared, BuildError> {
        let http = http_client()?;
        let remote = connect_remote(config)?;
        let upstreams = build_upstreams(config, policies, lanes, &http, remote.as_ref())?;
        let tls = listener_certs(config)?;
        let audit = match &config.audit {
            Some(audit) => Audit::open(&audit.path, audit.arguments)?.on_failure(audit.on_failure),
            None => Audit::disabled(),
        };
        let metrics = Metrics::new();
        if let Some(telemetry) = &config.telemetry {
            crate::telemetry::install(telemetry, metrics.telemetry_dropped(), &|name| {
                std::env::var(name).ok()
            })?;
        }
        Ok(Shared {
            upstreams,
            sessions: build_sessions(&config.limits, config.state.on_failure, remote.as_ref()),
            audit,
            limits: config.limits.clone(),
            epoch: Instant::now(),
            approvals: build_approvals(config, remote.as_ref()),
            tasks: match &remote {
                Some(remote) => Tasks::shared(remote.clone()),
                None => Tasks::new(),
            },
            metrics,
            notify: Notify {
                admin_url: std::sync::OnceLock::new(),
                webhook: webhook_url(config)?,
                http,
                failures: AtomicU64::new(0),
            },
            sweep_every: sweep_every(config),
            approval_wait: config
                .approvals
                .as_ref()
                .and_then(|a| a.wait)
                .unwrap_or(crate::config::DEFAULT_APPROVAL_WAIT),
            remote,
            state_on_failure: config.state.on_failure,
            tls,
        })
    }

    /// How often [`Shared::sweep`] should run.
    pub fn sweep_every(&self) -> Duration {
        self.sweep_every
    }

    /// The engine's clock: time since the proxy started.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Ends every upstream session and every child process.
    pub async fn shutdown_upstreams(&self) {
        self.upstreams.shutdown().await;
    }

    /// Drops state for idle sessions and empty rate-limit windows; run periodically.
    pub fn sweep(&self) {
        self.sessions.sweep();
        self.tasks.sweep();
        self.upstreams.sweep(self.sessions.idle(), self.now());
    }
}

/// The client for legacy SSE upstreams and webhooks (a Streamable HTTP upstream
/// has its own pool).
fn http_client() -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| BuildError::Http(e.to_string()))
}

/// The shared backend of `state.backend: redis`, kept alive, or `None`.
fn connect_remote(config: &Config) -> Result<Option<Arc<Remote>>, BuildError> {
    let (crate::config::StateBackend::Redis, Some(url)) =
        (&config.state.backend, &config.state.url)
    else {
        return Ok(None);
    };
    let remote = Remote::connect(RemoteConfig {
        url,
        shown: crate::config::redacted_url(url),
        prefix: &config.state.prefix,
        timeout: config.state.timeout,
        replica: replica_name(config.state.replica.as_deref()),
    })
    .map(Arc::new)
    .map_err(BuildError::State)?;
    remote.keep_alive();
    Ok(Some(remote))
}

/// Every configured server with its policy and upstream.
fn build_upstreams(
    config: &Config,
    mut policies: BTreeMap<String, LoadedPolicy>,
    lanes: Lanes,
    http: &reqwest::Client,
    remote: Option<&Arc<Remote>>,
) -> Result<Upstreams, BuildError> {
    let children = Arc::new(stdio::Children::default());
    let kit = UpstreamKit {
        http,
        children: &children,
        // A message from an upstream may be as large as four of a client's.
        max_message: config.limits.max_body.max(1 << 20) * 4,
        remote,
        on_state_failure: config.state.on_failure,
        lanes,
    };
    let mut servers = BTreeMap::new();
    for (name, server) in &config.servers {
        let policy = policies
            .remove(name)
            .ok_or_else(|| BuildError::MissingPolicy(name.clone()))?;
        servers.insert(
            name.clone(),
            Arc::new(build_server(name, server, policy, &kit)?),
        );
    }
    Ok(Upstreams {
        servers,
        children,
        health_interval: config.health_interval,
    })
}

/// The handshake-era sessions, shared with other replicas through `remote`.
fn build_sessions(
    limits: &crate::config::Limits,
    on_failure: crate::config::OnStateFailure,
    remote: Option<&Arc<Remote>>,
) -> Sessions {
    let sessions = Sessions::new(limits.max_sessions, limits.session_idle)
        .with_quotas(limits.sessions_per_client, limits.streams_per_session);
    match remote {
        Some(remote) => sessions.with_shared(remote.clone(), on_failure),
        None => sessions,
    }
}

/// The approvals, shared with other replicas through `remote`.
fn build_approvals(config: &Config, remote: Option<&Arc<Remote>>) -> Arc<Approvals> {
    let approvals = match remote {
        Some(remote) => Approvals::shared(remote.clone()),
        None => Arc::new(Approvals::new()),
    };
    if let Some(bytes) = config.approvals.as_ref().and_then(|a| a.bytes_per_client) {
        approvals.set_bytes_per_principal(bytes);
    }
    approvals
}

/// `approvals.webhook`, parsed.
fn webhook_url(config: &Config) -> Result<Option<reqwest::Url>, BuildError> {
    let Some(url) = config.approvals.as_ref().and_then(|a| a.webhook.as_deref()) else {
        return Ok(None);
    };
    reqwest::Url::parse(url)
        .map(Some)
        .map_err(|e| BuildError::BadUrl("approvals.webhook".into(), url.to_owned(), e.to_string()))
}

/// How often to sweep: an idle process should be ended within a quarter of its
/// idle time.
fn sweep_every(config: &Config) -> Duration {
    config
        .servers
        .values()
        .filter_map(|server| match &server.upstream {
            UpstreamConfig::Stdio { idle, .. } => Some(*idle / 4),
            _ => None,
        })
        .fold(SWEEP_EVERY, Duration::min)
        .max(Duration::from_millis(100))
}

/// The listeners' certificates, read.
fn listener_certs(config: &Config) -> Result<Tls, BuildError> {
    let certs = |listener, tls: Option<&crate::config::TlsConfig>| {
        tls.map(|tls| crate::tls::Certs::load(listener, tls).map_err(BuildError::Tls))
            .transpose()
    };
    Ok(Tls {
        listen: certs("listen", config.listen_tls.as_ref())?,
        admin: certs(
            "admin.listen",
            config.admin.as_ref().and_then(|a| a.listen_tls.as_ref()),
        )?,
    })
}
