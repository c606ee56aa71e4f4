//! The HTTP request path through the relay, end to end on loopback: a
//! real `Relay` (policy, ClientHello read, TLS with a minted leaf, hyper's
//! HTTP/1.1 and HTTP/2 server, `check_authority`, `tokenizer_uri`,
//! `forwardable_headers`, `Credential::tokenizer_headers`) in front of an
//! embedded forwarder that checks what the relay would send the tokenizer
//! and then runs the real tokenizer `Engine` on it.
//!
//! The fuzzer writes either structured HTTP/1.1 requests (method, target,
//! Host, headers, body, framing) or raw bytes (HTTP/2 seeds live in the
//! corpus) inside a TLS session to an intercepted host.
//!
//! Invariants checked on every forwarded request:
//! - the absolute URI and Host name the intercepted host (never another);
//! - every Proxy-Tokenizer value is the relay's own sealed secret, and
//!   Proxy-Authorization is the relay's own: the sandbox cannot add its
//!   own sealed secrets or tokenizer credentials;
//! - no hop-by-hop or Fly-Src header (other than `fly-src-optin: *`);
//! - the tokenizer engine accepts the request and injects the real key.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use proxypilot::kernel::origin::OriginalDestination;
use proxypilot::relay::credentials::preset_slots;
use proxypilot::relay::forward::BoxFuture;
use proxypilot::relay::{
    Forward, ForwardError, Forwarder, Limits, LiveRelay, Relay, RelayBody, RelayConfig,
};
use proxypilot::settings::{SecretString, Target};
use proxypilot::tls::ca::CertAuthority;
use proxypilot::tokenizer::secret::{FmtDst, InjectProcessor, NoAuth};
use proxypilot::tokenizer::{seal, Engine, OpenKey, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;

/// Has preset slots (x-api-key, Authorization: Bearer).
const HOST: &str = "api.anthropic.com";
const OPEN_KEY_HEX: &str = "0202020202020202020202020202020202020202020202020202020202020202";
const REAL_KEY: &str = "sk-real-key-never-in-the-sandbox";
const TOKENIZER_AUTH: &str = "Bearer relay-to-tokenizer";

struct World {
    rt: Runtime,
    relay: Arc<Relay>,
    listener: TcpListener,
    tls: TlsConnector,
    tls_h1: TlsConnector,
}

struct Checker {
    engine: Engine,
    sealed: String,
}

const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Checker {
    fn check(&self, req: &mut http::request::Parts) {
        let auth = req.uri.authority().map(|a| a.as_str().to_string());
        let port = auth
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, p)| p.to_string());
        let expect = match &port {
            None => HOST.to_string(),
            Some(p) => format!("{HOST}:{p}"),
        };
        assert_eq!(
            auth.as_deref(),
            Some(expect.as_str()),
            "forwarded to another authority"
        );
        assert_eq!(req.uri.scheme_str(), Some("http"));
        assert_eq!(
            req.headers.get_all("host").iter().collect::<Vec<_>>(),
            vec![expect.as_str()],
            "Host differs from the intercepted host"
        );
        for v in req.headers.get_all("proxy-tokenizer") {
            let v = v.to_str().expect("ascii");
            assert!(
                v == self.sealed || v.starts_with(&format!("{}; ", self.sealed)),
                "a Proxy-Tokenizer value that is not the relay's: {v}"
            );
        }
        assert!(req.headers.get("proxy-tokenizer").is_some());
        assert_eq!(
            req.headers
                .get_all("proxy-authorization")
                .iter()
                .collect::<Vec<_>>(),
            vec![TOKENIZER_AUTH],
            "Proxy-Authorization from the sandbox"
        );
        for (n, v) in &req.headers {
            let n = n.as_str();
            assert!(!HOP.contains(&n), "hop-by-hop header {n} forwarded");
            if n.starts_with("fly-src") {
                assert!(
                    n == "fly-src-optin" && v == "*",
                    "sandbox-set {n} forwarded"
                );
            }
            assert!(
                !n.starts_with("proxy-") || n == "proxy-tokenizer" || n == "proxy-authorization"
            );
        }
        // The engine must accept what the relay sends for its own host.
        if port.is_none() {
            let applied = self
                .engine
                .apply(req)
                .unwrap_or_else(|e| panic!("the engine refused the relay's request: {e}"));
            assert!(applied.body.is_identity());
            let carried = req
                .headers
                .values()
                .any(|v| v.to_str().is_ok_and(|s| s.contains(REAL_KEY)));
            assert!(carried, "the real key was not injected");
        }
    }
}

