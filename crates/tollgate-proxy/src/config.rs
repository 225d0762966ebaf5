//! The configuration file (`tollgate.yaml`, docs/configuration.md), parsed once into typed values.
//!
//! `${VAR}` references are expanded from the environment over the whole parsed YAML
//! tree before it is deserialised, string by string: every field can use them, and
//! a value can never change the YAML structure around it. Every problem in a file
//! is reported, each with its location or its path in the document.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration that failed to load: every problem found, each one line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// `origin:line:col: message` or `origin: path: message`, one per problem.
    pub problems: Vec<String>,
}

/// The whole configuration file.
pub type Config = ConfigOf<ServerConfig>;

/// The configuration with servers of type `S`: [`RawServer`] as read, [`ServerConfig`] once checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOf<S> {
    /// Where the proxy listens (default 127.0.0.1:8080).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTPS on the proxy listener: its certificate chain and key (PEM files, reloaded
    /// when they change).
    #[serde(default)]
    pub listen_tls: Option<TlsConfig>,
    /// Whether connections from `trusted_proxies` to the proxy listener start with a
    /// PROXY protocol (v1 or v2) header naming the client.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers and proxies whose word on the client's address is taken
    /// (`X-Forwarded-For`, the PROXY protocol): addresses or CIDR blocks.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The admin listener (approvals, metrics, status).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Authenticated clients; when present, every request needs a key.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// Authentication besides `clients:` keys: OAuth 2.1 access tokens.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The audit log.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Limits that protect the proxy itself.
    #[serde(default)]
    pub limits: Limits,
    /// Browser origins allowed besides none.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Host names accepted besides loopback ones when listening on loopback.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Human approvals.
    #[serde(default)]
    pub approvals: Option<ApprovalsConfig>,
    /// On SIGTERM, how long calls in flight may take to finish (default 20s).
    #[serde(default = "default_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Where state shared by several replicas lives (default: in this process).
    #[serde(default)]
    pub state: StateConfig,
    /// `telemetry:`: OpenTelemetry traces and audit logs over OTLP (off without it).
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// How often each upstream is probed for readiness (`/readyz`, `/status`; default 10s).
    #[serde(default = "default_health_interval", deserialize_with = "de_duration")]
    pub health_interval: Duration,
    /// The upstream MCP servers, by name.
    pub servers: BTreeMap<String, S>,
}

/// `admin:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin API listens.
    pub listen: SocketAddr,
    /// HTTPS on the admin listener (as `listen_tls`).
    #[serde(default)]
    pub listen_tls: Option<TlsConfig>,
    /// Whether connections from `trusted_proxies` to the admin listener start with a
    /// PROXY protocol header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Bearer token for the admin API: the operator's key, good for every route.
    #[serde(default)]
    pub token: Option<String>,
    /// People who may list and decide approvals, each with a token of their own; a
    /// decision records the name of the token's owner.
    #[serde(default)]
    pub approvers: Vec<ApproverConfig>,
}

/// `listen_tls:` (and `admin.listen_tls:`): a listener's certificate and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, the server's own certificate first; relative paths
    /// are relative to the configuration file.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `trusted_proxies:`: each an address (`10.0.0.7`, `::1`) or a CIDR block (`10.0.0.0/8`).
fn de_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not an address or a CIDR block, e.g. 10.0.0.7 or 10.0.0.0/8"
                    ))
                })
        })
        .collect()
}

/// One entry of `admin.approvers:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// The name recorded with each decision made with this token.
    pub name: String,
    /// The approver's bearer token.
    pub token: String,
}

/// One entry of `clients:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's name, used by rules' `clients:` and in the audit log.
    pub name: String,
    /// Its key, sent as `Authorization: Bearer <key>`.
    pub key: String,
}

/// `auth:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tollgate as an OAuth 2.1 resource server: every request needs an access token
    /// of this issuer for this resource (or a `clients:` key).
    #[serde(default)]
    pub oauth: Option<OAuthConfig>,
}

/// `auth.oauth:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The authorization server's issuer identifier; its metadata (RFC 8414, else
    /// OpenID Connect discovery) names the JWKS.
    pub issuer: String,
    /// The JWKS, when the issuer's metadata should not be asked for it.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// This server's resource identifier (RFC 8707): tokens must name it in `aud`. The
    /// URL clients connect to, or a parent of it (the origin, when several servers are served).
    pub resource: String,
    /// Scopes announced in the protected resource metadata.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    /// Scopes every request's token must carry (else 403 `insufficient_scope`).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// How far `exp` and `nbf` may be off (default 30s).
    #[serde(default = "default_clock_skew", deserialize_with = "de_duration")]
    pub clock_skew: Duration,
    /// Signature algorithms accepted (default RS256, ES256, PS256, EdDSA and the
    /// larger RS/ES/PS variants); `none` and HMAC are never accepted.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_clock_skew() -> Duration {
    Duration::from_secs(30)
}

/// Asymmetric algorithms only: a resource server holds no shared secret.
pub const ASYMMETRIC_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

fn default_algorithms() -> Vec<String> {
    ASYMMETRIC_ALGORITHMS
        .iter()
        .map(|&a| a.to_owned())
        .collect()
}

