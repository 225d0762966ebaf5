//! The contract of the session table ([`SessionStore`]), one suite run against both
//! backends: the memory table (one process, one replica) and the Redis one, where
//! two tables on one Redis are two replicas of one deployment. What a session is,
//! its quotas and idle expiry behave the same on both; so do who may use it and
//! pinning, which the front adds (those cases run on fronts over either backend).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use super::{
    Missing, NewSession, NotOpened, Opened, Session, SessionStore, Sessions, SessionsFull, memory,
    redis,
};
use crate::config::OnStateFailure;
use crate::store::remote::{Remote, RemoteConfig};
use crate::store::test_redis::{RedisServer, contract, start_or_skip};

/// The table's limits.
#[derive(Clone, Copy)]
struct Limits {
    max: usize,
    idle: Duration,
    per_client: usize,
}

const ROOMY: Limits = Limits {
    max: 100,
    idle: Duration::from_secs(3600),
    per_client: usize::MAX,
};

/// What gives a case its tables: the backends' implementations of
/// [`SessionStore`], and fronts over them (for what the front adds: the server and
/// client binding, pinning, its settings).
trait Backend {
    type Store: SessionStore;

    /// Two replicas' tables of one deployment (on the memory backend, one
    /// process: the same table twice).
    fn replicas(&self, limits: Limits) -> Replicas<Self::Store>;

    /// The same with fronts over this backend.
    fn fronts(&self, limits: Limits) -> Replicas<Sessions>;
}

/// Two replicas of one deployment.
struct Replicas<S> {
    a: Arc<S>,
    b: Arc<S>,
    distinct: bool,
}

/// A table of this process with `limits`.
fn table(limits: Limits) -> memory::Sessions {
    let mut table = memory::Sessions::new(limits.max, limits.idle);
    table.set_quotas(limits.per_client, 1);
    table
}

/// Sessions in this process.
struct OnMemory;

impl Backend for OnMemory {
    type Store = memory::Sessions;

    fn replicas(&self, limits: Limits) -> Replicas<memory::Sessions> {
        let a = Arc::new(table(limits));
        Replicas {
            b: a.clone(),
            a,
            distinct: false,
        }
    }

    fn fronts(&self, limits: Limits) -> Replicas<Sessions> {
        let a = Arc::new(Sessions::new(limits.max, limits.idle).with_quotas(limits.per_client, 1));
        Replicas {
            b: a.clone(),
            a,
            distinct: false,
        }
    }
}

/// Sessions in a redis-server of the test's own, each deployment under a prefix.
struct OnRedis(RedisServer);

impl OnRedis {
    fn deployment<S>(&self, on: impl Fn(Arc<Remote>) -> S) -> Replicas<S> {
        let prefix = format!("contract-{}:", crate::store::random_hex(4));
        Replicas {
            a: Arc::new(on(self.0.remote_as(&prefix, "a"))),
            b: Arc::new(on(self.0.remote_as(&prefix, "b"))),
            distinct: true,
        }
    }
}

impl Backend for OnRedis {
    type Store = redis::Sessions;

    fn replicas(&self, limits: Limits) -> Replicas<redis::Sessions> {
        self.deployment(|remote| redis::Sessions::new(table(limits), remote))
    }

    fn fronts(&self, limits: Limits) -> Replicas<Sessions> {
        self.deployment(|remote| {
            Sessions::new(limits.max, limits.idle)
                .with_quotas(limits.per_client, 1)
                .with_shared(remote, OnStateFailure::Refuse)
        })
    }
}

fn on_memory() -> OnMemory {
    OnMemory
}

fn on_redis() -> Option<OnRedis> {
    start_or_skip().map(OnRedis)
}

fn new(server: &str, client: Option<&str>, quota_key: &str, pinned: bool) -> NewSession {
    NewSession {
        server: server.into(),
        client: client.map(Into::into),
        upstream_id: Some("up-1".into()),
        initialize: Some(serde_json::json!({"method": "initialize"})),
        elicitation: true,
        protocol_version: Some("2025-11-25".into()),
        quota_key: quota_key.into(),
        pinned,
    }
}

fn of(quota_key: &str) -> NewSession {
    new("s", None, quota_key, false)
}

/// Opens a session, written to the shared backend (if any).
async fn open(
    sessions: &Arc<impl SessionStore>,
    new: NewSession,
) -> Result<Arc<Session>, SessionsFull> {
    let Opened { session, unshared } = sessions.open(new).await?;
    assert!(unshared.is_none(), "{unshared:?}");
    Ok(session)
}

/// A session by its id, which the test's backends always answer.
async fn get(sessions: &Arc<impl SessionStore>, id: &str) -> Option<Arc<Session>> {
    sessions.get(id).await.expect("the test's backend answers")
}

