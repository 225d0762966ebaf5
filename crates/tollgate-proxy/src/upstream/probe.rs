//! Readiness: whether an upstream answers MCP, asked for real and remembered.
//!
//! A network upstream (Streamable HTTP, legacy HTTP+SSE) is sent an `initialize` and
//! must answer it with a JSON-RPC result (a wrong path's bare 404 is not ready), and
//! the session it opened is ended. A stdio upstream is started on demand, once per
//! session, so probing it would start a process each time: its command must resolve
//! to an executable file instead (a command that does not exist is not ready).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use super::{Body, Lane, Owner, Payload, Request, Upstream};

/// How an upstream is probed.
#[derive(Debug, Clone)]
pub enum Probe {
    /// An `initialize` exchange.
    Exchange,
    /// The command's program must be an executable file (found on `path` when it
    /// names no directory).
    Command {
        /// The program, as configured.
        program: String,
        /// The `PATH` the child gets.
        path: Option<String>,
        /// The child's working directory, against which a relative program resolves.
        cwd: Option<PathBuf>,
    },
}

/// One probe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    /// Whether the upstream answered as an MCP server.
    pub ready: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was checked (RFC 3339).
    pub checked_at: String,
}

/// An upstream's probe and its last outcome.
#[derive(Debug)]
pub struct Health {
    probe: Probe,
    last: Mutex<Option<Checked>>,
}

impl Health {
    /// Not yet probed.
    pub fn new(probe: Probe) -> Health {
        Health {
            probe,
            last: Mutex::new(None),
        }
    }

    /// The last outcome, if it was probed.
    pub fn last(&self) -> Option<Checked> {
        self.last.lock().clone()
    }

    /// Probes now (bounded by `timeout`), remembers and returns the outcome.
    pub async fn check(&self, upstream: &dyn Upstream, timeout: Duration) -> Checked {
        let result = match &self.probe {
            Probe::Exchange => tokio::time::timeout(timeout, exchange(upstream))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "did not answer `initialize` within {}s",
                        timeout.as_secs_f64()
                    ))
                }),
            Probe::Command { program, path, cwd } => {
                resolve(program, path.as_deref(), cwd.as_deref()).map(drop)
            }
        };
        let checked = Checked {
            ready: result.is_ok(),
            error: result.err(),
            checked_at: crate::audit::now_rfc3339(),
        };
        let was_ready = self.last.lock().replace(checked.clone()).map(|c| c.ready);
        if !checked.ready && was_ready != Some(false) {
            if let Some(error) = &checked.error {
                tracing::warn!(%error, "upstream not ready");
            }
        } else if checked.ready && was_ready == Some(false) {
            tracing::info!("upstream ready again");
        }
        checked
    }
}

/// Sends `initialize`; `Ok` once it is answered with a result.
async fn exchange(upstream: &dyn Upstream) -> Result<(), String> {
    let initialize = json!({
        "jsonrpc": "2.0",
        "id": "tollgate-readiness",
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "tollgate-readiness", "version": env!("CARGO_PKG_VERSION")},
        },
    });
    let owner = Owner {
        client: "tollgate:readiness".into(),
        session: None,
    };
    let reply = upstream
        .send(Request {
            payload: Payload::One(&initialize),
            session: None,
            protocol_version: None,
            headers: &[],
            owner: &owner,
            lane: Lane::FIRST,
        })
        .await
        .map_err(|failure| failure.to_string())?;
    let status = reply.status;
    let answer = first_message(reply.body).await;
    if let Some(session) = &reply.session {
        let _ = upstream.end(Lane::FIRST, session).await;
    }
    if !status.is_success() {
        return Err(format!("answered `initialize` with HTTP {status}"));
    }
    match answer {
        Some(message) if message.get("result").is_some() => Ok(()),
        Some(message) => Err(format!(
            "answered `initialize` with {}",
            message
                .get("error")
                .map_or_else(|| "no result".to_owned(), ToString::to_string)
        )),
        None => Err("answered `initialize` with no JSON-RPC message".to_owned()),
    }
}

async fn first_message(body: Body) -> Option<Value> {
    match body.into_events() {
        Body::Json(json) => json.into_value().ok(),
        Body::Events(mut events) => {
            while let Some(Ok(event)) = events.next().await {
                if let Ok(message) = event.data.into_value() {
                    return Some(message);
                }
            }
            None
        }
        Body::Empty | Body::Sse(_) | Body::Other { .. } => None,
    }
}

/// Where `program` is: itself when it names a directory, else the first executable
/// file of that name on `path`.
fn resolve(program: &str, path: Option<&str>, cwd: Option<&Path>) -> Result<PathBuf, String> {
    if program.contains('/') {
        let file = match cwd {
            Some(cwd) if Path::new(program).is_relative() => cwd.join(program),
            _ => PathBuf::from(program),
        };
        return if executable(&file) {
            Ok(file)
        } else {
            Err(format!("the command `{program}` is not an executable file"))
        };
    }
    std::env::split_paths(path.unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|file| executable(file))
        .ok_or_else(|| format!("the command `{program}` is not found on the PATH"))
}

fn executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_command_resolves_on_the_path_or_is_named_missing() {
        assert!(resolve("sh", Some("/nonexistent:/bin:/usr/bin"), None).is_ok());
        let err = resolve("surely-no-such-mcp-server", Some("/bin:/usr/bin"), None).unwrap_err();
        assert!(
            err.contains("`surely-no-such-mcp-server` is not found"),
            "{err}"
        );
        assert!(resolve("/bin/sh", None, None).is_ok());
        assert!(resolve("./missing", None, Some(Path::new("/"))).is_err());
    }
}
