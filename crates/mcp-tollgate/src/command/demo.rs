//! `tollgate demo`: the built-in demo upstream with Tollgate in front of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate_demo::{Demo, DemoOptions};
use tollgate_proxy::{Config, Lanes, LoadedPolicy};

use super::serve::{
    AdminMode, Bound, Failure, LogFormat, finish, init_logging, load_policy, run_proxy, runtime,
    single_server_config,
};

/// The starter HealthLake policy, built in so the demo runs from any directory.
const HEALTHLAKE_POLICY: &str = include_str!("../../../../policies/healthlake.yaml");

/// Arguments of `tollgate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where Tollgate listens; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the admin API and the approvals page listen; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Where the demo upstream listens. A fixed port keeps the printed `tollgate stdio`
    /// entry (which names it) good across restarts; if it is taken, a free one is used
    /// for this run.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub upstream_listen: SocketAddr,
    /// Use this policy instead of the built-in policies/healthlake.yaml.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Runs `tollgate demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    init_logging(args.log_format);
    let result = (|| {
        let policy = demo_policy(args.policy.as_deref())?;
        let runtime = runtime()?;
        runtime.block_on(async {
            let upstream = bind_upstream(args.upstream_listen).await?;
            let upstream_addr = upstream.local_addr().map_err(|e| Failure::io(e.into()))?;
            let demo = Demo::new(DemoOptions::default());
            tokio::spawn(async move {
                let _ = axum::serve(upstream, tollgate_demo::router(demo)).await;
            });
            let upstream_url = format!("http://{upstream_addr}/mcp");
            let (config, mode) = demo_config(&args, &upstream_url)?;
            let mut policies = BTreeMap::new();
            policies.insert("healthlake".to_owned(), policy);
            let stdio_policy = stdio_policy_path(args.policy.as_deref());
            run_proxy(config, policies, Lanes::one(), mode, "demo", |bound| {
                if let (Some(admin), Some(token)) = (bound.admin, &bound.admin_token) {
                    print_admin(token, &format!("http://{admin}/"));
                }
                print_instructions(&upstream_url, bound, stdio_policy.as_deref())
            })
            .await
        })
    })();
    finish(result)
}

/// `--policy`, else the built-in HealthLake policy.
fn demo_policy(path: Option<&Path>) -> Result<LoadedPolicy, Failure> {
    match path {
        Some(path) => load_policy(path),
        None => LoadedPolicy::compile(
            HEALTHLAKE_POLICY,
            None,
            "policies/healthlake.yaml (built in)",
        )
        .map_err(|e| Failure::invalid(anyhow::anyhow!("{e}"))),
    }
}

/// The demo upstream's listener: at `--upstream-listen`, or a free port when that is
/// taken (a second demo, say), since the port only matters across restarts.
async fn bind_upstream(listen: SocketAddr) -> Result<tokio::net::TcpListener, Failure> {
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(
                "--upstream-listen {listen} is taken, so the demo upstream uses a free port: the `tollgate stdio` entry printed below holds it for this run only"
            );
            tokio::net::TcpListener::bind(SocketAddr::new(listen.ip(), 0))
                .await
                .map_err(|e| Failure::io(e.into()))
        }
        Err(err) => Err(super::serve::cannot_listen(
            listen,
            "--upstream-listen",
            err,
        )),
    }
}

/// The demo's configuration (one server, `healthlake`, in front of `upstream_url`) and
/// how its admin listener is chosen.
fn demo_config(args: &DemoArgs, upstream_url: &str) -> Result<(Config, AdminMode), Failure> {
    let policy_path = args
        .policy
        .clone()
        .unwrap_or_else(|| PathBuf::from("policies/healthlake.yaml"));
    let mut config = single_server_config(
        super::serve::CommandLineUpstream::Url {
            url: upstream_url,
            sse: false,
        },
        &policy_path,
        args.listen,
    )?;
    // A token each run (TOLLGATE_ADMIN_TOKEN, else one generated, printed and
    // recorded for `approvals`): without one, any local program (the very agent
    // whose calls wait for a human) could approve its own calls by curl.
    let env_token = std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let mode = match env_token {
        Some(token) => {
            config.admin = Some(tollgate_proxy::AdminConfig {
                listen: args.admin_listen,
                token: Some(token),
                approvers: Vec::new(),
                listen_tls: None,
                proxy_protocol: false,
            });
            AdminMode::Configured
        }
        None => AdminMode::Personal {
            default_listen: args.admin_listen,
            explicit: true,
        },
    };
    if let Some(server) = config.servers.remove("upstream") {
        config.servers.insert("healthlake".into(), server);
    }
    Ok((config, mode))
}

fn print_admin(token: &str, admin_page: &str) {
    println!("Admin token (new each run): {token}");
    // The token rides in the fragment, which the browser never sends: the page keeps
    // it in the tab's session storage and drops it from the address bar.
    println!("Approvals page: {admin_page}#token={token}");
    println!("For the CLI: export TOLLGATE_ADMIN_TOKEN={token}");
}

