//! The listeners' connections, served with hyper directly so that a slow client
//! cannot hold the process: a connection must send a request's headers within
//! `limits.header_read_timeout` (which also bounds an idle keep-alive connection),
//! and at most `limits.max_connections` connections, `limits.connections_per_peer`
//! from one address (an IPv6 peer by its /64), are open at once; beyond them a
//! connection is closed as soon as it is accepted. Each is counted and logged.
//! (Bodies are bounded in time where they are read, [`super::read_body`].)
//!
//! Before its first request a connection may have to pass its [`Entry`]: the PROXY
//! protocol header of a trusted load balancer, then the TLS handshake, both within
//! the same header deadline.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use super::forwarded::Trusted;
use super::proxy_protocol::{self, HeaderError, Rewind};

use crate::config::Limits;
use crate::state::Shared;
use crate::store::limits::peer_key;
use crate::tls::Certs;
use crate::upstream::{Lane, Lanes};

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open at once.
    pub max: usize,
    /// Open at once from one peer.
    pub per_peer: usize,
    /// Until a request's headers are in.
    pub header_read_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `limits:`; `max_connections` defaults to 1024, or three
    /// quarters of the open-file limit when that is lower, so that the last file
    /// descriptors stay for upstreams, logs and the clients already in. One address
    /// gets at most half of them (`connections_per_peer` is clamped), so that it
    /// cannot fill the listener on its own.
    pub fn new(limits: &Limits) -> ConnectionLimits {
        let max = limits.max_connections.unwrap_or_else(default_max);
        ConnectionLimits {
            max,
            per_peer: limits.connections_per_peer.min(max / 2).max(1),
            header_read_timeout: limits.header_read_timeout,
        }
    }
}

fn default_max() -> usize {
    let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(4096, |(soft, _)| soft);
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    (files / 4 * 3).clamp(16, 1024)
}

/// Connections open per peer key.
#[derive(Default)]
struct Peers(Mutex<HashMap<String, usize>>);

/// One connection's place in the per-peer count.
struct PeerSlot {
    peers: Arc<Peers>,
    key: String,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.0.lock();
        if let Some(count) = peers.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                peers.remove(&self.key);
            }
        }
    }
}

impl Peers {
    fn take(self: &Arc<Self>, key: String, limit: usize) -> Option<PeerSlot> {
        let mut peers = self.0.lock();
        let count = peers.entry(key.clone()).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            key,
        })
    }
}

/// Logs at most one line a second for a flood of like events.
struct Throttle(AtomicU64);

impl Throttle {
    fn ready(&self, epoch: Instant) -> bool {
        let now = epoch.elapsed().as_secs() + 1;
        self.0.swap(now, Ordering::Relaxed) != now
    }
}

/// What every lane of a listener shares: its connection limits and who holds them.
pub struct Gate {
    limits: ConnectionLimits,
    open: Arc<Semaphore>,
    peers: Arc<Peers>,
}

impl Gate {
    /// A gate for `limits`.
    pub fn new(limits: ConnectionLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: Arc::new(Semaphore::new(limits.max)),
            peers: Arc::default(),
        })
    }
}

/// How a listener's connections begin: whose word on the client's address is taken
/// (`trusted_proxies`), whether those peers start with a PROXY protocol header, and
/// TLS.
#[derive(Clone, Default)]
pub struct Entry {
    /// `trusted_proxies:`.
    pub trusted: Trusted,
    /// `proxy_protocol: true` on this listener.
    pub proxy_protocol: bool,
    /// The certificate, for HTTPS.
    pub tls: Option<Arc<Certs>>,
}

/// A connection once its PROXY header is read and its TLS handshake made.
enum Opened {
    Plain(Rewind<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<Rewind<TcpStream>>>),
}

/// Why a connection was closed before its first request.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Proxy(#[from] HeaderError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

impl Entry {
    /// Reads the PROXY header a trusted peer sends first (with `proxy_protocol`), then
    /// makes the TLS handshake (with `tls`). Returns the connection and its client:
    /// the address the header names, else the peer.
    async fn open(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        trusted: bool,
    ) -> Result<(Opened, SocketAddr), OpenError> {
        let (stream, client) = if trusted && self.proxy_protocol {
            let header = proxy_protocol::read_header(&mut stream).await?;
            let client = header
                .client
                .map_or(peer, |c| SocketAddr::new(c.ip().to_canonical(), c.port()));
            (Rewind::new(header.rest, stream), client)
        } else {
            (Rewind::new(bytes::Bytes::new(), stream), peer)
        };
        let opened = match &self.tls {
            None => Opened::Plain(stream),
            Some(certs) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(certs.config());
                let tls = acceptor.accept(stream).await.map_err(OpenError::Tls)?;
                Opened::Tls(Box::new(tls))
            }
        };
        Ok((opened, client))
    }
}

