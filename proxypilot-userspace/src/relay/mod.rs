//! The relay: accepts redirected connections and intercepts, passes
//! through or denies each one (see `policy`).
//!
//! Entry points for the sidecar: build a [`Relay`] (usually with
//! `settings::RelaySettings::build_relay`), then run [`serve`] on the
//! listener the kernel redirects to.

pub mod body;
pub mod credentials;
pub mod embedded;
pub mod errors;
pub mod forward;
mod intercept;
pub mod passthrough;
pub mod ratelimit;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

pub use errors::{error_response, ForwardError, RelayError};
pub use forward::{Forward, Forwarder, RemoteTokenizer};

use self::credentials::Credential;
use crate::kernel::origin::OriginalDestination;
use crate::policy::{HostPattern, Policy, PolicySummary, Verdict};
use crate::settings::Target;
use crate::tls::ca::CertAuthority;
use crate::tls::hello::read_client_hello;
use crate::tls::leaf::{FixedCert, LeafCache};
use crate::tls::rewind::Rewind;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies flowing through the relay: streamed, never collected.
pub type RelayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Timeouts and caps. The defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Reading the ClientHello plus the TLS handshake.
    pub handshake_timeout: Duration,
    /// Receiving one request's headers (HTTP/1.1; cuts off slowloris).
    pub header_read_timeout: Duration,
    /// No request in flight and no bytes moving for this long: close.
    pub idle_timeout: Duration,
    /// Dialing the tokenizer or a pass-through host.
    pub connect_timeout: Duration,
    /// Waiting for the response head from the tokenizer. Long, because a
    /// non-streaming LLM call answers only when it is complete.
    pub response_timeout: Duration,
    /// Request header bytes (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Connections handled at once; more are closed at accept, logged.
    pub max_connections: usize,
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
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            max_request_body: None,
            rate_limits: BTreeMap::new(),
        }
    }
}

/// Everything `Relay::new` needs.
pub struct RelayConfig {
    pub targets: Vec<Target>,
    pub allow: Vec<HostPattern>,
    /// From the kernel layer's `--allow-cidr`.
    pub allow_cidrs: Vec<IpNet>,
    pub ca: Arc<CertAuthority>,
    pub forwarder: Forwarder,
    /// Full `Proxy-Authorization` value (e.g. `Bearer ...`), if configured.
    pub proxy_authorization: Option<String>,
    pub limits: Limits,
    pub leaf_lifetime: Duration,
    pub leaf_capacity: usize,
}

/// The relay's shared state: one per sidecar, shared by all connections.
pub struct Relay {
    policy: Policy,
    /// Intercepted host → its sealed secret and credential slots.
    credentials: BTreeMap<String, Arc<Credential>>,
    leaves: LeafCache,
    tls_base: Arc<rustls::ServerConfig>,
    forwarder: Forwarder,
    proxy_authorization: Option<HeaderValue>,
    limits: Limits,
    rate: ratelimit::RateLimiter,
    conns: Arc<Semaphore>,
    http: auto::Builder<TokioExecutor>,
}

