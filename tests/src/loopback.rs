//! Fakes on loopback for the unprivileged tests, which need no root and no
//! network namespace: an HTTPS upstream that records what it receives, a
//! remote tokenizer in superfly/tokenizer's manner, the standalone
//! tokenizer, and an HTTP/1.1 client for proxies.
//!
//! The upstream's certificate comes from a [`TestCa`] that only the
//! tokenizer side trusts, as with [`crate::upstream::FakeApis`] (the same
//! fakes in a network namespace, for the privileged tests).
//!
//! The upstream's endpoints:
//! - `/mirror…`: answers with the request body as received;
//! - `/sse`: two events, the second held until its [`Gate`] allows it;
//! - `/bytes?n=N`: N pattern bytes ([`crate::upstream::pattern_byte`]);
//! - `/endless`: a 512-byte chunk each millisecond until the client goes;
//! - `POST /token`: an OAuth token endpoint: a jwt-bearer form body with an
//!   assertion, or a client-credentials one with id and secret, gets 200
//!   `{"access_token":"minted-access-N","expires_in":3600}`, anything else
//!   400 (the test verifies the assertion's signature from [`Seen`]);
//! - `/status/NNN`: that status with `{"error":"status-from-fake"}`;
//! - `POST /app/installations/ID/access_tokens`: GitHub's installation
//!   token endpoint: with `Authorization: Bearer <jwt>` a 201
//!   `{"token":"ghs_mintedN","expires_at":…}` (one hour, or `?expires_in=S`
//!   seconds), else 401;
//! - anything else: JSON with the method, request-target, headers, body
//!   length and the body's first 256 bytes.
//!
//! Every response has `x-upstream: fake`. Every request whose body arrived
//! complete is recorded ([`LoopbackUpstream::seen`]); one whose body broke
//! off gets a 400 and is not.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot::tokenizer::{
    Engine, OpenKey, TokenizerService, UpstreamClient, UpstreamClientConfig,
};
use rustls::pki_types::ServerName;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use crate::{
    testca::TestCa,
    upstream::{bytes_response, ChanBody, Gate},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of the fakes' responses.
pub type TestBody = BoxBody<Bytes, BoxError>;

/// A whole body.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A body fed by a channel, one data frame per message.
pub fn channel_body(rx: mpsc::Receiver<Bytes>) -> TestBody {
    ChanBody(rx).map_err(|e| Box::new(e) as BoxError).boxed()
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request-target as received (origin-form for HTTP/1.1).
    pub uri: String,
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The fake HTTPS upstream, HTTP/1.1 and HTTP/2 by ALPN, on 127.0.0.1;
/// stopped on drop.
pub struct LoopbackUpstream {
    pub addr: SocketAddr,
    names: Vec<String>,
    ca: TestCa,
    seen: Arc<Mutex<Vec<Seen>>>,
    sse: Arc<Gate>,
    /// TCP connections open now.
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for LoopbackUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LoopbackUpstream {
    /// Starts an upstream whose certificate (from a fresh [`TestCa`])
    /// names `names` (DNS names or IP literals).
    pub async fn start(names: &[&str]) -> LoopbackUpstream {
        LoopbackUpstream::start_with_h2_max_streams(names, None).await
    }

    /// As [`LoopbackUpstream::start`], advertising `max_streams` as its
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (hyper's default if None).
    pub async fn start_with_h2_max_streams(
        names: &[&str],
        max_streams: Option<u32>,
    ) -> LoopbackUpstream {
        let ca = TestCa::new("proxypilot loopback upstream CA");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(ca.server_config(names, &[b"h2", b"http/1.1"]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let sse = Gate::new(1);
        let open: Arc<AtomicUsize> = Arc::default();
        let (seen2, sse2, open2) = (seen.clone(), sse.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, sse) = (acceptor.clone(), seen2.clone(), sse2.clone());
                open2.fetch_add(1, Ordering::SeqCst);
                let open = open2.clone();
                tokio::spawn(async move {
                    struct Closed(Arc<AtomicUsize>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _closed = Closed(open);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (seen, sse) = (seen.clone(), sse.clone());
                        async move { Ok::<_, Infallible>(handle(req, &seen, &sse).await) }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Some(n) = max_streams {
                        builder.http2().max_concurrent_streams(n);
                    }
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        LoopbackUpstream {
            addr,
            names: names.iter().map(|n| n.to_string()).collect(),
            ca,
            seen,
            sse,
            open,
            task,
        }
    }

    /// TCP connections open to it now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The CA that signed the upstream's certificate.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// Every recorded request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The gate `/sse`'s events pass: the first is allowed, the second
    /// waits for `allow(1)`.
    pub fn sse_gate(&self) -> &Gate {
        &self.sse
    }

    /// A tokenizer client config that reaches this upstream as each of its
    /// names on port 443, trusting only its CA.
    pub fn client_config(&self, http2: bool) -> UpstreamClientConfig {
        UpstreamClientConfig {
            system_roots: false,
            extra_ca_pem: vec![self.ca.pem()],
            resolve: self
                .names
                .iter()
                .map(|n| (format!("{n}:443"), self.addr))
                .collect::<HashMap<_, _>>(),
            http2,
            ..Default::default()
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    sse: &Arc<Gate>,
) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Response::builder()
            .status(400)
            .body(full("incomplete body"))
            .unwrap();
    };
    let path = parts.uri.path().to_string();
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        path: path.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let query = parts.uri.query().unwrap_or("");
    let mut resp = match path.as_str() {
        "/sse" => sse_response(sse.clone()),
        "/bytes" => {
            let n = query
                .strip_prefix("n=")
                .and_then(|n| n.parse().ok())
                .expect("/bytes?n=N");
            bytes_response(n).map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed())
        }
        "/endless" => endless_response(),
        "/token" => oauth_token_response(&body, seen),
        p if p.starts_with("/status/") => json_response(
            p[8..].parse().expect("/status/NNN"),
            serde_json::json!({"error": "status-from-fake"}),
        ),
        p if p.starts_with("/app/installations/") && p.ends_with("/access_tokens") => {
            github_token_response(&parts.headers, query, seen)
        }
        p if p.starts_with("/mirror") => Response::new(full(body)),
        _ => {
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            let json = serde_json::json!({
                "method": parts.method.as_str(), "uri": parts.uri.to_string(), "headers": headers,
                "body_len": body.len(), "body": String::from_utf8_lossy(&body[..body.len().min(256)]),
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json.to_string()))
                .unwrap()
        }
    };
    resp.headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("fake"));
    resp
}

/// The fields of a form body (`a=b&c=d`, `+` and `%XX` decoded).
pub fn form_fields(body: &[u8]) -> BTreeMap<String, String> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("?");
                if let Ok(v) = u8::from_str_radix(hex, 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn json_response(status: u16, v: serde_json::Value) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .unwrap()
}

fn oauth_token_response(body: &[u8], seen: &Mutex<Vec<Seen>>) -> Response<TestBody> {
    let f = form_fields(body);
    let ok = match f.get("grant_type").map(String::as_str) {
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => f
            .get("assertion")
            .is_some_and(|a| a.split('.').count() == 3),
        Some("client_credentials") => {
            f.contains_key("client_id") && f.contains_key("client_secret")
        }
        _ => false,
    };
    if !ok {
        return json_response(400, serde_json::json!({"error": "invalid_request"}));
    }
    let n = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/token")
        .count();
    json_response(
        200,
        serde_json::json!({"access_token": format!("minted-access-{n}"), "expires_in": 3600, "token_type": "Bearer"}),
    )
}

fn github_token_response(
    headers: &HeaderMap,
    query: &str,
    seen: &Mutex<Vec<Seen>>,
) -> Response<TestBody> {
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if jwt.is_none_or(|j| j.split('.').count() != 3) {
        return json_response(
            401,
            serde_json::json!({"message": "A JSON web token could not be decoded"}),
        );
    }
    let n = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.ends_with("/access_tokens"))
        .count();
    let life = query
        .strip_prefix("expires_in=")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let at = (time::OffsetDateTime::now_utc() + time::Duration::seconds(life))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json_response(
        201,
        serde_json::json!({"token": format!("ghs_minted{n}"), "expires_at": at}),
    )
}

/// Two events, each let through by `gate`: if anything between buffers, a
/// client never sees event one while event two is held.
fn sse_response(gate: Arc<Gate>) -> Response<TestBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for ev in ["data: one\n\n", "data: two\n\n"] {
            if !gate.admit().await {
                return;
            }
            gate.mark_sent();
            if tx.send(Bytes::from_static(ev.as_bytes())).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(channel_body(rx))
        .unwrap()
}

/// A 512-byte chunk each millisecond until the client resets the stream.
fn endless_response() -> Response<TestBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; 512]);
        while tx.send(chunk.clone()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    Response::new(channel_body(rx))
}

// ------------------------------------------------------- fake tokenizer

/// What the fake remote tokenizer received, per request.
#[derive(Debug, Clone)]
pub struct TokenizerRequest {
    pub uri: String,
    pub proxy_tokenizer: Option<String>,
    pub proxy_authorization: Option<String>,
    pub fly_src_optin: Option<String>,
}

/// Like superfly/tokenizer: an HTTP proxy that takes absolute-form
/// requests, requires `Proxy-Tokenizer: <sealed>`, strips `Proxy-*`, sets
/// `Authorization: Bearer <real>` and dials the host over TLS (always the
/// given upstream). Stopped on drop.
pub struct FakeTokenizer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<TokenizerRequest>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeTokenizer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Injection {
    sealed: String,
    real: String,
    upstream: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl FakeTokenizer {
    pub async fn start(upstream: &LoopbackUpstream, sealed: &str, real: &str) -> FakeTokenizer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inj = Arc::new(Injection {
            sealed: sealed.into(),
            real: real.into(),
            upstream: upstream.addr,
            tls: upstream.ca().client_config(&[b"http/1.1"]),
        });
        let seen: Arc<Mutex<Vec<TokenizerRequest>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let (inj, seen) = (inj.clone(), seen2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (inj, seen) = (inj.clone(), seen.clone());
                        async move { Ok::<_, Infallible>(inject(&inj, &seen, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        FakeTokenizer {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// A port nobody listens on: a tokenizer that is down.
    pub async fn down_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<TokenizerRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn inject(
    inj: &Injection,
    seen: &Mutex<Vec<TokenizerRequest>>,
    mut req: Request<Incoming>,
) -> Response<TestBody> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    seen.lock().unwrap().push(TokenizerRequest {
        uri: req.uri().to_string(),
        proxy_tokenizer: h("proxy-tokenizer"),
        proxy_authorization: h("proxy-authorization"),
        fly_src_optin: h("fly-src-optin"),
    });
    if req.uri().scheme_str() != Some("http")
        || h("proxy-tokenizer").as_deref() != Some(inj.sealed.as_str())
    {
        return Response::builder()
            .status(400)
            .body(full("bad tokenizer request"))
            .unwrap();
    }
    let host = req.uri().host().unwrap().to_string();
    let pq = req.uri().path_and_query().unwrap().as_str().to_string();
    *req.uri_mut() = pq.parse().unwrap();
    let names: Vec<_> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in names {
        req.headers_mut().remove(n);
    }
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", inj.real).parse().unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(inj.upstream).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(inj.tls.clone())
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    // The relay aborts an over-cap upload mid-way: no panic for that.
    let Ok(resp) = send.send_request(req).await else {
        return Response::builder()
            .status(502)
            .body(full("upstream request failed"))
            .unwrap();
    };
    resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed())
}

// ------------------------------------------------- standalone tokenizer

/// proxypilot's standalone tokenizer on 127.0.0.1; stopped on drop.
pub struct Tokenizer {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    task: JoinHandle<()>,
}

impl Drop for Tokenizer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `engine` with an upstream client built from `client`.
pub async fn start_tokenizer(
    engine: Engine,
    client: UpstreamClientConfig,
    open_proxy: bool,
) -> Tokenizer {
    let engine = Arc::new(engine);
    let config = TokenizerService {
        engine: engine.clone(),
        client: UpstreamClient::new(&client).unwrap(),
        open_proxy,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(proxypilot::cli::tokenizer::serve(listener, config));
    Tokenizer { addr, engine, task }
}

/// An engine with a fresh open key.
pub fn new_engine() -> Engine {
    Engine::new(OpenKey::generate())
}

// ------------------------------------------------------- proxy client

/// A keep-alive HTTP/1.1 connection to a proxy, sending requests as given
/// (absolute-form URIs stay absolute).
pub struct ProxyConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl ProxyConn {
    pub async fn connect(addr: SocketAddr) -> ProxyConn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        ProxyConn { sender }
    }

    /// Sends `req`; the status, headers and body (lossy UTF-8).
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> (u16, HeaderMap, String) {
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }
}

/// GET `uri` through a proxy with extra headers (and `Host` from the URI).
pub fn proxy_get(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(uri);
    if let Some(a) = uri
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().cloned())
    {
        b = b.header("host", a.as_str());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}
