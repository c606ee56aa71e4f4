//! The relay: accepts redirected connections and intercepts, passes
//! through or denies each one (see `policy`).
//!
//! Entry points for the sidecar: build a [`Relay`] (usually with
//! `settings::RelaySettings::build_relay`), then run [`serve`] on the
//! listener the kernel redirects to.
//!
//! A connection goes through named stages, one module each:
//! [`accept`] (admission: redirected by the kernel, a free slot, the
//! spare-descriptor trick) → [`detect`] (ClientHello and verdict) →
//! [`handshake`] (leaf and TLS) → [`http`] (per-request checks, the
//! upstream request, the downstream response) → [`forward`] (the
//! tokenizer, remote or embedded), then [`upgrade`] for a WebSocket
//! stream after a 101. Pass-through connections leave at `detect` for
//! [`passthrough`].

pub mod accept;
pub mod body;
pub mod context;
pub mod credentials;
pub mod detect;
pub mod embedded;
pub mod errors;
pub mod forward;
pub mod h2_headers;
pub mod handshake;
pub mod http;
pub mod live;
pub mod metrics;
pub mod minted;
pub mod passthrough;
pub mod ratelimit;
pub mod redirected;
pub mod rules;
mod server_configs;
pub mod slots;
pub mod stall;
pub mod upgrade;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

// `::http`: the crate, not this module's `http` stage.
use ::http::HeaderValue;
use anyhow::{bail, Context as _};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

pub use accept::serve;
pub use errors::{error_response, ForwardError, RelayError};
pub use forward::{Forward, Forwarder, RemoteTokenizer};
pub use live::LiveRelay;
pub use redirected::Redirections;

use self::credentials::Credential;
use crate::policy::{AllowedNet, HostPattern, Policy, PolicySummary};
use crate::tls::ca::CertAuthority;
use crate::tls::leaf::LeafCache;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies flowing through the relay: streamed, never collected.
pub type RelayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// `--max-connections-per-process` is `--max-connections` / this unless given.
pub const PROCESS_SHARE: usize = 4;

/// Timeouts and caps. The defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Reading the ClientHello plus the TLS handshake.
    pub handshake_timeout: Duration,
    /// Receiving one request's headers (HTTP/1.1; cuts off slowloris).
    pub header_read_timeout: Duration,
    /// No request in flight and no bytes moving for this long: close.
    pub idle_timeout: Duration,
    /// An upgraded (WebSocket) stream with no byte moving either way for
    /// this long: close it.
    pub stream_idle_timeout: Duration,
    /// Dialing the tokenizer or a pass-through host.
    pub connect_timeout: Duration,
    /// Waiting for the response head from the tokenizer. Long, because a
    /// non-streaming LLM call answers only when it is complete.
    pub response_timeout: Duration,
    /// Request header bytes (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Connections handled at once; more are closed at accept, logged.
    pub max_connections: usize,
    /// Of those, the most one sandbox process may hold.
    pub max_connections_per_process: usize,
    /// A response the client stopped reading is cut after this long.
    pub stall_timeout: Duration,
    /// Request body bytes relayed per intercepted request; more is 413.
    /// `None` by default: API uploads (OpenAI files, ...) can be hundreds
    /// of MB, and a default cap would break them.
    pub max_request_body: Option<u64>,
    /// Requests per second per intercepted host (token bucket, burst N);
    /// more is 429. Hosts not listed are not limited.
    pub rate_limits: BTreeMap<String, u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            max_connections_per_process: 4096 / PROCESS_SHARE,
            stall_timeout: Duration::from_secs(60),
            max_request_body: None,
            rate_limits: BTreeMap::new(),
        }
    }
}

/// An intercepted host and its sealed secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    /// The environment variable's name: what logs and audit lines show.
    pub secret_name: String,
    pub sealed: crate::tokenizer::secret::SecretString,
    /// Headers the client may carry its dummy in (see [`credentials`]).
    pub slots: Vec<credentials::Slot>,
    /// What may be asked of the host (`--permit`); none: anything.
    pub permits: Vec<rules::Permit>,
}

