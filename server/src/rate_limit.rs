//! Abuse limits: token buckets (GCRA, the `governor` crate) per user, per connection and per
//! client address. A request over its limit is refused with `rate_limited` and how long to
//! wait; it costs the node a map lookup, never a Raft entry.
//!
//! The limits are per node: a user connected to three nodes may send three times as much.
//! Failed sign-ins are counted, successful ones are not: once a user name (or an address)
//! has failed more often than its bucket allows, sign-ins for it are refused until the bucket
//! has a token again.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;

use crate::config::RateLimits;
use crate::error::ServiceError;

/// A rate: `N/s` or `N/min`, then optionally `,BURST` (default: N). `0` (or `0/s`) is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub count: u32,
    pub per_minute: bool,
    pub burst: u32,
}

impl RateSpec {
    /// `None` for no limit.
    pub fn enabled(self) -> Option<RateSpec> {
        (self.count > 0).then_some(self)
    }

    fn quota(self) -> Option<Quota> {
        let count = NonZeroU32::new(self.count)?;
        let burst = NonZeroU32::new(self.burst).unwrap_or(count);
        let quota = if self.per_minute { Quota::per_minute(count) } else { Quota::per_second(count) };
        Some(quota.allow_burst(burst))
    }
}

impl std::str::FromStr for RateSpec {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a rate: write N/s or N/min, optionally followed by ,BURST (0: no limit)");
        let text = text.trim();
        if text == "0" {
            return Ok(RateSpec { count: 0, per_minute: false, burst: 0 });
        }
        let (rate, burst) = match text.split_once(',') {
            Some((rate, burst)) => (rate.trim(), Some(burst.trim().parse::<u32>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per_minute = match unit.trim() {
            "s" | "sec" | "second" => false,
            "min" | "minute" => true,
            _ => return Err(bad()),
        };
        let burst = burst.unwrap_or(count);
        if count > 0 && burst == 0 {
            return Err(bad());
        }
        Ok(RateSpec { count, per_minute, burst })
    }
}

impl<'de> Deserialize<'de> for RateSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn limited(what: &str, wait: Duration) -> ServiceError {
    ServiceError::RateLimited { what: what.to_owned(), retry_after: wait.max(Duration::from_millis(1)) }
}

/// A keyed bucket, or none.
struct Keyed<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(spec: Option<RateSpec>) -> Self {
        Keyed { limiter: spec.and_then(RateSpec::quota).map(DefaultKeyedRateLimiter::keyed) }
    }

    /// Takes `n` tokens for `key`; how long to wait if there are not enough.
    fn take(&self, key: &K, n: u32) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let Some(n) = NonZeroU32::new(n) else { return Ok(()) };
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            // More than the burst at once: never possible; wait a whole period.
            Err(_) => Err(Duration::from_secs(60)),
        }
    }

    fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Keys refused until an instant, bounded.
struct Blocked<K: Hash + Eq> {
    until: Mutex<HashMap<K, Instant>>,
}

/// Most user names or addresses blocked from signing in at once; beyond it, the oldest blocks
/// make room (an attacker cycling through names gains nothing: each new name starts blocked
/// after its own burst of failures).
const MAX_BLOCKED: usize = 100_000;

impl<K: Hash + Eq + Clone> Blocked<K> {
    fn new() -> Self {
        Blocked { until: Mutex::new(HashMap::new()) }
    }

    fn check(&self, key: &K) -> Result<(), Duration> {
        let until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        match until.get(key) {
            Some(&at) if at > Instant::now() => Err(at - Instant::now()),
            _ => Ok(()),
        }
    }

    fn block(&self, key: K, wait: Duration) {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if until.len() >= MAX_BLOCKED {
            let now = Instant::now();
            until.retain(|_, at| *at > now);
            if until.len() >= MAX_BLOCKED {
                until.clear();
            }
        }
        until.insert(key, Instant::now() + wait);
    }

    fn forget_expired(&self) {
        let now = Instant::now();
        self.until.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, at| *at > now);
    }
}

