//! Per-host leaf certificates: minted on first use, cached, renewed early.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ca::{CaError, CertAuthority, LEAF_BACKDATE};

/// Leaves live this long by default: short, so a leaked leaf key expires soon.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Hosts kept by default; intercepted hosts are few, this only bounds abuse.
pub const DEFAULT_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("loading the minted leaf key into rustls: {0}")]
    Key(#[from] rustls::Error),
    #[error("the leaf minting task failed: {0}")]
    Task(String),
}

struct Minted {
    key: Arc<CertifiedKey>,
    minted_at: SystemTime,
    not_after: SystemTime,
}

impl Minted {
    /// Renew once less than a third of the lifetime is left, or when the
    /// clock went back before the leaf's notBefore (minted_at minus the
    /// backdating): clients on this machine would see it as not yet valid.
    fn fresh(&self, now: SystemTime) -> bool {
        if now + LEAF_BACKDATE < self.minted_at {
            return false;
        }
        let total = self
            .not_after
            .duration_since(self.minted_at)
            .unwrap_or_default();
        match self.not_after.duration_since(now) {
            Ok(left) => left > total / 3,
            Err(_) => false,
        }
    }
}

/// One slot per host. The async mutex makes minting single-flight: the
/// first caller mints while the others wait, then they all read the result.
type Slot = Arc<tokio::sync::Mutex<Option<Minted>>>;

pub struct LeafCache {
    ca: Arc<CertAuthority>,
    lifetime: Duration,
    capacity: usize,
    slots: Mutex<HashMap<String, (Slot, u64)>>,
    clock: AtomicU64,
    mints: AtomicU64,
    /// The current time: `SystemTime::now` except in tests, which skew it.
    now: fn() -> SystemTime,
}

impl LeafCache {
    pub fn new(ca: Arc<CertAuthority>, lifetime: Duration, capacity: usize) -> Self {
        LeafCache {
            ca,
            lifetime,
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            mints: AtomicU64::new(0),
            now: SystemTime::now,
        }
    }

    /// Replaces the clock (the seam for clock-skew tests).
    #[cfg(test)]
    fn with_clock(mut self, now: fn() -> SystemTime) -> Self {
        self.now = now;
        self
    }

    pub fn ca(&self) -> &Arc<CertAuthority> {
        &self.ca
    }

    /// How many leaves have been minted since start (for tests and stats).
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The current leaf for `host` (already normalised), minting it when
    /// missing or due for renewal.
    pub async fn get(&self, host: &str) -> Result<Arc<CertifiedKey>, LeafError> {
        let slot = self.slot(host);
        let mut guard = slot.lock().await;
        if let Some(m) = guard.as_ref() {
            if m.fresh((self.now)()) {
                return Ok(m.key.clone());
            }
        }
        let ca = self.ca.clone();
        let lifetime = self.lifetime;
        let h = host.to_string();
        let now = (self.now)();
        // Key generation and signing are CPU work; keep them off the reactor.
        let minted = tokio::task::spawn_blocking(move || mint(&ca, &h, lifetime, now))
            .await
            .map_err(|e| LeafError::Task(e.to_string()))??;
        self.mints.fetch_add(1, Ordering::Relaxed);
        let key = minted.key.clone();
        *guard = Some(minted);
        Ok(key)
    }

