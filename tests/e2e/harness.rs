//! Tests of the end-to-end harness itself: the stub DNS, the sandbox
//! wrapper, and the fake upstream APIs hit by real clients (curl, gh, the
//! libc and Python resolvers). No proxypilot is involved: the clients trust
//! the test CA directly here, which the relay tests never let the sandbox do.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::{Command, Output, Stdio},
    time::Duration,
};

use proxypilot_tests::{
    dns,
    sandbox::SandboxCommand,
    upstream::{self, FakeInternet, Gate, RealKeys, ANTHROPIC, DNS_IP, GITHUB, OPENAI, REPLY_TEXT},
    *,
};
use serde_json::{json, Value};

/// The standard fake APIs plus `v4only.test` (an A record only, for the
/// empty-AAAA case).
fn world() -> FakeInternet {
    let w = FakeInternet::start();
    w.dns
        .set("v4only.test", vec!["203.0.113.99".parse().unwrap()]);
    w
}

/// Test-only conveniences on top of the harness.
trait WorldExt {
    fn cmd(&self, program: &str) -> SandboxCommand;
    fn curl(&self, args: &[&str]) -> (u16, String);
    fn curl_json(&self, args: &[&str]) -> (u16, Value);
    fn keys(&self) -> &RealKeys;
}

impl WorldExt for FakeInternet {
    /// A sandboxed command (no cgroup) that resolves through the stub DNS.
    fn cmd(&self, program: &str) -> SandboxCommand {
        self.command(program)
    }

    /// curl trusting the test CA; returns (status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = run(self
            .cmd("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(self.apis.ca_pem_path())
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .command());
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_owned())
    }

    fn curl_json(&self, args: &[&str]) -> (u16, Value) {
        let (code, body) = self.curl(args);
        let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        (code, v)
    }

    fn keys(&self) -> &RealKeys {
        self.apis.keys()
    }
}

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header(k: &str, v: &str) -> String {
    format!("{k}: {v}")
}

// ---------- DNS ----------

fn udp_query(server: SocketAddr, name: &str, qtype: u16, edns: bool) -> dns::Reply {
    let s = UdpSocket::bind("203.0.113.53:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = dns::build_query(name, qtype, edns);
    s.send_to(&q, server).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = s.recv_from(&mut buf).expect("DNS reply");
    let reply = dns::parse_reply(&buf[..n]);
    assert_eq!(reply.id, 0x1234);
    assert_eq!(reply.flags[0] & 0x80, 0x80, "QR set");
    assert_eq!(reply.flags[0] & 0x01, 0x01, "RD echoed");
    assert_eq!(
        reply.question,
        q[12..q.len() - if edns { 11 } else { 0 }],
        "question echoed"
    );
    reply
}

#[test]
fn stub_dns_answers_a_aaaa_nodata_and_nxdomain() {
    require_root!();
    let w = world();
    let server = w.dns.addr();
    let v4: IpAddr = "203.0.113.11".parse().unwrap();
    let v6: IpAddr = "2001:db8::11".parse().unwrap();

    // Raw queries, with and without EDNS, and with a mixed-case name.
    let r = udp_query(server, "api.anthropic.com", dns::TYPE_A, false);
    assert_eq!((r.rcode, r.addrs.clone()), (dns::RCODE_NOERROR, vec![v4]));
    let r = udp_query(server, "API.Anthropic.COM.", dns::TYPE_AAAA, true);
    assert_eq!(
        (r.rcode, r.addrs.clone(), r.arcount),
        (dns::RCODE_NOERROR, vec![v6], 0)
    );
    let r = udp_query(server, "v4only.test", dns::TYPE_AAAA, true);
    assert_eq!(
        (r.rcode, r.addrs.len()),
        (dns::RCODE_NOERROR, 0),
        "empty NOERROR"
    );
    let r = udp_query(server, "nope.example", dns::TYPE_A, false);
    assert_eq!((r.rcode, r.addrs.len()), (dns::RCODE_NXDOMAIN, 0));

    // TCP: length-prefixed, two queries on one connection.
    let mut t = TcpStream::connect(server).unwrap();
    for (name, want) in [
        ("api.openai.com", "203.0.113.12"),
        ("api.github.com", "203.0.113.13"),
    ] {
        let q = dns::build_query(name, dns::TYPE_A, false);
        t.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        t.write_all(&q).unwrap();
        let mut len = [0u8; 2];
        t.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        t.read_exact(&mut msg).unwrap();
        assert_eq!(
            dns::parse_reply(&msg).addrs,
            vec![want.parse::<IpAddr>().unwrap()]
        );
    }

    // The real resolvers, through the resolv.conf override (/etc/hosts untouched).
    let out = run(w.cmd("getent").args(["ahosts", ANTHROPIC]).command());
    let text = stdout(&out);
    assert!(out.status.success(), "getent: {text}");
    assert!(
        text.contains("203.0.113.11") && text.contains("2001:db8::11"),
        "{text}"
    );
    let out = run(w.cmd("getent").args(["ahosts", "nope.example"]).command());
    assert_eq!(
        out.status.code(),
        Some(2),
        "getent exit code for an unknown name"
    );

    let py = r#"
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)})
    except socket.gaierror as e:
        out[name] = "error %d" % e.errno
