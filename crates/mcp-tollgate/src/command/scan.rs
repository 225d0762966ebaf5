//! `tollgate scan --upstream URL` / `tollgate scan -- CMD ARGS`: list an upstream's
//! tools (every page) and print a starter policy.
//!
//! Every upstream is reached through the proxy's own `Upstream` implementations,
//! so `scan` speaks to it exactly as `serve` would.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tollgate_proxy::upstream::http::HttpUpstream;
use tollgate_proxy::upstream::{
    Body, Bridge, Connector, Owner, Payload, Request, Upstream, legacy_sse, stdio,
};

/// Arguments of `tollgate scan`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["upstream", "command"])))]
pub struct ScanArgs {
    /// An MCP endpoint: Streamable HTTP, or legacy HTTP+SSE with `--transport sse`.
    #[arg(long)]
    pub upstream: Option<String>,
    /// How `--upstream` is spoken.
    #[arg(long, value_enum, default_value_t = UpstreamTransport::Http, requires = "upstream")]
    pub transport: UpstreamTransport,
    /// `Authorization` header to send, e.g. "Bearer xyz".
    #[arg(long, env = "TOLLGATE_SCAN_AUTHORIZATION")]
    pub authorization: Option<String>,
    /// A stdio MCP server to start: `tollgate scan -- CMD ARGS`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// The stdio server's environment (with `-- CMD ARGS`).
    #[command(flatten)]
    pub child_env: super::ChildEnv,
}

/// How an `--upstream` URL is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamTransport {
    /// Streamable HTTP.
    Http,
    /// Legacy HTTP+SSE (2024-11-05).
    Sse,
}

/// Runs `tollgate scan`.
pub fn run(args: ScanArgs) -> ExitCode {
    let Some(runtime) = super::client_runtime() else {
        return ExitCode::from(2);
    };
    let result = runtime.block_on(async {
        let target = Target::new(&args)?;
        let tools = list_tools(&target).await;
        target.close().await;
        tools.map(|tools| (target.describe(), tools))
    });
    match result {
        Ok((source, tools)) => {
            print!("{}", starter_policy(&source, &tools));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", super::serve::error_chain(&err));
            ExitCode::from(2)
        }
    }
}

/// The upstream being scanned, reached as the proxy reaches it.
struct Target {
    upstream: Box<dyn Upstream>,
    location: String,
    children: Arc<stdio::Children>,
}

impl Target {
    fn new(args: &ScanArgs) -> anyhow::Result<Target> {
        let http = reqwest::Client::builder().timeout(TIMEOUT).build()?;
        let mut headers = axum::http::HeaderMap::new();
        if let Some(auth) = &args.authorization {
            headers.insert("authorization", auth.parse()?);
        }
        let children = Arc::new(stdio::Children::default());
        let parse =
            |url: &str| reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"));
        let bridge = |connector| -> Box<dyn Upstream> {
            Box::new(Bridge::new(
                "scan".into(),
                connector,
                http.clone(),
                children.clone(),
                TIMEOUT,
            ))
        };
        let (upstream, location) = match (&args.upstream, args.transport) {
            (Some(url), UpstreamTransport::Http) => {
                let upstream = HttpUpstream::new(&parse(url)?, headers, TIMEOUT, MAX_MESSAGE)?;
                (Box::new(upstream) as Box<dyn Upstream>, url.clone())
            }
            (Some(url), UpstreamTransport::Sse) => {
                let target = legacy_sse::Target {
                    server: "scan".into(),
                    url: parse(url)?,
                    headers,
                    timeout: TIMEOUT,
                };
                (bridge(Connector::LegacySse(target)), url.clone())
            }
            (None, _) => {
                let command = stdio::Command {
                    server: "scan".into(),
                    argv: args.command.clone(),
                    env: args.child_env.env.iter().cloned().collect(),
                    inherit_env: args.child_env.inherit_env.clone(),
                    cwd: None,
                    max_line: MAX_MESSAGE,
                };
                let location = command.display();
                (bridge(Connector::Stdio(command)), location)
            }
        };
        Ok(Target {
            upstream,
            location,
            children,
        })
    }

    fn describe(&self) -> String {
        self.location.clone()
    }

    /// Sends `body` and returns the session the upstream issued and its answer (for
    /// a request; `Null` for a notification). A JSON-RPC error fails `what`.
    async fn post(
        &self,
        session: Option<&str>,
        body: Value,
        what: &str,
    ) -> anyhow::Result<(Option<String>, Value)> {
        let owner = Owner {
            client: "scan".into(),
            session: None,
        };
        let request = Request {
            payload: Payload::One(&body),
            session,
            protocol_version: Some("2025-11-25"),
            headers: &[],
            owner: &owner,
        };
        let reply =
            self.upstream.send(request).await.map_err(|failure| {
                anyhow::anyhow!("{}: {what}: upstream {failure}", self.location)
            })?;
        if body.get("id").is_none() {
            return Ok((reply.session, Value::Null));
        }
        let answer = match reply.body.into_events() {
            Body::Json(json) => json.into_value().context("the answer is not JSON")?,
            Body::Events(mut events) => loop {
                let event = tokio::time::timeout(TIMEOUT, events.next())
                    .await
                    .with_context(|| format!("{what}: no answer within {}s", TIMEOUT.as_secs()))?;
                match event {
                    Some(Ok(event)) => {
                        let message = event.data.into_value().context("an event is not JSON")?;
                        if message.get("method").is_none() && message.get("id").is_some() {
                            break message;
                        }
                    }
                    Some(Err(failure)) => bail!("{what}: {failure}"),
                    None => bail!("the SSE answer carried no JSON-RPC response"),
                }
            },
            Body::Empty | Body::Other { .. } | Body::Sse(_) => {
                bail!(
                    "{what}: the upstream answered HTTP {} without JSON-RPC",
                    reply.status
                )
            }
        };
        if let Some(error) = answer.get("error") {
            bail!("{what} failed: {error}");
        }
        Ok((reply.session, answer))
    }