/// Whether `url` is absolute `https`, or `http` to a loopback host (for local testing).
pub(crate) fn secure_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    match scheme {
        "https" => true,
        "http" => {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

fn check_oauth(oauth: &OAuthConfig, problems: &mut Vec<String>) {
    for (field, url) in [
        ("issuer", Some(&oauth.issuer)),
        ("resource", Some(&oauth.resource)),
        ("jwks_uri", oauth.jwks_uri.as_ref()),
    ] {
        if let Some(url) = url
            && !secure_url(url)
        {
            problems.push(format!(
                "auth.oauth.{field}: `{url}` must be an absolute https URL (http only to a loopback host)"
            ));
        }
    }
    if oauth.resource.contains(['?', '#']) {
        problems.push(
            "auth.oauth.resource: a resource identifier has no query or fragment (RFC 8707)"
                .to_owned(),
        );
    }
    if oauth.algorithms.is_empty() {
        problems.push("auth.oauth.algorithms: list at least one algorithm, e.g. RS256".to_owned());
    }
    for alg in &oauth.algorithms {
        if !ASYMMETRIC_ALGORITHMS.contains(&alg.as_str()) {
            problems.push(format!(
                "auth.oauth.algorithms: `{alg}` is not accepted: use asymmetric ones ({}); `none` and HMAC never are",
                ASYMMETRIC_ALGORITHMS.join(", ")
            ));
        }
    }
    for scope in oauth.scopes_supported.iter().chain(&oauth.required_scopes) {
        if scope.is_empty() || scope.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
        {
            problems.push(format!(
                "auth.oauth: scope `{scope}` must be one word without quotes"
            ));
        }
    }
}

/// `audit:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file to append JSON lines to, or `-` for stdout.
    pub path: String,
    /// Also log the arguments themselves, not only their digest.
    #[serde(default)]
    pub arguments: bool,
    /// What a call whose decision cannot be written becomes (default `refuse`).
    #[serde(default)]
    pub on_failure: OnAuditFailure,
}

/// `telemetry:` (docs/observability.md). Every value may be left to the standard
/// `OTEL_*` variables, which a value given here overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where OTLP goes.
    #[serde(default)]
    pub otlp: OtlpConfig,
    /// `service.name` (else `OTEL_SERVICE_NAME`, else `tollgate`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Which traces are kept.
    #[serde(default)]
    pub traces: TracesConfig,
    /// Also export every audit record as an OTLP log record.
    #[serde(default)]
    pub audit_logs: bool,
}

/// `telemetry.otlp:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The OTLP/HTTP base URL (`/v1/traces` and `/v1/logs` go under it); else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4318`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Headers sent with every export (added to `OTEL_EXPORTER_OTLP_HEADERS`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// `telemetry.traces:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The share of new traces kept, 0 to 1 (parent-based: a caller's sampled trace
    /// is always kept); else `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else 1.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
}

/// `audit.on_failure`: what happens to a call whose decision record cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAuditFailure {
    /// The call is not forwarded; the client gets an error saying why.
    #[default]
    Refuse,
    /// The call goes on unrecorded (counted and logged).
    Continue,
}

/// `approvals:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// POSTed for every new pending approval.
    #[serde(default)]
    pub webhook: Option<String>,
    /// How long a held call's request waits before the client is told to retry, for
    /// rules without `approval.wait` (default 45 s, under common client timeouts).
    #[serde(default, deserialize_with = "de_optional_duration")]
    pub wait: Option<Duration>,
    /// The secret that protects the `requestState` of stateless-era clients (at
    /// least 32 characters; replicas that share approvals share it). Without it a
    /// random key is made at start.
    #[serde(default)]
    pub state_key: Option<String>,
    /// The most bytes of arguments one client's calls waiting for approval may hold
    /// together (default 8 MiB, an eighth of the 64 MiB all clients share).
    #[serde(default, deserialize_with = "de_optional_size")]
    pub bytes_per_client: Option<usize>,
}

/// Default of `approvals.wait`.
pub const DEFAULT_APPROVAL_WAIT: Duration = Duration::from_secs(45);
/// `state:`: where rate-limit windows and handshake-era sessions live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `memory` (this process only, the default) or `redis` (shared by replicas).
    #[serde(default)]
    pub backend: StateBackend,
    /// The Redis server, `redis://[user:password@]host[:port][/db]` (or `rediss://`).
    #[serde(default)]
    pub url: Option<String>,
    /// Put before every key, so that several deployments can share one Redis.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    /// What a call that needs shared state becomes while Redis cannot be reached.
    #[serde(default)]
    pub on_failure: OnStateFailure,
    /// The longest wait for one Redis command (default 1s).
    #[serde(default = "default_state_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// This replica's name, given in errors about sessions that belong to another
    /// replica (default: `$HOSTNAME`, a pod's name in Kubernetes).
    #[serde(default)]
    pub replica: Option<String>,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::default(),
            url: None,
            prefix: default_state_prefix(),
            on_failure: OnStateFailure::default(),
            timeout: default_state_timeout(),
            replica: None,
        }
    }
}

/// `state.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    /// In this process: nothing to run, nothing shared.
    #[default]
    Memory,
    /// In Redis, shared by every replica using the same `url` and `prefix`.
    Redis,
}

/// `state.on_failure`: a call that needs shared state while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStateFailure {
    /// Refused with an error saying why: never let through unlimited.
    #[default]
    Refuse,
    /// Let through without its rate limit (counted and logged).
    Allow,
}

fn default_state_prefix() -> String {
    "tollgate:".to_owned()
}
fn default_state_timeout() -> Duration {
    Duration::from_secs(1)
}

/// `limits:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (default 4 MiB).
    #[serde(default = "default_max_body", deserialize_with = "de_size")]
    pub max_body: usize,
    /// Requests per second per client (token bucket); 0 turns it off.
    #[serde(default = "default_rps")]
    pub requests_per_second: u32,
    /// How many requests a client may send at once before the per-second rate
    /// applies: the bucket's size (default 4 × `requests_per_second`). Generous by
    /// default, so that a client's start-up burst or a test suite at full speed passes.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Most concurrent handshake-era sessions.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// A session unused this long is forgotten (default 1h).
    #[serde(default = "default_session_idle", deserialize_with = "de_duration")]
    pub session_idle: Duration,
    /// Sessions, and legacy SSE streams, one client may hold at once: a `clients:`
    /// name, else a peer address (an IPv6 peer by its /64) (default 1000).
    #[serde(default = "default_sessions_per_client")]
    pub sessions_per_client: usize,
    /// GET streams open at once on one session (default 1).
    #[serde(default = "default_streams_per_session")]
    pub streams_per_session: usize,
    /// Connections open at once on a listener (default 1024, or three quarters of
    /// the open-file limit when that is lower).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Connections open at once from one peer address, an IPv6 peer by its /64 (default 256).
    #[serde(default = "default_connections_per_peer")]
    pub connections_per_peer: usize,
    /// How long a client may take to send a request's headers, and how long an
    /// idle keep-alive connection is kept (default 10s).
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body (default 30s).
    #[serde(
        default = "default_body_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub body_read_timeout: Duration,
}

