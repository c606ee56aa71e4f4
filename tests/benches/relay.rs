//! The relay benchmark (`cargo xtask bench relay`, issue 5) and the full
//! side-by-side table (`cargo xtask bench`, issue 4), in one private
//! network namespace against one fake HTTPS upstream (api.anthropic.com
//! behind the test CA, resolved by the stub DNS).
//!
//! Columns: direct HTTPS to the upstream; `proxypilot sidecar` with the
//! embedded tokenizer; the sidecar with the standalone `proxypilot
//! tokenizer` as its remote; nginx and HAProxy (issue 20) doing the same
//! work (terminate TLS, set `x-api-key`, log the request to a file,
//! forward over TLS to a keep-alive pool, verifying the upstream against
//! the test CA; see `proxypilot_tests::peers`); and (full table only)
//! mitmproxy in reverse mode doing it too.
//!
//! The client is this same binary re-executed (`relay client SPEC`, see
//! `proxypilot_tests::loadgen`): inside the sandbox cgroup for the
//! proxypilot columns, so the kernel redirect is on the path, and outside
//! it for direct and mitmproxy. Every figure is measured in this one run,
//! rows interleaved across columns; only the ratios mean anything on a
//! shared machine, and nothing here asserts on time.
//!
//! Arguments (after `--`): `relay` or `all` (default), `--quick`.
//! Environment: `PROXYPILOT_BENCH_OUT` (directory for the JSON and PNG;
//! default `<workspace>/target/bench`), `PROXYPILOT_BENCH_VENV` (a venv
//! with requirements-bench.txt; needed for the mitmproxy column and the chart),
//! `PROXYPILOT_BENCH_AGAINST` (another build's `proxypilot`: adds the column
//! `against`, its embedded sidecar, for an A/B of a change in one run).

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use proxypilot::tls::{
    ca::CertAuthority,
    leaf::{LeafCache, DEFAULT_CAPACITY, DEFAULT_LIFETIME},
};
use proxypilot_tests::{
    loadgen::{self, Latencies, Mode, Report, Spec, Target},
    peers::Peer,
    shapes::{FlyShape, Tokenizer},
    upstream::{FakeInternet, ANTHROPIC, OPENAI},
    *,
};
use serde_json::{json, Value};

/// Run lengths.
struct Plan {
    warmup: Duration,
    duration: Duration,
    newconn: Duration,
    sse_iterations: usize,
    ws_iterations: usize,
    download_bytes: u64,
    idle_conns: usize,
    mints: usize,
}

impl Plan {
    /// `with_mitmproxy`: the full table, whose mitmproxy column is slow to
    /// open idle connections.
    fn new(quick: bool, with_mitmproxy: bool) -> Plan {
        if quick {
            Plan {
                warmup: Duration::from_millis(200),
                duration: Duration::from_millis(1000),
                newconn: Duration::from_millis(1000),
                sse_iterations: 20,
                ws_iterations: 200,
                download_bytes: 100_000_000,
                // mitmproxy opens ~50 TLS connections/s here: 1,000 would
                // take 20 s alone.
                idle_conns: if with_mitmproxy { 250 } else { 1000 },
                mints: 30,
            }
        } else {
            Plan {
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                newconn: Duration::from_secs(4),
                sse_iterations: 100,
                ws_iterations: 2000,
                download_bytes: 100_000_000,
                idle_conns: 1000,
                mints: 200,
            }
        }
    }
}

