//! Approvals in this process: a table of the live approvals (pending, or decided
//! and still answering retries), the recently settled ones, the grants and the
//! one-use tokens, behind one lock. Every change is announced ([`Announce`]): in
//! memory alone to the admin stream and the waiting requests; under the Redis
//! backend, which keeps its replica's approvals here, also to the other replicas.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::ApprovalStore;
use super::record::{
    Approval, Binding, DEFAULT_BYTES_PER_PRINCIPAL, DecideError, Grant, GrantRequest, OpenError,
    Principal, Request, Standing, Status, Verdict, key_of, rfc3339,
};
use crate::store::remote::Unavailable;
use table::{
    Table, admit, decide_in, insert, preview, push_settled, remove_live, standing, standing_in,
    sweep,
};

mod table;
#[cfg(test)]
mod tests;

/// Where the changes of approvals go, besides the store's own broadcast.
pub trait Announce: Send + Sync + 'static {
    /// Tells of `approval`'s change (with the grant it gave) on `changes`, the
    /// broadcast the admin stream and the waiting requests follow.
    fn changed(
        &self,
        changes: &broadcast::Sender<Approval>,
        approval: Approval,
        grant: Option<Grant>,
    );
}

/// Changes are told in this process alone.
pub struct Local;

impl Announce for Local {
    fn changed(&self, changes: &broadcast::Sender<Approval>, approval: Approval, _: Option<Grant>) {
        let _ = changes.send(approval);
    }
}

/// The approvals of this process.
pub struct Approvals<A: Announce = Local> {
    table: Mutex<Table>,
    /// `approvals.bytes_per_client`.
    bytes_per_principal: std::sync::atomic::AtomicUsize,
    changes: broadcast::Sender<Approval>,
    announcer: A,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals::new()
    }
}

impl Approvals {
    /// An empty store, its changes told in this process alone.
    pub fn new() -> Approvals {
        Approvals::announcing(Local)
    }
}

impl<A: Announce> Approvals<A> {
    /// An empty store whose changes are told to `announcer` too.
    pub fn announcing(announcer: A) -> Approvals<A> {
        let (changes, _) = broadcast::channel(1024);
        Approvals {
            table: Mutex::new(Table::default()),
            bytes_per_principal: DEFAULT_BYTES_PER_PRINCIPAL.into(),
            changes,
            announcer,
        }
    }

    /// What changes are told to, besides the broadcast.
    pub fn announcer(&self) -> &A {
        &self.announcer
    }

    /// The broadcast of changes, to tell one this store did not make.
    pub fn changes(&self) -> &broadcast::Sender<Approval> {
        &self.changes
    }

    /// The client that held approval `id` went away: its arguments are no longer
    /// kept whole, only a preview (as for a settled approval), and their bytes leave
    /// the budgets. The approval stays live for the client's retry, which carries
    /// the arguments again (and is evaluated against the policy in full).
    pub fn abandon(&self, id: &str) {
        let mut table = self.table.lock();
        let Some(entry) = table.live.get_mut(id) else {
            return;
        };
        if entry.approval.arguments_truncated_from.is_some() {
            return;
        }
        preview(&mut entry.approval);
        if entry.approval.arguments_truncated_from.is_none() {
            return;
        }
        let kept = serde_json::to_vec(&entry.approval.arguments).map_or(0, |v| v.len());
        let freed = entry.bytes.saturating_sub(kept);
        entry.bytes = kept;
        let (principal, approval) = (entry.approval.principal.clone(), entry.approval.clone());
        table.live_bytes = table.live_bytes.saturating_sub(freed);
        if let Some(b) = table.principal_bytes.get_mut(&principal) {
            *b = b.saturating_sub(freed);
        }
        drop(table);
        self.changed(approval);
    }

