//! `tollgate demo`: the built-in demo upstream with Tollgate in front of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tollgate_demo::{Demo, DemoOptions};
use tollgate_proxy::LoadedPolicy;

use super::serve::{
    Failure, LogFormat, finish, init_logging, load_policy, run_proxy, runtime, single_server_config,
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
        let policy = match &args.policy {
            Some(path) => load_policy(path)?,
            None => LoadedPolicy::compile(
                HEALTHLAKE_POLICY,
                None,
                "policies/healthlake.yaml (built in)",
            )
            .map_err(|e| Failure::invalid(anyhow::anyhow!("{e}")))?,
        };
        let runtime = runtime()?;
        runtime.block_on(async {
            let upstream = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .map_err(|e| Failure::io(e.into()))?;
            let upstream_addr = upstream.local_addr().map_err(|e| Failure::io(e.into()))?;
            let demo = Demo::new(DemoOptions::default());
            tokio::spawn(async move {
                let _ = axum::serve(upstream, tollgate_demo::router(demo)).await;
            });
            let upstream_url = format!("http://{upstream_addr}/mcp");
            let policy_path = args
                .policy
                .clone()
                .unwrap_or_else(|| PathBuf::from("policies/healthlake.yaml"));
            let mut config = single_server_config(
                super::serve::CommandLineUpstream::Url {
                    url: &upstream_url,
                    sse: false,
                },
                &policy_path,
                args.listen,
            )?;
            // A fresh random token each run: without one, any local program (the very
            // agent whose calls wait for a human) could approve its own calls by curl.
            let token = random_token();
            config.admin = Some(tollgate_proxy::AdminConfig {
                listen: args.admin_listen,
                token: Some(token.clone()),
            });
            if let Some(server) = config.servers.remove("upstream") {
                config.servers.insert("healthlake".into(), server);
            }
            let mut policies = BTreeMap::new();
            policies.insert("healthlake".to_owned(), policy);
            run_proxy(config, policies, |addr, admin_page| {
                print_admin(&token, admin_page);
                print_instructions(&upstream_url, addr)
            })
            .await
        })
    })();
    finish(result)
}

/// 32 random bytes as 64 hex digits.
fn random_token() -> String {
    use std::fmt::Write as _;
    let bytes: [u8; 32] = rand::random();
    bytes.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn print_admin(token: &str, admin_page: Option<&str>) {
    println!("Admin token (new each run): {token}");
    if let Some(page) = admin_page {
        // The token rides in the fragment, which the browser never sends: the page keeps
        // it in the tab's session storage and drops it from the address bar.
        println!("Approvals page: {page}#token={token}");
    }
    println!("For the CLI: export TOLLGATE_ADMIN_TOKEN={token}");
}

fn print_instructions(upstream_url: &str, listen: SocketAddr) {
    let url = format!("http://{listen}/mcp");
    println!("Demo upstream (HealthLake-like tools) at {upstream_url}");
    println!(
        "Policy: policies/healthlake.yaml: exports need approval, reads allowed, deletes denied."
    );
    println!(
        "Approve or deny held calls on the admin page printed above, or: tollgate approvals list"
    );
    println!();
    println!("Point an MCP client at Tollgate, e.g. in a client's mcp.json:");
    println!(r#"  {{"mcpServers": {{"healthlake": {{"type": "http", "url": "{url}"}}}}}}"#);
    println!();
    println!("Or with the Python SDK (pip install 'mcp>=2'):");
    println!("  import asyncio");
    println!("  from mcp import Client");
    println!("  async def main():");
    println!("      async with Client(\"{url}\") as client:");
    println!("          print([t.name for t in (await client.list_tools()).tools])");
    println!("          print(await client.call_tool(\"list_fhir_datastores\", {{}}))");
    println!(
        "          print(await client.call_tool(\"delete_fhir_datastore\", {{\"datastore_id\": \"x\"}}))"
    );
    println!("  asyncio.run(main())");
    println!();
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