print(json.dumps(out))
"#;
    let out = run(w
        .cmd("python3")
        .args(["-c", py, OPENAI, "v4only.test", "nope.example"])
        .command());
    let v: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v[OPENAI], json!(["2001:db8::12", "203.0.113.12"]));
    assert_eq!(v["v4only.test"], json!(["203.0.113.99"]));
    assert_eq!(
        v["nope.example"],
        json!(format!("error {}", -2)),
        "EAI_NONAME"
    );

    let asked = w.dns.queries();
    assert!(
        asked
            .iter()
            .any(|(n, t)| n == "nope.example" && *t == dns::TYPE_A),
        "{asked:?}"
    );
}

// ---------- the sandbox wrapper ----------

#[test]
fn sandbox_command_overrides_resolv_conf_joins_the_cgroup_drops_the_user_and_clears_env() {
    require_root!();
    let w = world();
    let cg = TestCgroup::new("harness-sandbox");
    let before = fs::read(std::path::Path::new("/etc/resolv.conf")).unwrap();
    let out = run(w
        .cmd("/bin/sh")
        .args([
            "-c",
            "cat /etc/resolv.conf; cat /proc/self/cgroup; id -u; id -g; id -G; env | sort",
        ])
        .cgroup(cg.path())
        .user(65534, 65534)
        .env("ANTHROPIC_API_KEY", "dummy")
        .command());
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("nameserver {DNS_IP}")), "{text}");
    let cg_name = cg.path().file_name().unwrap().to_str().unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(cg_name)),
        "{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let uid_at = lines.iter().position(|l| *l == "65534").expect("uid 65534");
    assert_eq!(
        &lines[uid_at..uid_at + 3],
        &["65534", "65534", "65534"],
        "uid, gid, groups"
    );
    let env: Vec<&str> = lines[uid_at + 3..].to_vec();
    let names: Vec<&str> = env.iter().map(|l| l.split('=').next().unwrap()).collect();
    // sh itself adds PWD (and may add OLDPWD/SHLVL); nothing else leaks.
    for n in &names {
        assert!(
            [
                "ANTHROPIC_API_KEY",
                "HOME",
                "PATH",
                "PWD",
                "OLDPWD",
                "SHLVL",
                "_"
            ]
            .contains(n),
            "unexpected variable {n} in {env:?}"
        );
    }
    assert!(env.contains(&"ANTHROPIC_API_KEY=dummy"), "{env:?}");
    // The host's resolv.conf is untouched.
    assert_eq!(fs::read("/etc/resolv.conf").unwrap(), before);
}

// ---------- Anthropic ----------

