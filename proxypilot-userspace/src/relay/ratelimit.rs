//! `--rate-limit HOST=N`: requests per second per intercepted host, as a
//! token bucket holding up to N tokens (the burst) and refilled at N per
//! second. One bucket per host, shared by all of the sidecar's connections.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A request refused by the limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    pub per_second: u32,
    /// Until the next token is back.
    pub retry_after: Duration,
}

/// The buckets of the hosts that have a limit; other hosts are unlimited.
#[derive(Debug, Default)]
pub struct RateLimiter {
    // The host set is fixed at start-up, so only the buckets need a lock.
    buckets: BTreeMap<String, Mutex<Bucket>>,
}

impl RateLimiter {
    pub fn new(per_host: &BTreeMap<String, u32>) -> Self {
        let now = Instant::now();
        let buckets = per_host
            .iter()
            .map(|(host, &n)| (host.clone(), Mutex::new(Bucket::new(n, now))))
            .collect();
        RateLimiter { buckets }
    }

    /// Takes one token from `host`'s bucket, if it has a limit.
    pub fn acquire(&self, host: &str) -> Result<(), Throttled> {
        match self.buckets.get(host) {
            None => Ok(()),
            Some(b) => b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(Instant::now()),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    per_second: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Starts full: the first N requests go through at once.
    fn new(per_second: u32, now: Instant) -> Self {
        Bucket {
            per_second,
            tokens: f64::from(per_second),
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> Result<(), Throttled> {
        let rate = f64::from(self.per_second);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Throttled {
            per_second: self.per_second,
            retry_after: Duration::from_secs_f64((1.0 - self.tokens) / rate),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, t0);
        assert_eq!(b.take(t0), Ok(()));
        assert_eq!(b.take(t0), Ok(()));
        let refused = b.take(t0).unwrap_err();
        assert_eq!(refused.per_second, 2);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        // Half a token back after 250 ms: still refused, 250 ms to go.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(
            b.take(t1).unwrap_err().retry_after,
            Duration::from_millis(250)
        );
        assert_eq!(b.take(t0 + Duration::from_millis(500)), Ok(()));
        // A long pause refills to the burst, not beyond.
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!(b.take(t2), Ok(()));
        assert_eq!(b.take(t2), Ok(()));
        assert!(b.take(t2).is_err());
    }

    #[test]
    fn only_limited_hosts_are_counted() {
        let limiter = RateLimiter::new(&BTreeMap::from([("a.com".to_string(), 1)]));
        assert!(limiter.acquire("a.com").is_ok());
        assert!(limiter.acquire("a.com").is_err());
        for _ in 0..10 {
            assert!(limiter.acquire("b.com").is_ok());
        }
    }
}
