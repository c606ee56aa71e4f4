//! The escape suite: every way out of the sandbox we could think of, tried
//! from inside the sandbox cgroup (as root unless said otherwise, and as
//! `nobody` where privileges matter), each with its failure asserted
//! exactly. SECURITY.md lists each attempt with the test that covers it.

use std::{fs, process::Stdio};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer, TOKENIZER_PORT},
    upstream::{FakeInternet, RealKeys, ANTHROPIC, DNS_IP},
    *,
};
use serde_json::Value;

/// The system Python: world-readable, so `nobody` can run the probe too.
const PY: &str = "/usr/bin/python3";

fn world() -> FakeInternet {
    FakeInternet::start_with(
        RealKeys::default(),
        proxypilot_tests::upstream::standard_hosts(),
        &["203.0.113.40/32", "2001:db8::40/128"],
    )
}

/// Runs the network probe in the sandbox; `nobody` drops to uid 65534.
fn probe(net: &FakeInternet, fly: &FlyShape, nobody: bool, args: &[&str]) -> Value {
    let mut cmd = fly
        .sandbox(net, PY)
        .arg(support_dir().join("netprobe.py"))
        .args(args);
    if nobody {
        cmd = cmd.user(65534, 65534);
    }
    let out = cmd.command().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

fn eperm(v: &Value) {
    assert_eq!(
        (v["ok"].as_bool(), v["errno"].as_str()),
        (Some(false), Some("EPERM")),
        "{v}"
    );
}

/// Runs a shell snippet in the sandbox and returns stdout.
fn sh(net: &FakeInternet, fly: &FlyShape, nobody: bool, script: &str) -> String {
    let mut cmd = fly.sandbox(net, "/bin/sh").args(["-c", script]);
    if nobody {
        cmd = cmd.user(65534, 65534);
    }
    let out = cmd.command().stdin(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tcp_and_udp_escapes_fail_with_eperm() {
    require_root!();
    let net = world();
    let _real = real_server("203.0.113.40:80");
    let _real6 = real_server("[2001:db8::40]:80");
    let _sink = udp_sink("203.0.113.40:9999");
    let fly = FlyShape::start(&net, "escape-net", Tokenizer::Embedded, &[]);
    // TCP: IPv4, IPv6, v4-mapped, a port other than the intercepted one.
    eperm(&probe(&net, &fly, false, &["tcp", "203.0.113.40", "80"]));
    eperm(&probe(&net, &fly, false, &["tcp", "2001:db8::40", "80"]));
    eperm(&probe(
        &net,
        &fly,
        false,
        &["tcp6", "::ffff:203.0.113.40", "80"],
    ));
    eperm(&probe(&net, &fly, false, &["tcp", "203.0.113.11", "8443"]));
    // TCP Fast Open carries data in the SYN: still decided by connect4.
    eperm(&probe(&net, &fly, false, &["tfo", "203.0.113.40", "80"]));
    // UDP: plain, connected, QUIC, and DNS to a resolver that is not allowed.
    eperm(&probe(&net, &fly, false, &["udp", "203.0.113.40", "9999"]));
    eperm(&probe(
        &net,
        &fly,
        false,
        &["udp-connect", "203.0.113.40", "9999"],
    ));
    eperm(&probe(&net, &fly, false, &["udp", "203.0.113.11", "443"]));
    // DNS to any address goes to proxypilot's resolver (tests/e2e/dns.rs
    // checks that nothing reaches the address itself).
    assert_eq!(
        probe(&net, &fly, false, &["udp", "203.0.113.40", "53"])["ok"],
        true
    );
    assert_eq!(
        probe(&net, &fly, false, &["udp", "203.0.113.53", "53"])["ok"],
        true
    );
}

#[test]
fn raw_and_packet_sockets_need_privileges_the_sandbox_user_lacks() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-raw", Tokenizer::Embedded, &[]);
    let script = "import socket, errno\n\
        for fam, typ, proto in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP), (socket.AF_PACKET, socket.SOCK_RAW, 0)]:\n\
        \x20   try:\n\
        \x20       socket.socket(fam, typ, proto); print('opened')\n\
        \x20   except OSError as e:\n\
        \x20       print(errno.errorcode[e.errno])\n";
    let out = fly
        .sandbox(&net, PY)
        .args(["-c", script])
        .user(65534, 65534)
        .command()
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "EPERM\nEPERM\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn loopback_services_other_than_the_info_port_are_unreachable() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-lo", Tokenizer::Remote, &[]);
    // The tokenizer, and the sidecar's own listener dialled directly.
    eperm(&probe(
        &net,
        &fly,
        false,
        &["tcp", "127.0.0.1", &TOKENIZER_PORT.to_string()],
    ));
    eperm(&probe(&net, &fly, false, &["tcp", "127.0.0.1", "15443"]));
    eperm(&probe(&net, &fly, false, &["tcp", "::1", "15443"]));
    eperm(&probe(&net, &fly, false, &["tcp", "127.0.0.1", "22"]));
    // The info port serves the CA and the policy, and nothing secret.
    let ca = sh(&net, &fly, false, "curl -sS http://127.0.0.1:15480/ca.pem");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let policy = sh(&net, &fly, false, "curl -sS http://127.0.0.1:15480/policy");
    let v: Value = serde_json::from_str(&policy).unwrap_or_else(|e| panic!("{e}: {policy}"));
    assert!(policy.contains(ANTHROPIC), "{policy}");
    for needle in ["sk-", "ghp_", "SEALED"] {
        assert!(!policy.contains(needle), "{needle} in /policy: {v}");
    }
    // /stats is counters only, and the names the resolver refused.
    let stats = fly.stats(&net);
    let fields = stats.as_object().unwrap_or_else(|| panic!("{stats}"));
    assert!(fields.contains_key("leaf_certificates_cached"), "{stats}");
    assert!(
        fields
            .iter()
            .all(|(k, v)| v.is_u64() || (k == "dns_denied_names" && v.is_array())),
        "{stats}"
    );
}

#[test]
fn a_sealed_secret_the_sandbox_got_hold_of_cannot_be_replayed() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-replay", Tokenizer::Remote, &[]);
    // On Fly every container can read the app's secrets, sealed ones
    // included (the /.fly/api note in the original README). Give the
    // sandbox one, as that endpoint would.
    let sealed = sealed_anthropic_secret(&fly);
    // 1. Straight to the tokenizer: the kernel refuses the connect.
    let out = fly
        .sandbox(&net, "curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "-x",
        ])
        .arg(format!("http://127.0.0.1:{TOKENIZER_PORT}"))
        .args([
            "-H",
            &format!("Proxy-Tokenizer: {sealed}"),
            "http://api.anthropic.com/v1/messages",
        ])
        .command()
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl could not connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2. Smuggled inside an intercepted request: the relay strips it, so
    // only the relay's own secret (for this host) is applied.
    let out = sh(
        &net,
        &fly,
        false,
        &format!("curl -sS -H 'x-api-key: dummy' -H 'Proxy-Tokenizer: {sealed}' https://api.openai.com/echo"),
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        v.to_string()
            .to_lowercase()
            .find("proxy-tokenizer")
            .is_none(),
        "{v}"
    );
    let reqs = net.apis.requests_to("api.openai.com");
    assert_eq!(reqs.len(), 1);
    assert!(
        reqs[0].header("x-api-key") == Some("dummy"),
        "the smuggled anthropic secret was not applied: {:?}",
        reqs[0].headers
    );
}

