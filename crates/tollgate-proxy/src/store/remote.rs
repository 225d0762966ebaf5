//! The shared backend (`state.backend: redis`): one Redis server that every replica
//! of a deployment uses, through one multiplexed connection that reconnects by
//! itself (the `redis` crate's tokio `ConnectionManager`).
//!
//! Every command is bounded by `state.timeout`; a command that fails or times out
//! is an [`Unavailable`], which the caller turns into a refusal (or, with
//! `state.on_failure: allow`, lets the call through unshared). The first failure
//! and the first success after failures are logged, once each.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The shared state could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared state (Redis at {url}) cannot be reached: {reason}")]
pub struct Unavailable {
    /// The server, its password hidden.
    pub url: String,
    /// What failed.
    pub reason: String,
}

/// A connection to the shared Redis, with this deployment's key prefix.
pub struct Remote {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    shown: String,
    replica: Arc<str>,
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Round trips made for requests (not the keep-alive pings), for `/metrics`.
    round_trips: AtomicU64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.shown)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// Settings of the shared backend (from `state:`).
pub struct RemoteConfig<'a> {
    /// `state.url`.
    pub url: &'a str,
    /// The URL as it may be shown (no password).
    pub shown: String,
    /// `state.prefix`.
    pub prefix: &'a str,
    /// `state.timeout`.
    pub timeout: Duration,
    /// This replica's name.
    pub replica: Arc<str>,
}

impl Remote {
    /// Prepares the connection; it is made on first use and remade after a failure,
    /// so Tollgate starts (and reports itself not ready) while Redis is down.
    pub fn connect(config: RemoteConfig<'_>) -> Result<Remote, String> {
        let failed = |e: redis::RedisError| format!("state.url `{}`: {e}", config.shown);
        let client = redis::Client::open(config.url).map_err(failed)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // Each command fails fast while Redis is away; the next one tries again.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), manager).map_err(failed)?;
        Ok(Remote {
            client,
            conn,
            prefix: config.prefix.to_owned(),
            timeout: config.timeout,
            shown: config.shown,
            replica: config.replica,
            down: AtomicBool::new(false),
            last_error: Mutex::new(None),
            round_trips: AtomicU64::new(0),
        })
    }

    /// This replica's name (`state.replica`).
    pub fn replica(&self) -> &Arc<str> {
        &self.replica
    }

    /// A key of this deployment: the prefix, then `parts` joined by `:`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push(':');
            }
            key.push_str(part);
        }
        key
    }

    /// A handle for one command (a clone of the multiplexed connection).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs one command, script or pipeline (one round trip) within `state.timeout`.
    pub async fn run<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.exec(command).await
    }

    /// Round trips made for requests so far.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    async fn exec<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let outcome = match tokio::time::timeout(self.timeout, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!(
                "no answer within {}ms (state.timeout)",
                self.timeout.as_millis()
            )),
        };
        match outcome {
            Ok(value) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    tracing::info!(redis = %self.shown, "shared state reachable again");
                    *self.last_error.lock() = None;
                }
                Ok(value)
            }
            Err(reason) => {
                if !self.down.swap(true, Ordering::SeqCst) {
                    tracing::error!(redis = %self.shown, error = %reason, "shared state unreachable: calls that need it are affected (state.on_failure)");
                }
                *self.last_error.lock() = Some(reason.clone());
                Err(Unavailable {
                    url: self.shown.clone(),
                    reason,
                })
            }
        }
    }

    /// Pings Redis every second for as long as this backend lives, so that a
    /// connection lost while Redis was away is remade as soon as Redis is back
    /// (the connection manager reconnects after a failed command), not at the
    /// expense of the first call after it.
    pub fn keep_alive(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(remote) = weak.upgrade() else {
                    return;
                };
                let _ = remote.ping().await;
            }
        });
    }

    /// A connection of its own for subscriptions, made within `state.timeout`.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, Unavailable> {
        self.run(self.client.get_async_pubsub()).await
    }

    /// Follows `channel` (a key of this deployment) for as long as the process
    /// runs, by a task of its own: `on_message` gets each message another replica
    /// sent with [`Remote::publish`] (this replica's own are skipped), and `on_gap`
    /// is called whenever the feed (re)starts, since messages may have been missed.
    pub fn follow(
        self: &Arc<Self>,
        channel: String,
        on_message: impl Fn(&str) + Send + 'static,
        on_gap: impl Fn() + Send + Sync + 'static,
    ) {
        let on_gap = Arc::new(on_gap);
        let at_end = on_gap.clone();
        self.follow_from(
            channel,
            on_message,
            move || {
                on_gap();
                std::future::ready(())
            },
            move || at_end(),
        );
    }

    /// [`Remote::follow`], awaiting `on_start` each time the feed starts, before any
    /// of its messages is handled (a backend reads its whole state there, so that
    /// the messages that follow apply to it in order); `on_end` when it stops.
    pub fn follow_from<F>(
        self: &Arc<Self>,
        channel: String,
        on_message: impl Fn(&str) + Send + 'static,
        on_start: impl Fn() -> F + Send + 'static,
        on_end: impl Fn() + Send + 'static,
    ) where
        F: Future<Output = ()> + Send,
    {
        use futures::StreamExt as _;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let remote = self.clone();
        let own = format!("{}\n", self.replica);
        runtime.spawn(async move {
            loop {
                if let Ok(mut pubsub) = remote.pubsub().await {
                    let subscribed =
                        tokio::time::timeout(remote.timeout, pubsub.subscribe(&channel)).await;
                    if matches!(subscribed, Ok(Ok(()))) {
                        on_start().await;
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let Ok(text) = message.get_payload::<String>() else {
                                continue;
                            };
                            if let Some(body) = text.split_once('\n').map(|(_, b)| b)
                                && !text.starts_with(&own)
                            {
                                on_message(body);
                            }
                        }
                    }
                }
                on_end();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Publishes `body` on `channel` for the other replicas' [`Remote::follow`].
    pub async fn publish(&self, channel: &str, body: &str) -> Result<(), Unavailable> {
        let mut conn = self.connection();
        let message = format!("{}\n{body}", self.replica);
        self.run(
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// The secret every replica shares under `name` (a key of this deployment):
    /// `fresh`, when this replica is the first to ask (`SET NX`), else the one stored.
    pub async fn shared_secret(&self, name: &str, fresh: &str) -> Result<String, Unavailable> {
        let key = self.key(&[name]);
        let mut conn = self.connection();
        let stored = self
            .exec(async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(fresh)
                    .arg("NX")
                    .ignore()
                    .cmd("GET")
                    .arg(&key)
                    .query_async::<(Option<String>,)>(&mut conn)
                    .await
            })
            .await?;
        stored.0.ok_or_else(|| Unavailable {
            url: self.shown.clone(),
            reason: format!("the shared secret `{name}` vanished as it was set"),
        })
    }

    /// Asks Redis for a `PONG`, for `/readyz`.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let mut conn = self.connection();
        self.exec(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(drop)
    }

    /// Where Redis is, as it may be shown.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}
