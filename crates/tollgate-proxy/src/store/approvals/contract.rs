//! The contract of the approvals store ([`ApprovalStore`]), one suite run against
//! both backends: the memory one (two handles on one store) and the Redis one (two
//! replicas on one Redis started by the test). Store `a` opens (holds) the
//! approvals; store `b` is where another request, or another replica, reaches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::sync::Arc;
use std::time::Duration;

use super::record::sample_request;
use super::{
    ApprovalStore, Binding, DecideError, GrantRequest, Request, Scope, Standing, Status, Verdict,
    memory, redis,
};
use crate::store::test_redis::{RedisServer, contract, start_or_skip};

/// What gives a case its stores: the backends' implementations of
/// [`ApprovalStore`].
trait Backend {
    type Store: ApprovalStore + Send + Sync + 'static;

    /// Two handles on one deployment: `a` opens (holds) the approvals, `b` is
    /// where another request or replica reaches (on the memory backend, the same
    /// store twice).
    fn replicas(&self) -> Replicas<Self::Store>;
}

struct Replicas<S> {
    name: &'static str,
    a: Arc<S>,
    b: Arc<S>,
}

/// Approvals in this process.
struct OnMemory;

impl Backend for OnMemory {
    type Store = memory::Approvals;

    fn replicas(&self) -> Replicas<memory::Approvals> {
        let a = Arc::new(memory::Approvals::new());
        Replicas {
            name: "memory",
            b: a.clone(),
            a,
        }
    }
}

/// Approvals in a redis-server of the test's own: two replicas on it.
struct OnRedis(RedisServer);

impl Backend for OnRedis {
    type Store = redis::Approvals;

    fn replicas(&self) -> Replicas<redis::Approvals> {
        let on = |replica| {
            Arc::new(redis::Approvals::new(
                self.0.remote_as("contract:", replica),
            ))
        };
        Replicas {
            name: "redis",
            a: on("a"),
            b: on("b"),
        }
    }
}

fn on_memory() -> OnMemory {
    OnMemory
}

fn on_redis() -> Option<OnRedis> {
    start_or_skip().map(OnRedis)
}

const BINDING: Binding<'static> = Binding {
    principal: "session:abc",
    server: "s",
    tool: "start_fhir_export_job",
    digest: "sha256:aa",
};

fn request() -> Request {
    sample_request(Duration::from_secs(60))
}

fn open(front: &Arc<impl ApprovalStore>, request: Request) -> String {
    let (id, standing, new) = front.open(request).unwrap();
    assert!(new && matches!(standing, Standing::Pending(_)));
    id
}