/// The sealed Anthropic secret, as the sidecar got it in its environment.
fn sealed_anthropic_secret(fly: &FlyShape) -> String {
    let environ = fs::read(format!("/proc/{}/environ", fly.sidecar.child.id())).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("ANTHROPIC_SEALED="))
        .expect("the sidecar holds ANTHROPIC_SEALED")
        .to_string()
}

#[test]
fn host_fronting_and_several_authorities_on_one_connection_are_refused() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-front", Tokenizer::Embedded, &[]);
    // HTTP/1.1: SNI api.anthropic.com, Host api.openai.com.
    let code = sh(&net, &fly, false, "curl -s -o /dev/null -w '%{http_code}' -H 'Host: api.openai.com' https://api.anthropic.com/echo");
    assert_eq!(code, "421");
    // HTTP/2: a good request, then another :authority on the same connection.
    let out = sh(
        &net,
        &fly,
        false,
        "curl -s --http2 -o /dev/null -w '%{http_code} %{num_connects}\\n' https://api.anthropic.com/echo \
         --next --http2 -o /dev/null -w '%{http_code} %{num_connects}\\n' -H 'Host: api.openai.com' https://api.anthropic.com/echo",
    );
    assert_eq!(
        out, "200 1\n421 0\n",
        "second request reused the connection and was refused"
    );
    assert!(net.apis.requests_to("api.openai.com").is_empty());
}

