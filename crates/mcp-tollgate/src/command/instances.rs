//! Running Tollgate instances, so `tollgate approvals` finds them without `--admin`.
//!
//! Each process with an admin listener writes `<pid>.json` (its admin URL, and the
//! admin token when Tollgate generated it) into a per-user runtime directory, and
//! removes it when the listener stops. A desktop client may start several `tollgate
//! stdio` processes, each on an ephemeral admin port: this is how they are found.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `TOLLGATE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/tollgate`, else
/// `~/.local/state/tollgate`; `None` when none can be named.
pub fn runtime_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("TOLLGATE_RUNTIME_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return Some(PathBuf::from(dir).join("tollgate"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".local/state/tollgate"))
}

/// What one running instance records about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// Its process id.
    pub pid: u32,
    /// The admin API's base URL, `http://ADDR`.
    pub admin: String,
    /// The admin token, only when Tollgate generated it (a configured token stays in
    /// the environment it came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `serve`, `stdio` or `demo`.
    pub command: String,
    /// The servers it serves.
    pub servers: Vec<String>,
}

/// The record of this process; removed when dropped.
#[derive(Debug)]
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Records `instance` in the runtime directory; `None` (after logging why) when it
/// cannot: the proxy runs anyway, `tollgate approvals` then needs `--admin`.
pub fn register(instance: &Instance) -> Option<Registration> {
    let dir = runtime_dir()?;
    match write_record(&dir, instance) {
        Ok(path) => Some(Registration(path)),
        // A read-only root (a container's, the Kubernetes manifests') is expected there:
        // nobody runs `tollgate approvals` inside it without --admin.
        Err(err) if err.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
            tracing::info!(dir = %dir.display(), "read-only file system: this instance is not recorded; `tollgate approvals` needs --admin");
            None
        }
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot record this instance; `tollgate approvals` will need --admin");
            None
        }
    }
}

fn write_record(dir: &Path, instance: &Instance) -> std::io::Result<PathBuf> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let path = dir.join(format!("{}.json", instance.pid));
    let tmp = dir.join(format!(".{}.json.tmp", instance.pid));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // It may hold a token: readable by this user only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let text = serde_json::to_vec(instance).map_err(std::io::Error::other)?;
    std::io::Write::write_all(&mut options.open(&tmp)?, &text)?;
    // Renamed into place, so a reader never sees half a record.
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    // Without /proc there is no cheap check: keep the record; a dead one fails to connect.
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Every instance recorded in the runtime directory whose process still runs, by pid.
/// Records of processes that are gone (killed before they could clean up) are removed.
pub fn running() -> Vec<Instance> {
    let Some(dir) = runtime_dir() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<Instance> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json")))
        .filter_map(|entry| {
            let text = std::fs::read(entry.path()).ok()?;
            let instance: Instance = serde_json::from_slice(&text).ok()?;
            if alive(instance.pid) {
                Some(instance)
            } else {
                let _ = std::fs::remove_file(entry.path());
                None
            }
        })
        .collect();
    found.sort_by_key(|i| i.pid);
    found
}