    /// Ends the upstream session and any process started for it.
    async fn close(&self) {
        self.upstream.shutdown().await;
        let children = self.children.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || children.shutdown()).await {
            eprintln!("warning: ending the scanned server failed: {err}");
        }
    }
}

/// Bound on each exchange with the upstream.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer read from the upstream.
const MAX_MESSAGE: usize = 64 << 20;

async fn list_tools(target: &Target) -> anyhow::Result<Vec<Value>> {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "tollgate-scan", "version": env!("CARGO_PKG_VERSION")}}});
    let (session, _) = target.post(None, init, "initialize").await?;
    target
        .post(
            session.as_deref(),
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            "notifications/initialized",
        )
        .await?;
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..1000 {
        let mut params = json!({});
        if let Some(cursor) = &cursor {
            params["cursor"] = json!(cursor);
        }
        let (_, answer) = target
            .post(
                session.as_deref(),
                json!({"jsonrpc": "2.0", "id": 2 + page, "method": "tools/list", "params": params}),
                "tools/list",
            )
            .await?;
        tools.extend(
            answer
                .pointer("/result/tools")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
        cursor = answer
            .pointer("/result/nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    Ok(tools)
}

/// `text` as comment lines, each starting with `prefix`.
fn comment(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// A starter policy: deny by default, reads allowed, destructive tools denied,
/// everything else held for a human, each input schema as a commented skeleton.
pub fn starter_policy(upstream: &str, tools: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Starter policy for {upstream}, written by `tollgate scan`."
    );
    let _ = writeln!(
        out,
        "# Review every rule: annotations are the server's own claims, not guarantees."
    );
    let _ = writeln!(out, "version: 1\ndefault: deny\nrules:");
    if tools.is_empty() {
        let _ = writeln!(out, "  []");
    }
    for tool in tools {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            continue;
        };
        let hint = |key: &str| {
            tool.pointer(&format!("/annotations/{key}"))
                .and_then(Value::as_bool)
                == Some(true)
        };
        if let Some(description) = tool.get("description").and_then(Value::as_str) {
            out.push_str(&comment(description, "  # "));
        }
        let _ = writeln!(out, "  - tool: {}", Value::from(name));
        if hint("readOnlyHint") {
            let _ = writeln!(out, "    action: allow");
        } else if hint("destructiveHint") {
            let _ = writeln!(out, "    action: deny");
            let _ = writeln!(
                out,
                "    reason: {}",
                Value::from(format!(
                    "`{name}` is destructive; edit this rule to allow it"
                ))
            );
        } else {
            let _ = writeln!(out, "    action: require_approval");
            let _ = writeln!(
                out,
                "    reason: {}",
                Value::from(format!(
                    "`{name}` may change things; a human approves each call"
                ))
            );
        }
        if let Some(schema) = tool.get("inputSchema") {
            let _ = writeln!(
                out,
                "    # arguments:  # the tool's input schema; tighten it (patterns, enums) and uncomment"
            );
            let yaml = serde_yaml::to_string(schema).unwrap_or_default();
            out.push_str(&comment(yaml.trim_end(), "    #   "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_starter_policy_compiles_and_follows_the_annotations() {
        let tools = json!([
            {"name": "read_x", "description": "Reads.\nTwo lines.", "annotations": {"readOnlyHint": true}, "inputSchema": {"type": "object"}},
            {"name": "drop: \"all\"", "annotations": {"destructiveHint": true}},
            {"name": "write_x", "inputSchema": {"type": "object", "properties": {"a": {"type": "string"}}}},
        ]);
        let text = starter_policy("http://x/mcp", tools.as_array().unwrap());
        let policy = tollgate_policy::Policy::from_yaml(&text, "scan.yaml").unwrap();
        let none = json!({});
        let call = |tool| tollgate_policy::ToolCall {
            tool,
            arguments: &none,
            client: None,
            session_key: "s",
            client_key: "c",
            user_key: "u",
            claims: None,
            scopes: &[],
        };
        assert_eq!(
            policy.evaluate(&call("read_x")).action,
            tollgate_policy::Action::Allow
        );
        assert_eq!(
            policy.evaluate(&call("drop: \"all\"")).action,
            tollgate_policy::Action::Deny
        );
        assert_eq!(
            policy.evaluate(&call("write_x")).action,
            tollgate_policy::Action::RequireApproval
        );
        assert!(text.contains("  # Reads.\n  # Two lines.\n"));
        assert!(text.contains("#   properties:"));
        let empty = starter_policy("http://x/mcp", &[]);
        tollgate_policy::Policy::from_yaml(&empty, "empty.yaml").unwrap();
    }
}
