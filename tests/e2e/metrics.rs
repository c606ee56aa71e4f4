//! `--metrics-listen`: the sidecar's Prometheus metrics, scraped from
//! outside the sandbox and parsed with the `prometheus_client` Python
//! package's OpenMetrics parser, after requests made by curl inside it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer},
    upstream::{self, Api, FakeInternet, HostSpec, RealKeys},
    *,
};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:19464";
/// An `--allow` host: relayed unchanged, counted without its name.
const PASS_HOST: &str = "passthrough.test";

/// Names only the sandbox chose: none may show up as a label value.
/// (A pass-through host is configured, but which one a connection went to
/// is the sandbox's choice too.)
const SANDBOX_CHOSEN: &[&str] = &[
    "PROPFIND",
    "evil-host.example",
    "sandbox-sni.example",
    "passthrough.test",
];

/// `GET /metrics`, parsed: one `{name, labels, value}` per sample.
fn scrape() -> Vec<Value> {
    let mut s = TcpStream::connect(METRICS).expect("metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let parser = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut py = Command::new("python3")
        .args(["-c", parser])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`, or 0.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

/// curl in the sandbox; returns its `%{http_code}` (000 when it failed).
fn curl(net: &FakeInternet, fly: &FlyShape, args: &[&str]) -> String {
    let out = fly
        .sandbox(net, "curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_count_what_the_sandbox_did_with_bounded_labels_and_stay_out_of_its_reach() {
    require_root!();
    let mut hosts = upstream::standard_hosts();
    hosts.push(HostSpec::new(
        PASS_HOST,
        Api::Generic,
        &["203.0.113.14:443"],
    ));
    let net = FakeInternet::start_with(RealKeys::default(), hosts, &[]);
    let fly = FlyShape::start(
        &net,
        "metrics",
        Tokenizer::Remote,
        &[
            "--metrics-listen",
            METRICS,
            "--permit",
            "api.github.com GET /user",
            "--max-connections-per-process",
            "1",
            "--allow",
            PASS_HOST,
        ],
    );
    // Pass-through: the fake's own certificate, which the sandbox does not
    // trust (-k: only the bytes are counted here).
    assert_eq!(
        curl(&net, &fly, &["-k", &format!("https://{PASS_HOST}/echo")]),
        "200"
    );
    let gh = "https://api.github.com/user";
    let auth = "authorization: token dummy";
    assert_eq!(curl(&net, &fly, &["-H", auth, gh]), "200");
    assert_eq!(curl(&net, &fly, &["-H", auth, "--http1.1", gh]), "200");
    assert_eq!(curl(&net, &fly, &["-H", auth, "-X", "DELETE", gh]), "403");
    assert_eq!(curl(&net, &fly, &["-H", auth, "-X", "PROPFIND", gh]), "403");
    assert_eq!(
        curl(
            &net,
            &fly,
            &["--http1.1", "-H", "Host: evil-host.example", gh]
        ),
        "421"
    );
    // An SNI the sidecar neither intercepts nor allows, at GitHub's address.
    assert_eq!(
        curl(
            &net,
            &fly,
            &[
                "--connect-to",
                "sandbox-sni.example:443:203.0.113.13:443",
                "https://sandbox-sni.example/"
            ]
        ),
        "000"
    );
    // The metrics listener itself, and another address: the kernel says no.
    assert_eq!(
        curl(&net, &fly, &[&format!("http://{METRICS}/metrics")]),
        "000"
    );
    assert_eq!(curl(&net, &fly, &["http://198.51.100.99/"]), "000");
    // A unix socket of the sandbox's own (refused without --allow-unix),
    // and a second connection of one process over its share of one.
    let probe = "import os, socket\n\
                 p = '/tmp/pp-metrics-%d.sock' % os.getpid()\n\
                 l = socket.socket(socket.AF_UNIX); l.bind(p); l.listen()\n\
                 try:\n    socket.socket(socket.AF_UNIX).connect(p); print('unix reached')\n\
                 except PermissionError:\n    print('unix refused')\n\
                 os.unlink(p)\n\
                 a = socket.create_connection(('api.github.com', 443))\n\
                 b = socket.create_connection(('api.github.com', 443)); b.settimeout(5)\n\
                 print('second closed' if b.recv(1) == b'' else 'second open')\n";
    let out = fly
        .sandbox(&net, "python3")
        .args(["-c", probe])
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "unix refused\nsecond closed\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The last request's counters land when its bodies are done, and kernel
    // denials arrive through a ring buffer: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let s = scrape();
        let kernel = value(&s, "proxypilot_denials_total", &[("kind", "kernel")]);
        let done = value(&s, "proxypilot_request_duration_seconds_count", &[]);
        let unix = value(&s, "proxypilot_denials_total", &[("kind", "unix")]);
        let passed = value(
            &s,
            "proxypilot_passthrough_connections_total",
            &[("result", "ok")],
        );
        if (kernel >= 2.0 && done >= 5.0 && unix >= 1.0 && passed >= 1.0)
            || Instant::now() > deadline
        {
            break s;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let dump = serde_json::to_string_pretty(&samples).unwrap();
    let requests = |method, status, decision| {
        value(
            &samples,
            "proxypilot_requests_total",
            &[
                ("host", "api.github.com"),
                ("method", method),
                ("status", status),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(requests("GET", "200", "permitted"), 2.0, "{dump}");
    assert_eq!(requests("DELETE", "403", "refused"), 1.0, "{dump}");
    assert_eq!(requests("other", "403", "refused"), 1.0, "{dump}");
    assert_eq!(requests("GET", "421", "none"), 1.0, "{dump}");
    assert_eq!(
        value(&samples, "proxypilot_requests_total", &[]),
        5.0,
        "{dump}"
    );
    let denials = |kind| value(&samples, "proxypilot_denials_total", &[("kind", kind)]);
    assert_eq!(denials("rule"), 2.0, "{dump}");
    assert_eq!(denials("host"), 1.0, "{dump}");
    assert_eq!(denials("sni"), 1.0, "{dump}");
    assert!(denials("kernel") >= 2.0, "{dump}");
    assert_eq!(denials("connection"), 1.0, "{dump}");
    assert!(denials("unix") >= 1.0, "{dump}");
    assert_eq!(
        value(
            &samples,
            "proxypilot_request_duration_seconds_count",
            &[("host", "api.github.com")]
        ),
        5.0,
        "{dump}"
    );
    assert_eq!(
        value(&samples, "proxypilot_tokenizer_response_seconds_count", &[]),
        2.0,
        "only the two relayed requests reached the tokenizer: {dump}"
    );
    assert!(
        value(
            &samples,
            "proxypilot_body_bytes_total",
            &[("host", "api.github.com"), ("direction", "out")]
        ) > 0.0,
        "{dump}"
    );
    assert!(
        samples
            .iter()
            .any(|s| s["name"] == "proxypilot_open_connections"),
        "{dump}"
    );
    assert_eq!(
        value(
            &samples,
            "proxypilot_passthrough_connections_total",
            &[("result", "ok")]
        ),
        1.0,
        "{dump}"
    );
    for direction in ["in", "out"] {
        assert!(
            value(
                &samples,
                "proxypilot_passthrough_bytes_total",
                &[("direction", direction)]
            ) > 500.0,
            "a TLS handshake and a request each way: {dump}"
        );
    }

    // Every label value is one the sidecar defined.
    let hosts = [
        "api.anthropic.com",
        "api.openai.com",
        "api.github.com",
        "other",
    ];
    for s in &samples {
        for (k, v) in s["labels"].as_object().unwrap() {
            let v = v.as_str().unwrap();
            assert!(
                !SANDBOX_CHOSEN.iter().any(|c| v.contains(c)),
                "label {k}={v} carries what the sandbox chose: {dump}"
            );
            if k == "host" {
                assert!(hosts.contains(&v), "host label {v}: {dump}");
            }
        }
    }
}

#[test]
fn a_metrics_address_the_sandbox_may_dial_is_refused_at_start() {
    require_root!();
    let _net = FakeInternet::start();
    let cg = TestCgroup::new("metrics-refused");
    let state = TempDir::new("metrics-refused");
    let mut child = Command::new(proxypilot_bin())
        .args(["sidecar", "--cgroup"])
        .arg(cg.path())
        .args([
            "--tokenizer",
            "http://127.0.0.1:18080",
            "--allow-cidr",
            "127.0.0.0/8",
            "--metrics-listen",
            "127.0.0.1:19465",
            "--state-dir",
        ])
        .arg(&state.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Refused at start, so it exits at once; one that starts serving is
    // stopped (and its programs detached) before the test fails.
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            let _ = Command::new(proxypilot_bin())
                .args(["detach", "--cgroup"])
                .arg(cg.path())
                .output();
            panic!("the sidecar started with a metrics address the sandbox may dial");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--metrics-listen 127.0.0.1:19465: the sandbox may dial it"),
        "{stderr}"
    );
    assert!(
        attached_programs(cg.path()).is_empty(),
        "nothing is attached when the configuration is refused"
    );
}