/// Everything `Relay::new` needs.
pub struct RelayConfig {
    pub targets: Vec<Target>,
    pub allow: Vec<HostPattern>,
    /// From the kernel layer's `--allow-cidr` (its TCP rules).
    pub allow_cidrs: Vec<AllowedNet>,
    pub ca: Arc<CertAuthority>,
    pub forwarder: Forwarder,
    /// Full `Proxy-Authorization` value (e.g. `Bearer ...`), if configured.
    pub proxy_authorization: Option<String>,
    pub limits: Limits,
    pub leaf_lifetime: Duration,
    pub leaf_capacity: usize,
}

/// The relay's shared state, shared by all connections. A reload replaces
/// it with a new one that inherits the connection slots, the metrics and,
/// while the CA is the same, the leaf cache (see [`Relay::inheriting`]).
pub struct Relay {
    policy: Policy,
    /// Intercepted host → its sealed secret and credential slots.
    credentials: BTreeMap<String, Arc<Credential>>,
    /// Intercepted hosts whose secret mints short-lived tokens.
    minted: BTreeMap<String, Arc<minted::Minted>>,
    leaves: Arc<LeafCache>,
    server_configs: server_configs::ServerConfigs,
    forwarder: Forwarder,
    proxy_authorization: Option<HeaderValue>,
    limits: Limits,
    rate: ratelimit::RateLimiter,
    slots: Arc<slots::Slots>,
    /// Each intercepted host's `--permit`s.
    rules: rules::Rules,
    metrics: Arc<metrics::Metrics>,
    http: auto::Builder<TokioExecutor>,
    /// Where pass-through resolves names: the sandbox DNS's upstreams
    /// (see [`Relay::resolving_through`]); `None`: the host's resolver.
    pass_through_dns: Option<Arc<crate::dns::Upstreams>>,
}

