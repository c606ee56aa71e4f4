//! The soak (issue 8, part 4): drives many requests (1,000,000 by default)
//! through `proxypilot sidecar` (Fly shape, embedded tokenizer by default)
//! over a mix of keep-alive and new connections, HTTP/1.1 and HTTP/2, with
//! some clients dying mid-request, and reports:
//! - the sidecar's heap in use, from `/stats`: the leak check. Caches and
//!   pools still fill a little after the warm-up (growth that slows down),
//!   while a leak grows with the work done, so the second half of the run
//!   may add at most 1% of the starting heap (a leak of one byte every ten
//!   requests would add 1% here);
//! - its RSS at start and end (growth ≤ 15%: RSS also keeps the
//!   allocator's high-water marks, which moved it by +4% to +12% from run
//!   to run of the same build),
//! - its open descriptors at start and end (must be equal),
//! - entries left in the pinned SOCK_ORIGIN / PEER_ORIGIN maps (must be 0),
//! - the leaf-certificate cache and open connections, from the sidecar's
//!   `/stats` on the info port,
//! - error counts by kind.
//!
//! Not run in CI. Build in release and run as root:
//!
//! ```text
//! cargo build --release --bins && target/release/soak [--requests N]
//!     [--conns C] [--mode embedded|remote|both]
//! ```
//!
//! The client is this binary re-executed inside the sandbox cgroup
//! (`soak client <json>`), a hyper + tokio-rustls client that trusts only
//! proxypilot's CA. "Start" figures are taken after a warm-up (caches and
//! pools filled, allocator settled) once the sidecar is quiet again, "end"
//! figures once it is quiet after the run: idle upstream connections are
//! pooled for up to 90 s, so both wait (bounded) for the descriptor count
//! to come back to what it was when the sidecar became ready.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot_tests::{
    faults_support::{fd_count, rss_kib, wait_maps_empty},
    privileged,
    shapes::{FlyShape, Tokenizer},
    upstream::{FakeInternet, ANTHROPIC, GITHUB, OPENAI},
};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio_rustls::TlsConnector;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client_main(&args[2]);
    }
    let mut requests: u64 = 1_000_000;
    let mut conns: usize = 32;
    let mut modes = vec![Tokenizer::Embedded];
    let mut hostile = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--requests" => {
                requests = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--requests N")
            }
            "--conns" => conns = it.next().and_then(|v| v.parse().ok()).expect("--conns N"),
            "--mode" => {
                modes = match it.next().map(String::as_str) {
                    Some("embedded") => vec![Tokenizer::Embedded],
                    Some("remote") => vec![Tokenizer::Remote],
                    Some("both") => vec![Tokenizer::Embedded, Tokenizer::Remote],
                    other => panic!("--mode embedded|remote|both, not {other:?}"),
                }
            }
            "--hostile" => hostile = true,
            "-h" | "--help" => {
                println!(
                    "soak [--requests N] [--conns C] [--mode embedded|remote|both] [--hostile]"
                );
                return ExitCode::SUCCESS;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if !privileged() {
        return ExitCode::SUCCESS;
    }
    // Per-request logs would only measure the log file.
    std::env::set_var("PROXYPILOT_LOG", "warn");
    let net = FakeInternet::start();
    let mut pass = true;
    for mode in modes {
        pass &= soak(&net, mode, requests, conns, hostile);
    }
    println!("soak: {}", if pass { "PASS" } else { "FAIL" });
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One run in one mode; true when every figure is within its bound.
fn soak(net: &FakeInternet, mode: Tokenizer, requests: u64, conns: usize, hostile: bool) -> bool {
    let name = format!("soak-{mode:?}").to_lowercase();
    let mut fly = FlyShape::start(net, &name, mode, &[]);
    let pid = fly.sidecar.child.id();
    let cg_id = fly.cgroup.id();
    let ready_fds = fd_count(pid);
    let ready_rss = rss_kib(pid);
    println!("== soak, {mode:?} tokenizer: {requests} requests over {conns} concurrent clients");
    println!("sidecar pid {pid}: at ready {ready_rss} KiB RSS, {ready_fds} fds");

    // Warm-up: a tenth of the run with the same mix, so the allocator has
    // seen the run's peak concurrency before "start" is taken (with 2% the
    // RSS still rose through the first quarter, then stayed flat).
    let warm = run_client(net, &fly, (requests / 10).clamp(2_000, 100_000), conns);
    println!("warm-up: {} requests, {} ok", warm["requests"], warm["ok"]);
    let (start_fds, waited) = quiet_fds(pid, ready_fds);
    let start_rss = rss_kib(pid);
    let start_heap = heap_kib(&fly, net);
    println!("start (after warm-up, quiet after {waited:?}): {start_heap} KiB heap in use, {start_rss} KiB RSS, {start_fds} fds");

    // In four segments, with the heap and RSS after each: growth that keeps
    // going is a leak, growth that levels off is the allocator's high-water
    // mark.
    // The hostile mix runs beside the measured run, from the same sandbox.
    let attackers = hostile.then(|| Hostile::start(net, &fly));
    let t = Instant::now();
    let segments = 4u64;
    let mut report = json!({});
    let mut rss_after = Vec::new();
    let mut heap_after = Vec::new();
    for i in 0..segments {
        let n = requests / segments + u64::from(i < requests % segments);
        let part = run_client(net, &fly, n, conns);
        rss_after.push(rss_kib(pid));
        if i == 1 && attackers.is_none() {
            // Mid-run, measured quiet as start and end are (never quiet
            // while the hostile mix holds its connections).
            quiet_fds(pid, start_fds);
        }
        heap_after.push(heap_kib(&fly, net));
        merge(&mut report, &part);
    }
    let elapsed = t.elapsed();
    let mix_rss = rss_kib(pid);
    let hostile_ran = attackers.map(Hostile::stop);
    println!("heap in use after each quarter of the run (KiB): {heap_after:?}");
    println!("RSS after each quarter of the run (KiB): {rss_after:?}");
    let alive = matches!(fly.sidecar.child.try_wait(), Ok(None));
    let (end_fds, waited) = quiet_fds(pid, start_fds);
    let end_rss = rss_kib(pid);
    let end_heap = heap_kib(&fly, net);
    let maps = match wait_maps_empty(cg_id, Duration::from_secs(60)) {
        Ok(()) => [0, 0],
        Err(n) => n,
    };
    let pct = |start: u64, end: u64| (end as f64 - start as f64) / start.max(1) as f64 * 100.0;
    let growth = pct(start_rss, end_rss);
    let heap_growth = pct(start_heap, end_heap);
    let mid_heap = heap_after[1];
    let second_half = (end_heap as f64 - mid_heap as f64) / start_heap.max(1) as f64 * 100.0;

    println!(
        "run: {} requests in {:.1}s ({:.0} req/s) on {} connections ({} HTTP/2)",
        report["requests"],
        elapsed.as_secs_f64(),
        report["requests"].as_f64().unwrap_or(0.0) / elapsed.as_secs_f64(),
        report["connections"],
        report["h2_connections"],
    );
    println!(
        "  ok: {}   killed mid-request on purpose: {}",
        report["ok"], report["killed"]
    );
    println!(
        "  latency of served requests: p50 {} us, p99 {} us (worst quarter)",
        report["p50_us"], report["p99_us"]
    );
    if let Some(ran) = &hostile_ran {
        let sent =
            report["requests"].as_f64().unwrap_or(0.0) - report["killed"].as_f64().unwrap_or(0.0);
        println!(
            "  hostile mix beside it ({ran}): normal clients' success {:.3}%, RSS {mix_rss} KiB at its end",
            report["ok"].as_f64().unwrap_or(0.0) / sent.max(1.0) * 100.0
        );
    }
    println!("  errors by kind: {}", report["errors"]);
    println!("end (quiet after {waited:?}): {end_heap} KiB heap in use, {end_rss} KiB RSS, {end_fds} fds");
    println!("heap in use start {start_heap} KiB -> end {end_heap} KiB: {heap_growth:+.2}%");
    println!("heap in use mid-run {mid_heap} KiB -> end {end_heap} KiB: {second_half:+.2}% of start (bound +1%)");
    println!("RSS start {start_rss} KiB -> end {end_rss} KiB: {growth:+.2}% (bound +15%)");
    println!("open fds start {start_fds} -> end {end_fds} (must be equal)");
    println!(
        "BPF map entries left: SOCK_ORIGIN {}, PEER_ORIGIN {} (must be 0)",
        maps[0], maps[1]
    );
    let stats = fly.stats(net);
    let hosts_used = report["hosts"].as_array().map_or(0, Vec::len) as u64;
    let cached = stats["leaf_certificates_cached"]
        .as_u64()
        .unwrap_or(u64::MAX);
    println!(
        "leaf cache (/stats): {cached} cached of capacity {}, {} minted; {hosts_used} hosts used {}",
        stats["leaf_certificates_capacity"], stats["leaf_certificates_minted"], report["hosts"]
    );
    let open = stats["connections_open"].as_u64().unwrap_or(u64::MAX);
    println!("connections open at the end (/stats): {open} (must be 0)");
    let errors_total: u64 = report["errors"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    let ok = report["ok"].as_u64().unwrap_or(0);
    let sent = report["requests"].as_u64().unwrap_or(0);
    let killed = report["killed"].as_u64().unwrap_or(0);
    println!(
        "accounted: ok {ok} + errors {errors_total} + killed {killed} = {} of {sent} sent",
        ok + errors_total + killed
    );
    let pass = alive
        && ok + errors_total + killed == sent
        && start_heap > 0
        && second_half <= 1.0
        && growth <= 15.0
        && end_fds == start_fds
        && maps == [0, 0]
        && cached <= hosts_used
        && open == 0
        && sent == requests
        && errors_total * 1000 <= sent; // at most 0.1% errors of any kind
    if errors_total > 0 {
        // What the sidecar said about them (it logs warnings only here).
        let log = fly.sidecar_log();
        // Kernel denials are the resolver's UDP address-sorting probes.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("denied: udp"))
            .collect();
        println!(
            "sidecar log: {} lines besides UDP denials; the first 8:",
            lines.len()
        );
        for l in lines.iter().take(8) {
            println!("  {}", l.chars().take(400).collect::<String>());
        }
    }
    println!("sidecar still running: {alive}");
    println!("result ({mode:?}): {}", if pass { "PASS" } else { "FAIL" });
    pass
}

/// The sidecar's heap in use (`/stats`), in KiB; 0 if it does not say.
fn heap_kib(fly: &FlyShape, net: &FakeInternet) -> u64 {
    fly.stats(net)["heap_in_use_bytes"].as_u64().unwrap_or(0) / 1024
}

/// Adds the counters of one client report to `into`.
fn merge(into: &mut Value, part: &Value) {
    for k in ["requests", "ok", "killed", "connections", "h2_connections"] {
        let sum = into[k].as_u64().unwrap_or(0) + part[k].as_u64().unwrap_or(0);
        into[k] = json!(sum);
    }
    for k in ["p50_us", "p99_us"] {
        let worst = into[k]
            .as_u64()
            .unwrap_or(0)
            .max(part[k].as_u64().unwrap_or(0));
        into[k] = json!(worst);
    }
    let mut errors = into["errors"].as_object().cloned().unwrap_or_default();
    for (k, v) in part["errors"].as_object().into_iter().flatten() {
        let sum = errors.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
        errors.insert(k.clone(), json!(sum));
    }
    into["errors"] = Value::Object(errors);
    into["hosts"] = part["hosts"].clone();
}

/// Waits (at most 100 s) until the sidecar has no more descriptors than
/// `target`; returns the count then and how long it took.
fn quiet_fds(pid: u32, target: usize) -> (usize, Duration) {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(100);
    loop {
        let n = fd_count(pid);
        if n <= target || Instant::now() >= deadline {
            // Let the allocator and any last closes settle.
            thread::sleep(Duration::from_secs(1));
            return (fd_count(pid), t.elapsed());
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Slow readers and a connection flood in the sandbox (issue 21), beside
/// the normal clients: four downloads read at 1 KB/s, and one process
/// holding 300 bare connections to an intercepted host, reopening those
/// the relay closes.
struct Hostile(Vec<std::process::Child>);

impl Hostile {
    fn start(net: &FakeInternet, fly: &FlyShape) -> Hostile {
        let mut children = Vec::new();
        for _ in 0..4 {
            children.push(
                fly.sandbox(net, "curl")
                    .args([
                        "-sS",
                        "-o",
                        "/dev/null",
                        "--limit-rate",
                        "1k",
                        "-H",
                        "x-api-key: dummy",
                    ])
                    .arg(format!("https://{ANTHROPIC}/bytes?n=500000000"))
                    .command()
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start a slow reader"),
            );
        }
        let flood = format!(
            "import socket, time\n\
             held = []\n\
             while True:\n\
             \x20   held = [s for s in held if s.fileno() >= 0]\n\
             \x20   while len(held) < 300:\n\
             \x20       try:\n\
             \x20           held.append(socket.create_connection(('{ANTHROPIC}', 443), timeout=2))\n\
             \x20       except OSError:\n\
             \x20           time.sleep(0.05)\n\
             \x20   time.sleep(1)\n\
             \x20   for s in held[:50]:\n\
             \x20       s.close()\n"
        );
        children.push(
            fly.sandbox(net, "python3")
                .args(["-c", &flood])
                .command()
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the connection flood"),
        );
        Hostile(children)
    }

    /// Ends them; says what ran.
    fn stop(self) -> String {
        for mut c in self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        "4 slow readers at 1 KB/s, 300 bare connections held by one process".into()
    }
}

/// Runs the client inside the sandbox and returns its report.
fn run_client(net: &FakeInternet, fly: &FlyShape, requests: u64, conns: usize) -> Value {
    let spec = json!({
        "requests": requests,
        "conns": conns,
        "ca": fly.ca,
        "hosts": [ANTHROPIC, OPENAI, GITHUB],
    });
    let exe = std::env::current_exe().unwrap();
    let out = fly
        .sandbox(net, exe)
        .arg("client")
        .arg(spec.to_string())
        .command()
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the soak client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report "))
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .unwrap_or_else(|| {
            panic!(
                "the soak client failed ({}): {stdout}\n{}",
                out.status,
                fly.sidecar_log()
            )
        });
    report
}

// ---------- the client (inside the sandbox) ----------

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Ctx {
    total: u64,
    issued: AtomicU64,
    ok: AtomicU64,
    killed: AtomicU64,
    connections: AtomicU64,
    h2_connections: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Each served request's time, in microseconds.
    latencies_us: Mutex<Vec<u32>>,
    /// ALPN http/1.1 only, and h2 only.
    tls_h1: TlsConnector,
    tls_h2: TlsConnector,
    hosts: Vec<(String, SocketAddr)>,
}

impl Ctx {
    /// Claims one request of the budget.
    fn take(&self) -> bool {
        self.issued.fetch_add(1, Ordering::Relaxed) < self.total
    }
    fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_default() += 1;
    }
}

fn client_main(spec: &str) -> ExitCode {
    let spec: Value = serde_json::from_str(spec).expect("spec JSON");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(client(spec)) {
        Ok(report) => {
            println!("report {report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soak client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn client(spec: Value) -> Result<Value, BoxError> {
    let ca = PathBuf::from(spec["ca"].as_str().ok_or("ca")?);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(proxypilot_tests::testca::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg_h2 = cfg.clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg_h2.alpn_protocols = vec![b"h2".to_vec()];
    let mut hosts = Vec::new();
    for h in spec["hosts"].as_array().ok_or("hosts")? {
        let h = h.as_str().ok_or("host")?.to_string();
        let addr = tokio::net::lookup_host((h.as_str(), 443))
            .await?
            .find(SocketAddr::is_ipv4)
            .ok_or("no IPv4 address")?;
        hosts.push((h, addr));
    }
    let ctx = Arc::new(Ctx {
        total: spec["requests"].as_u64().ok_or("requests")?,
        issued: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        killed: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        h2_connections: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        latencies_us: Mutex::new(Vec::new()),
        tls_h1: TlsConnector::from(Arc::new(cfg)),
        tls_h2: TlsConnector::from(Arc::new(cfg_h2)),
        hosts,
    });
    let conns = spec["conns"].as_u64().unwrap_or(32);
    let workers: Vec<_> = (0..conns)
        .map(|i| tokio::spawn(worker(ctx.clone(), 0x9E37_79B9_7F4A_7C15 ^ (i + 1))))
        .collect();
    for w in workers {
        w.await?;
    }
    let issued = ctx.issued.load(Ordering::Relaxed).min(ctx.total);
    let errors = ctx.errors.lock().unwrap().clone();
    let mut lat = ctx.latencies_us.lock().unwrap().clone();
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(json!({
        "p50_us": pick(0.50),
        "p99_us": pick(0.99),
        "requests": issued,
        "ok": ctx.ok.load(Ordering::Relaxed),
        "killed": ctx.killed.load(Ordering::Relaxed),
        "connections": ctx.connections.load(Ordering::Relaxed),
        "h2_connections": ctx.h2_connections.load(Ordering::Relaxed),
        "errors": errors,
        "hosts": ctx.hosts.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(),
    }))
}

/// xorshift64*: deterministic per worker, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

struct Conn {
    sender: Sender,
    task: tokio::task::JoinHandle<()>,
    host: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Dropping the task drops the socket: the connection closes now.
        self.task.abort();
    }
}

impl Conn {
    async fn open(ctx: &Ctx, host: &str, addr: SocketAddr, h2: bool) -> Result<Conn, &'static str> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|_| "connect")?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.to_string()).map_err(|_| "server name")?;
        let connector = if h2 { &ctx.tls_h2 } else { &ctx.tls_h1 };
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|_| "tls handshake")?;
        let alpn_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        ctx.connections.fetch_add(1, Ordering::Relaxed);
        if alpn_h2 {
            ctx.h2_connections.fetch_add(1, Ordering::Relaxed);
            let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|_| "h2 handshake")?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn {
                sender: Sender::H2(s),
                task,
                host: host.to_string(),
            })
        } else {
            let (s, conn) = http1::handshake(io).await.map_err(|_| "h1 handshake")?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn {
                sender: Sender::H1(s),
                task,
                host: host.to_string(),
            })
        }
    }

    fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        let b = match self.sender {
            Sender::H1(_) => Request::get(path).header(http::header::HOST, self.host.as_str()),
            Sender::H2(_) => Request::get(format!("https://{}{path}", self.host)),
        };
        let b = match self.host.as_str() {
            ANTHROPIC => b.header("x-api-key", "dummy"),
            GITHUB => b.header("authorization", "token dummy"),
            _ => b.header("authorization", "Bearer dummy"),
        };
        b.body(Empty::new()).expect("request")
    }

    async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match &mut self.sender {
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

    /// One request, body drained: Ok for a 200 with the bytes expected.
    async fn get(&mut self, path: &str, expect: Option<u64>) -> Result<(), String> {
        let resp = self
            .send(self.request(path))
            .await
            .map_err(|e| format!("request: {}", kind_of(&e)))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(e) => return Err(format!("body: {}", kind_of(&e))),
            }
        }
        if status != StatusCode::OK {
            return Err(format!("status {}", status.as_u16()));
        }
        if expect.is_some_and(|e| e != n) {
            return Err("short body".into());
        }
        Ok(())
    }
}

