//! Who makes a call, as the store keeps it: the [`Principal`] a held call's
//! context builds once and shares (by `Arc`) with its approval, and the OAuth
//! token's [`Identity`] inside it, which the approval uses to decide the call
//! again against the policy in force when a human approves.

use std::sync::Arc;

/// What a validated OAuth access token says about its bearer.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`: the user (for a client-credentials token, the client itself).
    pub user: Arc<str>,
    /// The OAuth client: `azp`, else `client_id` (else Okta's `cid`).
    pub client_id: Option<Arc<str>>,
    /// `jti`, when the token has one.
    pub jti: Option<Arc<str>>,
    /// `scope` (space-separated) or `scp` (a list, or space-separated).
    pub scopes: Vec<String>,
    /// Every claim, for rules with `when: {claims}`.
    pub claims: tollgate_policy::Claims,
}

/// Who makes a call: the client, the token's user and claims, the session, and
/// the keys its approval and grants are bound to.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The authenticated client (its `clients:` key's name).
    pub client: Option<Arc<str>>,
    /// Whom a valid OAuth access token names, if one was presented.
    pub token: Option<Arc<Identity>>,
    /// Tollgate's session id.
    pub session: Option<Arc<str>>,
    /// Who may retry a held call: `client:<name>` (or the token's user), else
    /// `session:<id>`, else `peer:<address>`.
    pub key: Arc<str>,
    /// Key of the client (`client:<name>`, else `peer:<address>`), for client grants.
    pub client_key: Arc<str>,
    /// Key of the session (`session:<id>`, else the client key), for session grants.
    pub session_key: Arc<str>,
}

impl Principal {
    /// The token's user, if a token was presented.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.token.as_ref().map(|t| &t.user)
    }

    /// The token's OAuth client, if it names one.
    pub fn client_id(&self) -> Option<&Arc<str>> {
        self.token.as_ref().and_then(|t| t.client_id.as_ref())
    }

    /// The token's claims, if a token was presented.
    pub fn claims(&self) -> Option<&tollgate_policy::Claims> {
        self.token.as_ref().map(|t| &t.claims)
    }

    /// The token's scopes (none without a token).
    pub fn scopes(&self) -> &[String] {
        self.token.as_ref().map_or(&[], |t| &t.scopes)
    }
}