/// Every limit of a node.
pub struct RateLimiters {
    sends_per_user: Keyed<String>,
    rooms_per_user: Keyed<String>,
    failed_logins_per_user: Keyed<String>,
    failed_logins_per_address: Keyed<IpAddr>,
    registrations_per_address: Keyed<IpAddr>,
    blocked_users: Blocked<String>,
    blocked_addresses: Blocked<IpAddr>,
    requests_per_connection: Option<Quota>,
}

impl RateLimiters {
    pub fn new(limits: &RateLimits) -> RateLimiters {
        RateLimiters {
            sends_per_user: Keyed::new(limits.sends_per_user),
            rooms_per_user: Keyed::new(limits.rooms_per_user),
            failed_logins_per_user: Keyed::new(limits.failed_logins_per_user),
            failed_logins_per_address: Keyed::new(limits.failed_logins_per_address),
            registrations_per_address: Keyed::new(limits.registrations_per_address),
            blocked_users: Blocked::new(),
            blocked_addresses: Blocked::new(),
            requests_per_connection: limits.requests_per_connection.and_then(RateSpec::quota),
        }
    }

    /// `user` sends `n` messages.
    pub fn sends(&self, user: &str, n: u32) -> Result<(), ServiceError> {
        self.sends_per_user.take(&user.to_owned(), n).map_err(|wait| limited("messages sent", wait))
    }

    /// `user` creates a room.
    pub fn room_creation(&self, user: &str) -> Result<(), ServiceError> {
        self.rooms_per_user.take(&user.to_owned(), 1).map_err(|wait| limited("rooms created", wait))
    }

    /// Whether a sign-in as `user` from `address` may be tried now.
    pub fn login_allowed(&self, user: &str, address: IpAddr) -> Result<(), ServiceError> {
        self.blocked_users.check(&user.to_owned()).map_err(|wait| limited("failed sign-ins for this user", wait))?;
        self.blocked_addresses.check(&address).map_err(|wait| limited("failed sign-ins from this address", wait))
    }

    /// A sign-in as `user` from `address` failed.
    pub fn login_failed(&self, user: &str, address: IpAddr) {
        if let Err(wait) = self.failed_logins_per_user.take(&user.to_owned(), 1) {
            self.blocked_users.block(user.to_owned(), wait);
        }
        if let Err(wait) = self.failed_logins_per_address.take(&address, 1) {
            self.blocked_addresses.block(address, wait);
        }
    }

    /// Whether a sign-in naming no user (a refresh, an external token) may be tried from
    /// `address` now.
    pub fn address_allowed(&self, address: IpAddr) -> Result<(), ServiceError> {
        self.blocked_addresses.check(&address).map_err(|wait| limited("failed sign-ins from this address", wait))
    }

    /// A sign-in naming no user failed from `address`.
    pub fn address_failed(&self, address: IpAddr) {
        if let Err(wait) = self.failed_logins_per_address.take(&address, 1) {
            self.blocked_addresses.block(address, wait);
        }
    }

    /// An account is registered from `address`.
    pub fn registration(&self, address: IpAddr) -> Result<(), ServiceError> {
        self.registrations_per_address.take(&address, 1).map_err(|wait| limited("accounts registered", wait))
    }

    /// A new connection's own bucket for its requests.
    pub fn connection_rate(&self) -> ConnectionRate {
        ConnectionRate {
            limiter: self.requests_per_connection.map(DefaultDirectRateLimiter::direct),
            held_until: Mutex::new(None),
        }
    }

    /// Drops the state of keys that have been quiet long enough to have full buckets again.
    pub fn forget_idle(&self) {
        self.sends_per_user.forget_idle();
        self.rooms_per_user.forget_idle();
        self.failed_logins_per_user.forget_idle();
        self.failed_logins_per_address.forget_idle();
        self.registrations_per_address.forget_idle();
        self.blocked_users.forget_expired();
        self.blocked_addresses.forget_expired();
    }
}

/// One connection's request budget. A request over it is refused with `rate_limited`, and the
/// connection takes no new stream until the wait it was told has passed: a client that ignores
/// the answer and keeps asking is slowed by QUIC's stream limit instead of costing the node a
/// refusal per request.
pub struct ConnectionRate {
    limiter: Option<DefaultDirectRateLimiter>,
    held_until: Mutex<Option<Instant>>,
}

