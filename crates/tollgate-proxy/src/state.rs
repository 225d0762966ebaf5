//! The proxy's shared state, built once from the configuration.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use governor::{DefaultKeyedRateLimiter, Quota};
use tollgate_policy::{Policy, RateLimiter};

use crate::approvals::Approvals;
use crate::audit::Audit;
use crate::config::{Config, ServerConfig};
use crate::session::Sessions;

/// One upstream MCP server and the policy that guards it.
pub struct Server {
    /// Its name in the configuration, used in paths, logs and errors.
    pub name: Arc<str>,
    /// How it is reached.
    pub upstream: Upstream,
    /// Where it is, for messages: its URL or command line.
    pub location: String,
    /// Headers sent with every upstream request.
    pub headers: HeaderMap,
    /// Per upstream request.
    pub timeout: Duration,
    /// The policy in force; swapped whole on reload, read once per request.
    pub policy: ArcSwap<Policy>,
    /// Rolling-window rate-limit state, kept across reloads.
    pub limiter: Mutex<RateLimiter>,
    /// Where the policy came from and how its last reload went.
    pub policy_info: Mutex<PolicyInfo>,
}

impl Server {
    /// Gives a rate-limit slot back: the call it was taken for never reached the tool.
    pub fn release(&self, slot: Option<tollgate_policy::Slot>) {
        if let (Some(slot), Ok(mut limiter)) = (slot, self.limiter.lock()) {
            limiter.release(slot);
        }
    }
}

/// How an upstream is reached.
pub enum Upstream {
    /// Streamable HTTP at this endpoint.
    Http(reqwest::Url),
    /// A stdio process or a legacy HTTP+SSE server, through a bridge.
    Bridged(Arc<crate::upstream::Bridge>),
}

impl Server {
    /// The config key to check when the upstream fails.
    pub fn location_key(&self) -> String {
        match &self.upstream {
            Upstream::Bridged(_) if self.location.starts_with("http") => {
                format!("servers.{}.url", self.name)
            }
            Upstream::Bridged(_) => format!("servers.{}.command", self.name),
            Upstream::Http(_) => format!("servers.{}.url", self.name),
        }
    }

    /// Host and port to try for readiness, for network upstreams.
    pub fn network_address(&self) -> Option<(String, u16)> {
        let url = match &self.upstream {
            Upstream::Http(url) => url.clone(),
            Upstream::Bridged(_) => reqwest::Url::parse(&self.location).ok()?,
        };
        Some((url.host_str()?.to_owned(), url.port_or_known_default()?))
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

/// An authenticated client.
pub struct Client {
    /// Its name.
    pub name: Arc<str>,
    /// Its bearer key.
    pub key: Vec<u8>,
}

/// Tollgate's own requests to clients awaiting an answer: id → (session, reply).
pub type PendingElicitations = std::collections::HashMap<
    String,
    (
        Option<Arc<str>>,
        tokio::sync::oneshot::Sender<serde_json::Value>,
    ),
>;

/// Everything the request handlers share.
pub struct Shared {
    /// Servers by name.
    pub servers: BTreeMap<String, Arc<Server>>,
    /// Handshake-era sessions.
    pub sessions: Sessions,
    /// Open downstream legacy HTTP+SSE streams.
    pub legacy: crate::legacy::LegacyClients,
    /// Authenticated clients; empty means no authentication.
    pub clients: Vec<Client>,
    /// The audit log.
    pub audit: Audit,
    /// Largest body accepted.
    pub max_body: usize,
    /// Browser origins allowed.
    pub allowed_origins: Vec<String>,
    /// Extra host names allowed on a loopback listener.
    pub allowed_hosts: Vec<String>,
    /// Whether the listener is on a loopback address (enables the Host check).
    pub loopback: bool,
    /// The upstream HTTP client (connection pool).
    pub http: reqwest::Client,
    /// Every process started for stdio upstreams.
    pub children: Arc<crate::upstream::stdio::Children>,
    /// Time zero for the policy engine's clock.
    pub epoch: Instant,
    /// Per-client request rate, protecting the proxy itself.
    pub client_rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Calls waiting for a human.
    pub approvals: Arc<Approvals>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Tollgate's own `elicitation/create` requests awaiting the client's answer, by
    /// request id, with the session they were sent on.
    pub elicitations: Mutex<PendingElicitations>,
    /// Base URL of the admin listener once bound; approvals need it.
    pub admin_url: std::sync::OnceLock<String>,
    /// POSTed for each new pending approval.
    pub webhook: Option<reqwest::Url>,
    /// Webhook deliveries that failed after every retry.
    pub webhook_failures: std::sync::atomic::AtomicU64,
}

/// Cheap-to-clone handle on [`Shared`].
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Why the proxy could not be built from a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A server has no policy loaded.
    #[error("server `{0}`: no policy was loaded for it")]
    MissingPolicy(String),
    /// A server has neither a URL nor a command.
    #[error("server `{0}`: needs `url` or `command`")]
    NoUpstream(String),
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
}

/// What every server's upstream shares: the HTTP pool, the record of child processes.
struct UpstreamKit<'a> {
    http: &'a reqwest::Client,
    children: &'a Arc<crate::upstream::stdio::Children>,
    max_line: usize,
}

