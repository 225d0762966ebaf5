//! stdio upstreams: a child process speaking newline-delimited JSON-RPC.
//!
//! Each child runs in a process group of its own so that everything it starts
//! (`uvx` starts Python, for one) ends with it. Ending a channel closes the
//! child's stdin (the spec's shutdown signal), sends SIGTERM to the group, and
//! SIGKILL shortly after if anything is still there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tollgate_mcp::{Line, LineReader, sniff_id};

use super::channel::{Channel, Routes, TaskGuard};

/// How long a process group gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// What to run, from the configuration file only.
#[derive(Debug, Clone)]
pub struct Command {
    /// The server's name, for logs.
    pub server: Arc<str>,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment variables (the server's `env:`).
    pub env: BTreeMap<String, String>,
    /// Variables of Tollgate's environment passed on besides [`INHERITED_ENV`]
    /// (the server's `inherit_env:`).
    pub inherit_env: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Longest line accepted from the child.
    pub max_line: usize,
}

impl Command {
    /// The command line as one string, for messages.
    pub fn display(&self) -> String {
        self.argv.join(" ")
    }
}

/// The variables of Tollgate's environment a child sees: what finding programs
/// (`PATH`), a user's caches and configuration (`HOME`, `USER`, `LOGNAME`, the XDG base
/// directories: where `uvx` and `npx` keep packages), text encoding and time (`LANG`,
/// `LC_*`, `TZ`), temporary files (`TMPDIR`) and TLS trust for package downloads
/// (`SSL_CERT_FILE`, `SSL_CERT_DIR`, `NODE_EXTRA_CA_CERTS`) need. No secret is among
/// them: the admin token, `clients:` keys and other servers' `${VAR}`s stay in Tollgate.
/// Anything else (proxies, `UV_*`, `NPM_CONFIG_*`) is passed only by `inherit_env:`.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
];

/// Whether a child inherits `name` from Tollgate's environment.
fn inherits(name: &str, inherit_env: &[String]) -> bool {
    INHERITED_ENV
        .iter()
        .any(|allowed| match allowed.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *allowed,
        })
        || inherit_env.iter().any(|n| n == name)
}

/// How long a child gets to exit by itself once its stdin is closed.
const EXIT_GRACE: Duration = Duration::from_millis(1000);

/// Whether any process of the group is still alive.
fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