impl Limits {
    /// The per-client bucket's size: `burst`, else 4 × `requests_per_second`.
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.requests_per_second.saturating_mul(4))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: default_max_body(),
            requests_per_second: default_rps(),
            burst: None,
            max_sessions: default_max_sessions(),
            session_idle: default_session_idle(),
            sessions_per_client: default_sessions_per_client(),
            streams_per_session: default_streams_per_session(),
            max_connections: None,
            connections_per_peer: default_connections_per_peer(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

/// How to reach an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Streamable HTTP (both eras).
    #[default]
    Http,
    /// The 2024-11-05 HTTP+SSE transport.
    Sse,
    /// A spawned program speaking newline-delimited JSON-RPC.
    Stdio,
}

/// One entry of `servers:`, checked: how its upstream is reached is one value.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How the upstream is reached.
    pub upstream: UpstreamConfig,
    /// Headers sent upstream (HTTP and legacy SSE upstreams).
    pub headers: BTreeMap<String, String>,
    /// The policy file, relative to the configuration file.
    pub policy: PathBuf,
    /// Per upstream request.
    pub timeout: Duration,
    /// The tool lock (SPEC §10), relative to the configuration file.
    pub tools_lock: Option<PathBuf>,
    /// What a tool that differs from the lock meets.
    pub on_tool_change: OnToolChange,
}

/// `servers.<n>.on_tool_change`: what a tool whose definition differs from the lock
/// (or that the lock does not name) meets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnToolChange {
    /// Hidden from `tools/list`, its calls refused (the default).
    #[default]
    Refuse,
    /// Recorded, counted and logged; its calls go on.
    Warn,
}

/// Where and how an upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamConfig {
    /// Streamable HTTP at this URL.
    Http {
        /// The MCP endpoint.
        url: String,
    },
    /// The 2024-11-05 HTTP+SSE transport at this URL.
    Sse {
        /// The SSE endpoint.
        url: String,
    },
    /// A program Tollgate starts, speaking newline-delimited JSON-RPC.
    Stdio {
        /// Program and arguments.
        command: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
        /// Variables of Tollgate's own environment it also inherits.
        inherit_env: Vec<String>,
        /// Working directory.
        cwd: Option<PathBuf>,
        /// Most processes running at once (one per handshake-era session, one shared).
        max_processes: usize,
        /// A session's process unused this long is ended (its session re-initializes).
        idle: Duration,
    },
}

impl UpstreamConfig {
    /// The URL of a network upstream.
    pub fn url(&self) -> Option<&str> {
        match self {
            UpstreamConfig::Http { url } | UpstreamConfig::Sse { url } => Some(url),
            UpstreamConfig::Stdio { .. } => None,
        }
    }
}

/// One entry of `servers:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// The upstream's MCP endpoint.
    #[serde(default)]
    pub url: Option<String>,
    /// Transport, inferred from `url`/`command` when absent.
    #[serde(default)]
    pub transport: Option<Transport>,
    /// A stdio upstream's command line.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment of a stdio upstream, on top of the few variables it inherits
    /// (`upstream::stdio::INHERITED_ENV`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables of Tollgate's own environment a stdio upstream also inherits.
    #[serde(default)]
    pub inherit_env: Vec<String>,
    /// Working directory of a stdio upstream.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Most processes of a stdio upstream running at once (default 16).
    #[serde(default)]
    pub max_processes: Option<usize>,
    /// A stdio session's process unused this long is ended (default 10m).
    #[serde(default, deserialize_with = "de_optional_duration")]
    pub idle: Option<Duration>,
    /// Headers sent upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The policy file, relative to the configuration file.
    pub policy: PathBuf,
    /// Per upstream request (default 30s).
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// The tool lock written by `tollgate lock`, relative to the configuration file.
    #[serde(default)]
    pub tools_lock: Option<PathBuf>,
    /// `refuse` (default) or `warn`.
    #[serde(default)]
    pub on_tool_change: OnToolChange,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_rps() -> u32 {
    200
}
fn default_max_sessions() -> usize {
    10_000
}
fn default_session_idle() -> Duration {
    Duration::from_secs(3600)
}
fn default_sessions_per_client() -> usize {
    1000
}
fn default_streams_per_session() -> usize {
    1
}
fn default_connections_per_peer() -> usize {
    256
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
/// `servers.<n>.max_processes` of a stdio upstream.
pub const DEFAULT_MAX_PROCESSES: usize = 16;
/// `servers.<n>.idle` of a stdio upstream.
pub const DEFAULT_PROCESS_IDLE: Duration = Duration::from_secs(600);

enum NumberOrText {
    Number(u64),
    Text(String),
}

/// `30`, `30s`, `500ms`, `1m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// `4096`, `512KiB`, `4MiB`, `1GiB` (also `KB`/`MB`/`GB`, as powers of 1000).
pub fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: usize = digits.parse().ok()?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor).filter(|&n| n > 0)
}

