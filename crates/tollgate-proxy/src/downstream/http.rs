//! The Streamable HTTP front door (both eras) and the router of every proxy route:
//! `/servers/<name>/mcp` for each server, `/mcp` when there is one, and the
//! legacy SSE routes of [`super::legacy_sse`].
//!
//! A request passes the guard (Host, Origin), is matched to its server,
//! authenticated and rate-checked, its body read (bounded) and decoded once, and
//! handed to the core. The core's answer becomes a JSON body, an SSE stream or 202.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body as HttpBody;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::Either;
use tollgate_mcp::Incoming;

use super::stream::{sse_response, unread};
use super::{Doors, lane_of, legacy_sse, read_body, resource_path};
use crate::error::ProxyError;
use crate::pipeline::{Answer, Caller, Inbound, Meta, Routing};
use crate::state::{Server, Shared};
use crate::upstream::http::SESSION_HEADER;
use crate::upstream::{Body, Event, Lane};

/// How often a quiet stream gets a keep-alive comment. Writing is also how a
/// vanished client is noticed, which ends a held call's wait (its approval stays).
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The proxy's router.
pub fn router(doors: Arc<Doors>) -> Router {
    Router::new()
        .route("/mcp", any(single_server))
        .route("/servers/{name}/mcp", any(named_server))
        .route("/sse", get(legacy_sse::single_stream))
        .route("/messages", post(legacy_sse::single_message))
        .route("/servers/{name}/sse", get(legacy_sse::named_stream))
        .route("/servers/{name}/messages", post(legacy_sse::named_message))
        // RFC 9728: the root document, and one per resource path.
        .route(
            "/.well-known/oauth-protected-resource",
            get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-protected-resource/{*path}",
            get(resource_metadata_of),
        )
        .layer(middleware::from_fn_with_state(doors.clone(), guard))
        .with_state(doors)
}

/// DNS-rebinding and cross-origin protection, before anything else is read.
async fn guard(State(doors): State<Arc<Doors>>, request: Request, next: Next) -> Response {
    match refused(&doors, request.headers()) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// The [`guard`]'s refusal of a request with these headers, if it is refused.
fn refused(doors: &Doors, headers: &HeaderMap) -> Option<Response> {
    let err = doors.guard.check_proxy(headers).err()?;
    tracing::warn!(error = %err, "request refused");
    Some(err.into_response())
}

/// The proxy listener's service: a request to an MCP endpoint goes from the
/// [`guard`] straight to its handler, the rest through the [`router`]. The router's
/// matching, middleware and boxed futures cost each call about 6 % of its
/// instructions (callgrind, docs/benchmarks.md). One per lane: what it serves goes
/// through that lane's upstream connections.
#[derive(Clone)]
pub struct Front {
    doors: Arc<Doors>,
    router: Router,
    lane: Lane,
}

impl Front {
    pub fn new(doors: Arc<Doors>, lane: Lane) -> Front {
        Front {
            router: router(doors.clone()),
            doors,
            lane,
        }
    }
}

impl tower::Service<Request<hyper::body::Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        tower::Service::<Request<hyper::body::Incoming>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: Request<hyper::body::Incoming>) -> Self::Future {
        let Some(name) = mcp_endpoint(request.uri().path()) else {
            // The router's handlers find the lane in the request ([`lane_of`]).
            request.extensions_mut().insert(self.lane);
            return Box::pin(self.router.call(request));
        };
        if let Some(refusal) = refused(&self.doors, request.headers()) {
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        let name = name.map(str::to_owned);
        // The handler's future itself is boxed, with no layer around it: every layer
        // would be one more copy of it per call.
        let served = serve(
            self.doors.clone(),
            name,
            request.map(HttpBody::new),
            self.lane,
        );
        Box::pin(futures::FutureExt::map(served, Ok))
    }
}

/// The server an MCP endpoint's path names: `Some(None)` for `/mcp`, `Some(name)`
/// for `/servers/<name>/mcp`. `None` for any other path, and for a name with an
/// escape (`%`), which only the router decodes.
fn mcp_endpoint(path: &str) -> Option<Option<&str>> {
    if path == "/mcp" {
        return Some(None);
    }
    let name = path.strip_prefix("/servers/")?.strip_suffix("/mcp")?;
    let plain = !name.is_empty() && !name.contains(['/', '%']);
    plain.then_some(Some(name))
}

