//! Rate-limit windows in the shared Redis (`state.backend: redis`), where every
//! replica counts the same: one sorted set per window and key, a call's slot one
//! member of it, taken by one Lua script per call (one round trip).

use std::sync::Arc;
use std::time::Duration;

use tollgate_policy::RateLimit;

use super::WindowStore;
use crate::store::remote::{Remote, Unavailable};

/// The rolling-window log of one key in one step: drop what left the window, count
/// what is left, add this call when it fits, and let the key expire with its window.
/// Redis's own clock is used, so every replica reads the same time (`ARGV[4]`, a
/// time in milliseconds, is given only by the contract tests, which drive the
/// clock). Returns `{1, 0}` when the call fits, else `{0, ms until a slot frees}`.
/// The same window as [`tollgate_policy::RateLimiter`]: the contract tests hold
/// the two to one behaviour.
const TAKE_SLOT: &str = r"
local window = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
";

/// One server's windows in the shared Redis.
pub struct Windows {
    remote: Arc<Remote>,
    server: Arc<str>,
    script: ::redis::Script,
    /// Whether the caller's clock is used instead of Redis's (contract tests only).
    given_clock: bool,
}

/// A slot in a shared window: the sorted set and this call's member of it.
#[derive(Debug)]
pub struct Slot {
    key: String,
    member: String,
}

impl Windows {
    /// Windows of `server` in the shared Redis, on Redis's clock.
    pub fn new(remote: Arc<Remote>, server: &str) -> Windows {
        Windows {
            remote,
            server: server.into(),
            script: ::redis::Script::new(TAKE_SLOT),
            given_clock: false,
        }
    }

    /// The same windows on the caller's clock (the contract tests drive it).
    #[cfg(test)]
    pub fn on_given_clock(mut self) -> Windows {
        self.given_clock = true;
        self
    }
}

impl WindowStore for Windows {
    type Slot = Slot;

    /// One round trip; `now` is used only on a given clock.
    async fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> Result<Result<Slot, Duration>, Unavailable> {
        let key = self.remote.key(&["limit", &self.server, &limit.id, key]);
        let member = crate::store::random_hex(12);
        let window_ms = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.remote.connection();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&key)
            .arg(window_ms)
            .arg(limit.max)
            .arg(&member);
        if self.given_clock {
            invocation.arg(u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
        }
        let (fits, wait_ms): (u8, i64) =
            self.remote.run(invocation.invoke_async(&mut conn)).await?;
        Ok(if fits == 1 {
            Ok(Slot { key, member })
        } else {
            Err(Duration::from_millis(
                u64::try_from(wait_ms.max(1)).unwrap_or(1),
            ))
        })
    }

    /// From a task of its own.
    fn release(&self, slot: Slot) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let remote = self.remote.clone();
        runtime.spawn(async move {
            if let Err(err) = release(&remote, slot).await {
                tracing::warn!(error = %err, "a rate-limit slot could not be given back; it leaves with its window");
            }
        });
    }

    /// Shared windows expire by themselves.
    fn sweep(&self, _now: Duration) {}
}

async fn release(remote: &Remote, slot: Slot) -> Result<(), Unavailable> {
    let mut conn = remote.connection();
    remote
        .run(
            ::redis::cmd("ZREM")
                .arg(&slot.key)
                .arg(&slot.member)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
}