impl Relay {
    pub fn new(cfg: RelayConfig) -> anyhow::Result<Relay> {
        let mut policy = Policy {
            allow: cfg.allow,
            allow_cidrs: cfg.allow_cidrs,
            ..Policy::default()
        };
        let mut credentials = BTreeMap::new();
        for t in &cfg.targets {
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
            .with_cert_resolver(Arc::new(NoCert));
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
            leaves: LeafCache::new(cfg.ca, cfg.leaf_lifetime, cfg.leaf_capacity),
            tls_base: Arc::new(tls),
            forwarder: cfg.forwarder,
            proxy_authorization,
            conns: Arc::new(Semaphore::new(limits.max_connections)),
            rate: ratelimit::RateLimiter::new(&limits.rate_limits),
            limits,
            http,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn summary(&self, allowed_destinations: &[String]) -> PolicySummary {
        self.policy.summary(allowed_destinations)
    }

    pub fn leaves(&self) -> &LeafCache {
        &self.leaves
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counters for `/stats` on the info port: what is in use now, so a
    /// soak or an operator can see that nothing grows without bound.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            connections_open: self.limits.max_connections - self.conns.available_permits(),
            connections_max: self.limits.max_connections,
            leaf_certificates_cached: self.leaves.len(),
            leaf_certificates_capacity: self.leaves.capacity(),
            leaf_certificates_minted: self.leaves.mints(),
        }
    }

    /// Handles one accepted connection to the end. Never panics on bad
    /// input; every decision and failure is logged with its reason.
    pub async fn handle_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        origin: Option<OriginalDestination>,
    ) {
        let _ = stream.set_nodelay(true);
        let pid = origin.as_ref().map(|o| o.pid);
        let comm = origin.as_ref().map(|o| o.comm.clone());
        let dst = origin.as_ref().map(|o| o.addr);
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        let hello = match tokio::time::timeout_at(deadline, read_client_hello(&mut stream)).await {
            Err(_) => {
                tracing::warn!(%peer, ?pid, ?comm, ?dst, verdict = "deny", reason = "no complete TLS ClientHello within the handshake timeout", "closing connection");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, ?pid, ?comm, ?dst, verdict = "deny", reason = %e, "closing connection");
                return;
            }
            Ok(Ok(h)) => h,
        };
        let sni = hello.sni.clone();
        match self.policy.decide(sni.as_deref(), dst) {
            Verdict::Deny { reason } => {
                tracing::warn!(%peer, ?pid, ?comm, ?dst, ?sni, verdict = "deny", %reason, "closing connection");
            }
            Verdict::PassThrough { dial, reason, .. } => {
                tracing::info!(%peer, ?pid, ?comm, ?dst, ?sni, verdict = "pass-through", %reason, "relaying bytes unchanged");
                match passthrough::pass_through(stream, &hello, &dial, self.limits.connect_timeout)
                    .await
                {
                    Ok((up, down)) => {
                        tracing::debug!(%peer, ?sni, up, down, "pass-through finished")
                    }
                    Err(e) => tracing::warn!(%peer, ?sni, error = %e, "pass-through failed"),
                }
            }
            Verdict::Intercept { host, secret } => {
                tracing::info!(%peer, ?pid, ?comm, ?dst, sni = %host, verdict = "intercept", reason = "host has a sealed secret", secret = %secret, "terminating TLS");
                self.intercept(stream, hello.raw, host, secret, origin, deadline)
                    .await;
            }
        }
    }

    async fn intercept(
        self: Arc<Self>,
        stream: TcpStream,
        raw_hello: Bytes,
        host: String,
        secret: String,
        origin: Option<OriginalDestination>,
        deadline: tokio::time::Instant,
    ) {
        let peer = stream.peer_addr().ok();
        let key = match self.leaves.get(&host).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(?peer, sni = %host, error = %e, "cannot mint a leaf certificate; closing");
                return;
            }
        };
        let mut cfg = (*self.tls_base).clone();
        cfg.cert_resolver = Arc::new(FixedCert(key));
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let tls = match tokio::time::timeout_at(
            deadline,
            acceptor.accept(Rewind::new(raw_hello, stream)),
        )
        .await
        {
            Err(_) => {
                tracing::warn!(?peer, sni = %host, "TLS handshake timed out; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(?peer, sni = %host, error = %e, "TLS handshake failed (does the client trust proxypilot's CA? see /ca.pem)");
                return;
            }
            Ok(Ok(t)) => t,
        };
        let Some(credential) = self.credentials.get(&host).cloned() else {
            return; // unreachable: the policy only intercepts hosts with a secret
        };
        let port = origin.as_ref().map_or(443, |o| o.addr.port());
        let audit = Arc::new(crate::audit::ConnectionInfo {
            pid: origin.as_ref().map(|o| o.pid),
            comm: origin.as_ref().map(|o| o.comm.clone()),
            original_dst: origin.as_ref().map(|o| o.addr),
            sni: host.clone(),
            secret: secret.clone(),
        });
        let ctx = Arc::new(intercept::ConnCtx {
            relay: self.clone(),
            sni: host,
            secret_name: secret,
            credential,
            port,
            active: Arc::new(AtomicUsize::new(0)),
            audit,
        });
        intercept::serve_http(tls, ctx).await;
    }

    fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.conns.clone().try_acquire_owned().ok()
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

/// Placeholder resolver for the shared base config; every connection
/// replaces it with a `FixedCert` for its SNI.
#[derive(Debug)]
struct NoCert;

impl rustls::server::ResolvesServerCert for NoCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// Accepts forever on `listener` (the port the kernel redirects to),
/// handling each connection on its own task. `origin_of` maps the accepted
/// socket's peer address to the original destination (the kernel layer's
/// map lookup); `None` when unknown.
pub async fn serve<F>(listener: TcpListener, relay: Arc<Relay>, origin_of: F)
where
    F: Fn(SocketAddr) -> Option<OriginalDestination> + Send + Sync + 'static,
{
    // One spare descriptor, given up when the process runs out of them
    // (EMFILE/ENFILE) so the waiting connection can be accepted and closed
    // at once: without it, connections queued in the backlog would sit there
    // unanswered (a client-side hang) until descriptors came back. Found by
    // the fd-exhaustion fault test (tests/e2e/faults.rs).
    let mut reserve = std::fs::File::open("/dev/null").ok();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_out_of_fds(&e) && reserve.is_some() => {
                drop(reserve.take());
                // Never wait here: with the spare given up, a blocked accept
                // would keep it given up.
                let ready = std::future::poll_fn(|cx| match listener.poll_accept(cx) {
                    std::task::Poll::Pending => std::task::Poll::Ready(None),
                    std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                })
                .await;
                if let Some(Ok((shed, peer))) = ready {
                    let _ = origin_of(peer); // consume the kernel's record
                    tracing::warn!(%peer, verdict = "deny", reason = "out of file descriptors", "closing connection");
                    drop(shed);
                }
                reserve = std::fs::File::open("/dev/null").ok();
                continue;
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                reserve = reserve.or_else(|| std::fs::File::open("/dev/null").ok());
                continue;
            }
        };
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let origin = origin_of(peer);
        let Some(permit) = relay.try_admit() else {
            tracing::warn!(%peer, max = relay.limits.max_connections, verdict = "deny", reason = "too many concurrent connections", "closing connection");
            continue;
        };
        let relay = relay.clone();
        tokio::spawn(async move {
            relay.handle_connection(stream, peer, origin).await;
            drop(permit);
        });
    }
}

fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}
