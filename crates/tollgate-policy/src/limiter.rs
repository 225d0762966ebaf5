//! Rolling-window rate limits: at most `max` calls in any window of `window`.
//!
//! A sliding log of call times per key, not a token bucket: `max: 10, window: 60`
//! must never let 19 calls through in the first minute. The clock is passed in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// A limit as compiled from a rule. Its `id` names the rule's tool pattern and
/// the limit itself, not the rule's position, so state survives reloads that
/// leave the rule unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Stable identity: pattern, clients, max, window and per.
    pub id: Arc<str>,
    /// Calls allowed per window.
    pub max: u32,
    /// The rolling window.
    pub window: Duration,
    /// Who shares it.
    pub per: crate::Per,
}

/// A slot taken by one call; give it back with [`RateLimiter::release`]. Not
/// `Clone`: a slot is given back at most once.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    key: Key,
    at: Duration,
}

/// A limit's id and the key counted under it. Shared with the slots taken, so a
/// call on a known key allocates nothing.
type Key = (Arc<str>, Arc<str>);

/// A [`Key`] as a call has it: hashes as the key does (two strings in order).
#[derive(Hash)]
struct Borrowed<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<Key> for Borrowed<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

#[derive(Debug)]
struct Log {
    window: Duration,
    times: VecDeque<Duration>,
}

/// Rate-limit state for every key. Pure: time comes from the caller.
#[derive(Debug, Default)]
pub struct RateLimiter {
    logs: hashbrown::HashMap<Key, Log>,
    calls_since_sweep: u32,
}

/// Calls between automatic sweeps of idle keys.
const SWEEP_EVERY: u32 = 4096;

impl RateLimiter {
    /// No state.
    pub fn new() -> RateLimiter {
        RateLimiter::default()
    }

    /// Takes a slot for `key` at `now`, or says how long until one frees up.
    pub fn try_acquire(
        &mut self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> Result<Slot, Duration> {
        self.calls_since_sweep += 1;
        if self.calls_since_sweep >= SWEEP_EVERY {
            self.sweep(now);
        }
        let (map_key, log) = self
            .logs
            .raw_entry_mut()
            .from_key(&Borrowed(&limit.id, key))
            .or_insert_with(|| {
                let log = Log {
                    window: limit.window,
                    times: VecDeque::new(),
                };
                ((limit.id.clone(), Arc::from(key)), log)
            });
        log.window = limit.window;
        while log.times.front().is_some_and(|&t| t + limit.window <= now) {
            log.times.pop_front();
        }
        if log.times.len() < limit.max as usize {
            log.times.push_back(now);
            return Ok(Slot {
                key: map_key.clone(),
                at: now,
            });
        }
        let oldest = log.times.front().copied().unwrap_or(now);
        Err((oldest + limit.window).saturating_sub(now))
    }

    /// Gives a slot back (the call never reached the upstream).
    pub fn release(&mut self, slot: Slot) {
        if let Some(log) = self.logs.get_mut(&slot.key)
            && let Some(i) = log.times.iter().rposition(|&t| t == slot.at)
        {
            log.times.remove(i);
        }
    }

    /// Forgets keys with no call inside their window.
    pub fn sweep(&mut self, now: Duration) {
        self.calls_since_sweep = 0;
        self.logs
            .retain(|_, log| log.times.back().is_some_and(|&t| t + log.window > now));
    }

    /// Keys with state.
    pub fn len(&self) -> usize {
        self.logs.len()
    }

    /// Whether no key has state.
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn limit(max: u32, window: u64) -> RateLimit {
        RateLimit {
            id: "t".into(),
            max,
            window: Duration::from_secs(window),
            per: crate::Per::Session,
        }
    }

    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn at_most_max_in_any_rolling_window() {
        let mut limiter = RateLimiter::new();
        let l = limit(10, 60);
        for i in 0..10 {
            limiter.try_acquire(&l, "a", s(i)).unwrap();
        }
        assert_eq!(limiter.try_acquire(&l, "a", s(59)), Err(s(1)));
        // At 60s the first call leaves the window, and only it.
        limiter.try_acquire(&l, "a", s(60)).unwrap();
        assert!(limiter.try_acquire(&l, "a", s(60)).is_err());
        // Over the first two minutes at most 10 per rolling minute: never 19 in the first.
        let mut fresh = RateLimiter::new();
        let allowed = (0..120)
            .filter(|&t| fresh.try_acquire(&l, "b", s(t) / 2).is_ok())
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn keys_are_independent_and_slots_can_be_given_back() {
        let mut limiter = RateLimiter::new();
        let l = limit(1, 60);
        let slot = limiter.try_acquire(&l, "a", s(0)).unwrap();
        limiter.try_acquire(&l, "b", s(0)).unwrap();
        assert!(limiter.try_acquire(&l, "a", s(1)).is_err());
        limiter.release(slot);
        limiter.try_acquire(&l, "a", s(1)).unwrap();
    }

    #[test]
    fn idle_keys_are_swept() {
        let mut limiter = RateLimiter::new();
        let l = limit(5, 10);
        for key in 0..1000 {
            limiter.try_acquire(&l, &key.to_string(), s(0)).unwrap();
        }
        assert_eq!(limiter.len(), 1000);
        limiter.sweep(s(9));
        assert_eq!(limiter.len(), 1000);
        limiter.sweep(s(10));
        assert!(limiter.is_empty());
    }
}
