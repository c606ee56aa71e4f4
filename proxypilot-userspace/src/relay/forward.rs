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
use tokio::net::TcpStream;

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
/// which case the pool simply does not reuse the connection).
pub struct RemoteTokenizer {
    url: String,
    client: Client<TokenizerConnector, RelayBody>,
    connect_timeout: Duration,
}

impl RemoteTokenizer {
    /// `url` is `http://host:port` (default port 80). `connect_timeout`
    /// bounds dialing.
    pub fn new(url: &Uri, connect_timeout: Duration) -> Result<Self, TokenizerUrlError> {
        if url.scheme_str() != Some("http") {
            return Err(TokenizerUrlError::NotHttp(url.to_string()));
        }
        let host = url
            .host()
            .ok_or_else(|| TokenizerUrlError::NoHost(url.to_string()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(80);
        let connector = TokenizerConnector {
            host: Arc::from(host.as_str()),
            port,
            connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(RemoteTokenizer {
            url: format!("http://{}:{port}", url.host().unwrap_or_default()),
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
    #[error("tokenizer URL {0} must start with http:// (the tokenizer is a plain HTTP proxy)")]
    NotHttp(String),
    #[error("tokenizer URL {0} has no host")]
    NoHost(String),
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
        Box::pin(async move {
            let stream = tokio::time::timeout(limit, TcpStream::connect((&*host, port)))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting took longer than {limit:?}"),
                    )
                })??;
            let _ = stream.set_nodelay(true);
            Ok(ProxiedIo(TokioIo::new(stream)))
        })
    }
}

/// A TCP connection to the tokenizer, marked as a proxy connection.
pub struct ProxiedIo(TokioIo<TcpStream>);

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