fn kind_of(e: &hyper::Error) -> &'static str {
    if e.is_canceled() {
        "canceled"
    } else if e.is_closed() || e.is_incomplete_message() {
        "closed"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_parse() {
        "parse"
    } else {
        "other"
    }
}

async fn worker(ctx: Arc<Ctx>, seed: u64) {
    let mut rng = Rng(seed);
    loop {
        let (host, addr) = ctx.hosts[rng.below(ctx.hosts.len() as u64) as usize].clone();
        let roll = rng.below(1000);
        // 0.5% of connections die mid-request on purpose.
        if roll < 5 {
            if !ctx.take() {
                return;
            }
            die_mid_request(&ctx, &host, addr, roll).await;
            continue;
        }
        // 30% one request on a new connection, 70% keep-alive runs of up to
        // 200 requests; a tenth of the keep-alive connections use HTTP/2.
        let (n, h2) = if roll < 305 {
            (1, false)
        } else {
            (1 + rng.below(200), roll.is_multiple_of(10))
        };
        if !ctx.take() {
            return;
        }
        let mut conn = match Conn::open(&ctx, &host, addr, h2).await {
            Ok(c) => c,
            Err(kind) => {
                ctx.error(kind);
                continue;
            }
        };
        for i in 0..n {
            if i > 0 && !ctx.take() {
                return;
            }
            let size = [0u64, 16, 128, 1024, 16 * 1024][rng.below(5) as usize];
            let path = if rng.below(100) == 0 {
                "/sse?n=3".to_string()
            } else {
                format!("/bytes?n={size}")
            };
            let expect = path.starts_with("/bytes").then_some(size);
            let t = Instant::now();
            match conn.get(&path, expect).await {
                Ok(()) => {
                    ctx.ok.fetch_add(1, Ordering::Relaxed);
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    ctx.latencies_us.lock().unwrap().push(us);
                }
                Err(kind) => {
                    ctx.error(&kind);
                    break; // a new connection for the rest
                }
            }
        }
    }
}

/// Sends a request and drops the connection before the response is
/// complete: right after sending, after the head, or after the first
/// chunk of a stream.
async fn die_mid_request(ctx: &Ctx, host: &str, addr: SocketAddr, roll: u64) {
    let mut conn = match Conn::open(ctx, host, addr, roll.is_multiple_of(2)).await {
        Ok(c) => c,
        Err(kind) => {
            ctx.error(kind);
            return;
        }
    };
    ctx.killed.fetch_add(1, Ordering::Relaxed);
    match roll % 3 {
        0 => {
            let req = conn.request("/bytes?n=4194304");
            let _ = tokio::time::timeout(Duration::from_millis(1), conn.send(req)).await;
        }
        1 => {
            let req = conn.request("/bytes?n=4194304");
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.send(req)).await;
        }
        _ => {
            let req = conn.request("/sse?n=50&gap_ms=20");
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(10), conn.send(req)).await
            {
                let mut body = resp.into_body();
                let _ = tokio::time::timeout(Duration::from_secs(10), body.frame()).await;
            }
        }
    }
    drop(conn);
}