/// A number or a text, read without buffering so that an error keeps its key's location.
struct NumberOrTextVisitor(&'static str);

impl serde::de::Visitor<'_> for NumberOrTextVisitor {
    type Value = NumberOrText;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<NumberOrText, E> {
        Ok(NumberOrText::Number(n))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<NumberOrText, E> {
        u64::try_from(n)
            .map(NumberOrText::Number)
            .map_err(|_| E::custom(format!("{} must be more than 0", self.0)))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<NumberOrText, E> {
        Ok(NumberOrText::Text(text.to_owned()))
    }
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match d.deserialize_any(NumberOrTextVisitor("a duration"))? {
        NumberOrText::Number(n) if n > 0 => Ok(Duration::from_secs(n)),
        NumberOrText::Number(_) => Err(serde::de::Error::custom("a duration must be more than 0")),
        NumberOrText::Text(t) => parse_duration(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration `{t}`, expected seconds or a number with ms, s, m or h (e.g. 30s)"
            ))
        }),
    }
}

fn de_optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_optional_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    de_size(d).map(Some)
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match d.deserialize_any(NumberOrTextVisitor("a size"))? {
        NumberOrText::Number(n) if n > 0 => usize::try_from(n).map_err(serde::de::Error::custom),
        NumberOrText::Number(_) => Err(serde::de::Error::custom("a size must be more than 0")),
        NumberOrText::Text(t) => parse_size(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size `{t}`, expected bytes or e.g. 512KiB, 4MiB"
            ))
        }),
    }
}

