//! Policy hot reload: on a file change, SIGHUP or `POST /reload`, each policy
//! file (and tool lock) is read, validated and compiled off the request path, then swapped in
//! atomically. Calls in flight keep the snapshot they started with. A file that
//! fails validation is refused: the old policy stays, and the error is logged,
//! counted and shown by `/status`. The listeners' TLS certificates are reloaded
//! the same way, on the same events.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::state::{LoadedPolicy, Server, Shared};
use crate::tls::{CertReload, Certs};

/// How long the policy directories must be quiet before the watcher reloads.
const SETTLE: Duration = Duration::from_millis(150);
/// The longest the watcher waits for that quiet after the first change.
const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// What a reload did to one server's policy.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// The server.
    pub server: String,
    /// `policy`, or `tools_lock` (its tool lock).
    pub file: &'static str,
    /// `unchanged`, `reloaded` or `failed`.
    pub result: &'static str,
    /// The error, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn reload_server(app: &Shared, server: &Server) -> Option<ReloadReport> {
    // Held from the read to the swap: the watcher, SIGHUP and `POST /reload` may
    // race, and a reload that read the file earlier must not swap in its older
    // text after one that read it later.
    let mut info = server.policy_info.lock();
    let path = info.path.clone()?;
    let report = |result, error| {
        Some(ReloadReport {
            server: server.name.to_string(),
            file: "policy",
            result,
            error,
        })
    };
    let source =
        std::fs::read_to_string(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()));
    let hash = source.as_deref().map(crate::audit::text_digest).ok();
    if hash.is_some() && hash.as_deref() == Some(info.hash.as_str()) {
        // Fixed back to the policy in force: the earlier failure is over.
        info.last_error = None;
        info.failed_hash = None;
        return report("unchanged", None);
    }
    // The watcher, SIGHUP and POST /reload may all see the same broken file:
    // it is one failure, logged and counted once.
    if hash.is_some() && hash == info.failed_hash {
        return report("failed", info.last_error.clone());
    }
    let compiled = source
        .and_then(|text| LoadedPolicy::compile(&text, Some(&path), &path.display().to_string()));
    match compiled {
        Ok(loaded) => {
            server.policy.store(Arc::new(loaded.policy));
            info.hash = loaded.hash;
            info.loaded_at = crate::audit::now_rfc3339();
            info.last_error = None;
            info.failed_hash = None;
            drop(info);
            app.metrics().reload(&server.name, true);
            tracing::info!(server = %server.name, path = %path.display(), "policy reloaded");
            report("reloaded", None)
        }
        Err(error) => {
            info.last_error = Some(error.clone());
            info.failed_hash = hash;
            drop(info);
            app.metrics().reload(&server.name, false);
            tracing::error!(server = %server.name, %error, "policy reload refused; the previous policy stays in force");
            report("failed", Some(error))
        }
    }
}