const LEVELS: [usize; 3] = [1, 16, 128];
/// The peer columns proxypilot is judged against (issue 20).
const PEERS: [&str; 2] = ["nginx", "haproxy"];
/// The upstream's answer time in the "slow upstream" row.
const SLOW_UPSTREAM_MS: u64 = 2;
const SLOW_ROW: &str = "keep-alive req/s, 16 conn, 2 ms upstream";
const NEWCONN_WORKERS: usize = 8;
/// A small JSON answer that does not echo the request (an echo of the
/// injected credential would be masked and logged as a warning on every
/// request, which is the exception, not the steady state).
const SMALL: &str = "/reply";

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("client") {
        std::process::exit(loadgen::client_main(&argv[2]));
    }
    // `cargo bench` passes `--bench`.
    let args: Vec<&str> = argv[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let quick = args.contains(&"--quick");
    let which = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .copied()
        .unwrap_or("all");
    if !matches!(which, "relay" | "all") {
        eprintln!("relay bench: unknown benchmark {which:?}; use `relay` or `all`");
        std::process::exit(2);
    }
    if !privileged() {
        return;
    }
    let full = which == "all";
    let plan = Plan::new(quick, full);
    let started = Instant::now();
    let out_dir = std::env::var_os("PROXYPILOT_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    fs::create_dir_all(&out_dir).unwrap();
    let venv = std::env::var_os("PROXYPILOT_BENCH_VENV").map(PathBuf::from);

    eprintln!(
        "bench: {which}{}; proxypilot binary {}",
        if quick { " --quick" } else { "" },
        proxypilot_bin().display()
    );
    // In-process first, while the machine is quiet.
    let mint = leaf_mint(plan.mints);

    let net = FakeInternet::start();
    let embedded = FlyShape::start(&net, "bench-embedded", Tokenizer::Embedded, &[]);
    let remote = FlyShape::start(
        &net,
        "bench-remote",
        Tokenizer::Remote,
        &[
            "--listen",
            "127.0.0.1:15444",
            "--listen",
            "[::1]:15444",
            "--info-port",
            "15481",
        ],
    );
    let real_key = net.apis.keys().anthropic.clone();
    let mut cols = vec![
        Column {
            name: "direct",
            target: Target {
                connect: format!("{ANTHROPIC}:443"),
                server_name: ANTHROPIC.into(),
                ca_pem: net.apis.ca_pem_path().to_path_buf(),
                headers: vec![("x-api-key".into(), real_key.clone())],
                h2: false,
            },
            fly: None,
            pids: vec![],
        },
        Column::proxypilot("embedded", &embedded, vec![embedded.sidecar.child.id()]),
        Column::proxypilot(
            "remote",
            &remote,
            vec![
                remote.sidecar.child.id(),
                remote.tokenizer.as_ref().unwrap().child.id(),
            ],
        ),
    ];
    // A/B: another build's embedded sidecar, measured in this same run,
    // so a change is judged by a ratio the machine's noise hits evenly.
    let against = std::env::var_os("PROXYPILOT_BENCH_AGAINST").map(|bin| {
        FlyShape::start_with_sidecar_binary(
            &net,
            "bench-against",
            Tokenizer::Embedded,
            &[
                "--listen",
                "127.0.0.1:15445",
                "--listen",
                "[::1]:15445",
                "--info-port",
                "15482",
            ],
            Path::new(&bin),
        )
    });
    if let Some(a) = &against {
        cols.insert(
            2,
            Column::proxypilot("against", a, vec![a.sidecar.child.id()]),
        );
    }
    let mut peers = Vec::new();
    for start in [Peer::nginx, Peer::haproxy] {
        match start(&net, &real_key) {
            Ok(p) => peers.push(p),
            Err(e) => eprintln!("bench: a peer column skipped: {e}"),
        }
    }
    for p in &peers {
        cols.push(Column {
            name: p.name,
            target: Target {
                connect: format!("127.0.0.1:{}", p.port),
                server_name: ANTHROPIC.into(),
                ca_pem: net.apis.ca_pem_path().to_path_buf(),
                headers: vec![("x-api-key".into(), "dummy".into())],
                h2: false,
            },
            fly: None,
            pids: p.pids(),
        });
    }
    let mut mitm = None;
    if full {
        match venv.as_deref().map(|v| Mitm::start(&net, v, &real_key)) {
            Some(Ok(m)) => {
                cols.push(Column {
                    name: "mitmproxy",
                    target: Target {
                        connect: format!("127.0.0.1:{}", m.port),
                        server_name: ANTHROPIC.into(),
                        ca_pem: m.ca.clone(),
                        headers: vec![("x-api-key".into(), "dummy".into())],
                        h2: false,
                    },
                    fly: None,
                    pids: vec![m.child.id()],
                });
                mitm = Some(m);
            }
            Some(Err(e)) => eprintln!("bench: mitmproxy column skipped: {e}"),
            None => eprintln!("bench: mitmproxy column skipped: PROXYPILOT_BENCH_VENV not set"),
        }
    }
    for c in &cols {
        for pid in &c.pids {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            eprintln!("bench: {} measures pid {pid} ({})", c.name, comm.trim());
        }
    }
    let names: Vec<&'static str> = cols.iter().map(|c| c.name).collect();
    let mut table = Table::new(&names);
    let ticks = clock_ticks();

    // Keep-alive at 1/16/128 connections, columns interleaved per level.
    for &n in &LEVELS {
        for c in &cols {
            let cpu0 = c.cpu_ticks();
            let others0 = client_and_upstream_cpu();
            let perf = (n == 16).then(|| perf_record(c)).flatten();
            let r = c.run(
                &net,
                Mode::KeepAlive {
                    conns: n,
                    warmup: plan.warmup,
                    duration: plan.duration,
                    path: SMALL.into(),
                },
            );
            let cpu = (c.cpu_ticks() - cpu0) as f64 / ticks;
            let others = (client_and_upstream_cpu() - others0).as_secs_f64();
            if let Some(mut p) = perf {
                // SIGINT makes perf write its file.
                let _ = Command::new("kill")
                    .args(["-INT", &p.id().to_string()])
                    .status();
                let _ = p.wait();
            }
            net.apis.clear_requests();
            let Some(r) = r else { continue };
            eprintln!(
                "bench: keep-alive c={n:<3} {:<9} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  errors {}",
                c.name, r.rate, r.p50_us, r.p99_us, r.errors
            );
            table.set(
                &format!("keep-alive req/s, {n} conn"),
                "req/s",
                Better::Higher,
                c.name,
                r.rate,
            );
            table.set(
                &format!("p50 latency, {n} conn"),
                "µs",
                Better::Lower,
                c.name,
                r.p50_us,
            );
            table.set(
                &format!("p99 latency, {n} conn"),
                "µs",
                Better::Lower,
                c.name,
                r.p99_us,
            );
            if n == 16 && r.total > 0 {
                table.set(
                    "client + upstream CPU µs/request",
                    "µs",
                    Better::Lower,
                    c.name,
                    others / r.total as f64 * 1e6,
                );
            }
            if n == 16 && !c.pids.is_empty() && r.total > 0 {
                table.set(
                    "proxy CPU µs/request",
                    "µs",
                    Better::Lower,
                    c.name,
                    cpu / r.total as f64 * 1e6,
                );
                table.set(
                    "CPU s per 10k requests",
                    "s",
                    Better::Lower,
                    c.name,
                    cpu / r.total as f64 * 10_000.0,
                );
            }
        }
    }

    // The same at 16 connections against an upstream that sleeps 2 ms
    // before answering (tokio rounds timers up to whole milliseconds, so a
    // bit more; real APIs take far longer): what the relay's cost means
    // once client, upstream and proxy alone do not saturate the machine.
    for c in &cols {
        let r = c.run(
            &net,
            Mode::KeepAlive {
                conns: 16,
                warmup: plan.warmup,
                duration: plan.duration,
                path: format!("{SMALL}?delay_ms={SLOW_UPSTREAM_MS}"),
            },
        );
        net.apis.clear_requests();
        let Some(r) = r else { continue };
        eprintln!(
            "bench: keep-alive c=16 {SLOW_UPSTREAM_MS} ms upstream {:<9} {:>9.0} req/s  p50 {:>7.0} µs  errors {}",
            c.name, r.rate, r.p50_us, r.errors
        );
        table.set(SLOW_ROW, "req/s", Better::Higher, c.name, r.rate);
    }

    for c in &cols {
        let r = c.run(
            &net,
            Mode::NewConn {
                conns: NEWCONN_WORKERS,
                duration: plan.newconn,
                path: SMALL.into(),
            },
        );
        net.apis.clear_requests();
        if let Some(r) = r {
            eprintln!(
                "bench: new TLS conns {:<9} {:>8.0} /s  p50 {:>7.0} µs  errors {}",
                c.name, r.rate, r.p50_us, r.errors
            );
            table.set(
                "new TLS conns/s (leaf cached)",
                "conn/s",
                Better::Higher,
                c.name,
                r.rate,
            );
        }
    }

    // A small WebSocket frame's round trip on one open stream (issue 17),
    // against the fake Realtime endpoint; the peers here only front the
    // Anthropic host.
    for c in cols
        .iter()
        .filter(|c| c.fly.is_some() || c.name == "direct")
    {
        let ws = c.for_openai_websocket(&net);
        if let Some(r) = ws.run(
            &net,
            Mode::WsRoundTrip {
                iterations: plan.ws_iterations,
                path: "/v1/realtime?model=gpt-realtime".into(),
            },
        ) {
            eprintln!(
                "bench: WebSocket frame round trip {:<9} p50 {:>7.0} µs  p99 {:>7.0} µs",
                c.name, r.p50_us, r.p99_us
            );
            table.set(
                "WebSocket frame round trip (p50)",
                "µs",
                Better::Lower,
                c.name,
                r.p50_us,
            );
        }
        net.apis.clear_requests();
    }

    if full {
        for c in &cols {
            if let Some(r) = c.run(
                &net,
                Mode::Sse {
                    iterations: plan.sse_iterations,
                    path: "/sse?n=3".into(),
                },
            ) {
                eprintln!(
                    "bench: SSE first event {:<9} p50 {:>7.0} µs",
                    c.name, r.p50_us
                );
                table.set(
                    "SSE time to first event (p50)",
                    "µs",
                    Better::Lower,
                    c.name,
                    r.p50_us,
                );
            }
            net.apis.clear_requests();
        }
        for c in &cols {
            if let Some(r) = c.run(
                &net,
                Mode::Download {
                    path: format!("/bytes?n={}", plan.download_bytes),
                    expect_bytes: plan.download_bytes,
                },
            ) {
                eprintln!(
                    "bench: 100 MB download {:<9} {:>7.0} MB/s",
                    c.name, r.mb_per_s
                );
                table.set(
                    "100 MB download",
                    "MB/s",
                    Better::Higher,
                    c.name,
                    r.mb_per_s,
                );
            }
        }
    }
    // The footprint of idle connections: every run, the target is on it.
    {
        net.apis.clear_requests();
        for c in cols.iter().filter(|c| !c.pids.is_empty()) {
            let base = c.rss_kib();
            match c.hold(&net, plan.idle_conns) {
                Ok((held, rss)) => {
                    eprintln!(
                        "bench: {held} idle conns {:<9} RSS {:.1} MiB (before: {:.1} MiB)",
                        c.name,
                        rss as f64 / 1024.0,
                        base as f64 / 1024.0
                    );
                    table.set(
                        &format!("RSS at {} idle conns", plan.idle_conns),
                        "MiB",
                        Better::Lower,
                        c.name,
                        rss as f64 / 1024.0,
                    );
                }
                Err(e) => eprintln!("bench: idle connections through {}: {e}", c.name),
            }
            net.apis.clear_requests();
        }
    }

    // ---- report ----
    let title = format!(
        "proxypilot bench {which}{} — one run, ratios to direct",
        if quick { " --quick" } else { "" }
    );
    println!();
    println!("{title}");
    print!("{}", table.render());
    println!();
    println!(
        "leaf mint (LeafCache::get on a miss, ECDSA P-256 key + signature, {} mints): p50 {:.0} µs, p99 {:.0} µs; cached get p50 {:.2} µs",
        plan.mints, mint.p50_us, mint.p99_us, mint.cached_p50_us
    );
    if let Some(m) = &mitm {
        println!("mitmproxy invocation: {}", m.invocation);
    }
    for p in &peers {
        println!(
            "{} invocation ({} requests in its access log): {}",
            p.name,
            p.logged_requests(),
            p.invocation
        );
    }
    let verdicts = verdicts(&table, full);
    println!();
    println!("targets (measured, not asserted):");
    for v in &verdicts {
        println!(
            "  [{}] {}",
            match v.get("met").and_then(Value::as_bool) {
                Some(true) => "met ",
                Some(false) => "MISS",
                None => " -- ",
            },
            v["text"].as_str().unwrap()
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("\nbench took {elapsed:.0} s");

    let summary = json!({
        "title": title,
        "which": which,
        "quick": quick,
        "columns": names,
        "rows": table.to_json(),
        "leaf_mint": {"mints": plan.mints, "p50_us": mint.p50_us, "p99_us": mint.p99_us,
                      "cached_get_p50_us": mint.cached_p50_us},
        "mitmproxy_invocation": mitm.as_ref().map(|m| m.invocation.clone()),
        "peer_invocations": peers.iter().map(|p| json!({"name": p.name, "invocation": p.invocation})).collect::<Vec<_>>(),
        "targets": verdicts,
        "seconds": elapsed,
        "plan": {"warmup_ms": plan.warmup.as_millis() as u64, "duration_ms": plan.duration.as_millis() as u64,
                 "newconn_ms": plan.newconn.as_millis() as u64, "newconn_workers": NEWCONN_WORKERS,
                 "sse_iterations": plan.sse_iterations, "ws_iterations": plan.ws_iterations,
                 "download_bytes": plan.download_bytes,
                 "idle_conns": plan.idle_conns},
    });
    let stem = if full { "summary" } else { "relay" };
    let json_path = out_dir.join(format!("{stem}.json"));
    fs::write(&json_path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    println!("wrote {}", json_path.display());
    if full {
        let png = out_dir.join("summary.png");
        match &venv {
            Some(v) => {
                let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/chart.py");
                let st = Command::new(v.join("bin/python"))
                    .arg(chart)
                    .arg(&json_path)
                    .arg(&png)
                    .status();
                match st {
                    Ok(s) if s.success() => println!("wrote {}", png.display()),
                    other => eprintln!("bench: chart failed: {other:?}"),
                }
            }
            None => eprintln!("bench: no chart (PROXYPILOT_BENCH_VENV not set)"),
        }
    }
    drop(mitm);
    drop(peers);
    drop(remote);
    drop(embedded);
}

// ---------- columns ----------

struct Column<'a> {
    name: &'static str,
    target: Target,
    /// The sandbox the client runs in (proxypilot columns).
    fly: Option<&'a FlyShape>,
    /// The proxy's processes (CPU and RSS are summed over them).
    pids: Vec<u32>,
}

impl<'a> Column<'a> {
    fn proxypilot(name: &'static str, fly: &'a FlyShape, pids: Vec<u32>) -> Column<'a> {
        Column {
            name,
            target: Target {
                connect: format!("{ANTHROPIC}:443"),
                server_name: ANTHROPIC.into(),
                ca_pem: fly.ca.clone(),
                headers: vec![("x-api-key".into(), "dummy".into())],
                h2: false,
            },
            fly: Some(fly),
            pids,
        }
    }

    /// The same column aimed at api.openai.com's Realtime WebSocket, with
    /// the real key direct and the dummy through proxypilot.
    fn for_openai_websocket(&self, net: &FakeInternet) -> Column<'a> {
        let key = match self.fly {
            None => net.apis.keys().openai.clone(),
            Some(_) => "dummy".into(),
        };
        Column {
            name: self.name,
            target: Target {
                connect: format!("{OPENAI}:443"),
                server_name: OPENAI.into(),
                headers: vec![("authorization".into(), format!("Bearer {key}"))],
                ..self.target.clone()
            },
            fly: self.fly,
            pids: self.pids.clone(),
        }
    }

    fn client(&self, net: &FakeInternet, mode: Mode) -> Command {
        let spec = Spec {
            target: self.target.clone(),
            mode,
        }
        .to_json()
        .to_string();
        let exe = std::env::current_exe().unwrap();
        let cmd = match self.fly {
            Some(fly) => fly.sandbox(net, exe),
            None => net.command(exe),
        };
        cmd.arg("client").arg(spec).command()
    }

    fn run(&self, net: &FakeInternet, mode: Mode) -> Option<Report> {
        let out = self
            .client(net, mode)
            .stdin(Stdio::null())
            .output()
            .expect("running the bench client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        match loadgen::parse_report(&stdout) {
            Some(r) if out.status.success() => {
                if r.errors > 0 {
                    eprintln!(
                        "bench: {}: {} errors, first: {}",
                        self.name,
                        r.errors,
                        r.first_error.as_deref().unwrap_or("?")
                    );
                }
                Some(r)
            }
            _ => {
                eprintln!(
                    "bench: {} client failed ({}): {}",
                    self.name,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                None
            }
        }
    }

    /// Opens `n` connections through the proxy, holds them idle, and returns
    /// how many were held and the proxy's RSS (KiB) meanwhile.
    fn hold(&self, net: &FakeInternet, n: usize) -> Result<(u64, u64), String> {
        let mut child: Child = self
            .client(
                net,
                Mode::Hold {
                    conns: n,
                    path: SMALL.into(),
                },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let held: u64 = first
            .strip_prefix("held ")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                format!("client said {first:?}: {err}")
            })?;
        // Let allocators and buffers settle, then sample.
        thread::sleep(Duration::from_millis(500));
        let rss = self.rss_kib();
        let mut stdin = child.stdin.take().unwrap();
        let _ = writeln!(stdin);
        drop(stdin);
        let _ = child.wait();
        Ok((held, rss))
    }

    fn cpu_ticks(&self) -> u64 {
        self.pids.iter().map(|&p| proc_cpu_ticks(p)).sum()
    }

    fn rss_kib(&self) -> u64 {
        self.pids.iter().map(|&p| proc_rss_kib(p)).sum()
    }
}

/// With `PROXYPILOT_BENCH_PERF=DIR`, samples the column's proxy processes
/// (`perf record -e cpu-clock --call-graph dwarf`) into DIR/<column>.perf.data
/// while the 16-connection keep-alive run goes. DWARF unwinding, because the
/// release build has no frame pointers (with `-g` every Rust caller is lost);
/// read it with `perf report --children`.
fn perf_record(c: &Column) -> Option<Child> {
    let dir = PathBuf::from(std::env::var_os("PROXYPILOT_BENCH_PERF")?);
    if c.pids.is_empty() {
        return None;
    }
    fs::create_dir_all(&dir).ok()?;
    let pids: Vec<String> = c.pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "--call-graph",
            "dwarf,32768",
            "-o",
        ])
        .arg(dir.join(format!("{}.perf.data", c.name)))
        .args(["-p", &pids.join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    thread::sleep(Duration::from_millis(300));
    Some(child)
}

/// utime + stime of a process (all its threads), in clock ticks.
/// CPU time of the fake upstream (threads of this process) plus every
/// client process reaped so far (the load generator and its wrappers).
/// The keep-alive rows take its difference around one run, to show how
/// much of a column's cost is the proxy's (see `verdicts`).
fn client_and_upstream_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = |who| {
        let Ok(u) = getrusage(who) else {
            return Duration::ZERO;
        };
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
        };
        tv(u.user_time()) + tv(u.system_time())
    };
    usage(UsageWho::RUSAGE_SELF) + usage(UsageWho::RUSAGE_CHILDREN)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn proc_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------- mitmproxy ----------