/// An absolute path to the demo's policy for a `tollgate stdio` entry, which a desktop
/// client starts from a directory of its own: `--policy`, else the checkout's copy when
/// the demo runs from the repository (as `cargo run -- demo` does).
fn stdio_policy_path(policy: Option<&std::path::Path>) -> Option<PathBuf> {
    let path = policy.unwrap_or(std::path::Path::new("policies/healthlake.yaml"));
    std::fs::canonicalize(path).ok()
}

/// How to point the clients people use at the demo, each labelled; JSON on one line.
fn client_configs(url: &str, bin: &str, policy: &str, upstream: &str) -> Vec<(String, String)> {
    use serde_json::json;
    vec![
        (
            "Claude Code (run it in a terminal)".to_owned(),
            format!("claude mcp add --transport http healthlake {url}"),
        ),
        (
            "Cursor (~/.cursor/mcp.json) over HTTP".to_owned(),
            json!({"mcpServers": {"healthlake": {"url": url}}}).to_string(),
        ),
        (
            "VS Code (.vscode/mcp.json)".to_owned(),
            json!({"servers": {"healthlake": {"type": "http", "url": url}}}).to_string(),
        ),
        (
            "MCP Inspector (inspector.json: npx @modelcontextprotocol/inspector --config inspector.json --server healthlake)".to_owned(),
            json!({"mcpServers": {"healthlake": {"type": "streamable-http", "url": url}}}).to_string(),
        ),
        (
            "Claude Desktop (claude_desktop_config.json) or Cursor, starting `tollgate stdio` (while this demo runs)".to_owned(),
            json!({"mcpServers": {"healthlake": {"command": bin, "args": ["stdio", "--policy", policy, "--upstream", upstream]}}}).to_string(),
        ),
    ]
}

/// The Python SDK snippet, flush left so it runs as pasted (into a file or `python3`).
fn python_snippet(url: &str) -> String {
    format!(
        r#"import asyncio
from mcp import Client

async def main():
    async with Client("{url}") as client:
        print([t.name for t in (await client.list_tools()).tools])
        print(await client.call_tool("list_fhir_datastores", {{}}))
        print(await client.call_tool("delete_fhir_datastore", {{"datastore_id": "x"}}))

asyncio.run(main())"#
    )
}

fn print_instructions(upstream_url: &str, bound: Bound, stdio_policy: Option<&std::path::Path>) {
    use std::io::Write as _;
    let url = format!("http://{}/mcp", bound.listen);
    let bin = super::own_binary();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Demo upstream (HealthLake-like tools) at {upstream_url}"
    );
    let _ = writeln!(
        out,
        "Policy: policies/healthlake.yaml: exports need approval, reads allowed, deletes denied."
    );
    if let Some(admin) = bound.admin {
        let _ = writeln!(
            out,
            "Approve or deny held calls at http://{admin}/ or with: {bin} approvals list --admin http://{admin}"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Point an MCP client at {url}:");
    // Not found from here: a placeholder the label asks to replace.
    let policy = stdio_policy.map_or_else(
        || "/path/to/policies/healthlake.yaml".to_owned(),
        |p| p.display().to_string(),
    );
    for (label, config) in client_configs(&url, &bin, &policy, upstream_url) {
        let _ = writeln!(out);
        let _ = writeln!(out, "{label}:");
        let _ = writeln!(out, "{config}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Python SDK (pip install 'mcp>=2'), as a file or pasted into python3:"
    );
    let _ = writeln!(out, "{}", python_snippet(&url));
    let _ = writeln!(out);
    let _ = out.flush();
}

/// Arguments of `tollgate demo-upstream`.
#[derive(Debug, clap::Args)]
pub struct DemoUpstreamArgs {
    /// Where the demo MCP server listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Answer with SSE streams instead of JSON bodies.
    #[arg(long)]
    pub sse: bool,
    /// Milliseconds added to every tool call.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// More tools listed after the demo's own (`filler_tool_<i>`), for benchmarks.
    #[arg(long, default_value_t = 0)]
    pub extra_tools: usize,
}

/// Runs `tollgate demo-upstream`: the demo MCP server alone, without a proxy.
pub fn run_upstream(args: DemoUpstreamArgs) -> ExitCode {
    init_logging(LogFormat::Text);
    let result = (|| {
        let runtime = runtime()?;
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| Failure {
                    code: 2,
                    error: anyhow::anyhow!("cannot listen on {}: {e}", args.listen),
                })?;
            let addr = listener.local_addr().map_err(|e| Failure::io(e.into()))?;
            let demo = Demo::new(DemoOptions {
                sse: args.sse,
                latency: std::time::Duration::from_millis(args.latency_ms),
                extra_tools: args.extra_tools,
            });
            println!("Demo MCP server listening on http://{addr}/mcp");
            axum::serve(listener, tollgate_demo::router(demo))
                .with_graceful_shutdown(super::serve::shutdown_signal())
                .await
                .map_err(|e| Failure::io(e.into()))
        })
    })();
    finish(result)
}
