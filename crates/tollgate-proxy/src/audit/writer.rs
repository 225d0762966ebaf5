//! Writing the audit log: a record is one line, handed to the kernel in one `write`
//! with whatever records wait to share it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Record, now_rfc3339, run_id};
use crate::config::OnAuditFailure;

/// Where audit records go.
pub struct Audit {
    sink: Option<Arc<Mutex<Sink>>>,
    include_arguments: bool,
    failures: Arc<AtomicU64>,
    on_failure: OnAuditFailure,
}

/// The audit log and the records that may wait for the next write ([`Audit::write_soon`],
/// [`Audit::write_together`]).
struct Sink {
    out: Out,
    pending: Vec<u8>,
    /// Told whether `pending` was written, for the callers of [`Audit::write_together`]
    /// whose records are in it, with the thread (lane) whose task will write it.
    waiting: Option<(std::thread::ThreadId, Arc<Written>)>,
    /// Whether a task will write what waits within [`SOON`].
    timer_armed: bool,
    /// `write`s made, for tests.
    writes: u64,
}

/// Whether a group of records was written: `None` until it has been tried.
type Written = tokio::sync::watch::Sender<Option<bool>>;

enum Out {
    File(File),
    Stdout,
}

/// How long a record written with [`Audit::write_soon`] waits at most for another
/// record to share its `write`.
const SOON: std::time::Duration = std::time::Duration::from_millis(50);

/// How many bytes of such records wait at most.
const MAX_PENDING: usize = 64 * 1024;

impl Sink {
    /// Writes what is pending and then `line`, in one `write`.
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let result = if self.pending.is_empty() {
            if line.is_empty() {
                return Ok(());
            }
            self.out.write_all(line)
        } else {
            self.pending.extend_from_slice(line);
            let result = self.out.write_all(&self.pending);
            self.pending.clear();
            result
        };
        self.writes += 1;
        if self.pending.capacity() > MAX_PENDING {
            self.pending = Vec::new();
        }
        if let Some((_, waiting)) = self.waiting.take() {
            waiting.send_replace(Some(result.is_ok()));
        }
        result
    }
}

