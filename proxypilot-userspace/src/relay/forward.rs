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

/// The seam for the embedded tokenizer engine.
///
/// TODO(lead): wrap the tokenizer engine (`tokenizer::Engine`) in a type
/// implementing this: parse/remove `Proxy-Tokenizer` and
/// `Proxy-Authorization` from `req`, apply the secret to the request parts
/// (`Engine::apply(&mut parts)`), send it over HTTPS with the engine's
/// upstream client (system roots + `--upstream-ca`, never the sandbox's
/// trust), and return the response with its body streamed. Map engine
/// errors to `ForwardError::Engine { status, message }` with the status the
/// remote tokenizer would use (400 bad request, 407 not authorized, 502
/// upstream failure) and unreachable/timeouts to the other variants.
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
    pub async fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> Result<Response<RelayBody>, ForwardError> {
        match self {
            Forwarder::Remote(r) => r.forward(req).await,
            Forwarder::Embedded(e) => e.forward(req).await,
        }
    }

    /// For logs and `/policy`.
    pub fn describe(&self) -> String {
        match self {
            Forwarder::Remote(r) => format!("remote tokenizer {}", r.url),
            Forwarder::Embedded(_) => "embedded tokenizer".into(),
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
    response_timeout: Duration,
}

impl RemoteTokenizer {
    /// `url` is `http://host:port` (default port 80). `connect_timeout`
    /// bounds dialing; `response_timeout` bounds waiting for the response
    /// head (generous: non-streaming LLM calls answer only when done).
    pub fn new(
        url: &Uri,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, String> {
        if url.scheme_str() != Some("http") {
            return Err(format!(
                "tokenizer URL {url} must start with http:// (the tokenizer is a plain HTTP proxy)"
            ));
        }
        let host = url
            .host()
            .ok_or_else(|| format!("tokenizer URL {url} has no host"))?;
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
            response_timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> Result<Response<RelayBody>, ForwardError> {
        let url = self.url.clone();
        let resp = match tokio::time::timeout(self.response_timeout, self.client.request(req)).await
        {
            Err(_) => {
                return Err(ForwardError::Timeout {
                    url,
                    stage: "send response headers",
                    after: self.response_timeout,
                })
            }
            Ok(Err(e)) => return Err(classify_client_error(url, &e, self.connect_timeout)),
            Ok(Ok(resp)) => resp,
        };
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as super::BoxError).boxed_unsync()))
    }
}

fn classify_client_error(
    url: String,
    e: &hyper_util::client::legacy::Error,
    connect_timeout: Duration,
) -> ForwardError {
    let detail = error_chain(e);
    if e.is_connect() {
        if io_kind(e) == Some(io::ErrorKind::TimedOut) {
            return ForwardError::Timeout {
                url,
                stage: "accept the connection",
                after: connect_timeout,
            };
        }
        return ForwardError::Unreachable { url, detail };
    }
    ForwardError::Failed { url, detail }
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

/// "a: b: c" from an error and its sources, for the JSON body and logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
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
