//! Rate-limit state: each server's rolling windows for `rate_limit` rules, and the
//! per-client request rate that protects the proxy itself.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;
use tollgate_policy::{Decision, Policy, RateLimiter, Slot, ToolCall};

/// One server's rolling windows, kept across policy reloads.
#[derive(Default)]
pub struct CallLimits {
    limiter: Mutex<RateLimiter>,
}

impl CallLimits {
    /// Evaluates a call against `policy`, taking a slot of its rate limit if it has one.
    pub fn decide(&self, policy: &Policy, call: &ToolCall<'_>, now: Duration) -> Decision {
        tollgate_policy::evaluate(policy, &mut self.limiter.lock(), call, now)
    }

    /// Gives a slot back: the call it was taken for never left Tollgate.
    pub fn release(&self, slot: Slot) {
        self.limiter.lock().release(slot);
    }

    /// Forgets windows with nothing left in them.
    pub fn sweep(&self, now: Duration) {
        self.limiter.lock().sweep(now);
    }
}

/// `limits.requests_per_second`: a token bucket per client (or peer).
pub struct ClientRate(Option<DefaultKeyedRateLimiter<String>>);

impl ClientRate {
    /// A bucket of `per_second` requests per key; 0 turns it off.
    pub fn new(per_second: u32) -> ClientRate {
        ClientRate(
            NonZeroU32::new(per_second)
                .map(|rps| DefaultKeyedRateLimiter::keyed(Quota::per_second(rps))),
        )
    }

    /// Takes one request from `key`'s bucket, or says how long to wait.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(rate) = &self.0 else {
            return Ok(());
        };
        rate.check_key(&key.to_owned()).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }

    /// Forgets buckets that are full again.
    pub fn sweep(&self) {
        if let Some(rate) = &self.0 {
            rate.retain_recent();
        }
    }
}