impl Forward for Checker {
    fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> BoxFuture<Result<Response<RelayBody>, ForwardError>> {
        let (mut parts, body) = req.into_parts();
        self.check(&mut parts);
        Box::pin(async move {
            // Drain the request body (bounded by what the fuzzer sent).
            let n = match body.collect().await {
                Ok(b) => b.to_bytes().len(),
                Err(_) => 0,
            };
            let resp = Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(
                    Full::new(Bytes::from(format!("ok {n}")))
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                )
                .unwrap();
            Ok(resp)
        })
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        proxypilot::tls::ensure_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let key = OpenKey::from_hex(OPEN_KEY_HEX).unwrap();
        let secret = Secret {
            inject_processor: Some(InjectProcessor {
                token: proxypilot::tokenizer::secret::SecretString::new(REAL_KEY),
                fmt_dst: FmtDst {
                    allowed_fmt: Some(vec!["%s".into(), "Bearer %s".into()]),
                    allowed_dst: Some(vec!["x-api-key".into(), "authorization".into()]),
                    ..FmtDst::default()
                },
            }),
            no_auth: Some(NoAuth {}),
            allowed_hosts: Some(vec![HOST.into()]),
            ..Secret::default()
        };
        let sealed = seal(&key.seal_key(), &secret);
        let ca = Arc::new(CertAuthority::ephemeral(&[HOST.to_string()]).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der()).unwrap();
        let mut ccfg = rustls::ClientConfig::builder_with_provider(proxypilot::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ccfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut h1cfg = ccfg.clone();
        h1cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let limits = Limits {
            handshake_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            max_header_bytes: 16 * 1024,
            max_connections: 64,
            ..Limits::default()
        };
        let checker = Checker {
            engine: Engine::new(key),
            sealed: sealed.clone(),
        };
        let relay = Arc::new(
            Relay::new(RelayConfig {
                targets: vec![Target {
                    host: HOST.into(),
                    secret_name: "ANTHROPIC_SEALED".into(),
                    sealed: SecretString::new(sealed),
                    slots: preset_slots(HOST),
                    permits: vec![],
                }],
                allow: vec![],
                allow_cidrs: vec![],
                ca,
                forwarder: Forwarder::Embedded(Arc::new(checker)),
                proxy_authorization: Some(TOKENIZER_AUTH.into()),
                limits,
                leaf_lifetime: Duration::from_secs(24 * 3600),
                leaf_capacity: 4,
            })
            .unwrap(),
        );
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        World {
            rt,
            relay,
            listener,
            tls: TlsConnector::from(Arc::new(ccfg)),
            tls_h1: TlsConnector::from(Arc::new(h1cfg)),
        }
    })
}

