//! The memory backend's own tests (the contract both backends keep is in
//! `contract.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]
use std::sync::Arc;
use std::time::Duration;

use super::*;
use serde_json::json;

use super::super::record::{
    DEFAULT_BYTES_PER_PRINCIPAL, MAX_LIVE, MAX_LIVE_BYTES, MAX_LIVE_PER_PRINCIPAL, PREVIEW_BYTES,
    Scope, sample_request as request,
};

/// Who calls, as `key` (the one who may retry).
fn key(r: &mut Request, key: impl Into<Arc<str>>) {
    Arc::make_mut(&mut r.principal).key = key.into();
}

fn open(store: &Approvals, request: Request) -> String {
    store.open(request).unwrap().0
}

#[test]
fn a_grant_read_back_from_json_keeps_its_scope_and_matches_the_same_calls() {
    let store = Approvals::new();
    let id = open(&store, request(Duration::from_secs(60)));
    let window = GrantRequest {
        scope: Scope::Client,
        window: Duration::from_secs(60),
        any_arguments: false,
    };
    let (_, grant) = store
        .decide(&id, true, "alice", None, Some(window))
        .unwrap();
    let grant = grant.unwrap();
    let back: Grant = serde_json::from_str(&serde_json::to_string(&grant).unwrap()).unwrap();
    assert_eq!(
        (back.id.as_str(), back.principal.as_str()),
        (grant.id.as_str(), "peer:127.0.0.1")
    );
    assert!(back.matches(
        "s",
        "start_fhir_export_job",
        "peer:127.0.0.1",
        "x",
        "sha256:aa"
    ));
    assert!(!back.matches(
        "s",
        "start_fhir_export_job",
        "peer:127.0.0.1",
        "x",
        "sha256:bb"
    ));
    assert!(!back.matches(
        "s",
        "start_fhir_export_job",
        "client:other",
        "x",
        "sha256:aa"
    ));
}