#[test]
fn anthropic_messages_accepts_the_real_key_only() {
    require_root!();
    let w = world();
    let url = format!("https://{ANTHROPIC}/v1/messages");
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let key = w.keys().anthropic.clone();
    let post = |hdrs: &[String]| {
        let mut args = vec![
            "-X",
            "POST",
            url.as_str(),
            "-H",
            "content-type: application/json",
        ];
        args.extend(["-H", "anthropic-version: 2023-06-01", "--data", body]);
        for h in hdrs {
            args.extend(["-H", h.as_str()]);
        }
        w.curl_json(&args)
    };

    let (code, v) = post(&[header("x-api-key", &key)]);
    assert_eq!(code, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(
        (&v["type"], &v["role"], &v["model"]),
        (
            &json!("message"),
            &json!("assistant"),
            &json!("claude-sonnet-4-5")
        )
    );
    assert_eq!(v["content"], json!([{"type": "text", "text": REPLY_TEXT}]));
    assert_eq!(
        (&v["stop_reason"], &v["stop_sequence"]),
        (&json!("end_turn"), &Value::Null)
    );
    assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0, "{v}");

    let (code, _) = post(&[header("authorization", &format!("Bearer {key}"))]);
    assert_eq!(code, 200, "Bearer is accepted too");

    let unauthorized = json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}});
    assert_eq!(
        post(&[header("x-api-key", "dummy")]),
        (401, unauthorized.clone())
    );
    // A forwarded dummy next to the real key is still a 401.
    assert_eq!(
        post(&[
            header("x-api-key", &key),
            header("authorization", "Bearer dummy")
        ]),
        (401, unauthorized)
    );
    let (code, v) = post(&[]);
    assert_eq!(
        (code, &v["error"]["type"]),
        (401, &json!("authentication_error"))
    );

    let log = w.apis.requests_to(ANTHROPIC);
    assert_eq!(
        log.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 200, 401, 401, 401]
    );
    assert_eq!(log[0].header("x-api-key"), Some(key.as_str()));
    assert_eq!(log[0].sni.as_deref(), Some(ANTHROPIC));
    assert_eq!(log[0].body_json()["max_tokens"], 64);
    assert!(log
        .iter()
        .all(|r| r.headers_starting_with("proxy-").is_empty()));
}

/// Reads one SSE event (up to a blank line) from curl's output.
fn read_event(r: &mut impl BufRead) -> Option<String> {
    let mut ev = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            return (!ev.is_empty()).then_some(ev);
        }
        if line.trim().is_empty() {
            if !ev.is_empty() {
                return Some(ev);
            }
            continue;
        }
        ev.push_str(&line);
    }
}

fn event_name(ev: &str) -> &str {
    ev.lines()
        .find_map(|l| l.strip_prefix("event: "))
        .unwrap_or("")
}

fn event_data(ev: &str) -> Value {
    let d = ev.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    serde_json::from_str(d).unwrap_or_else(|_| json!(d))
}

#[test]
fn anthropic_stream_arrives_event_by_event_in_the_real_shape() {
    require_root!();
    let w = world();
    let gate = Gate::new(1);
    w.apis.set_gate(Some(gate.clone()));
    let key = w.keys().anthropic.clone();
    let mut child = w
        .cmd("curl")
        .args(["-sS", "-N", "--max-time", "20", "--http1.1", "--cacert"])
        .arg(w.apis.ca_pem_path())
        .args(["-H", &header("x-api-key", &key), "-H", "content-type: application/json"])
        .args(["--data", r#"{"model":"claude-haiku-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#])
        .arg(format!("https://{ANTHROPIC}/v1/messages"))
        .command()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());

    // Two events, each seen by the client while the server holds the next.
    let first = read_event(&mut out).expect("message_start");
    assert_eq!(event_name(&first), "message_start");
    assert_eq!(
        gate.sent(),
        1,
        "the client saw event 1 before event 2 was sent"
    );
    gate.allow(1);
    let second = read_event(&mut out).expect("content_block_start");
    assert_eq!(gate.sent(), 2);
    gate.open();
    let mut events = vec![first, second];
    while let Some(ev) = read_event(&mut out) {
        events.push(ev);
    }
    assert!(child.wait().unwrap().success());

    let names: Vec<&str> = events.iter().map(|e| event_name(e)).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert!(deltas >= 3, "{names:?}");
    let mut want = vec!["message_start", "content_block_start", "ping"];
    want.extend(std::iter::repeat_n("content_block_delta", deltas));
    want.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, want);
    let start = event_data(&events[0]);
    assert_eq!(start["message"]["model"], "claude-haiku-4-5");
    assert_eq!(start["message"]["content"], json!([]));
    let text: String = events
        .iter()
        .filter(|e| event_name(e) == "content_block_delta")
        .map(|e| {
            let d = event_data(e);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, REPLY_TEXT);
    let md = event_data(&events[events.len() - 2]);
    assert_eq!(md["delta"]["stop_reason"], "end_turn");
}

// ---------- OpenAI ----------

#[test]
fn openai_responses_and_chat_completions_check_the_bearer_key() {
    require_root!();
    let w = world();
    let auth = header("authorization", &format!("Bearer {}", w.keys().openai));
    let post = |path: &str, auth: &str, body: &str| {
        let url = format!("https://{OPENAI}{path}");
        w.curl(&[
            "-H",
            auth,
            "-H",
            "content-type: application/json",
            "--data",
            body,
            &url,
        ])
    };

    let (code, body) = post(
        "/v1/responses",
        &auth,
        r#"{"model":"gpt-4.1-mini","input":"hi"}"#,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["object"], &v["status"], &v["model"]),
        (
            &json!("response"),
            &json!("completed"),
            &json!("gpt-4.1-mini")
        )
    );
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], REPLY_TEXT);

    let (code, body) = post(
        "/v1/responses",
        &auth,
        r#"{"model":"gpt-4.1-mini","input":"hi","stream":true}"#,
    );
    assert_eq!(code, 200);
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let names: Vec<&str> = events.iter().map(|e| event_name(e)).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    let text: String = events
        .iter()
        .filter(|e| event_name(e) == "response.output_text.delta")
        .map(|e| event_data(e)["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, REPLY_TEXT);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| event_data(e)["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());

    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let (code, body) = post("/v1/chat/completions", &auth, chat);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, &v["object"]), (200, &json!("chat.completion")));
    assert_eq!(v["choices"][0]["message"]["content"], REPLY_TEXT);

    let chat_stream =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (code, body) = post("/v1/chat/completions", &auth, chat_stream);
    assert_eq!(code, 200);
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, REPLY_TEXT);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    let (code, body) = post(
        "/v1/responses",
        "authorization: Bearer dummy",
        r#"{"model":"m","input":"x"}"#,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Incorrect API key provided"));
    // The real key in x-api-key does not count for OpenAI.
    let (code, _) = post(
        "/v1/chat/completions",
        &header("x-api-key", &w.keys().openai),
        chat,
    );
    assert_eq!(code, 401);
}

