//! A small HTTPS load generator for the benchmarks (`cargo xtask bench`):
//! hyper over tokio-rustls, verifying the server against one CA file (the
//! proxypilot CA for proxied runs, the test CA for direct ones, mitmproxy's
//! for mitmproxy; verification is never skipped).
//!
//! Modes (see [`Spec`]):
//! - `keepalive`: N connections, each sending requests back to back on one
//!   keep-alive connection for a fixed time (after a warm-up); reports
//!   req/s and latency percentiles;
//! - `newconn`: N workers, each looping connect + TLS handshake + one
//!   request + close; reports connections per second;
//! - `sse`: time from sending a request to the first event of an SSE
//!   stream, on a warm keep-alive connection;
//! - `download`: throughput of one large streamed body;
//! - `hold`: opens N connections (one request each), reports, then keeps
//!   them idle until stdin closes, so the caller can read the proxy's RSS.
//!
//! The benchmark runs this in a child process (the bench binary
//! re-executed, inside the sandbox cgroup when proxypilot is measured), with
//! the [`Spec`] as JSON on the command line and the [`Report`] as JSON on
//! stdout.

use std::{
    io::{self, BufRead},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio_rustls::TlsConnector;

/// What to connect to and how.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` to resolve (through the stub DNS in the sandbox) or an
    /// `ip:port` to connect to.
    pub connect: String,
    /// TLS server name (SNI and the name the certificate must carry), also
    /// the `Host` header.
    pub server_name: String,
    /// The one CA the client trusts.
    pub ca_pem: PathBuf,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Offer only h2 instead of only http/1.1.
    pub h2: bool,
}

/// One measurement.
#[derive(Clone, Debug)]
pub enum Mode {
    KeepAlive {
        conns: usize,
        warmup: Duration,
        duration: Duration,
        path: String,
    },
    NewConn {
        conns: usize,
        duration: Duration,
        path: String,
    },
    Sse {
        iterations: usize,
        path: String,
    },
    Download {
        path: String,
        expect_bytes: u64,
    },
    Hold {
        conns: usize,
        path: String,
    },
    /// One WebSocket (the fake Realtime endpoint at `path`): round trips
    /// of a small text frame, one at a time.
    WsRoundTrip {
        iterations: usize,
        path: String,
    },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub target: Target,
    pub mode: Mode,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Spec {
    pub fn to_json(&self) -> Value {
        let t = &self.target;
        let target = json!({
            "connect": t.connect, "server_name": t.server_name,
            "ca_pem": t.ca_pem.display().to_string(), "headers": t.headers, "h2": t.h2,
        });
        let mode = match &self.mode {
            Mode::KeepAlive {
                conns,
                warmup,
                duration,
                path,
            } => json!({"kind": "keepalive",
                "conns": conns, "warmup_ms": ms(*warmup), "duration_ms": ms(*duration), "path": path}),
            Mode::NewConn {
                conns,
                duration,
                path,
            } => json!({"kind": "newconn",
                "conns": conns, "duration_ms": ms(*duration), "path": path}),
            Mode::Sse { iterations, path } => {
                json!({"kind": "sse", "iterations": iterations, "path": path})
            }
            Mode::Download { path, expect_bytes } => json!({"kind": "download",
                "path": path, "expect_bytes": expect_bytes}),
            Mode::Hold { conns, path } => json!({"kind": "hold", "conns": conns, "path": path}),
            Mode::WsRoundTrip { iterations, path } => {
                json!({"kind": "ws", "iterations": iterations, "path": path})
            }
        };
        json!({"target": target, "mode": mode})
    }

    pub fn from_json(v: &Value) -> Result<Spec, String> {
        let s = |v: &Value, k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("spec: missing string {k}"))
        };
        let n = |v: &Value, k: &str| -> Result<u64, String> {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("spec: missing number {k}"))
        };
        let t = v.get("target").ok_or("spec: no target")?;
        let headers = t
            .get("headers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| {
                        Some((
                            p.get(0)?.as_str()?.to_owned(),
                            p.get(1)?.as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let target = Target {
            connect: s(t, "connect")?,
            server_name: s(t, "server_name")?,
            ca_pem: PathBuf::from(s(t, "ca_pem")?),
            headers,
            h2: t.get("h2").and_then(Value::as_bool).unwrap_or(false),
        };
        let m = v.get("mode").ok_or("spec: no mode")?;
        let dur = |k: &str| n(m, k).map(Duration::from_millis);
        let mode = match s(m, "kind")?.as_str() {
            "keepalive" => Mode::KeepAlive {
                conns: n(m, "conns")? as usize,
                warmup: dur("warmup_ms")?,
                duration: dur("duration_ms")?,
                path: s(m, "path")?,
            },
            "newconn" => Mode::NewConn {
                conns: n(m, "conns")? as usize,
                duration: dur("duration_ms")?,
                path: s(m, "path")?,
            },
            "sse" => Mode::Sse {
                iterations: n(m, "iterations")? as usize,
                path: s(m, "path")?,
            },
            "download" => Mode::Download {
                path: s(m, "path")?,
                expect_bytes: n(m, "expect_bytes")?,
            },
            "hold" => Mode::Hold {
                conns: n(m, "conns")? as usize,
                path: s(m, "path")?,
            },
            "ws" => Mode::WsRoundTrip {
                iterations: n(m, "iterations")? as usize,
                path: s(m, "path")?,
            },
            k => return Err(format!("spec: unknown mode {k}")),
        };
        Ok(Spec { target, mode })
    }
}

/// Latencies in microseconds, sorted.
#[derive(Clone, Debug, Default)]
pub struct Latencies(pub Vec<u32>);

impl Latencies {
    pub fn from_unsorted(mut v: Vec<u32>) -> Latencies {
        v.sort_unstable();
        Latencies(v)
    }

    /// The `q`-quantile (0..=1), nearest rank; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1] as f64
    }

    pub fn mean(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.iter().map(|&v| v as f64).sum::<f64>() / self.0.len() as f64
    }
}

