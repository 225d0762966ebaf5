//! Rate-limit state: each server's rolling windows for `rate_limit` rules, and the
//! per-client request rate that protects the proxy itself.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;
use redis::Script;
use tollgate_policy::{Decision, Policy, RateLimiter, Slot, ToolCall};

use super::remote::{Remote, Unavailable};

/// The key of an anonymous peer for per-client limits: its address, or for an
/// IPv6 peer its /64, which one host (or one customer of a provider) usually has
/// whole, so that walking through its addresses does not get it fresh limits.
pub fn peer_key(peer: IpAddr) -> String {
    match peer {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(prefix))
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(String::new, dotted),
        IpAddr::V4(v4) => dotted(v4),
    }
}

/// `a.b.c.d`, written digit by digit: every request builds a peer's key, and the
/// formatting machinery costs several times this.
fn dotted(v4: std::net::Ipv4Addr) -> String {
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// One server's rolling windows, kept across policy reloads: in this process, or
/// in the shared Redis (`state.backend: redis`) where every replica counts the same.
pub struct CallLimits {
    limiter: Mutex<RateLimiter>,
    shared: Option<SharedWindows>,
}

struct SharedWindows {
    remote: Arc<Remote>,
    server: Arc<str>,
    script: Arc<Script>,
}

/// A slot taken by one call, given back with [`CallLimits::release`]. Not `Clone`.
#[derive(Debug)]
pub enum Taken {
    /// In this process's window.
    Local(Slot),
    /// In a shared window: the sorted set and this call's member of it.
    Shared {
        /// The window's key.
        key: String,
        /// The call's member.
        member: String,
    },
}

/// A call whose rate limit could not be checked: the shared state is unreachable.
pub struct Unchecked {
    /// The policy's decision, before its rate limit.
    pub decision: Decision,
    /// Why the limit could not be checked.
    pub error: Unavailable,
}

/// The rolling-window log of one key in one step: drop what left the window, count
/// what is left, add this call when it fits, and let the key expire with its window.
/// Redis's own clock is used, so every replica reads the same time. Returns
/// `{1, 0}` when the call fits, else `{0, ms until a slot frees}`.
const TAKE_SLOT: &str = r"
local window = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
";

impl CallLimits {
    /// Windows in this process.
    pub fn local() -> CallLimits {
        CallLimits {
            limiter: Mutex::new(RateLimiter::new()),
            shared: None,
        }
    }

    /// Windows of `server` in the shared Redis.
    pub fn shared(remote: Arc<Remote>, server: &str) -> CallLimits {
        CallLimits {
            limiter: Mutex::new(RateLimiter::new()),
            shared: Some(SharedWindows {
                remote,
                server: server.into(),
                script: Arc::new(Script::new(TAKE_SLOT)),
            }),
        }
    }

    /// Evaluates a call against `policy`, taking a slot of its rate limit if it has
    /// one. Only a call with a rate limit reaches Redis, in one round trip.
    pub async fn decide(
        &self,
        policy: &Policy,
        call: &ToolCall<'_>,
        now: Duration,
    ) -> Result<(Decision, Option<Taken>), Unchecked> {
        let Some(shared) = &self.shared else {
            let mut decision =
                tollgate_policy::evaluate(policy, &mut self.limiter.lock(), call, now);
            let taken = decision.slot.take().map(Taken::Local);
            return Ok((decision, taken));
        };
        let mut decision = policy.evaluate(call);
        let Some((limit, key)) = tollgate_policy::limit_of(policy, &decision, call) else {
            return Ok((decision, None));
        };
        let counted = key;
        let key = shared
            .remote
            .key(&["limit", &shared.server, &limit.id, key]);
        let member = super::random_hex(12);
        let window_ms = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX);
        let mut conn = shared.remote.connection();
        let mut invocation = shared.script.prepare_invoke();
        invocation
            .key(&key)
            .arg(window_ms)
            .arg(limit.max)
            .arg(&member);
        let answer: Result<(u8, i64), Unavailable> =
            shared.remote.run(invocation.invoke_async(&mut conn)).await;
        match answer {
            Ok((1, _)) => Ok((decision, Some(Taken::Shared { key, member }))),
            Ok((_, wait_ms)) => {
                let wait = Duration::from_millis(u64::try_from(wait_ms.max(1)).unwrap_or(1));
                tollgate_policy::over_limit(&mut decision, limit, counted, wait);
                Ok((decision, None))
            }
            Err(error) => Err(Unchecked { decision, error }),
        }
    }

    /// Gives a slot back: the call it was taken for never left Tollgate. A shared
    /// slot is removed by a task of its own (best effort: if Redis is away, the slot
    /// leaves with its window).
    pub fn release(&self, taken: Taken) {
        match taken {
            Taken::Local(slot) => self.limiter.lock().release(slot),
            Taken::Shared { key, member } => {
                let Some(shared) = &self.shared else {
                    return;
                };
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let remote = shared.remote.clone();
                runtime.spawn(async move {
                    let mut conn = remote.connection();
                    let removed = remote
                        .run(redis::cmd("ZREM").arg(&key).arg(&member).query_async::<i64>(&mut conn))
                        .await;
                    if let Err(err) = removed {
                        tracing::warn!(error = %err, "a rate-limit slot could not be given back; it leaves with its window");
                    }
                });
            }
        }
    }

    /// Forgets windows with nothing left in them (shared ones expire by themselves).
    pub fn sweep(&self, now: Duration) {
        self.limiter.lock().sweep(now);
    }
}

/// `limits.requests_per_second`: a token bucket per client (or peer).
pub struct ClientRate(Option<DefaultKeyedRateLimiter<String>>);

impl ClientRate {
    /// A bucket of `burst` requests per key, refilled at `per_second`; a rate of 0
    /// turns it off (a burst of 0 is read as 1).
    pub fn new(per_second: u32, burst: u32) -> ClientRate {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        ClientRate(
            NonZeroU32::new(per_second).map(|rps| {
                DefaultKeyedRateLimiter::keyed(Quota::per_second(rps).allow_burst(burst))
            }),
        )
    }

    /// Whether requests are limited at all (`limits.requests_per_second` above 0).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn ipv6_peers_are_grouped_by_their_64() {
        let key = |text: &str| peer_key(text.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:fffe"), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::1"), "::/64");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        for octets in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 100, 99, 9],
            [127, 0, 0, 1],
        ] {
            let v4 = std::net::Ipv4Addr::from(octets);
            assert_eq!(peer_key(v4.into()), v4.to_string());
        }
    }

    #[test]
    fn the_bucket_takes_a_burst_then_the_rate() {
        let rate = ClientRate::new(1, 300);
        assert!((0..300).all(|_| rate.check("127.0.0.1").is_ok()));
        let wait = rate.check("127.0.0.1").unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(
            rate.check("127.0.0.2").is_ok(),
            "another client has its own bucket"
        );
    }

    #[test]
    fn one_64_shares_one_request_rate() {
        let rate = ClientRate::new(2, 2);
        let key = |text: &str| peer_key(text.parse().unwrap());
        assert!(rate.check(&key("2001:db8::1")).is_ok());
        assert!(rate.check(&key("2001:db8::2")).is_ok());
        assert!(
            rate.check(&key("2001:db8::3")).is_err(),
            "a new address in the same /64 got a fresh bucket"
        );
        assert!(rate.check(&key("2001:db8:0:1::1")).is_ok());
    }
}
