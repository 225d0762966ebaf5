//! Grants in the shared Redis: one hash of every replica's grants (as JSON, by id)
//! and one of their uses, so that a grant given on one replica lets the calls
//! through on all, and a revocation anywhere ends it everywhere.

use std::collections::HashMap;
use std::time::SystemTime;

use super::super::record::{Grant, MAX_GRANTS};
use super::{Approvals, parse_time};
use crate::store::remote::Unavailable;

impl Approvals {
    /// A grant given on any replica that lets this call through, its use counted.
    pub(super) async fn grant_for(
        &self,
        server: &str,
        tool: &str,
        client_key: &str,
        session_key: &str,
        digest: &str,
    ) -> Result<Option<Grant>, Unavailable> {
        // Redis is where grants are (and are revoked).
        let remote = &self.remote;
        let mut conn = remote.connection();
        let all: Vec<String> = remote
            .run(
                redis::cmd("HVALS")
                    .arg(remote.key(&["approvals", "grants"]))
                    .query_async(&mut conn),
            )
            .await?;
        let now = SystemTime::now();
        let mut over = Vec::new();
        let mut found = None;
        for text in all {
            let Ok(mut grant) = serde_json::from_str::<Grant>(&text) else {
                continue;
            };
            grant.until = parse_time(Some(&grant.expires_at)).unwrap_or(now);
            if grant.until <= now {
                over.push(grant.id);
                continue;
            }
            if found.is_none() && grant.matches(server, tool, client_key, session_key, digest) {
                found = Some(grant);
            }
        }
        if !over.is_empty() {
            let _ = remote
                .run(
                    redis::pipe()
                        .cmd("HDEL")
                        .arg(remote.key(&["approvals", "grants"]))
                        .arg(&over)
                        .ignore()
                        .cmd("HDEL")
                        .arg(remote.key(&["approvals", "grant-uses"]))
                        .arg(&over)
                        .ignore()
                        .query_async::<()>(&mut conn),
                )
                .await;
        }
        if let Some(grant) = &mut found {
            grant.uses = remote
                .run(
                    redis::cmd("HINCRBY")
                        .arg(remote.key(&["approvals", "grant-uses"]))
                        .arg(&grant.id)
                        .arg(1)
                        .query_async::<u64>(&mut conn),
                )
                .await?;
        }
        Ok(found)
    }

    /// Every replica's active grants (this replica's alone while Redis cannot be
    /// reached), newest first.
    pub(super) async fn all_grants(&self) -> Vec<Grant> {
        let mut all = Vec::new();
        let remote = &self.remote;
        let mut conn = remote.connection();
        let (texts, uses): (Vec<String>, HashMap<String, u64>) = remote
            .run(
                redis::pipe()
                    .cmd("HVALS")
                    .arg(remote.key(&["approvals", "grants"]))
                    .cmd("HGETALL")
                    .arg(remote.key(&["approvals", "grant-uses"]))
                    .query_async(&mut conn),
            )
            .await
            .unwrap_or_else(|_| {
                all = self.local.grants();
                (Vec::new(), HashMap::new())
            });
        let now = SystemTime::now();
        for text in texts.into_iter().take(MAX_GRANTS) {
            let Ok(mut grant) = serde_json::from_str::<Grant>(&text) else {
                continue;
            };
            grant.until = parse_time(Some(&grant.expires_at)).unwrap_or(now);
            grant.uses = uses.get(&grant.id).copied().unwrap_or(0);
            if grant.until > now && !all.iter().any(|g| g.id == grant.id) {
                all.push(grant);
            }
        }
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        all
    }

    /// Ends a grant given on any replica.
    pub(super) async fn end_grant(&self, id: &str) -> Result<Option<Grant>, Unavailable> {
        let local = self.local.revoke(id);
        let remote = &self.remote;
        let mut conn = remote.connection();
        let name = remote.key(&["approvals", "grants"]);
        let text: Option<String> = remote
            .run(redis::cmd("HGET").arg(&name).arg(id).query_async(&mut conn))
            .await?;
        remote
            .run(
                redis::pipe()
                    .cmd("HDEL")
                    .arg(&name)
                    .arg(id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(remote.key(&["approvals", "grant-uses"]))
                    .arg(id)
                    .ignore()
                    .query_async::<()>(&mut conn),
            )
            .await?;
        Ok(local.or_else(|| text.and_then(|t| serde_json::from_str(&t).ok())))
    }
}
