//! The kernel layer for real: programs attached to a test cgroup, clients in
//! it, every non-loopback address inside a network namespace of the test's
//! own.

use std::{
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use proxypilot::kernel::{AllowRule, Attachment};
use proxypilot_tests::*;
use serde_json::Value;

const DEST4: &str = "203.0.113.10";
const DEST6: &str = "2001:db8::10";
const PROGRAMS: usize = ATTACHED_PROGRAMS;

/// Attaches with the test process (not in the sandbox cgroup) exempt, and
/// serves an [`OriginEcho`] as the proxy.
fn attach_with_echo(cg: &TestCgroup, allowed: Vec<AllowRule>) -> (Arc<Attachment>, OriginEcho) {
    let listeners = OriginEcho::bind();
    let policy = test_policy(
        &[
            listeners.0.local_addr().unwrap(),
            listeners.1.local_addr().unwrap(),
        ],
        allowed,
    );
    let attachment = Arc::new(Attachment::attach(cg.path(), &policy).expect("attach"));
    let echo = OriginEcho::serve(listeners, attachment.clone());
    (attachment, echo)
}

fn assert_redirected(r: &Value, want_orig: &str) {
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reply"]["orig"], want_orig, "recovered destination: {r}");
    assert_eq!(r["reply"]["pid"], r["pid"], "recorded pid: {r}");
    assert_eq!(r["reply"]["comm"], "python3", "recorded comm: {r}");
    // getpeername shows the original peer, not the proxy.
    assert_eq!(r["peer"], want_orig, "getpeername: {r}");
}

fn assert_errno(r: &Value, errno: &str) {
    assert_eq!(r["ok"], false, "expected {errno}: {r}");
    assert_eq!(r["errno"], errno, "{r}");
}

#[test]
fn redirects_ipv4_ipv6_and_v4_mapped_and_shows_the_original_peer() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32"), &format!("{DEST6}/128")]);
    let cg = TestCgroup::new("redirect");
    let (attachment, _echo) = attach_with_echo(&cg, vec![]);

    assert_redirected(
        &probe_one(cg.path(), &["tcp", DEST4, "443"]),
        "203.0.113.10:443",
    );
    assert_redirected(
        &probe_one(cg.path(), &["tcp", DEST6, "443"]),
        "[2001:db8::10]:443",
    );
    // A dual-stack socket to a v4-mapped address runs connect6 only.
    let mapped = probe_one(cg.path(), &["tcp6", "::ffff:203.0.113.10", "443"]);
    assert_eq!(mapped["reply"]["orig"], "203.0.113.10:443", "{mapped}");
    assert_eq!(mapped["peer"], "[::ffff:203.0.113.10]:443", "{mapped}");

    assert_eq!(attachment.pending_origins(), 0);
    wait_until("socket records are forgotten on close", || {
        attachment.tracked_sockets() == 0
    });
}

#[test]
fn recovers_500_concurrent_connections_from_5_processes_exactly() {
    require_root!();
    let dests: Vec<String> = (1..=50).map(|i| format!("203.0.113.{i}/32")).collect();
    let dest_refs: Vec<&str> = dests.iter().map(String::as_str).collect();
    let _ns = NetNs::enter_new(&dest_refs);
    let cg = TestCgroup::new("concurrent");
    let (attachment, _echo) = attach_with_echo(&cg, vec![]);

    // Each process opens 100 connections (two to each of 50 destinations)
    // before talking on any, so all 500 are open at the same time.
    let targets: Vec<String> = (0..100)
        .map(|i| format!("203.0.113.{}:443", i % 50 + 1))
        .collect();
    let children: Vec<_> = (0..5)
        .map(|_| {
            netprobe(cg.path())
                .arg("many")
                .args(&targets)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seen = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            assert_redirected(&r, r["dst"].as_str().unwrap());
            seen += 1;
        }
    }
    assert_eq!(seen, 500);
    assert_eq!(
        attachment.pending_origins(),
        0,
        "records left in PEER_ORIGIN"
    );
    wait_until("socket records are forgotten on close", || {
        attachment.tracked_sockets() == 0
    });
}