    /// Sets the most bytes of arguments one principal's live approvals keep
    /// (`approvals.bytes_per_client`).
    pub fn set_bytes_per_principal(&self, bytes: usize) {
        self.bytes_per_principal
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this replica holds (or held) the approval.
    pub fn holds(&self, id: &str) -> bool {
        let table = self.table.lock();
        table.live.contains_key(id) || table.settled.iter().any(|a| a.id == id)
    }

    /// Tells the admin stream and the waiting requests (and what `A` tells).
    fn changed(&self, approval: Approval) {
        self.changed_with(approval, None);
    }

    /// [`Approvals::changed`], with the grant the change gave.
    fn changed_with(&self, approval: Approval, grant: Option<Grant>) {
        self.announcer.changed(&self.changes, approval, grant);
    }

    /// Settles an approval held here that another replica redeemed; whether it was held.
    pub fn settle_redeemed(&self, id: &str) -> bool {
        let mut table = self.table.lock();
        let Some(entry) = remove_live(&mut table, id) else {
            return false;
        };
        let mut approval = entry.approval;
        approval.redeemed_at = Some(rfc3339(SystemTime::now()));
        push_settled(&mut table, approval.clone());
        drop(table);
        let _ = self.changes.send(approval);
        true
    }

    /// The live approval for this call, or a new pending one. Returns its id, where
    /// it stands, and whether it is new.
    pub fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        let now = SystemTime::now();
        let key = key_of(
            &request.server,
            &request.principal.key,
            &request.tool,
            &request.arguments_digest,
        );
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let found = table
            .by_key
            .get(&key)
            .and_then(|id| Some((id.clone(), standing(table.live.get(id)?))));
        let result = match found {
            Some((id, standing)) => Ok((id, standing, false)),
            None => {
                let bytes = serde_json::to_vec(&request.arguments).map_or(0, |v| v.len());
                let per_principal = self
                    .bytes_per_principal
                    .load(std::sync::atomic::Ordering::Relaxed);
                admit(&table, &request.principal.key, bytes, per_principal).map(|()| {
                    let approval = insert(&mut table, key, request, bytes, now);
                    let opened = (approval.id.clone(), standing_in(&table, &approval.id));
                    self.changed(approval);
                    match opened {
                        (id, Some(standing)) => (id, standing, true),
                        (id, None) => (id, Standing::Over(Status::Expired), true),
                    }
                })
            }
        };
        drop(table);
        self.announce(changed);
        result
    }

    /// The live approval of this call (by its key), if any, and where it stands.
    pub fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> Option<(String, Standing)> {
        let key = key_of(server, principal, tool, digest);
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let found = table
            .by_key
            .get(&key)
            .and_then(|id| Some((id.clone(), standing(table.live.get(id)?))));
        drop(table);
        self.announce(changed);
        found
    }

    /// Where an approval stands; `None` for an id never seen (or long forgotten).
    pub fn standing(&self, id: &str) -> Option<Standing> {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let found = standing_in(&table, id);
        drop(table);
        self.announce(changed);
        found
    }