// ------------------------------------------------------------ input

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Connect,
    Options,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum TargetForm {
    Path(String),
    /// absolute-form with this authority
    Absolute(HostForm, String),
    Star,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum HostForm {
    Sni,
    SniUpper,
    SniDot,
    SniPort(u16),
    UserinfoSni(String),
    Other(String),
}

impl HostForm {
    fn render(&self) -> String {
        match self {
            HostForm::Sni => HOST.into(),
            HostForm::SniUpper => HOST.to_ascii_uppercase(),
            HostForm::SniDot => format!("{HOST}."),
            HostForm::SniPort(p) => format!("{HOST}:{p}"),
            HostForm::UserinfoSni(u) => format!("{u}@{HOST}"),
            HostForm::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    XApiKey,
    Authorization,
    ProxyTokenizer,
    ProxyAuthorization,
    FlySrc,
    FlySrcSignature,
    Connection,
    Cookie,
    Te,
    Upgrade,
    Host,
    ContentLength,
    TransferEncoding,
    Other(String),
}

impl Name {
    fn render(&self) -> &str {
        match self {
            Name::XApiKey => "x-api-key",
            Name::Authorization => "Authorization",
            Name::ProxyTokenizer => "Proxy-Tokenizer",
            Name::ProxyAuthorization => "Proxy-Authorization",
            Name::FlySrc => "Fly-Src",
            Name::FlySrcSignature => "Fly-Src-Signature",
            Name::Connection => "Connection",
            Name::Cookie => "Cookie",
            Name::Te => "TE",
            Name::Upgrade => "Upgrade",
            Name::Host => "Host",
            Name::ContentLength => "Content-Length",
            Name::TransferEncoding => "Transfer-Encoding",
            Name::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Framing {
    /// Content-Length of the body.
    Length,
    Chunked,
    None,
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: Method,
    target: TargetForm,
    http10: bool,
    host: Option<HostForm>,
    headers: Vec<(Name, Vec<u8>)>,
    framing: Framing,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Http1(Vec<Req>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Case {
    /// The port the client dialled (443, or another intercepted port).
    alt_port: bool,
    /// Offer only http/1.1 in ALPN (else h2 and http/1.1).
    h1_only: bool,
    input: Input,
}

fn render(reqs: &[Req]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in reqs.iter().take(4) {
        let method = match &r.method {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Other(s) => s,
        };
        let target = match &r.target {
            TargetForm::Path(p) => format!("/{p}"),
            TargetForm::Absolute(h, p) => format!("https://{}/{p}", h.render()),
            TargetForm::Star => "*".into(),
            TargetForm::Raw(s) => s.clone(),
        };
        let version = if r.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        out.extend_from_slice(format!("{method} {target} {version}\r\n").as_bytes());
        if let Some(h) = &r.host {
            out.extend_from_slice(format!("Host: {}\r\n", h.render()).as_bytes());
        }
        for (n, v) in r.headers.iter().take(24) {
            out.extend_from_slice(n.render().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        match r.framing {
            Framing::Length => {
                out.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n", r.body.len()).as_bytes(),
                );
                out.extend_from_slice(&r.body);
            }
            Framing::Chunked => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                if !r.body.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", r.body.len()).as_bytes());
                    out.extend_from_slice(&r.body);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Framing::None => out.extend_from_slice(b"\r\n"),
        }
    }
    out
}

async fn one(w: &'static World, case: Case) {
    let bytes = match &case.input {
        Input::Http1(reqs) => render(reqs),
        Input::Raw(b) => b.clone(),
    };
    let client = TcpStream::connect(w.listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, peer) = w.listener.accept().await.unwrap();
    // RST on close: no TIME_WAIT, so a long run does not run out of ports.
    #[allow(deprecated)]
    {
        let _ = client.set_linger(Some(Duration::ZERO));
        let _ = server.set_linger(Some(Duration::ZERO));
    }
    let port = if case.alt_port { 8443 } else { 443 };
    let origin = OriginalDestination {
        addr: SocketAddr::new("203.0.113.10".parse().unwrap(), port),
        pid: 1,
        uid: 1000,
        cgroup_id: 7,
        comm: "fuzz".into(),
    };
    let live = LiveRelay::new(w.relay.clone());
    let task = tokio::spawn(
        w.relay
            .clone()
            .handle_connection(live, server, peer, origin),
    );
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let tls = if case.h1_only { &w.tls_h1 } else { &w.tls };
    let mut stream = match tls.connect(name, client).await {
        Ok(s) => s,
        Err(e) => panic!("TLS handshake with the relay failed: {e}"),
    };
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
    drop(stream);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(r) => r.expect("the relay's connection task panicked"),
        Err(_) => panic!("the relay kept the connection open 5 s after the client closed it"),
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    w.rt.block_on(one(w, case));
});
