//! The contract of the tool lock's learned definitions ([`DefinitionStore`]), one
//! suite run against both backends: the memory table (one process, one replica) and
//! the Redis one, where two tables on one Redis are two replicas of one deployment: a listing learned on
//! one is known to the other, judged against that replica's own lock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use super::{DefinitionStore, Found, Judge, Listing, memory, redis};
use crate::store::test_redis::{RedisServer, contract, start_or_skip};

/// What gives a case its tables: the backends' implementations of
/// [`DefinitionStore`].
trait Backend {
    type Store: DefinitionStore;

    /// Two replicas' tables of server `s` (on the memory backend, one table twice),
    /// B judging with `b_judge`, not yet known to hear each other.
    fn unconnected(&self, b_judge: Judge) -> Replicas<Self::Store>;
}

struct Replicas<S> {
    a: Arc<S>,
    b: Arc<S>,
    distinct: bool,
}

/// A lock that has `read` at digest `r1` and `write` at `w1`.
fn judge() -> Judge {
    Arc::new(|tool, digest| matches!((tool, digest), ("read", "r1") | ("write", "w1")))
}

/// Tables in this process.
struct OnMemory;

impl Backend for OnMemory {
    type Store = memory::Definitions;

    fn unconnected(&self, _b_judge: Judge) -> Replicas<memory::Definitions> {
        let a = Arc::new(memory::Definitions::default());
        Replicas {
            b: a.clone(),
            a,
            distinct: false,
        }
    }
}

/// Tables in a redis-server of the test's own, each deployment under a prefix.
struct OnRedis(RedisServer);

impl Backend for OnRedis {
    type Store = redis::Definitions;

    fn unconnected(&self, b_judge: Judge) -> Replicas<redis::Definitions> {
        let prefix = format!("contract-{}:", crate::store::random_hex(4));
        let on = |replica, judge| {
            Arc::new(redis::Definitions::new(
                self.0.remote_as(&prefix, replica),
                "s",
                judge,
            ))
        };
        Replicas {
            a: on("a", judge()),
            b: on("b", b_judge),
            distinct: true,
        }
    }
}

fn on_memory() -> OnMemory {
    OnMemory
}

fn on_redis() -> Option<OnRedis> {
    start_or_skip().map(OnRedis)
}

/// The replicas, B judging with `b_judge`, each hearing the other.
async fn replicas<B: Backend>(b: &B, b_judge: Judge) -> Replicas<B::Store> {
    let r = b.unconnected(b_judge);
    // Each replica's feed is up once it hears the other (it forgets what it
    // learned when its feed starts).
    for (from, to) in [(&r.a, &r.b), (&r.b, &r.a)] {
        eventually(
            "the replicas hear each other",
            || from.learn("probe", listing(&[("read", "r1")]), true),
            || found(to, "probe", "read").2 == "listed",
        )
        .await;
    }
    r
}

fn listing<'a>(tools: &[(&'a str, &str)]) -> Vec<Listing<'a>> {
    let judge = judge();
    tools
        .iter()
        .map(|&(name, digest)| Listing {
            name,
            digest: digest.to_owned(),
            unchanged: judge(name, digest),
        })
        .collect()
}

/// What `d` knows of `tool` in session `key`, owned.
fn found(
    d: &Arc<impl DefinitionStore>,
    key: &str,
    tool: &str,
) -> (Option<String>, Option<bool>, &'static str) {
    d.find(key, tool, |found| match found {
        Found::Listed { digest, unchanged } => (Some(digest.to_owned()), Some(unchanged), "listed"),
        Found::NotListed => (None, None, "not listed"),
        Found::Unknown => (None, None, "unknown"),
    })
}

/// Repeats `step` (at most 5 s) until `done` holds: a replica hears the others
/// once its change feed is up, a message away.
async fn eventually(what: &str, mut step: impl FnMut(), mut done: impl FnMut() -> bool) {
    for _ in 0..250 {
        step();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if done() {
            return;
        }
    }
    panic!("not within 5 s: {what}");
}

