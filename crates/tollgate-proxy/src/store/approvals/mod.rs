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
//! the admin page. Behind it, a backend implementing [`ApprovalStore`] (the
//! operations and what a caller may rely on): [`memory`] (this process), or
//! [`redis`] (`state.backend: redis`: every replica lists, decides and redeems
//! every approval, each exactly once), dispatched without boxing. A method that may need
//! Redis is `async` and says when it could not be reached; what a caller does
//! then (a held call is refused: an approval is never assumed) does not depend on
//! the backend. `contract.rs` holds the two backends to one behaviour.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::dispatch;
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

/// What a backend of approvals does. [`memory::Approvals`] and [`redis::Approvals`]
/// implement it; `contract.rs` holds both to one behaviour. "Here" is this
/// process: a shared backend keeps this replica's approvals in memory too, and
/// answers for the others' from Redis. An `async` operation may need Redis and
/// says when it could not be reached.
pub trait ApprovalStore {
    /// Sets the most bytes of arguments one principal's live approvals keep
    /// (`approvals.bytes_per_client`).
    fn set_bytes_per_principal(&self, bytes: usize);

    /// The live approval of this call held here (by its key), or a new pending one
    /// held here: its id, where it stands, and whether it is new. `Err` when the
    /// principal's or the table's bounds are reached.
    fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError>;

    /// The live approval of this call (by its key), whichever replica opened it,
    /// and where it stands.
    fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> impl Future<Output = Result<Option<(String, Standing)>, Unavailable>> + Send;

