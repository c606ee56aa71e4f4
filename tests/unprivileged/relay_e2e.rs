//! The relay end to end on loopback, unprivileged: a real client (hyper
//! over rustls, and curl) → the relay → a fake remote tokenizer (an HTTP
//! proxy that injects a credential) → a fake HTTPS upstream whose test CA
//! only the tokenizer trusts (both from the harness's [`loopback`]). The
//! kernel is replaced by [`StandInKernel`], which reports one fixed
//! redirect record for every client (or none).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot::kernel::origin::OriginalDestination;
use proxypilot::policy::AllowedNet;
use proxypilot::relay::{self, Forwarder, Limits, Relay, RelayConfig, RemoteTokenizer};
use proxypilot::settings::{SecretString, Target};
use proxypilot::tls::ca::CertAuthority;
use proxypilot_tests::logs::LogCapture;
use proxypilot_tests::loopback::{
    channel_body as stream_body, full, FakeTokenizer, LoopbackUpstream, TestBody,
};
use proxypilot_tests::testca::client_config_trusting as client_config;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "api.example.com";
const SEALED: &str = "sealed-blob-xyz-do-not-log";
const REAL_SECRET: &str = "real-secret-do-not-log";
const SECRET_NAME: &str = "EXAMPLE_SEALED";

/// All log output of this test binary, as JSON lines.
pub(crate) fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let cap = LogCapture::default();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(cap.make_writer())
            .init();
        cap
    })
}

fn log_text() -> String {
    logs().text()
}

// ----------------------------------------------------------- the relay

struct Env {
    relay_addr: SocketAddr,
    relay: Arc<Relay>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    upstream_ca: CertificateDer<'static>,
    upstream_addr: SocketAddr,
    upstream: LoopbackUpstream,
    tokenizer: FakeTokenizer,
}

#[derive(Default)]
struct Opts {
    limits: Option<Limits>,
    tokenizer_down: bool,
    /// The original destination the "kernel" reports; default
    /// 203.0.113.10:<relay port>.
    origin: Option<SocketAddr>,
    allow_cidrs: Vec<AllowedNet>,
    /// The "kernel" has no redirect record for any client.
    unredirected: bool,
    /// Reach the tokenizer as `https://localhost:PORT` through a TLS front
    /// with a test-CA certificate; `Some(true)`: with that CA as
    /// `--tokenizer-ca`, `Some(false)`: trusting the system roots only.
    tokenizer_tls: Option<bool>,
}

/// A TLS front for the fake tokenizer (as tokenizer.fly.dev is one):
/// terminates TLS for `localhost` with a test-CA certificate and pipes
/// the bytes to `backend`. Returns its address and the CA's PEM file.
async fn tls_front(
    upstream: &LoopbackUpstream,
    backend: SocketAddr,
) -> (SocketAddr, std::path::PathBuf) {
    let acceptor = tokio_rustls::TlsAcceptor::from(
        upstream.ca().server_config(&["localhost"], &[b"http/1.1"]),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut back) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            });
        }
    });
    let ca = std::env::temp_dir().join(format!(
        "pp-relay-e2e-tokca-{}-{}.pem",
        std::process::id(),
        addr.port()
    ));
    std::fs::write(&ca, upstream.ca().pem()).unwrap();
    (addr, ca)
}

/// The test seam for the kernel's `PEER_ORIGIN` map: every client of the
/// test counts as redirected from the sandbox with `record`, or, with
/// `None`, none does (like a local process outside the sandbox).
struct StandInKernel {
    record: Option<OriginalDestination>,
}

impl relay::Redirections for StandInKernel {
    fn take(&self, _peer: SocketAddr) -> Option<OriginalDestination> {
        self.record.clone()
    }
}

fn allow_cidr(s: &str) -> AllowedNet {
    let (net, port) = match s.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') || n.ends_with(']') => {
            (n.trim_matches(['[', ']']), Some(p.parse().unwrap()))
        }
        _ => (s, None),
    };
    AllowedNet {
        net: net.parse().unwrap(),
        port,
    }
}

