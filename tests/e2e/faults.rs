//! Fault injection (issue 8, part 2): each fault is injected into a running
//! Fly-shaped setup (`proxypilot sidecar` on a sandbox cgroup, real curl in
//! the sandbox, the fake APIs in a private network namespace), and each test
//! asserts that
//! - the system recovers with no restart by hand,
//! - no request it had already accepted is lost without the client being
//!   told (an error status or a connection the client sees closed; never a
//!   hang: every curl runs with `--max-time`, and a timeout fails the test),
//! - no stale entry is left in the pinned SOCK_ORIGIN / PEER_ORIGIN maps.
//!
//! Clock skew across a leaf's expiry is tested at unit level, next to the
//! leaf cache (proxypilot-userspace/src/tls/leaf.rs,
//! `clock_skew_across_expiry_remints_and_never_serves_an_invalid_leaf`).

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use proxypilot_tests::{
    faults_support::*,
    shapes::{start_tokenizer, FlyShape, Tokenizer},
    upstream::{FakeInternet, ANTHROPIC},
    *,
};
use serde_json::Value;

const URL: &str = "https://api.anthropic.com/echo";
const DUMMY: &str = "x-api-key: dummy";

/// curl exit codes that mean "the client saw the connection fail or close":
/// 7 couldn't connect (refused), 16 HTTP/2 framing, 18 partial transfer,
/// 35 TLS handshake failed, 52 empty reply, 55 send failed, 56 receive
/// failed, 92 HTTP/2 stream error. Never 28 (timed out: a hang).
const CLOSED: [i32; 8] = [7, 16, 18, 35, 52, 55, 56, 92];

