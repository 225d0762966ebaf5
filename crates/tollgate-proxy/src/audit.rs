//! The audit log (docs/audit.md): one JSON object per line, the decision written before
//! the call is forwarded, then its outcome once the upstream answered.
//!
//! Every call has a UUIDv7 `call_id` and every record the `run` id of the process
//! that wrote it, so records appended to one file by many runs never share an id.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

mod writer;

pub use writer::{Audit, AuditOpenError};

/// One audit record. Every record a call produces is a variant here, so the
/// format is written down once (docs/architecture.md lists it).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record<'a> {
    /// A `tools/call` was evaluated; written before it is forwarded.
    Decision {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The server.
        server: &'a str,
        /// The authenticated client.
        client: Option<&'a str>,
        /// The caller's address: the peer's, or behind `trusted_proxies` the client's
        /// as its load balancer told it.
        client_address: std::net::IpAddr,
        /// The OAuth token's user (`sub`).
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// The OAuth token's client (`azp` / `client_id`).
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        /// The OAuth token's id (`jti`).
        #[serde(skip_serializing_if = "Option::is_none")]
        jti: Option<&'a str>,
        /// Tollgate's session id.
        session: Option<&'a str>,
        /// The tool.
        tool: &'a str,
        /// `allow`, `deny` or `require_approval`.
        decision: &'a str,
        /// Why it was refused, when it was.
        kind: Option<&'a str>,
        /// The deciding rule, or `default`.
        rule: &'a str,
        /// The rule's reason.
        reason: &'a str,
        /// `enforce` or `audit`.
        mode: &'a str,
        /// `sha256:<hex>` of the arguments.
        arguments_digest: String,
        /// The arguments themselves, with `audit.arguments: true`.
        #[serde(skip_serializing_if = "Option::is_none")]
        arguments: Option<&'a Value>,
        /// The argument that failed the rule's schema.
        #[serde(skip_serializing_if = "Option::is_none")]
        failing_path: Option<&'a str>,
    },
    /// What became of a call that was let through.
    Outcome {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// Time until the upstream's answer began.
        upstream_latency_ms: f64,
        /// What the upstream answered: `ok`, `tool_error` (a result with `isError: true`),
        /// `rpc_error`; or why there is no answer: `upstream_error`, `upstream_unreachable`,
        /// `upstream_timeout`, … (docs/architecture.md lists them all).
        outcome: &'a str,
        /// The JSON-RPC error's `code`, with `rpc_error`.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<i64>,
        /// What the policy's `results` rules found in the result, by detector and count
        /// (never the matched text).
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        redactions: &'a [tollgate_policy::Redaction],
    },
    /// A call was held for a human.
    ApprovalRequested {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The approval's id.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// `queue` or `elicitation`.
        via: &'a str,
    },
    /// A held call was settled.
    Approval {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The approval's id.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// `approved`, `denied` or `expired`.
        verdict: &'a str,
        /// Who decided.
        decided_by: Option<&'a str>,
        /// The approver's reason.
        reason: Option<&'a str>,
    },
    /// A held call's request stopped waiting: the client was told to retry.
    ApprovalPending {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The approval's id.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// When the approval expires (RFC 3339).
        expires_at: &'a str,
    },
    /// A retry used an approved approval up: the call is forwarded.
    ApprovalRedeemed {
        /// The retry's id (a UUIDv7).
        call_id: &'a str,
        /// The approval's id.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// Who approved.
        decided_by: &'a str,
    },
    /// An approver granted a tool's calls for a window.
    GrantCreated {
        /// The grant's id.
        grant_id: &'a str,
        /// The approval it came with.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// `client` or `session`.
        scope: &'a str,
        /// The client's or session's key.
        principal: &'a str,
        /// Whether any arguments pass, not only the approved call's.
        any_arguments: bool,
        /// Who granted it.
        granted_by: &'a str,
        /// When it ends (RFC 3339).
        expires_at: &'a str,
    },
    /// A grant let a call through.
    GrantUsed {
        /// The call's id (a UUIDv7).
        call_id: &'a str,
        /// The grant's id.
        grant_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// Who granted it.
        granted_by: &'a str,
    },
    /// A tool's definition, as the upstream advertised it, differs from the tool lock
    /// (or the lock does not name the tool); written once per server, tool and digest.
    ToolChanged {
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// The locked digest; `None` when the lock does not name the tool.
        locked: Option<&'a str>,
        /// The digest of the definition the upstream advertised.
        seen: &'a str,
        /// `refuse` (hidden, calls refused) or `warn` (let through).
        on_tool_change: &'a str,
    },
    /// A grant was ended before its time.
    GrantRevoked {
        /// The grant's id.
        grant_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// Who ended it.
        revoked_by: &'a str,
    },
}

