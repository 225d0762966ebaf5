//! The audit log (SPEC §8): one JSON object per line, the decision written before
//! the call is forwarded, then its outcome once the upstream answered.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Where audit records go.
pub struct Audit {
    sink: Option<Mutex<Sink>>,
    include_arguments: bool,
    failures: AtomicU64,
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
        })
    }

    /// Whether records are written anywhere.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Whether arguments are logged in full.
    pub fn includes_arguments(&self) -> bool {
        self.include_arguments
    }

    /// Writes failed so far (counted, logged, never fatal to a call).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Writes one record as a line, with `time` added. The line is handed to the
    /// kernel in one `write` before this returns, so a decision is on record
    /// before its call is forwarded.
    pub fn write(&self, mut record: Value) {
        let Some(sink) = &self.sink else { return };
        if let Value::Object(map) = &mut record {
            map.insert("time".into(), json!(now_rfc3339()));
        }
        let mut line = record.to_string();
        line.push('\n');
        let result = match sink.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::File(file) => file.write_all(line.as_bytes()),
                Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            },
            Err(_) => Err(std::io::Error::other("audit lock poisoned")),
        };
        if let Err(err) = result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %err, "audit log write failed");
        }
    }

    /// Flushes buffered data to disk.
    pub fn flush(&self) {
        if let Some(Ok(mut sink)) = self.sink.as_ref().map(Mutex::lock) {
            let _ = match &mut *sink {
                Sink::File(file) => file.sync_data(),
                Sink::Stdout => std::io::stdout().flush(),
            };
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

    #[test]
    fn appends_one_line_per_record() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let audit = Audit::open(path.to_str().unwrap(), false).unwrap();
        audit.write(json!({"tool": "a", "decision": "allow"}));
        audit.write(json!({"tool": "b", "decision": "deny"}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["decision"], "deny");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn digests_are_stable() {
        assert_eq!(digest(&json!({"a": 1})), digest(&json!({"a": 1})));
        assert_ne!(digest(&json!({"a": 1})), digest(&json!({"a": 2})));
        assert!(digest(&json!(null)).starts_with("sha256:"));
    }
}