/// One curl in the sandbox: (exit code, HTTP status, body).
fn curl(net: &FakeInternet, fly: &FlyShape, args: &[&str]) -> (i32, u16, String) {
    let out = fly
        .sandbox(net, "curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

fn get_ok(net: &FakeInternet, fly: &FlyShape) {
    let (rc, code, body) = curl(net, fly, &[URL, "-H", DUMMY]);
    assert_eq!((rc, code), (0, 200), "{body}\n{}", fly.sidecar_log());
}

/// Every result is a success, an error status with the relay's JSON body,
/// or a connection the client saw fail; returns (ok, error status, closed).
fn check_results(results: &[CurlResult], error_statuses: &[u16]) -> (usize, usize, usize) {
    let (mut ok, mut err, mut closed) = (0, 0, 0);
    for r in results {
        match (r.rc, r.code) {
            (0, 200) => ok += 1,
            (0, code) if error_statuses.contains(&code) => {
                let v: Value = serde_json::from_str(&r.body)
                    .unwrap_or_else(|e| panic!("{code} without a JSON body ({e}): {r:?}"));
                assert!(v["error"].is_string(), "{r:?}");
                err += 1;
            }
            (rc, _) if CLOSED.contains(&rc) => closed += 1,
            _ => panic!("unexpected result {r:?} (28 is a hang) in {results:?}"),
        }
    }
    (ok, err, closed)
}

fn oks_since(r: &[CurlResult], from: usize) -> usize {
    r.iter()
        .skip(from)
        .filter(|x| x.rc == 0 && x.code == 200)
        .count()
}

fn assert_running(fly: &mut FlyShape) {
    assert!(
        fly.sidecar.child.try_wait().unwrap().is_none(),
        "the sidecar exited:\n{}",
        fly.sidecar_log()
    );
}

fn assert_maps_empty(cgroup_id: u64, log: impl Fn() -> String) {
    if let Err(n) = wait_maps_empty(cgroup_id, Duration::from_secs(30)) {
        panic!(
            "stale origin map entries [SOCK_ORIGIN, PEER_ORIGIN] = {n:?}\n{}",
            log()
        );
    }
}

/// No request reached an upstream carrying the sandbox's dummy key (which
/// would mean it bypassed proxypilot).
fn assert_no_dummy_reached_upstream(net: &FakeInternet) {
    for r in net.apis.requests() {
        for h in ["x-api-key", "authorization"] {
            let v = r.header(h).unwrap_or("");
            assert!(
                !v.contains("dummy"),
                "a request reached {} with the dummy key: {r:?}",
                r.host
            );
        }
    }
}

#[test]
fn tokenizer_down_mid_load_gives_502_json_then_recovers_without_a_sidecar_restart() {
    require_root!();
    let net = FakeInternet::start();
    let mut fly = FlyShape::start(&net, "tokdown", Tokenizer::Remote, &[]);
    let pid = fly.sidecar.child.id();
    let load = CurlLoop::start(&net, &fly, "tokdown", 5000, 20, &[URL, "-H", DUMMY]);
    assert!(
        load.wait_until(Duration::from_secs(60), |r| oks_since(r, 0) >= 5),
        "no load got through: {:?}\n{}",
        load.results(),
        fly.sidecar_log()
    );

    fly.tokenizer.as_mut().unwrap().kill9();
    let at_kill = load.results().len();
    assert!(
        load.wait_until(Duration::from_secs(60), |r| {
            r.iter().skip(at_kill + 1).filter(|x| x.code == 502).count() >= 5
        }),
        "no 502s while the tokenizer is down: {:?}",
        load.results()
    );
    let (rc, code, body) = curl(&net, &fly, &[URL, "-H", DUMMY]);
    assert_eq!((rc, code), (0, 502), "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert!(v["error"].as_str().unwrap().contains("tokenizer"), "{v}");
    assert!(v["hint"].is_string(), "{v}");

    // Back on the same port; the sidecar is not touched.
    fly.tokenizer = Some(start_tokenizer(&net, &fly.dir, &fly.dir.join("open.key")));
    let at_back = load.results().len();
    assert!(
        load.wait_until(Duration::from_secs(60), |r| oks_since(r, at_back) >= 5),
        "requests did not succeed again after the tokenizer came back: {:?}\n{}",
        load.results(),
        fly.sidecar_log()
    );
    let results = load.finish(Duration::from_secs(60));
    let (ok, err, closed) = check_results(&results, &[502]);
    eprintln!("tokenizer outage: {ok} ok, {err} 502, {closed} closed");
    assert!(err >= 5);
    get_ok(&net, &fly);
    assert_running(&mut fly);
    assert_eq!(fly.sidecar.child.id(), pid);
    assert_maps_empty(fly.cgroup.id(), || fly.sidecar_log());
}

#[test]
fn upstream_reset_mid_stream_reaches_the_client_as_an_error_and_the_sidecar_keeps_serving() {
    require_root!();
    let net = FakeInternet::start();
    for mode in [Tokenizer::Remote, Tokenizer::Embedded] {
        let mut fly = FlyShape::start(&net, &format!("reset-{mode:?}").to_lowercase(), mode, &[]);
        for _ in 0..3 {
            let (rc, code, _) = curl(
                &net,
                &fly,
                &[
                    "https://api.anthropic.com/reset-after?n=100000",
                    "-H",
                    DUMMY,
                    "-o",
                    "/dev/null",
                ],
            );
            assert!(
                [18, 56, 92].contains(&rc),
                "{mode:?}: curl exit {rc} (status {code}); want 18/56/92\n{}",
                fly.sidecar_log()
            );
            get_ok(&net, &fly);
        }
        // Many at once, on keep-alive and new connections alike.
        let (rc, _, _) = curl(
            &net,
            &fly,
            &[
                "--parallel",
                "https://api.anthropic.com/reset-after?n=5000",
                "-o",
                "/dev/null",
                "https://api.anthropic.com/reset-after?n=1",
                "-o",
                "/dev/null",
                URL,
                "-o",
                "/dev/null",
                "-H",
                DUMMY,
            ],
        );
        assert_ne!(rc, 28, "{mode:?}: a reset hung the client");
        get_ok(&net, &fly);
        assert_running(&mut fly);
        assert_maps_empty(fly.cgroup.id(), || fly.sidecar_log());
    }
    assert!(net
        .apis
        .requests_to(ANTHROPIC)
        .iter()
        .any(|r| r.path.starts_with("/reset-after")));
}

#[test]
fn sigkill_under_load_fails_closed_then_a_new_sidecar_takes_over_the_pinned_programs() {
    require_root!();
    let net = FakeInternet::start();
    let mut fly = FlyShape::start(&net, "sigkill", Tokenizer::Embedded, &[]);
    let spec = ProcessSpec::sidecar(&fly);
    let cg = fly.cgroup.path().to_path_buf();
    assert_eq!(
        attached_programs(&cg).len(),
        7,
        "{:?}",
        attached_programs(&cg)
    );

    // Sample the attached programs all along (bounded by the stop flag).
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (stop, counts, cg) = (stop.clone(), counts.clone(), cg.clone());
        thread::spawn(move || {
            for _ in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Distinct programs: during a takeover the new copy is
                // attached before the old one goes, so 8..14 links is
                // fine; fewer than 7 distinct programs is a gap.
                let names: std::collections::BTreeSet<String> = attached_programs(&cg)
                    .iter()
                    .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                    .collect();
                counts.lock().unwrap().push(names.len());
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let load = CurlLoop::start(&net, &fly, "sigkill", 5000, 20, &[URL, "-H", DUMMY]);
    assert!(
        load.wait_until(Duration::from_secs(60), |r| oks_since(r, 0) >= 5),
        "{:?}\n{}",
        load.results(),
        fly.sidecar_log()
    );
    fly.sidecar.kill9();

    // The gap: fail closed. Connects are refused; nothing reaches the real API.
    let r = probe_one(&cg, &["tcp", "203.0.113.11", "443"]);
    assert_eq!(
        (r["ok"].as_bool(), r["errno"].as_str()),
        (Some(false), Some("ECONNREFUSED")),
        "{r}"
    );
    let at_kill = load.results().len();
    assert!(
        load.wait_until(Duration::from_secs(60), |r| {
            r.iter().skip(at_kill).any(|x| x.rc == 7)
        }),
        "curls during the gap were not refused: {:?}",
        load.results()
    );
    assert_eq!(attached_programs(&cg).len(), 7);

    // Same command line, same cgroup: takes the pinned programs over.
    fly.sidecar = spec.start(&net, fly.dir.join("sidecar-2.log"));
    let at_restart = load.results().len();
    assert!(
        load.wait_until(Duration::from_secs(60), |r| oks_since(r, at_restart) >= 5),
        "no success after the restart: {:?}\n{}",
        load.results(),
        fly.sidecar_log()
    );
    let results = load.finish(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let (ok, _, closed) = check_results(&results, &[]);
    eprintln!("sigkill: {ok} ok, {closed} refused or closed");
    let counts = counts.lock().unwrap().clone();
    assert!(counts.len() >= 3, "{counts:?}");
    assert!(
        counts.iter().all(|n| *n == 7),
        "some of the 7 programs were missing at times (distinct programs per sample): {counts:?}"
    );
    assert_eq!(attached_programs(&cg).len(), 7);
    assert_no_dummy_reached_upstream(&net);
    get_ok(&net, &fly);
    assert_running(&mut fly);
    assert_maps_empty(fly.cgroup.id(), || fly.sidecar_log());
}

#[test]
fn sandbox_cgroup_removed_with_connections_open_leaves_the_sidecar_running_and_maps_empty() {
    require_root!();
    let net = FakeInternet::start();
    let mut fly = FlyShape::start(&net, "rmcg", Tokenizer::Embedded, &[]);
    let id = fly.cgroup.id();
    get_ok(&net, &fly);
    // Long streams (about 100 s each), left open.
    let mut streams: Vec<_> = (0..4)
        .map(|_| {
            fly.sandbox(&net, "curl")
                .args([
                    "-sS",
                    "-N",
                    "--max-time",
                    "120",
                    "https://api.anthropic.com/sse?n=1000&gap_ms=100",
                    "-H",
                    DUMMY,
                ])
                .command()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(30), || origin_entries(id)[0] >= 4),
        "the streams did not open: {:?}\n{}",
        origin_entries(id),
        fly.sidecar_log()
    );

    let cg = fly.cgroup.path().to_path_buf();
    fs::write(cg.join("cgroup.kill"), "1").unwrap();
    for s in &mut streams {
        assert!(
            wait_for(Duration::from_secs(20), || matches!(
                s.try_wait(),
                Ok(Some(_))
            )),
            "a sandbox process survived cgroup.kill"
        );
    }
    assert!(wait_for(Duration::from_secs(20), || {
        fs::read_to_string(cg.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
    }));
    assert!(
        wait_for(Duration::from_secs(20), || fs::remove_dir(&cg).is_ok()
            || !cg.exists()),
        "rmdir {}",
        cg.display()
    );
    assert!(!cg.exists());

    thread::sleep(Duration::from_secs(1));
    assert_running(&mut fly);
    // Still serving: its info port answers (from outside any sandbox).
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "http://127.0.0.1:15480/ca.pem"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "{out:?}"
    );
    assert_maps_empty(id, || fly.sidecar_log());
    assert_running(&mut fly);
}

/// Leaves the calling thread (and what it spawns) in a private mount
/// namespace with a full 8 KiB tmpfs on `dir`; unmounted on drop.
struct FullDisk {
    dir: std::path::PathBuf,
}

impl FullDisk {
    fn mount(dir: &Path) -> FullDisk {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        run_ok(Command::new("mount").args(["--make-rprivate", "/"]));
        fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs"])
                .arg(dir),
        );
        // Fill it: dd stops at ENOSPC.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1k", "count=64"])
            .arg(format!("of={}", dir.join("fill").display()))
            .stderr(Stdio::null())
            .status();
        FullDisk {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Runs the sidecar `spec` until it exits by itself (bounded); its status
/// and stderr.
fn run_to_exit(spec: &ProcessSpec, net: &FakeInternet) -> (std::process::ExitStatus, String) {
    let mut child = spec
        .command(net)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || read_all(&mut stderr));
    let exited = wait_for(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the sidecar kept running on a full disk");
    }
    let status = child.wait().unwrap();
    (status, reader.join().unwrap())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    left
}

#[test]
fn disk_full_when_the_ca_is_written_exits_non_zero_before_attaching_and_leaves_no_key() {
    require_root!();
    let net = FakeInternet::start();
    // A working sidecar's exact command line, then it goes away.
    let mut spec = {
        let fly = FlyShape::start(&net, "diskfull-template", Tokenizer::Embedded, &[]);
        ProcessSpec::sidecar(&fly)
    };
    let cg = TestCgroup::new("diskfull");
    let state = net.dir.0.join("fullstate");
    let ca_out = net.dir.0.join("ca-full.pem");
    let full = FullDisk::mount(&state);
    spec.set_arg("--cgroup", cg.path())
        .set_arg("--state-dir", &state)
        .set_arg("--ca-out", &ca_out);
    let nothing_attached = |err: &str| {
        assert_eq!(attached_programs(cg.path()), Vec::<String>::new(), "{err}");
        assert!(!pin_dir(cg.id()).join("link-connect4").exists(), "{err}");
        assert!(!ca_out.exists(), "--ca-out written although the CA failed");
    };

    // 1. Completely full: the key cannot be written.
    let (status, err) = run_to_exit(&spec, &net);
    assert!(!status.success(), "{status}: {err}");
    assert!(
        err.contains(&state.join("ca-key.pem").display().to_string()),
        "the error names the path: {err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    nothing_attached(&err);
    // No key, and no half-written temporary file with key material.
    assert_eq!(listing(&state), vec!["fill".to_string()], "{err}");

    // 2. Room for two of the three files (8 KiB of tmpfs is two pages): the
    //    key and certificate land, the metadata does not.
    fs::remove_file(state.join("fill")).unwrap();
    let (status, err) = run_to_exit(&spec, &net);
    assert!(!status.success(), "{status}: {err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    nothing_attached(&err);
    let left = listing(&state);
    assert!(
        left.iter().all(|f| !f.ends_with(".tmp")),
        "half-written file left: {left:?}"
    );
    let stale_key = fs::read(state.join("ca-key.pem")).ok();

    // 3. With space again the same command starts, and does not trust what
    //    the failed start left: a complete, new CA.
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,size=1m"])
            .arg(&state),
    );
    let sidecar = spec.start(&net, net.dir.0.join("diskfull-2.log"));
    assert_eq!(attached_programs(cg.path()).len(), 7);
    for f in ["ca-key.pem", "ca-cert.pem", "ca-meta.json"] {
        assert!(has_file(&state, f), "{f}: {}", sidecar.stderr());
    }
    if let Some(stale) = stale_key {
        assert_ne!(
            fs::read(state.join("ca-key.pem")).unwrap(),
            stale,
            "the key of the failed start was trusted: {}",
            sidecar.stderr()
        );
    }
    assert_eq!(
        fs::read_to_string(&ca_out).unwrap(),
        fs::read_to_string(state.join("ca-cert.pem")).unwrap()
    );
    drop(sidecar);
    drop(full);
}

/// Held in the sandbox: opens N connections to the redirected port without
/// sending anything, reports how many the sidecar closed within the wait,
/// then holds the rest until stdin closes.
const HOLD: &str = r#"
import select, socket, sys, time
host, port, n, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks, failed = [], 0
for _ in range(n):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, port))
        socks.append(s)
    except OSError:
        failed += 1
closed = set()
deadline = time.time() + 30
while time.time() < deadline and len(closed) + failed < want:
    live = [s for s in socks if s.fileno() not in closed]
    r, _, _ = select.select(live, [], [], 0.5)
    for s in r:
        try:
            data = s.recv(1)
        except OSError:
            data = b""
        if not data:
            closed.add(s.fileno())
print("held", len(socks) - len(closed), "closed", len(closed), "failed", failed, flush=True)
sys.stdin.read()
for s in socks:
    s.close()
"#;

#[test]
fn out_of_file_descriptors_sheds_excess_connections_and_recovers() {
    require_root!();
    let net = FakeInternet::start();
    let mut fly = FlyShape::start(
        &net,
        "nofile",
        Tokenizer::Embedded,
        &["--handshake-timeout", "120s"],
    );
    get_ok(&net, &fly);
    let pid = fly.sidecar.child.id();
    let base = fd_count(pid);
    let limit = 64.max(base + 16);
    run_ok(
        Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={limit}:{limit}")),
    );

    const N: usize = 150;
    // About limit - base can be held (a few descriptors of the sidecar come
    // and go, e.g. pooled upstream connections); the rest must be closed.
    let want = N - (limit - base) - 4;
    let mut hold = fly
        .sandbox(&net, "python3")
        .args(["-c", HOLD, "203.0.113.11", "443"])
        .arg(N.to_string())
        .arg(want.to_string())
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(hold.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 3, "{line:?}");
    let (held, closed, failed) = (nums[0], nums[1], nums[2]);
    eprintln!(
        "fd limit {limit} (base {base}): held {held}, closed {closed}, connect failed {failed}"
    );
    assert!(
        closed + failed >= want,
        "excess connections were left hanging: {line}\n{}",
        fly.sidecar_log()
    );
    assert!(held > 0, "{line}");
    assert_running(&mut fly);
    // A request now is answered or refused, never left hanging.
    let (rc, code, _) = curl(&net, &fly, &[URL, "-H", DUMMY]);
    assert_ne!(rc, 28, "a request hung while descriptors ran out");
    eprintln!("request while out of fds: curl {rc}, status {code}");

    // Release them; the sidecar serves again.
    drop(hold.stdin.take());
    let _ = hold.wait();
    assert!(
        wait_for(Duration::from_secs(30), || fd_count(pid) <= base + 4),
        "descriptors not released: {} (base {base})",
        fd_count(pid)
    );
    get_ok(&net, &fly);
    assert_running(&mut fly);
    assert!(fly.sidecar_log().contains("out of file descriptors"));
    // Every shed or finished connection gave its slot back, and the one
    // intercepted host still has exactly one leaf.
    assert!(
        wait_for(Duration::from_secs(30), || fly.stats(&net)
            ["connections_open"]
            == 0),
        "connection slots leaked: {}",
        fly.stats(&net)
    );
    let stats = fly.stats(&net);
    assert_eq!(
        (
            &stats["leaf_certificates_cached"],
            &stats["leaf_certificates_minted"]
        ),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{stats}"
    );
    assert_maps_empty(fly.cgroup.id(), || fly.sidecar_log());
    let _ = std::io::stderr().flush();
}
