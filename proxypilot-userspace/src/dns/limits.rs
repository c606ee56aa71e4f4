//! The resolver's caps: one query rate for the whole sandbox (a token
//! bucket) and a number of queries in flight upstream.

use std::sync::Mutex;

use tokio::time::Instant;

/// Queries per second the sandbox may make, on average.
pub const QUERIES_PER_SECOND: u32 = 100;
/// Queries the sandbox may make at once after a quiet spell.
pub const QUERY_BURST: u32 = 200;
/// Queries waiting for an upstream answer at once; past it, SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 64;
/// TCP connections to the resolver open at once; past it, closed.
pub const MAX_TCP_CONNECTIONS: usize = 32;

/// A token bucket of `burst` tokens refilled at `per_second`.
#[derive(Debug)]
pub struct QueryRate {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl QueryRate {
    pub fn new(per_second: u32, burst: u32) -> Self {
        QueryRate {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes a token; false when the bucket is empty.
    pub fn admit(&self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("rate lock");
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.per_second).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let r = QueryRate::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| r.admit_at(t0)).count(), 5);
        // 0.25 s later: 2.5 tokens back, so two more.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!((0..8).filter(|_| r.admit_at(t1)).count(), 2);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| r.admit_at(t2)).count(), 5);
    }
}
