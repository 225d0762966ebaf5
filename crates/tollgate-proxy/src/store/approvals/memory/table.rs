//! The table behind the memory approvals: the live approvals by id, by call key
//! and by when they are due, their budgets (count and bytes, in all and per
//! principal), the settled ones, the grants and the used one-use tokens; and the
//! steps that change it, each under the store's one lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::super::record::{
    Approval, DecideError, Grant, GrantRequest, MAX_GRANTS, MAX_LIVE, MAX_LIVE_BYTES,
    MAX_LIVE_PER_PRINCIPAL, OpenError, PREVIEW_BYTES, Principal, Request, SETTLED_KEPT, Scope,
    Standing, Status, Verdict, rfc3339,
};

/// One live approval.
pub(super) struct Entry {
    pub(super) approval: Approval,
    /// Who asked, as the call knew them (the token's claims decide it again).
    pub(super) principal: Arc<Principal>,
    /// Size of the arguments as JSON, counted against [`MAX_LIVE_BYTES`].
    pub(super) bytes: usize,
    /// When it is over: the deadline, or once approved `valid_until`.
    due: SystemTime,
    key: String,
    deadline: SystemTime,
    valid_for: Duration,
}

impl Entry {
    /// Whether it was opened for the call of `key`.
    pub(super) fn is_for(&self, key: &str) -> bool {
        self.key == key
    }
}

#[derive(Default)]
pub(super) struct Table {
    /// Approvals still answering retries: pending, or decided and not yet over.
    pub(super) live: HashMap<String, Entry>,
    /// Live approvals by key.
    pub(super) by_key: HashMap<String, String>,
    /// Bytes of arguments the live approvals keep.
    pub(super) live_bytes: usize,
    /// Live approvals per principal.
    per_principal: HashMap<String, usize>,
    /// Bytes of arguments the live approvals of each principal keep.
    pub(super) principal_bytes: HashMap<String, usize>,
    /// Live approvals by when they are over, so a sweep looks only at those due.
    due: BTreeSet<(SystemTime, String)>,
    pub(super) settled: VecDeque<Approval>,
    pub(super) grants: Vec<Grant>,
    /// One-use tokens already used, until they expire.
    pub(super) used: HashMap<String, SystemTime>,
}

/// Whether a new approval of `bytes` of arguments for `principal` fits the budgets.
pub(super) fn admit(
    table: &Table,
    principal: &str,
    bytes: usize,
    per_principal_bytes: usize,
) -> Result<(), OpenError> {
    if table.live.len() >= MAX_LIVE || table.live_bytes + bytes > MAX_LIVE_BYTES {
        return Err(OpenError::Full);
    }
    if table
        .per_principal
        .get(principal)
        .is_some_and(|n| *n >= MAX_LIVE_PER_PRINCIPAL)
    {
        return Err(OpenError::TooManyForPrincipal);
    }
    if table.principal_bytes.get(principal).map_or(0, |b| *b) + bytes > per_principal_bytes {
        return Err(OpenError::TooManyBytesForPrincipal(per_principal_bytes));
    }
    Ok(())
}

/// Opens a pending approval of `request` (its call's `key`, `bytes` of arguments)
/// at `now`, counted in the budgets; the approval as opened.
pub(super) fn insert(
    table: &mut Table,
    key: String,
    request: Request,
    bytes: usize,
    now: SystemTime,
) -> Approval {
    let id = crate::store::random_hex(12);
    let deadline = now + request.timeout;
    let (principal, valid_for) = (request.principal.clone(), request.valid_for);
    let approval = Approval::pending(id.clone(), request, now);
    table.by_key.insert(key.clone(), id.clone());
    table.live_bytes += bytes;
    table.due.insert((deadline, id.clone()));
    *table
        .per_principal
        .entry(approval.principal.clone())
        .or_default() += 1;
    *table
        .principal_bytes
        .entry(approval.principal.clone())
        .or_default() += bytes;
    let entry = Entry {
        approval: approval.clone(),
        principal,
        bytes,
        due: deadline,
        key,
        deadline,
        valid_for,
    };
    table.live.insert(id, entry);
    approval
}

