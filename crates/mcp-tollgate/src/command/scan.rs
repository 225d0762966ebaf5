//! `tollgate scan --upstream URL` / `tollgate scan -- CMD ARGS`: list an upstream's
//! tools (every page) and print a starter policy.
//!
//! stdio and legacy SSE upstreams are reached through the proxy's own bridge, so
//! `scan` speaks to them exactly as `serve` would.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

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
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// The upstream being scanned.
enum Target {
    Http {
        http: reqwest::Client,
        url: String,
        authorization: Option<String>,
    },
    Bridged {
        bridge: Box<tollgate_proxy::upstream::Bridge>,
        children: std::sync::Arc<tollgate_proxy::upstream::stdio::Children>,
    },
}

impl Target {
    fn new(args: &ScanArgs) -> anyhow::Result<Target> {
        use tollgate_proxy::upstream::{Bridge, Connector, legacy_sse, stdio};
        let http = reqwest::Client::builder().timeout(TIMEOUT).build()?;
        let connector = match (&args.upstream, args.transport) {
            (Some(url), UpstreamTransport::Http) => {
                return Ok(Target::Http {
                    http,
                    url: url.clone(),
                    authorization: args.authorization.clone(),
                });
            }
            (Some(url), UpstreamTransport::Sse) => {
                let mut headers = axum::http::HeaderMap::new();
                if let Some(auth) = &args.authorization {
                    headers.insert("authorization", auth.parse()?);
                }
                Connector::LegacySse(legacy_sse::Target {
                    server: "scan".into(),
                    url: reqwest::Url::parse(url)
                        .with_context(|| format!("`{url}` is not a URL"))?,
                    headers,
                    timeout: TIMEOUT,
                })
            }
            (None, _) => Connector::Stdio(stdio::Command {
                server: "scan".into(),
                argv: args.command.clone(),
                env: Default::default(),
                inherit_env: Vec::new(),
                cwd: None,
                max_line: 64 << 20,
            }),
        };
        let children = std::sync::Arc::new(stdio::Children::default());
        Ok(Target::Bridged {
            bridge: Box::new(Bridge::new(
                "scan".into(),
                connector,
                http,
                children.clone(),
            )),
            children,
        })
    }

    fn describe(&self) -> String {
        match self {
            Target::Http { url, .. } => url.clone(),
            Target::Bridged { bridge, .. } => bridge.location(),
        }
    }

    async fn post(&self, session: Option<&str>, body: Value) -> anyhow::Result<reqwest::Response> {
        match self {
            Target::Http {
                http,
                url,
                authorization,
            } => {
                let mut request = http
                    .post(url)
                    .header("accept", "application/json, text/event-stream")
                    .header("mcp-protocol-version", "2025-11-25")
                    .json(&body);
                if let Some(session) = session {
                    request = request.header("mcp-session-id", session);
                }
                if let Some(auth) = authorization {
                    request = request.header("authorization", auth);
                }
                request
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {url}"))
            }
            Target::Bridged { bridge, .. } => {
                let mut headers = axum::http::HeaderMap::new();
                if let Some(session) = session {
                    headers.insert("mcp-session-id", session.parse()?);
                }
                let answer = bridge.handle(
                    axum::http::Method::POST,
                    &headers,
                    Some(serde_json::to_vec(&body)?),
                );
                let answer = tokio::time::timeout(TIMEOUT, answer)
                    .await
                    .with_context(|| {
                        format!(
                            "{} did not answer within {}s",
                            bridge.location(),
                            TIMEOUT.as_secs()
                        )
                    })?;
                Ok(reqwest::Response::from(answer))
            }
        }
    }

    /// Ends the upstream session and any process started for it.
    async fn close(&self) {
        if let Target::Bridged { bridge, children } = self {
            bridge.shutdown().await;
            let children = children.clone();
            let _ = tokio::task::spawn_blocking(move || children.shutdown()).await;
        }
    }
}

/// Bound on each exchange with the upstream.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The body of a JSON or single-message SSE answer.
fn answer_of(content_type: &str, text: &str) -> anyhow::Result<Value> {
    if content_type.starts_with("text/event-stream") {
        let data = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v.get("id").is_some());
        return data.context("the SSE answer carried no JSON-RPC response");
    }
    serde_json::from_str(text).context("the answer is not JSON")
}

/// The JSON-RPC answer of a response (JSON or SSE); a JSON-RPC error fails `what`.
async fn read_answer(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let answer = answer_of(&kind, &response.text().await?)?;
    if let Some(error) = answer.get("error") {
        bail!("{what} failed: {error}");
    }
    Ok(answer)
}

async fn list_tools(target: &Target) -> anyhow::Result<Vec<Value>> {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "tollgate-scan", "version": env!("CARGO_PKG_VERSION")}}});
    let response = target.post(None, init).await?;
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    read_answer(response, "initialize").await?;
    target
        .post(
            session.as_deref(),
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await?;
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..1000 {
        let mut params = json!({});
        if let Some(cursor) = &cursor {
            params["cursor"] = json!(cursor);
        }
        let response = target
            .post(
                session.as_deref(),
                json!({"jsonrpc": "2.0", "id": 2 + page, "method": "tools/list", "params": params}),
            )
            .await?;
        let answer = read_answer(response, "tools/list").await?;
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