struct Mitm {
    child: Child,
    port: u16,
    ca: PathBuf,
    invocation: String,
}

impl Mitm {
    /// `mitmdump` in reverse mode in front of api.anthropic.com, resolving it
    /// through the stub DNS like the sidecar does.
    fn start(net: &FakeInternet, venv: &Path, real_key: &str) -> Result<Mitm, String> {
        let mitmdump = venv.join("bin/mitmdump");
        if !mitmdump.exists() {
            return Err(format!("{} is missing", mitmdump.display()));
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().unwrap().port()
        };
        let dir = net.dir.0.join("mitm");
        fs::create_dir_all(&dir).unwrap();
        let addon = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/mitm_addon.py");
        let args: Vec<String> = vec![
            "--mode".into(),
            format!("reverse:https://{ANTHROPIC}@127.0.0.1:{port}"),
            "--set".into(),
            format!("confdir={}", dir.display()),
            "--set".into(),
            format!(
                "ssl_verify_upstream_trusted_ca={}",
                net.apis.ca_pem_path().display()
            ),
            "--set".into(),
            "stream_large_bodies=1m".into(),
            "--set".into(),
            "flow_detail=0".into(),
            "-q".into(),
            "-s".into(),
            addon.display().to_string(),
        ];
        let invocation = format!(
            "BENCH_REAL_KEY=<key> mitmdump {} (resolv.conf -> stub DNS)",
            args.join(" ")
        );
        let log = dir.join("mitmdump.log");
        let mut cmd = net
            .command(&mitmdump)
            .inherit_env()
            .env("BENCH_REAL_KEY", real_key)
            .args(&args)
            .command();
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.join("mitmdump.err")).unwrap());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let ca = dir.join("mitmproxy-ca-cert.pem");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "mitmdump exited ({st}): {}",
                    fs::read_to_string(dir.join("mitmdump.err")).unwrap_or_default()
                ));
            }
            if ca.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("mitmdump did not listen in 30 s".into());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Mitm {
            child,
            port,
            ca,
            invocation,
        })
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------- leaf mint ----------

