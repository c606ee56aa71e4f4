//! The resolver's counters and the names it refused, for `/stats`.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

/// How many distinct refused names `/stats` keeps (the most recent).
pub const DENIED_NAMES_KEPT: usize = 64;

#[derive(Debug, Default)]
pub struct DnsStats {
    queries: AtomicU64,
    answered: AtomicU64,
    denied: AtomicU64,
    malformed: AtomicU64,
    rate_limited: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    denied_names: Mutex<VecDeque<String>>,
}

/// What `/stats` shows (flat, like its other fields).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct DnsStatsView {
    pub dns_queries: u64,
    pub dns_answered: u64,
    pub dns_denied: u64,
    pub dns_malformed: u64,
    pub dns_rate_limited: u64,
    pub dns_busy: u64,
    pub dns_failed: u64,
    /// The most recent distinct names refused, oldest first.
    pub dns_denied_names: Vec<String>,
}

/// What happened to one query, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An allowed name, answered from upstream.
    Answered,
    /// Not a name the sandbox may reach: answered NXDOMAIN, nothing asked.
    Denied,
    /// Over the sandbox's query rate: REFUSED, nothing asked.
    RateLimited,
    /// Too many queries upstream at once: SERVFAIL.
    Busy,
    /// No upstream answered: SERVFAIL.
    Failed,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Denied => "denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::Busy => "busy",
            Outcome::Failed => "failed",
        }
    }
}

impl DnsStats {
    pub fn malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, outcome: Outcome, name: &str) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Answered => &self.answered,
            Outcome::Denied => &self.denied,
            Outcome::RateLimited => &self.rate_limited,
            Outcome::Busy => &self.busy,
            Outcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if outcome == Outcome::Denied {
            let mut names = self.denied_names.lock().expect("denied names lock");
            if let Some(i) = names.iter().position(|n| n == name) {
                names.remove(i);
            }
            if names.len() == DENIED_NAMES_KEPT {
                names.pop_front();
            }
            names.push_back(name.to_string());
        }
    }

    pub fn view(&self) -> DnsStatsView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStatsView {
            dns_queries: get(&self.queries),
            dns_answered: get(&self.answered),
            dns_denied: get(&self.denied),
            dns_malformed: get(&self.malformed),
            dns_rate_limited: get(&self.rate_limited),
            dns_busy: get(&self.busy),
            dns_failed: get(&self.failed),
            dns_denied_names: self
                .denied_names
                .lock()
                .expect("denied names lock")
                .iter()
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_distinct_denied_names() {
        let s = DnsStats::default();
        for i in 0..DENIED_NAMES_KEPT + 10 {
            s.count(Outcome::Denied, &format!("n{i}.example"));
        }
        s.count(Outcome::Denied, "n20.example");
        s.count(Outcome::Answered, "ok.example");
        let v = s.view();
        assert_eq!(v.dns_denied_names.len(), DENIED_NAMES_KEPT);
        assert_eq!(v.dns_denied_names.last().unwrap(), "n20.example");
        assert_eq!(v.dns_denied_names[0], "n10.example");
        assert_eq!((v.dns_queries, v.dns_denied, v.dns_answered), (76, 75, 1));
    }
}