impl Record<'_> {
    /// The approval a record is about, if any.
    pub fn approval_id(&self) -> Option<&str> {
        match self {
            Record::ApprovalRequested { approval_id, .. }
            | Record::Approval { approval_id, .. }
            | Record::ApprovalPending { approval_id, .. }
            | Record::ApprovalRedeemed { approval_id, .. }
            | Record::GrantCreated { approval_id, .. } => Some(approval_id),
            _ => None,
        }
    }
}

/// A fresh UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits, so
/// ids sort by time and never repeat across runs.
pub fn uuid_v7() -> String {
    use rand::RngCore as _;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes[6..]);
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70 | (bytes[6] & 0x0f);
    bytes[8] = 0x80 | (bytes[8] & 0x3f);
    let mut out = String::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        push_hex(&mut out, *byte);
    }
    out
}

/// Two lowercase hex digits, written without the formatting machinery: ids and
/// digests are built on every call.
fn push_hex(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

/// This process's run id, on every record it writes.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(uuid_v7)
}

/// Current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `sha256:<hex>` of a text.
pub fn text_digest(text: &str) -> String {
    hex_digest(text.as_bytes())
}

/// `sha256:<hex>` of bytes.
pub fn hex_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        push_hex(&mut out, byte);
    }
    out
}

/// `sha256:<hex>` of the arguments' JSON text, so a record can be matched to a call
/// without storing what may be sensitive.
pub fn digest(arguments: &Value) -> String {
    hex_digest(&serde_json::to_vec(arguments).unwrap_or_default())
}

/// `value` as RFC 8785 (JCS) canonical JSON: keys sorted (by UTF-16 code units) at
/// every level, no spaces, numbers and strings in one spelling. What every digest of
/// JSON that must not depend on how it was written is taken over.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    // A `Value` holds only finite numbers and string keys, which JCS always writes.
    serde_jcs::to_vec(value).unwrap_or_default()
}

/// `sha256:<hex>` of the arguments as canonical JSON ([`canonical_json`]; a missing
/// `arguments` is `{}`), so the same call sent with its keys in another order has the
/// same digest. What a retry must match to redeem an approval. For arguments of
/// strings, integers, booleans and nulls it is the digest Tollgate took before it
/// used RFC 8785 (keys sorted, no spaces), so tickets issued then still match.
pub fn canonical_digest(arguments: &Value) -> String {
    match arguments {
        Value::Null => hex_digest(b"{}"),
        value => hex_digest(&canonical_json(value)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_canonical_digest_ignores_key_order_and_nothing_else() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": "é"}], "a": null}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":null,"b":[1,{"x":"é","y":2}]}"#).unwrap();
        assert_eq!(canonical_digest(&a), canonical_digest(&b));
        assert_eq!(canonical_digest(&Value::Null), canonical_digest(&json!({})));
        assert_eq!(
            canonical_digest(&json!({"a": 1})),
            text_digest(r#"{"a":1}"#)
        );
        // RFC 8785: numbers in their shortest form, keys by UTF-16 code units.
        assert_eq!(
            canonical_digest(&json!({"n": 1.0, "m": 1e21, "s": "\u{7f}\n"})),
            text_digest("{\"m\":1e+21,\"n\":1,\"s\":\"\u{7f}\\n\"}")
        );
        assert_eq!(
            canonical_json(&json!({"\u{ff61}": 1, "\u{1f600}": 2})),
            "{\"\u{1f600}\":2,\"\u{ff61}\":1}".as_bytes()
        );
        // Tickets issued before RFC 8785 (keys sorted, no spaces) still match.
        assert_eq!(
            canonical_digest(
                &json!({"path": "/tmp/x", "n": [1, -2, null, true], "é": {"z": "\"q\""}})
            ),
            text_digest(r#"{"n":[1,-2,null,true],"path":"/tmp/x","é":{"z":"\"q\""}}"#)
        );
        for other in [
            json!({"a": 2}),
            json!({"a": "1"}),
            json!({"A": 1}),
            json!([1]),
        ] {
            assert_ne!(canonical_digest(&json!({"a": 1})), canonical_digest(&other));
        }
    }

    #[test]
    fn call_ids_are_version_7_uuids_that_differ() {
        let (a, b) = (uuid_v7(), uuid_v7());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert!(a[..13] <= b[..13], "time-ordered: {a} {b}");
    }

    #[test]
    fn digests_are_known_sha256() {
        assert_eq!(
            text_digest(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digests_are_stable() {
        assert_eq!(digest(&json!({"a": 1})), digest(&json!({"a": 1})));
        assert_ne!(digest(&json!({"a": 1})), digest(&json!({"a": 2})));
        assert!(digest(&json!(null)).starts_with("sha256:"));
    }
}
