//! `approvals.webhook`: tell a chat room or pager that a call waits for a human.
//! Delivery runs in the background with bounded retries, so a slow or dead
//! receiver never delays the call path.

use std::time::Duration;

use serde_json::json;

use crate::state::Shared;

const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends the webhook for a new pending approval, if one is configured.
pub fn notify(app: &std::sync::Arc<Shared>, approval_id: &str) {
    let (Some(url), Some(approval)) = (
        app.notify().webhook().cloned(),
        app.approvals.get(approval_id),
    ) else {
        return;
    };
    let admin = app.notify().admin_url().unwrap_or_default();
    let body = json!({
        "type": "approval.pending",
        "approval": approval,
        "approve_url": format!("{admin}/approvals/{approval_id}/approve"),
        "deny_url": format!("{admin}/approvals/{approval_id}/deny"),
        "page_url": format!("{admin}/"),
    });
    let app = app.clone();
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let result = app
                .notify()
                .http()
                .post(url.clone())
                .timeout(ATTEMPT_TIMEOUT)
                .json(&body)
                .send()
                .await;
            match result {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    tracing::warn!(status = %response.status(), attempt, "approval webhook refused")
                }
                Err(err) => tracing::warn!(error = %err, attempt, "approval webhook failed"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        app.notify().failed();
        tracing::error!(url = %url, "approval webhook gave up after {ATTEMPTS} attempts");
    });
}