struct Mint {
    p50_us: f64,
    p99_us: f64,
    cached_p50_us: f64,
}

/// Times `LeafCache::get` on a miss (what the relay does for a new host) and
/// on a hit, with the product's own CA code.
fn leaf_mint(n: usize) -> Mint {
    proxypilot::tls::ensure_crypto_provider();
    let ca = Arc::new(CertAuthority::ephemeral(&[ANTHROPIC.to_string()]).expect("ephemeral CA"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut miss = Vec::with_capacity(n);
        for _ in 0..n {
            let cache = LeafCache::new(ca.clone(), DEFAULT_LIFETIME, DEFAULT_CAPACITY);
            let t = Instant::now();
            cache.get(ANTHROPIC).await.expect("mint");
            miss.push((t.elapsed().as_nanos() / 1000) as u32);
        }
        let cache = LeafCache::new(ca.clone(), DEFAULT_LIFETIME, DEFAULT_CAPACITY);
        cache.get(ANTHROPIC).await.unwrap();
        let mut hit = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let t = Instant::now();
            cache.get(ANTHROPIC).await.unwrap();
            hit.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        hit.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let miss = Latencies::from_unsorted(miss);
        Mint {
            p50_us: miss.quantile(0.5),
            p99_us: miss.quantile(0.99),
            cached_p50_us: hit[hit.len() / 2],
        }
    })
}