#[test]
fn a_host_outside_the_cas_name_constraint_gets_no_certificate() {
    require_root!();
    let net = world();
    net.dns
        .set("evil.example", vec!["203.0.113.40".parse().unwrap()]);
    let fly = FlyShape::start(&net, "escape-sni", Tokenizer::Embedded, &[]);
    let out = fly
        .sandbox(&net, "curl")
        // The sandbox cannot resolve a name it may not reach (dns.rs):
        // give curl the address, as a sandbox that knows it would.
        .args([
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            "evil.example:443:203.0.113.40",
        ])
        .arg("https://evil.example/")
        .command()
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(35),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = fly.sidecar_log();
    // Refused at the SNI, before any certificate is chosen or minted.
    assert!(
        log.contains("evil.example") && log.contains("deny"),
        "{log}"
    );
}

#[test]
fn the_sandbox_user_cannot_leave_its_cgroup_and_child_cgroups_stay_covered() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-cg", Tokenizer::Embedded, &[]);
    let parent = fly.cgroup.path().parent().unwrap().display().to_string();
    let out = sh(
        &net,
        &fly,
        true,
        &format!(
            "echo $$ > {parent}/cgroup.procs 2>/dev/null && echo moved || echo denied; \
             mkdir {cg}/mine 2>/dev/null && echo made || echo no-mkdir",
            cg = fly.cgroup.path().display()
        ),
    );
    assert_eq!(out, "denied\nno-mkdir\n");
    // root inside the sandbox can make a child cgroup; it is still covered.
    let child = fly.cgroup.child("nested");
    let v = {
        let mut cmd = in_cgroup(&child, PY);
        cmd.arg(support_dir().join("netprobe.py"))
            .args(["tcp", "203.0.113.40", "80"]);
        let o = cmd.output().unwrap();
        serde_json::from_str::<Value>(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    eperm(&v);
}

#[test]
fn run_never_starts_the_command_before_the_programs_are_attached() {
    require_root!();
    let net = world();
    let _real = real_server("203.0.113.40:80");
    // The command's very first act is a connect that must be denied.
    let probe = support_dir().join("netprobe.py");
    let out = proxypilot_tests::shapes::local_run(
        &net,
        &[],
        &[PY, probe.to_str().unwrap(), "tcp", "203.0.113.40", "80"],
    )
    .command()
    .output()
    .unwrap();
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    eperm(&v);
}

#[test]
fn the_sidecar_signals_ready_only_after_the_programs_are_attached() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-ready", Tokenizer::Embedded, &[]);
    // FlyShape::start returned when the ready file appeared: by then all
    // thirteen programs must be attached.
    assert!(fly.dir.join("ready").exists());
    assert_eq!(
        attached_programs(fly.cgroup.path()).len(),
        ATTACHED_PROGRAMS
    );
    // And the order in the sidecar's log: attached, then ready.
    let log = fly.sidecar_log();
    let attached = log.find("kernel programs attached").expect("attach logged");
    let ready = log.find("proxypilot sidecar ready").expect("ready logged");
    assert!(attached < ready, "{log}");
}

#[test]
fn a_secret_echoed_by_the_upstream_is_masked_and_counted() {
    require_root!();
    let net = world();
    let fly = FlyShape::start(&net, "escape-echo", Tokenizer::Embedded, &[]);
    let out = sh(
        &net,
        &fly,
        false,
        "curl -sS -D - -H 'x-api-key: dummy' https://api.anthropic.com/echo-secret",
    );
    let real = &net.apis.keys().anthropic;
    assert!(
        !out.contains(real.as_str()),
        "the real key reached the sandbox:\n{out}"
    );
    assert!(out.contains("[REDACTED]"), "{out}");
    let log = fly.sidecar_log();
    assert!(
        log.contains("redacted=2"),
        "header and body echo counted: {log}"
    );
    assert!(log.contains("echoed the secret back"), "{log}");
}

// ---- Below the connect and sendmsg hooks: other protocols, raw and ping
// sockets, routing options, inbound peers. Each attack aims at 203.0.113.40
// or 2001:db8::40, which the sandbox is never given; an AF_PACKET tap on the
// namespace's `lo`, opened by this test outside the sandbox, shows whether
// any packet went there.

/// The unallowed target of the backstop attacks.
const TARGET4: &str = "203.0.113.40";
const TARGET6: &str = "2001:db8::40";
/// An IPv6 DNS server the sandbox may reach (`--dns`), so UDP to it passes
/// the socket hooks. Nothing needs to listen there.
const DNS6: &str = "2001:db8::53";