impl Out {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File(file) => file.write_all(bytes),
            Out::Stdout => std::io::stdout().lock().write_all(bytes),
        }
    }
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
            failures: Arc::default(),
            on_failure: OnAuditFailure::default(),
        }
    }

    /// Appends to `path` (`-` is stdout).
    pub fn open(path: &str, include_arguments: bool) -> Result<Audit, AuditOpenError> {
        let out = if path == "-" {
            Out::Stdout
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(path))
                .map_err(|source| AuditOpenError {
                    path: path.to_owned(),
                    source,
                })?;
            Out::File(file)
        };
        let sink = Sink {
            out,
            pending: Vec::new(),
            waiting: None,
            timer_armed: false,
            writes: 0,
        };
        Ok(Audit {
            sink: Some(Arc::new(Mutex::new(sink))),
            include_arguments,
            failures: Arc::default(),
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
        self.sink.is_some() && self.on_failure == OnAuditFailure::Refuse
    }

    /// Whether records are written anywhere: the log, or OTLP (`telemetry.audit_logs`).
    pub fn enabled(&self) -> bool {
        self.sink.is_some() || crate::telemetry::exports_audit()
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

    /// Writes one record as a line, with `time` and `run` added. The line (after any
    /// records waiting from [`Audit::write_soon`]) is handed to the kernel in one
    /// `write` before this returns, so a decision is on record before its call is
    /// forwarded. Returns whether it was written (`true` when there is no audit log).
    pub fn write(&self, record: &Record<'_>) -> bool {
        crate::telemetry::audit(record, record.approval_id());
        let Some(sink) = &self.sink else { return true };
        let Some(line) = self.line(record) else {
            return false;
        };
        self.write_line(sink, &line)
    }

    /// Writes one record as [`Audit::write`] does, on record when this returns, but in
    /// one `write` with the records of the other calls that are ready on this thread:
    /// the first one's call schedules the `write`, which runs once they have all had
    /// their turn. Under load a `write` serves many calls; alone, a call waits one
    /// turn of its thread's scheduler. Returns whether it was written.
    pub async fn write_together(&self, record: &Record<'_>) -> bool {
        crate::telemetry::audit(record, record.approval_id());
        let Some(sink) = &self.sink else { return true };
        let Some(line) = self.line(record) else {
            return false;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.write_line(sink, &line);
        };
        let Some(written) = self.join(sink, &runtime, &line) else {
            return self.write_line(sink, &line);
        };
        let mut told = written.subscribe();
        // The sender lives in `written` for as long as this waits.
        let outcome = told.wait_for(Option::is_some).await.map(|ok| *ok);
        matches!(outcome, Ok(Some(true)))
    }

    /// Adds `line` to the records that wait for the next `write`, and schedules that
    /// `write` if nothing has yet; `None` if `line` must be written now: it would make
    /// too many wait, or the `write` is scheduled on another lane, whose turn this
    /// lane does not wait for (writing now takes that lane's records too).
    fn join(
        &self,
        sink: &Arc<Mutex<Sink>>,
        runtime: &tokio::runtime::Handle,
        line: &[u8],
    ) -> Option<Arc<Written>> {
        let here = std::thread::current().id();
        let mut locked = sink.lock();
        match &locked.waiting {
            _ if locked.pending.len() + line.len() > MAX_PENDING => return None,
            Some((there, _)) if *there != here => return None,
            Some((_, written)) => {
                let written = written.clone();
                locked.pending.extend_from_slice(line);
                return Some(written);
            }
            None => {}
        }
        locked.pending.extend_from_slice(line);
        let written = Arc::new(Written::new(None));
        locked.waiting = Some((here, written.clone()));
        let (sink, failures) = (sink.clone(), self.failures.clone());
        // Spawned behind the tasks already ready: they add their records first.
        runtime.spawn(async move {
            let result = sink.lock().write(&[]);
            record_failure(&failures, result);
        });
        Some(written)
    }

    fn write_line(&self, sink: &Mutex<Sink>, line: &[u8]) -> bool {
        let result = sink.lock().write(line);
        self.written(result)
    }

    /// Writes a record that need not be on record before anything else happens (a
    /// call's outcome): it goes out with the next record's `write`, or within 50 ms,
    /// so that a call costs one `write` and not two. [`Audit::flush`] writes it too.
    pub fn write_soon(&self, record: &Record<'_>) {
        crate::telemetry::audit(record, record.approval_id());
        let Some(sink) = &self.sink else { return };
        let Some(line) = self.line(record) else {
            return;
        };
        let runtime = tokio::runtime::Handle::try_current();
        let mut locked = sink.lock();
        if runtime.is_err() || locked.pending.len() + line.len() > MAX_PENDING {
            let result = locked.write(&line);
            drop(locked);
            self.written(result);
            return;
        }
        locked.pending.extend_from_slice(&line);
        let arm = !std::mem::replace(&mut locked.timer_armed, true);
        drop(locked);
        if let (true, Ok(runtime)) = (arm, runtime) {
            // One timer at a time for everything that waits (whoever writes first
            // takes it all): under load a timer per outcome would cost a task, and a
            // wake-up of the lane's driver, per call.
            let (sink, failures) = (sink.clone(), self.failures.clone());
            runtime.spawn(async move {
                tokio::time::sleep(SOON).await;
                let mut locked = sink.lock();
                locked.timer_armed = false;
                let result = locked.write(&[]);
                drop(locked);
                record_failure(&failures, result);
            });
        }
    }

    /// A record as written: its own members, then its `time` and the `run` that
    /// wrote it (appended to the record's object, which costs less than serde's
    /// `flatten`).
    fn line(&self, record: &Record<'_>) -> Option<Vec<u8>> {
        let mut line = Vec::with_capacity(512);
        match serde_json::to_writer(&mut line, record) {
            Ok(()) if line.last() == Some(&b'}') => {
                line.pop();
                // Both are plain ASCII (RFC 3339, a UUID): written as they are, quoted.
                line.extend_from_slice(b",\"time\":\"");
                line.extend_from_slice(now_rfc3339().as_bytes());
                line.extend_from_slice(b"\",\"run\":\"");
                line.extend_from_slice(run_id().as_bytes());
                line.extend_from_slice(b"\"}\n");
                Some(line)
            }
            Ok(()) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("audit record could not be serialised: not a JSON object");
                None
            }
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, "audit record could not be serialised");
                None
            }
        }
    }

    fn written(&self, result: std::io::Result<()>) -> bool {
        record_failure(&self.failures, result)
    }

    /// Writes what waits and flushes it to disk.
    pub fn flush(&self) {
        if let Some(sink) = &self.sink {
            let mut sink = sink.lock();
            let result = sink.write(&[]);
            record_failure(&self.failures, result);
            let flushed = match &mut sink.out {
                Out::File(file) => file.sync_data(),
                Out::Stdout => std::io::stdout().flush(),
            };
            if let Err(err) = flushed {
                tracing::warn!(error = %err, "the audit log could not be flushed");
            }
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            let result = sink.lock().write(&[]);
            record_failure(&self.failures, result);
        }
    }
}

