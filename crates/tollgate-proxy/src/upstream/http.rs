//! Streamable HTTP upstreams: one POST per message (or batch), a GET for the
//! session's server-to-client stream, a DELETE to end a session.
//!
//! Each upstream has a connection pool per lane ([`pool`]), its URI parsed once and
//! the headers every request carries (`Host`, `Accept`, `Content-Type`, the server's
//! own `headers:`) built once: per call only the client's forwarded headers and the
//! session id are added.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::pool::{self, Lease, Pool};
use super::{Body, Failure, Json, Lane, Reply, Request, Upstream, describe};

/// Session id header of the handshake era.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");

const PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// An upstream that speaks Streamable HTTP.
pub struct HttpUpstream {
    /// One pool per lane ([`super::Lane`]): a lane's upstream connections are driven on
    /// its own thread.
    pools: Vec<std::sync::Arc<Pool>>,
    /// Where connections go (scheme, host, port).
    uri: Uri,
    /// The request target: the path and query (HTTP/1's origin form).
    target: Uri,
    /// The server's own `headers:` (credentials), which win over a client's.
    own: HeaderMap,
    /// What a POST carries: `Accept`, `Content-Type` and `own`.
    post: HeaderMap,
    /// What a GET carries: `Accept: text/event-stream` and `own`.
    get: HeaderMap,
    /// What a DELETE carries: `Accept` and `own`.
    delete: HeaderMap,
    timeout: Duration,
    max_message: usize,
}

/// Why an upstream URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("`{url}` cannot be used as an upstream URL: {why}")]
pub struct BadUrl {
    url: String,
    why: String,
}

impl HttpUpstream {
    /// An upstream at `url` (http or https) with its own connection pool; `headers`
    /// go with every request. A user name and password in the URL become a basic
    /// `Authorization` header unless `headers` has one.
    pub fn new(
        url: &reqwest::Url,
        headers: HeaderMap,
        timeout: Duration,
        max_message: usize,
    ) -> Result<HttpUpstream, BadUrl> {
        let bad = |why: String| BadUrl {
            url: url.to_string(),
            why,
        };
        let mut bare = url.clone();
        let mut own = headers;
        if !bare.username().is_empty() && !own.contains_key(header::AUTHORIZATION) {
            use base64::Engine as _;
            let pair = format!("{}:{}", bare.username(), bare.password().unwrap_or(""));
            let pair = percent_decoded(&pair);
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut value =
                HeaderValue::from_str(&format!("Basic {basic}")).map_err(|e| bad(e.to_string()))?;
            value.set_sensitive(true);
            own.insert(header::AUTHORIZATION, value);
        }
        // The credentials travel in the header, never in the request line.
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        bare.set_fragment(None);
        let uri = Uri::try_from(bare.as_str()).map_err(|e| bad(e.to_string()))?;
        let target = uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
        let host = host_header(&uri).ok_or_else(|| bad("it has no host".to_owned()))?;
        let with = |pairs: &[(HeaderName, &'static str)]| {
            let mut map = HeaderMap::with_capacity(pairs.len() + own.len() + 5);
            // The server's own `Host`, if its `headers:` name one, wins (below).
            if !own.contains_key(header::HOST) {
                map.insert(header::HOST, host.clone());
            }
            for (name, value) in pairs {
                map.insert(name.clone(), HeaderValue::from_static(value));
            }
            for (name, value) in &own {
                map.append(name.clone(), value.clone());
            }
            map
        };
        const BOTH: &str = "application/json, text/event-stream";
        let post = with(&[
            (header::ACCEPT, BOTH),
            (header::CONTENT_TYPE, "application/json"),
        ]);
        let get = with(&[(header::ACCEPT, "text/event-stream")]);
        let delete = with(&[(header::ACCEPT, BOTH)]);
        Ok(HttpUpstream {
            pools: vec![Pool::new()],
            uri,
            target,
            own,
            post,
            get,
            delete,
            timeout,
            max_message,
        })
    }

    /// The same upstream with a connection pool for each of `lanes` (one, else).
    pub fn with_lanes(mut self, lanes: super::Lanes) -> HttpUpstream {
        self.pools = lanes.each().map(|_| Pool::new()).collect();
        self
    }

    /// `lane`'s pool.
    fn pool(&self, lane: Lane) -> &std::sync::Arc<Pool> {
        // There is always at least one pool.
        &self.pools[lane.index() % self.pools.len()]
    }

    /// The request's headers: the prebuilt ones, then the client's forwarded
    /// headers (unless the server's own name them) and the session id.
    fn headers(
        &self,
        base: &HeaderMap,
        session: Option<&str>,
        forwarded: &[(HeaderName, HeaderValue)],
    ) -> HeaderMap {
        let mut headers = base.clone();
        for (name, value) in forwarded {
            if !self.own.contains_key(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(session) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
            headers.insert(SESSION_HEADER, session);
        }
        headers
    }

    /// Sends within the timeout; a failure to connect means nothing was sent.
    async fn exchange(
        &self,
        lane: Lane,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Reply, Failure> {
        let mut request = hyper::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = self.target.clone();
        *request.headers_mut() = headers;
        let sent =
            tokio::time::timeout(self.timeout, self.pool(lane).send(&self.uri, request)).await;
        let (response, lease) = match sent {
            Err(_) => return Err(Failure::Timeout(self.timeout)),
            Ok(Err(pool::Error::Connect(why))) => return Err(Failure::Unreachable(why)),
            Ok(Err(pool::Error::Http(err))) => return Err(Failure::Broken(describe(&err))),
            Ok(Ok(sent)) => sent,
        };
        reply(response, lease, self.timeout, self.max_message).await
    }
}

/// The `Host` header for `uri`: its host, and its port unless it is the scheme's own.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let text = match uri.port_u16() {
        Some(port) if port != default => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&text).ok()
}

/// `%xx` in a URL's user name or password, decoded (RFC 3986 §3.2.1).
fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes
            .get(at + 1..at + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[at], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    out
}

impl Upstream for HttpUpstream {
    fn send<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            let mut headers = self.headers(&self.post, request.session, request.headers);
            if let (false, Some(version)) = (
                headers.contains_key(PROTOCOL_VERSION),
                request.protocol_version,
            ) && let Ok(version) = HeaderValue::from_str(version)
            {
                headers.insert(PROTOCOL_VERSION, version);
            }
            self.exchange(
                request.lane,
                Method::POST,
                headers,
                request.payload.to_bytes(),
            )
            .await
        })
    }

    fn listen<'a>(
        &'a self,
        lane: Lane,
        session: Option<&'a str>,
        headers: &'a [(HeaderName, HeaderValue)],
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        let headers = self.headers(&self.get, session, headers);
        Box::pin(self.exchange(lane, Method::GET, headers, Bytes::new()))
    }

    fn end<'a>(&'a self, lane: Lane, session: &'a str) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let headers = self.headers(&self.delete, Some(session), &[]);
            let reply = self
                .exchange(lane, Method::DELETE, headers, Bytes::new())
                .await?;
            tracing::debug!(status = %reply.status, "upstream session ended");
            Ok(())
        })
    }
}

