//! The TLS relay for real: `proxypilot sidecar` on a sandbox cgroup in a
//! private network namespace, real curl in the sandbox, the fake APIs behind
//! a test CA only the tokenizer side trusts, through the standalone
//! tokenizer (remote) and the embedded engine.

use std::{
    io::{BufRead, BufReader},
    process::{Output, Stdio},
};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer},
    upstream::{self, Api, FakeInternet, Gate, HostSpec, RealKeys, ANTHROPIC, REPLY_TEXT},
    *,
};

const PASS_HOST: &str = "passthrough.test";
const UNKNOWN_HOST: &str = "unknown.test";

/// The standard APIs plus a pass-through host and a host nobody allowed.
fn world() -> FakeInternet {
    let mut hosts = upstream::standard_hosts();
    hosts.push(HostSpec::new(
        PASS_HOST,
        Api::Generic,
        &["203.0.113.14:443"],
    ));
    hosts.push(HostSpec::new(
        UNKNOWN_HOST,
        Api::Generic,
        &["203.0.113.15:443"],
    ));
    FakeInternet::start_with(RealKeys::default(), hosts, &[])
}

fn shape(net: &FakeInternet, name: &str, mode: Tokenizer) -> FlyShape {
    FlyShape::start(net, name, mode, &["--allow", PASS_HOST])
}