/// Expands `${VAR}` (and `$${` for a literal `${`) from `lookup`.
pub fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable reference"
                ));
            }
            let value = lookup(name).ok_or_else(|| {
                format!("environment variable `{name}` is not set; set it or remove the reference")
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands `${VAR}` in every string scalar of `tree`; problems are reported with
/// their path (`servers.a.url`).
fn expand_tree(
    tree: &mut serde_yaml::Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match tree {
        serde_yaml::Value::String(text) => match expand_env(text, lookup) {
            Ok(expanded) => *text = expanded,
            Err(err) => problems.push(format!("{path}: {err}")),
        },
        serde_yaml::Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_tree(item, &format!("{path}[{i}]"), lookup, problems);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (key, value) in map.iter_mut() {
                let key = match key {
                    serde_yaml::Value::String(k) => k.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                expand_tree(value, &join(&key), lookup, problems);
            }
        }
        serde_yaml::Value::Tagged(tagged) => expand_tree(&mut tagged.value, path, lookup, problems),
        _ => {}
    }
}

impl Config {
    /// Parses, expands `${VAR}` with `lookup`, and validates. Pure: the caller reads files.
    pub fn from_yaml(
        source: &str,
        origin: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let located = |errors: tollgate_policy::PolicyErrors| ConfigError {
            problems: errors.to_string().lines().map(str::to_owned).collect(),
        };
        let mut tree: serde_yaml::Value =
            tollgate_policy::from_yaml_str(source, origin).map_err(located)?;
        let mut problems = Vec::new();
        expand_tree(&mut tree, "", lookup, &mut problems);
        // A mistake in the text as written has a line and column; one that only the
        // expanded values have is named by its path.
        let as_written = || {
            tollgate_policy::from_yaml_str::<ConfigOf<RawServer>>(source, origin)
                .err()
                .map(|errors| located(errors).problems)
                .unwrap_or_default()
                .into_iter()
                .filter(|problem| !problem.contains("${"))
        };
        if !problems.is_empty() {
            let mut all: Vec<String> = as_written().collect();
            all.extend(problems.iter().map(|p| format!("{origin}: {p}")));
            return Err(ConfigError { problems: all });
        }
        let raw: ConfigOf<RawServer> = match serde_path_to_error::deserialize(tree) {
            Ok(raw) => raw,
            Err(err) => {
                let by_path = format!("{origin}: {}: {}", err.path(), err.inner());
                let mut all: Vec<String> = as_written().collect();
                // The text's error names the enclosing mapping when a value inside it
                // is wrong (`limits: invalid duration`); the path names the key itself.
                let path = err.path().to_string();
                let message = err.inner().to_string();
                // Unknown and missing fields are located exactly; values are not.
                let about_a_value =
                    !message.starts_with("unknown field") && !message.starts_with("missing field");
                let vaguer = |problem: &String| {
                    about_a_value
                        && problem.ends_with(&message)
                        && problem
                            .rsplit_once(": ")
                            .and_then(|(head, _)| head.rsplit(": ").next())
                            .is_some_and(|at| path.starts_with(&format!("{at}.")))
                };
                match all.iter().position(vaguer) {
                    Some(i) => all[i] = by_path,
                    None if all.is_empty() => all.push(by_path),
                    None => {}
                }
                return Err(ConfigError { problems: all });
            }
        };

        raw.check().map_err(|problems| ConfigError {
            problems: problems.iter().map(|p| format!("{origin}: {p}")).collect(),
        })
    }

    /// Policy file of `server`, resolved against the configuration file's directory.
    pub fn policy_path(&self, config_dir: &Path, server: &ServerConfig) -> PathBuf {
        config_dir.join(&server.policy)
    }

    /// Makes the other relative paths of the file (`audit.path`, `servers.<n>.cwd`)
    /// relative to `config_dir`, the configuration file's directory, as `policy:` is
    /// (and `servers.<n>.tools_lock`):
    /// the directory Tollgate is started from (`/`, for a desktop client) never matters.
    pub fn resolve_paths(&mut self, config_dir: &Path) {
        let tls = self.listen_tls.iter_mut();
        for tls in tls.chain(self.admin.iter_mut().flat_map(|a| a.listen_tls.as_mut())) {
            for path in [&mut tls.cert, &mut tls.key] {
                if path.is_relative() {
                    *path = config_dir.join(&*path);
                }
            }
        }
        if let Some(audit) = &mut self.audit
            && audit.path != "-"
            && Path::new(&audit.path).is_relative()
        {
            audit.path = config_dir.join(&audit.path).to_string_lossy().into_owned();
        }
        for server in self.servers.values_mut() {
            if let Some(lock) = &mut server.tools_lock
                && lock.is_relative()
            {
                *lock = config_dir.join(&*lock);
            }
            if let UpstreamConfig::Stdio { cwd: Some(cwd), .. } = &mut server.upstream
                && cwd.is_relative()
            {
                *cwd = config_dir.join(&*cwd);
            }
        }
    }
}

impl ConfigOf<RawServer> {
    /// Semantic checks that serde cannot express; every problem is reported.
    fn check(self) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        if let Some(admin) = &self.admin {
            problems.extend(admin_problem(admin.listen, admin.token.as_deref()));
            check_approvers(admin, &mut problems);
        }
        let admin_pp = self.admin.as_ref().is_some_and(|a| a.proxy_protocol);
        if (self.proxy_protocol || admin_pp) && self.trusted_proxies.is_empty() {
            problems.push(
                "proxy_protocol: a PROXY protocol header is read only from trusted_proxies; list the load balancers' addresses there (e.g. trusted_proxies: [10.0.0.0/8])"
                    .to_owned(),
            );
        }
        if let Some(approvals) = &self.approvals {
            check_approvals(approvals, &mut problems);
        }
        if self.servers.is_empty() {
            problems.push("servers: at least one server is needed".to_owned());
        }
        if self.health_interval.is_zero() {
            problems.push("health_interval: must be more than 0 seconds".to_owned());
        }
        check_state(&self.state, &mut problems);
        if let Some(telemetry) = &self.telemetry {
            check_telemetry(telemetry, &mut problems);
        }
        if let Some(oauth) = &self.auth.oauth {
            check_oauth(oauth, &mut problems);
        }
        check_clients(&self.clients, &mut problems);
        let mut servers = BTreeMap::new();
        for (name, raw) in self.servers {
            if let Some(server) = raw.check(&name, &mut problems) {
                servers.insert(name, server);
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ConfigOf {
            listen: self.listen,
            listen_tls: self.listen_tls,
            proxy_protocol: self.proxy_protocol,
            trusted_proxies: self.trusted_proxies,
            admin: self.admin,
            clients: self.clients,
            auth: self.auth,
            audit: self.audit,
            limits: self.limits,
            allowed_origins: self.allowed_origins,
            allowed_hosts: self.allowed_hosts,
            approvals: self.approvals,
            shutdown_grace: self.shutdown_grace,
            state: self.state,
            telemetry: self.telemetry,
            health_interval: self.health_interval,
            servers,
        })
    }
}

/// `telemetry:`: a sample ratio between 0 and 1.
fn check_telemetry(telemetry: &TelemetryConfig, problems: &mut Vec<String>) {
    if let Some(ratio) = telemetry
        .traces
        .sample_ratio
        .filter(|r| !(0.0..=1.0).contains(r))
    {
        problems.push(format!(
            "telemetry.traces.sample_ratio: {ratio} is not between 0 and 1"
        ));
    }
}

/// `approvals:`: a state key long and not a placeholder, a wait above zero.
fn check_approvals(approvals: &ApprovalsConfig, problems: &mut Vec<String>) {
    if approvals.state_key.as_ref().is_some_and(|k| k.len() < 32) {
        problems.push(
            "approvals.state_key: shorter than 32 characters; use a long random secret (e.g. `openssl rand -hex 32`)"
                .to_owned(),
        );
    }
    if approvals.state_key.as_deref().is_some_and(placeholder) {
        problems.push(placeholder_problem("approvals.state_key"));
    }
    if approvals.wait.is_some_and(|w| w.is_zero()) {
        problems.push("approvals.wait: must be more than 0 seconds".to_owned());
    }
}

/// `clients:`: each named once, with a key of at least 16 characters that is not a
/// placeholder.
fn check_clients(clients: &[ClientConfig], problems: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    for client in clients {
        if !seen.insert(client.name.as_str()) {
            problems.push(format!("clients: `{}` appears twice", client.name));
        }
        if client.key.len() < 16 {
            problems.push(format!(
                "clients: the key of `{}` is shorter than 16 characters",
                client.name
            ));
        }
        if placeholder(&client.key) {
            problems.push(placeholder_problem(&format!(
                "clients: the key of `{}`",
                client.name
            )));
        }
    }
}

/// `state:`: a Redis backend needs a Redis URL; a memory one needs nothing else.
fn check_state(state: &StateConfig, problems: &mut Vec<String>) {
    match (state.backend, &state.url) {
        (StateBackend::Redis, None) => problems.push(
            "state.url: `backend: redis` needs the Redis server's URL, e.g. redis://127.0.0.1:6379"
                .to_owned(),
        ),
        (StateBackend::Redis, Some(url)) => {
            let scheme = reqwest::Url::parse(url).map(|u| u.scheme().to_owned());
            if !matches!(scheme.as_deref(), Ok("redis" | "rediss")) {
                problems.push(format!(
                    "state.url: `{}` is not a redis:// or rediss:// URL",
                    redacted_url(url)
                ));
            }
        }
        (StateBackend::Memory, Some(_)) => problems.push(
            "state.url: only used with `backend: redis`; set the backend or remove the url"
                .to_owned(),
        ),
        (StateBackend::Memory, None) => {}
    }
    if state.prefix.is_empty() || state.prefix.chars().any(char::is_whitespace) {
        problems.push(
            "state.prefix: must be a non-empty key prefix without spaces, e.g. `tollgate:`"
                .to_owned(),
        );
    }
    if let Some(replica) = &state.replica
        && (replica.is_empty() || replica.chars().any(char::is_control))
    {
        problems.push("state.replica: must be a non-empty name".to_owned());
    }
}

/// A URL as it may be shown: any password replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => url.split('@').next_back().unwrap_or_default().to_owned(),
    }
}

