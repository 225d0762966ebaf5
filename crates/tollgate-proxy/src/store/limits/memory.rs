//! Rate-limit windows in this process: the policy crate's rolling-window log
//! ([`tollgate_policy::RateLimiter`]) behind a lock, on the clock the caller passes.

use std::time::Duration;

use parking_lot::Mutex;
use tollgate_policy::{RateLimit, RateLimiter, Slot};

/// One server's windows in this process.
#[derive(Default)]
pub struct Windows {
    limiter: Mutex<RateLimiter>,
}

impl Windows {
    /// Takes a slot of `limit` for `key` at `now`, or says how long until one frees.
    pub fn take(&self, limit: &RateLimit, key: &str, now: Duration) -> Result<Slot, Duration> {
        self.limiter.lock().try_acquire(limit, key, now)
    }

    /// Gives a slot back.
    pub fn release(&self, slot: Slot) {
        self.limiter.lock().release(slot);
    }

    /// Forgets windows with nothing left in them.
    pub fn sweep(&self, now: Duration) {
        self.limiter.lock().sweep(now);
    }
}
