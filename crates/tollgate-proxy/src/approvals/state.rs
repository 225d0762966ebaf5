//! The `requestState` of Tollgate's own `InputRequiredResult`s (MCP 2026-07-28,
//! multi round-trip requests). It passes through the client, so it is
//! attacker-controlled: it carries what the retry must match (the approval, the
//! principal, the server, tool and arguments digest) and an expiry, under an
//! HMAC-SHA256 with a key Tollgate generates at start (or reads from
//! `approvals.state_key`, for replicas that share approvals). Anything that fails
//! the check is refused, never forwarded.
//!
//! Wire form: `tollgate1.<base64url(JSON payload)>.<base64url(HMAC)>`. The prefix
//! tells Tollgate's state from an upstream's own, which is passed through.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The prefix of Tollgate's `requestState`.
pub const PREFIX: &str = "tollgate1.";

/// What a `requestState` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An approval in the queue; `id` is the approval's id.
    Queue,
    /// A question to the client's own user (form elicitation); `id` is used once.
    Elicit,
}

/// The protected contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Queue or elicitation.
    pub kind: Kind,
    /// The approval's id, or the question's one-use id.
    pub id: String,
    /// Who may present it.
    pub principal: String,
    /// The server.
    pub server: String,
    /// The tool.
    pub tool: String,
    /// The arguments digest (canonical JSON).
    pub digest: String,
    /// Unix seconds after which it is refused.
    pub expires: u64,
}

/// Why a `requestState` was refused; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not one Tollgate issued, or altered.
    #[error(
        "requestState was not issued by this Tollgate or was altered; call the tool again without requestState"
    )]
    Forged,
    /// Past its expiry.
    #[error("requestState has expired; call the tool again without requestState")]
    Expired,
    /// Issued to another client or session.
    #[error("requestState was issued to another client or session and cannot be used by this one")]
    OtherPrincipal,
    /// Already used (a question's answer counts once).
    #[error("requestState was already used; call the tool again without requestState")]
    Used,
    /// Issued for another call.
    #[error(
        "requestState was issued for another call (server, tool or arguments differ); retry the original call unchanged, or call again without requestState"
    )]
    OtherCall,
}

/// The key that seals and checks states (kept keyed, cloned per use).
pub struct StateKey(Hmac<Sha256>);

/// A key HMAC refused (it takes any length, so this does not happen).
pub type InvalidKey = hmac::digest::InvalidLength;

impl StateKey {
    /// A fresh random key (states then do not survive a restart).
    pub fn generate() -> Result<StateKey, InvalidKey> {
        StateKey::from_secret(&crate::store::random_hex(32))
    }

    /// A key from configuration (`approvals.state_key`).
    pub fn from_secret(secret: &str) -> Result<StateKey, InvalidKey> {
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map(StateKey)
    }

    fn mac(&self) -> Hmac<Sha256> {
        self.0.clone()
    }

    /// Seals claims into a `requestState`.
    pub fn seal(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{PREFIX}{payload}.{tag}")
    }

    /// Checks a `requestState` of Tollgate's against the call presenting it.
    pub fn open(&self, state: &str, expected: &Expected<'_>) -> Result<Claims, StateError> {
        let rest = state.strip_prefix(PREFIX).ok_or(StateError::Forged)?;
        let (payload, tag) = rest.split_once('.').ok_or(StateError::Forged)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Forged)?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| StateError::Forged)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or(StateError::Forged)?;
        if unix_now() >= claims.expires {
            return Err(StateError::Expired);
        }
        if claims.principal != expected.principal {
            return Err(StateError::OtherPrincipal);
        }
        if claims.server != expected.server
            || claims.tool != expected.tool
            || claims.digest != expected.digest
        {
            return Err(StateError::OtherCall);
        }
        Ok(claims)
    }
}

/// What the presenting call is.
pub struct Expected<'a> {
    /// Its principal.
    pub principal: &'a str,
    /// Its server.
    pub server: &'a str,
    /// Its tool.
    pub tool: &'a str,
    /// Its arguments digest.
    pub digest: &'a str,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds of a time (rounded up, so a state never outlives what it stands for by less).
pub fn unix_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// Unix seconds `after` from now.
pub fn unix_after(after: Duration) -> u64 {
    unix_of(SystemTime::now() + after)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims() -> Claims {
        Claims {
            kind: Kind::Queue,
            id: "abc".into(),
            principal: "client:alice".into(),
            server: "s".into(),
            tool: "t".into(),
            digest: "sha256:00".into(),
            expires: unix_now() + 60,
        }
    }

    fn expected() -> Expected<'static> {
        Expected {
            principal: "client:alice",
            server: "s",
            tool: "t",
            digest: "sha256:00",
        }
    }

    #[test]
    fn a_sealed_state_opens_only_unchanged_for_its_own_call() {
        let key = StateKey::generate().unwrap();
        let state = key.seal(&claims());
        assert!(state.starts_with(PREFIX));
        assert_eq!(key.open(&state, &expected()).unwrap(), claims());
        // Another key (another process without a shared key), a flipped byte, junk.
        assert_eq!(
            StateKey::generate().unwrap().open(&state, &expected()),
            Err(StateError::Forged)
        );
        let mut bytes = state.clone().into_bytes();
        let at = PREFIX.len() + 3;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(key.open(&tampered, &expected()), Err(StateError::Forged));
        for junk in ["", "tollgate1.", "tollgate1.x.y", "other", "tollgate1..."] {
            assert_eq!(
                key.open(junk, &expected()),
                Err(StateError::Forged),
                "{junk}"
            );
        }
        // A state with valid MAC but another payload: re-signed claims only by the key.
        let mut other = claims();
        other.principal = "client:bob".into();
        assert_eq!(
            key.open(&key.seal(&other), &expected()),
            Err(StateError::OtherPrincipal)
        );
        let mut other = claims();
        other.digest = "sha256:11".into();
        assert_eq!(
            key.open(&key.seal(&other), &expected()),
            Err(StateError::OtherCall)
        );
        let mut old = claims();
        old.expires = unix_now() - 1;
        assert_eq!(
            key.open(&key.seal(&old), &expected()),
            Err(StateError::Expired)
        );
        let shared = StateKey::from_secret("a shared secret of replicas").unwrap();
        let again = StateKey::from_secret("a shared secret of replicas").unwrap();
        assert!(again.open(&shared.seal(&claims()), &expected()).is_ok());
    }
}