/// A connected client: resolved address, TLS settings, headers.
pub struct Client {
    addr: SocketAddr,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    host: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    h2: bool,
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Client {
    pub async fn new(t: &Target) -> Result<Client, BoxError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&t.ca_pem)
            .map_err(|e| format!("reading {}: {e}", t.ca_pem.display()))?
        {
            roots.add(c?)?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::testca::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = if t.h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        // Resolve once (the stub DNS in the sandbox); prefer IPv4.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&t.connect).await?.collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("{} resolved to nothing", t.connect))?;
        let headers = t
            .headers
            .iter()
            .map(|(k, v)| -> Result<_, BoxError> {
                Ok((
                    HeaderName::try_from(k.as_str())?,
                    HeaderValue::try_from(v.as_str())?,
                ))
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        Ok(Client {
            addr,
            tls: TlsConnector::from(Arc::new(cfg)),
            server_name: ServerName::try_from(t.server_name.clone())?,
            host: t.server_name.clone(),
            headers,
            h2: t.h2,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connect, TLS handshake (verified), HTTP handshake.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await?;
        let io = TokioIo::new(tls);
        if self.h2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = http1::handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(s))
        }
    }

    fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        let mut b = Request::get(path);
        if !self.h2 {
            b = b.header(http::header::HOST, self.host.as_str());
        } else {
            b = Request::get(format!("https://{}{path}", self.host));
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Empty::new()).expect("request")
    }

    /// One request, body drained; Ok(bytes) only for a 200.
    async fn get(&self, s: &mut Sender, path: &str) -> Result<u64, BoxError> {
        let resp = s.send(self.request(path)).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            if let Some(d) = f?.data_ref() {
                n += d.len() as u64;
            }
        }
        if status != http::StatusCode::OK {
            return Err(format!("status {status}").into());
        }
        Ok(n)
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Requests (or connections, or iterations) in the measured window.
    pub count: u64,
    /// Everything done, warm-up included.
    pub total: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Per second over the measured window.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    /// Download: bytes and MB/s (10^6 bytes).
    pub bytes: u64,
    pub mb_per_s: f64,
}

impl Report {
    pub fn to_json(&self) -> Value {
        json!({"count": self.count, "total": self.total, "errors": self.errors,
               "first_error": self.first_error, "seconds": self.seconds, "rate": self.rate,
               "p50_us": self.p50_us, "p99_us": self.p99_us, "mean_us": self.mean_us,
               "bytes": self.bytes, "mb_per_s": self.mb_per_s})
    }

    pub fn from_json(v: &Value) -> Report {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Report {
            count: u("count"),
            total: u("total"),
            errors: u("errors"),
            first_error: v
                .get("first_error")
                .and_then(Value::as_str)
                .map(str::to_owned),
            seconds: f("seconds"),
            rate: f("rate"),
            p50_us: f("p50_us"),
            p99_us: f("p99_us"),
            mean_us: f("mean_us"),
            bytes: u("bytes"),
            mb_per_s: f("mb_per_s"),
        }
    }

