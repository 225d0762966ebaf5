//! The front doors: Streamable HTTP ([`http`]), legacy HTTP+SSE ([`legacy_sse`])
//! and stdio (through [`conversation`]). Each authenticates once, decodes once and
//! hands messages to the core ([`crate::pipeline::Core`]); none of them decides
//! anything about a call.

pub mod conversation;
pub mod forwarded;
pub mod http;
pub mod legacy_sse;
pub mod listener;
pub mod oauth;
pub mod proxy_protocol;
pub mod stream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, header};
use futures::{Stream, StreamExt};

use crate::config::Config;
use crate::error::ProxyError;
use crate::pipeline::{Caller, Core};
use crate::state::{BuildError, Server, Shared};
use crate::store::limits::ClientRate;
use crate::upstream::Lane;

/// An authenticated client.
struct Client {
    name: Arc<str>,
    key: Vec<u8>,
}

/// DNS-rebinding and cross-origin protection.
#[derive(Clone)]
pub struct Guard {
    allowed_origins: Arc<[String]>,
    allowed_hosts: Arc<[String]>,
    loopback: bool,
}

impl Guard {
    /// The proxy listener's guard, from the configuration.
    pub fn new(config: &Config) -> Guard {
        Guard {
            allowed_origins: config.allowed_origins.clone().into(),
            allowed_hosts: config.allowed_hosts.clone().into(),
            loopback: config.listen.ip().is_loopback(),
        }
    }

    /// Checks a request to the proxy listener.
    pub fn check_proxy(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        self.check(self.loopback, false, headers)
    }

    /// DNS-rebinding and cross-origin checks. On a loopback listener the `Host`
    /// must be a loopback name or in `allowed_hosts`; an `Origin` must be in
    /// `allowed_origins`, or, when `same_origin_ok` (the admin page calling its own
    /// API), the listener itself.
    pub fn check(
        &self,
        loopback_listener: bool,
        same_origin_ok: bool,
        headers: &HeaderMap,
    ) -> Result<(), ProxyError> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let name = match host {
            "" => "",
            _ => authority(host).ok_or_else(|| ProxyError::BadHost(host.to_owned()))?,
        };
        if loopback_listener
            && !is_loopback(name)
            && !self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
        {
            return Err(ProxyError::MisdirectedHost(host.to_owned()));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let same_origin = same_origin_ok
                && !host.is_empty()
                && (origin == format!("http://{host}") || origin == format!("https://{host}"));
            let loopback_origin = loopback_listener
                && origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .is_some_and(|authority| {
                        !authority.contains(['/', '@', '?', '#'])
                            && is_loopback(host_name(authority))
                    });
            if !same_origin && !loopback_origin && !self.allowed_origins.iter().any(|o| o == origin)
            {
                return Err(ProxyError::ForbiddenOrigin(origin.to_owned()));
            }
        }
        Ok(())
    }
}

