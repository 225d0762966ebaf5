//! The contract of rate-limit windows, one suite run against both backends: the
//! memory windows (the policy crate's rolling-window log) and the Redis ones (the
//! Lua script), on one driven clock, so that the two are held to one behaviour,
//! edge cases included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_policy::{Per, RateLimit};

use super::{WindowStore, memory, redis};
use crate::store::test_redis::RedisServer;

/// The windows of a test's own redis-server, on the test's clock.
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

/// The backend's take, which the test's backends always answer.
async fn take<W: WindowStore>(
    w: &W,
    limit: &RateLimit,
    key: &str,
    now: Duration,
) -> Result<W::Slot, Duration> {
    w.take(limit, key, now)
        .await
        .expect("the test's backend answers")
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

async fn at_most_max_in_any_rolling_window<W: WindowStore>(b: &W) {
    let l = limit("t", 10, s(60));
    for i in 0..10 {
        assert!(take(b, &l, "a", s(i)).await.is_ok(), "call {i} fits");
    }
    assert_eq!(take(b, &l, "a", s(59)).await.err(), Some(s(1)));
    // At 60 s the first call leaves the window, and only it.
    assert!(take(b, &l, "a", s(60)).await.is_ok());
    assert_eq!(take(b, &l, "a", s(60)).await.err(), Some(s(1)));
}

async fn never_twice_max_across_a_window_boundary<W: WindowStore>(b: &W) {
    // A call every half second for two windows: 10 per rolling minute, never 19 in
    // the first (a fixed-window counter would let 10 at 59.5 s and 10 at 60 s).
    let l = limit("t", 10, s(60));
    let mut allowed = 0;
    for t in 0..240u64 {
        if take(b, &l, "a", ms(t * 500)).await.is_ok() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 20, "10 in each of the two windows");
}

async fn a_call_exactly_one_window_after_the_oldest_fits<W: WindowStore>(b: &W) {
    let l = limit("t", 1, s(10));
    assert!(take(b, &l, "a", s(100)).await.is_ok());
    assert_eq!(take(b, &l, "a", ms(109_999)).await.err(), Some(ms(1)));
    assert!(
        take(b, &l, "a", s(110)).await.is_ok(),
        "the window is half-open"
    );
}

async fn the_wait_is_until_the_oldest_call_leaves<W: WindowStore>(b: &W) {
    let l = limit("t", 2, s(60));
    assert!(take(b, &l, "a", s(0)).await.is_ok());
    assert!(take(b, &l, "a", s(30)).await.is_ok());
    assert_eq!(take(b, &l, "a", s(45)).await.err(), Some(s(15)));
    assert_eq!(take(b, &l, "a", ms(59_500)).await.err(), Some(ms(500)));
}

async fn a_refused_call_takes_no_slot<W: WindowStore>(b: &W) {
    let l = limit("t", 1, s(10));
    assert!(take(b, &l, "a", s(0)).await.is_ok());
    assert!(take(b, &l, "a", s(5)).await.is_err());
    assert!(
        take(b, &l, "a", s(10)).await.is_ok(),
        "the refusal at 5 s counted"
    );
    assert_eq!(take(b, &l, "a", s(14)).await.err(), Some(s(6)));
}

async fn keys_and_limits_are_independent<W: WindowStore>(b: &W) {
    let one = limit("one", 1, s(60));
    let other = limit("other", 1, s(60));
    assert!(take(b, &one, "a", s(0)).await.is_ok());
    assert!(take(b, &one, "b", s(0)).await.is_ok(), "another key");
    assert!(take(b, &other, "a", s(0)).await.is_ok(), "another limit");
    assert!(take(b, &one, "a", s(1)).await.is_err());
}

async fn a_released_slot_frees_room<W: WindowStore>(b: &W) {
    let l = limit("t", 2, s(60));
    let first = take(b, &l, "a", s(0)).await.unwrap();
    assert!(
        take(b, &l, "a", s(0)).await.is_ok(),
        "a second call at the same time"
    );
    assert!(take(b, &l, "a", s(1)).await.is_err());
    b.release(first);
    // Given back at once in this process, soon in Redis: a refused take takes
    // nothing, so asking again until one fits changes no window.
    let mut tries = 0;
    while take(b, &l, "a", s(1)).await.is_err() {
        tries += 1;
        assert!(
            tries < 250,
            "the released slot was not given back within 5 s"
        );
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(
        take(b, &l, "a", s(2)).await.err(),
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
                    super::$case(&redis.windows).await;
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