fn backstop_world() -> FakeInternet {
    FakeInternet::start_with(
        RealKeys::default(),
        proxypilot_tests::upstream::standard_hosts(),
        &["203.0.113.40/32", "2001:db8::40/128", "2001:db8::53/128"],
    )
}

fn backstop_fly(net: &FakeInternet, name: &str) -> FlyShape {
    // Ping sockets open to every group, as systemd and Docker set it.
    run_ok(std::process::Command::new("sysctl").args([
        "-q",
        "-w",
        "net.ipv4.ping_group_range=0 2147483647",
    ]));
    FlyShape::start(net, name, Tokenizer::Embedded, &["--dns", DNS6])
}

/// An AF_PACKET tap on the namespace's `lo` (netprobe.py tap), run by the
/// test outside the sandbox. Killed on drop if never read.
struct Tap(Option<std::process::Child>);

impl Tap {
    fn start(addrs: &[&str]) -> Tap {
        use std::io::BufRead;
        let mut child = std::process::Command::new(PY)
            .arg(support_dir().join("netprobe.py"))
            .arg("tap")
            .args(addrs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("tapping"), "tap: {line}");
        Tap(Some(child))
    }

    /// The packets seen from or to the tapped addresses.
    fn packets(mut self) -> Vec<Value> {
        // Let the last packets of an attack arrive.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut child = self.0.take().expect("read once");
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        v["packets"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Packets on the tap addressed to `addr`.
fn packets_to<'a>(packets: &'a [Value], addr: &str) -> Vec<&'a Value> {
    packets.iter().filter(|p| p["dst"] == addr).collect()
}

/// What the kernel says when the backstop drops a datagram the socket
/// hooks let through: the send itself fails with EPERM. (ICMPv6 ping sends
/// are the exception: they report success and the echo never leaves.)
fn dropped_at_send(v: &Value) {
    eperm(v);
}

/// Packets the backstop dropped so far in `fly`'s sandbox.
fn drops(fly: &FlyShape) -> proxypilot::kernel::PacketDrops {
    proxypilot::kernel::attach::pinned_packet_drops(fly.cgroup.id()).unwrap()
}

#[test]
fn sockets_other_than_tcp_and_udp_are_refused_with_eperm() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-sock");
    let tap = Tap::start(&[TARGET4, TARGET6]);
    // The sandbox user: UDP-Lite, ping sockets (allowed by
    // ping_group_range), MPTCP.
    for kind in ["udplite4", "udplite6", "ping4", "ping6", "mptcp"] {
        eperm(&probe(&net, &fly, true, &["socket", kind]));
    }
    eperm(&probe(
        &net,
        &fly,
        true,
        &["send", "udplite", TARGET4, "9999"],
    ));
    eperm(&probe(&net, &fly, true, &["send", "ping", TARGET4, "0"]));
    eperm(&probe(&net, &fly, true, &["send", "ping", TARGET6, "0"]));
    // Root in the sandbox (CAP_NET_RAW, as in a Docker container).
    for kind in ["raw4", "raw6"] {
        eperm(&probe(&net, &fly, false, &["socket", kind]));
    }
    eperm(&probe(&net, &fly, false, &["send", "raw", TARGET4, "9999"]));
    // SCTP is not in this kernel: refused before any hook runs.
    assert_eq!(probe(&net, &fly, true, &["socket", "sctp"])["ok"], false);
    // TCP and UDP sockets still work (the other tests use them throughout).
    let packets = tap.packets();
    assert!(packets_to(&packets, TARGET4).is_empty(), "{packets:?}");
    assert!(packets_to(&packets, TARGET6).is_empty(), "{packets:?}");
    let log = fly.log_with(&["udplite socket from pid", "raw sockets are refused"]);
    assert!(
        log.contains("udplite socket from pid") && log.contains("raw sockets are refused"),
        "{log}"
    );
}

