//! DNS through proxypilot's resolver against asking the fake resolver
//! directly: sequential UDP queries from a sandbox cgroup, redirected by
//! the kernel programs to the resolver (which asks the stub DNS), against
//! the same queries to the stub from an identical cgroup without programs.
//! Prints queries per second and the median latency of each side, and
//! their ratios; run with `cargo xtask bench dns` (as root).
//!
//! The client is this same binary re-executed inside each cgroup.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use proxypilot::{
    dns::{self, BoundResolver, NameAllowList, Resolver, Upstreams},
    policy::HostPattern,
};
use proxypilot_tests::{dns as stub, dns::StubDns, *};

/// Rounds of back-to-back queries, each under the resolver's burst (200)
/// and a pause apart that refills it, so the cap is never what is measured.
const ROUNDS: usize = 20;
const PER_ROUND: usize = 150;
const REFILL: Duration = Duration::from_millis(1_600);
const STUB: &str = "203.0.113.53:53";
const NAME: &str = "api.bench.test";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        client(args[2].parse().unwrap(), args[3].parse().unwrap());
        return;
    }
    if !privileged() {
        return;
    }
    let _ns = NetNs::enter_new(&["203.0.113.53/32"]);
    let stub_addr: SocketAddr = STUB.parse().unwrap();
    let records = [(NAME.to_string(), vec!["203.0.113.11".parse().unwrap()])].into();
    let _stub = StubDns::start(stub_addr, records);
    let with = TestCgroup::new("bench-dns-with");
    let without = TestCgroup::new("bench-dns-without");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_attachment, _tasks) = rt.block_on(async {
        let bound = BoundResolver::bind().await.unwrap();
        let mut policy = test_policy(&[], vec![]);
        policy.resolver = bound.addrs();
        let attachment =
            Arc::new(proxypilot::kernel::Attachment::attach(with.path(), &policy).unwrap());
        let resolver = Arc::new(Resolver::new(
            NameAllowList::new([HostPattern::parse(NAME).unwrap()]),
            Upstreams::new(&[stub_addr.ip()]),
            Arc::new(dns::KernelSenders(attachment.clone())),
        ));
        (attachment, bound.serve(resolver))
    });

    let (mut via, mut direct) = (Vec::new(), Vec::new());
    let (mut via_secs, mut direct_secs) = (0.0, 0.0);
    // Alternate the two sides so drift on a noisy machine hits both.
    for _ in 0..ROUNDS {
        let (d, s) = run_client(without.path(), PER_ROUND);
        direct.extend(d);
        direct_secs += s;
        let (v, s) = run_client(with.path(), PER_ROUND);
        via.extend(v);
        via_secs += s;
        std::thread::sleep(REFILL);
    }
    let (v, d) = (median(&mut via), median(&mut direct));
    let (vq, dq) = (
        via.len() as f64 / via_secs,
        direct.len() as f64 / direct_secs,
    );
    println!(
        "DNS, {} sequential UDP queries each (A {NAME}, {ROUNDS} rounds of {PER_ROUND}):",
        ROUNDS * PER_ROUND
    );
    println!("  direct to the fake resolver: {dq:>8.0} queries/s, median {d:>7.1} µs");
    println!("  through proxypilot:          {vq:>8.0} queries/s, median {v:>7.1} µs");
    println!(
        "  ratio proxypilot/direct:     {:>8.2} (queries/s), {:>5.2} (latency)",
        vq / dq,
        v / d
    );
    println!("  (one client, one query at a time; the resolver's cap of 100 queries/s per");
    println!("   sandbox, in bursts of 200, is refilled between rounds and never reached)");
}

/// Runs the client in `cg`; returns the latencies (µs) and the seconds
/// the queries took (the client's own clock, without its start-up).
fn run_client(cg: &std::path::Path, n: usize) -> (Vec<f64>, f64) {
    let exe = std::env::current_exe().unwrap();
    let out = run_ok(in_cgroup(cg, exe.to_str().unwrap()).args(["client", STUB, &n.to_string()]));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<f64> = text.lines().map(|l| l.parse().unwrap()).collect();
    let secs = lines.pop().expect("the total") / 1e6;
    (lines, secs)
}

/// Asks `n` A queries one after another, printing each latency in µs,
/// then the total.
fn client(server: SocketAddr, n: usize) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let query = stub::build_query(NAME, stub::TYPE_A, false);
    let mut buf = [0u8; 1500];
    let mut out = String::with_capacity(n * 8);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.send_to(&query, server).expect("send");
        let (len, _) = s.recv_from(&mut buf).expect("an answer");
        assert!(len > 12 && buf[3] & 0x0f == 0, "rcode {}", buf[3] & 0x0f);
        out.push_str(&format!("{:.3}\n", t.elapsed().as_secs_f64() * 1e6));
    }
    out.push_str(&format!("{:.3}\n", start.elapsed().as_secs_f64() * 1e6));
    print!("{out}");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