fn content_type_is(content_type: Option<&HeaderValue>, prefix: &str) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with(prefix))
}

/// The headers of an upstream response that Tollgate reads, each its first value
/// (as `HeaderMap::get` gives it), found in one pass instead of a hashed lookup each.
#[derive(Default)]
struct Read<'a> {
    content_type: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
    retry_after: Option<&'a HeaderValue>,
    session: Option<&'a HeaderValue>,
}

impl<'a> Read<'a> {
    fn of(headers: &'a HeaderMap) -> Read<'a> {
        let mut read = Read::default();
        for (name, value) in headers {
            let slot = if name == header::CONTENT_TYPE {
                &mut read.content_type
            } else if name == header::CONTENT_LENGTH {
                &mut read.content_length
            } else if name == header::RETRY_AFTER {
                &mut read.retry_after
            } else if name == SESSION_HEADER {
                &mut read.session
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        read
    }
}

/// The answer of an upstream response: a stream of events, or the body read whole
/// (within `timeout`, at most `max` bytes).
async fn reply(
    response: hyper::Response<Incoming>,
    mut lease: Lease,
    timeout: Duration,
    max: usize,
) -> Result<Reply, Failure> {
    let (parts, incoming) = response.into_parts();
    let heads = Read::of(&parts.headers);
    let session = heads
        .session
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = if content_type_is(heads.content_type, "text/event-stream") {
        let bytes = lease
            .stream(incoming)
            .map_err(|err| Failure::Broken(format!("its event stream failed: {}", describe(&err))));
        Body::Sse(bytes.boxed())
    } else {
        let declared = heads
            .content_length
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let read = tokio::time::timeout(timeout, read_whole(incoming, declared, max));
        let bytes = match lease.drive(read).await {
            Ok(bytes) => bytes?,
            Err(_) => return Err(Failure::Timeout(timeout)),
        };
        lease.done();
        if bytes.is_empty() {
            Body::Empty
        } else if content_type_is(heads.content_type, "application/json") {
            Body::Json(Json::Text(bytes))
        } else {
            Body::Other {
                content_type: heads.content_type.cloned(),
                bytes,
            }
        }
    };
    Ok(Reply {
        status: parts.status,
        session,
        retry_after: heads.retry_after.cloned(),
        body,
    })
}

/// Reads a body of at most `max` bytes; a body in one piece is not copied.
async fn read_whole(
    mut incoming: Incoming,
    declared: Option<usize>,
    max: usize,
) -> Result<Bytes, Failure> {
    if declared.is_some_and(|n| n > max) {
        return Err(Failure::TooLarge(max));
    }
    let broke =
        |err: hyper::Error| Failure::Broken(format!("its answer broke off: {}", describe(&err)));
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    while let Some(frame) = incoming.frame().await {
        let Ok(chunk) = frame.map_err(broke)?.into_data() else {
            continue; // trailers
        };
        let so_far = first.as_ref().map_or(0, Bytes::len) + more.as_ref().map_or(0, BytesMut::len);
        if so_far + chunk.len() > max {
            return Err(Failure::TooLarge(max));
        }
        match (&first, &mut more) {
            (None, _) => first = Some(chunk),
            (Some(head), None) => {
                let mut body =
                    BytesMut::with_capacity(declared.unwrap_or(0).max(head.len() + chunk.len()));
                body.extend_from_slice(head);
                body.extend_from_slice(&chunk);
                more = Some(body);
            }
            (Some(_), Some(body)) => body.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, more) {
        (_, Some(body)) => body.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn an_answers_headers_are_read_as_get_reads_them() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("date", "today"),
            ("Content-Type", "application/json"),
            ("mcp-session-id", "s1"),
            ("content-type", "text/plain"),
            ("Retry-After", "3"),
            ("Mcp-Session-Id", "s2"),
            ("content-length", "10"),
        ] {
            headers.append(
                HeaderName::try_from(name).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        let heads = Read::of(&headers);
        for (read, name) in [
            (heads.content_type, header::CONTENT_TYPE),
            (heads.content_length, header::CONTENT_LENGTH),
            (heads.retry_after, header::RETRY_AFTER),
            (heads.session, SESSION_HEADER),
        ] {
            assert_eq!(read, headers.get(&name), "{name}");
            assert!(read.is_some(), "{name}");
        }
        let none = HeaderMap::new();
        let heads = Read::of(&none);
        assert!(heads.content_type.is_none() && heads.content_length.is_none());
        assert!(heads.retry_after.is_none() && heads.session.is_none());
    }

    #[test]
    fn credentials_in_the_url_become_a_basic_header() {
        let url = reqwest::Url::parse("http://al%40ice:s3cret@127.0.0.1:9/mcp?x=1#frag").unwrap();
        let upstream =
            HttpUpstream::new(&url, HeaderMap::new(), Duration::from_secs(1), 1).unwrap();
        assert_eq!(upstream.uri.to_string(), "http://127.0.0.1:9/mcp?x=1");
        // base64("al@ice:s3cret")
        assert_eq!(
            upstream.post[header::AUTHORIZATION],
            "Basic YWxAaWNlOnMzY3JldA=="
        );
        let mut own = HeaderMap::new();
        own.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let upstream = HttpUpstream::new(&url, own, Duration::from_secs(1), 1).unwrap();
        assert_eq!(upstream.post[header::AUTHORIZATION], "Bearer t");
    }

    #[tokio::test]
    async fn an_https_upstream_is_reached_over_tls() {
        // A plain-text server behind an https URL: the TLS handshake fails, which is
        // a failure to connect (nothing was sent), not a request sent in the clear.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 5];
            socket.read_exact(&mut hello).await.unwrap();
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            hello
        });
        let url = reqwest::Url::parse(&format!("https://127.0.0.1:{port}/mcp")).unwrap();
        let upstream =
            HttpUpstream::new(&url, HeaderMap::new(), Duration::from_secs(5), 1 << 20).unwrap();
        let failure = upstream
            .exchange(
                Lane::FIRST,
                Method::POST,
                upstream.post.clone(),
                Bytes::from_static(b"{}"),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::Unreachable(_)), "{failure}");
        // The first bytes on the wire were a TLS handshake record, not an HTTP request.
        assert_eq!(server.await.unwrap()[0], 0x16);
    }

    /// A server that answers every request on a connection with `answers[i]` (the
    /// i-th request of that connection), and tells each request's head and the
    /// connection's number. After the last answer it closes the connection when
    /// `close` is notified, and tells that too (head `closed`).
    async fn scripted(
        answers: &'static [&'static str],
        close: std::sync::Arc<tokio::sync::Notify>,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<(usize, String)>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (heads, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for number in 0.. {
                let (socket, _) = listener.accept().await.unwrap();
                let heads = heads.clone();
                let close = close.clone();
                tokio::spawn(async move {
                    let mut socket = tokio::io::BufReader::new(socket);
                    for answer in answers {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if socket.read_line(&mut line).await.unwrap() == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |n| n.trim().parse().unwrap());
                        let mut body = vec![0; length];
                        socket.read_exact(&mut body).await.unwrap();
                        socket.write_all(answer.as_bytes()).await.unwrap();
                        heads.send((number, head)).unwrap();
                    }
                    close.notified().await;
                    drop(socket);
                    heads.send((number, "closed".to_owned())).unwrap();
                });
            }
        });
        (port, seen)
    }

    const JSON: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    const SSE: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 13\r\n\r\ndata: {}\n\nx\n\n";

    #[tokio::test]
    async fn connections_are_kept_and_one_the_server_closed_is_not_used() {
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let (port, mut seen) = scripted(&[JSON, SSE], close.clone()).await;
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/mcp?x=1")).unwrap();
        let upstream =
            HttpUpstream::new(&url, HeaderMap::new(), Duration::from_secs(5), 1 << 20).unwrap();
        let call = || {
            upstream.exchange(
                Lane::FIRST,
                Method::POST,
                upstream.post.clone(),
                Bytes::from_static(b"{}"),
            )
        };
        let reply = call().await.unwrap();
        assert!(matches!(reply.body, Body::Json(_)));
        let (number, head) = seen.recv().await.unwrap();
        assert_eq!(number, 0);
        // Origin form, and the host the URL names.
        assert!(head.starts_with("POST /mcp?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
        // The second call goes on the same connection; its streamed answer is read
        // to the end, after which the server closes the kept connection.
        let Body::Sse(events) = call().await.unwrap().body else {
            panic!("an event stream")
        };
        let read: Vec<Bytes> = events.try_collect().await.unwrap();
        assert_eq!(read.concat(), b"data: {}\n\nx\n\n");
        assert_eq!(seen.recv().await.unwrap().0, 0);
        close.notify_one();
        assert_eq!(seen.recv().await.unwrap(), (0, "closed".to_owned()));
        // The closed connection is noticed, not used: the third call opens another.
        let reply = call().await.unwrap();
        assert!(matches!(reply.body, Body::Json(_)));
        assert_eq!(seen.recv().await.unwrap().0, 1);
    }

    #[test]
    fn the_host_header_is_the_urls_unless_the_server_names_its_own() {
        let url = reqwest::Url::parse("http://127.0.0.1:9/mcp").unwrap();
        let upstream =
            HttpUpstream::new(&url, HeaderMap::new(), Duration::from_secs(1), 1).unwrap();
        assert_eq!(
            upstream
                .post
                .get_all(header::HOST)
                .iter()
                .collect::<Vec<_>>(),
            ["127.0.0.1:9"]
        );
        let url = reqwest::Url::parse("https://example.com:443/mcp").unwrap();
        let upstream =
            HttpUpstream::new(&url, HeaderMap::new(), Duration::from_secs(1), 1).unwrap();
        assert_eq!(upstream.get[header::HOST], "example.com");
        let mut own = HeaderMap::new();
        own.insert(header::HOST, HeaderValue::from_static("mcp.internal"));
        let upstream = HttpUpstream::new(&url, own, Duration::from_secs(1), 1).unwrap();
        for headers in [&upstream.post, &upstream.get, &upstream.delete] {
            assert_eq!(
                headers.get_all(header::HOST).iter().collect::<Vec<_>>(),
                ["mcp.internal"]
            );
        }
    }

    #[test]
    fn the_servers_own_headers_win_over_forwarded_ones() {
        let url = reqwest::Url::parse("http://127.0.0.1:9/mcp").unwrap();
        let mut own = HeaderMap::new();
        own.insert("x-team", HeaderValue::from_static("ours"));
        let upstream = HttpUpstream::new(&url, own, Duration::from_secs(1), 1).unwrap();
        let forwarded = [
            (
                HeaderName::from_static("x-team"),
                HeaderValue::from_static("theirs"),
            ),
            (
                HeaderName::from_static("mcp-method"),
                HeaderValue::from_static("tools/call"),
            ),
        ];
        let headers = upstream.headers(&upstream.post, Some("s-1"), &forwarded);
        assert_eq!(
            headers.get_all("x-team").iter().collect::<Vec<_>>(),
            ["ours"]
        );
        assert_eq!(headers["mcp-method"], "tools/call");
        assert_eq!(headers[SESSION_HEADER], "s-1");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(upstream.get[header::ACCEPT], "text/event-stream");
    }
}
