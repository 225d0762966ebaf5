//! The admin listener: where it listens, with which token, and its record in the
//! runtime directory for `tollgate approvals`.

use std::net::SocketAddr;

use anyhow::Context as _;
use tollgate_proxy::{AppState, Config};

use super::Failure;
use crate::command::instances;

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
                crate::command::own_binary()
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
    let Some((listen, token, generated_token)) = admin_address(config, state, mode) else {
        return Ok(None);
    };
    let admin_listener = admin_listener(listen, mode).await?;
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
    let registration = instances::register(&instances::Instance {
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

/// Where the admin listener goes and its token, plus the token when Tollgate
/// generated it (to print once); `None` when there is to be no admin listener.
fn admin_address(
    config: &Config,
    state: &AppState,
    mode: AdminMode,
) -> Option<(SocketAddr, Option<String>, Option<String>)> {
    match (&config.admin, mode) {
        (Some(admin), _) => Some((admin.listen, admin.token.clone(), None)),
        (
            None,
            AdminMode::Personal {
                default_listen,
                explicit,
            },
        ) if explicit || policies_need_approvers(state) => {
            let token = generated_token();
            Some((default_listen, Some(token.clone()), Some(token)))
        }
        (None, _) => {
            if policies_need_approvers(state) {
                tracing::warn!(
                    "a policy holds calls for a human, but there is no `admin:` listener to approve them, so they are refused; add `admin: {{listen: 127.0.0.1:9090}}` to the configuration"
                );
            }
            None
        }
    }
}

/// Binds `listen`; a personal Tollgate not told the port moves to an ephemeral one
/// when it is taken (likely by another Tollgate of the same configuration).
async fn admin_listener(
    listen: SocketAddr,
    mode: AdminMode,
) -> Result<tokio::net::TcpListener, Failure> {
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
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
            Ok(listener)
        }
        Err(err) => Err(Failure::io(
            anyhow::Error::new(err).context(format!("cannot listen on admin.listen {listen}")),
        )),
    }
}
