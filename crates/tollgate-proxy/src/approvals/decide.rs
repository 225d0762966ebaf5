//! A person's decision on an approval, and the grants that come with it. An
//! approval is checked again against the policy in force at that moment: a reload
//! since the call was held may now deny it (or its arguments), and then the
//! approval becomes a refusal that says so. Every decision, grant and revocation
//! is written to the audit log with the approver's name.

use tollgate_policy::{Action, ToolCall};

use crate::audit::Record;
use crate::state::Shared;
use crate::store::approvals::{
    Approval, DecideError, Grant, GrantRequest, Principal, Scope, Status,
};

/// What a decision did.
#[derive(Debug)]
pub enum Decided {
    /// As the person decided; with the grant, if one was given.
    AsAsked(Approval, Option<Box<Grant>>),
    /// Approved, but the policy in force now refuses the call: denied instead.
    PolicyChanged(Approval),
}

/// Approves or denies approval `id` as `by`.
pub async fn decide(
    shared: &Shared,
    id: &str,
    approved: bool,
    by: &str,
    reason: Option<String>,
    grant: Option<GrantRequest>,
) -> Result<Decided, DecideError> {
    let refusal = if approved {
        let current = shared
            .approvals
            .get(id)
            .ok_or_else(|| DecideError::NotFound(id.to_owned()))?;
        if current.status != Status::Pending {
            return Err(DecideError::Settled(Box::new(current)));
        }
        // Held here: decided again with its caller's claims. (One another replica holds
        // is not: its caller's token stays there.)
        shared
            .approvals
            .held_call(id)
            .and_then(|(approval, principal)| refused_now(shared, &approval, &principal))
    } else {
        None
    };
    let decided = match refusal {
        Some(why) => {
            let reason = format!(
                "the policy changed since the call was held and now refuses it ({why}); {by}'s approval was not applied"
            );
            tracing::warn!(approval = %id, %reason, "approval refused by the policy in force");
            let (approval, _) = shared
                .approvals
                .decide(id, false, by, Some(reason), None)
                .await?;
            Decided::PolicyChanged(approval)
        }
        None => {
            let (approval, grant) = shared
                .approvals
                .decide(id, approved, by, reason, grant)
                .await?;
            Decided::AsAsked(approval, grant.map(Box::new))
        }
    };
    audit(shared, &decided, by);
    Ok(decided)
}

/// Writes a decision (and the grant it gave) to the audit log.
fn audit(shared: &Shared, decided: &Decided, by: &str) {
    let (Decided::AsAsked(approval, _) | Decided::PolicyChanged(approval)) = decided;
    shared.audit.write(&Record::Approval {
        call_id: &approval.call_id,
        approval_id: &approval.id,
        server: &approval.server,
        tool: &approval.tool,
        verdict: if approval.status == Status::Approved {
            "approved"
        } else {
            "denied"
        },
        decided_by: Some(by),
        reason: approval.decision_reason.as_deref(),
    });
    tracing::info!(approval = %approval.id, status = ?approval.status, by, "approval decided");
    if let Decided::AsAsked(_, Some(grant)) = decided {
        shared.audit.write(&Record::GrantCreated {
            grant_id: &grant.id,
            approval_id: &grant.approval_id,
            server: &grant.server,
            tool: &grant.tool,
            scope: match grant.scope {
                Scope::Client => "client",
                Scope::Session => "session",
            },
            principal: &grant.principal,
            any_arguments: grant.arguments_digest.is_none(),
            granted_by: &grant.granted_by,
            expires_at: &grant.expires_at,
        });
    }
}

/// Why the policy in force refuses the held call now, if it does.
fn refused_now(shared: &Shared, approval: &Approval, principal: &Principal) -> Option<String> {
    let Some(server) = shared.upstreams().get(&approval.server) else {
        return Some(format!("server `{}` is gone", approval.server));
    };
    // A call whose client went away keeps only a preview of its arguments; its
    // retry carries them again and is evaluated against the policy in full then.
    if approval.arguments_truncated_from.is_some() && approval.status == Status::Pending {
        return None;
    }
    let policy = server.policy.load_full();
    let decision = policy.evaluate(&ToolCall {
        tool: &approval.tool,
        arguments: &approval.arguments,
        client: approval.client.as_deref(),
        // Rate limits were counted when the call arrived; only the rules matter here.
        session_key: "",
        client_key: "",
        user_key: "",
        claims: principal.claims(),
        scopes: principal.scopes(),
    });
    (decision.action == Action::Deny).then_some(decision.reason)
}

/// Ends grant `id` at once, as `by` (given on any replica, with a shared backend).
pub async fn revoke(
    shared: &Shared,
    id: &str,
    by: &str,
) -> Result<Option<Grant>, crate::store::remote::Unavailable> {
    let Some(grant) = shared.approvals.revoke(id).await? else {
        return Ok(None);
    };
    shared.audit.write(&Record::GrantRevoked {
        grant_id: &grant.id,
        server: &grant.server,
        tool: &grant.tool,
        revoked_by: by,
    });
    tracing::info!(grant = %id, by, "grant revoked");
    Ok(Some(grant))
}
