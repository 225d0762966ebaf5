//! The contract of rate-limit windows, one suite run against both backends: the
//! memory windows (the policy crate's rolling-window log) and the Redis ones (the
//! Lua script), on one driven clock, so that the two are held to one behaviour,
//! edge cases included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_policy::{Per, RateLimit};

use super::{memory, redis};
use crate::store::test_redis::RedisServer;

/// What the suite needs of a backend.
trait Backend {
    type Slot;
    async fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> Result<Self::Slot, Duration>;
    async fn release(&self, slot: Self::Slot);
}

impl Backend for memory::Windows {
    type Slot = tollgate_policy::Slot;
    async fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> Result<Self::Slot, Duration> {
        memory::Windows::take(self, limit, key, now)
    }
    async fn release(&self, slot: Self::Slot) {
        memory::Windows::release(self, slot);
    }
}

struct OnRedis {
    windows: redis::Windows,
    _server: RedisServer,
}

impl OnRedis {
    fn start() -> Option<OnRedis> {
        match RedisServer::start() {
            Ok(server) => Some(OnRedis {
                windows: redis::Windows::new(server.remote("contract:"), "server").on_given_clock(),
                _server: server,
            }),
            Err(why) => {
                eprintln!("skipped on Redis: {why}");
                None
            }
        }
    }
}

impl Backend for OnRedis {
    type Slot = redis::Slot;
    async fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> Result<Self::Slot, Duration> {
        self.windows
            .take(limit, key, now)
            .await
            .expect("the test's Redis answers")
    }
    async fn release(&self, slot: Self::Slot) {
        self.windows
            .release(slot)
            .await
            .expect("the test's Redis answers");
    }
}

fn limit(id: &str, max: u32, window: Duration) -> RateLimit {
    RateLimit {
        id: id.into(),
        max,
        window,
        per: Per::Global,
    }
}

const fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn at_most_max_in_any_rolling_window(b: &impl Backend) {
    let l = limit("t", 10, s(60));
    for i in 0..10 {
        assert!(b.take(&l, "a", s(i)).await.is_ok(), "call {i} fits");
    }
    assert_eq!(b.take(&l, "a", s(59)).await.err(), Some(s(1)));
    // At 60 s the first call leaves the window, and only it.
    assert!(b.take(&l, "a", s(60)).await.is_ok());
    assert_eq!(b.take(&l, "a", s(60)).await.err(), Some(s(1)));
}

async fn never_twice_max_across_a_window_boundary(b: &impl Backend) {
    // A call every half second for two windows: 10 per rolling minute, never 19 in
    // the first (a fixed-window counter would let 10 at 59.5 s and 10 at 60 s).
    let l = limit("t", 10, s(60));
    let mut allowed = 0;
    for t in 0..240u64 {
        if b.take(&l, "a", ms(t * 500)).await.is_ok() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 20, "10 in each of the two windows");
}

async fn a_call_exactly_one_window_after_the_oldest_fits(b: &impl Backend) {
    let l = limit("t", 1, s(10));
    assert!(b.take(&l, "a", s(100)).await.is_ok());
    assert_eq!(b.take(&l, "a", ms(109_999)).await.err(), Some(ms(1)));
    assert!(
        b.take(&l, "a", s(110)).await.is_ok(),
        "the window is half-open"
    );
}

async fn the_wait_is_until_the_oldest_call_leaves(b: &impl Backend) {
    let l = limit("t", 2, s(60));
    assert!(b.take(&l, "a", s(0)).await.is_ok());
    assert!(b.take(&l, "a", s(30)).await.is_ok());
    assert_eq!(b.take(&l, "a", s(45)).await.err(), Some(s(15)));
    assert_eq!(b.take(&l, "a", ms(59_500)).await.err(), Some(ms(500)));
}

async fn a_refused_call_takes_no_slot(b: &impl Backend) {
    let l = limit("t", 1, s(10));
    assert!(b.take(&l, "a", s(0)).await.is_ok());
    assert!(b.take(&l, "a", s(5)).await.is_err());
    assert!(
        b.take(&l, "a", s(10)).await.is_ok(),
        "the refusal at 5 s counted"
    );
    assert_eq!(b.take(&l, "a", s(14)).await.err(), Some(s(6)));
}

async fn keys_and_limits_are_independent(b: &impl Backend) {
    let one = limit("one", 1, s(60));
    let other = limit("other", 1, s(60));
    assert!(b.take(&one, "a", s(0)).await.is_ok());
    assert!(b.take(&one, "b", s(0)).await.is_ok(), "another key");
    assert!(b.take(&other, "a", s(0)).await.is_ok(), "another limit");
    assert!(b.take(&one, "a", s(1)).await.is_err());
}

async fn a_released_slot_frees_room(b: &impl Backend) {
    let l = limit("t", 2, s(60));
    let first = b.take(&l, "a", s(0)).await.unwrap();
    assert!(
        b.take(&l, "a", s(0)).await.is_ok(),
        "a second call at the same time"
    );
    assert!(b.take(&l, "a", s(1)).await.is_err());
    b.release(first).await;
    assert!(b.take(&l, "a", s(1)).await.is_ok());
    assert_eq!(
        b.take(&l, "a", s(2)).await.err(),
        Some(s(58)),
        "the one kept at 0 s"
    );
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::memory::Windows::default()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(redis) = super::OnRedis::start() else {
                        return;
                    };
                    super::$case(&redis).await;
                }
            )*
        }
    };
}

contract!(
    at_most_max_in_any_rolling_window,
    never_twice_max_across_a_window_boundary,
    a_call_exactly_one_window_after_the_oldest_fits,
    the_wait_is_until_the_oldest_call_leaves,
    a_refused_call_takes_no_slot,
    keys_and_limits_are_independent,
    a_released_slot_frees_room,
);