/// Counts and logs a failed write; whether the write succeeded.
fn record_failure(failures: &AtomicU64, result: std::io::Result<()>) -> bool {
    match result {
        Ok(()) => true,
        Err(err) => {
            failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %err, "audit log write failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

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
            redactions: &[],
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
    fn a_write_that_fails_says_so() {
        let audit = Audit::open("/dev/full", false).unwrap();
        let record = Record::Outcome {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            server: "s",
            tool: "t",
            upstream_latency_ms: 1.0,
            outcome: "forwarded",
            code: None,
            redactions: &[],
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

    /// An empty audit log file in a directory of its own (removed by the test).
    fn scratch(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    fn outcome(call_id: &str) -> Record<'_> {
        Record::Outcome {
            call_id,
            server: "s",
            tool: "t",
            upstream_latency_ms: 1.0,
            outcome: "ok",
            code: None,
            redactions: &[],
        }
    }

    #[tokio::test]
    async fn decisions_ready_together_share_one_write_and_are_on_record_when_it_returns() {
        let (dir, path) = scratch("audit-group");
        let audit = Arc::new(Audit::open(path.to_str().unwrap(), false).unwrap());
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        // Twenty calls ready at once (one thread): each returns with its record written.
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let (audit, path) = (audit.clone(), path.clone());
                tokio::spawn(async move {
                    let call_id = format!("call-{i}");
                    assert!(audit.write_together(&outcome(&call_id)).await);
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        text.contains(&format!("\"call_id\":\"{call_id}\"")),
                        "{text}"
                    );
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(lines(), 20);
        let writes = || audit.sink.as_ref().unwrap().lock().writes;
        assert_eq!(writes(), 1, "one write for the twenty");
        // Alone, a record is written as soon as its turn comes.
        assert!(audit.write_together(&outcome("alone")).await);
        assert_eq!((lines(), writes()), (21, 2));
        // A failed write is told to every call in it.
        let full = Arc::new(Audit::open("/dev/full", false).unwrap());
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let full = full.clone();
                tokio::spawn(async move { full.write_together(&outcome("x")).await })
            })
            .collect();
        for call in calls {
            assert!(!call.await.unwrap());
        }
        assert_eq!(full.failures(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_lane_does_not_wait_for_a_write_scheduled_on_another() {
        let (dir, path) = scratch("audit-lanes");
        let audit = Arc::new(Audit::open(path.to_str().unwrap(), false).unwrap());
        let lane = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (joined_tx, joined) = std::sync::mpsc::channel();
        let (written_tx, written) = std::sync::mpsc::channel();
        let busy = {
            let audit = audit.clone();
            std::thread::spawn(move || {
                lane().block_on(async move {
                    let record = outcome("a");
                    let mut call = std::pin::pin!(audit.write_together(&record));
                    // Its record waits; the write is scheduled on this lane, which is
                    // now busy (blocked) until the other lane has written.
                    assert!(futures::poll!(call.as_mut()).is_pending());
                    joined_tx.send(()).unwrap();
                    written.recv_timeout(Duration::from_secs(10)).unwrap();
                    assert!(call.await, "written by the other lane");
                });
            })
        };
        joined.recv_timeout(Duration::from_secs(10)).unwrap();
        let other = lane().block_on(async {
            let record = outcome("b");
            tokio::time::timeout(Duration::from_secs(5), audit.write_together(&record)).await
        });
        assert_eq!(other, Ok(true), "the other lane wrote at once");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"call_id\":\"a\"") && text.contains("\"call_id\":\"b\""),
            "{text}"
        );
        written_tx.send(()).unwrap();
        busy.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn an_outcome_goes_out_with_the_next_record_or_within_50_ms() {
        let (dir, path) = scratch("audit-soon");
        let audit = Audit::open(path.to_str().unwrap(), false).unwrap();
        let events = || -> Vec<String> {
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    format!(
                        "{}:{}",
                        v["event"].as_str().unwrap(),
                        v["call_id"].as_str().unwrap()
                    )
                })
                .collect()
        };
        audit.write_soon(&outcome("a"));
        assert!(events().is_empty(), "an outcome waits for company");
        // The next record that must be on record now takes it along, before itself.
        assert!(audit.write(&Record::ApprovalPending {
            call_id: "b",
            approval_id: "x",
            server: "s",
            tool: "t",
            expires_at: "2026-01-01T00:00:00Z",
        }));
        assert_eq!(events(), ["outcome:a", "approval_pending:b"]);
        // Alone, it goes out within 50 ms.
        audit.write_soon(&outcome("c"));
        tokio::time::sleep(SOON * 4).await;
        assert_eq!(events().len(), 3);
        // And `flush` writes what waits.
        audit.write_soon(&outcome("d"));
        audit.flush();
        assert_eq!(events().last().unwrap(), "outcome:d");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