/// Whether a host name is a loopback one.
fn is_loopback(name: &str) -> bool {
    // The usual names first: no parse on every call.
    matches!(name, "127.0.0.1" | "localhost")
        || name.eq_ignore_ascii_case("localhost")
        || matches!(name, "[::1]" | "::1")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `Host` is `host [":" port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP
/// literal in brackets, an IPv4 address, or a name of letters, digits, `-`, `.` and
/// `_`; the port digits only. `[::1]evil.example`, `a b`, `x@y` are not. Its host
/// name (as [`host_name`] gives it) when it is one: the check reads the `Host` once.
fn authority(host: &str) -> Option<&str> {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let (literal, after) = rest.split_once(']')?;
            literal.parse::<std::net::Ipv6Addr>().ok()?;
            let name = &host[..literal.len() + 2];
            match after {
                "" => return Some(name),
                _ => (name, after.strip_prefix(':')?),
            }
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name, port),
            None => (host, "1"),
        },
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let name_ok = host.starts_with('[')
        || (!name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    (port_ok && name_ok).then_some(name)
}

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            name
        } else {
            host
        }
    })
}

/// What every front door shares: the core, who may call, and the doors' own tables.
pub struct Doors {
    core: Core,
    clients: Vec<Client>,
    oauth: Option<oauth::OAuth>,
    client_rate: ClientRate,
    guard: Guard,
    legacy: legacy_sse::Streams,
    trusted: forwarded::Trusted,
    proxy_protocol: bool,
    admin_proxy_protocol: bool,
}

impl Doors {
    /// The doors of `core`, configured by `config`.
    pub fn new(core: Core, config: &Config) -> Result<Doors, BuildError> {
        let oauth = match &config.auth.oauth {
            Some(oauth) => Some(oauth::OAuth::new(oauth).map_err(BuildError::Auth)?),
            None => None,
        };
        Ok(Doors {
            core,
            oauth,
            clients: config
                .clients
                .iter()
                .map(|c| Client {
                    name: c.name.as_str().into(),
                    key: c.key.as_bytes().to_vec(),
                })
                .collect(),
            client_rate: ClientRate::new(config.limits.requests_per_second, config.limits.burst()),
            guard: Guard::new(config),
            legacy: legacy_sse::Streams::default(),
            trusted: forwarded::Trusted::new(&config.trusted_proxies),
            proxy_protocol: config.proxy_protocol,
            admin_proxy_protocol: config.admin.as_ref().is_some_and(|a| a.proxy_protocol),
        })
    }

    /// How the proxy listener's connections begin (or the admin listener's).
    pub fn entry(&self, admin: bool) -> listener::Entry {
        let shared = self.shared();
        listener::Entry {
            trusted: self.trusted.clone(),
            proxy_protocol: if admin {
                self.admin_proxy_protocol
            } else {
                self.proxy_protocol
            },
            tls: if admin {
                shared.tls().admin().cloned()
            } else {
                shared.tls().listen().cloned()
            },
        }
    }

    /// The address of the client that sent `request`: the connection's peer (or the
    /// client its trusted proxy's PROXY header named), or, from a trusted proxy, the
    /// client its `X-Forwarded-For` names ([`forwarded`]).
    pub fn client_address(&self, request: &Request) -> IpAddr {
        let peer = peer_of(request).ip();
        self.trusted.client(peer, request.headers())
    }

    /// The OAuth resource server, when `auth.oauth` is configured.
    pub fn oauth(&self) -> Option<&oauth::OAuth> {
        self.oauth.as_ref()
    }

    /// The core.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        self.core.shared()
    }

    /// The request guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Forgets full client-rate buckets; run periodically.
    pub fn sweep(&self) {
        self.client_rate.sweep();
    }

    /// The client a request's bearer key names; `None` when `clients:` is empty.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, ProxyError> {
        if self.clients.is_empty() {
            return Ok(None);
        }
        bearer(headers)
            .and_then(|presented| self.key_client(presented))
            .map(Some)
            .ok_or(ProxyError::Unauthorized)
    }

    /// The client whose `clients:` key is `presented`.
    fn key_client(&self, presented: &str) -> Option<Arc<str>> {
        // Compare against every key in constant time so timing reveals nothing.
        let mut found = None;
        for client in &self.clients {
            if bool::from(subtle::ConstantTimeEq::ct_eq(
                presented.as_bytes(),
                client.key.as_slice(),
            )) {
                found = Some(client.name.clone());
            }
        }
        found
    }

    /// Who sends a request to `path` (for the OAuth challenge): a `clients:` key's
    /// client, the bearer of a valid OAuth access token, or, when neither is
    /// configured, an anonymous peer.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        path: &str,
    ) -> Result<Caller, ProxyError> {
        let presented = bearer(headers);
        if let Some(name) = presented.and_then(|p| self.key_client(p)) {
            return Ok(Caller::new(Some(name), peer, None));
        }
        let Some(oauth) = &self.oauth else {
            if self.clients.is_empty() {
                return Ok(Caller::anonymous(peer));
            }
            return Err(ProxyError::Unauthorized);
        };
        let Some(token) = presented else {
            return Err(oauth.token_required(path));
        };
        match oauth.validate(token).await {
            Ok(identity) => {
                if let Some(scope) = oauth.missing_required(&identity) {
                    return Err(oauth.insufficient(path, &scope));
                }
                Ok(Caller::new(None, peer, Some(Arc::new(identity))))
            }
            Err(Ok(refusal)) => {
                tracing::info!(
                    reason = refusal.describe(),
                    "request refused: invalid access token"
                );
                Err(oauth.invalid(path, refusal))
            }
            Err(Err(unavailable)) => Err(ProxyError::AuthUnavailable(unavailable)),
        }
    }

    /// Authenticates a request to `path` and takes one from its caller's request rate.
    pub async fn caller(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        path: &str,
    ) -> Result<Caller, ProxyError> {
        let caller = match self.identify(headers, peer, path).await {
            Ok(caller) => caller,
            Err(
                err @ (ProxyError::Unauthorized
                | ProxyError::TokenRequired { .. }
                | ProxyError::InvalidToken { .. }),
            ) => {
                // A refused credential still costs its sender's address a request, so
                // guessing keys or flooding with bad tokens is throttled like anything else.
                self.check_rate(&Caller::anonymous(peer))?;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        self.check_rate(&caller)?;
        Ok(caller)
    }

    /// Takes one request from the caller's request rate (`limits.requests_per_second`).
    pub fn check_rate(&self, caller: &Caller) -> Result<(), ProxyError> {
        if !self.client_rate.enabled() {
            return Ok(());
        }
        self.client_rate
            .check(caller.user_key())
            .map_err(|wait| ProxyError::TooManyRequests {
                wait,
                counted: counted_on(caller.user_key()),
            })
    }

    /// A 403 for a token without scopes the request to `path` needs, with the
    /// challenge that lets the client step up; other errors as they are.
    pub fn challenge(&self, path: &str, err: ProxyError) -> ProxyError {
        match (&self.oauth, err) {
            (
                Some(oauth),
                ProxyError::InsufficientScope {
                    scope,
                    challenge: None,
                },
            ) => oauth.insufficient(path, &scope),
            (_, err) => err,
        }
    }

    /// The server at `/servers/<name>/…` (`Some(name)`) or at `/mcp` (`None`, only
    /// when there is exactly one).
    pub fn server(
        &self,
        name: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Arc<Server>, ProxyError> {
        let servers = self.shared().servers();
        match name {
            Some(name) => servers
                .get(name)
                .cloned()
                .ok_or_else(|| self.unknown_server(headers)),
            None if servers.len() == 1 => servers
                .values()
                .next()
                .cloned()
                .ok_or(ProxyError::UnknownServer),
            None => Err(ProxyError::AmbiguousServer),
        }
    }

    /// A 404 for a server name that is not configured. Only an authenticated client
    /// learns which names are: to anyone else the list would map the deployment.
    fn unknown_server(&self, headers: &HeaderMap) -> ProxyError {
        if !self.clients.is_empty() && matches!(self.authenticate(headers), Ok(Some(_))) {
            let names: Vec<&str> = self.shared().servers().keys().map(String::as_str).collect();
            return ProxyError::UnknownServerOf(names.join(", "));
        }
        ProxyError::UnknownServer
    }

    /// Open legacy SSE streams.
    pub fn legacy_streams(&self) -> usize {
        self.legacy.len()
    }
}

/// Whom a limit counted, in words: `address 203.0.113.9`, `client ci-agent`, `user alice`.
pub fn counted_on(key: &str) -> String {
    tollgate_policy::counted_on(key).unwrap_or_else(|| "this client".to_owned())
}

/// The bearer credential of a request, if it sends one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
        .filter(|c| !c.is_empty())
}

/// The path a resource's metadata is named after: the request's route, for a server
/// whose name can stand in a URL as it is; else the root document.
pub fn resource_path(name: Option<&str>, tail: &str) -> String {
    match name {
        None => format!("/{tail}"),
        Some(name)
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) =>
        {
            format!("/servers/{name}/{tail}")
        }
        Some(_) => String::new(),
    }
}

/// The peer of a request (loopback when the listener did not record it).
pub fn peer_of(request: &Request) -> SocketAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from((IpAddr::from([127, 0, 0, 1]), 0)), |c| c.0)
}

/// The lane a request came in on: the router's requests carry it ([`http::Front`]).
pub fn lane_of(request: &Request) -> Lane {
    request
        .extensions()
        .get::<Lane>()
        .copied()
        .unwrap_or_default()
}

/// Reads a request body of at most `limit` bytes, within `limits.body_read_timeout`.
pub async fn read_body(shared: &Shared, request: Request) -> Result<bytes::Bytes, ProxyError> {
    let within = shared.limits().body_read_timeout;
    match tokio::time::timeout(within, read_bounded(shared.max_body(), request)).await {
        Ok(body) => body,
        Err(_) => {
            shared.metrics().client_timeout("proxy", "body");
            tracing::info!(
                "request refused: its body did not arrive within {}s (limits.body_read_timeout)",
                within.as_secs_f64()
            );
            Err(ProxyError::BodyTimeout(within))
        }
    }
}

async fn read_bounded(limit: usize, request: Request) -> Result<bytes::Bytes, ProxyError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|err| {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || err.to_string().contains("length limit");
            if too_large {
                ProxyError::BodyTooLarge(limit)
            } else {
                ProxyError::BodyRead(err.to_string())
            }
        })
}

/// Counts an open downstream stream (`tollgate_streams_active`) for as long as it
/// lives: the count drops when the stream ends or the client goes away.
struct OpenStream(Arc<Shared>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.metrics.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `stream`, counted as an open stream while it lives.
pub fn counted<S: Stream + Send + 'static>(
    shared: &Arc<Shared>,
    stream: S,
) -> impl Stream<Item = S::Item> + Send + 'static {
    shared
        .metrics()
        .open_streams
        .fetch_add(1, Ordering::Relaxed);
    let guard = OpenStream(shared.clone());
    stream.map(move |item| {
        let _alive = &guard;
        item
    })
}

#[cfg(test)]
mod tests {
    use super::{authority, host_name};

    #[test]
    fn a_host_is_an_ip_literal_or_a_name_with_an_optional_port() {
        for good in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:80",
            "a-b.example_x",
            "h:65535",
        ] {
            assert_eq!(authority(good), Some(host_name(good)), "{good}");
        }
        for bad in [
            "[::1]evil.example",
            "[::1",
            "[nope]:1",
            "a b",
            "x@y",
            "h:",
            "h:8a",
            ":80",
            "h:123456",
            "a/b",
            "h\\x",
            "é.example",
        ] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn splits_host_names_from_ports() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("[::1]:9"), "[::1]");
        assert_eq!(host_name("evil.example"), "evil.example");
    }
}