    fn with_latencies(mut self, l: &Latencies) -> Report {
        self.p50_us = l.quantile(0.50);
        self.p99_us = l.quantile(0.99);
        self.mean_us = l.mean();
        self
    }
}

#[derive(Default)]
struct Worker {
    lat: Vec<u32>,
    count: u64,
    total: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Worker {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// Runs one measurement (in the current tokio runtime).
pub async fn run(spec: &Spec) -> Result<Report, BoxError> {
    let client = Arc::new(Client::new(&spec.target).await?);
    match spec.mode.clone() {
        Mode::KeepAlive {
            conns,
            warmup,
            duration,
            path,
        } => keepalive(client, conns, warmup, duration, path).await,
        Mode::NewConn {
            conns,
            duration,
            path,
        } => newconn(client, conns, duration, path).await,
        Mode::Sse { iterations, path } => sse(&client, iterations, &path).await,
        Mode::Download { path, expect_bytes } => download(&client, &path, expect_bytes).await,
        Mode::Hold { conns, path } => hold(client, conns, path).await,
        Mode::WsRoundTrip { iterations, path } => ws_roundtrip(&client, iterations, &path).await,
    }
}

async fn merge(
    tasks: Vec<tokio::task::JoinHandle<Worker>>,
    window: Duration,
) -> Result<Report, BoxError> {
    let mut all = Worker::default();
    for t in tasks {
        let w = t.await?;
        all.lat.extend(w.lat);
        all.count += w.count;
        all.total += w.total;
        all.errors += w.errors;
        if all.first_error.is_none() {
            all.first_error = w.first_error;
        }
    }
    let lat = Latencies::from_unsorted(all.lat);
    let seconds = window.as_secs_f64();
    Ok(Report {
        count: all.count,
        total: all.total,
        errors: all.errors,
        first_error: all.first_error,
        seconds,
        rate: all.count as f64 / seconds,
        ..Default::default()
    }
    .with_latencies(&lat))
}

async fn keepalive(
    client: Arc<Client>,
    conns: usize,
    warmup: Duration,
    duration: Duration,
    path: String,
) -> Result<Report, BoxError> {
    // Connect everything first, so handshakes are not in the window.
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(client.connect().await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let deadline = measure_from + duration;
    let tasks = senders
        .into_iter()
        .map(|mut s| {
            let (client, path) = (client.clone(), path.clone());
            tokio::spawn(async move {
                let mut w = Worker {
                    lat: Vec::with_capacity(4096),
                    ..Default::default()
                };
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break;
                    }
                    match client.get(&mut s, &path).await {
                        Ok(_) => {
                            w.total += 1;
                            if t >= measure_from {
                                w.count += 1;
                                w.lat.push(us(t.elapsed()));
                            }
                        }
                        Err(e) => {
                            w.error(e);
                            match client.connect().await {
                                Ok(n) => s = n,
                                Err(e) => {
                                    w.error(e);
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                    }
                }
                w
            })
        })
        .collect();
    merge(tasks, duration).await
}

async fn newconn(
    client: Arc<Client>,
    conns: usize,
    duration: Duration,
    path: String,
) -> Result<Report, BoxError> {
    // One connection first: the proxy's leaf for the host is then cached.
    let mut s = client.connect().await?;
    client.get(&mut s, &path).await?;
    drop(s);
    let start = Instant::now();
    let deadline = start + duration;
    let tasks = (0..conns)
        .map(|_| {
            let (client, path) = (client.clone(), path.clone());
            tokio::spawn(async move {
                let mut w = Worker::default();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = async {
                        let mut s = client.connect().await?;
                        client.get(&mut s, &path).await
                    }
                    .await;
                    match r {
                        Ok(_) => {
                            w.count += 1;
                            w.total += 1;
                            w.lat.push(us(t.elapsed()));
                        }
                        Err(e) => w.error(e),
                    }
                }
                w
            })
        })
        .collect();
    merge(tasks, duration).await
}

async fn sse(client: &Client, iterations: usize, path: &str) -> Result<Report, BoxError> {
    let mut s = client.connect().await?;
    // Warm the connection and the path.
    client.get(&mut s, path).await?;
    let mut w = Worker::default();
    let start = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        let resp = s.send(client.request(path)).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("sse: status {}", resp.status()).into());
        }
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(f) = body.frame().await {
            if let Some(d) = f?.data_ref() {
                if first.is_none() && !d.is_empty() {
                    first = Some(t.elapsed());
                }
            }
        }
        match first {
            Some(d) => {
                w.count += 1;
                w.lat.push(us(d));
            }
            None => w.error("sse: no event"),
        }
    }
    w.total = w.count;
    let elapsed = start.elapsed();
    let lat = Latencies::from_unsorted(std::mem::take(&mut w.lat));
    Ok(Report {
        count: w.count,
        total: w.total,
        errors: w.errors,
        first_error: w.first_error,
        seconds: elapsed.as_secs_f64(),
        rate: w.count as f64 / elapsed.as_secs_f64(),
        ..Default::default()
    }
    .with_latencies(&lat))
}

async fn ws_roundtrip(client: &Client, iterations: usize, path: &str) -> Result<Report, BoxError> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = tokio::net::TcpStream::connect(client.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = client.tls.connect(client.server_name.clone(), tcp).await?;
    let mut req = format!("wss://{}{path}", client.host).into_client_request()?;
    for (k, v) in &client.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    // The server's session.created first; then warm up.
    ws.next()
        .await
        .ok_or("ws: closed before session.created")??;
    for _ in 0..10 {
        ws_round_trip(&mut ws).await?;
    }
    let mut w = Worker::default();
    let start = Instant::now();
    for _ in 0..iterations {
        match ws_round_trip(&mut ws).await {
            Ok(d) => {
                w.count += 1;
                w.lat.push(us(d));
            }
            Err(e) => w.error(e),
        }
    }
    w.total = w.count;
    let elapsed = start.elapsed();
    let _ = ws.close(None).await;
    let lat = Latencies::from_unsorted(std::mem::take(&mut w.lat));
    Ok(Report {
        count: w.count,
        total: w.total,
        errors: w.errors,
        first_error: w.first_error,
        seconds: elapsed.as_secs_f64(),
        rate: w.count as f64 / elapsed.as_secs_f64(),
        ..Default::default()
    }
    .with_latencies(&lat))
}

/// Sends a small text frame and waits for the next text frame (the echo).
async fn ws_round_trip<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Result<Duration, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let t = Instant::now();
    ws.send(Message::text("ping 0123456789abcdef")).await?;
    loop {
        if let Message::Text(_) = ws.next().await.ok_or("ws: closed")?? {
            return Ok(t.elapsed());
        }
    }
}