/// Waits up to `limit` for the group to be gone; returns whether it is.
fn wait_gone(pgid: Pid, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while group_alive(pgid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The spec's shutdown: stdin is already closed; give the group [`EXIT_GRACE`] to
/// exit, then SIGTERM, then SIGKILL after [`KILL_GRACE`].
fn end_group(pgid: Pid, exit_grace: Duration) {
    if wait_gone(pgid, exit_grace) {
        return;
    }
    if killpg(pgid, Signal::SIGTERM).is_err() || wait_gone(pgid, KILL_GRACE) {
        return;
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

/// A running process group, ended when dropped.
struct ProcessGroup(Pid);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let pgid = self.0;
        // A plain thread: the ending must finish even while the runtime shuts down.
        let _ = std::thread::Builder::new()
            .name("tollgate-reaper".into())
            .spawn(move || end_group(pgid, EXIT_GRACE));
    }
}

/// Every process group started, so shutdown can end them all and wait for them.
#[derive(Default)]
pub struct Children {
    groups: parking_lot::Mutex<Vec<Pid>>,
}

impl Children {
    fn add(&self, pgid: Pid) {
        let mut groups = self.groups.lock();
        groups.retain(|g| group_alive(*g));
        groups.push(pgid);
    }

    /// Ends every child still running: SIGTERM, a bounded wait, then SIGKILL.
    pub fn shutdown(&self) {
        let groups: Vec<Pid> = std::mem::take(&mut *self.groups.lock());
        let threads: Vec<_> = groups
            .into_iter()
            .filter(|g| group_alive(*g))
            .map(|g| std::thread::spawn(move || end_group(g, Duration::ZERO)))
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// The executable that can act as a guard (`tollgate`), when there is one.
static GUARD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The argument that makes the `tollgate` binary act as a guard.
pub const GUARD_ARG: &str = "__stdio-guard";

/// Starts every stdio upstream under `program GUARD_ARG -- CMD ARGS` (see [`run_guard`]),
/// so children end even when Tollgate is killed with SIGKILL and cannot end them.
pub fn use_guard(program: PathBuf) {
    let _ = GUARD.set(program);
}

/// The guard: runs `argv` in the guard's own process group, exits with its status,
/// and, should its parent (Tollgate) die first, ends the child (SIGTERM, then
/// SIGKILL to the whole group). A process whose parent died cannot otherwise
/// tell, and an MCP server busy in a call may not read stdin's end for a long time.
pub fn run_guard(argv: &[String]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("tollgate guard: no command given");
        return 2;
    };
    let parent = std::os::unix::process::parent_id();
    let mut child = match std::process::Command::new(program).args(args).spawn() {
        Ok(child) => child,
        Err(err) => {
            eprintln!("tollgate guard: could not start `{program}`: {err}");
            return 127;
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt as _;
                return status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
            }
            Ok(None) => {}
            Err(_) => return 1,
        }
        if std::os::unix::process::parent_id() != parent {
            let pid = i32::try_from(child.id()).map(Pid::from_raw);
            if let Ok(pid) = pid {
                let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            }
            let deadline = std::time::Instant::now() + KILL_GRACE;
            while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Everything else in the group, and the guard itself.
            let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
            return 137;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
#[error("could not start `{command}`: {source}")]
pub struct SpawnError {
    command: String,
    #[source]
    source: std::io::Error,
}

/// The process to start for `command` (`program` and its `args`): under the guard
/// when there is one, with a cleared environment, piped standard streams, and a
/// process group of its own.
fn process_of(command: &Command, program: &str, args: &[String]) -> tokio::process::Command {
    let mut process = match GUARD.get() {
        Some(guard) => {
            let mut process = tokio::process::Command::new(guard);
            // Shown by `ps` instead of the guard's path (/proc/self/exe).
            process.arg0("tollgate");
            process.arg(GUARD_ARG).arg("--").arg(program);
            process
        }
        None => tokio::process::Command::new(program),
    };
    // A cleared environment: the child (and the guard) see only the allow-list, the
    // variables `inherit_env:` names, and the server's own `env:`.
    process.env_clear();
    for (name, value) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(|name| inherits(name, &command.inherit_env))
        {
            process.env(name, value);
        }
    }
    process
        .args(args)
        .envs(&command.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &command.cwd {
        process.current_dir(cwd);
    }
    process
}

/// Starts the command and returns a channel to it.
pub fn spawn(command: &Command, children: &Children) -> Result<Channel, SpawnError> {
    let failed = |source| SpawnError {
        command: command.display(),
        source,
    };
    let (program, args) = command
        .argv
        .split_first()
        .ok_or_else(|| failed(std::io::Error::other("the command is empty")))?;
    let mut process = process_of(command, program, args);
    let mut child = process.spawn().map_err(failed)?;
    let pid = child.id();
    // The child leads its own group, so the group id is its pid.
    let group = pid
        .and_then(|p| i32::try_from(p).ok())
        .map(|p| ProcessGroup(Pid::from_raw(p)));
    if let Some(group) = &group {
        children.add(group.0);
    }
    let missing = || failed(std::io::Error::other("its standard streams were not piped"));
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    let server = command.server.clone();
    tracing::info!(server = %server, pid = ?pid, command = %command.display(), "started stdio upstream");

    let routes = Arc::new(Routes::default());
    let (outgoing, to_stdin) = mpsc::channel(64);
    let tasks = vec![
        TaskGuard(tokio::spawn(write_lines(stdin, to_stdin, routes.clone()))),
        TaskGuard(tokio::spawn(read_lines(
            stdout,
            routes.clone(),
            server.clone(),
            command.max_line,
        ))),
    ];
    // Neither is aborted with the channel: they end with the process, and the waiter
    // reaps it once the group has been ended.
    let last_words = Arc::new(parking_lot::Mutex::new(None));
    let stderr = tokio::spawn(log_stderr(stderr, server.clone(), last_words.clone()));
    tokio::spawn(wait_for_exit(
        child,
        routes.clone(),
        server,
        stderr,
        last_words,
    ));
    let owned = group.map(|g| Box::new(g) as Box<dyn Send + Sync>);
    Ok(Channel::new(outgoing, routes, tasks, owned))
}

async fn write_lines(
    mut stdin: tokio::process::ChildStdin,
    mut messages: mpsc::Receiver<Value>,
    routes: Arc<Routes>,
) {
    while let Some(message) = messages.recv().await {
        // Serialised JSON never contains a raw newline, so one message is one line.
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        if let Err(err) = stdin.write_all(&line).await {
            routes.close(&format!("could not write to the process: {err}"));
            return;
        }
        if let Err(err) = stdin.flush().await {
            routes.close(&format!("could not write to the process: {err}"));
            return;
        }
    }
    // Every sender is gone: closing stdin asks the server to exit.
}

async fn read_lines(
    stdout: tokio::process::ChildStdout,
    routes: Arc<Routes>,
    server: Arc<str>,
    max_line: usize,
) {
    let mut lines = LineReader::new(tokio::io::BufReader::new(stdout), max_line);
    loop {
        let line = match lines.next_line().await {
            Ok(Some(Line::Text(line))) => line,
            Ok(Some(Line::TooLong { length, prefix })) => {
                // Skipped, not fatal: the channel goes on for every other request.
                let why = format!(
                    "upstream `{server}` answered with a message of {length} bytes, more than the {max_line} bytes Tollgate reads (4 × limits.max_body, at least 4 MiB); it was discarded"
                );
                tracing::warn!(server = %server, length, "the stdio upstream wrote an over-long line; skipped");
                // Its answer, when it is one, is for the request of that (our own) id.
                if let Some(own) = sniff_id(&prefix).and_then(|id| id.as_u64()) {
                    routes.fail(own, &why).await;
                }
                continue;
            }
            Ok(None) => break,
            Err(err) => {
                tracing::warn!(server = %server, error = %err, "could not read the stdio upstream's output");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(message) => routes.deliver(message).await,
            Err(err) => {
                tracing::warn!(server = %server, error = %err, "the stdio upstream wrote a line that is not JSON-RPC; ignored");
            }
        }
    }
    // Usually the process has exited: give its exit status a moment to be the reason.
    for _ in 0..50 {
        if routes.closed().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    routes.close("the process closed its standard output");
}

/// The last line a process wrote on stderr: often why it died.
type LastWords = Arc<parking_lot::Mutex<Option<String>>>;

async fn log_stderr(stderr: tokio::process::ChildStderr, server: Arc<str>, last: LastWords) {
    // Every line is read to its end, however long: a reader that stopped would
    // leave the child writing into a closed pipe.
    let mut lines = LineReader::new(tokio::io::BufReader::new(stderr), 64 * 1024);
    while let Ok(Some(line)) = lines.next_line().await {
        let (line, cut) = match line {
            Line::Text(line) => (line, false),
            Line::TooLong { prefix, .. } => (prefix, true),
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if !text.is_empty() {
            let more = if cut { " …(line cut)" } else { "" };
            tracing::info!(target: "tollgate::upstream", server = %server, "stderr: {text}{more}");
            *last.lock() = Some(text.chars().take(500).collect());
        }
    }
}

async fn wait_for_exit(
    mut child: tokio::process::Child,
    routes: Arc<Routes>,
    server: Arc<str>,
    stderr: tokio::task::JoinHandle<()>,
    last_words: LastWords,
) {
    let mut why = match child.wait().await {
        Ok(status) => format!("the process exited ({status})"),
        Err(err) => format!("the process could not be waited for: {err}"),
    };
    // Its last stderr line usually says why; give the reader a moment to get it.
    let _ = tokio::time::timeout(Duration::from_millis(300), stderr).await;
    if let Some(last) = last_words.lock().take() {
        why = format!("{why}; its last line on stderr: {last}");
    }
    tracing::info!(server = %server, "stdio upstream ended: {why}");
    routes.close(&why);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn owner() -> crate::upstream::Owner {
        crate::upstream::Owner {
            client: "client:test".into(),
            session: None,
        }
    }

    fn sh(script: &str) -> Command {
        Command {
            server: "test".into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            inherit_env: Vec::new(),
            cwd: None,
            max_line: 1 << 20,
        }
    }

    #[test]
    fn children_inherit_only_the_allow_list_and_what_inherit_env_names() {
        let extra = vec!["DOCS_TOKEN".to_owned()];
        for name in ["PATH", "HOME", "LC_ALL", "LC_CTYPE", "TZ", "XDG_CACHE_HOME"] {
            assert!(inherits(name, &[]), "{name}");
        }
        for name in [
            "TOLLGATE_ADMIN_TOKEN",
            "DOCS_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "PATHX",
            "LC",
        ] {
            assert!(!inherits(name, &[]), "{name}");
        }
        assert!(inherits("DOCS_TOKEN", &extra));
    }

    #[tokio::test]
    async fn a_line_out_is_answered_by_a_line_back() {
        // `cat` echoes the request; a request echoed is not an answer, so answer by hand.
        let script = r#"read line; echo 'not json'; echo '{"jsonrpc":"2.0","id":1,"result":{"ok":true}}'; sleep 5"#;
        let children = Children::default();
        let channel = spawn(&sh(script), &children).unwrap();
        let mut exchange = channel
            .request(
                json!({"jsonrpc": "2.0", "id": "a", "method": "ping"}),
                &owner(),
            )
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), exchange.messages.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            answer,
            json!({"jsonrpc": "2.0", "id": "a", "result": {"ok": true}})
        );
        children.shutdown();
    }

    #[tokio::test]
    async fn a_process_that_dies_closes_its_requests_with_the_reason() {
        let children = Children::default();
        let channel = spawn(&sh("read line; exit 3"), &children).unwrap();
        let mut exchange = channel
            .request(
                json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                &owner(),
            )
            .await
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), exchange.messages.recv())
            .await
            .unwrap();
        assert!(end.is_none());
        let why = channel.closed().unwrap().0.to_string();
        assert!(why.contains("exit"), "{why}");
    }

    #[tokio::test]
    async fn dropping_the_channel_ends_the_whole_process_group() {
        let children = Children::default();
        // A grandchild that ignores stdin: only the group kill can end it.
        let channel = spawn(&sh("sleep 300 & sleep 300"), &children).unwrap();
        let group = children.groups.lock()[0];
        assert!(group_alive(group));
        drop(channel);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while group_alive(group) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!group_alive(group), "the group outlived its channel");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let children = Children::default();
        let mut command = sh("");
        command.argv = vec!["/nonexistent/tollgate-test-server".into()];
        let err = spawn(&command, &children).err().unwrap().to_string();
        assert!(
            err.contains("could not start `/nonexistent/tollgate-test-server`"),
            "{err}"
        );
    }
}