/// Why an admin API on `listen` with `token` must not start, if it must not: an empty
/// token (say, `${TOLLGATE_ADMIN_TOKEN}` set to "") would read as "no token" and open
/// the API; a non-loopback address needs a token; a placeholder is no secret. The one
/// check for `tollgate validate` (on the file) and `serve` (on the bound address).
pub fn admin_problem(listen: SocketAddr, token: Option<&str>) -> Option<String> {
    match token {
        Some(token) if token.trim().is_empty() => Some(
            "admin.token is empty (is TOLLGATE_ADMIN_TOKEN set to \"\"?): set a token, or remove admin.token for a loopback admin API without one"
                .to_owned(),
        ),
        Some(token) if placeholder(token) => Some(placeholder_problem("admin.token")),
        None if !listen.ip().is_loopback() => Some(format!(
            "admin.listen {listen} is not a loopback address, so admin.token is required"
        )),
        _ => None,
    }
}

/// Whether a secret is still the example's placeholder (`replace-me-with-…`).
fn placeholder(secret: &str) -> bool {
    let lower = secret.to_ascii_lowercase();
    [
        "replace-me",
        "replace_me",
        "replaceme",
        "change-me",
        "change_me",
        "changeme",
    ]
    .iter()
    .any(|word| lower.contains(word))
}

fn placeholder_problem(what: &str) -> String {
    format!(
        "{what} is still a placeholder (`replace-me`/`change-me`): set a long random secret, e.g. `openssl rand -hex 32`"
    )
}

/// Approvers need names and tokens of their own that nobody else holds.
fn check_approvers(admin: &AdminConfig, problems: &mut Vec<String>) {
    let mut names = std::collections::HashSet::new();
    let mut tokens: std::collections::HashSet<&str> =
        admin.token.iter().map(String::as_str).collect();
    for (i, approver) in admin.approvers.iter().enumerate() {
        if approver.name.trim().is_empty() {
            problems.push(format!("admin.approvers[{i}].name: must not be empty"));
        }
        if !names.insert(approver.name.as_str()) {
            problems.push(format!(
                "admin.approvers[{i}].name: `{}` appears twice",
                approver.name
            ));
        }
        if approver.token.len() < 16 {
            problems.push(format!(
                "admin.approvers[{i}].token: the token of `{}` is shorter than 16 characters",
                approver.name
            ));
        }
        if placeholder(&approver.token) {
            problems.push(placeholder_problem(&format!("admin.approvers[{i}].token")));
        }
        if !tokens.insert(approver.token.as_str()) {
            problems.push(format!(
                "admin.approvers[{i}].token: the token of `{}` is also another approver's or admin.token; give each its own",
                approver.name
            ));
        }
    }
}