async fn download(client: &Client, path: &str, expect: u64) -> Result<Report, BoxError> {
    let mut s = client.connect().await?;
    // Warm the connection with a small request first.
    client.get(&mut s, "/echo").await?;
    let t = Instant::now();
    let n = client.get(&mut s, path).await?;
    let secs = t.elapsed().as_secs_f64();
    if n != expect {
        return Err(format!("download: got {n} bytes, expected {expect}").into());
    }
    Ok(Report {
        count: 1,
        total: 1,
        seconds: secs,
        rate: 1.0 / secs,
        bytes: n,
        mb_per_s: n as f64 / 1e6 / secs,
        ..Default::default()
    })
}

/// Opens `conns` connections (one request each, a few at a time), prints
/// `held N` on stdout, then keeps them open until stdin reaches EOF.
async fn hold(client: Arc<Client>, conns: usize, path: String) -> Result<Report, BoxError> {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let per = 32usize;
    let mut held = Vec::with_capacity(conns);
    let mut w = Worker::default();
    let mut i = 0;
    while i < conns {
        let batch = per.min(conns - i);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let (client, path, done) = (client.clone(), path.clone(), done.clone());
                tokio::spawn(async move {
                    let mut s = client.connect().await?;
                    client.get(&mut s, &path).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, BoxError>(s)
                })
            })
            .collect();
        for t in tasks {
            match t.await? {
                Ok(s) => held.push(s),
                Err(e) => w.error(e),
            }
        }
        i += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("held {}", held.len());
    use std::io::Write;
    io::stdout().flush()?;
    // Wait for the caller (stdin EOF or a line) off the runtime.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
    })
    .await?;
    let n = held.len() as u64;
    drop(held);
    Ok(Report {
        count: n,
        total: n,
        errors: w.errors,
        first_error: w.first_error,
        seconds: secs,
        rate: n as f64 / secs,
        ..Default::default()
    })
}

/// Entry point of a client process: parses the spec, runs it on a
/// two-worker runtime and prints `report <json>` on stdout.
pub fn client_main(spec_json: &str) -> i32 {
    let spec = match serde_json::from_str::<Value>(spec_json)
        .map_err(|e| e.to_string())
        .and_then(|v| Spec::from_json(&v))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return 2;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(&spec)) {
        Ok(r) => {
            println!("report {}", r.to_json());
            0
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            1
        }
    }
}

/// Parses the `report <json>` line of a client's stdout.
pub fn parse_report(stdout: &str) -> Option<Report> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("report "))
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .map(|v| Report::from_json(&v))
}