impl Relay {
    pub fn new(cfg: RelayConfig) -> anyhow::Result<Relay> {
        let mut policy = Policy {
            allow: cfg.allow,
            allow_cidrs: cfg.allow_cidrs,
            ..Policy::default()
        };
        let mut credentials = BTreeMap::new();
        let mut rules = rules::Rules::default();
        for t in &cfg.targets {
            rules.add(&t.host, t.permits.iter().cloned());
            let v = HeaderValue::from_str(t.sealed.expose()).with_context(|| {
                format!(
                    "the sealed secret for {} (from {}) is not a valid header value",
                    t.host, t.secret_name
                )
            })?;
            credentials.insert(t.host.clone(), Credential::new(v, t.slots.clone()));
            policy
                .intercept
                .insert(t.host.clone(), t.secret_name.clone());
        }
        let hosts: Vec<String> = policy.intercept.keys().cloned().collect();
        if cfg.ca.hosts() != hosts.as_slice() {
            bail!(
                "the CA is constrained to {:?} but the intercepted hosts are {:?}; load the CA with the same host list",
                cfg.ca.hosts(),
                hosts
            );
        }
        let proxy_authorization = match cfg.proxy_authorization {
            None => None,
            Some(s) => {
                let mut v = HeaderValue::from_str(&s)
                    .context("the tokenizer auth token is not a valid header value")?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .context("rustls protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(handshake::NoCert));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let limits = cfg.limits;
        for (host, &n) in &limits.rate_limits {
            if !policy.intercept.contains_key(host) || n == 0 {
                bail!("rate-limit {host}={n}: the host must be intercepted (--target) and N at least 1");
            }
        }
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Ok(Relay {
            policy,
            credentials,
            minted: BTreeMap::new(),
            leaves: Arc::new(LeafCache::new(cfg.ca, cfg.leaf_lifetime, cfg.leaf_capacity)),
            server_configs: server_configs::ServerConfigs::new(tls),
            forwarder: cfg.forwarder,
            proxy_authorization,
            slots: Arc::new(slots::Slots::new(
                limits.max_connections,
                limits.max_connections_per_process,
            )),
            rate: ratelimit::RateLimiter::new(&limits.rate_limits),
            rules,
            metrics: Arc::new(metrics::Metrics::new(hosts)),
            limits,
            http,
            pass_through_dns: None,
        })
    }

    /// This relay, getting short-lived tokens for `host` through the
    /// tokenizer with its sealed (minting) secret, as `spec` says.
    pub fn minting(mut self, host: &str, spec: minted::MintSpec) -> anyhow::Result<Relay> {
        let c = self
            .credentials
            .get(host)
            .with_context(|| format!("{host} mints tokens but is not a --target"))?;
        let m = minted::Minted::new(spec, c.sealed().clone());
        self.minted.insert(host.to_string(), Arc::new(m));
        Ok(self)
    }

    /// The minting state of `host`, if its secret mints.
    pub fn minted(&self, host: &str) -> Option<&Arc<minted::Minted>> {
        self.minted.get(host)
    }

    /// This relay, resolving pass-through hosts through `upstreams`: the
    /// servers the sandbox's DNS is answered from, so a pass-through
    /// connection goes where the sandbox was told the host is.
    pub fn resolving_through(mut self, upstreams: Arc<crate::dns::Upstreams>) -> Relay {
        self.pass_through_dns = Some(upstreams);
        self
    }

    /// This relay, built from a reloaded configuration, carrying over what
    /// must outlive a reload from `old`: the connection slots (resized to
    /// the new limits, so connections open now still count), the metrics
    /// (their host labels now the new intercepted hosts) and, when the CA
    /// did not change, the leaf certificates already minted.
    pub fn inheriting(mut self, old: &Relay) -> Relay {
        old.slots.resize(
            self.limits.max_connections,
            self.limits.max_connections_per_process,
        );
        self.slots = old.slots.clone();
        old.metrics.set_hosts(self.policy.intercept.keys().cloned());
        self.metrics = old.metrics.clone();
        if Arc::ptr_eq(self.leaves.ca(), old.leaves.ca()) {
            self.leaves = old.leaves.clone();
        }
        self
    }

    /// This relay, keeping `old`'s minted tokens for the targets whose
    /// sealed secret and token URL did not change (a reload through the
    /// same tokenizer; see [`minted::carry_over`]).
    pub fn keeping_minted_tokens(mut self, old: &Relay) -> Relay {
        minted::carry_over(&mut self.minted, &old.minted);
        self
    }

    /// The CA this relay's leaves are signed by.
    pub fn ca(&self) -> &Arc<CertAuthority> {
        self.leaves.ca()
    }

    pub fn summary(&self, allowed_destinations: &[String]) -> PolicySummary {
        self.policy.summary(allowed_destinations)
    }

    /// What `--metrics-listen` serves.
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    pub fn leaves(&self) -> &LeafCache {
        &self.leaves
    }

    /// Counters for `/stats` on the info port: what is in use now, so a
    /// soak or an operator can see that nothing grows without bound.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            connections_open: self.slots.in_use(),
            connections_max: self.slots.max(),
            leaf_certificates_cached: self.leaves.len(),
            leaf_certificates_capacity: self.leaves.capacity(),
            leaf_certificates_minted: self.leaves.mints(),
        }
    }

    fn try_admit(&self, pid: u32) -> Result<slots::Slot, slots::NoSlot> {
        self.slots.try_take(pid)
    }
}

/// See [`Relay::stats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayStats {
    pub connections_open: usize,
    pub connections_max: usize,
    pub leaf_certificates_cached: usize,
    pub leaf_certificates_capacity: usize,
    pub leaf_certificates_minted: u64,
}