#[tokio::test]
async fn approving_releases_the_waiter_and_the_approval_is_used_once() {
    let store = Arc::new(Approvals::new());
    let id = open(&store, request(Duration::from_secs(60)));
    assert_eq!(store.get(&id).unwrap().status, Status::Pending);
    let waiting = store.clone();
    let wid = id.clone();
    let waiter = tokio::spawn(async move { waiting.wait(&wid, Duration::from_secs(30)).await });
    tokio::task::yield_now().await;
    let (settled, grant) = store.decide(&id, true, "alice", None, None).unwrap();
    assert_eq!((settled.status, grant.is_none()), (Status::Approved, true));
    match waiter.await.unwrap() {
        Some(Standing::Decided(v)) => assert!(v.approved && v.by == "alice"),
        other => panic!("{other:?}"),
    }
    assert!(store.redeem(&id).is_ok());
    assert_eq!(
        store.redeem(&id),
        Err(Some(Standing::Over(Status::Approved)))
    );
    assert!(store.get(&id).unwrap().redeemed_at.is_some());
    // Used up: the same call opens a new approval.
    let (again, standing, new) = store.open(request(Duration::from_secs(60))).unwrap();
    assert!(new && again != id && matches!(standing, Standing::Pending(_)));
    assert!(matches!(
        store.decide(&id, false, "bob", None, None),
        Err(DecideError::Settled(_))
    ));
    assert!(matches!(
        store.decide("nope", false, "bob", None, None),
        Err(DecideError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_same_call_joins_and_another_call_opens_its_own() {
    let store = Approvals::new();
    let first = open(&store, request(Duration::from_secs(60)));
    let (joined, _, new) = store.open(request(Duration::from_secs(60))).unwrap();
    assert_eq!((joined.as_str(), new), (first.as_str(), false));
    let r = request(Duration::from_secs(60));
    let found = store.find(&r.server, &r.principal.key, &r.tool, &r.arguments_digest);
    assert_eq!(found.map(|f| f.0), Some(first.clone()));
    assert!(
        store
            .find(&r.server, &r.principal.key, &r.tool, "sha256:zz")
            .is_none()
    );
    for change in [
        |r: &mut Request| r.arguments_digest = "sha256:bb".into(),
        |r: &mut Request| key(r, "session:other"),
        |r: &mut Request| r.tool = "other".into(),
        |r: &mut Request| r.server = "t".into(),
    ] {
        let mut other = request(Duration::from_secs(60));
        change(&mut other);
        assert_ne!(open(&store, other), first);
    }
    assert_eq!(store.pending(), 5);
    // A denial answers retries until the deadline.
    store
        .decide(&first, false, "bob", Some("no".into()), None)
        .unwrap();
    let (id, standing, _) = store.open(request(Duration::from_secs(60))).unwrap();
    assert_eq!(id, first);
    assert_eq!(
        standing,
        Standing::Decided(Verdict {
            approved: false,
            by: "bob".into(),
            reason: Some("no".into())
        })
    );
    assert_eq!(store.redeem(&first), Err(Some(standing)));
}

#[tokio::test]
async fn deadlines_expire_pending_and_unused_approvals() {
    let store = Approvals::new();
    let id = open(&store, request(Duration::from_millis(30)));
    assert_eq!(
        store.wait(&id, Duration::from_secs(5)).await,
        Some(Standing::Over(Status::Expired))
    );
    assert!(matches!(
        store.decide(&id, true, "late", None, None),
        Err(DecideError::Settled(_))
    ));
    // Waiting less than the deadline leaves it pending.
    let id = open(&store, request(Duration::from_secs(60)));
    assert!(matches!(
        store.wait(&id, Duration::from_millis(20)).await,
        Some(Standing::Pending(_))
    ));
    let mut short = request(Duration::from_secs(60));
    short.tool = "short".into();
    short.valid_for = Duration::from_millis(20);
    let id = open(&store, short);
    store.decide(&id, true, "alice", None, None).unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert_eq!(
        store.redeem(&id),
        Err(Some(Standing::Over(Status::Expired)))
    );
    assert_eq!(store.get(&id).unwrap().decided_by.as_deref(), Some("alice"));
}

#[tokio::test]
async fn live_approvals_are_bounded_in_number_per_principal_and_in_bytes() {
    let store = Approvals::new();
    let numbered = |principal: usize, i: usize| {
        let mut r = request(Duration::from_secs(60));
        key(&mut r, format!("client:{principal}"));
        r.arguments_digest = i.to_string();
        r
    };
    for i in 0..MAX_LIVE_PER_PRINCIPAL {
        store.open(numbered(0, i)).unwrap();
    }
    assert!(matches!(
        store.open(numbered(0, 1000)),
        Err(OpenError::TooManyForPrincipal)
    ));
    // Joining an existing one still works, and other principals are not crowded out.
    assert!(store.open(numbered(0, 0)).is_ok());
    for p in 1..MAX_LIVE / MAX_LIVE_PER_PRINCIPAL {
        for i in 0..MAX_LIVE_PER_PRINCIPAL {
            store.open(numbered(p, i)).unwrap();
        }
    }
    assert!(matches!(
        store.open(numbered(9999, 0)),
        Err(OpenError::Full)
    ));
    // Bytes: large arguments fill the budget before the count does; using one frees its bytes.
    let store = Approvals::new();
    let big = |p: usize| {
        let mut r = numbered(p, 0);
        r.arguments = json!("x".repeat((4 << 20) - 2));
        r
    };
    let mut ids = Vec::new();
    for p in 0..(MAX_LIVE_BYTES / (4 << 20)) {
        ids.push(store.open(big(p)).unwrap().0);
    }
    assert!(matches!(store.open(big(1000)), Err(OpenError::Full)));
    store.decide(&ids[0], true, "alice", None, None).unwrap();
    store.redeem(&ids[0]).unwrap();
    assert!(store.open(big(1000)).is_ok());
    // One principal holds at most its own share of the bytes; another is not crowded out.
    let store = Approvals::new();
    let large = |p: usize, i: usize| {
        let mut r = numbered(p, i);
        r.arguments = json!("x".repeat(900 << 10));
        r
    };
    let fit = DEFAULT_BYTES_PER_PRINCIPAL / (900 << 10);
    let mut alices = Vec::new();
    for i in 0..fit {
        alices.push(store.open(large(0, i)).unwrap().0);
    }
    assert!(matches!(
        store.open(large(0, fit)),
        Err(OpenError::TooManyBytesForPrincipal(
            DEFAULT_BYTES_PER_PRINCIPAL
        ))
    ));
    assert!(store.open(large(1, 0)).is_ok());
    store
        .decide(&alices[0], false, "admin", None, None)
        .unwrap();
    store.redeem(&alices[0]).ok();
    store.set_bytes_per_principal(MAX_LIVE_BYTES);
    assert!(store.open(large(0, fit)).is_ok());
}

#[tokio::test]
async fn grants_let_their_scope_through_until_revoked_or_expired() {
    let store = Approvals::new();
    let id = open(&store, request(Duration::from_secs(60)));
    let grant = GrantRequest {
        scope: Scope::Session,
        window: Duration::from_secs(60),
        any_arguments: false,
    };
    let (approval, grant) = store.decide(&id, true, "alice", None, Some(grant)).unwrap();
    let grant = grant.unwrap();
    assert_eq!(approval.grant_id.as_ref(), Some(&grant.id));
    assert_eq!(
        (grant.principal.as_str(), grant.granted_by.as_str()),
        ("session:abc", "alice")
    );
    let tool = "start_fhir_export_job";
    assert!(
        store
            .use_grant("s", tool, "x", "session:abc", "sha256:aa")
            .is_some()
    );
    assert_eq!(
        store
            .use_grant("s", tool, "x", "session:abc", "sha256:aa")
            .unwrap()
            .uses,
        2
    );
    assert!(
        store
            .use_grant("s", tool, "x", "session:abc", "sha256:bb")
            .is_none()
    );
    assert!(
        store
            .use_grant("s", tool, "x", "session:zzz", "sha256:aa")
            .is_none()
    );
    assert!(
        store
            .use_grant("s", "other", "x", "session:abc", "sha256:aa")
            .is_none()
    );
    assert_eq!(store.grants().len(), 1);
    assert!(store.revoke(&grant.id).is_some());
    assert!(store.revoke(&grant.id).is_none());
    assert!(
        store
            .use_grant("s", tool, "x", "session:abc", "sha256:aa")
            .is_none()
    );

    let mut other = request(Duration::from_secs(60));
    other.tool = "t2".into();
    let id = open(&store, other);
    let any = GrantRequest {
        scope: Scope::Client,
        window: Duration::from_millis(30),
        any_arguments: true,
    };
    store.decide(&id, true, "bob", None, Some(any)).unwrap();
    assert!(
        store
            .use_grant("s", "t2", "peer:127.0.0.1", "session:q", "sha256:zz")
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        store
            .use_grant("s", "t2", "peer:127.0.0.1", "session:q", "sha256:zz")
            .is_none()
    );
    assert!(store.grants().is_empty());
}

#[test]
fn a_one_use_token_is_used_once() {
    let store = Approvals::new();
    let until = SystemTime::now() + Duration::from_secs(60);
    assert!(store.consume("t", until));
    assert!(!store.consume("t", until));
    assert!(store.consume("u", until));
}

#[tokio::test]
async fn settled_approvals_keep_a_preview_of_large_arguments() {
    let store = Approvals::new();
    let mut large = request(Duration::from_secs(60));
    large.arguments = json!({"blob": "é".repeat(100_000)});
    let id = open(&store, large);
    assert_eq!(
        store.get(&id).unwrap().arguments["blob"]
            .as_str()
            .unwrap()
            .len(),
        200_000
    );
    store.decide(&id, true, "alice", None, None).unwrap();
    store.redeem(&id).unwrap();
    let settled = store.get(&id).unwrap();
    let preview = settled.arguments.as_str().unwrap();
    assert!(preview.starts_with("{\"blob\":\"éé") && preview.ends_with('…'));
    assert!(preview.len() <= PREVIEW_BYTES + '…'.len_utf8());
    assert_eq!(settled.arguments_truncated_from, Some(200_000 + 11));
}

#[tokio::test]
async fn broadcasts_changes_and_lists_newest_first() {
    let store = Approvals::new();
    let mut changes = store.subscribe();
    let first = open(&store, request(Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(2));
    let mut r = request(Duration::from_secs(60));
    r.tool = "second".into();
    let second = open(&store, r);
    assert_eq!(changes.recv().await.unwrap().id, first);
    assert_eq!(changes.recv().await.unwrap().id, second);
    let list = store.list();
    assert_eq!(list[0].id, second);
    store.deny_all("tollgate", "shutting down");
    assert_eq!(store.get(&first).unwrap().status, Status::Denied);
}
