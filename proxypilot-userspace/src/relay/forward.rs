//! Where intercepted requests go: the remote tokenizer (an HTTP proxy) or
//! the embedded engine.
//!
//! Both receive the same tokenizer-shaped request: absolute-form
//! `http://host[:port]/path?query`, HTTP/1.1, hop-by-hop headers removed,
//! `Proxy-Tokenizer: <sealed>`, optional `Proxy-Authorization`,
//! `fly-src-optin: *`. They answer with the upstream's response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::errors::ForwardError;
use super::RelayBody;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The seam for the embedded tokenizer engine (`embedded::EmbeddedTokenizer`
/// implements it): it takes the tokenizer-shaped request, applies the
/// sealed secret, sends it upstream and streams the response back. Engine
/// refusals are `ForwardError::Engine` with the status the remote
/// tokenizer would answer (400, 407, 502).
pub trait Forward: Send + Sync + 'static {
    fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> BoxFuture<Result<Response<RelayBody>, ForwardError>>;
}

/// How the relay reaches a tokenizer.
#[derive(Clone)]
pub enum Forwarder {
    Remote(Arc<RemoteTokenizer>),
    Embedded(Arc<dyn Forward>),
}

impl Forwarder {
    /// Forwards `req`, waiting at most `response_timeout` for the response
    /// head, in both shapes: a stuck upstream costs the client a 504, not a
    /// request that hangs until the client gives up.
    pub async fn forward(
        &self,
        req: Request<RelayBody>,
        response_timeout: Duration,
    ) -> Result<Response<RelayBody>, ForwardError> {
        let sent = async {
            match self {
                Forwarder::Remote(r) => r.forward(req).await,
                Forwarder::Embedded(e) => e.forward(req).await,
            }
        };
        match tokio::time::timeout(response_timeout, sent).await {
            Ok(answer) => answer,
            Err(_) => Err(ForwardError::Timeout {
                via: self.describe(),
                stage: "send response headers",
                after: response_timeout,
            }),
        }
    }

    /// What answers requests, for errors.
    fn describe(&self) -> String {
        match self {
            Forwarder::Remote(r) => format!("the tokenizer at {}", r.url),
            Forwarder::Embedded(_) => "the upstream API (through the embedded tokenizer)".into(),
        }
    }
}

/// A remote tokenizer reached as an HTTP proxy over pooled keep-alive
/// HTTP/1.1 connections (the Go tokenizer answers `Connection: close`, in
/// which case the pool simply does not reuse the connection). With an
/// https:// URL each connection is TLS, verified against the system roots
/// plus `--tokenizer-ca`, and the proxy requests go inside it (as to
/// tokenizer.fly.dev).
pub struct RemoteTokenizer {
    url: String,
    client: Client<TokenizerConnector, RelayBody>,
    connect_timeout: Duration,
}

impl RemoteTokenizer {
    /// `url` is `http://host:port` (default port 80) or `https://host:port`
    /// (default 443; `ca` are extra roots for it). `connect_timeout` bounds
    /// dialing and, for https, the TLS handshake.
    pub fn new(
        url: &Uri,
        ca: &[std::path::PathBuf],
        connect_timeout: Duration,
    ) -> Result<Self, TokenizerUrlError> {
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(TokenizerUrlError::NotHttp(url.to_string())),
        };
        let host = url
            .host()
            .ok_or_else(|| TokenizerUrlError::NoHost(url.to_string()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let roots = proxypilot_tokenizer::client::trust_roots(true, ca, &[], "--tokenizer-ca")
                .map_err(|e| TokenizerUrlError::Tls(format!("{e:#}")))?;
            let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TokenizerUrlError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // The tokenizer protocol is HTTP/1.1.
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|e| TokenizerUrlError::Tls(format!("{host}: {e}")))?;
            Some((TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        let connector = TokenizerConnector {
            host: Arc::from(host.as_str()),
            port,
            connect_timeout,
            tls,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(RemoteTokenizer {
            url: format!(
                "{}://{}:{port}",
                if https { "https" } else { "http" },
                url.host().unwrap_or_default()
            ),
            client,
            connect_timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> Result<Response<RelayBody>, ForwardError> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| classify_client_error(self.url.clone(), e, self.connect_timeout))?;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as super::BoxError).boxed_unsync()))
    }
}

fn classify_client_error(
    url: String,
    e: hyper_util::client::legacy::Error,
    connect_timeout: Duration,
) -> ForwardError {
    if e.is_connect() {
        if io_kind(&e) == Some(io::ErrorKind::TimedOut) {
            return ForwardError::Timeout {
                via: format!("the tokenizer at {url}"),
                stage: "accept the connection",
                after: connect_timeout,
            };
        }
        return ForwardError::Unreachable {
            url,
            source: Box::new(e),
        };
    }
    ForwardError::Failed {
        url,
        source: Box::new(e),
    }
}

/// A `--tokenizer` URL the relay cannot use.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerUrlError {
    #[error(
        "tokenizer URL {0} must start with http:// or https:// (the tokenizer is an HTTP proxy)"
    )]
    NotHttp(String),
    #[error("tokenizer URL {0} has no host")]
    NoHost(String),
    #[error("cannot set up TLS to the tokenizer: {0}")]
    Tls(String),
}

fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(ioe) = err.downcast_ref::<io::Error>() {
            return Some(ioe.kind());
        }
        cur = err.source();
    }
    None
}

/// Dials the tokenizer whatever the request's host is, and tells hyper the
/// connection is a proxy so requests go out in absolute form.
#[derive(Clone)]
pub struct TokenizerConnector {
    host: Arc<str>,
    port: u16,
    connect_timeout: Duration,
    /// For an https:// tokenizer: TLS, and the name its certificate has.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl tower_service::Service<Uri> for TokenizerConnector {
    type Response = ProxiedIo;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<ProxiedIo>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let (host, port, limit) = (self.host.clone(), self.port, self.connect_timeout);
        let tls = self.tls.clone();
        Box::pin(async move {
            let timed_out = || {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting took longer than {limit:?}"),
                )
            };
            let deadline = tokio::time::Instant::now() + limit;
            let stream = tokio::time::timeout_at(deadline, TcpStream::connect((&*host, port)))
                .await
                .map_err(|_| timed_out())??;
            let _ = stream.set_nodelay(true);
            let io: Box<dyn TokenizerStream> = match tls {
                None => Box::new(stream),
                Some((connector, name)) => Box::new(
                    tokio::time::timeout_at(deadline, connector.connect(name, stream))
                        .await
                        .map_err(|_| timed_out())??,
                ),
            };
            Ok(ProxiedIo(TokioIo::new(io)))
        })
    }
}

/// A connection to the tokenizer: TCP, or TLS over TCP.
trait TokenizerStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> TokenizerStream for T {}

/// A connection to the tokenizer, marked as a proxy connection.
pub struct ProxiedIo(TokioIo<Box<dyn TokenizerStream>>);

impl Connection for ProxiedIo {
    fn connected(&self) -> Connected {
        Connected::new().proxy(true)
    }
}

impl hyper::rt::Read for ProxiedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxiedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