pub(super) fn decide_in(
    table: &mut Table,
    id: &str,
    approved: bool,
    by: &str,
    reason: Option<String>,
    grant: Option<GrantRequest>,
    now: SystemTime,
) -> Result<(Approval, Option<Grant>), DecideError> {
    let Some(entry) = table.live.get_mut(id) else {
        return match table.settled.iter().find(|a| a.id == id) {
            Some(settled) => Err(DecideError::Settled(Box::new(settled.clone()))),
            None => Err(DecideError::NotFound(id.to_owned())),
        };
    };
    if entry.approval.status != Status::Pending {
        return Err(DecideError::Settled(Box::new(entry.approval.clone())));
    }
    entry.approval.status = if approved {
        Status::Approved
    } else {
        Status::Denied
    };
    entry.approval.decided_by = Some(by.to_owned());
    entry.approval.decision_reason = reason;
    entry.approval.decided_at = Some(rfc3339(now));
    let mut due = None;
    if approved {
        let until = now + entry.valid_for;
        entry.approval.valid_until = Some(rfc3339(until));
        due = Some((std::mem::replace(&mut entry.due, until), until));
    }
    let granted = match grant {
        Some(request) if approved && table.grants.len() < MAX_GRANTS => {
            let grant = grant_of(entry, request, by, now);
            entry.approval.grant_id = Some(grant.id.clone());
            Some(grant)
        }
        _ => None,
    };
    let approval = entry.approval.clone();
    if let Some((old, new)) = due {
        table.due.remove(&(old, id.to_owned()));
        table.due.insert((new, id.to_owned()));
    }
    if let Some(grant) = &granted {
        table.grants.push(grant.clone());
    }
    Ok((approval, granted))
}

/// The grant `request` asks for with the approval of `entry`, given by `by` at `now`.
fn grant_of(entry: &Entry, request: GrantRequest, by: &str, now: SystemTime) -> Grant {
    let until = now + request.window;
    Grant {
        id: crate::store::random_hex(8),
        server: entry.approval.server.clone(),
        tool: entry.approval.tool.clone(),
        scope: request.scope,
        principal: match request.scope {
            Scope::Client => entry.principal.client_key.to_string(),
            Scope::Session => entry.principal.session_key.to_string(),
        },
        arguments_digest: (!request.any_arguments).then(|| entry.approval.arguments_digest.clone()),
        granted_by: by.to_owned(),
        approval_id: entry.approval.id.clone(),
        created_at: rfc3339(now),
        expires_at: rfc3339(until),
        uses: 0,
        until,
    }
}

/// Where approval `id` stands in `table`: live, settled, or never seen (`None`).
pub(super) fn standing_in(table: &Table, id: &str) -> Option<Standing> {
    match table.live.get(id) {
        Some(entry) => Some(standing(entry)),
        None => table
            .settled
            .iter()
            .find(|a| a.id == id)
            .map(|a| Standing::Over(a.status)),
    }
}

pub(super) fn standing(entry: &Entry) -> Standing {
    match entry.approval.status {
        Status::Pending => Standing::Pending(entry.deadline),
        Status::Approved | Status::Denied => Standing::Decided(Verdict {
            approved: entry.approval.status == Status::Approved,
            by: entry.approval.decided_by.clone().unwrap_or_default(),
            reason: entry.approval.decision_reason.clone(),
        }),
        Status::Expired => Standing::Over(Status::Expired),
    }
}

pub(super) fn remove_live(table: &mut Table, id: &str) -> Option<Entry> {
    let entry = table.live.remove(id)?;
    table.by_key.remove(&entry.key);
    table.live_bytes -= entry.bytes;
    table.due.remove(&(entry.due, entry.approval.id.clone()));
    if let Some(n) = table.per_principal.get_mut(&entry.approval.principal) {
        *n -= 1;
        if *n == 0 {
            table.per_principal.remove(&entry.approval.principal);
        }
    }
    if let Some(b) = table.principal_bytes.get_mut(&entry.approval.principal) {
        *b = b.saturating_sub(entry.bytes);
        if *b == 0 {
            table.principal_bytes.remove(&entry.approval.principal);
        }
    }
    Some(entry)
}

/// Settles what is over: pending past the deadline and approved past `valid_until`
/// expire; denied past the deadline stops answering retries. Returns what changed.
pub(super) fn sweep(table: &mut Table, now: SystemTime) -> Vec<Approval> {
    let mut changed = Vec::new();
    while let Some((due, id)) = table.due.first().cloned()
        && due <= now
    {
        match remove_live(table, &id) {
            Some(entry) => {
                let mut approval = entry.approval;
                if approval.status != Status::Denied {
                    approval.status = Status::Expired;
                }
                push_settled(table, approval.clone());
                changed.push(approval);
            }
            None => {
                table.due.remove(&(due, id));
            }
        }
    }
    changed
}

pub(super) fn push_settled(table: &mut Table, mut approval: Approval) {
    preview(&mut approval);
    table.settled.push_front(approval);
    table.settled.truncate(SETTLED_KEPT);
}

/// Replaces arguments larger than [`PREVIEW_BYTES`] of JSON by a preview of them.
pub(super) fn preview(approval: &mut Approval) {
    let text = serde_json::to_string(&approval.arguments).unwrap_or_default();
    if text.len() <= PREVIEW_BYTES {
        return;
    }
    let mut end = PREVIEW_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    approval.arguments = Value::String(format!("{}…", &text[..end]));
    approval.arguments_truncated_from = Some(text.len());
}
