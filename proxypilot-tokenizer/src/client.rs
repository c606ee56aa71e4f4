//! The HTTPS client to upstream APIs: pooled, keep-alive, HTTP/2 when the
//! server offers it by ALPN. Trust is the system roots (rustls-native-certs,
//! which honours SSL_CERT_FILE / SSL_CERT_DIR) plus extra PEM CA files;
//! verification is never disabled.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::body::{BoxError, ProxyBody};
use super::error::TokenizerError;
pub mod pool;

use pool::{PoolConfig, UpstreamBody, UpstreamPool};

/// HTTP/2 flow-control windows of the upstream connection (see `new`).
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// How to build an [`UpstreamClient`].
#[derive(Clone, Debug)]
pub struct UpstreamClientConfig {
    /// Trust the system roots (default true).
    pub system_roots: bool,
    /// Extra trusted CA certificates, PEM files (`--upstream-ca`).
    pub extra_ca_files: Vec<PathBuf>,
    /// Extra trusted CA certificates, PEM text (for in-process callers).
    pub extra_ca_pem: Vec<String>,
    /// Testing/override knob, like curl's `--resolve`: connect to this
    /// address for `"host:port"` instead of resolving `host`. TLS still
    /// verifies the certificate for `host`.
    pub resolve: HashMap<String, SocketAddr>,
    /// Offer HTTP/2 by ALPN (default true).
    pub http2: bool,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Connections open at once to one host:port (HTTP/1.1 upstreams need
    /// one per request in flight; HTTP/2 needs one). Default 256.
    pub max_connections_per_host: usize,
}

impl Default for UpstreamClientConfig {
    fn default() -> Self {
        UpstreamClientConfig {
            system_roots: true,
            extra_ca_files: Vec::new(),
            extra_ca_pem: Vec::new(),
            resolve: HashMap::new(),
            http2: true,
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            max_connections_per_host: 256,
        }
    }
}

/// A cheap-to-clone pooled HTTPS client.
#[derive(Clone)]
pub struct UpstreamClient {
    /// HTTP/2 connections opened as their streams fill up, HTTP/1.1 ones
    /// kept alive (see `upstream_pool`).
    pool: UpstreamPool,
    /// Offers HTTP/1.1 only: upgrades (WebSocket) exist in HTTP/1.1 only.
    upgrades: HttpsConnector,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

impl UpstreamClient {
    pub fn new(cfg: &UpstreamClientConfig) -> anyhow::Result<Self> {
        let roots = root_store(cfg)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("rustls protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tls_h1 = tls.clone();
        tls_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        tls.alpn_protocols = if cfg.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            tls_h1.alpn_protocols.clone()
        };
        let connector = HttpsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            resolve: Arc::new(cfg.resolve.clone()),
            connect_timeout: cfg.connect_timeout,
            per_host: HostCaps {
                max: cfg.max_connections_per_host.max(1),
                hosts: Arc::default(),
            },
        };
        let upgrades = HttpsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls_h1)),
            ..connector.clone()
        };
        // Every request a sandbox client abandons cancels its stream on
        // the one HTTP/2 connection all requests share, and the
        // upstream's frames still in flight for it then count as local
        // "error resets". h2 closes the connection after 1,024 of them
        // (a guard against hostile peers), failing every request on it:
        // the pool remembers more cancelled streams, and drops that count,
        // for the verified API servers this client talks to.
        //
        // Data a client does not read stays charged to the HTTP/2
        // connection's window. With hyper's defaults (2 MiB a stream, 5 MiB
        // the connection) three unread downloads stalled everyone. A small
        // stream window and a large connection one (STREAM_WINDOW,
        // CONNECTION_WINDOW) bound what a slow reader holds (and buffers)
        // to 256 KiB a stream, far below the connection's 64 MiB, so the
        // others go on.
        let pool = UpstreamPool::new(
            connector,
            PoolConfig {
                idle_timeout: cfg.pool_idle_timeout,
                max_per_host: cfg.max_connections_per_host.max(1),
            },
        );
        Ok(UpstreamClient { pool, upgrades })
    }

    /// Send a request with an absolute `https://` URI. A
    /// [`crate::upstream_pool::ClientConn`] in its extensions gives it that
    /// client connection's share of the upstream's streams.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, TokenizerError> {
        let target = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.pool.send(req).await.map_err(|e| {
            TokenizerError::Upstream(format!(
                "request to upstream {target} failed: {}",
                error_chain(&e)
            ))
        })
    }
}

