//! The contract of learned param headers, one suite run against both backends: the
//! memory table (one process, one replica) and the Redis one, where two fronts on
//! one Redis are two replicas of one deployment and what one learns the other knows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_mcp::ParamHeader;

use super::{MAX_TOOLS, ToolParams};
use crate::store::test_redis::RedisServer;
use crate::store::test_redis::contract;

/// Where the tables live.
enum Backend {
    Memory,
    Redis(RedisServer),
}

/// Two replicas' tables of server `s` (on the memory backend, one table twice),
/// and, on Redis, another server's.
struct Replicas {
    a: Arc<ToolParams>,
    b: Arc<ToolParams>,
    other_server: Option<ToolParams>,
    /// The deployment's key prefix (Redis).
    prefix: String,
}

impl Backend {
    fn redis() -> Option<Backend> {
        match RedisServer::start() {
            Ok(server) => Some(Backend::Redis(server)),
            Err(why) => {
                eprintln!("skipped on Redis: {why}");
                None
            }
        }
    }

    fn replicas(&self) -> Replicas {
        match self {
            Backend::Memory => {
                let a = Arc::new(ToolParams::default());
                Replicas {
                    b: a.clone(),
                    a,
                    other_server: None,
                    prefix: String::new(),
                }
            }
            Backend::Redis(server) => {
                let prefix = format!("contract-{}:", crate::store::random_hex(4));
                let on =
                    |replica, name| ToolParams::shared(server.remote_as(&prefix, replica), name);
                Replicas {
                    a: Arc::new(on("a", "s")),
                    b: Arc::new(on("b", "s")),
                    other_server: Some(on("c", "t")),
                    prefix,
                }
            }
        }
    }
}

fn declared(name: &str) -> Vec<ParamHeader> {
    vec![ParamHeader {
        name: name.to_owned(),
        header: format!("mcp-param-{name}"),
        path: vec!["args".to_owned(), name.to_owned()],
    }]
}

fn header(params: &ToolParams, tool: &str) -> Option<String> {
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

async fn learns_replaces_and_forgets_on_every_replica(b: &Backend) {
    let r = b.replicas();
    assert!(r.a.learn("read", declared("path")));
    assert_eq!(header(&r.a, "read").as_deref(), Some("mcp-param-path"));
    eventually("the other replica learns it", || {
        header(&r.b, "read").as_deref() == Some("mcp-param-path")
    })
    .await;
    assert_eq!(r.b.get("read").unwrap()[0].path, ["args", "path"]);
    // Replaced on the other replica, seen here.
    assert!(r.b.learn("read", declared("file")));
    eventually("a change made elsewhere is seen", || {
        header(&r.a, "read").as_deref() == Some("mcp-param-file")
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

async fn a_replica_that_starts_later_knows_what_was_learned(b: &Backend) {
    let r = b.replicas();
    r.a.learn("read", declared("path"));
    eventually("shared", || r.b.get("read").is_some()).await;
    let late = b.replicas_like(&r);
    eventually("the late replica reads it", || late.get("read").is_some()).await;
}

async fn is_bounded(b: &Backend) {
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

impl Backend {
    /// One more replica of the deployment `r` is of.
    fn replicas_like(&self, r: &Replicas) -> Arc<ToolParams> {
        match self {
            Backend::Memory => r.a.clone(),
            Backend::Redis(server) => {
                Arc::new(ToolParams::shared(server.remote_as(&r.prefix, "late"), "s"))
            }
        }
    }
}

contract!(
    learns_replaces_and_forgets_on_every_replica,
    a_replica_that_starts_later_knows_what_was_learned,
    is_bounded,
);
