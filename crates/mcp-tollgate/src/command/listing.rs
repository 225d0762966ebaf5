//! Listing an upstream's tools (every page of `tools/list`), for `tollgate scan` and
//! `tollgate lock`. Every upstream is reached through the proxy's own `Upstream`
//! implementations, so the tools listed are the ones `serve` would relay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tollgate_proxy::upstream::http::HttpUpstream;
use tollgate_proxy::upstream::{
    Body, Bridge, Connector, Lane, Owner, Payload, Request, Upstream, legacy_sse, stdio,
};
use tollgate_proxy::{ServerConfig, UpstreamConfig};

/// Where the tools are listed from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A Streamable HTTP endpoint, with these headers.
    Http(String, BTreeMap<String, String>),
    /// A legacy HTTP+SSE endpoint, with these headers.
    Sse(String, BTreeMap<String, String>),
    /// A stdio server to start.
    Stdio {
        /// Program and arguments.
        argv: Vec<String>,
        /// Its extra environment.
        env: BTreeMap<String, String>,
        /// Variables of this environment it inherits.
        inherit_env: Vec<String>,
        /// Its working directory.
        cwd: Option<std::path::PathBuf>,
    },
}

impl Source {
    /// A configured server's upstream.
    pub fn of_server(server: &ServerConfig) -> Source {
        match &server.upstream {
            UpstreamConfig::Http { url } => Source::Http(url.clone(), server.headers.clone()),
            UpstreamConfig::Sse { url } => Source::Sse(url.clone(), server.headers.clone()),
            UpstreamConfig::Stdio {
                command,
                env,
                inherit_env,
                cwd,
                ..
            } => Source::Stdio {
                argv: command.clone(),
                env: env.clone(),
                inherit_env: inherit_env.clone(),
                cwd: cwd.clone(),
            },
        }
    }
}

/// Lists every tool of `source` (all pages), ends what was started for it, and
/// returns where it was (its URL or command line) and the tools.
pub async fn list(source: Source, timeout: Duration) -> anyhow::Result<(String, Vec<Value>)> {
    let target = Target::new(source, timeout)?;
    let tools = list_tools(&target).await;
    target.close().await;
    tools.map(|tools| (target.location.clone(), tools))
}

/// Lists on a runtime of its own, for a command that has none.
pub fn list_blocking(source: Source, timeout: Duration) -> anyhow::Result<(String, Vec<Value>)> {
    let runtime = super::client_runtime().context("no async runtime")?;
    runtime.block_on(list(source, timeout))
}

/// The headers an HTTP or SSE source is reached with, checked as HTTP headers.
fn header_map(headers: &BTreeMap<String, String>) -> anyhow::Result<axum::http::HeaderMap> {
    let mut map = axum::http::HeaderMap::new();
    for (name, value) in headers {
        let name: axum::http::HeaderName = name
            .parse()
            .with_context(|| format!("`{name}` is not a header name"))?;
        let value = value
            .parse()
            .with_context(|| format!("the value of header `{name}` is not valid"))?;
        map.insert(name, value);
    }
    Ok(map)
}

fn parse_url(url: &str) -> anyhow::Result<reqwest::Url> {
    reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))
}

/// The upstream being listed, reached as the proxy reaches it.
struct Target {
    upstream: Box<dyn Upstream>,
    location: String,
    children: Arc<stdio::Children>,
    timeout: Duration,
}

impl Target {
    fn new(source: Source, timeout: Duration) -> anyhow::Result<Target> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        let children = Arc::new(stdio::Children::default());
        let bridge = |connector| -> Box<dyn Upstream> {
            Box::new(Bridge::new(
                "scan".into(),
                connector,
                http.clone(),
                children.clone(),
                timeout,
            ))
        };
        let (upstream, location) = match source {
            Source::Http(url, headers) => {
                let upstream = HttpUpstream::new(
                    &parse_url(&url)?,
                    header_map(&headers)?,
                    timeout,
                    MAX_MESSAGE,
                )?;
                (Box::new(upstream) as Box<dyn Upstream>, url)
            }
            Source::Sse(url, headers) => {
                let target = legacy_sse::Target {
                    server: "scan".into(),
                    url: parse_url(&url)?,
                    headers: header_map(&headers)?,
                    timeout,
                    // One call on one thread: pooling cannot move the stream elsewhere.
                    stream: http.clone(),
                };
                (bridge(Connector::LegacySse(target)), url)
            }
            Source::Stdio {
                argv,
                env,
                inherit_env,
                cwd,
            } => {
                let command = stdio::Command {
                    server: "scan".into(),
                    argv,
                    env,
                    inherit_env,
                    cwd,
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
            timeout,
        })
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
            lane: Lane::FIRST,
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
                let event = tokio::time::timeout(self.timeout, events.next())
                    .await
                    .with_context(|| {
                        format!("{what}: no answer within {}s", self.timeout.as_secs())
                    })?;
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

/// Largest answer read from the upstream.
const MAX_MESSAGE: usize = 64 << 20;

/// Every page of `tools/list` (at most 1000 pages).
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
            return Ok(tools);
        }
    }
    bail!("tools/list: still a next page after 1000 pages; the upstream's cursor does not end")
}

/// An upstream named on the command line, as `scan` and `lock` take it.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// An MCP endpoint: Streamable HTTP, or legacy HTTP+SSE with `--transport sse`.
    #[arg(long)]
    pub upstream: Option<String>,
    /// How `--upstream` is spoken.
    #[arg(long, value_enum, default_value_t = UpstreamTransport::Http, requires = "upstream")]
    pub transport: UpstreamTransport,
    /// `Authorization` header to send, e.g. "Bearer xyz".
    #[arg(long, env = "TOLLGATE_SCAN_AUTHORIZATION")]
    pub authorization: Option<String>,
    /// A stdio MCP server to start: `-- CMD ARGS`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// The stdio server's environment (with `-- CMD ARGS`).
    #[command(flatten)]
    pub child_env: super::ChildEnv,
}

impl UpstreamArgs {
    /// Where to list from; `None` when neither `--upstream` nor a command is given.
    pub fn source(&self) -> Option<Source> {
        let headers = self
            .authorization
            .iter()
            .map(|auth| ("authorization".to_owned(), auth.clone()))
            .collect();
        match (&self.upstream, self.transport) {
            (Some(url), UpstreamTransport::Http) => Some(Source::Http(url.clone(), headers)),
            (Some(url), UpstreamTransport::Sse) => Some(Source::Sse(url.clone(), headers)),
            (None, _) if !self.command.is_empty() => Some(Source::Stdio {
                argv: self.command.clone(),
                env: self.child_env.env.iter().cloned().collect(),
                inherit_env: self.child_env.inherit_env.clone(),
                cwd: None,
            }),
            (None, _) => None,
        }
    }
}

/// How an `--upstream` URL is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamTransport {
    /// Streamable HTTP.
    Http,
    /// Legacy HTTP+SSE (2024-11-05).
    Sse,
}

/// Bound on each exchange with the upstream.
pub const TIMEOUT: Duration = Duration::from_secs(30);
