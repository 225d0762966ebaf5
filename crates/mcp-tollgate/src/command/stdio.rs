//! `tollgate stdio`: MCP on Tollgate's own stdin and stdout, for clients that
//! launch a local command (desktop apps, IDEs). Every message goes through the
//! same handler as HTTP clients' (policy, approvals, audit); stdout carries only
//! MCP messages, logs go to stderr.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tollgate_mcp::{ErrorCode, Line, LineReader, error_response, sniff_id};
use tollgate_proxy::{AppState, Config, Conversation, LoadedPolicy};

use super::listing::UpstreamTransport;
use super::serve::{
    CommandLineUpstream, Failure, LogFormat, finish, init_logging, load_config, load_policy,
    runtime, single_server_config, start_admin, start_reloading,
};

/// Messages handled at once; reading stdin pauses beyond that.
const MAX_IN_FLIGHT: usize = 256;

/// Arguments of `tollgate stdio`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "policy"])))]
pub struct StdioArgs {
    /// The configuration file (docs/configuration.md).
    #[arg(long, conflicts_with_all = ["policy", "upstream", "command"])]
    pub config: Option<PathBuf>,
    /// The server of `--config` to serve; needed when it has several.
    #[arg(long, requires = "config")]
    pub server: Option<String>,
    /// The policy, without a configuration file: with `--upstream URL` or `-- CMD ARGS`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// An MCP endpoint to forward to (with `--policy`).
    #[arg(long, requires = "policy")]
    pub upstream: Option<String>,
    /// How `--upstream` is spoken.
    #[arg(long, value_enum, default_value_t = UpstreamTransport::Http, requires = "upstream")]
    pub transport: UpstreamTransport,
    /// A stdio MCP server to start and forward to (with `--policy`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// The stdio server's environment (with `-- CMD ARGS`).
    #[command(flatten)]
    pub child_env: super::ChildEnv,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Runs `tollgate stdio`.
pub fn run(args: StdioArgs) -> ExitCode {
    init_logging(args.log_format);
    let result = (|| {
        let (config, policies, server) = load(&args)?;
        let runtime = runtime()?;
        let served = runtime.block_on(serve_stdio(config, policies, server));
        // The thread reading stdin is blocked in read(2) until the client writes or
        // closes it: after a signal, do not wait for it.
        runtime.shutdown_background();
        served
    })();
    finish(result)
}

fn load(args: &StdioArgs) -> Result<(Config, BTreeMap<String, LoadedPolicy>, String), Failure> {
    let usage = |text: String| Failure {
        code: 2,
        error: anyhow::anyhow!(text),
    };
    if let Some(path) = &args.config {
        let (config, policies) = load_config(path)?;
        let names: Vec<&String> = config.servers.keys().collect();
        let server = match (&args.server, names.as_slice()) {
            (Some(name), _) if config.servers.contains_key(name) => name.clone(),
            (Some(name), _) => {
                return Err(usage(format!(
                    "{}: has no server `{name}`; its servers: {}",
                    path.display(),
                    join(&names)
                )));
            }
            (None, [only]) => (*only).clone(),
            (None, _) => {
                return Err(usage(format!(
                    "{} has several servers; pick one with --server ({})",
                    path.display(),
                    join(&names)
                )));
            }
        };
        return Ok((config, policies, server));
    }
    let policy = args
        .policy
        .as_deref()
        .ok_or_else(|| usage("give --config FILE, or --policy FILE".into()))?;
    let upstream = match (&args.upstream, args.command.as_slice()) {
        (Some(_), []) if !args.child_env.is_empty() => {
            return Err(usage(
                "--env and --inherit-env are for a stdio server (-- CMD ARGS); an --upstream URL has its own environment".into(),
            ));
        }
        (Some(url), []) => CommandLineUpstream::Url {
            url,
            sse: args.transport == UpstreamTransport::Sse,
        },
        (None, command) if !command.is_empty() => {
            CommandLineUpstream::Command(command, &args.child_env)
        }
        _ => {
            return Err(usage(
                "with --policy, give either --upstream URL or -- CMD ARGS (not both)".into(),
            ));
        }
    };
    // Nothing listens in stdio mode; the listen address is only for the config's sake.
    let config = single_server_config(upstream, policy, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let mut policies = BTreeMap::new();
    policies.insert("upstream".to_owned(), load_policy(policy)?);
    Ok((config, policies, "upstream".to_owned()))
}

fn join(names: &[&String]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn serve_stdio(
    mut config: Config,
    policies: BTreeMap<String, LoadedPolicy>,
    server_name: String,
) -> Result<(), Failure> {
    // The client is whoever started this process: the OS has already decided it may
    // run it, and there is no header to carry a key. Client keys apply to HTTP only.
    if !config.clients.is_empty() {
        tracing::info!(
            "stdio mode: `clients:` keys apply to HTTP listeners only and are not checked here"
        );
        config.clients.clear();
    }
    let state = AppState::build(&config, policies).map_err(|e| Failure::invalid(e.into()))?;
    let server = state
        .servers()
        .get(&server_name)
        .cloned()
        .context("the server vanished from the configuration")
        .map_err(Failure::io)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (admin_task, admin_line) = start_admin(&config, &state, stop_rx).await?;
    if let Some(line) = admin_line {
        // stdout is the MCP channel: announcements go to the log.
        tracing::info!("{line}");
    }
    let _watcher = start_reloading(&state);

    let (out, to_client) = tokio::sync::mpsc::channel::<Value>(64);
    let writer = tokio::spawn(write_stdout(to_client));
    let conversation = state.local_conversation(&server, out.clone());
    tracing::info!(server = %server_name, "Tollgate on stdio");
    let mut in_flight = tokio::task::JoinSet::new();
    read_stdin(&conversation, &out, state.max_body(), &mut in_flight).await;

    // stdin closed: let calls in flight finish (bounded), then end the session.
    state
        .approvals()
        .deny_all("tollgate", "the stdio client went away");
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after the grace period; ending them");
    }
    conversation.close().await;
    drop(conversation);
    drop(out);
    let _ = writer.await;
    let _ = stop_tx.send(true);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    state.shutdown_upstreams().await;
    state.audit().flush();
    tollgate_proxy::telemetry::shutdown(TELEMETRY_FLUSH).await;
    Ok(())
}

/// Writes each message for the client to stdout, one line each, until every sender
/// is gone or stdout is closed.
async fn write_stdout(mut to_client: tokio::sync::mpsc::Receiver<Value>) {
    let mut stdout = tokio::io::stdout();
    while let Some(message) = to_client.recv().await {
        // Serialised JSON has no raw newline: one message, one line.
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
            break;
        }
    }
}

/// Reads messages from stdin, one a line, into `conversation` until stdin closes, it
/// fails, or a signal arrives; each is handled as a task of `in_flight`. A line over
/// `max_line` bytes is refused (on `out`) and skipped.
async fn read_stdin(
    conversation: &Arc<Conversation>,
    out: &tokio::sync::mpsc::Sender<Value>,
    max_line: usize,
    in_flight: &mut tokio::task::JoinSet<()>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut lines = LineReader::new(tokio::io::BufReader::new(tokio::io::stdin()), max_line);
    let shutdown = super::serve::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(Line::Text(line))) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    // At most MAX_IN_FLIGHT messages handled at once: stdin waits beyond that.
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    // Admitted here, in order of arrival (after the handshake they
                    // follow), then handled concurrently.
                    let admitted = conversation.admit(Bytes::from(line)).await;
                    in_flight.spawn(async move {
                        admitted.run().await;
                        drop(permit);
                    });
                }
                Ok(Some(Line::TooLong { length, prefix })) => {
                    // The line is skipped, and reading goes on with the next one.
                    tracing::warn!(length, "over-long message on stdin; discarded");
                    let id = sniff_id(&prefix);
                    let refusal = error_response(id.as_ref(), ErrorCode::InvalidRequest, &format!(
                        "message of {length} bytes discarded: a message is one line of at most {max_line} bytes (limits.max_body)"
                    ), None);
                    let _ = out.send(refusal).await;
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "stdin could not be read");
                    break;
                }
            },
            () = &mut shutdown => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// How long spans and log records still queued may take to export at exit.
const TELEMETRY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);