impl RawServer {
    /// The checked server, or `None` with its problems added to `problems`.
    fn check(mut self, name: &str, problems: &mut Vec<String>) -> Option<ServerConfig> {
        let before = problems.len();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "servers.{name}: a server name may use only letters, digits, `-` and `_` (it is part of the URL path)"
            ));
        }
        for header in self.headers.keys() {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                problems.push(format!(
                    "servers.{name}.headers: `{header}` is not a valid header name"
                ));
            }
        }
        let transport = self.transport.unwrap_or(if self.command.is_some() {
            Transport::Stdio
        } else {
            Transport::Http
        });
        if transport != Transport::Stdio || self.command.is_none() {
            for (key, set) in [
                ("max_processes", self.max_processes.is_some()),
                ("idle", self.idle.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "servers.{name}.{key}: applies only to stdio upstreams (`command`)"
                    ));
                }
            }
        }
        if self.max_processes == Some(0) {
            problems.push(format!("servers.{name}.max_processes: must be at least 1"));
        }
        let upstream = self.upstream(name, transport, problems);
        if problems.len() > before {
            return None;
        }
        Some(ServerConfig {
            upstream: upstream?,
            headers: self.headers,
            policy: self.policy,
            timeout: self.timeout,
            tools_lock: self.tools_lock,
            on_tool_change: self.on_tool_change,
        })
    }

    /// Its upstream, as `url`, `command` and `transport` say; `None` with the
    /// problem added when they disagree.
    fn upstream(
        &mut self,
        name: &str,
        transport: Transport,
        problems: &mut Vec<String>,
    ) -> Option<UpstreamConfig> {
        match (self.url.take(), self.command.take(), transport) {
            (Some(_), Some(_), _) => {
                problems.push(format!(
                    "servers.{name}: set either `url` or `command`, not both"
                ));
                None
            }
            (None, None, _) => {
                problems.push(format!(
                    "servers.{name}: needs `url` (an HTTP upstream) or `command` (a stdio upstream)"
                ));
                None
            }
            (Some(url), None, Transport::Stdio) => {
                problems.push(format!(
                    "servers.{name}.transport: `stdio` needs `command`, not `url` ({url})"
                ));
                None
            }
            (Some(url), None, transport) => {
                if reqwest::Url::parse(&url)
                    .map(|u| !matches!(u.scheme(), "http" | "https"))
                    .unwrap_or(true)
                {
                    problems.push(format!("servers.{name}.url: `{url}` is not an http(s) URL"));
                }
                Some(if transport == Transport::Sse {
                    UpstreamConfig::Sse { url }
                } else {
                    UpstreamConfig::Http { url }
                })
            }
            (None, Some(command), Transport::Stdio) if command.is_empty() => {
                problems.push(format!(
                    "servers.{name}.command: needs at least the program to run"
                ));
                None
            }
            (None, Some(command), Transport::Stdio) => Some(UpstreamConfig::Stdio {
                command,
                env: std::mem::take(&mut self.env),
                inherit_env: std::mem::take(&mut self.inherit_env),
                cwd: self.cwd.take(),
                max_processes: self.max_processes.unwrap_or(DEFAULT_MAX_PROCESSES),
                idle: self.idle.unwrap_or(DEFAULT_PROCESS_IDLE),
            }),
            (None, Some(_), other) => {
                problems.push(format!(
                    "servers.{name}.transport: `{}` needs `url`, not `command`",
                    if other == Transport::Sse {
                        "sse"
                    } else {
                        "http"
                    }
                ));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr3t".into()),
            "KEY" => Some("0123456789abcdef-key".into()),
            _ => None,
        }
    }

    #[test]
    fn parses_the_spec_example() {
        let src = r#"
listen: 127.0.0.1:8080
admin:
  listen: 127.0.0.1:9090
  token: ${TOKEN}
clients:
  - name: ci-agent
    key: ${KEY}
audit:
  path: audit.jsonl
limits:
  max_body: 4MiB
  requests_per_second: 50
  max_sessions: 10000
allowed_origins: []
allowed_hosts: []
servers:
  healthlake:
    url: http://127.0.0.1:8000/mcp
    headers:
      Authorization: Bearer ${TOKEN}
    policy: policies/healthlake.yaml
    timeout: 30s
"#;
        let config = Config::from_yaml(src, "tollgate.yaml", &env).unwrap();
        assert_eq!(config.admin.unwrap().token.as_deref(), Some("s3cr3t"));
        assert_eq!(config.clients[0].key, "0123456789abcdef-key");
        let server = &config.servers["healthlake"];
        assert_eq!(server.headers["Authorization"], "Bearer s3cr3t");
        assert_eq!(server.timeout, Duration::from_secs(30));
        assert_eq!(config.limits.max_body, 4 << 20);
    }

    #[test]
    fn state_is_in_memory_by_default_and_redis_needs_a_url() {
        let server = "servers:\n  a:\n    url: http://127.0.0.1:1/mcp\n    policy: p.yaml\n";
        let config = Config::from_yaml(server, "t.yaml", &env).unwrap();
        assert_eq!(config.state.backend, StateBackend::Memory);
        assert_eq!(config.state.prefix, "tollgate:");
        assert_eq!(config.state.on_failure, OnStateFailure::Refuse);
        let with = |state: &str| Config::from_yaml(&format!("{state}{server}"), "t.yaml", &env);
        let redis = with("state:\n  backend: redis\n  url: redis://:${TOKEN}@127.0.0.1:6379/0\n  prefix: 'tg:'\n  on_failure: allow\n  replica: a\n  timeout: 250ms\n").unwrap();
        assert_eq!(redis.state.backend, StateBackend::Redis);
        assert_eq!(redis.state.on_failure, OnStateFailure::Allow);
        assert_eq!(redis.state.timeout, Duration::from_millis(250));
        assert_eq!(redis.state.prefix, "tg:");
        let err = with("state:\n  backend: redis\n").unwrap_err().to_string();
        assert!(err.contains("state.url: `backend: redis` needs"), "{err}");
        let err = with("state:\n  backend: redis\n  url: http://u:secret@127.0.0.1/\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a redis:// or rediss:// URL"), "{err}");
        assert!(!err.contains("secret"), "a password was shown: {err}");
        let err = with("state:\n  url: redis://127.0.0.1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only used with `backend: redis`"), "{err}");
        let err = with("state:\n  backend: redis\n  url: redis://127.0.0.1\n  prefix: ''\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("state.prefix"), "{err}");
        let err = with("state:\n  backend: etcd\n").unwrap_err().to_string();
        assert!(err.contains("etcd"), "{err}");
        let err = with("state:\n  on_failure: maybe\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe"), "{err}");
    }

    #[test]
    fn telemetry_is_off_by_default_and_takes_the_spec_example() {
        let server = "servers:\n  a:\n    url: http://127.0.0.1:1/mcp\n    policy: p.yaml\n";
        assert!(
            Config::from_yaml(server, "t.yaml", &env)
                .unwrap()
                .telemetry
                .is_none()
        );
        let with = |t: &str| Config::from_yaml(&format!("{t}{server}"), "t.yaml", &env);
        let config = with("telemetry:\n  otlp:\n    endpoint: http://127.0.0.1:4318\n    headers:\n      authorization: Bearer ${TOKEN}\n  service_name: gw\n  traces: {sample_ratio: 0.25}\n  audit_logs: true\n").unwrap();
        let telemetry = config.telemetry.unwrap();
        assert_eq!(
            telemetry.otlp.endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(
            telemetry.otlp.headers["authorization"],
            format!("Bearer {}", env("TOKEN").unwrap())
        );
        assert_eq!(telemetry.service_name.as_deref(), Some("gw"));
        assert_eq!(telemetry.traces.sample_ratio, Some(0.25));
        assert!(telemetry.audit_logs);
        let err = with("telemetry: {traces: {sample_ratio: 2}}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("telemetry.traces.sample_ratio: 2 is not between 0 and 1"),
            "{err}"
        );
    }

    #[test]
    fn a_redis_url_is_shown_without_its_password() {
        assert_eq!(
            redacted_url("redis://user:hunter2@10.0.0.1:6379/0"),
            "redis://user:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert!(!redacted_url("not a url:hunter2@host").contains("hunter2"));
    }

    #[test]
    fn reports_every_unset_variable_with_its_path() {
        let src = "servers:\n  a:\n    url: ${NOPE}\n    policy: p.yaml\n    headers: {X: '${ALSO_NOT}'}\n";
        let err = Config::from_yaml(src, "t.yaml", &env).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].contains("servers.a.url: environment variable `NOPE` is not set"));
        assert!(err.problems[1].contains("servers.a.headers.X"));
    }

    #[test]
    fn approvals_wait_and_state_key_are_read_and_checked() {
        let server = "servers:\n  a:\n    url: http://x/mcp\n    policy: p.yaml\n";
        let src = format!(
            "approvals: {{wait: 20s, state_key: '{}'}}\n{server}",
            "k".repeat(32)
        );
        let config = Config::from_yaml(&src, "t.yaml", &env).unwrap();
        let approvals = config.approvals.unwrap();
        assert_eq!(approvals.wait, Some(Duration::from_secs(20)));
        assert_eq!(approvals.state_key.map(|k| k.len()), Some(32));
        let src = format!("approvals: {{state_key: short}}\n{server}");
        let err = Config::from_yaml(&src, "t.yaml", &env).unwrap_err();
        assert!(
            err.to_string()
                .contains("approvals.state_key: shorter than 32"),
            "{err}"
        );
        let src = format!("approvals: {{wait: 0}}\n{server}");
        let err = Config::from_yaml(&src, "t.yaml", &env).unwrap_err();
        assert!(err.to_string().contains("approvals.wait"), "{err}");
    }

    #[test]
    fn oauth_needs_secure_urls_and_asymmetric_algorithms() {
        let server = "servers:\n  a:\n    url: http://x/mcp\n    policy: p.yaml\n";
        let good = format!(
            "auth:\n  oauth:\n    issuer: https://idp.example/realms/a\n    resource: http://127.0.0.1:8080\n    required_scopes: [mcp]\n{server}"
        );
        let config = Config::from_yaml(&good, "t.yaml", &env).unwrap();
        let oauth = config.auth.oauth.unwrap();
        assert_eq!(oauth.clock_skew, Duration::from_secs(30));
        assert!(oauth.algorithms.iter().any(|a| a == "RS256"));
        let bad = format!(
            "auth:\n  oauth:\n    issuer: http://idp.example\n    resource: https://t.example/mcp?x=1\n    jwks_uri: ftp://k\n    algorithms: [RS256, HS256, none]\n    scopes_supported: [\"two words\"]\n{server}"
        );
        let err = Config::from_yaml(&bad, "t.yaml", &env).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        assert!(
            text.contains("auth.oauth.issuer: `http://idp.example` must be an absolute https URL"),
            "{text}"
        );
        assert!(text.contains("auth.oauth.jwks_uri"), "{text}");
        assert!(text.contains("no query or fragment"), "{text}");
        assert!(
            text.contains("`HS256` is not accepted") && text.contains("`none` is not accepted"),
            "{text}"
        );
        assert!(text.contains("scope `two words`"), "{text}");
    }

    #[test]
    fn reports_unknown_fields_with_a_location() {
        let src = "servers:\n  a:\n    url: http://x/mcp\n    polcy: p.yaml\n";
        let err = Config::from_yaml(src, "t.yaml", &env).unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:4:"), "{err}");
        assert!(err.to_string().contains("polcy"), "{err}");
    }

    #[test]
    fn refuses_servers_without_an_upstream() {
        let err =
            Config::from_yaml("servers:\n  a:\n    policy: p.yaml\n", "t.yaml", &env).unwrap_err();
        assert!(err.to_string().contains("needs `url`"), "{err}");
        let err = Config::from_yaml("servers: {}\n", "t.yaml", &env).unwrap_err();
        assert!(err.to_string().contains("at least one server"), "{err}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_configuration_file() {
        let src = "audit: {path: logs/audit.jsonl}\nservers:\n  a:\n    command: [x]\n    cwd: work\n    policy: p.yaml\n  b:\n    command: [y]\n    cwd: /abs\n    policy: p.yaml\n";
        let mut config = Config::from_yaml(src, "t.yaml", &env).unwrap();
        config.resolve_paths(Path::new("/etc/tollgate"));
        assert_eq!(config.audit.unwrap().path, "/etc/tollgate/logs/audit.jsonl");
        let cwd = |name: &str| match &config.servers[name].upstream {
            UpstreamConfig::Stdio { cwd, .. } => cwd.clone().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(cwd("a"), Path::new("/etc/tollgate/work"));
        assert_eq!(cwd("b"), Path::new("/abs"));
        let mut stdout = Config::from_yaml(
            "audit: {path: '-'}\nservers:\n  a:\n    url: http://x/mcp\n    policy: p.yaml\n",
            "t.yaml",
            &env,
        )
        .unwrap();
        stdout.resolve_paths(Path::new("/etc/tollgate"));
        assert_eq!(stdout.audit.unwrap().path, "-");
    }

    #[test]
    fn process_limits_belong_to_stdio_upstreams() {
        let src = "servers:\n  a:\n    command: [x]\n    max_processes: 3\n    idle: 90s\n    policy: p.yaml\n  b:\n    command: [y]\n    policy: p.yaml\n";
        let config = Config::from_yaml(src, "t.yaml", &env).unwrap();
        let limits = |name: &str| match &config.servers[name].upstream {
            UpstreamConfig::Stdio {
                max_processes,
                idle,
                ..
            } => (*max_processes, *idle),
            other => panic!("{other:?}"),
        };
        assert_eq!(limits("a"), (3, Duration::from_secs(90)));
        assert_eq!(limits("b"), (DEFAULT_MAX_PROCESSES, DEFAULT_PROCESS_IDLE));
        let src = "servers:\n  a:\n    url: http://x/mcp\n    max_processes: 3\n    policy: p.yaml\n  b:\n    command: [y]\n    max_processes: 0\n    policy: p.yaml\n";
        let err = Config::from_yaml(src, "t.yaml", &env).unwrap_err();
        assert!(
            err.to_string()
                .contains("servers.a.max_processes: applies only to stdio upstreams"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("servers.b.max_processes: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn expands_variables_and_escapes() {
        assert_eq!(
            expand_env("a${TOKEN}b$${X}$", &env).unwrap(),
            "as3cr3tb${X}$"
        );
        assert!(expand_env("${", &env).is_err());
        assert!(expand_env("${A B}", &env).is_err());
    }

    #[test]
    fn parses_durations_and_sizes() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("1KiB"), Some(1024));
        assert_eq!(parse_size("lots"), None);
    }
}
