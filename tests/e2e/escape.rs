//! The escape suite: every way out of the sandbox we could think of, tried
//! from inside the sandbox cgroup (as root unless said otherwise, and as
//! `nobody` where privileges matter), each with its failure asserted
//! exactly. SECURITY.md lists each attempt with the test that covers it.

use std::{fs, process::Stdio};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer, TOKENIZER_PORT},
    upstream::{FakeInternet, RealKeys, ANTHROPIC},
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
    eperm(&probe(&net, &fly, false, &["udp", "203.0.113.40", "53"]));
    // The allowed resolver does answer.
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
    // /stats is counters only.
    let stats = fly.stats(&net);
    let fields = stats.as_object().unwrap_or_else(|| panic!("{stats}"));
    assert!(fields.contains_key("leaf_certificates_cached"), "{stats}");
    assert!(fields.values().all(Value::is_u64), "{stats}");
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
        .args(["-sS", "--max-time", "10", "https://evil.example/"])
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
    // seven programs must be attached.
    assert!(fly.dir.join("ready").exists());
    assert_eq!(attached_programs(fly.cgroup.path()).len(), 7);
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