#[test]
fn socket_options_that_change_routing_are_refused_with_eperm() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-opts");
    let tap = Tap::start(&[TARGET4, TARGET6]);
    // This kernel already refuses IP_OPTIONS source routes without
    // CAP_NET_RAW; root in the sandbox has it, as in a Docker container.
    for opt in ["ipv6_rthdr", "so_bindtodevice", "ip_unicast_if"] {
        eperm(&probe(&net, &fly, true, &["sockopt", opt]));
    }
    for opt in ["ip_options", "ip_transparent", "so_mark"] {
        eperm(&probe(&net, &fly, false, &["sockopt", opt]));
    }
    // Other options still reach the kernel with the caller's value (it
    // doubles SO_RCVBUF for bookkeeping).
    let freebind = probe(&net, &fly, true, &["sockopt", "ip_freebind"]);
    assert_eq!(
        (&freebind["ok"], &freebind["value"]),
        (&Value::Bool(true), &Value::from(1)),
        "{freebind}"
    );
    let rcvbuf = probe(&net, &fly, true, &["sockopt", "so_rcvbuf"]);
    assert_eq!(rcvbuf["value"], 2 * 65536, "{rcvbuf}");
    // The attacks themselves: UDP to an allowed DNS server, routed first
    // through the target.
    eperm(&probe(
        &net,
        &fly,
        false,
        &["lsrr", "sockopt", TARGET4, DNS_IP, "53"],
    ));
    eperm(&probe(&net, &fly, true, &["rthdr", TARGET6, DNS6, "53"]));
    let packets = tap.packets();
    assert!(packets_to(&packets, TARGET4).is_empty(), "{packets:?}");
    assert!(packets_to(&packets, TARGET6).is_empty(), "{packets:?}");
    let log = fly.log_with(&["IP_OPTIONS (source routes) is refused"]);
    assert!(
        log.contains("IP_OPTIONS (source routes) is refused"),
        "{log}"
    );
}

#[test]
fn a_per_message_source_route_is_dropped_by_the_packet_backstop() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-retopts");
    let tap = Tap::start(&[TARGET4]);
    // IP_RETOPTS in sendmsg's control data, as root (CAP_NET_RAW): no
    // setsockopt, and sendmsg4 sees only the allowed DNS server.
    dropped_at_send(&probe(
        &net,
        &fly,
        false,
        &["lsrr", "cmsg", TARGET4, DNS_IP, "53"],
    ));
    let packets = tap.packets();
    assert!(packets_to(&packets, TARGET4).is_empty(), "{packets:?}");
    assert_eq!(drops(&fly).egress, 1);
    // sendmsg4 sent the datagram to proxypilot's resolver, so the first
    // hop gets it addressed to the resolver's port.
    let log = fly.log_with(&["udp packet to 203.0.113.40:"]);
    assert!(
        log.contains("udp packet to 203.0.113.40:") && log.contains("dropped: IP options"),
        "{log}"
    );
}

#[test]
fn an_inbound_connection_or_datagram_to_a_sandbox_listener_is_dropped() {
    require_root!();
    use std::io::{BufRead, Read};
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-inbound");
    let tap = Tap::start(&["127.0.0.1", "::1", TARGET4]);
    let mut server = fly
        .sandbox(&net, PY)
        .arg(support_dir().join("netprobe.py"))
        .args(["listen", "7777", "5"])
        .user(65534, 65534)
        .command()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    // From outside the sandbox, as any host that reaches it would.
    for peer in ["127.0.0.1:7777", "[::1]:7777", "203.0.113.40:7777"] {
        let r = std::net::TcpStream::connect_timeout(
            &peer.parse().unwrap(),
            std::time::Duration::from_millis(700),
        );
        assert!(r.is_err(), "{peer} accepted a connection from outside");
    }
    // A datagram in is dropped the same way.
    let udp = std::net::UdpSocket::bind("203.0.113.40:0").unwrap();
    udp.send_to(b"in", "203.0.113.40:7777").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    server.wait().unwrap();
    let v: Value = serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{e}: {rest}"));
    assert_eq!(v["accepted"], serde_json::json!([]), "{v}");
    assert_eq!(v["received"], serde_json::json!([]), "{v}");
    // Nothing left the sandbox's port: no SYN-ACK, no data.
    let packets = tap.packets();
    let from_sandbox: Vec<_> = packets.iter().filter(|p| p["sport"] == 7777).collect();
    assert!(from_sandbox.is_empty(), "{from_sandbox:?}");
    let log = fly.log_with(&["tcp packet from"]);
    assert!(log.contains("tcp packet from"), "{log}");
    // Three SYNs (at least: they are retried) and the datagram.
    assert!(drops(&fly).ingress >= 4, "{:?}", drops(&fly));
}

