//! Every error a client can see, mapped to its HTTP and JSON-RPC answer in one place.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tollgate_mcp::{ErrorCode, FramingError, error_response};

/// Why a request was answered by Tollgate itself instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `Host` is not a loopback name (or in `allowed_hosts`) on a loopback listener.
    #[error(
        "host `{0}` is not allowed on this listener (DNS rebinding protection); add it to allowed_hosts"
    )]
    MisdirectedHost(String),
    /// `Host` is not a host (an IP literal or a name, RFC 3986) with an optional port.
    #[error(
        "the Host header {0:?} is not a host name or IP address with an optional port; send the authority of the URL"
    )]
    BadHost(String),
    /// `Origin` is not in `allowed_origins`.
    #[error("origin `{0}` is not allowed; add it to allowed_origins")]
    ForbiddenOrigin(String),
    /// No or wrong bearer key while `clients:` is configured.
    #[error(
        "missing or unknown client key: send `Authorization: Bearer <key>` with a key from `clients:`"
    )]
    Unauthorized,
    /// No access token, where OAuth is configured.
    #[error(
        "this server needs an OAuth access token: get one from the authorization server its protected resource metadata names (see WWW-Authenticate) and send `Authorization: Bearer <token>`"
    )]
    TokenRequired {
        /// `WWW-Authenticate`.
        challenge: HeaderValue,
    },
    /// An access token that is invalid, expired, or not for this server.
    #[error("{reason}: get a new access token for this server")]
    InvalidToken {
        /// Why (never the token).
        reason: &'static str,
        /// `WWW-Authenticate`.
        challenge: HeaderValue,
    },
    /// The token lacks scopes the request needs (step-up, RFC 6750 §3.1).
    #[error(
        "the access token lacks the scope `{scope}` this request needs: ask the authorization server for it and retry"
    )]
    InsufficientScope {
        /// The scopes the request needs, space-separated.
        scope: String,
        /// `WWW-Authenticate`, set by the front door that knows the path.
        challenge: Option<HeaderValue>,
    },
    /// The authorization server's keys could not be had, so no token can be checked.
    #[error("access tokens cannot be checked right now ({0}); retry later")]
    AuthUnavailable(String),
    /// The per-client token bucket is empty.
    #[error("too many requests from {counted} (limits.requests_per_second); retry in {}ms", .wait.as_millis())]
    TooManyRequests {
        /// Until the next request is let in.
        wait: Duration,
        /// Whose requests were counted (`address 203.0.113.9`, `client ci-agent`).
        counted: String,
    },
    /// The body is larger than `limits.max_body`.
    #[error("request body exceeds limits.max_body ({0} bytes)")]
    BodyTooLarge(usize),
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {}s (limits.body_read_timeout)", .0.as_secs_f64())]
    BodyTimeout(Duration),
    /// The body could not be read from the client.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// Not JSON or not JSON-RPC.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// Routing headers disagree with the body.
    #[error("{message}")]
    HeaderMismatch {
        /// The request's id.
        id: Option<Value>,
        /// What disagreed.
        message: String,
    },
    /// A handshake-era request without `Mcp-Session-Id`.
    #[error(
        "missing Mcp-Session-Id header: send `initialize` first and echo the session id it returns"
    )]
    MissingSession,
    /// The session is unknown, expired, or belongs to someone else.
    #[error("unknown or expired session: start a new one with `initialize`")]
    UnknownSession,
    /// `limits.max_sessions` reached.
    #[error(transparent)]
    SessionsFull(#[from] crate::store::sessions::SessionsFull),
    /// No server of that name.
    #[error("no MCP server is served at this path; servers are at /servers/<name>/mcp")]
    UnknownServer,
    /// No server of that name, told to an authenticated client, who may know the others.
    #[error("no MCP server of that name; servers here: {0} (at /servers/<name>/mcp)")]
    UnknownServerOf(String),
    /// More than one server and a request to `/mcp`.
    #[error("several servers are configured: use /servers/<name>/mcp")]
    AmbiguousServer,
    /// The upstream could not be reached or did not answer in time.
    #[error("{message}")]
    Upstream {
        /// The request's id, when it had one.
        id: Option<Value>,
        /// Which upstream and why.
        message: String,
    },
    /// A `tools/call` the policy cannot judge (no string `params.name`, or sent as a
    /// notification); it is never forwarded.
    #[error(
        "tools/call needs an `id` and a string `params.name`; this one cannot be checked against the policy, so it was not forwarded"
    )]
    MalformedToolCall {
        /// The request's id, when it had one.
        id: Option<Value>,
    },
    /// An `initialize` larger than a session may keep.
    #[error(
        "`initialize` request of {size} bytes refused: a session keeps its `initialize` (to re-initialize the upstream), and it may be at most {} KiB", .limit / 1024
    )]
    InitializeTooLarge {
        /// The request's id.
        id: Option<Value>,
        /// Its size, as JSON text.
        size: usize,
        /// The most accepted.
        limit: usize,
    },
    /// A per-client or per-session quota is used up.
    #[error("{0}")]
    Quota(String),
    /// The method is not served on this endpoint.
    #[error("method not allowed on the MCP endpoint")]
    MethodNotAllowed,
    /// The shared state (Redis) is needed and cannot be reached (`state.on_failure: refuse`).
    #[error(
        "{0} (state.on_failure: refuse); nothing was forwarded: retry shortly, the operator must bring Redis back"
    )]
    StateUnavailable(#[from] crate::store::remote::Unavailable),
    /// A session whose upstream lives on another replica (a stdio process, a legacy
    /// SSE connection) reached this one.
    #[error(
        "this session belongs to replica `{replica}`, where its upstream `{server}` runs (a process or connection of that replica; this is replica `{here}`): the load balancer must send each session to one replica, by hashing on the Mcp-Session-Id header"
    )]
    OtherReplica {
        /// The replica that opened the session.
        replica: String,
        /// This replica.
        here: String,
        /// The server.
        server: String,
    },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::BadHost(_) => StatusCode::BAD_REQUEST,
            ProxyError::ForbiddenOrigin(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized
            | ProxyError::TokenRequired { .. }
            | ProxyError::InvalidToken { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            ProxyError::AuthUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MalformedToolCall { id: Some(_) }
            | ProxyError::InitializeTooLarge { id: Some(_), .. } => StatusCode::OK,
            ProxyError::InitializeTooLarge { id: None, .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyRead(_)
            | ProxyError::MalformedToolCall { id: None }
            | ProxyError::Framing(_)
            | ProxyError::HeaderMismatch { .. }
            | ProxyError::MissingSession => StatusCode::BAD_REQUEST,
            ProxyError::UnknownSession
            | ProxyError::UnknownServer
            | ProxyError::UnknownServerOf(_)
            | ProxyError::AmbiguousServer => StatusCode::NOT_FOUND,
            ProxyError::SessionsFull(crate::store::sessions::SessionsFull::Client(..)) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::SessionsFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            // The JSON-RPC error carries the failure, so SDK clients surface it as the
            // answer to their request instead of a transport exception.
            ProxyError::Upstream { id: Some(_), .. } => StatusCode::OK,
            ProxyError::Upstream { id: None, .. } => StatusCode::BAD_GATEWAY,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::OtherReplica { .. } => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            ProxyError::Framing(err) => err.code(),
            ProxyError::HeaderMismatch { .. } => ErrorCode::HeaderMismatch,
            ProxyError::Upstream { .. } | ProxyError::StateUnavailable(_) => {
                ErrorCode::InternalError
            }
            ProxyError::MalformedToolCall { .. } => ErrorCode::InvalidParams,
            _ => ErrorCode::InvalidRequest,
        }
    }

    fn id(&self) -> Option<&Value> {
        match self {
            ProxyError::HeaderMismatch { id, .. }
            | ProxyError::Upstream { id, .. }
            | ProxyError::MalformedToolCall { id }
            | ProxyError::InitializeTooLarge { id, .. } => id.as_ref(),
            _ => None,
        }
    }
}

impl ProxyError {
    /// The JSON-RPC error message for this failure.
    pub fn to_json(&self) -> Value {
        error_response(self.id(), self.code(), &self.to_string(), None)
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = self.to_json();
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ProxyError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ProxyError::TokenRequired { challenge }
            | ProxyError::InvalidToken { challenge, .. }
            | ProxyError::InsufficientScope {
                challenge: Some(challenge),
                ..
            } => {
                headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
            }
            ProxyError::TooManyRequests { wait, .. } => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ProxyError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            }
            _ => {}
        }
        response
    }
}
