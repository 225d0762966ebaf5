//! A redis-server of a test's own, on a free loopback port, stopped when dropped:
//! what the store contract suites run their Redis backend against (the e2e tests
//! start theirs the same way, tests/e2e/test_replicas.py).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::remote::{Remote, RemoteConfig};

/// A running redis-server.
pub struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    /// Starts one, or says why it cannot (no `redis-server` on the `PATH`): the
    /// caller skips its Redis half with that reason.
    pub fn start() -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server cannot be started ({e}); install it to run the Redis half of the store contract"))?;
        let server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        // Bounded: at most 10 s for it to accept connections.
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("redis-server did not accept connections within 10 s".to_owned())
    }

    /// A connection to it, keys under `prefix`.
    pub fn remote(&self, prefix: &str) -> Arc<Remote> {
        self.remote_as(prefix, "test")
    }

    /// A connection to it as replica `replica` (replicas skip their own
    /// publications, so two fronts on one Redis need two names), keys under `prefix`.
    pub fn remote_as(&self, prefix: &str, replica: &str) -> Arc<Remote> {
        Arc::new(
            Remote::connect(RemoteConfig {
                url: &self.url,
                shown: self.url.clone(),
                prefix,
                timeout: Duration::from_secs(2),
                replica: replica.into(),
            })
            .unwrap(),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test functions of a contract suite, one per case on each backend: `on_memory::case`
/// and `on_redis::case` (skipped, saying so, without a `redis-server`). The suite's module
/// has the cases as `async fn case(&B)` generic over its fixture `B` (what gives the
/// stores: each case runs on the backends' implementations of the store's trait, or on
/// fronts over them where it tests a front's wrapper), and `on_memory()` and `on_redis()`
/// giving one (`None`: no `redis-server`, said on stderr).
/// `contract!(multi_thread: case, ..)` runs each on two worker threads (for cases
/// that race two calls).
macro_rules! contract {
    (multi_thread: $($case:ident),* $(,)?) => {
        $crate::store::test_redis::contract!(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)] $($case),*
        );
    };
    ($($case:ident),* $(,)?) => {
        $crate::store::test_redis::contract!(#[tokio::test] $($case),*);
    };
    (#[$test:meta] $($case:ident),*) => {
        mod on_memory {
            $(
                #[$test]
                async fn $case() {
                    super::$case(&super::on_memory()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[$test]
                async fn $case() {
                    let Some(redis) = super::on_redis() else {
                        return;
                    };
                    super::$case(&redis).await;
                }
            )*
        }
    };
}
pub(crate) use contract;

/// A redis-server for a suite's Redis half, or `None` (said on stderr) without one.
pub fn start_or_skip() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(server) => Some(server),
        Err(why) => {
            eprintln!("skipped on Redis: {why}");
            None
        }
    }
}