// ---------- GitHub ----------

#[test]
fn github_user_accepts_token_and_bearer() {
    require_root!();
    let w = world();
    let url = format!("https://{GITHUB}/user");
    let tok = w.keys().github.clone();
    for scheme in ["token", "Bearer"] {
        let (code, v) = w.curl_json(&[
            "-H",
            &header("authorization", &format!("{scheme} {tok}")),
            &url,
        ]);
        assert_eq!(
            (code, &v["login"]),
            (200, &json!(upstream::GITHUB_LOGIN)),
            "{scheme}"
        );
    }
    let (code, v) = w.curl_json(&["-H", "authorization: token dummy", &url]);
    assert_eq!(code, 401);
    assert_eq!(
        v,
        json!({"message":"Bad credentials","documentation_url":"https://docs.github.com/rest","status":"401"})
    );
    let (code, v) = w.curl_json(&[&url]);
    assert_eq!(
        (code, &v["message"]),
        (401, &json!("Requires authentication"))
    );
}

/// gh with GH_TOKEN, trusting the test CA through SSL_CERT_FILE (Go reads it
/// on Linux).
fn gh(w: &FakeInternet, token: &str, args: &[&str]) -> Output {
    let cfg = w.dir.0.join("gh-config");
    fs::create_dir_all(&cfg).unwrap();
    run(w
        .cmd("gh")
        .args(args)
        .env("GH_TOKEN", token)
        .env("GH_CONFIG_DIR", &cfg)
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_PROMPT_DISABLED", "1")
        .env("NO_COLOR", "1")
        .env("SSL_CERT_FILE", w.apis.ca_pem_path())
        .command())
}

fn gh_available() -> bool {
    let ok = Command::new("gh")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("gh is not installed (Debian package `gh`; `cargo xtask setup` installs it)");
    }
    if !ok {
        eprintln!("skipping: gh is not installed (apt-get install gh)");
    }
    ok
}