/// What the connections of one listener share.
struct Listening {
    /// The listener's name in metrics and logs.
    name: &'static str,
    shared: Arc<Shared>,
    entry: Entry,
    peers: Arc<Peers>,
    limits: ConnectionLimits,
    /// Time zero of the log throttles.
    epoch: Instant,
    /// Lines about refused connections, throttled.
    refused_log: Throttle,
    /// Lines about connections closed before or between requests, throttled.
    timeout_log: Throttle,
}

/// A connection accepted, with what it holds: a place under `max_connections` and,
/// but for a trusted proxy's, its peer's slot.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    trusted: bool,
    peer_slot: Option<PeerSlot>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Listening {
    /// Admits a connection from `peer` within `max_connections` and, but for a
    /// trusted proxy's, `connections_per_peer`; `None` (counted and logged) when either
    /// is reached.
    fn admit(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        open: &Arc<Semaphore>,
    ) -> Option<Accepted> {
        let Ok(permit) = open.clone().try_acquire_owned() else {
            self.refuse("max_connections", peer.ip());
            return None;
        };
        let trusted = !self.entry.trusted.is_empty() && self.entry.trusted.contains(peer.ip());
        let peer_slot = if trusted {
            None
        } else {
            let Some(slot) = self.peers.take(peer_key(peer.ip()), self.limits.per_peer) else {
                self.refuse("connections_per_peer", peer.ip());
                return None;
            };
            Some(slot)
        };
        let _ = stream.set_nodelay(true);
        Some(Accepted {
            stream,
            peer,
            trusted,
            peer_slot,
            _permit: permit,
        })
    }

    /// Counts and logs a connection refused for `limits.<limit>`.
    fn refuse(&self, limit: &str, client: IpAddr) {
        self.shared.metrics().connection_refused(self.name, limit);
        if self.refused_log.ready(self.epoch) {
            tracing::warn!(listener = self.name, peer = %client, "connection refused: limits.{limit} reached");
        }
    }

    /// Serves an accepted connection until it ends.
    async fn connection<S>(
        self: Arc<Self>,
        accepted: Accepted,
        builder: hyper::server::conn::http1::Builder,
        service: S,
        mut stop: watch::Receiver<bool>,
    ) where
        S: tower::Service<
                axum::http::Request<hyper::body::Incoming>,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Accepted {
            stream,
            peer,
            trusted,
            peer_slot,
            _permit,
        } = accepted;
        let name = self.name;
        let Some((opened, client)) = self.open(stream, peer, trusted).await else {
            return;
        };
        // The client a trusted proxy's PROXY header names holds a slot of its own.
        let _peer_slot = match peer_slot {
            Some(slot) => Some(slot),
            None if client.ip() != peer.ip() => {
                let Some(slot) = self.peers.take(peer_key(client.ip()), self.limits.per_peer)
                else {
                    self.refuse("connections_per_peer", client.ip());
                    return;
                };
                Some(slot)
            }
            None => None,
        };
        // axum's `ConnectInfo` extractor finds the client's address in the request.
        let service = tower::ServiceExt::map_request(
            service,
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(client));
                request
            },
        );
        let service = hyper_util::service::TowerToHyperService::new(service);
        self.shared.metrics().connection(name, 1);
        let result = match opened {
            Opened::Plain(io) => run(&builder, io, service, &mut stop).await,
            Opened::Tls(io) => run(&builder, io, service, &mut stop).await,
        };
        self.shared.metrics().connection(name, -1);
        match result {
            Err(err) if err.is_timeout() => {
                self.shared.metrics().client_timeout(name, "header");
                if self.timeout_log.ready(self.epoch) {
                    tracing::info!(listener = name, peer = %client.ip(), "connection closed: no request headers within {}s (limits.header_read_timeout)", self.limits.header_read_timeout.as_secs_f64());
                }
            }
            Err(err) => tracing::debug!(listener = name, error = %err, "connection ended"),
            Ok(()) => {}
        }
    }

    /// Opens a connection (its PROXY header, its TLS handshake) within
    /// `header_read_timeout`: the connection and its client, or `None` (counted and
    /// logged) when it failed or took too long.
    async fn open(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        trusted: bool,
    ) -> Option<(Opened, SocketAddr)> {
        let name = self.name;
        let header_timeout = self.limits.header_read_timeout;
        let opening = self.entry.open(stream, peer, trusted);
        match tokio::time::timeout(header_timeout, opening).await {
            Ok(Ok(opened)) => Some(opened),
            Ok(Err(err)) => {
                self.shared.metrics().connection_refused(name, "handshake");
                if self.timeout_log.ready(self.epoch) {
                    tracing::info!(listener = name, peer = %peer.ip(), error = %err, "connection closed before its first request");
                }
                None
            }
            Err(_) => {
                self.shared.metrics().client_timeout(name, "handshake");
                if self.timeout_log.ready(self.epoch) {
                    tracing::info!(listener = name, peer = %peer.ip(), "connection closed: no PROXY header or TLS handshake within {}s (limits.header_read_timeout)", header_timeout.as_secs_f64());
                }
                None
            }
        }
    }
}