/// curl in the sandbox; returns the output (status line last with -w).
fn curl(net: &FakeInternet, fly: &FlyShape, args: &[&str]) -> Output {
    fly.sandbox(net, "curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Body and the value of `-w '\n%{http_code}'`.
fn curl_status(net: &FakeInternet, fly: &FlyShape, args: &[&str]) -> (String, u16) {
    let mut all = vec!["-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(net, fly, &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = text.rsplit_once('\n').unwrap();
    (body.to_string(), code.trim().parse().unwrap())
}

fn both_modes(test: impl Fn(&FakeInternet, &FlyShape, Tokenizer)) {
    let net = world();
    for mode in [Tokenizer::Remote, Tokenizer::Embedded] {
        let fly = shape(&net, &format!("{mode:?}").to_lowercase(), mode);
        net.apis.clear_requests();
        test(&net, &fly, mode);
    }
}

#[test]
fn get_post_and_chunked_upload_carry_the_real_key_and_nothing_else() {
    require_root!();
    both_modes(|net, fly, mode| {
        let keys = net.apis.keys();
        let (body, code) = curl_status(
            net,
            fly,
            &["https://api.anthropic.com/echo", "-H", "x-api-key: dummy"],
        );
        assert_eq!(code, 200, "{mode:?}: {body}");
        let (body, code) = curl_status(
            net,
            fly,
            &[
                "https://api.anthropic.com/v1/messages",
                "-H",
                "x-api-key: dummy",
                "-H",
                "content-type: application/json",
                "--data",
                r#"{"model":"claude-opus-4-20250514","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
            ],
        );
        assert_eq!(code, 200, "{mode:?}: {body}");
        assert!(body.contains(REPLY_TEXT), "{body}");
        // A chunked upload of 1 MiB, checked by the upstream's sha256.
        let file = fly.dir.join("upload.bin");
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let (body, code) = curl_status(
            net,
            fly,
            &[
                "https://api.anthropic.com/echo-body",
                "-H",
                "x-api-key: dummy",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &format!("@{}", file.display()),
            ],
        );
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["len"], data.len(), "{v}");
        use sha2::Digest;
        assert_eq!(v["sha256"], hex::encode(sha2::Sha256::digest(&data)), "{v}");

        let reqs = net.apis.requests_to(ANTHROPIC);
        assert_eq!(reqs.len(), 3);
        for r in &reqs {
            assert_eq!(
                r.header("x-api-key"),
                Some(keys.anthropic.as_str()),
                "{mode:?}: {:?}",
                r.headers
            );
            assert!(
                r.headers_starting_with("proxy-").is_empty(),
                "{:?}",
                r.headers
            );
            assert!(
                r.header("fly-src-optin").is_none(),
                "{mode:?}: fly-src-optin is for the tokenizer hop only"
            );
        }
    });
}

#[test]
fn a_100_mb_download_streams_with_flat_memory() {
    require_root!();
    let net = world();
    let fly = shape(&net, "download", Tokenizer::Embedded);
    let n = 100_000_000u64;
    let out = curl(
        &net,
        &fly,
        &[
            // Not a speed check: a debug build on shared cores can take
            // well over the usual 30 s for 100 MB through two TLS hops.
            "--max-time",
            "300",
            "-H",
            "x-api-key: dummy",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("https://api.anthropic.com/bytes?n={n}"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        n.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", fly.sidecar.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // The whole body never sits in memory: the peak stays far below 100 MB.
    assert!(hwm_kib < 64 * 1024, "sidecar peak RSS {hwm_kib} KiB");
}

#[test]
fn sse_reaches_the_client_event_by_event() {
    require_root!();
    both_modes(|net, fly, mode| {
        let gate = Gate::new(1);
        net.apis.set_gate(Some(gate.clone()));
        let mut child = fly
            .sandbox(net, "curl")
            .args(["-sS", "-N", "--max-time", "30", "https://api.anthropic.com/v1/messages", "-H", "x-api-key: dummy",
                   "-H", "content-type: application/json", "--data",
                   r#"{"model":"m","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#])
            .command()
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        assert_eq!(first, "event: message_start", "{mode:?}");
        // The client has the first event while the upstream still holds the second.
        assert_eq!(
            gate.sent(),
            1,
            "{mode:?}: the upstream sent more before the client saw the first"
        );
        gate.open();
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        assert!(rest.iter().any(|l| l == "event: message_stop"), "{rest:?}");
        assert!(child.wait().unwrap().success());
        net.apis.set_gate(None);
    });
}

#[test]
fn http2_and_keep_alive_reuse_one_connection() {
    require_root!();
    let net = world();
    let fly = shape(&net, "h2", Tokenizer::Remote);
    let out = curl(
        &net,
        &fly,
        &[
            "--http2",
            "-H",
            "x-api-key: dummy",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "https://api.anthropic.com/echo",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    // Twenty requests in one curl over HTTP/1.1: one TLS connection.
    let mut args = vec![
        "--http1.1",
        "-H",
        "x-api-key: dummy",
        "-w",
        "%{num_connects}\n",
        "-o",
        "/dev/null",
    ];
    let url = "https://api.anthropic.com/echo";
    for _ in 0..20 {
        args.extend(["-o", "/dev/null", url]);
    }
    let out = curl(&net, &fly, &args);
    let connects: u32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse::<u32>().unwrap())
        .sum();
    assert_eq!(connects, 1, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(net.apis.requests_to(ANTHROPIC).len(), 21);
}

#[test]
fn host_sni_mismatch_unknown_sni_and_missing_sni_are_refused() {
    require_root!();
    let net = world();
    let fly = shape(&net, "refuse", Tokenizer::Remote);
    let (body, code) = curl_status(
        &net,
        &fly,
        &[
            "https://api.anthropic.com/echo",
            "-H",
            "Host: api.openai.com",
        ],
    );
    assert_eq!(code, 421, "{body}");
    // Unknown host: no certificate is minted; the handshake fails. (The
    // sandbox cannot resolve a name it may not reach, tests/e2e/dns.rs:
    // curl is given the address, as a sandbox that knows it would.)
    let out = curl(
        &net,
        &fly,
        &[
            "--resolve",
            &format!("{UNKNOWN_HOST}:443:203.0.113.15"),
            &format!("https://{UNKNOWN_HOST}/echo"),
        ],
    );
    assert!(!out.status.success());
    assert_eq!(
        out.status.code(),
        Some(35),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An IP literal sends no SNI: denied.
    let out = curl(&net, &fly, &["-k", "https://203.0.113.11/echo"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        net.apis.requests().is_empty(),
        "nothing reached an upstream: {:?}",
        net.apis.requests()
    );
    let log = fly.sidecar_log();
    assert!(log.contains(UNKNOWN_HOST) && log.contains("deny"), "{log}");
}

#[test]
fn an_allowed_host_passes_through_with_its_own_certificate() {
    require_root!();
    let net = world();
    let fly = shape(&net, "pass", Tokenizer::Remote);
    // Trusting only the upstream's own CA works: proxypilot did not terminate TLS.
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
            "--cacert",
        ])
        .arg(net.apis.ca_pem_path())
        .arg(format!("https://{PASS_HOST}/echo"))
        .command()
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With proxypilot's CA only, it fails for the same reason.
    let out = curl(&net, &fly, &[&format!("https://{PASS_HOST}/echo")]);
    assert_eq!(
        out.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tokenizer_that_is_down_gives_502_with_a_clear_body() {
    require_root!();
    let net = world();
    let mut fly = shape(&net, "down", Tokenizer::Remote);
    fly.tokenizer.as_mut().unwrap().kill9();
    let (body, code) = curl_status(
        &net,
        &fly,
        &["https://api.anthropic.com/echo", "-H", "x-api-key: dummy"],
    );
    assert_eq!(code, 502, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("tokenizer"), "{v}");
    assert!(v["hint"].is_string(), "{v}");
}

#[test]
fn the_audit_log_has_every_field_and_no_secret() {
    require_root!();
    let net = world();
    let fly = shape(&net, "audit", Tokenizer::Embedded);
    let (_, code) = curl_status(
        &net,
        &fly,
        &[
            "https://api.anthropic.com/echo?q=secret-query-value&x=1",
            "-H",
            "x-api-key: dummy",
        ],
    );
    assert_eq!(code, 200);
    let log = fly.log_with(&["audit", "/echo"]);
    let line = log
        .lines()
        .find(|l| l.contains("audit") && l.contains("/echo"))
        .unwrap_or_else(|| panic!("{log}"));
    for field in [
        "time=",
        "pid=",
        "process=",
        "original_dst=",
        "sni=",
        "method=",
        "path=",
        "status=",
        "bytes_in=",
        "bytes_out=",
        "duration_ms=",
        "secret=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(
        !line.contains("secret-query-value"),
        "query values are removed: {line}"
    );
    let keys = net.apis.keys();
    for secret in [&keys.anthropic, &keys.openai, &keys.github] {
        assert!(!log.contains(secret.as_str()), "a real key is in the log");
    }
    assert!(
        !log.contains("dummy"),
        "credential header values are not logged"
    );
}

/// curl outside any sandbox (or in `cgroup`), aimed at the sidecar's
/// listener with an intercepted SNI: `--connect-to` skips DNS and the
/// kernel, as a local attacker would.
fn curl_the_listener(
    net: &FakeInternet,
    listener: &str,
    user: Option<u32>,
    cgroup: Option<&std::path::Path>,
) -> Output {
    let mut cmd = net.command("curl").args([
        "-sS",
        "-k",
        "--max-time",
        "10",
        "--connect-to",
        &format!("{ANTHROPIC}:443:{listener}"),
        "-H",
        "x-api-key: dummy",
        &format!("https://{ANTHROPIC}/echo"),
    ]);
    if let Some(uid) = user {
        cmd = cmd.user(uid, uid);
    }
    if let Some(cg) = cgroup {
        cmd = cmd.cgroup(cg);
    }
    cmd.command().stdin(Stdio::null()).output().unwrap()
}

#[test]
fn local_processes_and_other_cgroups_dialling_the_listener_get_no_credential() {
    require_root!();
    let net = world();
    // Embedded mode: the sidecar holds the plaintext key, the worst case.
    let fly = shape(&net, "outsider", Tokenizer::Embedded);
    let other = TestCgroup::new("relay-second-cgroup"); // no programs
                                                        // A cgroup with its own attachment whose programs redirect port 443 to
                                                        // this sidecar's listener: its records are in its own maps.
    let attached = TestCgroup::new("relay-other-attachment");
    let listeners: Vec<std::net::SocketAddr> = vec![
        "127.0.0.1:15443".parse().unwrap(),
        "[::1]:15443".parse().unwrap(),
    ];
    let _other_programs =
        proxypilot::kernel::Attachment::attach(attached.path(), &test_policy(&listeners, vec![]))
            .unwrap();
    let attempts: [(&str, Option<u32>, Option<&std::path::Path>, &str); 5] = [
        ("uid 65534", Some(65534), None, "127.0.0.1:15443"),
        ("root", None, None, "127.0.0.1:15443"),
        ("root over IPv6", None, None, "[::1]:15443"),
        (
            "a second cgroup",
            Some(65534),
            Some(other.path()),
            "127.0.0.1:15443",
        ),
        (
            "a cgroup redirected by other programs",
            Some(65534),
            Some(attached.path()),
            "203.0.113.11:443",
        ),
    ];
    for (who, user, cgroup, listener) in attempts {
        let out = curl_the_listener(&net, listener, user, cgroup);
        // 35: the TLS handshake failed (closed before any ServerHello), so
        // the listener was reached and refused the connection.
        assert_eq!(
            out.status.code(),
            Some(35),
            "{who}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        net.apis.requests().is_empty(),
        "something reached an upstream: {:?}",
        net.apis.requests()
    );
    let log = fly.sidecar_log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not redirected from the sandbox"))
        .collect();
    assert_eq!(refusals.len(), 5, "{log}");
    assert!(refusals.iter().all(|l| l.contains("peer=")), "{refusals:?}");
    assert_eq!(
        refusals
            .iter()
            .filter(|l| l.contains("Some(65534)"))
            .count(),
        3,
        "{refusals:?}"
    );
    assert_eq!(
        refusals.iter().filter(|l| l.contains("Some(0)")).count(),
        2,
        "{refusals:?}"
    );
    assert!(
        !log.contains("verdict=\"intercept\"") && !log.contains("terminating TLS"),
        "{log}"
    );

    // The sandbox, and a cgroup below it, still get their key.
    let inner = fly.cgroup.child("inner");
    for cg in [fly.cgroup.path().to_path_buf(), inner] {
        let out = net
            .command("curl")
            .cgroup(&cg)
            .envs(proxypilot_tests::shapes::sandbox_env(&fly.ca))
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg(format!("https://{ANTHROPIC}/echo"))
            .command()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("\n200"), "{}: {text}", cg.display());
    }
    let seen = net.apis.requests_to(ANTHROPIC);
    assert_eq!(seen.len(), 2);
    let key = net.apis.keys().anthropic.clone();
    assert!(seen
        .iter()
        .all(|r| r.header("x-api-key") == Some(key.as_str())));
}

#[test]
fn pass_through_never_dials_internal_addresses_or_unallowed_ports() {
    require_root!();
    let net = world();
    // What an internal service looks like: a listener on loopback that
    // counts connections.
    let internal = std::net::TcpListener::bind("127.0.0.1:443").unwrap();
    internal.set_nonblocking(true).unwrap();
    let accepted = || {
        let mut n = 0;
        while internal.accept().is_ok() {
            n += 1;
        }
        n
    };
    net.dns
        .set("internal.test", vec!["127.0.0.1".parse().unwrap()]);
    // Nothing listens on 10.0.0.5 (no such address in the namespace).
    net.dns
        .set("private.test", vec!["10.0.0.5".parse().unwrap()]);
    let allow = [
        "--allow",
        "internal.test",
        "--allow",
        "*.private.test",
        "--allow",
        "private.test",
        // The pass-through host's address on another port only.
        "--allow-cidr",
        "203.0.113.14:8443",
    ];
    {
        let fly = shape_with(&net, "internal", &allow);
        for url in ["https://internal.test/", "https://private.test/"] {
            let out = curl(&net, &fly, &["-k", url]);
            assert_eq!(
                out.status.code(),
                Some(35),
                "{url}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // No SNI (an IP literal) to an address allowed on another port.
        let out = curl(&net, &fly, &["-k", "https://203.0.113.14/echo"]);
        assert_eq!(
            out.status.code(),
            Some(35),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(accepted(), 0, "pass-through dialled loopback");
        assert!(net.apis.requests().is_empty(), "{:?}", net.apis.requests());
        let log = fly.sidecar_log();
        for want in [
            "internal.test resolved to 127.0.0.1, which is loopback (127.0.0.0/8); pass-through does not dial internal addresses unless --allow-cidr allows them (e.g. --allow-cidr 127.0.0.1/32:443)",
            "private.test resolved to 10.0.0.5, which is private (10.0.0.0/8)",
            "no SNI in the ClientHello and no --allow-cidr allows 203.0.113.14:443 (address and port)",
        ] {
            assert!(log.contains(want), "{want}\n{log}");
        }
    }
    // Allowed by --allow-cidr (address and port), it passes through.
    let fly = shape_with(
        &net,
        "internal-allowed",
        &["--allow", "internal.test", "--allow-cidr", "127.0.0.1:443"],
    );
    let out = curl(
        &net,
        &fly,
        &["-k", "--max-time", "3", "https://internal.test/"],
    );
    assert!(!out.status.success(), "the listener speaks no TLS");
    assert_eq!(accepted(), 1, "{}", fly.sidecar_log());
}

fn shape_with(net: &FakeInternet, name: &str, extra: &[&str]) -> FlyShape {
    FlyShape::start(net, name, Tokenizer::Remote, extra)
}

/// curl in the sandbox with the dummy key; headers (and trailers) and body.
fn echo_as(net: &FakeInternet, fly: &FlyShape, query: &str, extra: &[&str]) -> String {
    let mut args = vec!["-D", "-", "-H", "x-api-key: dummy"];
    args.extend_from_slice(extra);
    let url = format!("https://{ANTHROPIC}/echo-secret-as?{query}");
    args.push(&url);
    let out = curl(net, fly, &args);
    assert!(
        out.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn echoes_of_the_key_are_masked_in_every_form_the_sandbox_can_ask_for() {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    require_root!();
    let net = world();
    // Masking needs the plaintext key: the embedded tokenizer.
    let fly = shape(&net, "echo-forms", Tokenizer::Embedded);
    let key = net.apis.keys().anthropic.clone();
    let k = key.as_bytes();
    let no_key = |what: &str, out: &str| {
        assert!(
            !out.contains(key.as_str()),
            "{what}: the key reached the sandbox:\n{out}"
        );
    };

    // Encoded echoes, in a header and in the body.
    for (form, encoded) in [
        ("base64", STANDARD.encode(k)),
        ("base64url", URL_SAFE.encode(k)),
        ("base64-nopad", STANDARD_NO_PAD.encode(k)),
        ("base64url-nopad", URL_SAFE_NO_PAD.encode(k)),
        ("hex", hex::encode(k)),
        ("HEX", hex::encode_upper(k)),
        ("percent", key.clone()),
    ] {
        let out = echo_as(&net, &fly, &format!("form={form}"), &[]);
        no_key(form, &out);
        assert!(!out.contains(&encoded), "{form}:\n{out}");
        assert_eq!(
            out.matches("[REDACTED]").count(),
            2,
            "{form}: header and body\n{out}"
        );
    }

    // The key inside a longer base64 document, at each of the 3 alignments:
    // the characters that encode only the key's bytes are masked.
    for pad in 0..3 {
        let out = echo_as(&net, &fly, &format!("form=base64-json&pad={pad}"), &[]);
        let offset = r#"{"filler":""#.len() + pad + r#"","key":""#.len();
        let skip = (3 - offset % 3) % 3;
        let whole = (k.len() - skip) / 3 * 3;
        let core = STANDARD_NO_PAD.encode(&k[skip..skip + whole]);
        assert!(
            !out.contains(&core) && out.contains("[REDACTED]"),
            "pad {pad}:\n{out}"
        );
    }

    // Compression: the sandbox asks for gzip, proxypilot asks the API for
    // identity, the echo comes back plain and masked.
    let out = echo_as(&net, &fly, "form=gzip-if-asked", &["--compressed"]);
    no_key("gzip-if-asked", &out);
    assert!(out.contains("[REDACTED]"), "{out}");
    let last = net.apis.requests_to(ANTHROPIC).pop().unwrap();
    assert_eq!(last.header("accept-encoding"), Some("identity"));
    // An API that compresses regardless: refused with a clear 502.
    let out = echo_as(&net, &fly, "form=gzip", &["--compressed"]);
    no_key("gzip", &out);
    assert!(out.starts_with("HTTP/2 502"), "{out}");
    assert!(
        out.contains("Content-Encoding: gzip although proxypilot asked it for identity encoding"),
        "{out}"
    );

    // Trailers, over HTTP/2 and HTTP/1.1 (asking for them with TE).
    for extra in [&["--http2"][..], &["--http1.1", "-H", "TE: trailers"][..]] {
        let out = echo_as(&net, &fly, "form=trailer", extra);
        no_key("trailer", &out);
        assert!(out.contains("see the trailer"), "{out}");
        if extra[0] == "--http2" {
            assert!(out.contains("x-echo: [REDACTED]"), "{out}");
        }
    }

    // A key cut in two: two header values, two body chunks.
    let out = echo_as(&net, &fly, "form=split", &[]);
    let parts: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("x-echo-part: "))
        .map(str::trim)
        .collect();
    no_key("split headers", &parts);
    no_key("split body", &out);
    assert!(parts.starts_with("[REDACTED]"), "{out}");
    assert!(out.contains("key=[REDACTED]"), "{out}");
}

#[test]
fn in_the_run_shape_a_local_process_dialling_the_listener_gets_nothing_either() {
    require_root!();
    let net = world();
    let log = net.dir.0.join("run-outsider.log");
    let mut run = proxypilot_tests::shapes::local_run(&net, &[], &["sleep", "4"])
        .env("PROXYPILOT_LOG", "info")
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // `run` listens on an ephemeral port; its start-up line says which.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let listener = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .find(|l| l.contains("proxypilot is serving the sandbox"))
            .and_then(|l| l.split("127.0.0.1:").nth(1))
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            });
        if let Some(port) = found {
            break format!("127.0.0.1:{port}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run never started serving:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = curl_the_listener(&net, &listener, Some(65534), None);
    assert_eq!(
        out.status.code(),
        Some(35),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.wait().unwrap().success());
    assert!(net.apis.requests().is_empty(), "{:?}", net.apis.requests());
    let text = std::fs::read_to_string(&log).unwrap();
    let refusal = text
        .lines()
        .find(|l| l.contains("not redirected from the sandbox"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(refusal.contains("Some(65534)"), "{refusal}");
}
