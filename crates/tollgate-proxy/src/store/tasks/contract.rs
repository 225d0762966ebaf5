//! The contract of task owners ([`TaskStore`]), one suite run against both
//! backends: the memory table (one process, one replica) and the Redis one, where
//! two stores on one Redis are two replicas of one deployment and what one records
//! the other knows at once; and what the front adds, on either.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use super::{MAX_TTL, TASKS_PER_OWNER, TaskOwner, TaskRecord, TaskStore, Tasks, memory, redis};
use crate::store::test_redis::{RedisServer, contract, start_or_skip};

/// What gives a case its records: the backends' implementations of [`TaskStore`],
/// and a front over one (for what the front adds).
trait Backend {
    type Store: TaskStore;

    /// Two replicas' tasks (on the memory backend, one table twice).
    fn replicas(&self) -> Replicas<Self::Store>;

    /// A front on this backend.
    fn front(&self) -> Tasks;
}

struct Replicas<S> {
    a: Arc<S>,
    b: Arc<S>,
}

/// Records in this process.
struct OnMemory;

impl Backend for OnMemory {
    type Store = memory::Tasks;

    fn replicas(&self) -> Replicas<memory::Tasks> {
        let a = Arc::new(memory::Tasks::default());
        Replicas { b: a.clone(), a }
    }

    fn front(&self) -> Tasks {
        Tasks::new()
    }
}

/// Records in a redis-server of the test's own, each deployment under a prefix.
struct OnRedis(RedisServer);

impl OnRedis {
    fn remote(&self, prefix: &str, replica: &str) -> Arc<crate::store::remote::Remote> {
        self.0.remote_as(prefix, replica)
    }
}

impl Backend for OnRedis {
    type Store = redis::Tasks;

    fn replicas(&self) -> Replicas<redis::Tasks> {
        let prefix = format!("contract-{}:", crate::store::random_hex(4));
        let on = |replica| Arc::new(redis::Tasks::new(self.remote(&prefix, replica)));
        Replicas {
            a: on("a"),
            b: on("b"),
        }
    }

    fn front(&self) -> Tasks {
        let prefix = format!("contract-{}:", crate::store::random_hex(4));
        Tasks::shared(self.remote(&prefix, "front"))
    }
}

fn on_memory() -> OnMemory {
    OnMemory
}

fn on_redis() -> Option<OnRedis> {
    start_or_skip().map(OnRedis)
}

fn owner(client: &str, session: Option<&str>) -> TaskOwner {
    TaskOwner {
        client: format!("client:{client}"),
        user: format!("client:{client}"),
        session: session.map(str::to_owned),
    }
}

fn record(client: &str, session: Option<&str>) -> TaskRecord {
    TaskRecord {
        owner: owner(client, session),
        tool: format!("report-of-{client}"),
    }
}

fn server(name: &str) -> Arc<str> {
    name.into()
}

const MINUTE: Duration = Duration::from_secs(60);

async fn put(
    tasks: &Arc<impl TaskStore>,
    server: &Arc<str>,
    id: &str,
    client: &str,
    ttl: Duration,
) {
    tasks
        .record(server, id, record(client, None), ttl)
        .await
        .expect("the store answers");
}

async fn owner_of(tasks: &Arc<impl TaskStore>, server: &Arc<str>, id: &str) -> Option<TaskRecord> {
    let mut found = tasks
        .owners_of(server, &[id])
        .await
        .expect("the store answers");
    assert_eq!(found.len(), 1, "one answer per id");
    found.pop().flatten()
}

async fn a_task_is_known_to_its_owner_on_every_replica<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "T", "alice", MINUTE).await;
    for replica in [&r.a, &r.b] {
        let found = owner_of(replica, &s, "T").await.unwrap();
        assert_eq!(found, record("alice", None));
        assert!(found.owned_by(&owner("alice", None)));
        assert!(found.owned_by(&owner("alice", Some("any"))));
        assert!(!found.owned_by(&owner("bob", None)));
        assert!(
            owner_of(replica, &server("t"), "T").await.is_none(),
            "per server"
        );
        assert!(owner_of(replica, &s, "U").await.is_none());
    }
}

async fn a_task_keeps_its_first_owner<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "T", "alice", MINUTE).await;
    // The same id again (a buggy or hostile upstream), on either replica.
    put(&r.a, &s, "T", "bob", MINUTE).await;
    put(&r.b, &s, "T", "bob", MINUTE).await;
    let found = owner_of(&r.b, &s, "T").await.unwrap();
    assert!(found.owned_by(&owner("alice", None)) && !found.owned_by(&owner("bob", None)));
    assert_eq!(found.tool, "report-of-alice");
}

async fn a_task_created_in_a_session_belongs_to_that_session<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    r.a.record(&s, "S", record("alice", Some("1")), MINUTE)
        .await
        .unwrap();
    let found = owner_of(&r.b, &s, "S").await.unwrap();
    assert!(found.owned_by(&owner("alice", Some("1"))));
    assert!(!found.owned_by(&owner("alice", Some("2"))));
    assert!(!found.owned_by(&owner("alice", None)));
}