/// Where `id` stands as `front` sees it, once it sees it at all (another replica
/// learns of an approval from Redis, written by a task of the holder's): bounded.
async fn seen(front: &Arc<impl ApprovalStore>, id: &str) -> Standing {
    for _ in 0..250 {
        if let Some(standing) = front.standing(id).await.unwrap() {
            return standing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("approval {id} never became known");
}

fn approved(standing: &Standing) -> bool {
    matches!(standing, Standing::Decided(Verdict { approved: true, .. }))
}

async fn an_approved_call_is_redeemed_once_even_when_two_fronts_race<B: Backend>(b: &B) {
    let f = b.replicas();
    let id = open(&f.a, request());
    assert!(matches!(seen(&f.b, &id).await, Standing::Pending(_)));
    assert_eq!(
        f.b.find(
            BINDING.server,
            BINDING.principal,
            BINDING.tool,
            BINDING.digest
        )
        .await
        .unwrap()
        .map(|(found, _)| found == id),
        Some(true),
        "{}: the call's approval is found by its key",
        f.name
    );
    // Pending: nothing to redeem yet.
    assert!(matches!(
        f.b.redeem(&id, BINDING).await.unwrap(),
        Err(Some(Standing::Pending(_)))
    ));
    f.a.decide(&id, true, "alice", None, None).await.unwrap();
    assert!(approved(&seen(&f.b, &id).await), "{}", f.name);
    // Another call's binding does not use it.
    let other = Binding {
        digest: "sha256:bb",
        ..BINDING
    };
    assert_eq!(
        f.b.redeem(&id, other).await.unwrap(),
        Err(None),
        "{}",
        f.name
    );
    let (first, second) = tokio::join!(f.a.redeem(&id, BINDING), f.b.redeem(&id, BINDING));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(
        u8::from(first.is_ok()) + u8::from(second.is_ok()),
        1,
        "{}: redeemed exactly once: {first:?} {second:?}",
        f.name
    );
    let used = first.clone().or(second.clone()).unwrap();
    assert_eq!((used.approved, used.by.as_str()), (true, "alice"));
    assert_eq!(
        first.err().or(second.err()).unwrap(),
        Some(Standing::Over(Status::Approved)),
        "{}: the loser hears it was used",
        f.name
    );
    // Used: a third try is refused too, and the same call asks anew.
    assert!(f.a.redeem(&id, BINDING).await.unwrap().is_err());
    assert_ne!(open(&f.a, request()), id);
}

async fn an_approval_is_decided_once_when_approve_and_deny_race<B: Backend>(b: &B) {
    let f = b.replicas();
    let id = open(&f.a, request());
    seen(&f.b, &id).await;
    let (approve, deny) = tokio::join!(
        f.a.decide(&id, true, "alice", None, None),
        f.b.decide(&id, false, "bob", Some("no".into()), None),
    );
    let winner = match (&approve, &deny) {
        (Ok((approval, _)), Err(_)) => {
            assert_eq!(approval.status, Status::Approved);
            true
        }
        (Err(_), Ok((approval, _))) => {
            assert_eq!(approval.status, Status::Denied);
            false
        }
        _ => panic!("{}: decided exactly once: {approve:?} {deny:?}", f.name),
    };
    // Both fronts agree on the one verdict.
    for front in [&f.a, &f.b] {
        let standing = seen(front, &id).await;
        assert_eq!(approved(&standing), winner, "{}: {standing:?}", f.name);
    }
    // A later decision is refused with where the approval stands.
    match f.a.decide(&id, !winner, "carol", None, None).await {
        Err(DecideError::Settled(approval)) => assert_ne!(approval.status, Status::Pending),
        other => panic!("{}: {other:?}", f.name),
    }
}

async fn grants_are_used_on_every_front_until_revoked_or_expired<B: Backend>(b: &B) {
    let f = b.replicas();
    let id = open(&f.a, request());
    let window = GrantRequest {
        scope: Scope::Session,
        window: Duration::from_secs(60),
        any_arguments: false,
    };
    let (_, grant) =
        f.a.decide(&id, true, "alice", None, Some(window))
            .await
            .unwrap();
    let grant = grant.unwrap();
    let tool = BINDING.tool;
    let use_on = |front: &Arc<B::Store>, session: &'static str, digest: &'static str| {
        let front = front.clone();
        async move {
            front
                .use_grant("s", tool, "peer:127.0.0.1", session, digest)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        use_on(&f.b, "session:abc", "sha256:aa").await.unwrap().uses,
        1
    );
    assert_eq!(
        use_on(&f.a, "session:abc", "sha256:aa").await.unwrap().uses,
        2
    );
    assert!(use_on(&f.b, "session:abc", "sha256:bb").await.is_none());
    assert!(use_on(&f.b, "session:zzz", "sha256:aa").await.is_none());
    let listed = f.b.grants().await;
    assert_eq!(listed.len(), 1, "{}", f.name);
    assert_eq!(listed[0].id, grant.id);
    // Revoked on the other front: over everywhere; a second revoke finds nothing.
    assert_eq!(
        f.b.revoke(&grant.id).await.unwrap().map(|g| g.id),
        Some(grant.id.clone()),
        "{}",
        f.name
    );
    assert!(f.b.revoke(&grant.id).await.unwrap().is_none());
    assert!(use_on(&f.a, "session:abc", "sha256:aa").await.is_none());
    assert!(f.a.grants().await.is_empty(), "{}", f.name);

    // A grant for the client, any arguments, for a short window: used, then over.
    let mut other = request();
    other.tool = "t2".into();
    let id = open(&f.a, other);
    let short = GrantRequest {
        scope: Scope::Client,
        window: Duration::from_millis(200),
        any_arguments: true,
    };
    f.a.decide(&id, true, "bob", None, Some(short))
        .await
        .unwrap();
    let t2 = |front: &Arc<B::Store>| {
        let front = front.clone();
        async move {
            front
                .use_grant("s", "t2", "peer:127.0.0.1", "session:q", "sha256:zz")
                .await
                .unwrap()
        }
    };
    assert!(t2(&f.b).await.is_some(), "{}", f.name);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t2(&f.b).await.is_none(), "{}: expired", f.name);
    assert!(f.b.grants().await.is_empty(), "{}", f.name);
}

async fn pending_approvals_are_listed_on_every_front<B: Backend>(b: &B) {
    let f = b.replicas();
    let first = open(&f.a, request());
    let mut r = request();
    r.tool = "second".into();
    let second = open(&f.a, r);
    // The same call joins its approval rather than opening another.
    let (joined, _, new) = f.a.open(request()).unwrap();
    assert_eq!((joined.as_str(), new), (first.as_str(), false));
    assert_eq!(f.a.pending(), 2, "{}", f.name);
    for id in [&first, &second] {
        seen(&f.b, id).await;
    }
    for front in [&f.a, &f.b] {
        let listed: Vec<(String, Status)> =
            front.list().into_iter().map(|a| (a.id, a.status)).collect();
        for id in [&first, &second] {
            assert!(
                listed.contains(&(id.clone(), Status::Pending)),
                "{}: {id} in {listed:?}",
                f.name
            );
        }
        assert_eq!(
            front.get(&first).map(|a| a.tool),
            Some(BINDING.tool.to_owned())
        );
    }
}

async fn deadlines_expire_pending_and_unredeemed_approvals<B: Backend>(b: &B) {
    let f = b.replicas();
    let id = open(&f.a, sample_request(Duration::from_millis(100)));
    assert_eq!(
        f.a.wait(&id, Duration::from_secs(5)).await,
        Some(Standing::Over(Status::Expired)),
        "{}",
        f.name
    );
    assert_eq!(f.a.pending(), 0);
    assert!(matches!(
        f.a.decide(&id, true, "late", None, None).await,
        Err(DecideError::Settled(_))
    ));
    // Approved but not retried within valid_for: over.
    let mut short = request();
    short.valid_for = Duration::from_millis(100);
    let id = open(&f.a, short);
    f.a.decide(&id, true, "alice", None, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        f.b.redeem(&id, BINDING).await.unwrap(),
        Err(Some(Standing::Over(Status::Expired))),
        "{}",
        f.name
    );
    // Waiting less than the deadline leaves a new one pending.
    let id = open(&f.a, request());
    assert!(matches!(
        f.a.wait(&id, Duration::from_millis(50)).await,
        Some(Standing::Pending(_))
    ));
}

async fn unknown_ids_are_unknown_everywhere<B: Backend>(b: &B) {
    let f = b.replicas();
    for front in [&f.a, &f.b] {
        assert_eq!(front.standing("nope").await.unwrap(), None, "{}", f.name);
        assert_eq!(front.redeem("nope", BINDING).await.unwrap(), Err(None));
        assert!(matches!(
            front.decide("nope", true, "alice", None, None).await,
            Err(DecideError::NotFound(_))
        ));
        assert!(front.revoke("nope").await.unwrap().is_none());
        assert!(front.get("nope").is_none());
        assert_eq!(front.wait("nope", Duration::from_millis(10)).await, None);
        assert!(
            front
                .find("s", "session:abc", "tool", "sha256:aa")
                .await
                .unwrap()
                .is_none()
        );
    }
}

contract!(
    multi_thread:
    an_approved_call_is_redeemed_once_even_when_two_fronts_race,
    an_approval_is_decided_once_when_approve_and_deny_race,
    grants_are_used_on_every_front_until_revoked_or_expired,
    pending_approvals_are_listed_on_every_front,
    deadlines_expire_pending_and_unredeemed_approvals,
    unknown_ids_are_unknown_everywhere,
);
