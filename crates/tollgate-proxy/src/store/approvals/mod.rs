//! Calls held for a human: approvals, and the grants approvers give.
//!
//! An approval outlives the request that asked for it. The request waits a while
//! (`approval.wait`) and is then told to retry; the approval stays pending until
//! its deadline (`approval.timeout`). A retry of the same call (same server,
//! principal, tool and arguments digest: the approval's key) joins it while it is
//! pending, redeems it once it is approved (once, within `valid_for` of the
//! decision), and is answered with the approver's reason once it is denied, until
//! the deadline. A grant lets one client's (or session's) calls of one tool through
//! for a window.
//!
//! [`Approvals`] is the one type callers use, one method per operation: open (or
//! join), find, standing, wait, redeem (atomic, once), decide (once), a one-use
//! token, grants (use, list, revoke), and the listing and broadcast of changes for
//! the admin page. Behind it, a backend: [`memory`] (this process), or [`redis`]
//! (`state.backend: redis`: every replica lists, decides and redeems every
//! approval, each exactly once), dispatched without boxing. A method that may need
//! Redis is `async` and says when it could not be reached; what a caller does
//! then (a held call is refused: an approval is never assumed) does not depend on
//! the backend. `contract.rs` holds the two backends to one behaviour.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::remote::{Remote, Unavailable};

#[cfg(test)]
mod contract;
mod memory;
mod record;
mod redis;

pub use record::{
    Approval, Binding, DecideError, Grant, GrantRequest, OpenError, Principal, Request, Scope,
    Standing, Status, Verdict,
};

/// The approvals store.
pub struct Approvals {
    backend: Backend,
}

/// The backends, dispatched without boxing: an operation costs one match. (One
/// store per process: the memory table's size is not worth an indirection.)
#[expect(clippy::large_enum_variant)]
enum Backend {
    Memory(memory::Approvals),
    Redis(redis::Approvals),
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals::new()
    }
}

/// Runs `$body` on the table of approvals this process holds, whatever the backend.
macro_rules! local {
    ($self:ident, $local:ident => $body:expr) => {
        match &$self.backend {
            Backend::Memory($local) => $body,
            Backend::Redis(shared) => {
                let $local = shared.local();
                $body
            }
        }
    };
}

impl Approvals {
    /// Approvals in this process.
    pub fn new() -> Approvals {
        Approvals {
            backend: Backend::Memory(memory::Approvals::new()),
        }
    }

    /// Approvals every replica on `remote` lists, decides and redeems.
    pub fn shared(remote: Arc<Remote>) -> Arc<Approvals> {
        Arc::new(Approvals {
            backend: Backend::Redis(redis::Approvals::new(remote)),
        })
    }

    /// Sets the most bytes of arguments one principal's live approvals keep
    /// (`approvals.bytes_per_client`).
    pub fn set_bytes_per_principal(&self, bytes: usize) {
        local!(self, local => local.set_bytes_per_principal(bytes));
    }

