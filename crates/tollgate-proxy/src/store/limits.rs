//! Rate-limit state: each server's rolling windows for `rate_limit` rules, and the
//! per-client request rate that protects the proxy itself.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use tollgate_policy::{Decision, Policy, RateLimit, ToolCall};

use super::dispatch;
use super::remote::{Remote, Unavailable};
use crate::config::OnStateFailure;

#[cfg(test)]
mod contract;
mod memory;
mod redis;

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

/// What a backend of rate-limit windows does: the rolling-window log of each
/// limit and key, one slot per call that fits. [`memory::Windows`] and
/// [`redis::Windows`] implement it; `limits/contract.rs` holds both to one
/// behaviour on a driven clock.
pub trait WindowStore {
    /// A slot one call holds in a window.
    type Slot: std::fmt::Debug + Send;

    /// Takes a slot of `limit` for `key` if fewer than `limit.max` calls were
    /// taken in the half-open window `(now - limit.window, now]`, or says how long
    /// until the oldest of them leaves it (at least 1 ms). A refused call takes no
    /// slot. A backend on a clock of its own (the shared one's) may read `now`
    /// from it instead. `Err` when the windows cannot be reached; then nothing
    /// was taken.
    fn take(
        &self,
        limit: &RateLimit,
        key: &str,
        now: Duration,
    ) -> impl Future<Output = Result<Result<Self::Slot, Duration>, Unavailable>> + Send;

    /// Gives a slot back, so later calls count without it: at once in this
    /// process, soon in a shared backend (best effort: a slot that cannot be
    /// given back leaves with its window).
    fn release(&self, slot: Self::Slot);

    /// Forgets windows with nothing left in them at `now` (a backend whose
    /// windows expire by themselves does nothing).
    fn sweep(&self, now: Duration);
}

/// One server's rolling windows, kept across policy reloads: in this process
/// ([`memory`]) or in the shared Redis ([`redis`], `state.backend: redis`) where every
/// replica counts the same, behind `state.on_failure` (what a call whose limit cannot
/// be checked gets). The caller never learns which.
pub struct CallLimits {
    windows: Backend,
    on_failure: OnStateFailure,
}

/// The backends, dispatched without boxing: a call costs one match.
enum Backend {
    Memory(memory::Windows),
    Redis(redis::Windows),
}

/// A slot taken by one call, given back with [`CallLimits::release`]. Not `Clone`.
#[derive(Debug)]
pub struct Taken(Held);

#[derive(Debug)]
enum Held {
    Memory(<memory::Windows as WindowStore>::Slot),
    Redis(<redis::Windows as WindowStore>::Slot),
}

/// What the windows made of a call.
pub struct Decided {
    /// The policy's decision, with its rate limit (refused over it, or refused when
    /// the limit could not be checked and `state.on_failure` is `refuse`).
    pub decision: Decision,
    /// The slot the call holds, if its rule has a rate limit and it fit.
    pub taken: Option<Taken>,
    /// Why the limit could not be checked, if it could not.
    pub unchecked: Option<Unchecked>,
}

/// A call whose rate limit could not be checked: the shared state is unreachable.
pub struct Unchecked {
    /// Why.
    pub error: Unavailable,
    /// Whether the call was refused for it (`state.on_failure: refuse`), else let
    /// through without its limit (`allow`).
    pub refused: bool,
}

impl CallLimits {
    /// Windows in this process.
    pub fn local() -> CallLimits {
        CallLimits {
            windows: Backend::Memory(memory::Windows::default()),
            on_failure: OnStateFailure::default(),
        }
    }

    /// Windows of `server` in the shared Redis; a call whose limit cannot be checked
    /// there is refused or let through as `on_failure` says.
    pub fn shared(remote: Arc<Remote>, server: &str, on_failure: OnStateFailure) -> CallLimits {
        CallLimits {
            windows: Backend::Redis(redis::Windows::new(remote, server)),
            on_failure,
        }
    }

    /// Evaluates a call against `policy`, taking a slot of its rate limit if it has
    /// one. Only a call with a rate limit reaches Redis, in one round trip.
    pub async fn decide(&self, policy: &Policy, call: &ToolCall<'_>, now: Duration) -> Decided {
        let mut decision = policy.evaluate(call);
        let Some((limit, key)) = tollgate_policy::limit_of(policy, &decision, call) else {
            return Decided {
                decision,
                taken: None,
                unchecked: None,
            };
        };
        let took = match &self.windows {
            Backend::Memory(windows) => windows
                .take(limit, key, now)
                .await
                .map(|took| took.map(Held::Memory)),
            Backend::Redis(windows) => windows
                .take(limit, key, now)
                .await
                .map(|took| took.map(Held::Redis)),
        };
        let (taken, unchecked) = match took {
            Ok(Ok(held)) => (Some(Taken(held)), None),
            Ok(Err(wait)) => {
                tollgate_policy::over_limit(&mut decision, limit, key, wait);
                (None, None)
            }
            Err(error) => (None, Some(self.unchecked(&mut decision, error))),
        };
        Decided {
            decision,
            taken,
            unchecked,
        }
    }

    /// `state.on_failure` for a call whose limit could not be checked.
    fn unchecked(&self, decision: &mut Decision, error: Unavailable) -> Unchecked {
        let refused = self.on_failure == OnStateFailure::Refuse;
        if refused {
            decision.action = tollgate_policy::Action::Deny;
            decision.reason = format!(
                "its rate limit could not be checked because {error} (state.on_failure: refuse)"
            );
        }
        Unchecked { error, refused }
    }

    /// Gives a slot back: the call it was taken for never left Tollgate. A shared
    /// slot is removed by a task of its own (best effort: if Redis is away, the slot
    /// leaves with its window).
    pub fn release(&self, taken: Taken) {
        match (&self.windows, taken.0) {
            (Backend::Memory(windows), Held::Memory(slot)) => windows.release(slot),
            (Backend::Redis(windows), Held::Redis(slot)) => windows.release(slot),
            // A slot of other windows (there are none: each server has one kind).
            _ => {}
        }
    }

    /// Forgets windows with nothing left in them (shared ones expire by themselves).
    pub fn sweep(&self, now: Duration) {
        dispatch!(&self.windows, windows => windows.sweep(now));
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