/// The Protected Resource Metadata document (404 without `auth.oauth`).
async fn resource_metadata(State(doors): State<Arc<Doors>>) -> Response {
    match doors.oauth() {
        Some(oauth) => axum::Json(oauth.metadata()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The metadata of one resource path: a served MCP endpoint's.
async fn resource_metadata_of(
    State(doors): State<Arc<Doors>>,
    Path(path): Path<String>,
) -> Response {
    let servers = doors.shared().servers();
    let parts: Vec<&str> = path.split('/').collect();
    let served = match parts.as_slice() {
        ["mcp" | "sse" | "messages"] => servers.len() == 1,
        ["servers", name, "mcp" | "sse" | "messages"] => servers.contains_key(*name),
        _ => false,
    };
    if !served {
        return StatusCode::NOT_FOUND.into_response();
    }
    resource_metadata(State(doors)).await
}

async fn single_server(State(doors): State<Arc<Doors>>, request: Request) -> Response {
    let lane = lane_of(&request);
    serve(doors, None, request, lane).await
}

async fn named_server(
    State(doors): State<Arc<Doors>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let lane = lane_of(&request);
    serve(doors, Some(name), request, lane).await
}

/// Serves a request to an MCP endpoint. Not an `async fn`: the future it returns is
/// the answer's own, in its span, not one more layer around it.
fn serve(
    doors: Arc<Doors>,
    name: Option<String>,
    request: Request,
    lane: Lane,
) -> impl Future<Output = Response> {
    let server = match doors.server(name.as_deref(), request.headers()) {
        Ok(server) => server,
        Err(err) => return Either::Left(std::future::ready(err.into_response())),
    };
    let session = session_of(request.headers());
    // One span for all of the request: the caller's identification, the body, the core.
    let span = tracing::info_span!(
        "mcp",
        server = &*server.name,
        session = session.as_deref().unwrap_or(""),
        client = tracing::field::Empty,
        tool = tracing::field::Empty,
    );
    let path = resource_path(name.as_deref(), "mcp");
    Either::Right(tracing::Instrument::instrument(
        answer(doors, server, session, path, request, lane),
        span,
    ))
}

/// Answers a request to the MCP endpoint at `path`, within its span.
async fn answer(
    doors: Arc<Doors>,
    server: Arc<Server>,
    session: Option<String>,
    path: String,
    request: Request,
    lane: Lane,
) -> Response {
    let caller = match doors
        .caller(request.headers(), doors.client_address(&request), &path)
        .await
    {
        Ok(caller) => caller,
        Err(err) => {
            tracing::debug!(error = %err, "refused before reading the body");
            return unread(doors.challenge(&path, err).into_response());
        }
    };
    if let Some(client) = caller.shown_name() {
        tracing::Span::current().record("client", client);
    }
    let core = doors.core();
    // Written out here rather than in an inner `async` block: that would be one more
    // layer around the core's future, copied with it.
    let result = match *request.method() {
        Method::POST => {
            let meta = meta_of(request.headers(), session, lane);
            match read_body(doors.shared(), request).await {
                Ok(body) => match Incoming::parse_bytes(body) {
                    Ok(incoming) => {
                        // Pinned where it is made: awaited by value, the core's future
                        // (a few KiB) would be copied once more, every call.
                        let inbound = Inbound { incoming, meta };
                        std::pin::pin!(core.handle(&server, &caller, inbound)).await
                    }
                    Err(err) => Err(err.into()),
                },
                Err(err) => Err(err),
            }
        }
        // Boxed, as rare next to a POST: inline, their futures would be part of
        // every call's (and of the copies made of it).
        Method::GET => {
            let forwarded = forwarded_for_get(request.headers());
            Box::pin(core.listen(&server, &caller, session.as_deref(), forwarded, lane)).await
        }
        Method::DELETE => Box::pin(end(&doors, &server, &caller, session.as_deref(), lane)).await,
        _ => Err(ProxyError::MethodNotAllowed),
    };
    match result {
        Ok(answer) => respond(doors.shared(), answer),
        Err(err) => {
            tracing::debug!(error = %err, "answered with an error");
            doors.challenge(&path, err).into_response()
        }
    }
}

async fn end(
    doors: &Doors,
    server: &Arc<Server>,
    caller: &Caller,
    session: Option<&str>,
    lane: Lane,
) -> Result<Answer, ProxyError> {
    doors.core().end(server, caller, session, lane).await?;
    let mut answer = Answer::accepted();
    answer.status = StatusCode::OK;
    Ok(answer)
}

/// `Mcp-Session-Id`; a value that is not text names no session there is.
fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .map(|v| v.to_str().unwrap_or("").to_owned())
}

/// A POST's [`Meta`]: `session` is its `Mcp-Session-Id` ([`session_of`]).
fn meta_of(headers: &HeaderMap, session: Option<String>, lane: Lane) -> Meta {
    // One pass over the headers, which the `Mcp-Param-*` need anyway, instead of a
    // hashed lookup per routing header. The first value of a name is the one kept,
    // as `HeaderMap::get` would give it.
    let mut routing = Routing::default();
    let mut params = Vec::new();
    for (name, value) in headers {
        let slot = match name.as_str() {
            "mcp-protocol-version" => &mut routing.protocol_version,
            "mcp-method" => &mut routing.method,
            "mcp-name" => &mut routing.name,
            // `Mcp-Param-*` mirror tool arguments for the upstream to check; forward
            // them untouched.
            other => {
                if other.starts_with("mcp-param-") {
                    params.push((name.clone(), value.clone()));
                }
                continue;
            }
        };
        if slot.is_none() {
            *slot = Some(value.clone());
        }
    }
    Meta {
        session,
        routing: Some(routing),
        params,
        trace: crate::telemetry::headers_of(headers),
        pipe: false,
        lane,
    }
}

fn forwarded_for_get(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    ["mcp-protocol-version", "last-event-id"]
        .into_iter()
        .filter_map(|name| Some((HeaderName::from_static(name), headers.get(name)?.clone())))
        .collect()
}

/// The HTTP response for the core's answer.
fn respond(shared: &Arc<Shared>, answer: Answer) -> Response {
    let mut response = match answer.body {
        Body::Empty => answer.status.into_response(),
        Body::Json(json) => (
            answer.status,
            [(header::CONTENT_TYPE, "application/json")],
            json.into_bytes(),
        )
            .into_response(),
        Body::Events(events) => {
            let frames = events
                .take_while(|event| futures::future::ready(event.is_ok()))
                .filter_map(|event| futures::future::ready(event.ok().map(sse_frame)));
            sse(shared, answer.status, frames)
        }
        // The upstream's own framing, byte for byte (its event ids included).
        Body::Sse(bytes) => sse(
            shared,
            answer.status,
            bytes
                .take_while(|chunk| futures::future::ready(chunk.is_ok()))
                .filter_map(|chunk| futures::future::ready(chunk.ok())),
        ),
        Body::Other {
            content_type,
            bytes,
        } => {
            let mut response = (answer.status, HttpBody::from(bytes)).into_response();
            if let Some(content_type) = content_type {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
    };
    let headers = response.headers_mut();
    if let Some(value) = answer
        .session
        .and_then(|id| HeaderValue::from_str(&id).ok())
    {
        headers.insert(SESSION_HEADER, value);
    }
    if let Some(retry_after) = answer.retry_after {
        headers.insert(header::RETRY_AFTER, retry_after);
    }
    response
}

/// An SSE response of `frames`, counted as an open stream, with keep-alive comments.
fn sse(
    shared: &Arc<Shared>,
    status: StatusCode,
    frames: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    sse_response(shared, status, frames, KEEP_ALIVE)
}

/// One event in SSE framing ([`tollgate_mcp::encode`]).
fn sse_frame(event: Event) -> Bytes {
    let data = event.data.into_bytes();
    tollgate_mcp::encode("message", event.id.as_deref(), event.retry, &data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn meta_keeps_each_routing_headers_first_value_and_every_param_header() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("Mcp-Method", "tools/call"),
            ("mcp-param-region", "eu"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("mcp-name", "first"),
            ("mcp-name", "second"),
            ("mcp-method", "later"),
            ("Mcp-Param-Region", "us"),
            ("mcp-param-id", "7"),
            ("mcp-parameter", "not a param header"),
        ] {
            headers.append(
                HeaderName::try_from(name).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        let meta = meta_of(&headers, Some("s1".into()), Lane::FIRST);
        let routing = meta.routing.unwrap();
        // What `HeaderMap::get` gives: the first value of each name.
        assert_eq!(
            routing.protocol_version,
            headers.get("mcp-protocol-version").cloned()
        );
        assert_eq!(routing.method.unwrap(), "tools/call");
        assert_eq!(routing.name.unwrap(), "first");
        let params: Vec<(&str, &str)> = meta
            .params
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            params,
            [
                ("mcp-param-region", "eu"),
                ("mcp-param-region", "us"),
                ("mcp-param-id", "7")
            ]
        );
        assert_eq!(meta.session.as_deref(), Some("s1"));
        // Without the headers, nothing is made up.
        let bare = meta_of(&HeaderMap::new(), None, Lane::FIRST);
        let routing = bare.routing.unwrap();
        assert!(routing.protocol_version.is_none() && routing.method.is_none());
        assert!(routing.name.is_none() && bare.params.is_empty() && bare.session.is_none());
    }

    #[test]
    fn only_plain_mcp_endpoint_paths_skip_the_router() {
        assert_eq!(mcp_endpoint("/mcp"), Some(None));
        assert_eq!(
            mcp_endpoint("/servers/healthlake/mcp"),
            Some(Some("healthlake"))
        );
        // Everything else is the router's: other routes, escapes it decodes, paths
        // it does not match.
        for path in [
            "/mcp/",
            "/mcp/x",
            "/sse",
            "/servers/a%2Fb/mcp",
            "/servers/a%20b/mcp",
            "/servers//mcp",
            "/servers/a/b/mcp",
            "/servers/a/mcp/",
            "/servers/mcp",
            "/MCP",
        ] {
            assert_eq!(mcp_endpoint(path), None, "{path}");
        }
    }
}