impl ConnectionRate {
    /// One request.
    pub fn request(&self) -> Result<(), ServiceError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + wait);
            limited("requests on this connection", wait)
        })
    }

    /// Waits out the pause a refusal asked for, if any.
    pub async fn wait_if_held(&self) {
        let until = self.held_until.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_bursts() {
        assert_eq!("50/s,200".parse(), Ok(RateSpec { count: 50, per_minute: false, burst: 200 }));
        assert_eq!("10/min".parse(), Ok(RateSpec { count: 10, per_minute: true, burst: 10 }));
        assert_eq!("0".parse::<RateSpec>().map(RateSpec::enabled), Ok(None));
        for bad in ["", "50", "50/h", "x/s", "5/s,", "5/s,0", "-1/s"] {
            assert!(bad.parse::<RateSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_user_over_their_rate_is_told_how_long_to_wait_and_others_are_not_affected() {
        let limits = RateLimits { sends_per_user: "1/min,3".parse().ok(), ..Default::default() };
        let limiters = RateLimiters::new(&limits);
        assert!(limiters.sends("ann", 2).is_ok());
        assert!(limiters.sends("ann", 1).is_ok());
        match limiters.sends("ann", 1) {
            Err(ServiceError::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(50) && retry_after <= Duration::from_secs(60),
                    "{retry_after:?}"
                )
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
        assert!(limiters.sends("bob", 3).is_ok(), "another user has their own bucket");
    }

    #[test]
    fn only_failed_sign_ins_count() {
        let limits = RateLimits { failed_logins_per_user: "1/min,2".parse().ok(), ..Default::default() };
        let limiters = RateLimiters::new(&limits);
        let addr: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..10 {
            assert!(limiters.login_allowed("ann", addr).is_ok(), "successful sign-ins are not counted");
        }
        limiters.login_failed("ann", addr);
        limiters.login_failed("ann", addr);
        assert!(limiters.login_allowed("ann", addr).is_ok(), "the burst is two failures");
        limiters.login_failed("ann", addr);
        assert!(matches!(limiters.login_allowed("ann", addr), Err(ServiceError::RateLimited { .. })));
        assert!(limiters.login_allowed("bob", addr).is_ok());
    }

    #[tokio::test]
    async fn a_connection_over_its_rate_is_refused_then_held_for_the_wait() {
        let limits = RateLimits { requests_per_connection: "10/s,2".parse().ok(), ..Default::default() };
        let rate = RateLimiters::new(&limits).connection_rate();
        assert!(rate.request().is_ok() && rate.request().is_ok());
        let refused = rate.request();
        assert!(matches!(refused, Err(ServiceError::RateLimited { .. })), "{refused:?}");
        let started = Instant::now();
        rate.wait_if_held().await;
        assert!(started.elapsed() >= Duration::from_millis(50), "held {:?}", started.elapsed());
        assert!(rate.request().is_ok(), "a token came back meanwhile");
        let started = Instant::now();
        rate.wait_if_held().await;
        assert!(started.elapsed() < Duration::from_millis(20), "not held without a refusal");
    }

    #[test]
    fn failures_that_name_no_user_count_against_their_address_only() {
        let limits = RateLimits {
            failed_logins_per_user: "1/min,1".parse().ok(),
            failed_logins_per_address: "1/min,2".parse().ok(),
            ..Default::default()
        };
        let limiters = RateLimiters::new(&limits);
        let (mallory, ann): (IpAddr, IpAddr) = ([10, 0, 0, 66].into(), [10, 0, 0, 7].into());
        for _ in 0..3 {
            limiters.address_failed(mallory);
        }
        assert!(limiters.address_allowed(mallory).is_err(), "bad refresh tokens from one address block it");
        assert!(limiters.address_allowed(ann).is_ok(), "and nobody else");
        assert!(limiters.login_allowed("ann", ann).is_ok(), "no user name is blocked by them");
    }
}