/// The same through a front.
async fn open_front(sessions: &Sessions, new: NewSession) -> Result<Arc<Session>, NotOpened> {
    let Opened { session, unshared } = sessions.open(new).await?;
    assert!(unshared.is_none(), "{unshared:?}");
    Ok(session)
}

async fn get_front(sessions: &Sessions, id: &str) -> Result<Arc<Session>, Missing> {
    sessions.get(id, "s", None).await
}

/// Waits (at most 5 s) until `done` holds: the replicas' change feed is a message away.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..250 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

async fn a_session_is_found_by_its_id_server_and_client_on_any_replica<B: Backend>(b: &B) {
    let r = b.fronts(ROOMY);
    let opened = open_front(&r.a, new("s", Some("alice"), "client:alice", false))
        .await
        .unwrap();
    assert_eq!(opened.id.len(), 32);
    assert!(opened.id.bytes().all(|c| c.is_ascii_hexdigit()));
    for replica in [&r.a, &r.b] {
        let found = replica.get(&opened.id, "s", Some("alice")).await.unwrap();
        assert_eq!(found.id, opened.id);
        assert_eq!(found.key.as_ref(), format!("session:{}", opened.id));
        assert_eq!(found.client.as_deref(), Some("alice"));
        assert_eq!(found.upstream_id().as_deref(), Some("up-1"));
        assert_eq!(found.protocol_version().as_deref(), Some("2025-11-25"));
        assert_eq!(found.initialize, opened.initialize);
        assert!(found.elicitation && !found.pinned);
        // Only for the server and the client that opened it.
        let other_server = replica.get(&opened.id, "t", Some("alice")).await;
        assert!(matches!(other_server, Err(Missing::Unknown)));
        let other_client = replica.get(&opened.id, "s", Some("bob")).await;
        assert!(matches!(other_client, Err(Missing::Unknown)));
        let anonymous = replica.get(&opened.id, "s", None).await;
        assert!(matches!(anonymous, Err(Missing::Unknown)));
    }
    let again = open_front(&r.a, of("k")).await.unwrap();
    assert_ne!(again.id, opened.id, "every id is fresh");
}

async fn an_unknown_id_is_unknown<B: Backend>(b: &B) {
    let r = b.replicas(ROOMY);
    for id in ["nope", "", &super::random_id(), &"f".repeat(32)] {
        for replica in [&r.a, &r.b] {
            assert!(get(replica, id).await.is_none(), "{id}");
        }
    }
}

async fn a_removed_session_is_gone_from_every_replica<B: Backend>(b: &B) {
    let r = b.replicas(ROOMY);
    let session = open(&r.a, of("k")).await.unwrap();
    // The other replica holds a copy of it now.
    get(&r.b, &session.id).await.unwrap();
    assert_eq!(r.a.remove(&session.id).unwrap().id, session.id);
    assert!(get(&r.a, &session.id).await.is_none());
    eventually("the other replica drops its copy", async || {
        get(&r.b, &session.id).await.is_none()
    })
    .await;
    assert!(r.a.remove(&session.id).is_none());
}

async fn a_change_is_seen_by_every_replica<B: Backend>(b: &B) {
    let r = b.replicas(ROOMY);
    let session = open(&r.a, of("k")).await.unwrap();
    get(&r.b, &session.id).await.unwrap();
    session.set_upstream_id(Some("up-2".into()));
    session.set_protocol_version("2026-07-28");
    eventually("the other replica reads the change", async || {
        let seen = get(&r.b, &session.id).await.unwrap();
        seen.upstream_id().as_deref() == Some("up-2")
            && seen.protocol_version().as_deref() == Some("2026-07-28")
    })
    .await;
}

async fn an_idle_session_expires_and_is_swept<B: Backend>(b: &B) {
    let idle = Duration::from_millis(40);
    let r = b.replicas(Limits { idle, ..ROOMY });
    let session = open(&r.a, of("k")).await.unwrap();
    tokio::time::sleep(idle * 3).await;
    r.a.sweep();
    assert_eq!(r.a.len(), 0);
    for replica in [&r.a, &r.b] {
        assert!(get(replica, &session.id).await.is_none());
    }
    assert_eq!(b.fronts(Limits { idle, ..ROOMY }).a.idle(), idle);
}

