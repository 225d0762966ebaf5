//! Streamable HTTP upstreams: one POST per message (or batch), a GET for the
//! session's server-to-client stream, a DELETE to end a session.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::{Body, Failure, Json, Reply, Request, Upstream, describe};

/// Session id header of the handshake era.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");

/// An upstream that speaks Streamable HTTP.
pub struct HttpUpstream {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The server's own `headers:` (credentials), sent with every request.
    headers: HeaderMap,
    timeout: Duration,
    max_message: usize,
}

impl HttpUpstream {
    /// An upstream at `url`, reached with `client` (the shared pool).
    pub fn new(
        client: reqwest::Client,
        url: reqwest::Url,
        headers: HeaderMap,
        timeout: Duration,
        max_message: usize,
    ) -> HttpUpstream {
        HttpUpstream {
            client,
            url,
            headers,
            timeout,
            max_message,
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        session: Option<&str>,
        forwarded: &[(HeaderName, HeaderValue)],
    ) -> reqwest::RequestBuilder {
        let accept = if method == reqwest::Method::GET {
            "text/event-stream"
        } else {
            "application/json, text/event-stream"
        };
        let mut request = self
            .client
            .request(method, self.url.clone())
            .header(header::ACCEPT, accept);
        for (name, value) in forwarded {
            request = request.header(name, value);
        }
        if let Some(session) = session {
            request = request.header(SESSION_HEADER, session);
        }
        request.headers(self.headers.clone())
    }

    /// Sends within the timeout; a failure to connect means nothing was sent.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Reply, Failure> {
        let sent = match tokio::time::timeout(self.timeout, request.send()).await {
            Err(_) => return Err(Failure::Timeout(self.timeout)),
            Ok(Err(err)) if err.is_timeout() => return Err(Failure::Timeout(self.timeout)),
            Ok(Err(err)) if err.is_connect() => return Err(Failure::Unreachable(describe(&err))),
            Ok(Err(err)) => return Err(Failure::Broken(describe(&err))),
            Ok(Ok(response)) => response,
        };
        reply(sent, self.timeout, self.max_message).await
    }
}

impl Upstream for HttpUpstream {
    fn send<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            let mut builder = self
                .request(reqwest::Method::POST, request.session, request.headers)
                .header(header::CONTENT_TYPE, "application/json")
                .body(request.payload.to_bytes());
            let has_version = request
                .headers
                .iter()
                .any(|(name, _)| name == "mcp-protocol-version");
            if let (false, Some(version)) = (has_version, request.protocol_version) {
                builder = builder.header("mcp-protocol-version", version);
            }
            self.exchange(builder).await
        })
    }

    fn listen<'a>(
        &'a self,
        session: Option<&'a str>,
        headers: &'a [(HeaderName, HeaderValue)],
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(self.exchange(self.request(reqwest::Method::GET, session, headers)))
    }

    fn end<'a>(&'a self, session: &'a str) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let reply = self
                .exchange(self.request(reqwest::Method::DELETE, Some(session), &[]))
                .await?;
            tracing::debug!(status = %reply.status, "upstream session ended");
            Ok(())
        })
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

/// The answer of an upstream response: a stream of events, or the body read whole
/// (within `timeout`, at most `max` bytes).
async fn reply(
    response: reqwest::Response,
    timeout: Duration,
    max: usize,
) -> Result<Reply, Failure> {
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers().clone();
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = if is_event_stream(&headers) {
        let bytes = response
            .bytes_stream()
            .map_err(|err| Failure::Broken(format!("its event stream failed: {}", describe(&err))));
        Body::Sse(bytes.boxed())
    } else {
        let bytes = match tokio::time::timeout(timeout, read_whole(response, max)).await {
            Ok(bytes) => bytes?,
            Err(_) => return Err(Failure::Timeout(timeout)),
        };
        if bytes.is_empty() {
            Body::Empty
        } else if is_json(&headers) {
            Body::Json(Json::Text(bytes))
        } else {
            Body::Other {
                content_type: headers.get(header::CONTENT_TYPE).cloned(),
                bytes,
            }
        }
    };
    Ok(Reply {
        status,
        session,
        retry_after: headers.get(header::RETRY_AFTER).cloned(),
        body,
    })
}

/// Reads a body of at most `max` bytes.
async fn read_whole(response: reqwest::Response, max: usize) -> Result<Bytes, Failure> {
    let declared = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Failure::TooLarge(max));
    }
    let mut stream = response.bytes_stream().map_err(|e| describe(&e));
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|why| Failure::Broken(format!("its answer broke off: {why}")))?;
        if body.len() + chunk.len() > max {
            return Err(Failure::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