    /// Where an approval of any replica stands; `None` for an id never seen (or
    /// long forgotten). A pending one past its deadline stands expired.
    fn standing(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Standing>, Unavailable>> + Send;

    /// Waits up to `max` for a pending approval to be decided (or to expire), on
    /// any replica; then where it stands (while a shared backend cannot be
    /// reached, as this process knows it).
    fn wait(&self, id: &str, max: Duration) -> impl Future<Output = Option<Standing>> + Send;

    /// Uses an approved approval of the call `binding`, atomically and once
    /// whichever replica is asked: the verdict, or where it stands when it cannot
    /// be used (pending, denied, over, or opened for another call: `None`).
    fn redeem(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> impl Future<Output = Result<Result<Verdict, Option<Standing>>, Unavailable>> + Send;

    /// Approves or denies a pending approval of any replica, exactly once whoever
    /// asks first (a later decision is `Settled`); an approval with a grant
    /// request also gives the grant.
    fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> impl Future<Output = Result<(Approval, Option<Grant>), DecideError>> + Send;

    /// The client that held approval `id` (held here) went away: only a preview of
    /// its arguments is kept, and their bytes leave the budgets.
    fn abandon(&self, id: &str);

    /// Marks a one-use token used until `until`; `false` when it already was.
    fn consume(&self, token: &str, until: SystemTime) -> bool;

    /// Pending and recently settled approvals of every replica, newest first (ties
    /// by id).
    fn list(&self) -> Vec<Approval>;

    /// One approval, held here or (as last known) by another replica.
    fn get(&self, id: &str) -> Option<Approval>;

    /// A pending approval held here, with the principal that asked for it.
    fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)>;

    /// Number of pending approvals held here.
    fn pending(&self) -> usize;

    /// Every change of an approval held here, or (on a shared backend) of another
    /// replica's, from now on.
    fn subscribe(&self) -> broadcast::Receiver<Approval>;

    /// Denies everything pending held here, e.g. on shutdown.
    fn deny_all(&self, by: &str, reason: &str);

    /// Denies the pending approvals held here that only the closed `session` could
    /// retry (an anonymous caller's, principal `session:<id>`).
    fn session_closed(&self, session: &str);

    /// A grant (given on any replica) that lets this call through, its use
    /// counted; `None` when none does.
    fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> impl Future<Output = Result<Option<Grant>, Unavailable>> + Send;

    /// Active grants of every replica (this one's alone while a shared backend
    /// cannot be reached), newest first.
    fn grants(&self) -> impl Future<Output = Vec<Grant>> + Send;

    /// Ends a grant (given on any replica) at once, everywhere; the grant, or
    /// `None` when no active grant has this id.
    fn revoke(&self, id: &str) -> impl Future<Output = Result<Option<Grant>, Unavailable>> + Send;
}

/// The approvals store.
pub struct Approvals {
    backend: Backend,
}

/// The backends, dispatched without boxing: an operation costs one match. (One
/// store per process: the memory table's size is not worth an indirection.) The
/// calls name the trait: the memory table's inherent methods of the same names
/// (which the Redis backend's copy shares) would take precedence.
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
        dispatch!(&self.backend, store => ApprovalStore::set_bytes_per_principal(store, bytes));
    }

    /// The live approval for this call, or a new pending one (held by this
    /// process). Returns its id, where it stands, and whether it is new.
    pub fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        dispatch!(&self.backend, store => ApprovalStore::open(store, request))
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
        dispatch!(&self.backend, store => ApprovalStore::find(store, server, principal, tool, digest).await)
    }

    /// Where an approval stands; `None` for an id never seen (or long forgotten).
    pub async fn standing(&self, id: &str) -> Result<Option<Standing>, Unavailable> {
        dispatch!(&self.backend, store => ApprovalStore::standing(store, id).await)
    }

    /// Waits up to `max` for a pending approval to be decided (or to expire); then
    /// where it stands (while the shared state cannot be reached, as this process
    /// knows it).
    pub async fn wait(&self, id: &str, max: Duration) -> Option<Standing> {
        dispatch!(&self.backend, store => ApprovalStore::wait(store, id, max).await)
    }

    /// Uses an approved approval of the call `binding`, atomically and once
    /// whichever replica the retries reach: the verdict, or where it stands when it
    /// cannot be used (pending, denied, over, or opened for another call: `None`).
    pub async fn redeem(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> Result<Result<Verdict, Option<Standing>>, Unavailable> {
        dispatch!(&self.backend, store => ApprovalStore::redeem(store, id, binding).await)
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
        dispatch!(&self.backend, store => ApprovalStore::decide(store, id, approved, by, reason, grant).await)
    }

    /// The client that held approval `id` went away: only a preview of its
    /// arguments is kept (see [`memory::Approvals::abandon`]).
    pub fn abandon(&self, id: &str) {
        dispatch!(&self.backend, store => ApprovalStore::abandon(store, id));
    }

    /// Marks a one-use token used until `until`; `false` when it already was.
    pub fn consume(&self, token: &str, until: SystemTime) -> bool {
        dispatch!(&self.backend, store => ApprovalStore::consume(store, token, until))
    }

    /// Pending and recently settled approvals (of every replica), newest first.
    pub fn list(&self) -> Vec<Approval> {
        dispatch!(&self.backend, store => ApprovalStore::list(store))
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Option<Approval> {
        dispatch!(&self.backend, store => ApprovalStore::get(store, id))
    }

    /// A pending approval held here, with what the policy needs of its caller to
    /// decide it again.
    pub fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)> {
        dispatch!(&self.backend, store => ApprovalStore::held_call(store, id))
    }

    /// Number of pending approvals held here.
    pub fn pending(&self) -> usize {
        dispatch!(&self.backend, store => ApprovalStore::pending(store))
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        dispatch!(&self.backend, store => ApprovalStore::subscribe(store))
    }

    /// Denies everything pending held here, e.g. on shutdown.
    pub fn deny_all(&self, by: &str, reason: &str) {
        dispatch!(&self.backend, store => ApprovalStore::deny_all(store, by, reason));
    }

    /// Withdraws what a closed session was waiting for (see
    /// [`memory::Approvals::session_closed`]).
    pub fn session_closed(&self, session: &str) {
        dispatch!(&self.backend, store => ApprovalStore::session_closed(store, session));
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
        dispatch!(&self.backend, store => {
            ApprovalStore::use_grant(store, server, tool, client_key, session_key, digest).await
        })
    }

    /// Active grants (of every replica; this one's alone while Redis cannot be
    /// reached), newest first.
    pub async fn grants(&self) -> Vec<Grant> {
        dispatch!(&self.backend, store => ApprovalStore::grants(store).await)
    }

    /// Ends a grant (given on any replica) at once; the grant, or `None` when no
    /// active grant has this id.
    pub async fn revoke(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        dispatch!(&self.backend, store => ApprovalStore::revoke(store, id).await)
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
