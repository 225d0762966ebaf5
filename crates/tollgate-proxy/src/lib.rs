//! Tollgate's proxy: the server in front of upstream MCP servers.
//!
//! Three front doors (Streamable HTTP, legacy HTTP+SSE, stdio) authenticate and
//! decode each message once and hand it to one core (`pipeline`), whose stages run
//! in order: inbound → session → decide → held → call → relay (and batch). The
//! core reaches upstreams only through the `Upstream` interface (Streamable HTTP,
//! or a bridge to stdio and legacy SSE servers), and keeps what outlives a request
//! in narrow stores. The policy is read from an atomically swapped snapshot on
//! every request, so a reload applies to the next call and never to one in
//! flight. docs/architecture.md draws the modules and their one-way imports.

mod admin;
mod app;
mod approvals;
mod audit;
mod config;
mod downstream;
mod error;
pub mod lock;
mod metrics;
mod pipeline;
mod reload;
mod state;
mod store;
pub mod telemetry;
mod tls;
pub mod upstream;

pub use admin::{Admin, admin_router};
pub use app::AppState;
pub use audit::{Audit, AuditOpenError, Record, digest};
pub use config::{
    AdminConfig, AuditConfig, AuthConfig, ClientConfig, Config, ConfigError, ConfigOf, Limits,
    OAuthConfig, OnAuditFailure, OnToolChange, RawServer, ServerConfig, TlsConfig, Transport,
    UpstreamConfig, expand_env, parse_duration, parse_size,
};
pub use downstream::conversation::Conversation;
pub use error::ProxyError;
pub use metrics::Metrics;
pub use pipeline::decide::refusal;
pub use reload::{PolicyWatcher, ReloadReport, reload_all, watch};
pub use state::{BuildError, LoadedPolicy, PolicyInfo, Server, Shared};
pub use store::approvals::{Approval, Approvals, Status as ApprovalStatus};

use std::future::Future;

pub use downstream::listener::Listeners;
use downstream::listener::{ConnectionLimits, Gate};
use std::net::SocketAddr;
use std::time::Duration;
pub use upstream::{Lane, Lanes};

/// Drops idle sessions, processes and empty windows every `sweep_every`, for ever.
async fn sweep_every(state: AppState) {
    let mut tick = tokio::time::interval(state.sweep_every());
    loop {
        tick.tick().await;
        state.sweep();
    }
}

/// Serves the proxy on `listeners` ([`AppState::bind`]) until `shutdown` completes,
/// then lets requests in flight finish for at most `grace` (streams that never end,
/// like GET streams, would otherwise hold the process forever).
///
/// Each of the state's [`Lanes`] (a listener on the one address, bound with
/// `SO_REUSEPORT`) is served by a thread of its own on a current-thread runtime, with
/// its own upstream connections, as nginx's workers are: a connection, its calls and
/// their upstream exchanges stay on one thread, with no wake-ups across threads. The
/// first lane is the calling thread. The kernel spreads new connections over the
/// lanes; every lane shares one connection gate (`limits.max_connections`,
/// `limits.connections_per_peer`) and all the state.
pub async fn serve(
    state: AppState,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (listener, lanes) = listeners.into_parts();
    let sweeper = tokio::spawn(sweep_every(state.clone()));
    let limits = ConnectionLimits::new(state.limits());
    tracing::debug!(
        max_connections = limits.max,
        connections_per_peer = limits.per_peer,
        "connection limits (connections_per_peer is at most half of max_connections)"
    );
    let gate = Gate::new(limits);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A lane's runtime outlives its listener until the upstreams are shut down: what
    // it started (upstream connections, child processes) is driven by it.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(lanes.len());
    for (lane, socket) in lanes {
        let (state, gate, stop) = (state.clone(), gate.clone(), stop_rx.clone());
        let release = release_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-lane-{}", lane.index()))
            .spawn(move || -> std::io::Result<()> {
                lane_runtime()?.block_on(async move {
                    socket.set_nonblocking(true)?;
                    let listener = tokio::net::TcpListener::from_std(socket)?;
                    let served =
                        serve_lane(&state, lane, listener, gate, stopped(stop), grace).await;
                    stopped(release).await;
                    served
                })
            })?;
        threads.push(thread);
    }
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let mut result = serve_lane(&state, Lane::FIRST, listener, gate, shutdown, grace).await;
    sweeper.abort();
    // Child processes never outlive Tollgate.
    state.shutdown_upstreams().await;
    // The other lanes stopped on the same signal, within the same grace.
    let _ = release_tx.send(true);
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        let lane = match joined {
            Ok(Ok(lane)) => lane,
            Ok(Err(_)) | Err(_) => Err(std::io::Error::other(
                "a listener lane stopped with a panic",
            )),
        };
        if result.is_ok() {
            result = lane;
        }
    }
    state.audit().flush();
    result
}

/// One lane: its listener, until `shutdown` and then for at most `grace`.
async fn serve_lane(
    state: &AppState,
    lane: Lane,
    listener: tokio::net::TcpListener,
    gate: std::sync::Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        // The deadline below may be gone already, when the server ended first.
        let _ = stopping_tx.send(());
    };
    let server = downstream::listener::serve(
        "proxy",
        listener,
        downstream::http::Front::new(state.doors().clone(), lane),
        state.shared().clone(),
        gate,
        state.doors().entry(false),
        shutdown,
    );
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = tick() => Ok(()),
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs(), "calls still in flight after the grace period; exiting");
            Ok(())
        }
    }
}

/// Never ends: ticks once a second. tokio wakes its own I/O driver (an `eventfd`
/// write, then one more `epoll_wait`) whenever a timer is set to fire before the
/// driver's planned wake-up, and without this every call would: while a call waits
/// for its upstream, the upstream timeout is the lane's earliest timer, and the next
/// request's header timeout, set once the answer is written, comes before it. With
/// a tick the planned wake-up is never more than a second away, sooner than any
/// per-call timer, so setting those wakes nothing.
async fn tick() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// A lane's runtime: current-thread, with I/O and timers ([`serve`]).
pub fn lane_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Completes once `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Whether a listener's certificate and key can be served, as `serve` loads them at
/// start (`tollgate validate` makes the same check); the error names the file and why.
pub fn check_tls(tls: &TlsConfig) -> Result<(), String> {
    tls::Certs::load("listen", tls).map(drop)
}

/// Why the admin listener cannot start ([`config::admin_problem`], the check
/// `tollgate validate` makes too).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdminStartError(String);

/// Checks the admin settings and records the admin URL (approvals need it).
pub fn prepare_admin(
    state: &AppState,
    bound: SocketAddr,
    token: Option<&str>,
    version: &str,
) -> Result<Admin, AdminStartError> {
    if let Some(problem) = config::admin_problem(bound, token) {
        return Err(AdminStartError(problem));
    }
    let scheme = if state.tls().admin().is_some() {
        "https"
    } else {
        "http"
    };
    if !state.notify().set_admin_url(format!("{scheme}://{bound}")) {
        tracing::debug!("the admin URL was already recorded");
    }
    Ok(Admin {
        app: state.clone(),
        token: token.map(Into::into),
        version: version.into(),
        loopback: bound.ip().is_loopback(),
    })
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve_admin(
    admin: Admin,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = admin.app.shared().clone();
    let gate = Gate::new(ConnectionLimits::new(shared.limits()));
    let entry = admin.app.doors().entry(true);
    downstream::listener::serve(
        "admin",
        listener,
        admin_router(admin),
        shared,
        gate,
        entry,
        shutdown,
    )
    .await
}
