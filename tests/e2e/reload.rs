//! Reload on SIGHUP, in the sidecar shape with a real sandbox: a kept-alive
//! connection's next request gets the new permits, a host taken out is
//! refused (on its open connection too), a host put in is intercepted
//! under the re-issued CA, the kernel allowlist changes in place, a loop of
//! requests across the reloads loses nothing, and a file that fails
//! validation is refused as a whole.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    process::{ChildStdin, ChildStdout, Stdio},
    thread,
    time::{Duration, Instant},
};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer},
    upstream::{FakeInternet, RealKeys, ANTHROPIC, GITHUB, OPENAI},
    *,
};
use serde_json::Value;

/// An address in the test's namespace that only the reloaded allowlist
/// lets the sandbox reach.
const INTERNAL: &str = "198.51.100.77";
const INTERNAL_PORT: u16 = 7000;
const METRICS: &str = "127.0.0.1:19466";

const V1: &str = r#"
[target]
"api.github.com" = { secret = "GH_SEALED", permit = ["GET /repos/acme/**"] }
"api.openai.com" = "OPENAI_SEALED"
"#;

const V2: &str = r#"
allow-cidr = ["198.51.100.77:7000"]

[target]
"api.github.com" = { secret = "GH_SEALED", permit = ["GET /repos/acme/**", "DELETE /repos/acme/*"] }
"api.anthropic.com" = "ANTHROPIC_SEALED"
"#;

/// The sandbox side: reload_client.py, driven line by line.
struct Client {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    child: std::process::Child,
}

impl Client {
    fn send(&mut self, command: &str) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{command}: {e}: {line:?}"))
    }

    fn req(&mut self, conn: &str, method: &str, host: &str, path: &str) -> Value {
        self.send(&format!("req {conn} {method} {host} {path}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hangup(fly: &FlyShape) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fly.sidecar.child.id() as i32),
        nix::sys::signal::SIGHUP,
    )
    .unwrap();
}

/// Waits until the sidecar's log holds `needle` `n` times.
fn wait_for_log(fly: &FlyShape, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = fly.sidecar_log();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "no {needle:?} x{n} in:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn internal_reachable(fly: &FlyShape, net: &FakeInternet) -> Value {
    let out = fly
        .sandbox(net, "python3")
        .arg(support_dir().join("netprobe.py"))
        .args(["tcp", INTERNAL, &INTERNAL_PORT.to_string()])
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("netprobe: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn metric(name_and_labels: &str) -> f64 {
    let body = http_get(METRICS, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn sighup_reloads_targets_permits_and_the_kernel_allowlist_without_dropping_connections() {
    require_root!();
    let net = FakeInternet::start_with(
        RealKeys::default(),
        proxypilot_tests::upstream::standard_hosts(),
        &[INTERNAL],
    );
    // The test thread is in the namespace: this listener is the internal
    // service the sandbox may reach only once the reload allows it.
    let internal = TcpListener::bind((INTERNAL, INTERNAL_PORT)).unwrap();
    thread::spawn(move || for _ in internal.incoming() {});
    let config = net.dir.0.join("reload.toml");
    std::fs::write(&config, V1).unwrap();
    let fly = FlyShape::start_with_targets(
        &net,
        "reload",
        Tokenizer::Embedded,
        &[
            "--config",
            config.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
        &[],
    );
    let mut child = fly
        .sandbox(&net, "python3")
        .arg(support_dir().join("reload_client.py"))
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut c = Client {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };

    // Under V1.
    let get = c.req("gh", "GET", GITHUB, "/repos/acme/x");
    assert_eq!(get["status"], 200, "{get}");
    let port = get["port"].clone();
    assert_eq!(
        c.req("gh", "DELETE", GITHUB, "/repos/acme/x")["status"],
        403
    );
    assert_eq!(
        c.req("oai", "POST", OPENAI, "/v1/chat/completions")["status"],
        200
    );
    assert!(c.req("ant", "POST", ANTHROPIC, "/v1/messages")["error"].is_string());
    let probe = internal_reachable(&fly, &net);
    assert_eq!(
        (probe["ok"].as_bool(), probe["errno"].as_str()),
        (Some(false), Some("EPERM")),
        "{probe}"
    );
    assert_eq!(c.send("loop api.github.com /repos/acme/x")["looping"], true);

    // V2, on SIGHUP.
    std::fs::write(&config, V2).unwrap();
    hangup(&fly);
    let log = wait_for_log(&fly, "reloaded the configuration", 1);
    assert!(log.contains("the CA was re-issued"), "{log}");

    // The kept-alive connection carries on, under the new permits.
    let delete = c.req("gh", "DELETE", GITHUB, "/repos/acme/x");
    assert_eq!(
        (&delete["status"], &delete["port"]),
        (&200.into(), &port),
        "{delete}"
    );
    // The removed host: its open connection gets 421, a new one nothing.
    assert_eq!(
        c.req("oai", "POST", OPENAI, "/v1/chat/completions")["status"],
        421
    );
    assert!(c.req("oai2", "POST", OPENAI, "/v1/chat/completions")["error"].is_string());
    // The added host is intercepted (under the new CA, from --ca-out).
    assert_eq!(
        c.req("ant2", "POST", ANTHROPIC, "/v1/messages")["status"],
        200
    );
    let seen = net.apis.requests_to(ANTHROPIC);
    assert_eq!(
        seen.last().and_then(|r| r.header("x-api-key")),
        Some(net.apis.keys().anthropic.as_str()),
        "the real key was injected"
    );
    // The kernel allowlist changed in place.
    let probe = internal_reachable(&fly, &net);
    assert_eq!(probe["ok"], true, "{probe}");

    // A file that fails validation is refused as a whole: V2 stays.
    std::fs::write(
        &config,
        V2.replace("DELETE /repos/acme/*", "DELETE repos/acme/*")
            .replace("198.51.100.77:7000", "198.51.100.0/24"),
    )
    .unwrap();
    hangup(&fly);
    let log = wait_for_log(&fly, "reload refused", 1);
    assert!(
        log.contains("repos/acme/*") && log.contains("does not start with /"),
        "the error names the bad permit:\n{log}"
    );
    let delete = c.req("gh", "DELETE", GITHUB, "/repos/acme/x");
    assert_eq!(
        (&delete["status"], &delete["port"]),
        (&200.into(), &port),
        "{delete}"
    );
    assert_eq!(
        c.req("ant2", "POST", ANTHROPIC, "/v1/messages")["status"],
        200
    );

    // A change only a restart can make is refused too.
    std::fs::write(&config, format!("info-port = 15481\n{V2}")).unwrap();
    hangup(&fly);
    let log = wait_for_log(&fly, "reload refused", 2);
    assert!(log.contains("info-port cannot change"), "{log}");

    // The loop ran across every reload on one connection, without a miss.
    let looped = c.send("stop");
    assert_eq!(
        (&looped["failed"], &looped["connections"]),
        (&0.into(), &1.into()),
        "{looped}"
    );
    assert!(looped["ok"].as_u64().unwrap() > 10, "{looped}");

    assert_eq!(metric("proxypilot_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric("proxypilot_reloads_total{result=\"refused\"}"), 2.0);
    assert_eq!(metric("proxypilot_last_reload_success"), 0.0);
    assert!(metric("proxypilot_last_reload_timestamp_seconds") > 1.7e9);
    // The secret values never reach the log.
    let log = fly.sidecar_log();
    let keys = net.apis.keys();
    for real in [&keys.anthropic, &keys.openai, &keys.github] {
        assert!(!log.contains(real.as_str()), "a real key is in the log");
    }
}
