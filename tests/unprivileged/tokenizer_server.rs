//! The standalone tokenizer end to end on loopback, against a fake HTTPS
//! upstream with a test CA; plus the (ignored) benchmark.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use proxypilot::tokenizer::secret::{
    BearerAuth, FlySrcAuth, FmtDst, InjectBodyProcessor, InjectHmacProcessor, InjectProcessor,
    NoAuth, SecretBytes, SecretString,
};
use proxypilot::tokenizer::{
    flysrc, seal, Engine, FlySrcVerifier, OpenKey, Secret, UpstreamClient,
};
use proxypilot_tests::loopback::{
    new_engine, proxy_get as get, start_tokenizer, LoopbackUpstream, ProxyConn, Seen,
};
use proxypilot_tests::testca::TestCa;
use sha2::Digest;

const UPSTREAM_HOST: &str = "api.example.test";

async fn start_upstream() -> LoopbackUpstream {
    LoopbackUpstream::start(&[UPSTREAM_HOST]).await
}

fn api_key_secret(token: &str) -> Secret {
    Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new(token),
            fmt_dst: FmtDst {
                dst: "x-api-key".into(),
                fmt: "%s".into(),
                ..Default::default()
            },
        }),
        bearer_auth: Some(BearerAuth {
            digest: SecretBytes::new(sha2::Sha256::digest(b"proxy-pass").to_vec()),
        }),
        allowed_hosts: Some(vec![UPSTREAM_HOST.into()]),
        ..Default::default()
    }
}

fn assert_no_proxy_headers(seen: &Seen) {
    for name in seen.headers.keys() {
        assert!(
            !name.as_str().starts_with("proxy-"),
            "upstream received {name}"
        );
    }
}