fn build_server(
    name: &str,
    config: &ServerConfig,
    loaded: LoadedPolicy,
    kit: &UpstreamKit<'_>,
) -> Result<Server, BuildError> {
    use crate::config::Transport;
    use crate::upstream::{Bridge, Connector, legacy_sse, stdio};
    let parse_url = |text: &String| {
        reqwest::Url::parse(text)
            .map_err(|e| BuildError::BadUrl(name.into(), text.clone(), e.to_string()))
    };
    let headers = build_headers(name, config)?;
    let bridge = |connector| {
        Upstream::Bridged(Arc::new(Bridge::new(
            name.into(),
            connector,
            kit.http.clone(),
            kit.children.clone(),
        )))
    };
    let (upstream, location) = match (config.transport(), &config.url, &config.command) {
        (Transport::Http, Some(url), _) => (Upstream::Http(parse_url(url)?), url.clone()),
        (Transport::Sse, Some(url), _) => {
            let target = legacy_sse::Target {
                server: name.into(),
                url: parse_url(url)?,
                headers: headers.clone(),
                timeout: config.timeout,
            };
            (bridge(Connector::LegacySse(target)), url.clone())
        }
        (Transport::Stdio, _, Some(argv)) => {
            let command = stdio::Command {
                server: name.into(),
                argv: argv.clone(),
                env: config.env.clone(),
                inherit_env: config.inherit_env.clone(),
                cwd: config.cwd.clone(),
                max_line: kit.max_line,
            };
            let location = command.display();
            (bridge(Connector::Stdio(command)), location)
        }
        _ => return Err(BuildError::NoUpstream(name.into())),
    };
    Ok(Server {
        name: name.into(),
        upstream,
        location,
        headers,
        timeout: config.timeout,
        policy: ArcSwap::from_pointee(loaded.policy),
        limiter: Mutex::new(RateLimiter::new()),
        policy_info: Mutex::new(PolicyInfo {
            path: loaded.path,
            hash: loaded.hash,
            loaded_at: crate::audit::now_rfc3339(),
            last_error: None,
            failed_hash: None,
        }),
    })
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

impl AppState {
    /// Builds the state from a validated configuration and each server's compiled policy.
    pub fn build(
        config: &Config,
        mut policies: BTreeMap<String, LoadedPolicy>,
    ) -> Result<AppState, BuildError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BuildError::Http(e.to_string()))?;
        let children = Arc::new(crate::upstream::stdio::Children::default());
        let kit = UpstreamKit {
            http: &http,
            children: &children,
            // A message from a stdio upstream may be as large as one from a client.
            max_line: config.limits.max_body.max(1 << 20) * 4,
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
        let audit = match &config.audit {
            Some(audit) => Audit::open(&audit.path, audit.arguments)?,
            None => Audit::disabled(),
        };
        let webhook = match config.approvals.as_ref().and_then(|a| a.webhook.as_deref()) {
            Some(url) => Some(reqwest::Url::parse(url).map_err(|e| {
                BuildError::BadUrl("approvals.webhook".into(), url.to_owned(), e.to_string())
            })?),
            None => None,
        };
        let client_rate = NonZeroU32::new(config.limits.requests_per_second)
            .map(|rps| DefaultKeyedRateLimiter::keyed(Quota::per_second(rps)));
        Ok(AppState(Arc::new(Shared {
            servers,
            sessions: Sessions::new(config.limits.max_sessions, config.limits.session_idle),
            legacy: crate::legacy::LegacyClients::default(),
            clients: config
                .clients
                .iter()
                .map(|c| Client {
                    name: c.name.as_str().into(),
                    key: c.key.as_bytes().to_vec(),
                })
                .collect(),
            audit,
            max_body: config.limits.max_body,
            allowed_origins: config.allowed_origins.clone(),
            allowed_hosts: config.allowed_hosts.clone(),
            loopback: config.listen.ip().is_loopback(),
            http,
            children,
            epoch: Instant::now(),
            client_rate,
            approvals: Arc::new(Approvals::new()),
            metrics: crate::metrics::Metrics::new(),
            elicitations: Mutex::new(std::collections::HashMap::new()),
            admin_url: std::sync::OnceLock::new(),
            webhook,
            webhook_failures: std::sync::atomic::AtomicU64::new(0),
        })))
    }

    /// The engine's clock: time since the proxy started.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Ends every upstream session of bridged upstreams and every child process.
    pub async fn shutdown_upstreams(&self) {
        for server in self.servers.values() {
            if let Upstream::Bridged(bridge) = &server.upstream {
                bridge.shutdown().await;
            }
        }
        let children = self.children.clone();
        let _ = tokio::task::spawn_blocking(move || children.shutdown()).await;
    }

    /// Drops state for idle sessions and clients; run periodically.
    pub fn sweep(&self) {
        self.sessions.sweep();
        for server in self.servers.values() {
            if let Upstream::Bridged(bridge) = &server.upstream {
                bridge.sweep(self.sessions.idle());
            }
        }
        if let Some(rate) = &self.client_rate {
            rate.retain_recent();
        }
        let now = self.now();
        for server in self.servers.values() {
            if let Ok(mut limiter) = server.limiter.lock() {
                limiter.sweep(now);
            }
        }
    }
}