#[test]
fn allowed_cidr_and_port_pass_and_everything_else_is_eperm() {
    require_root!();
    let _ns = NetNs::enter_new(&["203.0.113.20/32", "203.0.113.30/32", "2001:db8::20/128"]);
    let real = real_server("203.0.113.20:8080");
    let _other = real_server("203.0.113.20:8081");
    let _v6 = real_server("[2001:db8::20]:8080");
    let cg = TestCgroup::new("allow");
    let allowed = vec![
        "203.0.113.20/32:8080".parse().unwrap(),
        "[2001:db8::/32]:8080".parse().unwrap(),
    ];
    let (_attachment, _echo) = attach_with_echo(&cg, allowed);

    let r = probe_one(cg.path(), &["tcp", "203.0.113.20", "8080"]);
    assert_eq!(r["reply"]["real"], real.to_string(), "{r}");
    let r = probe_one(cg.path(), &["tcp", "2001:db8::20", "8080"]);
    assert_eq!(r["reply"]["real"], "[2001:db8::20]:8080", "{r}");
    // Same host, other port; other host; IPv6 elsewhere; v4-mapped.
    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.20", "8081"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.30", "80"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["tcp", "2001:db8::20", "22"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["tcp6", "::ffff:203.0.113.30", "80"]),
        "EPERM",
    );
    // The v4-mapped form of an allowed destination is allowed too.
    let r = probe_one(cg.path(), &["tcp6", "::ffff:203.0.113.20", "8080"]);
    assert_eq!(r["reply"]["real"], real.to_string(), "{r}");
    // Loopback is not special: it is denied unless allowed.
    assert_errno(&probe_one(cg.path(), &["tcp", "127.0.0.1", "22"]), "EPERM");
}

#[test]
fn udp_only_reaches_the_dns_server_and_never_port_443() {
    require_root!();
    let _ns = NetNs::enter_new(&["203.0.113.53/32", "203.0.113.40/32", "2001:db8::53/128"]);
    let dns = udp_sink("203.0.113.53:53");
    let dns6 = udp_sink("[2001:db8::53]:53");
    let _quic = udp_sink("203.0.113.53:443");
    let cg = TestCgroup::new("udp");
    let dns_rules = vec![
        AllowRule::dns("203.0.113.53".parse().unwrap()),
        AllowRule::dns("2001:db8::53".parse().unwrap()),
    ];
    let (_attachment, _echo) = attach_with_echo(&cg, dns_rules);

    assert_eq!(
        probe_one(cg.path(), &["udp", "203.0.113.53", "53"])["ok"],
        true
    );
    assert_eq!(
        probe_one(cg.path(), &["udp-connect", "203.0.113.53", "53"])["ok"],
        true
    );
    assert_eq!(
        probe_one(cg.path(), &["udp", "2001:db8::53", "53"])["ok"],
        true
    );
    wait_until("the DNS server got both datagrams", || {
        dns.lock().unwrap().len() == 2
    });
    wait_until("the IPv6 DNS server got its datagram", || {
        dns6.lock().unwrap().len() == 1
    });

    assert_errno(
        &probe_one(cg.path(), &["udp", "203.0.113.40", "9999"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["udp-connect", "203.0.113.40", "9999"]),
        "EPERM",
    );
    // QUIC is denied even to the allowed server.
    assert_errno(
        &probe_one(cg.path(), &["udp", "203.0.113.53", "443"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["udp-connect", "203.0.113.53", "443"]),
        "EPERM",
    );
    // A resolver that is not allowed.
    assert_errno(
        &probe_one(cg.path(), &["udp", "203.0.113.40", "53"]),
        "EPERM",
    );
}

#[test]
fn outside_processes_are_untouched_and_child_cgroups_are_covered() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32")]);
    let real = real_server(&format!("{DEST4}:443"));
    let cg = TestCgroup::new("scope");
    let child = cg.child("nested");
    let (_attachment, _echo) = attach_with_echo(&cg, vec![]);

    // This process is outside the sandbox cgroup.
    let mut s = std::net::TcpStream::connect(real).unwrap();
    use std::io::Write;
    writeln!(s, "hi").unwrap();
    assert!(read_all(s).contains("real"));
    // A process in a cgroup below the sandbox is covered.
    assert_redirected(
        &probe_one(&child, &["tcp", DEST4, "443"]),
        "203.0.113.10:443",
    );
    assert_errno(&probe_one(&child, &["tcp", DEST4, "80"]), "EPERM");
}

#[test]
fn the_sidecars_own_connects_are_not_redirected_even_inside_the_attach_point() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32")]);
    let real = real_server(&format!("{DEST4}:443"));
    let cg = TestCgroup::new("exempt");
    let proxy_cg = cg.child("proxy");
    let sandbox_cg = cg.child("sandbox");
    let dir = TempDir::new("exempt");
    let ready = dir.0.join("ready");
    let mut cmd = in_cgroup(&proxy_cg, proxypilot_bin().to_str().unwrap());
    cmd.args(["sidecar", "--cgroup"])
        .arg(cg.path())
        .arg("--ready-file")
        .arg(&ready);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--state-dir",
    ])
    .arg(dir.0.join("state"));
    let _sidecar = Proxypilot::start(cmd, &ready, dir.0.join("stderr"));

    // Same cgroup as the sidecar: exempt, reaches the real server.
    let r = probe_one(&proxy_cg, &["tcp", DEST4, "443"]);
    assert_eq!(r["reply"]["real"], real.to_string(), "{r}");
    // The sandbox next to it is redirected to the sidecar, which closes a
    // connection that does not speak TLS: no reply, and not the real one.
    let r = probe_one(&sandbox_cg, &["tcp", DEST4, "443"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["reply"].get("real").is_none(), "{r}");
    assert_errno(&probe_one(&sandbox_cg, &["tcp", DEST4, "80"]), "EPERM");
}