#[tokio::test]
async fn injects_header_end_to_end() {
    for http2 in [true, false] {
        let up = start_upstream().await;
        let tk = start_tokenizer(new_engine(), up.client_config(http2), false).await;
        let sealed = seal(tk.engine.seal_key(), &api_key_secret("sk-real-123"));
        let mut c = ProxyConn::connect(tk.addr).await;
        for i in 0..3 {
            let uri = format!("http://{UPSTREAM_HOST}/v1/messages?n={i}");
            let (status, headers, body) = c
                .send(get(
                    &uri,
                    &[
                        ("proxy-tokenizer", &sealed),
                        ("proxy-authorization", "Bearer proxy-pass"),
                        ("proxy-connection", "keep-alive"),
                        ("x-api-key", "dummy"),
                        ("user-agent", "test"),
                    ],
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(headers["x-upstream"], "fake");
            let seen = up.last();
            assert_eq!(seen.headers["x-api-key"], "sk-real-123");
            assert_eq!(seen.headers.get_all("x-api-key").iter().count(), 1);
            assert_eq!(seen.headers["user-agent"], "test");
            assert_no_proxy_headers(&seen);
            assert_eq!(seen.method, "GET");
            assert!(
                seen.uri.ends_with(&format!("/v1/messages?n={i}")),
                "{}",
                seen.uri
            );
            if http2 {
                assert_eq!(seen.version, Version::HTTP_2);
            } else {
                assert_eq!(seen.version, Version::HTTP_11);
                assert_eq!(seen.headers["host"], UPSTREAM_HOST);
            }
        }
        assert_eq!(up.count(), 3);
    }
}

#[tokio::test]
async fn body_processors_end_to_end() {
    let up = start_upstream().await;
    let tk = start_tokenizer(new_engine(), up.client_config(true), false).await;
    let body_secret = Secret {
        inject_body_processor: Some(InjectBodyProcessor {
            token: SecretString::new("REAL"),
            placeholder: "{{K}}".into(),
        }),
        no_auth: Some(NoAuth {}),
        allowed_hosts: Some(vec![UPSTREAM_HOST.into()]),
        ..Default::default()
    };
    let sealed = seal(tk.engine.seal_key(), &body_secret);
    let mut c = ProxyConn::connect(tk.addr).await;
    let big = format!("{}{{{{K}}}}{}", "a".repeat(100_000), "b".repeat(100_000));
    let req = Request::post(format!("http://{UPSTREAM_HOST}/mirror/upload"))
        .header("host", UPSTREAM_HOST)
        .header("proxy-tokenizer", &sealed)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let (status, _, echoed) = c.send(req).await;
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(echoed, big.replace("{{K}}", "REAL"));
    assert_eq!(up.last().body, big.replace("{{K}}", "REAL"));

    let hmac_secret = Secret {
        inject_hmac_processor: Some(InjectHmacProcessor {
            key: SecretBytes::new(b"hk".to_vec()),
            hash: "sha256".into(),
            fmt_dst: FmtDst::default(),
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let sealed = seal(tk.engine.seal_key(), &hmac_secret);
    let req = Request::post(format!("http://{UPSTREAM_HOST}/sign"))
        .header("host", UPSTREAM_HOST)
        .header("proxy-tokenizer", &sealed)
        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
        .unwrap();
    let (status, _, _) = c.send(req).await;
    assert_eq!(status, 200);
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hk").unwrap();
    m.update(b"{\"a\":1}");
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {}", hex::encode(m.finalize().into_bytes())).as_str()
    );
    assert_eq!(up.last().headers["content-length"], "7");
}

#[tokio::test]
async fn refusals() {
    let up = start_upstream().await;
    let tk = start_tokenizer(new_engine(), up.client_config(true), false).await;
    let sealed = seal(tk.engine.seal_key(), &api_key_secret("sk-real-123"));
    let mut c = ProxyConn::connect(tk.addr).await;
    let pa = ("proxy-authorization", "Bearer proxy-pass");
    let base = format!("http://{UPSTREAM_HOST}/");

    // No sealed secret, not an open proxy.
    let (s, _, b) = c.send(get(&base, &[])).await;
    assert_eq!(s, 400);
    assert!(b.contains("no Proxy-Tokenizer header"), "{b}");
    // Wrong proxy auth.
    let (s, _, b) = c
        .send(get(
            &base,
            &[
                ("proxy-tokenizer", &sealed),
                ("proxy-authorization", "Bearer nope"),
            ],
        ))
        .await;
    assert_eq!(s, 407);
    assert!(
        b.starts_with("unauthorized to use secret: not authorized: bad or missing proxy auth"),
        "{b}"
    );
    // Another host than the secret's.
    let (s, _, b) = c
        .send(get(
            "http://other.example.test/",
            &[("proxy-tokenizer", &sealed), pa],
        ))
        .await;
    assert_eq!(s, 400);
    assert!(b.contains("secret not valid for other.example.test"), "{b}");
    // Port 443 in absolute-form, https scheme, origin-form.
    let (s, _, b) = c
        .send(get(
            &format!("http://{UPSTREAM_HOST}:443/"),
            &[("proxy-tokenizer", &sealed), pa],
        ))
        .await;
    assert_eq!(s, 400);
    assert!(b.contains("proxied request must be HTTP"), "{b}");
    let (s, _, b) = c
        .send(get(
            &format!("https://{UPSTREAM_HOST}/"),
            &[("proxy-tokenizer", &sealed), pa],
        ))
        .await;
    assert_eq!(s, 400);
    assert!(b.contains("proxied request must be HTTP"), "{b}");
    let (s, _, b) = c
        .send(get(
            "/v1",
            &[("host", UPSTREAM_HOST), ("proxy-tokenizer", &sealed), pa],
        ))
        .await;
    assert_eq!(s, 400);
    assert!(b.contains("I'm not that kind of server"), "{b}");
    // A secret sealed to another key.
    let other = seal(&OpenKey::generate().seal_key(), &api_key_secret("x"));
    let (s, _, b) = c.send(get(&base, &[("proxy-tokenizer", &other), pa])).await;
    assert_eq!(s, 400);
    assert!(b.contains("failed Proxy-Tokenizer decryption"), "{b}");
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    // CONNECT to 443 (its own connection: a refused CONNECT ends it).
    let mut c2 = ProxyConn::connect(tk.addr).await;
    let req = Request::connect(format!("{UPSTREAM_HOST}:443"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (s, _, b) = c2.send(req).await;
    assert_eq!(s, 400);
    assert!(b.contains("CONNECT to port 443 is refused"), "{b}");
    // CONNECT to another port: Go's tokenizer tunnels it; ours refuses it
    // (documented in the README), and nothing is dialled.
    let mut c3 = ProxyConn::connect(tk.addr).await;
    let req = Request::connect(format!("{UPSTREAM_HOST}:8443"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (s, _, b) = c3.send(req).await;
    assert_eq!(s, 400);
    assert!(b.contains("CONNECT is not supported"), "{b}");
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    // The connection is still usable after refusals.
    let (s, _, _) = c
        .send(get(&base, &[("proxy-tokenizer", &sealed), pa]))
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn open_proxy_forwards_without_secret() {
    let up = start_upstream().await;
    let tk = start_tokenizer(new_engine(), up.client_config(true), true).await;
    let mut c = ProxyConn::connect(tk.addr).await;
    let (s, _, _) = c
        .send(get(
            &format!("http://{UPSTREAM_HOST}/open"),
            &[("proxy-authorization", "Bearer x")],
        ))
        .await;
    assert_eq!(s, 200);
    assert_no_proxy_headers(&up.last());
}

#[tokio::test]
async fn upstream_failures_are_502() {
    let up = start_upstream().await;
    // Trusting no CA for the upstream: the TLS handshake fails.
    let mut cfg = up.client_config(true);
    cfg.extra_ca_pem = vec![TestCa::new("a CA nobody used").pem()];
    let tk = start_tokenizer(new_engine(), cfg, true).await;
    let mut c = ProxyConn::connect(tk.addr).await;
    let (s, _, b) = c.send(get(&format!("http://{UPSTREAM_HOST}/"), &[])).await;
    assert_eq!(s, 502);
    assert!(
        b.contains("TLS handshake") && b.contains("certificate"),
        "{b}"
    );
    assert_eq!(up.count(), 0);

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = up.client_config(true);
    cfg.resolve.insert(format!("{UPSTREAM_HOST}:443"), closed);
    let tk = start_tokenizer(new_engine(), cfg, true).await;
    let mut c = ProxyConn::connect(tk.addr).await;
    let (s, _, b) = c.send(get(&format!("http://{UPSTREAM_HOST}/"), &[])).await;
    assert_eq!(s, 502);
    assert!(b.starts_with("bad gateway: request to upstream"), "{b}");
}

#[tokio::test]
async fn fly_src_end_to_end() {
    let up = start_upstream().await;
    let sk = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let engine = Engine::new(OpenKey::generate()).with_fly_src_verifier(
        FlySrcVerifier::from_hex(&hex::encode(sk.verifying_key().to_bytes())).unwrap(),
    );
    let tk = start_tokenizer(engine, up.client_config(true), false).await;
    let s = Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new("fly-tok"),
            ..Default::default()
        }),
        fly_src_auth: Some(FlySrcAuth {
            allowed_orgs: Some(vec!["o".into()]),
            allowed_apps: Some(vec!["a".into()]),
            allowed_instances: None,
        }),
        allowed_hosts: Some(vec![UPSTREAM_HOST.into()]),
        ..Default::default()
    };
    let sealed = seal(tk.engine.seal_key(), &s);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let src = format!("instance=i;app=a;org=o;ts={now}");
    let mut c = ProxyConn::connect(tk.addr).await;
    let uri = format!("http://{UPSTREAM_HOST}/");
    let (s, _, b) = c
        .send(get(
            &uri,
            &[
                ("proxy-tokenizer", &sealed),
                ("fly-src", &src),
                ("fly-src-signature", &flysrc::sign(&sk, &src)),
            ],
        ))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(up.last().headers["authorization"], "Bearer fly-tok");
    let (s, _, _) = c
        .send(get(
            &uri,
            &[("proxy-tokenizer", &sealed), ("fly-src", &src)],
        ))
        .await;
    assert_eq!(s, 407);
}

/// Benchmark: unseal+process per request, and requests/s through the
/// tokenizer vs direct to the same fake upstream.
///
/// CARGO_TARGET_DIR=... cargo test --release -p proxypilot-tests \
///   --test unprivileged -- --ignored --nocapture bench
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_tokenizer() {
    // 1. Engine alone: first use of a sealed secret (unseal + parse +
    // auth + validate + inject) and repeated use (opened-secret cache hit).
    let engine = new_engine();
    let n = 2000;
    let distinct: Vec<String> = (0..n)
        .map(|i| seal(engine.seal_key(), &api_key_secret(&format!("sk-{i}"))))
        .collect();
    let head = |sealed: &str| {
        get(
            &format!("http://{UPSTREAM_HOST}/"),
            &[
                ("proxy-tokenizer", sealed),
                ("proxy-authorization", "Bearer proxy-pass"),
            ],
        )
        .into_parts()
        .0
    };
    let mut heads: Vec<_> = distinct.iter().map(|s| head(s)).collect();
    let start = Instant::now();
    for p in heads.iter_mut() {
        engine.apply(p).unwrap();
    }
    let cold = start.elapsed() / n as u32;
    let sealed = seal(engine.seal_key(), &api_key_secret("sk-real-123"));
    let mut heads: Vec<_> = (0..n).map(|_| head(&sealed)).collect();
    let start = Instant::now();
    for p in heads.iter_mut() {
        engine.apply(p).unwrap();
    }
    let warm = start.elapsed() / n as u32;
    println!("engine, first use of a sealed secret (unseal+parse+auth+validate+inject): {:.1} µs/request", cold.as_secs_f64() * 1e6);
    println!("engine, repeated sealed secret (cached open; auth+validate+inject):       {:.1} µs/request", warm.as_secs_f64() * 1e6);

    // 2. Through the tokenizer vs direct, with C concurrent keep-alive clients.
    let up = start_upstream().await;
    let tk = start_tokenizer(engine, up.client_config(false), false).await;
    let dur = Duration::from_secs(3);
    let conc = 8;

    let direct_client = UpstreamClient::new(&up.client_config(false)).unwrap();
    let direct = run_load(conc, dur, move |_| {
        let c = direct_client.clone();
        async move {
            let req = Request::get(format!("https://{UPSTREAM_HOST}/"))
                .body(
                    Full::new(Bytes::new())
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                )
                .unwrap();
            let resp = c.send(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
    })
    .await;

    let addr = tk.addr;
    let mut conns = Vec::new();
    for _ in 0..conc {
        conns.push(std::sync::Arc::new(tokio::sync::Mutex::new(
            ProxyConn::connect(addr).await,
        )));
    }
    let sealed2 = sealed.clone();
    let via = run_load(conc, dur, move |i| {
        let conn = conns[i].clone();
        let sealed = sealed2.clone();
        async move {
            let mut c = conn.lock().await;
            let (s, _, _) = c
                .send(get(
                    &format!("http://{UPSTREAM_HOST}/"),
                    &[
                        ("proxy-tokenizer", &sealed),
                        ("proxy-authorization", "Bearer proxy-pass"),
                    ],
                ))
                .await;
            assert_eq!(s, 200);
        }
    })
    .await;
    println!("direct to upstream (pooled h1 TLS client, {conc} concurrent): {direct:.0} req/s");
    println!("through tokenizer  (h1 keep-alive proxy, {conc} concurrent):  {via:.0} req/s");
    println!("ratio tokenizer/direct: {:.2}", via / direct);
}

async fn run_load<F, Fut>(conc: usize, dur: Duration, f: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = std::sync::Arc::new(f);
    // Warm up the pools.
    for i in 0..conc {
        f(i).await;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conc {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < dur {
                f(i).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The embedded front door: the relay hands `forward_request` the same
/// absolute-form request it would send a remote tokenizer, from a spawned
/// task, with a boxed body.
#[tokio::test]
async fn embedded_forward_request() {
    use proxypilot::tokenizer::{forward_request, ProxyBody, TokenizerService};
    let up = start_upstream().await;
    let engine = std::sync::Arc::new(new_engine());
    let cfg = TokenizerService {
        engine: engine.clone(),
        client: UpstreamClient::new(&up.client_config(true)).unwrap(),
        open_proxy: false,
    };
    let sealed = seal(engine.seal_key(), &api_key_secret("sk-embedded"));
    let body: ProxyBody = Full::new(Bytes::from_static(b"hi"))
        .map_err(|e| match e {})
        .boxed_unsync();
    let req = Request::post(format!("http://{UPSTREAM_HOST}/mirror/e"))
        .header("host", UPSTREAM_HOST)
        .header("proxy-tokenizer", &sealed)
        .header("proxy-authorization", "Bearer proxy-pass")
        .header("fly-src-optin", "*")
        .header("fly-client-ip", "10.0.0.1")
        .header("fly-forwarded-proto", "https")
        .header("fly-region", "ams")
        .header("fly-request-id", "01J-request")
        .header("fly-traceparent", "00-abc-def-01")
        .body(body)
        .unwrap();
    let f = tokio::spawn(async move { forward_request(&cfg, req).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((f.response.status().as_u16(), f.secrets), (200, 1));
    assert_eq!(
        f.injected.0.len(),
        1,
        "the injected token is reported for redaction"
    );
    assert_eq!(
        f.response.into_body().collect().await.unwrap().to_bytes(),
        "hi"
    );
    assert_eq!(up.last().headers["x-api-key"], "sk-embedded");
    assert_no_proxy_headers(&up.last());
    // Fly's hop headers stop at the tokenizer, as Fly's image filters them.
    for name in up.last().headers.keys() {
        assert!(
            !name.as_str().starts_with("fly-"),
            "upstream received {name}"
        );
    }
}