    /// Approves or denies a pending approval. An approval with a grant request
    /// also opens the grant.
    pub fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> Result<(Approval, Option<Grant>), DecideError> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let result = decide_in(&mut table, id, approved, by, reason, grant, now);
        drop(table);
        self.announce(changed);
        if let Ok((approval, grant)) = &result {
            self.changed_with(approval.clone(), grant.clone());
        }
        result
    }

    /// Uses an approved approval, atomically and once: the verdict, or where it
    /// stands when it cannot be used (pending, denied, over).
    pub fn redeem(&self, id: &str) -> Result<Verdict, Option<Standing>> {
        self.redeem_where(id, |_| true)
    }

    /// [`Approvals::redeem`] by the call `binding`: an approval opened for another
    /// call is not used (`Err(None)`, as for an unknown one).
    pub fn redeem_call(&self, id: &str, binding: Binding<'_>) -> Result<Verdict, Option<Standing>> {
        let key = key_of(
            binding.server,
            binding.principal,
            binding.tool,
            binding.digest,
        );
        self.redeem_where(id, |entry| entry.is_for(&key))
    }

    fn redeem_where(
        &self,
        id: &str,
        bound: impl Fn(&table::Entry) -> bool,
    ) -> Result<Verdict, Option<Standing>> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        let changed = sweep(&mut table, now);
        let live = table.live.get(id);
        let usable = live.is_some_and(|e| e.approval.status == Status::Approved);
        if usable && !live.is_some_and(&bound) {
            drop(table);
            self.announce(changed);
            return Err(None);
        }
        let result = if usable && let Some(entry) = remove_live(&mut table, id) {
            let mut approval = entry.approval;
            approval.redeemed_at = Some(rfc3339(now));
            let verdict = Verdict {
                approved: true,
                by: approval.decided_by.clone().unwrap_or_default(),
                reason: approval.decision_reason.clone(),
            };
            push_settled(&mut table, approval.clone());
            Ok((verdict, approval))
        } else {
            Err(standing_in(&table, id))
        };
        drop(table);
        self.announce(changed);
        result.map(|(verdict, approval)| {
            self.changed(approval);
            verdict
        })
    }

    /// Marks a one-use token used until `until`; `false` when it already was.
    pub fn consume(&self, token: &str, until: SystemTime) -> bool {
        let mut table = self.table.lock();
        let now = SystemTime::now();
        table.used.retain(|_, end| *end > now);
        if table.used.contains_key(token) {
            return false;
        }
        table.used.insert(token.to_owned(), until);
        true
    }

    /// Pending and recently settled approvals, newest first.
    pub fn list(&self) -> Vec<Approval> {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let mut all: Vec<Approval> = table
            .live
            .values()
            .map(|e| e.approval.clone())
            .chain(table.settled.iter().cloned())
            .collect();
        drop(table);
        self.announce(changed);
        super::record::newest_first(&mut all);
        all
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Option<Approval> {
        let table = self.table.lock();
        table
            .live
            .get(id)
            .map(|e| e.approval.clone())
            .or_else(|| table.settled.iter().find(|a| a.id == id).cloned())
    }

    /// A pending approval held here, with what the policy needs of its caller to
    /// decide it again.
    pub fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)> {
        let table = self.table.lock();
        let entry = table.live.get(id)?;
        Some((entry.approval.clone(), entry.principal.clone()))
    }

    /// Number of pending approvals.
    pub fn pending(&self) -> usize {
        let mut table = self.table.lock();
        let changed = sweep(&mut table, SystemTime::now());
        let pending = table
            .live
            .values()
            .filter(|e| e.approval.status == Status::Pending)
            .count();
        drop(table);
        self.announce(changed);
        pending
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.changes.subscribe()
    }

    /// Denies everything pending, e.g. on shutdown.
    pub fn deny_all(&self, by: &str, reason: &str) {
        let ids: Vec<String> = {
            let table = self.table.lock();
            table
                .live
                .iter()
                .filter(|(_, e)| e.approval.status == Status::Pending)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            let _ = self.decide(&id, false, by, Some(reason.to_owned()), None);
        }
    }

    /// Withdraws what a closed session was waiting for: its pending approvals that only
    /// it could retry (an anonymous caller's, `principal` `session:<id>`) are denied, so
    /// they leave the approvals page rather than wait for a retry that cannot come.
    pub fn session_closed(&self, session: &str) {
        let principal = format!("session:{session}");
        let ids: Vec<String> = {
            let table = self.table.lock();
            table
                .live
                .iter()
                .filter(|(_, e)| {
                    e.approval.status == Status::Pending && e.approval.principal == principal
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            let _ = self.decide(
                &id,
                false,
                "tollgate",
                Some("the session that asked was closed, so nobody can retry the call".to_owned()),
                None,
            );
        }
    }

    /// A grant that lets this call through, its use counted; `None` when none does.
    pub fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Option<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        let grant = table
            .grants
            .iter_mut()
            .find(|g| g.matches(server, tool, client_key, session_key, digest))?;
        grant.uses += 1;
        Some(grant.clone())
    }

    /// Active grants, newest first.
    pub fn grants(&self) -> Vec<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        table.grants.iter().rev().cloned().collect()
    }

    /// Ends a grant at once; the grant, or `None` when no active grant has this id.
    pub fn revoke(&self, id: &str) -> Option<Grant> {
        let now = SystemTime::now();
        let mut table = self.table.lock();
        table.grants.retain(|g| g.until > now);
        let at = table.grants.iter().position(|g| g.id == id)?;
        Some(table.grants.remove(at))
    }

    /// Broadcasts approvals a sweep settled.
    fn announce(&self, changed: Vec<Approval>) {
        for approval in changed {
            self.changed(approval);
        }
    }
}