fn short_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(10),
        ..Limits::default()
    }
}

async fn env(opts: Opts) -> Env {
    logs();
    proxypilot::tls::ensure_crypto_provider();
    let upstream = LoopbackUpstream::start(&[HOST, "localhost", "127.0.0.1"]).await;
    let tokenizer = FakeTokenizer::start(&upstream, SEALED, REAL_SECRET).await;
    let tok_addr = if opts.tokenizer_down {
        FakeTokenizer::down_addr().await
    } else {
        tokenizer.addr
    };

    let ca = Arc::new(CertAuthority::ephemeral(&[HOST.to_string()]).unwrap());
    let limits = opts.limits.unwrap_or_else(short_limits);
    let remote = match opts.tokenizer_tls {
        None => RemoteTokenizer::new(
            &format!("http://{tok_addr}").parse().unwrap(),
            &[],
            limits.connect_timeout,
        ),
        Some(with_ca) => {
            let (front, ca) = tls_front(&upstream, tok_addr).await;
            let ca = if with_ca { vec![ca] } else { vec![] };
            RemoteTokenizer::new(
                &format!("https://localhost:{}", front.port())
                    .parse()
                    .unwrap(),
                &ca,
                limits.connect_timeout,
            )
        }
    }
    .unwrap();
    let relay = Arc::new(
        Relay::new(RelayConfig {
            targets: vec![Target {
                host: HOST.into(),
                secret_name: SECRET_NAME.into(),
                sealed: SecretString::new(SEALED),
                slots: vec![],
                permits: vec![],
            }],
            allow: vec![proxypilot::policy::HostPattern::parse("localhost").unwrap()],
            allow_cidrs: opts.allow_cidrs,
            ca: ca.clone(),
            forwarder: Forwarder::Remote(Arc::new(remote)),
            proxy_authorization: Some("Bearer tokenizer-auth".into()),
            limits,
            leaf_lifetime: Duration::from_secs(3600),
            leaf_capacity: 16,
        })
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let origin = opts
        .origin
        .unwrap_or_else(|| SocketAddr::new("203.0.113.10".parse().unwrap(), relay_addr.port()));
    let record = (!opts.unredirected).then(|| OriginalDestination {
        addr: origin,
        pid: 4242,
        uid: 1000,
        cgroup_id: 7,
        comm: "testclient".into(),
    });
    tokio::spawn(relay::serve(
        listener,
        relay::LiveRelay::new(relay.clone()),
        StandInKernel { record },
    ));
    Env {
        relay_addr,
        relay,
        ca_pem: ca.ca_pem().to_string(),
        ca_der: ca.ca_der(),
        upstream_ca: upstream.ca().der(),
        upstream_addr: upstream.addr,
        upstream,
        tokenizer,
    }
}

impl Env {
    async fn tls(
        &self,
        sni: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.relay_addr).await?;
        tokio_rustls::TlsConnector::from(client_config(self.ca_der.clone(), alpn))
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
            .await
    }

    async fn h1(&self) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let tls = self.tls(HOST, &[b"http/1.1"]).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn host_header(&self) -> String {
        format!("{HOST}:{}", self.relay_addr.port())
    }
}

fn get(path: &str, host: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", host)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap()
}

async fn json_body(resp: Response<Incoming>) -> serde_json::Value {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&b)))
}

// --------------------------------------------------------------- tests

