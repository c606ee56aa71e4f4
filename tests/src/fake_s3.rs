//! A fake S3-ish HTTPS endpoint on loopback that checks AWS SigV4 the way
//! an AWS service does, with botocore as the independent reference: each
//! request it receives goes to `support/sigv4_check.py` with the real keys
//! and the scope it expects, and it answers 200 (`verified`) only if that
//! says the signature matches, else 403 with the reason (as S3's
//! `SignatureDoesNotMatch`). Its certificate comes from a [`TestCa`] only
//! the tokenizer side trusts, like [`crate::loopback::LoopbackUpstream`].

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot::tokenizer::UpstreamClientConfig;
use serde_json::{json, Value};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::loopback::{full, TestBody};
use crate::testca::TestCa;

/// What the fake expects: the real keys and the scope it serves.
#[derive(Clone, Debug)]
pub struct Sigv4Service {
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub service: String,
}

/// One request as received, with botocore's verdict on it.
#[derive(Clone, Debug)]
pub struct Checked {
    pub method: String,
    /// Path and query as received.
    pub target: String,
    /// Header names lower-case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `sigv4_check.py`'s JSON: ok, reason, signed_headers, credential.
    pub verdict: Value,
}

impl Checked {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn ok(&self) -> bool {
        self.verdict["ok"] == true
    }
}

/// The fake, HTTP/1.1 and HTTP/2 by ALPN, on 127.0.0.1; stopped on drop.
pub struct FakeS3 {
    pub addr: SocketAddr,
    names: Vec<String>,
    ca: TestCa,
    seen: Arc<Mutex<Vec<Checked>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The script that checks a request (run with python3; needs botocore).
pub fn check_script() -> std::path::PathBuf {
    crate::support_dir().join("sigv4_check.py")
}

impl FakeS3 {
    pub async fn start(names: &[&str], expect: Sigv4Service) -> FakeS3 {
        let ca = TestCa::new("proxypilot fake S3 CA");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(ca.server_config(names, &[b"h2", b"http/1.1"]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Checked>>> = Arc::default();
        let seen2 = seen.clone();
        let expect = Arc::new(expect);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, expect) = (acceptor.clone(), seen2.clone(), expect.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (seen, expect) = (seen.clone(), expect.clone());
                        async move { Ok::<_, Infallible>(handle(req, &seen, &expect).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeS3 {
            addr,
            names: names.iter().map(|n| n.to_string()).collect(),
            ca,
            seen,
            task,
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Checked> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Checked {
        self.seen().pop().expect("the fake S3 received no request")
    }

    /// A tokenizer client config that reaches this fake as each of its
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
    seen: &Mutex<Vec<Checked>>,
    expect: &Sigv4Service,
) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // HTTP/2 carries the host as :authority.
    let authority = parts.uri.authority().map(|a| a.to_string());
    let host = match (headers.iter().find(|(k, _)| k == "host"), authority) {
        (Some((_, h)), _) => h.clone(),
        (None, Some(a)) => {
            headers.push(("host".into(), a.clone()));
            a
        }
        (None, None) => String::new(),
    };
    let input = json!({
        "method": parts.method.as_str(),
        "url": format!("https://{host}{target}"),
        "headers": headers,
        "body_b64": base64::engine::general_purpose::STANDARD.encode(&body),
        "access_key": expect.access_key,
        "secret_key": expect.secret_key,
        "region": expect.region,
        "service": expect.service,
    });
    let verdict = tokio::task::spawn_blocking(move || run_check(&input))
        .await
        .expect("the check thread panicked");
    let ok = verdict["ok"] == true;
    seen.lock().unwrap().push(Checked {
        method: parts.method.to_string(),
        target,
        headers,
        body,
        verdict: verdict.clone(),
    });
    Response::builder()
        .status(if ok { 200 } else { 403 })
        .header("content-type", "application/json")
        .header("x-upstream", "fake-s3")
        .body(full(verdict.to_string()))
        .unwrap()
}

fn run_check(input: &Value) -> Value {
    let mut child = Command::new("python3")
        .arg(check_script())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sigv4_check.py failed ({}); is botocore installed? (cargo xtask setup)",
        out.status
    );
    serde_json::from_slice(&out.stdout).expect("sigv4_check.py prints JSON")
}
