//! What the CLI's dry runs (`explain`, `test`, `diff`) do as the proxy does: the key
//! of `per: user` limits, and what an active grant does to a decision.

use serde_json::Value;
use tollgate_policy::Action;

/// The key of `per: user` limits, as the proxy forms it: the token's `sub`, else
/// the client, else one shared key.
pub fn user_key(claims: Option<&tollgate_policy::Claims>, client: Option<&str>) -> String {
    match (
        claims.and_then(|c| c.get("sub")).and_then(Value::as_str),
        client,
    ) {
        (Some(sub), _) => format!("user:{sub}"),
        (None, Some(client)) => format!("client:{client}"),
        (None, None) => "default".to_owned(),
    }
}

/// What an active grant does to a decision: a call that would be held for a human
/// passes without asking, as the proxy lets it through; every other decision stands
/// (a grant never lets through what a rule or its argument schema denies).
pub fn apply_grant(decision: &mut tollgate_policy::Decision) {
    if decision.action == Action::RequireApproval {
        decision.action = Action::Allow;
        decision.approval = None;
        decision.reason = format!(
            "an active grant lets `{}` through without asking (the rule says: {})",
            decision.tool, decision.reason
        );
    }
}
