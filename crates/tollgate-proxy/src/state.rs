//! What every request shares: the servers (each with its policy, rate-limit
//! windows and upstream), sessions, approvals, the audit log and metrics.
//!
//! Built once from the configuration (`build`). This module sits below everything that
//! handles requests and imports nothing above it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tollgate_policy::Policy;

use crate::audit::Audit;
use crate::metrics::Metrics;
use crate::store::approvals::Approvals;
use crate::store::limits::CallLimits;
use crate::store::params::ToolParams;
use crate::store::remote::Remote;
use crate::store::sessions::Sessions;
use crate::store::tasks::Tasks;
use crate::upstream::{Upstream, stdio};

mod build;

pub use build::BuildError;

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
