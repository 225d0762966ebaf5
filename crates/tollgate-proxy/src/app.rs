//! The proxy as a whole: the shared state, the core over it and the front doors
//! in front of it, built once from the configuration. The one handle the binary
//! holds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::approvals::state::{Keys, StateKey};
use crate::config::Config;
use crate::downstream::Doors;
use crate::downstream::conversation::Conversation;
use crate::downstream::listener::Listeners;
use crate::pipeline::{Caller, Core};
use crate::state::{BuildError, LoadedPolicy, Server, Shared};
use crate::upstream::Lanes;

/// Cheap-to-clone handle on the proxy.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
    doors: Arc<Doors>,
    approvers: Arc<[Approver]>,
    lanes: Lanes,
}

/// A person who may decide approvals with a token of their own (`admin.approvers`).
pub struct Approver {
    /// The name recorded with their decisions.
    pub name: Arc<str>,
    /// Their bearer token.
    pub token: Vec<u8>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl AppState {
    /// Builds the proxy from a validated configuration and each server's compiled
    /// policy, served by one lane.
    pub fn build(
        config: &Config,
        policies: BTreeMap<String, LoadedPolicy>,
    ) -> Result<AppState, BuildError> {
        AppState::build_with(config, policies, Lanes::one())
    }

    /// [`AppState::build`], served by `lanes` (`tollgate serve` has one per core).
    pub fn build_with(
        config: &Config,
        policies: BTreeMap<String, LoadedPolicy>,
        lanes: Lanes,
    ) -> Result<AppState, BuildError> {
        let shared = Arc::new(Shared::build(config, policies, lanes)?);
        let secret = config
            .approvals
            .as_ref()
            .and_then(|a| a.state_key.as_deref());
        let state_key = match (secret, &shared.remote) {
            (Some(secret), _) => Keys::Ready(
                StateKey::from_secret(secret).map_err(|e| BuildError::StateKey(e.to_string()))?,
            ),
            // Replicas share one key, so that a state sealed on one opens on another.
            (None, Some(remote)) => Keys::Shared {
                remote: remote.clone(),
                key: tokio::sync::OnceCell::new(),
            },
            (None, None) => {
                Keys::Ready(StateKey::generate().map_err(|e| BuildError::StateKey(e.to_string()))?)
            }
        };
        let doors = Arc::new(Doors::new(Core::new(shared.clone(), state_key), config)?);
        let approvers = config
            .admin
            .iter()
            .flat_map(|admin| &admin.approvers)
            .map(|a| Approver {
                name: a.name.as_str().into(),
                token: a.token.as_bytes().to_vec(),
            })
            .collect();
        Ok(AppState {
            shared,
            doors,
            approvers,
            lanes,
        })
    }

    /// The lanes that serve the proxy listener.
    pub fn lanes(&self) -> Lanes {
        self.lanes
    }

    /// The proxy listener on `addr`: one socket for each lane (`crate::serve`).
    pub async fn bind(&self, addr: std::net::SocketAddr) -> std::io::Result<Listeners> {
        Listeners::bind(addr, self.lanes).await
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The named approvers.
    pub(crate) fn approvers(&self) -> &[Approver] {
        &self.approvers
    }

    /// The front doors.
    pub(crate) fn doors(&self) -> &Arc<Doors> {
        &self.doors
    }

    /// A conversation with the local user of `tollgate stdio`: whoever started the
    /// process, so no key is asked for. Messages for the client go to `out`.
    pub fn local_conversation(
        &self,
        server: &Arc<Server>,
        out: mpsc::Sender<Value>,
    ) -> Arc<Conversation> {
        let caller = Caller::anonymous(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Arc::new(Conversation::new(self.doors.clone(), server.clone(), caller, out).over_pipe())
    }

    /// Probes every upstream for readiness now and then every `health_interval`, for
    /// `/readyz` and `/status`; runs until dropped.
    pub async fn watch_health(self) {
        let mut every = tokio::time::interval(self.shared.upstreams().health_interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            futures::future::join_all(self.shared.servers().values().map(|s| s.probe())).await;
        }
    }

    /// Drops state for idle sessions and clients; run periodically.
    pub fn sweep(&self) {
        self.shared.sweep();
        self.doors.sweep();
    }
}
