//! Building the state once from the configuration: each server with its
//! upstream, policy and tool lock, and the sessions, approvals, audit log and
//! certificates [`Shared`] owns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;

use super::{LoadedPolicy, Notify, PolicyInfo, Server, Shared, Tls, Upstreams};
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
            stream: http_client(0)?,
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
    /// Builds the state from a validated configuration and each server's compiled
    /// policy, with upstream connections for each of `lanes`.
    pub fn build(
        config: &Config,
        policies: BTreeMap<String, LoadedPolicy>,
        lanes: Lanes,
    ) -> Result<Shared, BuildError> {
        let http = http_client(1024)?;
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
}

/// The client for legacy SSE upstreams and webhooks (a Streamable HTTP upstream
/// has its own pool), keeping up to `idle_per_host` idle connections.
fn http_client(idle_per_host: usize) -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(idle_per_host)
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