impl UpstreamClient {
    /// Send an upgrade request (absolute `https://` URI) on a connection of
    /// its own, never pooled: after a 101 it belongs to the upgraded stream
    /// (`hyper::upgrade::on` on the response). Any other answer is a plain
    /// response.
    pub async fn send_upgrade(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, TokenizerError> {
        let uri = req.uri().clone();
        let target = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let failed = |what: String| {
            TokenizerError::Upstream(format!(
                "upgrade request to upstream {target} failed: {what}"
            ))
        };
        let conn = self
            .upgrades
            .clone()
            .connect(uri.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(conn.io)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        // One request on its own connection: origin form plus Host.
        let host = http::HeaderValue::from_str(&target).map_err(|e| failed(e.to_string()))?;
        req.headers_mut().insert(http::header::HOST, host);
        *req.uri_mut() = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        Ok(resp.map(UpstreamBody::unpooled))
    }
}

/// "a: b: c" from an error and its sources, skipping repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.last().is_some_and(|l| l.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn root_store(cfg: &UpstreamClientConfig) -> anyhow::Result<rustls::RootCertStore> {
    trust_roots(
        cfg.system_roots,
        &cfg.extra_ca_files,
        &cfg.extra_ca_pem,
        "--upstream-ca",
    )
}

/// The system roots (when `system`) plus the CA certificates in `files`
/// and `pems`. `flag` names where the extra ones come from, for errors.
pub fn trust_roots(
    system: bool,
    files: &[std::path::PathBuf],
    pems: &[String],
    flag: &str,
) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    if system {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "loading a system CA certificate failed");
        }
        roots.add_parsable_certificates(native.certs);
    }
    let mut add_pem = |pem: &[u8], what: &str| -> anyhow::Result<()> {
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .with_context(|| format!("{what} is not PEM"))?;
        anyhow::ensure!(!certs.is_empty(), "{what} holds no PEM CERTIFICATE block");
        for c in certs {
            roots
                .add(c)
                .with_context(|| format!("{what}: not a usable CA certificate"))?;
        }
        Ok(())
    };
    for f in files {
        let pem = std::fs::read(f).with_context(|| format!("reading {flag} {}", f.display()))?;
        add_pem(&pem, &format!("{flag} {}", f.display()))?;
    }
    for (i, pem) in pems.iter().enumerate() {
        add_pem(pem.as_bytes(), &format!("{flag} #{i}"))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no trusted CA certificates: install the system CA bundle or pass {flag} FILE"
    );
    Ok(roots)
}

/// Dials TCP (honouring the resolve overrides) then TLS.
#[derive(Clone)]
pub(crate) struct HttpsConnector {
    tls: tokio_rustls::TlsConnector,
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
    per_host: HostCaps,
}

/// At most `max` connections open at once to each host:port. HTTP/2 needs
/// one; an HTTP/1.1 upstream needs one per request in flight, and without
/// a cap a sandbox's fan-out of streams became as many upstream
/// connections and descriptors (issue 21). A request over the cap waits
/// for a connection to close or to come back to the pool.
#[derive(Clone)]
struct HostCaps {
    max: usize,
    hosts: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl HostCaps {
    async fn take(&self, host: &str, port: u16) -> tokio::sync::OwnedSemaphorePermit {
        let sem = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            // Forget hosts with nothing open, so an open proxy's table of
            // hosts dialled stays small.
            if hosts.len() > 1024 {
                hosts.retain(|_, s| s.available_permits() < self.max);
            }
            hosts
                .entry(format!("{host}:{port}"))
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

impl HttpsConnector {
    pub(crate) async fn connect(self, uri: Uri) -> Result<TlsConn, BoxError> {
        if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(
                format!("refusing to dial {uri}: upstreams are reached over TLS only").into(),
            );
        }
        let host = uri.host().ok_or("upstream URI has no host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let slot = self.per_host.take(&host, port).await;
        let addrs: Vec<SocketAddr> = match self.resolve.get(&format!("{host}:{port}")) {
            Some(a) => vec![*a],
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .collect(),
        };
        let mut last_err = format!("{host} resolved to no address");
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last_err = format!("connecting to {addr}: {e}"),
                Err(_) => last_err = format!("connecting to {addr}: timed out"),
            }
        }
        let tcp = tcp.ok_or(last_err)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.clone())
            .map_err(|_| format!("bad TLS server name {host}"))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(TlsConn {
            io: TokioIo::new(tls),
            h2,
            _slot: slot,
        })
    }
}

/// A TLS connection, telling the pool whether ALPN chose HTTP/2.
pub(crate) struct TlsConn {
    pub(crate) io: TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    pub(crate) h2: bool,
    /// Given back when the connection closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
