//! A lane's keep-alive HTTP/1 connections to one upstream, each driven by the task
//! that uses it, as nginx does: the call's own task writes the request and reads
//! the answer. A pooled client (hyper-util's) drives every connection in a task of
//! its own behind a channel, which costs each call two more task wake-ups and a
//! pool lookup by host.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::http::Uri;
use bytes::Bytes;
use futures::Stream;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
/// Boxed: a connection (its buffers and state) is large, and it moves between the
/// pool, the lease and the futures that hold it.
type Conn = Box<http1::Connection<Io, Full<Bytes>>>;

/// How long an unused connection is kept.
const IDLE: Duration = Duration::from_secs(90);

/// The most unused connections one lane keeps to one upstream.
const MAX_IDLE: usize = 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made: nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// The request was sent, or may have been, and the answer did not come.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One lane's connections to one upstream.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// The unused connections, the most recently used last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: Conn,
    since: Instant,
}

/// A connection in use: the call's task drives it ([`Lease::drive`], [`Lease::stream`])
/// until the answer's body has been read, then it goes back to its pool.
pub struct Lease {
    sender: http1::SendRequest<Full<Bytes>>,
    /// `None` once it ended (closed, or broke): dropped at once, so that a request
    /// still queued on it fails (and is given back unsent) instead of waiting.
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

impl Pool {
    pub fn new() -> Arc<Pool> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` (its URI in origin form, with a `Host` header) to `uri`'s
    /// server on an unused connection, or a new one, and waits for the answer's head.
    pub async fn send(
        self: &Arc<Pool>,
        uri: &Uri,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::Response<Incoming>, Lease), Error> {
        let mut request = request;
        // A kept connection the server closed meanwhile may fail before the request
        // is written: then it goes again on another one, and at the latest on a new
        // connection, whose failure is the answer (the pool is bounded, so is this).
        let mut fresh = false;
        loop {
            let mut lease = match self.take() {
                Some(lease) => lease,
                None => {
                    fresh = true;
                    self.connect(uri).await?
                }
            };
            let mut answer = pin!(lease.sender.try_send_request(request));
            let answer = poll_fn(|cx| {
                lease.poll_conn(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(response) => return Ok((response, lease)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(Error::Http(err.into_error())),
                },
            }
        }
    }

    /// The most recently used connection that is still open, if any.
    fn take(self: &Arc<Pool>) -> Option<Lease> {
        let now = Instant::now();
        loop {
            let Idle {
                sender,
                mut conn,
                since,
            } = self.lock().pop()?;
            if now.duration_since(since) > IDLE || sender.is_closed() {
                continue;
            }
            // Lets the connection read what came while it was unused: the server's
            // close, or nothing. (A wake-up would have nobody to wake.)
            if conn
                .poll_without_shutdown(&mut Context::from_waker(Waker::noop()))
                .is_ready()
                || !sender.is_ready()
            {
                continue;
            }
            return Some(Lease {
                sender,
                conn: Some(conn),
                pool: Arc::clone(self),
            });
        }
    }

    async fn connect(self: &Arc<Pool>, uri: &Uri) -> Result<Lease, Error> {
        let connect =
            |err: &(dyn std::error::Error + 'static)| Error::Connect(super::describe(err));
        let io = tower::ServiceExt::oneshot(self.connector.clone(), uri.clone())
            .await
            .map_err(|err| connect(&*err))?;
        let (sender, conn) = http1::handshake(io).await?;
        Ok(Lease {
            sender,
            conn: Some(Box::new(conn)),
            pool: Arc::clone(self),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A list of connections is whole even if a thread panicked holding it.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Lease {
    /// Lets the connection write and read what it can.
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && conn.poll_without_shutdown(cx).is_ready()
        {
            self.conn = None;
        }
    }

    /// Runs `work` (reading the answer's body) while driving the connection.
    pub async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        poll_fn(|cx| {
            // The connection first: what it reads is then ready for `work` at once.
            self.poll_conn(cx);
            work.as_mut().poll(cx)
        })
        .await
    }

    /// The answer's body as a stream of data, driving the connection; the
    /// connection goes back to its pool once the body has ended.
    pub fn stream(
        self,
        mut body: Incoming,
    ) -> impl Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static {
        let mut lease = Some(self);
        futures::stream::poll_fn(move |cx| {
            loop {
                if let Some(lease) = lease.as_mut() {
                    lease.poll_conn(cx);
                }
                match std::task::ready!(std::pin::Pin::new(&mut body).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => return Poll::Ready(Some(Ok(data))),
                        Err(_) => continue, // trailers
                    },
                    Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                    None => {
                        if let Some(lease) = lease.take() {
                            lease.done();
                        }
                        return Poll::Ready(None);
                    }
                }
            }
        })
    }

    /// The answer has been read whole: the connection goes back to its pool, unless
    /// it ended.
    pub fn done(self) {
        let Some(conn) = self.conn else { return };
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.lock();
        // The oldest first: they are the first the server may close.
        let now = Instant::now();
        let stale = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) > IDLE)
            .count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender: self.sender,
                conn,
                since: now,
            });
        }
    }
}