// ---------- the table ----------

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    name: String,
    unit: &'static str,
    better: Better,
    values: BTreeMap<&'static str, f64>,
}

struct Table {
    cols: Vec<&'static str>,
    rows: Vec<Row>,
}

impl Table {
    fn new(cols: &[&'static str]) -> Table {
        Table {
            cols: cols.to_vec(),
            rows: Vec::new(),
        }
    }

    fn set(&mut self, row: &str, unit: &'static str, better: Better, col: &'static str, v: f64) {
        if !self.rows.iter().any(|r| r.name == row) {
            self.rows.push(Row {
                name: row.to_string(),
                unit,
                better,
                values: BTreeMap::new(),
            });
        }
        let r = self.rows.iter_mut().find(|r| r.name == row).unwrap();
        r.values.insert(col, v);
    }

    fn get(&self, row: &str, col: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.name == row)?
            .values
            .get(col)
            .copied()
    }

    /// The best peer's value in `row` and its name (highest or lowest,
    /// as the row's better says).
    fn best_peer(&self, row: &Row) -> Option<(&'static str, f64)> {
        let mut found: Option<(&'static str, f64)> = None;
        for p in PEERS {
            let Some(&v) = row.values.get(p) else {
                continue;
            };
            let better = match found {
                None => true,
                Some((_, b)) => match row.better {
                    Better::Higher => v > b,
                    Better::Lower => v < b,
                },
            };
            if better {
                found = Some((p, v));
            }
        }
        found
    }

    fn render(&self) -> String {
        let mut s = format!("{:<34} {:>6}", "row", "unit");
        for c in &self.cols {
            s += &format!(" {:>21}", c);
        }
        s += &format!(" {:>24}", "embedded ÷ best peer");
        s += "\n";
        for r in &self.rows {
            s += &format!("{:<34} {:>6}", r.name, r.unit);
            let direct = r.values.get("direct").copied();
            for c in &self.cols {
                let cell = match (r.values.get(c), direct) {
                    (Some(v), Some(d)) if *c != "direct" && d > 0.0 => {
                        format!("{} ({:.2}×)", fmt(*v), v / d)
                    }
                    (Some(v), _) => fmt(*v),
                    (None, _) => "—".to_string(),
                };
                s += &format!(" {:>21}", cell);
            }
            let vs_peer = match (r.values.get("embedded"), self.best_peer(r)) {
                (Some(e), Some((p, b))) if b > 0.0 => format!("{:.2}× ({p})", e / b),
                _ => "—".to_string(),
            };
            s += &format!(" {:>24}", vs_peer);
            s += "\n";
        }
        s
    }

    fn to_json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    let direct = r.values.get("direct").copied();
                    let values: serde_json::Map<String, Value> = self
                        .cols
                        .iter()
                        .map(|c| (c.to_string(), json!(r.values.get(c))))
                        .collect();
                    let ratios: serde_json::Map<String, Value> = self
                        .cols
                        .iter()
                        .map(|c| {
                            let v = match (r.values.get(c), direct) {
                                (Some(v), Some(d)) if d > 0.0 => json!(v / d),
                                _ => Value::Null,
                            };
                            (c.to_string(), v)
                        })
                        .collect();
                    let vs_peer = match (r.values.get("embedded"), self.best_peer(r)) {
                        (Some(e), Some((p, b))) if b > 0.0 => json!({"peer": p, "ratio": e / b}),
                        _ => Value::Null,
                    };
                    json!({"name": r.name, "unit": r.unit,
                           "better": if r.better == Better::Higher { "higher" } else { "lower" },
                           "values": values, "ratios_to_direct": ratios,
                           "embedded_to_best_peer": vs_peer})
                })
                .collect(),
        )
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn verdicts(t: &Table, full: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut push = |text: String, met: Option<bool>| out.push(json!({"text": text, "met": met}));
    let ka = |c: &str| t.get("keep-alive req/s, 16 conn", c);
    // Issue 20's targets: against the best peer in this same run.
    let vs_peer = |row: &str| -> Option<(f64, f64, &'static str)> {
        let r = t.rows.iter().find(|r| r.name == row)?;
        let (peer, best) = t.best_peer(r)?;
        Some((*r.values.get("embedded")?, best, peer))
    };
    if let Some((e, b, p)) = vs_peer("keep-alive req/s, 16 conn") {
        push(
            format!(
                "embedded keep-alive req/s at 16 conns ≥ 1.0× the best peer ({p}, {b:.0}): {:.2}× ({e:.0}; goal 1.3×)",
                e / b
            ),
            Some(e / b >= 1.0),
        );
    }
    if let Some((e, b, p)) = vs_peer("proxy CPU µs/request") {
        push(
            format!(
                "embedded proxy CPU per request ≤ 1.0× the best peer ({p}, {b:.0} µs): {:.2}× ({e:.0} µs)",
                e / b
            ),
            Some(e / b <= 1.0),
        );
    }
    if let (Some((e, b, p)), Some(d)) = (
        vs_peer("p50 latency, 1 conn"),
        t.get("p50 latency, 1 conn", "direct"),
    ) {
        push(
            format!(
                "embedded p50 added latency at 1 conn ≤ the best peer's ({p}, {:+.0} µs): {:+.0} µs",
                b - d,
                e - d
            ),
            Some(e - d <= b - d),
        );
    }
    if let Some((e, b, p)) = vs_peer("new TLS conns/s (leaf cached)") {
        push(
            format!(
                "embedded new TLS conns/s ≥ 0.9× the best peer ({p}, {b:.0}/s): {:.2}× ({e:.0}/s)",
                e / b
            ),
            Some(e / b >= 0.9),
        );
    }
    for col in ["embedded", "remote"] {
        if let (Some(p), Some(d)) = (ka(col), ka("direct")) {
            push(
                format!("{col} keep-alive at 16 conns: {:.2}× direct", p / d),
                None,
            );
        }
        let ws = "WebSocket frame round trip (p50)";
        if let (Some(p), Some(d)) = (t.get(ws, col), t.get(ws, "direct")) {
            push(
                format!("{col} WebSocket frame round trip: {:.2}× direct", p / d),
                None,
            );
        }
        if let (Some(p), Some(d)) = (t.get(SLOW_ROW, col), t.get(SLOW_ROW, "direct")) {
            push(
                format!(
                    "{col} keep-alive at 16 conns, {SLOW_UPSTREAM_MS} ms upstream: {:.2}× direct",
                    p / d
                ),
                None,
            );
        }
    }
    if full {
        for col in ["embedded", "remote"] {
            if let (Some(p), Some(m)) = (ka(col), ka("mitmproxy")) {
                push(
                    format!("{col} ≥ 5× mitmproxy throughput at 16 conns: {:.2}×", p / m),
                    (col == "embedded").then_some(p / m >= 5.0),
                );
            }
        }
    }
    for col in ["embedded", "remote"] {
        for n in LEVELS {
            let (Some(p50), Some(d50), Some(p99), Some(d99)) = (
                t.get(&format!("p50 latency, {n} conn"), col),
                t.get(&format!("p50 latency, {n} conn"), "direct"),
                t.get(&format!("p99 latency, {n} conn"), col),
                t.get(&format!("p99 latency, {n} conn"), "direct"),
            ) else {
                continue;
            };
            let main = col == "embedded";
            push(
                format!(
                    "{col} p50 added latency ≤ 300 µs at {n} conn: {:+.0} µs",
                    p50 - d50
                ),
                (main && n != 128).then_some(p50 - d50 <= 300.0),
            );
            push(
                format!(
                    "{col} p99 added latency ≤ 1 ms at {n} conn: {:+.0} µs",
                    p99 - d99
                ),
                (main && n == 16 && full).then_some(p99 - d99 <= 1000.0),
            );
        }
    }
    // Client, upstream and proxy share this machine's cores and keep them
    // busy at 16 connections, so throughput goes as 1 / (CPU per request):
    // the ratio to direct is about direct's client + upstream CPU over the
    // column's client + upstream + proxy CPU. Printed, not judged; it says
    // whether a miss is CPU the proxy burns or time it waits.
    let cu = "client + upstream CPU µs/request";
    for col in ["embedded", "remote"] {
        if let (Some(proxy), Some(others), Some(direct)) = (
            t.get("proxy CPU µs/request", col),
            t.get(cu, col),
            t.get(cu, "direct"),
        ) {
            push(
                format!(
                    "{col} CPU per request: proxy {proxy:.0} µs + client and upstream {others:.0} µs, vs {direct:.0} µs direct: CPU-bound ratio {:.2}× (measured {:.2}×)",
                    direct / (others + proxy),
                    ka(col).zip(ka("direct")).map_or(f64::NAN, |(p, d)| p / d),
                ),
                None,
            );
            // The proxy terminates one TLS+HTTP connection and originates
            // another for every request: at least the work direct's client
            // and upstream do together. Were it that cheap, the ratio would
            // be direct / (others + direct) — never above 0.5×, since
            // `others` is at least `direct`.
            push(
                format!(
                    "{col} ceiling: a proxy costing only direct's {direct:.0} µs would reach {:.2}×",
                    direct / (others + direct),
                ),
                None,
            );
        }
    }
    for col in ["embedded", "remote"] {
        if let Some(r) = t.get("RSS at 1000 idle conns", col) {
            push(
                format!("{col} RSS ≤ 32 MiB at 1000 idle conns: {r:.1} MiB"),
                (col == "embedded").then_some(r <= 32.0),
            );
        }
    }
    out
}