#[test]
fn gh_api_user_and_auth_status_work_against_the_fake() {
    require_root!();
    if !gh_available() {
        return;
    }
    let w = world();
    let tok = w.keys().github.clone();

    let out = gh(&w, &tok, &["api", "user"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "gh api user: {err}");
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["login"], upstream::GITHUB_LOGIN);

    let out = gh(&w, &tok, &["auth", "status"]);
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "gh auth status: {all}");
    assert!(all.contains(upstream::GITHUB_LOGIN), "{all}");

    let seen: Vec<String> = w
        .apis
        .requests_to(GITHUB)
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect();
    eprintln!("gh requested: {seen:?}");
    // gh 2.23: `api user` → GET /user; `auth status` → GET / (scopes from
    // X-OAuth-Scopes) and POST /graphql `query UserCurrent{viewer{login}}`.
    assert!(seen.iter().any(|s| s.starts_with("GET /user ")), "{seen:?}");
    let log = w.apis.requests_to(GITHUB);
    assert!(log.iter().all(|r| r.status == 200), "{seen:?}");
    for r in &log {
        assert_eq!(
            r.header("authorization"),
            Some(format!("token {tok}").as_str()),
            "{r:?}"
        );
    }

    // A dummy token is visible as such.
    let out = gh(&w, "dummy", &["api", "user"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Bad credentials"),
        "{out:?}"
    );
    let out = gh(&w, "dummy", &["auth", "status"]);
    assert!(
        !out.status.success(),
        "gh auth status with a dummy token: {out:?}"
    );
}

// ---------- generic endpoints ----------

#[test]
fn generic_endpoints_echo_stream_and_count() {
    require_root!();
    let w = world();
    let base = format!("https://{OPENAI}");

    let (code, v) = w.curl_json(&["--http2", "-H", "x-probe: 1", &format!("{base}/echo?a=b")]);
    assert_eq!(code, 200);
    assert_eq!(
        (&v["version"], &v["path"]),
        (&json!("HTTP/2.0"), &json!("/echo?a=b"))
    );
    assert_eq!(v["headers"]["x-probe"], "1");
    let (_, v) = w.curl_json(&["--http1.1", &format!("{base}/echo")]);
    assert_eq!(v["version"], "HTTP/1.1");

    // Each fake listens on its IPv4 and its IPv6 address.
    for (flag, want) in [("-4", "203.0.113.12:443"), ("-6", "[2001:db8::12]:443")] {
        let (code, _) = w.curl(&[flag, &format!("{base}/echo")]);
        assert_eq!(code, 200);
        let last = w.apis.requests_to(OPENAI).pop().unwrap();
        assert_eq!(last.local.to_string(), want);
    }

    // Upload: 3 MB chunked; the server reports length and digest.
    let upload = w.dir.0.join("upload.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    fs::write(&upload, &data).unwrap();
    let at = format!("@{}", upload.display());
    let (code, v) = w.curl_json(&[
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        &at,
        &format!("{base}/echo-body"),
    ]);
    assert_eq!(code, 200);
    assert_eq!(v["len"], 3_000_000);
    use sha2::Digest;
    assert_eq!(v["sha256"], hex::encode(sha2::Sha256::digest(&data)));

    // Download: the pattern, byte for byte.
    let n = 5_000_001u64;
    let out = run(w
        .cmd("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(w.apis.ca_pem_path())
        .arg(format!("{base}/bytes?n={n}"))
        .command());
    assert!(out.status.success());
    assert_eq!(out.stdout.len() as u64, n);
    assert!(out
        .stdout
        .iter()
        .enumerate()
        .all(|(i, b)| *b == upstream::pattern_byte(i as u64)));

    // Exfiltration probe: the secret comes back in a header and the body.
    let (code, v) = w.curl_json(&[
        "-H",
        "x-api-key: xyz",
        "-H",
        "authorization: Bearer abc",
        &format!("{base}/echo-secret"),
    ]);
    assert_eq!(
        (code, v),
        (
            200,
            json!({"authorization": "Bearer abc", "x-api-key": "xyz"})
        )
    );

    // Generic SSE with a gap.
    let (code, body) = w.curl(&["-N", &format!("{base}/sse?n=3&gap_ms=20")]);
    assert_eq!(code, 200);
    assert_eq!(body.matches("event: tick").count(), 3, "{body}");

    let log = w.apis.requests_to(OPENAI);
    let paths: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/echo?a=b",
            "/echo",
            "/echo",
            "/echo",
            "/echo-body",
            "/bytes?n=5000001",
            "/echo-secret",
            "/sse?n=3&gap_ms=20"
        ]
    );
}
