//! Shared helpers of the tokenizer integration tests: a test CA, a fake
//! HTTPS upstream on loopback that records what it receives, and a plain
//! HTTP/1.1 proxy client that sends absolute-form requests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot::tokenizer::{Engine, OpenKey, ServerConfig, UpstreamClient, UpstreamClientConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const UPSTREAM_HOST: &str = "api.example.test";

/// What the fake upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
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
    /// The client config that reaches this upstream as UPSTREAM_HOST:443.
    pub fn client_config(&self, http2: bool) -> UpstreamClientConfig {
        UpstreamClientConfig {
            system_roots: false,
            extra_ca_pem: vec![self.ca_pem.clone()],
            resolve: HashMap::from([(format!("{UPSTREAM_HOST}:443"), self.addr)]),
            http2,
            ..Default::default()
        }
    }
}

/// A CA and a leaf for `names`, signed by it.
pub fn test_pki(names: &[&str]) -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "proxypilot tokenizer test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    (
        ca_cert.pem(),
        leaf_cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
}

/// Start a fake HTTPS upstream (HTTP/1.1 and HTTP/2 by ALPN) for
/// UPSTREAM_HOST. It records each request and answers 200 with the body it
/// received.
pub async fn start_upstream() -> Upstream {
    let (ca_pem, cert, key) = test_pki(&[UPSTREAM_HOST]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            version: parts.version,
                            headers: parts.headers.clone(),
                            body: body.clone(),
                        });
                        let mut resp = Response::new(Full::new(body));
                        resp.headers_mut()
                            .insert("x-upstream", "fake".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        ca_pem,
        seen,
        task,
    }
}

/// A running standalone tokenizer.
pub struct Tokenizer {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Tokenizer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_tokenizer(
    engine: Engine,
    client: UpstreamClientConfig,
    open_proxy: bool,
) -> Tokenizer {
    let engine = Arc::new(engine);
    let config = ServerConfig {
        engine: engine.clone(),
        client: UpstreamClient::new(&client).unwrap(),
        open_proxy,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(proxypilot::tokenizer::serve(listener, config));
    Tokenizer { addr, engine, task }
}

pub fn new_engine() -> Engine {
    Engine::new(OpenKey::generate())
}

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

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> (u16, HeaderMap, String) {
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }
}

/// GET `uri` through a proxy with extra headers.
pub fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
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