/// Re-reads a server's tool lock, as its policy: a file that cannot be read or is
/// not a valid lock leaves the lock in force (logged, counted and shown once).
fn reload_lock(app: &Shared, server: &Server) -> Option<ReloadReport> {
    let watch = server.tools.as_ref()?;
    let mut info = watch.info.lock();
    let report = |result, error| {
        Some(ReloadReport {
            server: server.name.to_string(),
            file: "tools_lock",
            result,
            error,
        })
    };
    let path = &watch.path;
    let loaded = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the tool lock: {e}", path.display()))
        .and_then(|text| {
            let hash = crate::audit::text_digest(&text);
            if hash == info.hash {
                return Ok(None);
            }
            crate::lock::ToolLock::parse(&text, &path.display().to_string())
                .map(|lock| Some((lock, hash)))
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(None) => {
            // Back to the text in force: an earlier failure no longer stands.
            info.last_error = None;
            report("unchanged", None)
        }
        Ok(Some((lock, hash))) => {
            drop(info);
            watch.replace(lock, hash);
            app.metrics().reload(&server.name, true);
            tracing::info!(server = %server.name, path = %path.display(), "tool lock reloaded");
            report("reloaded", None)
        }
        // The same broken file is one failure.
        Err(error) if info.last_error.as_ref() == Some(&error) => report("failed", Some(error)),
        Err(error) => {
            info.last_error = Some(error.clone());
            drop(info);
            app.metrics().reload(&server.name, false);
            tracing::error!(server = %server.name, %error, "tool lock reload refused; the previous lock stays in force");
            report("failed", Some(error))
        }
    }
}

/// Re-reads a listener's certificate and key, as a policy: files that cannot be
/// used leave the certificate in force (logged, counted and shown once). The report
/// names the listener (`listen`, `admin.listen`) where a policy's names its server.
fn reload_certs(app: &Shared, certs: &Certs) -> ReloadReport {
    let (outcome, error) = certs.reload();
    let result = match outcome {
        CertReload::Unchanged => "unchanged",
        CertReload::Loaded => {
            app.metrics().reload(certs.listener, true);
            tracing::info!(listener = certs.listener, fingerprint = %certs.info().fingerprint, "TLS certificate reloaded; new connections get it");
            "reloaded"
        }
        CertReload::Failed => {
            app.metrics().reload(certs.listener, false);
            tracing::error!(
                listener = certs.listener,
                error = error.as_deref().unwrap_or(""),
                "TLS certificate reload refused; the previous certificate stays in force"
            );
            "failed"
        }
        CertReload::StillFailing => "failed",
    };
    ReloadReport {
        server: certs.listener.to_owned(),
        file: "listen_tls",
        result,
        error,
    }
}

/// The listeners' certificates.
fn certs(app: &Shared) -> impl Iterator<Item = &Certs> {
    app.tls().all()
}

/// Re-reads every server's policy file and tool lock, and the listeners' certificates.
pub fn reload_all(app: &Shared) -> Vec<ReloadReport> {
    app.servers()
        .values()
        .flat_map(|server| [reload_server(app, server), reload_lock(app, server)])
        .flatten()
        .chain(certs(app).map(|c| reload_certs(app, c)))
        .collect()
}

/// Every file a reload reads: the policies, the tool locks and the certificates.
fn watched_files(app: &Shared) -> Vec<PathBuf> {
    app.servers()
        .values()
        .flat_map(|s| {
            let policy = s.policy_info.lock().path.clone();
            let lock = s.tools.as_ref().map(|w| w.path.clone());
            [policy, lock]
        })
        .flatten()
        .chain(certs(app).flat_map(|c| c.files().map(ToOwned::to_owned)))
        .collect()
}

/// Keeps the file watcher alive; dropping it stops watching.
pub struct PolicyWatcher {
    _source: Source,
}

/// Watches the directories of every policy file. Directories, not files:
/// editors and Kubernetes ConfigMap mounts replace files (atomic rename,
/// `..data` symlink swap), which a watch on the old file would miss.
pub fn watch(app: &Arc<Shared>) -> std::io::Result<PolicyWatcher> {
    let files = watched_files(app);
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .map(|p| {
            p.parent()
                .map(ToOwned::to_owned)
                .unwrap_or_else(|| PathBuf::from("."))
        })
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    // The names a change to a policy can arrive under: the file's own (written,
    // or renamed over), or a ConfigMap mount's `..data` and `..<timestamp>`.
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_owned()))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let source = changes(&dirs, names, tx)?;
    let app = app.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // One save is often several events (truncate, writes, rename), and a
            // file written in pieces is briefly empty or half-written: wait until
            // the directories have been quiet for a moment, then reload once. A
            // directory that is never quiet (a log file beside the policy) only
            // delays the reload by SETTLE_AT_MOST.
            let deadline = tokio::time::Instant::now() + SETTLE_AT_MOST;
            loop {
                let quiet_until = (tokio::time::Instant::now() + SETTLE).min(deadline);
                match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_quiet) => break,
                }
            }
            let reports = tokio::task::spawn_blocking({
                let app = app.clone();
                move || reload_all(&app)
            })
            .await
            .unwrap_or_default();
            tracing::debug!(?reports, "policy files changed");
        }
    });
    Ok(PolicyWatcher { _source: source })
}

/// What tells of changes in the policy directories; dropping it stops them.
#[cfg(target_os = "linux")]
struct Source(tokio::task::JoinHandle<()>);

#[cfg(target_os = "linux")]
impl Drop for Source {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// inotify, for what happens to a policy file when it changes (written and closed,
/// created, renamed, deleted, its attributes), and not for every write to an open
/// file: an audit log beside the policy (`audit.path: audit.jsonl`, as the docs show)
/// would otherwise wake the watcher on every record, twice per call.
#[cfg(target_os = "linux")]
fn changes(
    dirs: &BTreeSet<PathBuf>,
    names: BTreeSet<std::ffi::OsString>,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> std::io::Result<Source> {
    use futures::StreamExt as _;
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init()?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    for dir in dirs {
        inotify.watches().add(dir, mask)?;
    }
    let mut events = inotify.into_event_stream([0u8; 4096])?;
    Ok(Source(tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(error = %err, "policy files are no longer watched; reload with SIGHUP or POST /reload");
                    return;
                }
            };
            tracing::trace!(?event, "policy directory changed");
            // Other files in the directory (logs, the upstream's own) are not policies.
            // An event without a name is the directory's own, or the queue overflowed.
            let policy = event.name.as_ref().is_none_or(|name| {
                names.contains(name.as_os_str()) || name.as_encoded_bytes().starts_with(b"..")
            });
            if !policy {
                continue;
            }
            // The receiver lives as long as the watcher task; gone means shutting down.
            if tx.send(()).is_err() {
                return;
            }
        }
    })))
}

/// Elsewhere, the platform's watcher through `notify`.
#[cfg(not(target_os = "linux"))]
struct Source(notify::RecommendedWatcher);

#[cfg(not(target_os = "linux"))]
fn changes(
    dirs: &BTreeSet<PathBuf>,
    _names: BTreeSet<std::ffi::OsString>,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> std::io::Result<Source> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            // The receiver lives as long as the watcher task; gone means shutting down.
            let _ = tx.send(());
        }
    })
    .map_err(std::io::Error::other)?;
    for dir in dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)?;
    }
    Ok(Source(watcher))
}