    fn slot(&self, host: &str) -> Slot {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().expect("leaf cache lock");
        if let Some((slot, used)) = slots.get_mut(host) {
            *used = tick;
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            // Evict the least recently used host. O(n), but only on a miss
            // with a full cache, and n is small.
            if let Some(victim) = slots
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h.clone())
            {
                slots.remove(&victim);
            }
        }
        let slot = Slot::default();
        slots.insert(host.to_string(), (slot.clone(), tick));
        slot
    }

    /// Number of hosts cached now.
    pub fn len(&self) -> usize {
        self.slots.lock().expect("leaf cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most hosts kept at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn mint(
    ca: &CertAuthority,
    host: &str,
    lifetime: Duration,
    now: SystemTime,
) -> Result<Minted, LeafError> {
    let leaf = ca.issue_leaf_at(host, lifetime, now)?;
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(leaf.key)?;
    Ok(Minted {
        key: Arc::new(CertifiedKey::new(vec![leaf.cert], signing)),
        minted_at: now,
        not_after: leaf.not_after,
    })
}

/// Serves one already-chosen certificate: the relay picks the leaf from the
/// SNI it parsed before handing the connection to rustls.
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(hosts: &[&str], lifetime: Duration, cap: usize) -> Arc<LeafCache> {
        let hosts: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
        let ca = Arc::new(CertAuthority::ephemeral(&hosts).unwrap());
        Arc::new(LeafCache::new(ca, lifetime, cap))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_concurrent_first_requests_mint_once() {
        let c = cache(&["api.example.com"], DEFAULT_LIFETIME, 16);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.get("api.example.com").await.unwrap() })
            })
            .collect();
        let mut keys = Vec::new();
        for t in tasks {
            keys.push(t.await.unwrap());
        }
        assert_eq!(c.mints(), 1);
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
    }

    #[tokio::test]
    async fn renews_when_a_third_of_lifetime_is_left() {
        // Lifetime shorter than the 5 minutes of backdating: "fresh" is
        // judged against minted_at, so a 3 s lifetime renews after ~2 s.
        let c = cache(&["a.test"], Duration::from_secs(3), 4);
        let first = c.get("a.test").await.unwrap();
        let again = c.get("a.test").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let renewed = c.get("a.test").await.unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(c.mints(), 2);
    }

    /// Seconds added to the real clock by [`skewed_now`] (clock-skew tests;
    /// one test uses it, so no other test sees it change).
    static SKEW: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

    fn skewed_now() -> SystemTime {
        let s = SKEW.load(Ordering::SeqCst);
        let d = Duration::from_secs(s.unsigned_abs());
        if s >= 0 {
            SystemTime::now() + d
        } else {
            SystemTime::now() - d
        }
    }

    /// Whether a client whose clock reads [`skewed_now`] accepts `key` for
    /// `host` (chain to the CA, name, and validity at that time).
    fn valid_now(ca: &CertAuthority, key: &CertifiedKey, host: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let at = skewed_now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        verifier
            .verify_server_cert(
                &key.cert[0],
                &[],
                &ServerName::try_from(host.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(at),
            )
            .map(|_| ())
    }

    /// Fault injection (issue 8): the clock jumps across a leaf's expiry and
    /// back. Every leaf served must be valid at the time the clock shows.
    #[tokio::test]
    async fn clock_skew_across_expiry_remints_and_never_serves_an_invalid_leaf() {
        let host = "api.example.com";
        let ca = Arc::new(CertAuthority::ephemeral(&[host.to_string()]).unwrap());
        let c = LeafCache::new(ca.clone(), DEFAULT_LIFETIME, 4).with_clock(skewed_now);
        let first = c.get(host).await.unwrap();
        valid_now(&ca, &first, host).unwrap();
        assert_eq!(c.mints(), 1);

        // Forward past expiry (6 h lifetime): re-minted, valid then.
        SKEW.store(7 * 3600, Ordering::SeqCst);
        assert!(
            valid_now(&ca, &first, host).is_err(),
            "the old leaf expired"
        );
        let later = c.get(host).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &later));
        valid_now(&ca, &later, host).unwrap();
        assert_eq!(c.mints(), 2);
        // Served from the cache while the skewed clock holds.
        assert!(Arc::ptr_eq(&later, &c.get(host).await.unwrap()));
        assert_eq!(c.mints(), 2);

        // Back to the real time: `later` is from the future (notBefore is
        // 7 h ahead). Serving it would fail every client; it is re-minted.
        SKEW.store(0, Ordering::SeqCst);
        assert!(valid_now(&ca, &later, host).is_err());
        let back = c.get(host).await.unwrap();
        valid_now(&ca, &back, host).unwrap();
        assert_eq!(c.mints(), 3);

        // A small step back, inside the backdating, keeps the cached leaf.
        SKEW.store(-60, Ordering::SeqCst);
        let same = c.get(host).await.unwrap();
        assert!(Arc::ptr_eq(&back, &same));
        valid_now(&ca, &same, host).unwrap();
        assert_eq!(c.mints(), 3);
        SKEW.store(0, Ordering::SeqCst);
    }

    #[tokio::test]
    async fn bounded_and_refuses_foreign_hosts() {
        let c = cache(&["a.test", "b.test", "c.test"], DEFAULT_LIFETIME, 2);
        c.get("a.test").await.unwrap();
        c.get("b.test").await.unwrap();
        c.get("c.test").await.unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.get("evil.test").await.is_err());
    }
}