async fn owners_of_answers_in_the_order_asked<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "1", "alice", MINUTE).await;
    put(&r.b, &s, "2", "bob", MINUTE).await;
    put(&r.a, &server("t"), "3", "carol", MINUTE).await;
    let found =
        r.b.owners_of(&s, &["2", "nope", "1", "3", "2"])
            .await
            .unwrap();
    let clients: Vec<Option<&str>> = found
        .iter()
        .map(|f| f.as_ref().map(|r| r.owner.client.as_str()))
        .collect();
    assert_eq!(
        clients,
        [
            Some("client:bob"),
            None,
            Some("client:alice"),
            None,
            Some("client:bob")
        ]
    );
}

async fn a_record_lives_as_long_as_its_ttl<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "short", "alice", Duration::from_millis(30)).await;
    put(&r.a, &s, "long", "alice", MINUTE).await;
    assert!(owner_of(&r.b, &s, "short").await.is_some());
    tokio::time::sleep(Duration::from_millis(60)).await;
    for replica in [&r.a, &r.b] {
        replica.sweep();
        assert!(owner_of(replica, &s, "short").await.is_none());
        assert!(
            owner_of(replica, &s, "long").await.is_some(),
            "swept too early"
        );
    }
    // Once forgotten, the id is free: a task the upstream hands out again is new.
    put(&r.b, &s, "short", "bob", MINUTE).await;
    let found = owner_of(&r.a, &s, "short").await.unwrap();
    assert!(found.owned_by(&owner("bob", None)));
}

/// What the front adds to either backend: ttls bounded, an empty question
/// answered at once, one id's owner.
async fn the_front_bounds_ttls_and_asks_only_for_ids<B: Backend>(b: &B) {
    let front = b.front();
    let s = server("s");
    // A ttl of zero is kept for the shortest time there is, not forever.
    let zero = record("alice", None);
    front
        .record(&s, "zero", zero, Duration::ZERO)
        .await
        .unwrap();
    front
        .record(&s, "long", record("bob", None), MINUTE)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    front.sweep();
    assert!(front.owner_of(&s, "zero").await.unwrap().is_none());
    let long = front.owner_of(&s, "long").await.unwrap().unwrap();
    assert!(long.owned_by(&owner("bob", None)));
    assert!(front.owners_of(&s, &[]).await.unwrap().is_empty());
    assert_eq!(Tasks::ttl(None), MAX_TTL);
    assert_eq!(Tasks::ttl(Some(1500)), Duration::from_millis(1500));
    assert_eq!(Tasks::ttl(Some(u64::MAX)), MAX_TTL);
}

async fn each_owner_keeps_a_bounded_number<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.b, &s, "b", "bob", MINUTE).await;
    // Recorded through both replicas: the bound is the deployment's, not a replica's.
    for i in 0..=TASKS_PER_OWNER {
        let replica = if i % 2 == 0 { &r.a } else { &r.b };
        put(replica, &s, &i.to_string(), "alice", MINUTE).await;
    }
    // Alice's oldest was pushed out; bob's own is untouched.
    let found = r.a.owners_of(&s, &["0", "1", "b"]).await.unwrap();
    assert!(found[0].is_none() && found[1].is_some() && found[2].is_some());
    let last = TASKS_PER_OWNER.to_string();
    assert!(owner_of(&r.b, &s, &last).await.is_some());
    // Another session of the same client counts under the same bound.
    r.a.record(&s, "in-a-session", record("alice", Some("9")), MINUTE)
        .await
        .unwrap();
    assert!(owner_of(&r.b, &s, "1").await.is_none());
    assert!(owner_of(&r.b, &s, "in-a-session").await.is_some());
}

async fn the_oldest_is_pushed_out_whatever_its_ttl<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "first", "alice", 2 * MINUTE).await;
    for i in 0..TASKS_PER_OWNER {
        put(&r.b, &s, &i.to_string(), "alice", MINUTE).await;
    }
    let found = r.a.owners_of(&s, &["first", "0"]).await.unwrap();
    assert!(found[0].is_none(), "the oldest stays");
    assert!(
        found[1].is_some(),
        "a younger one, sooner to expire, was pushed out"
    );
}

async fn an_expired_task_does_not_count_towards_the_bound<B: Backend>(b: &B) {
    let r = b.replicas();
    let s = server("s");
    put(&r.a, &s, "short", "alice", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    for i in 0..TASKS_PER_OWNER {
        put(&r.a, &s, &i.to_string(), "alice", MINUTE).await;
    }
    assert!(
        owner_of(&r.b, &s, "0").await.is_some(),
        "a live task was pushed out by an expired one"
    );
}

contract!(
    the_front_bounds_ttls_and_asks_only_for_ids,
    a_task_is_known_to_its_owner_on_every_replica,
    a_task_keeps_its_first_owner,
    a_task_created_in_a_session_belongs_to_that_session,
    owners_of_answers_in_the_order_asked,
    a_record_lives_as_long_as_its_ttl,
    each_owner_keeps_a_bounded_number,
    the_oldest_is_pushed_out_whatever_its_ttl,
    an_expired_task_does_not_count_towards_the_bound,
);