    /// The live approval for this call, or a new pending one (held by this
    /// process). Returns its id, where it stands, and whether it is new.
    pub fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        local!(self, local => local.open(request))
    }

    /// The live approval of this call (by its key), whoever opened it, and where
    /// it stands.
    pub async fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> Result<Option<(String, Standing)>, Unavailable> {
        match &self.backend {
            Backend::Memory(store) => Ok(store.find(server, principal, tool, digest)),
            Backend::Redis(store) => store.find(server, principal, tool, digest).await,
        }
    }

    /// Where an approval stands; `None` for an id never seen (or long forgotten).
    pub async fn standing(&self, id: &str) -> Result<Option<Standing>, Unavailable> {
        match &self.backend {
            Backend::Memory(store) => Ok(store.standing(id)),
            Backend::Redis(store) => store.standing(id).await,
        }
    }

    /// Waits up to `max` for a pending approval to be decided (or to expire); then
    /// where it stands (while the shared state cannot be reached, as this process
    /// knows it).
    pub async fn wait(&self, id: &str, max: Duration) -> Option<Standing> {
        wait_for(self.subscribe(), id, max, || async move {
            match self.standing(id).await {
                Ok(standing) => Ok(standing),
                Err(_) => Err(local!(self, local => local.standing(id))),
            }
        })
        .await
    }

    /// Uses an approved approval of the call `binding`, atomically and once
    /// whichever replica the retries reach: the verdict, or where it stands when it
    /// cannot be used (pending, denied, over, or opened for another call: `None`).
    pub async fn redeem(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> Result<Result<Verdict, Option<Standing>>, Unavailable> {
        match &self.backend {
            Backend::Memory(store) => Ok(store.redeem_call(id, binding)),
            Backend::Redis(store) => store.redeem(id, binding).await,
        }
    }

    /// Approves or denies a pending approval, exactly once whoever asks first; an
    /// approval with a grant request also gives the grant.
    pub async fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        match &self.backend {
            Backend::Memory(store) => store.decide(id, approved, by, reason, grant),
            Backend::Redis(store) => store.decide(id, approved, by, reason, grant).await,
        }
    }

    /// The client that held approval `id` went away: only a preview of its
    /// arguments is kept (see [`memory::Approvals::abandon`]).
    pub fn abandon(&self, id: &str) {
        local!(self, local => local.abandon(id));
    }

    /// Marks a one-use token used until `until`; `false` when it already was.
    pub fn consume(&self, token: &str, until: SystemTime) -> bool {
        local!(self, local => local.consume(token, until))
    }

    /// Pending and recently settled approvals (of every replica), newest first.
    pub fn list(&self) -> Vec<Approval> {
        match &self.backend {
            Backend::Memory(store) => store.list(),
            Backend::Redis(store) => store.list(),
        }
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Option<Approval> {
        match &self.backend {
            Backend::Memory(store) => store.get(id),
            Backend::Redis(store) => store.get(id),
        }
    }

    /// A pending approval held here, with what the policy needs of its caller to
    /// decide it again.
    pub fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)> {
        local!(self, local => local.held_call(id))
    }

    /// Number of pending approvals held here.
    pub fn pending(&self) -> usize {
        local!(self, local => local.pending())
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        local!(self, local => local.subscribe())
    }

    /// Denies everything pending held here, e.g. on shutdown.
    pub fn deny_all(&self, by: &str, reason: &str) {
        local!(self, local => local.deny_all(by, reason));
    }

    /// Withdraws what a closed session was waiting for (see
    /// [`memory::Approvals::session_closed`]).
    pub fn session_closed(&self, session: &str) {
        local!(self, local => local.session_closed(session));
    }

    /// A grant (given on any replica) that lets this call through, its use
    /// counted; `None` when none does.
    pub async fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Result<Option<Grant>, Unavailable> {
        match &self.backend {
            Backend::Memory(store) => {
                Ok(store.use_grant(server, tool, client_key, session_key, digest))
            }
            Backend::Redis(store) => {
                store
                    .use_grant(server, tool, client_key, session_key, digest)
                    .await
            }
        }
    }

    /// Active grants (of every replica; this one's alone while Redis cannot be
    /// reached), newest first.
    pub async fn grants(&self) -> Vec<Grant> {
        match &self.backend {
            Backend::Memory(store) => store.grants(),
            Backend::Redis(store) => store.grants().await,
        }
    }

    /// Ends a grant (given on any replica) at once; the grant, or `None` when no
    /// active grant has this id.
    pub async fn revoke(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        match &self.backend {
            Backend::Memory(store) => Ok(store.revoke(id)),
            Backend::Redis(store) => store.revoke(id).await,
        }
    }
}

/// Waits up to `max` for approval `id` to leave pending, following `changes` and
/// looking where it stands with `look` (an `Err` is what is known while the
/// shared state cannot be reached); then where it stands.
async fn wait_for<F, Fut>(
    mut changes: broadcast::Receiver<Approval>,
    id: &str,
    max: Duration,
    look: F,
) -> Option<Standing>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Option<Standing>, Option<Standing>>>,
{
    let until = tokio::time::Instant::now() + max;
    loop {
        let now = look().await.unwrap_or_else(|known| known)?;
        let Standing::Pending(deadline) = now else {
            return Some(now);
        };
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let stop = until.min(tokio::time::Instant::now() + left);
        loop {
            match tokio::time::timeout_at(stop, changes.recv()).await {
                Err(_) => return look().await.ok().flatten(),
                Ok(Ok(change)) if change.id != id => continue,
                // Its change, or changes missed: look again.
                Ok(_) => break,
            }
        }
    }
}
