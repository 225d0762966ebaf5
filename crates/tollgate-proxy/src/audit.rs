//! The audit log (SPEC §8): one JSON object per line, the decision written before
//! the call is forwarded, then its outcome once the upstream answered.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

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
        /// The call's id in this log.
        call_id: u64,
        /// The server.
        server: &'a str,
        /// The authenticated client.
        client: Option<&'a str>,
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
        /// The call's id in this log.
        call_id: u64,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// Time until the upstream's answer began.
        upstream_latency_ms: f64,
        /// `forwarded`, `upstream_error`, `upstream_unreachable`, `upstream_timeout`, …
        outcome: &'a str,
    },
    /// A call was held for a human.
    ApprovalRequested {
        /// The call's id in this log.
        call_id: u64,
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
        /// The call's id in this log.
        call_id: u64,
        /// The approval's id.
        approval_id: &'a str,
        /// The server.
        server: &'a str,
        /// The tool.
        tool: &'a str,
        /// `approved`, `denied`, `expired` or `abandoned`.
        verdict: &'a str,
        /// Who decided.
        decided_by: Option<&'a str>,
        /// The approver's reason.
        reason: Option<&'a str>,
    },
}

/// A record as written: the record and its time.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    record: &'a Record<'a>,
    time: String,
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

    /// Writes one record as a line, with `time` added. The line is handed to the
    /// kernel in one `write` before this returns, so a decision is on record
    /// before its call is forwarded. Returns whether it was written (`true` when
    /// there is no audit log).
    pub fn write(&self, record: &Record<'_>) -> bool {
        let Some(sink) = &self.sink else { return true };
        let line = Line {
            record,
            time: now_rfc3339(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn appends_one_line_per_record() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let audit = Audit::open(path.to_str().unwrap(), false).unwrap();
        let outcome = |tool, outcome| Record::Outcome {
            call_id: 1,
            server: "s",
            tool,
            upstream_latency_ms: 1.0,
            outcome,
        };
        audit.write(&outcome("a", "forwarded"));
        audit.write(&outcome("b", "upstream_error"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["event"], "outcome");
        assert_eq!(lines[1]["outcome"], "upstream_error");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_write_that_fails_says_so() {
        let audit = Audit::open("/dev/full", false).unwrap();
        let record = Record::Outcome {
            call_id: 1,
            server: "s",
            tool: "t",
            upstream_latency_ms: 1.0,
            outcome: "forwarded",
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