#[test]
fn the_packet_backstop_holds_without_the_socket_level_refusals() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-backstop");
    let sink = udp_sink("203.0.113.40:9999");
    // Take the socket-level refusals away, as a kernel path they do not
    // see would: only the cgroup_skb programs are left to stop these.
    let pins = proxypilot::kernel::bpffs::pin_dir(fly.cgroup.id());
    for name in ["sock_create", "setsockopt"] {
        fs::remove_file(proxypilot::kernel::bpffs::link_pin(&pins, name)).unwrap();
    }
    let tap = Tap::start(&[TARGET4, TARGET6]);
    // A raw socket as root; ping sockets as the sandbox user.
    dropped_at_send(&probe(&net, &fly, false, &["send", "raw", TARGET4, "9999"]));
    dropped_at_send(&probe(&net, &fly, true, &["send", "ping", TARGET4, "0"]));
    let ping6 = probe(&net, &fly, true, &["send", "ping", TARGET6, "0"]);
    assert_eq!(
        (&ping6["ok"], &ping6["reply_errno"]),
        (&Value::Bool(true), &Value::from("timeout")),
        "{ping6}"
    );
    // Sticky routing options, which setsockopt allows without its hook.
    dropped_at_send(&probe(
        &net,
        &fly,
        false,
        &["lsrr", "sockopt", TARGET4, DNS_IP, "53"],
    ));
    dropped_at_send(&probe(&net, &fly, true, &["rthdr", TARGET6, DNS6, "53"]));
    // UDP-Lite: sendmsg4 already refuses it by protocol.
    eperm(&probe(
        &net,
        &fly,
        true,
        &["send", "udplite", TARGET4, "9999"],
    ));
    let packets = tap.packets();
    assert!(packets_to(&packets, TARGET4).is_empty(), "{packets:?}");
    assert!(packets_to(&packets, TARGET6).is_empty(), "{packets:?}");
    assert!(sink.lock().unwrap().is_empty());
    // One packet each: raw, ping, ping6, source route, routing header.
    assert_eq!(drops(&fly).egress, 5);
}

#[test]
fn a_flood_of_dropped_packets_is_counted_in_full_but_logged_sparingly() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-flood");
    let started = std::time::Instant::now();
    let v = probe(
        &net,
        &fly,
        false,
        &["lsrr", "cmsg", TARGET4, DNS_IP, "53", "2000"],
    );
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(v["errors"], serde_json::json!({"EPERM": 2000}), "{v}");
    assert_eq!(drops(&fly).egress, 2000);
    // Operators see the same count on the info port.
    assert_eq!(
        fly.stats(&net)["packets_dropped_egress"],
        2000,
        "{}",
        fly.stats(&net)
    );
    let log = fly.log_with(&["udp packet to 203.0.113.40:"]);
    let lines = log.matches("udp packet to 203.0.113.40:").count();
    // At most one report per 100 ms per CPU, plus one for a window that
    // had just begun.
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let bound = ((seconds * 10.0 + 1.0) * cpus).ceil() as usize;
    assert!(
        (1..=bound).contains(&lines),
        "{lines} lines in {seconds:.2}s (bound {bound})"
    );
}

#[test]
fn a_packet_socket_frame_from_sandbox_root_is_dropped_at_the_interface() {
    require_root!();
    let net = backstop_world();
    let fly = backstop_fly(&net, "escape-frames");
    let sink = udp_sink("203.0.113.40:9999");
    let tap = Tap::start(&[TARGET4]);
    // Root in the sandbox holds CAP_NET_RAW, as in a Docker container: a
    // hand-made IPv4/UDP frame on `lo`, below every IP-level hook.
    // The guard's tc drop reaches the sender as ENOBUFS.
    let v = probe(&net, &fly, false, &["packet", DNS_IP, TARGET4, "9999"]);
    assert_eq!(
        (v["ok"].as_bool(), v["errno"].as_str()),
        (Some(false), Some("ENOBUFS")),
        "{v}"
    );
    // PACKET_QDISC_BYPASS would skip tc, and the guard with it (measured):
    // refused, so the frame is never sent.
    eperm(&probe(
        &net,
        &fly,
        false,
        &["packet", DNS_IP, TARGET4, "9999", "bypass"],
    ));
    let packets = tap.packets();
    assert!(packets_to(&packets, TARGET4).is_empty(), "{packets:?}");
    assert!(sink.lock().unwrap().is_empty());
    assert_eq!(drops(&fly).frames, 1);
    let log = fly.log_with(&["frame from a socket of uid 0 dropped"]);
    assert!(
        log.contains("frame from a socket of uid 0 dropped"),
        "{log}"
    );
}
