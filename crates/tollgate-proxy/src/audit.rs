//! The audit log (docs/audit.md): one JSON object per line, the decision written before
//! the call is forwarded, then its outcome once the upstream answered.
//!
//! Every call has a UUIDv7 `call_id` and every record the `run` id of the process
//! that wrote it, so records appended to one file by many runs never share an id.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::OnAuditFailure;

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

/// A record as written: the record, its time, and the run that wrote it.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    record: &'a Record<'a>,
    time: String,
    run: &'a str,
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
    // Written digit by digit: one per call, so no formatting machinery.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// This process's run id, on every record it writes.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(uuid_v7)
}

/// Where audit records go.
pub struct Audit {
    sink: Option<Mutex<Sink>>,
    include_arguments: bool,
    failures: AtomicU64,
    on_failure: OnAuditFailure,
}

enum Sink {
    File(File),
    Stdout,
}

/// The audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit log `{path}`: {source}")]
pub struct AuditOpenError {
    path: String,
    source: std::io::Error,
}

impl Audit {
    /// No audit log.
    pub fn disabled() -> Audit {
        Audit {
            sink: None,
            include_arguments: false,
            failures: AtomicU64::new(0),
            on_failure: OnAuditFailure::default(),
        }
    }

    /// Appends to `path` (`-` is stdout).
    pub fn open(path: &str, include_arguments: bool) -> Result<Audit, AuditOpenError> {
        let sink = if path == "-" {
            Sink::Stdout
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(path))
                .map_err(|source| AuditOpenError {
                    path: path.to_owned(),
                    source,
                })?;
            Sink::File(file)
        };
        Ok(Audit {
            sink: Some(Mutex::new(sink)),
            include_arguments,
            failures: AtomicU64::new(0),
            on_failure: OnAuditFailure::default(),
        })
    }

    /// What becomes of a call whose decision cannot be written (`audit.on_failure`).
    pub fn on_failure(mut self, on_failure: OnAuditFailure) -> Audit {
        self.on_failure = on_failure;
        self
    }

    /// Whether a call whose decision could not be written must be refused.
    pub fn refuses_unrecorded(&self) -> bool {
        self.enabled() && self.on_failure == OnAuditFailure::Refuse
    }

    /// Whether records are written anywhere.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Whether arguments are logged in full.
    pub fn includes_arguments(&self) -> bool {
        self.include_arguments
    }

    /// Writes failed so far (counted and logged; a call whose decision was not
    /// written is refused unless `audit.on_failure: continue`).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Writes one record as a line, with `time` and `run` added. The line is handed to the
    /// kernel in one `write` before this returns, so a decision is on record
    /// before its call is forwarded. Returns whether it was written (`true` when
    /// there is no audit log).
    pub fn write(&self, record: &Record<'_>) -> bool {
        let Some(sink) = &self.sink else { return true };
        let line = Line {
            record,
            time: now_rfc3339(),
            run: run_id(),
        };
        let mut line = match serde_json::to_vec(&line) {
            Ok(line) => line,
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, "audit record could not be serialised");
                return false;
            }
        };
        line.push(b'\n');
        let result = match &mut *sink.lock() {
            Sink::File(file) => file.write_all(&line),
            Sink::Stdout => std::io::stdout().lock().write_all(&line),
        };
        match result {
            Ok(()) => true,
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, "audit log write failed");
                false
            }
        }
    }

    /// Flushes buffered data to disk.
    pub fn flush(&self) {
        if let Some(sink) = &self.sink {
            let flushed = match &mut *sink.lock() {
                Sink::File(file) => file.sync_data(),
                Sink::Stdout => std::io::stdout().flush(),
            };
            if let Err(err) = flushed {
                tracing::warn!(error = %err, "the audit log could not be flushed");
            }
        }
    }
}

/// Current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `sha256:<hex>` of a text.
pub fn text_digest(text: &str) -> String {
    hex_digest(text.as_bytes())
}

fn hex_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// `sha256:<hex>` of the arguments' JSON text, so a record can be matched to a call
/// without storing what may be sensitive.
pub fn digest(arguments: &Value) -> String {
    hex_digest(&serde_json::to_vec(arguments).unwrap_or_default())
}

/// `sha256:<hex>` of the arguments as canonical JSON (keys sorted at every level, no
/// spaces; a missing `arguments` is `{}`), so the same call sent with its keys in
/// another order has the same digest. What a retry must match to redeem an approval.
pub fn canonical_digest(arguments: &Value) -> String {
    fn write(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push(b'{');
                for (i, (key, value)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    // Writing a string to a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut *out, key);
                    out.push(b':');
                    write(value, out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => {
                let _ = serde_json::to_writer(&mut *out, scalar);
            }
        }
    }
    let mut out = Vec::new();
    match arguments {
        Value::Null => out.extend_from_slice(b"{}"),
        value => write(value, &mut out),
    }
    hex_digest(&out)
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
    fn appends_one_line_per_record() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let audit = Audit::open(path.to_str().unwrap(), false).unwrap();
        let outcome = |tool, outcome, code| Record::Outcome {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            server: "s",
            tool,
            upstream_latency_ms: 1.0,
            outcome,
            code,
        };
        audit.write(&outcome("a", "ok", None));
        audit.write(&outcome("b", "rpc_error", Some(-32602)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["event"], "outcome");
        assert_eq!(lines[1]["outcome"], "rpc_error");
        assert_eq!(lines[1]["code"], -32602);
        assert!(lines[0].get("code").is_none(), "{}", lines[0]);
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[0]["run"], lines[1]["run"]);
        assert_eq!(lines[0]["run"].as_str().unwrap().len(), 36);
        std::fs::remove_dir_all(dir).unwrap();
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
    fn a_write_that_fails_says_so() {
        let audit = Audit::open("/dev/full", false).unwrap();
        let record = Record::Outcome {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            server: "s",
            tool: "t",
            upstream_latency_ms: 1.0,
            outcome: "forwarded",
            code: None,
        };
        assert!(!audit.write(&record));
        assert_eq!(audit.failures(), 1);
        assert!(audit.refuses_unrecorded());
        let lenient = Audit::open("/dev/full", false)
            .unwrap()
            .on_failure(OnAuditFailure::Continue);
        assert!(!lenient.refuses_unrecorded());
        assert!(Audit::disabled().write(&record));
    }

    #[test]
    fn digests_are_stable() {
        assert_eq!(digest(&json!({"a": 1})), digest(&json!({"a": 1})));
        assert_ne!(digest(&json!({"a": 1})), digest(&json!({"a": 2})));
        assert!(digest(&json!(null)).starts_with("sha256:"));
    }
}