async fn a_listing_learned_on_one_replica_is_known_to_the_other<B: Backend>(b: &B) {
    let r = replicas(b, judge()).await;
    assert_eq!(found(&r.b, "s1", "read").2, "unknown");
    eventually(
        "the other replica learns the listing",
        || {
            r.a.learn("s1", listing(&[("read", "r1"), ("write", "w2")]), true)
        },
        || found(&r.b, "s1", "read").2 == "listed",
    )
    .await;
    for replica in [&r.a, &r.b] {
        assert_eq!(
            found(replica, "s1", "read"),
            (Some("r1".into()), Some(true), "listed")
        );
        assert_eq!(
            found(replica, "s1", "write"),
            (Some("w2".into()), Some(false), "listed")
        );
        // A complete listing: a tool not in it is not listed.
        assert_eq!(found(replica, "s1", "other").2, "not listed");
        // Another upstream session is not known.
        assert_eq!(found(replica, "s2", "read").2, "unknown");
    }
}

async fn a_partial_listing_leaves_the_rest_unknown_and_a_complete_one_replaces<B: Backend>(b: &B) {
    let r = replicas(b, judge()).await;
    eventually(
        "learned",
        || r.a.learn("s1", listing(&[("read", "r1")]), false),
        || found(&r.b, "s1", "read").2 == "listed",
    )
    .await;
    assert_eq!(found(&r.b, "s1", "write").2, "unknown");
    eventually(
        "replaced",
        || r.a.learn("s1", listing(&[("write", "w1")]), true),
        || found(&r.b, "s1", "read").2 == "not listed",
    )
    .await;
    assert_eq!(found(&r.b, "s1", "write").1, Some(true));
    // A partial listing after a complete one: still complete.
    r.a.learn("s1", listing(&[("new", "n1")]), false);
    assert_eq!(found(&r.a, "s1", "other").2, "not listed");
}

async fn a_session_forgotten_on_one_replica_is_forgotten_on_the_other<B: Backend>(b: &B) {
    let r = replicas(b, judge()).await;
    eventually(
        "learned",
        || r.a.learn("s1", listing(&[("read", "r1")]), true),
        || found(&r.b, "s1", "read").2 == "listed",
    )
    .await;
    r.b.learn("s2", listing(&[("read", "r1")]), true);
    r.b.forget("s1");
    assert_eq!(found(&r.b, "s1", "read").2, "unknown");
    eventually(
        "forgotten on the other",
        || {},
        || found(&r.a, "s1", "read").2 == "unknown",
    )
    .await;
    eventually(
        "the other session stays",
        || {},
        || found(&r.a, "s2", "read").2 == "listed",
    )
    .await;
}

async fn each_replica_judges_with_its_own_lock<B: Backend>(b: &B) {
    // B's lock accepts `write` at w2 (it was reloaded there).
    let accepts: Judge = Arc::new(|tool, digest| matches!((tool, digest), ("write", "w2")));
    let r = replicas(b, accepts.clone()).await;
    eventually(
        "learned",
        || r.a.learn("s1", listing(&[("write", "w2")]), true),
        || found(&r.b, "s1", "write").2 == "listed",
    )
    .await;
    assert_eq!(found(&r.a, "s1", "write").1, Some(false));
    assert_eq!(found(&r.b, "s1", "write").1, Some(r.distinct));
    // A lock reloaded on A: judged anew, and in force before anyone sees it.
    let mut swapped = false;
    r.a.restamp(|tool, digest| accepts(tool, digest), || swapped = true);
    assert!(swapped);
    assert_eq!(found(&r.a, "s1", "write").1, Some(true));
}

async fn the_listings_kept_are_bounded<B: Backend>(b: &B) {
    let r = replicas(b, judge()).await;
    r.a.forget("probe");
    for i in 0..4096 {
        r.a.learn(&format!("s{i}"), listing(&[("read", "r1")]), true);
    }
    assert_eq!(found(&r.a, "s0", "read").2, "listed");
    // One session more: everything learned is forgotten, to be listed again.
    r.a.learn("one-more", listing(&[("read", "r1")]), true);
    assert_eq!(found(&r.a, "s0", "read").2, "unknown");
    assert_eq!(found(&r.a, "one-more", "read").2, "listed");
}

contract!(
    a_listing_learned_on_one_replica_is_known_to_the_other,
    a_partial_listing_leaves_the_rest_unknown_and_a_complete_one_replaces,
    a_session_forgotten_on_one_replica_is_forgotten_on_the_other,
    each_replica_judges_with_its_own_lock,
    the_listings_kept_are_bounded,
);