#[test]
fn fails_closed_after_sigkill_then_takeover_and_detach() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32"), "203.0.113.30/32"]);
    let real = real_server(&format!("{DEST4}:443"));
    let cg = TestCgroup::new("failclosed");
    let dir = TempDir::new("failclosed");
    let ready = dir.0.join("ready");
    let sidecar = |n: &str| {
        let mut cmd = Command::new(proxypilot_bin());
        cmd.args(["sidecar", "--cgroup"])
            .arg(cg.path())
            .arg("--ready-file")
            .arg(&ready);
        cmd.args([
            "--listen",
            "127.0.0.1:15443",
            "--listen",
            "[::1]:15443",
            "--state-dir",
        ])
        .arg(dir.0.join("state"));
        Proxypilot::start(cmd, &ready, dir.0.join(format!("stderr-{n}")))
    };

    let mut first = sidecar("first");
    assert_eq!(
        attached_programs(cg.path()).len(),
        PROGRAMS,
        "{:?}",
        attached_programs(cg.path())
    );
    first.kill9();

    // Nobody listens, but the programs stay: refused, never the real server.
    let r = probe_one(cg.path(), &["tcp", DEST4, "443"]);
    assert_errno(&r, "ECONNREFUSED");
    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.30", "80"]),
        "EPERM",
    );
    assert_eq!(attached_programs(cg.path()).len(), PROGRAMS);

    // A new sidecar takes the pinned programs over: as many, not twice.
    let second = sidecar("second");
    let progs = attached_programs(cg.path());
    assert_eq!(progs.len(), PROGRAMS, "{progs:?}");
    let r = probe_one(cg.path(), &["tcp", DEST4, "443"]);
    assert_eq!(r["ok"], true, "connect reaches the new sidecar: {r}");
    assert!(r["reply"].get("real").is_none(), "{r}");
    wait_until("the second sidecar logged the original destination", || {
        second.stderr().contains("203.0.113.10:443")
    });
    drop(second);

    let out = run_ok(
        Command::new(proxypilot_bin())
            .arg("detach")
            .arg("--cgroup")
            .arg(cg.path()),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached"));
    assert_eq!(attached_programs(cg.path()), Vec::<String>::new());
    // With the programs gone the sandbox reaches the real server again.
    let r = probe_one(cg.path(), &["tcp", DEST4, "443"]);
    assert_eq!(r["reply"]["real"], real.to_string(), "{r}");
    let out = run_ok(
        Command::new(proxypilot_bin())
            .arg("detach")
            .arg("--cgroup")
            .arg(cg.path()),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing"));
}

#[test]
fn policy_updates_apply_while_running() {
    require_root!();
    let _ns = NetNs::enter_new(&["203.0.113.20/32"]);
    let real = real_server("203.0.113.20:8080");
    let cg = TestCgroup::new("update");
    let listeners = OriginEcho::bind();
    let mut policy = test_policy(
        &[
            listeners.0.local_addr().unwrap(),
            listeners.1.local_addr().unwrap(),
        ],
        vec![],
    );
    let attachment = Arc::new(Attachment::attach(cg.path(), &policy).unwrap());
    let _echo = OriginEcho::serve(listeners, attachment.clone());

    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.20", "8080"]),
        "EPERM",
    );
    policy.allowed = vec!["203.0.113.20:8080".parse().unwrap()];
    policy.intercept_ports = vec![443, 8443];
    attachment.set_policy(&policy).unwrap();
    let r = probe_one(cg.path(), &["tcp", "203.0.113.20", "8080"]);
    assert_eq!(r["reply"]["real"], real.to_string(), "{r}");
    assert_redirected(
        &probe_one(cg.path(), &["tcp", "203.0.113.20", "8443"]),
        "203.0.113.20:8443",
    );
    policy.allowed.clear();
    policy.intercept_ports = vec![443];
    attachment.set_policy(&policy).unwrap();
    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.20", "8080"]),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["tcp", "203.0.113.20", "8443"]),
        "EPERM",
    );
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dialling_the_proxys_listener_directly_is_refused() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32")]);
    let cg = TestCgroup::new("direct");
    let (_attachment, echo) = attach_with_echo(&cg, vec![]);
    assert_errno(
        &probe_one(
            cg.path(),
            &["tcp", "127.0.0.1", &echo.v4.port().to_string()],
        ),
        "EPERM",
    );
    assert_errno(
        &probe_one(cg.path(), &["tcp", "::1", &echo.v6.port().to_string()]),
        "EPERM",
    );
    // The redirected path still works.
    assert_redirected(
        &probe_one(cg.path(), &["tcp", DEST4, "443"]),
        "203.0.113.10:443",
    );
}