/// The table's own methods (which the Redis backend's copy shares), done when
/// called: the futures are ready, and never unavailable. (Method calls below reach
/// the inherent methods, which take precedence over the trait's.)
impl ApprovalStore for Approvals {
    fn set_bytes_per_principal(&self, bytes: usize) {
        self.set_bytes_per_principal(bytes);
    }

    fn open(&self, request: Request) -> Result<(String, Standing, bool), OpenError> {
        self.open(request)
    }

    fn find(
        &self,
        server: &str,
        principal: &str,
        tool: &str,
        digest: &str,
    ) -> impl Future<Output = Result<Option<(String, Standing)>, Unavailable>> + Send {
        std::future::ready(Ok(self.find(server, principal, tool, digest)))
    }

    fn standing(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Standing>, Unavailable>> + Send {
        std::future::ready(Ok(self.standing(id)))
    }

    async fn wait(&self, id: &str, max: Duration) -> Option<Standing> {
        super::wait_for(self.subscribe(), id, max, || {
            std::future::ready(Ok(self.standing(id)))
        })
        .await
    }

    fn redeem(
        &self,
        id: &str,
        binding: Binding<'_>,
    ) -> impl Future<Output = Result<Result<Verdict, Option<Standing>>, Unavailable>> + Send {
        std::future::ready(Ok(self.redeem_call(id, binding)))
    }

    fn decide(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: Option<String>,
        grant: Option<GrantRequest>,
    ) -> impl Future<Output = Result<(Approval, Option<Grant>), DecideError>> + Send {
        std::future::ready(self.decide(id, approved, by, reason, grant))
    }

    fn abandon(&self, id: &str) {
        self.abandon(id);
    }

    fn consume(&self, token: &str, until: SystemTime) -> bool {
        self.consume(token, until)
    }

    fn list(&self) -> Vec<Approval> {
        self.list()
    }

    fn get(&self, id: &str) -> Option<Approval> {
        self.get(id)
    }

    fn held_call(&self, id: &str) -> Option<(Approval, Arc<Principal>)> {
        self.held_call(id)
    }

    fn pending(&self) -> usize {
        self.pending()
    }

    fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.subscribe()
    }

    fn deny_all(&self, by: &str, reason: &str) {
        self.deny_all(by, reason);
    }

    fn session_closed(&self, session: &str) {
        self.session_closed(session);
    }

    fn use_grant(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> impl Future<Output = Result<Option<Grant>, Unavailable>> + Send {
        std::future::ready(Ok(self.use_grant(
            server,
            tool,
            client_key,
            session_key,
            digest,
        )))
    }

    fn grants(&self) -> impl Future<Output = Vec<Grant>> + Send {
        std::future::ready(self.grants())
    }

    fn revoke(&self, id: &str) -> impl Future<Output = Result<Option<Grant>, Unavailable>> + Send {
        std::future::ready(Ok(self.revoke(id)))
    }
}
