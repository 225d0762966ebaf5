//! Rate-limit state: each server's rolling windows for `rate_limit` rules, and the
//! per-client request rate that protects the proxy itself.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;
use tollgate_policy::{Decision, Policy, RateLimiter, Slot, ToolCall};

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
    fn one_64_shares_one_request_rate() {
        let rate = ClientRate::new(2);
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