#[tokio::test]
async fn get_and_post_reach_upstream_with_credential_and_without_proxy_headers() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;

    let mut req = get("/echo?x=1", &e.host_header());
    req.headers_mut()
        .insert("proxy-tokenizer", "sandbox-forged".parse().unwrap());
    req.headers_mut()
        .insert("authorization", "Bearer dummy".parse().unwrap());
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "fake");
    let j = json_body(resp).await;
    assert_eq!(j["method"], "GET");
    assert_eq!(j["uri"], "/echo?x=1");
    assert_eq!(
        j["headers"]["authorization"],
        format!("Bearer {REAL_SECRET}")
    );
    for (k, _) in j["headers"].as_object().unwrap() {
        assert!(!k.starts_with("proxy-"), "upstream saw {k}");
    }

    let seen = e.tokenizer.seen()[0].clone();
    assert_eq!(
        seen.uri,
        format!("http://{HOST}:{}/echo?x=1", e.relay_addr.port())
    );
    assert_eq!(
        seen.proxy_tokenizer.as_deref(),
        Some(SEALED),
        "only the relay's sealed secret"
    );
    assert_eq!(
        seen.proxy_authorization.as_deref(),
        Some("Bearer tokenizer-auth")
    );
    assert_eq!(seen.fly_src_optin.as_deref(), Some("*"));

    let post = Request::post("/echo")
        .header("host", e.host_header())
        .header("content-type", "application/json")
        .body(full(r#"{"hello":"world"}"#))
        .unwrap();
    let resp = c.send_request(post).await.unwrap();
    assert_eq!(resp.status(), 200);
    let j = json_body(resp).await;
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body"], r#"{"hello":"world"}"#);
    assert_eq!(j["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn chunked_upload_streams_through() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..10 {
            tx.send(Bytes::from(vec![b'a'; 10_000])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let req = Request::post("/echo")
        .header("host", e.host_header())
        .body(stream_body(rx))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let j = json_body(resp).await;
    assert_eq!(j["body_len"], 100_000);
    assert_eq!(j["headers"]["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn http2_client() {
    let e = env(Opts::default()).await;
    let tls = e.tls(HOST, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut c, conn) = hyper::client::conn::http2::handshake::<_, _, TestBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..5 {
        let uri = format!("https://{}/echo?i={i}", e.host_header());
        let req = Request::get(uri)
            .version(http::Version::HTTP_2)
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let j = json_body(resp).await;
        assert_eq!(j["uri"], format!("/echo?i={i}"));
        assert_eq!(
            j["headers"]["authorization"],
            format!("Bearer {REAL_SECRET}")
        );
    }
}

#[tokio::test]
async fn keep_alive_many_requests_one_connection() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;
    for i in 0..100 {
        let resp = c
            .send_request(get(&format!("/echo?n={i}"), HOST))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(e.relay.leaves().mints(), 1);
    // The pooled client reused one keep-alive connection to the tokenizer.
    assert_eq!(e.tokenizer.connections(), 1);
}

#[tokio::test]
async fn idle_connection_is_closed() {
    let e = env(Opts {
        limits: Some(Limits {
            idle_timeout: Duration::from_millis(300),
            ..short_limits()
        }),
        ..Opts::default()
    })
    .await;
    let mut tls = e.tls(HOST, &[b"http/1.1"]).await.unwrap();
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    // The response arrives, then the idle connection is closed.
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "idle connection left open");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let e = env(Opts {
        limits: Some(Limits {
            max_header_bytes: 8192,
            ..short_limits()
        }),
        ..Opts::default()
    })
    .await;
    let mut c = e.h1().await;
    let mut req = get("/echo", HOST);
    req.headers_mut()
        .insert("x-big", "a".repeat(20_000).parse().unwrap());
    match c.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(err) => eprintln!("connection closed: {err}"),
    }
    assert!(e.tokenizer.seen().is_empty());
}

#[tokio::test]
async fn connection_cap_closes_extra_connections() {
    let e = env(Opts {
        limits: Some(Limits {
            max_connections: 1,
            ..short_limits()
        }),
        ..Opts::default()
    })
    .await;
    let mut first = e.h1().await;
    assert_eq!(
        first
            .send_request(get("/echo", HOST))
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        e.tls(HOST, &[]).await.is_err(),
        "second connection over the cap"
    );
    assert!(log_text().contains("too many concurrent connections"));
}

fn with_body_cap(cap: u64) -> Opts {
    Opts {
        limits: Some(Limits {
            max_request_body: Some(cap),
            ..short_limits()
        }),
        ..Opts::default()
    }
}

/// The statuses in the audit lines of the `n` requests with this
/// (redacted) path, sorted. Lines are written once both bodies are done.
async fn audit_statuses(path: &str, n: usize) -> Vec<u64> {
    let mut found = Vec::new();
    for _ in 0..100 {
        found = log_text()
            .lines()
            .filter(|l| l.contains("\"audit\""))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["path"] == path)
            .filter_map(|v| v["fields"]["status"].as_u64())
            .collect();
        if found.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found.sort();
    found
}

/// A body that sends 100 bytes, then holds while the returned sender
/// lives. With a larger Content-Length, only a relay that refuses on the
/// declared length answers before the body is complete.
fn held_body() -> (TestBody, tokio::sync::mpsc::Sender<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(Bytes::from(vec![b'a'; 100])).unwrap();
    (stream_body(rx), tx)
}

#[tokio::test]
async fn declared_body_over_the_cap_is_413_before_the_tokenizer() {
    let e = env(with_body_cap(1024)).await;
    let mut c = e.h1().await;
    let (body, _hold) = held_body();
    let req = Request::post("/too-big")
        .header("host", HOST)
        .header("content-length", "4096")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.send_request(req))
        .await
        .expect("no answer before the body was complete: the declared length was not checked")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let j = json_body(resp).await;
    assert!(j["error"].as_str().unwrap().contains("1024"), "{j}");
    let hint = j["hint"].as_str().unwrap();
    assert!(
        hint.contains("--max-request-body") && hint.contains("config key max-request-body"),
        "{j}"
    );
    assert_eq!(audit_statuses("/too-big", 1).await, [413]);

    // HTTP/2 declares it as content-length too.
    let tls = e.tls(HOST, &[b"h2"]).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake::<_, _, TestBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (body, _hold) = held_body();
    let req = Request::post(format!("https://{HOST}/too-big-h2"))
        .version(http::Version::HTTP_2)
        .header("content-length", "4096")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req))
        .await
        .expect("no answer before the body was complete")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    assert!(
        e.tokenizer.seen().is_empty(),
        "the tokenizer saw an over-cap request"
    );
    assert!(e.upstream.seen().is_empty());
}

#[tokio::test]
async fn streamed_body_over_the_cap_is_aborted_not_truncated() {
    let e = env(with_body_cap(64 * 1024)).await;
    let mut c = e.h1().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..20 {
            if tx.send(Bytes::from(vec![b'a'; 10_000])).await.is_err() {
                return; // the relay gave up on the body
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let req = Request::post("/capped")
        .header("host", HOST)
        .body(stream_body(rx))
        .unwrap();
    match c.send_request(req).await {
        Ok(resp) => {
            assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
            let j = json_body(resp).await;
            assert!(j["error"].as_str().unwrap().contains("65536"), "{j}");
        }
        // The relay may close the connection while the client still writes.
        Err(err) => eprintln!("connection reset: {err}"),
    }
    let warned = |l: &&str| l.contains("went over the cap") && l.contains("/capped");
    for _ in 0..100 {
        if log_text().lines().any(|l| warned(&l)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = log_text();
    let line = logs.lines().find(warned).expect("a warning about the cap");
    assert!(
        line.contains(SECRET_NAME) && line.contains(HOST) && line.contains("65536"),
        "{line}"
    );
    // Give an (erroneously) completed upload time to land upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let echoed = e.upstream.seen();
    assert!(
        echoed.iter().all(|r| r.path != "/capped"),
        "the upstream received the capped upload as a complete request"
    );
}

#[tokio::test]
async fn bodies_within_the_cap_go_through_unchanged() {
    let e = env(with_body_cap(64 * 1024)).await;
    let mut c = e.h1().await;
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let want = Bytes::from(pattern);
    // Exactly the cap, declared with Content-Length.
    let req = Request::post("/at-cap")
        .header("host", HOST)
        .body(full(want.clone()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    // Under the cap, chunked.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let chunks = want.clone();
    tokio::spawn(async move {
        for part in chunks.slice(..50_000).chunks(10_000) {
            tx.send(Bytes::copy_from_slice(part)).await.unwrap();
        }
    });
    let req = Request::post("/under-cap")
        .header("host", HOST)
        .body(stream_body(rx))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let j = json_body(resp).await;
    assert_eq!(j["headers"]["transfer-encoding"], "chunked");

    let echoed = e.upstream.seen();
    let got: BTreeMap<&str, &Bytes> = echoed.iter().map(|r| (r.path.as_str(), &r.body)).collect();
    assert_eq!(got["/at-cap"], &want);
    assert_eq!(got["/under-cap"], &want.slice(..50_000));
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_then_refills() {
    let e = env(Opts {
        limits: Some(Limits {
            rate_limits: BTreeMap::from([(HOST.to_string(), 2)]),
            ..short_limits()
        }),
        ..Opts::default()
    })
    .await;
    // Five connections first, so the five requests arrive together (well
    // within the half second a token takes to come back): the bucket is
    // shared by all of them.
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(e.h1().await);
    }
    let sent = conns
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.send_request(get(&format!("/rated?burst={i}"), HOST)));
    let mut ok = 0;
    let mut limited = 0;
    for resp in futures_util::future::join_all(sent).await {
        let resp = resp.unwrap();
        match resp.status().as_u16() {
            200 => {
                ok += 1;
                resp.into_body().collect().await.unwrap();
            }
            429 => {
                limited += 1;
                let secs: u64 = resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(secs >= 1, "Retry-After {secs}");
                let j = json_body(resp).await;
                let error = j["error"].as_str().unwrap();
                assert!(error.contains(HOST) && error.contains('2'), "{j}");
                assert!(j["hint"].as_str().unwrap().contains("--rate-limit"), "{j}");
            }
            other => panic!("status {other}"),
        }
    }
    assert_eq!((ok, limited), (2, 3));
    assert_eq!(e.tokenizer.seen().len(), 2, "429s are not forwarded");
    assert_eq!(
        audit_statuses("/rated?burst=", 5).await,
        [200, 200, 429, 429, 429]
    );

    // A token comes back after 0.5 s; poll for it without timing asserts.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let resp = conns[0]
            .send_request(get("/rated?refill", HOST))
            .await
            .unwrap();
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the bucket did not refill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sse_arrives_event_by_event() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;
    let resp = c.send_request(get("/sse", HOST)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event did not arrive while the upstream held the second: something buffers")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: one\n\n");
    // The client has event one while the upstream still holds event two.
    assert_eq!(e.upstream.sse_gate().sent(), 1);
    e.upstream.sse_gate().allow(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: two\n\n");
    assert_eq!(e.upstream.sse_gate().sent(), 2);
}

#[tokio::test]
async fn host_sni_mismatch_is_421() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;
    let resp = c
        .send_request(get("/echo", "evil.example.net"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    let j = json_body(resp).await;
    assert!(
        j["error"].as_str().unwrap().contains("evil.example.net"),
        "{j}"
    );
    assert!(e.tokenizer.seen().is_empty(), "nothing forwarded");
    // Wrong port counts as a mismatch too; :443 and the dialled port match.
    let resp = c
        .send_request(get("/echo", &format!("{HOST}:1")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
    let resp = c
        .send_request(get("/echo", &format!("{HOST}:443")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn unknown_sni_is_denied() {
    let e = env(Opts::default()).await;
    let err = e.tls("unknown.example.org", &[]).await.unwrap_err();
    eprintln!("client saw: {err}");
    assert!(log_text().contains("unknown.example.org has no secret"));
}

#[tokio::test]
async fn no_sni_is_denied_unless_cidr_allowed() {
    let e = env(Opts::default()).await;
    // rustls sends no SNI for an IP address server name.
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(client_config(e.ca_der.clone(), &[]))
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await;
    assert!(r.is_err());

    // With the original IP in an allowed CIDR it passes through to it.
    let pki_probe = env(Opts::default()).await; // a second upstream to aim at
    let e = env(Opts {
        origin: Some(pki_probe.upstream_addr),
        allow_cidrs: vec![allow_cidr("127.0.0.0/8")],
        ..Opts::default()
    })
    .await;
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(pki_probe.upstream_ca.clone(), &[]))
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await
        .expect("no-SNI pass-through to an allowed CIDR");
    drop(tls);
}

#[tokio::test]
async fn a_connection_the_kernel_did_not_redirect_gets_nothing() {
    let e = env(Opts {
        unredirected: true,
        allow_cidrs: vec![allow_cidr("127.0.0.0/8")],
        ..Opts::default()
    })
    .await;
    // An intercepted SNI, then "localhost" (on the allow list), then no SNI
    // to an allowed CIDR: each is closed before the ClientHello is read.
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let err = tokio_rustls::TlsConnector::from(client_config(e.ca_der.clone(), &[]))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap_err();
    eprintln!("client saw: {err}");
    for name in [
        ServerName::try_from("localhost").unwrap(),
        ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
    ] {
        let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
        assert!(
            tokio_rustls::TlsConnector::from(client_config(e.upstream_ca.clone(), &[]))
                .connect(name, tcp)
                .await
                .is_err()
        );
    }
    assert!(e.tokenizer.seen().is_empty());
    assert_eq!(e.tokenizer.connections(), 0);
    assert!(e.upstream.seen().is_empty());
    let uid = nix::unistd::geteuid().as_raw();
    let line = log_text()
        .lines()
        .find(|l| l.contains(&format!("\"peer\":\"{me}\"")))
        .unwrap_or_else(|| panic!("no log line for {me}"))
        .to_string();
    assert!(
        line.contains("not redirected from the sandbox")
            && line.contains(&format!("Some({uid})"))
            && !line.contains(HOST),
        "{line}"
    );
}

#[tokio::test]
async fn no_sni_needs_the_address_and_the_port_allowed() {
    let probe = env(Opts::default()).await;
    let other_port = probe.upstream_addr.port().wrapping_add(1).max(1);
    let e = env(Opts {
        origin: Some(probe.upstream_addr),
        allow_cidrs: vec![allow_cidr(&format!("127.0.0.1/32:{other_port}"))],
        ..Opts::default()
    })
    .await;
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(client_config(probe.upstream_ca.clone(), &[]))
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await;
    assert!(r.is_err(), "only another port of that address is allowed");
    assert!(log_text().contains(&format!(
        "no --allow-cidr allows {} (address and port)",
        probe.upstream_addr
    )));
}

#[tokio::test]
async fn pass_through_to_an_internal_address_needs_allow_cidr() {
    let probe = env(Opts::default()).await;
    // "localhost" is allowed, but it resolves to loopback.
    let e = env(Opts {
        origin: Some(SocketAddr::new(
            "203.0.113.99".parse().unwrap(),
            probe.upstream_addr.port(),
        )),
        ..Opts::default()
    })
    .await;
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(client_config(probe.upstream_ca.clone(), &[]))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(r.is_err(), "pass-through dialled loopback");
    let want = format!(
        "localhost resolved to 127.0.0.1, which is loopback (127.0.0.0/8); pass-through does not dial internal addresses unless --allow-cidr allows them (e.g. --allow-cidr 127.0.0.1/32:{})",
        probe.upstream_addr.port()
    );
    let logs = log_text();
    assert!(logs.contains(&want), "{want}");
}

#[tokio::test]
async fn pass_through_shows_upstream_certificate() {
    let probe = env(Opts::default()).await;
    // "localhost" is on the allow list; the relay resolves it itself and
    // dials the original port, where the probe's upstream listens. It is
    // loopback, so --allow-cidr must allow that address and port.
    let e = env(Opts {
        origin: Some(SocketAddr::new(
            "203.0.113.99".parse().unwrap(),
            probe.upstream_addr.port(),
        )),
        allow_cidrs: vec![allow_cidr(&format!(
            "127.0.0.1/32:{}",
            probe.upstream_addr.port()
        ))],
        ..Opts::default()
    })
    .await;
    let tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(
        probe.upstream_ca.clone(),
        &[b"http/1.1"],
    ))
    .connect(ServerName::try_from("localhost").unwrap(), tcp)
    .await
    .expect("the client trusts only the upstream's CA, so this proves the cert is the upstream's");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(get("/echo", "localhost")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let j = json_body(resp).await;
    assert!(
        j["headers"].get("authorization").is_none(),
        "pass-through injects nothing"
    );
}

#[tokio::test]
async fn tokenizer_down_is_502_with_clear_body() {
    let e = env(Opts {
        tokenizer_down: true,
        ..Opts::default()
    })
    .await;
    let mut c = e.h1().await;
    let resp = c.send_request(get("/echo", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let j = json_body(resp).await;
    let err = j["error"].as_str().unwrap();
    assert!(
        err.contains("tokenizer") && err.contains("unreachable"),
        "{j}"
    );
    assert!(j["hint"].as_str().unwrap().contains("--tokenizer"), "{j}");
}

/// `--tokenizer https://…`: the proxy requests go inside TLS to the
/// tokenizer, verified against `--tokenizer-ca`; without that CA the
/// tokenizer's certificate is not trusted and the client gets a 502.
#[tokio::test]
async fn an_https_tokenizer_is_reached_over_verified_tls() {
    let e = env(Opts {
        tokenizer_tls: Some(true),
        ..Opts::default()
    })
    .await;
    let mut c = e.h1().await;
    let mut req = get("/echo", &e.host_header());
    req.headers_mut()
        .insert("authorization", "Bearer dummy".parse().unwrap());
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let j = json_body(resp).await;
    assert_eq!(
        j["headers"]["authorization"],
        format!("Bearer {REAL_SECRET}")
    );
    assert_eq!(
        e.tokenizer.seen()[0].proxy_tokenizer.as_deref(),
        Some(SEALED)
    );

    let untrusted = env(Opts {
        tokenizer_tls: Some(false),
        ..Opts::default()
    })
    .await;
    let mut c = untrusted.h1().await;
    let resp = c.send_request(get("/echo", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let j = json_body(resp).await;
    assert!(
        j["error"].as_str().unwrap().contains("https://localhost:"),
        "{j}"
    );
    assert!(untrusted.tokenizer.seen().is_empty(), "nothing reached it");
}

#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let e = env(Opts {
        limits: Some(Limits {
            header_read_timeout: Duration::from_millis(500),
            ..short_limits()
        }),
        ..Opts::default()
    })
    .await;
    let mut tls = e.tls(HOST, &[b"http/1.1"]).await.unwrap();
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: api.example.com\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the connection was not cut off");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    trickle.abort();
}

#[tokio::test]
async fn silent_client_is_cut_off_at_handshake() {
    let e = env(Opts::default()).await; // handshake timeout 2 s
    let mut tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn not_tls_is_closed_with_a_logged_reason() {
    let e = env(Opts::default()).await;
    let mut tcp = TcpStream::connect(e.relay_addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.is_empty());
    assert!(log_text().contains("not TLS"));
}

#[tokio::test]
async fn audit_line_has_fields_and_no_secret() {
    let e = env(Opts::default()).await;
    let mut c = e.h1().await;
    let post = Request::post("/audit-me?api_key=sk-in-query&mode=x")
        .header("host", HOST)
        .header("authorization", "Bearer sandbox-dummy")
        .body(full("12345"))
        .unwrap();
    let resp = c.send_request(post).await.unwrap();
    assert_eq!(resp.status(), 200);
    let n = resp.into_body().collect().await.unwrap().to_bytes().len();
    // The line is written when both bodies are done; give it a moment.
    let mut line = None;
    for _ in 0..50 {
        line = log_text()
            .lines()
            .find(|l| l.contains("\"audit\"") && l.contains("/audit-me"))
            .map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: serde_json::Value = serde_json::from_str(&line.expect("an audit line")).unwrap();
    let f = &v["fields"];
    assert_eq!(v["target"], "audit");
    assert_eq!(f["pid"], 4242);
    assert_eq!(f["process"], "testclient");
    assert_eq!(
        f["original_dst"],
        format!("203.0.113.10:{}", e.relay_addr.port())
    );
    assert_eq!(f["sni"], HOST);
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], "/audit-me?api_key=&mode=");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 5);
    assert_eq!(f["bytes_out"], n as u64);
    assert_eq!(f["secret"], SECRET_NAME);
    assert!(f["duration_ms"].is_number() && f["time"].is_string());
    let all = log_text();
    for secret in [
        SEALED,
        REAL_SECRET,
        "sk-in-query",
        "tokenizer-auth",
        "sandbox-dummy",
    ] {
        assert!(!all.contains(secret), "{secret} leaked into the logs");
    }
}

#[tokio::test]
async fn concurrent_first_connections_mint_one_leaf() {
    let e = Arc::new(env(Opts::default()).await);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let e = e.clone();
            tokio::spawn(async move {
                let mut c = e.h1().await;
                let resp = c.send_request(get("/echo", HOST)).await.unwrap();
                assert_eq!(resp.status(), 200);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(e.relay.leaves().mints(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_with_flat_memory() {
    let e = env(Opts::default()).await;
    let n: u64 = std::env::var("RELAY_BIG_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100 << 20);
    let mut c = e.h1().await;
    let rss_before = rss_kib();
    let resp = c
        .send_request(get(&format!("/bytes?n={n}"), HOST))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut got, mut peak) = (0u64, rss_before);
    let start = Instant::now();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got += d.len() as u64;
        }
        peak = peak.max(rss_kib());
    }
    assert_eq!(got, n);
    let grew_mib = (peak.saturating_sub(rss_before)) / 1024;
    eprintln!(
        "{} MiB in {:?}, RSS grew {grew_mib} MiB",
        n >> 20,
        start.elapsed()
    );
    assert!(
        grew_mib < 40,
        "RSS grew {grew_mib} MiB while streaming {} MiB",
        n >> 20
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------------ curl

async fn curl(e: &Env, args: &[&str]) -> (String, String, bool) {
    let dir = proxypilot_tests::TempDir::new("relay-curl");
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, &e.ca_pem).unwrap();
    let port = e.relay_addr.port();
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("10")
        .arg("--resolve")
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(&ca)
        .args(args)
        .output()
        .await
        .expect("curl runs");
    drop(dir);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

fn have_curl() -> bool {
    std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
}

#[tokio::test]
async fn curl_http1_and_http2() {
    if !have_curl() {
        eprintln!("curl not installed; skipping");
        return;
    }
    let e = env(Opts::default()).await;
    let url = format!("https://{HOST}:{}/echo?via=curl", e.relay_addr.port());
    for (flag, want) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (out, err, ok) = curl(&e, &[flag, "-w", "\n%{http_version} %{http_code}", &url]).await;
        assert!(ok, "curl {flag} failed: {err}");
        let (body, tail) = out.rsplit_once('\n').unwrap();
        assert_eq!(tail, format!("{want} 200"), "{out}");
        let j: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            j["headers"]["authorization"],
            format!("Bearer {REAL_SECRET}")
        );
        assert_eq!(j["uri"], "/echo?via=curl");
    }
    // POST with a body and a chunked upload.
    let (out, err, ok) = curl(&e, &["--data-binary", "hello=curl", &url]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["body"], "hello=curl");
    let (out, err, ok) = curl(
        &e,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunky",
            &url,
        ],
    )
    .await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["body"], "chunky");
    // Many requests on one connection: curl reuses it for repeated URLs.
    let urls: Vec<String> = (0..10).map(|_| url.clone()).collect();
    let mut args: Vec<&str> = vec!["-v", "-o", "/dev/null"];
    args.extend(urls.iter().map(String::as_str));
    let (_, err, ok) = curl(&e, &args).await;
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("Re-using existing connection").count(),
        9,
        "{err}"
    );
}

#[tokio::test]
async fn curl_unknown_host_fails_closed() {
    if !have_curl() {
        return;
    }
    let e = env(Opts::default()).await;
    let port = e.relay_addr.port();
    let (_, err, ok) = curl(
        &e,
        &[
            "--resolve",
            &format!("other.example.org:{port}:127.0.0.1"),
            &format!("https://other.example.org:{port}/"),
        ],
    )
    .await;
    assert!(!ok, "an unknown host must not be reachable: {err}");
}
