//! connect()+close from inside a sandbox cgroup, redirected by the programs
//! to a loopback listener, against a plain connect to the same listener
//! from an identical cgroup without programs. Prints both medians and their
//! ratio; run with `cargo xtask bench kernel` (as root).
//!
//! The client is this same binary re-executed inside each cgroup, so both
//! sides run identical compiled code.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    thread,
    time::Instant,
};

use proxypilot::kernel::Attachment;
use proxypilot_tests::*;

const CONNECTS: usize = 10_000;
const ROUNDS: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        client(args[2].parse().unwrap(), args[3].parse().unwrap());
        return;
    }
    if !privileged() {
        return;
    }
    let _ns = NetNs::enter_new(&["203.0.113.10/32"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = listener.local_addr().unwrap();
    let with = TestCgroup::new("bench-with");
    let without = TestCgroup::new("bench-without");

    let policy = test_policy(&[listen], vec![]);
    let attachment = Arc::new(Attachment::attach(with.path(), &policy).unwrap());
    {
        let attachment = attachment.clone();
        // Accept and consume the record, as the proxy does.
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let peer = conn.peer_addr().unwrap();
                let _ = attachment.original_destination(peer);
            }
        });
    }

    let per_round = CONNECTS / ROUNDS;
    let (mut redirected, mut direct) = (Vec::new(), Vec::new());
    // Alternate the two sides so drift on a noisy machine hits both.
    for _ in 0..ROUNDS {
        direct.extend(run_client(without.path(), &listen.to_string(), per_round));
        redirected.extend(run_client(with.path(), "203.0.113.10:443", per_round));
    }
    let (r, d) = (median(&mut redirected), median(&mut direct));
    println!(
        "kernel connect()+close, {} connects each, medians:",
        CONNECTS
    );
    println!("  direct to the listener (no programs): {:>8.1} µs", d);
    println!("  redirected by connect4 + sock_ops:     {:>8.1} µs", r);
    println!("  ratio redirected/direct:               {:>8.2}", r / d);
    println!(
        "  records left in the origin map:        {}",
        attachment.pending_origins()
    );
}

fn run_client(cg: &std::path::Path, target: &str, n: usize) -> Vec<f64> {
    let exe = std::env::current_exe().unwrap();
    let out = run_ok(in_cgroup(cg, exe.to_str().unwrap()).args(["client", target, &n.to_string()]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Connects and closes `n` times, printing each duration in µs.
fn client(target: SocketAddr, n: usize) {
    let mut out = String::with_capacity(n * 8);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect(target).expect("connect");
        drop(s);
        out.push_str(&format!("{:.3}\n", t.elapsed().as_secs_f64() * 1e6));
    }
    print!("{out}");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