/// Serves `service` on `listener` (named `name` in metrics and logs) until
/// `shutdown` completes; then connections finish their requests in flight and
/// close. Returns once every connection through `gate` is closed (several lanes
/// may accept on one port, each on its own listener, behind one gate).
///
/// A connection from a trusted proxy carries many clients' requests: it counts
/// towards `max_connections` only, unless its PROXY header names its one client,
/// whose `connections_per_peer` it then counts towards. Its PROXY header and TLS
/// handshake must be in within `header_read_timeout`, as a request's headers must.
pub async fn serve<S>(
    name: &'static str,
    listener: tokio::net::TcpListener,
    service: S,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    entry: Entry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let limits = gate.limits;
    let open = gate.open.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let listening = Arc::new(Listening {
        name,
        shared,
        entry,
        peers: gate.peers.clone(),
        limits,
        epoch: Instant::now(),
        refused_log: Throttle(AtomicU64::new(0)),
        timeout_log: Throttle(AtomicU64::new(0)),
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, most often: wait for some to be freed.
                    if listening.refused_log.ready(listening.epoch) {
                        tracing::warn!(listener = name, error = %err, "could not accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(accepted) = listening.admit(stream, peer, &open) else {
            continue;
        };
        let (builder, service) = (builder.clone(), service.clone());
        let stop = stop_rx.clone();
        tokio::spawn(
            listening
                .clone()
                .connection(accepted, builder, service, stop),
        );
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all of them back means all are closed.
    let all = u32::try_from(limits.max).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
    Ok(())
}

/// The proxy listener's sockets, one for each lane, all on one address (with more
/// than one lane, `SO_REUSEPORT`: the kernel spreads connections over them).
pub struct Listeners {
    first: tokio::net::TcpListener,
    more: Vec<(Lane, std::net::TcpListener)>,
}

impl Listeners {
    /// Binds `addr` once for each of `lanes`; the first socket picks the port when
    /// `addr` has none, and the others take the same one.
    pub async fn bind(addr: std::net::SocketAddr, lanes: Lanes) -> std::io::Result<Listeners> {
        #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
        if lanes.count() > 1 {
            let bind = |addr: std::net::SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
                let socket = match addr {
                    std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.set_reuseaddr(true)?;
                socket.set_reuseport(true)?;
                socket.bind(addr)?;
                socket.listen(1024)
            };
            let first = bind(addr)?;
            let addr = first.local_addr()?;
            let mut more = Vec::with_capacity(lanes.count() - 1);
            for lane in lanes.each().skip(1) {
                more.push((lane, bind(addr)?.into_std()?));
            }
            return Ok(Listeners { first, more });
        }
        // Without `SO_REUSEPORT`, one lane serves.
        let _ = lanes;
        Ok(Listeners {
            first: tokio::net::TcpListener::bind(addr).await?,
            more: Vec::new(),
        })
    }

    /// The address they listen on.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.first.local_addr()
    }

    /// The first lane's listener, and each other lane's.
    pub(crate) fn into_parts(
        self,
    ) -> (tokio::net::TcpListener, Vec<(Lane, std::net::TcpListener)>) {
        (self.first, self.more)
    }
}

/// Serves one connection's requests until it ends, or, once `stop` turns true, until
/// the requests in flight are answered.
async fn run<IO, S>(
    builder: &hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    stop: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