async fn a_full_table_refuses_until_idle_sessions_are_swept<B: Backend>(b: &B) {
    let strict = b.replicas(Limits { max: 1, ..ROOMY });
    open(&strict.a, of("k")).await.unwrap();
    assert!(matches!(
        open(&strict.a, of("k")).await,
        Err(SessionsFull::Total(1))
    ));
    assert_eq!(b.fronts(Limits { max: 1, ..ROOMY }).a.capacity(), 1);
    // Idle limit 0: both are idle, so a third one fits after the sweep.
    let idle = b.replicas(Limits {
        max: 2,
        idle: Duration::ZERO,
        ..ROOMY
    });
    open(&idle.a, of("k")).await.unwrap();
    open(&idle.a, of("k")).await.unwrap();
    open(&idle.a, of("k")).await.unwrap();
    assert_eq!(idle.a.len(), 1);
}

async fn one_client_cannot_take_every_session<B: Backend>(b: &B) {
    let r = b.replicas(Limits {
        per_client: 2,
        ..ROOMY
    });
    let limits = Limits {
        per_client: 2,
        ..ROOMY
    };
    assert_eq!(b.fronts(limits).a.per_client(), 2);
    let first = open(&r.a, of("client:a")).await.unwrap();
    open(&r.a, of("client:a")).await.unwrap();
    match open(&r.a, of("client:a")).await {
        Err(SessionsFull::Client(2, who)) => assert_eq!(who, "client a"),
        other => panic!("{other:?}"),
    }
    open(&r.a, of("client:b")).await.unwrap();
    r.a.remove(&first.id);
    open(&r.a, of("client:a")).await.unwrap();
    // A copy read from another replica does not count against its client here.
    if r.distinct {
        let theirs = open(&r.b, of("client:c")).await.unwrap();
        get(&r.a, &theirs.id).await.unwrap();
        open(&r.a, of("client:c")).await.unwrap();
        open(&r.a, of("client:c")).await.unwrap();
    }
}

async fn a_session_has_one_stream_at_a_time<B: Backend>(b: &B) {
    let r = b.replicas(ROOMY);
    let session = open(&r.a, of("k")).await.unwrap();
    let first = session.open_stream().unwrap();
    assert_eq!(session.open_stream().err(), Some(1));
    drop(first);
    assert!(session.open_stream().is_ok());
}

async fn a_pinned_session_is_served_by_its_own_replica_only<B: Backend>(b: &B) {
    let r = b.fronts(ROOMY);
    let pinned = open_front(&r.a, new("s", None, "k", true)).await.unwrap();
    assert!(get_front(&r.a, &pinned.id).await.is_ok());
    match get_front(&r.b, &pinned.id).await {
        Err(Missing::OtherReplica { owner, here }) if r.distinct => {
            assert_eq!((&*owner, &*here), ("a", "b"));
        }
        Ok(_) if !r.distinct => {}
        other => panic!("{other:?}"),
    }
    // Not pinned: any replica serves it.
    let free = open_front(&r.a, of("k")).await.unwrap();
    assert!(get_front(&r.b, &free.id).await.is_ok());
}

contract!(
    a_session_is_found_by_its_id_server_and_client_on_any_replica,
    an_unknown_id_is_unknown,
    a_removed_session_is_gone_from_every_replica,
    a_change_is_seen_by_every_replica,
    an_idle_session_expires_and_is_swept,
    a_full_table_refuses_until_idle_sessions_are_swept,
    one_client_cannot_take_every_session,
    a_session_has_one_stream_at_a_time,
    a_pinned_session_is_served_by_its_own_replica_only,
);

/// A table on a Redis nobody listens at, with `on_failure`.
fn unreachable(on_failure: OnStateFailure) -> Sessions {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let remote = Remote::connect(RemoteConfig {
        url: &url,
        shown: url.clone(),
        prefix: "gone:",
        timeout: Duration::from_millis(500),
        replica: "a".into(),
    })
    .unwrap();
    Sessions::new(10, Duration::from_secs(60)).with_shared(Arc::new(remote), on_failure)
}

#[tokio::test]
async fn unreachable_shared_state_refuses_with_on_failure_refuse() {
    let sessions = unreachable(OnStateFailure::Refuse);
    assert!(matches!(
        sessions.open(of("k")).await,
        Err(NotOpened::Unavailable(_))
    ));
    assert_eq!(sessions.len(), 0, "the refused session is not kept");
    match get_front(&sessions, &super::random_id()).await {
        Err(Missing::Unavailable { refused, .. }) => assert!(refused),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unreachable_shared_state_keeps_sessions_here_with_on_failure_allow() {
    let sessions = unreachable(OnStateFailure::Allow);
    let opened = sessions.open(of("k")).await.unwrap();
    assert!(opened.unshared.is_some());
    assert!(get_front(&sessions, &opened.session.id).await.is_ok());
    match get_front(&sessions, &super::random_id()).await {
        Err(Missing::Unavailable { refused, .. }) => assert!(!refused),
        other => panic!("{other:?}"),
    }
}
