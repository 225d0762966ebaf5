//! Legacy HTTP+SSE upstreams (MCP 2024-11-05): a GET stream that first names, in an
//! `endpoint` event, where to POST messages, then carries every server message as a
//! `message` event. One connection is one upstream session.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tollgate_mcp::events;

use super::channel::{Channel, Routes, TaskGuard};

/// Connection attempts before giving up, and the wait before the first retry
/// (doubled each time).
const ATTEMPTS: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    /// The server's name, for logs.
    pub server: Arc<str>,
    /// The SSE endpoint.
    pub url: reqwest::Url,
    /// Sent with the GET and every POST.
    pub headers: HeaderMap,
    /// Bound on connecting and on each POST.
    pub timeout: Duration,
    /// The client for the GET stream: one that keeps no idle connection, so the
    /// stream always has a connection of its own, read on the lane that reads the
    /// stream. A pooled one may have been opened by another lane, and every event
    /// would then be allocated on one thread and freed on another, which made the
    /// allocator hold tens of MiB under a flood of large events.
    pub stream: reqwest::Client,
}

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every attempt failed; the last reason.
    #[error("could not connect after {ATTEMPTS} attempts: {0}")]
    Failed(String),
}

/// Connects, retrying with backoff, and returns a channel on the new session.
pub async fn connect(http: &reqwest::Client, target: &Target) -> Result<Channel, ConnectError> {
    let mut wait = FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match tokio::time::timeout(target.timeout, connect_once(http, target)).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(why)) => last = why,
            Err(_) => {
                last = format!(
                    "no `endpoint` event within {}s",
                    target.timeout.as_secs_f64()
                );
            }
        }
        tracing::warn!(server = %target.server, attempt, error = %last, "legacy SSE upstream: connection failed");
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    Err(ConnectError::Failed(last))
}

async fn connect_once(http: &reqwest::Client, target: &Target) -> Result<Channel, String> {
    let response = target
        .stream
        .get(target.url.clone())
        .header(header::ACCEPT, "text/event-stream")
        .headers(target.headers.clone())
        .send()
        .await
        .map_err(|e| super::describe(&e))?;
    if !response.status().is_success() {
        return Err(format!("GET {} answered {}", target.url, response.status()));
    }
    let mut stream = Box::pin(events(response.bytes_stream()));
    let endpoint = loop {
        match stream.next().await {
            Some(Ok(event)) if event.event == "endpoint" => break event.data,
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(format!("the SSE stream failed: {err}")),
            None => return Err("the SSE stream ended before its `endpoint` event".into()),
        }
    };
    let endpoint = target
        .url
        .join(endpoint.trim())
        .map_err(|e| format!("`endpoint` event `{endpoint}` is not a URL: {e}"))?;
    // Messages may only go back to the server that was asked, never elsewhere.
    if endpoint.origin() != target.url.origin() {
        return Err(format!(
            "`endpoint` event points at another origin ({endpoint}); refused"
        ));
    }
    tracing::info!(server = %target.server, %endpoint, "legacy SSE upstream connected");

    let routes = Arc::new(Routes::default());
    let (outgoing, messages) = mpsc::channel(64);
    let reader = read_events(stream, routes.clone(), target.server.clone());
    let writer = post_messages(
        http.clone(),
        target.clone(),
        endpoint,
        messages,
        routes.clone(),
    );
    let tasks = vec![
        TaskGuard(tokio::spawn(reader)),
        TaskGuard(tokio::spawn(writer)),
    ];
    Ok(Channel::new(outgoing, routes, tasks, None))
}

/// Delivers each `message` event of the upstream's stream; the stream's end closes the channel.
async fn read_events(
    mut stream: impl futures::Stream<Item = Result<tollgate_mcp::SseEvent, String>> + Unpin,
    routes: Arc<Routes>,
    server: Arc<str>,
) {
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) if event.event.is_empty() || event.event == "message" => {
                match serde_json::from_str::<Value>(&event.data) {
                    Ok(message) => routes.deliver(message).await,
                    Err(err) => {
                        tracing::warn!(server = %server, error = %err, "legacy SSE upstream sent an event that is not JSON; ignored");
                    }
                }
            }
            Ok(_) => {}
            Err(err) => {
                routes.close(&format!("the upstream's SSE stream failed: {err}"));
                return;
            }
        }
    }
    routes.close("the upstream closed its SSE stream");
}

/// POSTs messages one at a time, in order. A failed POST fails its own request.
async fn post_messages(
    http: reqwest::Client,
    target: Target,
    endpoint: reqwest::Url,
    mut messages: mpsc::Receiver<Value>,
    routes: Arc<Routes>,
) {
    while let Some(message) = messages.recv().await {
        let sent = http
            .post(endpoint.clone())
            .headers(target.headers.clone())
            .json(&message)
            .timeout(target.timeout)
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!(
                "upstream `{}` refused the message: POST {endpoint} answered {}",
                target.server,
                response.status()
            )),
            Err(err) => Some(format!(
                "upstream `{}`: POST {endpoint} failed: {}",
                target.server,
                super::describe(&err)
            )),
        };
        if let Some(why) = failure {
            tracing::warn!(server = %target.server, error = %why, "legacy SSE upstream: message not delivered");
            let is_request = message.get("method").is_some();
            match message.get("id").and_then(Value::as_u64) {
                Some(own_id) if is_request => routes.fail(own_id, &why).await,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A legacy SSE server whose first `fail_first` GETs answer 503, and whose
    /// `endpoint` event names `endpoint`.
    async fn server(fail_first: usize, endpoint: &'static str) -> (reqwest::Url, Arc<AtomicUsize>) {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let app = axum::Router::new().route(
            "/sse",
            axum::routing::get(move || {
                let counter = counter.clone();
                async move {
                    use axum::response::IntoResponse;
                    if counter.fetch_add(1, Ordering::SeqCst) < fail_first {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let body = format!("event: endpoint\ndata: {endpoint}\n\n");
                    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/sse", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (reqwest::Url::parse(&url).unwrap(), attempts)
    }

    fn target(url: reqwest::Url) -> Target {
        Target {
            server: "legacy".into(),
            url,
            headers: HeaderMap::new(),
            timeout: Duration::from_secs(5),
            stream: reqwest::Client::new(),
        }
    }

    #[tokio::test]
    async fn connecting_is_retried_with_backoff() {
        let (url, attempts) = server(2, "/messages?session_id=1").await;
        let started = std::time::Instant::now();
        let channel = connect(&reqwest::Client::new(), &target(url))
            .await
            .unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        // Waited 0.2 s, then 0.4 s, before the attempts that followed failures.
        assert!(started.elapsed() >= Duration::from_millis(600));
        drop(channel);
    }

    #[tokio::test]
    async fn giving_up_names_the_last_reason() {
        let (url, attempts) = server(usize::MAX, "/messages").await;
        let err = connect(&reqwest::Client::new(), &target(url))
            .await
            .err()
            .unwrap()
            .to_string();
        assert_eq!(attempts.load(Ordering::SeqCst), ATTEMPTS as usize);
        assert!(
            err.contains("after 3 attempts") && err.contains("503"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_endpoint_on_another_origin_is_refused() {
        let (url, _) = server(0, "http://evil.example/messages").await;
        let err = connect(&reqwest::Client::new(), &target(url))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("another origin"), "{err}");
    }
}
