//! The contract of learned param headers ([`ParamStore`]), one suite run against
//! both backends: the memory table (one process, one replica) and the Redis one,
//! where two tables on one Redis are two replicas of one deployment and what one
//! learns the other knows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_mcp::ParamHeader;

use super::{MAX_TOOLS, ParamStore, memory, redis};
use crate::store::test_redis::{RedisServer, contract, start_or_skip};

/// What gives a case its tables: the backends' implementations of [`ParamStore`].
trait Backend {
    type Store: ParamStore;

    /// Two replicas' tables of server `s` (on the memory backend, one table
    /// twice), and, on Redis, another server's.
    fn replicas(&self) -> Replicas<Self::Store>;

    /// One more replica of the deployment `r` is of.
    fn replicas_like(&self, r: &Replicas<Self::Store>) -> Arc<Self::Store>;
}

struct Replicas<S> {
    a: Arc<S>,
    b: Arc<S>,
    other_server: Option<S>,
    /// The deployment's key prefix (Redis).
    prefix: String,
}

/// Tables in this process.
struct OnMemory;

impl Backend for OnMemory {
    type Store = memory::Params;

    fn replicas(&self) -> Replicas<memory::Params> {
        let a = Arc::new(memory::Params::default());
        Replicas {
            b: a.clone(),
            a,
            other_server: None,
            prefix: String::new(),
        }
    }

    fn replicas_like(&self, r: &Replicas<memory::Params>) -> Arc<memory::Params> {
        r.a.clone()
    }
}

/// Tables in a redis-server of the test's own.
struct OnRedis(RedisServer);

impl Backend for OnRedis {
    type Store = redis::Params;

    fn replicas(&self) -> Replicas<redis::Params> {
        let prefix = format!("contract-{}:", crate::store::random_hex(4));
        let on = |replica, name| redis::Params::new(self.0.remote_as(&prefix, replica), name);
        Replicas {
            a: Arc::new(on("a", "s")),
            b: Arc::new(on("b", "s")),
            other_server: Some(on("c", "t")),
            prefix,
        }
    }

    fn replicas_like(&self, r: &Replicas<redis::Params>) -> Arc<redis::Params> {
        Arc::new(redis::Params::new(self.0.remote_as(&r.prefix, "late"), "s"))
    }
}

fn on_memory() -> OnMemory {
    OnMemory
}

fn on_redis() -> Option<OnRedis> {
    start_or_skip().map(OnRedis)
}

fn declared(name: &str) -> Vec<ParamHeader> {
    vec![ParamHeader {
        name: name.to_owned(),
        header: format!("mcp-param-{name}"),
        path: vec!["args".to_owned(), name.to_owned()],
    }]
}

fn header(params: &(impl ParamStore + ?Sized), tool: &str) -> Option<String> {
    params.get(tool).map(|d| d[0].header.clone())
}

/// Waits (at most 5 s) until `done` holds: the replicas' change feed is a message away.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

async fn learns_replaces_and_forgets_on_every_replica<B: Backend>(b: &B) {
    let r = b.replicas();
    assert!(r.a.learn("read", declared("path")));
    assert_eq!(header(&*r.a, "read").as_deref(), Some("mcp-param-path"));
    eventually("the other replica learns it", || {
        header(&*r.b, "read").as_deref() == Some("mcp-param-path")
    })
    .await;
    assert_eq!(r.b.get("read").unwrap()[0].path, ["args", "path"]);
    // Replaced on the other replica, seen here.
    assert!(r.b.learn("read", declared("file")));
    eventually("a change made elsewhere is seen", || {
        header(&*r.a, "read").as_deref() == Some("mcp-param-file")
    })
    .await;
    // Declaring nothing forgets it.
    assert!(r.a.learn("read", Vec::new()));
    assert!(r.a.get("read").is_none());
    eventually("forgotten everywhere", || r.b.get("read").is_none()).await;
    r.a.learn("write", declared("path"));
    eventually("learned again", || r.b.get("write").is_some()).await;
    r.b.forget("write");
    assert!(r.b.get("write").is_none());
    eventually("forgotten everywhere", || r.a.get("write").is_none()).await;
    if let Some(other) = &r.other_server {
        r.a.learn("only-s", declared("x"));
        eventually("learned", || r.b.get("only-s").is_some()).await;
        assert!(other.get("only-s").is_none(), "another server's table");
    }
}

async fn a_replica_that_starts_later_knows_what_was_learned<B: Backend>(b: &B) {
    let r = b.replicas();
    r.a.learn("read", declared("path"));
    eventually("shared", || r.b.get("read").is_some()).await;
    let late = b.replicas_like(&r);
    eventually("the late replica reads it", || late.get("read").is_some()).await;
}

async fn is_bounded<B: Backend>(b: &B) {
    let r = b.replicas();
    for i in 0..MAX_TOOLS {
        assert!(r.a.learn(&format!("t{i}"), declared("a")));
    }
    assert!(!r.a.learn("one-more", declared("a")));
    assert!(r.a.get("one-more").is_none());
    // A known tool can still change.
    assert!(r.a.learn("t0", declared("b")));
    eventually("the other replica holds as many", || {
        r.b.get("t0").is_some_and(|d| d[0].name == "b") && r.b.get("t4095").is_some()
    })
    .await;
    assert!(r.b.get("one-more").is_none());
}

contract!(
    learns_replaces_and_forgets_on_every_replica,
    a_replica_that_starts_later_knows_what_was_learned,
    is_bounded,
);
