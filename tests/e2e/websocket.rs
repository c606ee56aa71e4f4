//! WebSocket through the intercept path (issue 17): the Python `websockets`
//! client, unmodified, in the sandbox against the fake
//! `wss://api.openai.com/v1/realtime`, through `proxypilot run` (embedded
//! tokenizer) and the Fly shape (`proxypilot tokenizer` as the remote
//! tokenizer). See `tests/support/clients/ws_client.py` for the scenarios.

use std::process::Stdio;

use proxypilot_tests::{
    shapes::{local_run, FlyShape, Tokenizer},
    upstream::{FakeInternet, WsEnd, OPENAI},
    *,
};
use serde_json::Value;

/// The upstream's idle timeout for upgraded streams in these tests.
const IDLE_SECS: f64 = 2.0;

fn ws_client_argv(scenarios: &[&str]) -> Vec<String> {
    let out = run_ok(
        std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]),
    );
    let python = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let script = support_dir().join("clients/ws_client.py");
    let mut v = vec![python, script.display().to_string()];
    v.extend(scenarios.iter().map(|s| s.to_string()));
    v
}

/// Runs `cmd` to the end; its stdout's JSON lines by scenario name.
fn results(mut cmd: std::process::Command) -> (Vec<Value>, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "ws_client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, stderr)
}

fn scenario<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results
        .iter()
        .find(|v| v["scenario"] == name)
        .unwrap_or_else(|| panic!("no result for {name} in {results:?}"))
}

/// Every upgrade request that reached the fake carried the real key, no
/// dummy and no `Proxy-*` header, and still asked for the upgrade.
fn check_upgrades_reached_upstream(net: &FakeInternet, expected: usize) {
    let real = format!("Bearer {}", net.apis.keys().openai);
    let reqs: Vec<_> = net
        .apis
        .requests_to(OPENAI)
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/realtime"))
        .collect();
    assert_eq!(reqs.len(), expected, "{reqs:?}");
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(real.as_str()),
            "{:?}",
            r.headers
        );
        assert!(
            r.headers_starting_with("proxy-").is_empty(),
            "{:?}",
            r.headers
        );
        assert_eq!(r.header("upgrade"), Some("websocket"), "{:?}", r.headers);
        assert_eq!(r.version, "HTTP/1.1");
        assert!(r.header("sec-websocket-key").is_some(), "{:?}", r.headers);
    }
}

/// The audit line of the first upgraded stream: status 101, written when
/// the stream ended, with the bytes each way.
fn check_audit_line(log: &str) {
    let line = log
        .lines()
        .find(|l| l.contains("audit") && l.contains("/v1/realtime") && l.contains("status=101"))
        .unwrap_or_else(|| panic!("no audit line with status 101 for /v1/realtime in:\n{log}"));
    let field = |name: &str| -> u64 {
        let (_, rest) = line.split_once(&format!("{name}=")).unwrap();
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(field("bytes_in") > 0, "{line}");
    assert!(field("bytes_out") > 0, "{line}");
    assert!(line.contains("duration_ms="), "{line}");
}

/// The OpenAI SDK's realtime client got its conversation item back.
fn check_openai_sdk(results: &[Value]) {
    let sdk = scenario(results, "openai-sdk");
    assert_eq!(sdk["created"], "session.created", "{sdk}");
    assert_eq!(sdk["type"], "conversation.item.created", "{sdk}");
    assert_eq!(sdk["text"], "hello realtime", "{sdk}");
}

/// Who ended each session the fake served, in order: the client's close
/// frame, the server's, or no close handshake at all.
fn session_ends(net: &FakeInternet) -> Vec<&'static str> {
    net.apis
        .websocket_ends()
        .iter()
        .map(|e| match e {
            WsEnd::ClientClosed => "client",
            WsEnd::ServerClosed => "server",
            WsEnd::Dropped(_) => "dropped",
        })
        .collect()
}

