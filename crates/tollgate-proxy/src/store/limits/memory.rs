//! Rate-limit windows in this process: the policy crate's rolling-window log
//! ([`tollgate_policy::RateLimiter`]) behind a lock, on the clock the caller passes.

use std::time::Duration;

use parking_lot::Mutex;
use tollgate_policy::{RateLimit, RateLimiter, Slot};

use super::WindowStore;
use crate::store::remote::Unavailable;

/// One server's windows in this process.
#[derive(Default)]
pub struct Windows {
    limiter: Mutex<RateLimiter>,
}

impl WindowStore for Windows {
    type Slot = Slot;

    /// Never unavailable; done when called (the future is ready).
    fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> impl Future<Output = Result<Result<Slot, Duration>, Unavailable>> + Send {
        std::future::ready(Ok(self.limiter.lock().try_acquire(limit, key, now)))
    }

    fn release(&self, slot: Slot) {
        self.limiter.lock().release(slot);
    }

    fn sweep(&self, now: Duration) {
        self.limiter.lock().sweep(now);
    }
}