/// Another local user who controls a pin directory could unpin the links
/// and so detach the sandbox's programs. A takeover that finds the
/// sandbox's pin directory owned by someone else refuses, naming it, and
/// the programs already attached keep enforcing.
#[test]
fn a_pin_directory_another_user_controls_is_refused_and_the_programs_stay() {
    require_root!();
    let _ns = NetNs::enter_new(&[&format!("{DEST4}/32")]);
    let cg = TestCgroup::new("foreign-pins");
    let (attachment, _echo) = attach_with_echo(&cg, vec![]);
    let before = attached_programs(cg.path());
    assert!(!before.is_empty());
    let pins = proxypilot::kernel::bpffs::pin_dir(cg.id());

    // As if uid 65534 had created it before proxypilot did.
    std::os::unix::fs::chown(&pins, Some(65534), Some(65534)).unwrap();
    let policy = test_policy(&[], vec![]);
    let err = match Attachment::attach(cg.path(), &policy) {
        Ok(_) => panic!("attached into a pin directory owned by uid 65534"),
        Err(e) => format!("{e:#}"),
    };
    std::os::unix::fs::chown(&pins, Some(0), Some(0)).unwrap();
    assert!(
        err.contains(&pins.display().to_string()) && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert_eq!(attached_programs(cg.path()), before);
    assert_errno(&probe_one(cg.path(), &["tcp", DEST4, "80"]), "EPERM");
    assert_redirected(
        &probe_one(cg.path(), &["tcp", DEST4, "443"]),
        "203.0.113.10:443",
    );
    attachment.detach().unwrap();
}