#[test]
fn local_websockets_client_through_proxypilot_run() {
    require_root!();
    let net = FakeInternet::start();
    let argv = ws_client_argv(&[
        "echo",
        "server-close",
        "status-401",
        "status-200",
        "openai-sdk",
        &format!("idle-{IDLE_SECS}"),
        &format!("busy-{IDLE_SECS}"),
    ]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let timeout = format!("{IDLE_SECS}s");
    let cmd = local_run(&net, &["--stream-idle-timeout", &timeout], &argv)
        .env("PROXYPILOT_LOG", "warn,audit=info");
    let (res, stderr) = results(cmd.command());

    let echo = scenario(&res, "echo");
    assert_eq!(echo["created"], "session.created", "{echo}");
    assert_eq!(
        echo["replies"],
        serde_json::json!(["hello", "second message"]),
        "{echo}"
    );
    assert_eq!(echo["close_code"], 1000, "{echo}");
    let closed = scenario(&res, "server-close");
    assert_eq!(
        (closed["code"].as_u64(), closed["reason"].as_str()),
        (Some(1000), Some("bye")),
        "{closed}"
    );
    let refused = scenario(&res, "status-401");
    assert_eq!(refused["status"], 401, "{refused}");
    // The embedded engine relays what the API answered.
    let plain = scenario(&res, "status-200");
    assert_eq!(plain["status"], 200, "{plain}");

    check_openai_sdk(&res);

    let idle = scenario(&res, &format!("idle-{IDLE_SECS}"));
    let after = idle["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("the idle stream stayed open: {idle}"));
    assert!(
        (IDLE_SECS * 0.9..IDLE_SECS * 2.5).contains(&after),
        "{idle}"
    );
    let busy = scenario(&res, &format!("busy-{IDLE_SECS}"));
    assert_eq!(busy["open"], true, "a busy stream was closed: {busy}");
    assert_eq!(busy["sent"], busy["echoed"], "{busy}");

    check_upgrades_reached_upstream(&net, 7);
    assert_eq!(
        session_ends(&net),
        ["client", "server", "client", "dropped", "client"],
        "echo, server-close, openai-sdk, idle, busy"
    );
    check_audit_line(&stderr);
    assert!(
        !stderr.contains(&net.apis.keys().openai),
        "the real key is in the log"
    );
}

#[test]
fn fly_remote_tokenizer_relays_websocket_and_refuses_a_silent_200() {
    require_root!();
    let net = FakeInternet::start();
    let fly = FlyShape::start(&net, "ws", Tokenizer::Remote, &[]);
    let argv = ws_client_argv(&[
        "echo",
        "server-close",
        "status-401",
        "status-200",
        "openai-sdk",
        "slot",
    ]);
    let (res, _) = results(fly.sandbox(&net, &argv[0]).args(&argv[1..]).command());

    let echo = scenario(&res, "echo");
    assert_eq!(
        echo["replies"],
        serde_json::json!(["hello", "second message"]),
        "{echo}"
    );
    assert_eq!(echo["close_code"], 1000, "{echo}");
    let closed = scenario(&res, "server-close");
    assert_eq!(
        (closed["code"].as_u64(), closed["reason"].as_str()),
        (Some(1000), Some("bye")),
        "{closed}"
    );
    assert_eq!(scenario(&res, "status-401")["status"], 401);
    // A plain success to an upgrade through a remote tokenizer is what a
    // tokenizer that drops the upgrade answers: a 502 that says so.
    let plain = scenario(&res, "status-200");
    assert_eq!(plain["status"], 502, "{plain}");
    assert!(
        plain["body"]
            .as_str()
            .unwrap()
            .contains("does not relay WebSocket upgrades"),
        "{plain}"
    );

    check_openai_sdk(&res);
    // An open stream holds its connection's slot (--max-connections).
    let slot = scenario(&res, "slot");
    assert_eq!(
        (slot["during"].as_u64(), slot["after"].as_u64()),
        (Some(1), Some(0)),
        "{slot}"
    );

    check_upgrades_reached_upstream(&net, 6);
    assert_eq!(
        session_ends(&net),
        ["client", "server", "client", "client"],
        "echo, server-close, openai-sdk, slot"
    );
    check_audit_line(&fly.log_with(&["status=101"]));
}
